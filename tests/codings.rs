//! Content codings and FHIR XML through a real mount: a server (or a proxy in front of it)
//! that compresses answers, asked or not, in gzip, deflate, br or zstd, with or without a
//! Content-Length, raw and FHIR JSON, listed and by id: every file has its own bytes and its
//! decoded size before any read. An unknown coding and an XML-only server give EIO with a log
//! line, never the encoded bytes or the XML document as the content. The server's listing
//! mixes entries a listing cannot use among the good ones: they are skipped, never the folder.
//!
//! The server here is a few lines over a TcpListener, so that each answer's headers and body
//! are exactly what the test says (the loopback server's framework would set its own).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use common::{Mount, errno};
use fhirfs_testserver::noise;

/// How one Binary is answered.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// Raw bytes in this coding (`None`: identity), with a Content-Length or chunked.
    Raw { coding: Option<&'static str>, chunked: bool },
    /// The FHIR JSON resource, gzip-compressed.
    JsonGzip,
    /// The resource in FHIR XML, whatever was asked.
    Xml,
}

const CODINGS: [&str; 4] = ["gzip", "deflate", "br", "zstd"];

fn encode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    match coding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        }
        // HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2).
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            let params = brotli::enc::BrotliEncoderParams::default();
            brotli::BrotliCompress(&mut &bytes[..], &mut out, &params).unwrap();
            out
        }
        "zstd" => zstd::encode_all(bytes, 3).unwrap(),
        // An unknown coding: the bytes as they are, labelled with it.
        _ => bytes.to_vec(),
    }
}

fn b64(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            let c =
                if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] } else { b'=' };
            let _ = out.write_char(c as char);
        }
    }
    out
}

struct Binary {
    id: String,
    content_type: &'static str,
    bytes: Vec<u8>,
    answer: Answer,
}

/// The test server: its Binaries, and the `Accept-Encoding` of every request it got.
struct CodingServer {
    port: u16,
    accept_encodings: Arc<Mutex<Vec<String>>>,
}

impl CodingServer {
    fn start(binaries: Vec<Binary>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let binaries = Arc::new(binaries);
        let accept_encodings = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&accept_encodings);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let binaries = Arc::clone(&binaries);
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || serve(stream, &binaries, &seen));
            }
        });
        Self { port, accept_encodings }
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/fhir", self.port)
    }
}

/// Answers one request per connection (`Connection: close`).
fn serve(stream: TcpStream, binaries: &[Binary], seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
    let mut accept_encoding = String::from("(none)");
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("accept-encoding")
        {
            accept_encoding = value.trim().to_owned();
        }
    }
    seen.lock().unwrap().push(accept_encoding);
    let mut stream = stream;
    let (status, headers, body) = route(&path, binaries);
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (name, value) in &headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let chunked = headers.iter().any(|(n, v)| *n == "Transfer-Encoding" && v == "chunked");
    if !chunked {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    if chunked {
        for piece in body.chunks(1000) {
            let _ = stream.write_all(format!("{:x}\r\n", piece.len()).as_bytes());
            let _ = stream.write_all(piece);
            let _ = stream.write_all(b"\r\n");
        }
        let _ = stream.write_all(b"0\r\n\r\n");
    } else {
        let _ = stream.write_all(&body);
    }
    let _ = stream.flush();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
}

type Response = (&'static str, Vec<(&'static str, String)>, Vec<u8>);

fn route(path: &str, binaries: &[Binary]) -> Response {
    let json = |value: serde_json::Value| -> Response {
        let body = value.to_string().into_bytes();
        ("200 OK", vec![("Content-Type", "application/fhir+json".to_owned())], body)
    };
    if path.starts_with("/fhir/Binary?") {
        let entries: Vec<_> = binaries
            .iter()
            .map(|b| {
                let resource = serde_json::json!({"resourceType": "Binary", "id": b.id,
                    "meta": {"versionId": "1"}, "contentType": b.content_type});
                serde_json::json!({"resource": resource})
            })
            .collect();
        // Entries a listing cannot use, among the good ones: an id that is a number, a resource
        // that is a string, an entry without one, an id outside the FHIR pattern, a Patient.
        let bad = [
            serde_json::json!({"resource": {"resourceType": "Binary", "id": 42}}),
            serde_json::json!({"resource": "Binary/7"}),
            serde_json::json!({"search": {"mode": "outcome"}}),
            serde_json::json!({"resource": {"resourceType": "Binary", "id": "a b"}}),
            serde_json::json!({"resource": {"resourceType": "Patient", "id": "p1"}}),
        ];
        let mut mixed = Vec::new();
        for (i, entry) in entries.into_iter().enumerate() {
            if let Some(bad) = bad.get(i) {
                mixed.push(bad.clone());
            }
            mixed.push(entry);
        }
        return json(serde_json::json!({"resourceType": "Bundle", "type": "searchset",
            "entry": mixed}));
    }
    let id = path.strip_prefix("/fhir/Binary/").unwrap_or("").split('?').next().unwrap_or("");
    let Some(binary) = binaries.iter().find(|b| b.id == id) else {
        return ("404 Not Found", vec![], Vec::new());
    };
    let etag = ("ETag", "W/\"1\"".to_owned());
    match binary.answer {
        Answer::Raw { coding, chunked } => {
            let mut headers = vec![("Content-Type", binary.content_type.to_owned()), etag];
            let body = match coding {
                Some(coding) => {
                    headers.push(("Content-Encoding", coding.to_owned()));
                    encode(coding, &binary.bytes)
                }
                None => binary.bytes.clone(),
            };
            if chunked {
                headers.push(("Transfer-Encoding", "chunked".to_owned()));
            }
            ("200 OK", headers, body)
        }
        Answer::JsonGzip => {
            let resource = serde_json::json!({"resourceType": "Binary", "id": binary.id,
                "meta": {"versionId": "1"}, "contentType": binary.content_type,
                "data": b64(&binary.bytes)});
            let body = encode("gzip", resource.to_string().as_bytes());
            let headers = vec![
                ("Content-Type", "application/fhir+json".to_owned()),
                ("Content-Encoding", "gzip".to_owned()),
                etag,
            ];
            ("200 OK", headers, body)
        }
        Answer::Xml => {
            let xml = format!(
                "<Binary xmlns=\"http://hl7.org/fhir\"><id value=\"{}\"/><contentType \
                 value=\"{}\"/><data value=\"{}\"/></Binary>",
                binary.id,
                binary.content_type,
                b64(&binary.bytes)
            );
            let headers = vec![("Content-Type", "application/fhir+xml".to_owned()), etag];
            ("200 OK", headers, xml.into_bytes())
        }
    }
}

/// Every coding, with and without a Content-Length, plus FHIR JSON in gzip and plain bytes.
fn compressed_binaries() -> Vec<Binary> {
    let mut binaries = Vec::new();
    for (k, coding) in CODINGS.into_iter().enumerate() {
        for chunked in [false, true] {
            let id = format!("{coding}-{}", if chunked { "chunked" } else { "length" });
            // Text-like content compresses well: the encoded length is far from the real one.
            let mut bytes = noise(9_000, k as u64);
            bytes.extend(std::iter::repeat_n(b'a' + k as u8, 31_000));
            let answer = Answer::Raw { coding: Some(coding), chunked };
            binaries.push(Binary { id, content_type: "application/pdf", bytes, answer });
        }
    }
    let bytes = noise(20_000, 99);
    binaries.push(Binary {
        id: "json-gzip".into(),
        content_type: "image/png",
        bytes,
        answer: Answer::JsonGzip,
    });
    let plain = Answer::Raw { coding: None, chunked: false };
    binaries.push(Binary {
        id: "plain".into(),
        content_type: "text/plain",
        bytes: b"plain".to_vec(),
        answer: plain,
    });
    binaries
}

/// Each file's size before any read, then its bytes, through a fresh mount.
fn every_file_reads_right(extra: &[&str], listed: bool) {
    let binaries = compressed_binaries();
    let expected: Vec<(String, Vec<u8>)> =
        binaries.iter().map(|b| (b.id.clone(), b.bytes.clone())).collect();
    let server = CodingServer::start(binaries);
    let mount = Mount::builder().args(extra).mount(&server.base_url());
    if listed {
        let mut names: Vec<String> = std::fs::read_dir(&mount.mountpoint)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut ids: Vec<String> = expected.iter().map(|(id, _)| id.clone()).collect();
        ids.sort();
        assert_eq!(names, ids, "every good entry, and only those, among bad ones");
    }
    for (id, bytes) in &expected {
        let size = std::fs::metadata(mount.path(id)).map(|m| m.len()).map_err(errno);
        assert_eq!(size, Ok(bytes.len() as u64), "size of {id} before any read\n{}", mount.log());
        let read = std::fs::read(mount.path(id)).map_err(errno);
        assert!(read.as_deref() == Ok(&bytes[..]), "bytes of {id}: {:?}", read.map(|b| b.len()));
    }
    let asked = server.accept_encodings.lock().unwrap().clone();
    assert!(!asked.is_empty());
    for value in &asked {
        for coding in CODINGS {
            assert!(value.contains(coding), "every request accepts {coding}: {value:?}");
        }
    }
}

#[test]
fn compressed_answers_by_id_have_their_decoded_bytes_and_sizes() {
    every_file_reads_right(&[], false);
}

#[test]
fn compressed_answers_listed_have_their_decoded_bytes_and_sizes() {
    every_file_reads_right(&[], true);
}

#[test]
fn compressed_answers_with_fetch_raw_have_their_decoded_bytes_and_sizes() {
    every_file_reads_right(&["--fetch", "raw"], true);
}

#[test]
fn no_compression_asks_for_identity_and_still_decodes_what_comes() {
    let binaries = compressed_binaries();
    let gzip = binaries.iter().find(|b| b.id == "gzip-length").unwrap().bytes.clone();
    let server = CodingServer::start(binaries);
    let mount = Mount::builder().arg("--no-compression").mount(&server.base_url());
    assert_eq!(std::fs::read(mount.path("gzip-length")).unwrap(), gzip);
    let asked = server.accept_encodings.lock().unwrap().clone();
    assert!(asked.iter().all(|v| v == "identity"), "{asked:?}");
}

#[test]
fn an_unknown_coding_is_eio_and_logged_by_name() {
    let bytes = b"compressed by something unknown".to_vec();
    let answer = Answer::Raw { coding: Some("x-squash"), chunked: false };
    let server = CodingServer::start(vec![Binary {
        id: "odd".into(),
        content_type: "application/pdf",
        bytes,
        answer,
    }]);
    let mount = Mount::new(&server.base_url());
    assert_eq!(std::fs::read(mount.path("odd")).map_err(errno), Err(libc::EIO));
    let lines = mount.wait_log_lines("unsupported content coding", 1);
    assert!(lines[0].contains("x-squash"), "{}", lines[0]);
}

#[test]
fn an_xml_only_server_is_eio_and_never_serves_the_xml_document() {
    let server = CodingServer::start(vec![
        Binary {
            id: "doc".into(),
            content_type: "application/pdf",
            bytes: noise(3000, 5),
            answer: Answer::Xml,
        },
        Binary {
            id: "note".into(),
            content_type: "text/plain",
            bytes: b"hello".to_vec(),
            answer: Answer::Xml,
        },
    ]);
    for extra in [&[][..], &["--fetch", "json"][..], &["--fetch", "raw"][..]] {
        let mount = Mount::builder().args(extra).mount(&server.base_url());
        for id in ["doc", "note"] {
            assert_eq!(std::fs::metadata(mount.path(id)).map_err(errno).err(), Some(libc::EIO));
            assert_eq!(
                std::fs::read(mount.path(id)).map_err(errno).err(),
                Some(libc::EIO),
                "{extra:?}"
            );
        }
        mount.wait_log_lines("FHIR XML", 1);
    }
}
