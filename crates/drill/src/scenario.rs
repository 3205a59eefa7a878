//! The drill's scenario, step by step.

use crate::checks::{self, Expectations};
use crate::{builtin_migrations, step_error, DrillError};
use rewind_engine::run::{run as engine_run, RunOptions};
use rewind_gateway::{Backend, Gateway, GatewayConfig};
use rewind_lens::MigrationSet;
use rewind_replicator::Phone;
use rewind_store::{AnyStore, Store};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fewest phones the scenario has parts for: one following `/medic`,
/// one pinned at the old version that moves, one that goes offline.
pub const MIN_DEVICES: usize = 3;

/// What to drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// Sample documents (ignored with `db`).
    pub docs: u64,
    /// Simulated phones (at least [`MIN_DEVICES`]: fewer count as that many).
    pub devices: usize,
    /// Seed of the sample data and of every random choice.
    pub seed: u64,
    /// Drill on a copy of this database (a CouchDB URL or an embedded file).
    pub db: Option<String>,
    /// The migration files (default: the built-in `examples/cht`).
    pub migrations: Option<Vec<(PathBuf, String)>>,
    /// Kill the upgrade/rollback process (this binary) with SIGKILL at
    /// random points of every run; needs `rewind_bin`.
    pub kill: bool,
    /// The `rewind` binary for `kill` mode.
    pub rewind_bin: Option<PathBuf>,
    /// Where to work (default: a temporary directory, removed afterwards).
    pub work_dir: Option<PathBuf>,
    /// Called with each step's result as it finishes.
    pub verbose: bool,
}

impl Default for DrillOptions {
    fn default() -> DrillOptions {
        DrillOptions {
            docs: 300,
            devices: 5,
            seed: 1,
            db: None,
            migrations: None,
            kill: false,
            rewind_bin: None,
            work_dir: None,
            verbose: false,
        }
    }
}

/// One step of the drill.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// What happened.
    pub name: String,
    /// How long it took.
    pub seconds: f64,
    /// Documents written by the engine, or pulled by phones.
    pub docs: u64,
    /// `docs / seconds`.
    pub docs_per_sec: f64,
    /// Bytes each phone downloaded during the step.
    pub downloaded: Vec<u64>,
}

/// A counterexample to an invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Counterexample {
    /// The document.
    pub document: String,
    /// Where: `server` or a phone's name.
    pub place: String,
    /// What the invariant requires.
    pub expected: String,
    /// What was found.
    pub found: String,
}

/// One invariant of shared/design.md, checked.
#[derive(Debug, Clone, Serialize)]
pub struct InvariantResult {
    /// Its number in the design.
    pub number: u8,
    /// Its name.
    pub name: String,
    /// True when it holds.
    pub holds: bool,
    /// How many facts were checked.
    pub checked: u64,
    /// The first counterexamples.
    pub counterexamples: Vec<Counterexample>,
}

/// The drill's report.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    /// Documents in the database.
    pub docs: u64,
    /// Phones.
    pub devices: usize,
    /// The seed.
    pub seed: u64,
    /// The version drilled from and to.
    pub versions: (u32, u32),
    /// Processes killed with SIGKILL.
    pub kills: u32,
    /// Edits made on phones.
    pub edits: u64,
    /// The steps, in order.
    pub steps: Vec<StepResult>,
    /// The invariants.
    pub invariants: Vec<InvariantResult>,
    /// True when every invariant holds.
    pub holds: bool,
}

/// A simple deterministic generator (xorshift64*).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Where a phone syncs: the server's version, or a version of its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pin {
    Follow,
    At(u32),
}

pub(crate) struct Device {
    pub(crate) phone: Phone,
    pub(crate) pin: Pin,
    pub(crate) online: bool,
    /// The id it names itself by (`/_device/{id}` in its URL), if any: a
    /// named phone may move down a version.
    pub(crate) named: Option<String>,
}

impl Device {
    /// Points the phone at `pin` on the gateway at `base`.
    fn point(&mut self, base: &str, pin: Pin) {
        self.pin = pin;
        self.phone.remote_url = url_of(base, pin, self.named.as_deref());
    }
}

/// The URL a phone syncs with: `/medic` or `/v/{k}/medic`, with
/// `/_device/{id}` before the database when it names itself.
pub(crate) fn url_of(base: &str, pin: Pin, named: Option<&str>) -> String {
    let version = match pin {
        Pin::Follow => String::new(),
        Pin::At(k) => format!("/v/{k}"),
    };
    let device = named.map(|id| format!("/_device/{id}")).unwrap_or_default();
    format!("{base}{version}{device}/{DB}")
}

pub(crate) struct Drill {
    opts: DrillOptions,
    set: MigrationSet,
    work: PathBuf,
    data: PathBuf,
    migrations_dir: PathBuf,
    gateway: Gateway,
    base: String,
    devices: Vec<Device>,
    rng: Rng,
    expect: Expectations,
    steps: Vec<StepResult>,
    kills: u32,
    latest: u32,
    /// Whether the migrations split persons' names (examples/cht's
    /// [`checks::SPLIT_NAME`]): then edits retype names too.
    splits_names: bool,
    /// Invariant 4 checked after each version switch: (documents checked,
    /// counterexamples).
    pub(crate) converged: (u64, Vec<Counterexample>),
    _temp: Option<TempDir>,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const DB: &str = "medic";

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Drill {
    fn db_path(&self) -> PathBuf {
        self.data.join(format!("{DB}.db"))
    }

    fn version_of(&self, pin: Pin, served: u32) -> u32 {
        match pin {
            Pin::Follow => served,
            Pin::At(k) => k,
        }
    }

    async fn served(&self) -> Result<u32, DrillError> {
        let db = self
            .gateway
            .open_database(DB)
            .await
            .map_err(err)
            .map_err(step_error("state"))?;
        let state = rewind_engine::state::State::load(&db)
            .await
            .map_err(err)
            .map_err(step_error("state"))?;
        Ok(state.served_version())
    }

    /// Checks invariant 4 for the online phones now (after a sync that
    /// switched their version), for the final report.
    /// Points phone `i` at each pin of `moves` in turn, syncing every
    /// online phone and checking convergence after each (named by its
    /// text); returns the documents pulled and the bytes per phone, summed.
    async fn move_phone(
        &mut self,
        i: usize,
        moves: [(Pin, String); 2],
    ) -> Result<(u64, Vec<u64>), DrillError> {
        let (mut pulled, mut bytes) = (0, vec![0; self.devices.len()]);
        let base = self.base.clone();
        for (pin, when) in moves {
            self.devices[i].point(&base, pin);
            let (p, b) = self.sync_all(&when).await?;
            pulled += p;
            Drill::add(&mut bytes, &b);
            self.check_converged(&when).await?;
        }
        Ok((pulled, bytes))
    }

    async fn check_converged(&mut self, when: &str) -> Result<(), DrillError> {
        let served = self.served().await?;
        let (checked, diverged) = checks::convergence(self, served, when).await?;
        if !diverged.is_empty() && std::env::var_os("REWIND_DRILL_KEEP").is_some() {
            // For whoever debugs it: the server and the phones as they were.
            let to = format!("diverged-after-{}", when.replace(' ', "-"));
            keep_copy(&self.work, &["data", "phones"], &to);
        }
        self.converged.0 += checked;
        self.converged.1.extend(diverged);
        Ok(())
    }

    /// Syncs every online phone once; returns (docs pulled, bytes per phone).
    async fn sync_all(&mut self, step: &str) -> Result<(u64, Vec<u64>), DrillError> {
        let mut pulled = 0;
        let mut bytes = vec![0; self.devices.len()];
        for (i, device) in self.devices.iter_mut().enumerate() {
            if !device.online {
                continue;
            }
            // Push first, as a phone app that uploads its edits before it
            // downloads (and tests/pouchdb's phones): after a restore the
            // server receives the phones' histories before it presents
            // anything to them.
            let report = device
                .phone
                .sync_push_first()
                .await
                .map_err(err)
                .map_err(step_error(step))?;
            pulled += report.pull.docs_written;
            bytes[i] += report.pull.bytes_downloaded;
        }
        Ok((pulled, bytes))
    }

    /// Each online phone (or the ones in `which`) edits `n` of its documents.
    async fn edit_round(
        &mut self,
        step: &str,
        n: usize,
        only_offline: bool,
    ) -> Result<(), DrillError> {
        let served = self.served().await?;
        for i in 0..self.devices.len() {
            let device = &self.devices[i];
            if only_offline == device.online {
                continue;
            }
            let version = self.version_of(device.pin, served);
            let ids = checks::local_live_ids(&device.phone)
                .await
                .map_err(step_error(step))?;
            let mine: Vec<&String> = ids
                .iter()
                .filter(|id| {
                    checks::owner(id, self.devices.len()) == i && !self.expect.deleted.contains(*id)
                })
                .collect();
            // Persons whose name this phone retyped before, to retype
            // again, maybe at another version: what tests the complement.
            let renamed: Vec<&String> = mine
                .iter()
                .copied()
                .filter(|id| self.expect.renamed(id))
                .collect();
            let name = device.phone.name.clone();
            for _ in 0..n.min(mine.len()) {
                let id = if !renamed.is_empty() && self.rng.below(2) == 0 {
                    renamed[self.rng.below(renamed.len() as u64) as usize].clone()
                } else {
                    mine[self.rng.below(mine.len() as u64) as usize].clone()
                };
                let marker = format!("{name}-{step}-{}", self.rng.next() % 1_000_000);
                // Half the edits of a person also retype its name, one the
                // complement of the name split must carry across versions.
                let rename = self.splits_names && self.rng.below(2) == 0;
                self.edit_one(i, &id, step, marker, rename).await?;
            }
            // Its first person's name, retyped each round at whatever
            // version the phone is then: a chain of edits across versions
            // that only the name split's complement carries exactly.
            if self.splits_names {
                if let Some(id) = mine.iter().find(|id| self.expect.is_person(id)) {
                    let marker = format!("{name}-{step}-named");
                    self.edit_one(i, id, step, marker, true).await?;
                }
            }
            let device = &self.devices[i];
            // A document created on the phone, in its version's shape.
            let id = format!(
                "drill-{}-{}-{}",
                device.phone.name,
                step,
                self.rng.next() % 1_000_000
            );
            let marker = format!("{}-{step}-created", device.phone.name);
            let field = self.expect.next_field(&device.phone.name);
            let mut doc = if version >= 7.min(self.latest) && self.latest >= 7 {
                json!({"_id": id, "type": "contact", "contact_type": "person", "first_name": "Drill", "last_name": "Person"})
            } else if version >= 1 {
                json!({"_id": id, "type": "contact", "contact_type": "person", "name": "Drill Person"})
            } else {
                json!({"_id": id, "type": "person", "name": "Drill Person"})
            };
            // Its place, where this version keeps it (examples/cht 0004
            // moves `parent` under `lineage`).
            let place = json!({"_id": "drill-place"});
            if version >= 4 && self.latest >= 4 {
                doc["lineage"] = json!({ "parent": place });
            } else {
                doc["parent"] = place;
            }
            doc[field.as_str()] = Value::from(marker.clone());
            device
                .phone
                .create(doc)
                .await
                .map_err(err)
                .map_err(step_error(step))?;
            self.expect.edit(&id, &field, &marker);
        }
        Ok(())
    }

    /// Phone `i` edits document `id`: sets a marker field of its own to
    /// `marker` and, when `rename`, retypes the person's name
    /// ([`checks::edit_name`]); records both to check.
    async fn edit_one(
        &mut self,
        i: usize,
        id: &str,
        step: &str,
        marker: String,
        rename: bool,
    ) -> Result<(), DrillError> {
        let field = self.expect.next_field(&self.devices[i].phone.name);
        let tag = self.rng.next() % 1_000_000;
        let mut typed = None;
        self.devices[i]
            .phone
            .edit(id, |doc| {
                doc[field.as_str()] = Value::from(marker.clone());
                if rename {
                    typed = checks::edit_name(doc, tag);
                }
            })
            .await
            .map_err(err)
            .map_err(step_error(step))?;
        self.expect.edit(id, &field, &marker);
        if let Some(typed) = typed {
            self.expect.name(id, typed);
        }
        Ok(())
    }

    /// One phone deletes one of its documents.
    async fn delete_one(&mut self, i: usize, step: &str) -> Result<(), DrillError> {
        let ids = checks::local_live_ids(&self.devices[i].phone)
            .await
            .map_err(step_error(step))?;
        let mine: Vec<&String> = ids
            .iter()
            .filter(|id| checks::owner(id, self.devices.len()) == i && !id.starts_with("drill-"))
            .collect();
        if let Some(id) = mine.first() {
            let id = (*id).clone();
            self.devices[i]
                .phone
                .delete(&id)
                .await
                .map_err(err)
                .map_err(step_error(step))?;
            self.expect.delete(&id);
        }
        Ok(())
    }

    /// Runs the engine to `to` (see [`Drill::engine_to`]); then the
    /// gateway forgets its cached state, as it does a quarter second later
    /// by itself: the phones' next sync sees the run's end.
    async fn engine(&mut self, step: &str, to: u32, instant: bool) -> Result<u64, DrillError> {
        let written = self.engine_to(step, to, instant).await;
        self.gateway.forget_states();
        written
    }

    /// Runs the engine to `to`; with `kill`, as a child process killed at random points first.
    async fn engine_to(&mut self, step: &str, to: u32, instant: bool) -> Result<u64, DrillError> {
        let job = self.engine_job(to, instant).await?;
        let (written, kills) = job.run().await.map_err(step_error(step))?;
        self.kills += kills;
        Ok(written)
    }

    /// What running the engine to `to` takes (the random kill delays
    /// drawn now), to run while phones keep syncing.
    async fn engine_job(&mut self, to: u32, instant: bool) -> Result<EngineJob, DrillError> {
        let rollback = to < self.served().await?;
        let kill_delays = match self.opts.kill {
            // Short: the engine migrates the drill's documents in tens of
            // milliseconds (with 20–320 ms no SIGKILL landed any more).
            true => (0..3).map(|_| 2 + self.rng.below(40)).collect(),
            false => Vec::new(),
        };
        Ok(EngineJob {
            bin: self.opts.rewind_bin.clone(),
            db_path: self.db_path(),
            migrations_dir: self.migrations_dir.clone(),
            gateway: self.gateway.clone(),
            set: self.set.clone(),
            to,
            rollback,
            instant,
            kill_delays,
        })
    }

    fn record(&mut self, name: &str, started: Instant, docs: u64, downloaded: Vec<u64>) {
        let seconds = started.elapsed().as_secs_f64();
        let result = StepResult {
            name: name.to_owned(),
            seconds,
            docs,
            docs_per_sec: if seconds > 0.0 {
                docs as f64 / seconds
            } else {
                0.0
            },
            downloaded,
        };
        if self.opts.verbose {
            eprintln!(
                "drill: {:<58} {:>6.2} s {:>7} docs",
                result.name, result.seconds, result.docs
            );
        }
        self.steps.push(result);
    }

    fn add(a: &mut [u64], b: &[u64]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
}

/// One engine run to `to`: first, for each of `kill_delays`, `rewind
/// upgrade`/`rollback` as a child process killed with SIGKILL after that
/// many milliseconds (unless it finished), then a run in this process to
/// the end. Owns what it needs, so phones can sync while it runs.
struct EngineJob {
    bin: Option<PathBuf>,
    db_path: PathBuf,
    migrations_dir: PathBuf,
    gateway: Gateway,
    set: MigrationSet,
    to: u32,
    rollback: bool,
    instant: bool,
    kill_delays: Vec<u64>,
}

impl EngineJob {
    /// Runs it; returns (documents the last run wrote, processes killed).
    async fn run(self) -> Result<(u64, u32), String> {
        let mut kills = 0;
        if !self.kill_delays.is_empty() {
            let bin = self.bin.as_ref().ok_or("--kill needs the rewind binary")?;
            let verb = if self.rollback { "rollback" } else { "upgrade" };
            for delay in &self.kill_delays {
                let mut command = std::process::Command::new(bin);
                command
                    .arg(verb)
                    .arg("--db")
                    .arg(&self.db_path)
                    .arg("--migrations")
                    .arg(&self.migrations_dir)
                    .args(["--to", &self.to.to_string(), "--batch", "25"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                if self.instant {
                    command.arg("--instant");
                }
                let mut child = command.spawn().map_err(err)?;
                tokio::time::sleep(Duration::from_millis(*delay)).await;
                if child.try_wait().map_err(err)?.is_none() {
                    let _ = child.kill(); // SIGKILL
                    kills += 1;
                }
                // Reaped off the runtime's threads (the phones keep syncing
                // on them).
                let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            }
        }
        let db = self.gateway.open_database(DB).await.map_err(err)?;
        let state = rewind_engine::state::State::load(&db).await.map_err(err)?;
        if state.version == self.to && state.run.is_none() {
            return Ok((0, kills));
        }
        // A killed run may have left its lease to a dead process: the lease
        // names the pid, and a dead holder is taken over.
        let opts = RunOptions {
            batch: 100,
            instant: self.instant,
            ..RunOptions::default()
        };
        let run = engine_run(&db, &self.set, self.to, &opts, &mut |_| {})
            .await
            .map_err(err)?;
        Ok((run.counts.written, kills))
    }
}

async fn start_gateway(
    data: &Path,
    set: &MigrationSet,
) -> Result<(Gateway, String, tokio::task::JoinHandle<()>), DrillError> {
    let gateway = Gateway::new(GatewayConfig {
        backend: Backend::Embedded(data.to_path_buf()),
        migrations: set.clone(),
        databases: vec![DB.to_owned()],
        users: Vec::new(),
        log_errors: false,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(err)
        .map_err(step_error("gateway"))?;
    let port = listener
        .local_addr()
        .map_err(err)
        .map_err(step_error("gateway"))?
        .port();
    let router = rewind_gateway::router(gateway.clone());
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((gateway, format!("http://127.0.0.1:{port}"), handle))
}

async fn copy_store(from: &str, to: &str, step: &str) -> Result<(), DrillError> {
    let src = rewind_store::open(from)
        .await
        .map_err(err)
        .map_err(step_error(step))?;
    let dst = rewind_store::open(to)
        .await
        .map_err(err)
        .map_err(step_error(step))?;
    if !dst.exists().await.map_err(err).map_err(step_error(step))? {
        dst.create_db()
            .await
            .map_err(err)
            .map_err(step_error(step))?;
    }
    rewind_store::copy(&src, &dst, |_| {})
        .await
        .map_err(err)
        .map_err(step_error(step))?;
    Ok(())
}

/// Copies the files of `dirs` (under `work`) to `work/{to}/`, best effort:
/// a debugging aid, never part of what the drill checks.
fn keep_copy(work: &Path, dirs: &[&str], to: &str) {
    for dir in dirs {
        let target = work.join(to).join(dir);
        let _ = std::fs::create_dir_all(&target);
        if let Ok(entries) = std::fs::read_dir(work.join(dir)) {
            for entry in entries.flatten() {
                let _ = std::fs::copy(entry.path(), target.join(entry.file_name()));
            }
        }
    }
}

fn remove_store_files(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Runs the drill.
pub async fn run(opts: DrillOptions) -> Result<DrillReport, DrillError> {
    let files = opts.migrations.clone().unwrap_or_else(builtin_migrations);
    let set = MigrationSet::parse_files(&files, rewind_lens::DEFAULT_STAMP).map_err(|errors| {
        step_error("migrations")(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let latest = set.latest();
    let splits_names = set.migrations().iter().any(|m| m.id == checks::SPLIT_NAME);
    if latest == 0 {
        return Err(step_error("migrations")(
            "the migration set is empty".into(),
        ));
    }
    let (work, temp) = match &opts.work_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = std::env::temp_dir().join(format!(
                "rewind-drill-{}-{}",
                std::process::id(),
                opts.seed
            ));
            let keep = std::env::var_os("REWIND_DRILL_KEEP").is_some();
            (dir.clone(), (!keep).then(|| TempDir(dir)))
        }
    };
    let data = work.join("data");
    let snapshot = work.join("snapshot");
    let migrations_dir = work.join("migrations");
    for dir in [&data, &snapshot, &migrations_dir] {
        std::fs::create_dir_all(dir)
            .map_err(err)
            .map_err(step_error("setup"))?;
    }
    for (path, text) in &files {
        let name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
        std::fs::write(migrations_dir.join(name), text)
            .map_err(err)
            .map_err(step_error("setup"))?;
    }
    let db_path = data.join(format!("{DB}.db"));
    remove_store_files(&db_path);
    remove_store_files(Path::new(&format!("{}-rewind", db_path.display())));

    // 0. The database, its snapshot, the gateway, the phones.
    let started = Instant::now();
    let originals: Vec<Value> = match &opts.db {
        Some(target) => {
            copy_store(
                target,
                &db_path.display().to_string(),
                "copying the database",
            )
            .await?;
            let store = rewind_store::open(&db_path.display().to_string())
                .await
                .map_err(err)
                .map_err(step_error("setup"))?;
            rewind_replicator::leaves(&store)
                .await
                .map_err(err)
                .map_err(step_error("setup"))?
                .into_iter()
                .filter(|d| !d.deleted)
                .map(|d| d.body)
                .collect()
        }
        None => {
            let store = rewind_store::open(&db_path.display().to_string())
                .await
                .map_err(err)
                .map_err(step_error("setup"))?;
            rewind_engine::load::load(
                &store,
                rewind_sample::docs(opts.docs, opts.seed),
                1000,
                &mut |_| {},
            )
            .await
            .map_err(err)
            .map_err(step_error("loading sample data"))?;
            rewind_replicator::leaves(&store)
                .await
                .map_err(err)
                .map_err(step_error("setup"))?
                .into_iter()
                .map(|d| d.body)
                .collect()
        }
    };
    let (gateway, base, mut server) = start_gateway(&data, &set).await?;
    gateway
        .open_database(DB)
        .await
        .map_err(err)
        .map_err(step_error("setup"))?;
    let snap_path = snapshot.join(format!("{DB}.db"));
    remove_store_files(&snap_path);
    remove_store_files(Path::new(&format!("{}-rewind", snap_path.display())));
    copy_store(
        &db_path.display().to_string(),
        &snap_path.display().to_string(),
        "snapshot",
    )
    .await?;
    copy_store(
        &format!("{}-rewind", db_path.display()),
        &format!("{}-rewind", snap_path.display()),
        "snapshot",
    )
    .await?;
    let mut drill = Drill {
        expect: Expectations::new(&originals),
        opts: opts.clone(),
        set,
        work: work.clone(),
        data: data.clone(),
        migrations_dir,
        gateway,
        base,
        devices: Vec::new(),
        rng: Rng::new(opts.seed),
        steps: Vec::new(),
        kills: 0,
        latest,
        splits_names,
        converged: (0, Vec::new()),
        _temp: temp,
    };
    let devices = opts.devices.max(MIN_DEVICES);
    // The first half of the phones follow `/medic` (their app follows the
    // server's version); the others run the old app, pinned at `/v/0`.
    let half = devices / 2;
    let first_pin = |i: usize| if i < half { Pin::Follow } else { Pin::At(0) };
    // The first pinned phone names itself: it moves down a version and back
    // in step 2, and from `/medic` to that version and back after the
    // re-upgrade.
    let named = |i: usize| (i == half).then(|| format!("phone{i}"));
    for i in 0..devices {
        let url = url_of(&drill.base, first_pin(i), named(i).as_deref());
        let phones_dir = work.join("phones");
        std::fs::create_dir_all(&phones_dir)
            .map_err(err)
            .map_err(step_error("phones"))?;
        let local = phones_dir.join(format!("phone{i}.db"));
        remove_store_files(&local);
        let phone = Phone::open(&format!("phone{i}"), &local, &url)
            .await
            .map_err(err)
            .map_err(step_error("phones"))?;
        drill.devices.push(Device {
            phone,
            pin: first_pin(i),
            online: true,
            named: named(i),
        });
    }
    let (pulled, bytes) = drill.sync_all("initial sync").await?;
    drill.record(
        &format!(
            "phones pull the database at v0 ({half} follow /medic, {} pinned at /v/0)",
            devices - half
        ),
        started,
        pulled,
        bytes,
    );

    // 1. Upgrade while v0 phones keep syncing and editing.
    let started = Instant::now();
    let mut bytes = vec![0; devices];
    // The engine runs (killed and resumed, with `--kill`) while the phones
    // edit and sync: edits at v0 land before, during and after each
    // document's migration.
    let engine = tokio::spawn(drill.engine_job(latest, false).await?.run());
    let mut rounds = 0;
    while rounds < 2 || !engine.is_finished() {
        drill.edit_round("upgrade-traffic", 1, false).await?;
        let (_, b) = drill.sync_all("sync during upgrade").await?;
        Drill::add(&mut bytes, &b);
        rounds += 1;
        if rounds > 50 {
            break;
        }
    }
    let (written, kills) = engine
        .await
        .map_err(err)
        .map_err(step_error("upgrade"))?
        .map_err(step_error("upgrade"))?;
    drill.kills += kills;
    drill.gateway.forget_states();
    drill.record(
        &format!("upgrade v0 → v{latest} while phones sync and edit"),
        started,
        written,
        bytes,
    );

    // 2. The pinned phones but one update their app and move up to the new
    //    version; two phones go offline and edit. The gateway serves moves
    //    up, from `/v/{k}` to `/{db}`, not back (docs/design.md, "Moves
    //    between versions go up"), the way apps update; a phone that names
    //    itself may move down too: the named one goes down halfway (its app
    //    taken back) and up again.
    let started = Instant::now();
    let (pulled, bytes) = drill.sync_all("sync at new version").await?;
    let base = drill.base.clone();
    for device in drill.devices.iter_mut().take(devices - 1).skip(half) {
        device.point(&base, Pin::At(latest));
    }
    let (pulled2, bytes2) = drill.sync_all("phones switch version").await?;
    drill
        .check_converged(&format!("moving up to v{latest}"))
        .await?;
    let mut all_bytes = bytes;
    Drill::add(&mut all_bytes, &bytes2);
    let down = latest / 2;
    let (pulled3, moved) = drill
        .move_phone(
            half,
            [
                (
                    Pin::At(down),
                    format!("a named phone moving down to v{down}"),
                ),
                (
                    Pin::At(latest),
                    format!("a named phone moving back up to v{latest}"),
                ),
            ],
        )
        .await?;
    Drill::add(&mut all_bytes, &moved);
    drill.devices[devices - 2].online = false; // a phone that moved up goes offline
    drill.devices[devices - 1].online = false; // the old-version phone goes offline
    drill.edit_round("new-version", 2, false).await?;
    drill.delete_one(0, "new-version").await?;
    drill.edit_round("offline", 2, true).await?;
    let (_, bytes3) = drill.sync_all("sync edits").await?;
    Drill::add(&mut all_bytes, &bytes3);
    drill.record(
        &format!(
            "{} pinned phones move up to v{latest} (1 down to v{down} and back); all edit; 2 go offline",
            devices - 1 - half
        ),
        started,
        pulled + pulled2 + pulled3,
        all_bytes,
    );

    // 3. Roll back (the logout-bug case); online phones follow the server
    //    back to v0 and converge.
    let started = Instant::now();
    let written = drill.engine("rollback", 0, true).await?;
    let exact = checks::exact_rollback(&drill).await?;
    for device in drill.devices.iter_mut() {
        device.point(&base, Pin::Follow);
    }
    let (_, bytes) = drill.sync_all("sync after rollback").await?;
    drill.check_converged("the rollback").await?;
    drill.record(
        "rollback to v0 (instant); online phones follow and converge",
        started,
        written,
        bytes,
    );

    // 4. The offline phones come back: each pushes its edits at its own
    //    version (the new-version one, at v{latest}; the old one, at v0), then
    //    follows the server.
    let started = Instant::now();
    let offline_pins = [(devices - 2, Pin::At(latest)), (devices - 1, Pin::At(0))];
    for (i, pin) in offline_pins {
        let device = &mut drill.devices[i];
        device.online = true;
        device.point(&base, pin);
        device
            .phone
            .push()
            .await
            .map_err(err)
            .map_err(step_error("offline phones return"))?;
        device.point(&base, Pin::Follow);
    }
    let (pulled, bytes) = drill.sync_all("everyone syncs").await?;
    let mut names = checks::names_kept(&drill, "the offline phones' return").await?;
    drill.record(
        "offline phones return, push v0 and new-version edits, follow",
        started,
        pulled,
        bytes,
    );

    // 5. Re-upgrade after the fix.
    let started = Instant::now();
    let written = drill.engine("re-upgrade", latest, false).await?;
    let complement = checks::complement_restored(&drill).await?;
    let (_, bytes) = drill.sync_all("sync after re-upgrade").await?;
    let mut bytes = bytes;
    // The named phone leaves `/{db}` for an older version and comes back.
    let (_, moved) = drill
        .move_phone(
            half,
            [
                (
                    Pin::At(down),
                    format!("a named phone moving from /{DB} to v{down}"),
                ),
                (Pin::Follow, format!("a named phone following /{DB} again")),
            ],
        )
        .await?;
    Drill::add(&mut bytes, &moved);
    drill.edit_round("after-fix", 1, false).await?;
    let (_, b2) = drill.sync_all("sync edits after re-upgrade").await?;
    Drill::add(&mut bytes, &b2);
    let (checked, lost) = checks::names_kept(&drill, "the re-upgrade").await?;
    names.0 += checked;
    names.1.extend(lost);
    drill.record(
        &format!("re-upgrade to v{latest}; phones follow (1 visits v{down}) and edit"),
        started,
        written,
        bytes,
    );

    // 5b. Restore the pre-upgrade snapshot while phones hold new-version documents.
    if std::env::var_os("REWIND_DRILL_KEEP").is_some() {
        // For whoever debugs a failed drill: the server and the phones as
        // they were just before the restore (`before-restore/`).
        keep_copy(&drill.work, &["data", "phones"], "before-restore");
    }
    let started = Instant::now();
    drill.gateway.forget_all();
    remove_store_files(&db_path);
    let companion = PathBuf::from(format!("{}-rewind", db_path.display()));
    remove_store_files(&companion);
    copy_store(
        &snap_path.display().to_string(),
        &db_path.display().to_string(),
        "restore",
    )
    .await?;
    copy_store(
        &format!("{}-rewind", snap_path.display()),
        &companion.display().to_string(),
        "restore",
    )
    .await?;
    drill.gateway.forget_all();
    let (pulled, bytes) = drill.sync_all("sync after restore").await?;
    let written = drill.engine("upgrade after restore", latest, false).await?;
    let (_, b2) = drill.sync_all("sync after upgrade").await?;
    let (_, b3) = drill.sync_all("final sync").await?;
    let mut bytes = bytes;
    Drill::add(&mut bytes, &b2);
    Drill::add(&mut bytes, &b3);
    drill.record(
        "restore the pre-upgrade snapshot; phones push back what it lost; upgrade again",
        started,
        pulled + written,
        bytes,
    );

    // 7. The invariants.
    let mut invariants = checks::final_checks(&drill, exact, complement, names).await?;
    let determinism = checks::determinism(&drill).await?;
    invariants.push(determinism);
    invariants.sort_by_key(|i| i.number);
    server.abort();
    let _ = (&mut server).await;
    let holds = invariants.iter().all(|i| i.holds);
    let _ = drill.work.clone();
    Ok(DrillReport {
        docs: originals.len() as u64,
        devices,
        seed: opts.seed,
        versions: (0, latest),
        kills: drill.kills,
        edits: drill.expect.edits,
        steps: drill.steps.clone(),
        invariants,
        holds,
    })
}

impl Drill {
    pub(crate) fn devices(&self) -> &[Device] {
        &self.devices
    }
    pub(crate) fn set(&self) -> &MigrationSet {
        &self.set
    }
    pub(crate) fn expect(&self) -> &Expectations {
        &self.expect
    }
    pub(crate) fn base(&self) -> &str {
        &self.base
    }
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data
    }
    pub(crate) fn kill_mode(&self) -> bool {
        self.opts.kill
    }
    pub(crate) fn latest(&self) -> u32 {
        self.latest
    }
}

/// The server's store.
pub(crate) async fn server_store(drill: &Drill) -> Result<AnyStore, DrillError> {
    Ok(drill
        .gateway
        .open_database(DB)
        .await
        .map_err(err)
        .map_err(step_error("checks"))?
        .data)
}
