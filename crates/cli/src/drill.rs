use crate::Cli;
use rewind_drill::{run, DrillOptions, MIN_DEVICES};
use std::path::PathBuf;
use std::process::ExitCode;

/// Rehearse the disaster: upgrade, roll back, re-upgrade and restore a
/// snapshot, with simulated phones syncing through the gateway, and check
/// every invariant.
///
/// With no flags it runs on a temporary embedded store with built-in sample
/// data and the built-in examples/cht migrations; with --db, on a copy of
/// your own database (your database is only read). Phones sync, go offline,
/// edit at their version and switch version while the drill upgrades during
/// traffic, rolls back (instant), brings offline phones back with edits at
/// both versions, re-upgrades, and restores the server from a snapshot taken
/// before the upgrade. It prints a step table and each invariant of the
/// design: "holds", or a counterexample. Exit status 1 if any fails.
#[derive(clap::Args)]
pub struct Args {
    /// Sample documents.
    #[arg(long, default_value_t = 300, value_name = "N")]
    docs: u64,
    /// Simulated phones (at least 3).
    #[arg(long, default_value_t = 5, value_name = "D")]
    devices: usize,
    /// Seed of the sample data and of every random choice.
    #[arg(long, default_value_t = 1, value_name = "S")]
    seed: u64,
    /// Drill on a copy of this database (CouchDB URL or embedded file).
    #[arg(long, value_name = "TARGET")]
    db: Option<String>,
    /// Migrations to drill (default: the built-in examples/cht).
    #[arg(long, value_name = "DIR")]
    migrations: Option<PathBuf>,
    /// Also kill the upgrade/rollback process with SIGKILL at random points.
    #[arg(long)]
    kill: bool,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

pub fn run_drill(_cli: &Cli, args: &Args) -> anyhow::Result<ExitCode> {
    if args.devices < MIN_DEVICES {
        anyhow::bail!(
            "--devices {}: the drill needs at least {MIN_DEVICES} phones (one following /medic, one \
             pinned at the old version that moves, one that goes offline)",
            args.devices
        );
    }
    let migrations = match &args.migrations {
        Some(dir) => Some(rewind_engine::project::read_migration_files(dir)?),
        None => None,
    };
    let opts = DrillOptions {
        docs: args.docs,
        devices: args.devices,
        seed: args.seed,
        db: args.db.clone(),
        migrations,
        kill: args.kill,
        rewind_bin: std::env::current_exe().ok(),
        work_dir: None,
        verbose: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(opts))?;
    println!(
        "rewind drill: {} documents, {} phones, seed {}, v{} → v{}{}",
        report.docs,
        report.devices,
        report.seed,
        report.versions.0,
        report.versions.1,
        if args.kill {
            format!(", {} SIGKILLs", report.kills)
        } else {
            String::new()
        }
    );
    println!();
    println!(
        "{:<4} {:<78} {:>7} {:>9} {:>9}  downloaded per phone (KB)",
        "step", "", "time s", "docs", "docs/s"
    );
    for (i, step) in report.steps.iter().enumerate() {
        let kb: Vec<String> = step
            .downloaded
            .iter()
            .map(|b| format!("{}", b / 1024))
            .collect();
        println!(
            "{:<4} {:<78} {:>7.2} {:>9} {:>9.0}  {}",
            i + 1,
            step.name,
            step.seconds,
            step.docs,
            step.docs_per_sec,
            kb.join(" ")
        );
    }
    println!();
    println!("invariants ({} edits made on phones):", report.edits);
    for inv in &report.invariants {
        println!(
            "  {}. {:<70} {} ({} checked)",
            inv.number,
            inv.name,
            if inv.holds { "holds" } else { "FAILS" },
            inv.checked
        );
        for c in &inv.counterexamples {
            println!("       document {} on {}:", c.document, c.place);
            println!("         expected {}", c.expected);
            println!("         found    {}", c.found);
        }
    }
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("\nreport written to {}", path.display());
    }
    Ok(if report.holds {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
