//! The request/response suite (`net_rs::rpc`) over TCP, written once against
//! `Arc<dyn Runtime>` and run under every runtime by `rpc_tokio.rs` and
//! `rpc_async_io.rs`. Every wait is bounded (`deadline`): a regression fails, never
//! hangs.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{select, Either};
use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::pool::Rng;
use net_rs::rpc::{Client, ClientConfig, Code, Request, Server, ServerConfig, Status};
use net_rs::runtime::Runtime;
use net_rs::transport::Transport;

pub use crate::common::{deadline, spawn};

const ECHO: u16 = 1;
const SLOW: u16 = 2;
/// Never answers by itself (only a cancel, a deadline or the end of the connection
/// ends it); counts its drops.
const HANG: u16 = 3;
/// Panics in the handler.
const PANIC: u16 = 4;
/// Replies with the payload reversed, built in place (`Request::reply_buf`).
const IN_PLACE: u16 = 5;

fn config(rt: &Arc<dyn Runtime>) -> TcpConfig {
    TcpConfig::default().runtime(rt.clone())
}

/// What the test server's handler counts.
#[derive(Default)]
struct Counts {
    started: AtomicUsize,
    dropped: AtomicUsize,
}

struct DropCount(Arc<Counts>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// The test handler: ECHO returns the payload (after a short sleep for 1 request in 8,
/// so replies come out of order); SLOW sleeps the milliseconds its payload says, then
/// echoes; HANG waits forever.
fn handler(
    rt: Arc<dyn Runtime>,
    counts: Arc<Counts>,
) -> impl Fn(Request) -> futures::future::BoxFuture<'static, Result<Bytes, Status>> + Send + Sync + 'static
{
    move |req: Request| {
        let rt = rt.clone();
        let counts = counts.clone();
        Box::pin(async move {
            counts.started.fetch_add(1, Ordering::SeqCst);
            let _d = DropCount(counts.clone());
            let p = req.payload().clone();
            match req.method() {
                ECHO => {
                    if p.len() > 1 && p[p.len() - 1] % 8 == 0 {
                        rt.sleep(Duration::from_millis(1)).await;
                    }
                    Ok(p)
                }
                SLOW => {
                    let ms = u64::from_be_bytes(p[..8].try_into().unwrap());
                    rt.sleep(Duration::from_millis(ms)).await;
                    Ok(p)
                }
                HANG => {
                    futures::future::pending::<()>().await;
                    unreachable!()
                }
                PANIC => panic!("the handler fails on purpose"),
                IN_PLACE => {
                    let mut r = req.reply_buf(p.len())?;
                    for (o, i) in r.iter_mut().zip(p.iter().rev()) {
                        *o = *i;
                    }
                    Ok(r.freeze())
                }
                m => Err(Status::new(Code::Unimplemented, format!("no method {m}"))),
            }
        })
    }
}

/// A server on a fresh port with its own accept loop; its address, the server and the
/// handler's counts. `stop` ends the accept loop and every connection at once (as a
/// killed process would).
struct TestServer {
    addr: std::net::SocketAddr,
    server: Server,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

async fn start_server(rt: &Arc<dyn Runtime>, cfg: ServerConfig) -> TestServer {
    let l = TcpListener::bind_with("127.0.0.1:0", &config(rt))
        .await
        .unwrap();
    serve_on(rt, l, cfg)
}

fn serve_on(rt: &Arc<dyn Runtime>, l: TcpListener, cfg: ServerConfig) -> TestServer {
    let addr = l.local_addr().unwrap();
    let server = Server::new(cfg.runtime(rt.clone()));
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (s, c, st, rt2) = (server.clone(), counts.clone(), stop.clone(), rt.clone());
    rt.spawn(Box::pin(async move {
        loop {
            let accepted = {
                let a = std::pin::pin!(l.accept());
                match select(a, rt2.sleep(Duration::from_millis(50))).await {
                    Either::Left((r, _)) => Some(r),
                    Either::Right(_) => None,
                }
            };
            if st.load(Ordering::SeqCst) {
                return;
            }
            let Some(Ok(conn)) = accepted else { continue };
            let (s, h, st, rt3) = (
                s.clone(),
                handler(rt2.clone(), c.clone()),
                st.clone(),
                rt2.clone(),
            );
            rt2.spawn(Box::pin(async move {
                // Shared, so handlers can build replies in the transport's memory.
                let conn = Arc::new(conn);
                let serve = std::pin::pin!(s.serve_shared(conn.clone(), &h));
                // Stopped: drop everything at once and reset the connection.
                let stopped = async {
                    while !st.load(Ordering::SeqCst) {
                        rt3.sleep(Duration::from_millis(10)).await;
                    }
                };
                let stopped = std::pin::pin!(stopped);
                if let Either::Right(_) = select(serve, stopped).await {
                    let _ = conn.close().await;
                }
            }));
        }
    }));
    TestServer {
        addr,
        server,
        counts,
        stop,
    }
}

async fn client(
    rt: &Arc<dyn Runtime>,
    addr: std::net::SocketAddr,
    cfg: ClientConfig,
) -> Client<TcpTransport> {
    let t = TcpTransport::connect_with(addr, &config(rt)).await.unwrap();
    Client::with_config(t, cfg.runtime(rt.clone()))
}

fn slow(ms: u64) -> Vec<u8> {
    ms.to_be_bytes().to_vec()
}

/// The README's shape: one call, its reply; an unknown method is `Unimplemented` and
/// the connection goes on.
pub async fn a_call_gets_its_reply(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let c = client(&rt, s.addr, ClientConfig::default()).await;
        assert_eq!(&c.call(ECHO, b"hello").await.unwrap()[..], b"hello");
        let e = c.call(99, b"x").await.unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e}");
        assert_eq!(&c.call(ECHO, b"").await.unwrap()[..], b"");
        // A reply built in place, of every size up to the largest message.
        for len in [0usize, 1, 100, 70_000, (8 << 20) - 16] {
            let p: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let r = c.call(IN_PLACE, &p).await.unwrap();
            assert!(
                r.iter().eq(p.iter().rev()),
                "a {len}-byte reply built in place"
            );
        }
        let e = c
            .call(IN_PLACE, &vec![0u8; (8 << 20) - 15])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        // A handler that panics fails its own call; the connection goes on.
        let e = c.call(PANIC, b"").await.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e}");
        assert!(e.message().contains("on purpose"), "{e}");
        assert_eq!(&c.call(ECHO, b"still").await.unwrap()[..], b"still");
        // A request in a buffer of the transport's memory: no copy.
        let mut buf = c.request_buf(3).unwrap();
        buf.copy_from_slice(b"abc");
        assert_eq!(&c.call_buf(ECHO, buf).await.unwrap()[..], b"abc");
        assert_eq!(c.in_flight(), 0);
    })
    .await
}

/// 64 tasks share one connection; random sizes, timeouts and cancellations: every
/// reply that arrives is its own call's, and every call ends.
pub async fn many_tasks_one_connection_every_reply_to_its_own_call(rt: Arc<dyn Runtime>) {
    let per_task: u64 = std::env::var("NET_RS_RPC_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let tasks = 64u64;
    let s = start_server(&rt, ServerConfig::default()).await;
    let c = client(&rt, s.addr, ClientConfig::default()).await;
    let ok = Arc::new(AtomicU64::new(0));
    let gave_up = Arc::new(AtomicU64::new(0));
    let mut done = Vec::new();
    for task in 0..tasks {
        let (c, rt2, ok, gave_up) = (c.clone(), rt.clone(), ok.clone(), gave_up.clone());
        done.push(spawn(&rt, async move {
            let mut rng = Rng::new(task);
            for seq in 0..per_task {
                // The payload names its call: task, sequence number, then filler.
                let span = if rng.below(16) == 0 { 4096 } else { 48 };
                let len = 16 + rng.below(span) as usize;
                let mut p = vec![0u8; len];
                p[..8].copy_from_slice(&task.to_be_bytes());
                p[8..16].copy_from_slice(&seq.to_be_bytes());
                for (i, b) in p[16..].iter_mut().enumerate() {
                    *b = (i as u8) ^ (seq as u8);
                }
                let r = match rng.below(20) {
                    // A timeout, sometimes shorter than the round trip.
                    0 => {
                        c.call_timeout(ECHO, &p, Some(Duration::from_micros(50 + rng.below(2000))))
                            .await
                    }
                    // Given up by the caller (a select! that picks another branch).
                    1 => {
                        let call = std::pin::pin!(c.call(ECHO, &p));
                        let wait = rt2.sleep(Duration::from_micros(rng.below(1500)));
                        match select(call, wait).await {
                            Either::Left((r, _)) => r,
                            Either::Right(_) => Err(Status::new(Code::Cancelled, "given up")),
                        }
                    }
                    _ => c.call(ECHO, &p).await,
                };
                match r {
                    Ok(reply) => {
                        assert_eq!(
                            &reply[..],
                            &p[..],
                            "task {task} call {seq} got another call's reply"
                        );
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
    let start = Instant::now();
    let all = futures::future::join_all(done);
    let limit = Duration::from_secs(240);
    match select(std::pin::pin!(all), rt.sleep(limit)).await {
        Either::Left((rs, _)) => {
            for r in rs {
                r.expect("a task panicked (see above)");
            }
        }
        Either::Right(_) => panic!("64 x {per_task} calls did not end within {limit:?}"),
    }
    let (ok, gave_up) = (ok.load(Ordering::Relaxed), gave_up.load(Ordering::Relaxed));
    eprintln!(
        "{tasks} x {per_task} calls on one connection: {ok} replies, {gave_up} given up, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(ok + gave_up, tasks * per_task);
    assert!(ok > tasks * per_task / 2, "too few replies: {ok}");
    assert!(
        gave_up > 0,
        "no call was given up: the test did not test that"
    );
    // The given-up calls' slots come back as their late answers are read.
    deadline(&rt, async {
        loop {
            c.call(ECHO, b"last").await.unwrap();
            if c.in_flight() == 0 {
                break;
            }
            rt.sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// A slow call does not hold up fast ones on the same connection (out-of-order
/// completion).
pub async fn a_slow_handler_does_not_block_fast_ones(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let c = client(&rt, s.addr, ClientConfig::default()).await;
        let c2 = c.clone();
        let slow_call = spawn(&rt, async move { c2.call(SLOW, &slow(1500)).await });
        rt.sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        for i in 0..100u32 {
            let p = i.to_be_bytes();
            assert_eq!(&c.call(ECHO, &p).await.unwrap()[..], &p);
        }
        assert!(
            t.elapsed() < Duration::from_millis(1200),
            "fast calls waited for the slow one: {:?}",
            t.elapsed()
        );
        assert_eq!(&slow_call.await.unwrap().unwrap()[..], &slow(1500)[..]);
    })
    .await
}

/// A timeout ends the call with `DeadlineExceeded` at its time, the server stops the
/// handler (the budget travels with the request), and the connection goes on.
pub async fn a_timeout_ends_the_call_and_the_server_work(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let c = client(&rt, s.addr, ClientConfig::default().send_cancels(false)).await;
        let t = Instant::now();
        let e = c
            .call_timeout(HANG, b"", Some(Duration::from_millis(200)))
            .await
            .unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // Without a cancel, the server's own deadline drops the handler.
        let t = Instant::now();
        while s.counts.dropped.load(Ordering::SeqCst) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the handler ran on past its deadline"
            );
            rt.sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(&c.call(ECHO, b"after").await.unwrap()[..], b"after");
        assert_eq!(c.in_flight(), 0, "the late answer was read and discarded");
    })
    .await
}

/// A call dropped by its caller is cancelled on the server (the cancel goes out with
/// the next call), and its late answer reaches nobody.
pub async fn a_dropped_call_is_cancelled_on_the_server(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let c = client(&rt, s.addr, ClientConfig::default()).await;
        {
            let call = std::pin::pin!(c.call(HANG, b"x"));
            let r = select(call, rt.sleep(Duration::from_millis(100))).await;
            assert!(matches!(r, Either::Right(_)), "a HANG call returned");
        }
        assert_eq!(
            c.in_flight(),
            1,
            "the given-up call keeps its slot until answered"
        );
        assert_eq!(&c.call(ECHO, b"next").await.unwrap()[..], b"next");
        let t = Instant::now();
        while s.counts.dropped.load(Ordering::SeqCst) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the cancel did not stop the handler"
            );
            rt.sleep(Duration::from_millis(5)).await;
        }
        // Its `Cancelled` answer comes back and frees the slot.
        let t = Instant::now();
        loop {
            c.call(ECHO, b"more").await.unwrap();
            if c.in_flight() == 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the cancelled call's slot never came back"
            );
            rt.sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// A request that waited behind the server's limit until its budget ran out is not
/// started.
pub async fn a_request_past_its_deadline_is_not_started(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(
            &rt,
            ServerConfig::default().max_concurrent_per_connection(1),
        )
        .await;
        let c = client(&rt, s.addr, ClientConfig::default().send_cancels(false)).await;
        let c2 = c.clone();
        let busy = spawn(&rt, async move { c2.call(SLOW, &slow(600)).await });
        rt.sleep(Duration::from_millis(100)).await;
        assert_eq!(s.counts.started.load(Ordering::SeqCst), 1);
        let e = c
            .call_timeout(ECHO, b"late", Some(Duration::from_millis(100)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded);
        busy.await.unwrap().unwrap();
        // The late request's answer (not started) arrives; it was never run.
        c.call(ECHO, b"x").await.unwrap();
        assert_eq!(
            s.counts.started.load(Ordering::SeqCst),
            2,
            "the request whose budget ran out while it waited was started anyway"
        );
    })
    .await
}

/// The window: at most `max_in_flight` calls are open; more wait, none is lost.
pub async fn calls_beyond_the_window_wait_for_a_slot(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let c = client(&rt, s.addr, ClientConfig::default().max_in_flight(4)).await;
        let mut calls = Vec::new();
        for i in 0..32u64 {
            let c2 = c.clone();
            calls.push(spawn(
                &rt,
                async move { c2.call(SLOW, &slow(20 + i % 3)).await },
            ));
        }
        rt.sleep(Duration::from_millis(10)).await;
        assert!(c.in_flight() <= 4, "{} open", c.in_flight());
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(c.in_flight(), 0);
    })
    .await
}

/// Every slot held by a given-up call: the late answers are read by the callers that
/// wait for a slot (no call of the given-up ones is left to read them), so the client
/// goes on. Both ways of giving up: the call's own timeout, and dropping the call.
pub async fn a_window_of_given_up_calls_frees_itself(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        for window in [1usize, 4, 256] {
            let c = client(
                &rt,
                s.addr,
                ClientConfig::default()
                    .max_in_flight(window)
                    .send_cancels(false),
            )
            .await;
            let mut gone = Vec::new();
            for k in 0..window {
                let c2 = c.clone();
                let rt2 = rt.clone();
                gone.push(spawn(&rt, async move {
                    // A timeout's budget reaches the server, which answers at once when
                    // it runs out: those slots may come back sooner.
                    if k == 0 {
                        let r = c2
                            .call_timeout(SLOW, &slow(100), Some(Duration::from_millis(20)))
                            .await;
                        assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);
                    } else {
                        let p = slow(100);
                        let call = std::pin::pin!(c2.call(SLOW, &p));
                        let r = select(call, rt2.sleep(Duration::from_millis(20))).await;
                        assert!(
                            matches!(r, Either::Right(_)),
                            "a 100 ms call returned in 20 ms"
                        );
                    }
                }));
            }
            for g in gone {
                g.await.unwrap();
            }
            // The answers come in some 80 ms later: nobody waits for them.
            rt.sleep(Duration::from_millis(200)).await;
            assert!(
                c.in_flight() >= window.saturating_sub(1),
                "{} slots taken",
                c.in_flight()
            );
            let t = Instant::now();
            assert_eq!(&c.call(ECHO, b"next").await.unwrap()[..], b"next");
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "window {window}: {:?}",
                t.elapsed()
            );
        }
    })
    .await
}

/// A client that goes away (its calls and itself dropped: the connection closed, no
/// cancel sent) frees its running handlers and the server's limits.
pub async fn a_client_that_leaves_frees_its_handlers(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default().max_concurrent(4)).await;
        {
            let c = client(&rt, s.addr, ClientConfig::default()).await;
            let calls = futures::future::join_all((0..4).map(|_| c.call(HANG, b"")));
            let calls = std::pin::pin!(calls);
            let r = select(calls, rt.sleep(Duration::from_millis(200))).await;
            assert!(matches!(r, Either::Right(_)));
            drop(r);
            assert_eq!(s.counts.started.load(Ordering::SeqCst), 4);
        }
        let t = Instant::now();
        while s.counts.dropped.load(Ordering::SeqCst) < 4 || s.server.connections() > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "a gone client's handlers still run: {} dropped, {} connections",
                s.counts.dropped.load(Ordering::SeqCst),
                s.server.connections()
            );
            rt.sleep(Duration::from_millis(10)).await;
        }
        // The server-wide limit is free again.
        let c2 = client(&rt, s.addr, ClientConfig::default()).await;
        assert_eq!(&c2.call(ECHO, b"served").await.unwrap()[..], b"served");
        drop(c2);
        s.server.shutdown().await;
    })
    .await
}

/// Calls through a `Channel` whose place is being connected share that checkout's
/// outcome: with the pool's one connection held elsewhere, 6 concurrent calls all fail
/// after one `checkout_timeout`, not one after another.
pub async fn a_channel_call_waits_for_one_checkout_at_most(rt: Arc<dyn Runtime>) {
    use net_rs::pool::{ConnectionPool, PoolConfig, TcpConnector};
    use net_rs::rpc::Channel;
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let pool = ConnectionPool::new(
            TcpConnector::with_config(s.addr, config(&rt)),
            PoolConfig::default()
                .max_size(1)
                .checkout_timeout(Duration::from_millis(300))
                .runtime(rt.clone()),
        )
        .unwrap();
        let held = pool.get().await.unwrap();
        // 4 places asked for; the pool has 1 connection: 1 place.
        let ch = Channel::new(pool.clone(), 4, ClientConfig::default());
        let t = Instant::now();
        let calls = (0..6).map(|_| {
            let ch = ch.clone();
            spawn(&rt, async move { ch.call(ECHO, b"x").await })
        });
        for r in futures::future::join_all(calls).await {
            assert_eq!(r.unwrap().unwrap_err().code(), Code::Unavailable);
        }
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "the calls took {:?}",
            t.elapsed()
        );
        // The connection comes back: the channel uses it, for every call.
        drop(held);
        for _ in 0..8 {
            assert_eq!(&ch.call(ECHO, b"now").await.unwrap()[..], b"now");
        }
    })
    .await
}

/// The server's connection ends with calls pending: every one fails `Unavailable`
/// (with the transport's error), and later calls fail at once.
pub async fn a_lost_connection_fails_every_pending_call(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let c = client(&rt, s.addr, ClientConfig::default()).await;
        let mut calls = Vec::new();
        for _ in 0..10 {
            let c2 = c.clone();
            calls.push(spawn(&rt, async move { c2.call(HANG, b"").await }));
        }
        rt.sleep(Duration::from_millis(100)).await;
        s.stop.store(true, Ordering::SeqCst);
        for call in calls {
            let e = call.await.unwrap().unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{e}");
            assert!(e.source_error().is_some());
        }
        let e = c.call(ECHO, b"later").await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(c.failed().is_some());
    })
    .await
}

/// A server that lies (answers ids never sent, answers twice, sends garbage): the
/// calls fail with `Internal`, none hangs, none gets a wrong reply.
pub async fn a_lying_server_is_a_protocol_error(rt: Arc<dyn Runtime>) {
    for lie in 0..3 {
        deadline(&rt, async {
            let l = TcpListener::bind_with("127.0.0.1:0", &config(&rt))
                .await
                .unwrap();
            let addr = l.local_addr().unwrap();
            let liar = spawn(&rt, async move {
                let t = l.accept().await.unwrap();
                let req = t.recv().await.unwrap();
                let mut head = req[..16].to_vec();
                head[0] = 2; // a reply
                match lie {
                    0 => head[4..12].copy_from_slice(&999u64.to_be_bytes()),
                    1 => {
                        t.send(Bytes::from(head.clone())).await.unwrap();
                    }
                    _ => head = vec![7; 5],
                }
                t.send(Bytes::from(head)).await.unwrap();
                // Stay until the client is done.
                let _ = t.recv().await;
            });
            let c = client(&rt, addr, ClientConfig::default()).await;
            let first = c.call(ECHO, b"q").await;
            match lie {
                1 => {
                    // The first answer is fine; the repeated one breaks the next call.
                    assert_eq!(&first.unwrap()[..], b"");
                    let e = c.call(ECHO, b"q2").await.unwrap_err();
                    assert_eq!(e.code(), Code::Internal, "{e}");
                }
                _ => {
                    let e = first.unwrap_err();
                    assert_eq!(e.code(), Code::Internal, "{e}");
                    assert!(e.message().contains("protocol"), "{e}");
                }
            }
            assert_eq!(c.call(ECHO, b"x").await.unwrap_err().code(), Code::Internal);
            drop(c);
            let _ = liar.await;
        })
        .await
    }
}

/// Graceful shutdown: the running calls finish with their replies, later calls fail
/// `Unavailable`, `shutdown` returns.
pub async fn graceful_shutdown_finishes_running_calls(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let c = client(&rt, s.addr, ClientConfig::default()).await;
        let mut calls = Vec::new();
        for _ in 0..8 {
            let c2 = c.clone();
            calls.push(spawn(&rt, async move { c2.call(SLOW, &slow(300)).await }));
        }
        rt.sleep(Duration::from_millis(100)).await;
        assert_eq!(s.server.connections(), 1);
        let t = Instant::now();
        s.server.shutdown().await;
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "shutdown did not wait for the running calls"
        );
        for call in calls {
            assert_eq!(&call.await.unwrap().unwrap()[..], &slow(300)[..]);
        }
        let e = c.call(ECHO, b"after").await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
    })
    .await
}

/// During a shutdown the server still reads: a cancel ends a handler that nothing else
/// would end (so the shutdown completes), and a new call is answered `Unavailable` at
/// once instead of waiting.
pub async fn a_shutdown_hears_cancels_and_answers_new_calls(rt: Arc<dyn Runtime>) {
    deadline(&rt, async {
        let s = start_server(&rt, ServerConfig::default()).await;
        let c = client(&rt, s.addr, ClientConfig::default()).await;
        let (c2, rt2) = (c.clone(), rt.clone());
        let hang = spawn(&rt, async move {
            let call = std::pin::pin!(c2.call(HANG, b""));
            matches!(
                select(call, rt2.sleep(Duration::from_millis(300))).await,
                Either::Right(_)
            )
        });
        rt.sleep(Duration::from_millis(100)).await;
        let server = s.server.clone();
        let stopping = spawn(&rt, async move { server.shutdown().await });
        rt.sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        let e = c.call(ECHO, b"during").await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(hang.await.unwrap(), "the HANG call returned");
        // Its cancel goes out with this call, which is refused too.
        let e = c.call(ECHO, b"after").await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        stopping.await.unwrap();
        assert!(s.counts.dropped.load(Ordering::SeqCst) >= 1);
    })
    .await
}

/// The server is killed and started again on the same port while 16 tasks call in a
/// loop, reconnecting as a user would: every call ends (a reply or an error), and
/// calls succeed again after the restart.
pub async fn a_killed_server_every_call_ends_and_the_client_recovers(rt: Arc<dyn Runtime>) {
    let s = start_server(&rt, ServerConfig::default()).await;
    let addr = s.addr;
    let current: Arc<std::sync::Mutex<Option<Client<TcpTransport>>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let after_restart = Arc::new(AtomicU64::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..16u64 {
        let (current, stop, rt2, after, restarted) = (
            current.clone(),
            stop.clone(),
            rt.clone(),
            after_restart.clone(),
            restarted.clone(),
        );
        tasks.push(spawn(&rt, async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let c = current.lock().unwrap().clone();
                let c = match c {
                    Some(c) if c.failed().is_none() => c,
                    _ => match TcpTransport::connect_with(addr, &config(&rt2)).await {
                        Ok(t) => {
                            let c = Client::with_config(
                                t,
                                ClientConfig::default().runtime(rt2.clone()),
                            );
                            *current.lock().unwrap() = Some(c.clone());
                            c
                        }
                        Err(_) => {
                            rt2.sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                seq += 1;
                let mut p = task.to_be_bytes().to_vec();
                p.extend_from_slice(&seq.to_be_bytes());
                let t = Instant::now();
                let r = c.call_timeout(ECHO, &p, Some(Duration::from_secs(5))).await;
                assert!(
                    t.elapsed() < Duration::from_secs(6),
                    "a call took {:?}",
                    t.elapsed()
                );
                match r {
                    Ok(reply) => {
                        assert_eq!(&reply[..], &p[..]);
                        if restarted.load(Ordering::SeqCst) {
                            after.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => assert!(
                        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                        "{e}"
                    ),
                }
            }
        }));
    }
    rt.sleep(Duration::from_millis(300)).await;
    s.stop.store(true, Ordering::SeqCst);
    rt.sleep(Duration::from_millis(200)).await;
    // The same port again (the old listener is gone once its loop saw `stop`).
    let l = deadline(&rt, async {
        loop {
            match TcpListener::bind_with(addr, &config(&rt)).await {
                Ok(l) => break l,
                Err(_) => rt.sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    let _s2 = serve_on(&rt, l, ServerConfig::default());
    restarted.store(true, Ordering::SeqCst);
    deadline(&rt, async {
        while after_restart.load(Ordering::SeqCst) < 100 {
            rt.sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    deadline(&rt, async {
        for t in tasks {
            t.await.expect("a task panicked (see above)");
        }
    })
    .await;
}

/// Retry a call that failed `Unavailable` (the connection broke or none could be had),
/// up to 40 times, 25 ms apart: the shape of the README's tower example.
#[cfg(feature = "tower")]
#[derive(Clone)]
struct RetryUnavailable {
    left: u32,
    rt: Arc<dyn Runtime>,
    retried: Arc<AtomicU64>,
}

#[cfg(feature = "tower")]
impl tower::retry::Policy<net_rs::rpc::Call, Bytes, Status> for RetryUnavailable {
    type Future = net_rs::transport::BoxFuture<'static, ()>;

    fn retry(
        &mut self,
        _req: &mut net_rs::rpc::Call,
        result: &mut Result<Bytes, Status>,
    ) -> Option<Self::Future> {
        match result {
            Err(e) if e.code() == Code::Unavailable && self.left > 0 => {
                self.left -= 1;
                self.retried.fetch_add(1, Ordering::SeqCst);
                Some(self.rt.sleep(Duration::from_millis(25)))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &net_rs::rpc::Call) -> Option<net_rs::rpc::Call> {
        Some(req.clone())
    }
}

/// Through a `Channel` (2 connections from a pool) behind tower's retry layer, 8 tasks
/// call in a loop while the server is killed and started again on the same port: no
/// call fails or hangs, the channel reconnects by itself.
#[cfg(feature = "tower")]
pub async fn a_channel_with_retries_rides_out_a_server_restart(rt: Arc<dyn Runtime>) {
    use net_rs::pool::{ConnectionPool, PoolConfig, ReconnectPolicy, TcpConnector};
    use net_rs::rpc::{Call, Channel};
    use tower::{Service, ServiceExt};

    let s = start_server(&rt, ServerConfig::default()).await;
    let addr = s.addr;
    let pool = ConnectionPool::new(
        TcpConnector::with_config(addr, config(&rt)),
        PoolConfig::default()
            .max_size(2)
            .checkout_timeout(Duration::from_secs(2))
            .reconnect(ReconnectPolicy::fixed(Duration::from_millis(20)))
            .runtime(rt.clone()),
    )
    .unwrap();
    let channel = Channel::new(pool, 2, ClientConfig::default());
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let after = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let mut svc = tower::retry::Retry::new(
            RetryUnavailable {
                left: 40,
                rt: rt.clone(),
                retried: retried.clone(),
            },
            channel.clone(),
        );
        let (stop, restarted, after) = (stop.clone(), restarted.clone(), after.clone());
        tasks.push(spawn(&rt, async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let mut p = task.to_be_bytes().to_vec();
                p.extend_from_slice(&seq.to_be_bytes());
                let t = Instant::now();
                let r = svc
                    .ready()
                    .await
                    .unwrap()
                    .call(Call::new(ECHO, p.clone()))
                    .await;
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "a call took {:?}",
                    t.elapsed()
                );
                let reply = r.unwrap_or_else(|e| panic!("task {task} call {seq}: {e}"));
                assert_eq!(&reply[..], &p[..]);
                if restarted.load(Ordering::SeqCst) {
                    after.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    rt.sleep(Duration::from_millis(300)).await;
    s.stop.store(true, Ordering::SeqCst);
    rt.sleep(Duration::from_millis(200)).await;
    let l = deadline(&rt, async {
        loop {
            match TcpListener::bind_with(addr, &config(&rt)).await {
                Ok(l) => break l,
                Err(_) => rt.sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    let _s2 = serve_on(&rt, l, ServerConfig::default());
    restarted.store(true, Ordering::SeqCst);
    deadline(&rt, async {
        while after.load(Ordering::SeqCst) < 100 {
            rt.sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    deadline(&rt, async {
        for t in tasks {
            t.await.expect("a task panicked (see above)");
        }
    })
    .await;
    assert!(
        retried.load(Ordering::SeqCst) > 0,
        "no call was retried: the restart was not seen"
    );
}

/// A `tower::Service` as the server's handler (`ServiceHandler`).
#[cfg(feature = "tower")]
pub async fn a_tower_service_serves_requests(rt: Arc<dyn Runtime>) {
    use net_rs::rpc::ServiceHandler;
    deadline(&rt, async {
        let l = TcpListener::bind_with("127.0.0.1:0", &config(&rt))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let server = Server::new(ServerConfig::default().runtime(rt.clone()));
        let svc = tower::service_fn(|req: Request| async move {
            match req.method() {
                ECHO => Ok::<Bytes, Status>(req.into_payload()),
                m => Err(Status::new(Code::Unimplemented, format!("no method {m}"))),
            }
        });
        let serving = spawn(&rt, async move {
            let conn = l.accept().await.unwrap();
            server
                .serve_connection(&conn, &ServiceHandler::new(svc))
                .await
        });
        let c = client(&rt, addr, ClientConfig::default()).await;
        assert_eq!(&c.call(ECHO, b"via tower").await.unwrap()[..], b"via tower");
        assert_eq!(
            c.call(9, b"").await.unwrap_err().code(),
            Code::Unimplemented
        );
        c.transport().shutdown().await.unwrap();
        serving.await.unwrap().unwrap();
    })
    .await
}

#[cfg(feature = "tower")]
#[macro_export]
macro_rules! rpc_tower_cases {
    ($run:path) => {
        #[test]
        fn a_tower_service_serves_requests() {
            $run(|rt| Box::pin($crate::rpc_suite::a_tower_service_serves_requests(rt)));
        }
        #[test]
        fn a_channel_with_retries_rides_out_a_server_restart() {
            $run(|rt| {
                Box::pin($crate::rpc_suite::a_channel_with_retries_rides_out_a_server_restart(rt))
            });
        }
    };
}

#[cfg(not(feature = "tower"))]
#[macro_export]
macro_rules! rpc_tower_cases {
    ($run:path) => {};
}
/// A client connection that never runs out of input, as a hostile client on a fast
/// link looks to the server: every `recv` is ready at once with a cancel of a request
/// that was never made (a message the server has nothing to do for), until `stop`;
/// then one request (id 1, `ECHO` of "hi"); then nothing more. What the server sends is
/// kept. Should serving never yield, the cancels stop after 5 s (and the test fails on
/// the time it took) rather than hang the test.
struct EndlessCancels {
    stop: AtomicBool,
    requested: AtomicBool,
    next: AtomicU64,
    since: Instant,
    sent: std::sync::Mutex<Vec<Bytes>>,
    pool: net_rs::buffer::HeapPool,
}

impl EndlessCancels {
    fn new() -> Self {
        EndlessCancels {
            stop: AtomicBool::new(false),
            requested: AtomicBool::new(false),
            next: AtomicU64::new(1_000_000),
            since: Instant::now(),
            sent: Default::default(),
            pool: net_rs::buffer::HeapPool::new(0),
        }
    }

    fn message(kind: Kind, id: u64, payload: &[u8]) -> Bytes {
        let h = Header {
            kind,
            method: ECHO,
            id,
            word: 0,
        };
        [&h.to_bytes()[..], payload].concat().into()
    }
}

use net_rs::rpc::wire::{Header, Kind};

impl Transport for EndlessCancels {
    fn send(
        &self,
        msg: Bytes,
    ) -> impl std::future::Future<Output = net_rs::Result<()>> + Send + '_ {
        self.sent.lock().unwrap().push(msg);
        futures::future::ready(Ok(()))
    }

    fn recv(&self) -> impl std::future::Future<Output = net_rs::Result<Bytes>> + Send + '_ {
        let next = if !self.stop.load(Ordering::SeqCst) {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            (self.since.elapsed() < Duration::from_secs(5))
                .then(|| Self::message(Kind::Cancel, id, b""))
        } else if !self.requested.swap(true, Ordering::SeqCst) {
            Some(Self::message(Kind::Request, 1, b"hi"))
        } else {
            None
        };
        async move {
            match next {
                Some(m) => Ok(m),
                None => futures::future::pending().await,
            }
        }
    }

    async fn flush(&self) -> net_rs::Result<()> {
        Ok(())
    }

    async fn shutdown(&self) -> net_rs::Result<()> {
        Ok(())
    }

    async fn close(&self) -> net_rs::Result<()> {
        Ok(())
    }

    fn alloc_buf(&self, len: usize) -> net_rs::Result<net_rs::buffer::Buf> {
        use net_rs::transport::BufferPool as _;
        self.pool.alloc(len)
    }

    fn max_message_size(&self) -> usize {
        1 << 20
    }

    fn is_closed(&self) -> bool {
        false
    }

    fn has_unread(&self) -> bool {
        false
    }

    fn local_addr(&self) -> net_rs::Result<std::net::SocketAddr> {
        Ok(([127, 0, 0, 1], 1).into())
    }

    fn peer_addr(&self) -> net_rs::Result<std::net::SocketAddr> {
        Ok(([127, 0, 0, 1], 2).into())
    }
}

/// A client that sends nothing but cancels of requests that are not open (messages
/// the server reads and has nothing to do for), faster than the server reads them,
/// does not hold the connection's serving: a timer raced against `serve_connection`
/// fires on time, again and again (serving yields to the executor while it reads
/// them), and a request after them is answered.
pub async fn a_flood_of_stray_cancels_does_not_hold_the_server(rt: Arc<dyn Runtime>) {
    let conn = EndlessCancels::new();
    let server = Server::new(ServerConfig::default().runtime(rt.clone()));
    let h = handler(rt.clone(), Arc::new(Counts::default()));
    let mut serve = std::pin::pin!(server.serve_connection(&conn, &h));
    for round in 0..3 {
        let t0 = Instant::now();
        if let Either::Left((r, _)) =
            select(serve.as_mut(), rt.sleep(Duration::from_millis(100))).await
        {
            panic!("round {round}: serving ended during the flood: {r:?}");
        }
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "round {round}: a 100 ms timer raced against serving fired after {took:?}"
        );
    }
    conn.stop.store(true, Ordering::SeqCst);
    let answered = async {
        loop {
            if let Some(reply) = conn.sent.lock().unwrap().first().cloned() {
                return reply;
            }
            rt.sleep(Duration::from_millis(5)).await;
        }
    };
    let reply = match select(serve, std::pin::pin!(deadline(&rt, answered))).await {
        Either::Right((reply, _)) => reply,
        Either::Left((r, _)) => panic!("serving ended before the request was answered: {r:?}"),
    };
    let (head, payload) = Header::decode(reply).unwrap();
    assert_eq!((head.kind, head.id, head.word), (Kind::Reply, 1, 0));
    assert_eq!(&payload[..], b"hi");
    assert_eq!(
        conn.sent.lock().unwrap().len(),
        1,
        "one answer, to the request"
    );
}

#[macro_export]
macro_rules! rpc_suite {
    ($run:path) => {
        $crate::rpc_suite!(@each $run;
            a_call_gets_its_reply many_tasks_one_connection_every_reply_to_its_own_call
            a_slow_handler_does_not_block_fast_ones a_timeout_ends_the_call_and_the_server_work
            a_dropped_call_is_cancelled_on_the_server a_request_past_its_deadline_is_not_started
            calls_beyond_the_window_wait_for_a_slot a_window_of_given_up_calls_frees_itself
            a_client_that_leaves_frees_its_handlers a_channel_call_waits_for_one_checkout_at_most
            a_lost_connection_fails_every_pending_call
            a_lying_server_is_a_protocol_error graceful_shutdown_finishes_running_calls
            a_shutdown_hears_cancels_and_answers_new_calls
            a_killed_server_every_call_ends_and_the_client_recovers
            a_flood_of_stray_cancels_does_not_hold_the_server);
        $crate::rpc_tower_cases!($run);
    };
    (@each $run:path; $($name:ident)*) => {
        $(
            #[test]
            fn $name() {
                $run(|rt| Box::pin($crate::rpc_suite::$name(rt)));
            }
        )*
    };
}
