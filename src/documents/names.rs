//! The names of the documents view: a folder per subject, a file per attachment, cleaned for
//! any filesystem a backup may land on, unique within their folder and stable.
//!
//! A file is named `<date> <title> ~<suffix>.<ext>`:
//! - the date (UTC day) is DocumentReference `date` (DiagnosticReport `issued`, else
//!   `effectiveDateTime`), else the attachment's `creation`, else `meta.lastUpdated`; a
//!   dateTime given only to the year or month keeps that precision; no date, no date part;
//! - the title is the attachment's `title`, else the `description`, else the type's `text`,
//!   else its first coding's `display`, else its `code`, else the resource type;
//! - the suffix is the first 8 hex digits of the SHA-1 of `Type/id#index` (the attachment's
//!   position in the resource): it depends on nothing but the attachment itself;
//! - the extension comes from the contentType (`mime2ext`); a title that already ends with it
//!   does not repeat it.
//!
//! Every file has the suffix, clash or not. A rule that adds it only on a clash cannot keep
//! names stable: the first document named `2024-05-06 Note.pdf` would have to be renamed the
//! moment a second one with the same date and title appears (or keep the bare name only
//! while it is first in some order, which a deletion or an update changes). With the suffix
//! always there, a name changes only when its own document's date, title or type changes.
//! Two suffixes of one folder and base name that agree (one chance in 2^32) are both
//! lengthened to 16 digits, then to all 40.

use std::collections::{HashMap, HashSet};

use crate::fhir::documents::{Attachment, Document};
use crate::fhir::{format_instant, parse_instant};

/// The longest name most filesystems take, in bytes (ext4, XFS, btrfs; NTFS and exFAT count
/// 255 UTF-16 units, which 255 bytes of UTF-8 never exceed).
pub const MAX_NAME_BYTES: usize = 255;

/// Hex digits of the suffix; more only when two suffixes of a folder agree.
const SUFFIX_DIGITS: [usize; 3] = [8, 16, 40];

/// The folder of documents without a subject.
pub const NO_SUBJECT: &str = "no-subject";

/// One file of the view: where it goes, its name, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The folder (the subject, cleaned).
    pub folder: String,
    /// The file name, unique within the folder.
    pub name: String,
    /// The position of the document in the input.
    pub document: usize,
    /// The position of the attachment in the document's `attachments`.
    pub attachment: usize,
}

/// Names every attachment of `documents` that has content (a `url` or `data`). A document
/// given twice (pages that shifted) is named once. Subjects with a label (`Patient/1` →
/// `Doe, Jane`, for `--patient-names`) have the folder `<label> (<subject folder>)`, the
/// subject kept so that two patients of one name stay apart.
pub fn name_files_labelled(documents: &[Document], labels: &HashMap<String, String>) -> Vec<Named> {
    // (folder, base, ext) of each attachment, with its key.
    struct Draft {
        folder: String,
        base: String,
        ext: Option<String>,
        key: String,
        document: usize,
        attachment: usize,
    }
    let mut seen = HashSet::new();
    let mut drafts = Vec::new();
    for (d, doc) in documents.iter().enumerate() {
        for (a, att) in doc.attachments.iter().enumerate() {
            if att.url.is_none() && att.data.is_none() {
                continue;
            }
            let key = suffix_key(doc, att);
            if !seen.insert(key.clone()) {
                continue;
            }
            let ext = extension(att.content_type.as_deref());
            let mut title = title(doc, att);
            if let Some(ext) = &ext {
                // `report.pdf` titled, typed application/pdf: `report`, then `.pdf` once.
                let dotted = format!(".{ext}");
                if title.len() > dotted.len()
                    && title.is_char_boundary(title.len() - dotted.len())
                    && title[title.len() - dotted.len()..].eq_ignore_ascii_case(&dotted)
                {
                    title.truncate(title.len() - dotted.len());
                }
            }
            let base = match date(doc, att) {
                Some(date) => format!("{date} {title}"),
                None => title,
            };
            let subject = doc.subject.as_deref();
            let label = subject.and_then(|s| labels.get(subject_reference(s)));
            let folder = match label.map(|l| clean(l)).filter(|l| !l.is_empty()) {
                Some(label) => labelled_folder(&label, &folder_name(subject)),
                None => folder_name(subject),
            };
            drafts.push(Draft { folder, base, ext, key, document: d, attachment: a });
        }
    }
    // Each draft's name with suffixes of `digits[level]`; lengthened where two agree.
    let mut levels = vec![0usize; drafts.len()];
    loop {
        let names: Vec<String> = drafts
            .iter()
            .zip(&levels)
            .map(|(d, &level)| file_name(&d.base, &d.key, SUFFIX_DIGITS[level], d.ext.as_deref()))
            .collect();
        let mut groups: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            groups.entry((&drafts[i].folder, name)).or_default().push(i);
        }
        let mut lengthened = false;
        for members in groups.values().filter(|m| m.len() > 1) {
            for &i in members {
                if levels[i] + 1 < SUFFIX_DIGITS.len() {
                    levels[i] += 1;
                    lengthened = true;
                }
            }
        }
        if !lengthened {
            // What still clashes after 40 digits (a SHA-1 collision) keeps its first member.
            let mut used = HashSet::new();
            return drafts
                .into_iter()
                .zip(names)
                .filter(|(d, name)| used.insert((d.folder.clone(), name.clone())))
                .map(|(d, name)| Named {
                    folder: d.folder,
                    name,
                    document: d.document,
                    attachment: d.attachment,
                })
                .collect();
        }
    }
}

/// What the suffix is derived from: `Type/id#index`.
fn suffix_key(doc: &Document, att: &Attachment) -> String {
    format!("{}#{}", doc.reference(), att.index)
}

/// `<base> ~<suffix>.<ext>`, the base cut (at a character) so that the whole name fits in
/// [`MAX_NAME_BYTES`].
fn file_name(base: &str, key: &str, digits: usize, ext: Option<&str>) -> String {
    let hex = sha1_smol::Sha1::from(key).digest().to_string();
    let tail = match ext {
        Some(ext) => format!(" ~{}.{ext}", &hex[..digits]),
        None => format!(" ~{}", &hex[..digits]),
    };
    let room = MAX_NAME_BYTES.saturating_sub(tail.len());
    let mut base = clean(base);
    if base.len() > room {
        let mut cut = room;
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        base.truncate(cut);
        base = clean(&base);
    }
    format!("{base}{tail}")
}

/// The extension for a contentType (`application/pdf; x=y` → `pdf`), when one is known.
pub fn extension(content_type: Option<&str>) -> Option<String> {
    let essence = content_type?.split(';').next()?.trim().to_ascii_lowercase();
    mime2ext::mime2ext(&essence).map(str::to_owned)
}

/// The folder of a subject: `Patient/01a2` → `Patient-01a2` (an absolute reference by its
/// last two segments), cleaned; [`NO_SUBJECT`] without one.
pub fn folder_name(subject: Option<&str>) -> String {
    let Some(subject) = subject.map(str::trim).filter(|s| !s.is_empty()) else {
        return NO_SUBJECT.to_owned();
    };
    let mut name = clean(&subject_reference(subject).replace('/', "-"));
    // A reference is short (`Type/id`, an id of at most 64), but a contained or logical one
    // may be anything.
    if name.len() > MAX_NAME_BYTES {
        let mut cut = MAX_NAME_BYTES;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name = clean(&name);
    }
    if name.is_empty() { NO_SUBJECT.to_owned() } else { name }
}

/// `<label> (<folder>)`, the label cut (at a character) to fit [`MAX_NAME_BYTES`].
fn labelled_folder(label: &str, folder: &str) -> String {
    let tail = format!(" ({folder})");
    let mut label = label.to_owned();
    let mut room = MAX_NAME_BYTES.saturating_sub(tail.len()).min(label.len());
    while !label.is_char_boundary(room) {
        room -= 1;
    }
    label.truncate(room);
    let label = clean(&label);
    if label.is_empty() { folder.to_owned() } else { format!("{label}{tail}") }
}

/// A person's name as a folder label: the `text` of the first official (else usual, else
/// any) HumanName, else `family, given given`.
pub fn person_label(names: &serde_json::Value) -> Option<String> {
    let names = names.as_array()?;
    let by_use = |wanted: &str| names.iter().find(|n| n["use"].as_str() == Some(wanted));
    let name = by_use("official").or_else(|| by_use("usual")).or_else(|| names.first())?;
    if let Some(text) = name["text"].as_str().filter(|t| !t.trim().is_empty()) {
        return Some(text.trim().to_owned());
    }
    let family = name["family"].as_str().unwrap_or("").trim();
    let given: Vec<&str> =
        name["given"].as_array().into_iter().flatten().filter_map(|g| g.as_str()).collect();
    let given = given.join(" ");
    match (family.is_empty(), given.trim().is_empty()) {
        (true, true) => None,
        (false, true) => Some(family.to_owned()),
        (true, false) => Some(given.trim().to_owned()),
        (false, false) => Some(format!("{family}, {}", given.trim())),
    }
}

/// `Type/id` of a reference, relative or absolute (`https://h/fhir/Patient/1/_history/2` →
/// `Patient/1`); other forms (`#contained`, a URN) as given.
pub fn subject_reference(reference: &str) -> &str {
    let path = reference.split(['?', '#']).next().unwrap_or(reference);
    let path = match path.find("/_history/") {
        Some(at) => &path[..at],
        None => path,
    };
    let mut cuts = path.rmatch_indices('/');
    match (cuts.next(), cuts.next()) {
        (Some(_), Some((at, _))) if path.contains("://") || path.starts_with('/') => {
            &path[at + 1..]
        }
        _ if path.is_empty() => reference,
        _ => path,
    }
}

/// The day (UTC) of a document: its date, else the attachment's creation, else when the
/// resource was last updated.
fn date(doc: &Document, att: &Attachment) -> Option<String> {
    let from_text = |t: &Option<String>| t.as_deref().and_then(utc_day);
    from_text(&doc.date)
        .or_else(|| from_text(&att.creation))
        .or_else(|| doc.last_updated.map(|t| format_instant(t)[..10].to_owned()))
}

/// The UTC day of a FHIR dateTime: `2024-05-06T23:30:00-05:00` → `2024-05-07`. A date without
/// a time (`2024`, `2024-05`, `2024-05-06`) has no zone and stays as it is.
pub fn utc_day(text: &str) -> Option<String> {
    let text = text.trim();
    if text.contains('T') {
        let instant = parse_instant(text)?;
        return Some(format_instant(instant)[..10].to_owned());
    }
    let shape_ok = matches!(text.len(), 4 | 7 | 10)
        && text
            .char_indices()
            .all(|(i, c)| if i == 4 || i == 7 { c == '-' } else { c.is_ascii_digit() });
    shape_ok.then(|| text.to_owned())
}

/// The title of an attachment.
fn title(doc: &Document, att: &Attachment) -> String {
    let first = doc.doc_type.codings.first();
    let candidates = [
        att.title.as_deref(),
        doc.description.as_deref(),
        doc.doc_type.text.as_deref(),
        first.and_then(|c| c.display.as_deref()),
        first.and_then(|c| c.code.as_deref()),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(clean)
        .find(|t| !t.is_empty())
        .unwrap_or_else(|| doc.kind.as_str().to_owned())
}

/// A name part safe on every filesystem a backup may land on: no `/` or `\`, none of
/// `: * ? " < > |` (Windows, exFAT), no NUL or other control characters (turned into
/// spaces), runs of spaces as one, no leading dots (hidden files, `..`), and no trailing dots
/// or spaces (Windows drops them).
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = match c {
            '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c if c.is_control() || c.is_whitespace() => ' ',
            c => c,
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if c == '.' && out.is_empty() {
            continue;
        }
        out.push(c);
    }
    let kept = out.trim_end_matches(['.', ' ']).len();
    out.truncate(kept);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::documents::{Coding, Concept, DocKind};
    use std::time::{Duration, UNIX_EPOCH};

    /// The names without labels.
    fn name_files(documents: &[Document]) -> Vec<Named> {
        name_files_labelled(documents, &HashMap::new())
    }

    fn doc(id: &str, date: Option<&str>, title: Option<&str>) -> Document {
        Document {
            kind: DocKind::DocumentReference,
            id: id.to_owned(),
            version_id: Some("1".into()),
            last_updated: Some(UNIX_EPOCH + Duration::from_secs(1_715_000_000)),
            subject: Some("Patient/p1".into()),
            date: date.map(str::to_owned),
            description: None,
            doc_type: Concept::default(),
            attachments: vec![Attachment {
                index: 0,
                content_type: Some("application/pdf".into()),
                url: Some(format!("Binary/{id}")),
                title: title.map(str::to_owned),
                ..Attachment::default()
            }],
        }
    }

    fn names(docs: &[Document]) -> Vec<String> {
        name_files(docs).into_iter().map(|n| n.name).collect()
    }

    fn suffix(key: &str) -> String {
        sha1_smol::Sha1::from(key).digest().to_string()[..8].to_owned()
    }

    #[test]
    fn a_name_is_date_title_suffix_and_extension() {
        let d = doc("d1", Some("2024-05-06T10:00:00Z"), Some("Discharge summary"));
        let s = suffix("DocumentReference/d1#0");
        assert_eq!(names(&[d]), [format!("2024-05-06 Discharge summary ~{s}.pdf")]);
    }

    #[test]
    fn dates_are_utc_days_with_fallbacks() {
        assert_eq!(utc_day("2024-05-06T23:30:00-05:00").as_deref(), Some("2024-05-07"));
        assert_eq!(utc_day("2024-05-07T01:00:00+02:00").as_deref(), Some("2024-05-06"));
        assert_eq!(utc_day("2024-05-06").as_deref(), Some("2024-05-06"));
        assert_eq!(utc_day("2024-05").as_deref(), Some("2024-05"));
        assert_eq!(utc_day("2024").as_deref(), Some("2024"));
        for bad in ["yesterday", "2024-5-6", "20240506", "2024-05-06T25:00:00Z", ""] {
            assert_eq!(utc_day(bad), None, "{bad}");
        }
        // No date: the attachment's creation, then meta.lastUpdated (2024-05-06T12:53:20Z).
        let mut d = doc("d1", None, Some("t"));
        d.attachments[0].creation = Some("2023-01-02".into());
        assert!(names(std::slice::from_ref(&d))[0].starts_with("2023-01-02 t ~"));
        d.attachments[0].creation = Some("garbage".into());
        assert!(names(std::slice::from_ref(&d))[0].starts_with("2024-05-06 t ~"));
        d.last_updated = None;
        assert!(names(&[d])[0].starts_with("t ~"));
    }

    #[test]
    fn titles_fall_back_through_description_and_type() {
        let mut d = doc("d1", Some("2024-05-06"), None);
        d.doc_type = Concept {
            text: None,
            codings: vec![Coding { code: Some("18842-5".into()), ..Coding::default() }],
        };
        let title = |d: &Document| {
            let name = &names(std::slice::from_ref(d))[0];
            name["2024-05-06 ".len()..name.rfind(" ~").unwrap()].to_owned()
        };
        assert_eq!(title(&d), "18842-5");
        d.doc_type.codings[0].display = Some("Discharge summary".into());
        assert_eq!(title(&d), "Discharge summary");
        d.doc_type.text = Some("Summary".into());
        assert_eq!(title(&d), "Summary");
        d.description = Some("Stay in ward 3".into());
        assert_eq!(title(&d), "Stay in ward 3");
        d.attachments[0].title = Some("  ".into());
        assert_eq!(title(&d), "Stay in ward 3", "a blank title is no title");
        d.attachments[0].title = Some("letter.PDF".into());
        assert_eq!(title(&d), "letter", "the extension is not repeated");
        let mut bare = doc("d2", Some("2024-05-06"), None);
        bare.kind = DocKind::DiagnosticReport;
        assert_eq!(title(&bare), "DiagnosticReport");
    }

    #[test]
    fn extensions_come_from_the_content_type() {
        assert_eq!(extension(Some("application/pdf")).as_deref(), Some("pdf"));
        assert_eq!(extension(Some("Text/Plain; charset=utf-8")).as_deref(), Some("txt"));
        assert_eq!(extension(Some("application/x-unknown-thing")), None);
        assert_eq!(extension(None), None);
        let mut d = doc("d1", Some("2024-05-06"), Some("x"));
        d.attachments[0].content_type = None;
        assert_eq!(names(&[d]), [format!("2024-05-06 x ~{}", suffix("DocumentReference/d1#0"))]);
    }

    #[test]
    fn names_are_cleaned_for_every_filesystem() {
        assert_eq!(clean("a/b\\c:d*e?f\"g<h>i|j"), "a_b_c_d_e_f_g_h_i_j");
        assert_eq!(clean("a\0b\nc\td\u{7f}e"), "a b c d e");
        assert_eq!(clean("..hidden"), "hidden");
        assert_eq!(clean(" . x .. . "), "x");
        assert_eq!(clean("Report..."), "Report");
        assert_eq!(clean("a   b"), "a b");
        assert_eq!(clean("../../etc/passwd"), "_.._etc_passwd");
        let long = "é".repeat(300);
        let d = doc("d1", Some("2024-05-06"), Some(&long));
        let name = &names(&[d])[0];
        assert!(name.len() <= MAX_NAME_BYTES, "{}", name.len());
        assert!(name.ends_with(&format!(" ~{}.pdf", suffix("DocumentReference/d1#0"))));
        let mut trailing =
            doc("d1", Some("2024-05-06"), Some(&format!("{}. xyz", "a".repeat(233))));
        trailing.attachments[0].content_type = None;
        let name = &names(&[trailing])[0];
        assert!(!name.contains(". ~"), "no trailing dot before the suffix after a cut: {name}");
        for name in names(&[doc("d\u{1}", None, Some("\u{0}/"))]) {
            assert!(!name.contains(['/', '\0', '\u{1}']));
        }
    }

    #[test]
    fn folders_are_subjects() {
        assert_eq!(folder_name(Some("Patient/01a2")), "Patient-01a2");
        assert_eq!(folder_name(Some("https://h/fhir/Patient/7/_history/2")), "Patient-7");
        assert_eq!(folder_name(Some("Group/g")), "Group-g");
        assert_eq!(folder_name(Some("#contained")), "#contained");
        assert_eq!(folder_name(Some("..")), NO_SUBJECT);
        assert_eq!(folder_name(None), NO_SUBJECT);
        let long = format!("#{}", "ü".repeat(200));
        assert!(folder_name(Some(&long)).len() <= MAX_NAME_BYTES);
        assert_eq!(subject_reference("Patient/1"), "Patient/1");
        assert_eq!(subject_reference("http://x/fhir/Patient/1"), "Patient/1");
    }

    #[test]
    fn patient_labels_name_folders_and_keep_the_subject() {
        let d = doc("d1", Some("2024-05-06"), Some("t"));
        let mut labels = HashMap::new();
        labels.insert("Patient/p1".to_owned(), "Doe, Jane/Q".to_owned());
        let named = name_files_labelled(std::slice::from_ref(&d), &labels);
        assert_eq!(named[0].folder, "Doe, Jane_Q (Patient-p1)");
        assert_eq!(
            named[0].name,
            name_files(std::slice::from_ref(&d))[0].name,
            "file names do not change"
        );
        labels.insert("Patient/p1".to_owned(), "x".repeat(400));
        let named = name_files_labelled(std::slice::from_ref(&d), &labels);
        assert!(
            named[0].folder.len() <= MAX_NAME_BYTES && named[0].folder.ends_with(" (Patient-p1)")
        );
        labels.insert("Patient/p1".to_owned(), " .. ".to_owned());
        assert_eq!(name_files_labelled(&[d], &labels)[0].folder, "Patient-p1");
        let names = serde_json::json!([
            {"use": "old", "family": "Old"},
            {"use": "official", "family": "Doe", "given": ["Jane", "Q"]}
        ]);
        assert_eq!(person_label(&names).as_deref(), Some("Doe, Jane Q"));
        let text = serde_json::json!([{"text": "Dr. Jane Doe", "family": "Doe"}]);
        assert_eq!(person_label(&text).as_deref(), Some("Dr. Jane Doe"));
        assert_eq!(person_label(&serde_json::json!([{"given": ["Jo"]}])).as_deref(), Some("Jo"));
        assert_eq!(person_label(&serde_json::json!([{}])), None);
        assert_eq!(person_label(&serde_json::json!("x")), None);
    }

    #[test]
    fn clashing_titles_stay_apart_and_attachments_have_their_own_names() {
        let a = doc("a", Some("2024-05-06"), Some("Note"));
        let b = doc("b", Some("2024-05-06"), Some("Note"));
        let mut many = doc("m", Some("2024-05-06"), Some("Note"));
        many.attachments.push(Attachment { index: 3, ..many.attachments[0].clone() });
        let all = names(&[a, b, many]);
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), 4, "{all:?}");
        assert!(all.contains(&format!("2024-05-06 Note ~{}.pdf", suffix("DocumentReference/m#3"))));
    }

    #[test]
    fn names_do_not_change_when_other_documents_appear_or_go() {
        let first = doc("a", Some("2024-05-06"), Some("Note"));
        let alone = name_files(std::slice::from_ref(&first));
        // A clashing document appears, listed before it, and others after.
        let earlier = doc("0", Some("2024-05-06"), Some("Note"));
        let other = doc("z", Some("2024-05-07"), Some("Other"));
        let crowd = [earlier.clone(), first.clone(), other.clone()];
        let named = name_files(&crowd);
        let of_first = named.iter().find(|n| n.document == 1).unwrap();
        assert_eq!(of_first.name, alone[0].name);
        // And in another order (a remount, a server that pages differently).
        let again = name_files(&[other, first, earlier]);
        let names_of = |v: &[Named], docs: &[&str]| -> Vec<String> {
            let mut v: Vec<_> =
                v.iter().map(|n| format!("{}:{}", docs[n.document], n.name)).collect();
            v.sort();
            v
        };
        assert_eq!(names_of(&named, &["0", "a", "z"]), names_of(&again, &["z", "a", "0"]));
    }

    #[test]
    fn attachments_without_content_and_repeated_documents_are_left_out() {
        let mut d = doc("d", Some("2024-05-06"), Some("t"));
        d.attachments[0].url = None;
        assert!(name_files(&[d]).is_empty());
        let d = doc("d", Some("2024-05-06"), Some("t"));
        assert_eq!(name_files(&[d.clone(), d]).len(), 1);
    }

    #[test]
    fn agreeing_suffixes_are_lengthened() {
        // Force the rare case: two keys whose names agree at 8 digits cannot be found
        // quickly, so check the mechanism on file_name directly.
        let short = file_name("x", "DocumentReference/a#0", 8, Some("pdf"));
        let long = file_name("x", "DocumentReference/a#0", 16, Some("pdf"));
        assert!(long.len() == short.len() + 8 && long.starts_with(&short[..short.len() - 4]));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Whatever the titles, dates, types and subjects: every name fits, is clean, and is
        /// unique within its folder; and each document's name is the same alone and in the
        /// crowd.
        #[test]
        fn any_documents_get_clean_unique_stable_names(
            docs in proptest::collection::vec(
                ("[a-c]{1,2}", proptest::option::of(".{0,300}"), proptest::option::of(".{0,30}"),
                 proptest::option::of("[a-z/]{0,10}"), proptest::option::of(".{0,40}")),
                0..12)
        ) {
            let docs: Vec<Document> = docs
                .into_iter()
                .map(|(id, title, date, subject, kind)| {
                    let mut d = doc(&id, date.as_deref(), title.as_deref());
                    d.subject = subject;
                    d.attachments[0].content_type = kind;
                    d
                })
                .collect();
            let named = name_files(&docs);
            let mut seen = HashSet::new();
            for n in &named {
                proptest::prop_assert!(n.name.len() <= MAX_NAME_BYTES && !n.name.is_empty());
                for part in [&n.name, &n.folder] {
                    proptest::prop_assert!(!part.contains(|c: char| c == '/' || c.is_control()));
                    proptest::prop_assert!(!part.ends_with(['.', ' ']) && !part.starts_with('.'));
                }
                proptest::prop_assert!(seen.insert((n.folder.clone(), n.name.clone())));
                let alone = name_files(std::slice::from_ref(&docs[n.document]));
                proptest::prop_assert_eq!(&alone[0].name, &n.name);
            }
        }
    }
}
