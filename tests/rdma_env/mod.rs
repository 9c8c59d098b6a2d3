//! When the RDMA device tests run: `NET_RS_RDMA_TESTS=1` requires a device (and its IP in
//! `SOFTROCE_IP`); without it, a machine with no device skips them, saying so. Also
//! the helpers the RDMA test binaries share: bounded waits and a loopback queue pair.
// Each test binary uses some of the helpers.
#![allow(dead_code)]

use std::net::IpAddr;
use std::sync::mpsc;
use std::time::Duration;

use net_rs::drivers::rdma::context::RdmaContext;
use net_rs::drivers::rdma::poller::CqSource;
use sideway::ibverbs::queue_pair::BasicQueuePair;
use sideway::ibverbs::AccessFlags;

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

/// Run `f` on a thread of its own; fail the test if it takes longer than `secs`.
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still waiting after {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the thread panicked"),
    }
}

/// A future that completes after `d` (a thread sleeps; no runtime needed).
pub fn timer(d: Duration) -> futures::channel::oneshot::Receiver<()> {
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = tx.send(());
    });
    rx
}

/// A queue pair connected to itself (loopback RC), so no second node is needed: a CQ of
/// `cq_entries`, `depth` work requests each way, the remote `access` it grants and the
/// RDMA READs it allows in flight each way (`read_atomic`).
pub fn loopback_qp(
    ctx: &RdmaContext,
    cq_entries: u32,
    depth: u32,
    access: AccessFlags,
    read_atomic: u8,
) -> (CqSource, BasicQueuePair) {
    use sideway::ibverbs::address::AddressHandleAttribute;
    use sideway::ibverbs::device_context::Mtu;
    use sideway::ibverbs::queue_pair::{QueuePair, QueuePairAttribute, QueuePairState};

    let source = CqSource::new(ctx, cq_entries).unwrap();
    let cq = source.cq().clone();
    let mut qp = ctx
        .protection_domain()
        .create_qp_builder()
        .setup_max_send_wr(depth)
        .setup_max_recv_wr(depth)
        .setup_send_cq(cq.clone())
        .setup_recv_cq(cq)
        .build()
        .unwrap();
    let gid_index: u32 = std::env::var("SOFTROCE_GID_INDEX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let gid = ctx.device_context().query_gid(1, gid_index).unwrap();
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Init)
        .setup_pkey_index(0)
        .setup_port(1)
        .setup_access_flags(access);
    qp.modify(&attr).unwrap();
    let mut ah = AddressHandleAttribute::new();
    ah.setup_dest_lid(0)
        .setup_port(1)
        .setup_service_level(0)
        .setup_grh_src_gid_index(gid_index as u8)
        .setup_grh_dest_gid(&gid)
        .setup_grh_hop_limit(64);
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToReceive)
        .setup_path_mtu(Mtu::Mtu1024)
        .setup_dest_qp_num(qp.qp_number())
        .setup_rq_psn(1)
        .setup_max_dest_read_atomic(read_atomic)
        .setup_min_rnr_timer(12)
        .setup_address_vector(&ah);
    qp.modify(&attr).unwrap();
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToSend)
        .setup_sq_psn(1)
        .setup_timeout(14)
        .setup_retry_cnt(7)
        .setup_rnr_retry(7)
        .setup_max_read_atomic(read_atomic);
    qp.modify(&attr).unwrap();
    (source, qp)
}
