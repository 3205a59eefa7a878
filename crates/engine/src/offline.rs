//! Work on documents outside any database: `rewind check` and `rewind translate`.

use crate::{EngineError, Result};
use rewind_lens::laws::{check_laws, MigrationReport};
use rewind_lens::{Complements, MigrationSet};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;

/// Reads JSON-lines documents; an unparsable line is reported as `file:line`.
pub fn read_json_lines(name: &Path, reader: impl BufRead) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| EngineError::Io {
            path: name.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let doc: Value = serde_json::from_str(&line).map_err(|e| EngineError::Input {
            what: format!("{}:{}", name.display(), index + 1),
            reason: format!("not a JSON document: {e}"),
        })?;
        if !doc.is_object() {
            return Err(EngineError::Input {
                what: format!("{}:{}", name.display(), index + 1),
                reason: "a document must be a JSON object".into(),
            });
        }
        docs.push(doc);
    }
    Ok(docs)
}

/// The result of `rewind check`: one report per migration, in version order.
pub struct CheckReport {
    /// `(migration id, checksum, when_after derived?, ops, report)`.
    pub migrations: Vec<(String, String, bool, usize, MigrationReport)>,
}

impl CheckReport {
    /// True when no law is broken.
    pub fn holds(&self) -> bool {
        self.migrations.iter().all(|m| m.4.broken.is_empty())
    }
}

/// Checks the round-trip laws of `set` on `samples` (documents at version 0)
/// and on `generated` generated documents per migration.
pub fn check(set: &MigrationSet, samples: &[Value], generated: u32) -> CheckReport {
    let reports = check_laws(set, samples, generated);
    CheckReport {
        migrations: set
            .migrations()
            .iter()
            .zip(reports)
            .map(|(m, r)| {
                (
                    m.id.clone(),
                    m.checksum.clone(),
                    m.when_after_derived,
                    m.ops.len(),
                    r,
                )
            })
            .collect(),
    }
}

/// A complements file: JSON lines `{"_id", "migration", "complement"}`.
/// Later lines win over earlier ones for the same document and migration.
pub struct ComplementFile {
    kept: HashMap<(String, u32), Value>,
    ids: Vec<String>,
}

impl ComplementFile {
    /// A file with no complement in it.
    pub fn empty(set: &MigrationSet) -> ComplementFile {
        ComplementFile {
            kept: HashMap::new(),
            ids: set.migrations().iter().map(|m| m.id.clone()).collect(),
        }
    }

    /// Reads `path`; a missing file is empty.
    pub fn read(path: &Path, set: &MigrationSet) -> Result<ComplementFile> {
        let mut file = ComplementFile::empty(set);
        let kept = &mut file.kept;
        if path.exists() {
            let file = std::fs::File::open(path).map_err(|source| EngineError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            for (index, record) in read_json_lines(path, std::io::BufReader::new(file))?
                .into_iter()
                .enumerate()
            {
                let at = || format!("{}:{}", path.display(), index + 1);
                let id = record.get("_id").and_then(Value::as_str);
                let migration = record.get("migration").and_then(Value::as_str);
                let (Some(id), Some(migration)) = (id, migration) else {
                    return Err(EngineError::Input {
                        what: at(),
                        reason: "a complement record needs `_id` and `migration`".into(),
                    });
                };
                let version = version_of(set, migration).ok_or_else(|| EngineError::Input {
                    what: at(),
                    reason: format!("unknown migration `{migration}`"),
                })?;
                let complement = record.get("complement").cloned().unwrap_or(Value::Null);
                kept.insert((id.to_owned(), version), complement);
            }
        }
        Ok(file)
    }

    /// The complements of one document, as the lens reads and writes them.
    pub fn for_doc<'a>(
        &'a mut self,
        id: &str,
        out: Option<&'a mut dyn Write>,
    ) -> DocComplements<'a> {
        DocComplements {
            file: self,
            id: id.to_owned(),
            out,
            error: None,
        }
    }
}

fn version_of(set: &MigrationSet, id: &str) -> Option<u32> {
    set.migrations()
        .iter()
        .position(|m| m.id == id)
        .map(|i| i as u32 + 1)
}

/// One document's view of a [`ComplementFile`]; new complements are appended to `out`.
pub struct DocComplements<'a> {
    file: &'a mut ComplementFile,
    id: String,
    out: Option<&'a mut dyn Write>,
    /// The first write error, if any.
    pub error: Option<std::io::Error>,
}

impl Complements for DocComplements<'_> {
    fn get(&mut self, version: u32) -> Option<Value> {
        self.file
            .kept
            .get(&(self.id.clone(), version))
            .filter(|v| !v.is_null())
            .cloned()
    }

    fn put(&mut self, version: u32, complement: Option<Value>) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let migration = self
            .file
            .ids
            .get(version as usize - 1)
            .cloned()
            .unwrap_or_default();
        let record = json!({"_id": self.id, "migration": migration, "complement": complement});
        if let Err(e) = writeln!(out, "{record}") {
            self.error.get_or_insert(e);
        }
    }
}
