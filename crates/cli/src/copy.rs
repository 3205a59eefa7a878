use indicatif::{ProgressBar, ProgressStyle};
use rewind_store::Store;
use std::process::ExitCode;

/// Copy a database between any two targets, replication-style: every
/// revision tree, conflict, tombstone and attachment, and `_local` documents
/// from an embedded source.
///
/// SRC and DST are CouchDB database URLs (http://admin:pass@127.0.0.1:5984/medic)
/// or embedded store files (created if missing). Interrupted, it resumes
/// where it stopped when run again. This is how to rehearse on a copy of
/// production: `rewind copy http://.../medic ./rehearsal/medic.db`.
#[derive(clap::Args)]
pub struct Args {
    /// The database to copy from (only read).
    #[arg(value_name = "SRC")]
    src: String,
    /// The database to copy into (created if missing).
    #[arg(value_name = "DST")]
    dst: String,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let src = rewind_store::open(&args.src).await?;
        if !src.exists().await? {
            anyhow::bail!("{}: the database does not exist", rewind_store::redact_url(&args.src));
        }
        let dst = rewind_store::open(&args.dst).await?;
        if !dst.exists().await? {
            dst.create_db().await?;
        }
        let total = src.info().await?.doc_count;
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} docs  {per_sec}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let started = std::time::Instant::now();
        let report = rewind_store::copy(&src, &dst, |p| bar.set_position(p.docs_seen)).await?;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        println!(
            "copy {} → {}: {} documents, {} revisions copied, {} local documents, in {:.1} s ({:.0} docs/s){}",
            rewind_store::redact_url(&args.src),
            rewind_store::redact_url(&args.dst),
            report.docs_seen,
            report.revs_copied,
            report.local_copied,
            secs,
            report.docs_seen as f64 / secs,
            if report.resumed_from != 0 {
                format!(" (resumed from sequence {})", report.resumed_from)
            } else {
                String::new()
            }
        );
        Ok(ExitCode::SUCCESS)
    })
}
