//! The same key-value server twice: on net-rs, and on tokio-util's
//! `Framed<TcpStream, LengthDelimitedCodec>` (same wire format).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use net_rs::drivers::tcp::TcpListener;
use net_rs::transport::Transport;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::proto::Store;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// net-rs: `TcpListener::accept`, per connection `recv` -> handle -> `send`.
    NetRs,
    /// `Framed`: `next()` -> handle -> `send()` (`SinkExt::send` flushes every reply).
    FramedSend,
    /// `Framed`: `next()` -> handle -> `feed()`, and `flush()` only when no more input
    /// is buffered (replies to requests that arrived together leave together).
    FramedFeed,
}

impl Impl {
    pub const ALL: [Impl; 3] = [Impl::NetRs, Impl::FramedSend, Impl::FramedFeed];

    pub fn name(self) -> &'static str {
        match self {
            Impl::NetRs => "net-rs",
            Impl::FramedSend => "Framed send",
            Impl::FramedFeed => "Framed feed+flush",
        }
    }

    /// The name of its runtime's threads (at most 15 bytes: Linux truncates longer
    /// names), by which `bench` finds the CPU time they use.
    pub fn thread_name(self) -> &'static str {
        match self {
            Impl::NetRs => "kv-netrs",
            Impl::FramedSend => "kv-framed-send",
            Impl::FramedFeed => "kv-framed-feed",
        }
    }

    pub fn parse(s: &str) -> Option<Impl> {
        match s {
            "netrs" | "net-rs" => Some(Impl::NetRs),
            "framed" | "framed-send" => Some(Impl::FramedSend),
            "framed-feed" => Some(Impl::FramedFeed),
            _ => None,
        }
    }
}

/// A running server: its address, and the runtime it runs on (dropping this stops it).
pub struct Server {
    pub addr: SocketAddr,
    pub imp: Impl,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A multi-thread tokio runtime with `workers` worker threads named `name`.
pub fn runtime(name: &str, workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Start `imp` on `addr` on a runtime of its own with 2 worker threads.
pub fn start(imp: Impl, addr: &str) -> io::Result<Server> {
    let rt = runtime(imp.thread_name(), 2);
    let store = Arc::new(Store::default());
    let addr = match imp {
        Impl::NetRs => {
            // Bind inside the runtime: net-rs picks up the tokio runtime it runs in.
            let listener = rt.block_on(TcpListener::bind(addr))?;
            let local = listener.local_addr()?;
            rt.spawn(serve_netrs(listener, store));
            local
        }
        Impl::FramedSend | Impl::FramedFeed => {
            let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
            let local = listener.local_addr()?;
            rt.spawn(serve_framed(listener, store, imp == Impl::FramedFeed));
            local
        }
    };
    Ok(Server {
        addr,
        imp,
        rt: Some(rt),
    })
}

async fn serve_netrs(listener: TcpListener, store: Arc<Store>) {
    loop {
        let conn = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("kv: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            // Ends when the client closes the connection (`Closed`) or it fails.
            while let Ok(req) = conn.recv().await {
                let reply = store.handle(&req);
                if conn.send(reply).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn serve_framed(listener: tokio::net::TcpListener, store: Arc<Store>, feed: bool) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("kv: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // net-rs sets TCP_NODELAY by default; request/response needs it here too.
        let _ = stream.set_nodelay(true);
        let store = store.clone();
        tokio::spawn(async move {
            let mut framed = Framed::new(stream, LengthDelimitedCodec::new());
            while let Some(Ok(req)) = framed.next().await {
                let reply = store.handle(&req);
                let sent = if feed {
                    // Flush only when nothing more is buffered: requests that came in
                    // together are answered with one write. (A partial frame in the
                    // buffer also holds the flush back until it completes; clients
                    // send whole frames, so it does complete.)
                    match framed.feed(reply).await {
                        Ok(()) if framed.read_buffer().is_empty() => {
                            SinkExt::<Bytes>::flush(&mut framed).await
                        }
                        r => r,
                    }
                } else {
                    framed.send(reply).await
                };
                if sent.is_err() {
                    break;
                }
            }
        });
    }
}
