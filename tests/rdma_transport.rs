//! The RDMA `Transport` on a real device (feature `rdma`; see `tests/rdma_device.rs`
//! for when these run and when they skip).
#![cfg(feature = "rdma")]

mod rdma_env;
use rdma_env::device_ip;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use net_rs::drivers::rdma::cm;
use net_rs::drivers::rdma::transport::RdmaTransport;
use net_rs::transport::Transport;
use net_rs::ErrorKind;

fn pattern(n: usize, seed: u8) -> Bytes {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect::<Vec<_>>()
        .into()
}

/// A server on its own thread: echoes every message until the peer shuts down.
fn echo_server(addr: SocketAddr) -> std::thread::JoinHandle<u64> {
    let listener = cm::listen(addr).unwrap();
    std::thread::spawn(move || {
        futures::executor::block_on(async move {
            let t = listener.accept(Duration::from_secs(30)).await.unwrap();
            let mut n = 0;
            loop {
                match t.recv().await {
                    Ok(m) => {
                        n += 1;
                        t.send(m).await.unwrap();
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
                        break;
                    }
                }
            }
            t.close().await.unwrap();
            n
        })
    })
}

async fn echo_suite(t: &RdmaTransport) {
    // 0 B up to the maximum message size (8 MiB by default).
    let sizes = [0usize, 1, 4095, 4096, 4097, 100_000, 1 << 20, 8 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let msg = pattern(n, i as u8);
        t.send(msg.clone()).await.unwrap();
        let back = t.recv().await.unwrap();
        assert_eq!(back.len(), n);
        assert!(back == msg, "payload of {n} bytes changed");
    }
    let err = t
        .send(Bytes::from(vec![0u8; (8 << 20) + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::MessageTooLarge {
                received: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        !t.is_closed(),
        "an oversized send leaves the connection usable"
    );
    // Floods of small messages, then their echoes: credits keep the receiver ready, and
    // no message registers memory (all of it was registered at setup).
    for n in [1500u32, 3000] {
        let before = t.zero_copy_recvs();
        for i in 0..n {
            t.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                .await
                .unwrap();
        }
        // Hold every message until the end: received messages are lent receive
        // buffers, and once half of them are out the rest arrive as copies, so holding
        // thousands never starves the receive queue.
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(t.recv().await.unwrap());
        }
        for (i, m) in held.iter().enumerate() {
            assert_eq!(u32::from_be_bytes(m[..].try_into().unwrap()), i as u32);
        }
        let lent = t.zero_copy_recvs() - before;
        assert!(lent >= 255 && lent < n as u64, "{lent} of {n} lent");
        drop(held);
        assert_eq!(
            t.registrations(),
            t.registration_bound(),
            "registered at setup, nothing since"
        );
    }
    assert!(t.registrations() > 0);
    // A buffer from `alloc_buf` is registered memory: sent without a copy (every
    // fragment of it), and the regions it came from are reused, not registered again.
    let before = t.zero_copy_sends();
    let mut regs = 0;
    for round in 0..20u8 {
        let n = 100_000;
        let mut buf = t.alloc_buf(n).unwrap();
        assert_eq!(buf.len(), n);
        buf.copy_from_slice(&pattern(n, round));
        t.send(buf.freeze()).await.unwrap();
        assert!(t.recv().await.unwrap() == pattern(n, round));
        if round == 0 {
            regs = t.registrations();
        }
    }
    assert_eq!(t.zero_copy_sends() - before, 20 * 100_000u64.div_ceil(4096));
    assert_eq!(
        t.registrations(),
        regs,
        "alloc_buf reuses its registered memory"
    );
}

fn run_client(
    port: u16,
    block_on: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>),
) {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, port);
    let server = echo_server(addr);
    block_on(Box::pin(async move {
        let t = cm::connect(addr, Duration::from_secs(10)).await.unwrap();
        echo_suite(&t).await;
        t.shutdown().await.unwrap();
        let err = t.recv().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
        t.close().await.unwrap();
    }));
    let echoed = server.join().expect("server thread");
    assert_eq!(echoed, 8 + 1500 + 3000 + 20);
}

#[test]
fn echo_under_block_on() {
    run_client(18601, futures::executor::block_on);
}

#[test]
fn echo_under_tokio() {
    run_client(18602, |f| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    });
}

#[test]
fn echo_under_smol() {
    run_client(18603, smol::block_on);
}

#[test]
fn echo_under_async_std() {
    run_client(18605, async_std::task::block_on);
}

#[test]
fn connect_without_listener_is_refused() {
    let Some(ip) = device_ip() else { return };
    let err = futures::executor::block_on(cm::connect(
        SocketAddr::new(ip, 18699),
        Duration::from_secs(10),
    ))
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn the_connection_pool_serves_rdma_connections() {
    use net_rs::pool::{ConnectionPool, PoolConfig, RdmaConnector};
    use net_rs::runtime::tokio::TokioRuntime;
    use std::sync::Arc;

    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18604);
    let server = echo_server(addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = ConnectionPool::new(
            RdmaConnector::new(addr, Duration::from_secs(10)),
            PoolConfig::default()
                .max_size(1)
                .runtime(Arc::new(TokioRuntime::new(
                    tokio::runtime::Handle::current(),
                ))),
        )
        .unwrap();
        for i in 0..3u8 {
            let conn = pool.get().await.unwrap();
            conn.send(pattern(5000, i)).await.unwrap();
            assert!(conn.recv().await.unwrap() == pattern(5000, i));
        }
        let st = pool.status();
        assert_eq!((st.total_created, st.idle, st.in_use), (1, 1, 0), "{st:?}");
        // Closing the pool closes the idle connection: the server sees the end of stream.
        pool.close().await;
    });
    assert_eq!(server.join().expect("server thread"), 3);
}

/// `Duration::MAX` as "no limit" on every duration an RDMA user sets (connect and
/// accept timeouts, `RdmaConfig::linger`, the poller's sleep), and the largest poller
/// batch: no panic, and a message sent right before the last handle is dropped still
/// arrives (the lingering path).
#[test]
fn no_limit_durations_neither_panic_nor_hang() {
    use net_rs::drivers::rdma::transport::RdmaConfig;
    use net_rs::reactor::PollerConfig;
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18606);
    let cfg = RdmaConfig {
        linger: Duration::MAX,
        poller: PollerConfig {
            park_timeout: Duration::MAX,
            batch: usize::MAX,
            ..PollerConfig::default()
        },
        ..RdmaConfig::default()
    };
    let listener = cm::listen(addr).unwrap().with_config(cfg.clone());
    let server = std::thread::spawn(move || {
        futures::executor::block_on(async move {
            let t = listener.accept(Duration::MAX).await.unwrap();
            let mut got = Vec::new();
            loop {
                match t.recv().await {
                    Ok(m) => got.push(m),
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
                        break;
                    }
                }
            }
            got
        })
    });
    futures::executor::block_on(async {
        let t = net_rs::drivers::rdma::connect_with(addr, Duration::MAX, cfg)
            .await
            .unwrap();
        t.send(pattern(100, 1)).await.unwrap();
        t.send(pattern(1 << 20, 2)).await.unwrap();
        drop(t);
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.join());
    });
    let got = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server saw the end within 60 s")
        .expect("server thread");
    assert_eq!(got, vec![pattern(100, 1), pattern(1 << 20, 2)]);
}

/// A receive buffer size no connection can register is refused with a clear error
/// before anything is set up: no panic, no abort (the process lives on to connect
/// with a sane setting).
#[test]
fn an_impossible_chunk_is_an_error_not_a_crash() {
    use net_rs::drivers::rdma::transport::RdmaConfig;
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18607);
    let server = echo_server(addr);
    for chunk in [usize::MAX, u32::MAX as usize, (1 << 20) + 1] {
        let cfg = RdmaConfig {
            chunk,
            ..RdmaConfig::default()
        };
        let err = futures::executor::block_on(net_rs::drivers::rdma::connect_with(
            addr,
            Duration::from_secs(10),
            cfg,
        ))
        .unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::Io(std::io::ErrorKind::InvalidInput),
            "chunk {chunk}: {err}"
        );
    }
    futures::executor::block_on(async {
        let t = cm::connect(addr, Duration::from_secs(10)).await.unwrap();
        t.send(pattern(10, 1)).await.unwrap();
        assert_eq!(t.recv().await.unwrap(), pattern(10, 1));
        t.close().await.unwrap();
    });
    assert_eq!(server.join().unwrap(), 1);
}

/// How a server waits for its next connection in [`accepting_loses_no_connection`].
#[derive(Clone, Copy, Debug)]
enum AcceptStyle {
    /// `accept` with a timeout of a few milliseconds, in a loop that checks a stop flag
    /// in between (the usual shape of a server that can be stopped).
    ShortTimeouts,
    /// `accept` raced against a timer that wins after a few milliseconds: the accept
    /// future is dropped (cancelled) mid-wait, again and again.
    Cancelled,
}

/// A server whose accept gives up (a short timeout) or is cancelled (its future dropped)
/// while connections arrive loses none of them: a connection RDMA-CM set up for the
/// peer is returned by this or the next `accept`, never torn down behind the peer's
/// back (which the peer saw as "RDMA-CM reported Disconnected" on its first message).
fn accepting_loses_no_connection(port: u16, style: AcceptStyle) {
    use futures::future::{select, Either};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, port);
    const CLIENTS: u8 = 6;
    let listener = cm::listen(addr).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let server = std::thread::spawn(move || {
        futures::executor::block_on(async move {
            let mut echoers = Vec::new();
            let mut k = 0u64;
            while !st.load(Ordering::SeqCst) {
                k += 1;
                let wait = Duration::from_millis(1 + k % 5);
                let got = match style {
                    AcceptStyle::ShortTimeouts => listener.accept(wait).await,
                    AcceptStyle::Cancelled => {
                        let accept = std::pin::pin!(listener.accept(Duration::from_millis(300)));
                        match select(accept, rdma_env::timer(wait * 4)).await {
                            Either::Left((r, _)) => r,
                            Either::Right(_) => continue,
                        }
                    }
                };
                match got {
                    Ok(t) => echoers.push(std::thread::spawn(move || {
                        futures::executor::block_on(async move {
                            let m = t.recv().await?;
                            t.send(m).await?;
                            t.close().await
                        })
                    })),
                    Err(e) if e.kind() == ErrorKind::TimedOut => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
            echoers.len()
        })
    });
    let clients = std::panic::catch_unwind(move || {
        rdma_env::within(120, &format!("{CLIENTS} clients ({style:?})"), move || {
            futures::executor::block_on(async move {
                for i in 0..CLIENTS {
                    let t = cm::connect(addr, Duration::from_secs(10))
                        .await
                        .unwrap_or_else(|e| panic!("client {i} ({style:?}): connect: {e}"));
                    let msg = pattern(1000, i);
                    t.send(msg.clone())
                        .await
                        .unwrap_or_else(|e| panic!("client {i} ({style:?}): send: {e}"));
                    let back = t
                        .recv()
                        .await
                        .unwrap_or_else(|e| panic!("client {i} ({style:?}): recv: {e}"));
                    assert!(back == msg, "client {i}: another payload came back");
                    t.close().await.unwrap();
                }
            })
        })
    });
    // The server's loop ends either way; a client's failure is the test's.
    stop.store(true, Ordering::SeqCst);
    if let Err(p) = clients {
        std::panic::resume_unwind(p);
    }
    let accepted =
        rdma_env::within(30, "the server's loop", move || server.join()).expect("server thread");
    assert_eq!(
        accepted,
        usize::from(CLIENTS),
        "connections accepted ({style:?})"
    );
}

#[test]
fn accepting_with_short_timeouts_loses_no_connection() {
    accepting_loses_no_connection(18608, AcceptStyle::ShortTimeouts);
}

#[test]
fn a_cancelled_accept_loses_no_connection() {
    accepting_loses_no_connection(18609, AcceptStyle::Cancelled);
}
