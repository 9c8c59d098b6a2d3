//! gRPC (tonic) over net-rs, TCP or RDMA: the greeter, with a unary call and a
//! bidirectional stream. The client's connections come from a net-rs
//! `ConnectionPool` through `GrpcConnector` (its reconnect policy retries a refused
//! connect); the server takes its connections from a net-rs listener through
//! `tcp_incoming` / `rdma_incoming`. The service code is what tonic-prost-build makes
//! of `helloworld.proto` (in `helloworld.rs`, kept as generated).
//!
//! ```text
//! cargo run --example grpc_greeter --features grpc -- demo
//! cargo run --example grpc_greeter --features grpc -- server 127.0.0.1:50051
//! cargo run --example grpc_greeter --features grpc -- client 127.0.0.1:50051 [--calls 100]
//! # RDMA (a device's IP), e.g. in the Soft-RoCE VM:
//! cargo run --example grpc_greeter --features grpc,rdma -- demo --transport rdma --addr 198.18.0.1:50051
//! ```

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use net_rs::grpc::GrpcConnector;
use net_rs::pool::{ConnectionPool, Connector, PoolConfig, ReconnectPolicy, TcpConnector};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

#[allow(clippy::all, missing_docs, unreachable_pub)]
mod helloworld {
    include!("helloworld.rs");
}

use helloworld::greeter_client::GreeterClient;
use helloworld::greeter_server::{Greeter, GreeterServer};
use helloworld::{HelloReply, HelloRequest};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Default)]
struct MyGreeter;

#[tonic::async_trait]
impl Greeter for MyGreeter {
    async fn say_hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let from = req.remote_addr();
        Ok(Response::new(HelloReply {
            message: format!("Hello {} (you are {from:?})", req.into_inner().name),
        }))
    }

    type ChatStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send>>;

    async fn chat(
        &self,
        req: Request<Streaming<HelloRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let replies = req.into_inner().map(|r| {
            r.map(|h| HelloReply {
                message: format!("Hello {}", h.name),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Tcp,
    Rdma,
}

async fn server(addr: SocketAddr, kind: Kind) -> Result<(), BoxError> {
    let svc = GreeterServer::new(MyGreeter);
    match kind {
        Kind::Tcp => {
            let l = net_rs::drivers::tcp::TcpListener::bind(addr).await?;
            eprintln!("server: gRPC over net-rs TCP on {addr}");
            Server::builder()
                .add_service(svc)
                .serve_with_incoming(net_rs::grpc::tcp_incoming(l))
                .await?;
        }
        Kind::Rdma => rdma_server(addr, svc).await?,
    }
    Ok(())
}

#[cfg(feature = "rdma")]
async fn rdma_server(addr: SocketAddr, svc: GreeterServer<MyGreeter>) -> Result<(), BoxError> {
    let l = net_rs::drivers::rdma::listen(addr)?;
    eprintln!("server: gRPC over net-rs RDMA on {addr}");
    Server::builder()
        .add_service(svc)
        .serve_with_incoming(net_rs::grpc::rdma_incoming(l))
        .await?;
    Ok(())
}

#[cfg(not(feature = "rdma"))]
async fn rdma_server(_: SocketAddr, _: GreeterServer<MyGreeter>) -> Result<(), BoxError> {
    Err("built without the `rdma` feature".into())
}

/// A tonic channel whose connections come from a net-rs pool of `connector`'s.
async fn channel<C: Connector>(connector: C) -> Result<Channel, BoxError> {
    let pool = ConnectionPool::new(
        connector,
        PoolConfig::default()
            .checkout_timeout(Duration::from_secs(10))
            .reconnect(ReconnectPolicy::exponential(
                Duration::from_millis(20),
                Duration::from_secs(1),
            )),
    )?;
    // The URI is what HTTP/2 calls the authority; the pool's connector picks the peer.
    Ok(Endpoint::from_static("http://greeter")
        .connect_with_connector(GrpcConnector::new(pool))
        .await?)
}

async fn client(addr: SocketAddr, kind: Kind, calls: usize) -> Result<(), BoxError> {
    let channel = match kind {
        Kind::Tcp => channel(TcpConnector::new(addr)).await?,
        Kind::Rdma => rdma_channel(addr).await?,
    };
    let mut greeter = GreeterClient::new(channel);
    let start = Instant::now();
    for i in 0..calls {
        let reply = greeter
            .say_hello(HelloRequest {
                name: format!("net-rs {i}"),
            })
            .await?
            .into_inner();
        if !reply.message.starts_with(&format!("Hello net-rs {i} ")) {
            return Err(format!("a wrong reply: {}", reply.message).into());
        }
        if i == 0 {
            println!("client: {}", reply.message);
        }
    }
    let unary = start.elapsed();
    let names: Vec<String> = (0..calls).map(|i| format!("stream {i}")).collect();
    let requests =
        futures::stream::iter(names.clone().into_iter().map(|name| HelloRequest { name }));
    let mut replies = greeter.chat(requests).await?.into_inner();
    let mut got = Vec::new();
    while let Some(r) = replies.message().await? {
        got.push(r.message);
    }
    let want: Vec<String> = names.iter().map(|n| format!("Hello {n}")).collect();
    if got != want {
        return Err(format!(
            "the stream's replies differ: {} of {}",
            got.len(),
            want.len()
        )
        .into());
    }
    println!(
        "client: {calls} unary calls in {:.3} s, a stream of {calls} messages each way, every reply right",
        unary.as_secs_f64()
    );
    Ok(())
}

#[cfg(feature = "rdma")]
async fn rdma_channel(addr: SocketAddr) -> Result<Channel, BoxError> {
    channel(net_rs::pool::RdmaConnector::new(
        addr,
        Duration::from_secs(5),
    ))
    .await
}

#[cfg(not(feature = "rdma"))]
async fn rdma_channel(_: SocketAddr) -> Result<Channel, BoxError> {
    Err("built without the `rdma` feature".into())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_else(|| "demo".into());
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let kind = match flag("--transport").as_deref() {
        Some("rdma") => Kind::Rdma,
        None | Some("tcp") => Kind::Tcp,
        Some(other) => {
            eprintln!("--transport tcp|rdma, not {other}");
            std::process::exit(2);
        }
    };
    let calls = flag("--calls").and_then(|n| n.parse().ok()).unwrap_or(100);
    let addr: SocketAddr = args
        .get(1)
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .or_else(|| flag("--addr"))
        .unwrap_or_else(|| "127.0.0.1:50051".into())
        .parse()
        .expect("an address: IP:PORT");
    let result = match mode.as_str() {
        "server" => server(addr, kind).await,
        "client" => client(addr, kind, calls).await,
        "demo" => {
            // The client starts first: its pool retries the refused connects until the
            // server listens.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if let Err(e) = server(addr, kind).await {
                    eprintln!("server: {e}");
                }
            });
            client(addr, kind, calls).await
        }
        other => Err(format!("mode server|client|demo, not {other}").into()),
    };
    if let Err(e) = result {
        eprintln!("grpc_greeter: {e}");
        std::process::exit(1);
    }
}
