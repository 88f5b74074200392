//! Backup and desktop tools through a real mount: `cp -r`, `rsync -a`, `stat`, xattrs,
//! versions changing on the server, and `--extensions` names.

mod common;

use fhirfs_testserver::noise;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Mount, Server, errno};

/// Stores a varied set of Binaries and returns (id, content type, bytes).
fn seed(server: &Server) -> Vec<(String, &'static str, Vec<u8>)> {
    let mut seeded = Vec::new();
    let kinds = ["application/pdf", "image/png", "text/plain", "application/dicom"];
    for (i, len) in
        [0, 1, 2, 3, 4095, 4096, 4097, 65_536, 300_000, 1_048_577].into_iter().enumerate()
    {
        for (k, kind) in kinds.iter().enumerate() {
            let id = format!("f{i}-{k}");
            let bytes = noise(len, (i * 10 + k) as u64);
            server.server.put(&id, kind, bytes.clone());
            seeded.push((id, *kind, bytes));
        }
    }
    seeded
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("run");
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

fn assert_same_tree(seeded: &[(String, &str, Vec<u8>)], copy: &Path) {
    let copied = std::fs::read_dir(copy).unwrap().count();
    assert_eq!(copied, seeded.len(), "files in {}", copy.display());
    for (id, _, bytes) in seeded {
        assert_eq!(&std::fs::read(copy.join(id)).unwrap(), bytes, "{id} in {}", copy.display());
    }
}

#[test]
fn cp_and_rsync_make_byte_identical_copies_with_server_times() {
    let server = Server::start();
    let seeded = seed(&server);
    let mount = Mount::new(&server.base_url());
    let out = tempfile::tempdir().unwrap();

    let cp_dst = out.path().join("cp");
    run(Command::new("cp").arg("-r").arg(&mount.mountpoint).arg(&cp_dst));
    assert_same_tree(&seeded, &cp_dst);

    let rsync_dst = out.path().join("rsync");
    let src = format!("{}/", mount.mountpoint.display());
    run(Command::new("rsync").arg("-a").arg(&src).arg(&rsync_dst));
    assert_same_tree(&seeded, &rsync_dst);

    for (id, _, _) in &seeded {
        let stored = server.server.stored(id).unwrap().last_updated;
        let mounted = std::fs::metadata(mount.path(id)).unwrap();
        assert_eq!(mounted.modified().unwrap(), stored, "mtime of {id} is lastUpdated");
        assert_eq!(mounted.ctime(), mounted.mtime(), "ctime of {id}");
        assert_eq!(mounted.blocks(), mounted.len().div_ceil(512), "st_blocks of {id}");
        let copied = std::fs::metadata(rsync_dst.join(id)).unwrap();
        assert_eq!(copied.modified().unwrap(), stored, "rsync -a keeps the mtime of {id}");
    }
}

#[test]
fn a_second_rsync_after_the_ttl_changes_nothing_and_fetches_no_content() {
    let server = Server::start();
    let seeded = seed(&server);
    let mount = Mount::builder()
        .arg("--dir-ttl")
        .arg("0.3")
        .arg("--cache-ttl")
        .arg("0.3")
        .mount(&server.base_url());
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("copy");
    let src = format!("{}/", mount.mountpoint.display());
    run(Command::new("rsync").arg("-a").arg(&src).arg(&dst));
    assert_same_tree(&seeded, &dst);

    // Let both TTLs run out: the second run must revalidate, and do it by listing. Counted
    // after the wait, so that no late request of the first run counts against the second.
    std::thread::sleep(Duration::from_millis(400));
    let reads = server.server.counts().reads;
    let searches = server.server.counts().searches;
    let changes = run(Command::new("rsync").arg("-a").arg("--itemize-changes").arg(&src).arg(&dst));
    assert_eq!(changes, "", "the second rsync changes nothing");
    assert_eq!(server.server.counts().reads, reads, "no content GET (not even a 304)");
    assert!(server.server.counts().searches > searches, "the listing was revalidated");
}

#[test]
fn xattrs_carry_the_fhir_metadata_and_are_read_only() {
    let server = Server::start();
    server.server.put("doc", "application/pdf", "%PDF-1.4");
    let mount = Mount::new(&server.base_url());
    let path = mount.path("doc");
    let stored = server.server.stored("doc").unwrap();
    let get = |name: &str| xattr::get(&path, name).unwrap().map(|v| String::from_utf8(v).unwrap());
    assert_eq!(get("user.mime_type").as_deref(), Some("application/pdf"));
    assert_eq!(get("user.fhir.versionId").as_deref(), Some("1"));
    let last_updated = fhirfs::format_instant(stored.last_updated);
    assert_eq!(get("user.fhir.lastUpdated"), Some(last_updated));
    assert_eq!(get("user.fhir.securityContext"), None, "absent when the Binary has none");
    let mut names: Vec<_> = xattr::list(&path).unwrap().map(|n| n.into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["user.fhir.lastUpdated", "user.fhir.versionId", "user.mime_type"]);

    assert_eq!(errno(xattr::set(&path, "user.mime_type", b"text/plain").unwrap_err()), libc::EROFS);
    assert_eq!(errno(xattr::remove(&path, "user.mime_type").unwrap_err()), libc::EROFS);
}

#[test]
fn within_the_ttl_the_cached_version_is_served_without_requests() {
    let server = Server::start();
    server.server.put("a", "text/plain", "version one");
    let mount = Mount::new(&server.base_url());
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"version one");
    let reads = server.server.counts().reads;
    server.server.put("a", "text/plain", "version two, longer");
    assert_eq!(std::fs::metadata(mount.path("a")).unwrap().len(), 11);
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"version one");
    assert_eq!(server.server.counts().reads, reads);
}

/// Drops the kernel's page cache of `path` (clean pages only: all of a read-only mount's).
fn drop_kernel_pages(path: &Path) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    let done = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(done, 0, "posix_fadvise");
}

/// A file the cache evicted while the kernel kept its pages is opened again with no request;
/// pages the kernel dropped are fetched again when read, and only the open version is served.
#[test]
fn reopening_an_evicted_file_keeps_the_kernel_pages() {
    let server = Server::start();
    let (a, b, a2) = (noise(700_000, 61), noise(700_000, 62), noise(700_000, 63));
    server.server.put("a", "application/pdf", a.clone());
    server.server.put("b", "application/pdf", b.clone());
    // Room for one of the two files only.
    let mount = Mount::builder().args(&["--cache-size", "1MiB"]).mount(&server.base_url());
    let (path_a, path_b) = (mount.path("a"), mount.path("b"));
    assert!(std::fs::read(&path_a).unwrap() == a);
    assert!(std::fs::read(&path_b).unwrap() == b, "b evicts a from the cache");
    assert_eq!((server.reads_of("a"), server.reads_of("b")), (1, 1));

    // The kernel still has a's pages: no request, the same bytes.
    assert!(std::fs::read(&path_a).unwrap() == a);
    assert_eq!(server.reads_of("a"), 1, "re-reading a cost a request");

    // Without its pages, a is fetched again when read (once, however many reads).
    drop_kernel_pages(&path_a);
    assert!(std::fs::read(&path_a).unwrap() == a);
    assert_eq!(server.reads_of("a"), 2);

    // Evict a again (b fetched again), then store a newer a on the server. Within the TTL the
    // open version is a's first; the kernel's pages of it and the server's new bytes must not
    // mix, so the read that needs the server fails, and the next open shows version two.
    drop_kernel_pages(&path_b);
    assert!(std::fs::read(&path_b).unwrap() == b);
    assert_eq!(server.reads_of("b"), 2);
    server.server.put("a", "application/pdf", a2.clone());
    drop_kernel_pages(&path_a);
    let failed = std::fs::read(&path_a).map(|bytes| bytes.len());
    assert_eq!(errno(failed.unwrap_err()), libc::EIO);
    assert!(std::fs::read(&path_a).unwrap() == a2, "the failed open gave way to version two");
}

#[test]
fn a_new_version_shows_new_size_time_and_bytes_never_stale_pages() {
    let server = Server::start();
    server.server.put("a", "text/plain", "AAAAAAAAAA");
    // JSON, so that a version no listing has named yet still has its millisecond time (a raw
    // answer carries only Last-Modified's whole seconds until the next listing).
    let mount = Mount::builder()
        .args(&["--dir-ttl", "0", "--cache-ttl", "0", "--fetch", "json"])
        .mount(&server.base_url());
    let path = mount.path("a");
    // Twice, so that the second open keeps the kernel's page cache.
    assert_eq!(std::fs::read(&path).unwrap(), b"AAAAAAAAAA");
    assert_eq!(std::fs::read(&path).unwrap(), b"AAAAAAAAAA");
    // Same size, new bytes: only the version tells them apart.
    server.server.put("a", "text/plain", "BBBBBBBBBB");
    assert_eq!(std::fs::read(&path).unwrap(), b"BBBBBBBBBB");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.modified().unwrap(), server.server.stored("a").unwrap().last_updated);

    server.server.put("a", "text/plain", "CCCCCCCCCCCCCCCCCCCC");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 20);
    assert_eq!(std::fs::read(&path).unwrap(), b"CCCCCCCCCCCCCCCCCCCC");
}

#[test]
fn an_open_file_keeps_its_version_for_everyone_until_closed() {
    let server = Server::start();
    let old = noise(300_000, 1);
    let new = noise(200_000, 2);
    server.server.put("a", "application/octet-stream", old.clone());
    let mount = Mount::builder()
        .arg("--dir-ttl")
        .arg("0")
        .arg("--cache-ttl")
        .arg("0")
        .mount(&server.base_url());
    let path = mount.path("a");
    let mut held = std::fs::File::open(&path).unwrap();
    let mut start = vec![0u8; 100_000];
    std::io::Read::read_exact(&mut held, &mut start).unwrap();

    server.server.put("a", "application/octet-stream", new.clone());
    // Other programs see the held version whole: its size, its bytes.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 300_000);
    assert_eq!(std::fs::read(&path).unwrap(), old);
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut rest).unwrap();
    start.extend_from_slice(&rest);
    assert_eq!(start, old, "the open file reads its own version to its end");
    drop(held);

    // Closed everywhere: the next open gets the new version.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 200_000);
    assert_eq!(std::fs::read(&path).unwrap(), new);
}

#[test]
fn extensions_name_files_by_content_type_and_both_names_open() {
    let server = Server::start();
    server.server.put("report", "application/pdf", "%PDF");
    server.server.put("scan", "image/png", "\u{89}PNG");
    server.server.put("note", "text/plain; charset=utf-8", "hello");
    server.server.put("blob", "application/x-unknown-to-anyone", "??");
    // An id that already looks like another file's name with its extension.
    server.server.put("twin", "application/pdf", "twin one");
    server.server.put("twin.pdf", "application/pdf", "twin two");
    let mount = Mount::builder().arg("--extensions").mount(&server.base_url());

    let mut names: Vec<_> = std::fs::read_dir(&mount.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["blob", "note.txt", "report.pdf", "scan.png", "twin", "twin.pdf"]);
    assert_eq!(std::fs::read(mount.path("report.pdf")).unwrap(), b"%PDF");
    assert_eq!(std::fs::read(mount.path("report")).unwrap(), b"%PDF");
    assert_eq!(std::fs::read(mount.path("twin")).unwrap(), b"twin one");
    assert_eq!(std::fs::read(mount.path("twin.pdf")).unwrap(), b"twin two");
    assert_eq!(errno(std::fs::metadata(mount.path("report.png")).unwrap_err()), libc::ENOENT);

    // Unlisted (a server that cannot search): the extension name still opens it.
    server.server.put("late", "image/png", "late png");
    server.server.set_search_status(Some(400));
    let mount = Mount::builder().arg("--extensions").mount(&server.base_url());
    assert_eq!(std::fs::read(mount.path("late.png")).unwrap(), b"late png");
}

#[test]
fn ls_l_on_a_server_with_native_bytes_takes_sizes_from_head() {
    let server = Server::start();
    let mut seeded = Vec::new();
    for i in 0..120 {
        let id = format!("scan-{i:03}");
        let bytes = noise(1000 + i * 37, i as u64);
        server.server.put(&id, "image/png", bytes.clone());
        seeded.push((id, bytes));
    }
    let mount = Mount::new(&server.base_url());
    // `ls -l`: the folder in order, a stat for each file.
    let mut sizes = Vec::new();
    for entry in std::fs::read_dir(&mount.mountpoint).unwrap() {
        let entry = entry.unwrap();
        sizes.push((entry.file_name().into_string().unwrap(), entry.metadata().unwrap().len()));
    }
    sizes.sort();
    let expected: Vec<_> = seeded.iter().map(|(id, b)| (id.clone(), b.len() as u64)).collect();
    assert_eq!(sizes, expected);
    let counts = server.server.counts();
    assert!(counts.heads > 0, "{counts:?}");
    assert!(
        counts.reads < seeded.len() as u64 / 2,
        "most sizes came without their content: {counts:?}"
    );
    for (id, bytes) in &seeded {
        assert_eq!(&std::fs::read(mount.path(id)).unwrap(), bytes, "{id}");
    }
}
