//! Where Binaries come from: the `Source` trait, its data types, fetches made ahead of a
//! reader, and (with the `test-util` feature) the in-memory source.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::buffer::body::Body;
use crate::error::SourceError;

#[cfg(feature = "test-util")]
mod memory;
#[cfg(feature = "test-util")]
pub use memory::MemorySource;

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
    /// The name the folder shows instead of the id (the documents view names files after
    /// their documents); `None`: the id (or `<id>.<ext>` with `--extensions`).
    pub name: Option<String>,
    /// The folder under the root that holds it, for a source whose [`Source::folders`] is
    /// true (the documents view: the subject); `None`: the root.
    pub folder: Option<String>,
}

/// True when `new` is `old` with the sub-second part that `old` (a whole-second HTTP date) lacks.
pub(crate) fn refines(old: SystemTime, new: SystemTime) -> bool {
    let (Ok(o), Ok(n)) = (old.duration_since(UNIX_EPOCH), new.duration_since(UNIX_EPOCH)) else {
        return false;
    };
    o.subsec_nanos() == 0 && n.subsec_nanos() != 0 && o.as_secs() == n.as_secs()
}

/// What changed in a source since it last listed or reported changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Binaries created or updated (each once, newest state), maybe some that did not change
    /// (a margin covers clock skew and late commits).
    pub changed: Vec<Listed>,
    /// Binaries deleted, when the source reports deletions (a history); `None` when it cannot.
    pub deleted: Option<Vec<String>>,
    /// How many Binaries there are now, when the source says: with `deleted` unknown, a
    /// total that does not add up shows that some were deleted.
    pub total: Option<u64>,
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

    /// Lists every Binary, giving each page to `page` as it arrives, with how many there are
    /// in all when the source knows (`Bundle.total`), so that a large folder shows its first
    /// entries long before its last page (a source without pages gives one). On an error, the
    /// pages given before it stand.
    fn list_pages<F: FnMut(Vec<Listed>, Option<u64>) + Send>(
        &self,
        mut page: F,
    ) -> impl Future<Output = Result<(), SourceError>> + Send {
        async move {
            let listed = self.list().await?;
            let total = listed.len() as u64;
            page(listed, Some(total));
            Ok(())
        }
    }

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

    /// What changed since the last successful [`list`](Self::list) or `changes` (the source
    /// keeps track of when that was, by its own clock). `None`: the source cannot say, or
    /// has not listed yet: list everything.
    fn changes(&self) -> impl Future<Output = Result<Option<Changes>, SourceError>> + Send {
        async { Ok(None) }
    }

    /// True when the source puts its files in folders ([`Listed::folder`]): the root then
    /// lists the folders, and a file is found in its folder only.
    fn folders(&self) -> bool {
        false
    }

    /// True when the source names its files ([`Listed::name`]) and its ids are not names: a
    /// name is then found through the listing only (listed first if need be), never taken
    /// for an id.
    fn names_files(&self) -> bool {
        false
    }

    /// Extended attributes of `id` beyond those the core derives from [`Meta`] (the
    /// documents view tells where a file comes from and whether its hash matched).
    fn xattrs(&self, id: &str) -> Vec<(&'static str, Vec<u8>)> {
        let _ = id;
        Vec::new()
    }

    /// Checks that the source can be reached at all (an answer of any status will do).
    fn probe(&self) -> impl Future<Output = Result<(), SourceError>> + Send {
        async { Ok(()) }
    }
}
