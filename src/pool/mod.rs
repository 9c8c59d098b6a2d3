//! A connection pool for any [`Transport`], with reconnection policies.
//!
//! * [`ConnectionPool::get`] checks out a connection: an idle one if there is one, else
//!   a new one while fewer than `max_size` exist, else it waits its turn (FIFO) up to
//!   `checkout_timeout`. The [`PooledConnection`] guard derefs to the transport and goes
//!   back to the pool on drop, unless the connection broke while in use
//!   ([`Transport::is_closed`]) or was [discarded](PooledConnection::discard).
//! * When connecting fails, the [`ReconnectPolicy`] decides: the checkout retries with
//!   fixed or exponential (full-jitter) delays up to its attempt/elapsed limits, and the
//!   pool backs off: until the delay passes, checkouts that need a new connection fail
//!   at once with the last connect error instead of piling up. The first checkout (or
//!   background refill) after the delay probes the server again, so the pool recovers
//!   by itself within one backoff delay of the server coming back.
//! * A background task (on the configured [`Runtime`]) closes connections past
//!   `idle_timeout` / `max_lifetime` and keeps `min_idle` connections open.
//! * [`ConnectionPool::status`] reports what the pool is doing.
//!
//! The decisions live in a runtime-free state machine (`state.rs`, tested with manual
//! time); this module only adds waiting, timers and the background task.
//!
//! ```no_run
//! use std::time::Duration;
//! use net_rs::pool::{ConnectionPool, PoolConfig, ReconnectPolicy, TcpConnector};
//! use net_rs::transport::Transport;
//!
//! # async fn run() -> net_rs::Result<()> {
//! let pool = ConnectionPool::new(
//!     TcpConnector::new("127.0.0.1:8080".parse().unwrap()),
//!     PoolConfig::default()
//!         .max_size(8)
//!         .min_idle(2)
//!         .checkout_timeout(Duration::from_secs(2))
//!         .reconnect(ReconnectPolicy::exponential(
//!             Duration::from_millis(20),
//!             Duration::from_secs(2),
//!         )),
//! )?;
//! let conn = pool.get().await?;
//! conn.send(bytes::Bytes::from_static(b"ping")).await?;
//! let reply = conn.recv().await?;
//! # drop(reply);
//! # Ok(()) }
//! ```

mod config;
mod connector;
mod policy;
mod state;

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use event_listener::Event;
use futures::future::{select, Either};

pub use config::PoolConfig;
#[cfg(feature = "rdma")]
pub use connector::RdmaConnector;
pub use connector::{Connector, TcpConnector};
pub use policy::{Backoff, ReconnectPolicy, Rng};

use crate::error::{Error, ErrorKind, Result};
use crate::runtime::Runtime;
use crate::transport::Transport;
use state::{Limits, PoolState, Step};

/// A snapshot of a pool's counters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Status {
    /// Open connections waiting in the pool.
    pub idle: usize,
    /// Connections checked out.
    pub in_use: usize,
    /// Checkouts waiting for a connection.
    pub waiting: usize,
    /// Connection attempts under way.
    pub connecting: usize,
    /// The configured maximum.
    pub max_size: usize,
    /// Connections ever opened.
    pub total_created: u64,
    /// Connection attempts that failed.
    pub failed_connects: u64,
    /// Connections closed by the pool (broken, expired, failed checks, closed pool).
    pub discarded: u64,
    /// Checkouts that timed out.
    pub checkout_timeouts: u64,
    /// Connect failures since the last success (drives the backoff).
    pub consecutive_failures: u32,
    /// The last connect error, while the server is considered down.
    pub last_error: Option<Error>,
    /// Whether [`ConnectionPool::close`] was called.
    pub closed: bool,
}

struct Inner<C: Connector> {
    connector: C,
    config: PoolConfig,
    rt: Arc<dyn Runtime>,
    state: Mutex<PoolState<C::Transport>>,
    /// Notified on every state change that may let a waiter proceed.
    changed: Event,
}

impl<C: Connector> Inner<C> {
    fn lock(&self) -> MutexGuard<'_, PoolState<C::Transport>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.notify(usize::MAX);
    }

    async fn connect(&self, deadline: Instant) -> Result<C::Transport> {
        let left = deadline.saturating_duration_since(self.rt.now());
        let limit = self.config.connect_timeout.min(left);
        crate::runtime::with_timeout(&*self.rt, Some(limit), "connect", self.connector.connect())
            .await
    }
}

/// A pool of connections made by a [`Connector`]. Cloning shares the pool.
pub struct ConnectionPool<C: Connector> {
    inner: Arc<Inner<C>>,
}

impl<C: Connector> Clone for ConnectionPool<C> {
    fn clone(&self) -> Self {
        ConnectionPool {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Connector> ConnectionPool<C> {
    /// A pool of connections from `connector`. Starts the background task that reaps
    /// expired connections and keeps `min_idle` open.
    ///
    /// # Errors
    /// `Unsupported` if no runtime is configured and none is available.
    pub fn new(connector: C, config: PoolConfig) -> Result<Self> {
        let rt = match &config.runtime {
            Some(rt) => rt.clone(),
            None => crate::runtime::default_runtime()?,
        };
        let limits = Limits {
            max_size: config.max_size,
            min_idle: config.min_idle,
            idle_timeout: config.idle_timeout,
            max_lifetime: config.max_lifetime,
            policy: config.reconnect,
        };
        let seed = rt.now().elapsed().as_nanos() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        let inner = Arc::new(Inner {
            connector,
            rt: rt.clone(),
            state: Mutex::new(PoolState::new(limits, seed)),
            changed: Event::new(),
            config,
        });
        rt.spawn(Box::pin(maintain(Arc::downgrade(&inner))));
        Ok(ConnectionPool { inner })
    }

    /// Check out a connection.
    ///
    /// # Errors
    /// * `TimedOut` after `checkout_timeout` (the message says why it waited);
    /// * the last connect error (e.g. `ConnectionRefused`) when the server is down and
    ///   the reconnect policy gives up or the pool is backing off;
    /// * `PoolClosed` after [`close`](ConnectionPool::close).
    pub async fn get(&self) -> Result<PooledConnection<C>> {
        let inner = &*self.inner;
        let start = inner.rt.now();
        let deadline = start + inner.config.checkout_timeout;
        let mut ticket = Ticket {
            inner,
            id: inner.lock().join(),
        };
        let mut attempts = 0u32;
        let mut episode_start: Option<Instant> = None;
        loop {
            let listener = inner.changed.listen();
            let now = inner.rt.now();
            let step = inner
                .lock()
                .poll_checkout(ticket.id, now, deadline, attempts > 0, |c| !c.is_closed());
            match step {
                Step::Take(conn, created) => {
                    inner.notify();
                    if inner.config.test_on_checkout && !inner.connector.check(&conn).await {
                        inner.lock().release(true);
                        drop(conn);
                        inner.notify();
                        ticket.id = inner.lock().rejoin_front();
                        continue;
                    }
                    return Ok(self.guard(conn, created));
                }
                Step::Connect => {
                    inner.notify();
                    attempts += 1;
                    let first = *episode_start.get_or_insert(now);
                    let reservation = Reservation { inner, live: true };
                    let res = inner.connect(deadline).await;
                    reservation.settle();
                    let now = inner.rt.now();
                    match res {
                        Ok(conn) => {
                            let ok = inner.lock().connected();
                            inner.notify();
                            if !ok {
                                return Err(pool_closed());
                            }
                            return Ok(self.guard(conn, now));
                        }
                        Err(e) => {
                            let retry = inner.config.reconnect.may_retry(attempts, now - first)
                                && now < deadline;
                            {
                                let mut st = inner.lock();
                                st.connect_failed(now, e.clone());
                                if retry {
                                    ticket.id = st.rejoin_front();
                                }
                            }
                            inner.notify();
                            if !retry {
                                return Err(e);
                            }
                        }
                    }
                }
                Step::Wait(until) => {
                    let wake_at = until.map_or(deadline, |u| u.min(deadline));
                    if now >= deadline {
                        inner.lock().timed_out(ticket.id);
                        inner.notify();
                        return Err(self.timeout_error());
                    }
                    let sleep = inner.rt.sleep(wake_at - now);
                    if let Either::Right(_) = select(listener, sleep).await {
                        if inner.rt.now() >= deadline {
                            inner.lock().timed_out(ticket.id);
                            inner.notify();
                            return Err(self.timeout_error());
                        }
                    }
                }
                Step::Fail(e) => {
                    inner.notify();
                    return Err(e);
                }
                Step::Closed => return Err(pool_closed()),
            }
        }
    }

    fn guard(&self, conn: C::Transport, created: Instant) -> PooledConnection<C> {
        PooledConnection {
            conn: Some(conn),
            created,
            pool: self.inner.clone(),
            discard: false,
        }
    }

    fn timeout_error(&self) -> Error {
        let st = self.inner.lock().status();
        let cause = match &st.last_error {
            Some(e) => format!("; last connect error: {e}"),
            None => String::new(),
        };
        Error::new(
            ErrorKind::TimedOut,
            format!(
                "pool checkout timed out after {:?} ({} of {} connections in use, {} connecting){cause}",
                self.inner.config.checkout_timeout, st.in_use, st.max_size, st.connecting
            ),
        )
    }

    /// The pool's counters now.
    pub fn status(&self) -> Status {
        self.inner.lock().status()
    }

    /// Same as [`status`](ConnectionPool::status).
    pub fn state(&self) -> Status {
        self.status()
    }

    /// Close the pool: refuse new checkouts (`PoolClosed`), close idle connections,
    /// and wait until every checked-out connection has been returned (each is closed
    /// then) and every connection attempt has ended.
    pub async fn close(&self) {
        let idle = self.inner.lock().close();
        self.inner.notify();
        for conn in idle {
            let _ = conn.close().await;
        }
        loop {
            let listener = self.inner.changed.listen();
            if self.inner.lock().drained() {
                return;
            }
            listener.await;
        }
    }
}

impl<C: Connector + fmt::Debug> fmt::Debug for ConnectionPool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("connector", &self.inner.connector)
            .field("config", &self.inner.config)
            .field("status", &self.status())
            .finish()
    }
}

fn pool_closed() -> Error {
    Error::new(ErrorKind::PoolClosed, "the connection pool is closed")
}

/// A checkout's place in the queue; leaves it if the checkout is dropped.
struct Ticket<'a, C: Connector> {
    inner: &'a Inner<C>,
    id: u64,
}

impl<C: Connector> Drop for Ticket<'_, C> {
    fn drop(&mut self) {
        self.inner.lock().leave(self.id);
        self.inner.notify();
    }
}

/// A reserved connect slot; released if the checkout is dropped mid-connect.
struct Reservation<'a, C: Connector> {
    inner: &'a Inner<C>,
    live: bool,
}

impl<C: Connector> Reservation<'_, C> {
    fn settle(mut self) {
        self.live = false;
    }
}

impl<C: Connector> Drop for Reservation<'_, C> {
    fn drop(&mut self) {
        if self.live {
            self.inner.lock().connect_cancelled();
            self.inner.notify();
        }
    }
}

/// The background task: reap expired idle connections, keep `min_idle` open. Holds
/// only a weak reference between rounds, so it ends when the pool is dropped or closed.
async fn maintain<C: Connector>(pool: Weak<Inner<C>>) {
    loop {
        let Some(inner) = pool.upgrade() else { return };
        if inner.lock().is_closed() {
            return;
        }
        let expired = inner.lock().reap(inner.rt.now());
        if !expired.is_empty() {
            drop(expired);
            inner.notify();
        }
        while inner.lock().reserve_refill(inner.rt.now()) {
            let deadline = inner.rt.now() + inner.config.connect_timeout;
            let res = inner.connect(deadline).await;
            let now = inner.rt.now();
            let failed = {
                let mut st = inner.lock();
                match res {
                    Ok(conn) => {
                        st.connected_idle(conn, now);
                        false
                    }
                    Err(e) => {
                        st.connect_failed(now, e);
                        true
                    }
                }
            };
            inner.notify();
            if failed {
                break;
            }
        }
        let sleep = inner.rt.sleep(inner.config.reaper_interval);
        drop(inner);
        sleep.await;
    }
}

/// A checked-out connection; derefs to the transport and returns to the pool on drop.
pub struct PooledConnection<C: Connector> {
    conn: Option<C::Transport>,
    created: Instant,
    pool: Arc<Inner<C>>,
    discard: bool,
}

impl<C: Connector> PooledConnection<C> {
    /// Close this connection instead of returning it to the pool (e.g. after a
    /// protocol error the transport itself cannot see).
    pub fn discard(mut self) {
        self.discard = true;
    }

    /// Take the connection out of the pool for good; it no longer counts against
    /// `max_size`.
    pub fn detach(mut self) -> C::Transport {
        self.pool.lock().release(false);
        self.pool.notify();
        self.conn.take().expect("connection present until drop")
    }

    /// When the connection was opened.
    pub fn created_at(&self) -> Instant {
        self.created
    }
}

impl<C: Connector> Deref for PooledConnection<C> {
    type Target = C::Transport;
    fn deref(&self) -> &C::Transport {
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl<C: Connector> Drop for PooledConnection<C> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let healthy = !self.discard && !conn.is_closed();
        let now = self.pool.rt.now();
        self.pool.lock().checkin(conn, self.created, now, healthy);
        self.pool.notify();
    }
}

impl<C: Connector> fmt::Debug for PooledConnection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("created", &self.created)
            .field("discard", &self.discard)
            .finish_non_exhaustive()
    }
}
