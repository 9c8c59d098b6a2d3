//! When the RDMA device tests run: `NET_RS_RDMA_TESTS=1` requires a device (and its IP in
//! `SOFTROCE_IP`); without it, a machine with no device skips them, saying so.

use std::net::IpAddr;

/// Whether device tests must run (and fail without a device).
pub fn required() -> bool {
    std::env::var_os("NET_RS_RDMA_TESTS").is_some_and(|v| v == "1")
}

/// The device's local IP (the Soft-RoCE VM exports it), or `None` to skip.
pub fn device_ip() -> Option<IpAddr> {
    match std::env::var("SOFTROCE_IP")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(ip) => Some(ip),
        None if required() => panic!("NET_RS_RDMA_TESTS=1 needs SOFTROCE_IP (the device's IP)"),
        None => {
            eprintln!("skipping: set NET_RS_RDMA_TESTS=1 and SOFTROCE_IP to run RDMA tests");
            None
        }
    }
}
