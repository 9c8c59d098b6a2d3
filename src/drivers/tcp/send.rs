//! The send half: a bounded queue of encoded frames, written by whoever owns the socket.
//!
//! # Who writes
//! At any moment at most one party owns the socket's write side ([`Owner`]), decided
//! under the state lock:
//! * **`Idle`**: nobody; nothing is queued. A `send` that finds the connection idle
//!   takes ownership (`Inline`) and writes its frame straight to the socket with a
//!   non-blocking write that does not go through the runtime
//!   ([`SocketWrite::write_now`]): no task hop, and the bytes are in the kernel before
//!   `send` returns, so a program that returns right after `send` still delivers.
//!   What the socket does not take stays queued and ownership passes to the writer
//!   task, which it wakes.
//! * **`Task`**: the connection's writer task (spawned on the runtime) drains the
//!   queue with vectored writes through the runtime, waiting for writability when the
//!   socket is full. Frames sent meanwhile pile up behind it and leave together, so a
//!   stream of small messages costs a few syscalls per batch.
//! * **`Linger`**: the writer task is gone (its runtime shut down and dropped it):
//!   [`crate::linger`] writes what is left from its own thread, bounded by `linger`.
//!
//! Batching without a clock: after an inline write the connection is *corked*: the
//! next `send` queues and hands over to the writer task instead of writing again. The
//! cork comes off when the writer task finds the queue empty (the sender yielded to the
//! executor, so the burst ended) or when a `recv` on the connection has to wait (a
//! request went out, the reply is awaited: the next request is a new burst). A
//! ping-pong writes every message inline; a stream writes its first message inline and
//! the rest in batches. In latency mode (`TcpConfig::busy_poll`) the cork comes off
//! whenever a `recv` starts, since a busy-polling `recv` rarely has to wait.
//!
//! Whoever owns the socket holds the `pen` (the socket and the batch taken off the
//! queue) while writing; inline writes register no waker, so they never steal the
//! writer task's registration with the runtime.
//!
//! # Process exit and a dead runtime
//! Every send side is on [`crate::linger`]'s list: when the process exits, what is
//! still queued is written out (up to `linger`). When the writer task's future is
//! dropped before it finished (its runtime shut down), the connection is adopted by the
//! linger thread, which delivers what was accepted and sends FIN; later sends fail.
//!
//! Frames up to [`COALESCE`] bytes are copied into one contiguous staging buffer (a
//! memcpy is cheaper than an iovec); larger payloads are queued as they are (no copy).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use futures::io::AsyncWrite;

use super::Broken;
use crate::codec::HEADER_LEN;
use crate::error::{Error, ErrorKind, Result};
use crate::linger::{self, Deliver, Delivery, Registration};
use crate::runtime::{Runtime, TcpWriter};
use crate::sync::{AtomicBool, Event, EventListener, Mutex, MutexGuard, Ordering};

/// Payloads up to this size are copied into the staging buffer.
pub(crate) const COALESCE: usize = 8 * 1024;
/// Most iovecs handed to one `writev`.
const MAX_IOV: usize = 64;
/// Initial size of the staging buffer.
const STAGING: usize = 64 * 1024;

pub(crate) struct SendSide {
    state: Mutex<SendState>,
    pen: Mutex<Pen>,
    /// Set by an inline write, cleared when a burst ends (see the module docs).
    corked: AtomicBool,
    /// Latency mode's window (zero: off). In latency mode an inline write that finds
    /// the socket full keeps retrying for up to the window before it hands over to the
    /// writer task (which cannot run while its thread busy-polls), and the cork comes
    /// off whenever a `recv` starts (a busy-polling `recv` rarely has to wait).
    busy_poll: Duration,
    /// Notified when queue space frees up or the send side fails or closes.
    space: Event,
    /// Notified when bytes reach the socket or writing ends.
    progress: Event,
    limit: usize,
    linger: Duration,
    /// This side, for handing it to the linger thread.
    me: Weak<SendSide>,
    /// Its place on the exit hook's list (see [`SendSide::register`]).
    registration: Mutex<Option<Registration>>,
    /// The connection's failure as either direction was told it (see [`Broken`]).
    broken: Arc<Broken>,
}

/// Who may write to the socket now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Nobody; nothing is queued.
    Idle,
    /// A `send` writing its frame itself.
    Inline,
    /// The writer task.
    Task,
    /// The linger thread or the exit hook (the writer task is gone).
    Linger,
}

/// The socket and the bytes taken from the queue and not yet fully written.
struct Pen {
    sock: Option<TcpWriter>,
    batch: VecDeque<Bytes>,
}

/// What draining the queue came to.
enum Drained {
    /// Everything queued was written.
    Empty,
    /// The queue is empty and shut down: FIN was sent.
    Finished,
    /// Stop: aborted, or the socket failed.
    Stop(Result<()>),
}

/// How a drain writes.
enum Io<'a, 'b> {
    /// Through the runtime, registering the waker when the socket is full.
    Async(&'a mut Context<'b>),
    /// Straight to the socket; a full socket ends the drain (`Pending`).
    Now,
}

struct SendState {
    chunks: VecDeque<Bytes>,
    staging: BytesMut,
    /// Bytes accepted but not yet written.
    queued: usize,
    accepted_total: u64,
    written_total: u64,
    owner: Owner,
    /// The writer task's waker while it waits for work.
    parked: Option<Waker>,
    /// No more messages are accepted; FIN follows the queue.
    shutdown: bool,
    /// Why sends are refused, when that is not a plain `Closed` (runtime gone).
    refusal: Option<Error>,
    /// Give up delivering what is queued (after `linger`, or on a fatal receive error).
    abort: bool,
    /// Every transport handle is gone since then: deliver within `linger`, then stop.
    abandoned: Option<Instant>,
    /// Writing has ended: FIN sent, or stopped. Nothing more will be written.
    finished: bool,
    /// The writer task has ended or was dropped.
    task_gone: bool,
    error: Option<Error>,
}

impl SendState {
    /// Bytes accepted and not written: in the queue, or in the batch being written.
    fn has_queued(&self) -> bool {
        self.queued > 0
    }

    /// Whether the owner of the socket has something to do: bytes, or FIN.
    fn has_work(&self) -> bool {
        self.has_queued() || self.shutdown || self.abort
    }
}

fn lock(m: &Mutex<SendState>) -> MutexGuard<'_, SendState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_pen(m: &Mutex<Pen>) -> MutexGuard<'_, Pen> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SendSide {
    /// A send side over `sock`. Call [`register`](SendSide::register) to put it on the
    /// exit hook's list.
    pub(crate) fn new(
        limit: usize,
        linger: Duration,
        busy_poll: Duration,
        sock: TcpWriter,
        broken: Arc<Broken>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<SendSide>| SendSide {
            state: Mutex::new(SendState {
                chunks: VecDeque::new(),
                staging: BytesMut::with_capacity(STAGING),
                queued: 0,
                accepted_total: 0,
                written_total: 0,
                owner: Owner::Idle,
                parked: None,
                shutdown: false,
                refusal: None,
                abort: false,
                abandoned: None,
                finished: false,
                task_gone: false,
                error: None,
            }),
            pen: Mutex::new(Pen {
                sock: Some(sock),
                batch: VecDeque::new(),
            }),
            corked: AtomicBool::new(false),
            busy_poll,
            space: Event::new(),
            progress: Event::new(),
            limit,
            linger,
            me: me.clone(),
            registration: Mutex::new(None),
            broken,
        })
    }

    /// Put this side on the list the exit hook works through (see [`crate::linger`]).
    pub(crate) fn register(&self) {
        let listed: Weak<dyn Deliver> = self.me.clone();
        *self.registration.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(linger::register(listed));
    }

    /// Queue one encoded frame unless the queue is full,
    /// writing it at once if the connection is idle. Returns the payload back when
    /// there is no room.
    pub(crate) fn try_enqueue(
        &self,
        header: [u8; HEADER_LEN],
        msg: Bytes,
    ) -> Result<Option<Bytes>> {
        let mut st = lock(&self.state);
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        if st.shutdown {
            return Err(st.refusal.clone().unwrap_or_else(|| Error::closed("send")));
        }
        let len = HEADER_LEN + msg.len();
        if st.queued > 0 && st.queued + len > self.limit {
            return Ok(Some(msg));
        }
        if st.owner == Owner::Idle && !self.corked.load(Ordering::Relaxed) {
            // Idle (so nothing is queued): write this frame now, straight from the
            // caller's `Bytes`, without staging it.
            st.owner = Owner::Inline;
            st.queued += len;
            st.accepted_total += len as u64;
            drop(st);
            self.corked.store(true, Ordering::Relaxed);
            self.write_first(header, msg);
            return Ok(None);
        }
        let mut sealed_full = false;
        if msg.len() <= COALESCE {
            if st.staging.capacity() - st.staging.len() < len {
                // Seal the full staging buffer and start another: never grow (and
                // copy) one that is being filled.
                if !st.staging.is_empty() {
                    let sealed = st.staging.split().freeze();
                    st.chunks.push_back(sealed);
                    sealed_full = true;
                }
                st.staging.reserve(STAGING);
            }
            st.staging.extend_from_slice(&header);
            st.staging.extend_from_slice(&msg);
        } else {
            st.staging.extend_from_slice(&header);
            let sealed = st.staging.split().freeze();
            st.chunks.push_back(sealed);
            st.chunks.push_back(msg);
        }
        st.queued += len;
        st.accepted_total += len as u64;
        if st.owner != Owner::Idle {
            // The owner writes it (the inline writer re-checks before it leaves). A
            // sender that just sealed a full staging buffer while the writer task owns
            // the socket helps, as a `BufWriter` would: if no one is writing right now,
            // it writes what is queued without blocking. A stream then goes out in
            // 64 KiB writes from a small, cache-warm working set even while the writer
            // task waits for its turn on the executor.
            let help = sealed_full && st.owner == Owner::Task;
            drop(st);
            if help {
                self.help_write();
            }
            return Ok(None);
        }
        // Idle but corked: the burst goes on; the writer task takes it from here.
        st.owner = Owner::Task;
        let writer = st.parked.take();
        drop(st);
        if let Some(w) = writer {
            w.wake();
        }
        Ok(None)
    }

    /// The inline fast path: the caller owns the socket and writes its one frame
    /// without blocking; what the socket does not take goes to the front of the pen's
    /// batch (before anything queued meanwhile) and ownership passes on.
    fn write_first(&self, header: [u8; HEADER_LEN], msg: Bytes) {
        let len = HEADER_LEN + msg.len();
        let mut pen = lock_pen(&self.pen);
        let mut written = 0usize;
        let mut failed = None;
        let start = (!self.busy_poll.is_zero()).then(Instant::now);
        while written < len {
            let Some(sock) = pen.sock.as_ref() else {
                failed = Some(Ok(()));
                break;
            };
            let iov = if written < HEADER_LEN {
                [IoSlice::new(&header[written..]), IoSlice::new(&msg)]
            } else {
                [
                    IoSlice::new(&msg[written - HEADER_LEN..]),
                    IoSlice::new(&[]),
                ]
            };
            match sock.write_now(&iov) {
                Ok(0) => {
                    failed = Some(Err(Error::new(
                        ErrorKind::ConnectionReset,
                        "send: the socket accepted no bytes",
                    )));
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Latency mode keeps trying for its window (see `busy_poll`).
                    match start.map(|t| t.elapsed()) {
                        Some(spent) if spent < self.busy_poll => {
                            crate::runtime::spin_or_yield(spent)
                        }
                        _ => break,
                    }
                }
                Err(e) => {
                    failed = Some(Err(self.broken.record("send", e)));
                    break;
                }
            }
        }
        if failed.is_none() && written < len {
            if written < HEADER_LEN {
                pen.batch
                    .push_back(Bytes::copy_from_slice(&header[written..]));
                pen.batch.push_back(msg);
            } else {
                pen.batch.push_back(msg.slice(written - HEADER_LEN..));
            }
        }
        drop(pen);
        if written > 0 {
            {
                let mut st = lock(&self.state);
                st.queued -= written;
                st.written_total += written as u64;
            }
            self.space.notify(usize::MAX);
            self.progress.notify(usize::MAX);
        }
        match failed {
            Some(r) => self.stop(r),
            None => self.release_inline(),
        }
    }

    /// An inline writer is done: `Idle` if nothing is left, else ownership passes to
    /// the writer task (or the linger thread if the task is gone).
    fn release_inline(&self) {
        let mut st = lock(&self.state);
        if !st.has_work() {
            st.owner = Owner::Idle;
            return;
        }
        // The writer task is gone, or nobody holds the transport any more (see
        // `abandon`): the linger thread writes the rest.
        if st.task_gone || st.abandoned.is_some() {
            st.owner = Owner::Linger;
            drop(st);
            self.adopt();
            return;
        }
        st.owner = Owner::Task;
        let writer = st.parked.take();
        drop(st);
        if let Some(w) = writer {
            w.wake();
        }
    }

    /// Write what is queued now if the socket's pen is free; the writer task stays the
    /// owner and writes whatever is left.
    fn help_write(&self) {
        let Ok(mut pen) = self.pen.try_lock() else {
            return;
        };
        match self.drain(&mut pen, &mut Io::Now) {
            Poll::Ready(Drained::Stop(r)) => {
                drop(pen);
                self.stop(r);
            }
            Poll::Ready(Drained::Finished) => {
                drop(pen);
                self.finish();
            }
            Poll::Ready(Drained::Empty) | Poll::Pending => {}
        }
    }

    /// Latency mode: the cork comes off when a `recv` starts, not only when it waits.
    pub(crate) fn uncorks_on_recv(&self) -> bool {
        !self.busy_poll.is_zero()
    }

    /// A `recv` on this connection has to wait: the burst of sends before it is over.
    pub(crate) fn uncork(&self) {
        if self.corked.load(Ordering::Relaxed) {
            self.corked.store(false, Ordering::Relaxed);
        }
    }

    /// Write queued bytes until the queue is empty, the socket is full, or the send
    /// side stops. Sends FIN once the queue is empty and shut down.
    fn drain(&self, pen: &mut Pen, io: &mut Io<'_, '_>) -> Poll<Drained> {
        loop {
            {
                let mut st = lock(&self.state);
                if st.abort {
                    return Poll::Ready(Drained::Stop(Ok(())));
                }
                if pen.batch.is_empty() {
                    pen.batch.extend(st.chunks.drain(..));
                    if !st.staging.is_empty() {
                        let tail = st.staging.split().freeze();
                        pen.batch.push_back(tail);
                        if st.staging.capacity() < STAGING / 4 {
                            st.staging.reserve(STAGING);
                        }
                    }
                }
                if pen.batch.is_empty() && !st.shutdown {
                    return Poll::Ready(Drained::Empty);
                }
            }
            let Some(sock) = pen.sock.as_mut() else {
                return Poll::Ready(Drained::Stop(Ok(())));
            };
            if pen.batch.is_empty() {
                // Shut down and everything written: send FIN. A peer that already
                // reset the connection makes this fail; nothing is lost by ignoring
                // that, every message was written.
                let _ = match io {
                    Io::Async(cx) => futures::ready!(Pin::new(sock).poll_close(cx)),
                    Io::Now => sock.shutdown_now(),
                };
                return Poll::Ready(Drained::Finished);
            }
            let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut k = 0;
            for b in pen.batch.iter().take(MAX_IOV) {
                iov[k] = IoSlice::new(b);
                k += 1;
            }
            let res = match io {
                Io::Async(cx) => futures::ready!(Pin::new(sock).poll_write_vectored(cx, &iov[..k])),
                Io::Now => match sock.write_now(&iov[..k]) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                    r => r,
                },
            };
            let n = match res {
                Ok(0) => {
                    return Poll::Ready(Drained::Stop(Err(Error::new(
                        ErrorKind::ConnectionReset,
                        "send: the socket accepted no bytes",
                    ))))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Drained::Stop(Err(self.broken.record("send", e)))),
            };
            let mut left = n;
            while left > 0 {
                let Some(front) = pen.batch.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    pen.batch.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
            {
                let mut st = lock(&self.state);
                st.queued -= n;
                st.written_total += n as u64;
            }
            self.space.notify(usize::MAX);
            self.progress.notify(usize::MAX);
        }
    }

    /// Check → listen → re-check on `event` until `check` gives a value.
    fn poll_until<T>(
        &self,
        cx: &mut Context<'_>,
        event: &Event,
        listener: &mut Option<EventListener>,
        mut check: impl FnMut(&SendState) -> Option<T>,
    ) -> Poll<T> {
        loop {
            if let Some(v) = check(&lock(&self.state)) {
                return Poll::Ready(v);
            }
            match listener {
                None => *listener = Some(event.listen()),
                Some(l) => {
                    futures::ready!(Pin::new(l).poll(cx));
                    *listener = None;
                }
            }
        }
    }

    /// Queue `msg`, waiting for room.
    pub(crate) fn send(&self, header: Result<[u8; HEADER_LEN]>, msg: Bytes) -> SendFuture<'_> {
        SendFuture {
            side: self,
            header,
            msg: Some(msg),
            listener: None,
        }
    }

    /// Wait for a write in progress (it records a failure the socket reports before
    /// it lets go of the socket).
    pub(crate) fn settle(&self) {
        drop(lock_pen(&self.pen));
    }

    /// The total accepted so far: `poll_flushed` on it waits for those bytes.
    pub(crate) fn accepted_total(&self) -> u64 {
        lock(&self.state).accepted_total
    }

    /// Ready once `target` bytes in total have been written (or writing ended). A
    /// connection that failed reports its error even when those bytes had reached the
    /// socket: the kernel dropped the connection, so they may never arrive.
    pub(crate) fn poll_flushed(
        &self,
        cx: &mut Context<'_>,
        target: u64,
        listener: &mut Option<EventListener>,
    ) -> Poll<Result<()>> {
        self.poll_until(cx, &self.progress, listener, |st| {
            if let Some(e) = &st.error {
                Some(Err(e.clone()))
            } else if st.written_total >= target {
                Some(Ok(()))
            } else {
                st.finished.then(|| Err(Error::closed("flush")))
            }
        })
    }

    /// Ready once writing has ended (after `shutdown`/`abort`).
    pub(crate) fn poll_finished(
        &self,
        cx: &mut Context<'_>,
        listener: &mut Option<EventListener>,
    ) -> Poll<Result<()>> {
        self.poll_until(cx, &self.progress, listener, |st| {
            st.finished.then(|| match &st.error {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            })
        })
    }

    /// Stop accepting messages; FIN follows what is queued.
    pub(crate) fn shutdown(&self) {
        self.update(|st| st.shutdown = true);
    }

    /// Stop accepting messages and drop what is still queued.
    pub(crate) fn abort(&self) {
        self.update(|st| {
            st.shutdown = true;
            st.abort = true;
        });
    }

    /// The last handle is gone: deliver what is queued within `linger`, then FIN. The
    /// caller writes what the socket takes now (see [`update`](SendSide::update)); the
    /// rest goes to the linger thread, not the writer task, whose runtime may sit idle
    /// (or never run again) once nobody holds the transport.
    pub(crate) fn abandon(&self) {
        self.update(|st| {
            st.shutdown = true;
            st.abandoned.get_or_insert_with(Instant::now);
        });
        let mut st = lock(&self.state);
        if !st.finished && st.has_work() && matches!(st.owner, Owner::Idle | Owner::Task) {
            st.owner = Owner::Linger;
            drop(st);
            self.adopt();
        }
    }

    /// The connection failed (the socket broke): stop writing, with `e` for every
    /// later `send`, `flush` and `close`.
    pub(crate) fn fail(&self, e: Error) {
        self.stop(Err(e));
    }

    /// The error writing ended with, if the socket failed (not after an orderly end,
    /// an abort or a linger timeout; a timeout the socket reported, such as
    /// `TCP_USER_TIMEOUT`, is a failure).
    pub(crate) fn failure(&self) -> Option<Error> {
        let st = lock(&self.state);
        st.error
            .clone()
            .filter(|e| e.kind() != ErrorKind::Closed && e.is_fatal())
    }

    /// Whether writing has ended (FIN sent, or stopped).
    pub(crate) fn is_finished(&self) -> bool {
        lock(&self.state).finished
    }

    pub(crate) fn is_closed(&self) -> bool {
        let st = lock(&self.state);
        st.shutdown || st.error.is_some()
    }

    /// Change the flags, then make sure the owner of the socket acts on them. The
    /// caller acts at once, as an inline `send` would: on an idle connection it takes
    /// the socket; while the writer task owns it, it helps (`help_write`: only if
    /// nobody is writing right now). What the socket takes without blocking is written
    /// and FIN follows, so a transport shut down or dropped on a thread whose runtime
    /// then sits idle still ends its stream (the peer sees the end at once, as with a
    /// dropped socket). What the socket does not take is left to the writer task (or
    /// the linger thread).
    fn update(&self, f: impl FnOnce(&mut SendState)) {
        let mut st = lock(&self.state);
        f(&mut st);
        let mut writer = None;
        let mut adopt = false;
        let mut inline = false;
        let mut help = false;
        if st.owner == Owner::Idle && st.has_work() && !st.finished {
            if st.task_gone {
                st.owner = Owner::Linger;
                adopt = true;
            } else {
                st.owner = Owner::Inline;
                inline = true;
            }
        } else if st.owner == Owner::Task {
            writer = st.parked.take();
            help = !st.finished;
        }
        drop(st);
        if let Some(w) = writer {
            w.wake();
        }
        if adopt {
            self.adopt();
        }
        self.space.notify(usize::MAX);
        self.progress.notify(usize::MAX);
        if inline {
            self.write_inline_all();
        } else if help {
            self.help_write();
        }
    }

    /// The caller owns the socket (`Inline`): write what is queued and FIN if shut
    /// down, without blocking; what is left passes on as after an inline `send`.
    fn write_inline_all(&self) {
        let mut pen = lock_pen(&self.pen);
        match self.drain(&mut pen, &mut Io::Now) {
            Poll::Ready(Drained::Finished) => {
                drop(pen);
                self.finish();
            }
            Poll::Ready(Drained::Stop(r)) => {
                drop(pen);
                self.stop(r);
            }
            Poll::Ready(Drained::Empty) | Poll::Pending => {
                drop(pen);
                self.release_inline();
            }
        }
    }

    /// Writing ended normally: FIN was sent after everything queued.
    fn finish(&self) {
        self.end(None);
    }

    /// Writing ended: `Ok` after an abort, `Err` when the socket failed.
    fn stop(&self, result: Result<()>) {
        self.end(result.err());
    }

    fn end(&self, error: Option<Error>) {
        let (sock, batch) = {
            let mut pen = lock_pen(&self.pen);
            (pen.sock.take(), std::mem::take(&mut pen.batch))
        };
        let mut st = lock(&self.state);
        st.finished = true;
        st.shutdown = true;
        if let Some(e) = error {
            st.error.get_or_insert(e);
        }
        st.chunks.clear();
        st.staging.clear();
        st.queued = 0;
        let writer = st.parked.take();
        drop(st);
        drop((sock, batch));
        if let Some(w) = writer {
            w.wake();
        }
        self.space.notify(usize::MAX);
        self.progress.notify(usize::MAX);
    }

    /// The writer task is gone (its future was dropped before it finished).
    fn task_dropped(&self) {
        let mut st = lock(&self.state);
        st.task_gone = true;
        if st.finished {
            return;
        }
        st.shutdown = true;
        st.refusal.get_or_insert_with(|| {
            Error::new(
                ErrorKind::Closed,
                "send: the runtime that ran this connection has shut down; what was sent \
                 before is still delivered (up to the linger time)",
            )
        });
        let adopt = matches!(st.owner, Owner::Idle | Owner::Task);
        if adopt {
            st.owner = Owner::Linger;
        }
        drop(st);
        if adopt {
            self.adopt();
        }
        self.space.notify(usize::MAX);
        self.progress.notify(usize::MAX);
    }

    fn adopt(&self) {
        if let Some(me) = self.me.upgrade() {
            linger::adopt(me);
        }
    }

    /// The linger time left for an abandoned connection, measured from `now`.
    fn linger_left(&self, st: &SendState, now: Instant) -> Option<Duration> {
        st.abandoned
            .map(|since| crate::time::deadline(since, self.linger).saturating_duration_since(now))
    }
}

impl Deliver for SendSide {
    fn deliver_now(&self) -> Delivery {
        {
            let st = lock(&self.state);
            if st.finished {
                return Delivery::Done;
            }
            // Whoever else holds the pen is writing; `try_lock` below leaves it to them.
            if st.owner == Owner::Idle && !st.has_work() {
                return Delivery::Done;
            }
        }
        let Ok(mut pen) = self.pen.try_lock() else {
            return Delivery::Blocked;
        };
        let before = lock(&self.state).written_total;
        match self.drain(&mut pen, &mut Io::Now) {
            Poll::Ready(Drained::Finished) => {
                drop(pen);
                self.finish();
                Delivery::Done
            }
            Poll::Ready(Drained::Stop(r)) => {
                drop(pen);
                self.stop(r);
                Delivery::Done
            }
            Poll::Ready(Drained::Empty) => Delivery::Done,
            Poll::Pending => {
                if lock(&self.state).written_total > before {
                    Delivery::Wrote
                } else {
                    Delivery::Blocked
                }
            }
        }
    }

    fn give_up(&self) {
        let left = lock(&self.state).queued;
        self.stop(Err(Error::new(
            ErrorKind::TimedOut,
            format!(
                "send: {left} accepted bytes could not be delivered within the linger time \
                 ({:?}): the peer did not read",
                self.linger
            ),
        )));
    }

    fn linger(&self) -> Duration {
        self.linger
    }
}

/// The future of `send`: queues the message on its first poll unless the queue is full,
/// then waits for room (check, listen, re-check). Dropped before it resolves, it has
/// queued nothing.
pub(crate) struct SendFuture<'a> {
    side: &'a SendSide,
    header: Result<[u8; HEADER_LEN]>,
    msg: Option<Bytes>,
    listener: Option<EventListener>,
}

impl Future for SendFuture<'_> {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = &mut *self;
        let header = match &this.header {
            Ok(h) => *h,
            Err(e) => return Poll::Ready(Err(e.clone())),
        };
        loop {
            let Some(msg) = this.msg.take() else {
                return Poll::Ready(Ok(()));
            };
            match this.side.try_enqueue(header, msg) {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(None) => return Poll::Ready(Ok(())),
                Ok(Some(back)) => this.msg = Some(back),
            }
            match &mut this.listener {
                None => this.listener = Some(this.side.space.listen()),
                Some(l) => {
                    futures::ready!(Pin::new(l).poll(cx));
                    this.listener = None;
                }
            }
        }
    }
}

/// Tells the send side when the writer task's future is dropped before it finished.
struct TaskGuard(Option<Arc<SendSide>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(side) = self.0.take() {
            side.task_dropped();
        }
    }
}

/// The writer task: writes what `send` queued while it owns the socket, until the
/// connection is shut down (FIN) or fails.
///
/// The returned future owns a guard from the start: if the runtime drops it, polled
/// or not, the connection goes to the linger thread.
pub(crate) fn writer(side: Arc<SendSide>, rt: Arc<dyn Runtime>) -> impl Future<Output = ()> {
    let guard = TaskGuard(Some(side.clone()));
    run_writer(side, rt, guard)
}

async fn run_writer(side: Arc<SendSide>, rt: Arc<dyn Runtime>, mut guard: TaskGuard) {
    let mut deadline: Option<crate::transport::BoxFuture<'static, ()>> = None;
    // `Err(())`: the runtime is shutting down; the guard hands the rest to the linger
    // thread.
    let res: std::result::Result<(), ()> = futures::future::poll_fn(|cx| loop {
        let mut st = lock(&side.state);
        if st.finished {
            return Poll::Ready(Ok(()));
        }
        if deadline.is_none() {
            if let Some(left) = side.linger_left(&st, Instant::now()) {
                deadline = Some(rt.sleep(left));
            }
        }
        if let Some(d) = deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                drop(st);
                // A runtime that is shutting down completes its timers at once: that
                // is not the linger time running out. Leave the rest to the linger
                // thread (with its own deadline) instead of dropping it.
                if rt.is_shut_down() {
                    return Poll::Ready(Err(()));
                }
                side.give_up();
                return Poll::Ready(Ok(()));
            }
        }
        match st.owner {
            Owner::Task => {}
            Owner::Idle if st.has_work() => st.owner = Owner::Task,
            Owner::Idle | Owner::Inline => {
                st.parked = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Owner::Linger => return Poll::Ready(Ok(())),
        }
        drop(st);
        let mut pen = lock_pen(&side.pen);
        match side.drain(&mut pen, &mut Io::Async(cx)) {
            Poll::Pending => {
                // The socket is full. Park here too, so that an abort (`close` out of
                // time, a fatal receive error) wakes this task to let go of the
                // socket instead of leaving it to a peer that may never read again.
                drop(pen);
                let mut st = lock(&side.state);
                if st.abort || st.finished {
                    continue;
                }
                st.parked = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(Drained::Finished) => {
                drop(pen);
                side.finish();
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Drained::Stop(r)) => {
                drop(pen);
                side.stop(r);
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Drained::Empty) => {
                drop(pen);
                let mut st = lock(&side.state);
                if !st.has_work() {
                    st.owner = Owner::Idle;
                    st.parked = Some(cx.waker().clone());
                    side.corked.store(false, Ordering::Relaxed);
                    return Poll::Pending;
                }
                // More arrived (or a shutdown) since the drain: go round again.
            }
        }
    })
    .await;
    if res.is_err() {
        // Dropping the armed guard adopts the connection into the linger thread.
        drop(guard);
        return;
    }
    guard.0 = None;
    let mut st = lock(&side.state);
    st.task_gone = true;
}

/// A model check of the hand-off of the socket between senders (inline writes, the
/// cork, helping writes) and the writer task, on the real code with loom's primitives:
/// `RUSTFLAGS="--cfg net_rs_loom" cargo test --release --no-default-features --lib loom`.
/// Every interleaving (up to the preemption bound) must leave no accepted byte without
/// an owner: once the senders are done, `flush` completes with no further event, every
/// frame is on the wire once, intact and in each sender's order, and FIN follows.
#[cfg(all(test, net_rs_loom))]
mod loom_model {
    use super::*;
    use crate::codec::encode_header;
    use crate::runtime::{AsyncListener, SocketOptions, SocketWrite, TcpSocket};
    use crate::transport::BoxFuture;
    use loom::sync::atomic::AtomicUsize;
    use std::net::SocketAddr;

    /// A socket that takes at most 3 bytes per write and refuses every other one:
    /// non-blocking writes get `WouldBlock`; writes through the runtime get `Pending`
    /// with the waker woken at once (the socket became writable again).
    struct FakeSocket {
        out: Arc<loom::sync::Mutex<Vec<u8>>>,
        fin: Arc<loom::sync::atomic::AtomicBool>,
        calls: AtomicUsize,
    }

    impl FakeSocket {
        fn take(&self, bufs: &[IoSlice<'_>]) -> Option<usize> {
            if self.calls.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
                return None;
            }
            let mut out = self.out.lock().unwrap();
            let mut n = 0;
            for b in bufs {
                for &byte in b.iter() {
                    if n == 3 {
                        return Some(n);
                    }
                    out.push(byte);
                    n += 1;
                }
            }
            Some(n)
        }
    }

    impl AsyncWrite for FakeSocket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            match self.take(bufs) {
                Some(n) => Poll::Ready(Ok(n)),
                None => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.fin.store(true, Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }
    }

    impl SocketWrite for FakeSocket {
        fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.take(bufs)
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))
        }
        fn shutdown_now(&self) -> io::Result<()> {
            self.fin.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    /// The writer task never needs the runtime here (nothing is abandoned).
    #[derive(Debug)]
    struct NoRuntime;

    impl Runtime for NoRuntime {
        fn spawn(&self, _: BoxFuture<'static, ()>) {}
        fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
            Box::pin(futures::future::pending())
        }
        fn tcp_connect(
            &self,
            _: SocketAddr,
            _: SocketOptions,
        ) -> BoxFuture<'static, io::Result<TcpSocket>> {
            Box::pin(async { Err(io::ErrorKind::Unsupported.into()) })
        }
        fn tcp_bind(&self, _: SocketAddr, _: SocketOptions) -> io::Result<Box<dyn AsyncListener>> {
            Err(io::ErrorKind::Unsupported.into())
        }
    }

    /// A send side over a [`FakeSocket`] whose writer task runs on a thread of its own:
    /// the side, the bytes written, whether FIN was sent, the writer's thread.
    #[allow(clippy::type_complexity)]
    fn side_with_writer() -> (
        Arc<SendSide>,
        Arc<loom::sync::Mutex<Vec<u8>>>,
        Arc<loom::sync::atomic::AtomicBool>,
        loom::thread::JoinHandle<()>,
    ) {
        let out = Arc::new(loom::sync::Mutex::new(Vec::new()));
        let fin = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let sock = FakeSocket {
            out: out.clone(),
            fin: fin.clone(),
            calls: AtomicUsize::new(0),
        };
        let side = SendSide::new(
            1 << 20,
            Duration::from_secs(1),
            Duration::ZERO,
            Box::new(sock),
            Arc::default(),
        );
        let w = {
            let side = side.clone();
            loom::thread::spawn(move || loom::future::block_on(writer(side, Arc::new(NoRuntime))))
        };
        (side, out, fin, w)
    }

    fn send(side: &SendSide, msg: &'static [u8]) {
        let header = encode_header(msg.len(), 1 << 20);
        loom::future::block_on(side.send(header, Bytes::from_static(msg))).unwrap();
    }

    fn frames(mut wire: &[u8]) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while wire.len() >= HEADER_LEN {
            let n = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
            assert!(wire.len() >= 4 + n, "a frame was cut: {wire:?}");
            v.push(wire[4..4 + n].to_vec());
            wire = &wire[4 + n..];
        }
        assert!(wire.is_empty(), "stray bytes: {wire:?}");
        v
    }

    #[test]
    fn loom_no_accepted_byte_is_left_without_an_owner() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(2);
        model.check(|| {
            let (side, out, fin, w) = side_with_writer();
            let a = {
                let side = side.clone();
                loom::thread::spawn(move || {
                    send(&side, b"a1");
                    send(&side, b"a2");
                })
            };
            let b = {
                let side = side.clone();
                loom::thread::spawn(move || {
                    send(&side, b"b1");
                    side.uncork();
                })
            };
            a.join().unwrap();
            b.join().unwrap();
            // No further event: what was accepted must already have an owner that
            // writes it (a stranded byte leaves this waiting forever: loom reports a
            // deadlock).
            let target = side.accepted_total();
            let mut listener = None;
            loom::future::block_on(futures::future::poll_fn(|cx| {
                side.poll_flushed(cx, target, &mut listener)
            }))
            .unwrap();
            side.shutdown();
            w.join().unwrap();
            assert!(fin.load(Ordering::SeqCst), "FIN after the last frame");
            let got = frames(&out.lock().unwrap());
            assert_eq!(got.len(), 3, "every frame once: {got:?}");
            let pos = |m: &[u8]| got.iter().position(|f| f == m).expect("frame missing");
            assert!(
                pos(b"a1") < pos(b"a2"),
                "a sender's frames in order: {got:?}"
            );
            pos(b"b1");
        });
    }

    /// A shutdown (as `shutdown()` or the last handle's drop makes) racing a sender:
    /// the shutting-down thread acts on the socket itself when it can (inline, or
    /// helping the writer task). Every frame `send` accepted is written once, FIN
    /// follows them, and nothing waits forever.
    #[test]
    fn loom_a_shutdown_racing_sends_ends_after_every_accepted_frame() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(2);
        model.check(|| {
            let (side, out, fin, w) = side_with_writer();
            let a = {
                let side = side.clone();
                loom::thread::spawn(move || {
                    let mut accepted = Vec::new();
                    for m in [&b"a1"[..], &b"a2"[..]] {
                        let header = encode_header(m.len(), 1 << 20);
                        if loom::future::block_on(side.send(header, Bytes::from_static(m))).is_ok()
                        {
                            accepted.push(m.to_vec());
                        }
                    }
                    accepted
                })
            };
            side.shutdown();
            let accepted = a.join().unwrap();
            let mut listener = None;
            loom::future::block_on(futures::future::poll_fn(|cx| {
                side.poll_finished(cx, &mut listener)
            }))
            .unwrap();
            w.join().unwrap();
            assert!(fin.load(Ordering::SeqCst), "FIN after the last frame");
            let got = frames(&out.lock().unwrap());
            assert_eq!(got, accepted, "every accepted frame once, in order");
        });
    }
}
