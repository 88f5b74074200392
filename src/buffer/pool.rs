//! Recycled buffers for content. A fresh 64 MiB buffer costs 16,384 page faults and as many
//! zeroed pages before the first byte lands in it; the buffer of a file the cache just evicted
//! is already mapped. Once the cache is full, every new file evicts about as much as it needs,
//! so its body takes the buffer just given back (a cold 64 MiB read: about 45 → 40 ms here).
//!
//! The pool keeps at most [`POOL_BYTES`] (one 64 MiB file), so the daemon's memory stays
//! within the cache plus one file: a buffer waits here only between an eviction and the next
//! fetch.
//!
//! When no buffer fits, a buffer written from start to end (a FHIR JSON body's decoded
//! `data`) can have its new pages faulted in by a helper thread ([`FaultAhead`]) ahead of the
//! writer, so the faults run beside the download instead of inside the decoding.

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
/// weighs content by its length, so a larger buffer would hide memory from it), else fresh.
/// Its contents are unspecified (zeros or an earlier file's bytes): callers overwrite what
/// they use.
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
#[cfg(test)]
fn held() -> usize {
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
pub(crate) fn vec_with_capacity(len: usize) -> (Vec<u8>, bool) {
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
pub(crate) const FAULT_AHEAD_MIN: usize = 4 << 20;

/// How far ahead of the writer the helper faults pages in: a body that stalls or ends early
/// (its Content-Length lied) leaves at most this much mapped for nothing.
const FAULT_AHEAD_LEAD: usize = 8 << 20;

/// How much the helper faults in per system call, between checks of its stop flag: dropping
/// it waits for at most one step.
const FAULT_AHEAD_STEP: usize = 256 << 10;

/// The system's page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf only reads a system setting.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Helpers running at once. One keeps the second CPU of a two-CPU machine busy during a JSON
/// download; more would compete with the decoders themselves.
const FAULT_AHEAD_HELPERS: usize = 1;

static HELPERS: AtomicUsize = AtomicUsize::new(0);

/// Set once the kernel refused `MADV_POPULATE_WRITE` (before Linux 5.14, or a sandbox): no
/// more helpers are started.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// A helper thread that faults in the new pages of a buffer being written from start to end,
/// up to [`FAULT_AHEAD_LEAD`] ahead of the writer, so that the writer (a JSON decoder) does
/// not stop at each of its page faults: on a fresh mount a 64 MiB FHIR JSON read went from
/// about 65 to 55 ms here (medians of 7 files, four A/B pairs, every pair faster). Raw bodies
/// do not use it: their reads through FUSE already keep the second CPU busy, and it made them
/// no faster.
///
/// Dropping this stops the helper and waits for it, so it never outlives the allocation it
/// touches.
#[derive(Debug)]
pub(crate) struct FaultAhead {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    #[cfg(test)]
    range: (usize, usize),
}

/// What the writer tells its helper.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// Bytes written from the start of the allocation.
    written: AtomicUsize,
    /// The helper is waiting for the writer (for tests).
    waiting: AtomicBool,
}

/// Counts a running helper; the count drops when the thread ends, however it ends.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        HELPERS.fetch_sub(1, Ordering::AcqRel);
    }
}

impl FaultAhead {
    /// Starts a helper for `data`'s unused capacity (whole pages), if the capacity is large
    /// enough, the kernel can do it, and no other helper is running.
    ///
    /// # Safety
    /// The returned value must be dropped before `data`'s allocation is freed or moved (the
    /// vector grows, shrinks or is dropped): until then the helper calls `madvise` on it.
    pub(crate) unsafe fn start(data: &Vec<u8>) -> Option<Self> {
        if data.capacity() < FAULT_AHEAD_MIN || UNSUPPORTED.load(Ordering::Relaxed) {
            return None;
        }
        if HELPERS.fetch_add(1, Ordering::AcqRel) >= FAULT_AHEAD_HELPERS {
            HELPERS.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let running = Running;
        let page = page_size();
        let base = data.as_ptr() as usize;
        let start = (base + data.len()).next_multiple_of(page);
        let end = (base + data.capacity()) / page * page;
        let shared = Arc::new(Shared::default());
        shared.written.store(data.len(), Ordering::Relaxed);
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fhirfs-fault".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let _running = running;
                let mut at = start;
                while at < end && !theirs.stop.load(Ordering::Acquire) {
                    let lead = base + theirs.written.load(Ordering::Acquire) + FAULT_AHEAD_LEAD;
                    if at >= lead {
                        theirs.waiting.store(true, Ordering::Release);
                        std::thread::park();
                        theirs.waiting.store(false, Ordering::Release);
                        continue;
                    }
                    let len = FAULT_AHEAD_STEP.min(end - at);
                    // SAFETY: [at, at + len) lies inside the allocation, which outlives this
                    // thread (see `start`; dropping `FaultAhead` joins it). MADV_POPULATE_WRITE
                    // maps the pages as a write would but writes nothing: a page the writer
                    // has already mapped is left as it is.
                    let result = unsafe {
                        libc::madvise(at as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE)
                    };
                    if result != 0 {
                        let error = std::io::Error::last_os_error().raw_os_error();
                        if matches!(error, Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)) {
                            UNSUPPORTED.store(true, Ordering::Relaxed);
                        }
                        break;
                    }
                    at += len;
                }
            });
        // No thread (out of resources): the writer faults its pages in itself, as without.
        let thread = thread.ok()?;
        Some(Self {
            shared,
            thread: Some(thread),
            #[cfg(test)]
            range: (start, end),
        })
    }

    /// The writer has written `written` bytes from the start of the allocation.
    pub(crate) fn progress(&self, written: usize) {
        self.shared.written.store(written, Ordering::Release);
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }
}

impl Drop for FaultAhead {
    fn drop(&mut self) {
        #[cfg(test)]
        tests::assert_mapped(self.range, "the buffer was freed before its helper stopped");
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Tests that start helpers take this: at most one helper runs at a time, process-wide.
    pub(crate) static ONE_HELPER_AT_A_TIME: Mutex<()> = Mutex::new(());

    pub(crate) fn one_helper_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        ONE_HELPER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pages of [start, end) that are mapped now.
    fn resident_pages((start, end): (usize, usize)) -> usize {
        let mut vec = vec![0u8; (end - start) / page_size()];
        // SAFETY: mincore only reports on the range; the caller's allocation holds it.
        let result =
            unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(result, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&v| v & 1 == 1).count()
    }

    /// Panics with `why` unless all of [start, end) is mapped (mincore fails with ENOMEM on a
    /// range with a hole).
    pub(super) fn assert_mapped((start, end): (usize, usize), why: &str) {
        if end <= start {
            return;
        }
        let mut vec = vec![0u8; (end - start).div_ceil(page_size())];
        // SAFETY: as above; on an unmapped range mincore only reports the error.
        let result =
            unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(result, 0, "{why}: {}", std::io::Error::last_os_error());
    }

    /// Spins (yielding) until `done`, for at most 10 s.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "still waiting for {what}");
            std::thread::yield_now();
        }
    }

    /// Fails, saying why, where the kernel has no MADV_POPULATE_WRITE: the helper then never
    /// starts (correctly), and these tests could not tell that from a broken one.
    pub(crate) fn require_populate_write() {
        let probe: Vec<u8> = Vec::with_capacity(2 * page_size());
        let start = (probe.as_ptr() as usize).next_multiple_of(page_size());
        // SAFETY: one page inside the allocation; populating it writes nothing.
        let result = unsafe {
            libc::madvise(start as *mut libc::c_void, page_size(), libc::MADV_POPULATE_WRITE)
        };
        assert_eq!(
            result,
            0,
            "this kernel refuses MADV_POPULATE_WRITE (Linux 5.14 or later is needed): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Keeps the kernel from backing `data` with huge pages, which would map 2 MiB at a time
    /// and blur how far ahead the helper went (where transparent huge pages are `always`).
    fn small_pages(data: &[u8], capacity: usize) {
        let start = (data.as_ptr() as usize).next_multiple_of(page_size());
        let end = (data.as_ptr() as usize + capacity) / page_size() * page_size();
        // SAFETY: whole pages inside the allocation; the advice changes no contents.
        let result = unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_NOHUGEPAGE)
        };
        assert_eq!(result, 0, "MADV_NOHUGEPAGE: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_helper_keeps_ahead_of_the_writer_and_ends_when_dropped() {
        let _one = one_helper_at_a_time();
        require_populate_write();
        // Above 32 MiB glibc always maps new memory: nothing of it is mapped yet.
        let large = (40 << 20) + 12_345;
        let data: Vec<u8> = Vec::with_capacity(large);
        small_pages(&data, large);
        // SAFETY: `ahead` is dropped before `data`, which does not change meanwhile.
        let ahead = unsafe { FaultAhead::start(&data) }.expect("a helper for a new 40 MiB buffer");
        assert_eq!(HELPERS.load(Ordering::Acquire), 1);
        let second: Vec<u8> = Vec::with_capacity(large);
        // SAFETY: as above, for a second buffer.
        let refused = unsafe { FaultAhead::start(&second) };
        assert!(refused.is_none(), "one helper at a time");
        let small: Vec<u8> = Vec::with_capacity(FAULT_AHEAD_MIN - 1);
        // SAFETY: as above.
        let refused = unsafe { FaultAhead::start(&small) };
        assert!(refused.is_none(), "too small for a helper");

        // Nothing written yet: the helper stops a lead ahead and waits.
        wait_until("the helper to wait for the writer", || {
            ahead.shared.waiting.load(Ordering::Acquire)
        });
        let mapped = resident_pages(ahead.range) * page_size();
        assert!(
            (FAULT_AHEAD_LEAD - page_size()..=FAULT_AHEAD_LEAD + FAULT_AHEAD_STEP)
                .contains(&mapped),
            "{mapped} bytes mapped ahead of a writer at 0"
        );
        // The writer is done: the helper maps the rest and ends.
        ahead.progress(large);
        let finished = || ahead.thread.as_ref().is_some_and(|t| t.is_finished());
        wait_until("the helper to finish", finished);
        assert!(resident_pages(ahead.range) >= (ahead.range.1 - ahead.range.0) / page_size());
        drop(ahead);
        assert_eq!(HELPERS.load(Ordering::Acquire), 0);

        // Dropped while it runs: it has ended when the drop returns.
        // SAFETY: as above.
        let ahead = unsafe { FaultAhead::start(&second) }.expect("the slot is free again");
        ahead.progress(large);
        drop(ahead);
        assert_eq!(HELPERS.load(Ordering::Acquire), 0, "the helper ended before the drop returned");
    }

    #[test]
    fn buffers_come_back_within_the_budget_and_only_when_they_fit() {
        // The pool is process-wide: this is the only test that gives buffers back, and the sizes it
        // takes are ones no other test asks for.
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
