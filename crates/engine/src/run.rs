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
    body_hash, body_text, journal_id, journaled_id, stamp_unstamped, stored_version, Image,
    Journal, JournalComplements,
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
use std::sync::Arc;

/// Which way a run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// To a newer version.
    Upgrade,
    /// Back to an older version.
    Rollback,
}

impl Kind {
    /// The kind a [`Run`] records by name (`Run::kind`).
    fn of(run: &Run) -> Kind {
        if run.kind == Kind::Upgrade.name() {
            Kind::Upgrade
        } else {
            Kind::Rollback
        }
    }

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
    /// The way the caller means to go (`rewind upgrade` or `rewind
    /// rollback`): a run the other way, to start or to resume, is refused
    /// with the command that does it. `None` goes whichever way `to` lies.
    pub only: Option<Kind>,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            batch: 0,
            max_retries: 20,
            instant: false,
            only: None,
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

/// A document's `_id` (empty when it has none).
pub(crate) fn id_of(doc: &Value) -> String {
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

/// A document's journal as read, parsed where it is used (on the threads
/// that translate). Cheap to clone: a batch keeps the journals as they were
/// for its retries without copying them.
#[derive(Clone, Default)]
struct JournalIn {
    /// The journal document's revision (`None`: none stored yet).
    rev: Option<String>,
    content: JournalContent,
}

#[derive(Clone, Default)]
enum JournalContent {
    /// No journal yet.
    #[default]
    Empty,
    /// Its stored text (embedded).
    Text(Arc<str>),
    /// Parsed from a document (over HTTP).
    Parsed(Arc<Journal>),
}

impl JournalIn {
    /// The journal of document `id`, at `self.rev`.
    fn parse(&self, id: &str) -> Result<Journal> {
        let mut journal = match &self.content {
            JournalContent::Empty => Journal::default(),
            JournalContent::Text(text) => serde_json::from_str(text)
                .map_err(|e| EngineError::Corrupt(format!("journal of {id}: {e}")))?,
            JournalContent::Parsed(journal) => Journal::clone(journal),
        };
        journal.rev.clone_from(&self.rev);
        Ok(journal)
    }
}

/// The journal document of `id`, to write: as text for the embedded store.
fn journal_doc(id: &str, mut journal: Journal, as_text: bool) -> Result<NewDoc> {
    let corrupt = |e: serde_json::Error| EngineError::Corrupt(format!("journal of {id}: {e}"));
    if as_text {
        let rev = journal.rev.take();
        let body = serde_json::to_string(&journal).map_err(corrupt)?;
        return Ok(NewDoc::Text(TextDoc::new(
            journal_id(id),
            rev.as_deref(),
            body,
        )?));
    }
    let mut doc = serde_json::to_value(&journal).map_err(corrupt)?;
    doc["_id"] = Value::from(journal_id(id));
    Ok(NewDoc::Value(doc))
}

/// The journals of a page of documents. Over HTTP, a page of the id-ordered
/// pass first asks for the journals in its id range (one seek; on
/// pouchdb-server, asking for 500 absent keys costs about as much as
/// writing them): when the range holds few others, that is the answer.
/// A journal the range misses (a server collating ids otherwise) makes its
/// conditional write fail, and the retry reads it by key.
async fn load_page_journals(db: &Database, ids: &[String]) -> Result<HashMap<String, JournalIn>> {
    let AnyStore::Couch(_) = &db.state else {
        return load_journals(&db.state, ids).await;
    };
    let (Some(first), Some(last)) = (ids.iter().min(), ids.iter().max()) else {
        return Ok(HashMap::new());
    };
    if ids.len() < RANGE_READ_MIN {
        return load_journals(&db.state, ids).await;
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
        return load_journals(&db.state, ids).await;
    }
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    journals_of_rows(
        rows.into_iter()
            .filter(|row| wanted.contains(journaled_id(&row.key))),
    )
}

/// The journals of `ids` in `companion`, parsed, by document id (a
/// document without one is left out).
pub(crate) async fn read_journals(
    companion: &AnyStore,
    ids: &[String],
) -> Result<HashMap<String, Journal>> {
    let mut out = HashMap::new();
    for (id, journal) in load_journals(companion, ids).await? {
        let parsed = journal.parse(&id)?;
        out.insert(id, parsed);
    }
    Ok(out)
}

/// The journals of `ids` in `companion`, read by key.
async fn load_journals(companion: &AnyStore, ids: &[String]) -> Result<HashMap<String, JournalIn>> {
    let keys: Vec<String> = ids.iter().map(|id| journal_id(id)).collect();
    if let AnyStore::Sqlite(state) = companion {
        return journal_texts(state, ids).await;
    }
    let rows = companion
        .all_docs(&AllDocsOptions {
            keys: Some(keys),
            include_docs: true,
            ..AllDocsOptions::default()
        })
        .await?
        .rows;
    journals_of_rows(rows.into_iter())
}

/// The journals of `ids` in an embedded companion, as their stored text
/// (parsed by whoever uses them).
async fn journal_texts(
    state: &rewind_store::SqliteStore,
    ids: &[String],
) -> Result<HashMap<String, JournalIn>> {
    let keys = ids.iter().map(|id| journal_id(id)).collect();
    let found = state.winner_texts(keys).await?;
    Ok(ids
        .iter()
        .zip(found)
        .filter_map(|(id, found)| {
            let (rev, text) = found?;
            let content = JournalContent::Text(text.into());
            Some((
                id.clone(),
                JournalIn {
                    rev: Some(rev),
                    content,
                },
            ))
        })
        .collect())
}

/// The journals in rows of the companion's `_all_docs`, by document id.
fn journals_of_rows(
    rows: impl Iterator<Item = rewind_store::AllDocsRow>,
) -> Result<HashMap<String, JournalIn>> {
    let mut out = HashMap::new();
    for row in rows {
        if let Some(doc) = row.doc {
            let id = journaled_id(&row.key).to_owned();
            let journal: Journal = serde_json::from_value(doc)
                .map_err(|e| EngineError::Corrupt(format!("journal of {id}: {e}")))?;
            let rev = journal.rev.clone();
            let content = JournalContent::Parsed(Arc::new(journal));
            out.insert(id, JournalIn { rev, content });
        }
    }
    Ok(out)
}

/// What to do with one leaf.
struct Rewrite {
    doc: Value,
    restored: bool,
}

/// A rewritten leaf as it is written.
enum NewDoc {
    /// A document as a value (over HTTP, or with attachments).
    Value(Value),
    /// Its body already serialized, for the embedded store: made on the
    /// threads that translate, so the stage that writes does not serialize.
    Text(TextDoc),
}

impl NewDoc {
    /// `doc` as text when `as_text` and it is plain enough to be.
    fn new(doc: Value, as_text: bool) -> NewDoc {
        match as_text.then(|| TextDoc::from_doc(&doc)).flatten() {
            Some(text) => NewDoc::Text(text),
            None => NewDoc::Value(doc),
        }
    }

    fn id(&self) -> &str {
        match self {
            NewDoc::Value(doc) => id_str(doc),
            NewDoc::Text(text) => text.id(),
        }
    }

    /// The document's length as JSON.
    fn json_len(&self) -> u64 {
        match self {
            NewDoc::Value(doc) => rewind_store::json_len(doc),
            NewDoc::Text(text) => text.json_len(),
        }
    }
}

/// A rewritten leaf, ready to write.
struct Rewritten {
    doc: NewDoc,
    restored: bool,
    /// The new document's length as JSON.
    bytes: u64,
}

impl Rewritten {
    fn new(rewrite: Rewrite, as_text: bool) -> Rewritten {
        let doc = NewDoc::new(rewrite.doc, as_text);
        Rewritten {
            bytes: doc.json_len(),
            doc,
            restored: rewrite.restored,
        }
    }
}

/// Whether a run hands `db`'s stores documents and journals as text (the
/// embedded store; a database and its companion are of one kind).
fn writes_text(db: &Database) -> bool {
    matches!(db.data, AnyStore::Sqlite(_)) && matches!(db.state, AnyStore::Sqlite(_))
}

/// Writes new revisions (`new_edits=true`) to `store`: text through the
/// embedded store's text path, values as documents. Results in no
/// particular order.
async fn write_docs(store: &AnyStore, docs: Vec<NewDoc>) -> Result<Vec<rewind_store::BulkResult>> {
    let (mut texts, mut values) = (Vec::new(), Vec::new());
    for doc in docs {
        match doc {
            NewDoc::Text(text) => texts.push(text),
            NewDoc::Value(value) => values.push(value),
        }
    }
    let mut results = Vec::new();
    if !texts.is_empty() {
        let AnyStore::Sqlite(sqlite) = store else {
            return Err(EngineError::Corrupt(
                "documents as text for a store that takes values".into(),
            ));
        };
        results = sqlite.bulk_docs_text(texts).await?;
    }
    if !values.is_empty() {
        results.extend(store.bulk_docs(values, true).await?);
    }
    Ok(results)
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
            journal.retake_run_image(&run.id, &rev, from, to);
            let version = stored_version(set, journal, &rev, &leaf);
            let mut doc = leaf;
            // A phone's unstamped revision is at the version the gateway
            // journaled: its steps must not apply again.
            stamp_unstamped(set, &mut doc, version);
            // A step that applies always moves the stamp forward, so the
            // body changed exactly when a step recorded its complement; when
            // none did, neither the document nor its journal changed.
            let kept = journal.kept_between(from, to);
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
                kept: Some(kept),
            });
            Ok(Some(Rewrite {
                doc,
                restored: false,
            }))
        }
        Kind::Rollback => {
            let rev = rev_of(&leaf);
            let stamped = stored_version(set, journal, &rev, &leaf);
            if stamped <= to {
                return Ok(None);
            }
            // Taking a run's image back leaves `stamped` as it was: only a
            // push's image names a revision's version.
            journal.retake_run_image(&run.id, &rev, stamped.min(from), to);
            let leaf_hash = body_hash(&leaf);
            let kept = journal.kept_between(to, stamped.min(from));
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
                    stamp_unstamped(set, &mut doc, stamped);
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
                kept: Some(kept),
            });
            if let Some(object) = doc.as_object_mut() {
                object.shift_remove("_revisions");
            }
            Ok(Some(Rewrite { doc, restored }))
        }
    }
}

/// Leaves below which a batch is rewritten on one thread (a thread costs
/// more than it saves).
const PARALLEL_REWRITE_MIN: usize = 256;

/// A batch rewritten: its documents and the journals to write first.
struct RewrittenBatch {
    /// The rewritten leaves, in batch order except that a document's
    /// leaves come together.
    docs: Vec<Rewritten>,
    /// The journal documents of the documents rewritten, in id order.
    journals: Vec<NewDoc>,
}

/// [`rewrite`] for every leaf of a batch, with the journals of their
/// documents as read (none: an empty journal). The CPU-bound work (parsing
/// journals, translating, serializing documents and journals) is spread
/// over the machine's cores in parts that never split a document's leaves
/// (a document's journal is updated by each of its leaves in turn); on
/// errors, the first part's error is returned and nothing should be
/// written. `as_text`: documents and journals are serialized there too
/// ([`NewDoc`]).
fn rewrite_all(
    set: &MigrationSet,
    kind: Kind,
    run: &Run,
    leaves: Vec<Value>,
    mut journals: HashMap<String, JournalIn>,
    as_text: bool,
) -> Result<RewrittenBatch> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let parts = if leaves.len() < PARALLEL_REWRITE_MIN {
        1
    } else {
        threads.min(leaves.len() / (PARALLEL_REWRITE_MIN / 2))
    };
    // Each part takes its documents' journals along.
    // A document's leaves all go to the part of its first one.
    let mut work: Vec<(Vec<Value>, HashMap<String, JournalIn>)> = Vec::with_capacity(parts);
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
    let run_part = |(part, mut read): (Vec<Value>, HashMap<String, JournalIn>)| {
        let mut docs = Vec::new();
        // Journals parsed so far, and which of them changed, in part order.
        let mut parsed: HashMap<String, Journal> = HashMap::new();
        let mut touched: Vec<String> = Vec::new();
        for leaf in part {
            let id = id_of(&leaf);
            let journal = match parsed.entry(id.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let journal = read.remove(&id).unwrap_or_default().parse(&id)?;
                    e.insert(journal)
                }
            };
            if let Some(rewrite) = rewrite(set, kind, run, leaf, journal)? {
                docs.push(Rewritten::new(rewrite, as_text));
                if touched.last() != Some(&id) {
                    touched.push(id);
                }
            }
        }
        let journals = touched
            .into_iter()
            .filter_map(|id| parsed.remove(&id).map(|journal| (id, journal)))
            .map(|(id, journal)| journal_doc(&id, journal, as_text))
            .collect::<Result<Vec<_>>>()?;
        Ok::<_, EngineError>((docs, journals))
    };
    let results: Vec<Result<_>> = if work.len() <= 1 {
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
                    Err(e) => results.push(Err(EngineError::Refused(format!(
                        "could not start a thread to translate documents: {e}"
                    )))),
                }
            }
            results
        })
    };
    let mut batch = RewrittenBatch {
        docs: Vec::new(),
        journals: Vec::new(),
    };
    for result in results {
        let (docs, journals) = result?;
        batch.docs.extend(docs);
        batch.journals.extend(journals);
    }
    batch.journals.sort_by(|a, b| a.id().cmp(b.id()));
    Ok(batch)
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
                run.interrupt(e);
            }
            // Keep the run for resumption; give the lease up.
            let _ = state.release(db).await;
        }
    }
    result
}

/// The refusal to start a run while `run` is in progress: what it is, and
/// the command that finishes it.
fn in_progress(run: &Run) -> EngineError {
    let article = if Kind::of(run) == Kind::Upgrade {
        "an"
    } else {
        "a"
    };
    EngineError::Refused(format!(
        "{article} {} from {} to {} is in progress (run {}); finish it first: `rewind {} --to {}`",
        run.kind, run.from, run.to, run.id, run.kind, run.to
    ))
}

/// Refuses a run that would go the other way than `only` says: a run in
/// progress of the other kind, or a target on the other side of the
/// database's version. A rollback that upgrades (or the reverse) is never
/// what the command's user meant.
fn refuse_other_way(state: &State, to: u32, only: Option<Kind>) -> Result<()> {
    let Some(only) = only else {
        return Ok(());
    };
    let (kind, from) = match &state.run {
        Some(run) if run.to == to => {
            if Kind::of(run) != only {
                return Err(in_progress(run));
            }
            return Ok(());
        }
        Some(_) => return Ok(()), // refused below: another run is in progress
        None if to > state.version => (Kind::Upgrade, state.version),
        None if to < state.version => (Kind::Rollback, state.version),
        None => return Ok(()),
    };
    if kind == only {
        return Ok(());
    }
    let (what, verb) = match kind {
        Kind::Upgrade => (
            format!("rolling back to {to} would upgrade it"),
            "rewind upgrade",
        ),
        Kind::Rollback => (
            format!("upgrading to {to} would roll it back"),
            "rewind rollback",
        ),
    };
    Err(EngineError::Refused(format!(
        "the database is at version {from}: {what}; to do that, run `{verb} --to {to}`"
    )))
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
    refuse_other_way(state, to, opts.only)?;
    let info = db.data.info().await?;
    let mut run = match state.run.take() {
        Some(mut run) if run.to == to => {
            run.resumed += 1;
            run.outcome = "running".into();
            run
        }
        Some(run) => return Err(in_progress(&run)),
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
            let started = now_ms();
            let id = format!("{started:x}-{}", std::process::id());
            Run {
                kind: kind.name().into(),
                by_id: Some(ByIdPass {
                    after: String::new(),
                    since: info.update_seq.clone(),
                }),
                instant: kind == Kind::Rollback && opts.instant,
                ..Run::new(id, state.version, to, started)
            }
        }
    };
    let kind = Kind::of(&run);
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
            let written = (!writing).then_some(run.counts.written);
            let Some((page, next_cursor)) =
                read_page(db, &cursor, kind, batch, &mut ahead, written).await?
            else {
                return Ok(None);
            };
            if page.rows.iter().any(|r| prev_ids.contains(&r.id)) {
                // Prepared once that batch is written, which may change
                // journals read with the page: read again then.
                let page = Page {
                    journals: None,
                    ..page
                };
                return Ok(Some(Ok((page, next_cursor))));
            }
            let pending = prepare(db, set, kind, &run, page, next_cursor, &written_here).await?;
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
        // The write first: its transaction starts on a blocking thread
        // before `next` translates (synchronously, on this task's thread).
        let (done, next) = tokio::join!(write, next);
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
            Some(Ok((page, next_cursor))) => {
                prepare(db, set, kind, &run, page, next_cursor, &written_here).await?
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
    state.record(run.clone());
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
    page: tokio::task::JoinHandle<Result<Page>>,
}

/// A page of documents, with their journals when they were read ahead.
struct Page {
    rows: Vec<ChangeRow>,
    /// The journals of the page's documents (embedded), read with them.
    journals: Option<HashMap<String, JournalIn>>,
}

impl Page {
    /// The page after `after` in id order; on the embedded store and
    /// `with_journals`, with its documents' journals (read now, while the
    /// batch before is computed and written: a journal another writer
    /// changes meanwhile fails its conditional write and is read again).
    async fn read_ahead(
        data: AnyStore,
        state: AnyStore,
        after: String,
        batch: usize,
        with_journals: bool,
    ) -> Result<Page> {
        let rows = data.live_docs_by_id(Some(after), batch, true).await?;
        let journals = match &state {
            AnyStore::Sqlite(state) if with_journals => {
                let ids: Vec<String> = rows.iter().map(|row| row.id.clone()).collect();
                Some(journal_texts(state, &ids).await?)
            }
            _ => None,
        };
        Ok(Page { rows, journals })
    }
}

/// The next page of documents after `cursor`, and the cursor after it;
/// `None` when the feed has nothing more.
///
/// In the id-ordered pass, the page after the one returned is read at once
/// in the background (`ahead`), while this one is computed and written:
/// the two hold different documents, and a document edited after it was
/// read fails its conditional write and is read again. A rollback's page
/// comes with its journals (embedded): they hold the before-images, its
/// longest read (1.3 s of a 100,000-document rollback), which then no
/// longer waits between computing one batch and the next. An upgrade, whose
/// journals are mostly absent, measured ~8% slower with it, so it does not.
///
/// `written`: the documents the run has written (checkpointed ones of
/// earlier processes included), or `None` while a batch is being written.
async fn read_page(
    db: &Database,
    cursor: &Cursor,
    kind: Kind,
    batch: usize,
    ahead: &mut Option<ReadAhead>,
    written: Option<u64>,
) -> Result<Option<(Page, Cursor)>> {
    // Whether this read is the first of the feed after the first pass.
    let mut first_feed_page = false;
    let since = match cursor {
        Cursor::Ids { after, seq } => {
            let page = match ahead.take() {
                Some(read) if read.after == *after => read.page.await.map_err(|e| {
                    rewind_store::StoreError::Internal(format!("read task failed: {e}"))
                })??,
                _ => Page {
                    rows: db
                        .data
                        .live_docs_by_id(Some(after.clone()), batch, true)
                        .await?,
                    journals: None,
                },
            };
            match page.rows.last() {
                Some(last) => {
                    let (data, state) = (db.data.clone(), db.state.clone());
                    let after = last.id.clone();
                    *ahead = Some(ReadAhead {
                        after: after.clone(),
                        page: tokio::spawn(Page::read_ahead(
                            data,
                            state,
                            after,
                            batch,
                            kind == Kind::Rollback,
                        )),
                    });
                    let next = Cursor::Ids {
                        after: last.id.clone(),
                        seq: seq.clone(),
                    };
                    return Ok(Some((page, next)));
                }
                // The first pass is over: the feed from where it began
                // brings what changed meanwhile, unless only the run wrote.
                None => {
                    let Some(written) = written else {
                        // Decided once the batch in flight is written (its
                        // writes count): an empty page, the same cursor.
                        let page = Page {
                            rows: Vec::new(),
                            journals: None,
                        };
                        return Ok(Some((page, cursor.clone())));
                    };
                    first_feed_page = true;
                    only_own_writes_since(db, seq, written)
                        .await?
                        .unwrap_or_else(|| seq.clone())
                }
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
    // An empty first page of the feed still moves the cursor off the first
    // pass (answering `None` would leave it there, and the run would end
    // the pass and read this page a second time).
    if changes.results.is_empty() && !first_feed_page {
        return Ok(None);
    }
    let page = Page {
        rows: changes.results,
        journals: None,
    };
    Ok(Some((page, Cursor::Seq(changes.last_seq))))
}

/// Where the changes feed after a run's first pass can start: the current
/// sequence when the data's sequence moved by exactly the run's `written`
/// documents since `since` (where the pass began), `None` otherwise. Every
/// write adds one to the sequence, so nobody else wrote meanwhile (a write
/// of a killed process that no checkpoint counted makes it differ too),
/// and the feed since `since` holds only the run's own writes: reading it
/// costs pouchdb-server, which answers the feed on its one JavaScript
/// thread, about a fifth of an upgrade. Only for sequences that are
/// integers (pouchdb-server, the embedded store); CouchDB's are opaque,
/// and its feed is read.
async fn only_own_writes_since(
    db: &Database,
    since: &Value,
    written: u64,
) -> Result<Option<Value>> {
    let Some(start) = since.as_u64() else {
        return Ok(None);
    };
    let info = db.data.info().await?;
    Ok(match info.update_seq.as_u64() {
        Some(now) if Some(now) == start.checked_add(written) => Some(info.update_seq),
        _ => None,
    })
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
    docs: Vec<NewDoc>,
    /// The journals as they were before this batch, at their new revisions.
    before: HashMap<String, JournalIn>,
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
    page: Page,
    cursor: Cursor,
    written_here: &HashSet<u64>,
) -> Result<Pending> {
    let Page {
        rows: page,
        journals: read,
    } = page;
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
    let docs = journal_batch(db, set, kind, run, leaves, read, &mut before, &mut counts).await?;
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
/// complements, on rollback, for a write that did not happen); without
/// them, the journals are `read` ahead or read now. Returns the documents
/// to write.
#[allow(clippy::too_many_arguments)]
async fn journal_batch(
    db: &Database,
    set: &MigrationSet,
    kind: Kind,
    run: &Run,
    leaves: Vec<Value>,
    read: Option<HashMap<String, JournalIn>>,
    before: &mut Option<HashMap<String, JournalIn>>,
    counts: &mut Counts,
) -> Result<Vec<NewDoc>> {
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
    let journals = match (before.as_ref(), read) {
        (Some(before), _) => ids
            .iter()
            .filter_map(|id| before.get(id).map(|j| (id.clone(), j.clone())))
            .collect(),
        (None, Some(mut read)) => ids
            .iter()
            .filter_map(|id| read.remove(id).map(|j| (id.clone(), j)))
            .collect(),
        (None, None) => load_page_journals(db, &ids).await?,
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
        journals = load_journals(&db.state, &raced).await?;
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
    docs.sort_by(|a, b| a.id().cmp(b.id()));
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
    journals: HashMap<String, JournalIn>,
    before: &mut HashMap<String, JournalIn>,
    docs: &mut Vec<NewDoc>,
    counts: &mut Counts,
) -> Result<Vec<String>> {
    let batch = rewrite_all(set, kind, run, leaves, journals, writes_text(db))?;
    if batch.docs.is_empty() {
        return Ok(Vec::new());
    }
    let mut raced = Vec::new();
    for result in write_docs(&db.state, batch.journals).await? {
        let id = journaled_id(&result.id).to_owned();
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
    let raced_ids: HashSet<&str> = raced.iter().map(String::as_str).collect();
    for rewrite in batch.docs {
        if !raced_ids.contains(rewrite.doc.id()) {
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
        let results = write_docs(&db.data, std::mem::take(&mut docs)).await?;
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
        docs = journal_batch(db, set, kind, run, leaves, None, &mut before, &mut counts).await?;
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
            kind: kind.name().into(),
            ..Run::new("test-run", from, to, 0)
        }
    }

    #[test]
    fn a_command_refuses_to_go_the_other_way() {
        let at = |version: u32, run: Option<Run>| {
            let mut state = State::default();
            state.version = version;
            state.run = run;
            state
        };
        let refused =
            |state: &State, to: u32, only: Kind| match refuse_other_way(state, to, Some(only)) {
                Err(EngineError::Refused(why)) => why,
                other => panic!("not refused: {other:?}"),
            };
        let why = refused(&at(0, None), 3, Kind::Rollback);
        assert!(why.contains("`rewind upgrade --to 3`"), "{why}");
        let why = refused(&at(7, None), 3, Kind::Upgrade);
        assert!(why.contains("`rewind rollback --to 3`"), "{why}");
        // A run in progress is resumed by its own command only.
        let rolling = at(7, Some(sample_run(Kind::Rollback, 7, 3)));
        let why = refused(&rolling, 3, Kind::Upgrade);
        assert!(
            why.contains("a rollback from 7 to 3 is in progress"),
            "{why}"
        );
        assert!(why.contains("`rewind rollback --to 3`"), "{why}");
        let EngineError::Refused(why) = in_progress(&sample_run(Kind::Upgrade, 0, 7)) else {
            panic!("not a refusal")
        };
        assert!(
            why.contains("an upgrade from 0 to 7 is in progress")
                && why.contains("finish it first: `rewind upgrade --to 7`"),
            "{why}"
        );
        assert!(refuse_other_way(&rolling, 3, Some(Kind::Rollback)).is_ok());
        // The way the command goes, or no command, passes.
        assert!(refuse_other_way(&at(0, None), 3, Some(Kind::Upgrade)).is_ok());
        assert!(refuse_other_way(&at(7, None), 3, Some(Kind::Rollback)).is_ok());
        assert!(refuse_other_way(&at(7, None), 3, None).is_ok());
        assert!(refuse_other_way(&at(0, None), 3, None).is_ok());
    }

    fn value_of(doc: NewDoc) -> Value {
        match doc {
            NewDoc::Value(doc) => doc,
            NewDoc::Text(text) => panic!("asked for values, got text of {}", text.id()),
        }
    }

    /// Journals as a run reads them.
    fn read(journals: &HashMap<String, Journal>) -> HashMap<String, JournalIn> {
        journals
            .iter()
            .map(|(id, journal)| {
                let content = JournalContent::Parsed(Arc::new(journal.clone()));
                let rev = journal.rev.clone();
                (id.clone(), JournalIn { rev, content })
            })
            .collect()
    }

    /// `rewrite_all` with values: the documents, and the journals to write
    /// by document id.
    #[allow(clippy::type_complexity)]
    fn rewrite_all_values(
        set: &MigrationSet,
        kind: Kind,
        run: &Run,
        leaves: Vec<Value>,
        journals: &HashMap<String, Journal>,
    ) -> (Vec<(String, Value, bool)>, HashMap<String, Journal>) {
        let batch = rewrite_all(set, kind, run, leaves, read(journals), false).unwrap();
        let docs = batch
            .docs
            .into_iter()
            .map(|r| (r.doc.id().to_owned(), value_of(r.doc), r.restored))
            .collect();
        let journals = batch
            .journals
            .into_iter()
            .map(|doc| {
                let id = journaled_id(doc.id()).to_owned();
                (id, serde_json::from_value(value_of(doc)).unwrap())
            })
            .collect();
        (docs, journals)
    }

    /// One thread, leaf by leaf: what `rewrite_all` must equal. Returns
    /// the documents and the journals of the documents rewritten.
    #[allow(clippy::type_complexity)]
    fn rewrite_one_by_one(
        set: &MigrationSet,
        kind: Kind,
        run: &Run,
        leaves: Vec<Value>,
        journals: &mut HashMap<String, Journal>,
    ) -> (Vec<(String, Value, bool)>, HashMap<String, Journal>) {
        let mut out = Vec::new();
        for leaf in leaves {
            let id = id_of(&leaf);
            let journal = journals.entry(id.clone()).or_default();
            if let Some(r) = rewrite(set, kind, run, leaf, journal).unwrap() {
                out.push((id, r.doc, r.restored));
            }
        }
        let touched = out
            .iter()
            .map(|(id, _, _)| (id.clone(), journals[id].clone()))
            .collect();
        (out, touched)
    }

    #[test]
    fn a_revision_rewritten_again_by_the_same_run_comes_out_the_same() {
        // A run killed between writing a leaf's journal and the leaf
        // rewrites it again when resumed, from that journal.
        let set = Project::load(None, Some(&rewind_testkit::cht_migrations()))
            .expect("examples/cht loads")
            .migrations;
        let mut person = rewind_sample::docs(40, 7)
            .find(|d| d["type"] == "person")
            .expect("a person");
        person["name"] = Value::from("Lan ");
        person["_rev"] = Value::from("1-aaaa");
        let mut journal = Journal::default();
        let up = Run {
            id: "the-upgrade".into(),
            ..sample_run(Kind::Upgrade, 0, 7)
        };
        let first = rewrite(&set, Kind::Upgrade, &up, person.clone(), &mut journal)
            .unwrap()
            .expect("upgraded");
        let again = rewrite(&set, Kind::Upgrade, &up, person, &mut journal)
            .unwrap()
            .expect("upgraded");
        assert_eq!(first.doc, again.doc);
        assert_eq!(journal.images.len(), 1, "one image of the leaf");
        // Edited at v7 since (no before-image to restore): translated down
        // with the name the upgrade kept aside, twice alike.
        let mut edited = first.doc;
        edited["phone"] = Value::from("+1-edited");
        edited["_rev"] = Value::from("3-bbbb");
        let down = Run {
            id: "the-rollback".into(),
            ..sample_run(Kind::Rollback, 7, 0)
        };
        let rolled = rewrite(&set, Kind::Rollback, &down, edited.clone(), &mut journal)
            .unwrap()
            .expect("rolled back");
        assert_eq!(rolled.doc["name"], "Lan ", "{}", rolled.doc);
        let again = rewrite(&set, Kind::Rollback, &down, edited, &mut journal)
            .unwrap()
            .expect("rolled back");
        assert_eq!(again.doc["name"], "Lan ", "{}", again.doc);
        assert_eq!(rolled.doc, again.doc);
        assert_eq!(journal.images.len(), 2, "one image per run");
    }

    #[test]
    fn a_phones_unstamped_revision_is_rewritten_from_the_version_journaled() {
        // A v7 person a phone pushed without a stamp, left as the leaf (a
        // gateway crashed before writing its stamped translation): the
        // gateway journaled it at v7 before storing it.
        let set = Project::load(None, Some(&rewind_testkit::cht_migrations()))
            .expect("examples/cht loads")
            .migrations;
        let stamp = set.stamp_field().to_owned();
        let mut leaf = rewind_sample::docs(40, 7)
            .find(|d| d["type"] == "person")
            .expect("a person");
        let mut scratch = Journal::default();
        set.translate(&mut leaf, 0, 7, &mut JournalComplements(&mut scratch))
            .unwrap();
        assert_eq!(leaf["type"], "contact");
        leaf.as_object_mut().unwrap().shift_remove(&stamp);
        leaf["_rev"] = Value::from("1-aaaa");
        let mut journal = Journal::default();
        journal.push_image(Image {
            from: 7,
            to: 7,
            rev: "1-aaaa".into(),
            after: String::new(),
            body: body_text(&leaf),
            run: None,
            before: None,
            kept: None,
        });
        // An upgrade from 0 to 7 applies none of its steps again.
        let up = sample_run(Kind::Upgrade, 0, 7);
        let rewritten = rewrite(&set, Kind::Upgrade, &up, leaf.clone(), &mut journal.clone());
        assert!(rewritten.unwrap().is_none(), "upgraded twice");
        // A rollback to 0 translates it down to the v0 shape.
        let down = sample_run(Kind::Rollback, 7, 0);
        let rolled = rewrite(&set, Kind::Rollback, &down, leaf, &mut journal)
            .unwrap()
            .expect("rolled back");
        assert_eq!(rolled.doc["type"], "person", "{}", rolled.doc);
        assert!(rolled.doc.get(&stamp).is_none(), "{}", rolled.doc);
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
            let (expected, sequential) =
                rewrite_one_by_one(&set, kind, &run, leaves.clone(), &mut HashMap::new());
            let (got, parallel) =
                rewrite_all_values(&set, kind, &run, leaves.clone(), &HashMap::new());
            // As text: the same documents and journals, serialized as the
            // store would.
            let batch =
                rewrite_all(&set, kind, &run, leaves.clone(), HashMap::new(), true).unwrap();
            let text_of = |doc: NewDoc| match doc {
                NewDoc::Text(text) => text,
                NewDoc::Value(doc) => panic!("not as text: {doc}"),
            };
            let mut texts = Vec::new();
            for rewritten in batch.docs {
                let text = text_of(rewritten.doc);
                assert_eq!(rewritten.bytes, text.json_len());
                texts.push(text);
            }
            texts.extend(batch.journals.into_iter().map(text_of));
            let mut journal_values: Vec<(String, Value)> = parallel
                .iter()
                .map(|(id, journal)| {
                    let mut doc = serde_json::to_value(journal).unwrap();
                    doc["_id"] = Value::from(journal_id(id));
                    (journal_id(id), doc)
                })
                .collect();
            journal_values.sort_by(|a, b| a.0.cmp(&b.0));
            let expected_texts: Vec<TextDoc> = got
                .iter()
                .map(|(_, doc, _)| doc)
                .chain(journal_values.iter().map(|(_, doc)| doc))
                .map(|doc| TextDoc::from_doc(doc).expect("plain"))
                .collect();
            assert_eq!(texts, expected_texts);
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
                .0
                .into_iter()
                .map(|(_, doc, _)| doc)
                .collect();
        let down = sample_run(Kind::Rollback, 7, 0);
        let (got, parallel) =
            rewrite_all_values(&set, Kind::Rollback, &down, upgraded.clone(), &journals);
        let (expected, sequential) =
            rewrite_one_by_one(&set, Kind::Rollback, &down, upgraded, &mut journals);
        assert!(
            got.iter().all(|(_, _, restored)| *restored),
            "before-images restored"
        );
        assert_eq!(got.len(), expected.len());
        assert_eq!(parallel, sequential, "journals after the rollback");
    }
}
