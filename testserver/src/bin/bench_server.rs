//! A fast FHIR `Binary` server for benchmarks: every body is encoded once at start-up and served
//! as `Bytes` clones, so that a benchmark measures the mount, not the server.
//!
//! ```text
//! cargo run --release -p fhirfs-testserver --bin bench_server -- [OPTIONS]
//!   --port P             listen on 127.0.0.1:P (default 0: any free port)
//!   --files N            N Binaries named f00000, f00001, ... of --size bytes each
//!   --size SIZE          size of the --files Binaries (default 1KiB); 1KiB = 1024, 1KB = 1000
//!   --spec LIST          more Binaries, comma-separated: `ID=SIZE` (one Binary) or
//!                        `PREFIX*N=SIZE` (N Binaries PREFIX-0 .. PREFIX-(N-1))
//!   --latency-ms L       wait L ms before answering every FHIR request
//!   --delay-id ID=MS     wait MS more before answering reads of ID (repeatable)
//!   --listing-data       searches carry `data` even when `_elements`/`_summary` leave it out
//!   --page-cap N         largest search page, whatever `_count` asks (default 1000)
//!   --split-writes       write every answer's headers and body in two separate writes, on
//!                        sockets without TCP_NODELAY (as Python's http.server does): on a
//!                        reused connection a small body then waits for the client's delayed
//!                        ACK of the headers (Nagle), about 40 ms on Linux
//! ```
//!
//! Routes (base `http://127.0.0.1:P/fhir`):
//! - `GET /fhir/Binary?_count=N[&_elements=..][&_summary=..]`: a searchset Bundle in id order;
//!   `next` links carry an opaque `_cursor`.
//! - `GET|HEAD /fhir/Binary/{id}`: the JSON resource when Accept names `application/fhir+json`
//!   or `application/json` (or is absent, or `_format=json`), else the raw bytes with their
//!   Content-Type; always `ETag: W/"1"` and `Last-Modified`. `If-None-Match` answers 304.
//! - `GET /stats`: request counts by kind as JSON; `POST /stats/reset` zeroes them.
//!
//! Prints `READY <port>` on stdout once it listens. Content is pseudo-random per id, but to keep
//! thousands of large Binaries cheap it repeats every [`BLOCK_BYTES`]: a body is a list of shared
//! segments (streamed with an exact Content-Length), not one buffer per Binary.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::{Bytes, BytesMut};
use fhirfs_testserver::fhir::{
    FHIR_JSON, if_none_match, instant, leaves_data_out, outcome_json, param, searchset, wants_json,
};
use futures::StreamExt;
use serde_json::{Value, json};

/// Content type of every Binary.
const CONTENT_TYPE: &str = "application/octet-stream";
/// Content repeats every this many bytes; a multiple of 3, so the base64 of each block is
/// unpadded and the blocks' base64 texts concatenate into the base64 of the whole.
const BLOCK_BYTES: usize = 3 << 20;
/// `_count` when a search gives none (HAPI's default).
const DEFAULT_COUNT: usize = 20;
/// Largest page by default (Microsoft's FHIR server maximum).
const DEFAULT_PAGE_CAP: usize = 1000;
/// Pieces of a body smaller than this are copied together into one segment.
const COALESCE_BYTES: usize = 64 << 10;
/// The FHIR `SUBSETTED` tag a server adds when it left `data` out.
const SUBSETTED_TAG: &str = r#"[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}]"#;
/// Mixed into cursors so they do not look like offsets a client could compute.
const CURSOR_KEY: u64 = 0x5bd1_e995_9e37_79b9;

/// A response body as shared segments, with its total length.
#[derive(Clone, Default)]
struct Segments {
    parts: Vec<Bytes>,
    len: u64,
}

impl Segments {
    /// Appends `part`, copying small pieces into the last segment to keep the list short.
    fn push(&mut self, part: Bytes) {
        if part.is_empty() {
            return;
        }
        self.len += part.len() as u64;
        let small = part.len() < COALESCE_BYTES;
        match self.parts.last_mut() {
            Some(last) if small && last.len() < COALESCE_BYTES => {
                let mut merged = BytesMut::with_capacity(last.len() + part.len());
                merged.extend_from_slice(last);
                merged.extend_from_slice(&part);
                *last = merged.freeze();
            }
            _ => self.parts.push(part),
        }
    }

    fn push_str(&mut self, text: &str) {
        self.push(Bytes::copy_from_slice(text.as_bytes()));
    }

    fn extend(&mut self, other: &Segments) {
        for part in &other.parts {
            self.push(part.clone());
        }
    }

    fn body(&self) -> Body {
        match self.parts.as_slice() {
            [] => Body::empty(),
            [one] => Body::from(one.clone()),
            _ => {
                let parts = self.parts.clone().into_iter().map(Ok::<_, Infallible>);
                Body::from_stream(futures::stream::iter(parts))
            }
        }
    }

    /// The body as a stream that is not ready at first (it yields once to the scheduler before
    /// its first segment): hyper then flushes the headers on their own before it writes any of
    /// the body, as a server that writes headers and body separately does.
    fn split_body(&self) -> Body {
        if self.parts.is_empty() {
            return Body::empty();
        }
        let pause = futures::stream::once(tokio::task::yield_now())
            .filter_map(|()| std::future::ready(None::<Result<Bytes, Infallible>>));
        let parts = self.parts.clone().into_iter().map(Ok::<_, Infallible>);
        Body::from_stream(pause.chain(futures::stream::iter(parts)))
    }
}

/// One Binary with every form of it encoded.
struct Binary {
    id: String,
    /// The raw bytes.
    raw: Segments,
    /// The base64 of the raw bytes (no quotes).
    data: Segments,
    /// `GET Binary/{id}` as FHIR JSON.
    json: Segments,
    /// `GET Binary/{id}?_summary=true`: the resource without `data`, tagged SUBSETTED.
    subset: Segments,
    /// A search entry without `data`, tagged SUBSETTED.
    entry_subset: Bytes,
    /// A search entry with `data`.
    entry_full: Segments,
}

/// Request counters; every FHIR request is counted once, by what it was answered.
#[derive(Default)]
struct Stats {
    searches: AtomicU64,
    json_reads: AtomicU64,
    summary_reads: AtomicU64,
    raw_reads: AtomicU64,
    not_modified: AtomicU64,
    heads: AtomicU64,
    not_found: AtomicU64,
    bad_requests: AtomicU64,
    body_bytes: AtomicU64,
    inflight: AtomicU64,
    inflight_peak: AtomicU64,
}

impl Stats {
    fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "searches": get(&self.searches),
            "json_reads": get(&self.json_reads),
            "summary_reads": get(&self.summary_reads),
            "raw_reads": get(&self.raw_reads),
            "not_modified": get(&self.not_modified),
            "heads": get(&self.heads),
            "not_found": get(&self.not_found),
            "bad_requests": get(&self.bad_requests),
            "body_bytes": get(&self.body_bytes),
            "inflight_peak": get(&self.inflight_peak),
        })
    }

    fn reset(&self) {
        for counter in [
            &self.searches,
            &self.json_reads,
            &self.summary_reads,
            &self.raw_reads,
            &self.not_modified,
            &self.heads,
            &self.not_found,
            &self.bad_requests,
            &self.body_bytes,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        let now = self.inflight.load(Ordering::Relaxed);
        self.inflight_peak.store(now, Ordering::Relaxed);
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn new(stats: &'a Stats) -> Self {
        let now = stats.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.inflight_peak.fetch_max(now, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Server {
    base: String,
    /// Sorted by id: the search order.
    binaries: Vec<Binary>,
    index: HashMap<String, usize>,
    latency: Duration,
    delays: HashMap<String, Duration>,
    listing_data: bool,
    page_cap: usize,
    split_writes: bool,
    last_modified: HeaderValue,
    stats: Stats,
}

#[derive(Debug)]
struct Options {
    port: u16,
    /// (id, size) of every Binary.
    files: Vec<(String, usize)>,
    latency: Duration,
    delays: HashMap<String, Duration>,
    listing_data: bool,
    page_cap: usize,
    split_writes: bool,
}

/// `1KiB` = 1024, `1KB` = 1000, `1M` = 1MiB; a bare number is bytes.
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().map_err(|_| format!("bad size {text:?}"))?;
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("bad size unit in {text:?}")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("size {text:?} is too large"))
}

/// `ID=SIZE` or `PREFIX*N=SIZE`, comma-separated.
fn parse_spec(spec: &str, files: &mut Vec<(String, usize)>) -> Result<(), String> {
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, size) =
            item.split_once('=').ok_or_else(|| format!("spec item {item:?} is not ID=SIZE"))?;
        let size = parse_size(size)?;
        match name.split_once('*') {
            Some((prefix, count)) => {
                let count: usize =
                    count.parse().map_err(|_| format!("bad count in spec item {item:?}"))?;
                files.extend((0..count).map(|i| (format!("{prefix}-{i}"), size)));
            }
            None => files.push((name.to_owned(), size)),
        }
    }
    Ok(())
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        port: 0,
        files: Vec::new(),
        latency: Duration::ZERO,
        delays: HashMap::new(),
        listing_data: false,
        page_cap: DEFAULT_PAGE_CAP,
        split_writes: false,
    };
    let mut count = 0usize;
    let mut size = 1usize << 10;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|_| format!("bad number {v:?}"));
        match arg.as_str() {
            "--port" => {
                options.port = u16::try_from(number(value()?)?).map_err(|e| e.to_string())?
            }
            "--files" => count = number(value()?)? as usize,
            "--size" => size = parse_size(&value()?)?,
            "--spec" => parse_spec(&value()?, &mut options.files)?,
            "--latency-ms" => options.latency = Duration::from_millis(number(value()?)?),
            "--delay-id" => {
                let item = value()?;
                let (id, ms) = item
                    .split_once('=')
                    .ok_or_else(|| format!("--delay-id takes ID=MS, not {item:?}"))?;
                let ms = number(ms.to_owned())?;
                options.delays.insert(id.to_owned(), Duration::from_millis(ms));
            }
            "--listing-data" => options.listing_data = true,
            "--split-writes" => options.split_writes = true,
            "--page-cap" => options.page_cap = number(value()?)?.max(1) as usize,
            "-h" | "--help" => {
                let doc = include_str!("bench_server.rs");
                let usage = doc.lines().take_while(|l| l.starts_with("//!"));
                for line in usage {
                    println!("{}", line.trim_start_matches("//!").trim_start());
                }
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?} (try --help)")),
        }
    }
    options.files.extend((0..count).map(|i| (format!("f{i:05}"), size)));
    Ok(options)
}

/// Deterministic pseudo-random bytes (xorshift64*), seeded from the id (FNV-1a).
fn pseudo_random(id: &str, len: usize) -> Vec<u8> {
    let mut state = id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
        | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

impl Binary {
    fn encode(base: &str, id: &str, size: usize, last_updated: &str) -> Binary {
        let block = Bytes::from(pseudo_random(id, size.min(BLOCK_BYTES)));
        let block64 = Bytes::from(base64_simd::STANDARD.encode_to_string(&block));
        let (full, rest) = (size / block.len().max(1), size % block.len().max(1));
        let mut raw = Segments::default();
        let mut data = Segments::default();
        for _ in 0..full {
            raw.push(block.clone());
            data.push(block64.clone());
        }
        if rest > 0 {
            let tail = block.slice(..rest);
            data.push(Bytes::from(base64_simd::STANDARD.encode_to_string(&tail)));
            raw.push(tail);
        }
        let resource = json!({
            "resourceType": "Binary",
            "id": id,
            "meta": {"versionId": "1", "lastUpdated": last_updated},
            "contentType": CONTENT_TYPE,
        });
        // The envelope comes from serde_json; `data` is spliced in before its closing brace.
        let envelope = resource.to_string();
        let open = envelope.strip_suffix('}').unwrap_or(&envelope);
        let mut json = Segments::default();
        if size == 0 {
            json.push_str(&envelope);
        } else {
            json.push_str(open);
            json.push_str(",\"data\":\"");
            json.extend(&data);
            json.push_str("\"}");
        }
        let full_url = serde_json::to_string(&format!("{base}/Binary/{id}")).unwrap_or_default();
        let entry_head = format!("{{\"fullUrl\":{full_url},\"resource\":");
        let entry_tail = ",\"search\":{\"mode\":\"match\"}}";
        let subset = envelope.replacen(
            "\"versionId\"",
            &format!("\"tag\":{SUBSETTED_TAG},\"versionId\""),
            1,
        );
        let entry_subset = format!("{entry_head}{subset}{entry_tail}");
        let mut entry_full = Segments::default();
        entry_full.push_str(&entry_head);
        entry_full.extend(&json);
        entry_full.push_str(entry_tail);
        let entry_subset = Bytes::from(entry_subset);
        let subset = {
            let mut body = Segments::default();
            body.push_str(&subset);
            body
        };
        Binary { id: id.to_owned(), raw, data, json, subset, entry_subset, entry_full }
    }
}

impl Server {
    fn build(options: &Options, addr: SocketAddr) -> Server {
        let base = format!("http://{addr}/fhir");
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        // Whole seconds, so that lastUpdated and Last-Modified agree exactly.
        let now = UNIX_EPOCH + Duration::from_secs(since.as_secs());
        let last_updated = instant(now);
        let mut files = options.files.clone();
        files.sort();
        files.dedup_by(|a, b| a.0 == b.0);
        let binaries: Vec<Binary> = files
            .iter()
            .map(|(id, size)| Binary::encode(&base, id, *size, &last_updated))
            .collect();
        let index = binaries.iter().enumerate().map(|(i, b)| (b.id.clone(), i)).collect();
        let last_modified = HeaderValue::from_str(&httpdate::fmt_http_date(now))
            .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
        Server {
            base,
            binaries,
            index,
            latency: options.latency,
            delays: options.delays.clone(),
            listing_data: options.listing_data,
            page_cap: options.page_cap,
            split_writes: options.split_writes,
            last_modified,
            stats: Stats::default(),
        }
    }

    fn answer(&self, status: StatusCode, content_type: &str, body: &Segments) -> Response {
        Stats::add(&self.stats.body_bytes, body.len);
        let body_out = if self.split_writes { body.split_body() } else { body.body() };
        let mut response = Response::new(body_out);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(content_type) {
            headers.insert(header::CONTENT_TYPE, value);
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len));
        response
    }

    fn outcome(&self, status: StatusCode, diagnostics: &str) -> Response {
        let body = outcome_json(status.as_u16(), diagnostics);
        let mut segments = Segments::default();
        segments.push_str(&body.to_string());
        self.answer(status, FHIR_JSON, &segments)
    }
}

/// A cursor names (offset, count, with data); opaque to clients.
fn cursor(offset: usize, count: usize, with_data: bool) -> String {
    format!("{:016x}{:x}{}", offset as u64 ^ CURSOR_KEY, count, if with_data { 'd' } else { 's' })
}

fn parse_cursor(text: &str) -> Option<(usize, usize, bool)> {
    let (offset, rest) = (text.get(..16)?, text.get(16..)?);
    let with_data = match rest.chars().last()? {
        'd' => true,
        's' => false,
        _ => return None,
    };
    let offset = u64::from_str_radix(offset, 16).ok()? ^ CURSOR_KEY;
    let count = usize::from_str_radix(&rest[..rest.len() - 1], 16).ok()?;
    Some((usize::try_from(offset).ok()?, count, with_data))
}

/// Waits `time`, if any: tokio's timer rounds even a zero sleep up to its next millisecond
/// tick, which would add about 1 ms to every answer.
async fn wait(time: Duration) {
    if !time.is_zero() {
        tokio::time::sleep(time).await;
    }
}

async fn search(
    State(server): State<Arc<Server>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let _inflight = InFlight::new(&server.stats);
    Stats::add(&server.stats.searches, 1);
    wait(server.latency).await;
    let (offset, count, with_data) = match param(&params, "_cursor") {
        Some(text) => match parse_cursor(text) {
            Some(page) => page,
            None => {
                Stats::add(&server.stats.bad_requests, 1);
                return server.outcome(StatusCode::BAD_REQUEST, "unknown cursor");
            }
        },
        None => {
            let count = match param(&params, "_count").map(str::parse::<usize>) {
                None => DEFAULT_COUNT,
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    Stats::add(&server.stats.bad_requests, 1);
                    return server.outcome(StatusCode::BAD_REQUEST, "invalid _count");
                }
            };
            (0, count, server.listing_data || !leaves_data_out(&params))
        }
    };
    let size = count.min(server.page_cap);
    let total = server.binaries.len();
    let start = offset.min(total);
    let end = start.saturating_add(size).min(total);
    let self_url = format!("{}/Binary?_cursor={}", server.base, cursor(offset, count, with_data));
    let next = (size > 0 && end < total)
        .then(|| format!("{}/Binary?_cursor={}", server.base, cursor(end, count, with_data)));
    let head = searchset(total, &self_url, next.as_deref()).to_string();
    let mut body = Segments::default();
    body.push_str(head.strip_suffix('}').unwrap_or(&head));
    body.push_str(",\"entry\":[");
    for (i, binary) in server.binaries[start..end].iter().enumerate() {
        if i > 0 {
            body.push_str(",");
        }
        if with_data {
            body.extend(&binary.entry_full);
        } else {
            body.push(binary.entry_subset.clone());
        }
    }
    body.push_str("]}");
    server.answer(StatusCode::OK, FHIR_JSON, &body)
}

async fn read(
    State(server): State<Arc<Server>>,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let _inflight = InFlight::new(&server.stats);
    let delay = server.delays.get(&id).copied().unwrap_or_default();
    wait(server.latency + delay).await;
    let stats = &server.stats;
    let Some(binary) = server.index.get(&id).map(|&i| &server.binaries[i]) else {
        Stats::add(&stats.not_found, 1);
        let text = format!("Binary/{id} is not known");
        return server.outcome(StatusCode::NOT_FOUND, &text);
    };
    let validators = [
        (header::ETAG, HeaderValue::from_static("W/\"1\"")),
        (header::LAST_MODIFIED, server.last_modified.clone()),
    ];
    if if_none_match(&headers, "W/\"1\"") {
        Stats::add(&stats.not_modified, 1);
        return (StatusCode::NOT_MODIFIED, validators).into_response();
    }
    let json = wants_json(&headers, &params);
    let summary = json && leaves_data_out(&params);
    if method == Method::HEAD {
        Stats::add(&stats.heads, 1);
    } else if summary {
        Stats::add(&stats.summary_reads, 1);
    } else if json {
        Stats::add(&stats.json_reads, 1);
    } else {
        Stats::add(&stats.raw_reads, 1);
    }
    let (content_type, body) = match (json, summary) {
        (true, true) => (FHIR_JSON, &binary.subset),
        (true, false) => (FHIR_JSON, &binary.json),
        _ => (CONTENT_TYPE, &binary.raw),
    };
    let mut response = server.answer(StatusCode::OK, content_type, body);
    response.headers_mut().extend(validators);
    response
}

async fn stats(State(server): State<Arc<Server>>) -> Response {
    let body = server.stats.to_json().to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn reset_stats(State(server): State<Arc<Server>>) -> StatusCode {
    server.stats.reset();
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("bench_server: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, options.port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("bench_server: cannot listen on port {}: {e}", options.port);
            return std::process::ExitCode::FAILURE;
        }
    };
    let Ok(addr) = listener.local_addr() else {
        eprintln!("bench_server: no local address");
        return std::process::ExitCode::FAILURE;
    };
    let started = Instant::now();
    let server = Arc::new(Server::build(&options, addr));
    let raw_bytes: u64 = server.binaries.iter().map(|b| b.raw.len).sum();
    let json_bytes: u64 = server.binaries.iter().map(|b| b.data.len).sum();
    eprintln!(
        "bench_server: {} Binaries, {raw_bytes} bytes ({json_bytes} as base64), encoded in {:?}{}",
        server.binaries.len(),
        started.elapsed(),
        if options.split_writes { "; headers and bodies in separate writes, Nagle on" } else { "" }
    );
    let router = Router::new()
        .route("/fhir/Binary", get(search))
        .route("/fhir/Binary/{id}", get(read))
        .route("/stats", get(stats))
        .route("/stats/reset", post(reset_stats))
        .with_state(server);
    println!("READY {}", addr.port());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let served = if options.split_writes {
        // Nagle's algorithm on (the kernel's default, said explicitly): the body written after
        // the headers waits for their ACK.
        let listener = listener.tap_io(|stream| {
            if let Err(e) = stream.set_nodelay(false) {
                eprintln!("bench_server: cannot clear TCP_NODELAY: {e}");
            }
        });
        axum::serve(listener, router).await
    } else {
        axum::serve(listener, router).await
    };
    if let Err(e) = served {
        eprintln!("bench_server: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_specs_parse() {
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10KB"), Ok(10_000));
        assert_eq!(parse_size("7"), Ok(7));
        assert!(parse_size("1XB").is_err());
        let mut files = Vec::new();
        parse_spec("a=1KiB, c*2=3", &mut files).unwrap();
        assert_eq!(files, [("a".to_owned(), 1024), ("c-0".to_owned(), 3), ("c-1".to_owned(), 3)]);
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor(&cursor(12_345, 1000, true)), Some((12_345, 1000, true)));
        assert_eq!(parse_cursor("nonsense"), None);
    }

    #[test]
    fn block_repetition_keeps_base64_valid() {
        let size = BLOCK_BYTES * 2 + 5;
        let binary = Binary::encode("http://h/fhir", "x", size, "2024-01-01T00:00:00.000Z");
        let join = |s: &Segments| s.parts.iter().flat_map(|p| p.to_vec()).collect::<Vec<u8>>();
        let raw = join(&binary.raw);
        assert_eq!(raw.len(), size);
        let decoded = base64_simd::STANDARD.decode_to_vec(join(&binary.data)).unwrap();
        assert_eq!(decoded, raw);
        let resource: Value = serde_json::from_slice(&join(&binary.json)).unwrap();
        assert_eq!(resource["id"], "x");
        assert_eq!(resource["meta"]["versionId"], "1");
        let entry: Value = serde_json::from_slice(&binary.entry_subset).unwrap();
        assert_eq!(entry["resource"]["meta"]["tag"][0]["code"], "SUBSETTED");
        assert!(entry["resource"].get("data").is_none());
        let full: Value = serde_json::from_slice(&join(&binary.entry_full)).unwrap();
        assert_eq!(full["resource"]["data"].as_str().map(str::len), Some(join(&binary.data).len()));
    }

    #[test]
    fn instants_are_fhir_instants() {
        let t = UNIX_EPOCH + Duration::from_millis(1_714_979_289_123);
        assert_eq!(instant(t), "2024-05-06T07:08:09.123Z");
    }
}
