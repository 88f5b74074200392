//! DocumentReference and DiagnosticReport searchset pages, parsed leniently into plain
//! structs: where the documents of the documents view come from.
//!
//! Each entry is read on its own from a `serde_json::Value`, and each element only when it has
//! the right JSON type: a server that sends `size` as a string or `type` as a list loses that
//! element, not the entry, and one broken entry never loses the page. Entries that are not
//! DocumentReference or DiagnosticReport (an OperationOutcome with `search.mode = outcome`, a
//! Patient with `search.mode = include`) or that lack a valid id are skipped and counted.

use std::time::SystemTime;

use serde_json::Value;

use super::{FhirError, parse_instant};

/// The resource types that point at documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocKind {
    /// `DocumentReference.content[].attachment`.
    DocumentReference,
    /// `DiagnosticReport.presentedForm[]`.
    DiagnosticReport,
}

impl DocKind {
    /// The FHIR resource type name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DocumentReference => "DocumentReference",
            Self::DiagnosticReport => "DiagnosticReport",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "DocumentReference" => Some(Self::DocumentReference),
            "DiagnosticReport" => Some(Self::DiagnosticReport),
            _ => None,
        }
    }
}

/// One coding of a CodeableConcept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coding {
    /// `system`.
    pub system: Option<String>,
    /// `code`.
    pub code: Option<String>,
    /// `display`.
    pub display: Option<String>,
}

/// A CodeableConcept: its text and codings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Concept {
    /// `text`.
    pub text: Option<String>,
    /// `coding[]`, in order.
    pub codings: Vec<Coding>,
}

/// One Attachment of a document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    /// Its position in `content[]` or `presentedForm[]` (stable while the document is).
    pub index: usize,
    /// `contentType`.
    pub content_type: Option<String>,
    /// `url`, verbatim (often relative: `Binary/123`).
    pub url: Option<String>,
    /// `data`, the base64 text, not decoded.
    pub data: Option<String>,
    /// `size`: a hint, never shown before the content confirms it.
    pub size: Option<u64>,
    /// `hash`: a hint (base64 SHA-1 of the bytes by the spec).
    pub hash: Option<String>,
    /// `title`.
    pub title: Option<String>,
    /// `creation` (a FHIR dateTime), verbatim.
    pub creation: Option<String>,
}

/// One DocumentReference or DiagnosticReport, as far as the documents view needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// DocumentReference or DiagnosticReport.
    pub kind: DocKind,
    /// The resource id (checked against the FHIR id pattern).
    pub id: String,
    /// `meta.versionId`.
    pub version_id: Option<String>,
    /// `meta.lastUpdated`.
    pub last_updated: Option<SystemTime>,
    /// `subject.reference`, verbatim.
    pub subject: Option<String>,
    /// DocumentReference `date`; DiagnosticReport `issued`, else `effectiveDateTime`
    /// (verbatim: a dateTime may be only a year or a day).
    pub date: Option<String>,
    /// DocumentReference `description`.
    pub description: Option<String>,
    /// DocumentReference `type`; DiagnosticReport `code`.
    pub doc_type: Concept,
    /// The attachments, each with its position in the resource.
    pub attachments: Vec<Attachment>,
}

impl Document {
    /// `Type/id`, as a reference names it.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.id)
    }
}

/// One page of a search of documents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocumentPage {
    /// The documents of this page, in order.
    pub documents: Vec<Document>,
    /// The `next` link, verbatim.
    pub next: Option<String>,
    /// Entries with `search.mode = outcome` (an OperationOutcome, such as a warning that a
    /// parameter was ignored).
    pub outcomes: usize,
    /// Other entries skipped: of another type, without a valid id, or not an object.
    pub skipped: usize,
    /// `Bundle.total`, when the server says.
    pub total: Option<u64>,
}

/// Parses one searchset Bundle page of DocumentReference and DiagnosticReport entries.
pub fn parse_document_page(body: &[u8]) -> Result<DocumentPage, FhirError> {
    let bundle: Value = serde_json::from_slice(body).map_err(FhirError::json)?;
    let found = bundle.get("resourceType").and_then(Value::as_str);
    if found != Some("Bundle") {
        return Err(FhirError::wrong_type("Bundle", found));
    }
    let mut page = DocumentPage {
        next: bundle
            .get("link")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
            .and_then(|l| text(l, "url")),
        total: bundle.get("total").and_then(Value::as_u64),
        ..DocumentPage::default()
    };
    for entry in bundle.get("entry").and_then(Value::as_array).into_iter().flatten() {
        let mode = entry.get("search").and_then(|s| s.get("mode")).and_then(Value::as_str);
        if mode == Some("outcome") {
            page.outcomes += 1;
            continue;
        }
        match entry.get("resource").and_then(document) {
            Some(doc) => page.documents.push(doc),
            None => page.skipped += 1,
        }
    }
    Ok(page)
}

/// A string element of `value`, when it is a non-empty string.
fn text(value: &Value, name: &str) -> Option<String> {
    value.get(name).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn concept(value: Option<&Value>) -> Concept {
    let Some(value) = value else { return Concept::default() };
    let codings = value.get("coding").and_then(Value::as_array).into_iter().flatten();
    Concept {
        text: text(value, "text"),
        codings: codings
            .map(|c| Coding {
                system: text(c, "system"),
                code: text(c, "code"),
                display: text(c, "display"),
            })
            .collect(),
    }
}

fn attachment(index: usize, value: &Value) -> Attachment {
    Attachment {
        index,
        content_type: text(value, "contentType"),
        url: text(value, "url"),
        data: value.get("data").and_then(Value::as_str).map(str::to_owned),
        // `size` is an integer (unsignedInt in R4, integer64 in R5, which JSON carries as a
        // string).
        size: value.get("size").and_then(|s| s.as_u64().or_else(|| s.as_str()?.parse().ok())),
        hash: text(value, "hash"),
        title: text(value, "title"),
        creation: text(value, "creation"),
    }
}

/// The document in a resource, or `None` when it is not one (or has no valid id).
fn document(resource: &Value) -> Option<Document> {
    let kind = DocKind::parse(resource.get("resourceType")?.as_str()?)?;
    let id = text(resource, "id").filter(|id| crate::id::is_valid_id(id))?;
    let meta = resource.get("meta");
    let (date, doc_type, attachments) = match kind {
        DocKind::DocumentReference => {
            let content = resource.get("content").and_then(Value::as_array);
            let attachments = content
                .into_iter()
                .flatten()
                .enumerate()
                .filter_map(|(i, c)| Some(attachment(i, c.get("attachment")?)))
                .collect();
            (text(resource, "date"), concept(resource.get("type")), attachments)
        }
        DocKind::DiagnosticReport => {
            let forms = resource.get("presentedForm").and_then(Value::as_array);
            let attachments =
                forms.into_iter().flatten().enumerate().map(|(i, a)| attachment(i, a)).collect();
            let date = text(resource, "issued").or_else(|| text(resource, "effectiveDateTime"));
            (date, concept(resource.get("code")), attachments)
        }
    };
    Some(Document {
        kind,
        id,
        version_id: meta.and_then(|m| text(m, "versionId")),
        last_updated: meta.and_then(|m| text(m, "lastUpdated")).and_then(|t| parse_instant(&t)),
        subject: resource.get("subject").and_then(|s| text(s, "reference")),
        date,
        description: text(resource, "description"),
        doc_type,
        attachments,
    })
}

/// The document in a single resource (a read of the referring resource again, for a fresh
/// attachment `url`).
pub fn parse_document(body: &[u8]) -> Result<Document, FhirError> {
    let resource: Value = serde_json::from_slice(body).map_err(FhirError::json)?;
    let found = resource.get("resourceType").and_then(Value::as_str);
    document(&resource).ok_or_else(|| {
        FhirError::wrong_type("DocumentReference or DiagnosticReport with an id", found)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const PAGE: &str = r#"{"resourceType":"Bundle","type":"searchset","total":4,
      "link":[{"relation":"self","url":"x"},{"relation":"next","url":"DocumentReference?_page=2"}],
      "entry":[
        {"resource":{"resourceType":"DocumentReference","id":"d1",
          "meta":{"versionId":"3","lastUpdated":"2024-05-06T07:08:09.123Z"},
          "status":"current","subject":{"reference":"Patient/p1"},
          "date":"2024-05-06T10:00:00+02:00","description":"Discharge summary",
          "type":{"text":"Summary","coding":[{"system":"http://loinc.org","code":"18842-5",
            "display":"Discharge summary"}]},
          "content":[
            {"attachment":{"contentType":"application/pdf","url":"Binary/b1","size":1234,
              "hash":"2jmj7l5rSw0yVb/vlWAYkK/YBwk=","title":"summary.pdf",
              "creation":"2024-05-05"}},
            {"format":{"code":"x"}},
            {"attachment":{"contentType":"text/plain","data":"aGk=","size":"2"}}
          ]},
          "search":{"mode":"match"}},
        {"resource":{"resourceType":"OperationOutcome","issue":[]},"search":{"mode":"outcome"}},
        {"resource":{"resourceType":"Patient","id":"p1"},"search":{"mode":"include"}},
        {"resource":{"resourceType":"DiagnosticReport","id":"r1",
          "subject":{"reference":"Patient/p1"},"issued":"2024-05-07T08:00:00Z",
          "code":{"coding":[{"code":"CT"}]},
          "presentedForm":[{"contentType":"application/dicom","url":"http://o/x.dcm"}]}},
        {"resource":{"resourceType":"DocumentReference","id":"../etc"}},
        {"resource":{"resourceType":"DocumentReference","id":7}},
        {"resource":"not an object"},
        {"resource":{"resourceType":"DocumentReference","id":"d2","content":"oops",
          "meta":"oops","subject":{"reference":5}}}
      ]}"#;

    #[test]
    fn a_page_gives_documents_attachments_and_next() {
        let page = parse_document_page(PAGE.as_bytes()).unwrap();
        assert_eq!(page.next.as_deref(), Some("DocumentReference?_page=2"));
        assert_eq!(page.total, Some(4));
        assert_eq!((page.outcomes, page.skipped), (1, 4));
        let ids: Vec<_> = page.documents.iter().map(Document::reference).collect();
        assert_eq!(ids, ["DocumentReference/d1", "DiagnosticReport/r1", "DocumentReference/d2"]);
        let d1 = &page.documents[0];
        assert_eq!(d1.version_id.as_deref(), Some("3"));
        assert_eq!(d1.last_updated, Some(UNIX_EPOCH + Duration::from_millis(1_714_979_289_123)));
        assert_eq!(d1.subject.as_deref(), Some("Patient/p1"));
        assert_eq!(d1.date.as_deref(), Some("2024-05-06T10:00:00+02:00"));
        assert_eq!(d1.description.as_deref(), Some("Discharge summary"));
        assert_eq!(d1.doc_type.text.as_deref(), Some("Summary"));
        assert_eq!(d1.doc_type.codings[0].code.as_deref(), Some("18842-5"));
        // The content without an attachment is left out; positions stay those of `content`.
        let indexes: Vec<_> = d1.attachments.iter().map(|a| a.index).collect();
        assert_eq!(indexes, [0, 2]);
        let pdf = &d1.attachments[0];
        assert_eq!(pdf.url.as_deref(), Some("Binary/b1"));
        assert_eq!((pdf.size, pdf.title.as_deref()), (Some(1234), Some("summary.pdf")));
        assert_eq!(pdf.hash.as_deref(), Some("2jmj7l5rSw0yVb/vlWAYkK/YBwk="));
        assert_eq!(pdf.creation.as_deref(), Some("2024-05-05"));
        let inline = &d1.attachments[1];
        assert_eq!((inline.data.as_deref(), inline.size), (Some("aGk="), Some(2)));
        let r1 = &page.documents[1];
        assert_eq!(r1.date.as_deref(), Some("2024-05-07T08:00:00Z"));
        assert_eq!(r1.doc_type.codings[0].code.as_deref(), Some("CT"));
        assert_eq!(r1.attachments[0].url.as_deref(), Some("http://o/x.dcm"));
        // Elements of the wrong JSON type are absent, the entry kept.
        let d2 = &page.documents[2];
        assert!(d2.attachments.is_empty() && d2.subject.is_none() && d2.version_id.is_none());
    }

    #[test]
    fn pages_that_are_not_bundles_are_errors() {
        assert!(parse_document_page(br#"{"resourceType":"Binary"}"#).is_err());
        assert!(parse_document_page(b"<html>").is_err());
        let empty = parse_document_page(br#"{"resourceType":"Bundle"}"#).unwrap();
        assert_eq!(empty, DocumentPage::default());
    }

    #[test]
    fn a_single_resource_parses() {
        let body = br#"{"resourceType":"DocumentReference","id":"d1",
            "content":[{"attachment":{"url":"https://s3/x?sig=new"}}]}"#;
        let doc = parse_document(body).unwrap();
        assert_eq!(doc.attachments[0].url.as_deref(), Some("https://s3/x?sig=new"));
        assert!(parse_document(br#"{"resourceType":"Patient","id":"p"}"#).is_err());
    }
}
