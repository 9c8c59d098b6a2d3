//! `--transport rdma`: net-rs over RDMA next to perftest's `ib_send_lat` / `ib_send_bw`
//! on the same device, in the same run.
//!
//! ```text
//! netperf --transport rdma --addr 198.18.0.1:18700 --perftest rxe0:1
//! ```
//!
//! `--addr` is an IP of the RDMA device. The client runs in this process and starts
//! the server as a second process of this program (`--serve`), the way perftest runs
//! its two sides on one device: so each side has its own device poller thread. `--perftest DEV:GID_INDEX` also runs
//! `ib_send_lat` and `ib_send_bw` (server and client processes) for every size with the
//! same message and iteration counts, and prints net-rs / perftest ratios.
//!
//! * Latency: `trips` ping-pongs after 100 warm-up trips; reported as half the round
//!   trip, the way `ib_send_lat` reports (its `t_typical` is the median).
//! * Bandwidth: the client streams `iters` messages (`send` each, then an empty end
//!   marker), the server counts them and answers; the clock runs from the first send to
//!   the answer.
//!   perftest's rate is taken from its `MsgRate[Mpps]` column (x size), so both are in
//!   the same unit: 10^6 bytes per second.
//!
//! Both net-rs sides run on `futures::executor::block_on`: no async runtime at all.
//!
//! # Next to the TCP modes
//!
//! Each compared [`Setting`] plays the part of a TCP `Contender` (`contender.rs`) with
//! the same two measurements, [`Setting::ping_pong`] and [`Setting::stream_to`], but it
//! does not implement that trait, and this mode has its own run and table, because:
//!
//! * the peer is net-rs itself in a second process ([`serve`]), started once for the
//!   whole run (one port per setting), not a server thread per cell nor the common raw
//!   `std` receiver and sender of the TCP streaming tables (there is no plain-socket
//!   RDMA peer); so there is no receive-side table;
//! * a cell runs a fixed number of messages, not a duration: perftest is given the same
//!   counts (`-n`), so the two are comparable;
//! * the baseline is perftest's own processes and output, not another implementation
//!   in this program;
//! * failures (no device, connection refused, perftest missing) are errors to report,
//!   not panics.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::executor::block_on;
use net_rs::drivers::rdma::cm;
use net_rs::drivers::rdma::transport::{RdmaConfig, RdmaTransport};
use net_rs::reactor::PollerConfig;
use net_rs::transport::Transport;

use super::{fmt_size, Args};

const WARMUP: usize = 100;
/// Ping-pong trips measured per latency cell (and `ib_send_lat -n`).
const TRIPS: usize = 1000;
const TIMEOUT: Duration = Duration::from_secs(30);

/// One compared setting: its row name and the configuration of both sides.
struct Setting {
    name: &'static str,
    cfg: RdmaConfig,
}

/// The settings compared: the default, and latency mode (the waiting task polls the CQ
/// itself; the device's poller thread sleeps at once).
fn settings() -> [Setting; 2] {
    let lat = RdmaConfig {
        busy_poll: Some(Duration::from_millis(1)),
        poller: PollerConfig {
            spin: Duration::ZERO,
            yield_window: Duration::ZERO,
            ..PollerConfig::default()
        },
        ..RdmaConfig::default()
    };
    [
        Setting {
            name: "net-rs",
            cfg: RdmaConfig::default(),
        },
        Setting {
            name: "net-rs lat",
            cfg: lat,
        },
    ]
}

fn iters_for(size: usize) -> usize {
    (64_000_000 / size).clamp(500, 20_000)
}

/// Runs the RDMA benchmark described by `args`.
pub fn run(args: &Args) -> Result<(), String> {
    let addr = args
        .addr
        .ok_or("--transport rdma needs --addr <IP of the RDMA device>:<port>")?;
    if args.serve {
        return serve(addr, args);
    }
    println!("machine: {}", super::machine());
    if args.remote {
        println!(
            "netperf: RDMA (RC send/recv) to {addr}, server on another host (`--serve`); \
             both sides on futures::executor::block_on"
        );
        wait_for_server(addr)?;
        return measure(args, addr);
    }
    println!(
        "netperf: RDMA (RC send/recv) to {addr}, server in a second process (as perftest); \
         both sides on futures::executor::block_on"
    );
    let mut server = spawn_server(addr)?;
    let res = measure(args, addr);
    let _ = server.kill();
    let _ = server.wait();
    res
}

/// Wait up to two minutes for a remote server side to accept (the other host may still
/// be starting).
fn wait_for_server(addr: SocketAddr) -> Result<(), String> {
    let start = std::time::Instant::now();
    loop {
        match block_on(connect(addr, RdmaConfig::default(), b"L")) {
            Ok(t) => {
                let _ = block_on(t.close());
                return Ok(());
            }
            Err(e) if start.elapsed() > Duration::from_secs(120) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn measure(args: &Args, addr: SocketAddr) -> Result<(), String> {
    let mut rows: Vec<(usize, &str, f64, f64)> = Vec::new();
    for &size in &args.sizes {
        let msg = payload(size);
        for (i, setting) in settings().into_iter().enumerate() {
            let at = SocketAddr::new(addr.ip(), addr.port() + i as u16);
            let (lat, p99) = one_way_us(setting.ping_pong(at, &msg)?);
            let n = iters_for(size);
            let (got, elapsed) = setting.stream_to(at, &msg, n)?;
            if got != n as u64 {
                return Err(format!("server counted {got} of {n} messages"));
            }
            let bw = (n * size) as f64 / elapsed.as_secs_f64() / 1e6;
            let name = setting.name;
            println!(
                "{:>8} | {:<12} | one-way median {:>8.1} us | p99 {:>8.1} us | {:>9.1} MB/s",
                fmt_size(size),
                name,
                lat,
                p99,
                bw
            );
            rows.push((size, name, lat, bw));
        }
        if let Some(pt) = &args.perftest {
            // The baseline's own failures (perftest missing, its handshake failing) are
            // reported, not fatal: net-rs was measured either way.
            let (lat, bw) = match perftest(pt, addr, size, args.remote) {
                Ok(v) => v,
                Err(e) => {
                    println!("{:>8} | perftest     | not measured: {e}", fmt_size(size));
                    continue;
                }
            };
            println!(
                "{:>8} | {:<12} | one-way median {:>8.1} us |                | {:>9.1} MB/s",
                fmt_size(size),
                "perftest",
                lat,
                bw
            );
            for (s, name, l, b) in rows.iter().filter(|r| r.0 == size) {
                println!(
                    "{:>8} | {:<12} | latency {:.2}x ib_send_lat (target <= 1.5) | bandwidth \
                     {:.2}x ib_send_bw (target >= 0.8)",
                    fmt_size(*s),
                    name,
                    l / lat,
                    b / bw
                );
            }
        }
    }
    Ok(())
}

fn payload(size: usize) -> Bytes {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// The server process (`--serve`): for each compared setting `i`, a thread accepts on
/// port `addr.port() + i` with that setting and serves one connection after another:
/// echo (`L`) or count (`T`). It exits when no connection came for a minute (the
/// client also kills it when done). With `--perftest` (a server for a client on another
/// host), a thread also runs perftest's server side for each of `--sizes` in the
/// client's order (`ib_send_lat`, then `ib_send_bw`).
pub fn serve(addr: SocketAddr, args: &Args) -> Result<(), String> {
    let mut threads = Vec::new();
    if let Some(pt) = args.perftest.clone() {
        let sizes = args.sizes.clone();
        threads.push(std::thread::spawn(move || {
            for size in sizes {
                for (tool, n) in [("ib_send_lat", TRIPS), ("ib_send_bw", iters_for(size))] {
                    if let Err(e) = perftest_server(tool, &perftest_args(&pt, size, n)) {
                        eprintln!("netperf: {tool} server for {size} B: {e}");
                    }
                }
            }
        }));
    }
    for (i, setting) in settings().into_iter().enumerate() {
        let at = SocketAddr::new(addr.ip(), addr.port() + i as u16);
        let listener = cm::listen(at)
            .map_err(|e| format!("listen on {at}: {e}"))?
            .with_config(setting.cfg);
        threads.push(std::thread::spawn(move || {
            block_on(async {
                while let Ok(t) = listener.accept(Duration::from_secs(60)).await {
                    serve_one(t).await;
                }
            })
        }));
    }
    println!("serving");
    for t in threads {
        t.join().map_err(|_| "a server thread panicked")?;
    }
    Ok(())
}

async fn serve_one(t: RdmaTransport) {
    let Ok(mode) = t.recv().await else { return };
    if &mode[..] == b"L" {
        while let Ok(m) = t.recv().await {
            if t.send(m).await.is_err() {
                return;
            }
        }
    } else {
        let mut n = 0u64;
        while let Ok(m) = t.recv().await {
            if m.is_empty() {
                let _ = t.send(Bytes::copy_from_slice(&n.to_be_bytes())).await;
                let _ = t.flush().await;
            } else {
                n += 1;
            }
        }
    }
}

/// Start this program as the server process and wait until it listens.
fn spawn_server(addr: SocketAddr) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["--transport", "rdma", "--serve", &addr.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the server process: {e}"))?;
    let out = child.stdout.take().ok_or("no server stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "serving" {
        let _ = child.kill();
        let _ = child.wait();
        return Err("the server process did not start".into());
    }
    Ok(child)
}

async fn connect(
    addr: SocketAddr,
    cfg: RdmaConfig,
    mode: &'static [u8],
) -> Result<RdmaTransport, String> {
    let t = cm::connect_with(addr, TIMEOUT, cfg)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    t.send(Bytes::from_static(mode))
        .await
        .map_err(|e| e.to_string())?;
    Ok(t)
}

impl Setting {
    /// Ping-pong with the server process at `addr`: `WARMUP` trips, then `TRIPS`
    /// measured ones; their round trips.
    fn ping_pong(&self, addr: SocketAddr, msg: &Bytes) -> Result<Vec<Duration>, String> {
        block_on(async {
            let t = connect(addr, self.cfg.clone(), b"L").await?;
            let mut rtts = Vec::with_capacity(TRIPS);
            for i in 0..WARMUP + TRIPS {
                let start = Instant::now();
                t.send(msg.clone()).await.map_err(|e| e.to_string())?;
                let back = t.recv().await.map_err(|e| e.to_string())?;
                if back.len() != msg.len() {
                    return Err(format!("echo of {} bytes for {}", back.len(), msg.len()));
                }
                if i >= WARMUP {
                    rtts.push(start.elapsed());
                }
            }
            let _ = t.close().await;
            Ok(rtts)
        })
    }

    /// Streams `n` messages to the server process at `addr` (`send` each), then the
    /// empty end marker; the server's count and the time from the first send to the
    /// count's arrival.
    fn stream_to(
        &self,
        addr: SocketAddr,
        msg: &Bytes,
        n: usize,
    ) -> Result<(u64, Duration), String> {
        block_on(async {
            let t = connect(addr, self.cfg.clone(), b"T").await?;
            let start = Instant::now();
            for _ in 0..n {
                t.send(msg.clone()).await.map_err(|e| e.to_string())?;
            }
            t.send(Bytes::new()).await.map_err(|e| e.to_string())?;
            let count = t.recv().await.map_err(|e| e.to_string())?;
            let elapsed = start.elapsed();
            let got = u64::from_be_bytes(count[..].try_into().map_err(|_| "bad count")?);
            let _ = t.close().await;
            Ok((got, elapsed))
        })
    }
}

/// One-way latency (half the round trip) of `rtts`: median and p99, in µs.
fn one_way_us(mut rtts: Vec<Duration>) -> (f64, f64) {
    rtts.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6 / 2.0;
    (us(rtts[rtts.len() / 2]), us(rtts[rtts.len() * 99 / 100]))
}

/// perftest's arguments for `size`-byte messages, `n` of them, on `spec`
/// (`DEVICE:GID_INDEX`).
fn perftest_args(spec: &str, size: usize, n: usize) -> Vec<String> {
    let (dev, gid) = spec.split_once(':').unwrap_or((spec, "0"));
    let n = n.to_string();
    ["-d", dev, "-x", gid, "-s", &size.to_string(), "-n", &n]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// `ib_send_lat` t_typical (µs) and `ib_send_bw` rate (10^6 B/s) for `size`; with
/// `remote`, against the perftest servers of a `--serve --perftest` on the other host.
fn perftest(spec: &str, addr: SocketAddr, size: usize, remote: bool) -> Result<(f64, f64), String> {
    if !spec.contains(':') {
        return Err("--perftest wants DEVICE:GID_INDEX".into());
    }
    let ip = addr.ip().to_string();
    let lat_args = perftest_args(spec, size, TRIPS);
    let bw_args = perftest_args(spec, size, iters_for(size));
    let (lat_out, bw_out) = if remote {
        (
            perftest_client("ib_send_lat", &lat_args, &ip, None)?,
            perftest_client("ib_send_bw", &bw_args, &ip, None)?,
        )
    } else {
        (
            perftest_pair("ib_send_lat", &lat_args, &ip)?,
            perftest_pair("ib_send_bw", &bw_args, &ip)?,
        )
    };
    let row = |out: &str, min_fields: usize| -> Option<Vec<f64>> {
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= min_fields && f[0] == size.to_string())
                .then(|| f.iter().filter_map(|x| x.parse().ok()).collect())
        })
    };
    // ib_send_lat: #bytes #iterations t_min t_max t_typical ...
    let lat = row(&lat_out, 5)
        .and_then(|f| f.get(4).copied())
        .ok_or_else(|| format!("no result row in ib_send_lat's output:\n{lat_out}"))?;
    // ib_send_bw: #bytes #iterations BW_peak BW_average MsgRate[Mpps]
    let mpps = row(&bw_out, 5)
        .and_then(|f| f.get(4).copied())
        .ok_or_else(|| format!("no result row in ib_send_bw's output:\n{bw_out}"))?;
    Ok((lat, mpps * size as f64))
}

/// Run perftest's `tool` as a server until a client has run against it (at most two
/// minutes).
fn perftest_server(tool: &str, args: &[String]) -> Result<(), String> {
    let mut srv = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{tool}: {e} (is perftest installed?)"))?;
    for _ in 0..1200 {
        if let Some(st) = srv.try_wait().map_err(|e| e.to_string())? {
            return st
                .success()
                .then_some(())
                .ok_or(format!("{tool} server: {st}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = srv.kill();
    let _ = srv.wait();
    Err(format!("{tool} server: no client in two minutes"))
}

/// Starts a local perftest server again.
type Restart<'a> = dyn Fn() -> Result<Child, String> + 'a;

/// Run `tool`'s client against `ip` until it succeeds (the server may be starting; a
/// local one, `srv`, is started again if it gave up); its output.
fn perftest_client(
    tool: &str,
    args: &[String],
    ip: &str,
    mut srv: Option<(&Restart, Child)>,
) -> Result<String, String> {
    let mut last = String::new();
    // At most 90 s in all: a perftest client that hangs (its handshake with a server
    // that went away) is killed after a minute; the baseline is then "not measured".
    let end = Instant::now() + Duration::from_secs(90);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(300));
        if let Some((start, child)) = &mut srv {
            // A server that gave up (it exits on a failed handshake) is started again.
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                *child = start()?;
                continue;
            }
        }
        let Some(out) = output_within(Command::new(tool).args(args).arg(ip), 60)? else {
            last = "a client run took over a minute".into();
            continue;
        };
        if out.status.success() {
            if let Some((_, mut child)) = srv {
                let _ = child.wait();
            }
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    if let Some((_, mut child)) = srv {
        let _ = child.kill();
        let _ = child.wait();
    }
    Err(format!("{tool} client kept failing: {last}"))
}

/// `cmd`'s output, or `None` if it ran longer than `secs` seconds (it is killed).
fn output_within(cmd: &mut Command, secs: u64) -> Result<Option<std::process::Output>, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            return child
                .wait_with_output()
                .map(Some)
                .map_err(|e| e.to_string());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}

/// Run `tool` as server and client on this host (retrying while the server starts);
/// the client's output.
fn perftest_pair(tool: &str, args: &[String], ip: &str) -> Result<String, String> {
    let start = || {
        Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{tool}: {e} (is perftest installed?)"))
    };
    let srv = start()?;
    perftest_client(tool, args, ip, Some((&start, srv)))
}
