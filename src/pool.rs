//! Recycled buffers for content. A fresh 64 MiB buffer costs 16,384 page faults and as many
//! zeroed pages before the first byte lands in it; the buffer of a file the cache just evicted
//! is already mapped. Once the cache is full, every new file evicts about as much as it needs,
//! so its body takes the buffer just given back (a cold 64 MiB read: about 45 → 40 ms here).
//!
//! The pool keeps at most [`POOL_BYTES`] (one 64 MiB file), so the daemon's memory stays
//! within the cache plus one file: a buffer waits here only between an eviction and the next
//! fetch.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// The most the pool keeps, in bytes: one 64 MiB file's buffer (a decoded JSON buffer is
/// sized from the body's length, a few hundred bytes more than the content).
pub const POOL_BYTES: usize = (64 << 20) + (64 << 10);

/// Buffers smaller than this are not kept: the allocator serves them well.
const MIN_POOLED: usize = 1 << 20;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// The pool's budget now: [`POOL_BYTES`], or less for a smaller cache.
static BUDGET: AtomicUsize = AtomicUsize::new(POOL_BYTES);

/// Keeps the pool within `bytes` (the cache's size): a small cache gets a small pool.
pub fn limit_to(bytes: usize) {
    let budget = bytes.min(POOL_BYTES);
    BUDGET.store(budget, Ordering::Relaxed);
    let mut kept = pool();
    while kept.iter().map(|b| b.len()).sum::<usize>() > budget {
        kept.remove(0);
    }
}

fn pool() -> std::sync::MutexGuard<'static, Vec<Box<[u8]>>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of at least `len` bytes, recycled when one fits (at most a 64th larger: the cache
/// weighs content by its length, so a larger buffer would hide memory from it), else fresh. Its contents are unspecified (zeros or an earlier file's bytes): callers
/// overwrite what they use.
pub fn take(len: usize) -> Box<[u8]> {
    if len >= MIN_POOLED {
        let mut kept = pool();
        let fit = (kept.iter().enumerate())
            .filter(|(_, b)| b.len() >= len && b.len() - len <= len / 64)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        if let Some(i) = fit {
            return kept.swap_remove(i);
        }
    }
    // Zeroed by the kernel as pages are first touched: no memset.
    vec![0; len].into_boxed_slice()
}

/// Gives a buffer back, kept if it fits the budget; older buffers make room for it (the one
/// just evicted is the likeliest to fit the next file).
pub fn give_back(buf: Box<[u8]>) {
    let budget = BUDGET.load(Ordering::Relaxed);
    if buf.len() < MIN_POOLED || buf.len() > budget {
        return;
    }
    let mut kept = pool();
    let mut held: usize = kept.iter().map(|b| b.len()).sum();
    // Dropped after the lock is released.
    let mut dropped = Vec::new();
    while held + buf.len() > budget && !kept.is_empty() {
        let oldest = kept.remove(0);
        held -= oldest.len();
        dropped.push(oldest);
    }
    kept.push(buf);
    drop(kept);
    drop(dropped);
}

/// Bytes held by the pool now.
pub fn held() -> usize {
    pool().iter().map(|b| b.len()).sum()
}

/// `data` as `Bytes` that give its buffer back to the pool when the last of them is dropped.
pub fn bytes(data: Vec<u8>) -> Bytes {
    if data.capacity() < MIN_POOLED {
        return Bytes::from(data);
    }
    Bytes::from_owner(Recycled(data))
}

/// A vector whose buffer goes back to the pool when dropped.
struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let mut data = std::mem::take(&mut self.0);
        // The whole allocation goes back, not only the part in use.
        let capacity = data.capacity();
        data.resize(capacity, 0);
        give_back(data.into_boxed_slice());
    }
}

/// A vector of capacity at least `len`, empty, on a recycled buffer when one fits.
pub fn vec_with_capacity(len: usize) -> Vec<u8> {
    if len < MIN_POOLED {
        return Vec::with_capacity(len);
    }
    let mut data = take(len).into_vec();
    data.clear();
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_within_the_budget_and_only_when_they_fit() {
        // The pool is process-wide: this is its only test, so nothing else uses it meanwhile.
        let big = take(4 << 20);
        let ptr = big.as_ptr();
        give_back(big);
        assert_eq!(held(), 4 << 20);
        assert!(take(16 << 20).len() >= 16 << 20, "too small: a fresh one");
        assert_eq!(held(), 4 << 20);
        assert_eq!(take(3 << 20).len(), 3 << 20, "much too large: a fresh one");
        let again = take((4 << 20) - (32 << 10));
        assert_eq!(again.as_ptr(), ptr, "a fitting one is recycled");
        assert_eq!(held(), 0);
        for _ in 0..(POOL_BYTES / (4 << 20)) + 2 {
            give_back(vec![0; 4 << 20].into_boxed_slice());
        }
        assert_eq!(held(), POOL_BYTES / (4 << 20) * (4 << 20), "never more than the budget");
        give_back(vec![0; 16 << 20].into_boxed_slice());
        assert_eq!(held(), POOL_BYTES / (4 << 20) * (4 << 20), "older buffers made room");
        assert_eq!(take(16 << 20).len(), 16 << 20, "the newest is kept");
        limit_to(8 << 20);
        give_back(vec![0; 16 << 20].into_boxed_slice());
        assert!(held() <= 8 << 20, "a small cache, a small pool");
        limit_to(usize::MAX);
        while held() > 0 {
            take(4 << 20);
        }
        for _ in 0..(POOL_BYTES / (4 << 20)) {
            give_back(vec![0; 4 << 20].into_boxed_slice());
        }
        drop(bytes(vec_with_capacity(4 << 20)));
        assert_eq!(held(), POOL_BYTES / (4 << 20) * (4 << 20));
        while held() > 0 {
            take(4 << 20);
        }
        let recycled = bytes(vec_with_capacity(2 << 20));
        drop(recycled);
        assert_eq!(held(), 2 << 20, "Bytes of a pooled vector give it back when dropped");
        take(2 << 20);
    }
}
