//! The RDMA `Transport` when things go wrong, and under many connections, on a real
//! device (feature `rdma`; see `tests/rdma_device.rs` for when these run and skip).
//!
//! A "killed peer" is a child process (this test binary again, running the ignored
//! `child_peer` test) that is sent SIGKILL mid-stream: its kernel tears the connection
//! down, and every pending operation on this side must fail, none may hang.
#![cfg(feature = "rdma")]

mod rdma_env;
use rdma_env::{device_ip, timer, within};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use futures::executor::block_on;
use net_rs::drivers::rdma::cm;
use net_rs::transport::Transport;
use net_rs::ErrorKind;

const CHILD_MESSAGES: u32 = 10;

/// Not a test on its own: the peer process of the killed-peer tests. `NET_RS_CHILD` is
/// `connect` (connect, send `CHILD_MESSAGES` messages, wait to be killed) or `accept`
/// (listen, say "ready", accept, receive until killed).
#[test]
#[ignore = "the child process of the killed-peer tests"]
fn child_peer() {
    let (Ok(role), Ok(addr)) = (
        std::env::var("NET_RS_CHILD"),
        std::env::var("NET_RS_CHILD_ADDR"),
    ) else {
        return;
    };
    let addr: SocketAddr = addr.parse().unwrap();
    block_on(async {
        let t = if role == "connect" {
            cm::connect(addr, Duration::from_secs(20)).await.unwrap()
        } else {
            let l = cm::listen(addr).unwrap();
            println!("ready");
            l.accept(Duration::from_secs(20)).await.unwrap()
        };
        if role == "connect" {
            for i in 0..CHILD_MESSAGES {
                t.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                    .await
                    .unwrap();
            }
            t.flush().await.unwrap();
        } else {
            while t.recv().await.is_ok() {}
        }
        std::thread::sleep(Duration::from_secs(120));
    });
}

fn spawn_child(role: &str, addr: SocketAddr) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_peer",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NET_RS_CHILD", role)
        .env("NET_RS_CHILD_ADDR", addr.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn assert_reset(e: &net_rs::Error, what: &str) {
    assert!(
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::WorkCompletion { .. }
        ),
        "{what}: {e}"
    );
}

/// The peer that only sent to us dies: our pending `recv` (a side that only receives)
/// and every later operation fail with an error.
#[test]
fn killed_sender_fails_the_pending_recv() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18611);
    let listener = cm::listen(addr).unwrap();
    let child = spawn_child("connect", addr);
    let t = block_on(listener.accept(Duration::from_secs(30))).unwrap();
    for i in 0..CHILD_MESSAGES {
        let m = block_on(t.recv()).unwrap();
        assert_eq!(m[..], i.to_be_bytes());
    }
    let t = std::sync::Arc::new(t);
    let t2 = t.clone();
    let (started_tx, started_rx) = mpsc::channel();
    let pending = std::thread::spawn(move || {
        block_on(async {
            let fut = t2.recv();
            started_tx.send(()).unwrap();
            fut.await
        })
    });
    started_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    kill(child);
    let err = within(30, "the pending recv", move || pending.join().unwrap()).unwrap_err();
    assert_reset(&err, "recv after the peer died");
    let err = within(30, "send after the peer died", move || {
        block_on(t.send(Bytes::from_static(b"anyone?")))
    })
    .unwrap_err();
    assert_reset(&err, "send after the peer died");
}

/// The peer we stream to dies mid-flood: the flood's sends start failing, a pending
/// `recv` fails too, and nothing waits forever.
#[test]
fn killed_receiver_fails_the_sender() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18612);
    let mut child = spawn_child("accept", addr);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // libtest may print "test child_peer ... " on the same line.
    while !line.trim_end().ends_with("ready") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child ended early"
        );
    }
    let t = std::sync::Arc::new(block_on(cm::connect(addr, Duration::from_secs(30))).unwrap());
    let t2 = t.clone();
    let receiver = std::thread::spawn(move || block_on(t2.recv()));
    let t3 = t.clone();
    let flood = std::thread::spawn(move || {
        block_on(async {
            let msg = Bytes::from(vec![7u8; 10_000]);
            let mut sent = 0u64;
            loop {
                if let Err(e) = t3.send(msg.clone()).await {
                    return (sent, e);
                }
                sent += 1;
            }
        })
    });
    std::thread::sleep(Duration::from_millis(1500));
    kill(child);
    let (sent, err) = within(30, "the flood", move || flood.join().unwrap());
    assert!(sent > 10, "only {sent} messages went out before the kill");
    assert_reset(&err, "send after the peer died");
    let err = within(30, "the pending recv", move || receiver.join().unwrap()).unwrap_err();
    assert_reset(&err, "recv after the peer died");
}

/// Many connections at once, each echoing messages of several sizes concurrently.
#[test]
fn many_connections_at_once() {
    const CONNS: usize = 16;
    const TRIPS: usize = 40;
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18613);
    let listener = cm::listen(addr).unwrap();
    let server = std::thread::spawn(move || {
        let mut echoers = Vec::new();
        for _ in 0..CONNS {
            let t = block_on(listener.accept(Duration::from_secs(60))).unwrap();
            echoers.push(std::thread::spawn(move || {
                block_on(async {
                    let mut n = 0;
                    while let Ok(m) = t.recv().await {
                        t.send(m).await.unwrap();
                        n += 1;
                    }
                    n
                })
            }));
        }
        echoers
            .into_iter()
            .map(|e| e.join().unwrap())
            .collect::<Vec<usize>>()
    });
    // Everyone connected and talking: then the test counts the poller threads.
    let (up_tx, up_rx) = mpsc::channel::<()>();
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..CONNS)
        .map(|c| {
            let (up_tx, counted) = (up_tx.clone(), counted.clone());
            std::thread::spawn(move || {
                block_on(async {
                    let t = cm::connect(addr, Duration::from_secs(60)).await.unwrap();
                    for i in 0..TRIPS {
                        let n = [8, 3000, 20_000][(i + c) % 3];
                        let msg: Bytes = (0..n).map(|k| (k + c + i) as u8).collect();
                        t.send(msg.clone()).await.unwrap();
                        assert!(t.recv().await.unwrap() == msg, "connection {c} trip {i}");
                    }
                    up_tx.send(()).unwrap();
                    let t0 = std::time::Instant::now();
                    while !counted.load(std::sync::atomic::Ordering::Acquire)
                        && t0.elapsed() < Duration::from_secs(120)
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    t.close().await.unwrap();
                })
            })
        })
        .collect();
    for _ in 0..CONNS {
        up_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("a client never got through its round trips");
    }
    // 32 connection ends on one device, one completion poller thread.
    let pollers = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "net-rs-rdma-dev")
        })
        .count();
    counted.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(
        pollers,
        1,
        "completion poller threads for {} connection ends",
        2 * CONNS
    );
    within(300, "the clients", move || {
        for c in clients {
            c.join().unwrap();
        }
    });
    let echoed = within(60, "the server", move || server.join().unwrap());
    assert_eq!(echoed, vec![TRIPS; CONNS]);
}

/// The peers announce their settings in-band: different receive-buffer sizes, depths and
/// maximum message sizes work together, and a message larger than the receiver accepts
/// is refused by the sender with a clear error, leaving the connection usable.
#[test]
fn peers_with_different_settings() {
    use net_rs::drivers::rdma::transport::RdmaConfig;
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18614);
    let listener = cm::listen(addr).unwrap();
    let server = std::thread::spawn(move || {
        block_on(async {
            let t = listener.accept(Duration::from_secs(30)).await.unwrap();
            let m = t.recv().await.unwrap();
            let err = t.send(Bytes::from(vec![1u8; 2 << 20])).await.unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::MessageTooLarge {
                        size: 2097152,
                        max: 1048576,
                        received: false
                    }
                ),
                "{err}"
            );
            t.send(m).await.unwrap();
            let end = t.recv().await.unwrap_err();
            assert_eq!(end.kind(), ErrorKind::Closed, "{end}");
        })
    });
    let cfg = RdmaConfig {
        max_message_size: 1 << 20,
        chunk: 1024,
        depth: 16,
        ..RdmaConfig::default()
    };
    within(60, "the client", move || {
        block_on(async {
            let t = cm::connect_with(addr, Duration::from_secs(30), cfg)
                .await
                .unwrap();
            let msg: Bytes = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            t.send(msg.clone()).await.unwrap();
            assert!(t.recv().await.unwrap() == msg);
            t.close().await.unwrap();
        })
    });
    within(30, "the server", move || server.join().unwrap());
}

/// A long one-way flood into a receiver that keeps stopping to do other work: credits
/// stop the sender instead of letting it hit a receiver with no posted buffer, so the
/// device counts no receiver-not-ready event, and no memory is registered after the
/// first messages however many follow.
#[test]
fn long_one_way_flood_has_no_rnr_and_constant_registrations() {
    const N: u32 = 60_000;
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18615);
    let listener = cm::listen(addr).unwrap();
    let server = std::thread::spawn(move || {
        block_on(async {
            let t = std::sync::Arc::new(listener.accept(Duration::from_secs(30)).await.unwrap());
            // A watchdog: if the flood stalls, say where and in what state.
            let progress = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
            let (t2, p2) = (t.clone(), progress.clone());
            std::thread::spawn(move || {
                let mut last = (u32::MAX, std::time::Instant::now());
                while std::sync::Arc::strong_count(&t2) > 1 {
                    std::thread::sleep(Duration::from_millis(500));
                    let now = p2.load(std::sync::atomic::Ordering::Relaxed);
                    if now != last.0 {
                        last = (now, std::time::Instant::now());
                    } else if last.1.elapsed() > Duration::from_secs(15) {
                        eprintln!("flood stalled at message {now}: {t2:?}");
                        return;
                    }
                }
            });
            for i in 0..N {
                progress.store(i, std::sync::atomic::Ordering::Relaxed);
                let m = t
                    .recv()
                    .await
                    .unwrap_or_else(|e| panic!("message {i}: {e}"));
                assert_eq!(m[..], i.to_be_bytes(), "message {i}");
                if i % 5000 == 0 {
                    // A slow consumer: the sender runs out of credits meanwhile.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let end =
                futures::future::select(Box::pin(t.recv()), timer(Duration::from_secs(20))).await;
            match end {
                futures::future::Either::Left((Err(e), _)) => {
                    assert_eq!(e.kind(), ErrorKind::Closed, "{e}")
                }
                futures::future::Either::Left((Ok(_), _)) => panic!("a message after the last"),
                futures::future::Either::Right(_) => panic!("no end of stream: {t:?}"),
            }
        })
    });
    let (rnr, regs) = within(300, "the flood", move || {
        block_on(async {
            let t = cm::connect(addr, Duration::from_secs(30)).await.unwrap();
            let rnr_before = t
                .device_rnr_events()
                .expect("the device has RNR counters in sysfs");
            // Everything this connection will ever register was registered when it
            // was set up.
            let regs_early = t.registrations();
            assert_eq!(regs_early, t.registration_bound());
            for i in 0..N {
                t.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                    .await
                    .unwrap();
            }
            t.close().await.unwrap();
            (
                t.device_rnr_events().unwrap() - rnr_before,
                (regs_early, t.registrations()),
            )
        })
    });
    within(60, "the receiver", move || server.join().unwrap());
    assert_eq!(rnr, 0, "receiver-not-ready events during the flood");
    assert_eq!(regs.0, regs.1, "registrations grew during the flood");
}

/// `close` against a peer that stops reading (its application holds the connection and
/// never calls `recv`, so no credits come back) is bounded by `RdmaConfig::linger`: it
/// fails with `TimedOut` after about that long, a `recv` waiting on another thread ends,
/// and later `flush`, `shutdown` and `close` return at once with an error.
#[test]
fn close_is_bounded_by_linger_against_a_peer_that_does_not_read() {
    use net_rs::drivers::rdma::transport::RdmaConfig;
    use std::sync::Arc;
    use std::time::Instant;
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18640);
    let listener = cm::listen(addr).unwrap();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        // Accept and hold the connection without reading, until told to stop.
        let t = block_on(listener.accept(Duration::from_secs(30))).unwrap();
        let _ = stop_rx.recv_timeout(Duration::from_secs(60));
        drop(t);
    });
    let cfg = RdmaConfig {
        linger: Duration::from_secs(1),
        send_buffer: 1 << 20,
        ..RdmaConfig::default()
    };
    let t = Arc::new(block_on(cm::connect_with(addr, Duration::from_secs(10), cfg)).unwrap());
    // Send until `send` has to wait: the peer's credits and our queue are used up.
    let msg = Bytes::from(vec![5u8; 64 << 10]);
    let mut accepted = 0;
    loop {
        let sent = block_on(futures::future::select(
            Box::pin(t.send(msg.clone())),
            timer(Duration::from_millis(500)),
        ));
        match sent {
            futures::future::Either::Left((r, _)) => {
                r.unwrap();
                accepted += 1;
                assert!(accepted < 10_000, "send never waited");
            }
            futures::future::Either::Right(_) => break,
        }
    }
    let pending_recv = {
        let t = t.clone();
        std::thread::spawn(move || block_on(t.recv()).map(|m| m.len()))
    };
    let t0 = Instant::now();
    let t1 = t.clone();
    let err = within(30, "close against a peer that does not read", move || {
        block_on(t1.close()).unwrap_err()
    });
    let took = t0.elapsed();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(15),
        "close took {took:?} with a linger of 1 s"
    );
    let recv = within(10, "a recv pending during the close", move || {
        pending_recv.join().unwrap()
    });
    assert!(recv.is_err(), "{recv:?}");
    let t2 = t.clone();
    within(
        10,
        "flush, shutdown and close after the timeout",
        move || {
            assert!(block_on(t2.flush()).is_err());
            assert!(block_on(t2.shutdown()).is_err());
            assert!(block_on(t2.close()).is_err());
        },
    );
    drop(t);
    let _ = stop_tx.send(());
    server.join().unwrap();
}

/// A peer that connects through RDMA-CM but does not speak net-rs (here rdma-core's
/// `ucmatose` client): the accepted connection fails with `TimedOut` once
/// `RdmaConfig::handshake_timeout` passes without the peer's hello, so `send`, `recv`
/// and `close` end instead of waiting forever, and the listener serves a net-rs client
/// afterwards. Skipped where `ucmatose` is not installed (the CI VM has it).
#[test]
fn a_peer_that_does_not_speak_net_rs_fails_in_time() {
    use net_rs::drivers::rdma::transport::RdmaConfig;
    let Some(ip) = device_ip() else { return };
    let port = 18641;
    let addr = SocketAddr::new(ip, port);
    let cfg = RdmaConfig {
        handshake_timeout: Duration::from_secs(1),
        linger: Duration::from_secs(1),
        ..RdmaConfig::default()
    };
    let listener = cm::listen(addr).unwrap().with_config(cfg);
    let tool = Command::new("ucmatose")
        .args([
            "-s",
            &ip.to_string(),
            "-p",
            &port.to_string(),
            "-c",
            "1",
            "-C",
            "5",
            "-S",
            "64",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut tool) = tool else {
        eprintln!("no ucmatose here: skipped");
        return;
    };
    let t = block_on(listener.accept(Duration::from_secs(20))).unwrap();
    let t = std::sync::Arc::new(t);
    let t1 = t.clone();
    let (send, recv) = within(20, "send and recv to a silent foreign peer", move || {
        (
            block_on(t1.send(Bytes::from_static(b"hello?"))),
            block_on(t1.recv()),
        )
    });
    let send = send.unwrap_err();
    assert_eq!(send.kind(), ErrorKind::TimedOut, "{send}");
    assert!(recv.is_err(), "{recv:?}");
    let t2 = t.clone();
    let closed = within(20, "close", move || block_on(t2.close()));
    assert!(closed.is_err(), "{closed:?}");
    drop(t);
    let _ = tool.kill();
    let _ = tool.wait();
    // The listener still serves net-rs.
    let client = std::thread::spawn(move || {
        block_on(async {
            let c = cm::connect(addr, Duration::from_secs(10)).await.unwrap();
            c.send(Bytes::from_static(b"net-rs")).await.unwrap();
            c.close().await.unwrap();
        })
    });
    let s = block_on(listener.accept(Duration::from_secs(20))).unwrap();
    assert_eq!(&block_on(s.recv()).unwrap()[..], b"net-rs");
    client.join().unwrap();
}
