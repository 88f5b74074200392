//! Real mounts reading raw bodies while they stream in: a cold file has its size as soon as
//! the server's headers arrive and its first bytes before the last ones; a body cut short is
//! asked for again and resumed only if it is the same; a body that stalls ends in EIO at the
//! deadline. The server holds each body part-way through, so every check is made while the
//! rest is provably still on the server.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Mount, PATIENCE, Server, errno};
use fhirfs_testserver::loopback::Fault;
use fhirfs_testserver::noise;

const MIB: usize = 1 << 20;
/// The test file: four pieces of the daemon's 1 MiB streaming segments.
const LEN: usize = 4 * MIB;
/// Where the server stops until told to go on: two whole segments are in.
const HELD_AT: usize = 2 * MIB + MIB / 2;

/// Starts a server with `big` (LEN bytes of noise) held at HELD_AT, and mounts it reading raw.
fn held_mount(timeout: &str) -> (Server, Mount, Vec<u8>, fhirfs_testserver::loopback::BodyGate) {
    let server = Server::start();
    let bytes = noise(LEN, 7);
    server.server.put("big", "application/pdf", bytes.clone());
    server.server.put("small", "text/plain", b"small and whole".to_vec());
    let gate = server.server.hold_body("big", HELD_AT);
    let mount =
        Mount::builder().args(&["--fetch", "raw", "--timeout", timeout]).mount(&server.base_url());
    (server, mount, bytes, gate)
}

/// Opens `big`, stats it and reads its first MiB in another thread; fails the test if that does
/// not finish while the server still holds the rest of the body.
fn open_and_read_first_mib(mount: &Mount) -> (File, u64, Vec<u8>) {
    let path = mount.path("big");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let result = (|| {
            let size = std::fs::metadata(&path)?.len();
            let mut file = File::open(&path)?;
            let mut first = vec![0; MIB];
            file.read_exact(&mut first)?;
            Ok::<_, std::io::Error>((file, size, first))
        })();
        let _ = tx.send(result);
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => panic!("stat, open or read of the first MiB failed: {e}\n{}", mount.log()),
        Err(_) => panic!(
            "stat, open and the first MiB waited for the whole body (the server holds it at \
             {HELD_AT} bytes): reads do not stream\n{}",
            mount.log()
        ),
    }
}

fn read_rest(file: &mut File) -> Result<Vec<u8>, i32> {
    file.seek(SeekFrom::Start(MIB as u64)).map_err(errno)?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).map_err(errno)?;
    Ok(rest)
}

#[test]
fn a_cold_raw_file_has_its_size_and_first_bytes_before_its_body_ends() {
    let (server, mount, bytes, gate) = held_mount("30");
    let (mut file, size, first) = open_and_read_first_mib(&mount);
    assert_eq!(size, LEN as u64, "stat size while the body streams");
    assert!(first == bytes[..MIB], "first MiB differs");
    // Other files are served while this one waits for its bytes.
    assert_eq!(std::fs::read(mount.path("small")).unwrap(), b"small and whole");
    gate.release();
    let rest = read_rest(&mut file).expect("rest of the body");
    assert!(rest == bytes[MIB..], "bytes after the first MiB differ");
    assert_eq!(server.reads_of("big"), 1, "one GET for stat, open and every read");
    drop(file);
    assert!(std::fs::read(mount.path("big")).unwrap() == bytes, "a second open reads the same");
    assert_eq!(server.reads_of("big"), 1, "the streamed body stays cached");
}

#[test]
fn a_body_cut_short_is_asked_for_again_and_resumed_where_it_stopped() {
    let (server, mount, bytes, gate) = held_mount("30");
    let (mut file, _, first) = open_and_read_first_mib(&mount);
    gate.cut();
    let rest = read_rest(&mut file).expect("rest of the body after the cut");
    assert!(first == bytes[..MIB] && rest == bytes[MIB..], "bytes differ after resuming");
    assert_eq!(server.reads_of("big"), 2, "one GET cut short, one to resume");
}

#[test]
fn a_body_that_changed_before_it_was_asked_for_again_gives_eio_never_a_mix() {
    let (server, mount, bytes, gate) = held_mount("30");
    let (mut file, _, first) = open_and_read_first_mib(&mount);
    assert!(first == bytes[..MIB]);
    // A new version of the same length: only its ETag and its bytes tell it apart.
    let newer = noise(LEN, 8);
    server.server.put("big", "application/pdf", newer.clone());
    gate.cut();
    assert_eq!(read_rest(&mut file), Err(libc::EIO), "the rest of a body that changed");
    assert_eq!(server.reads_of("big"), 2);
    // Logged by the body's watcher, which the same failure wakes: wait for it while the
    // failed content is still open (the watcher logs only while someone holds it).
    mount.wait_log_lines("changed while it was being read", 1);
    // While the failed version is still open, a new open does not join it: it fetches anew,
    // and the kernel drops its pages of the old one.
    let mut again = File::open(mount.path("big")).expect("a new open after the failure");
    // The old handle serves none of the old bytes any more, not even those it had: they would
    // land in the page cache beside the new version's.
    let mut prefix = vec![0; MIB];
    let old_prefix = file.seek(SeekFrom::Start(0)).and_then(|_| file.read_exact(&mut prefix));
    assert_eq!(old_prefix.map_err(errno), Err(libc::EIO), "the failed handle's first MiB");
    let mut reread = Vec::new();
    again.read_to_end(&mut reread).unwrap();
    assert!(reread == newer, "a new open gets the new version, whole, and nothing of the old");
    drop(again);
    drop(file);
    assert!(std::fs::read(mount.path("big")).unwrap() == newer, "and so does the next one");
}

#[test]
fn a_cut_body_whose_second_answer_never_comes_gives_eio_at_the_deadline() {
    let (server, mount, _bytes, gate) = held_mount("2");
    let (mut file, _, _) = open_and_read_first_mib(&mount);
    // The GET that would resume the body is accepted and never answered.
    server.server.set_fault("big", Some(Fault::Hang));
    gate.cut();
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(read_rest(&mut file));
    });
    let rest = rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
        panic!("the read waited past the deadline for an answer that never came\n{}", mount.log())
    });
    assert_eq!(rest, Err(libc::EIO));
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(2) + Duration::from_millis(2500), "waited {waited:?}");
}

#[test]
fn a_body_that_stalls_gives_eio_at_the_deadline_not_a_hang() {
    let (_server, mount, _bytes, gate) = held_mount("2");
    let (mut file, _, _) = open_and_read_first_mib(&mount);
    let started = Instant::now();
    assert_eq!(read_rest(&mut file), Err(libc::EIO), "the rest of a stalled body");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(2) + Duration::from_millis(2500), "waited {waited:?}");
    drop(gate);
}

#[test]
fn recycled_buffers_never_show_an_earlier_files_bytes() {
    // A cache of one file: each read evicts the one before, whose buffer the next body reuses
    // (sizes within an eighth of each other). Every byte read must be the file's own.
    let server = Server::start();
    let sizes = [3 * MIB, 3 * MIB - 1000, 3 * MIB, 3 * MIB - 70_000, 3 * MIB + 5];
    let files: Vec<Vec<u8>> =
        sizes.iter().enumerate().map(|(i, &len)| noise(len, 100 + i as u64)).collect();
    for (i, bytes) in files.iter().enumerate() {
        server.server.put(&format!("f{i}"), "application/octet-stream", bytes.clone());
    }
    for mode in ["raw", "json"] {
        let mount = Mount::builder()
            .args(&["--fetch", mode, "--cache-size", "4MiB"])
            .mount(&server.base_url());
        for round in 0..2 {
            for (i, bytes) in files.iter().enumerate() {
                let path = mount.path(&format!("f{i}"));
                assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes.len() as u64);
                let read = std::fs::read(&path).unwrap();
                assert!(read == *bytes, "f{i} ({mode}, round {round}) differs from its bytes");
            }
        }
    }
}
