//! The memory slab: size classes carved out of large regions, the allocator the RDMA
//! driver puts over pre-registered memory.
//!
//! Registering memory with an RDMA device is slow (page pinning, a syscall), so it must
//! not happen per message. [`Slab`] asks its [`RegionSource`] for a large region only
//! when a size class runs out of slots, cuts the region into equal slots of that class,
//! and recycles slots forever after: the number of regions (registrations) stays
//! constant however many buffers are allocated and freed. Each slot is handed out as a
//! [`SlabBuf`], a [`BufStorage`] that becomes a [`Buf`] (and, frozen, `Bytes`) without
//! a copy, and goes back to its class when the last `Bytes` pointing into it drops.
//! [`Slab::lookup`] maps any pointer into a region back to the region's key (the
//! `lkey` for RDMA), which is how a frozen buffer is recognised and sent without a
//! copy or a new registration.
//!
//! [`HeapRegions`] backs the slab with plain heap memory: the unit tests use it, and so
//! does any transport that wants pooled buffers without a device.

use std::cell::UnsafeCell;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::buffer::Buf;
#[cfg(doc)]
use crate::buffer::BufStorage;

/// A large, fixed block of memory that slots are carved from.
///
/// # Safety
/// `ptr()` must point to `len()` bytes that stay valid, writable and at the same
/// address for as long as the region lives, and that nothing else reads or writes:
/// the slab hands out disjoint slots of it as `&mut [u8]`.
pub unsafe trait Region: Send + Sync + 'static {
    /// Start of the memory.
    fn ptr(&self) -> *mut u8;
    /// Size in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The key a work request names this memory with (the MR's `lkey`; 0 for heap).
    fn key(&self) -> u32;
    /// The key a peer would name this memory with in a one-sided operation (the MR's
    /// `rkey`; 0 for heap). Memory registered for local access only refuses every
    /// one-sided operation whatever key it names.
    fn remote_key(&self) -> u32 {
        0
    }
}

/// Makes regions for a [`Slab`] (for RDMA: allocate and register).
pub trait RegionSource: Send + Sync + 'static {
    /// A new region of at least `len` bytes.
    ///
    /// # Errors
    /// Allocation or registration failure.
    fn region(&self, len: usize) -> io::Result<Arc<dyn Region>>;
}

/// Plain heap memory as regions.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeapRegions;

struct HeapRegion {
    mem: Box<[UnsafeCell<u8>]>,
}

// SAFETY: the bytes are only reached through the slab, which hands each slot to exactly
// one `SlabBuf` at a time; the region itself never touches them.
unsafe impl Sync for HeapRegion {}

// SAFETY: `mem` is a heap allocation of `len()` bytes owned by the region: it stays at
// one address and valid until the region drops, and `UnsafeCell` makes writing through
// the pointer sound.
unsafe impl Region for HeapRegion {
    fn ptr(&self) -> *mut u8 {
        UnsafeCell::raw_get(self.mem.as_ptr())
    }
    fn len(&self) -> usize {
        self.mem.len()
    }
    fn key(&self) -> u32 {
        0
    }
}

impl RegionSource for HeapRegions {
    fn region(&self, len: usize) -> io::Result<Arc<dyn Region>> {
        let mem: Box<[UnsafeCell<u8>]> = (0..len).map(|_| UnsafeCell::new(0)).collect();
        Ok(Arc::new(HeapRegion { mem }))
    }
}

struct Class {
    size: usize,
    free: Vec<Slot>,
}

struct Slot {
    region: Arc<dyn Region>,
    offset: usize,
}

struct Inner {
    classes: Vec<Class>,
    regions: Vec<Arc<dyn Region>>,
}

/// Size-class allocator over large regions; cloning shares it.
#[derive(Clone)]
pub struct Slab {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    source: Box<dyn RegionSource>,
    region_size: usize,
    regions_made: AtomicU64,
}

impl Slab {
    /// A slab with power-of-two classes from `min_class` up to `max_class` bytes, taking
    /// regions of `region_size` bytes (at least one slot of the largest class) from
    /// `source`.
    pub fn new(
        source: impl RegionSource,
        min_class: usize,
        max_class: usize,
        region_size: usize,
    ) -> Slab {
        let min = min_class.max(64).next_power_of_two();
        let max = max_class.max(min).next_power_of_two();
        let classes = std::iter::successors(Some(min), |&s| (s < max).then_some(s * 2))
            .map(|size| Class {
                size,
                free: Vec::new(),
            })
            .collect();
        Slab {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    classes,
                    regions: Vec::new(),
                }),
                source: Box::new(source),
                region_size: region_size.max(max),
                regions_made: AtomicU64::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The largest buffer the slab hands out.
    pub fn max_size(&self) -> usize {
        self.lock().classes.last().map_or(0, |c| c.size)
    }

    /// Regions made so far (for RDMA: memory registrations).
    pub fn regions(&self) -> u64 {
        self.shared.regions_made.load(Ordering::Relaxed)
    }

    /// A slot of at least `len` bytes, or `None` if `len` exceeds
    /// [`max_size`](Slab::max_size) (the caller falls back to other memory).
    ///
    /// # Errors
    /// The region source's error when a class is empty and a new region cannot be made.
    pub fn alloc(&self, len: usize) -> io::Result<Option<SlabBuf>> {
        let mut inner = self.lock();
        let Some(ci) = inner.classes.iter().position(|c| c.size >= len) else {
            return Ok(None);
        };
        if inner.classes[ci].free.is_empty() {
            let region = self.shared.source.region(self.shared.region_size)?;
            self.shared.regions_made.fetch_add(1, Ordering::Relaxed);
            let size = inner.classes[ci].size;
            let slots = region.len() / size;
            let class = &mut inner.classes[ci];
            class.free.extend((0..slots).rev().map(|i| Slot {
                region: region.clone(),
                offset: i * size,
            }));
            inner.regions.push(region);
        }
        let class = &mut inner.classes[ci];
        let slot = class.free.pop().expect("refilled above");
        Ok(Some(SlabBuf {
            slot: Some(slot),
            size: class.size,
            class: ci,
            slab: self.clone(),
        }))
    }

    /// A zero-filled [`Buf`] of `len` bytes from the slab, if it fits a class.
    ///
    /// # Errors
    /// As [`alloc`](Slab::alloc).
    pub fn alloc_buf(&self, len: usize) -> io::Result<Option<Buf>> {
        Ok(self.alloc(len)?.map(|mut b| {
            b.as_mut()[..len].fill(0);
            Buf::from_storage(Box::new(b), len)
        }))
    }

    /// If `ptr..ptr+len` lies inside one of the slab's regions, that region's key.
    pub fn lookup(&self, ptr: *const u8, len: usize) -> Option<u32> {
        let addr = ptr as usize;
        self.lock().regions.iter().find_map(|r| {
            let start = r.ptr() as usize;
            (addr >= start && addr.checked_add(len)? <= start + r.len()).then(|| r.key())
        })
    }

    fn release(&self, class: usize, slot: Slot) {
        self.lock().classes[class].free.push(slot);
    }
}

impl fmt::Debug for Slab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slab")
            .field("regions", &self.regions())
            .field("region_size", &self.shared.region_size)
            .finish_non_exhaustive()
    }
}

/// One slot of a [`Slab`]; returns to its class on drop. A [`BufStorage`].
pub struct SlabBuf {
    slot: Option<Slot>,
    size: usize,
    class: usize,
    slab: Slab,
}

impl SlabBuf {
    /// The key of the region the slot lives in (the RDMA `lkey`).
    pub fn key(&self) -> u32 {
        self.slot.as_ref().map_or(0, |s| s.region.key())
    }

    /// The remote key of the region the slot lives in (the RDMA `rkey`).
    pub fn remote_key(&self) -> u32 {
        self.slot.as_ref().map_or(0, |s| s.region.remote_key())
    }
}

impl AsRef<[u8]> for SlabBuf {
    fn as_ref(&self) -> &[u8] {
        let slot = self.slot.as_ref().expect("slot present until drop");
        // SAFETY: the slot is `size` bytes at `offset` inside a live region (we hold an
        // `Arc` to it); slots never overlap and this `SlabBuf` is the slot's only owner,
        // so no `&mut` to these bytes exists while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(slot.region.ptr().add(slot.offset), self.size) }
    }
}

impl AsMut<[u8]> for SlabBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        let slot = self.slot.as_ref().expect("slot present until drop");
        // SAFETY: as in `as_ref`; `&mut self` makes this the only reference to the slot.
        unsafe { std::slice::from_raw_parts_mut(slot.region.ptr().add(slot.offset), self.size) }
    }
}

impl Drop for SlabBuf {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.slab.release(self.class, slot);
        }
    }
}

impl fmt::Debug for SlabBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabBuf")
            .field("size", &self.size)
            .field("key", &self.key())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regions with distinct keys, counting how many were made.
    struct Keyed(AtomicU64);
    struct KeyedRegion(Arc<dyn Region>, u32);
    // SAFETY: delegates to a heap region, which upholds the contract.
    unsafe impl Region for KeyedRegion {
        fn ptr(&self) -> *mut u8 {
            self.0.ptr()
        }
        fn len(&self) -> usize {
            self.0.len()
        }
        fn key(&self) -> u32 {
            self.1
        }
    }
    impl RegionSource for Keyed {
        fn region(&self, len: usize) -> io::Result<Arc<dyn Region>> {
            let k = self.0.fetch_add(1, Ordering::SeqCst) as u32 + 100;
            Ok(Arc::new(KeyedRegion(HeapRegions.region(len)?, k)))
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "megabytes of slots: too slow under Miri")]
    fn registrations_stay_constant_under_churn() {
        let slab = Slab::new(HeapRegions, 256, 64 << 10, 1 << 20);
        let mut live = Vec::new();
        for round in 0..50 {
            for i in 0..64 {
                live.push(
                    slab.alloc_buf(100 + (i * 997 + round) % 60_000)
                        .unwrap()
                        .unwrap(),
                );
            }
            if round % 3 == 2 {
                live.clear();
            }
        }
        let after_warmup = slab.regions();
        for _ in 0..10_000 {
            let b = slab.alloc_buf(4000).unwrap().unwrap();
            drop(b.freeze());
        }
        assert_eq!(
            slab.regions(),
            after_warmup,
            "freed slots are reused, no new regions"
        );
    }

    #[test]
    fn slots_are_disjoint_and_zeroed() {
        let slab = Slab::new(HeapRegions, 64, 1024, 4096);
        let mut bufs: Vec<Buf> = (0..40)
            .map(|_| slab.alloc_buf(1000).unwrap().unwrap())
            .collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            assert!(b.iter().all(|&x| x == 0));
            b.fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8), "slot {i} was overwritten");
        }
        let frozen: Vec<bytes::Bytes> = bufs.into_iter().map(Buf::freeze).collect();
        assert!(frozen.iter().enumerate().all(|(i, b)| b[999] == i as u8));
    }

    #[test]
    fn frozen_bytes_are_found_with_their_region_key() {
        let slab = Slab::new(Keyed(AtomicU64::new(0)), 64, 8192, 8192);
        let a = slab.alloc_buf(8000).unwrap().unwrap().freeze();
        let b = slab.alloc_buf(8000).unwrap().unwrap().freeze();
        let ka = slab.lookup(a.as_ptr(), a.len()).expect("inside a region");
        let kb = slab.lookup(b.as_ptr(), b.len()).expect("inside a region");
        assert_ne!(ka, kb, "one 8 KiB slot per region here");
        let outside = bytes::Bytes::from_static(b"elsewhere");
        assert_eq!(slab.lookup(outside.as_ptr(), outside.len()), None);
        assert_eq!(
            slab.lookup(a.as_ptr(), a.len() + 8192),
            None,
            "range must fit"
        );
    }

    #[test]
    fn oversized_requests_fall_back() {
        let slab = Slab::new(HeapRegions, 64, 4096, 4096);
        assert_eq!(slab.max_size(), 4096);
        assert!(slab.alloc(4097).unwrap().is_none());
        assert_eq!(slab.regions(), 0);
    }

    #[test]
    fn region_failure_is_an_error_not_a_panic() {
        struct Broken;
        impl RegionSource for Broken {
            fn region(&self, _: usize) -> io::Result<Arc<dyn Region>> {
                Err(io::Error::other("cannot register"))
            }
        }
        let slab = Slab::new(Broken, 64, 4096, 4096);
        assert!(slab.alloc(100).is_err());
    }
}
