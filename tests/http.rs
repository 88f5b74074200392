//! The HTTP source against the in-process loopback FHIR server.

use bytes::Bytes;
use fhirfs::SourceError;
use fhirfs::{Fetched, Source};
use fhirfs::{HttpConfig, HttpSource};
use fhirfs::{Secret, TokenSource};
use fhirfs_testserver::loopback::{Fault, LoopbackServer};
use url::Url;

fn source(server: &LoopbackServer, token: Option<&str>) -> HttpSource {
    let mut config = HttpConfig::new(Url::parse(&server.base_url()).unwrap());
    config.token = token.and_then(Secret::new).map_or(TokenSource::None, TokenSource::Static);
    config.page_size = 1000;
    HttpSource::new(config).unwrap()
}

fn content(fetched: Fetched) -> Bytes {
    match fetched {
        Fetched::Content { bytes, .. } => bytes,
        Fetched::NotModified => panic!("expected content"),
    }
}

fn json_fault(body: &'static str) -> Fault {
    Fault::Body {
        content_type: "application/fhir+json; charset=utf-8".into(),
        body: Bytes::from_static(body.as_bytes()),
    }
}

#[test]
fn the_test_server_knows_the_id_fhirfs_probes() {
    assert_eq!(fhirfs_testserver::PROBE_ID, fhirfs::PROBE_ID);
}

#[tokio::test]
async fn paging_follows_opaque_next_links_to_the_end() {
    let server = LoopbackServer::start().await.unwrap();
    server.set_page_cap(7);
    for i in 0..30 {
        server.put(&format!("id-{i:02}"), "text/plain", vec![b'x'; i]);
    }
    let listed = source(&server, None).list().await.unwrap();
    let ids: Vec<_> = listed.iter().map(|l| l.id.clone()).collect();
    assert_eq!(ids, server.ids());
    assert_eq!(server.counts().searches, 5, "30 at 7 a page");
    // `_elements` dropped `data`: sizes are not known from this listing.
    assert!(listed.iter().all(|l| l.meta.size.is_none()));
    assert!(listed.iter().all(|l| l.meta.version_id.as_deref() == Some("1")));
}

#[tokio::test]
async fn listing_entries_with_data_carry_exact_sizes() {
    let server = LoopbackServer::start().await.unwrap();
    server.set_listing_data(true);
    for (id, len) in [("a", 0), ("b", 1), ("c", 2), ("d", 3), ("e", 4097)] {
        server.put(id, "application/octet-stream", vec![7u8; len]);
    }
    let listed = source(&server, None).list().await.unwrap();
    let sizes: Vec<_> = listed.iter().map(|l| (l.id.as_str(), l.meta.size)).collect();
    // An empty Binary has no `data`: its size is unknown until it is fetched.
    let expected = [("a", None), ("b", Some(1)), ("c", Some(2)), ("d", Some(3)), ("e", Some(4097))];
    assert_eq!(sizes, expected);
}

#[tokio::test]
async fn statuses_become_typed_errors() {
    let server = LoopbackServer::start().await.unwrap();
    for (id, status) in [("u", 401), ("f", 403), ("s", 500), ("b", 400), ("t", 429)] {
        server.put(id, "text/plain", "x");
        server.set_fault(id, Some(Fault::Status(status)));
    }
    server.put("gone", "text/plain", "x");
    server.delete("gone");
    let source = source(&server, None);
    for (id, expected) in [
        ("u", SourceError::Unauthorized),
        ("f", SourceError::Forbidden),
        ("missing", SourceError::NotFound),
        ("gone", SourceError::Gone),
        ("s", SourceError::Status(500)),
        ("b", SourceError::Status(400)),
    ] {
        assert_eq!(source.fetch(id, None).await.unwrap_err(), expected, "{id}");
    }
}

#[tokio::test]
async fn bad_bodies_are_bad_body_errors() {
    let server = LoopbackServer::start().await.unwrap();
    let faults = [
        ("malformed", json_fault(r#"{"resourceType":"Binary","data":"AAA"#)),
        ("patient", json_fault(r#"{"resourceType":"Patient","id":"patient"}"#)),
        ("base64", json_fault(r#"{"resourceType":"Binary","data":"not*base64"}"#)),
        ("array", json_fault("[1,2,3]")),
    ];
    for (id, fault) in faults {
        server.put(id, "text/plain", "x");
        server.set_fault(id, Some(fault));
    }
    let source = source(&server, None);
    for id in ["malformed", "patient", "base64", "array"] {
        let err = source.fetch(id, None).await.unwrap_err();
        assert!(matches!(err, SourceError::BadBody(_)), "{id}: {err:?}");
    }
}

#[tokio::test]
async fn json_and_raw_responses_give_the_same_bytes() {
    let server = LoopbackServer::start().await.unwrap();
    let bytes: Vec<u8> = (0..=255).cycle().take(70_000).collect();
    server.put("json", "application/pdf", bytes.clone());
    server.put("raw", "application/pdf", bytes.clone());
    server.set_fault("raw", Some(Fault::Raw));
    let source = source(&server, None);
    for id in ["json", "raw"] {
        let Fetched::Content { meta, bytes: got } = source.fetch(id, None).await.unwrap() else {
            panic!("{id}: expected content");
        };
        assert_eq!(got, bytes, "{id}");
        assert_eq!(meta.content_type.as_deref(), Some("application/pdf"), "{id}");
        assert_eq!(meta.version_id.as_deref(), Some("1"), "{id}: from meta or ETag");
        let stored = server.stored(id).unwrap().last_updated;
        let got = meta.last_updated.unwrap();
        if id == "json" {
            assert_eq!(got, stored, "meta.lastUpdated, to the millisecond");
        } else {
            // Last-Modified has whole seconds.
            let secs = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
            };
            assert_eq!(secs(got), secs(stored), "Last-Modified");
        }
    }
}

#[tokio::test]
async fn a_known_version_is_not_downloaded_again() {
    let server = LoopbackServer::start().await.unwrap();
    server.put("a", "text/plain", "v1");
    let source = source(&server, None);
    assert_eq!(content(source.fetch("a", None).await.unwrap()), "v1");
    assert_eq!(source.fetch("a", Some("1")).await.unwrap(), Fetched::NotModified);
    assert_eq!(server.counts().not_modified, 1);
    server.put("a", "text/plain", "v2");
    assert_eq!(content(source.fetch("a", Some("1")).await.unwrap()), "v2");
}

#[tokio::test]
async fn a_server_that_refuses_search_answers_a_status() {
    let server = LoopbackServer::start().await.unwrap();
    server.set_search_status(Some(400));
    server.put("a", "text/plain", "x");
    let source = source(&server, None);
    assert_eq!(source.list().await.unwrap_err(), SourceError::Status(400));
    assert_eq!(content(source.fetch("a", None).await.unwrap()), "x");
}

#[tokio::test]
async fn the_token_is_sent_as_bearer() {
    let server = LoopbackServer::start().await.unwrap();
    server.set_token(Some("secret-1"));
    server.put("a", "text/plain", "x");
    assert_eq!(content(source(&server, Some("secret-1")).fetch("a", None).await.unwrap()), "x");
    let err = source(&server, Some("other")).fetch("a", None).await.unwrap_err();
    assert_eq!(err, SourceError::Unauthorized);
    assert_eq!(source(&server, None).list().await.unwrap_err(), SourceError::Unauthorized);
}

#[tokio::test]
async fn an_unreachable_server_is_a_transport_error_without_secrets() {
    let mut config = HttpConfig::new(Url::parse("http://127.0.0.1:1/fhir").unwrap());
    config.token = TokenSource::Static(Secret::new("tok-do-not-leak").unwrap());
    config.timeout = std::time::Duration::from_secs(2);
    let source = HttpSource::new(config).unwrap();
    let err = source.fetch("a", None).await.unwrap_err();
    assert!(matches!(err, SourceError::Transport(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("tok-do-not-leak"));
}

/// Lists (learning content types, as the mount does), then fetches every `doc{i}`.
async fn list_then_fetch_all(source: &HttpSource, docs: &[Vec<u8>]) {
    source.list().await.unwrap();
    for (i, doc) in docs.iter().enumerate() {
        assert_eq!(content(source.fetch(&format!("doc{i}"), None).await.unwrap()), *doc);
    }
}

fn source_with(server: &LoopbackServer, mode: fhirfs::FetchMode) -> HttpSource {
    let mut config = HttpConfig::new(Url::parse(&server.base_url()).unwrap());
    config.fetch = mode;
    HttpSource::new(config).unwrap()
}

async fn seed_pdfs(server: &LoopbackServer) -> Vec<Vec<u8>> {
    (0..4)
        .map(|i| {
            let bytes: Vec<u8> = (0..5000u32).map(|b| (b * 7 + i) as u8).collect();
            server.put(&format!("doc{i}"), "application/pdf", bytes.clone());
            bytes
        })
        .collect()
}

#[tokio::test]
async fn auto_mode_switches_to_raw_once_the_server_serves_native_bytes() {
    use fhirfs::FetchMode;
    let server = LoopbackServer::start().await.unwrap();
    let docs = seed_pdfs(&server).await;
    list_then_fetch_all(&source_with(&server, FetchMode::Auto), &docs).await;
    let counts = server.counts();
    assert_eq!((counts.raw_reads, counts.json_reads), (4, 0), "{counts:?}");
}

#[tokio::test]
async fn auto_mode_stays_on_json_for_a_server_that_refuses_raw() {
    use fhirfs::FetchMode;
    use fhirfs_testserver::loopback::Quirks;
    let server = LoopbackServer::start().await.unwrap();
    server.set_quirks(Quirks::Microsoft);
    server.set_throttle(None);
    let docs = seed_pdfs(&server).await;
    list_then_fetch_all(&source_with(&server, FetchMode::Auto), &docs).await;
    let counts = server.counts();
    assert_eq!(counts.statuses.get(&406).copied(), Some(1), "one probe, then JSON: {counts:?}");
    assert_eq!(counts.json_reads, 4);
}

#[tokio::test]
async fn json_and_raw_modes_ask_for_what_they_say() {
    use fhirfs::FetchMode;
    for (mode, raw, json) in [(FetchMode::Json, 0, 4), (FetchMode::Raw, 4, 0)] {
        let server = LoopbackServer::start().await.unwrap();
        let docs = seed_pdfs(&server).await;
        // Without a listing first: raw mode asks with */*.
        let source = source_with(&server, mode);
        for (i, doc) in docs.iter().enumerate() {
            assert_eq!(content(source.fetch(&format!("doc{i}"), None).await.unwrap()), *doc);
        }
        let counts = server.counts();
        assert_eq!((counts.raw_reads, counts.json_reads), (raw, json), "{mode:?}: {counts:?}");
    }
}
