//! What an [`RdmaTransport`] can say about itself: its registrations, zero-copy
//! counts, credits and queues (for tests and monitoring), and the test hooks that
//! `tests/rdma_promises.rs` uses to aim one-sided operations at net-rs's memory.

use sideway::ibverbs::queue_pair::{QueuePair, QueuePairAttributeMask};

use super::config::QUEUE_DEPTH;
use super::conn::RecvBuf;
use super::transport::{lock, RdmaTransport};
#[cfg(doc)]
use super::{config::RdmaConfig, context::RdmaContext};
use crate::error::{Error, ErrorKind, Result};
#[cfg(doc)]
use crate::transport::Transport;

impl RdmaTransport {
    /// Memory registrations this connection made: the receive buffers and one bounce
    /// slot per send-queue entry, all registered when it was set up
    /// ([`registration_bound`](RdmaTransport::registration_bound)) and reused for every
    /// message, plus the regions of [`alloc_buf`](Transport::alloc_buf) buffers (made on
    /// first use of a size class, then reused).
    pub fn registrations(&self) -> u64 {
        self.shared.slab.regions() + self.shared.app_slab.regions()
    }

    /// Message fragments sent straight from registered memory (buffers from
    /// [`alloc_buf`](Transport::alloc_buf), received messages sent on), without a copy.
    pub fn zero_copy_sends(&self) -> u64 {
        lock(&self.shared.conn).zero_copy_sends()
    }

    /// Messages received without a copy: handed out in the receive buffer they arrived
    /// in (messages of up to one `chunk`, while at most half the buffers are lent).
    pub fn zero_copy_recvs(&self) -> u64 {
        lock(&self.shared.conn).zero_copy_recvs()
    }

    /// The most registrations this connection can ever make.
    pub fn registration_bound(&self) -> u64 {
        let cfg = &self.shared.cfg;
        let region = (cfg.chunk * 256).max(1 << 20);
        let per_region = (region / cfg.chunk) as u64;
        let recv = (cfg.depth as u64).div_ceil(per_region);
        let send = (QUEUE_DEPTH as u64).div_ceil(per_region);
        recv + send
    }

    /// Receiver-not-ready events counted by this connection's device, all connections
    /// together ([`RdmaContext::rnr_events`]); credits keep it from growing.
    pub fn device_rnr_events(&self) -> Option<u64> {
        self.shared._context.rnr_events()
    }

    /// Credits this side may still send with (for tests and monitoring).
    pub fn send_credits(&self) -> u32 {
        lock(&self.shared.conn).send_credits()
    }

    /// Bytes received and not yet taken by `recv` (whole messages and the one being
    /// reassembled). Past [`RdmaConfig::recv_buffer`] no credits go back to the peer.
    pub fn unread_bytes(&self) -> usize {
        lock(&self.shared.conn).unread()
    }

    /// Bytes `send` accepted that wait for credits (not posted yet).
    pub fn queued_bytes(&self) -> usize {
        lock(&self.shared.conn).queued()
    }

    /// **Test hook, not API** (hidden from the docs, may change or go at any time): the
    /// receive buffers the connection holds (posted, or back from a completion; not
    /// those lent to the application), as a peer would have to name them in an RDMA
    /// READ or WRITE (address, length, keys), each with a copy of its bytes.
    /// `tests/rdma_promises.rs` aims one-sided operations at them to show that the
    /// device refuses them and that they change nothing.
    #[doc(hidden)]
    pub fn test_hook_recv_buffers(&self) -> Vec<RegisteredBuffer> {
        let c = lock(&self.shared.conn);
        c.held_buffers()
            .map(|(index, b)| {
                let sge = b.sge();
                RegisteredBuffer {
                    index,
                    addr: sge.addr,
                    len: sge.len,
                    lkey: sge.lkey,
                    rkey: b.0.remote_key(),
                    bytes: b.0.as_ref().to_vec(),
                }
            })
            .collect()
    }

    /// **Test hook, not API** (hidden from the docs, may change or go at any time): the
    /// remote operations this connection's queue pair accepts (`ibv_qp_attr`'s
    /// `qp_access_flags` as the device reports them; net-rs grants none).
    #[doc(hidden)]
    pub fn test_hook_qp_access_flags(&self) -> Result<i32> {
        let (attr, _) = lock(&self.shared.qp)
            .query(QueuePairAttributeMask::AccessFlags)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io(std::io::ErrorKind::Other),
                    format!("ibv_query_qp: {e}"),
                )
            })?;
        Ok(attr.access_flags().bits())
    }
}

/// **Test hook, not API** (see [`RdmaTransport::test_hook_recv_buffers`]): one receive
/// buffer as a peer would name it, and its bytes when it was looked at.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct RegisteredBuffer {
    /// The buffer's index in the connection's receive table.
    pub index: u32,
    /// Its address.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// The local key of its memory region.
    pub lkey: u32,
    /// The remote key of its memory region (as the device made it).
    pub rkey: u32,
    /// A copy of its bytes.
    pub bytes: Vec<u8>,
}
