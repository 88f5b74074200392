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
//!   --content KIND       what the Binaries hold: `random` (default: pseudo-random bytes, which
//!                        no coding shrinks; their base64 in FHIR JSON shrinks about 25%) or
//!                        `text` (clinical-note-like lines, which shrink 6-7 times)
//!   --compress LIST      content codings the server offers, comma-separated in order of
//!                        preference: `gzip`, `zstd` (default: none, every answer identity).
//!                        Reads are compressed once at start-up (gzip level 6, zstd level 3);
//!                        searches and errors are compressed per request (tower-http)
//!   --bandwidth RATE     pace every FHIR answer body through one token bucket shared by all
//!                        connections, RATE bytes per second (`10MB` = 10,000,000 B/s, `/s`
//!                        optional): a link of that bandwidth; it carries the coded bytes
//!   --created-ago SECS   version 1 of every Binary was made SECS before start-up (default 0):
//!                        a client that asks for changes since a little before its listing
//!                        (fhirfs: 2 minutes) then is not sent every Binary as new
//! ```
//!
//! Every Binary starts at version 1, last updated at start-up (less `--created-ago`), whole
//! seconds; `POST /admin/touch` makes new versions, which every route below shows.
//!
//! Routes (base `http://127.0.0.1:P/fhir`):
//! - `GET /fhir/Binary?_count=N[&_elements=..][&_summary=..]`: a searchset Bundle in id order;
//!   `next` links carry an opaque `_cursor`.
//! - `GET /fhir/Binary?_lastUpdated=gtT|geT[&_count=N][&_elements=..]`: the Binaries whose
//!   newest version is later than T (or at T), in order of change, each once (every Binary, in
//!   id order, when T is before version 1); other prefixes answer 400.
//! - `GET /fhir/Binary?_summary=count[&_lastUpdated=..]`: a searchset Bundle with `total` only.
//! - `GET /fhir/Binary/_history?_since=T[&_count=N][&_elements=..]`: a `history` Bundle of every
//!   version made at or after T, newest first (each entry with `request` PUT or, for version 1,
//!   POST), paged as searches are; no `_since`: the whole history.
//! - `GET|HEAD /fhir/Binary/{id}`: the JSON resource when Accept names `application/fhir+json`
//!   or `application/json` (or is absent, or `_format=json`), else the raw bytes with their
//!   Content-Type; `ETag: W/"<versionId>"` and `Last-Modified`. `If-None-Match` answers 304.
//! - `POST /admin/touch?n=N`: makes a new version of N Binaries spread evenly over the id order
//!   (the first, then every (count/N)th), last updated now (milliseconds), content unchanged;
//!   answers `{"lastUpdated": T, "touched": [{"id": .., "versionId": ..}, ..]}`. Only the
//!   touched Binaries are encoded again, and the change feeds above cost work in proportion to
//!   the versions they give, not to the number of Binaries. Pages after the first keep to the
//!   versions made before it (the cursor holds the change log's length).
//! - `GET /stats`: request counts by kind as JSON (`requests` is every FHIR request; `searches`
//!   every search page, of which `updated_searches` used `_lastUpdated` and `count_searches`
//!   were `_summary=count`; `history` the history pages), `body_bytes` (answer bodies before any
//!   content coding) and `sent_bytes` (bodies as sent, after it); `POST /stats/reset` zeroes
//!   them.
//!
//! Every answer carries the server's `Date` (hyper adds it), which a client may take as the
//! "since" of its next request for changes.
//!
//! With `--compress`, a read whose `Accept-Encoding` allows one of the offered codings gets the
//! first of them (`Content-Encoding`, `Vary: Accept-Encoding`, the coded Content-Length).
//!
//! Prints `READY <port>` on stdout once it listens. Content is pseudo-random per id, but to keep
//! thousands of large Binaries cheap it repeats every [`BLOCK_BYTES`]: a body is a list of shared
//! segments (streamed with an exact Content-Length), not one buffer per Binary.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::{Bytes, BytesMut};
use fhirfs_testserver::fhir::{
    FHIR_JSON, if_none_match, instant, leaves_data_out, outcome_json, param, parse_instant,
    searchset, wants_json,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tower_http::compression::CompressionLayer;

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
/// Largest piece of a body sent at a time under `--bandwidth`: the pacing granularity.
const PACE_CHUNK_BYTES: usize = 16 << 10;
/// What the bandwidth token bucket holds at least: a link's burst after an idle moment (four
/// chunks, 6.5 ms at 10 MB/s).
const PACE_BURST_BYTES: usize = 4 * PACE_CHUNK_BYTES;
/// ... and at least this much of the rate: a sender's wait is rounded up to tokio's 1 ms timer
/// tick, and a bucket that fills up in less time than that caps the rate below what was asked
/// (64 KiB at 100 MB/s gave about 70 MB/s).
const PACE_BURST_TIME: Duration = Duration::from_millis(5);
/// gzip level of the pre-compressed reads: the zlib default, what servlet containers use.
const GZIP_LEVEL: u32 = 6;
/// zstd level of the pre-compressed reads: the library's default.
const ZSTD_LEVEL: i32 = 3;

/// A content coding the server can offer (`--compress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Coding {
    Gzip,
    Zstd,
}

impl Coding {
    fn parse(name: &str) -> Result<Coding, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "gzip" => Ok(Coding::Gzip),
            "zstd" => Ok(Coding::Zstd),
            _ => Err(format!("unknown coding {name:?} (gzip or zstd)")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Zstd => "zstd",
        }
    }

    /// `body` compressed with this coding, at the level real servers default to.
    fn compress(self, body: &Segments) -> std::io::Result<Segments> {
        let mut out = Vec::with_capacity(body.len as usize / 2);
        match self {
            Coding::Gzip => {
                let level = flate2::Compression::new(GZIP_LEVEL);
                let mut encoder = flate2::write::GzEncoder::new(&mut out, level);
                for part in &body.parts {
                    encoder.write_all(part)?;
                }
                encoder.finish()?;
            }
            Coding::Zstd => {
                let mut encoder = zstd::stream::Encoder::new(&mut out, ZSTD_LEVEL)?;
                for part in &body.parts {
                    encoder.write_all(part)?;
                }
                encoder.finish()?;
            }
        }
        let mut coded = Segments::default();
        coded.push(Bytes::from(out));
        Ok(coded)
    }
}

/// The first of `offered` that an `Accept-Encoding` value allows (RFC 9110, 12.5.3): named with
/// a non-zero q, or covered by `*` with a non-zero q and not refused by name. Unlike the RFC's
/// "no header: anything", no header gets identity, as tower-http and most servers do.
fn choose_coding(accept_encoding: &str, offered: &[Coding]) -> Option<Coding> {
    // (name, q) of every element; a q that does not parse counts as 1, as most servers read it.
    let items: Vec<(String, bool)> = accept_encoding
        .split(',')
        .filter_map(|item| {
            let mut fields = item.split(';');
            let name = fields.next()?.trim().to_ascii_lowercase();
            let refused = fields.any(|f| {
                f.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (!name.is_empty()).then_some((name, !refused))
        })
        .collect();
    let allowed = |name: &str| match items.iter().find(|(n, _)| n == name) {
        Some(&(_, ok)) => ok,
        None => items.iter().any(|(n, ok)| n == "*" && *ok),
    };
    offered.iter().copied().find(|c| allowed(c.name()))
}

/// What the generated Binaries hold (`--content`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    /// Pseudo-random bytes: incompressible, as encrypted or already compressed files are.
    Random,
    /// Lines of clinical-note-like text: compresses several times, as notes and reports do.
    Text,
}

/// A token bucket: the bandwidth of a link that every connection shares (`--bandwidth`).
/// Senders reserve their bytes at once and wait for them to be paid, so the tokens may go
/// negative: a debt that later senders queue behind, in order, at `rate` bytes a second.
#[derive(Debug)]
struct TokenBucket {
    /// Bytes per second.
    rate: f64,
    /// Most tokens held (bytes): the burst after an idle moment.
    burst: f64,
    /// Tokens now (bytes); negative while senders wait.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64, burst: usize, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1) as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    /// Reserves `bytes` at `now`; returns how long the sender waits before sending them.
    fn take(&mut self, bytes: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

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
    /// `raw` in each offered coding, in the order of `--compress`.
    raw_coded: Vec<(Coding, Segments)>,
    /// `json` in each offered coding, in the order of `--compress`.
    json_coded: Vec<(Coding, Segments)>,
}

/// Request counters: every FHIR request is counted in `requests`, and once more by what it was
/// answered (the kinds of searches also in `searches`).
#[derive(Default)]
struct Stats {
    /// Every FHIR request, whatever it was answered.
    requests: AtomicU64,
    /// Search pages of every kind.
    searches: AtomicU64,
    /// ... of which `_lastUpdated` searches.
    updated_searches: AtomicU64,
    /// ... of which `_summary=count` searches.
    count_searches: AtomicU64,
    /// `Binary/_history` pages.
    history: AtomicU64,
    json_reads: AtomicU64,
    summary_reads: AtomicU64,
    raw_reads: AtomicU64,
    not_modified: AtomicU64,
    heads: AtomicU64,
    not_found: AtomicU64,
    bad_requests: AtomicU64,
    body_bytes: AtomicU64,
    sent_bytes: AtomicU64,
    inflight: AtomicU64,
    inflight_peak: AtomicU64,
}

impl Stats {
    fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "requests": get(&self.requests),
            "searches": get(&self.searches),
            "updated_searches": get(&self.updated_searches),
            "count_searches": get(&self.count_searches),
            "history": get(&self.history),
            "json_reads": get(&self.json_reads),
            "summary_reads": get(&self.summary_reads),
            "raw_reads": get(&self.raw_reads),
            "not_modified": get(&self.not_modified),
            "heads": get(&self.heads),
            "not_found": get(&self.not_found),
            "bad_requests": get(&self.bad_requests),
            "body_bytes": get(&self.body_bytes),
            "sent_bytes": get(&self.sent_bytes),
            "inflight_peak": get(&self.inflight_peak),
        })
    }

    fn reset(&self) {
        for counter in [
            &self.requests,
            &self.searches,
            &self.updated_searches,
            &self.count_searches,
            &self.history,
            &self.json_reads,
            &self.summary_reads,
            &self.raw_reads,
            &self.not_modified,
            &self.heads,
            &self.not_found,
            &self.bad_requests,
            &self.body_bytes,
            &self.sent_bytes,
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
    /// Offered content codings, preferred first (`--compress`).
    codings: Vec<Coding>,
    /// The link's bandwidth (`--bandwidth`); none: unlimited.
    bucket: Option<Mutex<TokenBucket>>,
    /// When version 1 of every Binary was made (whole seconds).
    created: SystemTime,
    /// `created` as an HTTP date.
    last_modified: HeaderValue,
    /// What the Binaries hold, to encode a new version the same way.
    content: Content,
    /// The versions `POST /admin/touch` made.
    changes: RwLock<ChangeLog>,
    /// Held by one touch at a time, so that two never make the same version number.
    touching: Mutex<()>,
    stats: Stats,
}

/// A version made by `POST /admin/touch`, encoded whole.
struct Touched {
    /// The Binary's position in [`Server::binaries`].
    index: usize,
    version: u64,
    /// `meta.lastUpdated`, in milliseconds.
    at: SystemTime,
    binary: Binary,
}

/// Every version made after start-up, in order of change, and the newest of each Binary.
/// Versions are never dropped: a cursor names a length of `log`, and the pages after the first
/// give what the log held then.
#[derive(Default)]
struct ChangeLog {
    /// In order of change; `at` never decreases.
    log: Vec<Arc<Touched>>,
    /// The newest version of every touched Binary, by position.
    current: HashMap<usize, Arc<Touched>>,
}

/// One version of a Binary, as the routes serve it.
#[derive(Clone, Copy)]
struct Version<'a> {
    binary: &'a Binary,
    number: u64,
    at: SystemTime,
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
    content: Content,
    codings: Vec<Coding>,
    /// Bytes per second, all connections together.
    bandwidth: Option<u64>,
    /// How long before start-up version 1 of every Binary was made.
    created_ago: Duration,
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
        content: Content::Random,
        codings: Vec::new(),
        bandwidth: None,
        created_ago: Duration::ZERO,
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
            "--content" => {
                options.content = match value()?.as_str() {
                    "random" => Content::Random,
                    "text" => Content::Text,
                    other => return Err(format!("--content takes random or text, not {other:?}")),
                }
            }
            "--compress" => {
                let list = value()?;
                options.codings = list
                    .split(',')
                    .filter(|name| !name.trim().is_empty())
                    .map(Coding::parse)
                    .collect::<Result<_, _>>()?;
                options.codings.dedup();
            }
            "--bandwidth" => {
                let rate = value()?;
                let bytes = parse_size(rate.strip_suffix("/s").unwrap_or(&rate))?;
                if bytes == 0 {
                    return Err("--bandwidth must be above 0".to_owned());
                }
                options.bandwidth = Some(bytes as u64);
            }
            "--created-ago" => options.created_ago = Duration::from_secs(number(value()?)?),
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

/// Deterministic clinical-note-like text, seeded from the id: dated lines of vitals, a
/// finding, a few words of free text and a plan, with varying numbers. gzip and zstd shrink it
/// 6-7 times (its base64 in FHIR JSON too): less than form-like text, more than prose.
fn clinical_text(id: &str, len: usize) -> Vec<u8> {
    const WORDS: [&str; 64] = [
        "patient",
        "reports",
        "denies",
        "mild",
        "severe",
        "pain",
        "left",
        "right",
        "lower",
        "upper",
        "chest",
        "abdomen",
        "back",
        "knee",
        "shoulder",
        "since",
        "yesterday",
        "morning",
        "evening",
        "night",
        "after",
        "before",
        "meals",
        "walking",
        "rest",
        "improved",
        "worse",
        "stable",
        "nausea",
        "vomiting",
        "fever",
        "cough",
        "dyspnoea",
        "fatigue",
        "dizziness",
        "swelling",
        "redness",
        "tenderness",
        "no",
        "some",
        "occasional",
        "persistent",
        "new",
        "known",
        "history",
        "of",
        "diabetes",
        "hypertension",
        "asthma",
        "COPD",
        "CKD",
        "stage",
        "two",
        "three",
        "family",
        "present",
        "advised",
        "fluids",
        "mobilise",
        "monitor",
        "bloods",
        "sent",
        "awaiting",
        "results",
    ];
    const AUTHORS: [&str; 6] = [
        "Dr. A. Okafor",
        "Dr. M. Lindqvist",
        "RN J. Alvarez",
        "Dr. S. Nakamura",
        "NP K. Brennan",
        "RN T. Haddad",
    ];
    const FINDINGS: [&str; 8] = [
        "Patient reports mild headache, denies chest pain or shortness of breath.",
        "Wound clean and dry, no erythema, dressing changed.",
        "Alert and oriented x3, ambulating with assistance.",
        "Complains of intermittent abdominal pain, tolerating oral intake.",
        "Lungs clear to auscultation bilaterally, no wheeze.",
        "Pain 3/10 at rest, 6/10 on movement; analgesia effective.",
        "Blood glucose within target range, no hypoglycaemic episodes.",
        "Slept poorly overnight, anxious about discharge.",
    ];
    const PLANS: [&str; 8] = [
        "Plan: continue lisinopril 10 mg daily; recheck BMP in 2 weeks.",
        "Plan: increase mobilisation, physiotherapy review tomorrow.",
        "Plan: paracetamol 1 g QDS PRN, reassess pain in 4 hours.",
        "Plan: repeat CBC and CRP in the morning.",
        "Plan: start metformin 500 mg BID with meals.",
        "Plan: discharge planning meeting, family informed.",
        "Plan: chest X-ray if febrile, continue observations 4-hourly.",
        "Plan: no change, review at next ward round.",
    ];
    let mut random = pseudo_random(id, (len / 8 + 1) * 8).into_iter();
    let mut next = move || random.next().unwrap_or(0) as usize;
    let mut out = Vec::with_capacity(len + 256);
    while out.len() < len {
        let words: Vec<&str> = (0..6 + next() % 8).map(|_| WORDS[next() % WORDS.len()]).collect();
        let line = format!(
            "2024-{:02}-{:02} {:02}:{:02} {}: BP {}/{} mmHg, HR {}/min, T 3{}.{} C, SpO2 {}%. {} \
             Note: {}. {}\n",
            next() % 12 + 1,
            next() % 28 + 1,
            next() % 24,
            next() % 60,
            AUTHORS[next() % AUTHORS.len()],
            100 + next() % 60,
            60 + next() % 30,
            55 + next() % 50,
            6 + next() % 3,
            next() % 10,
            90 + next() % 10,
            FINDINGS[next() % FINDINGS.len()],
            words.join(" "),
            PLANS[next() % PLANS.len()],
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

impl Binary {
    /// Version `version` of Binary `id`, last updated at `last_updated` (an instant).
    fn encode(
        base: &str,
        id: &str,
        size: usize,
        (version, last_updated): (u64, &str),
        content: Content,
        codings: &[Coding],
    ) -> std::io::Result<Binary> {
        let block = Bytes::from(match content {
            Content::Random => pseudo_random(id, size.min(BLOCK_BYTES)),
            Content::Text => clinical_text(id, size.min(BLOCK_BYTES)),
        });
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
            "meta": {"versionId": version.to_string(), "lastUpdated": last_updated},
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
        let mut raw_coded = Vec::new();
        let mut json_coded = Vec::new();
        for &coding in codings {
            raw_coded.push((coding, coding.compress(&raw)?));
            json_coded.push((coding, coding.compress(&json)?));
        }
        Ok(Binary {
            id: id.to_owned(),
            raw,
            data,
            json,
            subset,
            entry_subset,
            entry_full,
            raw_coded,
            json_coded,
        })
    }
}

impl Server {
    fn build(options: &Options, addr: SocketAddr) -> std::io::Result<Server> {
        let base = format!("http://{addr}/fhir");
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        // Whole seconds, so that lastUpdated and Last-Modified agree exactly.
        let now = UNIX_EPOCH + Duration::from_secs(since.as_secs());
        let created = now.checked_sub(options.created_ago).unwrap_or(UNIX_EPOCH);
        let last_updated = instant(created);
        let mut files = options.files.clone();
        files.sort();
        files.dedup_by(|a, b| a.0 == b.0);
        // Compressing every read at start-up (not per request) keeps the server's CPU out of
        // the measurements: on 2 cores, gzip of 100 MiB per copy would compete with the mount.
        let binaries = files
            .iter()
            .map(|(id, size)| {
                let (content, codings) = (options.content, &options.codings);
                Binary::encode(&base, id, *size, (1, &last_updated), content, codings)
            })
            .collect::<std::io::Result<Vec<Binary>>>()?;
        let index = binaries.iter().enumerate().map(|(i, b)| (b.id.clone(), i)).collect();
        let last_modified = http_date(created);
        Ok(Server {
            base,
            binaries,
            index,
            latency: options.latency,
            delays: options.delays.clone(),
            listing_data: options.listing_data,
            page_cap: options.page_cap,
            split_writes: options.split_writes,
            codings: options.codings.clone(),
            bucket: options.bandwidth.map(|rate| {
                let burst =
                    PACE_BURST_BYTES.max((rate as f64 * PACE_BURST_TIME.as_secs_f64()) as usize);
                Mutex::new(TokenBucket::new(rate, burst, Instant::now()))
            }),
            created,
            last_modified,
            content: options.content,
            changes: RwLock::default(),
            touching: Mutex::default(),
            stats: Stats::default(),
        })
    }

    /// The change log, read-locked (never across an await).
    fn changes(&self) -> RwLockReadGuard<'_, ChangeLog> {
        self.changes.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest version of the Binary at `index`.
    fn current<'a>(&'a self, changes: &'a ChangeLog, index: usize) -> Version<'a> {
        match changes.current.get(&index) {
            Some(touched) => touched.version(),
            None => self.first(index),
        }
    }

    /// Version 1 of the Binary at `index`.
    fn first(&self, index: usize) -> Version<'_> {
        Version { binary: &self.binaries[index], number: 1, at: self.created }
    }

    /// Makes a new version of `n` Binaries spread evenly over the id order (content unchanged,
    /// last updated now), encoding only those; their ids, versions and time.
    fn touch(&self, n: usize) -> std::io::Result<(Vec<(String, u64)>, SystemTime)> {
        let _one_at_a_time = self.touching.lock().unwrap_or_else(PoisonError::into_inner);
        let total = self.binaries.len();
        let n = n.min(total);
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let now = UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64);
        // After version 1 and after every earlier touch: the log stays in order of change.
        let newest = self.changes().log.last().map(|t| t.at);
        let at = now.max(self.created + Duration::from_millis(1)).max(newest.unwrap_or(now));
        let last_updated = instant(at);
        let mut made = Vec::with_capacity(n);
        for k in 0..n {
            let index = k * total / n;
            let version = self.current(&self.changes(), index).number + 1;
            let binary = &self.binaries[index];
            let size = binary.raw.len as usize;
            let (content, codings) = (self.content, &self.codings[..]);
            let encoded = Binary::encode(
                &self.base,
                &binary.id,
                size,
                (version, &last_updated),
                content,
                codings,
            )?;
            made.push(Arc::new(Touched { index, version, at, binary: encoded }));
        }
        // Encoded before the write lock: searches wait only for the appends.
        let mut changes = self.changes.write().unwrap_or_else(PoisonError::into_inner);
        let touched = made.iter().map(|t| (t.binary.id.clone(), t.version)).collect();
        for touched in made {
            changes.current.insert(touched.index, Arc::clone(&touched));
            changes.log.push(touched);
        }
        Ok((touched, at))
    }

    /// Waits until the link can carry `bytes` more (no wait without `--bandwidth`).
    async fn pace(&self, bytes: usize) {
        let Some(bucket) = &self.bucket else { return };
        // The lock is held for the arithmetic only, never across the wait.
        let delay = bucket.lock().map(|mut b| b.take(bytes, Instant::now())).unwrap_or_default();
        wait(delay).await;
    }

    /// A coded form of a read answer when the request accepts one: the first offered coding
    /// the request allows that `coded` holds.
    fn coded<'a>(
        &self,
        headers: &HeaderMap,
        coded: &'a [(Coding, Segments)],
    ) -> Option<(Coding, &'a Segments)> {
        let accept = headers.get(header::ACCEPT_ENCODING)?.to_str().ok()?;
        let coding = choose_coding(accept, &self.codings)?;
        coded.iter().find(|(c, _)| *c == coding).map(|(c, body)| (*c, body))
    }

    fn answer(&self, status: StatusCode, content_type: &str, body: &Segments) -> Response {
        self.answer_coded(status, content_type, body, body.len)
    }

    /// [`Server::answer`] with a body that may be coded: `identity_len` is its length before.
    fn answer_coded(
        &self,
        status: StatusCode,
        content_type: &str,
        body: &Segments,
        identity_len: u64,
    ) -> Response {
        Stats::add(&self.stats.body_bytes, identity_len);
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

impl Touched {
    fn version(&self) -> Version<'_> {
        Version { binary: &self.binary, number: self.version, at: self.at }
    }
}

/// `t` as an HTTP date (whole seconds), for `Last-Modified`.
fn http_date(t: SystemTime) -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(t))
        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

/// What a search or a history lists, as its first page asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Feed {
    /// Every Binary's newest version, in id order.
    All,
    /// `_lastUpdated=gt|ge`: the Binaries whose newest version was made after `since` (or at
    /// it: `inclusive`), each once, in order of change.
    Updated { since: SystemTime, inclusive: bool },
    /// `Binary/_history?_since=`: every version made at or after `since`, newest first.
    History { since: SystemTime },
}

/// Where a page starts and what it continues; opaque to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    feed: Feed,
    offset: usize,
    count: usize,
    with_data: bool,
    /// The change log's length at the first page: the pages after it give the versions made
    /// before it, so that a touch between pages does not shift them.
    upto: usize,
}

impl Cursor {
    /// `offset.count.upto.feed.data`, in hex; the feed is `a`, or `g`, `e` or `h` followed by
    /// its instant in milliseconds since the epoch.
    fn encode(&self) -> String {
        let millis = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        let feed = match self.feed {
            Feed::All => "a".to_owned(),
            Feed::Updated { since, inclusive: false } => format!("g{:x}", millis(since)),
            Feed::Updated { since, inclusive: true } => format!("e{:x}", millis(since)),
            Feed::History { since } => format!("h{:x}", millis(since)),
        };
        let data = if self.with_data { 'd' } else { 's' };
        let offset = self.offset as u64 ^ CURSOR_KEY;
        format!("{offset:016x}.{:x}.{:x}.{feed}.{data}", self.count, self.upto)
    }

    fn parse(text: &str) -> Option<Cursor> {
        let mut fields = text.split('.');
        let mut hex = || usize::from_str_radix(fields.next()?, 16).ok();
        let (offset, count, upto) = (hex()? as u64 ^ CURSOR_KEY, hex()?, hex()?);
        let (feed, data) = (fields.next()?, fields.next()?);
        if fields.next().is_some() {
            return None;
        }
        let with_data = match data {
            "d" => true,
            "s" => false,
            _ => return None,
        };
        let (kind, millis) = feed.split_at_checked(1)?;
        let since = || {
            let millis = u64::from_str_radix(millis, 16).ok()?;
            Some(UNIX_EPOCH + Duration::from_millis(millis))
        };
        let feed = match kind {
            "a" if millis.is_empty() => Feed::All,
            "g" => Feed::Updated { since: since()?, inclusive: false },
            "e" => Feed::Updated { since: since()?, inclusive: true },
            "h" => Feed::History { since: since()? },
            _ => return None,
        };
        let offset = usize::try_from(offset).ok()?;
        Some(Cursor { feed, offset, count, with_data, upto })
    }
}

/// The versions a page is cut from.
enum Matches<'a> {
    /// Every Binary's newest version, in id order.
    All(&'a ChangeLog),
    /// Versions made by touches, in order of change.
    Changed(Vec<&'a Touched>),
    /// Versions made by touches (oldest first in the slice, given newest first), then, when
    /// `with_first`, version 1 of every Binary in id order.
    History { touched: &'a [Arc<Touched>], with_first: bool },
}

impl Matches<'_> {
    fn len(&self, server: &Server) -> usize {
        match self {
            Matches::All(_) => server.binaries.len(),
            Matches::Changed(changed) => changed.len(),
            Matches::History { touched, with_first } => {
                touched.len() + if *with_first { server.binaries.len() } else { 0 }
            }
        }
    }

    /// Appends the entry of the `k`th match.
    fn push_entry(&self, server: &Server, k: usize, with_data: bool, body: &mut Segments) {
        let search_entry = |version: Version<'_>, body: &mut Segments| {
            if with_data {
                body.extend(&version.binary.entry_full);
            } else {
                body.push(version.binary.entry_subset.clone());
            }
        };
        match self {
            Matches::All(changes) => search_entry(server.current(changes, k), body),
            Matches::Changed(changed) => search_entry(changed[k].version(), body),
            Matches::History { touched, .. } => match touched.len().checked_sub(k + 1) {
                Some(i) => server.push_history_entry(touched[i].version(), with_data, body),
                None => server.push_history_entry(server.first(k - touched.len()), with_data, body),
            },
        }
    }
}

impl Server {
    /// The cursor of a first page: its `_count`, whether it leaves `data` out, and what
    /// `_since` (a history) or `_lastUpdated` (a search) asks for.
    fn first_cursor(&self, params: &[(String, String)], history: bool) -> Result<Cursor, String> {
        let count = match param(params, "_count").map(str::parse::<usize>) {
            None => DEFAULT_COUNT,
            Some(Ok(n)) => n,
            Some(Err(_)) => return Err("invalid _count".to_owned()),
        };
        let instant =
            |text: &str| parse_instant(text).ok_or_else(|| format!("invalid instant {text:?}"));
        let feed = match (history, param(params, "_since"), param(params, "_lastUpdated")) {
            (true, None, _) => Feed::History { since: UNIX_EPOCH },
            (true, Some(since), _) => Feed::History { since: instant(since)? },
            (false, _, None) => Feed::All,
            (false, _, Some(value)) => {
                let (inclusive, since) = match value.split_at_checked(2) {
                    Some(("gt", since)) => (false, instant(since)?),
                    Some(("ge", since)) => (true, instant(since)?),
                    _ => return Err(format!("_lastUpdated={value}: only gt and ge are supported")),
                };
                // Version 1 of every Binary is that late: every Binary.
                let every = if inclusive { self.created >= since } else { self.created > since };
                if every { Feed::All } else { Feed::Updated { since, inclusive } }
            }
        };
        let with_data = self.listing_data || !leaves_data_out(params);
        Ok(Cursor { feed, offset: 0, count, with_data, upto: self.changes().log.len() })
    }

    /// The versions `feed` gives from the first `upto` of the change log: in proportion to
    /// the versions made since the feed's instant, not to the number of Binaries.
    fn matches<'a>(&'a self, changes: &'a ChangeLog, feed: Feed, upto: usize) -> Matches<'a> {
        let log = &changes.log[..upto.min(changes.log.len())];
        match feed {
            Feed::All => Matches::All(changes),
            Feed::Updated { since, inclusive } => {
                let after = |t: SystemTime| if inclusive { t >= since } else { t > since };
                let from = log.partition_point(|t| !after(t.at));
                // Each Binary's newest version: the last of its entries.
                let mut seen = HashSet::new();
                let mut changed: Vec<&Touched> = log[from..]
                    .iter()
                    .rev()
                    .filter(|t| seen.insert(t.index))
                    .map(|t| &**t)
                    .collect();
                changed.reverse();
                Matches::Changed(changed)
            }
            Feed::History { since } => {
                let from = log.partition_point(|t| t.at < since);
                Matches::History { touched: &log[from..], with_first: self.created >= since }
            }
        }
    }

    /// One page of `cursor`'s feed: a searchset Bundle, or a history Bundle.
    fn page(&self, cursor: Cursor) -> Segments {
        let changes = self.changes();
        let matches = self.matches(&changes, cursor.feed, cursor.upto);
        let total = matches.len(self);
        let size = cursor.count.min(self.page_cap);
        let start = cursor.offset.min(total);
        let end = start.saturating_add(size).min(total);
        let history = matches!(cursor.feed, Feed::History { .. });
        let route = if history { "Binary/_history" } else { "Binary" };
        let link = |offset| {
            format!("{}/{route}?_cursor={}", self.base, Cursor { offset, ..cursor }.encode())
        };
        let next = (size > 0 && end < total).then(|| link(end));
        let mut head = searchset(total, &link(cursor.offset), next.as_deref());
        if history {
            head["type"] = "history".into();
        }
        let head = head.to_string();
        let mut body = Segments::default();
        body.push_str(head.strip_suffix('}').unwrap_or(&head));
        body.push_str(",\"entry\":[");
        for k in start..end {
            if k > start {
                body.push_str(",");
            }
            matches.push_entry(self, k, cursor.with_data, &mut body);
        }
        body.push_str("]}");
        body
    }

    /// A history entry of `version`: a search entry with how the version was made
    /// (`request`, `response`) instead of `search`, as the loopback server's.
    fn push_history_entry(&self, version: Version<'_>, with_data: bool, body: &mut Segments) {
        let id = &version.binary.id;
        let quoted = |text: String| serde_json::to_string(&text).unwrap_or_default();
        let full_url = quoted(format!("{}/Binary/{id}", self.base));
        body.push_str(&format!("{{\"fullUrl\":{full_url},\"resource\":"));
        body.extend(if with_data { &version.binary.json } else { &version.binary.subset });
        let (method, status) = if version.number == 1 { ("POST", "201") } else { ("PUT", "200") };
        let url = quoted(format!("Binary/{id}"));
        body.push_str(&format!(
            ",\"request\":{{\"method\":\"{method}\",\"url\":{url}}},\
             \"response\":{{\"status\":\"{status}\"}}}}"
        ));
    }
}

/// Waits `time`, if any: tokio's timer rounds even a zero sleep up to its next millisecond
/// tick, which would add about 1 ms to every answer.
async fn wait(time: Duration) {
    if !time.is_zero() {
        tokio::time::sleep(time).await;
    }
}

/// `GET /fhir/Binary`: a page of a search (every Binary, or those changed since
/// `_lastUpdated`), or with `_summary=count` how many match.
async fn search(
    State(server): State<Arc<Server>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let _inflight = InFlight::new(&server.stats);
    let stats = &server.stats;
    Stats::add(&stats.searches, 1);
    wait(server.latency).await;
    let cursor = match param(&params, "_cursor") {
        Some(text) => Cursor::parse(text)
            .filter(|c| !matches!(c.feed, Feed::History { .. }))
            .ok_or_else(|| "unknown cursor".to_owned()),
        None => server.first_cursor(&params, false),
    };
    let cursor = match cursor {
        Ok(cursor) => cursor,
        Err(diagnostics) => {
            Stats::add(&stats.bad_requests, 1);
            return server.outcome(StatusCode::BAD_REQUEST, &diagnostics);
        }
    };
    if param(&params, "_lastUpdated").is_some() || matches!(cursor.feed, Feed::Updated { .. }) {
        Stats::add(&stats.updated_searches, 1);
    }
    if param(&params, "_cursor").is_none() && param(&params, "_summary") == Some("count") {
        Stats::add(&stats.count_searches, 1);
        let total = {
            let changes = server.changes();
            server.matches(&changes, cursor.feed, cursor.upto).len(&server)
        };
        let query =
            url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
        let bundle = searchset(total, &format!("{}/Binary?{query}", server.base), None);
        let mut body = Segments::default();
        body.push_str(&bundle.to_string());
        return server.answer(StatusCode::OK, FHIR_JSON, &body);
    }
    server.answer(StatusCode::OK, FHIR_JSON, &server.page(cursor))
}

/// `GET /fhir/Binary/_history`: a page of the versions made since `_since`, newest first.
async fn history(
    State(server): State<Arc<Server>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let _inflight = InFlight::new(&server.stats);
    Stats::add(&server.stats.history, 1);
    wait(server.latency).await;
    let cursor = match param(&params, "_cursor") {
        Some(text) => Cursor::parse(text)
            .filter(|c| matches!(c.feed, Feed::History { .. }))
            .ok_or_else(|| "unknown cursor".to_owned()),
        None => server.first_cursor(&params, true),
    };
    match cursor {
        Ok(cursor) => server.answer(StatusCode::OK, FHIR_JSON, &server.page(cursor)),
        Err(diagnostics) => {
            Stats::add(&server.stats.bad_requests, 1);
            server.outcome(StatusCode::BAD_REQUEST, &diagnostics)
        }
    }
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
    let Some(&index) = server.index.get(&id) else {
        Stats::add(&stats.not_found, 1);
        let text = format!("Binary/{id} is not known");
        return server.outcome(StatusCode::NOT_FOUND, &text);
    };
    // The lock is held while the answer is put together (its body shares the version's bytes).
    let changes = server.changes();
    let version = server.current(&changes, index);
    let binary = version.binary;
    let (etag, last_modified) = match version.number {
        1 => (HeaderValue::from_static("W/\"1\""), server.last_modified.clone()),
        n => {
            let etag = HeaderValue::from_str(&format!("W/\"{n}\""));
            (etag.unwrap_or_else(|_| HeaderValue::from_static("W/\"0\"")), http_date(version.at))
        }
    };
    let if_none_match = if_none_match(&headers, etag.to_str().unwrap_or_default());
    let validators = [(header::ETAG, etag), (header::LAST_MODIFIED, last_modified)];
    if if_none_match {
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
    let (content_type, body, coded) = match (json, summary) {
        // Summaries are small: the compression layer codes them per request.
        (true, true) => (FHIR_JSON, &binary.subset, &[][..]),
        (true, false) => (FHIR_JSON, &binary.json, &binary.json_coded[..]),
        _ => (CONTENT_TYPE, &binary.raw, &binary.raw_coded[..]),
    };
    let mut response = match server.coded(&headers, coded) {
        Some((coding, coded_body)) => {
            let mut response =
                server.answer_coded(StatusCode::OK, content_type, coded_body, body.len);
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding.name()));
            response
        }
        None => server.answer(StatusCode::OK, content_type, body),
    };
    let headers = response.headers_mut();
    if !server.codings.is_empty() {
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    headers.extend(validators);
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

/// `POST /admin/touch?n=N`: a new version of N Binaries; their ids and versions, and when.
async fn touch(
    State(server): State<Arc<Server>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let Some(Ok(n)) = param(&params, "n").map(str::parse::<usize>) else {
        return (StatusCode::BAD_REQUEST, "touch takes n=N\n").into_response();
    };
    match server.touch(n) {
        Ok((touched, at)) => {
            let touched: Vec<Value> = touched
                .into_iter()
                .map(|(id, version)| json!({"id": id, "versionId": version.to_string()}))
                .collect();
            let body = json!({"lastUpdated": instant(at), "touched": touched}).to_string();
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => {
            let text = format!("cannot encode the new versions: {e}\n");
            (StatusCode::INTERNAL_SERVER_ERROR, text).into_response()
        }
    }
}

/// Middleware outside the compression layer: sends every FHIR answer's body as it will go on
/// the wire (coded), counting it in `sent_bytes` and, under `--bandwidth`, in pieces of at most
/// [`PACE_CHUNK_BYTES`], each after the token bucket has paid for it.
async fn link(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    Stats::add(&server.stats.requests, 1);
    let (parts, body) = next.run(request).await.into_parts();
    let piece = if server.bucket.is_some() { PACE_CHUNK_BYTES } else { usize::MAX };
    let state = (body.into_data_stream(), Bytes::new(), server);
    let paced = futures::stream::unfold(state, move |(mut inner, mut rest, server)| async move {
        if rest.is_empty() {
            match inner.next().await? {
                Ok(bytes) => rest = bytes,
                Err(e) => return Some((Err(e), (inner, rest, server))),
            }
        }
        let out = rest.split_to(rest.len().min(piece));
        server.pace(out.len()).await;
        Stats::add(&server.stats.sent_bytes, out.len() as u64);
        Some((Ok(out), (inner, rest, server)))
    });
    // The Content-Length header stays: hyper sends a stream of unknown size with it.
    Response::from_parts(parts, Body::from_stream(paced))
}

/// The routes: FHIR answers through the compression layer (with `--compress`) and then the
/// link; `/stats` and `/admin` beside them, neither compressed nor paced nor counted.
fn router(server: Arc<Server>) -> Router {
    let mut fhir: Router<Arc<Server>> = Router::new()
        .route("/fhir/Binary", get(search))
        .route("/fhir/Binary/_history", get(history))
        .route("/fhir/Binary/{id}", get(read));
    if !server.codings.is_empty() {
        // Searches and errors are coded per request; reads arrive coded already (they carry
        // Content-Encoding, which the layer leaves alone). Only the gzip and zstd features of
        // tower-http are on: it offers nothing else.
        let has = |c| server.codings.contains(&c);
        let layer = CompressionLayer::new().gzip(has(Coding::Gzip)).zstd(has(Coding::Zstd));
        fhir = fhir.layer(layer);
    }
    fhir.layer(middleware::from_fn_with_state(server.clone(), link))
        .route("/stats", get(stats))
        .route("/stats/reset", post(reset_stats))
        .route("/admin/touch", post(touch))
        .with_state(server)
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
    let server = match Server::build(&options, addr) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            eprintln!("bench_server: cannot compress the Binaries: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let raw_bytes: u64 = server.binaries.iter().map(|b| b.raw.len).sum();
    let json_bytes: u64 = server.binaries.iter().map(|b| b.data.len).sum();
    let mut extras = String::new();
    for (i, coding) in options.codings.iter().enumerate() {
        let raw: u64 = server.binaries.iter().map(|b| b.raw_coded[i].1.len).sum();
        let json: u64 = server.binaries.iter().map(|b| b.json_coded[i].1.len).sum();
        extras += &format!("; {}: raw {raw}, json {json} bytes", coding.name());
    }
    if let Some(rate) = options.bandwidth {
        extras += &format!("; bandwidth {rate} B/s");
    }
    if options.split_writes {
        extras += "; headers and bodies in separate writes, Nagle on";
    }
    eprintln!(
        "bench_server: {} Binaries, {raw_bytes} bytes ({json_bytes} as base64), {:?} content, \
         encoded in {:?}{extras}",
        server.binaries.len(),
        options.content,
        started.elapsed(),
    );
    let router = router(server);
    println!("READY {}", addr.port());
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
        let since = UNIX_EPOCH + Duration::from_millis(1_714_979_289_123);
        for feed in [
            Feed::All,
            Feed::Updated { since, inclusive: false },
            Feed::Updated { since, inclusive: true },
            Feed::History { since },
        ] {
            for with_data in [false, true] {
                let cursor = Cursor { feed, offset: 12_345, count: 1000, with_data, upto: 17 };
                assert_eq!(Cursor::parse(&cursor.encode()), Some(cursor));
            }
        }
        assert_eq!(Cursor::parse("nonsense"), None);
        assert_eq!(Cursor::parse("0.1.2.x.d"), None);
        assert_eq!(Cursor::parse("0.1.2.a.d.more"), None);
    }

    #[test]
    fn block_repetition_keeps_base64_valid() {
        let size = BLOCK_BYTES * 2 + 5;
        let binary = Binary::encode(
            "http://h/fhir",
            "x",
            size,
            (1, "2024-01-01T00:00:00.000Z"),
            Content::Random,
            &[],
        )
        .unwrap();
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

    fn join(segments: &Segments) -> Vec<u8> {
        segments.parts.iter().flat_map(|p| p.to_vec()).collect()
    }

    fn decode(coding: Coding, body: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        match coding {
            Coding::Gzip => flate2::read::GzDecoder::new(body).read_to_end(&mut out).unwrap(),
            Coding::Zstd => {
                zstd::stream::read::Decoder::new(body).unwrap().read_to_end(&mut out).unwrap()
            }
        };
        out
    }

    #[test]
    fn token_bucket_queues_senders_at_its_rate() {
        // Waits in whole ms (the bucket counts in f64 seconds).
        let ms = |wait: Duration| (wait.as_secs_f64() * 1000.0).round() as u64;
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1000, 100, t0);
        // The burst goes at once; then each 100 bytes waits 0.1 s more than the one before.
        assert_eq!(ms(bucket.take(100, t0)), 0);
        assert_eq!(ms(bucket.take(100, t0)), 100);
        assert_eq!(ms(bucket.take(100, t0)), 200);
        // 0.3 s later the debt (200 bytes) is paid and 100 tokens are back, no more.
        let later = t0 + Duration::from_millis(300);
        assert_eq!(ms(bucket.take(100, later)), 0);
        // Idle for long: the bucket holds its burst only.
        let idle = later + Duration::from_secs(60);
        assert_eq!(ms(bucket.take(100, idle)), 0);
        assert_eq!(ms(bucket.take(50, idle)), 50);
        // A clock that seems to go back (another thread's older `now`) adds no tokens.
        assert_eq!(ms(bucket.take(50, idle - Duration::from_secs(1))), 100);
    }

    #[test]
    fn codings_are_chosen_from_accept_encoding() {
        let both = [Coding::Zstd, Coding::Gzip];
        assert_eq!(choose_coding("gzip, deflate, br, zstd", &both), Some(Coding::Zstd));
        assert_eq!(choose_coding("gzip, deflate, br, zstd", &[Coding::Gzip]), Some(Coding::Gzip));
        assert_eq!(choose_coding("GZIP", &both), Some(Coding::Gzip));
        assert_eq!(choose_coding("identity", &both), None);
        assert_eq!(choose_coding("zstd;q=0, gzip;q=0.5", &both), Some(Coding::Gzip));
        assert_eq!(choose_coding("*", &both), Some(Coding::Zstd));
        assert_eq!(choose_coding("*;q=0", &both), None);
        assert_eq!(choose_coding("zstd;q=0, *", &both), Some(Coding::Gzip));
        assert_eq!(choose_coding("", &both), None);
        assert_eq!(choose_coding("gzip", &[]), None);
    }

    #[test]
    fn options_parse_content_codings_and_bandwidth() {
        let args = ["--content", "text", "--compress", "zstd,gzip", "--bandwidth", "10MB/s"];
        let options = parse_args(args.map(str::to_owned)).unwrap();
        assert_eq!(options.content, Content::Text);
        assert_eq!(options.codings, [Coding::Zstd, Coding::Gzip]);
        assert_eq!(options.bandwidth, Some(10_000_000));
        assert!(parse_args(["--compress", "br"].map(str::to_owned)).is_err());
        assert!(parse_args(["--content", "pdf"].map(str::to_owned)).is_err());
        assert!(parse_args(["--bandwidth", "0"].map(str::to_owned)).is_err());
    }

    #[test]
    fn coded_reads_decode_to_the_identity_bodies() {
        let codings = [Coding::Gzip, Coding::Zstd];
        for content in [Content::Random, Content::Text] {
            let size = 100_000;
            let binary = Binary::encode(
                "http://h/fhir",
                "x",
                size,
                (1, "2024-01-01T00:00:00.000Z"),
                content,
                &codings,
            )
            .unwrap();
            for (i, coding) in codings.into_iter().enumerate() {
                let (c, raw) = &binary.raw_coded[i];
                assert_eq!(*c, coding);
                assert_eq!(decode(coding, &join(raw)), join(&binary.raw), "{coding:?} raw");
                let (_, json) = &binary.json_coded[i];
                assert_eq!(decode(coding, &join(json)), join(&binary.json), "{coding:?} json");
                if content == Content::Text {
                    // Notes shrink several times; their base64 in JSON shrinks less.
                    assert!(raw.len * 3 < size as u64, "{coding:?}: text to {} bytes", raw.len);
                    assert!(json.len * 2 < binary.json.len, "{coding:?}: json to {}", json.len);
                } else {
                    assert!(raw.len * 100 > size as u64 * 99, "random bytes do not shrink");
                }
            }
        }
        let text = clinical_text("y", 5000);
        assert_eq!(text.len(), 5000);
        assert_eq!(text, clinical_text("y", 5000), "deterministic");
        assert!(std::str::from_utf8(&text).is_ok());
    }

    /// The server on 127.0.0.1:0 with `args`; its base URL.
    async fn serve(args: &[&str]) -> String {
        let options = parse_args(args.iter().map(|a| a.to_string())).unwrap();
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(Server::build(&options, addr).unwrap());
        tokio::spawn(async move { axum::serve(listener, router(server)).await });
        format!("http://{addr}")
    }

    /// GET `url` with these headers: (status, Content-Encoding, body as received).
    async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Option<String>, Vec<u8>) {
        // The answers as sent: no decoding by the client, whatever features reqwest has in
        // this workspace (the product turns its decoders on).
        let client = reqwest::Client::builder()
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .build()
            .unwrap();
        let mut request = client.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let coding =
            response.headers().get("content-encoding").map(|v| v.to_str().unwrap().to_owned());
        (status, coding, response.bytes().await.unwrap().to_vec())
    }

    #[tokio::test]
    async fn compressed_answers_decode_to_the_identity_answers_through_a_paced_link() {
        let base = serve(&[
            "--spec",
            "a=200KiB,b=1KiB",
            "--content",
            "text",
            "--compress",
            "zstd,gzip",
            "--bandwidth",
            "100MB",
        ])
        .await;
        let read = format!("{base}/fhir/Binary/a");
        let search = format!("{base}/fhir/Binary?_count=5");
        let raw = [("accept", "application/octet-stream")];
        let json = [("accept", "application/fhir+json")];
        for (url, accept) in [(&read, &raw[..]), (&read, &json[..]), (&search, &json[..])] {
            let (status, coding, identity) = get(url, accept).await;
            assert_eq!((status, coding), (200, None), "{url}: no Accept-Encoding, identity");
            for (asked, coding) in [("gzip", Coding::Gzip), ("gzip, zstd", Coding::Zstd)] {
                let headers = [accept, &[("accept-encoding", asked)]].concat();
                let (status, got, body) = get(url, &headers).await;
                assert_eq!((status, got.as_deref()), (200, Some(coding.name())), "{url} {asked}");
                assert_eq!(decode(coding, &body), identity, "{url} {asked}");
            }
        }
        // sent_bytes counts the bodies as sent, coded; body_bytes as they were before.
        let (_, _, stats) = get(&format!("{base}/stats"), &[]).await;
        let stats: Value = serde_json::from_slice(&stats).unwrap();
        let (body, sent) = (stats["body_bytes"].as_u64(), stats["sent_bytes"].as_u64());
        assert!(sent.unwrap() * 2 < body.unwrap(), "sent {sent:?} of {body:?}");
    }

    /// GET `url` as FHIR JSON with these headers: (status, headers, body as JSON, or null when
    /// it is not).
    async fn fetch(
        url: &str,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = reqwest::Client::new().get(url).header("accept", FHIR_JSON);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        let body = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// `POST /admin/touch?n=N`'s answer.
    async fn touch(base: &str, n: usize) -> Value {
        let url = format!("{base}/admin/touch?n={n}");
        let response = reqwest::Client::new().post(url).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    }

    /// A Bundle's entries as `id@versionId`, with ` METHOD` in a history.
    fn versions(bundle: &Value) -> Vec<String> {
        let entries = bundle["entry"].as_array().unwrap();
        let version = |e: &Value| {
            let (resource, request) = (&e["resource"], &e["request"]);
            let method = request["method"].as_str().map(|m| format!(" {m}")).unwrap_or_default();
            format!(
                "{}@{}{method}",
                resource["id"].as_str().unwrap(),
                resource["meta"]["versionId"]
            )
            .replace('"', "")
        };
        entries.iter().map(version).collect()
    }

    fn next_link(bundle: &Value) -> Option<String> {
        let links = bundle["link"].as_array()?;
        let next = links.iter().find(|l| l["relation"] == "next")?;
        next["url"].as_str().map(str::to_owned)
    }

    /// An instant `secs` seconds ago: with `--created-ago 60`, 30 is after version 1 and
    /// before any touch, 120 before version 1.
    fn ago(secs: u64) -> String {
        instant(SystemTime::now() - Duration::from_secs(secs))
    }

    #[tokio::test]
    async fn touched_binaries_have_a_new_version_in_reads_and_listings() {
        let base = serve(&["--files", "10", "--size", "10", "--created-ago", "60"]).await;
        let (_, _, first) = fetch(&format!("{base}/fhir/Binary/f00005"), &[]).await;
        let touched = touch(&base, 2).await;
        let expected =
            json!([{"id": "f00000", "versionId": "2"}, {"id": "f00005", "versionId": "2"}]);
        assert_eq!(touched["touched"], expected);
        let url = format!("{base}/fhir/Binary/f00005");
        let (status, headers, resource) = fetch(&url, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(resource["meta"]["versionId"], "2");
        assert_eq!(resource["meta"]["lastUpdated"], touched["lastUpdated"]);
        assert_eq!(resource["data"], first["data"], "the content stays");
        assert_eq!(headers["etag"], "W/\"2\"");
        let at = parse_instant(touched["lastUpdated"].as_str().unwrap()).unwrap();
        assert_eq!(headers["last-modified"], http_date(at));
        assert_eq!(fetch(&url, &[("if-none-match", "W/\"1\"")]).await.0, 200);
        assert_eq!(fetch(&url, &[("if-none-match", "W/\"2\"")]).await.0, 304);
        let (_, headers, _) = fetch(&format!("{base}/fhir/Binary/f00001"), &[]).await;
        assert_eq!(headers["etag"], "W/\"1\"");
        let url = format!("{base}/fhir/Binary?_count=100&_elements=id,meta,contentType");
        let (_, _, page) = fetch(&url, &[]).await;
        assert_eq!(page["total"], 10);
        let listed = versions(&page);
        assert_eq!(listed.len(), 10);
        assert_eq!(
            (&listed[0][..], &listed[1][..], &listed[5][..]),
            ("f00000@2", "f00001@1", "f00005@2")
        );
        let (status, _, _) = fetch(&format!("{base}/admin/touch?n=1"), &[]).await;
        assert_eq!(status, 405, "touch is a POST");
    }

    #[tokio::test]
    async fn history_gives_every_version_since_newest_first_in_stable_pages() {
        let base = serve(&["--files", "10", "--size", "10", "--created-ago", "60"]).await;
        let since = ago(30);
        touch(&base, 2).await;
        touch(&base, 1).await;
        let url = format!(
            "{base}/fhir/Binary/_history?_since={since}&_count=2&_elements=id,meta,contentType"
        );
        let (status, headers, page) = fetch(&url, &[]).await;
        assert_eq!(status, 200);
        assert!(headers.contains_key("date"), "the server's Date is a client's next since");
        assert_eq!((&page["type"], &page["total"]), (&json!("history"), &json!(3)));
        assert_eq!(versions(&page), ["f00000@3 PUT", "f00005@2 PUT"]);
        let resource = &page["entry"][0]["resource"];
        assert_eq!(resource["meta"]["tag"][0]["code"], "SUBSETTED");
        assert!(resource.get("data").is_none());
        assert_eq!(page["entry"][0]["request"]["url"], "Binary/f00000");
        // A version made between pages does not shift them.
        touch(&base, 1).await;
        let (_, _, next) = fetch(&next_link(&page).unwrap(), &[]).await;
        assert_eq!(versions(&next), ["f00000@2 PUT"]);
        assert_eq!(next_link(&next), None);
        // From before version 1: every version, version 1 of each Binary last, with data.
        let url = format!("{base}/fhir/Binary/_history?_since={}&_count=100", ago(120));
        let (_, _, all) = fetch(&url, &[]).await;
        let all_versions = versions(&all);
        assert_eq!(all["total"], 14);
        assert_eq!(
            all_versions[..5],
            ["f00000@4 PUT", "f00000@3 PUT", "f00005@2 PUT", "f00000@2 PUT", "f00000@1 POST"]
        );
        assert_eq!(all_versions[13], "f00009@1 POST");
        assert!(all["entry"][13]["resource"]["data"].is_string());
        // After every version: none.
        let url = format!(
            "{base}/fhir/Binary/_history?_since={}",
            instant(SystemTime::now() + Duration::from_secs(5))
        );
        let (_, _, none) = fetch(&url, &[]).await;
        assert_eq!((&none["total"], next_link(&none)), (&json!(0), None));
        let (status, _, _) =
            fetch(&format!("{base}/fhir/Binary/_history?_since=yesterday"), &[]).await;
        assert_eq!(status, 400);
        let (status, _, _) = fetch(&format!("{base}/fhir/Binary/_history?_cursor=x"), &[]).await;
        assert_eq!(status, 400);
        let (_, _, stats) = fetch(&format!("{base}/stats"), &[]).await;
        assert_eq!(
            (&stats["history"], &stats["requests"], &stats["searches"]),
            (&json!(6), &json!(6), &json!(0))
        );
        assert_eq!(stats["bad_requests"], 2);
    }

    #[tokio::test]
    async fn last_updated_searches_give_each_changed_binary_once_and_count_them() {
        let base = serve(&["--files", "10", "--size", "10", "--created-ago", "60"]).await;
        let since = ago(30);
        touch(&base, 2).await;
        let second = touch(&base, 1).await;
        let search = |query: String| {
            let url = format!("{base}/fhir/Binary?{query}");
            async move { fetch(&url, &[]).await }
        };
        let (status, _, page) =
            search(format!("_lastUpdated=gt{since}&_count=1&_elements=id,meta,contentType")).await;
        assert_eq!((status, &page["total"]), (200, &json!(2)));
        assert_eq!(versions(&page), ["f00005@2"]);
        let (_, _, next) = fetch(&next_link(&page).unwrap(), &[]).await;
        assert_eq!(versions(&next), ["f00000@3"]);
        assert_eq!(next_link(&next), None);
        let (_, _, page) = search(format!("_lastUpdated=ge{since}")).await;
        assert_eq!(page["total"], 2);
        let at = second["lastUpdated"].as_str().unwrap();
        assert_eq!(search(format!("_lastUpdated=gt{at}")).await.2["total"], 0);
        assert!(
            versions(&search(format!("_lastUpdated=ge{at}")).await.2)
                .contains(&"f00000@3".to_owned())
        );
        // Before version 1: every Binary, in id order.
        let (_, _, page) = search(format!("_lastUpdated=gt{}&_count=3", ago(120))).await;
        assert_eq!(page["total"], 10);
        assert_eq!(versions(&page), ["f00000@3", "f00001@1", "f00002@1"]);
        let (_, _, count) = search("_summary=count".to_owned()).await;
        assert_eq!((&count["total"], count.get("entry")), (&json!(10), None));
        let (_, _, count) = search(format!("_summary=count&_lastUpdated=gt{since}")).await;
        assert_eq!(count["total"], 2);
        assert_eq!(search(format!("_lastUpdated=lt{since}")).await.0, 400);
        assert_eq!(search("_lastUpdated=gtnever".to_owned()).await.0, 400);
        let (_, _, stats) = fetch(&format!("{base}/stats"), &[]).await;
        let counted = [
            "requests",
            "searches",
            "updated_searches",
            "count_searches",
            "history",
            "bad_requests",
        ]
        .map(|key| stats[key].as_u64().unwrap());
        assert_eq!(counted, [10, 10, 7, 2, 0, 2]);
    }

    #[test]
    fn instants_are_fhir_instants() {
        let t = UNIX_EPOCH + Duration::from_millis(1_714_979_289_123);
        assert_eq!(instant(t), "2024-05-06T07:08:09.123Z");
    }
}
