//! `--transport rdma --only rpc`: `net_rs::rpc` over the RDMA transport on one device,
//! next to the bare `send`/`recv` round trip on the same transport (1 in flight), in
//! the harness of `rpc_baselines.rs` ([`drive`]: the same warm-up, checks, bounds and
//! statistics as the TCP table). tonic and tarpc have no RDMA transport: the baseline
//! here is the transport itself.
//!
//! Each cell: a server thread (a current-thread tokio runtime, `Server::serve_connection`
//! with an echo handler, or an echo loop) and a client thread (a current-thread tokio
//! runtime, `in_flight` tasks sharing one `Client`), on a port of its own (`--addr`'s
//! port + the cell's number). Requests are built in the transport's registered memory
//! (`Client::request_buf`), so they go out without another copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use net_rs::drivers::rdma::{self, RdmaListener};
use net_rs::rpc::{Client, Request, Server, Status};
use net_rs::transport::Transport;

use crate::contender::current_thread;
use crate::rpc_baselines::{drive, RpcResult};
use crate::{fmt_size, Args};

const ECHO: u16 = 1;
const IN_FLIGHT: [usize; 3] = [1, 16, 256];
const BOUND: Duration = Duration::from_secs(60);

/// One cell: `rpc` or the bare round trip, on `addr`.
fn cell(
    addr: SocketAddr,
    size: usize,
    in_flight: usize,
    duration: Duration,
    rpc: bool,
) -> Result<RpcResult, String> {
    let listener: RdmaListener = rdma::listen(addr).map_err(|e| format!("listen {addr}: {e}"))?;
    let server = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let conn = listener
                .accept(Duration::from_secs(20))
                .await
                .map_err(|e| format!("accept: {e}"))?;
            if rpc {
                // The reply built in registered memory (`reply_buf`): one copy of the
                // payload, by the handler (the bare echo sends back the received
                // message itself).
                let echo = |req: Request| async move {
                    let mut r = req.reply_buf(req.payload().len())?;
                    r.copy_from_slice(req.payload());
                    Ok::<_, Status>(r.freeze())
                };
                let conn = Arc::new(conn);
                // Ends when the client closes its side.
                let _ = Server::default().serve_shared(conn.clone(), &echo).await;
            } else {
                while let Ok(m) = conn.recv().await {
                    if conn.send(m).await.is_err() {
                        break;
                    }
                }
            }
            Ok::<(), String>(())
        })
    });
    let client = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let t = rdma::connect(addr, Duration::from_secs(20))
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let r = if rpc {
                let c = Client::new(t);
                let r = drive(size, in_flight, duration, {
                    let c = c.clone();
                    move |p: Bytes| {
                        let c = c.clone();
                        async move {
                            let mut buf = c.request_buf(p.len()).map_err(|e| e.to_string())?;
                            buf.copy_from_slice(&p);
                            c.call_buf(ECHO, buf).await.map_err(|e| e.to_string())
                        }
                    }
                })
                .await;
                let _ = c.transport().close().await;
                r
            } else {
                let t = Arc::new(t);
                let r = drive(size, 1, duration, {
                    let t = t.clone();
                    move |p: Bytes| {
                        let t = t.clone();
                        async move {
                            let mut buf = t.alloc_buf(p.len()).map_err(|e| e.to_string())?;
                            buf.copy_from_slice(&p);
                            t.send(buf.freeze()).await.map_err(|e| e.to_string())?;
                            t.recv().await.map_err(|e| e.to_string())
                        }
                    }
                })
                .await;
                let _ = t.close().await;
                r
            };
            r
        })
    });
    let r = joined(client, "client");
    joined(server, "server")?;
    r
}

/// Join `h` within [`BOUND`] (an error if it runs on or panicked).
fn joined<T>(h: std::thread::JoinHandle<Result<T, String>>, what: &str) -> Result<T, String> {
    let start = std::time::Instant::now();
    while !h.is_finished() {
        if start.elapsed() > BOUND {
            return Err(format!("{what}: still running after {BOUND:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().map_err(|_| format!("{what} panicked"))?
}

/// The RDMA RPC table and the 1-in-flight ratio to the bare round trip.
pub fn run(args: &Args) -> Result<(), String> {
    let base = args
        .addr
        .ok_or("--transport rdma needs --addr <IP of the RDMA device>:<port>")?;
    println!("machine: {}", crate::machine());
    println!(
        "netperf: unary echo RPC over RDMA (RC send/recv) on {base}: one connection, N calls in \
         flight, client and server threads with current-thread tokio runtimes"
    );
    println!(
        "{:>8} | {:>9} | {:>8} | {:>10} | {:>9} | {:>9} | {:>9}",
        "size", "in flight", "impl", "req/s", "p50 µs", "p99 µs", "calls"
    );
    let mut port = base.port();
    let mut next = || {
        port = port.wrapping_add(1);
        SocketAddr::new(base.ip(), port)
    };
    let mut ratios = Vec::new();
    for &size in &args.sizes {
        let mut bare_p50 = None;
        for in_flight in IN_FLIGHT {
            let rows: &[(&str, bool)] = if in_flight == 1 {
                &[("bare", false), ("net-rs", true)]
            } else {
                &[("net-rs", true)]
            };
            for &(name, rpc) in rows {
                match cell(next(), size, in_flight, args.duration, rpc) {
                    Ok(r) => {
                        println!(
                            "{:>8} | {:>9} | {:>8} | {:>10.0} | {:>9.1} | {:>9.1} | {:>9}",
                            fmt_size(size),
                            in_flight,
                            name,
                            r.requests_per_sec,
                            r.p50_us,
                            r.p99_us,
                            r.calls
                        );
                        match (name, bare_p50) {
                            ("bare", _) => bare_p50 = Some(r.p50_us),
                            ("net-rs", Some(b)) if in_flight == 1 => {
                                ratios.push((size, r.p50_us / b))
                            }
                            _ => {}
                        }
                    }
                    Err(e) => println!(
                        "{:>8} | {:>9} | {:>8} | FAILED: {e}",
                        fmt_size(size),
                        in_flight,
                        name
                    ),
                }
            }
        }
    }
    for (size, r) in ratios {
        println!(
            "{:>8}: 1 in flight, net-rs median round trip {r:.2}x the bare send/recv's (target <= 1.1)",
            fmt_size(size)
        );
    }
    Ok(())
}
