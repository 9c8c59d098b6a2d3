//! `tower::Service` for [`Client`] and [`Channel`] (feature `tower`), so tower's
//! timeout, retry, rate-limit and load-balance layers apply to calls.

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
