//! The engine as a user runs it: `rewind upgrade | rollback | plan` on a real
//! database (the embedded store, and pouchdb-server standing in for
//! CouchDB), with edits before, during and after, concurrent runs, changed
//! migration files, and `kill -9` at random points.
//!
//! Every test checks the invariants of shared/design.md that apply: no lost
//! edit (1), no spurious conflict (2), exact rollback (3), crash safety (5).

use rewind_engine::state::{companion_target, Database, State};
use rewind_engine::Project;
use rewind_lens::migration::NoComplements;
use rewind_lens::MigrationSet;
use rewind_store::{AllDocsOptions, AnyStore, GetOptions, Store, StoreError};
use rewind_testkit::{
    body, body_text, cht_migrations, load_docs, load_into, read_all, shared_server, Stored, TempDir,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Set-up

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    Couch,
}

/// A database under test: its target (file or URL) and an open store.
struct Db {
    backend: Backend,
    target: String,
    store: AnyStore,
    _dir: TempDir,
}

impl Db {
    async fn new(backend: Backend) -> Db {
        let dir = TempDir::new();
        let target = match backend {
            Backend::Embedded => dir.file("medic.db"),
            Backend::Couch => shared_server().fresh_db_url(),
        };
        let store = load_docs(&target, Vec::new()).await;
        Db {
            backend,
            target,
            store,
            _dir: dir,
        }
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// A new handle on the database. The embedded store keeps its next
    /// sequence in memory, so a handle opened before another process wrote
    /// must not write (see the report); write through a fresh one.
    async fn reopen(&self) -> AnyStore {
        rewind_store::open(&self.target).await.unwrap()
    }

    async fn companion(&self) -> AnyStore {
        rewind_store::open(&companion_target(&self.target))
            .await
            .unwrap()
    }

    async fn state(&self) -> State {
        State::load(&Database::open(&self.target).await.unwrap())
            .await
            .unwrap()
    }

    /// Loads `n` sample documents plus the unaffected extras; returns the
    /// documents as stored (a JavaScript server rewrites some numbers).
    async fn load(&self, n: u64, seed: u64) -> BTreeMap<String, Stored> {
        let mut docs: Vec<Value> = rewind_sample::docs(n, seed).collect();
        docs.extend(unaffected_docs());
        load_into(&self.store, docs).await;
        let all = read_all(&self.store).await;
        assert_eq!(all.len() as u64, n + unaffected_docs().len() as u64);
        all
    }
}

/// Documents no migration touches: they must keep revision 1 throughout.
fn unaffected_docs() -> Vec<Value> {
    vec![
        json!({"_id": "_design/app", "language": "javascript", "rewind_note": "a design doc"}),
        json!({"_id": "settings", "type": "app_settings", "locale": "en", "n": 12345678901234567890u64}),
        json!({"_id": "task~1", "type": "task", "state": "ready", "owner": {"_id": "chw-1"}}),
        json!({"_id": "district-1", "type": "district_hospital", "name": "North", "parent": {"_id": "x"}}),
    ]
}

fn is_unaffected(id: &str) -> bool {
    unaffected_docs().iter().any(|d| d["_id"] == id)
}

fn set() -> MigrationSet {
    Project::load(None, Some(&cht_migrations()))
        .expect("examples/cht loads")
        .migrations
}

fn translate(set: &MigrationSet, doc: &Value, from: u32, to: u32) -> Value {
    let mut out = body(doc);
    set.translate(&mut out, from, to, &mut NoComplements)
        .unwrap();
    out
}

/// The real binary, with a working directory that has no `rewind.toml`.
fn rewind(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rewind"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

async fn run_output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn migrations_arg() -> String {
    cht_migrations().to_string_lossy().into_owned()
}

/// Runs `rewind <command> --db TARGET --migrations examples/cht ARGS` and
/// asserts it succeeds.
async fn rewind_ok(db: &Db, command: &str, args: &[&str]) -> Output {
    let m = migrations_arg();
    let mut all = vec![command, "--db", &db.target, "--migrations", &m];
    all.extend_from_slice(args);
    let out = run_output(rewind(db.dir(), &all)).await;
    assert!(
        out.status.success(),
        "rewind {all:?} failed:\n{}",
        text(&out)
    );
    out
}

/// Equal bodies: byte for byte on the embedded store, JSON-equal on a
/// JavaScript server (it moves `_id`/`_rev` and rewrites number text).
fn assert_same_body(backend: Backend, id: &str, actual: &Value, expected: &Value, what: &str) {
    match backend {
        Backend::Embedded => assert_eq!(
            body_text(actual),
            body_text(expected),
            "{id}: {what}: the body differs byte for byte"
        ),
        Backend::Couch => assert_eq!(
            body(actual),
            body(expected),
            "{id}: {what}: the body differs"
        ),
    }
}

fn assert_no_conflicts(all: &BTreeMap<String, Stored>, what: &str) {
    for (id, s) in all {
        assert!(
            s.live_leaves.len() <= 1,
            "{what}: {id} has {} live leaves (a conflict): {:?}",
            s.live_leaves.len(),
            s.live_leaves
        );
        if let Some(w) = &s.winner {
            assert!(w.get("_conflicts").is_none(), "{what}: {id} has _conflicts");
        }
    }
}

/// After an upgrade 0 → 7 of untouched documents: every document migrated
/// exactly once (one new revision) to what the lens computes, the others
/// untouched, no conflict.
fn check_upgraded(
    backend: Backend,
    set: &MigrationSet,
    before: &BTreeMap<String, Stored>,
    after: &BTreeMap<String, Stored>,
    gen_before: u64,
) -> Vec<String> {
    assert_no_conflicts(after, "after the upgrade");
    assert_eq!(before.len(), after.len(), "documents appeared or vanished");
    let mut migrated = Vec::new();
    for (id, b) in before {
        let a = &after[id];
        let original = b.winner.as_ref().unwrap();
        let now = a
            .winner
            .as_ref()
            .unwrap_or_else(|| panic!("{id} is deleted after the upgrade"));
        let expected = translate(set, original, 0, set.latest());
        if body(&expected) == body(original) {
            assert_same_body(backend, id, now, original, "an unaffected document");
            assert_eq!(a.rev, b.rev, "{id}: unaffected but rewritten");
        } else {
            assert_same_body(backend, id, now, &expected, "migrated 0 → 7");
            assert_eq!(
                a.generation(),
                gen_before + 1,
                "{id}: migrated {} times (revision {} → {})",
                a.generation() as i64 - gen_before as i64,
                b.rev,
                a.rev
            );
            migrated.push(id.clone());
        }
    }
    migrated
}

/// After a rollback to 0 with no edits: every body back byte for byte, one
/// more revision for every migrated document.
fn check_rolled_back(
    backend: Backend,
    original: &BTreeMap<String, Stored>,
    after: &BTreeMap<String, Stored>,
    migrated: &[String],
    gen_after: u64,
) {
    assert_no_conflicts(after, "after the rollback");
    assert_eq!(
        original.len(),
        after.len(),
        "documents appeared or vanished"
    );
    for (id, o) in original {
        let a = &after[id];
        let now = a
            .winner
            .as_ref()
            .unwrap_or_else(|| panic!("{id} is deleted after the rollback"));
        assert_same_body(backend, id, now, o.winner.as_ref().unwrap(), "rolled back");
    }
    for id in migrated {
        assert_eq!(
            after[id].generation(),
            gen_after,
            "{id}: expected revision {gen_after}, got {}",
            after[id].rev
        );
    }
    for (id, o) in original {
        if !migrated.contains(id) {
            assert_eq!(after[id].rev, o.rev, "{id}: unaffected but rewritten");
        }
    }
}

async fn check_journals(db: &Db, migrated: &[String]) {
    let companion = db.companion().await;
    let keys: Vec<String> = migrated.iter().map(|id| format!("journal:{id}")).collect();
    let rows = companion
        .all_docs(&AllDocsOptions {
            keys: Some(keys),
            ..AllDocsOptions::default()
        })
        .await
        .unwrap()
        .rows;
    for row in rows {
        let ok = row.error.is_none() && row.value.as_ref().is_some_and(|v| !v.deleted);
        assert!(ok, "no journal document {} in the companion", row.key);
    }
}

async fn check_state(db: &Db, version: u32) {
    let state = db.state().await;
    assert_eq!(state.version, version, "state version");
    assert!(
        state.run.is_none(),
        "a run is still in progress: {:?}",
        state.run
    );
    assert!(
        state.lease.is_none(),
        "the lease is still held: {:?}",
        state.lease
    );
    assert_eq!(state.applied.len(), version as usize);
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::Backend::Embedded).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn couch() {
                super::$name(super::Backend::Couch).await;
            }
        }
    )*};
}

both!(
    upgrade_then_rollback_without_edits_gives_back_every_byte,
    edits_between_upgrade_and_rollback_survive_and_the_complement_comes_back,
    concurrent_edits_during_upgrade_and_rollback_are_all_kept,
    kill_9_during_upgrade_migrates_every_document_exactly_once,
    kill_9_during_rollback_restores_every_byte,
    two_concurrent_upgrades_one_wins_the_other_is_refused,
    a_changed_migration_file_is_refused_and_plan_writes_nothing,
    every_live_leaf_of_a_conflicted_document_is_migrated_and_restored,
);

// ---------------------------------------------------------------------------
// Scenarios

async fn upgrade_then_rollback_without_edits_gives_back_every_byte(backend: Backend) {
    let db = Db::new(backend).await;
    let set = set();
    let original = db.load(800, 3).await;
    rewind_ok(&db, "upgrade", &["--batch", "64"]).await;
    let upgraded = read_all(&db.store).await;
    let migrated = check_upgraded(backend, &set, &original, &upgraded, 1);
    assert_eq!(migrated.len(), 800, "every sample document is affected");
    check_journals(&db, &migrated).await;
    check_state(&db, 7).await;

    let out = rewind_ok(&db, "rollback", &["--to", "0", "--batch", "64"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("restored exactly") && stdout.contains("800"),
        "{stdout}"
    );
    let rolled = read_all(&db.store).await;
    check_rolled_back(backend, &original, &rolled, &migrated, 3);
    check_state(&db, 0).await;
}

fn first_of(all: &BTreeMap<String, Stored>, ty: &str, skip: usize) -> (String, Value) {
    let (id, s) = all
        .iter()
        .filter(|(_, s)| s.winner.as_ref().is_some_and(|w| w["type"] == ty))
        .nth(skip)
        .unwrap_or_else(|| panic!("no document of type {ty}"));
    (id.clone(), s.winner.clone().unwrap())
}

async fn get(store: &AnyStore, id: &str) -> Value {
    store
        .get(id, &GetOptions::default())
        .await
        .unwrap_or_else(|e| panic!("get {id}: {e}"))
        .into_doc()
        .unwrap()
}

async fn put(store: &AnyStore, doc: Value) -> String {
    store.put(doc).await.unwrap()
}

fn without(doc: &Value, paths: &[&[&str]]) -> Value {
    let mut out = body(doc);
    for path in paths {
        let (last, parents) = path.split_last().unwrap();
        let mut at = &mut out;
        for p in parents {
            at = at.get_mut(*p).unwrap();
        }
        at.as_object_mut().unwrap().shift_remove(*last);
    }
    out
}

async fn edits_between_upgrade_and_rollback_survive_and_the_complement_comes_back(
    backend: Backend,
) {
    let db = Db::new(backend).await;
    let original = db.load(300, 5).await;
    let (person_id, person0) = first_of(&original, "person", 0);
    let (report_id, report0) = first_of(&original, "data_record", 0);
    let (report2_id, report2_0) = first_of(&original, "data_record", 1);
    let (clinic_id, _) = first_of(&original, "clinic", 0);
    let last_name = person0["name"]
        .as_str()
        .unwrap()
        .split_once(' ')
        .unwrap()
        .1
        .to_owned();

    rewind_ok(&db, "upgrade", &[]).await;

    // Edits at version 7, as a v7 app writes them.
    let store = db.reopen().await;
    let mut p = get(&store, &person_id).await;
    assert_eq!(p["rewind"], 7, "{p}");
    p["first_name"] = json!("Zainab");
    put(&store, p).await;
    let mut r = get(&store, &report_id).await;
    assert!(r["fields"].get("legacy_code").is_none(), "{r}");
    r["fields"]["reviewed"] = json!(true);
    r["edited"] = json!("at v7");
    put(&store, r).await;
    let mut c = get(&store, &clinic_id).await;
    c["_deleted"] = json!(true);
    put(&store, c).await;
    put(
        &store,
        json!({"_id": "new-person", "type": "contact", "contact_type": "person",
               "first_name": "Zed", "last_name": "Quux", "sex": "m",
               "lineage": {"parent": {"_id": "clinic-9"}}, "rewind": 7}),
    )
    .await;
    put(
        &store,
        json!({"_id": "new-report", "type": "data_record", "form": "pnc_visit",
               "fields": {"patient_uuid": "p-1", "temp": 36.6}, "rewind": 7}),
    )
    .await;

    rewind_ok(&db, "rollback", &["--to", "0"]).await;
    let rolled = read_all(&db.store).await;
    assert_no_conflicts(&rolled, "after the rollback");

    // The edited person: the new first name is in `name`, the rest exact.
    let p = rolled[&person_id].winner.clone().unwrap();
    assert_eq!(p["name"], json!(format!("Zainab {last_name}")), "{p}");
    let mut expected = body(&person0);
    expected["name"] = p["name"].clone();
    assert_eq!(body(&p), expected, "the edited person translated down");
    assert_eq!(rolled[&person_id].generation(), 4);

    // The edited report: the edit kept, its own legacy code back.
    let r = rolled[&report_id].winner.clone().unwrap();
    assert_eq!(r["fields"]["legacy_code"], report0["fields"]["legacy_code"]);
    assert_eq!(r["fields"]["reviewed"], json!(true));
    assert_eq!(
        without(&r, &[&["edited"], &["fields", "reviewed"]]),
        body(&report0),
        "the edited report translated down"
    );

    // Deleted stays deleted.
    assert!(rolled[&clinic_id].deleted, "the deleted clinic came back");
    assert!(rolled[&clinic_id].live_leaves.is_empty());

    // Created at v7: translated down.
    let np = body(rolled["new-person"].winner.as_ref().unwrap());
    let mut np_expected = json!({"_id": "new-person", "type": "person", "name": "Zed Quux",
                                 "sex": "male", "parent": {"_id": "clinic-9"}});
    // The lens cannot know that `up` created `lineage` for this document (it
    // was created at v7, so there is no complement): an empty one stays.
    if np.get("lineage") == Some(&json!({})) {
        np_expected["lineage"] = json!({});
    }
    assert_eq!(np, np_expected, "the person created at v7, at v0");
    let nr = body(rolled["new-report"].winner.as_ref().unwrap());
    assert_eq!(
        nr,
        json!({"_id": "new-report", "type": "data_record", "form": "pnc_visit",
               "fields": {"patient_id": "p-1", "temp": 36.6, "legacy_code": null}}),
        "the report created at v7, at v0"
    );

    // Untouched documents: exact.
    for (id, o) in &original {
        if [&person_id, &report_id, &clinic_id].contains(&id) {
            continue;
        }
        let now = rolled[id].winner.as_ref().unwrap();
        assert_same_body(backend, id, now, o.winner.as_ref().unwrap(), "untouched");
        let expected_gen = if is_unaffected(id) { 1 } else { 3 };
        assert_eq!(rolled[id].generation(), expected_gen, "{id}");
    }

    // Re-upgrade: the edits go up again, the complement is consumed again.
    rewind_ok(&db, "upgrade", &[]).await;
    let up = read_all(&db.store).await;
    assert_no_conflicts(&up, "after the re-upgrade");
    let p = up[&person_id].winner.clone().unwrap();
    assert_eq!(p["first_name"], json!("Zainab"), "{p}");
    assert_eq!(p["last_name"], json!(last_name), "{p}");
    let r = up[&report_id].winner.clone().unwrap();
    assert!(r["fields"].get("legacy_code").is_none(), "{r}");
    assert_eq!(r["fields"]["reviewed"], json!(true));
    let np = up["new-person"].winner.clone().unwrap();
    assert_eq!(
        (
            &np["first_name"],
            &np["sex"],
            &np["lineage"]["parent"]["_id"]
        ),
        (&json!("Zed"), &json!("m"), &json!("clinic-9")),
        "{np}"
    );

    // Edit the second report at v7 (translate down needs the complement
    // kept by the re-upgrade), then roll back again.
    let store = db.reopen().await;
    let mut r2 = get(&store, &report2_id).await;
    r2["fields"]["notes"] = json!("edited after the re-upgrade");
    put(&store, r2).await;
    rewind_ok(&db, "rollback", &["--to", "0"]).await;
    let again = read_all(&db.store).await;
    assert_no_conflicts(&again, "after the second rollback");
    let r = again[&report_id].winner.clone().unwrap();
    assert_eq!(
        r["fields"]["legacy_code"], report0["fields"]["legacy_code"],
        "the complement came back after down, up, down: {r}"
    );
    let r2 = again[&report2_id].winner.clone().unwrap();
    assert_eq!(
        r2["fields"]["legacy_code"], report2_0["fields"]["legacy_code"],
        "{r2}"
    );
    let mut expected = body(&report2_0);
    expected["fields"]["notes"] = json!("edited after the re-upgrade");
    assert_eq!(
        body(&r2),
        expected,
        "the report edited after the re-upgrade"
    );
    for (id, o) in &original {
        if [&person_id, &report_id, &report2_id, &clinic_id].contains(&id) {
            continue;
        }
        let now = again[id].winner.as_ref().unwrap();
        assert_same_body(
            backend,
            id,
            now,
            o.winner.as_ref().unwrap(),
            "after two cycles",
        );
    }
    check_state(&db, 0).await;
}

/// Edits random documents until `stop`, each conditional on the revision it
/// read (retrying on 409), adding a marker field `edit_N`. Returns the
/// acknowledged edits.
async fn editor(
    store: AnyStore,
    ids: Vec<String>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Vec<(String, String)> {
    let mut rng = Rng(seed);
    let mut acked = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = &ids[rng.below(ids.len())];
        n += 1;
        let marker = format!("edit_{seed}_{n}");
        for _ in 0..100 {
            let mut doc = match store.get(id, &GetOptions::default()).await {
                Ok(d) => d.into_doc().unwrap(),
                Err(StoreError::NotFound { .. }) => break,
                Err(e) => panic!("editor get {id}: {e}"),
            };
            doc[&marker] = json!(n);
            let r = store.bulk_docs(vec![doc], true).await.unwrap().remove(0);
            match r.error.as_deref() {
                None => {
                    acked.push((id.clone(), marker.clone()));
                    break;
                }
                Some("conflict") => continue,
                Some(e) => panic!("editor write {id}: {e} {:?}", r.reason),
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    acked
}

/// Runs `rewind ARGS` while two editors edit; returns what the run printed
/// and the acknowledged edits.
///
/// The embedded store has one writer per process (it keeps the next
/// sequence in memory), so on it the editors and the engine share one
/// store in this process, and the engine runs as the binary would run it,
/// through the library. CouchDB takes the real binary.
async fn run_while_editing(
    db: &Db,
    command: &str,
    args: &[&str],
    ids: &[String],
    seed: u64,
) -> (String, Vec<(String, String)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut editors = Vec::new();
    for k in 0..2 {
        let store = match db.backend {
            Backend::Embedded => db.store.clone(),
            Backend::Couch => rewind_store::open(&db.target).await.unwrap(),
        };
        editors.push(tokio::spawn(editor(
            store,
            ids.to_vec(),
            stop.clone(),
            seed * 10 + k,
        )));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let out = match db.backend {
        Backend::Couch => {
            String::from_utf8_lossy(&rewind_ok(db, command, args).await.stdout).into_owned()
        }
        Backend::Embedded => {
            let opened = Database::open(&db.target).await.unwrap();
            let database = Database {
                data: db.store.clone(),
                state: opened.state,
                name: opened.name,
            };
            let to = if command == "upgrade" {
                set().latest()
            } else {
                0
            };
            let opts = rewind_engine::run::RunOptions {
                batch: 25,
                ..Default::default()
            };
            let finished = rewind_engine::run::run(&database, &set(), to, &opts, &mut |_| {})
                .await
                .unwrap_or_else(|e| panic!("{command} failed: {e}"));
            format!("{finished:?}")
        }
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for e in editors {
        acked.extend(e.await.unwrap());
    }
    (out, acked)
}

fn strip_markers(doc: &Value) -> Value {
    let mut out = body(doc);
    out.as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("edit_"));
    out
}

async fn concurrent_edits_during_upgrade_and_rollback_are_all_kept(backend: Backend) {
    let db = Db::new(backend).await;
    let set = set();
    let n = if backend == Backend::Embedded {
        1500
    } else {
        600
    };
    let original = db.load(n, 11).await;
    let ids: Vec<String> = original.keys().cloned().collect();

    let mut all_acked = Vec::new();
    for (step, (command, args)) in [
        ("upgrade", vec!["--batch", "25"]),
        ("rollback", vec!["--to", "0", "--batch", "25"]),
    ]
    .into_iter()
    .enumerate()
    {
        let (out, acked) = run_while_editing(&db, command, &args, &ids, 1 + step as u64).await;
        eprintln!(
            "{backend:?} {command}: {} edits acknowledged during the run\n{out}",
            acked.len(),
        );
        assert!(acked.len() > 20, "the editors barely ran: {}", acked.len());
        all_acked.extend(acked);
        let now = read_all(&db.store).await;
        assert_no_conflicts(&now, &format!("after the {command}"));
        let mut markers: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, m) in &all_acked {
            markers.entry(id).or_default().push(m);
        }
        let version = if command == "upgrade" { 7 } else { 0 };
        for (id, o) in &original {
            let w = now[id].winner.as_ref().unwrap();
            for m in markers.get(id.as_str()).into_iter().flatten() {
                assert!(
                    w.get(*m).is_some(),
                    "{id}: the acknowledged edit {m} is lost after the {command}: {w}"
                );
            }
            // Every document is in the run's version's shape, edits aside.
            let expected = translate(&set, o.winner.as_ref().unwrap(), 0, version);
            assert_eq!(
                strip_markers(w),
                strip_markers(&expected),
                "{id}: after the {command}, not in the shape of version {version}"
            );
        }
        check_state(&db, version).await;
    }
}

/// Progress of the run in progress (documents read), or `None` when no run
/// is in progress.
async fn progress(db: &Db) -> Option<u64> {
    db.state().await.run.map(|r| r.counts.read)
}

/// Runs `rewind ARGS` and kills it with SIGKILL after a random delay, again
/// and again, `kills` times, then lets it finish. Delays are drawn so the
/// kills spread over the whole run: each is random in [0, 2 × the estimated
/// remaining time / the kills left], so the kills
/// land all along the run, from start-up to the final state write. Returns
/// how many kills happened.
async fn crash_loop(db: &Db, args: &[String], kills: usize, total: u64, rng: &mut Rng) -> usize {
    // Documents per second of a run in batches of 50, to begin with.
    let rate = if db.backend == Backend::Embedded {
        1500.0
    } else {
        500.0
    };
    crash_loop_at(db, args, kills, total, rng, rate).await
}

/// [`crash_loop`] for a run expected to do about `rate` documents per
/// second at first.
async fn crash_loop_at(
    db: &Db,
    args: &[String],
    kills: usize,
    total: u64,
    rng: &mut Rng,
    rate: f64,
) -> usize {
    let mut done = 0;
    // Documents per second of work, learnt from the attempts.
    let mut rate = rate;
    let startup = 0.03;
    while done < kills {
        let read = progress(db).await.unwrap_or(0);
        let remaining = total.saturating_sub(read).max(total / 50) as f64 / rate;
        let window = 1.2 * (remaining + startup) / (kills - done + 1) as f64;
        let delay = Duration::from_secs_f64(rng.unit() * window);
        let started = Instant::now();
        let mut child = rewind(
            db.dir(),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() >= delay {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        match finished {
            Some(status) => {
                let out = child.wait_with_output().unwrap();
                assert!(
                    status.success(),
                    "a resumed run failed after {done} kills:\n{}",
                    text(&out)
                );
                eprintln!(
                    "{:?}: the run finished before kill {} (delay {delay:?})",
                    db.backend,
                    done + 1
                );
                return done;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                done += 1;
            }
        }
        let after = progress(db).await.unwrap_or(read);
        let worked = delay.as_secs_f64() - startup;
        if after > read && worked > 0.01 {
            rate = 0.5 * rate + 0.5 * ((after - read) as f64 / worked);
        }
    }
    if let Some(run) = db.state().await.run {
        // What an operator sees of the interrupted run.
        let status = run_output(rewind(db.dir(), &["status", "--db", &db.target])).await;
        let shown = String::from_utf8_lossy(&status.stdout).into_owned();
        let line = format!("run in progress: {} {} → {}", run.kind, run.from, run.to);
        let place = match &run.by_id {
            Some(pass) if !pass.after.is_empty() => format!("done up to {}", pass.after),
            Some(_) => "first pass (in id order) not started".to_owned(),
            None => format!("done up to sequence {}", run.since),
        };
        // The killed process's lease no longer holds: status says the run
        // stopped and how to finish it.
        let finish = format!(
            "stopped (its process ended without finishing): run `rewind {} --to {}` to finish it",
            run.kind, run.to
        );
        assert!(
            status.status.success()
                && shown.contains(&line)
                && shown.contains(&place)
                && shown.contains(&finish),
            "status after a kill should show {line:?}, {place:?} and {finish:?}:\n{}",
            text(&status)
        );
        let json = run_output(rewind(db.dir(), &["status", "--db", &db.target, "--json"])).await;
        let json: Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(json["running_now"], false, "{json}");
        assert_eq!(json["run"]["to"], run.to, "{json}");
    }
    let out = run_output(rewind(
        db.dir(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .await;
    // The last kill may land after the run recorded its end (its final
    // state write) but before the process exited: the run is then done, and
    // running it again says so (the callers check the state).
    let finished_before_kill = db.state().await.run.is_none()
        && String::from_utf8_lossy(&out.stderr).contains("is already at version");
    assert!(
        out.status.success() || finished_before_kill,
        "the run after {done} kills failed:\n{}",
        text(&out)
    );
    done
}

fn crash_kills() -> usize {
    std::env::var("REWIND_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn crash_seed() -> u64 {
    std::env::var("REWIND_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_261_125)
}

/// `rewind CMD` on `db` in batches of 50 (many checkpoints for kills to
/// land between), plus `extra`.
fn run_args(db: &Db, cmd: &str, extra: &[&str]) -> Vec<String> {
    run_args_in_batches(db, cmd, 50, extra)
}

fn run_args_in_batches(db: &Db, cmd: &str, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        cmd.to_owned(),
        "--db".into(),
        db.target.clone(),
        "--migrations".into(),
        migrations_arg(),
        "--batch".into(),
        batch.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn crash_docs(backend: Backend) -> u64 {
    // Enough for the kills (20 in CI, more in a soak) to land before a
    // (pipelined) run finishes.
    let per_kill = if backend == Backend::Embedded {
        300
    } else {
        150
    };
    per_kill * crash_kills().max(20) as u64
}

async fn kill_9_during_upgrade_migrates_every_document_exactly_once(backend: Backend) {
    let db = Db::new(backend).await;
    let set = set();
    let n = crash_docs(backend);
    let original = db.load(n, 7).await;
    let (kills, seed) = (crash_kills(), crash_seed());
    let mut rng = Rng(seed);
    let total = original.len() as u64;
    let done = crash_loop(&db, &run_args(&db, "upgrade", &[]), kills, total, &mut rng).await;
    let upgraded = read_all(&db.store).await;
    let migrated = check_upgraded(backend, &set, &original, &upgraded, 1);
    assert_eq!(migrated.len() as u64, n);
    check_journals(&db, &migrated).await;
    check_state(&db, 7).await;
    let resumed = db.state().await.history.last().map(|r| r.resumed);
    eprintln!("{backend:?}: upgrade killed {done} times (seed {seed}), resumed {resumed:?}");
    assert!(
        done >= kills,
        "only {done} of {kills} kills landed before the upgrade finished"
    );
}

/// Batches of 400 documents are translated on several threads (parts from
/// 256 leaves): killed there too, every document is migrated exactly once
/// and journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_upgrade_translated_on_every_core() {
    let backend = Backend::Embedded;
    let db = Db::new(backend).await;
    let set = set();
    let n = crash_docs(backend);
    let original = db.load(n, 11).await;
    let kills = crash_kills() / 2;
    let seed = crash_seed() + 2;
    let mut rng = Rng(seed);
    let args = run_args_in_batches(&db, "upgrade", 400, &[]);
    // Large batches go fast: the kills are spread for ~10,000 documents a second.
    let done = crash_loop_at(&db, &args, kills, original.len() as u64, &mut rng, 10_000.0).await;
    let upgraded = read_all(&db.store).await;
    let migrated = check_upgraded(backend, &set, &original, &upgraded, 1);
    assert_eq!(migrated.len() as u64, n);
    check_journals(&db, &migrated).await;
    check_state(&db, 7).await;
    eprintln!("{backend:?}: upgrade in batches of 400 killed {done} times (seed {seed})");
    assert!(
        done >= kills / 2,
        "only {done} of {kills} kills landed before the upgrade finished"
    );
}

async fn kill_9_during_rollback_restores_every_byte(backend: Backend) {
    let db = Db::new(backend).await;
    let set = set();
    let n = crash_docs(backend);
    let original = db.load(n, 7).await;
    rewind_ok(&db, "upgrade", &["--batch", "500"]).await;
    let migrated = check_upgraded(backend, &set, &original, &read_all(&db.store).await, 1);
    let (kills, seed) = (crash_kills(), crash_seed() + 1);
    let mut rng = Rng(seed);
    let total = original.len() as u64;
    let args = run_args(&db, "rollback", &["--to", "0"]);
    let done = crash_loop(&db, &args, kills, total, &mut rng).await;
    let rolled = read_all(&db.store).await;
    check_rolled_back(backend, &original, &rolled, &migrated, 3);
    check_state(&db, 0).await;
    let resumed = db.state().await.history.last().map(|r| r.resumed);
    eprintln!("{backend:?}: rollback killed {done} times (seed {seed}), resumed {resumed:?}");
    assert!(
        done >= kills,
        "only {done} of {kills} kills landed before the rollback finished"
    );
}

async fn two_concurrent_upgrades_one_wins_the_other_is_refused(backend: Backend) {
    let db = Db::new(backend).await;
    let lenses = set();
    let n = if backend == Backend::Embedded {
        3000
    } else {
        1500
    };
    let original = db.load(n, 13).await;
    let (a, b) = match backend {
        // Two processes on one embedded file fail inside SQLite before the
        // lease is reached (see `two_processes_upgrading_one_embedded_file`);
        // the lease itself is tested with two runs in this process.
        Backend::Embedded => {
            let opened = Database::open(&db.target).await.unwrap();
            let database = Database {
                data: db.store.clone(),
                state: opened.state,
                name: opened.name,
            };
            let opts = rewind_engine::run::RunOptions {
                batch: 50,
                ..Default::default()
            };
            let one = |database: Database, opts: rewind_engine::run::RunOptions| async move {
                rewind_engine::run::run(&database, &set(), 7, &opts, &mut |_| {})
                    .await
                    .map(|r| format!("{r:?}"))
                    .map_err(|e| e.to_string())
            };
            let (a, b) = tokio::join!(
                tokio::spawn(one(database.clone(), opts.clone())),
                tokio::spawn(one(database, opts))
            );
            (a.unwrap(), b.unwrap())
        }
        Backend::Couch => {
            let (a, b) = two_binaries_upgrading(&db).await;
            let result = |o: Output| {
                if o.status.success() {
                    Ok(text(&o))
                } else {
                    Err(text(&o))
                }
            };
            (result(a), result(b))
        }
    };
    let (winner, loser) = match (a, b) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        (a, b) => panic!("expected exactly one upgrade to succeed:\nA: {a:?}\nB: {b:?}"),
    };
    assert!(
        loser.contains("another run holds the lease"),
        "the loser's error does not say why:\n{loser}\n(winner: {winner})"
    );
    let upgraded = read_all(&db.store).await;
    check_upgraded(backend, &lenses, &original, &upgraded, 1);
    check_state(&db, 7).await;
}

async fn two_binaries_upgrading(db: &Db) -> (Output, Output) {
    let m = migrations_arg();
    let args = [
        "upgrade",
        "--db",
        &db.target,
        "--migrations",
        &m,
        "--batch",
        "50",
    ];
    let a = rewind(db.dir(), &args).spawn().unwrap();
    let b = rewind(db.dir(), &args).spawn().unwrap();
    tokio::task::spawn_blocking(move || {
        (a.wait_with_output().unwrap(), b.wait_with_output().unwrap())
    })
    .await
    .unwrap()
}

/// Known failure (store): two `rewind upgrade` processes on one embedded
/// file. The loser fails with "database is locked" (or "table meta already
/// exists" when the companion is created by both) instead of the lease
/// error; the embedded store keeps its next sequence in memory, so two
/// writing processes can also collide on `docs.seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "store: the embedded store supports one writing process per file"]
async fn two_processes_upgrading_one_embedded_file() {
    let db = Db::new(Backend::Embedded).await;
    db.load(3000, 13).await;
    let (a, b) = two_binaries_upgrading(&db).await;
    let loser = if a.status.success() { b } else { a };
    assert!(
        String::from_utf8_lossy(&loser.stderr).contains("another run holds the lease"),
        "{}",
        text(&loser)
    );
}

async fn a_changed_migration_file_is_refused_and_plan_writes_nothing(backend: Backend) {
    let db = Db::new(backend).await;
    let mdir = db.dir().join("migrations");
    std::fs::create_dir_all(&mdir).unwrap();
    for entry in std::fs::read_dir(cht_migrations()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, mdir.join(p.file_name().unwrap())).unwrap();
    }
    let m = mdir.to_string_lossy().into_owned();
    db.load(200, 17).await;
    let run = |args: Vec<&str>| {
        let mut all = vec![args[0], "--db", &db.target, "--migrations", &m];
        all.extend_from_slice(&args[1..]);
        run_output(rewind(db.dir(), &all))
    };
    // plan and status on a database rewind never ran on: no companion made.
    let plan = run(vec!["plan"]).await;
    assert!(plan.status.success(), "{}", text(&plan));
    assert!(text(&plan).contains("version 0 → 7"), "{}", text(&plan));
    let status = run_output(rewind(db.dir(), &["status", "--db", &db.target])).await;
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        text(&status).contains("schema version 0"),
        "{}",
        text(&status)
    );
    let companion = companion_target(&db.target);
    let made = || async {
        match db.backend {
            Backend::Embedded => {
                assert!(
                    !Path::new(&companion).exists(),
                    "a companion file beside the store"
                );
                rewind_store::SqliteStore::open(&db.target)
                    .unwrap()
                    .has_companion()
                    .await
                    .unwrap()
            }
            Backend::Couch => db.companion().await.exists().await.unwrap(),
        }
    };
    assert!(
        !made().await,
        "plan or status created the companion {companion}"
    );
    let out = run(vec!["upgrade", "--to", "3"]).await;
    assert!(out.status.success(), "{}", text(&out));
    // Embedded, the state and journal are tables in the store's own file.
    assert!(made().await, "upgrade left no companion");

    // plan writes nothing: not the documents, not the companion.
    let data_before = read_all(&db.store).await;
    let companion = db.companion().await;
    let companion_before = read_all(&companion).await;
    // Fresh handles: the embedded store serves update_seq from memory.
    let seqs = || async {
        (
            db.reopen().await.info().await.unwrap().update_seq,
            db.companion().await.info().await.unwrap().update_seq,
        )
    };
    let seq_before = seqs().await;
    for args in [
        vec!["plan"],
        vec!["plan", "--to", "7", "--json"],
        vec!["plan", "--to", "1"],
    ] {
        let out = run(args.clone()).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let revs = |all: &BTreeMap<String, Stored>| -> Vec<(String, String)> {
        all.iter()
            .map(|(k, s)| (k.clone(), s.rev.clone()))
            .collect()
    };
    assert_eq!(
        revs(&read_all(&db.store).await),
        revs(&data_before),
        "plan wrote documents"
    );
    assert_eq!(
        revs(&read_all(&companion).await),
        revs(&companion_before),
        "plan wrote to the companion"
    );
    let seq_after = seqs().await;
    assert_eq!(seq_before, seq_after, "plan moved a changes feed");

    // A migration applied and then changed: refused, with the file named.
    let file = mdir.join("0002-places-to-contacts.yaml");
    let edited = std::fs::read_to_string(&file).unwrap().replace(
        "Places (clinic, health_center)",
        "Places (clinics, health centres)",
    );
    std::fs::write(&file, edited).unwrap();
    let state_before = db.state().await;
    let out = run(vec!["upgrade"]).await;
    assert!(
        !out.status.success(),
        "a changed applied migration was accepted:\n{}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0002-places-to-contacts.yaml")
            && err.contains("changed after it was applied"),
        "unclear refusal:\n{err}"
    );
    assert_eq!(
        revs(&read_all(&db.store).await),
        revs(&data_before),
        "documents written"
    );
    let state_after = db.state().await;
    assert_eq!(state_after.version, 3);
    assert_eq!(state_after.applied, state_before.applied);
    assert!(state_after.run.is_none() && state_after.lease.is_none());
}

/// Which branch a leaf is on (a server may reorder keys: not by text).
fn branch_of(leaf: &Value) -> String {
    leaf.get("branch").map(Value::to_string).unwrap_or_default()
}

/// The live leaves of each document, by branch: their bodies.
fn leaves_by_rev(all: &BTreeMap<String, Stored>, ids: &[String]) -> BTreeMap<String, Vec<Value>> {
    ids.iter()
        .map(|id| {
            let mut leaves: Vec<Value> = all[id].live_leaves.iter().map(body).collect();
            leaves.sort_by_key(branch_of);
            (id.clone(), leaves)
        })
        .collect()
}

async fn every_live_leaf_of_a_conflicted_document_is_migrated_and_restored(backend: Backend) {
    let db = Db::new(backend).await;
    let set = set();
    let original = db.load(120, 13).await;
    // A second branch (another root, as a replication from a phone that
    // created the same id writes it) on some documents of each type.
    let mut ids = Vec::new();
    let mut branches = Vec::new();
    for (ty, k) in [
        ("person", 0),
        ("person", 1),
        ("data_record", 0),
        ("clinic", 0),
    ] {
        let (id, winner) = first_of(&original, ty, k);
        let mut branch = body(&winner);
        branch["branch"] = json!(format!("b-{id}"));
        let hash = format!("{:032x}", 0xabcdef_u128 + ids.len() as u128);
        branch["_rev"] = json!(format!("1-{hash}"));
        branch["_revisions"] = json!({"start": 1, "ids": [hash]});
        branches.push(branch);
        ids.push(id);
    }
    let store = db.reopen().await;
    let failed = store.bulk_docs(branches, false).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    let before = read_all(&store).await;
    let before_leaves = leaves_by_rev(&before, &ids);
    for id in &ids {
        assert_eq!(before_leaves[id].len(), 2, "{id}: two live leaves");
    }

    rewind_ok(&db, "upgrade", &["--batch", "16"]).await;
    let upgraded = leaves_by_rev(&read_all(&db.reopen().await).await, &ids);
    for id in &ids {
        let mut expected: Vec<Value> = before_leaves[id]
            .iter()
            .map(|l| translate(&set, l, 0, 7))
            .collect();
        expected.sort_by_key(branch_of);
        let got: Vec<Value> = upgraded[id]
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.as_object_mut().unwrap().shift_remove("rewind");
                l
            })
            .collect();
        let expected: Vec<Value> = expected
            .into_iter()
            .map(|mut l| {
                l.as_object_mut().unwrap().shift_remove("rewind");
                l
            })
            .collect();
        let mut got = got;
        got.sort_by_key(branch_of);
        assert_eq!(got, expected, "{id}: every leaf migrated, no leaf added");
    }

    rewind_ok(&db, "rollback", &["--to", "0", "--batch", "16"]).await;
    let rolled = leaves_by_rev(&read_all(&db.reopen().await).await, &ids);
    for id in &ids {
        assert_eq!(rolled[id], before_leaves[id], "{id}: every leaf restored");
    }
}
