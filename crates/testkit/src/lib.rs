//! Test helpers for rewind's integration tests and benches (dev-only).
//!
//! Invariant: everything a helper starts or creates is stopped or removed
//! when its handle drops, however the test ends: temporary directories are
//! deleted, and a [`PouchServer`] runs under a shell that kills it as soon as
//! our end of its stdin closes (also when the test process dies without
//! running destructors).

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rewind_store::{AnyStore, ChangesOptions, GetOptions, GetResult, OpenRev, OpenRevs, Store};
use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique in this machine's runs: `prefix`, the pid and a counter.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The workspace root (where `Cargo.toml`, `examples/` and `tests/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The example CHT migrations (`examples/cht`, 7 migrations).
pub fn cht_migrations() -> PathBuf {
    workspace_root().join("examples/cht")
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory under the system's temporary directory.
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("rewind-test-"));
        std::fs::create_dir_all(&p).expect("create a temporary directory");
        TempDir(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it, as a string (an embedded store's target).
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Default for TempDir {
    fn default() -> TempDir {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tests/pouchdb`, where `npm ci --prefix tests/pouchdb` installs pouchdb-server.
pub fn pouch_dir() -> PathBuf {
    workspace_root().join("tests/pouchdb")
}

/// `tests/pouchdb/node_modules`, or a panic that says how to install it.
pub fn node_modules() -> PathBuf {
    let dir = pouch_dir().join("node_modules");
    assert!(
        dir.join("pouchdb-server/bin/pouchdb-server").exists(),
        "pouchdb-server is not installed ({} is missing): run `npm ci --prefix tests/pouchdb` first",
        dir.join("pouchdb-server").display()
    );
    dir
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Blocking `GET path` on 127.0.0.1:port; the raw response.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Blocking HTTP/1.1 `method path` on 127.0.0.1:port with `headers` (each
/// line ending in `\r\n`) and a JSON `body`: the status and the body of
/// the answer (status 0 when there was none).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned(),
    )
}

/// A running pouchdb-server (admin party) in its own temporary directory;
/// stopped on drop.
pub struct PouchServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its port.
    pub port: u16,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Where its databases and `server.log` are.
    pub dir: TempDir,
}

/// How a pouchdb-server start ended.
enum Started {
    Up(PouchServer),
    /// Another process took the port between `free_port` and the bind.
    PortTaken,
}

impl PouchServer {
    /// Starts pouchdb-server on a free port and waits until it answers;
    /// when another process takes the port first, again on another one.
    pub fn start() -> PouchServer {
        for _ in 0..10 {
            if let Started::Up(server) = Self::start_on(free_port()) {
                return server;
            }
        }
        panic!("pouchdb-server: ten free ports were taken before it could bind them");
    }

    /// Starts pouchdb-server on `port` and waits until it says it started
    /// (a server answering on the port may be another process's: then
    /// this one says the port is in use and exits).
    fn start_on(port: u16) -> Started {
        let bin = node_modules().join("pouchdb-server/bin/pouchdb-server");
        let dir = TempDir::new();
        // The shell kills the server when our end of its stdin closes.
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
        let started = format!("has started on http://127.0.0.1:{port}/");
        loop {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            if log.contains("is already in use") {
                drop(stdin);
                let _ = child.wait();
                return Started::PortTaken;
            }
            if log.contains(&started)
                && http_get(port, "/")
                    .is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
            {
                break;
            }
            if Instant::now() > deadline {
                panic!("pouchdb-server did not answer on port {port} within 60 s; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Started::Up(PouchServer {
            url: format!("http://127.0.0.1:{port}"),
            port,
            child,
            stdin,
            dir,
        })
    }

    /// The URL of a database on this server (not created).
    pub fn db_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// The URL of a database with a name no other test uses (not created).
    pub fn fresh_db_url(&self) -> String {
        self.db_url(&unique("t"))
    }

    /// The process id of the shell that runs the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PouchServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// A running `rewind serve`, listening on a port the system picked; killed
/// on drop.
pub struct Gateway {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
    said: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Gateway {
    /// Spawns `command` (a `rewind serve` invocation without `--listen`)
    /// with `--listen 127.0.0.1:0`, and waits (up to 30 s) for the line it
    /// prints once it listens, "… serving … on http://ADDR (…": the port is
    /// the one this process bound, so no other server on a port picked in
    /// advance is taken for it. Its standard error is read to the end
    /// meanwhile (nothing blocks on a full pipe).
    pub fn spawn(mut command: Command) -> Gateway {
        command
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start rewind serve");
        let stderr = child.stderr.take().expect("rewind serve's stderr is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept = said.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(port) = served_port(&line) {
                    let _ = tx.send(Ok(port));
                }
                if let Ok(mut said) = kept.lock() {
                    said.push_str(&line);
                    said.push('\n');
                }
            }
            let all = kept.lock().map(|s| s.clone()).unwrap_or_default();
            let _ = tx.send(Err(all));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(port)) => Gateway { port, child, said },
            Ok(Err(said)) => {
                let _ = child.kill();
                panic!("rewind serve exited before it listened:\n{said}")
            }
            Err(_) => {
                let _ = child.kill();
                panic!("rewind serve did not say it listens within 30 s")
            }
        }
    }

    /// What it has written to standard error so far.
    pub fn stderr(&self) -> String {
        self.said.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `bin serve --data data --migrations migrations`, run in `cwd` (where
    /// its `rewind.toml` is), spawned as [`Gateway::spawn`] does.
    pub fn serve_embedded(bin: &str, cwd: &Path, data: &Path, migrations: &Path) -> Gateway {
        let mut serve = Command::new(bin);
        serve
            .current_dir(cwd)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--migrations")
            .arg(migrations);
        Gateway::spawn(serve)
    }
}

/// The port in `rewind serve`'s "… on http://127.0.0.1:PORT (…" line.
fn served_port(line: &str) -> Option<u16> {
    let (_, rest) = line.split_once(" on http://")?;
    let address = rest.split_whitespace().next()?;
    address.rsplit_once(':')?.1.parse().ok()
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One pouchdb-server shared by all tests of a test binary; it stops when
/// the test process exits.
pub fn shared_server() -> &'static PouchServer {
    static SERVER: OnceLock<PouchServer> = OnceLock::new();
    SERVER.get_or_init(PouchServer::start)
}

/// Writes `docs` into `target` (created if missing) with `_bulk_docs`
/// (`new_edits=true`), panicking on any per-document error.
///
/// Opens a new store on `target`. The embedded store wants one writer per
/// file: while another handle on the same file writes, use [`load_into`].
pub async fn load_docs(target: &str, docs: impl IntoIterator<Item = Value>) -> AnyStore {
    let store = rewind_store::open(target).await.expect("open the target");
    load_into(&store, docs).await;
    store
}

/// Writes `docs` into `store` (created if missing), panicking on any error.
pub async fn load_into(store: &AnyStore, docs: impl IntoIterator<Item = Value>) {
    if !store.exists().await.expect("exists") {
        store.create_db().await.expect("create the database");
    }
    let docs: Vec<Value> = docs.into_iter().collect();
    for chunk in docs.chunks(1000) {
        for r in store
            .bulk_docs(chunk.to_vec(), true)
            .await
            .expect("bulk_docs")
        {
            assert!(r.is_ok(), "loading {}: {:?} {:?}", r.id, r.error, r.reason);
        }
    }
}

/// Loads the first `n` sample documents of `seed` (as `rewind sample`
/// would) into `target`; returns them as written.
pub async fn load_sample(target: &str, n: u64, seed: u64) -> Vec<Value> {
    let docs: Vec<Value> = rewind_sample::docs(n, seed).collect();
    load_docs(target, docs.clone()).await;
    docs
}

/// A document as stored: its winning revision and every live leaf.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The winning revision's id.
    pub rev: String,
    /// True when the winning revision is a tombstone.
    pub deleted: bool,
    /// The winning revision (with `_id` and `_rev`); `None` when deleted.
    pub winner: Option<Value>,
    /// Every non-deleted leaf (the winner included), with `_id` and `_rev`.
    pub live_leaves: Vec<Value>,
}

impl Stored {
    /// The generation of the winning revision (`N` of `N-hash`).
    pub fn generation(&self) -> u64 {
        generation(&self.rev)
    }
}

/// The generation of a revision id (`N` of `N-hash`).
pub fn generation(rev: &str) -> u64 {
    rev.split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a revision id: {rev}"))
}

/// A document without its revision members (`_rev`, `_revisions`,
/// `_conflicts`, ...): the body a user wrote.
pub fn body(doc: &Value) -> Value {
    let mut body = doc.clone();
    if let Some(object) = body.as_object_mut() {
        for m in [
            "_rev",
            "_revisions",
            "_conflicts",
            "_deleted_conflicts",
            "_local_seq",
        ] {
            object.shift_remove(m);
        }
    }
    body
}

/// The JSON text of [`body`]: key order and number text as stored.
pub fn body_text(doc: &Value) -> String {
    serde_json::to_string(&body(doc)).expect("serialise")
}

/// Every document of `store` (deleted ones included), by id, with all live
/// leaves: read from the changes feed (`style=all_docs`), and with
/// `open_revs=all` for documents with more than one leaf.
pub async fn read_all(store: &AnyStore) -> BTreeMap<String, Stored> {
    let mut out = BTreeMap::new();
    let mut since = Value::from(0);
    loop {
        let changes = store
            .changes(&ChangesOptions {
                since: since.clone(),
                limit: Some(1000),
                style_all_docs: true,
                include_docs: true,
                ..ChangesOptions::default()
            })
            .await
            .expect("changes");
        if changes.results.is_empty() {
            break;
        }
        for row in changes.results {
            let winner = row.doc.clone().filter(|_| !row.deleted);
            let rev = row
                .doc
                .as_ref()
                .and_then(|d| d.get("_rev"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| row.changes[0].rev.clone());
            let live_leaves = if row.changes.len() == 1 {
                winner.iter().cloned().collect()
            } else {
                live_leaves(store, &row.id).await
            };
            out.insert(
                row.id.clone(),
                Stored {
                    rev,
                    deleted: row.deleted,
                    winner,
                    live_leaves,
                },
            );
        }
        since = changes.last_seq;
    }
    out
}

/// The non-deleted leaves of one document (`open_revs=all`).
pub async fn live_leaves(store: &AnyStore, id: &str) -> Vec<Value> {
    let opts = GetOptions {
        open_revs: Some(OpenRevs::All),
        ..GetOptions::default()
    };
    match store.get(id, &opts).await {
        Ok(GetResult::Revs(revs)) => revs
            .into_iter()
            .filter_map(|r| match r {
                OpenRev::Ok(doc) if doc.get("_deleted") != Some(&Value::Bool(true)) => Some(doc),
                _ => None,
            })
            .collect(),
        Ok(GetResult::Doc(doc)) => vec![doc],
        Err(e) => panic!("open_revs=all of {id}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_another_server_took_is_noticed_not_shared() {
        let first = PouchServer::start();
        assert!(
            matches!(PouchServer::start_on(first.port), Started::PortTaken),
            "a second pouchdb-server on the first one's port must not pass for started"
        );
        let second = PouchServer::start();
        assert_ne!(second.port, first.port);
    }
}
