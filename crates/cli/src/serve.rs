use crate::Cli;
use anyhow::Context;
use rewind_engine::Project;
use rewind_gateway::{Backend, GatewayConfig};
use std::path::PathBuf;
use std::process::ExitCode;

/// Serve the CouchDB replication protocol so that unmodified PouchDB phones
/// at different schema versions sync at once.
///
/// A phone chooses its version by URL prefix, `/v/{N}/{db}` (or the
/// X-Rewind-Version header); `/{db}` serves the database's current version.
/// A phone that names itself (`/v/{N}/_device/{id}/{db}`, or the
/// X-Rewind-Device header) may also move down a version, or from `/{db}`
/// to a version: its next pull brings that version's shape
/// (docs/runbook.md, "Which URL a phone syncs with").
/// Pulled documents are translated to the phone's version, pushed ones to the
/// server's, with complements kept. Revision ids are derived from what they
/// hold, so every gateway answers alike, a phone that switches version
/// converges in one sync, and a migration never shows up on a phone as a
/// conflict with an edit already pushed. The price is download size: after
/// an upgrade a phone receives each rewritten document as its view plus
/// small tombstones retiring the views other versions were shown (see
/// `rewind plan` and docs/design.md, "Known limits").
///
/// A request the gateway fails with a 5xx of its own (a store it cannot
/// reach, a translation that failed) is written to standard error: method,
/// path, status and reason.
///
/// Example: rewind serve --data ./data --migrations examples/cht
#[derive(clap::Args)]
pub struct Args {
    /// Serve embedded stores from this directory, one file per database
    /// (`{db}.db`).
    #[arg(long, value_name = "DIR", conflicts_with = "couch")]
    data: Option<PathBuf>,
    /// Serve a CouchDB server (its root URL, e.g. http://127.0.0.1:5984);
    /// each user's own credentials are passed through.
    #[arg(long, value_name = "URL")]
    couch: Option<String>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:5987", value_name = "ADDR")]
    listen: String,
    /// The migrations directory (default: from rewind.toml, else ./migrations).
    #[arg(long, value_name = "DIR")]
    migrations: Option<PathBuf>,
    /// In front of CouchDB: the databases phones sync (default: medic); the
    /// uuid at `/` changes when their served version does.
    #[arg(long = "db", value_name = "NAME", default_value = "medic")]
    databases: Vec<String>,
}

/// Threads for blocking work (embedded store reads and writes).
const BLOCKING_THREADS: usize = 32;

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<ExitCode> {
    let project = Project::load(cli.config.as_deref(), args.migrations.as_deref())?;
    let backend = match (&args.data, &args.couch) {
        (Some(dir), None) => {
            if !dir.is_dir() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot make the data directory {}", dir.display()))?;
                // Said, in case the path was mistyped: nothing is served yet.
                eprintln!(
                    "rewind serve: made {}, which holds no database yet (`PUT /{{db}}` makes one)",
                    dir.display()
                );
            }
            Backend::Embedded(dir.clone())
        }
        (None, Some(url)) if rewind_store::is_url(url) => Backend::Couch(url.clone()),
        (None, Some(url)) => anyhow::bail!(
            "--couch {url}: not an http:// or https:// URL (the CouchDB server's root, e.g. \
             http://127.0.0.1:5984)"
        ),
        _ => anyhow::bail!(
            "give either --data DIR (embedded stores) or --couch URL (a CouchDB server)"
        ),
    };
    let shown = match &backend {
        Backend::Embedded(dir) => format!("embedded stores in {}", dir.display()),
        Backend::Couch(url) => rewind_store::redact_url(url),
    };
    // Embedded reads run on blocking threads, each with its own SQLite
    // connections and page caches: with tokio's default (512 threads), 50
    // live PouchDB clients grew the gateway to ~270 threads and ~1 GB.
    // Reads wait for a thread instead.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        // Said once listening (scripts wait for this line): the address
        // bound, so `--listen 127.0.0.1:0` tells its port.
        let bound = listener
            .local_addr()
            .map_or_else(|_| args.listen.clone(), |a| a.to_string());
        eprintln!(
            "rewind serve: {} migrations, serving {shown} on http://{bound} (versions /v/0 .. /v/{})",
            project.migrations.latest(),
            project.migrations.latest()
        );
        if let (Backend::Embedded(_), true) = (&backend, project.config.users.is_empty()) {
            // Said after the line scripts wait for: who may do what.
            let reach = if listener.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
                "this machine"
            } else {
                "the network"
            };
            eprintln!(
                "rewind serve: no [[users]] in rewind.toml: every request is served as an admin \
                 (anyone on {reach} who reaches http://{bound} may read, write and delete every \
                 database; `rewind hash-password --help` shows how to add users)"
            );
        }
        rewind_gateway::serve(
            GatewayConfig {
                backend,
                migrations: project.migrations,
                databases: args.databases.clone(),
                users: project.config.users.clone(),
                log_errors: true,
            },
            listener,
        )
        .await?;
        Ok(ExitCode::SUCCESS)
    })
}
