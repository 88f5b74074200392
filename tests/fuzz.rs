//! Property-based fuzzing of the parsers: the Binary JSON decoder, the Bundle/paging parser, the
//! DocumentReference/DiagnosticReport page parser and the name → id mapping. Each target runs a
//! few thousand cases in `cargo test`; for a long run set `FHIRFS_FUZZ_SECONDS` (e.g. 600) and
//! pick a target:
//!
//! ```sh
//! FHIRFS_FUZZ_SECONDS=600 cargo test --release --test fuzz binary_decoder -- --nocapture
//! ```

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use fhirfs::JsonBinaryDecoder;
use fhirfs::{FhirError, decode_binary, decoded_len, parse_bundle, parse_document_page};
use fhirfs::{id_from_name, is_valid_id};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Runs `test` on values of `strategy`: one round by default, rounds until the time is up when
/// `FHIRFS_FUZZ_SECONDS` is set. Each round is seeded afresh.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let seconds: u64 =
        std::env::var("FHIRFS_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    // Enough for `cargo test` to catch regressions quickly; long runs go by the clock.
    let round: u32 = if seconds > 0 { 5_000 } else { 400 };
    let mut cases = 0u64;
    loop {
        let config = Config { cases: round, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new(config);
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        cases += u64::from(round);
        if Instant::now() >= deadline {
            break;
        }
    }
    if seconds > 0 {
        println!("{name}: {cases} cases in {seconds} s, no failure");
    }
}

fn b64(bytes: &[u8]) -> String {
    base64_simd::STANDARD.encode_to_string(bytes)
}

/// A JSON string literal of `text`, optionally with `/` escaped the way some servers do.
fn json_string(text: &str, escape_slashes: bool) -> String {
    let quoted = serde_json::to_string(text).unwrap();
    if escape_slashes { quoted.replace('/', "\\/") } else { quoted }
}

/// Random edits of a valid document: truncation, byte flips and insertions.
fn mutate(doc: Vec<u8>, edits: Vec<(usize, u8, u8)>) -> Vec<u8> {
    let mut doc = doc;
    for (at, kind, byte) in edits {
        if doc.is_empty() {
            break;
        }
        let at = at % doc.len();
        match kind % 3 {
            0 => doc.truncate(at),
            1 => doc[at] = byte,
            _ => doc.insert(at, byte),
        }
    }
    doc
}

#[test]
fn binary_decoder_round_trips_any_content() {
    let strategy = (proptest::collection::vec(any::<u8>(), 0..3000), any::<bool>(), any::<bool>());
    fuzz("binary_decoder_round_trips", strategy, |(bytes, escape, wrap)| {
        let mut data = b64(&bytes);
        if wrap {
            // Line-wrapped base64 (76 columns, as MIME does) must decode the same.
            data = data
                .as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n");
        }
        let body = format!(
            r#"{{"resourceType":"Binary","id":"x","contentType":"application/octet-stream","data":{}}}"#,
            json_string(&data, escape)
        );
        let binary = decode_binary(body.as_bytes().to_vec())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(binary.data.as_deref(), Some(&bytes[..]));
        prop_assert_eq!(decoded_len(&data), bytes.len() as u64);
        Ok(())
    });
}

/// `body` fed to the streaming decoder in chunks cut at `cuts` (positions, any order).
fn decode_streamed(body: &[u8], cuts: &[usize]) -> Result<fhirfs::Binary, FhirError> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    at.extend([0, body.len()]);
    at.sort_unstable();
    let mut decoder = JsonBinaryDecoder::new(body.len());
    for pair in at.windows(2) {
        decoder.push(&body[pair[0]..pair[1]]);
    }
    decoder.finish()
}

#[test]
fn streaming_decoder_reads_every_body_as_the_whole_body_decoder_does() {
    // Valid bodies in several spellings (escaped slashes, `\n` line breaks, spaces, data
    // before or after other elements), then mangled, cut into random chunks: the streaming
    // decoder must give the same Binary, or an error exactly when the other does.
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..400),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..4),
        proptest::collection::vec(any::<usize>(), 0..12),
    );
    fuzz("streaming_decoder", strategy, |(bytes, (escape, wrap, first), edits, cuts)| {
        let mut data = b64(&bytes);
        if wrap {
            data = data
                .as_bytes()
                .chunks(60)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n");
        }
        let data = json_string(&data, escape);
        let others = r#""resourceType":"Binary","id":"x","meta":{"versionId":"1","tag":[{"code":"data"}]},"contentType":"application/pdf""#;
        let body = if first {
            format!(r#"{{ "data" : {data}, {others}}}"#)
        } else {
            format!(r#"{{{others},"data":{data}}}"#)
        };
        let body = mutate(body.into_bytes(), edits);
        let whole = decode_binary(body.clone()).ok();
        let streamed = decode_streamed(&body, &cuts).ok();
        prop_assert_eq!(streamed, whole, "{}", String::from_utf8_lossy(&body));
        Ok(())
    });
}

#[test]
fn binary_decoder_never_panics_on_mangled_bodies() {
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..6),
    );
    fuzz("binary_decoder_mangled", strategy, |(bytes, edits)| {
        let body = format!(
            r#"{{"resourceType":"Binary","meta":{{"versionId":"1","lastUpdated":"2024-01-02T03:04:05.678+01:00"}},"securityContext":{{"reference":"Patient/1"}},"data":"{}"}}"#,
            b64(&bytes)
        );
        let mangled = mutate(body.into_bytes(), edits);
        // Any answer is fine; a panic is not. A success must carry decodable data.
        if let Ok(binary) = decode_binary(mangled.clone())
            && let Some(data) = binary.data
        {
            prop_assert_eq!(binary.meta.size, Some(data.len() as u64));
        }
        Ok(())
    });
}

#[test]
fn binary_decoder_never_panics_on_arbitrary_bytes() {
    fuzz("binary_decoder_bytes", proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
        let _ = decode_binary(bytes.clone());
        Ok(())
    });
}

fn entry_strategy() -> impl Strategy<Value = (String, String, Option<Vec<u8>>)> {
    (
        prop_oneof!["[A-Za-z0-9.-]{1,64}", ".{0,70}"],
        prop_oneof![Just("Binary".to_owned()), Just("Patient".to_owned()), ".{0,10}"],
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100)),
    )
}

#[test]
fn bundle_parser_keeps_only_valid_binary_ids_and_exact_sizes() {
    let strategy = (
        proptest::collection::vec(entry_strategy(), 0..20),
        proptest::option::of(".{0,80}"),
        proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
    );
    fuzz("bundle_parser", strategy, |(entries, next, edits)| {
        let entry_json: Vec<serde_json::Value> = entries
            .iter()
            .map(|(id, kind, data)| {
                let mut resource = serde_json::json!({"resourceType": kind, "id": id});
                if let Some(data) = data {
                    resource["data"] = serde_json::Value::String(b64(data));
                }
                serde_json::json!({"resource": resource})
            })
            .collect();
        let mut links = vec![serde_json::json!({"relation": "self", "url": "s"})];
        if let Some(next) = &next {
            links.push(serde_json::json!({"relation": "next", "url": next}));
        }
        let bundle =
            serde_json::json!({"resourceType": "Bundle", "link": links, "entry": entry_json});
        let text = bundle.to_string().into_bytes();
        let page = parse_bundle(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(page.next.as_ref(), next.as_ref());
        let expected: Vec<_> =
            entries.iter().filter(|(id, kind, _)| kind == "Binary" && is_valid_id(id)).collect();
        prop_assert_eq!(page.entries.len(), expected.len());
        prop_assert_eq!(page.skipped, entries.len() - expected.len());
        for (listed, (id, _, data)) in page.entries.iter().zip(expected) {
            prop_assert_eq!(&listed.id, id);
            prop_assert_eq!(listed.meta.size, data.as_ref().map(|d| d.len() as u64));
        }
        // Mangled pages: any answer but a panic, and never an invalid id.
        if let Ok(page) = parse_bundle(&mutate(text, edits)) {
            prop_assert!(page.entries.iter().all(|e| is_valid_id(&e.id)));
        }
        Ok(())
    });
}

/// An entry that a listing cannot use: `id` of the wrong JSON type, a `resource` that is not
/// an object, no `resource`, meta of the wrong shape, or a non-Binary.
fn bad_entry_strategy() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        any::<i64>().prop_map(|n| json!({"resource": {"resourceType": "Binary", "id": n}})),
        any::<bool>().prop_map(|b| json!({"resource": {"resourceType": "Binary", "id": b}})),
        ".{0,20}".prop_map(|t| json!({"resource": t})),
        Just(json!({"search": {"mode": "outcome"}})),
        Just(json!({"resource": {"resourceType": "Binary", "id": ["a"]}})),
        "[a-z]{1,8}"
            .prop_map(|id| json!({"resource": {"resourceType": "Binary", "id": id, "meta": 7}})),
        "[a-z]{1,8}"
            .prop_map(|id| json!({"resource": {"resourceType": "Binary", "id": id, "data": 5}})),
        "[a-z]{1,8}"
            .prop_map(|id| json!({"resource": {"resourceType": "OperationOutcome", "id": id}})),
        Just(json!(null)),
        Just(json!(42)),
    ]
}

#[test]
fn a_page_keeps_every_good_entry_among_bad_ones() {
    let strategy = (
        proptest::collection::vec("[A-Za-z0-9.-]{1,64}", 0..12),
        proptest::collection::vec(bad_entry_strategy(), 0..12),
        proptest::collection::vec(any::<u16>(), 0..24),
    );
    fuzz("page_with_bad_entries", strategy, |(good, bad, order)| {
        let good: Vec<String> = good.into_iter().filter(|id| is_valid_id(id)).collect();
        let mut entries: Vec<(bool, serde_json::Value)> = good
            .iter()
            .map(|id| (true, serde_json::json!({"resource": {"resourceType": "Binary", "id": id}})))
            .chain(bad.iter().cloned().map(|entry| (false, entry)))
            .collect();
        // Shuffle by the random keys, so bad entries fall anywhere among the good ones.
        let mut keyed: Vec<_> = entries.drain(..).enumerate().collect();
        keyed.sort_by_key(|(i, _)| order.get(*i).copied().unwrap_or(u16::MAX));
        let entries: Vec<_> = keyed.into_iter().map(|(_, e)| e).collect();
        let json: Vec<_> = entries.iter().map(|(_, e)| e.clone()).collect();
        let bundle = serde_json::json!({"resourceType": "Bundle", "entry": json});
        let page = parse_bundle(bundle.to_string().as_bytes())
            .map_err(|e| TestCaseError::fail(format!("a page with bad entries failed: {e}")))?;
        let wanted: Vec<&String> = entries
            .iter()
            .filter(|(good, _)| *good)
            .map(|(_, e)| e["resource"]["id"].as_str().unwrap())
            .map(|id| good.iter().find(|g| g.as_str() == id).unwrap())
            .collect();
        let got: Vec<&String> = page.entries.iter().map(|e| &e.id).collect();
        prop_assert_eq!(got, wanted, "every good entry, in order");
        prop_assert_eq!(page.skipped, bad.len(), "every bad entry counted");
        Ok(())
    });
}

#[test]
fn name_mapping_only_lets_fhir_ids_through() {
    let names = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        "[A-Za-z0-9.-]{0,66}".prop_map(String::into_bytes),
        "[A-Za-z0-9./_ %-]{0,66}".prop_map(String::into_bytes),
    ];
    fuzz("name_mapping", names, |bytes| {
        let name = OsStr::from_bytes(&bytes);
        match id_from_name(name) {
            Some(id) => {
                prop_assert!((1..=64).contains(&id.len()));
                prop_assert!(id != "." && id != "..");
                prop_assert!(
                    id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                );
                prop_assert_eq!(id.as_bytes(), &bytes[..]);
            }
            None => {
                let valid = (1..=64).contains(&bytes.len())
                    && bytes != b"."
                    && bytes != b".."
                    && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.');
                prop_assert!(!valid, "{:?} is an id", name);
            }
        }
        Ok(())
    });
}

/// A document entry of a search page: a DocumentReference or DiagnosticReport with a valid
/// id and elements of any JSON type, or an entry the view cannot use.
fn document_entry_strategy() -> impl Strategy<Value = (Option<String>, serde_json::Value)> {
    use serde_json::json;
    let any_json = prop_oneof![
        Just(json!(null)),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(|t| json!(t)),
        Just(json!([1, "a"])),
        Just(json!({"text": "x", "coding": [{"code": 5}]})),
    ];
    let good = (
        "[A-Za-z0-9.-]{1,64}",
        prop_oneof![Just("DocumentReference"), Just("DiagnosticReport")],
        proptest::collection::vec(any_json.clone(), 6),
    )
        .prop_filter("a valid id", |(id, _, _)| is_valid_id(id))
        .prop_map(|(id, kind, v)| {
            let resource = json!({"resourceType": kind, "id": id, "meta": v[0], "date": v[1],
                "subject": v[2], "type": v[3], "description": v[4],
                "content": [{"attachment": {"url": v[5], "size": v[0], "hash": v[1]}}, v[2]],
                "presentedForm": [v[5], {"data": v[4], "title": v[3]}]});
            (Some(id), json!({"resource": resource, "search": {"mode": "match"}}))
        });
    let bad = prop_oneof![
        any::<i64>()
            .prop_map(|n| json!({"resource": {"resourceType": "DocumentReference", "id": n}})),
        ".{0,20}".prop_map(|t| json!({"resource": t})),
        "[a-z]{1,8}".prop_map(|id| json!({"resource": {"resourceType": "Patient", "id": id}})),
        Just(json!({"resource": {"resourceType": "DiagnosticReport", "id": "../x"}})),
        Just(json!(null)),
    ];
    prop_oneof![3 => good, 1 => bad.prop_map(|entry| (None, entry))]
}

#[test]
fn document_page_parser_keeps_every_document_among_bad_entries() {
    let strategy = (
        proptest::collection::vec(document_entry_strategy(), 0..16),
        0..3usize,
        proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
    );
    fuzz("document_page_parser", strategy, |(entries, outcomes, edits)| {
        let mut json: Vec<serde_json::Value> = entries.iter().map(|(_, e)| e.clone()).collect();
        for _ in 0..outcomes {
            json.push(serde_json::json!({"resource": {"resourceType": "OperationOutcome"},
                "search": {"mode": "outcome"}}));
        }
        let bundle = serde_json::json!({"resourceType": "Bundle", "entry": json});
        let text = bundle.to_string().into_bytes();
        let page = parse_document_page(&text)
            .map_err(|e| TestCaseError::fail(format!("a page with bad entries failed: {e}")))?;
        let wanted: Vec<&String> = entries.iter().filter_map(|(id, _)| id.as_ref()).collect();
        let got: Vec<&String> = page.documents.iter().map(|d| &d.id).collect();
        prop_assert_eq!(got, wanted, "every document, in order");
        prop_assert_eq!(page.skipped, entries.iter().filter(|(id, _)| id.is_none()).count());
        prop_assert_eq!(page.outcomes, outcomes);
        // Mangled pages: any answer but a panic, and never an invalid id.
        if let Ok(page) = parse_document_page(&mutate(text, edits)) {
            prop_assert!(page.documents.iter().all(|d| is_valid_id(&d.id)));
        }
        Ok(())
    });
}
