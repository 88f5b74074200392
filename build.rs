//! Build script: records the git commit fhirfs is built from, for `fhirfs --version`.
//!
//! Sets `FHIRFS_COMMIT` to `commit 1a2b3c4d5e6f`, with `, modified` when the sources that go
//! into the binary differ from that commit, or to `unknown commit` outside a git checkout of
//! fhirfs (a crates.io download, a source tarball, git missing).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files and folders whose changes make a build differ from its commit.
const SOURCES: &[&str] = &["src", "build.rs", "Cargo.toml", "Cargo.lock"];

/// Hex digits of the commit shown (as `git log --oneline` would show them, plus a margin).
const COMMIT_DIGITS: &str = "12";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let commit = match git_commit(&manifest_dir) {
        Some(Commit { hash, modified: false }) => format!("commit {hash}"),
        Some(Commit { hash, modified: true }) => format!("commit {hash}, modified"),
        None => "unknown commit".to_owned(),
    };
    println!("cargo:rustc-env=FHIRFS_COMMIT={commit}");
    // Without any rerun-if-changed, cargo would run this again only when a file of the
    // package changes, not when HEAD moves (a commit changes files under .git only).
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    for path in git_files(&manifest_dir) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// The commit of HEAD, and whether the sources differ from it.
struct Commit {
    hash: String,
    modified: bool,
}

/// The commit, when `dir` is a tracked part of a git checkout. A copy of the sources inside
/// some other checkout (`cargo package` unpacks into target/package/) is not one: there git
/// would name the surrounding repository's commit.
fn git_commit(dir: &Path) -> Option<Commit> {
    git(dir, &["ls-files", "--error-unmatch", "--", "Cargo.toml"])?;
    let hash = git(dir, &["rev-parse", &format!("--short={COMMIT_DIGITS}"), "HEAD"])?;
    // --no-optional-locks: a build must not take the index lock from a concurrent git command.
    let mut status = vec!["--no-optional-locks", "status", "--porcelain", "--"];
    status.extend(SOURCES);
    let changes = git(dir, &status)?;
    Some(Commit { hash, modified: !changes.is_empty() })
}

/// The files git changes when HEAD moves: HEAD itself, the branch it points to (a loose ref
/// file, or packed-refs), each only if it exists (cargo reruns every time for a missing one).
fn git_files(dir: &Path) -> Vec<PathBuf> {
    let mut names = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        names.push(branch);
    }
    names
        .iter()
        .filter_map(|name| git(dir, &["rev-parse", "--git-path", name]))
        // --git-path answers relative to `dir` in a plain checkout, absolute in a worktree.
        .map(|path| dir.join(path))
        .filter(|path| path.is_file())
        .collect()
}

/// The trimmed output of a successful git command run in `dir`, else None.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git").current_dir(dir).args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    Some(String::from_utf8(output.stdout).ok()?.trim().to_owned())
}
