//! Wiring: the tokio runtime, the source, the mount, readiness and shutdown.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fuser::{Config, INodeNo, MountOption, Session, SessionACL};
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::auth::TokenSource;
use crate::cli::{Args, Target, View};
use crate::daemon::Readiness;
use crate::demo::DemoServer;
use crate::documents::source::DocumentsSource;
use crate::fs::FhirFs;
use crate::fuse::FuseAdapter;
use crate::http::{HttpConfig, HttpSource};
use crate::source::Source;

/// tokio worker threads: the work is I/O and base64 decoding; two per core is plenty.
const WORKER_THREADS: usize = 4;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Where.
    pub mountpoint: PathBuf,
    /// Shown as the source in `mount` and /proc/mounts.
    pub fsname: String,
    /// Let other users in.
    pub allow_other: bool,
}

impl MountConfig {
    fn fuser_config(&self) -> Config {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(self.fsname.clone()),
            MountOption::Subtype("fhirfs".into()),
            MountOption::RO,
            // Content is untrusted: no set-uid, no devices, no execution from the mount.
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoExec,
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        if self.allow_other {
            config.acl = SessionACL::All;
        }
        config
    }
}

/// The filesystem type mounted at `path`, from /proc/self/mountinfo.
fn mounted_type(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // mountinfo escapes space, tab, newline and backslash as octal.
    let escaped = path
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    info.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        if fields.nth(4)? != escaped {
            return None;
        }
        // After the optional fields comes "-", then the type.
        let mut rest = fields.skip_while(|f| *f != "-");
        rest.nth(1).map(str::to_owned)
    })
}

/// Checks that the mountpoint is an empty folder and that FUSE is there, with clear messages.
pub fn check_mountpoint(mountpoint: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::metadata(mountpoint) {
        Ok(meta) => meta,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "mountpoint {} is a dead FUSE mount (its daemon has gone): run `umount {0}` first",
            mountpoint.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {} does not exist: create it with mkdir first", mountpoint.display())
        }
        Err(e) => bail!("mountpoint {} is not usable: {e}", mountpoint.display()),
    };
    if !meta.is_dir() {
        bail!("mountpoint {} is not a folder", mountpoint.display());
    }
    let canonical = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_owned());
    if let Some(kind) = mounted_type(&canonical).filter(|k| k.starts_with("fuse")) {
        bail!(
            "{} is already mounted ({kind}): unmount it first (umount {0})",
            mountpoint.display()
        );
    }
    let mut entries = std::fs::read_dir(mountpoint)
        .with_context(|| format!("cannot read mountpoint {}", mountpoint.display()))?;
    if entries.next().is_some() {
        bail!("mountpoint {} is not empty", mountpoint.display());
    }
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or give the container the device"
        );
    }
    Ok(())
}

/// Mounts `fs`, tells a service manager that it is ready, and serves until `shutdown`
/// resolves (then unmounts) or until the mount is unmounted from outside. `reports` are the
/// report signals ([`Signals::install`]), answered while the mount serves.
pub async fn serve<S: Source>(
    fs: Arc<FhirFs<S>>,
    mount: &MountConfig,
    shutdown: impl Future<Output = ()>,
    reports: Reports,
    readiness: &mut Readiness,
) -> anyhow::Result<()> {
    let (unmounted_tx, unmounted) = oneshot::channel();
    let adapter =
        FuseAdapter::new(Arc::clone(&fs), tokio::runtime::Handle::current(), unmounted_tx);
    let config = mount.fuser_config();
    let mountpoint = mount.mountpoint.clone();
    // Mounting and the FUSE handshake are blocking system calls.
    let session = tokio::task::spawn_blocking(move || Session::new(adapter, &mountpoint, &config))
        .await?
        .with_context(|| format!("cannot mount on {}", mount.mountpoint.display()))?;
    let notifier = session.notifier();
    let runtime = tokio::runtime::Handle::current();
    fs.set_invalidator(Box::new(move |ino| {
        let notifier = notifier.clone();
        // The kernel may wait on pages while it invalidates: never do it on the FUSE thread
        // (which must stay free to answer the reads it may wait for).
        runtime.spawn_blocking(move || {
            // ENOENT means the kernel has no cache for that inode: nothing to drop.
            let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
        });
    }));
    let background = session.spawn().context("cannot start the FUSE session")?;

    // Ready only once the mount answers: stat the root through the kernel.
    let probe = mount.mountpoint.clone();
    tokio::task::spawn_blocking(move || std::fs::metadata(probe))
        .await?
        .context("the new mount does not answer")?;
    info!(mountpoint = %mount.mountpoint.display(), "mounted");
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        warn!(error = %e, "cannot tell the service manager that the mount is ready");
    }
    readiness.ready();
    tokio::spawn(Arc::clone(&fs).warm_up());

    let report = reports.report(Arc::clone(&fs));
    tokio::pin!(report);

    tokio::select! {
        () = &mut report => {}
        () = shutdown => {
            info!("unmounting");
            let _ = sd_notify::notify(&[NotifyState::Stopping]);
            let result = tokio::task::spawn_blocking(move || background.umount_and_join()).await?;
            match result {
                Ok(()) => {}
                // A program still has a file or the folder open: detach the mount now (it goes
                // away when they let go) rather than fail the stop.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    warn!("the mount is busy; detaching it lazily");
                    lazy_unmount(&mount.mountpoint)
                        .with_context(|| format!("cannot detach {}", mount.mountpoint.display()))?;
                }
                Err(e) => return Err(e).context("unmount failed"),
            }
        }
        _ = unmounted => {
            info!("unmounted from outside");
            let _ = sd_notify::notify(&[NotifyState::Stopping]);
            tokio::task::spawn_blocking(move || background.join()).await?.ok();
        }
    }
    info!(stats = %fs.stats(), "statistics at exit");
    Ok(())
}

/// Detaches the mount at `mountpoint` (MNT_DETACH): gone from the tree at once, released when
/// the last open file is closed.
fn lazy_unmount(mountpoint: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let canonical = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_owned());
    let path = std::ffi::CString::new(canonical.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: umount2 reads a valid NUL-terminated path and touches no other memory.
    let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Every signal fhirfs handles, installed in one place before the mount exists, so that none
/// of them can take its default action (ending the process, leaving a dead mount) while the
/// daemon starts:
/// - SIGTERM and SIGINT unmount and exit 0;
/// - SIGUSR1 logs statistics;
/// - SIGHUP is logged and otherwise ignored. A FUSE daemon has no configuration to reload, and
///   its default action (exit) would leave a dead mount when a terminal or session closes;
///   under systemd a HUP must not kill a mount either.
///
/// SIGPIPE needs no handler: Rust's runtime ignores it before `main`, so a write to a closed
/// socket is an `EPIPE` error on that request, never the end of the process.
pub struct Signals {
    /// The future that resolves on SIGTERM or SIGINT.
    pub termination: Termination,
    /// SIGUSR1 and SIGHUP, for [`serve`].
    pub reports: Reports,
}

/// Resolves on SIGTERM or SIGINT.
pub struct Termination {
    term: Signal,
    int: Signal,
}

/// SIGUSR1 (statistics) and SIGHUP (ignored), answered while the mount serves.
pub struct Reports {
    usr1: Signal,
    hup: Signal,
}

/// The signals [`Signals`] handles, unblocked once their handlers are in.
const HANDLED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGHUP];

impl Signals {
    /// Installs the handlers (in the current tokio runtime), then unblocks the signals on this
    /// thread. A parent may start fhirfs with signals blocked (the mask survives exec): one sent
    /// early then waits, pending, and is delivered to its handler here. Unblocking only after
    /// the handlers are in is what makes an early signal safe.
    pub fn install() -> anyhow::Result<Self> {
        let termination = Termination {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        };
        let reports = Reports {
            usr1: signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        };
        unblock(&HANDLED).context("cannot unblock the signals fhirfs handles")?;
        Ok(Self { termination, reports })
    }
}

impl Termination {
    /// Waits for SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM"),
            _ = self.int.recv() => info!("SIGINT"),
        }
    }
}

impl Reports {
    /// Answers SIGUSR1 with a statistics line and SIGHUP with a note, forever.
    async fn report<S: Source>(mut self, fs: Arc<FhirFs<S>>) {
        loop {
            tokio::select! {
                Some(()) = self.usr1.recv() => {
                    let (open_files, pinned_bytes) = fs.open_files();
                    let cached_bytes = fs.cached_bytes();
                    info!(stats = %fs.stats(), cached_bytes, open_files, pinned_bytes, "statistics");
                }
                Some(()) = self.hup.recv() => info!("SIGHUP ignored: the mount stays up"),
                else => return std::future::pending().await,
            }
        }
    }
}

/// Unblocks `signals` in this thread's signal mask.
fn unblock(signals: &[libc::c_int]) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t; the signal numbers are valid constants.
    unsafe {
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(rc)) }
}

/// The whole program after argument parsing. `readiness` is told when the mount is up.
pub fn main(args: Args, mut readiness: Readiness) -> anyhow::Result<()> {
    let (target, mountpoint) = args.target()?;
    let token = args.token()?;
    let ca_pem = args.ca_pem()?;
    check_mountpoint(&mountpoint)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("fhirfs-io")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let Signals { termination, reports } = Signals::install()?;
        let (base, token, _demo) = match target {
            Target::Server(url) => (url, token, None),
            Target::Demo => {
                let server = DemoServer::start().await.context("cannot start the demo server")?;
                info!(base = %server.base_url(), "demo server started");
                let url = url::Url::parse(&server.base_url())?;
                (url, TokenSource::None, Some(server))
            }
        };
        let mut http = HttpConfig::new(base.clone());
        http.token = token;
        http.timeout = args.timeout.max(Duration::from_millis(100));
        http.page_size = args.page_size.max(1);
        http.max_size = args.max_size.as_u64();
        http.ca_pem = ca_pem;
        http.fetch = args.fetch;
        http.max_requests = usize::from(args.max_requests);
        http.compression = !args.no_compression;
        let stats = Arc::clone(&http.stats);
        let source = HttpSource::new(http).context("cannot set up the HTTP client")?;
        let mount = MountConfig {
            mountpoint,
            fsname: format!("fhirfs:{}", base.as_str().trim_end_matches('/')),
            allow_other: args.allow_other,
        };
        match args.view {
            View::Binary => {
                let fs = FhirFs::with_stats(source, args.fs_config(), stats);
                serve(fs, &mount, termination.recv(), reports, &mut readiness).await
            }
            View::Documents => {
                let source = DocumentsSource::new(Arc::new(source), args.documents_config());
                let fs = FhirFs::with_stats(source, args.fs_config(), stats);
                serve(fs, &mount, termination.recv(), reports, &mut readiness).await
            }
        }
    })?;
    // Tasks still waiting on a dead server must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
