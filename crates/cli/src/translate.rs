use crate::Cli;
use anyhow::Context;
use rewind_engine::offline::ComplementFile;
use rewind_engine::Project;
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Translate documents between schema versions: JSON lines on stdin, the
/// same documents at version B on stdout.
///
/// Going up, what each step drops is appended to the complements file (JSON
/// lines keyed by `_id` and migration); going down, it is read back from it,
/// so up then down with the same file gives back every document as it was.
/// Without --complements, going down restores defaults (as for documents
/// created at the newer version).
#[derive(clap::Args)]
pub struct Args {
    /// The version the input documents are at.
    #[arg(long, value_name = "A")]
    from: u32,
    /// The version to translate them to.
    #[arg(long, value_name = "B")]
    to: u32,
    /// The complements file: appended to going up, read going down.
    #[arg(long, value_name = "FILE")]
    complements: Option<PathBuf>,
    /// The migrations directory (default: from rewind.toml, else ./migrations).
    #[arg(long, value_name = "DIR")]
    migrations: Option<PathBuf>,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<ExitCode> {
    let project = Project::load(cli.config.as_deref(), args.migrations.as_deref())?;
    let set = &project.migrations;
    for v in [args.from, args.to] {
        anyhow::ensure!(
            v <= set.latest(),
            "version {v} does not exist: the migrations in {} go from 0 to {}",
            project.migrations_dir.display(),
            set.latest()
        );
    }
    let mut file = match &args.complements {
        Some(path) => ComplementFile::read(path, set)?,
        None => ComplementFile::empty(set),
    };
    let mut writer = match (&args.complements, args.to > args.from) {
        (Some(path), true) => Some(BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        )),
        _ => None,
    };
    // Read everything first: bad input is reported before anything is written.
    let stdin = std::io::stdin();
    let mut docs = Vec::new();
    for (index, line) in stdin.lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let (doc, style) = rewind_lens::json_text::parse(&line)
            .with_context(|| format!("stdin:{}: not a JSON document", index + 1))?;
        anyhow::ensure!(
            doc.is_object(),
            "stdin:{}: a document must be a JSON object",
            index + 1
        );
        docs.push((doc, style));
    }
    let mut translated = Vec::with_capacity(docs.len());
    for (index, (mut doc, style)) in docs.into_iter().enumerate() {
        let id = doc
            .get("_id")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .with_context(|| format!("stdin:{}: a document needs a string `_id`", index + 1))?;
        let out = writer.as_mut().map(|w| w as &mut dyn Write);
        let mut kept = file.for_doc(&id, out);
        set.translate(&mut doc, args.from, args.to, &mut kept)
            .with_context(|| format!("stdin:{}: document {id}", index + 1))?;
        if let Some(e) = kept.error.take() {
            return Err(e).context("cannot write the complements file");
        }
        translated.push(rewind_lens::json_text::to_string(&doc, style));
    }
    if let Some(w) = writer.as_mut() {
        w.flush().context("cannot write the complements file")?;
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for doc in translated {
        writeln!(out, "{doc}")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
