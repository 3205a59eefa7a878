//! `rewind`: reversible schema upgrades for CouchDB/PouchDB apps.
//!
//! The binary is thin: it parses arguments, calls a library function and
//! prints. No decision about documents, revisions or versions lives here.

mod check;
mod copy;
mod db;
mod drill;
mod hash_password;
mod sample;
mod serve;
mod translate;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc: the engine and the gateway build and drop many small JSON
/// values; the system allocator spent about a third of their CPU time.
/// Built without transparent huge pages (`no_thp` in Cargo.toml): with
/// them every purged span came back as a fresh 2 MiB page the kernel
/// zeroed (6% of an upgrade's CPU) and peak RSS was ~40 MB higher; without,
/// mimalloc's default purge delay (1 s) costs no more memory than 50 ms did
/// with them (a 1M-document rollback peaked at 139 MB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Reversible schema upgrades for offline-first CouchDB/PouchDB apps.
///
/// Migrations are YAML files in a directory (default ./migrations), applied in
/// file-name order; version N means "the first N files applied". Every
/// migration defines its own reverse, so an upgrade can always be rolled back.
///
/// Start with `rewind check --migrations examples/cht` to see a migration set
/// checked, and `rewind sample --docs 5` to see the sample data.
#[derive(Parser)]
#[command(name = "rewind", version, about, long_about, max_term_width = 100)]
struct Cli {
    /// Configuration file (default: ./rewind.toml when it exists).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Check(check::Args),
    Plan(db::PlanArgs),
    Upgrade(db::UpgradeArgs),
    Rollback(db::RollbackArgs),
    Status(db::StatusArgs),
    Serve(serve::Args),
    Drill(drill::Args),
    HashPassword(hash_password::Args),
    Translate(translate::Args),
    Copy(copy::Args),
    Sample(sample::Args),
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Check(args) => check::run(&cli, args),
        Command::Plan(args) => db::plan_cmd(&cli, args),
        Command::Upgrade(args) => db::upgrade(&cli, args),
        Command::Rollback(args) => db::rollback(&cli, args),
        Command::Status(args) => db::status(args),
        Command::Serve(args) => serve::run(&cli, args),
        Command::Drill(args) => drill::run_drill(&cli, args),
        Command::HashPassword(args) => hash_password::run(args),
        Command::Translate(args) => translate::run(&cli, args),
        Command::Copy(args) => copy::run(args),
        Command::Sample(args) => sample::run(args),
    };
    // Embedded files are left whole: their write-ahead logs emptied into
    // them, so that copying a `.db` file alone copies every commit.
    rewind_store::sqlite::settle_all();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes, `: `-separated, each cause left out when the text
/// before it already says it (most errors print their source in their own
/// message: `{e:#}` would say it twice).
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Dies quietly on a closed pipe (`rewind plan | head`), like other Unix tools.
fn restore_sigpipe() {
    #[cfg(unix)]
    {
        extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
        }
        const SIGPIPE: i32 = 13;
        const SIG_DFL: usize = 0;
        // SAFETY: resetting a signal's disposition to the default has no
        // preconditions; it runs first thing, before any thread starts.
        unsafe {
            signal(SIGPIPE, SIG_DFL);
        }
    }
}
