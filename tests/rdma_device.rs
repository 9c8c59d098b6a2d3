//! RDMA device tests (feature `rdma`).
//!
//! Device tests are opt-in: with `NET_RS_RDMA_TESTS=1` they require a device and fail
//! without one (CI runs them in a Soft-RoCE VM, see `.ci/rdma-vm.sh`); without it they
//! skip, saying so, on a machine that has no device.
#![cfg(feature = "rdma")]

use net_rs::drivers::rdma::context::RdmaContext;
use net_rs::ErrorKind;

fn required() -> bool {
    std::env::var_os("NET_RS_RDMA_TESTS").is_some_and(|v| v == "1")
}

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
