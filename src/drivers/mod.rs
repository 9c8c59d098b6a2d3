//! Transport drivers: [`tcp`] (always) and `rdma` (feature `rdma`).

pub mod tcp;

#[cfg(feature = "rdma")]
// The RDMA driver registers memory and talks to the device: `unsafe` is allowed here.
#[allow(unsafe_code)]
pub mod rdma;
// Without the feature only the pure protocol core is built (and tested, with its
// simulation): no verbs, no sideway.
#[cfg(not(feature = "rdma"))]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod rdma;
