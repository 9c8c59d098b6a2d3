//! Length-prefix framing with no I/O.
//!
//! ```text
//! +---------------------+---------------------------+
//! | length: u32, BE     | payload: `length` bytes    |
//! +---------------------+---------------------------+
//! ```
//!
//! The length counts payload bytes only. This is byte for byte the default format of
//! tokio-util's `LengthDelimitedCodec` and netty's `LengthFieldBasedFrameDecoder`
//! (4-byte big-endian length field, offset 0, no adjustment, prefix stripped), so net-rs
//! talks to peers built on either.
//!
//! [`Decoder`] is a two-state machine (`Head`, `Data(n)`) over a [`BytesMut`] that the
//! caller fills: it checks a length against the maximum *before* reserving any memory
//! for it, and it splits complete frames off the buffer without copying.

use bytes::{Buf as _, Bytes, BytesMut};

use crate::error::{Error, ErrorKind, Result};

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// The largest length a 4-byte prefix can carry.
pub const MAX_ENCODABLE: usize = u32::MAX as usize;

/// The 4-byte big-endian prefix for a payload of `len` bytes.
///
/// # Errors
/// [`ErrorKind::MessageTooLarge`] if `len > max` (the connection is unaffected).
pub fn encode_header(len: usize, max: usize) -> Result<[u8; HEADER_LEN]> {
    if len > max || len > MAX_ENCODABLE {
        return Err(too_large(len as u64, max.min(MAX_ENCODABLE), false));
    }
    Ok((len as u32).to_be_bytes())
}

pub(crate) fn too_large(size: u64, max: usize, received: bool) -> Error {
    let msg = if received {
        format!("received frame length {size} exceeds the maximum message size {max}")
    } else {
        format!("message of {size} bytes exceeds the maximum message size {max}")
    };
    Error::new(
        ErrorKind::MessageTooLarge {
            size,
            max,
            received,
        },
        msg,
    )
}

/// Where the decoder is in the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a 4-byte length.
    Head,
    /// The length was read; waiting for this many payload bytes.
    Data(usize),
}

/// Splits length-prefixed frames off a byte buffer.
#[derive(Debug, Clone)]
pub struct Decoder {
    max: usize,
    state: State,
}

impl Decoder {
    /// A decoder that rejects frames longer than `max` payload bytes.
    pub fn new(max: usize) -> Self {
        Decoder {
            max,
            state: State::Head,
        }
    }

    /// The maximum payload length.
    pub fn max_message_size(&self) -> usize {
        self.max
    }

    /// The payload length of the frame in progress, once its header has been read.
    pub fn pending_len(&self) -> Option<usize> {
        match self.state {
            State::Head => None,
            State::Data(n) => Some(n),
        }
    }

    /// Whether the decoder sits exactly between two frames (no header half-read).
    pub fn at_boundary(&self, buf: &BytesMut) -> bool {
        self.state == State::Head && buf.is_empty()
    }

    /// Read the header if it is complete. Returns the payload length of the current frame.
    ///
    /// # Errors
    /// [`ErrorKind::MessageTooLarge`] (`received: true`) if the length exceeds the
    /// maximum; nothing is reserved for it.
    pub fn decode_head(&mut self, buf: &mut BytesMut) -> Result<Option<usize>> {
        if let State::Data(n) = self.state {
            return Ok(Some(n));
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if n > self.max {
            return Err(too_large(n as u64, self.max, true));
        }
        buf.advance(HEADER_LEN);
        self.state = State::Data(n);
        Ok(Some(n))
    }

    /// Split the next complete frame off `buf`, if there is one.
    ///
    /// # Errors
    /// As [`decode_head`](Decoder::decode_head).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>> {
        let Some(n) = self.decode_head(buf)? else {
            return Ok(None);
        };
        if buf.len() < n {
            return Ok(None);
        }
        self.state = State::Head;
        Ok(Some(buf.split_to(n).freeze()))
    }

    /// Mark the current frame as consumed by the caller (who read its `n` payload bytes
    /// somewhere else, see [`pending_len`](Decoder::pending_len)).
    pub fn finish_frame(&mut self) {
        self.state = State::Head;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = encode_header(payload.len(), usize::MAX).unwrap().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let msgs: Vec<Vec<u8>> = vec![vec![], b"a".to_vec(), vec![7; 300], b"xyz".to_vec()];
        let wire: Vec<u8> = msgs.iter().flat_map(|m| frame(m)).collect();
        for split in 0..=wire.len() {
            let mut d = Decoder::new(1024);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(chunk);
                while let Some(f) = d.decode(&mut buf).unwrap() {
                    out.push(f.to_vec());
                }
            }
            assert_eq!(out, msgs, "split at {split}");
            assert!(d.at_boundary(&buf));
        }
    }

    #[test]
    fn rejects_oversized_length_before_payload_arrives() {
        let mut d = Decoder::new(10);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 11][..]);
        let err = d.decode(&mut buf).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::MessageTooLarge {
                size: 11,
                max: 10,
                received: true
            }
        );
        let text = err.to_string();
        assert!(text.contains("11") && text.contains("10"), "{text}");
        let big = u32::MAX.to_be_bytes();
        let mut buf = BytesMut::from(&big[..]);
        assert!(Decoder::new(1 << 20).decode(&mut buf).is_err());
        assert_eq!(buf.capacity(), 4, "nothing reserved for a rejected frame");
    }

    #[test]
    fn encode_rejects_over_max() {
        assert_eq!(encode_header(5, 5).unwrap(), [0, 0, 0, 5]);
        let e = encode_header(6, 5).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::MessageTooLarge {
                received: false,
                ..
            }
        ));
    }
}
