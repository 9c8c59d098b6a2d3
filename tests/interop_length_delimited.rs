//! Wire compatibility with tokio-util's `LengthDelimitedCodec` (default settings), both
#![cfg(feature = "tokio")]
//! ways: net-rs talks to a `Framed` peer and a `Framed` peer talks to net-rs.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use net_rs::drivers::tcp::{TcpListener, TcpTransport};
use net_rs::transport::Transport;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

fn messages() -> Vec<Bytes> {
    [0usize, 1, 5, 300, 70_000, 1 << 20]
        .iter()
        .map(|&n| (0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>().into())
        .collect()
}

#[tokio::test]
async fn net_rs_client_with_framed_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(sock, LengthDelimitedCodec::new());
        let mut got = Vec::new();
        // Echo each frame reversed, so the reply is provably produced by the peer.
        while let Some(frame) = framed.next().await {
            let frame = frame.unwrap();
            got.push(frame.clone().freeze());
            let mut rev = frame.to_vec();
            rev.reverse();
            framed.send(Bytes::from(rev)).await.unwrap();
        }
        got
    });
    let t = TcpTransport::connect(addr).await.unwrap();
    for m in messages() {
        t.send(m.clone()).await.unwrap();
        let back = t.recv().await.unwrap();
        let mut rev = m.to_vec();
        rev.reverse();
        assert_eq!(back, Bytes::from(rev));
    }
    t.close().await.unwrap();
    assert_eq!(
        server.await.unwrap(),
        messages(),
        "Framed decoded every net-rs frame"
    );
}

#[tokio::test]
async fn framed_client_with_net_rs_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let conn = listener.accept().await.unwrap();
        let mut got = Vec::new();
        while let Ok(m) = conn.recv().await {
            got.push(m.clone());
            conn.send(m).await.unwrap();
        }
        got
    });
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut framed = Framed::new(sock, LengthDelimitedCodec::new());
    for m in messages() {
        framed.send(m.clone()).await.unwrap();
        let back = framed.next().await.unwrap().unwrap();
        assert_eq!(back.freeze(), m);
    }
    drop(framed);
    assert_eq!(server.await.unwrap(), messages());
}

#[test]
fn header_bytes_match_the_codec() {
    use tokio_util::codec::Encoder;
    let mut codec = LengthDelimitedCodec::new();
    let mut out = bytes::BytesMut::new();
    codec
        .encode(Bytes::from_static(b"hello"), &mut out)
        .unwrap();
    let ours = net_rs::codec::encode_header(5, usize::MAX).unwrap();
    assert_eq!(&out[..4], &ours[..]);
    assert_eq!(&out[4..], b"hello");
}
