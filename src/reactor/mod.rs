//! The runtime-free completion machinery under the RDMA driver, and what of it is on
//! the path a message takes.
//!
//! RDMA hardware reports finished work requests on a completion queue (CQ). Two ways to
//! consume them exist here; the RDMA transport uses the first:
//!
//! * **A poller thread that hands batches to their owner.** [`Poller::spawn`] runs an
//!   adaptive loop over a [`CompletionSource`]: it busy-polls while completions flow,
//!   spins and then yields for a configurable window once they stop, and finally arms
//!   the source's notification and sleeps on it (for a CQ: `ibv_req_notify_cq` and the
//!   completion channel's fd), re-polling once after arming so a completion that raced
//!   the arm is not missed. An idle reactor costs no CPU; a busy one pays no syscall per
//!   completion. The RDMA driver's device thread is this loop over a source that polls
//!   every connection's CQ and gives each batch straight to its connection's protocol
//!   core (`drivers/rdma/conn.rs`), which owns the in-flight table of its own work
//!   requests: completions are consumed in batches, in CQ order, by the connection,
//!   not awaited one by one.
//! * **Completions as futures** ([`OpSlab`], [`OpFuture`]): one slab entry per posted
//!   request, owning the memory it names until its completion, a dropped future only
//!   orphaning its entry; [`OpSlab::complete_batch`] as the poller's handler wakes each
//!   op's waker. This is the general form for one-off operations (a future RDMA READ
//!   or WRITE awaited by its caller); no transport uses it today. Its tests and
//!   `examples/reactor_bench.rs` keep it honest.
//!
//! Shared by both: [`WrId`] (slab key + generation in a `wr_id`, never a pointer),
//! [`Completion`], and [`credit`], the receive-credit state machine of the RDMA
//! protocol. Nothing here knows about sideway or verbs; the RDMA driver supplies the
//! sources.

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
