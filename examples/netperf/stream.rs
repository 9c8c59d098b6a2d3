//! The byte stream table (`--only stream`, loopback TCP): net-rs's
//! [`ByteStream`](net_rs::stream::ByteStream) over a net-rs TCP connection next to a
//! plain tokio `TcpStream` (the baseline: what a byte-stream protocol has without
//! net-rs), in the same run.
//!
//! * Bulk: the writer `write_all`s pieces of `piece` bytes for the duration, then shuts
//!   down; the reader reads into a 64 KiB buffer until the end; MB/s counted at the
//!   reader. net-rs rows for several `write_chunk`s (the size of the messages the
//!   stream makes): the default's measurement.
//! * Ping-pong: write `size` bytes and flush, the peer reads exactly that and writes
//!   it back; the round trip's median and p99 (the shape of HTTP/1.1 or gRPC calls).
//!
//! Each end runs on its own thread with a current-thread tokio runtime; every cell on
//! a fresh connection.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use net_rs::drivers::tcp::{TcpListener, TcpTransport};
use net_rs::stream::{ByteStream, StreamConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{fmt_size, stats, Args};

/// One side of a cell, on a current-thread runtime of its own.
fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

/// The two ends of a connection, each made on its own thread: `accept` binds a
/// loopback port, says which, and accepts one connection; `connect` connects to it.
trait Kind: Copy + Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + 'static;
    fn name(self) -> String;
    fn accept(self, tell: mpsc::Sender<SocketAddr>) -> impl std::future::Future<Output = Self::Io>;
    fn connect(self, addr: SocketAddr) -> impl std::future::Future<Output = Self::Io>;
}

#[derive(Clone, Copy)]
struct Tokio;

impl Kind for Tokio {
    type Io = tokio::net::TcpStream;
    fn name(self) -> String {
        "tokio TcpStream".into()
    }
    async fn accept(self, tell: mpsc::Sender<SocketAddr>) -> Self::Io {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tell.send(l.local_addr().unwrap()).unwrap();
        let s = l.accept().await.unwrap().0;
        s.set_nodelay(true).unwrap();
        s
    }
    async fn connect(self, addr: SocketAddr) -> Self::Io {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }
}

#[derive(Clone, Copy)]
struct NetRs {
    chunk: usize,
}

impl Kind for NetRs {
    type Io = ByteStream<TcpTransport>;
    fn name(self) -> String {
        format!("net-rs {}", fmt_size(self.chunk))
    }
    async fn accept(self, tell: mpsc::Sender<SocketAddr>) -> Self::Io {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tell.send(l.local_addr().unwrap()).unwrap();
        self.wrap(l.accept().await.unwrap())
    }
    async fn connect(self, addr: SocketAddr) -> Self::Io {
        self.wrap(TcpTransport::connect(addr).await.unwrap())
    }
}

impl NetRs {
    fn wrap(self, t: TcpTransport) -> ByteStream<TcpTransport> {
        ByteStream::with_config(Box::new(t), StreamConfig::default().write_chunk(self.chunk))
    }
}

/// Bulk transfer: MB/s at the reader.
fn bulk<K: Kind>(kind: K, piece: usize, duration: Duration) -> f64 {
    let (tell, told) = mpsc::channel();
    let reader = on_thread(move || {
        Box::pin(async move {
            let mut io = kind.accept(tell).await;
            let mut buf = vec![0u8; 64 << 10];
            let (mut n, start) = (0u64, Instant::now());
            loop {
                let k = io.read(&mut buf).await.unwrap();
                if k == 0 {
                    return n as f64 / start.elapsed().as_secs_f64() / 1e6;
                }
                n += k as u64;
            }
        })
    });
    let addr = told.recv().unwrap();
    let writer = on_thread(move || {
        Box::pin(async move {
            let mut io = kind.connect(addr).await;
            let data = vec![7u8; piece];
            let start = Instant::now();
            while start.elapsed() < duration {
                for _ in 0..16 {
                    io.write_all(&data).await.unwrap();
                }
            }
            io.shutdown().await.unwrap();
        })
    });
    writer.join().unwrap();
    reader.join().unwrap()
}

/// Ping-pong round trips of `size` bytes (write + flush, read exactly `size`).
fn ping_pong<K: Kind>(kind: K, size: usize, duration: Duration) -> Vec<Duration> {
    let (tell, told) = mpsc::channel();
    let echo = on_thread(move || {
        Box::pin(async move {
            let mut io = kind.accept(tell).await;
            let mut buf = vec![0u8; size];
            while io.read_exact(&mut buf).await.is_ok() {
                io.write_all(&buf).await.unwrap();
                io.flush().await.unwrap();
            }
        })
    });
    let addr = told.recv().unwrap();
    let client = on_thread(move || {
        Box::pin(async move {
            let mut io = kind.connect(addr).await;
            let data = vec![7u8; size];
            let mut back = vec![0u8; size];
            let mut rtts = Vec::new();
            let start = Instant::now();
            while start.elapsed() < duration {
                let t = Instant::now();
                io.write_all(&data).await.unwrap();
                io.flush().await.unwrap();
                io.read_exact(&mut back).await.unwrap();
                rtts.push(t.elapsed());
            }
            io.shutdown().await.unwrap();
            rtts
        })
    });
    let rtts = client.join().unwrap();
    echo.join().unwrap();
    rtts
}

pub fn run(args: &Args) {
    println!(
        "\nbyte streams over loopback TCP: net-rs ByteStream (rows by write_chunk) next to tokio's TcpStream, {} ms per cell",
        args.duration.as_millis()
    );
    println!("\nbulk, one way (write_all of `piece` bytes, reads of 64 KiB)");
    println!(
        "{:>8} | {:>18} | {:>9} | {:>8}",
        "piece", "stream", "MB/s", "ratio"
    );
    let chunks = [16 << 10, 64 << 10, 256 << 10];
    for piece in [8 << 10, 1 << 20] {
        let base = bulk(Tokio, piece, args.duration);
        println!(
            "{:>8} | {:>18} | {:>9.0} | {:>8}",
            fmt_size(piece),
            Tokio.name(),
            base,
            "1.00x"
        );
        for &chunk in &chunks {
            let k = NetRs { chunk };
            let r = bulk(k, piece, args.duration);
            println!(
                "{:>8} | {:>18} | {:>9.0} | {:>7.2}x",
                fmt_size(piece),
                k.name(),
                r,
                r / base
            );
        }
    }
    println!("\nping-pong (write + flush, read_exact), round trip in µs");
    println!(
        "{:>8} | {:>18} | {:>8} | {:>8} | {:>8}",
        "size", "stream", "median", "p99", "ratio"
    );
    for size in [64usize, 8 << 10] {
        let base = stats(ping_pong(Tokio, size, args.duration));
        println!(
            "{:>8} | {:>18} | {:>8.1} | {:>8.1} | {:>8}",
            fmt_size(size),
            Tokio.name(),
            base.median_us,
            base.p99_us,
            "1.00x"
        );
        let k = NetRs { chunk: 64 << 10 };
        let r = stats(ping_pong(k, size, args.duration));
        println!(
            "{:>8} | {:>18} | {:>8.1} | {:>8.1} | {:>7.2}x",
            fmt_size(size),
            k.name(),
            r.median_us,
            r.p99_us,
            r.median_us / base.median_us
        );
    }
}
