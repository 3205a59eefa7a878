//! Version views: how a stored revision is presented to a client at version k.
//!
//! Invariant: the presentation is a pure function of the stored leaf (with
//! its `_revisions`), the document's journal and the migration set, so two
//! gateways over the same store answer byte for byte the same, and a
//! revision id always denotes one body:
//!
//! - a leaf whose version-k view is its own body is presented as itself;
//! - otherwise rewind walks back the system-written revisions recorded in
//!   the journal (migration, translation, rollback: each an image with the
//!   hash of what it wrote) while the ancestor's version-k view is the same
//!   as the leaf's; an ancestor whose own body *is* that view is presented
//!   as itself (an old phone already holds it, and downloads nothing);
//! - else the view is presented as a synthetic child of that revision, with
//!   the id `{gen+1}-md5(base rev, k, migration-set checksum, view hash)`:
//!   derived from the body, so it can denote nothing else, and any gateway
//!   can recognise it when a phone pushes it back.

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

/// The synthetic child revision of `base` that presents `body` at version `k`.
pub fn synthetic_rev(base: &str, k: u32, checksum: &str, body: &Value) -> String {
    let digest = md5::compute(format!(
        "rewind\n{base}\n{k}\n{checksum}\n{}",
        body_hash(body)
    ));
    format!("{}-{:x}", generation(base) + 1, digest)
}

/// True when `doc` (a pushed revision with `_revisions`) is a synthetic
/// revision this migration set presents at version `k`: a translation going
/// back to where it came from.
pub fn is_synthetic(doc: &Value, k: u32, checksum: &str) -> bool {
    let hist = history(doc);
    match (hist.first(), hist.get(1)) {
        (Some(rev), Some(parent)) => *rev == synthetic_rev(parent, k, checksum, doc),
        _ => false,
    }
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

/// Presents a stored leaf (a document with `_rev` and `_revisions`) to a
/// client at version `k`.
pub fn present(
    set: &MigrationSet,
    checksum: &str,
    leaf: &Value,
    k: u32,
    journal: &Journal,
) -> Result<Presented, LensError> {
    let hist = history(leaf);
    let rev = hist.first().cloned().unwrap_or_default();
    let seen = view(set, leaf, k, journal)?;
    let wanted = body_hash(&seen);
    // Walk back through system-written revisions with the same view: an
    // ancestor that already is the version-k body is what a phone at k holds.
    let mut at = 0usize;
    let mut body = body_of(leaf);
    loop {
        let here = body_hash(&body);
        let step = journal.images.iter().rev().find_map(|image| {
            let pos = hist.iter().skip(at + 1).position(|r| *r == image.rev)?;
            (image.after == here).then_some((at + 1 + pos, image))
        });
        let Some((pos, image)) = step else { break };
        let Ok(previous) = serde_json::from_str::<Value>(&image.body) else { break };
        if body_hash(&view(set, &previous, k, journal)?) != wanted {
            break;
        }
        at = pos;
        body = previous;
    }
    if at == 0 && wanted == body_hash(leaf) {
        return Ok(Presented { rev, doc: leaf.clone(), synthetic: false });
    }
    let base = &hist[at..];
    if at > 0 && body_hash(&body) == wanted {
        return Ok(Presented {
            rev: base[0].clone(),
            doc: with_meta(body, base),
            synthetic: false,
        });
    }
    let synthetic = synthetic_rev(&base[0], k, checksum, &seen);
    let mut chain = vec![synthetic.clone()];
    chain.extend_from_slice(base);
    Ok(Presented {
        rev: synthetic,
        doc: with_meta(body_of(&seen), &chain),
        synthetic: true,
    })
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
