//! [`Messages`]: any [`Transport`] seen as a `futures::Stream` of the messages it
//! receives and a `futures::Sink` of messages to send.
//!
//! Transports do not implement `Stream`/`Sink` themselves: with `futures::SinkExt` in
//! scope, `t.send(m)` would then name [`Transport::send`] (queue only) or
//! `SinkExt::send` (queue and flush, another error type) depending on how `t` is
//! borrowed. The view is asked for explicitly instead, from any transport, through any
//! handle to it: `transport.messages()` or [`Messages::new`] borrow it;
//! [`Messages::owned`] owns it (a pooled connection goes in this way) and
//! [`Messages::from_handle`] keeps an `Arc` or a `Box`, for a stream that is `'static`
//! (to move into a spawned task).

use std::fmt;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures::stream::FusedStream;
use futures::{ready, Sink, Stream};

use super::{BoxFuture, Transport};
use crate::error::{Error, ErrorKind, Result};

/// Something that gives access to a transport `T`: `&T`, `Arc<T>`, `Box<T>`, a
/// [`PooledConnection`](crate::pool::PooledConnection), ...
type Keeper<'a, T> = Arc<dyn Deref<Target = T> + Send + Sync + 'a>;

/// A [`Transport`] as a `Stream<Item = Result<Bytes>>` and a `Sink<Bytes>`, like
/// tokio-util's `Framed`.
///
/// # Stream
/// Yields each received message as `Ok(Bytes)`. It ends (`None`) after the peer's
/// orderly close (a [`Closed`](ErrorKind::Closed) error from `recv` is not yielded)
/// and after the first other error, which is yielded once: `Some(Err(e))`, then `None`
/// forever ([`FusedStream`]). So a loop that logs errors and continues terminates. A
/// TCP transport keeps returning that error from [`recv`](Transport::recv).
///
/// # Sink
/// * `poll_ready` waits until the previous message has been accepted by
///   [`send`](Transport::send) (it waits only while the transport's send buffer is
///   full) and reports its error, if any.
/// * `start_send` hands the message to `send` at once; if `send` has to wait for room,
///   the next `poll_ready`, `poll_flush` or `poll_close` finishes it. A message whose
///   `send` fails before it is queued (for example
///   [`MessageTooLarge`](ErrorKind::MessageTooLarge)) is reported there or by that
///   next call, and the transport stays usable.
/// * `poll_flush` is the transport's [`flush`](Transport::flush): every message given
///   so far has been handed to the network.
/// * `poll_close` is the transport's [`close`](Transport::close).
///
/// Errors are [`net_rs::Error`](crate::Error); `?` converts them to `std::io::Error`.
///
/// # Cancellation
/// All receive state lives in the transport: dropping the `Messages` (or a `next()`
/// future) loses no message, and the transport's next `recv` returns it. Dropping it
/// while a message given to `start_send` is still waiting for room in the send buffer
/// drops that message unsent (as dropping a pending `send` future does).
///
/// Each call that starts a transport operation boxes its future (one allocation per
/// message received or sent).
///
/// ```no_run
/// use futures::{SinkExt, StreamExt};
/// use net_rs::drivers::tcp::TcpTransport;
/// use net_rs::transport::Transport;
///
/// # async fn run() -> net_rs::Result<()> {
/// let transport = TcpTransport::connect("127.0.0.1:8080").await?;
/// let mut messages = transport.messages();
/// messages.send(bytes::Bytes::from_static(b"ping")).await?; // send + flush
/// while let Some(reply) = messages.next().await {
///     match reply {
///         Ok(m) => println!("{} bytes", m.len()),
///         Err(e) => eprintln!("{e}"), // at most once: the stream ends after it
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Messages<'a, T: Transport> {
    transport: Keeper<'a, T>,
    recv: Option<BoxFuture<'a, Result<Bytes>>>,
    send: Option<BoxFuture<'a, Result<()>>>,
    flush: Option<BoxFuture<'a, Result<()>>>,
    close: Option<BoxFuture<'a, Result<()>>>,
    ended: bool,
}

/// What [`Messages::from_handle`] keeps: a reference, an `Arc` or a `Box` of the
/// transport (sealed).
pub trait Handle<T>: Deref<Target = T> + handle::Sealed {}

mod handle {
    pub trait Sealed {}
    impl<T> Sealed for &T {}
    impl<T> Sealed for std::sync::Arc<T> {}
    impl<T> Sealed for Box<T> {}
}

impl<T> Handle<T> for &T {}
impl<T> Handle<T> for Arc<T> {}
impl<T> Handle<T> for Box<T> {}

impl<T: Transport> Messages<'static, T> {
    /// A view that owns `transport` (`'static`: it can move into a spawned task). For a
    /// [`PooledConnection`](crate::pool::PooledConnection) this is the way in: the
    /// guard's own methods are used, so a `next()` dropped before it completed keeps the
    /// connection out of the pool, as its `recv` does, and dropping the view returns
    /// the connection.
    pub fn owned(transport: T) -> Self {
        Messages::from_handle(Box::new(transport))
    }
}

impl<'a, T: Transport> Messages<'a, T> {
    /// A view of `transport`, borrowed. Same as [`Transport::messages`].
    pub fn new(transport: &'a T) -> Self {
        Self::from_handle(transport)
    }

    /// A view of the transport behind `handle`, which it keeps: an `Arc<T>` (so the
    /// `Messages` is `'static` and other clones can still use the transport), a
    /// `Box<T>`, or a reference.
    ///
    /// A pooled connection goes in with [`owned`](Messages::owned), not here: through
    /// its `Deref` the view would bypass the guard's tracking of abandoned receives (a
    /// reply still coming would go to the connection's next user), so `from_handle`
    /// does not take one.
    pub fn from_handle<H>(handle: H) -> Self
    where
        H: Handle<T> + Send + Sync + 'a,
    {
        Messages {
            transport: Arc::new(handle),
            recv: None,
            send: None,
            flush: None,
            close: None,
            ended: false,
        }
    }

    /// The transport, for the calls `Stream`/`Sink` do not cover.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Finish the message given to `start_send`, if it still waits for room.
    fn poll_sent(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(send) = self.send.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let res = ready!(send.as_mut().poll(cx));
        self.send = None;
        Poll::Ready(res)
    }
}

impl<T: Transport> Stream for Messages<'_, T> {
    type Item = Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.recv.is_none() {
            let t = this.transport.clone();
            this.recv = Some(Box::pin(async move { t.recv().await }));
        }
        let recv = this.recv.as_mut().expect("set above");
        let res = ready!(recv.as_mut().poll(cx));
        this.recv = None;
        match res {
            Ok(msg) => Poll::Ready(Some(Ok(msg))),
            Err(e) => {
                this.ended = true;
                if e.kind() == ErrorKind::Closed {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(e)))
                }
            }
        }
    }
}

impl<T: Transport> FusedStream for Messages<'_, T> {
    fn is_terminated(&self) -> bool {
        self.ended
    }
}

impl<T: Transport> Sink<Bytes> for Messages<'_, T> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().poll_sent(cx)
    }

    /// # Errors
    /// The `send` error if it failed at once, or `Io(Other)` if the previous message
    /// was still waiting (`poll_ready` was not called first); the message is not sent.
    fn start_send(self: Pin<&mut Self>, msg: Bytes) -> Result<()> {
        let this = self.get_mut();
        if this.send.is_some() {
            return Err(Error::new(
                ErrorKind::Io(std::io::ErrorKind::Other),
                "Messages::start_send: the previous message is still waiting for room \
                 (call poll_ready first); this one was not sent",
            ));
        }
        let t = this.transport.clone();
        let mut send: BoxFuture<'_, _> = Box::pin(async move { t.send(msg).await });
        // Queue it now if there is room. The future re-registers the real waker when
        // `poll_ready`/`poll_flush` polls it again, so this first poll loses no wake-up.
        match send.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(res) => res,
            Poll::Pending => {
                this.send = Some(send);
                Ok(())
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_sent(cx))?;
        if this.flush.is_none() {
            let t = this.transport.clone();
            this.flush = Some(Box::pin(async move { t.flush().await }));
        }
        let flush = this.flush.as_mut().expect("set above");
        let res = ready!(flush.as_mut().poll(cx));
        this.flush = None;
        Poll::Ready(res)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_sent(cx))?;
        if this.close.is_none() {
            let t = this.transport.clone();
            this.close = Some(Box::pin(async move { t.close().await }));
        }
        let close = this.close.as_mut().expect("set above");
        let res = ready!(close.as_mut().poll(cx));
        this.close = None;
        Poll::Ready(res)
    }
}

impl<T: Transport> fmt::Debug for Messages<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Messages")
            .field("local_addr", &self.transport().local_addr().ok())
            .field("peer_addr", &self.transport().peer_addr().ok())
            .field("recv_pending", &self.recv.is_some())
            .field("send_pending", &self.send.is_some())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}
