//! One-shot replication and two-way sync, following PouchDB 9's protocol
//! (shared/baseline/TRACE.md): per batch, `_changes?style=all_docs&limit=N`
//! on the source, `_revs_diff` on the target, `_bulk_get?revs=true&latest=true`
//! on the source, `_bulk_docs` with `new_edits=false` on the target, then a
//! checkpoint `_local/{replication id}` on both sides.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rewind_store::{
    redact_url, AnyStore, BulkGetItem, BulkGetOptions, BulkGetRequest, ChangeRow, Changes,
    ChangesOptions, Seq, Store, StoreError,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{ReplicateError, Result};

/// PouchDB's default `batch_size`.
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// How many replication sessions a checkpoint remembers (PouchDB keeps 5).
const HISTORY_LEN: usize = 5;

/// Failed writes listed one by one in a report; the rest are only counted.
const MAX_LISTED_FAILURES: usize = 100;

/// Options of [`replicate`] and [`sync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicateOptions {
    /// Changes read from the source per batch (PouchDB's `batch_size`, 100).
    /// At most two batches are held in memory at a time.
    pub batch_size: usize,
    /// Mixed into the replication id with both stores' identities. Pass the
    /// remote server's `uuid` (see [`crate::remote_uuid`]): rewind's gateway
    /// answers a different uuid per schema version, so a client that switches
    /// version gets a new replication id and rescans from `since=0`, as
    /// PouchDB does.
    pub checkpoint_key: String,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            checkpoint_key: String::new(),
        }
    }
}

/// A revision the target refused (`forbidden` or `unauthorized`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteFailure {
    /// The refused document's `_id`.
    pub id: String,
    /// The target's error name: `forbidden` or `unauthorized`.
    pub error: String,
    /// The target's reason (e.g. the validation function's message).
    pub reason: String,
}

/// What one [`replicate`] run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicationReport {
    /// md5 hex of source identity + target identity + checkpoint key; the
    /// checkpoint lives at `_local/{replication_id}` on both sides.
    pub replication_id: String,
    /// The source, credentials removed.
    pub source: String,
    /// The target, credentials removed.
    pub target: String,
    /// Where this run started: the agreed checkpoint, or `0`.
    pub start_seq: Seq,
    /// The source sequence replicated up to (checkpointed on both sides).
    pub last_seq: Seq,
    /// Change rows read from the source's feed (one per document per batch).
    pub docs_read: u64,
    /// Revisions written to the target (those it lacked).
    pub docs_written: u64,
    /// Revisions the target refused for access reasons; see `failures`.
    pub doc_write_failures: u64,
    /// The first refusals, at most 100.
    pub failures: Vec<WriteFailure>,
    /// Approximate bytes fetched from the source: the JSON length of every
    /// document `_bulk_get` returned (attachment data included, base64).
    pub bytes_downloaded: u64,
    /// Batches read from the changes feed that held at least one change.
    pub batches: u64,
    /// Wall-clock time of the run.
    #[serde(rename = "elapsed_ms", serialize_with = "as_millis")]
    pub elapsed: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// What one [`sync`] did: a pull, then a push.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncReport {
    /// remote → local.
    pub pull: ReplicationReport,
    /// local → remote.
    pub push: ReplicationReport,
}

/// Pulls `remote` into `local`, then pushes `local` to `remote`, like a
/// phone's `PouchDB.sync` run to completion once.
pub async fn sync(
    local: &AnyStore,
    remote: &AnyStore,
    opts: &ReplicateOptions,
) -> Result<SyncReport> {
    let pull = replicate(remote, local, opts).await?;
    let push = replicate(local, remote, opts).await?;
    Ok(SyncReport { pull, push })
}

/// The replication id of `source` → `target` with this checkpoint key.
pub fn replication_id(source: &AnyStore, target: &AnyStore, checkpoint_key: &str) -> String {
    let key = format!(
        "{}{}{}",
        source.identity(),
        target.identity(),
        checkpoint_key
    );
    format!("{:x}", md5::compute(key.as_bytes()))
}

/// The two ends of a replication, named for error messages.
struct Ends<'a> {
    source: &'a AnyStore,
    target: &'a AnyStore,
    source_name: String,
    target_name: String,
}

impl Ends<'_> {
    fn name(&self) -> String {
        format!("{} -> {}", self.source_name, self.target_name)
    }

    fn err(&self, step: impl Into<String>) -> impl FnOnce(StoreError) -> ReplicateError + '_ {
        let step = step.into();
        move |error| ReplicateError::Store {
            replication: self.name(),
            step,
            error: Box::new(error),
        }
    }
}

/// Replicates every revision `source` has and `target` lacks (all leaves:
/// conflicts and tombstones included), resuming from the checkpoint both
/// sides agree on, and checkpointing after each batch.
///
/// Safe to interrupt at any point: a batch whose checkpoint was not written
/// is replicated again next time, and re-inserting known revisions is a no-op.
pub async fn replicate(
    source: &AnyStore,
    target: &AnyStore,
    opts: &ReplicateOptions,
) -> Result<ReplicationReport> {
    let started = Instant::now();
    let ends = Ends {
        source,
        target,
        source_name: redact_url(&source.identity()),
        target_name: redact_url(&target.identity()),
    };
    let rep_id = replication_id(source, target, &opts.checkpoint_key);
    let batch_size = opts.batch_size.max(1);
    let mut ckpt = Checkpointer::read(&ends, &rep_id).await?;
    let start_seq = ckpt.start_seq();
    let mut report = ReplicationReport {
        replication_id: rep_id,
        source: ends.source_name.clone(),
        target: ends.target_name.clone(),
        start_seq: start_seq.clone(),
        last_seq: start_seq.clone(),
        docs_read: 0,
        docs_written: 0,
        doc_write_failures: 0,
        failures: Vec::new(),
        bytes_downloaded: 0,
        batches: 0,
        elapsed: Duration::ZERO,
    };

    let mut pending = read_changes(&ends, start_seq, batch_size).await;
    loop {
        let changes = pending?;
        if changes.results.is_empty() {
            break;
        }
        // Fewer rows than asked for: the feed is drained (PouchDB stops here too).
        let drained = changes.results.len() < batch_size;
        let next_since = changes.last_seq.clone();
        // Pipeline like PouchDB: read the next page of changes while this
        // batch is fetched and written. Memory stays at two batches.
        let (written, next) = tokio::join!(transfer(&ends, &changes.results, &mut report), async {
            if drained {
                None
            } else {
                Some(read_changes(&ends, next_since.clone(), batch_size).await)
            }
        });
        written?;
        report.batches += 1;
        report.docs_read += changes.results.len() as u64;
        // Checkpoint only after the batch is on the target: a crash before
        // this line replays the batch, which is harmless.
        ckpt.write(&ends, &next_since).await?;
        report.last_seq = next_since;
        match next {
            Some(n) => pending = n,
            None => break,
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn read_changes(ends: &Ends<'_>, since: Seq, limit: usize) -> Result<Changes> {
    let opts = ChangesOptions {
        since: since.clone(),
        limit: Some(limit),
        style_all_docs: true,
        ..Default::default()
    };
    ends.source
        .changes(&opts)
        .await
        .map_err(ends.err(format!("reading the source's changes since {since}")))
}

/// Moves the revisions of one batch of change rows that the target lacks.
async fn transfer(
    ends: &Ends<'_>,
    rows: &[ChangeRow],
    report: &mut ReplicationReport,
) -> Result<()> {
    let mut leaves: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in rows {
        leaves
            .entry(row.id.clone())
            .or_default()
            .extend(row.changes.iter().map(|c| c.rev.clone()));
    }
    let diff = ends
        .target
        .revs_diff(leaves)
        .await
        .map_err(ends.err("asking the target which revisions it lacks (_revs_diff)"))?;
    let reqs: Vec<BulkGetRequest> = diff
        .iter()
        .flat_map(|(id, e)| {
            e.missing
                .iter()
                .map(move |r| BulkGetRequest::new(id.clone(), Some(r)))
        })
        .collect();
    if reqs.is_empty() {
        return Ok(());
    }
    let plain = BulkGetOptions {
        revs: true,
        latest: true,
        attachments: false,
    };
    let (mut docs, with_stubs) = fetch(ends, reqs, plain, report).await?;
    if !with_stubs.is_empty() {
        // Attachments come as stubs; fetch those revisions again with the
        // data inline so the target gets the bytes, not a reference to
        // something it may not have. (PouchDB fetches each attachment with
        // its own GET instead; one request per batch is cheaper.)
        let (inline, still_stubbed) = fetch(
            ends,
            with_stubs,
            BulkGetOptions {
                attachments: true,
                ..plain
            },
            report,
        )
        .await?;
        if let Some(r) = still_stubbed.first() {
            return Err(ReplicateError::Fetch {
                replication: ends.name(),
                id: r.id.clone(),
                rev: r.rev.clone().unwrap_or_default(),
                error: "attachment_stub".into(),
                reason: "the source answered a stub when asked for attachment data".into(),
            });
        }
        docs.extend(inline);
    }
    // `latest=true` can resolve two requested revisions to the same leaf.
    let mut seen = HashSet::new();
    docs.retain(|d| seen.insert((str_of(d, "_id"), str_of(d, "_rev"))));
    let n = docs.len() as u64;
    let failed = ends
        .target
        .bulk_docs(docs, false)
        .await
        .map_err(ends.err("writing revisions to the target (_bulk_docs new_edits=false)"))?;
    for f in &failed {
        let error = f.error.clone().unwrap_or_default();
        if error == "forbidden" || error == "unauthorized" {
            report.doc_write_failures += 1;
            if report.failures.len() < MAX_LISTED_FAILURES {
                report.failures.push(WriteFailure {
                    id: f.id.clone(),
                    error,
                    reason: f.reason.clone().unwrap_or_default(),
                });
            }
        } else {
            return Err(ReplicateError::Refused {
                replication: ends.name(),
                id: f.id.clone(),
                error,
                reason: f.reason.clone().unwrap_or_default(),
            });
        }
    }
    report.docs_written += n.saturating_sub(failed.len() as u64);
    Ok(())
}

/// `_bulk_get` on the source. Returns the documents, and separately the
/// revisions that came back with attachment stubs (not in the first list).
async fn fetch(
    ends: &Ends<'_>,
    reqs: Vec<BulkGetRequest>,
    opts: BulkGetOptions,
    report: &mut ReplicationReport,
) -> Result<(Vec<Value>, Vec<BulkGetRequest>)> {
    let results = ends
        .source
        .bulk_get(reqs, opts)
        .await
        .map_err(ends.err("fetching revisions from the source (_bulk_get)"))?;
    let mut docs = Vec::new();
    let mut stubbed = Vec::new();
    for r in results {
        for item in r.docs {
            match item {
                BulkGetItem::Ok(doc) => {
                    report.bytes_downloaded += rewind_store::json_len(&doc);
                    if has_stubs(&doc) {
                        stubbed.push(BulkGetRequest::new(
                            str_of(&doc, "_id"),
                            Some(&str_of(&doc, "_rev")),
                        ));
                    } else {
                        docs.push(doc);
                    }
                }
                BulkGetItem::Error(e) => {
                    return Err(ReplicateError::Fetch {
                        replication: ends.name(),
                        id: e.id,
                        rev: e.rev,
                        error: e.error,
                        reason: e.reason,
                    })
                }
            }
        }
    }
    Ok((docs, stubbed))
}

fn has_stubs(doc: &Value) -> bool {
    doc.get("_attachments")
        .and_then(Value::as_object)
        .is_some_and(|atts| {
            atts.values()
                .any(|a| a.get("stub").and_then(Value::as_bool) == Some(true))
        })
}

fn str_of(doc: &Value, key: &str) -> String {
    doc.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The checkpoint of one side: the document as last read or written.
struct Side {
    doc: Option<Value>,
    /// False when the side refused to let us read or write checkpoints
    /// (a read-only source, as PouchDB tolerates).
    writable: bool,
}

/// Reads and writes `_local/{replication id}` on both sides, with PouchDB's
/// document shape (`last_seq`, `session_id`, `history`, `replicator`,
/// `version`), so a checkpoint is understood by whichever side reads it.
struct Checkpointer {
    id: String,
    session_id: String,
    source: Side,
    target: Side,
}

impl Checkpointer {
    async fn read(ends: &Ends<'_>, rep_id: &str) -> Result<Checkpointer> {
        let id = format!("_local/{rep_id}");
        let (source, target) = tokio::join!(
            read_side(ends, ends.source, &id, true),
            read_side(ends, ends.target, &id, false)
        );
        let (source, target) = (source?, target?);
        Ok(Checkpointer {
            session_id: new_session_id(rep_id),
            id,
            source,
            target,
        })
    }

    /// The sequence both sides agree was replicated, else `0`.
    fn start_seq(&self) -> Seq {
        match (&self.source.doc, &self.target.doc) {
            (_, None) => Value::from(0),
            (None, Some(t)) if !self.source.writable => {
                t.get("last_seq").cloned().unwrap_or(0.into())
            }
            (None, Some(_)) => Value::from(0),
            (Some(s), Some(t)) => compare_logs(s, t),
        }
    }

    /// Records `seq` on the target, then on the source. A crash between the
    /// two leaves the sides disagreeing on the session; [`compare_logs`]
    /// then falls back to the previous common session, so the next run
    /// replays at most a little, never skips.
    async fn write(&mut self, ends: &Ends<'_>, seq: &Seq) -> Result<()> {
        let (id, session) = (self.id.clone(), self.session_id.clone());
        write_side(ends, false, &mut self.target, &id, &session, seq).await?;
        if self.source.writable {
            write_side(ends, true, &mut self.source, &id, &session, seq).await?;
        }
        Ok(())
    }
}

async fn read_side(ends: &Ends<'_>, store: &AnyStore, id: &str, is_source: bool) -> Result<Side> {
    match store.get_local(id).await {
        Ok(doc) => Ok(Side {
            doc: Some(doc),
            writable: true,
        }),
        Err(StoreError::NotFound { .. }) => Ok(Side {
            doc: None,
            writable: true,
        }),
        Err(StoreError::Forbidden { .. } | StoreError::Unauthorized { .. }) if is_source => {
            Ok(Side {
                doc: None,
                writable: false,
            })
        }
        Err(e) => Err(ends.err(format!("reading checkpoint {id}"))(e)),
    }
}

async fn write_side(
    ends: &Ends<'_>,
    is_source: bool,
    side: &mut Side,
    id: &str,
    session: &str,
    seq: &Seq,
) -> Result<()> {
    let store = if is_source { ends.source } else { ends.target };
    let mut body = side.doc.clone().unwrap_or_else(|| json!({}));
    let mut history: Vec<Value> = body
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    history.retain(|h| h.get("session_id").and_then(Value::as_str) != Some(session));
    history.insert(0, json!({ "last_seq": seq, "session_id": session }));
    history.truncate(HISTORY_LEN);
    let obj = body.as_object_mut().expect("checkpoint is an object");
    obj.insert("_id".into(), id.into());
    obj.insert("last_seq".into(), seq.clone());
    obj.insert("session_id".into(), session.into());
    obj.insert("history".into(), history.into());
    obj.insert("replicator".into(), "rewind".into());
    obj.insert("version".into(), 1.into());
    let mut attempt = 0;
    loop {
        match store.put_local(id, body.clone()).await {
            Ok(rev) => {
                body["_rev"] = rev.into();
                side.doc = Some(body);
                return Ok(());
            }
            // Someone else (another run of the same replication) moved the
            // checkpoint; take its revision and write ours over it once.
            Err(StoreError::Conflict { .. }) if attempt == 0 => {
                attempt += 1;
                match store.get_local(id).await {
                    Ok(cur) => match cur.get("_rev") {
                        Some(r) => body["_rev"] = r.clone(),
                        None => {
                            body.as_object_mut().map(|o| o.remove("_rev"));
                        }
                    },
                    Err(StoreError::NotFound { .. }) => {
                        body.as_object_mut().map(|o| o.remove("_rev"));
                    }
                    Err(e) => return Err(ends.err(format!("re-reading checkpoint {id}"))(e)),
                }
            }
            Err(StoreError::Forbidden { .. } | StoreError::Unauthorized { .. }) if is_source => {
                side.writable = false;
                return Ok(());
            }
            Err(e) => return Err(ends.err(format!("writing checkpoint {id}"))(e)),
        }
    }
}

/// PouchDB's `compareReplicationLogs`: the same session on both sides means
/// both saw the same last write; otherwise the newest session both
/// histories share, else `0`.
fn compare_logs(src: &Value, tgt: &Value) -> Seq {
    let session = |d: &Value| {
        d.get("session_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if session(src).is_some() && session(src) == session(tgt) {
        return src.get("last_seq").cloned().unwrap_or(0.into());
    }
    let history = |d: &Value| -> Vec<Value> {
        d.get("history")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    compare_history(&history(src), &history(tgt))
}

fn compare_history(src: &[Value], tgt: &[Value]) -> Seq {
    let sid = |h: &Value| {
        h.get("session_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let has = |hist: &[Value], s: &Option<String>| s.is_some() && hist.iter().any(|h| sid(h) == *s);
    let (Some(s), Some(t)) = (src.first(), tgt.first()) else {
        return Value::from(0);
    };
    if has(tgt, &sid(s)) {
        return s.get("last_seq").cloned().unwrap_or(0.into());
    }
    if has(&src[1..], &sid(t)) {
        return t.get("last_seq").cloned().unwrap_or(0.into());
    }
    compare_history(&src[1..], &tgt[1..])
}

/// A session id unique to this run of this replication.
fn new_session_id(rep_id: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!(
        "{rep_id}:{}:{nanos}:{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    format!("{:x}", md5::compute(seed.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(session: &str, seq: u64, history: &[(&str, u64)]) -> Value {
        json!({
            "session_id": session,
            "last_seq": seq,
            "history": history.iter().map(|(s, q)| json!({"session_id": s, "last_seq": q})).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn the_same_session_on_both_sides_resumes_from_the_source_seq() {
        let a = log("s2", 40, &[("s2", 40), ("s1", 10)]);
        assert_eq!(compare_logs(&a, &a), json!(40));
    }

    #[test]
    fn a_checkpoint_written_only_on_the_target_falls_back_to_the_common_session() {
        let src = log("s1", 10, &[("s1", 10)]);
        let tgt = log("s2", 40, &[("s2", 40), ("s1", 10)]);
        assert_eq!(compare_logs(&src, &tgt), json!(10));
        assert_eq!(compare_logs(&tgt, &src), json!(10));
    }

    #[test]
    fn unrelated_histories_start_over() {
        let src = log("a", 10, &[("a", 10)]);
        let tgt = log("b", 40, &[("b", 40)]);
        assert_eq!(compare_logs(&src, &tgt), json!(0));
    }

    #[test]
    fn stubs_are_detected_and_inline_data_is_not_a_stub() {
        assert!(has_stubs(
            &json!({"_attachments": {"a": {"stub": true, "digest": "md5-x"}}})
        ));
        assert!(!has_stubs(
            &json!({"_attachments": {"a": {"data": "aGk="}}})
        ));
        assert!(!has_stubs(&json!({"x": 1})));
    }
}
