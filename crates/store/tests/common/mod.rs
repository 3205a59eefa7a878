//! Test helpers: temporary directories, embedded stores, and a real
//! pouchdb-server (the CouchDB stand-in) on 127.0.0.1 with a free port.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rewind_store::{AnyStore, SqliteStore, Store};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("rewind-store-test-"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

/// A running pouchdb-server; stopped on drop. The server runs under a shell
/// that kills it when our end of its stdin closes, so it also stops when the
/// test process exits without running destructors.
pub struct PouchServer {
    pub url: String,
    pub port: u16,
    child: Child,
    stdin: Option<ChildStdin>,
    pub dir: TempDir,
}

impl Drop for PouchServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

pub fn pouch_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/pouchdb")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Blocking `GET path` on 127.0.0.1:port; returns the status line and body.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
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

impl PouchServer {
    pub fn start() -> PouchServer {
        let bin = pouch_dir().join("node_modules/pouchdb-server/bin/pouchdb-server");
        assert!(
            bin.exists(),
            "pouchdb-server is not installed ({} is missing): run `npm ci --prefix tests/pouchdb` first",
            bin.display()
        );
        let dir = TempDir::new();
        let port = free_port();
        let script = format!(
            "node \"{}\" --host 127.0.0.1 --port {port} --dir \"{}\" >\"{}/server.log\" 2>&1 & pid=$!; read _; kill $pid; wait $pid",
            bin.display(),
            dir.path().display(),
            dir.path().display()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start sh for pouchdb-server");
        let stdin = child.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(port, "/")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
            {
                break;
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                panic!("pouchdb-server did not answer on port {port} within 60 s; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        PouchServer {
            url: format!("http://127.0.0.1:{port}"),
            port,
            child,
            stdin,
            dir,
        }
    }
}

/// The pouchdb-server shared by the tests of this binary (admin party: no users).
pub fn server() -> &'static PouchServer {
    static SERVER: OnceLock<PouchServer> = OnceLock::new();
    SERVER.get_or_init(PouchServer::start)
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
