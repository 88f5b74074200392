//! FORGET through a real mount: files the kernel forgets, that no listing names, no program
//! holds open and whose bytes are not cached, are dropped, and read right when opened again.
//!
//! In a test binary of its own: it makes the whole kernel drop its unused dentries and inodes
//! (`drop_caches`), which would also make the mounts of tests running beside it forget theirs.

mod common;

use common::{Mount, Server};

/// `f_files` of the mount's statfs: the nodes fhirfs holds.
fn files_held(mount: &Mount) -> u64 {
    let path = std::ffi::CString::new(mount.mountpoint.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs writes only into the struct we pass, and the path is NUL-terminated.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stats) }, 0);
    stats.f_files
}

#[test]
fn files_the_kernel_forgets_are_dropped_and_read_right_when_opened_again() {
    common::require_fuse();
    let server = Server::start();
    // A server that cannot list: every file is opened by id, and only the kernel holds it.
    server.server.set_search_status(Some(400));
    let ids: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        server.server.put(id, "text/plain", vec![b'a' + i as u8; 4000]);
    }
    // A cache smaller than one file: no bytes stay cached to hold a node.
    let mount = Mount::builder()
        .args(&["--cache-size", "1KiB", "--log-level", "debug"])
        .mount(&server.base_url());
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(std::fs::read(mount.path(id)).unwrap(), vec![b'a' + i as u8; 4000]);
    }
    assert_eq!(files_held(&mount), 20);

    // The kernel drops its unused dentries and inodes, and sends a FORGET for each.
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches (root)");
    // The last file read stays held for an open after its lookup.
    mount.wait_log_lines("dropped a node the kernel forgot", 19);
    assert_eq!(files_held(&mount), 1);
    for (i, id) in ids.iter().enumerate().rev() {
        assert_eq!(std::fs::read(mount.path(id)).unwrap(), vec![b'a' + i as u8; 4000], "{id}");
    }
    assert_eq!(files_held(&mount), 20, "dropped slots serve the files again");
}
