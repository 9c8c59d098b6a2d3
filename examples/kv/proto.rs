//! The key-value protocol (one request message, one reply message) and the store.
//!
//! Requests, first byte the operation:
//! * `G` key: GET
//! * `S` key-length (u16, big-endian) key value: SET
//! * `D` key: DEL
//!
//! Replies, first byte the status: `K` (OK), `N` (NOT_FOUND), `V` value (the value of a
//! GET), `E` text (a malformed request).

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Get(&'a [u8]),
    Set(&'a [u8], &'a [u8]),
    Del(&'a [u8]),
}

impl<'a> Request<'a> {
    /// The request as one message.
    pub fn encode(&self) -> Bytes {
        match *self {
            Request::Get(key) => tagged(b'G', key),
            Request::Del(key) => tagged(b'D', key),
            Request::Set(key, value) => {
                let key_len = u16::try_from(key.len()).expect("key longer than 65535 bytes");
                let mut b = BytesMut::with_capacity(3 + key.len() + value.len());
                b.put_u8(b'S');
                b.put_u16(key_len);
                b.put_slice(key);
                b.put_slice(value);
                b.freeze()
            }
        }
    }

    /// Parse one request message.
    pub fn decode(msg: &'a [u8]) -> Result<Request<'a>, &'static str> {
        let (&op, rest) = msg.split_first().ok_or("empty request")?;
        match op {
            b'G' => Ok(Request::Get(rest)),
            b'D' => Ok(Request::Del(rest)),
            b'S' => {
                if rest.len() < 2 {
                    return Err("SET without a key length");
                }
                let key_len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let rest = &rest[2..];
                if rest.len() < key_len {
                    return Err("SET key longer than the request");
                }
                let (key, value) = rest.split_at(key_len);
                Ok(Request::Set(key, value))
            }
            _ => Err("unknown operation"),
        }
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    NotFound,
    Value(Bytes),
    Error(String),
}

impl Reply {
    /// The reply as one message.
    pub fn encode(&self) -> Bytes {
        match self {
            Reply::Ok => Bytes::from_static(b"K"),
            Reply::NotFound => Bytes::from_static(b"N"),
            Reply::Value(v) => tagged(b'V', v),
            Reply::Error(e) => tagged(b'E', e.as_bytes()),
        }
    }

    /// Parse one reply message. The value of a `Value` shares `msg`'s memory.
    pub fn decode(msg: Bytes) -> Result<Reply, String> {
        match msg.first() {
            Some(b'K') if msg.len() == 1 => Ok(Reply::Ok),
            Some(b'N') if msg.len() == 1 => Ok(Reply::NotFound),
            Some(b'V') => Ok(Reply::Value(msg.slice(1..))),
            Some(b'E') => Ok(Reply::Error(
                String::from_utf8_lossy(&msg[1..]).into_owned(),
            )),
            _ => Err(format!("malformed reply {msg:?}")),
        }
    }
}

fn tagged(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + body.len());
    b.put_u8(tag);
    b.put_slice(body);
    b.freeze()
}

/// The server's data: one map behind one lock, shared by every connection.
#[derive(Debug, Default)]
pub struct Store {
    map: Mutex<HashMap<Vec<u8>, Bytes>>,
}

impl Store {
    /// Answer one request message; both servers call this.
    ///
    /// Keys and values are copied out of the request: keeping a slice of a received
    /// message would keep the whole receive buffer it lives in alive.
    pub fn handle(&self, msg: &[u8]) -> Bytes {
        let reply = match Request::decode(msg) {
            Err(e) => Reply::Error(e.to_string()),
            Ok(Request::Get(key)) => match self.map.lock().unwrap().get(key) {
                Some(v) => return tagged(b'V', v),
                None => Reply::NotFound,
            },
            Ok(Request::Set(key, value)) => {
                let value = Bytes::copy_from_slice(value);
                self.map.lock().unwrap().insert(key.to_vec(), value);
                Reply::Ok
            }
            Ok(Request::Del(key)) => match self.map.lock().unwrap().remove(key) {
                Some(_) => Reply::Ok,
                None => Reply::NotFound,
            },
        };
        reply.encode()
    }
}
