//! Upgrade and rollback: a journaled, resumable rewrite of every document.
//!
//! Both walk the documents in batches from the run's checkpoint (bounded
//! memory whatever the database size): a first pass in id order (embedded,
//! each B-tree page read and written once, not once per document; over
//! HTTP, `_all_docs` pages, cheaper than `_changes` with bodies), then the
//! changes feed from the sequence that pass started at brings what changed
//! meanwhile (mostly the run's own writes, skipped without reading their
//! bodies). For every live leaf of every document:
//! 1. compute the new body with the lens (and, on rollback, the journal);
//! 2. write the journal entry (before-image, complements) — survives a crash
//!    before the document is written: the entry is simply rewritten;
//! 3. write the document as a new revision conditional on the one read (a
//!    user's concurrent edit makes it fail with 409: the document is re-read
//!    and the edit migrated instead — never overwritten, never a conflict);
//! 4. advance the checkpoint (embedded: saved every `CHECKPOINT_EVERY`) — a
//!    crash before it repeats the batches since, which the stamp makes
//!    harmless: a step whose version the stamp already carries is skipped,
//!    so no document is migrated twice.
//!
//! The feed also brings documents written during the run; the run records
//! the new version only once a pass over the feed finds nothing left to do.

use crate::journal::{
    body_hash, body_text, journal_id, journaled_id, Image, Journal, JournalComplements,
};
use crate::state::{now_ms, owner_name, Applied, ByIdPass, Counts, Database, Run, State};
use crate::{EngineError, Result};
use rewind_lens::MigrationSet;
use rewind_store::{
    AllDocsOptions, AnyStore, BulkGetItem, BulkGetOptions, BulkGetRequest, ChangeRow,
    ChangesOptions, GetOptions, GetResult, OpenRev, OpenRevs, Store, TextDoc,
};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

/// Which way a run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// To a newer version.
    Upgrade,
    /// Back to an older version.
    Rollback,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Upgrade => "upgrade",
            Kind::Rollback => "rollback",
        }
    }
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Documents per batch; 0 sizes batches to the store ([`RunOptions::batch_for`]).
    pub batch: usize,
    /// Retries of a document whose write keeps meeting newer edits.
    pub max_retries: u32,
    /// Rollback only: serve the target version at once (the gateway flips
    /// within a second) and rewrite the documents behind it.
    pub instant: bool,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            batch: 0,
            max_retries: 20,
            instant: false,
        }
    }
}

impl RunOptions {
    /// Documents per batch on `store`: `batch` if set, else 500 over HTTP
    /// (CouchDB's own replicator sends 500 per `_bulk_docs`) and 2000 for
    /// the embedded store (fewer, larger transactions: each commit rewrites
    /// the B-tree pages it touched and syncs the file).
    pub fn batch_for(&self, store: &rewind_store::AnyStore) -> usize {
        match (self.batch, store) {
            (0, rewind_store::AnyStore::Sqlite(_)) => 2000,
            (0, rewind_store::AnyStore::Couch(_)) => 500,
            (n, _) => n,
        }
    }
}

/// Progress of a run, for a progress bar.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Documents in the database (an estimate of the work).
    pub total: u64,
    /// The counters so far.
    pub counts: Counts,
}

/// A document revision to process: a live leaf.
struct Leaf {
    doc: Value,
}

fn id_of(doc: &Value) -> String {
    doc.get("_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

fn id_str(doc: &Value) -> &str {
    doc.get("_id").and_then(Value::as_str).unwrap_or("")
}

fn rev_of(doc: &Value) -> String {
    doc.get("_rev")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

fn key(id: &str, rev: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    rev.hash(&mut h);
    h.finish()
}

/// The live leaves of a document.
async fn live_leaves(db: &Database, id: &str) -> Result<Vec<Leaf>> {
    let opts = GetOptions {
        open_revs: Some(OpenRevs::All),
        ..GetOptions::default()
    };
    let found = match db.data.get(id, &opts).await {
        Ok(found) => found,
        Err(rewind_store::StoreError::NotFound { .. }) => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let GetResult::Revs(revs) = found else {
        return Ok(vec![]);
    };
    Ok(revs
        .into_iter()
        .filter_map(|r| match r {
            OpenRev::Ok(doc)
                if !doc
                    .get("_deleted")
                    .and_then(Value::as_bool)
                    .unwrap_or(false) =>
            {
                Some(Leaf { doc })
            }
            _ => None,
        })
        .collect())
}

/// Over HTTP, a page needs at least this many documents to read its
/// journals by id range ([`load_page_journals`]).
const RANGE_READ_MIN: usize = 32;

/// The journals of a page of documents. Over HTTP, a page of the id-ordered
/// pass first asks for the journals in its id range (one seek; on
/// pouchdb-server, asking for 500 absent keys costs about as much as
/// writing them): when the range holds few others, that is the answer.
/// A journal the range misses (a server collating ids otherwise) makes its
/// conditional write fail, and the retry reads it by key.
async fn load_page_journals(db: &Database, ids: &[String]) -> Result<HashMap<String, Journal>> {
    let AnyStore::Couch(_) = &db.state else {
        return load_journals(db, ids).await;
    };
    let (Some(first), Some(last)) = (ids.iter().min(), ids.iter().max()) else {
        return Ok(HashMap::new());
    };
    if ids.len() < RANGE_READ_MIN {
        return load_journals(db, ids).await;
    }
    let limit = ids.len() * 2;
    let rows = db
        .state
        .all_docs(&AllDocsOptions {
            start_key: Some(journal_id(first)),
            end_key: Some(journal_id(last)),
            limit: Some(limit),
            include_docs: true,
            ..AllDocsOptions::default()
        })
        .await?
        .rows;
    if rows.len() == limit {
        // Journals of many other documents in between (a page of the feed).
        return load_journals(db, ids).await;
    }
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    journals_of_rows(
        rows.into_iter()
            .filter(|row| wanted.contains(journaled_id(&row.key))),
    )
}

/// The journals of `ids`, read by key.
async fn load_journals(db: &Database, ids: &[String]) -> Result<HashMap<String, Journal>> {
    let keys: Vec<String> = ids.iter().map(|id| journal_id(id)).collect();
    if let AnyStore::Sqlite(state) = &db.state {
        let mut out = HashMap::new();
        // Embedded: parsed from the stored text, without a document between.
        for (id, found) in ids.iter().zip(state.winner_texts(keys).await?) {
            if let Some((rev, body)) = found {
                let mut journal: Journal = serde_json::from_str(&body)
                    .map_err(|e| EngineError::Corrupt(format!("journal of {id}: {e}")))?;
                journal.rev = Some(rev);
                out.insert(id.clone(), journal);
            }
        }
        return Ok(out);
    }
    let rows = db
        .state
        .all_docs(&AllDocsOptions {
            keys: Some(keys),
            include_docs: true,
            ..AllDocsOptions::default()
        })
        .await?
        .rows;
    journals_of_rows(rows.into_iter())
}

/// The journals in rows of the companion's `_all_docs`, by document id.
fn journals_of_rows(
    rows: impl Iterator<Item = rewind_store::AllDocsRow>,
) -> Result<HashMap<String, Journal>> {
    let mut out = HashMap::new();
    for row in rows {
        if let Some(doc) = row.doc {
            let id = journaled_id(&row.key).to_owned();
            let journal: Journal = serde_json::from_value(doc)
                .map_err(|e| EngineError::Corrupt(format!("journal of {id}: {e}")))?;
            out.insert(id, journal);
        }
    }
    Ok(out)
}

/// What to do with one leaf.
struct Rewrite {
    doc: Value,
    restored: bool,
    /// The new document's length as JSON.
    bytes: u64,
}

impl Rewrite {
    fn new(doc: Value, restored: bool) -> Rewrite {
        let bytes = rewind_store::json_len(&doc);
        Rewrite {
            doc,
            restored,
            bytes,
        }
    }
}

/// Computes the new body of a leaf, updating its journal.
fn rewrite(
    set: &MigrationSet,
    kind: Kind,
    run: &Run,
    leaf: Value,
    journal: &mut Journal,
) -> Result<Option<Rewrite>> {
    let (from, to) = (run.from, run.to);
    let lens_error = |doc: &Value, source| EngineError::Lens {
        id: id_of(doc),
        source,
    };
    if !MigrationSet::is_migratable(&leaf) {
        return Ok(None);
    }
    match kind {
        Kind::Upgrade => {
            // Taken before the leaf becomes the new document (no copy).
            let before = body_text(&leaf);
            let rev = rev_of(&leaf);
            let mut doc = leaf;
            // A step that applies always moves the stamp forward, so the
            // body changed exactly when a step recorded its complement; when
            // none did, neither the document nor its journal changed.
            let mut complements = Recording {
                journal,
                applied: false,
            };
            if let Err(source) = set.translate(&mut doc, from, to, &mut complements) {
                return Err(lens_error(&doc, source));
            }
            if !complements.applied {
                return Ok(None);
            }
            journal.push_image(Image {
                from,
                to,
                rev,
                after: body_hash(&doc),
                body: before,
                run: Some(run.id.clone()),
                before: None,
            });
            Ok(Some(Rewrite::new(doc, false)))
        }
        Kind::Rollback => {
            let stamped = set.stamp_of(&leaf).unwrap_or(0);
            if stamped <= to {
                return Ok(None);
            }
            let rev = rev_of(&leaf);
            let leaf_hash = body_hash(&leaf);
            // The body replaced, for the image: in full when the leaf is
            // translated (views are computed from it), as its hash when a
            // before-image is restored (the image below holds what it
            // needs; see `Image::before`).
            let mut before = None;
            let (mut doc, restored) = match restore_images(journal, &leaf, &leaf_hash, to)? {
                // Untouched since the upgrade(s): the before-image, exactly.
                Some((mut body, version)) => {
                    // The complements of the undone steps were consumed.
                    for v in version + 1..=from {
                        journal.keep(v, None);
                    }
                    if version != to {
                        // Partly restored (an edit between two upgrades):
                        // the rest of the way by translation.
                        let mut complements = JournalComplements(journal);
                        if let Err(source) = set.translate(&mut body, version, to, &mut complements)
                        {
                            return Err(lens_error(&leaf, source));
                        }
                    }
                    if let Some(object) = body.as_object_mut() {
                        object.insert("_rev".into(), Value::from(rev.clone()));
                    }
                    (body, true)
                }
                // Edited since, or created at the newer version: translate down.
                None => {
                    before = Some(body_text(&leaf));
                    let mut doc = leaf;
                    let mut complements = JournalComplements(journal);
                    if let Err(source) = set.translate(&mut doc, from, to, &mut complements) {
                        return Err(lens_error(&doc, source));
                    }
                    if body_hash(&doc) == leaf_hash {
                        return Ok(None);
                    }
                    (doc, false)
                }
            };
            // The rollback's revision is system-written too: recorded, so
            // that views see through it and a phone's edit of an older
            // revision wins over it.
            let (body, hash_before) = match before {
                Some(text) => (text, None),
                None => (String::new(), Some(leaf_hash)),
            };
            journal.push_image(Image {
                from: stamped.min(from),
                to,
                rev,
                after: body_hash(&doc),
                body,
                run: Some(run.id.clone()),
                before: hash_before,
            });
            if let Some(object) = doc.as_object_mut() {
                object.shift_remove("_revisions");
            }
            Ok(Some(Rewrite::new(doc, restored)))
        }
    }
}

/// Leaves below which a batch is rewritten on one thread (a thread costs
/// more than it saves).
const PARALLEL_REWRITE_MIN: usize = 256;

/// [`rewrite`] for every leaf of a batch, with the journals of their
/// documents (created empty where missing): the rewritten leaves with their
/// document ids, in batch order except that a document's leaves come
/// together. The CPU-bound translation is spread over the machine's cores in
/// parts that never split a document's leaves (a document's journal is
/// updated by each of its leaves in turn); on errors, the first part's
/// error is returned and nothing should be written.
fn rewrite_all(
    set: &MigrationSet,
    kind: Kind,
    run: &Run,
    leaves: Vec<Value>,
    journals: &mut HashMap<String, Journal>,
) -> Result<Vec<(String, Rewrite)>> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let parts = if leaves.len() < PARALLEL_REWRITE_MIN {
        1
    } else {
        threads.min(leaves.len() / (PARALLEL_REWRITE_MIN / 2))
    };
    // Each part takes its documents' journals along, and gives them back.
    // A document's leaves all go to the part of its first one.
    let mut work: Vec<(Vec<Value>, HashMap<String, Journal>)> = Vec::with_capacity(parts);
    let per_part = leaves.len().div_ceil(parts.max(1));
    let mut part_of: HashMap<String, usize> = HashMap::with_capacity(leaves.len());
    for leaf in leaves {
        let id = id_str(&leaf);
        let index = match part_of.get(id) {
            Some(&index) => index,
            None => {
                if work.last().is_none_or(|(part, _)| part.len() >= per_part) {
                    work.push((Vec::new(), HashMap::new()));
                }
                let index = work.len() - 1;
                part_of.insert(id.to_owned(), index);
                let journal = journals.remove(id).unwrap_or_default();
                work[index].1.insert(id.to_owned(), journal);
                index
            }
        };
        work[index].0.push(leaf);
    }
    let run_part = |(part, mut part_journals): (Vec<Value>, HashMap<String, Journal>)| {
        let mut out = Vec::new();
        for leaf in part {
            let id = id_of(&leaf);
            let journal = part_journals.entry(id.clone()).or_default();
            let rewritten = rewrite(set, kind, run, leaf, journal);
            match rewritten {
                Ok(Some(rewrite)) => out.push((id, rewrite)),
                Ok(None) => {}
                Err(e) => return (Err(e), part_journals),
            }
        }
        (Ok(out), part_journals)
    };
    let results: Vec<_> = if work.len() <= 1 {
        work.into_iter().map(run_part).collect()
    } else {
        std::thread::scope(|scope| {
            let mut parts = work.into_iter();
            let first = parts.next();
            let handles: Vec<_> = parts
                .map(|part| std::thread::Builder::new().spawn_scoped(scope, move || run_part(part)))
                .collect();
            let mut results: Vec<_> = first.into_iter().map(run_part).collect();
            for handle in handles {
                match handle.map(|h| h.join()) {
                    Ok(Ok(result)) => results.push(result),
                    Ok(Err(panic)) => std::panic::resume_unwind(panic),
                    // Nothing is written when the batch fails.
                    Err(e) => results.push((
                        Err(EngineError::Refused(format!(
                            "could not start a thread to translate documents: {e}"
                        ))),
                        HashMap::new(),
                    )),
                }
            }
            results
        })
    };
    let mut rewritten = Vec::new();
    let mut failed = None;
    for (result, part_journals) in results {
        journals.extend(part_journals);
        match result {
            Ok(part) if failed.is_none() => rewritten.extend(part),
            Ok(_) => {}
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(rewritten),
    }
}

/// The journal's complements, noting whether a step recorded one.
struct Recording<'a> {
    journal: &'a mut Journal,
    applied: bool,
}

impl rewind_lens::Complements for Recording<'_> {
    fn get(&mut self, version: u32) -> Option<Value> {
        self.journal.kept_for(version)
    }
    fn put(&mut self, version: u32, complement: Option<Value>) {
        self.applied = true;
        self.journal.keep(version, complement);
    }
}

/// Follows the before-images of upgrades back from `leaf` (whose
/// [`body_hash`] is `leaf_hash`) while each is exactly what an upgrade
/// wrote, down to version `to` or below. Returns the oldest body reached
/// and its version.
fn restore_images(
    journal: &Journal,
    leaf: &Value,
    leaf_hash: &str,
    to: u32,
) -> Result<Option<(Value, u32)>> {
    let mut current = leaf_hash.to_owned();
    let mut below = journal.images.len();
    let mut restored = None;
    while let Some(index) = journal.images[..below]
        .iter()
        .rposition(|image| image.after == current && image.from < image.to)
    {
        let image = &journal.images[index];
        let body: Value = serde_json::from_str(&image.body)
            .map_err(|e| EngineError::Corrupt(format!("before-image of {}: {e}", id_of(leaf))))?;
        let done = image.from <= to;
        if !done {
            // Only needed to follow the images further back.
            current = body_hash(&body);
        }
        restored = Some((body, image.from));
        below = index;
        if done {
            break;
        }
    }
    Ok(restored)
}

/// How often a run on the embedded store saves its checkpoint (and renews
/// its lease); over HTTP it saves after every batch. A crash redoes at most
/// this much work, which stamps make harmless.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// How many times a run resumes after a journal race before it gives up.
const JOURNAL_RACE_RETRIES: u32 = 20;

/// Runs an upgrade (`to > current`) or a rollback (`to < current`), or
/// resumes the run in progress. Returns the finished run. A journal that
/// another writer changes under the run (a gateway storing a push) makes
/// the run resume from its checkpoint rather than fail.
pub async fn run(
    db: &Database,
    set: &MigrationSet,
    to: u32,
    opts: &RunOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Run> {
    // Unique per run, not only per process and millisecond: two runs started
    // together in one process (a test, the drill) must not both think they
    // hold the lease.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let owner = format!(
        "{}:{}",
        owner_name(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut state = State::acquire(db, &owner).await?;
    let mut result = run_with_lease(db, set, to, opts, progress, &mut state).await;
    // A journal another writer changed under the run: resume from the
    // checkpoint, as after a crash (stamps and the journal make redoing a
    // batch harmless), a few times, waiting a little longer each time. The
    // checkpoint is the one in memory (the batches written), saved first:
    // the one last saved may be older.
    for attempt in 1..=JOURNAL_RACE_RETRIES {
        if !matches!(result, Err(EngineError::JournalRace(_))) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20 * u64::from(attempt))).await;
        match state.renew(db).await {
            Ok(()) => {}
            Err(EngineError::Store(rewind_store::StoreError::Conflict { .. })) => {
                state = State::load(db).await?;
            }
            Err(e) => return Err(e),
        }
        result = run_with_lease(db, set, to, opts, progress, &mut state).await;
    }
    match &result {
        Ok(_) => state.release(db).await?,
        Err(e) => {
            if let Some(run) = &mut state.run {
                run.outcome = format!("interrupted: {e}");
            }
            // Keep the run for resumption; give the lease up.
            let _ = state.release(db).await;
        }
    }
    result
}

async fn run_with_lease(
    db: &Database,
    set: &MigrationSet,
    to: u32,
    opts: &RunOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
    state: &mut State,
) -> Result<Run> {
    state.verify(set)?;
    if to > set.latest() {
        return Err(EngineError::Refused(format!(
            "version {to} does not exist: the migrations go from 0 to {}",
            set.latest()
        )));
    }
    let info = db.data.info().await?;
    let mut run = match state.run.take() {
        Some(mut run) if run.to == to => {
            run.resumed += 1;
            run.outcome = "running".into();
            run
        }
        Some(run) => {
            return Err(EngineError::Refused(format!(
                "a {} from {} to {} is in progress (run {}); finish it first: rewind {} --to {}",
                run.kind, run.from, run.to, run.id, run.kind, run.to
            )))
        }
        None => {
            if to == state.version {
                return Err(EngineError::Refused(format!(
                    "the database is already at version {to}"
                )));
            }
            let kind = if to > state.version {
                Kind::Upgrade
            } else {
                Kind::Rollback
            };
            // A first pass in id order over the documents there are, then
            // the feed from the sequence it started at.
            Run {
                id: format!("{:x}-{}", now_ms(), std::process::id()),
                kind: kind.name().into(),
                from: state.version,
                to,
                started: now_ms(),
                finished: None,
                outcome: "running".into(),
                since: Value::from(0),
                by_id: Some(ByIdPass {
                    after: String::new(),
                    since: info.update_seq.clone(),
                }),
                instant: kind == Kind::Rollback && opts.instant,
                resumed: 0,
                counts: Counts::default(),
            }
        }
    };
    let kind = if run.kind == "upgrade" {
        Kind::Upgrade
    } else {
        Kind::Rollback
    };
    state.run = Some(run.clone());
    if kind == Kind::Rollback && opts.instant {
        // Served at once: gateways read the state within their cache time
        // and translate on the fly while the documents are rewritten.
        state.served = Some(to);
    }
    state.renew(db).await?;
    let total = info.doc_count;
    let batch = opts.batch_for(&db.data);
    let mut written_here: HashSet<u64> = HashSet::new();
    // Pipelined: while the documents of batch i are written, batch i+1 is
    // read, computed and journaled. Within a batch the order stays journal →
    // documents → checkpoint; batch i+1's journal may land before batch i's
    // documents, which a crash makes harmless (a journal entry for a document
    // not yet written is rewritten on resume). A batch that shares a document
    // with the batch in flight waits for it (its journal may change).
    let mut cursor = Cursor::of(&run);
    let mut inflight: Option<Pending> = None;
    let mut saved_at = std::time::Instant::now();
    let mut ahead: Option<ReadAhead> = None;
    loop {
        let prev_ids = inflight
            .as_mut()
            .map(|p| std::mem::take(&mut p.ids))
            .unwrap_or_default();
        let had_inflight = inflight.is_some();
        // Whether documents of ours are being written while the next page is read.
        let writing = inflight.as_ref().is_some_and(|p| !p.docs.is_empty());
        let next = async {
            let Some((rows, next_cursor)) = read_page(db, &cursor, batch, &mut ahead).await? else {
                return Ok(None);
            };
            if rows.iter().any(|r| prev_ids.contains(&r.id)) {
                return Ok(Some(Ok((rows, next_cursor))));
            }
            let pending = prepare(db, set, kind, &run, rows, next_cursor, &written_here).await?;
            Ok::<_, EngineError>(Some(Err(pending)))
        };
        // The batch in flight: its documents, then its checkpoint (everything
        // up to it is written and journaled).
        let mut after = run.clone();
        let write = async {
            let Some(pending) = inflight.take() else {
                return Ok(None);
            };
            let done = write_batch(db, set, kind, &run, pending, opts).await?;
            after.counts.add(&done.counts);
            done.cursor.save(&mut after);
            state.run = Some(after.clone());
            // Over HTTP after every batch, as the crash tests' kills expect
            // (a request per 500 documents); embedded, every
            // CHECKPOINT_EVERY (a commit of the companion per batch cost
            // more than a tenth of the run).
            let due = match db.data {
                AnyStore::Sqlite(_) => saved_at.elapsed() >= CHECKPOINT_EVERY,
                AnyStore::Couch(_) => true,
            };
            if due {
                state.renew(db).await?;
                saved_at = std::time::Instant::now();
            }
            Ok::<_, EngineError>(Some(done.written))
        };
        let (next, done) = tokio::join!(next, write);
        if let Some(written) = done? {
            written_here.extend(written);
            run = after;
            progress(&Progress {
                total,
                counts: run.counts.clone(),
            });
        }
        let pending = match next? {
            // The feed is drained; if documents were being written meanwhile,
            // look once more (they may have brought changes).
            None if had_inflight => continue,
            None => break,
            Some(Err(pending)) => pending,
            // It shares documents with the batch just written: prepared now.
            Some(Ok((rows, next_cursor))) => {
                prepare(db, set, kind, &run, rows, next_cursor, &written_here).await?
            }
        };
        // Caught up: a last, partial page that needs nothing written, read
        // while nothing of ours was being written. (Waiting for an empty
        // page instead could chase users' edits forever.)
        let quiet = !writing
            && pending.docs.is_empty()
            && pending.rows < batch
            && matches!(pending.cursor, Cursor::Seq(_));
        cursor = pending.cursor.clone();
        inflight = Some(pending);
        if quiet {
            break;
        }
    }
    if let Some(pending) = inflight.take() {
        let done = write_batch(db, set, kind, &run, pending, opts).await?;
        run.counts.add(&done.counts);
        done.cursor.save(&mut run);
    }
    run.finished = Some(now_ms());
    run.outcome = "done".into();
    state.version = to;
    state.served = None;
    state.applied = set.migrations()[..to as usize]
        .iter()
        .map(|m| Applied {
            id: m.id.clone(),
            checksum: m.checksum.clone(),
        })
        .collect();
    state.run = None;
    state.history.push(run.clone());
    if state.history.len() > 20 {
        state.history.remove(0);
    }
    state.save(db).await?;
    Ok(run)
}

/// Where a run reads next (and, once a batch is written, its checkpoint).
#[derive(Debug, Clone)]
enum Cursor {
    /// The first pass of a run: documents after this id; then
    /// the changes feed after `seq`.
    Ids { after: String, seq: Value },
    /// The changes feed after this sequence.
    Seq(Value),
}

impl Cursor {
    /// Where `run` resumes.
    fn of(run: &Run) -> Cursor {
        match &run.by_id {
            Some(pass) => Cursor::Ids {
                after: pass.after.clone(),
                seq: pass.since.clone(),
            },
            None => Cursor::Seq(run.since.clone()),
        }
    }

    /// Records this checkpoint in `run`.
    fn save(&self, run: &mut Run) {
        match self {
            Cursor::Ids { after, seq } => {
                run.by_id = Some(ByIdPass {
                    after: after.clone(),
                    since: seq.clone(),
                });
                run.since = Value::from(0);
            }
            Cursor::Seq(seq) => {
                run.by_id = None;
                run.since = seq.clone();
            }
        }
    }
}

/// A page of the id-ordered pass being read ahead, on its own thread.
struct ReadAhead {
    /// The id the page starts after.
    after: String,
    page: tokio::task::JoinHandle<rewind_store::Result<Vec<ChangeRow>>>,
}

/// The next page of documents after `cursor`, and the cursor after it;
/// `None` when the feed has nothing more.
///
/// In the id-ordered pass, the page after the one returned is read at once
/// in the background (`ahead`), while this one is computed and written:
/// the two hold different documents, and a document edited after it was
/// read fails its conditional write and is read again.
async fn read_page(
    db: &Database,
    cursor: &Cursor,
    batch: usize,
    ahead: &mut Option<ReadAhead>,
) -> Result<Option<(Vec<ChangeRow>, Cursor)>> {
    let since = match cursor {
        Cursor::Ids { after, seq } => {
            let store = &db.data;
            let rows = match ahead.take() {
                Some(read) if read.after == *after => read.page.await.map_err(|e| {
                    rewind_store::StoreError::Internal(format!("read task failed: {e}"))
                })??,
                _ => {
                    store
                        .live_docs_by_id(Some(after.clone()), batch, true)
                        .await?
                }
            };
            match rows.last() {
                Some(last) => {
                    let store = store.clone();
                    let after = last.id.clone();
                    *ahead = Some(ReadAhead {
                        after: after.clone(),
                        page: tokio::spawn(async move {
                            store.live_docs_by_id(Some(after), batch, true).await
                        }),
                    });
                    let next = Cursor::Ids {
                        after: last.id.clone(),
                        seq: seq.clone(),
                    };
                    return Ok(Some((rows, next)));
                }
                // The first pass is over: the feed from where it began
                // brings what changed meanwhile.
                None => seq.clone(),
            }
        }
        Cursor::Seq(seq) => seq.clone(),
    };
    // After the first pass the feed is mostly the run's own writes, skipped
    // without reading their bodies; `prepare` reads the others in one
    // request.
    let changes = db
        .data
        .changes(&ChangesOptions {
            since,
            limit: Some(batch),
            style_all_docs: true,
            ..ChangesOptions::default()
        })
        .await?;
    if changes.results.is_empty() {
        return Ok(None);
    }
    Ok(Some((changes.results, Cursor::Seq(changes.last_seq))))
}

/// A batch read and journaled, whose documents are still to be written.
struct Pending {
    /// The checkpoint once the batch is written.
    cursor: Cursor,
    /// The documents of the batch (to keep a later batch off them).
    ids: HashSet<String>,
    /// Rows of the changes feed the batch came from.
    rows: usize,
    /// The new bodies, conditional on the revisions read.
    docs: Vec<Value>,
    /// The journals as they were before this batch, at their new revisions.
    before: HashMap<String, Journal>,
    /// Counters of the batch so far.
    counts: Counts,
}

/// What writing a batch's documents did.
struct Done {
    /// The checkpoint of the batch.
    cursor: Cursor,
    written: Vec<u64>,
    counts: Counts,
}

/// Reads the live leaves of a batch of changes, computes their new bodies
/// and writes their journal.
async fn prepare(
    db: &Database,
    set: &MigrationSet,
    kind: Kind,
    run: &Run,
    page: Vec<ChangeRow>,
    cursor: Cursor,
    written_here: &HashSet<u64>,
) -> Result<Pending> {
    let mut leaves: Vec<Value> = Vec::new();
    let mut wanted = Vec::new();
    let mut ids = HashSet::new();
    let rows = page.len();
    for row in page {
        if row
            .changes
            .iter()
            .all(|c| written_here.contains(&key(&row.id, &c.rev)))
        {
            continue;
        }
        ids.insert(row.id.clone());
        if row.changes.len() == 1 {
            if let Some(doc) = row.doc {
                if !row.deleted {
                    leaves.push(doc);
                }
                continue;
            }
        }
        // Several leaves (a conflict): fetched below, all in one request.
        wanted.extend(
            row.changes
                .iter()
                .map(|c| BulkGetRequest::new(row.id.clone(), Some(&c.rev))),
        );
    }
    if !wanted.is_empty() {
        // `latest`: a leaf extended since the feed was read gives its
        // descendants, so this is every live leaf, as `live_leaves` reads.
        let opts = BulkGetOptions {
            latest: true,
            ..BulkGetOptions::default()
        };
        let mut seen = HashSet::new();
        for result in db.data.bulk_get(wanted, opts).await? {
            for item in result.docs {
                let BulkGetItem::Ok(doc) = item else { continue };
                let deleted = doc
                    .get("_deleted")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if !deleted && seen.insert((id_of(&doc), rev_of(&doc))) {
                    leaves.push(doc);
                }
            }
        }
    }
    let mut counts = Counts {
        read: leaves.len() as u64,
        ..Counts::default()
    };
    let mut before = None;
    let docs = journal_batch(db, set, kind, run, leaves, &mut before, &mut counts).await?;
    Ok(Pending {
        cursor,
        ids,
        rows,
        docs,
        before: before.unwrap_or_default(),
        counts,
    })
}

/// Computes the new bodies of `leaves` and writes their journal (the
/// journal first: before the documents it describes). `before` holds the
/// journals as they were before the batch: a document whose write meets a
/// newer edit is redone from these, not from what the failed attempt
/// journaled (that attempt already consumed the before-image and the
/// complements, on rollback, for a write that did not happen). Returns the
/// documents to write.
async fn journal_batch(
    db: &Database,
    set: &MigrationSet,
    kind: Kind,
    run: &Run,
    leaves: Vec<Value>,
    before: &mut Option<HashMap<String, Journal>>,
    counts: &mut Counts,
) -> Result<Vec<Value>> {
    if leaves.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = {
        let mut seen = HashSet::new();
        leaves
            .iter()
            .map(id_str)
            .filter(|id| seen.insert(*id))
            .map(str::to_owned)
            .collect()
    };
    let journals = match before {
        Some(before) => ids
            .iter()
            .filter_map(|id| before.get(id).map(|j| (id.clone(), j.clone())))
            .collect(),
        None => load_page_journals(db, &ids).await?,
    };
    let before = before.get_or_insert_with(|| journals.clone());
    let (mut leaves, mut journals) = (leaves, journals);
    let mut docs = Vec::new();
    for attempt in 0..=JOURNAL_RACE_RETRIES {
        let raced = journal_once(
            db, set, kind, run, leaves, journals, before, &mut docs, counts,
        )
        .await?;
        let Some(first) = raced.first() else {
            break;
        };
        if attempt == JOURNAL_RACE_RETRIES {
            return Err(EngineError::JournalRace(first.clone()));
        }
        // Another writer (a gateway journaling a push) changed these
        // journals since they were read: read them and their documents
        // again and redo only them; the rest of the batch is journaled.
        journals = load_journals(db, &raced).await?;
        for id in &raced {
            match journals.get(id) {
                Some(journal) => before.insert(id.clone(), journal.clone()),
                None => before.remove(id),
            };
        }
        leaves = Vec::new();
        for id in &raced {
            leaves.extend(live_leaves(db, id).await?.into_iter().map(|l| l.doc));
        }
    }
    // In key order: consecutive writes then walk each B-tree one way.
    docs.sort_by(|a, b| id_str(a).cmp(id_str(b)));
    Ok(docs)
}

/// One attempt of [`journal_batch`]: computes the new bodies of `leaves`
/// with `journals`, writes the journals and appends to `docs` the documents
/// whose journal was written. Returns the ids whose journal another writer
/// had changed (a conflict): nothing of theirs is kept.
#[allow(clippy::too_many_arguments)]
async fn journal_once(
    db: &Database,
    set: &MigrationSet,
    kind: Kind,
    run: &Run,
    leaves: Vec<Value>,
    mut journals: HashMap<String, Journal>,
    before: &mut HashMap<String, Journal>,
    docs: &mut Vec<Value>,
    counts: &mut Counts,
) -> Result<Vec<String>> {
    let mut rewritten = Vec::new();
    let mut touched: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for (id, rewrite) in rewrite_all(set, kind, run, leaves, &mut journals)? {
        rewritten.push(rewrite);
        if seen.insert(id.clone()) {
            touched.push(id);
        }
    }
    if rewritten.is_empty() {
        return Ok(Vec::new());
    }
    touched.sort_unstable();
    let results = match &db.state {
        // Embedded: the journal serialized once, straight to its stored text.
        AnyStore::Sqlite(state) => {
            let mut texts = Vec::with_capacity(touched.len());
            for id in &touched {
                if let Some(journal) = journals.get_mut(id) {
                    let rev = journal.rev.take();
                    let body = serde_json::to_string(&*journal);
                    journal.rev.clone_from(&rev);
                    texts.push(TextDoc {
                        id: journal_id(id),
                        rev,
                        body: body.map_err(|e| EngineError::Corrupt(e.to_string()))?,
                    });
                }
            }
            state.bulk_docs_text(texts).await?
        }
        AnyStore::Couch(_) => {
            let mut journal_docs = Vec::with_capacity(touched.len());
            for id in &touched {
                if let Some(journal) = journals.get(id) {
                    let mut doc = serde_json::to_value(journal)
                        .map_err(|e| EngineError::Corrupt(e.to_string()))?;
                    doc["_id"] = Value::from(journal_id(id));
                    journal_docs.push(doc);
                }
            }
            db.state.bulk_docs(journal_docs, true).await?
        }
    };
    let mut raced = Vec::new();
    for result in results {
        let id = result.id.trim_start_matches("journal:").to_owned();
        match result.error.as_deref() {
            None => {
                // A retry rewrites the journal from its content before
                // the batch, on top of the revision just written.
                before.entry(id).or_default().rev = result.rev.clone();
            }
            Some("conflict") => raced.push(id),
            Some(error) => {
                return Err(EngineError::Refused(format!(
                    "the journal of {id} could not be written ({error})"
                )))
            }
        }
    }
    for rewrite in rewritten {
        if !raced.iter().any(|id| id == id_str(&rewrite.doc)) {
            counts.restored += u64::from(rewrite.restored);
            counts.bytes += rewrite.bytes;
            docs.push(rewrite.doc);
        }
    }
    Ok(raced)
}

/// Writes a journaled batch's documents, each conditional on the revision
/// read; documents that meet a newer edit are re-read, journaled and
/// written again.
async fn write_batch(
    db: &Database,
    set: &MigrationSet,
    kind: Kind,
    run: &Run,
    pending: Pending,
    opts: &RunOptions,
) -> Result<Done> {
    let Pending {
        cursor,
        mut docs,
        before,
        mut counts,
        ..
    } = pending;
    let mut before = Some(before);
    let mut written = Vec::new();
    for attempt in 0..=opts.max_retries {
        if docs.is_empty() {
            break;
        }
        let results = db.data.bulk_docs(std::mem::take(&mut docs), true).await?;
        let mut retry_ids = Vec::new();
        for result in results {
            match (&result.rev, result.error.as_deref()) {
                (Some(rev), None) => {
                    written.push(key(&result.id, rev));
                    counts.written += 1;
                }
                (_, Some("conflict")) => retry_ids.push(result.id.clone()),
                (_, error) => {
                    return Err(EngineError::Refused(format!(
                        "document {} could not be written: {} {}",
                        result.id,
                        error.unwrap_or("error"),
                        result.reason.unwrap_or_default()
                    )))
                }
            }
        }
        if retry_ids.is_empty() {
            break;
        }
        // Someone edited these meanwhile: migrate their edit instead.
        if attempt == opts.max_retries {
            return Err(EngineError::Refused(format!(
                "documents keep changing under the {}; run it again to continue",
                kind.name()
            )));
        }
        counts.retried += retry_ids.len() as u64;
        let mut leaves = Vec::new();
        for id in retry_ids {
            leaves.extend(live_leaves(db, &id).await?.into_iter().map(|l| l.doc));
        }
        docs = journal_batch(db, set, kind, run, leaves, &mut before, &mut counts).await?;
    }
    Ok(Done {
        cursor,
        written,
        counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::project::Project;

    fn sample_run(kind: Kind, from: u32, to: u32) -> Run {
        Run {
            id: "test-run".into(),
            kind: kind.name().into(),
            from,
            to,
            started: 0,
            finished: None,
            outcome: "running".into(),
            since: Value::from(0),
            by_id: None,
            instant: false,
            resumed: 0,
            counts: Counts::default(),
        }
    }

    /// One thread, leaf by leaf: what `rewrite_all` must equal.
    fn rewrite_one_by_one(
        set: &MigrationSet,
        kind: Kind,
        run: &Run,
        leaves: Vec<Value>,
        journals: &mut HashMap<String, Journal>,
    ) -> Vec<(String, Value, bool)> {
        let mut out = Vec::new();
        for leaf in leaves {
            let id = id_of(&leaf);
            let journal = journals.entry(id.clone()).or_default();
            if let Some(r) = rewrite(set, kind, run, leaf, journal).unwrap() {
                out.push((id, r.doc, r.restored));
            }
        }
        out
    }

    #[test]
    fn a_batch_rewritten_in_parts_equals_one_rewritten_leaf_by_leaf() {
        let set = Project::load(None, Some(&rewind_testkit::cht_migrations()))
            .expect("examples/cht loads")
            .migrations;
        let mut leaves: Vec<Value> = rewind_sample::docs(900, 7)
            .enumerate()
            .map(|(i, mut d)| {
                d["_rev"] = Value::from(format!("1-{:032x}", i));
                d
            })
            .collect();
        // A conflicted document whose second leaf comes last, far from its
        // first: both leaves must see (and update) one journal.
        let mut second = leaves[3].clone();
        second["_rev"] = Value::from(format!("1-{:032x}", 99_999));
        second["phone"] = Value::from("+000 from the other leaf");
        leaves.push(second);
        for (kind, from, to) in [(Kind::Upgrade, 0, 7), (Kind::Upgrade, 0, 3)] {
            let run = sample_run(kind, from, to);
            let (mut sequential, mut parallel) = (HashMap::new(), HashMap::new());
            let expected = rewrite_one_by_one(&set, kind, &run, leaves.clone(), &mut sequential);
            let got: Vec<(String, Value, bool)> =
                rewrite_all(&set, kind, &run, leaves.clone(), &mut parallel)
                    .unwrap()
                    .into_iter()
                    .map(|(id, r)| (id, r.doc, r.restored))
                    .collect();
            let sorted = |mut v: Vec<(String, Value, bool)>| {
                v.sort_by(|a, b| (&a.0, rev_of(&a.1)).cmp(&(&b.0, rev_of(&b.1))));
                v
            };
            assert!(expected.len() > PARALLEL_REWRITE_MIN, "the batch is split");
            assert_eq!(sorted(got), sorted(expected), "{kind:?} {from} → {to}");
            assert_eq!(
                parallel, sequential,
                "journals after {kind:?} {from} → {to}"
            );
            let conflicted = &parallel[&id_of(&leaves[3])];
            assert_eq!(conflicted.images.len(), 2, "both leaves journaled");
        }
        // And back: a rollback of what the upgrade wrote, from the journals.
        let up = sample_run(Kind::Upgrade, 0, 7);
        let mut journals = HashMap::new();
        let upgraded: Vec<Value> =
            rewrite_one_by_one(&set, Kind::Upgrade, &up, leaves, &mut journals)
                .into_iter()
                .map(|(_, doc, _)| doc)
                .collect();
        let down = sample_run(Kind::Rollback, 7, 0);
        let mut parallel = journals.clone();
        let expected =
            rewrite_one_by_one(&set, Kind::Rollback, &down, upgraded.clone(), &mut journals);
        let got: Vec<(String, Value, bool)> =
            rewrite_all(&set, Kind::Rollback, &down, upgraded, &mut parallel)
                .unwrap()
                .into_iter()
                .map(|(id, r)| (id, r.doc, r.restored))
                .collect();
        assert!(
            got.iter().all(|(_, _, restored)| *restored),
            "before-images restored"
        );
        assert_eq!(got.len(), expected.len());
        assert_eq!(parallel, journals, "journals after the rollback");
    }
}
