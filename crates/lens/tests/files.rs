//! Migration files: what is refused, where, and why; and what a valid file does.

use rewind_lens::{LensError, Migration, MigrationSet, StepOutcome};
use serde_json::{json, Value};
use std::path::Path;

fn parse(text: &str) -> Result<Migration, LensError> {
    Migration::parse(Path::new("0001-test.yaml"), text)
}

fn refused(text: &str) -> (u64, String) {
    match parse(text) {
        Err(LensError::Invalid { line, reason, .. }) => (line, reason),
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(_) => panic!("expected the file to be refused:\n{text}"),
    }
}

#[test]
fn malformed_and_irreversible_files_are_refused_with_line_and_reason() {
    let cases: &[(&str, u64, &str)] = &[
        ("description: x\nwhen: {type: a}\nup:\n  - renam: {from: a, to: b}\n", 4, "unknown variant `renam`"),
        ("description: x\nwhen: {type: a}\nup:\n  - add: {path: x, value: 1, extra: 2}\n", 4, "unknown field `extra`"),
        ("description: x\nwhen: {type: a}\nup:\n  - add: {path: x}\n", 4, "`add` needs a `value`"),
        ("description: x\nwhen: {type: a}\nup:\n  - add: {path: x, value: 1}\n  - remove: {path: y}\n", 5, "`remove` needs a `default`"),
        ("description: x\nwhen: {type: a}\nup:\n  - add: {path: x, value: 1}\n  - rename: {from: a, to: x.y}\n", 5, "earlier operation of this step writes"),
        ("description: x\nwhen: {type: a}\nup:\n  - convert: {path: s, map: {m: x, f: x}}\n", 4, "not one-to-one"),
        ("description: x\nwhen: {type: a, legacy: 1}\nup:\n  - remove: {path: legacy, default: null}\n", 2, "`when_after` cannot be derived"),
        ("description: x\nwhen: {type: a}\nup:\n  - custom: {up: 'function (d) { return d', down: 'd => d'}\nwhen_after: {type: a}\n", 4, "`up` does not compile"),
        ("description: x\nwhen: {type: a}\nup:\n  - custom: {up: 'd => d', down: 'd => d'}\n", 2, "`when_after` cannot be derived"),
        ("description: x\nwhen: {type: {$regex: a}}\nup:\n  - add: {path: x, value: 1}\n", 2, "unsupported condition `$regex`"),
        ("description: x\nwhen: [1\n", 2, "unclosed bracket"),
        ("description: x\nwhen: {type: a}\nup: []\n", 3, "lists no operation"),
        ("description: x\nwhen: {type: a}\nup:\n  - rename: {from: a, to: a.b}\n", 4, "overlap"),
        ("description: x\nwhen: {type: a}\nup:\n  - wrap: {path: a}\n", 4, "exactly one of `key"),
        ("description: x\nwhen: {type: a}\nup:\n  - rename: {from: 'a..b', to: c}\n", 4, "not a dotted field path"),
    ];
    for (text, line, reason) in cases {
        let (found_line, found_reason) = refused(text);
        assert!(found_reason.contains(reason), "{text}\n=> {found_reason}");
        assert_eq!(found_line, *line, "{text}\n=> {found_reason}");
    }
}

#[test]
fn the_error_names_file_line_and_column() {
    let err = parse("description: x\nwhen: {type: a}\nup:\n  - renam: {}\n").unwrap_err();
    assert!(err.to_string().starts_with("0001-test.yaml:4:5: "), "{err}");
}

fn set(texts: &[&str]) -> MigrationSet {
    let files: Vec<_> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                Path::new(&format!("{:04}-m.yaml", i + 1)).to_path_buf(),
                t.to_string(),
            )
        })
        .collect();
    MigrationSet::parse_files(&files, "rewind").unwrap()
}

fn text(v: &Value) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
fn rename_into_a_missing_parent_creates_it_and_down_removes_it_again() {
    let s = set(&[
        "description: x\nwhen: {type: a}\nup:\n  - rename: {from: parent, to: lineage.parent}\n",
    ]);
    let original = json!({"_id": "d", "type": "a", "parent": {"_id": "p"}, "z": 1});
    let mut doc = original.clone();
    let StepOutcome::Applied(kept) = s.up_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    assert_eq!(
        text(&doc),
        r#"{"_id":"d","type":"a","z":1,"lineage":{"parent":{"_id":"p"}},"rewind":1}"#
    );
    s.down_step(1, &mut doc, kept.as_ref()).unwrap();
    assert_eq!(text(&doc), text(&original));
}

#[test]
fn a_document_made_in_the_new_shape_goes_down_without_the_parent_up_creates() {
    let s = set(&[
        "description: x\nwhen: {type: a}\nup:\n  - rename: {from: parent, to: lineage.parent}\n",
    ]);
    // Made at version 1 (a phone on the new app): no complement.
    let made =
        json!({"_id": "d", "type": "a", "lineage": {"parent": {"_id": "p"}}, "z": 1, "rewind": 1});
    let mut doc = made.clone();
    let StepOutcome::Applied(kept) = s.down_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    assert_eq!(
        text(&doc),
        r#"{"_id":"d","type":"a","z":1,"parent":{"_id":"p"}}"#
    );
    // Going up again with what down kept: the same bytes, `lineage` where it stood.
    s.up_step(1, &mut doc, kept.as_ref()).unwrap();
    assert_eq!(text(&doc), text(&made));
}

#[test]
fn a_parent_object_that_was_there_empty_before_up_is_there_after_down() {
    let s = set(&[
        "description: x\nwhen: {type: a}\nup:\n  - rename: {from: parent, to: lineage.parent}\n",
    ]);
    let original = json!({"_id": "d", "type": "a", "lineage": {}, "parent": {"_id": "p"}});
    let mut doc = original.clone();
    let StepOutcome::Applied(kept) = s.up_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    assert!(kept.is_some(), "up records that it created no parent");
    s.down_step(1, &mut doc, kept.as_ref()).unwrap();
    assert_eq!(text(&doc), text(&original));
}

#[test]
fn an_added_nested_field_goes_down_with_its_parent_for_a_document_made_in_the_new_shape() {
    let s =
        set(&["description: x\nwhen: {type: a}\nup:\n  - add: {path: meta.flag, value: true}\n"]);
    let made = json!({"_id": "d", "type": "a", "meta": {"flag": true}, "z": 1, "rewind": 1});
    let mut doc = made.clone();
    let StepOutcome::Applied(kept) = s.down_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    assert_eq!(text(&doc), r#"{"_id":"d","type":"a","z":1}"#);
    s.up_step(1, &mut doc, kept.as_ref()).unwrap();
    assert_eq!(text(&doc), text(&made));
}

#[test]
fn numbers_keep_their_text_and_unmatched_documents_are_untouched() {
    let s = set(&["description: x\nwhen: {type: a}\nup:\n  - rename: {from: n, to: m}\n"]);
    let (mut doc, style) = rewind_lens::json_text::parse(
        r#"{"_id":"d","type":"a","n":12345678901234567890,"f":1.10,"e":1e400}"#,
    )
    .unwrap();
    s.translate(&mut doc, 0, 1, &mut rewind_lens::migration::NoComplements)
        .unwrap();
    assert_eq!(
        rewind_lens::json_text::to_string(&doc, style),
        r#"{"_id":"d","type":"a","m":12345678901234567890,"f":1.10,"e":1e400,"rewind":1}"#
    );
    let mut other = json!({"_id": "o", "type": "b", "n": 1});
    s.translate(&mut other, 0, 1, &mut rewind_lens::migration::NoComplements)
        .unwrap();
    assert_eq!(other, json!({"_id": "o", "type": "b", "n": 1}));
}

#[test]
fn remove_keeps_the_value_and_down_without_complement_uses_the_default() {
    let s =
        set(&["description: x\nwhen: {type: a}\nup:\n  - remove: {path: code, default: none}\n"]);
    let original = json!({"_id": "d", "type": "a", "code": "A1", "x": 2});
    let mut doc = original.clone();
    let StepOutcome::Applied(kept) = s.up_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    assert_eq!(doc, json!({"_id": "d", "type": "a", "x": 2, "rewind": 1}));
    let mut exact = doc.clone();
    s.down_step(1, &mut exact, kept.as_ref()).unwrap();
    assert_eq!(text(&exact), text(&original));
    let mut fresh = json!({"_id": "n", "type": "a", "rewind": 1});
    s.down_step(1, &mut fresh, None).unwrap();
    assert_eq!(fresh, json!({"_id": "n", "type": "a", "code": "none"}));
}

#[test]
fn a_non_injective_convert_restores_the_original_from_the_complement() {
    let s = set(&["description: x\nwhen: {type: a}\nup:\n  - convert: {path: s, map: {m: male, man: male, f: female}, reverse: {male: m}}\n"]);
    let mut doc = json!({"_id": "d", "type": "a", "s": "man"});
    let StepOutcome::Applied(kept) = s.up_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    assert_eq!(doc["s"], "male");
    let mut back = doc.clone();
    s.down_step(1, &mut back, kept.as_ref()).unwrap();
    assert_eq!(back["s"], "man");
    let mut fresh = doc.clone();
    s.down_step(1, &mut fresh, None).unwrap();
    assert_eq!(fresh["s"], "m");
}

#[test]
fn an_edit_of_a_collapsed_value_goes_down_as_edited_not_as_the_complement_kept() {
    let s = set(&["description: x\nwhen: {type: a}\nup:\n  - convert: {path: s, map: {m: male, man: male, f: female}, reverse: {male: m}}\n"]);
    let mut doc = json!({"_id": "d", "type": "a", "s": "man"});
    let StepOutcome::Applied(kept) = s.up_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    // Edited in the new shape: the value kept ("man") no longer converts
    // to what is there.
    doc["s"] = json!("female");
    s.down_step(1, &mut doc, kept.as_ref()).unwrap();
    assert_eq!(doc["s"], "f");
    let report = rewind_lens::laws::check_laws(&s, &[], 512);
    assert!(report[0].broken.is_empty(), "{:?}", report[0].broken);
}

#[test]
fn a_value_that_already_looked_converted_is_left_alone_only_while_unedited() {
    let s = set(&["description: x\nwhen: {type: a}\nup:\n  - convert: {path: sex, map: {male: m, female: f}}\n"]);
    // A v0 document already holding the new code: left alone going up.
    let mut doc = json!({"_id": "d", "type": "a", "sex": "m"});
    let StepOutcome::Applied(kept) = s.up_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    assert_eq!(doc["sex"], "m");
    let mut back = doc.clone();
    s.down_step(1, &mut back, kept.as_ref()).unwrap();
    assert_eq!(back["sex"], "m", "left alone going down too");
    // Edited at the new version: converted down like any other value.
    doc["sex"] = json!("f");
    s.down_step(1, &mut doc, kept.as_ref()).unwrap();
    assert_eq!(doc["sex"], "female");
    // A record from before the value was kept (`keep: true`) still leaves it alone.
    let mut old = json!({"_id": "d", "type": "a", "sex": "f", "rewind": 1});
    s.down_step(1, &mut old, Some(&json!({"ops": {"0": {"keep": true}}})))
        .unwrap();
    assert_eq!(old["sex"], "f");
}

/// A name split whose complement comes back whatever the names have become
/// (examples/cht 0007 as first written).
const SPLIT_HIDING_EDITS: &str = r#"description: x
when: {type: person, name: {$exists: true}}
when_after: {type: person, first: {$exists: true}}
up:
  - custom:
      up: |
        function up(doc, kept, keep) {
          const n = doc.name, i = n.indexOf(' ');
          let first = i < 0 ? n : n.slice(0, i), last = i < 0 ? '' : n.slice(i + 1);
          if ('first' in kept) { first = kept.first; last = kept.last; }
          if ((last === '' ? first : first + ' ' + last) !== n) keep.name = n;
          const out = {};
          for (const k of Object.keys(doc)) {
            if (k === 'name') { out.first = first; out.last = last; } else out[k] = doc[k];
          }
          return out;
        }
      down: |
        function down(doc, kept, keep) {
          const joined = doc.last === '' ? doc.first : doc.first + ' ' + doc.last;
          const name = 'name' in kept ? kept.name : joined;
          const i = name.indexOf(' ');
          const split = i < 0 ? [name, ''] : [name.slice(0, i), name.slice(i + 1)];
          if (split[0] !== doc.first || split[1] !== doc.last) { keep.first = doc.first; keep.last = doc.last; }
          const out = {};
          for (const k of Object.keys(doc)) {
            if (k === 'first') out.name = name; else if (k !== 'last') out[k] = doc[k];
          }
          return out;
        }
"#;

#[test]
fn the_laws_catch_a_complement_that_hides_an_edit_in_either_shape() {
    use rewind_lens::laws::{check_step, LAW_EDIT_NEW, LAW_EDIT_OLD};
    let s = set(&[SPLIT_HIDING_EDITS]);
    // "Ann " keeps its trailing space aside going up; a first name typed
    // at the new version then went down as "Ann " again.
    let broken = check_step(
        &s,
        1,
        &json!({"_id": "p", "type": "person", "name": "Ann "}),
    )
    .unwrap_err();
    assert_eq!(broken.law, LAW_EDIT_NEW, "{broken:?}");
    // A first name typed with a space keeps the split aside going down; a
    // name edited at the old version then went up as the old split.
    let broken =
        check_step(&s, 1, &json!({"_id": "p", "type": "person", "name": "Ann"})).unwrap_err();
    assert_eq!(broken.law, LAW_EDIT_OLD, "{broken:?}");
    // The generated documents find it too.
    let report = rewind_lens::laws::check_laws(&s, &[], 1024);
    assert!(!report[0].broken.is_empty());
}

#[test]
fn the_hidden_edit_laws_edit_the_leaves_the_step_changed_first_in_a_large_document() {
    use rewind_lens::laws::{check_step, LAW_EDIT_NEW};
    // Upper-cases `code`, keeping the original aside, and puts the
    // original back going down whatever `code` has become.
    let s = set(&[concat!(
        "description: x\nwhen: {type: a}\nwhen_after: {type: a}\nup:\n  - custom:\n",
        "      up: '(d, kept, keep) => { keep.code = d.code; d.code = d.code.toUpperCase(); return d }'\n",
        "      down: '(d, kept) => { if (\"code\" in kept) d.code = kept.code; return d }'\n",
    )]);
    let mut doc = json!({"_id": "big", "type": "a"});
    for i in 0..40 {
        doc[format!("f{i:02}")] = json!(format!("value {i}"));
    }
    doc["code"] = json!("ab");
    let broken = check_step(&s, 1, &doc).unwrap_err();
    assert_eq!(broken.law, LAW_EDIT_NEW, "{broken:?}");
}

#[test]
fn add_keeps_a_value_a_newer_writer_set_and_up_restores_it() {
    let s =
        set(&["description: x\nwhen: {type: a}\nup:\n  - add: {path: status, value: active}\n"]);
    let mut new = json!({"_id": "d", "type": "a", "status": "paused", "rewind": 1});
    let StepOutcome::Applied(kept) = s.down_step(1, &mut new, None).unwrap() else {
        panic!()
    };
    assert_eq!(new, json!({"_id": "d", "type": "a"}));
    s.up_step(1, &mut new, kept.as_ref()).unwrap();
    assert_eq!(
        new,
        json!({"_id": "d", "type": "a", "status": "paused", "rewind": 1})
    );
}

#[test]
fn wrap_and_unwrap_are_each_others_reverse() {
    let s = set(&["description: x\nwhen: {type: a}\nup:\n  - wrap: {path: phone, key: number}\n  - wrap: {path: tags, array: true}\n"]);
    let original = json!({"_id": "d", "type": "a", "phone": "+1", "tags": "x"});
    let mut doc = original.clone();
    let StepOutcome::Applied(kept) = s.up_step(1, &mut doc, None).unwrap() else {
        panic!()
    };
    assert_eq!(
        doc,
        json!({"_id": "d", "type": "a", "phone": {"number": "+1"}, "tags": ["x"], "rewind": 1})
    );
    s.down_step(1, &mut doc, kept.as_ref()).unwrap();
    assert_eq!(text(&doc), text(&original));
}

#[test]
fn design_documents_are_never_migrated() {
    let s = set(&["description: x\nwhen: {}\nup:\n  - add: {path: x, value: 1}\n"]);
    let mut doc = json!({"_id": "_design/app", "views": {}});
    assert_eq!(s.up_step(1, &mut doc, None).unwrap(), StepOutcome::Skipped);
}

#[test]
fn a_custom_step_that_loops_is_stopped_by_the_time_limit() {
    let s = set(&["description: x\nwhen: {type: a}\nup:\n  - custom: {up: 'd => { for(;;){} }', down: 'd => d', time_limit_ms: 50}\nwhen_after: {type: a}\n"]);
    let mut doc = json!({"_id": "d", "type": "a"});
    let err = s.up_step(1, &mut doc, None).unwrap_err();
    assert!(err.to_string().contains("custom step failed"), "{err}");
    assert_eq!(
        doc,
        json!({"_id": "d", "type": "a"}),
        "a failed step changes nothing"
    );
}

#[test]
fn a_custom_step_keeps_number_text_whatever_numbers_the_document_holds() {
    let s = set(&["description: x\nwhen: {type: a}\nup:\n  - custom: {up: 'd => { d.copy = d.n; d.sum = d.i + 1; return d }', down: 'd => { delete d.copy; delete d.sum; return d }'}\nwhen_after: {type: a}\n"]);
    for (input, expected) in [
        // Integers JavaScript writes as written: passed through as they are.
        (
            r#"{"_id":"d","type":"a","n":7,"i":-41}"#,
            r#"{"_id":"d","type":"a","n":7,"i":-41,"copy":7,"sum":-40,"rewind":1}"#,
        ),
        // Any other number keeps its text wherever the function moved it,
        // and a result of its value takes it (`i + 1` is `i` as a double).
        (
            r#"{"_id":"d","type":"a","n":1.10,"i":12345678901234567890,"e":1e400}"#,
            r#"{"_id":"d","type":"a","n":1.10,"i":12345678901234567890,"e":1e400,"copy":1.10,"sum":12345678901234567890,"rewind":1}"#,
        ),
        // `-0` is not an integer JavaScript writes back as written.
        (
            r#"{"_id":"d","type":"a","n":-0,"i":0}"#,
            r#"{"_id":"d","type":"a","n":-0,"i":0,"copy":-0,"sum":1,"rewind":1}"#,
        ),
    ] {
        let (mut doc, style) = rewind_lens::json_text::parse(input).unwrap();
        s.translate(&mut doc, 0, 1, &mut rewind_lens::migration::NoComplements)
            .unwrap();
        assert_eq!(rewind_lens::json_text::to_string(&doc, style), expected);
    }
}

#[test]
fn a_custom_step_has_no_io() {
    let s = set(&["description: x\nwhen: {type: a}\nup:\n  - custom: {up: 'd => { d.t = typeof require + typeof std + typeof os + typeof fetch; return d }', down: 'd => d'}\nwhen_after: {type: a}\n"]);
    let mut doc = json!({"_id": "d", "type": "a"});
    s.up_step(1, &mut doc, None).unwrap();
    assert_eq!(doc["t"], "undefinedundefinedundefinedundefined");
}

/// Complements in a map, as a journal keeps them.
#[derive(Default, Clone)]
struct Kept(std::collections::BTreeMap<u32, Value>);

impl rewind_lens::Complements for Kept {
    fn get(&mut self, version: u32) -> Option<Value> {
        self.0.get(&version).cloned()
    }
    fn put(&mut self, version: u32, complement: Option<Value>) {
        match complement {
            Some(c) => self.0.insert(version, c),
            None => self.0.remove(&version),
        };
    }
}

#[test]
fn translate_all_gives_what_translate_gives_for_every_version() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cht");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    let set = MigrationSet::parse_files(&files, "rewind").unwrap();
    let latest = set.latest();
    assert_eq!(latest, 7);
    let (mut checked, mut same) = (0, 0);
    for doc in rewind_sample::docs(60, 3) {
        // The document at every version, with the complements its upgrade kept.
        let mut kept = Kept::default();
        let mut at = vec![doc.clone()];
        for k in 1..=latest {
            let mut next = at[k as usize - 1].clone();
            set.translate(&mut next, k - 1, k, &mut kept).unwrap();
            at.push(next);
        }
        for from in 0..=latest {
            for complements in [kept.clone(), Kept::default()] {
                let all = set
                    .translate_all(&at[from as usize], from, &mut complements.clone())
                    .unwrap();
                assert_eq!(all.len(), latest as usize + 1);
                for to in 0..=latest {
                    let mut one = at[from as usize].clone();
                    set.translate(&mut one, from, to, &mut complements.clone())
                        .unwrap();
                    assert_eq!(text(&all[to as usize]), text(&one), "{from} → {to}: {doc}");
                    checked += 1;
                }
                // A view said to be the same as another is that view, and
                // one given earlier.
                let mut given = Vec::new();
                set.visit_all(
                    &at[from as usize],
                    from,
                    &mut complements.clone(),
                    |k, view, same_as| {
                        if let Some(j) = same_as {
                            assert!(given.contains(&j), "{from}: {k} same as {j}, not given yet");
                            assert_eq!(text(view), text(&all[j as usize]), "{from}: {k} as {j}");
                            same += 1;
                        }
                        given.push(k);
                    },
                )
                .unwrap();
            }
        }
    }
    assert!(checked > 7000);
    assert!(same > 1000, "steps that did not apply: {same}");
}

#[test]
fn a_failing_step_leaves_the_document_as_it_was_before_the_walk() {
    let s = set(&[
        "description: x\nwhen: {type: a}\nup:\n  - rename: {from: name, to: title}\n",
        "description: y\nwhen: {type: a}\nup:\n  - custom:\n      up: \"d => { if (d.bad) throw new Error('no'); d.ok = 1; return d; }\"\n      down: \"d => { delete d.ok; return d; }\"\nwhen_after: {type: a, ok: 1}\n",
    ]);
    let original = json!({"_id": "x", "type": "a", "name": "n", "bad": true});
    // One step applies in place, the next throws: all or nothing.
    let mut doc = original.clone();
    assert!(s
        .translate(&mut doc, 0, 2, &mut rewind_lens::migration::NoComplements)
        .is_err());
    assert_eq!(doc, original, "translate");
    let mut once = original.clone();
    s.up_step(1, &mut once, None).unwrap();
    let before_second = once.clone();
    assert!(s.up_step(2, &mut once, None).is_err());
    assert_eq!(once, before_second, "up_step");
    // Without the throw both apply.
    let mut good = json!({"_id": "x", "type": "a", "name": "n"});
    s.translate(&mut good, 0, 2, &mut rewind_lens::migration::NoComplements)
        .unwrap();
    assert_eq!(good["title"], "n");
    assert_eq!(good["ok"], 1);
}

#[test]
fn the_hidden_edit_laws_catch_a_complement_that_brings_back_a_cleared_field() {
    use rewind_lens::laws::{check_step, LAW_EDIT_NEW};
    // Lower-cases `code`, keeping the original aside; going down it puts
    // the original back unless `code` was edited, but a cleared `code`
    // counts as unedited: a user's deletion at the new version came back.
    let s = set(&[concat!(
        "description: x\nwhen: {type: a}\nwhen_after: {type: a}\nup:\n  - custom:\n",
        "      up: '(d, kept, keep) => { keep.code = d.code; d.code = d.code.toLowerCase(); return d }'\n",
        "      down: '(d, kept) => { if (\"code\" in kept && (!(\"code\" in d) || kept.code.toLowerCase() === d.code)) d.code = kept.code; return d }'\n",
    )]);
    let doc = json!({"_id": "c", "type": "a", "code": "AB", "other": "x"});
    let broken = check_step(&s, 1, &doc).unwrap_err();
    assert_eq!(broken.law, LAW_EDIT_NEW, "{broken:?}");
    assert!(!broken.input.contains("\"code\""), "{broken:?}");
    // Restoring only while the value is there and matches holds.
    let s = set(&[concat!(
        "description: x\nwhen: {type: a}\nwhen_after: {type: a}\nup:\n  - custom:\n",
        "      up: '(d, kept, keep) => { keep.code = d.code; d.code = d.code.toLowerCase(); return d }'\n",
        "      down: '(d, kept) => { if (\"code\" in kept && kept.code.toLowerCase() === d.code) d.code = kept.code; return d }'\n",
    )]);
    assert!(check_step(&s, 1, &doc).is_ok());
}
