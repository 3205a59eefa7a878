//! Test helpers: the store under test on both backends (an embedded file,
//! or a database on the real pouchdb-server from `rewind-testkit`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;

use rewind_store::{AnyStore, SqliteStore, Store};
pub use rewind_testkit::{unique, PouchServer, TempDir};

/// A store under test plus whatever keeps it alive.
pub struct TestDb {
    pub store: AnyStore,
    pub _dir: Option<TempDir>,
}

impl std::ops::Deref for TestDb {
    type Target = AnyStore;
    fn deref(&self) -> &AnyStore {
        &self.store
    }
}

pub fn sqlite_db() -> TestDb {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.path().join("test.db")).unwrap();
    TestDb {
        store: AnyStore::Sqlite(store),
        _dir: Some(dir),
    }
}

/// A fresh, empty database on the shared pouchdb-server.
pub async fn couch_db() -> TestDb {
    let url = format!("{}/{}", server().url, unique("t"));
    let store = rewind_store::open(&url).await.unwrap();
    store.create_db().await.unwrap();
    TestDb { store, _dir: None }
}

/// Blocking request with a body (for server setup).
pub fn http_send(port: u16, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The pouchdb-server shared by the tests of this binary (admin party: no users).
pub fn server() -> &'static PouchServer {
    rewind_testkit::shared_server()
}

/// A 32-hex revision hash made of one repeated character.
pub fn h(c: char) -> String {
    c.to_string().repeat(32)
}

/// Runs one scenario against both backends.
#[allow(unused_macros)]
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = crate::common::sqlite_db();
                super::$name(&db).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn couch() {
                let db = crate::common::couch_db().await;
                super::$name(&db).await;
            }
        }
    )*};
}

/// Silences "unused" for helpers some test binaries do not use.
pub fn _touch(s: &AnyStore) -> String {
    s.identity()
}
