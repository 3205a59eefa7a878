//! The embedded backend: one SQLite file per database, CouchDB's revision rules.
//!
//! Layout: `docs` holds one row per document (its revision tree as compact
//! JSON, its winner and the sequence of its latest change, so the changes feed
//! is an index scan that lists each document once); `revs` holds the body of
//! every revision still in a tree, byte for byte as written (a rowid table
//! with an index on `(id, rev)`: files made before it was were `WITHOUT
//! ROWID`, whose interior pages hold whole rows, four bodies a page, and
//! whose bodies over ~1 KB overflow; both answer the same SQL); `blobs` holds
//! attachment data by digest; `local` holds `_local/` documents (no history,
//! not in the feed); `meta` holds the uuid, `revs_limit`, document counts and
//! `seq_floor` (the last sequence before a `delete_db`, so sequences never go back).
//! The same five tables prefixed `rewind_` hold the database's companion
//! (the engine's state and journal, [`Tables::Companion`]), a second
//! database in the same file.
//!
//! Durability: WAL mode with `synchronous=FULL`. Every `bulk_docs` call is one
//! transaction on the handle's writer connection, so a crash (SIGKILL, power
//! loss) keeps every batch that was acknowledged and none of a batch that was
//! not: a revision is never half written. Readers use their own connections
//! and see the last committed snapshot; they never block the writer. A
//! thread per file copies committed WAL frames into the database file
//! beside the writer (`spawn_checkpointer`).
//!
//! Several handles and several processes may write one file at once (`rewind
//! serve` and `rewind upgrade` do). Every write transaction starts with `BEGIN
//! IMMEDIATE`, which takes the file's write lock (waiting up to the busy
//! timeout), and then reads the last sequence and the counts from the file, so
//! nothing that matters lives only in memory. A handle keeps the last sequence
//! it has seen in a `watch` channel, to wake `wait_for_change` at once for its
//! own writes; a poller reads the file every 200 ms (`POLL_INTERVAL`) while someone
//! waits, so other handles' and processes' writes wake it too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde_json::{Map, Value};
use tokio::sync::watch;

pub use crate::doc::TextDoc;
use crate::doc::{self, AttIn, Extras, ParsedDoc};
use crate::error::{Result, StoreError};
use crate::rev::{Merge, Rev, RevTree, DEFAULT_REVS_LIMIT};
use crate::types::*;

/// `PRAGMA application_id` of a rewind store ("RWND").
const APPLICATION_ID: i64 = 0x52574e44;
/// `PRAGMA user_version` of the current schema.
const SCHEMA_VERSION: i64 = 1;
/// How long a connection waits for another connection's lock (another
/// process's write transaction) before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `wait_for_change` reads the file for other processes' writes.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS docs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    deleted INTEGER NOT NULL,
    winner TEXT NOT NULL,
    tree TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revs (
    id TEXT NOT NULL,
    rev TEXT NOT NULL,
    body TEXT NOT NULL,
    atts TEXT,
    PRIMARY KEY (id, rev)
);
CREATE TABLE IF NOT EXISTS blobs (digest TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS local (id TEXT PRIMARY KEY, rev INTEGER NOT NULL, body TEXT NOT NULL) WITHOUT ROWID;
";

/// Which of a file's two sets of tables a handle reads and writes: the
/// database's own, or its companion's. The companion (the engine's state and
/// journal, `<file>-rewind` to [`crate::open`]) lives in the same file as
/// the data, in tables named with the prefix `rewind_`, so a copy or a
/// backup of the one file carries everything a rollback needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tables {
    /// `meta`, `docs`, `revs`, `blobs`, `local`.
    Data,
    /// `rewind_meta`, `rewind_docs`, ...: the same schema under the prefix.
    Companion,
}

/// The table names every statement of this module uses (the schema's).
const TABLE_NAMES: [&str; 5] = ["meta", "docs", "revs", "blobs", "local"];
/// The prefix of the companion's tables.
const COMPANION_PREFIX: &str = "rewind_";

impl Tables {
    /// `sql` (written with the data tables' names) for this set of tables.
    /// The companion's statements are made once each and kept for the
    /// process's life (a fixed set: every statement is a literal here).
    fn sql(self, sql: &'static str) -> &'static str {
        match self {
            Tables::Data => sql,
            Tables::Companion => {
                static MADE: Mutex<BTreeMap<&'static str, &'static str>> =
                    Mutex::new(BTreeMap::new());
                let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
                made.entry(sql)
                    .or_insert_with(|| Box::leak(prefix_tables(sql, COMPANION_PREFIX).into()))
            }
        }
    }

    /// The table whose presence says this set of tables exists in a file.
    fn meta_table(self) -> &'static str {
        self.sql("meta")
    }
}

/// `sql` with every table name of [`TABLE_NAMES`] outside string literals
/// prefixed with `prefix`.
fn prefix_tables(sql: &str, prefix: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 4 * prefix.len());
    let mut word = String::new();
    let mut quoted = false;
    let flush = |word: &mut String, out: &mut String| {
        if TABLE_NAMES.contains(&word.as_str()) {
            out.push_str(prefix);
        }
        out.push_str(word);
        word.clear();
    };
    for ch in sql.chars() {
        if !quoted && (ch.is_ascii_alphanumeric() || ch == '_') {
            word.push(ch);
            continue;
        }
        flush(&mut word, &mut out);
        if ch == '\'' {
            quoted = !quoted;
        }
        out.push(ch);
    }
    flush(&mut word, &mut out);
    out
}

/// A connection (or a transaction on it) seen through one set of tables:
/// every statement goes through [`Tables::sql`], so no statement of this
/// module can name the other set's tables by mistake.
struct Db<'c> {
    conn: &'c Connection,
    tables: Tables,
}

impl<'c> Db<'c> {
    fn prepare_cached(&self, sql: &'static str) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
        self.conn.prepare_cached(self.tables.sql(sql))
    }

    fn execute(&self, sql: &'static str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn execute_batch(&self, sql: &'static str) -> rusqlite::Result<()> {
        self.conn.execute_batch(self.tables.sql(sql))
    }
}

/// The last committed sequence: the highest in `docs`, or `seq_floor` after a
/// `delete_db` emptied it. Cheap: `max(seq)` is one step of the seq index.
const LAST_SEQ_SQL: &str = "SELECT max(coalesce((SELECT max(seq) FROM docs), 0), \
     coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'seq_floor'), 0))";

impl From<rusqlite::Error> for StoreError {
    fn from(source: rusqlite::Error) -> Self {
        StoreError::Sqlite {
            path: String::new(),
            source,
        }
    }
}

/// A database in one SQLite file. Cheap to clone; clones share connections.
/// Other handles on the same file, in this process or another, may write at
/// the same time.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    name: String,
    uuid: String,
    /// The set of tables this handle reads and writes.
    tables: Tables,
    /// The file's writer connection in this process (see [`shared_writer`]).
    writer: Arc<Writer>,
    readers: Mutex<Vec<Connection>>,
    /// Cache of the file's `exists` flag, refreshed whenever meta is read.
    exists: AtomicBool,
    /// The highest committed sequence this handle has seen (a cache: the
    /// file is the truth). Wakes `wait_for_change`.
    seq: watch::Sender<u64>,
    /// True while a task polls the file for `wait_for_change` callers.
    polling: AtomicBool,
}

/// The database-wide values a write depends on, read from the file inside
/// the transaction (never from memory: other handles write the same file).
#[derive(Clone, Copy, Debug)]
struct Counters {
    last_seq: u64,
    doc_count: i64,
    del_count: i64,
    revs_limit: u64,
    exists: bool,
}

fn read_counters(c: &Db<'_>) -> Result<Counters> {
    let mut k = Counters {
        last_seq: 0,
        doc_count: 0,
        del_count: 0,
        revs_limit: DEFAULT_REVS_LIMIT,
        exists: true,
    };
    let mut st = c.prepare_cached(
        "SELECT key, value FROM meta WHERE key IN ('doc_count', 'del_count', 'revs_limit', 'exists')",
    )?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (key, value) = row?;
        let n: i64 = value.parse().map_err(|_| {
            StoreError::Internal(format!("meta entry {key:?} is not a number: {value:?}"))
        })?;
        match key.as_str() {
            "doc_count" => k.doc_count = n,
            "del_count" => k.del_count = n,
            "revs_limit" => k.revs_limit = n.max(1) as u64,
            _ => k.exists = n != 0,
        }
    }
    k.last_seq = last_seq(c)?;
    Ok(k)
}

fn last_seq(c: &Db<'_>) -> Result<u64> {
    let s: i64 = c
        .prepare_cached(LAST_SEQ_SQL)?
        .query_row([], |r| r.get(0))?;
    Ok(s.max(0) as u64)
}

/// Where a changes feed starts.
enum Since {
    Seq(u64),
    /// The last sequence at the time of the read.
    Now,
}

impl Since {
    fn resolve(&self, c: &Db<'_>) -> Result<u64> {
        match self {
            Since::Seq(s) => Ok(*s),
            Since::Now => last_seq(c),
        }
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Switching a new file to WAL upgrades a shared lock to an exclusive one;
    // when two connections do it at once SQLite answers SQLITE_BUSY without
    // waiting (waiting could deadlock), so retry here.
    let start = std::time::Instant::now();
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && start.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => break r?,
        }
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// Page cache of the writer connection, in KiB. A batch rewrites pages all
/// over the B-trees (document ids are random); with SQLite's default 2 MB the
/// dirty pages of one transaction spill to the WAL before the commit and are
/// read back from the file. The cache is filled lazily, so a small database
/// uses less.
const WRITER_CACHE_KIB: i64 = 16 * 1024;
/// Pages in the WAL before a commit copies them into the database file
/// (SQLite's default is 1000). Larger batches each wrote more than 1000
/// pages, so every commit paid for a checkpoint (copy and sync); with a
/// larger WAL, pages rewritten by several commits are copied once.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// Bytes a WAL file is cut back to when it starts over (SQLite leaves it at
/// its largest: 250 MB after a run over 1M documents).
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Prepared statements the writer connection keeps: those of both sets of
/// tables (rusqlite keeps 16 by default).
const WRITER_STATEMENTS: usize = 64;

/// Settings of the writer connection only.
fn configure_writer(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    Ok(())
}

/// An SQLite database with nothing in it: what another process that is
/// creating a store leaves between switching to WAL and committing the schema.
fn is_blank(conn: &Connection) -> rusqlite::Result<bool> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let objects: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    Ok(version == 0 && objects == 0)
}

/// Checks that an opened database is a rewind store of this schema version.
fn check_schema(conn: &Connection) -> std::result::Result<(), String> {
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(|e| format!("not a SQLite database ({e})"))?;
    if app_id != APPLICATION_ID {
        return Err("a SQLite database without rewind's schema (application_id differs)".into());
    }
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if version != SCHEMA_VERSION {
        return Err(format!(
            "schema version {version}; this rewind reads version {SCHEMA_VERSION}"
        ));
    }
    Ok(())
}

/// Creates the schema unless another process got there first. The immediate
/// transaction serializes creators: the second finds the tables and only
/// checks them. `data_exists`: whether the database itself exists once
/// created (not when the file is made to hold a companion).
fn create_schema(
    conn: &mut Connection,
    data_exists: bool,
) -> Result<std::result::Result<(), String>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let objects: i64 = tx.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if objects != 0 {
        return Ok(check_schema(&tx));
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    create_tables(&tx, Tables::Data, data_exists)?;
    tx.commit()?;
    Ok(Ok(()))
}

/// Creates one set of tables and its `meta` entries (in the caller's transaction).
fn create_tables(tx: &Connection, tables: Tables, exists: bool) -> Result<()> {
    let db = Db { conn: tx, tables };
    db.execute_batch(SCHEMA)?;
    let meta = [
        ("uuid", doc::new_uuid()),
        ("revs_limit", DEFAULT_REVS_LIMIT.to_string()),
        ("doc_count", "0".into()),
        ("del_count", "0".into()),
        ("exists", if exists { "1" } else { "0" }.into()),
    ];
    for (k, v) in meta {
        db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
            params![k, v],
        )?;
    }
    Ok(())
}

/// Whether a set of tables is in the file.
fn has_tables(conn: &Connection, tables: Tables) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [tables.meta_table()],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Creates the companion's tables in a store's file unless they are there
/// (another process may be creating them: the immediate transaction
/// serializes creators). A new companion exists (as a database) at once.
fn create_companion_tables(conn: &mut Connection) -> Result<()> {
    if has_tables(conn, Tables::Companion)? {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if !has_tables(&tx, Tables::Companion)? {
        create_tables(&tx, Tables::Companion, true)?;
    }
    tx.commit()?;
    Ok(())
}

/// The writer connection of a file, one per file in this process, shared by
/// its handles: a database's handle and its companion's write the same file.
/// Sharing it serializes their transactions without SQLite's busy handler
/// (which sleeps) and keeps one page cache, which a commit by another
/// connection would otherwise empty.
fn shared_writer(path: &Path, conn: Connection) -> Arc<Writer> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(writer) = writers.get(&key).and_then(std::sync::Weak::upgrade) {
        return writer;
    }
    let writer = Arc::new(Writer {
        conn: Mutex::new(conn),
        checkpoints: spawn_checkpointer(path),
    });
    writers.insert(key, Arc::downgrade(&writer));
    writer
}

/// The writer of each file this process opened for writing, by canonical
/// path: live while a handle holds it. A file's entry stays after its
/// writer is gone (one per file): [`settle_all`] settles every file written.
static WRITERS: Mutex<BTreeMap<PathBuf, std::sync::Weak<Writer>>> = Mutex::new(BTreeMap::new());

/// A connection of its own to `path`, beside the writer, for checkpoints.
fn checkpoint_connection(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// Copies the whole write-ahead log of every store file this process
/// opened for writing into the file itself and empties it
/// (`PRAGMA wal_checkpoint(TRUNCATE)`), so that the `.db` file alone holds
/// every commit: a command calls it before it exits, and a plain copy of the
/// file is then complete. Best effort: a file another process is reading
/// keeps its log (waiting at most two seconds per file for its readers);
/// SQLite reads the log too, so nothing is lost either way. Call it when no
/// transaction of this process is in flight. Blocking.
pub fn settle_all() {
    let written: Vec<PathBuf> = WRITERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    for path in written {
        let Ok(conn) = checkpoint_connection(&path) else {
            continue;
        };
        let _ = conn.busy_timeout(std::time::Duration::from_millis(500));
        // A checkpoint already running (the checkpointer thread's) makes
        // this one give up at once: it is tried again until it ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .is_ok_and(|busy| busy != 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A file's writer connection, and the thread that checkpoints its WAL.
struct Writer {
    conn: Mutex<Connection>,
    /// Wakes the checkpointer (`None` if it could not start: the writer's
    /// own automatic checkpoints still run).
    checkpoints: Option<std::sync::mpsc::SyncSender<()>>,
}

impl Writer {
    /// Called after each commit: the checkpointer copies the new WAL
    /// frames into the database file on its own thread.
    fn committed(&self) {
        if let Some(wake) = &self.checkpoints {
            let _ = wake.try_send(());
        }
    }
}

/// Starts a thread that, woken after commits, copies WAL frames into the
/// database file (`PRAGMA wal_checkpoint(PASSIVE)`: it waits for no one and
/// blocks no one). The copying and its sync then run beside the writer
/// instead of inside its commits, where SQLite's automatic checkpoints
/// (every [`WAL_AUTOCHECKPOINT_PAGES`]) took ~15% of a run's time; those
/// still run, and find the frames already copied. The thread ends when its
/// writer is dropped.
fn spawn_checkpointer(path: &Path) -> Option<std::sync::mpsc::SyncSender<()>> {
    let conn = checkpoint_connection(path).ok()?;
    let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("rewind-wal".into())
        .spawn(move || {
            while woken.recv().is_ok() {
                // Busy (another checkpoint running) or failed: the next
                // commit wakes it again.
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        })
        .ok()?;
    Some(wake)
}

impl SqliteStore {
    /// Opens the store at `path`, creating it (with its schema) if the file is
    /// missing or empty. Several processes may open (and create) one file at once.
    ///
    /// An existing file must be a rewind store: a text file, a damaged file or
    /// another application's SQLite database gives [`StoreError::NotAStore`],
    /// and nothing is written to it. Blocking; call it from a blocking context
    /// or through [`crate::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        Self::open_tables(path.as_ref(), Tables::Data)
    }

    /// Opens the companion of the store at `path`: its tables in the same
    /// file ([`Tables::Companion`]), created if missing. A missing or empty
    /// file is created as a store whose own database does not exist yet
    /// (`create_db` makes it). Errors as [`SqliteStore::open`]. Blocking.
    pub fn open_companion(path: impl AsRef<Path>) -> Result<SqliteStore> {
        Self::open_tables(path.as_ref(), Tables::Companion)
    }

    fn open_tables(path: &Path, tables: Tables) -> Result<SqliteStore> {
        let path = path.to_path_buf();
        let ps = path_str(&path);
        let not_store = |reason: String| StoreError::NotAStore {
            path: ps.clone(),
            reason,
        };
        let fresh = std::fs::metadata(&path)
            .map(|m| m.len() == 0)
            .unwrap_or(true);
        let mut conn = if fresh {
            // Said plainly: SQLite says "unable to open database file".
            if let Some(dir) = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
            {
                return Err(StoreError::NotFound {
                    what: format!("directory {}", dir.display()),
                    reason: format!("{ps} cannot be created there: make the directory first"),
                });
            }
            Connection::open(&path).map_err(|e| not_store(format!("cannot create: {e}")))?
        } else {
            Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| not_store(format!("cannot open: {e}")))?
        };
        // Before the first read: another process may hold a lock while it creates the file.
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| not_store(e.to_string()))?;
        let mut create = fresh;
        if !fresh {
            // Validate before any pragma that writes (journal_mode would).
            if let Err(reason) = check_schema(&conn) {
                // A blank database is a store another opener is creating.
                if is_blank(&conn).unwrap_or(false) {
                    create = true;
                } else if check_schema(&conn).is_err() {
                    // (Not blank and still not a store: the other opener did
                    // not just commit the schema between the two reads.)
                    return Err(not_store(reason));
                }
            }
        }
        configure(&conn).map_err(|e| not_store(e.to_string()))?;
        configure_writer(&conn).map_err(|e| not_store(e.to_string()))?;
        if create {
            create_schema(&mut conn, tables == Tables::Data)
                .map_err(|e| not_store(format!("cannot create the schema: {e}")))?
                .map_err(&not_store)?;
        }
        if tables == Tables::Companion {
            create_companion_tables(&mut conn)
                .map_err(|e| not_store(format!("cannot create the companion's tables: {e}")))?;
        }
        let db = Db {
            conn: &conn,
            tables,
        };
        let uuid: String = db
            .prepare_cached("SELECT value FROM meta WHERE key = 'uuid'")
            .and_then(|mut st| st.query_row([], |r| r.get(0)).optional())
            .map_err(|e| not_store(e.to_string()))?
            .ok_or_else(|| not_store("meta entry \"uuid\" is missing".into()))?;
        let k = read_counters(&db).map_err(|e| not_store(e.to_string()))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| ps.clone());
        let name = match tables {
            Tables::Data => stem,
            Tables::Companion => format!("{stem}{}", crate::COMPANION_SUFFIX),
        };
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
        let writer = shared_writer(&path, conn);
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                name,
                uuid,
                tables,
                writer,
                readers: Mutex::new(Vec::new()),
                exists: AtomicBool::new(k.exists),
                seq: watch::Sender::new(k.last_seq),
                polling: AtomicBool::new(false),
            }),
        })
    }

    /// Whether the file holds a companion (its tables), without creating
    /// one: for readers that must write nothing (`rewind plan`, `status`).
    pub async fn has_companion(&self) -> Result<bool> {
        self.read_raw(|c| Ok(has_tables(c.conn, Tables::Companion)?))
            .await
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A random id made when the file was created; it survives copies of the file.
    pub fn uuid(&self) -> &str {
        &self.inner.uuid
    }

    fn with_path(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Sqlite { path, source } if path.is_empty() => StoreError::Sqlite {
                path: path_str(&self.inner.path),
                source,
            },
            e => e,
        }
    }

    fn missing_db(&self) -> StoreError {
        StoreError::NotFound {
            what: format!("database {}", self.inner.name),
            reason: "Database does not exist.".into(),
        }
    }

    /// Updates the caches from values read in a committed snapshot. The
    /// sequence only moves forward (snapshots may be published out of order).
    fn publish(&self, k: &Counters) {
        self.inner.exists.store(k.exists, Ordering::Release);
        self.publish_seq(k.last_seq);
    }

    fn publish_seq(&self, seq: u64) {
        self.inner.seq.send_if_modified(|cur| {
            let newer = seq > *cur;
            if newer {
                *cur = seq;
            }
            newer
        });
    }

    /// Fails with `NotFound` if the database is deleted. Trusts the cache
    /// when it says the database exists; otherwise asks the file (another
    /// process may have created it again).
    fn ensure_exists(&self, c: &Db<'_>) -> Result<()> {
        if self.inner.exists.load(Ordering::Acquire) {
            return Ok(());
        }
        let k = read_counters(c)?;
        self.publish(&k);
        if k.exists {
            Ok(())
        } else {
            Err(self.missing_db())
        }
    }

    async fn check_exists(&self) -> Result<()> {
        if self.inner.exists.load(Ordering::Acquire) {
            return Ok(());
        }
        let this = self.clone();
        self.read_raw(move |c| this.ensure_exists(c)).await
    }

    /// Runs `f` on a reader connection inside a read transaction (one
    /// snapshot), failing with `NotFound` if the database is deleted.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T> + Send + 'static,
    {
        let this = self.clone();
        self.read_raw(move |c| {
            this.ensure_exists(c)?;
            f(c)
        })
        .await
    }

    /// [`Self::read`] without the existence check.
    async fn read_raw<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T> + Send + 'static,
    {
        let this = self.clone();
        let run = move || -> Result<T> {
            let pooled = this.inner.readers.lock().expect("reader pool").pop();
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let c = Connection::open_with_flags(
                        &this.inner.path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    c.busy_timeout(BUSY_TIMEOUT)?;
                    c
                }
            };
            let out = (|| {
                let tx = conn.unchecked_transaction()?;
                f(&Db {
                    conn: &tx,
                    tables: this.inner.tables,
                })
            })();
            this.inner.readers.lock().expect("reader pool").push(conn);
            out
        };
        let this = self.clone();
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| StoreError::Internal(format!("reader task failed: {e}")))?
            .map_err(|e| this.with_path(e))
    }

    /// Runs `f` in one write transaction on the writer connection. The
    /// transaction starts with `BEGIN IMMEDIATE` (it holds the file's write
    /// lock from the start, so no other handle or process commits between
    /// reading the counters and writing), and `f` gets the counters read from
    /// the file; whatever `f` leaves in them is published after the commit.
    /// If `f` fails, nothing is committed.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>, &mut Counters) -> Result<T> + Send + 'static,
    {
        let this = self.clone();
        let run = move || -> Result<T> {
            let mut conn = this
                .inner
                .writer
                .conn
                .lock()
                .map_err(|_| StoreError::Internal("writer lock poisoned".into()))?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let db = Db {
                conn: &tx,
                tables: this.inner.tables,
            };
            let read = read_counters(&db)?;
            let mut k = read;
            match f(&db, &mut k) {
                Ok(out) => {
                    tx.commit()?; // durable from here: acknowledged only after this
                    this.inner.writer.committed();
                    this.publish(&k);
                    Ok(out)
                }
                Err(e) => {
                    drop(tx); // rolls back
                    this.publish(&read);
                    Err(e)
                }
            }
        };
        let this = self.clone();
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| StoreError::Internal(format!("writer task failed: {e}")))?
            .map_err(|e| this.with_path(e))
    }

    /// The counters, read from the file (and published).
    async fn refresh(&self) -> Result<Counters> {
        let k = self.read_raw(read_counters).await?;
        self.publish(&k);
        Ok(k)
    }

    /// The last committed sequence, read from the file (and published).
    async fn current_seq(&self) -> Result<u64> {
        let seq = self.read_raw(last_seq).await?;
        self.publish_seq(seq);
        Ok(seq)
    }

    /// Makes sure one task polls the file while anyone waits in
    /// `wait_for_change`, so other processes' commits wake them. Call after
    /// subscribing to `inner.seq`.
    fn ensure_poller(&self) {
        if self
            .inner
            .polling
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        /// Clears `polling` however the task ends (also when its runtime shuts down).
        struct Running {
            store: SqliteStore,
            armed: bool,
        }
        impl Drop for Running {
            fn drop(&mut self) {
                if self.armed {
                    self.store.inner.polling.store(false, Ordering::SeqCst);
                }
            }
        }
        let mut running = Running {
            store: self.clone(),
            armed: true,
        };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL_INTERVAL).await;
                let inner = &running.store.inner;
                if inner.seq.receiver_count() == 0 {
                    running.armed = false;
                    let inner = &running.store.inner;
                    inner.polling.store(false, Ordering::SeqCst);
                    // A waiter that subscribed just now may have seen `polling`
                    // still set and left the polling to this task: keep it then
                    // (unless a new task took over).
                    if inner.seq.receiver_count() == 0
                        || inner
                            .polling
                            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                            .is_err()
                    {
                        return;
                    }
                    running.armed = true;
                }
                // An error (the file briefly unreadable) is retried on the next tick.
                let _ = running.store.current_seq().await;
            }
        });
    }

    fn parse_since(&self, since: &Seq) -> Result<Since> {
        match since {
            Value::Number(n) => n.as_u64().map(Since::Seq).ok_or_else(|| {
                StoreError::bad(format!("invalid since {n}: expected a sequence number"))
            }),
            Value::String(s) if s == "now" => Ok(Since::Now),
            Value::String(s) => s.parse().map(Since::Seq).map_err(|_| {
                StoreError::bad(format!(
                    "invalid since {s:?}: expected a sequence number or \"now\""
                ))
            }),
            Value::Null => Ok(Since::Seq(0)),
            other => Err(StoreError::bad(format!(
                "invalid since {other}: expected a sequence number"
            ))),
        }
    }

    /// The documents that have a live leaf, in id order: those after `after`
    /// (all when it is `None`), at most `limit`. Each is a changes-feed row
    /// listing every leaf (`style=all_docs`), with the winner's body when
    /// `include_docs`. For a rewrite of the whole database (the engine's
    /// upgrade and rollback): walking ids in order reads and writes each page
    /// of the document and revision B-trees once, where the changes feed
    /// visits them in random order.
    pub async fn live_docs_by_id(
        &self,
        after: Option<String>,
        limit: usize,
        include_docs: bool,
    ) -> Result<Vec<ChangeRow>> {
        self.read(move |c| {
            // The winner's body in the same statement (one join instead of
            // a lookup per document).
            let mut st = c.prepare_cached(
                "SELECT d.id, d.seq, d.tree, d.winner, r.body, r.atts FROM docs d \
                 LEFT JOIN revs r ON ?3 AND r.id = d.id AND r.rev = d.winner \
                 WHERE d.deleted = 0 AND d.id > ?1 ORDER BY d.id LIMIT ?2",
            )?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            type Found = (String, i64, String, String, Option<String>, Option<String>);
            let found: Vec<Found> = st
                .query_map(
                    params![after.unwrap_or_default(), limit, include_docs],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    },
                )?
                .collect::<rusqlite::Result<_>>()?;
            found
                .into_iter()
                .map(|(id, seq, tree, winner, body, atts)| {
                    let winner = body.map(|body| (winner, body, atts));
                    change_row(c, id, seq, &tree, true, include_docs, winner)
                })
                .collect()
        })
        .await
    }

    /// Writes validated documents in one transaction (see `bulk_docs`).
    async fn write_items(&self, parsed: Vec<Item>, new_edits: bool) -> Result<Vec<BulkResult>> {
        let this = self.clone();
        self.write(move |tx, k| {
            if !k.exists {
                return Err(this.missing_db());
            }
            let mut results = Vec::with_capacity(parsed.len());
            // Sequences continue from the file's last one, whoever wrote it.
            let mut st = State {
                next_seq: k.last_seq + 1,
                revs_limit: k.revs_limit,
                doc_delta: 0,
                del_delta: 0,
            };
            for item in parsed {
                let r = match item {
                    Item::Local(id, body) => match put_local_tx(tx, &id, body) {
                        Ok(rev) => Some(BulkResult {
                            id,
                            rev: Some(rev),
                            error: None,
                            reason: None,
                        }),
                        Err(e) => Some(error_result(id, &e)),
                    },
                    Item::Doc(d) => {
                        let id = d.id.clone();
                        match write_doc(tx, &mut st, d, new_edits) {
                            Ok(Some(rev)) if new_edits => Some(BulkResult {
                                id,
                                rev: Some(rev),
                                error: None,
                                reason: None,
                            }),
                            Ok(_) => None,
                            Err(
                                e @ (StoreError::Conflict { .. } | StoreError::MissingStub { .. }),
                            ) => Some(error_result(id, &e)),
                            Err(e) => return Err(e),
                        }
                    }
                };
                results.extend(r);
            }
            if st.doc_delta != 0 || st.del_delta != 0 {
                k.doc_count += st.doc_delta;
                k.del_count += st.del_delta;
                let mut up = tx.prepare_cached("UPDATE meta SET value = ?2 WHERE key = ?1")?;
                up.execute(params!["doc_count", k.doc_count.to_string()])?;
                up.execute(params!["del_count", k.del_count.to_string()])?;
            }
            k.last_seq = st.next_seq - 1;
            Ok(results)
        })
        .await
    }

    /// For each id, the winning revision and its body as stored (JSON text
    /// without special members or attachments), or `None` for a missing or
    /// deleted document: for a reader that parses bodies into its own types
    /// (the engine's journals) rather than into documents.
    pub async fn winner_texts(&self, ids: Vec<String>) -> Result<Vec<Option<(String, String)>>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT d.winner, r.body FROM docs d JOIN revs r ON r.id = d.id AND r.rev = d.winner \
                 WHERE d.id = ?1 AND d.deleted = 0",
            )?;
            ids.iter()
                .map(|id| {
                    Ok(st
                        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?)
                })
                .collect()
        })
        .await
    }

    /// `bulk_docs` with `new_edits=true` for bodies already serialized:
    /// the same revisions, conflicts and results as
    /// [`crate::Store::bulk_docs`] gives for `{"_id", "_rev", ...body}`,
    /// without building a document and serializing it again (a [`TextDoc`]
    /// was checked when it was made).
    pub async fn bulk_docs_text(&self, docs: Vec<TextDoc>) -> Result<Vec<BulkResult>> {
        self.check_exists().await?;
        let parsed = docs.into_iter().map(|d| Item::Doc(d.into())).collect();
        self.write_items(parsed, true).await
    }

    /// Lists every `_local/` document (ids with their `_local/` prefix), for copies.
    pub async fn local_docs(&self) -> Result<Vec<Value>> {
        self.read(|c| {
            let mut st = c.prepare_cached("SELECT id, rev, body FROM local ORDER BY id")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, rev, body) = row?;
                out.push(local_doc(&id, rev, &body)?);
            }
            Ok(out)
        })
        .await
    }
}

impl crate::Store for SqliteStore {
    async fn info(&self) -> Result<DbInfo> {
        let k = self.refresh().await?;
        if !k.exists {
            return Err(self.missing_db());
        }
        Ok(DbInfo {
            db_name: self.inner.name.clone(),
            doc_count: k.doc_count.max(0) as u64,
            doc_del_count: k.del_count.max(0) as u64,
            update_seq: Value::from(k.last_seq),
        })
    }

    async fn get(&self, id: &str, opts: &GetOptions) -> Result<GetResult> {
        if id.starts_with("_local/") {
            return self.get_local(id).await.map(GetResult::Doc);
        }
        let (id, opts) = (id.to_owned(), opts.clone());
        let rev = opts.rev.as_deref().map(str::parse::<Rev>).transpose()?;
        let list = match &opts.open_revs {
            Some(OpenRevs::List(l)) => Some(
                l.iter()
                    .map(|r| r.parse::<Rev>())
                    .collect::<Result<Vec<_>>>()?,
            ),
            _ => None,
        };
        self.read(move |c| {
            let loaded = load_doc(c, &id)?;
            let what = || format!("document {id}");
            let Some((tree, _)) = loaded else {
                return match list {
                    Some(list) => Ok(GetResult::Revs(
                        list.iter()
                            .map(|r| OpenRev::Missing(r.to_string()))
                            .collect(),
                    )),
                    None => Err(StoreError::missing(what())),
                };
            };
            match (&opts.open_revs, list) {
                (None, _) => {
                    let idx = match &rev {
                        Some(r) => tree.find(r).ok_or_else(|| {
                            StoreError::missing(format!("document {id} revision {r}"))
                        })?,
                        None => {
                            let w = tree.winner();
                            if tree.nodes[w].deleted {
                                return Err(StoreError::NotFound {
                                    what: what(),
                                    reason: "deleted".into(),
                                });
                            }
                            w
                        }
                    };
                    build_doc(c, &id, &tree, idx, &opts)?
                        .map(GetResult::Doc)
                        .ok_or_else(|| {
                            StoreError::missing(format!(
                                "document {id} revision {}",
                                tree.nodes[idx].rev
                            ))
                        })
                }
                (Some(OpenRevs::All), _) => {
                    let mut out = Vec::new();
                    for idx in tree.sorted_leaves() {
                        out.push(match build_doc(c, &id, &tree, idx, &opts)? {
                            Some(d) => OpenRev::Ok(d),
                            None => OpenRev::Missing(tree.nodes[idx].rev.to_string()),
                        });
                    }
                    Ok(GetResult::Revs(out))
                }
                (Some(OpenRevs::List(_)), list) => {
                    let mut out = Vec::new();
                    for r in list.unwrap_or_default() {
                        open_rev(c, &id, &tree, &r, &opts, &mut out)?;
                    }
                    Ok(GetResult::Revs(out))
                }
            }
        })
        .await
    }

    async fn bulk_docs(&self, docs: Vec<Value>, new_edits: bool) -> Result<Vec<BulkResult>> {
        self.check_exists().await?;
        // Validate everything before writing anything: a bad document fails the request.
        let mut parsed = Vec::with_capacity(docs.len());
        for d in docs {
            if let Some(id) = d
                .get("_id")
                .and_then(Value::as_str)
                .filter(|id| id.starts_with("_local/"))
            {
                parsed.push(Item::Local(id.to_owned(), d));
            } else {
                parsed.push(Item::Doc(doc::parse_doc(d, new_edits)?));
            }
        }
        self.write_items(parsed, new_edits).await
    }

    async fn bulk_get(
        &self,
        reqs: Vec<BulkGetRequest>,
        opts: BulkGetOptions,
    ) -> Result<Vec<BulkGetResult>> {
        for r in &reqs {
            if let Some(rev) = &r.rev {
                rev.parse::<Rev>()?;
            }
        }
        self.read(move |c| {
            let gopts = GetOptions {
                revs: opts.revs,
                latest: opts.latest,
                attachments: opts.attachments,
                ..Default::default()
            };
            let mut out = Vec::with_capacity(reqs.len());
            for r in reqs {
                let loaded = load_doc(c, &r.id)?;
                let err = |rev: &str, reason: &str| {
                    BulkGetItem::Error(DocError {
                        id: r.id.clone(),
                        rev: rev.to_owned(),
                        error: "not_found".into(),
                        reason: reason.into(),
                    })
                };
                let docs = match (loaded, &r.rev) {
                    (None, rev) => vec![err(rev.as_deref().unwrap_or("undefined"), "missing")],
                    (Some((tree, _)), None) => {
                        let w = tree.winner();
                        match build_doc(c, &r.id, &tree, w, &gopts)? {
                            Some(d) if !tree.nodes[w].deleted => vec![BulkGetItem::Ok(d)],
                            Some(_) => vec![err("undefined", "deleted")],
                            None => vec![err("undefined", "missing")],
                        }
                    }
                    (Some((tree, _)), Some(rev)) => {
                        let mut revs = Vec::new();
                        open_rev(c, &r.id, &tree, &rev.parse()?, &gopts, &mut revs)?;
                        revs.into_iter()
                            .map(|o| match o {
                                OpenRev::Ok(d) => BulkGetItem::Ok(d),
                                OpenRev::Missing(m) => err(&m, "missing"),
                            })
                            .collect()
                    }
                };
                out.push(BulkGetResult { id: r.id, docs });
            }
            Ok(out)
        })
        .await
    }

    async fn revs_diff(
        &self,
        revs: BTreeMap<String, Vec<String>>,
    ) -> Result<BTreeMap<String, RevsDiffEntry>> {
        let parsed: Vec<(String, Vec<Rev>)> = revs
            .into_iter()
            .map(|(id, rs)| {
                Ok((
                    id,
                    rs.iter().map(|r| r.parse()).collect::<Result<Vec<Rev>>>()?,
                ))
            })
            .collect::<Result<_>>()?;
        self.read(move |c| {
            let mut out = BTreeMap::new();
            for (id, revs) in parsed {
                let tree = load_doc(c, &id)?.map(|(t, _)| t).unwrap_or_default();
                let missing: Vec<&Rev> = revs.iter().filter(|r| tree.find(r).is_none()).collect();
                if missing.is_empty() {
                    continue;
                }
                let max_pos = missing.iter().map(|r| r.pos).max().unwrap_or(0);
                let mut ancestors: Vec<&Rev> = tree
                    .leaves()
                    .into_iter()
                    .map(|i| &tree.nodes[i].rev)
                    .filter(|r| r.pos < max_pos)
                    .collect();
                ancestors.sort();
                let mut missing_s: Vec<String> = Vec::new();
                for r in missing {
                    let s = r.to_string();
                    if !missing_s.contains(&s) {
                        missing_s.push(s);
                    }
                }
                out.insert(
                    id,
                    RevsDiffEntry {
                        missing: missing_s,
                        possible_ancestors: ancestors.iter().map(|r| r.to_string()).collect(),
                    },
                );
            }
            Ok(out)
        })
        .await
    }

    async fn all_docs(&self, opts: &AllDocsOptions) -> Result<AllDocs> {
        let opts = opts.clone();
        self.read(move |c| {
            let total_rows = read_counters(c)?.doc_count.max(0) as u64;
            let gopts = GetOptions::default();
            let mut rows = Vec::new();
            if let Some(keys) = &opts.keys {
                let iter: Box<dyn Iterator<Item = &String>> =
                    if opts.descending { Box::new(keys.iter().rev()) } else { Box::new(keys.iter()) };
                for key in iter.skip(opts.skip).take(opts.limit.unwrap_or(usize::MAX)) {
                    rows.push(match load_doc(c, key)? {
                        None => AllDocsRow { id: None, key: key.clone(), value: None, doc: None, error: Some("not_found".into()) },
                        Some((tree, _)) => {
                            let w = tree.winner();
                            let deleted = tree.nodes[w].deleted;
                            let doc = match (opts.include_docs, deleted) {
                                (false, _) => None,
                                (true, true) => Some(Value::Null),
                                (true, false) => build_doc(c, key, &tree, w, &gopts)?,
                            };
                            AllDocsRow {
                                id: Some(key.clone()),
                                key: key.clone(),
                                value: Some(RowValue { rev: tree.nodes[w].rev.to_string(), deleted }),
                                doc,
                                error: None,
                            }
                        }
                    });
                }
            } else {
                let (lo, hi) = if opts.descending { (&opts.end_key, &opts.start_key) } else { (&opts.start_key, &opts.end_key) };
                let mut st = c.prepare_cached(if opts.descending {
                    "SELECT id, tree FROM docs WHERE deleted = 0 AND (?1 IS NULL OR id >= ?1) AND (?2 IS NULL OR id <= ?2) \
                     ORDER BY id DESC LIMIT ?3 OFFSET ?4"
                } else {
                    "SELECT id, tree FROM docs WHERE deleted = 0 AND (?1 IS NULL OR id >= ?1) AND (?2 IS NULL OR id <= ?2) \
                     ORDER BY id ASC LIMIT ?3 OFFSET ?4"
                })?;
                let limit = opts.limit.map_or(-1, |l| l as i64);
                let found: Vec<(String, String)> = st
                    .query_map(params![lo, hi, limit, opts.skip as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                for (id, tree) in found {
                    let tree = RevTree::from_json(&tree)?;
                    let w = tree.winner();
                    let doc = if opts.include_docs { build_doc(c, &id, &tree, w, &gopts)? } else { None };
                    rows.push(AllDocsRow {
                        id: Some(id.clone()),
                        key: id,
                        value: Some(RowValue { rev: tree.nodes[w].rev.to_string(), deleted: false }),
                        doc,
                        error: None,
                    });
                }
            }
            Ok(AllDocs { total_rows, offset: opts.skip as u64, rows })
        })
        .await
    }

    async fn changes(&self, opts: &ChangesOptions) -> Result<Changes> {
        let since = self.parse_since(&opts.since)?;
        let opts = opts.clone();
        self.read(move |c| {
            let since = since.resolve(c)?;
            let mut st = c.prepare_cached(if opts.descending {
                "SELECT id, seq, tree FROM docs WHERE seq > ?1 ORDER BY seq DESC LIMIT ?2"
            } else {
                "SELECT id, seq, tree FROM docs WHERE seq > ?1 ORDER BY seq ASC LIMIT ?2"
            })?;
            let limit = opts.limit.map_or(-1, |l| l as i64);
            let found: Vec<(String, i64, String)> = st
                .query_map(params![since as i64, limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut results = Vec::with_capacity(found.len());
            let mut last = since;
            for (id, seq, tree) in found {
                last = seq as u64;
                results.push(change_row(
                    c,
                    id,
                    seq,
                    &tree,
                    opts.style_all_docs,
                    opts.include_docs,
                    None,
                )?);
            }
            Ok(Changes {
                results,
                last_seq: Value::from(last),
            })
        })
        .await
    }

    // Own writes wake waiters through the watch channel at once; a shared
    // poller publishes other handles' and processes' commits every POLL_INTERVAL.
    async fn wait_for_change(&self, since: &Seq, timeout: Duration) -> Result<bool> {
        let since = self.parse_since(since)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.seq.subscribe();
        // The cache may be behind the file: read it once.
        let now = self.current_seq().await?;
        let since = match since {
            Since::Seq(s) => s,
            Since::Now => now,
        };
        self.ensure_poller();
        loop {
            if *rx.borrow_and_update() > since {
                return Ok(true);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(false),
            }
        }
    }

    async fn get_local(&self, id: &str) -> Result<Value> {
        let id = local_id(id)?;
        self.read(move |c| {
            let row: Option<(i64, String)> = c
                .prepare_cached("SELECT rev, body FROM local WHERE id = ?1")?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let (rev, body) = row.ok_or_else(|| StoreError::missing(format!("document {id}")))?;
            local_doc(&id, rev, &body)
        })
        .await
    }

    async fn put_local(&self, id: &str, body: Value) -> Result<String> {
        self.check_exists().await?;
        let id = local_id(id)?;
        let this = self.clone();
        self.write(move |tx, k| {
            if !k.exists {
                return Err(this.missing_db());
            }
            put_local_tx(tx, &id, body)
        })
        .await
    }

    async fn delete_local(&self, id: &str, rev: Option<&str>) -> Result<()> {
        self.check_exists().await?;
        let id = local_id(id)?;
        let rev = rev.map(str::to_owned);
        let this = self.clone();
        self.write(move |tx, k| {
            if !k.exists {
                return Err(this.missing_db());
            }
            let cur: Option<i64> = tx
                .prepare_cached("SELECT rev FROM local WHERE id = ?1")?
                .query_row([&id], |r| r.get(0))
                .optional()?;
            let cur = cur.ok_or_else(|| StoreError::missing(format!("document {id}")))?;
            if rev.is_some_and(|r| r != format!("0-{cur}")) {
                return Err(StoreError::Conflict {
                    what: format!("document {id}"),
                });
            }
            tx.execute("DELETE FROM local WHERE id = ?1", [&id])?;
            Ok(())
        })
        .await
    }

    async fn create_db(&self) -> Result<()> {
        let what = format!("database {}", self.inner.name);
        self.write(move |tx, k| {
            if k.exists {
                return Err(StoreError::FileExists { what });
            }
            tx.execute("UPDATE meta SET value = '1' WHERE key = 'exists'", [])?;
            k.exists = true;
            Ok(())
        })
        .await
    }

    // Empties the file and marks the database as deleted (the file stays, so
    // open handles remain valid); `create_db` makes it usable again.
    async fn delete_db(&self) -> Result<()> {
        self.check_exists().await?;
        let this = self.clone();
        self.write(move |tx, k| {
            if !k.exists {
                return Err(this.missing_db());
            }
            // Sequences keep growing, so a feed reader never sees an old seq
            // reused: `seq_floor` keeps the last one once `docs` is empty.
            tx.execute_batch(
                "DELETE FROM docs; DELETE FROM revs; DELETE FROM blobs; DELETE FROM local;
                 UPDATE meta SET value = '0' WHERE key IN ('exists', 'doc_count', 'del_count');",
            )?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('seq_floor', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [k.last_seq.to_string()],
            )?;
            k.exists = false;
            k.doc_count = 0;
            k.del_count = 0;
            Ok(())
        })
        .await
    }

    async fn exists(&self) -> Result<bool> {
        let k = self.refresh().await?;
        Ok(k.exists)
    }

    async fn revs_limit(&self) -> Result<u64> {
        let k = self.refresh().await?;
        Ok(k.revs_limit)
    }

    async fn set_revs_limit(&self, limit: u64) -> Result<()> {
        if limit == 0 {
            return Err(StoreError::bad("revs_limit must be at least 1"));
        }
        self.write(move |tx, k| {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'revs_limit'",
                [limit.to_string()],
            )?;
            k.revs_limit = limit;
            Ok(())
        })
        .await
    }

    fn identity(&self) -> String {
        format!("sqlite:{}", self.inner.uuid)
    }
}

enum Item {
    Doc(ParsedDoc),
    Local(String, Value),
}

struct State {
    next_seq: u64,
    revs_limit: u64,
    doc_delta: i64,
    del_delta: i64,
}

fn error_result(id: String, e: &StoreError) -> BulkResult {
    let (error, reason) = e.couch_error();
    BulkResult {
        id,
        rev: None,
        error: Some(error),
        reason: Some(reason),
    }
}

fn local_id(id: &str) -> Result<String> {
    let id = if id.starts_with("_local/") {
        id.to_owned()
    } else {
        format!("_local/{id}")
    };
    if id.len() == "_local/".len() {
        return Err(StoreError::bad(
            "a _local document id needs a name after _local/",
        ));
    }
    Ok(id)
}

fn local_doc(id: &str, rev: i64, body: &str) -> Result<Value> {
    doc::assemble(id, &format!("0-{rev}"), body, Extras::default())
}

/// Writes a `_local/` document: `_rev` must name the current one (`0-N`), or be
/// absent for a new document. Returns the new `0-N+1`.
fn put_local_tx(tx: &Db<'_>, id: &str, body: Value) -> Result<String> {
    let Value::Object(mut m) = body else {
        return Err(StoreError::bad(format!(
            "document {id}: must be a JSON object"
        )));
    };
    m.remove("_id");
    let given = m.remove("_rev");
    let deleted = m
        .remove("_deleted")
        .and_then(|d| d.as_bool())
        .unwrap_or(false);
    let cur: Option<i64> = tx
        .prepare_cached("SELECT rev FROM local WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let given = given.as_ref().and_then(Value::as_str);
    let ok = match (cur, given) {
        (None, None) => true,
        (None, Some(g)) => g == "0-0",
        (Some(c), Some(g)) => g == format!("0-{c}"),
        (Some(_), None) => false,
    };
    if !ok {
        return Err(StoreError::Conflict {
            what: format!("document {id}"),
        });
    }
    if deleted {
        tx.execute("DELETE FROM local WHERE id = ?1", [id])?;
        return Ok("0-0".into());
    }
    let next = cur.unwrap_or(0) + 1;
    let text = serde_json::to_string(&Value::Object(m)).expect("JSON serializes");
    tx.prepare_cached("INSERT INTO local (id, rev, body) VALUES (?1, ?2, ?3) ON CONFLICT(id) DO UPDATE SET rev = excluded.rev, body = excluded.body")?
        .execute(params![id, next, text])?;
    Ok(format!("0-{next}"))
}

fn load_doc(c: &Db<'_>, id: &str) -> Result<Option<(RevTree, u64)>> {
    let row: Option<(String, i64)> = c
        .prepare_cached("SELECT tree, seq FROM docs WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(t, s)| Ok((RevTree::from_json(&t)?, s as u64)))
        .transpose()
}

fn load_rev(c: &Db<'_>, id: &str, rev: &Rev) -> Result<Option<(String, Option<String>)>> {
    Ok(
        c.prepare_cached("SELECT body, atts FROM revs WHERE id = ?1 AND rev = ?2")?
            .query_row(params![id, rev.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?,
    )
}

/// The document at tree node `idx`, or `None` if its body is not stored
/// (an ancestor known only by id).
fn build_doc(
    c: &Db<'_>,
    id: &str,
    tree: &RevTree,
    idx: usize,
    opts: &GetOptions,
) -> Result<Option<Value>> {
    let Some((body, atts)) = load_rev(c, id, &tree.nodes[idx].rev)? else {
        return Ok(None);
    };
    doc_at(c, id, tree, idx, opts, &body, atts).map(Some)
}

/// The document at tree node `idx`, from its stored body and attachment list.
fn doc_at(
    c: &Db<'_>,
    id: &str,
    tree: &RevTree,
    idx: usize,
    opts: &GetOptions,
    body: &str,
    atts: Option<String>,
) -> Result<Value> {
    let node = &tree.nodes[idx];
    let attachments = match atts {
        None => None,
        Some(a) => {
            let mut a: Map<String, Value> = serde_json::from_str(&a).map_err(|e| {
                StoreError::Internal(format!("document {id}: attachment list unreadable: {e}"))
            })?;
            for (name, meta) in a.iter_mut() {
                let Value::Object(m) = meta else { continue };
                if opts.attachments {
                    let digest = m
                        .get("digest")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let data: Option<Vec<u8>> = c
                        .prepare_cached("SELECT data FROM blobs WHERE digest = ?1")?
                        .query_row([&digest], |r| r.get(0))
                        .optional()?;
                    let data = data.ok_or_else(|| {
                        StoreError::Internal(format!(
                            "document {id}: attachment {name:?} data is missing"
                        ))
                    })?;
                    m.remove("length");
                    m.insert("data".into(), Value::from(doc::b64(&data)));
                } else {
                    m.insert("stub".into(), Value::Bool(true));
                }
            }
            Some(a)
        }
    };
    let extras = Extras {
        deleted: node.deleted,
        attachments,
        conflicts: opts.conflicts.then(|| {
            tree.conflicts()
                .iter()
                .map(|&i| tree.nodes[i].rev.to_string())
                .collect()
        }),
        revisions: opts.revs.then(|| tree.revisions_json(idx)),
    };
    doc::assemble(id, &node.rev.to_string(), body, extras)
}

/// One changes-feed row for a document: its winner (or, with `all_leaves`,
/// every leaf, winner first) and, with `include_docs`, the winner's body
/// (`winner`: the winner's revision, body and attachment list, when the
/// caller read them already).
fn change_row(
    c: &Db<'_>,
    id: String,
    seq: i64,
    tree: &str,
    all_leaves: bool,
    include_docs: bool,
    winner: Option<(String, String, Option<String>)>,
) -> Result<ChangeRow> {
    let tree = RevTree::from_json(tree)?;
    let leaves = tree.sorted_leaves();
    let w = leaves[0];
    let revs = if all_leaves { leaves } else { vec![w] };
    let opts = GetOptions::default();
    let doc = match winner {
        _ if !include_docs => None,
        Some((rev, body, atts)) if rev == tree.nodes[w].rev.to_string() => {
            Some(doc_at(c, &id, &tree, w, &opts, &body, atts)?)
        }
        _ => build_doc(c, &id, &tree, w, &opts)?,
    };
    Ok(ChangeRow {
        seq: Value::from(seq),
        id,
        changes: revs
            .into_iter()
            .map(|i| ChangeRev {
                rev: tree.nodes[i].rev.to_string(),
            })
            .collect(),
        deleted: tree.nodes[w].deleted,
        doc,
    })
}

/// Appends the `open_revs` answer for one requested revision.
fn open_rev(
    c: &Db<'_>,
    id: &str,
    tree: &RevTree,
    rev: &Rev,
    opts: &GetOptions,
    out: &mut Vec<OpenRev>,
) -> Result<()> {
    let Some(idx) = tree.find(rev) else {
        out.push(OpenRev::Missing(rev.to_string()));
        return Ok(());
    };
    let targets = if opts.latest {
        tree.leaves_under(idx)
    } else {
        vec![idx]
    };
    for t in targets {
        out.push(match build_doc(c, id, tree, t, opts)? {
            Some(d) => OpenRev::Ok(d),
            None => OpenRev::Missing(tree.nodes[t].rev.to_string()),
        });
    }
    Ok(())
}

/// Resolves a document's attachments into stored metadata, storing new data.
/// Stubs come from `parent_atts` (new edits) or from any revision of the
/// document or the blob table (replication).
fn store_atts(
    tx: &Db<'_>,
    d: &ParsedDoc,
    pos: u64,
    parent_atts: Option<&Map<String, Value>>,
    new_edits: bool,
) -> Result<(Option<String>, String)> {
    if d.atts.is_empty() {
        return Ok((None, String::new()));
    }
    let mut out = Map::new();
    let mut digests = String::new();
    for (name, a) in &d.atts {
        let meta = match a {
            AttIn::Inline {
                content_type,
                data,
                revpos,
            } => {
                let digest = doc::digest(data);
                tx.prepare_cached("INSERT OR IGNORE INTO blobs (digest, data) VALUES (?1, ?2)")?
                    .execute(params![digest, data])?;
                let revpos = if new_edits {
                    pos
                } else {
                    revpos.unwrap_or(pos)
                };
                doc::att_meta(content_type, &digest, data.len() as u64, revpos)
            }
            AttIn::Stub { digest } => {
                let missing = || StoreError::MissingStub {
                    id: d.id.clone(),
                    name: name.clone(),
                };
                let mut found = parent_atts.and_then(|p| p.get(name)).cloned();
                if found.is_none() && !new_edits {
                    found = find_att_meta(tx, &d.id, name, digest.as_deref())?;
                }
                let found = found.ok_or_else(missing)?;
                let have: Option<i64> = tx
                    .prepare_cached("SELECT 1 FROM blobs WHERE digest = ?1")?
                    .query_row(
                        [found
                            .get("digest")
                            .and_then(Value::as_str)
                            .unwrap_or_default()],
                        |r| r.get(0),
                    )
                    .optional()?;
                if have.is_none() {
                    return Err(missing());
                }
                found
            }
        };
        digests.push_str(name);
        digests.push('\0');
        digests.push_str(
            meta.get("digest")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        digests.push('\0');
        out.insert(name.clone(), meta);
    }
    Ok((
        Some(serde_json::to_string(&out).expect("JSON serializes")),
        digests,
    ))
}

fn find_att_meta(tx: &Db<'_>, id: &str, name: &str, digest: Option<&str>) -> Result<Option<Value>> {
    let mut st = tx.prepare_cached("SELECT atts FROM revs WHERE id = ?1 AND atts IS NOT NULL")?;
    let rows: Vec<String> = st
        .query_map([id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for a in rows {
        let m: Map<String, Value> =
            serde_json::from_str(&a).map_err(|e| StoreError::Internal(e.to_string()))?;
        if let Some(meta) = m.get(name) {
            if digest.is_none() || meta.get("digest").and_then(Value::as_str) == digest {
                return Ok(Some(meta.clone()));
            }
        }
    }
    Ok(None)
}

/// Writes one document inside the batch transaction. Returns the new revision
/// (`None` when a replicated revision was already known).
fn write_doc(tx: &Db<'_>, st: &mut State, d: ParsedDoc, new_edits: bool) -> Result<Option<String>> {
    let existing = load_doc(tx, &d.id)?;
    let was = existing.as_ref().map(|(t, _)| t.nodes[t.winner()].deleted);
    let mut tree = existing.map(|(t, _)| t).unwrap_or_default();
    let conflict = || StoreError::Conflict {
        what: format!("document {}", d.id),
    };

    let (new_rev, atts) = if new_edits {
        let parent = match (&d.rev, was) {
            (None, None) => None,
            (Some(_), None) => return Err(conflict()),
            (None, Some(true)) => Some(tree.winner()),
            (None, Some(false)) => return Err(conflict()),
            // Any leaf may be edited, deleted ones included (as CouchDB).
            (Some(r), Some(_)) => Some(
                tree.find(r)
                    .filter(|&i| tree.is_leaf(i))
                    .ok_or_else(conflict)?,
            ),
        };
        let parent_rev = parent.map(|p| tree.nodes[p].rev.clone());
        // Only stubs need the parent's attachments (a revision without
        // `_attachments` has none): no need to read the parent's body.
        let parent_atts = match &parent_rev {
            Some(p) if !d.atts.is_empty() => load_rev(tx, &d.id, p)?
                .and_then(|(_, a)| a)
                .map(|a| serde_json::from_str::<Map<String, Value>>(&a))
                .transpose()
                .map_err(|e| StoreError::Internal(e.to_string()))?,
            _ => None,
        };
        let pos = parent_rev.as_ref().map_or(1, |p| p.pos + 1);
        let (atts, digests) = store_atts(tx, &d, pos, parent_atts.as_ref(), true)?;
        let rev = match d.child {
            Some(child) if parent_rev == d.rev => child,
            _ => Rev::child_of(parent_rev.as_ref(), d.deleted, &d.body, &digests),
        };
        tree.push(rev.clone(), parent, d.deleted);
        (rev, atts)
    } else {
        let rev = d.path[0].clone();
        let (atts, _) = store_atts(tx, &d, rev.pos, None, false)?;
        if tree.merge_path(&d.path, d.deleted) == Merge::Known {
            // Already known: fill in a body we only knew by id, change nothing else.
            tx.prepare_cached(
                "INSERT OR IGNORE INTO revs (id, rev, body, atts) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![d.id, rev.to_string(), d.body, atts])?;
            return Ok(None);
        }
        (rev, atts)
    };

    for gone in tree.stem(st.revs_limit) {
        tx.prepare_cached("DELETE FROM revs WHERE id = ?1 AND rev = ?2")?
            .execute(params![d.id, gone.to_string()])?;
    }
    let rev_s = new_rev.to_string();
    tx.prepare_cached("INSERT OR REPLACE INTO revs (id, rev, body, atts) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![d.id, rev_s, d.body, atts])?;
    let w = tree.winner();
    let now_deleted = tree.nodes[w].deleted;
    let seq = st.next_seq;
    st.next_seq += 1;
    tx.prepare_cached(
        "INSERT INTO docs (id, seq, deleted, winner, tree) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, deleted = excluded.deleted, winner = excluded.winner, tree = excluded.tree",
    )?
    .execute(params![d.id, seq as i64, now_deleted, tree.nodes[w].rev.to_string(), tree.to_json()])?;
    match was {
        None => {}
        Some(true) => st.del_delta -= 1,
        Some(false) => st.doc_delta -= 1,
    }
    if now_deleted {
        st.del_delta += 1;
    } else {
        st.doc_delta += 1;
    }
    Ok(Some(rev_s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_companions_statements_name_only_its_tables() {
        assert_eq!(
            prefix_tables(
                "SELECT d.id FROM docs d JOIN revs r ON r.id = d.id WHERE d.id IN \
                 (SELECT key FROM meta WHERE key = 'docs local')",
                "rewind_"
            ),
            "SELECT d.id FROM rewind_docs d JOIN rewind_revs r ON r.id = d.id WHERE d.id IN \
             (SELECT key FROM rewind_meta WHERE key = 'docs local')"
        );
        assert_eq!(
            prefix_tables("DELETE FROM blobs; DELETE FROM local;", "rewind_"),
            "DELETE FROM rewind_blobs; DELETE FROM rewind_local;"
        );
        // Every statement of the schema, made for the companion, names no data table.
        let made = Tables::Companion.sql(SCHEMA);
        for name in TABLE_NAMES {
            assert!(!made.contains(&format!("EXISTS {name} ")), "{made}");
            assert!(made.contains(&format!("EXISTS rewind_{name} ")), "{made}");
        }
        assert!(std::ptr::eq(Tables::Companion.sql(SCHEMA), made));
        assert!(std::ptr::eq(Tables::Data.sql(SCHEMA), SCHEMA));
    }
}
