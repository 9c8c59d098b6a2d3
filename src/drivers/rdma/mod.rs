//! The RDMA driver (feature `rdma`), on sideway. The only module that imports sideway.
//!
//! This release has its first layer: [`context::RdmaContext`] opens a verbs device
//! (with a clear [`Unsupported`](crate::ErrorKind::Unsupported) error when there is no
//! device or no rdma-core) and gives a [`Slab`](crate::mem::Slab) over memory
//! registered with it, so buffers are registered once per large region, never per
//! message; [`poller::CqSource`] feeds a completion queue to the reactor's
//! [`Poller`](crate::reactor::Poller); [`cm`] connects reliable-connected queue pairs
//! with RDMA-CM. The message layer (receive credits, fragmentation, the `Transport` impl) comes
//! next; see the README.

pub mod cm;
pub mod context;
pub mod poller;
pub mod transport;
