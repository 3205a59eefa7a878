//! Shared by the engine's integration tests.

use rewind_lens::{MigrationSet, DEFAULT_STAMP};
use rewind_testkit::cht_migrations;

/// The `examples/cht` migrations.
pub fn cht() -> MigrationSet {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(cht_migrations()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            files.push((path, text));
        }
    }
    MigrationSet::parse_files(&files, DEFAULT_STAMP).unwrap()
}

/// Document `id` of `store` as `get` answers it with `opts`.
pub async fn doc(
    store: &rewind_store::AnyStore,
    id: &str,
    opts: &rewind_store::GetOptions,
) -> serde_json::Value {
    use rewind_store::Store;
    store.get(id, opts).await.unwrap().into_doc().unwrap()
}
