//! Copying a database between any two stores, replication-style.
//!
//! Every revision tree goes across (all leaves with their `_revisions`
//! history, inserted with `new_edits=false`), so conflicts, tombstones and
//! attachments survive and copying out and back in gives the same trees.
//! Progress is checkpointed on the destination in
//! `_local/rewind-copy-<md5 of the source identity>` after each batch, so an
//! interrupted copy resumes where it stopped.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::error::Result;
use crate::types::*;
use crate::{AnyStore, Store, StoreError};

/// Changes read from the source per batch.
const BATCH: usize = 200;

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
    pub docs_seen: u64,
    pub revs_copied: u64,
    /// `_local` documents copied (embedded sources only; CouchDB cannot list them).
    pub local_copied: u64,
    /// `_local` documents left out: replication checkpoints (their sequences
    /// mean nothing on another database; copying them could make a phone skip
    /// changes), rewind's own copy checkpoints, and anything that is not a
    /// JSON object.
    pub local_skipped: u64,
    pub last_seq: Seq,
}

/// The `_local` id under which a copy from `src` checkpoints on the destination.
pub fn checkpoint_id(src: &AnyStore) -> String {
    format!(
        "_local/rewind-copy-{:x}",
        md5::compute(src.identity().as_bytes())
    )
}

/// Copies everything in `src` that `dst` lacks; see the module docs.
/// `dst` must exist. Safe to run again: known revisions are skipped.
pub async fn copy(
    src: &AnyStore,
    dst: &AnyStore,
    mut progress: impl FnMut(CopyProgress),
) -> Result<CopyReport> {
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
    let (mut docs_seen, mut revs_copied) = (0u64, 0u64);
    loop {
        let opts = ChangesOptions {
            since: since.clone(),
            limit: Some(BATCH),
            style_all_docs: true,
            ..Default::default()
        };
        let changes = src.changes(&opts).await?;
        if changes.results.is_empty() {
            break;
        }
        docs_seen += changes.results.len() as u64;
        let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in &changes.results {
            wanted
                .entry(row.id.clone())
                .or_default()
                .extend(row.changes.iter().map(|c| c.rev.clone()));
        }
        let diff = dst.revs_diff(wanted).await?;
        let reqs: Vec<BulkGetRequest> = diff
            .iter()
            .flat_map(|(id, e)| {
                e.missing
                    .iter()
                    .map(move |r| BulkGetRequest::new(id.clone(), Some(r)))
            })
            .collect();
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
            let docs: Vec<Value> = got
                .into_iter()
                .flat_map(|r| r.docs)
                .filter_map(|d| match d {
                    BulkGetItem::Ok(doc) => Some(doc),
                    BulkGetItem::Error(_) => None,
                })
                .collect();
            revs_copied += docs.len() as u64;
            let failed = dst.bulk_docs(docs, false).await?;
            if let Some(f) = failed.first() {
                return Err(StoreError::Internal(format!(
                    "copy: the destination refused document {}: {} {}",
                    f.id,
                    f.error.as_deref().unwrap_or(""),
                    f.reason.as_deref().unwrap_or("")
                )));
            }
        }
        since = changes.last_seq.clone();
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
