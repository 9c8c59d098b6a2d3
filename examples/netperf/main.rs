//! netperf: a perftest-style benchmark of net-rs next to tokio-util's `Framed` and a
//! raw blocking `std::net::TcpStream`, measured in the same run on loopback.
//!
//! ```text
//! cargo run --release --example netperf                       # everything, ~1 minute
//! cargo run --release --example netperf -- --sizes 64,1048576 --duration-ms 1000
//! cargo run --release --example netperf -- --only latency --impl netrs,raw
//! cargo run --release --example netperf --features rdma -- --transport rdma \
//!     --addr <device IP>:18700 [--perftest rxe0:<gid index>]     # see rdma.rs
//! ```
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

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::transport::Transport;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[cfg(feature = "rdma")]
mod rdma;

const MAX: usize = 16 << 20;
/// The busy-poll window of the `net-rs lat` rows (latency mode).
const BUSY_POLL: Duration = Duration::from_millis(1);

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Args {
    sizes: Vec<usize>,
    duration: Duration,
    latency: bool,
    throughput: bool,
    /// Which throughput tables: the send side, the receive side.
    send_side: bool,
    recv_side: bool,
    impls: Vec<Impl>,
    transport: String,
    /// RDMA: the device IP and port to listen and connect on.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    addr: Option<SocketAddr>,
    /// RDMA: `DEVICE:GID_INDEX` to run perftest on as the baseline.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    perftest: Option<String>,
    /// RDMA: be the server process of a run (started by the client side).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    serve: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Impl {
    NetRs,
    NetRsBusy,
    Framed,
    Raw,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::NetRs => "net-rs",
            Impl::NetRsBusy => "net-rs lat",
            Impl::Framed => "Framed",
            Impl::Raw => "raw std",
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: netperf [--sizes 64,1024,...] [--duration-ms N] [--only latency|throughput|send|recv]\n\
         \x20              [--impl netrs,netrs-lat,framed,raw] [--transport tcp|rdma]\n\
         \x20              [--addr IP:PORT] [--perftest DEVICE:GID_INDEX]   (rdma)"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        sizes: vec![64, 1024, 16 << 10, 64 << 10, 1 << 20],
        duration: Duration::from_millis(500),
        latency: true,
        throughput: true,
        send_side: true,
        recv_side: true,
        impls: vec![Impl::NetRs, Impl::NetRsBusy, Impl::Framed, Impl::Raw],
        transport: "tcp".into(),
        addr: None,
        perftest: None,
        serve: false,
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
                _ => usage(),
            },
            "--impl" => {
                a.impls = val()
                    .split(',')
                    .map(|s| match s {
                        "netrs" | "net-rs" => Impl::NetRs,
                        "netrs-lat" => Impl::NetRsBusy,
                        "framed" => Impl::Framed,
                        "raw" => Impl::Raw,
                        _ => usage(),
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
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if a.transport == "rdma" && !sizes_given {
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
        "tcp" => run_tcp(&args),
        "rdma" => {
            #[cfg(feature = "rdma")]
            if let Err(e) = rdma::run(&args) {
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

fn machine() -> String {
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
    println!(
        "netperf: TCP over loopback, {} per cell",
        humantime(args.duration)
    );
    println!("machine: {}", machine());
    println!(
        "client and server on separate threads; net-rs and Framed on current-thread tokio runtimes"
    );
    let mut lat: Vec<(usize, Impl, f64)> = Vec::new();
    let mut sends: Vec<(usize, Sender, Thr)> = Vec::new();
    if args.latency {
        println!("\nping-pong latency (round trip, µs)");
        println!(
            "{:>8} | {:>14} | {:>8} | {:>8} | {:>8}",
            "size", "impl", "median", "p99", "trips"
        );
        for &size in &args.sizes {
            for &imp in &args.impls {
                let r = latency(imp, size, args.duration);
                println!(
                    "{:>8} | {:>14} | {:>8.1} | {:>8.1} | {:>8}",
                    fmt_size(size),
                    imp.name(),
                    r.median_us,
                    r.p99_us,
                    r.n
                );
                lat.push((size, imp, r.median_us));
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
            for sender in Sender::of(&args.impls) {
                let r = send_rate(sender, size, args.duration);
                println!(
                    "{:>8} | {:>14} | {:>12.0} | {:>10.1}",
                    fmt_size(size),
                    sender.name(),
                    r.msgs_per_s,
                    r.mb_per_s
                );
                sends.push((size, sender, r));
            }
        }
    }
    if args.throughput && args.recv_side {
        println!("\none-way streaming, receive side: the same sender streams to every receiver");
        println!("(a blocking std writer with a 64 KiB BufWriter on its own thread)");
        println!(
            "{:>8} | {:>14} | {:>12} | {:>10}",
            "size", "receiver", "msgs/s", "MB/s"
        );
        for &size in &args.sizes {
            for &imp in &args.impls {
                let r = recv_rate(imp, size, args.duration);
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
    println!("\ntargets (ratios from this run)");
    let send = |size: usize, sender: Sender| {
        sends
            .iter()
            .find(|t| t.0 == size && t.1 == sender)
            .map(|t| t.2.msgs_per_s)
    };
    let netrs = |multi| Sender::NetRs { busy: false, multi };
    for (multi, flavour) in [(false, "current-thread"), (true, "multi-thread")] {
        if let (Some(n), Some(f)) = (
            send(64, netrs(multi)),
            send(64, Sender::FramedFeed { multi }),
        ) {
            let r = n / f;
            println!(
                "  64 B send msg/s, net-rs / Framed feed+flush ({flavour}): {r:.2}x (target >= 1.0x) {}",
                verdict(r >= 1.0)
            );
        }
        if let (Some(n), Some(w)) = (send(64, netrs(multi)), send(64, Sender::Raw)) {
            let r = n / w;
            println!(
                "  64 B send msg/s, net-rs ({flavour}) / raw std BufWriter: {r:.2}x (target >= 0.9x) {}",
                verdict(r >= 0.9)
            );
        }
    }
    if let (Some(n), Some(w)) = (send(1 << 20, netrs(false)), send(1 << 20, Sender::Raw)) {
        let r = n / w;
        println!(
            "  1 MiB send MB/s, net-rs / raw std: {r:.2}x (target >= 0.9x) {}",
            verdict(r >= 0.9)
        );
    }
    let median =
        |size: usize, imp: Impl| lat.iter().find(|x| x.0 == size && x.1 == imp).map(|x| x.2);
    for &size in &args.sizes {
        if let (Some(n), Some(f)) = (median(size, Impl::NetRs), median(size, Impl::Framed)) {
            let r = n / f;
            println!(
                "  {} ping-pong median RTT, net-rs / Framed: {r:.2}x (target <= 1.1x) {}",
                fmt_size(size),
                verdict(r <= 1.1)
            );
        }
    }
    if let (Some(n), Some(w)) = (median(64, Impl::NetRsBusy), median(64, Impl::Raw)) {
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

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
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

/// Runs `server` on its own thread for one connection; returns the address.
fn serve<F: FnOnce(std::net::TcpListener) + Send + 'static>(
    server: F,
) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    (addr, std::thread::spawn(move || server(l)))
}

/// Runs a net-rs server on its own thread and current-thread runtime.
fn serve_netrs<F, Fut>(imp: Impl, server: F) -> (SocketAddr, std::thread::JoinHandle<()>)
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let l = TcpListener::bind_with("127.0.0.1:0", &config(imp))
                .await
                .unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            server(l).await
        })
    });
    (rx.recv().expect("server started"), h)
}

fn config(imp: Impl) -> TcpConfig {
    let c = TcpConfig::default().max_message_size(MAX);
    if imp == Impl::NetRsBusy {
        c.busy_poll(BUSY_POLL)
    } else {
        c
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX)
        .new_codec()
}

fn latency(imp: Impl, size: usize, dur: Duration) -> Lat {
    let msg = payload(size);
    let warmup = 200;
    match imp {
        Impl::NetRs | Impl::NetRsBusy => {
            let (addr, h) = serve_netrs(imp, |l| async move {
                let c = l.accept().await.unwrap();
                while let Ok(m) = c.recv().await {
                    c.send(m).await.unwrap();
                }
            });
            let rtts = current_thread().block_on(async move {
                let t = TcpTransport::connect_with(addr, &config(imp))
                    .await
                    .unwrap();
                let mut rtts = Vec::new();
                let end = Instant::now() + dur;
                let mut i = 0;
                while Instant::now() < end || rtts.is_empty() {
                    let t0 = Instant::now();
                    t.send(msg.clone()).await.unwrap();
                    let r = t.recv().await.unwrap();
                    assert_eq!(r.len(), size);
                    if i >= warmup {
                        rtts.push(t0.elapsed());
                    }
                    i += 1;
                }
                t.close().await.unwrap();
                rtts
            });
            h.join().unwrap();
            stats(rtts)
        }
        Impl::Framed => {
            let (addr, h) = serve(|l| {
                current_thread().block_on(async move {
                    l.set_nonblocking(true).unwrap();
                    let l = tokio::net::TcpListener::from_std(l).unwrap();
                    let (s, _) = l.accept().await.unwrap();
                    s.set_nodelay(true).unwrap();
                    let mut f = Framed::new(s, codec());
                    while let Some(Ok(m)) = f.next().await {
                        f.send(m.freeze()).await.unwrap();
                    }
                })
            });
            let rtts = current_thread().block_on(async move {
                let s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                let mut f = Framed::new(s, codec());
                let mut rtts = Vec::new();
                let end = Instant::now() + dur;
                let mut i = 0;
                while Instant::now() < end || rtts.is_empty() {
                    let t0 = Instant::now();
                    f.send(msg.clone()).await.unwrap();
                    let r = f.next().await.unwrap().unwrap();
                    assert_eq!(r.len(), size);
                    if i >= warmup {
                        rtts.push(t0.elapsed());
                    }
                    i += 1;
                }
                rtts
            });
            h.join().unwrap();
            stats(rtts)
        }
        Impl::Raw => {
            let (addr, h) = serve(|l| {
                let (s, _) = l.accept().unwrap();
                s.set_nodelay(true).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = BufWriter::new(s);
                let mut buf = Vec::new();
                while read_frame(&mut r, &mut buf).is_ok() {
                    write_frame(&mut w, &buf).unwrap();
                    w.flush().unwrap();
                }
            });
            let s = std::net::TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = BufWriter::new(s);
            let mut buf = Vec::new();
            let mut rtts = Vec::new();
            let end = Instant::now() + dur;
            let mut i = 0;
            while Instant::now() < end || rtts.is_empty() {
                let t0 = Instant::now();
                write_frame(&mut w, &msg).unwrap();
                w.flush().unwrap();
                read_frame(&mut r, &mut buf).unwrap();
                assert_eq!(buf.len(), size);
                if i >= warmup {
                    rtts.push(t0.elapsed());
                }
                i += 1;
            }
            drop((r, w));
            h.join().unwrap();
            stats(rtts)
        }
    }
}

fn write_frame(w: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&(payload.len() as u32).to_be_bytes())?;
    w.write_all(payload)
}

fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h)?;
    buf.resize(u32::from_be_bytes(h) as usize, 0);
    r.read_exact(buf)
}

/// How the sending side of a throughput cell runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sender {
    /// net-rs: a plain `send().await` loop, then `flush`.
    NetRs { busy: bool, multi: bool },
    /// `Framed` with `SinkExt::send`: one flush per message.
    FramedSend,
    /// `Framed` with `SinkExt::feed` in the loop and one `flush` at the end.
    FramedFeed { multi: bool },
    /// A blocking `std` sender behind a 64 KiB `BufWriter`.
    Raw,
}

impl Sender {
    fn name(self) -> &'static str {
        match self {
            Sender::NetRs {
                busy: false,
                multi: false,
            } => "net-rs",
            Sender::NetRs {
                busy: false,
                multi: true,
            } => "net-rs mt",
            Sender::NetRs { busy: true, .. } => "net-rs lat",
            Sender::FramedSend => "Framed send",
            Sender::FramedFeed { multi: false } => "Framed feed",
            Sender::FramedFeed { multi: true } => "Framed feed mt",
            Sender::Raw => "raw std",
        }
    }

    fn of(imps: &[Impl]) -> Vec<Sender> {
        let mut v = Vec::new();
        for imp in imps {
            match imp {
                Impl::NetRs => v.extend([
                    Sender::NetRs {
                        busy: false,
                        multi: false,
                    },
                    Sender::NetRs {
                        busy: false,
                        multi: true,
                    },
                ]),
                Impl::NetRsBusy => v.push(Sender::NetRs {
                    busy: true,
                    multi: false,
                }),
                Impl::Framed => v.extend([
                    Sender::FramedSend,
                    Sender::FramedFeed { multi: false },
                    Sender::FramedFeed { multi: true },
                ]),
                Impl::Raw => v.push(Sender::Raw),
            }
        }
        v
    }
}

fn runtime(multi: bool) -> tokio::runtime::Runtime {
    if multi {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    } else {
        current_thread()
    }
}

/// The receiver every sender streams to: a blocking `std` reader with a 64 KiB
/// `BufReader` on its own thread, which checks every size, counts the messages up to
/// an empty end marker and answers with the count.
fn raw_receiver(size: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
    serve(move |l| {
        let (s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::with_capacity(64 << 10, s.try_clone().unwrap());
        let mut w = BufWriter::new(s);
        let mut buf = Vec::new();
        let mut n = 0u64;
        loop {
            read_frame(&mut r, &mut buf).unwrap();
            if buf.is_empty() {
                break;
            }
            assert_eq!(buf.len(), size);
            n += 1;
        }
        write_frame(&mut w, &n.to_be_bytes()).unwrap();
        w.flush().unwrap();
    })
}

/// Messages per second that `sender` streams to the common raw receiver. The clock
/// runs from the first message to the receiver's count (every message arrived).
fn send_rate(sender: Sender, size: usize, dur: Duration) -> Thr {
    let msg = payload(size);
    let (addr, h) = raw_receiver(size);
    let (count, elapsed) = match sender {
        Sender::NetRs { busy, multi } => runtime(multi).block_on(async move {
            let imp = if busy { Impl::NetRsBusy } else { Impl::NetRs };
            let t = TcpTransport::connect_with(addr, &config(imp))
                .await
                .unwrap();
            let t0 = Instant::now();
            let end = t0 + dur;
            let mut sent = 0u64;
            while Instant::now() < end {
                for _ in 0..64 {
                    t.send(msg.clone()).await.unwrap();
                }
                sent += 64;
            }
            t.send(Bytes::new()).await.unwrap();
            let reply = t.recv().await.unwrap();
            let got = u64::from_be_bytes(reply[..].try_into().unwrap());
            assert_eq!(got, sent, "receiver counted every message");
            (got, t0.elapsed())
        }),
        Sender::FramedSend | Sender::FramedFeed { .. } => {
            let multi = matches!(sender, Sender::FramedFeed { multi: true });
            runtime(multi).block_on(async move {
                let s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                let mut f = Framed::new(s, codec());
                let t0 = Instant::now();
                let end = t0 + dur;
                let mut sent = 0u64;
                while Instant::now() < end {
                    for _ in 0..64 {
                        if sender == Sender::FramedSend {
                            f.send(msg.clone()).await.unwrap();
                        } else {
                            f.feed(msg.clone()).await.unwrap();
                        }
                    }
                    sent += 64;
                }
                f.send(Bytes::new()).await.unwrap();
                let reply = f.next().await.unwrap().unwrap();
                let got = u64::from_be_bytes(reply[..].try_into().unwrap());
                assert_eq!(got, sent, "receiver counted every message");
                (got, t0.elapsed())
            })
        }
        Sender::Raw => {
            let s = std::net::TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = BufWriter::with_capacity(64 << 10, s);
            let t0 = Instant::now();
            let end = t0 + dur;
            let mut sent = 0u64;
            while Instant::now() < end {
                for _ in 0..64 {
                    write_frame(&mut w, &msg).unwrap();
                }
                sent += 64;
            }
            write_frame(&mut w, &[]).unwrap();
            w.flush().unwrap();
            let mut buf = Vec::new();
            read_frame(&mut r, &mut buf).unwrap();
            let got = u64::from_be_bytes(buf[..].try_into().unwrap());
            assert_eq!(got, sent, "receiver counted every message");
            (got, t0.elapsed())
        }
    };
    h.join().unwrap();
    rate(count, size, elapsed)
}

fn rate(count: u64, size: usize, elapsed: Duration) -> Thr {
    let secs = elapsed.as_secs_f64();
    Thr {
        msgs_per_s: count as f64 / secs,
        mb_per_s: count as f64 * size as f64 / secs / 1e6,
    }
}

/// Messages per second that `imp` receives from the common sender: a blocking `std`
/// sender behind a 64 KiB `BufWriter` that streams for `dur`, then an empty marker,
/// and reads the receiver's count.
fn recv_rate(imp: Impl, size: usize, dur: Duration) -> Thr {
    let msg = payload(size);
    let (count_tx, count_rx) = std::sync::mpsc::channel();
    let send = move |s: std::net::TcpStream| {
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = BufWriter::with_capacity(64 << 10, s);
        let t0 = Instant::now();
        let end = t0 + dur;
        let mut sent = 0u64;
        while Instant::now() < end {
            for _ in 0..64 {
                write_frame(&mut w, &msg).unwrap();
            }
            sent += 64;
        }
        write_frame(&mut w, &[]).unwrap();
        w.flush().unwrap();
        let mut buf = Vec::new();
        read_frame(&mut r, &mut buf).unwrap();
        let got = u64::from_be_bytes(buf[..].try_into().unwrap());
        assert_eq!(got, sent, "receiver counted every message");
        count_tx.send((got, t0.elapsed())).unwrap();
    };
    let (addr, h) = serve(move |l| {
        let (s, _) = l.accept().unwrap();
        send(s)
    });
    match imp {
        Impl::NetRs | Impl::NetRsBusy => current_thread().block_on(async move {
            let c = TcpTransport::connect_with(addr, &config(imp))
                .await
                .unwrap();
            let mut n = 0u64;
            loop {
                let m = c.recv().await.unwrap();
                if m.is_empty() {
                    break;
                }
                assert_eq!(m.len(), size);
                n += 1;
            }
            c.send(Bytes::copy_from_slice(&n.to_be_bytes()))
                .await
                .unwrap();
            c.close().await.unwrap();
        }),
        Impl::Framed => current_thread().block_on(async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut f = Framed::new(s, codec());
            let mut n = 0u64;
            loop {
                let m = f.next().await.unwrap().unwrap();
                if m.is_empty() {
                    break;
                }
                assert_eq!(m.len(), size);
                n += 1;
            }
            f.send(Bytes::copy_from_slice(&n.to_be_bytes()))
                .await
                .unwrap();
        }),
        Impl::Raw => {
            let s = std::net::TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            let mut r = BufReader::with_capacity(64 << 10, s.try_clone().unwrap());
            let mut w = BufWriter::new(s);
            let mut buf = Vec::new();
            let mut n = 0u64;
            loop {
                read_frame(&mut r, &mut buf).unwrap();
                if buf.is_empty() {
                    break;
                }
                assert_eq!(buf.len(), size);
                n += 1;
            }
            write_frame(&mut w, &n.to_be_bytes()).unwrap();
            w.flush().unwrap();
        }
    }
    h.join().unwrap();
    let (count, elapsed) = count_rx.recv().unwrap();
    rate(count, size, elapsed)
}
