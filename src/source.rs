//! Where Binaries come from: the `Source` trait, its data types, and the in-memory source.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;

use crate::buffer::body::Body;
use crate::error::SourceError;

/// What is known about one Binary besides its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// `meta.versionId` (or the weak ETag).
    pub version_id: Option<String>,
    /// `meta.lastUpdated` (or `Last-Modified`).
    pub last_updated: Option<SystemTime>,
    /// `contentType`.
    pub content_type: Option<String>,
    /// `securityContext.reference`.
    pub security_context: Option<String>,
    /// Exact decoded size in bytes, when known.
    pub size: Option<u64>,
}

/// One Binary found by a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The Binary id (already checked against the FHIR id pattern).
    pub id: String,
    /// Its metadata; `size` comes from the base64 length when the entry carried `data`.
    pub meta: Meta,
}

/// True when `new` is `old` with the sub-second part that `old` (a whole-second HTTP date) lacks.
pub(crate) fn refines(old: SystemTime, new: SystemTime) -> bool {
    let (Ok(o), Ok(n)) = (old.duration_since(UNIX_EPOCH), new.duration_since(UNIX_EPOCH)) else {
        return false;
    };
    o.subsec_nanos() == 0 && n.subsec_nanos() != 0 && o.as_secs() == n.as_secs()
}

/// The answer to a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The server confirmed that the version the caller holds is current (304).
    NotModified,
    /// The full content; `meta.size` equals `bytes.len()`.
    Content {
        /// What the response said about the Binary.
        meta: Meta,
        /// The decoded bytes.
        bytes: Bytes,
    },
}

/// The answer to a fetch whose content may still be arriving.
#[derive(Debug)]
pub enum Streamed {
    /// The server confirmed that the version the caller holds is current (304).
    NotModified,
    /// The content, complete or filling; `meta.size` equals `body.len()`.
    Content {
        /// What the response said about the Binary.
        meta: Meta,
        /// The decoded bytes, readable as they arrive.
        body: Arc<Body>,
    },
}

/// Told the size of content about to arrive.
pub type Reserve<'a> = dyn Fn(u64) + Send + Sync + 'a;

/// Asked whether a fetch made ahead may hold `bytes` bytes in all (see [`Ahead`]).
pub type Admit = dyn Fn(u64) -> bool + Send + Sync;

/// A fetch made ahead of a reader (read-ahead across files). A source runs it behind the
/// reader's own requests, and gives it up ([`SourceError::Declined`]) when its content would
/// not fit what the core admits ahead of the reader. Once a reader waits for the fetch
/// ([`Ahead::make_urgent`]) it is a reader's fetch: first in line, and held to no byte bound.
///
/// The core passes it to the source as a task-local ([`Ahead::run`], [`Ahead::current`]),
/// so that the [`Source`] methods keep their shape for the fetches of readers.
pub struct Ahead {
    urgent: AtomicBool,
    woken: tokio::sync::Notify,
    admit: Box<Admit>,
}

tokio::task_local! {
    static AHEAD: Arc<Ahead>;
}

impl Ahead {
    /// A fetch ahead, whose content may take as many bytes as `admit` allows.
    pub fn new(admit: Box<Admit>) -> Arc<Self> {
        Arc::new(Self { urgent: AtomicBool::new(false), woken: tokio::sync::Notify::new(), admit })
    }

    /// A fetch ahead with no byte bound (only its place in line).
    pub fn unbounded() -> Arc<Self> {
        Self::new(Box::new(|_| true))
    }

    /// Runs `future` as this fetch ahead: [`Ahead::current`] inside it returns `self`.
    pub async fn run<F: Future>(self: Arc<Self>, future: F) -> F::Output {
        AHEAD.scope(self, future).await
    }

    /// The fetch ahead being run, if the current task runs one.
    pub fn current() -> Option<Arc<Self>> {
        AHEAD.try_with(Arc::clone).ok()
    }

    /// A reader waits for this fetch now.
    pub fn make_urgent(&self) {
        self.urgent.store(true, Ordering::SeqCst);
        self.woken.notify_waiters();
    }

    /// True once a reader waits for this fetch.
    pub fn is_urgent(&self) -> bool {
        self.urgent.load(Ordering::SeqCst)
    }

    /// Resolves once a reader waits for this fetch.
    pub async fn urgent(&self) {
        let woken = self.woken.notified();
        tokio::pin!(woken);
        // Registered before the check, so a wake between the two is not missed.
        woken.as_mut().enable();
        if !self.is_urgent() {
            woken.await;
        }
    }

    /// Whether the content may hold `bytes` bytes in all: always, once urgent.
    pub fn admits(&self, bytes: u64) -> bool {
        self.is_urgent() || (self.admit)(bytes)
    }
}

/// A store of Binaries: list them all, fetch one.
pub trait Source: Send + Sync + 'static {
    /// Lists every Binary, all pages followed.
    fn list(&self) -> impl Future<Output = Result<Vec<Listed>, SourceError>> + Send;

    /// Fetches one Binary. With `cached_version`, the source may answer `NotModified`.
    fn fetch(
        &self,
        id: &str,
        cached_version: Option<&str>,
    ) -> impl Future<Output = Result<Fetched, SourceError>> + Send;

    /// `fetch`, answering as soon as the size and the metadata are known, with a body that
    /// fills as the bytes arrive (a source that cannot stream answers with the whole body).
    /// `reserve` is told how many bytes the content will take as soon as the source knows,
    /// so that the cache can make room before they arrive.
    fn fetch_streaming(
        self: &Arc<Self>,
        id: &str,
        cached_version: Option<&str>,
        reserve: &Reserve<'_>,
    ) -> impl Future<Output = Result<Streamed, SourceError>> + Send {
        let _ = reserve;
        async move {
            Ok(match self.fetch(id, cached_version).await? {
                Fetched::NotModified => Streamed::NotModified,
                Fetched::Content { meta, bytes } => {
                    Streamed::Content { meta, body: Body::whole(bytes) }
                }
            })
        }
    }

    /// The metadata of one Binary with its exact size, when the source can tell without
    /// sending the content (None: it cannot; fetch instead).
    fn stat(&self, id: &str) -> impl Future<Output = Result<Option<Meta>, SourceError>> + Send {
        let _ = id;
        async { Ok(None) }
    }

    /// Checks that the source can be reached at all (an answer of any status will do).
    fn probe(&self) -> impl Future<Output = Result<(), SourceError>> + Send {
        async { Ok(()) }
    }
}

#[derive(Default)]
struct MemState {
    binaries: BTreeMap<String, (Meta, Bytes)>,
    errors: BTreeMap<String, SourceError>,
    list_error: Option<SourceError>,
}

/// An in-memory source for tests and experiments, with request counters and a gate that
/// holds fetches until released.
pub struct MemorySource {
    state: Mutex<MemState>,
    fetches: AtomicU64,
    ahead_fetches: AtomicU64,
    lists: AtomicU64,
    open: watch::Sender<bool>,
    started: watch::Sender<u64>,
}

impl Default for MemorySource {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            fetches: AtomicU64::new(0),
            ahead_fetches: AtomicU64::new(0),
            lists: AtomicU64::new(0),
            open: watch::Sender::new(true),
            started: watch::Sender::new(0),
        }
    }
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a Binary (a new version when the id exists).
    pub fn put(&self, id: &str, content_type: &str, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        let mut state = self.state();
        let version = state.binaries.get(id).and_then(|(m, _)| m.version_id.clone());
        let version = version.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
        let meta = Meta {
            version_id: Some(version.to_string()),
            last_updated: Some(SystemTime::now()),
            content_type: Some(content_type.to_owned()),
            security_context: None,
            size: Some(bytes.len() as u64),
        };
        state.binaries.insert(id.to_owned(), (meta, bytes));
    }

    /// Removes a Binary: fetches then fail with 404.
    pub fn remove(&self, id: &str) {
        self.state().binaries.remove(id);
    }

    /// Makes fetches of `id` fail with `error` (None clears it).
    pub fn set_error(&self, id: &str, error: Option<SourceError>) {
        let mut state = self.state();
        match error {
            Some(e) => state.errors.insert(id.to_owned(), e),
            None => state.errors.remove(id),
        };
    }

    /// Makes listings fail with `error` (None clears it).
    pub fn set_list_error(&self, error: Option<SourceError>) {
        self.state().list_error = error;
    }

    /// How many fetches were made.
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }

    /// How many of the fetches were made ahead of a reader ([`Ahead`]).
    pub fn ahead_fetch_count(&self) -> u64 {
        self.ahead_fetches.load(Ordering::SeqCst)
    }

    /// How many listings were made.
    pub fn list_count(&self) -> u64 {
        self.lists.load(Ordering::SeqCst)
    }

    /// Holds every fetch (after it is counted) until `release` is called.
    pub fn hold(&self) {
        self.open.send_replace(false);
    }

    /// Lets held fetches go on.
    pub fn release(&self) {
        self.open.send_replace(true);
    }

    /// Waits until at least `n` fetches have started.
    pub async fn wait_for_fetches(&self, n: u64) {
        let mut started = self.started.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = started.wait_for(|&count| count >= n).await;
    }
}

impl Source for MemorySource {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        let state = self.state();
        if let Some(e) = &state.list_error {
            return Err(e.clone());
        }
        let listed = state
            .binaries
            .iter()
            .map(|(id, (meta, _))| Listed { id: id.clone(), meta: meta.clone() });
        Ok(listed.collect())
    }

    async fn fetch(&self, id: &str, cached_version: Option<&str>) -> Result<Fetched, SourceError> {
        let ahead = Ahead::current();
        if ahead.is_some() {
            self.ahead_fetches.fetch_add(1, Ordering::SeqCst);
        }
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.started.send_modify(|n| *n += 1);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|&open| open).await;
        let state = self.state();
        if let Some(e) = state.errors.get(id) {
            return Err(e.clone());
        }
        let (meta, bytes) = state.binaries.get(id).ok_or(SourceError::NotFound)?;
        if cached_version.is_some() && cached_version == meta.version_id.as_deref() {
            return Ok(Fetched::NotModified);
        }
        if ahead.is_some_and(|ahead| !ahead.admits(bytes.len() as u64)) {
            return Err(SourceError::Declined);
        }
        Ok(Fetched::Content { meta: meta.clone(), bytes: bytes.clone() })
    }
}
