//! `copy` between the embedded store and pouchdb-server: out and back in
//! gives the same revision trees and bodies, and an interrupted copy resumes.

mod common;

use common::h;
use rewind_store::*;
use serde_json::{json, Value};

/// Every leaf of every document (with `_revisions` and attachment data), sorted.
async fn snapshot(s: &AnyStore) -> Vec<Value> {
    snapshot_with(s, true).await
}

/// The same without attachments' `revpos`, which pouchdb-server rewrites (NOTES.md).
async fn snapshot_no_revpos(s: &AnyStore) -> Vec<Value> {
    snapshot_with(s, false).await
}

async fn snapshot_with(s: &AnyStore, revpos: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let changes = s.changes(&ChangesOptions::default()).await.unwrap();
    let mut ids: Vec<String> = changes.results.into_iter().map(|r| r.id).collect();
    ids.sort();
    for id in ids {
        let opts = GetOptions {
            open_revs: Some(OpenRevs::All),
            revs: true,
            attachments: true,
            ..Default::default()
        };
        let GetResult::Revs(list) = s.get(&id, &opts).await.unwrap() else {
            panic!()
        };
        let mut docs: Vec<Value> = list
            .into_iter()
            .map(|o| match o {
                OpenRev::Ok(d) => d,
                OpenRev::Missing(r) => panic!("{id} {r} missing"),
            })
            .collect();
        docs.sort_by_key(|d| d["_rev"].as_str().unwrap().to_owned());
        if !revpos {
            for d in &mut docs {
                if let Some(Value::Object(atts)) = d.get_mut("_attachments") {
                    for a in atts.values_mut() {
                        a.as_object_mut().unwrap().remove("revpos");
                    }
                }
            }
        }
        out.extend(docs);
    }
    out
}

async fn fill(s: &AnyStore, from: usize, n: usize) {
    let docs: Vec<Value> = (from..from + n)
        .map(|i| json!({"_id": format!("doc{i:04}"), "type": "person", "n": i, "nested": {"b": [1, 2, {"c": "x"}], "a": true}}))
        .collect();
    assert!(s
        .bulk_docs(docs, true)
        .await
        .unwrap()
        .iter()
        .all(|r| r.is_ok()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_pouchdb_server_and_back_keeps_trees_bodies_and_attachments() {
    let src = common::sqlite_db();
    fill(&src, 0, 450).await;
    // A conflict, a tombstone, a deleted branch, an attachment, a long history, a local doc.
    let a = h('a');
    src.bulk_docs(
        vec![
            json!({"_id": "conf", "_rev": format!("2-{}", h('b')), "_revisions": {"start": 2, "ids": [h('b'), a]}, "side": "b"}),
            json!({"_id": "conf", "_rev": format!("2-{}", h('c')), "_revisions": {"start": 2, "ids": [h('c'), a]}, "side": "c"}),
            json!({"_id": "conf", "_rev": format!("3-{}", h('d')), "_revisions": {"start": 3, "ids": [h('d'), h('e'), a]}, "_deleted": true}),
        ],
        false,
    )
    .await
    .unwrap();
    let r = src.put(json!({"_id": "gone", "x": 1})).await.unwrap();
    src.put(json!({"_id": "gone", "_rev": r, "_deleted": true}))
        .await
        .unwrap();
    let mut rev = src.put(json!({"_id": "att", "_attachments": {"f.txt": {"content_type": "text/plain", "data": "aGVsbG8="}}})).await.unwrap();
    for i in 0..5 {
        let stub = json!({"f.txt": {"stub": true}});
        rev = src
            .put(json!({"_id": "att", "_rev": rev, "i": i, "_attachments": stub}))
            .await
            .unwrap();
    }
    // A first revision with an attachment: its body in the feed holds a stub,
    // so it is fetched with its data like the revisions with a history.
    src.put(json!({"_id": "att1", "_attachments": {"g.txt": {"content_type": "text/plain", "data": "d29ybGQ="}}}))
        .await
        .unwrap();
    src.put_local("_local/engine-state", json!({"version": 2}))
        .await
        .unwrap();
    src.put_local(
        "_local/phone-ckpt",
        json!({"replicator": "pouchdb", "last_seq": 9, "history": []}),
    )
    .await
    .unwrap();

    let mid = common::couch_db().await;
    let mut seen = Vec::new();
    let report = copy_in_batches(&src, &mid, 200, |p| seen.push(p))
        .await
        .unwrap();
    assert_eq!(seen.len(), 3, "progress after each batch: {seen:?}");
    assert_eq!(report.docs_seen, 454);
    assert_eq!((report.local_copied, report.local_skipped), (1, 1));
    assert_eq!(
        mid.get_local("_local/engine-state").await.unwrap()["version"],
        2
    );

    let back = common::sqlite_db();
    copy(&mid, &back, |_| {}).await.unwrap();
    let (before, after) = (
        snapshot_no_revpos(&src).await,
        snapshot_no_revpos(&back).await,
    );
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a);
    }
    assert_eq!(snapshot_no_revpos(&mid).await, before);
    // Between embedded stores, attachments keep their revpos too.
    let direct = common::sqlite_db();
    copy(&src, &direct, |_| {}).await.unwrap();
    assert_eq!(snapshot(&direct).await, snapshot(&src).await);

    // Copies in a page of one change at a time, where a document's body
    // never comes with the feed for a first revision: the same.
    let one_by_one = common::sqlite_db();
    copy_in_batches(&src, &one_by_one, 1, |_| {}).await.unwrap();
    assert_eq!(snapshot(&one_by_one).await, snapshot(&src).await);

    // Running again copies nothing and starts from the checkpoint.
    let again = copy(&src, &mid, |_| {}).await.unwrap();
    assert_eq!((again.docs_seen, again.revs_copied), (0, 0));
    assert_eq!(again.resumed_from, report.last_seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_copy_resumes_from_its_checkpoint() {
    let src = common::sqlite_db();
    // More than one default batch, so that the first is not the last.
    let n = DEFAULT_COPY_BATCH + DEFAULT_COPY_BATCH / 5;
    fill(&src, 0, n).await;
    let dst = common::sqlite_db();
    // Interrupt after the first batch: the progress callback panics, as a kill would stop it.
    let (s2, d2) = (src.store.clone(), dst.store.clone());
    let run = tokio::spawn(async move {
        let mut batches = 0;
        copy(&s2, &d2, |_| {
            batches += 1;
            if batches == 1 {
                panic!("interrupted");
            }
        })
        .await
    });
    assert!(run.await.is_err());
    let partial = dst.info().await.unwrap().doc_count;
    assert!(partial > 0 && partial < n as u64, "{partial}");
    let report = copy(&src, &dst, |_| {}).await.unwrap();
    assert_ne!(report.resumed_from, json!(0));
    assert_eq!(report.docs_seen, n as u64 - partial);
    assert_eq!(dst.info().await.unwrap().doc_count, n as u64);
    assert_eq!(snapshot(&src).await, snapshot(&dst).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_into_a_database_that_has_documents_merges_the_trees() {
    let src = common::sqlite_db();
    fill(&src, 0, 300).await;
    // The destination already holds one document as the source has it,
    // another edited on its own (a first revision of its own: a conflict
    // after the copy), and one the source does not have.
    let dst = common::couch_db().await;
    let same = src.get("doc0001", &GetOptions::default()).await.unwrap();
    let GetResult::Doc(same) = same else { panic!() };
    let mut same_with_history = same.clone();
    let rev = same["_rev"].as_str().unwrap().to_owned();
    same_with_history["_revisions"] = json!({"start": 1, "ids": [rev.trim_start_matches("1-")]});
    dst.bulk_docs(vec![same_with_history], false).await.unwrap();
    dst.put(json!({"_id": "doc0002", "mine": true}))
        .await
        .unwrap();
    dst.put(json!({"_id": "only-here"})).await.unwrap();

    let report = copy(&src, &dst, |_| {}).await.unwrap();
    assert_eq!(report.docs_seen, 300);
    assert_eq!(
        report.revs_copied, 299,
        "doc0001's revision was there already"
    );
    assert_eq!(dst.info().await.unwrap().doc_count, 301);
    let opts = GetOptions {
        open_revs: Some(OpenRevs::All),
        ..Default::default()
    };
    let GetResult::Revs(leaves) = dst.get("doc0002", &opts).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        leaves.len(),
        2,
        "both first revisions of doc0002: {leaves:?}"
    );
    let src_leaves = snapshot(&src).await;
    let dst_leaves = snapshot(&dst).await;
    for leaf in &src_leaves {
        assert!(dst_leaves.contains(leaf), "{leaf} not copied as it is");
    }
}
