//! The one error type of net-rs.
//!
//! [`Error`] is cheap to clone (an `Arc` inside), so a single connection failure can be
//! handed to every operation that was waiting on that connection. Match on
//! [`Error::kind`]; the `Display` text is for people and may change.
//!
//! Every `Error` converts into [`std::io::Error`] with a matching [`std::io::ErrorKind`],
//! so `?` works in functions that return `std::io::Result`, and the original `Error` can be
//! recovered with [`Error::from_io`] (or `io::Error::get_ref` + `downcast_ref`).

use std::fmt;
use std::io;
use std::sync::Arc;

/// `Result` with [`Error`] as the error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form code can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An operating-system or socket error not covered by a more precise kind.
    Io(io::ErrorKind),
    /// A deadline passed (connect timeout, checkout timeout, ...).
    TimedOut,
    /// Nobody listens at the address (TCP RST on connect, RDMA-CM reject).
    ConnectionRefused,
    /// The peer reset or lost the connection while it was in use.
    ConnectionReset,
    /// The connection was closed, locally or by the peer in an orderly way.
    Closed,
    /// The peer closed the connection in the middle of a message.
    UnexpectedEof,
    /// A message is larger than the configured maximum.
    ///
    /// On `send` this is reported before any byte is written and the connection stays
    /// usable (io kind `InvalidInput`); for a received length prefix the connection is
    /// closed (io kind `InvalidData`).
    MessageTooLarge {
        /// The size of the offending message in bytes.
        size: u64,
        /// The configured maximum in bytes.
        max: usize,
        /// `true` when the oversized message came from the peer.
        received: bool,
    },
    /// The peer sent bytes that are not a valid frame.
    InvalidData,
    /// The operation or transport is not available here (no RDMA device, no rdma-core
    /// libraries, no async runtime, ...).
    Unsupported,
    /// An RDMA work completion finished with this non-success status.
    WorkCompletion {
        /// The `ibv_wc_status` value.
        status: u32,
    },
    /// Registering or allocating registered memory failed.
    Registration,
    /// The connection pool was closed.
    PoolClosed,
}

impl ErrorKind {
    /// The closest [`io::ErrorKind`].
    pub fn io_kind(self) -> io::ErrorKind {
        match self {
            ErrorKind::Io(k) => k,
            ErrorKind::TimedOut => io::ErrorKind::TimedOut,
            ErrorKind::ConnectionRefused => io::ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset => io::ErrorKind::ConnectionReset,
            ErrorKind::Closed => io::ErrorKind::NotConnected,
            ErrorKind::UnexpectedEof => io::ErrorKind::UnexpectedEof,
            ErrorKind::MessageTooLarge { received: true, .. } | ErrorKind::InvalidData => {
                io::ErrorKind::InvalidData
            }
            ErrorKind::MessageTooLarge {
                received: false, ..
            } => io::ErrorKind::InvalidInput,
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            ErrorKind::WorkCompletion { .. } => io::ErrorKind::ConnectionAborted,
            ErrorKind::Registration => io::ErrorKind::OutOfMemory,
            ErrorKind::PoolClosed => io::ErrorKind::NotConnected,
        }
    }
}

/// The error type of every fallible net-rs operation.
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
    /// The connection is gone whatever the kind says (see [`Error::connection_lost`]).
    lost: bool,
}

impl Error {
    /// A new error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                source: None,
                lost: false,
            }),
        }
    }

    /// An error that ended its connection, whatever its kind: [`is_fatal`] is `true`
    /// (e.g. a `TimedOut` because the peer stopped answering, as opposed to a deadline
    /// of the caller's own, which leaves the connection as it was).
    ///
    /// [`is_fatal`]: Error::is_fatal
    pub fn connection_lost(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                source: None,
                lost: true,
            }),
        }
    }

    /// A new error of `kind` with a message and the underlying I/O error.
    pub fn with_source(kind: ErrorKind, message: impl Into<String>, source: io::Error) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                source: Some(source),
                lost: false,
            }),
        }
    }

    /// The `Closed` error for an operation on a closed connection.
    pub(crate) fn closed(what: &str) -> Self {
        Error::new(ErrorKind::Closed, format!("{what}: connection closed"))
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The [`io::ErrorKind`] this error maps to.
    pub fn io_kind(&self) -> io::ErrorKind {
        self.inner.kind.io_kind()
    }

    /// Whether this is a [`ErrorKind::TimedOut`].
    pub fn is_timeout(&self) -> bool {
        self.kind() == ErrorKind::TimedOut
    }

    /// Whether the connection this error came from can no longer be used.
    ///
    /// `false` only for errors that leave the connection intact, such as a `send` of a
    /// message over the maximum size, or a deadline of net-rs's own (a `timeout`, a
    /// pool's checkout). A `TimedOut` that ended the connection is fatal: one the
    /// operating system reported on the socket (`ETIMEDOUT` from TCP keepalive or
    /// `TCP_USER_TIMEOUT`), or an RDMA connection's (retries or keepalive exhausted, a
    /// lingering close, no hello), made with [`Error::connection_lost`].
    pub fn is_fatal(&self) -> bool {
        if self.inner.lost {
            return true;
        }
        match self.kind() {
            ErrorKind::MessageTooLarge {
                received: false, ..
            } => false,
            ErrorKind::TimedOut => self.reported_by_os(),
            _ => true,
        }
    }

    /// Whether an OS error (an [`io::Error`] with an OS error code) is among the causes.
    fn reported_by_os(&self) -> bool {
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            if c.downcast_ref::<io::Error>()
                .is_some_and(|e| e.raw_os_error().is_some())
            {
                return true;
            }
            cause = c.source();
        }
        false
    }

    /// Recover a net-rs error from an [`io::Error`] made by `From<Error>`, or wrap an
    /// arbitrary I/O error.
    pub fn from_io(err: io::Error) -> Self {
        if err
            .get_ref()
            .is_some_and(|e| e.downcast_ref::<Error>().is_some())
        {
            let inner = err.into_inner().expect("checked above");
            return *inner.downcast::<Error>().expect("checked above");
        }
        err.into()
    }
}

impl ErrorKind {
    /// The kind an [`io::Error`] of kind `k` converts to.
    fn from_io_kind(k: io::ErrorKind) -> ErrorKind {
        match k {
            io::ErrorKind::TimedOut => ErrorKind::TimedOut,
            io::ErrorKind::ConnectionRefused => ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrorKind::ConnectionReset,
            io::ErrorKind::UnexpectedEof => ErrorKind::UnexpectedEof,
            io::ErrorKind::InvalidData => ErrorKind::InvalidData,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            k => ErrorKind::Io(k),
        }
    }
}

impl Error {
    /// `err` with what was being done in front of its text: `"{context}: {err}"`, of
    /// the kind `err` converts to, with `err` as the source.
    pub(crate) fn io_context(context: impl fmt::Display, err: io::Error) -> Self {
        Error::with_source(
            ErrorKind::from_io_kind(err.kind()),
            format!("{context}: {err}"),
            err,
        )
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::with_source(ErrorKind::from_io_kind(err.kind()), err.to_string(), err)
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        io::Error::new(err.io_kind(), err)
    }
}

/// One line: `Error(<kind>): <message>`, then each underlying cause whose text the
/// line does not already contain, as `; caused by: <cause>`. So an OS error that the
/// message quotes appears once, not once per layer of wrapping.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = format!("Error({:?}): {}", self.inner.kind, self.inner.message);
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str("; caused by: ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&line.replace('\n', " "))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_io_error() {
        let e = Error::new(
            ErrorKind::MessageTooLarge {
                size: 10,
                max: 5,
                received: true,
            },
            "too big",
        );
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidData);
        let back = Error::from_io(io);
        assert!(matches!(
            back.kind(),
            ErrorKind::MessageTooLarge {
                size: 10,
                max: 5,
                ..
            }
        ));
    }

    #[test]
    fn debug_is_one_line_with_kind_message_and_source_once() {
        // The shape `TcpTransport::connect` builds: an io::Error wrapping an Error that
        // wraps the OS error, each quoting the one below.
        let os = io::Error::new(io::ErrorKind::ConnectionRefused, "refused (os error 111)");
        let os_text = os.to_string();
        let inner: Error = os.into();
        let wrapped = Error::with_source(
            inner.kind(),
            format!("connect to 127.0.0.1:9: {inner}"),
            io::Error::new(inner.io_kind(), inner),
        );
        let dbg = format!("{wrapped:?}");
        assert!(!dbg.contains('\n'), "{dbg}");
        assert!(
            dbg.starts_with("Error(ConnectionRefused): connect to 127.0.0.1:9"),
            "{dbg}"
        );
        assert_eq!(dbg.matches(&os_text).count(), 1, "OS message once: {dbg}");
        assert_eq!(
            format!("{wrapped:#?}"),
            dbg,
            "pretty Debug is the same line"
        );

        // A cause the message does not quote is shown once, after the message.
        let e = Error::with_source(
            ErrorKind::Io(io::ErrorKind::Other),
            "bind 127.0.0.1:1",
            io::Error::other("multi\nline cause"),
        );
        assert_eq!(
            format!("{e:?}"),
            "Error(Io(Other)): bind 127.0.0.1:1; caused by: multi line cause"
        );
        assert_eq!(
            format!("{:?}", Error::closed("recv")),
            "Error(Closed): recv: connection closed"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_timeout_is_fatal_only_when_the_os_reported_it() {
        // ETIMEDOUT from a socket (keepalive, TCP_USER_TIMEOUT): the connection is gone.
        let os: Error = io::Error::from_raw_os_error(libc::ETIMEDOUT).into();
        assert_eq!(os.kind(), ErrorKind::TimedOut);
        assert!(os.is_fatal());
        // Wrapped once more (as `connect` does), still seen.
        let wrapped = Error::with_source(os.kind(), "connect", io::Error::new(os.io_kind(), os));
        assert!(wrapped.is_fatal());
        // A deadline of our own leaves the connection as it was.
        assert!(!Error::new(ErrorKind::TimedOut, "timed out after 1s").is_fatal());
        // A peer that stopped answering (an RDMA keepalive) ended it.
        assert!(Error::connection_lost(ErrorKind::TimedOut, "no word").is_fatal());
        let ours: Error = io::Error::from(io::ErrorKind::TimedOut).into();
        assert!(!ours.is_fatal());
    }

    #[test]
    fn io_kinds_map_to_matchable_kinds() {
        let e: Error = io::Error::from(io::ErrorKind::ConnectionRefused).into();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
        let e: Error = io::Error::from(io::ErrorKind::BrokenPipe).into();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset);
        assert!(std::error::Error::source(&e).is_some());
    }
}
