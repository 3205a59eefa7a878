use rewind_store::Store;
use std::process::ExitCode;

/// Copy a database between any two targets, replication-style: every
/// revision tree, conflict, tombstone and attachment, and `_local` documents
/// from an embedded source.
///
/// SRC and DST are CouchDB database URLs (http://admin:pass@127.0.0.1:5984/medic)
/// or embedded store files (created if missing). Interrupted, it resumes
/// where it stopped when run again. This is how to rehearse on a copy of
/// production: `rewind copy --with-companion http://.../medic ./rehearsal/medic.db`.
///
/// A database's companion (rewind's state and journal: `<db>-rewind` on
/// CouchDB, tables inside an embedded file) is a database of its own: copy
/// it with `--with-companion`, or alone as `rewind copy SRC-rewind DST-rewind`.
#[derive(clap::Args)]
pub struct Args {
    /// The database to copy from (only read).
    #[arg(value_name = "SRC")]
    src: String,
    /// The database to copy into (created if missing).
    #[arg(value_name = "DST")]
    dst: String,
    /// Also copy SRC's companion (its schema version, runs and journal, what
    /// a rollback needs) into DST's, when SRC has one.
    #[arg(long)]
    with_companion: bool,
    /// Changes read from SRC per batch; each batch is checkpointed on DST.
    /// Two batches' documents are held in memory at most: lower it for
    /// large documents or attachments.
    #[arg(long, value_name = "N", default_value_t = rewind_store::DEFAULT_COPY_BATCH,
          value_parser = positive)]
    batch: usize,
}

/// A batch size: a whole number of at least 1.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    crate::db::runtime()?.block_on(async {
        let src = rewind_store::open(&args.src).await?;
        if !src.exists().await? {
            anyhow::bail!(
                "{}: the database does not exist",
                rewind_store::redact_url(&args.src)
            );
        }
        let companion = if args.with_companion {
            rewind_engine::state::existing_companion(&args.src, &src).await?
        } else {
            None
        };
        copy_one(&src, &args.src, &args.dst, args.batch).await?;
        if let Some(companion) = companion {
            let dst = rewind_engine::state::companion_target(&args.dst);
            copy_one(
                &companion,
                &rewind_engine::state::companion_target(&args.src),
                &dst,
                args.batch,
            )
            .await?;
        } else if args.with_companion {
            println!(
                "{} has no companion (rewind never ran on it): nothing more to copy",
                rewind_store::redact_url(&args.src)
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Copies the open database `src` (named `src_name`) into `dst_name`, with
/// a progress bar and a one-line report.
async fn copy_one(
    src: &rewind_store::AnyStore,
    src_name: &str,
    dst_name: &str,
    batch: usize,
) -> anyhow::Result<()> {
    let dst = rewind_store::open(dst_name).await?;
    if !dst.exists().await? {
        dst.create_db().await?;
    }
    let bar = crate::db::progress_bar();
    bar.set_length(src.info().await?.doc_count);
    let started = std::time::Instant::now();
    let report =
        rewind_store::copy_in_batches(src, &dst, batch, |p| bar.set_position(p.docs_seen)).await?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(0.001);
    println!(
            "copy {} → {}: {} documents, {} revisions copied, {} local documents, in {:.1} s ({:.0} docs/s){}",
            rewind_store::redact_url(src_name),
            rewind_store::redact_url(dst_name),
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
    Ok(())
}
