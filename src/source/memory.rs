//! `MemorySource`: Binaries held in memory, with request counters and a gate that holds
//! fetches, for tests of the core without a server (the `test-util` feature).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::watch;

use super::*;

#[derive(Default)]
struct MemState {
    binaries: BTreeMap<String, (Meta, Bytes)>,
    errors: BTreeMap<String, SourceError>,
    list_error: Option<SourceError>,
    /// Names and folders given to Binaries ([`MemorySource::place`]).
    places: BTreeMap<String, (Option<String>, String)>,
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

    /// Lists `id` as `name`, in `folder`. The source then names its files and finds them by
    /// name only; Binaries without a place (or, once one has a folder, without a folder) are
    /// not listed.
    pub fn place(&self, id: &str, folder: Option<&str>, name: &str) {
        let place = (folder.map(str::to_owned), name.to_owned());
        self.state().places.insert(id.to_owned(), place);
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

impl MemorySource {
    fn folders_of(&self, state: &MemState) -> bool {
        state.places.values().any(|(folder, _)| folder.is_some())
    }
}

impl Source for MemorySource {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        let state = self.state();
        if let Some(e) = &state.list_error {
            return Err(e.clone());
        }
        let folders = self.folders_of(&state);
        let listed = state.binaries.iter().filter_map(|(id, (meta, _))| {
            let place = state.places.get(id);
            let placed = place.is_some_and(|(folder, _)| folder.is_some() || !folders);
            if !state.places.is_empty() && !placed {
                return None;
            }
            Some(Listed {
                id: id.clone(),
                meta: meta.clone(),
                name: place.map(|(_, name)| name.clone()),
                folder: place.and_then(|(folder, _)| folder.clone()),
            })
        });
        Ok(listed.collect())
    }

    fn names_files(&self) -> bool {
        !self.state().places.is_empty()
    }

    fn folders(&self) -> bool {
        self.folders_of(&self.state())
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
