//! Shared helpers for the tests that mount for real: a loopback FHIR server on its own runtime,
//! and a `fhirfs` process mounted on a temp dir, unmounted on drop.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fhirfs_testserver::loopback::LoopbackServer;

/// How long a mount may take to come up, or a process to end, before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A loopback FHIR server with the runtime that drives it.
pub struct Server {
    pub runtime: tokio::runtime::Runtime,
    pub server: LoopbackServer,
}

impl Server {
    pub fn start() -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime.block_on(LoopbackServer::start()).expect("loopback server");
        Server { runtime, server }
    }

    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Waits (without polling) until `n` reads of `id` reached the server.
    pub fn wait_for_reads(&self, id: &str, n: u64) {
        let wait = self.server.wait_for_reads(id, n);
        self.runtime
            .block_on(async { tokio::time::timeout(PATIENCE, wait).await })
            .unwrap_or_else(|_| panic!("{n} reads of {id} never reached the server"));
    }

    /// Waits (without polling) until the server has answered a mount's start-up check.
    pub fn wait_for_probe(&self) {
        let wait = self.server.wait_for_counts(|c| c.probes >= 1);
        self.runtime
            .block_on(async { tokio::time::timeout(PATIENCE, wait).await })
            .unwrap_or_else(|_| panic!("the start-up check never reached the server"));
    }

    pub fn reads_of(&self, id: &str) -> u64 {
        self.server.counts().per_id.get(id).copied().unwrap_or(0)
    }
}

/// Fails with a clear message where FUSE is missing: mount tests are never skipped silently.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the mount tests need FUSE (run them as root on a machine with \
         /dev/fuse, as CI does)"
    );
}

/// A running `fhirfs` mounted on a temp dir.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub mountpoint: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

/// Builder for a mount: extra arguments and environment.
pub struct MountBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    early_signals: Vec<i32>,
}

impl MountBuilder {
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sends `signal` as soon as the process exists, before it has mounted. The signal is
    /// blocked from exec on (a blocked mask survives exec), so it waits, pending, for whatever
    /// fhirfs does with its mask: the timing is always "before the mount", never luck.
    pub fn signal_at_start(mut self, signal: i32) -> Self {
        self.early_signals.push(signal);
        self
    }

    /// Mounts `base_url` and waits for the daemon's READY=1.
    pub fn mount(self, base_url: &str) -> Mount {
        self.mount_args(&[base_url])
    }

    /// Mounts with `--demo` (given by the caller) and only the mountpoint.
    pub fn mount_demo(self) -> Mount {
        self.mount_args(&[])
    }

    fn mount_args(self, positional: &[&str]) -> Mount {
        require_fuse();
        let dir = tempfile::tempdir().expect("tempdir");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mkdir");
        let log = dir.path().join("fhirfs.log");
        let socket_path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let mut command = Command::new(env!("CARGO_BIN_EXE_fhirfs"));
        command
            .args(&self.args)
            .args(positional)
            .arg(&mountpoint)
            .env_remove("FHIRFS_TOKEN")
            .env("NOTIFY_SOCKET", &socket_path)
            .env("RUST_LOG", "fhirfs=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        for (key, value) in &self.env {
            command.env(key, value);
        }
        if !self.early_signals.is_empty() {
            let signals = self.early_signals.clone();
            // SAFETY: between fork and exec the closure only calls sigemptyset, sigaddset and
            // sigprocmask, which are async-signal-safe, on a set on its own stack.
            unsafe {
                command.pre_exec(move || {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    for &signal in &signals {
                        libc::sigaddset(&mut set, signal);
                    }
                    if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("start fhirfs");
        for &signal in &self.early_signals {
            // SAFETY: kill only sends a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
        let mut mount = Mount { dir, mountpoint, child: Some(child), log };
        mount.wait_ready(&socket);
        mount
    }
}

impl Mount {
    pub fn builder() -> MountBuilder {
        MountBuilder { args: Vec::new(), env: Vec::new(), early_signals: Vec::new() }
    }

    /// Mounts `base_url` with default options.
    pub fn new(base_url: &str) -> Mount {
        Mount::builder().mount(base_url)
    }

    fn wait_ready(&mut self, socket: &UnixDatagram) {
        let deadline = Instant::now() + PATIENCE;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1")
            {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("fhirfs exited with {status} before it was ready:\n{}", self.log());
            }
        }
        panic!("fhirfs did not say READY=1 within {PATIENCE:?}:\n{}", self.log());
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits until the log has at least `n` lines that contain `needle`, and returns them.
    pub fn wait_log_lines(&self, needle: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // Whole lines only: the last one may still be being written.
            let log = self.log();
            let whole = log.rfind('\n').map_or("", |end| &log[..end]);
            let lines: Vec<String> =
                whole.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{n} log lines with {needle:?} expected, {} after {PATIENCE:?}:\n{}",
                lines.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the daemon process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill only sends a signal to our own child process.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.wait_exit()
    }

    /// Waits for the daemon to exit (after a signal or an external unmount).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.take().expect("still running");
        let pid = child.id() as i32;
        match wait_with_deadline(child) {
            Some(status) => status,
            None => {
                // SAFETY: kill only sends a signal to our own child process.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("fhirfs did not exit within {PATIENCE:?}:\n{}", self.log());
            }
        }
    }

    /// Requests the kernel has sent to this mount and not had answered yet
    /// (/sys/fs/fuse/connections/N/waiting).
    pub fn kernel_waiting(&self) -> u64 {
        let connections = Path::new("/sys/fs/fuse/connections");
        if std::fs::read_dir(connections).map(|mut d| d.next().is_none()).unwrap_or(true) {
            let _ = Command::new("mount").args(["-t", "fusectl", "none"]).arg(connections).status();
        }
        let dev = std::fs::metadata(&self.mountpoint).expect("stat mountpoint").dev();
        let minor = libc::minor(dev);
        let path = connections.join(minor.to_string()).join("waiting");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("cannot read {}: {e} (is fusectl mounted?)", path.display())
        });
        text.trim().parse().expect("waiting count")
    }

    /// Waits until the kernel has at least `n` requests out to this mount.
    pub fn wait_kernel_waiting(&self, n: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.kernel_waiting() < n {
            assert!(Instant::now() < deadline, "never {n} requests waiting on the mount");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// True when `path` is a mountpoint in /proc/self/mounts.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&*path))
}

/// Waits for a child in a thread, so that a hung child fails the test instead of hanging it.
fn wait_with_deadline(mut child: Child) -> Option<ExitStatus> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    rx.recv_timeout(PATIENCE).ok().and_then(Result::ok)
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let pid = child.id() as i32;
            // SAFETY: kill only sends a signal to our own child process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            if wait_with_deadline(child).is_none() {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if is_mounted(&self.mountpoint) {
            let path =
                std::ffi::CString::new(self.mountpoint.to_string_lossy().as_bytes()).expect("path");
            // SAFETY: umount2 reads a valid NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The errno of an io::Error.
pub fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or_else(|| panic!("no errno in {e}"))
}
