//! Real mounts over the loopback server imitating real servers (Medplum, HAPI, Microsoft, and
//! JSON with escaped slashes): with default options, every Binary is listed where the server
//! can list, and each file has the stored size before any read, the stored bytes, and the
//! stored lastUpdated as mtime.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{Mount, Server};
use fhirfs_testserver::loopback::Quirks;
use fhirfs_testserver::noise;

/// One Binary to store and check.
struct Sample {
    id: String,
    content_type: &'static str,
    bytes: Vec<u8>,
}

fn with_header(header: &[u8], len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = header.to_vec();
    bytes.extend(noise(len, seed));
    bytes
}

/// About thirty Binaries: sizes around zero, the page size and base64's 3-byte groups, large
/// ones, text, and the headers of common file types.
fn samples() -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut add = |id: &str, content_type: &'static str, bytes: Vec<u8>| {
        samples.push(Sample { id: id.to_owned(), content_type, bytes });
    };
    let octets = "application/octet-stream";
    for len in [0, 1, 2, 3, 4095, 4096, 4097, 64 << 10, 1 << 20, (1 << 20) + 1] {
        add(&format!("size-{len}"), octets, noise(len, len as u64 + 1));
    }
    add("random-a", octets, noise(12_345, 11));
    add("random-b", octets, noise(777, 12));
    add("random-c", octets, noise(100_000, 13));
    // Base64 of 0xff.. is all `/`, of 0xfb 0xef 0xbe all `+`: the characters that escaping
    // and URL-safe alphabets get wrong.
    add("slashes", octets, vec![0xff; 3000]);
    add("pluses", octets, [0xfb, 0xef, 0xbe].repeat(1000));
    add("text-plain", "text/plain", b"Hello, FHIR!\n".to_vec());
    add("text-utf8", "text/plain; charset=utf-8", "Grüße, 世界 ✓\n".as_bytes().to_vec());
    add("text-csv", "text/csv", b"a,b\n1,2\n3,4\n".to_vec());
    add("text-html", "text/html", b"<!DOCTYPE html><p>not a page</p>".to_vec());
    add("json-doc", "application/json", br#"{"resourceType":"Binary","data":"aGk="}"#.to_vec());
    // Content that is itself base64 text is base64 twice on the wire: decode once only.
    add("base64-text", "text/plain", b"SGVsbG8sIFdvcmxkIQ==".to_vec());
    add(
        "report.v1.pdf",
        "application/pdf",
        with_header(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", 20_000, 21),
    );
    add("scan-png", "image/png", with_header(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", 30_000, 22));
    add("anim-gif", "image/gif", with_header(b"GIF89a\x01\0\x01\0", 500, 23));
    let mut dicom = vec![0u8; 128];
    dicom.extend_from_slice(b"DICM");
    dicom.extend(noise(9_000, 24));
    add("ct-slice-dcm", "application/dicom", dicom);
    add("zip-ish", "application/zip", with_header(b"PK\x03\x04", 2_048, 25));
    add("A-Mixed.Case-42", octets, noise(64, 26));
    add(&"x".repeat(64), octets, noise(65, 27));
    samples
}

/// Stores `samples`; with `raw_every_other`, every other one is created raw (`put_raw`).
fn store(server: &Server, samples: &[Sample], raw_every_other: bool) {
    for (i, s) in samples.iter().enumerate() {
        if raw_every_other && i % 2 == 1 {
            server.server.put_raw(&s.id, s.content_type, s.bytes.clone());
        } else {
            server.server.put(&s.id, s.content_type, s.bytes.clone());
        }
    }
}

/// The names in the mount's folder, sorted.
fn listing(mount: &Mount) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&mount.mountpoint)
        .expect("list the folder")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Every sample's size (by `stat`, before reading), mtime and bytes.
fn check_files(server: &Server, mount: &Mount, samples: &[Sample]) {
    for sample in samples {
        let id = &sample.id;
        let stored = server.server.stored(id).expect("stored");
        let meta = std::fs::metadata(mount.path(id))
            .unwrap_or_else(|e| panic!("stat {id}: {e}\n{}", mount.log()));
        assert_eq!(meta.len(), sample.bytes.len() as u64, "stat size of {id} before reading");
        assert_eq!(
            meta.modified().unwrap(),
            stored.last_updated,
            "mtime of {id} is its lastUpdated (to the millisecond)"
        );
        assert_eq!(meta.mode() & 0o777, 0o444, "mode of {id}");
        let bytes = std::fs::read(mount.path(id))
            .unwrap_or_else(|e| panic!("read {id}: {e}\n{}", mount.log()));
        assert!(bytes == sample.bytes, "bytes of {id} differ");
    }
}

fn sorted_ids(samples: &[Sample]) -> Vec<String> {
    let mut ids: Vec<String> = samples.iter().map(|s| s.id.clone()).collect();
    ids.sort();
    ids
}

/// Mounts the server with default options and checks that the folder lists every sample.
fn mount_and_check_listing(server: &Server, samples: &[Sample]) -> Mount {
    let mount = Mount::new(&server.base_url());
    assert_eq!(listing(&mount), sorted_ids(samples));
    mount
}

#[test]
fn standard_server_serves_every_sample() {
    let server = Server::start();
    let samples = samples();
    store(&server, &samples, false);
    let mount = mount_and_check_listing(&server, &samples);
    check_files(&server, &mount, &samples);
}

#[test]
fn medplum_without_search_serves_every_sample_by_lookup() {
    let server = Server::start();
    server.server.set_quirks(Quirks::Medplum);
    let samples = samples();
    store(&server, &samples, true);
    let mount = Mount::new(&server.base_url());
    // Every search on Binary is 400: the folder is empty, but each id can be opened.
    assert_eq!(listing(&mount), Vec::<String>::new());
    // Medplum keeps no file for a Binary created as JSON without `data` (`size-0` is stored
    // so): its raw read is a 500, which cannot be told from a storage failure.
    let (empty, samples): (Vec<_>, Vec<_>) = samples.into_iter().partition(|s| s.id == "size-0");
    let err = std::fs::read(mount.path(&empty[0].id)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    check_files(&server, &mount, &samples);
    let counts = server.server.counts();
    assert!(
        counts.raw_reads >= samples.len() as u64 / 2,
        "raw-created Binaries need a raw read: {counts:?}"
    );
}

#[test]
fn hapi_pages_through_base_links_and_serves_every_sample() {
    let server = Server::start();
    server.server.set_quirks(Quirks::Hapi);
    // A small cap makes HAPI's `[base]?_getpages=...` next links carry the listing.
    server.server.set_page_cap(7);
    let samples = samples();
    store(&server, &samples, false);
    let mount = mount_and_check_listing(&server, &samples);
    let pages = samples.len().div_ceil(7) as u64;
    assert_eq!(server.server.counts().searches, pages, "one search per page");
    check_files(&server, &mount, &samples);
}

#[test]
fn microsoft_json_only_with_small_pages_serves_every_sample() {
    let server = Server::start();
    server.server.set_quirks(Quirks::Microsoft);
    // Without the throttling (see the next test): the other habits on their own.
    server.server.set_throttle(None);
    let samples = samples();
    store(&server, &samples, false);
    let mount = mount_and_check_listing(&server, &samples);
    assert_eq!(
        server.server.counts().searches,
        samples.len().div_ceil(10) as u64,
        "pages of 10 whatever _count asks"
    );
    check_files(&server, &mount, &samples);
    // `--fetch auto` probes raw once and Microsoft refuses it with 406: JSON from then on.
    // Beside that, only a JSON without `data` (the empty Binary) is worth a raw request;
    // Microsoft refuses it too and the file stays empty.
    let empty = samples.iter().filter(|s| s.bytes.is_empty()).count() as u64;
    let refused = server.server.counts().statuses.get(&406).copied();
    assert!(
        refused.unwrap_or(0) <= empty + 1,
        "non-FHIR requests beyond one probe and the empty Binary: {refused:?}"
    );
}

#[test]
fn microsoft_with_throttling_serves_every_sample() {
    let server = Server::start();
    server.server.set_quirks(Quirks::Microsoft);
    let samples = samples();
    store(&server, &samples, false);
    let mount = mount_and_check_listing(&server, &samples);
    check_files(&server, &mount, &samples);
    assert!(server.server.counts().statuses.contains_key(&429));
}

#[test]
fn escaped_slashes_in_reads_decode_the_same() {
    let server = Server::start();
    server.server.set_escaped_slashes(true);
    let samples = samples();
    store(&server, &samples, false);
    let mount = mount_and_check_listing(&server, &samples);
    check_files(&server, &mount, &samples);
}

#[test]
fn escaped_slashes_in_listing_data_give_exact_sizes() {
    let server = Server::start();
    server.server.set_escaped_slashes(true);
    server.server.set_listing_data(true);
    let samples = samples();
    store(&server, &samples, false);
    let mount = mount_and_check_listing(&server, &samples);
    let reads = server.server.counts().reads;
    for sample in samples.iter().filter(|s| !s.bytes.is_empty()) {
        let len = std::fs::metadata(mount.path(&sample.id)).unwrap().len();
        assert_eq!(len, sample.bytes.len() as u64, "listed size of {}", sample.id);
    }
    assert_eq!(server.server.counts().reads, reads, "sizes came from the listing's `data`");
    check_files(&server, &mount, &samples);
}

/// A name no listing described is read raw (streamed), with a `_summary=true` read beside it
/// for what the raw headers lack: `Last-Modified` has whole seconds, HAPI's raw answers none.
#[test]
fn a_file_no_listing_named_is_read_raw_with_its_millisecond_time() {
    for quirks in [Quirks::Standard, Quirks::Hapi] {
        let server = Server::start();
        server.server.set_quirks(quirks);
        server.server.set_search_status(Some(400));
        let bytes = noise(3 << 20, 40);
        server.server.put("scan", "application/dicom", bytes.clone());
        let mount = Mount::new(&server.base_url());
        let path = mount.path("scan");
        let meta = std::fs::metadata(&path).unwrap();
        let stored = server.server.stored("scan").unwrap();
        assert_eq!(meta.len(), bytes.len() as u64, "{quirks:?}");
        assert_eq!(meta.modified().unwrap(), stored.last_updated, "{quirks:?}: to the millisecond");
        assert!(std::fs::read(&path).unwrap() == bytes, "{quirks:?}: bytes differ");
        let mime = xattr::get(&path, "user.mime_type").unwrap();
        assert_eq!(mime.as_deref(), Some(&b"application/dicom"[..]), "{quirks:?}");
        let counts = server.server.counts();
        let reads = (counts.raw_reads, counts.json_reads, counts.summary_reads);
        assert_eq!(reads, (1, 0, 1), "{quirks:?}: (raw, json, summary) reads");
    }
}

/// A raw answer of `application/json` that looks like a Binary resource may be the resource or a
/// JSON Binary's own bytes: the resource is asked for, and says which. A server that answers
/// `*/*` with FHIR JSON (Microsoft) has sent the resource already: it is used as it is.
#[test]
fn a_json_binary_that_looks_like_a_resource_is_read_as_fhir_json() {
    for quirks in [Quirks::Standard, Quirks::Microsoft] {
        let server = Server::start();
        server.server.set_quirks(quirks);
        server.server.set_throttle(None);
        server.server.set_search_status(Some(400));
        let lookalike = br#"{"resourceType":"Binary","contentType":"text/plain","data":"AAAA"}"#;
        server.server.put("config", "application/json", &lookalike[..]);
        let mount = Mount::new(&server.base_url());
        assert_eq!(std::fs::read(mount.path("config")).unwrap(), lookalike, "{quirks:?}");
        let counts = server.server.counts();
        let reads = (counts.raw_reads, counts.json_reads, counts.summary_reads);
        let raw_first = u64::from(quirks == Quirks::Standard);
        assert_eq!(reads, (raw_first, 1, 0), "{quirks:?}: (raw, json, summary) reads");
    }
}

/// Any other JSON in a raw answer is the Binary's own bytes: one raw read (Medplum keeps raw
/// uploads outside the resource, so the FHIR JSON would not even have them) and a summary.
#[test]
fn a_raw_json_binary_on_medplum_is_read_once() {
    let server = Server::start();
    server.server.set_quirks(Quirks::Medplum);
    let config = br#"{"retries": 3, "hosts": ["a", "b"]}"#;
    server.server.put_raw("config", "application/json", &config[..]);
    let mount = Mount::new(&server.base_url());
    assert_eq!(std::fs::read(mount.path("config")).unwrap(), config);
    let meta = std::fs::metadata(mount.path("config")).unwrap();
    assert_eq!(meta.modified().unwrap(), server.server.stored("config").unwrap().last_updated);
    let counts = server.server.counts();
    assert_eq!((counts.raw_reads, counts.json_reads, counts.summary_reads), (1, 0, 1));
}

/// Medplum answers the raw read of a Binary created as JSON without `data` with 500 ("File not
/// found"): EIO in every mode, never an empty file. A raw upload of no bytes is empty.
#[test]
fn medplum_empty_binaries_created_as_json_are_eio_in_every_mode() {
    let server = Server::start();
    server.server.set_quirks(Quirks::Medplum);
    server.server.put("made-json", "text/plain", "");
    server.server.put_raw("made-raw", "text/plain", "");
    // GETs of the stat and the read together: one 500 each, after a JSON read in `json` mode.
    for (mode, gets) in [("auto", 2), ("json", 4), ("raw", 2)] {
        let before = server.reads_of("made-json");
        let mount = Mount::builder().args(&["--fetch", mode]).mount(&server.base_url());
        let path = mount.path("made-json");
        let stat = std::fs::metadata(&path).map(|m| m.len()).map_err(common::errno);
        assert_eq!(stat, Err(libc::EIO), "{mode}: stat\n{}", mount.log());
        let read = std::fs::read(&path).map_err(common::errno);
        assert_eq!(read, Err(libc::EIO), "{mode}: read");
        assert_eq!(server.reads_of("made-json") - before, gets, "{mode}: the failure was kept");
        assert_eq!(std::fs::metadata(mount.path("made-raw")).unwrap().len(), 0, "{mode}");
        assert_eq!(std::fs::read(mount.path("made-raw")).unwrap(), b"", "{mode}");
    }
}

/// A raw upload typed FHIR JSON comes back from Medplum's raw read with that type, and holds
/// a Binary resource of its own. It is served as stored, not as that inner Binary's `data`;
/// so is a Binary created as JSON with such content, on a server that serves it raw or only
/// as FHIR JSON. The reads it takes: a raw answer that is not surely the resource costs a
/// JSON read, and Medplum's JSON without `data` a raw read after it; Microsoft's answer is
/// the resource (its id and the ETag's version), used as it is.
#[test]
fn a_binary_typed_fhir_json_is_served_as_stored() {
    let inner = br#"{"resourceType":"Binary","contentType":"text/plain","data":"aGVsbG8="}"#;
    let kind = "application/fhir+json; charset=utf-8";
    // GETs of the file with `--fetch auto` and with `--fetch json`.
    let cases =
        [(Quirks::Medplum, [3, 2]), (Quirks::Standard, [2, 1]), (Quirks::Microsoft, [1, 1])];
    for (quirks, gets) in cases {
        let server = Server::start();
        server.server.set_quirks(quirks);
        server.server.set_throttle(None);
        server.server.set_search_status(Some(400));
        if quirks == Quirks::Medplum {
            server.server.put_raw("nested", kind, &inner[..]);
        } else {
            server.server.put("nested", kind, &inner[..]);
        }
        for (mode, gets) in ["auto", "json"].into_iter().zip(gets) {
            let before = server.reads_of("nested");
            let mount = Mount::builder().args(&["--fetch", mode]).mount(&server.base_url());
            let what = format!("{quirks:?}, --fetch {mode}");
            let len = std::fs::metadata(mount.path("nested")).unwrap().len();
            assert_eq!(len, inner.len() as u64, "{what}: stat\n{}", mount.log());
            let bytes = std::fs::read(mount.path("nested")).unwrap();
            assert_eq!(String::from_utf8_lossy(&bytes), String::from_utf8_lossy(inner), "{what}");
            assert_eq!(server.reads_of("nested") - before, gets, "{what}: GETs");
        }
    }
}

/// A name the server does not know costs one request, not a summary beside it.
#[test]
fn a_missing_name_costs_one_request() {
    let server = Server::start();
    server.server.set_search_status(Some(400));
    let mount = Mount::new(&server.base_url());
    let err = std::fs::metadata(mount.path("no-such-id")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    let counts = server.server.counts();
    assert_eq!((counts.reads, counts.summary_reads), (1, 0), "{counts:?}");
}

/// A server that ignores `_summary` sends `data` anyway: asked once, then not again, whether
/// the Binary fits the summary's 64 KiB (and its `data` is read) or not (and the read stops).
#[test]
fn a_server_that_ignores_summary_is_asked_once() {
    for size in [20_000, 70_000] {
        let server = Server::start();
        server.server.set_search_status(Some(400));
        server.server.set_listing_data(true);
        let (a, b) = (noise(size, 41), noise(size + 1, 42));
        server.server.put("a", "application/pdf", a.clone());
        server.server.put("b", "application/pdf", b.clone());
        let mount = Mount::new(&server.base_url());
        assert!(std::fs::read(mount.path("a")).unwrap() == a, "{size}");
        assert!(std::fs::read(mount.path("b")).unwrap() == b, "{size}");
        let counts = server.server.counts();
        let reads = (counts.raw_reads, counts.json_reads, counts.summary_reads);
        assert_eq!(reads, (2, 0, 1), "{size}: (raw, json, summary) reads");
        // Without the summary, `b` has the whole second of its `Last-Modified`.
        let stored = server.server.stored("b").unwrap().last_updated;
        let whole = stored.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let mtime = std::fs::metadata(mount.path("b")).unwrap().modified().unwrap();
        assert_eq!(mtime, std::time::UNIX_EPOCH + std::time::Duration::from_secs(whole), "{size}");
    }
}
