//! The send half: a bounded queue of encoded frames and the writer task that drains it.
//!
//! `send` encodes a frame into the queue and returns; one writer task per connection
//! (spawned on the runtime) hands everything queued to the socket with vectored writes.
//! While the writer is busy, further frames pile up and leave in the next write, so a
//! stream of small messages costs a few syscalls per batch instead of one per message.
//! Frames up to [`COALESCE`] bytes are copied into one contiguous staging buffer (a
//! memcpy is cheaper than an iovec); larger payloads are queued as they are (no copy).
//!
//! The socket and the batch being written live in the `pen`, a mutex that whoever
//! writes holds: normally the writer task. In latency mode (`TcpConfig::busy_poll`),
//! `send` takes the pen itself when it is free and writes at once, waking the writer
//! task only if the socket could not take everything. Both paths write through
//! [`SendSide::poll_drain`], so frames leave in order whoever writes them.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use event_listener::{Event, EventListener};
use futures::io::AsyncWrite;

use crate::codec::HEADER_LEN;
use crate::error::{Error, Result};
use crate::runtime::{Runtime, TcpWriter};

/// Payloads up to this size are copied into the staging buffer.
pub(crate) const COALESCE: usize = 8 * 1024;
/// Most iovecs handed to one `writev`.
const MAX_IOV: usize = 64;
/// Initial size of the staging buffer.
const STAGING: usize = 64 * 1024;

pub(crate) struct SendSide {
    state: Mutex<SendState>,
    pen: Mutex<Pen>,
    /// Latency mode: write from `send` when the pen is free.
    inline: bool,
    /// Notified when queue space frees up or the send side fails or closes.
    space: Event,
    /// Notified when bytes reach the socket or the writer exits.
    progress: Event,
    limit: usize,
}

/// What the writer holds: the socket and the bytes taken from the queue and not yet
/// fully written.
pub(crate) struct Pen {
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

#[derive(Default)]
struct SendState {
    chunks: VecDeque<Bytes>,
    staging: BytesMut,
    /// Bytes accepted but not yet written.
    queued: usize,
    accepted_total: u64,
    written_total: u64,
    writer: Option<Waker>,
    /// No more messages are accepted; the writer sends FIN once the queue is empty.
    shutdown: bool,
    /// Give up delivering what is queued (after `linger`, or on a fatal receive error).
    abort: bool,
    /// Every transport handle is gone: deliver what is queued within `linger`, then stop.
    abandoned: bool,
    writer_done: bool,
    error: Option<Error>,
}

fn lock(m: &Mutex<SendState>) -> MutexGuard<'_, SendState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_pen(m: &Mutex<Pen>) -> MutexGuard<'_, Pen> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SendSide {
    pub(crate) fn new(limit: usize, sock: TcpWriter, inline: bool) -> Self {
        SendSide {
            state: Mutex::new(SendState {
                staging: BytesMut::with_capacity(STAGING),
                ..SendState::default()
            }),
            pen: Mutex::new(Pen {
                sock: Some(sock),
                batch: VecDeque::new(),
            }),
            inline,
            space: Event::new(),
            progress: Event::new(),
            limit,
        }
    }

    /// Queue one encoded frame unless the queue is full (`force` ignores the limit).
    /// Returns the payload back when there is no room.
    pub(crate) fn try_enqueue(
        &self,
        header: [u8; HEADER_LEN],
        msg: Bytes,
        force: bool,
    ) -> Result<Option<Bytes>> {
        let mut st = lock(&self.state);
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        if st.shutdown {
            return Err(Error::closed("send"));
        }
        let len = HEADER_LEN + msg.len();
        if !force && st.queued > 0 && st.queued + len > self.limit {
            return Ok(Some(msg));
        }
        st.staging.extend_from_slice(&header);
        if msg.len() <= COALESCE {
            st.staging.extend_from_slice(&msg);
        } else {
            let sealed = st.staging.split().freeze();
            st.chunks.push_back(sealed);
            st.chunks.push_back(msg);
        }
        st.queued += len;
        st.accepted_total += len as u64;
        if self.inline && st.writer.is_some() {
            // The writer task is parked: nothing is being written. Write now.
            drop(st);
            self.write_inline();
            return Ok(None);
        }
        let writer = st.writer.take();
        drop(st);
        if let Some(w) = writer {
            w.wake();
        }
        Ok(None)
    }

    /// Latency mode: write what is queued from the caller's thread if the pen is
    /// free; hand whatever the socket does not take to the writer task.
    fn write_inline(&self) {
        let done = match self.pen.try_lock() {
            Ok(mut pen) => {
                let mut cx = Context::from_waker(Waker::noop());
                matches!(
                    self.poll_drain(&mut pen, &mut cx, false),
                    Poll::Ready(Drained::Empty)
                )
            }
            Err(_) => false,
        };
        if !done {
            let writer = lock(&self.state).writer.take();
            if let Some(w) = writer {
                w.wake();
            }
        }
    }

    /// Write queued bytes until the queue is empty, the socket would block, or the
    /// send side stops. `finish` sends FIN once empty and shut down (the writer task
    /// does; inline writers leave that to it).
    fn poll_drain(&self, pen: &mut Pen, cx: &mut Context<'_>, finish: bool) -> Poll<Drained> {
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
                if pen.batch.is_empty() && !(finish && st.shutdown) {
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
                let _ = futures::ready!(Pin::new(sock).poll_close(cx));
                return Poll::Ready(Drained::Finished);
            }
            let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut k = 0;
            for b in pen.batch.iter().take(MAX_IOV) {
                iov[k] = IoSlice::new(b);
                k += 1;
            }
            let n = match futures::ready!(Pin::new(sock).poll_write_vectored(cx, &iov[..k])) {
                Ok(0) => {
                    return Poll::Ready(Drained::Stop(Err(Error::new(
                        crate::ErrorKind::ConnectionReset,
                        "send: the socket accepted no bytes",
                    ))))
                }
                Ok(n) => n,
                Err(e) => return Poll::Ready(Drained::Stop(Err(e.into()))),
            };
            let mut left = n;
            while left > 0 {
                let front = pen.batch.front_mut().expect("wrote more than was queued");
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

    /// Ready when a message of any size could be queued now (the `Sink::poll_ready` test).
    pub(crate) fn poll_space(
        &self,
        cx: &mut Context<'_>,
        listener: &mut Option<EventListener>,
    ) -> Poll<Result<()>> {
        self.poll_until(cx, &self.space, listener, |st| {
            if let Some(e) = &st.error {
                Some(Err(e.clone()))
            } else if st.shutdown {
                Some(Err(Error::closed("send")))
            } else {
                (st.queued < self.limit).then_some(Ok(()))
            }
        })
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
    pub(crate) async fn send(&self, header: [u8; HEADER_LEN], msg: Bytes) -> Result<()> {
        let mut msg = msg;
        let mut listener: Option<EventListener> = None;
        loop {
            match self.try_enqueue(header, msg, false)? {
                None => return Ok(()),
                Some(back) => msg = back,
            }
            match listener.take() {
                None => listener = Some(self.space.listen()),
                Some(l) => l.await,
            }
        }
    }

    /// The total accepted so far: `poll_flushed` on it waits for those bytes.
    pub(crate) fn accepted_total(&self) -> u64 {
        lock(&self.state).accepted_total
    }

    /// Ready once `target` bytes in total have been written (or the writer stopped).
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
                st.writer_done.then(|| Err(Error::closed("flush")))
            }
        })
    }

    /// Ready once the writer has exited (after `shutdown`/`abort`).
    pub(crate) fn poll_writer_done(
        &self,
        cx: &mut Context<'_>,
        listener: &mut Option<EventListener>,
    ) -> Poll<Result<()>> {
        self.poll_until(cx, &self.progress, listener, |st| {
            st.writer_done.then(|| match &st.error {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            })
        })
    }

    /// Stop accepting messages; the writer sends FIN after what is queued.
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

    /// The last handle is gone.
    pub(crate) fn abandon(&self) {
        self.update(|st| {
            st.shutdown = true;
            st.abandoned = true;
        });
    }

    pub(crate) fn is_closed(&self) -> bool {
        let st = lock(&self.state);
        st.shutdown || st.error.is_some()
    }

    fn update(&self, f: impl FnOnce(&mut SendState)) {
        let mut st = lock(&self.state);
        f(&mut st);
        let writer = st.writer.take();
        drop(st);
        if let Some(w) = writer {
            w.wake();
        }
        self.space.notify(usize::MAX);
        self.progress.notify(usize::MAX);
    }
}

/// The writer task: drains the queue into the socket until shut down or failed.
pub(crate) async fn writer(side: Arc<SendSide>, rt: Arc<dyn Runtime>, linger: Duration) {
    let mut deadline: Option<crate::transport::BoxFuture<'static, ()>> = None;
    let result: Result<()> = futures::future::poll_fn(|cx| loop {
        if deadline.is_none() && lock(&side.state).abandoned {
            deadline = Some(rt.sleep(linger));
        }
        if let Some(d) = deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
        }
        let mut pen = lock_pen(&side.pen);
        match side.poll_drain(&mut pen, cx, true) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Drained::Finished) => return Poll::Ready(Ok(())),
            Poll::Ready(Drained::Stop(r)) => return Poll::Ready(r),
            Poll::Ready(Drained::Empty) => {
                drop(pen);
                let mut st = lock(&side.state);
                if st.chunks.is_empty() && st.staging.is_empty() && !st.shutdown && !st.abort {
                    st.writer = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                // More arrived (or a shutdown) since the drain: go round again.
            }
        }
    })
    .await;
    let sock = lock_pen(&side.pen).sock.take();
    let mut st = lock(&side.state);
    st.writer_done = true;
    st.shutdown = true;
    if let Err(e) = result {
        st.error.get_or_insert(e);
    }
    st.chunks.clear();
    st.staging.clear();
    drop(st);
    drop(sock);
    side.space.notify(usize::MAX);
    side.progress.notify(usize::MAX);
}
