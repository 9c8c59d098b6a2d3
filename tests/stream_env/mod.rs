//! What the byte-stream test binaries share: a TLS server and client configuration
//! around a certificate made in the test, and (feature `grpc`) the greeter service of
//! `examples/grpc_greeter` with its generated code, and a TCP bind that waits for a
//! restarted server's port.
// Each test binary uses some of the helpers.
#![allow(dead_code)]

use std::sync::Arc;

use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

/// A server and a client configuration sharing a fresh self-signed certificate for
/// `localhost` (rcgen; rustls with ring).
pub fn tls_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
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
}

#[cfg(feature = "grpc")]
#[allow(clippy::all, missing_docs, unreachable_pub, dead_code)]
pub mod helloworld {
    include!("../../examples/grpc_greeter/helloworld.rs");
}

#[cfg(feature = "grpc")]
#[allow(unused_imports)]
pub use greeter::MyGreeter;

#[cfg(feature = "grpc")]
mod greeter {
    use std::pin::Pin;

    use futures::{Stream, StreamExt};
    use tonic::{Request, Response, Status, Streaming};

    use super::helloworld::greeter_server::Greeter;
    use super::helloworld::{HelloReply, HelloRequest};

    /// The greeter: "Hello <name>" for a call and for each message of a stream. With
    /// `loopback_peer`, each call also checks that tonic's `remote_addr()` is a
    /// loopback address (TCP on one host; over RDMA the address is not known).
    pub struct MyGreeter {
        pub loopback_peer: bool,
    }

    #[tonic::async_trait]
    impl Greeter for MyGreeter {
        async fn say_hello(
            &self,
            req: Request<HelloRequest>,
        ) -> Result<Response<HelloReply>, Status> {
            if self.loopback_peer {
                let from = req
                    .remote_addr()
                    .expect("the connection's address, from ByteStream");
                assert!(from.ip().is_loopback(), "{from}");
            }
            Ok(Response::new(HelloReply {
                message: format!("Hello {}", req.into_inner().name),
            }))
        }

        type ChatStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send>>;

        async fn chat(
            &self,
            req: Request<Streaming<HelloRequest>>,
        ) -> Result<Response<Self::ChatStream>, Status> {
            let replies = req.into_inner().map(|r| {
                r.map(|h| HelloReply {
                    message: format!("Hello {}", h.name),
                })
            });
            Ok(Response::new(Box::pin(replies)))
        }
    }
}

/// A net-rs TCP listener on `addr`, the bind retried for up to 10 s while the address
/// is still taken (a server restarted on its old port).
#[cfg(feature = "grpc")]
pub async fn bind_retrying(addr: std::net::SocketAddr) -> net_rs::drivers::tcp::TcpListener {
    let start = std::time::Instant::now();
    loop {
        match net_rs::drivers::tcp::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if start.elapsed() < std::time::Duration::from_secs(10) => {
                eprintln!("bind {addr}: {e}; again");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}
