//! The CouchDB backend: a thin client over reqwest.
//!
//! One `reqwest::Client` per store (connections are reused). Credentials come
//! from the URL (`http://user:pass@host:5984/db`) and are sent as basic auth,
//! or exchanged for a session cookie with [`CouchAuth::Cookie`] (renewed once
//! on a 401). They are removed from the URL kept in the store, so no error
//! message, log line or `identity()` can contain them.
//!
//! Connection errors, timeouts and 5xx answers are retried with exponential
//! backoff and jitter, but only for requests that are safe to repeat: reads,
//! read-only POSTs (`_revs_diff`, `_bulk_get`, `_all_docs`) and
//! `_bulk_docs` with `new_edits=false` (re-inserting a known revision is a
//! no-op). Edits with `new_edits=true` and `_local` writes are never retried:
//! a retry after a lost answer would report a conflict for an edit that
//! succeeded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE, COOKIE, SET_COOKIE};
use reqwest::{Method, Url};
use serde_json::{json, Value};

use crate::doc;
use crate::error::{redact_url, Result, StoreError};
use crate::rev::Rev;
use crate::types::*;

/// How the store authenticates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CouchAuth {
    /// Basic auth on every request with the URL's user and password (if any).
    #[default]
    Basic,
    /// Log in once at `POST /_session` and send the `AuthSession` cookie.
    Cookie,
}

/// Connection settings for [`CouchStore::open_with`].
#[derive(Debug, Clone)]
pub struct CouchOptions {
    /// How the URL's credentials are used (default: basic auth).
    pub auth: CouchAuth,
    /// Limit for one request (longpoll waits get their timeout added).
    pub timeout: Duration,
    /// Limit for opening a connection to the server.
    pub connect_timeout: Duration,
    /// Extra attempts for a request that is safe to repeat.
    pub retries: u32,
    /// First backoff; doubled on each retry (capped at 5 s), plus up to 50% jitter.
    pub backoff: Duration,
    /// A client's own session cookie (`AuthSession=...`), sent on every
    /// request instead of any login: how a gateway acts for a user who
    /// authenticated with CouchDB's `_session`.
    pub session: Option<String>,
}

impl Default for CouchOptions {
    fn default() -> Self {
        CouchOptions {
            auth: CouchAuth::Basic,
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            retries: 4,
            backoff: Duration::from_millis(100),
            session: None,
        }
    }
}

/// A database on a CouchDB server. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct CouchStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    /// The server root, without credentials, ending in `/`.
    server: Url,
    /// The database URL, without credentials.
    db: Url,
    db_name: String,
    user: Option<(String, String)>,
    opts: CouchOptions,
    cookie: Mutex<Option<String>>,
}

/// Whether a request may be sent again after a failure.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    Safe,
    Never,
}

fn install_crypto() {
    // reqwest is built without a default TLS crypto provider; use ring. An
    // error only means another provider was installed first, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl CouchStore {
    /// Opens the database at `url` with default options (basic auth).
    pub async fn open(url: &str) -> Result<CouchStore> {
        Self::open_with(url, CouchOptions::default()).await
    }

    /// Opens the database at `url`: checks that the server answers like
    /// CouchDB (`NotCouch` otherwise), that the credentials are accepted
    /// (`Unauthorized`), and logs in for cookie auth. The database itself need
    /// not exist (see [`crate::Store::exists`]).
    pub async fn open_with(url: &str, opts: CouchOptions) -> Result<CouchStore> {
        install_crypto();
        let shown = redact_url(url);
        let mut parsed =
            Url::parse(url).map_err(|e| StoreError::bad(format!("invalid URL {shown}: {e}")))?;
        let user = match parsed.username() {
            "" => None,
            u => Some((
                crate::percent_decode(u),
                crate::percent_decode(parsed.password().unwrap_or("")),
            )),
        };
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        parsed.set_query(None);
        parsed.set_fragment(None);
        let segments: Vec<String> = parsed
            .path_segments()
            .map(|s| s.filter(|x| !x.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        let Some((db_seg, prefix)) = segments.split_last() else {
            return Err(StoreError::bad(format!(
                "URL {shown} names no database (expected http://host:5984/dbname)"
            )));
        };
        let db_name = crate::percent_decode(db_seg);
        let mut server = parsed.clone();
        server.set_path(&format!(
            "/{}",
            prefix.iter().map(|p| format!("{p}/")).collect::<String>()
        ));
        let mut db = server.clone();
        db.path_segments_mut()
            .expect("http URL")
            .pop_if_empty()
            .push(&db_name);
        let client = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| StoreError::Internal(format!("HTTP client: {e}")))?;
        let store = CouchStore {
            inner: Arc::new(Inner {
                client,
                server,
                db,
                db_name,
                user,
                opts,
                cookie: Mutex::new(None),
            }),
        };
        store.check_server().await?;
        Ok(store)
    }

    /// The database URL, without credentials.
    pub fn url(&self) -> &Url {
        &self.inner.db
    }

    /// The database name.
    pub fn db_name(&self) -> &str {
        &self.inner.db_name
    }

    async fn check_server(&self) -> Result<()> {
        let root = self.inner.server.clone();
        let shown = root.to_string();
        let not_couch = |reason: String| StoreError::NotCouch {
            url: shown.clone(),
            reason,
        };
        let (status, body) = match self
            .send(Method::GET, root.clone(), None, Retry::Safe)
            .await
        {
            Ok(r) => r,
            Err(StoreError::Unauthorized { .. }) if self.inner.user.is_some() => {
                return Err(StoreError::Unauthorized {
                    url: shown,
                    reason: "the server refused the user name or password".into(),
                })
            }
            Err(e) => return Err(e),
        };
        if status == 401 {
            return Err(StoreError::Unauthorized {
                url: shown,
                reason: "the server refused the user name or password".into(),
            });
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| not_couch(format!("GET / answered HTTP {status} without JSON")))?;
        if !(v.get("couchdb").is_some() || v.get("express-pouchdb").is_some()) {
            return Err(not_couch(format!(
                "GET / answered HTTP {status} without a \"couchdb\" welcome"
            )));
        }
        if self.inner.user.is_some() {
            if self.inner.opts.auth == CouchAuth::Cookie {
                self.login().await?;
            } else {
                let mut session = root.clone();
                session
                    .path_segments_mut()
                    .expect("http URL")
                    .pop_if_empty()
                    .push("_session");
                let (status, body) = self.send(Method::GET, session, None, Retry::Safe).await?;
                let reason = reason_of(&body);
                if status == 401 {
                    return Err(StoreError::Unauthorized { url: shown, reason });
                }
            }
        }
        Ok(())
    }

    async fn login(&self) -> Result<()> {
        let Some((user, pass)) = self.inner.user.clone() else {
            return Ok(());
        };
        let mut url = self.inner.server.clone();
        url.path_segments_mut()
            .expect("http URL")
            .pop_if_empty()
            .push("_session");
        let body = serde_json::to_vec(&json!({ "name": user, "password": pass })).expect("JSON");
        let resp = self
            .inner
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| StoreError::Unreachable {
                url: url.to_string(),
                reason: e.without_url().to_string(),
            })?;
        let status = resp.status().as_u16();
        let cookie = resp
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("AuthSession="))
            .map(|v| v.split(';').next().unwrap_or(v).to_owned());
        let bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        match (status, cookie) {
            (200..=299, Some(c)) => {
                *self.inner.cookie.lock().expect("cookie lock") = Some(c);
                Ok(())
            }
            (401, _) => Err(StoreError::Unauthorized {
                url: url.to_string(),
                reason: reason_of(&bytes),
            }),
            (s, _) => Err(StoreError::Http {
                url: url.to_string(),
                status: s,
                error: "session".into(),
                reason: format!("login gave no AuthSession cookie: {}", reason_of(&bytes)),
            }),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let base = self
            .inner
            .opts
            .backoff
            .saturating_mul(1 << attempt.min(6))
            .min(Duration::from_secs(5));
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(attempt);
        let jitter = base.mul_f64((h.finish() % 1000) as f64 / 2000.0);
        base + jitter
    }

    /// Sends one request; retries as `retry` allows. Returns status and body;
    /// HTTP error statuses are returned, not turned into errors.
    async fn send_with(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        retry: Retry,
        timeout: Option<Duration>,
    ) -> Result<(u16, Vec<u8>)> {
        let retries = if retry == Retry::Safe {
            self.inner.opts.retries
        } else {
            0
        };
        let mut relogged = false;
        let mut attempt = 0;
        loop {
            let mut rb = self
                .inner
                .client
                .request(method.clone(), url.clone())
                .header(ACCEPT, "application/json");
            if let Some(t) = timeout {
                rb = rb.timeout(t);
            }
            if let Some(b) = &body {
                rb = rb.header(CONTENT_TYPE, "application/json").body(b.clone());
            }
            match (&self.inner.user, self.inner.opts.auth) {
                (Some((u, p)), CouchAuth::Basic) => rb = rb.basic_auth(u, Some(p)),
                (Some(_), CouchAuth::Cookie) => {
                    if let Some(c) = self.inner.cookie.lock().expect("cookie lock").clone() {
                        rb = rb.header(COOKIE, c);
                    }
                }
                (None, _) => {}
            }
            if let Some(session) = &self.inner.opts.session {
                rb = rb.header(COOKIE, session.as_str());
            }
            let failure = match rb.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if status == 401
                        && self.inner.opts.auth == CouchAuth::Cookie
                        && self.inner.user.is_some()
                        && !relogged
                    {
                        relogged = true;
                        self.login().await?;
                        continue;
                    }
                    if status >= 500 && attempt < retries {
                        format!("HTTP {status}")
                    } else {
                        match resp.bytes().await {
                            Ok(b) => return Ok((status, b.to_vec())),
                            Err(e) => e.without_url().to_string(),
                        }
                    }
                }
                Err(e) => {
                    let e = e.without_url();
                    let mut reason = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        reason.push_str(": ");
                        reason.push_str(&s.to_string());
                        src = s.source();
                    }
                    reason
                }
            };
            if attempt >= retries {
                return Err(StoreError::Unreachable {
                    url: format!("{method} {url}"),
                    reason: failure,
                });
            }
            tokio::time::sleep(self.backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        retry: Retry,
    ) -> Result<(u16, Vec<u8>)> {
        self.send_with(method, url, body, retry, None).await
    }

    /// Sends a request and turns an error status into the matching [`StoreError`].
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        retry: Retry,
    ) -> Result<Value> {
        self.call_with(method, url, body, retry, None).await
    }

    async fn call_with(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        retry: Retry,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let body = body.map(|b| serde_json::to_vec(&b).expect("JSON serializes"));
        let (status, bytes) = self
            .send_with(method.clone(), url.clone(), body, retry, timeout)
            .await?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| StoreError::Http {
                url: format!("{method} {url}"),
                status,
                error: "bad_response".into(),
                reason: format!("the answer is not JSON: {e}"),
            });
        }
        Err(self.error_for(&method, &url, status, &bytes))
    }

    fn error_for(&self, method: &Method, url: &Url, status: u16, bytes: &[u8]) -> StoreError {
        let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        let error = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let reason = reason_of(bytes);
        let what = format!("{method} {url}");
        match (status, error.as_str()) {
            (404, _) => StoreError::NotFound { what, reason },
            (409, _) => StoreError::Conflict { what },
            (400, _) => StoreError::BadRequest {
                reason: format!("{what}: {reason}"),
            },
            (401, _) => StoreError::Unauthorized { url: what, reason },
            (403, _) => StoreError::Forbidden { url: what, reason },
            (412, "file_exists") => StoreError::FileExists { what },
            _ => StoreError::Http {
                url: what,
                status,
                error,
                reason,
            },
        }
    }

    /// `db/{segments...}?{query}`
    fn endpoint(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut u = self.inner.db.clone();
        {
            let mut p = u.path_segments_mut().expect("http URL");
            for s in segments {
                p.push(s);
            }
        }
        if !query.is_empty() {
            let mut q = u.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        u
    }

    /// The live leaf revisions of each of `ids` that exists, the winner
    /// first; for a deleted document its (deleted) winner alone. Deleted
    /// leaves beside a live one are not listed: CouchDB tells them only
    /// per document (`open_revs=all`) or by a filtered changes feed, which
    /// pouchdb-server answers by scanning the whole database. One request
    /// (`POST _all_docs?conflicts=true&include_docs=true`; CouchDB lists
    /// conflicts only with the bodies).
    pub async fn live_leaf_revs(&self, ids: &[String]) -> Result<BTreeMap<String, Vec<String>>> {
        let q: Vec<(&str, String)> = vec![
            ("conflicts", "true".into()),
            ("include_docs", "true".into()),
        ];
        let url = self.endpoint(&["_all_docs"], &q);
        let answer = self
            .call(Method::POST, url, Some(json!({ "keys": ids })), Retry::Safe)
            .await?;
        let rows = answer
            .get("rows")
            .and_then(Value::as_array)
            .ok_or_else(|| StoreError::Internal("_all_docs answer has no rows".into()))?;
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in rows {
            let (Some(id), Some(value)) = (row.get("id").and_then(Value::as_str), row.get("value"))
            else {
                continue; // {"key": .., "error": "not_found"}
            };
            let winner = value.get("rev").and_then(Value::as_str);
            let conflicts = row
                .get("doc")
                .and_then(|d| d.get("_conflicts"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str);
            let revs: Vec<String> = winner
                .into_iter()
                .chain(conflicts)
                .map(str::to_owned)
                .collect();
            out.entry(id.to_owned()).or_default().extend(revs);
        }
        Ok(out)
    }

    /// The documents that have a live leaf, in id order: those after `after`
    /// (all when it is `None`), at most `limit`, as
    /// [`crate::SqliteStore::live_docs_by_id`] gives them: a changes-feed row
    /// per document listing its winner and its live conflicts, with the
    /// winner's body when `include_docs` (one `_all_docs` request with
    /// `conflicts=true`; rows carry no sequence; CouchDB tells conflicts
    /// only with the documents, so without `include_docs` a row lists the
    /// winner alone). For a rewrite of the whole
    /// database: on pouchdb-server a page of `_all_docs` costs about two
    /// thirds of the same page of `_changes` with bodies.
    pub async fn live_docs_by_id(
        &self,
        after: Option<String>,
        limit: usize,
        include_docs: bool,
    ) -> Result<Vec<ChangeRow>> {
        let mut q: Vec<(&str, String)> = vec![("conflicts", "true".into())];
        flag(&mut q, "include_docs", include_docs);
        // The page starts at `after` itself (it may have been deleted
        // since: then it is not there), which is dropped below.
        q.push(("limit", (limit.saturating_add(1)).to_string()));
        if let Some(after) = &after {
            q.push(("startkey", Value::from(after.as_str()).to_string()));
        }
        let url = self.endpoint(&["_all_docs"], &q);
        let answer = self.call(Method::GET, url, None, Retry::Safe).await?;
        let rows = answer
            .get("rows")
            .and_then(Value::as_array)
            .ok_or_else(|| StoreError::Internal("_all_docs answer has no rows".into()))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let (Some(id), Some(rev)) = (
                row.get("id").and_then(Value::as_str),
                row.pointer("/value/rev").and_then(Value::as_str),
            ) else {
                continue;
            };
            if after.as_deref() == Some(id) || out.len() == limit {
                continue;
            }
            let mut doc = row.get("doc").filter(|d| d.is_object()).cloned();
            let mut changes = vec![ChangeRev {
                rev: rev.to_owned(),
            }];
            if let Some(Value::Array(conflicts)) = doc
                .as_mut()
                .and_then(|d| d.as_object_mut()?.remove("_conflicts"))
            {
                changes.extend(
                    conflicts
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|rev| ChangeRev {
                            rev: rev.to_owned(),
                        }),
                );
            }
            out.push(ChangeRow {
                seq: Value::Null,
                id: id.to_owned(),
                changes,
                deleted: false,
                doc,
            });
        }
        Ok(out)
    }

    /// The path segments of a document id: `_design/x` and `_local/x` keep their slash.
    fn doc_segments(id: &str) -> Vec<&str> {
        for prefix in ["_design/", "_local/"] {
            if let Some(rest) = id.strip_prefix(prefix) {
                return vec![&prefix[..prefix.len() - 1], rest];
            }
        }
        vec![id]
    }
}

fn reason_of(bytes: &[u8]) -> String {
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    match v.get("reason").or_else(|| v.get("error")) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
    }
}

fn seq_param(seq: &Seq) -> String {
    match seq {
        Value::String(s) => s.clone(),
        Value::Null => "0".into(),
        other => other.to_string(),
    }
}

fn flag(q: &mut Vec<(&'static str, String)>, name: &'static str, on: bool) {
    if on {
        q.push((name, "true".into()));
    }
}

impl crate::Store for CouchStore {
    async fn info(&self) -> Result<DbInfo> {
        let v = self
            .call(Method::GET, self.inner.db.clone(), None, Retry::Safe)
            .await?;
        Ok(DbInfo {
            db_name: v
                .get("db_name")
                .and_then(Value::as_str)
                .unwrap_or(&self.inner.db_name)
                .to_owned(),
            doc_count: v.get("doc_count").and_then(Value::as_u64).unwrap_or(0),
            doc_del_count: v.get("doc_del_count").and_then(Value::as_u64).unwrap_or(0),
            update_seq: v.get("update_seq").cloned().unwrap_or(Value::from(0)),
        })
    }

    async fn get(&self, id: &str, opts: &GetOptions) -> Result<GetResult> {
        doc::check_id(id)?;
        if let Some(r) = &opts.rev {
            r.parse::<Rev>()?;
        }
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(r) = &opts.rev {
            q.push(("rev", r.clone()));
        }
        flag(&mut q, "revs", opts.revs);
        flag(&mut q, "conflicts", opts.conflicts);
        flag(&mut q, "latest", opts.latest);
        flag(&mut q, "attachments", opts.attachments);
        match &opts.open_revs {
            Some(OpenRevs::All) => q.push(("open_revs", "all".into())),
            Some(OpenRevs::List(l)) => {
                for r in l {
                    r.parse::<Rev>()?;
                }
                q.push(("open_revs", serde_json::to_string(l).expect("JSON")));
            }
            None => {}
        }
        let url = self.endpoint(&Self::doc_segments(id), &q);
        let v = self.call(Method::GET, url, None, Retry::Safe).await?;
        if opts.open_revs.is_none() {
            return Ok(GetResult::Doc(v));
        }
        let list: Vec<OpenRev> = serde_json::from_value(v)
            .map_err(|e| StoreError::Internal(format!("open_revs answer for {id}: {e}")))?;
        Ok(GetResult::Revs(list))
    }

    async fn bulk_docs(&self, docs: Vec<Value>, new_edits: bool) -> Result<Vec<BulkResult>> {
        // Refuse malformed documents here, exactly as the embedded store does,
        // so a bad batch is never half written by a lenient server.
        for d in &docs {
            let is_local = d
                .get("_id")
                .and_then(Value::as_str)
                .is_some_and(|id| id.starts_with("_local/"));
            if !is_local {
                doc::parse_doc(d.clone(), new_edits)?;
            }
        }
        let retry = if new_edits { Retry::Never } else { Retry::Safe };
        let url = self.endpoint(&["_bulk_docs"], &[]);
        let v = self
            .call(
                Method::POST,
                url,
                Some(json!({ "docs": docs, "new_edits": new_edits })),
                retry,
            )
            .await?;
        let results: Vec<BulkResult> = serde_json::from_value(v)
            .map_err(|e| StoreError::Internal(format!("_bulk_docs answer: {e}")))?;
        Ok(if new_edits {
            results
        } else {
            results.into_iter().filter(|r| !r.is_ok()).collect()
        })
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
        let mut q = Vec::new();
        flag(&mut q, "revs", opts.revs);
        flag(&mut q, "latest", opts.latest);
        flag(&mut q, "attachments", opts.attachments);
        let url = self.endpoint(&["_bulk_get"], &q);
        let mut v = self
            .call(
                Method::POST,
                url,
                Some(json!({ "docs": reqs })),
                Retry::Safe,
            )
            .await?;
        let bad = |what: &str| StoreError::Internal(format!("_bulk_get answer: {what}"));
        // The documents are taken out of the answer, not copied.
        let results = v
            .get_mut("results")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| bad("no results"))?;
        let mut out = Vec::with_capacity(results.len());
        for r in results.iter_mut() {
            let id = r
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("a result without id"))?
                .to_owned();
            let docs = r
                .get_mut("docs")
                .and_then(Value::as_array_mut)
                .ok_or_else(|| bad("no docs"))?;
            let mut items = Vec::with_capacity(docs.len());
            for d in docs.iter_mut() {
                let item = if let Some(doc) = d.get_mut("ok") {
                    BulkGetItem::Ok(doc.take())
                } else if let Some(e) = d.get("error") {
                    BulkGetItem::Error(
                        serde_json::from_value(e.clone()).map_err(|e| bad(&e.to_string()))?,
                    )
                } else if let Some(rev) = d.get("missing").and_then(Value::as_str) {
                    // pouchdb-server answers `{"missing": rev}` where CouchDB answers an error.
                    BulkGetItem::Error(DocError {
                        id: id.to_owned(),
                        rev: rev.to_owned(),
                        error: "not_found".into(),
                        reason: "missing".into(),
                    })
                } else if d.as_object().is_some_and(|o| o.is_empty()) {
                    // pouchdb-server answers `{}` for a missing document asked
                    // for without a revision.
                    BulkGetItem::Error(DocError {
                        id: id.to_owned(),
                        rev: "undefined".into(),
                        error: "not_found".into(),
                        reason: "missing".into(),
                    })
                } else {
                    return Err(bad(&format!("unexpected item {d}")));
                };
                items.push(item);
            }
            out.push(BulkGetResult { id, docs: items });
        }
        Ok(out)
    }

    async fn revs_diff(
        &self,
        revs: BTreeMap<String, Vec<String>>,
    ) -> Result<BTreeMap<String, RevsDiffEntry>> {
        for rs in revs.values() {
            for r in rs {
                r.parse::<Rev>()?;
            }
        }
        let url = self.endpoint(&["_revs_diff"], &[]);
        let v = self
            .call(
                Method::POST,
                url,
                Some(serde_json::to_value(&revs).expect("JSON")),
                Retry::Safe,
            )
            .await?;
        let mut diff: BTreeMap<String, RevsDiffEntry> = serde_json::from_value(v)
            .map_err(|e| StoreError::Internal(format!("_revs_diff answer: {e}")))?;
        diff.retain(|_, e| !e.missing.is_empty());
        Ok(diff)
    }

    async fn all_docs(&self, opts: &AllDocsOptions) -> Result<AllDocs> {
        let mut q: Vec<(&str, String)> = Vec::new();
        flag(&mut q, "include_docs", opts.include_docs);
        flag(&mut q, "descending", opts.descending);
        if let Some(l) = opts.limit {
            q.push(("limit", l.to_string()));
        }
        if opts.skip > 0 {
            q.push(("skip", opts.skip.to_string()));
        }
        if opts.keys.is_none() {
            if let Some(k) = &opts.start_key {
                q.push(("startkey", serde_json::to_string(k).expect("JSON")));
            }
            if let Some(k) = &opts.end_key {
                q.push(("endkey", serde_json::to_string(k).expect("JSON")));
            }
        }
        let url = self.endpoint(&["_all_docs"], &q);
        let v = match &opts.keys {
            Some(keys) => {
                self.call(
                    Method::POST,
                    url,
                    Some(json!({ "keys": keys })),
                    Retry::Safe,
                )
                .await?
            }
            None => self.call(Method::GET, url, None, Retry::Safe).await?,
        };
        let rows: Vec<AllDocsRow> =
            serde_json::from_value(v.get("rows").cloned().unwrap_or(Value::Array(Vec::new())))
                .map_err(|e| StoreError::Internal(format!("_all_docs answer: {e}")))?;
        Ok(AllDocs {
            total_rows: v.get("total_rows").and_then(Value::as_u64).unwrap_or(0),
            offset: v
                .get("offset")
                .and_then(Value::as_u64)
                .unwrap_or(opts.skip as u64),
            rows,
        })
    }

    async fn changes(&self, opts: &ChangesOptions) -> Result<Changes> {
        let mut q: Vec<(&str, String)> = vec![("since", seq_param(&opts.since))];
        if let Some(l) = opts.limit {
            q.push(("limit", l.to_string()));
        }
        if opts.style_all_docs {
            q.push(("style", "all_docs".into()));
        }
        flag(&mut q, "include_docs", opts.include_docs);
        flag(&mut q, "descending", opts.descending);
        let url = self.endpoint(&["_changes"], &q);
        let v = self.call(Method::GET, url, None, Retry::Safe).await?;
        serde_json::from_value(v).map_err(|e| StoreError::Internal(format!("_changes answer: {e}")))
    }

    async fn wait_for_change(&self, since: &Seq, timeout: std::time::Duration) -> Result<bool> {
        let ms = timeout.as_millis().max(1);
        let q = vec![
            ("feed", "longpoll".to_owned()),
            ("since", seq_param(since)),
            ("limit", "1".to_owned()),
            ("timeout", ms.to_string()),
        ];
        let url = self.endpoint(&["_changes"], &q);
        // The server's own `timeout` is a courtesy: pouchdb-server ignores it
        // and keeps the answer open, so the wait is bounded here.
        let limit = Some(timeout + self.inner.opts.timeout);
        let call = self.call_with(Method::GET, url, None, Retry::Never, limit);
        match tokio::time::timeout(timeout, call).await {
            Ok(v) => Ok(v?
                .get("results")
                .and_then(Value::as_array)
                .is_some_and(|r| !r.is_empty())),
            Err(_elapsed) => Ok(false),
        }
    }

    async fn get_local(&self, id: &str) -> Result<Value> {
        let name = id.strip_prefix("_local/").unwrap_or(id);
        self.call(
            Method::GET,
            self.endpoint(&["_local", name], &[]),
            None,
            Retry::Safe,
        )
        .await
    }

    async fn put_local(&self, id: &str, body: Value) -> Result<String> {
        let name = id.strip_prefix("_local/").unwrap_or(id);
        if !body.is_object() {
            return Err(StoreError::bad(format!(
                "document _local/{name}: must be a JSON object"
            )));
        }
        let v = self
            .call(
                Method::PUT,
                self.endpoint(&["_local", name], &[]),
                Some(body),
                Retry::Never,
            )
            .await?;
        Ok(v.get("rev")
            .and_then(Value::as_str)
            .unwrap_or("0-1")
            .to_owned())
    }

    async fn delete_local(&self, id: &str, rev: Option<&str>) -> Result<()> {
        let name = id.strip_prefix("_local/").unwrap_or(id);
        let rev = match rev {
            Some(r) => r.to_owned(),
            None => self
                .get_local(name)
                .await?
                .get("_rev")
                .and_then(Value::as_str)
                .unwrap_or("0-1")
                .to_owned(),
        };
        self.call(
            Method::DELETE,
            self.endpoint(&["_local", name], &[("rev", rev)]),
            None,
            Retry::Never,
        )
        .await?;
        Ok(())
    }

    async fn create_db(&self) -> Result<()> {
        self.call(Method::PUT, self.inner.db.clone(), None, Retry::Never)
            .await?;
        Ok(())
    }

    async fn delete_db(&self) -> Result<()> {
        self.call(Method::DELETE, self.inner.db.clone(), None, Retry::Never)
            .await?;
        Ok(())
    }

    async fn exists(&self) -> Result<bool> {
        let (status, bytes) = self
            .send(Method::GET, self.inner.db.clone(), None, Retry::Safe)
            .await?;
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            s => Err(self.error_for(&Method::GET, &self.inner.db, s, &bytes)),
        }
    }

    async fn revs_limit(&self) -> Result<u64> {
        let v = self
            .call(
                Method::GET,
                self.endpoint(&["_revs_limit"], &[]),
                None,
                Retry::Safe,
            )
            .await?;
        v.as_u64()
            .ok_or_else(|| StoreError::Internal(format!("_revs_limit answer is not a number: {v}")))
    }

    async fn set_revs_limit(&self, limit: u64) -> Result<()> {
        self.call(
            Method::PUT,
            self.endpoint(&["_revs_limit"], &[]),
            Some(Value::from(limit)),
            Retry::Safe,
        )
        .await?;
        Ok(())
    }

    fn identity(&self) -> String {
        self.inner.db.to_string()
    }
}
