//! An RDMA echo server: `cargo run --example rdma_echo_server --features rdma -- 0.0.0.0:18515`
//! (listen on the IP of an RDMA device, or 0.0.0.0; not 127.0.0.1).

use std::net::SocketAddr;
use std::time::Duration;

use net_rs::drivers::rdma::cm;
use net_rs::transport::Transport;

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0.0.0.0:18515".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = cm::listen(addr)?;
    println!("rdma echo server on {addr}");
    loop {
        let conn = match futures::executor::block_on(listener.accept(Duration::from_secs(3600))) {
            Ok(c) => c,
            Err(e) if e.is_timeout() => continue,
            // One incoming connection failed to set up (its peer went away meanwhile):
            // the listener goes on.
            Err(e) => {
                eprintln!("rdma echo server: a connection failed to set up: {e}");
                continue;
            }
        };
        std::thread::spawn(move || {
            futures::executor::block_on(async move {
                let mut n = 0u64;
                while let Ok(msg) = conn.recv().await {
                    n += 1;
                    if conn.send(msg).await.is_err() {
                        break;
                    }
                }
                let _ = conn.close().await;
                println!("connection closed after {n} messages");
            })
        });
    }
}
