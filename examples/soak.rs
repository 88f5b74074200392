//! Soak test: 10,000 open/read/close cycles over 200 files of a real mount while the loopback
//! server injects random faults. Checks that no read ever returns wrong bytes (only the bytes
//! or EIO), that the daemon survives, and prints its resident memory and open descriptors at
//! the start and the end, which must stay flat.
//!
//! ```sh
//! cargo build --release && cargo run --release --example soak            # as root
//! cargo run --release --example soak -- --cycles 2000 --fault-rate 0.2
//! ```

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fhirfs_testserver::loopback::{LoopbackServer, RandomFaults};
use fhirfs_testserver::noise;

const FILES: usize = 200;

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (resident KiB, open descriptors) of a process.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

fn main() {
    let cycles = arg("--cycles", 10_000.0) as usize;
    let rate = arg("--fault-rate", 0.1);
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/fhirfs");
    assert!(binary.exists(), "build the daemon first: cargo build --release");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = runtime.block_on(LoopbackServer::start()).expect("server");
    let files: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| (format!("soak-{i:03}"), noise(1 + (i * 7919) % 200_000, i as u64)))
        .collect();
    for (id, bytes) in &files {
        server.put(id, "application/octet-stream", bytes.clone());
    }
    server.set_random_faults(Some(RandomFaults { probability: rate, seed: 4711 }));

    let dir = tempfile::tempdir().expect("tempdir");
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).expect("mkdir");
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).expect("socket");
    socket.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    // A small cache and short TTLs, so that the cycles keep fetching and evicting.
    let mut daemon = Command::new(&binary)
        .args(["--cache-size", "8MiB", "--cache-ttl", "0.2", "--dir-ttl", "0.2", "--timeout", "5"])
        .arg(server.base_url())
        .arg(&mountpoint)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "error")
        .stderr(Stdio::null())
        .spawn()
        .expect("start fhirfs");
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).expect("READY=1 within 20 s");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    let pid = daemon.id();

    let start = Instant::now();
    let (mut ok, mut eio, mut wrong, mut other) = (0u64, 0u64, 0u64, 0u64);
    let mut first = None;
    for cycle in 0..cycles {
        let (id, bytes) = &files[(cycle * 7) % FILES];
        match std::fs::read(mountpoint.join(id)) {
            Ok(got) if got == *bytes => ok += 1,
            Ok(_) => wrong += 1,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => eio += 1,
            Err(_) => other += 1,
        }
        if cycle == 500 {
            // After warm-up: the baseline that the end is compared with.
            first = Some(usage(pid));
        }
    }
    let elapsed = start.elapsed();
    let (rss_start, fds_start) = first.unwrap_or_else(|| usage(pid));
    let (rss_end, fds_end) = usage(pid);
    let alive = daemon.try_wait().expect("wait").is_none();
    println!("cycles={cycles} files={FILES} fault_rate={rate} elapsed={elapsed:.1?}");
    println!("ok={ok} eio={eio} wrong_bytes={wrong} other_errors={other} daemon_alive={alive}");
    println!("rss_kib start={rss_start} end={rss_end}  open_fds start={fds_start} end={fds_end}");
    // SAFETY: kill only signals our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = daemon.wait().expect("exit");
    println!("daemon exit status={status}");
    let flat = rss_end <= rss_start + 32 * 1024 && fds_end <= fds_start + 2;
    let pass = wrong == 0 && other == 0 && alive && status.success() && flat;
    println!("{}", if pass { "SOAK PASSED" } else { "SOAK FAILED" });
    std::process::exit(if pass { 0 } else { 1 });
}
