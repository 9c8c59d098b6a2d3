//! Message buffers: [`Buf`], the [`BufferPool`] trait, and its plain-memory pool.
//!
//! A [`Buf`] is what [`Transport::alloc_buf`](crate::transport::Transport::alloc_buf)
//! hands out: a zero-filled, writable buffer whose [`Buf::freeze`] turns it into
//! [`Bytes`] *without copying*. The memory behind it is pluggable ([`BufStorage`]): the
//! TCP transport uses recycled heap memory ([`HeapPool`]); the RDMA transport uses
//! pre-registered memory, so a frozen buffer can be sent with no copy and no new
//! registration. When the last `Bytes` that points into a buffer is dropped, the storage
//! is dropped too and goes back to its pool.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

/// Memory that can back a [`Buf`].
///
/// Implementations return their memory to wherever it came from when dropped. The slice
/// returned by `as_ref`/`as_mut` must not change address while the value lives (heap and
/// registered memory both satisfy this), because frozen [`Bytes`] point into it.
pub trait BufStorage: AsRef<[u8]> + AsMut<[u8]> + Send + Sync + 'static {}

impl<T: AsRef<[u8]> + AsMut<[u8]> + Send + Sync + 'static> BufStorage for T {}

/// A source of message buffers for one kind of transport.
///
/// The TCP pool is recycled heap memory; the RDMA pool hands out pre-registered memory,
/// which the RDMA transport sends without copying once frozen into [`Bytes`].
pub trait BufferPool: Send + Sync + fmt::Debug {
    /// A zero-filled buffer of `len` bytes.
    ///
    /// # Errors
    /// [`ErrorKind::Io`](crate::ErrorKind::Io)`(OutOfMemory)` if the memory cannot be
    /// had (never an abort of the process).
    fn alloc(&self, len: usize) -> crate::Result<Buf>;
}

/// A writable message buffer from a [`BufferPool`].
///
/// Dereferences to `[u8]` of length [`len`](Buf::len); the memory may be larger
/// ([`capacity`](Buf::capacity)). Use [`truncate`](Buf::truncate) or
/// [`set_len`](Buf::set_len) to send fewer bytes than were allocated.
pub struct Buf {
    storage: Box<dyn BufStorage>,
    len: usize,
}

impl Buf {
    /// Wrap `storage`, exposing its first `len` bytes.
    ///
    /// # Panics
    /// If `len` exceeds the storage's size.
    pub fn from_storage(storage: Box<dyn BufStorage>, len: usize) -> Self {
        let cap = storage.as_ref().as_ref().len();
        assert!(
            len <= cap,
            "Buf length {len} exceeds storage of {cap} bytes"
        );
        Buf { storage, len }
    }

    /// The number of bytes that will be sent.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The size of the memory behind the buffer.
    pub fn capacity(&self) -> usize {
        self.storage.as_ref().as_ref().len()
    }

    /// Shorten the buffer to `len` bytes (no-op if it is already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Set the length to `len` bytes of the underlying memory.
    ///
    /// Bytes that become visible hold whatever the memory held (zero for fresh memory or
    /// an earlier message from this process); they are always initialized.
    ///
    /// # Panics
    /// If `len` exceeds [`capacity`](Buf::capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "Buf::set_len beyond capacity");
        self.len = len;
    }

    /// Turn the buffer into [`Bytes`] without copying. The memory returns to its pool
    /// when the last clone of the `Bytes` is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(Frozen {
            storage: self.storage,
            len: self.len,
        })
    }
}

struct Frozen {
    storage: Box<dyn BufStorage>,
    len: usize,
}

impl AsRef<[u8]> for Frozen {
    fn as_ref(&self) -> &[u8] {
        &(*self.storage).as_ref()[..self.len]
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.storage).as_ref()[..self.len]
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut (*self.storage).as_mut()[..self.len]
    }
}

impl fmt::Debug for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// Smallest size class of the [`HeapPool`].
const MIN_CLASS: usize = 4096;
/// Number of power-of-two classes: 4 KiB .. 2 GiB.
const CLASSES: usize = 20;

/// A [`BufferPool`] over plain heap memory that recycles freed buffers.
///
/// Buffers are rounded up to power-of-two size classes (at least 4 KiB) and, when
/// released, kept for reuse up to `max_cached_bytes` in total. Reused memory is re-zeroed
/// by [`alloc`](BufferPool::alloc) up to the requested length, so callers never see stale
/// bytes from an earlier message. Cloning the pool shares it.
#[derive(Clone)]
pub struct HeapPool {
    inner: Arc<HeapInner>,
}

struct HeapInner {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
    cached: Mutex<usize>,
    max_cached_bytes: usize,
}

impl HeapPool {
    /// A pool that keeps at most `max_cached_bytes` of freed buffers for reuse.
    pub fn new(max_cached_bytes: usize) -> Self {
        HeapPool {
            inner: Arc::new(HeapInner {
                classes: std::array::from_fn(|_| Mutex::new(Vec::new())),
                cached: Mutex::new(0),
                max_cached_bytes,
            }),
        }
    }

    /// Bytes currently held for reuse.
    pub fn cached_bytes(&self) -> usize {
        *lock(&self.inner.cached)
    }

    /// A buffer of exactly `len` initialized bytes, recycled when possible. Its contents
    /// are unspecified (zero or an earlier message); the receive path overwrites them.
    pub(crate) fn take_uninit(&self, len: usize) -> PooledVec {
        if let Some(v) = self.take_cached(len) {
            return v;
        }
        let Some(class) = class_of(len) else {
            return PooledVec {
                vec: vec![0; len],
                len,
                pool: Weak::new(),
            };
        };
        PooledVec {
            vec: vec![0; MIN_CLASS << class],
            len,
            pool: Arc::downgrade(&self.inner),
        }
    }

    /// A buffer of exactly `len` initialized bytes if the pool holds an idle one of its
    /// size class (so taking it allocates nothing), else `None`. Contents as
    /// [`take_uninit`](HeapPool::take_uninit).
    pub(crate) fn take_cached(&self, len: usize) -> Option<PooledVec> {
        let class = class_of(len)?;
        let vec = lock(&self.inner.classes[class]).pop()?;
        *lock(&self.inner.cached) -= vec.len();
        Some(PooledVec {
            vec,
            len,
            pool: Arc::downgrade(&self.inner),
        })
    }
}

impl Default for HeapPool {
    /// A pool caching up to 64 MiB.
    fn default() -> Self {
        HeapPool::new(64 << 20)
    }
}

impl fmt::Debug for HeapPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapPool")
            .field("cached_bytes", &self.cached_bytes())
            .field("max_cached_bytes", &self.inner.max_cached_bytes)
            .finish()
    }
}

impl BufferPool for HeapPool {
    fn alloc(&self, len: usize) -> crate::Result<Buf> {
        let mut v = match self.take_cached(len) {
            Some(v) => v,
            None => {
                let class = class_of(len);
                let size = class.map_or(len, |c| MIN_CLASS << c);
                let mut vec = Vec::new();
                vec.try_reserve_exact(size).map_err(|_| {
                    crate::Error::new(
                        crate::ErrorKind::Io(std::io::ErrorKind::OutOfMemory),
                        format!("cannot allocate a buffer of {len} bytes"),
                    )
                })?;
                vec.resize(size, 0);
                PooledVec {
                    vec,
                    len,
                    pool: if class.is_some() {
                        Arc::downgrade(&self.inner)
                    } else {
                        Weak::new()
                    },
                }
            }
        };
        v.as_mut().fill(0);
        // Expose the whole size class, so `Buf::set_len` can grow into it.
        v.len = v.vec.len();
        Ok(Buf::from_storage(Box::new(v), len))
    }
}

fn class_of(len: usize) -> Option<usize> {
    let size = len.max(MIN_CLASS).checked_next_power_of_two()?;
    let class = (size / MIN_CLASS).trailing_zeros() as usize;
    (class < CLASSES).then_some(class)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Heap memory on loan from a [`HeapPool`]; returns there on drop.
pub(crate) struct PooledVec {
    vec: Vec<u8>,
    len: usize,
    pool: Weak<HeapInner>,
}

impl PooledVec {
    /// Give the memory back to the allocator, not to the pool.
    pub(crate) fn free(mut self) {
        self.pool = Weak::new();
    }
}

impl AsRef<[u8]> for PooledVec {
    fn as_ref(&self) -> &[u8] {
        &self.vec[..self.len]
    }
}

impl AsMut<[u8]> for PooledVec {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.vec[..self.len]
    }
}

impl Drop for PooledVec {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let Some(class) = class_of(self.vec.len()) else {
            return;
        };
        let size = self.vec.len();
        {
            let mut cached = lock(&pool.cached);
            if *cached + size > pool.max_cached_bytes {
                return;
            }
            *cached += size;
        }
        lock(&pool.classes[class]).push(std::mem::take(&mut self.vec));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_is_zeroed_and_freezes_without_copy() {
        let pool = HeapPool::default();
        let mut b = pool.alloc(100).unwrap();
        assert_eq!(b.len(), 100);
        assert!(b.iter().all(|&x| x == 0));
        b[0] = 7;
        let ptr = b.as_ptr();
        let bytes = b.freeze();
        assert_eq!(bytes.len(), 100);
        assert_eq!(bytes[0], 7);
        assert_eq!(bytes.as_ptr(), ptr, "freeze must not copy");
    }

    #[test]
    fn freed_buffers_are_reused_and_rezeroed() {
        let pool = HeapPool::default();
        let mut b = pool.alloc(5000).unwrap();
        b.fill(0xAB);
        let ptr = b.as_ptr();
        drop(b.freeze());
        assert_eq!(pool.cached_bytes(), 8192);
        let b2 = pool.alloc(6000).unwrap();
        assert_eq!(b2.as_ptr(), ptr, "memory of the same class is recycled");
        assert!(b2.iter().all(|&x| x == 0));
        assert_eq!(pool.cached_bytes(), 0);
    }

    #[test]
    fn cache_is_bounded() {
        let pool = HeapPool::new(8192);
        let a = pool.alloc(8192).unwrap();
        let b = pool.alloc(8192).unwrap();
        drop(a);
        drop(b);
        assert_eq!(pool.cached_bytes(), 8192);
    }

    #[test]
    fn truncate_and_set_len() {
        let pool = HeapPool::default();
        let mut b = pool.alloc(10).unwrap();
        b.truncate(4);
        assert_eq!(b.freeze().len(), 4);
        let mut b = pool.alloc(0).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.capacity(), 4096);
        b.set_len(4096);
        assert_eq!(b.len(), 4096);
    }
}
