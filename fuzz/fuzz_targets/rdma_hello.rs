//! The RDMA hello: any payload decodes to a hello whose encoding starts with the
//! payload's whole fields (20, 24 or 28 bytes), or is rejected with the error that
//! names the first thing wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net_rs::fuzzing::{Hello, WireError};

fuzz_target!(|b: &[u8]| {
    let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    match Hello::decode(b) {
        Ok(h) => {
            // Whole fields only: 20, 24 or 28 bytes; the missing ones 0 and None.
            let n = [Hello::LEN, 24, Hello::MIN_LEN]
                .into_iter()
                .find(|&n| b.len() >= n)
                .unwrap();
            assert_eq!(&h.encode()[..n], &b[..n]);
            assert!(n >= 24 || h.mtu == 0);
            assert_eq!(h.keepalive_ms.is_some(), n == Hello::LEN);
            assert!(h.depth >= Hello::MIN_DEPTH && h.chunk >= Hello::MIN_CHUNK);
            let keepalive_ms = Some(h.keepalive_ms.unwrap_or(0));
            assert_eq!(Hello::decode(&h.encode()), Ok(Hello { keepalive_ms, ..h }));
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
