//! The listing and the names: one search for every caller within `--dir-ttl`, the names it
//! gives (`--extensions`), and size read-ahead for a program that stats the folder in order.

use super::*;

impl<S: Source> FhirFs<S> {
    /// The listing, from the cache or the source (one search however many callers ask).
    pub(super) async fn listing(&self) -> Result<Snapshot, FsError> {
        let mut cached = self.listing.lock().await;
        if let Some(listing) = cached.as_ref().filter(|l| l.at.elapsed() < self.config.dir_ttl) {
            return Ok(Arc::clone(&listing.entries));
        }
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
        *cached = Some(Listing { at: Instant::now(), entries: Arc::clone(&entries) });
        Ok(entries)
    }

    pub(super) fn apply_listing(&self, listed: Vec<Listed>) -> Snapshot {
        let mut seen = HashSet::with_capacity(listed.len());
        let mut entries = Vec::with_capacity(listed.len());
        for Listed { id, meta } in listed {
            // A server whose pages shift under us may repeat an id; a folder must not.
            if seen.insert(id.clone()) {
                lock(&self.missing).remove(&id);
                let name = self.listed_name(&id, meta.content_type.as_deref());
                let ino = self.apply_meta(&id, meta, Origin::Listing);
                entries.push((ino, id, name));
            }
        }
        let mut nodes = lock(&self.nodes);
        nodes.by_name.clear();
        let mut used = HashSet::with_capacity(entries.len());
        let mut snapshot = Vec::with_capacity(entries.len());
        for (index, (ino, id, name)) in entries.into_iter().enumerate() {
            // `a` named `a.pdf` must not hide a Binary whose id is `a.pdf`, nor two files share
            // a name: on a clash the bare id (unique by itself) is the name.
            let name = match name {
                Some(name) if !seen.contains(&name) && used.insert(name.clone()) => {
                    nodes.by_name.insert(name.clone(), ino);
                    name
                }
                _ => id,
            };
            let Some(node) = nodes.by_ino.get_mut(&ino) else { continue };
            node.index = Some(index);
            // The bare id: the node's copy, not a new one.
            let name = if *node.id == *name { Arc::clone(&node.id) } else { Arc::from(name) };
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
