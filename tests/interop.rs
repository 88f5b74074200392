//! Interop: the real `fhirfs` binary mounted over a real, unmodified FHIR server, checked with
//! plain file calls and `rsync`. The server comes from `FHIRFS_IT_BASE` or is an `hfs` started
//! here (see `common/interop.rs`); `./scripts/interop` finds or installs one and runs this.
//!
//! Every test shares one server and one seeded set of 160 Binaries, which no test changes.
//! Tests that write (create, update, delete) take `Suite::writers`, and so does the rsync test,
//! whose two runs must see the same server.

mod common;
#[path = "common/interop.rs"]
mod interop;

use fhirfs_testserver::noise;
use std::collections::HashSet;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{Mount, PATIENCE, errno};
use interop::{FhirServer, Version};

/// The TTLs given to mounts that must notice changes, in seconds.
const SHORT_TTL: &str = "1";

/// How long to wait for a change to show: `SHORT_TTL` for the mount's caches (and at most as
/// long for the kernel's attribute cache, which counts from the same earlier access), plus a
/// second of slack for a loaded machine.
const AFTER_TTL: Duration = Duration::from_secs(2);

/// Bound on one `rsync` run over the whole mount (about 8 MiB).
const RSYNC_PATIENCE: Duration = Duration::from_secs(120);

const PDF: &[u8] = include_bytes!("../assets/demo/report.pdf");
const PNG: &[u8] = include_bytes!("../assets/demo/scan.png");
const OCTETS: &str = "application/octet-stream";
const TEXT: &str = "text/plain; charset=utf-8";

/// A Binary the suite created, with what it holds.
struct Seeded {
    what: String,
    bytes: Vec<u8>,
    version: Version,
}

struct Suite {
    server: FhirServer,
    seeded: Vec<Seeded>,
    /// Held by tests that change the server, and by the rsync test, which needs it unchanged.
    writers: Mutex<()>,
}

impl Suite {
    fn writer(&self) -> MutexGuard<'_, ()> {
        self.writers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mounts the server with the full token and `args`.
    fn mount(&self, args: &[&str]) -> Mount {
        self.mount_at(&self.server.base, self.server.token.as_deref(), args)
    }

    fn mount_at(&self, base: &str, token: Option<&str>, args: &[&str]) -> Mount {
        let mut builder = Mount::builder();
        for arg in args {
            builder = builder.arg(arg);
        }
        if let Some(token) = token {
            builder = builder.env("FHIRFS_TOKEN", token);
        }
        builder.mount(base)
    }
}

/// The server and its seeded Binaries, set up once for all tests. A failed setup fails every
/// test with the same message instead of being tried again.
fn suite() -> &'static Suite {
    static SUITE: OnceLock<Result<Suite, String>> = OnceLock::new();
    let suite = SUITE.get_or_init(|| {
        let server = FhirServer::from_env()?;
        let seeded = samples()
            .into_iter()
            .map(|(what, content_type, bytes)| Seeded {
                version: server.create(content_type, &bytes),
                what,
                bytes,
            })
            .collect();
        Ok(Suite { server, seeded, writers: Mutex::new(()) })
    });
    match suite {
        Ok(suite) => suite,
        Err(e) => panic!("interop setup failed: {e}"),
    }
}

/// Text of exactly `len` bytes, with lines and a few multi-byte characters.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = String::with_capacity(len + 64);
    let mut n = seed;
    while out.len() < len {
        n += 1;
        out.push_str(&format!("line {n}: Binary über FUSE, bytes as they are\n"));
    }
    // Cut on a character boundary and pad with ASCII, so the text stays valid UTF-8.
    let mut end = len;
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    let mut bytes = out.into_bytes();
    bytes.resize(len, b'.');
    bytes
}

/// The 160 Binaries to seed: the edge sizes, then a spread of small files of four kinds.
fn samples() -> Vec<(String, &'static str, Vec<u8>)> {
    let mut samples: Vec<(String, &'static str, Vec<u8>)> = vec![
        ("empty".into(), OCTETS, Vec::new()),
        ("1 byte".into(), OCTETS, noise(1, 1)),
        ("4 KiB - 1".into(), OCTETS, noise(4095, 2)),
        ("4 KiB".into(), OCTETS, noise(4096, 3)),
        ("4 KiB + 1".into(), OCTETS, noise(4097, 4)),
        ("64 KiB".into(), OCTETS, noise(64 << 10, 5)),
        ("1 MiB".into(), OCTETS, noise(1 << 20, 6)),
        ("5 MiB".into(), OCTETS, noise(5 << 20, 7)),
        ("empty text".into(), TEXT, Vec::new()),
        ("1 byte text".into(), TEXT, b"x".to_vec()),
        ("4 KiB text".into(), TEXT, text(4096, 8)),
        ("64 KiB text".into(), TEXT, text(64 << 10, 9)),
        ("pdf".into(), "application/pdf", PDF.to_vec()),
        ("png".into(), "image/png", PNG.to_vec()),
    ];
    for i in 0..146u64 {
        let len = (i as usize * 7919) % 12_000;
        let sample = match i % 4 {
            0 => (OCTETS, noise(len, 100 + i)),
            1 => (TEXT, text(len, 100 + i)),
            // Readers ignore what follows `%%EOF` and `IEND`, so these stay a PDF and a PNG.
            2 => ("application/pdf", [PDF, &text(len % 3000, i)].concat()),
            _ => ("image/png", [PNG, &noise(len % 3000, i)].concat()),
        };
        samples.push((format!("bulk {i} ({})", sample.0), sample.0, sample.1));
    }
    samples
}

/// The names in the mount's folder.
fn listed(mount: &Mount) -> Vec<String> {
    std::fs::read_dir(&mount.mountpoint)
        .unwrap_or_else(|e| panic!("ls: {e}\n{}", mount.log()))
        .map(|e| e.expect("dir entry").file_name().into_string().expect("UTF-8"))
        .collect()
}

fn assert_lists_every_seeded_id(suite: &Suite, names: &[String], what: &str) {
    let unique: HashSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "{what}: a name is listed twice");
    let missing: Vec<&str> = suite
        .seeded
        .iter()
        .filter(|s| !unique.contains(&s.version.id))
        .map(|s| s.version.id.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} seeded ids are not listed, e.g. {:?}",
        missing.len(),
        suite.seeded.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn the_mount_lists_every_seeded_id_across_the_servers_pages() {
    let suite = suite();
    let server = &suite.server;

    // Default options (`_count=1000`): the server's own page size decides the pages.
    let proxy = server.proxy();
    let mount = suite.mount_at(&proxy.base, server.token.as_deref(), &[]);
    assert_lists_every_seeded_id(suite, &listed(&mount), "default page size");
    if server.started_here {
        let (_, pages) = server.search("_count=1000&_elements=id,meta,contentType");
        assert!(pages > 1, "hfs was started to page at 50, yet sent one page");
        assert!(
            proxy.counts().searches >= pages as u64,
            "the mount asked for {} pages, the server has {pages}",
            proxy.counts().searches
        );
    }

    // Small pages: many cursor links to follow on any server.
    let mount = suite.mount(&["--page-size", "40"]);
    assert_lists_every_seeded_id(suite, &listed(&mount), "--page-size 40");
    let (_, pages) = server.search("_count=40&_elements=id,meta,contentType");
    assert!(pages >= 4, "{} Binaries in {pages} pages of 40", suite.seeded.len());
}

#[test]
fn sizes_and_mtimes_match_the_server_before_any_read_and_bytes_are_identical() {
    let suite = suite();
    let mount = suite.mount(&[]);
    // Everything is stat'ed before anything is read: sizes must not need a read first.
    for seeded in &suite.seeded {
        let path = mount.path(&seeded.version.id);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| {
            panic!("stat {} ({}): {e}\n{}", seeded.version.id, seeded.what, mount.log())
        });
        assert!(meta.is_file(), "{}", seeded.what);
        assert_eq!(meta.len(), seeded.bytes.len() as u64, "size of {}", seeded.what);
        assert_eq!(
            meta.modified().expect("mtime"),
            seeded.version.last_updated,
            "mtime of {} is not meta.lastUpdated",
            seeded.what
        );
    }
    for seeded in &suite.seeded {
        let bytes = std::fs::read(mount.path(&seeded.version.id))
            .unwrap_or_else(|e| panic!("read {}: {e}", seeded.what));
        assert!(bytes == seeded.bytes, "bytes of {} differ", seeded.what);
    }
}

/// `getxattr(path, name)`.
fn xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).expect("path");
    let name = CString::new(name).expect("name");
    let mut buf = vec![0u8; 1024];
    // SAFETY: both strings are NUL-terminated and `buf` is valid for `buf.len()` bytes.
    let len =
        unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

#[test]
fn the_mime_type_xattr_is_the_content_type() {
    let suite = suite();
    let mount = suite.mount(&[]);
    for seeded in &suite.seeded {
        let value = xattr(&mount.path(&seeded.version.id), "user.mime_type")
            .unwrap_or_else(|e| panic!("getxattr user.mime_type of {}: {e}", seeded.what));
        assert_eq!(String::from_utf8_lossy(&value), seeded.version.content_type, "{}", seeded.what);
    }
}

#[test]
fn deleted_and_unknown_ids_are_enoent() {
    let suite = suite();
    let server = &suite.server;
    let _writer = suite.writer();
    let listed_then_deleted = server.create(OCTETS, &noise(5000, 21));
    let mount = suite.mount(&[]);
    assert!(
        listed(&mount).contains(&listed_then_deleted.id),
        "a new Binary is listed by a new mount"
    );
    server.delete(&listed_then_deleted.id);
    let never_seen = server.create(TEXT, b"gone before anyone looked");
    server.delete(&never_seen.id);
    for id in [&listed_then_deleted.id, &never_seen.id] {
        let status = server.read_status(id);
        assert!(matches!(status.as_u16(), 404 | 410), "the server still has {id}: {status}");
    }

    for (id, what) in [
        (listed_then_deleted.id.as_str(), "deleted after a listing"),
        (never_seen.id.as_str(), "deleted before the mount saw it"),
        ("00000000-0000-4000-8000-00000000f1f5", "unknown UUID"),
        ("fhirfs-no-such-binary", "unknown id"),
    ] {
        let path = mount.path(id);
        let stat = std::fs::metadata(&path).expect_err(what);
        assert_eq!(errno(stat), libc::ENOENT, "stat of {what} {id}\n{}", mount.log());
        let read = std::fs::read(&path).expect_err(what);
        assert_eq!(errno(read), libc::ENOENT, "read of {what} {id}");
    }
}

/// Reads, stats and lists through `mount` fail with EACCES.
fn assert_all_eacces(suite: &Suite, mount: &Mount, what: &str) {
    let id = &suite.seeded[1].version.id;
    let read = std::fs::read(mount.path(id)).expect_err(what);
    assert_eq!(errno(read), libc::EACCES, "read with {what}\n{}", mount.log());
    let stat = std::fs::metadata(mount.path(id)).expect_err(what);
    assert_eq!(errno(stat), libc::EACCES, "stat with {what}");
    let list = std::fs::read_dir(&mount.mountpoint).expect_err(what);
    assert_eq!(errno(list), libc::EACCES, "ls with {what}");
}

#[test]
fn a_bad_token_is_eacces() {
    let suite = suite();
    let server = &suite.server;
    if server.token.is_none() {
        eprintln!("skipped: {} takes no token, so none is refused", server.description);
        return;
    }
    // A well-formed JWT that no key signed.
    let forged = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJub2JvZHkifQ.bm90LXNpZ25lZA";
    let mount = suite.mount_at(&server.base, Some(forged), &[]);
    assert_all_eacces(suite, &mount, "a forged token");
    let mount = suite.mount_at(&server.base, Some("not-a-jwt"), &[]);
    assert_all_eacces(suite, &mount, "a token that is not a JWT");
}

#[test]
fn a_token_without_binary_scope_is_eacces() {
    let suite = suite();
    let server = &suite.server;
    let Some(token) = &server.token_no_binary else {
        eprintln!("skipped: set {} to a token without Binary scope", interop::TOKEN_NO_BINARY_ENV);
        return;
    };
    let mount = suite.mount_at(&server.base, Some(token), &[]);
    assert_all_eacces(suite, &mount, "a token without Binary scope");
}

/// What `got` is made of, compared with named versions: for failure messages.
fn describe(got: &[u8], versions: &[(&str, &[u8])]) -> String {
    let mut parts = vec![format!("{} bytes", got.len())];
    for (name, version) in versions {
        let leading = got.iter().zip(*version).take_while(|(x, y)| x == y).count();
        // Random bytes agree by chance on 1 in 256: a high count means copied bytes.
        let anywhere = got.iter().zip(*version).filter(|(x, y)| x == y).count();
        parts.push(format!(
            "{leading} leading bytes and {anywhere} bytes in all at their offsets equal to the \
             {name} version ({} bytes)",
            version.len()
        ));
    }
    parts.join(", ")
}

/// An update's three versions: several FUSE reads each (128 KiB), so that a switch in the
/// middle of a read would show; the last two have the same size, so only bytes tell them apart.
/// A Binary about to be updated, and a mount with short TTLs over it. Holds the suite's writer
/// lock, so no other test changes the server meanwhile.
struct Updating {
    server: &'static FhirServer,
    created: Version,
    mount: Mount,
    path: std::path::PathBuf,
    _writer: MutexGuard<'static, ()>,
}

fn create_and_mount(first: &[u8]) -> Updating {
    let suite = suite();
    let _writer = suite.writer();
    let server = &suite.server;
    let created = server.create(OCTETS, first);
    let mount = suite.mount(&["--dir-ttl", SHORT_TTL, "--cache-ttl", SHORT_TTL]);
    let path = mount.path(&created.id);
    Updating { server, created, mount, path, _writer }
}

fn update_versions() -> [(&'static str, Vec<u8>); 3] {
    let b = noise(200 * 1024 + 3, 32);
    [("first", noise(300 * 1024 + 7, 31)), ("second", noise(b.len(), 33)), ("third", b)]
}

/// Which of `versions` `bytes` is, or what it is made of.
fn which(bytes: &[u8], versions: &[(&str, Vec<u8>)]) -> Result<usize, String> {
    versions.iter().position(|(_, v)| v == bytes).ok_or_else(|| {
        let named: Vec<(&str, &[u8])> = versions.iter().map(|(n, v)| (*n, &v[..])).collect();
        format!("no version: {}", describe(bytes, &named))
    })
}

#[test]
fn an_update_shows_its_bytes_size_and_mtime_after_the_ttl() {
    let versions = update_versions();
    let Updating { server, created, mount: _mount, path, _writer } =
        create_and_mount(&versions[0].1);
    assert_eq!(which(&std::fs::read(&path).unwrap(), &versions), Ok(0));

    for (i, (name, bytes)) in versions.iter().enumerate().skip(1) {
        let written = server.update(&created.id, OCTETS, bytes);
        thread::sleep(AFTER_TTL);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), bytes.len() as u64, "size of the {name} version");
        assert_eq!(meta.modified().unwrap(), written.last_updated, "mtime of the {name} version");
        let got = which(&std::fs::read(&path).unwrap(), &versions);
        assert_eq!(got, Ok(i), "bytes of the {name} version after the TTL");
    }
}

#[test]
fn whole_reads_during_updates_never_mix_versions() {
    let versions = update_versions();
    let Updating { server, created, mount, path, _writer } = create_and_mount(&versions[0].1);
    assert_eq!(which(&std::fs::read(&path).unwrap(), &versions), Ok(0));

    // A reader opens and reads the whole file again and again, until it sees the last version
    // or something that is no version, while the main thread updates and looks (`ls -l`).
    let reader = {
        let (path, versions) = (path.clone(), versions.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + PATIENCE;
            let mut seen: Vec<Result<usize, String>> = Vec::new();
            while Instant::now() < deadline {
                let got = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| which(&bytes, &versions));
                let done = got.as_ref().map_or(true, |&v| v == versions.len() - 1);
                if seen.last() != Some(&got) {
                    seen.push(got);
                }
                if done {
                    break;
                }
            }
            seen
        })
    };
    for (_, bytes) in &versions[1..] {
        server.update(&created.id, OCTETS, bytes);
        let deadline = Instant::now() + AFTER_TTL;
        while Instant::now() < deadline {
            let _ = std::fs::metadata(&path);
            thread::sleep(Duration::from_millis(50));
        }
    }
    let seen = reader.join().unwrap();
    assert_eq!(
        seen,
        [Ok(0), Ok(1), Ok(2)],
        "a reader sees each version whole, in order\n{}",
        mount.log()
    );
}

#[test]
fn a_file_opened_before_an_update_reads_the_old_version_to_its_end() {
    let [(_, a), (_, b), _] = update_versions();
    let Updating { server, created, mount, path, _writer } = create_and_mount(&a);

    let mut held = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 100 * 1024];
    held.read_exact(&mut head).unwrap();
    server.update(&created.id, OCTETS, &b);
    thread::sleep(AFTER_TTL);
    // While the file is open, another program sees the open version whole (close-to-open:
    // the kernel has one page cache and one size per file, so two versions would mix).
    assert_eq!(std::fs::metadata(&path).unwrap().len(), a.len() as u64);
    assert!(std::fs::read(&path).unwrap() == a, "a second open reads the held version");

    let mut tail = Vec::new();
    held.read_to_end(&mut tail).unwrap();
    let whole = [head, tail].concat();
    assert!(
        whole == a,
        "the earlier fd read {}\n{}",
        describe(&whole, &[("old", &a), ("new", &b)]),
        mount.log()
    );
    drop(held);
    // Closed everywhere: the next open reads the new version.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), b.len() as u64);
    assert!(std::fs::read(&path).unwrap() == b, "the next open reads the new version");
}

/// Runs `rsync -a --itemize-changes SRC/ DEST/`; its stdout.
fn rsync(src: &Path, dest: &Path) -> String {
    let child = Command::new("rsync")
        .arg("-a")
        .arg("--itemize-changes")
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dest.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rsync (CI installs it; Debian: apt-get install rsync)");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(RSYNC_PATIENCE) else {
        // SAFETY: kill only sends a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("rsync did not finish within {RSYNC_PATIENCE:?}");
    };
    let output = output.expect("rsync output");
    assert!(
        output.status.success(),
        "rsync: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_refresh_by_history_shows_a_create_an_update_and_a_delete() {
    let suite = suite();
    let server = &suite.server;
    let _writer = suite.writer();
    let kept = server.create(OCTETS, b"kept");
    let updated = server.create(OCTETS, b"before the update");
    let deleted = server.create(OCTETS, b"deleted soon");
    let proxy = server.proxy();
    // `--dir-ttl 0`: every listing is a refresh, with no waiting for a TTL.
    let mount = suite.mount_at(&proxy.base, server.token.as_deref(), &["--dir-ttl", "0"]);
    let names = listed(&mount);
    for id in [&kept.id, &updated.id, &deleted.id] {
        assert!(names.contains(id), "{id} is not listed");
    }
    let full = proxy.counts();

    let created = server.create(TEXT, b"created after the listing");
    server.update(&updated.id, OCTETS, b"after the update, and longer");
    server.delete(&deleted.id);
    let names = listed(&mount);
    let after = proxy.counts();
    assert!(names.contains(&created.id), "the new Binary is not listed");
    assert!(names.contains(&kept.id) && names.contains(&updated.id));
    assert!(!names.contains(&deleted.id), "the deleted Binary is still listed");
    assert_eq!(after.searches, full.searches, "the refresh listed in full: {after:?}");
    // A page or more: everything the suite created in the last minutes is within the margin.
    assert!(after.histories > full.histories, "no history request: {after:?}");
    let path = mount.path(&updated.id);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 28);
    assert_eq!(std::fs::read(&path).unwrap(), b"after the update, and longer");
    assert_eq!(std::fs::read(mount.path(&created.id)).unwrap(), b"created after the listing");
    let gone = std::fs::metadata(mount.path(&deleted.id)).unwrap_err();
    assert_eq!(errno(gone), libc::ENOENT);
    server.delete(&created.id);
    server.delete(&kept.id);
    server.delete(&updated.id);
}

#[test]
fn rsync_twice_changes_nothing_and_fetches_no_content_the_second_time() {
    let suite = suite();
    let server = &suite.server;
    let _writer = suite.writer();
    let proxy = server.proxy();
    let mount = suite.mount_at(
        &proxy.base,
        server.token.as_deref(),
        &["--dir-ttl", SHORT_TTL, "--cache-ttl", SHORT_TTL],
    );
    let dest = tempfile::tempdir().unwrap();
    let copy = dest.path().join("copy");

    let first = rsync(&mount.mountpoint, &copy);
    assert!(!first.is_empty(), "the first run copies files");
    for seeded in &suite.seeded {
        let path = copy.join(&seeded.version.id);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", seeded.what));
        assert!(bytes == seeded.bytes, "rsync's copy of {}", seeded.what);
    }

    // Like a nightly backup: every cache of the mount has expired before the second run.
    thread::sleep(AFTER_TTL);
    let before = proxy.counts();
    assert!(
        before.content_read_total() >= suite.seeded.len() as u64,
        "the proxy saw the first run's reads: {before:?}"
    );
    let second = rsync(&mount.mountpoint, &copy);
    let after = proxy.counts();
    assert_eq!(second, "", "the second run changes nothing");
    assert_eq!(
        after.content_read_total(),
        before.content_read_total(),
        "the second run fetched content: before {before:?}, after {after:?}"
    );
    // Its listings were refreshes by what changed (nothing), not the folder's pages again.
    assert_eq!(after.searches, before.searches, "the second run listed in full: {after:?}");
    assert!(after.histories > before.histories, "the second run refreshed nothing: {after:?}");

    // rsync gave the copy the mount's read-only modes; let the temp dir be removed.
    let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&copy).status();
}

/// The seeded Binary described as `what`.
fn seeded<'a>(suite: &'a Suite, what: &str) -> &'a Seeded {
    suite.seeded.iter().find(|s| s.what == what).expect("a seeded Binary")
}

/// The names in a folder of a mount, sorted.
fn names_in(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("ls {}: {e}", path.display()))
        .map(|e| e.expect("dir entry").file_name().into_string().expect("UTF-8"))
        .collect();
    names.sort();
    names
}

/// The documents view over the real server: two patients, a DocumentReference with a
/// relative Binary url (and its hash) and inline data, a DiagnosticReport with an absolute url
/// on the base, and another patient's referral. HFS ignores `patient` on these searches; the
/// mount must not show another patient's documents.
#[test]
fn the_documents_view_shows_each_patients_documents_with_sizes_mtimes_and_bytes() {
    let suite = suite();
    let server = &suite.server;
    let (pdf, png) = (seeded(suite, "pdf"), seeded(suite, "png"));
    let inline = b"inline note from the interop suite\n";
    let b64 = |bytes: &[u8]| base64_simd::STANDARD.encode_to_string(bytes);
    let sha1 = |bytes: &[u8]| b64(&sha1_smol::Sha1::from(bytes).digest().bytes());
    let (patient, other, documents) = {
        let _writer = suite.writer();
        let patient = |family: &str| {
            let created = server.create_resource(&serde_json::json!({
                "resourceType": "Patient", "name": [{"family": family}]}));
            created["id"].as_str().expect("a Patient id").to_owned()
        };
        let (patient, other) = (patient("Interop"), patient("Other"));
        let discharge = server.create_resource(&serde_json::json!({
        "resourceType": "DocumentReference", "status": "current",
        "subject": {"reference": format!("Patient/{patient}")},
        "date": "2024-05-06T23:30:00-02:00", "description": "Discharge summary",
        "content": [
            {"attachment": {"contentType": "application/pdf",
                "url": format!("Binary/{}", pdf.version.id), "hash": sha1(&pdf.bytes)}},
            {"attachment": {"contentType": "text/plain", "title": "Nursing notes",
                "data": b64(inline)}}
        ]}));
        let report = server.create_resource(&serde_json::json!({
            "resourceType": "DiagnosticReport", "status": "final", "code": {"text": "CT chest"},
            "subject": {"reference": format!("Patient/{patient}")},
            "issued": "2024-05-07T08:00:00Z",
            "presentedForm": [{"contentType": "image/png",
                "url": format!("{}/Binary/{}", server.base, png.version.id)}]}));
        let referral = server.create_resource(&serde_json::json!({
            "resourceType": "DocumentReference", "status": "current",
            "subject": {"reference": format!("Patient/{other}")}, "date": "2024-04-02",
            "type": {"text": "Referral letter"},
            "content": [{"attachment": {"contentType": "application/pdf",
                "url": format!("Binary/{}", pdf.version.id)}}]}));
        (patient, other, [discharge, report, referral])
    };
    let time = |doc: &serde_json::Value| {
        interop::parse_instant(doc["meta"]["lastUpdated"].as_str().expect("meta.lastUpdated"))
    };
    // (name prefix, extension, bytes, mtime); 23:30 at -02:00 is the next day in UTC.
    let expected: [(&str, &str, &[u8], _); 3] = [
        ("2024-05-07 CT chest ~", ".png", &png.bytes, time(&documents[1])),
        ("2024-05-07 Discharge summary ~", ".pdf", &pdf.bytes, time(&documents[0])),
        ("2024-05-07 Nursing notes ~", ".txt", inline, time(&documents[0])),
    ];
    let check_folder = |folder: &Path, expected: &[(&str, &str, &[u8], std::time::SystemTime)]| {
        let names = names_in(folder);
        assert_eq!(names.len(), expected.len(), "{names:?}");
        // Everything is stat'ed before anything is read.
        for (name, (prefix, ext, bytes, mtime)) in names.iter().zip(expected) {
            assert!(
                name.starts_with(prefix) && name.ends_with(ext),
                "{name} is not {prefix}…{ext}"
            );
            let meta = std::fs::metadata(folder.join(name)).expect("stat");
            assert_eq!(meta.len(), bytes.len() as u64, "size of {name}");
            assert_eq!(meta.modified().expect("mtime"), *mtime, "mtime of {name}");
        }
        for (name, (_, _, bytes, _)) in names.iter().zip(expected) {
            assert!(std::fs::read(folder.join(name)).expect("read") == *bytes, "bytes of {name}");
        }
        names
    };

    let mount = suite.mount(&["--view", "documents", "--patient", &patient]);
    let names = check_folder(&mount.mountpoint, &expected);
    let pdf_path = mount.path(&names[1]);
    let source = xattr(&pdf_path, "user.fhir.source").expect("user.fhir.source");
    let reference = format!("DocumentReference/{}", documents[0]["id"].as_str().unwrap());
    assert_eq!(String::from_utf8(source).unwrap(), reference);
    assert_eq!(xattr(&pdf_path, "user.fhir.hash_match").expect("hash_match"), b"yes");
    // cp -r: byte-identical copies.
    let copy = tempfile::tempdir().expect("tempdir");
    let mut cp = Command::new("cp");
    cp.arg("-r").arg(&mount.mountpoint).arg(copy.path().join("c"));
    assert!(cp.status().expect("cp").success());
    for name in &names {
        let copied = std::fs::read(copy.path().join("c").join(name)).expect("copy");
        assert!(copied == std::fs::read(mount.path(name)).expect("read"), "copy of {name}");
    }
    drop(mount);

    // All patients: one folder each (the server may hold other patients' documents too).
    let mount = suite.mount(&["--view", "documents"]);
    let folder = mount.path(&format!("Patient-{patient}"));
    assert_eq!(check_folder(&folder, &expected), names, "the same names as with --patient");
    let others = names_in(&mount.path(&format!("Patient-{other}")));
    assert_eq!(others.len(), 1);
    assert!(others[0].starts_with("2024-04-02 Referral letter ~") && others[0].ends_with(".pdf"));
}
