//! Transport drivers: [`tcp`] (always) and `rdma` (feature `rdma`).

pub mod tcp;
