//! net-rs's rows of the RPC table (`--only rpc`), in the harness of `rpc_baselines.rs`
//! (same threads, runtimes, warm-up, checks and bounds as tonic and tarpc):
//!
//! - `net-rs`: `net_rs::rpc::Client::call` on one `TcpTransport` shared by the
//!   in-flight tasks, against `Server::serve_connection` with an echo handler;
//! - `bare` (1 in flight only): the same transports without the RPC layer, a `send`
//!   then a `recv` per call against an echo loop of `recv` then `send`: the round trip
//!   the RPC layer's own cost is measured against.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use net_rs::drivers::tcp::{TcpListener, TcpTransport};
use net_rs::rpc::{Client, Request, Server, Status};
use net_rs::transport::Transport;

use crate::rpc_baselines::{run_cell, RpcResult, Stop};

const ECHO: u16 = 1;

/// Says when net-rs's listener is bound: the client connects only then, so no
/// connection lands in the harness's tokio listener, which is dropped (a connection
/// queued there would be reset).
type Ready = futures::channel::oneshot::Sender<()>;
type WaitReady = futures::channel::oneshot::Receiver<()>;

/// Bind net-rs's listener where the harness's was (it hands over a tokio listener:
/// its port is taken over), then say so.
async fn listen(l: tokio::net::TcpListener, ready: Ready) -> Result<TcpListener, String> {
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    drop(l);
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let _ = ready.send(());
    Ok(l)
}

/// Connect once the server is listening.
async fn connect(addr: SocketAddr, ready: WaitReady) -> Result<TcpTransport, String> {
    ready
        .await
        .map_err(|_| "the server side ended before it listened".to_string())?;
    TcpTransport::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))
}

/// Serve one connection until the client side is done.
async fn serve_rpc(l: tokio::net::TcpListener, mut stop: Stop, ready: Ready) -> Result<(), String> {
    let l = listen(l, ready).await?;
    let conn = tokio::select! {
        c = l.accept() => c.map_err(|e| format!("accept: {e}"))?,
        _ = stop.wait() => return Ok(()),
    };
    let server = Server::default();
    let echo = |req: Request| async move { Ok::<_, Status>(req.into_payload()) };
    tokio::select! {
        r = server.serve_connection(&conn, &echo) => r.map_err(|e| format!("serve: {e}")),
        _ = stop.wait() => Ok(()),
    }
}

/// Unary echo through `net_rs::rpc`: as `tonic_unary`.
pub fn netrs_unary(size: usize, in_flight: usize, duration: Duration) -> Result<RpcResult, String> {
    let (ready, wait) = futures::channel::oneshot::channel();
    let serve = move |l, stop| serve_rpc(l, stop, ready);
    run_cell(size, in_flight, duration, serve, |addr| async move {
        let client = Client::new(connect(addr, wait).await?);
        Ok(move |p: Bytes| {
            let c = client.clone();
            async move { c.call(ECHO, &p).await.map_err(|e| e.to_string()) }
        })
    })
}

/// The echo loop of the bare round trip: `recv` then `send`, until the client is done.
async fn serve_bare(
    l: tokio::net::TcpListener,
    mut stop: Stop,
    ready: Ready,
) -> Result<(), String> {
    let l = listen(l, ready).await?;
    let conn = tokio::select! {
        c = l.accept() => c.map_err(|e| format!("accept: {e}"))?,
        _ = stop.wait() => return Ok(()),
    };
    let echo = async {
        loop {
            let m = match conn.recv().await {
                Ok(m) => m,
                Err(_) => return Ok(()),
            };
            if conn.send(m).await.is_err() {
                return Ok(());
            }
        }
    };
    tokio::select! {
        r = echo => r,
        _ = stop.wait() => Ok(()),
    }
}

/// A bare `send` + `recv` round trip on the same transport (1 in flight only: with
/// more, replies could not be told apart).
pub fn bare_round_trip(
    size: usize,
    in_flight: usize,
    duration: Duration,
) -> Result<RpcResult, String> {
    if in_flight != 1 {
        return Err("the bare round trip runs with 1 in flight only".into());
    }
    let (ready, wait) = futures::channel::oneshot::channel();
    let serve = move |l, stop| serve_bare(l, stop, ready);
    run_cell(size, in_flight, duration, serve, |addr| async move {
        let t = Arc::new(connect(addr, wait).await?);
        Ok(move |p: Bytes| {
            let t = t.clone();
            async move {
                t.send(p).await.map_err(|e| e.to_string())?;
                t.recv().await.map_err(|e| e.to_string())
            }
        })
    })
}
