//! Loading documents into a database (sample data for rehearsals and benches).

use crate::{EngineError, Result};
use rewind_store::{AnyStore, Store, StoreError};
use serde_json::Value;

/// Writes `docs` into `store` (created if missing) with `_bulk_docs`, in
/// batches of `batch`; calls `progress` with the count written so far.
pub async fn load(
    store: &AnyStore,
    docs: impl Iterator<Item = Value>,
    batch: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    if !store.exists().await? {
        match store.create_db().await {
            Ok(()) | Err(StoreError::FileExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut written = 0u64;
    let mut buffer = Vec::with_capacity(batch);
    let mut docs = docs.peekable();
    while docs.peek().is_some() {
        buffer.extend(docs.by_ref().take(batch));
        let n = buffer.len() as u64;
        for result in store.bulk_docs(std::mem::take(&mut buffer), true).await? {
            if let Some(error) = result.error {
                return Err(EngineError::Input {
                    what: format!("document {}", result.id),
                    reason: format!("{error}: {}", result.reason.unwrap_or_default()),
                });
            }
        }
        written += n;
        progress(written);
    }
    Ok(written)
}
