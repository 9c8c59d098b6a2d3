//! The TCP behaviour suite, written once against `Arc<dyn Runtime>` and run under every
//! runtime by `tcp_tokio.rs` and `tcp_async_io.rs`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{select, Either};
use futures::stream::FusedStream;
use futures::{SinkExt, StreamExt};
use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::pool::{ConnectionPool, PoolConfig, TcpConnector};
use net_rs::runtime::Runtime;
use net_rs::transport::{BoxTransport, Messages, Transport};
use net_rs::ErrorKind;

pub use crate::common::{deadline, spawn};

fn config(rt: &Arc<dyn Runtime>) -> TcpConfig {
    TcpConfig::default().runtime(rt.clone())
}

async fn pair(cfg: &TcpConfig) -> (TcpTransport, TcpTransport) {
    let l = TcpListener::bind_with("127.0.0.1:0", cfg).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (c, s) = futures::join!(TcpTransport::connect_with(addr, cfg), l.accept());
    (c.unwrap(), s.unwrap())
}

fn pattern(n: usize, seed: u8) -> Bytes {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// A raw blocking peer on a std thread: accepts one connection and runs `f` on it.
/// Await `.join()` on the returned handle (it never blocks the runtime's thread).
fn raw_peer(f: impl FnOnce(std::net::TcpStream) + Send + 'static) -> (SocketAddr, Peer) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        f(s);
        let _ = tx.send(());
    });
    (addr, Peer(rx))
}

struct Peer(oneshot::Receiver<()>);

impl Peer {
    async fn join(self) -> Result<(), oneshot::Canceled> {
        self.0.await
    }
}

pub async fn echo_all_sizes(rt: Arc<dyn Runtime>) {
    let max = (1 << 20) + 3;
    let cfg = config(&rt).max_message_size(max);
    let (c, s) = pair(&cfg).await;
    let server = spawn(&rt, async move {
        while let Ok(m) = s.recv().await {
            s.send(m).await.unwrap();
        }
    });
    for (i, n) in [0usize, 1, 64, 4095, 8193, 65536, 65537, 300_000, max]
        .into_iter()
        .enumerate()
    {
        let msg = pattern(n, i as u8);
        deadline(&rt, c.send(msg.clone())).await.unwrap();
        let back = deadline(&rt, c.recv()).await.unwrap();
        assert_eq!(back.len(), n);
        assert!(back == msg, "payload of {n} bytes came back changed");
    }
    deadline(&rt, c.close()).await.unwrap();
    deadline(&rt, server).await.unwrap();
}

pub async fn latency_mode_keeps_every_guarantee(rt: Arc<dyn Runtime>) {
    let cfg = config(&rt).busy_poll(Duration::from_micros(300));
    let (c, s) = pair(&cfg).await;
    let server = spawn(&rt, async move {
        while let Ok(m) = s.recv().await {
            s.send(m).await.unwrap();
        }
    });
    for (i, n) in [0usize, 5, 70_000, 1 << 20].into_iter().enumerate() {
        let msg = pattern(n, i as u8);
        deadline(&rt, c.send(msg.clone())).await.unwrap();
        assert!(deadline(&rt, c.recv()).await.unwrap() == msg);
    }
    for i in 0..500u32 {
        c.send(Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
        let m = deadline(&rt, c.recv()).await.unwrap();
        assert_eq!(u32::from_be_bytes(m[..].try_into().unwrap()), i);
    }
    // Streaming in latency mode: order and completeness still hold.
    for i in 0..5000u32 {
        c.send(Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    for i in 0..5000u32 {
        let m = deadline(&rt, c.recv()).await.unwrap();
        assert_eq!(u32::from_be_bytes(m[..].try_into().unwrap()), i);
    }
    deadline(&rt, c.shutdown()).await.unwrap();
    deadline(&rt, server).await.unwrap();
    assert_eq!(
        deadline(&rt, c.recv()).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

pub async fn seed_example_alloc_buf(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&config(&rt)).await;
    let mut buf = c.alloc_buf(1024).unwrap();
    buf[..4].copy_from_slice(b"ping");
    c.send(buf.freeze()).await.unwrap();
    let got = deadline(&rt, s.recv()).await.unwrap();
    assert_eq!(got.len(), 1024);
    assert_eq!(&got[..4], b"ping");
    assert!(got[4..].iter().all(|&b| b == 0));
    // A buffer that could not be sent, or not be had at all: an error, never an abort.
    let max = c.max_message_size();
    assert!(matches!(
        c.alloc_buf(max + 1).unwrap_err().kind(),
        ErrorKind::MessageTooLarge { .. }
    ));
    assert!(c.alloc_buf(usize::MAX / 2).is_err());
    assert_eq!(c.alloc_buf(max).unwrap().len(), max);
}

pub async fn many_small_messages_in_order(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&config(&rt).send_buffer(4096)).await;
    const N: u32 = 20_000;
    let reader = spawn(&rt, async move {
        for i in 0..N {
            let m = s.recv().await.unwrap();
            assert_eq!(m.len(), 4 + (i % 50) as usize);
            assert_eq!(u32::from_be_bytes(m[..4].try_into().unwrap()), i);
        }
        s
    });
    for i in 0..N {
        let mut v = i.to_be_bytes().to_vec();
        v.resize(4 + (i % 50) as usize, 0xEE);
        c.send(v.into()).await.unwrap();
    }
    deadline(&rt, c.flush()).await.unwrap();
    let s = deadline(&rt, reader).await.unwrap();
    drop(c);
    let end = deadline(&rt, s.recv()).await.unwrap_err();
    assert_eq!(end.kind(), ErrorKind::Closed);
}

pub async fn oversized_send_fails_before_writing(rt: Arc<dyn Runtime>) {
    let cfg = config(&rt).max_message_size(1000);
    let (c, s) = pair(&cfg).await;
    let err = c.send(pattern(1001, 0)).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::MessageTooLarge {
            size: 1001,
            max: 1000,
            received: false
        }
    );
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert!(
        !c.is_closed(),
        "an oversized send leaves the connection usable"
    );
    c.send(pattern(1000, 1)).await.unwrap();
    let got = deadline(&rt, s.recv()).await.unwrap();
    assert!(
        got == pattern(1000, 1),
        "the peer sees only the valid message"
    );
}

pub async fn oversized_frame_is_rejected_and_closes(rt: Arc<dyn Runtime>) {
    let (addr, peer) = raw_peer(|mut s| {
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(b"abc").unwrap();
        s.write_all(&2000u32.to_be_bytes()).unwrap();
        s.write_all(&[0u8; 2000]).ok();
        // The receiver must close the connection: we read EOF (or a reset).
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf);
        assert!(matches!(r, Ok(0) | Err(_)), "connection still open: {r:?}");
    });
    let cfg = config(&rt).max_message_size(1024);
    let c = TcpTransport::connect_with(addr, &cfg).await.unwrap();
    assert_eq!(&deadline(&rt, c.recv()).await.unwrap()[..], b"abc");
    let err = deadline(&rt, c.recv()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::MessageTooLarge {
            size: 2000,
            max: 1024,
            received: true
        }
    );
    let text = err.to_string();
    assert!(text.contains("2000") && text.contains("1024"), "{text}");
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::InvalidData
    );
    assert!(c.is_closed());
    assert!(deadline(&rt, c.recv()).await.is_err());
    assert!(c.send(Bytes::from_static(b"x")).await.is_err());
    drop(c);
    deadline(&rt, peer.join())
        .await
        .expect("the raw peer panicked");
}

pub async fn garbage_length_prefix_is_rejected(rt: Arc<dyn Runtime>) {
    let (addr, peer) = raw_peer(|mut s| {
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf);
    });
    let c = TcpTransport::connect_with(addr, &config(&rt))
        .await
        .unwrap();
    let err = deadline(&rt, c.recv()).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::MessageTooLarge { received: true, .. }
        ),
        "{err:?}"
    );
    drop(c);
    deadline(&rt, peer.join())
        .await
        .expect("the raw peer panicked");
}

pub async fn truncated_frame_gives_unexpected_eof(rt: Arc<dyn Runtime>) {
    for (tail, big) in [(10usize, false), (70_000, true)] {
        let (addr, peer) = raw_peer(move |mut s| {
            s.write_all(&2u32.to_be_bytes()).unwrap();
            s.write_all(b"ok").unwrap();
            let claimed = if big { 100_000u32 } else { 100 };
            s.write_all(&claimed.to_be_bytes()).unwrap();
            s.write_all(&vec![1u8; tail]).unwrap();
        });
        let c = TcpTransport::connect_with(addr, &config(&rt))
            .await
            .unwrap();
        assert_eq!(
            &deadline(&rt, c.recv()).await.unwrap()[..],
            b"ok",
            "complete frames first"
        );
        let err = deadline(&rt, c.recv()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(
            std::io::Error::from(err).kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        deadline(&rt, peer.join())
            .await
            .expect("the raw peer panicked");
    }
    // A peer that dies inside the length prefix.
    let (addr, peer) = raw_peer(|mut s| s.write_all(&[0, 0]).unwrap());
    let c = TcpTransport::connect_with(addr, &config(&rt))
        .await
        .unwrap();
    let err = deadline(&rt, c.recv()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    deadline(&rt, peer.join())
        .await
        .expect("the raw peer panicked");
}

pub async fn orderly_shutdown_delivers_everything(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&config(&rt)).await;
    for i in 0..3u8 {
        c.send(pattern(100 * i as usize, i)).await.unwrap();
    }
    deadline(&rt, c.shutdown()).await.unwrap();
    assert!(
        c.send(Bytes::new()).await.is_err(),
        "no send after shutdown"
    );
    let mut got = Vec::new();
    let mut stream = s.messages();
    while let Some(m) = deadline(&rt, stream.next()).await {
        got.push(m.unwrap());
    }
    assert_eq!(got.len(), 3, "Stream ends after the peer's last message");
    drop(stream);
    // The half-closed side can still receive.
    s.send(Bytes::from_static(b"late")).await.unwrap();
    assert_eq!(&deadline(&rt, c.recv()).await.unwrap()[..], b"late");
}

/// `Duration::MAX` is a natural way to say "no limit": a connection whose linger and
/// connect timeout are `Duration::MAX` works, closes, and lets go when dropped (with
/// messages still to deliver), without a panic; everything sent arrives.
pub async fn no_limit_durations_neither_panic_nor_hang(rt: Arc<dyn Runtime>) {
    let cfg = config(&rt)
        .linger(Duration::MAX)
        .connect_timeout(Some(Duration::MAX));
    // `close`.
    let (c, s) = pair(&cfg).await;
    c.send(pattern(1000, 1)).await.unwrap();
    deadline(&rt, c.close()).await.unwrap();
    assert_eq!(deadline(&rt, s.recv()).await.unwrap(), pattern(1000, 1));
    assert_eq!(
        deadline(&rt, s.recv()).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    // The last handle dropped with a message larger than the socket takes at once.
    let (c, s) = pair(&cfg).await;
    c.send(pattern(4 << 20, 2)).await.unwrap();
    drop(c);
    assert_eq!(deadline(&rt, s.recv()).await.unwrap(), pattern(4 << 20, 2));
    assert_eq!(
        deadline(&rt, s.recv()).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    // Both ends at once.
    let (c, s) = pair(&cfg).await;
    c.send(pattern(10, 3)).await.unwrap();
    assert_eq!(deadline(&rt, s.recv()).await.unwrap(), pattern(10, 3));
    drop((c, s));
}

pub async fn recv_is_cancel_safe(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&config(&rt)).await;
    const N: u32 = 200;
    let rt2 = rt.clone();
    let sender = spawn(&rt, async move {
        for i in 0..N {
            s.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                .await
                .unwrap();
            if i % 10 == 0 {
                rt2.sleep(Duration::from_millis(1)).await;
            }
        }
        s
    });
    let mut next = 0u32;
    let mut cancelled = 0;
    while next < N {
        let recv = std::pin::pin!(c.recv());
        match select(recv, rt.sleep(Duration::from_micros(200))).await {
            Either::Left((m, _)) => {
                assert_eq!(u32::from_be_bytes(m.unwrap()[..].try_into().unwrap()), next);
                next += 1;
            }
            Either::Right(_) => cancelled += 1,
        }
    }
    assert!(
        cancelled > 0,
        "the timer never won; the test exercised nothing"
    );
    let _s = deadline(&rt, sender).await.unwrap();
}

pub async fn concurrent_receivers_share_the_stream(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&config(&rt)).await;
    let s = Arc::new(s);
    const N: usize = 3000;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let s = s.clone();
        tasks.push(spawn(&rt, async move {
            let mut got = Vec::new();
            loop {
                match s.recv().await {
                    Ok(m) if m.is_empty() => break,
                    Ok(m) => got.push(u32::from_be_bytes(m[..].try_into().unwrap())),
                    Err(e) => panic!("{e}"),
                }
            }
            got
        }));
    }
    for i in 0..N as u32 {
        c.send(Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        c.send(Bytes::new()).await.unwrap();
    }
    let mut all = Vec::new();
    for t in tasks {
        let got = deadline(&rt, t).await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "each receiver sees increasing ids"
        );
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (0..N as u32).collect::<Vec<_>>(),
        "every message exactly once"
    );
}

pub async fn dropped_send_sends_nothing(rt: Arc<dyn Runtime>) {
    let cfg = config(&rt).send_buffer(64 * 1024);
    let (c, s) = pair(&cfg).await;
    // Fill the socket buffers and our queue: the peer is not reading.
    let chunk = pattern(60_000, 9);
    let mut accepted = 0usize;
    loop {
        let send = std::pin::pin!(c.send(chunk.clone()));
        match select(send, rt.sleep(Duration::from_millis(300))).await {
            Either::Left((r, _)) => {
                r.unwrap();
                accepted += 1;
                assert!(accepted < 10_000, "send never applied backpressure");
            }
            // The send waited for room and was dropped: this message must never arrive.
            Either::Right(_) => break,
        }
    }
    let sender = spawn(&rt, async move {
        // Dropping a pending send must not have queued anything: "end" follows the
        // accepted messages directly (it may itself wait for room).
        c.send(Bytes::from_static(b"end")).await.unwrap();
        c.flush().await.unwrap();
        c
    });
    let mut n = 0;
    loop {
        let m = deadline(&rt, s.recv()).await.unwrap();
        if &m[..] == b"end" {
            break;
        }
        assert!(m == chunk);
        n += 1;
    }
    assert_eq!(
        n, accepted,
        "exactly the accepted messages arrive before the marker"
    );
    let _c = deadline(&rt, sender).await.unwrap();
}

pub async fn send_and_recv_from_different_tasks(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&config(&rt)).await;
    let c = Arc::new(c);
    let echo = spawn(&rt, async move {
        while let Ok(m) = s.recv().await {
            if s.send(m).await.is_err() {
                break;
            }
        }
    });
    const N: u32 = 2000;
    let c2 = c.clone();
    let sender = spawn(&rt, async move {
        for i in 0..N {
            c2.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                .await
                .unwrap();
        }
    });
    for i in 0..N {
        let m = deadline(&rt, c.recv()).await.unwrap();
        assert_eq!(u32::from_be_bytes(m[..].try_into().unwrap()), i);
    }
    deadline(&rt, sender).await.unwrap();
    deadline(&rt, c.close()).await.unwrap();
    deadline(&rt, echo).await.unwrap();
}

pub async fn close_fails_pending_recv(rt: Arc<dyn Runtime>) {
    let (c, _s) = pair(&config(&rt)).await;
    let c = Arc::new(c);
    let c2 = c.clone();
    let pending = spawn(&rt, async move { c2.recv().await });
    rt.sleep(Duration::from_millis(50)).await;
    deadline(&rt, c.close()).await.unwrap();
    let err = deadline(&rt, pending).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert!(c.is_closed());
    assert_eq!(
        c.send(Bytes::new()).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

/// A peer that waits 100 ms and closes without reading what we sent: the kernel
/// answers that with a reset.
fn resetting_peer() -> (SocketAddr, Peer) {
    raw_peer(|s| {
        std::thread::sleep(Duration::from_millis(100));
        // Close with unread data pending makes the kernel send a reset.
        drop(s);
    })
}

pub async fn dead_peer_fails_pending_operations(rt: Arc<dyn Runtime>) {
    let (addr, peer) = resetting_peer();
    let c = TcpTransport::connect_with(addr, &config(&rt))
        .await
        .unwrap();
    c.send(pattern(10, 0)).await.unwrap();
    let err = deadline(&rt, c.recv()).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Closed | ErrorKind::ConnectionReset),
        "{err:?}"
    );
    deadline(&rt, peer.join())
        .await
        .expect("the raw peer panicked");
    // Sending into a dead connection fails eventually instead of queueing forever.
    let mut failed = false;
    for _ in 0..200 {
        if c.send(pattern(1000, 0)).await.is_err() || c.flush().await.is_err() {
            failed = true;
            break;
        }
        rt.sleep(Duration::from_millis(5)).await;
    }
    assert!(failed, "sends into a reset connection kept succeeding");
    assert!(c.is_closed());
}

/// A reset reported to one direction ends the other too: after `recv` saw it, `send`
/// fails (it must not accept a message that can never go out); after `send` (or
/// `flush`) saw it, `recv` reports it instead of an orderly end (the socket reports
/// its error once, to whichever call comes first; reads then only see the end).
pub async fn a_reset_seen_by_one_direction_fails_the_other(rt: Arc<dyn Runtime>) {
    for recv_first in [true, false] {
        let (addr, peer) = resetting_peer();
        let c = TcpTransport::connect_with(addr, &config(&rt))
            .await
            .unwrap();
        c.send(pattern(10, 0)).await.unwrap();
        deadline(&rt, peer.join())
            .await
            .expect("the raw peer panicked");
        rt.sleep(Duration::from_millis(50)).await;
        if recv_first {
            let err = deadline(&rt, c.recv()).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
            let sent = c.send(Bytes::from_static(b"lost")).await;
            assert!(sent.is_err(), "send accepted a message after the reset");
        } else {
            // Writes find the reset (the first one may still be taken by the kernel).
            let mut err = None;
            for _ in 0..100 {
                if let Err(e) = async {
                    c.send(pattern(1000, 0)).await?;
                    c.flush().await
                }
                .await
                {
                    err = Some(e);
                    break;
                }
                rt.sleep(Duration::from_millis(5)).await;
            }
            let err = err.expect("writes into a reset connection kept succeeding");
            let end = deadline(&rt, c.recv()).await.unwrap_err();
            assert_ne!(end.kind(), ErrorKind::Closed, "{end}: not an orderly end");
            assert_eq!(end.kind(), err.kind(), "{end} / {err}");
            let mut view = c.messages();
            let item = deadline(&rt, view.next()).await;
            assert!(matches!(item, Some(Err(_))), "the stream yields the error");
        }
        assert!(c.is_closed());
    }
}

/// The peer sent something this side never read, and this side ends right after two
/// large sends: by `close`, by `shutdown` and drop, or by dropping the transport. A
/// socket closed with unread input answers with a reset that throws away what is still
/// in flight; every accepted message must still arrive, intact, and the peer then sees
/// an orderly end.
pub async fn ending_with_unread_input_loses_nothing(rt: Arc<dyn Runtime>) {
    for how in ["close", "shutdown", "drop"] {
        let size = 4 << 20;
        let (addr, peer) = {
            let (tx, rx) = oneshot::channel();
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                // One message the transport never reads, then a slow start.
                s.write_all(&[0, 0, 0, 2, b'h', b'i']).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut got = Vec::new();
                let mut head = [0u8; 4];
                let end = loop {
                    if let Err(e) = s.read_exact(&mut head) {
                        break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            Ok(())
                        } else {
                            Err(e.to_string())
                        };
                    }
                    let mut m = vec![0u8; u32::from_be_bytes(head) as usize];
                    if let Err(e) = s.read_exact(&mut m) {
                        break Err(format!("inside message {}: {e}", got.len()));
                    }
                    got.push(m);
                };
                let _ = tx.send((got, end));
            });
            (addr, rx)
        };
        let t = TcpTransport::connect_with(addr, &config(&rt))
            .await
            .unwrap();
        let a = pattern(size, 1);
        let b = pattern(size, 2);
        t.send(a.clone()).await.unwrap();
        t.send(b.clone()).await.unwrap();
        match how {
            "close" => deadline(&rt, t.close()).await.unwrap(),
            "shutdown" => {
                deadline(&rt, t.shutdown()).await.unwrap();
                drop(t);
            }
            _ => drop(t),
        }
        let (got, end) = deadline(&rt, peer).await.unwrap();
        assert_eq!(end, Ok(()), "{how}: the peer's read ended badly");
        assert_eq!(got.len(), 2, "{how}: both accepted messages arrive");
        assert!(got[0] == a && got[1] == b, "{how}: intact");
    }
}

pub async fn connection_refused(rt: Arc<dyn Runtime>) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = TcpTransport::connect_with(("127.0.0.1", port), &config(&rt))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(
        err.to_string().contains(&port.to_string()),
        "error names the address: {err}"
    );
    // Debug is one line: kind, message, and the OS error's text once (not once per
    // layer of wrapping).
    let dbg = format!("{err:?}");
    assert!(!dbg.contains('\n'), "{dbg}");
    assert!(dbg.starts_with("Error(ConnectionRefused): "), "{dbg}");
    let mut os: &dyn std::error::Error = &err;
    while let Some(below) = os.source() {
        os = below;
    }
    let os = os.to_string();
    assert_eq!(dbg.matches(&os).count(), 1, "the OS error once: {dbg}");
    let io: std::io::Error = err.into();
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
}

pub async fn bind_error_names_the_address(rt: Arc<dyn Runtime>) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = TcpListener::bind_with(addr, &config(&rt))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Io(std::io::ErrorKind::AddrInUse),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("bind {addr}: ")),
        "the error names the address: {text}"
    );
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::AddrInUse
    );
}

pub async fn stream_and_sink(rt: Arc<dyn Runtime>) {
    let (mut c, s) = pair(&config(&rt)).await;
    // With `SinkExt` in scope, `send` on the transport is `Transport::send` however it
    // is borrowed: the transport is no `Sink` (this would not compile if it were, the
    // error types differ).
    // The `&mut` borrow is the point: it is what used to pick `SinkExt::send`.
    #[allow(clippy::unnecessary_mut_passed, clippy::needless_borrow)]
    let first: net_rs::Result<()> = (&mut c).send(Bytes::from_static(b"first")).await;
    first.unwrap();
    let first: net_rs::Result<()> = c.send(Bytes::from_static(b"second")).await;
    first.unwrap();

    let msgs: Vec<Bytes> = (0..500).map(|i| pattern(i % 300, i as u8)).collect();
    let mut expect = vec![Bytes::from_static(b"first"), Bytes::from_static(b"second")];
    expect.extend(msgs.iter().cloned());
    // A 'static stream over a shared transport, moved into a task.
    let s = Arc::new(s);
    let stream = Messages::from_handle(s.clone());
    let reader = spawn(&rt, async move {
        stream.map(|m| m.unwrap()).collect::<Vec<Bytes>>().await
    });
    let mut sink = c.messages();
    let mut items = futures::stream::iter(msgs.into_iter().map(Ok));
    deadline(&rt, sink.send_all(&mut items)).await.unwrap();
    // `poll_close` is the transport's `close`: it also stops receiving.
    deadline(&rt, SinkExt::close(&mut sink)).await.unwrap();
    assert!(c.is_closed());
    assert_eq!(
        deadline(&rt, c.recv()).await.unwrap_err().kind(),
        ErrorKind::Closed,
        "close, not just shutdown"
    );
    assert_eq!(deadline(&rt, reader).await.unwrap(), expect);
}

pub async fn sink_flush_is_the_transports_flush(rt: Arc<dyn Runtime>) {
    let cfg = config(&rt).send_buffer(128 << 20);
    let (c, s) = pair(&cfg).await;
    let mut sink = c.messages();
    let chunk = pattern(1 << 20, 4);
    const N: usize = 64;
    // `feed` queues without flushing; 64 MiB is more than the socket buffers hold.
    for _ in 0..N {
        deadline(&rt, sink.feed(chunk.clone())).await.unwrap();
    }
    match select(sink.flush(), rt.sleep(Duration::from_millis(300))).await {
        Either::Left((r, _)) => panic!("flush finished while the peer read nothing: {r:?}"),
        Either::Right(_) => {}
    }
    let reader = spawn(&rt, async move {
        for _ in 0..N {
            assert!(s.recv().await.unwrap().len() == 1 << 20);
        }
        s
    });
    deadline(&rt, sink.flush()).await.unwrap();
    let _s = deadline(&rt, reader).await.unwrap();

    // An oversized message fails in the sink and leaves the connection usable.
    let cfg = config(&rt).max_message_size(100);
    let (c, s) = pair(&cfg).await;
    let mut sink = c.messages();
    let err = deadline(&rt, sink.send(pattern(101, 0))).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::MessageTooLarge {
                size: 101,
                max: 100,
                received: false
            }
        ),
        "{err:?}"
    );
    deadline(&rt, sink.send(pattern(100, 1))).await.unwrap();
    assert!(deadline(&rt, s.recv()).await.unwrap() == pattern(100, 1));
}

/// Collect what a stream yields until it ends; fail if it goes on (the old behaviour:
/// the same error forever).
async fn drain<T: Transport>(
    rt: &Arc<dyn Runtime>,
    stream: &mut Messages<'_, T>,
) -> Vec<net_rs::Result<Bytes>> {
    let mut items = Vec::new();
    while let Some(item) = deadline(rt, stream.next()).await {
        items.push(item);
        assert!(items.len() <= 10, "the stream does not end: {items:?}");
    }
    items
}

/// After the first fatal error the stream yields it once and ends; `recv` keeps
/// returning it. Three causes: an oversized length, a frame cut short by the peer's
/// close, and a connection reset.
pub async fn stream_ends_after_a_fatal_error(rt: Arc<dyn Runtime>) {
    async fn check(
        rt: &Arc<dyn Runtime>,
        c: &TcpTransport,
        mut stream: Messages<'_, TcpTransport>,
        kind: ErrorKind,
    ) {
        let items = drain(rt, &mut stream).await;
        assert_eq!(items.len(), 1, "one error, then the end: {items:?}");
        let err = items.into_iter().next().unwrap().unwrap_err();
        assert_eq!(err.kind(), kind, "{err:?}");
        assert!(stream.is_terminated());
        assert!(deadline(rt, stream.next()).await.is_none(), "still ended");
        for _ in 0..2 {
            let again = deadline(rt, c.recv()).await.unwrap_err();
            assert_eq!(again.kind(), kind, "recv keeps returning the error");
        }
    }

    // 1. A length over the maximum.
    let (addr, peer) = raw_peer(|mut s| {
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(b"abc").unwrap();
        s.write_all(&2000u32.to_be_bytes()).unwrap();
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf); // until the receiver closes
    });
    let c = TcpTransport::connect_with(addr, &config(&rt).max_message_size(1024))
        .await
        .unwrap();
    let mut stream = c.messages();
    assert_eq!(
        &deadline(&rt, stream.next()).await.unwrap().unwrap()[..],
        b"abc"
    );
    let too_large = ErrorKind::MessageTooLarge {
        size: 2000,
        max: 1024,
        received: true,
    };
    check(&rt, &c, stream, too_large).await;
    drop(c);
    deadline(&rt, peer.join())
        .await
        .expect("the raw peer panicked");

    // 2. A frame cut short: the peer closes after 10 of 100 announced bytes.
    let (addr, peer) = raw_peer(|mut s| {
        s.write_all(&2u32.to_be_bytes()).unwrap();
        s.write_all(b"ok").unwrap();
        s.write_all(&100u32.to_be_bytes()).unwrap();
        s.write_all(&[1u8; 10]).unwrap();
    });
    let c = TcpTransport::connect_with(addr, &config(&rt))
        .await
        .unwrap();
    let mut stream = c.messages();
    assert_eq!(
        &deadline(&rt, stream.next()).await.unwrap().unwrap()[..],
        b"ok"
    );
    check(&rt, &c, stream, ErrorKind::UnexpectedEof).await;
    deadline(&rt, peer.join())
        .await
        .expect("the raw peer panicked");

    // 3. A reset: the peer closes with our message unread, so its kernel sends RST.
    let (addr, peer) = raw_peer(|mut s| {
        s.write_all(&2u32.to_be_bytes()).unwrap();
        s.write_all(b"hi").unwrap();
        // Wait (without consuming it) until our message is there, then close.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(s.peek(&mut buf).unwrap(), 1, "our message never came");
    });
    let c = TcpTransport::connect_with(addr, &config(&rt))
        .await
        .unwrap();
    let mut stream = c.messages();
    assert_eq!(
        &deadline(&rt, stream.next()).await.unwrap().unwrap()[..],
        b"hi"
    );
    c.send(pattern(10, 0)).await.unwrap();
    deadline(&rt, peer.join())
        .await
        .expect("the raw peer panicked");
    check(&rt, &c, stream, ErrorKind::ConnectionReset).await;
}

/// Dropping a `Messages` (with a `recv` pending in it, or after taking some messages)
/// loses nothing: the transport's `recv` returns the rest, in order.
pub async fn dropped_messages_view_loses_nothing(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&config(&rt)).await;
    let mut view = s.messages();
    match select(view.next(), rt.sleep(Duration::from_millis(50))).await {
        Either::Left((m, _)) => panic!("nothing was sent yet: {m:?}"),
        Either::Right(_) => {}
    }
    c.send(Bytes::from_static(b"while pending")).await.unwrap();
    deadline(&rt, c.flush()).await.unwrap();
    rt.sleep(Duration::from_millis(50)).await; // it arrives while the view's recv waits
    drop(view);
    assert_eq!(
        &deadline(&rt, s.recv()).await.unwrap()[..],
        b"while pending"
    );

    for i in 0..10u32 {
        c.send(Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    let mut view = s.messages();
    for i in 0..3u32 {
        let m = deadline(&rt, view.next()).await.unwrap().unwrap();
        assert_eq!(u32::from_be_bytes(m[..].try_into().unwrap()), i);
    }
    drop(view);
    for i in 3..10u32 {
        let m = deadline(&rt, s.recv()).await.unwrap();
        assert_eq!(u32::from_be_bytes(m[..].try_into().unwrap()), i);
    }
}

/// `Messages` works over every kind of handle: a pooled connection (borrowed through
/// `Deref`, and owned so the view is `'static`), a `BoxTransport`, an `Arc`.
pub async fn messages_over_any_handle(rt: Arc<dyn Runtime>) {
    let l = TcpListener::bind_with("127.0.0.1:0", &config(&rt))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let echo = spawn(&rt, async move {
        let conn = l.accept().await.unwrap();
        while let Ok(m) = conn.recv().await {
            if conn.send(m).await.is_err() {
                break;
            }
        }
    });
    let pool = ConnectionPool::new(
        TcpConnector::with_config(addr, config(&rt)),
        PoolConfig::default().max_size(1).runtime(rt.clone()),
    )
    .unwrap();
    {
        let conn = deadline(&rt, pool.get()).await.unwrap();
        let mut view = conn.messages();
        deadline(&rt, view.send(Bytes::from_static(b"pooled")))
            .await
            .unwrap();
        assert_eq!(
            &deadline(&rt, view.next()).await.unwrap().unwrap()[..],
            b"pooled"
        );
    }
    let conn = deadline(&rt, pool.get()).await.unwrap();
    let mut view = Messages::owned(conn);
    let task = spawn(&rt, async move {
        view.send(Bytes::from_static(b"owned")).await.unwrap();
        let back = view.next().await.unwrap().unwrap();
        (back, view)
    });
    let (back, view) = deadline(&rt, task).await.unwrap();
    assert_eq!(&back[..], b"owned");
    drop(view); // the connection goes back to the pool
    assert_eq!(pool.status().idle, 1, "{:?}", pool.status());
    deadline(&rt, pool.close()).await;
    deadline(&rt, echo).await.unwrap();

    let (c, s) = pair(&config(&rt)).await;
    let c: BoxTransport = Box::new(c);
    let s = Arc::new(s);
    let mut tx = c.messages();
    let mut rx = Messages::from_handle(s.clone());
    deadline(&rt, tx.send(Bytes::from_static(b"boxed")))
        .await
        .unwrap();
    assert_eq!(
        &deadline(&rt, rx.next()).await.unwrap().unwrap()[..],
        b"boxed"
    );
    deadline(&rt, SinkExt::close(&mut tx)).await.unwrap();
    assert!(
        deadline(&rt, rx.next()).await.is_none(),
        "ends at the peer's close"
    );
}

pub async fn dyn_transport(rt: Arc<dyn Runtime>) {
    let (c, s) = pair(&config(&rt)).await;
    let c: BoxTransport = Box::new(c);
    let s: BoxTransport = Box::new(s);
    async fn roundtrip(a: &impl Transport, b: &impl Transport) {
        a.send(Bytes::from_static(b"dyn")).await.unwrap();
        assert_eq!(&b.recv().await.unwrap()[..], b"dyn");
    }
    deadline(&rt, roundtrip(&c, &s)).await;
    assert_eq!(
        c.max_message_size(),
        net_rs::drivers::tcp::DEFAULT_MAX_MESSAGE_SIZE
    );
    assert_eq!(c.local_addr().unwrap(), s.peer_addr().unwrap());
}

/// Many tasks send on one shared transport at once, in both modes, with sizes from 0
/// to above the coalescing threshold: every message arrives once, intact, in each
/// sender's order (the hand-over of the socket between senders, the writer task and
/// inline writes leaves no bytes without an owner). The receiver is a plain blocking
/// reader on its own thread, so no net-rs receive path is involved.
pub async fn many_senders_share_one_transport(rt: Arc<dyn Runtime>) {
    for busy in [Duration::ZERO, Duration::from_micros(200)] {
        const TASKS: u16 = 16;
        const EACH: u32 = 600;
        let sizes = [0usize, 1, 7, 100, 4096, 8 * 1024, 8 * 1024 + 1, 20_000];
        let (addr, peer) = {
            let (tx, rx) = oneshot::channel();
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            std::thread::spawn(move || {
                let (s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut r = std::io::BufReader::new(s);
                let mut next = vec![0u32; TASKS as usize];
                let mut got = 0u64;
                let mut head = [0u8; 4];
                let res = loop {
                    if let Err(e) = r.read_exact(&mut head) {
                        break Err(format!("read after {got} messages: {e}"));
                    }
                    let len = u32::from_be_bytes(head) as usize;
                    let mut m = vec![0u8; len];
                    if let Err(e) = r.read_exact(&mut m) {
                        break Err(format!("read after {got} messages: {e}"));
                    }
                    if len == 0 {
                        continue;
                    }
                    let task = u16::from_be_bytes([m[0], m[1]]) as usize;
                    if task == usize::from(u16::MAX) {
                        // The last message, larger than the socket takes at once.
                        break Ok(got);
                    }
                    let seq = u32::from_be_bytes(m[2..6].try_into().unwrap());
                    if seq != next[task] {
                        break Err(format!("task {task}: got #{seq}, expected #{}", next[task]));
                    }
                    if m[6..].iter().any(|&b| b != (seq as u8)) {
                        break Err(format!("task {task} #{seq}: payload changed"));
                    }
                    next[task] += 1;
                    got += 1;
                };
                let _ = tx.send(res);
            });
            (addr, rx)
        };
        let c = Arc::new(
            TcpTransport::connect_with(
                addr,
                &config(&rt).busy_poll(busy).max_message_size(8 << 20),
            )
            .await
            .unwrap(),
        );
        let mut senders = Vec::new();
        for task in 0..TASKS {
            let c = c.clone();
            senders.push(spawn(&rt, async move {
                for seq in 0..EACH {
                    let n = sizes[(seq as usize + task as usize) % sizes.len()];
                    // Zero-length messages go out too; they carry no id.
                    if n == 0 {
                        c.send(Bytes::new()).await.unwrap();
                    }
                    let mut m = vec![seq as u8; 6 + n];
                    m[..2].copy_from_slice(&task.to_be_bytes());
                    m[2..6].copy_from_slice(&seq.to_be_bytes());
                    c.send(m.into()).await.unwrap();
                }
            }));
        }
        for s in senders {
            deadline(&rt, s).await.unwrap();
        }
        // A last message far larger than the socket buffer: part of it is written at
        // once, the rest must still have an owner that writes it.
        let mut last = vec![0u8; 6 + (8 << 20) - 64];
        last[..2].copy_from_slice(&u16::MAX.to_be_bytes());
        deadline(&rt, c.send(last.into())).await.unwrap();
        deadline(&rt, c.flush()).await.unwrap();
        let got = deadline(&rt, peer).await.unwrap();
        assert_eq!(
            got,
            Ok(TASKS as u64 * EACH as u64),
            "busy_poll {busy:?}: every message once, in order"
        );
    }
}

/// This process's resident memory (VmRSS) and address space (VmSize), in KiB, from
/// `/proc/self/status`; `None` where there is no such file.
pub fn memory_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmSize:")?))
}

/// Connections in [`lying_length_prefixes_cost_what_arrived`].
pub const LIARS: usize = 256;
/// The bound on what those connections may add to the process, in KiB: resident memory
/// and address space. Announced are 256 x 8 MiB = 2 GiB; what arrived is 256 x 1 KiB.
pub const LIARS_MAX_RSS_KIB: u64 = 32 << 10;
/// See [`LIARS_MAX_RSS_KIB`].
pub const LIARS_MAX_VMSIZE_KIB: u64 = 192 << 10;

/// 256 connections each announce an 8 MiB message (the maximum), send 1 KiB of it and
/// stall. What the receiving side holds must follow what arrived, not what was
/// announced. Not in `tcp_suite!`: it measures the whole process, so it runs in a
/// process of its own (`tests/tcp_memory.rs`), one runtime after another.
pub async fn lying_length_prefixes_cost_what_arrived(rt: Arc<dyn Runtime>) {
    const CLAIM: usize = 8 << 20;
    let cfg = config(&rt);
    let l = TcpListener::bind_with("127.0.0.1:0", &cfg).await.unwrap();
    let addr = l.local_addr().unwrap();
    // Warm up (runtime threads, allocator arenas), and check that a genuine message of
    // the announced size still arrives whole. Its buffer goes back to the shared pool.
    {
        let (c, s) = futures::join!(TcpTransport::connect_with(addr, &cfg), l.accept());
        let (c, s) = (c.unwrap(), s.unwrap());
        let msg = pattern(CLAIM, 5);
        let (sent, got) =
            deadline(&rt, async { futures::join!(c.send(msg.clone()), s.recv()) }).await;
        sent.unwrap();
        assert!(
            got.unwrap() == msg,
            "a genuine 8 MiB message came in changed"
        );
        deadline(&rt, c.close()).await.unwrap();
    }
    let before = memory_kib();

    let mut liars = Vec::with_capacity(LIARS);
    let mut conns = Vec::with_capacity(LIARS);
    for _ in 0..LIARS {
        // A blocking connect completes against the listen backlog; each is accepted
        // right after, so the backlog never fills.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(&(CLAIM as u32).to_be_bytes()).unwrap();
        s.write_all(&[0xA5; 1024]).unwrap();
        liars.push(s);
        conns.push(deadline(&rt, l.accept()).await.unwrap());
    }
    // Every connection reads what it was sent and waits for the rest.
    let mut recvs: futures::stream::FuturesUnordered<_> = conns.iter().map(|c| c.recv()).collect();
    match select(recvs.next(), rt.sleep(Duration::from_millis(500))).await {
        Either::Left((r, _)) => panic!("a recv of a stalled frame returned: {r:?}"),
        Either::Right(_) => {}
    }
    let after = memory_kib();

    // The liars leave: every connection reports its cut frame.
    drop(liars);
    for _ in 0..LIARS {
        let err = deadline(&rt, recvs.next()).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
        assert!(err.to_string().contains("1024 of 8388608"), "{err}");
    }

    let (Some((rss0, vm0)), Some((rss1, vm1))) = (before, after) else {
        eprintln!("no /proc/self/status here: memory not measured");
        return;
    };
    let (rss, vm) = (rss1.saturating_sub(rss0), vm1.saturating_sub(vm0));
    eprintln!(
        "{LIARS} connections announcing {} MiB and sending 1 KiB added {} KiB RSS \
         (bound {LIARS_MAX_RSS_KIB}) and {} KiB address space (bound {LIARS_MAX_VMSIZE_KIB})",
        CLAIM >> 20,
        rss,
        vm
    );
    assert!(rss <= LIARS_MAX_RSS_KIB, "RSS grew by {rss} KiB");
    assert!(vm <= LIARS_MAX_VMSIZE_KIB, "address space grew by {vm} KiB");
}

/// Connections in [`a_growing_message_costs_what_arrived`], and the MiB each receives
/// of a message announced far larger.
pub const GROWERS: usize = 4;
/// See [`GROWERS`].
pub const GROWN_MIB: usize = 24;

/// Each of 4 connections (each with a configuration, and so a buffer pool, of its own)
/// is sent 24 MiB of a message announced at 1 GiB, then the peer stalls. The buffer of
/// the message being received grows with what arrives; what the process holds for it
/// must stay within twice what arrived (plus a little): the steps a growing buffer
/// went through are not kept (each connection's pool holds none of them). Not in `tcp_suite!`: it measures the whole process
/// (`tests/tcp_memory_growth.rs`).
pub async fn a_growing_message_costs_what_arrived(rt: Arc<dyn Runtime>) {
    const CLAIM: usize = 1 << 30;
    let chunk = vec![0x5Au8; 1 << 20];
    // Warm up the runtime and the allocator with one connection's whole life.
    {
        let (c, s) = pair(&config(&rt)).await;
        deadline(&rt, c.send(pattern(1 << 20, 1))).await.unwrap();
        deadline(&rt, s.recv()).await.unwrap();
    }
    let before = memory_kib();
    let mut peers = Vec::new();
    let mut conns = Vec::new();
    let mut pools = Vec::new();
    for _ in 0..GROWERS {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let pool = net_rs::buffer::HeapPool::default();
        let cfg = config(&rt)
            .max_message_size(CLAIM)
            .buffer_pool(pool.clone());
        pools.push(pool);
        let c = deadline(&rt, TcpTransport::connect_with(addr, &cfg))
            .await
            .unwrap();
        let (mut s, _) = l.accept().unwrap();
        let chunk = chunk.clone();
        peers.push(std::thread::spawn(move || {
            s.write_all(&(CLAIM as u32).to_be_bytes()).unwrap();
            for _ in 0..GROWN_MIB {
                s.write_all(&chunk).unwrap();
            }
            s
        }));
        conns.push(c);
    }
    // Every connection reads what arrives and waits for the rest.
    let mut recvs: futures::stream::FuturesUnordered<_> = conns.iter().map(|c| c.recv()).collect();
    let writers_done = async {
        let mut peers = peers;
        loop {
            if peers.iter().all(|p| p.is_finished()) {
                return peers
                    .drain(..)
                    .map(|p| p.join().unwrap())
                    .collect::<Vec<_>>();
            }
            rt.sleep(Duration::from_millis(10)).await;
        }
    };
    let settle = async {
        let socks = deadline(&rt, writers_done).await;
        // What the kernel still buffers is read meanwhile.
        rt.sleep(Duration::from_millis(300)).await;
        socks
    };
    let socks = match select(recvs.next(), Box::pin(settle)).await {
        Either::Left((r, _)) => panic!("a recv of a stalled frame returned: {r:?}"),
        Either::Right((socks, _)) => socks,
    };
    let after = memory_kib();
    // The buffers a growing message outgrew are not kept for later.
    for pool in &pools {
        assert_eq!(pool.cached_bytes(), 0, "outgrown buffers were kept");
    }
    drop(socks);
    for _ in 0..GROWERS {
        let err = deadline(&rt, recvs.next()).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    }
    let (Some((rss0, _)), Some((rss1, _))) = (before, after) else {
        eprintln!("no /proc/self/status here: memory not measured");
        return;
    };
    let rss = rss1.saturating_sub(rss0);
    let arrived = (GROWERS * GROWN_MIB) as u64 * 1024;
    // The frame's buffer is at most twice what arrived (the allocator may touch all of
    // it); kept steps of its growth added about as much again (2.4x measured before
    // they were let go, 0.7x-1.6x after).
    let bound = 2 * arrived + (16 << 10);
    eprintln!(
        "{GROWERS} connections each sent {GROWN_MIB} MiB of a 1 GiB message: RSS grew \
         {rss} KiB for {arrived} KiB that arrived (bound {bound} KiB)"
    );
    assert!(
        rss <= bound,
        "RSS grew by {rss} KiB for {arrived} KiB that arrived"
    );
}

/// Expands to one `#[test]` per suite case, each run through `$run`.
#[macro_export]
macro_rules! tcp_suite {
    ($run:path) => {
        $crate::tcp_suite!(@each $run;
            echo_all_sizes latency_mode_keeps_every_guarantee seed_example_alloc_buf many_small_messages_in_order
            oversized_send_fails_before_writing oversized_frame_is_rejected_and_closes
            garbage_length_prefix_is_rejected truncated_frame_gives_unexpected_eof
            orderly_shutdown_delivers_everything no_limit_durations_neither_panic_nor_hang
            recv_is_cancel_safe
            concurrent_receivers_share_the_stream dropped_send_sends_nothing
            send_and_recv_from_different_tasks close_fails_pending_recv
            dead_peer_fails_pending_operations connection_refused bind_error_names_the_address stream_and_sink
            sink_flush_is_the_transports_flush stream_ends_after_a_fatal_error
            dropped_messages_view_loses_nothing messages_over_any_handle dyn_transport
            many_senders_share_one_transport a_reset_seen_by_one_direction_fails_the_other
            ending_with_unread_input_loses_nothing);
    };
    (@each $run:path; $($name:ident)*) => {
        $(
            #[test]
            fn $name() {
                $run(|rt| Box::pin($crate::tcp_suite::$name(rt)));
            }
        )*
    };
}
