//! Settings of a TCP connection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::buffer::HeapPool;
use crate::error::Result;
use crate::runtime::{default_runtime, Keepalive, Runtime, SocketOptions};

/// The default maximum message size: 8 MiB, the same as tokio-util's
/// `LengthDelimitedCodec`.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 8 << 20;

/// Settings of a [`TcpTransport`](super::TcpTransport) or [`TcpListener`](super::TcpListener).
///
/// ```
/// use std::time::Duration;
/// use net_rs::drivers::tcp::TcpConfig;
/// let config = TcpConfig::default()
///     .max_message_size(1 << 20)
///     .connect_timeout(Some(Duration::from_secs(2)));
/// assert_eq!(config.get_max_message_size(), 1 << 20);
/// ```
#[derive(Clone)]
pub struct TcpConfig {
    pub(crate) max_message_size: usize,
    pub(crate) send_buffer: usize,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) linger: Duration,
    pub(crate) nodelay: bool,
    pub(crate) busy_poll: Duration,
    pub(crate) keepalive: Option<Keepalive>,
    pub(crate) user_timeout: UserTimeout,
    pub(crate) pool: HeapPool,
    pub(crate) runtime: Option<Arc<dyn Runtime>>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            send_buffer: 4 << 20,
            connect_timeout: Some(Duration::from_secs(10)),
            linger: Duration::from_secs(10),
            nodelay: true,
            busy_poll: Duration::ZERO,
            keepalive: Some(Keepalive::DEFAULT),
            user_timeout: UserTimeout::FromKeepalive,
            pool: HeapPool::default(),
            runtime: None,
        }
    }
}

impl TcpConfig {
    /// Largest message payload, in bytes, that is sent or accepted (default 8 MiB, at
    /// most `u32::MAX`). Both peers should use the same value.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes.min(crate::codec::MAX_ENCODABLE);
        self
    }

    /// Bytes that `send` may queue ahead of the socket before it waits (default 4 MiB,
    /// so a few large messages can wait behind the one being written).
    /// A message larger than this is still accepted when the queue is empty.
    pub fn send_buffer(mut self, bytes: usize) -> Self {
        self.send_buffer = bytes.max(1);
        self
    }

    /// Deadline for establishing a connection (default 10 s; `None` waits for the OS).
    pub fn connect_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long `close` (or a dropped transport) keeps trying to deliver queued messages
    /// to a peer that does not read (default 10 s).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Set `TCP_NODELAY` (default `true`: net-rs batches frames itself).
    pub fn nodelay(mut self, nodelay: bool) -> Self {
        self.nodelay = nodelay;
        self
    }

    /// Latency mode (default off, zero). When set, `send` writes a message to the socket
    /// right away if nothing else is queued, and `recv`, finding no data, keeps retrying
    /// the read without blocking for up to `window` before it waits for readiness. This
    /// saves the writer-task hop and the wake-up after `epoll` per message, at the cost
    /// of a core spinning while it waits and of other tasks on the same executor thread
    /// waiting up to `window` per empty read. Streaming throughput is lower in this
    /// mode (no batching while the socket keeps up).
    pub fn busy_poll(mut self, window: Duration) -> Self {
        self.busy_poll = window;
        self
    }

    /// Kernel TCP keepalive, so that a peer whose host or network vanished fails the
    /// connection instead of leaving it open for good: after `idle` without input
    /// the kernel probes every `interval`, and after `count` unanswered probes the
    /// connection fails with [`ErrorKind::TimedOut`](crate::ErrorKind::TimedOut)
    /// (a pending `recv` ends with it, and so does every later `send`, `flush` and
    /// `close`). Durations are in whole seconds (sub-second values round up; see
    /// [`Keepalive::new`]). Unless [`user_timeout`](TcpConfig::user_timeout) is set
    /// explicitly, `TCP_USER_TIMEOUT` becomes `idle + interval * count` as well.
    ///
    /// **Default: on, idle 10 s, interval 2 s, 3 probes**: a vanished peer is noticed
    /// within 16 s of the last thing it sent. Without it the kernel sends no probes
    /// at all (`SO_KEEPALIVE` is off by default), and with only `SO_KEEPALIVE` its
    /// defaults (`net.ipv4.tcp_keepalive_time` 7200 s, 9 probes 75 s apart) take over
    /// two hours: a `recv` on a connection whose peer went away in silence (power
    /// loss, a cable pulled, a NAT or firewall entry dropped) would wait that long.
    /// The cost of the default is one 52-byte probe and its answer per 10 s of
    /// silence on each connection. 10 s of idle leaves a slow but live peer plenty of
    /// room: only a peer whose *kernel* stops answering for 6 s after that is given
    /// up. Probes are answered by the peer's kernel, so keepalive does not detect a
    /// peer process that hangs on a live host (see the README, "When the network
    /// fails").
    ///
    /// On Linux and Android all four settings apply; elsewhere `SO_KEEPALIVE` and the
    /// idle time, with the system's interval and count.
    ///
    /// ```
    /// use std::time::Duration;
    /// use net_rs::drivers::tcp::TcpConfig;
    /// let secs = Duration::from_secs;
    /// assert_eq!(TcpConfig::default().get_user_timeout(), Some(secs(16)));
    /// let config = TcpConfig::default().keepalive(secs(5), Duration::from_millis(300), 4);
    /// let k = config.get_keepalive().unwrap();
    /// assert_eq!((k.idle(), k.interval(), k.count()), (secs(5), secs(1), 4));
    /// assert_eq!(config.get_user_timeout(), Some(secs(9)));
    /// let off = config.no_keepalive();
    /// assert_eq!((off.get_keepalive(), off.get_user_timeout()), (None, None));
    /// ```
    pub fn keepalive(mut self, idle: Duration, interval: Duration, count: u32) -> Self {
        self.keepalive = Some(Keepalive::new(idle, interval, count));
        self
    }

    /// Turn kernel keepalive off (and the `TCP_USER_TIMEOUT` derived from it, unless
    /// [`user_timeout`](TcpConfig::user_timeout) set one). A connection whose peer
    /// vanished while it was idle then stays open until the application gives up
    /// (for example with [`timeout`](crate::runtime::timeout)).
    pub fn no_keepalive(mut self) -> Self {
        self.keepalive = None;
        self
    }

    /// `TCP_USER_TIMEOUT` (Linux and Android; ignored elsewhere): how long data we
    /// sent may stay unacknowledged, or queued behind a peer's closed receive window,
    /// before the kernel fails the connection with `ETIMEDOUT` (seen as
    /// [`ErrorKind::TimedOut`](crate::ErrorKind::TimedOut)). `None` leaves the
    /// kernel's default: its retransmission limit (`net.ipv4.tcp_retries2` = 15,
    /// about 15 minutes).
    ///
    /// **Default: the keepalive's `idle + interval * count` (16 s), or none with
    /// keepalive off.** Keepalive alone does not cover a connection with data in
    /// flight (the kernel sends no probes while it retransmits), so a sender to a
    /// vanished peer would wait for the retransmission limit; with the user timeout
    /// both an idle and a busy connection fail within the same time. The price: on
    /// Linux 5.11 and later, a live peer that keeps its receive window closed (reads
    /// nothing) for that long while we have data for it also fails the connection,
    /// which is the same rule [`linger`](TcpConfig::linger) applies at `close`. Set a
    /// larger value (or `None`) for peers that may stop reading for longer and still
    /// be kept.
    pub fn user_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.user_timeout = UserTimeout::Set(timeout);
        self
    }

    /// The configured keepalive (`None`: off).
    pub fn get_keepalive(&self) -> Option<Keepalive> {
        self.keepalive
    }

    /// The `TCP_USER_TIMEOUT` sockets get (`None`: the kernel's default).
    pub fn get_user_timeout(&self) -> Option<Duration> {
        match self.user_timeout {
            UserTimeout::Set(t) => t,
            UserTimeout::FromKeepalive => self.keepalive.map(|k| k.detection_time()),
        }
    }

    pub(crate) fn socket_options(&self) -> SocketOptions {
        SocketOptions::new(self.nodelay, self.busy_poll)
            .with_keepalive(self.keepalive)
            .with_user_timeout(self.get_user_timeout())
    }

    /// The pool that `alloc_buf` and large receives take memory from (default: a fresh
    /// [`HeapPool`] per config, shared by the connections made with it).
    pub fn buffer_pool(mut self, pool: HeapPool) -> Self {
        self.pool = pool;
        self
    }

    /// The runtime for sockets, timers and the writer task (default:
    /// [`default_runtime`]).
    pub fn runtime(mut self, runtime: Arc<dyn Runtime>) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// The configured maximum message size.
    pub fn get_max_message_size(&self) -> usize {
        self.max_message_size
    }

    pub(crate) fn resolve_runtime(&self) -> Result<Arc<dyn Runtime>> {
        match &self.runtime {
            Some(rt) => Ok(rt.clone()),
            None => default_runtime(),
        }
    }
}

/// Where `TCP_USER_TIMEOUT` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UserTimeout {
    /// The keepalive's detection time (none with keepalive off).
    FromKeepalive,
    /// Set by [`TcpConfig::user_timeout`].
    Set(Option<Duration>),
}

impl fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpConfig")
            .field("max_message_size", &self.max_message_size)
            .field("send_buffer", &self.send_buffer)
            .field("connect_timeout", &self.connect_timeout)
            .field("linger", &self.linger)
            .field("nodelay", &self.nodelay)
            .field("busy_poll", &self.busy_poll)
            .field("keepalive", &self.keepalive)
            .field("user_timeout", &self.get_user_timeout())
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}
