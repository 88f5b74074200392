//! The HTTP source: reads and searches Binary on a FHIR server with reqwest.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tracing::debug;
use url::Url;

use crate::error::SourceError;
use crate::fhir::{self, FHIR_JSON, Listed};
use crate::source::{Fetched, Meta, Source};

/// A bearer token. Its `Debug` never shows the value, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token, trimming surrounding whitespace (token files end with a newline).
    pub fn new(token: &str) -> Option<Self> {
        let token = token.trim();
        (!token.is_empty()).then(|| Self(token.to_owned()))
    }

    fn bearer(&self) -> Result<HeaderValue, SourceError> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0)).map_err(|_| {
            SourceError::Transport("the token has characters a header cannot carry".into())
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Settings of the HTTP source.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The FHIR base URL, e.g. `https://host/fhir`.
    pub base: Url,
    /// The bearer token; none sends no Authorization header.
    pub token: Option<Secret>,
    /// Deadline for one fetch or one listing page as a whole.
    pub timeout: Duration,
    /// `_count` asked of searches.
    pub page_size: u32,
    /// Largest Binary accepted, in bytes.
    pub max_size: u64,
}

impl HttpConfig {
    /// Defaults for `base`.
    pub fn new(base: Url) -> Self {
        Self {
            base,
            token: None,
            timeout: Duration::from_secs(30),
            page_size: 1000,
            max_size: 1 << 30,
        }
    }
}

/// A FHIR server reached over HTTP(S).
pub struct HttpSource {
    client: reqwest::Client,
    config: HttpConfig,
    /// The base URL without a trailing slash.
    base: String,
}

/// `W/"3"` → `3`.
fn version_from_etag(etag: &str) -> Option<String> {
    let tag = etag.trim().trim_start_matches("W/").trim_matches('"');
    (!tag.is_empty()).then(|| tag.to_owned())
}

/// The media type of a response without parameters, lowercased.
fn media_type(headers: &HeaderMap) -> String {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn header_meta(headers: &HeaderMap) -> Meta {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    Meta {
        version_id: text(header::ETAG).and_then(version_from_etag),
        last_updated: text(header::LAST_MODIFIED).and_then(|d| httpdate::parse_http_date(d).ok()),
        content_type: None,
        security_context: text(header::HeaderName::from_static("x-security-context"))
            .map(str::to_owned),
        size: None,
    }
}

fn transport(e: reqwest::Error) -> SourceError {
    // Without the URL: it is logged with the id already, and a query could carry secrets.
    SourceError::Transport(e.without_url().to_string())
}

impl HttpSource {
    /// A source for `config`.
    pub fn new(config: HttpConfig) -> Result<Self, SourceError> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .user_agent(concat!("fhirfs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(transport)?;
        let base = config.base.as_str().trim_end_matches('/').to_owned();
        Ok(Self {
            client,
            config,
            base,
        })
    }

    /// True when `url` has the base URL's origin: only then may it carry the token.
    fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.config.base.origin()
    }

    async fn send(
        &self,
        url: Url,
        accept: &str,
        if_none_match: Option<&str>,
    ) -> Result<reqwest::Response, SourceError> {
        let mut request = self
            .client
            .request(Method::GET, url.clone())
            .header(header::ACCEPT, accept);
        if let (Some(token), true) = (&self.config.token, self.same_origin(&url)) {
            request = request.header(header::AUTHORIZATION, token.bearer()?);
        }
        if let Some(version) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, format!("W/\"{version}\""));
        }
        request.send().await.map_err(transport)
    }

    /// Reads a body into one buffer sized from `Content-Length`, refusing more than `limit`.
    async fn body(mut response: reqwest::Response, limit: u64) -> Result<Bytes, SourceError> {
        let declared = response.content_length();
        if declared.is_some_and(|len| len > limit) {
            return Err(SourceError::TooLarge { limit });
        }
        let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if buf.len() as u64 + chunk.len() as u64 > limit {
                return Err(SourceError::TooLarge { limit });
            }
            buf.extend_from_slice(&chunk);
        }
        if declared.is_some_and(|len| len != buf.len() as u64) {
            return Err(SourceError::BadBody(format!(
                "body has {} bytes, Content-Length said {}",
                buf.len(),
                declared.unwrap_or(0)
            )));
        }
        Ok(Bytes::from(buf))
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

    async fn fetch_inner(&self, id: &str, cached: Option<&str>) -> Result<Fetched, SourceError> {
        let url = self.binary_url(id)?;
        let response = self.send(url.clone(), FHIR_JSON, cached).await?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::NotModified);
        }
        if !status.is_success() {
            return Err(SourceError::from_status(status.as_u16()));
        }
        let headers = response.headers().clone();
        let kind = media_type(&headers);
        let body = Self::body(response, self.json_limit()).await?;
        let from_headers = header_meta(&headers);
        // Decide by what the server sent, not by what we asked for.
        let is_fhir =
            kind == FHIR_JSON || (kind == "application/json" && fhir::looks_like_binary(&body));
        if !is_fhir {
            return self.raw_content(body, &headers, from_headers);
        }
        let binary = fhir::parse_binary(&body).map_err(SourceError::BadBody)?;
        let mut meta = binary.meta;
        meta.version_id = meta.version_id.or(from_headers.version_id);
        meta.last_updated = meta.last_updated.or(from_headers.last_updated);
        meta.security_context = meta.security_context.or(from_headers.security_context);
        if let Some(data) = binary.data {
            if data.len() as u64 > self.config.max_size {
                return Err(SourceError::TooLarge {
                    limit: self.config.max_size,
                });
            }
            return Ok(Fetched::Content {
                meta,
                bytes: Bytes::from(data),
            });
        }
        // No `data`: some servers keep the bytes outside the resource and only serve them raw.
        // Ask for the native form before calling the file empty.
        self.fetch_raw(url, meta, binary.subsetted).await
    }

    async fn fetch_raw(
        &self,
        url: Url,
        meta: Meta,
        subsetted: bool,
    ) -> Result<Fetched, SourceError> {
        let accept = meta
            .content_type
            .clone()
            .unwrap_or_else(|| "*/*".to_owned());
        let accept = if accept.contains("json") {
            "*/*".to_owned()
        } else {
            accept
        };
        let response = self.send(url, &accept, None).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let kind = media_type(&headers);
        if status.is_success() && kind != FHIR_JSON {
            let body = Self::body(response, self.config.max_size).await?;
            let from_headers = header_meta(&headers);
            let merged = Meta {
                version_id: meta.version_id.or(from_headers.version_id),
                last_updated: meta.last_updated.or(from_headers.last_updated),
                content_type: meta.content_type.or(Some(kind)),
                security_context: meta.security_context.or(from_headers.security_context),
                size: None,
            };
            return Ok(Fetched::Content {
                meta: merged,
                bytes: body,
            });
        }
        if subsetted {
            return Err(SourceError::BadBody(
                "the server left `data` out of a full read".into(),
            ));
        }
        debug!(%status, "no raw form either: the Binary is empty");
        Ok(Fetched::Content {
            meta,
            bytes: Bytes::new(),
        })
    }

    fn raw_content(
        &self,
        body: Bytes,
        headers: &HeaderMap,
        mut meta: Meta,
    ) -> Result<Fetched, SourceError> {
        if body.len() as u64 > self.config.max_size {
            return Err(SourceError::TooLarge {
                limit: self.config.max_size,
            });
        }
        let kind = media_type(headers);
        meta.content_type = (!kind.is_empty()).then_some(kind);
        Ok(Fetched::Content { meta, bytes: body })
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
                return Err(SourceError::BadBody(format!(
                    "the next link loops back to {url}"
                )));
            }
            let page = tokio::time::timeout(self.config.timeout, self.page(url.clone()))
                .await
                .map_err(|_| SourceError::Timeout(self.config.timeout))??;
            if page.skipped > 0 {
                debug!(
                    skipped = page.skipped,
                    "search entries that are not Binaries with valid ids"
                );
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

    async fn page(&self, url: Url) -> Result<fhir::Page, SourceError> {
        let response = self.send(url, FHIR_JSON, None).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(SourceError::from_status(status.as_u16()));
        }
        let body = Self::body(response, self.json_limit()).await?;
        fhir::parse_bundle(&body).map_err(SourceError::BadBody)
    }
}

impl Source for HttpSource {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        self.list_inner().await
    }

    async fn fetch(&self, id: &str, cached_version: Option<&str>) -> Result<Fetched, SourceError> {
        tokio::time::timeout(self.config.timeout, self.fetch_inner(id, cached_version))
            .await
            .map_err(|_| SourceError::Timeout(self.config.timeout))?
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
    fn secrets_do_not_show_in_debug() {
        let s = Secret::new(" tok-123\n").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(Secret::new("  \n"), None);
    }

    #[test]
    fn binary_urls_keep_the_base_path() {
        let mut config = HttpConfig::new(Url::parse("http://h:1/fhir/r4/").unwrap());
        config.token = None;
        let source = HttpSource::new(config).unwrap();
        assert_eq!(
            source.binary_url("a.b-1").unwrap().as_str(),
            "http://h:1/fhir/r4/Binary/a.b-1"
        );
    }
}
