//! HTTP: parsing CouchDB requests, dispatching them, answering CouchDB-style.

use crate::ahead::{next_since, ReadAhead};
use crate::device::Device;
use crate::filter::ChangesFilter;
use crate::sync::{is_deleted, winner, PresentCache, Session};
use crate::view::Presented;
use crate::GatewayError;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rewind_engine::state::{companion_target, prepare_companion, Database, State};
use rewind_lens::MigrationSet;
use rewind_store::{AllDocsOptions, ChangesOptions, Seq, Store, StoreError};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The largest request body accepted (CouchDB's default `max_http_request_size` is larger;
/// phones send batches well under this).
pub const MAX_BODY: usize = 64 << 20;
/// The largest document accepted (CouchDB's default `max_document_size`).
pub const MAX_DOCUMENT: usize = 8 << 20;
/// How long a database's version state is cached.
const STATE_TTL: Duration = Duration::from_millis(250);

/// How [`Call::credentials`] names a session cookie (not an HTTP scheme).
const SESSION_SCHEME: &str = "Cookie ";

/// Open databases kept per (database, credentials); forgotten all at once
/// beyond this many (session cookies rotate, so keys keep coming).
const OPEN_DATABASES: usize = 1000;

/// Where the documents are.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Embedded stores, one file per database (`DIR/{db}.db`).
    Embedded(PathBuf),
    /// A CouchDB server (its root URL, without credentials).
    Couch(String),
}

/// How the gateway is set up.
#[derive(Clone)]
pub struct GatewayConfig {
    /// The store behind the gateway.
    pub backend: Backend,
    /// The migrations.
    pub migrations: MigrationSet,
    /// The databases whose served version names the root's uuid (in front
    /// of CouchDB, where the gateway cannot list them).
    pub databases: Vec<String>,
    /// In front of embedded stores: who may sync what (empty: open to all).
    pub users: Vec<rewind_engine::User>,
    /// Write each request the gateway failed with a 5xx of its own (a
    /// store it cannot reach, a translation that failed) to standard error:
    /// method, path (no query, no credentials), status and reason.
    pub log_errors: bool,
}

struct Inner {
    http: std::sync::OnceLock<reqwest::Client>,
    users: Vec<rewind_engine::User>,
    databases: Vec<String>,
    log_errors: bool,
    cache: PresentCache,
    ahead: ReadAhead,
    backend: Backend,
    set: MigrationSet,
    checksum: String,
    identity: String,
    dbs: Mutex<HashMap<String, Database>>,
    states: Recent<String, State>,
    /// Device records by database and device, kept like `states` (a named
    /// phone's every request needs its record: read each time, a pull from
    /// pouchdb-server took 8–15% longer).
    devices: Recent<(String, String), Device>,
}

/// Values read from the store in the last [`STATE_TTL`], by key: what
/// every request needs (a database's version state, a device's record) is
/// read once a quarter second, not once a request.
struct Recent<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Recent<K, V> {
    /// Entries kept before the expired ones are dropped.
    const BOUND: usize = 10_000;

    fn new() -> Recent<K, V> {
        Recent {
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The value of `key` stored less than [`STATE_TTL`] ago, when `usable`.
    fn get<Q>(&self, key: &Q, usable: impl Fn(&V) -> bool) -> Result<Option<V>, GatewayError>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let entries = self.entries.lock().map_err(poisoned)?;
        Ok(entries
            .get(key)
            .filter(|(at, value)| at.elapsed() < STATE_TTL && usable(value))
            .map(|(_, value)| value.clone()))
    }

    /// Keeps `value` for `key` from now on.
    fn put(&self, key: K, value: V) -> Result<(), GatewayError> {
        let mut entries = self.entries.lock().map_err(poisoned)?;
        if entries.len() >= Self::BOUND {
            entries.retain(|_, (at, _)| at.elapsed() < STATE_TTL);
        }
        entries.insert(key, (Instant::now(), value));
        Ok(())
    }

    /// Forgets every entry.
    fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}

/// A running gateway's shared parts. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    /// A gateway for `config`.
    pub fn new(config: GatewayConfig) -> Gateway {
        let identity = match &config.backend {
            Backend::Embedded(dir) => format!(
                "embedded:{}",
                std::fs::canonicalize(dir)
                    .unwrap_or_else(|_| dir.clone())
                    .display()
            ),
            Backend::Couch(url) => format!("couch:{}", rewind_store::redact_url(url)),
        };
        Gateway {
            inner: Arc::new(Inner {
                http: std::sync::OnceLock::new(),
                users: config.users,
                databases: config.databases,
                log_errors: config.log_errors,
                cache: PresentCache::default(),
                ahead: ReadAhead::default(),
                backend: config.backend,
                checksum: config.migrations.checksum(),
                set: config.migrations,
                identity,
                dbs: Mutex::new(HashMap::new()),
                states: Recent::new(),
                devices: Recent::new(),
            }),
        }
    }

    /// The uuid answered at a root serving `versions`: it changes with the
    /// version, so a phone whose version changes restarts its checkpoints.
    pub fn uuid(&self, versions: &str) -> String {
        let digest = md5::compute(format!(
            "{}\n{}\n{versions}",
            self.inner.identity, self.inner.checksum
        ));
        format!("{digest:x}")
    }

    /// The databases this gateway serves: the embedded files, or the
    /// databases named in the configuration.
    fn database_names(&self) -> Vec<String> {
        match &self.inner.backend {
            Backend::Embedded(dir) => {
                let mut names: Vec<String> = std::fs::read_dir(dir)
                    .map(|entries| {
                        entries
                            .filter_map(|e| e.ok())
                            .filter_map(|e| {
                                e.file_name()
                                    .to_str()
                                    .and_then(|n| n.strip_suffix(".db"))
                                    .map(str::to_owned)
                            })
                            .filter(|n| valid_db_name(n))
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                names
            }
            Backend::Couch(_) => self.inner.databases.clone(),
        }
    }

    /// The databases of [`Gateway::database_names`] that exist and open
    /// with these credentials (a deleted embedded database's file stays,
    /// marked deleted), in name order.
    async fn open_databases(&self, auth: Option<&str>) -> Vec<(String, Database)> {
        let mut out = Vec::new();
        for db in self.database_names() {
            if let Ok(database) = self.database(&db, auth, false).await {
                out.push((db, database));
            }
        }
        out
    }

    fn target(&self, db: &str, auth: Option<&str>) -> String {
        match &self.inner.backend {
            Backend::Embedded(dir) => dir.join(format!("{db}.db")).display().to_string(),
            Backend::Couch(root) => {
                let root = root.trim_end_matches('/');
                match auth.and_then(basic_credentials) {
                    Some((user, pass)) => {
                        let (scheme, rest) = root.split_once("://").unwrap_or(("http", root));
                        format!("{scheme}://{}:{}@{rest}/{db}", encode(&user), encode(&pass))
                    }
                    None => format!("{root}/{db}"),
                }
            }
        }
    }

    async fn database(
        &self,
        db: &str,
        auth: Option<&str>,
        create: bool,
    ) -> Result<Database, GatewayError> {
        let key = format!("{db}\n{}", auth.unwrap_or(""));
        // (Creating asks the store whether it exists, open or not.)
        if !create {
            if let Some(found) = self.inner.dbs.lock().map_err(poisoned)?.get(&key) {
                return Ok(found.clone());
            }
        }
        let target = self.target(db, auth);
        // An embedded file is made by opening it: whether it was there
        // decides `PUT /{db}`'s answer (a deleted database's file stays,
        // marked deleted, and is made usable again).
        let had_file = std::path::Path::new(&target).exists();
        if let Backend::Embedded(_) = self.inner.backend {
            if !create && !had_file {
                return Err(GatewayError::NotFound("Database does not exist.".into()));
            }
        }
        let session = auth.and_then(|a| a.strip_prefix(SESSION_SCHEME));
        let open = |target: String| async move {
            match session {
                Some(cookie) if matches!(self.inner.backend, Backend::Couch(_)) => {
                    let opts = rewind_store::CouchOptions {
                        session: Some(cookie.to_owned()),
                        ..Default::default()
                    };
                    rewind_store::CouchStore::open_with(&target, opts)
                        .await
                        .map(rewind_store::AnyStore::Couch)
                }
                _ => rewind_store::open(&target).await,
            }
        };
        let data = open(target.clone()).await?;
        let embedded = matches!(self.inner.backend, Backend::Embedded(_));
        if create && (had_file || !embedded) {
            match data.create_db().await {
                Ok(()) => {}
                Err(StoreError::FileExists { .. }) if embedded => {
                    return Err(StoreError::FileExists {
                        what: db.to_owned(),
                    }
                    .into())
                }
                Err(e) => return Err(e.into()),
            }
        } else if !create && !data.exists().await? {
            return Err(GatewayError::NotFound("Database does not exist.".into()));
        }
        let state = open(companion_target(&target)).await?;
        prepare_companion(&state).await?;
        let database = Database {
            data,
            state,
            name: db.to_owned(),
        };
        let mut dbs = self.inner.dbs.lock().map_err(poisoned)?;
        if dbs.len() >= OPEN_DATABASES {
            dbs.clear();
        }
        dbs.insert(key, database.clone());
        Ok(database)
    }

    /// Opens (and caches) a database the way requests do, so that the engine
    /// can share it in-process.
    pub async fn open_database(&self, db: &str) -> Result<Database, GatewayError> {
        self.database(db, None, false).await
    }

    /// Forgets every open database and cached state, and which revisions
    /// were presented lately (after their files were replaced, e.g. by a
    /// restore: phones must then push back what the files lost).
    pub fn forget_all(&self) {
        if let Ok(mut dbs) = self.inner.dbs.lock() {
            dbs.clear();
        }
        self.forget_states();
        self.inner.cache.forget_recent_revisions();
    }

    /// Forgets the cached database states (kept up to a quarter second), so
    /// that the next request sees a run that just ended.
    pub fn forget_states(&self) {
        self.inner.states.clear();
        self.inner.devices.clear();
    }

    /// The record of `device` in `db`, with its request at `k` noted
    /// (`Device::note`). A record this gateway read or wrote less than
    /// [`STATE_TTL`] ago that already names `k` is used as is (a change of
    /// version is always written, conditionally on the record read, so a
    /// stale copy of it is re-read then).
    async fn device(
        &self,
        db: &str,
        database: &Database,
        device: &str,
        k: Option<u32>,
    ) -> Result<Device, GatewayError> {
        let key = (db.to_owned(), device.to_owned());
        if let Some(record) = self.inner.devices.get(&key, |record| record.notes(k))? {
            return Ok(record);
        }
        let record = Device::note(database, device, k).await?;
        self.inner.devices.put(key, record.clone())?;
        Ok(record)
    }

    /// A session with this gateway's migrations and presentation cache.
    fn session<'a>(
        &'a self,
        database: &'a Database,
        state: &'a State,
        k: u32,
        pinned: bool,
        device: &'a [String],
    ) -> Session<'a> {
        Session {
            db: database,
            set: &self.inner.set,
            checksum: &self.inner.checksum,
            k,
            pinned,
            device,
            state,
            cache: &self.inner.cache,
        }
    }

    async fn state(&self, db: &str, database: &Database) -> Result<State, GatewayError> {
        if let Some(state) = self.inner.states.get(db, |_| true)? {
            return Ok(state);
        }
        let state = State::load(database).await?;
        self.inner.states.put(db.to_owned(), state.clone())?;
        Ok(state)
    }
}

fn poisoned<T>(_: T) -> GatewayError {
    GatewayError::Internal("a lock was poisoned".into())
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn basic_credentials(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = decode_base64(encoded.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// Base64 (standard alphabet) as HTTP credentials and JSON attachments carry it.
pub(crate) fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// See [`decode_base64`].
fn encode_base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The router: every request goes through one dispatcher (CouchDB paths
/// carry ids with slashes and an optional `/v/{N}` version prefix).
pub fn router(gateway: Gateway) -> Router {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_credentials(true)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::ACCEPT,
            header::ORIGIN,
            header::REFERER,
            header::HeaderName::from_static("x-rewind-version"),
            header::HeaderName::from_static("x-rewind-device"),
        ])
        .max_age(Duration::from_secs(3600));
    Router::new()
        .fallback(dispatch)
        .with_state(gateway)
        .layer(
            tower_http::compression::CompressionLayer::new()
                .gzip(true)
                .compress_when(compress_when()),
        )
        .layer(tower_http::decompression::RequestDecompressionLayer::new().gzip(true))
        .layer(cors)
}

/// Responses worth compressing: tower-http's defaults (no images, gRPC or
/// event streams), from 1 KiB up, as CouchDB front ends and pouchdb-server
/// compress. Below that gzip saves no bytes, and each compressed response
/// allocates and clears a deflate state of a few hundred kilobytes (a pull
/// makes several small requests per batch: checkpoints, `_revs_diff`).
fn compress_when() -> impl tower_http::compression::Predicate {
    use tower_http::compression::predicate::{DefaultPredicate, Predicate, SizeAbove};
    DefaultPredicate::new().and(SizeAbove::new(1024))
}

fn json_response(status: u16, value: &impl serde::Serialize) -> Response {
    // (Nothing answered has a map with keys that are not strings: the only
    // way serializing JSON fails.)
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        text,
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(error: &GatewayError) -> Response {
    let (status, error, reason) = error.couch();
    json_response(status, &json!({"error": error, "reason": reason}))
}

/// A parsed request.
struct Call {
    /// The method; a `HEAD` is answered as the `GET` it asks about (the
    /// server sends the headers only).
    method: Method,
    /// True for a `HEAD` (passed through as one).
    head: bool,
    /// Path segments after the version prefix, percent-decoded.
    path: Vec<String>,
    /// The version asked for by prefix or header.
    version: Option<u32>,
    /// The device the client names (`/_device/{id}` after the version
    /// prefix, or `X-Rewind-Device`), checked (`device::check_id`).
    device: Option<String>,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
    /// The path and query as received, less the version and device
    /// prefixes (for pass-through).
    upstream: String,
}

async fn dispatch(AxumState(gateway): AxumState<Gateway>, request: Request) -> Response {
    // Kept for the error log (both are cheap to clone: the URI shares its
    // bytes); formatted only for a 5xx.
    let asked = gateway
        .inner
        .log_errors
        .then(|| (request.method().clone(), request.uri().clone()));
    let result = match parse(request).await {
        Ok(call) => route(&gateway, call).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(response) => response,
        Err(error) => {
            let response = error_response(&error);
            if let Some((method, uri)) = asked.filter(|_| response.status().is_server_error()) {
                let (status, kind, reason) = error.couch();
                eprintln!(
                    "rewind serve: {method} {}: {status} {kind}: {reason}",
                    uri.path()
                );
            }
            response
        }
    }
}

async fn parse(request: Request) -> Result<Call, GatewayError> {
    let (parts, body) = request.into_parts();
    let query: HashMap<String, String> = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .map_err(|e| GatewayError::BadRequest(format!("malformed query string: {e}")))?;
    let mut path: Vec<String> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(rewind_store::percent_decode)
        .collect();
    let mut version = None;
    // Path segments of the prefixes, dropped from the path passed through.
    let mut prefix = 0;
    if path.first().map(String::as_str) == Some("v") && path.len() >= 2 {
        let n = path[1].parse::<u32>().map_err(|_| {
            GatewayError::BadRequest(format!("`/v/{}`: the version must be a number", path[1]))
        })?;
        version = Some(n);
        path.drain(..2);
        prefix += 2;
    } else if let Some(h) = parts.headers.get("x-rewind-version") {
        let text = h.to_str().unwrap_or("");
        version = Some(text.trim().parse::<u32>().map_err(|_| {
            GatewayError::BadRequest(format!(
                "X-Rewind-Version: `{text}` is not a version number"
            ))
        })?);
    }
    // `_device` is no database name (those start with a letter).
    let mut device = None;
    if path.first().map(String::as_str) == Some("_device") && path.len() >= 2 {
        device = Some(path[1].clone());
        path.drain(..2);
        prefix += 2;
    } else if let Some(h) = parts.headers.get("x-rewind-device") {
        device = Some(h.to_str().unwrap_or("").trim().to_owned());
    }
    if let Some(id) = &device {
        crate::device::check_id(id)?;
    }
    let stripped = after_segments(parts.uri.path(), prefix);
    let upstream = match parts.uri.query() {
        Some(q) => format!("{}?{q}", if stripped.is_empty() { "/" } else { stripped }),
        None => (if stripped.is_empty() { "/" } else { stripped }).to_owned(),
    };
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        GatewayError::TooLarge(format!("the request body is larger than {MAX_BODY} bytes"))
    })?;
    let head = parts.method == Method::HEAD;
    Ok(Call {
        method: if head { Method::GET } else { parts.method },
        head,
        path,
        version,
        device,
        query,
        headers: parts.headers,
        body,
        upstream,
    })
}

/// `path` less its first `n` segments (empty ones not counted, as
/// [`parse`] drops them): `"/v/3/medic/x"` less 2 is `"/medic/x"`.
fn after_segments(path: &str, n: usize) -> &str {
    let mut rest = path;
    for _ in 0..n {
        rest = rest.trim_start_matches('/');
        rest = &rest[rest.find('/').unwrap_or(rest.len())..];
    }
    rest
}

impl Call {
    fn auth(&self) -> Option<&str> {
        self.headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
    }

    /// Whose credentials open the user's databases upstream: the
    /// `Authorization` header, else the `AuthSession` cookie of a user who
    /// logged in with `_session` (as `Cookie AuthSession=...`).
    fn credentials(&self) -> Option<String> {
        if let Some(auth) = self.auth() {
            return Some(auth.to_owned());
        }
        let cookies = self.headers.get(header::COOKIE)?.to_str().ok()?;
        cookies
            .split(';')
            .map(str::trim)
            .find(|c| c.starts_with("AuthSession="))
            .map(|c| format!("{SESSION_SCHEME}{c}"))
    }

    fn json_body(&self) -> Result<Value, GatewayError> {
        if self.body.is_empty() {
            return Err(GatewayError::BadRequest(
                "the request body is empty; a JSON object was expected".into(),
            ));
        }
        let value: Value = serde_json::from_slice(&self.body).map_err(|e| {
            GatewayError::BadRequest(format!("the request body is not valid JSON: {e}"))
        })?;
        if !value.is_object() {
            return Err(GatewayError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        }
        Ok(value)
    }

    fn flag(&self, name: &str) -> bool {
        matches!(
            self.query.get(name).map(String::as_str),
            Some("true") | Some("1")
        )
    }

    fn json_param(&self, name: &str) -> Result<Option<Value>, GatewayError> {
        match self.query.get(name) {
            None => Ok(None),
            Some(text) => serde_json::from_str(text).map(Some).map_err(|_| {
                GatewayError::BadRequest(format!(
                    "query parameter `{name}` must be JSON, got `{text}`"
                ))
            }),
        }
    }

    fn number(&self, name: &str) -> Result<Option<u64>, GatewayError> {
        match self.query.get(name) {
            None => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| {
                GatewayError::BadRequest(format!(
                    "query parameter `{name}` must be a number, got `{text}`"
                ))
            }),
        }
    }
}

const ADMIN_ENDPOINTS: [&str; 12] = [
    "_config",
    "_node",
    "_replicate",
    "_active_tasks",
    "_membership",
    "_cluster_setup",
    "_reshard",
    "_scheduler",
    "_dbs",
    "_global_changes",
    "_stats",
    "_system",
];

fn valid_db_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '$' | '(' | ')' | '+' | '-' | '/'))
}

/// Checks a password against `salt$hex(sha256(salt + password))`.
pub fn password_matches(stored: &str, password: &str) -> bool {
    let Some((salt, hash)) = stored.split_once('$') else {
        return false;
    };
    hash_password(salt, password) == stored && !hash.is_empty()
}

/// `salt$hex(sha256(salt + password))`.
pub fn hash_password(salt: &str, password: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{salt}{password}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{salt}${hex}")
}

/// The user a request authenticates as, in front of embedded stores with
/// users configured; `Ok(None)` when the gateway is open.
fn authenticate<'a>(
    gateway: &'a Gateway,
    call: &Call,
) -> Result<Option<&'a rewind_engine::User>, GatewayError> {
    if gateway.inner.users.is_empty() || !matches!(gateway.inner.backend, Backend::Embedded(_)) {
        return Ok(None);
    }
    let refused = || GatewayError::Unauthorized("Name or password is incorrect.".into());
    let (name, password) = call.auth().and_then(basic_credentials).ok_or_else(|| {
        GatewayError::Unauthorized(
            "Authentication required: send the user's name and password (basic auth).".into(),
        )
    })?;
    let user = gateway
        .inner
        .users
        .iter()
        .find(|u| u.name == name)
        .ok_or_else(refused)?;
    if !password_matches(&user.password, &password) {
        return Err(refused());
    }
    Ok(Some(user))
}

async fn route(gateway: &Gateway, call: Call) -> Result<Response, GatewayError> {
    let served_k = call.version;
    let segments: Vec<&str> = call.path.iter().map(String::as_str).collect();
    let user = match segments.as_slice() {
        [] | ["_up"] => None,
        _ => authenticate(gateway, &call)?,
    };
    if let (Some(user), [db, ..]) = (user, segments.as_slice()) {
        let allowed = db.starts_with('_') || user.databases.iter().any(|d| d == "*" || d == db);
        if !allowed {
            return Err(GatewayError::Forbidden(format!(
                "user {} may not access database {db}",
                user.name
            )));
        }
    }
    match segments.as_slice() {
        [] => root(gateway, &call).await,
        ["_session"] => {
            let ctx = match user {
                Some(u) => json!({"name": u.name, "roles": u.roles}),
                None if gateway.inner.users.is_empty() => json!({"name": null, "roles": ["_admin"]}),
                None => json!({"name": null, "roles": []}),
            };
            Ok(json_response(
                200,
                &json!({"ok": true, "userCtx": ctx, "info": {"authentication_handlers": ["default"]}}),
            ))
        }
        ["_up"] => Ok(json_response(200, &json!({"status": "ok"}))),
        ["_uuids"] => {
            let n = call.number("count")?.unwrap_or(1).min(1000);
            let uuids: Vec<String> = (0..n)
                .map(|i| format!("{:x}", md5::compute(format!("{:?}{i}{}", Instant::now(), std::process::id()))))
                .collect();
            Ok(json_response(200, &json!({"uuids": uuids})))
        }
        ["_all_dbs"] => {
            let open = gateway.open_databases(call.credentials().as_deref()).await;
            let names: Vec<String> = open.into_iter().map(|(db, _)| db).collect();
            Ok(json_response(200, &json!(names)))
        }
        [first, ..] if ADMIN_ENDPOINTS.contains(first) || (*first == "_users" && call.method != Method::GET) => {
            Err(GatewayError::Forbidden(format!(
                "`/{first}` is a server admin endpoint; the rewind gateway does not serve it to users"
            )))
        }
        [db, rest @ ..] => {
            if !valid_db_name(db) {
                if let Backend::Couch(_) = gateway.inner.backend {
                    // An app server's own endpoint (e.g. /api/...).
                    return pass_through(gateway, &call, String::new()).await;
                }
                return Err(GatewayError::BadRequest(format!(
                    "`{db}` is not a valid database name: lowercase letters, digits and _$()+-/ , starting with a letter"
                )));
            }
            database_route(gateway, &call, db, rest, served_k).await
        }
    }
}

async fn root(gateway: &Gateway, call: &Call) -> Result<Response, GatewayError> {
    // The uuid names what is served at this root: a fixed version with a
    // prefix, else the versions the databases serve now and their epochs
    // (the presentation context of `/{db}`, `view::epochs`), so that a
    // rollback on `/{db}` restarts the phones' checkpoints, and a phone that
    // comes back to `/{db}` after a run does not resume a checkpoint from
    // before it (the ids it holds from then are retired).
    //
    // At a fixed version, a device that names itself gets a uuid naming
    // its device epoch in each database too (`Device::uuid_part`): coming
    // back to a version it pulled at before a move down, it re-scans
    // instead of resuming the checkpoint it had there (the copies it holds
    // from then are retired).
    let (uuid, version) = match call.version {
        Some(k) => {
            let mut key = k.to_string();
            if let Some(id) = &call.device {
                for (db, database) in gateway.open_databases(call.credentials().as_deref()).await {
                    if let Some(part) = device_uuid_part(&database, id, Some(k)).await {
                        key.push_str(&format!(",{db}@{part}"));
                    }
                }
            }
            (gateway.uuid(&key), json!(k))
        }
        None => {
            let mut served = Vec::new();
            let mut key = Vec::new();
            for (db, database) in gateway.open_databases(call.credentials().as_deref()).await {
                if let Ok(state) = gateway.state(&db, &database).await {
                    let epochs = crate::view::epochs(&state);
                    let epoch = epochs.last().map(String::as_str).unwrap_or("");
                    let mut part = format!("{db}={}@{epoch}", state.served_version());
                    // A named device follows in a context of its own once it
                    // has a device epoch (`view::following`).
                    if let Some(id) = &call.device {
                        if let Some(own) = device_uuid_part(&database, id, None).await {
                            part.push_str(&format!("+{own}"));
                        }
                    }
                    key.push(part);
                    served.push((db, state.served_version()));
                }
            }
            let versions: serde_json::Map<String, Value> = served
                .into_iter()
                .map(|(db, v)| (db, Value::from(v)))
                .collect();
            (gateway.uuid(&key.join(",")), Value::Object(versions))
        }
    };
    Ok(json_response(
        200,
        &json!({"couchdb": "Welcome", "version": "3.3.3", "uuid": uuid,
                "vendor": {"name": "rewind", "version": env!("CARGO_PKG_VERSION")},
                "features": [], "rewind": {"version": version}}),
    ))
}

/// What the root uuid at `k` (`None`: following) names of `device`'s
/// record in `database` (`Device::uuid_part`). A database this user cannot
/// read names nothing, as a state it cannot read does.
async fn device_uuid_part(database: &Database, device: &str, k: Option<u32>) -> Option<String> {
    Device::load(database, device)
        .await
        .unwrap_or_default()
        .uuid_part(k)
}

async fn database_route(
    gateway: &Gateway,
    call: &Call,
    db: &str,
    rest: &[&str],
    asked_k: Option<u32>,
) -> Result<Response, GatewayError> {
    if rest.is_empty() && call.method == Method::PUT {
        gateway
            .database(db, call.credentials().as_deref(), true)
            .await?;
        return Ok(json_response(201, &json!({"ok": true})));
    }
    let database = gateway
        .database(db, call.credentials().as_deref(), false)
        .await?;
    let state = gateway.state(db, &database).await?;
    let k = asked_k.unwrap_or(state.served_version());
    if k > gateway.inner.set.latest() {
        return Err(GatewayError::BadRequest(format!(
            "version {k} does not exist: this gateway's migrations go from 0 to {}",
            gateway.inner.set.latest()
        )));
    }
    // A device that names itself: its request noted (a move down, or from
    // `/{db}` to a version, starts a device epoch), its epochs read.
    let device = match &call.device {
        Some(id) => gateway.device(db, &database, id, asked_k).await?.epochs,
        None => Vec::new(),
    };
    let session = gateway.session(&database, &state, k, asked_k.is_some(), &device);
    match (rest, &call.method) {
        ([], &Method::GET) => {
            let info = database.data.info().await?;
            Ok(json_response(
                200,
                &json!({"db_name": db, "doc_count": info.doc_count, "doc_del_count": info.doc_del_count,
                        "update_seq": info.update_seq, "instance_start_time": "0",
                        "rewind": {"version": k, "server_version": state.version}}),
            ))
        }
        ([], &Method::DELETE) => {
            database.data.delete_db().await?;
            let _ = database.state.delete_db().await;
            gateway
                .inner
                .dbs
                .lock()
                .map_err(poisoned)?
                .retain(|key, _| !key.starts_with(&format!("{db}\n")));
            Ok(json_response(200, &json!({"ok": true})))
        }
        ([], &Method::POST) => {
            let mut doc = call.json_body()?;
            if doc.get("_id").is_none() {
                doc["_id"] = Value::from(format!(
                    "{:x}",
                    md5::compute(format!("{:?}{}", Instant::now(), doc))
                ));
            }
            write_one(&session, doc).await
        }
        (["_changes"], &Method::GET) | (["_changes"], &Method::POST) => {
            let feed = FeedContext {
                gateway: gateway.clone(),
                database: database.clone(),
                state: state.clone(),
                k,
                pinned: asked_k.is_some(),
                device: device.clone(),
                credentials: format!("{db}\n{}", call.credentials().unwrap_or_default()),
            };
            changes(&feed, &session, call).await
        }
        (["_bulk_get"], &Method::POST) => bulk_get(&session, call).await,
        (["_bulk_docs"], &Method::POST) => bulk_docs(&session, call).await,
        (["_revs_diff"], &Method::POST) => {
            let body = call.json_body()?;
            let asked: BTreeMap<String, Vec<String>> =
                serde_json::from_value(body).map_err(|e| {
                    GatewayError::BadRequest(format!("_revs_diff expects {{id: [rev, ...]}}: {e}"))
                })?;
            let diff = session.revs_diff(asked).await?;
            Ok(json_response(
                200,
                &serde_json::to_value(diff).unwrap_or_default(),
            ))
        }
        (["_all_docs"], &Method::GET) | (["_all_docs"], &Method::POST) => {
            all_docs(&session, call).await
        }
        (["_ensure_full_commit"], &Method::POST) => Ok(json_response(
            201,
            &json!({"ok": true, "instance_start_time": "0"}),
        )),
        (["_local", id @ ..], method) if !id.is_empty() => {
            local(&database, &id.join("/"), method, call).await
        }
        (["_design", name, more @ ..], method) => {
            if !more.is_empty() {
                return pass_through(
                    gateway,
                    call,
                    format!(
                        "`_design/{name}/{}`: views and other design functions are not served by the gateway in front of embedded stores",
                        more.join("/")
                    ),
                )
                .await;
            }
            document(&session, &format!("_design/{name}"), method, call).await
        }
        // Endpoints served above, asked with another method: CouchDB's 405.
        (["_bulk_get" | "_bulk_docs" | "_revs_diff" | "_ensure_full_commit"], _) => {
            Err(GatewayError::MethodNotAllowed("POST"))
        }
        (["_changes" | "_all_docs"], _) => Err(GatewayError::MethodNotAllowed("GET,HEAD,POST")),
        ([special, ..], _) if special.starts_with('_') => {
            pass_through(
                gateway,
                call,
                format!("`{special}` is not an endpoint the gateway serves"),
            )
            .await
        }
        ([id], method) => document(&session, id, method, call).await,
        ([id, attachment @ ..], &Method::GET) => {
            let rev = call.query.get("rev").map(String::as_str);
            attachment_get(&session, id, &attachment.join("/"), rev).await
        }
        ([id, attachment @ ..], &Method::PUT) | ([id, attachment @ ..], &Method::DELETE) => {
            attachment_write(&session, id, &attachment.join("/"), call).await
        }
        _ => Err(GatewayError::NotFound("no such endpoint".into())),
    }
}

/// In front of CouchDB (or an app server), passes a request the gateway
/// does not need to understand straight through, with the user's own
/// credentials; elsewhere, `not_found`.
async fn pass_through(
    gateway: &Gateway,
    call: &Call,
    why: String,
) -> Result<Response, GatewayError> {
    let Backend::Couch(root) = &gateway.inner.backend else {
        return Err(GatewayError::NotFound(why));
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = gateway
        .inner
        .http
        .get_or_init(|| {
            reqwest::Client::builder()
                .build()
                .unwrap_or_else(|_| reqwest::Client::new())
        })
        .clone();
    let url = format!("{}{}", root.trim_end_matches('/'), call.upstream);
    let method = match call.head {
        true => Method::HEAD,
        false => call.method.clone(),
    };
    let mut request = client.request(method, &url).body(call.body.clone());
    for name in [
        header::AUTHORIZATION,
        header::COOKIE,
        header::CONTENT_TYPE,
        header::ACCEPT,
    ] {
        if let Some(value) = call.headers.get(&name) {
            request = request.header(name, value.clone());
        }
    }
    let answer = request.send().await.map_err(|e| {
        GatewayError::Internal(format!(
            "upstream {} did not answer: {}",
            rewind_store::redact_url(&url),
            rewind_store::redact_url(&e.to_string())
        ))
    })?;
    let status = answer.status();
    let mut headers = HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::SET_COOKIE,
        header::CACHE_CONTROL,
    ] {
        for value in answer.headers().get_all(&name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let body = answer
        .bytes()
        .await
        .map_err(|e| GatewayError::Internal(format!("upstream answer: {e}")))?;
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

fn parse_since(text: Option<&String>) -> Seq {
    match text {
        None => Value::from(0),
        Some(t) => serde_json::from_str::<Value>(t).unwrap_or_else(|_| Value::from(t.clone())),
    }
}

/// Everything a changes page's answer depends on besides its options, owned,
/// so that pages can be read ahead of the client (`ahead`).
#[derive(Clone)]
struct FeedContext {
    gateway: Gateway,
    database: Database,
    state: State,
    k: u32,
    pinned: bool,
    /// The client's device epochs (`Session::device`).
    device: Vec<String>,
    /// The database and the client's credentials: pages read with one
    /// user's credentials are never another's answer.
    credentials: String,
}

impl FeedContext {
    fn session(&self) -> Session<'_> {
        self.gateway.session(
            &self.database,
            &self.state,
            self.k,
            self.pinned,
            &self.device,
        )
    }

    /// The feed a page belongs to: everything that shapes its answer but
    /// where it starts.
    fn feed(&self, opts: &ChangesOptions) -> String {
        let state = serde_json::to_string(&self.state).unwrap_or_default();
        let digest = md5::compute(format!(
            "{}\n{}\n{}\n{}\n{state}\n{:?}\n{}\n{}\n{}",
            self.credentials,
            self.k,
            self.pinned,
            self.device.last().map(String::as_str).unwrap_or(""),
            opts.limit,
            opts.style_all_docs,
            opts.include_docs,
            opts.descending
        ));
        format!("{digest:x}")
    }
}

/// A page of a normal (or longpoll) feed: read ahead when it was, else read
/// now; either way the pages after it are read ahead (`ahead`) when the
/// client pages through the feed (`limit`, ascending).
async fn feed_page(
    cx: &FeedContext,
    session: &Session<'_>,
    opts: &ChangesOptions,
) -> Result<rewind_store::Changes, GatewayError> {
    let Some(limit) = opts.limit.filter(|&l| l > 0 && !opts.descending) else {
        return session.changes(opts).await;
    };
    let feed = cx.feed(opts);
    let held = cx
        .gateway
        .inner
        .ahead
        .take(&feed, &opts.since.to_string(), limit);
    if let Some(answer) = held {
        if let Some(page) = answer.await {
            client_moved(cx, &feed, opts, limit, &page);
            return Ok(page);
        }
    }
    session
        .changes_then(opts, |page| client_moved(cx, &feed, opts, limit, page))
        .await
}

/// The client was answered `page`: the pages after it are read ahead.
fn client_moved(
    cx: &FeedContext,
    feed: &str,
    opts: &ChangesOptions,
    limit: usize,
    page: &rewind_store::Changes,
) {
    if let Some(next) = next_since(page, limit) {
        cx.gateway.inner.ahead.client_at(feed, next);
        read_ahead(cx, feed, opts, limit);
    }
}

/// Starts reading the pages of `feed` the client will ask for next, a
/// chunk of them in a task of its own (see `ahead`).
fn read_ahead(cx: &FeedContext, feed: &str, opts: &ChangesOptions, limit: usize) {
    while let Some(reserved) = cx.gateway.inner.ahead.reserve(feed, limit) {
        let (cx, feed) = (cx.clone(), feed.to_owned());
        let mut opts = opts.clone();
        opts.since = parse_since(Some(&reserved.since));
        let mut chunk = opts.clone();
        chunk.limit = Some(limit.saturating_mul(reserved.pages));
        tokio::spawn(async move {
            let since = reserved.since.clone();
            let page = cx
                .session()
                .changes_then(&chunk, |page| {
                    cx.gateway.inner.ahead.read(&feed, &since, page, limit);
                    read_ahead(&cx, &feed, &opts, limit);
                })
                .await;
            reserved.finish(page.ok());
        });
    }
}

async fn changes(
    cx: &FeedContext,
    session: &Session<'_>,
    call: &Call,
) -> Result<Response, GatewayError> {
    let body = if call.method == Method::POST && !call.body.is_empty() {
        Some(call.json_body()?)
    } else {
        None
    };
    let filter = ChangesFilter::parse(
        call.query.get("filter").map(String::as_str),
        call.json_param("doc_ids")?,
        body.as_ref(),
    )?;
    let mut since = parse_since(call.query.get("since"));
    if since == "now" {
        since = session.db.data.info().await?.update_seq;
    }
    let limit = call.number("limit")?.map(|n| n as usize);
    let opts = ChangesOptions {
        since: since.clone(),
        limit,
        style_all_docs: call.query.get("style").map(String::as_str) == Some("all_docs"),
        include_docs: call.flag("include_docs"),
        descending: call.flag("descending"),
    };
    let feed = call
        .query
        .get("feed")
        .map(String::as_str)
        .unwrap_or("normal");
    let heartbeat = call.number("heartbeat")?.map(Duration::from_millis);
    let timeout = call.number("timeout")?.map(Duration::from_millis);
    let seq_interval = match call.number("seq_interval")? {
        Some(0) => {
            return Err(GatewayError::BadRequest(
                "query parameter `seq_interval` must be a positive number".into(),
            ))
        }
        other => other.unwrap_or(1) as usize,
    };
    let answer = |mut changes: rewind_store::Changes| {
        thin_seqs(&mut changes.results, seq_interval);
        json_response(200, &serde_json::to_value(changes).unwrap_or_default())
    };
    let page = |opts: ChangesOptions| {
        let filter = filter.as_ref();
        async move {
            match filter {
                Some(filter) => filtered_page(session, &opts, filter).await,
                None => feed_page(cx, session, &opts).await,
            }
        }
    };
    match feed {
        "normal" => Ok(answer(page(opts.clone()).await?)),
        "longpoll" => {
            let first = page(opts.clone()).await?;
            if !first.results.is_empty() {
                return Ok(answer(first));
            }
            let wait = timeout
                .or(heartbeat)
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            // Woken, the feed is read again; a read that finds nothing
            // waits again until the time is up. (pouchdb-server can wake a
            // longpoll on a revision and then list nothing when the same
            // document's next revision is being written: the first one is
            // no longer the document's, the next not yet listed.)
            let deadline = tokio::time::Instant::now() + wait;
            let mut last_seq = first.last_seq;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() || !session.db.data.wait_for_change(&last_seq, left).await? {
                    break;
                }
                let mut again = opts.clone();
                if filter.is_some() {
                    // Rows the filter dropped are not read again.
                    again.since = last_seq.clone();
                }
                let page = page(again).await?;
                if !page.results.is_empty() {
                    return Ok(answer(page));
                }
                last_seq = page.last_seq;
            }
            Ok(json_response(
                200,
                &json!({"results": [], "last_seq": last_seq}),
            ))
        }
        "continuous" => continuous(cx, opts, filter, heartbeat, timeout, seq_interval).await,
        other => Err(GatewayError::BadRequest(format!(
            "feed `{other}` is not supported: use normal, longpoll or continuous"
        ))),
    }
}

/// CouchDB's `seq_interval=N`: of a batch of rows, only every `N`th and
/// the last carry their `seq` (the others `null`); a client checkpoints at
/// those. `1` leaves every row's.
fn thin_seqs(rows: &mut [rewind_store::ChangeRow], interval: usize) {
    if interval <= 1 {
        return;
    }
    let last = rows.len().saturating_sub(1);
    for (i, row) in rows.iter_mut().enumerate() {
        if (i + 1) % interval != 0 && i != last {
            row.seq = Value::Null;
        }
    }
}

/// Rows read at a time for a filtered feed.
const FILTERED_PAGE: usize = 500;

/// A page of a normal (or longpoll) feed with a filter: pages of the feed
/// read until `limit` rows are kept or the feed ends (a page with no row is
/// the feed's end to PouchDB, so a page the filter emptied must not be
/// answered while rows follow). `last_seq` is the last kept row's when the
/// limit stopped it.
async fn filtered_page(
    session: &Session<'_>,
    opts: &ChangesOptions,
    filter: &ChangesFilter,
) -> Result<rewind_store::Changes, GatewayError> {
    let want = opts.limit.filter(|&l| l > 0);
    let mut read = opts.clone();
    // Descending: one read of the whole feed, kept rows cut to the limit.
    read.limit = (!opts.descending).then_some(FILTERED_PAGE);
    let mut kept = Vec::new();
    loop {
        let (page, listed) = read_filtered(session, &read, filter).await?;
        let more = read.limit.is_some_and(|l| listed >= l);
        for row in page.results {
            kept.push(row);
            if want.is_some_and(|w| kept.len() >= w) {
                let last_seq = kept.last().map(|r| r.seq.clone()).unwrap_or_default();
                return Ok(rewind_store::Changes {
                    results: kept,
                    last_seq,
                });
            }
        }
        if !more {
            return Ok(rewind_store::Changes {
                results: kept,
                last_seq: page.last_seq,
            });
        }
        read.since = page.last_seq;
    }
}

/// One read of the feed the client asked for (`asked`) for a filtered
/// client, with documents when the filter needs them: the rows `filter`
/// keeps, their documents left in only when the client asked, and how many
/// rows the store listed (a full page means more may follow). A `_doc_ids`
/// read presents only the named documents.
async fn read_filtered(
    session: &Session<'_>,
    asked: &ChangesOptions,
    filter: &ChangesFilter,
) -> Result<(rewind_store::Changes, usize), GatewayError> {
    let mut read = asked.clone();
    read.include_docs |= filter.needs_docs();
    let (mut page, listed) = match filter.doc_ids() {
        Some(ids) => session.changes_of(&read, |id| ids.contains(id)).await?,
        None => {
            let page = session.changes(&read).await?;
            let listed = page.results.len();
            (page, listed)
        }
    };
    page.results.retain(|row| filter.keeps(row));
    if !asked.include_docs {
        for row in &mut page.results {
            row.doc = None;
        }
    }
    Ok((page, listed))
}

async fn continuous(
    cx: &FeedContext,
    mut opts: ChangesOptions,
    filter: Option<ChangesFilter>,
    heartbeat: Option<Duration>,
    timeout: Option<Duration>,
    seq_interval: usize,
) -> Result<Response, GatewayError> {
    // Collect lines until the feed has waited `timeout` with nothing new, or
    // `limit` rows went out; heartbeats keep idle connections open. The
    // feed's task owns its context, and presents through the gateway's
    // cache like any other request.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let cx = cx.clone();
    tokio::spawn(async move {
        let session = cx.session();
        let db = &cx.database;
        let started = Instant::now();
        let mut sent = 0usize;
        loop {
            let read = match &filter {
                Some(filter) => read_filtered(&session, &opts, filter)
                    .await
                    .map(|(page, _)| page),
                None => session.changes(&opts).await,
            };
            let mut changes = match read {
                Ok(c) => c,
                Err(e) => {
                    let (_, error, reason) = e.couch();
                    let _ = tx
                        .send(Ok(Bytes::from(
                            json!({"error": error, "reason": reason}).to_string() + "\n",
                        )))
                        .await;
                    return;
                }
            };
            thin_seqs(&mut changes.results, seq_interval);
            for row in &changes.results {
                let line = serde_json::to_string(row).unwrap_or_default() + "\n";
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
                sent += 1;
            }
            opts.since = changes.last_seq.clone();
            if opts.limit.is_some_and(|l| sent >= l) {
                let _ = tx
                    .send(Ok(Bytes::from(
                        json!({"last_seq": opts.since}).to_string() + "\n",
                    )))
                    .await;
                return;
            }
            let wait = heartbeat.unwrap_or(Duration::from_secs(60));
            match db.data.wait_for_change(&opts.since, wait).await {
                Ok(true) => continue,
                Ok(false) => {
                    if timeout.is_some_and(|t| started.elapsed() >= t)
                        || (heartbeat.is_none() && timeout.is_none())
                    {
                        let _ = tx
                            .send(Ok(Bytes::from(
                                json!({"last_seq": opts.since}).to_string() + "\n",
                            )))
                            .await;
                        return;
                    }
                    if tx.send(Ok(Bytes::from_static(b"\n"))).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    // A receiver answers `None` again when polled after its end (the gzip
    // layer does poll again; `stream::unfold` panicked there, killing
    // every compressed continuous feed at its end).
    let mut rx = rx;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

async fn bulk_get(session: &Session<'_>, call: &Call) -> Result<Response, GatewayError> {
    let body = call.json_body()?;
    let docs = body.get("docs").and_then(Value::as_array).ok_or_else(|| {
        GatewayError::BadRequest(
            "_bulk_get expects {\"docs\": [{\"id\": .., \"rev\": ..}, ...]}".into(),
        )
    })?;
    let revs = call.flag("revs");
    let mut asked = Vec::with_capacity(docs.len());
    for item in docs {
        let id = item.get("id").and_then(Value::as_str).ok_or_else(|| {
            GatewayError::BadRequest("each _bulk_get entry needs a string `id`".into())
        })?;
        asked.push((id, item.get("rev").and_then(Value::as_str)));
    }
    // Each document's presentations, read no further than the asked
    // revisions need: those that presented the asked revision, from the
    // cache (what a changes feed just presented); those of its winner, from
    // the cache, when it is unchanged since; else those of its live leaves;
    // else (a deleted leaf's revision, or one the document moved past)
    // those of every leaf.
    let unfound = |presented_of: &HashMap<String, Vec<Presented>>, some_rev: bool| {
        asked
            .iter()
            .filter(|(id, rev)| {
                let presented = presented_of.get(*id).map(Vec::as_slice).unwrap_or_default();
                match rev {
                    Some(rev) => !presented.iter().any(|p| p.rev == *rev),
                    None => some_rev || presented.is_empty(),
                }
            })
            .map(|(id, _)| (*id).to_owned())
            .collect::<Vec<String>>()
    };
    // First the revisions the cache presented (no read), then the winners
    // it holds, checked as unchanged.
    let mut presented_of = session.cached_revisions(&asked);
    let cached = session
        .cached_winners(&unfound(&presented_of, true))
        .await?;
    presented_of.extend(cached);
    let live = session
        .presented_live_of(&unfound(&presented_of, true))
        .await?;
    presented_of.extend(live);
    let every = session.presented_of(&unfound(&presented_of, false)).await?;
    presented_of.extend(every);
    let mut results = Vec::with_capacity(asked.len());
    for (id, rev) in asked {
        let presented = presented_of.get(id).map(Vec::as_slice).unwrap_or_default();
        let mut found: Vec<Arc<Value>> = session
            .pick(id, presented, rev)
            .await?
            .into_iter()
            .collect();
        if found.is_empty() && rev.is_some() && call.flag("latest") {
            // The document moved on since the changes feed listed this
            // revision: the latest is what it has now (its live leaves; its
            // tombstones when it has none, as CouchDB answers).
            let any_live = presented.iter().any(|p| !is_deleted(&p.doc));
            found = presented
                .iter()
                .filter(|p| !any_live || !is_deleted(&p.doc))
                .map(|p| p.doc.clone())
                .collect();
        }
        let docs: Vec<Answer> = if found.is_empty() {
            vec![Answer::Other(
                json!({"error": {"id": id, "rev": rev.unwrap_or("undefined"), "error": "not_found", "reason": "missing"}}),
            )]
        } else {
            found.into_iter().map(|doc| Answer::ok(doc, revs)).collect()
        };
        results.push(BulkGetResult { id, docs });
    }
    Ok(json_response(200, &BulkGetResults { results }))
}

/// A `_bulk_get` answer.
#[derive(serde::Serialize)]
struct BulkGetResults<'a> {
    results: Vec<BulkGetResult<'a>>,
}

/// One document of a `_bulk_get` answer.
#[derive(serde::Serialize)]
struct BulkGetResult<'a> {
    id: &'a str,
    docs: Vec<Answer>,
}

/// A revision as `_bulk_get` and `open_revs` answer it: `{"ok": doc}`
/// (serialized from the presentation itself, without a copy), or another
/// entry (`error`, `missing`).
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Answer {
    Ok { ok: SharedDoc },
    Other(Value),
}

impl Answer {
    /// `{"ok": doc}`, without `_revisions` unless `revs` was asked for.
    fn ok(doc: Arc<Value>, revs: bool) -> Answer {
        let doc = match revs || doc.get("_revisions").is_none() {
            true => doc,
            false => {
                let mut doc = Arc::unwrap_or_clone(doc);
                if let Some(o) = doc.as_object_mut() {
                    o.shift_remove("_revisions");
                }
                Arc::new(doc)
            }
        };
        Answer::Ok { ok: SharedDoc(doc) }
    }
}

/// A shared document, serialized as itself.
struct SharedDoc(Arc<Value>);

impl serde::Serialize for SharedDoc {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

fn check_doc(doc: &Value) -> Result<(), GatewayError> {
    if !doc.is_object() {
        return Err(GatewayError::BadRequest(
            "every document must be a JSON object".into(),
        ));
    }
    let size = doc.to_string().len();
    if size > MAX_DOCUMENT {
        return Err(GatewayError::TooLarge(format!(
            "document {} is {size} bytes; the limit is {MAX_DOCUMENT}",
            doc.get("_id").and_then(Value::as_str).unwrap_or("?")
        )));
    }
    if let Some(rev) = doc.get("_rev") {
        let valid = rev
            .as_str()
            .and_then(|r| r.split_once('-'))
            .is_some_and(|(g, h)| {
                g.parse::<u64>().is_ok_and(|g| g > 0)
                    && !h.is_empty()
                    && h.bytes().all(|b| b.is_ascii_hexdigit())
            });
        if !valid {
            return Err(GatewayError::BadRequest(format!(
                "invalid revision `{rev}`: expected N-hex"
            )));
        }
    }
    Ok(())
}

async fn bulk_docs(session: &Session<'_>, call: &Call) -> Result<Response, GatewayError> {
    let body = call.json_body()?;
    let docs = body
        .get("docs")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| GatewayError::BadRequest("_bulk_docs expects {\"docs\": [...]}".into()))?;
    for doc in &docs {
        check_doc(doc)?;
    }
    let new_edits = body
        .get("new_edits")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if !new_edits {
        for doc in &docs {
            if doc.get("_id").and_then(Value::as_str).is_none() || doc.get("_rev").is_none() {
                return Err(GatewayError::BadRequest(
                    "with new_edits=false every document needs `_id` and `_rev`".into(),
                ));
            }
        }
        let errors = session.push(docs).await?;
        return Ok(json_response(201, &Value::Array(errors)));
    }
    let mut results = Vec::with_capacity(docs.len());
    for mut doc in docs {
        if doc.get("_id").is_none() {
            doc["_id"] = Value::from(format!(
                "{:x}",
                md5::compute(format!("{:?}{}", Instant::now(), doc))
            ));
        }
        let id = doc
            .get("_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        match session.edit(doc).await? {
            Ok((id, rev)) => results.push(json!({"ok": true, "id": id, "rev": rev})),
            Err(e) => {
                let (_, error, reason) = e.couch();
                results.push(json!({"id": id, "error": error, "reason": reason}));
            }
        }
    }
    Ok(json_response(201, &Value::Array(results)))
}

async fn write_one(session: &Session<'_>, doc: Value) -> Result<Response, GatewayError> {
    check_doc(&doc)?;
    match session.edit(doc).await? {
        Ok((id, rev)) => Ok(json_response(
            201,
            &json!({"ok": true, "id": id, "rev": rev}),
        )),
        Err(e) => Err(e),
    }
}

async fn all_docs(session: &Session<'_>, call: &Call) -> Result<Response, GatewayError> {
    let body = if call.method == Method::POST {
        Some(call.json_body()?)
    } else {
        None
    };
    let keys = match body
        .as_ref()
        .and_then(|b| b.get("keys"))
        .cloned()
        .or(call.json_param("keys")?)
    {
        Some(Value::Array(keys)) => Some(
            keys.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect(),
        ),
        Some(_) => {
            return Err(GatewayError::BadRequest(
                "`keys` must be a list of ids".into(),
            ))
        }
        None => None,
    };
    let key_param = |names: &[&str]| -> Result<Option<String>, GatewayError> {
        for name in names {
            if let Some(v) = call.json_param(name)? {
                return v.as_str().map(|s| Some(s.to_owned())).ok_or_else(|| {
                    GatewayError::BadRequest(format!("`{name}` must be a JSON string"))
                });
            }
        }
        Ok(None)
    };
    let include_docs = call.flag("include_docs");
    let opts = AllDocsOptions {
        keys,
        start_key: key_param(&["startkey", "start_key"])?,
        end_key: key_param(&["endkey", "end_key"])?,
        limit: call.number("limit")?.map(|n| n as usize),
        skip: call.number("skip")?.unwrap_or(0) as usize,
        include_docs,
        descending: call.flag("descending"),
    };
    let mut answer = session.db.data.all_docs(&opts).await?;
    {
        let live = |row: &rewind_store::AllDocsRow| {
            row.id
                .clone()
                .filter(|_| !row.value.as_ref().is_some_and(|v| v.deleted))
        };
        let ids: Vec<String> = answer.rows.iter().filter_map(live).collect();
        let presented_of = session.presented_live_of(&ids).await?;
        for row in &mut answer.rows {
            let Some(id) = live(row) else { continue };
            let presented = presented_of.get(&id).map(Vec::as_slice).unwrap_or_default();
            if let Some(presented) = winner(presented) {
                if let Some(value) = &mut row.value {
                    value.rev = presented.rev.clone();
                }
                if include_docs {
                    let mut doc = Value::clone(&presented.doc);
                    if let Some(o) = doc.as_object_mut() {
                        o.shift_remove("_revisions");
                    }
                    row.doc = Some(doc);
                }
            }
        }
    }
    Ok(json_response(
        200,
        &serde_json::to_value(answer).unwrap_or_default(),
    ))
}

async fn local(
    database: &Database,
    id: &str,
    method: &Method,
    call: &Call,
) -> Result<Response, GatewayError> {
    let full = format!("_local/{id}");
    match *method {
        Method::GET => Ok(json_response(200, &database.data.get_local(&full).await?)),
        Method::PUT => {
            let body = call.json_body()?;
            let rev = database.data.put_local(&full, body).await?;
            Ok(json_response(
                201,
                &json!({"ok": true, "id": full, "rev": rev}),
            ))
        }
        Method::DELETE => {
            database
                .data
                .delete_local(&full, call.query.get("rev").map(String::as_str))
                .await?;
            Ok(json_response(
                200,
                &json!({"ok": true, "id": full, "rev": "0-0"}),
            ))
        }
        _ => Err(GatewayError::BadRequest(format!(
            "{method} is not allowed on a local document"
        ))),
    }
}

async fn document(
    session: &Session<'_>,
    id: &str,
    method: &Method,
    call: &Call,
) -> Result<Response, GatewayError> {
    match *method {
        Method::GET => {
            if let Some(open_revs) = call.query.get("open_revs") {
                let presented = session.presented_leaves(id).await?;
                let wanted: Vec<String> = if open_revs == "all" {
                    presented.iter().map(|p| p.rev.clone()).collect()
                } else {
                    serde_json::from_str(open_revs).map_err(|_| {
                        GatewayError::BadRequest(format!("open_revs must be `all` or a JSON list of revisions, got `{open_revs}`"))
                    })?
                };
                let mut out = Vec::new();
                for rev in wanted {
                    out.push(match session.pick(id, &presented, Some(&rev)).await? {
                        Some(doc) => Answer::ok(doc, call.flag("revs")),
                        None => Answer::Other(json!({"missing": rev})),
                    });
                }
                return Ok(json_response(200, &out));
            }
            let rev = call.query.get("rev").map(String::as_str);
            let Some(mut doc) = session.get(id, rev).await? else {
                return Err(GatewayError::NotFound("missing".into()));
            };
            if rev.is_none() && is_deleted(&doc) {
                return Err(GatewayError::NotFound("deleted".into()));
            }
            if let Some(o) = doc.as_object_mut() {
                if !call.flag("revs") {
                    o.shift_remove("_revisions");
                }
            }
            if call.flag("attachments") {
                inline_attachments(session, id, &mut doc).await?;
            }
            if call.flag("conflicts") {
                let presented = session.presented_leaves(id).await?;
                let current = doc
                    .get("_rev")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let conflicts: Vec<String> = presented
                    .iter()
                    .filter(|p| p.rev != current && !is_deleted(&p.doc))
                    .map(|p| p.rev.clone())
                    .collect();
                if !conflicts.is_empty() {
                    doc["_conflicts"] = json!(conflicts);
                }
            }
            Ok(json_response(200, &doc))
        }
        Method::PUT => {
            let mut doc = call.json_body()?;
            doc["_id"] = Value::from(id);
            if let Some(rev) = call.query.get("rev") {
                doc["_rev"] = Value::from(rev.clone());
            }
            if call.query.get("new_edits").map(String::as_str) == Some("false") {
                check_doc(&doc)?;
                let errors = session.push(vec![doc]).await?;
                if let Some(e) = errors.first() {
                    return Err(crate::sync::refusal(e));
                }
                return Ok(json_response(201, &json!({"ok": true, "id": id})));
            }
            write_one(session, doc).await
        }
        Method::DELETE => {
            let rev = call
                .query
                .get("rev")
                .ok_or_else(|| GatewayError::Conflict(id.to_owned()))?;
            write_one(session, json!({"_id": id, "_rev": rev, "_deleted": true})).await
        }
        _ => Err(GatewayError::BadRequest(format!(
            "{method} is not allowed on a document"
        ))),
    }
}

/// `GET /{db}/{id}/{name}`: the attachment of the presented winner, or
/// with `rev` of that revision as presented (PouchDB fetches each
/// attachment of a revision it pulls so). Attachments are never
/// translated, so a presented stub names a stored attachment by its
/// digest: the stored winner's, else a conflicting leaf's; one no leaf
/// holds any more is `not_found`, never another revision's data.
async fn attachment_get(
    session: &Session<'_>,
    id: &str,
    name: &str,
    rev: Option<&str>,
) -> Result<Response, GatewayError> {
    let missing = || missing_attachment(name);
    let mut doc = session
        .get(id, rev)
        .await?
        .filter(|doc| rev.is_some() || !is_deleted(doc))
        .ok_or_else(missing)?;
    inline_attachments(session, id, &mut doc).await?;
    let att = doc
        .get("_attachments")
        .and_then(|a| a.get(name))
        .filter(|a| a.get("data").is_some())
        .ok_or_else(missing)?;
    let data = att.get("data").and_then(Value::as_str).unwrap_or("");
    let bytes = decode_base64(data)
        .ok_or_else(|| GatewayError::Internal("attachment data is not base64".into()))?;
    let content_type = att
        .get("content_type")
        .and_then(Value::as_str)
        .unwrap_or("application/octet-stream");
    let mut response = Response::new(Body::from(bytes));
    if let Ok(v) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(response)
}

/// CouchDB's answer for an attachment a document does not have.
fn missing_attachment(name: &str) -> GatewayError {
    GatewayError::NotFound(format!("Document is missing attachment {name}"))
}

/// `PUT /{db}/{id}/{name}?rev=` (the request body is the attachment, its
/// `Content-Type` the attachment's) and `DELETE /{db}/{id}/{name}?rev=`: a
/// new revision of the document as presented at the client's version,
/// written like any edit at that version (translated, journaled). Its
/// other attachments go inline, from the stored document. A new document
/// needs no `rev`; otherwise it must name the live revision presented
/// (`If-Match` also works), or the answer is 409.
async fn attachment_write(
    session: &Session<'_>,
    id: &str,
    name: &str,
    call: &Call,
) -> Result<Response, GatewayError> {
    let rev = call.query.get("rev").cloned().or_else(|| {
        call.headers
            .get(header::IF_MATCH)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_owned())
    });
    let mut doc = match &rev {
        Some(rev) => session
            .get(id, Some(rev))
            .await?
            .filter(|d| !is_deleted(d))
            .ok_or_else(|| GatewayError::Conflict(id.to_owned()))?,
        None if call.method == Method::DELETE => return Err(GatewayError::Conflict(id.to_owned())),
        None => json!({ "_id": id }),
    };
    if let Some(o) = doc.as_object_mut() {
        o.shift_remove("_revisions");
    }
    inline_attachments(session, id, &mut doc).await?;
    let mut attachments = doc
        .get("_attachments")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if call.method == Method::DELETE {
        if attachments.shift_remove(name).is_none() {
            return Err(missing_attachment(name));
        }
    } else {
        let content_type = call
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream");
        attachments.insert(
            name.to_owned(),
            json!({"content_type": content_type, "data": encode_base64(&call.body)}),
        );
    }
    if let Some(o) = doc.as_object_mut() {
        match attachments.is_empty() {
            true => o.shift_remove("_attachments"),
            false => o.insert("_attachments".into(), Value::Object(attachments)),
        };
    }
    write_one(session, doc).await
}

/// Replaces `doc`'s attachment stubs (a presented document's) by the
/// attachments with their data, from the stored document `id`: migrations
/// and translations never touch attachments, so a stub names a stored
/// attachment by its digest, found in the stored winner or else in another
/// leaf (a conflicted document's leaves may hold different attachments
/// under one name). A stub without a digest takes the winner's of its
/// name; one found nowhere stays a stub.
async fn inline_attachments(
    session: &Session<'_>,
    id: &str,
    doc: &mut Value,
) -> Result<(), GatewayError> {
    let Some(attachments) = doc.get_mut("_attachments").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let digest_of = |a: &Value| a.get("digest").and_then(Value::as_str).map(str::to_owned);
    let stubs: Vec<(String, Option<String>)> = attachments
        .iter()
        .filter(|(_, a)| a.get("data").is_none())
        .map(|(name, a)| (name.clone(), digest_of(a)))
        .collect();
    if stubs.is_empty() {
        return Ok(());
    }
    let opts = rewind_store::GetOptions {
        attachments: true,
        ..rewind_store::GetOptions::default()
    };
    // The stored attachments (with data) by digest, the winner's first.
    let attachments_of = |stored: &Value| {
        stored
            .get("_attachments")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let index = |stored: &[Value]| {
        let mut by_digest: HashMap<String, Value> = HashMap::new();
        for att in stored
            .iter()
            .flat_map(|doc| attachments_of(doc).into_values())
        {
            if let Some(digest) = digest_of(&att) {
                by_digest.entry(digest).or_insert(att);
            }
        }
        by_digest
    };
    let mut stored: Vec<Value> = session
        .db
        .data
        .get(id, &opts)
        .await
        .ok()
        .and_then(|r| r.into_doc())
        .into_iter()
        .collect();
    let by_name = stored.first().map(attachments_of).unwrap_or_default();
    let mut by_digest = index(&stored);
    let unfound = stubs
        .iter()
        .any(|(_, d)| d.as_ref().is_some_and(|d| !by_digest.contains_key(d)));
    if unfound {
        let all = rewind_store::GetOptions {
            open_revs: Some(rewind_store::OpenRevs::All),
            ..opts
        };
        if let rewind_store::GetResult::Revs(leaves) = session.db.data.get(id, &all).await? {
            stored.extend(leaves.into_iter().filter_map(|leaf| match leaf {
                rewind_store::OpenRev::Ok(leaf) => Some(leaf),
                rewind_store::OpenRev::Missing(_) => None,
            }));
            by_digest = index(&stored);
        }
    }
    for (name, digest) in stubs {
        let full = match &digest {
            Some(digest) => by_digest.get(digest),
            None => by_name.get(&name),
        };
        if let (Some(full), Some(att)) = (full, attachments.get_mut(&name)) {
            *att = full.clone();
        }
    }
    Ok(())
}

/// Serves the gateway on `listener` (bound by the caller, who can then say
/// where it listens) until the process ends.
pub async fn serve(
    config: GatewayConfig,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    let gateway = Gateway::new(config);
    axum::serve(listener, router(gateway)).await
}
