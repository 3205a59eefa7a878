//! A journal another writer changes under a run (`rewind serve` journals
//! the translations of phones' pushes while an upgrade runs) makes the run
//! resume from its checkpoint, not fail.

use rewind_engine::run::{run, Progress, RunOptions};
use rewind_engine::state::Database;
use rewind_lens::migration::NoComplements;
use rewind_store::{GetOptions, Store};
use rewind_testkit::{load_sample, TempDir};

mod common;
use common::cht;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_finishes_while_another_writer_rewrites_journals() {
    let dir = TempDir::new();
    let target = dir.file("medic.db");
    let docs = load_sample(&target, 300, 11).await;
    let ids: Vec<String> = docs
        .iter()
        .filter_map(|d| d.get("_id").and_then(|v| v.as_str()).map(str::to_owned))
        .collect();
    let set = cht();
    let db = Database::open(&target).await.unwrap();
    let other = Database::open(&target).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let rewrites = Arc::new(AtomicU64::new(0));
    // The other writer: creates empty journals and rewrites existing ones
    // unchanged (a new revision, as a gateway merging into one would),
    // round and round.
    let writer = {
        let (stop, rewrites, ids) = (stop.clone(), rewrites.clone(), ids.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for id in &ids {
                    let key = format!("journal:{id}");
                    // An empty journal is what no journal means.
                    let doc = match other.state.get(&key, &GetOptions::default()).await {
                        Ok(found) => found.into_doc(),
                        Err(_) => Some(serde_json::json!({ "_id": key })),
                    };
                    if let Some(doc) = doc {
                        if other.state.put(doc).await.is_ok() {
                            rewrites.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let opts = RunOptions {
        batch: 50,
        ..RunOptions::default()
    };
    let finished = run(&db, &set, set.latest(), &opts, &mut |_: &Progress| {}).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let finished = finished.expect("the upgrade gave up on a journal race");
    assert_eq!(finished.outcome, "done");
    assert!(
        rewrites.load(Ordering::Relaxed) > 0,
        "the other writer never rewrote a journal: the test tested nothing"
    );
    for id in &ids {
        let doc = common::doc(&db.data, id, &GetOptions::default()).await;
        // Already in the latest shape: translating it from its stamp's
        // version to the latest changes nothing.
        let from = set.stamp_of(&doc).unwrap_or(0);
        let mut again = doc.clone();
        set.translate(&mut again, from, set.latest(), &mut NoComplements)
            .unwrap();
        assert_eq!(again, doc, "{id} was not migrated");
    }
}
