//! The man page fhirfs(8) and the shell completions (`src/manpage.rs`): every option that
//! `--help` lists is in the man page, the hand-written sections are there, and each shell's
//! completions offer the options.

use std::process::Command;

use clap::CommandFactory;
use clap_complete::Shell;
use fhirfs::cli::Args;
use fhirfs::manpage::{self, COMPLETIONS};

/// The man page as roff.
fn man_page() -> String {
    let mut out = Vec::new();
    manpage::write_man_page("2026-05-06", &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// The man page's text with roff's escapes taken out (`\-` is a hyphen, `\fB` starts bold),
/// so that options can be searched for as they are typed.
fn plain(roff: &str) -> String {
    roff.replace(r"\-", "-")
        .replace(r"\fB", "")
        .replace(r"\fI", "")
        .replace(r"\fR", "")
        .replace(r"\&", "")
}

/// Every `--option` named in `text` (`--smart-*` gives `--smart`).
fn long_options(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (start, _) in text.match_indices("--") {
        let name: String = text[start + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let name = name.trim_end_matches('-');
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            found.push(format!("--{name}"));
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn man_page_has_every_option_and_argument_of_the_command() {
    let page = plain(&man_page());
    let mut command = Args::command();
    // Built, the command has --help and --version too.
    command.build();
    let mut longs = 0;
    for arg in command.get_arguments() {
        if let Some(long) = arg.get_long() {
            longs += 1;
            assert!(page.contains(&format!("--{long}")), "the man page lacks --{long}:\n{page}");
        }
        // A flag has a value name too, which --help never shows.
        let values = arg.get_action().takes_values().then(|| arg.get_value_names()).flatten();
        for name in values.into_iter().flatten() {
            assert!(page.contains(name.as_str()), "the man page lacks {name}:\n{page}");
        }
    }
    assert!(longs > 20, "only {longs} long options found: is this the right command?");
}

#[test]
fn man_page_has_every_option_that_help_prints() {
    let output = Command::new(env!("CARGO_BIN_EXE_fhirfs")).arg("--help").output().unwrap();
    assert!(output.status.success(), "fhirfs --help failed: {output:?}");
    let help = String::from_utf8(output.stdout).unwrap();
    let printed = long_options(&help);
    assert!(printed.contains(&"--token-file".to_owned()), "{printed:?}");
    let page = plain(&man_page());
    for option in printed {
        assert!(page.contains(&option), "--help lists {option}, the man page does not");
    }
}

#[test]
fn man_page_has_the_hand_written_sections() {
    let page = man_page();
    let titles: Vec<&str> = page
        .lines()
        .filter_map(|line| line.strip_prefix(".SH "))
        .map(|title| title.trim_matches('"'))
        .collect();
    for title in manpage::hand_section_titles() {
        assert!(titles.contains(&title), "no section {title} in {titles:?}");
    }
    for title in ["NAME", "SYNOPSIS", "OPTIONS", "NOTES"] {
        assert!(titles.contains(&title), "clap's section {title} is missing from {titles:?}");
    }
    for needed in ["TOKENS", "ERRORS", "FSTAB", "FILES", "SYSTEMD UNIT", "SIGNALS"] {
        assert!(titles.contains(&needed), "no section {needed} in {titles:?}");
    }
    assert!(page.starts_with(".ie"), "roff's preamble first: {page}");
    let title = page.lines().find(|line| line.starts_with(".TH ")).unwrap();
    let start = format!(".TH FHIRFS 8 2026-05-06 \"fhirfs {} ", env!("CARGO_PKG_VERSION"));
    assert!(title.starts_with(&start), "{title}");
    assert!(title.ends_with(" \"System Administration\""), "{title}");
}

#[test]
fn man_page_names_every_errno_and_signal() {
    let page = plain(&man_page());
    for word in ["EACCES", "ENOENT", "EIO", "EFBIG", "EROFS", "SIGTERM", "SIGINT", "SIGUSR1"] {
        assert!(page.contains(word), "the man page does not name {word}");
    }
    assert!(page.contains("SIGHUP\nLogged and ignored"), "{page}");
    assert!(page.contains("fuse.fhirfs"), "no fstab line:\n{page}");
}

#[test]
fn completions_offer_the_options_in_every_shell() {
    let shells: Vec<Shell> = COMPLETIONS.iter().map(|(shell, _)| *shell).collect();
    assert_eq!(shells, [Shell::Bash, Shell::Zsh, Shell::Fish]);
    for (shell, _) in COMPLETIONS {
        let mut out = Vec::new();
        manpage::write_completions(shell, &mut out);
        let script = String::from_utf8(out).unwrap();
        for needle in ["token-file", "max-requests", "fhirfs"] {
            assert!(script.contains(needle), "{shell} completions lack {needle}:\n{script}");
        }
    }
}
