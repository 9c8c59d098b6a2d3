//! Request/response (`net_rs::rpc`) over the RDMA transport on a real device (feature
//! `rdma`; see `tests/rdma_device.rs` for when these run and when they skip), under
//! `futures::executor::block_on`, tokio, smol and async-std:
//!
//! 1. 64 tasks share one connection, each making 10,000 calls under tokio and 1,000
//!    under the other runtimes (`NET_RS_RPC_CALLS` sets it for all; the Soft-RoCE VM
//!    emulates its CPU: 64 x 1,000 calls take 50-85 s there), with random sizes (some
//!    over one fragment), random timeouts and random cancellations: every reply is its
//!    own call's, every call ends;
//! 2. a slow handler does not hold up fast calls;
//! 3. the server is stopped (its connections closed, its listener dropped) and started
//!    again on the same port under a `Channel` over a pool: every call ends (a reply or
//!    `Unavailable`), and calls succeed again after the restart, by themselves.
//!
//! Every wait is bounded: a regression fails, it does not hang.
#![cfg(all(feature = "rdma", feature = "async-std"))]

mod rdma_env;
use rdma_env::{device_ip, within};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{select, Either};
use net_rs::drivers::rdma::transport::RdmaTransport;
use net_rs::drivers::rdma::{self, RdmaListener};
use net_rs::pool::{ConnectionPool, PoolConfig, RdmaConnector, ReconnectPolicy, Rng};
use net_rs::rpc::{Channel, Client, ClientConfig, Code, Request, Server, ServerConfig, Status};
use net_rs::runtime::Runtime;
use net_rs::transport::Transport;

const ECHO: u16 = 1;
const SLOW: u16 = 2;

/// Calls per task in the shared-connection test (64 tasks) under `rt`.
fn calls_per_task(rt: Rt) -> u64 {
    std::env::var("NET_RS_RPC_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(match rt {
            Rt::Tokio => 10_000,
            _ => 1_000,
        })
}

#[derive(Clone, Copy, Debug)]
enum Rt {
    BlockOn,
    Tokio,
    Smol,
    AsyncStd,
}

const RUNTIMES: [Rt; 4] = [Rt::BlockOn, Rt::Tokio, Rt::Smol, Rt::AsyncStd];

impl Rt {
    /// Run `f` with the matching net-rs runtime (for spawning and timers).
    fn run<T>(
        self,
        f: impl FnOnce(Arc<dyn Runtime>) -> std::pin::Pin<Box<dyn Future<Output = T>>>,
    ) -> T {
        match self {
            Rt::BlockOn => {
                let rt = net_rs::runtime::default_runtime().unwrap();
                futures::executor::block_on(f(rt))
            }
            Rt::Tokio => {
                let t = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                let rt: Arc<dyn Runtime> = Arc::new(net_rs::runtime::tokio::TokioRuntime::new(
                    t.handle().clone(),
                ));
                t.block_on(f(rt))
            }
            Rt::Smol => {
                let rt: Arc<dyn Runtime> =
                    Arc::new(net_rs::runtime::async_io::AsyncIoRuntime::with_spawner(
                        |task| smol::spawn(task).detach(),
                    ));
                smol::block_on(f(rt))
            }
            Rt::AsyncStd => {
                let rt: Arc<dyn Runtime> = Arc::new(
                    net_rs::runtime::async_io::AsyncIoRuntime::with_spawner(|task| {
                        async_std::task::spawn(task);
                    }),
                );
                async_std::task::block_on(f(rt))
            }
        }
    }
}

fn spawn<T: Send + 'static>(
    rt: &Arc<dyn Runtime>,
    fut: impl Future<Output = T> + Send + 'static,
) -> futures::channel::oneshot::Receiver<T> {
    let (tx, rx) = futures::channel::oneshot::channel();
    rt.spawn(Box::pin(async move {
        let _ = tx.send(fut.await);
    }));
    rx
}

fn handler(
    rt: Arc<dyn Runtime>,
) -> impl Fn(Request) -> futures::future::BoxFuture<'static, Result<Bytes, Status>> + Send + Sync + 'static
{
    move |req: Request| {
        let rt = rt.clone();
        Box::pin(async move {
            let p = req.payload().clone();
            match req.method() {
                ECHO => {
                    if p.len() > 1 && p[p.len() - 1] % 8 == 0 {
                        rt.sleep(Duration::from_millis(1)).await;
                    }
                    // The reply built in registered memory: it goes out as it is.
                    let mut r = req.reply_buf(p.len())?;
                    r.copy_from_slice(&p);
                    Ok(r.freeze())
                }
                SLOW => {
                    rt.sleep(Duration::from_millis(1500)).await;
                    Ok(p)
                }
                m => Err(Status::new(Code::Unimplemented, format!("no method {m}"))),
            }
        })
    }
}

/// Accept on `listener` and serve each connection with the test handler until `stop`
/// (then every connection is closed at once, as a stopped server's would be).
fn serve(rt: &Arc<dyn Runtime>, listener: RdmaListener, stop: Arc<AtomicBool>) {
    let rt2 = rt.clone();
    let server = Server::new(ServerConfig::default().runtime(rt.clone()));
    // accept blocks its thread (RDMA-CM): a thread of its own.
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let Ok(conn) = futures::executor::block_on(listener.accept(Duration::from_millis(100)))
            else {
                continue;
            };
            let (s, h, st, rt3) = (
                server.clone(),
                handler(rt2.clone()),
                stop.clone(),
                rt2.clone(),
            );
            rt2.spawn(Box::pin(async move {
                let conn = Arc::new(conn);
                let serving = std::pin::pin!(s.serve_shared(conn.clone(), &h));
                let stopped = std::pin::pin!(async {
                    while !st.load(Ordering::SeqCst) {
                        rt3.sleep(Duration::from_millis(10)).await;
                    }
                });
                if let Either::Right(_) = select(serving, stopped).await {
                    let _ = conn.close().await;
                }
            }));
        }
    });
}

fn listen_on(addr: SocketAddr) -> RdmaListener {
    let start = Instant::now();
    loop {
        match rdma::listen(addr) {
            Ok(l) => return l,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("listen {addr}: {e}; again");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("listen {addr}: {e}"),
        }
    }
}

async fn connect(addr: SocketAddr) -> RdmaTransport {
    rdma::connect(addr, Duration::from_secs(20))
        .await
        .expect("connect")
}

async fn bounded<T>(rt: &Arc<dyn Runtime>, secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match select(std::pin::pin!(f), rt.sleep(Duration::from_secs(secs))).await {
        Either::Left((v, _)) => v,
        Either::Right(_) => panic!("{what}: still waiting after {secs} s"),
    }
}

#[test]
fn rpc_over_rdma_every_reply_to_its_own_call() {
    let Some(ip) = device_ip() else { return };
    for (k, rt) in RUNTIMES.into_iter().enumerate() {
        let addr = SocketAddr::new(ip, 19100 + k as u16);
        let per_task = calls_per_task(rt);
        // About 1 ms per call in the emulated VM: allow 2 ms, plus 2 minutes.
        let limit = 120 + 64 * per_task * 2 / 1000;
        within(limit, &format!("rpc load under {rt:?}"), move || {
            let name = format!("{rt:?}");
            rt.run(move |rt| {
                Box::pin(async move {
                    let stop = Arc::new(AtomicBool::new(false));
                    serve(&rt, listen_on(addr), stop.clone());
                    let c = Client::with_config(
                        connect(addr).await,
                        ClientConfig::default().runtime(rt.clone()),
                    );
                    let ok = Arc::new(AtomicU64::new(0));
                    let gave_up = Arc::new(AtomicU64::new(0));
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for task in 0..64u64 {
                        let (c, rt2, ok, gave_up) = (c.clone(), rt.clone(), ok.clone(), gave_up.clone());
                        tasks.push(spawn(&rt, async move {
                            let mut rng = Rng::new(task + 1);
                            for seq in 0..per_task {
                                // Some requests span fragments (RdmaConfig's 64 KiB).
                                let span = if rng.below(64) == 0 { 100_000 } else { 64 };
                                let len = 16 + rng.below(span) as usize;
                                let mut buf = c.request_buf(len).unwrap();
                                buf[..8].copy_from_slice(&task.to_be_bytes());
                                buf[8..16].copy_from_slice(&seq.to_be_bytes());
                                for (i, b) in buf[16..].iter_mut().enumerate() {
                                    *b = (i as u8) ^ (seq as u8);
                                }
                                let sent = buf.to_vec();
                                let r = match rng.below(20) {
                                    0 => c.call_buf_timeout(ECHO, buf, Some(Duration::from_micros(100 + rng.below(5000)))).await,
                                    1 => {
                                        let call = std::pin::pin!(c.call_buf(ECHO, buf));
                                        let wait = rt2.sleep(Duration::from_micros(rng.below(3000)));
                                        match select(call, wait).await {
                                            Either::Left((r, _)) => r,
                                            Either::Right(_) => Err(Status::new(Code::Cancelled, "given up")),
                                        }
                                    }
                                    _ => c.call_buf(ECHO, buf).await,
                                };
                                match r {
                                    Ok(reply) => {
                                        assert_eq!(&reply[..], &sent[..], "task {task} call {seq}: another call's reply");
                                        ok.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(e) if matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                                        gave_up.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(e) => panic!("task {task} call {seq}: {e}"),
                                }
                            }
                        }));
                    }
                    bounded(&rt, limit - 60, "the 64 tasks", async {
                        for t in tasks {
                            t.await.expect("a task panicked (see above)");
                        }
                    })
                    .await;
                    let (ok, gave_up) = (ok.load(Ordering::Relaxed), gave_up.load(Ordering::Relaxed));
                    eprintln!(
                        "{name}: 64 x {per_task} calls on one RDMA connection: {ok} replies, {gave_up} given up, {:.1} s",
                        start.elapsed().as_secs_f64()
                    );
                    assert_eq!(ok + gave_up, 64 * per_task);
                    assert!(ok > 0 && gave_up > 0, "{ok} replies, {gave_up} given up");
                    stop.store(true, Ordering::SeqCst);
                })
            })
        });
    }
}

#[test]
fn rpc_over_rdma_a_slow_call_does_not_block_fast_ones() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 19110);
    within(120, "slow and fast calls", move || {
        Rt::Tokio.run(move |rt| {
            Box::pin(async move {
                let stop = Arc::new(AtomicBool::new(false));
                serve(&rt, listen_on(addr), stop.clone());
                let c = Client::with_config(
                    connect(addr).await,
                    ClientConfig::default().runtime(rt.clone()),
                );
                let c2 = c.clone();
                let slow = spawn(&rt, async move { c2.call(SLOW, b"slow").await });
                rt.sleep(Duration::from_millis(50)).await;
                let t = Instant::now();
                for i in 0..100u32 {
                    let p = i.to_be_bytes();
                    assert_eq!(&c.call(ECHO, &p).await.unwrap()[..], &p);
                }
                assert!(
                    t.elapsed() < Duration::from_millis(1200),
                    "fast calls waited: {:?}",
                    t.elapsed()
                );
                assert_eq!(
                    &bounded(&rt, 10, "the slow call", slow)
                        .await
                        .unwrap()
                        .unwrap()[..],
                    b"slow"
                );
                stop.store(true, Ordering::SeqCst);
            })
        })
    });
}

#[test]
fn rpc_over_rdma_a_channel_recovers_after_the_server_restarts() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 19111);
    within(180, "server restart under a channel", move || {
        Rt::Tokio.run(move |rt| {
            Box::pin(async move {
                let stop = Arc::new(AtomicBool::new(false));
                serve(&rt, listen_on(addr), stop.clone());
                let pool = ConnectionPool::new(
                    RdmaConnector::new(addr, Duration::from_secs(5)),
                    PoolConfig::default()
                        .max_size(2)
                        .checkout_timeout(Duration::from_secs(5))
                        .reconnect(ReconnectPolicy::fixed(Duration::from_millis(50)))
                        .runtime(rt.clone()),
                )
                .unwrap();
                let channel = Channel::new(pool, 2, ClientConfig::default().timeout(Some(Duration::from_secs(10))));
                let done = Arc::new(AtomicBool::new(false));
                let restarted = Arc::new(AtomicBool::new(false));
                let (ok_after, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
                let mut tasks = Vec::new();
                for task in 0..8u64 {
                    let (ch, done, restarted, ok_after, failed) =
                        (channel.clone(), done.clone(), restarted.clone(), ok_after.clone(), failed.clone());
                    tasks.push(spawn(&rt, async move {
                        let mut seq = 0u64;
                        while !done.load(Ordering::SeqCst) {
                            seq += 1;
                            let mut p = task.to_be_bytes().to_vec();
                            p.extend_from_slice(&seq.to_be_bytes());
                            let t = Instant::now();
                            let r = ch.call(ECHO, &p).await;
                            assert!(t.elapsed() < Duration::from_secs(16), "a call took {:?}", t.elapsed());
                            match r {
                                Ok(reply) => {
                                    assert_eq!(&reply[..], &p[..]);
                                    if restarted.load(Ordering::SeqCst) {
                                        ok_after.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                                Err(e) => {
                                    assert_eq!(e.code(), Code::Unavailable, "{e}");
                                    failed.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                        }
                    }));
                }
                rt.sleep(Duration::from_millis(500)).await;
                stop.store(true, Ordering::SeqCst);
                rt.sleep(Duration::from_millis(500)).await;
                let stop2 = Arc::new(AtomicBool::new(false));
                serve(&rt, listen_on(addr), stop2.clone());
                restarted.store(true, Ordering::SeqCst);
                bounded(&rt, 60, "calls after the restart", async {
                    while ok_after.load(Ordering::SeqCst) < 100 {
                        rt.sleep(Duration::from_millis(10)).await;
                    }
                })
                .await;
                done.store(true, Ordering::SeqCst);
                bounded(&rt, 30, "the calling tasks", async {
                    for t in tasks {
                        t.await.expect("a task panicked (see above)");
                    }
                })
                .await;
                eprintln!(
                    "restart under a channel: {} calls failed Unavailable, {} replies after the restart",
                    failed.load(Ordering::SeqCst),
                    ok_after.load(Ordering::SeqCst)
                );
                stop2.store(true, Ordering::SeqCst);
            })
        })
    });
}
