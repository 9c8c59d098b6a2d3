//! The byte stream suite (`net_rs::stream::ByteStream`) over TCP, written once against
//! `Arc<dyn Runtime>` and the futures-io traits, and run under every runtime by
//! `stream_tokio.rs` and `stream_async_io.rs`. Every wait is bounded (`deadline`): a
//! regression fails, never hangs.
#![allow(dead_code)]

use std::io::{self, Read as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{select, Either};
use futures::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::pool::Rng;
use net_rs::runtime::Runtime;
use net_rs::stream::{ByteStream, StreamConfig};
use net_rs::transport::Transport;

pub use crate::common::{deadline, spawn};

fn config(rt: &Arc<dyn Runtime>) -> TcpConfig {
    TcpConfig::default().runtime(rt.clone())
}

/// A connected pair of transports on loopback: (client, server).
async fn pair_with(rt: &Arc<dyn Runtime>, cfg: TcpConfig) -> (TcpTransport, TcpTransport) {
    let l = TcpListener::bind_with("127.0.0.1:0", &cfg).await.unwrap();
    let addr = l.local_addr().unwrap();
    let accept = spawn(rt, async move { l.accept().await.unwrap() });
    let c = TcpTransport::connect_with(addr, &cfg).await.unwrap();
    let s = deadline(rt, accept).await.unwrap();
    (c, s)
}

async fn pair(rt: &Arc<dyn Runtime>) -> (TcpTransport, TcpTransport) {
    pair_with(rt, config(rt)).await
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed + 1);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// Messages of many sizes, read back through the stream with reads of every size from
/// 1 byte to more than a message: the bytes come out in order, whatever the split.
pub async fn reads_of_any_size_see_every_byte_in_order(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&rt).await;
    let sizes = [0usize, 1, 2, 3, 5, 100, 4095, 4096, 70_000];
    let reads = [1usize, 2, 3, 7, 64, 4095, 65_536, 1 << 20];
    let mut all = Vec::new();
    for (k, _) in reads.iter().enumerate() {
        for (i, &n) in sizes.iter().enumerate() {
            let m = pattern(n, (k * 100 + i) as u64);
            all.push(m.clone());
            c.send(Bytes::from(m)).await.unwrap();
        }
    }
    c.shutdown().await.unwrap();
    let per_round: usize = sizes.iter().sum();
    let mut stream = ByteStream::new(s);
    let mut expected = all.concat().into_iter();
    for &r in &reads {
        let mut got = Vec::new();
        let mut buf = vec![0u8; r];
        while got.len() < per_round {
            let want = r.min(per_round - got.len());
            let n = deadline(&rt, stream.read(&mut buf[..want])).await.unwrap();
            assert!(n > 0, "read {r}: end of stream after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        let want: Vec<u8> = expected.by_ref().take(per_round).collect();
        assert!(got == want, "reads of {r} bytes: the bytes differ");
    }
    // Then the end, on every read.
    for _ in 0..3 {
        assert_eq!(deadline(&rt, stream.read(&mut [0u8; 16])).await.unwrap(), 0);
    }
}

/// `read_exact` across message boundaries (3-byte messages, 10-byte reads), and the
/// in-place `AsyncBufRead` view (`read_until` over lines split across messages).
pub async fn read_exact_and_lines_cross_message_boundaries(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&rt).await;
    let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    for piece in data.chunks(3) {
        c.send(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    for piece in b"alpha\nbe".chunks(4).chain(b"ta\ngamma\n".chunks(5)) {
        c.send(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    c.shutdown().await.unwrap();
    let mut stream = ByteStream::new(s);
    let mut got = Vec::new();
    for _ in 0..30 {
        let mut ten = [0u8; 10];
        deadline(&rt, stream.read_exact(&mut ten)).await.unwrap();
        got.extend_from_slice(&ten);
    }
    assert_eq!(got, data);
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = deadline(&rt, stream.read_until(b'\n', &mut line))
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        lines.push(String::from_utf8(line).unwrap());
    }
    assert_eq!(lines, ["alpha\n", "beta\n", "gamma\n"]);
    let mut ten = [0u8; 10];
    let e = deadline(&rt, stream.read_exact(&mut ten))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
}

/// Writes of 1 byte to 16 MiB arrive whole and in order; no message is larger than
/// `write_chunk` (a large write is split); small writes before a flush make one
/// message.
pub async fn writes_of_any_size_arrive_split_into_bounded_messages(rt: Arc<dyn Runtime>) {
    let (c, s) = pair_with(&rt, config(&rt).max_message_size(32 << 20)).await;
    let sizes = [
        1usize,
        2,
        100,
        4095,
        4096,
        65_535,
        65_536,
        65_537,
        1 << 20,
        16 << 20,
    ];
    let chunk = 64 << 10;
    let writer = spawn(&rt, async move {
        let mut w =
            ByteStream::with_config(Box::new(c), StreamConfig::default().write_chunk(chunk));
        let mut all = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let m = pattern(n, i as u64);
            w.write_all(&m).await.unwrap();
            all.extend_from_slice(&m);
        }
        w.close().await.unwrap();
        all
    });
    let mut got = Vec::new();
    let mut largest = 0;
    loop {
        match deadline(&rt, s.recv()).await {
            Ok(m) => {
                largest = largest.max(m.len());
                got.extend_from_slice(&m);
            }
            Err(e) => {
                assert_eq!(e.kind(), net_rs::ErrorKind::Closed, "{e}");
                break;
            }
        }
    }
    let all = deadline(&rt, writer).await.unwrap();
    assert_eq!(got.len(), all.len());
    assert!(got == all, "the bytes differ");
    assert!(
        largest <= chunk,
        "a message of {largest} bytes (chunk {chunk})"
    );
    assert_eq!(largest, chunk, "bulk writes fill whole messages");

    // Small writes, then a flush: one message of exactly those bytes.
    let (c, s) = pair(&rt).await;
    let mut w = ByteStream::new(c);
    for piece in [&b"GET "[..], b"/ ", b"HTTP/1.1\r\n\r\n"] {
        w.write_all(piece).await.unwrap();
    }
    assert_eq!(w.buffered(), 18);
    deadline(&rt, w.flush()).await.unwrap();
    assert_eq!(w.buffered(), 0);
    assert_eq!(
        &deadline(&rt, s.recv()).await.unwrap()[..],
        b"GET / HTTP/1.1\r\n\r\n"
    );
}

/// Half-close both ways: the side that shut down still reads, the other reads the end
/// (0, every time) and still writes; a write after shutdown fails with `BrokenPipe`.
pub async fn half_close_both_ways(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&rt).await;
    let mut a = ByteStream::new(c);
    let mut b = ByteStream::new(s);
    a.write_all(b"question").await.unwrap();
    deadline(&rt, a.close()).await.unwrap();
    let e = a.write_all(b"more").await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    // Nothing is left to send: flush and shutdown again are fine.
    deadline(&rt, a.flush()).await.unwrap();
    deadline(&rt, a.close()).await.unwrap();
    let mut q = Vec::new();
    deadline(&rt, b.read_to_end(&mut q)).await.unwrap();
    assert_eq!(q, b"question");
    assert_eq!(deadline(&rt, b.read(&mut [0u8; 4])).await.unwrap(), 0);
    // b still writes after reading the end; a still reads after its shutdown.
    b.write_all(b"answer").await.unwrap();
    deadline(&rt, b.close()).await.unwrap();
    let mut ans = Vec::new();
    deadline(&rt, a.read_to_end(&mut ans)).await.unwrap();
    assert_eq!(ans, b"answer");
    assert_eq!(deadline(&rt, a.read(&mut [0u8; 4])).await.unwrap(), 0);
}

/// A read cancelled while it waits (raced against a timer, again and again) loses no
/// byte: the bytes come out whole and in order.
pub async fn cancelled_reads_lose_nothing(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&rt).await;
    let total = 200usize;
    let rt2 = rt.clone();
    let sender = spawn(&rt, async move {
        let mut rng = Rng::new(7);
        let mut all = Vec::new();
        for i in 0..total {
            let m = pattern(1 + rng.below(3000) as usize, i as u64);
            all.extend_from_slice(&m);
            c.send(Bytes::from(m)).await.unwrap();
            if rng.below(4) == 0 {
                c.flush().await.unwrap();
                rt2.sleep(Duration::from_micros(rng.below(2000))).await;
            }
        }
        c.shutdown().await.unwrap();
        all
    });
    let mut stream = ByteStream::new(s);
    let mut rng = Rng::new(11);
    let mut got = Vec::new();
    let mut cancelled = 0;
    let mut buf = vec![0u8; 5000];
    loop {
        let len = 1 + rng.below(5000) as usize;
        let read = std::pin::pin!(stream.read(&mut buf[..len]));
        let timer = rt.sleep(Duration::from_micros(rng.below(500)));
        match deadline(&rt, select(read, timer)).await {
            Either::Left((Ok(0), _)) => break,
            Either::Left((Ok(n), _)) => got.extend_from_slice(&buf[..n]),
            Either::Left((Err(e), _)) => panic!("read: {e}"),
            Either::Right(_) => cancelled += 1,
        }
    }
    let all = deadline(&rt, sender).await.unwrap();
    assert!(got == all, "{} bytes read, {} sent", got.len(), all.len());
    assert!(
        cancelled > 0,
        "no read was cancelled: the test tested nothing"
    );
}

/// Writes and flushes cancelled while they wait for room (the peer reads slowly, the
/// transport's send buffer is small) lose nothing and repeat nothing: exactly the
/// bytes `write` reported as written arrive, in order.
pub async fn cancelled_writes_and_flushes_lose_nothing(rt: Arc<dyn Runtime>) {
    let (c, s) = pair_with(&rt, config(&rt).send_buffer(16 << 10)).await;
    let rt2 = rt.clone();
    let reader = spawn(&rt, async move {
        let mut r = ByteStream::new(s);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7000];
        let mut reads = 0u64;
        // Not reading at first: the socket buffers fill and the writer has to wait.
        rt2.sleep(Duration::from_millis(300)).await;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
            reads += 1;
            if reads % 16 == 0 {
                rt2.sleep(Duration::from_micros(200)).await;
            }
        }
    });
    let mut w = ByteStream::with_config(Box::new(c), StreamConfig::default().write_chunk(8192));
    let mut rng = Rng::new(3);
    let mut sent = Vec::new();
    let mut cancelled = 0;
    let mut k = 0u64;
    while sent.len() < 16 << 20 {
        k += 1;
        let data = pattern(1 + rng.below(20_000) as usize, k);
        let timer = rt.sleep(Duration::from_micros(rng.below(300)));
        if rng.below(8) == 0 {
            let flush = std::pin::pin!(w.flush());
            match deadline(&rt, select(flush, timer)).await {
                Either::Left((r, _)) => r.unwrap(),
                Either::Right(_) => cancelled += 1,
            }
            continue;
        }
        let write = std::pin::pin!(w.write(&data));
        match deadline(&rt, select(write, timer)).await {
            Either::Left((r, _)) => {
                let n = r.unwrap();
                sent.extend_from_slice(&data[..n]);
            }
            Either::Right(_) => cancelled += 1,
        }
    }
    deadline(&rt, w.close()).await.unwrap();
    let got = deadline(&rt, reader).await.unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the bytes differ");
    assert!(
        cancelled > 0,
        "nothing was cancelled: the test tested nothing"
    );
}

/// A stream dropped with written, unflushed bytes hands them to the transport: the
/// peer gets them.
pub async fn a_dropped_stream_delivers_what_it_buffered(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&rt).await;
    let mut w = ByteStream::new(c);
    w.write_all(b"written, never flushed").await.unwrap();
    assert_eq!(w.buffered(), 22);
    drop(w);
    assert_eq!(
        &deadline(&rt, s.recv()).await.unwrap()[..],
        b"written, never flushed"
    );
}

/// A stream dropped while the transport has no room (its peer does not read, a write
/// waits and is given up on) may lose only what `buffered()` reported: the peer gets
/// every earlier byte, in order.
pub async fn a_drop_loses_at_most_what_buffered_reports(rt: Arc<dyn Runtime>) {
    let (c, s) = pair_with(&rt, config(&rt).send_buffer(100_000)).await;
    let data = pattern(20 << 20, 9);
    let mut w = ByteStream::new(c);
    let mut written = 0;
    loop {
        let write = std::pin::pin!(w.write(&data[written..]));
        match select(write, rt.sleep(Duration::from_millis(100))).await {
            Either::Left((r, _)) => written += r.unwrap(),
            Either::Right(_) => break,
        }
        assert!(written < data.len(), "the peer's socket took 20 MiB unread");
    }
    let buffered = w.buffered();
    assert!(
        buffered > 0,
        "a write waits for room: some bytes are not yet accepted"
    );
    drop(w);
    let mut r = ByteStream::new(s);
    let mut got = Vec::new();
    deadline(&rt, r.read_to_end(&mut got)).await.unwrap();
    assert!(
        got[..] == data[..got.len()],
        "the bytes that came are not a prefix"
    );
    assert!(
        written - got.len() <= buffered,
        "{} written bytes lost, buffered() said {buffered}",
        written - got.len()
    );
}

/// A peer that dies mid-stream gives an error, on this read and every later one (not
/// a clean end, no hang): a frame cut short, then a reset.
pub async fn a_peer_that_dies_mid_stream_is_an_error(rt: Arc<dyn Runtime>) {
    for reset in [false, true] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut sock, _) = l.accept().unwrap();
            // One whole frame, then half of the next.
            sock.write_all(&[0, 0, 0, 5]).unwrap();
            sock.write_all(b"hello").unwrap();
            sock.write_all(&[0, 0, 0, 100]).unwrap();
            sock.write_all(&[7; 10]).unwrap();
            // Wait for the client's frame of one byte (it has read the first frame by
            // then), and read it whole: unread bytes would make the close a reset.
            let mut frame = [0u8; 5];
            sock.read_exact(&mut frame).unwrap();
            if reset {
                socket2::SockRef::from(&sock)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
        });
        let t = TcpTransport::connect_with(addr, &config(&rt))
            .await
            .unwrap();
        let mut stream = ByteStream::new(t);
        let mut five = [0u8; 5];
        deadline(&rt, stream.read_exact(&mut five)).await.unwrap();
        assert_eq!(&five, b"hello");
        stream.write_all(b"!").await.unwrap();
        deadline(&rt, stream.flush()).await.unwrap();
        let mut buf = [0u8; 64];
        let e = deadline(&rt, stream.read(&mut buf)).await.unwrap_err();
        let want = if reset {
            io::ErrorKind::ConnectionReset
        } else {
            io::ErrorKind::UnexpectedEof
        };
        assert_eq!(e.kind(), want, "reset {reset}: {e}");
        let again = deadline(&rt, stream.read(&mut buf)).await.unwrap_err();
        assert_eq!(again.kind(), want, "reset {reset}, again: {again}");
        peer.join().unwrap();
    }
}

/// A write to a peer that has gone fails (no hang), and every later write and flush
/// fails too.
pub async fn writes_to_a_vanished_peer_fail(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&rt).await;
    drop(s);
    let mut w = ByteStream::new(c);
    let chunk = vec![1u8; 64 << 10];
    let err = deadline(&rt, async {
        loop {
            if let Err(e) = w.write_all(&chunk).await {
                return e;
            }
            if let Err(e) = w.flush().await {
                return e;
            }
            rt.sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected
        ),
        "{err}"
    );
    let again = w.write_all(b"x").await.unwrap_err();
    assert_eq!(again.kind(), err.kind(), "{again}");
    assert!(deadline(&rt, w.flush()).await.is_err());
}

/// `chunk()` hands out received messages as `Bytes`, without a copy, and mixes with
/// reads.
pub async fn chunks_come_as_received_bytes(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&rt).await;
    c.send(Bytes::from_static(b"first message")).await.unwrap();
    c.send(Bytes::from_static(b"second")).await.unwrap();
    c.shutdown().await.unwrap();
    let mut stream = ByteStream::new(s);
    let mut five = [0u8; 5];
    deadline(&rt, stream.read_exact(&mut five)).await.unwrap();
    assert_eq!(&five, b"first");
    assert_eq!(
        deadline(&rt, stream.chunk()).await.unwrap().as_deref(),
        Some(&b" message"[..])
    );
    assert_eq!(
        deadline(&rt, stream.chunk()).await.unwrap().as_deref(),
        Some(&b"second"[..])
    );
    assert_eq!(deadline(&rt, stream.chunk()).await.unwrap(), None);
}

/// Two streams echo through each other: many request/response rounds of random sizes
/// with a flush per request (the shape of HTTP/1.1 or a TLS handshake).
pub async fn ping_pong_rounds_of_random_sizes(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&rt).await;
    let echo = spawn(&rt, async move {
        let mut s = ByteStream::new(s);
        let mut n = 0usize;
        loop {
            let mut len = [0u8; 4];
            match s.read_exact(&mut len).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return n,
                Err(e) => panic!("{e}"),
            }
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut body).await.unwrap();
            s.write_all(&body).await.unwrap();
            s.flush().await.unwrap();
            n += 1;
        }
    });
    let mut stream = ByteStream::new(c);
    let mut rng = Rng::new(5);
    for i in 0..300u64 {
        let body = pattern(
            rng.below(if i % 10 == 0 { 200_000 } else { 300 }) as usize,
            i,
        );
        stream
            .write_all(&(body.len() as u32).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&body).await.unwrap();
        deadline(&rt, stream.flush()).await.unwrap();
        let mut back = vec![0u8; body.len()];
        deadline(&rt, stream.read_exact(&mut back)).await.unwrap();
        assert!(back == body, "round {i}: the bytes differ");
    }
    deadline(&rt, stream.close()).await.unwrap();
    assert_eq!(deadline(&rt, echo).await.unwrap(), 300);
}

/// A peer that sends nothing but empty messages (a flood of zero-length frames) does
/// not hold a read: a timer raced against the read fires on time, again and again (the
/// read yields to the executor while it skips them), and once the flood ends the read
/// returns the bytes that follow it.
pub async fn a_flood_of_empty_messages_does_not_hold_a_read(rt: Arc<dyn Runtime>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let peer = std::thread::spawn(move || {
        let (mut sock, _) = l.accept().unwrap();
        // 16,384 empty frames per write, for as long as the test wants (at most 20 s).
        let empties = vec![0u8; 64 << 10];
        let t0 = Instant::now();
        while !stop2.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(20) {
            if sock.write_all(&empties).is_err() {
                return;
            }
        }
        sock.write_all(&[0, 0, 0, 3]).unwrap();
        sock.write_all(b"end").unwrap();
    });
    let t = TcpTransport::connect_with(addr, &config(&rt))
        .await
        .unwrap();
    let mut stream = ByteStream::new(t);
    let mut buf = [0u8; 16];
    for round in 0..3 {
        let t0 = Instant::now();
        let read = std::pin::pin!(stream.read(&mut buf));
        if let Either::Left((r, _)) = select(read, rt.sleep(Duration::from_millis(100))).await {
            panic!("round {round}: the read returned {r:?} during the flood");
        }
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "round {round}: a 100 ms timer raced against the read fired after {took:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut end = [0u8; 3];
    deadline(&rt, stream.read_exact(&mut end)).await.unwrap();
    assert_eq!(&end, b"end");
    peer.join().unwrap();
}

#[macro_export]
macro_rules! stream_suite {
    ($run:path) => {
        $crate::stream_suite!(@each $run;
            reads_of_any_size_see_every_byte_in_order
            read_exact_and_lines_cross_message_boundaries
            writes_of_any_size_arrive_split_into_bounded_messages
            half_close_both_ways cancelled_reads_lose_nothing
            cancelled_writes_and_flushes_lose_nothing
            a_dropped_stream_delivers_what_it_buffered
            a_drop_loses_at_most_what_buffered_reports
            a_peer_that_dies_mid_stream_is_an_error writes_to_a_vanished_peer_fail
            chunks_come_as_received_bytes ping_pong_rounds_of_random_sizes
            a_flood_of_empty_messages_does_not_hold_a_read);
    };
    (@each $run:path; $($name:ident)*) => {
        $(
            #[test]
            fn $name() {
                $run(|rt| Box::pin($crate::stream_suite::$name(rt)));
            }
        )*
    };
}
