//! One suite, two backends: every scenario runs against the embedded store and
//! against a real pouchdb-server, and asserts the same answers.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::h;
use rewind_store::*;
use serde_json::{json, Value};

fn rev_of(d: &Value) -> String {
    d["_rev"].as_str().unwrap().to_owned()
}

fn generation(rev: &str) -> u64 {
    rev.split('-').next().unwrap().parse().unwrap()
}

async fn doc(s: &AnyStore, id: &str, opts: GetOptions) -> Value {
    s.get(id, &opts).await.unwrap().into_doc().unwrap()
}

async fn open_revs_all(s: &AnyStore, id: &str) -> Vec<Value> {
    let opts = GetOptions {
        open_revs: Some(OpenRevs::All),
        revs: true,
        ..Default::default()
    };
    let GetResult::Revs(list) = s.get(id, &opts).await.unwrap() else {
        panic!("open_revs answers a list")
    };
    let mut docs: Vec<Value> = list
        .into_iter()
        .map(|o| match o {
            OpenRev::Ok(d) => d,
            OpenRev::Missing(r) => panic!("leaf {r} missing"),
        })
        .collect();
    docs.sort_by_key(rev_of);
    docs
}

async fn replicate(s: &AnyStore, docs: Vec<Value>) {
    let failed = s.bulk_docs(docs, false).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
}

both!(
    conflicts_from_replication_pick_the_same_winner,
    delete_then_recreate_extends_the_deleted_branch,
    a_stale_rev_is_a_409_and_writes_nothing,
    revs_diff_lists_what_is_missing_and_possible_ancestors,
    changes_list_each_document_once_at_its_latest_change,
    local_docs_have_no_history_and_stay_out_of_changes,
    attachments_are_stubs_unless_asked_for_and_survive_edits,
    history_is_stemmed_at_revs_limit,
    bulk_get_and_all_docs_answer_like_couchdb,
    wait_for_change_wakes_on_a_write_and_times_out_otherwise,
    malformed_documents_are_refused_and_nothing_is_written,
    live_docs_by_id_pages_documents_with_a_live_leaf_in_id_order,
    live_leaf_revs_lists_live_leaves_winner_first_in_one_request,
);

async fn conflicts_from_replication_pick_the_same_winner(s: &AnyStore) {
    let r1 = format!("1-{}", h('a'));
    replicate(s, vec![json!({"_id": "d", "_rev": r1, "v": 1})]).await;
    let b = json!({"_id": "d", "_rev": format!("2-{}", h('b')), "_revisions": {"start": 2, "ids": [h('b'), h('a')]}, "v": "b"});
    let c = json!({"_id": "d", "_rev": format!("2-{}", h('c')), "_revisions": {"start": 2, "ids": [h('c'), h('a')]}, "v": "c"});
    replicate(s, vec![b.clone(), c]).await;
    replicate(s, vec![b]).await; // known revisions are no-ops

    let d = doc(
        s,
        "d",
        GetOptions {
            conflicts: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        rev_of(&d),
        format!("2-{}", h('c')),
        "ties go to the higher hash"
    );
    assert_eq!(d["v"], "c");
    assert_eq!(d["_conflicts"], json!([format!("2-{}", h('b'))]));
    let leaves = open_revs_all(s, "d").await;
    assert_eq!(leaves.len(), 2);
    assert_eq!(
        leaves[0]["_revisions"],
        json!({"start": 2, "ids": [h('b'), h('a')]})
    );

    // Deleting the winner on its branch makes the other leaf win; no conflict is left.
    let del = json!({"_id": "d", "_rev": format!("3-{}", h('d')), "_deleted": true,
        "_revisions": {"start": 3, "ids": [h('d'), h('c'), h('a')]}});
    replicate(s, vec![del]).await;
    let d = doc(
        s,
        "d",
        GetOptions {
            conflicts: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(rev_of(&d), format!("2-{}", h('b')));
    assert!(d.get("_conflicts").is_none());
    let info = s.info().await.unwrap();
    assert_eq!((info.doc_count, info.doc_del_count), (1, 0));

    // A longer branch wins over a higher hash.
    let e = json!({"_id": "d", "_rev": format!("3-{}", h('1')), "_revisions": {"start": 3, "ids": [h('1'), h('b'), h('a')]}, "v": "e"});
    replicate(s, vec![e]).await;
    assert_eq!(
        rev_of(&doc(s, "d", GetOptions::default()).await),
        format!("3-{}", h('1'))
    );
}

async fn delete_then_recreate_extends_the_deleted_branch(s: &AnyStore) {
    let r1 = s.put(json!({"_id": "p", "name": "x"})).await.unwrap();
    assert_eq!(generation(&r1), 1);
    let r2 = s
        .put(json!({"_id": "p", "_rev": r1, "_deleted": true}))
        .await
        .unwrap();
    assert_eq!(generation(&r2), 2);
    let err = s.get("p", &GetOptions::default()).await.unwrap_err();
    assert_eq!(err.status(), 404, "{err}");
    if let AnyStore::Sqlite(_) = s {
        // CouchDB says "deleted" too; pouchdb-server says "missing" (NOTES.md).
        assert_eq!(err.couch_error().1, "deleted");
    }
    let old = doc(
        s,
        "p",
        GetOptions {
            rev: Some(r1.clone()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(old["name"], "x");
    let info = s.info().await.unwrap();
    assert_eq!(info.doc_count, 0);
    if let AnyStore::Sqlite(_) = s {
        // pouchdb-server does not count deleted documents (NOTES.md).
        assert_eq!(info.doc_del_count, 1);
    }

    let r3 = s.put(json!({"_id": "p", "name": "back"})).await.unwrap();
    assert_eq!(
        generation(&r3),
        3,
        "re-creation continues the deleted branch"
    );
    let d = doc(
        s,
        "p",
        GetOptions {
            revs: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(d["name"], "back");
    assert_eq!(d["_revisions"]["ids"].as_array().unwrap().len(), 3);
    let info = s.info().await.unwrap();
    assert_eq!((info.doc_count, info.doc_del_count), (1, 0));
    let missing = s.get("nope", &GetOptions::default()).await.unwrap_err();
    assert_eq!(
        (missing.status(), missing.couch_error().1.as_str()),
        (404, "missing")
    );
}

async fn a_stale_rev_is_a_409_and_writes_nothing(s: &AnyStore) {
    let r1 = s.put(json!({"_id": "a", "n": 1})).await.unwrap();
    let r2 = s
        .put(json!({"_id": "a", "_rev": r1, "n": 2}))
        .await
        .unwrap();
    let stale = s
        .bulk_docs(
            vec![
                json!({"_id": "a", "_rev": r1, "n": 3}),
                json!({"_id": "b", "n": 1}),
            ],
            true,
        )
        .await
        .unwrap();
    assert_eq!(stale[0].error.as_deref(), Some("conflict"));
    assert!(
        stale[1].is_ok(),
        "other documents of the batch are still written"
    );
    let err = s.put(json!({"_id": "a", "n": 4})).await.unwrap_err();
    assert_eq!(
        (err.status(), err.couch_error().0.as_str()),
        (409, "conflict")
    );
    let unknown = format!("1-{}", h('f'));
    assert_eq!(
        s.put(json!({"_id": "a", "_rev": unknown, "n": 5}))
            .await
            .unwrap_err()
            .status(),
        409
    );
    assert_eq!(
        s.put(json!({"_id": "new", "_rev": unknown}))
            .await
            .unwrap_err()
            .status(),
        409
    );
    let d = doc(s, "a", GetOptions::default()).await;
    assert_eq!((rev_of(&d), d["n"].clone()), (r2, json!(2)));
}

async fn revs_diff_lists_what_is_missing_and_possible_ancestors(s: &AnyStore) {
    let path = json!({"start": 2, "ids": [h('b'), h('a')]});
    replicate(
        s,
        vec![json!({"_id": "x", "_rev": format!("2-{}", h('b')), "_revisions": path})],
    )
    .await;
    let mut ask = BTreeMap::new();
    ask.insert(
        "x".to_owned(),
        vec![format!("2-{}", h('b')), format!("3-{}", h('c'))],
    );
    ask.insert("y".to_owned(), vec![format!("1-{}", h('a'))]);
    ask.insert("z".to_owned(), vec![]);
    let diff = s.revs_diff(ask.clone()).await.unwrap();
    assert_eq!(diff.len(), 2, "{diff:?}");
    assert_eq!(diff["x"].missing, vec![format!("3-{}", h('c'))]);
    assert_eq!(diff["y"].missing, vec![format!("1-{}", h('a'))]);
    assert!(diff["y"].possible_ancestors.is_empty());
    if let AnyStore::Sqlite(_) = s {
        // As CouchDB: possible ancestors are listed, and a revision known only
        // by id (from _revisions) is not missing. pouchdb-server differs (NOTES.md).
        assert_eq!(diff["x"].possible_ancestors, vec![format!("2-{}", h('b'))]);
        let mut ask = BTreeMap::new();
        ask.insert("x".to_owned(), vec![format!("1-{}", h('a'))]);
        assert!(s.revs_diff(ask).await.unwrap().is_empty());
    }
    ask.insert("bad".to_owned(), vec!["1-not-hex".to_owned()]);
    assert_eq!(s.revs_diff(ask).await.unwrap_err().status(), 400);
}

async fn changes_list_each_document_once_at_its_latest_change(s: &AnyStore) {
    let ra = s.put(json!({"_id": "a"})).await.unwrap();
    s.put(json!({"_id": "b"})).await.unwrap();
    s.put(json!({"_id": "c"})).await.unwrap();
    let all = s.changes(&ChangesOptions::default()).await.unwrap();
    let ids: Vec<&str> = all.results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let mark = all.last_seq.clone();
    let ra2 = s
        .put(json!({"_id": "a", "_rev": ra, "v": 2}))
        .await
        .unwrap();
    let since = s
        .changes(&ChangesOptions {
            since: mark.clone(),
            include_docs: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(since.results.len(), 1);
    assert_eq!(since.results[0].id, "a");
    assert_eq!(
        since.results[0].changes,
        vec![ChangeRev { rev: ra2.clone() }]
    );
    assert_eq!(since.results[0].doc.as_ref().unwrap()["v"], 2);
    let all = s.changes(&ChangesOptions::default()).await.unwrap();
    let ids: Vec<&str> = all.results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        ["b", "c", "a"],
        "each document once, at its latest change"
    );
    assert_eq!(all.last_seq, s.info().await.unwrap().update_seq);
    let limited = s
        .changes(&ChangesOptions {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(limited.results.len(), 2);
    let rest = s
        .changes(&ChangesOptions {
            since: limited.last_seq,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.results.len(), 1);
    assert_eq!(rest.results[0].id, "a");
    let desc = s
        .changes(&ChangesOptions {
            descending: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(desc.results[0].id, "a");

    // style=all_docs lists every leaf of a conflicted document; deletions are flagged.
    replicate(
        s,
        vec![
            json!({"_id": "k", "_rev": format!("1-{}", h('1'))}),
            json!({"_id": "k", "_rev": format!("1-{}", h('2'))}),
        ],
    )
    .await;
    let rb = doc(s, "b", GetOptions::default()).await;
    s.put(json!({"_id": "b", "_rev": rev_of(&rb), "_deleted": true}))
        .await
        .unwrap();
    let feed = s
        .changes(&ChangesOptions {
            since: mark,
            style_all_docs: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let k = feed.results.iter().find(|r| r.id == "k").unwrap();
    let mut revs: Vec<&str> = k.changes.iter().map(|c| c.rev.as_str()).collect();
    revs.sort();
    assert_eq!(revs, [format!("1-{}", h('1')), format!("1-{}", h('2'))]);
    let b = feed.results.iter().find(|r| r.id == "b").unwrap();
    assert!(b.deleted);
}

async fn local_docs_have_no_history_and_stay_out_of_changes(s: &AnyStore) {
    let before = s.info().await.unwrap().update_seq;
    let r1 = s
        .put_local("_local/ckpt", json!({"last_seq": 5}))
        .await
        .unwrap();
    assert_eq!(r1, "0-1");
    let d = s.get_local("ckpt").await.unwrap();
    assert_eq!(
        (d["_id"].as_str(), d["_rev"].as_str(), d["last_seq"].clone()),
        (Some("_local/ckpt"), Some("0-1"), json!(5))
    );
    let r2 = s
        .put_local("_local/ckpt", json!({"_rev": r1, "last_seq": 6}))
        .await
        .unwrap();
    assert_eq!(r2, "0-2");
    let stale = s
        .put_local("_local/ckpt", json!({"_rev": "0-1", "last_seq": 7}))
        .await
        .unwrap_err();
    assert_eq!(stale.status(), 409);
    assert_eq!(
        s.put_local("_local/ckpt", json!({"last_seq": 8}))
            .await
            .unwrap_err()
            .status(),
        409
    );
    assert_eq!(
        s.info().await.unwrap().update_seq,
        before,
        "local writes do not move the feed"
    );
    assert!(s
        .changes(&ChangesOptions::default())
        .await
        .unwrap()
        .results
        .is_empty());
    assert_eq!(s.info().await.unwrap().doc_count, 0);
    s.delete_local("_local/ckpt", Some(&r2)).await.unwrap();
    assert_eq!(s.get_local("_local/ckpt").await.unwrap_err().status(), 404);
}

async fn attachments_are_stubs_unless_asked_for_and_survive_edits(s: &AnyStore) {
    // "hello" in base64
    let r1 = s
        .put(json!({"_id": "att", "t": 1, "_attachments": {"note.txt": {"content_type": "text/plain", "data": "aGVsbG8="}}}))
        .await
        .unwrap();
    let d = doc(s, "att", GetOptions::default()).await;
    let a = &d["_attachments"]["note.txt"];
    assert_eq!(a["stub"], true);
    assert_eq!(a["length"], 5);
    assert_eq!(a["revpos"], 1);
    assert_eq!(a["digest"], "md5-XUFAKrxLKna5cZ2REBfFkg==");
    assert_eq!(a["content_type"], "text/plain");
    let full = doc(
        s,
        "att",
        GetOptions {
            attachments: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(full["_attachments"]["note.txt"]["data"], "aGVsbG8=");

    // An edit that keeps the stub keeps the attachment and its revpos.
    let stub = json!({"note.txt": {"stub": true, "digest": "md5-XUFAKrxLKna5cZ2REBfFkg==", "content_type": "text/plain", "length": 5, "revpos": 1}});
    let r2 = s
        .put(json!({"_id": "att", "_rev": r1, "t": 2, "_attachments": stub}))
        .await
        .unwrap();
    let d = doc(
        s,
        "att",
        GetOptions {
            attachments: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(d["_attachments"]["note.txt"]["data"], "aGVsbG8=");
    assert_eq!(d["_attachments"]["note.txt"]["revpos"], 1);
    // An edit without _attachments drops them.
    s.put(json!({"_id": "att", "_rev": r2, "t": 3}))
        .await
        .unwrap();
    assert!(doc(s, "att", GetOptions::default())
        .await
        .get("_attachments")
        .is_none());

    // Replication carries inline data with the revision.
    let rev = format!("1-{}", h('e'));
    replicate(s, vec![json!({"_id": "att2", "_rev": rev, "_attachments": {"a.bin": {"content_type": "application/octet-stream", "revpos": 1, "data": "AAEC"}}})]).await;
    let d = doc(
        s,
        "att2",
        GetOptions {
            attachments: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(d["_attachments"]["a.bin"]["data"], "AAEC");
}

async fn history_is_stemmed_at_revs_limit(s: &AnyStore) {
    let ids: Vec<String> = (0..1005u32).rev().map(|i| format!("{i:032x}")).collect();
    let rev = format!("1005-{}", ids[0]);
    replicate(
        s,
        vec![json!({"_id": "long", "_rev": rev, "_revisions": {"start": 1005, "ids": ids}})],
    )
    .await;
    let d = doc(
        s,
        "long",
        GetOptions {
            revs: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(d["_revisions"]["start"], 1005);
    assert_eq!(
        d["_revisions"]["ids"].as_array().unwrap().len(),
        1000,
        "stemmed at the default revs_limit"
    );
}

async fn bulk_get_and_all_docs_answer_like_couchdb(s: &AnyStore) {
    let r1 = s.put(json!({"_id": "b", "v": 1})).await.unwrap();
    let r2 = s
        .put(json!({"_id": "b", "_rev": r1, "v": 2}))
        .await
        .unwrap();
    s.put(json!({"_id": "a", "v": 0})).await.unwrap();
    let rc = s.put(json!({"_id": "c"})).await.unwrap();
    s.put(json!({"_id": "c", "_rev": rc, "_deleted": true}))
        .await
        .unwrap();

    let got = s
        .bulk_get(
            vec![
                BulkGetRequest::new("b", Some(&r1)),
                BulkGetRequest::new("a", None),
                BulkGetRequest::new("nope", Some(&r1)),
                BulkGetRequest::new("nope2", None),
                BulkGetRequest::new("c", None),
            ],
            BulkGetOptions {
                revs: true,
                latest: true,
                attachments: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 5);
    let BulkGetItem::Ok(latest) = &got[0].docs[0] else {
        panic!("{got:?}")
    };
    assert_eq!(
        (rev_of(latest), latest["v"].clone()),
        (r2.clone(), json!(2)),
        "latest=true follows to the leaf"
    );
    assert_eq!(latest["_revisions"]["ids"].as_array().unwrap().len(), 2);
    let BulkGetItem::Ok(winner) = &got[1].docs[0] else {
        panic!("{got:?}")
    };
    assert_eq!(winner["v"], 0);
    let BulkGetItem::Error(e) = &got[2].docs[0] else {
        panic!("{got:?}")
    };
    assert_eq!((e.id.as_str(), e.error.as_str()), ("nope", "not_found"));
    // Without a revision: the winner, and a missing or deleted document is
    // not found (pouchdb-server answers `{}` where CouchDB answers an error).
    for (i, id) in [(3, "nope2"), (4, "c")] {
        let BulkGetItem::Error(e) = &got[i].docs[0] else {
            panic!("{id}: {got:?}")
        };
        assert_eq!((e.id.as_str(), e.error.as_str()), (id, "not_found"));
    }

    let all = s
        .all_docs(&AllDocsOptions {
            include_docs: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = all.rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "deleted documents are left out");
    assert_eq!(all.total_rows, 2);
    assert_eq!(all.rows[1].doc.as_ref().unwrap()["v"], 2);
    let desc = s
        .all_docs(&AllDocsOptions {
            descending: true,
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(desc.rows[0].key, "b");
    let range = s
        .all_docs(&AllDocsOptions {
            start_key: Some("b".into()),
            end_key: Some("z".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(range.rows.len(), 1);
    let keyed = s
        .all_docs(&AllDocsOptions {
            keys: Some(vec!["c".into(), "a".into(), "zz".into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(keyed.rows.len(), 3);
    assert!(keyed.rows[0].value.as_ref().unwrap().deleted);
    assert_eq!(keyed.rows[1].id.as_deref(), Some("a"));
    assert_eq!(keyed.rows[2].error.as_deref(), Some("not_found"));
}

async fn wait_for_change_wakes_on_a_write_and_times_out_otherwise(s: &AnyStore) {
    let seq = s.info().await.unwrap().update_seq;
    assert!(!s
        .wait_for_change(&seq, Duration::from_millis(300))
        .await
        .unwrap());
    let writer = s.clone();
    let t = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer.put(json!({"_id": "w"})).await.unwrap();
    });
    assert!(s
        .wait_for_change(&seq, Duration::from_secs(10))
        .await
        .unwrap());
    t.await.unwrap();
    assert!(s
        .wait_for_change(&json!(0), Duration::from_secs(5))
        .await
        .unwrap());
}

async fn malformed_documents_are_refused_and_nothing_is_written(s: &AnyStore) {
    let cases = [
        json!([{"_id": "ok"}, {"_id": "bad", "_rev": "not-a-rev"}]),
        json!([{"_id": "ok"}, "not an object"]),
        json!([{"_id": "ok"}, {"_id": "_reserved"}]),
        json!([{"_id": "ok"}, {"_id": "x", "_unknown": 1}]),
        json!([{"_id": "ok"}, {"_id": "x", "_attachments": {"a": {"data": "%%%"}}}]),
    ];
    for docs in cases {
        let Value::Array(docs) = docs else {
            unreachable!()
        };
        let err = s.bulk_docs(docs.clone(), true).await.unwrap_err();
        assert_eq!(err.status(), 400, "{docs:?}: {err}");
    }
    let err = s
        .bulk_docs(vec![json!({"_id": "r", "_rev": "1-zz"})], false)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.to_string().contains("1-zz"), "{err}");
    assert_eq!(
        s.get(
            "x",
            &GetOptions {
                rev: Some("abc".into()),
                ..Default::default()
            }
        )
        .await
        .unwrap_err()
        .status(),
        400
    );
    let info = s.info().await.unwrap();
    assert_eq!(
        (info.doc_count, info.doc_del_count),
        (0, 0),
        "nothing was written"
    );
}

/// Documents `plain` (`{"n": id}`), `c` deleted, and `b` with two live
/// leaves (`2-{h(b)}` with `"v": "b"`, and the winner `2-{h(c)}`).
async fn plain_deleted_c_and_conflicted_b(s: &AnyStore, plain: &[&str]) {
    for id in plain.iter().chain(&["c"]) {
        s.put(json!({"_id": id, "n": id})).await.unwrap();
    }
    let c = doc(s, "c", GetOptions::default()).await;
    s.put(json!({"_id": "c", "_rev": c["_rev"], "_deleted": true}))
        .await
        .unwrap();
    let r1 = format!("1-{}", h('a'));
    replicate(s, vec![json!({"_id": "b", "_rev": r1, "v": 1})]).await;
    let two = |x: char| json!({"_id": "b", "_rev": format!("2-{}", h(x)), "_revisions": {"start": 2, "ids": [h(x), h('a')]}, "v": x.to_string()});
    replicate(s, vec![two('b'), two('c')]).await;
}

async fn live_docs_by_id_pages_documents_with_a_live_leaf_in_id_order(s: &AnyStore) {
    plain_deleted_c_and_conflicted_b(s, &["a", "d", "e"]).await;

    let page = s.live_docs_by_id(None, 2, true).await.unwrap();
    let ids: Vec<&str> = page.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(page[0].doc.as_ref().unwrap()["n"], "a");
    assert_eq!(page[0].changes.len(), 1);
    let b = &page[1];
    assert_eq!(
        b.changes[0].rev,
        format!("2-{}", h('c')),
        "the winner first"
    );
    let mut revs: Vec<&str> = b.changes.iter().map(|c| c.rev.as_str()).collect();
    revs.sort_unstable();
    assert_eq!(revs, [format!("2-{}", h('b')), format!("2-{}", h('c'))]);
    let body = b.doc.as_ref().unwrap();
    assert_eq!(body["v"], "c");
    assert!(body.get("_conflicts").is_none(), "{body}");

    // After a page's last id; a deleted document is left out, also as `after`.
    let rest = s
        .live_docs_by_id(Some("b".into()), 10, false)
        .await
        .unwrap();
    let ids: Vec<&str> = rest.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["d", "e"]);
    assert!(rest.iter().all(|r| r.doc.is_none()));
    let rest = s.live_docs_by_id(Some("c".into()), 1, true).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, "d");
    assert!(s
        .live_docs_by_id(Some("e".into()), 10, true)
        .await
        .unwrap()
        .is_empty());
}

async fn live_leaf_revs_lists_live_leaves_winner_first_in_one_request(s: &AnyStore) {
    plain_deleted_c_and_conflicted_b(s, &["a"]).await;
    // b's losing branch gets a child: it wins now, and is listed first.
    let child = format!("3-{}", h('d'));
    replicate(
        s,
        vec![json!({"_id": "b", "_rev": child, "_revisions": {"start": 3, "ids": [h('d'), h('b'), h('a')]}, "v": "d"})],
    )
    .await;
    // e has a live leaf and a deleted one: the deleted one is not listed.
    let e1 = format!("1-{}", h('e'));
    replicate(s, vec![json!({"_id": "e", "_rev": e1, "v": 1})]).await;
    let e2 = |x: char, deleted: bool| json!({"_id": "e", "_rev": format!("2-{}", h(x)), "_revisions": {"start": 2, "ids": [h(x), h('e')]}, "_deleted": deleted});
    replicate(s, vec![e2('b', false), e2('f', true)]).await;
    let ids: Vec<String> = ["a", "b", "c", "e", "none"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let Some(listed) = s.live_leaf_revs(&ids).await.unwrap() else {
        // The embedded store reads documents one by one (cheaply).
        assert!(matches!(s, AnyStore::Sqlite(_)));
        return;
    };
    let a = rev_of(&doc(s, "a", GetOptions::default()).await);
    assert_eq!(listed["a"], [a]);
    assert_eq!(
        listed["b"],
        [child.clone(), format!("2-{}", h('c'))],
        "the winner first"
    );
    assert_eq!(listed["c"].len(), 1, "a deleted document: its winner");
    assert_eq!(
        listed["e"],
        [format!("2-{}", h('b'))],
        "no deleted leaf beside a live one"
    );
    assert!(!listed.contains_key("none"));
}

/// The embedded store's text path writes what `bulk_docs` writes: the same
/// revision ids, bodies, conflicts (409 on a stale revision) and sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_docs_text_writes_what_bulk_docs_writes() {
    let (by_value, by_text) = (common::sqlite_db(), common::sqlite_db());
    let AnyStore::Sqlite(text_store) = &by_text.store else {
        unreachable!()
    };
    let first = vec![
        json!({"_id": "a", "z": 1, "big": 12345678901234567890u64, "f": 1.10}),
        json!({"_id": "b", "n": {"x": [1, "é"]}}),
    ];
    let texts = |docs: &[Value]| -> Vec<TextDoc> {
        docs.iter()
            .map(|d| TextDoc::from_doc(d).expect("plain"))
            .collect()
    };
    let v1 = by_value.bulk_docs(first.clone(), true).await.unwrap();
    let t1 = text_store.bulk_docs_text(texts(&first)).await.unwrap();
    assert_eq!(t1, v1);
    let a_rev = v1[0].rev.clone().unwrap();
    let stale = format!("1-{}", h('f'));
    let second = vec![
        json!({"_id": "a", "_rev": a_rev, "z": 2}),
        json!({"_id": "b", "_rev": stale, "n": 0}),
        json!({"_id": "c"}),
    ];
    let v2 = by_value.bulk_docs(second.clone(), true).await.unwrap();
    let t2 = text_store.bulk_docs_text(texts(&second)).await.unwrap();
    assert_eq!(t2, v2);
    assert_eq!(v2[1].error.as_deref(), Some("conflict"));
    for id in ["a", "b", "c"] {
        let opts = GetOptions {
            revs: true,
            ..Default::default()
        };
        assert_eq!(
            doc(&by_text, id, opts.clone()).await,
            doc(&by_value, id, opts).await,
            "{id}"
        );
    }
    let opts = ChangesOptions::default();
    assert_eq!(
        by_text.changes(&opts).await.unwrap().results,
        by_value.changes(&opts).await.unwrap().results
    );
}
