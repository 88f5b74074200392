//! The documents view over HTTP: searching DocumentReference and DiagnosticReport page by
//! page, reading a referring resource again, and fetching an attachment's `url` as given, with
//! the token only for the base URL's origin.

use super::*;
use crate::fhir::documents::{self, DocKind, Document, DocumentPage};

/// Where an attachment's `url` leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `Binary/[id]` on the base URL: read through the Binary fetch (raw or FHIR JSON).
    Binary(String),
    /// Another URL on the base URL's origin: a GET with the token.
    SameOrigin(Url),
    /// A URL on another origin (presigned storage): a GET without the token, ever.
    OtherOrigin(Url),
}

impl HttpSource {
    /// Where `url` (relative to the base URL, or absolute) leads.
    pub fn attachment_target(&self, url: &str) -> Result<Target, SourceError> {
        // A relative URL is relative to the service base, which joins as a folder.
        let base = Url::parse(&format!("{}/", self.base))
            .map_err(|e| SourceError::Config(format!("bad base URL: {e}")))?;
        let resolved = base
            .join(url.trim())
            // Not the url itself: a presigned one carries its signature.
            .map_err(|e| SourceError::BadBody(format!("bad attachment url: {e}")))?;
        if !self.same_origin(&resolved) {
            return Ok(Target::OtherOrigin(resolved));
        }
        let binary = resolved
            .as_str()
            .strip_prefix(base.as_str())
            .and_then(|rest| rest.strip_prefix("Binary/"))
            .filter(|id| crate::id::is_valid_id(id) && resolved.query().is_none());
        Ok(match binary {
            Some(id) if resolved.fragment().is_none() => Target::Binary(id.to_owned()),
            _ => Target::SameOrigin(resolved),
        })
    }

    /// Every document of `kind` the search gives (for `patient`, when given), all pages
    /// followed. Entries of other types and outcomes are skipped and counted in the log.
    pub async fn search_documents(
        &self,
        kind: DocKind,
        patient: Option<&str>,
    ) -> Result<Vec<Document>, SourceError> {
        let mut url = self.search_url(kind.as_str())?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(patient) = patient {
                query.append_pair("patient", patient);
            }
            query.append_pair("_count", &self.config.page_size.to_string());
        }
        let mut found = Vec::new();
        let next = |page: &DocumentPage| page.next.clone();
        self.follow(url, documents::parse_document_page, next, |page: DocumentPage, _| {
            if page.skipped > 0 || page.outcomes > 0 {
                debug!(
                    kind = kind.as_str(),
                    skipped = page.skipped,
                    outcomes = page.outcomes,
                    "search entries that are not documents"
                );
            }
            found.extend(page.documents);
            true
        })
        .await?;
        Ok(found)
    }

    /// Reads `Type/id` again (for a fresh attachment `url`).
    pub async fn read_document(&self, kind: DocKind, id: &str) -> Result<Document, SourceError> {
        Ok(documents::parse_document(&self.read_resource(kind.as_str(), id).await?)?)
    }

    /// The FHIR JSON of `Type/id` (`GET [base]/Type/id`, with the token), within the deadline.
    pub async fn read_resource(&self, kind: &str, id: &str) -> Result<Vec<u8>, SourceError> {
        let mut url = self.search_url(kind)?;
        url.path_segments_mut()
            .map_err(|()| SourceError::Config("base URL cannot have a path".into()))?
            .push(id);
        let deadline = Instant::now() + self.config.timeout;
        let get = Get::json(&url, self.json_limit());
        let read = self.get(&get, deadline);
        let answer = tokio::time::timeout(self.config.timeout, read)
            .await
            .map_err(|_| SourceError::Timeout(self.config.timeout))??;
        Ok(answer.body)
    }

    /// GETs an attachment's content at `target` (not [`Target::Binary`]: that goes through
    /// [`Source::fetch`]), asking for `content_type`. The token goes only to the base URL's
    /// origin; another origin's 401 is not a reason to renew it. An answer that is a FHIR
    /// JSON Binary is decoded; any other answer is the content. Gives the bytes and the
    /// answer's media type.
    pub async fn fetch_url(
        &self,
        target: &Target,
        content_type: Option<&str>,
    ) -> Result<(Bytes, String), SourceError> {
        let deadline = Instant::now() + self.config.timeout;
        let accept = content_type.unwrap_or("*/*");
        let (url, token) = match target {
            Target::SameOrigin(url) => (url, true),
            Target::OtherOrigin(url) => (url, false),
            Target::Binary(_) => {
                return Err(SourceError::Config("a Binary is read by id, not by url".into()));
            }
        };
        let get = Get { limit: self.json_limit(), accept, ..Get::json(url, 0) };
        let fetch = async {
            if token {
                self.get(&get, deadline).await
            } else {
                self.get_with(&get, None, deadline).await
            }
        };
        let answer = tokio::time::timeout(self.config.timeout, fetch)
            .await
            .map_err(|_| SourceError::Timeout(self.config.timeout))??;
        let kind = media_type(&answer.headers);
        let wanted = content_type.map(essence);
        let is_binary = kind == FHIR_JSON
            || (kind == "application/json"
                && wanted.as_deref() != Some("application/json")
                && fhir::looks_like_binary(&answer.body));
        if is_binary && wanted.as_deref() != Some(FHIR_JSON) {
            let binary = fhir::decode_binary(answer.body)?;
            let kind = binary.meta.content_type.clone().unwrap_or_default();
            let data = binary.data.unwrap_or_default();
            self.check_size(data.len())?;
            return Ok((Bytes::from(data), kind));
        }
        self.check_size(answer.body.len())?;
        Ok((Bytes::from(answer.body), kind))
    }

    /// `url` as logs may show it: on another origin without its query and fragment, since a
    /// presigned storage URL carries its signature there.
    pub(super) fn shown(&self, url: &Url) -> String {
        if self.same_origin(url) {
            return url.to_string();
        }
        let mut shown = url.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        format!("{shown} (query left out)")
    }

    /// The deadline of one fetch as a whole (`--timeout`).
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Learns the contentType of a Binary an attachment names, so that its raw request
    /// asks for that type.
    pub fn expect_content_type(&self, id: &str, content_type: Option<&str>) {
        self.learn_content_type(id, content_type);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(base: &str) -> HttpSource {
        HttpSource::new(HttpConfig::new(Url::parse(base).unwrap())).unwrap()
    }

    #[test]
    fn attachment_urls_resolve_against_the_base() {
        let s = source("http://h:1/fhir/r4");
        let t = |url: &str| s.attachment_target(url).unwrap();
        assert_eq!(t("Binary/b1"), Target::Binary("b1".into()));
        assert_eq!(t("http://h:1/fhir/r4/Binary/b1"), Target::Binary("b1".into()));
        let same = |u: &str| Target::SameOrigin(Url::parse(u).unwrap());
        assert_eq!(t("Binary/b1?_format=json"), same("http://h:1/fhir/r4/Binary/b1?_format=json"));
        assert_eq!(
            t("Binary/b1/$binary-access-read"),
            same("http://h:1/fhir/r4/Binary/b1/$binary-access-read")
        );
        assert_eq!(t("/files/x.pdf"), same("http://h:1/files/x.pdf"));
        assert_eq!(t("http://h:1/other/Binary/b1"), same("http://h:1/other/Binary/b1"));
        let other = |u: &str| Target::OtherOrigin(Url::parse(u).unwrap());
        assert_eq!(t("https://h:1/fhir/r4/Binary/b1"), other("https://h:1/fhir/r4/Binary/b1"));
        assert_eq!(t("http://h:2/fhir/r4/Binary/b1"), other("http://h:2/fhir/r4/Binary/b1"));
        assert_eq!(t("https://s3.example/b?X-Sig=1"), other("https://s3.example/b?X-Sig=1"));
        assert_eq!(t("//evil.example/x"), other("http://evil.example/x"));
    }

    #[test]
    fn logs_show_other_origins_without_their_signature() {
        let s = source("http://h:1/fhir");
        let presigned = Url::parse("https://s3.example/b/x.pdf?X-Amz-Signature=abc#f").unwrap();
        assert_eq!(s.shown(&presigned), "https://s3.example/b/x.pdf (query left out)");
        let own = Url::parse("http://h:1/fhir/Binary?_cursor=q").unwrap();
        assert_eq!(s.shown(&own), "http://h:1/fhir/Binary?_cursor=q");
        let bad = s.attachment_target("http://[::1").unwrap_err().to_string();
        assert!(!bad.contains("::1"), "{bad}");
    }
}
