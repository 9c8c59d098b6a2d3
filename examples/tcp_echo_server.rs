//! A TCP echo server: `cargo run --example tcp_echo_server -- [ADDR]` (default 127.0.0.1:8080).

use net_rs::drivers::tcp::TcpListener;
use net_rs::transport::Transport;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = TcpListener::bind(addr.as_str()).await?;
    println!("echoing on {}", listener.local_addr()?);
    loop {
        let conn = listener.accept().await?;
        tokio::spawn(async move {
            while let Ok(msg) = conn.recv().await {
                if conn.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}
