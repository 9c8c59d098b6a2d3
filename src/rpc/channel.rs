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
    /// A call is getting a connection from the pool; the others wait for it.
    Connecting,
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
/// Calls that were open on the failed connection fail with `Unavailable` (retry them
/// if they are idempotent, e.g. with tower's retry layer).
///
/// Give the pool a `max_size` of at least `connections`. Cheap to clone (an `Arc`):
/// clones share the connections.
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
    /// A channel over `connections` (at least 1) connections of `pool`, each with a
    /// [`Client`] made with `cfg`. Connects lazily, on the first calls.
    pub fn new(pool: ConnectionPool<C>, connections: usize, cfg: ClientConfig) -> Self {
        let cfg = match &cfg.runtime {
            Some(_) => cfg,
            None => cfg.runtime(pool.runtime().clone()),
        };
        Channel {
            inner: Arc::new(Inner {
                pool,
                cfg,
                slots: (0..connections.max(1))
                    .map(|_| Mutex::new(Slot::Empty))
                    .collect(),
                next: AtomicUsize::new(0),
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
        loop {
            let failed = {
                let mut slot = self.lock(k);
                match &*slot {
                    Slot::Ready(c) if c.failed().is_none() => return Ok(c.clone()),
                    Slot::Ready(_) => match std::mem::replace(&mut *slot, Slot::Connecting) {
                        Slot::Ready(old) => Ok(Some(old)),
                        _ => unreachable!("just matched"),
                    },
                    Slot::Empty => {
                        *slot = Slot::Connecting;
                        Ok(None)
                    }
                    // Another call connects for this slot: wait for it (listening
                    // before the lock is released, so its notification is heard).
                    Slot::Connecting => Err(self.inner.changed.listen()),
                }
            };
            let failed = match failed {
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
                done: None,
            };
            if let Some(old) = failed {
                // Closed, so the pool discards it rather than lend it again.
                let _ = old.transport().close().await;
            }
            let conn = self.inner.pool.get().await.map_err(|e| {
                Status::new(
                    super::Code::Unavailable,
                    format!("no connection from the pool: {e}"),
                )
            })?;
            let c = Client::with_config(conn, self.inner.cfg.clone());
            guard.done = Some(c.clone());
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

/// Ends a slot's `Connecting`: the new client, or `Empty`; wakes the waiters.
struct Connecting<'a, C: Connector> {
    channel: &'a Channel<C>,
    k: usize,
    done: Option<Client<PooledConnection<C>>>,
}

impl<C: Connector> Drop for Connecting<'_, C> {
    fn drop(&mut self) {
        *self.channel.lock(self.k) = match self.done.take() {
            Some(c) => Slot::Ready(c),
            None => Slot::Empty,
        };
        self.channel.inner.changed.notify(usize::MAX);
    }
}
