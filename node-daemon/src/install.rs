//! Installing the CNI on a Kubernetes node: moat-cni and moat-ipam copied into the runtime's
//! plugin directory, and a conflist. Standalone: Moat's own network, IPAM ranges from the
//! node's pod CIDRs. Chained: the cluster's existing conflist (e.g. kindnet's) with moat-cni
//! inserted after its interface plugin, written under a name that sorts first so the runtime
//! uses it. Every file is written to a temporary name and renamed, so the runtime never sees
//! half a binary or config.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use ipnetwork::IpNetwork;

pub const CONFLIST_NAME: &str = "10-moat.conflist";
/// Chained mode: sorts before the usual `10-<cni>.conflist`, so the runtime picks it.
pub const CHAINED_CONFLIST_NAME: &str = "00-moat-chained.conflist";

/// How moat-cni is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CniMode {
    /// Moat is the cluster's CNI: veth, routes, moat-ipam.
    Standalone,
    /// After the cluster's existing CNI (kindnet, bridge, ptp...): Moat only enforces.
    Chained,
}

/// The moat-cni entry of a conflist.
pub fn moat_plugin(
    mode: CniMode,
    socket: &Path,
    pin_root: &Path,
    mtu: Option<u32>,
) -> serde_json::Value {
    let mut plugin = serde_json::json!({
        "type": "moat-cni",
        "mode": match mode {
            CniMode::Standalone => "standalone",
            CniMode::Chained => "chained",
        },
        "socket": socket,
        "pinRoot": pin_root,
    });
    if let Some(mtu) = mtu {
        plugin["mtu"] = mtu.into();
    }
    plugin
}

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
    standalone_conflist(pod_cidrs, socket, pin_root, None)
}

/// [`conflist`] with an explicit MTU for the pods' interfaces.
pub fn standalone_conflist(
    pod_cidrs: &[IpNetwork],
    socket: &Path,
    pin_root: &Path,
    mtu: Option<u32>,
) -> serde_json::Value {
    let ranges: Vec<serde_json::Value> = pod_cidrs
        .iter()
        .map(|c| serde_json::json!([{ "subnet": c.to_string() }]))
        .collect();
    let mut moat = moat_plugin(CniMode::Standalone, socket, pin_root, mtu);
    moat["ipam"] = serde_json::json!({
        "type": "moat-ipam",
        "ranges": ranges,
        "dataDir": "/var/lib/moat/ipam"
    });
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "moat",
        "plugins": [
            moat,
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
}

/// The cluster's conflist with moat-cni chained right after its first plugin (the one that
/// creates the interface), so that later plugins (portmap, bandwidth...) see the same result.
/// A legacy single-plugin `.conf` becomes a list. Already chained: unchanged.
pub fn chained_conflist(
    base: &serde_json::Value,
    moat: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let mut list = base.clone();
    if list.get("plugins").is_none() {
        // A single-plugin config: its network keys move to the list.
        let object = list
            .as_object()
            .context("CNI config is not a JSON object")?;
        let mut plugin = object.clone();
        let mut top = serde_json::Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = plugin.remove(key) {
                top.insert(key.into(), v);
            }
        }
        top.insert("plugins".into(), serde_json::json!([plugin]));
        list = serde_json::Value::Object(top);
    }
    let plugins = list["plugins"]
        .as_array_mut()
        .context("CNI config: plugins is not a list")?;
    anyhow::ensure!(!plugins.is_empty(), "CNI config has no plugins");
    plugins.retain(|p| p["type"] != "moat-cni");
    plugins.insert(1, moat);
    Ok(list)
}

/// The configuration the runtime would use if Moat's were absent: the first `*.conflist`,
/// `*.conf` or `*.json` of the directory in name order, other than Moat's own files.
pub fn find_base_config(conf_dir: &Path) -> anyhow::Result<Option<(PathBuf, serde_json::Value)>> {
    let mut names: Vec<PathBuf> = match fs::read_dir(conf_dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", conf_dir.display())),
    };
    names.sort();
    for path in names {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let is_config = [".conflist", ".conf", ".json"]
            .iter()
            .any(|s| name.ends_with(s));
        if !is_config
            || name.starts_with('.')
            || name == CHAINED_CONFLIST_NAME
            || name == CONFLIST_NAME
        {
            continue;
        }
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let value = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        return Ok(Some((path, value)));
    }
    Ok(None)
}

/// Chained mode, one pass: (re)writes Moat's chained conflist from the current base config.
/// Returns the base's path, or `None` while the directory has no other CNI config yet.
pub fn sync_chained(conf_dir: &Path, moat: &serde_json::Value) -> anyhow::Result<Option<PathBuf>> {
    let Some((base_path, base)) = find_base_config(conf_dir)? else {
        return Ok(None);
    };
    let list = chained_conflist(&base, moat.clone())?;
    let target = conf_dir.join(CHAINED_CONFLIST_NAME);
    let current: Option<serde_json::Value> = fs::read(&target)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if current.as_ref() != Some(&list) {
        write_atomically(&target, &serde_json::to_vec_pretty(&list)?, 0o644)?;
    }
    Ok(Some(base_path))
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

    fn kindnet() -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "0.3.1", "name": "kindnet",
            "plugins": [
                {"type": "ptp", "ipMasq": false,
                 "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state",
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "ranges": [[{"subnet": "10.244.1.0/24"}]]},
                 "mtu": 1500},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn moat() -> serde_json::Value {
        moat_plugin(
            CniMode::Chained,
            Path::new("/run/moat/moatd.sock"),
            Path::new("/sys/fs/bpf/moat"),
            None,
        )
    }

    #[test]
    fn chained_conflist_puts_moat_after_the_interface_plugin() {
        let list = chained_conflist(&kindnet(), moat()).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, vec!["ptp", "moat-cni", "portmap"]);
        assert_eq!(list["name"], "kindnet");
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(list["plugins"][1]["mode"], "chained");
        assert!(list["plugins"][1].get("ipam").is_none());
        // Idempotent: chaining the chained list changes nothing.
        assert_eq!(chained_conflist(&list, moat()).unwrap(), list);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let conf = serde_json::json!({"cniVersion": "0.4.0", "name": "br", "type": "bridge",
                                      "bridge": "cni0", "ipam": {"type": "host-local"}});
        let list = chained_conflist(&conf, moat()).unwrap();
        assert_eq!(list["name"], "br");
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert!(list["plugins"][0].get("name").is_none());
        assert_eq!(list["plugins"][1]["type"], "moat-cni");
    }

    #[test]
    fn sync_chained_follows_the_base_config_and_ignores_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(sync_chained(dir.path(), &moat()).unwrap(), None);
        // Moat's own standalone file is not a base.
        write_conflist(
            dir.path(),
            &serde_json::json!({"name": "moat", "plugins": []}),
        )
        .unwrap();
        assert_eq!(sync_chained(dir.path(), &moat()).unwrap(), None);
        let base = dir.path().join("10-kindnet.conflist");
        fs::write(&base, serde_json::to_vec(&kindnet()).unwrap()).unwrap();
        assert_eq!(
            sync_chained(dir.path(), &moat()).unwrap(),
            Some(base.clone())
        );
        let read = || -> serde_json::Value {
            serde_json::from_slice(&fs::read(dir.path().join(CHAINED_CONFLIST_NAME)).unwrap())
                .unwrap()
        };
        assert_eq!(read(), chained_conflist(&kindnet(), moat()).unwrap());
        // The cluster's CNI rewrites its file: the chained copy follows.
        let mut changed = kindnet();
        changed["plugins"][0]["mtu"] = 1400.into();
        fs::write(&base, serde_json::to_vec(&changed).unwrap()).unwrap();
        sync_chained(dir.path(), &moat()).unwrap();
        assert_eq!(read()["plugins"][0]["mtu"], 1400);
        assert_eq!(read()["plugins"][1]["type"], "moat-cni");
    }

    #[test]
    fn standalone_mtu_reaches_the_moat_plugin() {
        let cidrs: Vec<IpNetwork> = vec!["10.244.1.0/24".parse().unwrap()];
        let list = standalone_conflist(
            &cidrs,
            Path::new("/run/moat/moatd.sock"),
            Path::new("/sys/fs/bpf/moat"),
            Some(1450),
        );
        assert_eq!(list["plugins"][0]["mtu"], 1450);
        assert_eq!(
            conflist(&cidrs, Path::new("/s"), Path::new("/p"))["plugins"][0].get("mtu"),
            None
        );
    }
}
