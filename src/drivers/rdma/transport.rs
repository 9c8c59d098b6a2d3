//! [`RdmaTransport`]: messages over one RC queue pair. The shell around the protocol
//! core.
//!
//! The protocol (hello, credits, fragments, lent receive buffers, end of stream,
//! backpressure) lives in the pure `Connection` core (`conn.rs`); this file does what
//! the core cannot: verbs, locks, waiting, the device thread, teardown.
//!
//! # Locks, and who posts
//! One lock (`conn`) around the core, held briefly for every input (a send, a batch of
//! completions, buffers given back, a disconnect). The work requests the core asks for
//! are posted *after* `conn` is released, under the QP's lock, which is taken before
//! `conn` is let go: posts leave in the order the core made them, receives before the
//! SENDs whose credits announce them. Lock order: CQ, then `conn`, then QP; `returns`
//! is a leaf. No verbs call happens under `conn`, and none from a `Drop` on an arbitrary
//! thread: a dropped received message only puts its buffer on `returns`; the next
//! holder of `conn` (the device thread, or any operation) takes the buffer in and posts
//! it. Only when the peer may run short of credits (the core's `returns_urgent`: the
//! receives it knows of are down to a quarter of the depth) does the drop also ring the
//! sleeping device thread's doorbell; otherwise the next `recv`, `send` or completion
//! takes it, and a stream of dropped messages costs no system call or thread wake-up
//! each.
//!
//! # Completions
//! The device's poller thread (`DeviceReactor`) polls this connection's CQ and hands
//! each batch to the core under the CQ's lock, so batches are handled in CQ order. In
//! latency mode ([`RdmaConfig::busy_poll`]) a waiting task polls the CQ itself first.
//!
//! # The last handle
//! Dropping the last handle with messages still going out does not lose them: the
//! connection queues its end-of-stream marker and *lingers* in the device reactor, which
//! drives it until everything (the marker included) is acknowledged or
//! [`RdmaConfig::linger`] is up, then disconnects it. The drop itself only hands the
//! connection over: every post and the disconnect happen on the device thread. When
//! the process exits, the exit hook (`src/linger.rs`) waits (up to `linger`) for
//! connections still delivering.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use event_listener::Event;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairAttributeMask,
    QueuePairState, SetScatterGatherEntry, WorkRequestFlags,
};

use super::buffer::{GiveBack, Lease, RecvSlot, SlabStager};
use super::cm::CmHandle;
use super::conn::{Connection, Incoming, RecvWr, SendWr};
use super::context::RdmaContext;
use super::device::{DeviceReactor, Member};
use super::poller::CqSource;
use crate::buffer::Buf;
use crate::error::{Error, ErrorKind, Result};
use crate::linger::{Deliver, Delivery, Registration};
use crate::mem::{Slab, SlabBuf};
use crate::reactor::{Completion, CompletionSource, Keep};
use crate::transport::Transport;

pub use super::config::{RdmaConfig, APP_MAX};
pub use super::inspect::RegisteredBuffer;

/// Sends in flight from which `send` leaves posting to their completions, so a stream
/// of small messages goes out in batches (one doorbell for many).
pub(super) const CORK_IN_FLIGHT: u32 = 8;

pub(super) type Core = Connection<RecvSlot, Keep>;

/// The connection's completion queue and a batch buffer, shared by the device thread
/// and (in latency mode) waiting tasks.
pub(super) struct Cq {
    pub(super) source: CqSource,
    pub(super) buf: Vec<Completion>,
}

pub(super) struct Shared {
    // Declared first: the QP is destroyed before its CQ and before the memory its
    // requests name (owned by `conn`, `slab` and `app_slab`).
    pub(super) qp: Mutex<BasicQueuePair>,
    pub(super) cq: Mutex<Cq>,
    pub(super) conn: Mutex<Core>,
    /// Lent receive buffers given back by dropped messages (a leaf lock).
    pub(super) returns: Mutex<Vec<(u32, SlabBuf)>>,
    pub(super) has_returns: AtomicBool,
    /// The core took an input without a drive (the last handle's drop): the device
    /// thread drives it (posting what it asks for) on its next round.
    pub(super) drive_due: AtomicBool,
    /// The core's `returns_urgent()` as of the last drive.
    pub(super) returns_urgent: AtomicBool,
    /// Tasks busy-polling the CQ now (latency mode). While there are any, the device
    /// thread does not arm this CQ.
    pub(super) inline: AtomicUsize,
    pub(super) reactor: Arc<DeviceReactor>,
    /// This connection's id in the reactor.
    pub(super) member: AtomicUsize,
    pub(super) me: Weak<Shared>,
    /// Receive buffers and send bounce slots, `chunk` bytes each.
    pub(super) slab: Slab,
    /// Registered memory handed to the application by `alloc_buf` (size classes from
    /// one chunk to [`APP_MAX`]), sent without a copy.
    pub(super) app_slab: Slab,
    /// `alloc_buf` beyond registered memory: recycled heap memory.
    pub(super) heap: crate::buffer::HeapPool,
    pub(super) changed: Event,
    pub(super) cfg: RdmaConfig,
    pub(super) cm: CmHandle,
    pub(super) registration: Mutex<Option<Registration>>,
    pub(super) _context: RdmaContext,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A message connection over an RDMA reliable-connected queue pair.
pub struct RdmaTransport {
    pub(super) shared: Arc<Shared>,
    pub(super) peer: Option<SocketAddr>,
}

/// Post receives, then SENDs, each batch with one doorbell.
pub(super) fn post(qp: &mut BasicQueuePair, recvs: &[RecvWr], sends: &[SendWr]) -> Result<()> {
    if !recvs.is_empty() {
        let mut g = qp.start_post_recv();
        for r in recvs {
            // SAFETY: the buffer is `sge.len` bytes of memory registered with this QP's
            // PD under `sge.lkey`; the core keeps it (its receive table) until this
            // receive's completion has been handled, and the QP is destroyed before
            // the core and the slab.
            unsafe {
                g.construct_wr(r.wr_id)
                    .setup_sge(r.sge.lkey, r.sge.addr, r.sge.len)
            };
        }
        g.post()
            .map_err(|e| Error::new(ErrorKind::Registration, format!("ibv_post_recv: {e}")))?;
    }
    if !sends.is_empty() {
        let mut g = qp.start_post_send();
        for s in sends {
            let h = g
                .construct_wr(s.wr_id, WorkRequestFlags::Signaled)
                .setup_send_imm(s.imm);
            if let Some(sge) = s.sge {
                // SAFETY: `sge` names registered memory (a bounce slot, or a slot of
                // `app_slab` or `slab` found by `lookup`) whose owner the core's
                // in-flight table keeps until this request's completion (success or
                // flush error) has been handled; the QP is destroyed before the core.
                unsafe { h.setup_sge(sge.lkey, sge.addr, sge.len) };
            }
        }
        g.post()
            .map_err(|e| Error::new(ErrorKind::ConnectionReset, format!("ibv_post_send: {e}")))?;
    }
    Ok(())
}

impl GiveBack for Shared {
    fn give_back(&self, idx: usize, buf: SlabBuf) {
        lock(&self.returns).push((idx as u32, buf));
        self.has_returns.store(true, Ordering::SeqCst);
        // Only when the peer may run short of credits: otherwise the next drive (a
        // `recv`, a `send`, the completion of the peer's next message) takes it.
        if self.returns_urgent.load(Ordering::SeqCst) {
            self.reactor.wake();
        }
    }
}

impl Member for Shared {
    fn poll_cq(&self, max: usize) -> usize {
        let mut cq = lock(&self.cq);
        self.poll_locked(&mut cq, max)
    }

    fn arm_cq(&self) {
        if self.inline.load(Ordering::Acquire) > 0 {
            return;
        }
        let res = lock(&self.cq).source.arm();
        if let Err(e) = res {
            self.drive(|c| {
                c.fail(Error::new(
                    ErrorKind::ConnectionReset,
                    format!("ibv_req_notify_cq: {e}"),
                ))
            });
        }
    }

    fn needs_service(&self) -> bool {
        self.has_returns.load(Ordering::SeqCst) || self.drive_due.load(Ordering::SeqCst)
    }

    fn settled(&self) -> bool {
        lock(&self.conn).poll_flush().is_some()
    }

    fn finish(&self, expired: bool) {
        self.drive(|c| {
            if expired {
                c.fail(self.linger_expired());
            }
            c.close();
        });
        let _ = self.cm.disconnect();
    }
}

impl Deliver for Shared {
    fn deliver_now(&self) -> Delivery {
        // The device thread makes the progress; the exit hook only waits for it.
        match lock(&self.conn).poll_flush() {
            Some(_) => Delivery::Done,
            None => Delivery::Blocked,
        }
    }

    fn give_up(&self) {
        self.finish(true);
    }

    fn linger(&self) -> Duration {
        self.cfg.linger
    }
}

impl Shared {
    /// Feed the core one input, then post what it asks for (after unlocking it) and
    /// wake the waiters if something changed.
    pub(super) fn drive<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let mut recvs = Vec::new();
        let mut sends = Vec::new();
        let mut conn = lock(&self.conn);
        if self.has_returns.swap(false, Ordering::AcqRel) {
            let back = std::mem::take(&mut *lock(&self.returns));
            for (idx, buf) in back {
                conn.buffer_returned(idx, RecvSlot(buf));
            }
        }
        let r = f(&mut conn);
        conn.poll_recv_posts(&mut recvs);
        conn.poll_transmit(
            &mut SlabStager {
                app: &self.app_slab,
                slab: &self.slab,
            },
            &mut sends,
        );
        let mut changed = conn.take_changed();
        self.returns_urgent
            .store(conn.returns_urgent(), Ordering::SeqCst);
        if recvs.is_empty() && sends.is_empty() {
            drop(conn);
        } else {
            // Taken before `conn` is released: posts leave in the core's order.
            let mut qp = lock(&self.qp);
            drop(conn);
            let res = post(&mut qp, &recvs, &sends);
            drop(qp);
            if let Err(e) = res {
                // What was not posted never completes: a bounded leak on a dead
                // connection (its memory goes with the connection, after the QP).
                lock(&self.conn).fail(e);
                changed = true;
            }
        }
        if changed {
            self.changed.notify(usize::MAX);
        }
        r
    }

    /// Poll one batch from the CQ (its lock held by the caller) and hand it to the core.
    fn poll_locked(&self, cq: &mut Cq, max: usize) -> usize {
        let Cq { source, buf } = cq;
        buf.clear();
        match source.poll(buf, max) {
            Ok(n) => {
                // A plain load first: the swap only when the drop asked for a drive.
                let due = self.drive_due.load(Ordering::Acquire)
                    && self.drive_due.swap(false, Ordering::AcqRel);
                if n > 0 || due || self.has_returns.load(Ordering::Acquire) {
                    self.drive(|c| buf.iter().for_each(|x| c.on_completion(x)));
                }
                n
            }
            Err(e) => {
                let e = Error::new(ErrorKind::ConnectionReset, format!("ibv_poll_cq: {e}"));
                self.drive(|c| c.fail(e));
                0
            }
        }
    }

    /// Latency mode: poll the CQ from the waiting task, unless another thread is.
    fn poll_inline(&self) {
        let mut cq = match self.cq.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        self.poll_locked(&mut cq, 32);
    }

    /// RDMA-CM says the connection ended (peer disconnected or died). Move the QP to
    /// the error state: what already arrived is still delivered, then every posted
    /// request completes with a flush error, which fails the waiting operations.
    pub(super) fn on_gone(&self, why: String) {
        if !self.drive(|c| c.on_disconnect(why)) {
            return;
        }
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        let moved = lock(&self.qp).modify(&attr).map_err(|e| e.to_string());
        if let Err(e) = moved {
            // A QP in the error state already (a failed request put it there) needs no
            // move: its flushes come anyway. Otherwise none will: fail now.
            if !self.qp_in_error() {
                self.drive(|c| {
                    c.fail(Error::new(
                        ErrorKind::ConnectionReset,
                        format!("cannot move the queue pair to the error state: {e}"),
                    ))
                });
            }
        }
    }

    fn qp_in_error(&self) -> bool {
        lock(&self.qp)
            .query(QueuePairAttributeMask::State)
            .is_ok_and(|(a, _)| a.state() == QueuePairState::Error)
    }

    fn linger_expired(&self) -> Error {
        Error::connection_lost(
            ErrorKind::TimedOut,
            format!(
                "the connection was dropped and what it still had to send was not \
                 acknowledged within the linger time ({:?})",
                self.cfg.linger
            ),
        )
    }

    /// Wait until `check` gives a value (check → listen → re-check). In latency mode
    /// the task first polls the CQ itself for up to `busy_poll`.
    async fn wait<T>(&self, mut check: impl FnMut(&mut Core) -> Option<T>) -> T {
        loop {
            if let Some(v) = self.wait_until(None, &mut check).await {
                return v;
            }
        }
    }

    /// [`wait`](Shared::wait), giving up at `deadline` (`None` once it has passed and
    /// `check` still gives nothing). The device thread wakes the task at the deadline.
    async fn wait_until<T>(
        &self,
        deadline: Option<Instant>,
        mut check: impl FnMut(&mut Core) -> Option<T>,
    ) -> Option<T> {
        let mut sleep = deadline.map(|at| self.reactor.sleep_until(at));
        loop {
            if let Some(v) = self.drive(&mut check) {
                return Some(v);
            }
            if deadline.is_some_and(|at| Instant::now() >= at) {
                return None;
            }
            if let Some(window) = self.cfg.busy_poll {
                let start = Instant::now();
                let mut until = crate::time::deadline(start, window);
                if let Some(at) = deadline {
                    until = until.min(at);
                }
                self.inline.fetch_add(1, Ordering::AcqRel);
                let found = loop {
                    self.poll_inline();
                    if let Some(v) = self.drive(&mut check) {
                        break Some(v);
                    }
                    let now = Instant::now();
                    if now >= until {
                        break None;
                    }
                    crate::runtime::spin_or_yield(now - start);
                };
                if self.inline.fetch_sub(1, Ordering::AcqRel) == 1 && found.is_none() {
                    // The last busy poller goes to sleep: arm the CQ so the poller thread
                    // is woken by the next completion (it did not arm meanwhile).
                    let _ = lock(&self.cq).source.arm();
                    self.poll_inline();
                }
                if let Some(v) = found {
                    return Some(v);
                }
                if let Some(v) = self.drive(&mut check) {
                    return Some(v);
                }
            }
            let listener = self.changed.listen();
            if let Some(v) = self.drive(&mut check) {
                return Some(v);
            }
            match &mut sleep {
                None => listener.await,
                Some(sleep) => {
                    futures::future::select(listener, sleep).await;
                }
            }
        }
    }
}

impl Transport for RdmaTransport {
    fn send(&self, msg: Bytes) -> impl Future<Output = Result<()>> + Send + '_ {
        let s = &*self.shared;
        let mut msg = Some(msg);
        s.wait(move |c| {
            let m = msg.take()?;
            match c.queue_send(m) {
                Ok(None) => Some(Ok(())),
                Ok(Some(back)) => {
                    msg = Some(back);
                    None
                }
                Err(e) => Some(Err(e)),
            }
        })
    }

    fn recv(&self) -> impl Future<Output = Result<Bytes>> + Send + '_ {
        let s = &*self.shared;
        async move {
            let got = s.wait(|c| c.poll_recv()).await?;
            Ok(match got {
                Incoming::Lent { idx, buf, len } => {
                    Lease::bytes(buf.0, idx as usize, len, s.me.clone())
                }
                Incoming::Owned(b) => b,
            })
        }
    }

    /// Waits until every queued message has been sent and acknowledged by the peer's
    /// device (its send completions arrived), or fails if one of them cannot be.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        self.shared.wait(|c| c.poll_flush())
    }

    async fn shutdown(&self) -> Result<()> {
        self.shared.drive(|c| c.shutdown());
        self.flush().await
    }

    /// Shut down, wait (up to [`RdmaConfig::linger`]) until the peer acknowledged
    /// everything, then disconnect. Out of linger time (a peer that does not read and
    /// so returns no credits) it fails with `TimedOut`, drops what was still queued and
    /// disconnects; later `flush`, `shutdown` and `close` return that error at once.
    async fn close(&self) -> Result<()> {
        let s = &*self.shared;
        s.drive(|c| c.shutdown());
        let deadline = crate::time::deadline(Instant::now(), s.cfg.linger);
        let res = match s.wait_until(Some(deadline), |c| c.poll_flush()).await {
            Some(res) => res,
            None => {
                let e = Error::connection_lost(
                    ErrorKind::TimedOut,
                    format!(
                        "close: what was sent was not acknowledged within the linger time \
                         ({:?}); the rest is dropped",
                        s.cfg.linger
                    ),
                );
                s.drive(|c| c.fail(e.clone()));
                Err(e)
            }
        };
        // The peer ended the stream and then the connection before our end-of-stream
        // got through: there is nobody left to deliver it to, and closing succeeds (as
        // a TCP close after the peer's FIN does).
        let peer_gone_first = self.shared.drive(|c| {
            let gone = c.peer_left_after_ending();
            c.close();
            gone
        });
        let _ = self.shared.cm.disconnect();
        if peer_gone_first {
            return Ok(());
        }
        res
    }

    fn alloc_buf(&self, len: usize) -> Result<Buf> {
        let max = self.shared.cfg.max_message_size;
        if len > max {
            return Err(crate::codec::too_large(len as u64, max, false));
        }
        match self.shared.app_slab.alloc_buf(len) {
            Ok(Some(b)) => Ok(b),
            _ => crate::transport::BufferPool::alloc(&self.shared.heap, len),
        }
    }

    fn max_message_size(&self) -> usize {
        self.shared.cfg.max_message_size
    }

    fn is_closed(&self) -> bool {
        lock(&self.shared.conn).is_closed()
    }

    fn has_unread(&self) -> bool {
        lock(&self.shared.conn).has_unread()
    }

    fn local_addr(&self) -> Result<SocketAddr> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "local address of an RDMA connection: not exposed by sideway 0.4.3",
        ))
    }

    fn peer_addr(&self) -> Result<SocketAddr> {
        self.peer.ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "peer address of an accepted RDMA connection: not exposed by sideway 0.4.3",
            )
        })
    }
}

impl Drop for RdmaTransport {
    /// No verbs or RDMA-CM call here (the last handle may be dropped on any thread):
    /// the core takes the shutdown (its end-of-stream marker queued after what `send`
    /// accepted), and the device thread posts it, keeps the connection until the peer
    /// acknowledged everything (or [`RdmaConfig::linger`] is up), then disconnects it
    /// and lets it go.
    fn drop(&mut self) {
        let s = &self.shared;
        lock(&s.conn).shutdown();
        s.drive_due.store(true, Ordering::SeqCst);
        let id = s.member.load(Ordering::Acquire);
        let member: Arc<dyn Member> = s.clone();
        s.reactor.linger(
            member,
            id,
            crate::time::deadline(Instant::now(), s.cfg.linger),
        );
    }
}

impl fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = lock(&self.shared.conn);
        f.debug_struct("RdmaTransport")
            .field("peer", &self.peer)
            .field("registrations", &self.registrations())
            .field("connection", &*c)
            .finish_non_exhaustive()
    }
}
