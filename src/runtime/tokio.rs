//! The tokio adapter (feature `tokio`, on by default).

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::tokio::io::ReadBuf;
use ::tokio::runtime::Handle;

use crate::runtime::{AsyncListener, Runtime, SocketOptions, SocketRead, SocketWrite, TcpSocket};
use crate::transport::BoxFuture;

/// [`Runtime`] on a tokio runtime handle.
///
/// The runtime needs its I/O and time drivers (`enable_all()`, which `#[tokio::main]`
/// and `#[tokio::test]` do). Each adapter parks one idle task on the runtime, for as
/// long as the adapter or anything made through it lives: when the runtime shuts down
/// and drops it, the adapter knows, so its timers complete at once instead of panicking
/// (tokio panics when a timer of a shut-down runtime is polled).
#[derive(Debug, Clone)]
pub struct TokioRuntime {
    handle: Handle,
    alive: Arc<Liveness>,
}

/// Whether the runtime still runs, shared by an adapter, its clones and everything made
/// through them (timers, sockets, listeners). While any of them lives, the adapter's
/// idle task stays parked on the runtime (`keep` is the other end of what it waits
/// for); when the last goes, the task ends, so connections that come and go leave no
/// parked tasks behind.
#[derive(Debug)]
struct Liveness {
    running: AtomicBool,
    _keep: futures::channel::oneshot::Sender<()>,
}

impl Liveness {
    fn load(&self, order: Ordering) -> bool {
        self.running.load(order)
    }
}

/// Dropped with the idle task: when the runtime shuts down (then it says so to whoever
/// still holds the liveness), or when nobody holds it any more (then nobody is told).
struct Sentinel(std::sync::Weak<Liveness>);

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(l) = self.0.upgrade() {
            l.running.store(false, Ordering::Release);
        }
    }
}

impl TokioRuntime {
    /// An adapter for the runtime behind `handle`.
    pub fn new(handle: Handle) -> Self {
        let (keep, gone) = futures::channel::oneshot::channel::<()>();
        let alive = Arc::new(Liveness {
            running: AtomicBool::new(true),
            _keep: keep,
        });
        let sentinel = Sentinel(Arc::downgrade(&alive));
        drop(handle.spawn(async move {
            let _sentinel = sentinel;
            // Ends when the last holder of the liveness is dropped (the sender with it).
            let _ = gone.await;
        }));
        TokioRuntime { handle, alive }
    }

    /// The adapter for the tokio runtime this thread runs in, if any.
    pub fn try_current() -> Option<Self> {
        Handle::try_current().ok().map(Self::new)
    }
}

/// Polls `fut` with `handle` entered, so it may be polled from any thread.
struct Entered<F> {
    handle: Handle,
    fut: Pin<Box<F>>,
}

impl<F: Future> Future for Entered<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _guard = this.handle.enter();
        this.fut.as_mut().poll(cx)
    }
}

/// tokio's sleep that completes at once once its runtime has shut down.
struct Sleep {
    inner: Pin<Box<::tokio::time::Sleep>>,
    alive: Arc<Liveness>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.alive.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.inner.as_mut().poll(cx)
    }
}

impl Runtime for TokioRuntime {
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        drop(self.handle.spawn(task));
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let _guard = self.handle.enter();
        Box::pin(Sleep {
            inner: Box::pin(::tokio::time::sleep(duration)),
            alive: self.alive.clone(),
        })
    }

    fn is_shut_down(&self) -> bool {
        !self.alive.load(Ordering::Acquire)
    }

    fn tcp_connect(
        &self,
        addr: SocketAddr,
        opts: SocketOptions,
    ) -> BoxFuture<'static, io::Result<TcpSocket>> {
        if self.is_shut_down() {
            return Box::pin(std::future::ready(Err(shut_down())));
        }
        let alive = self.alive.clone();
        Box::pin(Entered {
            handle: self.handle.clone(),
            fut: Box::pin(async move {
                let stream = ::tokio::net::TcpStream::connect(addr).await?;
                socket(stream, opts, alive)
            }),
        })
    }

    fn tcp_bind(
        &self,
        addr: SocketAddr,
        opts: SocketOptions,
    ) -> io::Result<Box<dyn AsyncListener>> {
        if self.is_shut_down() {
            return Err(shut_down());
        }
        let _guard = self.handle.enter();
        let std = std::net::TcpListener::bind(addr)?;
        std.set_nonblocking(true)?;
        let listener = ::tokio::net::TcpListener::from_std(std)?;
        Ok(Box::new(Listener {
            listener,
            opts,
            alive: self.alive.clone(),
        }))
    }
}

fn shut_down() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "the tokio runtime of this adapter has shut down",
    )
}

/// What a read that would have to wait returns once the runtime has shut down: its
/// reactor is gone, so nothing could wake the reader again.
fn reader_shut_down() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "recv: the tokio runtime this connection was opened on has shut down, and \
         waiting for data needs its reactor (what was already sent is still delivered)",
    )
}

fn socket(
    stream: ::tokio::net::TcpStream,
    opts: SocketOptions,
    alive: Arc<Liveness>,
) -> io::Result<TcpSocket> {
    crate::runtime::apply_socket_options(socket2::SockRef::from(&stream), &opts)?;
    let local_addr = stream.local_addr()?;
    let peer_addr = stream.peer_addr()?;
    let (r, w) = stream.into_split();
    Ok(TcpSocket {
        reader: Box::new(Reader {
            half: r,
            busy_poll: opts.busy_poll,
            alive,
        }),
        writer: Box::new(Writer(w)),
        local_addr,
        peer_addr,
    })
}

#[derive(Debug)]
struct Listener {
    listener: ::tokio::net::TcpListener,
    opts: SocketOptions,
    alive: Arc<Liveness>,
}

impl AsyncListener for Listener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpSocket>> {
        let (stream, _) = ready!(self.listener.poll_accept(cx))?;
        Poll::Ready(socket(stream, self.opts, self.alive.clone()))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// The read half, with optional busy-polling.
///
/// Once the runtime has shut down, a read takes what the socket holds without its
/// reactor, and one that would have to wait fails with `Unsupported`
/// ([`reader_shut_down`]); tokio's own error then ("being shutdown") is not passed on.
struct Reader {
    half: ::tokio::net::tcp::OwnedReadHalf,
    busy_poll: Duration,
    alive: Arc<Liveness>,
}

impl Reader {
    fn read_without_reactor(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.read_now(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(reader_shut_down()),
            r => r,
        }
    }
}

impl futures::io::AsyncRead for Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if !self.alive.load(Ordering::Acquire) {
            return Poll::Ready(self.read_without_reactor(buf));
        }
        let mut rb = ReadBuf::new(buf);
        if let Poll::Ready(r) =
            ::tokio::io::AsyncRead::poll_read(Pin::new(&mut self.half), cx, &mut rb)
        {
            let n = rb.filled().len();
            return Poll::Ready(match r {
                // The reactor went away while the runtime shut down.
                Err(_) if !self.alive.load(Ordering::Acquire) => self.read_without_reactor(buf),
                r => r.map(|()| n),
            });
        }
        if self.busy_poll.is_zero() {
            return Poll::Pending;
        }
        // tokio answers from its cached readiness until the reactor runs; read the
        // socket directly (it is non-blocking) until data comes or the window closes.
        // The waker registered above stays valid either way.
        let sock = socket2::SockRef::from(self.half.as_ref());
        crate::runtime::busy_read(self.busy_poll, || io::Read::read(&mut &*sock, buf))
    }
}

impl SocketRead for Reader {
    fn peek_now(&self) -> io::Result<usize> {
        let mut one = [std::mem::MaybeUninit::<u8>::uninit()];
        socket2::SockRef::from(self.half.as_ref()).peek(&mut one)
    }

    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &*socket2::SockRef::from(self.half.as_ref()), buf)
    }
}

/// The write half: tokio's I/O traits seen through `futures-io`'s.
struct Writer(::tokio::net::tcp::OwnedWriteHalf);

impl futures::io::AsyncWrite for Writer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ::tokio::io::AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ::tokio::io::AsyncWrite::poll_write_vectored(Pin::new(&mut self.0), cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ::tokio::io::AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ::tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut self.0), cx)
    }
}

impl SocketWrite for Writer {
    fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        socket2::SockRef::from(self.0.as_ref()).send_vectored(bufs)
    }

    fn shutdown_now(&self) -> io::Result<()> {
        socket2::SockRef::from(self.0.as_ref()).shutdown(std::net::Shutdown::Write)
    }
}
