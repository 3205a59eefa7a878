//! The `rewind` binary as a user runs it: check, translate, sample.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn rewind() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rewind"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cht")
}

fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `cmd`, asserts it succeeded (showing its output if not), and
/// returns its standard output.
fn stdout_of_success(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The winning revision of every document of the store at `path`, without
/// `_rev`, by id.
fn winners(path: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
    let path = path.to_owned();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let store = rewind_store::open(&path).await.unwrap();
            let all = rewind_store::Store::all_docs(
                &store,
                &rewind_store::AllDocsOptions {
                    include_docs: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            all.rows
                .into_iter()
                .map(|row| {
                    let mut doc = row.doc.unwrap();
                    doc.as_object_mut().unwrap().shift_remove("_rev");
                    (row.key, doc)
                })
                .collect()
        })
}

fn sample(n: u32) -> Vec<u8> {
    let out = rewind()
        .args(["sample", "--docs", &n.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn check_passes_on_the_example_migrations_with_a_sample() {
    let dir = tempfile::tempdir().unwrap();
    let sample_file = dir.path().join("sample.jsonl");
    std::fs::write(&sample_file, sample(1000)).unwrap();
    let stdout = stdout_of_success(
        rewind()
            .arg("check")
            .arg("--migrations")
            .arg(examples())
            .arg("--sample")
            .arg(&sample_file),
    );
    assert!(stdout.contains("0007-split-name"), "{stdout}");
    assert!(stdout.contains("laws hold"), "{stdout}");
}

#[test]
fn check_refuses_a_bad_file_with_its_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("0001-bad.yaml"),
        "description: x\nwhen: {type: a}\nup:\n  - remove: {path: legacy}\n",
    )
    .unwrap();
    let out = rewind()
        .arg("check")
        .arg("--migrations")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0001-bad.yaml:4:5: `remove` needs a `default`"),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_broken_law_with_a_counterexample() {
    let dir = tempfile::tempdir().unwrap();
    // `down` joins with a comma: not the reverse of `up`.
    std::fs::write(
        dir.path().join("0001-broken.yaml"),
        "description: x\nwhen: {type: a}\nup:\n  - custom: {up: 'd => { d.n = String(d.n) + \"!\"; return d }', down: 'd => d'}\nwhen_after: {type: a}\n",
    )
    .unwrap();
    let out = rewind()
        .arg("check")
        .arg("--migrations")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("down(up(doc)) = doc fails"), "{stderr}");
}

#[test]
fn check_refuses_a_step_whose_complement_undoes_an_edit_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // Upper-cases `code`, keeping the original aside, and puts the original
    // back going down whatever `code` has become.
    std::fs::write(
        dir.path().join("0001-upper.yaml"),
        concat!(
            "description: x\nwhen: {type: a}\nwhen_after: {type: a}\nup:\n  - custom:\n",
            "      up: '(d, kept, keep) => { if (typeof d.code === \"string\") { keep.code = d.code; d.code = d.code.toUpperCase() } return d }'\n",
            "      down: '(d, kept) => { if (\"code\" in kept) d.code = kept.code; return d }'\n",
        ),
    )
    .unwrap();
    let sample = dir.path().join("sample.jsonl");
    std::fs::write(&sample, "{\"_id\":\"s\",\"type\":\"a\",\"code\":\"ab\"}\n").unwrap();
    let out = rewind()
        .arg("check")
        .arg("--migrations")
        .arg(dir.path())
        .arg("--sample")
        .arg(&sample)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "an edit in the new shape survives going down with the complement fails for s"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint:     what the step kept aside undid the edit"),
        "{stderr}"
    );
}

#[test]
fn translate_up_then_down_with_the_same_complements_gives_back_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let complements = dir.path().join("complements.jsonl");
    let mut input = sample(500);
    input.extend_from_slice(
        r#"{"_id":"odd","type":"person","name":"Ann  Lee ","n":1e400,"m":12345678901234567890,"f":1.10,"u":"é🩺"}"#.as_bytes(),
    );
    input.push(b'\n');
    let mut up = rewind();
    up.args(["translate", "--from", "0", "--to", "7", "--migrations"])
        .arg(examples())
        .arg("--complements")
        .arg(&complements);
    let up = run_with_stdin(up, &input);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_ne!(up.stdout, input);
    let mut down = rewind();
    down.args(["translate", "--from", "7", "--to", "0", "--migrations"])
        .arg(examples())
        .arg("--complements")
        .arg(&complements);
    let down = run_with_stdin(down, &up.stdout);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let (got, want) = (
        String::from_utf8_lossy(&down.stdout),
        String::from_utf8_lossy(&input),
    );
    for (g, w) in got.lines().zip(want.lines()) {
        assert_eq!(g, w);
    }
    assert_eq!(got.lines().count(), want.lines().count());
}

#[test]
fn translate_refuses_bad_input_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let complements = dir.path().join("complements.jsonl");
    let mut cmd = rewind();
    cmd.args(["translate", "--from", "0", "--to", "2", "--migrations"])
        .arg(examples())
        .arg("--complements")
        .arg(&complements);
    let out = run_with_stdin(cmd, b"{\"_id\":\"a\",\"type\":\"person\"}\n{not json}\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin:2"));
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read(&complements).unwrap_or_default(), b"");
    let mut cmd = rewind();
    cmd.args(["translate", "--from", "0", "--to", "99", "--migrations"])
        .arg(examples());
    let out = run_with_stdin(cmd, b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("version 99 does not exist"));
}

#[test]
fn sample_is_deterministic_and_prefix_stable() {
    let a = sample(100);
    let b = sample(200);
    assert_eq!(a, b[..a.len()]);
    let seeded = rewind()
        .args(["sample", "--docs", "100", "--seed", "2"])
        .output()
        .unwrap();
    assert_ne!(seeded.stdout, a);
}

/// Runs `rewind drill --kill` with `devices` phones and `seed`, and checks
/// that every invariant holds and that at least one SIGKILL landed.
fn drill_with_kill_holds(devices: &str, seed: &str) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let text = stdout_of_success(
        rewind()
            .args([
                "drill",
                "--docs",
                "100",
                "--devices",
                devices,
                "--seed",
                seed,
                "--kill",
                "--report",
            ])
            .arg(&report),
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["holds"], serde_json::Value::Bool(true), "{text}");
    let kills = report["kills"].as_u64().unwrap_or(0);
    assert!(kills >= 1, "no SIGKILL landed: {text}");
}

/// `rewind drill --kill`: the engine runs as child processes SIGKILLed at
/// random points, the drill still holds every invariant, and the report
/// says how many kills landed (none landed once the engine got faster than
/// the drill's delays: this checks they do).
#[test]
fn the_drill_with_kill_sigkills_the_engine_and_holds() {
    drill_with_kill_holds("3", "2");
}

/// The same with five phones (two following `/medic`, three pinned, two of
/// which move up and then follow): more edits and copies in flight. A
/// presentation whose ids depended on how many distinct views a document
/// had passed the three-phone drill and failed this one (docs/design.md,
/// "Known limits").
#[test]
fn the_drill_with_five_phones_and_kill_holds() {
    drill_with_kill_holds("5", "700");
}

/// An embedded store of `docs` sample documents in a temporary directory
/// (kept while the first value lives), its path, and the example migrations.
fn sampled_store(docs: &str) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db").display().to_string();
    stdout_of_success(rewind().args(["sample", "--docs", docs, "--db", &db]));
    (dir, db, examples().display().to_string())
}

/// `rewind ARGS --db DB --migrations MIGRATIONS`.
fn on_store(args: &[&str], db: &str, migrations: &str) -> Command {
    let mut cmd = rewind();
    cmd.args(args)
        .args(["--db", db, "--migrations", migrations]);
    cmd
}

/// `rewind sample --db` run again or with more documents adds only what is
/// missing; into a database whose sample documents have moved on (here:
/// upgraded), it is refused and writes nothing.
#[test]
fn sample_into_a_database_extends_it_or_refuses_and_writes_nothing() {
    let (_dir, db, migrations) = sampled_store("30");
    let out = stdout_of_success(rewind().args(["sample", "--docs", "1200", "--db", &db]));
    assert!(
        out.contains("1170 documents written") && out.contains("30 were there already"),
        "{out}"
    );
    let out = stdout_of_success(rewind().args(["sample", "--docs", "1200", "--db", &db]));
    assert!(
        out.contains("0 documents written") && out.contains("1200 were there"),
        "{out}"
    );
    assert_eq!(winners(&db).len(), 1200);
    stdout_of_success(&mut on_store(&["upgrade"], &db, &migrations));
    let upgraded = winners(&db);
    let out = rewind()
        .args(["sample", "--docs", "1500", "--db", &db])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("already holds it with another body"),
        "{stderr}"
    );
    assert_eq!(winners(&db), upgraded, "a refused sample wrote");
}

/// The drill refuses fewer phones than its scenario has parts for, before
/// it does anything.
#[test]
fn the_drill_refuses_too_few_phones() {
    let out = rewind().args(["drill", "--devices", "2"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("at least 3 phones"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And its help still teaches what it does.
    let help = stdout_of_success(rewind().args(["drill", "--help"]));
    assert!(help.contains("Rehearse the disaster"), "{help}");
}

/// A rollback's plan shows what the rollback does: each step translated
/// down with the complement the journal kept (a removed field comes back
/// with each document's own value, not the step's default), and a field
/// that is absent on one side shows as absent, not as `null`.
#[test]
fn a_rollback_plan_shows_the_values_the_rollback_restores() {
    let (_dir, db, migrations) = sampled_store("80");
    let original = winners(&db);
    stdout_of_success(&mut on_store(&["upgrade"], &db, &migrations));
    let plan_of = |json: bool| {
        let mut cmd = on_store(&["plan", "--to", "4"], &db, &migrations);
        if json {
            cmd.arg("--json");
        }
        stdout_of_success(&mut cmd)
    };
    let plan: serde_json::Value = serde_json::from_str(&plan_of(true)).unwrap();
    let removal = plan["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "0005-remove-legacy-code")
        .expect("the plan rolls back 0005");
    let samples = removal["samples"].as_array().unwrap();
    assert!(!samples.is_empty(), "{removal}");
    let text = plan_of(false);
    assert!(
        text.contains("fields.legacy_code: - (absent)  + \""),
        "{text}"
    );
    stdout_of_success(&mut on_store(&["rollback", "--to", "4"], &db, &migrations));
    let rolled = winners(&db);
    for sample in samples {
        let id = sample["id"].as_str().unwrap();
        let field = sample["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f[0] == "fields.legacy_code")
            .unwrap_or_else(|| panic!("{id}: no legacy_code in {sample}"));
        let kept = &original[id]["fields"]["legacy_code"];
        assert!(
            kept.is_string(),
            "{id}: the sample has no legacy_code to restore"
        );
        assert_eq!(field[1], serde_json::Value::Null, "{id}: absent before");
        assert_eq!(&field[2], kept, "{id}: the plan restores another value");
        assert_eq!(
            &rolled[id]["fields"]["legacy_code"], kept,
            "{id}: the rollback"
        );
    }
}

/// `rewind rollback --to N` above the database's version, and `rewind
/// upgrade --to N` below it, are refused with the command that goes that
/// way, and write nothing.
#[test]
fn upgrade_and_rollback_refuse_to_go_the_other_way() {
    let (_dir, db, migrations) = sampled_store("40");
    let refused = |args: &[&str], told: &str| {
        let out = on_store(args, &db, &migrations).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was not refused: {stderr}");
        assert!(stderr.contains(told), "{args:?}: {stderr}");
    };
    let status = || stdout_of_success(rewind().args(["status", "--db", &db]));
    let before = status();
    refused(&["rollback", "--to", "3"], "run `rewind upgrade --to 3`");
    assert_eq!(status(), before, "a refused rollback changed the state");
    assert!(before.contains("schema version 0"), "{before}");
    stdout_of_success(&mut on_store(&["upgrade", "--to", "3"], &db, &migrations));
    let upgraded = status();
    refused(&["upgrade", "--to", "1"], "run `rewind rollback --to 1`");
    assert_eq!(status(), upgraded, "a refused upgrade changed the state");
    stdout_of_success(&mut on_store(&["rollback", "--to", "1"], &db, &migrations));
    assert!(status().contains("schema version 1"), "{}", status());
}

/// A missing migrations directory is named with what to do, and nothing
/// is written; an error's cause is said once (errors that print their
/// source in their own message were printed with it twice).
#[test]
fn a_missing_migrations_directory_is_named_once_with_what_to_do() {
    let (dir, db, _) = sampled_store("10");
    let status = || stdout_of_success(rewind().args(["status", "--db", &db]));
    let before = status();
    let missing = dir.path().join("no-such-dir").display().to_string();
    for args in [&["upgrade"][..], &["plan"], &["rollback", "--to", "0"]] {
        let out = on_store(args, &db, &missing).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(&missing), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no such migrations directory"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("--migrations DIR"), "{args:?}: {stderr}");
    }
    assert_eq!(status(), before, "a refused command changed the state");
    // A file that is not readable as text: its path and the reason, once.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("0001-x.yaml"), [0xff, 0xfe, 0x00]).unwrap();
    let out = rewind()
        .args(["check", "--migrations"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("0001-x.yaml"), "{stderr}");
    assert_eq!(stderr.matches("UTF-8").count(), 1, "{stderr}");
}

/// `rewind serve --couch` with something that is not a URL stops at once
/// with what was expected, instead of serving 503s.
#[test]
fn serve_refuses_a_couch_target_that_is_not_a_url() {
    let out = rewind()
        .args([
            "serve",
            "--couch",
            "localhost:5984",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--migrations")
        .arg(examples())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--couch localhost:5984: not an http:// or https:// URL"),
        "{stderr}"
    );
}

/// `rewind copy --with-companion`: the copy keeps the schema version and
/// the journal, so it can be rolled back exactly like the original; a copy
/// without it starts with no state (version 0) and says nothing is lost
/// only when there was nothing to copy.
#[test]
fn a_copy_with_its_companion_rolls_back_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let db = |name: &str| dir.path().join(name).display().to_string();
    let migrations = examples().display().to_string();
    stdout_of_success(rewind().args(["sample", "--docs", "300", "--db", &db("a.db")]));
    let fresh = stdout_of_success(rewind().args([
        "copy",
        "--with-companion",
        &db("a.db"),
        &db("fresh.db"),
    ]));
    assert!(fresh.contains("has no companion"), "{fresh}");
    stdout_of_success(rewind().args(["copy", &db("a.db"), &db("original.db")]));
    stdout_of_success(rewind().args(["upgrade", "--db", &db("a.db"), "--migrations", &migrations]));

    // A batch of 7: many pages, of migrated documents (fetched with their
    // history) and of first-revision journals (written from the feed).
    let refused = rewind()
        .args(["copy", "--batch", "0", &db("a.db"), &db("b.db")])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("at least 1"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        !dir.path().join("b.db").exists(),
        "a refused copy made a file"
    );
    let copied = stdout_of_success(rewind().args([
        "copy",
        "--with-companion",
        "--batch",
        "7",
        &db("a.db"),
        &db("b.db"),
    ]));
    assert!(
        copied.contains(&format!("{} → {}", db("a.db-rewind"), db("b.db-rewind"))),
        "{copied}"
    );
    assert!(
        !dir.path().join("b.db-rewind").exists(),
        "the companion made a file"
    );
    let status = |name: &str| stdout_of_success(rewind().args(["status", "--db", &db(name)]));
    assert!(
        status("b.db").contains("schema version 7"),
        "{}",
        status("b.db")
    );
    stdout_of_success(rewind().args(["copy", &db("a.db"), &db("c.db")]));
    assert!(
        status("c.db").contains("schema version 0"),
        "{}",
        status("c.db")
    );

    // The copy rolls back to the original bodies, byte for byte.
    stdout_of_success(rewind().args([
        "rollback",
        "--db",
        &db("b.db"),
        "--to",
        "0",
        "--migrations",
        &migrations,
    ]));
    let bodies = |name: &str| {
        winners(&db(name))
            .into_values()
            .map(|doc| doc.to_string())
            .collect::<Vec<String>>()
    };
    let (rolled, original) = (bodies("b.db"), bodies("original.db"));
    assert_eq!(rolled.len(), 300);
    assert!(
        rolled == original,
        "the copy's rollback differs from the original bodies"
    );
}

/// After a command exits, the `.db` file alone holds every commit (its
/// write-ahead log emptied into it): a plain `cp` of the file, without the
/// `-wal` beside it, is a complete copy.
#[test]
fn a_plain_copy_of_the_file_after_a_command_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let db = |name: &str| path(name).display().to_string();
    let migrations = examples().display().to_string();
    let wal_is_empty = |name: &str| {
        let wal = path(&format!("{name}-wal"));
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0
    };
    stdout_of_success(rewind().args(["sample", "--docs", "3000", "--db", &db("a.db")]));
    assert!(wal_is_empty("a.db"), "rewind sample left a write-ahead log");
    stdout_of_success(rewind().args(["upgrade", "--db", &db("a.db"), "--migrations", &migrations]));
    assert!(
        wal_is_empty("a.db"),
        "rewind upgrade left a write-ahead log"
    );

    std::fs::create_dir(path("copy")).unwrap();
    std::fs::copy(path("a.db"), path("copy/a.db")).unwrap();
    let status = stdout_of_success(rewind().args(["status", "--db", &db("copy/a.db")]));
    assert!(status.contains("schema version 7"), "{status}");
    let rolled = stdout_of_success(rewind().args([
        "rollback",
        "--db",
        &db("copy/a.db"),
        "--to",
        "0",
        "--migrations",
        &migrations,
    ]));
    assert!(rolled.contains("3000"), "{rolled}");
}

/// `rewind hash-password --help` shows its rewind.toml example as lines a
/// user can paste (a wrapped paragraph made it one line, not TOML).
#[test]
fn hash_password_help_shows_a_pasteable_config_entry() {
    let help = stdout_of_success(rewind().args(["hash-password", "--help"]));
    assert!(
        help.contains("  [[users]]\n  name = \"chw1\"\n  password = \"<the printed hash>\"\n"),
        "{help}"
    );
    let hash = String::from_utf8(
        run_with_stdin(
            {
                let mut cmd = rewind();
                cmd.arg("hash-password");
                cmd
            },
            b"secret\n",
        )
        .stdout,
    )
    .unwrap();
    let (salt, digest) = hash.trim().split_once('$').unwrap();
    assert!(!salt.is_empty() && digest.len() == 64, "{hash}");
}

/// A database file in a directory that does not exist is refused naming
/// the directory, and nothing is made.
#[test]
fn a_database_in_a_missing_directory_names_the_directory() {
    let (dir, db, _) = sampled_store("5");
    let missing = dir.path().join("rehearsal");
    let target = missing.join("medic.db").display().to_string();
    for args in [
        vec!["copy", db.as_str(), target.as_str()],
        vec!["sample", "--docs", "3", "--db", target.as_str()],
    ] {
        let out = rewind().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("directory {}: not found", missing.display())),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("make the directory first"),
            "{args:?}: {stderr}"
        );
    }
    assert!(!missing.exists());
}
