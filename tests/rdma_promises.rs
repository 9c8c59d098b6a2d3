//! What the RDMA transport promises, shown on a real device (feature `rdma`; see
//! `tests/rdma_device.rs` for when these run and when they skip):
//!
//! 1. accepted means delivered: what `send` accepted reaches the peer after the sender
//!    returns from `main`, exits, or drops the connection and lives on (child processes);
//! 2. a new connection's first message does not wait for the device thread's sleep
//!    (`park_timeout` of 5 s, child process), nor does dropping the last connection;
//! 3. backpressure reaches the sender: a receiver that stops reading bounds what `send`
//!    accepts, and its memory (child process);
//! 4. the arm race: ping-pong with random idle gaps on 4 connections at once, no round
//!    trip over 1 s (child process, `park_timeout` of 5 s);
//! 5. a teardown storm: 200 cycles of connect / round trip / close or drop;
//! 6. 64 tasks sharing one connection, two-fragment messages from plain `Bytes`;
//! 7. least privilege: net-rs's registered memory and queue pairs refuse RDMA READ and
//!    WRITE from a peer that knows the buffers' addresses and keys.
//!
//! Every wait is bounded: a regression fails, it does not hang. A child process is this
//! test binary again, running the ignored `child_process` test with `NET_RS_CHILD` set
//! (as `tests/rdma_failures.rs` does); tests that need the device thread's settings
//! (`park_timeout`) use one, since the first connection of a process sets them.
#![cfg(feature = "rdma")]

mod rdma_env;
use rdma_env::{device_ip, within};

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::executor::block_on;
use net_rs::drivers::rdma::transport::{RdmaConfig, RdmaTransport};
use net_rs::drivers::rdma::{cm, RdmaListener};
use net_rs::reactor::PollerConfig;
use net_rs::transport::Transport;
use net_rs::ErrorKind;

// ---- helpers --------------------------------------------------------------------------

/// The runtimes the other RDMA tests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rt {
    BlockOn,
    Tokio,
    Smol,
    AsyncStd,
}

const RUNTIMES: [Rt; 4] = [Rt::BlockOn, Rt::Tokio, Rt::Smol, Rt::AsyncStd];

impl Rt {
    /// Run `f` to completion on this runtime (tokio: a multi-threaded runtime, as
    /// `#[tokio::main]` builds, dropped when `f` is done).
    fn run<T>(self, f: impl Future<Output = T>) -> T {
        match self {
            Rt::BlockOn => block_on(f),
            Rt::Tokio => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(f),
            Rt::Smol => smol::block_on(f),
            Rt::AsyncStd => async_std::task::block_on(f),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Rt::BlockOn => "block_on",
            Rt::Tokio => "tokio",
            Rt::Smol => "smol",
            Rt::AsyncStd => "async-std",
        }
    }

    fn from_name(s: &str) -> Rt {
        *RUNTIMES
            .iter()
            .find(|r| r.name() == s)
            .unwrap_or_else(|| panic!("no runtime {s}"))
    }
}

/// `n` bytes that depend on their position and on `seed` (no short period, so a
/// fragment moved or repeated shows).
fn pattern(n: usize, seed: u64) -> Bytes {
    let mut v = Vec::with_capacity(n + 8);
    let mut w = 0u64;
    while v.len() < n {
        let x = (w ^ seed.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        v.extend_from_slice(&(x ^ (x >> 31)).to_le_bytes());
        w += 1;
    }
    v.truncate(n);
    v.into()
}

/// A small deterministic RNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A device thread that sleeps 5 s at a time: anything that depends on its sleep
/// ending to be noticed shows as a 5 s stall.
fn long_sleeping_poller() -> RdmaConfig {
    RdmaConfig {
        poller: PollerConfig {
            park_timeout: Duration::from_secs(5),
            ..PollerConfig::default()
        },
        ..RdmaConfig::default()
    }
}

/// Connect to `addr` (from a thread of its own) while `listener` accepts: both ends.
fn pair(
    listener: &RdmaListener,
    addr: SocketAddr,
    cfg: RdmaConfig,
) -> (RdmaTransport, RdmaTransport) {
    let client =
        std::thread::spawn(move || block_on(cm::connect_with(addr, Duration::from_secs(30), cfg)));
    let server = block_on(listener.accept(Duration::from_secs(30))).expect("accept");
    let client = client.join().expect("connect thread").expect("connect");
    (client, server)
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS`, `VmHWM`), KiB.
fn proc_status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// A child process: this test binary running `child_process` as `role`. Its output is
/// forwarded to ours; lines with `@@` are reports the parent can wait for.
struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    reports: mpsc::Receiver<String>,
    role: String,
}

impl ChildProc {
    fn spawn(role: &str, addr: SocketAddr, env: &[(&str, String)]) -> ChildProc {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "child_process",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NET_RS_CHILD", role)
        .env("NET_RS_CHILD_ADDR", addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, reports) = mpsc::channel();
        let tag = role.to_string();
        std::thread::spawn(move || {
            for line in out.lines().map_while(|l| l.ok()) {
                eprintln!("[child {tag}] {line}");
                // libtest may print "test child_process ... " on the same line.
                if let Some(i) = line.find("@@") {
                    let _ = tx.send(line[i + 2..].to_string());
                }
            }
        });
        ChildProc {
            stdin: child.stdin.take(),
            child,
            reports,
            role: role.to_string(),
        }
    }

    /// Wait (at most `secs`) for the report that starts with `key`; the rest of it.
    fn expect(&self, key: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(r) if r.starts_with(key) => return r[key.len()..].trim().to_string(),
                Ok(_) => {}
                Err(_) => panic!("child {}: no `{key}` within {secs} s", self.role),
            }
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the child's stdin");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Wait (at most `secs`) for the child to end; whether it succeeded.
    fn wait(mut self, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            if Instant::now() >= deadline {
                panic!("child {}: still running after {secs} s", self.role);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        // A failed test leaves no process behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// Not a test on its own: the child process of the tests that need one, its part chosen
/// by `NET_RS_CHILD`.
#[test]
#[ignore = "the child process of the tests that need one"]
fn child_process() {
    let Ok(role) = std::env::var("NET_RS_CHILD") else {
        return;
    };
    let addr: SocketAddr = env("NET_RS_CHILD_ADDR").parse().unwrap();
    match role.as_str() {
        "seed" => child_seed(addr),
        "first_message" => child_first_message(addr),
        "slow_receiver" => child_slow_receiver(addr),
        "arm_race" => child_arm_race(addr),
        other => panic!("no child role {other}"),
    }
}

// ---- 1. accepted means delivered ------------------------------------------------------

const SEED_SIZES: [usize; 4] = [4, 64 << 10, 1 << 20, 8 << 20];
const SEED_ROUNDS: usize = 3;
const ENDINGS: [&str; 3] = ["return", "exit", "drop"];

/// The sender: connect, send one message, then (`NET_RS_ENDING`) return (the
/// transport is dropped, then the runtime, then the process exits), exit the process
/// with the connection still open, or drop the connection and live on for 3 s.
fn child_seed(addr: SocketAddr) {
    let size: usize = env("NET_RS_SIZE").parse().unwrap();
    let seed: u64 = env("NET_RS_SEED").parse().unwrap();
    let rt = Rt::from_name(&env("NET_RS_RT"));
    let msg = pattern(size, seed);
    match env("NET_RS_ENDING").as_str() {
        "return" => rt.run(async move {
            let t = cm::connect(addr, Duration::from_secs(30)).await.unwrap();
            t.send(msg).await.unwrap();
        }),
        "exit" => rt.run(async move {
            let t = cm::connect(addr, Duration::from_secs(30)).await.unwrap();
            t.send(msg).await.unwrap();
            println!("@@sent");
            // With `t` alive: only the exit hook can wait for the delivery now.
            std::process::exit(0);
        }),
        "drop" => {
            rt.run(async move {
                let t = cm::connect(addr, Duration::from_secs(30)).await.unwrap();
                t.send(msg).await.unwrap();
                drop(t);
            });
            println!("@@dropped");
            std::thread::sleep(Duration::from_secs(3));
        }
        other => panic!("no ending {other}"),
    }
}

/// The seed pattern (connect, `send`, return from `main`), exiting with the connection
/// open, and `send` + `drop` in a process that lives on: the peer receives every
/// message intact, up to the maximum size, every time. With a drop, the message arrives
/// while the sender still lives (the device thread delivers it, not the exit).
#[test]
fn accepted_means_delivered_when_the_sender_is_gone() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18621);
    let listener = cm::listen(addr).unwrap();
    let mut living = Vec::new();
    for (si, &size) in SEED_SIZES.iter().enumerate() {
        for round in 0..SEED_ROUNDS {
            for (ei, &ending) in ENDINGS.iter().enumerate() {
                let rt = RUNTIMES[(si + round + ei) % RUNTIMES.len()];
                let seed = ((si as u64) << 32) | ((round as u64) << 8) | ei as u64;
                let what = format!("{size} B, round {round}, {ending} under {}", rt.name());
                let mut child = ChildProc::spawn(
                    "seed",
                    addr,
                    &[
                        ("NET_RS_SIZE", size.to_string()),
                        ("NET_RS_SEED", seed.to_string()),
                        ("NET_RS_ENDING", ending.to_string()),
                        ("NET_RS_RT", rt.name().to_string()),
                    ],
                );
                let t = block_on(listener.accept(Duration::from_secs(60)))
                    .unwrap_or_else(|e| panic!("{what}: accept: {e}"));
                let t = Arc::new(t);
                let t2 = t.clone();
                let t0 = Instant::now();
                let got = within(120, &what, move || block_on(t2.recv()))
                    .unwrap_or_else(|e| panic!("{what}: the message was lost: {e}"));
                assert_eq!(got.len(), size, "{what}");
                assert!(got == pattern(size, seed), "{what}: the payload changed");
                if ending == "drop" {
                    assert!(
                        child.running(),
                        "{what}: the message arrived only once the sender had exited"
                    );
                }
                let t2 = t.clone();
                let end = within(60, &what, move || block_on(t2.recv()))
                    .expect_err("one message, then the end");
                if ending == "exit" {
                    // No end-of-stream marker: the process ended with the connection open.
                    assert!(
                        matches!(
                            end.kind(),
                            ErrorKind::Closed
                                | ErrorKind::ConnectionReset
                                | ErrorKind::WorkCompletion { .. }
                        ),
                        "{what}: {end}"
                    );
                } else {
                    assert_eq!(end.kind(), ErrorKind::Closed, "{what}: {end}");
                }
                eprintln!("{what}: delivered in {:?}", t0.elapsed());
                drop(t);
                if ending == "drop" {
                    living.push((what, child));
                } else {
                    assert!(child.wait(60), "{what}: the sender failed");
                }
            }
        }
    }
    for (what, child) in living {
        assert!(child.wait(60), "{what}: the sender failed");
    }
}

// ---- 2. a new connection does not wait for the device thread's sleep ------------------

/// Fresh connections join a device thread that sleeps 5 s at a time: each first round
/// trip takes well under a second. Then the last connections go: that waits for
/// nothing either.
fn child_first_message(addr: SocketAddr) {
    let cfg = long_sleeping_poller();
    let listener = cm::listen(addr).unwrap().with_config(cfg.clone());
    // Keeps the device's thread running (and asleep) between the connections under test.
    let keep = pair(&listener, addr, cfg.clone());
    let mut slow = Vec::new();
    for i in 0..8usize {
        // Long enough for the device thread to go to sleep.
        std::thread::sleep(Duration::from_millis(300));
        let rt = RUNTIMES[i % RUNTIMES.len()];
        let t0 = Instant::now();
        let (c, s) = pair(&listener, addr, cfg.clone());
        let setup = t0.elapsed();
        let echo = std::thread::spawn(move || {
            block_on(async {
                let m = s.recv().await.unwrap();
                s.send(m).await.unwrap();
                let end = s.recv().await.unwrap_err();
                assert_eq!(end.kind(), ErrorKind::Closed, "{end}");
                s.close().await.unwrap();
            })
        });
        let ping = pattern(100, i as u64);
        let t1 = Instant::now();
        let back = rt.run(async {
            c.send(ping.clone()).await.unwrap();
            c.recv().await.unwrap()
        });
        let first = t1.elapsed();
        assert!(back == ping);
        println!(
            "@@trip {i} under {}: setup {setup:?}, first round trip {first:?}",
            rt.name()
        );
        if first >= Duration::from_secs(1) {
            slow.push((i, first));
        }
        rt.run(c.close()).unwrap();
        echo.join().unwrap();
    }
    assert!(
        slow.is_empty(),
        "first round trips of a second or more (connection, time): {slow:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    drop(keep);
    let left = t0.elapsed();
    println!("@@left: dropping the last connections took {left:?}");
    assert!(
        left < Duration::from_secs(1),
        "dropping the last connections of the device took {left:?}"
    );
}

#[test]
fn a_new_connection_does_not_wait_for_the_device_threads_sleep() {
    let Some(ip) = device_ip() else { return };
    let child = ChildProc::spawn("first_message", SocketAddr::new(ip, 18622), &[]);
    assert!(child.wait(180), "the child failed (its output is above)");
}

// ---- 3. backpressure reaches the sender -----------------------------------------------

const BP_MESSAGES: usize = 400;
const BP_SIZE: usize = 64 << 10;
const BP_RECV_BUFFER: usize = 256 << 10;
const BP_SEND_BUFFER: usize = 1 << 20;

fn bp_message(i: usize) -> Bytes {
    pattern(BP_SIZE, 0xB00 + i as u64)
}

/// The receiver: accepts (with a small `recv_buffer`), then does not read until the
/// parent says `go`; reports the most unread bytes and its memory while stalled, then
/// reads everything, checking order and content.
fn child_slow_receiver(addr: SocketAddr) {
    let rt = Rt::from_name(&env("NET_RS_RT"));
    let cfg = RdmaConfig {
        recv_buffer: BP_RECV_BUFFER,
        ..RdmaConfig::default()
    };
    let listener = cm::listen(addr).unwrap().with_config(cfg.clone());
    println!("@@ready");
    let t = Arc::new(block_on(listener.accept(Duration::from_secs(60))).unwrap());
    let rss_start = proc_status_kib("VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (t, stop, most) = (t.clone(), stop.clone(), most.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                most.fetch_max(t.unread_bytes(), Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "go");
    stop.store(true, Ordering::Release);
    sampler.join().unwrap();
    let rss_peak = proc_status_kib("VmHWM");
    let unread = most.load(Ordering::Acquire);
    println!("@@stalled unread_max={unread} rss_start={rss_start} KiB rss_peak={rss_peak} KiB");
    // Unread data: the budget, plus one window of credits, plus one message being
    // reassembled.
    let bound = cfg.recv_buffer + cfg.depth as usize * cfg.chunk + BP_SIZE;
    assert!(
        unread <= bound,
        "{unread} unread bytes, over the bound {bound}"
    );
    assert!(
        unread >= cfg.recv_buffer,
        "the sender never filled the receive budget ({unread} unread)"
    );
    let grew = rss_peak.saturating_sub(rss_start);
    assert!(
        grew < 16 << 10,
        "the stalled receiver grew by {grew} KiB ({rss_start} -> {rss_peak} KiB)"
    );
    rt.run(async {
        for i in 0..BP_MESSAGES {
            let m = t
                .recv()
                .await
                .unwrap_or_else(|e| panic!("message {i}: {e}"));
            assert!(m == bp_message(i), "message {i} changed or out of order");
        }
        let end = t.recv().await.unwrap_err();
        assert_eq!(end.kind(), ErrorKind::Closed, "{end}");
    });
    println!("@@read all");
}

fn backpressure(sender_rt: Rt, receiver_rt: Rt, port: u16) {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, port);
    let mut child = ChildProc::spawn(
        "slow_receiver",
        addr,
        &[("NET_RS_RT", receiver_rt.name().to_string())],
    );
    child.expect("ready", 60);
    let cfg = RdmaConfig {
        send_buffer: BP_SEND_BUFFER,
        ..RdmaConfig::default()
    };
    let t = Arc::new(block_on(cm::connect_with(addr, Duration::from_secs(30), cfg)).unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (t, accepted) = (t.clone(), accepted.clone());
        std::thread::spawn(move || {
            sender_rt.run(async {
                for i in 0..BP_MESSAGES {
                    t.send(bp_message(i)).await?;
                    accepted.fetch_add(BP_SIZE, Ordering::AcqRel);
                }
                t.close().await
            })
        })
    };
    // The receiver reads nothing for 5 s.
    let start = Instant::now();
    let (mut queued_max, mut at_3s) = (0, None);
    while start.elapsed() < Duration::from_secs(5) {
        queued_max = queued_max.max(t.queued_bytes());
        if at_3s.is_none() && start.elapsed() >= Duration::from_secs(3) {
            at_3s = Some(accepted.load(Ordering::Acquire));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let at_5s = accepted.load(Ordering::Acquire);
    eprintln!(
        "accepted by send: {:?} B after 3 s, {at_5s} B after 5 s; most queued {queued_max} B",
        at_3s
    );
    assert!(
        queued_max <= BP_SEND_BUFFER,
        "{queued_max} B queued, over send_buffer"
    );
    assert_eq!(
        at_3s,
        Some(at_5s),
        "send kept accepting while the receiver did not read"
    );
    // What the receiver holds unread, plus the sender's queue, plus a message each.
    let bound = BP_RECV_BUFFER + 512 * 4096 + BP_SEND_BUFFER + 2 * BP_SIZE;
    assert!(
        at_5s <= bound,
        "send accepted {at_5s} B while the receiver did not read (bound {bound} B)"
    );
    assert!(at_5s < BP_MESSAGES * BP_SIZE, "everything was accepted");
    child.say("go");
    within(180, "the sender once the receiver reads again", move || {
        sender.join().unwrap()
    })
    .unwrap();
    child.expect("read all", 120);
    assert!(child.wait(60), "the receiver failed (its output is above)");
}

/// A receiver that stops reading for 5 s: `send` stops accepting once its unread data
/// passes `recv_buffer` plus a window (the sender's queue bounded by `send_buffer`),
/// the receiver's memory stays bounded, and everything arrives, in order, intact, once
/// it reads again.
#[test]
fn backpressure_reaches_the_sender_under_tokio() {
    backpressure(Rt::Tokio, Rt::AsyncStd, 18623);
}

#[test]
fn backpressure_reaches_the_sender_under_block_on() {
    backpressure(Rt::BlockOn, Rt::Smol, 18624);
}

// ---- 4. the arm race ------------------------------------------------------------------

const ARM_CONNECTIONS: usize = 4;
const ARM_TRIPS: usize = 300;
const SOLO_TRIPS: usize = 150;

/// A round trip slower than a second: (trip, idle gap before it, time).
type Slow = (usize, Duration, Duration);

/// `trips` round trips on `client` with random idle gaps (half under 1 ms, around the
/// device thread's spin and yield windows, half up to 30 ms, past them) and messages
/// of 1 to 3 fragments. Returns the worst round trip and those of a second or more.
async fn gappy_ping_pong(client: &RdmaTransport, seed: u64, trips: usize) -> (Duration, Vec<Slow>) {
    let mut rng = Rng(0x5EED_0000 + seed);
    let (mut worst, mut slow) = (Duration::ZERO, Vec::new());
    for i in 0..trips {
        let gap = if rng.below(2) == 0 {
            Duration::from_micros(rng.below(1000))
        } else {
            Duration::from_micros(rng.below(30_000))
        };
        std::thread::sleep(gap);
        let size = [8, 3000, 9000][rng.below(3) as usize];
        let msg = pattern(size, seed << 32 | i as u64);
        let t0 = Instant::now();
        client.send(msg.clone()).await.unwrap();
        let back = client.recv().await.unwrap();
        let rtt = t0.elapsed();
        assert!(back == msg, "connection {seed} trip {i}: payload changed");
        worst = worst.max(rtt);
        if rtt >= Duration::from_secs(1) {
            slow.push((i, gap, rtt));
        }
    }
    (worst, slow)
}

/// Echo every message until the end of the stream; how many.
fn echo(server: RdmaTransport) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        block_on(async {
            let mut n = 0;
            while let Ok(m) = server.recv().await {
                server.send(m).await.unwrap();
                n += 1;
            }
            n
        })
    })
}

/// The clients (the echo servers are in the parent, another process, so nothing but
/// its own completions wakes this process's device thread for a connection): four
/// connections ping-pong at once with random idle gaps, two in latency mode
/// (`busy_poll`), then one of each kind alone. The device thread sleeps 5 s at a time,
/// so a completion that arrives on a CQ nobody armed (between "poll found nothing" and
/// "arm", or after a busy-polling task gave up) shows as a round trip of seconds.
fn child_arm_race(addr: SocketAddr) {
    let base = long_sleeping_poller();
    // A busy-poll window longer than the device thread's spin and yield windows: it
    // goes to sleep (skipping the CQ a task polls) while the task still polls, so the
    // task must arm the CQ when it gives up.
    let latency = |on: bool| RdmaConfig {
        busy_poll: on.then_some(Duration::from_millis(2)),
        ..base.clone()
    };
    let connect =
        |on: bool| block_on(cm::connect_with(addr, Duration::from_secs(30), latency(on))).unwrap();
    let ends: Vec<_> = (0..ARM_CONNECTIONS).map(|c| connect(c >= 2)).collect();
    let mut clients = Vec::new();
    for (c, client) in ends.into_iter().enumerate() {
        let rt = RUNTIMES[c % RUNTIMES.len()];
        clients.push(std::thread::spawn(move || {
            rt.run(async {
                let (worst, slow) = gappy_ping_pong(&client, c as u64, ARM_TRIPS).await;
                client.close().await.unwrap();
                println!(
                    "@@connection {c} under {} (latency mode {}): worst round trip {worst:?}",
                    rt.name(),
                    c >= 2
                );
                slow
            })
        }));
    }
    let mut slow = Vec::new();
    for (c, h) in clients.into_iter().enumerate() {
        slow.extend(h.join().unwrap().into_iter().map(|s| (c, s)));
    }
    for (k, (on, rt)) in [(true, Rt::Smol), (false, Rt::Tokio)]
        .into_iter()
        .enumerate()
    {
        let c = ARM_CONNECTIONS + k;
        let client = connect(on);
        let (worst, s) = rt.run(async {
            let r = gappy_ping_pong(&client, c as u64, SOLO_TRIPS).await;
            client.close().await.unwrap();
            r
        });
        println!(
            "@@connection {c} alone under {} (latency mode {on}): worst round trip {worst:?}",
            rt.name()
        );
        slow.extend(s.into_iter().map(|s| (c, s)));
    }
    assert!(
        slow.is_empty(),
        "round trips of a second or more (connection, (trip, idle gap, time)): {slow:?}"
    );
}

#[test]
fn arm_race_no_round_trip_over_a_second() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18626);
    let listener = cm::listen(addr).unwrap();
    let child = ChildProc::spawn("arm_race", addr, &[]);
    let mut servers = Vec::new();
    for _ in 0..ARM_CONNECTIONS + 2 {
        let t = block_on(listener.accept(Duration::from_secs(120))).expect("accept");
        servers.push(echo(t));
    }
    assert!(child.wait(300), "the child failed (its output is above)");
    let echoed = within(60, "the echo servers", move || {
        servers
            .into_iter()
            .map(|s| s.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut want = vec![ARM_TRIPS; ARM_CONNECTIONS];
    want.extend([SOLO_TRIPS; 2]);
    assert_eq!(echoed, want);
}

// ---- 5. the teardown storm ------------------------------------------------------------

const STORM_CYCLES: usize = 200;
const OUTSTANDING: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Teardown {
    /// Round trip, close.
    Plain,
    /// A thousand sends accepted and not delivered yet, then `close`.
    CloseOutstanding,
    /// A thousand sends accepted and not delivered yet, then drop.
    DropOutstanding,
    /// The peer drops its end right after the round trip while a thousand sends come.
    PeerLeaves,
}

fn teardown(cycle: usize) -> Teardown {
    match cycle % 10 {
        3 => Teardown::CloseOutstanding,
        6 => Teardown::DropOutstanding,
        9 => Teardown::PeerLeaves,
        _ => Teardown::Plain,
    }
}

/// 200 cycles of connect / round trip / close or drop, some with a thousand sends
/// outstanding: no crash, no hang, every accepted message delivered, no RNR on the
/// device, and no connection registers more than it did at setup.
#[test]
fn teardown_storm() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18625);
    let listener = cm::listen(addr).unwrap();
    let server = std::thread::spawn(move || {
        for i in 0..STORM_CYCLES {
            let t = block_on(listener.accept(Duration::from_secs(60)))
                .unwrap_or_else(|e| panic!("cycle {i}: accept: {e}"));
            block_on(async {
                let m = t.recv().await.unwrap();
                t.send(m).await.unwrap();
                let mode = teardown(i);
                if mode == Teardown::PeerLeaves {
                    drop(t);
                    return;
                }
                let mut n = 0u32;
                let end = loop {
                    match t.recv().await {
                        Ok(m) => {
                            assert_eq!(m[..], n.to_be_bytes(), "cycle {i}: message {n}");
                            n += 1;
                        }
                        Err(e) => break e,
                    }
                };
                assert_eq!(end.kind(), ErrorKind::Closed, "cycle {i} ({mode:?}): {end}");
                let want = match mode {
                    Teardown::CloseOutstanding | Teardown::DropOutstanding => OUTSTANDING,
                    _ => 0,
                };
                assert_eq!(n, want, "cycle {i} ({mode:?}): messages delivered");
                // Both ways of leaving, on this side too.
                if i % 2 == 0 {
                    t.close().await.unwrap();
                }
            });
        }
    });
    let (rnr_before, rnr_after) = within(900, "the storm", move || {
        let mut rnr = (None, None);
        let mut setups = Vec::new();
        for i in 0..STORM_CYCLES {
            let rt = RUNTIMES[i % RUNTIMES.len()];
            let mode = teardown(i);
            rt.run(async {
                let t0 = Instant::now();
                let t = cm::connect(addr, Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|e| panic!("cycle {i}: connect: {e}"));
                setups.push(t0.elapsed());
                if i == 0 {
                    rnr.0 = Some(t.device_rnr_events().expect("RNR counters in sysfs"));
                }
                assert_eq!(
                    t.registrations(),
                    t.registration_bound(),
                    "cycle {i}: registrations at setup"
                );
                let ping = pattern(100 + i, i as u64);
                t.send(ping.clone()).await.unwrap();
                assert!(t.recv().await.unwrap() == ping, "cycle {i}: round trip");
                match mode {
                    Teardown::Plain => {}
                    Teardown::CloseOutstanding | Teardown::DropOutstanding => {
                        for k in 0..OUTSTANDING {
                            t.send(Bytes::copy_from_slice(&k.to_be_bytes()))
                                .await
                                .unwrap();
                        }
                    }
                    Teardown::PeerLeaves => {
                        for k in 0..OUTSTANDING {
                            if t.send(Bytes::copy_from_slice(&k.to_be_bytes()))
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                }
                assert_eq!(
                    t.registrations(),
                    t.registration_bound(),
                    "cycle {i} ({mode:?}): registrations after the traffic"
                );
                if i == STORM_CYCLES - 1 {
                    rnr.1 = t.device_rnr_events();
                }
                match mode {
                    Teardown::Plain | Teardown::CloseOutstanding => {
                        t.close()
                            .await
                            .unwrap_or_else(|e| panic!("cycle {i} ({mode:?}): close: {e}"));
                    }
                    Teardown::DropOutstanding => drop(t),
                    Teardown::PeerLeaves => {
                        // The peer may be gone before our end of stream gets there.
                        if let Err(e) = t.close().await {
                            assert!(
                                matches!(
                                    e.kind(),
                                    ErrorKind::ConnectionReset
                                        | ErrorKind::Closed
                                        | ErrorKind::WorkCompletion { .. }
                                ),
                                "cycle {i}: close after the peer left: {e}"
                            );
                        }
                    }
                }
            });
        }
        setups.sort();
        eprintln!(
            "connect: median {:?}, slowest {:?}",
            setups[setups.len() / 2],
            setups[setups.len() - 1]
        );
        rnr
    });
    within(120, "the storm's server", move || server.join().unwrap());
    assert_eq!(
        rnr_before, rnr_after,
        "receiver-not-ready events during the storm"
    );
}

// ---- 6. 64 tasks sharing one connection -----------------------------------------------

const TASKS: usize = 64;
/// The sender's receive-buffer size, which makes the fragment size (the smaller of both
/// sides'): messages of `CHUNK + 1 ..= 2 * CHUNK` bytes are two fragments.
const CHUNK: usize = 1024;

fn task_message(task: usize, seq: u32) -> Bytes {
    let len = CHUNK + 1 + (task * 7919 + seq as usize * 131) % CHUNK;
    let body = pattern(len - 5, ((task as u64) << 32) | u64::from(seq));
    let mut v = Vec::with_capacity(len);
    v.push(task as u8);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&body);
    v.into()
}

/// 64 tasks share one connection (spawned on `rt`, or joined on one thread for
/// `block_on`), each sending `per_task` two-fragment messages from plain `Bytes` (not
/// `alloc_buf`): every message arrives once, in per-task order, intact.
fn sixty_four_tasks(rt: Rt, port: u16, per_task: u32) {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, port);
    let listener = cm::listen(addr).unwrap();
    let receiver = std::thread::spawn(move || {
        block_on(async {
            let t = listener.accept(Duration::from_secs(30)).await.unwrap();
            let mut next = vec![0u32; TASKS];
            for n in 0..TASKS * per_task as usize {
                let m = t
                    .recv()
                    .await
                    .unwrap_or_else(|e| panic!("message {n}: {e}"));
                let task = m[0] as usize;
                assert!(task < TASKS, "message {n}: task {task}");
                let seq = u32::from_be_bytes(m[1..5].try_into().unwrap());
                assert_eq!(seq, next[task], "task {task}: out of order");
                assert!(
                    m == task_message(task, seq),
                    "task {task} message {seq}: changed"
                );
                next[task] += 1;
            }
            let end = t.recv().await.unwrap_err();
            assert_eq!(end.kind(), ErrorKind::Closed, "{end}");
            next
        })
    });
    let cfg = RdmaConfig {
        chunk: CHUNK,
        ..RdmaConfig::default()
    };
    let t = Arc::new(block_on(cm::connect_with(addr, Duration::from_secs(30), cfg)).unwrap());
    let t0 = Instant::now();
    let task = move |t: Arc<RdmaTransport>, task: usize| async move {
        for seq in 0..per_task {
            t.send(task_message(task, seq)).await.unwrap();
        }
    };
    let regs = t.registrations();
    let t2 = t.clone();
    within(600, "the 64 senders", move || {
        let t = t2;
        match rt {
            Rt::Tokio => rt.run(async {
                let hs: Vec<_> = (0..TASKS)
                    .map(|k| tokio::spawn(task(t.clone(), k)))
                    .collect();
                for h in hs {
                    h.await.unwrap();
                }
            }),
            Rt::AsyncStd => rt.run(async {
                let hs: Vec<_> = (0..TASKS)
                    .map(|k| async_std::task::spawn(task(t.clone(), k)))
                    .collect();
                futures::future::join_all(hs).await;
            }),
            Rt::Smol => rt.run(async {
                let hs: Vec<_> = (0..TASKS)
                    .map(|k| smol::spawn(task(t.clone(), k)))
                    .collect();
                futures::future::join_all(hs).await;
            }),
            Rt::BlockOn => rt.run(async {
                futures::future::join_all((0..TASKS).map(|k| task(t.clone(), k))).await;
            }),
        }
        block_on(t.close()).unwrap();
    });
    let next = within(300, "the receiver", move || receiver.join().unwrap());
    assert_eq!(next, vec![per_task; TASKS]);
    eprintln!(
        "{} messages from {TASKS} tasks under {} in {:?}",
        TASKS * per_task as usize,
        rt.name(),
        t0.elapsed()
    );
    assert_eq!(t.registrations(), regs, "registrations grew");
    assert!(regs <= t.registration_bound(), "{regs} registrations");
}

#[test]
fn sixty_four_tasks_under_tokio() {
    sixty_four_tasks(Rt::Tokio, 18627, 1000);
}

#[test]
fn sixty_four_tasks_under_async_std() {
    sixty_four_tasks(Rt::AsyncStd, 18628, 200);
}

#[test]
fn sixty_four_tasks_under_smol() {
    sixty_four_tasks(Rt::Smol, 18629, 200);
}

#[test]
fn sixty_four_tasks_under_block_on() {
    sixty_four_tasks(Rt::BlockOn, 18630, 200);
}

// ---- 7. least privilege for registered memory -----------------------------------------

mod one_sided {
    //! RDMA READ and WRITE aimed at memory net-rs registered, from a queue pair of the
    //! test's own.
    use net_rs::drivers::rdma::poller::CqSource;
    use net_rs::reactor::{Completion, CompletionSource};
    use sideway::ibverbs::queue_pair::{
        BasicQueuePair, PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
    };
    use std::time::{Duration, Instant};

    /// `IBV_WC_REM_INV_REQ_ERR`: the responder refused the operation (its QP allows no
    /// such remote access).
    pub const REM_INV_REQ: u32 = 9;
    /// `IBV_WC_REM_ACCESS_ERR`: the responder refused the key or the memory's access.
    pub const REM_ACCESS: u32 = 10;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Op {
        Read,
        Write,
    }

    pub const ATTACK_WR: u64 = 0xA77AC;

    /// Post `op` of `len` bytes between the local memory at `local` (key `lkey`) and the
    /// remote `addr` under `rkey`.
    ///
    /// # Safety
    /// `local..local+len` must be memory registered under `lkey` that stays alive (and
    /// is not otherwise accessed) until this request's completion has been polled.
    pub unsafe fn post(
        qp: &mut BasicQueuePair,
        op: Op,
        local: u64,
        lkey: u32,
        len: u32,
        addr: u64,
        rkey: u32,
    ) {
        let mut g = qp.start_post_send();
        let wr = g.construct_wr(ATTACK_WR, WorkRequestFlags::Signaled);
        let wr = match op {
            Op::Read => wr.setup_read(rkey, addr),
            Op::Write => wr.setup_write(rkey, addr),
        };
        // SAFETY: the caller's contract.
        unsafe { wr.setup_sge(lkey, local, len) };
        g.post().unwrap();
    }

    /// The completion of the request `wr_id`, polled from `cq` (other completions are
    /// skipped), within `secs`.
    pub fn completion(cq: &mut CqSource, wr_id: u64, secs: u64) -> Completion {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        loop {
            out.clear();
            cq.poll(&mut out, 16).unwrap();
            if let Some(c) = out.iter().find(|c| c.wr_id == wr_id) {
                return *c;
            }
            assert!(
                Instant::now() < deadline,
                "no completion for request {wr_id:#x} within {secs} s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A queue pair connected to itself (loopback RC), allowing remote READ and WRITE:
    /// only the target memory's own registration can refuse them.
    pub fn loopback_qp(
        ctx: &net_rs::drivers::rdma::context::RdmaContext,
    ) -> (CqSource, BasicQueuePair) {
        use sideway::ibverbs::AccessFlags;
        crate::rdma_env::loopback_qp(
            ctx,
            64,
            8,
            AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            1,
        )
    }
}

/// The memory net-rs registers (receive buffers, bounce slots and `alloc_buf` memory all
/// come from `RdmaContext::slab`) refuses READ and WRITE on its own, even through a
/// queue pair that allows remote access, under its remote key and under its local key
/// (keys are small and predictable on rxe). A control region registered with remote
/// access shows the same requests go through when allowed.
#[test]
fn registered_memory_refuses_one_sided_access() {
    use net_rs::drivers::rdma::context::RdmaContext;
    use one_sided::*;
    use sideway::ibverbs::AccessFlags;

    if device_ip().is_none() {
        return;
    }
    let ctx =
        RdmaContext::open(std::env::var("NET_RS_RDMA_DEVICE").ok().as_deref()).expect("a device");
    let slab = ctx.slab(4096, 4096, 1 << 20);
    let mut target = slab.alloc(4096).unwrap().unwrap();
    target.as_mut().fill(0x11);
    let (taddr, tlkey, trkey) = (
        target.as_ref().as_ptr() as u64,
        target.key(),
        target.remote_key(),
    );
    for op in [Op::Write, Op::Read] {
        for (key_name, key) in [("rkey", trkey), ("lkey", tlkey)] {
            let (mut cq, mut qp) = loopback_qp(&ctx);
            let mut local = slab.alloc(4096).unwrap().unwrap();
            local.as_mut().fill(0x55);
            let (laddr, lkey) = (local.as_ref().as_ptr() as u64, local.key());
            // SAFETY: `local` is 4096 registered bytes under `lkey`, kept (and not
            // touched) until the completion below has been polled.
            unsafe { post(&mut qp, op, laddr, lkey, 64, taddr, key) };
            let c = completion(&mut cq, ATTACK_WR, 30);
            eprintln!("{op:?} under the {key_name} {key:#x}: status {}", c.status);
            assert_eq!(
                c.status, REM_ACCESS,
                "{op:?} under the {key_name}: status {} (0 = it went through)",
                c.status
            );
            assert!(
                target.as_ref().iter().all(|&b| b == 0x11),
                "{op:?}: the target changed"
            );
            assert!(
                local.as_ref().iter().all(|&b| b == 0x55),
                "{op:?}: the local buffer changed"
            );
            drop(qp);
            drop(local);
        }
    }
    // The control: the same requests on memory registered for remote access succeed.
    let mut mem = vec![0x22u8; 4096].into_boxed_slice();
    // SAFETY: `mem` is a live heap block that does not move and outlives `mr` (dropped
    // at the end of this test, before `mem`).
    let mr = unsafe {
        ctx.protection_domain().reg_mr(
            mem.as_mut_ptr() as usize,
            mem.len(),
            AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
        )
    }
    .unwrap();
    let (mut cq, mut qp) = loopback_qp(&ctx);
    let mut local = slab.alloc(4096).unwrap().unwrap();
    local.as_mut().fill(0x55);
    let (laddr, lkey) = (local.as_ref().as_ptr() as u64, local.key());
    // SAFETY: as above.
    unsafe {
        post(
            &mut qp,
            Op::Write,
            laddr,
            lkey,
            64,
            mr.get_ptr() as u64,
            mr.rkey(),
        )
    };
    let c = completion(&mut cq, ATTACK_WR, 30);
    assert_eq!(c.status, 0, "the control WRITE failed");
    drop(qp);
    drop(mr);
    assert!(
        mem[..64].iter().all(|&b| b == 0x55),
        "the control WRITE landed"
    );
}

/// A connected peer (a bare queue pair) aims RDMA READ and WRITE at net-rs's receive
/// buffers, with their real addresses and keys (remote, and local as a guess): every
/// one fails with a remote error and changes nothing. net-rs's queue pair grants no
/// remote access at all.
#[test]
fn a_connected_peer_cannot_read_or_write_net_rs_buffers() {
    use net_rs::drivers::rdma::cm::connect_qp;
    use one_sided::*;
    use sideway::ibverbs::queue_pair::{QueuePair, SetScatterGatherEntry};

    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 18631);
    let listener = Arc::new(cm::listen(addr).unwrap());
    let mut statuses = Vec::new();
    for op in [Op::Write, Op::Read] {
        for key_name in ["rkey", "lkey"] {
            let what = format!("{op:?} under the {key_name}");
            let l = listener.clone();
            let server = std::thread::spawn(move || block_on(l.accept(Duration::from_secs(30))));
            let mut slab = None;
            let mut recvs = Vec::new();
            let mut conn = connect_qp(addr, Duration::from_secs(30), |ctx, qp| {
                let s = ctx.slab(4096, 4096, 1 << 20);
                // Receives for net-rs's hello and credit updates.
                let mut g = qp.start_post_recv();
                for i in 0..8u64 {
                    let b = s.alloc(4096).unwrap().unwrap();
                    // SAFETY: 4096 registered bytes under `b.key()`, kept in `recvs`
                    // until the queue pair is gone (`conn` is dropped first below).
                    unsafe {
                        g.construct_wr(i)
                            .setup_sge(b.key(), b.as_ref().as_ptr() as u64, 4096)
                    };
                    recvs.push(b);
                }
                g.post().unwrap();
                slab = Some(s);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
            let slab = slab.unwrap();
            let mut cq = conn.source.take().unwrap();
            let t = server.join().unwrap().unwrap();
            // net-rs's hello arrived: the connection is up.
            let hello = completion(&mut cq, 0, 30);
            assert_eq!(hello.status, 0, "{what}: the hello");
            assert_eq!(
                t.test_hook_qp_access_flags().unwrap(),
                0,
                "{what}: net-rs's queue pair grants remote access"
            );
            let before = t.test_hook_recv_buffers();
            assert!(before.len() >= 500, "{what}: {} buffers", before.len());
            let target = before[before.len() / 2].clone();
            let key = if key_name == "rkey" {
                target.rkey
            } else {
                target.lkey
            };
            let mut local = slab.alloc(4096).unwrap().unwrap();
            local.as_mut().fill(0xAA);
            let (laddr, lkey) = (local.as_ref().as_ptr() as u64, local.key());
            // SAFETY: `local` is 4096 registered bytes under `lkey`, kept (and not
            // touched) until the completion below has been polled.
            unsafe { post(&mut conn.qp, op, laddr, lkey, 256, target.addr, key) };
            let c = completion(&mut cq, ATTACK_WR, 30);
            eprintln!(
                "{what} ({key:#x}) at buffer {} ({:#x}): status {}",
                target.index, target.addr, c.status
            );
            statuses.push((what.clone(), c.status));
            assert!(
                c.status == REM_ACCESS || c.status == REM_INV_REQ,
                "{what}: status {} (0 = it went through)",
                c.status
            );
            assert!(
                local.as_ref().iter().all(|&b| b == 0xAA),
                "{what}: the attacker's buffer changed: net-rs memory was read"
            );
            // Give a refused request's aftermath (the QPs' move to the error state, the
            // flushes) time to happen, then look again: nothing changed.
            std::thread::sleep(Duration::from_millis(200));
            let after = t.test_hook_recv_buffers();
            for b in &before {
                let now = after
                    .iter()
                    .find(|a| a.index == b.index)
                    .unwrap_or_else(|| panic!("{what}: buffer {} is gone", b.index));
                assert!(now.bytes == b.bytes, "{what}: buffer {} changed", b.index);
            }
            drop(t);
            drop(conn);
            drop(recvs);
            drop(local);
        }
    }
    eprintln!("statuses: {statuses:?}");
}
