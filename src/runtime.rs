//! The small, object-safe boundary between the runtime-free core and an async runtime.
//!
//! The core never names tokio or async-io. What it needs from a runtime (TCP sockets,
//! timers, spawning a task) comes through [`Runtime`], held as `Arc<dyn Runtime>` so no
//! runtime type parameter leaks into connection or pool types. The adapters in
//! `adapters/` implement it: [`TokioRuntime`](crate::adapters::tokio::TokioRuntime)
//! (feature `tokio`) and [`AsyncIoRuntime`](crate::adapters::async_io::AsyncIoRuntime)
//! (feature `async-std`, for async-std, smol and any other executor). An embedder with
//! its own executor implements `Runtime` itself, or uses `AsyncIoRuntime` with its own
//! spawner.
//!
//! None of these calls is on the per-message path: sockets are polled through the
//! `futures-io` traits the adapter returns.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, ErrorKind, Result};
use crate::transport::BoxFuture;

/// The read half of a connected TCP socket.
pub type TcpReader = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connected TCP socket. `poll_close` shuts down the write
/// direction (sends FIN).
pub type TcpWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// A connected, non-blocking TCP socket, split into halves that can be used from
/// different tasks.
pub struct TcpSocket {
    /// Read half.
    pub reader: TcpReader,
    /// Write half.
    pub writer: TcpWriter,
    /// Local address.
    pub local_addr: SocketAddr,
    /// Peer address.
    pub peer_addr: SocketAddr,
}

impl fmt::Debug for TcpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpSocket")
            .field("local_addr", &self.local_addr)
            .field("peer_addr", &self.peer_addr)
            .finish_non_exhaustive()
    }
}

/// Options applied to every TCP socket a [`Runtime`] connects or accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SocketOptions {
    /// Set `TCP_NODELAY`.
    pub nodelay: bool,
    /// When a read finds no data, keep retrying it without blocking for this long
    /// before waiting for readiness (zero: never). Trades a busy core for latency.
    pub busy_poll: Duration,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            nodelay: true,
            busy_poll: Duration::ZERO,
        }
    }
}

impl SocketOptions {
    /// Options with `TCP_NODELAY` as given and the given busy-poll window.
    pub fn new(nodelay: bool, busy_poll: Duration) -> Self {
        SocketOptions { nodelay, busy_poll }
    }
}

/// A bound, listening TCP socket of some runtime.
pub trait AsyncListener: Send + Sync + fmt::Debug {
    /// Poll for the next incoming connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpSocket>>;
    /// The address the listener is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// What the core needs from an async runtime.
pub trait Runtime: Send + Sync + fmt::Debug + 'static {
    /// Run `task` to completion in the background.
    fn spawn(&self, task: BoxFuture<'static, ()>);

    /// A future that completes after `duration`.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;

    /// The current time. Tests may override it to simulate time.
    fn now(&self) -> Instant {
        Instant::now()
    }

    /// Connect a TCP socket to `addr`, applying `opts`.
    fn tcp_connect(
        &self,
        addr: SocketAddr,
        opts: SocketOptions,
    ) -> BoxFuture<'static, io::Result<TcpSocket>>;

    /// Bind a listening TCP socket to `addr`; accepted sockets get `opts`.
    fn tcp_bind(&self, addr: SocketAddr, opts: SocketOptions)
        -> io::Result<Box<dyn AsyncListener>>;
}

/// The runtime to use when none is given explicitly.
///
/// * Inside a tokio runtime (feature `tokio`): [`TokioRuntime`](crate::adapters::tokio::TokioRuntime)
///   on the current handle.
/// * Otherwise, with feature `async-std`: the shared
///   [`AsyncIoRuntime`](crate::adapters::async_io::AsyncIoRuntime), which works under
///   async-std, smol, `futures::executor::block_on` or any other executor.
///
/// # Errors
/// [`ErrorKind::Unsupported`] when no adapter applies (no adapter feature enabled, or
/// only `tokio` and no tokio runtime is running).
pub fn default_runtime() -> Result<Arc<dyn Runtime>> {
    #[cfg(feature = "tokio")]
    if let Some(rt) = crate::adapters::tokio::TokioRuntime::try_current() {
        return Ok(Arc::new(rt));
    }
    #[cfg(feature = "async-std")]
    {
        return Ok(crate::adapters::async_io::AsyncIoRuntime::shared());
    }
    #[allow(unreachable_code)]
    Err(Error::new(
        ErrorKind::Unsupported,
        "no async runtime: call from inside a tokio runtime (feature `tokio`), enable \
         feature `async-std` (async-std, smol, any executor), or pass a Runtime explicitly",
    ))
}

#[cfg(any(feature = "tokio", feature = "async-std"))]
/// Retry a non-blocking `read` for up to `window`: `Ready` with its result, or
/// `Pending` if it kept finding no data (the caller has registered its waker already).
pub(crate) fn busy_read(
    window: Duration,
    mut read: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    let start = Instant::now();
    loop {
        match read() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return Poll::Ready(r),
        }
        if start.elapsed() >= window {
            return Poll::Pending;
        }
        std::hint::spin_loop();
    }
}

/// Run `fut` with a deadline from `rt`; `None` means no deadline.
pub(crate) async fn with_timeout<T>(
    rt: &dyn Runtime,
    timeout: Option<Duration>,
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use futures::future::{select, Either};
    let Some(d) = timeout else { return fut.await };
    let fut = std::pin::pin!(fut);
    match select(fut, rt.sleep(d)).await {
        Either::Left((r, _)) => r,
        Either::Right(((), _)) => Err(Error::new(
            ErrorKind::TimedOut,
            format!("{what} timed out after {d:?}"),
        )),
    }
}
