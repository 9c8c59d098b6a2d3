//! A key-value server and a pooled client on net-rs, next to the same server on
//! tokio-util's `Framed<TcpStream, LengthDelimitedCodec>`.
//!
//! ```text
//! cargo run --example kv                                   # self-check, a second or two
//! cargo run --release --example kv -- serve --addr 127.0.0.1:7000 [--impl netrs|framed|framed-feed]
//! cargo run --release --example kv -- load --addr 127.0.0.1:7000 [--clients 32] [--requests 200000] [--runs 1]
//! cargo run --release --example kv -- bench [--clients 32] [--requests 200000] [--runs 6]
//!                                           [--impl netrs,framed,framed-feed]
//! ```
//!
//! GET / SET / DEL over one message each way (see `proto.rs`); the server keeps a
//! `HashMap` behind a `Mutex`. `bench` starts every server in this process, each on its
//! own multi-thread tokio runtime with 2 workers, and for each run and each server
//! drives the same client: one net-rs `ConnectionPool` (`max_size` = clients) shared by
//! `clients` tasks on a multi-thread runtime with 2 workers, each calling
//! `pool.request(...)` (4 GETs to 1 SET, 16-byte keys, 64-byte values) until the total
//! is reached. Every reply is checked. The order of the servers alternates between runs.
//! It prints requests/s per server per run, the ratios net-rs / Framed per run, and
//! their medians; the baseline is the faster `Framed` variant (by median requests/s).
//! Next to requests/s it prints the CPU time the server's threads used per request
//! (Linux), which the other builders on a shared machine disturb less. With one request
//! outstanding per connection (a pool) the two `Framed` variants make the same syscalls
//! (`feed` + `flush` batches only when requests arrive together).
//!
//! Every wait is bounded: a request has `REQUEST_TIMEOUT` (checkout and exchange), a
//! run `RUN_TIMEOUT`; a run that fails prints why and exits with status 1.

mod client;
mod proto;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use client::{Workload, REQUEST_TIMEOUT, RUN_TIMEOUT};
use proto::{Reply, Request};
use server::{Impl, Server};

fn usage() -> ! {
    eprintln!(
        "usage: kv                                  (self-check)\n\
         \x20      kv serve --addr ADDR [--impl netrs|framed|framed-feed]\n\
         \x20      kv load --addr ADDR [--clients N] [--requests N] [--runs N]\n\
         \x20      kv bench [--clients N] [--requests N] [--runs N] [--impl netrs,framed,framed-feed]"
    );
    std::process::exit(2)
}

struct Args {
    addr: Option<String>,
    impls: Vec<Impl>,
    clients: usize,
    requests: u64,
    runs: usize,
}

fn parse_args(args: impl Iterator<Item = String>) -> Args {
    let mut a = Args {
        addr: None,
        impls: Impl::ALL.to_vec(),
        clients: 32,
        requests: 200_000,
        runs: 6,
    };
    let mut it = args;
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--addr" => a.addr = Some(val()),
            "--impl" => {
                a.impls = val()
                    .split(',')
                    .map(|s| Impl::parse(s.trim()).unwrap_or_else(|| usage()))
                    .collect()
            }
            "--clients" => a.clients = val().parse().unwrap_or_else(|_| usage()),
            "--requests" => a.requests = val().parse().unwrap_or_else(|_| usage()),
            "--runs" => a.runs = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if a.clients == 0 || a.runs == 0 || a.impls.is_empty() {
        usage()
    }
    a
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let result = match argv.next().as_deref() {
        None => self_check(),
        Some("serve") => serve(parse_args(argv)),
        Some("load") => load(parse_args(argv)),
        Some("bench") => bench(parse_args(argv)),
        Some(_) => usage(),
    };
    if let Err(e) = result {
        eprintln!("kv: {e}");
        std::process::exit(1);
    }
}

/// Start a server and the same few requests against it through the pool.
fn self_check() -> Result<(), String> {
    let client_rt = server::runtime(CLIENT_THREADS, 2);
    let work = Arc::new(Workload::new());
    for imp in Impl::ALL {
        let srv = start(imp, "127.0.0.1:0")?;
        client_rt.block_on(bounded(Duration::from_secs(10), async {
            let pool = client::pool(srv.addr, 8).map_err(|e| e.to_string())?;
            let ask = |req: Request<'static>| {
                let pool = pool.clone();
                async move {
                    let reply = pool.request(req.encode()).await;
                    Reply::decode(reply.map_err(|e| format!("{req:?}: {e}"))?)
                }
            };
            let value = |v: &'static [u8]| Reply::Value(Bytes::from_static(v));
            let script = [
                (Request::Get(b"a"), Reply::NotFound),
                (Request::Set(b"a", b"1"), Reply::Ok),
                (Request::Get(b"a"), value(b"1")),
                (Request::Set(b"a", b"22"), Reply::Ok),
                (Request::Get(b"a"), value(b"22")),
                (Request::Set(b"", b""), Reply::Ok),
                (Request::Get(b""), value(b"")),
                (Request::Del(b"a"), Reply::Ok),
                (Request::Get(b"a"), Reply::NotFound),
                (Request::Del(b"a"), Reply::NotFound),
            ];
            for (req, want) in script {
                let got = ask(req).await?;
                if got != want {
                    return Err(format!("{req:?}: got {got:?}, expected {want:?}"));
                }
            }
            let bad = pool
                .request(Bytes::from_static(b"X"))
                .await
                .map_err(|e| e.to_string())?;
            if !matches!(Reply::decode(bad)?, Reply::Error(_)) {
                return Err("a malformed request was not refused".into());
            }
            client::warm_up(&pool, &work, 8).await?;
            client::drive(&pool, &work, 8, 2_000).await?;
            bounded(Duration::from_secs(5), pool.close()).await?;
            Ok(())
        }))??;
        println!("kv self-check: {} server ok", imp.name());
    }
    Ok(())
}

/// Run one server until killed.
fn serve(args: Args) -> Result<(), String> {
    let addr = args.addr.unwrap_or_else(|| usage());
    let [imp] = args.impls[..] else { usage() };
    let srv = start(imp, &addr)?;
    println!("kv: {} server on {}", imp.name(), srv.addr);
    loop {
        std::thread::park();
    }
}

/// Drive a server that runs elsewhere (for `strace`/`perf` on the server alone).
fn load(args: Args) -> Result<(), String> {
    let addr = args.addr.unwrap_or_else(|| usage());
    let addr: SocketAddr = addr.parse().map_err(|e| format!("--addr {addr}: {e}"))?;
    let client_rt = server::runtime(CLIENT_THREADS, 2);
    let work = Arc::new(Workload::new());
    for run in 1..=args.runs {
        let c = client_rt.block_on(cell(addr, None, &work, args.clients, args.requests))?;
        println!(
            "run {run}/{}: {:.0} req/s, client CPU {}/req",
            args.runs,
            c.rate,
            us(c.client_cpu)
        );
    }
    Ok(())
}

/// The client runtime's thread name.
const CLIENT_THREADS: &str = "kv-client";

/// Every server in this process, the same client against each, `runs` times.
fn bench(args: Args) -> Result<(), String> {
    let servers = args
        .impls
        .iter()
        .map(|&imp| start(imp, "127.0.0.1:0"))
        .collect::<Result<Vec<Server>, String>>()?;
    let client_rt = server::runtime(CLIENT_THREADS, 2);
    let work = Arc::new(Workload::new());
    println!(
        "kv bench: {} clients (one ConnectionPool, max_size {}), {} requests per cell \
         (4 GET : 1 SET, 16 B keys, 64 B values), {} runs",
        args.clients, args.clients, args.requests, args.runs
    );
    println!(
        "servers and client in this process, each on its own multi-thread tokio runtime \
         with 2 workers; machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "per cell: req/s, and the CPU time the server's threads used per request (µs, \
         from /proc/self/task/*/schedstat)"
    );
    // cells[server][run]
    let mut cells: Vec<Vec<Cell>> = servers.iter().map(|_| Vec::new()).collect();
    for run in 0..args.runs {
        let mut order: Vec<usize> = (0..servers.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            let s = &servers[i];
            let c = client_rt.block_on(cell(
                s.addr,
                Some(s.imp.thread_name()),
                &work,
                args.clients,
                args.requests,
            ));
            cells[i].push(c.map_err(|e| format!("{}: {e}", s.imp.name()))?);
        }
        let mut line = format!("run {}/{}:", run + 1, args.runs);
        for &i in &order {
            let c = &cells[i][run];
            line += &format!(
                "  {} {:.0} ({})",
                servers[i].imp.name(),
                c.rate,
                us(c.server_cpu)
            );
        }
        if let Some(n) = find(&servers, Impl::NetRs) {
            for (f, s) in servers.iter().enumerate() {
                if s.imp != Impl::NetRs {
                    line += &format!(
                        "  | net-rs/{} {:.3}x",
                        s.imp.name(),
                        cells[n][run].rate / cells[f][run].rate
                    );
                }
            }
        }
        println!("{line}");
    }

    println!("\nmedians:");
    for (i, s) in servers.iter().enumerate() {
        let cpu: Vec<f64> = cells[i].iter().filter_map(|c| c.server_cpu).collect();
        let client: Vec<f64> = cells[i].iter().filter_map(|c| c.client_cpu).collect();
        let rates: Vec<f64> = cells[i].iter().map(|c| c.rate).collect();
        println!(
            "  {:>17}: {:.0} req/s, server CPU {}/req (client CPU {}/req)",
            s.imp.name(),
            median(&rates),
            us((!cpu.is_empty()).then(|| median(&cpu))),
            us((!client.is_empty()).then(|| median(&client)))
        );
    }
    let Some(n) = find(&servers, Impl::NetRs) else {
        return Ok(());
    };
    let ratios = |f: usize, of: fn(&Cell) -> Option<f64>| -> Vec<f64> {
        (0..args.runs)
            .filter_map(|r| Some(of(&cells[n][r])? / of(&cells[f][r])?))
            .collect()
    };
    let framed: Vec<usize> = (0..servers.len()).filter(|&i| i != n).collect();
    for &f in &framed {
        let rate = ratios(f, |c| Some(c.rate));
        let cpu = ratios(f, |c| c.server_cpu);
        println!(
            "net-rs / {}: req/s per run {}, median {:.3}x; server CPU/req per run {}, median {:.3}x",
            servers[f].imp.name(),
            list(&rate),
            median(&rate),
            list(&cpu),
            median(&cpu),
        );
    }
    let median_rate = |i: usize| median(&cells[i].iter().map(|c| c.rate).collect::<Vec<_>>());
    if let Some(&base) = framed
        .iter()
        .max_by(|&&a, &&b| median_rate(a).total_cmp(&median_rate(b)))
    {
        let m = median(&ratios(base, |c| Some(c.rate)));
        println!(
            "baseline (the faster Framed variant by median req/s): {}; median ratio net-rs / \
             baseline {m:.3}x ({})",
            servers[base].imp.name(),
            if m >= 1.0 {
                "net-rs at least as fast"
            } else {
                "net-rs slower"
            }
        );
    }
    Ok(())
}

/// What one cell measured.
struct Cell {
    /// Requests per second.
    rate: f64,
    /// CPU time of the server's threads per request, in µs (server in this process).
    server_cpu: Option<f64>,
    /// CPU time of the client runtime's threads per request, in µs.
    client_cpu: Option<f64>,
}

/// One measurement: a fresh pool, warm-up (untimed), `requests` timed requests, close.
/// `server_threads`: the thread name of a server in this process, to measure its CPU.
async fn cell(
    addr: SocketAddr,
    server_threads: Option<&str>,
    work: &Arc<Workload>,
    clients: usize,
    requests: u64,
) -> Result<Cell, String> {
    bounded(RUN_TIMEOUT, async {
        let pool = client::pool(addr, clients).map_err(|e| e.to_string())?;
        client::warm_up(&pool, work, clients).await?;
        let server0 = server_threads.and_then(thread_cpu);
        let client0 = thread_cpu(CLIENT_THREADS);
        let elapsed = client::drive(&pool, work, clients, requests).await?;
        let server1 = server_threads.and_then(thread_cpu);
        let client1 = thread_cpu(CLIENT_THREADS);
        bounded(REQUEST_TIMEOUT, pool.close()).await?;
        let per_req = |a: Option<Duration>, b: Option<Duration>| {
            Some((b? - a?).as_secs_f64() * 1e6 / requests as f64)
        };
        Ok(Cell {
            rate: requests as f64 / elapsed.as_secs_f64(),
            server_cpu: per_req(server0, server1),
            client_cpu: per_req(client0, client1),
        })
    })
    .await?
}

/// CPU time used so far by this process's threads called `name` (Linux only: the
/// scheduler's run time from `/proc/self/task/*/schedstat`; `None` elsewhere).
fn thread_cpu(name: &str) -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

fn us(v: Option<f64>) -> String {
    v.map_or_else(|| "? µs".into(), |v| format!("{v:.1} µs"))
}

fn list(xs: &[f64]) -> String {
    xs.iter()
        .map(|r| format!("{r:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("gave up after {limit:?}"))
}

fn start(imp: Impl, addr: &str) -> Result<Server, String> {
    server::start(imp, addr).map_err(|e| format!("{} server on {addr}: {e}", imp.name()))
}

fn find(servers: &[Server], imp: Impl) -> Option<usize> {
    servers.iter().position(|s| s.imp == imp)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
