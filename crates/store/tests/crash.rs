//! SIGKILL a process that writes to the embedded store, then check that every
//! acknowledged batch is there, whole, and that no batch is half written.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use rewind_store::*;
use serde_json::json;

const CHILD_ENV: &str = "REWIND_STORE_CRASH_CHILD";
const BATCH: usize = 50;

/// In the child: write batches forever, printing each acknowledged batch number.
#[test]
fn crash_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = AnyStore::Sqlite(SqliteStore::open(&path).unwrap());
        // Continue after the batches of earlier rounds (batches are all or nothing).
        let start = s.info().await.unwrap().doc_count as usize / BATCH;
        for b in start.. {
            let docs = (0..BATCH).map(|i| json!({"_id": format!("b{b:06}-{i:03}"), "batch": b, "pad": "x".repeat(300)})).collect();
            let res = s.bulk_docs(docs, true).await.unwrap();
            assert!(res.iter().all(|r| r.is_ok()));
            println!("{b}");
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_batch_and_leaves_no_half_batch() {
    let dir = common::TempDir::new();
    let path = dir.path().join("crash.db");
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = None;
        let target = 5 + round * 20;
        while let Some(Ok(line)) = lines.next() {
            if let Ok(b) = line.trim().parse::<u64>() {
                acked = Some(b);
                if b >= target {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let acked = acked.expect("the child acknowledged batches");

        let s = AnyStore::Sqlite(SqliteStore::open(&path).unwrap());
        let all = s.all_docs(&AllDocsOptions::default()).await.unwrap();
        let mut per_batch = std::collections::BTreeMap::<u64, usize>::new();
        for row in &all.rows {
            let b: u64 = row.key[1..7].parse().unwrap();
            *per_batch.entry(b).or_default() += 1;
        }
        for (b, n) in &per_batch {
            assert_eq!(*n, BATCH, "round {round}: batch {b} is half written");
        }
        // Batch numbers continue across rounds; every acknowledged one is there.
        for b in 0..=acked {
            assert!(
                per_batch.contains_key(&b),
                "round {round}: acknowledged batch {b} was lost"
            );
        }
        let info = s.info().await.unwrap();
        assert_eq!(info.doc_count as usize, all.rows.len());
        let changes = s.changes(&ChangesOptions::default()).await.unwrap();
        assert_eq!(changes.results.len(), all.rows.len());
    }
}
