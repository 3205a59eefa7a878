//! Copying a database between any two stores, replication-style.
//!
//! Every revision tree goes across (all leaves with their `_revisions`
//! history, inserted with `new_edits=false`), so conflicts, tombstones and
//! attachments survive and copying out and back in gives the same trees.
//! Progress is checkpointed on the destination in
//! `_local/rewind-copy-<md5 of the source identity>` after each batch, so an
//! interrupted copy resumes where it stopped.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::error::Result;
use crate::types::*;
use crate::{AnyStore, Store, StoreError};

/// Changes read from the source per batch, by default. Larger pages cost a
/// server fewer requests (between two pouchdb-server databases, 1,000 copied
/// 5% faster than 500; 2,000 no faster than 1,000); two are held in memory
/// at a time.
pub const DEFAULT_COPY_BATCH: usize = 1000;

/// Reported after each batch.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyProgress {
    /// Documents read from the source's changes feed so far.
    pub docs_seen: u64,
    /// Revisions the destination lacked and got.
    pub revs_copied: u64,
    /// The source sequence copied up to (checkpointed).
    pub last_seq: Seq,
}

/// The outcome of [`copy`].
#[derive(Debug, Clone, PartialEq)]
pub struct CopyReport {
    /// Where this run started (`0`, or the checkpoint of an interrupted run).
    pub resumed_from: Seq,
    /// Documents read from the source's changes feed by this run.
    pub docs_seen: u64,
    /// Revisions the destination lacked and got in this run.
    pub revs_copied: u64,
    /// `_local` documents copied (embedded sources only; CouchDB cannot list them).
    pub local_copied: u64,
    /// `_local` documents left out: replication checkpoints (their sequences
    /// mean nothing on another database; copying them could make a phone skip
    /// changes), rewind's own copy checkpoints, and anything that is not a
    /// JSON object.
    pub local_skipped: u64,
    /// The source sequence copied up to (checkpointed; `resumed_from` when
    /// there was nothing new).
    pub last_seq: Seq,
}

/// The `_local` id under which a copy from `src` checkpoints on the destination.
pub fn checkpoint_id(src: &AnyStore) -> String {
    format!(
        "_local/rewind-copy-{:x}",
        md5::compute(src.identity().as_bytes())
    )
}

/// One page of `src`'s changes after `since`, every leaf listed; with the
/// winners' bodies when `include_docs`.
async fn read_page(
    src: &AnyStore,
    since: Seq,
    batch: usize,
    include_docs: bool,
) -> Result<Changes> {
    src.changes(&ChangesOptions {
        since,
        limit: Some(batch),
        style_all_docs: true,
        include_docs,
        ..Default::default()
    })
    .await
}

/// Whether the row's document is one live first revision (`1-…`, no other
/// leaf): a revision with no history, whose body in the feed is all a copy
/// needs of it.
fn is_first_revision(row: &ChangeRow) -> bool {
    !row.deleted && matches!(row.changes.as_slice(), [only] if only.rev.starts_with("1-"))
}

/// The revision to write for a row whose body came with the feed, when that
/// body is a whole first revision: no attachment stubs (their data is not in
/// the feed). Its `_revisions` is the revision alone.
fn first_revision(row: &mut ChangeRow) -> Option<Value> {
    if !is_first_revision(row) {
        return None;
    }
    let doc = row.doc.as_ref()?;
    let rev = doc.get("_rev").and_then(Value::as_str)?;
    if rev != row.changes[0].rev || doc.get("_attachments").is_some() {
        return None;
    }
    let hash = rev.strip_prefix("1-")?.to_owned();
    let mut doc = row.doc.take()?;
    doc.as_object_mut()?
        .insert("_revisions".into(), json!({ "start": 1, "ids": [hash] }));
    Some(doc)
}

/// Writes to `dst` the revisions of `rows` it lacks (all of them when
/// `fresh`), fetching from `src` those whose body the feed did not bring.
/// Returns how many revisions were written.
async fn copy_page(
    src: &AnyStore,
    dst: &AnyStore,
    rows: Vec<ChangeRow>,
    fresh: bool,
) -> Result<u64> {
    let mut from_feed: HashMap<(String, String), Value> = HashMap::new();
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for mut row in rows {
        if let Some(doc) = first_revision(&mut row) {
            from_feed.insert((row.id.clone(), row.changes[0].rev.clone()), doc);
        }
        wanted
            .entry(row.id)
            .or_default()
            .extend(row.changes.into_iter().map(|c| c.rev));
    }
    let missing: Vec<(String, String)> = if fresh {
        wanted
            .into_iter()
            .flat_map(|(id, revs)| revs.into_iter().map(move |r| (id.clone(), r)))
            .collect()
    } else {
        dst.revs_diff(wanted)
            .await?
            .into_iter()
            .flat_map(|(id, e)| e.missing.into_iter().map(move |r| (id.clone(), r)))
            .collect()
    };
    let mut docs = Vec::with_capacity(missing.len());
    let mut reqs = Vec::new();
    for key in missing {
        match from_feed.remove(&key) {
            Some(doc) => docs.push(doc),
            None => reqs.push(BulkGetRequest::new(key.0, Some(&key.1))),
        }
    }
    if !reqs.is_empty() {
        let got = src
            .bulk_get(
                reqs,
                BulkGetOptions {
                    revs: true,
                    latest: false,
                    attachments: true,
                },
            )
            .await?;
        // A revision missing at the source was replaced by a newer one
        // since the changes were read; that one comes in a later batch.
        docs.extend(
            got.into_iter()
                .flat_map(|r| r.docs)
                .filter_map(|d| match d {
                    BulkGetItem::Ok(doc) => Some(doc),
                    BulkGetItem::Error(_) => None,
                }),
        );
    }
    if docs.is_empty() {
        return Ok(0);
    }
    let written = docs.len() as u64;
    let failed = dst.bulk_docs(docs, false).await?;
    if let Some(f) = failed.first() {
        return Err(StoreError::Internal(format!(
            "copy: the destination refused document {}: {} {}",
            f.id,
            f.error.as_deref().unwrap_or(""),
            f.reason.as_deref().unwrap_or("")
        )));
    }
    Ok(written)
}

/// Copies everything in `src` that `dst` lacks; see the module docs.
/// `dst` must exist. Safe to run again: known revisions are skipped.
pub async fn copy(
    src: &AnyStore,
    dst: &AnyStore,
    progress: impl FnMut(CopyProgress),
) -> Result<CopyReport> {
    copy_in_batches(src, dst, DEFAULT_COPY_BATCH, progress).await
}

/// [`copy`], reading `batch` changes per page (at least 1), with a
/// checkpoint and a progress report after each.
pub async fn copy_in_batches(
    src: &AnyStore,
    dst: &AnyStore,
    batch: usize,
    mut progress: impl FnMut(CopyProgress),
) -> Result<CopyReport> {
    let batch = batch.max(1);
    let ckpt_id = checkpoint_id(src);
    let (mut since, mut ckpt_rev) = match dst.get_local(&ckpt_id).await {
        Ok(d) => (
            d.get("last_seq").cloned().unwrap_or(Value::from(0)),
            d.get("_rev").and_then(Value::as_str).map(str::to_owned),
        ),
        Err(StoreError::NotFound { .. }) => (Value::from(0), None),
        Err(e) => return Err(e),
    };
    let resumed_from = since.clone();
    // A destination holding no document when the copy begins lacks every
    // revision the source lists: no need to ask it which (`_revs_diff`).
    // Anything written to it meanwhile is harmless: a known revision
    // inserted again is a no-op.
    let info = dst.info().await?;
    let fresh = ckpt_rev.is_none() && info.doc_count == 0 && info.doc_del_count == 0;
    let (mut docs_seen, mut revs_copied) = (0u64, 0u64);
    // Pipelined like a replication: the next page of changes is read while
    // this one is copied (two pages in memory at most).
    let mut pending = read_page(src, since.clone(), batch, true).await;
    loop {
        let changes = pending?;
        if changes.results.is_empty() {
            break;
        }
        // A short page is the feed's end.
        let drained = changes.results.len() < batch;
        // Bodies come with the feed while most documents are first
        // revisions (`first_revision`); otherwise they would be read twice.
        let firsts = changes
            .results
            .iter()
            .filter(|r| is_first_revision(r))
            .count();
        let with_docs = firsts * 2 >= changes.results.len();
        docs_seen += changes.results.len() as u64;
        let next_since = changes.last_seq.clone();
        let (copied, next) = tokio::join!(copy_page(src, dst, changes.results, fresh), async {
            if drained {
                None
            } else {
                Some(read_page(src, next_since.clone(), batch, with_docs).await)
            }
        });
        revs_copied += copied?;
        since = next_since;
        // Checkpoint only after the batch is written: a crash before this line
        // repeats the batch, which is harmless (known revisions are no-ops).
        let mut body = json!({ "last_seq": since, "source": src.identity() });
        if let Some(r) = &ckpt_rev {
            body["_rev"] = Value::from(r.clone());
        }
        ckpt_rev = Some(dst.put_local(&ckpt_id, body).await?);
        progress(CopyProgress {
            docs_seen,
            revs_copied,
            last_seq: since.clone(),
        });
        match next {
            Some(n) => pending = n,
            None => break,
        }
    }
    let (mut local_copied, mut local_skipped) = (0, 0);
    if let AnyStore::Sqlite(s) = src {
        for mut d in s.local_docs().await? {
            let id = d
                .get("_id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let is_checkpoint = id.starts_with("_local/rewind-copy-")
                || (d.get("replicator").is_some()
                    && (d.get("last_seq").is_some() || d.get("history").is_some()));
            if is_checkpoint {
                local_skipped += 1;
                continue;
            }
            let Some(obj) = d.as_object_mut() else {
                // Not a document (the file was written by something else): left out.
                local_skipped += 1;
                continue;
            };
            obj.remove("_rev");
            match dst.get_local(&id).await {
                Ok(cur) => {
                    if let Some(r) = cur.get("_rev") {
                        obj.insert("_rev".into(), r.clone());
                    }
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            dst.put_local(&id, d).await?;
            local_copied += 1;
        }
    }
    Ok(CopyReport {
        resumed_from,
        docs_seen,
        revs_copied,
        local_copied,
        local_skipped,
        last_seq: since,
    })
}
