//! The `fhirfs` command: parse arguments, go to the background if mount(8) started us, set
//! up logging, run, report errors.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use fhirfs::cli::{self, Args};
use fhirfs::daemon::{self, Readiness};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let argv = match cli::expand_mount_options(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("fhirfs: {e}");
            return ExitCode::from(2);
        }
    };
    let args = Args::parse_from(argv);
    // Forking is only safe while there is one thread: before logging and the runtime.
    let readiness = if !args.foreground && daemon::started_by_mount() {
        match daemon::background() {
            Ok(readiness) => readiness,
            Err(e) => {
                eprintln!("fhirfs: cannot go to the background: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        Readiness::foreground()
    };
    // fuser warns when its drop-time unmount finds the mount already gone (an external
    // umount); that is the normal way to stop, not a problem.
    let quiet = "fuser::mnt=error";
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{},{quiet}", args.log_level)))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{quiet}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match fhirfs::run::main(args, readiness) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fhirfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
