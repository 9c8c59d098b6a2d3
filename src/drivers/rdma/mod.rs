//! The RDMA driver (feature `rdma`), on sideway. The only module that imports sideway.
//!
//! * [`connect`], [`connect_with`], [`listen`] and [`RdmaListener`]: the public face,
//!   returning [`RdmaTransport`]s (also at their old paths under [`cm`]).
//! * [`cm`]: the queue-pair setup with RDMA-CM underneath.
//! * [`config`]: [`RdmaConfig`] and the queue and memory sizes derived from it.
//! * [`transport`]: the `Transport` itself: hello, credits, fragments, the pump.
//! * `recv_pool`: the pre-posted receive buffers, posted again in batches.
//! * `buffer`: registered memory as `Bytes`: lent receive buffers, and fragments sent
//!   in place or through a bounce slot.
//! * `slab_allocator`: the slab over memory registered with the context's PD.
//! * [`context`]: the device and protection domain, with a clear
//!   [`Unsupported`](crate::ErrorKind::Unsupported) error when there is no device or
//!   no rdma-core, and a [`Slab`](crate::mem::Slab) over registered memory.
//! * [`poller`]: a completion queue as the reactor's completion source.
//! * `device`: one completion poller thread per device, driving the CQs of all its
//!   connections.
//! * `events`: RDMA-CM events after setup (peer disconnected or dead) routed to the
//!   connection they concern.
//! * `wire`: everything on the wire or in a `wr_id`, typed: the immediate data, the
//!   hello, the work-request numbering.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use cm::CmListener;
use config::RdmaConfig;
use transport::RdmaTransport;

mod buffer;
pub mod cm;
pub mod config;
pub mod context;
mod device;
mod events;
pub mod poller;
mod recv_pool;
mod slab_allocator;
pub mod transport;
// Its items are `pub` so that `crate::fuzzing` can re-export them to the fuzz targets
// (`--cfg fuzzing`); in every other build they are private to the driver.
#[cfg_attr(not(fuzzing), allow(unreachable_pub))]
pub(crate) mod wire;

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

    /// Wait up to `timeout` for the next connection.
    ///
    /// # Errors
    /// `TimedOut`, or the error of setting the connection up.
    pub async fn accept(&self, timeout: Duration) -> Result<RdmaTransport> {
        let (l, cfg) = (self.inner.clone(), self.config.clone());
        off_thread("net-rs-rdma-accept", move || {
            RdmaTransport::accept_blocking(&l, timeout, cfg)
        })
        .await
    }
}
