//! The core without a kernel: `FhirFs` over a `MemorySource`.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fhirfs::Body;
use fhirfs::Listed;
use fhirfs::{Fetched, MemorySource, Reserve, Source, Streamed};
use fhirfs::{FhirFs, FsConfig, Kind, ROOT_INO};
use fhirfs::{FsError, SourceError};

fn core(source: MemorySource) -> Arc<FhirFs<MemorySource>> {
    FhirFs::new(source, FsConfig::default())
}

fn core_with(source: MemorySource, config: FsConfig) -> Arc<FhirFs<MemorySource>> {
    FhirFs::new(source, config)
}

/// A core that trusts nothing (TTLs of zero), and the inodes it told the kernel to drop.
fn uncached_core_watching_the_kernel(
    source: MemorySource,
) -> (Arc<FhirFs<MemorySource>>, Arc<std::sync::Mutex<Vec<u64>>>) {
    let config =
        FsConfig { dir_ttl: Duration::ZERO, cache_ttl: Duration::ZERO, ..FsConfig::default() };
    let fs = core_with(source, config);
    let invalidated = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&invalidated);
    fs.set_invalidator(Box::new(move |ino| seen.lock().unwrap().push(ino)));
    (fs, invalidated)
}

async fn read_all(fs: &Arc<FhirFs<MemorySource>>, ino: u64) -> Vec<u8> {
    let opened = fs.open(ino, false).await.unwrap();
    let mut out = Vec::new();
    loop {
        let chunk = fs.read(opened.fh, out.len() as u64, 4096).await.unwrap();
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    fs.release(opened.fh);
    out
}

async fn names(fs: &Arc<FhirFs<MemorySource>>, fh: u64) -> Vec<String> {
    entries(fs, fh, 0).await.into_iter().map(|(name, _)| name).collect()
}

/// Every entry from `offset` on: name and kind. As the kernel reads a folder: until a readdir
/// gives nothing, each waiting for its page.
async fn entries(fs: &Arc<FhirFs<MemorySource>>, fh: u64, offset: u64) -> Vec<(String, Kind)> {
    let mut out = Vec::new();
    let mut offset = offset;
    loop {
        fs.readdir_ready(fh, offset).await.unwrap();
        let given = fs
            .readdir(fh, offset, |e| {
                out.push((e.name.to_owned(), e.kind));
                offset = e.next_offset;
                false
            })
            .unwrap();
        if given == 0 {
            return out;
        }
    }
}

#[tokio::test]
async fn listing_shows_every_binary_with_dots_first() {
    let source = MemorySource::new();
    source.put("b", "text/plain", "bb");
    source.put("a", "text/plain", "a");
    let fs = core(source);
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    assert_eq!(names(&fs, fh).await, [".", "..", "a", "b"]);
    // Resuming from an offset skips what was returned.
    assert_eq!(entries(&fs, fh, 3).await, [("b".to_owned(), Kind::File)]);
}

#[tokio::test]
async fn listing_is_cached_for_the_dir_ttl() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "a");
    let fs = core(source);
    fs.opendir(ROOT_INO).await.unwrap();
    fs.opendir(ROOT_INO).await.unwrap();
    assert_eq!(fs.source().list_count(), 1);

    let source = MemorySource::new();
    let fs = core_with(source, FsConfig { dir_ttl: Duration::ZERO, ..FsConfig::default() });
    fs.opendir(ROOT_INO).await.unwrap();
    fs.opendir(ROOT_INO).await.unwrap();
    assert_eq!(fs.source().list_count(), 2);
}

#[tokio::test]
async fn listed_sizes_need_no_fetch() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "12345");
    let fs = core(source);
    fs.opendir(ROOT_INO).await.unwrap();
    let attr = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap();
    assert_eq!(attr.size, 5);
    assert_eq!(attr.perm, 0o444);
    assert_eq!(fs.source().fetch_count(), 0);
}

#[tokio::test]
async fn unlisted_ids_are_looked_up_with_their_exact_size() {
    let source = MemorySource::new();
    source.put("hidden", "application/pdf", vec![7u8; 1234]);
    source.set_list_error(Some(SourceError::Status(400)));
    let fs = core(source);
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    assert_eq!(names(&fs, fh).await, [".", ".."], "a refused search is an empty folder");
    let attr = fs.lookup(ROOT_INO, OsStr::new("hidden")).await.unwrap();
    assert_eq!(attr.size, 1234);
    assert_eq!(read_all(&fs, attr.ino).await, vec![7u8; 1234]);
    assert_eq!(fs.source().fetch_count(), 1, "lookup and open share one fetch");
}

#[tokio::test]
async fn names_outside_the_id_pattern_make_no_request() {
    let fs = core(MemorySource::new());
    for name in ["a b", ".", "..", "x_y", &"z".repeat(65)] {
        let err = fs.lookup(ROOT_INO, OsStr::new(name)).await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT, "{name}");
    }
    assert_eq!(fs.source().fetch_count(), 0);
}

#[tokio::test]
async fn errors_map_to_errno() {
    let source = MemorySource::new();
    for (id, error) in [
        ("u", SourceError::Unauthorized),
        ("f", SourceError::Forbidden),
        ("g", SourceError::Gone),
        ("s", SourceError::Status(500)),
        ("b", SourceError::BadBody("bad base64".into())),
    ] {
        source.put(id, "text/plain", "x");
        source.set_error(id, Some(error));
    }
    let fs = core(source);
    for (id, errno) in [
        ("u", libc::EACCES),
        ("f", libc::EACCES),
        ("g", libc::ENOENT),
        ("s", libc::EIO),
        ("b", libc::EIO),
        ("missing", libc::ENOENT),
    ] {
        let err = fs.lookup(ROOT_INO, OsStr::new(id)).await.unwrap_err();
        assert_eq!(err.errno(), errno, "{id}: {err}");
    }
}

#[tokio::test]
async fn a_failed_fetch_is_not_cached() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "abc");
    source.set_error("a", Some(SourceError::Status(503)));
    let fs = core(source);
    assert!(fs.lookup(ROOT_INO, OsStr::new("a")).await.is_err());
    fs.source().set_error("a", None);
    let attr = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap();
    assert_eq!(read_all(&fs, attr.ino).await, b"abc");
    assert_eq!(fs.source().fetch_count(), 2);
}

#[tokio::test]
async fn reads_past_the_end_are_empty() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "abc");
    let fs = core(source);
    let attr = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap();
    let opened = fs.open(attr.ino, false).await.unwrap();
    assert_eq!(&fs.read(opened.fh, 1, 100).await.unwrap()[..], b"bc");
    assert!(fs.read(opened.fh, 3, 100).await.unwrap().is_empty());
    assert!(fs.read(opened.fh, u64::MAX, u32::MAX).await.unwrap().is_empty());
    fs.release(opened.fh);
    assert_eq!(fs.read(opened.fh, 0, 1).await.unwrap_err(), FsError::BadHandle);
}

#[tokio::test]
async fn writes_are_refused_read_only() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "abc");
    let fs = core(source);
    let attr = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap();
    assert_eq!(fs.open(attr.ino, true).await.unwrap_err().errno(), libc::EROFS);
    assert_eq!(fs.open(ROOT_INO, false).await.unwrap_err().errno(), libc::EISDIR);
}

// A current-thread runtime polls every spawned task before the test task resumes, so all
// eight opens are waiting when the fetch is released.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_opens_of_one_cold_id_make_one_fetch() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "payload");
    let fs = core(source);
    fs.opendir(ROOT_INO).await.unwrap();
    let ino = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap().ino;
    fs.source().hold();
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let fs = Arc::clone(&fs);
            tokio::spawn(async move { fs.open(ino, false).await })
        })
        .collect();
    fs.source().wait_for_fetches(1).await;
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    fs.source().release();
    for open in opens {
        let opened = open.await.unwrap().unwrap();
        assert_eq!(&fs.read(opened.fh, 0, 100).await.unwrap()[..], b"payload");
    }
    assert_eq!(fs.source().fetch_count(), 1);
}

#[tokio::test]
async fn a_new_version_is_served_after_the_ttl_and_the_kernel_is_told() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "old");
    let (fs, invalidated) = uncached_core_watching_the_kernel(source);
    let attr = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap();
    let first = fs.open(attr.ino, false).await.unwrap();
    assert!(!first.keep_cache);
    fs.release(first.fh);

    // Same version again: revalidated (304), and the kernel may keep its pages.
    let second = fs.open(attr.ino, false).await.unwrap();
    assert!(second.keep_cache);
    fs.release(second.fh);

    fs.source().put("a", "text/plain", "newer");
    let attr2 = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap();
    assert_eq!(attr2.ino, attr.ino, "inodes are stable per id");
    assert_eq!(attr2.size, 5);
    let third = fs.open(attr.ino, false).await.unwrap();
    assert!(!third.keep_cache, "new bytes: the kernel must drop its pages");
    assert_eq!(&fs.read(third.fh, 0, 100).await.unwrap()[..], b"newer");
    assert_eq!(invalidated.lock().unwrap().as_slice(), [attr.ino]);
}

#[tokio::test]
async fn an_open_file_pins_its_version_until_the_last_close() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "old bytes");
    let (fs, invalidated) = uncached_core_watching_the_kernel(source);
    let ino = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap().ino;
    let old = fs.open(ino, false).await.unwrap();
    fs.source().put("a", "text/plain", "new bytes, longer");

    // While `old` is open, everyone sees its version: same size, same bytes, no mixing.
    assert_eq!(fs.getattr(ino).await.unwrap().size, 9);
    let second = fs.open(ino, false).await.unwrap();
    assert!(second.keep_cache);
    assert_eq!(&fs.read(second.fh, 0, 100).await.unwrap()[..], b"old bytes");
    assert_eq!(&fs.read(old.fh, 0, 100).await.unwrap()[..], b"old bytes");
    assert!(invalidated.lock().unwrap().is_empty());
    fs.release(second.fh);
    fs.release(old.fh);

    // After the last close the new version shows, and the kernel drops the old pages.
    assert_eq!(fs.getattr(ino).await.unwrap().size, 17);
    let new = fs.open(ino, false).await.unwrap();
    assert!(!new.keep_cache);
    assert_eq!(&fs.read(new.fh, 0, 100).await.unwrap()[..], b"new bytes, longer");
    assert_eq!(invalidated.lock().unwrap().as_slice(), [ino]);
}

#[tokio::test]
async fn two_opens_that_share_one_fetch_both_hold_the_pin() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "old bytes");
    let (fs, _) = uncached_core_watching_the_kernel(source);
    let ino = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap().ino;
    // Both opens find no pin and wait on the same fetch; the second to finish must join the
    // pin the first one made, not just share its bytes.
    fs.source().hold();
    let (a, b) = (Arc::clone(&fs), Arc::clone(&fs));
    let first = tokio::spawn(async move { a.open(ino, false).await.unwrap() });
    let second = tokio::spawn(async move { b.open(ino, false).await.unwrap() });
    fs.source().wait_for_fetches(2).await;
    fs.source().release();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    fs.release(first.fh);
    fs.source().put("a", "text/plain", "new bytes, longer");
    // `second` is still open: a third open sees its version.
    let third = fs.open(ino, false).await.unwrap();
    assert_eq!(&fs.read(third.fh, 0, 100).await.unwrap()[..], b"old bytes");
    assert_eq!(&fs.read(second.fh, 0, 100).await.unwrap()[..], b"old bytes");
}

/// A `MemorySource` whose streamed bodies `shape` makes from the stored bytes: whole, cut
/// after their headers, failing later...
struct Shaped<F> {
    inner: MemorySource,
    shape: F,
}

impl<F: Fn(bytes::Bytes) -> Arc<Body> + Send + Sync + 'static> Source for Shaped<F> {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        self.inner.list().await
    }

    async fn fetch(&self, id: &str, version: Option<&str>) -> Result<Fetched, SourceError> {
        self.inner.fetch(id, version).await
    }

    async fn fetch_streaming(
        self: &Arc<Self>,
        id: &str,
        version: Option<&str>,
        _reserve: &Reserve<'_>,
    ) -> Result<Streamed, SourceError> {
        let Fetched::Content { meta, bytes } = self.inner.fetch(id, version).await? else {
            return Ok(Streamed::NotModified);
        };
        Ok(Streamed::Content { meta, body: (self.shape)(bytes) })
    }
}

/// The headers came; the connection drops before the first byte of the body.
fn cut_after_headers(bytes: bytes::Bytes) -> Arc<Body> {
    let (body, filler) = Body::filling(bytes.len() as u64);
    drop(filler);
    body
}

#[tokio::test]
async fn two_opens_that_share_a_failed_fetch_both_hold_the_pin() {
    let inner = MemorySource::new();
    inner.put("a", "text/plain", "old bytes");
    let config =
        FsConfig { dir_ttl: Duration::ZERO, cache_ttl: Duration::ZERO, ..FsConfig::default() };
    let fs = FhirFs::new(Shaped { inner, shape: cut_after_headers }, config);
    let ino = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap().ino;
    fs.source().inner.hold();
    let (a, b) = (Arc::clone(&fs), Arc::clone(&fs));
    let first = tokio::spawn(async move { a.open(ino, false).await.unwrap() });
    let second = tokio::spawn(async move { b.open(ino, false).await.unwrap() });
    fs.source().inner.wait_for_fetches(2).await;
    fs.source().inner.release();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(fs.open_files(), (2, 9), "one pin of 9 bytes for both");
    fs.release(first.fh);
    assert_eq!(fs.open_files(), (1, 9), "the second is still open: its version stays pinned");
    fs.release(second.fh);
    assert_eq!(fs.open_files(), (0, 0));
}

#[tokio::test]
async fn content_larger_than_the_cache_is_still_served() {
    let source = MemorySource::new();
    source.put("big", "application/octet-stream", vec![1u8; 4096]);
    let config = FsConfig { cache_bytes: 1024, ..FsConfig::default() };
    let fs = core_with(source, config);
    let ino = fs.lookup(ROOT_INO, OsStr::new("big")).await.unwrap().ino;
    assert_eq!(read_all(&fs, ino).await.len(), 4096);
    assert_eq!(fs.source().fetch_count(), 1, "the open after the lookup does not fetch again");
    assert!(fs.cached_bytes() <= 1024);
}

#[tokio::test]
async fn listing_errors_other_than_refusal_fail() {
    let source = MemorySource::new();
    source.set_list_error(Some(SourceError::Unauthorized));
    let fs = core(source);
    assert_eq!(fs.opendir(ROOT_INO).await.unwrap_err().errno(), libc::EACCES);
    fs.source().set_list_error(Some(SourceError::Status(502)));
    assert_eq!(fs.opendir(ROOT_INO).await.unwrap_err().errno(), libc::EIO);
}

#[tokio::test]
async fn a_404_is_remembered_briefly_and_other_errors_not_at_all() {
    let source = MemorySource::new();
    source.put("flaky", "text/plain", "x");
    source.set_error("flaky", Some(SourceError::Status(503)));
    let fs = core(source);
    for _ in 0..3 {
        assert!(fs.lookup(ROOT_INO, OsStr::new("nope")).await.is_err());
        assert!(fs.lookup(ROOT_INO, OsStr::new("flaky")).await.is_err());
    }
    assert_eq!(fs.source().fetch_count(), 1 + 3, "one 404 remembered, each 503 tried again");

    let fs =
        core_with(MemorySource::new(), FsConfig { dir_ttl: Duration::ZERO, ..FsConfig::default() });
    fs.lookup(ROOT_INO, OsStr::new("nope")).await.unwrap_err();
    fs.source().put("nope", "text/plain", "now it exists");
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("nope")).await.unwrap().size, 13);
}

#[tokio::test]
async fn the_content_cache_stays_within_its_size() {
    let source = MemorySource::new();
    for i in 0..6 {
        source.put(&format!("f{i}"), "application/octet-stream", vec![i as u8; 1000]);
    }
    let fs = core_with(source, FsConfig { cache_bytes: 4000, ..FsConfig::default() });
    for i in 0..6 {
        let ino = fs.lookup(ROOT_INO, OsStr::new(&format!("f{i}"))).await.unwrap().ino;
        assert_eq!(read_all(&fs, ino).await, vec![i as u8; 1000]);
        assert!(fs.cached_bytes() <= 4000, "{} bytes cached after f{i}", fs.cached_bytes());
    }
    assert_eq!(fs.source().fetch_count(), 6, "lookup and open share each fetch");
}

/// A core whose cache holds one of two 100-byte files, `a` and `b`.
fn core_holding_one_of_two() -> Arc<FhirFs<MemorySource>> {
    let source = MemorySource::new();
    source.put("a", "text/plain", vec![b'a'; 100]);
    source.put("b", "text/plain", vec![b'b'; 100]);
    core_with(source, FsConfig { cache_bytes: 150, ..FsConfig::default() })
}

/// Opens, reads the first 4 KiB and closes `name`: whether the kernel kept its pages, and the
/// bytes.
async fn open_read_close(fs: &Arc<FhirFs<MemorySource>>, name: &str) -> (bool, Vec<u8>) {
    let ino = fs.lookup(ROOT_INO, OsStr::new(name)).await.unwrap().ino;
    let opened = fs.open(ino, false).await.unwrap();
    let bytes = fs.read(opened.fh, 0, 4096).await.unwrap().to_vec();
    fs.release(opened.fh);
    (opened.keep_cache, bytes)
}

/// The core of [`core_holding_one_of_two`] after reading `a` then `b`, which evicted `a`
/// (whose pages the kernel keeps), and `a`'s inode.
async fn a_evicted_by_b() -> (Arc<FhirFs<MemorySource>>, u64) {
    let fs = core_holding_one_of_two();
    open_read_close(&fs, "a").await;
    open_read_close(&fs, "b").await;
    assert_eq!(fs.source().fetch_count(), 2, "b evicted a");
    let ino = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap().ino;
    (fs, ino)
}

#[tokio::test]
async fn an_evicted_file_reopens_on_the_kernels_pages_and_fetches_only_what_is_read() {
    let (fs, ino) = a_evicted_by_b().await;
    let opened = fs.open(ino, false).await.unwrap();
    assert!(opened.keep_cache, "the kernel's pages of a are kept");
    assert_eq!(fs.source().fetch_count(), 2, "and the open asked nothing");
    // A read at the end needs no byte, so it asks for none.
    assert!(fs.read(opened.fh, 100, 4096).await.unwrap().is_empty());
    assert_eq!(fs.source().fetch_count(), 2);
    // A read that reaches the daemon (a page the kernel dropped) fetches the file once.
    assert_eq!(fs.read(opened.fh, 0, 4096).await.unwrap(), vec![b'a'; 100]);
    assert_eq!(fs.source().fetch_count(), 3);
    fs.release(opened.fh);
    // The same version came back: the next open still keeps the kernel's pages.
    let (kept, bytes) = open_read_close(&fs, "a").await;
    assert!(kept, "the kernel's pages are the version fetched again");
    assert_eq!((bytes, fs.source().fetch_count()), (vec![b'a'; 100], 3));
}

#[tokio::test]
async fn an_evicted_file_whose_version_changed_is_never_read_from_the_kernels_pages() {
    let (fs, ino) = a_evicted_by_b().await;
    let opened = fs.open(ino, false).await.unwrap();
    assert!(opened.keep_cache);
    fs.source().put("a", "text/plain", vec![b'A'; 100]);
    // The pages the kernel dropped cannot come from the new version.
    let read = fs.read(opened.fh, 0, 4096).await;
    assert!(matches!(read, Err(ref e) if e.errno() == libc::EIO), "{read:?}");
    fs.release(opened.fh);
    let (kept, bytes) = open_read_close(&fs, "a").await;
    assert_eq!((kept, bytes), (false, vec![b'A'; 100]), "the next open: the new version");
}

#[tokio::test]
async fn a_body_with_every_byte_in_cannot_fail_any_more() {
    let inner = MemorySource::new();
    inner.put("a", "text/plain", "all the bytes");
    let config = FsConfig { cache_ttl: Duration::ZERO, ..FsConfig::default() };
    // The first body gets every byte and then fails, as a deadline or a broken connection
    // after the last chunk would make it.
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    let shape = move |bytes: bytes::Bytes| {
        if failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Body::whole(bytes);
        }
        let (body, mut filler) = Body::filling(bytes.len() as u64);
        filler.push(&bytes).unwrap();
        filler.fail(SourceError::Timeout(Duration::from_secs(30)));
        body
    };
    let fs = FhirFs::new(Shaped { inner, shape }, config);
    let ino = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap().ino;
    // Every open revalidates (TTL 0; 304) and keeps the body: all of it reads.
    for _ in 0..3 {
        let opened = fs.open(ino, false).await.unwrap();
        assert_eq!(&fs.read(opened.fh, 0, 100).await.unwrap()[..], b"all the bytes");
        fs.release(opened.fh);
    }
}

#[tokio::test]
async fn a_body_still_arriving_is_not_confirmed_by_a_304() {
    let inner = MemorySource::new();
    inner.put("a", "text/plain", "all the bytes");
    let config = FsConfig { cache_ttl: Duration::ZERO, ..FsConfig::default() };
    // The first body stops after 4 bytes, and fails when the test drops its filler.
    let filler = Arc::new(std::sync::Mutex::new(None));
    let held = Arc::clone(&filler);
    let shape = move |bytes: bytes::Bytes| {
        let mut slot = held.lock().unwrap();
        if slot.is_some() {
            return Body::whole(bytes);
        }
        let (body, mut filler) = Body::filling(bytes.len() as u64);
        filler.push(&bytes[..4]).unwrap();
        *slot = Some(Some(filler));
        body
    };
    let fs = FhirFs::new(Shaped { inner, shape }, config);
    let ino = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap().ino;
    fs.source().inner.hold();
    let opening = tokio::spawn({
        let fs = Arc::clone(&fs);
        async move { fs.open(ino, false).await.unwrap() }
    });
    fs.source().inner.wait_for_fetches(2).await;
    // The first body fails for good while the open's request is out.
    drop(filler.lock().unwrap().as_mut().and_then(Option::take));
    fs.source().inner.release();
    let opened = opening.await.unwrap();
    assert_eq!(&fs.read(opened.fh, 0, 100).await.unwrap()[..], b"all the bytes");
}

#[tokio::test]
async fn a_second_open_after_a_relay_keeps_the_kernels_pages() {
    let (fs, ino) = a_evicted_by_b().await;
    let first = fs.open(ino, false).await.unwrap();
    assert_eq!(fs.read(first.fh, 0, 4096).await.unwrap(), vec![b'a'; 100]);
    // Hand the single-threaded runtime to the relay task until it has finished (it has no
    // more to wait for): a scheduling step, not a wait for time.
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    // Another program opens the file while the first still has it open.
    let second = fs.open(ino, false).await.unwrap();
    assert!(second.keep_cache, "joining the open version keeps the kernel's pages");
    fs.release(second.fh);
    fs.release(first.fh);
    let (kept, _) = open_read_close(&fs, "a").await;
    assert!(kept, "and so does the next open after both closed");
    assert_eq!(fs.source().fetch_count(), 3);
}

#[tokio::test]
async fn a_file_no_listing_names_keeps_the_kernels_pages_after_the_dir_ttl() {
    let source = MemorySource::new();
    source.put("a", "text/plain", vec![b'a'; 100]);
    source.put("b", "text/plain", vec![b'b'; 100]);
    // Metadata is never trusted for long; bytes are, for the cache TTL.
    let config = FsConfig { cache_bytes: 150, dir_ttl: Duration::ZERO, ..FsConfig::default() };
    let fs = core_with(source, config);
    open_read_close(&fs, "a").await;
    open_read_close(&fs, "b").await;
    assert_eq!(fs.source().fetch_count(), 2, "b evicted a");
    // Looked up by id again: the size comes from what the kernel holds, not from a download.
    let (kept, bytes) = open_read_close(&fs, "a").await;
    assert!(kept);
    assert_eq!(bytes, vec![b'a'; 100]);
    assert_eq!(fs.source().fetch_count(), 3, "only the read that reached the daemon fetched");
}

// --- FORGET ----------------------------------------------------------------------------------

/// A core whose cache (1 KiB) holds none of the 4,000-byte files below, over a server that
/// cannot list: every file is looked up by id, and only the kernel's lookups hold its node.
fn forgetting_core() -> Arc<FhirFs<MemorySource>> {
    let source = MemorySource::new();
    source.set_list_error(Some(SourceError::Status(400)));
    for id in ["a", "b", "c", "d"] {
        source.put(id, "text/plain", vec![id.as_bytes()[0]; 4000]);
    }
    core_with(source, FsConfig { cache_bytes: 1024, ..FsConfig::default() })
}

async fn look(fs: &Arc<FhirFs<MemorySource>>, name: &str) -> u64 {
    fs.lookup(ROOT_INO, OsStr::new(name)).await.unwrap().ino
}

fn dropped(fs: &FhirFs<MemorySource>) -> u64 {
    fs.stats().dropped.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn forget_drops_a_node_nothing_holds_and_its_inode_serves_the_next_id() {
    let fs = forgetting_core();
    let a = look(&fs, "a").await;
    let b = look(&fs, "b").await;
    assert_eq!(fs.file_count(), 2);

    fs.forget(a, 1);
    assert_eq!((fs.file_count(), dropped(&fs)), (1, 1), "a is gone");
    assert_eq!(fs.getattr(a).await.unwrap_err().errno(), libc::ENOENT);
    // Its slot serves the next new id, with that id's bytes.
    let c = look(&fs, "c").await;
    assert_eq!(c, a);
    assert_eq!(read_all(&fs, c).await, vec![b'c'; 4000]);
    // `a` again: a new inode, its own bytes; `b` kept its inode.
    let a_again = look(&fs, "a").await;
    assert!(a_again != c && a_again != b);
    assert_eq!(read_all(&fs, a_again).await, vec![b'a'; 4000]);
    assert_eq!(look(&fs, "b").await, b);
    assert_eq!(fs.file_count(), 3);
}

#[tokio::test]
async fn forget_keeps_nodes_the_kernel_still_knows_open_files_and_cached_bytes() {
    let fs = forgetting_core();
    // Looked up twice, forgotten once: the kernel still knows it.
    let a = look(&fs, "a").await;
    look(&fs, "a").await;
    // (The last file fetched that is larger than the cache stays for the open after its
    // lookup: `c` takes that place from `a`.)
    look(&fs, "c").await;
    fs.forget(a, 1);
    assert_eq!(fs.getattr(a).await.unwrap().size, 4000);
    fs.forget(a, 1);
    assert_eq!(dropped(&fs), 1);

    // Open while forgotten: kept until the last close.
    let b = look(&fs, "b").await;
    let opened = fs.open(b, false).await.unwrap();
    let d = look(&fs, "d").await;
    fs.forget(b, 1);
    assert_eq!(dropped(&fs), 1, "open");
    assert_eq!(fs.read(opened.fh, 0, 10).await.unwrap(), vec![b'b'; 10]);
    fs.release(opened.fh);
    assert_eq!(dropped(&fs), 2, "dropped at its last close");

    // Bytes still held (`d`, the last file fetched): kept.
    fs.forget(d, 1);
    assert_eq!(dropped(&fs), 2, "cached");
    assert_eq!(fs.file_count(), 2, "c and d");
}

#[tokio::test]
async fn forget_keeps_listed_files() {
    let source = MemorySource::new();
    source.put("a", "text/plain", "listed");
    let fs = core_with(source, FsConfig { cache_bytes: 0, ..FsConfig::default() });
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    fs.release(fh);
    let a = look(&fs, "a").await;
    fs.forget(a, 1);
    assert_eq!((fs.file_count(), dropped(&fs)), (1, 0));
    assert_eq!(look(&fs, "a").await, a, "a listed file keeps its inode");
}

/// A source whose listing gives its one page, says so, then waits to be let go.
struct HoldsAfterAPage {
    inner: MemorySource,
    given: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
}

impl Source for HoldsAfterAPage {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        self.inner.list().await
    }

    async fn list_pages<F: FnMut(Vec<Listed>, Option<u64>) + Send>(
        &self,
        mut page: F,
    ) -> Result<(), SourceError> {
        page(self.inner.list().await?, None);
        self.given.notify_one();
        self.go.notified().await;
        Ok(())
    }

    async fn fetch(&self, id: &str, version: Option<&str>) -> Result<Fetched, SourceError> {
        self.inner.fetch(id, version).await
    }
}

// (On the test's one thread, the listing's page is taken in before the test goes on.)
#[tokio::test]
async fn forget_keeps_a_file_a_listing_under_way_has_taken_in() {
    let inner = MemorySource::new();
    inner.put("a", "application/pdf", "listed");
    inner.put("b", "application/pdf", "listed");
    let (given, go) = (Arc::default(), Arc::new(tokio::sync::Notify::new()));
    let source = HoldsAfterAPage { inner, given: Arc::clone(&given), go: Arc::clone(&go) };
    // With --extensions the listing shows at its end: its files have no position until then.
    let config = FsConfig { cache_bytes: 0, extensions: true, ..FsConfig::default() };
    let fs = FhirFs::new(source, config);
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).await.unwrap().ino;
    // (`b`, fetched last, takes the place the last file larger than the cache keeps.)
    let b = fs.lookup(ROOT_INO, OsStr::new("b")).await.unwrap().ino;
    let opening = tokio::spawn({
        let fs = Arc::clone(&fs);
        async move { fs.opendir(ROOT_INO).await }
    });
    given.notified().await;
    // The kernel forgets the file while the listing that took it in is still on its way.
    fs.forget(a, 1);
    assert_eq!(fs.stats().dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
    go.notify_one();
    let fh = opening.await.unwrap().unwrap();
    let mut names = Vec::new();
    fs.readdir(fh, 0, |e| {
        names.push((e.ino, e.name.to_owned()));
        false
    })
    .unwrap();
    let expected = [(a, "a.pdf".to_owned()), (b, "b.pdf".to_owned())];
    assert_eq!(names[2..], expected, "listed, named, with their inodes");
    assert_eq!(fs.stats().dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// A source whose listing gives one page, then panics (a bug while paging).
struct PanicsAfterAPage(MemorySource);

impl Source for PanicsAfterAPage {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        self.0.list().await
    }

    async fn list_pages<F: FnMut(Vec<Listed>, Option<u64>) + Send>(
        &self,
        mut page: F,
    ) -> Result<(), SourceError> {
        page(self.0.list().await?, None);
        panic!("a bug while paging (this panic is the test's)");
    }

    async fn fetch(&self, id: &str, version: Option<&str>) -> Result<Fetched, SourceError> {
        self.0.fetch(id, version).await
    }
}

#[tokio::test]
async fn a_listing_whose_task_dies_fails_the_readdir_past_its_pages_instead_of_hanging() {
    let inner = MemorySource::new();
    inner.put("a", "text/plain", "a");
    inner.put("b", "text/plain", "b");
    let fs = FhirFs::new(PanicsAfterAPage(inner), FsConfig::default());
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    let past = tokio::time::timeout(Duration::from_secs(20), fs.readdir_ready(fh, 4)).await;
    assert_eq!(past.expect("readdir hung").unwrap_err().errno(), libc::EIO);
    // The next opendir lists again.
    fs.release(fh);
    let again = tokio::time::timeout(Duration::from_secs(20), fs.opendir(ROOT_INO)).await;
    assert!(again.expect("opendir hung").is_ok());
}
