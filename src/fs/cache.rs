//! The content cache: one fetch per id however many callers ask (single-flight), fetches made
//! ahead of a reader, what a failed or 404 fetch leaves behind, and bodies still arriving.

use super::*;

impl<S: Source> FhirFs<S> {
    /// Forgets what was known about `id` after the server said it is not there.
    pub(super) fn forget_content(&self, id: &str) {
        self.content.invalidate(id);
        let mut nodes = lock(&self.nodes);
        if let Some(node) = nodes.ino(id).and_then(|i| nodes.by_ino.get_mut(&i)) {
            node.meta = NodeMeta::default();
            node.checked = Stamp::NONE;
            node.listed = Stamp::NONE;
        }
    }

    pub(super) fn remember_missing(&self, id: &str) {
        let ttl = self.negative_ttl();
        if ttl.is_zero() {
            return;
        }
        let mut missing = lock(&self.missing);
        if missing.len() >= MAX_NEGATIVE {
            missing.retain(|_, at| at.elapsed() < ttl);
        }
        missing.insert(id.to_owned(), Instant::now());
    }

    /// True when the server said 404 for `id` within the negative TTL.
    pub(super) fn known_missing(&self, id: &str) -> bool {
        let ttl = self.negative_ttl();
        lock(&self.missing).get(id).is_some_and(|at| at.elapsed() < ttl)
    }

    pub(super) fn negative_ttl(&self) -> Duration {
        NEGATIVE_TTL.min(self.config.dir_ttl)
    }

    /// Holds `len` bytes of the cache for `id`'s coming content (an empty entry of that
    /// weight), which makes the cache evict to fit it now.
    pub(super) fn reserve(&self, id: &str, len: u64) {
        // A file larger than the whole cache is never cached: emptying the cache for it
        // would only cost the other files.
        if len > self.config.cache_bytes {
            return;
        }
        let weight = u32::try_from(len).unwrap_or(u32::MAX);
        self.content.insert(id.to_owned(), Slot::reserved(weight));
        self.content.run_pending_tasks();
    }

    /// Removes a reservation that no content came for.
    pub(super) fn drop_reservation(&self, id: &str) {
        if self.content.get(id).is_some_and(|slot| slot.get().is_none()) {
            self.content.invalidate(id);
        }
    }

    /// Cached content of `id` that needs no revalidation (and whose body has not failed: it
    /// leaves the cache a moment later).
    pub(super) fn fresh_content(&self, id: &str) -> Option<Arc<Content>> {
        let cached = self.content.get(id).and_then(|slot| slot.get());
        let content = cached.or_else(|| {
            let oversize = lock(&self.oversize);
            oversize.as_ref().filter(|(held, _)| held == id).map(|(_, c)| Arc::clone(c))
        })?;
        if content.body.failed() {
            return None;
        }
        if content.validated.elapsed() < self.config.cache_ttl {
            return Some(content);
        }
        // A listing within the TTL that still names the same version vouches for the bytes.
        let nodes = lock(&self.nodes);
        let node = nodes.node(id)?;
        let confirmed = is_fresh(node.listed.instant(), self.config.dir_ttl)
            && content.version_id.is_some()
            && node.meta.is_version(content.version_id.as_deref());
        confirmed.then_some(content)
    }

    /// The content of `id`: from the cache, or fetched once however many callers ask at once.
    pub async fn content(self: &Arc<Self>, id: &str) -> Result<Arc<Content>, FsError> {
        let result = match self.start_fetch(id, None) {
            Ok(content) => return Ok(content),
            Err(fetch) => fetch.await,
        };
        let result = match result {
            // A fetch ahead that gave way just before this reader joined it: fetch for the
            // reader (who is held to no read-ahead bound).
            Err(SourceError::Declined) => match self.start_fetch(id, None) {
                Ok(content) => return Ok(content),
                Err(fetch) => fetch.await,
            },
            other => other,
        };
        result.map_err(|e| FsError::source(id, e))
    }

    /// Fetches `id` ahead of a reader, within the read-ahead byte budget.
    pub(super) fn fetch_ahead(self: &Arc<Self>, id: String) {
        let budget = Arc::clone(&self.ahead_budget);
        let key = id.clone();
        let ahead = Ahead::new(Box::new(move |bytes| lock(&budget).admit(&key, bytes)));
        Stats::add(&self.stats.read_ahead, 1);
        if let Err(fetch) = self.start_fetch(&id, Some(ahead)) {
            tokio::spawn(fetch);
        }
    }

    /// The cached content of `id` (Ok), or the fetch that brings it (Err), joined or started.
    /// A reader that joins a fetch made ahead makes it urgent.
    pub(super) fn start_fetch(
        self: &Arc<Self>,
        id: &str,
        ahead: Option<Arc<Ahead>>,
    ) -> Result<Arc<Content>, SharedFetch> {
        let mut inflight = lock(&self.inflight);
        // Checked under the lock: a fetch that just finished has filled the cache already.
        if let Some(content) = self.fresh_content(id) {
            if ahead.is_none() {
                Stats::add(&self.stats.cache_hits, 1);
            }
            return Ok(content);
        }
        if let Some(running) = inflight.get(id) {
            if ahead.is_none() {
                Stats::add(&self.stats.cache_misses, 1);
                if let Some(ahead) = &running.ahead {
                    ahead.make_urgent();
                }
            }
            return Err(running.fetch.clone());
        }
        if ahead.is_none() {
            Stats::add(&self.stats.cache_misses, 1);
        }
        let this = Arc::clone(self);
        let owned = id.to_owned();
        let fetch = async move {
            let result = this.fetch_now(&owned).await;
            lock(&this.inflight).remove(&owned);
            result
        };
        let fetch = match &ahead {
            Some(ahead) => Arc::clone(ahead).run(fetch).boxed(),
            None => fetch.boxed(),
        };
        let fetch = fetch.shared();
        inflight.insert(id.to_owned(), Inflight { fetch: fetch.clone(), ahead });
        // Runs to the end even if every caller gives up, so the map is cleaned up.
        tokio::spawn(fetch.clone());
        Err(fetch)
    }

    pub(super) async fn fetch_now(self: &Arc<Self>, id: &str) -> Result<Arc<Content>, SourceError> {
        let cached = self.content.get(id).and_then(|slot| slot.get());
        // Only bytes all in may be confirmed by a 304: a body still arriving may yet fail.
        let known_version =
            cached.as_ref().filter(|c| c.body.is_complete()).and_then(|c| c.version_id.clone());
        let started = Instant::now();
        // As soon as the size is known, make room: the cache drops older files before the new
        // bytes arrive, so memory stays near the cache size plus one file.
        let reserve = |len: u64| self.reserve(id, len);
        let fetched = self.source.fetch_streaming(id, known_version.as_deref(), &reserve).await;
        let fetched = match fetched {
            // The same version fetched again keeps its generation (and the kernel its pages)
            // only if the bytes are the same: wait for all of them to compare.
            Ok(Streamed::Content { meta, body })
                if cached
                    .as_ref()
                    .is_some_and(|c| c.version_id.is_some() && c.version_id == meta.version_id) =>
            {
                body.outcome().await.map(|()| Streamed::Content { meta, body })
            }
            other => other,
        };
        let content = match fetched {
            Ok(Streamed::NotModified) => {
                let Some(cached) = cached else {
                    return Err(SourceError::BadBody("304 for a version not asked for".into()));
                };
                let meta = Meta {
                    size: Some(cached.body.len()),
                    version_id: cached.version_id.clone(),
                    ..Meta::default()
                };
                self.apply_meta(id, meta, Origin::Fetch);
                Arc::new(Content { validated: Instant::now(), ..Content::clone_of(&cached) })
            }
            Ok(Streamed::Content { mut meta, body }) => {
                meta.size = Some(body.len());
                let same = cached.as_ref().filter(|c| {
                    c.version_id.is_some()
                        && c.version_id == meta.version_id
                        && c.body.same_bytes(&body)
                });
                let generation = match same {
                    Some(c) => c.generation,
                    None => self
                        .on_demand_generation(id, meta.version_id.as_deref())
                        .unwrap_or_else(|| self.next_generation.fetch_add(1, Ordering::Relaxed)),
                };
                let version_id = meta.version_id.clone();
                self.apply_meta(id, meta, Origin::Fetch);
                Arc::new(Content { body, version_id, generation, validated: Instant::now() })
            }
            Err(e) => {
                self.drop_reservation(id);
                self.fetch_failed(id, &e, started);
                return Err(e);
            }
        };
        if content.body.len() > self.config.cache_bytes {
            // The cache cannot hold it; keep just this one until the next such file.
            self.content.invalidate(id);
            *lock(&self.oversize) = Some((id.to_owned(), Arc::clone(&content)));
        } else {
            self.content.insert(id.to_owned(), Slot::new(Arc::clone(&content)));
            // moka evicts lazily, on later cache calls; with large entries that lets the cache
            // overshoot its size by several files. Settle it now.
            self.content.run_pending_tasks();
        }
        // Only once it is cached: a body that fails at once must find its entry to remove.
        if !content.body.is_complete() {
            self.watch_body(id, &content, started);
        }
        Ok(content)
    }

    /// Logs and counts a failed fetch, and forgets what a 404 or 410 made stale. A fetch ahead
    /// of a reader fails quietly: only the reader's own open, which fetches again, reports.
    pub(super) fn fetch_failed(&self, id: &str, e: &SourceError, started: Instant) {
        if *e == SourceError::Declined {
            debug!(id, "a fetch ahead gave way: the file is larger than the read-ahead room");
            return;
        }
        if Ahead::current().is_some_and(|ahead| !ahead.is_urgent()) {
            debug!(id, error = %e, "a fetch ahead failed; the open will ask again");
            return;
        }
        if matches!(e, SourceError::NotFound | SourceError::Gone) {
            // Normal: programs probe names, and Binaries get deleted.
            debug!(id, error = %e, "binary not found");
            self.forget_content(id);
        } else {
            warn!(id, error = %e, elapsed = ?started.elapsed(), "fetch failed");
            Stats::add(&self.stats.errors, 1);
        }
        if *e == SourceError::NotFound {
            self.remember_missing(id);
        }
    }

    /// Follows a body that is still arriving: if the rest never comes, the content leaves the
    /// cache (the next open fetches again) while readers of the missing bytes get the error.
    /// The watcher holds neither the content nor its body, so that a body nobody holds any
    /// more (evicted, every file closed) stops downloading.
    pub(super) fn watch_body(self: &Arc<Self>, id: &str, content: &Arc<Content>, started: Instant) {
        let this = Arc::clone(self);
        let id = id.to_owned();
        let weak = Arc::downgrade(content);
        let outcome = content.body.outcome();
        tokio::spawn(async move {
            let Err(e) = outcome.await else { return };
            // Abandoned: nobody wanted the rest.
            let Some(failed) = weak.upgrade() else { return };
            this.fetch_failed(&id, &e, started);
            let cached = this.content.get(&id).and_then(|slot| slot.get());
            if cached.is_some_and(|c| Arc::ptr_eq(&c, &failed)) {
                this.content.invalidate(&id);
            }
            let mut oversize = lock(&this.oversize);
            if oversize.as_ref().is_some_and(|(_, c)| Arc::ptr_eq(c, &failed)) {
                *oversize = None;
            }
        });
    }

    /// The generation of an open's on-demand body of `version` of `id`: the bytes fetched for
    /// its relay are that version's, cached under the kernel's generation, so that the next
    /// open keeps the pages.
    pub(super) fn on_demand_generation(&self, id: &str, version: Option<&str>) -> Option<u64> {
        let version = version?;
        let nodes = lock(&self.nodes);
        let pin = nodes.node(id)?.pin.as_ref()?;
        let content = &pin.content;
        (content.body.is_on_demand() && content.version_id.as_deref() == Some(version))
            .then_some(content.generation)
    }

    /// Fills `relay` with the bytes of version `expected` of `id`, fetched again (and cached
    /// under the kernel's generation: see [`FhirFs::on_demand_generation`]); an error when the
    /// server has another version now: those bytes must not mix with the pages the kernel kept.
    pub(super) async fn relay(
        self: &Arc<Self>,
        id: &str,
        expected: &str,
        relay: &mut crate::buffer::body::Relay,
    ) -> Result<(), SourceError> {
        let content = self.content(id).await.map_err(|e| match e {
            FsError::Source { source, .. } => source,
            other => SourceError::Transport(other.to_string()),
        })?;
        if content.version_id.as_deref() != Some(expected) {
            return Err(SourceError::BadBody(format!(
                "version {expected} is open, and the server now has another"
            )));
        }
        relay.copy_from(&content.body).await
    }
}
