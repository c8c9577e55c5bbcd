//! The kind releases kind-tests/ is written against are pinned in one file,
//! kind-tests/versions.env. No kind or Docker runs on the build machines, so what can be
//! checked without them is checked here: the pins agree with moatd's kindnet detection (the
//! old pin's kindnetd does not enforce NetworkPolicy, the new one's does, and the date both
//! go by is the same), the node images are pinned by digest and new enough for the
//! DaemonSet, the kind configs are what the scripts and the manifests assume, and no other
//! kind-tests file names a version.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use moatd::install::{KIND_KINDNETD_POLICY_SINCE, KindnetPolicy, kindnet_policy};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn pins() -> BTreeMap<String, String> {
    read("kind-tests/versions.env")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("versions.env: not KEY=VALUE: {l}"));
            assert!(
                !v.is_empty() && !v.contains(['"', '\'', '$', ' ', '`']),
                "versions.env: {k} must be a plain value, not {v:?}"
            );
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// kind's kindnet DaemonSet (pkg/build/nodeimage/const_cni.go) running `image`.
fn kind_kindnet(image: &str) -> k8s_openapi::api::apps::v1::DaemonSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "kindnet", "namespace": "kube-system"},
        "spec": {
            "selector": {"matchLabels": {"app": "kindnet"}},
            "template": {
                "metadata": {"labels": {"app": "kindnet"}},
                "spec": {"containers": [{"name": "kindnet-cni", "image": image}]}
            }
        }
    }))
    .unwrap()
}

/// `v0.23.0` -> (0, 23, 0).
fn semver(version: &str) -> (u32, u32, u32) {
    let parts: Vec<u32> = version
        .strip_prefix('v')
        .unwrap_or_else(|| panic!("{version}: no leading v"))
        .split('.')
        .map(|p| p.parse().unwrap_or_else(|e| panic!("{version}: {e}")))
        .collect();
    assert_eq!(parts.len(), 3, "{version}");
    (parts[0], parts[1], parts[2])
}

#[test]
fn the_pins_agree_with_moatds_kindnet_detection() {
    let pins = pins();
    let keys: Vec<&str> = pins.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "KINDNETD_NETPOL_SINCE",
            "KIND_NEW_KINDNETD",
            "KIND_NEW_NODE_IMAGE",
            "KIND_NEW_VERSION",
            "KIND_OLD_KINDNETD",
            "KIND_OLD_NODE_IMAGE",
            "KIND_OLD_VERSION",
        ]
    );
    // run.sh's kindnetd_enforces and moatd go by the same date.
    assert_eq!(
        pins["KINDNETD_NETPOL_SINCE"].parse::<u32>().unwrap(),
        KIND_KINDNETD_POLICY_SINCE
    );
    // old: kind before v0.24.0, a kindnet Moat chains onto; new: v0.24.0 or later, refused.
    assert!(semver(&pins["KIND_OLD_VERSION"]) < (0, 24, 0));
    assert!(semver(&pins["KIND_NEW_VERSION"]) >= (0, 24, 0));
    let old = kindnet_policy(&kind_kindnet(&pins["KIND_OLD_KINDNETD"]));
    assert!(matches!(old, KindnetPolicy::NotEnforcing(_)), "{old:?}");
    let new = kindnet_policy(&kind_kindnet(&pins["KIND_NEW_KINDNETD"]));
    assert!(matches!(new, KindnetPolicy::Enforcing(_)), "{new:?}");
    for key in ["KIND_OLD_KINDNETD", "KIND_NEW_KINDNETD"] {
        assert!(
            pins[key].starts_with("docker.io/kindest/kindnetd:v"),
            "{key}: kind's manifest names docker.io/kindest/kindnetd: {}",
            pins[key]
        );
    }
}

#[test]
fn node_images_are_pinned_by_digest_and_new_enough_for_the_daemonset() {
    let pins = pins();
    let mut minors = Vec::new();
    for key in ["KIND_OLD_NODE_IMAGE", "KIND_NEW_NODE_IMAGE"] {
        let image = &pins[key];
        let (name, digest) = image
            .split_once("@sha256:")
            .unwrap_or_else(|| panic!("{key}: not pinned by digest: {image}"));
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{key}: {digest}"
        );
        let version = name
            .strip_prefix("kindest/node:")
            .unwrap_or_else(|| panic!("{key}: not a kindest/node image: {image}"));
        let (major, minor, _) = semver(version);
        // securityContext.appArmorProfile in manifests/daemonset.yaml: Kubernetes >= 1.30.
        assert!(major == 1 && minor >= 30, "{key}: Kubernetes {version}");
        minors.push(minor);
    }
    assert!(minors[0] <= minors[1], "the old pin is newer: {minors:?}");
    let daemonset = read("manifests/daemonset.yaml");
    assert!(daemonset.contains("appArmorProfile:"));
}

fn kind_config(mode: &str) -> Value {
    let path = format!("kind-tests/kind-{mode}.yaml");
    let mut docs = moat_policy::yaml::documents(&read(&path)).unwrap();
    assert_eq!(docs.len(), 1, "{path}");
    docs.remove(0)
}

#[test]
fn kind_configs_are_what_the_scripts_and_the_manifests_assume() {
    let configmap = moat_policy::yaml::documents(&read("manifests/configmap.yaml"))
        .unwrap()
        .remove(0);
    let service_cidrs: Vec<ipnetwork::IpNetwork> = configmap["data"]["service-cidrs"]
        .as_str()
        .unwrap()
        .split(',')
        .map(|c| c.parse().unwrap())
        .collect();
    let mut pod_subnets = Vec::new();
    for (mode, disable_default_cni) in [("standalone", true), ("chained", false)] {
        let config = kind_config(mode);
        // The one config API every kind release since v0.8.0 reads (v0.23.0 and v0.32.0
        // alike: pkg/internal/apis/config/encoding/load.go).
        assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4", "{mode}");
        assert_eq!(config["kind"], "Cluster", "{mode}");
        let net = &config["networking"];
        // Standalone: kind applies no kindnet; chained: kindnet is the primary CNI.
        assert_eq!(net["disableDefaultCNI"], disable_default_cni, "{mode}");
        assert_eq!(net["ipFamily"], "ipv4", "{mode}");
        assert!(
            ["iptables", "ipvs", "nftables", "none"]
                .contains(&net["kubeProxyMode"].as_str().unwrap()),
            "{mode}: kubeProxyMode {}",
            net["kubeProxyMode"]
        );
        let pods: ipnetwork::IpNetwork = net["podSubnet"].as_str().unwrap().parse().unwrap();
        pod_subnets.push(pods);
        let services: ipnetwork::IpNetwork =
            net["serviceSubnet"].as_str().unwrap().parse().unwrap();
        assert!(
            service_cidrs
                .iter()
                .any(|c| c.contains(services.network()) && c.prefix() <= services.prefix()),
            "{mode}: serviceSubnet {services} outside moat-config service-cidrs {service_cidrs:?}"
        );
        // One control plane and two workers: netpol-smoke.sh needs two workers.
        let roles: Vec<&str> = config["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["control-plane", "worker", "worker"], "{mode}");
    }
    // The same pod range in both modes (kind's default, 10.244.0.0/16), apart from Services.
    assert_eq!(pod_subnets[0], pod_subnets[1]);
    assert!(
        !service_cidrs
            .iter()
            .any(|c| c.contains(pod_subnets[0].network()))
    );
}

#[test]
fn versions_are_named_in_versions_env_only() {
    let pins = pins();
    for script in ["kind-tests/run.sh", "kind-tests/matrix.sh"] {
        assert!(
            read(script).contains(". \"$HERE/versions.env\""),
            "{script} does not source versions.env"
        );
    }
    let dir = repo().join("kind-tests");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !path.is_file() || name == "versions.env" || name.ends_with(".md") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in ["kindest/node:v", "kindest/kindnetd:v2"]
            .into_iter()
            .chain(pins.values().map(String::as_str))
        {
            assert!(
                !text.contains(needle),
                "kind-tests/{name} names {needle:?}: pins belong in versions.env"
            );
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} files checked");
}
