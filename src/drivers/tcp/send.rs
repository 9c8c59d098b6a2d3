//! The send half: a bounded queue of encoded frames and the writer task that drains it.
//!
//! `send` encodes a frame into the queue and returns; one writer task per connection
//! (spawned on the runtime) hands everything queued to the socket with vectored writes.
//! While the writer is busy, further frames pile up and leave in the next write, so a
//! stream of small messages costs a few syscalls per batch instead of one per message.
//! Frames up to [`COALESCE`] bytes are copied into one contiguous staging buffer (a
//! memcpy is cheaper than an iovec); larger payloads are queued as they are (no copy).

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
    /// Notified when queue space frees up or the send side fails or closes.
    space: Event,
    /// Notified when bytes reach the socket or the writer exits.
    progress: Event,
    limit: usize,
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

impl SendSide {
    pub(crate) fn new(limit: usize) -> Self {
        SendSide {
            state: Mutex::new(SendState {
                staging: BytesMut::with_capacity(STAGING),
                ..SendState::default()
            }),
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
        let writer = st.writer.take();
        drop(st);
        if let Some(w) = writer {
            w.wake();
        }
        Ok(None)
    }

    /// Ready when a message of any size could be queued now (the `Sink::poll_ready` test).
    pub(crate) fn poll_space(
        &self,
        cx: &mut Context<'_>,
        listener: &mut Option<EventListener>,
    ) -> Poll<Result<()>> {
        loop {
            {
                let st = lock(&self.state);
                if let Some(e) = &st.error {
                    return Poll::Ready(Err(e.clone()));
                }
                if st.shutdown {
                    return Poll::Ready(Err(Error::closed("send")));
                }
                if st.queued < self.limit {
                    return Poll::Ready(Ok(()));
                }
            }
            match listener {
                None => *listener = Some(self.space.listen()),
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
        loop {
            {
                let st = lock(&self.state);
                if let Some(e) = &st.error {
                    return Poll::Ready(Err(e.clone()));
                }
                if st.written_total >= target {
                    return Poll::Ready(Ok(()));
                }
                if st.writer_done {
                    return Poll::Ready(Err(Error::closed("flush")));
                }
            }
            match listener {
                None => *listener = Some(self.progress.listen()),
                Some(l) => {
                    futures::ready!(Pin::new(l).poll(cx));
                    *listener = None;
                }
            }
        }
    }

    /// Ready once the writer has exited (after `shutdown`/`abort`).
    pub(crate) fn poll_writer_done(
        &self,
        cx: &mut Context<'_>,
        listener: &mut Option<EventListener>,
    ) -> Poll<Result<()>> {
        loop {
            {
                let st = lock(&self.state);
                if st.writer_done {
                    return Poll::Ready(match &st.error {
                        Some(e) => Err(e.clone()),
                        None => Ok(()),
                    });
                }
            }
            match listener {
                None => *listener = Some(self.progress.listen()),
                Some(l) => {
                    futures::ready!(Pin::new(l).poll(cx));
                    *listener = None;
                }
            }
        }
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

enum Next {
    Write,
    Finish,
    Stop,
}

/// The writer task: drains the queue into `sock` until shut down or failed.
pub(crate) async fn writer(
    side: Arc<SendSide>,
    mut sock: TcpWriter,
    rt: Arc<dyn Runtime>,
    linger: Duration,
) {
    let mut batch: VecDeque<Bytes> = VecDeque::new();
    let mut deadline: Option<crate::transport::BoxFuture<'static, ()>> = None;
    let result: Result<()> = loop {
        let next = futures::future::poll_fn(|cx| {
            let mut st = lock(&side.state);
            if st.abort {
                return Poll::Ready(Next::Stop);
            }
            if batch.is_empty() {
                batch.extend(st.chunks.drain(..));
                if !st.staging.is_empty() {
                    let tail = st.staging.split().freeze();
                    batch.push_back(tail);
                    if st.staging.capacity() < STAGING / 4 {
                        st.staging.reserve(STAGING);
                    }
                }
            }
            if !batch.is_empty() {
                return Poll::Ready(Next::Write);
            }
            if st.shutdown {
                return Poll::Ready(Next::Finish);
            }
            st.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        match next {
            Next::Stop => break Ok(()),
            Next::Finish => {
                let closed = futures::future::poll_fn(|cx| Pin::new(&mut sock).poll_close(cx));
                // A peer that already reset the connection makes this fail; nothing is
                // lost by ignoring that here, every message was written.
                let _ = closed.await;
                break Ok(());
            }
            Next::Write => {}
        }
        if deadline.is_none() && lock(&side.state).abandoned {
            deadline = Some(rt.sleep(linger));
        }
        let written = futures::future::poll_fn(|cx| {
            if let Some(d) = deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
            if lock(&side.state).abort {
                return Poll::Ready(None);
            }
            let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for b in batch.iter().take(MAX_IOV) {
                iov[n] = IoSlice::new(b);
                n += 1;
            }
            Pin::new(&mut sock)
                .poll_write_vectored(cx, &iov[..n])
                .map(Some)
        })
        .await;
        let n = match written {
            None => break Ok(()),
            Some(Ok(0)) => {
                break Err(Error::new(
                    crate::ErrorKind::ConnectionReset,
                    "send: the socket accepted no bytes",
                ))
            }
            Some(Ok(n)) => n,
            Some(Err(e)) => break Err(e.into()),
        };
        let mut left = n;
        while left > 0 {
            let front = batch.front_mut().expect("wrote more than was queued");
            if front.len() <= left {
                left -= front.len();
                batch.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
        {
            let mut st = lock(&side.state);
            st.queued -= n;
            st.written_total += n as u64;
        }
        side.space.notify(usize::MAX);
        side.progress.notify(usize::MAX);
    };
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
