//! The TCP frame decoder (`net_rs::codec::Decoder`) fed a byte stream in arbitrary
//! splits, the two ways `TcpTransport` drives it: whole frames split off the buffer
//! (`decode`), or a header read and the payload taken straight from the stream, as for
//! large messages (`decode_head`, then `finish_frame`). Checked against a one-pass parse
//! of the whole stream:
//!
//! * no panic; frames come out intact and in order, and frames encoded by
//!   `encode_header` come out as they went in;
//! * a length over the maximum fails with `MessageTooLarge { received: true }` as soon as
//!   its four bytes are buffered, and no decoder call ever grows the buffer (nothing is
//!   reserved for a length, oversized or not);
//! * at the end of the stream the decoder's state (`at_boundary`, `pending_len`) says
//!   exactly how much of a frame is missing.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use net_rs::codec::{encode_header, Decoder, HEADER_LEN};
use net_rs::ErrorKind;

/// Where a one-pass parse of the whole stream stops.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Exactly between two frames.
    Boundary,
    /// Inside a length prefix.
    Head,
    /// Inside the payload of a frame of this length.
    Body(usize),
    /// At a length prefix over the maximum.
    Oversized(usize),
}

fn reference(mut rest: &[u8], max: usize) -> (Vec<Vec<u8>>, End) {
    let mut frames = Vec::new();
    loop {
        if rest.is_empty() {
            return (frames, End::Boundary);
        }
        let Some(head) = rest.first_chunk::<HEADER_LEN>() else {
            return (frames, End::Head);
        };
        let n = u32::from_be_bytes(*head) as usize;
        if n > max {
            return (frames, End::Oversized(n));
        }
        let body = &rest[HEADER_LEN..];
        if body.len() < n {
            return (frames, End::Body(n));
        }
        frames.push(body[..n].to_vec());
        rest = &body[n..];
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(Unstructured::new(data));
});

fn run(mut u: Unstructured<'_>) -> Result<()> {
    let max = match u.int_in_range(0..=3u8)? {
        0 => usize::MAX,
        1 => u32::MAX as usize,
        _ => u.int_in_range(0..=1024usize)?,
    };
    // Frames at least this long are read past the buffer (`decode_head` path).
    let direct_from = match u.arbitrary::<bool>()? {
        true => Some(u.int_in_range(0..=64usize)?),
        false => None,
    };
    let splits: Vec<u8> = u.arbitrary()?;
    let mut sent = Vec::new();
    let mut stream = Vec::new();
    for _ in 0..u.int_in_range(0..=8u8)? {
        let len = u.int_in_range(0..=max.min(300))?;
        let payload = u.bytes(len)?.to_vec();
        stream.extend_from_slice(&encode_header(len, max).expect("len <= max"));
        stream.extend_from_slice(&payload);
        sent.push(payload);
    }
    // Then anything at all.
    stream.extend_from_slice(u.take_rest());

    let mut d = Decoder::new(max);
    let mut buf = BytesMut::new();
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut error = None;
    let (mut pos, mut step) = (0, 0);
    'feed: loop {
        loop {
            let cap = buf.capacity();
            let head = d.decode_head(&mut buf);
            assert!(buf.capacity() <= cap, "decode_head grew the buffer");
            let n = match head {
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
                Ok(None) => break,
                Ok(Some(n)) => n,
            };
            assert!(n <= max);
            assert_eq!(d.pending_len(), Some(n));
            if buf.len() >= n {
                let cap = buf.capacity();
                let frame = d.decode(&mut buf).expect("header already read");
                assert!(buf.capacity() <= cap, "decode grew the buffer");
                out.push(frame.expect("a whole frame is buffered").to_vec());
            } else if direct_from.is_some_and(|from| n >= from) {
                // The payload goes straight from the stream into the message.
                let mut msg = buf.split().to_vec();
                let take = (n - msg.len()).min(stream.len() - pos);
                msg.extend_from_slice(&stream[pos..pos + take]);
                pos += take;
                if msg.len() < n {
                    // The stream ended inside this frame.
                    let (frames, end) = reference(&stream, max);
                    assert_eq!(out, frames);
                    assert_eq!(end, End::Body(n));
                    assert_eq!(d.pending_len(), Some(n));
                    return Ok(());
                }
                d.finish_frame();
                out.push(msg);
            } else {
                break;
            }
        }
        if pos == stream.len() {
            break;
        }
        let size = match splits.get(step % splits.len().max(1)) {
            Some(&s) => usize::from(s),
            None => stream.len(),
        };
        // Zero-length steps exercise a decoder called with nothing new; every few steps
        // take at least one byte so the run ends.
        let size = if step % 4 == 3 { size.max(1) } else { size };
        step += 1;
        let end = (pos + size).min(stream.len());
        buf.extend_from_slice(&stream[pos..end]);
        pos = end;
    }

    let (frames, end) = reference(&stream, max);
    assert_eq!(out, frames);
    assert!(out.len() >= sent.len() && out[..sent.len()] == sent[..]);
    match (error, end) {
        (Some(e), End::Oversized(n)) => {
            assert_eq!(
                e.kind(),
                ErrorKind::MessageTooLarge {
                    size: n as u64,
                    max,
                    received: true
                }
            );
            assert!(e.to_string().contains(&n.to_string()), "{e}");
        }
        (Some(e), end) => panic!("decoder failed with {e} where the stream ends {end:?}"),
        (None, End::Boundary) => assert!(d.at_boundary(&buf)),
        (None, End::Head) => {
            assert!(!d.at_boundary(&buf) && d.pending_len().is_none());
            assert!(buf.len() < HEADER_LEN);
        }
        (None, End::Body(n)) => {
            assert!(!d.at_boundary(&buf));
            assert_eq!(d.pending_len(), Some(n));
            assert!(buf.len() < n);
        }
        (None, End::Oversized(n)) => panic!("length {n} over the maximum {max} was accepted"),
    }
    Ok(())
}
