//! An in-memory FHIR server for `Binary` resources on 127.0.0.1, used by tests and the demo.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use tokio::sync::watch;

const FHIR_JSON: &str = "application/fhir+json";
const DEFAULT_COUNT: usize = 20;
const DEFAULT_PAGE_CAP: usize = 50;
const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
const INSTANT: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// A handle to a running server; cheap to clone (Arc inside). Stops when the runtime stops.
#[derive(Clone)]
pub struct LoopbackServer {
    inner: Arc<Inner>,
}

/// The stored state of one Binary.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// The Binary's `contentType`.
    pub content_type: String,
    /// The decoded content.
    pub bytes: Bytes,
    /// `meta.versionId`: "1" after the first put, then "2", "3"...
    pub version_id: String,
    /// `meta.lastUpdated`, truncated to milliseconds.
    pub last_updated: SystemTime,
}

/// Request counters. Every request is counted on arrival, whatever it is answered.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// `GET /Binary?...` requests, cursor pages included.
    pub searches: u64,
    /// All `GET /Binary/{id}` requests, 304s, 401s and errors included.
    pub reads: u64,
    /// Reads answered 304 Not Modified.
    pub not_modified: u64,
    /// Reads per id.
    pub per_id: BTreeMap<String, u64>,
}

/// Releases held requests when `release()` is called or when dropped.
pub struct Gate {
    open: watch::Sender<bool>,
}

impl Gate {
    /// Lets every request waiting on this gate, and any later one, go on.
    pub fn release(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.release();
    }
}

/// A misbehaviour injected on reads of one id.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status with an OperationOutcome body.
    Status(u16),
    /// Answer 200 with this Content-Type and body verbatim (malformed JSON, wrong resourceType,
    /// bad base64...).
    Body {
        /// The `Content-Type` header to send.
        content_type: String,
        /// The body to send.
        body: Bytes,
    },
    /// Serve the Binary raw (body = the bytes, Content-Type = its contentType), whatever the
    /// Accept.
    Raw,
}

struct Inner {
    addr: SocketAddr,
    state: Mutex<ServerState>,
    counts: watch::Sender<Counts>,
}

#[derive(Default)]
struct ServerState {
    binaries: BTreeMap<String, Entry>,
    token: Option<String>,
    faults: HashMap<String, Fault>,
    holds: HashMap<String, watch::Receiver<bool>>,
    search_status: Option<u16>,
    page_cap: usize,
    listing_data: bool,
    cursors: HashMap<String, Page>,
    cursor_keys: RandomState,
    cursor_seq: u64,
}

/// One id's history: the last version number given, and the content unless deleted.
#[derive(Default)]
struct Entry {
    version: u64,
    live: Option<Stored>,
}

/// What a search page covers; cursors map to one of these.
#[derive(Clone)]
struct Page {
    offset: usize,
    count: usize,
    subsetted: bool,
    ids: Option<Vec<String>>,
}

impl LoopbackServer {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime (tokio::spawn).
    pub async fn start() -> std::io::Result<LoopbackServer> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let state = ServerState { page_cap: DEFAULT_PAGE_CAP, ..ServerState::default() };
        let inner = Arc::new(Inner {
            addr: listener.local_addr()?,
            state: Mutex::new(state),
            counts: watch::Sender::new(Counts::default()),
        });
        let router = Router::new()
            .route("/fhir/Binary", get(search))
            .route("/fhir/Binary/{id}", get(read))
            .fallback(|uri: Uri| async move { outcome(404, &format!("no route for {uri}")) })
            .with_state(Arc::clone(&inner));
        tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, router).await {
                tracing::warn!(%err, "loopback FHIR server stopped");
            }
        });
        Ok(LoopbackServer { inner })
    }

    /// e.g. "http://127.0.0.1:41234/fhir" — the FHIR base has a path prefix "/fhir", no
    /// trailing slash.
    pub fn base_url(&self) -> String {
        self.inner.base_url()
    }

    /// Creates or replaces a Binary: versionId starts at "1" and increments on each put;
    /// lastUpdated = now, truncated to milliseconds.
    pub fn put(&self, id: &str, content_type: &str, bytes: impl Into<Bytes>) {
        let mut state = self.inner.lock();
        let entry = state.binaries.entry(id.to_owned()).or_default();
        entry.version += 1;
        entry.live = Some(Stored {
            content_type: content_type.to_owned(),
            bytes: bytes.into(),
            version_id: entry.version.to_string(),
            last_updated: now_millis(),
        });
    }

    /// Deletes: later reads answer 410, searches omit it.
    pub fn delete(&self, id: &str) {
        let mut state = self.inner.lock();
        state.binaries.entry(id.to_owned()).or_default().live = None;
    }

    /// The stored state of one Binary.
    pub fn stored(&self, id: &str) -> Option<Stored> {
        self.inner.lock().binaries.get(id)?.live.clone()
    }

    /// Ids in search order (sorted).
    pub fn ids(&self) -> Vec<String> {
        let state = self.inner.lock();
        state.live().map(|(id, _)| id.clone()).collect()
    }

    /// Require `Authorization: Bearer <token>` (None: no auth). Wrong/missing → 401 with
    /// `WWW-Authenticate: Bearer` and an OperationOutcome body.
    pub fn set_token(&self, token: Option<&str>) {
        self.inner.lock().token = token.map(str::to_owned);
    }

    /// Per-id fault injected on reads of that id (None clears).
    pub fn set_fault(&self, id: &str, fault: Option<Fault>) {
        let faults = &mut self.inner.lock().faults;
        match fault {
            Some(fault) => faults.insert(id.to_owned(), fault),
            None => faults.remove(id),
        };
    }

    /// Search answers this status (with an OperationOutcome) instead of a Bundle (None: normal).
    pub fn set_search_status(&self, status: Option<u16>) {
        self.inner.lock().search_status = status;
    }

    /// Largest page a search returns, whatever `_count` asks (default 50).
    pub fn set_page_cap(&self, cap: usize) {
        self.inner.lock().page_cap = cap;
    }

    /// When true, searches include `data` even if `_elements`/`_summary` ask to drop it
    /// (default false: honour `_elements`).
    pub fn set_listing_data(&self, include: bool) {
        self.inner.lock().listing_data = include;
    }

    /// Reads of `id` wait (after being counted) until the returned gate is released.
    pub fn hold(&self, id: &str) -> Gate {
        let (open, closed) = watch::channel(false);
        self.inner.lock().holds.insert(id.to_owned(), closed);
        Gate { open }
    }

    /// Request counters.
    pub fn counts(&self) -> Counts {
        self.inner.counts.borrow().clone()
    }

    /// Waits until at least `n` read requests for `id` have arrived (counted).
    pub async fn wait_for_reads(&self, id: &str, n: u64) {
        let mut counts = self.inner.counts.subscribe();
        // The sender lives as long as `self`, so this only returns once the condition holds.
        let _ = counts.wait_for(|c| c.per_id.get(id).is_some_and(|&reads| reads >= n)).await;
    }
}

/// A server with the demo's sample Binaries already stored.
pub async fn demo() -> std::io::Result<LoopbackServer> {
    let server = LoopbackServer::start().await?;
    let pdf: &'static [u8] = include_bytes!("../assets/demo/report.pdf");
    let png: &'static [u8] = include_bytes!("../assets/demo/scan.png");
    let txt: &'static [u8] = include_bytes!("../assets/demo/notes.txt");
    server.put("report-pdf", "application/pdf", pdf);
    server.put("scan-png", "image/png", png);
    server.put("notes-txt", "text/plain", txt);
    Ok(server)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn base_url(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    /// The 401 answer when a token is required and `headers` lack it.
    fn deny(&self, headers: &HeaderMap) -> Option<Response> {
        let state = self.lock();
        let token = state.token.as_ref()?;
        let given = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        if given.and_then(|v| v.strip_prefix(b"Bearer ")) == Some(token.as_bytes()) {
            return None;
        }
        let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
        Some((challenge, outcome(401, "missing or invalid bearer token")).into_response())
    }
}

impl ServerState {
    fn live(&self) -> impl Iterator<Item = (&String, &Stored)> {
        self.binaries.iter().filter_map(|(id, entry)| entry.live.as_ref().map(|s| (id, s)))
    }

    /// The page a search asks for: a stored cursor, or a new search from its parameters.
    fn page(&self, params: &[(String, String)]) -> Result<Page, String> {
        let param = |name| param(params, name);
        if let Some(cursor) = param("_cursor") {
            let page = self.cursors.get(cursor).cloned();
            return page.ok_or(format!("unknown cursor {cursor}"));
        }
        let count = match param("_count") {
            Some(v) => v.parse().map_err(|_| format!("invalid _count {v}"))?,
            None => DEFAULT_COUNT,
        };
        let no_data_element =
            param("_elements").is_some_and(|v| !v.split(',').any(|e| e.trim() == "data"));
        let summary = param("_summary").is_some_and(|v| matches!(v, "true" | "text"));
        let ids = param("_id").map(|v| v.split(',').map(|id| id.trim().to_owned()).collect());
        Ok(Page { offset: 0, count, subsetted: no_data_element || summary, ids })
    }

    /// Stores `page` under a new random-looking token.
    fn new_cursor(&mut self, page: Page) -> String {
        self.cursor_seq += 1;
        let token = format!("{:016x}", self.cursor_keys.hash_one(self.cursor_seq));
        self.cursors.insert(token.clone(), page);
        token
    }
}

/// `GET /fhir/Binary?...`: a searchset Bundle, paged through opaque cursors.
async fn search(
    State(inner): State<Arc<Inner>>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    inner.counts.send_modify(|c| c.searches += 1);
    if let Some(denied) = inner.deny(&headers) {
        return denied;
    }
    let base = inner.base_url();
    let mut state = inner.lock();
    if let Some(status) = state.search_status {
        return outcome(status, "search is not available");
    }
    let page = match state.page(&params) {
        Ok(page) => page,
        Err(msg) => return outcome(400, &msg),
    };
    let size = page.count.min(state.page_cap);
    let drop_data = page.subsetted && !state.listing_data;
    let matches: Vec<_> = state
        .live()
        .filter(|(id, _)| page.ids.as_ref().is_none_or(|ids| ids.contains(id)))
        .collect();
    let total = matches.len();
    let entries: Vec<Value> = matches
        .into_iter()
        .skip(page.offset)
        .take(size)
        .map(|(id, stored)| {
            json!({
                "fullUrl": format!("{base}/Binary/{id}"),
                "resource": binary_json(id, stored, drop_data),
                "search": {"mode": "match"},
            })
        })
        .collect();
    let mut links = vec![json!({"relation": "self", "url": format!("http://{}{uri}", inner.addr)})];
    let next = page.offset + entries.len();
    if size > 0 && next < total {
        let token = state.new_cursor(Page { offset: next, ..page });
        links.push(json!({"relation": "next", "url": format!("{base}/Binary?_cursor={token}")}));
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    });
    fhir_json(StatusCode::OK, &bundle)
}

/// `GET /fhir/Binary/{id}`: the JSON resource or the raw bytes, by Accept.
async fn read(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    inner.counts.send_modify(|c| {
        c.reads += 1;
        *c.per_id.entry(id.clone()).or_default() += 1;
    });
    let gate = inner.lock().holds.get(&id).cloned();
    if let Some(mut gate) = gate {
        // Released, or the gate was dropped: either way, go on.
        let _ = gate.wait_for(|open| *open).await;
    }
    if let Some(denied) = inner.deny(&headers) {
        return denied;
    }
    let (fault, entry) = {
        let state = inner.lock();
        let entry = state.binaries.get(&id).map(|entry| entry.live.clone());
        (state.faults.get(&id).cloned(), entry)
    };
    let force_raw = match fault {
        Some(Fault::Status(status)) => return outcome(status, &format!("injected fault on {id}")),
        Some(Fault::Body { content_type, body }) => {
            return ([(header::CONTENT_TYPE, content_type)], body).into_response();
        }
        Some(Fault::Raw) => true,
        None => false,
    };
    let stored = match entry {
        Some(Some(stored)) => stored,
        Some(None) => return outcome(410, &format!("Binary/{id} was deleted")),
        None => return outcome(404, &format!("Binary/{id} is not known")),
    };
    let etag = format!("W/\"{}\"", stored.version_id);
    let modified = httpdate::fmt_http_date(stored.last_updated);
    let validators = [(header::ETAG, etag.clone()), (header::LAST_MODIFIED, modified)];
    if if_none_match(&headers, &etag) {
        inner.counts.send_modify(|c| c.not_modified += 1);
        return (StatusCode::NOT_MODIFIED, validators).into_response();
    }
    if !force_raw && wants_json(&headers, &params) {
        let body = binary_json(&id, &stored, false).to_string();
        (validators, [(header::CONTENT_TYPE, FHIR_JSON)], body).into_response()
    } else {
        let content_type = [(header::CONTENT_TYPE, stored.content_type)];
        (validators, content_type, stored.bytes).into_response()
    }
}

/// Whether the client asked for the FHIR JSON form (the default when it names no type).
fn wants_json(headers: &HeaderMap, params: &[(String, String)]) -> bool {
    let json_type = |t: &str| matches!(t, "json" | FHIR_JSON | "application/json");
    if param(params, "_format").is_some_and(json_type) {
        return true;
    }
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    accept.trim().is_empty()
        || accept
            .split(',')
            .filter_map(|item| item.split(';').next())
            .any(|media| json_type(&media.trim().to_ascii_lowercase()))
}

/// The first value of query parameter `name`.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Whether `If-None-Match` names `etag` (weak comparison) or `*`.
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    let bare = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == "*" || bare(tag) == bare(etag))
}

/// The Binary resource as JSON; `subsetted` drops `data` and tags the resource SUBSETTED.
fn binary_json(id: &str, stored: &Stored, subsetted: bool) -> Value {
    let mut resource = json!({
        "resourceType": "Binary",
        "id": id,
        "meta": {
            "versionId": stored.version_id,
            "lastUpdated": instant(stored.last_updated),
        },
        "contentType": stored.content_type,
    });
    if subsetted {
        resource["meta"]["tag"] = json!([{"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]);
    } else if !stored.bytes.is_empty() {
        resource["data"] = base64_simd::STANDARD.encode_to_string(&stored.bytes).into();
    }
    resource
}

/// A FHIR error answer: `status` with a one-issue OperationOutcome.
fn outcome(status: u16, diagnostics: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match status.as_u16() {
        400 => "invalid",
        401 => "login",
        403 => "forbidden",
        404 => "not-found",
        410 => "deleted",
        429 => "throttled",
        _ => "exception",
    };
    let issue = json!({"severity": "error", "code": code, "diagnostics": diagnostics});
    let body = json!({"resourceType": "OperationOutcome", "issue": [issue]});
    fhir_json(status, &body)
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let content_type = [(header::CONTENT_TYPE, FHIR_JSON)];
    (status, content_type, body.to_string()).into_response()
}

/// A FHIR instant with milliseconds, e.g. `2026-11-27T19:07:36.123Z`.
fn instant(t: SystemTime) -> String {
    OffsetDateTime::from(t).format(INSTANT).unwrap_or_default()
}

fn now_millis() -> SystemTime {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH + Duration::new(since.as_secs(), since.subsec_millis() * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, Bytes) {
        let mut request = reqwest::Client::new().get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.bytes().await.unwrap())
    }

    async fn get_json(url: &str) -> Value {
        let (status, headers, body) = get(url, &[]).await;
        assert_eq!(status, 200, "{url}");
        assert_eq!(headers[header::CONTENT_TYPE], FHIR_JSON);
        serde_json::from_slice(&body).unwrap()
    }

    fn next_link(bundle: &Value) -> Option<String> {
        let links = bundle["link"].as_array().unwrap();
        let next = links.iter().find(|link| link["relation"] == "next")?;
        Some(next["url"].as_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn pages_through_opaque_next_links() {
        let server = LoopbackServer::start().await.unwrap();
        for i in 0..7 {
            server.put(&format!("b{i}"), "text/plain", format!("content {i}"));
        }
        server.set_page_cap(3);
        let base = server.base_url();
        let mut url = format!("{base}/Binary?_count=10&_elements=id,meta,contentType");
        let mut pages = Vec::new();
        loop {
            let bundle = get_json(&url).await;
            assert_eq!(bundle["type"], "searchset");
            pages.push(bundle["entry"].as_array().unwrap().clone());
            let Some(next) = next_link(&bundle) else {
                break;
            };
            assert!(next.starts_with(&format!("{base}/Binary?_cursor=")), "{next}");
            url = next;
        }
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
        let ids: Vec<_> = pages.iter().flatten().map(|e| e["resource"]["id"].clone()).collect();
        assert_eq!(ids, ["b0", "b1", "b2", "b3", "b4", "b5", "b6"]);
        let first = &pages[0][0];
        assert_eq!(first["fullUrl"], format!("{base}/Binary/b0"));
        assert!(first["resource"].get("data").is_none());
        assert_eq!(first["resource"]["meta"]["tag"][0]["code"], "SUBSETTED");
        assert_eq!(server.counts().searches, 3);

        server.set_listing_data(true);
        let bundle = get_json(&format!("{base}/Binary?_elements=id&_id=b1,b5")).await;
        let entries = bundle["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1]["resource"]["data"], "Y29udGVudCA1");

        let (status, _, _) = get(&format!("{base}/Binary?_cursor=3"), &[]).await;
        assert_eq!(status, 400);
        server.set_search_status(Some(400));
        let (status, _, body) = get(&format!("{base}/Binary"), &[]).await;
        assert_eq!(status, 400);
        assert!(String::from_utf8_lossy(&body).contains("OperationOutcome"));
    }

    #[tokio::test]
    async fn conditional_read_answers_304() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "hello");
        let url = format!("{}/Binary/a", server.base_url());
        let (status, headers, body) = get(&url, &[("accept", FHIR_JSON)]).await;
        assert_eq!(status, 200);
        assert_eq!(headers[header::ETAG], "W/\"1\"");
        assert!(headers.contains_key(header::LAST_MODIFIED));
        let resource: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(resource["data"], "aGVsbG8=");
        let last_updated = resource["meta"]["lastUpdated"].as_str().unwrap();
        assert_eq!((last_updated.len(), &last_updated[19..20]), (24, "."), "{last_updated}");

        let (status, headers, body) = get(&url, &[("if-none-match", "W/\"1\"")]).await;
        assert_eq!((status, body.len()), (304, 0));
        assert_eq!(headers[header::ETAG], "W/\"1\"");
        server.put("a", "text/plain", "hello again");
        let (status, headers, _) = get(&url, &[("if-none-match", "W/\"1\"")]).await;
        assert_eq!(status, 200);
        assert_eq!(headers[header::ETAG], "W/\"2\"");
        let counts = server.counts();
        assert_eq!((counts.reads, counts.not_modified, counts.per_id["a"]), (3, 1, 3));
    }

    #[tokio::test]
    async fn deleted_answers_410_and_leaves_searches() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        server.put("b", "text/plain", "b");
        server.delete("a");
        let base = server.base_url();
        assert_eq!(get(&format!("{base}/Binary/a"), &[]).await.0, 410);
        assert_eq!(get(&format!("{base}/Binary/zzz"), &[]).await.0, 404);
        assert_eq!(server.ids(), ["b"]);
        assert_eq!(server.stored("a"), None);
        let bundle = get_json(&format!("{base}/Binary")).await;
        assert_eq!(bundle["total"], 1);
        server.put("a", "text/plain", "back");
        assert_eq!(server.stored("a").unwrap().version_id, "2");
    }

    #[tokio::test]
    async fn token_required_answers_401() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        server.set_token(Some("s3cret"));
        let url = format!("{}/Binary/a", server.base_url());
        let (status, headers, body) = get(&url, &[("authorization", "Bearer wrong")]).await;
        assert_eq!(status, 401);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        let outcome: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(get(&url, &[]).await.0, 401);
        assert_eq!(get(&url, &[("authorization", "Bearer s3cret")]).await.0, 200);
        server.set_token(None);
        assert_eq!(get(&url, &[]).await.0, 200);
    }

    #[tokio::test]
    async fn held_reads_wait_for_the_gate() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        let gate = server.hold("a");
        let url = format!("{}/Binary/a", server.base_url());
        let spawn_read = |url: String| tokio::spawn(async move { get(&url, &[]).await.0 });
        let first = spawn_read(url.clone());
        let second = spawn_read(url);
        server.wait_for_reads("a", 2).await;
        assert_eq!(server.counts().reads, 2);
        assert!(!first.is_finished() && !second.is_finished());
        gate.release();
        assert_eq!(first.await.unwrap(), 200);
        assert_eq!(second.await.unwrap(), 200);
    }

    #[tokio::test]
    async fn other_accept_types_get_raw_bytes() {
        let server = demo().await.unwrap();
        assert_eq!(server.ids(), ["notes-txt", "report-pdf", "scan-png"]);
        let url = format!("{}/Binary/scan-png", server.base_url());
        let (status, headers, body) = get(&url, &[("accept", "*/*")]).await;
        assert_eq!(status, 200);
        assert_eq!(headers[header::CONTENT_TYPE], "image/png");
        assert_eq!(headers[header::ETAG], "W/\"1\"");
        assert_eq!(body, server.stored("scan-png").unwrap().bytes);
        let url = format!("{}/Binary/report-pdf", server.base_url());
        let (_, headers, body) = get(&url, &[("accept", "application/pdf")]).await;
        assert_eq!(headers[header::CONTENT_TYPE], "application/pdf");
        assert!(body.starts_with(b"%PDF-"));
        let (_, headers, _) = get(&format!("{url}?_format=json"), &[("accept", "*/*")]).await;
        assert_eq!(headers[header::CONTENT_TYPE], FHIR_JSON);
    }

    #[tokio::test]
    async fn faults_replace_the_answer() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        let url = format!("{}/Binary/a", server.base_url());
        server.set_fault("a", Some(Fault::Status(503)));
        assert_eq!(get(&url, &[]).await.0, 503);
        let body = Bytes::from_static(b"{\"resourceType\":\"Patient\"");
        let content_type = FHIR_JSON.to_owned();
        server.set_fault("a", Some(Fault::Body { content_type, body: body.clone() }));
        assert_eq!(get(&url, &[]).await.2, body);
        server.set_fault("a", Some(Fault::Raw));
        let (_, headers, body) = get(&url, &[("accept", FHIR_JSON)]).await;
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
        assert_eq!(body, "a");
        server.set_fault("a", None);
        let (_, headers, _) = get(&url, &[("accept", "application/json")]).await;
        assert_eq!(headers[header::CONTENT_TYPE], FHIR_JSON);
    }
}
