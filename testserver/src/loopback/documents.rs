//! DocumentReference and DiagnosticReport, and storage with presigned URLs, for the documents
//! view: searches by `patient` (paged by offset), reads by id (Patients too), and blobs at
//! `/storage/{name}?sig=...` that answer 403 once their signature changed, as an expired
//! presigned URL of Medplum or S3 does. Two quirks: a server that ignores `patient` and says
//! so in an OperationOutcome entry (HFS 0.2.7), and one that refuses a search without it
//! (Cerner, Epic).

use super::*;

/// Documents and blobs.
#[derive(Default)]
pub(super) struct DocState {
    /// By (resourceType, id).
    resources: BTreeMap<(String, String), StoredDoc>,
    blobs: HashMap<String, Blob>,
    /// Searches without `patient` answer 400 (Cerner, Epic).
    requires_patient: bool,
    /// Searches ignore `patient` and `subject` and add an OperationOutcome entry (HFS 0.2.7).
    ignores_patient: bool,
    /// Searches of these types answer this status (a token without their scope: 403).
    search_status: HashMap<String, u16>,
}

struct StoredDoc {
    version: u64,
    last_updated: SystemTime,
    /// The resource without `meta`; `None` once deleted.
    resource: Option<Value>,
}

struct Blob {
    content_type: String,
    bytes: Bytes,
    signature: String,
}

/// The types of resources that point at documents.
const DOCUMENT_TYPES: [&str; 2] = ["DocumentReference", "DiagnosticReport"];

/// The types that can be read by id: the documents, and the patients they are about.
const READABLE_TYPES: [&str; 3] = ["DocumentReference", "DiagnosticReport", "Patient"];

impl LoopbackServer {
    /// Creates or replaces a DocumentReference or DiagnosticReport (its `resourceType` and
    /// `id` say which): `meta.versionId` counts up from "1", `meta.lastUpdated` is now.
    pub fn put_document(&self, resource: Value) {
        let key = doc_key(&resource);
        let mut state = self.inner.lock();
        let stored = state.docs.resources.entry(key).or_insert(StoredDoc {
            version: 0,
            last_updated: now_millis(),
            resource: None,
        });
        stored.version += 1;
        stored.last_updated = now_millis();
        stored.resource = Some(resource);
    }

    /// Creates or replaces a Patient (read by id only; the names of `--patient-names`).
    pub fn put_patient(&self, resource: Value) {
        let id = resource["id"].as_str().unwrap_or_default().to_owned();
        let mut state = self.inner.lock();
        let key = ("Patient".to_owned(), id);
        let stored = state.docs.resources.entry(key).or_insert(StoredDoc {
            version: 0,
            last_updated: now_millis(),
            resource: None,
        });
        stored.version += 1;
        stored.resource = Some(resource);
    }

    /// Replaces a document's resource while keeping its version and time, as a server that
    /// signs storage URLs afresh on each read does (Medplum).
    pub fn resign_document(&self, resource: Value) {
        let key = doc_key(&resource);
        if let Some(stored) = self.inner.lock().docs.resources.get_mut(&key) {
            stored.resource = Some(resource);
        }
    }

    /// Deletes a document: searches leave it out, reads answer 410.
    pub fn delete_document(&self, kind: &str, id: &str) {
        let key = (kind.to_owned(), id.to_owned());
        if let Some(stored) = self.inner.lock().docs.resources.get_mut(&key) {
            stored.resource = None;
            stored.version += 1;
        }
    }

    /// Stores a blob at `/storage/{name}`, readable with `?sig={signature}` only (a new
    /// signature makes URLs with the old one answer 403, as an expired presigned URL).
    pub fn put_blob(
        &self,
        name: &str,
        content_type: &str,
        bytes: impl Into<Bytes>,
        signature: &str,
    ) {
        let blob = Blob {
            content_type: content_type.to_owned(),
            bytes: bytes.into(),
            signature: signature.to_owned(),
        };
        self.inner.lock().docs.blobs.insert(name.to_owned(), blob);
    }

    /// The URL of a blob with a signature, e.g. `http://127.0.0.1:4321/storage/a?sig=s1`.
    pub fn blob_url(&self, name: &str, signature: &str) -> String {
        format!("http://{}/storage/{name}?sig={signature}", self.inner.addr)
    }

    /// Searches of `kind` answer `status` (None: as usual), e.g. 403 for a token without
    /// that type's scope.
    pub fn set_document_search_status(&self, kind: &str, status: Option<u16>) {
        let mut state = self.inner.lock();
        match status {
            Some(status) => state.docs.search_status.insert(kind.to_owned(), status),
            None => state.docs.search_status.remove(kind),
        };
    }

    /// Document searches without `patient` answer 400, as Cerner and Epic do.
    pub fn set_documents_require_patient(&self, requires: bool) {
        self.inner.lock().docs.requires_patient = requires;
    }

    /// Document searches ignore `patient` and `subject` and say so in an OperationOutcome
    /// entry, as HFS 0.2.7 does.
    pub fn set_documents_ignore_patient(&self, ignores: bool) {
        self.inner.lock().docs.ignores_patient = ignores;
    }
}

fn doc_key(resource: &Value) -> (String, String) {
    let text = |name: &str| resource[name].as_str().unwrap_or_default().to_owned();
    let key = (text("resourceType"), text("id"));
    assert!(DOCUMENT_TYPES.contains(&key.0.as_str()), "not a document type: {}", key.0);
    key
}

impl Inner {
    /// A resource with its `meta`.
    fn rendered(&self, stored: &StoredDoc) -> Option<Value> {
        let mut resource = stored.resource.clone()?;
        resource["meta"] = json!({
            "versionId": stored.version.to_string(),
            "lastUpdated": crate::fhir::instant(stored.last_updated),
        });
        Some(resource)
    }

    fn document_search(&self, kind: &str, params: &[(String, String)]) -> Response {
        let state = self.lock();
        let patient = param(params, "patient")
            .map(|p| format!("Patient/{p}"))
            .or_else(|| param(params, "subject").map(str::to_owned));
        if let Some(&status) = state.docs.search_status.get(kind) {
            return outcome(status, &format!("{kind} search refused"));
        }
        if state.docs.requires_patient && patient.is_none() {
            return outcome(400, "a patient is required for this search");
        }
        let filter = patient.filter(|_| !state.docs.ignores_patient);
        let matches: Vec<Value> = state
            .docs
            .resources
            .iter()
            .filter(|((k, _), _)| k == kind)
            .filter_map(|(_, stored)| self.rendered(stored))
            .filter(|r| filter.as_ref().is_none_or(|p| r["subject"]["reference"] == p.as_str()))
            .collect();
        let count = param(params, "_count").and_then(|c| c.parse().ok()).unwrap_or(DEFAULT_COUNT);
        let offset: usize = param(params, "_offset").and_then(|o| o.parse().ok()).unwrap_or(0);
        let base = self.base_url();
        let mut query: Vec<(String, String)> =
            params.iter().filter(|(k, _)| k != "_offset").cloned().collect();
        let link = |offset: usize, query: &mut Vec<(String, String)>| {
            query.retain(|(k, _)| k != "_offset");
            query.push(("_offset".into(), offset.to_string()));
            let text: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{base}/{kind}?{}", text.join("&"))
        };
        let end = (offset + count.max(1)).min(matches.len());
        let next = (end < matches.len()).then(|| link(end, &mut query));
        let mut bundle = searchset(matches.len(), &link(offset, &mut query), next.as_deref());
        let mut entries: Vec<Value> = matches
            .get(offset..end)
            .unwrap_or_default()
            .iter()
            .map(|r| {
                let url = format!("{base}/{kind}/{}", r["id"].as_str().unwrap_or_default());
                json!({"fullUrl": url, "resource": r, "search": {"mode": "match"}})
            })
            .collect();
        if state.docs.ignores_patient && offset == 0 {
            let mut warning = outcome_entry();
            warning["resource"]["issue"][0]["diagnostics"] =
                json!("the search parameters patient and subject are not supported: ignored");
            entries.insert(0, warning);
        }
        bundle["entry"] = json!(entries);
        fhir_json(StatusCode::OK, bundle.to_string())
    }

    fn document_read(&self, kind: &str, id: &str) -> Response {
        let state = self.lock();
        match state.docs.resources.get(&(kind.to_owned(), id.to_owned())) {
            None => outcome(404, &format!("{kind}/{id} not found")),
            Some(stored) => match self.rendered(stored) {
                None => outcome(410, &format!("{kind}/{id} was deleted")),
                Some(resource) => fhir_json(StatusCode::OK, resource.to_string()),
            },
        }
    }
}

/// `GET /fhir/{DocumentReference|DiagnosticReport}?...`.
pub(super) async fn document_search(
    State(inner): State<Arc<Inner>>,
    Path(kind): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    inner.counts.send_modify(|c| c.document_searches += 1);
    let response = match inner.deny(&headers) {
        Some(refused) => refused,
        None if DOCUMENT_TYPES.contains(&kind.as_str()) => inner.document_search(&kind, &params),
        None => outcome(404, &format!("no route for {kind}")),
    };
    inner.answered(response)
}

/// `GET /fhir/{DocumentReference|DiagnosticReport|Patient}/{id}`.
pub(super) async fn document_read(
    State(inner): State<Arc<Inner>>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    inner.counts.send_modify(|c| c.document_reads += 1);
    let response = match inner.deny(&headers) {
        Some(refused) => refused,
        None if READABLE_TYPES.contains(&kind.as_str()) => inner.document_read(&kind, &id),
        None => outcome(404, &format!("no route for {kind}/{id}")),
    };
    inner.answered(response)
}

/// `GET /storage/{name}?sig=...`: a blob, with no token asked (the signature is the key);
/// counts whether a request carried an `Authorization` header, which it never should.
pub(super) async fn blob(
    State(inner): State<Arc<Inner>>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let authorized = headers.contains_key(header::AUTHORIZATION);
    inner.counts.send_modify(|c| {
        c.blob_reads += 1;
        if authorized {
            c.blob_reads_with_authorization += 1;
        }
    });
    let state = inner.lock();
    let Some(blob) = state.docs.blobs.get(&name) else {
        return (StatusCode::NOT_FOUND, "NoSuchKey").into_response();
    };
    if param(&params, "sig") != Some(blob.signature.as_str()) {
        return (StatusCode::FORBIDDEN, "AccessDenied: Request has expired").into_response();
    }
    let content_type = [(header::CONTENT_TYPE, blob.content_type.clone())];
    (StatusCode::OK, content_type, blob.bytes.clone()).into_response()
}
