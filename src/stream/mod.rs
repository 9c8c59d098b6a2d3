//! A byte stream over any [`Transport`]: [`ByteStream`], for protocols that speak bytes
//! (HTTP/1.1 and HTTP/2 through hyper, gRPC through tonic, TLS through rustls) over TCP
//! or RDMA.
//!
//! # How bytes become messages
//! * **Writes** are copied into a buffer from the transport's own memory
//!   ([`Transport::alloc_buf`]: registered memory on RDMA), which goes out as one
//!   message, without another copy, when it is full or when the stream is flushed or
//!   shut down. A buffer holds at most [`StreamConfig::write_chunk`] bytes (and the
//!   transport's [`max_message_size`](Transport::max_message_size)): a write larger
//!   than that is split, and writes of a few bytes followed by a flush make one small
//!   message. A buffer starts small (the size of the first write, at least 4 KiB) and
//!   doubles each time one fills before a flush, so a burst of small writes grows into
//!   full-size messages and a request/response protocol does not pay for large
//!   buffers it never fills.
//! * **Reads** return the bytes of the received messages in order, with no regard for
//!   where one message ended; [`futures::io::AsyncBufRead`] hands out
//!   each received message's bytes in place, with no copy.
//!
//! # What `Ok` means
//! `write` returning `Ok(n)` means `n` bytes are in the stream's buffer, as with
//! `std::io::BufWriter`. `flush` returning `Ok` means every byte written so far was
//! accepted by the transport's [`send`](Transport::send), and the transport then
//! delivers it, even if the stream, the transport or the process ends next, or reports
//! an error (see there): the guarantee of a TCP socket's `flush`, which means the
//! kernel has the bytes. It does not wait until they are on the network; for that,
//! `stream.transport().flush()`. `shutdown` (`poll_close` in futures-io) flushes
//! first, then waits for the transport's `shutdown` (everything sent, then the end). [`ByteStream::buffered`] counts the written bytes `send`
//! has not accepted yet. Dropping the stream with such bytes hands them to `send` if
//! the transport has room for them at once (as `BufWriter`'s drop does), else they
//! are lost (at most `buffered()` bytes, the last ones written): flush or shut down to
//! know.
//!
//! # Ends and errors
//! * `shutdown` (futures-io's `poll_close`, tokio's `poll_shutdown`) sends what is
//!   buffered and then [`Transport::shutdown`]: the peer reads the end of the stream
//!   and may still write back, which this side still reads. Writes after it fail with
//!   `BrokenPipe`; `flush` and `shutdown` again return `Ok` (nothing is left to send).
//! * A message of 0 bytes carries no bytes: reads go on to the next message (only the
//!   end of the stream reads as 0). A read that skips many of them in a row yields to
//!   the executor every 64 messages (and then goes on), so a peer that sends nothing
//!   else cannot hold the task's thread or outlast its timeouts.
//! * Reads after the peer's shutdown (the transport's `recv` failing with
//!   [`Closed`](ErrorKind::Closed)) return 0 bytes, every time.
//! * Any other transport error becomes the matching [`std::io::Error`] (its kind from
//!   [`ErrorKind::io_kind`], the net-rs [`Error`] inside, see [`Error::from_io`]). An
//!   error of the receiving side is returned by every later read, one of the sending
//!   side by every later write, flush and shutdown: a broken stream does not turn into
//!   a clean end. A peer that drops its transport without a shutdown ends it as the
//!   transport does: its last messages are still delivered (within its `linger`), then
//!   this side reads the end; writes meanwhile succeed as long as the connection
//!   takes them.
//!
//! # Cancellation
//! The operation in progress (a `recv`, a `send` of a full buffer, a `shutdown`) lives
//! in the stream, not in the future of the read or write that started it: dropping a
//! `read`, `read_exact`, `write` or `flush` future loses no byte, and the next call
//! goes on where it stopped. `read_exact` itself is not cancel-safe in futures-io or
//! tokio (the bytes it already copied are in its own buffer), as on any stream.
//!
//! # Memory
//! At most one write buffer and one message being sent (bounded by `write_chunk`), and
//! the one received message being read; what the peer may queue is bounded by the
//! transport's own receive budget.
//!
//! With the `tokio` feature the stream also implements tokio's `AsyncRead`,
//! `AsyncBufRead` and `AsyncWrite`; with `hyper`, hyper 1.x's `rt::Read` and
//! `rt::Write`, and `HyperExecutor` spawns hyper's HTTP/2 tasks on a net-rs runtime: so
//! hyper runs on any transport under any runtime (see the `http_echo` example).

#[cfg(feature = "hyper")]
mod hyper_io;
#[cfg(feature = "hyper")]
pub use hyper_io::HyperExecutor;
#[cfg(feature = "tokio")]
mod tokio_io;

use std::fmt;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf as _, Bytes};
use futures::io::{AsyncBufRead, AsyncRead, AsyncWrite};
use futures::ready;

use crate::buffer::Buf;
use crate::coop::Budget;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{BoxFuture, Handle, Transport};

/// The smallest write buffer a [`ByteStream`] takes (bytes).
const MIN_WRITE_BUF: usize = 4096;

/// Settings of a [`ByteStream`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StreamConfig {
    /// The largest message the stream makes of written bytes (default 64 KiB; also
    /// capped by the transport's `max_message_size`). Larger messages cost fewer
    /// per-message steps in bulk transfers, and more memory per stream; the README's
    /// "Byte streams" section has the measurement behind the default.
    pub write_chunk: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            write_chunk: 64 << 10,
        }
    }
}

impl StreamConfig {
    /// Set [`write_chunk`](StreamConfig::write_chunk) in bytes (0 is taken as 1).
    pub fn write_chunk(mut self, bytes: usize) -> Self {
        self.write_chunk = bytes.max(1);
        self
    }
}

/// Something that gives access to a transport `T` (an owned one in a `Box`, an `Arc`).
type Keeper<T> = Arc<dyn Deref<Target = T> + Send + Sync>;

/// How the receiving side ended.
enum ReadEnd {
    /// The peer shut its side down: reads return 0.
    Eof,
    /// The transport failed: reads return this error.
    Failed(Error),
}

/// The state of the sending side.
enum WriteState {
    Open,
    /// `shutdown` completed.
    ShutDown,
    Failed(Error),
}

/// A [`Transport`] as a byte stream: `AsyncRead`, `AsyncBufRead` and `AsyncWrite` of
/// futures-io (and of tokio with the `tokio` feature, hyper's with `hyper`). See the
/// [module documentation](self) for how bytes map to messages, what `Ok` means, ends,
/// errors and cancellation.
///
/// ```no_run
/// use futures::{AsyncReadExt, AsyncWriteExt};
/// use net_rs::drivers::tcp::TcpTransport;
/// use net_rs::stream::ByteStream;
///
/// # async fn run() -> std::io::Result<()> {
/// let mut stream = ByteStream::new(TcpTransport::connect("127.0.0.1:8080").await?);
/// stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
/// stream.close().await?; // flush, then the peer reads the end (half-close)
/// let mut reply = Vec::new();
/// stream.read_to_end(&mut reply).await?;
/// # Ok(())
/// # }
/// ```
pub struct ByteStream<T: Transport> {
    transport: Keeper<T>,
    config: StreamConfig,
    // Receiving side.
    /// The unread rest of the current message.
    read: Bytes,
    recv: Option<BoxFuture<'static, Result<Bytes>>>,
    read_end: Option<ReadEnd>,
    // Sending side.
    /// The buffer being filled (`len()` = bytes written into it).
    buf: Option<Buf>,
    /// The capacity to ask for next time (grows while buffers fill before a flush).
    next_buf: usize,
    /// A full buffer's `send`, still waiting for room in the transport.
    send: Option<BoxFuture<'static, Result<()>>>,
    /// The bytes of the message `send` holds (0 without one).
    sending: usize,
    shutdown: Option<BoxFuture<'static, Result<()>>>,
    write: WriteState,
}

impl<T: Transport> ByteStream<T> {
    /// A stream that owns `transport` (a [`PooledConnection`](crate::pool::PooledConnection)
    /// too: its own methods are used, so a read left unfinished keeps the connection
    /// out of the pool).
    pub fn new(transport: T) -> Self {
        Self::with_config(Box::new(transport), StreamConfig::default())
    }

    /// A stream over the transport behind `handle` (an `Arc<T>` or a `Box<T>`), with
    /// `config`.
    pub fn with_config<H>(handle: H, config: StreamConfig) -> Self
    where
        H: Handle<T> + Send + Sync + 'static,
    {
        ByteStream {
            transport: Arc::new(handle),
            config,
            read: Bytes::new(),
            recv: None,
            read_end: None,
            buf: None,
            next_buf: MIN_WRITE_BUF,
            send: None,
            sending: 0,
            shutdown: None,
            write: WriteState::Open,
        }
    }

    /// The transport, for what the stream does not cover (addresses, `is_closed`).
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Bytes written that the transport's `send` has not accepted yet: those in the
    /// buffer being filled and those of a full buffer whose `send` waits for room.
    /// These are what a drop may lose (see the module documentation); 0 after a
    /// successful `flush`.
    pub fn buffered(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len()) + self.sending
    }

    /// The next received bytes, in place: the rest of the current message, or the
    /// next message. Empty at the end of the stream.
    ///
    /// # Errors
    /// The receiving side's error (again on every later call).
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        // Empty messages carry nothing to return: a peer sending only those must not
        // keep this poll (and the task's thread) busy for as long as it sends.
        let mut budget = Budget::new();
        loop {
            if !self.read.is_empty() {
                return Poll::Ready(Ok(&self.read[..]));
            }
            match &self.read_end {
                Some(ReadEnd::Eof) => return Poll::Ready(Ok(&[])),
                Some(ReadEnd::Failed(e)) => return Poll::Ready(Err(e.clone().into())),
                None => {}
            }
            if self.recv.is_none() {
                ready!(budget.spend(cx));
            }
            let recv = self.recv.get_or_insert_with(|| {
                let t = self.transport.clone();
                Box::pin(async move { t.recv().await })
            });
            let res = ready!(recv.as_mut().poll(cx));
            self.recv = None;
            match res {
                // An empty message carries no bytes: go on to the next.
                Ok(msg) => self.read = msg,
                Err(e) if e.kind() == ErrorKind::Closed => self.read_end = Some(ReadEnd::Eof),
                Err(e) => self.read_end = Some(ReadEnd::Failed(e)),
            }
        }
    }

    /// The reads of every I/O trait: hand at most `room` received bytes to `put` (none
    /// at the end of the stream, or if `room` is 0) and consume them; their count.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        room: usize,
        put: impl FnOnce(&[u8]),
    ) -> Poll<io::Result<usize>> {
        if room == 0 {
            return Poll::Ready(Ok(0));
        }
        let got = ready!(self.poll_fill(cx))?;
        let n = got.len().min(room);
        put(&got[..n]);
        self.consume(n);
        Poll::Ready(Ok(n))
    }

    /// Mark `n` bytes of what [`poll_fill`](ByteStream::poll_fill) returned as read.
    pub fn consume(&mut self, n: usize) {
        self.read.advance(n.min(self.read.len()));
    }

    /// The rest of the current message (or the next message) as `Bytes`, without a
    /// copy: `None` at the end of the stream. Reads and this may be mixed.
    ///
    /// # Errors
    /// As [`poll_fill`](ByteStream::poll_fill).
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let n = ready!(self.poll_fill(cx))?.len();
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        Poll::Ready(Ok(Some(std::mem::take(&mut self.read))))
    }

    /// [`poll_chunk`](ByteStream::poll_chunk) as a future.
    ///
    /// # Errors
    /// As [`poll_fill`](ByteStream::poll_fill).
    pub async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        futures::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// The error writes report now, if any.
    fn write_error(&self) -> Option<io::Error> {
        match &self.write {
            WriteState::Open => None,
            WriteState::ShutDown => Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "net-rs ByteStream: write after shutdown",
            )),
            WriteState::Failed(e) => Some(e.clone().into()),
        }
    }

    fn fail_write(&mut self, e: Error) -> io::Error {
        self.write = WriteState::Failed(e.clone());
        self.buf = None;
        self.send = None;
        self.sending = 0;
        self.shutdown = None;
        e.into()
    }

    /// Finish the pending `send` of a full buffer, if any.
    fn poll_sent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(send) = self.send.as_mut() {
            let res = ready!(send.as_mut().poll(cx));
            self.send = None;
            self.sending = 0;
            if let Err(e) = res {
                return Poll::Ready(Err(self.fail_write(e)));
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Hand the buffer (if it holds anything) to `send`; the caller polls `self.send`.
    fn start_send(&mut self) {
        if let Some(buf) = self.buf.take().filter(|b| !b.is_empty()) {
            self.sending = buf.len();
            let (t, msg) = (self.transport.clone(), buf.freeze());
            self.send = Some(Box::pin(async move { t.send(msg).await }));
        }
    }

    /// Send everything buffered and wait until `send` took it.
    fn poll_send_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_sent(cx))?;
        self.start_send();
        self.poll_sent(cx)
    }

    /// The largest message this stream makes.
    fn chunk_limit(&self) -> usize {
        self.config
            .write_chunk
            .min(self.transport.max_message_size())
            .max(1)
    }

    /// Copy as much of `data` as fits into the buffer (taking one if needed).
    fn buffer(&mut self, data: &[u8]) -> io::Result<usize> {
        let limit = self.chunk_limit();
        if self.buf.is_none() {
            let want = self.next_buf.max(data.len()).clamp(1, limit);
            match self.transport.alloc_buf(want) {
                Ok(mut b) => {
                    b.truncate(0);
                    self.buf = Some(b);
                }
                Err(e) => return Err(self.fail_write(e)),
            }
        }
        let buf = self.buf.as_mut().expect("taken above");
        let room = buf.capacity().min(limit) - buf.len();
        let n = room.min(data.len());
        let at = buf.len();
        buf.set_len(at + n);
        buf[at..].copy_from_slice(&data[..n]);
        Ok(n)
    }

    /// Whether the buffer cannot take another byte.
    fn buf_full(&self) -> bool {
        self.buf
            .as_ref()
            .is_some_and(|b| b.len() >= b.capacity().min(self.chunk_limit()))
    }

    /// Write from `bufs` (in order) into the buffer; sends a full buffer first.
    fn poll_write_from(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.write_error() {
            return Poll::Ready(Err(e));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        ready!(self.poll_sent(cx))?;
        if self.buf_full() {
            // This buffer filled before a flush: the next may be larger.
            let cap = self.buf.as_ref().map_or(0, |b| b.capacity());
            self.next_buf = (cap.saturating_mul(2)).min(self.chunk_limit());
            self.start_send();
            ready!(self.poll_sent(cx))?;
        }
        let mut written = 0;
        for data in bufs {
            let n = self.buffer(data)?;
            written += n;
            if n < data.len() {
                break;
            }
        }
        Poll::Ready(Ok(written))
    }

    /// Hand what is buffered to `send` and wait until it is accepted. Not the
    /// transport's own `flush` (which waits until the bytes are on the network): what
    /// `send` accepted is delivered by the transport whatever happens to the stream,
    /// as what a socket's `write` took is by the kernel, and waiting for the network
    /// at each of hyper's or h2's flushes cost tonic over TCP about a quarter of its
    /// request rate (8 KiB calls, 64 in flight; README, "Byte streams").
    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.write {
            // Nothing can be buffered after a shutdown, which flushed.
            WriteState::ShutDown => return Poll::Ready(Ok(())),
            WriteState::Failed(e) => return Poll::Ready(Err(e.clone().into())),
            WriteState::Open => {}
        }
        ready!(self.poll_send_buffered(cx))?;
        self.next_buf = MIN_WRITE_BUF;
        Poll::Ready(Ok(()))
    }

    /// Send what is buffered, then the transport's `shutdown` (the peer reads the end).
    fn poll_shutdown_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.write {
            WriteState::ShutDown => return Poll::Ready(Ok(())),
            WriteState::Failed(e) => return Poll::Ready(Err(e.clone().into())),
            WriteState::Open => {}
        }
        ready!(self.poll_send_buffered(cx))?;
        let shutdown = self.shutdown.get_or_insert_with(|| {
            let t = self.transport.clone();
            Box::pin(async move { t.shutdown().await })
        });
        let res = ready!(shutdown.as_mut().poll(cx));
        self.shutdown = None;
        match res {
            Ok(()) => {
                self.write = WriteState::ShutDown;
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(self.fail_write(e))),
        }
    }
}

impl<T: Transport> Drop for ByteStream<T> {
    /// Hand unflushed bytes to `send` if the transport takes them at once.
    fn drop(&mut self) {
        if !matches!(self.write, WriteState::Open) {
            return;
        }
        let mut cx = Context::from_waker(Waker::noop());
        if self.poll_sent(&mut cx).is_ready() {
            self.start_send();
            let _ = self.poll_sent(&mut cx);
        }
    }
}

impl<T: Transport> AsyncRead for ByteStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let room = out.len();
        self.get_mut()
            .poll_read_into(cx, room, |got| out[..got.len()].copy_from_slice(got))
    }
}

impl<T: Transport> AsyncBufRead for ByteStream<T> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        self.get_mut().poll_fill(cx)
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        self.get_mut().consume(amt);
    }
}

impl<T: Transport> AsyncWrite for ByteStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_from(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_from(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_all(cx)
    }

    /// Flush, then [`Transport::shutdown`]: the peer reads the end of the stream; this
    /// side still reads what the peer sends.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown_all(cx)
    }
}

impl<T: Transport> fmt::Debug for ByteStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByteStream")
            .field("local_addr", &self.transport.local_addr().ok())
            .field("peer_addr", &self.transport.peer_addr().ok())
            .field("unread", &self.read.len())
            .field("buffered", &self.buffered())
            .field("read_ended", &self.read_end.is_some())
            .finish_non_exhaustive()
    }
}
