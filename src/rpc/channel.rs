//! [`Channel`]: calls to one peer over a few multiplexed connections from a
//! [`ConnectionPool`], replaced when they fail.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use event_listener::Event;

use super::client::{Client, ClientConfig};
use super::status::Status;
use crate::pool::{ConnectionPool, Connector, PooledConnection};

/// One connection's place in the channel.
enum Slot<C: Connector> {
    /// No connection (none yet, or the last one failed).
    Empty,
    /// A call is getting a connection from the pool (attempt `n`); the others wait for
    /// it.
    Connecting(u64),
    /// Attempt `n` failed with this: the calls that waited for it fail with it too (each
    /// call waits for one checkout at most); a new call starts another attempt.
    Failed(u64, Status),
    /// A connection with its client.
    Ready(Client<PooledConnection<C>>),
}

/// Calls to one peer, on `connections` multiplexed connections checked out of a
/// [`ConnectionPool`] for as long as they work: the safe way to do request/response
/// through a pool (every reply goes to its own call, whatever is cancelled; see
/// [`Client`]).
///
/// Calls go to the connections in turn. A connection whose client failed (the
/// connection broke, or the peer broke the protocol) is closed and given back, and the
/// next call on its place checks out another: the pool's connect timeout, reconnect
/// policy and back-off apply, so a server that restarts is reached again by itself.
/// Calls that arrive while a place is being connected wait for that checkout and
/// share its outcome (its error too), so a call waits for one checkout at most.
/// Calls that were open on the failed connection fail with `Unavailable` (retry them
/// if they are idempotent, e.g. with tower's retry layer).
///
/// `connections` is clamped to the pool's `max_size` (more places than the pool has
/// connections would make the calls routed to the extra places fail their checkouts).
/// The channel keeps its connections checked out: [`ConnectionPool::close`] waits for
/// them, so drop the channel (and the clients it handed out) before closing the pool.
/// Cheap to clone (an `Arc`): clones share the connections.
pub struct Channel<C: Connector> {
    inner: Arc<Inner<C>>,
}

impl<C: Connector> Clone for Channel<C> {
    fn clone(&self) -> Self {
        Channel {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<C: Connector> {
    pool: ConnectionPool<C>,
    cfg: ClientConfig,
    slots: Vec<Mutex<Slot<C>>>,
    next: AtomicUsize,
    /// Numbers the connect attempts.
    attempts: std::sync::atomic::AtomicU64,
    /// Notified when a slot stops connecting.
    changed: Event,
}

impl<C: Connector> fmt::Debug for Channel<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("connections", &self.inner.slots.len())
            .finish_non_exhaustive()
    }
}

impl<C: Connector> Channel<C> {
    /// A channel over `connections` (at least 1, at most the pool's `max_size`)
    /// connections of `pool`, each with a [`Client`] made with `cfg`. Connects lazily,
    /// on the first calls.
    pub fn new(pool: ConnectionPool<C>, connections: usize, cfg: ClientConfig) -> Self {
        let connections = connections.min(pool.status().max_size).max(1);
        let cfg = match &cfg.runtime {
            Some(_) => cfg,
            None => cfg.runtime(pool.runtime().clone()),
        };
        Channel {
            inner: Arc::new(Inner {
                pool,
                cfg,
                slots: (0..connections).map(|_| Mutex::new(Slot::Empty)).collect(),
                next: AtomicUsize::new(0),
                attempts: std::sync::atomic::AtomicU64::new(0),
                changed: Event::new(),
            }),
        }
    }

    /// The pool the connections come from.
    pub fn pool(&self) -> &ConnectionPool<C> {
        &self.inner.pool
    }

    fn lock(&self, k: usize) -> MutexGuard<'_, Slot<C>> {
        self.inner.slots[k]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A working client for the next call: the next connection's, or, if it has none
    /// or it failed, one on a connection checked out now.
    ///
    /// # Errors
    /// `Unavailable` with the pool's error (`checkout_timeout`, the connect error once
    /// the reconnect policy gave up, the pool closed).
    pub async fn client(&self) -> Result<Client<PooledConnection<C>>, Status> {
        let k = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.slots.len();
        // The attempt this call waited for, if it did.
        let mut waited: Option<u64> = None;
        loop {
            let failed = {
                let mut slot = self.lock(k);
                match &*slot {
                    Slot::Ready(c) if c.failed().is_none() => return Ok(c.clone()),
                    Slot::Failed(n, s) if waited == Some(*n) => return Err(s.clone()),
                    // Another call connects for this slot: wait for it (listening
                    // before the lock is released, so its notification is heard).
                    Slot::Connecting(n) => {
                        waited = Some(*n);
                        Err(self.inner.changed.listen())
                    }
                    Slot::Ready(_) | Slot::Empty | Slot::Failed(..) => {
                        let n = self.inner.attempts.fetch_add(1, Ordering::Relaxed);
                        match std::mem::replace(&mut *slot, Slot::Connecting(n)) {
                            Slot::Ready(old) => Ok((n, Some(old))),
                            _ => Ok((n, None)),
                        }
                    }
                }
            };
            let (n, failed) = match failed {
                Ok(f) => f,
                Err(listener) => {
                    listener.await;
                    continue;
                }
            };
            // This call connects for the slot; whatever happens (even this future
            // dropped), the slot stops connecting.
            let mut guard = Connecting {
                channel: self,
                k,
                n,
                done: None,
            };
            if let Some(old) = failed {
                // Closed, so the pool discards it rather than lend it again.
                let _ = old.transport().close().await;
            }
            let conn = match self.inner.pool.get().await {
                Ok(conn) => conn,
                Err(e) => {
                    let s = Status::new(
                        super::Code::Unavailable,
                        format!("no connection from the pool: {e}"),
                    );
                    guard.done = Some(Err(s.clone()));
                    return Err(s);
                }
            };
            let c = Client::with_config(conn, self.inner.cfg.clone());
            guard.done = Some(Ok(c.clone()));
            return Ok(c);
        }
    }

    /// Call `method` with `payload` on the next connection; see [`Client::call`].
    ///
    /// # Errors
    /// Those of [`client`](Channel::client) and [`Client::call`].
    pub async fn call(&self, method: u16, payload: &[u8]) -> Result<Bytes, Status> {
        self.client().await?.call(method, payload).await
    }
}

/// Ends a slot's `Connecting`: the new client, the attempt's error for those who
/// waited for it, or `Empty` (the attempt was dropped: a waiter starts another);
/// wakes the waiters.
struct Connecting<'a, C: Connector> {
    channel: &'a Channel<C>,
    k: usize,
    n: u64,
    done: Option<Result<Client<PooledConnection<C>>, Status>>,
}

impl<C: Connector> Drop for Connecting<'_, C> {
    fn drop(&mut self) {
        *self.channel.lock(self.k) = match self.done.take() {
            Some(Ok(c)) => Slot::Ready(c),
            Some(Err(s)) => Slot::Failed(self.n, s),
            None => Slot::Empty,
        };
        self.channel.inner.changed.notify(usize::MAX);
    }
}
