//! Test helpers (copied in small from crates/store/tests/common): temporary
//! directories, and a real pouchdb-server (the CouchDB stand-in) on
//! 127.0.0.1 with a free port, stopped however the test process ends.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rewind_replicator::Phone;
use rewind_store::{AnyStore, Store};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
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
        let p = std::env::temp_dir().join(unique("rewind-replicator-test-"));
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

/// The database phones sync with: its URL (or path) and an open handle.
pub struct Remote {
    pub url: String,
    pub store: AnyStore,
    _dir: Option<TempDir>,
}

impl Remote {
    /// An embedded store standing in for the server.
    pub async fn embedded() -> Remote {
        let dir = TempDir::new();
        let url = dir.path().join("server.db").display().to_string();
        let store = rewind_store::open(&url).await.unwrap();
        Remote {
            url,
            store,
            _dir: Some(dir),
        }
    }

    /// A fresh database on the shared pouchdb-server.
    pub async fn pouch() -> Remote {
        let url = format!("{}/{}", server().url, unique("r"));
        let store = rewind_store::open(&url).await.unwrap();
        store.create_db().await.unwrap();
        Remote {
            url,
            store,
            _dir: None,
        }
    }

    /// A phone with a fresh local store syncing with this remote (sharing
    /// the open handle: an embedded store is opened once per process).
    pub async fn phone(&self, name: &str) -> Phone {
        Phone::new(name, &self.url)
            .await
            .unwrap()
            .with_remote(self.store.clone())
    }

    /// A phone over an existing local file.
    pub async fn phone_at(&self, name: &str, local: &Path) -> Phone {
        Phone::open(name, local, &self.url)
            .await
            .unwrap()
            .with_remote(self.store.clone())
    }
}

/// A running pouchdb-server; stopped on drop. It runs under a shell that
/// kills it when our end of its stdin closes, so it also stops when the test
/// process exits without running destructors.
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

fn pouch_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/pouchdb")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
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

/// The pouchdb-server shared by the tests of this binary (admin party).
pub fn server() -> &'static PouchServer {
    static SERVER: OnceLock<PouchServer> = OnceLock::new();
    SERVER.get_or_init(PouchServer::start)
}

/// Runs one scenario against an embedded remote and a pouchdb-server remote.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let remote = $crate::common::Remote::embedded().await;
                super::$name(&remote).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pouchdb_server() {
                let remote = $crate::common::Remote::pouch().await;
                super::$name(&remote).await;
            }
        }
    )*};
}
