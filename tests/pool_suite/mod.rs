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
use futures::{SinkExt, StreamExt};
use net_rs::drivers::tcp::{TcpConfig, TcpTransport};
use net_rs::pool::{ConnectionPool, Connector, PoolConfig, ReconnectPolicy, TcpConnector};
use net_rs::runtime::{timeout, Runtime};
use net_rs::transport::{Messages, Transport};
use net_rs::ErrorKind;

pub use crate::common::{deadline, spawn};

/// A blocking echo server on std threads that can be stopped (closing every
/// connection) and started again on the same port, can close its connections while it
/// keeps listening, and can answer late.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Bumped to close every connection accepted before.
    generation: Arc<AtomicUsize>,
    conns: Conns,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub accepted: Arc<AtomicUsize>,
}

type Conns = Arc<Mutex<Vec<(usize, std::thread::JoinHandle<()>)>>>;

impl EchoServer {
    pub fn start(addr: SocketAddr) -> EchoServer {
        Self::start_with_delay(addr, Duration::ZERO)
    }

    /// An echo server that sends each reply `delay` after the request came.
    pub fn start_with_delay(addr: SocketAddr, delay: Duration) -> EchoServer {
        let listener = std::net::TcpListener::bind(addr).expect("bind echo server");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns: Conns = Default::default();
        let (s, a, g, c) = (
            stop.clone(),
            accepted.clone(),
            generation.clone(),
            conns.clone(),
        );
        let acceptor = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let (s, g) = (s.clone(), g.clone());
                        let mine = g.load(Ordering::SeqCst);
                        c.lock().unwrap().push((
                            mine,
                            std::thread::spawn(move || echo(sock, s, g, mine, delay)),
                        ));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            drop(listener);
            for (_, h) in c.lock().unwrap().drain(..) {
                h.join().unwrap();
            }
        });
        EchoServer {
            addr,
            stop,
            generation,
            conns,
            threads: vec![acceptor],
            accepted,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Close every connection (FIN), as a server that closes idle connections does,
    /// but keep listening; returns once they are closed.
    pub fn drop_connections(&self) {
        let old = self.generation.fetch_add(1, Ordering::SeqCst);
        let gone: Vec<_> = {
            let mut conns = self.conns.lock().unwrap();
            let (gone, keep) = conns.drain(..).partition(|(g, _)| *g <= old);
            *conns = keep;
            gone
        };
        for (_, h) in gone {
            h.join().unwrap();
        }
    }

    /// Close the listener and every connection, and wait until they are gone.
    pub fn kill(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

fn echo(
    mut sock: std::net::TcpStream,
    stop: Arc<AtomicBool>,
    generation: Arc<AtomicUsize>,
    mine: usize,
    delay: Duration,
) {
    sock.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) && generation.load(Ordering::SeqCst) == mine {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                std::thread::sleep(delay);
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

/// A TCP connector whose `connect` and `check` (a ping: it sends `ping` and waits for
/// the echo) can be held up until released, to cancel or time out a checkout at those
/// `.await`s.
pub struct Gated {
    tcp: TcpConnector,
    rt: Arc<dyn Runtime>,
    pub hang_connect: Arc<AtomicBool>,
    pub hang_check: Arc<AtomicBool>,
    pub checks: Arc<AtomicUsize>,
}

impl Gated {
    pub fn new(rt: &Arc<dyn Runtime>, addr: SocketAddr) -> Gated {
        Gated {
            tcp: TcpConnector::with_config(addr, TcpConfig::default().runtime(rt.clone())),
            rt: rt.clone(),
            hang_connect: Default::default(),
            hang_check: Default::default(),
            checks: Default::default(),
        }
    }
}

impl Connector for Gated {
    type Transport = TcpTransport;

    async fn connect(&self) -> net_rs::Result<TcpTransport> {
        while self.hang_connect.load(Ordering::SeqCst) {
            self.rt.sleep(Duration::from_millis(2)).await;
        }
        self.tcp.connect().await
    }

    async fn check(&self, conn: &TcpTransport) -> bool {
        self.checks.fetch_add(1, Ordering::SeqCst);
        if conn.send(Bytes::from_static(b"ping")).await.is_err() {
            return false;
        }
        while self.hang_check.load(Ordering::SeqCst) {
            self.rt.sleep(Duration::from_millis(2)).await;
        }
        matches!(conn.recv().await, Ok(b) if &b[..] == b"ping")
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
        deadline(&rt, roundtrip(&c, b"hello")).await.unwrap();
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
    deadline(&rt, roundtrip(&c, b"x")).await.unwrap();
    server.kill();
    // The server closed the connection: the next use fails, so it must not come back.
    assert!(deadline(&rt, roundtrip(&c, b"y")).await.is_err());
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
                    roundtrip(&c, b"flap").await
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

/// Wait `d` on the suite's runtime (to let the network deliver something).
async fn pause(rt: &Arc<dyn Runtime>, d: Duration) {
    rt.sleep(d).await;
}

/// Fault 1: the server closes idle pooled connections (FIN) but keeps listening, or is
/// restarted. No request may fail for it: stale connections are discarded at checkout
/// and replaced, with or without `test_on_checkout`.
pub async fn stale_idle_connections_are_replaced_transparently(rt: Arc<dyn Runtime>) {
    for test_on_checkout in [false, true] {
        let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
        let addr = server.addr();
        let p = pool(
            &rt,
            addr,
            PoolConfig::default()
                .max_size(4)
                .test_on_checkout(test_on_checkout),
        );
        // Four connections, all idle afterwards.
        let held: Vec<_> = futures::future::join_all((0..4).map(|_| deadline(&rt, p.get())))
            .await
            .into_iter()
            .map(|c| c.unwrap())
            .collect();
        for c in &held {
            deadline(&rt, roundtrip(c, b"warm")).await.unwrap();
        }
        drop(held);
        assert_eq!(p.status().idle, 4, "{}", p.status());

        // The server closes them while they are idle; it still listens.
        server.drop_connections();
        pause(&rt, Duration::from_millis(30)).await;
        for i in 0..4 {
            let c = deadline(&rt, p.get()).await.unwrap();
            deadline(&rt, roundtrip(&c, b"after idle close"))
                .await
                .unwrap_or_else(|e| panic!("request {i} failed: {e} ({})", p.status()));
        }
        let st = p.status();
        assert_eq!((st.total_created, st.discarded), (5, 4), "{st}");

        // The server restarts on the same port: same story.
        server.kill();
        let server = EchoServer::start(addr);
        for i in 0..4 {
            let c = deadline(&rt, p.get()).await.unwrap();
            deadline(&rt, roundtrip(&c, b"after restart"))
                .await
                .unwrap_or_else(|e| panic!("request {i} failed: {e} ({})", p.status()));
        }
        let st = p.status();
        assert_eq!((st.total_created, st.discarded), (6, 5), "{st}");

        // A connection the peer closed while it was checked out (and unused) is
        // discarded at check-in.
        let c = deadline(&rt, p.get()).await.unwrap();
        server.drop_connections();
        pause(&rt, Duration::from_millis(30)).await;
        drop(c);
        let st = p.status();
        assert_eq!((st.idle, st.discarded), (0, 6), "{st}");
        deadline(&rt, p.close()).await;
        server.kill();
    }
}

/// A generic user of any transport: sends a request and gives up on the reply after
/// 20 ms.
async fn ask_impatiently(rt: &Arc<dyn Runtime>, t: &impl Transport, msg: &'static [u8]) {
    t.send(Bytes::from_static(msg)).await.unwrap();
    let r = timeout(&**rt, Duration::from_millis(20), t.recv()).await;
    assert!(
        r.unwrap_err().is_timeout(),
        "the server answers after 150 ms"
    );
}

/// Fault 2: user A sends a request, gives up on the reply, returns the connection;
/// user B, later, must get B's reply, never A's. With `max_size(1)` B would get the
/// very same connection if it were reused.
pub async fn an_abandoned_reply_never_reaches_the_next_user(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start_with_delay("127.0.0.1:0".parse().unwrap(), ms(150));
    let p = pool(&rt, server.addr(), PoolConfig::default().max_size(1));
    let b_asks = || async {
        let c = deadline(&rt, p.get()).await.unwrap();
        c.send(Bytes::from_static(b"B")).await.unwrap();
        let reply = deadline(&rt, c.recv()).await.unwrap();
        assert_eq!(&reply[..], b"B", "B got someone else's reply");
    };
    let mut discarded = 0;

    // A abandons `recv` on the guard (a timeout drops it).
    let c = deadline(&rt, p.get()).await.unwrap();
    c.send(Bytes::from_static(b"A1")).await.unwrap();
    let r = timeout(&*rt, ms(20), c.recv()).await;
    assert!(r.unwrap_err().is_timeout());
    assert!(c.is_broken(), "a dropped recv marks the exchange abandoned");
    drop(c);
    discarded += 1;
    assert_eq!(p.status().discarded, discarded, "{}", p.status());
    pause(&rt, ms(350)).await;
    b_asks().await;

    // The same through generic code: `&PooledConnection` is a `Transport`.
    let c = deadline(&rt, p.get()).await.unwrap();
    ask_impatiently(&rt, &c, b"A2").await;
    drop(c);
    discarded += 1;
    assert_eq!(p.status().discarded, discarded, "{}", p.status());
    pause(&rt, ms(350)).await;
    b_asks().await;

    // A sends and returns the connection without receiving at all, and B asks at once,
    // before A's reply exists anywhere a probe could see it: the guard counted a
    // message sent and none received, so the connection is not reused.
    let c = deadline(&rt, p.get()).await.unwrap();
    c.send(Bytes::from_static(b"A3")).await.unwrap();
    assert!(c.is_broken(), "a message sent and no reply received");
    drop(c);
    discarded += 1;
    assert_eq!(p.status().discarded, discarded, "{}", p.status());
    b_asks().await;

    // The same through an owned Stream/Sink view of the guard, whose `next()` A gives
    // up on: the view uses the guard's own methods.
    let c = deadline(&rt, p.get()).await.unwrap();
    let mut view = Messages::owned(c);
    view.send(Bytes::from_static(b"A5")).await.unwrap();
    assert!(timeout(&*rt, ms(20), view.next()).await.is_err());
    drop(view);
    discarded += 1;
    assert_eq!(p.status().discarded, discarded, "{}", p.status());
    b_asks().await;

    // One-way traffic says so, before its sends or after, and its connection is
    // reused.
    for say_first in [false, true] {
        let c = deadline(&rt, p.get()).await.unwrap();
        if say_first {
            c.no_reply_expected();
        }
        c.send(Bytes::from_static(b"note")).await.unwrap();
        c.send(Bytes::from_static(b"note")).await.unwrap();
        if !say_first {
            c.no_reply_expected();
        }
        assert!(!c.is_broken(), "said first: {say_first}");
        drop(c);
        assert_eq!(
            p.status().idle,
            1,
            "said first: {say_first}: {}",
            p.status()
        );
        // (This server echoes even notes: the echo is seen at the next checkout.)
        pause(&rt, ms(350)).await;
        b_asks().await;
        discarded += 1;
        assert_eq!(p.status().discarded, discarded, "{}", p.status());
    }

    // The reply has already arrived at check-in (sent through the bare transport, so
    // only the probe can tell).
    let c = deadline(&rt, p.get()).await.unwrap();
    c.get_ref().send(Bytes::from_static(b"A4")).await.unwrap();
    pause(&rt, ms(350)).await;
    drop(c);
    discarded += 1;
    assert_eq!(
        (p.status().idle, p.status().discarded),
        (0, discarded),
        "{}",
        p.status()
    );
    b_asks().await;
    assert_eq!(p.status().total_created, 8, "{}", p.status());
    server.kill();
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Faults 3 and 4: a checkout dropped at any `.await` (waiting its turn, connecting,
/// running `Connector::check`) gives back its slot; and `checkout_timeout` bounds the
/// check and the connect however long they would take.
pub async fn a_cancelled_or_slow_checkout_gives_back_what_it_took(rt: Arc<dyn Runtime>) {
    // Replies come 150 ms late, so a ping cut off after 30 ms has no answer yet when
    // the connection comes back: only the guard can tell it is half-used.
    let server = EchoServer::start_with_delay("127.0.0.1:0".parse().unwrap(), ms(150));
    let gated = Gated::new(&rt, server.addr());
    let (hang_connect, hang_check, checks) = (
        gated.hang_connect.clone(),
        gated.hang_check.clone(),
        gated.checks.clone(),
    );
    let p = ConnectionPool::new(
        gated,
        PoolConfig::default()
            .max_size(1)
            .test_on_checkout(true)
            .checkout_timeout(ms(400))
            .connect_timeout(Duration::from_secs(60))
            .reconnect(ReconnectPolicy::fixed(ms(1)))
            .runtime(rt.clone()),
    )
    .unwrap();
    let assert_free = |when: &str| {
        let st = p.status();
        assert_eq!(
            (st.in_use, st.waiting, st.connecting),
            (0, 0, 0),
            "{when}: {st}"
        );
    };
    let usable = || async {
        let c = deadline(&rt, p.get()).await.unwrap();
        // Not the answer to an interrupted ping.
        deadline(&rt, roundtrip(&c, b"usable")).await.unwrap();
    };
    usable().await;
    assert_eq!(p.status().idle, 1);

    // Dropped while `Connector::check` waits for its pong.
    hang_check.store(true, Ordering::SeqCst);
    let before = checks.load(Ordering::SeqCst);
    let r = timeout(&*rt, ms(30), p.get()).await;
    assert!(r.unwrap_err().is_timeout());
    assert_eq!(checks.load(Ordering::SeqCst), before + 1, "the check ran");
    assert_free("cancelled during the check");
    assert_eq!(
        p.status().idle,
        0,
        "the half-pinged connection was discarded"
    );
    hang_check.store(false, Ordering::SeqCst);
    usable().await;

    // Bounded by checkout_timeout: a check that never answers.
    hang_check.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let err = deadline(&rt, p.get()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(t0.elapsed() < ms(1500), "took {:?}", t0.elapsed());
    assert_free("check timed out");
    hang_check.store(false, Ordering::SeqCst);

    // Dropped while connecting (nothing idle now).
    hang_connect.store(true, Ordering::SeqCst);
    let r = timeout(&*rt, ms(50), p.get()).await;
    assert!(r.unwrap_err().is_timeout());
    assert_free("cancelled during connect");

    // Bounded by checkout_timeout: a connect that never ends (connect_timeout is 60 s).
    let t0 = Instant::now();
    let err = deadline(&rt, p.get()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(t0.elapsed() < ms(1500), "took {:?}", t0.elapsed());
    assert_free("connect timed out");
    hang_connect.store(false, Ordering::SeqCst);

    // Dropped while waiting for its turn.
    let held = deadline(&rt, p.get()).await.unwrap();
    let r = timeout(&*rt, ms(50), p.get()).await;
    assert!(r.unwrap_err().is_timeout());
    assert_eq!(p.status().waiting, 0, "{}", p.status());
    drop(held);
    assert_free("cancelled while waiting");
    usable().await;
    assert_eq!(p.status().checkout_timeouts, 2, "{}", p.status());
    deadline(&rt, p.close()).await;
    server.kill();
}

/// Fault 6: `request` sends and receives one reply, and a connection whose exchange
/// did not complete (timed out, cancelled, failed midway) or that was marked broken is
/// never reused.
pub async fn request_discards_a_connection_whose_exchange_did_not_complete(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start_with_delay("127.0.0.1:0".parse().unwrap(), ms(150));
    let tcp = TcpConfig::default()
        .runtime(rt.clone())
        .max_message_size(64);
    let p = ConnectionPool::new(
        TcpConnector::with_config(server.addr(), tcp),
        PoolConfig::default()
            .max_size(1)
            .request_timeout(Some(ms(40)))
            .runtime(rt.clone()),
    )
    .unwrap();
    let status = |idle, created, discarded| {
        let st = p.status();
        assert_eq!(
            (st.idle, st.total_created, st.discarded),
            (idle, created, discarded),
            "{st}"
        );
    };

    // request_timeout: the reply comes after 150 ms, the request gives up at 40 ms.
    let c = deadline(&rt, p.get()).await.unwrap();
    let err = deadline(&rt, c.request(Bytes::from_static(b"slow")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(c.is_broken());
    // The same checkout cannot be fooled into taking the late reply either.
    let err = deadline(&rt, c.request(Bytes::from_static(b"again")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    drop(c);
    status(0, 1, 1);

    // A pool without request_timeout; the caller times the request out itself.
    let p2 = ConnectionPool::new(
        TcpConnector::with_config(server.addr(), TcpConfig::default().runtime(rt.clone())),
        PoolConfig::default().max_size(1).runtime(rt.clone()),
    )
    .unwrap();
    let reply = deadline(&rt, p2.request(Bytes::from_static(b"hello")))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"hello");
    let c = deadline(&rt, p2.get()).await.unwrap();
    let r = timeout(&*rt, ms(20), c.request(Bytes::from_static(b"cut")));
    assert!(r.await.unwrap_err().is_timeout());
    assert!(c.is_broken(), "a dropped request marks the connection");
    drop(c);
    pause(&rt, ms(250)).await;
    let reply = deadline(&rt, p2.request(Bytes::from_static(b"B")))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"B");
    let st = p2.status();
    assert_eq!((st.total_created, st.discarded, st.idle), (2, 1, 1), "{st}");

    // mark_broken through a shared reference.
    let c = deadline(&rt, p2.get()).await.unwrap();
    let shared = &c;
    shared.mark_broken();
    drop(c);
    assert_eq!(p2.status().discarded, 2);

    // A message over the maximum is refused before anything is written: the
    // connection stays usable.
    let c = deadline(&rt, p.get()).await.unwrap();
    let err = deadline(&rt, c.request(Bytes::from(vec![0u8; 100])))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::MessageTooLarge { .. }),
        "{err}"
    );
    assert!(!c.is_broken());
    drop(c);
    status(1, 2, 1);
    server.kill();
}

/// Fault 7: `net_rs::runtime::timeout` on the suite's runtime.
pub async fn runtime_timeout_works_on_every_runtime(rt: Arc<dyn Runtime>) {
    let t0 = Instant::now();
    let err = deadline(&rt, timeout(&*rt, ms(30), std::future::pending::<()>()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(t0.elapsed() >= ms(25), "{:?}", t0.elapsed());
    let v = deadline(&rt, timeout(&*rt, Duration::from_secs(10), async { 7 })).await;
    assert_eq!(v.unwrap(), 7);
}

/// A connector that always fails with `kind`.
struct Failing {
    kind: ErrorKind,
    calls: Arc<AtomicUsize>,
}

impl Connector for Failing {
    type Transport = TcpTransport;
    async fn connect(&self) -> net_rs::Result<TcpTransport> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(net_rs::Error::new(self.kind, "no RDMA device here"))
    }
}

/// Fault 8: an error no retry can fix fails the checkout at once, although the policy
/// would retry for a while.
pub async fn a_permanent_connect_error_fails_at_once(rt: Arc<dyn Runtime>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let p = ConnectionPool::new(
        Failing {
            kind: ErrorKind::Unsupported,
            calls: calls.clone(),
        },
        PoolConfig::default()
            .checkout_timeout(Duration::from_secs(10))
            .reconnect(ReconnectPolicy::fixed(ms(300)).max_attempts(10))
            .runtime(rt.clone()),
    )
    .unwrap();
    let t0 = Instant::now();
    let err = deadline(&rt, p.get()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(t0.elapsed() < ms(250), "waited {:?}", t0.elapsed());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no retry");
    assert!(!net_rs::pool::is_transient(&err));

    // A transient error is still retried per the policy.
    let calls = Arc::new(AtomicUsize::new(0));
    let p = ConnectionPool::new(
        Failing {
            kind: ErrorKind::ConnectionRefused,
            calls: calls.clone(),
        },
        PoolConfig::default()
            .reconnect(ReconnectPolicy::fixed(ms(5)).max_attempts(3))
            .runtime(rt.clone()),
    )
    .unwrap();
    let err = deadline(&rt, p.get()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// Fault 9: `TcpConnector` takes what `TcpTransport::connect` takes (a host name,
/// resolved at connect time), and `Status` prints.
pub async fn tcp_connector_takes_host_names_and_status_displays(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let port = server.addr().port();
    let tcp = TcpConfig::default().runtime(rt.clone());
    let by_name = ConnectionPool::new(
        TcpConnector::with_config(format!("localhost:{port}"), tcp.clone()),
        PoolConfig::default().runtime(rt.clone()),
    )
    .unwrap();
    let by_pair = ConnectionPool::new(
        TcpConnector::with_config(("127.0.0.1", port), tcp),
        PoolConfig::default().runtime(rt.clone()),
    )
    .unwrap();
    for p in [&by_name, &by_pair] {
        let c = deadline(&rt, p.get()).await.unwrap();
        deadline(&rt, roundtrip(&c, b"named")).await.unwrap();
    }
    let shown = by_name.status().to_string();
    assert!(
        shown.starts_with("1 idle, 0 in use of 10, 0 waiting, 0 connecting; created 1"),
        "{shown}"
    );
    deadline(&rt, by_name.close()).await;
    assert!(by_name.status().to_string().ends_with("; closed"));
    server.kill();
}

/// Fault 5: a pool made on a tokio runtime that is then dropped (its background task
/// was mid-connect), used from the suite's runtime and from `block_on`: every
/// operation ends, with an error or success, and nothing panics.
#[cfg(feature = "tokio")]
pub async fn a_pool_that_outlives_its_runtime_fails_cleanly(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let addr = server.addr();
    let (p, held, dead) = std::thread::spawn(move || {
        let tokio_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let net: Arc<dyn Runtime> = Arc::new(net_rs::runtime::tokio::TokioRuntime::new(
            tokio_rt.handle().clone(),
        ));
        let gated = Gated::new(&net, addr);
        let hang = gated.hang_connect.clone();
        let p = ConnectionPool::new(
            gated,
            PoolConfig::default()
                .max_size(4)
                .min_idle(1)
                .reaper_interval(ms(5))
                .runtime(net.clone()),
        )
        .unwrap();
        let held = tokio_rt.block_on(async {
            let c = p.get().await.unwrap();
            roundtrip(&c, b"before").await.unwrap();
            while p.status().idle == 0 {
                tokio::time::sleep(ms(2)).await;
            }
            // Take the idle one: the background refill starts a connect, which hangs
            // until the runtime goes away.
            hang.store(true, Ordering::SeqCst);
            let c2 = p.get().await.unwrap();
            while p.status().connecting == 0 {
                tokio::time::sleep(ms(2)).await;
            }
            drop(c2);
            c
        });
        drop(tokio_rt);
        (p, held, net)
    })
    .join()
    .unwrap();
    assert!(dead.is_shut_down());
    let st = p.status();
    assert_eq!(
        st.connecting, 0,
        "the dropped refill gave back its slot: {st}"
    );

    let t0 = Instant::now();
    let err = deadline(&rt, p.get()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("shut down"), "{err}");
    let err = deadline(&rt, held.request(Bytes::from_static(b"after")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let err = deadline(&rt, timeout(&*dead, ms(10), async {}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    drop(held);
    let st = p.status();
    assert_eq!((st.in_use, st.discarded), (0, 1), "{st}");
    // From a plain thread with futures' block_on.
    let p2 = p.clone();
    let from_block_on = std::thread::spawn(move || {
        futures::executor::block_on(async { p2.get().await.map(|_| ()) })
    })
    .join()
    .unwrap();
    assert_eq!(from_block_on.unwrap_err().kind(), ErrorKind::Unsupported);
    deadline(&rt, p.close()).await;
    assert_eq!(p.status().idle, 0);
    assert_eq!(p.get().await.unwrap_err().kind(), ErrorKind::Unsupported);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(p);
    server.kill();
}

/// A connect that runs out of the checkout's time (what was left of
/// `checkout_timeout`, less than `connect_timeout`) times the checkout out, and says
/// nothing about the server: the pool must not count it as a failed connect and back
/// off, failing the next users fast while the server is fine. (Found by a breaker: a
/// waiter whose turn came just before its deadline put a healthy server "down" for
/// everyone; under load hundreds of checkouts failed from one such attempt.)
pub async fn a_connect_cut_short_by_the_checkout_timeout_does_not_mark_the_server_down(
    rt: Arc<dyn Runtime>,
) {
    let server = EchoServer::start("127.0.0.1:0".parse().unwrap());
    let gated = Gated::new(&rt, server.addr());
    let hang = gated.hang_connect.clone();
    let p = ConnectionPool::new(
        gated,
        PoolConfig::default()
            .max_size(1)
            .checkout_timeout(ms(100))
            .connect_timeout(Duration::from_secs(60))
            // A counted failure would fail every checkout for 30 s.
            .reconnect(ReconnectPolicy::fixed(Duration::from_secs(30)))
            .runtime(rt.clone()),
    )
    .unwrap();
    for round in 0..3 {
        hang.store(true, Ordering::SeqCst);
        let err = deadline(&rt, p.get()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        let st = p.status();
        assert_eq!(
            (st.failed_connects, st.connecting, st.in_use),
            (0, 0, 0),
            "round {round}: {st}"
        );
        hang.store(false, Ordering::SeqCst);
        let c = deadline(&rt, p.get()).await.unwrap();
        deadline(&rt, roundtrip(&c, b"fine")).await.unwrap();
        c.mark_broken();
    }
    drop(p);
    server.kill();
}

/// `Duration::MAX` is a natural way to say "no limit": every duration setting of the
/// pool (and of its TCP connections) takes it without a panic, and the pool works.
/// Checkout timeout, connect timeout, request timeout, idle timeout, lifetime, reaper
/// interval, all at once, against a working server; then a fixed back-off of
/// `Duration::MAX` against a server that is down (a failed connect, the next checkout
/// while backing off for good).
pub async fn no_limit_durations_neither_panic_nor_hang(rt: Arc<dyn Runtime>) {
    let server = EchoServer::start(free_port());
    let tcp = TcpConfig::default()
        .runtime(rt.clone())
        .linger(Duration::MAX)
        .connect_timeout(Some(Duration::MAX));
    let p = ConnectionPool::new(
        TcpConnector::with_config(server.addr, tcp),
        PoolConfig::default()
            .checkout_timeout(Duration::MAX)
            .connect_timeout(Duration::MAX)
            .request_timeout(Some(Duration::MAX))
            .idle_timeout(Some(Duration::MAX))
            .max_lifetime(Some(Duration::MAX))
            .reaper_interval(Duration::MAX)
            .reconnect(ReconnectPolicy::exponential(Duration::MAX, Duration::MAX))
            .runtime(rt.clone()),
    )
    .unwrap();
    for _ in 0..3 {
        let reply = deadline(&rt, p.request(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        assert_eq!(&reply[..], b"hi");
        let c = deadline(&rt, p.get()).await.unwrap();
        deadline(&rt, roundtrip(c.get_ref(), b"again"))
            .await
            .unwrap();
    }
    deadline(&rt, p.close()).await;
    server.kill();

    let down = free_port();
    let p = pool(
        &rt,
        down,
        PoolConfig::default()
            .checkout_timeout(Duration::from_millis(500))
            .reconnect(ReconnectPolicy::fixed(Duration::MAX)),
    );
    for _ in 0..2 {
        let t0 = Instant::now();
        assert!(deadline(&rt, p.get()).await.is_err());
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "not bounded by the checkout timeout"
        );
    }
}

#[macro_export]
macro_rules! pool_suite {
    ($run:path) => {
        $crate::pool_suite!(@each $run;
            reuses_connections checkout_times_out_when_full waiters_are_served_in_fifo_order
            broken_connections_are_discarded min_idle_is_kept_warm_and_idle_timeout_reaps
            down_server_fails_fast_with_the_connect_error survives_a_flapping_server
            stale_idle_connections_are_replaced_transparently
            an_abandoned_reply_never_reaches_the_next_user
            a_cancelled_or_slow_checkout_gives_back_what_it_took
            request_discards_a_connection_whose_exchange_did_not_complete
            runtime_timeout_works_on_every_runtime a_permanent_connect_error_fails_at_once
            tcp_connector_takes_host_names_and_status_displays
            a_connect_cut_short_by_the_checkout_timeout_does_not_mark_the_server_down
            no_limit_durations_neither_panic_nor_hang);
        #[cfg(feature = "tokio")]
        $crate::pool_suite!(@each $run; a_pool_that_outlives_its_runtime_fails_cleanly);
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
