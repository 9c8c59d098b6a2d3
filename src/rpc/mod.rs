//! Request/response over any [`Transport`](crate::transport::Transport): many calls in
//! flight on one connection, each reply delivered to its own call, cancellation and
//! deadlines that never mix up replies.
//!
//! * [`wire`]: the format, a 16-byte header (kind, method, request id, time budget or
//!   status) in front of each message's payload.
//! * [`calls`](self#layers) (internal): the client's sans-IO state machine: slots,
//!   who reads, what a reply is for.
//! * [`Client`]: calls on one connection, pipelined and answered in any order, each
//!   with its own timeout; dropping a call cancels it (its late reply is discarded,
//!   the server is told).
//! * [`Channel`]: calls to one peer over a few such connections from a
//!   [`ConnectionPool`](crate::pool::ConnectionPool), replaced through the pool (its
//!   reconnect policy and back-off) when they fail.
//! * With feature `tower`: `Client` and `Channel` are `tower::Service<Call>`, so
//!   tower's timeout, retry, rate-limit and load-balance layers apply.
//! * Zero-copy both ways: received payloads are slices of the received message;
//!   [`Client::request_buf`] and [`Request::reply_buf`] (with
//!   [`Server::serve_shared`]) build requests and replies in the transport's memory
//!   (registered memory on RDMA) behind the header's room.
//! * [`Server`]: runs a [`Handler`] (an async function) on each connection's requests
//!   concurrently, within a per-connection and a server-wide limit; a request whose
//!   budget ran out is not started; graceful shutdown finishes what runs.
//!
//! # Layers
//! The protocol's decisions are in the sans-IO core (`calls.rs`, unit-tested with
//! random interleavings); `client.rs` and `server.rs` are shells that do the I/O after
//! releasing the core's lock. Neither spawns a task or needs a particular runtime:
//! timers for timeouts and deadlines come from [`Runtime`](crate::runtime::Runtime).
//!
//! The client has no background task reading replies: while calls wait, one of them
//! (the *reader*) reads the connection for all, hands each reply to its call's slot
//! and wakes that call; when the reader has its own reply or gives up, it wakes another
//! waiting call to take the role. With one call in flight the caller reads its own
//! reply, so the RPC layer adds no task switch to a round trip; and nothing depends on
//! a task that might not run (a runtime that ended, an executor that dropped it).
//! The price: a call's future must be polled until it ends or is dropped, as `.await`,
//! `join!` and `select!` do.
//!
//! ```no_run
//! use bytes::Bytes;
//! use net_rs::drivers::tcp::{TcpListener, TcpTransport};
//! use net_rs::rpc::{Client, Code, Request, Server, Status};
//!
//! const GET: u16 = 1;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Server: one future per connection, spawned on the runtime.
//! let listener = TcpListener::bind("127.0.0.1:7000").await?;
//! let server = Server::default();
//! let s = server.clone();
//! tokio::spawn(async move {
//!     while let Ok(conn) = listener.accept().await {
//!         let s = s.clone();
//!         tokio::spawn(async move {
//!             let handler = |req: Request| async move {
//!                 match req.method() {
//!                     GET => Ok(Bytes::from_static(b"value")),
//!                     m => Err(Status::new(Code::Unimplemented, format!("method {m}"))),
//!                 }
//!             };
//!             let _ = s.serve_connection(&conn, &handler).await;
//!         });
//!     }
//! });
//!
//! // Client: share it between tasks; each call waits for its own reply.
//! let client = Client::new(TcpTransport::connect("127.0.0.1:7000").await?);
//! let value = client.call(GET, b"key").await?;
//! assert_eq!(&value[..], b"value");
//! # Ok(())
//! # }
//! ```

mod calls;
mod channel;
mod client;
mod server;
#[cfg(feature = "tower")]
mod service;
mod status;
pub mod wire;

pub use channel::Channel;
pub use client::{Client, ClientConfig, RequestBuf};
pub use server::{Handler, ReplyBuf, Request, Server, ServerConfig};
#[cfg(feature = "tower")]
pub use service::{Call, ServiceHandler};
pub use status::Status;
pub use wire::Code;
