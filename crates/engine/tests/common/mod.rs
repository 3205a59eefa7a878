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
#[allow(dead_code)] // each test binary compiles this module; not all use it.
pub async fn doc(
    store: &rewind_store::AnyStore,
    id: &str,
    opts: &rewind_store::GetOptions,
) -> serde_json::Value {
    use rewind_store::Store;
    store.get(id, opts).await.unwrap().into_doc().unwrap()
}

/// Runs `db` to version `to` with `opts`, without progress reports; the run
/// must succeed.
#[allow(dead_code)] // each test binary compiles this module; not all run.
pub async fn run_to(
    db: &rewind_engine::state::Database,
    set: &MigrationSet,
    to: u32,
    opts: &rewind_engine::run::RunOptions,
) -> rewind_engine::state::Run {
    rewind_engine::run::run(
        db,
        set,
        to,
        opts,
        &mut |_: &rewind_engine::run::Progress| {},
    )
    .await
    .unwrap()
}
