//! What the test servers render alike: content negotiation, `_elements`/`_summary`,
//! conditional reads, instants and OperationOutcomes, as real FHIR servers do them.

use std::time::SystemTime;

use axum::http::{HeaderMap, header};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;

/// The FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";

/// A FHIR instant with milliseconds in UTC, e.g. `2026-11-27T19:07:36.123Z`.
pub const INSTANT: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// `t` as an [`INSTANT`].
pub fn instant(t: SystemTime) -> String {
    OffsetDateTime::from(t).format(INSTANT).unwrap_or_default()
}

/// An RFC 3339 instant (a FHIR instant, any precision and offset), as `_since` and
/// `_lastUpdated` carry it.
pub fn parse_instant(text: &str) -> Option<SystemTime> {
    let format = &time::format_description::well_known::Rfc3339;
    OffsetDateTime::parse(text, format).ok().map(SystemTime::from)
}

/// A searchset Bundle of `total` matches with its `self` and `next` links and no entries yet.
pub fn searchset(total: usize, self_url: &str, next: Option<&str>) -> Value {
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(next) = next {
        links.push(json!({"relation": "next", "url": next}));
    }
    json!({"resourceType": "Bundle", "type": "searchset", "total": total, "link": links})
}

/// A one-issue OperationOutcome for an answer of `status`.
pub fn outcome_json(status: u16, diagnostics: &str) -> Value {
    let code = match status {
        400 => "invalid",
        401 => "login",
        403 => "forbidden",
        404 => "not-found",
        406 => "not-supported",
        410 => "deleted",
        429 => "throttled",
        _ => "exception",
    };
    let issue = json!({"severity": "error", "code": code, "diagnostics": diagnostics});
    json!({"resourceType": "OperationOutcome", "issue": [issue]})
}

/// Whether the client asked for the FHIR JSON form, as HAPI decides it: the default when it
/// names no type (`_format` or `Accept`); used by both servers.
pub fn wants_json(headers: &HeaderMap, params: &[(String, String)]) -> bool {
    accepts_json(headers, params, false)
}

/// Whether the request accepts the FHIR JSON form: `_format=json`, no or an empty Accept, or an
/// Accept naming a JSON type (or `*/*` when `star` counts, as Microsoft's server has it).
pub fn accepts_json(headers: &HeaderMap, params: &[(String, String)], star: bool) -> bool {
    let json_type = |t: &str| matches!(t, "json" | FHIR_JSON | "application/json");
    if param(params, "_format").is_some_and(json_type) {
        return true;
    }
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    accept.trim().is_empty()
        || media_ranges(accept).any(|media| json_type(&media) || (star && media == "*/*"))
}

/// Medplum: FHIR JSON only when the Accept header starts with `application/fhir+json`.
pub fn accept_starts_with_fhir_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.trim_start().starts_with(FHIR_JSON))
}

/// The media ranges of an Accept header, lowercased, without parameters.
pub fn media_ranges(accept: &str) -> impl Iterator<Item = String> + '_ {
    accept
        .split(',')
        .filter_map(|item| item.split(';').next())
        .map(|media| media.trim().to_ascii_lowercase())
}

/// The first value of query parameter `name`.
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Whether `_elements` (without `data`) or `_summary=true|text` ask for the resource without
/// its `data`.
pub fn leaves_data_out(params: &[(String, String)]) -> bool {
    let no_data_element =
        param(params, "_elements").is_some_and(|v| !v.split(',').any(|e| e.trim() == "data"));
    no_data_element || param(params, "_summary").is_some_and(|v| matches!(v, "true" | "text"))
}

/// Whether `If-None-Match` names `etag` (weak comparison) or `*`.
pub fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    let bare = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == "*" || bare(tag) == bare(etag))
}
