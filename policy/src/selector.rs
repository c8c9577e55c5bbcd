//! Kubernetes label selectors (matchLabels AND matchExpressions). Whether a selector is absent
//! (null) or empty matters to NetworkPolicy peers; that distinction lives in the callers as
//! `Option<LabelSelector>`, here an empty selector simply matches everything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::labels::LabelSet;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// A selector that matches every label set.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Checks what the API server checks: operators with their value rules, label syntax.
    /// Returns (field path relative to the selector, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (k, v) in &self.match_labels {
            check_label_key(k).map_err(|m| (format!("matchLabels.{k}"), m))?;
            check_label_value(v).map_err(|m| (format!("matchLabels.{k}"), m))?;
        }
        for (i, r) in self.match_expressions.iter().enumerate() {
            let path = format!("matchExpressions[{i}]");
            check_label_key(&r.key).map_err(|m| (format!("{path}.key"), m))?;
            match r.operator {
                Operator::In | Operator::NotIn => {
                    if r.values.is_empty() {
                        return Err((
                            format!("{path}.values"),
                            format!("must be specified when operator is {:?}", r.operator),
                        ));
                    }
                    for (j, v) in r.values.iter().enumerate() {
                        check_label_value(v).map_err(|m| (format!("{path}.values[{j}]"), m))?;
                    }
                }
                Operator::Exists | Operator::DoesNotExist => {
                    if !r.values.is_empty() {
                        return Err((
                            format!("{path}.values"),
                            format!("may not be specified when operator is {:?}", r.operator),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl LabelSelectorRequirement {
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            // Kubernetes: NotIn also matches when the key is absent.
            Operator::NotIn => value.is_none_or(|v| self.values.iter().all(|x| x != v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

fn is_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `[prefix/]name`: prefix a DNS subdomain, name a qualified name (as the API server checks).
fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                let b = l.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            });
        if !ok {
            return Err(format!(
                "invalid label key {key:?}: prefix must be a DNS subdomain"
            ));
        }
    }
    if !is_name_part(name) {
        return Err(format!(
            "invalid label key {key:?}: name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {value:?}: at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> LabelSet {
        pairs.iter().copied().collect()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::everything().matches(&LabelSet::new()));
        assert!(LabelSelector::everything().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let sel = LabelSelector {
            match_labels: [("app".to_string(), "web".to_string())].into(),
            match_expressions: vec![req("tier", Operator::In, &["a", "b"])],
        };
        assert!(sel.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("tier", "c")])));
        assert!(!sel.matches(&labels(&[("tier", "a")])));
    }

    #[test]
    fn not_in_matches_a_missing_key_and_exists_does_not() {
        let empty = LabelSet::new();
        assert!(req("k", Operator::NotIn, &["v"]).matches(&empty));
        assert!(!req("k", Operator::NotIn, &["v"]).matches(&labels(&[("k", "v")])));
        assert!(!req("k", Operator::Exists, &[]).matches(&empty));
        assert!(req("k", Operator::DoesNotExist, &[]).matches(&empty));
        assert!(!req("k", Operator::In, &["v"]).matches(&empty));
    }

    #[test]
    fn validation_rejects_values_that_do_not_fit_the_operator() {
        let mut sel = LabelSelector::default();
        sel.match_expressions.push(req("k", Operator::In, &[]));
        assert_eq!(sel.validate().unwrap_err().0, "matchExpressions[0].values");
        sel.match_expressions[0] = req("k", Operator::Exists, &["v"]);
        assert!(sel.validate().is_err());
        sel.match_expressions[0] = req("bad key!", Operator::Exists, &[]);
        assert_eq!(sel.validate().unwrap_err().0, "matchExpressions[0].key");
    }

    #[test]
    fn unknown_operator_does_not_parse() {
        let r: Result<LabelSelector, _> = serde_json::from_str(
            r#"{"matchExpressions":[{"key":"k","operator":"Equals","values":["v"]}]}"#,
        );
        assert!(r.is_err());
    }
}
