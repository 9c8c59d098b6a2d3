//! The receive half: decodes frames out of socket reads, shared by any number of
//! concurrent `recv` callers.
//!
//! All state (buffered bytes, the half-read frame) lives here, not in the `recv`
//! futures, which is what makes `recv` cancel-safe: a dropped future owns nothing.
//! Small frames are split off a shared read buffer without copying; a frame larger than
//! [`DIRECT`] is read into a buffer of its own ([`Large`]).
//!
//! Memory follows what arrives, not what a length prefix claims: a frame's own buffer
//! starts at the bytes already read rounded up to a power of two (at least
//! [`MIN_LARGE`]) and doubles each time it fills, up to the frame's size, so it is never
//! more than twice what arrived (or `MIN_LARGE`). A peer that announces 8 MiB and sends 1 KiB costs
//! 4 KiB, not 8 MiB; a genuine message is copied about once more in all while it grows
//! (each byte moves at most once per doubling after it arrived: amortized linear). When
//! the [`HeapPool`] holds an idle buffer of the frame's full size, that one is taken at
//! once instead (no new memory, no growing), which is the steady state of a stream of
//! large messages whose buffers the application drops.
//!
//! A socket remembers only the last waker that polled it. So every pending caller also
//! waits in `waiters`; whoever completes (or is dropped while pending) wakes one of them,
//! which then polls the socket itself. No caller is left registered nowhere.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::io::AsyncRead;
use slab::Slab;

use super::Broken;
use crate::buffer::{HeapPool, PooledVec};
use crate::codec::Decoder;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::TcpReader;

/// Frames with more payload than this are read directly into their own buffer.
pub(crate) const DIRECT: usize = 64 * 1024;
/// Smallest buffer of a [`Large`] frame: what a frame that has barely started costs.
const MIN_LARGE: usize = 4 * 1024;
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
    /// The frame being read directly into its own buffer.
    large: Option<Large>,
    /// Size of the next read attempt: grows while reads fill it, shrinks when they don't.
    read_size: usize,
    /// Where reads land before their bytes are appended to `buf` (grows with
    /// `read_size`, at most `READ_CHUNK`).
    scratch: Vec<u8>,
    eof: bool,
    /// Sticky failure: every later `recv` returns it.
    error: Option<Error>,
    /// The connection's failure as either direction was told it (see [`Broken`]).
    broken: Arc<Broken>,
    waiters: Slab<std::task::Waker>,
}

/// A frame over [`DIRECT`] bytes, read into a buffer of its own that grows with what
/// has arrived.
struct Large {
    /// The payload read so far, at the start. Its length (`as_ref().len()`) is a power
    /// of two below `len` while growing, then exactly `len`.
    buf: PooledVec,
    /// Payload bytes read into `buf`.
    filled: usize,
    /// The frame's payload length, from its prefix.
    len: usize,
}

impl Large {
    /// Start a frame of `len` payload bytes whose first bytes are `have`
    /// (`have.len() < len`).
    fn start(len: usize, have: &[u8], pool: &HeapPool) -> Large {
        let mut buf = pool
            .take_cached(len)
            .unwrap_or_else(|| Self::take(len, have.len().max(MIN_LARGE), pool));
        buf.as_mut()[..have.len()].copy_from_slice(have);
        Large {
            buf,
            filled: have.len(),
            len,
        }
    }

    /// A buffer of `want` bytes rounded up to a power of two, or of exactly `len` if
    /// that is no larger.
    fn take(len: usize, want: usize, pool: &HeapPool) -> PooledVec {
        match want.checked_next_power_of_two() {
            Some(cap) if cap < len => pool.take_uninit(cap),
            _ => pool.take_uninit(len),
        }
    }

    /// The buffer is full but the frame is not: move to one twice as large (or of the
    /// frame's full size, when the pool has one idle or the frame needs no more).
    fn grow(&mut self, pool: &HeapPool) {
        let mut next = pool
            .take_cached(self.len)
            .unwrap_or_else(|| Self::take(self.len, self.filled.saturating_mul(2), pool));
        next.as_mut()[..self.filled].copy_from_slice(&self.buf.as_ref()[..self.filled]);
        // The outgrown buffer goes back to the allocator, not to the pool: kept, the
        // steps of one growing frame (4 KiB, 8 KiB, ... half its size) would add about
        // as much again as what arrived, for sizes no later frame takes (a frame
        // takes an idle buffer of its full size from the pool, see `start`).
        std::mem::replace(&mut self.buf, next).free();
    }

    /// Where the next read goes: the free part of the buffer (never past the frame).
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut()[self.filled..]
    }
}

/// What a finished `poll_recv` means for the connection.
pub(crate) enum Fatal {
    /// Nothing: keep going.
    No,
    /// A protocol violation: the whole connection must be closed.
    CloseConnection,
    /// The socket failed (reset, ...): sending is over too, with this error.
    Broken(Error),
}

fn lock(m: &Mutex<RecvState>) -> MutexGuard<'_, RecvState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RecvSide {
    pub(crate) fn new(reader: TcpReader, max: usize, pool: HeapPool, broken: Arc<Broken>) -> Self {
        RecvSide {
            state: Mutex::new(RecvState {
                reader: Some(reader),
                buf: BytesMut::new(),
                decoder: Decoder::new(max),
                large: None,
                read_size: MIN_READ,
                scratch: Vec::new(),
                eof: false,
                error: None,
                broken,
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
                    // The peer's orderly or mid-message end leaves our direction open.
                    Err(e) if matches!(e.kind(), ErrorKind::Closed | ErrorKind::UnexpectedEof) => {
                        Fatal::No
                    }
                    Err(e) => Fatal::Broken(e.clone()),
                    Ok(_) => Fatal::No,
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

    /// Stop receiving: fail every caller with `err` and give up the socket's read half
    /// (for the lingering close), with whether bytes from the peer were left unread.
    pub(crate) fn close(&self, err: Error) -> Option<(TcpReader, bool)> {
        let mut st = lock(&self.state);
        let reader = st.reader.take();
        let unread = st.has_buffered()
            || reader
                .as_ref()
                .is_some_and(|r| matches!(r.peek_now(), Ok(n) if n > 0));
        st.error.get_or_insert(err);
        st.buf = bytes::BytesMut::new();
        st.large = None;
        let wake: Vec<_> = st.waiters.iter().map(|(_, w)| w.clone()).collect();
        drop(st);
        wake.into_iter().for_each(|w| w.wake());
        reader.map(|r| (r, unread))
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
            Err(e) => Self::peeked_error(st, e),
        }
    }

    /// A peek at the socket failed with `e`: unless it only says "nothing now", the
    /// connection broke, and the peek took the socket's pending error (`ETIMEDOUT`
    /// from keepalive, a reset), which a later read would no longer see (it would read
    /// an orderly end). So it becomes the sticky error every `recv` reports, and
    /// waiting `recv`s are woken to report it. Whether it was such a failure.
    fn peeked_error(mut st: std::sync::MutexGuard<'_, RecvState>, e: std::io::Error) -> bool {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ) {
            return false;
        }
        let e = st.broken.record("recv", e);
        st.error.get_or_insert(e);
        let wake: Vec<_> = st.waiters.iter().map(|(_, w)| w.clone()).collect();
        drop(st);
        wake.into_iter().for_each(|w| w.wake());
        true
    }

    /// The end `recv` reported (`Closed` or `UnexpectedEof`) was the connection's
    /// failure `e`: every later `recv` reports that.
    pub(crate) fn end_was(&self, e: Error) {
        let mut st = lock(&self.state);
        if st
            .error
            .as_ref()
            .is_none_or(|old| matches!(old.kind(), ErrorKind::Closed | ErrorKind::UnexpectedEof))
        {
            st.error = Some(e);
        }
    }

    /// Whether bytes have arrived that no `recv` has returned yet.
    /// The process exits with this connection open: read and drop what the peer sent
    /// (so the kernel's close is not a reset). `Some(true)`: bytes were read;
    /// `Some(false)`: nothing now; `None`: the peer's stream ended or broke (nothing
    /// more will come).
    pub(crate) fn discard_now(&self) -> Option<bool> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let reader = st.reader.as_ref()?;
        let mut any = st.has_buffered();
        st.buf.clear();
        st.large = None;
        let mut scratch = [0u8; 16 * 1024];
        loop {
            match reader.read_now(&mut scratch) {
                Ok(0) => return None,
                Ok(_) => any = true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(any),
                Err(_) => return None,
            }
        }
    }

    pub(crate) fn has_unread(&self) -> bool {
        let st = lock(&self.state);
        if st.has_buffered() {
            return true;
        }
        let peeked = match st.reader.as_ref() {
            Some(reader) => reader.peek_now(),
            None => return false,
        };
        match peeked {
            Ok(n) => n > 0,
            Err(e) => {
                Self::peeked_error(st, e);
                false
            }
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
            if let Some(large) = &mut self.large {
                if large.filled == large.len {
                    // Only the last buffer has room for the whole frame: it is `len` long.
                    let large = self.large.take().expect("checked above");
                    self.decoder.finish_frame();
                    return Poll::Ready(Ok(Bytes::from_owner(large.buf)));
                }
                if self.eof {
                    if let Some(e) = self.broken.get() {
                        return self.fail(e);
                    }
                    let msg = format!(
                        "peer closed the connection after {} of {} bytes of a message",
                        large.filled, large.len
                    );
                    return self.fail(Error::new(ErrorKind::UnexpectedEof, msg));
                }
                let Some(reader) = self.reader.as_mut() else {
                    return self.fail(Error::closed("recv"));
                };
                if large.spare().is_empty() {
                    large.grow(pool);
                }
                match Pin::new(reader).poll_read(cx, large.spare()) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => self.eof = true,
                    Poll::Ready(Ok(n)) => large.filled += n,
                    Poll::Ready(Err(e)) => return self.fail(self.broken.record("recv", e)),
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
                    self.large = Some(Large::start(n, &self.buf, pool));
                    self.buf.clear();
                    continue;
                }
                Ok(_) => {}
            }
            if self.eof {
                // An end after the connection failed (the failure went to the other
                // direction) is that failure, not the peer's end.
                if let Some(e) = self.broken.get() {
                    return self.fail(e);
                }
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
            // Read into the scratch buffer, zeroed once and reused, then append what
            // came: a read that finds nothing (every `recv` that waits) costs no
            // zeroing of fresh buffer space, and a small message a copy of its size.
            let want = self.read_size;
            if self.scratch.len() < want {
                self.scratch.resize(want, 0);
            }
            let res = Pin::new(reader).poll_read(cx, &mut self.scratch[..want]);
            if let Poll::Ready(Ok(n)) = res {
                if self.buf.capacity() - self.buf.len() < n {
                    self.buf.reserve(n.max(READ_CHUNK));
                }
                self.buf.extend_from_slice(&self.scratch[..n]);
            }
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
                Poll::Ready(Err(e)) => return self.fail(self.broken.record("recv", e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io;
    use std::task::Waker;

    /// What the fake socket does at each read.
    enum Step {
        Data(Vec<u8>),
        /// No data now (`Pending`).
        Stall,
    }

    /// A read half that plays a script; `Ok(0)` (end of stream) once it is played out.
    struct Script(VecDeque<Step>);

    impl AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            match self.0.pop_front() {
                None => Poll::Ready(Ok(0)),
                Some(Step::Stall) => Poll::Pending,
                Some(Step::Data(mut d)) => {
                    let n = d.len().min(out.len());
                    out[..n].copy_from_slice(&d[..n]);
                    if n < d.len() {
                        self.0.push_front(Step::Data(d.split_off(n)));
                    }
                    Poll::Ready(Ok(n))
                }
            }
        }
    }

    impl crate::runtime::SocketRead for Script {
        fn peek_now(&self) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn read_now(&self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn side(steps: Vec<Step>, max: usize, pool: &HeapPool) -> RecvSide {
        RecvSide::new(
            Box::new(Script(steps.into())),
            max,
            pool.clone(),
            Arc::default(),
        )
    }

    fn poll(side: &RecvSide) -> Poll<Result<Bytes>> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut slot = None;
        let (res, _) = side.poll_recv(&mut cx, &mut slot);
        side.cancel(&mut slot);
        res
    }

    /// Bytes of the frame buffer in use, if a large frame is in progress.
    fn large_capacity(side: &RecvSide) -> Option<usize> {
        lock(&side.state)
            .large
            .as_ref()
            .map(|l| l.buf.as_ref().len())
    }

    fn frame(len: usize, seed: u8) -> (Vec<u8>, Vec<u8>) {
        let payload: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect();
        let mut wire = (len as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&payload);
        (wire, payload)
    }

    #[test]
    fn a_lying_prefix_costs_what_arrived() {
        let pool = HeapPool::default();
        let mut wire = (8u32 << 20).to_be_bytes().to_vec();
        wire.extend_from_slice(&[7; 1024]);
        let side = side(vec![Step::Data(wire), Step::Stall], 8 << 20, &pool);
        assert!(poll(&side).is_pending());
        assert_eq!(
            large_capacity(&side),
            Some(MIN_LARGE),
            "an 8 MiB claim with 1 KiB behind it holds 4 KiB"
        );
        // The peer leaves: the cut frame is reported, and its buffer is released.
        match poll(&side) {
            Poll::Ready(Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
                assert!(e.to_string().contains("1024 of 8388608"), "{e}");
            }
            other => panic!("expected UnexpectedEof, got {other:?}"),
        }
        assert_eq!(large_capacity(&side), None);
    }

    #[test]
    fn a_genuine_large_frame_grows_geometrically() {
        let pool = HeapPool::default();
        let len = 8 << 20;
        let (wire, payload) = frame(len, 1);
        // 64 KiB at a time, the socket empty in between.
        let mut steps = Vec::new();
        for c in wire.chunks(64 * 1024) {
            steps.push(Step::Data(c.to_vec()));
            steps.push(Step::Stall);
        }
        let side = side(steps, len, &pool);
        let (mut arrived, mut caps) = (0usize, Vec::new());
        let got = loop {
            match poll(&side) {
                Poll::Pending => {
                    arrived = (arrived + 64 * 1024).min(wire.len());
                    let cap = large_capacity(&side).expect("frame in progress");
                    assert!(
                        cap <= (2 * (arrived - 4)).max(MIN_LARGE),
                        "{cap} bytes held after {arrived} arrived"
                    );
                    if caps.last() != Some(&cap) {
                        caps.push(cap);
                    }
                }
                Poll::Ready(r) => break r.unwrap(),
            }
        };
        assert!(got[..] == payload[..], "payload changed");
        assert_eq!(caps.last(), Some(&len));
        // Each buffer is at least twice the one before, so all copies while growing
        // (each buffer's content once) add up to less than the frame.
        assert!(caps.windows(2).all(|w| w[1] >= 2 * w[0]), "{caps:?}");
        let copied: usize = caps[..caps.len() - 1].iter().sum();
        assert!(
            copied < len,
            "copied {copied} bytes growing a {len}-byte frame"
        );
        drop(got);

        // With the frame's buffer back in the pool, the next frame of that size takes it
        // at once: no growing, no copying.
        let (wire, payload) = frame(len, 2);
        let (head, tail) = wire.split_at(1000);
        let side = self::side(
            vec![
                Step::Data(head.to_vec()),
                Step::Stall,
                Step::Data(tail.to_vec()),
            ],
            len,
            &pool,
        );
        assert!(poll(&side).is_pending());
        assert_eq!(
            large_capacity(&side),
            Some(len),
            "idle full-size buffer reused"
        );
        match poll(&side) {
            Poll::Ready(Ok(got)) => assert!(got[..] == payload[..]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_split_anywhere_decode_in_order() {
        let pool = HeapPool::default();
        let sizes = [70_000usize, 3, 200_000, 0, 65_537, 1 << 20, 5];
        let mut wire = Vec::new();
        let mut expect = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let (w, p) = frame(n, i as u8);
            wire.extend(w);
            expect.push(p);
        }
        for seed in [1u64, 7, 1234] {
            // Chunks of 1 byte to 100 KiB, from a fixed pseudo-random sequence.
            let (mut steps, mut at, mut x) = (Vec::new(), 0, seed);
            while at < wire.len() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let n = match x >> 62 {
                    0 => 1 + (x >> 40) as usize % 16,
                    1 => 1 + (x >> 40) as usize % 4096,
                    _ => 1 + (x >> 40) as usize % 100_000,
                };
                let end = (at + n).min(wire.len());
                steps.push(Step::Data(wire[at..end].to_vec()));
                if x & 1 == 0 {
                    steps.push(Step::Stall);
                }
                at = end;
            }
            let side = side(steps, 1 << 20, &pool);
            let mut got = Vec::new();
            loop {
                match poll(&side) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(m)) => got.push(m),
                    Poll::Ready(Err(e)) => {
                        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
                        break;
                    }
                }
            }
            assert_eq!(got.len(), expect.len(), "seed {seed}");
            for (g, e) in got.iter().zip(&expect) {
                assert!(
                    g[..] == e[..],
                    "seed {seed}: a {}-byte frame changed",
                    e.len()
                );
            }
        }
    }
}
