//! Lens operations: each defines both directions and what it keeps aside.
//!
//! Every operation is applied with the record the opposite direction left
//! (`kept_in`, possibly none) and returns the record for the next opposite
//! application (`kept_out`). The records are what a migration's complement is
//! made of: a removed value, the original of a collapsed conversion, a field
//! an `add` overwrote, where a moved key stood in its object.

use crate::path::FieldPath;
use crate::script::Script;
use crate::selector::json_eq;
use crate::LensError;
use serde_json::{Map, Value};

/// Which way a migration is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the version before the migration to the version after it.
    Up,
    /// Back from the version after the migration to the one before.
    Down,
}

/// How `wrap` / `unwrap` package a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Wrapping {
    /// A one-field object `{key: value}`.
    Key(String),
    /// A one-element array `[value]`.
    Array,
}

/// One lens operation of a migration step.
#[derive(Debug, Clone)]
pub enum Op {
    /// Move a field to another path (into or out of nested objects).
    Rename {
        /// Where the field is before the migration.
        from: FieldPath,
        /// Where it is after.
        to: FieldPath,
    },
    /// Set a field to a value going up; remove it going down.
    Add {
        /// The field set.
        path: FieldPath,
        /// The value it gets going up (what it overwrote is kept aside).
        value: Value,
    },
    /// Remove a field going up; restore it (or `default`) going down.
    Remove {
        /// The field removed.
        path: FieldPath,
        /// The value restored going down when none was kept (a document made
        /// in the newer shape).
        default: Value,
    },
    /// Copy a field going up; remove the copy going down.
    Copy {
        /// The field copied (left in place).
        from: FieldPath,
        /// Where the copy is written.
        to: FieldPath,
    },
    /// Map values both ways. `forward` is the `map`; `backward` its reverse
    /// (the stated `reverse` where `map` is not one-to-one).
    Convert {
        /// The field converted; a value no pair matches is left as it is.
        path: FieldPath,
        /// `(old, new)` pairs applied going up.
        forward: Vec<(Value, Value)>,
        /// `(new, old)` pairs applied going down.
        backward: Vec<(Value, Value)>,
    },
    /// Wrap a value going up; unwrap it going down.
    Wrap {
        /// The field whose value is wrapped.
        path: FieldPath,
        /// How the value is wrapped.
        wrapping: Wrapping,
    },
    /// Unwrap a value going up; wrap it going down.
    Unwrap {
        /// The field whose value is unwrapped.
        path: FieldPath,
        /// How the value is wrapped in the older shape.
        wrapping: Wrapping,
    },
    /// JavaScript `up(doc, kept)` and `down(doc, kept)`.
    Custom(Script),
}

/// The record an operation keeps for the opposite direction.
pub type Kept = Map<String, Value>;

impl Op {
    /// The operation's name as written in migration files.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Rename { .. } => "rename",
            Op::Add { .. } => "add",
            Op::Remove { .. } => "remove",
            Op::Copy { .. } => "copy",
            Op::Convert { .. } => "convert",
            Op::Wrap { .. } => "wrap",
            Op::Unwrap { .. } => "unwrap",
            Op::Custom(_) => "custom",
        }
    }

    /// The paths this operation writes going up (for overlap checks).
    pub fn writes(&self) -> Vec<&FieldPath> {
        match self {
            Op::Rename { to, .. } | Op::Copy { to, .. } => vec![to],
            Op::Add { path, .. }
            | Op::Convert { path, .. }
            | Op::Wrap { path, .. }
            | Op::Unwrap { path, .. } => vec![path],
            Op::Remove { .. } | Op::Custom(_) => vec![],
        }
    }

    /// Applies the operation to `doc` in `direction`, given what the opposite
    /// direction kept; returns what this application keeps.
    pub fn apply(
        &self,
        direction: Direction,
        doc: &mut Value,
        kept_in: Option<&Kept>,
    ) -> Result<Option<Kept>, LensError> {
        let empty = Kept::new();
        let kept_in = kept_in.unwrap_or(&empty);
        let out = match (self, direction) {
            (Op::Rename { from, to }, Direction::Up) => move_field(doc, from, to, kept_in)?,
            (Op::Rename { from, to }, Direction::Down) => move_field(doc, to, from, kept_in)?,
            (Op::Add { path, value }, Direction::Up) => set_field(doc, path, value, kept_in)?,
            (Op::Add { path, value }, Direction::Down) => unset_field(doc, path, value, kept_in),
            (Op::Copy { from, to }, Direction::Up) => match from.get(doc).cloned() {
                Some(value) => set_field(doc, to, &value, kept_in)?,
                None => Kept::new(),
            },
            (Op::Copy { from, to }, Direction::Down) => match from.get(doc).cloned() {
                Some(value) => unset_field(doc, to, &value, kept_in),
                None => unset_field(doc, to, &Value::Null, kept_in),
            },
            (Op::Remove { path, .. }, Direction::Up) => remove_field(doc, path, kept_in),
            (Op::Remove { path, default }, Direction::Down) => {
                restore_field(doc, path, default, kept_in)?
            }
            (
                Op::Convert {
                    path,
                    forward,
                    backward,
                },
                Direction::Up,
            ) => convert(doc, path, forward, backward, kept_in),
            (
                Op::Convert {
                    path,
                    forward,
                    backward,
                },
                Direction::Down,
            ) => convert(doc, path, backward, forward, kept_in),
            (Op::Wrap { path, wrapping }, Direction::Up)
            | (Op::Unwrap { path, wrapping }, Direction::Down) => {
                wrap(doc, path, wrapping, kept_in)
            }
            (Op::Wrap { path, wrapping }, Direction::Down)
            | (Op::Unwrap { path, wrapping }, Direction::Up) => unwrap(doc, path, wrapping),
            (Op::Custom(script), direction) => script.run(direction, doc, kept_in)?,
        };
        Ok((!out.is_empty()).then_some(out))
    }
}

fn shape_error(path: &FieldPath) -> LensError {
    LensError::Shape(format!(
        "cannot write `{path}`: one of its parents is not an object"
    ))
}

fn index_of(kept: &Kept, key: &str) -> Option<usize> {
    kept.get(key)
        .and_then(Value::as_u64)
        .and_then(|i| usize::try_from(i).ok())
}

fn created_levels(kept: &Kept) -> usize {
    index_of(kept, "mk").unwrap_or(0)
}

/// Moves the value at `src` to `dst`. `kept_in` is what the opposite move
/// (`dst` to `src`) recorded: where the value stood, what it overwrote, which
/// parents it created.
fn move_field(
    doc: &mut Value,
    src: &FieldPath,
    dst: &FieldPath,
    kept_in: &Kept,
) -> Result<Kept, LensError> {
    let mut out = Kept::new();
    let Some(taken) = src.take_indexed(doc) else {
        return Ok(out);
    };
    // Undo what the opposite move did at `src`.
    if let Some(over) = kept_in.get("over") {
        let _ = src.put(doc, over.clone(), Some(taken.index));
    } else {
        prune_left_behind(doc, src, src.parents_apart_from(dst), kept_in, &mut out);
    }
    let same_parent = src.parent() == dst.parent();
    let index = index_of(kept_in, "pos").or(same_parent.then_some(taken.index));
    let put = dst
        .put_with_parents_at(doc, taken.value, index, index_of(kept_in, "rm"))
        .map_err(|_| shape_error(dst))?;
    // Going back puts the value at its old index when it stood elsewhere
    // than where it will be found.
    if (!same_parent && !taken.was_last) || (same_parent && put.replaced.is_some()) {
        out.insert("pos".into(), taken.index.into());
    }
    if let Some(replaced) = put.replaced {
        out.insert("over".into(), replaced);
    }
    record_parents(
        doc,
        dst,
        dst.parents_apart_from(src),
        put.created_parents,
        &mut out,
    );
    Ok(out)
}

/// Removes the parent objects of `path` a value taken from it left empty:
/// those the opposite operation says it created (`mk`, which it records
/// also when it created none but found the object empty); without that
/// record (a document made in this shape, or a record the same direction
/// wrote: one complement serves both ways), the `levels` innermost, as the
/// opposite operation would have created them, and where the outermost
/// stood goes into `out` as `rm`, for the opposite operation to put them
/// back there.
fn prune_left_behind(
    doc: &mut Value,
    path: &FieldPath,
    levels: usize,
    kept_in: &Kept,
    out: &mut Kept,
) {
    if !kept_in.contains_key("mk") {
        if let Some(at) = path.prune_empty_parents(doc, levels) {
            out.insert("rm".into(), at.into());
        }
    } else {
        path.prune_empty_parents(doc, created_levels(kept_in));
    }
}

/// Records in `out` how many parent objects a put at `path` created (`mk`),
/// also when it created none but the innermost of its `levels` parents the
/// opposite operation would prune holds nothing else: that object was there
/// before, and the record says so ([`prune_left_behind`] prunes every empty
/// one only when there is none).
fn record_parents(doc: &Value, path: &FieldPath, levels: usize, created: usize, out: &mut Kept) {
    if created > 0 || (levels > 0 && path.is_alone_in_parent(doc)) {
        out.insert("mk".into(), created.into());
    }
}

/// Sets `path` to the value the opposite direction saw there (`set`) or to `value`.
fn set_field(
    doc: &mut Value,
    path: &FieldPath,
    value: &Value,
    kept_in: &Kept,
) -> Result<Kept, LensError> {
    let mut out = Kept::new();
    if kept_in.contains_key("absent") {
        out.insert("absent".into(), true.into());
        return Ok(out);
    }
    let value = kept_in.get("set").unwrap_or(value).clone();
    let put = path
        .put_with_parents_at(
            doc,
            value,
            index_of(kept_in, "pos"),
            index_of(kept_in, "rm"),
        )
        .map_err(|_| shape_error(path))?;
    if let Some(replaced) = put.replaced {
        out.insert("over".into(), replaced);
    }
    record_parents(
        doc,
        path,
        path.parent().len(),
        put.created_parents,
        &mut out,
    );
    Ok(out)
}

/// Removes the field `set_field` wrote, keeping it when it differs from `expected`.
fn unset_field(doc: &mut Value, path: &FieldPath, expected: &Value, kept_in: &Kept) -> Kept {
    let mut out = Kept::new();
    let Some(taken) = path.take_indexed(doc) else {
        out.insert("absent".into(), true.into());
        return out;
    };
    if let Some(over) = kept_in.get("over") {
        let _ = path.put(doc, over.clone(), Some(taken.index));
    } else {
        prune_left_behind(doc, path, path.parent().len(), kept_in, &mut out);
    }
    if !same_text(&taken.value, expected) {
        out.insert("set".into(), taken.value);
    }
    if !taken.was_last {
        out.insert("pos".into(), taken.index.into());
    }
    out
}

/// `remove` going up: the value is kept aside.
fn remove_field(doc: &mut Value, path: &FieldPath, kept_in: &Kept) -> Kept {
    let mut out = Kept::new();
    if kept_in.contains_key("kept") {
        out.insert("kept".into(), true.into());
        return out;
    }
    match path.take_indexed(doc) {
        Some(taken) => {
            path.prune_empty_parents(doc, created_levels(kept_in));
            out.insert("val".into(), taken.value);
            if !taken.was_last {
                out.insert("pos".into(), taken.index.into());
            }
        }
        None => {
            out.insert("absent".into(), true.into());
        }
    }
    out
}

/// `remove` going down: the kept value, or the default, comes back.
fn restore_field(
    doc: &mut Value,
    path: &FieldPath,
    default: &Value,
    kept_in: &Kept,
) -> Result<Kept, LensError> {
    let mut out = Kept::new();
    if kept_in.contains_key("absent") {
        return Ok(out);
    }
    if path.get(doc).is_some() {
        // A newer writer set the field the new shape does not have: leave it.
        out.insert("kept".into(), true.into());
        return Ok(out);
    }
    let value = kept_in.get("val").unwrap_or(default).clone();
    let put = path
        .put(doc, value, index_of(kept_in, "pos"))
        .map_err(|_| shape_error(path))?;
    if put.created_parents > 0 {
        out.insert("mk".into(), put.created_parents.into());
    }
    Ok(out)
}

fn lookup<'a>(pairs: &'a [(Value, Value)], key: &Value) -> Option<&'a Value> {
    pairs.iter().find(|(k, _)| json_eq(k, key)).map(|(_, v)| v)
}

fn same_text(a: &Value, b: &Value) -> bool {
    serde_json::to_string(a).ok() == serde_json::to_string(b).ok()
}

/// Converts the value at `path` through `there`; `back` is the opposite map.
fn convert(
    doc: &mut Value,
    path: &FieldPath,
    there: &[(Value, Value)],
    back: &[(Value, Value)],
    kept_in: &Kept,
) -> Kept {
    let mut out = Kept::new();
    let Some(slot) = path.get_mut(doc) else {
        return out;
    };
    // A value the opposite conversion left alone (it already looked
    // converted) is left alone again while it is still that value (`true`:
    // a record from before the value was kept, whatever it is now).
    let left_alone = kept_in
        .get("keep")
        .is_some_and(|k| *k == Value::Bool(true) || same_text(k, slot));
    if left_alone {
        out.insert("keep".into(), slot.clone());
        return out;
    }
    match lookup(there, slot) {
        Some(converted) => {
            let original = std::mem::replace(slot, converted.clone());
            // The value the opposite conversion collapsed comes back only
            // while it still converts to what is here: an edit of the
            // value since is not hidden by the record.
            let restored = kept_in
                .get("orig")
                .filter(|r| lookup(back, r).is_some_and(|b| same_text(b, &original)));
            if let Some(restored) = restored {
                *slot = restored.clone();
            }
            let comes_back = lookup(back, slot);
            if !comes_back.is_some_and(|b| same_text(b, &original)) {
                out.insert("orig".into(), original);
            }
        }
        None => {
            if lookup(back, slot).is_some() {
                // Already looks converted: the way back must leave it alone
                // (unless it is edited since).
                out.insert("keep".into(), slot.clone());
            }
        }
    }
    out
}

fn wrap(doc: &mut Value, path: &FieldPath, wrapping: &Wrapping, kept_in: &Kept) -> Kept {
    if kept_in.contains_key("skip") {
        return Kept::new();
    }
    if let Some(slot) = path.get_mut(doc) {
        let inner = slot.take();
        *slot = match wrapping {
            Wrapping::Key(key) => {
                let mut object = Map::new();
                object.insert(key.clone(), inner);
                Value::Object(object)
            }
            Wrapping::Array => Value::Array(vec![inner]),
        };
    }
    Kept::new()
}

fn unwrap(doc: &mut Value, path: &FieldPath, wrapping: &Wrapping) -> Kept {
    let mut out = Kept::new();
    let Some(slot) = path.get_mut(doc) else {
        return out;
    };
    let inner = match (wrapping, &mut *slot) {
        (Wrapping::Key(key), Value::Object(object)) if object.len() == 1 => object.remove(key),
        (Wrapping::Array, Value::Array(items)) if items.len() == 1 => items.pop(),
        _ => None,
    };
    match inner {
        Some(inner) => *slot = inner,
        None => {
            out.insert("skip".into(), true.into());
        }
    }
    out
}
