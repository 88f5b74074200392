//! Real mounts over a misbehaving loopback server: what the daemon should do when the server
//! hangs, throttles, fails, or sends bodies that are broken. One test per behaviour; those the
//! daemon does not have yet are `#[ignore = "needs: ..."]` and fail when run with `--ignored`.
//!
//! The behaviours come from the hardening issue: retry 429, 502, 503, 504 and connection
//! errors with capped exponential backoff and jitter inside the deadline; honour Retry-After in
//! seconds or as an HTTP date; never retry any other 4xx (nor 500); a failed fetch is not
//! cached; only 404 is cached negatively, briefly; each bad body gets EIO and one log line
//! naming the id and the reason; the daemon stays up.

mod common;

use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{Mount, PATIENCE, Server, errno, is_mounted};
use fhirfs_testserver::loopback::{Fault, Quirks, RandomFaults, RawAnswer, SearchFault};
use fhirfs_testserver::noise;

/// Extra time allowed past a deadline for scheduling, the kernel and a loaded machine.
const SLACK: Duration = Duration::from_millis(2500);

/// How long a Binary put after a 404 may stay invisible ("cached negatively, briefly").
const NEGATIVE_TTL_LIMIT: Duration = Duration::from_secs(10);

/// Reads a whole file; the errno on failure.
fn read(path: impl Into<PathBuf>) -> Result<Vec<u8>, i32> {
    std::fs::read(path.into()).map_err(errno)
}

/// Stats a file; its size, or the errno on failure.
fn stat(path: impl Into<PathBuf>) -> Result<u64, i32> {
    std::fs::metadata(path.into()).map(|m| m.len()).map_err(errno)
}

/// Runs `f` and measures it.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let value = f();
    (value, started.elapsed())
}

/// Lines the daemon logged at WARN or ERROR that mention `needle`.
fn complaints(mount: &Mount, needle: &str) -> Vec<String> {
    mount
        .log()
        .lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The daemon is still mounted, has not panicked, and serves a good file.
fn assert_still_serving(server: &Server, mount: &Mount, good: &str) {
    assert!(is_mounted(&mount.mountpoint), "{}", mount.log());
    assert!(!mount.log().contains("panicked"), "{}", mount.log());
    let expected = server.server.stored(good).expect("good file stored").bytes;
    assert_eq!(read(mount.path(good)).as_deref(), Ok(&expected[..]), "{}", mount.log());
}

/// A mount with `--timeout secs`.
fn mount_with_timeout(server: &Server, secs: u32) -> Mount {
    Mount::builder().arg("--timeout").arg(&secs.to_string()).mount(&server.base_url())
}

// --- Deadlines -------------------------------------------------------------------------------

#[test]
fn a_hung_fetch_fails_with_eio_at_the_deadline_while_other_files_work() {
    let server = Server::start();
    for id in ["hung", "fine", "other"] {
        server.server.put(id, "text/plain", format!("{id} bytes"));
    }
    server.server.set_fault("hung", Some(Fault::Hang));
    let mount = mount_with_timeout(&server, 2);

    let hung_path = mount.path("hung");
    let hung = thread::spawn(move || timed(|| read(hung_path)));
    server.wait_for_reads("hung", 1);

    // While `hung` waits for its deadline, the folder and the other files answer.
    let (tx, rx) = mpsc::channel();
    let (root, fine, other) = (mount.mountpoint.clone(), mount.path("fine"), mount.path("other"));
    thread::spawn(move || {
        let listing = std::fs::read_dir(&root).map(|d| d.count());
        let _ = tx.send((listing.map_err(errno), stat(&fine), read(&other)));
    });
    let (listing, fine, other) =
        rx.recv_timeout(PATIENCE).expect("other operations stalled behind the hung fetch");
    assert!(!hung.is_finished(), "the hung read ended before the others");
    assert_eq!(listing, Ok(3));
    assert_eq!(fine, Ok(10));
    assert_eq!(other.as_deref(), Ok(&b"other bytes"[..]));

    let (result, elapsed) = hung.join().unwrap();
    assert_eq!(result, Err(libc::EIO), "{}", mount.log());
    assert!(elapsed >= Duration::from_millis(1500), "gave up before the deadline: {elapsed:?}");
    assert!(elapsed <= Duration::from_secs(2) + SLACK, "the 2 s deadline took {elapsed:?}");
    assert_still_serving(&server, &mount, "fine");
}

// --- Retries ---------------------------------------------------------------------------------

#[test]
fn a_503_twice_is_retried_to_success_with_three_gets() {
    let server = Server::start();
    server.server.put("flaky", "text/plain", "third time lucky");
    server.server.set_fault("flaky", Some(Fault::FailTimes { status: 503, times: 2 }));
    let mount = Mount::new(&server.base_url());
    assert_eq!(
        read(mount.path("flaky")).as_deref(),
        Ok(&b"third time lucky"[..]),
        "{}",
        mount.log()
    );
    assert_eq!(server.reads_of("flaky"), 3);
}

#[test]
fn statuses_502_504_and_429_are_retried_to_success() {
    let server = Server::start();
    let faults = [
        ("bad-gateway", Fault::FailTimes { status: 502, times: 1 }),
        ("gateway-timeout", Fault::FailTimes { status: 504, times: 1 }),
        ("throttled", Fault::RetryAfter { status: 429, retry_after: "0".into(), times: 1 }),
    ];
    for (id, fault) in faults {
        server.server.put(id, "text/plain", id);
        server.server.set_fault(id, Some(fault));
    }
    let mount = Mount::new(&server.base_url());
    for id in ["bad-gateway", "gateway-timeout", "throttled"] {
        assert_eq!(read(mount.path(id)).as_deref(), Ok(id.as_bytes()), "{id}");
        assert_eq!(server.reads_of(id), 2, "{id}");
    }
}

#[test]
fn retry_after_in_seconds_is_honoured() {
    let server = Server::start();
    server.server.put("busy", "text/plain", "patience");
    server.server.set_fault(
        "busy",
        Some(Fault::RetryAfter { status: 429, retry_after: "1".into(), times: 1 }),
    );
    let mount = Mount::new(&server.base_url());
    assert_eq!(read(mount.path("busy")).as_deref(), Ok(&b"patience"[..]));
    let arrivals = server.server.read_arrivals("busy");
    assert_eq!(arrivals.len(), 2);
    let gap = arrivals[1] - arrivals[0];
    assert!(gap >= Duration::from_millis(950), "retried {gap:?} after a Retry-After of 1 s");
}

#[test]
fn retry_after_as_an_http_date_is_honoured() {
    let server = Server::start();
    server.server.put("later", "text/plain", "on time");
    let (now, now_instant) = (SystemTime::now(), Instant::now());
    let date = httpdate::fmt_http_date(now + Duration::from_secs(2));
    // The date has whole seconds: the retry is due at the date itself, 1 to 2 s from now.
    let due = httpdate::parse_http_date(&date).unwrap();
    let due = now_instant + due.duration_since(now).unwrap_or_default();
    server
        .server
        .set_fault("later", Some(Fault::RetryAfter { status: 503, retry_after: date, times: 1 }));
    let mount = Mount::new(&server.base_url());
    assert_eq!(read(mount.path("later")).as_deref(), Ok(&b"on time"[..]));
    let arrivals = server.server.read_arrivals("later");
    assert_eq!(arrivals.len(), 2);
    assert!(
        arrivals[1] + Duration::from_millis(50) >= due,
        "retried {:?} before the Retry-After date",
        due - arrivals[1]
    );
}

#[test]
fn a_400_is_never_retried() {
    let server = Server::start();
    server.server.put("refused", "text/plain", "never");
    server.server.set_fault("refused", Some(Fault::FailTimes { status: 400, times: 1 }));
    let mount = Mount::new(&server.base_url());
    assert_eq!(read(mount.path("refused")), Err(libc::EIO));
    assert_eq!(server.reads_of("refused"), 1, "{}", mount.log());
}

#[test]
fn a_500_is_not_retried() {
    let server = Server::start();
    server.server.put("broken", "text/plain", "never");
    server.server.set_fault("broken", Some(Fault::FailTimes { status: 500, times: 1 }));
    let mount = Mount::new(&server.base_url());
    assert_eq!(read(mount.path("broken")), Err(libc::EIO));
    assert_eq!(server.reads_of("broken"), 1, "{}", mount.log());
}

#[test]
fn no_other_4xx_is_retried() {
    let server = Server::start();
    let cases = [
        (401, libc::EACCES),
        (403, libc::EACCES),
        (404, libc::ENOENT),
        (405, libc::EIO),
        (406, libc::EIO),
        (409, libc::EIO),
        (410, libc::ENOENT),
        (422, libc::EIO),
    ];
    // No listing: each read below is one fetch, with no size read-ahead beside it.
    server.server.set_search_status(Some(400));
    for (status, _) in cases {
        let id = format!("status-{status}");
        server.server.put(&id, "text/plain", "never");
        server.server.set_fault(&id, Some(Fault::FailTimes { status, times: 1 }));
    }
    // FHIR JSON only: a 406 to a raw request means "ask for JSON instead" (tests/quirks.rs).
    let mount = Mount::builder().args(&["--fetch", "json"]).mount(&server.base_url());
    for (status, expected) in cases {
        let id = format!("status-{status}");
        assert_eq!(read(mount.path(&id)), Err(expected), "{id}");
        assert_eq!(server.reads_of(&id), 1, "{id} was retried");
    }
}

#[test]
fn a_connection_reset_is_retried_to_success() {
    let server = Server::start();
    server.server.put("reset-once", "application/octet-stream", noise(50_000, 3));
    server.server.set_fault_times("reset-once", Fault::Reset, 1);
    let mount = Mount::new(&server.base_url());
    assert_eq!(read(mount.path("reset-once")), Ok(noise(50_000, 3)));
    assert_eq!(server.reads_of("reset-once"), 2);
}

#[test]
fn retries_back_off_and_stop_at_the_deadline() {
    let server = Server::start();
    server.server.put("unavailable", "text/plain", "never");
    server.server.set_fault("unavailable", Some(Fault::Status(503)));
    let mount = mount_with_timeout(&server, 2);
    let (result, elapsed) = timed(|| read(mount.path("unavailable")));
    assert_eq!(result, Err(libc::EIO));
    assert!(elapsed <= Duration::from_secs(2) + SLACK, "the 2 s deadline took {elapsed:?}");
    let gets = server.reads_of("unavailable");
    assert!(gets >= 2, "never retried in 2 s");
    assert!(gets <= 12, "{gets} GETs in 2 s is not backing off");
    assert_eq!(complaints(&mount, "unavailable").len(), 1, "{}", mount.log());
}

#[test]
fn a_retry_after_beyond_the_deadline_is_not_waited_for() {
    let server = Server::start();
    server.server.put("much-later", "text/plain", "never");
    server.server.set_fault(
        "much-later",
        Some(Fault::RetryAfter { status: 429, retry_after: "120".into(), times: 1 }),
    );
    let mount = mount_with_timeout(&server, 2);
    let (result, elapsed) = timed(|| read(mount.path("much-later")));
    assert_eq!(result, Err(libc::EIO));
    assert!(elapsed <= Duration::from_secs(2) + SLACK, "{elapsed:?}");
    assert_eq!(server.reads_of("much-later"), 1);
}

// --- What is cached after a failure ---------------------------------------------------------

#[test]
fn a_failed_fetch_is_not_cached() {
    let server = Server::start();
    server.server.put("recovers", "text/plain", "back again");
    server.server.set_fault("recovers", Some(Fault::Status(503)));
    let mount = mount_with_timeout(&server, 2);
    assert_eq!(read(mount.path("recovers")), Err(libc::EIO));
    server.server.set_fault("recovers", None);
    assert_eq!(stat(mount.path("recovers")), Ok(10));
    assert_eq!(read(mount.path("recovers")).as_deref(), Ok(&b"back again"[..]));
}

#[test]
fn a_404_is_cached_negatively() {
    let server = Server::start();
    let mount = Mount::new(&server.base_url());
    assert_eq!(stat(mount.path("not-yet")), Err(libc::ENOENT));
    assert_eq!(stat(mount.path("not-yet")), Err(libc::ENOENT));
    assert_eq!(read(mount.path("not-yet")), Err(libc::ENOENT));
    assert_eq!(server.reads_of("not-yet"), 1, "a repeated miss asked the server again");
}

#[test]
fn a_404_is_forgotten_soon() {
    let server = Server::start();
    let mount = Mount::new(&server.base_url());
    assert_eq!(stat(mount.path("arrives")), Err(libc::ENOENT));
    server.server.put("arrives", "text/plain", "here now");
    let deadline = Instant::now() + NEGATIVE_TTL_LIMIT;
    while stat(mount.path("arrives")).is_err() {
        assert!(
            Instant::now() < deadline,
            "still missing {NEGATIVE_TTL_LIMIT:?} after it was created"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(read(mount.path("arrives")).as_deref(), Ok(&b"here now"[..]));
}

#[test]
fn a_410_is_not_cached() {
    let server = Server::start();
    server.server.put("deleted", "text/plain", "x");
    server.server.delete("deleted");
    let mount = Mount::new(&server.base_url());
    assert_eq!(stat(mount.path("deleted")), Err(libc::ENOENT));
    assert_eq!(stat(mount.path("deleted")), Err(libc::ENOENT));
    assert_eq!(server.reads_of("deleted"), 2, "only 404 is cached negatively");
}

// --- The raw read after a FHIR JSON without `data` -------------------------------------------

/// The bytes stored behind each Binary below (never what an empty file shows).
const STORED_LEN: usize = 3000;

/// A Binary whose FHIR JSON has no `data` (as Medplum keeps raw uploads), and whose raw read
/// gets this answer; what its `stat` size and read must then be: the errno a first read would
/// get, or an empty file only where the server shows it has no native form.
const WITHOUT_DATA: [(&str, RawAnswer, Result<usize, i32>); 13] = [
    ("raw-500", RawAnswer::Status(500), Err(libc::EIO)),
    ("raw-503", RawAnswer::Status(503), Err(libc::EIO)),
    ("raw-400", RawAnswer::Status(400), Err(libc::EIO)),
    ("raw-401", RawAnswer::Status(401), Err(libc::EACCES)),
    ("raw-403", RawAnswer::Status(403), Err(libc::EACCES)),
    ("raw-410", RawAnswer::Status(410), Err(libc::ENOENT)),
    ("raw-reset", RawAnswer::Reset, Err(libc::EIO)),
    ("raw-hang", RawAnswer::Hang, Err(libc::EIO)),
    ("raw-404", RawAnswer::Status(404), Ok(0)),
    ("raw-406", RawAnswer::Status(406), Ok(0)),
    ("raw-415", RawAnswer::Status(415), Ok(0)),
    ("raw-json", RawAnswer::Json, Ok(0)),
    ("raw-works", RawAnswer::Content, Ok(STORED_LEN)),
];

/// The `--timeout` of these mounts: what a hung raw read costs each stat and each read.
const WITHOUT_DATA_TIMEOUT: Duration = Duration::from_secs(2);

/// Each case of [`WITHOUT_DATA`] through a mount with `--fetch mode` over a server with
/// `quirks`: stat, then read, each in its own thread (the hung ones take the deadline).
fn without_data_reads_as_listed(mode: &str, quirks: Quirks) {
    let server = Server::start();
    server.server.set_quirks(quirks);
    server.server.set_throttle(None);
    // No listing: each stat or read of a cold file is one fetch of that file alone.
    server.server.set_search_status(Some(400));
    server.server.put("plain", "text/plain", "plain bytes");
    for (i, (id, raw, _)) in WITHOUT_DATA.iter().enumerate() {
        server.server.put(id, "application/pdf", noise(STORED_LEN, i as u64 + 60));
        server.server.set_fault(id, Some(Fault::WithoutData(*raw)));
    }
    let timeout = WITHOUT_DATA_TIMEOUT.as_secs().to_string();
    let mount =
        Mount::builder().args(&["--fetch", mode, "--timeout", &timeout]).mount(&server.base_url());
    // In `auto` mode, Microsoft's FHIR JSON answer to this first read moves the mount to JSON.
    assert_eq!(read(mount.path("plain")).as_deref(), Ok(&b"plain bytes"[..]), "{mode}");

    let runs: Vec<_> = WITHOUT_DATA
        .iter()
        .map(|&(id, _, _)| {
            let path = mount.path(id);
            thread::spawn(move || {
                let (size, stat_took) = timed(|| stat(&path));
                let (bytes, read_took) = timed(|| read(&path));
                (size, bytes, stat_took.max(read_took))
            })
        })
        .collect();
    // Every case is checked before the test fails, so that one run shows all that is wrong.
    let mut wrong = Vec::new();
    for (run, (i, &(id, raw, expected))) in runs.into_iter().zip(WITHOUT_DATA.iter().enumerate()) {
        let (size, bytes, slowest) = run.join().unwrap();
        let mut check = |ok: bool, what: String| {
            if !ok {
                wrong.push(format!("{id} ({raw:?}): {what}"));
            }
        };
        let want_size = expected.map(|len| len as u64);
        check(size == want_size, format!("stat gave {size:?}, not {want_size:?}"));
        // The stored bytes, or none (an empty file).
        let stored = noise(STORED_LEN, i as u64 + 60);
        let want = expected.map(|len| &stored[..len]);
        let got = bytes.as_deref().map_err(|&e| e);
        check(got == want, format!("read gave {:?} bytes, not {expected:?}", got.map(<[u8]>::len)));
        check(slowest <= WITHOUT_DATA_TIMEOUT + SLACK, format!("took {slowest:?}"));
        // One FHIR JSON read and one raw read per fetch (more where retried). A failure is not
        // kept: the read after the failed stat fetches again.
        let reads = server.reads_of(id);
        let (ok, want) = match raw {
            RawAnswer::Status(503) | RawAnswer::Reset => (reads >= 6, "6 or more (retried)"),
            _ if expected.is_err() => (reads == 4, "4 (a fetch for the stat, one for the read)"),
            _ => (reads == 2, "2 (one fetch for the stat and the read)"),
        };
        check(ok, format!("{reads} GETs, not {want}"));
    }
    assert!(wrong.is_empty(), "--fetch {mode}:\n{}\n{}", wrong.join("\n"), mount.log());

    // A failure is reported, and `cp` copies no empty file in its place.
    assert_eq!(complaints(&mount, "raw-500").len(), 2, "{}", mount.log());
    let dest = mount.dir.path().join("copy-of-raw-500");
    let cp = std::process::Command::new("cp").arg(mount.path("raw-500")).arg(&dest).output();
    assert!(!cp.unwrap().status.success(), "cp of an unreadable file succeeded");
    assert!(!dest.exists(), "cp left a file behind");

    // The next open after a failure asks again, and gets the bytes once the raw read works.
    server.server.set_fault("raw-500", Some(Fault::WithoutData(RawAnswer::Content)));
    let stored = noise(STORED_LEN, 60);
    assert!(read(mount.path("raw-500")) == Ok(stored), "{mode}: raw-500 once mended");
    assert_still_serving(&server, &mount, "plain");
}

#[test]
fn json_mode_gives_a_json_without_data_the_errno_of_its_raw_read() {
    without_data_reads_as_listed("json", Quirks::Standard);
}

#[test]
fn auto_mode_on_a_json_only_server_gives_a_json_without_data_the_errno_of_its_raw_read() {
    without_data_reads_as_listed("auto", Quirks::Microsoft);
}

// --- Bad bodies ------------------------------------------------------------------------------

/// Reads `id` (which answers with `fault`) through a mount: EIO, one WARN/ERROR line naming
/// the id (and mentioning `reason`, when given), and a good file still served.
fn bad_body_is_eio_and_logged_once(fault: Fault, reason: Option<&str>) {
    let server = Server::start();
    server.server.put("good-file", "text/plain", "still fine");
    server.server.put("bad-body", "application/octet-stream", noise(20_000, 9));
    server.server.set_fault("bad-body", Some(fault));
    // A short deadline bounds the retries of broken connections.
    let mount = mount_with_timeout(&server, 3);
    assert_eq!(read(mount.path("bad-body")), Err(libc::EIO), "{}", mount.log());
    let lines = complaints(&mount, "bad-body");
    assert_eq!(lines.len(), 1, "one line naming the id: {lines:#?}");
    if let Some(reason) = reason {
        assert!(
            lines[0].to_lowercase().contains(reason),
            "the line names the reason ({reason}): {}",
            lines[0]
        );
    }
    assert_still_serving(&server, &mount, "good-file");
}

fn json_body(body: &'static str) -> Fault {
    Fault::Body {
        content_type: "application/fhir+json".into(),
        body: Bytes::from_static(body.as_bytes()),
    }
}

#[test]
fn malformed_json_is_eio_and_logged_once() {
    bad_body_is_eio_and_logged_once(json_body("this is { not json"), Some("json"));
}

#[test]
fn cut_json_is_eio_and_logged_once() {
    let cut = r#"{"resourceType":"Binary","contentType":"text/plain","data":"aGVsbG8gd29y"#;
    bad_body_is_eio_and_logged_once(json_body(cut), Some("json"));
}

#[test]
fn a_wrong_resource_type_is_eio_and_logged_once() {
    let patient = r#"{"resourceType":"Patient","id":"bad-body"}"#;
    bad_body_is_eio_and_logged_once(json_body(patient), Some("patient"));
}

#[test]
fn bad_base64_is_eio_and_logged_once() {
    let binary = r#"{"resourceType":"Binary","contentType":"text/plain","data":"@@not base64@@"}"#;
    bad_body_is_eio_and_logged_once(json_body(binary), Some("base64"));
}

#[test]
fn a_body_shorter_than_its_content_length_is_eio_and_logged_once() {
    bad_body_is_eio_and_logged_once(Fault::Truncated, None);
}

#[test]
fn a_connection_reset_mid_body_is_eio_and_logged_once() {
    bad_body_is_eio_and_logged_once(Fault::Reset, None);
}

/// A large FHIR JSON body cut short, on every try: each try's decoder is
/// dropped halfway (12 MiB decoded), while a helper thread waits to fault the rest of its new
/// 24 MiB buffer in. The read is EIO, not a hang or a crash, and once the server mends, the
/// next read has the right bytes.
#[test]
fn a_large_json_body_cut_short_is_eio_and_the_next_read_is_right() {
    let server = Server::start();
    let content = noise(24 << 20, 11);
    server.server.put("big", "application/dicom", content.clone());
    server.server.set_fault("big", Some(Fault::Truncated));
    // The deadline leaves room for a 32 MiB JSON decode in a debug build on a loaded machine
    // (scripts/repeat-tests saw 5 s run out for the read after the fault); the cut reads end
    // when their retries do, well before it.
    let mount =
        Mount::builder().args(&["--fetch", "json", "--timeout", "15"]).mount(&server.base_url());
    let (tx, rx) = mpsc::channel();
    let path = mount.path("big");
    thread::spawn(move || tx.send(read(path).map(|b| b.len())));
    let cut = rx.recv_timeout(PATIENCE).expect("the read of a cut body hung");
    assert_eq!(cut, Err(libc::EIO), "{}", mount.log());
    server.server.set_fault("big", None);
    let again = read(mount.path("big"));
    let again_len = again.as_ref().map(Vec::len);
    assert!(again.as_deref() == Ok(&content[..]), "wrong bytes: {again_len:?}\n{}", mount.log());
}

// --- Bad listings ----------------------------------------------------------------------------

/// With `fault` on every search: `ls` fails with EIO and is logged once, and lookups by id
/// still work.
fn bad_listing_is_eio_and_lookups_work(fault: SearchFault) {
    let server = Server::start();
    server.server.put("good-file", "text/plain", "still fine");
    server.server.put("other-file", "text/plain", "also fine");
    server.server.set_page_cap(1);
    server.server.set_search_fault(Some(fault));
    let mount = mount_with_timeout(&server, 3);
    let before = complaints(&mount, "listing failed").len();
    // At the opendir, or (a search that fails after some pages) at the readdir past them.
    let listing = std::fs::read_dir(&mount.mountpoint)
        .and_then(|entries| entries.collect::<Result<Vec<_>, _>>().map(|e| e.len()));
    assert_eq!(listing.map_err(errno), Err(libc::EIO), "{}", mount.log());
    let lines = complaints(&mount, "listing failed").len() - before;
    assert_eq!(lines, 1, "one line for one failed listing:\n{}", mount.log());
    assert_still_serving(&server, &mount, "good-file");
    assert_still_serving(&server, &mount, "other-file");
}

#[test]
fn a_listing_that_is_another_resource_is_eio() {
    bad_listing_is_eio_and_lookups_work(SearchFault::NotBundle);
}

#[test]
fn a_listing_that_is_an_html_page_is_eio() {
    bad_listing_is_eio_and_lookups_work(SearchFault::Html);
}

#[test]
fn a_listing_whose_next_link_loops_is_eio_and_stops() {
    bad_listing_is_eio_and_lookups_work(SearchFault::LoopingNext);
}

#[test]
fn a_looping_listing_is_not_followed_forever() {
    let server = Server::start();
    for i in 0..5 {
        server.server.put(&format!("f{i}"), "text/plain", "x");
    }
    server.server.set_page_cap(2);
    server.server.set_search_fault(Some(SearchFault::LoopingNext));
    let mount = Mount::new(&server.base_url());
    let _ = std::fs::read_dir(&mount.mountpoint).map(|d| d.count());
    // 3 pages, then the link back to the first one: at most one page more.
    let searches = server.server.counts().searches;
    assert!(searches <= 4, "{searches} searches for 3 pages");
}

#[test]
fn non_binary_entries_in_a_listing_are_skipped() {
    // Decision: a Bundle that mixes in Patient and OperationOutcome entries is still a
    // listing; its Binaries are listed, the rest is left out.
    let server = Server::start();
    for i in 0..5 {
        server.server.put(&format!("bin-{i}"), "text/plain", format!("binary {i}"));
    }
    server.server.set_page_cap(2);
    server.server.set_search_fault(Some(SearchFault::NonBinaryEntries));
    let mount = Mount::new(&server.base_url());
    let mut names: Vec<String> = std::fs::read_dir(&mount.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, server.server.ids());
    for i in 0..5 {
        let id = format!("bin-{i}");
        assert_eq!(read(mount.path(&id)), Ok(format!("binary {i}").into_bytes()));
    }
    assert_eq!(stat(mount.path("p-1")), Err(libc::ENOENT), "no Patient file");
}

// --- Limits ----------------------------------------------------------------------------------

#[test]
fn a_binary_over_max_size_is_efbig() {
    let server = Server::start();
    server.server.put("two-mib", "application/octet-stream", noise(2 << 20, 1));
    server.server.put("one-mib", "application/octet-stream", noise(1 << 20, 2));
    let mount = Mount::builder().arg("--max-size").arg("1MiB").mount(&server.base_url());
    assert_eq!(stat(mount.path("two-mib")), Err(libc::EFBIG));
    assert_eq!(read(mount.path("two-mib")), Err(libc::EFBIG));
    assert_eq!(stat(mount.path("one-mib")), Ok(1 << 20), "the limit itself is allowed");
    assert_eq!(read(mount.path("one-mib")), Ok(noise(1 << 20, 2)));
}

#[test]
fn a_chunked_raw_binary_over_max_size_is_efbig() {
    // Medplum sends raw uploads chunked, without a Content-Length to refuse early.
    let server = Server::start();
    server.server.set_quirks(Quirks::Medplum);
    server.server.put_raw("two-mib", "application/octet-stream", noise(2 << 20, 1));
    server.server.put("small", "text/plain", "small");
    let mount = Mount::builder().arg("--max-size").arg("1MiB").mount(&server.base_url());
    assert_eq!(read(mount.path("two-mib")), Err(libc::EFBIG));
    assert_still_serving(&server, &mount, "small");
}

// --- Soak ------------------------------------------------------------------------------------

/// Files of varied sizes for the soak tests.
fn soak_files(server: &Server) -> Vec<(String, Vec<u8>)> {
    (0..30)
        .map(|i| {
            let id = format!("soak-{i:02}");
            let bytes = noise(i * 997 % 70_000, i as u64 + 100);
            server.server.put(&id, "application/octet-stream", bytes.clone());
            (id, bytes)
        })
        .collect()
}

#[test]
fn random_faults_never_give_wrong_bytes_and_the_daemon_survives() {
    let server = Server::start();
    let files = soak_files(&server);
    let mount = mount_with_timeout(&server, 5);
    server.server.set_random_faults(Some(RandomFaults { probability: 0.3, seed: 2026 }));
    let mut failed = Vec::new();
    for (id, bytes) in &files {
        match read(mount.path(id)) {
            Ok(read) => assert!(read == *bytes, "wrong bytes for {id}"),
            Err(e) => {
                assert_eq!(e, libc::EIO, "{id}");
                failed.push(id);
            }
        }
    }
    server.server.set_random_faults(None);
    for id in failed {
        let expected = &files.iter().find(|(i, _)| i == id).unwrap().1;
        assert_eq!(read(mount.path(id)).as_ref(), Ok(expected), "{id} after the faults");
    }
    assert_still_serving(&server, &mount, "soak-00");
}

#[test]
fn random_faults_only_surface_as_eio_for_a_500() {
    let server = Server::start();
    let files = soak_files(&server);
    let mount = mount_with_timeout(&server, 10);
    server.server.set_random_faults(Some(RandomFaults { probability: 0.3, seed: 2026 }));
    let mut failed = 0;
    for (id, bytes) in &files {
        match read(mount.path(id)) {
            Ok(read) => assert!(read == *bytes, "wrong bytes for {id}"),
            Err(e) => {
                assert_eq!(e, libc::EIO, "{id}");
                failed += 1;
            }
        }
    }
    // Everything but a 500 is worth retrying, and 10 s is plenty for the retries.
    let answered_500 = server.server.counts().statuses.get(&500).copied().unwrap_or(0);
    assert!(
        failed <= answered_500,
        "{failed} reads failed, only {answered_500} got a 500\n{}",
        mount.log()
    );
}

/// A TCP front for the loopback server that can be switched off (connection refused, and
/// every open connection cut) and on again, on the same port.
struct Switch {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl Switch {
    fn start(server: &Server) -> Switch {
        let target =
            server.base_url().trim_start_matches("http://").split('/').next().unwrap().to_owned();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (up, mut watch) = tokio::sync::watch::channel(true);
        server.runtime.spawn(async move {
            loop {
                if watch.wait_for(|up| *up).await.is_err() {
                    return;
                }
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((mut inbound, _)) = accepted else { continue };
                            let target = target.clone();
                            connections.spawn(async move {
                                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                                }
                            });
                        }
                        changed = watch.changed() => {
                            if changed.is_err() || !*watch.borrow() {
                                break;
                            }
                        }
                    }
                }
                // Down: refuse new connections and cut the open ones.
                drop(listener);
                connections.abort_all();
            }
        });
        // Wait until the first listener is up.
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the switch did not start");
            thread::sleep(Duration::from_millis(5));
        }
        Switch { port, up }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
        // Wait until the port says so.
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() != up {
            assert!(Instant::now() < deadline, "the switch did not turn {up}");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn while_the_server_is_down_reads_fail_with_eio_and_work_again_once_it_is_back() {
    let server = Server::start();
    server.server.set_search_status(Some(400));
    for id in ["a", "b"] {
        server.server.put(id, "text/plain", id);
    }
    let switch = Switch::start(&server);
    let mount = Mount::builder()
        .args(&["--timeout", "10"])
        .mount(&format!("http://127.0.0.1:{}/fhir", switch.port));
    assert_eq!(read(mount.path("a")), Ok(b"a".to_vec()));

    switch.set(false);
    let started = Instant::now();
    assert_eq!(read(mount.path("b")), Err(libc::EIO));
    // Refused connections are retried a few times, not until the 10 s deadline.
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    assert_eq!(server.reads_of("b"), 0);

    switch.set(true);
    assert_eq!(read(mount.path("b")), Ok(b"b".to_vec()), "{}", mount.log());
    assert_eq!(read(mount.path("a")), Ok(b"a".to_vec()));
}
