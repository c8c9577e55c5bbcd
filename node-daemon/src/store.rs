//! The node's endpoint registry, persisted so that a restarted moatd knows its pods before
//! the runtime tells it anything. Written crash-safely (temp file, fsync, rename, fsync dir).

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
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}
