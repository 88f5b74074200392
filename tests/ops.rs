//! Operating fhirfs: --help and --version, clear errors with an exit status, the fstab way of
//! mounting (mount -t fuse.fhirfs, through mount.fuse3), systemd credentials and readiness,
//! statistics on SIGUSR1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Mount, PATIENCE, Server, errno, is_mounted, require_fuse};

const FHIRFS: &str = env!("CARGO_BIN_EXE_fhirfs");

fn fhirfs(args: &[&str]) -> Output {
    Command::new(FHIRFS).args(args).env_remove("FHIRFS_TOKEN").output().expect("run fhirfs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_lists_every_option_with_its_default() {
    let output = fhirfs(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for option in [
        "--demo",
        "--token-file",
        "--smart-client-id",
        "--smart-key",
        "--smart-token-url",
        "--smart-scope",
        "--dir-ttl",
        "--cache-ttl",
        "--cache-size",
        "--timeout",
        "--page-size",
        "--max-size",
        "--max-requests",
        "--read-ahead",
        "--no-compression",
        "--uid",
        "--gid",
        "--ca-file",
        "--extensions",
        "--view",
        "--patient",
        "--patient-names",
        "--verify-hash",
        "--allow-other",
        "--log-level",
        "--foreground",
        "--version",
    ] {
        assert!(help.contains(option), "{option} missing from --help:\n{help}");
    }
    for default in [
        "[default: 60]",
        "[default: 300]",
        "[default: 512MiB]",
        "[default: 30]",
        "[default: 1000]",
        "[default: 1GiB]",
        "[default: 32]",
        "[default: 32]",
        "[default: info]",
        "[default: system/Binary.read]",
        "[default: binary]",
        "[default: warn]",
    ] {
        assert!(help.contains(default), "{default} missing from --help:\n{help}");
    }
    assert!(!help.contains("--token "), "there is no --token argument");
    let version = String::from_utf8(fhirfs(&["--version"]).stdout).unwrap();
    assert_eq!(version.trim(), format!("fhirfs {}", fhirfs::cli::VERSION));
}

/// `--version` names the commit the binary was built from (build.rs): in a git checkout, the
/// checkout's HEAD (cargo runs build.rs again when HEAD moves); elsewhere "unknown commit".
#[test]
fn version_names_the_commit_it_was_built_from() {
    let version = String::from_utf8(fhirfs(&["--version"]).stdout).unwrap();
    let prefix = format!("fhirfs {} (", env!("CARGO_PKG_VERSION"));
    let built_from = version.trim().strip_prefix(&prefix).and_then(|v| v.strip_suffix(')'));
    let built_from = built_from.unwrap_or_else(|| panic!("not \"{prefix}...)\": {version}"));
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8(output.stdout).unwrap().trim().to_owned());
    let Some(head) = head else {
        assert_eq!(built_from, "unknown commit", "not in a git checkout");
        return;
    };
    let hash = built_from.strip_prefix("commit ").unwrap_or_else(|| panic!("{version}"));
    let hash = hash.strip_suffix(", modified").unwrap_or(hash);
    assert_eq!(hash.len(), 12, "{version}");
    assert!(head.starts_with(hash), "built from {hash}, but HEAD is {head}");
}

#[test]
fn bad_input_gets_a_clear_message_and_a_failure_status() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("file"), "x").unwrap();
    let empty = empty.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["not a url", empty], "bad base URL \"not a url\""),
        (&["ftp://h/fhir", empty], "must be an http or https URL"),
        (&["http://127.0.0.1:9/fhir", "/nonexistent/mnt"], "does not exist"),
        (&["http://127.0.0.1:9/fhir", full.to_str().unwrap()], "is not empty"),
        (
            &["--token-file", "/nonexistent/token", "http://127.0.0.1:9/fhir", empty],
            "cannot read the token file /nonexistent/token",
        ),
        (
            &["-o", "no_such_option=1", "http://127.0.0.1:9/fhir", empty],
            "unknown mount option \"no_such_option\"",
        ),
    ];
    for (args, message) in cases {
        let output = fhirfs(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let text = stderr(&output);
        assert!(text.contains(message), "{args:?}: expected {message:?} in:\n{text}");
        assert!(!text.contains("panicked"), "{args:?} panicked:\n{text}");
    }
}

#[test]
fn an_already_mounted_mountpoint_is_refused() {
    let server = Server::start();
    let mount = Mount::new(&server.base_url());
    let output = fhirfs(&[&server.base_url(), mount.mountpoint.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("is already mounted"), "{}", stderr(&output));
    assert!(is_mounted(&mount.mountpoint), "the first mount is untouched");
}

#[test]
fn missing_dev_fuse_is_reported() {
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    // A private mount namespace whose /dev has no fuse device.
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs none /dev && exec {FHIRFS} http://127.0.0.1:9/fhir {}",
        dir.path().display()
    );
    let output = Command::new("unshare").args(["-m", "sh", "-c", &script]).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("/dev/fuse is missing"), "{}", stderr(&output));
}

#[test]
fn an_unreachable_server_at_start_is_reported_and_the_mount_stays_up() {
    // Nothing listens on port 9 of loopback (discard is not running).
    let mount = Mount::builder().arg("--timeout").arg("2").mount("http://127.0.0.1:9/fhir");
    assert_eq!(errno(std::fs::read(mount.path("anything")).unwrap_err()), libc::EIO);
    let deadline = Instant::now() + PATIENCE;
    while !mount.log().contains("the server cannot be reached") {
        assert!(Instant::now() < deadline, "no warning:\n{}", mount.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ready_is_sent_only_once_the_mount_answers() {
    let server = Server::start();
    server.server.put("a", "text/plain", "ready");
    // Mount::new returns when READY=1 arrives; at that moment the mount must already work.
    let mount = Mount::new(&server.base_url());
    assert!(is_mounted(&mount.mountpoint));
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"ready");
}

#[test]
fn a_systemd_credential_supplies_the_token() {
    let server = Server::start();
    server.server.set_token(Some("from-credential"));
    server.server.put("a", "text/plain", "secret stuff");
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("token"), "from-credential\n").unwrap();
    let mount = Mount::builder()
        .env("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())
        .mount(&server.base_url());
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"secret stuff");
}

#[test]
fn sigusr1_logs_statistics() {
    let server = Server::start();
    server.server.put("a", "text/plain", "12345");
    let mount = Mount::new(&server.base_url());
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"12345");
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"12345");
    // SAFETY: kill only sends a signal to our own child process.
    unsafe { libc::kill(mount.pid(), libc::SIGUSR1) };
    let line = mount.wait_log_lines("statistics", 1).remove(0);
    // The second read came from the kernel's page cache (kept: same version).
    assert!(line.contains("bytes_served=5"), "{line}");
    assert!(line.contains("cache_misses=1"), "{line}");
    assert!(line.contains("cache_hits="), "{line}");
    assert!(line.contains("gets_by_status={200:"), "{line}");
}

/// SIGUSR1 and SIGHUP sent before the mount exists (pending from exec on, see
/// `signal_at_start`) must neither kill the daemon nor be lost: it mounts, logs the early
/// statistics once mounted, notes the HUP, and answers the next USR1 too.
#[test]
fn signals_before_the_mount_is_up_neither_kill_nor_get_lost() {
    let server = Server::start();
    server.server.put("a", "text/plain", "early");
    let mut mount = Mount::builder()
        .signal_at_start(libc::SIGUSR1)
        .signal_at_start(libc::SIGHUP)
        .mount(&server.base_url());
    mount.wait_log_lines("SIGHUP ignored", 1);
    mount.wait_log_lines("statistics", 1);
    assert!(mount.is_running(), "the daemon died:\n{}", mount.log());
    assert!(is_mounted(&mount.mountpoint));
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"early");
    // SAFETY: kill only sends a signal to our own child process.
    unsafe { libc::kill(mount.pid(), libc::SIGUSR1) };
    let lines = mount.wait_log_lines("statistics", 2);
    assert!(lines[1].contains("bytes_served=5"), "{}", lines[1]);
    let status = mount.terminate();
    assert_eq!(status.code(), Some(0), "{}", mount.log());
}

/// mount(8) runs helpers with a fixed PATH, so mount.fuse3 finds `fhirfs` only where an
/// installed one would be: /usr/local/bin. Links the binary under test there for the test's
/// length (and refuses to replace a different installed fhirfs).
struct InstalledLink(PathBuf);

impl InstalledLink {
    fn new() -> Self {
        let link = PathBuf::from("/usr/local/bin/fhirfs");
        match std::fs::read_link(&link) {
            Ok(target) if target == Path::new(FHIRFS) => {}
            Ok(_) | Err(_) if link.exists() => panic!(
                "{} exists and is not this build: the fstab test needs to link its own binary there",
                link.display()
            ),
            _ => std::os::unix::fs::symlink(FHIRFS, &link).expect("link into /usr/local/bin"),
        }
        InstalledLink(link)
    }
}

impl Drop for InstalledLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn daemon_running_for(mountpoint: &Path) -> bool {
    let wanted = mountpoint.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<_> = cmdline.split(|&b| b == 0).map(String::from_utf8_lossy).collect();
        args.first().is_some_and(|a| a.ends_with("fhirfs")) && args.iter().any(|a| *a == wanted)
    })
}

#[test]
fn mount_t_fuse_fhirfs_goes_to_the_background_and_umount_ends_it() {
    require_fuse();
    assert!(
        Path::new("/sbin/mount.fuse3").exists() || Path::new("/usr/sbin/mount.fuse3").exists(),
        "mount.fuse3 is missing: install Debian's fuse3 package"
    );
    let server = Server::start();
    server.server.put("a", "text/plain", "via fstab");
    let dir = tempfile::tempdir().unwrap();
    let mountpoint: PathBuf = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "fstab-token").unwrap();
    server.server.set_token(Some("fstab-token"));
    let options = format!("token_file={},_netdev,allow_other,dir_ttl=5", token.display());
    let _installed = InstalledLink::new();

    // `mount` returns once the mount is up: the daemon went to the background.
    let status = Command::new("mount")
        .args(["-t", "fuse.fhirfs", &server.base_url()])
        .arg(&mountpoint)
        .args(["-o", &options])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(is_mounted(&mountpoint));
    assert_eq!(std::fs::read(mountpoint.join("a")).unwrap(), b"via fstab");
    assert!(daemon_running_for(&mountpoint));

    let status = Command::new("umount").arg(&mountpoint).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + PATIENCE;
    while daemon_running_for(&mountpoint) {
        assert!(Instant::now() < deadline, "the daemon outlived its mount");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A failure reaches mount's exit status.
    let status = Command::new("mount")
        .args(["-t", "fuse.fhirfs", "not-a-url"])
        .arg(&mountpoint)
        .status()
        .unwrap();
    assert!(!status.success());
    assert!(!is_mounted(&mountpoint));

    // The demo: mount(8) always passes a source, so the demo takes the source "demo".
    let status = Command::new("mount")
        .args(["-t", "fuse.fhirfs", "demo"])
        .arg(&mountpoint)
        .args(["-o", "demo"])
        .status()
        .unwrap();
    assert!(status.success());
    let notes = std::fs::read(mountpoint.join("notes-txt")).unwrap();
    assert_eq!(notes, include_bytes!("../assets/demo/notes.txt"));
    let status = Command::new("umount").arg(&mountpoint).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + PATIENCE;
    while daemon_running_for(&mountpoint) {
        assert!(Instant::now() < deadline, "the demo daemon outlived its mount");
        std::thread::sleep(Duration::from_millis(20));
    }
}
