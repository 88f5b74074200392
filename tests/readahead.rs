//! Read-ahead across files through a real mount: a program that walks the folder (in listing
//! order as cp -r and tar do, in name order as rsync does) gets the next files fetched while it
//! reads one; a viewer that opens one file, or a few out of order, fetches only those; what is
//! fetched ahead stays within its byte bound, and its failures surface only at the open.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Mount, Server, errno};
use fhirfs_testserver::loopback::Fault;
use fhirfs_testserver::noise;

/// Stores `n` Binaries `f00`, `f01`, ... of `len` bytes; the server lists them in an order of
/// its own (not by name), so that listing order and name order differ.
fn seed(server: &Server, n: usize, len: usize) -> Vec<(String, Vec<u8>)> {
    server.server.set_shuffled_listing(true);
    seed_in_name_order(server, n, len)
}

/// Stores `n` Binaries `f00`, `f01`, ... of `len` bytes.
fn seed_in_name_order(server: &Server, n: usize, len: usize) -> Vec<(String, Vec<u8>)> {
    let seeded: Vec<_> = (0..n)
        .map(|i| {
            let id = format!("f{i:02}");
            let bytes = noise(len, i as u64);
            server.server.put(&id, "application/octet-stream", bytes.clone());
            (id, bytes)
        })
        .collect();
    seeded
}

/// The names of the mount's folder in readdir (listing) order.
fn listing(mount: &Mount) -> Vec<String> {
    let entries = std::fs::read_dir(&mount.mountpoint).expect("readdir");
    entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

fn bytes_of<'a>(seeded: &'a [(String, Vec<u8>)], id: &str) -> &'a [u8] {
    &seeded.iter().find(|(i, _)| i == id).expect("seeded id").1
}

fn read(mount: &Mount, name: &str) -> Result<Vec<u8>, i32> {
    std::fs::read(mount.path(name)).map_err(errno)
}

/// The daemon's `read_ahead` counter (files fetched ahead), from its SIGUSR1 statistics line.
fn read_ahead_count(mount: &Mount, nth: usize) -> u64 {
    // SAFETY: kill only sends a signal to our own child process.
    unsafe { libc::kill(mount.pid(), libc::SIGUSR1) };
    let lines = mount.wait_log_lines("statistics", nth);
    let line = &lines[nth - 1];
    let value = line.split("read_ahead=").nth(1).and_then(|v| v.split(' ').next());
    value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no read_ahead in {line}"))
}

#[test]
fn a_walk_in_listing_order_fetches_the_next_files_before_they_are_opened() {
    let server = Server::start();
    let seeded = seed(&server, 40, 2048);
    let mount = Mount::new(&server.base_url());
    let order = listing(&mount);
    let mut by_name = order.clone();
    by_name.sort();
    assert_ne!(order, by_name, "the listing is not in name order");
    for name in &order[..3] {
        assert_eq!(read(&mount, name).as_deref(), Ok(bytes_of(&seeded, name)));
    }
    // A walk: the next files are asked for while nothing has opened them yet.
    for name in &order[3..10] {
        server.wait_for_reads(name, 1);
    }
    for name in &order[3..] {
        assert_eq!(read(&mount, name).as_deref(), Ok(bytes_of(&seeded, name)), "{name}");
    }
    for name in &order {
        assert_eq!(server.reads_of(name), 1, "{name} is fetched once");
    }
    assert!(read_ahead_count(&mount, 1) >= 30, "{}", mount.log());
}

#[test]
fn a_walk_in_name_order_fetches_the_next_files_before_they_are_opened() {
    let server = Server::start();
    let seeded = seed(&server, 40, 2048);
    let mount = Mount::new(&server.base_url());
    let mut by_name = listing(&mount);
    by_name.sort();
    for name in &by_name[..3] {
        assert_eq!(read(&mount, name).as_deref(), Ok(bytes_of(&seeded, name)));
    }
    for name in &by_name[3..10] {
        if server.reads_of(name) == 0 {
            eprintln!("{name} not yet: {:?}\n{}", server.server.counts(), mount.log());
        }
        server.wait_for_reads(name, 1);
    }
    for name in &by_name {
        assert_eq!(read(&mount, name).as_deref(), Ok(bytes_of(&seeded, name)), "{name}");
        assert_eq!(server.reads_of(name), 1, "{name} is fetched once");
    }
}

#[test]
fn rsync_of_a_folder_listed_out_of_name_order_fetches_each_file_once_and_ahead() {
    let server = Server::start();
    let seeded = seed(&server, 60, 5000);
    let mount = Mount::new(&server.base_url());
    let out = tempfile::tempdir().unwrap();
    let src = format!("{}/", mount.mountpoint.display());
    let status = Command::new("rsync").arg("-a").arg(&src).arg(out.path()).status().unwrap();
    assert!(status.success());
    for (id, bytes) in &seeded {
        assert_eq!(&std::fs::read(out.path().join(id)).unwrap(), bytes, "{id}");
        assert_eq!(server.reads_of(id), 1, "{id} is fetched once");
    }
    assert!(read_ahead_count(&mount, 1) > 0, "rsync's opens were read ahead:\n{}", mount.log());
}

#[test]
fn a_single_open_and_opens_out_of_order_fetch_nothing_extra() {
    let server = Server::start();
    let seeded = seed(&server, 40, 2048);
    let mount = Mount::new(&server.base_url());
    let order = listing(&mount);
    assert_eq!(read(&mount, &order[7]).as_deref(), Ok(bytes_of(&seeded, &order[7])));
    assert_eq!(server.server.counts().reads, 1, "one open, one content request");
    for i in [20, 3, 31, 12, 38] {
        assert_eq!(read(&mount, &order[i]).as_deref(), Ok(bytes_of(&seeded, &order[i])));
    }
    // Fetches ahead are decided within the opens: none was, so none can come later.
    assert_eq!(read_ahead_count(&mount, 1), 0, "{}", mount.log());
    assert_eq!(server.server.counts().reads, 6);
}

#[test]
fn files_larger_than_the_read_ahead_room_are_fetched_only_by_their_opens() {
    let server = Server::start();
    // --cache-size 1MiB leaves 256 KiB for files ahead: a 400 KiB file never fits.
    let seeded = seed(&server, 12, 400 << 10);
    let mount = Mount::builder().args(&["--cache-size", "1MiB"]).mount(&server.base_url());
    for name in listing(&mount) {
        assert_eq!(read(&mount, &name).as_deref(), Ok(bytes_of(&seeded, &name)), "{name}");
        assert_eq!(server.reads_of(&name), 1, "{name}");
    }
    assert_eq!(read_ahead_count(&mount, 1), 0, "{}", mount.log());
}

#[test]
fn read_ahead_holds_no_more_than_its_room() {
    let server = Server::start();
    // 256 KiB of room ahead holds two files of 100 KiB. Listed in name order, so that both
    // orders have the same files ahead.
    let seeded = seed_in_name_order(&server, 16, 100 << 10);
    let mount = Mount::builder().args(&["--cache-size", "1MiB"]).mount(&server.base_url());
    let order = listing(&mount);
    for (k, name) in order.iter().enumerate() {
        assert_eq!(read(&mount, name).as_deref(), Ok(bytes_of(&seeded, name)), "{name}");
        let ahead = order[k + 1..].iter().filter(|n| server.reads_of(n) > 0).count();
        assert!(
            ahead <= 2,
            "{ahead} files fetched ahead after {k} opens, room for 2: {:?}\n{}",
            server.server.counts(),
            mount.log()
        );
    }
    assert!(read_ahead_count(&mount, 1) > 0, "{}", mount.log());
    for name in &order {
        assert_eq!(server.reads_of(name), 1, "{name}");
    }
}

/// With `fault` on the sixth file in listing order: the walk fetches it ahead, and the failure
/// shows only when it is opened, with the errno an open gets: after asking again, or (a fetch
/// still under way) by waiting for it, as an open that started it would.
fn a_failed_fetch_ahead_surfaces_at_the_open(fault: Fault, extra: &[&str], asks_again: bool) {
    let server = Server::start();
    let seeded = seed(&server, 20, 2048);
    let mount = Mount::builder().args(extra).mount(&server.base_url());
    let order = listing(&mount);
    let bad = &order[5];
    server.server.set_fault(bad, Some(fault));
    for name in &order[..3] {
        assert_eq!(read(&mount, name).as_deref(), Ok(bytes_of(&seeded, name)));
    }
    // The fetch ahead has failed (or, hanging, is under way) before the open.
    if asks_again {
        mount.wait_log_lines(
            &format!("a fetch ahead failed; the open will ask again id=\"{bad}\""),
            1,
        );
    } else {
        server.wait_for_reads(bad, 1);
    }
    assert!(
        !mount.log().lines().any(|l| l.contains(" WARN ") && l.contains(bad.as_str())),
        "a failed fetch ahead is not reported before the open:\n{}",
        mount.log()
    );
    let first = server.reads_of(bad);
    assert_eq!(read(&mount, bad), Err(libc::EIO), "{}", mount.log());
    if asks_again {
        assert!(server.reads_of(bad) > first, "the open asked again");
    }
    // The failure was not cached: once the server mends, the file reads right.
    server.server.set_fault(bad, None);
    assert_eq!(read(&mount, bad).as_deref(), Ok(bytes_of(&seeded, bad)));
}

#[test]
fn a_500_fetched_ahead_is_eio_at_the_open_and_never_cached() {
    a_failed_fetch_ahead_surfaces_at_the_open(Fault::Status(500), &[], true);
}

#[test]
fn a_truncated_body_fetched_ahead_is_eio_at_the_open_and_never_cached() {
    a_failed_fetch_ahead_surfaces_at_the_open(Fault::Truncated, &[], true);
}

#[test]
fn a_fetch_ahead_past_the_timeout_is_eio_at_the_open_and_never_cached() {
    a_failed_fetch_ahead_surfaces_at_the_open(Fault::Hang, &["--timeout", "1"], false);
}

#[test]
fn killing_cp_mid_walk_stops_the_read_ahead() {
    let server = Server::start();
    seed(&server, 120, 2048);
    let mount = Mount::new(&server.base_url());
    let order = listing(&mount);
    // cp stops at the 20th file: the server holds its read.
    let held = &order[20];
    let gate = server.server.hold(held);
    let out = tempfile::tempdir().unwrap();
    let mut cp =
        Command::new("cp").arg("-r").arg(&mount.mountpoint).arg(out.path()).spawn().unwrap();
    server.wait_for_reads(held, 1);
    cp.kill().unwrap();
    cp.wait().unwrap();
    drop(gate);
    // Fetches ahead are decided within cp's lookups and opens, at most --read-ahead (32)
    // files past the last one it reached: nothing beyond, then or later.
    let fetched_ahead = read_ahead_count(&mount, 1);
    assert!(fetched_ahead <= 20 + 32, "{fetched_ahead} files fetched ahead");
    let beyond = order[20 + 33..].iter().filter(|n| server.reads_of(n) > 0).count();
    assert_eq!(beyond, 0, "files far past the walk were fetched");
    assert!(Path::new(&mount.mountpoint).exists());
}
