//! Where pinned state lives. Everything sits under `<root>/v<LAYOUT_VERSION>/`, so a build with
//! another map layout can never silently reuse maps it cannot read.

use std::path::{Path, PathBuf};

use moat_common::LAYOUT_VERSION;

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/moat";

#[derive(Clone, Debug)]
pub struct PinDir {
    base: PathBuf,
}

impl PinDir {
    /// `root` is the bpffs directory of one Moat installation (tests use their own).
    pub fn new(root: impl AsRef<Path>) -> Self {
        Self {
            base: root.as_ref().join(format!("v{LAYOUT_VERSION}")),
        }
    }

    /// `$MOAT_BPFFS_ROOT`, else /sys/fs/bpf/moat.
    pub fn from_env() -> Self {
        Self::new(std::env::var("MOAT_BPFFS_ROOT").unwrap_or_else(|_| DEFAULT_ROOT.to_string()))
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn maps(&self) -> PathBuf {
        self.base.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn programs(&self) -> PathBuf {
        self.base.join("programs")
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.base.join("links")
    }

    /// One pinned link per hook of an endpoint's host-side veth, by interface name (the name
    /// is deterministic per container, the ifindex is not stable across re-creation). bpffs
    /// refuses dots in names, hence `<hook>-<ifname>`.
    pub fn link(&self, ifname: &str, hook: &str) -> PathBuf {
        self.links().join(format!("{hook}-{ifname}"))
    }

    /// Link pins of veths being deleted, set aside by ifindex (see `attach::set_aside_links`);
    /// outside `links()`, so nothing that walks the live attachments sees them.
    pub fn doomed_links(&self) -> PathBuf {
        self.base.join("doomed-links")
    }

    /// `<hook>-<ifindex>-<ifname>`: the index says which device, the name lets a restarted
    /// moatd check that the index still is that device.
    pub fn doomed_link(&self, ifindex: u32, ifname: &str, hook: &str) -> PathBuf {
        self.doomed_links()
            .join(format!("{hook}-{ifindex}-{ifname}"))
    }

    /// Splits a link pin file name back into (hook, interface name).
    pub fn parse_link_name(file_name: &str) -> Option<(&str, &str)> {
        file_name.split_once('-')
    }
}
