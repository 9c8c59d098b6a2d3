//! The RPC wire format: one 16-byte header in front of each message's payload.
//!
//! Every request, reply and cancel is one message of the underlying
//! [`Transport`](crate::transport::Transport) (so its size is bounded by the transport's
//! `max_message_size`, and TCP frames it with its length prefix). All integers are
//! big-endian:
//!
//! ```text
//! byte  0       1       2..4      4..12        12..16        16..
//!       kind    flags   method    id           word          payload
//!       u8      u8      u16       u64          u32
//! ```
//!
//! * `kind`: 1 request, 2 reply, 3 cancel; anything else is a protocol error.
//! * `flags`: 0 (reserved; a receiver rejects any other value, so they can be given a
//!   meaning later without being misread).
//! * `method`: the application's tag for what to call (requests; replies and cancels
//!   repeat the request's).
//! * `id`: chosen by the client, unique among the requests of one connection that are
//!   still open (this client never reuses one: it counts up from 1). A reply and a
//!   cancel carry the id of their request.
//! * `word`: in a request, the caller's time budget in milliseconds (0: none), measured
//!   from when the server receives it (relative, so the two clocks need not agree); in
//!   a reply, the status code ([`Code`], gRPC's numbering; 0 is success, then the
//!   payload is the reply, otherwise it is the UTF-8 error message); in a cancel, 0.
//!
//! The server answers every request exactly once (a reply of status `Cancelled` to one
//! it gave up because of a cancel), so a client can keep a cancelled request's slot
//! until its answer and call any other answer a protocol error.

use bytes::{Buf as _, Bytes};

/// The header's length in bytes.
pub const HEADER_LEN: usize = 16;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A call: `word` is the time budget in milliseconds (0: none).
    Request,
    /// The answer to a request: `word` is the status code.
    Reply,
    /// The client no longer wants the answer to the request `id`.
    Cancel,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Request => 1,
            Kind::Reply => 2,
            Kind::Cancel => 3,
        }
    }
}

/// A status code, gRPC's numbering (`google.rpc.Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// 0: success.
    Ok,
    /// 1: the call was cancelled (by the caller, or by the server on its request).
    Cancelled,
    /// 2: an error with no better code.
    Unknown,
    /// 3: the request is invalid whatever the state of the server.
    InvalidArgument,
    /// 4: the deadline passed before the call completed.
    DeadlineExceeded,
    /// 5: something asked for was not found.
    NotFound,
    /// 6: something to be created exists already.
    AlreadyExists,
    /// 7: the caller may not do this.
    PermissionDenied,
    /// 8: a limit was reached (for example the calls in flight).
    ResourceExhausted,
    /// 9: the system is not in a state in which the call can run.
    FailedPrecondition,
    /// 10: the call was aborted (a conflict).
    Aborted,
    /// 11: out of the valid range.
    OutOfRange,
    /// 12: the server has no handler for this method.
    Unimplemented,
    /// 13: an invariant broke (on the server, or in what the peer sent).
    Internal,
    /// 14: the service cannot be reached now (connection lost, server shutting down):
    /// retrying may help.
    Unavailable,
    /// 15: data was lost or corrupted.
    DataLoss,
    /// 16: the caller is not authenticated.
    Unauthenticated,
}

impl Code {
    /// The code's number on the wire.
    pub fn as_u32(self) -> u32 {
        match self {
            Code::Ok => 0,
            Code::Cancelled => 1,
            Code::Unknown => 2,
            Code::InvalidArgument => 3,
            Code::DeadlineExceeded => 4,
            Code::NotFound => 5,
            Code::AlreadyExists => 6,
            Code::PermissionDenied => 7,
            Code::ResourceExhausted => 8,
            Code::FailedPrecondition => 9,
            Code::Aborted => 10,
            Code::OutOfRange => 11,
            Code::Unimplemented => 12,
            Code::Internal => 13,
            Code::Unavailable => 14,
            Code::DataLoss => 15,
            Code::Unauthenticated => 16,
        }
    }

    /// The code of a number; numbers without one are [`Code::Unknown`] (as gRPC does).
    pub fn from_u32(n: u32) -> Code {
        match n {
            0 => Code::Ok,
            1 => Code::Cancelled,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            6 => Code::AlreadyExists,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            9 => Code::FailedPrecondition,
            10 => Code::Aborted,
            11 => Code::OutOfRange,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            15 => Code::DataLoss,
            16 => Code::Unauthenticated,
            _ => Code::Unknown,
        }
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the message is.
    pub kind: Kind,
    /// The application's method tag.
    pub method: u16,
    /// The request's id.
    pub id: u64,
    /// Request: time budget in ms (0: none); reply: status code; cancel: 0.
    pub word: u32,
}

/// Why a message is not a valid RPC message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the header.
    Short(usize),
    /// An unknown `kind` byte.
    Kind(u8),
    /// Reserved flags set.
    Flags(u8),
    /// Id 0 (never used: the client counts from 1).
    ZeroId,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Short(n) => {
                write!(
                    f,
                    "an RPC message of {n} bytes, shorter than its {HEADER_LEN}-byte header"
                )
            }
            WireError::Kind(k) => write!(f, "an RPC message of unknown kind {k}"),
            WireError::Flags(x) => write!(f, "an RPC message with reserved flags {x:#04x} set"),
            WireError::ZeroId => write!(f, "an RPC message with request id 0"),
        }
    }
}

impl Header {
    /// Write the header into the first [`HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`HEADER_LEN`] (the callers reserve it).
    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_LEN];
        out[0] = self.kind.byte();
        out[1] = 0;
        out[2..4].copy_from_slice(&self.method.to_be_bytes());
        out[4..12].copy_from_slice(&self.id.to_be_bytes());
        out[12..16].copy_from_slice(&self.word.to_be_bytes());
    }

    /// The header as its own 16 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0; HEADER_LEN];
        self.write(&mut b);
        b
    }

    /// Split `msg` into its header and its payload (a slice of `msg`: no copy).
    ///
    /// # Errors
    /// A [`WireError`] for a message that is not a valid RPC message.
    pub fn decode(mut msg: Bytes) -> Result<(Header, Bytes), WireError> {
        if msg.len() < HEADER_LEN {
            return Err(WireError::Short(msg.len()));
        }
        let kind = match msg[0] {
            1 => Kind::Request,
            2 => Kind::Reply,
            3 => Kind::Cancel,
            k => return Err(WireError::Kind(k)),
        };
        if msg[1] != 0 {
            return Err(WireError::Flags(msg[1]));
        }
        msg.advance(2);
        let method = msg.get_u16();
        let id = msg.get_u64();
        let word = msg.get_u32();
        if id == 0 {
            return Err(WireError::ZeroId);
        }
        Ok((
            Header {
                kind,
                method,
                id,
                word,
            },
            msg,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Request), Just(Kind::Reply), Just(Kind::Cancel)]
    }

    proptest! {
        #[test]
        fn a_header_and_payload_come_back_as_written(
            kind in kind(),
            method in any::<u16>(),
            id in 1..=u64::MAX,
            word in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let h = Header { kind, method, id, word };
            let mut msg = h.to_bytes().to_vec();
            msg.extend_from_slice(&payload);
            let (back, rest) = Header::decode(Bytes::from(msg)).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(&rest[..], &payload[..]);
        }

        #[test]
        fn any_bytes_decode_or_give_a_clear_error(msg in proptest::collection::vec(any::<u8>(), 0..40)) {
            match Header::decode(Bytes::from(msg.clone())) {
                Ok((h, rest)) => {
                    prop_assert!(msg.len() >= HEADER_LEN);
                    prop_assert_eq!(h.to_bytes().to_vec(), msg[..HEADER_LEN].to_vec());
                    prop_assert_eq!(rest.len(), msg.len() - HEADER_LEN);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn every_code_number_round_trips(n in 0u32..17) {
            prop_assert_eq!(Code::from_u32(n).as_u32(), n);
        }
    }

    #[test]
    fn bad_messages_are_named() {
        assert_eq!(
            Header::decode(Bytes::from_static(&[1; 5])),
            Err(WireError::Short(5))
        );
        let mut m = Header {
            kind: Kind::Reply,
            method: 7,
            id: 3,
            word: 0,
        }
        .to_bytes();
        m[0] = 9;
        assert_eq!(
            Header::decode(Bytes::copy_from_slice(&m)),
            Err(WireError::Kind(9))
        );
        m[0] = 2;
        m[1] = 0x80;
        assert_eq!(
            Header::decode(Bytes::copy_from_slice(&m)),
            Err(WireError::Flags(0x80))
        );
        let z = Header {
            kind: Kind::Request,
            method: 0,
            id: 0,
            word: 0,
        }
        .to_bytes();
        assert_eq!(
            Header::decode(Bytes::copy_from_slice(&z)),
            Err(WireError::ZeroId)
        );
        assert_eq!(Code::from_u32(99), Code::Unknown);
    }
}
