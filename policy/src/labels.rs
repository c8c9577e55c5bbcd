//! Label sets: the sorted key/value maps that pods and namespaces carry. Sorted storage makes
//! every serialization of a set canonical, which identity derivation depends on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A set of labels, sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LabelSet(pub BTreeMap<String, String>);

impl LabelSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Labels of `other` override ours (Kubernetes label changes merge, they do not replace).
    pub fn merge(&mut self, other: &LabelSet) {
        for (k, v) in other.iter() {
            self.insert(k, v);
        }
    }

    /// Length-prefixed serialization: injective, so two different sets never share bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in self.iter() {
            for part in [k, v] {
                out.extend_from_slice(&(part.len() as u32).to_le_bytes());
                out.extend_from_slice(part.as_bytes());
            }
        }
        out
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for LabelSet {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl std::fmt::Display for LabelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_bytes_do_not_confuse_key_and_value_boundaries() {
        let a: LabelSet = [("ab", "c")].into_iter().collect();
        let b: LabelSet = [("a", "bc")].into_iter().collect();
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }

    #[test]
    fn merge_overrides_and_keeps_other_keys() {
        let mut a: LabelSet = [("pod", "a"), ("x", "1")].into_iter().collect();
        a.merge(&[("pod", "b")].into_iter().collect());
        assert_eq!(a.get("pod"), Some("b"));
        assert_eq!(a.get("x"), Some("1"));
    }
}
