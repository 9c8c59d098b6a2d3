//! The runtime-free completion reactor.
//!
//! RDMA hardware reports finished work requests on a completion queue (CQ). This module
//! turns those completions into `std::future::Future`s without any async runtime:
//!
//! * [`OpSlab`] holds one entry per posted work request. The entry owns the memory the
//!   request names until its completion has been delivered, even if the future that
//!   posted it is dropped (then the entry is orphaned and freed by the completion).
//!   Requests carry a [`WrId`] (slab key + generation) in their `wr_id`, never a
//!   pointer.
//! * [`Poller`] drains a [`CompletionSource`] (the CQ, or a fake one in tests) and hands
//!   batches to a handler, usually [`OpSlab::complete_batch`], which wakes each
//!   operation's waker after releasing its lock.
//! * [`Poller::spawn`] runs the poller on its own thread with adaptive waiting: it
//!   busy-polls while completions flow, spins and then yields for a configurable window
//!   once they stop, and finally arms the source's notification and sleeps on it (for a
//!   CQ: `ibv_req_notify_cq` and the completion channel's fd), re-polling once after
//!   arming so a completion that raced the arm is not missed. An idle reactor costs no
//!   CPU; a busy one pays no syscall per completion.
//! * [`credit`] is the receive-credit state machine used for flow control.
//!
//! Nothing here knows about sideway or verbs; the RDMA driver supplies the source.

pub mod credit;
mod op;
mod poller;

pub use op::{Keep, OpFuture, OpSlab};
pub use poller::{CompletionSource, FakeSource, Poller, PollerConfig, PollerHandle};

/// A finished work request, as the reactor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The `wr_id` the request was posted with.
    pub wr_id: u64,
    /// `0` for success, else the verbs `ibv_wc_status`.
    pub status: u32,
    /// The verbs opcode of the completion.
    pub opcode: u32,
    /// Bytes received (receive completions).
    pub byte_len: u32,
    /// Immediate data, if the request carried any.
    pub imm: Option<u32>,
}

impl Completion {
    /// A successful completion for `wr_id` (for tests and fake sources).
    pub fn success(wr_id: u64) -> Self {
        Completion {
            wr_id,
            status: 0,
            opcode: 0,
            byte_len: 0,
            imm: None,
        }
    }

    /// Whether the request succeeded.
    pub fn is_success(&self) -> bool {
        self.status == 0
    }
}

/// A work-request id: a slab key and a generation packed into the 64-bit `wr_id`.
///
/// Ids made by [`OpSlab`] never have bit 63 set ([`WrId::DRIVER_TAG`]): a driver may set
/// it on work requests it routes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WrId(u64);

impl WrId {
    /// The `wr_id` bit reserved for drivers' own work requests.
    pub const DRIVER_TAG: u64 = 1 << 63;

    /// Pack `key` and `gen`.
    pub fn new(key: u32, gen: u32) -> Self {
        WrId(((gen as u64) << 32) | key as u64)
    }

    /// Unpack a `wr_id` from a completion.
    pub fn from_u64(v: u64) -> Self {
        WrId(v)
    }

    /// The value to post as `wr_id`.
    pub fn to_u64(self) -> u64 {
        self.0
    }

    /// The slab key.
    pub fn key(self) -> u32 {
        self.0 as u32
    }

    /// The generation.
    pub fn gen(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

#[cfg(test)]
mod tests;
