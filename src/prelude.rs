//! The traits and the everyday types, for `use net_rs::prelude::*;`.
//!
//! ```no_run
//! use net_rs::prelude::*;
//!
//! # async fn run() -> net_rs::Result<()> {
//! let t = TcpTransport::connect("127.0.0.1:8080").await?;
//! t.send(Bytes::from_static(b"ping")).await?;
//! let reply: Bytes = t.recv().await?;
//! # drop(reply);
//! # Ok(()) }
//! ```

pub use bytes::Bytes;

pub use crate::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::pool::{ConnectionPool, PoolConfig, ReconnectPolicy, TcpConnector};
pub use crate::transport::{BoxTransport, BufferPool, Messages, Transport};
