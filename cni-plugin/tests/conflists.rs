//! The conflists Moat installs pass the configuration rules of the CNI checklist
//! (cni-plugin/cni-spec-checklist.md, items 13-15, 18-22, 88-89), and moat-cni's
//! own parser accepts its entry in each. The conflists are the ones moatd writes
//! (node-daemon/src/install.rs): standalone over a node's pod CIDRs, and chained onto kindnet's
//! (what kind-tests' chained cluster runs) and onto a single-plugin bridge `.conf`; plus any
//! `*.conflist` checked in under manifests/ or kind-tests/.

use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use moat_testkit::cni::Exec;
use moatd::install::{self, CniMode};
use serde_json::{Value, json};

const TOP_LEVEL_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "plugins",
    "disableCheck",
    "disableGC",
    "loadOnlyInlinedPlugins",
];
/// CONVENTIONS.md's well-known capabilities.
const CAPABILITIES: &[&str] = &[
    "portMappings",
    "ipRanges",
    "bandwidth",
    "dns",
    "ips",
    "mac",
    "infinibandGUID",
    "deviceID",
    "aliases",
    "cgroupPath",
];

fn moat_cni() -> &'static str {
    env!("CARGO_BIN_EXE_moat-cni")
}

/// Versions moat-cni lists in its VERSION answer.
fn supported_versions() -> Vec<String> {
    let out = Exec::new(moat_cni(), "VERSION").run(None).unwrap();
    assert!(out.status.success());
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    answer["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Every rule a conflist file must meet; returns the violations.
fn violations(list: &Value, supported: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(top) = list.as_object() else {
        return vec!["not a JSON object".into()];
    };
    for key in top.keys() {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            out.push(format!("item 88: unknown top-level key {key}"));
        }
    }
    match list["cniVersion"].as_str() {
        Some(v) if supported.iter().any(|s| s == v) => {}
        other => out.push(format!(
            "item 13: cniVersion {other:?} not supported by moat-cni ({supported:?})"
        )),
    }
    match list["name"].as_str() {
        Some(n) if valid_name(n) => {}
        other => out.push(format!("item 14: invalid network name {other:?}")),
    }
    let Some(plugins) = list["plugins"].as_array().filter(|p| !p.is_empty()) else {
        out.push("item 88: no plugins".into());
        return out;
    };
    for (i, plugin) in plugins.iter().enumerate() {
        match plugin["type"].as_str() {
            Some(t) if !t.is_empty() && !t.contains(['/', '\\']) => {}
            other => out.push(format!("item 15: plugins[{i}].type {other:?}")),
        }
        for key in plugin.as_object().into_iter().flat_map(|o| o.keys()) {
            if key == "runtimeConfig" || key == "args" || key.starts_with("cni.dev/") {
                out.push(format!("item 89: plugins[{i}] uses reserved key {key}"));
            }
        }
        if let Some(caps) = plugin.get("capabilities") {
            for (cap, on) in caps.as_object().into_iter().flatten() {
                if !CAPABILITIES.contains(&cap.as_str()) || !on.is_boolean() {
                    out.push(format!("item 18: plugins[{i}] capability {cap}: {on}"));
                }
            }
        }
        if let Some(ipam) = plugin.get("ipam")
            && ipam["type"]
                .as_str()
                .is_none_or(|t| t.is_empty() || t.contains('/'))
        {
            out.push(format!("item 21: plugins[{i}].ipam without a valid type"));
        }
    }
    if plugins.iter().filter(|p| p["type"] == "moat-cni").count() != 1 {
        out.push("Moat's conflists carry exactly one moat-cni entry".into());
    }
    out
}

/// Runs moat-cni with the request libcni would build for its entry (the plugin object plus
/// the list's name and cniVersion), as STATUS, against a socket nobody serves: an accepted
/// configuration gets as far as asking moatd (code 50); a rejected one fails earlier with its
/// configuration error (codes 2, 6, 7). STATUS needs 1.1.0, which is the only change made.
fn moat_cni_accepts(list: &Value) -> Result<(), String> {
    let entry = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "moat-cni")
        .unwrap();
    let mut request = entry.clone();
    request["name"] = list["name"].clone();
    request["cniVersion"] = json!("1.1.0");
    let dir = tempfile::tempdir().unwrap();
    request["socket"] = json!(dir.path().join("nobody.sock"));
    request["registrationTimeoutMs"] = json!(200);
    let out = Exec::new(moat_cni(), "STATUS")
        .path(dir.path())
        .run(Some(&request))
        .unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    match answer["code"].as_u64() {
        Some(50) => Ok(()),
        _ => Err(format!(
            "moat-cni answered {answer} ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

fn kindnet() -> Value {
    // kindnet's /etc/cni/net.d/10-kindnet.conflist (kind v0.2x), one node's range.
    json!({
        "cniVersion": "0.3.1",
        "name": "kindnet",
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

fn installed_conflists() -> Vec<(String, Value)> {
    let socket = Path::new("/run/moat/moatd.sock");
    let pins = Path::new("/sys/fs/bpf/moat");
    let cidrs: Vec<IpNetwork> = vec![
        "10.244.1.0/24".parse().unwrap(),
        "fd00:10:244:1::/64".parse().unwrap(),
    ];
    let chained = install::moat_plugin(CniMode::Chained, socket, pins, None);
    let bridge = json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge",
                        "bridge": "cni0", "isGateway": true,
                        "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}});
    let mut out = vec![
        (
            "standalone".to_string(),
            install::conflist(&cidrs, socket, pins),
        ),
        (
            "standalone, mtu".to_string(),
            install::standalone_conflist(&cidrs, socket, pins, Some(1450)),
        ),
        (
            "chained onto kindnet".to_string(),
            install::chained_conflist(&kindnet(), chained.clone()).unwrap(),
        ),
        (
            "chained onto a bridge .conf".to_string(),
            install::chained_conflist(&bridge, chained).unwrap(),
        ),
    ];
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["manifests", "kind-tests"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo.join(dir))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        files.sort();
        for file in files {
            let value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            out.push((file.display().to_string(), value));
        }
    }
    out
}

#[test]
fn installed_conflists_follow_the_checklist_and_moat_cni_accepts_them() {
    let supported = supported_versions();
    for (name, list) in installed_conflists() {
        assert_eq!(
            violations(&list, &supported),
            Vec::<String>::new(),
            "{name}: {list:#}"
        );
        moat_cni_accepts(&list).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn the_checks_catch_broken_conflists() {
    let supported = supported_versions();
    let mut list = install::conflist(
        &["10.244.1.0/24".parse().unwrap()],
        Path::new("/run/moat/moatd.sock"),
        Path::new("/sys/fs/bpf/moat"),
    );
    list["name"] = json!("moat net");
    list["cniVersion"] = json!("0.2.0");
    list["plugins"][0]["runtimeConfig"] = json!({});
    list["plugins"][1]["capabilities"] = json!({"portMapping": true});
    list["plugins"][1]["type"] = json!("../portmap");
    list["disableCheckk"] = json!(true);
    let found = violations(&list, &supported);
    for item in [
        "item 88", "item 13", "item 14", "item 89", "item 18", "item 15",
    ] {
        assert!(
            found.iter().any(|v| v.starts_with(item)),
            "{item} not reported: {found:?}"
        );
    }
    // moat-cni's parser refuses a bad entry (here: standalone without ipam).
    let mut bad = installed_conflists().remove(2).1;
    bad["plugins"][1]["mode"] = json!("standalone");
    let error = moat_cni_accepts(&bad).unwrap_err();
    assert!(error.contains("\"code\":7"), "{error}");
}
