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

/// The first failure the socket reported, in either direction. The kernel reports a
/// connection's failure (`ETIMEDOUT` from keepalive or the user timeout, `ECONNRESET`)
/// to one call only; the other direction then sees an end of stream (a read of 0) or a
/// broken pipe (`EPIPE`), which alone would read as the peer's orderly end. Each
/// direction records what it is told here right after the call, and reports the
/// recorded failure in place of such an aftermath.
#[derive(Default)]
pub(crate) struct Broken(std::sync::OnceLock<crate::Error>);

impl Broken {
    /// The error to report for the socket's `e` in `what`: the recorded failure if `e`
    /// is a broken pipe that followed it, else `e` (recorded if it is the first).
    ///
    /// A broken pipe on a connection we did not shut down means another call took the
    /// real error and is about to record it (a read records it under the receive
    /// side's lock right after the call): give it a moment (at most about 1000
    /// yields, on this rare path only).
    pub(crate) fn record(&self, what: &str, e: std::io::Error) -> crate::Error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            for _ in 0..1000 {
                if let Some(first) = self.get() {
                    return first;
                }
                std::thread::yield_now();
            }
            return socket_error(what, e);
        }
        self.0.get_or_init(|| socket_error(what, e)).clone()
    }

    /// The recorded failure, if any.
    pub(crate) fn get(&self) -> Option<crate::Error> {
        self.0.get().cloned()
    }
}

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
