//! Registered memory as `Bytes`, both ways.
//!
//! * Receiving: a [`Lease`] lends a receive buffer to the application as the owner of
//!   a `Bytes`; when the last `Bytes` of it drops, the buffer goes back to its
//!   connection to be posted again.
//! * The core's view of both: a [`RecvSlot`] is a receive buffer as the connection
//!   core holds it, and [`SlabStager`] stages the core's fragments with [`stage`].
//! * Sending: [`stage`] names a fragment's memory for a work request: in place if it
//!   lies in one of the connection's registered slabs (no copy, no registration), else
//!   copied into a registered bounce slot. Either way it returns what must stay alive
//!   until the request's completion.

use std::sync::Weak;

use bytes::Bytes;

use super::conn::{self, RecvBuf, Sge, Stager};
use crate::error::{Error, ErrorKind, Result};
use crate::mem::{Slab, SlabBuf};
use crate::reactor::Keep;

/// Where lent receive buffers go back to.
pub(crate) trait GiveBack: Send + Sync {
    /// Buffer `idx` is free again.
    fn give_back(&self, idx: usize, buf: SlabBuf);
}

/// A received message lent to the application: the registered buffer it arrived in.
pub(crate) struct Lease<C: GiveBack> {
    buf: Option<SlabBuf>,
    idx: usize,
    len: usize,
    conn: Weak<C>,
}

impl<C: GiveBack + 'static> Lease<C> {
    /// `len` bytes received into buffer `idx`, as `Bytes`.
    pub(crate) fn bytes(buf: SlabBuf, idx: usize, len: usize, conn: Weak<C>) -> Bytes {
        Bytes::from_owner(Lease {
            buf: Some(buf),
            idx,
            len,
            conn,
        })
    }
}

impl<C: GiveBack> AsRef<[u8]> for Lease<C> {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b.as_ref()[..self.len])
    }
}

impl<C: GiveBack> Drop for Lease<C> {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        // A connection that is gone has no receive queue to refill: the slot simply
        // returns to its slab.
        if let Some(c) = self.conn.upgrade() {
            c.give_back(self.idx, buf);
        }
    }
}

/// A fragment ready to be named by a work request.
pub(crate) struct Staged {
    /// Keeps the memory alive until the completion (the op-slab entry holds it).
    pub(crate) keep: Keep,
    pub(crate) lkey: u32,
    pub(crate) addr: u64,
    /// Sent from where it was, without a copy.
    pub(crate) zero_copy: bool,
}

/// Stage `frag`: in place if one of `registered` holds it, else copied into a slot of
/// `bounce`.
pub(crate) fn stage(frag: Bytes, registered: &[&Slab], bounce: &Slab) -> Result<Staged> {
    if !frag.is_empty() {
        if let Some(lkey) = registered
            .iter()
            .find_map(|s| s.lookup(frag.as_ptr(), frag.len()))
        {
            let addr = frag.as_ptr() as u64;
            return Ok(Staged {
                keep: Box::new(frag),
                lkey,
                addr,
                zero_copy: true,
            });
        }
    }
    let mut slot = bounce
        .alloc(frag.len().max(1))
        .map_err(|e| Error::new(ErrorKind::Registration, e.to_string()))?
        .ok_or_else(|| Error::new(ErrorKind::Registration, "no bounce slot for a fragment"))?;
    slot.as_mut()[..frag.len()].copy_from_slice(&frag);
    let (lkey, addr) = (slot.key(), slot.as_ref().as_ptr() as u64);
    Ok(Staged {
        keep: Box::new(slot),
        lkey,
        addr,
        zero_copy: false,
    })
}

/// A registered receive buffer, as the core holds it.
pub(super) struct RecvSlot(pub(super) SlabBuf);

impl RecvBuf for RecvSlot {
    fn bytes(&self) -> impl std::ops::Deref<Target = [u8]> + '_ {
        self.0.as_ref()
    }
    fn sge(&self) -> Sge {
        let b = self.0.as_ref();
        Sge {
            addr: b.as_ptr() as u64,
            len: b.len() as u32,
            lkey: self.0.key(),
        }
    }
}

/// Stages fragments in place (this connection's registered memory) or in a bounce
/// slot.
pub(super) struct SlabStager<'a> {
    pub(super) app: &'a Slab,
    pub(super) slab: &'a Slab,
}

impl Stager for SlabStager<'_> {
    type Keep = Keep;
    fn stage(&mut self, frag: Bytes) -> Result<conn::Staged<Keep>> {
        let len = frag.len() as u32;
        let s = stage(frag, &[self.app, self.slab], self.slab)?;
        Ok(conn::Staged {
            keep: s.keep,
            sge: Sge {
                addr: s.addr,
                len,
                lkey: s.lkey,
            },
            zero_copy: s.zero_copy,
        })
    }
}
