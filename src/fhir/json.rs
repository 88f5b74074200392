//! Decoding a Binary's FHIR JSON while it streams in: `data` is base64-decoded chunk by chunk
//! as the body arrives, straight from the network's buffers into the content, and only the
//! rest of the resource (a few hundred bytes) is kept and parsed at the end. A 64 MiB Binary
//! then costs its 64 MiB instead of its 85 MiB body, with no second pass over the base64.
//!
//! The result is always what [`fhir::decode_binary`] gives for the whole body: anything the
//! fast path does not handle (an escape other than `\/`, whitespace in the base64) turns the
//! decoder back into a plain buffer of the body, rebuilt exactly, for `decode_binary`.

use memchr::memchr2;

use crate::buffer::pool;
use crate::fhir::{self, Binary, FhirError};

/// Base64 characters decoded at a time from the carry-over between chunks.
const GROUP: usize = 4;

/// Where the scanner is in the JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Outside strings.
    Normal,
    /// Inside a string; `key_at` is where a top-level string's text starts in the skeleton.
    InString { key_at: Option<usize>, escaped: bool },
    /// After the top-level string `"data"`: a `:` makes it the key.
    AfterKey,
    /// After `"data":`: a `"` starts the value.
    AfterColon,
    /// Inside the value of `data`; `escaped` after a backslash.
    InData { escaped: bool },
}

/// Decodes one Binary's JSON from its chunks; see the module documentation.
#[derive(Debug)]
pub struct JsonBinaryDecoder {
    scan: Scan,
    /// Nesting of objects and arrays outside strings.
    depth: usize,
    /// The body without the text of `data` (its quotes stay): parsed at the end.
    skeleton: Vec<u8>,
    /// The decoded bytes of `data` so far.
    decoded: Decoded,
    /// Base64 characters of an incomplete group, waiting for the next chunk.
    pending: Vec<u8>,
    /// From the first `=` on, the base64 text is kept here and decoded (forgivingly) at the end.
    tail: Option<Vec<u8>>,
    /// `data` was seen and is in `decoded`.
    captured: bool,
    /// The whole body, once the fast path gave up.
    fallback: Option<Vec<u8>>,
}

impl JsonBinaryDecoder {
    /// A decoder for a body of about `len` bytes (from `Content-Length`, 0 if unknown).
    pub fn new(len: usize) -> Self {
        Self {
            scan: Scan::Normal,
            depth: 0,
            skeleton: Vec::with_capacity(1024),
            decoded: Decoded::with_capacity(len / 4 * 3),
            pending: Vec::with_capacity(GROUP),
            tail: None,
            captured: false,
            fallback: None,
        }
    }

    /// Feeds the next chunk of the body.
    pub fn push(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if let Some(body) = &mut self.fallback {
                body.extend_from_slice(chunk);
                return;
            }
            let used = match self.scan {
                Scan::InData { escaped } => self.data(chunk, escaped),
                _ => self.structure(chunk),
            };
            chunk = &chunk[used..];
        }
    }

    /// The Binary, exactly as [`fhir::decode_binary`] reads the whole body.
    pub fn finish(mut self) -> Result<Binary, FhirError> {
        if let Some(body) = self.fallback {
            return fhir::decode_binary(body);
        }
        if let Scan::InData { escaped } = self.scan {
            // The body ends inside `data`: not JSON. Rebuild it for the same error.
            self.give_up(if escaped { b"\\" } else { b"" });
            return fhir::decode_binary(self.fallback.unwrap_or_default());
        }
        let mut binary = fhir::decode_binary(self.skeleton)?;
        if self.captured {
            let mut decoded = self.decoded.into_vec();
            let mut rest = self.pending;
            rest.extend_from_slice(self.tail.as_deref().unwrap_or_default());
            if !rest.is_empty() {
                let last =
                    base64_simd::forgiving_decode_to_vec(&rest).map_err(|_| FhirError::Base64)?;
                decoded.extend_from_slice(&last);
            }
            // Sized from Content-Length, the buffer fits within a few hundred bytes; grown
            // without one, it may be twice too large.
            if decoded.capacity() - decoded.len() > decoded.len() / 8 {
                decoded.shrink_to_fit();
            }
            binary.meta.size = Some(decoded.len() as u64);
            binary.data = Some(decoded);
        }
        Ok(binary)
    }

    /// Scans JSON outside `data`, copying it to the skeleton; returns the bytes used (all of
    /// `chunk`, or up to and including the quote that opens `data`).
    fn structure(&mut self, chunk: &[u8]) -> usize {
        for (i, &byte) in chunk.iter().enumerate() {
            self.skeleton.push(byte);
            self.scan = match (self.scan, byte) {
                (Scan::InString { key_at, escaped: false }, b'\\') => {
                    Scan::InString { key_at, escaped: true }
                }
                (Scan::InString { key_at, escaped: true }, _) => {
                    Scan::InString { key_at, escaped: false }
                }
                (Scan::InString { key_at, escaped: false }, b'"') => {
                    let text = key_at.map(|at| &self.skeleton[at..self.skeleton.len() - 1]);
                    if text == Some(b"data") && !self.captured {
                        Scan::AfterKey
                    } else {
                        Scan::Normal
                    }
                }
                (scan @ Scan::InString { .. }, _) => scan,
                (Scan::AfterKey, b':') => Scan::AfterColon,
                (Scan::AfterColon, b'"') => {
                    self.scan = Scan::InData { escaped: false };
                    self.captured = true;
                    return i + 1;
                }
                (Scan::AfterKey | Scan::AfterColon, b' ' | b'\t' | b'\n' | b'\r') => self.scan,
                (_, b'"') => {
                    let key_at = (self.depth == 1).then_some(self.skeleton.len());
                    Scan::InString { key_at, escaped: false }
                }
                (_, b'{' | b'[') => {
                    self.depth += 1;
                    Scan::Normal
                }
                (_, b'}' | b']') => {
                    self.depth = self.depth.saturating_sub(1);
                    Scan::Normal
                }
                _ => Scan::Normal,
            };
        }
        chunk.len()
    }

    /// Decodes base64 inside `data`; returns the bytes used.
    fn data(&mut self, chunk: &[u8], escaped: bool) -> usize {
        if escaped {
            // Only `\/` (PHP-style encoders) is taken on the fast path.
            if chunk[0] == b'/' {
                self.scan = Scan::InData { escaped: false };
                self.text(b"/", b"\\/");
                return 1;
            }
            self.give_up(b"\\");
            return 0;
        }
        let end = memchr2(b'"', b'\\', chunk).unwrap_or(chunk.len());
        self.text(&chunk[..end], &chunk[..end]);
        if self.fallback.is_some() {
            return end;
        }
        match chunk.get(end) {
            Some(b'"') => {
                self.skeleton.push(b'"');
                self.scan = Scan::Normal;
            }
            Some(_) => self.scan = Scan::InData { escaped: true },
            None => return end,
        }
        end + 1
    }

    /// Takes base64 text (`as_sent` is how it was written in the JSON, for a fallback).
    fn text(&mut self, text: &[u8], as_sent: &[u8]) {
        let used = self.decode_fast(text);
        if used == text.len() {
            return;
        }
        // Something else than whole groups of the alphabet: padding, or a reason to give up.
        let (text, as_sent) = if text.len() == as_sent.len() {
            (&text[used..], &as_sent[used..])
        } else {
            (text, as_sent)
        };
        if let Some(tail) = &mut self.tail {
            if text.iter().all(|&b| is_base64(b) || b == b'=') {
                tail.extend_from_slice(text);
                return;
            }
        } else if let Some(pad) = text.iter().position(|&b| !is_base64(b))
            && text[pad] == b'='
            && text[pad..].iter().all(|&b| is_base64(b) || b == b'=')
            && text[..pad].iter().all(|&b| is_base64(b))
        {
            self.decode(&text[..pad]);
            let mut tail = std::mem::take(&mut self.pending);
            tail.extend_from_slice(&text[pad..]);
            self.tail = Some(tail);
            return;
        }
        self.give_up(as_sent);
    }

    /// Decodes the longest start of `text` that is base64 alphabet (no `=`: padding is only
    /// ever decoded at the end), carrying an incomplete group over; returns the bytes taken.
    /// The decoder itself checks the alphabet, so the text is read once.
    fn decode_fast(&mut self, text: &[u8]) -> usize {
        if self.tail.is_some() {
            return 0;
        }
        let mut used = 0;
        if !self.pending.is_empty() {
            let take = (GROUP - self.pending.len()).min(text.len());
            if !text[..take].iter().all(|&b| is_base64(b)) {
                return 0;
            }
            self.pending.extend_from_slice(&text[..take]);
            used = take;
            if self.pending.len() < GROUP {
                return used;
            }
            let group = std::mem::take(&mut self.pending);
            self.append(&group);
        }
        let body = &text[used..];
        let whole = body.len() / GROUP * GROUP;
        let mut groups = &body[..whole];
        // The decoder takes `=` in the last group it is given: hold such groups back.
        while let [.., a, b] = groups
            && (*a == b'=' || *b == b'=')
        {
            groups = &groups[..groups.len() - GROUP];
        }
        if self.decoded.decode(groups).is_err() {
            return used;
        }
        used += groups.len();
        let rest = &text[used..];
        if rest.len() < GROUP && rest.iter().all(|&b| is_base64(b)) {
            self.pending.extend_from_slice(rest);
            used = text.len();
        }
        used
    }

    /// Decodes characters of the base64 alphabet, carrying an incomplete group over.
    fn decode(&mut self, text: &[u8]) {
        let used = self.decode_fast(text);
        debug_assert_eq!(used, text.len());
    }

    fn append(&mut self, groups: &[u8]) {
        // Whole groups of the alphabet, without `=`: they always decode.
        let decoded = self.decoded.decode(groups);
        debug_assert!(decoded.is_ok());
    }

    /// Leaves the fast path: rebuilds the body read so far (the base64 decoded so far is
    /// encoded again: whole groups round-trip exactly), then `then_sent`, and keeps the rest.
    fn give_up(&mut self, then_sent: &[u8]) {
        let mut body = std::mem::take(&mut self.skeleton);
        body.reserve(self.decoded.capacity() / 3 * 4 + 64);
        base64_simd::STANDARD.encode_append(self.decoded.as_slice(), &mut body);
        body.extend_from_slice(&self.pending);
        body.extend_from_slice(self.tail.as_deref().unwrap_or_default());
        body.extend_from_slice(then_sent);
        self.decoded = Decoded::empty();
        self.fallback = Some(body);
    }
}

/// The decoded bytes of `data`: a vector sized from Content-Length, on a recycled buffer when
/// one fits, else on new memory that a helper faults in ahead of the decoder
/// ([`pool::FaultAhead`]).
#[derive(Debug)]
struct Decoded {
    /// Stopped before `data` moves or is freed (see `Drop`).
    ahead: Option<pool::FaultAhead>,
    data: Vec<u8>,
}

impl Decoded {
    fn with_capacity(len: usize) -> Self {
        let (data, fresh) = pool::vec_with_capacity(len);
        // SAFETY: `data` changes only in `decode`, which drops `ahead` before it grows the
        // vector, and in `into_vec`, which drops it first; `ahead` is also dropped first.
        let ahead = if fresh { unsafe { pool::FaultAhead::start(&data) } } else { None };
        Self { ahead, data }
    }

    fn empty() -> Self {
        Self { ahead: None, data: Vec::new() }
    }

    /// Appends the bytes of `text`, whole base64 groups, writing them into the vector's spare
    /// capacity: the vector moves only here, after the helper has stopped.
    fn decode(&mut self, text: &[u8]) -> Result<(), base64_simd::Error> {
        let needed = base64_simd::STANDARD.decoded_length(text)?;
        if self.data.capacity() - self.data.len() < needed {
            self.ahead = None;
            self.data.reserve(needed);
        }
        let len = self.data.len();
        let spare = &mut self.data.spare_capacity_mut()[..needed];
        let out = base64_simd::Out::from_uninit_slice(spare);
        let written = base64_simd::STANDARD.decode(text, out)?.len();
        // SAFETY: `decode` wrote the `written` bytes it returned at the start of the spare
        // capacity.
        unsafe { self.data.set_len(len + written) };
        if let Some(ahead) = &self.ahead {
            ahead.progress(self.data.len());
        }
        Ok(())
    }

    fn as_slice(&self) -> &[u8] {
        &self.data
    }

    fn capacity(&self) -> usize {
        self.data.capacity()
    }

    fn into_vec(mut self) -> Vec<u8> {
        self.ahead = None;
        std::mem::take(&mut self.data)
    }
}

impl Drop for Decoded {
    fn drop(&mut self) {
        // The helper stops before `data` is freed, whatever the order of the fields.
        self.ahead = None;
    }
}

fn is_base64(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'+' || byte == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_chunks(body: &[u8], size: usize) -> Result<Binary, FhirError> {
        let mut decoder = JsonBinaryDecoder::new(body.len());
        for chunk in body.chunks(size.max(1)) {
            decoder.push(chunk);
        }
        decoder.finish()
    }

    fn same_as_whole(body: &[u8]) {
        // The same Binary, or an error for both (messages may place it differently).
        let whole = fhir::decode_binary(body.to_vec()).ok();
        for size in [1, 2, 3, 5, 7, 64, body.len().max(1)] {
            let streamed = decode_in_chunks(body, size).ok();
            assert_eq!(streamed, whole, "chunks of {size}: {}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn data_is_decoded_across_chunks_and_meta_kept() {
        let body = br#"{"resourceType":"Binary","id":"a","meta":{"versionId":"2"},"contentType":"text/plain","data":"aGVsbG8gd29ybGQ="}"#;
        let binary = decode_in_chunks(body, 3).unwrap();
        assert_eq!(binary.data.as_deref(), Some(&b"hello world"[..]));
        assert_eq!(binary.meta.version_id.as_deref(), Some("2"));
        assert_eq!(binary.meta.size, Some(11));
        same_as_whole(body);
    }

    #[test]
    fn a_large_body_decodes_exactly_while_its_buffer_is_faulted_in() {
        let _one = crate::buffer::pool::tests::one_helper_at_a_time();
        crate::buffer::pool::tests::require_populate_write();
        // 33 MiB decoded: new memory (above glibc's largest mmap threshold), with a helper.
        let content: Vec<u8> =
            (0..33u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut body = br#"{"resourceType":"Binary","id":"big","data":""#.to_vec();
        base64_simd::STANDARD.encode_append(&content, &mut body);
        body.extend_from_slice(br#"","contentType":"application/dicom"}"#);
        for size in [65_539, 408 << 10] {
            let mut decoder = JsonBinaryDecoder::new(body.len());
            assert!(decoder.decoded.ahead.is_some(), "a helper faults the buffer in");
            for chunk in body.chunks(size) {
                decoder.push(chunk);
            }
            let binary = decoder.finish().unwrap();
            assert_eq!(binary.meta.size, Some(content.len() as u64));
            let data = binary.data.unwrap();
            assert!(data == content, "chunks of {size}: the decoded bytes differ");
        }
        // Dropped halfway, and given up halfway (an escape the fast path does not take): the
        // helper stops before the buffer goes (in tests, dropping a helper whose buffer is
        // already unmapped panics).
        let half = body.len() / 2;
        let mut decoder = JsonBinaryDecoder::new(body.len());
        decoder.push(&body[..half]);
        drop(decoder);
        let mut escaped = body[..half].to_vec();
        escaped.extend_from_slice(b"\\n");
        escaped.extend_from_slice(&body[half..]);
        let mut decoder = JsonBinaryDecoder::new(escaped.len());
        decoder.push(&escaped[..half + 2]);
        assert!(decoder.fallback.is_some(), "the fast path gave up");
        decoder.push(&escaped[half + 2..]);
        assert_eq!(decoder.finish().ok(), fhir::decode_binary(escaped).ok());
    }

    #[test]
    fn decoding_past_the_capacity_stops_the_helper_before_the_buffer_grows() {
        let _one = crate::buffer::pool::tests::one_helper_at_a_time();
        crate::buffer::pool::tests::require_populate_write();
        let mut decoded = Decoded::with_capacity(33 << 20);
        assert!(decoded.ahead.is_some());
        let text = base64_simd::STANDARD.encode_to_string(vec![7u8; (33 << 20) + 3]);
        decoded.decode(text.as_bytes()).unwrap();
        assert!(decoded.ahead.is_none(), "stopped before the vector moved");
        let data = decoded.into_vec();
        assert!(data.len() == (33 << 20) + 3 && data.iter().all(|&b| b == 7));
    }

    #[test]
    fn odd_bodies_read_as_the_whole_body_parser_reads_them() {
        let bodies: &[&[u8]] = &[
            br#"{"resourceType":"Binary","data":"aGk\/Pz8/"}"#,
            br#"{"resourceType":"Binary","data":"aGk\n"}"#,
            br#"{"resourceType":"Binary","data":"aG k="}"#,
            br#"{"resourceType":"Binary","data":"aGk"}"#,
            br#"{"resourceType":"Binary","data":"aGk=x"}"#,
            br#"{"resourceType":"Binary","data":"a=Gk"}"#,
            br#"{"resourceType":"Binary","data":"aGk==" , "id" : "x"}"#,
            br#"{"resourceType":"Binary","data":"","id":"x"}"#,
            br#"{"resourceType":"Binary","data":"aGk=","data":"aGk="}"#,
            br#"{"resourceType":"Binary","d\u0061ta":"aGk="}"#,
            br#"{"resourceType":"Binary","meta":{"data":"x"},"data" : "aGk="}"#,
            br#"{"resourceType":"Patient","data":"aGk="}"#,
            br#"{"resourceType":"Binary","data":null}"#,
            br#"{"resourceType":"Binary","data":"aGk"#,
            br#"{"resourceType":"Binary","data":"aGk\"#,
            br#"{"resourceType":"Binary","contentType":"data","data":"aGk="}"#,
            br#"["data","aGk="]"#,
            br#"{"resourceType":"Binary","data":"aGk=\u0041"}"#,
            // Found by the fuzzer: padding inside the text, then a padded last group.
            br#"{"resourceType":"Binary","data":"AAAAAAAAAAA=AA=="}"#,
            b"",
        ];
        for body in bodies {
            same_as_whole(body);
        }
    }
}
