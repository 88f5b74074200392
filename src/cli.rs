//! Command-line options, and turning them into the settings of each part.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser};
use url::Url;

use crate::auth::smart::{SmartClient, SmartConfig};
use crate::auth::{Secret, TokenSource};
use crate::documents::source::{DocumentsConfig, VerifyHash};
use crate::fs::FsConfig;
use crate::http::FetchMode;

/// Environment variable that may hold the bearer token.
pub const TOKEN_ENV: &str = "FHIRFS_TOKEN";

/// Where systemd puts credentials (`LoadCredential=`), and the name fhirfs looks for there.
pub const CREDENTIALS_ENV: &str = "CREDENTIALS_DIRECTORY";
/// The credential holding the token.
pub const CREDENTIAL_NAME: &str = "token";

/// What `--version` says: the version and the git commit the binary was built from
/// (`build.rs`), e.g. `0.1.0 (commit 1a2b3c4d5e6f)`, or `0.1.0 (unknown commit)`.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("FHIRFS_COMMIT"), ")");

/// The source to give mount(8) for the demo, which always passes one:
/// `mount -t fuse.fhirfs demo DIR -o demo` runs `fhirfs demo DIR -o demo`.
pub const DEMO_SOURCE: &str = "demo";

/// Generic mount options that mount(8) and mount.fuse3 pass along and fhirfs has no use for:
/// the mount is always `ro,nosuid,nodev,noexec`, whatever they say.
const IGNORED_MOUNT_OPTIONS: &[&str] = &[
    "rw",
    "ro",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "lazytime",
    "diratime",
    "nodiratime",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "defaults",
    "_netdev",
    "nofail",
    "sync",
    "async",
    "dirsync",
    "default_permissions",
    "nonempty",
    "bg",
    "fg",
];

/// A mount-style `-o` option list that cannot be rewritten into long options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountOptionError {
    /// `-o` came last, with no list after it.
    #[error("-o needs a list of options")]
    Missing,
    /// The list is not UTF-8.
    #[error("mount options must be UTF-8")]
    NotUtf8,
    /// No option of fhirfs has this name.
    #[error("unknown mount option {0:?}")]
    Unknown(String),
    /// The option takes a value (`key=value`) and none was given.
    #[error("mount option {0:?} needs a value")]
    NeedsValue(String),
    /// The option is a flag and a value was given.
    #[error("mount option {0:?} takes no value")]
    TakesNoValue(String),
}

/// Rewrites mount-style `-o key=value,flag` options into the long options they name
/// (`token_file=/x` → `--token-file /x`, `allow_other` → `--allow-other`), as mount.fuse3
/// passes them: `fhirfs SOURCE MOUNTPOINT -o opts`.
pub fn expand_mount_options(argv: Vec<OsString>) -> Result<Vec<OsString>, MountOptionError> {
    let command = Args::command();
    let mut out = Vec::with_capacity(argv.len());
    let mut args = argv.into_iter();
    while let Some(arg) = args.next() {
        let options = if arg == "-o" {
            args.next().ok_or(MountOptionError::Missing)?
        } else if let Some(rest) = arg.to_str().and_then(|a| a.strip_prefix("-o")) {
            OsString::from(rest)
        } else {
            out.push(arg);
            continue;
        };
        let options = options.into_string().map_err(|_| MountOptionError::NotUtf8)?;
        for option in options.split(',').filter(|o| !o.is_empty()) {
            let (key, value) = match option.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (option, None),
            };
            if IGNORED_MOUNT_OPTIONS.contains(&key)
                || key.starts_with("x-")
                || matches!(key, "comment" | "fsname" | "subtype")
            {
                continue;
            }
            let long = key.replace('_', "-");
            let Some(known) = command.get_arguments().find(|a| a.get_long() == Some(&long)) else {
                return Err(MountOptionError::Unknown(key.to_owned()));
            };
            let takes_value = known.get_action().takes_values();
            match (takes_value, value) {
                (true, Some(value)) => out.extend([format!("--{long}").into(), value.into()]),
                (false, None) => out.push(format!("--{long}").into()),
                (true, None) => return Err(MountOptionError::NeedsValue(key.to_owned())),
                (false, Some(_)) => return Err(MountOptionError::TakesNoValue(key.to_owned())),
            }
        }
    }
    Ok(out)
}

const AFTER_HELP: &str = "\
Token: --token-file, else the environment variable FHIRFS_TOKEN, else the systemd credential
$CREDENTIALS_DIRECTORY/token, else SMART Backend Services (--smart-*), else none.

Mount options: `-o key=value,flag,...` (as mount(8) and fstab pass them) accepts every long
option above with `_` or `-` (token_file=/etc/fhirfs/token, allow_other, dir_ttl=5); generic
options such as ro, nodev, nosuid, _netdev, noauto are accepted and ignored (the mount is
always ro,nosuid,nodev,noexec). Started by mount(8), fhirfs goes to the background once the
mount is up and reports a failure through its exit status. The demo through mount(8):
mount -t fuse.fhirfs demo DIR -o demo.

Stop: umount MOUNTPOINT, or SIGTERM/SIGINT (unmounts, exit 0). SIGUSR1 logs statistics.";

/// Mount a FHIR server's Binary resources as a read-only folder.
///
/// The bearer token comes from the environment variable FHIRFS_TOKEN or from --token-file,
/// never from the command line.
#[derive(Debug, Parser)]
#[command(name = "fhirfs", version = VERSION, about, long_about = None, after_help = AFTER_HELP)]
#[command(
    override_usage = "fhirfs [OPTIONS] <BASE_URL> <MOUNTPOINT>\n       fhirfs --demo <MOUNTPOINT>"
)]
pub struct Args {
    /// FHIR base URL, e.g. https://host/fhir (with --demo: the mountpoint).
    #[arg(value_name = "BASE_URL")]
    pub base_url: String,

    /// An existing, empty folder to mount on.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: Option<PathBuf>,

    /// Mount a built-in demo server with sample files instead of a real one.
    #[arg(long)]
    pub demo: bool,

    /// Read the bearer token from this file (whitespace trimmed).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// SMART Backend Services: the client id (with --smart-key instead of a token).
    #[arg(long, value_name = "ID", requires = "smart_key", conflicts_with = "token_file")]
    pub smart_client_id: Option<String>,

    /// SMART Backend Services: the private key (PEM; RSA signs RS384, P-384 EC signs ES384).
    #[arg(long, value_name = "PATH", requires = "smart_client_id")]
    pub smart_key: Option<PathBuf>,

    /// SMART Backend Services: the token endpoint [default: from
    /// BASE_URL/.well-known/smart-configuration].
    #[arg(long, value_name = "URL", requires = "smart_client_id")]
    pub smart_token_url: Option<Url>,

    /// SMART Backend Services: the scopes asked for; with --view documents, the default also
    /// asks for system/DocumentReference.read and system/DiagnosticReport.read (and
    /// system/Patient.read with --patient-names) [default: system/Binary.read]
    #[arg(long, value_name = "SCOPES")]
    pub smart_scope: Option<String>,

    /// SMART Backend Services: the `kid` of the key, if the server wants one.
    #[arg(long, value_name = "KID", requires = "smart_client_id")]
    pub smart_kid: Option<String>,

    /// Seconds a listing and the metadata it brings are trusted (fractions allowed).
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = seconds)]
    pub dir_ttl: Duration,

    /// Seconds between full listings; refreshes in between ask only for what changed, where
    /// the server can tell (0: every refresh lists everything).
    #[arg(long, value_name = "SECS", default_value = "3600", value_parser = seconds)]
    pub full_relist: Duration,

    /// Seconds fetched content is served before the server is asked again (fractions allowed).
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = seconds)]
    pub cache_ttl: Duration,

    /// Memory for cached content, e.g. 512MiB or 2GiB.
    #[arg(long, value_name = "SIZE", default_value = "512MiB")]
    pub cache_size: bytesize::ByteSize,

    /// Seconds one fetch (or one listing page) may take as a whole before it fails with EIO.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = seconds)]
    pub timeout: Duration,

    /// Binaries asked for per search page (`_count`).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub page_size: u32,

    /// Which form to fetch: raw native bytes, FHIR JSON with base64 `data`, or auto (raw once
    /// the server has shown that it serves native bytes with the right Content-Type).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = FetchMode::Auto)]
    pub fetch: FetchMode,

    /// Requests in flight to the server at once, at most: reads, read-ahead and searches
    /// together, a program's own reads first. HTTP/2 servers get them on one connection;
    /// HTTP/1.1 servers on up to this many keep-alive connections.
    #[arg(long, value_name = "N", default_value_t = crate::http::limit::DEFAULT_MAX_REQUESTS as u16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub max_requests: u16,

    /// Files fetched ahead of a program that walks the folder (cp -r, rsync -a, tar): the
    /// next ones in listing or name order while it copies one. 0 turns it off.
    #[arg(long, value_name = "FILES", default_value_t = crate::fs::readahead::DEFAULT_AHEAD_FILES)]
    pub read_ahead: usize,

    /// Ask for answers uncompressed (`Accept-Encoding: identity`) instead of gzip, deflate, br
    /// or zstd. A compressed answer is decoded either way.
    #[arg(long)]
    pub no_compression: bool,

    /// Largest Binary served; larger ones fail with EFBIG.
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    pub max_size: bytesize::ByteSize,

    /// Owner of the files [default: the mounting user].
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,

    /// Group of the files [default: the mounting user's group].
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,

    /// Also trust the CA certificates in this PEM file (certificates are always verified).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Name files `<id>.<ext>` after their contentType (the bare id opens them too).
    #[arg(long)]
    pub extensions: bool,

    /// What the folder shows: `binary`, every Binary by id; `documents`, the attachments of
    /// DocumentReference and DiagnosticReport, a folder per subject, named by date and title.
    #[arg(long, value_name = "VIEW", value_enum, default_value_t = View::Binary)]
    pub view: View,

    /// The documents view: this patient's documents only (searched with `patient=ID`, and
    /// each document's subject checked); the root is their folder. Epic and Cerner need it.
    #[arg(long, value_name = "ID")]
    pub patient: Option<String>,

    /// The documents view: name each patient's folder after the patient too (`Doe, Jane
    /// (Patient-123)`), from one read of each Patient. Names are PHI: off by default.
    #[arg(long)]
    pub patient_names: bool,

    /// The documents view: what an attachment whose `hash` does not match its bytes gives:
    /// `warn`, the bytes, one warning and `user.fhir.hash_match=no`; `strict`, EIO.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = VerifyHash::Warn)]
    pub verify_hash: VerifyHash,

    /// Let other users see the mount (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    pub allow_other: bool,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Stay in the foreground even when started by mount(8) (which otherwise makes fhirfs go
    /// to the background once the mount is up).
    #[arg(long)]
    pub foreground: bool,
}

/// What the folder shows (`--view`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum View {
    /// Every Binary, by id.
    #[default]
    Binary,
    /// The attachments of DocumentReference and DiagnosticReport, named by date and title.
    Documents,
}

/// Where the Binaries come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A FHIR server at this base URL.
    Server(Url),
    /// The built-in demo server.
    Demo,
}

impl Args {
    /// Checks that the documents view's options go with the view.
    fn check_view(&self) -> anyhow::Result<()> {
        match (self.view, &self.patient) {
            (View::Binary, Some(_)) => bail!("--patient needs --view documents"),
            (View::Binary, None) if self.patient_names => {
                bail!("--patient-names needs --view documents")
            }
            (View::Binary, None) if self.verify_hash != VerifyHash::Warn => {
                bail!("--verify-hash needs --view documents")
            }
            (View::Documents, Some(id)) if !crate::id::is_valid_id(id) => {
                bail!("--patient {id:?} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})")
            }
            _ => Ok(()),
        }
    }

    /// The SMART scopes to ask for: `--smart-scope`, else what the view reads.
    pub fn smart_scope(&self) -> String {
        if let Some(scope) = &self.smart_scope {
            return scope.clone();
        }
        let mut scope = String::from("system/Binary.read");
        if self.view == View::Documents {
            scope.push_str(" system/DocumentReference.read system/DiagnosticReport.read");
            if self.patient_names {
                scope.push_str(" system/Patient.read");
            }
        }
        scope
    }

    /// The settings of the documents view.
    pub fn documents_config(&self) -> DocumentsConfig {
        DocumentsConfig {
            patient: self.patient.clone(),
            verify_hash: self.verify_hash,
            patient_names: self.patient_names,
        }
    }

    /// The server (or demo) and the mountpoint, checked.
    pub fn target(&self) -> anyhow::Result<(Target, PathBuf)> {
        self.check_view()?;
        if self.demo {
            return match &self.mountpoint {
                None => Ok((Target::Demo, PathBuf::from(&self.base_url))),
                Some(mountpoint) if self.base_url == DEMO_SOURCE => {
                    Ok((Target::Demo, mountpoint.clone()))
                }
                Some(_) => bail!(
                    "--demo takes only a mountpoint (or, as mount(8) passes it, the source \
                     {DEMO_SOURCE:?} and a mountpoint), not a base URL"
                ),
            };
        }
        let Some(mountpoint) = self.mountpoint.clone() else {
            bail!("missing MOUNTPOINT (usage: fhirfs [OPTIONS] <BASE_URL> <MOUNTPOINT>)");
        };
        let url = Url::parse(&self.base_url)
            .with_context(|| format!("bad base URL {:?}", self.base_url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            bail!("bad base URL {:?}: it must be an http or https URL with a host", self.base_url);
        }
        if url.query().is_some() || url.fragment().is_some() {
            bail!("bad base URL {:?}: it must not have a query or fragment", self.base_url);
        }
        Ok((Target::Server(url), mountpoint))
    }

    /// The token source: --token-file (checked readable now, re-read when it changes), else
    /// FHIRFS_TOKEN, else none.
    pub fn token(&self) -> anyhow::Result<TokenSource> {
        if let (Some(client_id), Some(key)) = (&self.smart_client_id, &self.smart_key) {
            let key_pem = std::fs::read(key)
                .with_context(|| format!("cannot read the SMART key {}", key.display()))?;
            let config = SmartConfig {
                client_id: client_id.clone(),
                key_pem,
                token_url: self.smart_token_url.clone(),
                scope: self.smart_scope(),
                kid: self.smart_kid.clone(),
            };
            let client = SmartClient::new(config)?;
            return Ok(TokenSource::Smart(std::sync::Arc::new(client)));
        }
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            if Secret::new(&text).is_none() {
                bail!("the token file {} is empty", path.display());
            }
            return Ok(TokenSource::File(path.clone()));
        }
        if let Some(token) = std::env::var(TOKEN_ENV).ok().as_deref().and_then(Secret::new) {
            return Ok(TokenSource::Static(token));
        }
        // systemd's LoadCredential=token:... puts it here, outside the environment.
        if let Some(dir) = std::env::var_os(CREDENTIALS_ENV) {
            let path = PathBuf::from(dir).join(CREDENTIAL_NAME);
            if path.exists() {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the credential {}", path.display()))?;
                if Secret::new(&text).is_none() {
                    bail!("the credential {} is empty", path.display());
                }
                return Ok(TokenSource::File(path));
            }
        }
        Ok(TokenSource::None)
    }

    /// The extra CA certificates, read now so that a bad path fails at start.
    pub fn ca_pem(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(path) = &self.ca_file else { return Ok(None) };
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read the CA file {}", path.display()))?;
        Ok(Some(pem))
    }

    /// Settings of the core.
    pub fn fs_config(&self) -> FsConfig {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FsConfig {
            dir_ttl: self.dir_ttl,
            cache_ttl: self.cache_ttl,
            cache_bytes: self.cache_size.as_u64(),
            uid: self.uid.unwrap_or(uid),
            gid: self.gid.unwrap_or(gid),
            extensions: self.extensions,
            read_ahead: self.read_ahead,
            full_relist: self.full_relist,
        }
    }
}

/// A value that is not a number of seconds.
#[derive(Debug, thiserror::Error)]
pub enum SecondsError {
    /// Not a number at all.
    #[error("{0:?} is not a number of seconds")]
    NotANumber(String),
    /// A number no duration can be: negative, too large, not finite.
    #[error("{0:?} is not a duration in seconds")]
    OutOfRange(String),
}

/// Parses a number of seconds, fractions allowed ("0.5", "60").
fn seconds(text: &str) -> Result<Duration, SecondsError> {
    let secs: f64 = text.trim().parse().map_err(|_| SecondsError::NotANumber(text.to_owned()))?;
    Duration::try_from_secs_f64(secs).map_err(|_| SecondsError::OutOfRange(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("fhirfs").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_documents_views_options_go_with_it() {
        let base = ["http://h/fhir", "/mnt"];
        let args = parse(&base);
        assert_eq!(
            (args.view, args.verify_hash, args.patient_names),
            (View::Binary, VerifyHash::Warn, false)
        );
        let with = |extra: &[&str]| parse(&[extra, &base[..]].concat()).target().map(|_| ());
        assert!(with(&["--view", "documents"]).is_ok(), "a folder per subject");
        assert!(with(&["--view", "documents", "--patient", "p-1.2"]).is_ok());
        let config = parse(&[
            "--view",
            "documents",
            "--patient",
            "p1",
            "--verify-hash",
            "strict",
            "--patient-names",
            "http://h/fhir",
            "/mnt",
        ])
        .documents_config();
        assert_eq!(config.patient.as_deref(), Some("p1"));
        assert_eq!((config.verify_hash, config.patient_names), (VerifyHash::Strict, true));
        // SMART scopes follow what the view reads, unless given.
        assert_eq!(parse(&base).smart_scope(), "system/Binary.read");
        let documents = parse(&["--view", "documents", "--patient-names", "http://h/fhir", "/mnt"]);
        assert_eq!(
            documents.smart_scope(),
            "system/Binary.read system/DocumentReference.read system/DiagnosticReport.read \
             system/Patient.read"
        );
        let given = parse(&["--view", "documents", "--smart-scope", "x", "http://h/fhir", "/mnt"]);
        assert_eq!(given.smart_scope(), "x");
        for (extra, message) in [
            (&["--patient", "p1"][..], "--patient needs --view documents"),
            (&["--verify-hash", "strict"][..], "--verify-hash needs --view documents"),
            (&["--patient-names"][..], "--patient-names needs --view documents"),
            (&["--view", "documents", "--patient", "../p"][..], "is not a FHIR id"),
        ] {
            let error = with(extra).unwrap_err().to_string();
            assert!(error.contains(message), "{extra:?}: {error}");
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let args = parse(&["https://h/fhir", "/mnt"]);
        assert_eq!(args.dir_ttl, Duration::from_secs(60));
        assert_eq!(args.cache_ttl, Duration::from_secs(300));
        assert_eq!(args.cache_size.as_u64(), 512 << 20);
        assert_eq!(args.max_size.as_u64(), 1 << 30);
        assert_eq!(args.timeout, Duration::from_secs(30));
        assert!(!args.extensions);
        assert!(!args.allow_other);
        let (target, mnt) = args.target().unwrap();
        assert_eq!(target, Target::Server(Url::parse("https://h/fhir").unwrap()));
        assert_eq!(mnt, PathBuf::from("/mnt"));
    }

    #[test]
    fn demo_takes_just_a_mountpoint() {
        let (target, mnt) = parse(&["--demo", "/mnt"]).target().unwrap();
        assert_eq!((target, mnt), (Target::Demo, PathBuf::from("/mnt")));
        assert!(parse(&["--demo", "http://h", "/mnt"]).target().is_err());
    }

    #[test]
    fn demo_through_mount_8_takes_the_source_demo() {
        // mount -t fuse.fhirfs demo /mnt -o demo → mount.fuse3 → fhirfs demo /mnt -o demo
        let argv = expand(&["fhirfs", "demo", "/mnt", "-o", "rw,nodev,nosuid,demo"]).unwrap();
        let (target, mnt) = Args::try_parse_from(argv).unwrap().target().unwrap();
        assert_eq!((target, mnt), (Target::Demo, PathBuf::from("/mnt")));
        let err = parse(&["--demo", "fhir", "/mnt"]).target().unwrap_err();
        assert!(format!("{err:#}").contains("the source \"demo\""), "{err:#}");
    }

    #[test]
    fn bad_urls_are_refused_with_the_url_in_the_message() {
        for url in ["not a url", "ftp://h/fhir", "https://h/fhir?x=1", "file:///tmp"] {
            let err = parse(&[url, "/mnt"]).target().unwrap_err();
            assert!(format!("{err:#}").contains("bad base URL"), "{url}: {err:#}");
        }
        assert!(parse(&["https://h/fhir"]).target().is_err());
    }

    #[test]
    fn there_is_no_token_argument() {
        let args = ["fhirfs", "--token", "x", "https://h", "/mnt"];
        assert!(Args::try_parse_from(args).is_err());
    }

    #[test]
    fn ttls_take_fractions_and_refuse_nonsense() {
        let args = parse(&["--dir-ttl", "0.25", "--cache-ttl", "0", "https://h", "/m"]);
        assert_eq!(args.dir_ttl, Duration::from_millis(250));
        assert_eq!(args.cache_ttl, Duration::ZERO);
        for bad in ["-1", "soon", "NaN"] {
            let argv = ["fhirfs", "--dir-ttl", bad, "https://h", "/m"];
            assert!(Args::try_parse_from(argv).is_err(), "{bad}");
        }
    }

    #[test]
    fn smart_options_go_together() {
        let argv = ["fhirfs", "--smart-client-id", "c", "https://h", "/m"];
        assert!(Args::try_parse_from(argv).is_err(), "a client id needs a key");
        let argv = ["fhirfs", "--smart-key", "k.pem", "https://h", "/m"];
        assert!(Args::try_parse_from(argv).is_err(), "a key needs a client id");
        let key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/smart-es384.key.pem");
        let args = parse(&["--smart-client-id", "c", "--smart-key", key, "https://h", "/m"]);
        assert!(matches!(args.token().unwrap(), TokenSource::Smart(_)));
        let missing =
            parse(&["--smart-client-id", "c", "--smart-key", "/nonexistent", "https://h", "/m"]);
        let err = format!("{:#}", missing.token().unwrap_err());
        assert!(err.contains("cannot read the SMART key /nonexistent"), "{err}");
    }

    fn expand(args: &[&str]) -> Result<Vec<String>, MountOptionError> {
        let argv = args.iter().map(OsString::from).collect();
        let out = expand_mount_options(argv)?;
        Ok(out.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn mount_options_become_long_options() {
        let out = expand(&[
            "fhirfs",
            "https://h/fhir",
            "/mnt/fhir",
            "-o",
            "rw,nodev,nosuid,token_file=/etc/fhirfs/token,_netdev,allow_other,dir_ttl=5,x-systemd.automount",
        ])
        .unwrap();
        let expected = [
            "fhirfs",
            "https://h/fhir",
            "/mnt/fhir",
            "--token-file",
            "/etc/fhirfs/token",
            "--allow-other",
            "--dir-ttl",
            "5",
        ];
        assert_eq!(out, expected);
        let args = Args::try_parse_from(out).unwrap();
        assert!(args.allow_other);
        assert_eq!(args.token_file, Some(PathBuf::from("/etc/fhirfs/token")));
        assert_eq!(
            expand(&["fhirfs", "-ouid=7", "u", "m"]).unwrap(),
            ["fhirfs", "--uid", "7", "u", "m"]
        );
    }

    #[test]
    fn bad_mount_options_are_named() {
        let unknown = MountOptionError::Unknown("bogus".into());
        assert_eq!(expand(&["fhirfs", "-o", "bogus=1"]), Err(unknown));
        let needs = MountOptionError::NeedsValue("token_file".into());
        assert_eq!(expand(&["fhirfs", "-o", "token_file"]), Err(needs));
        let flag = MountOptionError::TakesNoValue("allow_other".into());
        assert_eq!(expand(&["fhirfs", "-o", "allow_other=yes"]), Err(flag));
        assert_eq!(expand(&["fhirfs", "-o"]), Err(MountOptionError::Missing));
        assert!(expand(&["fhirfs", "-o"]).is_err());
    }

    #[test]
    fn sizes_take_units() {
        let args = parse(&["--cache-size", "2GiB", "--max-size", "10MB", "https://h", "/m"]);
        assert_eq!(args.cache_size.as_u64(), 2 << 30);
        assert_eq!(args.max_size.as_u64(), 10_000_000);
    }
}
