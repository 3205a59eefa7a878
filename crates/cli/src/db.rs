//! `rewind plan | upgrade | rollback | status`: the engine on a database.

use crate::Cli;
use indicatif::{ProgressBar, ProgressStyle};
use rewind_engine::plan::plan;
use rewind_engine::run::{run, Kind, Progress, RunOptions};
use rewind_engine::state::{now_ms, Database};
use rewind_engine::Project;
use rewind_store::Store as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Where the database is and which migrations apply to it.
#[derive(clap::Args)]
pub struct Target {
    /// The database: a CouchDB database URL such as
    /// http://admin:pass@127.0.0.1:5984/medic, or an embedded store's file.
    #[arg(long, value_name = "TARGET")]
    db: String,
    /// The migrations directory (default: from rewind.toml, else ./migrations).
    #[arg(long, value_name = "DIR")]
    migrations: Option<PathBuf>,
}

/// Show what an upgrade (or rollback) would do. Writes nothing.
///
/// Lists documents affected per migration and per type, sample before/after
/// diffs, the bytes rewritten, and what each phone will re-download.
#[derive(clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    target: Target,
    /// The version to plan for (default: the latest).
    #[arg(long, value_name = "N")]
    to: Option<u32>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// Upgrade every document to a newer schema version, journaled and resumable.
///
/// Streams documents in batches; writes each migrated document as a new
/// revision conditional on the one it read (a user's concurrent edit is
/// migrated, never overwritten); catches up on documents written during the
/// run; migrates every live leaf of a conflicted document. Killed at any
/// point, it finishes when run again, migrating no document twice.
#[derive(clap::Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    target: Target,
    /// The version to upgrade to (default: the latest).
    #[arg(long, value_name = "N")]
    to: Option<u32>,
    /// Documents per batch (default: 500 on CouchDB, 2000 on an embedded store).
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
}

/// Roll documents back to an older schema version, keeping every edit.
///
/// A rollback moves history forward and the schema back: documents untouched
/// since the upgrade get their journaled before-image (the same bytes) as a
/// new revision; documents edited since are translated down with their
/// complement, keeping the edit; documents created at the newer version are
/// translated down; deletions stay deleted. Resumable like an upgrade.
#[derive(clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    target: Target,
    /// The version to roll back to.
    #[arg(long, value_name = "N")]
    to: u32,
    /// Serve version N to phones at once (the gateway flips in under a
    /// second, translating on the fly), then rewrite the documents behind it.
    #[arg(long)]
    instant: bool,
    /// Documents per batch (default: 500 on CouchDB, 2000 on an embedded store).
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
}

/// Show the database's schema version, the run in progress, and the last runs.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The database: a CouchDB database URL or an embedded store's file.
    #[arg(long, value_name = "TARGET")]
    db: String,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

/// Caps glibc's malloc arenas. A run's batches are built on the store's
/// blocking threads and freed on the runtime's: with glibc's default of 8
/// arenas per core, the freed memory stays spread over many arenas and the
/// peak RSS of an upgrade grew by ~40% for nothing.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only changes allocator tuning; it runs before the
        // runtime starts any thread.
        unsafe {
            mallopt(M_ARENA_MAX, 2);
        }
    }
}

/// The runtime of a command: two worker threads.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A documents progress bar on standard error (hidden when it is not a terminal).
pub(crate) fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} docs  {rate}  ETA {eta}  {msg}",
        )
        .map(|style| {
            // Whole documents per second (`{per_sec}` shows three decimals).
            style.with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} docs/s", state.per_sec());
                },
            )
        })
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

fn execute(
    cli: &Cli,
    target: &Target,
    to: Option<u32>,
    opts: RunOptions,
) -> anyhow::Result<ExitCode> {
    let project = Project::load(cli.config.as_deref(), target.migrations.as_deref())?;
    let set = project.migrations;
    limit_malloc_arenas();
    let rt = runtime()?;
    rt.block_on(async {
        let db = Database::open(&target.db).await?;
        let to = to.unwrap_or(set.latest());
        let bar = progress_bar();
        let started = Instant::now();
        let mut on_progress = |p: &Progress| {
            bar.set_length(p.total.max(p.counts.read));
            bar.set_position(p.counts.read);
            bar.set_message(format!(
                "{} written, {} retried",
                p.counts.written, p.counts.retried
            ));
        };
        let finished = run(&db, &set, to, &opts, &mut on_progress).await?;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let c = &finished.counts;
        println!(
            "{} {} → {}: done in {:.1} s{}",
            finished.kind,
            finished.from,
            finished.to,
            secs,
            if finished.resumed > 0 {
                format!(" (resumed {} times)", finished.resumed)
            } else {
                String::new()
            }
        );
        println!("  documents read      {:>10}", c.read);
        println!(
            "  documents written   {:>10}   ({:.0} docs/s)",
            c.written,
            c.written as f64 / secs
        );
        if finished.kind == "rollback" {
            println!(
                "  restored exactly    {:>10}   (before-image, byte for byte)",
                c.restored
            );
            println!(
                "  translated down     {:>10}   (edited or created since the upgrade)",
                c.written - c.restored
            );
        }
        println!("  redone after edits  {:>10}", c.retried);
        println!("  bytes written       {:>10}", c.bytes);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn upgrade(cli: &Cli, args: &UpgradeArgs) -> anyhow::Result<ExitCode> {
    let opts = RunOptions {
        batch: args.batch.unwrap_or(0),
        only: Some(Kind::Upgrade),
        ..RunOptions::default()
    };
    execute(cli, &args.target, args.to, opts)
}

pub fn rollback(cli: &Cli, args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    let opts = RunOptions {
        batch: args.batch.unwrap_or(0),
        instant: args.instant,
        only: Some(Kind::Rollback),
        ..RunOptions::default()
    };
    execute(cli, &args.target, Some(args.to), opts)
}

pub fn plan_cmd(cli: &Cli, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let project = Project::load(cli.config.as_deref(), args.target.migrations.as_deref())?;
    let rt = runtime()?;
    rt.block_on(async {
        let db = Database::inspect(&args.target.db).await?;
        let bar = progress_bar();
        bar.set_length(db.data.info().await?.doc_count);
        let p = plan(&db, &project.migrations, args.to, 1000, &mut |read| {
            bar.set_position(read)
        })
        .await?;
        bar.finish_and_clear();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&p)?);
            return Ok(ExitCode::SUCCESS);
        }
        let color = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let (red, green, reset) = if color { ("\x1b[31m", "\x1b[32m", "\x1b[0m") } else { ("", "", "") };
        println!("plan for {}: version {} → {} (nothing is written)", db.name, p.from, p.to);
        for m in &p.migrations {
            let total: u64 = m.by_type.values().sum();
            let types: Vec<String> = m.by_type.iter().map(|(t, n)| format!("{t}: {n}")).collect();
            println!("\n  {}  {} documents  ({})", m.id, total, types.join(", "));
            for s in &m.samples {
                println!("    {}", s.id);
                for (path, before, after) in &s.fields {
                    let shown = |v: &Option<serde_json::Value>| match v {
                        Some(v) => v.to_string(),
                        None => "(absent)".to_owned(),
                    };
                    let (before, after) = (shown(before), shown(after));
                    println!("      {path}: {red}- {before}{reset}  {green}+ {after}{reset}");
                }
            }
        }
        println!(
            "\n  {} of {} documents rewritten, {} bytes; every phone that syncs this database re-downloads those {} documents",
            p.rewritten, p.docs, p.bytes, p.rewritten
        );
        if p.rewritten > 0 {
            println!(
                "  (through rewind serve each comes as the phone's view plus small tombstones that retire\n   \
                 the views other versions were shown: docs/design.md, \"Known limits\", has the measured count)"
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let db = Database::inspect(&args.db).await?;
        let state = &db.state;
        let live = state.lease.as_ref().filter(|lease| lease.is_live());
        if args.json {
            // The state as stored, and whether a process is running its run
            // now (what the lease alone does not say: its holder may be dead).
            let mut shown = serde_json::to_value(state)?;
            if let Some(object) = shown.as_object_mut() {
                object.insert("running_now".into(), live.is_some().into());
            }
            println!("{}", serde_json::to_string_pretty(&shown)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!("{}: schema version {}", db.name, state.version);
        if let Some(served) = state.served {
            println!("  serving version {served} to phones (instant rollback in progress)");
        }
        for (i, a) in state.applied.iter().enumerate() {
            println!("  {:>3}  {}  {}", i + 1, a.id, &a.checksum[..12.min(a.checksum.len())]);
        }
        match &state.run {
            Some(r) => {
                let checkpoint = match &r.by_id {
                    Some(pass) if pass.after.is_empty() => "first pass (in id order) not started".to_owned(),
                    Some(pass) => format!("first pass (in id order) done up to {}", pass.after),
                    None => format!("changes feed done up to sequence {}", r.since),
                };
                let docs = db.data.info().await?.doc_count;
                println!(
                    "run in progress: {} {} → {}, {} of {docs} documents read, {} written, {checkpoint}",
                    r.kind, r.from, r.to, r.counts.read, r.counts.written
                );
                match live {
                    Some(lease) => println!(
                        "  running now in {} (its lease is renewed as it goes; {} s left)",
                        lease.owner,
                        lease.expires.saturating_sub(now_ms()) / 1000
                    ),
                    None => {
                        let why = r
                            .interruption()
                            .unwrap_or("its process ended without finishing");
                        println!("  stopped ({why}): run `rewind {} --to {}` to finish it", r.kind, r.to)
                    }
                }
            }
            None => println!("no run in progress"),
        }
        if let (Some(lease), None) = (live, &state.run) {
            println!("lease held by {}", lease.owner);
        }
        if !state.history.is_empty() {
            println!("last runs:");
            for r in state.history.iter().rev().take(5) {
                let secs = r.finished.unwrap_or(r.started).saturating_sub(r.started) as f64 / 1000.0;
                let instant = if r.instant { " (instant)" } else { "" };
                println!(
                    "  {} {} → {}{instant}  {}  {} written in {:.1} s",
                    r.kind, r.from, r.to, r.outcome, r.counts.written, secs
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
