//! The two-host check of the RDMA transport that `.ci/rdma-pair.sh` runs in two
//! Soft-RoCE VMs joined by a virtual wire: what a user deploying net-rs on two hosts
//! meets when the network, not the peer, fails.
//!
//! ```text
//! rdma_pair_check serve ADDR          # on host 1: echo every message back
//! rdma_pair_check check ADDR CASE...  # on host 2, CASE in echo, killed, linkdown
//! ```
//! * `echo`: messages of 0 B to the maximum message size (8 MiB) come back intact
//!   (the hosts may have different MTUs).
//! * `killed`: the server process exits with a `recv` of ours pending: the `recv` fails
//!   within 5 s and `is_closed()` turns true.
//! * `linkdown`: during a stream of 64 KiB ping-pongs the server's link goes down for
//!   good: the pending operation fails with `TimedOut` within the queue pair's retry
//!   bound (`RdmaConfig::ack_timeout × (retry_count + 1)`, 7.5 s) plus 3 s; then
//!   `is_closed()` is true, a later `send` or `flush` fails at once and `close`
//!   returns within `linger`.
//!
//! Every wait is bounded: a hang is reported as a failure (exit code 1). The server
//! obeys two commands sent as messages (`CMD:exit` ends the process at once, as a kill
//! would; `CMD:down:MS` takes its `eth0` down MS milliseconds later while it goes on
//! echoing, and the process ends by itself 40 s later, having logged what its side
//! of the connection saw).

use std::net::SocketAddr;
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
    eprintln!("usage: rdma_pair_check serve ADDR | check ADDR (echo|killed|linkdown)...");
    std::process::exit(2)
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

/// When this server took its link down, if it did.
static LINK_DOWN: OnceLock<Instant> = OnceLock::new();

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
                        let since = LINK_DOWN.get().map(|d| d.elapsed().as_secs_f64());
                        println!(
                            "pair server: connection ended after {n} messages \
                             ({since:?} s after the link went down): {e}"
                        );
                        break;
                    }
                };
                n += 1;
                if &msg[..] == b"CMD:exit" {
                    println!("pair server: exiting as told");
                    std::process::exit(0);
                }
                if let Some(ms) = msg.strip_prefix(b"CMD:down:") {
                    let ms = std::str::from_utf8(ms).ok().and_then(|s| s.parse().ok());
                    let delay = Duration::from_millis(ms.unwrap_or(0));
                    std::thread::spawn(move || link_down_later(delay));
                }
                if t.send(msg).await.is_err() {
                    continue;
                }
            }
        });
    }
}

/// Take `eth0` down after `delay`, for good; end the process 40 s later (what the
/// server's connection saw by then is in its log).
fn link_down_later(delay: Duration) {
    std::thread::sleep(delay);
    let st = std::process::Command::new("ip")
        .args(["link", "set", "eth0", "down"])
        .status();
    let _ = LINK_DOWN.set(Instant::now());
    println!("pair server: eth0 down ({st:?})");
    std::thread::sleep(Duration::from_secs(40));
    println!("pair server: ending 40 s after the link went down");
    std::process::exit(0)
}

/// Connect to `addr`, retrying for up to 90 s while the other VM boots.
fn connect(addr: SocketAddr) -> Res<Arc<RdmaTransport>> {
    let start = Instant::now();
    loop {
        let cfg = RdmaConfig::default();
        match futures::executor::block_on(rdma::connect_with(addr, Duration::from_secs(5), cfg)) {
            Ok(t) => return Ok(Arc::new(t)),
            Err(e) if start.elapsed() < Duration::from_secs(90) => {
                let _ = e;
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
    .map_err(|e| format!("round trip: {e}"))
}

fn check(addr: SocketAddr, case: &str) -> Res<()> {
    let t = connect(addr)?;
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
        "linkdown" => {
            for k in 0..20 {
                round_trip(&t, pattern(65536, k), Duration::from_secs(30))?;
            }
            let cmd = Bytes::from_static(b"CMD:down:500");
            round_trip(&t, cmd, Duration::from_secs(30))?;
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
            if !err.contains("TimedOut")
                && !err.contains("timed out")
                && !err.contains("acknowledged")
            {
                return Err(format!("the failure is not a timeout: {err}"));
            }
            if !t.is_closed() {
                return Err("is_closed() is false after the link failed".into());
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
            println!("pair check linkdown: later send/flush {later:?}, close {c:?}");
            Ok(())
        }
        other => Err(format!("unknown case {other}")),
    }
}

fn close(t: &Arc<RdmaTransport>) -> Res<()> {
    let t = t.clone();
    within(Duration::from_secs(15), "close", move || {
        futures::executor::block_on(t.close())
    })?
    .map_err(|e| format!("close: {e}"))
}
