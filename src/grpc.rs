//! gRPC with tonic over any net-rs transport (feature `grpc`): a client connector and
//! a server's incoming stream, both of [`ByteStream`]s.
//!
//! * [`GrpcConnector`] is the `tower::Service<Uri>` tonic's
//!   `Endpoint::connect_with_connector` takes. Each connection tonic asks for is
//!   checked out of a [`ConnectionPool`] and taken out of it for good
//!   ([`PooledConnection::detach`](crate::pool::PooledConnection::detach): an HTTP/2
//!   connection is never handed to another user), so the pool's connect timeout,
//!   [`ReconnectPolicy`](crate::pool::ReconnectPolicy) and back-off apply: a refused or
//!   rejected connect is retried by the policy until the pool's checkout timeout, and
//!   tonic's channel asks again after a connection it had was lost. The URI tonic
//!   passes is not used: the pool's connector knows the peer (TCP or RDMA).
//! * [`tcp_incoming`] and `rdma_incoming` (feature `rdma`) turn a net-rs listener into
//!   the stream `Server::serve_with_incoming` takes. [`ByteStream`] implements tonic's
//!   `Connected` with tonic's own `TcpConnectInfo`, so `Request::remote_addr` works in
//!   handlers over TCP; over RDMA it is `None` (sideway 0.4.3 exposes no address of an
//!   RDMA-CM connection, see `RdmaTransport::peer_addr`).
//!
//! tonic runs on tokio (its channel and server spawn tokio tasks), so gRPC needs a
//! tokio runtime; the net-rs transports under it need nothing else.
//!
//! ```no_run
//! use std::time::Duration;
//! use net_rs::grpc::GrpcConnector;
//! use net_rs::pool::{ConnectionPool, PoolConfig, ReconnectPolicy, TcpConnector};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = ConnectionPool::new(
//!     TcpConnector::new("127.0.0.1:50051"),
//!     PoolConfig::default()
//!         .checkout_timeout(Duration::from_secs(10))
//!         .reconnect(ReconnectPolicy::exponential(
//!             Duration::from_millis(50),
//!             Duration::from_secs(2),
//!         )),
//! )?;
//! // The URI is for HTTP/2 (`:authority`); the pool's connector picks the peer.
//! let channel = tonic::transport::Endpoint::from_static("http://greeter")
//!     .connect_with_connector(GrpcConnector::new(pool))
//!     .await?;
//! // Use `channel` with a generated client: `GreeterClient::new(channel)`.
//! # drop(channel);
//! # Ok(())
//! # }
//! ```

use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tonic::codegen::http::Uri;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::drivers::tcp::{TcpListener, TcpTransport};
use crate::error::{Error, Result};
use crate::pool::{ConnectionPool, Connector};
use crate::stream::{ByteStream, StreamConfig};
use crate::transport::{BoxFuture, Transport};

/// A tonic connector over a [`ConnectionPool`]: see the [module documentation](self).
pub struct GrpcConnector<C: Connector> {
    pool: ConnectionPool<C>,
    config: StreamConfig,
}

impl<C: Connector> GrpcConnector<C> {
    /// Open tonic's connections through `pool`.
    pub fn new(pool: ConnectionPool<C>) -> Self {
        GrpcConnector {
            pool,
            config: StreamConfig::default(),
        }
    }

    /// The settings of each connection's [`ByteStream`].
    pub fn stream_config(mut self, config: StreamConfig) -> Self {
        self.config = config;
        self
    }
}

impl<C: Connector> Clone for GrpcConnector<C> {
    fn clone(&self) -> Self {
        GrpcConnector {
            pool: self.pool.clone(),
            config: self.config.clone(),
        }
    }
}

impl<C: Connector> std::fmt::Debug for GrpcConnector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcConnector")
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl<C: Connector> tower_service::Service<Uri> for GrpcConnector<C> {
    type Response = ByteStream<C::Transport>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<ByteStream<C::Transport>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// # Errors
    /// The pool's checkout error (the last connect error once the policy gave up, or
    /// `TimedOut`).
    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (pool, config) = (self.pool.clone(), self.config.clone());
        Box::pin(async move {
            let conn = pool.get().await?.detach();
            Ok(ByteStream::with_config(Box::new(conn), config))
        })
    }
}

impl<T: Transport> Connected for ByteStream<T> {
    type ConnectInfo = TcpConnectInfo;

    /// The connection's addresses, as far as the transport knows them (an RDMA
    /// connection knows none on the accepting side: `None`).
    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.transport().local_addr().ok(),
            remote_addr: self.transport().peer_addr().ok(),
        }
    }
}

/// The wait before the next accept after an accept error, doubled for each error in a
/// row up to [`ACCEPT_BACKOFF_MAX`] and forgotten after a connection is accepted. An
/// error such as `EMFILE` (out of file descriptors) lasts until connections close, and
/// tonic asks for the next connection at once: without the wait a server out of
/// descriptors would spin a core on failed accepts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// The longest wait after accept errors (see [`ACCEPT_BACKOFF`]).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The wait after another accept error, when the last wait was `last`.
fn backoff_after(last: Option<Duration>) -> Duration {
    last.map_or(ACCEPT_BACKOFF, |d| (d * 2).min(ACCEPT_BACKOFF_MAX))
}

/// The connections `listener` accepts, as byte streams, for tonic's
/// `Server::serve_with_incoming`. An accept error is yielded (tonic logs it and goes
/// on accepting); the stream never ends by itself. After an error the next accept
/// waits 5 ms, doubling with each error in a row up to 1 s, so an error that lasts
/// (`EMFILE`: out of file descriptors) costs no CPU while connections still come in
/// as soon as it clears.
pub fn tcp_incoming(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<ByteStream<TcpTransport>>> + Send + 'static {
    futures::stream::unfold((listener, None), |(l, backoff)| async move {
        if let Some(wait) = backoff {
            l.runtime().sleep(wait).await;
        }
        match l.accept().await {
            Ok(t) => Some((Ok(ByteStream::new(t)), (l, None))),
            Err(e) => Some((Err(io::Error::from(e)), (l, Some(backoff_after(backoff))))),
        }
    })
}

/// The connections an RDMA `listener` accepts, as byte streams, for tonic's
/// `Server::serve_with_incoming`. The accept runs on a thread of its own (RDMA-CM
/// blocks) and waits in rounds of a second, so dropping the stream (the server
/// stopped) ends it within a second; a connection set up meanwhile is kept by the
/// listener for its next accept. A failed setup of one connection is yielded as an
/// error (tonic logs it and goes on), and the next accept waits as after an error of
/// [`tcp_incoming`].
#[cfg(feature = "rdma")]
pub fn rdma_incoming(
    listener: crate::drivers::rdma::RdmaListener,
) -> impl Stream<Item = io::Result<ByteStream<crate::drivers::rdma::transport::RdmaTransport>>>
       + Send
       + 'static {
    futures::stream::unfold((listener, None), |(l, backoff)| async move {
        if let Some(wait) = backoff {
            // tonic runs on tokio: its timer (none outside a runtime: no wait then).
            if let Ok(rt) = crate::runtime::default_runtime() {
                rt.sleep(wait).await;
            }
        }
        loop {
            match l.accept(Duration::from_secs(1)).await {
                Err(e) if e.kind() == crate::ErrorKind::TimedOut => continue,
                Ok(t) => return Some((Ok(ByteStream::new(t)), (l, None))),
                Err(e) => {
                    let next = Some(backoff_after(backoff));
                    return Some((Err(io::Error::from(e)), (l, next)));
                }
            }
        }
    })
}
