//! The listing and the names: one search for every caller within `--dir-ttl`, the names it
//! gives (`--extensions`), and size read-ahead for a program that stats the folder in order.

use super::*;

impl<S: Source> FhirFs<S> {
    /// The listing, from the cache or the source (one search however many callers ask).
    /// After `--dir-ttl`, a refresh asks the source only for what changed, where it can
    /// tell; in full at least every `--full-relist`.
    pub(super) async fn listing(&self) -> Result<Snapshot, FsError> {
        let mut cached = self.listing.lock().await;
        if let Some(listing) = cached.as_ref().filter(|l| l.at.elapsed() < self.config.dir_ttl) {
            return Ok(Arc::clone(&listing.entries));
        }
        if let Some(old) = cached.as_mut().filter(|l| l.full_at.elapsed() < self.config.full_relist)
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
        let listed = match self.source.list().await {
            Ok(listed) => listed,
            // Binary is not searchable by the spec, and many servers refuse: lookups by id
            // still work, so the folder is just empty.
            Err(SourceError::Status(status)) if (400..500).contains(&status) => {
                debug!(status, "the server refuses to list Binary; the folder stays empty");
                Vec::new()
            }
            Err(e @ (SourceError::NotFound | SourceError::Gone)) => {
                debug!(error = %e, "the server cannot list Binary; the folder stays empty");
                Vec::new()
            }
            Err(e) => {
                warn!(error = %e, "listing failed");
                Stats::add(&self.stats.errors, 1);
                return Err(FsError::source("Binary?", e));
            }
        };
        let entries = self.apply_listing(listed);
        Stats::add(&self.stats.listings, 1);
        *cached = Some(Listing { at: started, full_at: started, entries: Arc::clone(&entries) });
        Ok(entries)
    }

    pub(super) fn apply_listing(&self, listed: Vec<Listed>) -> Snapshot {
        let mut seen = HashSet::with_capacity(listed.len());
        let mut inos = Vec::with_capacity(listed.len());
        let mut names = HashMap::new();
        let mut folder_of = HashMap::new();
        for Listed { id, meta, name, folder } in listed {
            // A server whose pages shift under us may repeat an id; a folder must not.
            let ino = self.apply_meta(&id, meta, Origin::Listing);
            if seen.insert(ino) {
                lock(&self.missing).remove(&id);
                inos.push(ino);
                if let Some(name) = name {
                    names.insert(ino, name);
                }
                if let Some(folder) = folder {
                    folder_of.insert(ino, folder);
                }
            }
        }
        let snapshot = self.publish(inos, names);
        self.publish_folders(&snapshot, folder_of);
        snapshot
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
                nodes.by_id.get(id.as_str()).and_then(|i| nodes.by_ino.get(i)?.index).is_some()
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
                let Some(&ino) = nodes.by_id.get(id.as_str()) else { continue };
                let Some(node) = nodes.by_ino.get_mut(&ino) else { continue };
                if node.index.is_some() {
                    node.listed = None;
                    node.checked = None;
                    node.index = None;
                    gone.push(ino);
                }
            }
        }
        let kept = old.len() - gone.len();
        if !reported && total.is_some_and(|total| total != (kept + added.len()) as u64) {
            debug!(?total, listed = kept + added.len(), "the server's total shows deletions");
            return None;
        }
        debug!(changed = count, added = added.len(), deleted = gone.len(), "refreshed the listing");
        let now = Instant::now();
        let mut inos = Vec::with_capacity(kept + added.len());
        {
            let mut nodes = lock(&self.nodes);
            for (ino, _) in old.iter() {
                let Some(node) = nodes.by_ino.get_mut(ino) else { continue };
                if node.index.is_some() {
                    // The refresh confirms what it did not report changed.
                    node.listed = Some(now);
                    node.checked = Some(now);
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
        Some(self.publish(inos, HashMap::new()))
    }

    /// Makes `inos` the listing, in this order: their names (`names` where the source gave
    /// one, else from `--extensions`), positions and the order by name.
    fn publish(&self, inos: Vec<u64>, mut names: HashMap<u64, String>) -> Snapshot {
        let mut nodes = lock(&self.nodes);
        // Positions of the last listing go: a file no longer listed has none.
        for (ino, _) in lock(&self.order).iter() {
            if let Some(node) = nodes.by_ino.get_mut(ino) {
                node.index = None;
                node.name_index = None;
            }
        }
        nodes.by_name.clear();
        // With --extensions, `a` named `a.pdf` must not hide a Binary whose id is `a.pdf`,
        // nor two files share a name: on a clash the bare id (unique by itself) is the name.
        let ids: HashSet<Arc<str>> = if self.config.extensions {
            inos.iter().filter_map(|ino| Some(Arc::clone(&nodes.by_ino.get(ino)?.id))).collect()
        } else {
            HashSet::new()
        };
        let mut used = HashSet::new();
        let mut snapshot = Vec::with_capacity(inos.len());
        for ino in inos {
            let Some(node) = nodes.by_ino.get(&ino) else { continue };
            let id = Arc::clone(&node.id);
            let name = names.remove(&ino);
            let name =
                match name.or_else(|| self.listed_name(&id, node.meta.content_type.as_deref())) {
                    Some(name) if !ids.contains(name.as_str()) && used.insert(name.clone()) => {
                        nodes.by_name.insert(name.clone(), ino);
                        Arc::from(name)
                    }
                    _ => id,
                };
            if let Some(node) = nodes.by_ino.get_mut(&ino) {
                node.index = Some(snapshot.len());
            }
            snapshot.push((ino, name));
        }
        // Byte order of the names, as rsync sorts them.
        let mut by_name: Vec<usize> = (0..snapshot.len()).collect();
        by_name.sort_unstable_by(|&a, &b| snapshot[a].1.as_bytes().cmp(snapshot[b].1.as_bytes()));
        let by_name: Vec<u64> = by_name.into_iter().map(|i| snapshot[i].0).collect();
        for (name_index, ino) in by_name.iter().enumerate() {
            if let Some(node) = nodes.by_ino.get_mut(ino) {
                node.name_index = Some(name_index);
            }
        }
        drop(nodes);
        let snapshot = Arc::new(snapshot);
        *lock(&self.order) = Arc::clone(&snapshot);
        *lock(&self.by_name_order) = Arc::new(by_name);
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
        let ino = *nodes.by_id.get(id)?;
        let index = nodes.by_ino.get(&ino)?.index?;
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
            let Some(start) = nodes.by_ino.get(&ino).and_then(|n| n.index) else {
                return;
            };
            for (next, _) in order.iter().skip(start + 1).take(SIZE_READAHEAD) {
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
