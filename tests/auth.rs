//! Tokens through a real mount: SMART Backend Services against an in-process token endpoint
//! that verifies the signed assertion, token-file rotation, renew-once after a 401, and the
//! token staying with the base URL's origin.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use common::{Mount, Server, errno};
use fhirfs::PROBE_ID;

use fhirfs_testserver::loopback::{Fault, LoopbackServer, Quirks};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

const CLIENT_ID: &str = "fhirfs-backend";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A token endpoint that checks every assertion like a real authorization server would.
struct TokenEndpoint {
    url: String,
    issued: Arc<Mutex<Vec<String>>>,
}

struct EndpointState {
    fhir: LoopbackServer,
    decoding: DecodingKey,
    algorithm: Algorithm,
    audience: String,
    lifetime: u64,
    jtis: Mutex<HashSet<String>>,
    issued: Arc<Mutex<Vec<String>>>,
}

async fn token(State(state): State<Arc<EndpointState>>, body: String) -> impl IntoResponse {
    let form: Vec<(String, String)> =
        url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let refuse = |why: &str| (StatusCode::BAD_REQUEST, format!("{{\"error\":\"{why}\"}}"));
    if field("grant_type") != Some("client_credentials")
        || field("client_assertion_type")
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return refuse("unsupported_grant_type");
    }
    let Some(jwt) = field("client_assertion") else { return refuse("invalid_request") };
    let mut validation = Validation::new(state.algorithm);
    validation.set_audience(&[&state.audience]);
    validation.set_issuer(&[CLIENT_ID]);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let Ok(data) = jsonwebtoken::decode::<serde_json::Value>(jwt, &state.decoding, &validation)
    else {
        return refuse("invalid_client");
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let exp = data.claims["exp"].as_u64().unwrap_or(0);
    let jti = data.claims["jti"].as_str().unwrap_or_default().to_owned();
    if data.claims["sub"] != CLIENT_ID
        || exp > now + 300
        || jti.is_empty()
        || !state.jtis.lock().unwrap().insert(jti)
    {
        return refuse("invalid_client");
    }
    let mut issued = state.issued.lock().unwrap();
    let token = format!("smart-token-{}", issued.len() + 1);
    issued.push(token.clone());
    // Only the newest token opens the FHIR server, so an old one fails with 401.
    state.fhir.set_token(Some(&token));
    let body = serde_json::json!({
        "access_token": token, "token_type": "bearer", "expires_in": state.lifetime,
        "scope": "system/Binary.read",
    });
    (StatusCode::OK, body.to_string())
}

impl TokenEndpoint {
    fn start(server: &Server, public_key: &str, algorithm: Algorithm, lifetime: u64) -> Self {
        let pem = std::fs::read(fixture(public_key)).unwrap();
        let decoding = match algorithm {
            Algorithm::RS384 => DecodingKey::from_rsa_pem(&pem).unwrap(),
            _ => DecodingKey::from_ec_pem(&pem).unwrap(),
        };
        let issued = Arc::new(Mutex::new(Vec::new()));
        let listener =
            server.runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let state = Arc::new(EndpointState {
            fhir: server.server.clone(),
            decoding,
            algorithm,
            audience: url.clone(),
            lifetime,
            jtis: Mutex::default(),
            issued: Arc::clone(&issued),
        });
        // Also the SMART configuration, as a FHIR base at `/fhir` would publish it.
        let configuration = serde_json::json!({
            "token_endpoint": url.clone(),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        })
        .to_string();
        let app = axum::Router::new()
            .route("/token", post(token))
            .route(
                "/fhir/.well-known/smart-configuration",
                get(move || async move { ([("content-type", "application/json")], configuration) }),
            )
            .with_state(state);
        server.runtime.spawn(async move { axum::serve(listener, app).await });
        TokenEndpoint { url, issued }
    }

    fn issued(&self) -> usize {
        self.issued.lock().unwrap().len()
    }
}

fn smart_mount(server: &Server, endpoint: &TokenEndpoint, key: &str) -> Mount {
    Mount::builder()
        .arg("--smart-client-id")
        .arg(CLIENT_ID)
        .arg("--smart-key")
        .arg(&fixture(key))
        .arg("--smart-token-url")
        .arg(&endpoint.url)
        .mount(&server.base_url())
}

#[test]
fn smart_backend_services_with_rs384_reads_files() {
    let server = Server::start();
    server.server.set_token(Some("nobody-has-this-yet"));
    server.server.put("a", "text/plain", "via SMART");
    let endpoint = TokenEndpoint::start(&server, "smart-rs384.pub.pem", Algorithm::RS384, 300);
    let mount = smart_mount(&server, &endpoint, "smart-rs384.key.pem");
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"via SMART");
    assert_eq!(std::fs::read_dir(&mount.mountpoint).unwrap().count(), 1);
    assert_eq!(endpoint.issued(), 1, "one token serves many requests");
    assert!(!mount.log().contains("smart-token-1"), "tokens never reach the log");
}

#[test]
fn smart_tokens_are_renewed_before_they_expire() {
    let server = Server::start();
    server.server.set_token(Some("nobody-has-this-yet"));
    server.server.put("a", "text/plain", "first");
    server.server.put("b", "text/plain", "second");
    let endpoint = TokenEndpoint::start(&server, "smart-es384.pub.pem", Algorithm::ES384, 2);
    let mount = smart_mount(&server, &endpoint, "smart-es384.key.pem");
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"first");
    assert_eq!(endpoint.issued(), 1);
    // The token lives 2 s and is renewed in its last fifth: wait past that point.
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(std::fs::read(mount.path("b")).unwrap(), b"second");
    assert_eq!(endpoint.issued(), 2);
    assert_eq!(server.reads_of("b"), 1, "renewed ahead: no 401 and no second try");
}

#[test]
fn after_a_401_the_smart_token_is_renewed_once() {
    let server = Server::start();
    server.server.set_token(Some("nobody-has-this-yet"));
    server.server.put("a", "text/plain", "x");
    server.server.put("b", "text/plain", "y");
    let endpoint = TokenEndpoint::start(&server, "smart-rs384.pub.pem", Algorithm::RS384, 300);
    let mount = smart_mount(&server, &endpoint, "smart-rs384.key.pem");
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"x");
    // The start-up check reads with the token too: done before the token is revoked.
    server.wait_for_probe();
    server.server.set_token(Some("revoked-everything"));
    assert_eq!(std::fs::read(mount.path("b")).unwrap(), b"y");
    assert_eq!(endpoint.issued(), 2);
    assert_eq!(server.reads_of("b"), 2, "one 401, one retry");
}

#[test]
fn a_smart_client_the_server_refuses_gets_eacces() {
    let server = Server::start();
    server.server.set_token(Some("nobody-has-this-yet"));
    server.server.put("a", "text/plain", "x");
    // The endpoint expects the RSA key; the mount signs with the EC one.
    let endpoint = TokenEndpoint::start(&server, "smart-rs384.pub.pem", Algorithm::RS384, 300);
    let mount = smart_mount(&server, &endpoint, "smart-es384.key.pem");
    assert_eq!(errno(std::fs::read(mount.path("a")).unwrap_err()), libc::EACCES);
    assert_eq!(endpoint.issued(), 0);
}

#[test]
fn a_rotated_token_file_is_picked_up_without_a_remount() {
    let server = Server::start();
    server.server.set_token(Some("token-one"));
    // No listing, so no size read-ahead: each read below is one fetch at that moment.
    server.server.set_search_status(Some(400));
    for id in ["a", "b", "c"] {
        server.server.put(id, "text/plain", id);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "token-one\n").unwrap();
    let mount =
        Mount::builder().arg("--token-file").arg(file.to_str().unwrap()).mount(&server.base_url());
    assert_eq!(std::fs::read(mount.path("a")).unwrap(), b"a");

    // A sidecar writes a new token and the server switches to it.
    std::fs::write(&file, "token-two\n").unwrap();
    server.server.set_token(Some("token-two"));
    assert_eq!(std::fs::read(mount.path("b")).unwrap(), b"b");

    // The server moves on but the file does not: one renewal, one retry, then EACCES.
    server.server.set_token(Some("token-three"));
    assert_eq!(errno(std::fs::read(mount.path("c")).unwrap_err()), libc::EACCES);
    assert_eq!(server.reads_of("c"), 1, "the same token is not retried");
    assert!(!mount.log().contains("token-two"));
}

/// The warning lines about the token that the start-up check gives, once it is done.
fn token_warnings(mount: &Mount) -> Vec<String> {
    mount.wait_log_lines("the server answers", 1);
    let log = mount.log();
    log.lines()
        .filter(|l| l.contains(" WARN ") && l.contains("EACCES"))
        .map(str::to_owned)
        .collect()
}

/// The start-up check reads a Binary that cannot exist, with the token: a token the server
/// refuses is reported in one warning line that names the cause (never the token), and the
/// mount goes up anyway. `/metadata` would not tell: it needs no login here, as on Medplum.
#[test]
fn a_token_the_server_refuses_is_reported_at_start() {
    let server = Server::start();
    server.server.set_quirks(Quirks::Medplum);
    server.server.set_token(Some("the-right-token"));
    server.server.put("a", "text/plain", "x");
    for (token, cause) in [(Some("a-wrong-token"), "refuses the token"), (None, "no token")] {
        let mut builder = Mount::builder();
        if let Some(token) = token {
            builder = builder.env("FHIRFS_TOKEN", token);
        }
        let mount = builder.mount(&server.base_url());
        let warnings = token_warnings(&mount);
        assert_eq!(warnings.len(), 1, "{token:?}: one warning\n{}", mount.log());
        assert!(warnings[0].contains(cause) && warnings[0].contains("401"), "{}", warnings[0]);
        assert!(!mount.log().contains("a-wrong-token"), "the token reached the log");
        assert!(common::is_mounted(&mount.mountpoint));
        assert_eq!(errno(std::fs::read(mount.path("a")).unwrap_err()), libc::EACCES);
    }
}

#[test]
fn a_token_without_binary_access_is_reported_at_start() {
    let server = Server::start();
    server.server.put("a", "text/plain", "x");
    // As HFS answers a token without Binary scope.
    server.server.set_fault(PROBE_ID, Some(Fault::Status(403)));
    let mount = Mount::builder().env("FHIRFS_TOKEN", "narrow-scope").mount(&server.base_url());
    let warnings = token_warnings(&mount);
    assert_eq!(warnings.len(), 1, "one warning\n{}", mount.log());
    assert!(warnings[0].contains("403") && warnings[0].contains("scope"), "{}", warnings[0]);
    assert!(!mount.log().contains("narrow-scope"), "the token reached the log");
}

#[test]
fn a_token_the_server_takes_gives_no_warning_at_start() {
    let server = Server::start();
    server.server.set_quirks(Quirks::Medplum);
    server.server.set_token(Some("the-right-token"));
    let mount = Mount::builder().env("FHIRFS_TOKEN", "the-right-token").mount(&server.base_url());
    assert_eq!(token_warnings(&mount), Vec::<String>::new());
    let counts = server.server.counts();
    assert_eq!((counts.probes, counts.reads), (1, 0), "one check, no read: {counts:?}");
}

#[test]
fn the_token_never_goes_to_another_origin() {
    let server = Server::start();
    // Origin A lists one Binary and links its next page to origin B.
    let seen_by_b: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let listener_b = server.runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let origin_b = format!("http://{}", listener_b.local_addr().unwrap());
    let listener_a = server.runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let origin_a = format!("http://{}", listener_a.local_addr().unwrap());
    let bundle = |id: &str, next: Option<String>| {
        let mut links = vec![serde_json::json!({"relation": "self", "url": "x"})];
        if let Some(next) = next {
            links.push(serde_json::json!({"relation": "next", "url": next}));
        }
        serde_json::json!({"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"resource": {"resourceType": "Binary", "id": id, "contentType": "text/plain",
                "data": "aGk="}}]})
        .to_string()
    };
    let page_a = bundle("on-a", Some(format!("{origin_b}/fhir/Binary?page=2")));
    let page_b = bundle("on-b", None);
    let app_a = axum::Router::new().route(
        "/fhir/Binary",
        get(move || async move { ([("content-type", "application/fhir+json")], page_a) }),
    );
    let seen = Arc::clone(&seen_by_b);
    let app_b = axum::Router::new().route(
        "/fhir/Binary",
        get(move |headers: HeaderMap| async move {
            let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
            seen.lock().unwrap().push(auth);
            ([("content-type", "application/fhir+json")], page_b)
        }),
    );
    server.runtime.spawn(async move { axum::serve(listener_a, app_a).await });
    server.runtime.spawn(async move { axum::serve(listener_b, app_b).await });

    let mount = Mount::builder()
        .env("FHIRFS_TOKEN", "for-origin-a-only")
        .mount(&format!("{origin_a}/fhir"));
    let mut names: Vec<_> = std::fs::read_dir(&mount.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["on-a", "on-b"]);
    assert_eq!(seen_by_b.lock().unwrap().as_slice(), [None], "origin B saw no token");
}

#[test]
fn the_token_endpoint_is_discovered_from_the_smart_configuration() {
    use fhirfs::{SmartClient, SmartConfig};
    let server = Server::start();
    let endpoint = TokenEndpoint::start(&server, "smart-es384.pub.pem", Algorithm::ES384, 300);
    let base = url::Url::parse(&endpoint.url.replace("/token", "/fhir")).unwrap();
    let client = SmartClient::new(SmartConfig {
        client_id: CLIENT_ID.into(),
        key_pem: std::fs::read(fixture("smart-es384.key.pem")).unwrap(),
        token_url: None,
        scope: "system/Binary.read".into(),
        kid: None,
    })
    .unwrap();
    let http = reqwest::Client::new();
    let issued = server.runtime.block_on(client.issue(&http, &base)).unwrap();
    assert_eq!(issued.token, fhirfs::Secret::new("smart-token-1").unwrap());
    assert_eq!(issued.lifetime, Some(Duration::from_secs(300)));
    // The assertion's audience was the discovered endpoint (the endpoint checks `aud`).
    assert_eq!(endpoint.issued(), 1);
}
