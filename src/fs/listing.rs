//! The listing and the names: one search for every caller within `--dir-ttl`, the names it
//! gives (`--extensions`), and size read-ahead for a program that stats the folder in order.

use super::*;

impl<S: Source> FhirFs<S> {
    /// The listing, from the cache or the source (one search however many callers ask). A
    /// full listing streams: its entries show as their pages arrive, and a caller that needs
    /// all of them waits with [`Entries::ready`]. After `--dir-ttl`, a refresh asks the source
    /// only for what changed, where it can tell; in full at least every `--full-relist`.
    pub(super) async fn listing(self: &Arc<Self>) -> Result<Snapshot, FsError> {
        let mut cached = self.listing.lock().await;
        if let Some(listing) = cached.as_ref() {
            match listing.entries.fill() {
                // A search under way is as fresh as a listing gets.
                Fill::Filling => return Ok(Arc::clone(&listing.entries)),
                Fill::Done if listing.at.elapsed() < self.config.dir_ttl => {
                    return Ok(Arc::clone(&listing.entries));
                }
                // Stale, or failed part-way: list again.
                _ => {}
            }
        }
        if let Some(old) = cached
            .as_mut()
            .filter(|l| l.entries.is_done() && l.full_at.elapsed() < self.config.full_relist)
        {
            let started = Instant::now();
            match self.source.changes().await {
                Ok(Some(changes)) => {
                    if let Some(entries) = self.apply_changes(&old.entries, changes) {
                        old.at = started;
                        old.entries = Arc::clone(&entries);
                        Stats::add(&self.stats.refreshes, 1);
                        return Ok(entries);
                    }
                }
                Ok(None) => {}
                Err(e) => debug!(error = %e, "asking what changed failed; listing everything"),
            }
        }
        let started = Instant::now();
        let entries = Entries::filling();
        *cached = Some(Listing { at: started, full_at: started, entries: Arc::clone(&entries) });
        drop(cached);
        // In a task of its own: the listing goes on for the next caller when this one gives up.
        tokio::spawn(Arc::clone(self).fill_listing(Arc::clone(&entries)));
        Ok(entries)
    }

    /// Lists everything into `entries`, a page at a time.
    async fn fill_listing(self: Arc<Self>, entries: Snapshot) {
        // Whatever stops this task (a panic, the runtime shutting down), the listing ends:
        // readdirs waiting for its next page get an error, never a hang.
        let _ends = EndsListing(Arc::clone(&entries));
        // With --extensions a name depends on every id listed (`a` may be named `a.pdf` only
        // if no Binary's id is `a.pdf`), and names a source gives must not clash, so such a
        // listing shows whole, at its end; so does one sorted into folders.
        let streams = !self.config.extensions && !self.source.folders();
        // Pages are taken in by a task of their own: the search reads and parses the next page
        // meanwhile, on another thread. (Unbounded: taking a page in costs less than reading
        // and parsing it, so a page or two wait at most; a bound would stall the paging task,
        // which must not block.)
        let (pages, mut arrived) =
            tokio::sync::mpsc::unbounded_channel::<(Vec<Listed>, Option<u64>)>();
        let taker = {
            let fs = Arc::clone(&self);
            let entries = Arc::clone(&entries);
            tokio::spawn(async move {
                /// How many of the first page show before room is made for the whole listing.
                const FIRST: usize = 64;
                let mut taken = Taken::new(streams);
                while let Some((mut page, total)) = arrived.recv().await {
                    if taken.inos.is_empty() {
                        let rest = page.split_off(page.len().min(FIRST));
                        taken.take(&fs, &entries, page);
                        // Callers waiting for the first files were woken on this thread, and
                        // go first.
                        tokio::task::yield_now().await;
                        // Room for all of them at once: growing by doubling copies the tables
                        // and rehashes the index over and over.
                        if let Some(total) = total {
                            fs.make_room(
                                usize::try_from(total).unwrap_or(0).min(MAX_RESERVE),
                                &entries,
                            );
                        }
                        page = rest;
                    }
                    taken.take(&fs, &entries, page);
                }
                taken
            })
        };
        let result = self
            .source
            .list_pages(|page, total| {
                // Only fails when the taker is gone (it panicked): its end says so below.
                let _ = pages.send((page, total));
            })
            .await;
        drop(pages);
        let Ok(Taken { streams, inos, names, folder_of, .. }) = taker.await else {
            Stats::add(&self.stats.errors, 1);
            let failed = SourceError::BadBody("taking in the listing failed".into());
            entries.end(Err(FsError::source("Binary?", failed)));
            return;
        };
        let refused = match result {
            Ok(()) => None,
            // Binary is not searchable by the spec, and many servers refuse: lookups by id
            // still work, so the folder is just empty. (Refused after some pages, it failed.)
            Err(SourceError::Status(status)) if (400..500).contains(&status) && inos.is_empty() => {
                Some(format!("status {status}"))
            }
            Err(e @ (SourceError::NotFound | SourceError::Gone)) if inos.is_empty() => {
                Some(e.to_string())
            }
            Err(e) => {
                warn!(error = %e, listed = inos.len(), "listing failed");
                Stats::add(&self.stats.errors, 1);
                entries.end(Err(FsError::source("Binary?", e)));
                return;
            }
        };
        if let Some(why) = refused {
            debug!(why, "the server refuses to list Binary; the folder stays empty");
        }
        let entries = self.publish(&inos, names, Some(&entries), streams);
        self.publish_folders(&entries, folder_of);
        drop(inos);
        Stats::add(&self.stats.listings, 1);
        entries.end(Ok(()));
        // After the end: the last readdir need not wait for it.
        give_back_freed_memory();
    }

    /// Makes room for `files` more nodes and, when it streams, entries of the listing.
    fn make_room(&self, files: usize, entries: &Entries) {
        let mut nodes = lock(&self.nodes);
        let new = files.saturating_sub(nodes.by_ino.len());
        nodes.reserve(new);
        drop(nodes);
        lock(&entries.list).reserve(files);
    }

    /// Appends the new files of a page to a listing that streams, named by their ids.
    fn append(&self, entries: &Entries, inos: &[u64]) {
        let mut nodes = lock(&self.nodes);
        // Only this listing's search appends to it: its length is where the page goes.
        let first = entries.len();
        let mut page = Vec::with_capacity(inos.len());
        for &ino in inos {
            let Some(node) = nodes.by_ino.get_mut(&ino).filter(|n| !n.is_vacant()) else {
                continue;
            };
            node.index = Pos::new(first + page.len());
            page.push((ino, Arc::clone(&node.id)));
        }
        drop(nodes);
        entries.push(page);
    }

    /// Applies what changed since the last listing (`old`) and publishes the result: `old`
    /// without what was deleted, each changed file updated in place, new files at the end.
    /// `None` when the changes do not add up (a total that shows deletions not reported):
    /// list everything.
    fn apply_changes(&self, old: &Snapshot, changes: Changes) -> Option<Snapshot> {
        let Changes { changed, deleted, total } = changes;
        let reported = deleted.is_some();
        let deleted: HashSet<String> = deleted.unwrap_or_default().into_iter().collect();
        let mut added = Vec::new();
        let mut seen = HashSet::new();
        let count = changed.len();
        for Listed { id, meta, .. } in changed {
            if deleted.contains(&id) {
                continue;
            }
            let listed = {
                let nodes = lock(&self.nodes);
                nodes.node(&id).is_some_and(|n| n.index.is_some())
            };
            let ino = self.apply_meta(&id, meta, Origin::Listing);
            lock(&self.missing).remove(&id);
            if !listed && seen.insert(ino) {
                added.push(ino);
            }
        }
        let mut gone = Vec::new();
        {
            let mut nodes = lock(&self.nodes);
            for id in &deleted {
                let Some(ino) = nodes.ino(id) else { continue };
                let Some(node) = nodes.by_ino.get_mut(&ino) else { continue };
                if node.index.is_some() {
                    node.listed = Stamp::NONE;
                    node.checked = Stamp::NONE;
                    node.index = Pos::NONE;
                    gone.push(ino);
                }
            }
        }
        let kept = old.len().saturating_sub(gone.len());
        if !reported && total.is_some_and(|total| total != (kept + added.len()) as u64) {
            debug!(?total, listed = kept + added.len(), "the server's total shows deletions");
            return None;
        }
        debug!(changed = count, added = added.len(), deleted = gone.len(), "refreshed the listing");
        let now = Stamp::now();
        let mut inos = Vec::with_capacity(kept + added.len());
        {
            let mut nodes = lock(&self.nodes);
            for (ino, _) in lock(&old.list).iter() {
                let Some(node) = nodes.by_ino.get_mut(ino) else { continue };
                if node.index.is_some() {
                    // The refresh confirms what it did not report changed.
                    node.listed = now;
                    node.checked = now;
                    inos.push(*ino);
                }
            }
        }
        inos.extend(added);
        let now = Instant::now();
        for id in &deleted {
            self.content.invalidate(id.as_str());
            lock(&self.missing).insert(id.clone(), now);
        }
        for ino in gone {
            self.invalidate_kernel(ino);
        }
        Some(self.publish(&inos, HashMap::new(), None, false))
    }

    /// Makes `inos` the listing, in this order: their names (`names` where the source gave
    /// one, else from `--extensions`), positions and the order by name. `entries` holds them
    /// already when they were `streamed` (named by their ids, positions set as they came);
    /// else they become the content of `entries`, or of new entries when there are none.
    fn publish(
        &self,
        inos: &[u64],
        names: HashMap<u64, String>,
        entries: Option<&Snapshot>,
        streamed: bool,
    ) -> Snapshot {
        let old = Arc::clone(&lock(&self.order));
        let mut nodes = lock(&self.nodes);
        let mut kept = InoSet::default();
        if streamed {
            for &ino in inos {
                kept.insert(ino);
            }
        }
        // Positions of the last listing go: a file no longer listed has none.
        for (ino, _) in lock(&old.list).iter() {
            if kept.contains(*ino) {
                continue;
            }
            if let Some(node) = nodes.by_ino.get_mut(ino) {
                node.index = Pos::NONE;
                node.name_index = Pos::NONE;
            }
        }
        drop(kept);
        nodes.by_name.clear();
        let entries = match entries {
            Some(entries) if streamed => Arc::clone(entries),
            _ => {
                let snapshot = self.name_entries(&mut nodes, inos, names);
                match entries {
                    Some(entries) => {
                        entries.replace(snapshot);
                        Arc::clone(entries)
                    }
                    None => Entries::done(snapshot),
                }
            }
        };
        drop(nodes);
        *lock(&self.order) = Arc::clone(&entries);
        // The order by name is sorted when a reader first opens a file (see `name_order`):
        // `ls` of a million files need not wait for it.
        *lock(&self.by_name_order) = None;
        entries
    }

    /// The latest listing's inodes in byte order of their names, as rsync sorts them; sorted
    /// (and each node's position in it set) the first time it is needed after a listing.
    pub(super) fn name_order(&self) -> Arc<Vec<u64>> {
        if let Some(order) = lock(&self.by_name_order).as_ref() {
            return Arc::clone(order);
        }
        let entries = Arc::clone(&lock(&self.order));
        // Sorted from a copy (the names shared, not copied), under no lock: a million names
        // take a few hundred milliseconds, and neither lookups nor a readdir (answered on
        // fuser's own thread) may wait for them.
        let mut list = lock(&entries.list).clone();
        list.sort_unstable_by(|a, b| a.1.as_bytes().cmp(b.1.as_bytes()));
        let by_name: Vec<u64> = list.into_iter().map(|(ino, _)| ino).collect();
        let mut nodes = lock(&self.nodes);
        for (name_index, ino) in by_name.iter().enumerate() {
            if let Some(node) = nodes.by_ino.get_mut(ino) {
                node.name_index = Pos::new(name_index);
            }
        }
        drop(nodes);
        let by_name = Arc::new(by_name);
        let mut held = lock(&self.by_name_order);
        // A listing published meanwhile made its own order stale again: keep that.
        if Arc::ptr_eq(&entries, &lock(&self.order)) {
            *held = Some(Arc::clone(&by_name));
        }
        by_name
    }

    /// The entries of `inos`, named (as the source says, or `--extensions`) and with their
    /// positions set.
    fn name_entries(
        &self,
        nodes: &mut Nodes,
        inos: &[u64],
        mut names: HashMap<u64, String>,
    ) -> Vec<(u64, Arc<str>)> {
        // With --extensions, `a` named `a.pdf` must not hide a Binary whose id is `a.pdf`,
        // nor two files share a name: on a clash the bare id (unique by itself) is the name.
        let ids: HashSet<Arc<str>> = if self.config.extensions {
            inos.iter().filter_map(|ino| Some(Arc::clone(&nodes.by_ino.get(ino)?.id))).collect()
        } else {
            HashSet::new()
        };
        let mut used = HashSet::new();
        let mut snapshot = Vec::with_capacity(inos.len());
        for &ino in inos {
            // (A slot emptied since it was taken in is no file: never an entry without a name.)
            let Some(node) = nodes.by_ino.get(&ino).filter(|n| !n.is_vacant()) else { continue };
            let id = Arc::clone(&node.id);
            let name = names.remove(&ino);
            let name = match name.or_else(|| self.listed_name(&id, node.meta.content_type())) {
                Some(name) if !ids.contains(name.as_str()) && used.insert(name.clone()) => {
                    nodes.by_name.insert(name.clone(), ino);
                    Arc::from(name)
                }
                _ => id,
            };
            if let Some(node) = nodes.by_ino.get_mut(&ino) {
                node.index = Pos::new(snapshot.len());
            }
            snapshot.push((ino, name));
        }
        snapshot
    }

    /// The name with an extension for `id` when --extensions asks for one.
    pub(super) fn listed_name(&self, id: &str, content_type: Option<&str>) -> Option<String> {
        if !self.config.extensions {
            return None;
        }
        let essence = content_type?.split(';').next()?.trim().to_ascii_lowercase();
        let ext = mime2ext::mime2ext(&essence)?;
        let name = format!("{id}.{ext}");
        (!id.ends_with(&format!(".{ext}")) && name.len() <= 255).then_some(name)
    }

    /// Notes a lookup of a listed file whose size is unknown; returns its inode and listing
    /// position when lookups are walking through the listing (time to read sizes ahead), and
    /// whether the walker opened the file it looked up before (it copies: read content ahead).
    pub(super) fn walking(&self, id: &str) -> Option<(u64, usize, bool)> {
        let mut nodes = lock(&self.nodes);
        let ino = nodes.ino(id)?;
        let index = nodes.by_ino.get(&ino)?.index.get()?;
        let streak = match nodes.walk {
            Some((last, streak)) if index > last && index - last <= WALK_GAP => streak + 1,
            _ => 1,
        };
        let copying = std::mem::take(&mut nodes.walk_opened) && streak > 1;
        nodes.walk = Some((index, streak));
        (streak >= READ_AHEAD_AFTER).then_some((ino, index, copying))
    }

    /// Starts size fetches for the listed files after `ino`, a window ahead of a reader that
    /// stats them in order.
    pub(super) fn read_ahead_sizes(self: &Arc<Self>, ino: u64) {
        let order = Arc::clone(&lock(&self.order));
        let mut picked = Vec::new();
        {
            let mut nodes = lock(&self.nodes);
            let Some(start) = nodes.by_ino.get(&ino).and_then(|n| n.index.get()) else {
                return;
            };
            for (next, _) in lock(&order.list).iter().skip(start + 1).take(SIZE_READAHEAD) {
                if let Some(node) = nodes.by_ino.get_mut(next)
                    && node.meta.size.is_none()
                    && !node.prefetching
                {
                    node.prefetching = true;
                    picked.push((*next, node.id.clone()));
                }
            }
        }
        for (ino, id) in picked {
            let this = Arc::clone(self);
            let permits = Arc::clone(&self.prefetch_permits);
            // Behind the readers' own requests; a reader that waits for one makes it urgent.
            let ahead = Ahead::unbounded();
            tokio::spawn(Arc::clone(&ahead).run(async move {
                if let Ok(_permit) = permits.acquire_owned().await {
                    // It may have been fetched by a reader meanwhile.
                    if this.fresh_attr(&id).is_none() {
                        // A HEAD tells the size without the content where the server can;
                        // else the content comes (and stays cached for the read after).
                        match this.source.stat(&id).await {
                            Ok(Some(meta)) if meta.size.is_some() => {
                                this.apply_meta(&id, meta, Origin::Stat);
                            }
                            _ => {
                                if let Err(fetch) = this.start_fetch(&id, Some(ahead)) {
                                    let _ = fetch.await;
                                }
                            }
                        }
                    }
                }
                if let Some(node) = lock(&this.nodes).by_ino.get_mut(&ino) {
                    node.prefetching = false;
                }
            }));
        }
    }
}

/// Hands the memory that a listing's pages and sets took, and freed, back to the system: glibc
/// keeps freed memory for the process by default, and after a million entries that is tens of
/// megabytes the mount never needs again.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's heaps to the kernel; it
    // touches no memory in use and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Ends a listing that is still filling when dropped (see `fill_listing`).
struct EndsListing(Snapshot);

impl Drop for EndsListing {
    fn drop(&mut self) {
        if matches!(self.0.fill(), Fill::Filling) {
            let stopped = SourceError::BadBody("the listing stopped before its end".into());
            self.0.end(Err(FsError::source("Binary?", stopped)));
        }
    }
}

/// What a listing has taken in so far, page by page.
struct Taken {
    /// The listing shows as it arrives (see [`FhirFs::fill_listing`]).
    streams: bool,
    /// The inodes listed, each once.
    seen: InoSet,
    inos: Vec<u64>,
    /// Names and folders the source gave.
    names: HashMap<u64, String>,
    folder_of: HashMap<u64, String>,
}

impl Taken {
    fn new(streams: bool) -> Self {
        Self {
            streams,
            seen: InoSet::default(),
            inos: Vec::new(),
            names: HashMap::new(),
            folder_of: HashMap::new(),
        }
    }

    /// Takes in files of a page.
    fn take<S: Source>(&mut self, fs: &FhirFs<S>, entries: &Entries, mut page: Vec<Listed>) {
        let first = self.inos.len();
        let inos = fs.apply_listed(&mut page);
        let mut missing = lock(&fs.missing);
        for (Listed { id, name, folder, .. }, ino) in page.into_iter().zip(inos) {
            // A server whose pages shift under us may repeat an id; a folder must not.
            if self.seen.insert(ino) {
                if !missing.is_empty() {
                    missing.remove(&id);
                }
                self.inos.push(ino);
                if let Some(name) = name {
                    self.names.insert(ino, name);
                }
                if let Some(folder) = folder {
                    self.folder_of.insert(ino, folder);
                }
            }
        }
        drop(missing);
        self.streams &= self.names.is_empty();
        if self.streams {
            fs.append(entries, &self.inos[first..]);
        }
    }
}
