//! An in-memory FHIR server for `Binary` resources on 127.0.0.1, used by tests.
//!
//! By default it answers like a well-behaved server. For the hardening tests it can also
//! imitate the quirks of real servers ([`Quirks`], as FHIR-NOTES.md records them), and inject
//! faults: per id ([`Fault`]), on searches ([`SearchFault`]), at random ([`RandomFaults`]) or as
//! latency. Every request is counted ([`Counts`]) so tests can assert on what reached the server.
//! For the documents view it also serves DocumentReference, DiagnosticReport and presigned
//! storage (`documents`).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
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

use crate::PROBE_ID;
use crate::fhir::{
    FHIR_JSON, INSTANT, accept_starts_with_fhir_json, accepts_json, if_none_match, leaves_data_out,
    outcome_json, param, parse_instant, searchset, wants_json,
};

mod documents;

/// Page size when a search has no `_count` (HAPI's default).
const DEFAULT_COUNT: usize = 20;
/// Largest page by default, whatever `_count` asks (HAPI caps pages too).
const DEFAULT_PAGE_CAP: usize = 50;
/// Microsoft's fhir-server: default page size 10, and (here) never more.
const MICROSOFT_PAGE_SIZE: usize = 10;
/// Microsoft mode answers every fifth request 429, as a busy Azure FHIR service does.
const MICROSOFT_THROTTLE_EVERY: u64 = 5;
/// How long a broken body pauses after its first part, so that hyper flushes the headers and
/// that part before the body ends early or fails.
const FLUSH_PAUSE: Duration = Duration::from_millis(20);
/// Size of the made-up content sent by `Truncated`/`Reset` for an id that is not stored.
const FILLER_BYTES: usize = 4096;
const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
/// HAPI writes instants with an explicit offset.
const HAPI_INSTANT: &[BorrowedFormatItem<'_>] = format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3][offset_hour sign:mandatory]:[offset_minute]"
);

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
    /// `meta.versionId` as the current quirk mode names it: "1" after the first put, then
    /// "2", "3"... (Medplum mode: a UUID derived from the id and that number).
    pub version_id: String,
    /// `meta.lastUpdated`, truncated to milliseconds.
    pub last_updated: SystemTime,
}

/// Request counters. Every request is counted on arrival, whatever it is answered.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// `GET /Binary?...` requests, cursor pages included (also HAPI-style `GET [base]?_getpages`
    /// pages and `GET /Binary/_history`).
    pub searches: u64,
    /// All `GET /Binary/{id}` requests, 304s, 401s and errors included, but not summary reads.
    pub reads: u64,
    /// Reads answered 304 Not Modified.
    pub not_modified: u64,
    /// Reads per id.
    pub per_id: BTreeMap<String, u64>,
    /// `HEAD /Binary/{id}` requests (not counted in `reads`).
    pub heads: u64,
    /// Reads answered 200 with the Binary's native bytes.
    pub raw_reads: u64,
    /// Reads answered 200 with the Binary as FHIR JSON (injected bodies not included), not
    /// counting those that left `data` out.
    pub json_reads: u64,
    /// `GET /Binary/{id}` requests that leave `data` out (`_summary=true`, `_elements` without
    /// `data`), whatever their answer. Faults, holds and gates do not apply to them.
    pub summary_reads: u64,
    /// Answers to reads and searches by status, faults included. HEADs are not counted, nor
    /// requests that are never answered (`Fault::Hang`).
    pub statuses: BTreeMap<u16, u64>,
    /// Searches of DocumentReference and DiagnosticReport, pages included.
    pub document_searches: u64,
    /// Reads of one DocumentReference or DiagnosticReport.
    pub document_reads: u64,
    /// `GET /storage/{name}` requests (presigned storage).
    pub blob_reads: u64,
    /// Of those, the ones that carried an `Authorization` header (which must never happen:
    /// storage is another origin than the FHIR server's of a test).
    pub blob_reads_with_authorization: u64,
    /// fhirfs's start-up checks (reads of [`PROBE_ID`]), counted once answered, whatever the
    /// answer. They are in no other counter, and never throttled, so that a check made
    /// beside a test's own requests changes none of their counts.
    pub probes: u64,
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

/// What a body held by [`LoopbackServer::hold_body`] does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyGateState {
    Held,
    Release,
    Cut,
}

/// Lets a body held by [`LoopbackServer::hold_body`] go on: its rest, or the connection closed
/// short of its `Content-Length`. Dropped undecided, it releases.
pub struct BodyGate {
    state: watch::Sender<BodyGateState>,
}

impl BodyGate {
    /// Sends the rest of the body.
    pub fn release(&self) {
        self.state.send_replace(BodyGateState::Release);
    }

    /// Closes the connection without the rest of the body.
    pub fn cut(&self) {
        self.state.send_replace(BodyGateState::Cut);
    }
}

impl Drop for BodyGate {
    fn drop(&mut self) {
        self.state.send_if_modified(|state| {
            let held = *state == BodyGateState::Held;
            if held {
                *state = BodyGateState::Release;
            }
            held
        });
    }
}

/// A misbehaviour injected on reads (`GET`) of one id.
///
/// `HEAD` requests see only the answer-shaping faults (`Status`, `Body`, `Raw`); they neither
/// use up a counted fault nor get the transport faults.
#[derive(Clone, Debug, PartialEq)]
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
    /// The next `times` reads answer `status` (with an OperationOutcome) and the header
    /// `Retry-After: <retry_after>` (seconds, or an HTTP date); then reads work normally.
    RetryAfter {
        /// The status to answer, e.g. 429 or 503.
        status: u16,
        /// The `Retry-After` value, sent verbatim.
        retry_after: String,
        /// How many reads get this answer before the fault clears itself.
        times: u32,
    },
    /// The next `times` reads answer `status` (with an OperationOutcome); then reads work
    /// normally.
    FailTimes {
        /// The status to answer.
        status: u16,
        /// How many reads get this answer before the fault clears itself.
        times: u32,
    },
    /// 200 with the Binary's FHIR JSON, but only half of it: `Content-Length` promises the
    /// whole, then the connection closes.
    Truncated,
    /// 200 with the headers and half of the FHIR JSON (chunked, no `Content-Length`), then the
    /// connection is aborted mid-body.
    Reset,
    /// Never answers (until the server's runtime stops). Unlike [`LoopbackServer::hold`],
    /// nothing releases it.
    Hang,
    /// The content lives outside the resource, as Medplum keeps raw uploads: a read whose
    /// Accept starts with `application/fhir+json` gets the FHIR JSON without `data` (untagged),
    /// any other read gets this answer.
    WithoutData(RawAnswer),
}

/// What a read that does not ask for FHIR JSON gets under [`Fault::WithoutData`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawAnswer {
    /// The stored bytes with the Binary's contentType (the raw form works).
    Content,
    /// The FHIR JSON without `data` again: the server has no native form.
    Json,
    /// This status, with an OperationOutcome.
    Status(u16),
    /// 200 with the headers and half of a body, then the connection is aborted.
    Reset,
    /// Never answers.
    Hang,
}

/// A misbehaviour injected on searches (`GET /Binary?...` and its pages).
#[derive(Clone, Debug, PartialEq)]
pub enum SearchFault {
    /// Answer this status with an OperationOutcome.
    Status(u16),
    /// Answer 200 with a FHIR resource that is not a Bundle (a Binary).
    NotBundle,
    /// Answer 200 with an HTML page (`text/html`), as a proxy's login page would.
    Html,
    /// Page as usual, but the last page's `next` link points back to the first page.
    LoopingNext,
    /// Every page also carries a Patient entry and an OperationOutcome entry (search mode
    /// `outcome`) among the Binaries.
    NonBinaryEntries,
    /// The first `pages` search pages (counted from when this is set) as usual, then this
    /// status with an OperationOutcome: a listing that fails part-way.
    StatusAfter {
        /// Pages answered before the failures.
        pages: usize,
        /// The status of every page after them.
        status: u16,
    },
}

/// Faults drawn at random on reads (not searches, not HEAD), reproducible from the seed for a
/// given order of reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomFaults {
    /// The chance that one read gets a fault, from 0.0 to 1.0. A faulty read gets one of
    /// 500, 502, 503, 429 (with `Retry-After: 0`), `Fault::Truncated` or `Fault::Reset`, equally
    /// likely.
    pub probability: f64,
    /// Seed of the generator.
    pub seed: u64,
}

/// Which real server's habits to imitate (see FHIR-NOTES.md). `set_escaped_slashes` is
/// independent of these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quirks {
    /// Spec-following: FHIR JSON when Accept is absent or names a JSON type (or `_format=json`),
    /// else raw; `_cursor` next links; 304 on both paths.
    #[default]
    Standard,
    /// Medplum 5: every search on Binary is 400; raw bytes unless Accept *starts with*
    /// `application/fhir+json` (absent Accept, `application/json` and `*/*` get raw; `_format`
    /// is ignored); Binaries created with [`LoopbackServer::put_raw`] come back on the JSON
    /// path with neither `data` nor `url`, and raw as a chunked body without Content-Length;
    /// a Binary created as JSON without `data` ([`LoopbackServer::put`] of no bytes) has no
    /// stored file, so its raw read answers 500 ("File not found"); versionIds are UUIDs; 304
    /// only on the JSON path; 401 without `WWW-Authenticate`.
    Medplum,
    /// HAPI FHIR: raw bytes for a non-FHIR Accept; page size 20 by default, capped (50 unless
    /// `set_page_cap`); `next` links point at the base
    /// (`[base]?_getpages=..&_getpagesoffset=..&_count=..&_pretty=true&_bundletype=searchset`,
    /// answered pretty-printed); instants with a `+00:00` offset; no `Last-Modified` on raw
    /// answers.
    Hapi,
    /// Microsoft fhir-server: FHIR JSON only. A read whose Accept is present, not empty, and
    /// names none of `application/fhir+json`, `application/json`, `*/*` (media parameters
    /// ignored; `_format=json` also counts) answers 406 with an OperationOutcome. Pages hold at
    /// most 10 entries (also the default), `next` links carry a `ct` continuation token, and
    /// every fifth request (reads, HEADs and searches counted together from `set_quirks`)
    /// answers 429 with `Retry-After: 1` (see [`LoopbackServer::set_throttle`]).
    Microsoft,
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
    faults: HashMap<String, Armed>,
    holds: HashMap<String, watch::Receiver<bool>>,
    /// Search pages to answer before the rest wait on the gate ([`LoopbackServer::hold_searches_after`]).
    search_hold: Option<(usize, watch::Receiver<bool>)>,
    /// Search pages answered since the search fault was set.
    pages_served: usize,
    /// Ids whose next read stops after this many body bytes until its gate says how to go on.
    body_holds: HashMap<String, (usize, watch::Receiver<BodyGateState>)>,
    search_fault: Option<SearchFault>,
    page_cap: usize,
    listing_data: bool,
    /// Searches honour `_lastUpdated` (gt, ge, lt, le) and `_summary=count`.
    last_updated_search: bool,
    /// `Binary/_history?_since=` answers (else 404).
    history: bool,
    /// Searches list the Binaries in an order of their own, not by id.
    shuffled_listing: bool,
    cursors: HashMap<String, Page>,
    cursor_keys: RandomState,
    cursor_seq: u64,
    latency: Duration,
    quirks: Quirks,
    escaped_slashes: bool,
    /// Every n-th request answers 429 (None: never).
    throttle_every: Option<u64>,
    /// Requests since throttling was (re)configured.
    throttle_seq: u64,
    random: Option<Xorshift>,
    arrivals: HashMap<String, Vec<Instant>>,
    /// DocumentReference, DiagnosticReport and presigned storage.
    docs: documents::DocState,
}

/// One id's history: the last version number given, and the content unless deleted.
#[derive(Default)]
struct Entry {
    version: u64,
    live: Option<Item>,
    /// When it was deleted, while it is.
    deleted_at: Option<SystemTime>,
}

/// The live content of one id.
#[derive(Clone)]
struct Item {
    content_type: String,
    bytes: Bytes,
    last_updated: SystemTime,
    /// Created by a raw upload (`put_raw`): Medplum then keeps `data` out of the JSON form.
    raw: bool,
}

/// A fault and how many more reads it applies to (None: until cleared).
struct Armed {
    fault: Fault,
    left: Option<u32>,
}

/// What a search page covers; cursors map to one of these.
#[derive(Clone)]
struct Page {
    offset: usize,
    count: usize,
    subsetted: bool,
    ids: Option<Vec<String>>,
    /// The absolute URL of the search's first page (`LoopingNext` points back to it).
    first: String,
    /// The search's own parameters without paging ones (Microsoft's next links repeat them).
    query: Vec<(String, String)>,
    /// The cursor this page was reached by, if any.
    cursor: Option<String>,
}

/// A small xorshift64 generator: reproducible random faults without a new dependency.
struct Xorshift {
    state: u64,
    probability: f64,
}

impl Xorshift {
    fn new(faults: RandomFaults) -> Self {
        // Mixed once (splitmix64's finaliser) so that close seeds diverge; never zero.
        let mut z = faults.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self { state: if z == 0 { 1 } else { z }, probability: faults.probability }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// A fault for one read, or none.
    fn roll(&mut self) -> Option<Fault> {
        // 53 random bits as a fraction in [0, 1).
        let draw = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        if draw >= self.probability {
            return None;
        }
        Some(match self.next() % 6 {
            0 => Fault::Status(500),
            1 => Fault::Status(502),
            2 => Fault::Status(503),
            3 => Fault::RetryAfter { status: 429, retry_after: "0".into(), times: 1 },
            4 => Fault::Truncated,
            _ => Fault::Reset,
        })
    }
}

/// Which kind of request arrived, for counting.
#[derive(Clone, Copy)]
enum Arrival<'a> {
    Search,
    Read(&'a str),
    /// A read that leaves `data` out (`_summary=true`, `_elements` without `data`).
    Summary,
    Head,
    /// fhirfs's start-up check: counted once answered, never throttled.
    Probe,
}

/// How a read is answered, whatever its Accept says.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// By the Accept and the quirk mode.
    Negotiated,
    /// The native bytes.
    Raw,
    /// The FHIR JSON without `data` (untagged).
    JsonWithoutData,
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
            .route("/fhir", get(system))
            .route("/fhir/Binary", get(search))
            .route("/fhir/Binary/_history", get(type_history))
            .route("/fhir/Binary/{id}", get(read).head(head))
            .route("/fhir/{kind}", get(documents::document_search))
            .route("/fhir/{kind}/{id}", get(documents::document_read))
            .route("/storage/{name}", get(documents::blob))
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
        self.store(id, content_type, bytes.into(), false);
    }

    /// Like [`put`](Self::put), for a Binary "created raw" (uploaded as native bytes rather than
    /// as a FHIR resource). Only Medplum mode treats it differently: its JSON form has neither
    /// `data` nor `url`, and its raw form is chunked, without Content-Length.
    pub fn put_raw(&self, id: &str, content_type: &str, bytes: impl Into<Bytes>) {
        self.store(id, content_type, bytes.into(), true);
    }

    fn store(&self, id: &str, content_type: &str, bytes: Bytes, raw: bool) {
        let mut state = self.inner.lock();
        let entry = state.binaries.entry(id.to_owned()).or_default();
        entry.version += 1;
        entry.deleted_at = None;
        entry.live = Some(Item {
            content_type: content_type.to_owned(),
            bytes,
            last_updated: now_millis(),
            raw,
        });
    }

    /// Moves every stored time (`meta.lastUpdated`, deletions) `by` into the past, as if it
    /// all had happened that long ago: changes made after it are then the only recent ones.
    pub fn age(&self, by: Duration) {
        let mut state = self.inner.lock();
        for entry in state.binaries.values_mut() {
            if let Some(item) = entry.live.as_mut() {
                item.last_updated -= by;
            }
            if let Some(at) = entry.deleted_at.as_mut() {
                *at -= by;
            }
        }
    }

    /// Deletes: later reads answer 410, searches omit it.
    pub fn delete(&self, id: &str) {
        let mut state = self.inner.lock();
        let entry = state.binaries.entry(id.to_owned()).or_default();
        if entry.live.take().is_some() {
            entry.deleted_at = Some(now_millis());
        }
    }

    /// The stored state of one Binary.
    pub fn stored(&self, id: &str) -> Option<Stored> {
        let state = self.inner.lock();
        let entry = state.binaries.get(id)?;
        let item = entry.live.as_ref()?;
        Some(state.present(id, entry.version, item))
    }

    /// Ids in search order (sorted).
    pub fn ids(&self) -> Vec<String> {
        let state = self.inner.lock();
        state.live().map(|(id, _, _)| id.clone()).collect()
    }

    /// Require `Authorization: Bearer <token>` (None: no auth). Wrong/missing → 401 with
    /// `WWW-Authenticate: Bearer` (not in Medplum mode) and an OperationOutcome body.
    pub fn set_token(&self, token: Option<&str>) {
        self.inner.lock().token = token.map(str::to_owned);
    }

    /// Per-id fault injected on reads of that id (None clears). `RetryAfter` and `FailTimes`
    /// clear themselves after their `times` reads; the others stay until cleared.
    pub fn set_fault(&self, id: &str, fault: Option<Fault>) {
        let armed = fault.map(|fault| {
            let left = match fault {
                Fault::RetryAfter { times, .. } | Fault::FailTimes { times, .. } => Some(times),
                _ => None,
            };
            Armed { fault, left }
        });
        self.arm(id, armed);
    }

    /// Injects `fault` on the next `times` reads of `id` only, then reads work normally (for
    /// `RetryAfter`/`FailTimes`, this `times` replaces theirs). E.g. one `Reset`, then success.
    pub fn set_fault_times(&self, id: &str, fault: Fault, times: u32) {
        let armed = (times > 0).then_some(Armed { fault, left: Some(times) });
        self.arm(id, armed);
    }

    fn arm(&self, id: &str, armed: Option<Armed>) {
        let faults = &mut self.inner.lock().faults;
        match armed {
            Some(armed) => faults.insert(id.to_owned(), armed),
            None => faults.remove(id),
        };
    }

    /// Search answers this status (with an OperationOutcome) instead of a Bundle (None: normal).
    /// The same as `set_search_fault(status.map(SearchFault::Status))`.
    pub fn set_search_status(&self, status: Option<u16>) {
        self.set_search_fault(status.map(SearchFault::Status));
    }

    /// A fault on every search and search page (None: normal).
    pub fn set_search_fault(&self, fault: Option<SearchFault>) {
        let mut state = self.inner.lock();
        state.pages_served = 0;
        state.search_fault = fault;
    }

    /// Random faults on reads (None: off). Replaces the generator, so setting the same seed
    /// again replays the same faults.
    pub fn set_random_faults(&self, faults: Option<RandomFaults>) {
        self.inner.lock().random = faults.map(Xorshift::new);
    }

    /// Every request (search, read, HEAD) waits this long, after being counted, before it is
    /// answered. Default zero.
    pub fn set_latency(&self, latency: Duration) {
        self.inner.lock().latency = latency;
    }

    /// Imitate a real server's habits (default `Standard`). Also sets throttling: every fifth
    /// request for `Microsoft`, none otherwise (override with [`set_throttle`](Self::set_throttle)
    /// afterwards).
    pub fn set_quirks(&self, quirks: Quirks) {
        let mut state = self.inner.lock();
        state.quirks = quirks;
        state.throttle_every = (quirks == Quirks::Microsoft).then_some(MICROSOFT_THROTTLE_EVERY);
        state.throttle_seq = 0;
    }

    /// Every `n`-th request from now on (reads, HEADs and searches counted together) answers
    /// 429 with `Retry-After: 1` (None or 0: never).
    pub fn set_throttle(&self, every: Option<u64>) {
        let mut state = self.inner.lock();
        state.throttle_every = every.filter(|&n| n > 0);
        state.throttle_seq = 0;
    }

    /// When true, JSON bodies of Binaries and Bundles escape every `/` as `\/` (valid JSON, as
    /// PHP-style encoders write it); base64 `data` then needs unescaping before decoding.
    pub fn set_escaped_slashes(&self, escaped: bool) {
        self.inner.lock().escaped_slashes = escaped;
    }

    /// Largest page a search returns, whatever `_count` asks (default 50; Microsoft mode
    /// never exceeds 10).
    pub fn set_page_cap(&self, cap: usize) {
        self.inner.lock().page_cap = cap;
    }

    /// What the server offers to tell changes (default: neither, as servers that ignore
    /// `_lastUpdated` and have no type history): searches that honour `_lastUpdated` and
    /// `_summary=count`, and `Binary/_history?_since=` (one page, newest first, with DELETE
    /// entries; every match, whatever `_count` asks).
    pub fn set_change_feeds(&self, last_updated: bool, history: bool) {
        let mut state = self.inner.lock();
        state.last_updated_search = last_updated;
        state.history = history;
    }

    /// When true, searches and reads include `data` even if `_elements`/`_summary` ask to drop
    /// it, as a server that ignores them does (default false: honour them).
    pub fn set_listing_data(&self, include: bool) {
        self.inner.lock().listing_data = include;
    }

    /// When true, searches list the Binaries in a fixed order unrelated to their ids (by a
    /// hash), as servers that list by creation time or storage order do.
    pub fn set_shuffled_listing(&self, shuffled: bool) {
        self.inner.lock().shuffled_listing = shuffled;
    }

    /// After the next `pages` search requests, every search request waits (after being
    /// counted) until the returned gate is released: a listing whose later pages are slow.
    pub fn hold_searches_after(&self, pages: usize) -> Gate {
        let (open, closed) = watch::channel(false);
        self.inner.lock().search_hold = Some((pages, closed));
        Gate { open }
    }

    /// Reads of `id` wait (after being counted) until the returned gate is released.
    pub fn hold(&self, id: &str) -> Gate {
        let (open, closed) = watch::channel(false);
        self.inner.lock().holds.insert(id.to_owned(), closed);
        Gate { open }
    }

    /// The next read of `id` sends its headers (with the full `Content-Length`) and the first
    /// `after` bytes of its body, then waits for the returned gate: the rest, or a cut
    /// connection. Later reads are not held.
    pub fn hold_body(&self, id: &str, after: usize) -> BodyGate {
        let (state, held) = watch::channel(BodyGateState::Held);
        self.inner.lock().body_holds.insert(id.to_owned(), (after, held));
        BodyGate { state }
    }

    /// Request counters.
    pub fn counts(&self) -> Counts {
        self.inner.counts.borrow().clone()
    }

    /// When each read (GET) of `id` arrived, in order.
    pub fn read_arrivals(&self, id: &str) -> Vec<Instant> {
        self.inner.lock().arrivals.get(id).cloned().unwrap_or_default()
    }

    /// Waits until at least `n` read requests for `id` have arrived (counted).
    pub async fn wait_for_reads(&self, id: &str, n: u64) {
        self.wait_for_counts(|c| c.per_id.get(id).is_some_and(|&reads| reads >= n)).await;
    }

    /// Waits until `condition` holds for the counters (checked on every change).
    pub async fn wait_for_counts(&self, condition: impl FnMut(&Counts) -> bool) {
        let mut counts = self.inner.counts.subscribe();
        // The sender lives as long as `self`, so this only returns once the condition holds.
        let _ = counts.wait_for(condition).await;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn base_url(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    /// Waits at the gate of [`LoopbackServer::hold_searches_after`], once its pages are used up.
    async fn search_gate(&self) {
        let gate = {
            let mut state = self.lock();
            match &mut state.search_hold {
                Some((0, gate)) => Some(gate.clone()),
                Some((pages, _)) => {
                    *pages -= 1;
                    None
                }
                None => None,
            }
        };
        if let Some(mut gate) = gate {
            // The sender is the test's Gate, which opens when dropped.
            let _ = gate.wait_for(|&open| open).await;
        }
    }

    /// Counts a request, waits the configured latency, and tells whether throttling answers it.
    async fn arrive(&self, arrival: Arrival<'_>) -> bool {
        self.counts.send_modify(|c| match arrival {
            Arrival::Search => c.searches += 1,
            Arrival::Head => c.heads += 1,
            Arrival::Summary => c.summary_reads += 1,
            Arrival::Read(id) => {
                c.reads += 1;
                *c.per_id.entry(id.to_owned()).or_default() += 1;
            }
            Arrival::Probe => {}
        });
        let (latency, throttled) = {
            let mut state = self.lock();
            if let Arrival::Read(id) = arrival {
                let arrivals = state.arrivals.entry(id.to_owned()).or_default();
                arrivals.push(Instant::now());
            }
            // A start-up check beside a test's requests must not shift which one is throttled.
            let throttling = !matches!(arrival, Arrival::Probe);
            if throttling {
                state.throttle_seq += 1;
            }
            let seq = state.throttle_seq;
            let every = state.throttle_every.filter(|_| throttling);
            (state.latency, every.is_some_and(|n| seq.is_multiple_of(n)))
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        throttled
    }

    /// The answer that comes before any resource is looked at: throttling, then auth.
    fn gatekeep(&self, throttled: bool, headers: &HeaderMap) -> Option<Response> {
        if throttled {
            let response = outcome(429, "too many requests: slow down");
            return Some(with_retry_after(response, "1"));
        }
        self.deny(headers)
    }

    /// The 401 answer when a token is required and `headers` lack it.
    fn deny(&self, headers: &HeaderMap) -> Option<Response> {
        let state = self.lock();
        let token = state.token.as_ref()?;
        let given = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        if given.and_then(|v| v.strip_prefix(b"Bearer ")) == Some(token.as_bytes()) {
            return None;
        }
        let denied = outcome(401, "missing or invalid bearer token");
        if state.quirks == Quirks::Medplum {
            // Medplum sends no challenge.
            return Some(denied);
        }
        let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
        Some((challenge, denied).into_response())
    }

    /// Records the status of an answer to a read or search.
    fn answered(&self, response: Response) -> Response {
        let status = response.status().as_u16();
        self.counts.send_modify(|c| *c.statuses.entry(status).or_default() += 1);
        response
    }

    /// fhirfs's start-up check, a read of [`PROBE_ID`]: answered like any read of that id (the
    /// token is checked, a `Fault::Status` on it applies), but counted only in
    /// [`Counts::probes`] and never throttled, nor given random faults.
    async fn probe(&self, params: &[(String, String)], headers: &HeaderMap) -> Response {
        self.arrive(Arrival::Probe).await;
        let fault = self.lock().faults.get(PROBE_ID).map(|armed| armed.fault.clone());
        let response = match (self.deny(headers), fault) {
            (Some(refused), _) => refused,
            (None, Some(Fault::Status(status))) => injected(status, PROBE_ID),
            (None, _) => self.binary(PROBE_ID, params, headers, Shape::Negotiated, false),
        };
        self.counts.send_modify(|c| c.probes += 1);
        response
    }

    /// The answer to a read of `id` under `Fault::WithoutData`.
    async fn without_data(
        &self,
        id: &str,
        params: &[(String, String)],
        headers: &HeaderMap,
        raw: RawAnswer,
    ) -> Response {
        if accept_starts_with_fhir_json(headers) {
            return self.binary(id, params, headers, Shape::JsonWithoutData, true);
        }
        match raw {
            RawAnswer::Content => self.binary(id, params, headers, Shape::Raw, true),
            RawAnswer::Json => self.binary(id, params, headers, Shape::JsonWithoutData, true),
            RawAnswer::Status(status) => injected(status, id),
            RawAnswer::Reset => reset(self.json_text(id)),
            RawAnswer::Hang => std::future::pending().await,
        }
    }

    /// The fault for this read of `id`: the id's own (used up by one), else a random one.
    fn take_fault(&self, id: &str) -> Option<Fault> {
        let mut state = self.lock();
        if let Some(armed) = state.faults.get_mut(id) {
            let fault = armed.fault.clone();
            if let Some(left) = &mut armed.left {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    state.faults.remove(id);
                }
            }
            return Some(fault);
        }
        state.random.as_mut().and_then(Xorshift::roll)
    }

    /// The JSON text the FHIR read of `id` would send, for the broken-body faults.
    fn json_text(&self, id: &str) -> String {
        let state = self.lock();
        match state.binaries.get(id) {
            Some(Entry { version, live: Some(item), .. }) => {
                state.render(&state.binary_json(id, *version, item, Form::Full), false)
            }
            _ => {
                let data = base64_simd::STANDARD.encode_to_string([0x5a; FILLER_BYTES]);
                let resource = json!({
                    "resourceType": "Binary",
                    "id": id,
                    "contentType": "application/octet-stream",
                    "data": data,
                });
                resource.to_string()
            }
        }
    }

    /// The answer to a read of `id` that no transport fault replaced. `count` is false for
    /// HEAD, which is not a read.
    fn binary(
        &self,
        id: &str,
        params: &[(String, String)],
        headers: &HeaderMap,
        shape: Shape,
        count: bool,
    ) -> Response {
        let state = self.lock();
        let quirks = state.quirks;
        let (version, item) = match state.binaries.get(id) {
            Some(Entry { version, live: Some(item), .. }) => (*version, item),
            Some(_) => return outcome(410, &format!("Binary/{id} was deleted")),
            None => return outcome(404, &format!("Binary/{id} is not known")),
        };
        let json = match (shape, quirks) {
            (Shape::Raw, _) => false,
            (Shape::JsonWithoutData, _) => true,
            (Shape::Negotiated, Quirks::Standard | Quirks::Hapi) => wants_json(headers, params),
            (Shape::Negotiated, Quirks::Medplum) => accept_starts_with_fhir_json(headers),
            (Shape::Negotiated, Quirks::Microsoft) if accepts_json(headers, params, true) => true,
            (Shape::Negotiated, Quirks::Microsoft) => {
                return outcome(406, "this server only serves FHIR formats");
            }
        };
        let etag = format!("W/\"{}\"", state.version_id(id, version));
        let mut validators = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&etag) {
            validators.insert(header::ETAG, value);
        }
        // HAPI sends Last-Modified only with the FHIR form.
        if json || quirks != Quirks::Hapi {
            let modified = httpdate::fmt_http_date(item.last_updated);
            if let Ok(value) = HeaderValue::from_str(&modified) {
                validators.insert(header::LAST_MODIFIED, value);
            }
        }
        // Medplum only answers conditional reads on the FHIR path.
        if (json || quirks != Quirks::Medplum) && if_none_match(headers, &etag) {
            if count {
                self.counts.send_modify(|c| c.not_modified += 1);
            }
            return (StatusCode::NOT_MODIFIED, validators).into_response();
        }
        if json {
            if count {
                self.counts.send_modify(|c| c.json_reads += 1);
            }
            let subset = leaves_data_out(params) && !state.listing_data;
            let form = match quirks {
                _ if subset => Form::Subsetted,
                _ if shape == Shape::JsonWithoutData => Form::WithoutData,
                Quirks::Medplum if item.raw => Form::WithoutData,
                _ => Form::Full,
            };
            let pretty = param(params, "_pretty") == Some("true");
            let body = state.render(&state.binary_json(id, version, item, form), pretty);
            return (validators, [(header::CONTENT_TYPE, FHIR_JSON)], body).into_response();
        }
        if quirks == Quirks::Medplum && !item.raw && item.bytes.is_empty() {
            // Medplum stores no file for a Binary created as JSON without `data`.
            return outcome(500, "File not found");
        }
        if count {
            self.counts.send_modify(|c| c.raw_reads += 1);
        }
        let content_type = [(header::CONTENT_TYPE, item.content_type.clone())];
        let bytes = item.bytes.clone();
        if quirks == Quirks::Medplum && item.raw {
            // A stream has no known length: hyper sends it chunked, without Content-Length.
            let once = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes) });
            return (validators, content_type, Body::from_stream(once)).into_response();
        }
        (validators, content_type, bytes).into_response()
    }

    /// One page of a search, or the search fault's answer.
    fn search_page(&self, params: &[(String, String)], uri: &Uri) -> Response {
        let base = self.base_url();
        let mut state = self.lock();
        let quirks = state.quirks;
        if quirks == Quirks::Medplum {
            return outcome(400, "Binary is not searchable");
        }
        match &state.search_fault {
            Some(SearchFault::Status(status)) => {
                return outcome(*status, "search is not available");
            }
            Some(SearchFault::NotBundle) => {
                let resource = json!({
                    "resourceType": "Binary",
                    "id": "not-a-bundle",
                    "contentType": "text/plain",
                    "data": "bm90IGEgQnVuZGxl",
                });
                return fhir_json(StatusCode::OK, resource.to_string());
            }
            Some(SearchFault::StatusAfter { pages, status }) => {
                let (pages, status) = (*pages, *status);
                state.pages_served += 1;
                if state.pages_served > pages {
                    return outcome(status, "the search failed part-way");
                }
            }
            Some(SearchFault::Html) => {
                let page = "<!DOCTYPE html><html><head><title>Sign in</title></head>\
                            <body><form action=\"/login\">Sign in to continue</form></body></html>";
                return ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page)
                    .into_response();
            }
            _ => {}
        }
        let url = format!("http://{}{uri}", self.addr);
        let page = match state.page(params, &url) {
            Ok(page) => page,
            Err(msg) => return outcome(400, &msg),
        };
        let cap = match quirks {
            Quirks::Microsoft => state.page_cap.min(MICROSOFT_PAGE_SIZE),
            _ => state.page_cap,
        };
        let size = page.count.min(cap);
        let form = if page.subsetted && !state.listing_data { Form::Subsetted } else { Form::Full };
        let mut matches: Vec<_> = state
            .live()
            .filter(|(id, _, _)| page.ids.as_ref().is_none_or(|ids| ids.contains(id)))
            .collect();
        if state.shuffled_listing {
            // Stable across searches, unrelated to the ids' order (FNV-1a of the id).
            let key = |id: &str| {
                id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                })
            };
            matches.sort_by_key(|(id, _, _)| key(id));
        }
        if state.last_updated_search {
            let filter = param(&page.query, "_lastUpdated").map(last_updated_filter);
            match filter {
                Some(Ok(keep)) => matches.retain(|(_, _, item)| keep(item.last_updated)),
                Some(Err(msg)) => return outcome(400, &msg),
                None => {}
            }
            if param(&page.query, "_summary") == Some("count") {
                let bundle = searchset(matches.len(), &url, None);
                return fhir_json(StatusCode::OK, state.render(&bundle, false));
            }
        }
        let total = matches.len();
        let mut entries: Vec<Value> = matches
            .into_iter()
            .skip(page.offset)
            .take(size)
            .map(|(id, version, item)| {
                json!({
                    "fullUrl": format!("{base}/Binary/{id}"),
                    "resource": state.binary_json(id, version, item, form),
                    "search": {"mode": "match"},
                })
            })
            .collect();
        let next_offset = page.offset + entries.len();
        let looping = state.search_fault == Some(SearchFault::LoopingNext);
        let next = if size > 0 && next_offset < total {
            Some(state.next_link(&base, &page, next_offset, size))
        } else if looping {
            Some(page.first.clone())
        } else {
            None
        };
        if state.search_fault == Some(SearchFault::NonBinaryEntries) {
            entries.insert(0, patient_entry(&base));
            entries.push(outcome_entry());
        }
        let mut bundle = searchset(total, &url, next.as_deref());
        bundle["entry"] = entries.into();
        let pretty = param(params, "_pretty") == Some("true");
        fhir_json(StatusCode::OK, state.render(&bundle, pretty))
    }
}

/// How much of a Binary its JSON form carries.
#[derive(Clone, Copy, PartialEq)]
enum Form {
    /// With `data` (unless the content is empty).
    Full,
    /// Without `data`, tagged SUBSETTED (a search that asked for fewer elements).
    Subsetted,
    /// Without `data` and untagged, as Medplum answers for raw uploads.
    WithoutData,
}

impl ServerState {
    fn live(&self) -> impl Iterator<Item = (&String, u64, &Item)> {
        self.binaries
            .iter()
            .filter_map(|(id, entry)| entry.live.as_ref().map(|item| (id, entry.version, item)))
    }

    /// The versionId of version number `version` of `id`, as the current mode names it.
    fn version_id(&self, id: &str, version: u64) -> String {
        match self.quirks {
            Quirks::Medplum => uuid_of(id, version),
            _ => version.to_string(),
        }
    }

    fn present(&self, id: &str, version: u64, item: &Item) -> Stored {
        Stored {
            content_type: item.content_type.clone(),
            bytes: item.bytes.clone(),
            version_id: self.version_id(id, version),
            last_updated: item.last_updated,
        }
    }

    /// The Binary resource as JSON.
    fn binary_json(&self, id: &str, version: u64, item: &Item, form: Form) -> Value {
        let mut resource = json!({
            "resourceType": "Binary",
            "id": id,
            "meta": {
                "versionId": self.version_id(id, version),
                "lastUpdated": instant(item.last_updated, self.quirks),
            },
            "contentType": item.content_type,
        });
        match form {
            Form::Subsetted => {
                resource["meta"]["tag"] =
                    json!([{"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]);
            }
            Form::Full if !item.bytes.is_empty() => {
                resource["data"] = base64_simd::STANDARD.encode_to_string(&item.bytes).into();
            }
            Form::Full | Form::WithoutData => {}
        }
        resource
    }

    /// A Binary or Bundle as JSON text, pretty when asked, with `/` escaped when configured.
    fn render(&self, value: &Value, pretty: bool) -> String {
        let text = if pretty { format!("{value:#}") } else { value.to_string() };
        // `/` only occurs inside JSON strings, where `\/` is a valid escape for it.
        if self.escaped_slashes { text.replace('/', "\\/") } else { text }
    }

    /// The page a search asks for: a stored cursor, or a new search from its parameters.
    fn page(&self, params: &[(String, String)], url: &str) -> Result<Page, String> {
        let param = |name| param(params, name);
        // `_cursor` (standard), `ct` (Microsoft) and `_getpages` (HAPI) all name a cursor.
        let cursor = param("_cursor").or(param("ct")).or(param("_getpages"));
        if let Some(cursor) = cursor {
            let mut page =
                self.cursors.get(cursor).cloned().ok_or(format!("unknown cursor {cursor}"))?;
            page.cursor = Some(cursor.to_owned());
            // HAPI keeps one cursor per search; the offset and count travel in the link.
            if param("_getpages").is_some() {
                if let Some(v) = param("_getpagesoffset") {
                    page.offset = v.parse().map_err(|_| format!("invalid offset {v}"))?;
                }
                if let Some(v) = param("_count") {
                    page.count = v.parse().map_err(|_| format!("invalid _count {v}"))?;
                }
            }
            return Ok(page);
        }
        let count = match param("_count") {
            Some(v) => v.parse().map_err(|_| format!("invalid _count {v}"))?,
            None if self.quirks == Quirks::Microsoft => MICROSOFT_PAGE_SIZE,
            None => DEFAULT_COUNT,
        };
        let ids = param("_id").map(|v| v.split(',').map(|id| id.trim().to_owned()).collect());
        Ok(Page {
            offset: 0,
            count,
            subsetted: leaves_data_out(params),
            ids,
            first: url.to_owned(),
            query: params.to_vec(),
            cursor: None,
        })
    }

    /// The `next` link to the page at `offset`, in the current mode's style.
    fn next_link(&mut self, base: &str, page: &Page, offset: usize, size: usize) -> String {
        match self.quirks {
            Quirks::Hapi => {
                let token = match &page.cursor {
                    Some(token) => token.clone(),
                    None => self.new_cursor(page.clone()),
                };
                format!(
                    "{base}?_getpages={token}&_getpagesoffset={offset}&_count={size}\
                     &_pretty=true&_bundletype=searchset"
                )
            }
            Quirks::Microsoft => {
                let token = self.new_cursor(Page { offset, ..page.clone() });
                let query = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(page.query.iter().filter(|(k, _)| k != "ct"))
                    .append_pair("ct", &token)
                    .finish();
                format!("{base}/Binary?{query}")
            }
            Quirks::Standard | Quirks::Medplum => {
                let token = self.new_cursor(Page { offset, ..page.clone() });
                format!("{base}/Binary?_cursor={token}")
            }
        }
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
    let throttled = inner.arrive(Arrival::Search).await;
    inner.search_gate().await;
    let response = match inner.gatekeep(throttled, &headers) {
        Some(refused) => refused,
        None => inner.search_page(&params, &uri),
    };
    inner.answered(response)
}

/// `GET /fhir?_getpages=...`: the further pages of a search, as HAPI links them. The base
/// answers nothing else (no system-level search).
async fn system(
    State(inner): State<Arc<Inner>>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let throttled = inner.arrive(Arrival::Search).await;
    inner.search_gate().await;
    let response = match inner.gatekeep(throttled, &headers) {
        Some(refused) => refused,
        None if param(&params, "_getpages").is_some() => inner.search_page(&params, &uri),
        None => outcome(400, "system-level search is not supported"),
    };
    inner.answered(response)
}

/// `GET /fhir/Binary/_history`: unless [`LoopbackServer::set_change_feeds`] offers it, type
/// history is not offered (Medplum answers 404 too).
async fn type_history(
    State(inner): State<Arc<Inner>>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let throttled = inner.arrive(Arrival::Search).await;
    let response = match inner.gatekeep(throttled, &headers) {
        Some(refused) => refused,
        None => inner.history_page(&params, &uri),
    };
    inner.answered(response)
}

/// The `_lastUpdated` search parameter as a test of a time: `gt`, `ge`, `lt`, `le` or `eq`
/// (the default) and an instant.
fn last_updated_filter(value: &str) -> Result<Box<dyn Fn(SystemTime) -> bool>, String> {
    let (prefix, text) = match value.get(..2) {
        Some(p @ ("gt" | "ge" | "lt" | "le" | "eq")) => (p, &value[2..]),
        _ => ("eq", value),
    };
    let at = parse_instant(text).ok_or_else(|| format!("invalid _lastUpdated {value}"))?;
    Ok(match prefix {
        "gt" => Box::new(move |t| t > at),
        "ge" => Box::new(move |t| t >= at),
        "lt" => Box::new(move |t| t < at),
        "le" => Box::new(move |t| t <= at),
        _ => Box::new(move |t| t == at),
    })
}

impl Inner {
    /// `Binary/_history?_since=`: the newest version of every Binary changed at or after
    /// `_since`, and a DELETE entry for every one deleted since, newest first, in one page.
    fn history_page(&self, params: &[(String, String)], uri: &Uri) -> Response {
        let base = self.base_url();
        let state = self.lock();
        if !state.history {
            return outcome(404, "Binary/_history is not supported");
        }
        let since = match param(params, "_since").map(parse_instant) {
            Some(Some(since)) => since,
            Some(None) => return outcome(400, "invalid _since"),
            None => UNIX_EPOCH,
        };
        let form = if leaves_data_out(params) && !state.listing_data {
            Form::Subsetted
        } else {
            Form::Full
        };
        let mut changes: Vec<(SystemTime, Value)> = Vec::new();
        for (id, entry) in &state.binaries {
            let request = |method: &str| json!({"method": method, "url": format!("Binary/{id}")});
            match (&entry.live, entry.deleted_at) {
                (Some(item), _) if item.last_updated >= since => changes.push((
                    item.last_updated,
                    json!({
                        "fullUrl": format!("{base}/Binary/{id}"),
                        "resource": state.binary_json(id, entry.version, item, form),
                        "request": request(if entry.version == 1 { "POST" } else { "PUT" }),
                        "response": {"status": "200"},
                    }),
                )),
                (None, Some(at)) if at >= since => changes.push((
                    at,
                    json!({"request": request("DELETE"), "response": {"status": "204"}}),
                )),
                _ => {}
            }
        }
        changes.sort_by_key(|c| std::cmp::Reverse(c.0));
        let url = format!("http://{}{uri}", self.addr);
        let mut bundle = searchset(changes.len(), &url, None);
        bundle["type"] = "history".into();
        bundle["entry"] = changes.into_iter().map(|(_, entry)| entry).collect::<Vec<_>>().into();
        fhir_json(StatusCode::OK, state.render(&bundle, false))
    }
}

/// `GET /fhir/Binary/{id}`: the JSON resource or the raw bytes, by Accept and quirk mode,
/// unless a fault answers instead.
async fn read(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    if id == PROBE_ID {
        return inner.probe(&params, &headers).await;
    }
    if leaves_data_out(&params) {
        let throttled = inner.arrive(Arrival::Summary).await;
        let response = inner.gatekeep(throttled, &headers);
        let response = response
            .unwrap_or_else(|| inner.binary(&id, &params, &headers, Shape::Negotiated, false));
        return inner.answered(response);
    }
    let throttled = inner.arrive(Arrival::Read(&id)).await;
    let gate = inner.lock().holds.get(&id).cloned();
    if let Some(mut gate) = gate {
        // Released, or the gate was dropped: either way, go on.
        let _ = gate.wait_for(|open| *open).await;
    }
    if let Some(refused) = inner.gatekeep(throttled, &headers) {
        return inner.answered(refused);
    }
    let response = match inner.take_fault(&id) {
        None => inner.binary(&id, &params, &headers, Shape::Negotiated, true),
        Some(Fault::Raw) => inner.binary(&id, &params, &headers, Shape::Raw, true),
        Some(Fault::WithoutData(raw)) => inner.without_data(&id, &params, &headers, raw).await,
        Some(Fault::Status(status) | Fault::FailTimes { status, .. }) => injected(status, &id),
        Some(Fault::RetryAfter { status, retry_after, .. }) => {
            with_retry_after(injected(status, &id), &retry_after)
        }
        Some(Fault::Body { content_type, body }) => verbatim(content_type, body),
        Some(Fault::Truncated) => truncated(inner.json_text(&id)),
        Some(Fault::Reset) => reset(inner.json_text(&id)),
        Some(Fault::Hang) => std::future::pending().await,
    };
    let body_hold = inner.lock().body_holds.remove(&id);
    let response = match body_hold {
        Some((after, gate)) => held_body(response, after, gate).await,
        None => response,
    };
    inner.answered(response)
}

/// `response` with its body sent in two parts: `after` bytes, then (once `gate` decides) the
/// rest or an early end, which makes hyper close the connection short of `Content-Length`.
async fn held_body(
    response: Response,
    after: usize,
    gate: watch::Receiver<BodyGateState>,
) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(full) = axum::body::to_bytes(body, usize::MAX).await else {
        return outcome(500, "could not build the held body");
    };
    parts.headers.insert(header::CONTENT_LENGTH, full.len().into());
    let (first, rest) = (full.slice(..after.min(full.len())), full.slice(after.min(full.len())..));
    let parts_stream = futures::stream::unfold(Some((first, rest)), move |state| {
        let mut gate = gate.clone();
        async move {
            let (first, rest) = state?;
            if !first.is_empty() {
                return Some((Ok::<_, std::io::Error>(first), Some((Bytes::new(), rest))));
            }
            let decided = gate.wait_for(|s| *s != BodyGateState::Held).await.map(|s| *s);
            match decided {
                Ok(BodyGateState::Cut) => {
                    tokio::time::sleep(FLUSH_PAUSE).await;
                    None
                }
                _ if rest.is_empty() => None,
                _ => Some((Ok(rest), None)),
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(parts_stream))
}

/// The answer of a `Fault::Status` (and the statuses of the counted faults).
fn injected(status: u16, id: &str) -> Response {
    outcome(status, &format!("injected fault on {id}"))
}

/// The answer of a `Fault::Body`: 200 with exactly this type and body.
fn verbatim(content_type: String, body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `HEAD /fhir/Binary/{id}`: the GET's status and headers, no body, and the `Content-Length`
/// of the body the GET would send. Only `Status`, `Body`, `Raw` and `WithoutData` (but not its
/// transport faults) apply.
async fn head(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let throttled = inner.arrive(Arrival::Head).await;
    let fault = inner.lock().faults.get(&id).map(|armed| armed.fault.clone());
    let response = match (inner.gatekeep(throttled, &headers), fault) {
        (Some(refused), _) => refused,
        (None, Some(Fault::Status(status))) => injected(status, &id),
        (None, Some(Fault::Body { content_type, body })) => verbatim(content_type, body),
        (None, Some(Fault::Raw)) => inner.binary(&id, &params, &headers, Shape::Raw, false),
        (None, Some(Fault::WithoutData(raw))) => {
            let shape = match raw {
                _ if accept_starts_with_fhir_json(&headers) => Shape::JsonWithoutData,
                RawAnswer::Status(status) => return head_of(injected(status, &id)).await,
                RawAnswer::Content => Shape::Raw,
                // No transport faults for HEAD: the JSON form's headers.
                RawAnswer::Json | RawAnswer::Reset | RawAnswer::Hang => Shape::JsonWithoutData,
            };
            inner.binary(&id, &params, &headers, shape, false)
        }
        (None, _) => inner.binary(&id, &params, &headers, Shape::Negotiated, false),
    };
    head_of(response).await
}

/// The status and headers of `response`, with the `Content-Length` of its body and no body.
async fn head_of(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    // The bodies here are in memory already (or one chunk), so collecting them is cheap.
    let len = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes.len(),
        Err(_) => 0,
    };
    parts.headers.insert(header::CONTENT_LENGTH, len.into());
    Response::from_parts(parts, Body::empty())
}

/// 200 with the first half of `json`, and a `Content-Length` for all of it.
fn truncated(json: String) -> Response {
    let full = Bytes::from(json);
    let sent = full.slice(..full.len() / 2);
    let parts = futures::stream::unfold(Some(sent), |part| async move {
        match part {
            Some(bytes) => Some((Ok::<_, std::io::Error>(bytes), None)),
            None => {
                tokio::time::sleep(FLUSH_PAUSE).await;
                None
            }
        }
    });
    // A streamed body has no length of its own, so hyper encodes by this header and closes
    // the connection when the stream ends early.
    let headers = [
        (header::CONTENT_TYPE, FHIR_JSON.to_owned()),
        (header::CONTENT_LENGTH, full.len().to_string()),
    ];
    (headers, Body::from_stream(parts)).into_response()
}

/// 200 with the first half of `json` (chunked), then the connection is aborted.
fn reset(json: String) -> Response {
    let full = Bytes::from(json);
    let sent = full.slice(..full.len() / 2);
    let parts = futures::stream::unfold(Some(sent), |part| async move {
        match part {
            Some(bytes) => Some((Ok(bytes), None)),
            None => {
                tokio::time::sleep(FLUSH_PAUSE).await;
                let reset = std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "injected reset mid-body",
                );
                // Returning the state again is fine: hyper stops polling after an error.
                Some((Err(reset), None))
            }
        }
    });
    ([(header::CONTENT_TYPE, FHIR_JSON)], Body::from_stream(parts)).into_response()
}

/// A Patient entry, mixed into searches by `SearchFault::NonBinaryEntries`.
fn patient_entry(base: &str) -> Value {
    json!({
        "fullUrl": format!("{base}/Patient/p-1"),
        "resource": {"resourceType": "Patient", "id": "p-1", "name": [{"family": "Test"}]},
        "search": {"mode": "include"},
    })
}

/// An OperationOutcome entry, as servers add to warn about a search.
fn outcome_entry() -> Value {
    json!({
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "warning", "code": "processing",
                       "diagnostics": "Binary is not a searchable resource type"}],
        },
        "search": {"mode": "outcome"},
    })
}

/// A UUID-shaped versionId (8-4-4-4-12 hex, version 4 and variant bits set), the same for the
/// same id and version number: Medplum names versions by UUID.
fn uuid_of(id: &str, version: u64) -> String {
    // FNV-1a over the id and the version, then two splitmix64 rounds for 128 bits.
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for byte in id.bytes().chain(version.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let high = mix(hash);
    let low = mix(high);
    let bits = (u128::from(high) << 64 | u128::from(low)) & !(0xF << 76) & !(0x3 << 62);
    let bits = bits | (0x4 << 76) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// Adds `Retry-After: value` (skipped if the value cannot be a header).
fn with_retry_after(mut response: Response, value: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// A FHIR error answer: `status` with a one-issue OperationOutcome.
fn outcome(status: u16, diagnostics: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    fhir_json(status, outcome_json(status.as_u16(), diagnostics).to_string())
}

fn fhir_json(status: StatusCode, body: String) -> Response {
    let content_type = [(header::CONTENT_TYPE, FHIR_JSON)];
    (status, content_type, body).into_response()
}

/// A FHIR instant with milliseconds, e.g. `2026-11-27T19:07:36.123Z` (HAPI:
/// `2026-11-27T19:07:36.123+00:00`).
fn instant(t: SystemTime, quirks: Quirks) -> String {
    let format = match quirks {
        Quirks::Hapi => HAPI_INSTANT,
        _ => INSTANT,
    };
    OffsetDateTime::from(t).format(format).unwrap_or_default()
}

fn now_millis() -> SystemTime {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH + Duration::new(since.as_secs(), since.subsec_millis() * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// One client per test thread (and so per test runtime): building a client loads the
        /// TLS roots, which costs more than a request.
        static CLIENT: reqwest::Client = reqwest::Client::new();
    }

    fn client() -> reqwest::Client {
        CLIENT.with(Clone::clone)
    }

    async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, Bytes) {
        let mut request = client().get(url);
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

    /// A server with fhirfs's demo Binaries.
    async fn demo() -> std::io::Result<LoopbackServer> {
        let server = LoopbackServer::start().await?;
        server.put(
            "report-pdf",
            "application/pdf",
            &include_bytes!("../../assets/demo/report.pdf")[..],
        );
        server.put("scan-png", "image/png", &include_bytes!("../../assets/demo/scan.png")[..]);
        server.put("notes-txt", "text/plain", &include_bytes!("../../assets/demo/notes.txt")[..]);
        Ok(server)
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

    /// Status, headers, and the body or the error that ended it.
    async fn fetch(
        method: reqwest::Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> (u16, HeaderMap, Result<Bytes, reqwest::Error>) {
        let mut request = client().request(method, url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.bytes().await)
    }

    /// Follows `next` links from `url`; returns the pages' entries' resource ids and the links.
    async fn all_pages(url: &str) -> (Vec<String>, Vec<String>) {
        let mut url = url.to_owned();
        let mut ids = Vec::new();
        let mut links = Vec::new();
        loop {
            let bundle = get_json(&url).await;
            for entry in bundle["entry"].as_array().unwrap() {
                ids.push(entry["resource"]["id"].as_str().unwrap().to_owned());
            }
            let Some(next) = next_link(&bundle) else {
                return (ids, links);
            };
            links.push(next.clone());
            url = next;
        }
    }

    #[tokio::test]
    async fn latency_delays_reads_and_searches() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        server.set_latency(Duration::from_millis(200));
        let base = server.base_url();
        for url in [format!("{base}/Binary/a"), format!("{base}/Binary")] {
            let started = Instant::now();
            assert_eq!(get(&url, &[]).await.0, 200);
            assert!(started.elapsed() >= Duration::from_millis(200), "{url}");
        }
        server.set_latency(Duration::ZERO);
        let counts = server.counts();
        assert_eq!((counts.reads, counts.searches), (1, 1));
    }

    #[tokio::test]
    async fn head_answers_like_get_without_a_body() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "application/pdf", "%PDF-1.4 twenty bytes");
        let url = format!("{}/Binary/a", server.base_url());
        for accept in [FHIR_JSON, "*/*"] {
            let (_, get_headers, body) = get(&url, &[("accept", accept)]).await;
            let (status, headers, head_body) =
                fetch(reqwest::Method::HEAD, &url, &[("accept", accept)]).await;
            assert_eq!(status, 200);
            assert_eq!(head_body.unwrap().len(), 0);
            assert_eq!(
                headers[header::CONTENT_LENGTH],
                body.len().to_string().as_str(),
                "{accept}"
            );
            assert_eq!(headers[header::CONTENT_TYPE], get_headers[header::CONTENT_TYPE]);
            assert_eq!(headers[header::ETAG], "W/\"1\"");
        }
        let missing = format!("{}/Binary/zzz", server.base_url());
        assert_eq!(fetch(reqwest::Method::HEAD, &missing, &[]).await.0, 404);
        let counts = server.counts();
        assert_eq!((counts.heads, counts.reads), (3, 2));
        assert_eq!(counts.statuses, BTreeMap::from([(200, 2)]), "HEAD is not counted");
    }

    #[tokio::test]
    async fn counts_split_raw_and_json_reads_and_statuses() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        let base = server.base_url();
        let url = format!("{base}/Binary/a");
        get(&url, &[("accept", FHIR_JSON)]).await;
        get(&url, &[("accept", "text/plain")]).await;
        get(&url, &[("accept", "*/*")]).await;
        get(&url, &[("if-none-match", "W/\"1\"")]).await;
        get(&format!("{base}/Binary/zzz"), &[]).await;
        get(&format!("{base}/Binary"), &[]).await;
        let counts = server.counts();
        assert_eq!((counts.json_reads, counts.raw_reads), (1, 2));
        assert_eq!((counts.reads, counts.not_modified), (5, 1));
        assert_eq!(counts.statuses, BTreeMap::from([(200, 4), (304, 1), (404, 1)]));
    }

    #[tokio::test]
    async fn counted_faults_clear_themselves() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        let url = format!("{}/Binary/a", server.base_url());
        server.set_fault("a", Some(Fault::FailTimes { status: 503, times: 2 }));
        assert_eq!(get(&url, &[]).await.0, 503);
        assert_eq!(get(&url, &[]).await.0, 503);
        assert_eq!(get(&url, &[]).await.0, 200);

        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(5));
        let fault = Fault::RetryAfter { status: 429, retry_after: date.clone(), times: 1 };
        server.set_fault("a", Some(fault));
        let (status, headers, _) = get(&url, &[]).await;
        assert_eq!(status, 429);
        assert_eq!(headers[header::RETRY_AFTER], *date);
        assert_eq!(get(&url, &[]).await.0, 200);

        server.set_fault_times("a", Fault::Reset, 1);
        assert!(fetch(reqwest::Method::GET, &url, &[]).await.2.is_err());
        assert_eq!(get(&url, &[]).await.2, "a");
        let counts = server.counts();
        assert_eq!(counts.statuses, BTreeMap::from([(200, 4), (429, 1), (503, 2)]));
        assert_eq!(server.read_arrivals("a").len(), 7);
    }

    #[tokio::test]
    async fn broken_bodies_fail_after_the_headers() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "application/octet-stream", vec![7u8; 10_000]);
        let url = format!("{}/Binary/a", server.base_url());
        let whole = get(&url, &[("accept", FHIR_JSON)]).await.2;

        server.set_fault("a", Some(Fault::Truncated));
        let (status, headers, body) = fetch(reqwest::Method::GET, &url, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(headers[header::CONTENT_TYPE], FHIR_JSON);
        assert_eq!(headers[header::CONTENT_LENGTH], whole.len().to_string().as_str());
        assert!(body.is_err(), "the body ends before its Content-Length");

        server.set_fault("a", Some(Fault::Reset));
        let (status, headers, body) = fetch(reqwest::Method::GET, &url, &[]).await;
        assert_eq!(status, 200);
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
        assert!(body.is_err(), "the connection breaks mid-body");

        // An id that is not stored still gets a broken Binary, not a 404.
        server.set_fault("nothing", Some(Fault::Truncated));
        let url = format!("{}/Binary/nothing", server.base_url());
        let (status, _, body) = fetch(reqwest::Method::GET, &url, &[]).await;
        assert_eq!((status, body.is_err()), (200, true));
    }

    #[tokio::test]
    async fn hang_never_answers() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        server.set_fault("a", Some(Fault::Hang));
        let url = format!("{}/Binary/a", server.base_url());
        let mut request = tokio::spawn(async move { get(&url, &[]).await.0 });
        server.wait_for_reads("a", 1).await;
        let waited = tokio::time::timeout(Duration::from_millis(300), &mut request).await;
        assert!(waited.is_err(), "answered: {waited:?}");
        request.abort();
        assert!(server.counts().statuses.is_empty());
    }

    #[tokio::test]
    async fn without_data_leaves_data_out_and_answers_raw_reads_as_told() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "application/pdf", "%PDF-1.7");
        let url = format!("{}/Binary/a", server.base_url());
        let resource = |body: &Bytes| serde_json::from_slice::<Value>(body).unwrap();
        for raw in [RawAnswer::Status(503), RawAnswer::Status(404), RawAnswer::Json] {
            server.set_fault("a", Some(Fault::WithoutData(raw)));
            let (status, headers, body) = get(&url, &[("accept", FHIR_JSON)]).await;
            assert_eq!(
                (status, headers[header::CONTENT_TYPE].to_str().unwrap()),
                (200, FHIR_JSON),
                "{raw:?}"
            );
            let json = resource(&body);
            assert_eq!(json["contentType"], "application/pdf", "{raw:?}");
            assert!(json.get("data").is_none() && json["meta"].get("tag").is_none(), "{json}");
            for accept in ["application/pdf", "*/*"] {
                let (status, headers, body) = get(&url, &[("accept", accept)]).await;
                match raw {
                    RawAnswer::Status(expected) => assert_eq!(status, expected, "{accept}"),
                    _ => {
                        assert_eq!(
                            (status, headers[header::CONTENT_TYPE].to_str().unwrap()),
                            (200, FHIR_JSON)
                        );
                        assert!(resource(&body).get("data").is_none(), "{accept}");
                    }
                }
            }
        }
        server.set_fault("a", Some(Fault::WithoutData(RawAnswer::Content)));
        let (status, headers, body) = get(&url, &[("accept", "*/*")]).await;
        assert_eq!(
            (status, headers[header::CONTENT_TYPE].to_str().unwrap(), &body[..]),
            (200, "application/pdf", &b"%PDF-1.7"[..])
        );
        server.set_fault("a", Some(Fault::WithoutData(RawAnswer::Reset)));
        let (status, _, body) = fetch(reqwest::Method::GET, &url, &[("accept", "*/*")]).await;
        assert_eq!((status, body.is_err()), (200, true), "the connection breaks mid-body");
        server.set_fault("a", Some(Fault::WithoutData(RawAnswer::Hang)));
        let hung = url.clone();
        let before = server.counts().per_id["a"];
        let mut request = tokio::spawn(async move { get(&hung, &[("accept", "*/*")]).await.0 });
        server.wait_for_reads("a", before + 1).await;
        let waited = tokio::time::timeout(Duration::from_millis(300), &mut request).await;
        assert!(waited.is_err(), "answered: {waited:?}");
        request.abort();
        // The JSON form is still answered, and the fault stays until cleared.
        assert_eq!(get(&url, &[("accept", FHIR_JSON)]).await.0, 200);
        server.set_fault("a", None);
        assert_eq!(resource(&get(&url, &[("accept", FHIR_JSON)]).await.2)["data"], "JVBERi0xLjc=");
    }

    #[tokio::test]
    async fn probes_are_counted_apart_and_never_throttled() {
        let server = LoopbackServer::start().await.unwrap();
        server.set_quirks(Quirks::Microsoft);
        server.set_token(Some("t"));
        let probe = format!("{}/Binary/{PROBE_ID}", server.base_url());
        let accept = ("accept", FHIR_JSON);
        assert_eq!(get(&probe, &[accept]).await.0, 401);
        for _ in 0..9 {
            assert_eq!(get(&probe, &[accept, ("authorization", "Bearer t")]).await.0, 404);
        }
        server.set_fault(PROBE_ID, Some(Fault::Status(403)));
        assert_eq!(get(&probe, &[accept, ("authorization", "Bearer t")]).await.0, 403);
        let counts = server.counts();
        assert_eq!((counts.probes, counts.reads), (11, 0), "{counts:?}");
        assert!(counts.statuses.is_empty() && counts.per_id.is_empty(), "{counts:?}");
        // Throttling still counts from its start: the fifth read is the first 429.
        server.set_token(None);
        server.put("b", "text/plain", "b");
        let url = format!("{}/Binary/b", server.base_url());
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(get(&url, &[accept]).await.0);
        }
        assert_eq!(statuses, [200, 200, 200, 200, 429]);
    }

    #[tokio::test]
    async fn medplum_has_no_file_for_an_empty_binary_created_as_json() {
        let server = LoopbackServer::start().await.unwrap();
        server.set_quirks(Quirks::Medplum);
        server.put("made-json", "text/plain", "");
        server.put_raw("made-raw", "text/plain", "");
        let base = server.base_url();
        let (_, _, body) = get(&format!("{base}/Binary/made-json"), &[("accept", FHIR_JSON)]).await;
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert!(json["contentType"] == "text/plain" && json.get("data").is_none(), "{json}");
        let (status, _, body) =
            get(&format!("{base}/Binary/made-json"), &[("accept", "*/*")]).await;
        assert_eq!(status, 500);
        assert!(String::from_utf8_lossy(&body).contains("File not found"));
        let (status, _, body) = get(&format!("{base}/Binary/made-raw"), &[("accept", "*/*")]).await;
        assert_eq!((status, &body[..]), (200, &b""[..]));
    }

    #[tokio::test]
    async fn search_faults_replace_or_bend_the_bundle() {
        let server = LoopbackServer::start().await.unwrap();
        for id in ["a", "b", "c"] {
            server.put(id, "text/plain", id);
        }
        server.set_page_cap(2);
        let base = server.base_url();
        let first = format!("{base}/Binary?_count=2");

        server.set_search_fault(Some(SearchFault::NotBundle));
        assert_eq!(get_json(&first).await["resourceType"], "Binary");
        server.set_search_fault(Some(SearchFault::Html));
        let (status, headers, body) = get(&first, &[]).await;
        assert_eq!(status, 200);
        assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
        assert!(body.starts_with(b"<!DOCTYPE html>"));

        server.set_search_fault(Some(SearchFault::LoopingNext));
        let page1 = get_json(&first).await;
        let page2 = get_json(&next_link(&page1).unwrap()).await;
        assert_eq!(page2["entry"].as_array().unwrap().len(), 1);
        assert_eq!(next_link(&page2).unwrap(), first, "the last page links back");

        server.set_search_fault(Some(SearchFault::NonBinaryEntries));
        let bundle = get_json(&first).await;
        let types: Vec<_> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["resourceType"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Patient", "Binary", "Binary", "OperationOutcome"]);

        server.set_search_fault(Some(SearchFault::Status(503)));
        assert_eq!(get(&first, &[]).await.0, 503);
        server.set_search_fault(None);
        assert_eq!(all_pages(&first).await.0, ["a", "b", "c"]);
    }

    /// What one read got: its status, or "broken" when the body failed.
    async fn outcome_of(url: &str) -> String {
        let (status, headers, body) = fetch(reqwest::Method::GET, url, &[]).await;
        match (status, body) {
            (200, Err(_)) => "broken".to_owned(),
            (429, _) => format!("429 retry-after {:?}", headers[header::RETRY_AFTER]),
            (status, _) => status.to_string(),
        }
    }

    #[tokio::test]
    async fn random_faults_are_reproducible_from_the_seed() {
        let server = LoopbackServer::start().await.unwrap();
        server.put("a", "text/plain", "a");
        let url = format!("{}/Binary/a", server.base_url());
        let faults = RandomFaults { probability: 0.5, seed: 42 };
        let mut runs = Vec::new();
        for _ in 0..2 {
            server.set_random_faults(Some(faults));
            let mut run = Vec::new();
            for _ in 0..60 {
                run.push(outcome_of(&url).await);
            }
            runs.push(run);
        }
        assert_eq!(runs[0], runs[1]);
        let faulty = runs[0].iter().filter(|o| *o != "200").count();
        assert!((15..=45).contains(&faulty), "{faulty} of 60 at p=0.5");
        for o in &runs[0] {
            assert!(
                ["200", "500", "502", "503", "broken", "429 retry-after \"0\""].contains(&&**o),
                "{o}"
            );
        }
        // Searches are never faulted.
        server.set_random_faults(Some(RandomFaults { probability: 1.0, seed: 7 }));
        assert_eq!(get(&format!("{}/Binary", server.base_url()), &[]).await.0, 200);
        assert_ne!(outcome_of(&url).await, "200");
        server.set_random_faults(None);
        assert_eq!(outcome_of(&url).await, "200");
    }

    #[test]
    fn medplum_versions_are_deterministic_uuids() {
        let uuid = uuid_of("a", 1);
        assert_eq!(uuid, uuid_of("a", 1));
        assert_ne!(uuid, uuid_of("a", 2));
        assert_ne!(uuid, uuid_of("b", 1));
        let groups: Vec<_> = uuid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{uuid}");
        assert!(uuid.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        assert_eq!(&uuid[14..15], "4", "version 4: {uuid}");
        assert!("89ab".contains(&uuid[19..20]), "variant: {uuid}");
    }

    #[tokio::test]
    async fn medplum_mode_refuses_search_and_serves_raw_by_default() {
        let server = LoopbackServer::start().await.unwrap();
        server.set_quirks(Quirks::Medplum);
        server.put("made-json", "application/pdf", "%PDF-json");
        server.put_raw("made-raw", "image/png", "\u{89}PNG raw");
        let base = server.base_url();
        assert_eq!(get(&format!("{base}/Binary?_count=10"), &[]).await.0, 400);
        assert_eq!(get(&format!("{base}/Binary/_history"), &[]).await.0, 404);

        let url = format!("{base}/Binary/made-json");
        let (status, headers, body) = get(&url, &[("accept", FHIR_JSON)]).await;
        assert_eq!(status, 200);
        assert_eq!(headers[header::CONTENT_TYPE], FHIR_JSON);
        let resource: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(resource["data"], "JVBERi1qc29u");
        let version = server.stored("made-json").unwrap().version_id;
        assert_eq!(version.len(), 36, "{version}");
        assert_eq!(resource["meta"]["versionId"], *version);
        let etag = format!("W/\"{version}\"");
        assert_eq!(headers[header::ETAG], *etag);
        for accept in [Some("application/json"), Some("*/*"), None] {
            let headers: Vec<_> = accept.map(|a| ("accept", a)).into_iter().collect();
            let (_, answer, body) = get(&url, &headers).await;
            assert_eq!(answer[header::CONTENT_TYPE], "application/pdf", "{accept:?}");
            assert_eq!(body, "%PDF-json");
            assert!(answer.contains_key(header::CONTENT_LENGTH));
        }
        // 304 on the FHIR path only.
        let inm = ("if-none-match", etag.as_str());
        assert_eq!(get(&url, &[("accept", FHIR_JSON), inm]).await.0, 304);
        assert_eq!(get(&url, &[("accept", "*/*"), inm]).await.0, 200);

        let url = format!("{base}/Binary/made-raw");
        let resource: Value =
            serde_json::from_slice(&get(&url, &[("accept", FHIR_JSON)]).await.2).unwrap();
        assert_eq!(resource["contentType"], "image/png");
        assert!(resource.get("data").is_none() && resource.get("url").is_none());
        let (_, headers, body) = get(&url, &[("accept", "image/png")]).await;
        assert_eq!(body, "\u{89}PNG raw");
        assert!(!headers.contains_key(header::CONTENT_LENGTH), "{headers:?}");
        assert_eq!(headers[header::TRANSFER_ENCODING], "chunked");

        server.set_token(Some("t"));
        let (status, headers, _) = get(&url, &[]).await;
        assert_eq!(status, 401);
        assert!(!headers.contains_key(header::WWW_AUTHENTICATE));
        server.set_token(None);
        server.delete("made-raw");
        assert_eq!(get(&url, &[]).await.0, 410);
    }

    #[tokio::test]
    async fn hapi_mode_pages_through_the_base_and_hides_last_modified_on_raw() {
        let server = LoopbackServer::start().await.unwrap();
        server.set_quirks(Quirks::Hapi);
        for i in 0..60 {
            server.put(&format!("h{i:02}"), "text/plain", format!("hapi {i}"));
        }
        let base = server.base_url();
        let first = get_json(&format!("{base}/Binary")).await;
        assert_eq!(first["entry"].as_array().unwrap().len(), 20);
        let next = next_link(&first).unwrap();
        assert!(next.starts_with(&format!("{base}?_getpages=")), "{next}");
        assert!(
            next.ends_with("&_getpagesoffset=20&_count=20&_pretty=true&_bundletype=searchset"),
            "{next}"
        );
        let (ids, links) = all_pages(&format!("{base}/Binary")).await;
        assert_eq!(ids, server.ids());
        assert_eq!(links.len(), 2);
        let (_, _, pretty) = get(&links[0], &[]).await;
        assert!(pretty.contains(&b'\n'), "_pretty=true pretty-prints");
        let capped = get_json(&format!("{base}/Binary?_count=100")).await;
        assert_eq!(capped["entry"].as_array().unwrap().len(), 50);
        let capped = get_json(&format!("{base}/Binary?_count=30")).await;
        assert_eq!(capped["entry"].as_array().unwrap().len(), 30);

        let url = format!("{base}/Binary/h01");
        let (_, headers, body) = get(&url, &[("accept", FHIR_JSON)]).await;
        assert!(headers.contains_key(header::LAST_MODIFIED));
        let resource: Value = serde_json::from_slice(&body).unwrap();
        let last_updated = resource["meta"]["lastUpdated"].as_str().unwrap();
        assert!(last_updated.ends_with("+00:00"), "{last_updated}");
        let (_, headers, body) = get(&url, &[("accept", "*/*")]).await;
        assert_eq!(body, "hapi 1");
        assert!(!headers.contains_key(header::LAST_MODIFIED));
        assert!(headers.contains_key(header::ETAG));
    }

    #[tokio::test]
    async fn microsoft_mode_is_json_only_with_small_pages_and_throttling() {
        let server = LoopbackServer::start().await.unwrap();
        server.set_quirks(Quirks::Microsoft);
        server.set_throttle(None);
        for i in 0..25 {
            server.put(&format!("m{i:02}"), "application/pdf", format!("ms {i}"));
        }
        let base = server.base_url();
        let url = format!("{base}/Binary/m01");
        assert_eq!(get(&url, &[("accept", "application/pdf")]).await.0, 406);
        assert_eq!(get(&url, &[("accept", "image/*")]).await.0, 406);
        for accept in [FHIR_JSON, "application/json", "*/*", "application/pdf, */*;q=0.1"] {
            let (status, headers, _) = get(&url, &[("accept", accept)]).await;
            assert_eq!(status, 200);
            assert_eq!(headers[header::CONTENT_TYPE], FHIR_JSON);
        }
        assert_eq!(
            get(&format!("{url}?_format=json"), &[("accept", "application/pdf")]).await.0,
            200
        );

        let first = format!("{base}/Binary?_count=100&_elements=id,meta");
        let page = get_json(&first).await;
        assert_eq!(page["entry"].as_array().unwrap().len(), 10);
        let next = next_link(&page).unwrap();
        assert!(next.starts_with(&format!("{base}/Binary?_count=100&_elements=id%2Cmeta&ct=")));
        let (ids, links) = all_pages(&first).await;
        assert_eq!((ids, links.len()), (server.ids(), 2));

        server.set_quirks(Quirks::Microsoft);
        let mut statuses = Vec::new();
        for i in 0..10 {
            let url = if i % 2 == 0 { &url } else { &first };
            let (status, headers, _) = get(url, &[]).await;
            if status == 429 {
                assert_eq!(headers[header::RETRY_AFTER], "1");
            }
            statuses.push(status);
        }
        assert_eq!(statuses, [200, 200, 200, 200, 429, 200, 200, 200, 200, 429]);
    }

    #[tokio::test]
    async fn escaped_slashes_stay_valid_json() {
        let server = LoopbackServer::start().await.unwrap();
        server.set_escaped_slashes(true);
        server.set_listing_data(true);
        server.put("s", "application/octet-stream", vec![0xff; 6]);
        let base = server.base_url();
        let (_, _, body) = get(&format!("{base}/Binary/s"), &[("accept", FHIR_JSON)]).await;
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains(r#""data":"\/\/\/\/\/\/\/\/""#), "{text}");
        assert!(text.contains(r#""contentType":"application\/octet-stream""#));
        let resource: Value = serde_json::from_str(text).unwrap();
        assert_eq!(resource["data"], "////////");
        let bundle = get_json(&format!("{base}/Binary")).await;
        assert_eq!(bundle["entry"][0]["resource"]["data"], "////////");
    }
}
