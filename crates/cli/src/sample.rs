use std::io::{BufWriter, Write};
use std::process::ExitCode;

/// Write deterministic sample documents shaped like Community Health Toolkit
/// data (reports, persons, places): one JSON document per line on stdout, or
/// into a database with --db.
///
/// Document i depends only on the seed and i, so `--docs 100` is a prefix of
/// `--docs 1000`. Tests, benches and the drill use the same data.
#[derive(clap::Args)]
pub struct Args {
    /// How many documents.
    #[arg(long, default_value_t = 1000)]
    docs: u64,
    /// The seed: the same seed gives the same documents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write them into this database (a CouchDB URL or an embedded store's
    /// file, created if missing) instead of stdout.
    #[arg(long, value_name = "TARGET")]
    db: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if let Some(target) = &args.db {
        return crate::db::runtime()?.block_on(async {
            let store = rewind_store::open(target).await?;
            let bar = crate::db::progress_bar();
            bar.set_length(args.docs);
            let started = std::time::Instant::now();
            let loaded = rewind_engine::load::load(
                &store,
                rewind_sample::docs(args.docs, args.seed),
                1000,
                &mut |done| bar.set_position(done),
            )
            .await?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let present = match loaded.present {
                0 => String::new(),
                n => format!("; {n} were there already"),
            };
            println!(
                "sample: {} documents written to {} in {secs:.1} s ({:.0} docs/s){present}",
                loaded.written,
                rewind_store::redact_url(target),
                loaded.written as f64 / secs
            );
            Ok(ExitCode::SUCCESS)
        });
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for doc in rewind_sample::docs(args.docs, args.seed) {
        match writeln!(out, "{doc}") {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
            other => other?,
        }
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        other => other.map(|_| ExitCode::SUCCESS).map_err(Into::into),
    }
}
