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
