//! The small, object-safe boundary between the runtime-free core and an async runtime.
//!
//! The core never names tokio or async-io. What it needs from a runtime (TCP sockets,
//! timers, spawning a task) comes through [`Runtime`], held as `Arc<dyn Runtime>` so no
//! runtime type parameter leaks into connection or pool types. Two adapters implement it,
//! each behind its feature: [`TokioRuntime`](crate::runtime::tokio::TokioRuntime)
//! (feature `tokio`) and [`AsyncIoRuntime`](crate::runtime::async_io::AsyncIoRuntime)
//! (feature `async-std`, for async-std, smol and any other executor). An embedder with
//! its own executor implements `Runtime` itself, or uses `AsyncIoRuntime` with its own
//! spawner.
//!
//! None of these calls is on the per-message path: sockets are polled through the
//! `futures-io` traits the adapter returns ([`SocketRead`], [`SocketWrite`]). Those two
//! also offer calls that go straight to the socket, not through the runtime
//! (`write_now`, `shutdown_now`, `peek_now`): a `send` that finds the connection idle
//! writes with them (no task hop, no waker registered), and they keep working after the
//! runtime has shut down, so queued messages can still be delivered then.

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, ErrorKind, Result};
use crate::transport::BoxFuture;

#[cfg(feature = "async-std")]
pub mod async_io;
#[cfg(feature = "tokio")]
pub mod tokio;

/// The read half of a connected, non-blocking TCP socket.
pub trait SocketRead: AsyncRead + Send + Unpin {
    /// Look at the socket now, without consuming anything and without the runtime (no
    /// waker is registered, and it works after the runtime has shut down).
    ///
    /// `Ok(0)`: the peer has closed its side and everything before that was read;
    /// `Ok(n)`, `n > 0`: bytes are waiting; `Err` of kind `WouldBlock`: nothing has
    /// arrived; any other `Err`: the socket's error (for example `ConnectionReset`).
    fn peek_now(&self) -> io::Result<usize>;

    /// Read now, straight from the socket and not through the runtime (as
    /// [`peek_now`](SocketRead::peek_now), but consuming): `Ok(0)` at the end of the
    /// stream, an `Err` of kind `WouldBlock` when nothing has arrived.
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize>;
}

/// The write half of a connected, non-blocking TCP socket. `poll_close` shuts down the
/// write direction (sends FIN).
pub trait SocketWrite: AsyncWrite + Send + Unpin {
    /// Write now, straight to the socket and not through the runtime: no waker is
    /// registered, and it works after the runtime has shut down. Returns the bytes the
    /// socket took, or an `Err` of kind `WouldBlock` when its buffer is full.
    fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Shut down the write direction (send FIN) straight on the socket.
    fn shutdown_now(&self) -> io::Result<()>;
}

/// The read half of a connected TCP socket.
pub type TcpReader = Box<dyn SocketRead>;
/// The write half of a connected TCP socket.
pub type TcpWriter = Box<dyn SocketWrite>;

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
    /// Kernel TCP keepalive (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`,
    /// `TCP_KEEPCNT`); `None` leaves `SO_KEEPALIVE` off.
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT` (Linux and Android only): how long sent data may stay
    /// unacknowledged before the kernel fails the connection with `ETIMEDOUT`. `None`
    /// leaves the kernel's default (its retransmission limit, about 15 minutes).
    pub user_timeout: Option<Duration>,
}

impl Default for SocketOptions {
    /// `TCP_NODELAY`, no busy-polling, and the keepalive and user timeout of
    /// [`TcpConfig::default`](crate::drivers::tcp::TcpConfig).
    fn default() -> Self {
        SocketOptions {
            nodelay: true,
            busy_poll: Duration::ZERO,
            keepalive: Some(Keepalive::DEFAULT),
            user_timeout: Some(Keepalive::DEFAULT.detection_time()),
        }
    }
}

impl SocketOptions {
    /// Options with `TCP_NODELAY` as given and the given busy-poll window; keepalive
    /// and user timeout as in [`SocketOptions::default`].
    pub fn new(nodelay: bool, busy_poll: Duration) -> Self {
        SocketOptions {
            nodelay,
            busy_poll,
            ..SocketOptions::default()
        }
    }

    /// These options with `keepalive` (`None`: `SO_KEEPALIVE` off).
    pub fn with_keepalive(mut self, keepalive: Option<Keepalive>) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// These options with `TCP_USER_TIMEOUT` set to `timeout` (`None`: the kernel's).
    pub fn with_user_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.user_timeout = timeout;
        self
    }
}

/// Kernel TCP keepalive settings: after `idle` without anything received, the kernel
/// sends a probe every `interval`; when `count` probes in a row go unanswered it fails
/// the connection with `ETIMEDOUT` (a pending `recv` then ends with
/// [`ErrorKind::TimedOut`]). A peer whose host or network vanished is so detected
/// within [`detection_time`](Keepalive::detection_time) of the last thing it sent.
///
/// The kernel counts these in whole seconds (Linux accepts 1 to 32767 s, and 1 to 127
/// probes), so [`Keepalive::new`] rounds sub-second durations up and clamps to those
/// ranges. Probes are answered by the peer's kernel, not its program: a peer process
/// that hangs (or is stopped) on a live host keeps the connection alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    idle: Duration,
    interval: Duration,
    count: u32,
}

impl Keepalive {
    /// The default of [`TcpConfig`](crate::drivers::tcp::TcpConfig): idle 10 s,
    /// interval 2 s, 3 probes, so a vanished peer is detected within 16 s. The
    /// kernel's own defaults (`net.ipv4.tcp_keepalive_time` 7200 s, `_intvl` 75 s,
    /// `_probes` 9) take 2 h 11 min, and keepalive is off for a socket unless set.
    pub const DEFAULT: Keepalive = Keepalive {
        idle: Duration::from_secs(10),
        interval: Duration::from_secs(2),
        count: 3,
    };

    /// Probe after `idle` without input, then every `interval`; give up after `count`
    /// unanswered probes. Durations are rounded up to whole seconds and clamped to
    /// 1..=32767 s, `count` to 1..=127 (the ranges Linux accepts).
    pub fn new(idle: Duration, interval: Duration, count: u32) -> Self {
        Keepalive {
            idle: whole_seconds(idle),
            interval: whole_seconds(interval),
            count: count.clamp(1, 127),
        }
    }

    /// Idle time before the first probe (whole seconds).
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Time between probes (whole seconds).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Unanswered probes before the connection fails.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// `idle + interval * count`: the longest a vanished peer goes unnoticed on an
    /// idle connection (counted from the last segment received from it).
    pub fn detection_time(&self) -> Duration {
        self.idle + self.interval * self.count
    }
}

/// `d` rounded up to whole seconds, within 1..=32767 s.
fn whole_seconds(d: Duration) -> Duration {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Duration::from_secs(secs.clamp(1, 32767))
}

/// Apply `opts` to a connected socket (both adapters, connected and accepted sockets).
#[cfg(any(feature = "tokio", feature = "async-std"))]
pub(crate) fn apply_socket_options(
    sock: socket2::SockRef<'_>,
    opts: &SocketOptions,
) -> io::Result<()> {
    sock.set_tcp_nodelay(opts.nodelay)?;
    match opts.keepalive {
        None => sock.set_keepalive(false)?,
        Some(k) => {
            let params = socket2::TcpKeepalive::new().with_time(k.idle);
            // TCP_KEEPINTVL and TCP_KEEPCNT: elsewhere the system's values stay.
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let params = params.with_interval(k.interval).with_retries(k.count);
            sock.set_tcp_keepalive(&params)?;
        }
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(opts.user_timeout)?;
    Ok(())
}

/// A bound, listening TCP socket of some runtime.
pub trait AsyncListener: Send + Sync + fmt::Debug {
    /// Poll for the next incoming connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpSocket>>;
    /// The address the listener is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// What the core needs from an async runtime.
///
/// # After the runtime has shut down
/// A connection or pool may outlive the runtime it was made on (kept in a static, or a
/// test harness that makes a runtime per test). An implementation must then neither
/// panic nor hang: `spawn` drops the task unpolled, `sleep` completes at once (so every
/// deadline built on it fires), `tcp_connect` fails, and
/// [`is_shut_down`](Runtime::is_shut_down) says so.
pub trait Runtime: Send + Sync + fmt::Debug + 'static {
    /// Run `task` to completion in the background. A task spawned after the runtime
    /// has shut down is dropped without being polled.
    fn spawn(&self, task: BoxFuture<'static, ()>);

    /// A future that completes after `duration` (at once, if the runtime has shut down).
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;

    /// Whether the runtime has shut down: its tasks were dropped and its timers and
    /// sockets no longer work. The default is `false` (a runtime that never ends).
    fn is_shut_down(&self) -> bool {
        false
    }

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
/// * Inside a tokio runtime (feature `tokio`): [`TokioRuntime`](crate::runtime::tokio::TokioRuntime)
///   on the current handle.
/// * Otherwise, with feature `async-std`: the shared
///   [`AsyncIoRuntime`](crate::runtime::async_io::AsyncIoRuntime), which works under
///   async-std, smol, `futures::executor::block_on` or any other executor.
///
/// # Errors
/// [`ErrorKind::Unsupported`] when no adapter applies (no adapter feature enabled, or
/// only `tokio` and no tokio runtime is running).
pub fn default_runtime() -> Result<Arc<dyn Runtime>> {
    #[cfg(feature = "tokio")]
    if let Some(rt) = crate::runtime::tokio::TokioRuntime::try_current() {
        return Ok(Arc::new(rt));
    }
    #[cfg(feature = "async-std")]
    {
        return Ok(crate::runtime::async_io::AsyncIoRuntime::shared());
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
        let spent = start.elapsed();
        if spent >= window {
            return Poll::Pending;
        }
        spin_or_yield(spent);
    }
}

/// How a busy-poll waits between tries: spin at first; after [`SPIN`] give the core
/// away between tries, so a peer (or the writer of the reply) that shares this core
/// still runs (two busy-polling threads on one core would otherwise each burn the
/// whole window before the other sends).
pub(crate) fn spin_or_yield(spent: Duration) {
    if spent < SPIN {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Pure spinning at the start of a busy-poll window.
const SPIN: Duration = Duration::from_micros(20);

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

/// Run `fut` for at most `duration`, timed by `rt`: `Ok` with its output if it finished
/// in time, else an error (and `fut` is dropped, so it is cancelled at its current
/// `.await`). Works the same on every runtime (tokio, async-std, smol, your own), which
/// is what the runtime-specific `tokio::time::timeout` or `async_std::future::timeout`
/// do not. The clock starts when `timeout` is called, not when the future is first
/// polled.
///
/// For a [`Transport`](crate::transport::Transport) call, cancellation is safe per the
/// transport's contract (`recv` loses nothing, an unfinished `send` sends nothing), but
/// a request whose reply is abandoned leaves that reply on the connection: see
/// [`PooledConnection::request`](crate::pool::PooledConnection::request), which discards
/// such a connection. Get a runtime from [`default_runtime`] or
/// [`ConnectionPool::runtime`](crate::pool::ConnectionPool::runtime).
///
/// ```no_run
/// # async fn run() -> net_rs::Result<()> {
/// use std::time::Duration;
/// use net_rs::runtime::{default_runtime, timeout};
/// let rt = default_runtime()?;
/// let n = timeout(&*rt, Duration::from_millis(50), async { 7 }).await?;
/// assert_eq!(n, 7);
/// # Ok(()) }
/// ```
///
/// # Errors
/// * [`ErrorKind::TimedOut`] when `duration` passed first;
/// * [`ErrorKind::Unsupported`] at once if `rt` has already shut down (its timers no
///   longer run, so no deadline could be kept; see [`Runtime::is_shut_down`]).
pub fn timeout<F: std::future::Future>(
    rt: &dyn Runtime,
    duration: Duration,
    fut: F,
) -> impl std::future::Future<Output = Result<F::Output>> {
    use futures::future::{select, Either};
    let sleep = (!rt.is_shut_down()).then(|| rt.sleep(duration));
    async move {
        let Some(sleep) = sleep else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "timeout: the runtime has shut down, its timers no longer run",
            ));
        };
        let fut = std::pin::pin!(fut);
        match select(fut, sleep).await {
            Either::Left((out, _)) => Ok(out),
            Either::Right(((), _)) => Err(Error::new(
                ErrorKind::TimedOut,
                format!("timed out after {duration:?}"),
            )),
        }
    }
}
