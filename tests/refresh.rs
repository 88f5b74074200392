//! Refreshing the listing by what changed (`Binary/_history?_since=`, `Binary?_lastUpdated=gt`
//! with a total), and falling back to full listings: the core over the HTTP source and the
//! loopback server, counting the server's requests; then through a real mount.

mod common;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fhirfs::{FhirFs, FsConfig, HttpConfig, HttpSource, ROOT_INO};
use fhirfs_testserver::loopback::LoopbackServer;
use url::Url;

/// A core that refreshes its listing on every `opendir` (`--dir-ttl 0`).
fn core(server: &LoopbackServer, full_relist: Duration) -> Arc<FhirFs<HttpSource>> {
    let mut http = HttpConfig::new(Url::parse(&server.base_url()).unwrap());
    http.page_size = 100;
    let source = HttpSource::new(http).unwrap();
    let config = FsConfig { dir_ttl: Duration::ZERO, full_relist, ..FsConfig::default() };
    FhirFs::new(source, config)
}

fn core_refreshing(server: &LoopbackServer) -> Arc<FhirFs<HttpSource>> {
    core(server, fhirfs::DEFAULT_FULL_RELIST)
}

/// The names of the folder, listed (or refreshed) anew, without `.` and `..`.
async fn ls(fs: &Arc<FhirFs<HttpSource>>) -> Vec<String> {
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    let mut names = Vec::new();
    // As the kernel reads a folder: until a readdir gives nothing, each waiting for its page.
    let mut offset = 2;
    loop {
        fs.readdir_ready(fh, offset).await.unwrap();
        let given = fs
            .readdir(fh, offset, |e| {
                names.push(e.name.to_owned());
                offset = e.next_offset;
                false
            })
            .unwrap();
        if given == 0 {
            break;
        }
    }
    fs.release(fh);
    names
}

/// `n` Binaries, stored an hour ago, served in pages of 100.
fn fill(server: &LoopbackServer, n: usize) -> Vec<String> {
    server.set_page_cap(100);
    let ids: Vec<String> = (0..n).map(|i| format!("f{i:04}")).collect();
    for id in &ids {
        server.put(id, "text/plain", format!("content of {id}"));
    }
    server.age(Duration::from_secs(3600));
    ids
}

/// Runs `f` and says how many searches (history included) it sent.
async fn searches<T>(server: &LoopbackServer, f: impl AsyncFnOnce() -> T) -> (T, u64) {
    let before = server.counts().searches;
    let out = f().await;
    (out, server.counts().searches - before)
}

#[tokio::test]
async fn a_history_refresh_applies_creates_updates_and_deletes_in_one_request() {
    let server = LoopbackServer::start().await.unwrap();
    server.set_change_feeds(true, true);
    let mut ids = fill(&server, 250);
    let fs = core_refreshing(&server);
    let (names, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!(names, ids);
    assert_eq!(sent, 3, "250 Binaries in pages of 100");

    // Nothing changed: one request, however large the folder.
    let (names, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!((names, sent), (ids.clone(), 1));

    server.put("new-1", "text/plain", "brand new");
    server.put("f0003", "text/plain", "updated, and longer than before");
    server.delete("f0005");
    let (names, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!(sent, 1, "one history page");
    ids.retain(|id| id != "f0005");
    ids.push("new-1".to_owned());
    assert_eq!(names, ids, "the deleted one gone, the new one last");

    // The update shows its new size; the deleted one is ENOENT.
    let updated = fs.lookup(ROOT_INO, OsStr::new("f0003")).await.unwrap();
    assert_eq!(updated.size, "updated, and longer than before".len() as u64);
    let gone = fs.lookup(ROOT_INO, OsStr::new("f0005")).await.unwrap_err();
    assert_eq!(gone.errno(), libc::ENOENT);
    assert_eq!(fs.stats().refreshes.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(fs.stats().listings.load(std::sync::atomic::Ordering::Relaxed), 1);

    // Deleted, then created again: listed again, with its new content.
    server.put("f0005", "text/plain", "back");
    let names = ls(&fs).await;
    assert_eq!(names.last().map(String::as_str), Some("f0005"));
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("f0005")).await.unwrap().size, 4);
}

#[tokio::test]
async fn ten_changes_of_many_take_at_most_three_requests_without_history() {
    let server = LoopbackServer::start().await.unwrap();
    // `_lastUpdated` and `_summary=count`, no type history (as Microsoft's `_since`-less one).
    server.set_change_feeds(true, false);
    let mut ids = fill(&server, 2000);
    let fs = core_refreshing(&server);
    let (_, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!(sent, 20);

    for id in ids.iter().take(8) {
        server.put(id, "text/plain", "changed");
    }
    server.put("new-a", "text/plain", "a");
    server.put("new-b", "text/plain", "b");
    ids.extend(["new-a".to_owned(), "new-b".to_owned()]);
    // History refused once (404), then the changes and the total.
    let (names, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!(names, ids);
    assert_eq!(sent, 3);
    let changed = fs.lookup(ROOT_INO, OsStr::new("f0001")).await.unwrap();
    assert_eq!(changed.size, 7);

    // From then on: the changes and the total.
    let (_, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!(sent, 2);

    // A deletion no search reports: the total does not add up, so everything is listed.
    server.delete("f0010");
    let (names, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!(sent, 2 + 21, "changes, total, then the full listing of 2001");
    ids.retain(|id| id != "f0010");
    assert_eq!(names.len(), ids.len());
    assert!(!names.contains(&"f0010".to_owned()));
}

#[tokio::test]
async fn a_server_that_ignores_last_updated_gets_full_listings() {
    let server = LoopbackServer::start().await.unwrap();
    // The default: `_lastUpdated` is ignored (every Binary comes back), no type history.
    let mut ids = fill(&server, 150);
    let fs = core_refreshing(&server);
    ls(&fs).await;
    server.delete("f0001");
    ids.retain(|id| id != "f0001");
    // Tried once: history (404), one page of a search that ignored `_lastUpdated`, then the
    // full listing; afterwards straight to full listings.
    let (names, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!(names, ids);
    assert_eq!(sent, 1 + 1 + 2);
    let (names, sent) = searches(&server, async || ls(&fs).await).await;
    assert_eq!(names, ids);
    assert_eq!(sent, 2);
}

#[tokio::test]
async fn full_relist_zero_never_asks_for_changes() {
    let server = LoopbackServer::start().await.unwrap();
    server.set_change_feeds(true, true);
    let ids = fill(&server, 120);
    let fs = core(&server, Duration::ZERO);
    for _ in 0..3 {
        let (names, sent) = searches(&server, async || ls(&fs).await).await;
        assert_eq!((names, sent), (ids.clone(), 2));
    }
    assert_eq!(fs.stats().refreshes.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_failed_refresh_falls_back_to_a_full_listing() {
    let server = LoopbackServer::start().await.unwrap();
    server.set_change_feeds(true, false);
    let ids = fill(&server, 10);
    let fs = core_refreshing(&server);
    ls(&fs).await;
    ls(&fs).await;
    // Every search fails for a while: the refresh and the full listing both give EIO.
    server.set_search_status(Some(503));
    let (err, sent) = searches(&server, async || fs.opendir(ROOT_INO).await.unwrap_err()).await;
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(sent, 5 + 5, "the refresh, then the full listing, each tried five times");
    server.set_search_status(None);
    assert_eq!(ls(&fs).await, ids);
}

#[test]
fn a_mount_shows_changes_through_history_refreshes() {
    let server = common::Server::start();
    server.server.set_change_feeds(true, true);
    for id in ["a", "b", "c"] {
        server.server.put(id, "text/plain", id.repeat(3));
    }
    let mount = common::Mount::builder().args(&["--dir-ttl", "0"]).mount(&server.base_url());
    let ls = || {
        let mut names: Vec<String> = std::fs::read_dir(&mount.mountpoint)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(ls(), ["a", "b", "c"]);
    server.server.put("b", "text/plain", "bigger now");
    server.server.delete("c");
    server.server.put("d", "text/plain", "dd");
    let before = server.server.counts().searches;
    assert_eq!(ls(), ["a", "b", "d"]);
    assert_eq!(server.server.counts().searches - before, 1);
    assert_eq!(std::fs::read(mount.path("b")).unwrap(), b"bigger now");
    let err = std::fs::metadata(mount.path("c")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(std::fs::read(mount.path("d")).unwrap(), b"dd");
}
