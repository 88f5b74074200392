//! The HTTP source: reads and searches Binary on a FHIR server with reqwest, with retries,
//! deadlines and token renewal.
//!
//! - this module: `HttpSource`, its settings, and the `Source` methods;
//! - [`limit`]: how many requests may be in flight at once, readers first.

pub mod limit;

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
use crate::fhir::{self, FHIR_JSON};
use crate::source::{Ahead, Fetched, Listed, Meta, Reserve, Source, Streamed};
use crate::stats::Stats;
use limit::{Limiter, Permit};

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
    content_types: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// RAW_UNKNOWN, RAW_PROVEN or RAW_REFUSED.
    raw: std::sync::atomic::AtomicU8,
    /// The server answered HEAD with 405 or 501.
    head_useless: std::sync::atomic::AtomicBool,
    /// The server refused `_summary=true` reads or ignored them (sent `data` anyway).
    summary_useless: std::sync::atomic::AtomicBool,
    /// Requests in flight, readers first.
    limit: Limiter,
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

/// One answer with its body read, or left to stream.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    /// The response whose body is still to be read (`body` is then empty).
    rest: Option<reqwest::Response>,
    /// The Binary decoded as the body arrived (`body` is then empty).
    binary: Option<Result<fhir::Binary, String>>,
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
                .map_err(|e| SourceError::Transport(format!("bad CA file: {e}")))?;
            if certs.is_empty() {
                return Err(SourceError::Transport("the CA file has no certificate".into()));
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
            config,
        })
    }

    /// True when `url` has the base URL's origin: only then may it carry the token.
    fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.config.base.origin()
    }

    /// One try: send, check the status, read the body (up to `get.limit` bytes).
    async fn attempt(&self, get: &Get<'_>, token: Option<&Secret>) -> Result<Answer, Failure> {
        let permit = self.limit.acquire().await;
        let mut request =
            self.client.request(Method::GET, get.url.clone()).header(header::ACCEPT, get.accept);
        if let (Some(token), true) = (token, self.same_origin(get.url)) {
            request =
                request.header(header::AUTHORIZATION, token.bearer().map_err(Failure::fatal)?);
        }
        if let Some(version) = get.if_none_match {
            request = request.header(header::IF_NONE_MATCH, format!("W/\"{version}\""));
        }
        // Connection errors are worth a retry; so is a body cut short.
        let response = request.send().await.map_err(|e| {
            self.config.stats.count_status(0);
            Failure::transient(transport(e))
        })?;
        let status = response.status();
        self.config.stats.count_status(status.as_u16());
        let headers = response.headers().clone();
        if is_transient(status) {
            let error = SourceError::from_status(status.as_u16());
            return Err(Failure { error, retryable: true, retry_after: retry_after(&headers) });
        }
        if !status.is_success() && status != StatusCode::NOT_MODIFIED {
            return Err(Failure::fatal(SourceError::from_status(status.as_u16())));
        }
        // A fetch ahead of the reader gives way before reading a body that would not fit.
        if let (Some(ahead), Some(len)) = (Ahead::current(), response.content_length())
            && !ahead.admits(len)
        {
            return Err(Failure::fatal(SourceError::Declined));
        }
        if let (Some(reserve), Some(len)) = (get.reserve, response.content_length())
            && len > 0
            && len <= get.limit
        {
            // JSON carries the content as base64: about 3/4 of the body, decoded in place.
            let kind = media_type(response.headers());
            let json = kind == FHIR_JSON || kind == "application/json";
            reserve(if json { len / 4 * 3 } else { len });
        }
        let native = !matches!(media_type(&headers).as_str(), FHIR_JSON | "application/json");
        let known_len = response.content_length().is_some_and(|len| len > 0 && len <= get.limit);
        if get.stream && status == StatusCode::OK && native && known_len {
            return Ok(Answer {
                status,
                headers,
                body: Vec::new(),
                rest: Some(response),
                binary: None,
                permit,
            });
        }
        if get.decode && status == StatusCode::OK && media_type(&headers) == FHIR_JSON {
            let binary = Some(Self::decoded(response, get.limit).await?);
            return Ok(Answer { status, headers, body: Vec::new(), rest: None, binary, permit });
        }
        let body = Self::body(response, get.limit).await?;
        Ok(Answer { status, headers, body, rest: None, binary: None, permit })
    }

    /// Reads a body into one buffer sized from `Content-Length`.
    async fn body(response: reqwest::Response, limit: u64) -> Result<Vec<u8>, Failure> {
        let declared = response.content_length().filter(|&len| len <= limit);
        let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
        Self::each_chunk(response, limit, |chunk| buf.extend_from_slice(chunk)).await?;
        Ok(buf)
    }

    /// Reads a FHIR JSON Binary, decoding `data` as the body arrives (see [`JsonBinaryDecoder`]);
    /// the body's own faults (too long, cut short) are the read's, the resource's are inside.
    async fn decoded(
        response: reqwest::Response,
        limit: u64,
    ) -> Result<Result<fhir::Binary, String>, Failure> {
        let declared = response.content_length().filter(|&len| len <= limit);
        let mut decoder = JsonBinaryDecoder::new(declared.unwrap_or(0) as usize);
        Self::each_chunk(response, limit, |chunk| decoder.push(chunk)).await?;
        Ok(decoder.finish())
    }

    /// Hands a body to `sink` chunk by chunk, refusing more than `limit` bytes and a body whose
    /// length is not its `Content-Length`. Another task takes the chunks off the connection
    /// meanwhile, so receiving overlaps with what `sink` does (dropping this stops it).
    async fn each_chunk(
        mut response: reqwest::Response,
        limit: u64,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), Failure> {
        let too_large = || Failure::fatal(SourceError::TooLarge { limit });
        let declared = response.content_length();
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let (sender, mut chunks) = tokio::sync::mpsc::channel(READ_AHEAD_CHUNKS);
        let mut reader = tokio::task::JoinSet::new();
        reader.spawn(async move {
            loop {
                let next = response.chunk().await.transpose();
                let last = !matches!(next, Some(Ok(_)));
                if let Some(next) = next
                    && sender.send(next).await.is_err()
                {
                    break;
                }
                if last {
                    break;
                }
            }
        });
        let mut read = 0u64;
        // A fetch ahead without a Content-Length is admitted as its bytes arrive.
        let ahead = Ahead::current().filter(|_| declared.is_none());
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk.map_err(|e| Failure::transient(transport(e)))?;
            read += chunk.len() as u64;
            if read > limit {
                return Err(too_large());
            }
            if ahead.as_ref().is_some_and(|ahead| !ahead.admits(read)) {
                return Err(Failure::fatal(SourceError::Declined));
            }
            sink(&chunk);
        }
        if let Some(declared) = declared.filter(|&len| len != read) {
            let error = format!("body has {read} bytes, Content-Length said {declared}");
            return Err(Failure::transient(SourceError::BadBody(error)));
        }
        Ok(())
    }

    /// GET with retries (transient statuses and connection errors, backing off, honouring
    /// Retry-After, never past `deadline`) and one renewal of the token after a 401.
    async fn get(&self, get: &Get<'_>, deadline: Instant) -> Result<Answer, SourceError> {
        let token = self.auth.token().await?;
        match self.get_with(get, token.as_ref(), deadline).await {
            Err(SourceError::Unauthorized) if self.auth.renew(token.as_ref()).await => {
                debug!(url = %get.url, "401: trying once more with a renewed token");
                let token = self.auth.token().await?;
                self.get_with(get, token.as_ref(), deadline).await
            }
            other => other,
        }
    }

    async fn get_with(
        &self,
        get: &Get<'_>,
        token: Option<&Secret>,
        deadline: Instant,
    ) -> Result<Answer, SourceError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(RETRY_MAX_DELAY)
            .with_max_times(MAX_RETRIES)
            .with_jitter();
        let attempt = || self.attempt(get, token);
        attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|failure: &Failure| failure.retryable)
            .adjust(|failure: &Failure, delay| {
                let wait = failure.retry_after.or(delay)?;
                // A wait that ends past the deadline is no use: give up now with this error.
                (Instant::now() + wait < deadline).then_some(wait)
            })
            .notify(|failure: &Failure, wait| {
                debug!(url = %get.url, error = %failure.error, ?wait, "retrying");
            })
            .await
            .map_err(|failure| failure.error)
    }

    /// The largest JSON body that can hold a Binary of `max_size` bytes (base64 is 4/3 the
    /// size) plus its other elements.
    fn json_limit(&self) -> u64 {
        self.config.max_size.saturating_mul(4) / 3 + (1 << 20)
    }

    fn binary_url(&self, id: &str) -> Result<Url, SourceError> {
        let mut url = Url::parse(&format!("{}/Binary", self.base))
            .map_err(|e| SourceError::Transport(format!("bad base URL: {e}")))?;
        url.path_segments_mut()
            .map_err(|()| SourceError::Transport("base URL cannot have a path".into()))?
            .push(id);
        Ok(url)
    }

    fn check_size(&self, len: usize) -> Result<(), SourceError> {
        if len as u64 > self.config.max_size {
            return Err(SourceError::TooLarge { limit: self.config.max_size });
        }
        Ok(())
    }

    /// The Accept for a raw request of `id`, when this fetch should ask for raw bytes, and
    /// whether the file's type is known (from a listing or an earlier read).
    fn raw_accept(&self, id: &str) -> Option<(String, bool)> {
        use std::sync::atomic::Ordering;
        let known = self.content_types.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned();
        // A Binary that is itself JSON is read as FHIR JSON: its raw form could not be told
        // apart from the resource.
        if known.as_deref().is_some_and(|k| k.contains("json")) {
            return None;
        }
        let raw = match self.config.fetch {
            FetchMode::Json => false,
            FetchMode::Raw => true,
            // Auto asks for raw bytes until the server shows it does not serve them.
            FetchMode::Auto => self.raw.load(Ordering::Relaxed) != RAW_REFUSED,
        };
        let typed = known.is_some();
        raw.then(|| (known.unwrap_or_else(|| "*/*".to_owned()), typed))
    }

    fn learn_content_type(&self, id: &str, content_type: Option<&str>) {
        if let Some(kind) = content_type {
            let mut known = self.content_types.lock().unwrap_or_else(|e| e.into_inner());
            known.insert(id.to_owned(), kind.to_owned());
        }
    }

    async fn fetch_inner(
        &self,
        id: &str,
        cached: Option<&str>,
        deadline: Instant,
        reserve: &Reserve<'_>,
        stream: bool,
    ) -> Result<Got, SourceError> {
        use std::sync::atomic::Ordering;
        let url = self.binary_url(id)?;
        let mut answer = None;
        let raw_accept = self.raw_accept(id);
        // Set when a raw answer in the resource's form may have been a JSON Binary's own bytes.
        let mut ambiguous = false;
        if let Some((accept, _)) = &raw_accept {
            let get = Get {
                url: &url,
                accept,
                if_none_match: cached,
                limit: self.json_limit(),
                reserve: Some(reserve),
                stream,
                decode: true,
            };
            match self.get(&get, deadline).await {
                Ok(a) if a.status == StatusCode::NOT_MODIFIED => {
                    return Ok(Got::Done(Fetched::NotModified));
                }
                // The resource, or the raw bytes of a JSON Binary that look like one (Medplum
                // serves a raw upload typed `application/fhir+json` as it is). Unless it shows
                // that it is the resource, ask for the resource, whose `contentType` says which.
                Ok(a) if in_resource_form(&a) && !is_the_resource(id, &a) => {
                    ambiguous = true;
                }
                Ok(a) => {
                    let kind = media_type(&a.headers);
                    let expected = essence(accept);
                    let verdict = if kind != FHIR_JSON && (kind == expected || accept == "*/*") {
                        RAW_PROVEN
                    } else {
                        RAW_REFUSED
                    };
                    // Only the first answer decides; later ones must not flip a proven server.
                    let _ = self.raw.compare_exchange(
                        RAW_UNKNOWN,
                        verdict,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    answer = Some(a);
                }
                // 406: this server does not serve native bytes; ask for FHIR JSON.
                Err(SourceError::Status(406)) => {
                    self.raw.store(RAW_REFUSED, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let from_raw = answer.is_some();
        let answer = match answer {
            Some(answer) => answer,
            None => {
                let limit = self.json_limit();
                let get = Get {
                    url: &url,
                    accept: FHIR_JSON,
                    if_none_match: cached,
                    limit,
                    reserve: Some(reserve),
                    stream: false,
                    decode: true,
                };
                self.get(&get, deadline).await?
            }
        };
        if answer.status == StatusCode::NOT_MODIFIED {
            return Ok(Got::Done(Fetched::NotModified));
        }
        let kind = media_type(&answer.headers);
        let from_headers = header_meta(&answer.headers);
        // Decide by what the server sent, not by what we asked for.
        let is_fhir = kind == FHIR_JSON
            || (kind == "application/json" && fhir::looks_like_binary(&answer.body));
        if !is_fhir {
            let content_type = (!kind.is_empty()).then(|| kind.clone());
            let mut meta = Meta { content_type, ..from_headers };
            // Raw headers give only whole seconds (HAPI's not even those) and no security
            // context: for a file no listing described, ask for the resource without `data`.
            let described = raw_accept.as_ref().is_some_and(|(_, typed)| *typed);
            let summarise =
                from_raw && !described && cached.is_none() && answer.status == StatusCode::OK;
            if let (Some(response), Some((accept, _))) = (answer.rest, raw_accept) {
                let len = response.content_length().unwrap_or(0);
                self.check_size(usize::try_from(len).unwrap_or(usize::MAX))?;
                let etag = answer.headers.get(header::ETAG).cloned();
                let last_modified = answer.headers.get(header::LAST_MODIFIED).cloned();
                let resume = Resume { url, accept, etag, last_modified, content_type: kind };
                let permit = answer.permit;
                let streaming = Streaming { meta, len, response, resume, summarise, permit };
                return Ok(Got::Streaming(Box::new(streaming)));
            }
            if summarise {
                meta = self.summarised(id, &url, meta, deadline).await;
            }
            self.check_size(answer.body.len())?;
            return Ok(Got::Done(Fetched::Content { meta, bytes: Bytes::from(answer.body) }));
        }
        let binary = match answer.binary {
            Some(decoded) => decoded,
            None => fhir::decode_binary(answer.body),
        };
        let binary = binary.map_err(SourceError::BadBody)?;
        self.learn_content_type(id, binary.meta.content_type.as_deref());
        if ambiguous && !binary.meta.content_type.as_deref().is_some_and(|k| k.contains("json")) {
            // Not a JSON Binary, so the raw request got the resource: this server answers
            // `*/*` with FHIR JSON.
            let _ = self.raw.compare_exchange(
                RAW_UNKNOWN,
                RAW_REFUSED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let mut meta = binary.meta;
        meta.version_id = meta.version_id.or(from_headers.version_id);
        meta.last_updated = meta.last_updated.or(from_headers.last_updated);
        meta.security_context = meta.security_context.or(from_headers.security_context);
        if let Some(data) = binary.data {
            self.check_size(data.len())?;
            return Ok(Got::Done(Fetched::Content { meta, bytes: pool::bytes(data) }));
        }
        // No `data`: some servers keep the bytes outside the resource and only serve them raw.
        // Ask for the native form before calling the file empty.
        self.fetch_raw(id, &url, meta, binary.subsetted, deadline).await.map(Got::Done)
    }

    /// The Binary without `data` (`_summary=true`): its times to the millisecond and its type,
    /// for a raw read of a file no listing has described. `None` when the server cannot say;
    /// a server that ignores `_summary` (sends `data`) or refuses that kind of request (405,
    /// 406, 501) is not asked again.
    async fn summary(&self, url: &Url, deadline: Instant) -> Option<fhir::Binary> {
        use std::sync::atomic::Ordering;
        if self.summary_useless.load(Ordering::Relaxed) {
            return None;
        }
        let mut url = url.clone();
        url.query_pairs_mut().append_pair("_summary", "true");
        let get = Get {
            url: &url,
            accept: FHIR_JSON,
            if_none_match: None,
            limit: SUMMARY_LIMIT,
            reserve: None,
            stream: false,
            decode: false,
        };
        let (summary, useless) = match self.get(&get, deadline).await {
            Ok(answer)
                if matches!(
                    media_type(&answer.headers).as_str(),
                    FHIR_JSON | "application/json"
                ) =>
            {
                match fhir::decode_binary(answer.body) {
                    // `data` came anyway: the server ignores `_summary`.
                    Ok(binary) => {
                        let ignored = binary.data.is_some();
                        (Some(binary), ignored)
                    }
                    Err(_) => (None, false),
                }
            }
            // Ignored (the whole Binary is coming) or refused as a kind of request. Any other
            // failure may be about this one id or this one moment: ask again next time.
            Err(SourceError::TooLarge { .. } | SourceError::Status(405 | 406 | 501)) => {
                (None, true)
            }
            Ok(_) | Err(_) => (None, false),
        };
        if useless {
            debug!("the server does not answer `_summary=true` reads: no longer asking");
            self.summary_useless.store(true, Ordering::Relaxed);
        }
        summary
    }

    /// `meta` completed by a summary read, awaited at most [`SUMMARY_WAIT`] and half the time
    /// left before `deadline`.
    async fn summarised(&self, id: &str, url: &Url, meta: Meta, deadline: Instant) -> Meta {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = SUMMARY_WAIT.min(left / 2);
        match tokio::time::timeout(wait, self.summary(url, deadline)).await {
            Ok(Some(summary)) => self.with_summary(id, meta, summary.meta),
            _ => meta,
        }
    }

    /// `meta` from a raw answer's headers, completed by the summary read after it when both
    /// surely describe the same version: the same versionId, or (without an ETag) the same
    /// second as `Last-Modified`. `meta.lastUpdated` has the milliseconds `Last-Modified` lacks.
    /// The summary's versionId is never taken: the bytes are the raw answer's.
    fn with_summary(&self, id: &str, meta: Meta, summary: Meta) -> Meta {
        let same_version = match (&meta.version_id, &summary.version_id) {
            (Some(raw), Some(summarised)) => raw == summarised,
            (None, _) => match (meta.last_updated, summary.last_updated) {
                (Some(header), Some(summarised)) => {
                    header == summarised || crate::source::refines(header, summarised)
                }
                _ => false,
            },
            (Some(_), None) => false,
        };
        if !same_version {
            debug!(id, "the summary read may describe another version: keeping the headers'");
            return meta;
        }
        self.learn_content_type(id, summary.content_type.as_deref());
        Meta {
            version_id: meta.version_id,
            last_updated: summary.last_updated.or(meta.last_updated),
            content_type: summary.content_type.or(meta.content_type),
            security_context: summary.security_context.or(meta.security_context),
            size: meta.size,
        }
    }

    /// The native bytes of Binary `id`, whose FHIR JSON (`meta`) came without `data`. Only an
    /// answer may make the file empty: a success with an empty body, or one that shows the
    /// server has no native form (404, 406, 415, or the same resource again). Any other outcome
    /// is the read's, with the errno a first read would get: 401/403 EACCES, a 5xx after the
    /// retries, a network error or the deadline EIO.
    async fn fetch_raw(
        &self,
        id: &str,
        url: &Url,
        meta: Meta,
        subsetted: bool,
        deadline: Instant,
    ) -> Result<Fetched, SourceError> {
        let no_native_form = |meta: Meta, why: &str| {
            if subsetted {
                return Err(SourceError::BadBody(
                    "the server left `data` out of a full read".into(),
                ));
            }
            debug!(id, why, "no native form either: the Binary is empty");
            Ok(Fetched::Content { meta, bytes: Bytes::new() })
        };
        // The raw bytes of a JSON Binary (or one of no known type) may be in the resource's
        // form themselves.
        let own_json = meta.content_type.as_deref().is_none_or(|kind| kind.contains("json"));
        let accept = match meta.content_type.as_deref() {
            Some(kind) if !kind.contains("json") => kind.to_owned(),
            _ => "*/*".to_owned(),
        };
        let limit = self.config.max_size;
        let get = Get {
            url,
            accept: &accept,
            if_none_match: None,
            limit,
            reserve: None,
            stream: false,
            decode: false,
        };
        let answer = match self.get(&get, deadline).await {
            Ok(answer) if answer.status == StatusCode::NOT_MODIFIED => {
                return Err(SourceError::BadBody("304 to a read that named no version".into()));
            }
            Ok(answer) => answer,
            // The raw form is not known (404) or cannot be had in any type asked for (406,
            // 415): there is none.
            Err(e @ (SourceError::NotFound | SourceError::Status(406 | 415))) => {
                return no_native_form(meta, &e.to_string());
            }
            Err(e) => return Err(e),
        };
        if in_resource_form(&answer) {
            match fhir::binary_identity(&answer.body) {
                // This resource again (HFS, Microsoft): the server has no other form of it.
                Some(again) if again.id.as_deref() == Some(id) => {
                    let headers = header_meta(&answer.headers);
                    let same = again.meta.version_id.or(headers.version_id) == meta.version_id
                        && again.meta.last_updated.or(headers.last_updated) == meta.last_updated;
                    if !same || again.has_data {
                        let changed = "the resource changed between its JSON and its raw read";
                        return Err(SourceError::BadBody(changed.into()));
                    }
                    return no_native_form(meta, "the raw read answered the same resource");
                }
                // A JSON Binary's own bytes.
                _ if own_json => {}
                _ => {
                    let other = "the raw read answered FHIR JSON that is not this Binary";
                    return Err(SourceError::BadBody(other.into()));
                }
            }
        }
        let from_headers = header_meta(&answer.headers);
        let merged = Meta {
            version_id: meta.version_id.or(from_headers.version_id),
            last_updated: meta.last_updated.or(from_headers.last_updated),
            content_type: meta.content_type.or(Some(media_type(&answer.headers))),
            security_context: meta.security_context.or(from_headers.security_context),
            size: None,
        };
        Ok(Fetched::Content { meta: merged, bytes: Bytes::from(answer.body) })
    }

    /// Reads a streamed body into `filler` as it arrives, within the fetch's deadline. A body
    /// cut short is asked for again (as often as a GET is retried): the new answer must
    /// announce the same length, ETag and type and repeat the bytes already read, or the
    /// readers get an error rather than a mix of two versions.
    async fn fill(
        self: Arc<Self>,
        mut response: reqwest::Response,
        mut filler: Filler,
        resume: Resume,
        deadline: Instant,
        mut permit: Permit,
    ) {
        let len = response.content_length().unwrap_or(0);
        let changed = || SourceError::BadBody("the Binary changed while it was being read".into());
        let mut resumes = 0;
        // Where the current response is in the body.
        let mut at = 0u64;
        loop {
            let chunk = tokio::time::timeout_at(deadline.into(), response.chunk()).await;
            let error = match chunk {
                Ok(Ok(Some(chunk))) => {
                    if filler.abandoned() {
                        debug!(url = %resume.url, "nobody reads this body any more: stopped");
                        return;
                    }
                    let repeated = filler.written().saturating_sub(at).min(chunk.len() as u64);
                    if !filler.matches(at, &chunk[..repeated as usize]) {
                        return filler.fail(changed());
                    }
                    at += chunk.len() as u64;
                    if let Err(e) = filler.push(&chunk[repeated as usize..]) {
                        return filler.fail(e);
                    }
                    continue;
                }
                Ok(Ok(None)) if filler.written() == len => {
                    let _ = filler.finish();
                    return;
                }
                Ok(Ok(None)) => SourceError::BadBody(format!(
                    "body has {} bytes, Content-Length said {len}",
                    filler.written()
                )),
                Ok(Err(e)) => transport(e),
                Err(_) => return filler.fail(SourceError::Timeout(self.config.timeout)),
            };
            resumes += 1;
            if resumes > MAX_RETRIES {
                return filler.fail(error);
            }
            debug!(url = %resume.url, %error, "body cut short: asking again");
            // This request is over: its place goes back before the next one waits for one.
            drop(permit);
            let get = Get {
                url: &resume.url,
                accept: &resume.accept,
                if_none_match: None,
                limit: len,
                reserve: None,
                stream: true,
                decode: false,
            };
            // The retries keep their waits inside the deadline; the deadline bounds the rest.
            let again = tokio::time::timeout_at(deadline.into(), self.get(&get, deadline)).await;
            let again = again.unwrap_or(Err(SourceError::Timeout(self.config.timeout)));
            match again {
                Ok(Answer { rest: Some(again), permit: held, .. }) if resume.same(&again, len) => {
                    response = again;
                    permit = held;
                    at = 0;
                }
                Ok(_) => return filler.fail(changed()),
                Err(e) => return filler.fail(e),
            }
        }
    }

    async fn list_inner(&self) -> Result<Vec<Listed>, SourceError> {
        let mut url = Url::parse(&format!("{}/Binary", self.base))
            .map_err(|e| SourceError::Transport(format!("bad base URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("_count", &self.config.page_size.to_string())
            .append_pair("_elements", "id,meta,contentType");
        let mut seen = HashSet::new();
        let mut listed = Vec::new();
        loop {
            if !seen.insert(url.to_string()) {
                return Err(SourceError::BadBody(format!("the next link loops back to {url}")));
            }
            let deadline = Instant::now() + self.config.timeout;
            let page = tokio::time::timeout(self.config.timeout, self.page(&url, deadline))
                .await
                .map_err(|_| SourceError::Timeout(self.config.timeout))??;
            if page.skipped > 0 {
                debug!(
                    skipped = page.skipped,
                    "search entries that are not Binaries with valid ids"
                );
            }
            for entry in &page.entries {
                self.learn_content_type(&entry.id, entry.meta.content_type.as_deref());
            }
            listed.extend(page.entries);
            let Some(next) = page.next else { break };
            // The link is opaque: used as given, only resolved when relative.
            url = url
                .join(&next)
                .map_err(|e| SourceError::BadBody(format!("bad next link {next:?}: {e}")))?;
        }
        Ok(listed)
    }

    async fn page(&self, url: &Url, deadline: Instant) -> Result<fhir::Page, SourceError> {
        let limit = self.json_limit();
        let get = Get {
            url,
            accept: FHIR_JSON,
            if_none_match: None,
            limit,
            reserve: None,
            stream: false,
            decode: false,
        };
        let answer = self.get(&get, deadline).await?;
        fhir::parse_bundle(&answer.body).map_err(SourceError::BadBody)
    }
}

impl Source for HttpSource {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        self.list_inner().await
    }

    /// HEAD, on a server that has shown it serves native bytes: their `Content-Length` is the
    /// size. Never trusted for a JSON answer (its length is the resource's; some servers say 0).
    async fn stat(&self, id: &str) -> Result<Option<Meta>, SourceError> {
        use std::sync::atomic::Ordering;
        let raw =
            self.raw.load(Ordering::Relaxed) == RAW_PROVEN || self.config.fetch == FetchMode::Raw;
        let known = self.content_types.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned();
        let Some(kind) = known.filter(|k| raw && !k.contains("json")) else { return Ok(None) };
        if self.head_useless.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let url = self.binary_url(id)?;
        let mut request = self.client.head(url.clone()).header(header::ACCEPT, &kind);
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
        Ok(Some(Meta { size: Some(size), content_type: Some(kind), ..header_meta(headers) }))
    }

    /// Reads [`PROBE_ID`] with the token: any answer shows that the server is up, and a 401 or
    /// 403 that it refuses the token, which is logged here (one warning; the mount goes up
    /// anyway). `/metadata` would not tell: servers such as Medplum serve it without a login.
    async fn probe(&self) -> Result<(), SourceError> {
        let wait = PROBE_TIMEOUT.min(self.config.timeout);
        let deadline = Instant::now() + wait;
        let url = self.binary_url(PROBE_ID)?;
        let get = Get {
            url: &url,
            accept: FHIR_JSON,
            if_none_match: None,
            limit: SUMMARY_LIMIT,
            reserve: None,
            stream: false,
            decode: false,
        };
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
                Err(e @ (SourceError::Transport(_) | SourceError::Timeout(_))) => return Err(e),
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
