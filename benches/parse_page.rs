//! Reading a search page: fhirfs's Bundle parser against serde_json skipping the same page
//! (the least any JSON reader does with it), in the same run.
//!
//! `cargo bench --bench parse_page`: a page of 1,000 Binaries as a server sends them for a
//! listing (`_elements=id,meta,contentType`, about 340 bytes an entry), read 50 times per
//! trial; the median of 15 trials, with the range, and the ratio of the medians.

use std::hint::black_box;
use std::time::Instant;

const ENTRIES: usize = 1000;
const READS: usize = 50;
const TRIALS: usize = 15;

/// A searchset page as bench_server and HAPI shape it: links first, then the entries.
fn page() -> String {
    let base = "http://127.0.0.1:8080/fhir";
    let mut body = format!(
        r#"{{"link":[{{"relation":"self","url":"{base}/Binary?_cursor=a"}},{{"relation":"next","url":"{base}/Binary?_cursor=b"}}],"resourceType":"Bundle","total":1000000,"type":"searchset","entry":["#
    );
    for i in 0..ENTRIES {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#"{{"fullUrl":"{base}/Binary/f{i:06}","resource":{{"contentType":"application/octet-stream","id":"f{i:06}","meta":{{"lastUpdated":"2026-12-06T10:21:18.000Z","tag":[{{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}}],"versionId":"1"}},"resourceType":"Binary"}},"search":{{"mode":"match"}}}}"#
        ));
    }
    body.push_str("]}");
    body
}

/// Nanoseconds per entry of `read`, one per trial, sorted.
fn trials(mut read: impl FnMut()) -> Vec<f64> {
    read();
    let mut per_entry: Vec<f64> = (0..TRIALS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..READS {
                read();
            }
            start.elapsed().as_nanos() as f64 / (READS * ENTRIES) as f64
        })
        .collect();
    per_entry.sort_by(f64::total_cmp);
    per_entry
}

fn main() {
    let body = page();
    let fhirfs = trials(|| {
        let page = fhirfs::parse_bundle(body.as_bytes()).expect("the page parses");
        assert_eq!(page.entries.len(), ENTRIES);
        black_box(page);
    });
    let skip = trials(|| {
        black_box(serde_json::from_slice::<serde::de::IgnoredAny>(body.as_bytes()).unwrap());
    });
    let show = |t: &[f64]| format!("{:.0} ns ({:.0}-{:.0})", t[TRIALS / 2], t[0], t[TRIALS - 1]);
    println!("| reading a page of {ENTRIES} Binaries, per entry | median (range) |");
    println!("|---|---|");
    println!("| fhirfs::parse_bundle | {} |", show(&fhirfs));
    println!("| serde_json skipping it (baseline) | {} |", show(&skip));
    println!("| ratio | {:.2} |", fhirfs[TRIALS / 2] / skip[TRIALS / 2]);
}
