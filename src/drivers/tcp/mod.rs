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
