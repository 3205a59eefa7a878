//! Embedded store load benchmark: `cargo bench -p rewind-store --bench load [N]`.
//! Inserts N CHT-sized documents (default 100,000) with `bulk_docs` in
//! batches of 1000 and prints a table. Target: ≥ 30k docs/s.

use std::time::Instant;

use rewind_store::{AnyStore, ChangesOptions, SqliteStore, Store};
use serde_json::{json, Value};

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!("rewind-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = AnyStore::Sqlite(SqliteStore::open(dir.join("bench.db")).unwrap());
        let doc = |i: usize| -> Value {
            json!({"_id": format!("report-{i:08}"), "type": "data_record", "form": "pregnancy_visit",
                "reported_date": 1_700_000_000_000u64 + i as u64, "contact": {"_id": format!("c{}", i % 997), "parent": {"_id": "hc1"}},
                "fields": {"patient_id": format!("p{i}"), "lmp_date": "2024-01-02", "danger_signs": ["fever", "bleeding"],
                "visit": {"number": i % 9, "notes": "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor."}}})
        };
        let t = Instant::now();
        for start in (0..n).step_by(1000) {
            let batch: Vec<Value> = (start..(start + 1000).min(n)).map(doc).collect();
            store.bulk_docs(batch, true).await.unwrap();
        }
        let insert = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut since = json!(0);
        let mut seen = 0;
        loop {
            let c = store.changes(&ChangesOptions { since, limit: Some(1000), include_docs: true, ..Default::default() }).await.unwrap();
            if c.results.is_empty() {
                break;
            }
            seen += c.results.len();
            since = c.last_seq;
        }
        let read = t.elapsed().as_secs_f64();
        println!("| step | docs | seconds | docs/s |");
        println!("|---|---|---|---|");
        println!("| bulk_docs insert, 1000 per batch | {n} | {insert:.2} | {:.0} |", n as f64 / insert);
        println!("| changes include_docs, 1000 per page | {seen} | {read:.2} | {:.0} |", seen as f64 / read);
    });
    let _ = std::fs::remove_dir_all(&dir);
}
