//! The round-trip laws, checked on sample documents and on generated ones.
//!
//! For every migration `m` and document `d` at version `m - 1`:
//! - down(up(d)) = d, byte for byte, with the complement `up` kept;
//! - if `m` applies to `d`, then for `n = up(d)` (a document in the new
//!   shape) up(down(n)) = n, with no complement from before (as for a
//!   document created at the new version) but with what `down` kept;
//! - a complement hides no edit: a leaf of `n` changed and translated down
//!   with `up`'s complement, or a leaf of `down(n)` changed and translated
//!   up with what `down` kept, does not give back the unedited document's
//!   translation when, without the complement, the edit would show.
//!
//! Generated documents are shaped by the migration's selectors and
//! operations: the fields they test or touch, filled with the literals they
//! mention and a few others, found and shrunk by proptest.

use crate::migration::{MigrationSet, NoComplements, StepOutcome};
use crate::ops::Op;
use crate::path::FieldPath;
use crate::selector::Selector;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Value};

/// A broken law: which document, which law, what was expected and found.
#[derive(Debug, Clone)]
pub struct LawBroken {
    /// The document's `_id`, or `generated` for a generated document.
    pub doc_id: String,
    /// The law, e.g. `down(up(doc)) = doc`.
    pub law: &'static str,
    /// The document the law was checked on.
    pub input: String,
    /// What the law says the result should be.
    pub expected: String,
    /// What it was.
    pub found: String,
}

/// The laws checked for one migration.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// Sample documents checked at this migration's input version.
    pub sample_docs: usize,
    /// Of those, how many the migration applies to.
    pub sample_applied: usize,
    /// Generated documents checked.
    pub generated_docs: usize,
    /// Of those, how many the migration applies to.
    pub generated_applied: usize,
    /// Broken laws (at most a few are kept per migration).
    pub broken: Vec<LawBroken>,
}

const KEEP_BROKEN: usize = 3;

fn text(doc: &Value) -> String {
    serde_json::to_string(doc).unwrap_or_default()
}

fn id_of(doc: &Value) -> String {
    doc.get("_id")
        .and_then(Value::as_str)
        .unwrap_or("generated")
        .to_owned()
}

/// Checks both laws for migration `version` on `doc` (at `version - 1`).
/// Returns whether the migration applied, or the broken law.
pub fn check_step(set: &MigrationSet, version: u32, doc: &Value) -> Result<bool, LawBroken> {
    let broken = |law, expected: &Value, found: String| LawBroken {
        doc_id: id_of(doc),
        law,
        input: text(doc),
        expected: text(expected),
        found,
    };
    let mut up = doc.clone();
    let outcome = set
        .up_step(version, &mut up, None)
        .map_err(|e| broken("up(doc) succeeds", doc, e.to_string()))?;
    let StepOutcome::Applied(complement) = outcome else {
        return Ok(false);
    };
    let mut back = up.clone();
    set.down_step(version, &mut back, complement.as_ref())
        .map_err(|e| broken("down(up(doc)) = doc", doc, e.to_string()))?;
    if text(&back) != text(doc) {
        return Err(broken("down(up(doc)) = doc", doc, text(&back)));
    }
    let mut down = up.clone();
    let kept = set
        .down_step(version, &mut down, None)
        .map_err(|e| broken("up(down(new)) = new", &up, e.to_string()))?;
    let kept = match kept {
        StepOutcome::Applied(kept) => kept,
        StepOutcome::Skipped => {
            return Err(LawBroken {
                doc_id: id_of(doc),
                law: "when_after matches what up produced",
                input: text(&up),
                expected: "the migration's when_after to match".into(),
                found: "it does not match".into(),
            })
        }
    };
    let mut again = down.clone();
    set.up_step(version, &mut again, kept.as_ref())
        .map_err(|e| broken("up(down(new)) = new", &up, e.to_string()))?;
    if text(&again) != text(&up) {
        return Err(LawBroken {
            doc_id: id_of(doc),
            law: "up(down(new)) = new",
            input: text(&up),
            expected: text(&up),
            found: text(&again),
        });
    }
    let stamp = set.stamp_field();
    let down_of = |n: &Value, kept: Option<&Value>| {
        let mut n = n.clone();
        set.down_step(version, &mut n, kept).ok().map(|_| n)
    };
    let up_of = |o: &Value, kept: Option<&Value>| {
        let mut o = o.clone();
        set.up_step(version, &mut o, kept).ok().map(|_| o)
    };
    if let Some(edited) = hidden_edit(&up, doc, stamp, complement.as_ref(), down_of) {
        return Err(LawBroken {
            doc_id: id_of(doc),
            law: LAW_EDIT_NEW,
            input: text(&edited),
            expected: "the edit, translated down (as without the complement)".into(),
            found: format!("{} (the document before the edit)", text(doc)),
        });
    }
    // In the old shape: `n` gone down, and a few documents typed in the
    // new shape that going down keeps something for (what the old shape
    // cannot hold as is), each edited there and taken up again.
    let typed_new = std::iter::once(up.clone()).chain(edits(&up, doc, stamp));
    let kept_going_down = typed_new.filter_map(|n| {
        let mut o = n.clone();
        match set.down_step(version, &mut o, None) {
            Ok(StepOutcome::Applied(Some(k))) => Some((n, o, k)),
            _ => None,
        }
    });
    for (n, o, k) in kept_going_down.take(MAX_TYPED_NEW) {
        if let Some(edited) = hidden_edit(&o, &n, stamp, Some(&k), up_of) {
            return Err(LawBroken {
                doc_id: id_of(doc),
                law: LAW_EDIT_OLD,
                input: text(&edited),
                expected: "the edit, translated up (as without the complement)".into(),
                found: format!("{} (the document before the edit)", text(&n)),
            });
        }
    }
    Ok(true)
}

/// How many documents typed in the new shape the old-shape edit law starts
/// from, per document checked.
const MAX_TYPED_NEW: usize = 4;

/// The law that a complement never hides an edit made in the new shape.
pub const LAW_EDIT_NEW: &str = "an edit in the new shape survives going down with the complement";
/// The law that a complement never hides an edit made in the old shape.
pub const LAW_EDIT_OLD: &str = "an edit in the old shape survives going up with the complement";

/// The first edit of `doc` (one leaf value changed) that translating with
/// `kept` hides: the result equals that of the unedited document, though
/// without the complement the two differ. A complement refines what a lossy
/// step dropped; it must not stand in for a value a user changed since (a
/// v7 first name edited, then rolled back to v0 as the name kept from
/// before). Edits that make the translation fail or skip are not hidden.
/// `other` is `doc` in the other shape (see [`edits`]).
fn hidden_edit(
    doc: &Value,
    other: &Value,
    stamp: &str,
    kept: Option<&Value>,
    translate: impl Fn(&Value, Option<&Value>) -> Option<Value>,
) -> Option<Value> {
    let kept = kept?;
    let with = translate(doc, Some(kept))?;
    let without = translate(doc, None)?;
    // Compared as JSON, not text: a cleared field the complement put back
    // comes back last.
    edits(doc, other, stamp).into_iter().find(|edited| {
        translate(edited, Some(kept)).is_some_and(|w| same_json(&w, &with))
            && translate(edited, None).is_some_and(|w| !same_json(&w, &without))
    })
}

/// Leaf edits of `doc` a user could make: each string, number, boolean or
/// null changed, one at a time (at most [`MAX_EDITS`]), then each member
/// the step changed removed (at most [`MAX_REMOVALS`]), apart from `_id`,
/// `_rev`, other `_` fields and the stamp; first the leaves the step
/// changed (not the same at the same place in `other`, the document in
/// the other shape), which are where a complement can stand in for one.
fn edits(doc: &Value, other: &Value, stamp: &str) -> Vec<Value> {
    // Each leaf as a JSON Pointer, which `Value::pointer` reads and
    // `Value::pointer_mut` writes.
    fn escaped(key: &str) -> String {
        key.replace('~', "~0").replace('/', "~1")
    }
    fn leaves(value: &Value, at: &str, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    if at.is_empty() && key.starts_with('_') {
                        continue;
                    }
                    leaves(child, &format!("{at}/{}", escaped(key)), out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    leaves(child, &format!("{at}/{i}"), out);
                }
            }
            _ => out.push(at.to_owned()),
        }
    }
    let mut pointers = Vec::new();
    leaves(doc, "", &mut pointers);
    let stamp = format!("/{}", escaped(stamp));
    pointers.retain(|p| *p != stamp);
    // Stable: the changed leaves first, each group in document order.
    pointers.sort_by_key(|p| doc.pointer(p) == other.pointer(p));
    let changed = pointers
        .iter()
        .take_while(|p| doc.pointer(p) != other.pointer(p))
        .count();
    let changed_values = pointers.iter().take(MAX_EDITS).filter_map(|pointer| {
        let mut edited = doc.clone();
        let slot = edited.pointer_mut(pointer)?;
        *slot = match slot.take() {
            // A space: text a split takes apart differently.
            Value::String(s) => Value::String(format!("{s} ~")),
            Value::Bool(b) => Value::Bool(!b),
            Value::Number(n) => Value::String(format!("{n}~")),
            _ => json!("~"),
        };
        Some(edited)
    });
    // A field a user cleared: a member the step changed, removed (a
    // complement must not bring back a value the user deleted).
    let cleared = pointers
        .iter()
        .take(changed.min(MAX_REMOVALS))
        .filter_map(|pointer| {
            let (parent, key) = pointer.rsplit_once('/')?;
            let mut edited = doc.clone();
            let members = edited.pointer_mut(parent)?.as_object_mut()?;
            let key = key.replace("~1", "/").replace("~0", "~");
            members.shift_remove(&key)?;
            Some(edited)
        });
    changed_values.chain(cleared).collect()
}

/// At most this many value edits are tried per document and direction.
const MAX_EDITS: usize = 16;
/// At most this many fields are cleared per document and direction.
const MAX_REMOVALS: usize = 8;

/// Checks every migration on sample documents (at version 0), each
/// translated up to the migration's input version, and on `generated`
/// documents per migration. Returns one report per migration.
pub fn check_laws(set: &MigrationSet, samples: &[Value], generated: u32) -> Vec<MigrationReport> {
    let mut reports = vec![MigrationReport::default(); set.migrations().len()];
    let mut docs: Vec<Value> = samples.to_vec();
    for (index, report) in reports.iter_mut().enumerate() {
        let version = index as u32 + 1;
        for doc in &mut docs {
            report.sample_docs += 1;
            match check_step(set, version, doc) {
                Ok(applied) => report.sample_applied += usize::from(applied),
                Err(b) => {
                    if report.broken.len() < KEEP_BROKEN {
                        report.broken.push(b);
                    }
                }
            }
            let _ = set.up_step(version, doc, None);
        }
        if generated > 0 {
            check_generated(set, version, generated, report);
        }
    }
    for (doc, sample) in docs.iter().zip(samples) {
        let last = reports.len().saturating_sub(1);
        if let Some(b) = check_chain(set, sample, doc) {
            if let Some(report) = reports.get_mut(last) {
                if report.broken.len() < KEEP_BROKEN {
                    report.broken.push(b);
                }
            }
        }
    }
    reports
}

/// JSON equality that keeps number text (`1.10` is not `1.1`) but not key
/// order: without complements the place of a key created going down is lost.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_json(v, w))
        }
        (Value::Number(x), Value::Number(y)) => x.to_string() == y.to_string(),
        _ => a == b,
    }
}

/// The whole chain: a document at the latest version, translated down to 0
/// with no complement from before and back up with what going down kept,
/// comes back with the same keys, values and number text.
fn check_chain(set: &MigrationSet, original: &Value, latest: &Value) -> Option<LawBroken> {
    let mut kept = std::collections::HashMap::new();
    struct Recorder<'a>(&'a mut std::collections::HashMap<u32, Value>, bool);
    impl crate::Complements for Recorder<'_> {
        fn get(&mut self, v: u32) -> Option<Value> {
            if self.1 {
                self.0.get(&v).cloned()
            } else {
                None
            }
        }
        fn put(&mut self, v: u32, c: Option<Value>) {
            match c {
                Some(c) => self.0.insert(v, c),
                None => self.0.remove(&v),
            };
        }
    }
    let mut down = latest.clone();
    if let Err(e) = set.translate(&mut down, set.latest(), 0, &mut Recorder(&mut kept, false)) {
        return Some(LawBroken {
            doc_id: id_of(original),
            law: "up(down(new)) = new across all versions (key order aside)",
            input: text(latest),
            expected: text(latest),
            found: e.to_string(),
        });
    }
    let mut up = down.clone();
    let result = set.translate(&mut up, 0, set.latest(), &mut Recorder(&mut kept, true));
    if result.is_err() || !same_json(&up, latest) {
        return Some(LawBroken {
            doc_id: id_of(original),
            law: "up(down(new)) = new across all versions (key order aside)",
            input: text(latest),
            expected: text(latest),
            found: result.map(|_| text(&up)).unwrap_or_else(|e| e.to_string()),
        });
    }
    let _ = NoComplements;
    None
}

/// Paths and literal values a migration's selectors and operations mention.
fn vocabulary(set: &MigrationSet, version: u32) -> (Vec<FieldPath>, Vec<Value>) {
    let mut paths: Vec<FieldPath> = vec![FieldPath::parse("type").expect("valid")];
    let mut values: Vec<Value> = vec![
        json!("x"),
        json!(""),
        // Text a split or a join does not take back the same way.
        json!("x y"),
        json!("x "),
        json!(0),
        json!(12345678901234567890u64),
        json!(1.5),
        json!(true),
        Value::Null,
        json!({"k": "v"}),
        json!(["a"]),
    ];
    let Ok(migration) = set.migration(version) else {
        return (paths, values);
    };
    let add_selector = |s: &Selector, paths: &mut Vec<FieldPath>, values: &mut Vec<Value>| {
        for (path, condition) in s.conditions() {
            paths.push(path.clone());
            values.extend(condition.literals().into_iter().cloned());
        }
    };
    add_selector(&migration.when, &mut paths, &mut values);
    add_selector(&migration.when_after, &mut paths, &mut values);
    for op in &migration.ops {
        match op {
            Op::Rename { from, to } | Op::Copy { from, to } => {
                paths.push(from.clone());
                paths.push(to.clone());
            }
            Op::Add { path, value } => {
                paths.push(path.clone());
                values.push(value.clone());
            }
            Op::Remove { path, default } => {
                paths.push(path.clone());
                values.push(default.clone());
            }
            Op::Convert { path, forward, .. } => {
                paths.push(path.clone());
                for (k, v) in forward {
                    values.push(k.clone());
                    values.push(v.clone());
                }
            }
            Op::Wrap { path, .. } | Op::Unwrap { path, .. } => paths.push(path.clone()),
            Op::Custom(_) => {}
        }
    }
    paths.sort();
    paths.dedup();
    let mut seen = std::collections::HashSet::new();
    values.retain(|v| seen.insert(text(v)));
    (paths, values)
}

/// Makes `doc` satisfy the positive conditions of `selector` (the first
/// branch of an `$or`; `$not` is left to chance), so that about half of the
/// generated documents are ones the migration applies to.
fn impose(selector: &Selector, doc: &mut Value) {
    use crate::selector::Condition;
    match selector {
        Selector::All | Selector::Not(_) => {}
        Selector::And(parts) => parts.iter().for_each(|p| impose(p, doc)),
        Selector::Or(parts) => {
            if let Some(first) = parts.first() {
                impose(first, doc);
            }
        }
        Selector::Field(path, condition) => {
            let value = match condition {
                Condition::Eq(v) => Some(v.clone()),
                Condition::In(vs) => vs.first().cloned(),
                Condition::Exists(true) | Condition::Ne(_) | Condition::Nin(_) => {
                    if path.get(doc).is_some() && condition.holds(path.get(doc)) {
                        None
                    } else {
                        Some(json!("w"))
                    }
                }
                Condition::Exists(false) => {
                    path.take(doc);
                    None
                }
            };
            if let Some(value) = value {
                let _ = path.put(doc, value, None);
            }
        }
    }
}

fn check_generated(set: &MigrationSet, version: u32, cases: u32, report: &mut MigrationReport) {
    let (paths, values) = vocabulary(set, version);
    let field = (0..paths.len(), 0..values.len(), 0..5u8);
    let strategy = (
        proptest::collection::vec(field, 0..=paths.len() + 2),
        any::<bool>(),
        any::<bool>(),
    );
    let witness = set.migration(version).map(|m| m.when.clone()).ok();
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let stamp = set.stamp_field().to_owned();
    let applied = std::cell::Cell::new(0usize);
    let total = std::cell::Cell::new(0usize);
    let result = runner.run(&strategy, |(fields, stamped, matching)| {
        let mut doc = json!({"_id": "generated"});
        for (p, v, shape) in fields {
            let value = match shape {
                0 => json!({"k": values[v].clone()}),
                1 => json!([values[v].clone()]),
                // The object that holds the field, there but empty (what a
                // move into it finds, or out of it leaves).
                2 => {
                    if let Some(parent) = paths[p].parent_path() {
                        if parent.get(&doc).is_none() {
                            let _ = parent.put(&mut doc, json!({}), None);
                        }
                    }
                    continue;
                }
                _ => values[v].clone(),
            };
            let _ = paths[p].put(&mut doc, value, None);
        }
        if matching {
            if let Some(selector) = &witness {
                impose(selector, &mut doc);
            }
        }
        if stamped && version > 1 {
            doc[&stamp] = json!(version - 1);
        }
        total.set(total.get() + 1);
        match check_step(set, version, &doc) {
            Ok(a) => {
                applied.set(applied.get() + usize::from(a));
                Ok(())
            }
            Err(b) => Err(TestCaseError::fail(
                serde_json::to_string(&json!({
                    "law": b.law, "input": b.input, "expected": b.expected, "found": b.found
                }))
                .unwrap_or_default(),
            )),
        }
    });
    report.generated_docs += total.get();
    report.generated_applied += applied.get();
    if let Err(proptest::test_runner::TestError::Fail(reason, _)) = result {
        let parsed: Value = serde_json::from_str(reason.message()).unwrap_or(Value::Null);
        let field = |k: &str| {
            parsed
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let law: &'static str = match field("law").as_str() {
            "down(up(doc)) = doc" => "down(up(doc)) = doc",
            "up(down(new)) = new" => "up(down(new)) = new",
            l if l == LAW_EDIT_NEW => LAW_EDIT_NEW,
            l if l == LAW_EDIT_OLD => LAW_EDIT_OLD,
            _ => "when_after matches what up produced",
        };
        report.broken.push(LawBroken {
            doc_id: "generated (shrunk)".into(),
            law,
            input: field("input"),
            expected: field("expected"),
            found: field("found"),
        });
    }
}
