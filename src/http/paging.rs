//! Paging through a search: `Binary?_count=N&_elements=...`, following `next` links as
//! given, refusing one that loops back.

use super::*;

impl HttpSource {
    pub(super) async fn list_inner(&self) -> Result<Vec<Listed>, SourceError> {
        let mut url = Url::parse(&format!("{}/Binary", self.base))
            .map_err(|e| SourceError::Config(format!("bad base URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("_count", &self.config.page_size.to_string())
            .append_pair("_elements", "id,meta,contentType");
        let mut seen = HashSet::new();
        let mut listed = Vec::new();
        loop {
            if !seen.insert(url.to_string()) {
                return Err(SourceError::BadBody(format!("the next link loops back to {url}")));
            }
            let deadline = Instant::now() + self.config.timeout;
            let page = tokio::time::timeout(self.config.timeout, self.page(&url, deadline))
                .await
                .map_err(|_| SourceError::Timeout(self.config.timeout))??;
            if page.skipped > 0 {
                debug!(
                    skipped = page.skipped,
                    "search entries that are not Binaries with valid ids"
                );
            }
            for entry in &page.entries {
                self.learn_content_type(&entry.id, entry.meta.content_type.as_deref());
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

    pub(super) async fn page(
        &self,
        url: &Url,
        deadline: Instant,
    ) -> Result<fhir::Page, SourceError> {
        let limit = self.json_limit();
        let get = Get::json(url, limit);
        let answer = self.get(&get, deadline).await?;
        fhir::parse_bundle(&answer.body).map_err(SourceError::from)
    }
}
