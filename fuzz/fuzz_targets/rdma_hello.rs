//! The RDMA hello: any payload decodes to a hello whose encoding is the payload's first
//! 24 bytes (its first 20 and MTU 0, from a payload of 20 to 23 bytes), or is rejected
//! with the error that names the first thing wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net_rs::fuzzing::{Hello, WireError};

fuzz_target!(|b: &[u8]| {
    let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    match Hello::decode(b) {
        Ok(h) => {
            let n = if b.len() >= Hello::LEN {
                Hello::LEN
            } else {
                Hello::MIN_LEN
            };
            assert_eq!(&h.encode()[..n], &b[..n]);
            assert!(n == Hello::LEN || h.mtu == 0);
            assert!(h.depth >= Hello::MIN_DEPTH && h.chunk >= Hello::MIN_CHUNK);
            assert_eq!(Hello::decode(&h.encode()), Ok(h));
        }
        Err(e) => {
            assert!(e.to_string().contains("hello"), "{e}");
            match e {
                WireError::HelloShort { len } => {
                    assert_eq!(len, b.len());
                    assert!(len < Hello::MIN_LEN);
                }
                WireError::HelloMagic { found } => {
                    assert!(b.len() >= Hello::MIN_LEN);
                    assert_eq!(found, word(0));
                    assert_ne!(found, Hello::MAGIC);
                }
                WireError::HelloLimits { depth, chunk } => {
                    assert_eq!(word(0), Hello::MAGIC);
                    assert_eq!((depth, chunk), (word(4), word(8)));
                    assert!(depth < Hello::MIN_DEPTH || chunk < Hello::MIN_CHUNK);
                }
                other => panic!("hello rejected as {other:?}"),
            }
        }
    }
});
