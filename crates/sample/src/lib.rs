//! Deterministic sample documents shaped like Community Health Toolkit data.
//!
//! Invariant: document `i` depends only on `(seed, i)`, so `docs(n)` is a
//! prefix of `docs(m)` for `n < m`, and tests, benches and the drill see the
//! same data on every machine. The mix follows the Node baseline: about 60%
//! `data_record` form reports, 30% `person` contacts, 10% `clinic` /
//! `health_center` places; a few carry unicode, deep nesting and integers
//! above 2^53.

#![warn(missing_docs)]

use serde_json::{json, Value};

/// mulberry32: a small, fast, deterministic generator (the Node baseline uses the same).
struct Rng(u32);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng((seed & 0xffff_ffff) as u32 ^ (seed >> 32) as u32)
    }

    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x6d2b_79f5);
        let mut t = self.0;
        t = (t ^ (t >> 15)).wrapping_mul(1 | t);
        t = t.wrapping_add((t ^ (t >> 7)).wrapping_mul(61 | t)) ^ t;
        f64::from(t ^ (t >> 14)) / 4_294_967_296.0
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.next() * n as f64) as usize).min(n.saturating_sub(1))
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

fn uuid(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let hex: String = (0..32)
        .map(|_| char::from(b"0123456789abcdef"[rng.below(16)]))
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn id_of(seed: u64, kind: u64, k: u64) -> String {
    uuid(seed * 7919 + kind * 1_000_003 + k)
}

/// Document number `i` of the sample with `seed`.
pub fn doc(i: u64, seed: u64) -> Value {
    let mut r = Rng::new(seed * 104_729 + i);
    let k = r.next();
    let hc = id_of(seed, 1, i % 20);
    let clinic = id_of(seed, 2, i % 400);
    let chw = id_of(seed, 3, i % 2000);
    let id = id_of(seed, 0, i);
    let reported_date = 1_700_000_000_000u64 + i * 60_000;
    let mut doc = if k < 0.1 {
        let kind = if r.next() < 0.8 {
            "clinic"
        } else {
            "health_center"
        };
        let parent = if kind == "clinic" {
            json!({"_id": hc})
        } else {
            json!({"_id": id_of(seed, 1, 999)})
        };
        json!({
            "_id": id, "reported_date": reported_date, "type": kind,
            "name": format!("{kind} {i}"), "parent": parent,
            "contact": {"_id": chw}, "place_id": (10_000 + i).to_string(),
        })
    } else if k < 0.4 {
        let name = r.pick(&[
            "Ann Lee",
            "Mary Wanjiru",
            "José Álvarez",
            "Amina Bello",
            "Nguyễn Thị Lan",
        ]);
        json!({
            "_id": id, "reported_date": reported_date, "type": "person", "name": name,
            "sex": r.pick(&["male", "female"]),
            "phone": format!("+2547{i:08}"),
            "date_of_birth": format!("19{}-0{}-15", 50 + i % 50, 1 + i % 9),
            "patient_id": (50_000 + i).to_string(),
            "parent": {"_id": clinic, "parent": {"_id": hc}},
        })
    } else {
        let patient = 50_000 + (r.next() * i as f64) as u64;
        json!({
            "_id": id, "reported_date": reported_date, "type": "data_record",
            "form": r.pick(&["pregnancy", "delivery", "pnc_visit", "assessment"]),
            "content_type": "xml", "from": "+254700000000",
            "contact": {"_id": chw, "parent": {"_id": clinic, "parent": {"_id": hc}}},
            "fields": {
                "patient_id": patient.to_string(), "patient_name": "Ann Lee",
                "lmp_date": "2026-01-01", "edd": "2026-10-08",
                "visit": r.pick(&["home", "clinic"]),
                "danger_signs": r.pick(&["none", "bleeding fever"]),
                "temp": 37.1, "weight": (r.next() * 900.0).round() / 10.0,
                "hiv_status": r.pick(&["neg", "pos", "unknown"]),
                "notes": "x".repeat(r.below(200)),
                "legacy_code": r.pick(&["A1", "B2"]),
                "visited_contact_uuid": chw,
                "inputs": {"source": "task", "contact": {"_id": chw, "name": "Ann"}},
                "meta": {"instanceID": format!("uuid:{}", id_of(seed, 4, i)), "deprecatedID": ""},
                "group_review": {"submit": "yes"},
            },
        })
    };
    // A few documents exercise what must survive byte for byte.
    if i % 97 == 13 {
        doc["household_code"] = serde_json::from_str("12345678901234567890").unwrap_or(Value::Null);
        doc["score"] = serde_json::from_str("1.10").unwrap_or(Value::Null);
        doc["note_ur"] = json!("ملاحظة — 注意 — 🩺");
        doc["geo"] = json!({"a": {"b": {"c": {"d": {"e": [1, {"f": "deep"}]}}}}});
    }
    doc
}

/// The first `n` documents of the sample with `seed`.
pub fn docs(n: u64, seed: u64) -> impl Iterator<Item = Value> {
    (0..n).map(move |i| doc(i, seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_documents_and_prefixes_agree() {
        let a: Vec<Value> = docs(50, 7).collect();
        let b: Vec<Value> = docs(100, 7).take(50).collect();
        assert_eq!(a, b);
        assert_ne!(doc(3, 7), doc(3, 8));
    }

    #[test]
    fn the_mix_is_mostly_reports_then_persons_then_places() {
        let mut counts = std::collections::HashMap::new();
        for d in docs(2000, 1) {
            *counts
                .entry(d["type"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        assert!(counts["data_record"] > 1000, "{counts:?}");
        assert!(counts["person"] > 450, "{counts:?}");
        assert!(
            counts["clinic"] + counts["health_center"] > 120,
            "{counts:?}"
        );
    }

    #[test]
    fn big_integers_and_number_text_survive_serialisation() {
        let d = doc(13, 1);
        let text = serde_json::to_string(&d).unwrap();
        assert!(
            text.contains("12345678901234567890") && text.contains("1.10"),
            "{text}"
        );
    }
}
