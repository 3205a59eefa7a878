//! The replication traffic of one database at one client version: pull
//! (changes, documents) presented through version views, and push (revisions
//! a client sends) stored with their translation to the server's version.

use crate::view::{self, Presented};
use crate::GatewayError;
use rewind_engine::journal::{body_hash, body_of, journal_id, Image, Journal, JournalComplements};
use rewind_engine::state::{Database, State};
use rewind_lens::MigrationSet;
use rewind_store::{
    AllDocsOptions, BulkGetItem, BulkGetOptions, BulkGetRequest, ChangeRev, Changes,
    ChangesOptions, GetOptions, GetResult, OpenRev, OpenRevs, Store, StoreError,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

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
    /// The database's state (version, run in progress).
    pub state: &'a State,
}

fn id_of(doc: &Value) -> String {
    doc.get("_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

fn is_deleted(doc: &Value) -> bool {
    doc.get("_deleted").and_then(Value::as_bool) == Some(true)
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

    /// The journals of `ids`.
    pub async fn journals(&self, ids: &[String]) -> Result<HashMap<String, Journal>, GatewayError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = self
            .db
            .state
            .all_docs(&AllDocsOptions {
                keys: Some(ids.iter().map(|id| journal_id(id)).collect()),
                include_docs: true,
                ..AllDocsOptions::default()
            })
            .await?
            .rows;
        let mut out = HashMap::new();
        for row in rows {
            if let Some(doc) = row.doc {
                let id = row.key.trim_start_matches("journal:").to_owned();
                if let Ok(journal) = serde_json::from_value::<Journal>(doc) {
                    out.insert(id, journal);
                }
            }
        }
        Ok(out)
    }

    /// Presents stored leaves (with `_revisions`) at the client's version.
    pub async fn present_all(&self, leaves: &[Value]) -> Result<Vec<Presented>, GatewayError> {
        let mut ids: Vec<String> = leaves.iter().map(id_of).collect();
        ids.sort();
        ids.dedup();
        let journals = self.journals(&ids).await?;
        let empty = Journal::default();
        leaves
            .iter()
            .map(|leaf| {
                if is_deleted(leaf) {
                    let rev = leaf
                        .get("_rev")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned();
                    return Ok(Presented {
                        rev,
                        doc: leaf.clone(),
                        synthetic: false,
                    });
                }
                let journal = journals.get(&id_of(leaf)).unwrap_or(&empty);
                view::present(self.set, self.checksum, leaf, self.k, journal)
                    .map_err(|e| GatewayError::Lens(id_of(leaf), e))
            })
            .collect()
    }

    /// Every leaf of a document, with `_revisions` (deleted ones included).
    pub async fn leaves(&self, id: &str) -> Result<Vec<Value>, GatewayError> {
        let opts = GetOptions {
            open_revs: Some(OpenRevs::All),
            revs: true,
            ..GetOptions::default()
        };
        match self.db.data.get(id, &opts).await {
            Ok(GetResult::Revs(revs)) => Ok(revs
                .into_iter()
                .filter_map(|r| match r {
                    OpenRev::Ok(doc) => Some(doc),
                    OpenRev::Missing(_) => None,
                })
                .collect()),
            Ok(GetResult::Doc(doc)) => Ok(vec![doc]),
            Err(StoreError::NotFound { .. }) => Ok(vec![]),
            Err(e) => Err(e.into()),
        }
    }

    /// A normal changes feed, with each leaf's presented revision.
    pub async fn changes(&self, opts: &ChangesOptions) -> Result<Changes, GatewayError> {
        let mut changes = self.db.data.changes(opts).await?;
        // Documents with no journal pass through when the client is at the
        // storage version; the others are fetched with their history and
        // presented.
        let journaled: std::collections::HashSet<String> = if self.plain() {
            let ids: Vec<String> = changes.results.iter().map(|r| r.id.clone()).collect();
            self.journals(&ids).await?.into_keys().collect()
        } else {
            changes.results.iter().map(|r| r.id.clone()).collect()
        };
        let mut leaves = Vec::new();
        for row in &changes.results {
            if !journaled.contains(&row.id) {
                continue;
            }
            if row.changes.len() == 1 && !row.deleted {
                leaves.push((row.id.clone(), Some(row.changes[0].rev.clone())));
            } else {
                leaves.push((row.id.clone(), None));
            }
        }
        let mut docs: Vec<Value> = Vec::new();
        let single: Vec<BulkGetRequest> = leaves
            .iter()
            .filter_map(|(id, rev)| {
                rev.as_ref()
                    .map(|r| BulkGetRequest::new(id.clone(), Some(r)))
            })
            .collect();
        if !single.is_empty() {
            let got = self
                .db
                .data
                .bulk_get(
                    single,
                    BulkGetOptions {
                        revs: true,
                        latest: false,
                        attachments: false,
                    },
                )
                .await?;
            for result in got {
                for item in result.docs {
                    if let BulkGetItem::Ok(doc) = item {
                        docs.push(doc);
                    }
                }
            }
        }
        for (id, rev) in &leaves {
            if rev.is_none() {
                docs.extend(self.leaves(id).await?);
            }
        }
        let presented = self.present_all(&docs).await?;
        let mut by_id: HashMap<String, Vec<Presented>> = HashMap::new();
        for p in presented {
            by_id.entry(id_of(&p.doc)).or_default().push(p);
        }
        for row in &mut changes.results {
            if !journaled.contains(&row.id) {
                continue;
            }
            if let Some(ps) = by_id.get(&row.id) {
                // The winner first, as CouchDB lists it.
                row.changes = ps
                    .iter()
                    .map(|p| ChangeRev { rev: p.rev.clone() })
                    .collect();
                if opts.include_docs {
                    let winner = ps.iter().find(|p| !is_deleted(&p.doc)).or(ps.first());
                    row.doc = winner.map(|p| strip_revisions(p.doc.clone()));
                }
                if !opts.style_all_docs {
                    row.changes.truncate(1);
                }
            }
        }
        Ok(changes)
    }

    /// The presented leaves of a document.
    pub async fn presented_leaves(&self, id: &str) -> Result<Vec<Presented>, GatewayError> {
        let leaves = self.leaves(id).await?;
        self.present_all(&leaves).await
    }

    /// A document at a presented revision (or its winner), as `_bulk_get`
    /// and `GET /{db}/{id}` answer. `None` when there is no such revision.
    pub async fn get(&self, id: &str, rev: Option<&str>) -> Result<Option<Value>, GatewayError> {
        if self.plain() && self.journals(&[id.to_owned()]).await?.is_empty() {
            let opts = GetOptions {
                rev: rev.map(str::to_owned),
                revs: true,
                ..GetOptions::default()
            };
            return match self.db.data.get(id, &opts).await {
                Ok(found) => Ok(found.into_doc()),
                Err(StoreError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            };
        }
        let presented = self.presented_leaves(id).await?;
        let found = match rev {
            Some(rev) => presented.into_iter().find(|p| p.rev == rev),
            None => winner(presented),
        };
        if let Some(p) = found {
            return Ok(Some(p.doc));
        }
        // An older stored revision asked for by id: as stored.
        if let Some(rev) = rev {
            let opts = GetOptions {
                rev: Some(rev.to_owned()),
                revs: true,
                ..GetOptions::default()
            };
            if let Ok(found) = self.db.data.get(id, &opts).await {
                return Ok(found.into_doc());
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
        let mut ids: Vec<String> = missing.keys().cloned().collect();
        if self.plain() {
            // Only journaled documents can have presented revisions.
            let journaled = self.journals(&ids).await?;
            ids.retain(|id| journaled.contains_key(id));
        }
        for id in ids {
            let presented = self.presented_leaves(&id).await?;
            if let Some(entry) = missing.get_mut(&id) {
                entry
                    .missing
                    .retain(|rev| !presented.iter().any(|p| p.rev == *rev));
                if entry.missing.is_empty() {
                    missing.remove(&id);
                }
            }
        }
        Ok(missing)
    }

    /// Stores revisions a client pushed (`new_edits=false`): each as sent,
    /// then, where its version is not the server's, its translation as a
    /// child (journaled); a system-written revision it branches from is
    /// tombstoned, so an edit always wins over a migration and no conflict
    /// appears. Synthetic revisions coming back are ignored.
    pub async fn push(&self, docs: Vec<Value>) -> Result<Vec<Value>, GatewayError> {
        let target = self.storage_version();
        let docs: Vec<Value> = docs
            .into_iter()
            .filter(|doc| is_deleted(doc) || !view::is_synthetic(doc, self.k, self.checksum))
            .collect();
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        // 1. Every revision as sent (one batch).
        let mut errors = Vec::new();
        let mut failed = std::collections::HashSet::new();
        for failure in self.db.data.bulk_docs(docs.clone(), false).await? {
            if failure.error.is_some() {
                failed.insert(failure.id.clone());
                errors.push(serde_json::to_value(failure).unwrap_or_default());
            }
        }
        let ids: Vec<String> = docs.iter().map(id_of).collect();
        let mut journals = self.journals(&ids).await?;
        for doc in docs {
            let id = id_of(&doc);
            if failed.contains(&id) {
                continue;
            }
            let chain = view::history(&doc);
            let Some(rev) = chain.first().cloned() else { continue };
            // The version a pushed body is read at: its stamp, else the client's.
            let version = if is_deleted(&doc) {
                target
            } else {
                self.set.stamp_of(&doc).unwrap_or(self.k).min(self.set.latest())
            };
            let mut journal = journals.remove(&id).unwrap_or_default();
            let journaled = !journal.is_empty();
            let mut newest = rev.clone();
            // 2. Its translation to the server's version, journaled first: a
            // crash in between leaves the client's revision as the leaf,
            // which views translate on the fly.
            if !is_deleted(&doc) && version != target && MigrationSet::is_migratable(&doc) {
                let mut translated = doc.clone();
                // A body with no stamp is read at the client's version; tell
                // the lens, which takes an unstamped body for version 0 and
                // would skip every step going down.
                if version > 0 && self.set.stamp_of(&translated).is_none() {
                    if let Some(object) = translated.as_object_mut() {
                        object.insert(self.set.stamp_field().to_owned(), Value::from(version));
                    }
                }
                self.set
                    .translate(&mut translated, version, target, &mut JournalComplements(&mut journal))
                    .map_err(|e| GatewayError::Lens(id.clone(), e))?;
                if body_hash(&translated) != body_hash(&doc) {
                    journal.push_image(Image {
                        from: version,
                        to: target,
                        rev: rev.clone(),
                        after: body_hash(&translated),
                        body: serde_json::to_string(&body_of(&doc)).unwrap_or_default(),
                    });
                    self.save_journal(&id, &journal).await?;
                    let mut child = body_of(&translated);
                    stub_attachments(&mut child);
                    child["_rev"] = Value::from(rev.clone());
                    match self.db.data.put(child).await {
                        Ok(new_rev) => newest = new_rev,
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            // 3. A human edit wins over what rewind wrote on its ancestors.
            if journaled || !journal.is_empty() {
                self.resolve(&id, &chain, &newest, &journal).await?;
            }
        }
        Ok(errors)
    }

    async fn save_journal(&self, id: &str, journal: &Journal) -> Result<(), GatewayError> {
        let mut doc =
            serde_json::to_value(journal).map_err(|e| GatewayError::Internal(e.to_string()))?;
        doc["_id"] = Value::from(journal_id(id));
        for attempt in 0..5 {
            match self.db.state.put(doc.clone()).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) if attempt < 4 => {
                    // Someone else updated the journal: merge onto theirs.
                    let fresh = self
                        .journals(&[id.to_owned()])
                        .await?
                        .remove(id)
                        .unwrap_or_default();
                    let mut merged = journal.clone();
                    for image in fresh.images {
                        if !merged.images.contains(&image) {
                            merged.images.insert(0, image);
                        }
                    }
                    let mut value = serde_json::to_value(&merged)
                        .map_err(|e| GatewayError::Internal(e.to_string()))?;
                    value["_id"] = Value::from(journal_id(id));
                    if let Some(rev) = self
                        .db
                        .state
                        .get(&journal_id(id), &GetOptions::default())
                        .await
                        .ok()
                        .and_then(|g| g.into_doc())
                        .and_then(|d| d.get("_rev").cloned())
                    {
                        value["_rev"] = rev;
                    }
                    doc = value;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Tombstones live leaves that rewind wrote on top of an ancestor of a
    /// pushed revision: the human edit wins, and no conflict remains.
    async fn resolve(
        &self,
        id: &str,
        chain: &[String],
        newest: &str,
        journal: &Journal,
    ) -> Result<(), GatewayError> {
        let leaves = self.leaves(id).await?;
        let live: Vec<&Value> = leaves.iter().filter(|l| !is_deleted(l)).collect();
        if live.len() < 2 {
            return Ok(());
        }
        let mut tombstones = Vec::new();
        for leaf in live {
            let rev = leaf.get("_rev").and_then(Value::as_str).unwrap_or("");
            if rev == newest || chain.iter().any(|r| r == rev) {
                continue;
            }
            if view::is_system_descendant(leaf, chain, journal) {
                tombstones.push(json!({"_id": id, "_rev": rev, "_deleted": true}));
            }
        }
        if !tombstones.is_empty() {
            self.db.data.bulk_docs(tombstones, true).await?;
        }
        Ok(())
    }

    /// A write with `new_edits=true` at the client's version: conditional on
    /// a presented revision; stored as a new revision with its translation.
    /// Returns `(id, new presented rev)` or a conflict.
    pub async fn edit(
        &self,
        mut doc: Value,
    ) -> Result<Result<(String, String), GatewayError>, GatewayError> {
        let id = id_of(&doc);
        if self.plain() && self.journals(std::slice::from_ref(&id)).await?.is_empty() {
            return Ok(match self.db.data.put(doc).await {
                Ok(rev) => Ok((id, rev)),
                Err(e) => Err(e.into()),
            });
        }
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
            return Ok(Err(GatewayError::BadRequest(e.to_string())));
        }
        Ok(Ok((id, rev)))
    }
}

/// The winner among presented leaves: CouchDB's rule (live first, then the
/// highest generation, then the highest id).
pub fn winner(mut presented: Vec<Presented>) -> Option<Presented> {
    presented.sort_by(|a, b| {
        let key = |p: &Presented| (!is_deleted(&p.doc), view::generation(&p.rev), p.rev.clone());
        key(b).cmp(&key(a))
    });
    presented.into_iter().next()
}

fn strip_revisions(mut doc: Value) -> Value {
    if let Some(object) = doc.as_object_mut() {
        object.shift_remove("_revisions");
    }
    doc
}

/// Replaces inline attachments by stubs (the child revision refers to its parent's).
fn stub_attachments(doc: &mut Value) {
    if let Some(atts) = doc.get_mut("_attachments").and_then(Value::as_object_mut) {
        for att in atts.values_mut() {
            if let Some(att) = att.as_object_mut() {
                att.shift_remove("data");
                att.shift_remove("follows");
                att.insert("stub".into(), Value::from(true));
            }
        }
    }
}
