//! The byte stream suite under tokio (current-thread and multi-thread runtimes), and
//! the stream through tokio's own I/O traits: `tokio::io::copy`, tokio-util's codecs.
#![cfg(feature = "tokio")]

mod common;
mod stream_suite;

mod current_thread {
    crate::stream_suite!(crate::common::run_tokio_current_thread);
}

mod multi_thread {
    crate::stream_suite!(crate::common::run_tokio_multi_thread);
}

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use net_rs::drivers::tcp::{TcpListener, TcpTransport};
use net_rs::stream::ByteStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Framed, LinesCodec};

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test step hung for 30 s")
}

async fn pair() -> (TcpTransport, TcpTransport) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accept = tokio::spawn(async move { l.accept().await.unwrap() });
    let c = TcpTransport::connect(addr).await.unwrap();
    (c, bounded(accept).await.unwrap())
}

/// tokio's traits: `copy` 3 MiB through an echo made of `tokio::io::split` halves,
/// `read_to_end` after a half-close.
#[tokio::test]
async fn tokio_io_copy_through_an_echo() {
    let (c, s) = pair().await;
    let echo = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(ByteStream::new(s));
        let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
        n
    });
    let (mut r, mut w) = tokio::io::split(ByteStream::new(c));
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7) as u8).collect();
    let d = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&d).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    bounded(r.read_to_end(&mut back)).await.unwrap();
    bounded(writer).await.unwrap();
    assert_eq!(bounded(echo).await.unwrap(), data.len() as u64);
    assert!(back == data, "the echoed bytes differ");
}

/// tokio-util's `Framed` with a line codec over the stream: lines split across and
/// packed into messages come out as the lines written.
#[tokio::test]
async fn a_tokio_util_codec_runs_on_the_stream() {
    let (c, s) = pair().await;
    let server = tokio::spawn(async move {
        let mut lines = Framed::new(ByteStream::new(s), LinesCodec::new());
        while let Some(line) = lines.next().await {
            let line = line.unwrap();
            lines.send(line.to_uppercase()).await.unwrap();
        }
    });
    let mut lines = Framed::new(ByteStream::new(c), LinesCodec::new());
    for word in ["alpha", "beta", "a much longer line than the others"] {
        bounded(lines.send(word.to_string())).await.unwrap();
        let back = bounded(lines.next()).await.unwrap().unwrap();
        assert_eq!(back, word.to_uppercase());
    }
    bounded(SinkExt::<String>::close(&mut lines)).await.unwrap();
    drop(lines);
    bounded(server).await.unwrap();
}
