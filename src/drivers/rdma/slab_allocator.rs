//! The slab allocator over pre-registered memory.
//!
//! [`mem::Slab`](crate::mem::Slab) carves size classes out of large regions; here the
//! regions are heap blocks registered with a protection domain (`ibv_reg_mr`), so every
//! slot handed out is already registered: sending or receiving through one costs no
//! registration, and freed slots are reused before a new region is registered. The
//! registrations are counted (`RdmaContext::registrations`, the transport's
//! `registrations()`).
//!
//! Regions are registered for local access only: the device writes them when a SEND
//! arrives, but no peer may READ or WRITE them with one-sided operations, whatever
//! address and key it names (net-rs does SEND/RECV only; tested on the device by
//! `tests/rdma_promises.rs`).

use std::cell::UnsafeCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;

use crate::mem::{Region, RegionSource, Slab};

/// A slab whose regions are registered with `pd`, counted in `registrations`.
pub(crate) fn registered_slab(
    pd: Arc<ProtectionDomain>,
    registrations: Arc<AtomicU64>,
    min_class: usize,
    max_class: usize,
    region_size: usize,
) -> Slab {
    Slab::new(
        Registered { pd, registrations },
        min_class,
        max_class,
        region_size,
    )
}

/// Makes regions of registered memory.
struct Registered {
    pd: Arc<ProtectionDomain>,
    registrations: Arc<AtomicU64>,
}

/// Heap memory registered with a protection domain. Field order matters: the MR is
/// dropped (deregistered) before the memory it names is freed.
struct RegisteredRegion {
    mr: Arc<MemoryRegion>,
    mem: Box<[UnsafeCell<u8>]>,
}

// SAFETY: the bytes are reached only through the slab, which gives each slot to one
// owner at a time; the region itself never touches them. `MemoryRegion` is Send + Sync.
unsafe impl Sync for RegisteredRegion {}

// SAFETY: `mem` is a heap allocation owned by the region: it stays valid and at one
// address until the region drops, after `mr` (declared first) has been deregistered.
// `UnsafeCell` makes writes through the pointer sound.
unsafe impl Region for RegisteredRegion {
    fn ptr(&self) -> *mut u8 {
        UnsafeCell::raw_get(self.mem.as_ptr())
    }
    fn len(&self) -> usize {
        self.mem.len()
    }
    fn key(&self) -> u32 {
        self.mr.lkey()
    }
    fn remote_key(&self) -> u32 {
        self.mr.rkey()
    }
}

impl RegionSource for Registered {
    fn region(&self, len: usize) -> io::Result<Arc<dyn Region>> {
        // Zeroed in one allocation (`calloc`: the kernel hands out zero pages), not
        // byte by byte: a per-byte loop cost ~16 ms per MiB in debug builds (and ~6
        // times that in the emulated test VM), several MiB per connection.
        // Fallible: memory that cannot be had is an error, not an abort.
        let layout = std::alloc::Layout::array::<u8>(len)
            .ok()
            .filter(|l| l.size() > 0)
            .ok_or_else(|| io::Error::other(format!("no region of {len} bytes")))?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let zeroed = unsafe { std::alloc::alloc_zeroed(layout) };
        if zeroed.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("registered region of {len} bytes: out of memory"),
            ));
        }
        // SAFETY: `zeroed` is a fresh allocation of `len` zeroed bytes with the layout of
        // `[u8; len]`, owned by nothing else; `UnsafeCell<u8>` has the same in-memory
        // representation as `u8`, so it is a valid slice of `len` initialized
        // `UnsafeCell<u8>`, and the box frees it with that same layout.
        let mem: Box<[UnsafeCell<u8>]> = unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                zeroed.cast::<UnsafeCell<u8>>(),
                len,
            ))
        };
        let ptr = UnsafeCell::raw_get(mem.as_ptr()) as usize;
        // Local access only (see the module docs).
        // SAFETY: `ptr..ptr+len` is the heap block `mem`, which the returned region owns
        // together with the MR; the MR is dropped first (field order), so the device
        // never names freed memory, and the block never moves (boxed slice).
        let mr = unsafe { self.pd.reg_mr(ptr, len, AccessFlags::LocalWrite) }
            .map_err(|e| io::Error::other(format!("ibv_reg_mr of {len} bytes failed: {e}")))?;
        self.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(RegisteredRegion { mr, mem }))
    }
}
