//! The RDMA example, with the server address from the command line:
//! `cargo run --example rdma_seed --features rdma -- <server-ip>:18515`
//! (start `rdma_echo_server` there first).

use net_rs::drivers::rdma::cm;
use net_rs::transport::Transport;
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "192.168.1.10:18515".into());
    // RDMA-CM connect: creates an RC QP and transitions it to RTS via RDMA CM events.
    let server: SocketAddr = arg.parse().unwrap();
    let transport = cm::connect(server, Duration::from_secs(2)).await?;
    transport.send(bytes::Bytes::from_static(b"ping")).await?;
    let resp = transport.recv().await?;
    println!("got {} bytes", resp.len());
    Ok(())
}
