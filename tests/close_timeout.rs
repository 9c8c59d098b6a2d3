//! A `close` that runs out of its `linger` time, against a peer that never reads: the
//! transport lets go of the socket (its file descriptor is closed; nothing waits on a
//! peer that may never read again), and every later `flush`, `shutdown` and `close`
//! returns that error at once instead of waiting forever. (Found by a breaker: the
//! writer task, waiting for room in the socket, was never told of the give-up, so the
//! file descriptor and the queued bytes stayed for good and `flush` hung.)
//!
//! Its own test binary with one test: it counts the process's open file descriptors.
#![cfg(all(feature = "tokio", target_os = "linux"))]

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use net_rs::drivers::tcp::{TcpConfig, TcpTransport};
use net_rs::transport::Transport;
use net_rs::ErrorKind;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Run `f` on its own thread; fail the test if it takes more than 60 s.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} hung for 60 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

async fn close_out_of_time(addr: std::net::SocketAddr, conns: usize, fds_before: usize) {
    // A send buffer larger than the socket takes, so the writer is left waiting for
    // room when `close` gives up.
    let config = TcpConfig::default()
        .linger(Duration::from_millis(300))
        .send_buffer(32 << 20);
    for _ in 0..conns {
        let t = TcpTransport::connect_with(addr, &config).await.unwrap();
        for i in 0..3u8 {
            t.send(Bytes::from(vec![i; 8 << 20])).await.unwrap();
        }
        let t0 = Instant::now();
        let err = t.close().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "close is bounded by linger"
        );
        for (what, res) in [
            ("flush", t.flush().await),
            ("shutdown", t.shutdown().await),
            ("close", t.close().await),
        ] {
            let e = res.expect_err(what);
            assert_eq!(
                e.kind(),
                ErrorKind::TimedOut,
                "{what} after the timed-out close: {e}"
            );
        }
        assert!(t.send(Bytes::from_static(b"x")).await.is_err());
        assert!(t.recv().await.is_err());
        drop(t);
    }
    // Ours are closed (after the lingering close's quiet time, on this runtime, which
    // keeps running here); the peer's remain.
    wait_for_fds(fds_before + conns).await;
}

/// Wait (on the current runtime, which keeps running) until at most `limit`
/// descriptors are open; fail after 10 s.
async fn wait_for_fds(limit: usize) {
    let rt = net_rs::runtime::default_runtime().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = open_fds();
        if now <= limit {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} descriptors open, {limit} expected: the peer's remain, ours must be closed",
            now
        );
        rt.sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone, Copy)]
enum Scenario {
    CloseOutOfTime,
    BadFrameWhileFull,
}

async fn run(scenario: Scenario, addr: std::net::SocketAddr, conns: usize, fds_before: usize) {
    match scenario {
        Scenario::CloseOutOfTime => close_out_of_time(addr, conns, fds_before).await,
        Scenario::BadFrameWhileFull => bad_frame_while_full(addr, conns, fds_before).await,
    }
}

/// Run `scenario` on each runtime against a peer that accepts and never reads nor
/// closes (its sockets stay open in this process, one descriptor per connection); with
/// `bad_header`, it first sends a length prefix of `u32::MAX`.
fn on_each_runtime(scenario: Scenario, bad_header: bool) {
    const CONNS: usize = 4;
    for flavour in ["tokio current-thread", "tokio multi-thread", "async-io"] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming().take(CONNS) {
                let mut s = s.unwrap();
                if bad_header {
                    std::io::Write::write_all(&mut s, &[0xff; 4]).unwrap();
                }
                held.push(s);
            }
            std::thread::sleep(Duration::from_secs(60));
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ct = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        warm_up_async_io();
        let before = open_fds();
        let (rt, ct) = bounded(flavour, move || {
            let work = run(scenario, addr, CONNS, before);
            match flavour {
                "tokio current-thread" => ct.block_on(work),
                "tokio multi-thread" => rt.block_on(work),
                _ => run_async_io(work),
            }
            (rt, ct)
        });
        drop((rt, ct));
    }
}

/// Both scenarios in one test: they count descriptors, so they must not run side by
/// side.
#[test]
fn giving_up_lets_go_of_the_socket() {
    on_each_runtime(Scenario::CloseOutOfTime, false);
    on_each_runtime(Scenario::BadFrameWhileFull, true);
}

/// A peer that sends a frame header over the limit and never reads: the `recv` that
/// sees it fails the connection, and the writer, waiting for room in the socket, must
/// be told: it lets go of the socket (while the transport is still held) and `flush`
/// returns at once.
async fn bad_frame_while_full(addr: std::net::SocketAddr, conns: usize, fds_before: usize) {
    let config = TcpConfig::default().send_buffer(32 << 20);
    let mut held = Vec::new();
    for _ in 0..conns {
        let t = TcpTransport::connect_with(addr, &config).await.unwrap();
        for i in 0..3u8 {
            t.send(Bytes::from(vec![i; 8 << 20])).await.unwrap();
        }
        let e = t.recv().await.unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::MessageTooLarge { .. }), "{e}");
        assert!(t.flush().await.is_err());
        held.push(t);
    }
    wait_for_fds(fds_before + conns).await;
    drop(held);
}

/// The async-io reactor opens its descriptors on first use: before the count.
#[cfg(feature = "async-std")]
fn warm_up_async_io() {
    async_io::block_on(async_io::Timer::after(Duration::from_millis(1)));
}

#[cfg(not(feature = "async-std"))]
fn warm_up_async_io() {}

#[cfg(feature = "async-std")]
fn run_async_io(work: impl std::future::Future<Output = ()>) {
    async_io::block_on(work);
}

#[cfg(not(feature = "async-std"))]
fn run_async_io(work: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(work);
}
