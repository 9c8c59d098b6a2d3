//! `tower::Service` for [`Client`] and [`Channel`] (feature `tower`), so tower's
//! timeout, retry, rate-limit and load-balance layers apply to calls; and
//! [`ServiceHandler`], a `tower::Service` as the server's handler.
//!
//! Retrying calls that failed `Unavailable` (the connection broke, or none could be
//! had: a server restarting) through a [`Channel`], which reconnects by itself:
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use net_rs::pool::{ConnectionPool, PoolConfig, TcpConnector};
//! use net_rs::rpc::{Call, Channel, ClientConfig, Code, Status};
//! use tower::{Service, ServiceExt};
//!
//! #[derive(Clone)]
//! struct RetryUnavailable(u32);
//!
//! impl tower::retry::Policy<Call, Bytes, Status> for RetryUnavailable {
//!     type Future = tokio::time::Sleep;
//!     fn retry(&mut self, _: &mut Call, r: &mut Result<Bytes, Status>) -> Option<Self::Future> {
//!         match r {
//!             Err(e) if e.code() == Code::Unavailable && self.0 > 0 => {
//!                 self.0 -= 1;
//!                 Some(tokio::time::sleep(Duration::from_millis(50)))
//!             }
//!             _ => None,
//!         }
//!     }
//!     fn clone_request(&mut self, req: &Call) -> Option<Call> {
//!         Some(req.clone())
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = ConnectionPool::new(TcpConnector::new("127.0.0.1:7000"), PoolConfig::default())?;
//! let channel = Channel::new(pool, 2, ClientConfig::default());
//! let mut svc = tower::retry::Retry::new(RetryUnavailable(20), channel);
//! let reply = svc.ready().await?.call(Call::new(1, &b"key"[..])).await?;
//! # let _ = reply;
//! # Ok(())
//! # }
//! ```

use std::task::{Context, Poll};

use bytes::Bytes;

use super::channel::Channel;
use super::client::Client;
use super::status::Status;
use crate::pool::Connector;
use crate::transport::{BoxFuture, Transport};

/// A call as a `tower::Service` request: the method and the payload (copied once into
/// the transport's memory when sent). Cheap to clone, as tower's retry layer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The method tag.
    pub method: u16,
    /// The request's payload.
    pub payload: Bytes,
}

impl Call {
    /// A call of `method` with `payload`.
    pub fn new(method: u16, payload: impl Into<Bytes>) -> Self {
        Call {
            method,
            payload: payload.into(),
        }
    }
}

/// Always ready: a call waits for a slot of the window itself (see
/// [`ClientConfig::max_in_flight`](super::ClientConfig::max_in_flight)); once the
/// connection failed, `poll_ready` returns its `Unavailable` status.
impl<T: Transport> tower_service::Service<Call> for Client<T> {
    type Response = Bytes;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Bytes, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(match self.failed() {
            Some(s) => Err(s),
            None => Ok(()),
        })
    }

    fn call(&mut self, req: Call) -> Self::Future {
        let c = self.clone();
        Box::pin(async move { c.call(req.method, &req.payload).await })
    }
}

/// Always ready: a failed connection is replaced by the next call.
impl<C: Connector> tower_service::Service<Call> for Channel<C> {
    type Response = Bytes;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Bytes, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Call) -> Self::Future {
        let c = self.clone();
        Box::pin(async move { c.call(req.method, &req.payload).await })
    }
}

/// A `tower::Service<Request>` as a server [`Handler`](super::Handler): each request
/// waits for the service's `poll_ready`, then its `call` (on a clone, as tower does for
/// services shared between tasks), so tower's layers (concurrency limits, timeouts,
/// load shedding) apply on the server side too.
///
/// ```
/// use bytes::Bytes;
/// use net_rs::rpc::{Request, ServiceHandler, Status};
///
/// let echo = tower::service_fn(|req: Request| async move { Ok::<Bytes, Status>(req.into_payload()) });
/// let handler = ServiceHandler::new(echo);
/// # let _ = handler;
/// ```
#[derive(Debug, Clone)]
pub struct ServiceHandler<S> {
    service: S,
}

impl<S> ServiceHandler<S> {
    /// Serve requests with `service`.
    pub fn new(service: S) -> Self {
        ServiceHandler { service }
    }
}

impl<S> super::Handler for ServiceHandler<S>
where
    S: tower_service::Service<super::Request, Response = Bytes, Error = Status>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    fn call(
        &self,
        req: super::Request,
    ) -> impl std::future::Future<Output = Result<Bytes, Status>> + Send + 'static {
        let mut svc = self.service.clone();
        async move {
            std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
            svc.call(req).await
        }
    }
}
