//! The pre-posted receive buffers of one connection.
//!
//! `depth` registered buffers of `chunk` bytes, each named by its index (the receive
//! `wr_id` is [`WrKind::Recv`] of that index, never a pointer). A buffer is in exactly
//! one place: posted (the table holds it while the device may write it), taken by a
//! receive completion, lent to the application (a [`Lease`](super::buffer::Lease)
//! holds it), or waiting to be posted again. Buffers coming back are posted in batches:
//! one `ibv_post_recv` for everything that came back since the last one.

use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, SetScatterGatherEntry};

use super::wire::WrKind;
use crate::error::{Error, ErrorKind, Result};
use crate::mem::{Slab, SlabBuf};

impl std::fmt::Debug for RecvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.bufs.iter().filter(|b| b.is_some()).count();
        f.debug_struct("RecvPool")
            .field("posted", &(held - self.pending.len()))
            .field("waiting_to_post", &self.pending.len())
            .field("lent", &self.lent)
            .finish_non_exhaustive()
    }
}

pub(crate) struct RecvPool {
    /// Indexed by buffer; `Some` while the buffer is posted or waiting to be.
    bufs: Vec<Option<SlabBuf>>,
    /// Buffers back in the table, not posted yet.
    pending: Vec<usize>,
    chunk: usize,
    /// Buffers lent to the application now, and the most that may be.
    lent: u32,
    lend_max: u32,
    /// Messages lent so far.
    pub(crate) lent_total: u64,
}

impl RecvPool {
    /// Take `depth` buffers of `chunk` bytes from `slab` and post them all.
    pub(crate) fn post_all(
        qp: &mut BasicQueuePair,
        slab: &Slab,
        depth: u32,
        chunk: usize,
    ) -> Result<RecvPool> {
        let mut pool = RecvPool {
            bufs: Vec::with_capacity(depth as usize),
            pending: Vec::with_capacity(depth as usize),
            chunk,
            lent: 0,
            // Half the buffers may be out with the application: the rest keep cycling.
            lend_max: depth / 2,
            lent_total: 0,
        };
        for idx in 0..depth as usize {
            let buf = slab
                .alloc(chunk)
                .map_err(|e| Error::new(ErrorKind::Registration, e.to_string()))?
                .ok_or_else(|| Error::new(ErrorKind::Registration, "no receive slot"))?;
            pool.bufs.push(Some(buf));
            pool.pending.push(idx);
        }
        pool.post_pending(qp)?;
        Ok(pool)
    }

    /// Buffer `idx` (from a receive completion's [`WrKind::Recv`]), out of the table.
    pub(crate) fn take(&mut self, idx: u32) -> Option<(usize, SlabBuf)> {
        let idx = idx as usize;
        Some((idx, self.bufs.get_mut(idx)?.take()?))
    }

    /// Put buffer `idx` back, to be posted with the next batch.
    pub(crate) fn put_back(&mut self, idx: usize, buf: SlabBuf) {
        if let Some(slot) = self.bufs.get_mut(idx) {
            *slot = Some(buf);
            self.pending.push(idx);
        }
    }

    /// Whether another buffer may be lent now (and count it if so).
    pub(crate) fn try_lend(&mut self) -> bool {
        if self.lent >= self.lend_max {
            return false;
        }
        self.lent += 1;
        self.lent_total += 1;
        true
    }

    /// A lent buffer came back (posted again or, on a dead connection, dropped).
    pub(crate) fn returned(&mut self) {
        self.lent = self.lent.saturating_sub(1);
    }

    /// Post every buffer waiting, in one `ibv_post_recv`. Returns how many.
    pub(crate) fn post_pending(&mut self, qp: &mut BasicQueuePair) -> Result<u32> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let mut g = qp.start_post_recv();
        for &idx in &self.pending {
            let Some(buf) = &self.bufs[idx] else { continue };
            // SAFETY: `buf` is `chunk` bytes of memory registered with this QP's PD, and
            // it stays in `self.bufs[idx]` until this receive's completion has been
            // polled (`take`); the QP is destroyed before the pool and the slab's memory.
            unsafe {
                // `idx < depth`, a `u32`.
                g.construct_wr(WrKind::Recv(idx as u32).to_u64()).setup_sge(
                    buf.key(),
                    buf.as_ref().as_ptr() as u64,
                    self.chunk as u32,
                )
            };
        }
        let n = self.pending.len() as u32;
        self.pending.clear();
        g.post()
            .map_err(|e| Error::new(ErrorKind::Registration, format!("ibv_post_recv: {e}")))?;
        Ok(n)
    }
}
