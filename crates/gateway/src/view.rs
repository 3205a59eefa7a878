//! Version views: how a stored revision is presented to a client at version k.
//!
//! Invariant: the presentation is a pure function of the stored leaf (with
//! its `_revisions`), the document's journal and the migration set, so two
//! gateways over the same store answer byte for byte the same, and a
//! revision id always denotes one body:
//!
//! - a document every version sees alike is presented as itself;
//! - otherwise, at every version, as a synthetic child of the stored leaf
//!   carrying that version's view, with the id `{gen+1}-md5(leaf rev,
//!   migration-set checksum, view hash)`: derived from the body, so it can
//!   denote nothing else, and any gateway recognises it when a phone pushes
//!   it back;
//! - next to it, tombstones (`{gen+1}-md5(retired synthetic rev)`) retire the
//!   synthetic children of the leaf's other views and of its recent
//!   ancestors' views: whatever translated copy a phone held, after one pull
//!   it holds exactly one live leaf, the current view.

use rewind_engine::journal::{body_hash, body_of, Journal};
use rewind_lens::{Complements, LensError, MigrationSet};
use serde_json::{json, Value};

/// Reads complements from a journal without changing it.
struct ReadOnly<'a>(&'a Journal);

impl Complements for ReadOnly<'_> {
    fn get(&mut self, version: u32) -> Option<Value> {
        self.0.kept_for(version)
    }
    fn put(&mut self, _: u32, _: Option<Value>) {}
}

/// The version a stored body is at: its stamp, or 0.
pub fn version_of(set: &MigrationSet, doc: &Value) -> u32 {
    set.stamp_of(doc).unwrap_or(0).min(set.latest())
}

/// The body of `doc` as a client at version `k` sees it.
pub fn view(
    set: &MigrationSet,
    doc: &Value,
    k: u32,
    journal: &Journal,
) -> Result<Value, LensError> {
    let mut out = doc.clone();
    if !MigrationSet::is_migratable(doc)
        || doc.get("_deleted").and_then(Value::as_bool) == Some(true)
    {
        return Ok(out);
    }
    let from = version_of(set, doc);
    set.translate(&mut out, from, k, &mut ReadOnly(journal))?;
    Ok(out)
}

/// A revision history as full revision ids, newest first.
pub fn history(doc: &Value) -> Vec<String> {
    let revisions = doc.get("_revisions");
    let start = revisions
        .and_then(|r| r.get("start"))
        .and_then(Value::as_u64);
    let ids = revisions
        .and_then(|r| r.get("ids"))
        .and_then(Value::as_array);
    match (start, ids) {
        (Some(start), Some(ids)) => ids
            .iter()
            .enumerate()
            .filter_map(|(i, id)| {
                id.as_str()
                    .map(|h| format!("{}-{h}", start.saturating_sub(i as u64)))
            })
            .collect(),
        _ => doc
            .get("_rev")
            .and_then(Value::as_str)
            .map(|r| vec![r.to_owned()])
            .unwrap_or_default(),
    }
}

/// The `_revisions` member for a history (newest first).
pub fn revisions_member(history: &[String]) -> Value {
    let start = history.first().map(|r| generation(r)).unwrap_or(0);
    let ids: Vec<&str> = history
        .iter()
        .map(|r| r.split_once('-').map(|(_, h)| h).unwrap_or(r))
        .collect();
    json!({"start": start, "ids": ids})
}

/// The generation of a revision id (`3-abc` → 3).
pub fn generation(rev: &str) -> u64 {
    rev.split_once('-')
        .and_then(|(g, _)| g.parse().ok())
        .unwrap_or(0)
}

/// The synthetic child revision of `base` that presents `body`: derived
/// from the body, so it denotes nothing else, at any version.
pub fn synthetic_rev(base: &str, checksum: &str, body: &Value) -> String {
    let digest = md5::compute(format!("rewind\n{base}\n{checksum}\n{}", body_hash(body)));
    format!("{}-{:x}", generation(base) + 1, digest)
}

/// The tombstone that retires the synthetic revision `synthetic`.
pub fn tombstone_rev(synthetic: &str) -> String {
    let digest = md5::compute(format!("rewind-retired\n{synthetic}"));
    format!("{}-{:x}", generation(synthetic) + 1, digest)
}

/// True when `doc` (a pushed revision with `_revisions`) is a synthetic
/// revision of this migration set: a translation going back where it came from.
pub fn is_synthetic(doc: &Value, checksum: &str) -> bool {
    let hist = history(doc);
    match (hist.first(), hist.get(1)) {
        (Some(rev), Some(parent)) => *rev == synthetic_rev(parent, checksum, doc),
        _ => false,
    }
}

/// True when `doc` is a tombstone that retired a synthetic revision.
pub fn is_retirement(doc: &Value) -> bool {
    let hist = history(doc);
    doc.get("_deleted").and_then(Value::as_bool) == Some(true)
        && matches!((hist.first(), hist.get(1)), (Some(rev), Some(parent)) if *rev == tombstone_rev(parent))
}

/// A revision as presented to a client.
#[derive(Debug, Clone)]
pub struct Presented {
    /// The presented revision id.
    pub rev: String,
    /// The presented document, with `_id`, `_rev` and `_revisions`.
    pub doc: Value,
    /// True when the body differs from what is stored at this revision id.
    pub synthetic: bool,
}

fn with_meta(mut body: Value, history: &[String]) -> Value {
    if let Some(object) = body.as_object_mut() {
        object.shift_remove("_revisions");
        if let Some(rev) = history.first() {
            object.insert("_rev".into(), Value::from(rev.clone()));
        }
        object.insert("_revisions".into(), revisions_member(history));
    }
    body
}

/// The distinct views of a body across every version, by hash, in version order.
fn views(
    set: &MigrationSet,
    body: &Value,
    journal: &Journal,
) -> Result<Vec<(String, Value)>, LensError> {
    let mut out: Vec<(String, Value)> = Vec::new();
    for k in 0..=set.latest() {
        let seen = view(set, body, k, journal)?;
        let hash = body_hash(&seen);
        if !out.iter().any(|(h, _)| *h == hash) {
            out.push((hash, seen));
        }
    }
    Ok(out)
}

/// Tombstones retiring the synthetic children of `base` (a revision with
/// `body` and history `base_history`) for every view except `keep`.
/// What presenting needs besides the revision: the migrations, their
/// checksum and the document's journal.
struct Context<'a> {
    set: &'a MigrationSet,
    checksum: &'a str,
    journal: &'a Journal,
}

fn retirements(
    cx: &Context<'_>,
    id: &Value,
    base_history: &[String],
    body: &Value,
    keep: Option<&str>,
    out: &mut Vec<Presented>,
) -> Result<(), LensError> {
    let all = views(cx.set, body, cx.journal)?;
    let own = body_hash(body);
    if all.iter().all(|(h, _)| *h == own) {
        // Every version sees it alike: it was never presented synthetically.
        return Ok(());
    }
    for (hash, seen) in all {
        if Some(hash.as_str()) == keep {
            continue;
        }
        let synthetic = synthetic_rev(&base_history[0], cx.checksum, &seen);
        let retired = tombstone_rev(&synthetic);
        if out.iter().any(|p| p.rev == retired) {
            continue;
        }
        let mut chain = vec![retired.clone(), synthetic];
        chain.extend_from_slice(base_history);
        let doc = with_meta(json!({"_id": id, "_deleted": true}), &chain);
        out.push(Presented {
            rev: retired,
            doc,
            synthetic: true,
        });
    }
    Ok(())
}

/// Presents a stored leaf (a document with `_rev` and `_revisions`) to a
/// client at version `k`, with `ancestors` (`(rev, body)` of its nearest
/// stored ancestors, where known). A deleted leaf is presented as itself,
/// with the retirements of its ancestors' views.
///
/// A document every version sees alike is presented as itself. Otherwise a
/// client at any version gets a synthetic child of the leaf carrying its
/// view (so a phone holding another version's view, or the leaf itself,
/// always receives a descendant), together with tombstones retiring the
/// synthetic children of the other views of the leaf and of its ancestors:
/// a phone that switches version, or whose translated copy the server moved
/// past, is left with exactly one live leaf after one pull.
pub fn present(
    set: &MigrationSet,
    checksum: &str,
    leaf: &Value,
    k: u32,
    journal: &Journal,
    ancestors: &[(String, Value)],
) -> Result<Vec<Presented>, LensError> {
    let cx = Context {
        set,
        checksum,
        journal,
    };
    let hist = history(leaf);
    let rev = hist.first().cloned().unwrap_or_default();
    let id = leaf.get("_id").cloned().unwrap_or(Value::Null);
    let mut out = Vec::new();
    let deleted = leaf.get("_deleted").and_then(Value::as_bool) == Some(true);
    let all = if deleted {
        Vec::new()
    } else {
        views(set, leaf, journal)?
    };
    let own = body_hash(leaf);
    if deleted || all.iter().all(|(h, _)| *h == own) {
        out.push(Presented {
            rev,
            doc: leaf.clone(),
            synthetic: false,
        });
    } else {
        let seen = view(set, leaf, k, journal)?;
        let wanted = body_hash(&seen);
        let synthetic = synthetic_rev(&rev, checksum, &seen);
        let mut chain = vec![synthetic.clone()];
        chain.extend_from_slice(&hist);
        out.push(Presented {
            rev: synthetic,
            doc: with_meta(body_of(&seen), &chain),
            synthetic: true,
        });
        retirements(&cx, &id, &hist, leaf, Some(&wanted), &mut out)?;
    }
    for (rev, body) in ancestors {
        if let Some(pos) = hist.iter().position(|r| r == rev) {
            retirements(&cx, &id, &hist[pos..], body, None, &mut out)?;
        }
    }
    Ok(out)
}

/// True when `leaf` was written by rewind (a migration, translation or
/// rollback) on top of one of `ancestors`, with no human edit in between:
/// a human edit on such an ancestor wins over it.
pub fn is_system_descendant(leaf: &Value, ancestors: &[String], journal: &Journal) -> bool {
    let hist = history(leaf);
    let mut here = body_hash(leaf);
    let mut at = 0usize;
    for _ in 0..=journal.images.len() {
        let step = journal.images.iter().rev().find_map(|image| {
            let pos = hist.iter().skip(at + 1).position(|r| *r == image.rev)?;
            (image.after == here).then_some((at + 1 + pos, image))
        });
        let Some((pos, image)) = step else {
            return false;
        };
        if ancestors.contains(&image.rev) {
            return true;
        }
        let Ok(previous) = serde_json::from_str::<Value>(&image.body) else {
            return false;
        };
        here = body_hash(&previous);
        at = pos;
    }
    false
}
