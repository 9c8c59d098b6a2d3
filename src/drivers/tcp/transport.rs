//! [`TcpTransport`]: one framed TCP connection.

use std::fmt;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;

use super::closing::{Closing, QUIET};
use super::config::TcpConfig;
use super::recv::{Fatal, RecvSide};
use super::send::{writer, SendSide};
use crate::buffer::{Buf, HeapPool};
use crate::codec::encode_header;
use crate::error::{Error, ErrorKind, Result};
use crate::linger::{self, Deliver, Delivery, Registration};
use crate::runtime::{with_timeout, Runtime, TcpSocket};
use crate::transport::{BufferPool, Transport};

/// A message connection over TCP, framed with a 4-byte big-endian length prefix.
///
/// Runtime-agnostic: the socket, timers and the writer task come from the
/// [`Runtime`] in its [`TcpConfig`] (by default tokio inside a tokio runtime, else the
/// async-io adapter). Implements [`Transport`]; for a `futures::Stream`/`Sink` view
/// (like tokio-util's `Framed`) use [`Transport::messages`] or
/// [`Messages`](crate::transport::Messages).
///
/// ```no_run
/// use net_rs::transport::Transport;
/// use net_rs::drivers::tcp::TcpTransport;
///
/// #[tokio::main]
/// async fn main() -> std::io::Result<()> {
///     let transport = TcpTransport::connect("127.0.0.1:8080").await?;
///     let buf = transport.alloc_buf(1024)?;
///     transport.send(buf.freeze()).await?;
///     Ok(())
/// }
/// ```
pub struct TcpTransport {
    shared: Arc<Shared>,
}

struct Shared {
    send: Arc<SendSide>,
    recv: RecvSide,
    /// The connection's failure as either direction was told it.
    broken: Arc<super::Broken>,
    /// For the exit hook: when the peer's bytes were last read and dropped.
    exit_input: Mutex<Option<std::time::Instant>>,
    _registration: Mutex<Option<Registration>>,
    pool: HeapPool,
    max: usize,
    linger: std::time::Duration,
    rt: Arc<dyn Runtime>,
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.send.abandon();
        self.release();
    }
}

/// The process exits while this transport is open (the exit hook's list): write out
/// what `send` accepted and read and drop what the peer sends until it is quiet, so
/// the kernel's close of the socket is not a reset that loses the end of our messages.
impl Deliver for Shared {
    fn deliver_now(&self) -> Delivery {
        let out = self.send.deliver_now();
        let now = std::time::Instant::now();
        let mut last = self.exit_input.lock().unwrap_or_else(|p| p.into_inner());
        match self.recv.discard_now() {
            Some(true) => *last = Some(now),
            Some(false) => {}
            None => return out,
        }
        let quiet = last.is_none_or(|t| now.duration_since(t) >= QUIET.min(self.linger));
        match out {
            Delivery::Done if quiet => Delivery::Done,
            Delivery::Done => Delivery::Blocked,
            other => other,
        }
    }

    fn give_up(&self) {
        self.send.give_up();
    }

    fn linger(&self) -> std::time::Duration {
        self.linger
    }
}

impl Shared {
    /// Stop receiving, and keep the read half open until the socket can close without
    /// a reset that would lose what is still on its way (see `closing.rs`).
    fn release(&self) {
        if let Some((reader, unread)) = self.recv.close(Error::closed("recv")) {
            Closing::new(reader, self.send.clone(), self.linger, unread).start(&self.rt);
        }
    }
}

impl TcpTransport {
    /// Connect to `addr` with the default [`TcpConfig`].
    ///
    /// Each address `addr` resolves to is tried in turn. A host name is resolved with the
    /// system resolver, which blocks the calling thread; pass a [`SocketAddr`] (or a
    /// literal such as `"127.0.0.1:8080"`) where that matters.
    ///
    /// # Errors
    /// `ConnectionRefused`, `TimedOut` (after the connect timeout), `Unsupported` when no
    /// async runtime is available, or the I/O error.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<TcpTransport> {
        Self::connect_with(addr, &TcpConfig::default()).await
    }

    /// Connect to `addr` with `config`.
    ///
    /// # Errors
    /// As [`connect`](TcpTransport::connect).
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        config: &TcpConfig,
    ) -> Result<TcpTransport> {
        let rt = config.resolve_runtime()?;
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        let mut last = Error::new(
            ErrorKind::Io(std::io::ErrorKind::InvalidInput),
            "connect: the address resolved to nothing",
        );
        for a in addrs {
            let attempt = async { Ok(rt.tcp_connect(a, config.socket_options()).await?) };
            match with_timeout(&*rt, config.connect_timeout, "connect", attempt).await {
                Ok(sock) => return Ok(Self::from_socket(sock, config, rt)),
                Err(e) => {
                    last = Error::with_source(
                        e.kind(),
                        format!("connect to {a}: {e}"),
                        std::io::Error::new(e.io_kind(), e),
                    )
                }
            }
        }
        Err(last)
    }

    /// Wrap an already connected socket (from [`Runtime::tcp_connect`] or an
    /// [`AsyncListener`](crate::runtime::AsyncListener)) and start its writer task on `rt`.
    pub fn from_socket(sock: TcpSocket, config: &TcpConfig, rt: Arc<dyn Runtime>) -> TcpTransport {
        let broken = Arc::new(super::Broken::default());
        let send = SendSide::new(
            config.send_buffer,
            config.linger,
            config.busy_poll,
            sock.writer,
            broken.clone(),
        );
        send.register();
        rt.spawn(Box::pin(writer(send.clone(), rt.clone())));
        let shared = Arc::new(Shared {
            send,
            recv: RecvSide::new(
                sock.reader,
                config.max_message_size,
                config.pool.clone(),
                broken.clone(),
            ),
            broken,
            exit_input: Mutex::new(None),
            _registration: Mutex::new(None),
            pool: config.pool.clone(),
            max: config.max_message_size,
            linger: config.linger,
            rt,
            local_addr: sock.local_addr,
            peer_addr: sock.peer_addr,
        });
        let listed: Weak<dyn Deliver> = Arc::downgrade(&(shared.clone() as Arc<dyn Deliver>));
        *shared
            ._registration
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(linger::register(listed));
        TcpTransport { shared }
    }

    fn poll_recv(&self, cx: &mut Context<'_>, slot: &mut Option<usize>) -> Poll<Result<Bytes>> {
        if self.shared.send.uncorks_on_recv() {
            self.shared.send.uncork();
        }
        let (res, fatal) = self.shared.recv.poll_recv(cx, slot);
        match (&res, fatal) {
            (Poll::Pending, _) => self.shared.send.uncork(),
            // Receiving ended because the runtime is gone, not because the socket
            // broke: what was sent is still delivered (by the linger thread).
            (_, Fatal::Broken(_)) if self.shared.rt.is_shut_down() => {}
            (_, Fatal::CloseConnection) => self.shared.send.abort(),
            // The socket is broken both ways: a later `send` must not say `Ok`.
            (_, Fatal::Broken(e)) => self.shared.send.fail(e),
            (Poll::Ready(Err(e)), Fatal::No)
                if matches!(e.kind(), ErrorKind::Closed | ErrorKind::UnexpectedEof) =>
            {
                // An end of stream after the connection failed is not the peer's end:
                // the socket reports its error once, to whichever call comes first,
                // and reads then only see an end. A write that got it records it
                // while it holds the socket's write half: wait for one in progress.
                self.shared.send.settle();
                if let Some(e) = self
                    .shared
                    .broken
                    .get()
                    .or_else(|| self.shared.send.failure())
                {
                    self.shared.recv.end_was(e.clone());
                    return Poll::Ready(Err(e));
                }
            }
            _ => {}
        }
        res
    }

    /// The runtime to time `close` with: the connection's own, or, once that has shut
    /// down, the caller's (none: the linger thread's deadline bounds the wait).
    fn timer(&self) -> Option<Arc<dyn Runtime>> {
        let rt = &self.shared.rt;
        if !rt.is_shut_down() {
            return Some(rt.clone());
        }
        crate::runtime::default_runtime()
            .ok()
            .filter(|rt| !rt.is_shut_down())
    }
}

/// The future of [`TcpTransport::recv`]; owns nothing but its place in the wait list.
struct Recv<'a> {
    transport: &'a TcpTransport,
    slot: Option<usize>,
}

impl Future for Recv<'_> {
    type Output = Result<Bytes>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Bytes>> {
        let this = &mut *self;
        this.transport.poll_recv(cx, &mut this.slot)
    }
}

impl Drop for Recv<'_> {
    fn drop(&mut self) {
        self.transport.shared.recv.cancel(&mut self.slot);
    }
}

impl Transport for TcpTransport {
    fn send(&self, msg: Bytes) -> impl Future<Output = Result<()>> + Send + '_ {
        let header = encode_header(msg.len(), self.shared.max);
        self.shared.send.send(header, msg)
    }

    fn recv(&self) -> impl Future<Output = Result<Bytes>> + Send + '_ {
        Recv {
            transport: self,
            slot: None,
        }
    }

    fn flush(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        let target = self.shared.send.accepted_total();
        let mut listener = None;
        futures::future::poll_fn(move |cx| self.shared.send.poll_flushed(cx, target, &mut listener))
    }

    fn shutdown(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        self.shared.send.shutdown();
        let mut listener = None;
        futures::future::poll_fn(move |cx| self.shared.send.poll_finished(cx, &mut listener))
    }

    async fn close(&self) -> Result<()> {
        let s = &self.shared;
        let res = match self.timer() {
            Some(rt) => with_timeout(&*rt, Some(s.linger), "close", self.shutdown()).await,
            None => self.shutdown().await,
        };
        // Delivered and FIN sent, or given up: drop what is left either way, and let
        // the socket go (a writer waiting for room is woken to drop it). Given up, the
        // error stays: a later `flush`, `shutdown` or `close` reports it at once.
        match &res {
            Ok(()) => s.send.abort(),
            Err(e) => s.send.fail(e.clone()),
        }
        s.release();
        res
    }

    fn alloc_buf(&self, len: usize) -> Result<Buf> {
        if len > self.shared.max {
            return Err(crate::codec::too_large(len as u64, self.shared.max, false));
        }
        self.shared.pool.alloc(len)
    }

    fn max_message_size(&self) -> usize {
        self.shared.max
    }

    fn is_closed(&self) -> bool {
        self.shared.send.is_closed() || self.shared.recv.peer_ended()
    }

    fn has_unread(&self) -> bool {
        self.shared.recv.has_unread()
    }

    fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.shared.local_addr)
    }

    fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.shared.peer_addr)
    }
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("local_addr", &self.shared.local_addr)
            .field("peer_addr", &self.shared.peer_addr)
            .field("max_message_size", &self.shared.max)
            .field("closed", &self.is_closed())
            .finish()
    }
}
