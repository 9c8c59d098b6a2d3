//! `--only rpc`: the baselines of a unary request/response (RPC) benchmark, and the
//! harness they share. An echo RPC: a client sends `size` bytes, the server returns the
//! same bytes, with `in_flight` calls outstanding at once on ONE connection, on
//! loopback, in-process.
//!
//! - `tonic`: gRPC over HTTP/2 over tonic's own TCP (`tonic::transport`). No protoc and
//!   no build script: the service is written by hand (what tonic-build would generate:
//!   a `Service<http::Request<Body>>` routing one path to `tonic::server::Grpc::unary`,
//!   behind `tonic::transport::Server`'s router), with a [`tonic::codec::Codec`]
//!   that passes `bytes::Bytes` through unchanged (no protobuf). The client is
//!   `tonic::client::Grpc::unary` over one `tonic::transport::Channel`, cloned per
//!   call (clones share its one HTTP/2 connection).
//! - `tarpc`: `#[tarpc::service] trait Echo`, the bincode serde transport over a tokio
//!   `TcpStream` (length-delimited frames), one `EchoClient`, a server `BaseChannel`
//!   whose every request runs in a task of its own (`execute` + `tokio::spawn`), so
//!   in-flight calls are truly concurrent. The payload is a `Bytes`, serialized as one
//!   byte string (bytes' serde feature, like `serde_bytes`), not element by element.
//!
//! Fairness rules, the same for every implementation (and for net-rs's row, once it
//! uses [`run_cell`] and [`drive`]):
//! - the server and the client each run on an OS thread of their own, each with a
//!   current-thread tokio runtime; the client's `in_flight` tasks are spawned onto its
//!   runtime and share one connection (one client handle, cloned);
//! - TCP_NODELAY on both ends;
//! - a warm-up of 100 ms (every task already calling) that is not counted;
//! - every reply is compared with the request's payload (a mismatch fails the cell);
//! - every wait is bounded: a call that takes more than 10 s, a connect or accept
//!   that takes more than 10 s, or a thread that outlives the cell by more than that,
//!   fails the cell with a message (the table shows it) instead of hanging.
//!
//! Limits raised so that no baseline is held back at 256 in flight: tonic's server
//! advertises 1024 concurrent streams (tonic leaves it unset, no limit, by default;
//! hyper's own default is 200), no concurrency limit on either end (tonic's default;
//! the channel's request buffer keeps its default of 1024), both ends set an
//! HTTP/2 stream window of 4 MiB and a connection window of 16 MiB, and the largest
//! message either end accepts is [`crate::MAX`] (tonic's default limit is 4 MiB). The
//! windows are fixed, not hyper's adaptive window: that one starts from the 65,535-byte
//! defaults (it overrides the sizes set), adds its BDP pings to the traffic, and in a
//! trial (tonic 0.14.9, hyper 1.12, h2 0.4.20) the 64 B cell with 256 in flight failed
//! with it in both runs, the connection closed under the calls ("broken pipe"; the
//! cause was not traced); the other cells ran about as fast as with the fixed
//! windows. tarpc's client keeps its default 1000 in-flight requests and gets a pending-request
//! buffer of 1024 (default 100), its server a pending-response buffer of 1024 (default
//! 100); its frames may be up to twice [`crate::MAX`] (default 8 MiB).
//!
//! The result of a cell ([`RpcResult`]): calls completed per second, the p50 and p99 of
//! the calls' latencies (from the call to its checked reply), and the calls counted.
//! Only calls started after the warm-up are counted; the clock runs from the warm-up's
//! end until the last task has its last reply (the tasks start no call after the
//! duration).
//!
//! Adding net-rs's row: a `pub fn netrs_unary(size: usize, in_flight: usize, duration:
//! Duration) -> Result<RpcResult, String>` that calls [`run_cell`] with its server and
//! its connect (which returns the call closure that [`drive`] runs), and a line in
//! [`IMPLS`].

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::contender::current_thread;
use crate::{fmt_size, payload, stats, Args, MAX};

/// The warm-up of every cell, not counted.
const WARMUP: Duration = Duration::from_millis(100);
/// The longest any one call, connect or accept may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The in-flight counts of the table's rows.
const IN_FLIGHT: [usize; 3] = [1, 16, 256];
/// The HTTP/2 windows (tonic, both ends).
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONN_WINDOW: u32 = 16 << 20;
/// tonic's server: the concurrent streams it advertises.
const H2_MAX_STREAMS: u32 = 1024;
/// tarpc: the client's pending-request buffer and the server's pending-response one.
const TARPC_BUFFER: usize = 1024;

/// One cell's result.
pub struct RpcResult {
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub calls: u64,
    /// Every call made, warm-up included (for CPU time per call).
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub all_calls: u64,
}

/// A cell: (size, in flight, duration) to its result.
type Cell = fn(usize, usize, Duration) -> Result<RpcResult, String>;

/// The rows of the table, in order: a name and its cell.
pub const IMPLS: [(&str, Cell); 4] = [
    ("net-rs", crate::rpc_netrs::netrs_unary),
    ("bare", crate::rpc_netrs::bare_round_trip),
    ("tonic", tonic_unary),
    ("tarpc", tarpc_unary),
];

/// The RPC table: for each size (64 B and 4 KiB unless `--sizes`) and each in-flight
/// count (1, 16, 256), every implementation's requests/s, p50 and p99.
pub fn run(args: &Args) {
    println!("\nunary echo RPC: one connection, N calls in flight, client and server on their own");
    println!(
        "threads with current-thread tokio runtimes, {} ms warm-up not counted, every reply checked",
        WARMUP.as_millis()
    );
    println!(
        "{:>8} | {:>9} | {:>8} | {:>10} | {:>9} | {:>9} | {:>9}",
        "size", "in flight", "impl", "req/s", "p50 µs", "p99 µs", "calls"
    );
    // (size, in flight, impl) -> (requests/s, p50), for the targets.
    let mut seen: Vec<(usize, usize, &str, f64, f64)> = Vec::new();
    for &size in &args.sizes {
        for in_flight in IN_FLIGHT {
            for (name, cell) in IMPLS {
                if name == "bare" && in_flight != 1 {
                    continue;
                }
                let r = cell(size, in_flight, args.duration);
                if let Ok(r) = &r {
                    seen.push((size, in_flight, name, r.requests_per_sec, r.p50_us));
                }
                match r {
                    Ok(r) => println!(
                        "{:>8} | {:>9} | {:>8} | {:>10.0} | {:>9.1} | {:>9.1} | {:>9}",
                        fmt_size(size),
                        in_flight,
                        name,
                        r.requests_per_sec,
                        r.p50_us,
                        r.p99_us,
                        r.calls
                    ),
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
    let find = |size: usize, n: usize, name: &str| {
        seen.iter()
            .find(|c| c.0 == size && c.1 == n && c.2 == name)
            .map(|c| (c.3, c.4))
    };
    println!("\nRPC targets (ratios within this run):");
    for &size in &args.sizes {
        let s = fmt_size(size);
        match (
            find(size, 256, "net-rs"),
            find(size, 256, "tonic"),
            find(size, 256, "tarpc"),
        ) {
            (Some(n), Some(t), tarpc) => {
                let tarpc = tarpc.map_or(String::new(), |x| format!(", {:.2}x tarpc", n.0 / x.0));
                println!(
                    "{s:>8}: 256 in flight, net-rs {:.2}x tonic's requests/s (target >= 3){tarpc}",
                    n.0 / t.0
                );
            }
            _ => println!("{s:>8}: 256 in flight: not measured"),
        }
        // One round trip is at the mercy of how fast an idle core wakes up (on these
        // shared machines the median jumps between about 18 and 55 µs from one second
        // to the next): the ratio is the median of 7 pairs of short cells run back to
        // back, bare then net-rs, so both of a pair see the same machine.
        let short = (args.duration / 4).max(Duration::from_millis(100));
        let mut ratios: Vec<f64> = (0..7)
            .filter_map(|_| {
                let b = crate::rpc_netrs::bare_round_trip(size, 1, short).ok()?;
                let n = crate::rpc_netrs::netrs_unary(size, 1, short).ok()?;
                Some(n.p50_us / b.p50_us)
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        match ratios.get(ratios.len() / 2) {
            Some(r) => println!(
                "{s:>8}: 1 in flight, net-rs median round trip {r:.2}x the bare send/recv's \
                 (target <= 1.1; median of {} back-to-back pairs, from {:.2} to {:.2})",
                ratios.len(),
                ratios[0],
                ratios[ratios.len() - 1]
            ),
            None => println!("{s:>8}: 1 in flight: not measured"),
        }
    }
}

/// Unary echo RPC with tonic: `in_flight` concurrent requests of `size` bytes (payload
/// echoed back, every reply checked to be the same bytes) on ONE connection, for
/// `duration`.
pub fn tonic_unary(size: usize, in_flight: usize, duration: Duration) -> Result<RpcResult, String> {
    run_cell(
        size,
        in_flight,
        duration,
        tonic_echo::serve,
        tonic_echo::connect,
    )
}

/// Unary echo RPC with tarpc: as [`tonic_unary`].
pub fn tarpc_unary(size: usize, in_flight: usize, duration: Duration) -> Result<RpcResult, String> {
    run_cell(
        size,
        in_flight,
        duration,
        tarpc_echo::serve,
        tarpc_echo::connect,
    )
}

/// Runs one cell: `serve(listener, stop)` on a thread of its own with a current-thread
/// runtime (the listener is bound to a free loopback port; the server should return
/// once `stop` resolves, which it does when the client side is done, or failed), and,
/// on another thread with its own current-thread runtime, `connect(addr)` (one
/// connection; it returns the call that [`drive`] runs on it), then [`drive`]. Both
/// threads are bounded in time: see the module doc.
pub fn run_cell<S, SFut, C, CFut, F, Fut>(
    size: usize,
    in_flight: usize,
    duration: Duration,
    serve: S,
    connect: C,
) -> Result<RpcResult, String>
where
    S: FnOnce(tokio::net::TcpListener, Stop) -> SFut + Send + 'static,
    SFut: Future<Output = Result<(), String>>,
    C: FnOnce(SocketAddr) -> CFut + Send + 'static,
    CFut: Future<Output = Result<F, String>>,
    F: Fn(Bytes) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Bytes, String>> + Send,
{
    // The most a cell's thread may take: connect, warm-up, duration, the last calls,
    // and a closing.
    let bound = WARMUP + duration + 3 * CALL_TIMEOUT;
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| format!("local_addr: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("set_nonblocking: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| format!("listener: {e}"))?;
            let stop = Stop(stop_rx);
            match tokio::time::timeout(bound, serve(l, stop)).await {
                Ok(r) => r.map_err(|e| format!("server: {e}")),
                Err(_) => Err(format!("server: still running after {bound:?}")),
            }
        })
    });
    let client = std::thread::spawn(move || {
        let r = current_thread().block_on(async move {
            let run = async {
                let call = match tokio::time::timeout(CALL_TIMEOUT, connect(addr)).await {
                    Ok(c) => c.map_err(|e| format!("connect: {e}"))?,
                    Err(_) => return Err(format!("connect: no connection in {CALL_TIMEOUT:?}")),
                };
                drive(size, in_flight, duration, call).await
            };
            match tokio::time::timeout(bound, run).await {
                Ok(r) => r,
                Err(_) => Err(format!("client: still running after {bound:?}")),
            }
        });
        // Whatever happened, the server may stop now (dropping the sender does too).
        let _ = stop_tx.send(());
        r
    });
    let client = join_bounded(client, bound + CALL_TIMEOUT, "client")?;
    let server = join_bounded(server, 2 * CALL_TIMEOUT, "server")?;
    let r = client?;
    server?;
    Ok(r)
}

/// Joins `h`, waiting at most `limit` (a thread still running after that is left
/// behind, and the cell fails).
fn join_bounded<T>(
    h: std::thread::JoinHandle<T>,
    limit: Duration,
    what: &str,
) -> Result<T, String> {
    let end = Instant::now() + limit;
    while !h.is_finished() {
        if Instant::now() >= end {
            return Err(format!("{what} thread still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    h.join().map_err(|_| format!("{what} thread panicked"))
}

/// What tells a server in [`run_cell`] to stop: resolves once the client side is done.
pub struct Stop(tokio::sync::oneshot::Receiver<()>);

impl Stop {
    /// Waits for the client side to be done (at once if it already is).
    pub async fn wait(&mut self) {
        let _ = (&mut self.0).await;
    }
}

/// The shared measuring loop, so the net-rs RPC can use the exact same harness later:
/// `in_flight` tasks on the client runtime, each calling `call(payload)` in a loop until
/// the duration ends, recording each call's latency; returns requests/s and p50/p99.
///
/// Every task calls from the start; the first [`WARMUP`] is not counted (a call is
/// counted if it starts after it). Every reply must equal the payload, and every call
/// must return within 10 s; the first error ends the cell (the other tasks are
/// aborted). The rate is the counted calls over the time from the warm-up's end to the
/// last reply.
pub async fn drive<F, Fut>(
    size: usize,
    in_flight: usize,
    duration: Duration,
    call: F,
) -> Result<RpcResult, String>
where
    F: Fn(Bytes) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Bytes, String>> + Send,
{
    if in_flight == 0 {
        return Err("in_flight must be at least 1".into());
    }
    let msg = payload(size);
    let start = Instant::now();
    let counted_from = start + WARMUP;
    let end = counted_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let call = call.clone();
        let msg = msg.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut made = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    return Ok::<_, String>((lat, made));
                }
                made += 1;
                let reply = match tokio::time::timeout(CALL_TIMEOUT, call(msg.clone())).await {
                    Ok(r) => r?,
                    Err(_) => return Err(format!("a call took more than {CALL_TIMEOUT:?}")),
                };
                let t1 = Instant::now();
                if reply != msg {
                    return Err(format!(
                        "a reply ({} bytes) differs from the {} bytes sent",
                        reply.len(),
                        msg.len()
                    ));
                }
                if t0 >= counted_from {
                    lat.push(t1 - t0);
                }
            }
        });
    }
    let mut all = Vec::new();
    let mut all_calls = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((lat, made))) => {
                all.extend(lat);
                all_calls += made;
            }
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("a calling task failed: {e}")),
        }
    }
    let elapsed = Instant::now().saturating_duration_since(counted_from);
    if all.is_empty() {
        return Err("no call was counted".into());
    }
    let calls = all.len() as u64;
    let lat = stats(all);
    Ok(RpcResult {
        requests_per_sec: calls as f64 / elapsed.as_secs_f64(),
        p50_us: lat.median_us,
        p99_us: lat.p99_us,
        calls,
        all_calls,
    })
}

/// tonic: the codec, the hand-written service, the server and the client.
pub mod tonic_echo {
    use std::convert::Infallible;
    use std::future::{ready, Ready};
    use std::net::SocketAddr;
    use std::task::{Context, Poll};

    use bytes::{Buf, BufMut, Bytes};
    use tonic::body::Body;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::codegen::{http, BoxFuture, Service};
    use tonic::server::NamedService;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Channel, Endpoint, Server};
    use tonic::{Request, Response, Status};

    use super::{Stop, H2_CONN_WINDOW, H2_MAX_STREAMS, H2_STREAM_WINDOW, MAX};

    /// The service's name and its one method's path.
    const SERVICE: &str = "netperf.Echo";
    const PATH: &str = "/netperf.Echo/Echo";

    /// A gRPC codec whose messages are the bytes themselves (no protobuf).
    #[derive(Clone, Copy, Default)]
    pub struct BytesCodec;

    impl Codec for BytesCodec {
        type Encode = Bytes;
        type Decode = Bytes;
        type Encoder = BytesCodec;
        type Decoder = BytesCodec;

        fn encoder(&mut self) -> Self::Encoder {
            BytesCodec
        }

        fn decoder(&mut self) -> Self::Decoder {
            BytesCodec
        }
    }

    impl Encoder for BytesCodec {
        type Item = Bytes;
        type Error = Status;

        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put(item);
            Ok(())
        }
    }

    impl Decoder for BytesCodec {
        type Item = Bytes;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
            // The buffer holds exactly one message.
            Ok(Some(src.copy_to_bytes(src.remaining())))
        }
    }

    /// The method: returns the request's bytes.
    struct EchoMethod;

    impl Service<Request<Bytes>> for EchoMethod {
        type Response = Response<Bytes>;
        type Error = Status;
        type Future = Ready<Result<Response<Bytes>, Status>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Bytes>) -> Self::Future {
            ready(Ok(Response::new(req.into_inner())))
        }
    }

    /// The service, as tonic-build would generate it: routes the method's path to
    /// `Grpc::unary`, anything else to `unimplemented`.
    #[derive(Clone)]
    struct EchoServer;

    impl NamedService for EchoServer {
        const NAME: &'static str = SERVICE;
    }

    impl Service<http::Request<Body>> for EchoServer {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Infallible>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<Body>) -> Self::Future {
            if req.uri().path() == PATH {
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(BytesCodec)
                        .max_decoding_message_size(MAX)
                        .max_encoding_message_size(MAX);
                    Ok(grpc.unary(EchoMethod, req).await)
                })
            } else {
                Box::pin(async { Ok(Status::unimplemented("").into_http()) })
            }
        }
    }

    /// Serves the echo service on `l` (TCP_NODELAY on accepted connections) until
    /// `stop`.
    pub async fn serve(l: tokio::net::TcpListener, mut stop: Stop) -> Result<(), String> {
        let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
        serve_incoming(incoming, async move { stop.wait().await }).await
    }

    /// Serves the echo service on the connections of `incoming` until `stop`.
    pub async fn serve_incoming<I, IO, IE>(
        incoming: I,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), String>
    where
        I: futures::Stream<Item = Result<IO, IE>>,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Server::builder()
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .max_concurrent_streams(H2_MAX_STREAMS)
            .add_service(EchoServer)
            .serve_with_incoming_shutdown(incoming, stop)
            .await
            .map_err(|e| format!("tonic server: {e}"))
    }

    /// Connects one `Channel` (one HTTP/2 connection) to `addr`; the call sends one
    /// unary request on a clone of it.
    pub async fn connect(
        addr: SocketAddr,
    ) -> Result<impl Fn(Bytes) -> BoxFuture<Bytes, String> + Clone + Send + 'static, String> {
        let channel: Channel = endpoint(&format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("tonic connect: {e}"))?;
        Ok(caller(channel))
    }

    /// The client's endpoint, with the table's HTTP/2 windows.
    pub fn endpoint(uri: &str) -> Result<Endpoint, String> {
        Ok(Endpoint::from_shared(uri.to_string())
            .map_err(|e| e.to_string())?
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW))
    }

    /// The call on `channel`: one unary echo request on a clone of it.
    pub fn caller(
        channel: Channel,
    ) -> impl Fn(Bytes) -> BoxFuture<Bytes, String> + Clone + Send + 'static {
        move |msg: Bytes| -> BoxFuture<Bytes, String> {
            let mut grpc = tonic::client::Grpc::new(channel.clone())
                .max_decoding_message_size(MAX)
                .max_encoding_message_size(MAX);
            Box::pin(async move {
                grpc.ready()
                    .await
                    .map_err(|e| format!("tonic channel not ready: {e}"))?;
                let path = http::uri::PathAndQuery::from_static(PATH);
                let reply = grpc
                    .unary(Request::new(msg), path, BytesCodec)
                    .await
                    .map_err(|s| format!("tonic call: {s}"))?;
                Ok(reply.into_inner())
            })
        }
    }
}

/// tarpc: the service, the server and the client.
mod tarpc_echo {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use futures::StreamExt;
    use tarpc::server::{BaseChannel, Channel};
    use tarpc::tokio_serde::formats::Bincode;
    use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
    use tarpc::{client, context, serde_transport};

    use super::{Stop, CALL_TIMEOUT, MAX, TARPC_BUFFER};

    /// Unary echo.
    #[tarpc::service]
    trait Echo {
        async fn echo(payload: Bytes) -> Bytes;
    }

    #[derive(Clone)]
    struct EchoServer;

    impl Echo for EchoServer {
        async fn echo(self, _: context::Context, payload: Bytes) -> Bytes {
            payload
        }
    }

    /// Length-delimited frames on `s`, up to twice [`MAX`].
    fn framed(s: tokio::net::TcpStream) -> Framed<tokio::net::TcpStream, LengthDelimitedCodec> {
        LengthDelimitedCodec::builder()
            .max_frame_length(2 * MAX)
            .new_framed(s)
    }

    /// Accepts one connection on `l` (TCP_NODELAY) and serves it, every request in a
    /// task of its own, until the client closes it or `stop`.
    pub async fn serve(l: tokio::net::TcpListener, mut stop: Stop) -> Result<(), String> {
        let accepted = tokio::select! {
            r = tokio::time::timeout(CALL_TIMEOUT, l.accept()) => r,
            // The client side gave up before connecting.
            () = stop.wait() => return Ok(()),
        };
        let (s, _) = match accepted {
            Ok(r) => r.map_err(|e| format!("accept: {e}"))?,
            Err(_) => return Err(format!("no connection in {CALL_TIMEOUT:?}")),
        };
        s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let transport = serde_transport::new(framed(s), Bincode::default());
        let config = tarpc::server::Config {
            pending_response_buffer: TARPC_BUFFER,
        };
        let served = BaseChannel::new(config, transport)
            .execute(EchoServer.serve())
            .for_each(|response| async {
                tokio::spawn(response);
            });
        tokio::select! {
            () = served => {}
            () = stop.wait() => {}
        }
        Ok(())
    }

    /// Connects one `EchoClient` (one TCP connection, TCP_NODELAY) to `addr`; the call
    /// is one `echo` on a clone of it.
    pub async fn connect(
        addr: SocketAddr,
    ) -> Result<
        impl Fn(Bytes) -> futures::future::BoxFuture<'static, Result<Bytes, String>>
            + Clone
            + Send
            + 'static,
        String,
    > {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("tarpc connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let transport = serde_transport::new(framed(s), Bincode::default());
        let mut config = client::Config::default();
        config.max_in_flight_requests = config.max_in_flight_requests.max(TARPC_BUFFER);
        config.pending_request_buffer = TARPC_BUFFER;
        let client = EchoClient::new(config, transport).spawn();
        Ok(move |msg: Bytes| {
            let client = client.clone();
            let f: futures::future::BoxFuture<'static, Result<Bytes, String>> =
                Box::pin(async move {
                    // The default context's deadline is 10 s from now.
                    client
                        .echo(context::current(), msg)
                        .await
                        .map_err(|e| format!("tarpc call: {e}"))
                });
            f
        })
    }
}
