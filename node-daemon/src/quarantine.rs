//! Quarantined pods. A pod is quarantined while moatd holds an entry for it (from `moatctl
//! quarantine` or a detector whose response is `quarantine`; kept in the state directory so a
//! restarted moatd puts it back) or while it carries the `moat.io/quarantine: "true"`
//! annotation. Entries are by pod name, not endpoint, so a restarted pod stays quarantined.
//!
//! The datapath enforces it from the endpoint entry's ENDPOINT_FLAG_QUARANTINED, which moatd
//! sets in the pod's endpoint records (desired.rs writes it with every endpoint entry).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;

use crate::api::QuarantineInfo;

pub const ANNOTATION: &str = "moat.io/quarantine";

/// The reasons recorded for each way in.
pub const MANUAL: &str = "manual";
pub const BY_ANNOTATION: &str = "annotation";

pub struct QuarantineStore {
    path: PathBuf,
    entries: BTreeMap<String, QuarantineInfo>,
}

impl QuarantineStore {
    /// Reads `quarantine.json` in the state directory (none yet: nothing quarantined).
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("quarantine.json");
        let entries = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self { path, entries })
    }

    pub fn get(&self, pod: &str) -> Option<&QuarantineInfo> {
        self.entries.get(pod)
    }

    pub fn entries(&self) -> &BTreeMap<String, QuarantineInfo> {
        &self.entries
    }

    /// Records the pod's quarantine (the first reason stays if it already is). Durable on
    /// return.
    pub fn insert(&mut self, pod: &str, info: QuarantineInfo) -> anyhow::Result<()> {
        if self.entries.contains_key(pod) {
            return Ok(());
        }
        self.entries.insert(pod.to_string(), info);
        self.save().inspect_err(|_| {
            self.entries.remove(pod);
        })
    }

    /// Forgets the pod's entry; true if there was one.
    pub fn remove(&mut self, pod: &str) -> anyhow::Result<bool> {
        let Some(old) = self.entries.remove(pod) else {
            return Ok(false);
        };
        self.save().inspect_err(|_| {
            self.entries.insert(pod.to_string(), old.clone());
        })?;
        Ok(true)
    }

    /// Durable on return (see `store::save_json`).
    fn save(&self) -> anyhow::Result<()> {
        crate::store::save_json(&self.path, &self.entries)
    }
}

/// `namespace/name`, both parts non-empty.
pub fn check_pod_name(pod: &str) -> anyhow::Result<()> {
    match pod.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(()),
        _ => anyhow::bail!("{pod:?}: expected namespace/name"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(reason: &str) -> QuarantineInfo {
        QuarantineInfo {
            reason: reason.into(),
            since_ms: 1,
            detail: None,
        }
    }

    #[test]
    fn entries_survive_a_reload_and_the_first_reason_stays() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = QuarantineStore::load(dir.path()).unwrap();
        store.insert("prod/web", info(MANUAL)).unwrap();
        store.insert("prod/web", info("port-scan")).unwrap();
        store.insert("prod/db", info("syn-flood")).unwrap();
        assert!(store.remove("prod/db").unwrap());
        assert!(!store.remove("prod/db").unwrap());
        let again = QuarantineStore::load(dir.path()).unwrap();
        assert_eq!(again.entries().len(), 1);
        assert_eq!(again.get("prod/web").unwrap().reason, MANUAL);
    }

    #[test]
    fn pod_names_need_a_namespace() {
        assert!(check_pod_name("prod/web").is_ok());
        for bad in ["web", "/web", "prod/", "a/b/c"] {
            assert!(check_pod_name(bad).is_err(), "{bad}");
        }
    }
}
