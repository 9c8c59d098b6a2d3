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
//! * TLS rows: tokio-rustls (TLS 1.3, ring, a self-signed certificate made once) over
//!   the tokio stream and over net-rs's (64 KiB chunk), and a summary of what TLS costs
//!   each: its MB/s or round trip against the same stream's without TLS.
//! * With `--transport rdma --addr IP:PORT` (feature `rdma`, the Soft-RoCE VM): the
//!   stream over net-rs RDMA and TLS over it too, beside the TCP rows.
//!
//! Each end runs on its own thread with a current-thread tokio runtime; every cell on
//! a fresh connection.

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, OnceLock};
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

/// TLS (tokio-rustls, TLS 1.3, ring) over another kind's connection, with a
/// self-signed certificate made once per run.
#[derive(Clone, Copy)]
struct Tls<K>(K);

/// The server and client configurations of the [`Tls`] rows.
fn tls_configs() -> &'static (
    Arc<tokio_rustls::rustls::ServerConfig>,
    Arc<tokio_rustls::rustls::ClientConfig>,
) {
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
    static CONFIGS: OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    })
}

impl<K: Kind> Kind for Tls<K> {
    type Io = tokio_rustls::TlsStream<K::Io>;
    fn name(self) -> String {
        format!("TLS/{}", self.0.name())
    }
    async fn accept(self, tell: mpsc::Sender<SocketAddr>) -> Self::Io {
        let io = self.0.accept(tell).await;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls_configs().0.clone());
        acceptor.accept(io).await.unwrap().into()
    }
    async fn connect(self, addr: SocketAddr) -> Self::Io {
        let io = self.0.connect(addr).await;
        let connector = tokio_rustls::TlsConnector::from(tls_configs().1.clone());
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        connector.connect(name, io).await.unwrap().into()
    }
}

/// net-rs's RDMA transport as a stream: a port of its own per connection, from
/// `--addr`'s port up.
#[cfg(feature = "rdma")]
#[derive(Clone, Copy)]
struct Rdma {
    base: SocketAddr,
}

#[cfg(feature = "rdma")]
impl Kind for Rdma {
    type Io = ByteStream<net_rs::drivers::rdma::transport::RdmaTransport>;
    fn name(self) -> String {
        "net-rs rdma".into()
    }
    async fn accept(self, tell: mpsc::Sender<SocketAddr>) -> Self::Io {
        use std::sync::atomic::{AtomicU16, Ordering};
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let port = self.base.port() + NEXT.fetch_add(1, Ordering::Relaxed);
        let addr = SocketAddr::new(self.base.ip(), port);
        let l = net_rs::drivers::rdma::listen(addr).unwrap();
        tell.send(addr).unwrap();
        ByteStream::new(l.accept(Duration::from_secs(20)).await.unwrap())
    }
    async fn connect(self, addr: SocketAddr) -> Self::Io {
        ByteStream::new(
            net_rs::drivers::rdma::connect(addr, Duration::from_secs(20))
                .await
                .unwrap(),
        )
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
            // Read what the reader's side sent (a TLS 1.3 server's session tickets)
            // until it closes: a socket closed with unread input is reset, which
            // could cut the reader short.
            let _ = io.read_to_end(&mut Vec::new()).await;
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

/// One bulk row: its MB/s, printed with its ratio to `base`.
fn bulk_row<K: Kind>(kind: K, piece: usize, d: Duration, base: Option<f64>) -> f64 {
    let r = bulk(kind, piece, d);
    let ratio = base.map_or("1.00x".to_string(), |b| format!("{:.2}x", r / b));
    println!(
        "{:>8} | {:>24} | {:>9.0} | {:>8}",
        fmt_size(piece),
        kind.name(),
        r,
        ratio
    );
    r
}

/// One ping-pong row: its median round trip, printed with its ratio to `base`'s.
fn ping_row<K: Kind>(kind: K, size: usize, d: Duration, base: Option<f64>) -> f64 {
    let r = stats(ping_pong(kind, size, d));
    let ratio = base.map_or("1.00x".to_string(), |b| format!("{:.2}x", r.median_us / b));
    println!(
        "{:>8} | {:>24} | {:>8.1} | {:>8.1} | {:>8}",
        fmt_size(size),
        kind.name(),
        r.median_us,
        r.p99_us,
        ratio
    );
    r.median_us
}

/// The RDMA rows' base address (`--transport rdma --addr IP:PORT`), if any.
#[cfg(feature = "rdma")]
fn rdma_base(args: &Args) -> Option<Rdma> {
    (args.transport == "rdma").then(|| Rdma {
        base: args.addr.unwrap_or_else(|| {
            eprintln!("netperf: --transport rdma --only stream needs --addr <device IP>:PORT");
            std::process::exit(2)
        }),
    })
}

pub fn run(args: &Args) {
    let d = args.duration;
    #[cfg(feature = "rdma")]
    let rdma = rdma_base(args);
    println!(
        "\nbyte streams: net-rs ByteStream over TCP (rows by write_chunk){} next to tokio's \
         TcpStream, and TLS (tokio-rustls, TLS 1.3) over each, {} ms per cell",
        if args.transport == "rdma" {
            " and RDMA"
        } else {
            ""
        },
        d.as_millis()
    );
    // (what, plain, with TLS) for the summary.
    let mut tls: Vec<(String, f64, f64)> = Vec::new();
    println!("\nbulk, one way (write_all of `piece` bytes, reads of 64 KiB)");
    println!(
        "{:>8} | {:>24} | {:>9} | {:>8}",
        "piece", "stream", "MB/s", "ratio"
    );
    let net = NetRs { chunk: 64 << 10 };
    for piece in [8 << 10, 1 << 20] {
        let base = bulk_row(Tokio, piece, d, None);
        let mut plain = 0.0;
        for chunk in [16 << 10, 64 << 10, 256 << 10] {
            let r = bulk_row(NetRs { chunk }, piece, d, Some(base));
            if chunk == net.chunk {
                plain = r;
            }
        }
        let t = bulk_row(Tls(Tokio), piece, d, Some(base));
        tls.push((
            format!("bulk {} pieces, tokio TcpStream", fmt_size(piece)),
            base,
            t,
        ));
        let t = bulk_row(Tls(net), piece, d, Some(base));
        tls.push((
            format!("bulk {} pieces, net-rs TCP", fmt_size(piece)),
            plain,
            t,
        ));
        #[cfg(feature = "rdma")]
        if let Some(r) = rdma {
            let plain = bulk_row(r, piece, d, Some(base));
            let t = bulk_row(Tls(r), piece, d, Some(base));
            tls.push((
                format!("bulk {} pieces, net-rs RDMA", fmt_size(piece)),
                plain,
                t,
            ));
        }
    }
    println!("\nping-pong (write + flush, read_exact), round trip in µs");
    println!(
        "{:>8} | {:>24} | {:>8} | {:>8} | {:>8}",
        "size", "stream", "median", "p99", "ratio"
    );
    for size in [64usize, 8 << 10] {
        let base = ping_row(Tokio, size, d, None);
        let plain = ping_row(net, size, d, Some(base));
        let t = ping_row(Tls(Tokio), size, d, Some(base));
        tls.push((
            format!("ping-pong {}, tokio TcpStream", fmt_size(size)),
            base,
            t,
        ));
        let t = ping_row(Tls(net), size, d, Some(base));
        tls.push((
            format!("ping-pong {}, net-rs TCP", fmt_size(size)),
            plain,
            t,
        ));
        #[cfg(feature = "rdma")]
        if let Some(r) = rdma {
            let plain = ping_row(r, size, d, Some(base));
            let t = ping_row(Tls(r), size, d, Some(base));
            tls.push((
                format!("ping-pong {}, net-rs RDMA", fmt_size(size)),
                plain,
                t,
            ));
        }
    }
    println!("\nwhat TLS costs (TLS over a stream against the same stream without it, this run):");
    for (what, plain, with) in tls {
        if what.starts_with("bulk") {
            println!("  {what}: {:.2}x the MB/s", with / plain);
        } else {
            println!("  {what}: {:.2}x the round trip", with / plain);
        }
    }
}
