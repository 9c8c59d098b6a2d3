//! The RDMA `wr_id` layout: every `u64` is classified once, as an op-slab id, a receive
//! or the credit update that encodes back to the same value, or as a malformed
//! driver-tagged id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net_rs::fuzzing::{WireError, WrKind};

const DRIVER_TAG: u64 = 1 << 63;

fuzz_target!(|v: u64| {
    match WrKind::try_from(v) {
        Ok(kind) => {
            assert_eq!(kind.to_u64(), v, "{kind:?}");
            match kind {
                WrKind::Op(id) => {
                    assert_eq!(v & DRIVER_TAG, 0);
                    assert_eq!((id.key(), id.gen()), (v as u32, (v >> 32) as u32));
                }
                WrKind::Recv(index) => {
                    assert_eq!(v, DRIVER_TAG | u64::from(index));
                }
                WrKind::Control => assert_eq!(v, DRIVER_TAG | 1 << 40),
            }
        }
        Err(e) => {
            assert!(e.to_string().contains("wr_id"), "{e}");
            assert_eq!(e, WireError::WrId { wr_id: v });
            assert_ne!(v & DRIVER_TAG, 0);
            assert_ne!((v & !DRIVER_TAG) >> 32, 0);
            assert_ne!(v, DRIVER_TAG | 1 << 40);
        }
    }
});
