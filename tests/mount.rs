//! Real mounts: `fhirfs` mounted on a temp dir over the loopback FHIR server, checked with plain
//! `std::fs` calls. These need /dev/fuse and root (or fusermount3) and fail clearly without.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::mpsc;
use std::thread;

use bytes::Bytes;
use common::{Mount, PATIENCE, Server, errno, is_mounted};
use fhirfs_testserver::loopback::Fault;
use fhirfs_testserver::noise;

#[test]
fn every_file_has_the_servers_bytes_and_size_across_many_pages() {
    let server = Server::start();
    server.server.set_page_cap(150);
    let mut expected = Vec::new();
    for i in 0..1100 {
        let id = format!("bin-{i:04}");
        let bytes = noise(i * 7 % 3001, i as u64);
        server.server.put(&id, "application/octet-stream", bytes.clone());
        expected.push((id, bytes));
    }
    for (id, len) in [("big-1m", 1 << 20), ("big-3m", 3 << 20), ("empty", 0)] {
        let bytes = noise(len, 99);
        server.server.put(id, "application/octet-stream", bytes.clone());
        expected.push((id.to_owned(), bytes));
    }
    let mount = Mount::new(&server.base_url());

    let mut listed: Vec<String> = std::fs::read_dir(&mount.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut ids: Vec<String> = expected.iter().map(|(id, _)| id.clone()).collect();
    ids.sort();
    assert_eq!(listed, ids);
    assert!(server.server.counts().searches >= 8, "1103 Binaries at 150 a page is 8 pages");

    for (id, bytes) in &expected {
        let meta = std::fs::metadata(mount.path(id)).unwrap();
        assert_eq!(meta.len(), bytes.len() as u64, "stat size of {id} before reading");
        assert_eq!(&std::fs::read(mount.path(id)).unwrap(), bytes, "bytes of {id}");
    }
}

#[test]
fn errors_reach_programs_as_the_documented_errno() {
    let server = Server::start();
    let s = &server.server;
    for id in ["ok", "s401", "s403", "s500", "s400", "json", "type", "b64", "gone"] {
        s.put(id, "text/plain", "fine");
    }
    s.set_fault("s401", Some(Fault::Status(401)));
    s.set_fault("s403", Some(Fault::Status(403)));
    s.set_fault("s500", Some(Fault::Status(500)));
    s.set_fault("s400", Some(Fault::Status(400)));
    let json = |body: &'static str| Fault::Body {
        content_type: "application/fhir+json".into(),
        body: Bytes::from_static(body.as_bytes()),
    };
    s.set_fault("json", Some(json(r#"{"resourceType":"Binary","data":"#)));
    s.set_fault("type", Some(json(r#"{"resourceType":"Patient","id":"type"}"#)));
    s.set_fault("b64", Some(json(r#"{"resourceType":"Binary","data":"@@@not base64@@@"}"#)));
    s.delete("gone");
    let mount = Mount::new(&server.base_url());

    assert_eq!(std::fs::read(mount.path("ok")).unwrap(), b"fine");
    for (id, expected) in [
        ("s401", libc::EACCES),
        ("s403", libc::EACCES),
        ("missing", libc::ENOENT),
        ("gone", libc::ENOENT),
        ("s500", libc::EIO),
        ("s400", libc::EIO),
        ("json", libc::EIO),
        ("type", libc::EIO),
        ("b64", libc::EIO),
    ] {
        let err = std::fs::read(mount.path(id)).unwrap_err();
        assert_eq!(errno(err), expected, "{id}");
        let err = std::fs::metadata(mount.path(id)).unwrap_err();
        assert_eq!(errno(err), expected, "stat {id}");
    }

    let reads = s.counts().reads;
    for name in ["a b", "x_y", "über", "a%2Fb"] {
        let err = std::fs::metadata(mount.path(name)).unwrap_err();
        assert_eq!(errno(err), libc::ENOENT, "{name}");
    }
    assert_eq!(s.counts().reads, reads, "names outside the id pattern never reach the server");
    assert!(!mount.log().contains("panicked"));
}

#[test]
fn the_mount_is_read_only_with_safe_modes() {
    let server = Server::start();
    server.server.put("doc", "application/pdf", "%PDF-1.4 tiny");
    let mount = Mount::new(&server.base_url());
    let file = mount.path("doc");
    let root = &mount.mountpoint;

    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.mode(), libc::S_IFREG | 0o444);
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    let dir = std::fs::metadata(root).unwrap();
    assert_eq!(dir.mode(), libc::S_IFDIR | 0o555);

    let erofs = |result: std::io::Result<()>, what: &str| {
        assert_eq!(errno(result.unwrap_err()), libc::EROFS, "{what}");
    };
    erofs(std::fs::write(root.join("new"), b"x"), "create");
    erofs(std::fs::OpenOptions::new().append(true).open(&file).map(drop), "open for append");
    erofs(std::fs::OpenOptions::new().write(true).open(&file).map(drop), "open for write");
    erofs(std::fs::create_dir(root.join("d")), "mkdir");
    erofs(std::fs::remove_file(&file), "unlink");
    erofs(std::fs::rename(&file, root.join("other")), "rename");
    erofs(std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)), "chmod");
    let truncate = std::fs::OpenOptions::new().write(true).truncate(true).open(&file);
    erofs(truncate.map(drop), "open with O_TRUNC");
    assert_eq!(std::fs::read(&file).unwrap(), b"%PDF-1.4 tiny", "nothing changed");

    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts.lines().find(|l| l.contains(&*root.to_string_lossy())).unwrap();
    for flag in ["ro", "nosuid", "nodev"] {
        assert!(line.split(' ').nth(3).unwrap().split(',').any(|f| f == flag), "{flag}: {line}");
    }
}

#[test]
fn uid_and_gid_options_set_the_owner() {
    let server = Server::start();
    server.server.put("a", "text/plain", "a");
    let mount = Mount::builder().arg("--uid").arg("1234").arg("--gid").arg("5678");
    let mount = mount.mount(&server.base_url());
    let meta = std::fs::metadata(mount.path("a")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    let server = Server::start();
    let mut mount = Mount::new(&server.base_url());
    assert!(is_mounted(&mount.mountpoint));
    let status = mount.terminate();
    assert_eq!(status.code(), Some(0), "{}", mount.log());
    assert!(!is_mounted(&mount.mountpoint));
}

#[test]
fn sigint_unmounts_and_exits_zero() {
    let server = Server::start();
    let mut mount = Mount::new(&server.base_url());
    // SAFETY: kill only sends a signal to our own child process.
    unsafe { libc::kill(mount.pid(), libc::SIGINT) };
    assert_eq!(mount.wait_exit().code(), Some(0), "{}", mount.log());
    assert!(!is_mounted(&mount.mountpoint));
}

#[test]
fn an_external_umount_ends_the_daemon_with_zero() {
    let server = Server::start();
    let mut mount = Mount::new(&server.base_url());
    let status = std::process::Command::new("umount").arg(&mount.mountpoint).status().unwrap();
    assert!(status.success());
    assert_eq!(mount.wait_exit().code(), Some(0), "{}", mount.log());
}

#[test]
fn a_held_fetch_does_not_stall_other_files_or_listing() {
    let server = Server::start();
    server.server.put("slow", "text/plain", "slow bytes");
    server.server.put("fast", "text/plain", "fast bytes");
    let gate = server.server.hold("slow");
    let mount = Mount::new(&server.base_url());

    let slow_path = mount.path("slow");
    let slow = thread::spawn(move || std::fs::read(slow_path));
    server.wait_for_reads("slow", 1);

    // While `slow` hangs on the server, other operations answer.
    let (tx, rx) = mpsc::channel();
    let fast_path = mount.path("fast");
    let root = mount.mountpoint.clone();
    thread::spawn(move || {
        let fast = std::fs::read(&fast_path);
        let listing = std::fs::read_dir(&root).map(|d| d.count());
        let _ = tx.send((fast, listing));
    });
    let (fast, listing) = rx.recv_timeout(PATIENCE).expect("fast file stalled behind slow one");
    assert_eq!(fast.unwrap(), b"fast bytes");
    assert_eq!(listing.unwrap(), 2);

    gate.release();
    assert_eq!(slow.join().unwrap().unwrap(), b"slow bytes");
}

#[test]
fn concurrent_opens_of_one_cold_file_make_one_get() {
    let server = Server::start();
    server.server.set_listing_data(true);
    server.server.put("hot", "application/octet-stream", noise(100_000, 5));
    let mount = Mount::new(&server.base_url());
    // The listing carries `data`, so sizes are known and only `open` fetches.
    assert_eq!(std::fs::read_dir(&mount.mountpoint).unwrap().count(), 1);
    assert_eq!(std::fs::metadata(mount.path("hot")).unwrap().len(), 100_000);
    assert_eq!(server.reads_of("hot"), 0);

    let gate = server.server.hold("hot");
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let path = mount.path("hot");
            thread::spawn(move || {
                let mut buf = Vec::new();
                std::fs::File::open(path)?.read_to_end(&mut buf)?;
                Ok::<_, std::io::Error>(buf)
            })
        })
        .collect();
    // All eight OPEN requests are with the daemon before the server answers the first GET.
    mount.wait_kernel_waiting(8);
    server.wait_for_reads("hot", 1);
    gate.release();
    for reader in readers {
        assert_eq!(reader.join().unwrap().unwrap(), noise(100_000, 5));
    }
    assert_eq!(server.reads_of("hot"), 1);
}

#[test]
fn raw_responses_are_served_as_the_content() {
    let server = Server::start();
    let pdf = b"%PDF-1.7\n raw bytes \x00\x01\x02".to_vec();
    server.server.put("raw", "application/pdf", pdf.clone());
    server.server.set_fault("raw", Some(Fault::Raw));
    let mount = Mount::new(&server.base_url());
    assert_eq!(std::fs::metadata(mount.path("raw")).unwrap().len(), pdf.len() as u64);
    assert_eq!(std::fs::read(mount.path("raw")).unwrap(), pdf);
}

#[test]
fn a_server_that_refuses_search_gives_an_empty_folder_and_lookups_work() {
    let server = Server::start();
    server.server.put("known-id", "text/plain", "still here");
    server.server.set_search_status(Some(400));
    let mount = Mount::new(&server.base_url());
    assert_eq!(std::fs::read_dir(&mount.mountpoint).unwrap().count(), 0);
    assert_eq!(std::fs::read(mount.path("known-id")).unwrap(), b"still here");
}

#[test]
fn the_token_is_sent_and_never_logged() {
    let server = Server::start();
    let token = "tok-very-secret-4711";
    server.server.set_token(Some(token));
    server.server.put("a", "text/plain", "authorised");

    let mount = Mount::builder().env("FHIRFS_TOKEN", token).mount(&server.base_url());
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"authorised");
    drop(mount);

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::File::create(&token_file).unwrap().write_all(b"  wrong-token\n").unwrap();
    let mount = Mount::builder()
        .arg("--token-file")
        .arg(token_file.to_str().unwrap())
        .mount(&server.base_url());
    assert_eq!(errno(std::fs::read(mount.path("a")).unwrap_err()), libc::EACCES);
    assert_eq!(errno(std::fs::read_dir(&mount.mountpoint).unwrap_err()), libc::EACCES);
    assert!(!mount.log().contains("wrong-token"), "{}", mount.log());

    let mount = Mount::new(&server.base_url());
    assert_eq!(errno(std::fs::read(mount.path("a")).unwrap_err()), libc::EACCES);
}

#[test]
fn the_demo_mounts_sample_files_without_a_server() {
    common::require_fuse();
    let mount = Mount::builder().arg("--demo").mount_demo();
    let mut names: Vec<_> = std::fs::read_dir(&mount.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["notes-txt", "report-pdf", "scan-png"]);
    assert!(std::fs::read(mount.path("report-pdf")).unwrap().starts_with(b"%PDF-"));
    assert!(std::fs::read(mount.path("scan-png")).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
}

#[test]
fn a_reader_killed_mid_fetch_leaves_the_fetch_to_finish_and_the_daemon_serving() {
    let server = Server::start();
    let bytes = noise(500_000, 9);
    server.server.put("slow", "application/octet-stream", bytes.clone());
    let gate = server.server.hold("slow");
    let mount = Mount::new(&server.base_url());
    let mut reader = std::process::Command::new("cat")
        .arg(mount.path("slow"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    server.wait_for_reads("slow", 1);
    // SIGKILL while the kernel waits on the daemon. The kernel lets the reader go only once
    // the daemon answers the request it already took (or the --timeout deadline passes).
    reader.kill().unwrap();
    gate.release();
    reader.wait().unwrap();
    // The fetch ran to its end and was cached: the next reader costs no request.
    assert_eq!(std::fs::read(mount.path("slow")).unwrap(), bytes);
    assert_eq!(server.reads_of("slow"), 1, "{}", mount.log());
    assert!(!mount.log().contains("panicked"), "{}", mount.log());
}

#[test]
fn sigterm_with_a_file_still_open_detaches_and_exits_zero() {
    let server = Server::start();
    server.server.put("a", "text/plain", "held open");
    let mut mount = Mount::new(&server.base_url());
    let mut held = std::fs::File::open(mount.path("a")).unwrap();
    let status = mount.terminate();
    assert_eq!(status.code(), Some(0), "{}", mount.log());
    assert!(!is_mounted(&mount.mountpoint), "detached from the tree");
    // The open file still answers from what it had, or fails cleanly: never hangs.
    let mut buf = Vec::new();
    let _ = held.read_to_end(&mut buf);
}
