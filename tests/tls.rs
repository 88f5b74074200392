//! TLS through a real mount: certificates are always verified, and `--ca-file` adds a CA.
//! The HTTPS server is `openssl s_server -WWW` with a self-signed certificate made for the test.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Mount, PATIENCE, errno};

/// An `openssl s_server` serving files from a folder over HTTPS, stopped on drop.
struct HttpsServer {
    child: Child,
    port: u16,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `openssl` with whitespace-separated `args` in `dir`.
fn openssl(dir: &Path, args: &str) {
    let status = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is missing: the TLS tests need it (Debian: apt-get install openssl)");
    assert!(status.success(), "openssl {args} failed");
}

fn https_server(dir: &Path) -> HttpsServer {
    // A private CA and a server certificate it signed, as a hospital's internal PKI has
    // (rustls refuses a self-signed CA certificate used as the server's own).
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 \
         -subj /CN=fhirfs-test-CA -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign",
    );
    openssl(dir, "req -newkey rsa:2048 -nodes -keyout key.pem -out server.csr -subj /CN=127.0.0.1");
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
         -days 1 -extfile ext.cnf",
    );
    std::fs::create_dir_all(dir.join("fhir/Binary")).unwrap();
    std::fs::write(dir.join("fhir/Binary/note"), "over TLS\n").unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-WWW", "-cert", "server.pem", "-key", "key.pem", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    HttpsServer { child, port }
}

#[test]
fn an_unknown_certificate_is_refused_and_ca_file_trusts_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = https_server(dir.path());
    let base = format!("https://127.0.0.1:{}/fhir", server.port);

    let mount = Mount::builder().args(&["--timeout", "3"]).mount(&base);
    assert_eq!(errno(std::fs::read(mount.path("note")).unwrap_err()), libc::EIO);
    drop(mount);

    let ca = dir.path().join("ca.pem");
    let mount = Mount::builder().args(&["--ca-file", ca.to_str().unwrap()]).mount(&base);
    let read = std::fs::read(mount.path("note"));
    assert_eq!(read.unwrap_or_else(|e| panic!("{e}\n{}", mount.log())), b"over TLS\n");
}

#[test]
fn a_bad_ca_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    for (ca, message) in [
        ("/nonexistent/ca.pem", "cannot read the CA file /nonexistent/ca.pem"),
        (not_pem.to_str().unwrap(), "CA file"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_fhirfs"))
            .args(["--ca-file", ca, "https://127.0.0.1:9/fhir"])
            .arg(&mnt)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{ca}: {stderr}");
    }
}
