//! Adapters that plug the runtime-free core into async runtimes.
//!
//! Each adapter is a unit of [`Runtime`](crate::runtime::Runtime): TCP sockets, timers
//! and spawning for one runtime family, behind its cargo feature. The folder lives at
//! the top of the repository (`adapters/`) and is compiled into the crate, so
//! `net_rs::drivers::tcp::TcpTransport::connect(addr)` works under `#[tokio::main]`
//! with only `net-rs` as a dependency.

#[cfg(feature = "async-std")]
pub mod async_io;
#[cfg(feature = "tokio")]
pub mod tokio;
