//! The `--demo` server: three sample Binaries served on 127.0.0.1 over plain HTTP/1.1, so that
//! a mount with no FHIR server at hand goes through the same HTTP path as a real one; and, for
//! `--demo --view documents`, three documents of two patients that point at them.
//!
//! It answers what fhirfs asks and nothing more: a one-page `Binary` search, and reads of one
//! Binary as FHIR JSON or as its native bytes (by `Accept`), with `ETag`, `Last-Modified`,
//! `If-None-Match` and `HEAD`; one-page DocumentReference and DiagnosticReport searches (by
//! `patient`, when given), and reads of one of them. The test servers with faults and quirk modes live in the
//! `fhirfs-testserver` crate, outside the product.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::debug;

const FHIR_JSON: &str = "application/fhir+json";
/// Every sample is at its first version.
const VERSION_ID: &str = "1";

/// One sample Binary.
struct Sample {
    id: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const SAMPLES: &[Sample] = &[
    Sample {
        id: "report-pdf",
        content_type: "application/pdf",
        bytes: include_bytes!("../assets/demo/report.pdf"),
    },
    Sample {
        id: "scan-png",
        content_type: "image/png",
        bytes: include_bytes!("../assets/demo/scan.png"),
    },
    Sample {
        id: "notes-txt",
        content_type: "text/plain",
        bytes: include_bytes!("../assets/demo/notes.txt"),
    },
];

/// The demo's documents: (resourceType, id, subject, the resource's own elements). The
/// attachments point at the samples in each of the ways servers do: a relative `Binary/[id]`,
/// inline `data`, and an absolute URL on the base (`{base}` is replaced).
fn documents(base: &str) -> Vec<Value> {
    let sha1 = |bytes: &[u8]| {
        base64_simd::STANDARD.encode_to_string(sha1_smol::Sha1::from(bytes).digest().bytes())
    };
    let (pdf, png, notes) = (SAMPLES[0].bytes, SAMPLES[1].bytes, SAMPLES[2].bytes);
    vec![
        json!({
            "resourceType": "DocumentReference", "id": "discharge", "status": "current",
            "subject": {"reference": "Patient/demo-1"}, "date": "2024-05-06T14:20:00Z",
            "description": "Discharge summary",
            "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5",
                                 "display": "Discharge summary"}]},
            "content": [
                {"attachment": {"contentType": "application/pdf", "url": "Binary/report-pdf",
                                "size": pdf.len(), "hash": sha1(pdf)}},
                {"attachment": {"contentType": "text/plain", "title": "Nursing notes",
                                "data": base64_simd::STANDARD.encode_to_string(notes)}}
            ]
        }),
        json!({
            "resourceType": "DiagnosticReport", "id": "ct-chest", "status": "final",
            "subject": {"reference": "Patient/demo-1"}, "issued": "2024-05-07T09:30:00Z",
            "code": {"text": "CT chest"},
            "presentedForm": [{"contentType": "image/png", "url": format!("{base}/Binary/scan-png"),
                               "hash": sha1(png)}]
        }),
        json!({
            "resourceType": "DocumentReference", "id": "referral", "status": "current",
            "subject": {"reference": "Patient/demo-2"}, "date": "2024-04-02",
            "type": {"text": "Referral letter"},
            "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/notes-txt"}}]
        }),
    ]
}

/// A running demo server. It serves on the current tokio runtime until that runtime stops.
pub struct DemoServer {
    addr: SocketAddr,
}

impl DemoServer {
    /// Binds 127.0.0.1:0 and starts serving the samples.
    pub async fn start() -> std::io::Result<DemoServer> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        // Milliseconds, as servers store them: the listing and the reads then agree exactly.
        let started = OffsetDateTime::from(SystemTime::now());
        let started = started.replace_millisecond(started.millisecond()).unwrap_or(started);
        let site = Arc::new(Site { base: format!("http://{addr}/fhir"), last_updated: started });
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let site = Arc::clone(&site);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let answer = site.answer(&request);
                        async move { Ok::<_, Infallible>(answer) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(err) = connection.await {
                        debug!(%err, "demo server: connection ended");
                    }
                });
            }
        });
        Ok(DemoServer { addr })
    }

    /// The FHIR base, e.g. `http://127.0.0.1:41234/fhir`.
    pub fn base_url(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }
}

/// What every answer is made from.
struct Site {
    base: String,
    /// `meta.lastUpdated` of every sample: when the server started.
    last_updated: OffsetDateTime,
}

type Answer = Response<Full<Bytes>>;

impl Site {
    fn answer(&self, request: &Request<Incoming>) -> Answer {
        let head = request.method() == Method::HEAD;
        if request.method() != Method::GET && !head {
            return outcome(StatusCode::METHOD_NOT_ALLOWED, "the demo server is read-only");
        }
        let query: Vec<(String, String)> = request
            .uri()
            .query()
            .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let path = request.uri().path();
        let document = path.strip_prefix("/fhir/").and_then(|p| {
            let (kind, id) = p.split_once('/').unwrap_or((p, ""));
            matches!(kind, "DocumentReference" | "DiagnosticReport").then_some((kind, id))
        });
        let answer = match (path.strip_prefix("/fhir/Binary"), document) {
            (Some(""), _) if !head => self.search(),
            (Some(rest), _) => match rest.strip_prefix('/').and_then(sample) {
                Some(sample) => self.read(sample, request, &query),
                None => outcome(StatusCode::NOT_FOUND, "no such Binary"),
            },
            (None, Some((kind, ""))) if !head => self.document_search(kind, &query),
            (None, Some((kind, id))) => self.document_read(kind, id),
            (None, None) => outcome(StatusCode::NOT_FOUND, "the demo server serves no such type"),
        };
        if head { without_body(answer) } else { answer }
    }

    /// `GET Binary?...`: every sample in one searchset page, without `data`.
    fn search(&self) -> Answer {
        let entries: Vec<Value> = SAMPLES
            .iter()
            .map(|s| {
                json!({
                    "fullUrl": format!("{}/Binary/{}", self.base, s.id),
                    "resource": self.resource(s, false),
                    "search": {"mode": "match"},
                })
            })
            .collect();
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": entries.len(),
            "link": [{"relation": "self", "url": format!("{}/Binary", self.base)}],
            "entry": entries,
        });
        fhir_json(StatusCode::OK, &bundle)
    }

    /// A document with its `meta`.
    fn document(&self, mut resource: Value) -> Value {
        resource["meta"] = json!({
            "versionId": VERSION_ID,
            "lastUpdated": self.last_updated.format(&Rfc3339).unwrap_or_default(),
        });
        resource
    }

    /// `GET DocumentReference?patient=...` (or DiagnosticReport): one page.
    fn document_search(&self, kind: &str, query: &[(String, String)]) -> Answer {
        let patient =
            query.iter().find(|(k, _)| k == "patient").map(|(_, v)| format!("Patient/{v}"));
        let entries: Vec<Value> = documents(&self.base)
            .into_iter()
            .filter(|d| d["resourceType"] == kind)
            .filter(|d| patient.as_ref().is_none_or(|p| d["subject"]["reference"] == p.as_str()))
            .map(|d| {
                let url = format!("{}/{kind}/{}", self.base, d["id"].as_str().unwrap_or_default());
                json!({"fullUrl": url, "resource": self.document(d), "search": {"mode": "match"}})
            })
            .collect();
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": entries.len(),
            "link": [{"relation": "self", "url": format!("{}/{kind}", self.base)}],
            "entry": entries,
        });
        fhir_json(StatusCode::OK, &bundle)
    }

    /// `GET DocumentReference/{id}` (or DiagnosticReport).
    fn document_read(&self, kind: &str, id: &str) -> Answer {
        let found =
            documents(&self.base).into_iter().find(|d| d["resourceType"] == kind && d["id"] == id);
        match found {
            Some(document) => fhir_json(StatusCode::OK, &self.document(document)),
            None => outcome(StatusCode::NOT_FOUND, "no such document"),
        }
    }

    /// `GET Binary/{id}`: the resource (without `data` for `_summary`/`_elements`) or the
    /// native bytes, by `Accept`.
    fn read(
        &self,
        sample: &Sample,
        request: &Request<Incoming>,
        query: &[(String, String)],
    ) -> Answer {
        let etag = format!("W/\"{VERSION_ID}\"");
        let mut answer = if if_none_match(request, &etag) {
            let mut answer = Response::new(Full::default());
            *answer.status_mut() = StatusCode::NOT_MODIFIED;
            answer
        } else if query.iter().any(|(k, _)| k == "_summary" || k == "_elements") {
            fhir_json(StatusCode::OK, &self.resource(sample, false))
        } else if wants_json(request, query) {
            fhir_json(StatusCode::OK, &self.resource(sample, true))
        } else {
            let mut answer = Response::new(Full::new(Bytes::from_static(sample.bytes)));
            answer
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(sample.content_type));
            answer
        };
        let modified = httpdate::fmt_http_date(self.last_updated.into());
        let headers = answer.headers_mut();
        headers.insert(header::ETAG, header_value(&etag));
        headers.insert(header::LAST_MODIFIED, header_value(&modified));
        answer
    }

    /// The Binary resource of `sample`, with or without `data`.
    fn resource(&self, sample: &Sample, with_data: bool) -> Value {
        let mut resource = json!({
            "resourceType": "Binary",
            "id": sample.id,
            "meta": {
                "versionId": VERSION_ID,
                "lastUpdated": self.last_updated.format(&Rfc3339).unwrap_or_default(),
            },
            "contentType": sample.content_type,
        });
        if with_data {
            resource["data"] = base64_simd::STANDARD.encode_to_string(sample.bytes).into();
        }
        resource
    }
}

fn sample(id: &str) -> Option<&'static Sample> {
    SAMPLES.iter().find(|s| s.id == id)
}

/// Whether the request asks for FHIR JSON: `_format=json`, or an `Accept` that is absent or
/// names a JSON type (HAPI's rule). fhirfs asks `*/*` or the content type for native bytes.
fn wants_json(request: &Request<Incoming>, query: &[(String, String)]) -> bool {
    let json_type = |t: &str| matches!(t.trim(), "json" | FHIR_JSON | "application/json");
    if query.iter().any(|(k, v)| k == "_format" && json_type(v)) {
        return true;
    }
    match request.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(accept) => accept
            .split(',')
            .filter_map(|range| range.split(';').next())
            .any(|media| json_type(&media.to_ascii_lowercase())),
    }
}

/// Whether `If-None-Match` names `etag` (weak comparison) or `*`.
fn if_none_match(request: &Request<Incoming>, etag: &str) -> bool {
    let bare = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    request
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == "*" || bare(tag) == bare(etag))
}

/// The answer's status and headers, with the `Content-Length` of its body and no body.
fn without_body(answer: Answer) -> Answer {
    let (mut parts, body) = answer.into_parts();
    let len = hyper::body::Body::size_hint(&body).exact().unwrap_or(0);
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Response::from_parts(parts, Full::default())
}

/// A FHIR error answer: `status` with a one-issue OperationOutcome.
fn outcome(status: StatusCode, diagnostics: &str) -> Answer {
    let code = if status == StatusCode::NOT_FOUND { "not-found" } else { "not-supported" };
    let issue = json!({"severity": "error", "code": code, "diagnostics": diagnostics});
    fhir_json(status, &json!({"resourceType": "OperationOutcome", "issue": [issue]}))
}

fn fhir_json(status: StatusCode, body: &Value) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(body.to_string())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    answer
}

/// `text` as a header value; the callers pass ASCII (dates, quoted digits).
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn json(response: reqwest::Response) -> Value {
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    }

    async fn get(url: &str, accept: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new().get(url);
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT, accept);
        }
        request.send().await.unwrap()
    }

    #[tokio::test]
    async fn samples_are_listed_and_read_raw_or_as_json() {
        let server = DemoServer::start().await.unwrap();
        let base = server.base_url();
        let bundle: Value = json(get(&format!("{base}/Binary?_count=50"), None).await).await;
        let ids: Vec<&str> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["report-pdf", "scan-png", "notes-txt"]);
        assert!(bundle["entry"][0]["resource"].get("data").is_none());

        let raw = get(&format!("{base}/Binary/scan-png"), Some("*/*")).await;
        assert_eq!(raw.headers()[header::CONTENT_TYPE], "image/png");
        assert_eq!(raw.headers()[header::ETAG], "W/\"1\"");
        assert_eq!(raw.bytes().await.unwrap(), SAMPLES[1].bytes);

        let json: Value =
            json(get(&format!("{base}/Binary/notes-txt"), Some(FHIR_JSON)).await).await;
        let data = base64_simd::STANDARD.decode_to_vec(json["data"].as_str().unwrap()).unwrap();
        assert_eq!(data, SAMPLES[2].bytes);
        assert_eq!(
            json["meta"]["lastUpdated"],
            bundle["entry"][2]["resource"]["meta"]["lastUpdated"]
        );
    }

    #[tokio::test]
    async fn documents_are_searched_by_patient_and_read() {
        let server = DemoServer::start().await.unwrap();
        let base = server.base_url();
        let ids = |bundle: &Value| -> Vec<String> {
            let entries = bundle["entry"].as_array().unwrap().iter();
            entries.map(|e| e["resource"]["id"].as_str().unwrap().to_owned()).collect()
        };
        let all = json(get(&format!("{base}/DocumentReference?_count=10"), None).await).await;
        assert_eq!(ids(&all), ["discharge", "referral"]);
        let url = format!("{base}/DocumentReference?patient=demo-2&_count=10");
        assert_eq!(ids(&json(get(&url, None).await).await), ["referral"]);
        let url = format!("{base}/DiagnosticReport?patient=demo-1");
        assert_eq!(ids(&json(get(&url, None).await).await), ["ct-chest"]);
        let one = json(get(&format!("{base}/DiagnosticReport/ct-chest"), None).await).await;
        assert_eq!(one["presentedForm"][0]["url"], format!("{base}/Binary/scan-png"));
        assert_eq!(one["meta"]["versionId"], "1");
        let missing = get(&format!("{base}/DocumentReference/nope"), None).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn head_missing_ids_and_conditional_reads() {
        let server = DemoServer::start().await.unwrap();
        let url = format!("{}/Binary/report-pdf", server.base_url());
        let head =
            reqwest::Client::new().head(&url).header(header::ACCEPT, "*/*").send().await.unwrap();
        assert_eq!(head.headers()[header::CONTENT_LENGTH], SAMPLES[0].bytes.len().to_string());
        let missing =
            get(&format!("{}/Binary/{}", server.base_url(), crate::http::PROBE_ID), None).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let again = reqwest::Client::new()
            .get(&url)
            .header(header::IF_NONE_MATCH, "W/\"1\"")
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    }
}
