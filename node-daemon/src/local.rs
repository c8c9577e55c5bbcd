//! The `local` datastore: Kubernetes-shaped YAML objects in a directory. Namespaces and Pods
//! (labels, container ports, the `moat.io/mode` annotation) describe workloads; NetworkPolicy
//! objects describe their perimeters. An object that does not parse or validate is reported
//! with the reason and left out; everything else keeps working.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use moat_policy::{ContainerPort, LabelSet, MoatPolicy, NetworkPolicy, Protocol};
use serde::Deserialize;

pub const MODE_ANNOTATION: &str = "moat.io/mode";

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodMeta {
    pub labels: LabelSet,
    pub ports: Vec<ContainerPort>,
    pub mode: Option<String>,
    /// Addresses the datastore reports (status.podIPs). Pods that are not registered on
    /// this node but have addresses are remote workloads: they get ipcache entries so that
    /// policy can name them.
    pub ips: Vec<std::net::IpAddr>,
}

#[derive(Clone, Debug, Default)]
pub struct LocalObjects {
    pub namespaces: BTreeMap<String, LabelSet>,
    pub pods: BTreeMap<(String, String), PodMeta>,
    pub policies: BTreeMap<(String, String), NetworkPolicy>,
    /// Moat's own policy objects (mode, default-deny posture, external CIDR groups).
    pub moat_policies: BTreeMap<(String, String), MoatPolicy>,
    /// "<file>: <kind> <ns/name>: <reason>"
    pub rejected: Vec<String>,
}

#[derive(Deserialize)]
struct Header {
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct NamespaceObject {
    metadata: Meta,
}

#[derive(Deserialize)]
struct PodObject {
    metadata: Meta,
    #[serde(default)]
    spec: Option<PodSpec>,
    #[serde(default)]
    status: Option<PodStatus>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    // Kubernetes spells it podIPs, which camelCase would not produce.
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIp>,
}

#[derive(Deserialize)]
struct PodIp {
    ip: std::net::IpAddr,
}

#[derive(Deserialize, Default)]
struct PodSpec {
    #[serde(default)]
    containers: Vec<Container>,
}

#[derive(Deserialize)]
struct Container {
    #[serde(default)]
    ports: Vec<PortObject>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortObject {
    #[serde(default)]
    name: Option<String>,
    container_port: u16,
    #[serde(default)]
    protocol: Option<Protocol>,
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A fingerprint of the directory, so the watcher reloads only on change.
pub fn fingerprint(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    yaml_files(dir)
        .into_iter()
        .map(|p| {
            let body = fs::read(&p).unwrap_or_default();
            (p, body)
        })
        .collect()
}

pub fn load(dir: &Path) -> LocalObjects {
    let mut out = LocalObjects::default();
    for path in yaml_files(dir) {
        let file = path.display().to_string();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                out.rejected.push(format!("{file}: {e}"));
                continue;
            }
        };
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    out.rejected.push(format!("{file}: not YAML: {e}"));
                    continue;
                }
            };
            if value.is_null() {
                continue;
            }
            if let Err(reason) = add_object(&mut out, value) {
                out.rejected.push(format!("{file}: {reason}"));
            }
        }
    }
    out
}

fn add_object(out: &mut LocalObjects, value: serde_yaml::Value) -> Result<(), String> {
    let json: serde_json::Value = serde_json::to_value(&value).map_err(|e| e.to_string())?;
    let header: Header = serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
    match header.kind.as_deref() {
        Some("Namespace") => {
            let ns: NamespaceObject =
                serde_json::from_value(json).map_err(|e| format!("Namespace: {e}"))?;
            let mut labels = LabelSet::new();
            for (k, v) in ns.metadata.labels {
                labels.insert(k, v);
            }
            out.namespaces.insert(ns.metadata.name, labels);
        }
        Some("Pod") => {
            let pod: PodObject = serde_json::from_value(json).map_err(|e| format!("Pod: {e}"))?;
            let namespace = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let mut meta = PodMeta::default();
            for (k, v) in &pod.metadata.labels {
                meta.labels.insert(k.clone(), v.clone());
            }
            if let Some(mode) = pod.metadata.annotations.get(MODE_ANNOTATION) {
                if !matches!(mode.as_str(), "enforce" | "audit" | "learn") {
                    return Err(format!(
                        "Pod {namespace}/{}: annotation {MODE_ANNOTATION}={mode:?} must be enforce, audit or learn",
                        pod.metadata.name
                    ));
                }
                meta.mode = Some(mode.clone());
            }
            meta.ips = pod
                .status
                .unwrap_or_default()
                .pod_ips
                .into_iter()
                .map(|p| p.ip)
                .collect();
            for c in pod.spec.unwrap_or_default().containers {
                for p in c.ports {
                    if let Some(name) = p.name {
                        meta.ports.push(ContainerPort {
                            name,
                            port: p.container_port,
                            protocol: p.protocol.unwrap_or_default(),
                        });
                    }
                }
            }
            out.pods.insert((namespace, pod.metadata.name), meta);
        }
        Some("NetworkPolicy") => {
            let policy = NetworkPolicy::from_value(json).map_err(|e| e.to_string())?;
            out.policies.insert(
                (policy.namespace().to_string(), policy.name().to_string()),
                policy,
            );
        }
        Some("MoatPolicy") => {
            let policy = MoatPolicy::from_value(json).map_err(|e| e.to_string())?;
            out.moat_policies.insert(
                (policy.namespace().to_string(), policy.name().to_string()),
                policy,
            );
        }
        Some(other) => return Err(format!("unsupported kind {other:?}")),
        None => return Err("object without a kind".into()),
    }
    Ok(())
}
