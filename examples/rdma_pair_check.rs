//! The two-host check of the RDMA transport that `.ci/rdma-pair.sh` runs in two
//! Soft-RoCE VMs joined by a virtual wire: what a user deploying net-rs on two hosts
//! meets when the network, not the peer, fails.
//!
//! ```text
//! rdma_pair_check serve ADDR          # on host 1: echo every message back
//! rdma_pair_check check ADDR CASE...  # host 2: echo killed outage linkdown idle stopped
//! ```
//! * `echo`: messages of 0 B to the maximum message size (8 MiB) come back intact
//!   (the hosts may have different MTUs).
//! * `killed`: the server process exits with a `recv` of ours pending: the `recv` fails
//!   within 5 s and `is_closed()` turns true.
//! * `outage`: during a stream of 64 KiB ping-pongs the server's link is down for 3 s,
//!   then up. Either the stream goes on (the retries and the keepalive outlast the
//!   outage), or both sides learn the connection is gone: Soft-RoCE fails a QP that
//!   has to send while its own link is down (a local QP error, no retransmission), and
//!   then our pending operation must fail within the retry bound plus 3 s, and the
//!   server's side must have ended too. Never one side failed and the other waiting.
//!   The server tells how its side ended over TCP (port + 1), since in these VMs a new
//!   RDMA-CM connection to a host whose QP failed during an outage is not answered.
//! * `stale`: the server's link is down for 8 s while we try to connect twice (each
//!   attempt gives up after 2 s): once the link is back, the server's `accept` goes on
//!   past those stale requests (it used to fail with "rdma_init_qp_attr") and a new
//!   connection works.
//! * `linkdown`: during such a stream the server's link goes down for good: the pending
//!   operation fails with `TimedOut` within the queue pair's retry bound
//!   (`RdmaConfig::ack_timeout × (retry_count + 1)`, 7.5 s) plus 3 s; then
//!   `is_closed()` is true, a later `send` or `flush` fails at once and `close`
//!   returns within `linger`.
//! * `idle`: the server's link goes down for good while our `recv` waits with nothing
//!   in flight: the keepalive fails it with `TimedOut` within
//!   `keepalive_interval × keepalive_misses` (15 s) plus 1 s.
//! * `stopped`: the server process is stopped (SIGSTOP; its host and link stay up, so
//!   the transport still acknowledges our packets) while our `recv` waits: the
//!   keepalive's probes go unanswered and fail it with `TimedOut` within the same
//!   bound.
//! * `stopped-nokeepalive`: the same with keepalive off on our side (so the server
//!   probes, and nobody judges on ours): our `recv` is still waiting 20 s later. With
//!   `stopped`, this shows that the keepalive is what ends the wait.
//!
//! Every wait is bounded: a hang is reported as a failure (exit code 1). The server
//! obeys commands sent as messages: `CMD:exit` ends the process at once, as a kill
//! would; `CMD:down:MS` takes its `eth0` down MS milliseconds later while it goes on
//! echoing, for good: the process then ends once its side of the connection failed
//! (exit code 1 if that took longer than the keepalive bound plus 1 s, or never came
//! within 40 s); `CMD:outage:MS:HOLD` takes `eth0` down after MS milliseconds and up
//! again HOLD milliseconds later, and once that connection ends answers one TCP
//! connection on port + 1 with how it ended, then exits; `CMD:flap:MS:HOLD` takes the
//! link down and up the same way, and goes on serving; `CMD:stop` has the process
//! stopped (SIGSTOP) for 25 s and end once it runs again.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use net_rs::drivers::rdma::config::{QpTiming, RdmaConfig};
use net_rs::drivers::rdma::transport::RdmaTransport;
use net_rs::drivers::rdma::{self};
use net_rs::transport::Transport;

type Res<T> = std::result::Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let r = match args.get(1).map(String::as_str) {
        Some("serve") => serve(addr(2)),
        Some("check") if args.len() > 3 => {
            let a = addr(2);
            args[3..].iter().try_for_each(|case| {
                let t = Instant::now();
                let r = check(a, case);
                let secs = t.elapsed().as_secs_f64();
                match &r {
                    Ok(()) => println!("pair check {case}: ok ({secs:.1} s)"),
                    Err(e) => println!("pair check {case}: FAILED after {secs:.1} s: {e}"),
                }
                r
            })
        }
        _ => usage(),
    };
    if let Err(e) = r {
        eprintln!("rdma_pair_check: {e}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: rdma_pair_check serve ADDR | check ADDR \
         (echo|killed|outage|stale|linkdown|idle|stopped|stopped-nokeepalive)..."
    );
    std::process::exit(2)
}

/// The keepalive's bound on noticing a silent peer, plus 1 s.
fn keepalive_bound() -> Duration {
    let c = RdmaConfig::default();
    c.keepalive_interval * c.keepalive_misses + Duration::from_secs(1)
}

/// Run `f` on a thread of its own; an error if it takes longer than `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Res<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .map_err(|_| format!("{what}: no answer within {limit:?} (hung)"))
}

/// When this server took its link down for good, if it did.
static LINK_DOWN: OnceLock<Instant> = OnceLock::new();

/// Whether the current connection had an outage (`CMD:outage`): its end is reported
/// over TCP, then the process exits.
static OUTAGE: AtomicBool = AtomicBool::new(false);

/// The port, next to the RDMA one, on which the server tells how its connection ended.
fn status_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + 1)
}

/// Answer one TCP connection on `status_addr(addr)` with `report` (within 60 s), then
/// exit.
fn report_and_exit(addr: SocketAddr, report: &str) -> ! {
    let listener = std::net::TcpListener::bind(status_addr(addr));
    let (tx, rx) = std::sync::mpsc::channel();
    let report = report.to_string();
    std::thread::spawn(move || {
        if let Ok(l) = listener {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(report.as_bytes());
            }
        }
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(60));
    println!("pair server: exiting after the outage's connection ended");
    std::process::exit(0)
}

fn ip_link(state: &str) {
    let st = std::process::Command::new("ip")
        .args(["link", "set", "eth0", state])
        .status();
    println!("pair server: eth0 {state} ({st:?})");
}

fn serve(addr: SocketAddr) -> Res<()> {
    let listener = rdma::listen(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    println!("pair server on {addr}");
    loop {
        let t = futures::executor::block_on(listener.accept(Duration::from_secs(600)))
            .map_err(|e| format!("accept: {e}"))?;
        futures::executor::block_on(async {
            let mut n = 0u64;
            loop {
                let msg = match t.recv().await {
                    Ok(m) => m,
                    Err(e) => {
                        println!("pair server: connection ended after {n} messages: {e}");
                        if let Some(down) = LINK_DOWN.get() {
                            let took = down.elapsed();
                            let bound = keepalive_bound();
                            println!(
                                "pair server: its side failed {:.1} s after the link went \
                                 down (bound {:.1} s)",
                                took.as_secs_f64(),
                                bound.as_secs_f64()
                            );
                            std::process::exit(i32::from(took > bound));
                        }
                        if OUTAGE.load(Ordering::Relaxed) {
                            report_and_exit(addr, &format!("ended: {e}"));
                        }
                        break;
                    }
                };
                n += 1;
                if &msg[..] == b"CMD:exit" {
                    println!("pair server: exiting as told");
                    std::process::exit(0);
                }
                let cmd = std::str::from_utf8(&msg).unwrap_or("");
                let ms = |s: Option<&str>| {
                    Duration::from_millis(s.and_then(|s| s.parse().ok()).unwrap_or(0))
                };
                if let Some(rest) = cmd.strip_prefix("CMD:down:") {
                    let delay = ms(Some(rest));
                    std::thread::spawn(move || link_down_later(delay));
                } else if cmd == "CMD:stop" {
                    std::thread::spawn(stop_for_a_while);
                } else if let Some((outage, rest)) = cmd
                    .strip_prefix("CMD:outage:")
                    .map(|r| (true, r))
                    .or_else(|| cmd.strip_prefix("CMD:flap:").map(|r| (false, r)))
                {
                    let mut it = rest.split(':');
                    let (delay, hold) = (ms(it.next()), ms(it.next()));
                    if outage {
                        OUTAGE.store(true, Ordering::Relaxed);
                    }
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        ip_link("down");
                        std::thread::sleep(hold);
                        ip_link("up");
                    });
                }
                if t.send(msg).await.is_err() {
                    continue;
                }
            }
        });
    }
}

/// Take `eth0` down after `delay`, for good; the connection's failure then ends the
/// process (see `serve`), or this thread does after 40 s.
fn link_down_later(delay: Duration) {
    std::thread::sleep(delay);
    ip_link("down");
    let _ = LINK_DOWN.set(Instant::now());
    std::thread::sleep(Duration::from_secs(40));
    println!("pair server: its side of the connection never failed in 40 s");
    std::process::exit(1)
}

/// Have this process stopped (SIGSTOP) half a second from now and continued 25 s
/// later; then end it.
fn stop_for_a_while() {
    let me = std::process::id();
    let script = format!("sleep 0.5; kill -STOP {me}; sleep 25; kill -CONT {me}");
    let st = std::process::Command::new("sh")
        .args(["-c", &script])
        .spawn();
    println!("pair server: stopping for 25 s ({:?})", st.map(|_| ()));
    // Runs on after the stop: the time asleep has passed by then.
    std::thread::sleep(Duration::from_secs(2));
    println!("pair server: running again, ending");
    std::process::exit(0)
}

/// Connect to `addr`, retrying for up to 120 s while the other VM boots (or the
/// server comes back).
fn connect(addr: SocketAddr, cfg: RdmaConfig) -> Res<Arc<RdmaTransport>> {
    let start = Instant::now();
    loop {
        let cfg = cfg.clone();
        match futures::executor::block_on(rdma::connect_with(addr, Duration::from_secs(5), cfg)) {
            Ok(t) => return Ok(Arc::new(t)),
            Err(e) if start.elapsed() < Duration::from_secs(120) => {
                if std::env::var_os("PAIR_VERBOSE").is_some() {
                    println!("pair check: connect: {e}");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(format!("connect to {addr}: {e}")),
        }
    }
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// Send `msg` and wait for its echo, within `limit`.
fn round_trip(t: &Arc<RdmaTransport>, msg: Bytes, limit: Duration) -> Res<Bytes> {
    let t = t.clone();
    within(limit, "round trip", move || {
        futures::executor::block_on(async {
            t.send(msg).await?;
            t.recv().await
        })
    })?
    // Debug: the text starts with the error's kind (`Error(TimedOut): ...`).
    .map_err(|e| format!("round trip: {e:?}"))
}

/// After a failure: `is_closed()`, later `send`/`flush` fail at once, `close` ends
/// within `linger`.
fn failed_for_good(t: &Arc<RdmaTransport>, case: &str) -> Res<()> {
    if !t.is_closed() {
        return Err("is_closed() is false after the failure".into());
    }
    let t2 = t.clone();
    let later = within(
        Duration::from_secs(2),
        "send after the failure",
        move || {
            futures::executor::block_on(async {
                (t2.send(Bytes::from_static(b"late")).await, t2.flush().await)
            })
        },
    )?;
    if later.0.is_ok() && later.1.is_ok() {
        return Err("send and flush after the failure both succeeded".into());
    }
    let linger = RdmaConfig::default().linger + Duration::from_secs(2);
    let t3 = t.clone();
    let c = within(linger, "close after the failure", move || {
        futures::executor::block_on(t3.close())
    })?;
    println!("pair check {case}: later send/flush {later:?}, close {c:?}");
    Ok(())
}

fn is_timeout(e: &str) -> bool {
    e.contains("TimedOut")
}

fn check(addr: SocketAddr, case: &str) -> Res<()> {
    let cfg = match case {
        "stopped-nokeepalive" => RdmaConfig::default().keepalive(Duration::ZERO, 0),
        _ => RdmaConfig::default(),
    };
    let t = connect(addr, cfg)?;
    match case {
        "echo" => {
            let max = RdmaConfig::default().max_message_size;
            let sizes = [
                0,
                1,
                63,
                64,
                1000,
                1024,
                1025,
                4095,
                4096,
                4097,
                9000,
                65536,
                1 << 20,
                max,
            ];
            for (k, &len) in sizes.iter().enumerate() {
                let msg = pattern(len, k as u8);
                let back = round_trip(&t, msg.clone(), Duration::from_secs(60))?;
                if back != msg {
                    return Err(format!("a {len}-byte message came back changed"));
                }
            }
            println!(
                "pair check echo: {} sizes up to {max} B intact",
                sizes.len()
            );
            close(&t)
        }
        "killed" => {
            round_trip(&t, pattern(100, 1), Duration::from_secs(30))?;
            let t2 = t.clone();
            let pending = std::thread::spawn(move || {
                let start = Instant::now();
                let r = futures::executor::block_on(t2.recv());
                (r.map(|m| m.len()), start.elapsed())
            });
            std::thread::sleep(Duration::from_millis(300));
            let t3 = t.clone();
            within(Duration::from_secs(10), "send CMD:exit", move || {
                futures::executor::block_on(t3.send(Bytes::from_static(b"CMD:exit")))
            })?
            .map_err(|e| format!("send CMD:exit: {e}"))?;
            let (r, took) = within(
                Duration::from_secs(5),
                "recv after the peer died",
                move || pending.join().expect("recv thread"),
            )?;
            println!("pair check killed: pending recv gave {r:?} after {took:?}");
            if r.is_ok() {
                return Err("a recv from a dead peer returned a message".into());
            }
            if !t.is_closed() {
                return Err("is_closed() is false after the peer died".into());
            }
            Ok(())
        }
        "stale" => {
            round_trip(
                &t,
                Bytes::from_static(b"CMD:flap:300:8000"),
                Duration::from_secs(30),
            )?;
            close(&t)?;
            std::thread::sleep(Duration::from_millis(600));
            for _ in 0..2 {
                let cfg = RdmaConfig::default();
                match futures::executor::block_on(rdma::connect_with(
                    addr,
                    Duration::from_secs(2),
                    cfg,
                )) {
                    Ok(_) => return Err("connected while the server's link was down".into()),
                    Err(e) => println!("pair check stale: connect during the outage: {e}"),
                }
            }
            // The link comes back: the server accepts again.
            let t2 = connect(addr, RdmaConfig::default())?;
            round_trip(&t2, pattern(100, 4), Duration::from_secs(30))?;
            println!("pair check stale: a new connection works after the outage");
            close(&t2)
        }
        "outage" => {
            round_trip(
                &t,
                Bytes::from_static(b"CMD:outage:500:3000"),
                Duration::from_secs(30),
            )?;
            let start = Instant::now();
            let mut k = 0u8;
            let mut slowest = Duration::ZERO;
            // The outage starts 0.5 s after `start`; a failure must come within the
            // QP's retry bound (or the keepalive's, if nothing was in flight) after it.
            let bound = (QpTiming::default().give_up_after() + Duration::from_secs(3))
                .max(keepalive_bound())
                + Duration::from_millis(500);
            while start.elapsed() < Duration::from_secs(8) {
                let one = Instant::now();
                let msg = pattern(65536, k);
                let back = match round_trip(&t, msg.clone(), bound + Duration::from_secs(30)) {
                    Ok(back) => back,
                    Err(e) => return outage_failed(addr, &t, start.elapsed(), bound, &e),
                };
                if back != msg {
                    return Err("a message came back changed across the outage".into());
                }
                slowest = slowest.max(one.elapsed());
                k = k.wrapping_add(1);
            }
            println!(
                "pair check outage: {k} round trips across a 3 s outage, the slowest {:.1} s",
                slowest.as_secs_f64()
            );
            close(&t)?;
            let end = server_end(addr, Duration::from_secs(10))?;
            println!("pair check outage: the server's side {end}");
            Ok(())
        }
        "linkdown" => {
            for k in 0..20 {
                round_trip(&t, pattern(65536, k), Duration::from_secs(30))?;
            }
            round_trip(
                &t,
                Bytes::from_static(b"CMD:down:500"),
                Duration::from_secs(30),
            )?;
            // Keep the ping-pong going: the send after the link went down is not
            // acknowledged, and fails after the retries.
            let bound = QpTiming::default().give_up_after() + Duration::from_secs(3);
            let start = Instant::now();
            let mut k = 0u8;
            let err = loop {
                let left = (bound + Duration::from_secs(30)).saturating_sub(start.elapsed());
                match round_trip(&t, pattern(65536, k), left) {
                    Ok(_) => k = k.wrapping_add(1),
                    Err(e) => break e,
                }
            };
            let took = start.elapsed();
            println!(
                "pair check linkdown: ping-pong failed after {:.1} s (bound {:.1} s): {err}",
                took.as_secs_f64(),
                bound.as_secs_f64()
            );
            if took > bound {
                return Err(format!(
                    "the failure took {took:?}, over the bound {bound:?}"
                ));
            }
            if !is_timeout(&err) {
                return Err(format!("the failure is not a timeout: {err}"));
            }
            failed_for_good(&t, case)
        }
        "idle" | "stopped" => {
            round_trip(&t, pattern(100, 2), Duration::from_secs(30))?;
            let cmd: &'static [u8] = if case == "idle" {
                b"CMD:down:500"
            } else {
                b"CMD:stop"
            };
            round_trip(&t, Bytes::from_static(cmd), Duration::from_secs(30))?;
            // Nothing in flight: only the keepalive can notice.
            let bound = keepalive_bound() + Duration::from_millis(500);
            let t2 = t.clone();
            let start = Instant::now();
            let r = within(bound + Duration::from_secs(30), "pending recv", move || {
                futures::executor::block_on(t2.recv()).map(|m| m.len())
            })?;
            let took = start.elapsed();
            println!(
                "pair check {case}: pending recv gave {r:?} after {:.1} s (bound {:.1} s)",
                took.as_secs_f64(),
                bound.as_secs_f64()
            );
            match r {
                Ok(n) => return Err(format!("recv returned {n} bytes from a silent peer")),
                Err(e) if e.kind() != net_rs::error::ErrorKind::TimedOut => {
                    return Err(format!("the failure is not a timeout: {e}"))
                }
                Err(_) if took > bound => {
                    return Err(format!(
                        "the failure took {took:?}, over the bound {bound:?}"
                    ))
                }
                Err(_) => {}
            }
            failed_for_good(&t, case)
        }
        "stopped-nokeepalive" => {
            round_trip(&t, pattern(100, 3), Duration::from_secs(30))?;
            round_trip(&t, Bytes::from_static(b"CMD:stop"), Duration::from_secs(30))?;
            let t2 = t.clone();
            let r = within(Duration::from_secs(20), "pending recv", move || {
                futures::executor::block_on(t2.recv()).map(|m| m.len())
            });
            println!("pair check {case}: pending recv after 20 s: {r:?}");
            match r {
                Err(e) if e.contains("hung") => Ok(()),
                other => Err(format!(
                    "without keepalive the recv ended by itself ({other:?}): the test \
                     would not show what the keepalive does"
                )),
            }
        }
        other => Err(format!("unknown case {other}")),
    }
}

/// The connection failed across a short outage, `took` after the stream began: that
/// is allowed if it came within `bound`, for good, and the server's side ended too,
/// within the keepalive's bound of ours.
fn outage_failed(
    addr: SocketAddr,
    t: &Arc<RdmaTransport>,
    took: Duration,
    bound: Duration,
    err: &str,
) -> Res<()> {
    println!(
        "pair check outage: the connection failed {:.1} s into the stream (bound {:.1} s): \
         {err}",
        took.as_secs_f64(),
        bound.as_secs_f64()
    );
    if took > bound {
        return Err(format!(
            "the failure took {took:?}, over the bound {bound:?}"
        ));
    }
    failed_for_good(t, "outage")?;
    let end = server_end(addr, keepalive_bound())?;
    println!("pair check outage: the server's side {end}");
    if end.contains("peer closed") {
        return Err(format!("the server's side did not fail: it {end}"));
    }
    Ok(())
}

/// How the server's side of the outage's connection ended, asked over TCP for up to
/// `limit` (it answers once that side ended: an error means it was still waiting).
fn server_end(addr: SocketAddr, limit: Duration) -> Res<String> {
    let start = Instant::now();
    loop {
        let got = std::net::TcpStream::connect_timeout(&status_addr(addr), Duration::from_secs(2))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
        match got {
            Ok(text) if !text.is_empty() => {
                return Ok(format!(
                    "{text} ({:.1} s after we asked)",
                    start.elapsed().as_secs_f64()
                ))
            }
            _ if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(200)),
            other => {
                return Err(format!(
                    "the server's side had not ended {limit:?} after ours ({other:?}): one \
                     side failed, the other waited"
                ))
            }
        }
    }
}

fn close(t: &Arc<RdmaTransport>) -> Res<()> {
    let t = t.clone();
    within(Duration::from_secs(15), "close", move || {
        futures::executor::block_on(t.close())
    })?
    .map_err(|e| format!("close: {e}"))
}
