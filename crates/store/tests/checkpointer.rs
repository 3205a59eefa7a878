//! Each embedded file open in a process has one thread that copies its WAL
//! into the database file beside the writer; it ends with the last handle
//! on the file. (Its own test binary: it counts the process's threads.)

mod common;

use std::time::{Duration, Instant};

use common::TempDir;
use rewind_store::*;
use serde_json::json;

/// The threads of this process named `rewind-wal` (Linux).
fn checkpointers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == "rewind-wal")
        })
        .count()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_checkpointer_per_open_file_ending_with_its_last_handle() {
    let dir = TempDir::new();
    let path = dir.path().join("c.db").display().to_string();
    let companion = format!("{path}{COMPANION_SUFFIX}");
    let other = dir.path().join("d.db").display().to_string();
    assert_eq!(checkpointers(), 0);
    {
        let data = rewind_store::open(&path).await.unwrap();
        let journal = rewind_store::open(&companion).await.unwrap();
        for round in 0..5 {
            let docs = (0..200)
                .map(|i| json!({"_id": format!("{round}-{i:03}"), "pad": "x".repeat(500)}))
                .collect();
            data.bulk_docs(docs, true).await.unwrap();
            journal
                .bulk_docs(vec![json!({"_id": format!("j{round}")})], true)
                .await
                .unwrap();
        }
        // The data and its companion share the file's writer and its checkpointer.
        assert_eq!(checkpointers(), 1);
        let second = rewind_store::open(&other).await.unwrap();
        // A new thread names itself once it runs: wait for it (the count
        // was read too early once, in CI).
        until("the second file's checkpointer starts", || {
            checkpointers() == 2
        })
        .await;
        drop(second);
        until("the second file's checkpointer ends", || {
            checkpointers() == 1
        })
        .await;
        assert_eq!(data.info().await.unwrap().doc_count, 1000);
    }
    until("the first file's checkpointer ends", || {
        checkpointers() == 0
    })
    .await;
    // Everything committed is in the file, read by a new handle.
    let data = rewind_store::open(&path).await.unwrap();
    assert_eq!(data.info().await.unwrap().doc_count, 1000);
}
