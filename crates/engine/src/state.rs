//! Where a database's rewind state lives, and the lease that keeps two runs apart.
//!
//! State lives next to the data, in a companion database: `<db>-rewind` on
//! CouchDB; in an embedded store, tables inside the store's own file
//! (`rewind_`-prefixed, addressed as `<file>-rewind`). It
//! holds one `state` document (current version, applied migrations with
//! their checksums, the run in progress with its checkpoint, the last runs,
//! the lease) and one `journal:<doc id>` document per migrated document
//! (before-images and complements). Any process can resume a run another
//! one started.

use crate::{EngineError, Result};
use rewind_lens::MigrationSet;
use rewind_store::{is_url, AnyStore, GetOptions, Store, StoreError, COMPANION_SUFFIX};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// The id of the state document in the companion database.
pub const STATE_ID: &str = "state";
/// How long a lease lasts without renewal.
pub const LEASE_MS: u64 = 60_000;

/// How many revisions of each companion document an embedded companion
/// keeps: journals and the state are only ever read at their leaf, so a
/// body is dropped once it is replaced (after an upgrade and a rollback of
/// 100,000 documents the companion was 288 MB with the default, 159 MB with
/// this, at the same speed). A conditional write on a dropped revision is
/// a conflict, as on a replaced one.
pub const COMPANION_REVS_LIMIT: u64 = 1;

/// Makes `companion` ready for runs and gateways: created if missing
/// (another process creating it at the same time is fine) and, embedded,
/// keeping [`COMPANION_REVS_LIMIT`] revisions per document (a CouchDB
/// server drops replaced bodies when it compacts).
pub async fn prepare_companion(companion: &AnyStore) -> Result<()> {
    if !companion.exists().await? {
        match companion.create_db().await {
            Ok(()) | Err(StoreError::FileExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if matches!(companion, AnyStore::Sqlite(_))
        && companion.revs_limit().await? != COMPANION_REVS_LIMIT
    {
        companion.set_revs_limit(COMPANION_REVS_LIMIT).await?;
    }
    Ok(())
}

/// A database and its companion.
#[derive(Clone)]
pub struct Database {
    /// The documents.
    pub data: AnyStore,
    /// The companion that holds state and journal.
    pub state: AnyStore,
    /// How the user named the database (credentials removed).
    pub name: String,
}

/// The companion of a target: `<url>-rewind`, or `<path>-rewind` (which
/// [`rewind_store::open`] opens as the companion's tables inside `<path>`).
pub fn companion_target(target: &str) -> String {
    if is_url(target) {
        let (base, query) = match target.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (target, None),
        };
        let base = base.trim_end_matches('/');
        match query {
            Some(q) => format!("{base}{COMPANION_SUFFIX}?{q}"),
            None => format!("{base}{COMPANION_SUFFIX}"),
        }
    } else {
        format!("{target}{COMPANION_SUFFIX}")
    }
}

/// The companion of the database `target` (opened as `data`), if it has
/// one; creates nothing (opening an embedded companion that is not there
/// would create its tables in the store's file).
pub async fn existing_companion(target: &str, data: &AnyStore) -> Result<Option<AnyStore>> {
    let companion = companion_target(target);
    if let AnyStore::Sqlite(file) = data {
        if !std::path::Path::new(&companion).exists() && !file.has_companion().await? {
            return Ok(None);
        }
    }
    let store = rewind_store::open(&companion).await?;
    Ok(store.exists().await?.then_some(store))
}

/// Opens a database that must exist.
async fn open_data(target: &str) -> Result<AnyStore> {
    if !is_url(target) && !std::path::Path::new(target).exists() {
        return Err(EngineError::Input {
            what: target.to_owned(),
            reason: "no such database file (make one with `rewind sample --db FILE`, `rewind copy` or `rewind drill`)"
                .into(),
        });
    }
    let data = rewind_store::open(target).await?;
    if !data.exists().await? {
        return Err(EngineError::Input {
            what: rewind_store::redact_url(target),
            reason: "the database does not exist".into(),
        });
    }
    Ok(data)
}

/// A database opened to read only (`plan`, `status`): its documents and
/// its state as recorded.
pub struct Inspected {
    /// The documents.
    pub data: AnyStore,
    /// The state (the defaults when there is no companion yet).
    pub state: State,
    /// How the user named the database (credentials removed).
    pub name: String,
    /// The companion, when there is one (journals are read from it).
    pub companion: Option<AnyStore>,
}

impl Database {
    /// Opens a database that must exist and reads its state, creating
    /// nothing: no companion is made where there is none (the state is then
    /// the defaults: version 0, no runs).
    pub async fn inspect(target: &str) -> Result<Inspected> {
        let data = open_data(target).await?;
        let companion = existing_companion(target, &data).await?;
        let state = match &companion {
            Some(store) => State::load_from(store).await?,
            None => State::default(),
        };
        Ok(Inspected {
            data,
            state,
            name: rewind_store::redact_url(target),
            companion,
        })
    }

    /// Opens a database that must exist, and its companion (created if missing).
    pub async fn open(target: &str) -> Result<Database> {
        let data = open_data(target).await?;
        let state = rewind_store::open(&companion_target(target)).await?;
        prepare_companion(&state).await?;
        Ok(Database {
            data,
            state,
            name: rewind_store::redact_url(target),
        })
    }
}

/// One applied migration as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Applied {
    /// The migration id (file stem).
    pub id: String,
    /// Its checksum when it was applied.
    pub checksum: String,
}

/// Counters of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    /// Document revisions read.
    pub read: u64,
    /// Documents written (migrated, restored or translated).
    pub written: u64,
    /// Of those written on rollback, restored from their before-image.
    pub restored: u64,
    /// Writes that met a newer revision (a user's edit) and were redone on it.
    pub retried: u64,
    /// Bytes of documents written.
    pub bytes: u64,
}

impl Counts {
    /// Adds `other` to these counters.
    pub fn add(&mut self, other: &Counts) {
        self.read += other.read;
        self.written += other.written;
        self.restored += other.restored;
        self.retried += other.retried;
        self.bytes += other.bytes;
    }
}

/// A run: an upgrade or a rollback, in progress or finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Run {
    /// Unique id of the run.
    pub id: String,
    /// `upgrade` or `rollback`.
    pub kind: String,
    /// Version before.
    pub from: u32,
    /// Version after.
    pub to: u32,
    /// Milliseconds since the epoch.
    pub started: u64,
    /// Milliseconds since the epoch, when finished.
    pub finished: Option<u64>,
    /// `running`, `done`, `failed: reason`, or `interrupted: reason` (see
    /// [`Run::interrupt`]).
    pub outcome: String,
    /// The changes-feed checkpoint: everything up to it is done.
    pub since: Value,
    /// During the run's first pass, which walks documents in id order:
    /// where it is. `since` stays 0 meanwhile, so a rewind
    /// that does not know this field resumes from the start of the feed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_id: Option<ByIdPass>,
    /// A rollback served to clients from its start (`--instant`): its
    /// epoch began when it started, not when it finished.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub instant: bool,
    /// How many times the run was resumed after an interruption.
    pub resumed: u32,
    /// Counters.
    pub counts: Counts,
}

impl Run {
    /// A run `id` from version `from` to `to`, started at `started`
    /// (milliseconds since the epoch): running, at the start of the feed,
    /// nothing counted yet; its kind is told by the direction.
    pub fn new(id: impl Into<String>, from: u32, to: u32, started: u64) -> Run {
        Run {
            id: id.into(),
            kind: if to < from { "rollback" } else { "upgrade" }.into(),
            from,
            to,
            started,
            finished: None,
            outcome: "running".into(),
            since: Value::from(0),
            by_id: None,
            instant: false,
            resumed: 0,
            counts: Counts::default(),
        }
    }

    /// Records that the run stopped on `reason` and is kept to be resumed.
    pub fn interrupt(&mut self, reason: impl std::fmt::Display) {
        self.outcome = format!("{INTERRUPTED}{reason}");
    }

    /// Why the run stopped, when it was [`Run::interrupt`]ed (its
    /// `outcome`, prefix included); `None` for a run whose process ended
    /// without saying (killed).
    pub fn interruption(&self) -> Option<&str> {
        self.outcome
            .starts_with(INTERRUPTED)
            .then_some(self.outcome.as_str())
    }
}

/// How [`Run::outcome`] begins for a run that stopped on an error.
const INTERRUPTED: &str = "interrupted: ";

/// The checkpoint of a run's id-ordered first pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ByIdPass {
    /// The last document id done (`""` before the first).
    pub after: String,
    /// The feed sequence the pass started at: the feed from there brings
    /// what changed meanwhile.
    pub since: Value,
}

/// Who holds the lease, until when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    /// `host:pid:nonce`.
    pub owner: String,
    /// Milliseconds since the epoch.
    pub expires: u64,
}

impl Lease {
    /// True when it still stops another run: not expired, and not held by
    /// a process of this host that no longer runs.
    pub fn is_live(&self) -> bool {
        self.expires > now_ms() && !holder_is_dead(&self.owner)
    }
}

/// How many finished runs the state's history keeps (see [`State::record`]).
pub const HISTORY: usize = 20;

/// The state document.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// The schema version of the database's documents.
    pub version: u32,
    /// The applied migrations, in order; `version` entries.
    pub applied: Vec<Applied>,
    /// The run in progress, if any.
    pub run: Option<Run>,
    /// The last finished runs, newest last.
    pub history: Vec<Run>,
    /// The lease, if held.
    pub lease: Option<Lease>,
    /// The version served to clients that do not choose one, when it is not
    /// `version`: set at once by an instant rollback, cleared when the
    /// documents have caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<u32>,
    #[serde(rename = "_rev", skip_serializing_if = "Option::is_none", default)]
    rev: Option<String>,
}

/// The document `id` of a companion (the state, a gateway's device
/// records), `None` when there is none.
pub async fn companion_doc(
    companion: &AnyStore,
    id: &str,
) -> std::result::Result<Option<Value>, StoreError> {
    match companion.get(id, &GetOptions::default()).await {
        Ok(found) => Ok(Some(found.into_doc().unwrap_or(Value::Null))),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// This process's lease owner name.
pub fn owner_name() -> String {
    format!("{}:{}:{:x}", host(), std::process::id(), now_ms())
}

/// True when the lease belongs to a process on this host that no longer runs.
fn holder_is_dead(owner: &str) -> bool {
    let mut parts = owner.split(':');
    let (Some(h), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    h == host()
        && pid != std::process::id().to_string()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl State {
    /// The version served to clients that do not choose one.
    pub fn served_version(&self) -> u32 {
        self.served.unwrap_or(self.version)
    }

    /// Adds a finished run to the history, which keeps [`HISTORY`] runs:
    /// the newest, and always the two newest runs that lowered the version:
    /// whether a rollback ever happened decides which runs start a
    /// gateway's presentation epochs (`rewind_gateway::view::epochs`), so
    /// it must outlive any number of upgrades.
    pub fn record(&mut self, run: Run) {
        self.history.push(run);
        while self.history.len() > HISTORY {
            let lowering: Vec<usize> = (0..self.history.len())
                .filter(|&i| self.history[i].to < self.history[i].from)
                .collect();
            let kept = &lowering[lowering.len().saturating_sub(2)..];
            let Some(oldest) = (0..self.history.len()).find(|i| !kept.contains(i)) else {
                break;
            };
            self.history.remove(oldest);
        }
    }

    /// Reads the state document (defaults when there is none).
    pub async fn load(db: &Database) -> Result<State> {
        State::load_from(&db.state).await
    }

    /// Reads the state document of a companion (defaults when there is none).
    pub async fn load_from(companion: &AnyStore) -> Result<State> {
        match companion_doc(companion, STATE_ID).await? {
            Some(doc) => serde_json::from_value(doc)
                .map_err(|e| EngineError::Corrupt(format!("the state document: {e}"))),
            None => Ok(State::default()),
        }
    }

    /// Writes the state document, conditional on the revision it was read at.
    pub async fn save(&mut self, db: &Database) -> Result<()> {
        let mut doc =
            serde_json::to_value(&*self).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        doc["_id"] = Value::from(STATE_ID);
        let rev = db.state.put(doc).await?;
        self.rev = Some(rev);
        Ok(())
    }

    /// Checks that the applied migrations are the first ones of `set`, unchanged.
    pub fn verify(&self, set: &MigrationSet) -> Result<()> {
        for (index, applied) in self.applied.iter().enumerate() {
            let Some(m) = set.migrations().get(index) else {
                return Err(EngineError::Refused(format!(
                    "the database is at version {} but only {} migration files are present: {} was applied and is missing",
                    self.version,
                    set.latest(),
                    applied.id
                )));
            };
            if m.id != applied.id {
                return Err(EngineError::Refused(format!(
                    "migration {} is `{}` in the files but `{}` was applied: files were renamed or reordered",
                    index + 1,
                    m.id,
                    applied.id
                )));
            }
            if m.checksum != applied.checksum {
                return Err(EngineError::Refused(format!(
                    "{} was changed after it was applied (checksum {} now, {} when applied); restore the file, or roll back to version {} first",
                    m.file.display(),
                    &m.checksum[..12],
                    &applied.checksum[..12.min(applied.checksum.len())],
                    index
                )));
            }
        }
        Ok(())
    }

    /// Takes the lease for `owner`, or says who holds it.
    pub async fn acquire(db: &Database, owner: &str) -> Result<State> {
        for _ in 0..10 {
            let mut state = State::load(db).await?;
            if let Some(lease) = &state.lease {
                if lease.is_live() && lease.owner != owner {
                    return Err(EngineError::Busy {
                        owner: lease.owner.clone(),
                        seconds: (lease.expires.saturating_sub(now_ms())) / 1000,
                    });
                }
            }
            state.lease = Some(Lease {
                owner: owner.to_owned(),
                expires: now_ms() + LEASE_MS,
            });
            match state.save(db).await {
                Ok(()) => return Ok(state),
                Err(EngineError::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::Refused(
            "could not take the lease: the state document keeps changing".into(),
        ))
    }

    /// Extends the lease this state holds and saves.
    pub async fn renew(&mut self, db: &Database) -> Result<()> {
        if let Some(lease) = &mut self.lease {
            lease.expires = now_ms() + LEASE_MS;
        }
        self.save(db).await
    }

    /// Gives the lease up and saves.
    pub async fn release(&mut self, db: &Database) -> Result<()> {
        self.lease = None;
        self.save(db).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_live_until_it_expires_or_its_process_is_gone() {
        let lease = |owner: String, expires: u64| Lease { owner, expires };
        let later = now_ms() + 60_000;
        assert!(lease(owner_name(), later).is_live(), "this process");
        assert!(!lease(owner_name(), now_ms() - 1).is_live(), "expired");
        // A pid no process has on this host (above the kernel's pid_max).
        let gone = format!("{}:{}:0", host(), u32::MAX);
        assert!(!lease(gone, later).is_live(), "its process is gone");
        // Another host's process cannot be looked at: live until it expires.
        let elsewhere = format!("{}-elsewhere:{}:0", host(), u32::MAX);
        assert!(lease(elsewhere, later).is_live(), "another host");
    }

    fn run(id: usize, from: u32, to: u32) -> Run {
        Run::new(format!("r{id}"), from, to, 0)
    }

    #[test]
    fn the_history_keeps_the_last_runs_and_the_two_newest_rollbacks() {
        let mut state = State::default();
        state.record(run(0, 3, 1));
        state.record(run(1, 1, 0));
        state.record(run(2, 0, 2));
        state.record(run(3, 2, 1));
        for i in 4..40 {
            state.record(run(i, 1, 2));
        }
        let ids: Vec<&str> = state.history.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), HISTORY, "{ids:?}");
        assert_eq!(&ids[..2], ["r1", "r3"], "the two newest rollbacks stay");
        assert_eq!(ids[2], "r22");
        assert_eq!(ids.last(), Some(&"r39"));
    }
}
