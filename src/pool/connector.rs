//! What the pool connects with.

use std::fmt;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use crate::drivers::tcp::{TcpConfig, TcpTransport};
use crate::error::{Error, Result};
use crate::transport::Transport;

/// Creates connections for a [`ConnectionPool`](super::ConnectionPool).
///
/// Implement it for any [`Transport`]: the TCP one is [`TcpConnector`]; an RDMA or
/// in-house transport plugs in the same way.
pub trait Connector: Send + Sync + 'static {
    /// The connection type.
    type Transport: Transport;

    /// Open one connection.
    ///
    /// It must not block its thread (do blocking work on a thread of your own and await
    /// it): the pool's timeouts cancel a future at an `.await`, and on a single-threaded
    /// executor nothing else runs while it blocks, so a connector that blocks for two
    /// seconds makes `get()` take two seconds whatever `checkout_timeout` says.
    ///
    /// The pool bounds it with its
    /// [`connect_timeout`](super::PoolConfig::connect_timeout) (cut short by what is left
    /// of the checkout timeout) and drops the future when that passes or the checkout is
    /// cancelled. An error is retried per the pool's
    /// [`ReconnectPolicy`](super::ReconnectPolicy) only if it is
    /// [transient](super::is_transient): return `Unsupported` (or another permanent
    /// kind) for what no retry can fix, and the checkout fails at once.
    fn connect(&self) -> impl Future<Output = Result<Self::Transport>> + Send;

    /// Whether an idle connection is still usable, for what only the protocol can tell
    /// (for example a ping); run on checkout when
    /// [`test_on_checkout`](super::PoolConfig::test_on_checkout) is set, after the
    /// pool's own probes ([`Transport::is_closed`], [`Transport::has_unread`]) passed.
    /// The default checks [`Transport::is_closed`] again.
    ///
    /// The pool bounds it with what is left of the checkout timeout and may drop it at
    /// any `.await`; the connection is then discarded, so a check that sent a ping and
    /// was cut off before the answer never leaves that answer to the next user.
    fn check(&self, conn: &Self::Transport) -> impl Future<Output = bool> + Send {
        let ok = !conn.is_closed();
        async move { ok }
    }
}

/// An address a [`TcpConnector`] resolves at each connect.
trait Target: Send + Sync + fmt::Debug + 'static {
    fn resolve(&self) -> std::io::Result<Vec<SocketAddr>>;
    /// The addresses, if they are literal (no name to look up: resolving cannot block).
    fn literal(&self) -> Option<Vec<SocketAddr>>;
}

impl<A: ToSocketAddrs + Send + Sync + fmt::Debug + 'static> Target for A {
    fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        Ok(self.to_socket_addrs()?.collect())
    }

    fn literal(&self) -> Option<Vec<SocketAddr>> {
        let any = self as &dyn std::any::Any;
        if let Some(a) = any.downcast_ref::<SocketAddr>() {
            return Some(vec![*a]);
        }
        if let Some(a) = any.downcast_ref::<Vec<SocketAddr>>() {
            return Some(a.clone());
        }
        if let Some((ip, port)) = any.downcast_ref::<(std::net::IpAddr, u16)>() {
            return Some(vec![SocketAddr::new(*ip, *port)]);
        }
        let text = any
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| any.downcast_ref::<&'static str>().copied())?;
        text.parse::<SocketAddr>().ok().map(|a| vec![a])
    }
}

/// Connects [`TcpTransport`]s to one address.
///
/// The address is anything [`TcpTransport::connect`] accepts that the connector can
/// own: a [`SocketAddr`], a `String` or `&'static str` such as `"db.local:5432"`, a
/// `(host, port)` pair with an owned or static host, an `(IpAddr, u16)`, ... It is
/// resolved at each connect, not at construction: a server that comes back at another
/// address after a restart (a new container, a DNS change) is found, and a name that
/// does not resolve yet is a connect error the pool retries (see
/// [`is_transient`](super::is_transient)), not a construction error. A host name is
/// resolved with the system resolver on a thread of its own (it blocks), so the
/// checkout's timeout bounds it and the executor's thread is never held; a literal
/// address needs no lookup. Each address it resolves to is tried in turn.
///
/// Timeouts: the pool's [`connect_timeout`](super::PoolConfig::connect_timeout) bounds
/// the whole connect (every address); the [`TcpConfig::connect_timeout`] given with
/// [`with_config`](TcpConnector::with_config) (10 s by default, like the pool's) bounds
/// each address within it. Whichever expires first ends the attempt.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    addr: Arc<dyn Target>,
    config: TcpConfig,
}

impl TcpConnector {
    /// A connector for `addr` with the default [`TcpConfig`].
    pub fn new(addr: impl ToSocketAddrs + Send + Sync + fmt::Debug + 'static) -> Self {
        Self::with_config(addr, TcpConfig::default())
    }

    /// A connector for `addr` with `config`.
    pub fn with_config(
        addr: impl ToSocketAddrs + Send + Sync + fmt::Debug + 'static,
        config: TcpConfig,
    ) -> Self {
        TcpConnector {
            addr: Arc::new(addr),
            config,
        }
    }
}

impl Connector for TcpConnector {
    type Transport = TcpTransport;

    /// Resolve the address, then connect to each address in turn.
    ///
    /// # Errors
    /// As [`TcpTransport::connect_with`]; a name that cannot be resolved is an `Io`
    /// error whose message names the address.
    async fn connect(&self) -> Result<TcpTransport> {
        let addrs = match self.addr.literal() {
            Some(addrs) => addrs,
            None => {
                // A name: the system resolver blocks, so it runs on a thread of its own
                // and the checkout's timeout still bounds the wait.
                let target = self.addr.clone();
                let (tx, rx) = futures::channel::oneshot::channel();
                std::thread::Builder::new()
                    .name("net-rs-resolve".into())
                    .spawn(move || {
                        let _ = tx.send(target.resolve());
                    })
                    .map_err(Error::from)?;
                let resolved = rx
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::other("the resolver thread died")));
                resolved.map_err(|e| {
                    let kind = Error::from(std::io::Error::from(e.kind())).kind();
                    Error::with_source(kind, format!("resolve {:?}: {e}", self.addr), e)
                })?
            }
        };
        TcpTransport::connect_with(&addrs[..], &self.config).await
    }
}

/// Connects [`RdmaTransport`](crate::drivers::rdma::transport::RdmaTransport)s to one
/// address with RDMA-CM (feature `rdma`).
#[cfg(feature = "rdma")]
#[derive(Debug, Clone)]
pub struct RdmaConnector {
    addr: SocketAddr,
    timeout: std::time::Duration,
    config: crate::drivers::rdma::transport::RdmaConfig,
}

#[cfg(feature = "rdma")]
impl RdmaConnector {
    /// A connector for `addr`; each connection attempt may take up to `timeout`.
    pub fn new(addr: SocketAddr, timeout: std::time::Duration) -> Self {
        RdmaConnector {
            addr,
            timeout,
            config: Default::default(),
        }
    }
}

#[cfg(feature = "rdma")]
impl Connector for RdmaConnector {
    type Transport = crate::drivers::rdma::transport::RdmaTransport;

    async fn connect(&self) -> Result<Self::Transport> {
        crate::drivers::rdma::cm::connect_with(self.addr, self.timeout, self.config.clone()).await
    }
}
