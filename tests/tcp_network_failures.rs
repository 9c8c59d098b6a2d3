//! TCP when the network fails: kernel keepalive and `TCP_USER_TIMEOUT` bound how long a
//! connection to a vanished peer stays open, under tokio and the async-io adapter.
//!
//! Each case makes two network namespaces joined by a veth pair (198.18.10.1/24 and
//! 198.18.10.2/24, from the benchmarking range 198.18.0.0/15), runs the client on a
//! thread inside one and the peer inside the other (each side its own runtime), and
//! then takes the peer's end of the link down: the client's packets leave and vanish,
//! as with a pulled cable or a host that lost power. Neighbour entries are permanent,
//! so no ARP failure turns the timeout into "host unreachable".
//!
//! Needs root (network namespaces) and `ip` (iproute2); CI runs as root. Not root: each
//! case says it was skipped and passes. As root, any failure to set up fails the case.
//! Every wait is bounded, so a regression fails instead of hanging.
#![cfg(all(target_os = "linux", any(feature = "tokio", feature = "async-std")))]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{select, Either};
use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::pool::{ConnectionPool, PoolConfig, PooledConnection, TcpConnector};
use net_rs::runtime::{timeout, Runtime};
use net_rs::transport::Transport;
use net_rs::{Error, ErrorKind};

/// The client's and the peer's addresses.
const CLIENT_IP: &str = "198.18.10.1";
const PEER_IP: &str = "198.18.10.2";
const PORT: u16 = 7000;

/// The keepalive of the cases: idle 1 s, interval 1 s, 3 probes; so a vanished peer is
/// detected within 4 s of the last segment from it (and `TCP_USER_TIMEOUT` is 4 s).
const IDLE: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_secs(1);
const COUNT: u32 = 3;
const DETECTION: Duration = Duration::from_secs(4);
/// Slack on top of a kernel deadline: timer granularity and scheduling.
const MARGIN: Duration = Duration::from_secs(1);
/// The retransmission timeout that passes before the user timeout starts counting.
const RTO_SLACK: Duration = Duration::from_secs(1);
/// What `close` may take.
const LINGER: Duration = Duration::from_secs(2);
/// How long an operation on an already failed connection may take.
const PROMPT: Duration = Duration::from_millis(500);

fn keepalive_config(rt: &Arc<dyn Runtime>) -> TcpConfig {
    TcpConfig::default()
        .runtime(rt.clone())
        .keepalive(IDLE, INTERVAL, COUNT)
        .linger(LINGER)
}

// ---------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run `ip {}`: {e} (is iproute2 installed?)", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair, both up, with permanent neighbour entries.
/// Dropped (also when a case panics), it deletes both namespaces.
struct Netns {
    client: String,
    peer: String,
    made: Vec<String>,
}

impl Netns {
    /// `None` when not root: the case is skipped.
    fn new(tag: &str) -> Option<Netns> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: network namespaces need root");
            return None;
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut ns = Netns {
            client: format!("nrs-{tag}-c-{id}"),
            peer: format!("nrs-{tag}-p-{id}"),
            made: Vec::new(),
        };
        for name in [ns.client.clone(), ns.peer.clone()] {
            ip(&["netns", "add", &name]);
            ns.made.push(name);
        }
        let (c, p) = (ns.client.as_str(), ns.peer.as_str());
        let (c_mac, p_mac) = ("02:00:00:00:0a:01", "02:00:00:00:0a:02");
        #[rustfmt::skip]
        ip(&["-n", c, "link", "add", "nrs0", "address", c_mac, "type", "veth",
             "peer", "name", "nrs1", "address", p_mac, "netns", p]);
        for (ns, dev, addr, other, other_mac) in [
            (c, "nrs0", CLIENT_IP, PEER_IP, p_mac),
            (p, "nrs1", PEER_IP, CLIENT_IP, c_mac),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            #[rustfmt::skip]
            ip(&["-n", ns, "neigh", "replace", other, "lladdr", other_mac, "dev", dev,
                 "nud", "permanent"]);
        }
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.made {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// The peer's end of the link (in namespace `peer_ns`) goes down: from now on the
/// client's packets vanish (its own interface stays up, so it gets no local error, only
/// silence).
fn cut(peer_ns: &str) {
    ip(&["-n", peer_ns, "link", "set", "nrs1", "down"]);
}

/// Run `f` on a new thread that first moves into network namespace `ns`: the sockets
/// it makes belong to that namespace. Its result arrives on the returned channel.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> mpsc::Receiver<T> {
    let path = format!("/var/run/netns/{ns}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        let _ = tx.send(f());
    });
    rx
}

/// Wait for a side's result, failing the case if it takes longer than `limit`.
fn join<T>(rx: mpsc::Receiver<T>, limit: Duration, what: &str) -> T {
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no result within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

// ---------------------------------------------------------------------------------
// Runtimes
// ---------------------------------------------------------------------------------

/// Which runtime a side runs on.
#[derive(Debug, Clone, Copy)]
enum Rt {
    /// tokio, current-thread.
    #[cfg(feature = "tokio")]
    Tokio,
    /// The async-io adapter, under async-std.
    #[cfg(feature = "async-std")]
    AsyncIo,
}

/// Build the runtime on this thread and block on `f` with its adapter.
fn block_on<T, Fut: Future<Output = T>>(rt: Rt, f: impl FnOnce(Arc<dyn Runtime>) -> Fut) -> T {
    match rt {
        #[cfg(feature = "tokio")]
        Rt::Tokio => {
            let tokio = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let net: Arc<dyn Runtime> = Arc::new(net_rs::runtime::tokio::TokioRuntime::new(
                tokio.handle().clone(),
            ));
            tokio.block_on(f(net))
        }
        #[cfg(feature = "async-std")]
        Rt::AsyncIo => {
            let net: Arc<dyn Runtime> = Arc::new(
                net_rs::runtime::async_io::AsyncIoRuntime::with_spawner(|task| {
                    async_std::task::spawn(task);
                }),
            );
            async_std::task::block_on(f(net))
        }
    }
}

// ---------------------------------------------------------------------------------
// The peer: a net-rs server in the peer namespace
// ---------------------------------------------------------------------------------

/// How the peer's connection ended: its error and when, or `None` if told to stop.
type PeerEnd = Option<(Error, Instant)>;

/// Start a net-rs server in `net.peer` on `rt` with `config`: it accepts one
/// connection, answers `ping` with `pong`, drops everything else, and ends when its
/// `recv` fails or `stop` fires. Returns once it listens.
fn start_peer(
    net: &Netns,
    rt: Rt,
    config: fn(&Arc<dyn Runtime>) -> TcpConfig,
) -> (mpsc::Receiver<PeerEnd>, oneshot::Sender<()>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let end = in_netns(&net.peer, move || {
        block_on(rt, |net| async move {
            let cfg = config(&net);
            let addr: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
            let l = TcpListener::bind_with(addr, &cfg).await.unwrap();
            ready_tx.send(()).unwrap();
            let serve = async {
                let s = l.accept().await.unwrap();
                loop {
                    match s.recv().await {
                        Ok(m) if &m[..] == b"ping" => {
                            s.send(Bytes::from_static(b"pong")).await.unwrap()
                        }
                        Ok(_) => {}
                        Err(e) => return Some((e, Instant::now())),
                    }
                }
            };
            let end = match select(std::pin::pin!(serve), stop_rx).await {
                Either::Left((end, _)) => end,
                Either::Right(_) => None,
            };
            end
        })
    });
    join(ready_rx, Duration::from_secs(10), "peer listening");
    (end, stop_tx)
}

/// Connect from the client namespace and check the path with one ping.
async fn connect(rt: &Arc<dyn Runtime>, cfg: &TcpConfig) -> TcpTransport {
    let addr: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
    let c = bounded(rt, Duration::from_secs(10), "connect", async {
        TcpTransport::connect_with(addr, cfg).await
    })
    .await
    .unwrap();
    bounded(
        rt,
        Duration::from_secs(5),
        "ping",
        c.send(Bytes::from_static(b"ping")),
    )
    .await
    .unwrap();
    let pong = bounded(rt, Duration::from_secs(5), "pong", c.recv())
        .await
        .unwrap();
    assert_eq!(&pong[..], b"pong");
    c
}

/// `fut`'s output, or a panic naming `what` if it takes longer than `limit`.
async fn bounded<T>(
    rt: &Arc<dyn Runtime>,
    limit: Duration,
    what: &str,
    fut: impl Future<Output = T>,
) -> T {
    match timeout(&**rt, limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// After the connection failed: `is_closed`, and `send`, `flush` and `close` fail at
/// once with the same kind.
async fn assert_failed_promptly(rt: &Arc<dyn Runtime>, c: &TcpTransport, kind: ErrorKind) {
    assert!(c.is_closed(), "is_closed after the connection failed");
    let e = bounded(
        rt,
        PROMPT,
        "send after failure",
        c.send(Bytes::from_static(b"x")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), kind, "send after failure: {e:?}");
    let e = bounded(rt, PROMPT, "flush after failure", c.flush())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), kind, "flush after failure: {e:?}");
    let e = bounded(rt, PROMPT, "close after failure", c.close())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), kind, "close after failure: {e:?}");
}

// ---------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------

/// (a) The link goes down for good while the connection is idle and the client waits
/// in `recv`: keepalive fails it with `TimedOut` within idle + interval * count.
fn idle_link_down_fails_recv_within_the_keepalive_bound(rt: Rt) {
    let Some(net) = Netns::new("a") else { return };
    let (peer, _stop) = start_peer(&net, rt, keepalive_config);
    let client = in_netns(&net.client, {
        let net_ns = net.peer.clone();
        move || {
            block_on(rt, |r| async move {
                let c = connect(&r, &keepalive_config(&r)).await;
                let mut recv = std::pin::pin!(c.recv());
                assert!(futures::poll!(recv.as_mut()).is_pending());
                cut(&net_ns);
                let cut = Instant::now();
                let bound = DETECTION + MARGIN;
                let e = bounded(&r, bound, "recv after the link went down", recv)
                    .await
                    .unwrap_err();
                let took = cut.elapsed();
                eprintln!("{rt:?}: idle link down -> recv failed after {took:?}: {e:?}");
                assert_eq!(e.kind(), ErrorKind::TimedOut, "{e:?}");
                assert!(e.is_fatal(), "a keepalive timeout is fatal: {e:?}");
                assert_failed_promptly(&r, &c, ErrorKind::TimedOut).await;
                (took, cut)
            })
        }
    });
    let (_, cut) = join(client, Duration::from_secs(30), "client");
    // The accepted socket has keepalive too: the peer's `recv` fails the same way.
    let (e, at) = join(peer, Duration::from_secs(10), "peer").expect("peer ended");
    let took = at.duration_since(cut);
    eprintln!("{rt:?}: the peer's recv failed after {took:?}: {e:?}");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e:?}");
    assert!(took <= DETECTION + MARGIN, "peer detected after {took:?}");
}

/// (e) The link goes down while nobody waits in `recv`, and the application watches
/// `is_closed()` (as a pool's checkout does). Once it turns true, `recv` reports the
/// keepalive's `TimedOut`, not an orderly end: the look at the socket that noticed the
/// failure took the socket's error with it, and must keep it for `recv` (a breaker
/// found `recv` saying "the peer closed the connection" here, so a `Messages` stream
/// would have ended as if the peer had finished).
fn is_closed_then_recv_reports_the_timeout_not_an_orderly_end(rt: Rt) {
    let Some(net) = Netns::new("e") else { return };
    let (_peer, _stop) = start_peer(&net, rt, keepalive_config);
    let client = in_netns(&net.client, {
        let net_ns = net.peer.clone();
        move || {
            block_on(rt, |r| async move {
                let c = connect(&r, &keepalive_config(&r)).await;
                cut(&net_ns);
                let cut = Instant::now();
                while !c.is_closed() {
                    let took = cut.elapsed();
                    assert!(
                        took <= DETECTION + MARGIN,
                        "is_closed still false after {took:?}"
                    );
                    r.sleep(Duration::from_millis(50)).await;
                }
                eprintln!("{rt:?}: is_closed after {:?}", cut.elapsed());
                let e = bounded(&r, PROMPT, "recv after is_closed", c.recv())
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::TimedOut, "{e:?}");
                assert!(e.is_fatal(), "{e:?}");
                assert_failed_promptly(&r, &c, ErrorKind::TimedOut).await;
            })
        }
    });
    join(client, Duration::from_secs(30), "client");
}

/// (f) Both directions busy with 1 MiB messages when the link goes down: the sending
/// and the receiving task both end with `TimedOut`, whichever of them the socket told.
/// A breaker found the receivers ending with "peer closed the connection after N of
/// 1048576 bytes" (`UnexpectedEof`) while the senders got `TimedOut`: a partition
/// reported as the peer's own end.
fn link_down_mid_message_both_ways_is_a_timeout_for_send_and_recv(rt: Rt) {
    let Some(net) = Netns::new("f") else { return };
    let (ready_tx, ready_rx) = mpsc::channel();
    // The peer streams 1 MiB messages at the client and reads what comes.
    let _peer = in_netns(&net.peer, move || {
        block_on(rt, |r| async move {
            let cfg = keepalive_config(&r);
            let addr: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
            let l = TcpListener::bind_with(addr, &cfg).await.unwrap();
            ready_tx.send(()).unwrap();
            let s = l.accept().await.unwrap();
            assert_eq!(&s.recv().await.unwrap()[..], b"ping");
            s.send(Bytes::from_static(b"pong")).await.unwrap();
            let big = Bytes::from(vec![1u8; 1 << 20]);
            let reading = async { while s.recv().await.is_ok() {} };
            let sending = async { while s.send(big.clone()).await.is_ok() {} };
            futures::future::join(reading, sending).await;
        })
    });
    join(ready_rx, Duration::from_secs(10), "peer listening");
    let client = in_netns(&net.client, {
        let net_ns = net.peer.clone();
        move || {
            block_on(rt, |r| async move {
                let c = connect(&r, &keepalive_config(&r)).await;
                let big = Bytes::from(vec![2u8; 1 << 20]);
                let bound = Duration::from_millis(300) + DETECTION + RTO_SLACK + MARGIN;
                let receiving = async {
                    loop {
                        if let Err(e) = c.recv().await {
                            return e;
                        }
                    }
                };
                let sending = async {
                    loop {
                        if let Err(e) = c.send(big.clone()).await {
                            return e;
                        }
                    }
                };
                let cutting = async {
                    r.sleep(Duration::from_millis(300)).await;
                    cut(&net_ns);
                };
                let both = futures::future::join3(receiving, sending, cutting);
                let (recv_e, send_e, ()) = bounded(&r, bound, "both directions", both).await;
                eprintln!("{rt:?}: recv ended with {recv_e:?}, send with {send_e:?}");
                assert_eq!(recv_e.kind(), ErrorKind::TimedOut, "recv: {recv_e:?}");
                assert_eq!(send_e.kind(), ErrorKind::TimedOut, "send: {send_e:?}");
            })
        }
    });
    join(client, Duration::from_secs(30), "client");
}

/// (g) A pooled connection whose peer vanished while it sat idle in the pool is not
/// handed out again: once keepalive has failed it, `get` (after the link is back)
/// gives a new connection that works.
fn the_pool_replaces_a_connection_keepalive_failed(rt: Rt) {
    let Some(net) = Netns::new("g") else { return };
    let (ready_tx, ready_rx) = mpsc::channel();
    // The peer: one connection after another, each answering ping with pong.
    let _peer = in_netns(&net.peer, move || {
        block_on(rt, |r| async move {
            let cfg = keepalive_config(&r);
            let addr: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
            let l = TcpListener::bind_with(addr, &cfg).await.unwrap();
            ready_tx.send(()).unwrap();
            for _ in 0..2 {
                let s = l.accept().await.unwrap();
                while let Ok(m) = s.recv().await {
                    if &m[..] == b"ping" && s.send(Bytes::from_static(b"pong")).await.is_err() {
                        break;
                    }
                }
            }
        })
    });
    join(ready_rx, Duration::from_secs(10), "peer listening");
    let client = in_netns(&net.client, {
        let net_ns = net.peer.clone();
        move || {
            block_on(rt, |r| async move {
                let addr: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
                let pool = ConnectionPool::new(
                    TcpConnector::with_config(addr, keepalive_config(&r)),
                    PoolConfig::default().max_size(1).runtime(r.clone()),
                )
                .unwrap();
                let ping = async |c: &PooledConnection<TcpConnector>| {
                    c.send(Bytes::from_static(b"ping")).await?;
                    c.recv().await
                };
                let c = bounded(&r, Duration::from_secs(10), "first get", pool.get())
                    .await
                    .unwrap();
                let pong = bounded(&r, PROMPT, "first ping", ping(&c)).await.unwrap();
                assert_eq!(&pong[..], b"pong");
                drop(c);
                cut(&net_ns);
                // Idle in the pool while keepalive notices (and the peer's side too).
                r.sleep(DETECTION + MARGIN).await;
                ip(&["-n", &net_ns, "link", "set", "nrs1", "up"]);
                let c = bounded(&r, Duration::from_secs(10), "get after", pool.get())
                    .await
                    .expect("a new connection once the link is back");
                let pong = bounded(&r, Duration::from_secs(5), "ping after", ping(&c))
                    .await
                    .expect("the connection handed out works (not the dead one)");
                assert_eq!(&pong[..], b"pong");
            })
        }
    });
    join(client, Duration::from_secs(40), "client");
}

/// (b) The link goes down while the client streams to a reading peer: the send side
/// fails with `TimedOut` (`TCP_USER_TIMEOUT`, data unacknowledged) within the bound,
/// and everything after that, `close` included, returns at once.
fn link_down_during_traffic_fails_send_within_the_user_timeout(rt: Rt) {
    let Some(net) = Netns::new("b") else { return };
    let (peer, _stop) = start_peer(&net, rt, keepalive_config);
    let client = in_netns(&net.client, {
        let net_ns = net.peer.clone();
        move || {
            block_on(rt, |r| async move {
                let c = connect(&r, &keepalive_config(&r)).await;
                let msg = Bytes::from(vec![7u8; 64 << 10]);
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(300) {
                    bounded(
                        &r,
                        Duration::from_secs(5),
                        "send, link up",
                        c.send(msg.clone()),
                    )
                    .await
                    .unwrap();
                }
                cut(&net_ns);
                let cut = Instant::now();
                // The kernel counts the user timeout from the first retransmission of
                // the oldest unacknowledged segment, one retransmission timeout (RTO,
                // at least 200 ms; about 1 s measured here) after the link went down.
                let bound = DETECTION + RTO_SLACK + MARGIN;
                let mut sent = 0u64;
                let e = loop {
                    let left = bound.saturating_sub(cut.elapsed());
                    match timeout(&*r, left, c.send(msg.clone())).await {
                        Ok(Ok(())) => sent += 1,
                        Ok(Err(e)) => break e,
                        Err(_) => panic!(
                            "send did not fail within {bound:?} of the link going down \
                             ({sent} more messages accepted)"
                        ),
                    }
                };
                let took = cut.elapsed();
                eprintln!(
                    "{rt:?}: link down while streaming -> send failed after {took:?} \
                     ({sent} more messages accepted): {e:?}"
                );
                assert_eq!(e.kind(), ErrorKind::TimedOut, "{e:?}");
                let before = Instant::now();
                assert_failed_promptly(&r, &c, ErrorKind::TimedOut).await;
                assert!(before.elapsed() < LINGER);
                // A `recv` now reports the same failure, not an orderly end.
                let e = bounded(&r, PROMPT, "recv after failure", c.recv())
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::TimedOut, "recv after failure: {e:?}");
                cut
            })
        }
    });
    let cut = join(client, Duration::from_secs(30), "client");
    let (e, at) = join(peer, Duration::from_secs(10), "peer").expect("peer ended");
    eprintln!(
        "{rt:?}: the reading peer's recv failed after {:?}: {e:?}",
        at.duration_since(cut)
    );
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e:?}");
}

/// (d) Keepalive off: the same idle link-down leaves `recv` pending well past the bound
/// of (a). With (a), this shows the setting is what makes the difference.
fn without_keepalive_an_idle_link_down_goes_unnoticed(rt: Rt) {
    fn no_keepalive(r: &Arc<dyn Runtime>) -> TcpConfig {
        keepalive_config(r).no_keepalive()
    }
    let Some(net) = Netns::new("d") else { return };
    let (peer, stop) = start_peer(&net, rt, no_keepalive);
    let client = in_netns(&net.client, {
        let net_ns = net.peer.clone();
        move || {
            block_on(rt, |r| async move {
                let cfg = no_keepalive(&r);
                assert_eq!(cfg.get_keepalive(), None);
                assert_eq!(cfg.get_user_timeout(), None);
                let c = connect(&r, &cfg).await;
                let recv = c.recv();
                cut(&net_ns);
                let wait = DETECTION + MARGIN + Duration::from_secs(1);
                match timeout(&*r, wait, recv).await {
                    Err(e) => assert!(e.is_timeout(), "{e:?}"),
                    Ok(r) => panic!("without keepalive, recv ended within {wait:?}: {r:?}"),
                }
                assert!(
                    !c.is_closed(),
                    "without keepalive the connection looks open"
                );
            })
        }
    });
    join(client, Duration::from_secs(30), "client");
    let _ = stop.send(());
    assert!(
        join(peer, Duration::from_secs(10), "peer").is_none(),
        "the peer's connection ended on its own"
    );
}

// ---------------------------------------------------------------------------------
// (c) A stopped peer process
// ---------------------------------------------------------------------------------

/// A Python TCP server in the peer namespace that accepts one connection and reads
/// everything; killed (and reaped) when dropped.
struct PythonPeer(Child);

impl PythonPeer {
    fn start(ns: &str) -> PythonPeer {
        let script = format!(
            "import socket,sys\n\
             l=socket.socket()\n\
             l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             l.bind(('{PEER_IP}',{PORT}))\n\
             l.listen(1)\n\
             print('ready',flush=True)\n\
             s,_=l.accept()\n\
             while s.recv(65536):\n    pass\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3 in the peer namespace");
        let stdout = child.stdout.take().unwrap();
        let peer = PythonPeer(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = join(rx, Duration::from_secs(10), "python peer start");
        assert_eq!(line.trim(), "ready", "python peer did not start");
        peer
    }

    fn stop(&self) {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.0),
            rustix::process::Signal::STOP,
        )
        .expect("SIGSTOP the python peer");
    }
}

impl Drop for PythonPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (c) The peer process is stopped (SIGSTOP) on a live host. Its kernel still answers
/// keepalive probes, so an idle `recv` does not fail: keepalive detects a vanished
/// host or network, not a hung program. What is bounded is sending to it: once its
/// receive buffer and ours are full, `send` waits (backpressure), and
/// `TCP_USER_TIMEOUT` fails the connection after its window stayed closed that long;
/// `close` then returns at once.
fn a_stopped_peer_keeps_an_idle_connection_but_not_a_blocked_send(rt: Rt) {
    let Some(net) = Netns::new("c") else { return };
    let peer = PythonPeer::start(&net.peer);
    let (stopped_tx, stopped_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let client = in_netns(&net.client, move || {
        block_on(rt, |r| async move {
            let cfg = keepalive_config(&r);
            let addr: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
            let c = bounded(&r, Duration::from_secs(10), "connect", async {
                TcpTransport::connect_with(addr, &cfg).await
            })
            .await
            .unwrap();
            bounded(
                &r,
                Duration::from_secs(5),
                "send",
                c.send(Bytes::from_static(b"hi")),
            )
            .await
            .unwrap();
            bounded(&r, Duration::from_secs(5), "flush", c.flush())
                .await
                .unwrap();
            stopped_tx.send(()).unwrap();
            go_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            // Idle, peer stopped: keepalive probes are answered by its kernel.
            let wait = DETECTION + MARGIN + Duration::from_secs(1);
            match timeout(&*r, wait, c.recv()).await {
                Err(e) => assert!(e.is_timeout(), "{e:?}"),
                Ok(r) => panic!("recv from a stopped but live peer ended: {r:?}"),
            }
            assert!(!c.is_closed());
            // Now stream to it until the connection fails.
            let msg = Bytes::from(vec![1u8; 64 << 10]);
            let start = Instant::now();
            let limit = Duration::from_secs(20);
            let (mut sent, mut last_accept) = (0u64, start);
            let e = loop {
                let left = limit.saturating_sub(start.elapsed());
                match timeout(&*r, left, c.send(msg.clone())).await {
                    Ok(Ok(())) => {
                        sent += 1;
                        last_accept = Instant::now();
                    }
                    Ok(Err(e)) => break e,
                    Err(_) => panic!("send to a stopped peer did not fail within {limit:?}"),
                }
            };
            let blocked = last_accept.elapsed();
            eprintln!(
                "{rt:?}: stopped peer: {sent} messages of 64 KiB accepted in {:?}, then \
                 send blocked for {blocked:?} and failed after {:?} in all: {e:?}",
                last_accept.duration_since(start),
                start.elapsed()
            );
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e:?}");
            assert!(
                blocked <= DETECTION + MARGIN,
                "send blocked {blocked:?} before failing"
            );
            assert_failed_promptly(&r, &c, ErrorKind::TimedOut).await;
        })
    });
    join(stopped_rx, Duration::from_secs(30), "client connected");
    peer.stop();
    go_tx.send(()).unwrap();
    join(client, Duration::from_secs(60), "client");
    drop(peer);
}

macro_rules! cases {
    ($rt:expr) => {
        #[test]
        fn idle_link_down_fails_recv_within_the_keepalive_bound() {
            super::idle_link_down_fails_recv_within_the_keepalive_bound($rt)
        }
        #[test]
        fn link_down_during_traffic_fails_send_within_the_user_timeout() {
            super::link_down_during_traffic_fails_send_within_the_user_timeout($rt)
        }
        #[test]
        fn a_stopped_peer_keeps_an_idle_connection_but_not_a_blocked_send() {
            super::a_stopped_peer_keeps_an_idle_connection_but_not_a_blocked_send($rt)
        }
        #[test]
        fn is_closed_then_recv_reports_the_timeout_not_an_orderly_end() {
            super::is_closed_then_recv_reports_the_timeout_not_an_orderly_end($rt)
        }
        #[test]
        fn link_down_mid_message_both_ways_is_a_timeout_for_send_and_recv() {
            super::link_down_mid_message_both_ways_is_a_timeout_for_send_and_recv($rt)
        }
        #[test]
        fn the_pool_replaces_a_connection_keepalive_failed() {
            super::the_pool_replaces_a_connection_keepalive_failed($rt)
        }
        #[test]
        fn without_keepalive_an_idle_link_down_goes_unnoticed() {
            super::without_keepalive_an_idle_link_down_goes_unnoticed($rt)
        }
    };
}

#[cfg(feature = "tokio")]
mod tokio_current_thread {
    cases!(super::Rt::Tokio);
}

#[cfg(feature = "async-std")]
mod async_io {
    cases!(super::Rt::AsyncIo);
}
