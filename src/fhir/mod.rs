//! FHIR JSON: the Binary resource and searchset Bundles, parsed without copying `data`.
//!
//! - this module: Binary resources and searchset Bundles, parsed whole;
//! - [`json`]: decoding a Binary's FHIR JSON while it streams in.

pub mod documents;
pub mod json;

use std::borrow::Cow;
use std::time::SystemTime;

use serde::Deserialize;

use crate::error::SourceError;
use crate::source::{Listed, Meta};

/// What is wrong with a FHIR JSON body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirError {
    /// Not JSON, or not of the resource's shape (serde_json's message says where).
    #[error("malformed JSON: {0}")]
    Json(String),
    /// A resource of another type than the one expected.
    #[error("resourceType is {found:?}, not {expected}")]
    WrongType {
        /// The type wanted: `Binary` or `Bundle`.
        expected: &'static str,
        /// The `resourceType` found, or `(missing)`.
        found: String,
    },
    /// `data` is not base64.
    #[error("invalid base64")]
    Base64,
}

impl From<FhirError> for SourceError {
    fn from(e: FhirError) -> Self {
        SourceError::BadBody(e.to_string())
    }
}

impl FhirError {
    fn json(e: serde_json::Error) -> Self {
        Self::Json(e.to_string())
    }

    fn wrong_type(expected: &'static str, found: Option<&str>) -> Self {
        Self::WrongType { expected, found: found.unwrap_or("(missing)").to_owned() }
    }
}

/// The FHIR JSON media type; `application/json` is accepted as its alias.
pub const FHIR_JSON: &str = "application/fhir+json";

/// The FHIR XML media type: the resource, never the content (fhirfs reads FHIR JSON).
pub const FHIR_XML: &str = "application/fhir+xml";

/// The `meta.tag` code a server adds when it left elements (such as `data`) out.
const SUBSETTED: &str = "SUBSETTED";

#[derive(Deserialize)]
struct RawResource<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Cow<'a, str>>,
    id: Option<String>,
    meta: Option<RawMeta>,
    #[serde(rename = "contentType")]
    content_type: Option<String>,
    #[serde(rename = "securityContext")]
    security_context: Option<RawReference>,
    // Borrowed from the body when the JSON string has no escapes (the common case); owned
    // when a server escapes `/` as `\/`. (`Option<Cow<str>>` with `#[serde(borrow)]` would
    // always copy: serde borrows only a bare `Cow`.)
    #[serde(borrow)]
    data: Option<Text<'a>>,
}

/// A JSON string, borrowed from the input when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Deserialize)]
struct RawMeta {
    #[serde(rename = "versionId")]
    version_id: Option<String>,
    #[serde(rename = "lastUpdated")]
    last_updated: Option<String>,
    #[serde(default)]
    tag: Vec<RawCoding>,
}

#[derive(Deserialize)]
struct RawCoding {
    code: Option<String>,
}

#[derive(Deserialize)]
struct RawReference {
    reference: Option<String>,
}

#[derive(Deserialize)]
struct RawBundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    // Read leniently: a `total` of the wrong JSON type is no total, not a broken page.
    #[serde(borrow)]
    total: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    link: Vec<RawLink>,
    // Each entry is parsed on its own, so that one malformed entry (an `id` that is a number,
    // a `resource` that is not an object) is skipped without losing the page.
    #[serde(default, borrow)]
    entry: Vec<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct RawLink {
    relation: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(borrow)]
    resource: Option<RawResource<'a>>,
    request: Option<RawRequest>,
}

/// `Bundle.entry.request`: in a history Bundle, how the version came to be.
#[derive(Deserialize)]
struct RawRequest {
    method: Option<String>,
    url: Option<String>,
}

/// The Binary id a history entry's `request.url` names (`Binary/123`, maybe absolute, maybe
/// with `/_history/2` or a query after it).
fn binary_id_of_url(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let mut segments = path.split('/');
    segments.by_ref().find(|s| *s == "Binary")?;
    let id = segments.next()?;
    crate::id::is_valid_id(id).then(|| id.to_owned())
}

impl RawResource<'_> {
    fn meta(&self) -> Meta {
        let raw = self.meta.as_ref();
        Meta {
            version_id: raw.and_then(|m| m.version_id.clone()),
            last_updated: raw.and_then(|m| m.last_updated.as_deref()).and_then(parse_instant),
            content_type: self.content_type.clone(),
            security_context: self.security_context.as_ref().and_then(|r| r.reference.clone()),
            size: None,
        }
    }

    fn subsetted(&self) -> bool {
        self.meta
            .as_ref()
            .is_some_and(|m| m.tag.iter().any(|t| t.code.as_deref() == Some(SUBSETTED)))
    }

    fn is_binary(&self) -> bool {
        self.resource_type.as_deref() == Some("Binary")
    }
}

/// A Binary resource read from its JSON form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    /// The resource id, when the JSON has one.
    pub id: Option<String>,
    /// Version, time, type; `size` is set when `data` was present.
    pub meta: Meta,
    /// The decoded `data`, or `None` when the element is absent.
    pub data: Option<Vec<u8>>,
    /// The server marked the resource as a subset (elements such as `data` were left out).
    pub subsetted: bool,
}

/// Where `data` is, once the JSON is parsed.
enum Data {
    Absent,
    /// A byte range of the body itself (no escapes): decoded in place.
    InBody {
        start: usize,
        len: usize,
    },
    /// Unescaped into its own string.
    Owned(String),
}

/// Parses a Binary resource and decodes its `data` exactly once, in place: the base64 text is
/// turned into bytes inside the body's own buffer, which becomes the content. A 64 MiB Binary
/// costs its ~85 MiB body and nothing more.
pub fn decode_binary(mut body: Vec<u8>) -> Result<Binary, FhirError> {
    let (mut binary, data) = {
        let raw: RawResource<'_> = serde_json::from_slice(&body).map_err(FhirError::json)?;
        if !raw.is_binary() {
            return Err(FhirError::wrong_type("Binary", raw.resource_type.as_deref()));
        }
        let binary =
            Binary { id: raw.id.clone(), subsetted: raw.subsetted(), meta: raw.meta(), data: None };
        let data = match raw.data {
            None => Data::Absent,
            Some(Text(Cow::Borrowed(text))) => {
                // A borrowed string lies inside `body`: its offset is the pointer difference.
                let start = text.as_ptr() as usize - body.as_ptr() as usize;
                Data::InBody { start, len: text.len() }
            }
            Some(Text(Cow::Owned(text))) => Data::Owned(text),
        };
        (binary, data)
    };
    binary.data = match data {
        Data::Absent => None,
        Data::InBody { start, len } => {
            let decoded = decode_in_place(&mut body[start..start + len])?;
            body.copy_within(start..start + decoded, 0);
            body.truncate(decoded);
            // Large buffers are their own mappings: shrinking them moves no bytes.
            body.shrink_to_fit();
            Some(body)
        }
        Data::Owned(text) => {
            let mut bytes = text.into_bytes();
            let decoded = decode_in_place(&mut bytes)?;
            bytes.truncate(decoded);
            bytes.shrink_to_fit();
            Some(bytes)
        }
    };
    binary.meta.size = binary.data.as_ref().map(|d| d.len() as u64);
    Ok(binary)
}

/// Decodes base64 in place (whitespace and missing padding tolerated); the decoded length.
fn decode_in_place(buf: &mut [u8]) -> Result<usize, FhirError> {
    base64_simd::forgiving_decode_inplace(buf)
        .map(|decoded| decoded.len())
        .map_err(|_| FhirError::Base64)
}

/// True when the body looks like a FHIR resource of type Binary (used for `application/json`,
/// which some servers send for FHIR and others for raw JSON content).
pub fn looks_like_binary(body: &[u8]) -> bool {
    serde_json::from_slice::<RawResource<'_>>(body).is_ok_and(|r| r.is_binary())
}

/// What a Binary resource says about itself, read without decoding `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The resource id, when the JSON has one.
    pub id: Option<String>,
    /// Version, time, type and security context (`size` is not set).
    pub meta: Meta,
    /// The resource carries `data`.
    pub has_data: bool,
}

/// The identity of the Binary resource in `body`, or `None` when `body` is not one.
pub fn binary_identity(body: &[u8]) -> Option<Identity> {
    let raw: RawResource<'_> = serde_json::from_slice(body).ok()?;
    let identity = Identity { id: raw.id.clone(), meta: raw.meta(), has_data: raw.data.is_some() };
    raw.is_binary().then_some(identity)
}

/// One page of a search.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// The Binary entries of this page with valid ids.
    pub entries: Vec<Listed>,
    /// The `next` link, verbatim.
    pub next: Option<String>,
    /// Entries that were skipped (not Binary, or with an id outside the FHIR pattern).
    pub skipped: usize,
    /// `Bundle.total`: how many match the search, when the server says.
    pub total: Option<u64>,
    /// `Bundle.type` is `history`: entries are versions, newest first.
    pub history: bool,
    /// Binaries a history Bundle reports deleted (a DELETE entry), each with how many of
    /// `entries` came before it in the Bundle.
    pub deleted: Vec<(usize, String)>,
}

/// Parses one searchset Bundle page.
pub fn parse_bundle(body: &[u8]) -> Result<Page, FhirError> {
    let raw: RawBundle<'_> = serde_json::from_slice(body).map_err(FhirError::json)?;
    if raw.resource_type.as_deref() != Some("Bundle") {
        return Err(FhirError::wrong_type("Bundle", raw.resource_type.as_deref()));
    }
    let next =
        raw.link.into_iter().find(|l| l.relation.as_deref() == Some("next")).and_then(|l| l.url);
    let total = raw.total.and_then(|t| serde_json::from_str::<u64>(t.get()).ok());
    let history = raw.kind.as_deref() == Some("history");
    let mut page = Page { next, total, history, ..Page::default() };
    for entry in raw.entry {
        let entry: Option<RawEntry<'_>> = serde_json::from_str(entry.get()).ok();
        let deleted = entry.as_ref().and_then(|e| {
            let request = e.request.as_ref().filter(|r| r.method.as_deref() == Some("DELETE"))?;
            request.url.as_deref().and_then(binary_id_of_url)
        });
        if let Some(id) = deleted.filter(|_| history) {
            page.deleted.push((page.entries.len(), id));
            continue;
        }
        let Some(RawEntry { resource: Some(resource), .. }) = entry else {
            page.skipped += 1;
            continue;
        };
        let id = resource.id.clone().filter(|id| crate::id::is_valid_id(id));
        match id {
            Some(id) if resource.is_binary() => {
                let mut meta = resource.meta();
                // A subset never tells the size; otherwise `data` gives it without decoding.
                if !resource.subsetted() {
                    meta.size = resource.data.as_deref().map(decoded_len);
                }
                page.entries.push(Listed { id, meta, name: None, folder: None });
            }
            _ => page.skipped += 1,
        }
    }
    Ok(page)
}

/// The decoded length of base64 text, from its length and padding, without decoding.
pub fn decoded_len(text: &str) -> u64 {
    let bytes = text.as_bytes();
    let significant = bytes.iter().filter(|b| !b.is_ascii_whitespace()).count() as u64;
    let padding = bytes.iter().rev().filter(|b| !b.is_ascii_whitespace()).take(2);
    let padding = padding.take_while(|&&b| b == b'=').count() as u64;
    let chars = significant - padding;
    // Every 4 characters carry 3 bytes; a tail of 2 or 3 characters carries 1 or 2.
    chars / 4 * 3 + (chars % 4).saturating_sub(1)
}

/// Parses a FHIR `instant` (RFC 3339 with a time zone).
pub fn parse_instant(text: &str) -> Option<SystemTime> {
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339);
    parsed.ok().map(SystemTime::from)
}

/// Formats a time as a FHIR `instant` in UTC with milliseconds.
pub fn format_instant(time: SystemTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let utc = time::OffsetDateTime::from(time);
    // Years 0..=9999 always format; anything else falls back to the RFC 3339 form.
    utc.format(&format).unwrap_or_else(|_| utc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn binary_identity_reads_id_version_and_whether_data_is_there() {
        let with = br#"{"resourceType":"Binary","id":"a","meta":{"versionId":"2"},"data":"aGk="}"#;
        let identity = binary_identity(with).unwrap();
        assert_eq!(identity.id.as_deref(), Some("a"));
        assert_eq!(identity.meta.version_id.as_deref(), Some("2"));
        assert!(identity.has_data);
        let without = br#"{"resourceType":"Binary","contentType":"text/plain"}"#;
        let identity = binary_identity(without).unwrap();
        assert_eq!((identity.id, identity.has_data), (None, false));
        assert_eq!(identity.meta.content_type.as_deref(), Some("text/plain"));
        assert_eq!(binary_identity(br#"{"resourceType":"Patient","id":"a"}"#), None);
        assert_eq!(binary_identity(b"not json"), None);
    }

    fn b64(bytes: &[u8]) -> String {
        base64_simd::STANDARD.encode_to_string(bytes)
    }

    #[test]
    fn binary_with_data_is_decoded() {
        let body = format!(
            r#"{{"resourceType":"Binary","id":"a","meta":{{"versionId":"3",
            "lastUpdated":"2024-05-06T07:08:09.123Z"}},"contentType":"text/plain",
            "securityContext":{{"reference":"Patient/1"}},"data":"{}"}}"#,
            b64(b"hello")
        );
        let bin = decode_binary(body.as_bytes().to_vec()).unwrap();
        assert_eq!(bin.data.as_deref(), Some(&b"hello"[..]));
        assert_eq!(bin.meta.size, Some(5));
        assert_eq!(bin.meta.version_id.as_deref(), Some("3"));
        assert_eq!(bin.meta.content_type.as_deref(), Some("text/plain"));
        assert_eq!(bin.meta.security_context.as_deref(), Some("Patient/1"));
        let expected = UNIX_EPOCH + Duration::from_millis(1_714_979_289_123);
        assert_eq!(bin.meta.last_updated, Some(expected));
    }

    #[test]
    fn data_without_escapes_is_borrowed_from_the_body() {
        let plain = br#"{"resourceType":"Binary","data":"aGVsbG8="}"#;
        let raw: RawResource<'_> = serde_json::from_slice(plain).unwrap();
        assert!(matches!(raw.data, Some(Text(Cow::Borrowed(_)))), "no copy of the base64 text");
        let escaped = br#"{"resourceType":"Binary","data":"a\/b="}"#;
        let raw: RawResource<'_> = serde_json::from_slice(escaped).unwrap();
        assert!(matches!(raw.data, Some(Text(Cow::Owned(_)))));
    }

    #[test]
    fn escaped_slashes_in_data_decode_the_same() {
        let raw = [0xfb_u8, 0xff, 0xbf, 0x3f];
        let encoded = b64(&raw);
        assert!(encoded.contains('/'));
        let body =
            format!(r#"{{"resourceType":"Binary","data":"{}"}}"#, encoded.replace('/', "\\/"));
        assert_eq!(decode_binary(body.as_bytes().to_vec()).unwrap().data.unwrap(), raw);
    }

    #[test]
    fn absent_data_is_none_and_subset_is_flagged() {
        let body = br#"{"resourceType":"Binary","meta":{"tag":[{"code":"SUBSETTED"}]}}"#;
        let bin = decode_binary(body.to_vec()).unwrap();
        assert_eq!(bin.data, None);
        assert!(bin.subsetted);
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert!(matches!(decode_binary(b"{not json".to_vec()), Err(FhirError::Json(_))));
        assert!(decode_binary(br#"{"resourceType":"Binary","data":"#.to_vec()).is_err());
        let patient = br#"{"resourceType":"Patient","id":"a"}"#;
        assert_eq!(
            decode_binary(patient.to_vec()).unwrap_err().to_string(),
            "resourceType is \"Patient\", not Binary"
        );
        let bad = br#"{"resourceType":"Binary","data":"!!!!"}"#;
        assert_eq!(decode_binary(bad.to_vec()).unwrap_err(), FhirError::Base64);
        assert!(decode_binary(b"[]".to_vec()).is_err());
    }

    #[test]
    fn decoded_len_matches_decoding() {
        for n in 0..40 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37) as u8).collect();
            let text = b64(&bytes);
            assert_eq!(decoded_len(&text), n as u64, "padded {n}");
            assert_eq!(decoded_len(text.trim_end_matches('=')), n as u64, "unpadded {n}");
            let wrapped: String = text.chars().flat_map(|c| [c, '\n']).collect();
            assert_eq!(decoded_len(&wrapped), n as u64, "wrapped {n}");
        }
    }

    #[test]
    fn bundle_page_gives_entries_sizes_and_next_link_verbatim() {
        let body = format!(
            r#"{{"resourceType":"Bundle","type":"searchset",
            "link":[{{"relation":"self","url":"http://x/Binary"}},
                    {{"relation":"next","url":"http://x/Binary?_cursor=q%2Fz&x=1"}}],
            "entry":[
              {{"resource":{{"resourceType":"Binary","id":"a","contentType":"text/plain",
                "data":"{}"}}}},
              {{"resource":{{"resourceType":"Binary","id":"b","meta":{{"versionId":"2",
                "tag":[{{"code":"SUBSETTED"}}]}}}}}},
              {{"resource":{{"resourceType":"OperationOutcome","id":"o"}}}},
              {{"resource":{{"resourceType":"Binary","id":"../etc"}}}}
            ]}}"#,
            b64(b"1234567")
        );
        let page = parse_bundle(body.as_bytes()).unwrap();
        assert_eq!(page.next.as_deref(), Some("http://x/Binary?_cursor=q%2Fz&x=1"));
        let ids: Vec<_> = page.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(page.entries[0].meta.size, Some(7));
        assert_eq!(page.entries[1].meta.size, None);
        assert_eq!(page.entries[1].meta.version_id.as_deref(), Some("2"));
        assert_eq!(page.skipped, 2);
    }

    #[test]
    fn history_page_gives_versions_deletions_and_total() {
        let body = r#"{"resourceType":"Bundle","type":"history","total":"three",
            "entry":[
              {"request":{"method":"DELETE","url":"Binary/gone"},"response":{"status":"204"}},
              {"fullUrl":"http://x/fhir/Binary/a","resource":{"resourceType":"Binary","id":"a",
                "meta":{"versionId":"2"}},"request":{"method":"PUT","url":"Binary/a"}},
              {"request":{"method":"DELETE","url":"http://x/fhir/Binary/old/_history/3"}},
              {"request":{"method":"DELETE","url":"Patient/p"}},
              {"request":{"method":"DELETE","url":"Binary/bad%20id"}}
            ]}"#;
        let page = parse_bundle(body.as_bytes()).unwrap();
        assert!(page.history);
        assert_eq!(page.deleted, [(0, "gone".to_owned()), (1, "old".to_owned())]);
        assert_eq!(page.entries.len(), 1);
        assert_eq!(page.entries[0].id, "a");
        // A total of the wrong JSON type is no total; the entries that name no Binary skipped.
        assert_eq!(page.total, None);
        assert_eq!(page.skipped, 2);
        let searchset = br#"{"resourceType":"Bundle","type":"searchset","total":12,"entry":[
            {"request":{"method":"DELETE","url":"Binary/x"}}]}"#;
        let page = parse_bundle(searchset).unwrap();
        // Only a history Bundle reports deletions.
        assert!(!page.history && page.deleted.is_empty());
        assert_eq!((page.total, page.skipped), (Some(12), 1));
    }

    #[test]
    fn a_listing_that_is_not_a_bundle_is_an_error() {
        assert!(
            parse_bundle(br#"{"resourceType":"Binary"}"#)
                .unwrap_err()
                .to_string()
                .contains("Bundle")
        );
        assert!(parse_bundle(b"<html>").is_err());
    }

    #[test]
    fn instants_with_offsets_parse() {
        let a = parse_instant("2024-01-01T00:00:00Z").unwrap();
        let b = parse_instant("2024-01-01T02:00:00+02:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(parse_instant("yesterday"), None);
    }

    #[test]
    fn instants_round_trip_with_milliseconds() {
        let text = "2024-05-06T07:08:09.123Z";
        assert_eq!(format_instant(parse_instant(text).unwrap()), text);
    }
}
