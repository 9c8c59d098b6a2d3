//! netperf: a perftest-style benchmark of net-rs next to tokio-util's `Framed` and a
//! raw blocking `std::net::TcpStream`, measured in the same run on loopback.
//!
//! ```text
//! cargo run --release --example netperf                       # everything, ~1 minute
//! cargo run --release --example netperf -- --sizes 64,1048576 --duration-ms 1000
//! cargo run --release --example netperf -- --only latency --impl netrs,raw
//! cargo run --release --example netperf -- --only rpc              # RPC baselines
//! cargo run --release --example netperf -- --only stream           # byte streams
//! cargo run --release --example netperf --features grpc -- --only grpc   # gRPC (tonic)
//! cargo run --release --example netperf --features rdma -- --transport rdma \
//!     --addr <device IP>:18700 [--perftest rxe0:<gid index>]     # see rdma.rs
//! ```
//!
//! Across two hosts: start the server side on one (`--serve IP:PORT`, with the same
//! `--transport`, and for RDMA the same `--sizes` and its own `--perftest` device), and
//! the client side on the other with `--addr SERVER_IP:PORT --remote`:
//!
//! ```text
//! host A: netperf --transport tcp --serve 0.0.0.0:18700
//! host B: netperf --transport tcp --addr <A>:18700 --remote
//! host A: netperf --transport rdma --serve <A's RDMA IP>:18700 [--perftest rxe0:1]
//! host B: netperf --transport rdma --addr <A's RDMA IP>:18700 --remote [--perftest rxe0:1]
//! ```
//!
//! Remotely, TCP's latency rows all ping-pong with the server's one echo server (a
//! blocking `std` one), its send-side rows stream to the server's common receiver
//! (port + 1), and there is no receive-side table. The server side exits after a
//! minute without a new connection.
//!
//! Latency: ping-pong round trips of one message (median and p99), each implementation
//! against itself. Throughput, send side: each sender (net-rs, `Framed` with `send`,
//! `Framed` with `feed` + one `flush`, a blocking `std` `BufWriter`) streams messages
//! for the duration, then an empty end marker, to the *same* receiver (a blocking `std`
//! reader), which checks every size, counts, and answers with the count; the time runs
//! until that answer arrives. Receive side: the same blocking sender streams to each
//! receiver. Every cell runs on a fresh connection. Client and server each use their
//! own thread (current-thread tokio runtimes unless a row says `mt`: a multi-thread
//! runtime with 2 workers).
//!
//! Layout: this file holds the options, the loops over (size, implementation), the
//! tables and the targets. Each TCP implementation is a [`Contender`] in a module of its
//! own (`netrs.rs`, `framed.rs`, `raw.rs`); `contender.rs` holds the trait and what the
//! implementations share (runtimes, the measuring loops); `raw.rs` also holds the
//! common receiver and sender of the streaming tables. Adding an implementation: a
//! module with a `Contender` (and its `Sender`s), and a key in [`contender`]. RDMA
//! (`rdma.rs`) has its own run and table: see there.
//!
//! RPC (`--only rpc`, loopback only): unary echo calls with 1, 16 and 256 in flight on
//! one connection, for sizes 64 B and 4 KiB unless `--sizes`; tonic (gRPC) and tarpc
//! as the baselines, and the harness a net-rs row will share: see `rpc_baselines.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

mod contender;
mod framed;
mod netrs;
mod raw;
#[cfg(feature = "rdma")]
mod rdma;
mod rpc_baselines;
mod rpc_netrs;
#[cfg(feature = "rdma")]
mod rpc_rdma;
// The byte stream's tokio traits (its futures-io ones are always there).
#[cfg(feature = "grpc")]
mod grpc;
#[cfg(feature = "tokio")]
mod stream;

/// The gRPC table, if built with the `grpc` feature.
fn run_grpc(args: &Args) {
    #[cfg(feature = "grpc")]
    grpc::run(args);
    #[cfg(not(feature = "grpc"))]
    {
        let _ = args;
        eprintln!("netperf: --only grpc needs --features grpc");
        std::process::exit(2);
    }
}

use contender::{Contender, Sender};

/// The largest message (and frame) any implementation accepts.
const MAX: usize = 16 << 20;

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Args {
    sizes: Vec<usize>,
    duration: Duration,
    latency: bool,
    throughput: bool,
    /// The RPC table (`--only rpc`).
    rpc: bool,
    /// The byte stream table (`--only stream`).
    stream: bool,
    /// The gRPC table (`--only grpc`).
    grpc: bool,
    /// Which throughput tables: the send side, the receive side.
    send_side: bool,
    recv_side: bool,
    /// `--impl` keys (see [`contender`]), in the order of the rows.
    impls: Vec<String>,
    transport: String,
    /// RDMA: the device IP and port to listen and connect on.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    addr: Option<SocketAddr>,
    /// RDMA: `DEVICE:GID_INDEX` to run perftest on as the baseline.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    perftest: Option<String>,
    /// Be the server side of a run (RDMA: started by the client side unless
    /// `--remote`; TCP: for a client on another host).
    serve: bool,
    /// The server side runs elsewhere (started there with `--serve`).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    remote: bool,
}

/// The implementation an `--impl` key selects.
fn contender(key: &str) -> Option<Box<dyn Contender>> {
    Some(match key {
        "netrs" | "net-rs" => Box::new(netrs::NetRs { busy: false }),
        "netrs-lat" => Box::new(netrs::NetRs { busy: true }),
        "framed" => Box::new(framed::Framed),
        "raw" => Box::new(raw::Raw),
        _ => return None,
    })
}

fn usage() -> ! {
    eprintln!(
        "usage: netperf [--sizes 64,1024,...] [--duration-ms N] [--only latency|throughput|send|recv|rpc|stream|grpc]\n\
         \x20              [--impl netrs,netrs-lat,framed,raw] [--transport tcp|rdma]\n\
         \x20              [--addr IP:PORT] [--perftest DEVICE:GID_INDEX]   (rdma)\n\
         \x20              [--serve IP:PORT | --addr SERVER_IP:PORT --remote]  (two hosts)"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        sizes: vec![64, 1024, 16 << 10, 64 << 10, 1 << 20],
        duration: Duration::from_millis(500),
        latency: true,
        throughput: true,
        rpc: false,
        stream: false,
        grpc: false,
        send_side: true,
        recv_side: true,
        impls: ["netrs", "netrs-lat", "framed", "raw"]
            .map(String::from)
            .into(),
        transport: "tcp".into(),
        addr: None,
        perftest: None,
        serve: false,
        remote: false,
    };
    let mut sizes_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--sizes" => {
                sizes_given = true;
                a.sizes = val()
                    .split(',')
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--duration-ms" => {
                a.duration = Duration::from_millis(val().parse().unwrap_or_else(|_| usage()))
            }
            "--only" => match val().as_str() {
                "latency" => a.throughput = false,
                "throughput" => a.latency = false,
                "send" => {
                    a.latency = false;
                    a.recv_side = false;
                }
                "recv" => {
                    a.latency = false;
                    a.send_side = false;
                }
                "rpc" => {
                    a.latency = false;
                    a.throughput = false;
                    a.rpc = true;
                }
                "stream" => {
                    a.latency = false;
                    a.throughput = false;
                    a.stream = true;
                }
                "grpc" => {
                    a.latency = false;
                    a.throughput = false;
                    a.grpc = true;
                }
                _ => usage(),
            },
            "--impl" => {
                a.impls = val()
                    .split(',')
                    .map(|s| match contender(s) {
                        Some(_) => s.to_string(),
                        None => usage(),
                    })
                    .collect()
            }
            "--transport" => a.transport = val(),
            "--addr" => a.addr = Some(val().parse().unwrap_or_else(|_| usage())),
            "--perftest" => a.perftest = Some(val()),
            "--serve" => {
                a.serve = true;
                a.addr = Some(val().parse().unwrap_or_else(|_| usage()));
            }
            "--remote" => a.remote = true,
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if a.remote && a.addr.is_none() {
        eprintln!("--remote needs --addr SERVER_IP:PORT");
        std::process::exit(2);
    }
    if a.rpc && !sizes_given {
        a.sizes = vec![64, 4 << 10];
    }
    if a.grpc && !sizes_given {
        a.sizes = vec![64, 8 << 10];
    }
    if (a.rpc || a.grpc || a.stream) && (a.remote || a.serve) {
        eprintln!("--only rpc, grpc and stream run on one host (loopback TCP, or one RDMA device): no --remote or --serve");
        std::process::exit(2);
    }
    if a.transport == "rdma" && !sizes_given && !a.rpc && !a.grpc && !a.stream {
        a.sizes = vec![64, 4 << 10, 64 << 10];
    }
    if a.sizes.iter().any(|&s| s == 0 || s > MAX) {
        eprintln!("sizes must be between 1 and {MAX}");
        std::process::exit(2);
    }
    a
}

fn main() {
    let args = parse_args();
    match args.transport.as_str() {
        "tcp" if args.serve => raw::serve_remote(args.addr.expect("--serve sets it")),
        "tcp" => run_tcp(&args),
        "rdma" => {
            #[cfg(feature = "rdma")]
            if let Err(e) = if args.grpc {
                run_grpc(&args);
                Ok(())
            } else if args.stream {
                stream::run(&args);
                Ok(())
            } else if args.rpc {
                rpc_rdma::run(&args)
            } else {
                rdma::run(&args)
            } {
                eprintln!("netperf: {e}");
                std::process::exit(1);
            }
            #[cfg(not(feature = "rdma"))]
            {
                eprintln!("netperf: --transport rdma needs --features rdma");
                std::process::exit(2);
            }
        }
        _ => usage(),
    }
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown kernel".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

fn fmt_size(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

struct Lat {
    median_us: f64,
    p99_us: f64,
    n: usize,
}

struct Thr {
    msgs_per_s: f64,
    mb_per_s: f64,
}

fn run_tcp(args: &Args) {
    let remote = args.addr.filter(|_| args.remote);
    match remote {
        Some(a) => println!(
            "netperf: TCP to the server side at {a} (another host), {} per cell",
            humantime(args.duration)
        ),
        None => println!(
            "netperf: TCP over loopback, {} per cell",
            humantime(args.duration)
        ),
    }
    println!("machine: {}", machine());
    println!(
        "client and server on separate threads; net-rs and Framed on current-thread tokio runtimes"
    );
    let impls: Vec<Box<dyn Contender>> = args
        .impls
        .iter()
        .map(|key| contender(key).expect("checked by parse_args"))
        .collect();
    // (size, row name, median RTT) and (size, row name, rate), for the targets.
    let mut lat: Vec<(usize, &str, f64)> = Vec::new();
    let mut sends: Vec<(usize, &str, Thr)> = Vec::new();
    if args.latency {
        println!("\nping-pong latency (round trip, µs)");
        println!(
            "{:>8} | {:>14} | {:>8} | {:>8} | {:>8}",
            "size", "impl", "median", "p99", "trips"
        );
        for &size in &args.sizes {
            for imp in &impls {
                let r = stats(match remote {
                    Some(a) => imp.ping_pong_to(a, &payload(size), args.duration),
                    None => imp.ping_pong(&payload(size), args.duration),
                });
                println!(
                    "{:>8} | {:>14} | {:>8.1} | {:>8.1} | {:>8}",
                    fmt_size(size),
                    imp.name(),
                    r.median_us,
                    r.p99_us,
                    r.n
                );
                lat.push((size, imp.name(), r.median_us));
            }
        }
    }
    if args.throughput && args.send_side {
        println!("\none-way streaming, send side: every sender streams to the same receiver");
        println!("(a blocking std reader with a 64 KiB BufReader on its own thread)");
        println!(
            "{:>8} | {:>14} | {:>12} | {:>10}",
            "size", "sender", "msgs/s", "MB/s"
        );
        for &size in &args.sizes {
            for sender in impls.iter().flat_map(|imp| imp.senders()) {
                let r = match remote {
                    Some(a) => {
                        let at = SocketAddr::new(a.ip(), a.port() + 1);
                        let (count, elapsed) = sender.stream_to(at, &payload(size), args.duration);
                        rate(count, size, elapsed)
                    }
                    None => send_rate(&*sender, size, args.duration),
                };
                println!(
                    "{:>8} | {:>14} | {:>12.0} | {:>10.1}",
                    fmt_size(size),
                    sender.name(),
                    r.msgs_per_s,
                    r.mb_per_s
                );
                sends.push((size, sender.name(), r));
            }
        }
    }
    if args.throughput && args.recv_side && remote.is_none() {
        println!("\none-way streaming, receive side: the same sender streams to every receiver");
        println!("(a blocking std writer with a 64 KiB BufWriter on its own thread)");
        println!(
            "{:>8} | {:>14} | {:>12} | {:>10}",
            "size", "receiver", "msgs/s", "MB/s"
        );
        for &size in &args.sizes {
            for imp in &impls {
                let r = recv_rate(&**imp, size, args.duration);
                println!(
                    "{:>8} | {:>14} | {:>12.0} | {:>10.1}",
                    fmt_size(size),
                    imp.name(),
                    r.msgs_per_s,
                    r.mb_per_s
                );
            }
        }
    }
    if args.rpc {
        rpc_baselines::run(args);
    }
    if args.stream {
        #[cfg(feature = "tokio")]
        stream::run(args);
        #[cfg(not(feature = "tokio"))]
        eprintln!("netperf: --only stream needs the `tokio` feature");
    }
    if args.grpc {
        run_grpc(args);
    }
    if !args.latency && !args.throughput {
        return;
    }
    if remote.is_some() {
        // The targets are for loopback, each implementation against itself.
        println!("\n(no targets across hosts: they are set for loopback runs)");
        return;
    }
    println!("\ntargets (ratios from this run)");
    let send = |size: usize, sender: &str| {
        sends
            .iter()
            .find(|t| t.0 == size && t.1 == sender)
            .map(|t| t.2.msgs_per_s)
    };
    for (netrs, feed, flavour) in [
        ("net-rs", "Framed feed", "current-thread"),
        ("net-rs mt", "Framed feed mt", "multi-thread"),
    ] {
        if let (Some(n), Some(f)) = (send(64, netrs), send(64, feed)) {
            let r = n / f;
            println!(
                "  64 B send msg/s, net-rs / Framed feed+flush ({flavour}): {r:.2}x (target >= 1.0x) {}",
                verdict(r >= 1.0)
            );
        }
        if let (Some(n), Some(w)) = (send(64, netrs), send(64, "raw std")) {
            let r = n / w;
            println!(
                "  64 B send msg/s, net-rs ({flavour}) / raw std BufWriter: {r:.2}x (target >= 0.9x) {}",
                verdict(r >= 0.9)
            );
        }
        if let (Some(n), Some(w)) = (send(64, netrs), send(64, "raw shared")) {
            println!(
                "  64 B send msg/s, net-rs ({flavour}) / raw shared (Mutex<BufWriter>, Bytes): {:.2}x",
                n / w
            );
        }
    }
    if let (Some(w), Some(s)) = (send(64, "raw std"), send(64, "raw shared")) {
        println!(
            "  64 B send msg/s, raw shared / raw std: {:.2}x (the cost of a shareable send taking Bytes)",
            s / w
        );
    }
    if let (Some(n), Some(w)) = (send(1 << 20, "net-rs"), send(1 << 20, "raw std")) {
        let r = n / w;
        println!(
            "  1 MiB send MB/s, net-rs / raw std: {r:.2}x (target >= 0.9x) {}",
            verdict(r >= 0.9)
        );
    }
    let median =
        |size: usize, imp: &str| lat.iter().find(|x| x.0 == size && x.1 == imp).map(|x| x.2);
    for &size in &args.sizes {
        if let (Some(n), Some(f)) = (median(size, "net-rs"), median(size, "Framed")) {
            let r = n / f;
            println!(
                "  {} ping-pong median RTT, net-rs / Framed: {r:.2}x (target <= 1.1x) {}",
                fmt_size(size),
                verdict(r <= 1.1)
            );
        }
    }
    if let (Some(n), Some(w)) = (median(64, "net-rs lat"), median(64, "raw std")) {
        let r = n / w;
        println!(
            "  64 B ping-pong median RTT, net-rs latency mode / raw std: {r:.2}x (target <= 1.1x) {}",
            verdict(r <= 1.1)
        );
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn humantime(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn payload(size: usize) -> Bytes {
    (0..size).map(|i| i as u8).collect::<Vec<u8>>().into()
}

fn stats(mut rtts: Vec<Duration>) -> Lat {
    rtts.sort_unstable();
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Lat {
        median_us: at(0.5),
        p99_us: at(0.99),
        n: rtts.len(),
    }
}

fn rate(count: u64, size: usize, elapsed: Duration) -> Thr {
    let secs = elapsed.as_secs_f64();
    Thr {
        msgs_per_s: count as f64 / secs,
        mb_per_s: count as f64 * size as f64 / secs / 1e6,
    }
}

/// Messages per second that `sender` streams to the common receiver
/// ([`raw::common_receiver`]). The clock runs from the first message to the receiver's
/// count (every message arrived).
fn send_rate(sender: &dyn Sender, size: usize, dur: Duration) -> Thr {
    let msg = payload(size);
    let (addr, h) = raw::common_receiver(size);
    let (count, elapsed) = sender.stream_to(addr, &msg, dur);
    h.join().unwrap();
    rate(count, size, elapsed)
}

/// Messages per second that `imp` receives from the common sender
/// ([`raw::common_sender`]), which streams for `dur`, then an empty marker, and reads
/// the receiver's count. The clock runs on the sender, as in [`send_rate`].
fn recv_rate(imp: &dyn Contender, size: usize, dur: Duration) -> Thr {
    let (addr, h) = raw::common_sender(payload(size), dur);
    imp.stream_from(addr, size);
    let (count, elapsed) = h.join().unwrap();
    rate(count, size, elapsed)
}
