//! Transport drivers: [`tcp`] (always) and `rdma` (feature `rdma`).

pub mod tcp;

#[cfg(feature = "rdma")]
// The RDMA driver registers memory and talks to the device: `unsafe` is allowed here.
#[allow(unsafe_code)]
pub mod rdma;
