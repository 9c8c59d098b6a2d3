//! Settings of a TCP connection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::buffer::HeapPool;
use crate::error::Result;
use crate::runtime::{default_runtime, Runtime, SocketOptions};

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

    pub(crate) fn socket_options(&self) -> SocketOptions {
        SocketOptions::new(self.nodelay, self.busy_poll)
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

impl fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpConfig")
            .field("max_message_size", &self.max_message_size)
            .field("send_buffer", &self.send_buffer)
            .field("connect_timeout", &self.connect_timeout)
            .field("linger", &self.linger)
            .field("nodelay", &self.nodelay)
            .field("busy_poll", &self.busy_poll)
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}
