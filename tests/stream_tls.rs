//! TLS by composition: rustls over the byte stream, with a self-signed certificate made
//! in the test (rcgen). tokio-rustls under tokio, futures-rustls under smol (no tokio).
//! The client checks the server's certificate against that one root; data both ways,
//! large and small, then TLS's own close (`close_notify`) and the half-close under it.
//! Every wait is bounded.
#![cfg(all(feature = "tokio", feature = "async-std"))]

mod common;
mod stream_env;

use std::sync::Arc;

use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::runtime::Runtime;
use net_rs::stream::ByteStream;
use stream_env::tls_configs as configs;
use tokio_rustls::rustls::pki_types::ServerName;

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

async fn pair(rt: &Arc<dyn Runtime>) -> (TcpTransport, TcpTransport) {
    let cfg = TcpConfig::default().runtime(rt.clone());
    let l = TcpListener::bind_with("127.0.0.1:0", &cfg).await.unwrap();
    let addr = l.local_addr().unwrap();
    let accept = common::spawn(rt, async move { l.accept().await.unwrap() });
    let c = TcpTransport::connect_with(addr, &cfg).await.unwrap();
    (c, common::deadline(rt, accept).await.unwrap())
}

/// tokio-rustls: the handshake, 1 B and 5 MiB each way (the echo reads to the
/// client's close_notify, then answers and closes), the server's certificate checked.
#[test]
fn tls_with_tokio_rustls_under_tokio() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    common::run_tokio_multi_thread(|rt| {
        Box::pin(async move {
            let (server_cfg, client_cfg) = configs();
            let (c, s) = pair(&rt).await;
            let server = tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
                let mut tls = acceptor.accept(ByteStream::new(s)).await.unwrap();
                let mut got = Vec::new();
                tls.read_to_end(&mut got).await.unwrap();
                tls.write_all(&got).await.unwrap();
                tls.shutdown().await.unwrap();
                got.len()
            });
            let connector = tokio_rustls::TlsConnector::from(client_cfg);
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = common::deadline(&rt, connector.connect(name, ByteStream::new(c)))
                .await
                .unwrap();
            let data = [payload(1), payload(5 << 20)].concat();
            let (mut r, mut w) = tokio::io::split(tls);
            let d = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&d).await.unwrap();
                w.shutdown().await.unwrap();
                w
            });
            let mut back = Vec::new();
            common::deadline(&rt, r.read_to_end(&mut back))
                .await
                .unwrap();
            let w = common::deadline(&rt, writer).await.unwrap();
            tls = r.unsplit(w);
            assert!(back == data, "the echoed bytes differ");
            assert_eq!(common::deadline(&rt, server).await.unwrap(), data.len());
            let (_, session) = tls.get_ref();
            assert!(session.peer_certificates().is_some());
        })
    });
}

/// A client that does not trust the server's certificate fails the handshake, with
/// an error and no hang.
#[test]
fn an_untrusted_certificate_fails_the_handshake() {
    common::run_tokio_current_thread(|rt| {
        Box::pin(async move {
            let (server_cfg, _) = configs();
            let (_, stranger) = configs();
            let (c, s) = pair(&rt).await;
            let server = tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
                acceptor.accept(ByteStream::new(s)).await.is_err()
            });
            let connector = tokio_rustls::TlsConnector::from(stranger);
            let name = ServerName::try_from("localhost").unwrap();
            let err = common::deadline(&rt, connector.connect(name, ByteStream::new(c)))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
            assert!(common::deadline(&rt, server).await.unwrap());
        })
    });
}

/// futures-rustls under smol: the same over the futures-io traits, no tokio at all.
#[test]
fn tls_with_futures_rustls_under_smol() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    common::run_smol(|rt| {
        Box::pin(async move {
            let (server_cfg, client_cfg) = configs();
            let (c, s) = pair(&rt).await;
            let server = common::spawn(&rt, async move {
                let acceptor = futures_rustls::TlsAcceptor::from(server_cfg);
                let mut tls = acceptor.accept(ByteStream::new(s)).await.unwrap();
                let mut got = Vec::new();
                tls.read_to_end(&mut got).await.unwrap();
                tls.write_all(&got).await.unwrap();
                tls.close().await.unwrap();
                got.len()
            });
            let connector = futures_rustls::TlsConnector::from(client_cfg);
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = common::deadline(&rt, connector.connect(name, ByteStream::new(c)))
                .await
                .unwrap();
            let data = [payload(1000), payload(3 << 20)].concat();
            // Small enough for the peer to buffer whole: write all, close, then read.
            common::deadline(&rt, tls.write_all(&data)).await.unwrap();
            common::deadline(&rt, tls.close()).await.unwrap();
            let mut back = Vec::new();
            common::deadline(&rt, tls.read_to_end(&mut back))
                .await
                .unwrap();
            assert!(back == data, "the echoed bytes differ");
            assert_eq!(common::deadline(&rt, server).await.unwrap(), data.len());
        })
    });
}
