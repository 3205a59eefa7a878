//! Filtered changes feeds: `filter=_doc_ids` and `filter=_selector`, as
//! PouchDB asks for them when it replicates with `doc_ids` or `selector`.
//!
//! A filter applies to what the client is shown: its version's view of
//! each document (a selector written for the v0 shape selects v0-shaped
//! documents, whatever version they are stored at). Filters that run a
//! design document's function (`ddoc/name`, `_view`) are refused: the
//! gateway runs no app code on translated documents.

use crate::GatewayError;
use rewind_lens::selector::Selector;
use rewind_store::ChangeRow;
use serde_json::Value;
use std::collections::HashSet;

/// Which rows of a changes feed a client asked for.
#[derive(Debug)]
pub(crate) enum ChangesFilter {
    /// `filter=_doc_ids`: these documents only.
    DocIds(HashSet<String>),
    /// `filter=_selector`: documents whose view at the client's version
    /// matches (evaluated on the presented winner).
    Selector(Selector),
}

impl ChangesFilter {
    /// The filter a `_changes` request names (`filter`), with its
    /// arguments from the body (`doc_ids`, `selector`, as PouchDB posts
    /// them) or the query (`doc_ids`); `None` without `filter`. A filter
    /// the gateway cannot apply, or malformed arguments, are a 400.
    pub(crate) fn parse(
        name: Option<&str>,
        doc_ids_param: Option<Value>,
        body: Option<&Value>,
    ) -> Result<Option<ChangesFilter>, GatewayError> {
        let Some(name) = name else {
            return Ok(None);
        };
        let from_body = |key: &str| body.and_then(|b| b.get(key)).cloned();
        match name {
            "_doc_ids" => {
                let ids = from_body("doc_ids").or(doc_ids_param);
                let ids = ids
                    .as_ref()
                    .and_then(Value::as_array)
                    .and_then(|ids| {
                        ids.iter()
                            .map(|id| id.as_str().map(str::to_owned))
                            .collect::<Option<HashSet<String>>>()
                    })
                    .ok_or_else(|| {
                        GatewayError::BadRequest(
                            "filter `_doc_ids` needs `doc_ids`, a JSON list of document ids \
                             (in the body, or the query)"
                                .into(),
                        )
                    })?;
                Ok(Some(ChangesFilter::DocIds(ids)))
            }
            "_selector" => {
                let selector = from_body("selector")
                    .filter(Value::is_object)
                    .ok_or_else(|| {
                        GatewayError::BadRequest(
                            "filter `_selector` needs a `selector` object in a POST body".into(),
                        )
                    })?;
                let selector = Selector::parse(&selector).map_err(|reason| {
                    GatewayError::BadRequest(format!(
                        "selector: {reason} (the gateway matches field equality, `$eq`, `$ne`, \
                         `$in`, `$nin`, `$exists`, `$and`, `$or`, `$not`, `$nor`)"
                    ))
                })?;
                Ok(Some(ChangesFilter::Selector(selector)))
            }
            other => Err(GatewayError::BadRequest(format!(
                "filter `{other}` is not supported by the gateway: it runs no design document's \
                 function on translated documents; replicate with `doc_ids` or a `selector`, \
                 or without a filter"
            ))),
        }
    }

    /// The documents `_doc_ids` names (which need not be presented to be
    /// told apart); `None` for other filters.
    pub(crate) fn doc_ids(&self) -> Option<&HashSet<String>> {
        match self {
            ChangesFilter::DocIds(ids) => Some(ids),
            ChangesFilter::Selector(_) => None,
        }
    }

    /// True when the rows must come with their documents to be filtered.
    pub(crate) fn needs_docs(&self) -> bool {
        matches!(self, ChangesFilter::Selector(_))
    }

    /// True when the client asked for `row` (read with its document when
    /// [`ChangesFilter::needs_docs`]).
    pub(crate) fn keeps(&self, row: &ChangeRow) -> bool {
        match self {
            ChangesFilter::DocIds(ids) => ids.contains(&row.id),
            ChangesFilter::Selector(selector) => {
                row.doc.as_ref().is_some_and(|doc| selector.matches(doc))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(id: &str, doc: Option<Value>) -> ChangeRow {
        ChangeRow {
            seq: json!(1),
            id: id.to_owned(),
            changes: Vec::new(),
            deleted: false,
            doc,
        }
    }

    #[test]
    fn doc_ids_come_from_the_body_or_the_query() {
        let body = json!({"doc_ids": ["a", "b"]});
        let filter = ChangesFilter::parse(Some("_doc_ids"), None, Some(&body))
            .unwrap()
            .unwrap();
        assert!(filter.keeps(&row("a", None)) && !filter.keeps(&row("c", None)));
        let filter = ChangesFilter::parse(Some("_doc_ids"), Some(json!(["c"])), None)
            .unwrap()
            .unwrap();
        assert!(filter.keeps(&row("c", None)) && !filter.needs_docs());
        for bad in [None, Some(json!("a")), Some(json!([1]))] {
            let error = ChangesFilter::parse(Some("_doc_ids"), bad, None).unwrap_err();
            assert!(error.to_string().contains("needs `doc_ids`"), "{error}");
        }
    }

    #[test]
    fn a_selector_matches_the_document_shown() {
        let body = json!({"selector": {"type": "person", "age": {"$exists": true}}});
        let filter = ChangesFilter::parse(Some("_selector"), None, Some(&body))
            .unwrap()
            .unwrap();
        assert!(filter.needs_docs());
        assert!(filter.keeps(&row("p", Some(json!({"type": "person", "age": 3})))));
        assert!(!filter.keeps(&row("p", Some(json!({"type": "person"})))));
        assert!(!filter.keeps(&row("p", None)));
        let error = ChangesFilter::parse(Some("_selector"), None, None).unwrap_err();
        assert!(error.to_string().contains("`selector` object"), "{error}");
        let bad = json!({"selector": {"age": {"$regex": "x"}}});
        let error = ChangesFilter::parse(Some("_selector"), None, Some(&bad)).unwrap_err();
        assert!(error.to_string().starts_with("selector: "), "{error}");
    }

    #[test]
    fn design_document_filters_are_refused_and_no_filter_is_none() {
        for name in ["app/by_user", "_view", "_design"] {
            let error = ChangesFilter::parse(Some(name), None, None).unwrap_err();
            assert!(error.to_string().contains("not supported"), "{error}");
        }
        assert!(ChangesFilter::parse(None, None, None).unwrap().is_none());
    }
}
