//! The public face of the RDMA driver: [`connect`], [`connect_with`], [`listen`] and
//! [`RdmaListener`] (re-exported at `drivers::rdma` and, for older code, `cm`). Each
//! blocking RDMA-CM step runs on a thread of its own, so no async runtime is needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::cm::CmListener;
use super::config::RdmaConfig;
use super::transport::RdmaTransport;
use crate::error::{Error, ErrorKind, Result};

/// Run a blocking RDMA-CM step on its own thread and await its result: no runtime needed.
async fn off_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(Error::from)?;
    rx.await.unwrap_or_else(|_| {
        Err(Error::new(
            ErrorKind::Io(std::io::ErrorKind::Other),
            "the RDMA-CM thread died",
        ))
    })
}

/// Connect an [`RdmaTransport`] to `addr` with the
/// default [`RdmaConfig`], within `timeout`.
///
/// # Errors
/// `ConnectionRefused` (no listener), `TimedOut`, `Unsupported` (no RDMA here).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<RdmaTransport> {
    connect_with(addr, timeout, RdmaConfig::default()).await
}

/// [`connect`] with a configuration.
///
/// # Errors
/// As [`connect`].
pub async fn connect_with(
    addr: SocketAddr,
    timeout: Duration,
    cfg: RdmaConfig,
) -> Result<RdmaTransport> {
    off_thread("net-rs-rdma-connect", move || {
        RdmaTransport::connect_blocking(addr, timeout, cfg)
    })
    .await
}

/// Listen for RDMA connections on `addr` (a local IP of an RDMA device or `0.0.0.0`).
///
/// # Errors
/// As [`CmListener::bind`].
pub fn listen(addr: SocketAddr) -> Result<RdmaListener> {
    Ok(RdmaListener {
        inner: Arc::new(CmListener::bind(addr)?),
        config: RdmaConfig::default(),
    })
}

/// Accepts [`RdmaTransport`]s.
#[derive(Debug)]
pub struct RdmaListener {
    inner: Arc<CmListener>,
    config: RdmaConfig,
}

impl RdmaListener {
    /// Use `config` for accepted connections.
    pub fn with_config(mut self, config: RdmaConfig) -> Self {
        self.config = config;
        self
    }

    /// Wait up to `timeout` for the next connection. A request that went stale while it
    /// waited (its peer gave up, or the link went down meanwhile) is dropped and the
    /// wait goes on.
    ///
    /// # Errors
    /// `TimedOut`, or the error of setting up the one connection being accepted (its
    /// peer vanished during the handshake, registered memory ran out): the listener
    /// keeps working, so a server logs it and accepts again.
    pub async fn accept(&self, timeout: Duration) -> Result<RdmaTransport> {
        let (l, cfg) = (self.inner.clone(), self.config.clone());
        off_thread("net-rs-rdma-accept", move || {
            RdmaTransport::accept_blocking(&l, timeout, cfg)
        })
        .await
    }
}
