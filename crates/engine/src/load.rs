//! Loading documents into a database (sample data for rehearsals and benches).

use crate::run::id_of;
use crate::{EngineError, Result};
use rewind_store::{AllDocsOptions, AnyStore, Store, StoreError};
use serde_json::Value;
use std::collections::{HashMap, HashSet};

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
/// with another body (edited, migrated) is refused before its batch is
/// written (the usual case, the same sample loaded into a database that has
/// moved on, is refused in the first batch: nothing written). Batches are
/// looked up before they are written from the first one on, while the one
/// before held documents already there (what was loaded before is a prefix
/// of `docs`); after that, a document already there fails as a conflict.
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
    let mut look_up = true;
    while docs.peek().is_some() {
        let mut buffer: Vec<Value> = docs.by_ref().take(batch).collect();
        if look_up {
            let same = already_there(store, &buffer).await?;
            look_up = !same.is_empty();
            loaded.present += same.len() as u64;
            buffer.retain(|doc| !same.contains(&id_of(doc)));
        }
        for result in store.bulk_docs(buffer, true).await? {
            if let Some(error) = result.error {
                return Err(EngineError::Input {
                    what: format!("document {}", result.id),
                    reason: format!("{error}: {}", result.reason.unwrap_or_default()),
                });
            }
            loaded.written += 1;
        }
        progress(loaded.written + loaded.present);
    }
    Ok(loaded)
}

/// The ids of `docs` that `store` holds with the same body; an error naming
/// the first it holds with another body.
async fn already_there(store: &AnyStore, docs: &[Value]) -> Result<HashSet<String>> {
    let ids: Vec<String> = docs.iter().map(id_of).collect();
    let rows = store
        .all_docs(&AllDocsOptions {
            keys: Some(ids.clone()),
            include_docs: true,
            ..AllDocsOptions::default()
        })
        .await?
        .rows;
    let wanted: HashMap<&str, &Value> = ids.iter().map(String::as_str).zip(docs).collect();
    let mut same = HashSet::new();
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
