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

// Every string is borrowed from the body when the JSON has no escapes in it (the common case):
// a listing parses a million of these, and an owned `String` per field was a quarter of its
// time. Only what is kept (`Listed`, `Meta`) is copied out.
#[derive(Deserialize)]
struct RawResource<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Text<'a>>,
    #[serde(borrow)]
    id: Option<Text<'a>>,
    #[serde(borrow)]
    meta: Option<RawMeta<'a>>,
    #[serde(rename = "contentType", borrow)]
    content_type: Option<Text<'a>>,
    #[serde(rename = "securityContext", borrow)]
    security_context: Option<RawReference<'a>>,
    // Owned when a server escapes `/` as `\/`. (`Option<Cow<str>>` with `#[serde(borrow)]`
    // would always copy: serde borrows only a bare `Cow`; hence [`Text`].)
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
struct RawMeta<'a> {
    #[serde(rename = "versionId", borrow)]
    version_id: Option<Text<'a>>,
    #[serde(rename = "lastUpdated", borrow)]
    last_updated: Option<Text<'a>>,
    #[serde(default, borrow)]
    tag: Vec<RawCoding<'a>>,
}

#[derive(Deserialize)]
struct RawCoding<'a> {
    #[serde(borrow)]
    code: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct RawReference<'a> {
    #[serde(borrow)]
    reference: Option<Text<'a>>,
}

/// A Bundle page as read by [`BundleSeed`], its entries already taken in.
struct RawBundle<'a> {
    resource_type: Option<Text<'a>>,
    kind: Option<Text<'a>>,
    // Read leniently: a `total` of the wrong JSON type is no total, not a broken page.
    total: Option<&'a serde_json::value::RawValue>,
    link: Vec<RawLink>,
    entries: Entries,
}

/// Reads a [`RawBundle`] whose entries are read as `E` and made sense of by `read` (`None`: a
/// malformed entry), each taken in as it is read.
struct BundleSeed<'f, E, R> {
    /// Given the first entries of a searchset, as soon as they are read (see
    /// [`parse_bundle_with`]).
    on_first: Option<FirstEntries<'f>>,
    read: R,
    entries: std::marker::PhantomData<E>,
}

impl<'de, E, R> serde::de::DeserializeSeed<'de> for BundleSeed<'_, E, R>
where
    E: Deserialize<'de>,
    R: Fn(E) -> Option<RawEntry<'de>>,
{
    type Value = RawBundle<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, E, R> serde::de::Visitor<'de> for BundleSeed<'_, E, R>
where
    E: Deserialize<'de>,
    R: Fn(E) -> Option<RawEntry<'de>>,
{
    type Value = RawBundle<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Bundle")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        mut self,
        mut map: A,
    ) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut bundle = RawBundle {
            resource_type: None,
            kind: None,
            total: None,
            link: Vec::new(),
            entries: Entries::default(),
        };
        // As a derived reader: each member at most once.
        let mut seen = [false; 5];
        let mut once = |member: usize, name: &'static str| {
            if std::mem::replace(&mut seen[member], true) {
                Err(A::Error::duplicate_field(name))
            } else {
                Ok(())
            }
        };
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match &*key {
                "resourceType" => {
                    once(0, "resourceType")?;
                    bundle.resource_type = map.next_value()?;
                }
                "type" => {
                    once(1, "type")?;
                    bundle.kind = map.next_value()?;
                }
                "total" => {
                    once(2, "total")?;
                    bundle.total = map.next_value()?;
                }
                "link" => {
                    once(3, "link")?;
                    bundle.link = map.next_value()?;
                }
                "entry" => {
                    once(4, "entry")?;
                    let total = bundle.total.and_then(|t| serde_json::from_str(t.get()).ok());
                    let searchset = bundle.kind.as_deref().is_none_or(|k| k != "history");
                    let seed = EntrySeed {
                        entries: &mut bundle.entries,
                        read: &self.read,
                        first: self.on_first.take().filter(|_| searchset).map(|f| (f, total)),
                        entry: self.entries,
                    };
                    map.next_value_seed(seed)?;
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(bundle)
    }
}

/// Reads `Bundle.entry`, taking in each entry as it is read (a page of a thousand is never
/// held as a thousand raw entries).
struct EntrySeed<'e, 'f, E, R> {
    entries: &'e mut Entries,
    read: &'e R,
    /// Given the first entries read, with the total, once there are [`FIRST_ENTRIES`].
    first: Option<(FirstEntries<'f>, Option<u64>)>,
    entry: std::marker::PhantomData<E>,
}

impl<'de, E, R> serde::de::DeserializeSeed<'de> for EntrySeed<'_, '_, E, R>
where
    E: Deserialize<'de>,
    R: Fn(E) -> Option<RawEntry<'de>>,
{
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, E, R> serde::de::Visitor<'de> for EntrySeed<'_, '_, E, R>
where
    E: Deserialize<'de>,
    R: Fn(E) -> Option<RawEntry<'de>>,
{
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of entries")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<E>()? {
            self.entries.add((self.read)(entry));
            if self.entries.listed.len() >= FIRST_ENTRIES
                && self.entries.deletes.is_empty()
                && let Some((first, total)) = self.first.take()
            {
                first(std::mem::take(&mut self.entries.listed), total);
            }
        }
        Ok(())
    }
}

/// How many entries of a page [`parse_bundle_with`] gives early.
const FIRST_ENTRIES: usize = 64;

/// The entries of a page, taken in one by one.
#[derive(Default)]
struct Entries {
    listed: Vec<Listed>,
    skipped: usize,
    /// Entries whose request is a DELETE of a Binary: its id, how many of `listed` came before,
    /// and the entry's Binary if it has one. Whether they are deletions depends on
    /// `Bundle.type`, which may come after the entries.
    deletes: Vec<(usize, String, Option<Listed>)>,
}

impl Entries {
    fn add(&mut self, entry: Option<RawEntry<'_>>) {
        let deleted = entry.as_ref().and_then(|e| {
            let request = e.request.as_ref().filter(|r| r.method.as_deref() == Some("DELETE"))?;
            request.url.as_deref().and_then(binary_id_of_url)
        });
        let listed = entry.and_then(|e| e.resource).and_then(|resource| {
            let id = resource.id.as_deref().filter(|id| crate::id::is_valid_id(id))?;
            if !resource.is_binary() {
                return None;
            }
            let mut meta = resource.meta();
            // A subset never tells the size; otherwise `data` gives it without decoding.
            if !resource.subsetted() {
                meta.size = resource.data.as_deref().map(decoded_len);
            }
            Some(Listed { id: id.to_owned(), meta, name: None, folder: None })
        });
        match (deleted, listed) {
            (Some(id), listed) => self.deletes.push((self.listed.len(), id, listed)),
            (None, Some(listed)) => self.listed.push(listed),
            (None, None) => self.skipped += 1,
        }
    }
}

/// The `next` link among a Bundle's links.
fn next_link(links: &[RawLink]) -> Option<&str> {
    links.iter().find(|l| l.relation.as_deref() == Some("next")).and_then(|l| l.url.as_deref())
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
    #[serde(borrow)]
    request: Option<RawRequest<'a>>,
}

/// `Bundle.entry.request`: in a history Bundle, how the version came to be.
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    method: Option<Text<'a>>,
    #[serde(borrow)]
    url: Option<Text<'a>>,
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
        let owned = |text: &Option<Text<'_>>| text.as_deref().map(str::to_owned);
        Meta {
            version_id: raw.and_then(|m| owned(&m.version_id)),
            last_updated: raw.and_then(|m| m.last_updated.as_deref()).and_then(parse_instant),
            content_type: owned(&self.content_type),
            security_context: self.security_context.as_ref().and_then(|r| owned(&r.reference)),
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
        let binary = Binary {
            id: raw.id.as_deref().map(str::to_owned),
            subsetted: raw.subsetted(),
            meta: raw.meta(),
            data: None,
        };
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
    let identity = Identity {
        id: raw.id.as_deref().map(str::to_owned),
        meta: raw.meta(),
        has_data: raw.data.is_some(),
    };
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
    parse_bundle_with(body, None)
}

/// The `next` link of a Bundle page, read from the part of the body before its entries; `None`
/// when the page has no next link there (or is no Bundle). Takes microseconds where servers
/// put the links (first), so the next page can be asked for before this one is handed to be
/// parsed. The page's parse still decides: this is only a head start.
pub fn next_link_ahead(body: &[u8]) -> Option<String> {
    use serde::de::DeserializeSeed;
    let mut found = None;
    // Stops, with an error, at the links or at the entries, whichever comes first.
    let _ =
        HeadSeed { next: &mut found }.deserialize(&mut serde_json::Deserializer::from_slice(body));
    found
}

/// Reads a Bundle's members up to its links or its entries, and keeps the `next` link.
struct HeadSeed<'f> {
    next: &'f mut Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for HeadSeed<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for HeadSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Bundle")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match &*key {
                "link" => {
                    let links: Vec<RawLink> = map.next_value()?;
                    *self.next = next_link(&links).map(str::to_owned);
                    return Err(A::Error::custom("read up to the links"));
                }
                "entry" => return Err(A::Error::custom("no links before the entries")),
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// What is given the first entries of a page, and `Bundle.total` (see [`parse_bundle_with`]).
pub type FirstEntries<'f> = &'f mut dyn FnMut(Vec<Listed>, Option<u64>);

/// Parses one searchset Bundle page. With `on_first`, the first few Binaries of a searchset
/// page are given to it with `Bundle.total` as soon as they are read, and are then not in the
/// page parsed (nor in a page read again after a malformed entry): a first page shows that
/// much sooner.
///
/// A page is read in one pass, entries and all. Should one entry be malformed (an `id` that is
/// a number, a `resource` that is not an object), the page is read again with each entry on
/// its own, and that entry is skipped without losing the others: reading every page that way
/// scanned each entry twice, a third of a large listing's time.
pub fn parse_bundle_with(
    body: &[u8],
    mut on_first: Option<FirstEntries<'_>>,
) -> Result<Page, FhirError> {
    use serde::de::DeserializeSeed;
    // How many entries `on_first` was given: a page read again leaves them out.
    let mut given = 0;
    // Checked as UTF-8 once, whole: checking each string as it is borrowed costs more.
    if let Ok(text) = std::str::from_utf8(body) {
        let mut counted = on_first.as_mut().map(|first| {
            |listed: Vec<Listed>, total| {
                given += listed.len();
                first(listed, total)
            }
        });
        let seed = BundleSeed {
            on_first: counted.as_mut().map(|f| f as FirstEntries<'_>),
            read: Some,
            entries: Default::default(),
        };
        let mut reader = serde_json::Deserializer::from_str(text);
        if let Ok(raw) = seed.deserialize(&mut reader).and_then(|raw| reader.end().map(|()| raw)) {
            return take_page(raw);
        }
    }
    fn read<'a>(entry: &'a serde_json::value::RawValue) -> Option<RawEntry<'a>> {
        serde_json::from_str(entry.get()).ok()
    }
    let seed = BundleSeed { on_first: None, read, entries: Default::default() };
    let mut reader = serde_json::Deserializer::from_slice(body);
    let raw = seed.deserialize(&mut reader).and_then(|raw| reader.end().map(|()| raw));
    let mut page = take_page(raw.map_err(FhirError::json)?)?;
    // They came first, before any deletion and before the entry that failed the one-pass
    // reading: they are the first entries read again.
    page.entries.drain(..given.min(page.entries.len()));
    Ok(page)
}

/// The page of a Bundle read.
fn take_page(raw: RawBundle<'_>) -> Result<Page, FhirError> {
    if raw.resource_type.as_deref() != Some("Bundle") {
        return Err(FhirError::wrong_type("Bundle", raw.resource_type.as_deref()));
    }
    let next = next_link(&raw.link).map(str::to_owned);
    let total = raw.total.and_then(|t| serde_json::from_str::<u64>(t.get()).ok());
    let history = raw.kind.as_deref() == Some("history");
    let Entries { listed: mut entries, mut skipped, deletes } = raw.entries;
    let mut deleted = Vec::new();
    if history {
        deleted = deletes.into_iter().map(|(before, id, _)| (before, id)).collect();
    } else {
        // Not a history: a DELETE request says nothing, and its Binary (if any) is listed
        // where it was. From the last, so that the positions before stay true.
        for (before, _, listed) in deletes.into_iter().rev() {
            match listed {
                Some(listed) => entries.insert(before, listed),
                None => skipped += 1,
            }
        }
    }
    Ok(Page { entries, next, skipped, total, history, deleted })
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
    fn the_first_entries_are_given_before_the_rest_of_the_page_is_read() {
        let entries = |ids: std::ops::Range<usize>| {
            let entry = |i| format!(r#"{{"resource":{{"resourceType":"Binary","id":"b{i}"}}}}"#);
            ids.map(entry).collect::<Vec<_>>().join(",")
        };
        let ids = |listed: &[Listed]| listed.iter().map(|l| l.id.clone()).collect::<Vec<_>>();
        let expected =
            |ids: std::ops::Range<usize>| ids.map(|i| format!("b{i}")).collect::<Vec<_>>();
        let read = |body: &str| {
            let mut given = Vec::new();
            let mut first = |listed: Vec<Listed>, total| given.push((ids(&listed), total));
            let page = parse_bundle_with(body.as_bytes(), Some(&mut first));
            (given, page)
        };
        let body =
            format!(r#"{{"resourceType":"Bundle","total":100,"entry":[{}]}}"#, entries(0..100));
        let (given, page) = read(&body);
        assert_eq!(given, [(expected(0..FIRST_ENTRIES), Some(100))]);
        assert_eq!(ids(&page.unwrap().entries), expected(FIRST_ENTRIES..100));
        // A page shorter than that: all in the page.
        let body = format!(r#"{{"resourceType":"Bundle","entry":[{}]}}"#, entries(0..10));
        let (given, page) = read(&body);
        assert!(given.is_empty());
        assert_eq!(page.unwrap().entries.len(), 10);
        // A malformed entry later: the page is read again, without the entries given.
        let body = format!(
            r#"{{"resourceType":"Bundle","entry":[{},{{"resource":7}},{}]}}"#,
            entries(0..100),
            entries(100..102)
        );
        let (given, page) = read(&body);
        assert_eq!(given, [(expected(0..FIRST_ENTRIES), None)]);
        let page = page.unwrap();
        assert_eq!((ids(&page.entries), page.skipped), (expected(FIRST_ENTRIES..102), 1));
        // A history: versions and deletions go together, in the page.
        let body = format!(
            r#"{{"resourceType":"Bundle","type":"history","entry":[{}]}}"#,
            entries(0..100)
        );
        let (given, page) = read(&body);
        assert!(given.is_empty());
        assert_eq!(page.unwrap().entries.len(), 100);
    }

    #[test]
    fn the_next_link_is_read_ahead_only_from_before_the_entries() {
        let links = r#""link":[{"relation":"next","url":"p2"}]"#;
        let entry = r#""entry":[{"resource":{"resourceType":"Binary","id":"a"}}]"#;
        let first = format!(r#"{{"resourceType":"Bundle",{links},{entry}}}"#);
        assert_eq!(next_link_ahead(first.as_bytes()).as_deref(), Some("p2"));
        let last = format!(r#"{{"resourceType":"Bundle",{entry},{links}}}"#);
        assert_eq!(next_link_ahead(last.as_bytes()), None);
        // The parse finds it wherever it is.
        assert_eq!(parse_bundle(last.as_bytes()).unwrap().next.as_deref(), Some("p2"));
        assert_eq!(parse_bundle(first.as_bytes()).unwrap().next.as_deref(), Some("p2"));
        assert_eq!(next_link_ahead(br#"{"resourceType":"Bundle","link":[]}"#), None);
        assert_eq!(next_link_ahead(b"not json"), None);
        assert_eq!(
            next_link_ahead(br#"{"link":[{"relation":"next","url":"a\/b"}]"#).as_deref(),
            Some("a/b")
        );
    }

    #[test]
    fn a_malformed_entry_is_skipped_and_the_others_kept_in_order() {
        // The one-pass reading fails on the second entry; the lenient one skips only it.
        let body = br#"{"resourceType":"Bundle","type":"searchset","entry":[
            {"resource":{"resourceType":"Binary","id":"a","meta":{"versionId":"1"}}},
            {"resource":{"resourceType":"Binary","id":7}},
            {"resource":"not an object"},
            {"resource":{"resourceType":"Binary","id":"b","contentType":"image/png"}}],
            "link":[{"relation":"next","url":"n"}]}"#;
        let page = parse_bundle(body).unwrap();
        assert_eq!(page.entries.iter().map(|e| &*e.id).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(page.entries[0].meta.version_id.as_deref(), Some("1"));
        assert_eq!(page.entries[1].meta.content_type.as_deref(), Some("image/png"));
        assert_eq!((page.skipped, page.next.as_deref()), (2, Some("n")));
        // Invalid UTF-8 in a member that is not read: the page still reads, leniently.
        let mut odd = br#"{"resourceType":"Bundle","x":"@","entry":[
            {"resource":{"resourceType":"Binary","id":"c"}}]}"#
            .to_vec();
        let at = odd.iter().position(|&b| b == b'@').unwrap();
        odd[at] = 0xff;
        assert!(std::str::from_utf8(&odd).is_err());
        assert_eq!(parse_bundle(&odd).unwrap().entries[0].id, "c");
    }

    #[test]
    fn a_bundle_member_given_twice_is_an_error_as_before() {
        let twice = br#"{"resourceType":"Bundle","entry":[],"entry":[]}"#;
        assert!(matches!(parse_bundle(twice), Err(FhirError::Json(_))));
        let trailing = br#"{"resourceType":"Bundle"} x"#;
        assert!(matches!(parse_bundle(trailing), Err(FhirError::Json(_))));
    }

    #[test]
    fn the_bundle_type_may_come_after_the_entries() {
        let delete = r#"{"request":{"method":"DELETE","url":"Binary/gone"}}"#;
        let put = r#"{"resource":{"resourceType":"Binary","id":"a"},"request":{"method":"PUT","url":"Binary/a"}}"#;
        let history =
            format!(r#"{{"entry":[{put},{delete}],"type":"history","resourceType":"Bundle"}}"#);
        let page = parse_bundle(history.as_bytes()).unwrap();
        assert_eq!(page.deleted, [(1, "gone".to_owned())]);
        assert_eq!(page.entries.len(), 1);
        // In a searchset, a DELETE request means nothing: an entry with a Binary is listed
        // where it stands, one without is skipped.
        let listed = r#"{"resource":{"resourceType":"Binary","id":"b"},"request":{"method":"DELETE","url":"Binary/b"}}"#;
        let searchset = format!(
            r#"{{"entry":[{listed},{put},{delete},{listed}],"type":"searchset","resourceType":"Bundle"}}"#
        );
        let page = parse_bundle(searchset.as_bytes()).unwrap();
        assert!(page.deleted.is_empty());
        assert_eq!(page.entries.iter().map(|e| &*e.id).collect::<Vec<_>>(), ["b", "a", "b"]);
        assert_eq!(page.skipped, 1);
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
