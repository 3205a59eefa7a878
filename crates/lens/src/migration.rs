//! Migration files and migration sets: parsing, reversibility checks, and
//! applying migrations across versions with the stamp and complements.
//!
//! Version N means "the first N migrations applied"; version 0 is the data
//! before rewind. A document whose body a migration produced carries the
//! stamp field (default `rewind`) with that version; a document without it is
//! at version 0 or untouched by every migration, which is the same thing.

use crate::ops::{Direction, Kept, Op, Wrapping};
use crate::path::FieldPath;
use crate::script::{Script, DEFAULT_TIME_LIMIT};
use crate::selector::{Condition, Selector};
use crate::{LensError, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default name of the stamp field.
pub const DEFAULT_STAMP: &str = "rewind";

/// One migration: the step from version `version - 1` to `version`.
#[derive(Debug, Clone)]
pub struct Migration {
    /// The file's name without its extension, e.g. `0001-persons-to-contacts`.
    pub id: String,
    /// The file as the caller named it (for messages).
    pub file: PathBuf,
    /// What the migration does, for people.
    pub description: String,
    /// SHA-256 of the file's bytes, hex.
    pub checksum: String,
    /// Documents it applies to, in the shape before it.
    pub when: Selector,
    /// Documents it applies to, in the shape after it (stated or derived).
    pub when_after: Selector,
    /// True when `when_after` was derived from the operations.
    pub when_after_derived: bool,
    /// The lens operations, applied in order going up and in reverse going down.
    pub ops: Vec<Op>,
}

/// A `value` that must be present but may be `null`.
#[derive(Debug, Default)]
struct Required(Option<Value>);

impl<'de> Deserialize<'de> for Required {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Value::deserialize(d).map(|v| Required(Some(v)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    description: String,
    when: Spanned<Value>,
    up: Spanned<Vec<Spanned<RawOp>>>,
    #[serde(default)]
    when_after: Option<Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawOp {
    Rename(RawMove),
    Add(RawAdd),
    Remove(RawRemove),
    Copy(RawMove),
    Convert(RawConvert),
    Wrap(RawWrap),
    Unwrap(RawWrap),
    Custom(RawCustom),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMove {
    from: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdd {
    path: String,
    #[serde(default)]
    value: Required,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemove {
    path: String,
    #[serde(default)]
    default: Required,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConvert {
    path: String,
    map: Map<String, Value>,
    #[serde(default)]
    reverse: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWrap {
    path: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    array: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustom {
    up: String,
    down: String,
    #[serde(default)]
    time_limit_ms: Option<u64>,
}

/// Where an error points: a line and column in a file.
#[derive(Clone, Copy)]
struct At {
    line: u64,
    column: u64,
}

impl<T> From<&Spanned<T>> for At {
    fn from(s: &Spanned<T>) -> At {
        At {
            line: s.referenced.line(),
            column: s.referenced.column(),
        }
    }
}

fn invalid(file: &Path, at: At, reason: impl Into<String>) -> LensError {
    LensError::Invalid {
        file: file.to_path_buf(),
        line: at.line.max(1),
        column: at.column.max(1),
        reason: reason.into(),
    }
}

fn field_path(file: &Path, at: At, text: &str, role: &str) -> Result<FieldPath> {
    FieldPath::parse(text).ok_or_else(|| {
        invalid(
            file,
            at,
            format!("`{role}: {text}` is not a dotted field path such as `fields.patient_id`"),
        )
    })
}

/// Matches a map key (always a string in YAML) against a document value.
fn key_value(key: &str) -> Value {
    Value::String(key.to_owned())
}

fn wrapping(file: &Path, at: At, raw: &RawWrap, op: &str) -> Result<Wrapping> {
    match (&raw.key, raw.array) {
        (Some(key), false) => Ok(Wrapping::Key(key.clone())),
        (None, true) => Ok(Wrapping::Array),
        _ => Err(invalid(
            file,
            at,
            format!("`{op}` needs exactly one of `key: NAME` (a one-field object) or `array: true` (a one-element array)"),
        )),
    }
}

/// A two-way value map as `(from, to)` pairs.
type ValueMap = Vec<(Value, Value)>;

fn convert_pairs(
    file: &Path,
    at: At,
    path: &FieldPath,
    map: &Map<String, Value>,
    reverse: Option<&Map<String, Value>>,
) -> Result<(ValueMap, ValueMap)> {
    let forward: Vec<(Value, Value)> = map.iter().map(|(k, v)| (key_value(k), v.clone())).collect();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut backward: Vec<(Value, Value)> = Vec::new();
    for (key, value) in &forward {
        let sources: Vec<&Value> = forward
            .iter()
            .filter(|(_, v)| text(v) == text(value))
            .map(|(k, _)| k)
            .collect();
        if backward.iter().any(|(v, _)| text(v) == text(value)) {
            continue;
        }
        let chosen = if sources.len() == 1 {
            key.clone()
        } else {
            let stated = reverse.and_then(|r| r.get(&text(value)));
            match stated {
                Some(Value::String(s)) if sources.iter().any(|k| text(k) == *s) => key_value(s),
                _ => {
                    let names: Vec<String> =
                        sources.iter().map(|k| format!("`{}`", text(k))).collect();
                    return Err(invalid(
                        file,
                        at,
                        format!(
                            "`convert` on `{path}` is not one-to-one: `{}` comes from {}; add `reverse: {{{}: {}}}` to say which value going down restores when no complement was kept",
                            text(value),
                            names.join(" and "),
                            text(value),
                            text(sources[0])
                        ),
                    ));
                }
            }
        };
        backward.push((value.clone(), chosen));
    }
    if let Some(reverse) = reverse {
        for key in reverse.keys() {
            if !forward.iter().any(|(_, v)| text(v) == *key) {
                return Err(invalid(
                    file,
                    at,
                    format!("`reverse` on `{path}` names `{key}`, which `map` never produces"),
                ));
            }
        }
    }
    Ok((forward, backward))
}

fn build_op(file: &Path, raw: &Spanned<RawOp>) -> Result<Op> {
    let at = At::from(raw);
    Ok(match &raw.value {
        RawOp::Rename(m) | RawOp::Copy(m) => {
            let from = field_path(file, at, &m.from, "from")?;
            let to = field_path(file, at, &m.to, "to")?;
            if from.overlaps(&to) {
                return Err(invalid(
                    file,
                    at,
                    format!("`from: {from}` and `to: {to}` overlap: one lies inside the other"),
                ));
            }
            if matches!(raw.value, RawOp::Rename(_)) {
                Op::Rename { from, to }
            } else {
                Op::Copy { from, to }
            }
        }
        RawOp::Add(a) => Op::Add {
            path: field_path(file, at, &a.path, "path")?,
            value: a.value.0.clone().ok_or_else(|| {
                invalid(file, at, "`add` needs a `value` (use `value: null` for null)")
            })?,
        },
        RawOp::Remove(r) => Op::Remove {
            path: field_path(file, at, &r.path, "path")?,
            default: r.default.0.clone().ok_or_else(|| {
                invalid(
                    file,
                    at,
                    "`remove` needs a `default`: the value going down restores for documents created after the upgrade (use `default: null` if none)",
                )
            })?,
        },
        RawOp::Convert(c) => {
            let path = field_path(file, at, &c.path, "path")?;
            if c.map.is_empty() {
                return Err(invalid(file, at, "`convert` needs a non-empty `map`"));
            }
            let (forward, backward) = convert_pairs(file, at, &path, &c.map, c.reverse.as_ref())?;
            Op::Convert { path, forward, backward }
        }
        RawOp::Wrap(w) => Op::Wrap {
            path: field_path(file, at, &w.path, "path")?,
            wrapping: wrapping(file, at, w, "wrap")?,
        },
        RawOp::Unwrap(w) => Op::Unwrap {
            path: field_path(file, at, &w.path, "path")?,
            wrapping: wrapping(file, at, w, "unwrap")?,
        },
        RawOp::Custom(c) => {
            let script = Script {
                up: c.up.clone(),
                down: c.down.clone(),
                time_limit: c
                    .time_limit_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_TIME_LIMIT),
            };
            script
                .compile()
                .map_err(|e| invalid(file, at, format!("`custom`: {e}")))?;
            Op::Custom(script)
        }
    })
}

/// Why `when_after` cannot be derived, if it cannot.
fn derive_when_after(when: &Selector, ops: &[Op]) -> std::result::Result<Selector, String> {
    let mut selector = when.clone();
    for op in ops {
        let mut blocker: Option<String> = None;
        let mapped = selector.try_map_fields(&mut |path, condition| {
            let result = push_condition(op, path, condition);
            if result.is_none() && blocker.is_none() {
                blocker = Some(format!(
                    "`{}` changes `{path}`, which `when` tests, in a way rewind cannot follow",
                    op.name()
                ));
            }
            result
        });
        match mapped {
            Some(next) => selector = next,
            None => return Err(blocker.unwrap_or_else(|| "the selector cannot be followed".into())),
        }
        if matches!(op, Op::Custom(_)) {
            return Err("a `custom` step can change anything `when` tests".into());
        }
    }
    Ok(selector)
}

/// The condition on `path` after `op` has run, if rewind can tell.
fn push_condition(op: &Op, path: &FieldPath, condition: &Condition) -> Option<Selector> {
    let same = || Some(Selector::Field(path.clone(), condition.clone()));
    match op {
        Op::Rename { from, to } => {
            if let Some(moved) = path.rebase(from, to) {
                Some(Selector::Field(moved, condition.clone()))
            } else if path.overlaps(from) || path.overlaps(to) {
                None
            } else {
                same()
            }
        }
        Op::Add { path: p, .. } | Op::Remove { path: p, .. } | Op::Copy { to: p, .. } => {
            if path.overlaps(p) {
                None
            } else {
                same()
            }
        }
        Op::Convert {
            path: p, forward, ..
        } => {
            if path == p {
                let map = |v: &Value| -> Option<Value> {
                    forward
                        .iter()
                        .find(|(k, _)| crate::selector::json_eq(k, v))
                        .map(|(_, to)| to.clone())
                };
                match condition {
                    Condition::Eq(v) => Some(Selector::Field(p.clone(), Condition::Eq(map(v)?))),
                    Condition::In(vs) => Some(Selector::Field(
                        p.clone(),
                        Condition::In(vs.iter().map(map).collect::<Option<_>>()?),
                    )),
                    Condition::Exists(_) => same(),
                    Condition::Ne(_) | Condition::Nin(_) => None,
                }
            } else if path.overlaps(p) {
                None
            } else {
                same()
            }
        }
        Op::Wrap { path: p, wrapping } => match wrapping {
            Wrapping::Key(key) if path == p => Some(match condition {
                Condition::Exists(_) => Selector::Field(p.clone(), condition.clone()),
                _ => Selector::Field(p.child(key), condition.clone()),
            }),
            _ if path.overlaps(p) => None,
            _ => same(),
        },
        Op::Unwrap { path: p, wrapping } => match wrapping {
            Wrapping::Key(key) if path.starts_with(&p.child(key)) => Some(Selector::Field(
                path.rebase(&p.child(key), p)?,
                condition.clone(),
            )),
            _ if path.overlaps(p) => None,
            _ => same(),
        },
        Op::Custom(_) => None,
    }
}

impl Migration {
    /// Parses and checks one migration file. `file` names it in errors; its
    /// stem is the migration's id.
    pub fn parse(file: &Path, text: &str) -> Result<Migration> {
        let raw: RawFile = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let message = e.without_snippet().to_string();
            let first = message
                .lines()
                .next()
                .unwrap_or("not a valid migration file");
            let reason = match first.rfind(" at line ") {
                Some(at) => &first[..at],
                None => first,
            }
            .trim()
            .to_owned();
            invalid(file, At { line, column }, reason)
        })?;
        let when = Selector::parse(&raw.when.value)
            .map_err(|e| invalid(file, At::from(&raw.when), format!("`when`: {e}")))?;
        if raw.up.value.is_empty() {
            return Err(invalid(file, At::from(&raw.up), "`up` lists no operation"));
        }
        let mut ops = Vec::new();
        let mut written: Vec<FieldPath> = Vec::new();
        for raw_op in &raw.up.value {
            let op = build_op(file, raw_op)?;
            if let Op::Rename { to, .. } = &op {
                if let Some(earlier) = written.iter().find(|w| w.overlaps(to)) {
                    return Err(invalid(
                        file,
                        At::from(raw_op),
                        format!("`rename` onto `{to}`, which an earlier operation of this step writes (`{earlier}`): going down could not tell the two apart"),
                    ));
                }
            }
            written.extend(op.writes().into_iter().cloned());
            ops.push(op);
        }
        let derived = derive_when_after(&when, &ops);
        let (when_after, when_after_derived) = match (&raw.when_after, derived) {
            (Some(stated), _) => (
                Selector::parse(&stated.value)
                    .map_err(|e| invalid(file, At::from(stated), format!("`when_after`: {e}")))?,
                false,
            ),
            (None, Ok(derived)) => (derived, true),
            (None, Err(why)) => {
                return Err(invalid(
                    file,
                    At::from(&raw.when),
                    format!("`when_after` cannot be derived ({why}); state it: the selector that finds these documents in their new shape"),
                ))
            }
        };
        let id = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Migration {
            id,
            file: file.to_path_buf(),
            description: raw.description,
            checksum: checksum(text.as_bytes()),
            when,
            when_after,
            when_after_derived,
            ops,
        })
    }

    /// The lens going up: applies the operations in order to `doc`, given the
    /// complement its last `down` kept (if any); returns the complement `down`
    /// needs to restore the document exactly.
    pub fn up(&self, doc: &mut Value, complement: Option<&Value>) -> Result<Map<String, Value>> {
        let mut kept_out = Map::new();
        for (index, op) in self.ops.iter().enumerate() {
            let kept_in = op_record(complement, index);
            if let Some(kept) = op.apply(Direction::Up, doc, kept_in)? {
                kept_out.insert(index.to_string(), Value::Object(kept));
            }
        }
        Ok(kept_out)
    }

    /// The lens going down: applies the operations in reverse order.
    pub fn down(&self, doc: &mut Value, complement: Option<&Value>) -> Result<Map<String, Value>> {
        let mut kept_out = Map::new();
        for (index, op) in self.ops.iter().enumerate().rev() {
            let kept_in = op_record(complement, index);
            if let Some(kept) = op.apply(Direction::Down, doc, kept_in)? {
                kept_out.insert(index.to_string(), Value::Object(kept));
            }
        }
        Ok(kept_out)
    }
}

fn op_record(complement: Option<&Value>, index: usize) -> Option<&Kept> {
    complement?.get("ops")?.get(index.to_string())?.as_object()
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn checksum(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where complements come from and go to while translating across versions.
pub trait Complements {
    /// The complement kept for migration `version` of the document, if any.
    fn get(&mut self, version: u32) -> Option<Value>;
    /// Records the complement of migration `version` (`None`: nothing to keep).
    fn put(&mut self, version: u32, complement: Option<Value>);
}

/// Keeps no complement: translation as for a document created at its version.
pub struct NoComplements;

impl Complements for NoComplements {
    fn get(&mut self, _: u32) -> Option<Value> {
        None
    }
    fn put(&mut self, _: u32, _: Option<Value>) {}
}

/// What one step did to a document.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The migration does not apply to the document; it is unchanged.
    Skipped,
    /// The migration applied; here is the complement for the opposite direction.
    Applied(Option<Value>),
}

/// An ordered list of migrations and the name of the stamp field.
#[derive(Debug, Clone)]
pub struct MigrationSet {
    migrations: Vec<Migration>,
    stamp: String,
}

impl MigrationSet {
    /// A set from migrations in version order.
    pub fn new(migrations: Vec<Migration>, stamp: impl Into<String>) -> MigrationSet {
        MigrationSet {
            migrations,
            stamp: stamp.into(),
        }
    }

    /// Parses every `(file, text)` pair, in file-name order; returns every error.
    pub fn parse_files(
        files: &[(PathBuf, String)],
        stamp: &str,
    ) -> std::result::Result<MigrationSet, Vec<LensError>> {
        let mut sorted: Vec<&(PathBuf, String)> = files.iter().collect();
        sorted.sort_by(|a, b| a.0.file_name().cmp(&b.0.file_name()));
        let mut migrations = Vec::new();
        let mut errors = Vec::new();
        for (file, text) in sorted {
            match Migration::parse(file, text) {
                Ok(m) => migrations.push(m),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(MigrationSet::new(migrations, stamp))
        } else {
            Err(errors)
        }
    }

    /// The latest version (the number of migrations).
    pub fn latest(&self) -> u32 {
        u32::try_from(self.migrations.len()).unwrap_or(u32::MAX)
    }

    /// The migrations in version order (index 0 is version 1).
    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// The migration that leads to `version` (1-based).
    pub fn migration(&self, version: u32) -> Result<&Migration> {
        version
            .checked_sub(1)
            .and_then(|i| self.migrations.get(i as usize))
            .ok_or(LensError::NoSuchVersion {
                asked: version,
                latest: self.latest(),
            })
    }

    /// The stamp field's name.
    pub fn stamp_field(&self) -> &str {
        &self.stamp
    }

    /// The version in a document's stamp; `None` when it has none (or not a number).
    pub fn stamp_of(&self, doc: &Value) -> Option<u32> {
        doc.get(&self.stamp)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// Sets (or with `None` / 0 removes) the stamp. A new stamp goes at
    /// `index` when given, else last. Returns where a removed stamp stood
    /// when it was not the last key.
    fn set_stamp(
        &self,
        doc: &mut Value,
        version: Option<u32>,
        index: Option<usize>,
    ) -> Option<usize> {
        let object = doc.as_object_mut()?;
        match version {
            Some(v) if v > 0 => {
                match object.get_mut(&self.stamp) {
                    Some(slot) => *slot = Value::from(v),
                    None => {
                        let at = index.unwrap_or(object.len()).min(object.len());
                        object.shift_insert(at, self.stamp.clone(), Value::from(v));
                    }
                }
                None
            }
            _ => {
                let at = object.keys().position(|k| *k == self.stamp)?;
                object.shift_remove(&self.stamp);
                (at < object.len()).then_some(at)
            }
        }
    }

    /// True for documents migrations may touch: not design or local documents.
    pub fn is_migratable(doc: &Value) -> bool {
        let id = doc.get("_id").and_then(Value::as_str).unwrap_or("");
        !id.starts_with("_design/") && !id.starts_with("_local/")
    }

    /// Applies migration `version` going up to a document at `version - 1`,
    /// given the complement its last `down` kept. Skipped when the document
    /// does not match `when`, or its stamp is already `version` or later.
    pub fn up_step(
        &self,
        version: u32,
        doc: &mut Value,
        complement: Option<&Value>,
    ) -> Result<StepOutcome> {
        Backup::all_or_nothing(doc, |doc, backup| {
            self.up_in_place(version, doc, complement, backup)
        })
    }

    /// [`MigrationSet::up_step`] on `doc` itself: before its first change
    /// it copies `doc` into `backup` (when asked to), so that a caller can
    /// put it back after an error; `doc` is left half-done by one.
    fn up_in_place(
        &self,
        version: u32,
        doc: &mut Value,
        complement: Option<&Value>,
        backup: &mut Backup,
    ) -> Result<StepOutcome> {
        let migration = self.migration(version)?;
        // A stamp at or past this version means the step already ran: a
        // resumed upgrade never applies a migration twice.
        let done = self.stamp_of(doc).is_some_and(|s| s >= version);
        if done || !Self::is_migratable(doc) || !migration.when.matches(doc) {
            return Ok(StepOutcome::Skipped);
        }
        let prior = self.stamp_of(doc);
        backup.save(doc);
        let work = doc;
        // Undo in the reverse order of `down_step`: a stamp `down` removed
        // from the middle goes back before the operations run.
        let stamp_at = complement
            .and_then(|c| c.get("stamp_pos"))
            .and_then(Value::as_u64)
            .map(|i| i as usize);
        if stamp_at.is_some() {
            self.set_stamp(work, Some(version), stamp_at);
        }
        let ops = migration.up(work, complement)?;
        self.set_stamp(work, Some(version), None);
        let mut kept = Map::new();
        let derived_prior = (version > 1).then_some(version - 1);
        if prior != derived_prior {
            kept.insert(
                "stamp".into(),
                prior.map(Value::from).unwrap_or(Value::Null),
            );
        }
        if !ops.is_empty() {
            kept.insert("ops".into(), Value::Object(ops));
        }
        Ok(StepOutcome::Applied(
            (!kept.is_empty()).then_some(Value::Object(kept)),
        ))
    }

    /// Applies migration `version` going down to a document at `version`,
    /// given the complement its `up` kept (`None` for a document created at
    /// `version` or later).
    pub fn down_step(
        &self,
        version: u32,
        doc: &mut Value,
        complement: Option<&Value>,
    ) -> Result<StepOutcome> {
        Backup::all_or_nothing(doc, |doc, backup| {
            self.down_in_place(version, doc, complement, backup)
        })
    }

    /// [`MigrationSet::down_step`] on `doc` itself, as
    /// [`MigrationSet::up_in_place`].
    fn down_in_place(
        &self,
        version: u32,
        doc: &mut Value,
        complement: Option<&Value>,
        backup: &mut Backup,
    ) -> Result<StepOutcome> {
        let migration = self.migration(version)?;
        let stamped = self.stamp_of(doc).unwrap_or(0);
        if !Self::is_migratable(doc) || stamped < version || !migration.when_after.matches(doc) {
            return Ok(StepOutcome::Skipped);
        }
        backup.save(doc);
        let work = doc;
        let ops = migration.down(work, complement)?;
        let restored = match complement.and_then(|c| c.get("stamp")) {
            Some(Value::Null) => None,
            Some(v) => v.as_u64().and_then(|v| u32::try_from(v).ok()),
            None => Some(version - 1),
        };
        let removed_at = self.set_stamp(work, restored, None);
        let mut kept = Map::new();
        if let Some(at) = removed_at {
            kept.insert("stamp_pos".into(), at.into());
        }
        if !ops.is_empty() {
            kept.insert("ops".into(), Value::Object(ops));
        }
        let kept = (!kept.is_empty()).then_some(Value::Object(kept));
        Ok(StepOutcome::Applied(kept))
    }

    /// Translates a document at version `from` to version `to`, reading and
    /// recording complements through `complements`.
    pub fn translate(
        &self,
        doc: &mut Value,
        from: u32,
        to: u32,
        complements: &mut dyn Complements,
    ) -> Result<()> {
        for v in [from, to] {
            if v > self.latest() {
                return Err(LensError::NoSuchVersion {
                    asked: v,
                    latest: self.latest(),
                });
            }
        }
        // One copy of the document however many steps apply: put back if
        // one fails (the complements recorded by the steps before stay).
        Backup::all_or_nothing(doc, |doc, backup| {
            self.walk(doc, from, to, complements, backup)
        })
    }

    /// [`MigrationSet::translate`] without the checks, on `doc` itself.
    fn walk(
        &self,
        doc: &mut Value,
        from: u32,
        to: u32,
        complements: &mut dyn Complements,
        backup: &mut Backup,
    ) -> Result<()> {
        if from < to {
            for version in from + 1..=to {
                let kept = complements.get(version);
                if let StepOutcome::Applied(out) =
                    self.up_in_place(version, doc, kept.as_ref(), backup)?
                {
                    complements.put(version, out);
                }
            }
        } else {
            for version in (to + 1..=from).rev() {
                let kept = complements.get(version);
                if let StepOutcome::Applied(out) =
                    self.down_in_place(version, doc, kept.as_ref(), backup)?
                {
                    complements.put(version, out);
                }
            }
            if self.stamp_of(doc).is_some_and(|s| s > to) {
                self.set_stamp(doc, Some(to), None);
            }
        }
        Ok(())
    }

    /// The document at version `from` translated to every version, in
    /// version order: element `k` is what [`MigrationSet::translate`] from
    /// `from` to `k` gives, computed in one walk down and one walk up (each
    /// step applied once, not once per target version).
    pub fn translate_all(
        &self,
        doc: &Value,
        from: u32,
        complements: &mut dyn Complements,
    ) -> Result<Vec<Value>> {
        let mut out = vec![Value::Null; self.latest() as usize + 1];
        self.visit_all(doc, from, complements, |k, seen, _| {
            out[k as usize] = seen.clone()
        })?;
        Ok(out)
    }

    /// Calls `seen(k, view, same_as)` with the document's view at every
    /// version `k` (element `k` of [`MigrationSet::translate_all`]), `from`
    /// first, then down to 0, then up to the latest, without copying the
    /// document for each version: what needs only to look at the views
    /// (hashing them) copies nothing. The view at `from` is `doc` itself
    /// (the same reference) unless its stamp had to be lowered. `same_as`
    /// names a version whose view, given earlier, this one equals (the
    /// step between them did not apply), so a caller that derives
    /// something from each view need not derive it again.
    pub fn visit_all(
        &self,
        doc: &Value,
        from: u32,
        complements: &mut dyn Complements,
        mut seen: impl FnMut(u32, &Value, Option<u32>),
    ) -> Result<()> {
        if from > self.latest() {
            return Err(LensError::NoSuchVersion {
                asked: from,
                latest: self.latest(),
            });
        }
        // `translate` ends a walk down by lowering a stamp left above the
        // target; the walk carries the document as the steps leave it and
        // a view that needs that fix gets it on a copy of its own.
        // (True when the view needed that fix.)
        let mut settled = |at: &Value, k: u32, same_as: Option<u32>| {
            if self.stamp_of(at).is_some_and(|s| s > k) {
                let mut fixed = at.clone();
                self.set_stamp(&mut fixed, Some(k), None);
                seen(k, &fixed, None);
                true
            } else {
                seen(k, at, same_as);
                false
            }
        };
        let from_fixed = settled(doc, from, None);
        // Each walk works on a copy of its own, made only when it moves.
        let mut down = if from > 0 { doc.clone() } else { Value::Null };
        for version in (1..=from).rev() {
            let kept = complements.get(version);
            // The walks' copies are dropped on an error: no backup.
            let same_as =
                match self.down_in_place(version, &mut down, kept.as_ref(), &mut Backup::None)? {
                    StepOutcome::Applied(done) => {
                        complements.put(version, done);
                        None
                    }
                    // Untouched: the view above, unless that one's stamp was
                    // lowered (then this one's is too, and `settled` says so).
                    StepOutcome::Skipped => Some(version),
                };
            settled(&down, version - 1, same_as);
        }
        drop(down);
        let mut up = if from < self.latest() {
            doc.clone()
        } else {
            Value::Null
        };
        for version in from + 1..=self.latest() {
            let kept = complements.get(version);
            let same_as =
                match self.up_in_place(version, &mut up, kept.as_ref(), &mut Backup::None)? {
                    StepOutcome::Applied(done) => {
                        complements.put(version, done);
                        None
                    }
                    // Untouched: the view below, unless that was `doc` with
                    // its stamp lowered.
                    StepOutcome::Skipped if version - 1 > from || !from_fixed => Some(version - 1),
                    StepOutcome::Skipped => None,
                };
            seen(version, &up, same_as);
        }
        Ok(())
    }

    /// A checksum of the whole set: changes when any file or the stamp name changes.
    pub fn checksum(&self) -> String {
        let mut all = self.stamp.clone();
        for m in &self.migrations {
            all.push(':');
            all.push_str(&m.checksum);
        }
        checksum(all.as_bytes())
    }
}

/// A copy of a document taken before a step changes it in place, to put
/// back when a later step fails.
enum Backup {
    /// The caller drops the document on an error: no copy.
    None,
    /// The copy, once a step has changed the document.
    Keep(Option<Value>),
}

impl Backup {
    /// Copies `doc` unless a copy is held already (or none is wanted).
    fn save(&mut self, doc: &Value) {
        if let Backup::Keep(slot @ None) = self {
            *slot = Some(doc.clone());
        }
    }

    /// Runs `change` on `doc` in place and, when it fails, puts back the
    /// copy it saved before its first change: `doc` is changed entirely or
    /// not at all.
    fn all_or_nothing<T>(
        doc: &mut Value,
        change: impl FnOnce(&mut Value, &mut Backup) -> Result<T>,
    ) -> Result<T> {
        let mut backup = Backup::Keep(None);
        let outcome = change(doc, &mut backup);
        if outcome.is_err() {
            if let Backup::Keep(Some(copy)) = backup {
                *doc = copy;
            }
        }
        outcome
    }
}
