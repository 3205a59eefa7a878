//! Loading documents into a database (sample data for rehearsals and benches).

use crate::{EngineError, Result};
use rewind_store::{AllDocsOptions, AnyStore, Store, StoreError};
use serde_json::Value;
use std::collections::HashMap;

/// What [`load`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Documents written.
    pub written: u64,
    /// Documents already there with the same body (a load run again, or
    /// extended: `rewind sample --docs 1000` after `--docs 100`).
    pub present: u64,
}

/// Writes `docs` into `store` (created if missing) with `_bulk_docs`, in
/// batches of `batch`; calls `progress` with the count done so far.
///
/// A document already there with the same body is left as it is (counted
/// as present), so a load can be run again or extended. One already there
/// with another body (edited, migrated) is refused: before anything is
/// written when it is in the first batch (the usual case: the same sample
/// loaded into a database that has moved on), else when its batch meets it.
pub async fn load(
    store: &AnyStore,
    docs: impl Iterator<Item = Value>,
    batch: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<Loaded> {
    if !store.exists().await? {
        match store.create_db().await {
            Ok(()) | Err(StoreError::FileExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut loaded = Loaded::default();
    let mut docs = docs.peekable();
    let mut first = true;
    while docs.peek().is_some() {
        let mut buffer: Vec<Value> = docs.by_ref().take(batch).collect();
        if std::mem::take(&mut first) {
            let ids: Vec<String> = buffer.iter().map(id_of).collect();
            let same = already_there(store, &buffer, &ids).await?;
            loaded.present += same.len() as u64;
            buffer.retain(|doc| !same.contains(&id_of(doc)));
        }
        let by_id: HashMap<String, Value> = buffer.iter().map(|d| (id_of(d), d.clone())).collect();
        let mut conflicts = Vec::new();
        for result in store.bulk_docs(buffer, true).await? {
            match result.error.as_deref() {
                None => loaded.written += 1,
                Some("conflict") => conflicts.push(result.id),
                Some(error) => {
                    return Err(EngineError::Input {
                        what: format!("document {}", result.id),
                        reason: format!("{error}: {}", result.reason.unwrap_or_default()),
                    })
                }
            }
        }
        if !conflicts.is_empty() {
            let wanted: Vec<Value> = conflicts
                .iter()
                .filter_map(|id| by_id.get(id).cloned())
                .collect();
            loaded.present += already_there(store, &wanted, &conflicts).await?.len() as u64;
        }
        progress(loaded.written + loaded.present);
    }
    Ok(loaded)
}

fn id_of(doc: &Value) -> String {
    doc.get("_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The ids of `docs` (named by `ids`) that `store` holds with the same body;
/// an error naming the first it holds with another body.
async fn already_there(
    store: &AnyStore,
    docs: &[Value],
    ids: &[String],
) -> Result<std::collections::HashSet<String>> {
    let rows = store
        .all_docs(&AllDocsOptions {
            keys: Some(ids.to_vec()),
            include_docs: true,
            ..AllDocsOptions::default()
        })
        .await?
        .rows;
    let wanted: HashMap<&str, &Value> = ids.iter().map(String::as_str).zip(docs).collect();
    let mut same = std::collections::HashSet::new();
    for row in rows {
        let (Some(mut stored), Some(doc)) = (row.doc, wanted.get(row.key.as_str())) else {
            continue;
        };
        if let Some(object) = stored.as_object_mut() {
            object.shift_remove("_rev");
        }
        if &stored != *doc {
            return Err(EngineError::Input {
                what: format!("document {}", row.key),
                reason: "the database already holds it with another body (edited or migrated \
                         since it was loaded); load into a new database, or choose other \
                         documents (another --seed)"
                    .into(),
            });
        }
        same.insert(row.key);
    }
    Ok(same)
}
