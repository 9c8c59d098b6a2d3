//! The receive half: decodes frames out of socket reads, shared by any number of
//! concurrent `recv` callers.
//!
//! All state (buffered bytes, the half-read frame) lives here, not in the `recv`
//! futures, which is what makes `recv` cancel-safe: a dropped future owns nothing.
//! Small frames are split off a shared read buffer without copying; a frame larger than
//! [`DIRECT`] is read straight into a recycled buffer of exactly its size.
//!
//! A socket remembers only the last waker that polled it. So every pending caller also
//! waits in `waiters`; whoever completes (or is dropped while pending) wakes one of them,
//! which then polls the socket itself. No caller is left registered nowhere.

use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::io::AsyncRead;
use slab::Slab;

use crate::buffer::{HeapPool, PooledVec};
use crate::codec::Decoder;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::TcpReader;

/// Frames with more payload than this are read directly into their own buffer.
pub(crate) const DIRECT: usize = 64 * 1024;
/// Capacity added to the read buffer when it runs low.
const READ_CHUNK: usize = 64 * 1024;
/// Smallest read attempted.
const MIN_READ: usize = 4 * 1024;

pub(crate) struct RecvSide {
    state: Mutex<RecvState>,
    pool: HeapPool,
}

struct RecvState {
    reader: Option<TcpReader>,
    buf: BytesMut,
    decoder: Decoder,
    /// The frame being read directly into its own buffer, and how much of it is filled.
    large: Option<(PooledVec, usize)>,
    /// Size of the next read attempt: grows while reads fill it, shrinks when they don't.
    read_size: usize,
    eof: bool,
    /// Sticky failure: every later `recv` returns it.
    error: Option<Error>,
    waiters: Slab<std::task::Waker>,
}

/// What a finished `poll_recv` means for the connection.
pub(crate) enum Fatal {
    /// Nothing: keep going.
    No,
    /// A protocol violation: the whole connection must be closed.
    CloseConnection,
}

fn lock(m: &Mutex<RecvState>) -> MutexGuard<'_, RecvState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RecvSide {
    pub(crate) fn new(reader: TcpReader, max: usize, pool: HeapPool) -> Self {
        RecvSide {
            state: Mutex::new(RecvState {
                reader: Some(reader),
                buf: BytesMut::new(),
                decoder: Decoder::new(max),
                large: None,
                read_size: MIN_READ,
                eof: false,
                error: None,
                waiters: Slab::new(),
            }),
            pool,
        }
    }

    /// Poll for the next message. `slot` is the caller's place in the waiter list; it
    /// must be passed to [`cancel`](RecvSide::cancel) if the caller gives up while pending.
    pub(crate) fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        slot: &mut Option<usize>,
    ) -> (Poll<Result<Bytes>>, Fatal) {
        let mut st = lock(&self.state);
        let res = st.poll_frame(cx, &self.pool);
        match res {
            Poll::Pending => {
                match *slot {
                    Some(k) if st.waiters.contains(k) => {
                        if !st.waiters[k].will_wake(cx.waker()) {
                            st.waiters[k] = cx.waker().clone();
                        }
                    }
                    _ => *slot = Some(st.waiters.insert(cx.waker().clone())),
                }
                (Poll::Pending, Fatal::No)
            }
            Poll::Ready(res) => {
                if let Some(k) = slot.take() {
                    st.waiters.try_remove(k);
                }
                let fatal = match &res {
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::MessageTooLarge { .. } | ErrorKind::InvalidData
                        ) =>
                    {
                        Fatal::CloseConnection
                    }
                    _ => Fatal::No,
                };
                let wake: Vec<_> = if res.is_ok() {
                    st.waiters
                        .iter()
                        .next()
                        .map(|(_, w)| w.clone())
                        .into_iter()
                        .collect()
                } else {
                    st.waiters.iter().map(|(_, w)| w.clone()).collect()
                };
                drop(st);
                wake.into_iter().for_each(|w| w.wake());
                (Poll::Ready(res), fatal)
            }
        }
    }

    /// A pending caller gave up: hand its turn to another waiter.
    pub(crate) fn cancel(&self, slot: &mut Option<usize>) {
        let Some(k) = slot.take() else { return };
        let mut st = lock(&self.state);
        st.waiters.try_remove(k);
        let next = st.waiters.iter().next().map(|(_, w)| w.clone());
        drop(st);
        if let Some(w) = next {
            w.wake();
        }
    }

    /// Stop receiving: drop the socket's read half and fail every caller with `err`.
    pub(crate) fn close(&self, err: Error) {
        let mut st = lock(&self.state);
        st.reader = None;
        st.error.get_or_insert(err);
        let wake: Vec<_> = st.waiters.iter().map(|(_, w)| w.clone()).collect();
        drop(st);
        wake.into_iter().for_each(|w| w.wake());
    }

    /// Whether receiving has ended: failed, closed, or (looking at the socket when
    /// nothing is buffered) the peer has closed or reset the connection.
    pub(crate) fn peer_ended(&self) -> bool {
        let st = lock(&self.state);
        if st.error.is_some() || st.eof {
            return true;
        }
        let Some(reader) = st.reader.as_ref() else {
            return true;
        };
        if st.has_buffered() {
            return false;
        }
        match reader.peek_now() {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }

    /// Whether bytes have arrived that no `recv` has returned yet.
    pub(crate) fn has_unread(&self) -> bool {
        let st = lock(&self.state);
        if st.has_buffered() {
            return true;
        }
        match st.reader.as_ref() {
            Some(reader) => matches!(reader.peek_now(), Ok(n) if n > 0),
            None => false,
        }
    }
}

impl RecvState {
    /// Bytes of a message (or a length prefix) read from the socket and not returned.
    fn has_buffered(&self) -> bool {
        !self.buf.is_empty() || self.large.is_some() || self.decoder.pending_len().is_some()
    }

    fn fail(&mut self, e: Error) -> Poll<Result<Bytes>> {
        self.error = Some(e.clone());
        self.reader = None;
        self.large = None;
        Poll::Ready(Err(e))
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>, pool: &HeapPool) -> Poll<Result<Bytes>> {
        loop {
            if let Some(e) = &self.error {
                return Poll::Ready(Err(e.clone()));
            }
            if let Some((vec, filled)) = &mut self.large {
                let len = vec.as_ref().len();
                if *filled == len {
                    let (vec, _) = self.large.take().expect("checked above");
                    self.decoder.finish_frame();
                    return Poll::Ready(Ok(Bytes::from_owner(vec)));
                }
                if self.eof {
                    let msg = format!(
                        "peer closed the connection after {filled} of {len} bytes of a message"
                    );
                    return self.fail(Error::new(ErrorKind::UnexpectedEof, msg));
                }
                let Some(reader) = self.reader.as_mut() else {
                    return self.fail(Error::closed("recv"));
                };
                match Pin::new(reader).poll_read(cx, &mut vec.as_mut()[*filled..]) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => self.eof = true,
                    Poll::Ready(Ok(n)) => *filled += n,
                    Poll::Ready(Err(e)) => return self.fail(e.into()),
                }
                continue;
            }
            match self.decoder.decode_head(&mut self.buf) {
                Err(e) => return self.fail(e),
                Ok(Some(n)) if self.buf.len() >= n => {
                    return Poll::Ready(
                        self.decoder
                            .decode(&mut self.buf)
                            .map(|f| f.expect("a whole frame is buffered")),
                    );
                }
                Ok(Some(n)) if n > DIRECT => {
                    let mut vec = pool.take_uninit(n);
                    let have = self.buf.len();
                    vec.as_mut()[..have].copy_from_slice(&self.buf);
                    self.buf.clear();
                    self.large = Some((vec, have));
                    continue;
                }
                Ok(_) => {}
            }
            if self.eof {
                let e = if self.decoder.at_boundary(&self.buf) {
                    Error::new(ErrorKind::Closed, "recv: the peer closed the connection")
                } else {
                    let msg = match self.decoder.pending_len() {
                        Some(n) => format!(
                            "peer closed the connection after {} of {n} bytes of a message",
                            self.buf.len()
                        ),
                        None => format!(
                            "peer closed the connection after {} of 4 bytes of a length prefix",
                            self.buf.len()
                        ),
                    };
                    Error::new(ErrorKind::UnexpectedEof, msg)
                };
                return self.fail(e);
            }
            let Some(reader) = self.reader.as_mut() else {
                return self.fail(Error::closed("recv"));
            };
            if self.buf.capacity() - self.buf.len() < MIN_READ {
                self.buf.reserve(READ_CHUNK);
            }
            let start = self.buf.len();
            let want = (self.buf.capacity() - start).min(self.read_size);
            self.buf.resize(start + want, 0);
            let res = Pin::new(reader).poll_read(cx, &mut self.buf[start..]);
            let got = match &res {
                Poll::Ready(Ok(n)) => *n,
                _ => 0,
            };
            self.buf.truncate(start + got);
            match res {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    self.read_size = if n == want {
                        (want * 2).min(READ_CHUNK)
                    } else {
                        (n * 2).clamp(MIN_READ, READ_CHUNK)
                    };
                }
                Poll::Ready(Err(e)) => return self.fail(e.into()),
            }
        }
    }
}
