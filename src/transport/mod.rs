//! The API every net-rs transport implements: [`Transport`] and [`BufferPool`].
//!
//! A transport moves whole messages ([`Bytes`]) in order over one reliable connection.
//! All methods take `&self`, so one task can send while another receives on the same
//! transport: share it by reference or in an `Arc`.
//!
//! # Generic or `dyn`
//! [`Transport`] returns `Send` futures (`impl Future + Send`), so generic code
//! (`fn f(t: &impl Transport)`) pays no boxing. For a trait object, use
//! [`DynTransport`]: every `Transport` implements it, its methods return boxed futures,
//! and [`BoxTransport`] (`Box<dyn DynTransport>`) implements `Transport` again, so a
//! boxed transport can go wherever a generic one can (for example into a
//! [`ConnectionPool`](crate::pool::ConnectionPool)).
//!
//! # Stream and Sink
//! Transports are not `futures::Stream`/`Sink` themselves (with `SinkExt` in scope,
//! `send` would mean two different things). [`Messages`] is that view, asked for
//! explicitly: `transport.messages()`, [`Messages::owned`] (a pooled connection goes in
//! this way), or [`Messages::from_handle`] over an `Arc`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;

use crate::buffer::Buf;
use crate::error::Result;

mod messages;

pub use crate::buffer::BufferPool;
pub use messages::{Handle, Messages};

/// A boxed, `Send` future, as returned by [`DynTransport`] and the runtime adapters.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A reliable, ordered, message-oriented connection.
///
/// # Cancellation
/// * `recv` is cancel-safe: dropping its future (for example in `select!`) never loses or
///   corrupts a message; the next `recv` returns it.
/// * `send` either accepts the whole message or none of it. Its future resolves once the
///   message is queued for transmission (it waits only when the transport's send buffer
///   is full). Dropping it before it resolves means the message was not sent and no byte
///   of it will be; once it has resolved, the message will be transmitted in order
///   unless the connection fails. [`flush`](Transport::flush) waits until everything
///   accepted so far has been handed to the network.
pub trait Transport: Send + Sync + 'static {
    /// Queue one message for transmission.
    ///
    /// # Errors
    /// [`MessageTooLarge`](crate::ErrorKind::MessageTooLarge) (before anything is
    /// written; the connection stays usable), [`Closed`](crate::ErrorKind::Closed) after
    /// `shutdown`/`close`, or the error that broke the connection.
    fn send(&self, msg: Bytes) -> impl Future<Output = Result<()>> + Send + '_;

    /// Receive the next message.
    ///
    /// # Errors
    /// [`Closed`](crate::ErrorKind::Closed) once the peer has shut down cleanly and every
    /// message before that has been returned; `UnexpectedEof` if it closed mid-message;
    /// `MessageTooLarge`/`InvalidData` for bad frames; or the I/O error that broke the
    /// connection.
    fn recv(&self) -> impl Future<Output = Result<Bytes>> + Send + '_;

    /// Wait until every message accepted by `send` so far has been handed to the network.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send + '_;

    /// Flush, then tell the peer no more messages follow. Receiving still works.
    fn shutdown(&self) -> impl Future<Output = Result<()>> + Send + '_;

    /// Flush, shut down both directions and release the connection. Pending and later
    /// operations fail with [`Closed`](crate::ErrorKind::Closed).
    fn close(&self) -> impl Future<Output = Result<()>> + Send + '_;

    /// A zero-filled buffer of `len` bytes from this transport's [`BufferPool`]; freeze it
    /// into [`Bytes`] and pass it to [`send`](Transport::send).
    ///
    /// # Errors
    /// [`MessageTooLarge`](crate::ErrorKind::MessageTooLarge) if `len` is over
    /// [`max_message_size`](Transport::max_message_size) (such a buffer could not be
    /// sent), or `Io(OutOfMemory)` if the memory cannot be had.
    fn alloc_buf(&self, len: usize) -> Result<Buf>;

    /// The largest message this transport sends or accepts, in bytes.
    fn max_message_size(&self) -> usize;

    /// Whether the connection is closed or broken, or the peer has ended it: further
    /// sends fail, or `recv` can only return what is already buffered and then an
    /// error. Non-blocking; for TCP it also looks at the socket (one `recv(MSG_PEEK)`
    /// system call when nothing is buffered), so a peer that closed or reset an idle
    /// connection is seen without a `send` or `recv`.
    fn is_closed(&self) -> bool;

    /// Whether something from the peer has arrived that no `recv` has returned yet: a
    /// message or part of one. Non-blocking (for TCP, one `recv(MSG_PEEK)` system call
    /// when nothing is buffered). The [`ConnectionPool`](crate::pool::ConnectionPool)
    /// uses it to refuse a connection on which a reply nobody waits for has arrived.
    fn has_unread(&self) -> bool;

    /// The local address of the connection.
    fn local_addr(&self) -> Result<SocketAddr>;

    /// The address of the peer.
    fn peer_addr(&self) -> Result<SocketAddr>;

    /// This transport, borrowed, as a `futures::Stream` of received messages and a
    /// `futures::Sink` of messages to send; see [`Messages`] (and
    /// [`Messages::owned`] / [`Messages::from_handle`] for one that owns the transport,
    /// a pooled connection or an `Arc`).
    fn messages(&self) -> Messages<'_, Self>
    where
        Self: Sized,
    {
        Messages::new(self)
    }
}

/// The object-safe form of [`Transport`]; implemented for every `Transport`.
#[allow(missing_docs)]
pub trait DynTransport: Send + Sync + 'static {
    fn send_dyn(&self, msg: Bytes) -> BoxFuture<'_, Result<()>>;
    fn recv_dyn(&self) -> BoxFuture<'_, Result<Bytes>>;
    fn flush_dyn(&self) -> BoxFuture<'_, Result<()>>;
    fn shutdown_dyn(&self) -> BoxFuture<'_, Result<()>>;
    fn close_dyn(&self) -> BoxFuture<'_, Result<()>>;
    fn alloc_buf_dyn(&self, len: usize) -> Result<Buf>;
    fn max_message_size_dyn(&self) -> usize;
    fn is_closed_dyn(&self) -> bool;
    fn has_unread_dyn(&self) -> bool;
    fn local_addr_dyn(&self) -> Result<SocketAddr>;
    fn peer_addr_dyn(&self) -> Result<SocketAddr>;
}

impl<T: Transport> DynTransport for T {
    fn send_dyn(&self, msg: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.send(msg))
    }
    fn recv_dyn(&self) -> BoxFuture<'_, Result<Bytes>> {
        Box::pin(self.recv())
    }
    fn flush_dyn(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.flush())
    }
    fn shutdown_dyn(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.shutdown())
    }
    fn close_dyn(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.close())
    }
    fn alloc_buf_dyn(&self, len: usize) -> Result<Buf> {
        self.alloc_buf(len)
    }
    fn max_message_size_dyn(&self) -> usize {
        self.max_message_size()
    }
    fn is_closed_dyn(&self) -> bool {
        self.is_closed()
    }
    fn has_unread_dyn(&self) -> bool {
        self.has_unread()
    }
    fn local_addr_dyn(&self) -> Result<SocketAddr> {
        self.local_addr()
    }
    fn peer_addr_dyn(&self) -> Result<SocketAddr> {
        self.peer_addr()
    }
}

/// A type-erased transport; see [`DynTransport`].
pub type BoxTransport = Box<dyn DynTransport>;

impl Transport for BoxTransport {
    fn send(&self, msg: Bytes) -> impl Future<Output = Result<()>> + Send + '_ {
        (**self).send_dyn(msg)
    }
    fn recv(&self) -> impl Future<Output = Result<Bytes>> + Send + '_ {
        (**self).recv_dyn()
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        (**self).flush_dyn()
    }
    fn shutdown(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        (**self).shutdown_dyn()
    }
    fn close(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        (**self).close_dyn()
    }
    fn alloc_buf(&self, len: usize) -> Result<Buf> {
        (**self).alloc_buf_dyn(len)
    }
    fn max_message_size(&self) -> usize {
        (**self).max_message_size_dyn()
    }
    fn is_closed(&self) -> bool {
        (**self).is_closed_dyn()
    }
    fn has_unread(&self) -> bool {
        (**self).has_unread_dyn()
    }
    fn local_addr(&self) -> Result<SocketAddr> {
        (**self).local_addr_dyn()
    }
    fn peer_addr(&self) -> Result<SocketAddr> {
        (**self).peer_addr_dyn()
    }
}
