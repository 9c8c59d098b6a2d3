//! The README's TCP example, exactly as written there. It connects to a net-rs (or any
//! `LengthDelimitedCodec`) server on 127.0.0.1:8080, e.g. `cargo run --example tcp_echo_server`.

use net_rs::drivers::tcp::TcpTransport;
use net_rs::transport::Transport;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let transport = TcpTransport::connect("127.0.0.1:8080").await?;
    let buf = transport.alloc_buf(1024)?;
    transport.send(buf.freeze()).await?;
    let reply = transport.recv().await?;
    println!("sent 1024 bytes, got {} back", reply.len());
    Ok(())
}
