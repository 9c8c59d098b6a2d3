//! A connection pool for any [`Transport`], with reconnection policies.
//!
//! * [`ConnectionPool::get`] checks out a connection: an idle one if there is one, else
//!   a new one while fewer than `max_size` exist, else it waits its turn (FIFO). The
//!   whole checkout (waiting, connecting, checking) ends within `checkout_timeout`. The
//!   [`PooledConnection`] guard goes back to the pool on drop.
//! * When connecting fails with a [transient](is_transient) error, the
//!   [`ReconnectPolicy`] decides: the checkout retries with fixed or exponential
//!   (full-jitter) delays up to its attempt/elapsed limits, and the pool backs off: until
//!   the delay passes, checkouts that need a new connection fail at once with the last
//!   connect error instead of piling up. The first checkout (or background refill) after
//!   the delay probes the server again, so the pool recovers by itself within one
//!   backoff delay of the server coming back. A permanent error (`Unsupported`, such as
//!   no RDMA device; a bad address) fails the checkout at once.
//! * A background task (on the configured [`Runtime`]) closes connections past
//!   `idle_timeout` / `max_lifetime` and keeps `min_idle` connections open.
//! * [`ConnectionPool::status`] reports what the pool is doing.
//!
//! # Which connections serve the next checkout
//! A connection goes back to the idle set only if nothing is wrong with it, and it is
//! looked at again when a checkout takes it (both non-blocking; for TCP one
//! `recv(MSG_PEEK)` each, no I/O of the pool's own). It is closed instead when:
//! * it is closed or broken, or the peer closed or reset it, even while it sat idle
//!   (a server that closes idle connections, or was restarted):
//!   [`Transport::is_closed`]; the checkout then takes another or connects anew, so the
//!   caller never sees it;
//! * something arrived on it that nobody received ([`Transport::has_unread`]): the late
//!   reply to an abandoned request, which the next user would take for theirs;
//! * an exchange on it was abandoned: a `recv` through the guard (or through its
//!   [`Transport`] impl, for generic code) was dropped before it completed, e.g. by a
//!   timeout; or a [`request`](PooledConnection::request) failed or was cancelled
//!   midway;
//! * it was given back with more messages sent than received through the guard: the
//!   replies to those may still come (a slow server answers after the check-in, so no
//!   probe can see them yet). One-way traffic, whose messages get no reply, says so
//!   with [`no_reply_expected`](PooledConnection::no_reply_expected) before the guard
//!   is dropped, and the connection is reused;
//! * it was [marked broken](PooledConnection::mark_broken) or
//!   [discarded](PooledConnection::discard), it was shut down or closed through the
//!   guard, or an operation through the guard failed with a
//!   [fatal](crate::Error::is_fatal) error;
//! * `test_on_checkout` is set and [`Connector::check`] fails, runs out of time, or is
//!   cancelled;
//! * it expired, or the pool was closed or its runtime shut down.
//!
//! For request/response, [`rpc::Channel`](crate::rpc::Channel) over a pool is the
//! safe way: each request carries an id and each reply reaches its own call, many calls
//! share a connection, and a call given up never leaves its reply to anyone else. The
//! rest of this section is about exchanging raw messages on pooled connections.
//!
//! ## The trap: an abandoned exchange
//! A request whose reply you stop waiting for (a timeout around `recv`) is still
//! answered: the reply arrives later and sits on the connection as the next message.
//! Reused, the connection would hand it to the next user as the answer to *their*
//! request. The rules above keep such a connection out of the pool, but only for what
//! goes through the guard: the bare transport
//! ([`get_ref`](PooledConnection::get_ref); the guard has no `Deref` to it) bypasses the
//! tracking of sends and dropped `recv`s, and then only the `has_unread` probe (which
//! sees a reply only once it has arrived) stands between the late reply and the next
//! user. So:
//! * use [`PooledConnection::request`] (or [`ConnectionPool::request`]) for one request,
//!   one reply, with [`PoolConfig::request_timeout`] or [`crate::runtime::timeout`]
//!   around it; it discards the connection if the exchange does not complete;
//! * otherwise call `send`/`recv` on the guard itself (or pass `&conn`, which is a
//!   [`Transport`], to generic code), not on `conn.get_ref()`;
//! * after a protocol error the transport cannot see, call
//!   [`mark_broken`](PooledConnection::mark_broken).
//!
//! A `recv` cancelled by `select!` in a loop (which [`Transport`] allows: it loses no
//! message) therefore also costs the connection its place in the pool; for a
//! long-lived streaming connection, [`detach`](PooledConnection::detach) it.
//!
//! # Errors worth a retry
//! [`is_transient`] says which errors may go away by themselves (the pool's own rule for
//! retrying a connect). A `Closed` or `UnexpectedEof` in the middle of a request usually
//! means the server crashed or restarted (the kernel sends FIN for a dead process, so
//! it looks like an orderly close): the request may or may not have been processed, and
//! the pool never re-sends it; re-send only what is safe to repeat.
//!
//! # A pool that outlives its runtime
//! If the pool's runtime shuts down (a tokio runtime dropped while the pool lives on in
//! a static or another runtime), its background task and timers are gone. Every
//! operation then ends without hanging or panicking: [`get`](ConnectionPool::get) and
//! [`request`](PooledConnection::request) fail at once with `Unsupported` ("the
//! connection pool's runtime has shut down"), connections coming back are discarded, and
//! [`close`](ConnectionPool::close) drops idle connections without waiting on timers.
//! Make a new pool on a running runtime.
//!
//! The decisions live in a runtime-free state machine (`state.rs`, tested with manual
//! time); this module only adds waiting, timers, the background task and the
//! non-blocking probes, made outside the pool's lock.
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use net_rs::pool::{ConnectionPool, PoolConfig, ReconnectPolicy, TcpConnector};
//!
//! # async fn run() -> net_rs::Result<()> {
//! let pool = ConnectionPool::new(
//!     TcpConnector::new("127.0.0.1:8080"),
//!     PoolConfig::default()
//!         .max_size(8)
//!         .min_idle(2)
//!         .checkout_timeout(Duration::from_secs(2))
//!         .request_timeout(Some(Duration::from_millis(500)))
//!         .reconnect(ReconnectPolicy::exponential(
//!             Duration::from_millis(20),
//!             Duration::from_secs(2),
//!         )),
//! )?;
//! // One request, one reply; the connection is discarded if the exchange fails or is
//! // cancelled, so a late reply never reaches another user.
//! let reply = pool.request(Bytes::from_static(b"ping")).await?;
//! // Or hold a connection for several exchanges.
//! let conn = pool.get().await?;
//! let a = conn.request(Bytes::from_static(b"one")).await?;
//! conn.send(Bytes::from_static(b"two")).await?;
//! let b = conn.recv().await?;
//! # drop((reply, a, b));
//! # Ok(()) }
//! ```

mod config;
mod conn;
mod connector;
mod policy;
mod state;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use bytes::Bytes;
use event_listener::Event;
use futures::future::{select, Either};

pub use config::PoolConfig;
pub use conn::PooledConnection;
#[cfg(feature = "rdma")]
pub use connector::RdmaConnector;
pub use connector::{Connector, TcpConnector};
pub use policy::{is_transient, Backoff, ReconnectPolicy, Rng};

use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{timeout, Runtime};
use crate::transport::Transport;
use state::{Episode, Health, Limits, PoolState, Step, Vetted};

/// A snapshot of a pool's counters. Its `Display` is one line for logs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Status {
    /// Open connections waiting in the pool.
    pub idle: usize,
    /// Connections checked out (including one a checkout is still vetting).
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
    /// Connections closed by the pool (broken, stale, abandoned, expired, failed checks,
    /// closed pool).
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

impl fmt::Display for Status {
    /// For example `2 idle, 1 in use of 8, 0 waiting, 0 connecting; created 5, failed
    /// connects 1, discarded 2, checkout timeouts 0`, then `; down after 3 failures:
    /// <error>` while connecting fails and `; closed` once closed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} idle, {} in use of {}, {} waiting, {} connecting; created {}, failed connects {}, \
             discarded {}, checkout timeouts {}",
            self.idle,
            self.in_use,
            self.max_size,
            self.waiting,
            self.connecting,
            self.total_created,
            self.failed_connects,
            self.discarded,
            self.checkout_timeouts
        )?;
        if let Some(e) = &self.last_error {
            write!(
                f,
                "; down after {} failures: {e}",
                self.consecutive_failures
            )?;
        }
        if self.closed {
            f.write_str("; closed")?;
        }
        Ok(())
    }
}

pub(crate) struct Inner<C: Connector> {
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

    /// `Err` once the pool's runtime has shut down: no timer or task of it works.
    fn check_running(&self) -> Result<()> {
        if self.rt.is_shut_down() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the connection pool's runtime has shut down (its timers and background \
                 task are gone); make a new pool on a running runtime",
            ));
        }
        Ok(())
    }

    /// The time one connect may take: `connect_timeout`, or what is left until
    /// `deadline` if that is less (the connect is then cut short by the checkout's time).
    fn connect_limit(&self, deadline: Instant) -> std::time::Duration {
        let left = deadline.saturating_duration_since(self.rt.now());
        self.config.connect_timeout.min(left)
    }

    /// One connect, bounded by `limit` (from [`connect_limit`](Inner::connect_limit)).
    async fn connect(&self, limit: std::time::Duration) -> Result<C::Transport> {
        match timeout(&*self.rt, limit, self.connector.connect()).await {
            Ok(res) => res,
            Err(e) if e.is_timeout() => Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "connect timed out after {limit:?} (pool connect_timeout {:?}, or what \
                     was left of the checkout timeout)",
                    self.config.connect_timeout
                ),
            )),
            Err(e) => Err(e),
        }
    }

    /// What a look at `conn` shows, without I/O of the pool's own (and without the
    /// pool's lock).
    fn probe(&self, conn: &C::Transport, broken: bool) -> Health {
        let mut h = Health {
            broken,
            runtime_down: self.rt.is_shut_down(),
            ..Health::default()
        };
        if h.reusable() {
            h.closed = conn.is_closed();
        }
        if h.reusable() {
            h.unread = conn.has_unread();
        }
        h
    }

    /// Vet an idle connection a checkout took: the probes, then `Connector::check` if
    /// configured, bounded by the checkout's `deadline`. `Err` (`TimedOut`) if the check
    /// ran out of time.
    async fn vet(&self, conn: &C::Transport, deadline: Instant) -> Result<Health> {
        let health = self.probe(conn, false);
        if !health.reusable() || !self.config.test_on_checkout {
            return Ok(health);
        }
        let left = deadline.saturating_duration_since(self.rt.now());
        let ok = timeout(&*self.rt, left, self.connector.check(conn)).await?;
        Ok(Health {
            broken: !ok,
            ..health
        })
    }

    fn timeout_error(&self, during: &str) -> Error {
        let st = self.lock().status();
        let cause = match &st.last_error {
            Some(e) => format!("; last connect error: {e}"),
            None => String::new(),
        };
        Error::new(
            ErrorKind::TimedOut,
            format!(
                "pool checkout timed out after {:?}{during} ({} of {} connections in use, {} \
                 connecting){cause}",
                self.config.checkout_timeout, st.in_use, st.max_size, st.connecting
            ),
        )
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

    /// Check out a connection; it ends within `checkout_timeout` (plus scheduling
    /// slack) whatever the connector does.
    ///
    /// An idle connection is probed first (see the [module docs](self)); one that is
    /// stale (closed or reset by the peer while idle), has unread data or fails
    /// `Connector::check` is discarded and the checkout goes on with another or a new
    /// one, so such a connection never reaches the caller.
    ///
    /// Cancel-safe: dropping the future at any point gives back everything it took
    /// (its place in the queue, a connect slot, a connection it was vetting, which is
    /// then discarded).
    ///
    /// # Errors
    /// * `TimedOut` after `checkout_timeout` (the message says why it waited);
    /// * the last connect error (e.g. `ConnectionRefused`) when the server is down and
    ///   the reconnect policy gives up or the pool is backing off; a permanent one
    ///   (`Unsupported`, ...; see [`is_transient`]) at once;
    /// * `PoolClosed` after [`close`](ConnectionPool::close);
    /// * `Unsupported` if the pool's runtime has shut down.
    pub async fn get(&self) -> Result<PooledConnection<C>> {
        let inner = &*self.inner;
        inner.check_running()?;
        let deadline = crate::time::deadline(inner.rt.now(), inner.config.checkout_timeout);
        let mut ticket = Ticket {
            inner,
            id: inner.lock().join(),
        };
        let mut attempts = 0u32;
        let mut started: Option<Instant> = None;
        loop {
            inner.check_running()?;
            let listener = inner.changed.listen();
            let now = inner.rt.now();
            let step = inner
                .lock()
                .poll_checkout(ticket.id, now, deadline, attempts > 0);
            match step {
                Step::Take(conn, created) => {
                    inner.notify();
                    // Held by a guard marked broken until vetted: if this future is
                    // dropped during the check, the slot is released and the
                    // connection (maybe mid-ping) discarded.
                    let guard = PooledConnection::new(self.inner.clone(), conn, created, true);
                    let vetted = inner.vet(guard.transport(), deadline).await;
                    match vetted {
                        Ok(health) => {
                            let verdict = inner.lock().vetted(health);
                            match verdict {
                                Vetted::Keep => {
                                    guard.clear_broken();
                                    return Ok(guard);
                                }
                                Vetted::Retry(t) => {
                                    ticket.id = t;
                                    // The state machine already released the slot.
                                    drop(guard.into_inner());
                                    inner.notify();
                                }
                            }
                        }
                        Err(e) => {
                            drop(guard);
                            if !e.is_timeout() {
                                return Err(e);
                            }
                            inner.lock().timed_out(ticket.id);
                            inner.notify();
                            return Err(inner.timeout_error(" while Connector::check ran"));
                        }
                    }
                }
                Step::Connect => {
                    inner.notify();
                    attempts += 1;
                    let first = *started.get_or_insert(now);
                    let reservation = Reservation { inner, live: true };
                    let limit = inner.connect_limit(deadline);
                    let cut_short = limit < inner.config.connect_timeout;
                    let res = inner.connect(limit).await;
                    reservation.settle();
                    let now = inner.rt.now();
                    match res {
                        Err(e) if cut_short && e.is_timeout() => {
                            inner.lock().checkout_connect_cut_short(ticket.id);
                            inner.notify();
                            return Err(inner.timeout_error(" while connecting"));
                        }
                        Ok(conn) => {
                            let ok = inner.lock().connected();
                            inner.notify();
                            if !ok {
                                drop(conn);
                                return Err(pool_closed());
                            }
                            return Ok(PooledConnection::new(self.inner.clone(), conn, now, false));
                        }
                        Err(e) => {
                            let episode = Episode {
                                attempts,
                                started: first,
                                deadline,
                            };
                            let retry =
                                inner
                                    .lock()
                                    .checkout_connect_failed(now, e.clone(), episode);
                            inner.notify();
                            match retry {
                                Some(t) => ticket.id = t,
                                // Cut short by the checkout's deadline: a checkout timeout.
                                None if e.is_timeout() && now >= deadline => {
                                    inner.lock().timed_out(ticket.id);
                                    return Err(inner.timeout_error(" while connecting"));
                                }
                                None => return Err(e),
                            }
                        }
                    }
                }
                Step::Wait(until) => {
                    if now >= deadline {
                        inner.lock().timed_out(ticket.id);
                        inner.notify();
                        return Err(inner.timeout_error(""));
                    }
                    let wake_at = until.map_or(deadline, |u| u.min(deadline));
                    let sleep = inner.rt.sleep(wake_at - now);
                    if let Either::Right(_) = select(listener, sleep).await {
                        if inner.rt.now() >= deadline {
                            inner.lock().timed_out(ticket.id);
                            inner.notify();
                            return Err(inner.timeout_error(""));
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

    /// Check out a connection, send `msg` and return the one reply:
    /// [`get`](ConnectionPool::get) then [`PooledConnection::request`]. The checkout is
    /// bounded by `checkout_timeout`, the exchange by `request_timeout`.
    ///
    /// # Errors
    /// Those of [`get`](ConnectionPool::get) and [`PooledConnection::request`].
    pub async fn request(&self, msg: Bytes) -> Result<Bytes> {
        self.get().await?.request(msg).await
    }

    /// The pool's counters now.
    pub fn status(&self) -> Status {
        self.inner.lock().status()
    }

    /// Same as [`status`](ConnectionPool::status).
    pub fn state(&self) -> Status {
        self.status()
    }

    /// The runtime the pool times and runs its background task with (for
    /// [`crate::runtime::timeout`]).
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.inner.rt
    }

    /// Close the pool: refuse new checkouts (`PoolClosed`), close idle connections
    /// (concurrently; each `close` is bounded by the transport, for TCP its `linger`),
    /// and wait until every checked-out connection has been returned (each is closed
    /// then) and every connection attempt has ended. Cancel-safe: dropping it leaves
    /// the pool closed, and the idle connections not yet closed are dropped.
    ///
    /// If the pool's runtime has shut down, idle connections are dropped instead of
    /// closed (their `close` would need the runtime).
    pub async fn close(&self) {
        let idle = self.inner.lock().close();
        self.inner.notify();
        if self.inner.rt.is_shut_down() {
            drop(idle);
        } else {
            futures::future::join_all(idle.iter().map(|c| c.close())).await;
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

/// A reserved connect slot; released if the checkout (or the background task) is
/// dropped mid-connect.
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
/// only a weak reference between rounds, so it ends when the pool is dropped or
/// closed, or its runtime shut down. Dropped at any `.await` (its runtime shutting
/// down), it gives back the connect slot it reserved.
async fn maintain<C: Connector>(pool: Weak<Inner<C>>) {
    loop {
        let Some(inner) = pool.upgrade() else { return };
        if inner.lock().is_closed() || inner.rt.is_shut_down() {
            return;
        }
        let expired = inner.lock().reap(inner.rt.now());
        if !expired.is_empty() {
            drop(expired);
            inner.notify();
        }
        while inner.lock().reserve_refill(inner.rt.now()) {
            let reservation = Reservation {
                inner: &inner,
                live: true,
            };
            let res = inner.connect(inner.config.connect_timeout).await;
            reservation.settle();
            let now = inner.rt.now();
            let (failed, late) = {
                let mut st = inner.lock();
                match res {
                    Ok(conn) => (false, st.connected_idle(conn, now)),
                    Err(e) => {
                        st.connect_failed(now, e);
                        (true, None)
                    }
                }
            };
            drop(late);
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
