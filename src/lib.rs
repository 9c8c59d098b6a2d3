//! # net-rs
//!
//! One async message API ([`Transport`](transport::Transport)) over TCP and RDMA, built
//! on a runtime-free core.
//!
//! * [`transport`]: the `Transport` and `BufferPool` traits.
//! * [`drivers::tcp`]: length-prefixed messages over TCP.
//! * `drivers::rdma` (feature `rdma`): the same `Transport` over RDMA RC queue pairs,
//!   on [`reactor`] (the runtime-free completion reactor) and [`mem`] (the slab over
//!   registered memory).
//! * [`pool`]: a connection pool with reconnection policies, for any transport.
//! * [`runtime`]: the small boundary to async runtimes, and its two implementations:
//!   `runtime::tokio` (feature `tokio`, default) and `runtime::async_io`, the async-io
//!   reactor shared by async-std and smol (feature `async-std`), which also serves
//!   hand-written executors.
//!
//! ```no_run
//! use net_rs::transport::Transport;
//! use net_rs::drivers::tcp::TcpTransport;
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let transport = TcpTransport::connect("127.0.0.1:8080").await?;
//!     let buf = transport.alloc_buf(1024)?;
//!     transport.send(buf.freeze()).await?;
//!     let reply = transport.recv().await?;
//!     println!("{} bytes back", reply.len());
//!     Ok(())
//! }
//! ```
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(unsafe_op_in_unsafe_fn, unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod buffer;
pub mod codec;
mod coop;
pub mod drivers;
pub mod error;
#[cfg(feature = "grpc")]
pub mod grpc;
mod linger;
// `unsafe` is allowed here (disjoint slots of large regions) and in the RDMA driver only.
#[allow(unsafe_code)]
pub mod mem;
pub mod pool;
pub mod prelude;
pub mod reactor;
pub mod rpc;
pub mod runtime;
pub mod stream;
mod sync;
mod time;
pub mod transport;

pub use error::{Error, ErrorKind, Result};

/// The RDMA protocol core's benchmark (`examples/core_bench.rs`): not part of the API.
#[doc(hidden)]
pub mod __bench {
    pub use crate::drivers::rdma::bench::{Bench as RdmaCore, CoreBench};
}

/// Internals for the fuzz targets in `fuzz/` (built only with `--cfg fuzzing`, as
/// `cargo fuzz` does): not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    /// The RDMA wire encodings (`drivers/rdma/wire.rs`).
    #[cfg(feature = "rdma")]
    pub use crate::drivers::rdma::wire::{Hello, Imm, ImmFlags, WireError, WrKind};
}

/// The README's code examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
