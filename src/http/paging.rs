//! Paging through a search: `Binary?_count=N&_elements=...`, following `next` links as
//! given, refusing one that loops back; and asking what changed since the last listing.

use super::*;

/// How far before the last listing a refresh asks for changes: for a server whose `Date`
/// and `meta.lastUpdated` come from different clocks, and for changes committed late (a
/// transaction that began before the listing and ended after its first page).
pub const CHANGE_MARGIN: Duration = Duration::from_secs(120);

/// Where a server tells what changed, as found out by asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Feed {
    /// Not tried yet: history first.
    #[default]
    Unknown,
    /// `Binary/_history?_since=`: creates, updates and deletes.
    History,
    /// `Binary?_lastUpdated=gt`: creates and updates; a total counts the deletes.
    LastUpdated,
    /// Neither works: every refresh lists everything.
    Neither,
}

/// What a refresh needs to know: how to ask, and since when (the server's clock).
#[derive(Debug, Default)]
pub(super) struct FeedState {
    pub(super) feed: Feed,
    /// When the last listing or refresh began, by the server's `Date`.
    pub(super) since: Option<SystemTime>,
}

impl HttpSource {
    pub(super) fn search_url(&self, path: &str) -> Result<Url, SourceError> {
        Url::parse(&format!("{}/{path}", self.base))
            .map_err(|e| SourceError::Config(format!("bad base URL: {e}")))
    }

    /// Every page of the search at `url`, each given to `each` as it arrives (which may stop
    /// the paging by returning false, unless `ahead`); the server's `Date` of the first page.
    /// With `ahead`, each next page is asked for while the one before is read and taken in
    /// (see [`HttpSource::follow_ahead`]).
    async fn pages(
        &self,
        url: Url,
        ahead: bool,
        mut each: impl FnMut(fhir::Page) -> bool,
    ) -> Result<Option<SystemTime>, SourceError> {
        let mut first_date = None;
        let mut first = true;
        let mut take = |page: fhir::Page, date| {
            let mut total = None;
            if std::mem::take(&mut first) {
                first_date = date;
                total = page.total;
            }
            if page.skipped > 0 {
                debug!(
                    skipped = page.skipped,
                    "search entries that are not Binaries with valid ids"
                );
            }
            let types = page.entries.iter().map(|e| (&*e.id, e.meta.content_type.as_deref()));
            self.learn_content_types(types, total);
            each(page)
        };
        if ahead {
            self.follow_ahead(url, |page, date| {
                take(page, date);
            })
            .await?;
        } else {
            let next = |page: &fhir::Page| page.next.clone();
            self.follow(url, fhir::parse_bundle, next, take).await?;
        }
        Ok(first_date)
    }

    /// Every page of the search at `url`, parsed by `parse`, each given to `each` with the
    /// server's `Date` as it arrives (`each` may stop the paging by returning false). The
    /// `next` link that `next` finds is followed as given (only resolved when relative);
    /// one that loops back is an error. Each page has its own deadline.
    pub(super) async fn follow<P>(
        &self,
        mut url: Url,
        parse: impl Fn(&[u8]) -> Result<P, fhir::FhirError>,
        next: impl Fn(&P) -> Option<String>,
        mut each: impl FnMut(P, Option<SystemTime>) -> bool,
    ) -> Result<(), SourceError> {
        let mut seen = HashSet::new();
        seen.insert(url.to_string());
        loop {
            let (body, date) = self.timed_page(&url).await?;
            let page = parse(&body).map_err(SourceError::from)?;
            drop(body);
            let following = next(&page).map(|link| follow_link(&url, &link, &mut seen));
            if !each(page, date) {
                return Ok(());
            }
            // What came before a loop is still given.
            let Some(following) = following else { return Ok(()) };
            url = following?;
        }
    }

    /// [`HttpSource::follow`] for a Bundle of Binaries, where every page is wanted. The next
    /// page is asked for as soon as a page is in, its link read here from the head of the body
    /// (servers send links before entries; else once the page is parsed), and the page is parsed
    /// on a thread of its own: the server makes the next page, and this task reads it, while
    /// this one is parsed and taken in. A listing of a thousand pages then costs about the
    /// server's time, not the server's time plus ours. The first page's first entries are given
    /// before the rest of it is parsed.
    async fn follow_ahead(
        &self,
        mut url: Url,
        mut each: impl FnMut(fhir::Page, Option<SystemTime>),
    ) -> Result<(), SourceError> {
        let mut seen = HashSet::new();
        seen.insert(url.to_string());
        let mut fetched = self.timed_page(&url).await;
        let mut first = true;
        loop {
            let (body, date) = fetched?;
            // Read here, where servers put it, the link asks for the next page before this one
            // is handed over to be parsed; else the parsed page gives it.
            let early = fhir::next_link_ahead(&body);
            // The first page's first entries show before the rest of it is parsed.
            let (first_tx, first_rx) = tokio::sync::oneshot::channel();
            let first_page = std::mem::take(&mut first);
            let parsing = tokio::task::spawn_blocking(move || {
                let mut first_tx = Some(first_tx).filter(|_| first_page);
                let mut on_first = |entries, total| {
                    if let Some(tx) = first_tx.take() {
                        let _ = tx.send(fhir::Page { entries, total, ..fhir::Page::default() });
                    }
                };
                fhir::parse_bundle_with(&body, first_page.then_some(&mut on_first as _))
            });
            let (link, ahead) = {
                let seen = &mut seen;
                let from = &url;
                // The next page, from the link read early (none when the page has no next
                // link, or its links come after its entries).
                let ahead = async {
                    let link = early?;
                    let fetched = match follow_link(from, &link, seen) {
                        Ok(following) => Ok((self.timed_page(&following).await, following)),
                        Err(e) => Err(e),
                    };
                    Some((link, fetched))
                };
                let taken = async {
                    if let Ok(first) = first_rx.await {
                        each(first, date);
                    }
                    let page = parsing.await.map_err(|e| {
                        SourceError::BadBody(format!("reading a page of the search failed: {e}"))
                    })??;
                    let next = page.next.clone();
                    each(page, date);
                    Ok::<_, SourceError>(next)
                };
                // A page that fails to parse drops the page asked for ahead.
                let (next, ahead) = tokio::try_join!(taken, async { Ok(ahead.await) })?;
                let Some(link) = next else { return Ok(()) };
                (link, ahead)
            };
            let (page, following) = match ahead {
                // A loop is an error once the page before it is taken in.
                Some((early, fetched)) if early == link => fetched?,
                _ => {
                    let following = follow_link(&url, &link, &mut seen)?;
                    (self.timed_page(&following).await, following)
                }
            };
            fetched = page;
            url = following;
        }
    }

    /// One page's body and the server's `Date`, within `--timeout`.
    async fn timed_page(&self, url: &Url) -> Result<(Vec<u8>, Option<SystemTime>), SourceError> {
        let deadline = Instant::now() + self.config.timeout;
        tokio::time::timeout(self.config.timeout, self.page_body(url, deadline))
            .await
            .map_err(|_| SourceError::Timeout(self.config.timeout))?
    }

    /// Every Binary, a page at a time, each given to `each` as it arrives.
    pub(super) async fn list_inner(
        &self,
        mut each: impl FnMut(Vec<Listed>, Option<u64>) + Send,
    ) -> Result<(), SourceError> {
        let mut url = self.search_url("Binary")?;
        url.query_pairs_mut()
            .append_pair("_count", &self.config.page_size.to_string())
            .append_pair("_elements", "id,meta,contentType");
        let asked = SystemTime::now();
        let date = self
            .pages(url, true, |page| {
                each(page.entries, page.total);
                true
            })
            .await?;
        self.feed_state().since = Some(date.unwrap_or(asked));
        Ok(())
    }

    fn feed_state(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.feed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What changed since the last listing or refresh, by the first way that works on this
    /// server (history, then `_lastUpdated`); `None` when neither does.
    pub(super) async fn changes_inner(&self) -> Result<Option<Changes>, SourceError> {
        let (mut feed, since) = {
            let state = self.feed_state();
            (state.feed, state.since)
        };
        let Some(since) = since else { return Ok(None) };
        let from = since.checked_sub(CHANGE_MARGIN).unwrap_or(since);
        let asked = SystemTime::now();
        loop {
            let found = match feed {
                Feed::Unknown | Feed::History => self.history_since(from).await?,
                Feed::LastUpdated => self.updated_since(from).await?,
                Feed::Neither => return Ok(None),
            };
            match found {
                Some((changes, date)) => {
                    let mut state = self.feed_state();
                    state.feed = if feed == Feed::Unknown { Feed::History } else { feed };
                    // (Compared with the state, this never showed: a fallback stores its
                    // feed before it is tried.)
                    debug!(feed = ?state.feed, changed = changes.changed.len(), "the server told what changed");
                    state.since = Some(date.unwrap_or(asked));
                    return Ok(Some(changes));
                }
                None => {
                    feed = match feed {
                        Feed::Unknown | Feed::History => Feed::LastUpdated,
                        _ => Feed::Neither,
                    };
                    self.feed_state().feed = feed;
                    if feed == Feed::Neither {
                        debug!("the server cannot tell what changed: refreshes list everything");
                    }
                }
            }
        }
    }

    /// `Binary/_history?_since=`: each Binary's newest state, deletions included. `None`
    /// when the server refuses, or answers something that is not the history asked for.
    async fn history_since(
        &self,
        from: SystemTime,
    ) -> Result<Option<(Changes, Option<SystemTime>)>, SourceError> {
        let mut url = self.search_url("Binary/_history")?;
        url.query_pairs_mut()
            .append_pair("_since", &fhir::format_instant(from))
            .append_pair("_count", &self.config.page_size.to_string())
            .append_pair("_elements", "id,meta,contentType");
        let mut newest: HashSet<String> = HashSet::new();
        let mut changes = Changes { deleted: Some(Vec::new()), ..Changes::default() };
        let mut usable = true;
        let answered = self
            .pages(url, false, |page| {
                // A searchset, or versions from before `_since`: the server ignored it.
                usable = page.history && page.entries.iter().all(|e| !before(&e.meta, from));
                if !usable {
                    return false;
                }
                // Newest first: the first entry of an id is its state now.
                let mut deleted = page.deleted.into_iter().peekable();
                let mut entries = page.entries.into_iter().peekable();
                for position in 0.. {
                    match (deleted.peek(), entries.peek()) {
                        (None, None) => break,
                        (Some((at, _)), _) if *at <= position => {
                            let (_, id) = deleted.next().unwrap_or_default();
                            if newest.insert(id.clone()) {
                                changes.deleted.get_or_insert_with(Vec::new).push(id);
                            }
                        }
                        _ => {
                            if let Some(listed) = entries.next()
                                && newest.insert(listed.id.clone())
                            {
                                changes.changed.push(listed);
                            }
                        }
                    }
                }
                true
            })
            .await;
        match answered {
            Ok(date) if usable => Ok(Some((changes, date))),
            Ok(_) => Ok(None),
            Err(e) if refused(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `Binary?_lastUpdated=gt`, and the total from `Binary?_summary=count`. `None` when the
    /// server refuses the search or ignores the parameter.
    async fn updated_since(
        &self,
        from: SystemTime,
    ) -> Result<Option<(Changes, Option<SystemTime>)>, SourceError> {
        let mut url = self.search_url("Binary")?;
        url.query_pairs_mut()
            .append_pair("_lastUpdated", &format!("gt{}", fhir::format_instant(from)))
            .append_pair("_count", &self.config.page_size.to_string())
            .append_pair("_elements", "id,meta,contentType");
        let mut changes = Changes::default();
        let mut usable = true;
        let answered = self
            .pages(url, false, |page| {
                usable = page.entries.iter().all(|e| !before(&e.meta, from));
                changes.changed.extend(page.entries);
                usable
            })
            .await;
        let date = match answered {
            Ok(date) if usable => date,
            Ok(_) => return Ok(None),
            Err(e) if refused(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut url = self.search_url("Binary")?;
        url.query_pairs_mut().append_pair("_summary", "count");
        let deadline = Instant::now() + self.config.timeout;
        changes.total = match self.page(&url, deadline).await {
            Ok(page) => page.total,
            Err(e) if refused(&e) => None,
            Err(e) => return Err(e),
        };
        Ok(Some((changes, date)))
    }

    /// One Bundle page.
    async fn page(&self, url: &Url, deadline: Instant) -> Result<fhir::Page, SourceError> {
        let (body, _) = self.page_body(url, deadline).await?;
        Ok(fhir::parse_bundle(&body)?)
    }

    /// The body of one search page, with the server's `Date`.
    async fn page_body(
        &self,
        url: &Url,
        deadline: Instant,
    ) -> Result<(Vec<u8>, Option<SystemTime>), SourceError> {
        let limit = self.json_limit();
        let get = Get::json(url, limit);
        let answer = self.get(&get, deadline).await?;
        let date = answer
            .headers
            .get(header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok());
        Ok((answer.body, date))
    }
}

/// The page a `next` link names: used as given, only resolved when relative; an error when
/// it loops back to a page already read.
fn follow_link(from: &Url, link: &str, seen: &mut HashSet<String>) -> Result<Url, SourceError> {
    let following = from
        .join(link)
        .map_err(|e| SourceError::BadBody(format!("bad next link {link:?}: {e}")))?;
    if !seen.insert(following.to_string()) {
        return Err(SourceError::BadBody(format!("the next link loops back to {following}")));
    }
    Ok(following)
}

/// Last updated before `from` (with a second's slack for whole-second clocks): a version a
/// search for changes since `from` should not have given.
fn before(meta: &Meta, from: SystemTime) -> bool {
    let slack = from.checked_sub(Duration::from_secs(1)).unwrap_or(from);
    meta.last_updated.is_some_and(|t| t < slack)
}

/// A refusal of the request itself (4xx, or a body that is not a Bundle): ask another way.
fn refused(e: &SourceError) -> bool {
    match e {
        SourceError::Status(status) => (400..500).contains(status),
        SourceError::Forbidden
        | SourceError::NotFound
        | SourceError::Gone
        | SourceError::BadBody(_) => true,
        _ => false,
    }
}
