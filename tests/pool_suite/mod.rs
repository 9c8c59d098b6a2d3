//! The pool suite, written against `Arc<dyn Runtime>` and run under tokio
//! (`pool_tokio.rs`) and async-std / smol (`pool_async_io.rs`). Real TCP sockets on
//! 127.0.0.1 only.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use net_rs::drivers::tcp::TcpConfig;
use net_rs::pool::{ConnectionPool, PoolConfig, ReconnectPolicy, TcpConnector};
use net_rs::runtime::Runtime;
use net_rs::transport::Transport;
use net_rs::ErrorKind;

pub use crate::common::{deadline, spawn};

/// A blocking echo server on std threads that can be stopped (closing every
/// connection) and started again on the same port.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub accepted: Arc<AtomicUsize>,
}

impl EchoServer {
    pub fn start(addr: SocketAddr) -> EchoServer {
        let listener = std::net::TcpListener::bind(addr).expect("bind echo server");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let acceptor = std::thread::spawn(move || {
            let conns: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Default::default();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let s = s.clone();
                        conns
                            .lock()
                            .unwrap()
                            .push(std::thread::spawn(move || echo(sock, s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            drop(listener);
            for h in conns.lock().unwrap().drain(..) {
                h.join().unwrap();
            }
        });
        EchoServer {
            addr,
            stop,
            threads: vec![acceptor],
            accepted,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Close the listener and every connection, and wait until they are gone.
    pub fn kill(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

fn echo(mut sock: std::net::TcpStream, stop: Arc<AtomicBool>) {
    sock.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if sock.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Client-side TCP connections in state ESTABLISHED to `port` (from /proc/net/tcp).
pub fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn pool(
    rt: &Arc<dyn Runtime>,
    addr: SocketAddr,
    config: PoolConfig,
) -> ConnectionPool<TcpConnector> {
    let tcp = TcpConfig::default().runtime(rt.clone());
    ConnectionPool::new(
        TcpConnector::with_config(addr, tcp),
        config.runtime(rt.clone()),
    )
    .unwrap()
}

async fn roundtrip(conn: &impl Transport, msg: &'static [u8]) -> net_rs::Result<()> {
    conn.send(Bytes::from_static(msg)).await?;
    let back = conn.recv().await?;
    assert_eq!(&back[..], msg);
    Ok(())
}

pub async fn reuses_connections(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let p = pool(&rt, server.addr(), PoolConfig::default().max_size(4));
    for _ in 0..5 {
        let c = deadline(&rt, p.get()).await.unwrap();
        deadline(&rt, roundtrip(&*c, b"hello")).await.unwrap();
    }
    let st = p.status();
    assert_eq!(
        st.total_created, 1,
        "sequential checkouts reuse one connection"
    );
    assert_eq!((st.idle, st.in_use), (1, 0));
    deadline(&rt, p.close()).await;
    assert_eq!(p.get().await.unwrap_err().kind(), ErrorKind::PoolClosed);
    server.kill();
}

pub async fn checkout_times_out_when_full(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let p = pool(
        &rt,
        server.addr(),
        PoolConfig::default()
            .max_size(1)
            .checkout_timeout(Duration::from_millis(100)),
    );
    let held = deadline(&rt, p.get()).await.unwrap();
    let t0 = Instant::now();
    let err = deadline(&rt, p.get()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(t0.elapsed() >= Duration::from_millis(90));
    assert!(err.to_string().contains("1 of 1"), "{err}");
    assert_eq!(p.status().checkout_timeouts, 1);
    assert_eq!(p.status().waiting, 0);
    drop(held);
    assert!(deadline(&rt, p.get()).await.is_ok());
    server.kill();
}

pub async fn waiters_are_served_in_fifo_order(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let p = pool(&rt, server.addr(), PoolConfig::default().max_size(1));
    let held = deadline(&rt, p.get()).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (p2, order) = (p.clone(), order.clone());
        tasks.push(spawn(&rt, async move {
            let c = p2.get().await.unwrap();
            order.lock().unwrap().push(i);
            drop(c);
        }));
        // Make sure waiter i is queued before waiter i + 1.
        while p.status().waiting < i + 1 {
            rt.sleep(Duration::from_millis(2)).await;
        }
    }
    drop(held);
    for t in tasks {
        deadline(&rt, t).await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    server.kill();
}

pub async fn broken_connections_are_discarded(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let addr = server.addr();
    let p = pool(&rt, addr, PoolConfig::default().max_size(2));
    let c = deadline(&rt, p.get()).await.unwrap();
    deadline(&rt, roundtrip(&*c, b"x")).await.unwrap();
    server.kill();
    // The server closed the connection: the next use fails, so it must not come back.
    assert!(deadline(&rt, roundtrip(&*c, b"y")).await.is_err());
    drop(c);
    let st = p.status();
    assert_eq!((st.idle, st.discarded), (0, 1), "{st:?}");
    // Explicit discard.
    let server = EchoServer::start(addr);
    let c = deadline(&rt, p.get()).await.unwrap();
    c.discard();
    assert_eq!(p.status().discarded, 2);
    assert_eq!(p.status().idle, 0);
    server.kill();
}

pub async fn min_idle_is_kept_warm_and_idle_timeout_reaps(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let p = pool(
        &rt,
        server.addr(),
        PoolConfig::default()
            .max_size(4)
            .min_idle(2)
            .reaper_interval(Duration::from_millis(10)),
    );
    let t0 = Instant::now();
    while p.status().idle < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "min_idle never reached"
        );
        rt.sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(p.status().total_created, 2);
    deadline(&rt, p.close()).await;
    server.kill();

    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let p = pool(
        &rt,
        server.addr(),
        PoolConfig::default()
            .idle_timeout(Some(Duration::from_millis(30)))
            .reaper_interval(Duration::from_millis(10)),
    );
    drop(deadline(&rt, p.get()).await.unwrap());
    assert_eq!(p.status().idle, 1);
    let t0 = Instant::now();
    while p.status().idle > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "idle connection never reaped"
        );
        rt.sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(p.status().discarded, 1);
    server.kill();
}

pub async fn down_server_fails_fast_with_the_connect_error(rt: Arc<dyn Runtime>) {
    let addr = free_port();
    for policy in [
        ReconnectPolicy::none(),
        ReconnectPolicy::fixed(Duration::from_millis(20)).max_attempts(3),
        ReconnectPolicy::exponential(Duration::from_millis(10), Duration::from_millis(100))
            .max_elapsed(Duration::from_millis(300)),
    ] {
        let p = pool(
            &rt,
            addr,
            PoolConfig::default()
                .checkout_timeout(Duration::from_secs(20))
                .reconnect(policy),
        );
        let t0 = Instant::now();
        let err = deadline(&rt, p.get()).await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "{policy:?}: {err}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{policy:?}: not fast"
        );
        let st = p.status();
        assert!(st.failed_connects >= 1 && st.last_error.is_some(), "{st:?}");
        if policy.max_attempts == Some(3) {
            assert_eq!(
                st.failed_connects, 3,
                "fixed policy makes exactly 3 attempts"
            );
        }
        // While backing off, the next checkout fails at once.
        let t0 = Instant::now();
        assert!(deadline(&rt, p.get()).await.is_err());
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}

/// The flapping-server test: the echo server is killed and restarted many times while
/// several tasks keep checking out and sending.
pub async fn survives_a_flapping_server(rt: Arc<dyn Runtime>) {
    let first = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let addr = first.addr();
    let max_delay = Duration::from_millis(80);
    let p = pool(
        &rt,
        addr,
        PoolConfig::default()
            .max_size(4)
            .checkout_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .reconnect(
                ReconnectPolicy::exponential(Duration::from_millis(5), max_delay).max_attempts(2),
            ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (p, stop, ok, failed, rt2) = (
            p.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            rt.clone(),
        );
        workers.push(spawn(&rt, async move {
            // Until told to stop (a time cap, not a request count: a fast machine would
            // run out of requests before the server's last restart).
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                let step = async {
                    let c = p.get().await?;
                    roundtrip(&*c, b"flap").await
                };
                // Every request ends, one way or the other, well within the bound.
                match deadline(&rt2, step).await {
                    Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => {
                        rt2.sleep(Duration::from_millis(2)).await;
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    let mut server = Some(first);
    for _ in 0..8 {
        rt.sleep(Duration::from_millis(120)).await;
        server.take().unwrap().kill();
        rt.sleep(Duration::from_millis(80)).await;
        let before = ok.load(Ordering::SeqCst);
        let restarted = Instant::now();
        server = Some(EchoServer::start(addr));
        // Recovery within the backoff bound (plus scheduling slack on a busy machine).
        while ok.load(Ordering::SeqCst) == before {
            assert!(
                restarted.elapsed() < max_delay + Duration::from_secs(3),
                "the pool did not recover after a restart: {:?}",
                p.status()
            );
            rt.sleep(Duration::from_millis(2)).await;
        }
        assert!(
            established_to(addr.port()) <= 2 * 4,
            "more sockets than max_size"
        );
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        deadline(&rt, w).await.unwrap();
    }
    let st = p.status();
    assert!(
        ok.load(Ordering::SeqCst) > 0 && failed.load(Ordering::SeqCst) > 0,
        "{st:?}"
    );
    assert!(
        st.total_created >= 8,
        "reconnected after each restart: {st:?}"
    );
    deadline(&rt, p.close()).await;
    server.take().unwrap().kill();
    // No leaked connections: nothing stays established to the server's port.
    let t0 = Instant::now();
    while established_to(addr.port()) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "leaked {} connections",
            established_to(addr.port())
        );
        rt.sleep(Duration::from_millis(10)).await;
    }
}

#[macro_export]
macro_rules! pool_suite {
    ($run:path) => {
        $crate::pool_suite!(@each $run;
            reuses_connections checkout_times_out_when_full waiters_are_served_in_fifo_order
            broken_connections_are_discarded min_idle_is_kept_warm_and_idle_timeout_reaps
            down_server_fails_fast_with_the_connect_error survives_a_flapping_server);
    };
    (@each $run:path; $($name:ident)*) => {
        $(
            #[test]
            fn $name() {
                $run(|rt| Box::pin($crate::pool_suite::$name(rt)));
            }
        )*
    };
}
