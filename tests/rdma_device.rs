//! RDMA device tests (feature `rdma`).
//!
//! Device tests are opt-in: with `NET_RS_RDMA_TESTS=1` they require a device and fail
//! without one (CI runs them in a Soft-RoCE VM, see `.ci/rdma-vm.sh`); without it they
//! skip, saying so, on a machine that has no device.
#![cfg(feature = "rdma")]

mod rdma_env;
use rdma_env::{device_ip, required};

use net_rs::drivers::rdma::context::RdmaContext;
use net_rs::ErrorKind;

/// The device to test, or `None` (skip) when none is present and none is required.
fn context() -> Option<RdmaContext> {
    match RdmaContext::open(std::env::var("NET_RS_RDMA_DEVICE").ok().as_deref()) {
        Ok(ctx) => Some(ctx),
        Err(e) if !required() => {
            eprintln!("skipping: {e} (set NET_RS_RDMA_TESTS=1 to require a device)");
            None
        }
        Err(e) => panic!("NET_RS_RDMA_TESTS=1 but no usable device: {e}"),
    }
}

#[test]
fn no_device_is_a_clear_unsupported_error() {
    let err = RdmaContext::open(Some("no-such-rdma-device")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("RDMA unavailable"), "{err}");
    let io: std::io::Error = err.into();
    assert_eq!(io.kind(), std::io::ErrorKind::Unsupported);
    match RdmaContext::open(None) {
        Ok(ctx) => eprintln!("device {} present", ctx.name()),
        Err(e) => {
            assert!(!required(), "a device is required here: {e}");
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        }
    }
}

#[test]
fn registered_slab_keeps_registrations_constant() {
    let Some(ctx) = context() else { return };
    let slab = ctx.slab(256, 64 << 10, 1 << 20);
    let mut live = Vec::new();
    for i in 0..300 {
        live.push(slab.alloc(256 + (i * 977) % (60 << 10)).unwrap().unwrap());
    }
    drop(live);
    let registered = ctx.registrations();
    assert!(registered > 0);
    assert_eq!(registered, slab.regions());
    for i in 0..20_000usize {
        let buf = slab.alloc_buf(64 + i % 4000).unwrap().unwrap();
        let bytes = buf.freeze();
        let key = slab.lookup(bytes.as_ptr(), bytes.len());
        assert!(key.is_some(), "a frozen slab buffer maps back to its MR");
    }
    assert_eq!(
        ctx.registrations(),
        registered,
        "no registration per message: freed slots are reused"
    );
    let b = slab.alloc(1000).unwrap().unwrap();
    assert_eq!(slab.lookup(b.as_ref().as_ptr(), 1000), Some(b.key()));
}

/// A real work request's completion travels CQ → completion channel event (when the
/// poller sleeps) → reactor poller thread → op slab → the future's waker. The queue pair
/// is connected to itself (loopback RC), so no second node is needed.
#[test]
fn device_completions_reach_futures_through_the_reactor() {
    use net_rs::mem::SlabBuf;
    use net_rs::reactor::{Completion, OpSlab, Poller, PollerConfig};
    use sideway::ibverbs::queue_pair::{
        PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
    };
    use sideway::ibverbs::AccessFlags;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    let Some(ctx) = context() else { return };
    let (source, mut qp) = rdma_env::loopback_qp(
        &ctx,
        256,
        64,
        AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
        0,
    );

    let ops = OpSlab::new();
    let ops2 = ops.clone();
    let poller = Poller::new(
        source,
        move |batch: &[Completion]| ops2.complete_batch(batch, &mut Vec::new()),
        PollerConfig {
            spin: Duration::from_micros(20),
            yield_window: Duration::from_micros(50),
            ..PollerConfig::default()
        },
    )
    .spawn("rdma-test-poller")
    .unwrap();
    let slab = ctx.slab(4096, 4096, 1 << 20);
    for round in 0..100u32 {
        let len = 1 + (round as usize * 37) % 4096;
        let rbuf = slab.alloc(4096).unwrap().unwrap();
        let (rkey, raddr) = (rbuf.key(), rbuf.as_ref().as_ptr() as u64);
        let recv = ops.register(Box::new(rbuf));
        let mut g = qp.start_post_recv();
        // SAFETY: the receive buffer is owned by the op-slab entry until its
        // completion has been delivered, and it is 4096 bytes of registered memory.
        unsafe {
            g.construct_wr(recv.wr_id().to_u64())
                .setup_sge(rkey, raddr, 4096)
        };
        g.post().unwrap();

        let mut sbuf = slab.alloc(4096).unwrap().unwrap();
        sbuf.as_mut()[..len].fill(round as u8);
        let (skey, saddr) = (sbuf.key(), sbuf.as_ref().as_ptr() as u64);
        let send = ops.register(Box::new(sbuf));
        let mut g = qp.start_post_send();
        let wr = g.construct_wr(send.wr_id().to_u64(), WorkRequestFlags::Signaled);
        // SAFETY: as above, for the send buffer, `len` <= 4096 bytes.
        unsafe { wr.setup_send().setup_sge(skey, saddr, len as u32) };
        g.post().unwrap();

        let ((sc, _), (rc, rkeep)) = futures::executor::block_on(futures::future::join(send, recv));
        assert!(sc.is_success(), "send failed with status {}", sc.status);
        assert!(rc.is_success(), "receive failed with status {}", rc.status);
        assert_eq!(rc.byte_len as usize, len);
        let rbuf = rkeep.downcast::<SlabBuf>().unwrap();
        let got: &[u8] = (*rbuf).as_ref();
        assert!(got[..len].iter().all(|&b| b == round as u8));
        if round % 10 == 0 {
            // Let the poller go to sleep on the completion channel.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let stats = poller.stats();
    assert_eq!(stats.completions.load(Ordering::Relaxed), 200);
    assert!(
        stats.sleeps.load(Ordering::Relaxed) > 0,
        "the poller never slept, so the CQ event path was not exercised"
    );
    assert_eq!(ops.in_flight(), 0);
    poller.shutdown();
}

mod cm_helpers {
    use net_rs::mem::{Slab, SlabBuf};
    use net_rs::reactor::{OpFuture, OpSlab};
    use sideway::ibverbs::queue_pair::{
        BasicQueuePair, PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
    };
    use std::sync::Arc;

    pub fn post_recv(qp: &mut BasicQueuePair, ops: &Arc<OpSlab>, slab: &Slab) -> OpFuture {
        let buf = slab.alloc(4096).unwrap().unwrap();
        let (key, addr) = (buf.key(), buf.as_ref().as_ptr() as u64);
        let fut = ops.register(Box::new(buf));
        let mut g = qp.start_post_recv();
        // SAFETY: the 4096-byte registered buffer is owned by the op entry until its
        // completion has been delivered.
        unsafe {
            g.construct_wr(fut.wr_id().to_u64())
                .setup_sge(key, addr, 4096)
        };
        g.post().unwrap();
        fut
    }

    pub fn post_send(
        qp: &mut BasicQueuePair,
        ops: &Arc<OpSlab>,
        slab: &Slab,
        data: &[u8],
    ) -> OpFuture {
        let mut buf: SlabBuf = slab.alloc(data.len()).unwrap().unwrap();
        buf.as_mut()[..data.len()].copy_from_slice(data);
        let (key, addr) = (buf.key(), buf.as_ref().as_ptr() as u64);
        let fut = ops.register(Box::new(buf));
        let mut g = qp.start_post_send();
        let wr = g.construct_wr(fut.wr_id().to_u64(), WorkRequestFlags::Signaled);
        // SAFETY: as above, for `data.len()` bytes of the registered send buffer.
        unsafe { wr.setup_send().setup_sge(key, addr, data.len() as u32) };
        g.post().unwrap();
        fut
    }

    pub fn spawn_poller(
        source: net_rs::drivers::rdma::poller::CqSource,
        ops: &Arc<OpSlab>,
        name: &str,
    ) -> net_rs::reactor::PollerHandle {
        use net_rs::reactor::{Completion, Poller, PollerConfig};
        let ops = ops.clone();
        Poller::new(
            source,
            move |b: &[Completion]| ops.complete_batch(b, &mut Vec::new()),
            PollerConfig::default(),
        )
        .spawn(name)
        .unwrap()
    }

    pub fn received(keep: net_rs::reactor::Keep, len: u32) -> Vec<u8> {
        let buf = keep.downcast::<SlabBuf>().unwrap();
        let all: &[u8] = (*buf).as_ref();
        all[..len as usize].to_vec()
    }
}

#[test]
fn rdma_cm_connects_queue_pairs_that_exchange_messages() {
    use cm_helpers::*;
    use net_rs::drivers::rdma::cm::{connect_qp, CmListener};
    use net_rs::reactor::OpSlab;
    use std::time::Duration;

    if context().is_none() {
        return;
    }
    let Some(ip) = device_ip() else { return };
    let addr = std::net::SocketAddr::new(ip, 18515);
    let listener = CmListener::bind(addr).unwrap();

    // Nobody listens on this port: a clear refusal, well within the deadline.
    let t0 = std::time::Instant::now();
    let err = connect_qp(
        std::net::SocketAddr::new(ip, 18599),
        Duration::from_secs(10),
        |_, _| Ok(()),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    let (provoke_tx, provoke_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let ops = OpSlab::new();
        let mut pending = None;
        let mut slab = None;
        let mut conn = listener
            .accept(Duration::from_secs(20), |ctx, qp| {
                let s = ctx.slab(4096, 4096, 1 << 20);
                pending = Some(post_recv(qp, &ops, &s));
                slab = Some(s);
                Ok(())
            })
            .unwrap();
        let slab = slab.unwrap();
        let poller = spawn_poller(conn.source.take().unwrap(), &ops, "rdma-cm-server");
        for _ in 0..50 {
            let (c, keep) = futures::executor::block_on(pending.take().unwrap());
            assert!(c.is_success(), "server receive status {}", c.status);
            let mut msg = received(keep, c.byte_len);
            pending = Some(post_recv(&mut conn.qp, &ops, &slab));
            msg.reverse();
            let (s, _) = futures::executor::block_on(post_send(&mut conn.qp, &ops, &slab, &msg));
            assert!(s.is_success(), "server send status {}", s.status);
        }
        // Two messages come while one receive is posted: the second meets a receiver
        // that is not ready until the next receive is posted, a while later.
        provoke_rx.recv().unwrap();
        let (c, _) = futures::executor::block_on(pending.take().unwrap());
        assert!(c.is_success());
        std::thread::sleep(Duration::from_millis(300));
        pending = Some(post_recv(&mut conn.qp, &ops, &slab));
        let (c, _) = futures::executor::block_on(pending.take().unwrap());
        assert!(c.is_success(), "the retried send arrived");
        pending = Some(post_recv(&mut conn.qp, &ops, &slab));
        poller.shutdown();
        // The QP goes first: memory named by the outstanding receive is released only
        // after the hardware can no longer use it.
        (conn, pending, ops, slab)
    });

    let ops = OpSlab::new();
    let mut pending = None;
    let mut slab = None;
    let mut conn = connect_qp(addr, Duration::from_secs(20), |ctx, qp| {
        let s = ctx.slab(4096, 4096, 1 << 20);
        pending = Some(post_recv(qp, &ops, &s));
        slab = Some(s);
        Ok(())
    })
    .unwrap();
    let slab = slab.unwrap();
    let poller = spawn_poller(conn.source.take().unwrap(), &ops, "rdma-cm-client");
    for i in 0..50u32 {
        let msg: Vec<u8> = (0..(1 + i * 80)).map(|b| (b * 7 + i) as u8).collect();
        let (s, _) = futures::executor::block_on(post_send(&mut conn.qp, &ops, &slab, &msg));
        assert!(s.is_success(), "client send status {}", s.status);
        let (c, keep) = futures::executor::block_on(pending.take().unwrap());
        assert!(c.is_success(), "client receive status {}", c.status);
        let mut back = received(keep, c.byte_len);
        back.reverse();
        assert_eq!(back, msg, "round trip {i}");
        pending = Some(post_recv(&mut conn.qp, &ops, &slab));
    }
    // The device's RNR counter sees a receiver that is not ready, and the send is
    // retried until it gets through (rnr_retry 7): the counter the transport tests
    // rely on to show that credits prevent RNR is live.
    let rnr_before = conn.context.rnr_events().expect("RNR counters in sysfs");
    let a = post_send(&mut conn.qp, &ops, &slab, b"first");
    let b = post_send(&mut conn.qp, &ops, &slab, b"second");
    provoke_tx.send(()).unwrap();
    let ((sa, _), (sb, _)) = futures::executor::block_on(futures::future::join(a, b));
    assert!(
        sa.is_success() && sb.is_success(),
        "{} {}",
        sa.status,
        sb.status
    );
    assert!(
        conn.context.rnr_events().unwrap() > rnr_before,
        "no RNR counted"
    );
    let server_side = server.join().expect("server thread");
    conn.disconnect().unwrap();
    poller.shutdown();
    drop(server_side);
    // QP first, then the outstanding receive's memory.
    drop(conn);
    drop(pending);
}
