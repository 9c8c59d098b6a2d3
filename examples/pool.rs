//! A connection pool in front of a TCP echo server, with exponential backoff.
//!
//! `cargo run --example pool` starts its own echo server on loopback, sends through
//! the pool from several tasks, and prints the pool's status.

use std::time::Duration;

use bytes::Bytes;
use net_rs::drivers::tcp::TcpListener;
use net_rs::pool::{ConnectionPool, PoolConfig, ReconnectPolicy, TcpConnector};
use net_rs::transport::Transport;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok(conn) = listener.accept().await {
            tokio::spawn(async move {
                while let Ok(msg) = conn.recv().await {
                    if conn.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    let pool = ConnectionPool::new(
        TcpConnector::new(addr),
        PoolConfig::default()
            .max_size(4)
            .min_idle(1)
            .checkout_timeout(Duration::from_secs(2))
            .reconnect(ReconnectPolicy::exponential(
                Duration::from_millis(20),
                Duration::from_secs(2),
            ))
            .request_timeout(Some(Duration::from_secs(1))),
    )?;

    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            // One request, one reply: if it fails or is cancelled midway, the
            // connection is discarded, so a late reply never reaches another task.
            let reply = pool.request(Bytes::from(vec![i; 16])).await?;
            assert_eq!(reply[0], i);
            Ok::<_, net_rs::Error>(())
        }));
    }
    for t in tasks {
        t.await.expect("task panicked")?;
    }
    println!("{}", pool.status());
    pool.close().await;
    Ok(())
}
