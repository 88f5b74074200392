//! Going to the background when mount(8) starts fhirfs (an fstab line or `mount -t
//! fuse.fhirfs`): fork before any thread exists, and let the parent exit only once the mount
//! is up (status 0) or has failed (the child's status), so that `mount` reports the truth.

use std::io::{PipeWriter, Read, Write};

/// Names of the programs that run a FUSE mount helper.
const MOUNT_PROGRAMS: &[&str] = &["mount", "mount.fuse", "mount.fuse3"];

/// How far up the process tree to look for mount(8) (mount → mount.fuse3 → sh → fhirfs).
const MAX_ANCESTORS: usize = 4;

/// The message the child sends when the mount answers.
const READY: &[u8] = b"READY\n";

/// (comm, parent pid) of a process, from /proc/PID/stat.
fn comm_and_parent(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may itself contain spaces or parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let ppid = stat.get(close + 2..)?.split(' ').nth(1)?.parse().ok()?;
    Some((comm, ppid))
}

/// True when mount(8) or mount.fuse3 started this process.
pub fn started_by_mount() -> bool {
    let mut pid = std::os::unix::process::parent_id();
    for _ in 0..MAX_ANCESTORS {
        let Some((comm, parent)) = comm_and_parent(pid) else { return false };
        if MOUNT_PROGRAMS.contains(&comm.as_str()) {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

/// The child's end of the readiness pipe.
#[derive(Debug)]
pub struct Readiness(Option<PipeWriter>);

impl Readiness {
    /// Nothing to tell: the process runs in the foreground.
    pub fn foreground() -> Self {
        Self(None)
    }

    /// Tells the waiting parent that the mount is up, and lets go of the terminal.
    pub fn ready(&mut self) {
        if let Some(mut pipe) = self.0.take() {
            let _ = pipe.write_all(READY);
            detach_stdio();
        }
    }
}

fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") else {
        return;
    };
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto the standard descriptors with a valid open descriptor; stderr stays so
    // that the log still reaches whoever collects it.
    unsafe {
        libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO);
        libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
    }
}

/// Forks. The child returns with its end of the readiness pipe and runs the mount; the
/// parent never returns: it exits 0 once the child says the mount is up, or with the child's
/// exit status if it ends first.
///
/// Must be called while the process has a single thread (before the runtime starts).
pub fn background() -> std::io::Result<Readiness> {
    let (mut reader, writer) = std::io::pipe()?;
    // SAFETY: no other thread exists yet (the caller's contract), so the child is a full copy
    // of a single-threaded process and may go on running Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(reader);
        // SAFETY: setsid has no memory effects; it detaches from mount's session.
        unsafe { libc::setsid() };
        return Ok(Readiness(Some(writer)));
    }
    drop(writer);
    let mut message = Vec::new();
    let _ = reader.read_to_end(&mut message);
    if message.starts_with(READY) {
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 };
    std::process::exit(if code == 0 { 1 } else { code });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_names_with_spaces_and_parens_parse() {
        let (comm, ppid) = comm_and_parent(std::process::id()).unwrap();
        assert!(!comm.is_empty());
        assert_eq!(ppid, std::os::unix::process::parent_id());
    }

    #[test]
    fn a_test_runner_is_not_mount() {
        assert!(!started_by_mount());
    }
}
