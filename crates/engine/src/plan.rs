//! `rewind plan`: what an upgrade or rollback would do, without writing.

use crate::journal::body_hash;
use crate::run::read_journals;
use crate::state::Inspected;
use crate::{EngineError, Result};
use rewind_lens::{MigrationSet, StepOutcome};
use rewind_store::{ChangesOptions, Store};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// One sample change: a document before and after.
#[derive(Debug, Clone, Serialize)]
pub struct SampleDiff {
    /// The document id.
    pub id: String,
    /// The fields that change: `(path, before, after)`; `None` (`null` in
    /// JSON) when absent.
    pub fields: Vec<(String, Option<Value>, Option<Value>)>,
}

/// The plan of one migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationPlan {
    /// The migration id.
    pub id: String,
    /// Documents it rewrites, by `type`.
    pub by_type: BTreeMap<String, u64>,
    /// Up to three sample diffs.
    pub samples: Vec<SampleDiff>,
}

/// The plan of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    /// The database's version now.
    pub from: u32,
    /// The version planned.
    pub to: u32,
    /// Documents read.
    pub docs: u64,
    /// Documents that would be rewritten.
    pub rewritten: u64,
    /// Bytes of the rewritten documents.
    pub bytes: u64,
    /// Per migration, in the order they would run.
    pub migrations: Vec<MigrationPlan>,
}

/// The changes from `before` to `after` (`None`: absent), as
/// [`SampleDiff::fields`]: members of two objects one by one, anything
/// else whole.
fn diff(
    before: Option<&Value>,
    after: Option<&Value>,
    prefix: &str,
    out: &mut Vec<(String, Option<Value>, Option<Value>)>,
) {
    let path = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (before, after) {
        (Some(Value::Object(b)), Some(Value::Object(a))) => {
            for (k, bv) in b {
                diff(Some(bv), a.get(k), &path(k), out);
            }
            for (k, av) in a.iter().filter(|(k, _)| !b.contains_key(*k)) {
                diff(None, Some(av), &path(k), out);
            }
        }
        (b, a) if b != a => out.push((prefix.to_owned(), b.cloned(), a.cloned())),
        _ => {}
    }
}

/// Plans a run to `to` (default: the latest version) on `db`, reading
/// `batch` documents at a time and calling `progress` with the documents
/// read so far after each batch; writes nothing.
pub async fn plan(
    db: &Inspected,
    set: &MigrationSet,
    to: Option<u32>,
    batch: usize,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Plan> {
    let state = &db.state;
    state.verify(set)?;
    let to = to.unwrap_or(set.latest());
    if to > set.latest() {
        return Err(EngineError::Refused(format!(
            "version {to} does not exist: the migrations go from 0 to {}",
            set.latest()
        )));
    }
    let from = state.version;
    let versions: Vec<u32> = if to >= from {
        (from + 1..=to).collect()
    } else {
        (to + 1..=from).rev().collect()
    };
    let mut plan = Plan {
        from,
        to,
        migrations: versions
            .iter()
            .map(|v| MigrationPlan {
                id: set.migrations()[*v as usize - 1].id.clone(),
                ..MigrationPlan::default()
            })
            .collect(),
        ..Plan::default()
    };
    let mut since = Value::from(0);
    loop {
        let changes = db
            .data
            .changes(&ChangesOptions {
                since: since.clone(),
                limit: Some(batch),
                include_docs: true,
                ..ChangesOptions::default()
            })
            .await?;
        if changes.results.is_empty() {
            break;
        }
        // A rollback translates down with the complements the journals
        // kept (what the real one restores), not with the steps' defaults.
        let journals = match (&db.companion, to < from) {
            (Some(companion), true) => {
                let ids: Vec<String> = changes.results.iter().map(|r| r.id.clone()).collect();
                read_journals(companion, &ids).await?
            }
            _ => HashMap::new(),
        };
        for row in &changes.results {
            let Some(doc) = &row.doc else { continue };
            if row.deleted {
                continue;
            }
            plan.docs += 1;
            let ty = doc
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("(none)")
                .to_owned();
            let mut current = doc.clone();
            for (index, version) in versions.iter().enumerate() {
                let before = current.clone();
                let outcome = if to >= from {
                    set.up_step(*version, &mut current, None)
                } else {
                    let kept = journals.get(&row.id).and_then(|j| j.kept_for(*version));
                    set.down_step(*version, &mut current, kept.as_ref())
                }
                .map_err(|source| EngineError::Lens {
                    id: row.id.clone(),
                    source,
                })?;
                if let StepOutcome::Applied(_) = outcome {
                    let m = &mut plan.migrations[index];
                    *m.by_type.entry(ty.clone()).or_default() += 1;
                    if m.samples.len() < 3 {
                        let mut fields = Vec::new();
                        diff(Some(&before), Some(&current), "", &mut fields);
                        m.samples.push(SampleDiff {
                            id: row.id.clone(),
                            fields,
                        });
                    }
                }
            }
            if body_hash(&current) != body_hash(doc) {
                plan.rewritten += 1;
                plan.bytes += current.to_string().len() as u64;
            }
        }
        since = changes.last_seq;
        progress(plan.docs);
    }
    Ok(plan)
}
