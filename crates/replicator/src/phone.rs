//! A simulated phone: a local embedded store that syncs with a remote
//! database the way a PouchDB app does, plus the edits a user makes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::Url;
use rewind_store::{redact_url, AnyStore, ChangesOptions, GetOptions, Seq, Store, StoreError};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{ReplicateError, Result};
use crate::replicate::{replicate, sync, ReplicateOptions, ReplicationReport, SyncReport};

/// One document as a database holds it: every leaf of its revision tree and
/// the winner's body. Two databases that converged give equal lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocLeaves {
    /// The document's `_id`.
    pub id: String,
    /// The winning revision.
    pub winner: String,
    /// True when the winning revision is a tombstone.
    pub deleted: bool,
    /// Every leaf revision, deleted ones included, sorted.
    pub leaves: Vec<String>,
    /// The winning revision's body as the database returns it (`_id` and
    /// `_rev` included; a tombstone is `{_id, _rev, _deleted}`).
    pub body: Value,
}

/// Every document of `store` (deleted ones included) with all its leaves,
/// sorted by id. Reads the changes feed in pages of 500.
pub async fn leaves(store: &AnyStore) -> rewind_store::Result<Vec<DocLeaves>> {
    let mut out = Vec::new();
    let mut since: Seq = Value::from(0);
    loop {
        let page = store
            .changes(&ChangesOptions {
                since: since.clone(),
                limit: Some(500),
                style_all_docs: true,
                include_docs: true,
                ..Default::default()
            })
            .await?;
        if page.results.is_empty() {
            break;
        }
        for row in page.results {
            let mut body = row.doc.unwrap_or(Value::Null);
            if let Some(o) = body.as_object_mut() {
                o.remove("_conflicts");
            }
            let mut leaves: Vec<String> = row.changes.into_iter().map(|c| c.rev).collect();
            leaves.sort();
            out.push(DocLeaves {
                winner: body
                    .get("_rev")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                id: row.id,
                deleted: row.deleted,
                leaves,
                body,
            });
        }
        since = page.last_seq;
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The server root of a database URL: its last path segment removed, with a
/// trailing `/` (`http://h:5984/v/1/medic` → `http://h:5984/v/1/`), as
/// PouchDB asks it for the server's uuid. Credentials are kept.
pub fn server_root(db_url: &str) -> Result<String> {
    let uuid_err = |reason: String| ReplicateError::Uuid {
        url: redact_url(db_url),
        reason,
    };
    let mut url = Url::parse(db_url).map_err(|e| uuid_err(format!("not a URL: {e}")))?;
    url.set_query(None);
    url.set_fragment(None);
    let segments: Vec<String> = url
        .path_segments()
        .map(|s| s.filter(|x| !x.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    let prefix = match segments.split_last() {
        Some((_, prefix)) => prefix,
        None => return Err(uuid_err("the URL names no database".into())),
    };
    url.set_path(&format!(
        "/{}",
        prefix.iter().map(|p| format!("{p}/")).collect::<String>()
    ));
    Ok(url.to_string())
}

/// A client per call: a pooled client must not outlive the tokio runtime
/// that made its connections, and this is asked once per sync.
fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    // reqwest is built without a default TLS crypto provider; use ring (an
    // error only means one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .build()
}

/// `GET {base}/` and its `uuid`: `None` when the server answers none.
///
/// `base` is a server root (see [`server_root`]); user and password in it
/// are sent as basic auth and never appear in an error.
pub async fn remote_uuid(base: &str) -> Result<Option<String>> {
    let shown = redact_url(base);
    let err = |reason: String| ReplicateError::Uuid {
        url: shown.clone(),
        reason,
    };
    let mut url = Url::parse(base).map_err(|e| err(format!("not a URL: {e}")))?;
    let user = match url.username() {
        "" => None,
        u => Some((
            rewind_store::percent_decode(u),
            url.password().map(rewind_store::percent_decode),
        )),
    };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    let client = http_client().map_err(|e| err(format!("HTTP client: {e}")))?;
    let mut req = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json");
    if let Some((u, p)) = user {
        req = req.basic_auth(u, p);
    }
    // reqwest errors can include the URL; ours has no credentials left.
    let resp = req.send().await.map_err(|e| err(e.to_string()))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| err(e.to_string()))?;
    if !status.is_success() {
        return Err(err(format!("HTTP {}", status.as_u16())));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|_| err(format!("HTTP {} without JSON", status.as_u16())))?;
    Ok(v.get("uuid").and_then(Value::as_str).map(str::to_owned))
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A simulated phone: a local embedded store and the URL it syncs with.
///
/// `remote_url` is public so a test can point a phone at another URL (e.g.
/// another schema version of the gateway); the next [`Phone::sync`] uses it.
/// A remote that is not an `http(s)` URL is opened as an embedded store.
pub struct Phone {
    /// The phone's name, shown in messages.
    pub name: String,
    /// The phone's own database (an embedded store).
    pub local: AnyStore,
    /// The database the phone syncs with: a URL (credentials allowed; messages
    /// redact them) or an embedded store's path.
    pub remote_url: String,
    /// Replication settings; `checkpoint_key` is overwritten by each sync
    /// with the remote's uuid.
    pub options: ReplicateOptions,
    local_path: PathBuf,
    /// The remote store opened for `remote_url` (the URL it was opened for).
    remote: Mutex<Option<(String, AnyStore)>>,
    _dir: Option<TempDir>,
}

impl std::fmt::Debug for Phone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Phone")
            .field("name", &self.name)
            .field("local_path", &self.local_path)
            .field("remote_url", &redact_url(&self.remote_url))
            .finish_non_exhaustive()
    }
}

impl Phone {
    /// A phone with a fresh local store in a temporary directory, removed
    /// when the phone is dropped.
    pub async fn new(name: &str, remote_url: &str) -> Result<Phone> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let dir = std::env::temp_dir().join(format!(
            "rewind-phone-{safe}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|error| ReplicateError::TempDir {
            phone: name.to_owned(),
            path: dir.display().to_string(),
            error,
        })?;
        let guard = TempDir(dir.clone());
        let mut phone = Phone::open(name, dir.join("local.db"), remote_url).await?;
        phone._dir = Some(guard);
        Ok(phone)
    }

    /// A phone over the local store at `local_path` (created if missing and
    /// kept when the phone is dropped): reopening the same file is a phone
    /// that restarted, with its data and checkpoints.
    pub async fn open(name: &str, local_path: impl AsRef<Path>, remote_url: &str) -> Result<Phone> {
        let local_path = local_path.as_ref().to_path_buf();
        let local = rewind_store::open(&local_path.display().to_string())
            .await
            .map_err(|error| ReplicateError::Phone {
                phone: name.to_owned(),
                step: format!("opening the local store {}", local_path.display()),
                error: Box::new(error),
            })?;
        Ok(Phone {
            name: name.to_owned(),
            local,
            remote_url: remote_url.to_owned(),
            options: ReplicateOptions::default(),
            local_path,
            remote: Mutex::new(None),
            _dir: None,
        })
    }

    /// Uses `remote`, an already open store, for the current `remote_url`
    /// (an embedded store must be opened once per process and shared).
    pub fn with_remote(self, remote: AnyStore) -> Phone {
        *self.remote.lock().expect("remote lock") = Some((self.remote_url.clone(), remote));
        self
    }

    /// The file of the local store.
    pub fn local_path(&self) -> &Path {
        &self.local_path
    }

    fn err(&self, step: impl Into<String>) -> impl FnOnce(StoreError) -> ReplicateError + '_ {
        let step = step.into();
        move |error| ReplicateError::Phone {
            phone: self.name.clone(),
            step,
            error: Box::new(error),
        }
    }

    /// The remote store for `remote_url`, opened once and reused.
    pub async fn remote(&self) -> Result<AnyStore> {
        if let Some((url, store)) = &*self.remote.lock().expect("remote lock") {
            if *url == self.remote_url {
                return Ok(store.clone());
            }
        }
        let store = rewind_store::open(&self.remote_url)
            .await
            .map_err(self.err(format!(
                "opening the remote {}",
                redact_url(&self.remote_url)
            )))?;
        *self.remote.lock().expect("remote lock") = Some((self.remote_url.clone(), store.clone()));
        Ok(store)
    }

    /// Pulls then pushes, like `PouchDB.sync` run once. The replication ids
    /// include the remote's uuid (`GET /` at the URL's root), so a remote
    /// that answers another uuid (another schema version) restarts both
    /// directions from the beginning.
    pub async fn sync(&self) -> Result<SyncReport> {
        let remote = self.remote().await?;
        let opts = self.replicate_options().await?;
        sync(&self.local, &remote, &opts).await
    }

    /// Pushes then pulls: a phone that uploads its edits before it
    /// downloads (PouchDB's `sync` runs both directions at once, so either
    /// may finish first; see [`Phone::sync`]).
    pub async fn sync_push_first(&self) -> Result<SyncReport> {
        let remote = self.remote().await?;
        let opts = self.replicate_options().await?;
        let push = replicate(&self.local, &remote, &opts).await?;
        let pull = replicate(&remote, &self.local, &opts).await?;
        Ok(SyncReport { pull, push })
    }

    /// Pushes only (local → remote), like `PouchDB.replicate.to` run once:
    /// a phone uploading its edits at its own version before it moves to
    /// another.
    pub async fn push(&self) -> Result<ReplicationReport> {
        let remote = self.remote().await?;
        let opts = self.replicate_options().await?;
        replicate(&self.local, &remote, &opts).await
    }

    /// The phone's options with the checkpoint key of its remote's uuid.
    async fn replicate_options(&self) -> Result<ReplicateOptions> {
        let key = if rewind_store::is_url(&self.remote_url) {
            remote_uuid(&server_root(&self.remote_url)?)
                .await?
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(ReplicateOptions {
            checkpoint_key: key,
            ..self.options.clone()
        })
    }

    /// The local winning revision of `id`.
    pub async fn get(&self, id: &str) -> Result<Value> {
        let doc = self
            .local
            .get(id, &GetOptions::default())
            .await
            .map_err(self.err(format!("reading document {id}")))?;
        Ok(doc.into_doc().unwrap_or(Value::Null))
    }

    /// Writes a new document locally (it must have an `_id`); returns its revision.
    pub async fn create(&self, doc: Value) -> Result<String> {
        let id = doc
            .get("_id")
            .and_then(Value::as_str)
            .unwrap_or("(no _id)")
            .to_owned();
        self.local
            .put(doc)
            .await
            .map_err(self.err(format!("creating document {id}")))
    }

    /// Reads the local winner of `id`, lets `f` change its body, and writes
    /// the result as a child of the winner (`_id` and `_rev` are kept
    /// whatever `f` does). Returns the new revision.
    pub async fn edit(&self, id: &str, f: impl FnOnce(&mut Value)) -> Result<String> {
        let mut doc = self.get(id).await?;
        let rev = doc.get("_rev").cloned();
        f(&mut doc);
        if let Some(o) = doc.as_object_mut() {
            o.insert("_id".into(), id.into());
            match rev {
                Some(r) => o.insert("_rev".into(), r),
                None => o.remove("_rev"),
            };
            o.remove("_conflicts");
            o.remove("_revisions");
        }
        self.local
            .put(doc)
            .await
            .map_err(self.err(format!("editing document {id}")))
    }

    /// Deletes the local winner of `id` (writes a tombstone child); returns its revision.
    pub async fn delete(&self, id: &str) -> Result<String> {
        let doc = self.get(id).await?;
        let rev = doc.get("_rev").cloned().unwrap_or(Value::Null);
        self.local
            .put(json!({ "_id": id, "_rev": rev, "_deleted": true }))
            .await
            .map_err(self.err(format!("deleting document {id}")))
    }

    /// Every local document, deleted ones included, with all its leaves.
    pub async fn all_docs_with_leaves(&self) -> Result<Vec<DocLeaves>> {
        leaves(&self.local)
            .await
            .map_err(self.err("listing local documents"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_root_drops_the_database_and_keeps_the_prefix() {
        assert_eq!(
            server_root("http://u:p@h:5984/v/1/medic?x=1").unwrap(),
            "http://u:p@h:5984/v/1/"
        );
        assert_eq!(
            server_root("http://h:5984/medic/").unwrap(),
            "http://h:5984/"
        );
        assert!(server_root("http://h:5984/").is_err());
    }
}
