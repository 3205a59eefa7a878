//! Bad input gets a clear error and changes nothing: foreign files, a URL
//! that is not CouchDB, wrong credentials (never echoed back).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use common::{http_send, PouchServer, TempDir};
use rewind_store::*;
use serde_json::json;

#[tokio::test]
async fn a_text_file_is_not_a_store_and_is_left_untouched() {
    let dir = TempDir::new();
    let path = dir.path().join("notes.txt");
    let text = "these are not the documents you are looking for\n".repeat(100);
    std::fs::write(&path, &text).unwrap();
    let err = open(path.to_str().unwrap())
        .await
        .err()
        .expect("a text file must be refused");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert!(
        err.to_string().contains("notes.txt"),
        "the message names the file: {err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert!(!dir.path().join("notes.txt-wal").exists());
}

#[tokio::test]
async fn a_foreign_sqlite_database_is_refused_and_left_untouched() {
    let dir = TempDir::new();
    let path = dir.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = open(path.to_str().unwrap())
        .await
        .err()
        .expect("a foreign database must be refused");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert!(err.to_string().contains("without rewind's schema"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
}

#[tokio::test]
async fn an_existing_store_reopens_with_its_documents() {
    let dir = TempDir::new();
    let path = dir.path().join("db.rewind");
    let s = open(path.to_str().unwrap()).await.unwrap();
    s.put(json!({"_id": "a", "big": 12345678901234567890u64, "f": 1.5}))
        .await
        .unwrap();
    drop(s);
    let s = open(path.to_str().unwrap()).await.unwrap();
    let d = s
        .get("a", &GetOptions::default())
        .await
        .unwrap()
        .into_doc()
        .unwrap();
    assert_eq!(d["big"].to_string(), "12345678901234567890");
    assert_eq!(s.info().await.unwrap().update_seq, json!(1));
}

/// A web server that answers every request with an HTML page.
fn html_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let body = "<html><body>Hello</body></html>";
            let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    port
}

#[tokio::test]
async fn a_url_that_is_not_couchdb_is_refused() {
    let port = html_server();
    let err = open(&format!("http://u:secret-pw@127.0.0.1:{port}/db"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::NotCouch { .. }), "{err}");
    assert!(!err.to_string().contains("secret-pw"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = CouchOptions {
        retries: 1,
        ..Default::default()
    };
    let err = CouchStore::open_with(&format!("http://u:secret-pw@127.0.0.1:{closed}/db"), opts)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.status(), 503, "{err}");
    assert!(!err.to_string().contains("secret-pw"), "{err}");
    let err = open("http://127.0.0.1:1/").await.err().expect("no db name");
    assert_eq!(err.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_without_echoing_the_password() {
    // Its own server: adding an admin ends admin party for everyone on it.
    let server = PouchServer::start();
    let created = http_send(server.port, "PUT", "/authdb", "");
    assert!(
        created.contains("201") || created.contains("ok"),
        "{created}"
    );
    let r = http_send(server.port, "PUT", "/_config/admins/admin", "\"right-pw\"");
    assert!(
        r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"),
        "{r}"
    );
    let base = format!("127.0.0.1:{}", server.port);

    for auth in [CouchAuth::Basic, CouchAuth::Cookie] {
        let opts = CouchOptions {
            auth,
            ..Default::default()
        };
        let err = CouchStore::open_with(
            &format!("http://admin:wrong-pw@{base}/authdb"),
            opts.clone(),
        )
        .await
        .err()
        .expect("wrong password must be refused");
        assert_eq!(err.status(), 401, "{auth:?}: {err}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("wrong-pw"), "{shown}");

        let good = CouchStore::open_with(&format!("http://admin:right-pw@{base}/authdb"), opts)
            .await
            .unwrap();
        let rev = good.put(json!({"_id": format!("{auth:?}")})).await.unwrap();
        assert!(rev.starts_with("1-"));
        assert!(!good.identity().contains("right-pw"));
    }
}

#[test]
fn urls_are_shown_without_credentials() {
    assert_eq!(
        redact_url("http://admin:pw@host:5984/db"),
        "http://host:5984/db"
    );
    assert_eq!(redact_url("not a url://a:b@c"), "not a url://c");
    let e = StoreError::Unauthorized {
        url: redact_url("https://u:p@x/db"),
        reason: "nope".into(),
    };
    assert!(!e.to_string().contains(":p@"));
    assert_eq!(e.status(), 401);
    assert_eq!(e.couch_error().0, "unauthorized");
}
