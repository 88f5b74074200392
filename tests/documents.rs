//! The documents view (`--view documents`): its source against the loopback server (names,
//! sizes, bytes, url forms, the token only for the base URL's origin, presigned URLs renewed
//! once, hash checks, deleted documents, servers that ignore or require `patient`), and a real
//! mount of one patient's documents.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;

use bytes::Bytes;
use fhirfs::{
    DocumentsConfig, DocumentsSource, Fetched, Source, SourceError, Streamed, VerifyHash,
};
use fhirfs::{FhirFs, FsConfig, FsError, Kind, MemorySource, ROOT_INO};
use fhirfs::{HttpConfig, HttpSource, Secret, TokenSource};
use fhirfs_testserver::loopback::LoopbackServer;
use serde_json::json;
use std::sync::Arc;
use url::Url;

use common::{Mount, Server, errno};

const PDF: &[u8] = b"%PDF-1.4 discharge summary";
const CT: &[u8] = b"CT chest: no findings";
const NOTE: &[u8] = b"inline note";

fn b64(bytes: &[u8]) -> String {
    base64_simd::STANDARD.encode_to_string(bytes)
}

/// The SHA-1 of `bytes` (`attachment.hash` is its base64).
fn sha1(bytes: &[u8]) -> Vec<u8> {
    sha1_smol::Sha1::from(bytes).digest().bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn documents(
    server: &LoopbackServer,
    token: Option<&str>,
    patient: Option<&str>,
) -> DocumentsSource {
    documents_with(server, token, patient, VerifyHash::Warn)
}

fn documents_with(
    server: &LoopbackServer,
    token: Option<&str>,
    patient: Option<&str>,
    verify_hash: VerifyHash,
) -> DocumentsSource {
    let mut config = HttpConfig::new(Url::parse(&server.base_url()).unwrap());
    config.token = token.and_then(Secret::new).map_or(TokenSource::None, TokenSource::Static);
    let http = Arc::new(HttpSource::new(config).unwrap());
    let config =
        DocumentsConfig { patient: patient.map(str::to_owned), verify_hash, patient_names: false };
    DocumentsSource::new(http, config)
}

/// name → (key, listed size).
async fn listing(source: &DocumentsSource) -> BTreeMap<String, (String, Option<u64>)> {
    let listed = source.list().await.unwrap();
    listed.into_iter().map(|l| (l.name.unwrap(), (l.id, l.meta.size))).collect()
}

async fn read(source: &DocumentsSource, key: &str) -> Result<Bytes, SourceError> {
    match source.fetch(key, None).await? {
        Fetched::Content { meta, bytes } => {
            assert_eq!(meta.size, Some(bytes.len() as u64));
            Ok(bytes)
        }
        Fetched::NotModified => panic!("a documents fetch is never 304"),
    }
}

fn xattr(source: &DocumentsSource, key: &str, name: &str) -> Option<String> {
    let all = source.xattrs(key);
    all.into_iter().find(|(n, _)| *n == name).map(|(_, v)| String::from_utf8(v).unwrap())
}

/// The one name that starts with `prefix`; checks the suffix shape (` ~` and 8 hex digits).
fn named<'a, V>(names: &'a BTreeMap<String, V>, prefix: &str, ext: &str) -> (&'a str, &'a V) {
    let found: Vec<_> =
        names.iter().filter(|(n, _)| n.starts_with(prefix) && n.ends_with(ext)).collect();
    assert_eq!(found.len(), 1, "one name starting with {prefix:?} in {:?}", names.keys());
    let (name, value) = found[0];
    let rest = &name[prefix.len()..];
    let digits = rest.strip_prefix(" ~").and_then(|r| r.strip_suffix(ext)).unwrap_or("");
    assert!(digits.len() == 8 && digits.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
    (name, value)
}

/// The names in a folder of a mount, sorted.
fn sorted_names(path: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// The seeded server, the view of patient `p1`, and its listing.
async fn patient_p1() -> (LoopbackServer, DocumentsSource, BTreeMap<String, (String, Option<u64>)>)
{
    let server = LoopbackServer::start().await.unwrap();
    seed(&server);
    let source = documents(&server, None, Some("p1"));
    let names = listing(&source).await;
    (server, source, names)
}

/// Patient p1's documents: a DocumentReference with a relative Binary url and inline data, a
/// DiagnosticReport with an absolute url on the base, one without content, and another
/// patient's document.
fn seed(server: &LoopbackServer) {
    server.put("b1", "application/pdf", PDF);
    server.put("b2", "text/plain", CT);
    let base = server.base_url();
    server.put_document(json!({
        "resourceType": "DocumentReference", "id": "d1", "status": "current",
        "subject": {"reference": "Patient/p1"}, "date": "2024-05-06T10:00:00+02:00",
        "description": "Discharge summary",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
        "content": [
            {"attachment": {"contentType": "application/pdf", "url": "Binary/b1",
                            "hash": b64(&sha1(PDF)), "size": 999999}},
            {"attachment": {"contentType": "text/plain", "data": b64(NOTE), "title": "Note"}}
        ]
    }));
    server.put_document(json!({
        "resourceType": "DiagnosticReport", "id": "r1", "status": "final",
        "subject": {"reference": "Patient/p1"}, "issued": "2024-05-07T08:00:00Z",
        "code": {"text": "CT chest"},
        "presentedForm": [{"contentType": "text/plain", "url": format!("{base}/Binary/b2")}]
    }));
    server.put_document(json!({
        "resourceType": "DocumentReference", "id": "empty", "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "application/pdf", "title": "nothing"}}]
    }));
    server.put_document(json!({
        "resourceType": "DocumentReference", "id": "d2", "subject": {"reference": "Patient/p2"},
        "date": "2024-01-01", "content": [{"attachment": {"url": "Binary/b2"}}]
    }));
}

#[tokio::test]
async fn a_patients_documents_are_named_sized_and_read() {
    let server = LoopbackServer::start().await.unwrap();
    // HFS 0.2.7 ignores `patient`: every document comes, with an OperationOutcome entry.
    server.set_documents_ignore_patient(true);
    seed(&server);
    let source = documents(&server, None, Some("p1"));
    let names = listing(&source).await;
    assert_eq!(names.len(), 3, "p2's document and the one without content left out: {names:?}");
    // 2024-05-06T10:00:00+02:00 is 08:00 UTC, the same day.
    let (_, (pdf, pdf_size)) = named(&names, "2024-05-06 Discharge summary", ".pdf");
    let (_, (note, note_size)) = named(&names, "2024-05-06 Note", ".txt");
    let (_, (ct, ct_size)) = named(&names, "2024-05-07 CT chest", ".txt");
    // Only inline data tells a size before the content: attachment.size is a hint (wrong here).
    assert_eq!((*pdf_size, *note_size, *ct_size), (None, Some(NOTE.len() as u64), None));
    assert_eq!(read(&source, pdf).await.unwrap(), PDF);
    assert_eq!(read(&source, note).await.unwrap(), NOTE);
    assert_eq!(read(&source, ct).await.unwrap(), CT);
    let counts = server.counts();
    assert_eq!(counts.per_id.get("b1"), Some(&1));
    assert_eq!(counts.per_id.get("b2"), Some(&1));
    assert_eq!(counts.reads, 2, "inline data needs no request");
    assert_eq!(counts.document_searches, 2, "one page of each type");
    assert_eq!(xattr(&source, pdf, "user.fhir.source").as_deref(), Some("DocumentReference/d1"));
    assert_eq!(xattr(&source, pdf, "user.fhir.url").as_deref(), Some("Binary/b1"));
    assert_eq!(xattr(&source, note, "user.fhir.url").as_deref(), Some("data"));
    assert_eq!(xattr(&source, pdf, "user.fhir.type").as_deref(), Some("http://loinc.org|18842-5"));
    assert_eq!(xattr(&source, pdf, "user.fhir.date").as_deref(), Some("2024-05-06T10:00:00+02:00"));
    assert_eq!(xattr(&source, pdf, "user.fhir.hash").as_deref(), Some(b64(&sha1(PDF)).as_str()));
    assert_eq!(xattr(&source, pdf, "user.fhir.hash_match").as_deref(), Some("yes"));
    assert_eq!(xattr(&source, note, "user.fhir.hash_match"), None, "no hash, no verdict");
    assert_eq!(xattr(&source, ct, "user.fhir.source").as_deref(), Some("DiagnosticReport/r1"));
}

#[tokio::test]
async fn names_stay_when_a_clashing_document_appears() {
    let server = LoopbackServer::start().await.unwrap();
    seed(&server);
    let source = documents(&server, None, Some("p1"));
    let before = listing(&source).await;
    // Same date and title as d1's PDF, and sorted before it by id.
    server.put_document(json!({
        "resourceType": "DocumentReference", "id": "a0", "subject": {"reference": "Patient/p1"},
        "date": "2024-05-06", "description": "Discharge summary",
        "content": [{"attachment": {"contentType": "application/pdf", "url": "Binary/b1"}}]
    }));
    let after = listing(&source).await;
    assert_eq!(after.len(), before.len() + 1);
    for (name, (key, _)) in &before {
        assert_eq!(after.get(name).map(|(k, _)| k), Some(key), "{name} kept its name");
    }
}

#[tokio::test]
async fn the_token_goes_to_the_base_origin_only_and_expired_urls_are_renewed_once() {
    let server = LoopbackServer::start().await.unwrap();
    server.set_token(Some("secret"));
    // Storage on another port: another origin.
    let storage = LoopbackServer::start().await.unwrap();
    storage.put_blob("scan", "application/dicom", b"DICM scan".to_vec(), "s1");
    server.put_blob("own", "application/pdf", b"own storage".to_vec(), "k");
    let doc = |url: String| {
        json!({"resourceType": "DocumentReference", "id": "d1", "subject": {"reference": "Patient/p1"},
        "date": "2024-05-06", "description": "Scan",
        "content": [
            {"attachment": {"contentType": "application/dicom", "url": url}},
            {"attachment": {"contentType": "application/pdf", "url": "/storage/own?sig=k"}}
        ]})
    };
    server.put_document(doc(storage.blob_url("scan", "s1")));
    let source = documents(&server, Some("secret"), Some("p1"));
    let names = listing(&source).await;
    let (_, (scan, _)) = named(&names, "2024-05-06 Scan", ".dcm");
    let (_, (own, _)) = named(&names, "2024-05-06 Scan", ".pdf");
    assert_eq!(read(&source, scan).await.unwrap(), &b"DICM scan"[..]);
    assert_eq!(read(&source, own).await.unwrap(), &b"own storage"[..]);
    assert_eq!(server.counts().blob_reads_with_authorization, 1, "the base origin gets the token");
    // The presigned URL expires; the document hands out a fresh one (same version).
    storage.put_blob("scan", "application/dicom", b"DICM scan".to_vec(), "s2");
    server.resign_document(doc(storage.blob_url("scan", "s2")));
    let reads = server.counts().document_reads;
    assert_eq!(read(&source, scan).await.unwrap(), &b"DICM scan"[..]);
    assert_eq!(server.counts().document_reads, reads + 1, "the document read again once");
    assert_eq!(storage.counts().blob_reads, 3, "s1, s1 refused, s2");
    // Expired again, and the document still names the old URL: one renewal, then EACCES.
    storage.put_blob("scan", "application/dicom", b"DICM scan".to_vec(), "s3");
    assert_eq!(read(&source, scan).await.unwrap_err(), SourceError::Forbidden);
    assert_eq!(server.counts().document_reads, reads + 2, "once per fetch, no more");
    assert_eq!(storage.counts().blob_reads, 5);
    assert_eq!(storage.counts().blob_reads_with_authorization, 0, "never a token to storage");
}

#[tokio::test]
async fn hashes_are_checked_in_every_known_form() {
    let server = LoopbackServer::start().await.unwrap();
    let bytes = b"some report".to_vec();
    server.put("b", "text/plain", bytes.clone());
    let attachment = |title: &str, hash: String| {
        json!({"attachment": {"contentType": "text/plain", "url": "Binary/b", "title": title,
                              "hash": hash}})
    };
    server.put_document(json!({
        "resourceType": "DocumentReference", "id": "h", "subject": {"reference": "Patient/p1"},
        "date": "2024-05-06",
        "content": [
            attachment("good", b64(&sha1(&bytes))),
            attachment("hex", b64(hex(&sha1(&bytes)).as_bytes())),
            attachment("bad", b64(&sha1(b"other bytes"))),
        ]
    }));
    let source = documents(&server, None, Some("p1"));
    let names = listing(&source).await;
    let key = |title: &str| named(&names, &format!("2024-05-06 {title}"), ".txt").1.0.clone();
    for title in ["good", "hex", "bad"] {
        assert_eq!(read(&source, &key(title)).await.unwrap(), bytes, "warn serves the bytes");
    }
    let verdict = |title: &str| xattr(&source, &key(title), "user.fhir.hash_match");
    assert_eq!(verdict("good").as_deref(), Some("yes"));
    assert_eq!(verdict("hex").as_deref(), Some("yes (the hex digest in base64)"));
    assert_eq!(verdict("bad").as_deref(), Some("no"));
    let strict = documents_with(&server, None, Some("p1"), VerifyHash::Strict);
    listing(&strict).await;
    assert_eq!(read(&strict, &key("good")).await.unwrap(), bytes);
    assert_eq!(read(&strict, &key("hex")).await.unwrap(), bytes);
    let error = read(&strict, &key("bad")).await.unwrap_err();
    assert!(
        matches!(&error, SourceError::BadBody(m) if m.contains("DocumentReference/h")),
        "{error}"
    );
}

#[tokio::test]
async fn deleted_documents_leave_the_listing_and_their_files_are_gone() {
    let (server, source, names) = patient_p1().await;
    let (_, (ct, _)) = named(&names, "2024-05-07 CT chest", ".txt");
    server.delete_document("DiagnosticReport", "r1");
    let after = listing(&source).await;
    assert_eq!(after.len(), names.len() - 1);
    assert!(!after.keys().any(|n| n.starts_with("2024-05-07 CT chest")));
    assert_eq!(read(&source, ct).await.unwrap_err(), SourceError::NotFound);
}

#[tokio::test]
async fn a_server_that_needs_the_patient_and_refuses_binary_search_still_shows_documents() {
    let server = LoopbackServer::start().await.unwrap();
    // Cerner: Binary read by id only; document searches need `patient`.
    server.set_search_status(Some(403));
    server.set_documents_require_patient(true);
    seed(&server);
    let source = documents(&server, None, Some("p1"));
    let names = listing(&source).await;
    assert_eq!(names.len(), 3);
    let (_, (pdf, _)) = named(&names, "2024-05-06 Discharge summary", ".pdf");
    assert_eq!(read(&source, pdf).await.unwrap(), PDF);
    assert_eq!(server.counts().searches, 0, "Binary was never searched");
}

#[test]
fn a_mount_of_one_patients_documents_shows_names_sizes_bytes_and_xattrs() {
    let server = Server::start();
    seed(&server.server);
    let mount = Mount::builder()
        .args(&["--view", "documents", "--patient", "p1"])
        .mount(&server.base_url());
    let names = sorted_names(&mount.mountpoint);
    assert_eq!(names.len(), 3, "{names:?}");
    let by_prefix = |prefix: &str| names.iter().find(|n| n.starts_with(prefix)).unwrap().clone();
    for (prefix, bytes) in
        [("2024-05-06 Discharge summary", PDF), ("2024-05-06 Note", NOTE), ("2024-05-07 CT", CT)]
    {
        let path = mount.path(&by_prefix(prefix));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), bytes.len() as u64, "the exact size before any read: {prefix}");
        assert_eq!(meta.mode() & 0o777, 0o444);
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{prefix}");
    }
    let pdf = mount.path(&by_prefix("2024-05-06 Discharge summary"));
    let get = |name: &str| xattr::get(&pdf, name).unwrap().map(|v| String::from_utf8(v).unwrap());
    assert_eq!(get("user.mime_type").as_deref(), Some("application/pdf"));
    assert_eq!(get("user.fhir.source").as_deref(), Some("DocumentReference/d1"));
    assert_eq!(get("user.fhir.hash_match").as_deref(), Some("yes"));
    // A name that is no document's, even one shaped like an id or a file's key: no such file.
    for missing in [
        "2024-05-06 Nothing ~00000000.pdf",
        "b1",
        "DocumentReference.d2.0",
        "DocumentReference.d1.0",
    ] {
        let error = std::fs::metadata(mount.path(missing)).unwrap_err();
        assert_eq!(errno(error), libc::ENOENT, "{missing}");
    }
    // cp -r copies every document byte for byte.
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(&mount.mountpoint)
        .arg(copy.path().join("copy"))
        .status()
        .unwrap();
    assert!(status.success());
    for name in &names {
        let copied = std::fs::read(copy.path().join("copy").join(name)).unwrap();
        assert_eq!(copied, std::fs::read(mount.path(name)).unwrap(), "{name}");
    }
}

/// A core over a source with folders: Patient-1 holds two files, Patient-2 one; a Binary
/// with no place is not listed.
fn core_with_folders() -> Arc<FhirFs<MemorySource>> {
    let source = MemorySource::new();
    for (id, folder, name, bytes) in [
        ("a", "Patient-1", "x ~1.pdf", "aaa"),
        ("b", "Patient-1", "y ~2.txt", "bbbb"),
        ("c", "Patient-2", "z ~3.pdf", "c"),
    ] {
        source.put(id, "application/pdf", bytes);
        source.place(id, Some(folder), name);
    }
    source.put("d", "text/plain", "unplaced");
    FhirFs::new(source, FsConfig::default())
}

/// Every entry of folder `ino`: name and kind.
async fn entries_of(fs: &Arc<FhirFs<MemorySource>>, ino: u64) -> Vec<(String, Kind)> {
    let fh = fs.opendir(ino).await.unwrap();
    let mut out = Vec::new();
    fs.readdir(fh, 0, |e| {
        out.push((e.name.to_owned(), e.kind));
        false
    })
    .unwrap();
    fs.release(fh);
    out
}

fn entry(name: &str, kind: Kind) -> (String, Kind) {
    (name.to_owned(), kind)
}

#[tokio::test]
async fn the_root_holds_the_folders_and_each_folder_its_files() {
    let fs = core_with_folders();
    // A folder and a file found before any listing of the root.
    let p2 = fs.lookup(ROOT_INO, OsStr::new("Patient-2")).await.unwrap();
    assert_eq!(p2.kind, Kind::Dir);
    let z = fs.lookup(p2.ino, OsStr::new("z ~3.pdf")).await.unwrap();
    assert_eq!((z.kind, z.size), (Kind::File, 1));
    let root = entries_of(&fs, ROOT_INO).await;
    let dots = [entry(".", Kind::Dir), entry("..", Kind::Dir)];
    let with_dots = |more: &[(String, Kind)]| -> Vec<(String, Kind)> {
        dots.iter().chain(more).cloned().collect()
    };
    assert_eq!(root, with_dots(&[entry("Patient-1", Kind::Dir), entry("Patient-2", Kind::Dir)]));
    let p1 = fs.lookup(ROOT_INO, OsStr::new("Patient-1")).await.unwrap();
    assert_eq!(fs.getattr(p1.ino).await.unwrap(), p1);
    assert_eq!(p1.perm, 0o555);
    let files = entries_of(&fs, p1.ino).await;
    assert_eq!(files, with_dots(&[entry("x ~1.pdf", Kind::File), entry("y ~2.txt", Kind::File)]));
    let x = fs.lookup(p1.ino, OsStr::new("x ~1.pdf")).await.unwrap();
    let opened = fs.open(x.ino, false).await.unwrap();
    assert_eq!(&fs.read(opened.fh, 0, 100).await.unwrap()[..], b"aaa");
    fs.release(opened.fh);
    assert_eq!(fs.lookup(p1.ino, OsStr::new("y ~2.txt")).await.unwrap().size, 4);
}

#[tokio::test]
async fn files_are_found_only_in_their_own_folder() {
    let fs = core_with_folders();
    let p1 = fs.lookup(ROOT_INO, OsStr::new("Patient-1")).await.unwrap();
    let x = fs.lookup(p1.ino, OsStr::new("x ~1.pdf")).await.unwrap();
    for (parent, name) in [
        (p1.ino, "z ~3.pdf"),
        (ROOT_INO, "x ~1.pdf"),
        (ROOT_INO, "a"),
        (ROOT_INO, "d"),
        (ROOT_INO, "Patient-3"),
        (p1.ino, "a"),
    ] {
        let error = fs.lookup(parent, OsStr::new(name)).await.unwrap_err();
        assert_eq!(error.errno(), libc::ENOENT, "{name}");
    }
    assert_eq!(fs.open(p1.ino, false).await.unwrap_err(), FsError::IsDir);
    assert_eq!(fs.lookup(x.ino, OsStr::new("x")).await.unwrap_err(), FsError::NotDir);
    assert_eq!(fs.opendir(x.ino).await.unwrap_err(), FsError::NotDir);
    assert!(fs.xattrs(p1.ino).await.unwrap().is_empty());
    assert_eq!(fs.getattr(fhirfs::FOLDER_INO_BASE + 99).await.unwrap_err(), FsError::NoEntry);
}

#[test]
fn a_mount_of_all_documents_has_a_folder_per_subject() {
    let server = Server::start();
    seed(&server.server);
    let mount = Mount::builder().args(&["--view", "documents"]).mount(&server.base_url());
    let list = |path: &std::path::Path| sorted_names(path);
    assert_eq!(list(&mount.mountpoint), ["Patient-p1", "Patient-p2"]);
    let p1 = mount.path("Patient-p1");
    assert!(std::fs::metadata(&p1).unwrap().is_dir());
    assert_eq!(std::fs::metadata(&p1).unwrap().mode() & 0o777, 0o555);
    let p1_files = list(&p1);
    assert_eq!(p1_files.len(), 3, "{p1_files:?}");
    let p2_files = list(&mount.path("Patient-p2"));
    assert_eq!(p2_files.len(), 1);
    assert!(p2_files[0].starts_with("2024-01-01 DocumentReference ~"), "{p2_files:?}");
    assert_eq!(std::fs::read(mount.path("Patient-p2").join(&p2_files[0])).unwrap(), CT);
    // cp -r of the whole mount: every folder, every file, byte for byte, with exact sizes.
    let copy = tempfile::tempdir().unwrap();
    let target = copy.path().join("copy");
    let status =
        std::process::Command::new("cp").arg("-r").arg(&mount.mountpoint).arg(&target).status();
    assert!(status.unwrap().success());
    for folder in ["Patient-p1", "Patient-p2"] {
        assert_eq!(list(&target.join(folder)), list(&mount.path(folder)));
        for name in list(&mount.path(folder)) {
            let copied = std::fs::read(target.join(folder).join(&name)).unwrap();
            assert_eq!(copied, std::fs::read(mount.path(folder).join(&name)).unwrap());
        }
    }
    // Another subject's file is not in this folder, nor at the root.
    let error = std::fs::metadata(p1.join(&p2_files[0])).unwrap_err();
    assert_eq!(errno(error), libc::ENOENT);
    let error = std::fs::metadata(mount.path(&p2_files[0])).unwrap_err();
    assert_eq!(errno(error), libc::ENOENT);
}

/// The demo's documents, as README shows them: the exact names (they never change while the
/// documents do not), sizes and bytes.
#[test]
fn the_demo_shows_its_documents_by_patient() {
    let mount = Mount::builder().args(&["--demo", "--view", "documents"]).mount_demo();
    let tree = [
        ("Patient-demo-1/2024-05-06 Discharge summary ~30a23abd.pdf", "report.pdf"),
        ("Patient-demo-1/2024-05-06 Nursing notes ~7b6b8570.txt", "notes.txt"),
        ("Patient-demo-1/2024-05-07 CT chest ~751438ee.png", "scan.png"),
        ("Patient-demo-2/2024-04-02 Referral letter ~22aa6209.txt", "notes.txt"),
    ];
    let mut found = Vec::new();
    for folder in std::fs::read_dir(&mount.mountpoint).unwrap() {
        let folder = folder.unwrap();
        for file in std::fs::read_dir(folder.path()).unwrap() {
            let name = file.unwrap().file_name().into_string().unwrap();
            found.push(format!("{}/{name}", folder.file_name().into_string().unwrap()));
        }
    }
    found.sort();
    assert_eq!(found, tree.map(|(path, _)| path));
    for (path, asset) in tree {
        let expected = std::fs::read(format!("{}/assets/demo/{asset}", env!("CARGO_MANIFEST_DIR")));
        let expected = expected.unwrap();
        assert_eq!(std::fs::metadata(mount.path(path)).unwrap().len(), expected.len() as u64);
        assert_eq!(std::fs::read(mount.path(path)).unwrap(), expected, "{path}");
    }
}

#[tokio::test]
async fn named_files_are_found_by_name_before_any_listing_and_never_by_id() {
    let source = MemorySource::new();
    source.put("a", "application/pdf", "aaa");
    source.place("a", None, "2024-05-06 Report ~1.pdf");
    source.put("b", "text/plain", "unplaced");
    let fs = FhirFs::new(source, FsConfig::default());
    // The first lookup lists: a program may open a path it knows without listing the folder.
    let found = fs.lookup(ROOT_INO, OsStr::new("2024-05-06 Report ~1.pdf")).await.unwrap();
    assert_eq!((found.kind, found.size), (Kind::File, 3));
    assert_eq!(fs.source().list_count(), 1);
    for name in ["a", "b", "2024-05-06 Other ~2.pdf"] {
        let error = fs.lookup(ROOT_INO, OsStr::new(name)).await.unwrap_err();
        assert_eq!(error.errno(), libc::ENOENT, "{name}");
    }
    assert_eq!(fs.source().fetch_count(), 0, "the listing gave the size; no id was tried");
    let root = entries_of(&fs, ROOT_INO).await;
    assert_eq!(root.last(), Some(&entry("2024-05-06 Report ~1.pdf", Kind::File)));
    assert_eq!(root.len(), 3);
}

/// A viewer opens a path it was given, before anything listed the folder.
#[test]
fn a_known_name_opens_without_listing_the_folder_first() {
    let mount = Mount::builder().args(&["--demo", "--view", "documents", "--patient", "demo-1"]);
    let mount = mount.mount_demo();
    let png = std::fs::read(format!("{}/assets/demo/scan.png", env!("CARGO_MANIFEST_DIR")));
    let bytes = std::fs::read(mount.path("2024-05-07 CT chest ~751438ee.png")).unwrap();
    assert_eq!(bytes, png.unwrap());
    let error = std::fs::metadata(mount.path("2024-05-07 CT chest ~00000000.png")).unwrap_err();
    assert_eq!(errno(error), libc::ENOENT);
}

/// Through a real mount: presigned storage on another origin never sees the token; an expired
/// URL is renewed once, and when the renewal does not help the file is EACCES; a Binary that is
/// gone is ENOENT, one the token may not read EACCES, a server error EIO.
#[test]
fn a_mount_reads_storage_without_the_token_and_maps_errors_to_errno() {
    let server = Server::start();
    let storage = Server::start();
    let (fhir, blobs) = (&server.server, &storage.server);
    fhir.set_token(Some("secret"));
    blobs.put_blob("scan", "application/dicom", b"DICM scan".to_vec(), "s1");
    fhir.put("locked", "application/pdf", b"%PDF locked".to_vec());
    fhir.set_fault("locked", Some(fhirfs_testserver::loopback::Fault::Status(403)));
    fhir.put("broken", "application/pdf", b"%PDF broken".to_vec());
    fhir.set_fault("broken", Some(fhirfs_testserver::loopback::Fault::Status(500)));
    let doc = |scan_url: String| {
        json!({"resourceType": "DocumentReference", "id": "d1",
        "subject": {"reference": "Patient/p1"}, "date": "2024-05-06",
        "content": [
            {"attachment": {"contentType": "application/dicom", "title": "scan", "url": scan_url}},
            {"attachment": {"contentType": "application/pdf", "title": "gone", "url": "Binary/gone"}},
            {"attachment": {"contentType": "application/pdf", "title": "locked", "url": "Binary/locked"}},
            {"attachment": {"contentType": "application/pdf", "title": "broken", "url": "Binary/broken"}}
        ]})
    };
    fhir.put_document(doc(blobs.blob_url("scan", "s1")));
    let mount = Mount::builder()
        .args(&["--view", "documents", "--patient", "p1", "--cache-ttl", "0", "--dir-ttl", "0"])
        .env("FHIRFS_TOKEN", "secret")
        .mount(&server.base_url());
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for entry in std::fs::read_dir(&mount.mountpoint).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let title = name["2024-05-06 ".len()..name.find(" ~").unwrap()].to_owned();
        names.insert(title, name);
    }
    let path = |title: &str| mount.path(&names[title]);
    assert_eq!(std::fs::read(path("scan")).unwrap(), b"DICM scan");
    for (title, expected) in
        [("gone", libc::ENOENT), ("locked", libc::EACCES), ("broken", libc::EIO)]
    {
        let error = std::fs::read(path(title)).unwrap_err();
        assert_eq!(errno(error), expected, "{title}");
    }
    // A fresh URL (the listing, with --dir-ttl 0, brings it).
    blobs.put_blob("scan", "application/dicom", b"DICM scan v2".to_vec(), "s2");
    fhir.resign_document(doc(blobs.blob_url("scan", "s2")));
    assert_eq!(std::fs::read(path("scan")).unwrap(), b"DICM scan v2");
    // Expired, and the document still names the old URL: read again once, then EACCES.
    blobs.put_blob("scan", "application/dicom", b"DICM scan v3".to_vec(), "s3");
    let (reads, tries) = (fhir.counts().document_reads, blobs.counts().blob_reads);
    let error = std::fs::read(path("scan")).unwrap_err();
    assert_eq!(errno(error), libc::EACCES);
    // Each fetch (the kernel may look the file up more than once) tries the URL, reads the
    // document again once, and tries the URL it names: two storage requests per renewal.
    let renewals = fhir.counts().document_reads - reads;
    assert!(renewals >= 1);
    assert_eq!(blobs.counts().blob_reads - tries, 2 * renewals, "one renewal per fetch");
    assert!(blobs.counts().blob_reads >= 4);
    assert_eq!(blobs.counts().blob_reads_with_authorization, 0, "never a token to storage");
    // A presigned URL's signature is a secret too: not in the log (which is at debug level).
    let log = mount.log();
    assert!(!log.contains("sig=") && !log.contains("secret"), "{log}");
}

/// Backups: `rsync -a` copies every folder, and a second run after the TTLs changes nothing
/// and fetches no content: the listing confirms each document's version.
#[test]
fn a_second_rsync_of_the_documents_changes_nothing_and_fetches_no_content() {
    let server = Server::start();
    seed(&server.server);
    let mount = Mount::builder()
        .args(&["--view", "documents", "--dir-ttl", "0.3", "--cache-ttl", "0.3"])
        .mount(&server.base_url());
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("copy");
    let src = format!("{}/", mount.mountpoint.display());
    let rsync = |extra: &[&str]| {
        let output = std::process::Command::new("rsync")
            .arg("-a")
            .args(extra)
            .arg(&src)
            .arg(&dst)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    rsync(&[]);
    let p1 = std::fs::read_dir(dst.join("Patient-p1")).unwrap().count();
    assert_eq!(p1, 3);
    // Both TTLs run out; counted after the wait, so no late request of the first run counts.
    std::thread::sleep(std::time::Duration::from_millis(400));
    let counts = server.server.counts();
    assert_eq!(rsync(&["--itemize-changes"]), "", "the second rsync changes nothing");
    let after = server.server.counts();
    assert_eq!(after.reads, counts.reads, "no content GET (not even a 304)");
    assert!(after.document_searches > counts.document_searches, "the listing was revalidated");
}

#[tokio::test]
async fn unchanged_documents_revalidate_without_downloading_again() {
    let (server, source, names) = patient_p1().await;
    let (_, (pdf, _)) = named(&names, "2024-05-06 Discharge summary", ".pdf");
    let (_, (note, _)) = named(&names, "2024-05-06 Note", ".txt");
    let (_, (ct, _)) = named(&names, "2024-05-07 CT chest", ".txt");
    for key in [pdf, note, ct] {
        read(&source, key).await.unwrap();
    }
    let before = server.counts();
    // The core holds the bytes of document version 1, which the listing still names.
    for key in [pdf, note, ct] {
        let fetched = source.fetch(key, Some("1")).await.unwrap();
        assert_eq!(fetched, Fetched::NotModified, "{key}");
    }
    let after = server.counts();
    assert_eq!(after.reads - before.reads, 2, "inline data asks nothing; each Binary once");
    assert_eq!(after.not_modified - before.not_modified, 2, "both Binaries answered 304");
    // The Binary changes under the same document version: its new bytes.
    server.put("b1", "application/pdf", b"%PDF-1.4 amended".to_vec());
    let Fetched::Content { bytes, meta } = source.fetch(pdf, Some("1")).await.unwrap() else {
        panic!("the new bytes")
    };
    assert_eq!((&bytes[..], meta.version_id.as_deref()), (&b"%PDF-1.4 amended"[..], Some("1")));
    // Bytes held for an older document version are fetched again.
    assert!(matches!(source.fetch(note, Some("0")).await.unwrap(), Fetched::Content { .. }));
}

#[tokio::test]
async fn a_binary_without_a_hash_streams_with_its_size_before_its_bytes() {
    let server = LoopbackServer::start().await.unwrap();
    let big = fhirfs_testserver::noise(4 << 20, 9);
    server.put("big", "application/dicom", big.clone());
    server.put_document(json!({
        "resourceType": "DocumentReference", "id": "s", "subject": {"reference": "Patient/p1"},
        "date": "2024-05-06", "description": "Scan",
        "content": [{"attachment": {"contentType": "application/dicom", "url": "Binary/big"}}]
    }));
    let source = Arc::new(documents(&server, None, Some("p1")));
    let names = listing(&source).await;
    let (_, (key, _)) = named(&names, "2024-05-06 Scan", ".dcm");
    let gate = server.hold_body("big", 1 << 20);
    // Bounded: a source that waited for the whole body would wait for the gate forever.
    let streamed = source.fetch_streaming(key, None, &|_| {});
    let streamed = tokio::time::timeout(common::PATIENCE, streamed).await;
    let Streamed::Content { meta, body } = streamed.expect("streamed").unwrap() else {
        panic!("content")
    };
    assert_eq!((meta.size, body.len()), (Some(big.len() as u64), big.len() as u64));
    assert_eq!(meta.version_id.as_deref(), Some("1"), "the document's version");
    assert!(!body.is_complete(), "the size and the first bytes come before the rest");
    assert_eq!(&body.read(0, 4096).await.unwrap()[..], &big[..4096]);
    gate.release();
    body.outcome().await.unwrap();
    let mut all = Vec::new();
    while (all.len() as u64) < body.len() {
        all.extend_from_slice(&body.read(all.len() as u64, 1 << 20).await.unwrap());
    }
    assert!(all == big);
    assert_eq!(server.counts().per_id.get("big"), Some(&1));
    // Revalidated as the same document version: a 304, nothing downloaded.
    let again = source.fetch_streaming(key, Some("1"), &|_| {}).await.unwrap();
    assert!(matches!(again, Streamed::NotModified));
    assert_eq!(server.counts().not_modified, 1);
}

/// `--patient-names`: a patient's folder shows the name, read once per mount; a Patient that
/// cannot be read keeps the plain folder; file names do not change.
#[test]
fn patient_names_label_folders_only_when_asked() {
    let server = Server::start();
    seed(&server.server);
    server.server.put_patient(json!({"resourceType": "Patient", "id": "p1",
        "name": [{"use": "official", "family": "Doe", "given": ["Jane"]}]}));
    // p2 has no Patient resource: 404, the folder keeps its id.
    let plain = Mount::builder().args(&["--view", "documents"]).mount(&server.base_url());
    let folders = sorted_names(&plain.mountpoint);
    assert_eq!(folders, ["Patient-p1", "Patient-p2"], "no names without --patient-names");
    let files_of = |path: std::path::PathBuf| sorted_names(&path);
    let plain_files = files_of(plain.path("Patient-p1"));
    let reads = server.server.counts().document_reads;
    let named = Mount::builder()
        .args(&["--view", "documents", "--patient-names", "--dir-ttl", "0"])
        .mount(&server.base_url());
    let folders = sorted_names(&named.mountpoint);
    assert_eq!(folders, ["Doe, Jane (Patient-p1)", "Patient-p2"]);
    assert_eq!(files_of(named.path("Doe, Jane (Patient-p1)")), plain_files);
    // Listed again (--dir-ttl 0): the names are not read again.
    std::fs::read_dir(&named.mountpoint).unwrap().for_each(drop);
    assert_eq!(server.server.counts().document_reads - reads, 2, "p1 and p2, once each");
}

#[tokio::test]
async fn a_kind_the_token_may_not_search_is_left_out_and_neither_is_eacces() {
    let server = LoopbackServer::start().await.unwrap();
    seed(&server);
    server.set_document_search_status("DiagnosticReport", Some(403));
    let source = documents(&server, None, Some("p1"));
    let names = listing(&source).await;
    assert_eq!(names.len(), 2, "the DocumentReference's two files: {names:?}");
    server.set_document_search_status("DocumentReference", Some(403));
    assert_eq!(source.list().await.unwrap_err(), SourceError::Forbidden);
}

/// A server that wants a patient (Epic, Cerner), mounted without --patient: an empty folder,
/// and one warning that says what to do.
#[test]
fn a_server_that_needs_a_patient_hints_at_patient() {
    let server = Server::start();
    server.server.set_documents_require_patient(true);
    seed(&server.server);
    let mount =
        Mount::builder().args(&["--view", "documents", "--dir-ttl", "0"]).mount(&server.base_url());
    for _ in 0..2 {
        assert_eq!(std::fs::read_dir(&mount.mountpoint).unwrap().count(), 0);
    }
    assert_eq!(mount.log().matches("try --patient ID").count(), 1, "{}", mount.log());
}
