//! [`Status`]: how a call failed.

use std::fmt;

use bytes::Bytes;

use super::wire::Code;
use crate::error::{Error, ErrorKind};

/// Why a call did not return a reply: a [`Code`] (gRPC's), a message, and the transport
/// error behind it if there was one.
///
/// * From the server: the code and message its handler returned (`Unimplemented` for a
///   method it has no handler for, `DeadlineExceeded` when the caller's time budget ran
///   out there, `Cancelled` for a request it gave up on a cancel, `Unavailable` for a
///   request it did not start because it is shutting down).
/// * From the client: `DeadlineExceeded` when the call's timeout passed (the connection
///   stays usable); `Unavailable` when the connection failed or closed, with the
///   transport's [`Error`] as [`source_error`](Status::source_error) (retrying on
///   another connection may help); `ResourceExhausted` for a request over the
///   transport's `max_message_size` (nothing was sent); `Internal` when the server
///   broke the protocol (the connection is closed).
#[derive(Clone)]
pub struct Status {
    code: Code,
    message: String,
    source: Option<Error>,
}

impl Status {
    /// A status of `code` with `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
            source: None,
        }
    }

    /// `Internal`, with `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        Status::new(Code::Internal, message)
    }

    /// The status a transport error gives a call: `ResourceExhausted` for a request over
    /// the maximum message size (not fatal), `Unavailable` otherwise.
    pub fn from_transport(err: Error) -> Self {
        let code = match err.kind() {
            ErrorKind::MessageTooLarge {
                received: false, ..
            } => Code::ResourceExhausted,
            _ => Code::Unavailable,
        };
        Status {
            code,
            message: err.to_string(),
            source: Some(err),
        }
    }

    /// The answer a reply carries: the payload for code 0, else a status with the
    /// payload as its message.
    pub(crate) fn answer(word: u32, payload: Bytes) -> Result<Bytes, Status> {
        match word {
            0 => Ok(payload),
            w => Err(Status::new(
                Code::from_u32(w),
                String::from_utf8_lossy(&payload).into_owned(),
            )),
        }
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message (the server's, or what the client saw).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The transport error that failed the call, if one did.
    pub fn source_error(&self) -> Option<&Error> {
        self.source.as_ref()
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Status")
            .field("code", &self.code)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Status {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        Status::from_transport(err)
    }
}
