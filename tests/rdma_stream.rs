//! Byte-stream protocols over the RDMA transport on a real device (features `rdma`,
//! `hyper`, `grpc`; see `tests/rdma_device.rs` for when these run and when they skip):
//!
//! 1. the byte stream itself: writes of 1 B to 16 MiB through an echo, in registered
//!    memory, then a half-close;
//! 2. hyper HTTP/1.1 and HTTP/2 under tokio and under smol;
//! 3. rustls (tokio-rustls) with a certificate made in the test;
//! 4. tonic: unary and bidirectional streaming, then the server killed (its runtime
//!    dropped, every connection with it) and started again mid-load: every call ends
//!    in bounded time and the client recovers through its pool by itself; over RDMA
//!    and, for comparison on the same device address, over net-rs TCP.
//!
//! Every wait is bounded: a regression fails, it does not hang.
#![cfg(all(
    feature = "rdma",
    feature = "async-std",
    feature = "hyper",
    feature = "grpc"
))]

mod rdma_env;
use rdma_env::{device_ip, within};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use net_rs::drivers::rdma::{self, RdmaListener};
use net_rs::grpc::GrpcConnector;
use net_rs::pool::{ConnectionPool, PoolConfig, RdmaConnector, ReconnectPolicy, TcpConnector};
use net_rs::runtime::Runtime;
use net_rs::stream::{ByteStream, HyperExecutor};

mod stream_env;
use stream_env::helloworld::greeter_client::GreeterClient;
use stream_env::helloworld::greeter_server::GreeterServer;
use stream_env::helloworld::HelloRequest;
use stream_env::MyGreeter;

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

fn pattern(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 + seed) as u8).collect()
}

#[test]
fn a_byte_stream_over_rdma_echoes_every_size() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 19200);
    let listener = listen_on(addr);
    within(180, "stream echo over RDMA", move || {
        let server = std::thread::spawn(move || {
            futures::executor::block_on(async move {
                let t = listener.accept(Duration::from_secs(30)).await.unwrap();
                let mut s = ByteStream::new(t);
                let mut buf = vec![0u8; 100_000];
                let mut n = 0usize;
                loop {
                    let k = s.read(&mut buf).await.unwrap();
                    if k == 0 {
                        break;
                    }
                    s.write_all(&buf[..k]).await.unwrap();
                    s.flush().await.unwrap();
                    n += k;
                }
                s.close().await.unwrap();
                n
            })
        });
        futures::executor::block_on(async move {
            let t = rdma::connect(addr, Duration::from_secs(20)).await.unwrap();
            let mut s = ByteStream::new(t);
            let mut total = 0;
            for (i, n) in [1usize, 100, 4096, 65_536, 65_537, 1 << 20, 16 << 20]
                .into_iter()
                .enumerate()
            {
                let data = pattern(n, i);
                let (mut r, mut w) = s.split();
                let writer = async {
                    w.write_all(&data).await.unwrap();
                    w.flush().await.unwrap();
                };
                let mut back = vec![0u8; n];
                let reader = r.read_exact(&mut back);
                let (_, got) = futures::join!(writer, reader);
                got.unwrap();
                assert!(back == data, "{n} bytes: the echo differs");
                s = r.reunite(w).unwrap();
                total += n;
            }
            s.close().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            assert_eq!(server.join().unwrap(), total);
        });
    });
}

async fn echo(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    Ok(hyper::Response::new(Full::new(body.unwrap_or_default())))
}

/// HTTP/1.1 then HTTP/2 on connections to one RDMA listener, under `rt`.
async fn http_over_rdma(rt: Arc<dyn Runtime>, addr: SocketAddr) {
    let exec = HyperExecutor::new(rt.clone());
    let listener = listen_on(addr);
    let ex = exec.clone();
    // RDMA-CM's accept blocks a thread: it runs on one of its own (inside `accept`).
    exec.spawn(async move {
        for http2 in [false, true] {
            let t = listener.accept(Duration::from_secs(30)).await.unwrap();
            let io = ByteStream::new(t);
            let svc = hyper::service::service_fn(echo);
            let ex2 = ex.clone();
            ex.spawn(async move {
                let r = if http2 {
                    hyper::server::conn::http2::Builder::new(ex2)
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                };
                if let Err(e) = r {
                    eprintln!("server connection: {e}");
                }
            });
        }
    });
    let sizes = [0usize, 10, 5000, 70_000, 2 << 20];
    let body = |i: usize| -> Bytes { pattern(sizes[i], i).into() };
    // HTTP/1.1
    let io = ByteStream::new(rdma::connect(addr, Duration::from_secs(20)).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    exec.spawn(async move {
        let _ = conn.await;
    });
    for i in 0..sizes.len() {
        sender.ready().await.unwrap();
        let req = hyper::Request::post("/one")
            .header("host", "rdma")
            .body(Full::new(body(i)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(got == body(i), "HTTP/1.1 over RDMA: body {i} differs");
    }
    // HTTP/2, all requests at once.
    let io = ByteStream::new(rdma::connect(addr, Duration::from_secs(20)).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(exec.clone(), io)
        .await
        .unwrap();
    exec.spawn(async move {
        let _ = conn.await;
    });
    let calls = (0..sizes.len()).map(|i| {
        let mut sender = sender.clone();
        async move {
            let req = hyper::Request::post("http://rdma/two")
                .body(Full::new(body(i)))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(got == body(i), "HTTP/2 over RDMA: body {i} differs");
        }
    });
    futures::future::join_all(calls).await;
}

#[test]
fn hyper_http1_and_http2_over_rdma_under_tokio() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 19201);
    within(180, "HTTP over RDMA under tokio", move || {
        let t = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let rt: Arc<dyn Runtime> = Arc::new(net_rs::runtime::tokio::TokioRuntime::new(
            t.handle().clone(),
        ));
        t.block_on(http_over_rdma(rt, addr));
    });
}

#[test]
fn hyper_http1_and_http2_over_rdma_under_smol() {
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 19202);
    within(180, "HTTP over RDMA under smol", move || {
        let rt: Arc<dyn Runtime> =
            Arc::new(net_rs::runtime::async_io::AsyncIoRuntime::with_spawner(
                |task| smol::spawn(task).detach(),
            ));
        smol::block_on(http_over_rdma(rt, addr));
    });
}

#[test]
fn rustls_over_rdma() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::ServerName;
    let Some(ip) = device_ip() else { return };
    let addr = SocketAddr::new(ip, 19203);
    within(180, "TLS over RDMA", move || {
        let (server_cfg, client_cfg) = stream_env::tls_configs();
        let listener = listen_on(addr);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let server = tokio::spawn(async move {
                    let t = listener.accept(Duration::from_secs(30)).await.unwrap();
                    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
                    let mut tls = acceptor.accept(ByteStream::new(t)).await.unwrap();
                    let mut got = Vec::new();
                    tls.read_to_end(&mut got).await.unwrap();
                    tls.write_all(&got).await.unwrap();
                    tls.shutdown().await.unwrap();
                    got.len()
                });
                let t = rdma::connect(addr, Duration::from_secs(20)).await.unwrap();
                let connector = tokio_rustls::TlsConnector::from(client_cfg);
                let name = ServerName::try_from("localhost").unwrap();
                let mut tls = connector.connect(name, ByteStream::new(t)).await.unwrap();
                let data = pattern(3 << 20, 1);
                tls.write_all(&data).await.unwrap();
                tls.shutdown().await.unwrap();
                let mut back = Vec::new();
                tls.read_to_end(&mut back).await.unwrap();
                assert!(back == data, "TLS over RDMA: the echo differs");
                assert_eq!(server.await.unwrap(), data.len());
            });
    });
}

/// Which transport a gRPC test runs over (both on the device's address in the VM).
#[derive(Clone, Copy, Debug)]
enum Wire {
    Rdma,
    Tcp,
}

/// A gRPC server on a runtime of its own (dropping it kills the server and its
/// connections).
fn grpc_server(addr: SocketAddr, wire: Wire) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let router = tonic::transport::Server::builder().add_service(GreeterServer::new(MyGreeter {
        loopback_peer: false,
    }));
    match wire {
        Wire::Rdma => {
            let l = listen_on(addr);
            rt.spawn(async move {
                router
                    .serve_with_incoming(net_rs::grpc::rdma_incoming(l))
                    .await
                    .unwrap();
            });
        }
        Wire::Tcp => {
            let l = rt.block_on(stream_env::bind_retrying(addr));
            rt.spawn(async move {
                router
                    .serve_with_incoming(net_rs::grpc::tcp_incoming(l))
                    .await
                    .unwrap();
            });
        }
    }
    rt
}

/// A tonic channel to `addr` through a net-rs pool over `wire`.
fn grpc_channel(addr: SocketAddr, wire: Wire) -> tonic::transport::Channel {
    let config = PoolConfig::default()
        .checkout_timeout(Duration::from_secs(10))
        .reconnect(ReconnectPolicy::fixed(Duration::from_millis(50)));
    let endpoint = tonic::transport::Endpoint::from_static("http://greeter");
    match wire {
        Wire::Rdma => {
            let pool =
                ConnectionPool::new(RdmaConnector::new(addr, Duration::from_secs(5)), config)
                    .unwrap();
            endpoint.connect_with_connector_lazy(GrpcConnector::new(pool))
        }
        Wire::Tcp => {
            let pool = ConnectionPool::new(TcpConnector::new(addr), config).unwrap();
            endpoint.connect_with_connector_lazy(GrpcConnector::new(pool))
        }
    }
}

#[test]
fn tonic_over_rdma_unary_streaming_and_a_server_restart() {
    let Some(ip) = device_ip() else { return };
    tonic_unary_streaming_and_a_server_restart(SocketAddr::new(ip, 19204), Wire::Rdma);
}

/// The same over net-rs TCP on the VM's device address, next to the RDMA runs.
#[test]
fn tonic_over_tcp_unary_streaming_and_a_server_restart() {
    let Some(ip) = device_ip() else { return };
    tonic_unary_streaming_and_a_server_restart(SocketAddr::new(ip, 19206), Wire::Tcp);
}

fn tonic_unary_streaming_and_a_server_restart(addr: SocketAddr, wire: Wire) {
    within(300, &format!("gRPC over {wire:?}"), move || {
        let server = grpc_server(addr, wire);
        let client_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        client_rt.block_on(async move {
            let mut greeter = GreeterClient::new(grpc_channel(addr, wire));
            for i in 0..20 {
                let r = greeter
                    .say_hello(HelloRequest {
                        name: format!("n{i}"),
                    })
                    .await
                    .unwrap();
                assert_eq!(r.into_inner().message, format!("Hello n{i}"));
            }
            let names: Vec<String> = (0..50)
                .map(|i| "y".repeat(if i % 10 == 0 { 200_000 } else { i }))
                .collect();
            let reqs =
                futures::stream::iter(names.clone().into_iter().map(|name| HelloRequest { name }));
            let mut replies = greeter.chat(reqs).await.unwrap().into_inner();
            let mut got = 0;
            while let Some(r) = replies.message().await.unwrap() {
                assert_eq!(r.message, format!("Hello {}", names[got]));
                got += 1;
            }
            assert_eq!(got, names.len());

            // Kill and restart mid-load.
            let done = Arc::new(AtomicBool::new(false));
            let restarted = Arc::new(AtomicBool::new(false));
            let (ok_after, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let mut tasks = Vec::new();
            for task in 0..8 {
                let mut g = greeter.clone();
                let (done, restarted, ok_after, failed) = (
                    done.clone(),
                    restarted.clone(),
                    ok_after.clone(),
                    failed.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut seq = 0u64;
                    while !done.load(Ordering::SeqCst) {
                        seq += 1;
                        let name = format!("{task}-{seq}");
                        let r = tokio::time::timeout(
                            Duration::from_secs(30),
                            g.say_hello(HelloRequest { name: name.clone() }),
                        )
                        .await
                        .unwrap_or_else(|_| panic!("a call still waited after 30 s"));
                        match r {
                            Ok(reply) => {
                                assert_eq!(reply.into_inner().message, format!("Hello {name}"));
                                if restarted.load(Ordering::SeqCst) {
                                    ok_after.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Err(s) => {
                                let lost = match s.code() {
                                    tonic::Code::Unavailable => true,
                                    tonic::Code::Unknown => s.message().contains("transport error"),
                                    tonic::Code::Cancelled => s.message().contains("canceled"),
                                    _ => false,
                                };
                                assert!(lost, "not a lost connection's error: {s:?}");
                                failed.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            server.shutdown_background();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let server = tokio::task::spawn_blocking(move || grpc_server(addr, wire))
                .await
                .unwrap();
            restarted.store(true, Ordering::SeqCst);
            let t = Instant::now();
            while ok_after.load(Ordering::SeqCst) < 50 {
                assert!(
                    t.elapsed() < Duration::from_secs(90),
                    "no recovery within 90 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            done.store(true, Ordering::SeqCst);
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(40), t)
                    .await
                    .expect("a calling task still ran after 40 s")
                    .unwrap();
            }
            eprintln!(
                "gRPC over {wire:?}, server killed and restarted: {} calls failed, {} replies after",
                failed.load(Ordering::SeqCst),
                ok_after.load(Ordering::SeqCst)
            );
            server.shutdown_background();
        });
    });
}
