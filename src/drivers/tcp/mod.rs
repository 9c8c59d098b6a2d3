//! The TCP driver: length-prefixed messages over a TCP stream.
//!
//! * [`TcpTransport`]: one connection ([`Transport`](crate::transport::Transport); its
//!   `Stream`/`Sink` view is [`Messages`](crate::transport::Messages)).
//! * [`TcpListener`]: accepts connections.
//! * [`TcpConfig`]: maximum message size, send buffer, timeouts, keepalive, runtime.
//!
//! Wire format: see [`codec`](crate::codec). A `send` over the maximum fails before any
//! byte is written and leaves the connection usable; a received length over the maximum
//! fails `recv` with `MessageTooLarge` (io kind `InvalidData`, naming both sizes) and
//! closes the connection without allocating anything for the frame.

mod closing;
mod config;
mod listener;
mod recv;
mod send;
mod transport;

pub use crate::runtime::Keepalive;
pub use config::{TcpConfig, DEFAULT_MAX_MESSAGE_SIZE};
pub use listener::TcpListener;
pub use transport::TcpTransport;

/// A socket's error as an [`Error`](crate::Error) of the kind it maps to. A timeout
/// (`ETIMEDOUT`) says where it comes from: the kernel gave up on the peer.
pub(crate) fn socket_error(what: &str, e: std::io::Error) -> crate::Error {
    if e.kind() == std::io::ErrorKind::TimedOut {
        crate::Error::io_context(
            format!(
                "{what}: the peer stopped answering (no acknowledgement of our data, or \
                 of keepalive probes, within TcpConfig::keepalive / user_timeout)"
            ),
            e,
        )
    } else {
        e.into()
    }
}
