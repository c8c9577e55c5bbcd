//! The node's endpoint registry, persisted so that a restarted moatd knows its pods before
//! the runtime tells it anything. Written crash-safely: temp file, fsync, rename.
//!
//! The directory is not fsynced after the rename. The registry only has to be right for a
//! moatd that restarts while the node keeps running, and then the page cache has every
//! rename. What a power loss can undo is the last renames, and after one no endpoint exists
//! any more: its veth went with the kernel, and a starting moatd forgets every endpoint whose
//! host veth is gone (`drop_vanished_endpoints`). The temp file's fsync stays: it keeps the
//! file whole, so a power loss never leaves a registry moatd refuses to load. Every register
//! and unregister saves, so this halves the fsyncs on the ADD and DEL paths (each one a
//! journal commit, milliseconds under write load).

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::Context;
use moat_policy::PodRef;
use serde::{Deserialize, Serialize};

use crate::api::EndpointSpec;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub spec: EndpointSpec,
    /// enforce | audit | learn
    pub mode: String,
    /// ENDPOINT_FLAG_* bits.
    #[serde(default)]
    pub flags: u8,
}

impl EndpointRecord {
    pub fn key(container_id: &str, ifname: &str) -> String {
        format!("{container_id}/{ifname}")
    }

    pub fn pod_ref(&self) -> PodRef {
        PodRef::new(&self.spec.pod_namespace, &self.spec.pod_name)
    }
}

pub struct EndpointStore {
    path: PathBuf,
}

impl EndpointStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("endpoints.json"),
        }
    }

    pub fn load(&self) -> anyhow::Result<BTreeMap<String, EndpointRecord>> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is corrupt; move it away to start empty",
                    self.path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    pub fn save(&self, endpoints: &BTreeMap<String, EndpointRecord>) -> anyhow::Result<()> {
        let dir = self.path.parent().context("state path has no directory")?;
        fs::create_dir_all(dir)?;
        let tmp = dir.join(".endpoints.json.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(endpoints)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}
