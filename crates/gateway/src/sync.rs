//! The replication traffic of one database at one client version: pull
//! (changes, documents) presented through version views, and push (revisions
//! a client sends) stored with their translation to the server's version.

pub(crate) use crate::view::is_deleted;
use crate::view::{self, Presented};
use crate::GatewayError;
use rewind_engine::journal::{
    body_hash, body_of, journal_id, journaled_id, stamp_unstamped, stored_version, Image, Journal,
    JournalComplements,
};
use rewind_engine::state::{Database, State};
use rewind_lens::MigrationSet;
use rewind_store::{
    AllDocsOptions, BulkGetItem, BulkGetOptions, BulkGetRequest, ChangeRev, Changes,
    ChangesOptions, GetOptions, GetResult, OpenRev, OpenRevs, Store, StoreError,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One database as seen by a client at version `k`.
pub struct Session<'a> {
    /// The database and its companion.
    pub db: &'a Database,
    /// The migrations.
    pub set: &'a MigrationSet,
    /// The migration set's checksum.
    pub checksum: &'a str,
    /// The client's version.
    pub k: u32,
    /// The client chose its version (`/v/{k}/{db}` or the version header)
    /// rather than following the version `/{db}` serves: presentations are
    /// in the pinned context (`view::contexts`).
    pub pinned: bool,
    /// The device epochs of the client, when it names itself and has one
    /// (a move down, or from `/{db}` to a version: `crate::device`), oldest
    /// first; else empty.
    pub device: &'a [String],
    /// The database's state (version, run in progress).
    pub state: &'a State,
    /// Presentations already computed (a pure function of their key).
    pub cache: &'a PresentCache,
}

/// Presentations by (database, document, leaf revision, journal revision,
/// version): each a pure function of its key, so caching them changes no
/// answer, only how fast it comes. What a changes page presents is asked
/// for by the `_bulk_get` that follows it, seconds later: two generations
/// of at most `PresentCache::GENERATION` entries each keep the recent
/// ones and bound the memory (a presentation holds a few documents).
///
/// Besides, the revisions presented in the last minutes are remembered on
/// their own, by a digest of their [`Session::revision_key`], many more
/// than the presentations (a few dozen bytes each): a phone's first push
/// after a pull offers back every revision it pulled, and a pull of
/// 100,000 documents outgrows the presentations kept (its first push read
/// and presented again all but the last 20,000 documents: 42 s against
/// 10 s pushing straight to pouchdb-server; 12.6 s with the digests).
#[derive(Default)]
pub struct PresentCache {
    entries: std::sync::Mutex<CacheGenerations>,
    revisions: std::sync::Mutex<RecentRevisions>,
}

/// Digests of revision keys presented recently: two generations, each
/// turned over when it holds [`RecentRevisions::GENERATION`] or is older
/// than [`RecentRevisions::AGE`], so a revision is remembered for one to
/// two of those ages (as if a push offering it came that much earlier).
#[derive(Default)]
struct RecentRevisions {
    new: std::collections::HashSet<u128>,
    old: std::collections::HashSet<u128>,
    started: Option<std::time::Instant>,
}

impl RecentRevisions {
    const GENERATION: usize = 250_000;
    const AGE: std::time::Duration = std::time::Duration::from_secs(120);

    fn digest(revision_key: &str) -> u128 {
        u128::from_le_bytes(md5::compute(revision_key).0)
    }

    fn insert(&mut self, revision_key: &str) {
        let now = std::time::Instant::now();
        let started = *self.started.get_or_insert(now);
        if self.new.len() >= Self::GENERATION || now.duration_since(started) > Self::AGE {
            self.old = std::mem::take(&mut self.new);
            self.started = Some(now);
        }
        self.new.insert(Self::digest(revision_key));
    }

    fn contains(&self, revision_key: &str) -> bool {
        let digest = Self::digest(revision_key);
        self.new.contains(&digest) || self.old.contains(&digest)
    }
}

/// The current generation, and the one before it.
#[derive(Default)]
struct CacheGenerations {
    new: Generation,
    old: Generation,
}

/// Presentations by key (with the [`Session::revision_key`]s of the
/// revisions each presents), which keys a leaf has without its journal's
/// revision (see [`PresentKey`]), and the key that presented each revision.
#[derive(Default)]
struct Generation {
    presented: HashMap<String, CacheEntry>,
    leaves: std::collections::HashSet<String>,
    revisions: HashMap<String, PresentKey>,
}

/// A leaf's presentations, and the keys of the revisions they present.
struct CacheEntry {
    presented: Vec<Presented>,
    revision_keys: Vec<String>,
}

/// A [`PresentCache`] key: the leaf's part, and the journal's revision.
#[derive(Clone)]
struct PresentKey {
    leaf: String,
    journal_rev: String,
}

impl PresentKey {
    fn full(&self) -> String {
        format!("{}\n{}", self.leaf, self.journal_rev)
    }
}

impl PresentCache {
    const GENERATION: usize = 10_000;

    /// The presentations held for `key`. One found in the old generation
    /// moves to the new one while that has room (another phone's changes
    /// feed asks for the same document: what is used by many stays); a
    /// full new generation is not turned over by a read, which would drop
    /// the old one, entries about to be read included.
    fn get(&self, key: &PresentKey) -> Option<Vec<Presented>> {
        let mut cache = self.entries.lock().ok()?;
        cache.get(key, true)
    }

    /// The presentations that presented a revision, by its
    /// [`Session::revision_key`] (as [`PresentCache::get`] finds them, but
    /// moving nothing: a phone's `_bulk_get` and first push ask once for
    /// what its changes feed was presented, and moving those entries, up to
    /// ten pages of them when a generation turns over while the phone's
    /// batches wait, turned the cache over early).
    fn get_revision(&self, revision_key: &str) -> Option<Vec<Presented>> {
        let mut cache = self.entries.lock().ok()?;
        let key = cache
            .new
            .revisions
            .get(revision_key)
            .or_else(|| cache.old.revisions.get(revision_key))?
            .clone();
        cache.get(&key, false)
    }

    /// True when the revision of `revision_key` (a
    /// [`Session::revision_key`]) was presented in the last minutes.
    fn presented_recently(&self, revision_key: &str) -> bool {
        self.revisions
            .lock()
            .is_ok_and(|recent| recent.contains(revision_key))
    }

    /// Forgets which revisions were presented lately.
    pub fn forget_recent_revisions(&self) {
        if let Ok(mut recent) = self.revisions.lock() {
            *recent = RecentRevisions::default();
        }
    }

    /// True when presentations of the leaf `leaf_part` (a
    /// [`PresentKey::leaf`]) are held for some journal revision.
    fn holds_leaf(&self, leaf_part: &str) -> bool {
        self.entries
            .lock()
            .is_ok_and(|c| c.new.leaves.contains(leaf_part) || c.old.leaves.contains(leaf_part))
    }

    /// Holds `value` under `key`, and under each of `revision_keys` (the
    /// [`Session::revision_key`] of each revision it presents).
    fn put(&self, key: &PresentKey, value: Vec<Presented>, revision_keys: Vec<String>) {
        if let Ok(mut recent) = self.revisions.lock() {
            for revision in &revision_keys {
                recent.insert(revision);
            }
        }
        if let Ok(mut cache) = self.entries.lock() {
            cache.insert(
                key,
                CacheEntry {
                    presented: value,
                    revision_keys,
                },
            );
        }
    }
}

impl CacheGenerations {
    /// See [`PresentCache::get`]; `promote`: an entry found in the old
    /// generation moves to the new one, revisions and all, while that has
    /// room.
    fn get(&mut self, key: &PresentKey, promote: bool) -> Option<Vec<Presented>> {
        let full = key.full();
        if let Some(found) = self.new.presented.get(&full) {
            return Some(found.presented.clone());
        }
        if !promote || self.new.presented.len() >= PresentCache::GENERATION {
            return self.old.presented.get(&full).map(|e| e.presented.clone());
        }
        let found = self.old.presented.remove(&full)?;
        let presented = found.presented.clone();
        self.insert(key, found);
        Some(presented)
    }

    /// Adds to the new generation, with its revisions; a full one becomes
    /// the old generation (the old one is dropped).
    fn insert(&mut self, key: &PresentKey, entry: CacheEntry) {
        if self.new.presented.len() >= PresentCache::GENERATION {
            self.old = std::mem::take(&mut self.new);
        }
        for revision in &entry.revision_keys {
            self.new.revisions.insert(revision.clone(), key.clone());
        }
        self.new.presented.insert(key.full(), entry);
        self.new.leaves.insert(key.leaf.clone());
    }
}

/// How far back a pushed revision's history is searched for the stored
/// revision its author's view was made from, besides the rungs of a
/// ladder (one per version at most: [`base_search`]).
const BASE_SEARCH: usize = 10;

/// [`BASE_SEARCH`] and the most rungs a ladder of `set` can have.
fn base_search(set: &MigrationSet) -> usize {
    BASE_SEARCH + set.latest() as usize + 1
}

/// The ancestors of `leaf` that may have views to retire: the nearest
/// [`base_search`] revisions of its history. Of these, `view::present`
/// counts the first [`view::ANCESTORS`] stored ones below the leaf's
/// anchor (a history also names synthetic revisions, which the server
/// never stored). A revision pushed and translated at once is one: a pull
/// between the gateway's two writes presented it as a leaf.
fn ancestor_candidates(set: &MigrationSet, leaf: &Value) -> Vec<String> {
    view::history(leaf)
        .into_iter()
        .skip(1)
        .take(base_search(set))
        .collect()
}

fn id_of(doc: &Value) -> String {
    doc.get("_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// The revisions of the rows of an `_all_docs` answer that name a
/// document not deleted, by id.
fn live_revs(rows: Vec<rewind_store::AllDocsRow>) -> HashMap<String, String> {
    rows.into_iter()
        .filter_map(|row| {
            let value = row.value.filter(|v| !v.deleted)?;
            Some((row.id?, value.rev))
        })
        .collect()
}

/// Removes from a `_revs_diff` answer the revisions `presented_of` presents
/// (and the documents left with none missing).
fn drop_presented(
    missing: &mut BTreeMap<String, rewind_store::RevsDiffEntry>,
    presented_of: &HashMap<String, Vec<Presented>>,
) {
    missing.retain(|id, entry| {
        if let Some(presented) = presented_of.get(id) {
            entry
                .missing
                .retain(|rev| !presented.iter().any(|p| p.rev == *rev));
        }
        !entry.missing.is_empty()
    });
}

/// `ids` sorted, each once (a `_bulk_get` names a document once per revision).
fn unique(ids: &[String]) -> Vec<String> {
    let mut out = ids.to_vec();
    out.sort();
    out.dedup();
    out
}

/// Appends the entries of `more` that `list` lacks (a journal's lists are
/// sets kept in arrival order).
fn add_missing<T: PartialEq>(list: &mut Vec<T>, more: Vec<T>) {
    for rev in more {
        if !list.contains(&rev) {
            list.push(rev);
        }
    }
}

/// Presented revisions grouped by document id, in their order.
fn by_id(presented: Vec<Presented>) -> HashMap<String, Vec<Presented>> {
    let mut out: HashMap<String, Vec<Presented>> = HashMap::new();
    for p in presented {
        out.entry(id_of(&p.doc)).or_default().push(p);
    }
    out
}

impl Session<'_> {
    /// The version stored documents are being brought to: the target of
    /// the run in progress, else the database's version.
    pub fn storage_version(&self) -> u32 {
        self.state
            .run
            .as_ref()
            .map(|r| r.to)
            .unwrap_or(self.state.version)
    }

    /// True when a document with no journal passes through unchanged: the
    /// client is at the storage version and no run is rewriting documents.
    /// (A journaled document may have a system-written history that views
    /// see through, so it is always presented.)
    pub fn plain(&self) -> bool {
        self.state.run.is_none() && self.k == self.state.version
    }

    /// The journals of `ids`, in one `_bulk_get` of the companion (the
    /// replication read, which servers serve best: pouchdb-server answered
    /// `_all_docs` by keys with its documents in 2.3× the CPU, one index
    /// scan per key).
    pub async fn journals(&self, ids: &[String]) -> Result<HashMap<String, Journal>, GatewayError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let wanted = ids
            .iter()
            .map(|id| BulkGetRequest::new(journal_id(id), None))
            .collect();
        let opts = BulkGetOptions::default();
        let mut out = HashMap::new();
        for result in self.db.state.bulk_get(wanted, opts).await? {
            for item in result.docs {
                if let BulkGetItem::Ok(doc) = item {
                    if let Ok(journal) = serde_json::from_value::<Journal>(doc) {
                        out.insert(journaled_id(&result.id).to_owned(), journal);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The key of a leaf's presentations in [`PresentCache`]: everything
    /// they are a function of.
    fn present_key(
        &self,
        epochs: &[String],
        id: &str,
        leaf_rev: &str,
        journal_rev: &str,
    ) -> PresentKey {
        PresentKey {
            leaf: self.revision_key(epochs, id, leaf_rev),
            journal_rev: journal_rev.to_owned(),
        }
    }

    /// A revision of a document in the context this session presents in
    /// (database, version, pinned or not, epoch, device epoch): the leaf
    /// part of a [`PresentKey`] for a stored leaf's revision, and the key of a
    /// presented revision in [`PresentCache`] (a presented revision id
    /// denotes one body, and one history in one context).
    fn revision_key(&self, epochs: &[String], id: &str, rev: &str) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{id}\n{rev}",
            self.db.name,
            self.k,
            self.pinned,
            epochs.last().map(String::as_str).unwrap_or(""),
            // (Epochs are only appended, each under a fresh name: the last
            // names the list.)
            self.device.last().map(String::as_str).unwrap_or("")
        )
    }

    /// For each asked `(id, revision)`, the presentations that presented
    /// that revision, when [`PresentCache`] holds them: what a `_bulk_get`
    /// after a changes feed asks for, answered without reading anything.
    /// A revision id denotes one body, so the answer is the one the feed's
    /// moment would have had; a leaf written since (which `latest` would
    /// give) comes with the next changes page, as if the request had come
    /// a moment earlier.
    pub fn cached_revisions(
        &self,
        asked: &[(&str, Option<&str>)],
    ) -> HashMap<String, Vec<Presented>> {
        let epochs = view::epochs(self.state);
        let mut out = HashMap::new();
        for (id, rev) in asked {
            let Some(rev) = rev else { continue };
            if let Some(presented) = self
                .cache
                .get_revision(&self.revision_key(&epochs, id, rev))
            {
                out.insert((*id).to_owned(), presented);
            }
        }
        out
    }

    /// The rows `_all_docs` answers for `opts`.
    async fn winner_rows(
        &self,
        opts: &AllDocsOptions,
    ) -> Result<Vec<rewind_store::AllDocsRow>, GatewayError> {
        Ok(self.db.data.all_docs(opts).await?.rows)
    }

    /// The revisions of the journals of `ids` (by document id; none for a
    /// document without one), without their bodies: one light read.
    async fn journal_revs(&self, ids: &[String]) -> Result<HashMap<String, String>, GatewayError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let opts = AllDocsOptions {
            keys: Some(ids.iter().map(|id| journal_id(id)).collect()),
            ..AllDocsOptions::default()
        };
        Ok(live_revs(self.db.state.all_docs(&opts).await?.rows)
            .into_iter()
            .map(|(key, rev)| (journaled_id(&key).to_owned(), rev))
            .collect())
    }

    /// The presentations [`PresentCache`] holds for every leaf of a
    /// document (`leaf_revs`, deleted ones included), combined as
    /// [`Session::present_all`] combines them (leaves in `sort_leaves`
    /// order, each revision once); `None` unless every leaf's are held.
    fn cached_presentations(
        &self,
        epochs: &[String],
        id: &str,
        leaf_revs: &[String],
        journal_rev: &str,
    ) -> Option<Vec<Presented>> {
        let mut found = Vec::with_capacity(leaf_revs.len());
        for rev in leaf_revs {
            let presented = self
                .cache
                .get(&self.present_key(epochs, id, rev, journal_rev))?;
            // A deleted leaf is presented as itself, first.
            let deleted = presented
                .first()
                .is_some_and(|p| p.rev == *rev && is_deleted(&p.doc));
            found.push((leaf_order(rev, deleted), presented));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (_, presented) in found {
            for p in presented {
                if seen.insert(p.rev.clone()) {
                    out.push(p);
                }
            }
        }
        Some(out)
    }

    /// The presentations [`PresentCache`] holds for the winning leaf of
    /// each of `ids`, where that leaf is still the winner and its journal
    /// unchanged: two reads without bodies (the winners' and the journals'
    /// revisions). A document whose winner is deleted, or whose
    /// presentations are not cached, is left out. What a `_bulk_get` after
    /// a changes feed this gateway answered asks for is found here.
    pub async fn cached_winners(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<Presented>>, GatewayError> {
        let mut out = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let ids = unique(ids);
        let opts = AllDocsOptions {
            keys: Some(ids.clone()),
            ..AllDocsOptions::default()
        };
        // Winners, then journals (see `present_by_id`).
        let winners = self.winner_rows(&opts).await?;
        let journal_revs = self.journal_revs(&ids).await?;
        let epochs = view::epochs(self.state);
        for (id, rev) in live_revs(winners) {
            let journal_rev = journal_revs
                .get(&id)
                .map(String::as_str)
                .unwrap_or_default();
            if let Some(presented) =
                self.cache
                    .get(&self.present_key(&epochs, &id, &rev, journal_rev))
            {
                out.insert(id, presented);
            }
        }
        Ok(out)
    }

    /// Presents stored leaves (with `_revisions`) at the client's version:
    /// for each, what `view::present` gives (live views and retirements);
    /// deleted leaves as they are.
    pub async fn present_all(&self, leaves: &[Value]) -> Result<Vec<Presented>, GatewayError> {
        let ids: Vec<String> = leaves.iter().map(id_of).collect();
        let journals = self.journals(&unique(&ids)).await?;
        self.present_with(leaves, &journals).await
    }

    /// [`Session::present_all`] with the documents' journals already read
    /// (a document missing from `journals` has none).
    async fn present_with(
        &self,
        leaves: &[Value],
        journals: &HashMap<String, Journal>,
    ) -> Result<Vec<Presented>, GatewayError> {
        let empty = Journal::default();
        let epochs = view::epochs(self.state);
        let key = |leaf: &Value| {
            let id = id_of(leaf);
            let journal_rev = journals
                .get(&id)
                .and_then(|j| j.rev.as_deref())
                .unwrap_or_default();
            let rev = leaf.get("_rev").and_then(Value::as_str).unwrap_or("");
            self.present_key(&epochs, &id, rev, journal_rev)
        };
        // Each leaf's cache key and what the cache holds for it, once.
        let keys: Vec<PresentKey> = leaves.iter().map(key).collect();
        let cached: Vec<Option<Vec<Presented>>> = keys.iter().map(|k| self.cache.get(k)).collect();
        // The bodies of each live leaf's parent and grandparent: from the
        // journal's before-images, else from the store.
        let mut ancestors: HashMap<(String, String), Value> = HashMap::new();
        let mut wanted = Vec::new();
        for (leaf, _) in leaves.iter().zip(&cached).filter(|(_, c)| c.is_none()) {
            let id = id_of(leaf);
            let journal = journals.get(&id).unwrap_or(&empty);
            for rev in ancestor_candidates(self.set, leaf) {
                // A revision a rollback replaced by its before-image is
                // journaled by hash only: it was presented on the revision
                // below (its views are that one's), so it is not read.
                match journal.images.iter().find(|i| i.rev == rev) {
                    Some(image) => {
                        if let Some(body) = image.body_before() {
                            ancestors.insert((id.clone(), rev), body);
                        }
                    }
                    None => wanted.push(BulkGetRequest::new(id.clone(), Some(&rev))),
                }
            }
        }
        if !wanted.is_empty() {
            let got = self
                .db
                .data
                .bulk_get(wanted, BulkGetOptions::default())
                .await?;
            for result in got {
                for item in result.docs {
                    if let BulkGetItem::Ok(doc) = item {
                        if let Some(rev) = doc.get("_rev").and_then(Value::as_str) {
                            ancestors.insert((result.id.clone(), rev.to_owned()), body_of(&doc));
                        }
                    }
                }
            }
        }
        let present = |leaf: &Value| -> Result<Vec<Presented>, GatewayError> {
            let id = id_of(leaf);
            let journal = journals.get(&id).unwrap_or(&empty);
            let known: Vec<(String, Value)> = ancestor_candidates(self.set, leaf)
                .into_iter()
                .filter_map(|rev| {
                    ancestors
                        .get(&(id.clone(), rev.clone()))
                        .map(|b| (rev, b.clone()))
                })
                .collect();
            let contexts = view::contexts(&epochs, journal, self.pinned, self.device);
            let cx = view::Context {
                set: self.set,
                checksum: self.checksum,
                journal,
                contexts: &contexts,
            };
            view::present(&cx, leaf, self.k, &known).map_err(|e| GatewayError::Lens(id, e))
        };
        let mut out = Vec::new();
        let mut seen: std::collections::HashSet<(String, String)> = Default::default();
        for ((leaf, key), cached) in leaves.iter().zip(&keys).zip(cached) {
            let id = id_of(leaf);
            let presented = match cached {
                Some(presented) => presented,
                None => {
                    let presented = present(leaf)?;
                    let revisions = presented
                        .iter()
                        .map(|p| self.revision_key(&epochs, &id, &p.rev))
                        .collect();
                    self.cache.put(key, presented.clone(), revisions);
                    presented
                }
            };
            for p in presented {
                if seen.insert((id.clone(), p.rev.clone())) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    /// Every leaf of a document, with `_revisions` (deleted ones included).
    pub async fn leaves(&self, id: &str) -> Result<Vec<Value>, GatewayError> {
        let opts = GetOptions {
            open_revs: Some(OpenRevs::All),
            revs: true,
            ..GetOptions::default()
        };
        match self.db.data.get(id, &opts).await {
            Ok(GetResult::Revs(revs)) => {
                let mut leaves: Vec<Value> = revs
                    .into_iter()
                    .filter_map(|r| match r {
                        OpenRev::Ok(doc) => Some(doc),
                        OpenRev::Missing(_) => None,
                    })
                    .collect();
                sort_leaves(&mut leaves);
                Ok(leaves)
            }
            Ok(GetResult::Doc(doc)) => Ok(vec![doc]),
            Err(StoreError::NotFound { .. }) => Ok(vec![]),
            Err(e) => Err(e.into()),
        }
    }

    /// A normal changes feed, with each leaf's presented revisions.
    pub async fn changes(&self, opts: &ChangesOptions) -> Result<Changes, GatewayError> {
        self.changes_then(opts, |_| {}).await
    }

    /// [`Session::changes`], calling `read` with the store's page as soon as
    /// it is read, before its documents are presented (its `last_seq` is
    /// where the next page starts: `ahead` starts reading it then).
    pub async fn changes_then(
        &self,
        opts: &ChangesOptions,
        read: impl FnOnce(&Changes),
    ) -> Result<Changes, GatewayError> {
        let changes = self.store_page(opts).await?;
        read(&changes);
        self.present_rows(opts, changes).await
    }

    /// [`Session::changes`] of the documents whose id `keep` accepts: the
    /// store's page is read whole (`last_seq` is its end) and only those
    /// rows are presented. Returns the page and how many rows the store
    /// listed (a full page means more may follow).
    pub async fn changes_of(
        &self,
        opts: &ChangesOptions,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(Changes, usize), GatewayError> {
        let mut changes = self.store_page(opts).await?;
        let listed = changes.results.len();
        changes.results.retain(|row| keep(&row.id));
        Ok((self.present_rows(opts, changes).await?, listed))
    }

    /// The store's page of the feed `opts` asks for, before presenting:
    /// every leaf of each listed document (deleted ones included), so that
    /// they are read in one request, not listed per document; no bodies.
    async fn store_page(&self, opts: &ChangesOptions) -> Result<Changes, GatewayError> {
        let mut inner = opts.clone();
        inner.include_docs = false;
        inner.style_all_docs = true;
        Ok(self.db.data.changes(&inner).await?)
    }

    /// The store's `changes` rows (every leaf listed) presented to the
    /// client as `opts` asks.
    async fn present_rows(
        &self,
        opts: &ChangesOptions,
        mut changes: Changes,
    ) -> Result<Changes, GatewayError> {
        // Documents whose every leaf's presentations the cache holds (another
        // phone pulled them just now) are answered from it once their
        // journals' revisions (one light read) match; the others are read.
        let epochs = view::epochs(self.state);
        let held: Vec<bool> = changes
            .results
            .iter()
            .map(|row| {
                row.changes.iter().all(|c| {
                    let key = self.present_key(&epochs, &row.id, &c.rev, "");
                    self.cache.holds_leaf(&key.leaf)
                })
            })
            .collect();
        let maybe: Vec<String> = changes
            .results
            .iter()
            .zip(&held)
            .filter(|(_, held)| **held)
            .map(|(row, _)| row.id.clone())
            .collect();
        let journal_revs = self.journal_revs(&maybe).await?;
        let mut by_id = HashMap::new();
        let mut wanted = Vec::new();
        let mut uncached = Vec::new();
        for (row, held) in changes.results.iter().zip(held) {
            let revs: Vec<String> = row.changes.iter().map(|c| c.rev.clone()).collect();
            let journal_rev = journal_revs
                .get(&row.id)
                .map(String::as_str)
                .unwrap_or_default();
            let cached = held
                .then(|| self.cached_presentations(&epochs, &row.id, &revs, journal_rev))
                .flatten();
            match cached {
                Some(presented) => {
                    by_id.insert(row.id.clone(), presented);
                }
                None => {
                    wanted.extend(
                        revs.iter()
                            .map(|rev| BulkGetRequest::new(row.id.clone(), Some(rev))),
                    );
                    uncached.push(row.id.clone());
                }
            }
        }
        if !uncached.is_empty() {
            by_id.extend(
                self.present_by_id(self.read_leaves(wanted), &uncached)
                    .await?,
            );
        }
        for row in &mut changes.results {
            let Some(ps) = by_id.get_mut(&row.id) else {
                continue;
            };
            // The winner first, as CouchDB lists it.
            if let Some(w) = winner(ps).map(|w| w.rev.clone()) {
                ps.sort_by_key(|p| p.rev != w);
            }
            row.changes = ps
                .iter()
                .map(|p| ChangeRev { rev: p.rev.clone() })
                .collect();
            row.deleted = ps.first().is_some_and(|p| is_deleted(&p.doc));
            if opts.include_docs {
                row.doc = ps.first().map(|p| strip_revisions(Value::clone(&p.doc)));
            }
            if !opts.style_all_docs {
                row.changes.truncate(1);
            }
        }
        Ok(changes)
    }

    /// The stored revisions `wanted` names, with `_revisions`, by document
    /// (each document's leaves sorted as [`Session::leaves`] sorts them), in
    /// one request; revisions the store lacks are left out.
    async fn read_leaves(
        &self,
        wanted: Vec<BulkGetRequest>,
    ) -> Result<BTreeMap<String, Vec<Value>>, GatewayError> {
        let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        if wanted.is_empty() {
            return Ok(out);
        }
        let opts = BulkGetOptions {
            revs: true,
            latest: false,
            attachments: false,
        };
        for result in self.db.data.bulk_get(wanted, opts).await? {
            let leaves = out.entry(result.id.clone()).or_default();
            for item in result.docs {
                if let BulkGetItem::Ok(doc) = item {
                    leaves.push(doc);
                }
            }
        }
        for leaves in out.values_mut() {
            sort_leaves(leaves);
        }
        Ok(out)
    }

    /// Every leaf of each of `ids` (as [`Session::leaves`]), a few documents
    /// at a time: one round trip per document is what a remote store costs.
    pub async fn leaves_of(
        &self,
        ids: &[String],
    ) -> Result<BTreeMap<String, Vec<Value>>, GatewayError> {
        /// Requests to the store in flight at once for one client request.
        const IN_FLIGHT: usize = 8;
        let mut out = BTreeMap::new();
        for chunk in unique(ids).chunks(IN_FLIGHT) {
            // (A plain loop: a closure here trips the spawned task's `Send`
            // inference.)
            let mut reads = Vec::with_capacity(chunk.len());
            for id in chunk {
                reads.push(self.leaves(id));
            }
            for (id, leaves) in chunk
                .iter()
                .zip(futures_util::future::join_all(reads).await)
            {
                out.insert(id.clone(), leaves?);
            }
        }
        Ok(out)
    }

    /// The live leaves of each of `ids` (a deleted document's winner when it
    /// has none): over CouchDB in two requests for the whole batch, deleted
    /// leaves beside a live one left out; on the embedded store every leaf
    /// (as [`Session::leaves_of`]).
    pub async fn live_leaves_of(
        &self,
        ids: &[String],
    ) -> Result<BTreeMap<String, Vec<Value>>, GatewayError> {
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let ids = unique(ids);
        let Some(revs) = self.db.data.live_leaf_revs(&ids).await? else {
            return self.leaves_of(&ids).await;
        };
        let wanted: Vec<BulkGetRequest> = revs
            .iter()
            .flat_map(|(id, revs)| {
                revs.iter()
                    .map(|rev| BulkGetRequest::new(id.clone(), Some(rev)))
            })
            .collect();
        let mut out = self.read_leaves(wanted).await?;
        for id in ids {
            out.entry(id).or_default();
        }
        Ok(out)
    }

    /// The presented leaves of a document.
    pub async fn presented_leaves(&self, id: &str) -> Result<Vec<Presented>, GatewayError> {
        let leaves = self.leaves(id).await?;
        self.present_all(&leaves).await
    }

    /// The presented leaves of each of `ids`: every document's leaves read
    /// (deleted ones included) and presented in one batch (one journal read,
    /// one ancestor read).
    pub async fn presented_of(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<Presented>>, GatewayError> {
        self.present_by_id(self.leaves_of(ids), ids).await
    }

    /// As [`Session::presented_of`] for the live leaves only
    /// ([`Session::live_leaves_of`]): what a deleted leaf beside a live one
    /// presents (itself, as stored, and retirements) may be missing, so a
    /// caller that does not find a revision asks [`Session::presented_of`].
    pub async fn presented_live_of(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<Presented>>, GatewayError> {
        self.present_by_id(self.live_leaves_of(ids), ids).await
    }

    /// Documents' leaves (by id, as `reading` reads them) presented in one
    /// batch, by id; the journals of `ids` are read meanwhile.
    async fn present_by_id(
        &self,
        reading: impl std::future::Future<Output = Result<BTreeMap<String, Vec<Value>>, GatewayError>>,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<Presented>>, GatewayError> {
        // The leaves first, then their journals: a run writes a document's
        // journal before the document, so a journal read after the leaf
        // describes it (it may also describe a write about to come, as after
        // a crash between the two). Read the other way round, or at once, a
        // leaf a run just wrote could meet the journal from before: the
        // run's revision would look like a human edit, and its presentation
        // would retire the ladder phones hold.
        let leaves = reading.await?;
        let journals = self.journals(&unique(ids)).await?;
        let leaves: Vec<Value> = leaves.into_values().flatten().collect();
        Ok(by_id(self.present_with(&leaves, &journals).await?))
    }

    /// A document at a presented revision (or its winner), as `_bulk_get`
    /// and `GET /{db}/{id}` answer. `None` when there is no such revision.
    pub async fn get(&self, id: &str, rev: Option<&str>) -> Result<Option<Value>, GatewayError> {
        let presented = self.presented_leaves(id).await?;
        Ok(self
            .pick(id, &presented, rev)
            .await?
            .map(Arc::unwrap_or_clone))
    }

    /// From a document's presented leaves, the one at `rev` (or the
    /// winner), shared with the presentation (no copy); else an older
    /// stored revision asked for by id, as stored.
    pub async fn pick(
        &self,
        id: &str,
        presented: &[Presented],
        rev: Option<&str>,
    ) -> Result<Option<Arc<Value>>, GatewayError> {
        let found = match rev {
            Some(rev) => presented.iter().find(|p| p.rev == rev),
            None => winner(presented),
        };
        if let Some(p) = found {
            return Ok(Some(p.doc.clone()));
        }
        if let Some(rev) = rev {
            let opts = GetOptions {
                rev: Some(rev.to_owned()),
                revs: true,
                ..GetOptions::default()
            };
            if let Ok(found) = self.db.data.get(id, &opts).await {
                return Ok(found.into_doc().map(Arc::new));
            }
        }
        Ok(None)
    }

    /// `_revs_diff`: what the server lacks, knowing that revisions it
    /// presented (synthetic ones included) are not missing.
    pub async fn revs_diff(
        &self,
        asked: BTreeMap<String, Vec<String>>,
    ) -> Result<BTreeMap<String, rewind_store::RevsDiffEntry>, GatewayError> {
        let mut missing = self.db.data.revs_diff(asked).await?;
        // Retirements are never stored from a phone (`push` skips them).
        missing.retain(|_, entry| {
            entry.missing.retain(|rev| !view::is_retirement_rev(rev));
            !entry.missing.is_empty()
        });
        // Presented revisions are not missing. First those the cache knows
        // it presented in this context (no read: a phone's first push offers
        // back every revision it pulled, and a revision presented once stays
        // in the presented tree, retired or not): presented in the last
        // minutes, or presented by what it still holds. Then the views of
        // the documents' winners, read with their journals in two
        // `_bulk_get` (the presentations come from the cache when it holds
        // them).
        let epochs = view::epochs(self.state);
        missing.retain(|id, entry| {
            entry.missing.retain(|rev| {
                !self
                    .cache
                    .presented_recently(&self.revision_key(&epochs, id, rev))
            });
            !entry.missing.is_empty()
        });
        let offered: Vec<(&str, Option<&str>)> = missing
            .iter()
            .flat_map(|(id, entry)| {
                entry
                    .missing
                    .iter()
                    .map(move |rev| (id.as_str(), Some(rev.as_str())))
            })
            .collect();
        let cached = self.cached_revisions(&offered);
        drop_presented(&mut missing, &cached);
        let ids: Vec<String> = missing.keys().cloned().collect();
        let winners = ids
            .iter()
            .map(|id| BulkGetRequest::new(id.clone(), None))
            .collect();
        drop_presented(
            &mut missing,
            &self.present_by_id(self.read_leaves(winners), &ids).await?,
        );
        // Then the others' live leaves: a deleted leaf presents itself
        // (stored, so not missing) and retirements (never missing).
        let ids: Vec<String> = missing.keys().cloned().collect();
        drop_presented(&mut missing, &self.presented_live_of(&ids).await?);
        // The store's `possible_ancestors` are stored revisions, which a
        // client at another version was never given (a translation, a
        // migration): named to it, they would be ids it cannot resolve.
        for entry in missing.values_mut() {
            entry.possible_ancestors.clear();
        }
        Ok(missing)
    }

    /// Stores revisions a client pushed (`new_edits=false`): each as sent,
    /// then, where its version is not the server's, its translation as a
    /// child (journaled); a system-written revision it branches from is
    /// tombstoned, so an edit always wins over a migration and no conflict
    /// appears. Synthetic revisions coming back are ignored.
    pub async fn push(&self, docs: Vec<Value>) -> Result<Vec<Value>, GatewayError> {
        // What the store would refuse outright is refused before anything
        // is written (a revision's journal is written before it).
        for doc in &docs {
            rewind_store::check_writable(doc, false)?;
        }
        let target = self.storage_version();
        // Synthetic revisions coming back: ignored while their base is the
        // anchor of a live leaf and they were presented in a context of the
        // window (the presentation retires those where needed); a stale one
        // (its base is no longer an anchor, or its context is older) is
        // retired on the server, so the next pull gives the phone that holds
        // it a tombstone for it. (Retiring a current one would end the
        // presentation's branch for every phone.) A copy the server cannot
        // place, its base or its context lost (a restore), is adopted.
        let mut docs_in = Vec::with_capacity(docs.len());
        let mut retired = Vec::new();
        let mut adopted = std::collections::HashSet::new();
        for doc in docs {
            if view::is_retirement(&doc) {
                continue;
            }
            if !is_deleted(&doc) && view::is_synthetic(&doc, self.checksum) {
                let hist = view::history(&doc);
                let id = id_of(&doc);
                // Its base: the first revision of its history below the
                // rungs of the ladder it was presented on (synthetic ids,
                // never stored).
                let rungs = hist[1..]
                    .iter()
                    .take_while(|rev| view::is_synthetic_rev(rev))
                    .count();
                let base = hist.get(1 + rungs).cloned().unwrap_or_default();
                let between = hist[1..1 + rungs].to_vec();
                let mut asked = BTreeMap::new();
                asked.insert(id.clone(), vec![base.clone()]);
                let base_known = self.db.data.revs_diff(asked).await?.is_empty();
                if !base_known {
                    // The server lost the revision this was translated from
                    // (a restore): keep the phone's copy, as adopted: it
                    // yields to any other leaf (its author's own revision),
                    // and the document's presentation moves to a context no
                    // phone retired.
                    adopted.insert(hist[0].clone());
                    docs_in.push(doc);
                    continue;
                }
                let mut journal = self
                    .journals(std::slice::from_ref(&id))
                    .await?
                    .remove(&id)
                    .unwrap_or_default();
                let context = view::copy_context(
                    &hist[0],
                    &hist[1],
                    self.checksum,
                    &doc,
                    self.state,
                    &journal,
                    self.device,
                );
                let (mut base_is_anchor, mut base_is_live) = (false, false);
                for leaf in self.leaves(&id).await?.iter().filter(|l| !is_deleted(l)) {
                    let at = view::anchor(self.set, leaf, &journal)
                        .map_err(|e| GatewayError::Lens(id.clone(), e))?;
                    let hist = view::history(leaf);
                    base_is_anchor |= hist.get(at) == Some(&base);
                    base_is_live |= hist.contains(&base);
                }
                if base_is_anchor && context == view::CopyContext::Window {
                    continue;
                }
                if !base_is_live {
                    // On a dead branch: a stored tombstone ends nothing.
                    retired.push(retire(&id, &doc));
                    continue;
                }
                // Retired by the presentation (a stored tombstone would end
                // the live branch it hangs from).
                let lost = context == view::CopyContext::Unknown;
                if journal.retired.iter().any(|c| c.rev == hist[0]) {
                    continue;
                }
                if lost && !journal.retired.iter().any(|c| c.lost) {
                    // The first copy presented in a state the server lost (a
                    // restore rolled the epochs back, and phones retired the
                    // restored epoch's views long ago): named in the
                    // journal's adoptions, the document is presented in a
                    // context no phone retired. Once per restore: the
                    // journal was restored with the database.
                    journal.adopted.push(hist[0].clone());
                }
                journal.retired.push(rewind_engine::journal::RetiredCopy {
                    rev: hist[0].clone(),
                    base: base.clone(),
                    between,
                    lost,
                });
                self.save_journal(&id, &mut journal).await?;
                continue;
            }
            docs_in.push(doc);
        }
        if !retired.is_empty() {
            self.db.data.bulk_docs(retired, false).await?;
        }
        let docs = docs_in;
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        // In rounds: round r takes the r-th revision of each document (a
        // document's revisions in order; a push names most documents
        // once), each step in one request for the round:
        // 1. the plan of each revision: its stored base, what its journal
        //    gains, its translation to the server's version;
        // 2. the journals, before the revisions: a reader (a live phone's
        //    pull, a run, a gateway after a crash here) that meets a phone's
        //    unstamped revision finds the version it was pushed at
        //    (`Journal::pushed_version`) and never reads it as version 0;
        // 3. the revisions as sent;
        // 4. the translations, and a human edit winning (`carry_out`).
        // A revision the store then refuses (a validation function on
        // CouchDB) has its journal put back as it was.
        let ids: Vec<String> = docs.iter().map(id_of).collect();
        let mut journals = self.journals(&ids).await?;
        let mut groups: Vec<(String, Vec<Value>)> = Vec::new();
        for doc in docs {
            let id = id_of(&doc);
            match groups.iter_mut().find(|(g, _)| *g == id) {
                Some((_, list)) => list.push(doc),
                None => groups.push((id, vec![doc])),
            }
        }
        let mut errors = Vec::new();
        let rounds = groups.iter().map(|(_, list)| list.len()).max().unwrap_or(0);
        for round in 0..rounds {
            let sent: Vec<Value> = groups
                .iter()
                .filter_map(|(_, list)| list.get(round).cloned())
                .collect();
            let bases = self.stored_bases(&sent).await?;
            let mut plans = Vec::new();
            for (id, list) in &groups {
                let Some(doc) = list.get(round) else {
                    continue;
                };
                let journal = journals.remove(id).unwrap_or_default();
                if let Some(plan) = self.plan_push(id, doc, journal, target, &adopted, &bases)? {
                    plans.push(plan);
                }
            }
            let changed: Vec<(&str, &mut Journal)> = plans
                .iter_mut()
                .filter(|p| p.original.is_some())
                .map(|p| (p.id.as_str(), &mut p.journal))
                .collect();
            let merged = self.save_journals(changed).await?;
            for plan in plans.iter_mut().filter(|p| merged.contains(&p.id)) {
                // Another writer's entries are in it now: never put back.
                plan.original = None;
            }
            let mut failed = std::collections::HashSet::new();
            for failure in self.db.data.bulk_docs(sent, false).await? {
                if failure.error.is_some() {
                    failed.insert(failure.id.clone());
                    errors.push(serde_json::to_value(failure).unwrap_or_default());
                }
            }
            let (mut stored, mut refused): (Vec<PushPlan>, Vec<PushPlan>) =
                plans.into_iter().partition(|p| !failed.contains(&p.id));
            self.put_back(&mut refused).await?;
            self.carry_out(&mut stored).await?;
            for plan in stored.into_iter().chain(refused) {
                journals.insert(plan.id, plan.journal);
            }
        }
        Ok(errors)
    }

    /// Step 1 of [`Session::push`] for one pushed revision, computed
    /// without I/O: what its journal gains, and its translation to the
    /// server's version (`bases`: the round's [`Session::stored_bases`]).
    /// `None` for a revision without a revision id.
    fn plan_push(
        &self,
        id: &str,
        doc: &Value,
        mut journal: Journal,
        target: u32,
        adopted: &std::collections::HashSet<String>,
        bases: &HashMap<(String, String), (usize, Value)>,
    ) -> Result<Option<PushPlan>, GatewayError> {
        let chain = view::history(doc);
        let Some(rev) = chain.first().cloned() else {
            return Ok(None);
        };
        let base = bases.get(&(id.to_owned(), rev.clone()));
        let original = journal.clone();
        let deletion = is_deleted(doc);
        // The version a pushed body is read at: its stamp; else the version
        // of what the phone edited (its parent revision tells); else the
        // client's.
        let version = if deletion {
            target
        } else if let Some(stamped) = self.set.stamp_of(doc) {
            stamped.min(self.set.latest())
        } else {
            self.edited_version(id, &chain, &journal, base)?
                .unwrap_or(self.k)
                .min(self.set.latest())
        };
        let is_adopted = adopted.contains(&rev);
        let mut changed = false;
        if is_adopted && !journal.adopted.contains(&rev) {
            journal.adopted.push(rev.clone());
            changed = true;
        }
        if deletion && !journal.deleted.contains(&rev) {
            journal.deleted.push(rev.clone());
            changed = true;
        }
        // Journaled before this revision's translation: its ancestors may
        // hold what rewind wrote.
        let journaled = !journal.is_empty();
        let mut child = None;
        // Its translation to the server's version, journaled first: a
        // crash before it is written leaves the client's revision as the
        // leaf, which views translate on the fly from the version the
        // journal names.
        let unstamped = self.set.stamp_of(doc).is_none() && version > 0;
        let translate = |doc: &mut Value, from: u32, to: u32, journal: &mut Journal| {
            self.set
                .translate(doc, from, to, &mut JournalComplements(journal))
                .map_err(|e| GatewayError::Lens(id.to_owned(), e))
        };
        // What the phone's view of the stored base dropped is what
        // translating its edit back needs: recompute that view, keeping its
        // complements. A base that was itself translated (a phone's
        // revision pushed here, or one a run replaced): the complements its
        // content's translations started from (what a translation recorded
        // serves the way back); the base's walk records what the edit's
        // then reads.
        let walk_base = |journal: &mut Journal| -> Result<(), GatewayError> {
            if let Some((index, base)) = base {
                let base_rev = &chain[*index];
                let base_version = stored_version(self.set, journal, base_rev, base);
                if version != target {
                    journal.restore_kept_of(base_rev, version, target);
                }
                journal.restore_kept_of(base_rev, base_version, version);
                let mut seen = base.clone();
                stamp_unstamped(self.set, &mut seen, base_version);
                translate(&mut seen, base_version, version, journal)?;
            }
            Ok(())
        };
        let migratable = !deletion && MigrationSet::is_migratable(doc);
        if migratable && (version != target || unstamped) {
            let mut translated = doc.clone();
            // A body with no stamp is read at the version found above.
            stamp_unstamped(self.set, &mut translated, version);
            walk_base(&mut journal)?;
            let kept_in = journal.kept_between(version.min(target), version.max(target));
            translate(&mut translated, version, target, &mut journal)?;
            if body_hash(&translated) != body_hash(doc) {
                add_missing(&mut journal.pushed, vec![rev.clone()]);
                journal.push_image(Image {
                    from: version,
                    to: target,
                    rev: rev.clone(),
                    after: body_hash(&translated),
                    body: serde_json::to_string(&body_of(doc)).unwrap_or_default(),
                    run: None,
                    before: None,
                    kept: Some(kept_in),
                });
                changed = true;
                let mut body = body_of(&translated);
                stub_attachments(&mut body);
                body["_rev"] = Value::from(rev.clone());
                child = Some(body);
            }
        } else if migratable {
            // Stored as sent, at the server's version, though it may edit a
            // view of a revision stored at another (one written after a
            // run's last read, which views translate on the fly): what that
            // view dropped is journaled, or a rollback of the edit would
            // translate it down without (a name's trailing space, kept
            // aside by the view, gone).
            let before = journal.kept.clone();
            walk_base(&mut journal)?;
            changed |= journal.kept != before;
        }
        Ok(Some(PushPlan {
            id: id.to_owned(),
            newest: rev,
            chain,
            deletion,
            adopted: is_adopted,
            journaled,
            journal,
            original: changed.then_some(original),
            child,
        }))
    }

    /// Puts back the journals of revisions the store refused as they were
    /// before [`Session::plan_push`] changed them, conditional on what the
    /// push wrote. A journal another writer changed meanwhile (merged on
    /// saving, or changed since) keeps the push's entries, which name a
    /// revision never stored and change no answer.
    async fn put_back(&self, refused: &mut [PushPlan]) -> Result<(), GatewayError> {
        for plan in refused {
            let Some(mut original) = plan.original.take() else {
                continue;
            };
            original.rev = plan.journal.rev.clone();
            match self.db.state.put(journal_doc(&plan.id, &original)?).await {
                Ok(rev) => {
                    original.rev = Some(rev);
                    plan.journal = original;
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Step 4 of [`Session::push`] for the stored revisions of a round
    /// (distinct documents, their journals saved), each part in one request
    /// for the round: the translations [`Session::plan_push`] planned, then
    /// the tombstones that make a human edit win over what rewind wrote on
    /// its ancestors.
    async fn carry_out(&self, plans: &mut [PushPlan]) -> Result<(), GatewayError> {
        let children: Vec<Value> = plans.iter().filter_map(|p| p.child.clone()).collect();
        // A translation the store refused (not a conflict: the translation
        // was written before) fails the push once the others are resolved.
        let mut refused = None;
        if !children.is_empty() {
            let mut written = self.db.data.bulk_docs(children, true).await?.into_iter();
            for plan in plans.iter_mut().filter(|p| p.child.is_some()) {
                let result = written
                    .next()
                    .ok_or_else(|| GatewayError::Internal("_bulk_docs answered too few".into()))?;
                match result.into_written() {
                    Ok(new_rev) => {
                        if plan.adopted {
                            plan.journal.adopted.push(new_rev.clone());
                            self.save_journal(&plan.id, &mut plan.journal).await?;
                        }
                        plan.newest = new_rev;
                    }
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => {
                        refused.get_or_insert(e);
                    }
                }
            }
        }
        // A human edit wins over what rewind wrote on its ancestors. Only
        // where a copy was adopted do deleted leaves count (a phone's
        // deletion beats an adopted copy): elsewhere the live leaves tell.
        let contested = |adoptions: bool| -> Vec<String> {
            plans
                .iter()
                .filter(|p| p.journaled || !p.journal.is_empty())
                .filter(|p| p.journal.adopted.is_empty() != adoptions)
                .map(|p| p.id.clone())
                .collect()
        };
        let mut leaves = self.live_leaves_of(&contested(false)).await?;
        leaves.extend(self.leaves_of(&contested(true)).await?);
        let mut tombstones = Vec::new();
        for plan in plans.iter() {
            if let Some(leaves) = leaves.get(&plan.id) {
                tombstones.extend(resolution(&plan.id, leaves, plan));
            }
        }
        if !tombstones.is_empty() {
            self.db.data.bulk_docs(tombstones, false).await?;
        }
        match refused {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// The version of the body a phone edited: its parent's, when the parent
    /// is a stored revision, or the version whose view its synthetic parent
    /// presented. `None` when neither can be told. `base`: the pushed
    /// revision's stored base ([`Session::stored_bases`]).
    fn edited_version(
        &self,
        id: &str,
        chain: &[String],
        journal: &Journal,
        base: Option<&(usize, Value)>,
    ) -> Result<Option<u32>, GatewayError> {
        let Some((index, body)) = base else {
            return Ok(None);
        };
        if *index == 1 {
            return Ok(Some(stored_version(self.set, journal, &chain[1], body)));
        }
        // The parent is a rung of a ladder on the base: the version whose
        // view it presented.
        view::presented_version(
            self.set,
            self.checksum,
            &chain[*index],
            body,
            journal,
            &chain[1..*index],
        )
        .map_err(|e| GatewayError::Lens(id.to_owned(), e))
    }

    /// For each pushed revision that is not a deletion, its **stored
    /// base**: the newest stored, undeleted revision among its ancestors
    /// (the first [`base_search`] of its history), as its place in the
    /// history and its body: what the phone's view was made from. Keyed by
    /// (document, pushed revision). Read for the whole batch at once: the
    /// two nearest ancestors first (the parent, or a synthetic parent's
    /// base), the rest only where those are not stored.
    async fn stored_bases(
        &self,
        docs: &[Value],
    ) -> Result<HashMap<(String, String), (usize, Value)>, GatewayError> {
        let chains: Vec<(String, Vec<String>)> = docs
            .iter()
            .filter(|d| !is_deleted(d))
            .map(|d| (id_of(d), view::history(d)))
            .filter(|(_, chain)| chain.len() > 1)
            .collect();
        let mut stored: HashMap<(String, String), Value> = HashMap::new();
        let mut out = HashMap::new();
        for places in [1..3, 3..base_search(self.set) + 1] {
            let open: Vec<&(String, Vec<String>)> = chains
                .iter()
                .filter(|(id, chain)| !out.contains_key(&(id.clone(), chain[0].clone())))
                .collect();
            let wanted: Vec<BulkGetRequest> = open
                .iter()
                .flat_map(|(id, chain)| {
                    chain
                        .iter()
                        .take(places.end)
                        .skip(places.start)
                        .map(|rev| BulkGetRequest::new(id.clone(), Some(rev)))
                })
                .collect();
            if wanted.is_empty() {
                break;
            }
            let opts = BulkGetOptions::default();
            for result in self.db.data.bulk_get(wanted, opts).await? {
                for item in result.docs {
                    if let BulkGetItem::Ok(doc) = item {
                        if let Some(rev) = doc.get("_rev").and_then(Value::as_str) {
                            stored.insert((result.id.clone(), rev.to_owned()), doc);
                        }
                    }
                }
            }
            for (id, chain) in open {
                let found = chain
                    .iter()
                    .enumerate()
                    .skip(1)
                    .take(places.end - 1)
                    .find_map(|(index, rev)| {
                        let doc = stored.get(&(id.clone(), rev.clone()))?;
                        (!is_deleted(doc)).then(|| (index, body_of(doc)))
                    });
                if let Some(found) = found {
                    out.insert((id.clone(), chain[0].clone()), found);
                }
            }
        }
        Ok(out)
    }

    /// Writes the journals of distinct documents in one request; one that
    /// another writer changed meanwhile is merged and written on its own
    /// ([`Session::save_journal`]). Updates each to what was written;
    /// returns the ids of those merged.
    async fn save_journals(
        &self,
        journals: Vec<(&str, &mut Journal)>,
    ) -> Result<std::collections::HashSet<String>, GatewayError> {
        let mut merged = std::collections::HashSet::new();
        if journals.is_empty() {
            return Ok(merged);
        }
        let docs = journals
            .iter()
            .map(|(id, journal)| journal_doc(id, journal))
            .collect::<Result<Vec<Value>, GatewayError>>()?;
        let written = self.db.state.bulk_docs(docs, true).await?;
        if written.len() != journals.len() {
            return Err(GatewayError::Internal("_bulk_docs answered too few".into()));
        }
        for ((id, journal), result) in journals.into_iter().zip(written) {
            match result.into_written() {
                Ok(rev) => journal.rev = Some(rev),
                Err(StoreError::Conflict { .. }) => {
                    self.save_journal(id, journal).await?;
                    merged.insert(id.to_owned());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(merged)
    }

    /// Writes a document's journal, merging with a concurrent writer's
    /// (images, adopted and deleted revisions are unions); updates `journal`
    /// to what was written.
    async fn save_journal(&self, id: &str, journal: &mut Journal) -> Result<(), GatewayError> {
        for attempt in 0..30u64 {
            if attempt > 0 {
                // Another writer (the engine, another gateway) got there first.
                tokio::time::sleep(std::time::Duration::from_millis(5 * attempt.min(20))).await;
            }
            match self.db.state.put(journal_doc(id, journal)?).await {
                Ok(rev) => {
                    journal.rev = Some(rev);
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => {
                    let fresh = self
                        .journals(&[id.to_owned()])
                        .await?
                        .remove(id)
                        .unwrap_or_default();
                    for image in fresh.images {
                        if !journal.images.contains(&image) {
                            journal.images.insert(0, image);
                        }
                    }
                    add_missing(&mut journal.adopted, fresh.adopted);
                    add_missing(&mut journal.deleted, fresh.deleted);
                    add_missing(&mut journal.pushed, fresh.pushed);
                    add_missing(&mut journal.retired, fresh.retired);
                    for (k, v) in fresh.kept {
                        journal.kept.entry(k).or_insert(v);
                    }
                    journal.rev = fresh.rev;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(GatewayError::Internal(format!(
            "the journal of {id} keeps changing"
        )))
    }

    /// A write with `new_edits=true` at the client's version: conditional on
    /// a presented revision; stored as a new revision with its translation.
    /// Returns `(id, new presented rev)` or a conflict.
    pub async fn edit(
        &self,
        mut doc: Value,
    ) -> Result<Result<(String, String), GatewayError>, GatewayError> {
        let id = id_of(&doc);
        let base = doc.get("_rev").and_then(Value::as_str).map(str::to_owned);
        let presented = self.presented_leaves(&id).await?;
        let live: Vec<&Presented> = presented.iter().filter(|p| !is_deleted(&p.doc)).collect();
        let chain = match &base {
            Some(base) => match live.iter().find(|p| p.rev == *base) {
                Some(p) => view::history(&p.doc),
                None => return Ok(Err(GatewayError::Conflict(id))),
            },
            None if !live.is_empty() => return Ok(Err(GatewayError::Conflict(id))),
            None => presented
                .iter()
                .find(|p| is_deleted(&p.doc))
                .map(|p| vec![p.rev.clone()])
                .unwrap_or_default(),
        };
        let body = body_of(&doc);
        let generation = chain.first().map(|r| view::generation(r)).unwrap_or(0) + 1;
        let digest = md5::compute(format!(
            "{}\n{}",
            chain.first().map(String::as_str).unwrap_or(""),
            body
        ));
        let rev = format!("{generation}-{digest:x}");
        let mut full = vec![rev.clone()];
        full.extend(chain);
        if let Some(object) = doc.as_object_mut() {
            object.insert("_rev".into(), Value::from(rev.clone()));
            object.insert("_revisions".into(), view::revisions_member(&full));
        }
        let errors = self.push(vec![doc]).await?;
        if let Some(e) = errors.first() {
            return Ok(Err(refusal(e)));
        }
        Ok(Ok((id, rev)))
    }
}

/// The tombstones for the live leaves (of `leaves`, a document's every
/// leaf) that rewind wrote on top of an ancestor of a pushed revision
/// (`plan`): the human edit wins, and no conflict remains.
fn resolution(id: &str, leaves: &[Value], plan: &PushPlan) -> Vec<Value> {
    let (chain, newest, journal, deletion) = (
        &plan.chain,
        plan.newest.as_str(),
        &plan.journal,
        plan.deletion,
    );
    let rev_of = |l: &Value| {
        l.get("_rev")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    // An adopted copy, or what rewind wrote on top of one, is adopted.
    let adopted = |l: &Value| {
        journal.adopted.contains(&rev_of(l))
            || view::is_system_descendant(l, &journal.adopted, journal)
    };
    // Adopted copies yield to any other live leaf, and to a phone's deletion.
    let others = leaves.iter().any(|l| {
        if is_deleted(l) {
            journal.deleted.contains(&rev_of(l))
        } else {
            !adopted(l)
        }
    });
    let live: Vec<&Value> = leaves.iter().filter(|l| !is_deleted(l)).collect();
    let adopted_live = live.iter().any(|l| adopted(l));
    // Adopted copies of a view another live branch carries on, presented
    // in another context (after a restore, phones that held one view in
    // two contexts push it back under two ids).
    let stale: Vec<String> = live
        .iter()
        .filter(|l| adopted(l) && stale_copy(l, &live, journal))
        .map(|l| rev_of(l))
        .collect();
    // A deletion also wins over what rewind wrote on its ancestors.
    let contested = live.len() >= 2 || (deletion && !live.is_empty());
    if !(contested || others && adopted_live) {
        return Vec::new();
    }
    let mut tombstones = Vec::new();
    for leaf in live {
        let rev = rev_of(leaf);
        if others && adopted(leaf) || stale.contains(&rev) {
            tombstones.push(retire(id, leaf));
            continue;
        }
        if rev == newest || chain.contains(&rev) {
            continue;
        }
        // What rewind wrote on an older ancestor loses to the edit. What
        // it wrote on the pushed revision itself is the edit, translated
        // (the engine's migration of it, when an upgrade got there
        // between the two writes of this push, or the translation of an
        // earlier push of the same revision), and stays.
        if view::system_base(leaf, chain, journal).is_some_and(|base| *base != chain[0]) {
            tombstones.push(retire(id, leaf));
        }
    }
    tombstones
}

/// The synthetic revisions of `leaf`'s history with only rewind above them:
/// the leaf itself when it is one, else the nearest one rewind's writes
/// lead down to (`view::system_base`), with the rungs right below it (a
/// rung's base ends the run: below a ladder is the history it was
/// presented on).
fn rewind_only_above(leaf: &Value, journal: &Journal) -> Vec<String> {
    let hist = view::history(leaf);
    let is_rung = |r: &&String| view::is_synthetic_rev(r);
    let copies: Vec<String> = hist.iter().filter(is_rung).cloned().collect();
    let start = match hist.first() {
        Some(rev) if view::is_synthetic_rev(rev) => Some(0),
        _ => view::system_base(leaf, &copies, journal)
            .and_then(|base| hist.iter().position(|r| r == base)),
    };
    match start {
        Some(at) => hist[at..].iter().take_while(is_rung).cloned().collect(),
        None => Vec::new(),
    }
}

/// True when `leaf` is a synthetic copy of a view, or rewind's writes on
/// one, that another of the `live` leaves carries on: its history holds
/// the same view on the same parent presented in another context
/// (`view::same_view`) with a human edit above it, or, when only rewind
/// wrote above both, that leaf wins.
fn stale_copy(leaf: &Value, live: &[&Value], journal: &Journal) -> bool {
    let ours = rewind_only_above(leaf, journal);
    let rev = view::history(leaf).first().cloned().unwrap_or_default();
    let order = |r: &str| (view::generation(r), r.to_owned());
    live.iter().any(|other| {
        let hist = view::history(other);
        let Some(theirs_rev) = hist.first() else {
            return false;
        };
        if *theirs_rev == rev {
            return false;
        }
        let Some(theirs) = hist
            .iter()
            .find(|r| ours.iter().any(|o| *o != **r && view::same_view(o, r)))
        else {
            return false;
        };
        let only_rewind_above = rewind_only_above(other, journal).contains(theirs);
        !only_rewind_above || order(theirs_rev) > order(&rev)
    })
}

/// What storing one pushed revision writes (see [`Session::plan_push`]).
struct PushPlan {
    id: String,
    /// The pushed revision's history, newest first.
    chain: Vec<String>,
    /// The newest revision of the push on the server: the pushed one, or
    /// its translation once written.
    newest: String,
    deletion: bool,
    /// A copy the server adopted (its base was lost).
    adopted: bool,
    /// The document had a journal before this revision.
    journaled: bool,
    journal: Journal,
    /// The journal as read, when this revision changed it: the journal is
    /// then saved, and put back if the store refuses the revision
    /// ([`Session::put_back`]).
    original: Option<Journal>,
    /// The translation to write as the pushed revision's child.
    child: Option<Value>,
}

/// A journal as the document that stores it.
fn journal_doc(id: &str, journal: &Journal) -> Result<Value, GatewayError> {
    let mut doc =
        serde_json::to_value(journal).map_err(|e| GatewayError::Internal(e.to_string()))?;
    doc["_id"] = Value::from(journal_id(id));
    Ok(doc)
}

/// Sorts a document's leaves in CouchDB's order, the winner first: a store
/// may list them in any order (pouchdb-server: as its reads complete), and
/// every answer built from them must be deterministic.
fn sort_leaves(leaves: &mut [Value]) {
    leaves.sort_by_key(|doc| {
        let rev = doc.get("_rev").and_then(Value::as_str).unwrap_or("");
        leaf_order(rev, is_deleted(doc))
    });
}

/// A leaf's place in [`sort_leaves`]'s order (ascending): live before
/// deleted, then the longer history, then the higher revision id.
fn leaf_order(rev: &str, deleted: bool) -> std::cmp::Reverse<(bool, u64, String)> {
    std::cmp::Reverse((!deleted, view::generation(rev), rev.to_owned()))
}

/// A tombstone retiring `leaf`, with a revision id derived from it, so that
/// every gateway writes the same one and recognises it when a phone pushes
/// it back.
fn retire(id: &str, leaf: &Value) -> Value {
    let hist = view::history(leaf);
    let mut chain = vec![view::tombstone_rev(&hist[0])];
    chain.extend(hist);
    json!({"_id": id, "_rev": chain[0], "_deleted": true, "_revisions": view::revisions_member(&chain)})
}

/// The winner among presented leaves: CouchDB's rule (live first, then the
/// highest generation, then the highest id).
pub fn winner(presented: &[Presented]) -> Option<&Presented> {
    let key = |p: &Presented| (!is_deleted(&p.doc), view::generation(&p.rev));
    presented
        .iter()
        .max_by(|a, b| key(a).cmp(&key(b)).then_with(|| a.rev.cmp(&b.rev)))
}

fn strip_revisions(mut doc: Value) -> Value {
    if let Some(object) = doc.as_object_mut() {
        object.shift_remove("_revisions");
    }
    doc
}

/// Replaces inline attachments by stubs (the child revision refers to its
/// parent's). A stub names its attachment by digest (CouchDB and
/// pouchdb-server look it up so): one sent inline without a digest gets
/// the digest of its data.
fn stub_attachments(doc: &mut Value) {
    if let Some(atts) = doc.get_mut("_attachments").and_then(Value::as_object_mut) {
        for att in atts.values_mut() {
            if let Some(att) = att.as_object_mut() {
                let data = match att.contains_key("digest") {
                    true => None,
                    false => att
                        .get("data")
                        .and_then(Value::as_str)
                        .and_then(crate::http::decode_base64),
                };
                if let Some(data) = data {
                    att.insert(
                        "digest".into(),
                        Value::from(rewind_store::attachment_digest(&data)),
                    );
                }
                att.shift_remove("data");
                att.shift_remove("follows");
                att.insert("stub".into(), Value::from(true));
            }
        }
    }
}

/// A document's entry in a [`Session::push`] answer (`{"id", "error",
/// "reason"}`) as the error a write of that document alone answers with.
pub fn refusal(entry: &Value) -> GatewayError {
    let text = |key: &str| entry.get(key).and_then(Value::as_str);
    GatewayError::Store(StoreError::refused(
        text("id").unwrap_or_default(),
        text("error").unwrap_or("internal"),
        text("reason").unwrap_or_default().to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leaf with `body` and history `hist` (newest first).
    fn leaf_with(hist: &[&str], body: Value) -> Value {
        let hist: Vec<String> = hist.iter().map(|r| (*r).to_owned()).collect();
        let mut doc = body;
        doc["_id"] = json!("d");
        doc["_rev"] = json!(hist[0]);
        doc["_revisions"] = view::revisions_member(&hist);
        doc
    }

    #[test]
    fn an_adopted_copy_of_a_view_another_branch_edited_on_is_stale() {
        // After a restore, phone A pushes back its copy of a view in its
        // context; phone B, which held the same view in another context and
        // edited it, pushes its edit. A's copy is stale (B's branch starts
        // from the same view); B's is not.
        let view_body = json!({"type": "person", "name": "Ann"});
        let in_a = view::synthetic_rev("1-base", "ck", &view_body, "context a");
        let in_b = view::synthetic_rev("1-base", "ck", &view_body, "context b");
        assert!(view::same_view(&in_a, &in_b) && in_a != in_b);
        let a = leaf_with(&[&in_a, "1-base"], view_body.clone());
        let b = leaf_with(
            &["3-edit", &in_b, "1-base"],
            json!({"type": "person", "name": "Ann B."}),
        );
        let journal = Journal::default();
        let live = [&a, &b];
        assert!(stale_copy(&a, &live, &journal));
        assert!(
            !stale_copy(&b, &live, &journal),
            "a human edit above the view"
        );
        // Two copies of one view with nothing above either: one yields
        // (the loser by CouchDB's order), never both.
        let b_copy = leaf_with(&[&in_b, "1-base"], view_body.clone());
        let live = [&a, &b_copy];
        assert_ne!(
            stale_copy(&a, &live, &journal),
            stale_copy(&b_copy, &live, &journal)
        );
        // A copy of another view (the same document edited differently)
        // is no one's stale copy: the conflict is real.
        let other_view = json!({"type": "person", "name": "Ann C."});
        let c = leaf_with(
            &[
                &view::synthetic_rev("1-base", "ck", &other_view, "context c"),
                "1-base",
            ],
            other_view,
        );
        let live = [&c, &b];
        assert!(!stale_copy(&c, &live, &journal));
    }

    /// The cache key of leaf `i`, under one journal revision.
    fn numbered_key(i: usize) -> PresentKey {
        PresentKey {
            leaf: i.to_string(),
            journal_rev: "1-j".into(),
        }
    }

    #[test]
    fn the_present_cache_keeps_the_recent_entries_and_bounds_the_rest() {
        let cache = PresentCache::default();
        let n = PresentCache::GENERATION * 5 / 2;
        let key = numbered_key;
        for i in 0..n {
            cache.put(&key(i), Vec::new(), Vec::new());
        }
        let held = |i: usize| cache.get(&key(i)).is_some();
        // The last generation and a half are held; the oldest are gone.
        assert!((n - PresentCache::GENERATION..n).all(held));
        assert!(!held(0));
        // A leaf is known whatever its journal's revision; an entry under
        // another journal revision is not.
        assert!(cache.holds_leaf(&key(n - 1).leaf));
        assert!(!cache.holds_leaf(&key(0).leaf));
        let other = PresentKey {
            journal_rev: "2-j".into(),
            ..key(n - 1)
        };
        assert!(cache.get(&other).is_none());
        {
            let cache = cache.entries.lock().unwrap();
            let entries = cache.new.presented.len() + cache.old.presented.len();
            assert!(entries <= 2 * PresentCache::GENERATION);
        }
        // An entry of the old generation used again moves to the new one:
        // it outlives the entries put with it.
        let cache = PresentCache::default();
        let generation = PresentCache::GENERATION;
        for i in 0..=generation {
            cache.put(&key(i), Vec::new(), Vec::new());
        }
        let held = |i: usize| cache.get(&key(i)).is_some();
        assert!(held(0), "in the old generation");
        for i in generation + 1..=2 * generation {
            cache.put(&key(i), Vec::new(), Vec::new());
        }
        assert!(held(0), "the entry used again is held");
        assert!(!held(1), "an entry put with it and not used since is gone");
    }

    #[test]
    fn an_entry_moved_to_the_new_generation_is_still_found_by_its_revisions() {
        let cache = PresentCache::default();
        let key = numbered_key;
        let generation = PresentCache::GENERATION;
        for i in 0..=generation {
            cache.put(&key(i), Vec::new(), vec![format!("revision of {i}")]);
        }
        // Found by its revision: it stays where it is.
        assert!(cache.get_revision("revision of 0").is_some());
        assert!(cache
            .entries
            .lock()
            .unwrap()
            .old
            .presented
            .contains_key(&key(0).full()));
        // Used again by its key: it moves, and its revision with it.
        assert!(cache.get(&key(0)).is_some());
        for i in generation + 1..2 * generation {
            cache.put(&key(i), Vec::new(), vec![format!("revision of {i}")]);
        }
        assert!(cache.get_revision("revision of 0").is_some());
        assert!(cache.get_revision("revision of 1").is_none());
    }

    #[test]
    fn presented_revisions_are_remembered_after_their_presentations_and_bounded() {
        let cache = PresentCache::default();
        let key = numbered_key;
        for i in 0..3 * PresentCache::GENERATION {
            cache.put(&key(i), Vec::new(), vec![format!("revision of {i}")]);
        }
        assert!(cache.get_revision("revision of 0").is_none());
        assert!(cache.presented_recently("revision of 0"));
        assert!(!cache.presented_recently("revision of none"));
        cache.forget_recent_revisions();
        assert!(!cache.presented_recently("revision of 0"));
        let mut recent = RecentRevisions::default();
        for i in 0..=2 * RecentRevisions::GENERATION {
            recent.insert(&i.to_string());
        }
        assert!(!recent.contains("0"), "two generations later");
        assert!(recent.contains(&(2 * RecentRevisions::GENERATION).to_string()));
        assert!(recent.new.len() + recent.old.len() <= 2 * RecentRevisions::GENERATION);
    }

    #[test]
    fn the_present_cache_finds_presentations_by_the_revisions_they_present() {
        let cache = PresentCache::default();
        let presented = |rev: &str| Presented {
            rev: rev.into(),
            doc: serde_json::json!({"_id": "a", "_rev": rev}).into(),
            synthetic: true,
        };
        let key = |leaf: &str| PresentKey {
            leaf: leaf.into(),
            journal_rev: "1-j".into(),
        };
        cache.put(
            &key("leaf a"),
            vec![presented("2-view"), presented("3-gone")],
            vec!["ctx a 2-view".into(), "ctx a 3-gone".into()],
        );
        for revision in ["ctx a 2-view", "ctx a 3-gone"] {
            let found = cache.get_revision(revision).expect("held");
            assert_eq!(found.len(), 2);
            assert_eq!(found[0].rev, "2-view");
        }
        assert!(cache.get_revision("ctx a 9-other").is_none());
        assert!(cache.get_revision("other ctx a 2-view").is_none());
        // Gone with its generation.
        for i in 0..2 * PresentCache::GENERATION {
            cache.put(&key(&i.to_string()), Vec::new(), Vec::new());
        }
        assert!(cache.get_revision("ctx a 2-view").is_none());
    }
}
