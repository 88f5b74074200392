//! A listing that streams: a folder's first entries reach `ls` as soon as the first search page
//! is in, names listed so far can be looked up and read while later pages are on their way, and
//! a search that fails part-way gives EIO to the readdir that reaches the missing part, never a
//! folder that silently ends early. The core over the HTTP source, and through a real mount.

mod common;

use std::sync::Arc;
use std::sync::mpsc;

use common::{Mount, PATIENCE, Server, errno};
use fhirfs::{FhirFs, FsConfig, HttpConfig, HttpSource, ROOT_INO};
use fhirfs_testserver::loopback::{LoopbackServer, SearchFault};
use url::Url;

/// Files per search page.
const PAGE: usize = 100;

/// `n` Binaries `f0000`, `f0001`, ... whose bytes name them, listed `PAGE` to a page.
fn seed(server: &LoopbackServer, n: usize) -> Vec<String> {
    server.set_page_cap(PAGE);
    let ids: Vec<String> = (0..n).map(|i| format!("f{i:04}")).collect();
    for id in &ids {
        server.put(id, "text/plain", format!("bytes of {id}"));
    }
    ids
}

fn core(server: &LoopbackServer) -> Arc<FhirFs<HttpSource>> {
    let mut http = HttpConfig::new(Url::parse(&server.base_url()).unwrap());
    http.page_size = PAGE as u32;
    FhirFs::new(HttpSource::new(http).unwrap(), FsConfig::default())
}

/// The names a readdir at `offset` gives (as many as there are, up to the end of what came).
fn readdir_names(fs: &FhirFs<HttpSource>, fh: u64, offset: u64) -> Vec<String> {
    let mut names = Vec::new();
    fs.readdir(fh, offset, |e| {
        names.push(e.name.to_owned());
        false
    })
    .unwrap();
    names
}

/// Every name from `offset` to the end, as the kernel reads a folder: until a readdir gives
/// nothing, each waiting for its page.
async fn names_from(fs: &FhirFs<HttpSource>, fh: u64, mut offset: u64) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        fs.readdir_ready(fh, offset).await.unwrap();
        let more = readdir_names(fs, fh, offset);
        if more.is_empty() {
            return names;
        }
        offset += more.len() as u64;
        names.extend(more);
    }
}

#[tokio::test]
async fn the_first_page_is_readable_while_the_next_is_on_its_way() {
    let server = LoopbackServer::start().await.unwrap();
    let ids = seed(&server, 250);
    let gate = server.hold_searches_after(1);
    let fs = core(&server);

    // opendir answers with the first page's first files while the second page is held at
    // the server; the rest of the first page follows.
    let fh = tokio::time::timeout(PATIENCE, fs.opendir(ROOT_INO)).await.expect("opendir waited");
    let fh = fh.unwrap();
    let early = readdir_names(&fs, fh, 0);
    assert!(early.len() > 2, "opendir waits for files to show");
    assert_eq!(early[2..], ids[..early.len() - 2], "in the server's order, after . and ..");
    let past = (PAGE + 2) as u64;
    tokio::time::timeout(PATIENCE, fs.readdir_ready(fh, past - 1))
        .await
        .expect("the first page is in while the second is held")
        .unwrap();
    let first = readdir_names(&fs, fh, 0);
    assert_eq!(first[2..], ids[..PAGE], "the first page, in order, after . and ..");
    // Past it, the folder does not end: the entries are pending.
    assert!(fs.readdir_pending(fh, past));
    assert!(!fs.readdir_pending(fh, past - 1));
    // A listed name is looked up and read meanwhile.
    let attr = fs.lookup(ROOT_INO, "f0007".as_ref()).await.unwrap();
    assert_eq!(attr.size, "bytes of f0007".len() as u64);
    server.wait_for_counts(|c| c.searches >= 2).await;
    assert_eq!(server.counts().searches, 2, "the second page is held, the third not asked");

    gate.release();
    let mut all = first;
    all.extend(names_from(&fs, fh, past).await);
    assert_eq!(all[2..], ids[..], "every file once, in the server's order");
    assert!(!fs.readdir_pending(fh, all.len() as u64));
}

#[tokio::test]
async fn a_listing_that_fails_part_way_fails_past_what_came() {
    let server = LoopbackServer::start().await.unwrap();
    let ids = seed(&server, 250);
    server.set_search_fault(Some(SearchFault::StatusAfter { pages: 1, status: 500 }));
    let fs = core(&server);

    let fh = fs.opendir(ROOT_INO).await.unwrap();
    let past = (PAGE + 2) as u64;
    let err = fs.readdir_ready(fh, past).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(readdir_names(&fs, fh, 0)[2..], ids[..PAGE], "what came stays");
    let err = fs.readdir(fh, past, |_| false).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "the folder does not just end there");
    fs.release(fh);

    // The failed listing is not kept: the next opendir lists again, in full.
    server.set_search_fault(None);
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    let names = names_from(&fs, fh, 0).await;
    assert_eq!(names[2..], ids[..]);
}

/// Reads the folder in a thread of its own, sending each name as `read_dir` gives it.
fn read_dir_in_background(mount: &Mount) -> mpsc::Receiver<Result<String, i32>> {
    let (send, names) = mpsc::channel();
    let dir = mount.mountpoint.clone();
    std::thread::spawn(move || {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => return drop(send.send(Err(errno(e)))),
        };
        for entry in entries {
            let sent = match entry {
                Ok(entry) => send.send(Ok(entry.file_name().into_string().unwrap())),
                Err(e) => send.send(Err(errno(e))),
            };
            if sent.is_err() {
                return;
            }
        }
    });
    names
}

#[test]
fn ls_shows_the_first_page_before_the_rest_of_a_large_folder_arrives() {
    common::require_fuse();
    let server = Server::start();
    let ids = seed(&server.server, 250);
    let mount = Mount::builder().args(&["--page-size", "100"]).mount(&server.base_url());
    let gate = server.server.hold_searches_after(1);

    let names = read_dir_in_background(&mount);
    let first: Vec<String> = (0..PAGE)
        .map(|_| names.recv_timeout(PATIENCE).expect("an entry of the first page").unwrap())
        .collect();
    assert_eq!(first, ids[..PAGE], "the first page reached the program before the second");
    // Listed files open and read while the rest of the listing is held.
    assert_eq!(std::fs::read(mount.path("f0042")).unwrap(), b"bytes of f0042");
    assert_eq!(server.server.counts().searches, 2, "the second page is held, the third not asked");

    gate.release();
    let rest: Vec<String> = names.iter().map(|n| n.unwrap()).collect();
    assert_eq!(rest, ids[PAGE..], "the rest, once, in the server's order");
}

#[test]
fn ls_of_a_listing_that_fails_part_way_is_eio_after_the_first_page() {
    common::require_fuse();
    let server = Server::start();
    let ids = seed(&server.server, 250);
    let mount = Mount::builder().args(&["--page-size", "100"]).mount(&server.base_url());
    server.server.set_search_fault(Some(SearchFault::StatusAfter { pages: 1, status: 500 }));

    let got: Vec<Result<String, i32>> = read_dir_in_background(&mount).iter().collect();
    let listed: Vec<&String> = got.iter().map_while(|n| n.as_ref().ok()).collect();
    assert_eq!(listed, ids[..PAGE].iter().collect::<Vec<_>>(), "the first page");
    assert_eq!(got.get(PAGE), Some(&Err(libc::EIO)), "then EIO, not the end of the folder");
    // Listed files still work.
    assert_eq!(std::fs::read(mount.path("f0003")).unwrap(), b"bytes of f0003");

    server.server.set_search_fault(None);
    let again: Vec<String> = read_dir_in_background(&mount)
        .iter()
        .map(|n| n.unwrap_or_else(|e| panic!("errno {e}:\n{}", mount.log())))
        .collect();
    assert_eq!(again, ids, "the next ls lists again, in full");
}
