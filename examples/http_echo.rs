//! HTTP/1.1 or HTTP/2 (hyper 1.x) over a net-rs connection, TCP or RDMA, under smol: no
//! tokio anywhere. The server echoes each request's body; the client sends requests
//! of growing size and checks every answer.
//!
//! ```text
//! cargo run --example http_echo --features hyper,async-std -- demo
//! cargo run --example http_echo --features hyper,async-std -- server 127.0.0.1:8080 [--http 2]
//! cargo run --example http_echo --features hyper,async-std -- client 127.0.0.1:8080 [--http 2] [--requests 100]
//! # RDMA (a device's IP, not 127.0.0.1), e.g. in the Soft-RoCE VM:
//! cargo run --example http_echo --features hyper,async-std,rdma -- demo --transport rdma --addr 198.18.0.1:8080
//! ```
//!
//! `demo` runs both ends in one process; the exit code says whether every answer was
//! right.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::runtime::async_io::AsyncIoRuntime;
use net_rs::runtime::Runtime;
use net_rs::stream::{ByteStream, HyperExecutor};
use net_rs::transport::Transport;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Tcp,
    Rdma,
}

#[derive(Clone, Copy)]
struct Opts {
    kind: Kind,
    http2: bool,
    requests: usize,
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(Response::new(Full::new(body)))
}

/// Serve one connection with hyper until the client goes.
async fn serve<T: Transport>(t: T, http2: bool, exec: HyperExecutor) {
    let io = ByteStream::new(t);
    let svc = hyper::service::service_fn(echo);
    let r = if http2 {
        hyper::server::conn::http2::Builder::new(exec)
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await
    };
    if let Err(e) = r {
        eprintln!("server: connection ended: {e}");
    }
}

/// Accept and serve forever (each connection on its own task).
async fn server(addr: SocketAddr, opts: Opts, rt: Arc<dyn Runtime>) -> Result<(), BoxError> {
    let exec = HyperExecutor::new(rt.clone());
    match opts.kind {
        Kind::Tcp => {
            let l = TcpListener::bind_with(addr, &TcpConfig::default().runtime(rt)).await?;
            eprintln!(
                "server: HTTP/{} over TCP on {addr}",
                if opts.http2 { 2 } else { 1 }
            );
            loop {
                let t = l.accept().await?;
                exec.spawn(serve(t, opts.http2, exec.clone()));
            }
        }
        Kind::Rdma => rdma_server(addr, opts, exec).await,
    }
}

#[cfg(feature = "rdma")]
async fn rdma_server(addr: SocketAddr, opts: Opts, exec: HyperExecutor) -> Result<(), BoxError> {
    let l = net_rs::drivers::rdma::listen(addr)?;
    eprintln!(
        "server: HTTP/{} over RDMA on {addr}",
        if opts.http2 { 2 } else { 1 }
    );
    loop {
        match l.accept(Duration::from_secs(1)).await {
            Ok(t) => exec.spawn(serve(t, opts.http2, exec.clone())),
            Err(e) if e.kind() == net_rs::ErrorKind::TimedOut => {}
            Err(e) => {
                // Pause before the next accept: an error that lasts must not spin.
                eprintln!("server: accept: {e}");
                smol::Timer::after(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(not(feature = "rdma"))]
async fn rdma_server(_: SocketAddr, _: Opts, _: HyperExecutor) -> Result<(), BoxError> {
    Err("built without the `rdma` feature".into())
}

/// Send `opts.requests` requests (bodies of 0 B up to 1 MiB) and check each echo.
async fn client_on<T: Transport>(t: T, opts: Opts, exec: HyperExecutor) -> Result<(), BoxError> {
    let io = ByteStream::new(t);
    let body = |i: usize| -> Bytes {
        let n = if i == 0 { 0 } else { 1 << (i % 21) };
        (0..n).map(|k| (k + i) as u8).collect::<Vec<u8>>().into()
    };
    let start = Instant::now();
    let mut bytes = 0;
    macro_rules! run {
        ($sender:expr) => {{
            let mut sender = $sender;
            for i in 0..opts.requests {
                let req = Request::post(format!("http://echo/{i}"))
                    .header("host", "echo")
                    .body(Full::new(body(i)))?;
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let got = resp.into_body().collect().await?.to_bytes();
                if got != body(i) {
                    return Err(format!("request {i}: a wrong echo ({} bytes)", got.len()).into());
                }
                bytes += got.len();
            }
        }};
    }
    if opts.http2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(exec.clone(), io).await?;
        exec.spawn(async move {
            let _ = conn.await;
        });
        run!(sender);
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        exec.spawn(async move {
            let _ = conn.await;
        });
        run!(sender);
    }
    println!(
        "client: {} requests over HTTP/{}, {bytes} bytes echoed, every answer right, {:.2} s",
        opts.requests,
        if opts.http2 { 2 } else { 1 },
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn client(addr: SocketAddr, opts: Opts, rt: Arc<dyn Runtime>) -> Result<(), BoxError> {
    let exec = HyperExecutor::new(rt.clone());
    match opts.kind {
        Kind::Tcp => {
            let t = TcpTransport::connect_with(addr, &TcpConfig::default().runtime(rt)).await?;
            client_on(t, opts, exec).await
        }
        Kind::Rdma => rdma_client(addr, opts, exec).await,
    }
}

#[cfg(feature = "rdma")]
async fn rdma_client(addr: SocketAddr, opts: Opts, exec: HyperExecutor) -> Result<(), BoxError> {
    let t = net_rs::drivers::rdma::connect(addr, Duration::from_secs(10)).await?;
    client_on(t, opts, exec).await
}

#[cfg(not(feature = "rdma"))]
async fn rdma_client(_: SocketAddr, _: Opts, _: HyperExecutor) -> Result<(), BoxError> {
    Err("built without the `rdma` feature".into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_else(|| "demo".into());
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let opts = Opts {
        kind: match flag("--transport").as_deref() {
            Some("rdma") => Kind::Rdma,
            None | Some("tcp") => Kind::Tcp,
            Some(other) => {
                eprintln!("--transport tcp|rdma, not {other}");
                std::process::exit(2);
            }
        },
        http2: flag("--http").as_deref() == Some("2"),
        requests: flag("--requests")
            .and_then(|n| n.parse().ok())
            .unwrap_or(42),
    };
    let addr: SocketAddr = args
        .get(1)
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .or_else(|| flag("--addr"))
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()
        .expect("an address: IP:PORT");
    let rt: Arc<dyn Runtime> = Arc::new(AsyncIoRuntime::with_spawner(|task| {
        smol::spawn(task).detach()
    }));
    let result = smol::block_on(async move {
        match mode.as_str() {
            "server" => server(addr, opts, rt).await,
            "client" => client(addr, opts, rt).await,
            "demo" => {
                let rt2 = rt.clone();
                smol::spawn(async move {
                    if let Err(e) = server(addr, opts, rt2).await {
                        eprintln!("server: {e}");
                    }
                })
                .detach();
                // Both HTTP versions, one after the other, against a server of each.
                let mut result = Ok(());
                for http2 in [false, true] {
                    let o = Opts { http2, ..opts };
                    let a = SocketAddr::new(addr.ip(), addr.port() + u16::from(http2));
                    if http2 {
                        let rt3 = rt.clone();
                        smol::spawn(async move {
                            if let Err(e) = server(a, o, rt3).await {
                                eprintln!("server: {e}");
                            }
                        })
                        .detach();
                    }
                    // The server needs a moment to listen.
                    smol::Timer::after(Duration::from_millis(200)).await;
                    result = result.and(client(a, o, rt.clone()).await);
                }
                result
            }
            other => Err(format!("mode server|client|demo, not {other}").into()),
        }
    });
    if let Err(e) = result {
        eprintln!("http_echo: {e}");
        std::process::exit(1);
    }
}
