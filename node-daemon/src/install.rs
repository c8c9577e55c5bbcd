//! Installing the CNI on a Kubernetes node: moat-cni and moat-ipam copied into the runtime's
//! plugin directory, and a conflist whose IPAM ranges are the node's pod CIDRs. Every file is
//! written to a temporary name and renamed, so the runtime never sees half a binary or config.

use std::{fs, io::Write, os::unix::fs::PermissionsExt, path::Path};

use anyhow::Context;
use ipnetwork::IpNetwork;

pub const CONFLIST_NAME: &str = "10-moat.conflist";

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("path without a directory")?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.moat-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))?;
    Ok(())
}

/// Copies the plugin binaries from `from` into `bin_dir`.
pub fn install_binaries(from: &Path, bin_dir: &Path) -> anyhow::Result<()> {
    for name in ["moat-cni", "moat-ipam"] {
        let source = from.join(name);
        let bytes = fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
        write_atomically(&bin_dir.join(name), &bytes, 0o755)?;
    }
    Ok(())
}

/// The node's conflist: Moat standalone with moat-ipam over the pod CIDRs, then portmap.
pub fn conflist(pod_cidrs: &[IpNetwork], socket: &Path, pin_root: &Path) -> serde_json::Value {
    let ranges: Vec<serde_json::Value> = pod_cidrs
        .iter()
        .map(|c| serde_json::json!([{ "subnet": c.to_string() }]))
        .collect();
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "moat",
        "plugins": [
            {
                "type": "moat-cni",
                "mode": "standalone",
                "socket": socket,
                "pinRoot": pin_root,
                "ipam": {
                    "type": "moat-ipam",
                    "ranges": ranges,
                    "dataDir": "/var/lib/moat/ipam"
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
}

pub fn write_conflist(conf_dir: &Path, list: &serde_json::Value) -> anyhow::Result<()> {
    write_atomically(
        &conf_dir.join(CONFLIST_NAME),
        &serde_json::to_vec_pretty(list)?,
        0o644,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_uses_every_pod_cidr_as_a_range() {
        let cidrs: Vec<IpNetwork> = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ];
        let list = conflist(
            &cidrs,
            Path::new("/run/moat/moatd.sock"),
            Path::new("/sys/fs/bpf/moat"),
        );
        let ranges = &list["plugins"][0]["ipam"]["ranges"];
        assert_eq!(ranges[0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(ranges[1][0]["subnet"], "fd00:10:244:1::/64");
        let dir = tempfile::tempdir().unwrap();
        write_conflist(dir.path(), &list).unwrap();
        let back: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(CONFLIST_NAME)).unwrap()).unwrap();
        assert_eq!(back, list);
    }
}
