//! An RDMA echo client: `cargo run --example rdma_echo_client --features rdma -- <server-ip>:18515`
//! Sends messages of several sizes, checks each echo, and prints round-trip times.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use net_rs::drivers::rdma::cm;
use net_rs::transport::Transport;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "usage: rdma_echo_client <server-ip>:<port>",
            )
        })?
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let t = cm::connect(addr, Duration::from_secs(5)).await?;
    for size in [0usize, 64, 4096, 65536, 1 << 20] {
        let msg: Bytes = (0..size).map(|i| i as u8).collect::<Vec<_>>().into();
        let t0 = Instant::now();
        t.send(msg.clone()).await?;
        let back = t.recv().await?;
        if back != msg {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "echo differs",
            ));
        }
        println!("{size:>8} B echoed in {:?}", t0.elapsed());
    }
    t.close().await?;
    Ok(())
}
