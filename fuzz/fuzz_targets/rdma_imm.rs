//! The RDMA immediate data: every `u32` either decodes to an `Imm` that encodes back to
//! the same bits, or is rejected with the error that names what is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net_rs::fuzzing::{Imm, ImmFlags, WireError};

fuzz_target!(|v: u32| {
    match Imm::decode(v) {
        Ok(imm) => {
            assert_eq!(imm.encode(), v, "{imm:?}");
            assert_eq!(u32::from(imm.credits), v & 0xFFFF);
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            match e {
                WireError::ImmReservedBits { imm } => {
                    assert_eq!(imm, v);
                    assert_ne!(v >> 21, 0);
                }
                WireError::ImmFlags { imm } => {
                    assert_eq!(imm, v);
                    assert_eq!(v >> 21, 0);
                    assert!(ImmFlags::ALL.iter().all(|f| f.bits() != v & 0x1F_0000));
                }
                other => panic!("immediate data rejected as {other:?}"),
            }
        }
    }
});
