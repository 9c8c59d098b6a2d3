//! The gRPC table (`--only grpc`; with `--transport rdma --addr IP:PORT` also over RDMA,
//! for the Soft-RoCE VM): unary echo calls of tonic over net-rs next to tonic over its
//! own TCP transport and a bare net-rs echo on the same transport, in the harness of
//! `rpc_baselines.rs` ([`drive`]: the same warm-up, checks, bounds and statistics),
//! sizes 64 B and 8 KiB unless `--sizes`, 1 and 64 calls in flight on one connection.
//!
//! Rows:
//! - `tonic`: tonic's own TCP (`Endpoint::connect`, `TcpIncoming`, TCP_NODELAY);
//! - `tonic/net-rs tcp`, `tonic/net-rs rdma`: the same service and client over
//!   net-rs's byte stream (`net_rs::grpc`: `GrpcConnector` through a pool,
//!   `tcp_incoming` / `rdma_incoming`);
//! - `bare tcp`, `bare rdma`: net-rs messages without HTTP/2 or gRPC: each call sends
//!   its payload and takes the next reply of an echo that answers in order (calls
//!   queue their reply slots in the order they sent, under one lock): what the
//!   transport gives a protocol that needs nothing else.
//!
//! `cpu µs/call`: the process's CPU time (user + system, client and server together:
//! they run in this process) over the cell, divided by every call made in it (warm-up
//! included); connect and teardown are in it too, spread over thousands of calls.
//!
//! Each cell: a server thread and a client thread, each with a current-thread tokio
//! runtime (tonic needs tokio), on a fresh connection (RDMA: on `--addr`'s port + the
//! cell's number).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use net_rs::grpc::GrpcConnector;
use net_rs::pool::{ConnectionPool, Connector, PoolConfig, TcpConnector};
use net_rs::transport::Transport;

use crate::contender::current_thread;
use crate::rpc_baselines::{drive, tonic_echo, tonic_unary, RpcResult};
use crate::{fmt_size, Args};

const IN_FLIGHT: [usize; 2] = [1, 64];
/// The longest a cell's thread may run beyond its duration.
const BOUND: Duration = Duration::from_secs(60);

/// Which transport a net-rs row runs on.
#[derive(Clone, Copy)]
enum Net {
    Tcp,
    /// The device IP (and a base port) to listen and connect on.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    Rdma(SocketAddr),
}

/// The process's CPU time so far (user + system, every thread), from `/proc/self/stat`
/// (in the kernel's clock ticks of 10 ms: a cell's few hundred ms of CPU are measured
/// to a few percent).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses and may hold spaces):
    // utime and stime are the 14th and 15th fields of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// Run `server` and `client` (which gets the address the server said it listens on)
/// on threads of their own, bounded; `stop` resolves in the server once the client is
/// done.
fn two_threads<S, SF, C, CF>(server: S, client: C) -> Result<RpcResult, String>
where
    S: FnOnce(oneshot::Sender<SocketAddr>, oneshot::Receiver<()>) -> SF + Send + 'static,
    SF: Future<Output = Result<(), String>>,
    C: FnOnce(SocketAddr) -> CF + Send + 'static,
    CF: Future<Output = Result<RpcResult, String>>,
{
    let (tell, told) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let s = std::thread::spawn(move || {
        current_thread().block_on(async move {
            match tokio::time::timeout(BOUND * 2, server(tell, stop_rx)).await {
                Ok(r) => r,
                Err(_) => Err("server: still running".to_string()),
            }
        })
    });
    let c = std::thread::spawn(move || {
        let r = current_thread().block_on(async move {
            let addr = told
                .await
                .map_err(|_| "the server ended before it listened".to_string())?;
            match tokio::time::timeout(BOUND, client(addr)).await {
                Ok(r) => r,
                Err(_) => Err("client: still running".to_string()),
            }
        });
        let _ = stop_tx.send(());
        r
    });
    let r = c.join().map_err(|_| "client thread panicked".to_string())?;
    s.join()
        .map_err(|_| "server thread panicked".to_string())??;
    r
}

/// A tonic channel whose one connection comes through a net-rs pool of `connector`'s.
async fn channel<C: Connector>(connector: C) -> Result<tonic::transport::Channel, String> {
    let pool = ConnectionPool::new(
        connector,
        PoolConfig::default().checkout_timeout(Duration::from_secs(20)),
    )
    .map_err(|e| e.to_string())?;
    tonic_echo::endpoint("http://netperf")?
        .connect_with_connector(GrpcConnector::new(pool))
        .await
        .map_err(|e| format!("tonic connect over net-rs: {e}"))
}

/// tonic over net-rs on `net`.
fn tonic_netrs(net: Net, size: usize, n: usize, d: Duration) -> Result<RpcResult, String> {
    match net {
        Net::Tcp => two_threads(
            |tell, stop| async move {
                let l = net_rs::drivers::tcp::TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = tell.send(l.local_addr().map_err(|e| e.to_string())?);
                tonic_echo::serve_incoming(net_rs::grpc::tcp_incoming(l), async {
                    let _ = stop.await;
                })
                .await
            },
            move |addr| async move {
                let call = tonic_echo::caller(channel(TcpConnector::new(addr)).await?);
                drive(size, n, d, call).await
            },
        ),
        #[cfg(feature = "rdma")]
        Net::Rdma(addr) => two_threads(
            move |tell, stop| async move {
                let l = net_rs::drivers::rdma::listen(addr).map_err(|e| e.to_string())?;
                let _ = tell.send(addr);
                tonic_echo::serve_incoming(net_rs::grpc::rdma_incoming(l), async {
                    let _ = stop.await;
                })
                .await
            },
            move |addr| async move {
                let c = net_rs::pool::RdmaConnector::new(addr, Duration::from_secs(20));
                let call = tonic_echo::caller(channel(c).await?);
                drive(size, n, d, call).await
            },
        ),
        #[cfg(not(feature = "rdma"))]
        Net::Rdma(_) => Err("built without the `rdma` feature".into()),
    }
}

/// The echo of the bare rows: each message back as it came, in order, until the end.
async fn echo<T: Transport>(t: T, stop: oneshot::Receiver<()>) -> Result<(), String> {
    let run = async {
        while let Ok(m) = t.recv().await {
            if t.send(m).await.is_err() {
                break;
            }
        }
    };
    futures::future::select(std::pin::pin!(run), stop).await;
    Ok(())
}

/// The bare rows' client: calls share `t`; each sends and queues its reply slot under
/// one lock (so slots are in send order), and a reader task hands each reply to the
/// oldest slot.
async fn bare_client<T: Transport>(
    t: T,
    size: usize,
    n: usize,
    d: Duration,
) -> Result<RpcResult, String> {
    type Slots = Arc<Mutex<VecDeque<oneshot::Sender<Bytes>>>>;
    let t = Arc::new(t);
    let slots: Slots = Arc::default();
    let send_lock = Arc::new(tokio::sync::Mutex::new(()));
    let (r, s) = (t.clone(), slots.clone());
    let reader = tokio::spawn(async move {
        while let Ok(m) = r.recv().await {
            let slot = s.lock().unwrap().pop_front();
            match slot {
                Some(tx) => {
                    let _ = tx.send(m);
                }
                None => return Err("a reply nobody waited for".to_string()),
            }
        }
        Ok(())
    });
    let call = move |p: Bytes| {
        let (t, slots, send_lock) = (t.clone(), slots.clone(), send_lock.clone());
        async move {
            let (tx, rx) = oneshot::channel();
            {
                let _g = send_lock.lock().await;
                slots.lock().unwrap().push_back(tx);
                t.send(p).await.map_err(|e| e.to_string())?;
            }
            rx.await.map_err(|_| "the connection ended".to_string())
        }
    };
    let r = drive(size, n, d, call).await;
    reader.abort();
    r
}

/// The bare net-rs echo on `net`.
fn bare(net: Net, size: usize, n: usize, d: Duration) -> Result<RpcResult, String> {
    match net {
        Net::Tcp => two_threads(
            |tell, stop| async move {
                let l = net_rs::drivers::tcp::TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = tell.send(l.local_addr().map_err(|e| e.to_string())?);
                let t = l.accept().await.map_err(|e| e.to_string())?;
                echo(t, stop).await
            },
            move |addr| async move {
                let t = net_rs::drivers::tcp::TcpTransport::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                bare_client(t, size, n, d).await
            },
        ),
        #[cfg(feature = "rdma")]
        Net::Rdma(addr) => two_threads(
            move |tell, stop| async move {
                let l = net_rs::drivers::rdma::listen(addr).map_err(|e| e.to_string())?;
                let _ = tell.send(addr);
                let t = l
                    .accept(Duration::from_secs(20))
                    .await
                    .map_err(|e| e.to_string())?;
                echo(t, stop).await
            },
            move |addr| async move {
                let t = net_rs::drivers::rdma::connect(addr, Duration::from_secs(20))
                    .await
                    .map_err(|e| e.to_string())?;
                bare_client(t, size, n, d).await
            },
        ),
        #[cfg(not(feature = "rdma"))]
        Net::Rdma(_) => Err("built without the `rdma` feature".into()),
    }
}

/// A row's cell, ready to run.
type Row<'a> = Box<dyn Fn() -> Result<RpcResult, String> + 'a>;

pub fn run(args: &Args) {
    let sizes = &args.sizes;
    let rdma = if args.transport == "rdma" {
        match args.addr {
            Some(a) => Some(a),
            None => {
                eprintln!("netperf: --transport rdma --only grpc needs --addr <device IP>:PORT");
                std::process::exit(2);
            }
        }
    } else {
        None
    };
    println!(
        "\nunary echo gRPC (tonic): one connection, N calls in flight, {} ms per cell",
        args.duration.as_millis()
    );
    println!(
        "{:>8} | {:>9} | {:>18} | {:>9} | {:>8} | {:>8} | {:>12}",
        "size", "in flight", "impl", "req/s", "p50 µs", "p99 µs", "cpu µs/call"
    );
    let mut port = 0u16;
    // (size, in flight, row) -> (req/s, p99)
    let mut seen: Vec<(usize, usize, String, f64, f64)> = Vec::new();
    for &size in sizes {
        for n in IN_FLIGHT {
            let mut rows: Vec<(String, Row<'_>)> = vec![
                (
                    "tonic".into(),
                    Box::new(move || tonic_unary(size, n, args.duration)),
                ),
                (
                    "tonic/net-rs tcp".into(),
                    Box::new(move || tonic_netrs(Net::Tcp, size, n, args.duration)),
                ),
                (
                    "bare tcp".into(),
                    Box::new(move || bare(Net::Tcp, size, n, args.duration)),
                ),
            ];
            if let Some(a) = rdma {
                for (name, grpc) in [("tonic/net-rs rdma", true), ("bare rdma", false)] {
                    port += 1;
                    let at = SocketAddr::new(a.ip(), a.port() + port);
                    rows.push((
                        name.into(),
                        Box::new(move || {
                            if grpc {
                                tonic_netrs(Net::Rdma(at), size, n, args.duration)
                            } else {
                                bare(Net::Rdma(at), size, n, args.duration)
                            }
                        }),
                    ));
                }
            }
            for (name, cell) in rows {
                let cpu0 = cpu_time();
                match cell() {
                    Ok(r) => {
                        let cpu =
                            (cpu_time() - cpu0).as_secs_f64() * 1e6 / r.all_calls.max(1) as f64;
                        println!(
                            "{:>8} | {:>9} | {:>18} | {:>9.0} | {:>8.1} | {:>8.1} | {:>12.1}",
                            fmt_size(size),
                            n,
                            name,
                            r.requests_per_sec,
                            r.p50_us,
                            r.p99_us,
                            cpu
                        );
                        seen.push((size, n, name, r.requests_per_sec, r.p99_us));
                    }
                    Err(e) => println!(
                        "{:>8} | {:>9} | {:>18} | FAILED: {e}",
                        fmt_size(size),
                        n,
                        name
                    ),
                }
            }
        }
    }
    let find = |size: usize, n: usize, name: &str| {
        seen.iter()
            .find(|c| c.0 == size && c.1 == n && c.2 == name)
            .map(|c| (c.3, c.4))
    };
    println!("\ngRPC targets (ratios within this run):");
    for &size in sizes {
        for n in IN_FLIGHT {
            let s = fmt_size(size);
            if let (Some(x), Some(t)) = (find(size, n, "tonic/net-rs tcp"), find(size, n, "tonic"))
            {
                println!(
                    "{s:>8} x {n:>2}: tonic over net-rs TCP {:.2}x tonic's own TCP req/s (target >= 1.0), p99 {:.2}x (target <= 1.0)",
                    x.0 / t.0,
                    x.1 / t.1
                );
            }
            for net in ["tcp", "rdma"] {
                if let (Some(g), Some(b)) = (
                    find(size, n, &format!("tonic/net-rs {net}")),
                    find(size, n, &format!("bare {net}")),
                ) {
                    println!(
                        "{s:>8} x {n:>2}: tonic over net-rs {net} {:.2}x the bare net-rs {net} echo's req/s (target >= 0.7)",
                        g.0 / b.0
                    );
                }
            }
        }
    }
}
