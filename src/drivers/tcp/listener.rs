//! [`TcpListener`]: accepts framed TCP connections.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use super::config::TcpConfig;
use super::transport::TcpTransport;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{AsyncListener, Runtime};

/// A listening TCP socket whose connections are [`TcpTransport`]s.
///
/// ```no_run
/// use net_rs::drivers::tcp::TcpListener;
/// use net_rs::transport::Transport;
///
/// # async fn run() -> std::io::Result<()> {
/// let listener = TcpListener::bind("127.0.0.1:0").await?;
/// println!("listening on {}", listener.local_addr()?);
/// loop {
///     let conn = listener.accept().await?;
///     tokio::spawn(async move {
///         while let Ok(msg) = conn.recv().await {
///             if conn.send(msg).await.is_err() {
///                 break;
///             }
///         }
///     });
/// }
/// # }
/// ```
pub struct TcpListener {
    inner: Box<dyn AsyncListener>,
    config: TcpConfig,
    rt: Arc<dyn Runtime>,
}

impl TcpListener {
    /// Bind to `addr` with the default [`TcpConfig`].
    ///
    /// Each address `addr` resolves to is tried in turn.
    ///
    /// # Errors
    /// The bind error of the last address tried (kind `Io(AddrInUse)`,
    /// `Io(PermissionDenied)`, ...; its message names that address, e.g.
    /// `bind 127.0.0.1:80: Permission denied (os error 13)`), the resolver's error, or
    /// `Unsupported` when no runtime is available.
    pub async fn bind(addr: impl ToSocketAddrs) -> Result<TcpListener> {
        Self::bind_with(addr, &TcpConfig::default()).await
    }

    /// Bind to `addr`; accepted connections use `config`.
    ///
    /// # Errors
    /// As [`bind`](TcpListener::bind).
    pub async fn bind_with(addr: impl ToSocketAddrs, config: &TcpConfig) -> Result<TcpListener> {
        let rt = config.resolve_runtime()?;
        let mut last = Error::new(
            ErrorKind::Io(std::io::ErrorKind::InvalidInput),
            "bind: the address resolved to nothing",
        );
        for a in addr.to_socket_addrs()? {
            match rt.tcp_bind(a, config.socket_options()) {
                Ok(inner) => {
                    return Ok(TcpListener {
                        inner,
                        config: config.clone(),
                        rt,
                    })
                }
                Err(e) => last = Error::io_context(format_args!("bind {a}"), e),
            }
        }
        Err(last)
    }

    /// Wait for the next connection.
    ///
    /// # Errors
    /// The accept error. The listener stays usable after errors such as `EMFILE` (out
    /// of file descriptors), which last until connections close: a loop that goes on
    /// accepting after an error should wait a little first (a few ms, longer while
    /// errors follow each other), or it spins a core on failed accepts.
    /// `net_rs::grpc::tcp_incoming` does so.
    pub async fn accept(&self) -> Result<TcpTransport> {
        let sock = futures::future::poll_fn(|cx| self.inner.poll_accept(cx)).await?;
        Ok(TcpTransport::from_socket(
            sock,
            &self.config,
            self.rt.clone(),
        ))
    }

    /// The runtime the listener and its connections run on.
    #[cfg(feature = "grpc")]
    pub(crate) fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.rt
    }

    /// The bound address (with the port the OS chose for port 0).
    ///
    /// # Errors
    /// The OS error, if the address cannot be read.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.inner.local_addr()?)
    }
}

impl fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpListener")
            .field("local_addr", &self.inner.local_addr().ok())
            .field("config", &self.config)
            .finish()
    }
}
