//! The public face of the RDMA driver: [`connect`], [`connect_with`], [`listen`] and
//! [`RdmaListener`] (re-exported at `drivers::rdma` and, for older code, `cm`). Each
//! blocking RDMA-CM step runs on a thread of its own, so no async runtime is needed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::oneshot;

use super::cm::CmListener;
use super::config::RdmaConfig;
use super::transport::RdmaTransport;
use crate::error::{Error, ErrorKind, Result};

fn thread_died() -> Error {
    Error::new(
        ErrorKind::Io(std::io::ErrorKind::Other),
        "the RDMA-CM thread died",
    )
}

/// Run a blocking RDMA-CM step on its own thread and await its result: no runtime needed.
async fn off_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(Error::from)?;
    rx.await.unwrap_or_else(|_| Err(thread_died()))
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
        ready: Arc::default(),
    })
}

/// Connections set up for an [`RdmaListener::accept`] whose caller had stopped waiting.
type Ready = Arc<Mutex<VecDeque<RdmaTransport>>>;

fn push(ready: &Ready, t: RdmaTransport) {
    ready.lock().unwrap_or_else(|p| p.into_inner()).push_back(t);
}

/// Accepts [`RdmaTransport`]s.
#[derive(Debug)]
pub struct RdmaListener {
    inner: Arc<CmListener>,
    config: RdmaConfig,
    /// Connections an accept set up after its caller stopped waiting (its future was
    /// dropped): the next `accept` returns them first, so none is torn down behind its
    /// peer's back.
    ready: Ready,
}

/// The wait of one `accept`: if it is dropped before its connection arrived, the
/// connection (now or when its thread finishes) goes to the listener's ready queue.
struct Waiting {
    rx: oneshot::Receiver<Result<RdmaTransport>>,
    ready: Ready,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // After `close` the thread's `send` fails and it queues the connection itself;
        // one sent before is still here to take.
        self.rx.close();
        if let Ok(Some(Ok(t))) = self.rx.try_recv() {
            push(&self.ready, t);
        }
    }
}

impl RdmaListener {
    /// Use `config` for accepted connections.
    pub fn with_config(mut self, config: RdmaConfig) -> Self {
        self.config = config;
        self
    }

    /// Wait up to `timeout` for the next connection's request; a request taken within
    /// it is then set up in up to [`RdmaConfig::handshake_timeout`] more. A request
    /// that went stale while it waited (its peer gave up, or the link went down
    /// meanwhile) is dropped and the wait goes on.
    ///
    /// Cancel-safe: if this future is dropped (a `select!`, a timeout around it) after
    /// a connection was taken, that connection is kept for the next `accept`, never
    /// torn down behind its peer's back. So a server may accept in a loop with a short
    /// timeout, or race `accept` against a shutdown signal, and lose no connection.
    ///
    /// # Errors
    /// `TimedOut`, or the error of setting up the one connection being accepted (its
    /// peer vanished during the handshake, registered memory ran out): the listener
    /// keeps working, so a server logs it and accepts again.
    pub async fn accept(&self, timeout: Duration) -> Result<RdmaTransport> {
        if let Some(t) = self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        {
            return Ok(t);
        }
        let (l, cfg) = (self.inner.clone(), self.config.clone());
        let (tx, rx) = oneshot::channel();
        let ready = self.ready.clone();
        std::thread::Builder::new()
            .name("net-rs-rdma-accept".into())
            .spawn(move || {
                let r = RdmaTransport::accept_blocking(&l, timeout, cfg);
                if let Err(Ok(t)) = tx.send(r) {
                    push(&ready, t);
                }
            })
            .map_err(Error::from)?;
        let mut waiting = Waiting {
            rx,
            ready: self.ready.clone(),
        };
        (&mut waiting.rx)
            .await
            .unwrap_or_else(|_| Err(thread_died()))
    }
}
