//! The checked-out connection guard.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{Connector, Inner};
use crate::buffer::Buf;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::timeout;
use crate::transport::Transport;

/// A checked-out connection. It goes back to the pool on drop, or is closed if it can
/// no longer serve another user (see the [module docs](super#which-connections-serve-the-next-checkout)).
///
/// Use its own methods ([`send`](PooledConnection::send),
/// [`recv`](PooledConnection::recv), [`request`](PooledConnection::request), ...), or
/// pass `&conn` to generic code: it implements [`Transport`] with the same methods.
/// They track what the pool must know: a `recv` dropped before it completed (its reply
/// may still come), a message sent and not answered, or a fatal error keeps the
/// connection from being reused. [`get_ref`](PooledConnection::get_ref) gives the bare
/// transport for what is specific to it; calls made through it are not tracked.
pub struct PooledConnection<C: Connector> {
    conn: Option<C::Transport>,
    created: Instant,
    pool: Arc<Inner<C>>,
    /// Not to be reused: marked broken, a failed or abandoned request, a fatal error,
    /// shut down or closed, or still being vetted by the checkout.
    broken: AtomicBool,
    /// A `recv` was dropped before it completed.
    abandoned: AtomicBool,
    /// Messages sent through the guard that no received message answered yet.
    unanswered: AtomicU64,
    /// [`no_reply_expected`](PooledConnection::no_reply_expected) was called: sends on
    /// this checkout are one-way.
    one_way: AtomicBool,
}

/// Sets its flag when dropped unless disarmed: an operation dropped midway.
struct Armed<'a> {
    flag: &'a AtomicBool,
    armed: bool,
}

impl<'a> Armed<'a> {
    fn new(flag: &'a AtomicBool) -> Self {
        Armed { flag, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.flag.store(true, Ordering::Release);
        }
    }
}

impl<C: Connector> PooledConnection<C> {
    pub(super) fn new(
        pool: Arc<Inner<C>>,
        conn: C::Transport,
        created: Instant,
        broken: bool,
    ) -> Self {
        PooledConnection {
            conn: Some(conn),
            created,
            pool,
            broken: AtomicBool::new(broken),
            abandoned: AtomicBool::new(false),
            unanswered: AtomicU64::new(0),
            one_way: AtomicBool::new(false),
        }
    }

    /// The transport.
    pub(super) fn transport(&self) -> &C::Transport {
        self.conn.as_ref().expect("connection present until drop")
    }

    pub(super) fn clear_broken(&self) {
        self.broken.store(false, Ordering::Release);
    }

    /// Take the transport out without checking it in (the caller settled the count).
    pub(super) fn into_inner(mut self) -> C::Transport {
        self.conn.take().expect("connection present until drop")
    }

    fn fail_if_fatal<T>(&self, res: Result<T>) -> Result<T> {
        if let Err(e) = &res {
            if e.is_fatal() {
                self.mark_broken();
            }
        }
        res
    }

    /// Queue one message, as [`Transport::send`]. A fatal error marks the connection
    /// broken. Dropping the future before it resolves sends nothing (per
    /// [`Transport`]), so it does not affect reuse.
    ///
    /// # Errors
    /// As [`Transport::send`].
    pub async fn send(&self, msg: Bytes) -> Result<()> {
        let res = self.transport().send(msg).await;
        if res.is_ok() {
            self.unanswered.fetch_add(1, Ordering::AcqRel);
        }
        self.fail_if_fatal(res)
    }

    /// Receive the next message, as [`Transport::recv`]. If this future is dropped
    /// after it started waiting and before it completed (a timeout, `select!`), the
    /// connection is not reused: the message it waited for may still arrive and would
    /// go to the next user. A fatal error marks it broken too.
    ///
    /// # Errors
    /// As [`Transport::recv`].
    pub async fn recv(&self) -> Result<Bytes> {
        let pending = Armed::new(&self.abandoned);
        let res = self.transport().recv().await;
        pending.disarm();
        if res.is_ok() {
            // One reply answers one request; a stream of several answers more.
            let _ = self
                .unanswered
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
        self.fail_if_fatal(res)
    }

    /// This checkout carries one-way traffic: the messages it sends, before this call
    /// and after, get no reply, so they do not count as an unfinished exchange when the
    /// guard is dropped. Without it, a guard given back with more messages sent than
    /// received keeps its connection out of the pool, since the replies may still be
    /// on their way. It lasts for this checkout only.
    pub fn no_reply_expected(&self) {
        self.one_way.store(true, Ordering::Release);
    }

    /// Wait until every message accepted so far has been handed to the network, as
    /// [`Transport::flush`]. An error marks the connection broken.
    ///
    /// # Errors
    /// As [`Transport::flush`].
    pub async fn flush(&self) -> Result<()> {
        let res = self.transport().flush().await;
        if res.is_err() {
            self.mark_broken();
        }
        res
    }

    /// Flush and end the sending direction, as [`Transport::shutdown`]. The connection
    /// can no longer serve another user, so it is closed when returned.
    ///
    /// # Errors
    /// As [`Transport::shutdown`].
    pub async fn shutdown(&self) -> Result<()> {
        self.mark_broken();
        self.transport().shutdown().await
    }

    /// Close the connection, as [`Transport::close`]; it is not returned to the pool.
    ///
    /// # Errors
    /// As [`Transport::close`].
    pub async fn close(&self) -> Result<()> {
        self.mark_broken();
        self.transport().close().await
    }

    /// Send `msg` and receive the one reply, bounded by
    /// [`PoolConfig::request_timeout`](super::PoolConfig::request_timeout) if set.
    ///
    /// The connection is marked broken (closed when returned, never reused) if the
    /// exchange does not complete: it fails midway, runs out of time, or this future
    /// is dropped (for example by [`crate::runtime::timeout`] around it). Its reply may
    /// still arrive, and the next user would take it for theirs. Only a `send` that
    /// fails before writing anything (`MessageTooLarge`) leaves it usable.
    ///
    /// It assumes the next message on the connection is the reply: do not mix it with
    /// unanswered `send`s of your own on the same checkout.
    ///
    /// # Errors
    /// * `Closed` at once if an earlier exchange on this checkout was abandoned or
    ///   failed, or it was marked broken (a late reply may still be on its way, so this
    ///   connection would return the wrong answer): check out another;
    /// * `TimedOut` after `request_timeout`;
    /// * `Unsupported` if the pool's runtime has shut down;
    /// * those of [`Transport::send`] and [`Transport::recv`]. `Closed` or
    ///   `UnexpectedEof` here may mean the server crashed or restarted (a dead
    ///   process's sockets are closed with FIN): the request may or may not have been
    ///   processed.
    pub async fn request(&self, msg: Bytes) -> Result<Bytes> {
        if self.is_broken() {
            return Err(Error::new(
                ErrorKind::Closed,
                "request: an earlier exchange on this pooled connection was abandoned or \
                 failed (or it was marked broken), so its next message may be a late reply; \
                 check out another connection",
            ));
        }
        self.pool.check_running()?;
        let exchange = Armed::new(&self.broken);
        let conn = self.transport();
        // `Err((e, written))`: whether anything may have gone out.
        let io = async {
            if let Err(e) = conn.send(msg).await {
                let written = e.is_fatal();
                return Err((e, written));
            }
            conn.recv().await.map_err(|e| (e, true))
        };
        let res = match self.pool.config.request_timeout {
            None => io.await,
            Some(d) => match timeout(&*self.pool.rt, d, io).await {
                Ok(r) => r,
                Err(e) if e.is_timeout() => Err((
                    Error::new(
                        ErrorKind::TimedOut,
                        format!(
                            "request timed out after {d:?} (PoolConfig::request_timeout); the \
                             connection is discarded, its reply may still come"
                        ),
                    ),
                    true,
                )),
                Err(e) => Err((e, true)),
            },
        };
        match res {
            Ok(reply) => {
                exchange.disarm();
                Ok(reply)
            }
            Err((e, written)) => {
                if !written {
                    exchange.disarm();
                }
                Err(e)
            }
        }
    }

    /// Mark the connection broken: it is closed instead of returned to the pool when
    /// this guard is dropped (for example after a protocol error the transport cannot
    /// see). Unlike [`discard`](PooledConnection::discard) it takes `&self`, so it
    /// works where the guard is shared or borrowed.
    pub fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// Whether the connection will be closed instead of reused when returned, for what
    /// the guard knows: marked broken, an abandoned `recv` or request, a fatal error,
    /// or messages sent through it that no received message answered (see
    /// [`no_reply_expected`](PooledConnection::no_reply_expected)).
    /// (Check-in also probes the transport: closed, or unread data.)
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
            || self.abandoned.load(Ordering::Acquire)
            || (self.unanswered.load(Ordering::Acquire) > 0
                && !self.one_way.load(Ordering::Acquire))
    }

    /// Close this connection instead of returning it to the pool (e.g. after a
    /// protocol error the transport itself cannot see).
    pub fn discard(self) {
        self.mark_broken();
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

    /// The bare transport, for what is specific to it. What goes through it is not
    /// tracked: the guard cannot see a message sent or a `recv` dropped there, and
    /// would return a connection with a reply still on its way to the pool. Exchange
    /// messages through the guard (its methods, its [`Transport`] impl, or
    /// [`messages`](Transport::messages)); if you do use this for them, call
    /// [`mark_broken`](PooledConnection::mark_broken) unless every exchange completed.
    ///
    /// The guard has no `Deref` to the transport, so that `(*conn).send(..)` cannot
    /// bypass the tracking by accident:
    ///
    /// ```compile_fail
    /// # use net_rs::pool::{ConnectionPool, TcpConnector};
    /// # async fn f(pool: ConnectionPool<TcpConnector>) -> net_rs::Result<()> {
    /// use net_rs::transport::Transport;
    /// let conn = pool.get().await?;
    /// (*conn).send(bytes::Bytes::from_static(b"untracked")).await?;
    /// # Ok(()) }
    /// ```
    pub fn get_ref(&self) -> &C::Transport {
        self.transport()
    }
}

impl<C: Connector> Drop for PooledConnection<C> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let health = self.pool.probe(&conn, self.is_broken());
        let now = self.pool.rt.now();
        let gone = self.pool.lock().checkin(conn, self.created, now, health);
        self.pool.notify();
        drop(gone);
    }
}

/// The same tracking for generic code (`fn f(t: &impl Transport)`): every method is the
/// guard's own.
impl<C: Connector> Transport for PooledConnection<C> {
    fn send(&self, msg: Bytes) -> impl Future<Output = Result<()>> + Send + '_ {
        PooledConnection::send(self, msg)
    }
    fn recv(&self) -> impl Future<Output = Result<Bytes>> + Send + '_ {
        PooledConnection::recv(self)
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        PooledConnection::flush(self)
    }
    fn shutdown(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        PooledConnection::shutdown(self)
    }
    fn close(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        PooledConnection::close(self)
    }
    fn alloc_buf(&self, len: usize) -> Result<Buf> {
        self.transport().alloc_buf(len)
    }
    fn max_message_size(&self) -> usize {
        self.transport().max_message_size()
    }
    fn is_closed(&self) -> bool {
        self.transport().is_closed()
    }
    fn has_unread(&self) -> bool {
        self.transport().has_unread()
    }
    fn local_addr(&self) -> Result<SocketAddr> {
        self.transport().local_addr()
    }
    fn peer_addr(&self) -> Result<SocketAddr> {
        self.transport().peer_addr()
    }
}

impl<C: Connector> fmt::Debug for PooledConnection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("created", &self.created)
            .field("broken", &self.broken.load(Ordering::Relaxed))
            .field("abandoned", &self.abandoned.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}
