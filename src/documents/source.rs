//! `DocumentsSource`: the documents view as a [`Source`] of the core. Each attachment with
//! content is a file whose id (the core's key) is `Type.id.index`, and whose name comes from
//! [`names`](super::names). Its bytes come from the attachment's `data`, or from its `url`
//! followed as given: `Binary/[id]` on the base URL through the Binary fetch, any other URL
//! on the base URL's origin with the token, a URL on another origin without it; a presigned
//! URL that stopped working (401, 403, 404) is renewed once by reading the referring resource
//! again. The SHA-1 in `attachment.hash` is checked once the bytes are in.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tracing::{debug, warn};

use super::names::{self, Named};
use crate::error::SourceError;
use crate::fhir::documents::{Attachment, DocKind, Document};
use crate::http::{HttpSource, Target};
use crate::source::{Fetched, Listed, Meta, Reserve, Source, Streamed};

/// What to do when an attachment's hash does not match its bytes (`--verify-hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum VerifyHash {
    /// Serve the bytes, log one warning and mark it in `user.fhir.hash_match`.
    #[default]
    Warn,
    /// A mismatch is an I/O error (EIO).
    Strict,
}

/// How an attachment's `hash` compares with its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashCheck {
    /// The base64 SHA-1 of the bytes, as the spec says.
    Matched,
    /// The hex digest, base64-encoded (a common mistake).
    MatchedHexInBase64,
    /// The SHA-1 of the bytes' base64 text (another one).
    MatchedBase64Text,
    /// Not the bytes' SHA-1 in any known form.
    Mismatch,
}

impl HashCheck {
    /// The value of `user.fhir.hash_match`.
    fn label(self) -> &'static str {
        match self {
            Self::Matched => "yes",
            Self::MatchedHexInBase64 => "yes (the hex digest in base64)",
            Self::MatchedBase64Text => "yes (the SHA-1 of the base64 text)",
            Self::Mismatch => "no",
        }
    }
}

/// Compares an attachment's `hash` with the bytes.
pub fn check_hash(hash: &str, bytes: &[u8]) -> HashCheck {
    let digest = sha1_smol::Sha1::from(bytes).digest();
    let given = base64_simd::forgiving_decode_to_vec(hash.trim().as_bytes()).unwrap_or_default();
    if given == digest.bytes() {
        return HashCheck::Matched;
    }
    if given.eq_ignore_ascii_case(digest.to_string().as_bytes()) {
        return HashCheck::MatchedHexInBase64;
    }
    let text = base64_simd::STANDARD.encode_to_string(bytes);
    if given == sha1_smol::Sha1::from(text).digest().bytes() {
        return HashCheck::MatchedBase64Text;
    }
    HashCheck::Mismatch
}

/// The settings of the documents view.
#[derive(Debug, Clone, Default)]
pub struct DocumentsConfig {
    /// Only this patient's documents (`--patient`); the search asks for them, and each
    /// entry's subject is checked too, since servers may ignore the parameter.
    pub patient: Option<String>,
    /// `--verify-hash`.
    pub verify_hash: VerifyHash,
    /// `--patient-names`: a patient's folder shows their name (PHI: only when asked).
    pub patient_names: bool,
}

/// Patients whose names are read at once for `--patient-names`.
const LABEL_READS: usize = 8;

/// One file of the view.
#[derive(Debug, Clone)]
struct File {
    document: Arc<Document>,
    /// The position in `document.attachments`.
    attachment: usize,
    /// The hash check of the bytes last fetched.
    hash: Option<HashCheck>,
    /// The Binary's version of the bytes last fetched, for a `Binary/[id]` url: the next
    /// fetch of the same document version asks whether it is still current (304).
    binary_version: Option<String>,
}

/// The bytes of an attachment, as fetched.
struct Got {
    bytes: Bytes,
    /// The media type the answer gave (empty when none).
    kind: String,
    /// The Binary's version, for a `Binary/[id]` url.
    binary_version: Option<String>,
}

/// Decodes inline `data`.
fn inline(key: &str, att: &Attachment, data: &str) -> Result<Got, SourceError> {
    let bytes = base64_simd::forgiving_decode_to_vec(data.as_bytes())
        .map_err(|_| SourceError::BadBody(format!("{key}: attachment data is not base64")))?;
    let kind = att.content_type.clone().unwrap_or_default();
    Ok(Got { bytes: Bytes::from(bytes), kind, binary_version: None })
}

impl File {
    fn attachment(&self) -> &Attachment {
        &self.document.attachments[self.attachment]
    }
}

/// The documents view as a [`Source`].
pub struct DocumentsSource {
    http: Arc<HttpSource>,
    config: DocumentsConfig,
    /// The files of the last listing, by key.
    files: Mutex<HashMap<String, File>>,
    /// Folder labels for `--patient-names`, by `Patient/id`, read once per mount (`None`: the
    /// Patient could not be read, or has no name).
    labels: Mutex<HashMap<String, Option<String>>>,
    /// The hint to use `--patient` was logged.
    hinted: AtomicBool,
}

/// The core's key of a file: `Type.id.index` (the characters of a FHIR id, so it can be
/// logged and looked up like one).
pub fn file_key(document: &Document, attachment: &Attachment) -> String {
    format!("{}.{}.{}", document.kind.as_str(), document.id, attachment.index)
}

impl DocumentsSource {
    /// The documents view over `http`.
    pub fn new(http: Arc<HttpSource>, config: DocumentsConfig) -> Self {
        let (files, labels, hinted) = (Mutex::default(), Mutex::default(), AtomicBool::new(false));
        Self { http, config, files, labels, hinted }
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<String, File>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every document of the view: both kinds, for the patient when given. A server that
    /// refuses a search of one kind (a 4xx) just has none of it.
    async fn documents(&self) -> Result<Vec<Document>, SourceError> {
        let patient = self.config.patient.as_deref();
        let mut all = Vec::new();
        let mut refused = Vec::new();
        for kind in [DocKind::DocumentReference, DocKind::DiagnosticReport] {
            match self.http.search_documents(kind, patient).await {
                Ok(found) => all.extend(found),
                // A token may read one kind and not the other: none of that kind, then.
                Err(e @ (SourceError::Unauthorized | SourceError::Forbidden)) => {
                    debug!(kind = kind.as_str(), error = %e, "this search is not allowed");
                    refused.push(e);
                }
                Err(SourceError::Status(status)) if (400..500).contains(&status) => {
                    debug!(kind = kind.as_str(), status, "the server refuses this search");
                    if patient.is_none() && status == 400 && !self.hinted.swap(true, Relaxed) {
                        warn!(
                            kind = kind.as_str(),
                            "the server refuses to search documents (400); servers such as \
                             Epic and Cerner want a patient: try --patient ID"
                        );
                    }
                }
                Err(SourceError::NotFound | SourceError::Gone) => {
                    debug!(kind = kind.as_str(), "the server has no such search");
                }
                Err(e) => return Err(e),
            }
        }
        // Neither kind allowed: the folder is not readable (EACCES), not empty.
        if refused.len() == 2 {
            return Err(refused.swap_remove(0));
        }
        if let Some(patient) = patient {
            let wanted = format!("Patient/{patient}");
            let before = all.len();
            all.retain(|d| d.subject.as_deref().map(names::subject_reference) == Some(&wanted));
            if all.len() < before {
                debug!(
                    dropped = before - all.len(),
                    "documents of other subjects (the server ignored `patient`)"
                );
            }
        }
        Ok(all)
    }

    /// The labels of the patients among `documents`' subjects, for `--patient-names`: read
    /// once per mount, a few at a time; a Patient that cannot be read keeps its plain folder.
    async fn labels(&self, documents: &[Document]) -> HashMap<String, String> {
        use futures::StreamExt;
        let unknown: std::collections::BTreeSet<String> = {
            let known = self.labels.lock().unwrap_or_else(|e| e.into_inner());
            documents
                .iter()
                .filter_map(|d| d.subject.as_deref().map(names::subject_reference))
                .filter(|s| s.starts_with("Patient/") && !known.contains_key(*s))
                .map(str::to_owned)
                .collect()
        };
        let reads = futures::stream::iter(unknown).map(|subject| async move {
            let id = &subject["Patient/".len()..];
            let label = match self.http.read_resource("Patient", id).await {
                Ok(body) => serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|patient| names::person_label(&patient["name"])),
                Err(e) => {
                    debug!(error = %e, "cannot read a patient's name; the folder keeps its id");
                    None
                }
            };
            (subject, label)
        });
        let read: Vec<(String, Option<String>)> =
            reads.buffer_unordered(LABEL_READS).collect().await;
        let mut known = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        known.extend(read);
        known.iter().filter_map(|(s, l)| Some((s.clone(), l.clone()?))).collect()
    }

    /// The bytes at an attachment's url. A `Binary/[id]` url with `held` (the Binary's
    /// version the caller holds) may answer `None`: still current.
    async fn fetch_url(
        &self,
        url: &str,
        att: &Attachment,
        held: Option<&str>,
    ) -> Result<Option<Got>, SourceError> {
        let kind = att.content_type.as_deref();
        match self.http.attachment_target(url)? {
            Target::Binary(id) => {
                self.http.expect_content_type(&id, kind);
                match self.http.fetch(&id, held).await? {
                    Fetched::Content { meta, bytes } => Ok(Some(Got {
                        bytes,
                        kind: meta.content_type.unwrap_or_default(),
                        binary_version: meta.version_id,
                    })),
                    Fetched::NotModified => Ok(None),
                }
            }
            target => {
                let (bytes, kind) = self.http.fetch_url(&target, kind).await?;
                Ok(Some(Got { bytes, kind, binary_version: None }))
            }
        }
    }

    /// The bytes of `file`: its `data`, or its `url` (renewed once when another origin
    /// refuses it). With `held` (the Binary's version of the bytes the caller holds, for the
    /// same document version), `None` when they are still current. Gives the file as it
    /// stands after a renewal.
    async fn content(
        &self,
        key: &str,
        mut file: File,
        held: Option<&str>,
    ) -> Result<(Option<Got>, File), SourceError> {
        let att = file.attachment().clone();
        if let Some(data) = &att.data {
            return Ok((Some(inline(key, &att, data)?), file));
        }
        let Some(url) = att.url.clone() else { return Err(SourceError::NotFound) };
        let other_origin = matches!(self.http.attachment_target(&url)?, Target::OtherOrigin(_));
        match self.fetch_url(&url, &att, held).await {
            Err(SourceError::Unauthorized | SourceError::Forbidden | SourceError::NotFound)
                if other_origin =>
            {
                // A presigned storage URL that expired: the document hands out a fresh one.
                let document = &file.document;
                let fresh = self.http.read_document(document.kind, &document.id).await?;
                let Some(index) = fresh.attachments.iter().position(|a| a.index == att.index)
                else {
                    return Err(SourceError::NotFound);
                };
                debug!(key, "renewed the attachment url by reading the document again");
                file = File {
                    document: Arc::new(fresh),
                    attachment: index,
                    hash: None,
                    binary_version: None,
                };
                let att = file.attachment().clone();
                let got = match (&att.data, &att.url) {
                    (Some(data), _) => inline(key, &att, data)?,
                    (None, Some(url)) => match self.fetch_url(url, &att, None).await? {
                        Some(got) => got,
                        None => return Err(SourceError::BadBody("304 to a plain GET".into())),
                    },
                    (None, None) => return Err(SourceError::NotFound),
                };
                self.files().insert(key.to_owned(), file.clone());
                Ok((Some(got), file))
            }
            other => other.map(|got| (got, file)),
        }
    }
}

impl Source for DocumentsSource {
    async fn list(&self) -> Result<Vec<Listed>, SourceError> {
        let documents: Vec<Arc<Document>> =
            self.documents().await?.into_iter().map(Arc::new).collect();
        let plain: Vec<Document> = documents.iter().map(|d| (**d).clone()).collect();
        let labels = if self.config.patient_names && self.folders() {
            self.labels(&plain).await
        } else {
            HashMap::new()
        };
        let mut named = names::name_files_labelled(&plain, &labels);
        // Folder by folder, by name: the order `ls`, `cp -r` and `rsync` walk in, so that the
        // core's read-ahead follows them.
        named.sort_unstable_by(|a, b| (&a.folder, &a.name).cmp(&(&b.folder, &b.name)));
        let mut files = HashMap::with_capacity(named.len());
        let mut listed = Vec::with_capacity(named.len());
        let folders = self.folders();
        for Named { folder, name, document, attachment } in named {
            let doc = &documents[document];
            let att = &doc.attachments[attachment];
            let key = file_key(doc, att);
            // Inline data is the content itself: its size is exact. A url's size is a hint,
            // never shown before the content confirms it.
            let size = att.data.as_deref().map(crate::fhir::decoded_len);
            let meta = Meta {
                version_id: doc.version_id.clone(),
                last_updated: doc.last_updated,
                content_type: att.content_type.clone(),
                security_context: None,
                size,
            };
            // What was learnt from the bytes holds while the document is the same version.
            let old = self.files().get(&key).filter(|f| same(&f.document, doc)).cloned();
            let (hash, binary_version) = old.map_or((None, None), |f| (f.hash, f.binary_version));
            let file = File { document: Arc::clone(doc), attachment, hash, binary_version };
            files.insert(key.clone(), file);
            let folder = folders.then_some(folder);
            listed.push(Listed { id: key, meta, name: Some(name), folder });
        }
        *self.files() = files;
        Ok(listed)
    }

    /// With `cached_version` (the document's version of the bytes the core holds) of the
    /// document as listed: inline `data` is still current, and a `Binary/[id]` url is asked
    /// whether its Binary is (`If-None-Match`); any other url is fetched again.
    async fn fetch(&self, key: &str, cached_version: Option<&str>) -> Result<Fetched, SourceError> {
        let Some(file) = self.files().get(key).cloned() else {
            return Err(SourceError::NotFound);
        };
        let current =
            cached_version.is_some() && cached_version == file.document.version_id.as_deref();
        if current && file.attachment().data.is_some() {
            return Ok(Fetched::NotModified);
        }
        let held = file.binary_version.clone().filter(|_| current);
        let timeout = self.http.timeout();
        let content = self.content(key, file, held.as_deref());
        let (got, file) = tokio::time::timeout(timeout, content)
            .await
            .map_err(|_| SourceError::Timeout(timeout))??;
        let Some(Got { bytes, kind, binary_version }) = got else {
            return Ok(Fetched::NotModified);
        };
        if let Some(entry) = self.files().get_mut(key) {
            entry.binary_version = binary_version;
        }
        let att = file.attachment();
        let check = att.hash.as_deref().map(|hash| check_hash(hash, &bytes));
        if let Some(check) = check {
            let first = {
                let mut files = self.files();
                let entry = files.get_mut(key);
                let before = entry.as_ref().and_then(|f| f.hash);
                if let Some(entry) = entry {
                    entry.hash = Some(check);
                }
                before != Some(check)
            };
            if check == HashCheck::Mismatch {
                if first {
                    warn!(
                        document = %file.document.reference(),
                        attachment = att.index,
                        "the attachment's hash does not match its bytes"
                    );
                }
                if self.config.verify_hash == VerifyHash::Strict {
                    return Err(SourceError::BadBody(format!(
                        "{}: the attachment's hash does not match its bytes",
                        file.document.reference()
                    )));
                }
            }
        }
        let content_type = att.content_type.clone().or((!kind.is_empty()).then_some(kind));
        let meta = Meta {
            version_id: file.document.version_id.clone(),
            last_updated: file.document.last_updated,
            content_type,
            security_context: None,
            size: Some(bytes.len() as u64),
        };
        Ok(Fetched::Content { meta, bytes })
    }

    /// Files are named after their documents; keys are not names.
    fn names_files(&self) -> bool {
        true
    }

    /// A folder per subject; with `--patient`, the root is that patient's folder.
    fn folders(&self) -> bool {
        self.config.patient.is_none()
    }

    /// A `Binary/[id]` url without a `hash` to check streams as a Binary does: the size
    /// from the headers, the bytes readable as they arrive. Anything else (inline data, other
    /// urls, a hash to check before the bytes are served) comes whole, through `fetch`.
    async fn fetch_streaming(
        self: &Arc<Self>,
        key: &str,
        cached_version: Option<&str>,
        reserve: &Reserve<'_>,
    ) -> Result<Streamed, SourceError> {
        let Some(file) = self.files().get(key).cloned() else {
            return Err(SourceError::NotFound);
        };
        let att = file.attachment();
        let target = match (&att.data, &att.url, &att.hash) {
            (None, Some(url), None) => Some(self.http.attachment_target(url)?),
            _ => None,
        };
        let Some(Target::Binary(id)) = target else {
            return Ok(match self.fetch(key, cached_version).await? {
                Fetched::NotModified => Streamed::NotModified,
                Fetched::Content { meta, bytes } => {
                    Streamed::Content { meta, body: crate::buffer::body::Body::whole(bytes) }
                }
            });
        };
        let current =
            cached_version.is_some() && cached_version == file.document.version_id.as_deref();
        let held = file.binary_version.clone().filter(|_| current);
        self.http.expect_content_type(&id, att.content_type.as_deref());
        match self.http.fetch_streaming(&id, held.as_deref(), reserve).await? {
            Streamed::NotModified => Ok(Streamed::NotModified),
            Streamed::Content { meta, body } => {
                if let Some(entry) = self.files().get_mut(key) {
                    entry.binary_version = meta.version_id;
                }
                let meta = Meta {
                    version_id: file.document.version_id.clone(),
                    last_updated: file.document.last_updated,
                    content_type: att.content_type.clone().or(meta.content_type),
                    security_context: None,
                    size: Some(body.len()),
                };
                Ok(Streamed::Content { meta, body })
            }
        }
    }

    fn xattrs(&self, key: &str) -> Vec<(&'static str, Vec<u8>)> {
        let Some(file) = self.files().get(key).cloned() else { return Vec::new() };
        let doc = &file.document;
        let att = file.attachment();
        let coding = doc.doc_type.codings.first();
        let kind = coding.map(|c| {
            format!("{}|{}", c.system.as_deref().unwrap_or(""), c.code.as_deref().unwrap_or(""))
        });
        let url = match (&att.url, &att.data) {
            (_, Some(_)) => Some("data".to_owned()),
            (Some(url), None) => Some(url.clone()),
            (None, None) => None,
        };
        let date = doc.date.clone().or_else(|| att.creation.clone());
        let hash_match = att
            .hash
            .as_ref()
            .map(|_| file.hash.map_or("not checked yet (read the file first)", HashCheck::label));
        let values = [
            ("user.fhir.source", Some(doc.reference())),
            ("user.fhir.url", url),
            ("user.fhir.type", kind),
            ("user.fhir.date", date),
            ("user.fhir.hash", att.hash.clone()),
            ("user.fhir.hash_match", hash_match.map(str::to_owned)),
        ];
        values.into_iter().filter_map(|(n, v)| v.map(|v| (n, v.into_bytes()))).collect()
    }

    async fn probe(&self) -> Result<(), SourceError> {
        self.http.probe().await
    }
}

/// The same version of a document (a hash check of its bytes still holds).
fn same(a: &Document, b: &Document) -> bool {
    a.version_id.is_some() && a.version_id == b.version_id && a.last_updated == b.last_updated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        base64_simd::STANDARD.encode_to_string(bytes)
    }

    #[test]
    fn hashes_in_every_known_form_match_and_others_do_not() {
        let bytes = b"hello";
        let digest = sha1_smol::Sha1::from(&bytes[..]).digest();
        assert_eq!(check_hash(&b64(&digest.bytes()), bytes), HashCheck::Matched);
        let hex = digest.to_string();
        assert_eq!(check_hash(&b64(hex.as_bytes()), bytes), HashCheck::MatchedHexInBase64);
        let upper = hex.to_ascii_uppercase();
        assert_eq!(check_hash(&b64(upper.as_bytes()), bytes), HashCheck::MatchedHexInBase64);
        let of_text = sha1_smol::Sha1::from(b64(bytes)).digest().bytes();
        assert_eq!(check_hash(&b64(&of_text), bytes), HashCheck::MatchedBase64Text);
        assert_eq!(check_hash(&b64(&digest.bytes()), b"hellO"), HashCheck::Mismatch);
        assert_eq!(check_hash("not base64 !!", bytes), HashCheck::Mismatch);
        assert_eq!(check_hash("", bytes), HashCheck::Mismatch);
    }
}
