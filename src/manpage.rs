//! The man page fhirfs(8) and the shell completions, made from the clap definitions of
//! [`Args`] (the ones `--help` prints), so that neither can drift from the options.
//!
//! clap renders the synopsis, the options and the notes `--help` ends with; the sections
//! `--help` has no room for (tokens, the errno table, fstab, the systemd unit, signals, files)
//! are written here, with the facts of the README. `examples/package_assets.rs` writes both
//! into the files the packages install.

use std::io::{self, Write};

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

use crate::cli::Args;

/// Section 8, system administration: fhirfs is a mount tool, started by root, mount(8) or
/// systemd.
pub const MAN_SECTION: &str = "8";

/// The shells completions are made for, each with the file name it looks for in its
/// directory (bash-completion and fish by command name, zsh's compinit by `_command`).
pub const COMPLETIONS: [(Shell, &str); 3] =
    [(Shell::Bash, "fhirfs"), (Shell::Zsh, "_fhirfs"), (Shell::Fish, "fhirfs.fish")];

/// A piece of a hand-written section.
enum Block {
    /// A paragraph.
    Para(&'static str),
    /// A term in bold and its explanation, indented under it.
    Item(&'static str, &'static str),
    /// Lines shown as they are: commands, a line of fstab.
    Literal(&'static [&'static str]),
}

/// A section of the man page that clap cannot make.
struct Section {
    title: &'static str,
    blocks: &'static [Block],
}

use Block::{Item, Literal, Para};

/// What fhirfs does, in place of clap's description (which only repeats the NAME line).
const DESCRIPTION: Section = Section {
    title: "DESCRIPTION",
    blocks: &[
        Para(
            "fhirfs mounts a FHIR server's Binary resources as a read-only folder. Every Binary \
             id is a file; its bytes are fetched lazily over HTTPS (GET [base]/Binary/[id] with a \
             Bearer token), base64-decoded, cached in memory and served to any program. The \
             mount is always ro,nosuid,nodev,noexec.",
        ),
        Para(
            "fhirfs mounts, then stays in the foreground until the folder is unmounted (umount \
             DIR or fusermount3 -u DIR) or it gets SIGTERM or SIGINT; then it unmounts cleanly \
             and exits 0. Started by mount(8), it goes to the background once the mount answers \
             (unless --foreground is given). The mountpoint must be an existing, empty folder. \
             The mount is ready when fhirfs logs \"mounted\" (and, under systemd, sends \
             READY=1).",
        ),
        Para(
            "--demo mounts a built-in demo server (a PDF, a PNG and a text file) instead of a \
             real one: no external server, no network.",
        ),
    ],
};

/// The sections after the options and notes, in order.
const HAND_SECTIONS: &[Section] = &[
    Section {
        title: "TOKENS",
        blocks: &[
            Para(
                "A token is never a command-line argument (argv is visible to every user). The \
                 first of these that is given is used:",
            ),
            Item(
                "--token-file PATH",
                "Read at start, read again whenever the file changes and after a 401, so a \
                 sidecar can rotate tokens without a remount. Whitespace is trimmed.",
            ),
            Item("FHIRFS_TOKEN", "The environment variable."),
            Item(
                "$CREDENTIALS_DIRECTORY/token",
                "The systemd credential (LoadCredential=token:...), re-read like a token file.",
            ),
            Item(
                "--smart-client-id ID --smart-key KEY.pem",
                "SMART Backend Services: fhirfs signs a client assertion (RS384 with an RSA key, \
                 ES384 with a P-384 key) and trades it for an access token at --smart-token-url, \
                 or at the token_endpoint of BASE_URL/.well-known/smart-configuration. Tokens \
                 are renewed before they expire.",
            ),
            Para(
                "Without any, no Authorization header is sent. After a 401, fhirfs renews the \
                 token once (reads the file again, or asks the token endpoint) and retries once; \
                 then the program gets EACCES. The token goes only to the base URL's origin \
                 (scheme, host, port): never to another host named by a next link or a redirect. \
                 It never appears in logs, error messages or argv.",
            ),
        ],
    },
    Section {
        title: "ERRORS",
        blocks: &[
            Para("What programs reading the mount see when something goes wrong:"),
            Item("EACCES", "401, 403 (after one token renewal for 401)."),
            Item("ENOENT", "404, 410."),
            Item(
                "EIO",
                "Everything else the server or the network gets wrong: 400 and other 4xx, 5xx, \
                 malformed or truncated JSON, a wrong resourceType, invalid base64, a body \
                 shorter than its Content-Length, a body that changed before a cut one could be \
                 resumed, a listing that is not a Bundle or loops, network errors, the --timeout \
                 deadline.",
            ),
            Item("EFBIG", "A Binary larger than --max-size."),
            Item("EROFS", "Any write, create, rename, delete, chmod or xattr change."),
            Para(
                "429, 502, 503, 504, connection errors and bodies cut short are retried with \
                 capped exponential backoff and jitter (100 ms doubling to 4 s, at most 4 \
                 retries), honouring Retry-After, always inside the --timeout deadline. No other \
                 status is retried. A failed fetch is not cached; each one logs one line with the \
                 id, the reason and the time taken.",
            ),
        ],
    },
    Section {
        title: "EXIT STATUS",
        blocks: &[
            Item("0", "The folder was unmounted, or fhirfs got SIGTERM or SIGINT."),
            Item(
                "1",
                "fhirfs refused to start, with one line saying why: the URL is not an http(s) \
                 URL with a host (or has a query); the mountpoint does not exist, is not a \
                 folder, is not empty, is already a FUSE mount, or is a dead FUSE mount (run \
                 umount on it); /dev/fuse is missing; the token file or SMART key cannot be read.",
            ),
            Item("2", "Bad arguments."),
            Para(
                "A server that cannot be reached at start is reported and the mount goes up \
                 anyway: reads give EIO until the server answers, then work without a remount.",
            ),
        ],
    },
    Section {
        title: "FSTAB",
        blocks: &[
            Literal(&["https://fhir.example.org/r4  /mnt/fhir  fuse.fhirfs  \
                 token_file=/etc/fhirfs/token,_netdev,allow_other  0 0"]),
            Para(
                "mount /mnt/fhir and mount -t fuse.fhirfs URL DIR -o ... go through fuse3's \
                 mount.fuse3, which runs fhirfs SOURCE MOUNTPOINT -o OPTIONS. Every long option \
                 works as an -o key, with _ or - (dir_ttl=5, extensions, smart_client_id=...); \
                 generic mount options (ro, nodev, _netdev, noauto, x-systemd.*, ...) are \
                 accepted and ignored. fhirfs goes to the background once the mount answers, and \
                 mount exits 0; if mounting fails, mount exits non-zero with fhirfs's message. \
                 umount /mnt/fhir stops the daemon. The demo through mount(8):",
            ),
            Literal(&["mount -t fuse.fhirfs demo DIR -o demo"]),
        ],
    },
    Section {
        title: "SYSTEMD UNIT",
        blocks: &[
            Para(
                "The template unit fhirfs@.service: fhirfs@NAME.service mounts the server \
                 described in /etc/fhirfs/NAME.conf (FHIRFS_URL, FHIRFS_MOUNTPOINT, \
                 FHIRFS_OPTIONS; explained in /etc/fhirfs/example.conf), with the token from \
                 /etc/fhirfs/NAME.token. Installing the package enables nothing. As root:",
            ),
            Literal(&[
                "cp /etc/fhirfs/example.conf /etc/fhirfs/NAME.conf   # then edit it",
                "install -m 0600 /dev/null /etc/fhirfs/NAME.token    # then put the token in it",
                "mkdir -p /mnt/fhir                                  # the mountpoint, empty",
                "systemctl enable --now fhirfs@NAME",
            ]),
            Para(
                "systemctl enable --now returns once the mount answers (Type=notify: READY=1 is \
                 sent only after a stat through the new mount succeeded). systemctl status \
                 fhirfs@NAME and journalctl -u fhirfs@NAME show its state and log; systemctl \
                 stop fhirfs@NAME unmounts.",
            ),
            Para(
                "The token is never in the unit, the config or the environment: systemd copies \
                 /etc/fhirfs/NAME.token into $CREDENTIALS_DIRECTORY/token and the unit passes \
                 --token-file with it. The copy is made at start: after changing the token, run \
                 systemctl restart fhirfs@NAME. The service mounts as root, so without \
                 --allow-other in FHIRFS_OPTIONS only root can read the files. A crashed or \
                 killed fhirfs is restarted after 10 s (Restart=on-failure).",
            ),
            Para(
                "The unit uses none of the settings that give a service its own mount namespace \
                 (ProtectSystem=, ProtectHome=, PrivateTmp=, ReadWritePaths=, ...): the FUSE \
                 mount would then exist only inside the service. Do not add them in a drop-in.",
            ),
        ],
    },
    Section {
        title: "SIGNALS",
        blocks: &[
            Item(
                "SIGTERM, SIGINT",
                "Unmount and exit 0. If a program still has a file open, the mount is detached \
                 lazily (gone from the tree at once, released when the program lets go) and \
                 fhirfs still exits 0.",
            ),
            Item("SIGUSR1", "Log one line of statistics (also logged at exit)."),
            Item(
                "SIGHUP",
                "Logged and ignored: a closing terminal or session must not leave a dead mount.",
            ),
            Para(
                "fhirfs handles all four from before the mount exists, so a signal sent while it \
                 starts never kills it.",
            ),
        ],
    },
    Section {
        title: "ENVIRONMENT",
        blocks: &[
            Item("FHIRFS_TOKEN", "The bearer token (see TOKENS)."),
            Item("CREDENTIALS_DIRECTORY", "Set by systemd; its file token is a token source."),
            Item(
                "RUST_LOG",
                "Overrides --log-level, e.g. RUST_LOG=fhirfs=debug. Logs go to stderr (journald \
                 under systemd).",
            ),
        ],
    },
    Section {
        title: "FILES",
        blocks: &[
            Item(
                "/usr/bin/fhirfs",
                "The program, as packaged (/usr/local/bin/fhirfs after cargo install --root \
                 /usr/local). mount(8) looks for it in /usr/bin and /usr/local/bin.",
            ),
            Item("/usr/lib/systemd/system/fhirfs@.service", "The systemd template unit."),
            Item("/etc/fhirfs/example.conf", "The settings of a mount, explained."),
            Item("/etc/fhirfs/NAME.conf", "The settings of fhirfs@NAME.service."),
            Item("/etc/fhirfs/NAME.token", "Its token (owner root, mode 0600)."),
            Item("/dev/fuse", "The FUSE device."),
            Item(
                "/etc/fuse.conf",
                "user_allow_other lets users other than root mount with --allow-other.",
            ),
        ],
    },
    Section {
        title: "SEE ALSO",
        blocks: &[Para(
            "mount(8), umount(8), fstab(5), mount.fuse3(8), fusermount3(1), systemctl(1), \
             systemd.exec(5)",
        )],
    },
];

/// The titles of the sections written here, not by clap, in order.
pub fn hand_section_titles() -> impl Iterator<Item = &'static str> {
    std::iter::once(DESCRIPTION.title).chain(HAND_SECTIONS.iter().map(|s| s.title))
}

/// Writes the man page fhirfs(8), as roff. `date` goes in its footer (the packages give the
/// date of the commit, e.g. 2026-05-06, so that the same sources make the same page).
pub fn write_man_page(date: &str, out: &mut dyn Write) -> io::Result<()> {
    let command = Args::command();
    let notes = command.get_after_help().map(|h| h.to_string());
    // An empty date would drop out of the .TH line and shift the fields after it.
    let date = if date.is_empty() { "unknown date" } else { date };
    let man = Man::new(command)
        .title("FHIRFS")
        .section(MAN_SECTION)
        .date(date)
        .manual("System Administration");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    write_section(&DESCRIPTION, out)?;
    man.render_options_section(out)?;
    // The notes --help ends with, under a better title than clap's "EXTRA", each paragraph
    // on one line (--help breaks them for an 80-column terminal; man fills them itself).
    if let Some(notes) = notes {
        let mut roff = Roff::new();
        roff.control("SH", ["NOTES"]);
        for paragraph in notes.split("\n\n") {
            roff.control("PP", []).text([roman(paragraph.replace('\n', " "))]);
        }
        roff.to_writer(out)?;
    }
    for section in HAND_SECTIONS {
        write_section(section, out)?;
    }
    man.render_version_section(out)
}

/// Writes one hand-written section.
fn write_section(section: &Section, out: &mut dyn Write) -> io::Result<()> {
    let mut roff = Roff::new();
    roff.control("SH", [section.title]);
    for block in section.blocks {
        match block {
            Para(text) => roff.control("PP", []).text([roman(*text)]),
            Item(term, text) => roff.control("TP", []).text([bold(*term)]).text([roman(*text)]),
            Literal(lines) => {
                roff.control("PP", []).control("RS", ["4"]).control("nf", []);
                for line in *lines {
                    roff.text([roman(*line)]);
                }
                roff.control("fi", []).control("RE", [])
            }
        };
    }
    roff.to_writer(out)
}

/// Writes the completion script for `shell`.
pub fn write_completions(shell: Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Args::command(), "fhirfs", out);
}
