//! `rewind plan`: what an upgrade or rollback would do, without writing.

use crate::journal::body_hash;
use crate::state::Inspected;
use crate::{EngineError, Result};
use rewind_lens::migration::NoComplements;
use rewind_lens::{MigrationSet, StepOutcome};
use rewind_store::{ChangesOptions, Store};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// One sample change: a document before and after.
#[derive(Debug, Clone, Serialize)]
pub struct SampleDiff {
    /// The document id.
    pub id: String,
    /// The fields that change: `(path, before, after)`; `null` when absent.
    pub fields: Vec<(String, Value, Value)>,
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

fn diff(before: &Value, after: &Value, prefix: &str, out: &mut Vec<(String, Value, Value)>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, bv) in b {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                diff(bv, a.get(k).unwrap_or(&Value::Null), &path, out);
            }
            for (k, av) in a {
                if !b.contains_key(k) {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.push((path, Value::Null, av.clone()));
                }
            }
        }
        (b, a) if b != a => out.push((prefix.to_owned(), b.clone(), a.clone())),
        _ => {}
    }
}

/// Plans a run to `to` (default: the latest version) on `db`; writes nothing.
pub async fn plan(
    db: &Inspected,
    set: &MigrationSet,
    to: Option<u32>,
    batch: usize,
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
                    set.down_step(*version, &mut current, None)
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
                        diff(&before, &current, "", &mut fields);
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
    }
    let _ = NoComplements;
    Ok(plan)
}
