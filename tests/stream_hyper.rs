//! hyper 1.x over the byte stream (feature `hyper`): HTTP/1.1 and HTTP/2, client and
//! server, over a net-rs TCP connection, under every runtime (tokio current-thread and
//! multi-thread, async-std, smol, `futures::executor::block_on` with the default
//! runtime). hyper's tasks are spawned through `HyperExecutor` on the net-rs runtime:
//! no tokio needed. Every wait is bounded.
#![cfg(all(feature = "hyper", feature = "tokio", feature = "async-std"))]

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use common::{deadline, spawn, Case};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::runtime::Runtime;
use net_rs::stream::{ByteStream, HyperExecutor};

/// Echoes the request body, with the method and path in a header.
async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let what = format!("{} {}", req.method(), req.uri().path());
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body = body.unwrap_or_default();
    Ok(Response::builder()
        .header("x-echo-of", what)
        .body(Full::new(body))
        .unwrap())
}

#[derive(Clone, Copy, Debug)]
enum Http {
    One,
    Two,
}

/// A server (on the runtime) serving every connection with `version`; its address.
async fn server(rt: &Arc<dyn Runtime>, version: Http) -> std::net::SocketAddr {
    let cfg = TcpConfig::default().runtime(rt.clone());
    let l = TcpListener::bind_with("127.0.0.1:0", &cfg).await.unwrap();
    let addr = l.local_addr().unwrap();
    let exec = HyperExecutor::new(rt.clone());
    rt.spawn(Box::pin(async move {
        while let Ok(t) = l.accept().await {
            let io = ByteStream::new(t);
            let svc = hyper::service::service_fn(echo);
            let ex = exec.clone();
            exec.spawn(async move {
                let r = match version {
                    Http::One => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    }
                    Http::Two => {
                        hyper::server::conn::http2::Builder::new(ex)
                            .serve_connection(io, svc)
                            .await
                    }
                };
                if let Err(e) = r {
                    eprintln!("server connection: {e}");
                }
            });
        }
    }));
    addr
}

/// Requests with bodies of 0 B to 3 MiB, several in flight at once on HTTP/2, each
/// answered with its own body.
async fn requests_over(rt: Arc<dyn Runtime>, version: Http) {
    let addr = server(&rt, version).await;
    let cfg = TcpConfig::default().runtime(rt.clone());
    let t = TcpTransport::connect_with(addr, &cfg).await.unwrap();
    let io = ByteStream::new(t);
    let exec = HyperExecutor::new(rt.clone());
    let sizes = [0usize, 1, 1000, 70_000, 3 << 20];
    let body = |i: usize, n: usize| -> Bytes {
        (0..n)
            .map(|k| (k * 31 + i) as u8)
            .collect::<Vec<_>>()
            .into()
    };
    match version {
        Http::One => {
            let (mut sender, conn) = deadline(&rt, hyper::client::conn::http1::handshake(io))
                .await
                .unwrap();
            exec.spawn(async move {
                let _ = conn.await;
            });
            for (i, &n) in sizes.iter().enumerate() {
                let req = Request::post(format!("/one/{i}"))
                    .header("host", "test")
                    .body(Full::new(body(i, n)))
                    .unwrap();
                // HTTP/1.1: one request at a time; `ready` waits for the last to end.
                deadline(&rt, sender.ready()).await.unwrap();
                let resp = deadline(&rt, sender.send_request(req)).await.unwrap();
                assert_eq!(resp.headers()["x-echo-of"], format!("POST /one/{i}"));
                let got = deadline(&rt, resp.into_body().collect()).await.unwrap();
                assert!(got.to_bytes() == body(i, n), "HTTP/1.1 body {i} differs");
            }
        }
        Http::Two => {
            let (sender, conn) =
                deadline(&rt, hyper::client::conn::http2::handshake(exec.clone(), io))
                    .await
                    .unwrap();
            exec.spawn(async move {
                let _ = conn.await;
            });
            let mut calls = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let mut sender = sender.clone();
                calls.push(spawn(&rt, async move {
                    let req = Request::post(format!("http://test/two/{i}"))
                        .body(Full::new(body(i, n)))
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.headers()["x-echo-of"], format!("POST /two/{i}"));
                    let got = resp.into_body().collect().await.unwrap().to_bytes();
                    assert!(got == body(i, n), "HTTP/2 body {i} differs");
                }));
            }
            for c in calls {
                deadline(&rt, c).await.expect("a request task panicked");
            }
        }
    }
}

macro_rules! under_every_runtime {
    ($($name:ident: $version:expr;)*) => {
        $(
            mod $name {
                use super::*;
                fn case(rt: Arc<dyn Runtime>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
                    Box::pin(requests_over(rt, $version))
                }
                const CASE: Case = case;
                #[test]
                fn tokio_current_thread() {
                    common::run_tokio_current_thread(CASE);
                }
                #[test]
                fn tokio_multi_thread() {
                    common::run_tokio_multi_thread(CASE);
                }
                #[test]
                fn async_std() {
                    common::run_async_std(CASE);
                }
                #[test]
                fn smol() {
                    common::run_smol(CASE);
                }
                #[test]
                fn block_on_default_runtime() {
                    let rt = net_rs::runtime::default_runtime().unwrap();
                    futures::executor::block_on(CASE(rt));
                }
            }
        )*
    };
}

under_every_runtime! {
    http1: Http::One;
    http2: Http::Two;
}
