//! The FHIR server of the interop suite, the HTTP calls the tests make to it directly (seeding
//! and inspection), and a counting proxy that shows which requests a mount sent.
//!
//! The server is, in this order:
//! - the one at `FHIRFS_IT_BASE`, with `FHIRFS_IT_TOKEN` (full access to Binary) and optionally
//!   `FHIRFS_IT_TOKEN_NO_BINARY` (a token without Binary scope);
//! - a Helios FHIR Server (`hfs`) from `HFS_BIN` or from `PATH`, started here on loopback with
//!   Bearer-JWT auth: the JWKS is served from this process, tokens are RS256 JWTs signed with
//!   the `openssl` CLI.
//!
//! `scripts/interop` installs hfs with `cargo install` when none of these is there. The hfs we
//! start dies with the test process (`PR_SET_PDEATHSIG`), and an `atexit` hook removes its
//! temp dir.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::runtime::Runtime;

/// Base URL of an existing FHIR server to test against.
pub const BASE_ENV: &str = "FHIRFS_IT_BASE";
/// Bearer token for `BASE_ENV` that may create, read, update, delete and search Binary.
pub const TOKEN_ENV: &str = "FHIRFS_IT_TOKEN";
/// Optional bearer token for `BASE_ENV` that has no Binary scope.
pub const TOKEN_NO_BINARY_ENV: &str = "FHIRFS_IT_TOKEN_NO_BINARY";
/// Path of an `hfs` binary (Helios FHIR Server 0.2.7) to start.
pub const HFS_BIN_ENV: &str = "HFS_BIN";

const FHIR_JSON: &str = "application/fhir+json";

/// One HTTP request of the suite (a 5 MiB Binary is about 7 MB of JSON) as a whole.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long hfs may take to answer `/health` after its start (about 1 s here; its first start
/// creates the SQLite schema).
const HFS_START_PATIENCE: Duration = Duration::from_secs(60);

/// hfs's largest page. Lower than the mount's default `_count` (1000), so that the server's
/// own cursor paging is what the mount has to follow.
pub const HFS_MAX_PAGE_SIZE: u32 = 50;

/// Scope of the full token: every operation on every type (SMART v2 `cruds`).
const FULL_SCOPE: &str = "system/*.cruds";
/// Scope of the second token: read and search Patient only, so Binary gets 403.
const NO_BINARY_SCOPE: &str = "system/Patient.rs";
/// Lifetime of the tokens minted here; longer than any run.
const TOKEN_TTL: Duration = Duration::from_secs(2 * 3600);
/// `kid` of the signing key in the JWKS and in each token's header.
const KEY_ID: &str = "fhirfs-interop";

/// A FHIR server the suite writes to and the mounts read from.
pub struct FhirServer {
    /// The base URL, without a trailing slash.
    pub base: String,
    /// Token with full access to Binary; `None` for a server without auth.
    pub token: Option<String>,
    /// Token without Binary scope, when there is one.
    pub token_no_binary: Option<String>,
    /// What the server is, for messages.
    pub description: String,
    /// True when this process started the server (hfs): then its settings are known.
    pub started_here: bool,
    /// Runs the HTTP calls of the tests, the JWKS and the proxies.
    pub runtime: Runtime,
    client: reqwest::Client,
}

/// The version of a Binary that a write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The Binary's id.
    pub id: String,
    /// `meta.versionId`, when the server keeps versions.
    pub version_id: Option<String>,
    /// `meta.lastUpdated`.
    pub last_updated: SystemTime,
    /// `contentType` as the server keeps it.
    pub content_type: String,
}

impl FhirServer {
    /// The server named by the environment, or a local hfs started now.
    pub fn from_env() -> Result<FhirServer, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let env = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if let Some(base) = env(BASE_ENV) {
            return Ok(FhirServer {
                base: base.trim().trim_end_matches('/').to_owned(),
                token: env(TOKEN_ENV),
                token_no_binary: env(TOKEN_NO_BINARY_ENV),
                description: format!("{BASE_ENV}={base}"),
                started_here: false,
                runtime,
                client,
            });
        }
        let bin = env(HFS_BIN_ENV).map(PathBuf::from).or_else(|| find_on_path("hfs")).ok_or_else(
            || {
                format!(
                    "no FHIR server for the interop suite: set {BASE_ENV} (and {TOKEN_ENV}) or \
                     {HFS_BIN_ENV}, put hfs on PATH, or run ./scripts/interop, which installs \
                     hfs 0.2.7 when there is none"
                )
            },
        )?;
        // hfs runs in a temp dir: a relative path would be looked up there.
        let bin = std::fs::canonicalize(&bin)
            .map_err(|e| format!("hfs binary {}: {e}", bin.display()))?;
        let version = hfs_version(&bin)?;
        let local = start_hfs(&bin, &runtime, &client)?;
        Ok(FhirServer {
            base: local.base,
            token: Some(local.token),
            token_no_binary: Some(local.token_no_binary),
            description: format!("{version} ({}) started here", bin.display()),
            started_here: true,
            runtime,
            client,
        })
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, url).header(header::ACCEPT, FHIR_JSON);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request and returns the status, headers and body; transport errors panic.
    fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        self.runtime.block_on(async {
            let response = request.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.unwrap_or_else(|e| panic!("{what}: body: {e}"));
            (status, headers, body.to_vec())
        })
    }

    fn binary_json(id: Option<&str>, content_type: &str, bytes: &[u8]) -> Vec<u8> {
        let mut binary = json!({"resourceType": "Binary", "contentType": content_type});
        if let Some(id) = id {
            binary["id"] = json!(id);
        }
        // FHIR leaves `data` out of an empty Binary: `""` is not a valid base64Binary.
        if !bytes.is_empty() {
            binary["data"] = json!(base64_simd::STANDARD.encode_to_string(bytes));
        }
        serde_json::to_vec(&binary).expect("JSON")
    }

    /// Creates a Binary (`POST [base]/Binary`, JSON with base64 `data`).
    pub fn create(&self, content_type: &str, bytes: &[u8]) -> Version {
        let body = Self::binary_json(None, content_type, bytes);
        let request = self
            .request(reqwest::Method::POST, &format!("{}/Binary", self.base))
            .header(header::CONTENT_TYPE, FHIR_JSON)
            .header("Prefer", "return=representation")
            .body(body);
        let what = format!("POST Binary ({content_type}, {} bytes)", bytes.len());
        let (status, headers, body) = self.send(request, &what);
        assert!(status.is_success(), "{what}: {status}: {}", String::from_utf8_lossy(&body));
        self.version_of(&what, &headers, &body)
    }

    /// Replaces the content of the Binary `id` (`PUT [base]/Binary/[id]`).
    pub fn update(&self, id: &str, content_type: &str, bytes: &[u8]) -> Version {
        let body = Self::binary_json(Some(id), content_type, bytes);
        let request = self
            .request(reqwest::Method::PUT, &format!("{}/Binary/{id}", self.base))
            .header(header::CONTENT_TYPE, FHIR_JSON)
            .header("Prefer", "return=representation")
            .body(body);
        let what = format!("PUT Binary/{id} ({} bytes)", bytes.len());
        let (status, headers, body) = self.send(request, &what);
        assert!(status.is_success(), "{what}: {status}: {}", String::from_utf8_lossy(&body));
        self.version_of(&what, &headers, &body)
    }

    /// Creates any resource (`POST [base]/{resourceType}`); the resource as the server keeps it
    /// (with its `id` and `meta`).
    pub fn create_resource(&self, resource: &Value) -> Value {
        let kind = resource["resourceType"].as_str().expect("a resourceType");
        let request = self
            .request(reqwest::Method::POST, &format!("{}/{kind}", self.base))
            .header(header::CONTENT_TYPE, FHIR_JSON)
            .header("Prefer", "return=representation")
            .body(resource.to_string());
        let what = format!("POST {kind}");
        let (status, headers, body) = self.send(request, &what);
        assert!(status.is_success(), "{what}: {status}: {}", String::from_utf8_lossy(&body));
        if let Ok(created) = serde_json::from_slice::<Value>(&body)
            && created["id"].is_string()
        {
            return created;
        }
        let location = headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{what}: neither a resource nor a Location came back"));
        let (status, _, body) = self.send(self.request(reqwest::Method::GET, location), &what);
        assert!(status.is_success(), "{what}: GET {location}: {status}");
        serde_json::from_slice(&body).expect("the created resource")
    }

    /// Deletes the Binary `id`.
    pub fn delete(&self, id: &str) {
        let url = format!("{}/Binary/{id}", self.base);
        let what = format!("DELETE Binary/{id}");
        let (status, _, body) = self.send(self.request(reqwest::Method::DELETE, &url), &what);
        assert!(status.is_success(), "{what}: {status}: {}", String::from_utf8_lossy(&body));
    }

    /// The status of `GET [base]/Binary/[id]`.
    pub fn read_status(&self, id: &str) -> StatusCode {
        let url = format!("{}/Binary/{id}", self.base);
        let what = format!("GET Binary/{id}");
        self.send(self.request(reqwest::Method::GET, &url), &what).0
    }

    /// Runs the search `Binary?{query}` and follows its `next` links: the ids in order, and
    /// how many pages the server used.
    pub fn search(&self, query: &str) -> (Vec<String>, usize) {
        let mut url = format!("{}/Binary?{query}", self.base);
        let mut ids = Vec::new();
        for page in 1..=1000 {
            let what = format!("search page {page} ({url})");
            let (status, _, body) = self.send(self.request(reqwest::Method::GET, &url), &what);
            assert!(status.is_success(), "{what}: {status}");
            let bundle: Value = serde_json::from_slice(&body).expect("a searchset Bundle");
            for entry in bundle["entry"].as_array().into_iter().flatten() {
                if let Some(id) = entry["resource"]["id"].as_str() {
                    ids.push(id.to_owned());
                }
            }
            let next = bundle["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str());
            match next {
                Some(next) => url = next.to_owned(),
                None => return (ids, page),
            }
        }
        panic!("the search Binary?{query} has more than 1000 pages");
    }

    /// The version a write answered with; read back when the server sent no body.
    fn version_of(&self, what: &str, headers: &HeaderMap, body: &[u8]) -> Version {
        if let Ok(resource) = serde_json::from_slice::<Value>(body)
            && let Some(version) = version_from_resource(&resource)
        {
            return version;
        }
        // `Prefer: return=representation` is a hint; `Location` names the new version.
        let location = headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{what}: neither a resource nor a Location came back"));
        let (status, _, body) = self.send(self.request(reqwest::Method::GET, location), what);
        assert!(status.is_success(), "{what}: GET {location}: {status}");
        let resource: Value = serde_json::from_slice(&body).expect("a Binary");
        version_from_resource(&resource)
            .unwrap_or_else(|| panic!("{what}: no id or meta.lastUpdated in {resource}"))
    }

    /// A counting proxy in front of this server, for one mount.
    pub fn proxy(&self) -> Proxy {
        Proxy::start(&self.runtime, &self.base)
    }
}

fn version_from_resource(resource: &Value) -> Option<Version> {
    let id = resource["id"].as_str()?;
    let last_updated = resource["meta"]["lastUpdated"].as_str()?;
    Some(Version {
        id: id.to_owned(),
        version_id: resource["meta"]["versionId"].as_str().map(str::to_owned),
        last_updated: parse_instant(last_updated),
        content_type: resource["contentType"].as_str().unwrap_or_default().to_owned(),
    })
}

/// A FHIR `instant` (RFC 3339 with a zone) as a `SystemTime`.
pub fn parse_instant(text: &str) -> SystemTime {
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("lastUpdated {text:?}: {e}"));
    SystemTime::from(parsed)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

// ---------------------------------------------------------------------------------------------
// A local hfs with Bearer-JWT auth.

/// `hfs --version` (`hfs 0.2.7`), which also tells that `bin` is the Helios server and not
/// another program of that name.
fn hfs_version(bin: &Path) -> Result<String, String> {
    let mut child = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{} --version did not finish", bin.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out)
        .map_err(|e| e.to_string())?;
    let version = out.trim().to_owned();
    if !version.starts_with("hfs ") {
        return Err(format!(
            "{} is not the Helios FHIR Server: --version said {version:?}",
            bin.display()
        ));
    }
    Ok(version)
}

/// What `atexit` has to clean up: the hfs process and its temp dir.
struct LocalHfs {
    dir: PathBuf,
    pid: Option<i32>,
    exited: Arc<AtomicBool>,
}

static LOCAL_HFS: Mutex<Vec<LocalHfs>> = Mutex::new(Vec::new());

fn local_hfs() -> MutexGuard<'static, Vec<LocalHfs>> {
    LOCAL_HFS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs at process exit (after the last test, also when tests failed): kills the hfs we
/// started and removes its temp dir. A test process killed by a signal skips this; then
/// `PR_SET_PDEATHSIG` still ends hfs and only the temp dir is left behind.
extern "C" fn stop_local_hfs() {
    for local in local_hfs().drain(..) {
        if let Some(pid) = local.pid {
            // SAFETY: kill only sends a signal to a child this process started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while !local.exited.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_dir_all(&local.dir);
    }
}

struct Started {
    base: String,
    token: String,
    token_no_binary: String,
}

fn start_hfs(bin: &Path, runtime: &Runtime, client: &reqwest::Client) -> Result<Started, String> {
    let dir = tempfile::Builder::new()
        .prefix("fhirfs-interop-hfs-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?
        .keep();
    {
        static HOOK: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a plain `extern "C" fn` without arguments, as atexit expects.
        HOOK.call_once(|| unsafe {
            libc::atexit(stop_local_hfs);
        });
    }
    let exited = Arc::new(AtomicBool::new(false));
    local_hfs().push(LocalHfs { dir: dir.clone(), pid: None, exited: Arc::clone(&exited) });

    let key = dir.join("key.pem");
    openssl(
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"],
        Some(&key),
        None,
    )?;
    let jwks_addr = runtime.block_on(serve_jwks(jwks(&key)?))?;
    let issuer = format!("http://{jwks_addr}");

    // A free port can be taken by someone else before hfs binds it: then hfs exits at once,
    // and another port is tried.
    let mut last_error = String::new();
    for _ in 0..3 {
        let port = free_port()?;
        let base = format!("http://127.0.0.1:{port}");
        let log = dir.join(format!("hfs-{port}.log"));
        let mut command = Command::new(bin);
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--database-url")
            .arg(dir.join(format!("fhir-{port}.db")))
            // hfs writes ./exports and reads ./data: keep them in the temp dir.
            .current_dir(&dir)
            .env("HFS_AUTH_ENABLED", "true")
            .env("HFS_AUTH_JWKS_URL", format!("{issuer}/jwks.json"))
            .env("HFS_AUTH_ISSUER", &issuer)
            .env("HFS_AUTH_AUDIENCE", &base)
            .env("HFS_BASE_URL", &base)
            .env("HFS_UI_ENABLED", "false")
            .env("HFS_MAX_PAGE_SIZE", HFS_MAX_PAGE_SIZE.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| format!("hfs log: {e}"))?);
        for (name, _) in std::env::vars_os() {
            // Settings of the caller's own hfs must not leak into this one.
            if name.to_string_lossy().starts_with("HFS_") && name != "HFS_BIN" {
                command.env_remove(name);
            }
        }
        let (pid, exit) = spawn_owned(command, Arc::clone(&exited))
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        if let Some(local) = local_hfs().last_mut() {
            local.pid = Some(pid);
        }
        match wait_healthy(runtime, client, &base, &exit) {
            Ok(()) => {
                let mint = |scope| mint_jwt(&key, &issuer, &base, scope);
                return Ok(Started {
                    token: mint(FULL_SCOPE)?,
                    token_no_binary: mint(NO_BINARY_SCOPE)?,
                    base,
                });
            }
            Err(e) => {
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = log_text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                last_error = format!("hfs on port {port}: {e}\n{}", tail.join("\n"));
                // SAFETY: kill only sends a signal to the child just started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = exit.recv_timeout(Duration::from_secs(5));
                exited.store(false, Ordering::SeqCst);
            }
        }
    }
    Err(last_error)
}

/// Starts `command` from a thread that lives as long as the child: the child gets SIGKILL when
/// that thread ends (`PR_SET_PDEATHSIG` follows the thread, not the process), which is when
/// the child has exited or this process is gone.
fn spawn_owned(
    mut command: Command,
    exited: Arc<AtomicBool>,
) -> std::io::Result<(i32, mpsc::Receiver<std::io::Result<ExitStatus>>)> {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (started_tx, started_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel();
    std::thread::Builder::new().name("hfs-owner".into()).spawn(move || match command.spawn() {
        Ok(mut child) => {
            let _ = started_tx.send(Ok(child.id() as i32));
            let status = child.wait();
            exited.store(true, Ordering::SeqCst);
            let _ = exit_tx.send(status);
        }
        Err(e) => {
            let _ = started_tx.send(Err(e));
        }
    })?;
    let pid = started_rx.recv().map_err(|_| std::io::Error::other("the hfs thread died"))??;
    Ok((pid, exit_rx))
}

fn wait_healthy(
    runtime: &Runtime,
    client: &reqwest::Client,
    base: &str,
    exit: &mpsc::Receiver<std::io::Result<ExitStatus>>,
) -> Result<(), String> {
    let deadline = Instant::now() + HFS_START_PATIENCE;
    let url = format!("{base}/health");
    loop {
        if let Ok(status) = exit.try_recv() {
            return Err(format!("hfs exited at start: {status:?}"));
        }
        let healthy = runtime.block_on(async {
            let response = client.get(&url).timeout(Duration::from_secs(2)).send().await;
            response.is_ok_and(|r| r.status().is_success())
        });
        if healthy {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no healthy answer within {HFS_START_PATIENCE:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("port: {e}"))?;
    Ok(listener.local_addr().map_err(|e| format!("port: {e}"))?.port())
}

/// Runs `openssl ARGS [PATH]` with `input` on stdin; its stdout.
fn openssl(args: &[&str], path: Option<&Path>, input: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let mut command = Command::new("openssl");
    command.args(args);
    if let Some(path) = path {
        command.arg(path);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("openssl (needed to sign tokens for hfs): {e}"))?;
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.unwrap_or_default()).map_err(|e| format!("openssl stdin: {e}"))?;
    drop(stdin);
    let output = child.wait_with_output().map_err(|e| format!("openssl: {e}"))?;
    if !output.status.success() {
        return Err(format!("openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr)));
    }
    Ok(output.stdout)
}

fn base64url(bytes: &[u8]) -> String {
    base64_simd::URL_SAFE_NO_PAD.encode_to_string(bytes)
}

/// The JWKS with the public half of `key` (RS256).
fn jwks(key: &Path) -> Result<String, String> {
    let out = openssl(&["rsa", "-noout", "-modulus", "-in"], Some(key), None)?;
    let text = String::from_utf8_lossy(&out);
    let hex = text
        .trim()
        .strip_prefix("Modulus=")
        .ok_or_else(|| format!("openssl rsa -modulus said {text:?}"))?;
    let modulus: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("modulus {hex:?}: {e}"))?;
    let jwks = json!({"keys": [{
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": KEY_ID,
        "n": base64url(&modulus),
        "e": base64url(&65537u32.to_be_bytes()[1..]),
    }]});
    Ok(jwks.to_string())
}

/// Serves `/jwks.json` on a free loopback port for as long as the runtime runs.
async fn serve_jwks(jwks: String) -> Result<std::net::SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("JWKS listener: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("JWKS: {e}"))?;
    let app = Router::new().route(
        "/jwks.json",
        get(move || async move { ([(header::CONTENT_TYPE, "application/json")], jwks) }),
    );
    // The socket is bound already, so hfs's first fetch cannot come too early.
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// An RS256 JWT that hfs accepts: `iss` is the JWKS origin, `aud` the server's base URL.
fn mint_jwt(key: &Path, issuer: &str, audience: &str, scope: &str) -> Result<String, String> {
    let now =
        SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| format!("clock: {e}"))?.as_secs();
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": KEY_ID});
    let claims = json!({
        "iss": issuer, "aud": audience, "sub": "fhirfs-interop",
        "iat": now, "nbf": now - 5, "exp": now + TOKEN_TTL.as_secs(), "scope": scope,
    });
    let signing_input = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    );
    // `dgst -sign` with an RSA key is PKCS#1 v1.5 over SHA-256: exactly RS256.
    let signature =
        openssl(&["dgst", "-sha256", "-sign"], Some(key), Some(signing_input.as_bytes()))?;
    Ok(format!("{signing_input}.{}", base64url(&signature)))
}

// ---------------------------------------------------------------------------------------------
// A counting proxy.

/// Requests that went through a [`Proxy`], counted by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    /// `GET Binary?...` (cursor pages included).
    pub searches: u64,
    /// `GET Binary/_history?...` (the refreshes by what changed).
    pub histories: u64,
    /// Reads of a Binary answered with content (2xx), per id.
    pub content_reads: BTreeMap<String, u64>,
    /// Reads of a Binary answered 304 Not Modified.
    pub not_modified: u64,
    /// Anything else.
    pub other: u64,
}

impl ProxyCounts {
    /// All reads answered with content.
    pub fn content_read_total(&self) -> u64 {
        self.content_reads.values().sum()
    }
}

struct ProxyState {
    client: reqwest::Client,
    /// `scheme://host:port` of the server.
    upstream_origin: String,
    /// `http://127.0.0.1:port` of the proxy.
    own_origin: String,
    /// The base URL's path, e.g. `/fhir` (empty for a server at the root).
    base_path: String,
    counts: Mutex<ProxyCounts>,
}

/// A loopback HTTP proxy in front of the FHIR server that counts what a mount asks for. It
/// forwards requests as they are (token included) and rewrites the server's origin in JSON
/// bodies to its own, so that `next` links lead back through it.
pub struct Proxy {
    /// The base URL to give the mount.
    pub base: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    fn start(runtime: &Runtime, upstream_base: &str) -> Proxy {
        let url = url::Url::parse(upstream_base).expect("base URL");
        let upstream_origin = url.origin().ascii_serialization();
        let base_path = url.path().trim_end_matches('/').to_owned();
        let client = reqwest::Client::builder().timeout(HTTP_TIMEOUT).build().expect("HTTP client");
        runtime.block_on(async move {
            let listener =
                tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("proxy listener");
            let own_origin = format!("http://{}", listener.local_addr().expect("addr"));
            let state = Arc::new(ProxyState {
                client,
                upstream_origin,
                own_origin: own_origin.clone(),
                base_path: base_path.clone(),
                counts: Mutex::default(),
            });
            let app = Router::new().fallback(forward).with_state(Arc::clone(&state));
            tokio::spawn(async move { axum::serve(listener, app).await });
            Proxy { base: format!("{own_origin}{base_path}"), state }
        })
    }

    /// What went through so far.
    pub fn counts(&self) -> ProxyCounts {
        self.state.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn forward(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let path = request.uri().path().to_owned();
    let mut upstream = state
        .client
        .request(request.method().clone(), format!("{}{path_and_query}", state.upstream_origin));
    for (name, value) in request.headers() {
        if name != header::HOST && name != header::CONTENT_LENGTH {
            upstream = upstream.header(name, value);
        }
    }
    // The mount only sends GETs, without bodies.
    let response = match upstream.send().await {
        Ok(response) => response,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    {
        let mut counts = state.counts.lock().unwrap_or_else(|e| e.into_inner());
        let relative = path.strip_prefix(&state.base_path).unwrap_or(&path).trim_start_matches('/');
        match relative.strip_prefix("Binary") {
            Some("") => counts.searches += 1,
            Some("/_history") => counts.histories += 1,
            Some(rest) if rest.starts_with('/') => {
                let id = rest.trim_start_matches('/').split('/').next().unwrap_or("");
                if status == StatusCode::NOT_MODIFIED {
                    counts.not_modified += 1;
                } else if status.is_success() {
                    *counts.content_reads.entry(id.to_owned()).or_default() += 1;
                } else {
                    counts.other += 1;
                }
            }
            _ => counts.other += 1,
        }
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("json"));
    let body = if is_json {
        let text = String::from_utf8_lossy(&body);
        Body::from(text.replace(&state.upstream_origin, &state.own_origin))
    } else {
        Body::from(body)
    };
    let mut out = Response::builder().status(status);
    for (name, value) in &headers {
        // The body may have changed length; hyper sets these itself.
        if name != header::CONTENT_LENGTH
            && name != header::TRANSFER_ENCODING
            && name != header::CONNECTION
        {
            out = out.header(name, value);
        }
    }
    out.body(body).unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e.to_string()).into_response())
}
