use std::io::{BufWriter, Write};
use std::process::ExitCode;

/// Write deterministic sample documents shaped like Community Health Toolkit
/// data (reports, persons, places), one JSON document per line.
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
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
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
