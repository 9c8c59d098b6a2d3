//! A server that shuts down gracefully: it stops accepting, lets every connection finish
//! the request it is serving, ends each one (FIN after the last reply, then waits for the
//! client to close), and exits within a bound.
//!
//! ```text
//! cargo run --example graceful_server                 # demo: server + clients, then shutdown
//! cargo run --example graceful_server -- serve ADDR   # serve until Ctrl-C
//! ```

use std::sync::Arc;
use std::time::Duration;

use net_rs::prelude::*;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long in-flight work may take once shutdown starts.
const GRACE: Duration = Duration::from_secs(5);

/// Serve `listener` until `stop` turns true; then drain and return.
async fn serve(listener: TcpListener, mut stop: watch::Receiver<bool>) -> Result<usize> {
    let mut conns = JoinSet::new();
    let mut served = 0usize;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    conns.spawn(handle(conn, stop.clone()));
                }
                // EMFILE and friends: log and keep the listener, after a pause (such
                // an error lasts until connections close: retrying at once would spin).
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(listener); // stop accepting: new connections are refused from here on
    let drain = async {
        while let Some(res) = conns.join_next().await {
            served += res.unwrap_or(0);
        }
    };
    if tokio::time::timeout(GRACE, drain).await.is_err() {
        eprintln!("grace period over: {} connections aborted", conns.len());
        conns.shutdown().await;
    }
    Ok(served)
}

/// Echo requests until the peer leaves or shutdown starts; returns the requests served.
async fn handle(conn: TcpTransport, mut stop: watch::Receiver<bool>) -> usize {
    let mut served = 0;
    loop {
        let request = tokio::select! {
            r = conn.recv() => r,
            // `recv` is cancel-safe: a request that arrives now stays unread and the
            // close below tells the client the connection is done.
            _ = stop.changed() => break,
        };
        let Ok(request) = request else { break };
        if conn.send(request).await.is_err() {
            break;
        }
        served += 1;
    }
    // Deliver the last replies and send FIN; then read (and drop) what the client still
    // sends until it closes too. Closing a socket with unread data makes the kernel
    // send a reset, which can destroy replies the client has not read yet. The caller
    // bounds this wait with its grace period.
    let _ = conn.shutdown().await;
    while conn.recv().await.is_ok() {}
    served
}

async fn demo() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = watch::channel(false);
    let server = tokio::spawn(serve(listener, rx));

    // Four clients, each asking until the server says it is done.
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = JoinSet::new();
    for id in 0..4u8 {
        let answered = answered.clone();
        clients.spawn(async move {
            let t = TcpTransport::connect(addr).await?;
            for i in 0u32.. {
                let mut req = vec![id];
                req.extend_from_slice(&i.to_be_bytes());
                if t.send(req.clone().into()).await.is_err() {
                    break;
                }
                match t.recv().await {
                    Ok(reply) => {
                        assert_eq!(&reply[..], &req[..], "each reply answers its request");
                        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    // The server closed: it stopped after its last reply.
                    Err(e) if e.kind() == ErrorKind::Closed => break,
                    Err(e) => return Err(e),
                }
            }
            Ok::<_, Error>(())
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(true).expect("the server is running");
    let served = tokio::time::timeout(GRACE * 2, server)
        .await
        .expect("the server stops within its grace period")
        .expect("the server task")?;
    while let Some(res) = clients.join_next().await {
        res.expect("client task")?;
    }
    let answered = answered.load(std::sync::atomic::Ordering::SeqCst);
    println!("server stopped after serving {served} requests; clients got {answered} replies");
    assert_eq!(
        served, answered,
        "every reply the server sent reached its client"
    );
    // New connections are refused now.
    let refused = TcpTransport::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => demo().await,
        Some("serve") => {
            let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
            let listener = TcpListener::bind(addr.as_str()).await?;
            println!("echoing on {} (Ctrl-C stops)", listener.local_addr()?);
            let (tx, rx) = watch::channel(false);
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                let _ = tx.send(true);
            });
            let served = serve(listener, rx).await?;
            println!("served {served} requests");
            Ok(())
        }
        Some(_) => {
            eprintln!("usage: graceful_server [serve ADDR]");
            std::process::exit(2)
        }
    }
}
