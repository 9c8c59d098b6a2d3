//! What the pool connects with.

use std::future::Future;
use std::net::SocketAddr;

use crate::drivers::tcp::{TcpConfig, TcpTransport};
use crate::error::Result;
use crate::transport::Transport;

/// Creates connections for a [`ConnectionPool`](super::ConnectionPool).
///
/// Implement it for any [`Transport`]: the TCP one is [`TcpConnector`]; an RDMA or
/// in-house transport plugs in the same way.
pub trait Connector: Send + Sync + 'static {
    /// The connection type.
    type Transport: Transport;

    /// Open one connection. The pool bounds it with its connect timeout.
    fn connect(&self) -> impl Future<Output = Result<Self::Transport>> + Send;

    /// Whether an idle connection is still usable (run on checkout when
    /// `test_on_checkout` is set). The default checks [`Transport::is_closed`].
    fn check(&self, conn: &Self::Transport) -> impl Future<Output = bool> + Send {
        let ok = !conn.is_closed();
        async move { ok }
    }
}

/// Connects [`TcpTransport`]s to one address.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    addr: SocketAddr,
    config: TcpConfig,
}

impl TcpConnector {
    /// A connector for `addr` with the default [`TcpConfig`].
    pub fn new(addr: SocketAddr) -> Self {
        TcpConnector {
            addr,
            config: TcpConfig::default(),
        }
    }

    /// A connector for `addr` with `config`.
    pub fn with_config(addr: SocketAddr, config: TcpConfig) -> Self {
        TcpConnector { addr, config }
    }
}

impl Connector for TcpConnector {
    type Transport = TcpTransport;

    async fn connect(&self) -> Result<TcpTransport> {
        TcpTransport::connect_with(self.addr, &self.config).await
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
