//! The cost of a large folder: readdir does work in proportion to the entries it returns,
//! not to the folder. Counted in allocations, not time: a counting allocator is this test
//! binary's global allocator, so this file holds only tests that need it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use fhirfs::{FhirFs, FsConfig, MemorySource, ROOT_INO};

/// Counts every allocation made in this process.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on unchanged to the system allocator, which upholds
// GlobalAlloc's contract; the counter is a plain atomic add.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as the caller gave it.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout (in `alloc` above).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The kernel's readdir buffer holds a few dozen entries of short names.
const REPLY_ENTRIES: usize = 32;

#[test]
fn readdir_work_does_not_grow_with_the_offset() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let source = MemorySource::new();
    let files = 50_000;
    for i in 0..files {
        source.put(&format!("f{i:06}"), "text/plain", "x");
    }
    let fs = FhirFs::new(source, FsConfig::default());
    let fh = runtime.block_on(fs.opendir(ROOT_INO)).unwrap();
    // The whole listing in (opendir answers once the first files are).
    runtime.block_on(fs.readdir_ready(fh, files as u64 + 1)).unwrap();
    let mut seen = Vec::with_capacity(REPLY_ENTRIES);
    for offset in [0, 25_000, files as u64 - 30] {
        seen.clear();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let given = fs
            .readdir(fh, offset, |entry| {
                seen.push(entry.next_offset);
                seen.len() == REPLY_ENTRIES
            })
            .unwrap();
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert_eq!(given, REPLY_ENTRIES, "offset {offset}");
        assert_eq!(seen.first(), Some(&(offset + 1)));
        assert_eq!(seen.last(), Some(&(offset + REPLY_ENTRIES as u64)));
        // The entries are borrowed from the folder's snapshot: nothing is copied, wherever
        // the reply starts.
        assert_eq!(allocations, 0, "readdir at offset {offset} allocated");
    }
    // Near the end only what is left is given, and nothing past it.
    assert_eq!(fs.readdir(fh, files as u64, |_| false).unwrap(), 2);
    assert_eq!(fs.readdir(fh, files as u64 + 2, |_| false).unwrap(), 0);
    assert_eq!(fs.readdir(fh, u64::MAX, |_| false).unwrap(), 0);
}
