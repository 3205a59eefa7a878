//! Several handles and several processes on one embedded file at once, as
//! `rewind serve` and `rewind upgrade` run: no sequence is given twice, every
//! handle sees the others' documents, counts and `update_seq`, and
//! `wait_for_change` wakes for writes made elsewhere.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rewind_store::*;
use serde_json::{json, Value};

const CHILD_ENV: &str = "REWIND_STORE_CONCURRENT_CHILD";
const MODE_ENV: &str = "REWIND_STORE_CONCURRENT_MODE";

fn open(path: &Path) -> AnyStore {
    AnyStore::Sqlite(SqliteStore::open(path).unwrap())
}

fn seq(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("sequence {v} is not a number"))
}

fn batch(prefix: &str, round: usize, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"_id": format!("{prefix}-{round:04}-{i:03}"), "round": round}))
        .collect()
}

/// Checks the whole file through `s`: `ids` are there, each once in the
/// changes feed, with distinct increasing sequences; counts and `update_seq` agree.
async fn check_all(s: &AnyStore, ids: &BTreeSet<String>) {
    let all = s.all_docs(&AllDocsOptions::default()).await.unwrap();
    let got: BTreeSet<String> = all.rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(&got, ids);
    let changes = s.changes(&ChangesOptions::default()).await.unwrap();
    assert_eq!(changes.results.len(), ids.len(), "each document once");
    let feed: BTreeSet<String> = changes.results.iter().map(|r| r.id.clone()).collect();
    assert_eq!(&feed, ids);
    let seqs: Vec<u64> = changes.results.iter().map(|r| seq(&r.seq)).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequences increase");
    let info = s.info().await.unwrap();
    assert_eq!(info.doc_count as usize, ids.len());
    assert_eq!(seq(&info.update_seq), *seqs.last().unwrap());
    assert_eq!(seq(&changes.last_seq), *seqs.last().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_handles_write_interleaved_batches() {
    let dir = common::TempDir::new();
    let path = dir.path().join("two.db");
    let (a, b) = (open(&path), open(&path));
    let mut ids = BTreeSet::new();
    for round in 0..20 {
        // Alternate, then race.
        let (ba, bb) = (batch("a", round, 25), batch("b", round, 25));
        ids.extend(
            ba.iter()
                .chain(&bb)
                .map(|d| d["_id"].as_str().unwrap().to_owned()),
        );
        let (ra, rb) = if round % 2 == 0 {
            let ra = a.bulk_docs(ba, true).await.unwrap();
            (ra, b.bulk_docs(bb, true).await.unwrap())
        } else {
            let (ra, rb) = tokio::join!(a.bulk_docs(ba, true), b.bulk_docs(bb, true));
            (ra.unwrap(), rb.unwrap())
        };
        assert!(ra.iter().chain(&rb).all(|r| r.is_ok()));
        // Each sees the other's last write at once.
        let (ia, ib) = (a.info().await.unwrap(), b.info().await.unwrap());
        assert_eq!(ia.update_seq, ib.update_seq);
        assert_eq!(ia.doc_count as usize, ids.len());
        assert_eq!(ib.doc_count as usize, ids.len());
    }
    let from_b = format!("b-{:04}-{:03}", 19, 24);
    assert!(matches!(
        a.get(&from_b, &GetOptions::default()).await.unwrap(),
        GetResult::Doc(_)
    ));
    // Edits of one document through both handles: the second needs the first's rev.
    let r1 = a
        .bulk_docs(vec![json!({"_id": "shared"})], true)
        .await
        .unwrap();
    let rev1 = r1[0].rev.clone().unwrap();
    let r2 = b
        .bulk_docs(vec![json!({"_id": "shared", "_rev": rev1, "n": 2})], true)
        .await
        .unwrap();
    assert!(r2[0].is_ok(), "{:?}", r2[0]);
    let stale = a
        .bulk_docs(vec![json!({"_id": "shared", "_rev": rev1, "n": 3})], true)
        .await
        .unwrap();
    assert_eq!(stale[0].error.as_deref(), Some("conflict"));
    ids.insert("shared".into());
    check_all(&a, &ids).await;
    check_all(&b, &ids).await;
    // `_local` documents and revs_limit too.
    a.put_local("_local/x", json!({"v": 1})).await.unwrap();
    let got = b.get_local("_local/x").await.unwrap();
    assert_eq!(got["_rev"], "0-1");
    a.set_revs_limit(7).await.unwrap();
    assert_eq!(b.revs_limit().await.unwrap(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_create_through_another_handle() {
    let dir = common::TempDir::new();
    let path = dir.path().join("del.db");
    let (a, b) = (open(&path), open(&path));
    a.bulk_docs(batch("a", 0, 10), true).await.unwrap();
    let before = seq(&b.info().await.unwrap().update_seq);
    a.delete_db().await.unwrap();
    let err = b.bulk_docs(batch("b", 0, 1), true).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(!b.exists().await.unwrap());
    assert!(matches!(
        b.info().await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    b.create_db().await.unwrap();
    assert!(matches!(
        a.create_db().await.unwrap_err(),
        StoreError::FileExists { .. }
    ));
    assert!(a.exists().await.unwrap());
    a.bulk_docs(batch("a", 1, 1), true).await.unwrap();
    // Sequences never go back, not even across a delete seen by another handle.
    let after = seq(&b.info().await.unwrap().update_seq);
    assert!(after > before, "{after} > {before}");
    assert_eq!(b.info().await.unwrap().doc_count, 1);
    // And a handle opened after the delete continues from there.
    let c = open(&path);
    assert_eq!(seq(&c.info().await.unwrap().update_seq), after);
}

/// Many handles opening one new file at once, arriving while the first
/// creates the schema (50 PouchDB clients' first requests to a gateway open
/// a database's companion together): each one opens the store. An opener
/// that read the header before the schema's commit and the tables after it
/// took the file for another application's database.
#[test]
fn many_handles_create_one_new_file_at_once() {
    for round in 0..20 {
        let dir = common::TempDir::new();
        let path = dir.path().join(format!("new{round}.db"));
        let barrier = std::sync::Barrier::new(48);
        let uuids: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..48u64)
                .map(|i| {
                    let (path, barrier) = (&path, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        // Staggered: some arrive while the first is creating
                        // the schema (the first requests to a gateway).
                        std::thread::sleep(Duration::from_micros(i * 40));
                        SqliteStore::open(path).unwrap().uuid().to_owned()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(uuids.iter().all(|u| u == &uuids[0]), "{uuids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_change_wakes_for_another_handle() {
    let dir = common::TempDir::new();
    let path = dir.path().join("wait.db");
    let (a, b) = (open(&path), open(&path));
    a.bulk_docs(batch("a", 0, 1), true).await.unwrap();
    // Nothing happens: false after the timeout.
    let since = a.info().await.unwrap().update_seq;
    let t = Instant::now();
    assert!(!a
        .wait_for_change(&since, Duration::from_millis(500))
        .await
        .unwrap());
    assert!(t.elapsed() >= Duration::from_millis(450));

    for since in [since.clone(), json!("now")] {
        let waiter = {
            let (a, since) = (a.clone(), since.clone());
            tokio::spawn(async move {
                let woke = a
                    .wait_for_change(&since, Duration::from_secs(10))
                    .await
                    .unwrap();
                (woke, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!waiter.is_finished(), "woke before any write");
        b.bulk_docs(batch("b", 0, 1), true).await.unwrap();
        let written = Instant::now();
        b.bulk_docs(vec![json!({"_id": format!("w{since}")})], true)
            .await
            .unwrap();
        let (woke, at) = waiter.await.unwrap();
        assert!(woke);
        let delay = at.saturating_duration_since(written);
        assert!(delay < Duration::from_secs(1), "woke after {delay:?}");
    }
    // A change made before the wait began is seen at once.
    let old = json!(0);
    assert!(a
        .wait_for_change(&old, Duration::from_secs(5))
        .await
        .unwrap());
}

/// In a child process (run by the tests below): writes to the file named by
/// `CHILD_ENV` as `MODE_ENV` says, printing `child-done` at the end.
#[test]
fn concurrent_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mode = std::env::var(MODE_ENV).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = open(Path::new(&path));
        if let Some(prefix) = mode.strip_prefix("bulk:") {
            // 500 documents in batches of 10, so the two writers interleave.
            for round in 0..50 {
                let res = s.bulk_docs(batch(prefix, round, 10), true).await.unwrap();
                assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
                s.info().await.unwrap();
            }
        } else {
            s.bulk_docs(vec![json!({"_id": "from-child"})], true)
                .await
                .unwrap();
        }
        println!("\nchild-done");
    });
}

fn spawn_child(path: &Path, mode: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "concurrent_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .env(MODE_ENV, mode)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the child's `child-done`, then for its exit; panics if it failed.
fn finish(mut child: Child) -> Instant {
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut done = None;
    for line in lines {
        if line.unwrap().trim() == "child-done" {
            done = Some(Instant::now());
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed: {status}");
    done.expect("the child printed child-done")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_write_500_documents_each() {
    let dir = common::TempDir::new();
    // Both create the file too: it does not exist yet.
    let path = dir.path().join("procs.db");
    let children = [spawn_child(&path, "bulk:p"), spawn_child(&path, "bulk:q")];
    tokio::task::spawn_blocking(move || children.map(finish))
        .await
        .unwrap();
    let s = open(&path);
    let ids: BTreeSet<String> = ["p", "q"]
        .iter()
        .flat_map(|p| (0..50).flat_map(move |r| batch(p, r, 10)))
        .map(|d| d["_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1000);
    check_all(&s, &ids).await;
    assert_eq!(seq(&s.info().await.unwrap().update_seq), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_change_wakes_for_another_process() {
    let dir = common::TempDir::new();
    let path = dir.path().join("procwait.db");
    let a = open(&path);
    a.bulk_docs(batch("a", 0, 1), true).await.unwrap();
    let since = a.info().await.unwrap().update_seq;
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move {
            let woke = a
                .wait_for_change(&since, Duration::from_secs(30))
                .await
                .unwrap();
            (woke, Instant::now())
        })
    };
    let child = spawn_child(&path, "one");
    let done = tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap();
    let (woke, at) = waiter.await.unwrap();
    assert!(woke);
    let delay = at.saturating_duration_since(done);
    assert!(delay < Duration::from_secs(1), "woke after {delay:?}");
    assert!(matches!(
        a.get("from-child", &GetOptions::default()).await.unwrap(),
        GetResult::Doc(_)
    ));
    assert_eq!(a.info().await.unwrap().doc_count, 2);
}
