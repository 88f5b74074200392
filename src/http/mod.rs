//! The HTTP source: reads and searches Binary on a FHIR server with reqwest, with retries,
//! deadlines and token renewal.
//!
//! - this module: `HttpSource`, its settings, the `Source` methods, and header helpers;
//! - `request`: one GET with its retries, deadline and token renewal;
//! - `fetch`: raw or FHIR JSON, summary reads, the raw read after a JSON without `data`;
//! - `resume`: streaming a raw body, and resuming one cut short;
//! - `paging`: following a search's pages;
//! - `documents`: the documents view: searching documents, reading one again, and fetching an
//!   attachment's url (the token only for the base URL's origin);
//! - [`limit`]: how many requests may be in flight at once, readers first.

mod documents;
mod fetch;
pub mod limit;
mod paging;
mod request;
mod resume;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tracing::{debug, warn};
use url::Url;

pub use crate::auth::Secret;
use crate::auth::{Auth, TokenSource};
use crate::buffer::body::{Body, Filler};
use crate::buffer::pool;
use crate::error::SourceError;
use crate::fhir::json::JsonBinaryDecoder;
use crate::fhir::{self, FHIR_JSON, FHIR_XML};
use crate::source::{Ahead, Changes, Fetched, Listed, Meta, Reserve, Source, Streamed};
use crate::stats::Stats;
use limit::{Limiter, Permit};

pub use documents::Target;

/// First pause before a retry; doubled each time, with jitter.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest pause between two tries (unless the server's Retry-After says more).
const RETRY_MAX_DELAY: Duration = Duration::from_secs(4);
/// Retries after the first try, at most. With the delays above they span about 1.5 s (3 s
/// with jitter), so a server that is down gives EIO promptly, not at the deadline.
const MAX_RETRIES: usize = 4;

/// Chunks read off the connection ahead of the code that takes them (hyper's are up to
/// 408 KiB, so about 3 MiB at most, outside the cache's count).
const READ_AHEAD_CHUNKS: usize = 8;

/// How long the start-up check waits for the server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The Binary id the start-up check reads, with the token: the nil UUID, which no server
/// hands out (Medplum and HFS give random UUIDs, HAPI numbers), so the answer is a 404 once
/// the token is accepted, and a 401 or 403 when it is not.
pub const PROBE_ID: &str = "00000000-0000-0000-0000-000000000000";

/// The most a `_summary=true` read may send: the resource without `data` is a few hundred
/// bytes. A server that ignores `_summary` sends the whole Binary, which is not read.
const SUMMARY_LIMIT: u64 = 64 << 10;

/// The longest a raw read waits for its `_summary=true` read, asked once the raw headers are
/// in (and never more than half the time left before the fetch's deadline).
const SUMMARY_WAIT: Duration = Duration::from_secs(2);

/// Settings of the HTTP source.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The FHIR base URL, e.g. `https://host/fhir`.
    pub base: Url,
    /// Where the bearer token comes from.
    pub token: TokenSource,
    /// Deadline for one fetch or one listing page as a whole, retries included.
    pub timeout: Duration,
    /// `_count` asked of searches.
    pub page_size: u32,
    /// Largest Binary accepted, in bytes.
    pub max_size: u64,
    /// Extra CA certificates (PEM) to trust besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Where answers are counted by status.
    pub stats: Arc<Stats>,
    /// Which form of a Binary to ask for.
    pub fetch: FetchMode,
    /// Requests in flight at once, at most (`--max-requests`).
    pub max_requests: usize,
    /// Ask for compressed answers (`Accept-Encoding: gzip, deflate, br, zstd`); else
    /// `identity`. Either way, a compressed answer is decoded.
    pub compression: bool,
}

/// Which form of a Binary to ask for (`--fetch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FetchMode {
    /// Raw where the server has shown that it serves native bytes with the right
    /// Content-Type; FHIR JSON otherwise.
    #[default]
    Auto,
    /// Always FHIR JSON (`data` in base64).
    Json,
    /// Always ask for the native bytes (`Accept` = the contentType, or `*/*`), no base64;
    /// whatever the server answers is still decided by its Content-Type.
    Raw,
}

/// What the server has shown about raw answers, for `FetchMode::Auto`.
const RAW_UNKNOWN: u8 = 0;
const RAW_PROVEN: u8 = 1;
const RAW_REFUSED: u8 = 2;

impl HttpConfig {
    /// Defaults for `base`.
    pub fn new(base: Url) -> Self {
        Self {
            base,
            token: TokenSource::None,
            timeout: Duration::from_secs(30),
            page_size: 1000,
            max_size: 1 << 30,
            ca_pem: None,
            stats: Arc::default(),
            fetch: FetchMode::Auto,
            max_requests: crate::http::limit::DEFAULT_MAX_REQUESTS,
            compression: true,
        }
    }
}

/// A FHIR server reached over HTTP(S).
pub struct HttpSource {
    client: reqwest::Client,
    config: HttpConfig,
    auth: Arc<Auth>,
    /// The base URL without a trailing slash.
    base: String,
    /// Content types learned from listings and JSON reads: the Accept of a raw request.
    content_types: std::sync::Mutex<KnownTypes>,
    /// RAW_UNKNOWN, RAW_PROVEN or RAW_REFUSED.
    raw: std::sync::atomic::AtomicU8,
    /// The server answered HEAD with 405 or 501.
    head_useless: std::sync::atomic::AtomicBool,
    /// The server refused `_summary=true` reads or ignored them (sent `data` anyway).
    summary_useless: std::sync::atomic::AtomicBool,
    /// Requests in flight, readers first.
    limit: Limiter,
    /// How the server tells what changed, and since when to ask.
    feed: std::sync::Mutex<paging::FeedState>,
}

/// The content type of each Binary seen, for the Accept of its raw requests. A million
/// Binaries share a handful of types, each held once and named by its number; ids are held
/// as a 32-bit hash (keyed per process), not a copy of every id: 8 bytes a Binary. Ids that
/// share a hash (about a hundred pairs in a million) share an Accept, which is only a
/// preference: the answer's Content-Type still decides how its body is read, and a raw
/// answer in FHIR JSON that is not this Binary's resource is asked for again as JSON.
///
/// What is learned is appended, and sorted by key only when asked: a listing learns a million
/// types and asks for none, and a million inserts into a hash table, each a cache miss, were a
/// tenth of its time; sorting them once takes a few tens of milliseconds.
#[derive(Default)]
struct KnownTypes {
    /// (key, type number), sorted by key, one per key.
    sorted: Vec<(u32, u16)>,
    /// Learned since, in order (the last of a key wins).
    recent: Vec<(u32, u16)>,
    kinds: Vec<Arc<str>>,
    numbers: hashbrown::HashMap<Arc<str>, u16>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl KnownTypes {
    /// How many recent types a question reads through before they are sorted in: at least
    /// this many, and at least a quarter of the sorted ones (so sorting in costs each learned
    /// type a few moves, however they come).
    const RECENT: usize = 4096;

    fn key(&self, id: &str) -> u32 {
        // The high half: the keyed hash's bits are all equally random.
        (std::hash::BuildHasher::hash_one(&self.hasher, id) >> 32) as u32
    }

    fn learn(&mut self, id: &str, kind: &str) {
        // A page's types are mostly the one before.
        let last = self.recent.last().map(|&(_, number)| number);
        let number =
            match last.filter(|&n| self.kinds.get(usize::from(n)).is_some_and(|k| **k == *kind)) {
                Some(number) => number,
                None => match self.numbers.get(kind) {
                    Some(&number) => number,
                    None => {
                        // More distinct types than that is no real server: the rest go unremembered.
                        let Ok(number) = u16::try_from(self.kinds.len()) else { return };
                        let kind: Arc<str> = Arc::from(kind);
                        self.kinds.push(Arc::clone(&kind));
                        self.numbers.insert(kind, number);
                        number
                    }
                },
            };
        let key = self.key(id);
        self.recent.push((key, number));
    }

    fn get(&mut self, id: &str) -> Option<Arc<str>> {
        if self.recent.len() > Self::RECENT.max(self.sorted.len() / 4) {
            self.sort_in();
        }
        let key = self.key(id);
        let number = match self.recent.iter().rev().find(|&&(k, _)| k == key) {
            Some(&(_, number)) => number,
            None => {
                let at = self.sorted.binary_search_by_key(&key, |&(k, _)| k).ok()?;
                self.sorted[at].1
            }
        };
        self.kinds.get(usize::from(number)).cloned()
    }

    /// Sorts the recent types in with the others, the last learned of each key winning.
    fn sort_in(&mut self) {
        let mut recent = std::mem::take(&mut self.recent);
        // Stable: of one key, the last learned comes last.
        recent.sort_by_key(|&(key, _)| key);
        let sorted = std::mem::take(&mut self.sorted);
        let mut merged = Vec::with_capacity(sorted.len() + recent.len());
        let (mut old, mut new) = (sorted.into_iter().peekable(), recent.into_iter().peekable());
        loop {
            let next = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => old.next(),
                (Some(&(a, _)), Some(&(b, _))) if a < b => old.next(),
                // A newer type of the same key replaces the older one.
                (Some(&(a, _)), Some(&(b, _))) if a == b => {
                    old.next();
                    new.next()
                }
                _ => new.next(),
            };
            let Some((key, number)) = next else { break };
            match merged.last_mut() {
                Some((last, kept)) if *last == key => *kept = number,
                _ => merged.push((key, number)),
            }
        }
        self.sorted = merged;
    }
}

#[cfg(test)]
mod known_types_tests {
    use super::KnownTypes;

    #[test]
    fn the_last_type_learned_of_an_id_wins_before_and_after_sorting_in() {
        let mut known = KnownTypes::default();
        // Enough to be sorted in at the first question, and again later.
        for i in 0..10_000 {
            known
                .learn(&format!("id{i}"), if i % 3 == 0 { "image/png" } else { "application/pdf" });
        }
        known.learn("id5", "text/plain");
        assert_eq!(known.get("id5").as_deref(), Some("text/plain"));
        assert!(known.recent.is_empty(), "sorted in at the first question");
        assert_eq!(known.get("id3").as_deref(), Some("image/png"));
        assert_eq!(known.get("id4").as_deref(), Some("application/pdf"));
        assert_eq!(known.get("unknown"), None);
        // Learned again after the sort: found among the recent, then sorted in again.
        known.learn("id4", "image/jpeg");
        assert_eq!(known.get("id4").as_deref(), Some("image/jpeg"));
        for i in 0..5_000 {
            known.learn(&format!("more{i}"), "text/csv");
        }
        known.learn("id3", "application/dicom");
        assert_eq!(known.get("more1").as_deref(), Some("text/csv"));
        assert!(known.recent.is_empty());
        assert_eq!(known.get("id3").as_deref(), Some("application/dicom"));
        assert_eq!(known.get("id4").as_deref(), Some("image/jpeg"));
        assert_eq!(known.sorted.len(), 15_000, "one entry per id");
    }
}

/// One GET to make: where, what to accept, the version held, and the most body to read.
struct Get<'a> {
    url: &'a Url,
    accept: &'a str,
    if_none_match: Option<&'a str>,
    limit: u64,
    /// Told the body's size (Content-Length) before it is read.
    reserve: Option<&'a Reserve<'a>>,
    /// Leave a native body of known length unread, for the caller to stream.
    stream: bool,
    /// Decode a FHIR JSON Binary as its body arrives, instead of keeping the body.
    decode: bool,
}

impl<'a> Get<'a> {
    /// A GET of FHIR JSON read whole, at most `limit` bytes.
    fn json(url: &'a Url, limit: u64) -> Self {
        Self {
            url,
            accept: FHIR_JSON,
            if_none_match: None,
            limit,
            reserve: None,
            stream: false,
            decode: false,
        }
    }
}

/// One answer with its body read, or left to stream.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    /// The response whose body is still to be read (`body` is then empty).
    rest: Option<reqwest::Response>,
    /// The Binary decoded as the body arrived (`body` is then empty).
    binary: Option<Result<fhir::Binary, fhir::FhirError>>,
    /// This request's place among those in flight, held while `rest` is still to be read.
    permit: Permit,
}

/// What a fetch got: everything, or the headers of a body to stream.
enum Got {
    Done(Fetched),
    Streaming(Box<Streaming>),
}

/// A native body of known length whose headers are in and whose bytes are still to be read.
struct Streaming {
    meta: Meta,
    len: u64,
    response: reqwest::Response,
    resume: Resume,
    /// `meta` is still to be completed by a summary read ([`HttpSource::summarised`]), once the
    /// body has started to stream.
    summarise: bool,
    /// The request's place among those in flight, until the body is in.
    permit: Permit,
}

/// How to ask again for a streamed body cut short, and how to know the answer is the same.
struct Resume {
    url: Url,
    accept: String,
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
    content_type: String,
}

impl Resume {
    /// True when `response` announces the same body as the first answer did.
    fn same(&self, response: &reqwest::Response, len: u64) -> bool {
        response.status() == StatusCode::OK
            && response.content_length() == Some(len)
            && response.headers().get(header::ETAG) == self.etag.as_ref()
            && response.headers().get(header::LAST_MODIFIED) == self.last_modified.as_ref()
            && media_type(response.headers()) == self.content_type
    }
}

/// A failed try, and whether trying again may help.
#[derive(Debug)]
struct Failure {
    error: SourceError,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn fatal(error: SourceError) -> Self {
        Self { error, retryable: false, retry_after: None }
    }

    fn transient(error: SourceError) -> Self {
        Self { error, retryable: true, retry_after: None }
    }
}

/// A media type without parameters, lowercased.
fn essence(media_type: &str) -> String {
    media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// `W/"3"` → `3`.
fn version_from_etag(etag: &str) -> Option<String> {
    let tag = etag.trim().trim_start_matches("W/").trim_matches('"');
    (!tag.is_empty()).then(|| tag.to_owned())
}

/// The media type of a response without parameters, lowercased.
fn media_type(headers: &HeaderMap) -> String {
    essence(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or(""))
}

fn header_text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok())
}

fn header_meta(headers: &HeaderMap) -> Meta {
    Meta {
        version_id: header_text(headers, header::ETAG).and_then(version_from_etag),
        last_updated: header_text(headers, header::LAST_MODIFIED)
            .and_then(|d| httpdate::parse_http_date(d).ok()),
        content_type: None,
        security_context: header_text(headers, "x-security-context").map(str::to_owned),
        size: None,
    }
}

/// `Retry-After` in seconds or as an HTTP date, as a wait from now.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = header_text(headers, header::RETRY_AFTER)?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn transport(e: reqwest::Error) -> SourceError {
    // Without the URL: it is logged with the id already, and a query could carry secrets.
    SourceError::Transport(e.without_url().to_string())
}

/// Statuses worth another try: the server is busy or a gateway failed. Never other 4xx.
fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// True when an answer is in the resource's form: FHIR JSON, or `application/json` with a
/// Binary body (some servers label FHIR so).
fn in_resource_form(answer: &Answer) -> bool {
    match media_type(&answer.headers).as_str() {
        FHIR_JSON => true,
        "application/json" => fhir::looks_like_binary(&answer.body),
        _ => false,
    }
}

/// True when an answer in the resource's form is surely Binary `id` itself, not the bytes of a
/// JSON Binary that look like a resource: it names `id` and the version its own ETag names
/// (bytes stored before their version existed would have to guess it).
fn is_the_resource(id: &str, answer: &Answer) -> bool {
    let Some(etag) = header_text(&answer.headers, header::ETAG).and_then(version_from_etag) else {
        return false;
    };
    let (found, version) = match &answer.binary {
        Some(Ok(binary)) => (binary.id.clone(), binary.meta.version_id.clone()),
        Some(Err(_)) => return false,
        None => match fhir::binary_identity(&answer.body) {
            Some(identity) => (identity.id, identity.meta.version_id),
            None => return false,
        },
    };
    found.as_deref() == Some(id) && version == Some(etag)
}

impl HttpSource {
    /// A source for `config`.
    pub fn new(config: HttpConfig) -> Result<Self, SourceError> {
        // HTTP/2 where the server offers it (ALPN over TLS): every request on one connection.
        // Otherwise HTTP/1.1 keep-alive, one connection per request in flight, so keep as many
        // idle as may be in flight at once.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .pool_max_idle_per_host(config.max_requests.max(1))
            .tcp_nodelay(true)
            .user_agent(concat!("fhirfs/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| SourceError::Config(format!("bad CA file: {e}")))?;
            if certs.is_empty() {
                return Err(SourceError::Config("the CA file has no certificate".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(transport)?;
        let base = config.base.as_str().trim_end_matches('/').to_owned();
        let auth = Arc::new(Auth::new(config.token.clone(), client.clone(), config.base.clone()));
        Ok(Self {
            client,
            auth,
            base,
            content_types: std::sync::Mutex::default(),
            raw: std::sync::atomic::AtomicU8::new(RAW_UNKNOWN),
            head_useless: std::sync::atomic::AtomicBool::new(false),
            summary_useless: std::sync::atomic::AtomicBool::new(false),
            limit: Limiter::new(config.max_requests),
            feed: std::sync::Mutex::default(),
            config,
        })
    }

    /// True when `url` has the base URL's origin: only then may it carry the token.
    fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.config.base.origin()
    }
}

impl Source for HttpSource {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        let mut listed = Vec::new();
        self.list_inner(|page, _| listed.extend(page)).await?;
        Ok(listed)
    }

    async fn list_pages<F: FnMut(Vec<Listed>, Option<u64>) + Send>(
        &self,
        page: F,
    ) -> Result<(), SourceError> {
        self.list_inner(page).await
    }

    async fn changes(&self) -> Result<Option<Changes>, SourceError> {
        self.changes_inner().await
    }

    /// HEAD, on a server that has shown it serves native bytes: their `Content-Length` is the
    /// size. Never trusted for a JSON answer (its length is the resource's; some servers say 0).
    async fn stat(&self, id: &str) -> Result<Option<Meta>, SourceError> {
        use std::sync::atomic::Ordering;
        let raw =
            self.raw.load(Ordering::Relaxed) == RAW_PROVEN || self.config.fetch == FetchMode::Raw;
        let known = self.known_type(id);
        let Some(kind) = known.filter(|k| raw && !k.contains("json")) else { return Ok(None) };
        if self.head_useless.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let url = self.binary_url(id)?;
        let mut request = self.client.head(url.clone()).header(header::ACCEPT, &*kind);
        if let Some(token) = self.auth.token().await? {
            request = request.header(header::AUTHORIZATION, token.bearer()?);
        }
        let permit = self.limit.acquire().await;
        let sent = tokio::time::timeout(self.config.timeout, request.send()).await;
        drop(permit);
        let Ok(Ok(response)) = sent else { return Ok(None) };
        self.config.stats.count_status(response.status().as_u16());
        if matches!(response.status().as_u16(), 405 | 501) {
            // HEAD is allowed by the spec but not required: stop asking.
            self.head_useless.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        let headers = response.headers();
        let length = header_text(headers, header::CONTENT_LENGTH).and_then(|l| l.parse().ok());
        if !response.status().is_success() || media_type(headers) != essence(&kind) {
            return Ok(None);
        }
        let Some(size) = length else { return Ok(None) };
        Ok(Some(Meta {
            size: Some(size),
            content_type: Some(kind.to_string()),
            ..header_meta(headers)
        }))
    }

    /// Reads [`PROBE_ID`] with the token: any answer shows that the server is up, and a 401 or
    /// 403 that it refuses the token, which is logged here (one warning; the mount goes up
    /// anyway). `/metadata` would not tell: servers such as Medplum serve it without a login.
    async fn probe(&self) -> Result<(), SourceError> {
        let wait = PROBE_TIMEOUT.min(self.config.timeout);
        let deadline = Instant::now() + wait;
        let url = self.binary_url(PROBE_ID)?;
        let get = Get::json(&url, SUMMARY_LIMIT);
        let probe = async {
            let token = match self.auth.token().await {
                Ok(token) => token,
                // Reported where it failed (auth.rs); the server cannot judge a token not had.
                Err(e) => {
                    debug!(error = %e, "no token to check at start");
                    return Ok(());
                }
            };
            match self.get(&get, deadline).await {
                Err(SourceError::Unauthorized) if token.is_none() => warn!(
                    "the server wants a token (401) and no token is configured; mounted anyway: \
                     reads fail with EACCES"
                ),
                Err(SourceError::Unauthorized) => warn!(
                    "the server refuses the token (401: wrong or expired); mounted anyway: reads \
                     fail with EACCES until it takes one"
                ),
                Err(SourceError::Forbidden) => warn!(
                    "the server does not let the token read Binary (403: scope or permissions); \
                     mounted anyway: reads fail with EACCES"
                ),
                Err(
                    e @ (SourceError::Transport(_)
                    | SourceError::Timeout(_)
                    | SourceError::Config(_)),
                ) => {
                    return Err(e);
                }
                // Up, and the token taken (a 404, as expected), or no way to tell.
                Ok(_)
                | Err(
                    SourceError::NotFound
                    | SourceError::Gone
                    | SourceError::Status(_)
                    | SourceError::BadBody(_)
                    | SourceError::TooLarge { .. }
                    | SourceError::Declined,
                ) => {}
            }
            Ok(())
        };
        tokio::time::timeout(wait, probe).await.unwrap_or(Err(SourceError::Timeout(wait)))
    }

    async fn fetch(&self, id: &str, cached_version: Option<&str>) -> Result<Fetched, SourceError> {
        let deadline = Instant::now() + self.config.timeout;
        let fetch = async {
            match self.fetch_inner(id, cached_version, deadline, &|_| {}, false).await? {
                Got::Done(fetched) => Ok(fetched),
                // Not asked for; should a body come unread anyway, read it here.
                Got::Streaming(streaming) => {
                    let Streaming { mut meta, len, response, resume, summarise, permit } =
                        *streaming;
                    let body = Self::body(response, len).await.map_err(|f| f.error)?;
                    drop(permit);
                    if summarise {
                        meta = self.summarised(id, &resume.url, meta, deadline).await;
                    }
                    Ok(Fetched::Content { meta, bytes: Bytes::from(body) })
                }
            }
        };
        tokio::time::timeout(self.config.timeout, fetch)
            .await
            .map_err(|_| SourceError::Timeout(self.config.timeout))?
    }

    async fn fetch_streaming(
        self: &Arc<Self>,
        id: &str,
        cached_version: Option<&str>,
        reserve: &Reserve<'_>,
    ) -> Result<Streamed, SourceError> {
        let deadline = Instant::now() + self.config.timeout;
        let fetch = self.fetch_inner(id, cached_version, deadline, reserve, true);
        let got = tokio::time::timeout(self.config.timeout, fetch)
            .await
            .map_err(|_| SourceError::Timeout(self.config.timeout))??;
        Ok(match got {
            Got::Done(Fetched::NotModified) => Streamed::NotModified,
            Got::Done(Fetched::Content { meta, bytes }) => {
                Streamed::Content { meta, body: Body::whole(bytes) }
            }
            Got::Streaming(streaming) => {
                let Streaming { mut meta, len, response, resume, summarise, permit } = *streaming;
                let url = resume.url.clone();
                let (body, filler) = Body::filling(len);
                // The body streams in while the summary read completes what the file shows.
                tokio::spawn(Arc::clone(self).fill(response, filler, resume, deadline, permit));
                if summarise {
                    meta = self.summarised(id, &url, meta, deadline).await;
                }
                Streamed::Content { meta, body }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_give_versions() {
        assert_eq!(version_from_etag("W/\"3\"").as_deref(), Some("3"));
        assert_eq!(version_from_etag("\"abc\"").as_deref(), Some("abc"));
        assert_eq!(version_from_etag("W/\"\""), None);
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
        let past = "Wed, 21 Oct 2015 07:28:00 GMT";
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(past));
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn only_busy_and_gateway_statuses_are_retried() {
        for status in [429, 502, 503, 504] {
            assert!(is_transient(StatusCode::from_u16(status).unwrap()), "{status}");
        }
        for status in [400, 401, 403, 404, 405, 406, 410, 500, 501] {
            assert!(!is_transient(StatusCode::from_u16(status).unwrap()), "{status}");
        }
    }

    #[test]
    fn an_answer_is_the_resource_only_with_its_id_and_etag_version() {
        let answer = |etag: Option<&str>, body: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(etag) = etag {
                headers.insert(header::ETAG, HeaderValue::from_str(etag).unwrap());
            }
            let body = body.as_bytes().to_vec();
            let permit = Permit::unlimited();
            Answer { status: StatusCode::OK, headers, body, rest: None, binary: None, permit }
        };
        let resource = r#"{"resourceType":"Binary","id":"a","meta":{"versionId":"2"},
            "contentType":"text/plain"}"#;
        assert!(in_resource_form(&answer(None, resource)));
        assert!(is_the_resource("a", &answer(Some("W/\"2\""), resource)));
        assert!(!is_the_resource("b", &answer(Some("W/\"2\""), resource)), "another id");
        assert!(!is_the_resource("a", &answer(Some("W/\"3\""), resource)), "another version");
        assert!(!is_the_resource("a", &answer(None, resource)), "no ETag to prove it");
        // A JSON Binary's own bytes that look like a resource.
        let lookalike = r#"{"resourceType":"Binary","contentType":"text/plain","data":"aGk="}"#;
        assert!(in_resource_form(&answer(None, lookalike)));
        assert!(!is_the_resource("a", &answer(Some("W/\"2\""), lookalike)));
        assert!(!in_resource_form(&answer(None, r#"{"retries": 3}"#)), "other JSON is content");
    }

    #[test]
    fn summaries_complete_only_the_same_version() {
        let source = HttpSource::new(HttpConfig::new(Url::parse("http://h:1/fhir").unwrap()));
        let source = source.unwrap();
        let second = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let precise = second + Duration::from_millis(250);
        let headers = |version: Option<&str>, time: Option<SystemTime>| Meta {
            version_id: version.map(str::to_owned),
            last_updated: time,
            content_type: Some("application/octet-stream".into()),
            ..Meta::default()
        };
        let summary = |version: Option<&str>| Meta {
            version_id: version.map(str::to_owned),
            last_updated: Some(precise),
            content_type: Some("application/pdf".into()),
            security_context: Some("Patient/1".into()),
            size: None,
        };
        // The same version: the summary's time, type and security context.
        let merged = source.with_summary("a", headers(Some("2"), Some(second)), summary(Some("2")));
        assert_eq!(merged.last_updated, Some(precise));
        assert_eq!(merged.content_type.as_deref(), Some("application/pdf"));
        assert_eq!(merged.security_context.as_deref(), Some("Patient/1"));
        // HAPI: an ETag and no Last-Modified.
        let merged = source.with_summary("a", headers(Some("2"), None), summary(Some("2")));
        assert_eq!(merged.last_updated, Some(precise));
        // Another version, or no way to tell: the headers alone, never the summary's version.
        for (raw, summarised) in [(Some("1"), Some("2")), (Some("1"), None)] {
            let raw = headers(raw, Some(second));
            assert_eq!(source.with_summary("a", raw.clone(), summary(summarised)), raw);
        }
        let unversioned = headers(None, Some(second + Duration::from_secs(1)));
        assert_eq!(source.with_summary("a", unversioned.clone(), summary(Some("2"))), unversioned);
        assert_eq!(
            source.with_summary("a", headers(None, None), summary(Some("2"))),
            headers(None, None)
        );
        // No ETag but the same second: the time, not the version.
        let merged = source.with_summary("a", headers(None, Some(second)), summary(Some("2")));
        assert_eq!((merged.version_id, merged.last_updated), (None, Some(precise)));
    }

    #[test]
    fn binary_urls_keep_the_base_path() {
        let config = HttpConfig::new(Url::parse("http://h:1/fhir/r4/").unwrap());
        let source = HttpSource::new(config).unwrap();
        assert_eq!(source.binary_url("a.b-1").unwrap().as_str(), "http://h:1/fhir/r4/Binary/a.b-1");
    }
}
