use crate::Cli;
use anyhow::Context;
use rewind_engine::offline::{check, read_json_lines};
use rewind_engine::{EngineError, Project};
use rewind_lens::laws::{LAW_EDIT_NEW, LAW_EDIT_OLD};
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

/// Check every migration file: well-formed, reversible, and the round-trip
/// laws down(up(d)) = d and up(down(d)) = d hold.
///
/// Malformed or irreversible files are reported as file:line:column and a
/// reason. A third law: what a step keeps aside (its complement) never
/// undoes an edit made since at the other version (a leaf of the document
/// changed, or a field cleared, in either shape shows after translating
/// it). The laws are
/// checked on every sample document (JSON lines, at
/// version 0; default: 500 built-in sample documents) and on documents
/// generated from each migration's selectors and operations. Exit status 1
/// on any failure.
#[derive(clap::Args)]
pub struct Args {
    /// The migrations directory (default: from rewind.toml, else ./migrations).
    #[arg(long, value_name = "DIR")]
    migrations: Option<PathBuf>,
    /// Sample documents, one JSON object per line, at version 0.
    #[arg(long, value_name = "FILE.jsonl")]
    sample: Option<PathBuf>,
    /// Generated documents per migration.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    generated: u32,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<ExitCode> {
    let project = match Project::load(cli.config.as_deref(), args.migrations.as_deref()) {
        Ok(p) => p,
        Err(EngineError::Migrations(errors)) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "check: {} migration file(s) refused; nothing was checked further",
                errors.len()
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    let (samples, source) = match &args.sample {
        Some(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            (
                read_json_lines(path, BufReader::new(file))?,
                path.display().to_string(),
            )
        }
        None => (
            rewind_sample::docs(500, 1).collect(),
            "built-in sample".to_owned(),
        ),
    };
    let report = check(&project.migrations, &samples, args.generated);
    println!(
        "{} migrations in {}, {} sample documents from {}, {} generated per migration",
        report.migrations.len(),
        project.migrations_dir.display(),
        samples.len(),
        source,
        args.generated
    );
    println!(
        "{:<4} {:<34} {:>3} {:<10} {:>15} {:>15}  {:<8} laws",
        "v", "migration", "ops", "when_after", "sample applied", "generated appl", "checksum"
    );
    for (index, (id, checksum, derived, ops, r)) in report.migrations.iter().enumerate() {
        println!(
            "{:<4} {:<34} {:>3} {:<10} {:>15} {:>15}  {:<8} {}",
            index + 1,
            id,
            ops,
            if *derived { "derived" } else { "stated" },
            format!("{}/{}", r.sample_applied, r.sample_docs),
            format!("{}/{}", r.generated_applied, r.generated_docs),
            &checksum[..8],
            if r.broken.is_empty() {
                "hold"
            } else {
                "BROKEN"
            }
        );
    }
    for (id, _, _, _, r) in &report.migrations {
        for b in &r.broken {
            eprintln!("{id}: {} fails for {}", b.law, b.doc_id);
            eprintln!("  input:    {}", b.input);
            eprintln!("  expected: {}", b.expected);
            eprintln!("  found:    {}", b.found);
            if [LAW_EDIT_NEW, LAW_EDIT_OLD].contains(&b.law) {
                eprintln!(
                    "  hint:     what the step kept aside undid the edit; use it only while the document still matches it (docs/runbook.md, \"Write a reversible migration\")"
                );
            }
        }
    }
    if report.holds() {
        println!("check: every migration is reversible and its laws hold");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("check: laws broken (details on stderr)");
        Ok(ExitCode::FAILURE)
    }
}
