//! The RDMA driver (feature `rdma`), on sideway. The only module that imports sideway.
//! Without the feature only the pure protocol core is built: `wire`, `conn` (and the
//! simulation `sim` in tests), which need no device and no rdma-core.
//!
//! * [`connect`], [`connect_with`], [`listen`] and [`RdmaListener`]: the public face,
//!   returning [`RdmaTransport`](transport::RdmaTransport)s (also at their old paths under [`cm`]).
//! * [`cm`]: the queue-pair setup with RDMA-CM underneath.
//! * [`config`]: [`RdmaConfig`](config::RdmaConfig) and the queue and memory sizes derived from it.
//! * [`transport`]: the `Transport`: the shell around the protocol core (`conn`);
//!   `setup` opens a connection (CQ, registered memory, receives posted first).
//! * `buffer`: registered memory as `Bytes`: lent receive buffers, and fragments sent
//!   in place or through a bounce slot.
//! * `slab_allocator`: the slab over memory registered with the context's PD.
//! * [`context`]: the device and protection domain, with a clear
//!   [`Unsupported`](crate::ErrorKind::Unsupported) error when there is no device or
//!   no rdma-core, and a [`Slab`](crate::mem::Slab) over registered memory.
//! * [`poller`]: a completion queue as the reactor's completion source.
//! * `device`: one completion poller thread per device, driving the CQs of all its
//!   connections.
//! * `inspect`: what a transport says about itself (registrations, zero-copy counts,
//!   credits, queues) and the test hooks.
//! * `events`: RDMA-CM events after setup (peer disconnected or dead) routed to the
//!   connection they concern.
//! * `wire`: everything on the wire or in a `wr_id`, typed: the immediate data, the
//!   hello, the work-request numbering.
//! * `conn`: the connection's protocol as a pure state machine (no verbs, locks, clock
//!   or threads), which `transport` drives; `sim` (tests) runs two of them through a
//!   seeded simulation of the wire.

pub(crate) mod bench;
#[cfg(feature = "rdma")]
mod buffer;
#[cfg(feature = "rdma")]
pub mod cm;
#[cfg(feature = "rdma")]
pub mod config;
pub(crate) mod conn;
#[cfg(feature = "rdma")]
mod connect;
#[cfg(feature = "rdma")]
pub mod context;
#[cfg(feature = "rdma")]
mod device;
#[cfg(feature = "rdma")]
mod events;
#[cfg(feature = "rdma")]
mod inspect;
#[cfg(feature = "rdma")]
pub mod poller;
#[cfg(feature = "rdma")]
mod setup;
#[cfg(test)]
mod sim;
#[cfg(feature = "rdma")]
mod slab_allocator;
#[cfg(feature = "rdma")]
pub mod transport;
// Its items are `pub` so that `crate::fuzzing` can re-export them to the fuzz targets
// (`--cfg fuzzing`); in every other build they are private to the driver.
#[cfg_attr(not(fuzzing), allow(unreachable_pub))]
pub(crate) mod wire;

#[cfg(feature = "rdma")]
pub use connect::{connect, connect_with, listen, RdmaListener};
