//! Recycled buffers for content. A fresh 64 MiB buffer costs 16,384 page faults and as many
//! zeroed pages before the first byte lands in it; the buffer of a file the cache just evicted
//! is already mapped. Once the cache is full, every new file evicts about as much as it needs,
//! so its body takes the buffer just given back (a cold 64 MiB read: about 45 → 40 ms here).
//!
//! The pool keeps at most [`POOL_BYTES`] (one 64 MiB file), so the daemon's memory stays
//! within the cache plus one file: a buffer waits here only between an eviction and the next
//! fetch.
//!
//! When no buffer fits, a [`Buffer`] being filled from start to end (a FHIR JSON body's
//! decoded `data`) has its new pages faulted in by a helper thread ahead of the writer, so the
//! faults run beside the download instead of inside the decoding.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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
    // Zeroed by the kernel as pages are first touched: no memset.
    recycled(len).unwrap_or_else(|| vec![0; len].into_boxed_slice())
}

/// A kept buffer that fits `len`, if any.
fn recycled(len: usize) -> Option<Box<[u8]>> {
    if len < MIN_POOLED {
        return None;
    }
    let mut kept = pool();
    let fit = (kept.iter().enumerate())
        .filter(|(_, b)| b.len() >= len && b.len() - len <= len / 64)
        .min_by_key(|(_, b)| b.len())
        .map(|(i, _)| i);
    fit.map(|i| kept.swap_remove(i))
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

/// A vector of capacity at least `len`, empty, on a recycled buffer when one fits; also
/// whether it is new memory (not recycled) of at least [`MIN_POOLED`] bytes.
fn vec_with_capacity(len: usize) -> (Vec<u8>, bool) {
    match recycled(len) {
        Some(buf) => {
            let mut data = buf.into_vec();
            data.clear();
            (data, false)
        }
        None => (Vec::with_capacity(len), len >= MIN_POOLED),
    }
}

/// Buffers at least this large get their pages faulted in ahead of the writer: a thread costs
/// tens of microseconds, 4 MiB of new pages about 1.5 ms here.
const FAULT_AHEAD_MIN: usize = 4 << 20;

/// How much the helper faults in per system call, between checks of its stop flag.
const FAULT_AHEAD_STEP: usize = 1 << 20;

/// An empty vector for content written from start to end, on a recycled buffer when one fits.
/// A new buffer of at least 4 MiB gets its pages faulted in by a helper thread while the
/// content arrives: a 64 MiB FHIR JSON read on a fresh mount, 70 → 63 ms here (the decoder
/// no longer stops at each of 16,384 page faults). Raw bodies do not use this: their reads
/// through FUSE already keep the second CPU busy, and it made them no faster.
#[derive(Debug)]
pub struct Buffer {
    // Declared first so that it is dropped first: the helper stops before `data` is freed.
    ahead: Option<FaultAhead>,
    data: Vec<u8>,
}

impl Buffer {
    /// A buffer for about `len` bytes.
    pub fn with_capacity(len: usize) -> Self {
        let (data, fresh) = vec_with_capacity(len);
        let ahead = (fresh && data.capacity() >= FAULT_AHEAD_MIN).then(|| FaultAhead::start(&data));
        Self { ahead, data }
    }

    /// An empty buffer with no allocation.
    pub fn empty() -> Self {
        Self { ahead: None, data: Vec::new() }
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// Bytes the buffer holds without growing.
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }

    /// The vector, with room for `additional` more bytes: append at most that many. If they do
    /// not fit, the helper is stopped first, as the vector will move to a new allocation.
    pub fn room_for(&mut self, additional: usize) -> &mut Vec<u8> {
        if self.data.capacity() - self.data.len() < additional {
            self.ahead = None;
        }
        &mut self.data
    }

    /// Waits until the helper has faulted everything in.
    #[cfg(test)]
    fn wait_ahead(&mut self) {
        if let Some(thread) = self.ahead.as_mut().and_then(|ahead| ahead.thread.take()) {
            thread.join().unwrap();
        }
    }

    /// The vector, once the helper has stopped.
    pub fn into_vec(mut self) -> Vec<u8> {
        self.ahead = None;
        std::mem::take(&mut self.data)
    }
}

/// The helper thread of a [`Buffer`]; dropping this stops it and waits for it (at most one
/// step), so it never outlives the allocation it touches.
#[derive(Debug)]
struct FaultAhead {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FaultAhead {
    /// Faults in the pages of `data`'s unused capacity, whole pages, from its start.
    fn start(data: &Vec<u8>) -> Self {
        let page = 4096;
        let start = (data.as_ptr() as usize + data.len()).next_multiple_of(page);
        let end = (data.as_ptr() as usize + data.capacity()) / page * page;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("fhirfs-fault".into()).spawn(move || {
            let mut at = start;
            while at < end && !stopped.load(Ordering::Relaxed) {
                let len = FAULT_AHEAD_STEP.min(end - at);
                // SAFETY: [at, at + len) lies inside the allocation, which outlives this
                // thread (dropping `FaultAhead` joins it, and `Buffer` drops it before the
                // vector can move or be freed). MADV_POPULATE_WRITE maps the pages as a
                // write would but writes nothing, so it never races with the writer's
                // bytes; an error (an old kernel) just ends the helper.
                let failed = unsafe {
                    libc::madvise(at as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) != 0
                };
                if failed {
                    break;
                }
                at += len;
            }
        });
        // No thread (out of resources): the writer faults its pages in itself, as without.
        Self { stop, thread: thread.ok() }
    }
}

impl Drop for FaultAhead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `data`'s whole capacity that are mapped now.
    fn resident_pages(data: &[u8], capacity: usize) -> usize {
        let page = 4096;
        let start = (data.as_ptr() as usize).next_multiple_of(page);
        let end = (data.as_ptr() as usize + capacity) / page * page;
        let mut vec = vec![0u8; (end - start) / page];
        // SAFETY: the range is inside the live allocation; mincore only reports on it.
        let result =
            unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(result, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&v| v & 1 == 1).count()
    }

    #[test]
    fn a_new_large_buffer_is_faulted_in_ahead_and_a_small_one_is_not() {
        // No other test gives a buffer of this size back to the pool, and above 32 MiB glibc
        // always maps new memory: nothing of it is mapped until someone touches it.
        let large = (40 << 20) + 12_345;
        let mut buffer = Buffer::with_capacity(large);
        assert!(buffer.ahead.is_some(), "a new {large}-byte buffer has a helper");
        buffer.wait_ahead();
        let pages = (large / 4096) - 1;
        assert!(
            resident_pages(buffer.as_slice(), buffer.capacity()) >= pages,
            "every page of the buffer is mapped before anything was written"
        );
        buffer.room_for(3).extend_from_slice(b"abc");
        assert_eq!(buffer.into_vec(), b"abc");

        let small = (3 << 20) + 12_345;
        assert!(Buffer::with_capacity(small).ahead.is_none(), "too small for a helper");

        // Growing past the capacity stops the helper first; the bytes are kept.
        let mut buffer = Buffer::with_capacity(large);
        buffer.room_for(5).extend_from_slice(b"hello");
        buffer.room_for(large).resize(large + 5, 7);
        assert!(buffer.ahead.is_none(), "stopped before the vector moved");
        let data = buffer.into_vec();
        assert_eq!(&data[..5], b"hello");
        assert_eq!(data.len(), large + 5);
    }

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
        drop(bytes(vec_with_capacity(4 << 20).0));
        assert_eq!(held(), POOL_BYTES / (4 << 20) * (4 << 20));
        while held() > 0 {
            take(4 << 20);
        }
        let recycled = bytes(vec_with_capacity(2 << 20).0);
        drop(recycled);
        assert_eq!(held(), 2 << 20, "Bytes of a pooled vector give it back when dropped");
        take(2 << 20);
    }
}
