//! Writes the man page and the shell completions that the packages install, made from the
//! same clap definitions as `fhirfs --help` (`src/manpage.rs`). scripts/package runs it:
//!
//! ```sh
//! cargo run --example package_assets -- DIR DATE
//! ```
//!
//! writes `DIR/fhirfs.8` (DATE, e.g. 2026-05-06, in its footer) and `DIR/completions/{fhirfs,_fhirfs,fhirfs.fish}` (bash, zsh, fish).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use fhirfs::manpage::{self, COMPLETIONS, MAN_SECTION};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, date] = args.as_slice() else {
        anyhow::bail!("usage: package_assets DIR DATE");
    };
    let dir = PathBuf::from(dir);
    let completions = dir.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("cannot create {}", completions.display()))?;

    let man = dir.join(format!("fhirfs.{MAN_SECTION}"));
    write(&man, |out| manpage::write_man_page(date, out))?;
    for (shell, name) in COMPLETIONS {
        write(&completions.join(name), |out| {
            manpage::write_completions(shell, out);
            Ok(())
        })?;
    }
    Ok(())
}

/// Creates `path` and fills it with `fill`.
fn write(
    path: &std::path::Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut out = BufWriter::new(
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    fill(&mut out)
        .and_then(|()| out.flush())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
