//! The tokio adapter (feature `tokio`, on by default).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::tokio::io::ReadBuf;
use ::tokio::runtime::Handle;

use crate::runtime::{AsyncListener, Runtime, SocketOptions, TcpSocket};
use crate::transport::BoxFuture;

/// [`Runtime`] on a tokio runtime handle.
///
/// The runtime needs its I/O and time drivers (`enable_all()`, which `#[tokio::main]`
/// and `#[tokio::test]` do).
#[derive(Debug, Clone)]
pub struct TokioRuntime {
    handle: Handle,
}

impl TokioRuntime {
    /// An adapter for the runtime behind `handle`.
    pub fn new(handle: Handle) -> Self {
        TokioRuntime { handle }
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

impl Runtime for TokioRuntime {
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        drop(self.handle.spawn(task));
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let _guard = self.handle.enter();
        Box::pin(::tokio::time::sleep(duration))
    }

    fn tcp_connect(
        &self,
        addr: SocketAddr,
        opts: SocketOptions,
    ) -> BoxFuture<'static, io::Result<TcpSocket>> {
        Box::pin(Entered {
            handle: self.handle.clone(),
            fut: Box::pin(async move {
                let stream = ::tokio::net::TcpStream::connect(addr).await?;
                socket(stream, opts)
            }),
        })
    }

    fn tcp_bind(
        &self,
        addr: SocketAddr,
        opts: SocketOptions,
    ) -> io::Result<Box<dyn AsyncListener>> {
        let _guard = self.handle.enter();
        let std = std::net::TcpListener::bind(addr)?;
        std.set_nonblocking(true)?;
        let listener = ::tokio::net::TcpListener::from_std(std)?;
        Ok(Box::new(Listener { listener, opts }))
    }
}

fn socket(stream: ::tokio::net::TcpStream, opts: SocketOptions) -> io::Result<TcpSocket> {
    stream.set_nodelay(opts.nodelay)?;
    let local_addr = stream.local_addr()?;
    let peer_addr = stream.peer_addr()?;
    let (r, w) = stream.into_split();
    Ok(TcpSocket {
        reader: Box::new(Reader {
            half: r,
            busy_poll: opts.busy_poll,
        }),
        writer: Box::new(Compat(w)),
        local_addr,
        peer_addr,
    })
}

#[derive(Debug)]
struct Listener {
    listener: ::tokio::net::TcpListener,
    opts: SocketOptions,
}

impl AsyncListener for Listener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpSocket>> {
        let (stream, _) = ready!(self.listener.poll_accept(cx))?;
        Poll::Ready(socket(stream, self.opts))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// The read half, with optional busy-polling.
struct Reader {
    half: ::tokio::net::tcp::OwnedReadHalf,
    busy_poll: Duration,
}

impl futures::io::AsyncRead for Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut rb = ReadBuf::new(buf);
        if let Poll::Ready(r) =
            ::tokio::io::AsyncRead::poll_read(Pin::new(&mut self.half), cx, &mut rb)
        {
            return Poll::Ready(r.map(|()| rb.filled().len()));
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

/// tokio's I/O traits seen through `futures-io`'s.
struct Compat<T>(T);

impl<T: ::tokio::io::AsyncRead + Unpin> futures::io::AsyncRead for Compat<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut rb = ReadBuf::new(buf);
        ready!(Pin::new(&mut self.0).poll_read(cx, &mut rb))?;
        Poll::Ready(Ok(rb.filled().len()))
    }
}

impl<T: ::tokio::io::AsyncWrite + Unpin> futures::io::AsyncWrite for Compat<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
