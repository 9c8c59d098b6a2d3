//! The operation slab: one entry per posted work request, completed by the poller and
//! awaited by an [`OpFuture`].
//!
//! An entry owns whatever the hardware may touch while the request is in flight (the
//! `keep` value: buffers, `Bytes`, registered memory). It is released only when the
//! completion for the request has been delivered, never earlier, even if the future
//! that posted it was dropped: a dropped future orphans its entry and the completion
//! frees it. Work requests name entries by [`WrId`] (slab key + generation), never by
//! pointer, so a stale or duplicated completion cannot reach a reused slot.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use slab::Slab;

use super::{Completion, WrId};

/// What an op holds alive until its completion.
pub type Keep = Box<dyn Any + Send>;

enum State {
    Pending {
        waker: Option<Waker>,
        keep: Keep,
    },
    Done {
        completion: Completion,
        keep: Keep,
    },
    /// The future was dropped; the entry lives until the completion arrives.
    Orphaned {
        keep: Keep,
    },
}

struct Entry {
    gen: u32,
    state: State,
}

/// Slab of in-flight operations. Shared (`Arc`) by the posting side and the poller.
pub struct OpSlab {
    inner: Mutex<Inner>,
}

struct Inner {
    slab: Slab<Entry>,
    next_gen: u32,
}

impl OpSlab {
    /// An empty slab.
    pub fn new() -> Arc<Self> {
        Arc::new(OpSlab {
            inner: Mutex::new(Inner {
                slab: Slab::with_capacity(1024),
                next_gen: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register an operation that keeps `keep` alive until its completion. Post the
    /// work request with `wr_id = id.to_u64()`, then await the returned future.
    pub fn register(self: &Arc<Self>, keep: Keep) -> OpFuture {
        let mut inner = self.lock();
        let gen = inner.next_gen;
        // 31-bit generations: bit 63 of a `wr_id` is never set by the slab, so drivers
        // can tag their own work requests (such as pre-posted receives) with it.
        inner.next_gen = inner.next_gen.wrapping_add(1) & 0x7FFF_FFFF;
        let key = inner.slab.insert(Entry {
            gen,
            state: State::Pending { waker: None, keep },
        });
        OpFuture {
            slab: self.clone(),
            id: WrId::new(key as u32, gen),
            done: false,
        }
    }

    /// Withdraw an operation whose work request was never posted (posting failed):
    /// returns what it kept.
    pub fn cancel_unposted(&self, fut: OpFuture) -> Option<Keep> {
        let mut fut = fut;
        fut.done = true;
        let mut inner = self.lock();
        let key = fut.id.key() as usize;
        match inner.slab.get(key) {
            Some(e) if e.gen == fut.id.gen() => match inner.slab.remove(key).state {
                State::Pending { keep, .. } | State::Orphaned { keep } => Some(keep),
                State::Done { keep, .. } => Some(keep),
            },
            _ => None,
        }
    }

    /// Deliver a batch of completions; wakes the waiting futures after releasing the
    /// lock. Completions whose `wr_id` names no live entry are returned to the caller
    /// (they belong to something else, or are stale).
    pub fn complete_batch(&self, batch: &[Completion], unknown: &mut Vec<Completion>) {
        let mut wake: Vec<Waker> = Vec::new();
        let mut freed: Vec<Keep> = Vec::new();
        {
            let mut inner = self.lock();
            for c in batch {
                let id = WrId::from_u64(c.wr_id);
                let key = id.key() as usize;
                let live = inner.slab.get(key).is_some_and(|e| e.gen == id.gen());
                if !live {
                    unknown.push(*c);
                    continue;
                }
                let entry = inner.slab.get_mut(key).expect("checked above");
                match std::mem::replace(&mut entry.state, State::Orphaned { keep: Box::new(()) }) {
                    State::Pending { waker, keep } => {
                        entry.state = State::Done {
                            completion: *c,
                            keep,
                        };
                        wake.extend(waker);
                    }
                    State::Orphaned { keep } => {
                        inner.slab.remove(key);
                        freed.push(keep);
                    }
                    done @ State::Done { .. } => {
                        // A second completion for one request: keep the first.
                        entry.state = done;
                        unknown.push(*c);
                    }
                }
            }
        }
        drop(freed);
        for w in wake {
            w.wake();
        }
    }

    /// Operations registered and not yet collected (pending, done or orphaned).
    pub fn in_flight(&self) -> usize {
        self.lock().slab.len()
    }
}

impl fmt::Debug for OpSlab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpSlab")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Resolves with the operation's completion and what it kept alive.
#[must_use = "an operation's future does nothing unless polled; dropping it orphans the op"]
pub struct OpFuture {
    slab: Arc<OpSlab>,
    id: WrId,
    done: bool,
}

impl OpFuture {
    /// The id to post the work request with.
    pub fn wr_id(&self) -> WrId {
        self.id
    }
}

impl Future for OpFuture {
    type Output = (Completion, Keep);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let key = self.id.key() as usize;
        let mut inner = self.slab.lock();
        let Some(entry) = inner.slab.get_mut(key).filter(|e| e.gen == self.id.gen()) else {
            panic!("OpFuture polled after completion");
        };
        match &mut entry.state {
            State::Pending { waker, .. } => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            State::Done { .. } => {
                let State::Done { completion, keep } = inner.slab.remove(key).state else {
                    unreachable!("matched Done above")
                };
                drop(inner);
                self.done = true;
                Poll::Ready((completion, keep))
            }
            State::Orphaned { .. } => unreachable!("only a dropped future orphans its entry"),
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let key = self.id.key() as usize;
        let mut inner = self.slab.lock();
        let Some(entry) = inner.slab.get_mut(key).filter(|e| e.gen == self.id.gen()) else {
            return;
        };
        match std::mem::replace(&mut entry.state, State::Orphaned { keep: Box::new(()) }) {
            State::Pending { keep, .. } => entry.state = State::Orphaned { keep },
            State::Done { keep, .. } => {
                inner.slab.remove(key);
                drop(inner);
                drop(keep);
            }
            orphan @ State::Orphaned { .. } => entry.state = orphan,
        }
    }
}

impl fmt::Debug for OpFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpFuture").field("id", &self.id).finish()
    }
}
