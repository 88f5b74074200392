//! The systemd unit `systemd/fhirfs@.service` and its settings file `systemd/example.conf`:
//! `systemd-analyze verify` accepts the unit, it has what the service needs (notify, restart,
//! the token as a credential, hardening), it has nothing that would hide the mount from the
//! host (a private mount namespace), no token is in it, and the command line it builds is one
//! that fhirfs accepts.
//!
//! Needs `systemd-analyze` (Debian: `apt-get install -y systemd`), not a running systemd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = include_str!("../systemd/fhirfs@.service");
const EXAMPLE_CONF: &str = include_str!("../systemd/example.conf");

/// Where the unit expects the binary: where the Debian package installs it. (After `cargo
/// install --root /usr/local` the README installs the unit with this path changed.)
const INSTALLED_BINARY: &str = "/usr/bin/fhirfs";

/// Settings that give a unit its own mount namespace (systemd.exec(5); systemd's
/// `exec_needs_mount_namespace()`). In such a namespace every mount is made a slave first, so
/// the FUSE mount would never reach the host, and MountFlags=shared does not undo that.
/// PrivateUsers= is here because mount(2) fails in a user namespace, DynamicUser= because it
/// implies ProtectSystem= and PrivateTmp=.
const NAMESPACE_SETTINGS: &[&str] = &[
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateNetwork",
    "NetworkNamespacePath",
    "PrivateIPC",
    "IPCNamespacePath",
    "PrivatePIDs",
    "PrivateBPF",
    "PrivateUsers",
    "DynamicUser",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "RootDirectory",
    "RootImage",
    "RootEphemeral",
    "MountImages",
    "ExtensionImages",
    "ExtensionDirectories",
    "MountAPIVFS",
    "LogNamespace",
    "BindLogSockets",
];

/// One `Key=value` line of a unit file, with its section.
#[derive(Debug, Clone)]
struct Directive {
    section: String,
    key: String,
    value: String,
}

/// The directives of a unit file, in order (comments and blank lines skipped).
fn directives(text: &str) -> Vec<Directive> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        assert!(!line.ends_with('\\'), "line {}: keep directives on one line: {line}", n + 1);
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) =
            line.split_once('=').unwrap_or_else(|| panic!("line {}: not Key=value: {line}", n + 1));
        out.push(Directive {
            section: section.clone(),
            key: key.trim().to_owned(),
            value: value.trim().to_owned(),
        });
    }
    out
}

/// The values of `key` in `section`, in order.
fn values<'a>(directives: &'a [Directive], section: &str, key: &str) -> Vec<&'a str> {
    directives
        .iter()
        .filter(|d| d.section == section && d.key == key)
        .map(|d| d.value.as_str())
        .collect()
}

/// The one value of `key` in `section`.
fn value<'a>(directives: &'a [Directive], section: &str, key: &str) -> &'a str {
    match values(directives, section, key).as_slice() {
        [one] => one,
        other => panic!("expected exactly one {key}= in [{section}], found {other:?}"),
    }
}

/// `systemd-analyze`, or a failure that says how to get it.
fn systemd_analyze() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("systemd-analyze"))
        .find(|candidate| candidate.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "systemd-analyze is not installed, so the systemd unit cannot be checked. Install \
             the `systemd` package (Debian/Ubuntu: `apt-get install -y systemd`; it does not \
             need systemd to be running)."
        )
    })
}

/// The settings of an EnvironmentFile that uses only plain `KEY=value` lines.
fn environment_file(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not KEY=value: {line}"));
        assert!(
            !value.contains(['"', '\'', '\\', '$']),
            "keep the example's values plain (no quotes, escapes or $): {line}"
        );
        vars.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    vars
}

/// Expands an ExecStart= command line the way systemd does for lines without quotes: a word
/// that is exactly `$VAR` becomes the value split at whitespace (zero or more words);
/// `${VAR}` inside a word is replaced by the value, as part of that one word.
fn expand_command(line: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    assert!(!line.contains(['"', '\'', '\\']), "no quoting in the command line: {line}");
    let lookup = |name: &str| env.get(name).cloned().unwrap_or_default();
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
            argv.extend(lookup(name).split_whitespace().map(str::to_owned));
            continue;
        }
        let mut out = String::new();
        let mut rest = word;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find('}').expect("unclosed ${") + start;
            out.push_str(&lookup(&rest[start + 2..end]));
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        argv.push(out);
    }
    argv
}

/// Strips the `-@:+!` prefixes systemd allows before an Exec*= command.
fn command_line(value: &str) -> &str {
    value.trim_start_matches(['-', '@', ':', '+', '!'])
}

/// The names of the variables a command line refers to, as `$NAME` or `${NAME}` (`$$` is a
/// literal `$`, left to the shell).
fn referenced_variables(line: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = line;
    while let Some(dollar) = rest.find('$') {
        rest = &rest[dollar + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            rest = after;
            continue;
        }
        let braced = rest.starts_with('{');
        let body = rest.trim_start_matches('{');
        let len =
            body.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(body.len());
        names.push(body[..len].to_owned());
        rest = &body[len + usize::from(braced)..];
    }
    names
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let analyze = systemd_analyze();
    // systemd-analyze checks that ExecStart='s program exists: point it at the binary this
    // test run built, and change nothing else.
    let built = env!("CARGO_BIN_EXE_fhirfs");
    let exec_start = format!("ExecStart={INSTALLED_BINARY} ");
    assert_eq!(UNIT.matches(&exec_start).count(), 1, "ExecStart= runs {INSTALLED_BINARY}");
    let unit = UNIT.replace(&exec_start, &format!("ExecStart={built} "));

    let dir = tempfile::tempdir().unwrap();
    // Verified as an instance, so that %i is filled in as it will be.
    let path = dir.path().join("fhirfs@demo.service");
    std::fs::write(&path, unit).unwrap();
    let output = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", analyze.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "systemd-analyze verify failed ({}):\n{report}",
        output.status
    );
    // Unknown keys and unparsable values are only warnings (exit status 0): refuse them too.
    assert!(report.trim().is_empty(), "systemd-analyze verify complained:\n{report}");
}

#[test]
fn the_unit_is_a_notify_service_that_restarts_on_failure() {
    let d = directives(UNIT);
    assert_eq!(value(&d, "Service", "Type"), "notify");
    assert_eq!(value(&d, "Service", "NotifyAccess"), "main");
    assert_eq!(value(&d, "Service", "Restart"), "on-failure");
    assert_eq!(value(&d, "Service", "EnvironmentFile"), "/etc/fhirfs/%i.conf");
    assert!(values(&d, "Unit", "After").contains(&"network-online.target"));
    assert!(values(&d, "Unit", "Wants").contains(&"network-online.target"));
    assert_eq!(value(&d, "Install", "WantedBy"), "multi-user.target");
    // SIGTERM (the default KillSignal=) is what makes fhirfs unmount and exit 0.
    assert!(values(&d, "Service", "KillSignal").iter().all(|s| *s == "SIGTERM"));
    assert!(values(&d, "Service", "KillMode").is_empty(), "keep the default KillMode=");
}

#[test]
fn the_token_comes_only_as_a_credential() {
    let d = directives(UNIT);
    assert_eq!(value(&d, "Service", "LoadCredential"), "token:/etc/fhirfs/%i.token");
    let exec_start = value(&d, "Service", "ExecStart");
    assert!(
        exec_start.contains(" --token-file ${CREDENTIALS_DIRECTORY}/token "),
        "ExecStart= passes the credential: {exec_start}"
    );
    assert_eq!(value(&d, "Service", "UnsetEnvironment"), "FHIRFS_TOKEN");
    for directive in &d {
        let line = format!("{}={}", directive.key, directive.value);
        if matches!(directive.key.as_str(), "Environment" | "PassEnvironment") {
            assert!(
                !line.contains("FHIRFS_TOKEN"),
                "the token must not be in the environment: {line}"
            );
        }
        assert!(
            !matches!(directive.key.as_str(), "SetCredential" | "SetCredentialEncrypted"),
            "no secret inline in the unit: {line}"
        );
    }
    // No token value anywhere, not even in a comment: no JWT, no bearer value, no --token.
    for text in [UNIT, EXAMPLE_CONF] {
        assert!(!text.contains("eyJhbGciOiJ"), "a JWT in a unit file or its example");
        assert!(!text.contains("Bearer "), "a bearer value in a unit file or its example");
        assert!(!text.contains("FHIRFS_TOKEN="), "FHIRFS_TOKEN set in a unit file or its example");
        assert!(!text.contains("--token "), "no --token option exists, nor should it");
    }
    assert!(!environment_file(EXAMPLE_CONF).contains_key("FHIRFS_TOKEN"));
}

#[test]
fn no_setting_gives_the_service_a_private_mount_namespace() {
    for directive in directives(UNIT) {
        let key = directive.key.as_str();
        assert!(
            !NAMESPACE_SETTINGS.contains(&key),
            "{key}= gives the service its own mount namespace (or user namespace): the FUSE \
             mount would be made there and never be seen on the host"
        );
        if key == "MountFlags" {
            assert_eq!(directive.value, "shared", "MountFlags=slave|private make a namespace");
        }
    }
}

#[test]
fn the_unit_is_hardened_as_far_as_a_host_visible_mount_allows() {
    let d = directives(UNIT);
    assert!(values(&d, "Service", "User").is_empty(), "mounting needs root (CAP_SYS_ADMIN)");
    assert_eq!(value(&d, "Service", "CapabilityBoundingSet"), "CAP_SYS_ADMIN");
    assert_eq!(value(&d, "Service", "AmbientCapabilities"), "");
    assert_eq!(value(&d, "Service", "NoNewPrivileges"), "yes");
    assert_eq!(value(&d, "Service", "DevicePolicy"), "closed");
    assert_eq!(value(&d, "Service", "DeviceAllow"), "/dev/fuse rw");
    assert_eq!(value(&d, "Service", "RestrictAddressFamilies"), "AF_UNIX AF_INET AF_INET6");
    assert_eq!(value(&d, "Service", "RestrictNamespaces"), "yes");
    assert_eq!(value(&d, "Service", "SystemCallArchitectures"), "native");
    for key in [
        "ProtectHostname",
        "ProtectClock",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ] {
        assert_eq!(value(&d, "Service", key), "yes", "{key}=");
    }
    let filters = values(&d, "Service", "SystemCallFilter");
    assert_eq!(filters.first(), Some(&"@system-service @mount"), "mount(2) and umount2(2) allowed");
    assert!(filters.iter().all(|f| !f.contains("~@mount")), "mounting must stay allowed");
}

#[test]
fn every_helper_program_of_the_unit_exists() {
    // systemd-analyze verify does not check commands prefixed with "-".
    for directive in directives(UNIT) {
        if !directive.key.starts_with("Exec") || directive.key == "ExecStart" {
            continue;
        }
        let program = command_line(&directive.value).split_whitespace().next().unwrap();
        assert!(program.starts_with('/'), "{}= needs an absolute path: {program}", directive.key);
        assert!(
            Path::new(program).is_file(),
            "{}= runs {program}, which is missing",
            directive.key
        );
    }
}

#[test]
fn the_clean_up_after_a_crash_touches_only_a_dead_fhirfs_mount() {
    // After a crash the dead mount must go, or fhirfs refuses to start again; but a lazy
    // unmount of whatever is on the mountpoint could take away someone else's live mount.
    let d = directives(UNIT);
    let stop_post = value(&d, "Service", "ExecStopPost");
    assert!(stop_post.starts_with("-/bin/sh -c '"), "{stop_post}");
    for guard in [
        "findmnt --mountpoint \"$${FHIRFS_MOUNTPOINT}\" --types fuse",
        "grep -q \"^fhirfs:\" &&",
        "! stat --file-system \"$${FHIRFS_MOUNTPOINT}\" >/dev/null 2>&1 &&",
        "umount --lazy \"$${FHIRFS_MOUNTPOINT}\"; exit 0'",
    ] {
        assert!(stop_post.contains(guard), "ExecStopPost= lacks {guard:?}: {stop_post}");
    }
    assert_eq!(stop_post.matches("umount").count(), 1, "{stop_post}");
    assert!(values(&d, "Service", "ExecStop").is_empty(), "SIGTERM is the way to stop");
}

#[test]
fn the_example_conf_sets_every_variable_the_unit_uses() {
    let vars = environment_file(EXAMPLE_CONF);
    let d = directives(UNIT);
    let mut used = Vec::new();
    for directive in d.iter().filter(|d| d.key.starts_with("Exec")) {
        used.extend(referenced_variables(&directive.value));
    }
    for name in used.iter().filter(|n| n.starts_with("FHIRFS_")) {
        assert!(vars.contains_key(name), "example.conf does not set {name}");
    }
    for name in ["FHIRFS_URL", "FHIRFS_MOUNTPOINT", "FHIRFS_OPTIONS"] {
        assert!(used.iter().any(|u| u == name), "the unit does not use {name}");
    }
    assert!(vars["FHIRFS_URL"].starts_with("https://"));
    assert!(vars["FHIRFS_MOUNTPOINT"].starts_with('/'));
}

#[test]
fn fhirfs_accepts_the_command_line_the_unit_builds() {
    // The environment the service gets: example.conf, and a credentials folder. The token is
    // left out of it, so fhirfs stops right after parsing its arguments (before any mount)
    // with the token file error: proof that the arguments themselves were accepted.
    let credentials = tempfile::tempdir().unwrap();
    let mut env = environment_file(EXAMPLE_CONF);
    env.insert("CREDENTIALS_DIRECTORY".into(), credentials.path().display().to_string());
    let d = directives(UNIT);
    let argv = expand_command(value(&d, "Service", "ExecStart"), &env);
    assert_eq!(argv[0], INSTALLED_BINARY);
    let token_file = format!("{}/token", credentials.path().display());
    assert!(argv.windows(2).any(|w| w == ["--token-file", token_file.as_str()]), "{argv:?}");
    assert_eq!(
        argv[argv.len() - 2..],
        [env["FHIRFS_URL"].clone(), env["FHIRFS_MOUNTPOINT"].clone()]
    );

    let output = Command::new(env!("CARGO_BIN_EXE_fhirfs"))
        .args(&argv[1..])
        .env_remove("FHIRFS_TOKEN")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "fhirfs should stop at the missing token: {stderr}");
    assert!(
        stderr.contains("cannot read the token file") && stderr.contains(&token_file),
        "fhirfs refused the unit's command line {argv:?}:\n{stderr}"
    );
}

#[test]
fn the_namespace_check_script_parses() {
    // systemd/check-in-namespace.sh boots systemd to run the unit for real; it needs root and
    // is run by hand, but it must at least stay valid shell.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/check-in-namespace.sh");
    let output = Command::new("bash").args(["-n", script]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
