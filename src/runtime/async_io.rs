//! The async-io adapter (feature `async-std`): async-std, smol and any other executor.
//!
//! async-std and smol share the `async-io` reactor, and async-io's reactor runs on its
//! own thread when no `block_on` of its drives it, so sockets and timers from this
//! adapter work under any executor, including a hand-written one. Background tasks (the
//! TCP writer, the pool's maintenance task) go to the spawner you choose: by default a
//! small executor on one `net-rs-async-io` thread, or your own with
//! [`AsyncIoRuntime::with_spawner`] (for example `smol::spawn(f).detach()`).

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_io::{Async, Timer};
use futures::io::{AsyncRead, AsyncWrite};

use crate::runtime::{AsyncListener, Runtime, SocketOptions, SocketRead, SocketWrite, TcpSocket};
use crate::transport::BoxFuture;

type Spawner = dyn Fn(BoxFuture<'static, ()>) + Send + Sync;

/// [`Runtime`] on the async-io reactor.
#[derive(Clone)]
pub struct AsyncIoRuntime {
    spawner: Arc<Spawner>,
}

impl AsyncIoRuntime {
    /// An adapter that spawns onto net-rs's own one-thread executor.
    pub fn new() -> Self {
        AsyncIoRuntime::with_spawner(|task| global_executor().spawn(task).detach())
    }

    /// An adapter that hands background tasks to `spawner`.
    pub fn with_spawner(spawner: impl Fn(BoxFuture<'static, ()>) + Send + Sync + 'static) -> Self {
        AsyncIoRuntime {
            spawner: Arc::new(spawner),
        }
    }

    /// The process-wide default instance (used by
    /// [`default_runtime`](crate::runtime::default_runtime)).
    pub fn shared() -> Arc<dyn Runtime> {
        static SHARED: OnceLock<Arc<dyn Runtime>> = OnceLock::new();
        SHARED
            .get_or_init(|| Arc::new(AsyncIoRuntime::new()))
            .clone()
    }
}

impl Default for AsyncIoRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AsyncIoRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncIoRuntime").finish_non_exhaustive()
    }
}

fn global_executor() -> &'static async_executor::Executor<'static> {
    static EX: OnceLock<async_executor::Executor<'static>> = OnceLock::new();
    static STARTED: std::sync::Once = std::sync::Once::new();
    let ex = EX.get_or_init(async_executor::Executor::new);
    STARTED.call_once(|| {
        std::thread::Builder::new()
            .name("net-rs-async-io".into())
            .spawn(|| async_io::block_on(ex.run(futures::future::pending::<()>())))
            .expect("spawn the net-rs-async-io executor thread");
    });
    ex
}

impl Runtime for AsyncIoRuntime {
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        (self.spawner)(task)
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            Timer::after(duration).await;
        })
    }

    fn tcp_connect(
        &self,
        addr: SocketAddr,
        opts: SocketOptions,
    ) -> BoxFuture<'static, io::Result<TcpSocket>> {
        Box::pin(async move {
            let stream = Async::<TcpStream>::connect(addr).await?;
            socket(stream, opts)
        })
    }

    fn tcp_bind(
        &self,
        addr: SocketAddr,
        opts: SocketOptions,
    ) -> io::Result<Box<dyn AsyncListener>> {
        let listener = Async::<TcpListener>::bind(addr)?;
        Ok(Box::new(Listener { listener, opts }))
    }
}

fn socket(stream: Async<TcpStream>, opts: SocketOptions) -> io::Result<TcpSocket> {
    crate::runtime::apply_socket_options(socket2::SockRef::from(stream.get_ref()), &opts)?;
    let local_addr = stream.get_ref().local_addr()?;
    let peer_addr = stream.get_ref().peer_addr()?;
    let stream = Arc::new(stream);
    Ok(TcpSocket {
        reader: Box::new(Half(stream.clone(), opts.busy_poll)),
        writer: Box::new(Half(stream, Duration::ZERO)),
        local_addr,
        peer_addr,
    })
}

#[derive(Debug)]
struct Listener {
    listener: Async<TcpListener>,
    opts: SocketOptions,
}

impl AsyncListener for Listener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpSocket>> {
        loop {
            match self.listener.get_ref().accept() {
                Ok((stream, _)) => {
                    return Poll::Ready(Async::new(stream).and_then(|s| socket(s, self.opts)))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.listener.poll_readable(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.get_ref().local_addr()
    }
}

/// One direction of a shared `Async<TcpStream>`, with the read busy-poll window.
struct Half(Arc<Async<TcpStream>>, Duration);

impl AsyncRead for Half {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(r) = Pin::new(&mut &*self.0).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        if self.1.is_zero() {
            return Poll::Pending;
        }
        let sock = self.0.get_ref();
        crate::runtime::busy_read(self.1, || std::io::Read::read(&mut &*sock, buf))
    }
}

impl AsyncWrite for Half {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_flush(cx)
    }

    /// Shuts down the write direction (FIN); async-io's own `poll_close` only flushes.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut &*self.0).poll_flush(cx))?;
        Poll::Ready(self.0.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

impl SocketRead for Half {
    fn peek_now(&self) -> io::Result<usize> {
        self.0.get_ref().peek(&mut [0u8; 1])
    }

    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::io::Read::read(&mut self.0.get_ref(), buf)
    }
}

impl SocketWrite for Half {
    fn write_now(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        std::io::Write::write_vectored(&mut self.0.get_ref(), bufs)
    }

    fn shutdown_now(&self) -> io::Result<()> {
        self.0.get_ref().shutdown(std::net::Shutdown::Write)
    }
}
