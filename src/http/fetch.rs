//! Fetching one Binary: raw bytes or FHIR JSON (decided by what the server answers), the
//! summary read that completes a raw answer's metadata, and the raw read after a JSON without
//! `data`.

use super::*;

impl HttpSource {
    /// The largest JSON body that can hold a Binary of `max_size` bytes (base64 is 4/3 the
    /// size) plus its other elements.
    pub(super) fn json_limit(&self) -> u64 {
        self.config.max_size.saturating_mul(4) / 3 + (1 << 20)
    }

    pub(super) fn binary_url(&self, id: &str) -> Result<Url, SourceError> {
        let mut url = Url::parse(&format!("{}/Binary", self.base))
            .map_err(|e| SourceError::Config(format!("bad base URL: {e}")))?;
        url.path_segments_mut()
            .map_err(|()| SourceError::Config("base URL cannot have a path".into()))?
            .push(id);
        Ok(url)
    }

    pub(super) fn check_size(&self, len: usize) -> Result<(), SourceError> {
        if len as u64 > self.config.max_size {
            return Err(SourceError::TooLarge { limit: self.config.max_size });
        }
        Ok(())
    }

    /// The Accept for a raw request of `id`, when this fetch should ask for raw bytes, and
    /// whether the file's type is known (from a listing or an earlier read).
    pub(super) fn raw_accept(&self, id: &str) -> Option<(String, bool)> {
        use std::sync::atomic::Ordering;
        let known = self.known_type(id);
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
        raw.then(|| (known.map_or_else(|| "*/*".to_owned(), |k| k.to_string()), typed))
    }

    pub(super) fn learn_content_type(&self, id: &str, content_type: Option<&str>) {
        if let Some(kind) = content_type {
            self.content_types.lock().unwrap_or_else(|e| e.into_inner()).learn(id, kind);
        }
    }

    /// [`HttpSource::learn_content_type`] for a page of Binaries, under one lock; `total`:
    /// how many the search will give in all, when the server says (for the first page).
    pub(super) fn learn_content_types<'a>(
        &self,
        page: impl Iterator<Item = (&'a str, Option<&'a str>)>,
        total: Option<u64>,
    ) {
        /// Room made at once at most, whatever a server claims.
        const MOST: usize = 4 << 20;
        let mut known = self.content_types.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(total) = total {
            known.recent.reserve(usize::try_from(total).unwrap_or(MOST).min(MOST));
        }
        for (id, kind) in page {
            if let Some(kind) = kind {
                known.learn(id, kind);
            }
        }
    }

    pub(super) fn known_type(&self, id: &str) -> Option<Arc<str>> {
        self.content_types.lock().unwrap_or_else(|e| e.into_inner()).get(id)
    }

    pub(super) async fn fetch_inner(
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
        // FHIR XML is the resource in the other format, not the native bytes: its `data` would
        // have to be decoded. Only a Binary whose own type is FHIR XML is served as it came.
        let own_type =
            raw_accept.as_ref().filter(|(_, typed)| *typed).map(|(kind, _)| essence(kind));
        if kind == FHIR_XML && own_type.as_deref() != Some(FHIR_XML) {
            return Err(SourceError::BadBody(
                "the server answered FHIR XML (the resource, not its content), which fhirfs \
                 does not decode: it needs a server that answers FHIR JSON or the raw bytes"
                    .into(),
            ));
        }
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
        let binary = binary?;
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
    pub(super) async fn summary(&self, url: &Url, deadline: Instant) -> Option<fhir::Binary> {
        use std::sync::atomic::Ordering;
        if self.summary_useless.load(Ordering::Relaxed) {
            return None;
        }
        let mut url = url.clone();
        url.query_pairs_mut().append_pair("_summary", "true");
        let get = Get::json(&url, SUMMARY_LIMIT);
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
    pub(super) async fn summarised(
        &self,
        id: &str,
        url: &Url,
        meta: Meta,
        deadline: Instant,
    ) -> Meta {
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
    pub(super) fn with_summary(&self, id: &str, meta: Meta, summary: Meta) -> Meta {
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
    pub(super) async fn fetch_raw(
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
        let own_xml = meta.content_type.as_deref().is_some_and(|k| essence(k) == FHIR_XML);
        if media_type(&answer.headers) == FHIR_XML && !own_xml {
            let xml = "the raw read answered FHIR XML (the resource, not its content)";
            return Err(SourceError::BadBody(xml.into()));
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
}
