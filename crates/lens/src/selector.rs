//! The Mango selector subset that migrations use to say which documents they touch.
//!
//! Supported: field equality on dotted paths (`{type: person}`), nested field
//! objects (`{fields: {visit: home}}`), `$eq`, `$ne`, `$in`, `$nin`,
//! `$exists`, `$and`, `$or`, `$not`, `$nor`. As in CouchDB, a condition on a
//! missing field is false, except `$exists: false`.

use crate::path::FieldPath;
use serde_json::Value;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Matches every document.
    All,
    /// Every part must match.
    And(Vec<Selector>),
    /// At least one part must match.
    Or(Vec<Selector>),
    /// The part must not match.
    Not(Box<Selector>),
    /// A condition on one field.
    Field(FieldPath, Condition),
}

/// A condition on the value at a field.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The field exists and equals the value.
    Eq(Value),
    /// The field exists and differs from the value.
    Ne(Value),
    /// The field exists and equals one of the values.
    In(Vec<Value>),
    /// The field exists and equals none of the values.
    Nin(Vec<Value>),
    /// The field exists (`true`) or is missing (`false`).
    Exists(bool),
}

impl Selector {
    /// Parses a Mango selector; the error says which part is not supported.
    pub fn parse(value: &Value) -> Result<Selector, String> {
        parse_object(value, None)
    }

    /// True when the document matches.
    pub fn matches(&self, doc: &Value) -> bool {
        match self {
            Selector::All => true,
            Selector::And(parts) => parts.iter().all(|p| p.matches(doc)),
            Selector::Or(parts) => parts.iter().any(|p| p.matches(doc)),
            Selector::Not(part) => !part.matches(doc),
            Selector::Field(path, condition) => condition.holds(path.get(doc)),
        }
    }

    /// Every field condition in the selector, for generating documents that exercise it.
    pub fn conditions(&self) -> Vec<(&FieldPath, &Condition)> {
        let mut out = Vec::new();
        self.collect_conditions(&mut out);
        out
    }

    fn collect_conditions<'a>(&'a self, out: &mut Vec<(&'a FieldPath, &'a Condition)>) {
        match self {
            Selector::All => {}
            Selector::And(parts) | Selector::Or(parts) => {
                parts.iter().for_each(|p| p.collect_conditions(out))
            }
            Selector::Not(part) => part.collect_conditions(out),
            Selector::Field(path, condition) => out.push((path, condition)),
        }
    }

    /// Rewrites every field condition with `f`; `None` from `f` makes the whole result `None`.
    pub fn try_map_fields(
        &self,
        f: &mut dyn FnMut(&FieldPath, &Condition) -> Option<Selector>,
    ) -> Option<Selector> {
        Some(match self {
            Selector::All => Selector::All,
            Selector::And(parts) => Selector::And(
                parts
                    .iter()
                    .map(|p| p.try_map_fields(f))
                    .collect::<Option<_>>()?,
            ),
            Selector::Or(parts) => Selector::Or(
                parts
                    .iter()
                    .map(|p| p.try_map_fields(f))
                    .collect::<Option<_>>()?,
            ),
            Selector::Not(part) => Selector::Not(Box::new(part.try_map_fields(f)?)),
            Selector::Field(path, condition) => f(path, condition)?,
        })
    }
}

impl Condition {
    /// True when the condition holds for the value found at the field (`None`: missing).
    pub fn holds(&self, found: Option<&Value>) -> bool {
        match (self, found) {
            (Condition::Exists(wanted), found) => *wanted == found.is_some(),
            (_, None) => false,
            (Condition::Eq(v), Some(found)) => json_eq(found, v),
            (Condition::Ne(v), Some(found)) => !json_eq(found, v),
            (Condition::In(vs), Some(found)) => vs.iter().any(|v| json_eq(found, v)),
            (Condition::Nin(vs), Some(found)) => !vs.iter().any(|v| json_eq(found, v)),
        }
    }

    /// The literal values the condition mentions.
    pub fn literals(&self) -> Vec<&Value> {
        match self {
            Condition::Eq(v) | Condition::Ne(v) => vec![v],
            Condition::In(vs) | Condition::Nin(vs) => vs.iter().collect(),
            Condition::Exists(_) => vec![],
        }
    }
}

/// JSON equality where numbers compare by value (`1.0` equals `1`), as Mango does.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.to_string() == y.to_string()
                || matches!((x.as_f64(), y.as_f64()), (Some(p), Some(q)) if p == q)
        }
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(k, x)| ys.get(k).is_some_and(|y| json_eq(x, y)))
        }
        _ => a == b,
    }
}

fn parse_object(value: &Value, prefix: Option<&FieldPath>) -> Result<Selector, String> {
    let Value::Object(object) = value else {
        return Err(format!("a selector must be a mapping, found {value}"));
    };
    let mut parts = Vec::new();
    for (key, inner) in object {
        if let Some(operator) = key.strip_prefix('$') {
            if prefix.is_some() {
                return Err(format!(
                    "`{key}` is not allowed inside a field condition here"
                ));
            }
            parts.push(parse_combinator(operator, inner)?);
        } else {
            let path = match prefix {
                Some(p) => FieldPath::parse(key).map(|k| {
                    let mut joined = p.clone();
                    for s in k.segments() {
                        joined = joined.child(s);
                    }
                    joined
                }),
                None => FieldPath::parse(key),
            }
            .ok_or_else(|| format!("`{key}` is not a valid dotted field path"))?;
            parts.push(parse_field(path, inner)?);
        }
    }
    Ok(match parts.len() {
        0 => Selector::All,
        1 => parts.pop().expect("one part"),
        _ => Selector::And(parts),
    })
}

fn parse_combinator(operator: &str, inner: &Value) -> Result<Selector, String> {
    let list = |inner: &Value| -> Result<Vec<Selector>, String> {
        let Value::Array(items) = inner else {
            return Err(format!("`${operator}` takes a list of selectors"));
        };
        items.iter().map(|i| parse_object(i, None)).collect()
    };
    match operator {
        "and" => Ok(Selector::And(list(inner)?)),
        "or" => Ok(Selector::Or(list(inner)?)),
        "nor" => Ok(Selector::Not(Box::new(Selector::Or(list(inner)?)))),
        "not" => Ok(Selector::Not(Box::new(parse_object(inner, None)?))),
        other => Err(format!(
            "unsupported selector operator `${other}` (supported: $and, $or, $nor, $not, and on fields $eq, $ne, $in, $nin, $exists)"
        )),
    }
}

fn parse_field(path: FieldPath, inner: &Value) -> Result<Selector, String> {
    let Value::Object(object) = inner else {
        return Ok(Selector::Field(path, Condition::Eq(inner.clone())));
    };
    if !object.keys().any(|k| k.starts_with('$')) {
        return parse_object(inner, Some(&path));
    }
    let mut parts = Vec::new();
    for (key, operand) in object {
        let list = || -> Result<Vec<Value>, String> {
            operand
                .as_array()
                .cloned()
                .ok_or_else(|| format!("`{key}` on `{path}` takes a list"))
        };
        let part = match key.as_str() {
            "$eq" => Selector::Field(path.clone(), Condition::Eq(operand.clone())),
            "$ne" => Selector::Field(path.clone(), Condition::Ne(operand.clone())),
            "$in" => Selector::Field(path.clone(), Condition::In(list()?)),
            "$nin" => Selector::Field(path.clone(), Condition::Nin(list()?)),
            "$exists" => Selector::Field(
                path.clone(),
                Condition::Exists(
                    operand
                        .as_bool()
                        .ok_or_else(|| format!("`$exists` on `{path}` takes true or false"))?,
                ),
            ),
            "$not" => Selector::Not(Box::new(parse_field(path.clone(), operand)?)),
            other if other.starts_with('$') => {
                return Err(format!(
                    "unsupported condition `{other}` on `{path}` (supported: $eq, $ne, $in, $nin, $exists, $not)"
                ))
            }
            other => return Err(format!("`{other}` mixed with operators on `{path}`")),
        };
        parts.push(part);
    }
    Ok(if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Selector::And(parts)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(v: Value) -> Selector {
        Selector::parse(&v).unwrap()
    }

    #[test]
    fn equality_on_dotted_and_nested_paths() {
        let doc = json!({"type": "person", "fields": {"visit": "home"}});
        assert!(sel(json!({"type": "person"})).matches(&doc));
        assert!(sel(json!({"fields.visit": "home"})).matches(&doc));
        assert!(sel(json!({"fields": {"visit": "home"}})).matches(&doc));
        assert!(!sel(json!({"type": "clinic"})).matches(&doc));
    }

    #[test]
    fn conditions_on_missing_fields_are_false_except_exists_false() {
        let doc = json!({"a": 1});
        assert!(!sel(json!({"b": {"$ne": 1}})).matches(&doc));
        assert!(sel(json!({"b": {"$exists": false}})).matches(&doc));
        assert!(sel(json!({"$not": {"b": {"$exists": true}}})).matches(&doc));
        assert!(sel(json!({"$or": [{"a": 2}, {"a": {"$in": [1, 3]}}]})).matches(&doc));
    }

    #[test]
    fn unknown_operators_are_refused_with_their_name() {
        let err = Selector::parse(&json!({"a": {"$regex": "x"}})).unwrap_err();
        assert!(err.contains("$regex"), "{err}");
    }
}
