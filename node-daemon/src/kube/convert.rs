//! Kubernetes objects to the datastore's own shapes, with no I/O: what a Pod, Namespace,
//! NetworkPolicy, MoatPolicy or Node means to Moat. Kept apart from the watches so that it is tested in
//! milliseconds and the watch shell stays thin.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::{
    core::v1::{Container, Namespace, Node, Pod},
    networking::v1::NetworkPolicy as KubeNetworkPolicy,
};
use moat_policy::{ContainerPort, LabelSet, Mode, NetworkPolicy, Protocol};

use crate::local::{MODE_ANNOTATION, PodMeta};

/// (namespace, name); cluster-scoped objects have an empty namespace.
pub type ObjectKey = (String, String);

/// What the datastore keeps of this node's Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// spec.podCIDRs (or the older single spec.podCIDR).
    pub pod_cidrs: Vec<IpNetwork>,
    /// status.addresses that are IP addresses (InternalIP, ExternalIP); host names are left out.
    pub addresses: Vec<IpAddr>,
}

/// A converted Pod. `meta` is `None` when the pod carries no identity Moat should know:
/// host-network pods (they are the node) and pods that have finished (Succeeded, Failed),
/// whose addresses may already belong to someone else.
#[derive(Clone, Debug, PartialEq)]
pub struct PodItem {
    pub key: ObjectKey,
    pub meta: Option<PodMeta>,
    /// A problem that did not stop the pod from being used, e.g. an unknown mode annotation.
    pub warning: Option<String>,
}

fn labels_of(map: Option<&std::collections::BTreeMap<String, String>>) -> LabelSet {
    let mut labels = LabelSet::new();
    for (k, v) in map.into_iter().flatten() {
        labels.insert(k.clone(), v.clone());
    }
    labels
}

pub fn namespace_key(ns: &Namespace) -> ObjectKey {
    (String::new(), ns.metadata.name.clone().unwrap_or_default())
}

pub fn namespace_labels(ns: &Namespace) -> LabelSet {
    labels_of(ns.metadata.labels.as_ref())
}

pub fn pod_key(pod: &Pod) -> ObjectKey {
    (
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

fn protocol_of(protocol: Option<&str>) -> Option<Protocol> {
    match protocol {
        None | Some("TCP") => Some(Protocol::TCP),
        Some("UDP") => Some(Protocol::UDP),
        Some("SCTP") => Some(Protocol::SCTP),
        Some(_) => None,
    }
}

fn named_ports(containers: &[Container], out: &mut Vec<ContainerPort>) {
    for c in containers {
        for p in c.ports.iter().flatten() {
            let Some(name) = &p.name else { continue };
            let (Ok(port), Some(protocol)) = (
                u16::try_from(p.container_port),
                protocol_of(p.protocol.as_deref()),
            ) else {
                continue;
            };
            if port == 0 {
                continue;
            }
            out.push(ContainerPort {
                name: name.clone(),
                port,
                protocol,
            });
        }
    }
}

pub fn pod_item(pod: &Pod) -> PodItem {
    let key = pod_key(pod);
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let finished = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if host_network || finished {
        return PodItem {
            key,
            meta: None,
            warning: None,
        };
    }
    let mut meta = PodMeta {
        labels: labels_of(pod.metadata.labels.as_ref()),
        ..PodMeta::default()
    };
    let mut warning = None;
    if let Some(mode) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MODE_ANNOTATION))
    {
        match mode.parse::<Mode>() {
            Ok(mode) => meta.mode = Some(mode),
            // The pod is kept (its labels still name it in other pods' policies); only the
            // annotation is ignored, so the pod runs in the mode it would have without it
            // (its MoatPolicies' strictest, else enforce), never a laxer one guessed from a
            // typo. The warning is listed with the rejected objects (`moatctl status`).
            Err(e) => {
                warning = Some(format!(
                    "Pod {}/{}: annotation {MODE_ANNOTATION}: {e}; the default mode applies",
                    key.0, key.1
                ))
            }
        }
    }
    if let Some(spec) = spec {
        named_ports(&spec.containers, &mut meta.ports);
        // Sidecars (init containers that keep running) serve their ports like containers.
        let sidecars: Vec<Container> = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"))
            .cloned()
            .collect();
        named_ports(&sidecars, &mut meta.ports);
    }
    if let Some(status) = status {
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        meta.ips = ips;
    }
    PodItem {
        key,
        meta: Some(meta),
        warning,
    }
}

pub fn policy_key(policy: &KubeNetworkPolicy) -> ObjectKey {
    (
        policy
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        policy.metadata.name.clone().unwrap_or_default(),
    )
}

/// Through the policy crate's own parser, so that a Kubernetes object and a local YAML file
/// are judged by the same rules. The error names the object and the field.
pub fn network_policy(policy: &KubeNetworkPolicy) -> Result<NetworkPolicy, String> {
    let value = serde_json::to_value(policy).map_err(|e| {
        let (ns, name) = policy_key(policy);
        format!("{ns}/{name}: not serializable: {e}")
    })?;
    NetworkPolicy::from_value(value).map_err(|e| e.to_string())
}

pub fn moat_policy_key(policy: &moat_crds::MoatPolicy) -> ObjectKey {
    (
        policy
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        policy.metadata.name.clone().unwrap_or_default(),
    )
}

/// The CRD type's own conversion (the engine's parser and validation behind it), so that a
/// MoatPolicy from the API server and one from a local YAML file are judged alike.
pub fn moat_policy(policy: &moat_crds::MoatPolicy) -> Result<moat_policy::MoatPolicy, String> {
    policy.to_policy().map_err(|e| {
        let (ns, name) = moat_policy_key(policy);
        let text = e.to_string();
        // The engine's errors already name the object; others do not.
        if text.contains(&format!("{ns}/{name}")) {
            text
        } else {
            format!("{ns}/{name}: {text}")
        }
    })
}

pub fn node_key(node: &Node) -> ObjectKey {
    (
        String::new(),
        node.metadata.name.clone().unwrap_or_default(),
    )
}

pub fn node_info(node: &Node) -> NodeInfo {
    let mut info = NodeInfo::default();
    if let Some(spec) = &node.spec {
        let cidrs: Vec<&String> = match &spec.pod_cidrs {
            Some(list) if !list.is_empty() => list.iter().collect(),
            _ => spec.pod_cidr.iter().collect(),
        };
        info.pod_cidrs = cidrs.into_iter().filter_map(|c| c.parse().ok()).collect();
    }
    if let Some(status) = &node.status {
        for a in status.addresses.iter().flatten() {
            if let Ok(ip) = a.address.parse::<IpAddr>()
                && !info.addresses.contains(&ip)
            {
                info.addresses.push(ip);
            }
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn pod_keeps_labels_named_ports_mode_and_ips() {
        let p = pod(json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                         "annotations": {"moat.io/mode": "audit"}},
            "spec": {"containers": [
                {"name": "c", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"containerPort": 9000}
                ]}],
                "initContainers": [
                    {"name": "side", "restartPolicy": "Always", "ports": [{"name": "m", "containerPort": 9090}]},
                    {"name": "init", "ports": [{"name": "x", "containerPort": 1}]}
                ]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }));
        let item = pod_item(&p);
        assert_eq!(item.key, ("shop".to_string(), "web".to_string()));
        assert_eq!(item.warning, None);
        let meta = item.meta.unwrap();
        assert_eq!(meta.labels.get("app"), Some("web"));
        assert_eq!(meta.mode, Some(Mode::Audit));
        let ports: Vec<(&str, u16, Protocol)> = meta
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            vec![
                ("http", 8080, Protocol::TCP),
                ("dns", 53, Protocol::UDP),
                ("m", 9090, Protocol::TCP)
            ]
        );
        assert_eq!(
            meta.ips,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn host_network_and_finished_pods_carry_no_identity() {
        for value in [
            json!({"metadata": {"name": "h", "namespace": "kube-system"}, "spec": {"hostNetwork": true, "containers": []}}),
            json!({"metadata": {"name": "done", "namespace": "a"}, "spec": {"containers": []}, "status": {"phase": "Succeeded"}}),
            json!({"metadata": {"name": "bad", "namespace": "a"}, "spec": {"containers": []}, "status": {"phase": "Failed"}}),
        ] {
            assert_eq!(pod_item(&pod(value)).meta, None);
        }
    }

    #[test]
    fn pending_pod_without_addresses_is_kept() {
        let item = pod_item(&pod(json!({"metadata": {"name": "p", "namespace": "a"},
            "spec": {"containers": []}, "status": {"phase": "Pending"}})));
        assert!(item.meta.unwrap().ips.is_empty());
    }

    #[test]
    fn unknown_mode_annotation_warns_and_falls_back_to_default() {
        let item = pod_item(&pod(json!({"metadata": {"name": "p", "namespace": "a",
            "annotations": {"moat.io/mode": "relaxed"}}})));
        assert_eq!(item.meta.unwrap().mode, None);
        let warning = item.warning.unwrap();
        assert!(
            warning.contains("a/p") && warning.contains("relaxed"),
            "{warning}"
        );
    }

    #[test]
    fn network_policy_converts_through_the_policy_parser() {
        let np: KubeNetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "allow", "namespace": "shop", "resourceVersion": "7", "uid": "u"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                                  "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP", "endPort": 60}]}],
                     "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        let policy = network_policy(&np).unwrap();
        assert_eq!((policy.namespace(), policy.name()), ("shop", "allow"));
    }

    #[test]
    fn invalid_network_policy_names_object_and_field() {
        let np: KubeNetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}
        }))
        .unwrap();
        let err = network_policy(&np).unwrap_err();
        assert!(err.contains("shop/bad"), "{err}");
        assert!(err.contains("spec.ingress[0].ports[0].port"), "{err}");
    }

    #[test]
    fn node_info_reads_pod_cidrs_and_ip_addresses() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "fd00::10"}
            ]}
        }))
        .unwrap();
        let info = node_info(&node);
        assert_eq!(
            info.pod_cidrs,
            vec![
                "10.244.1.0/24".parse::<IpNetwork>().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(
            info.addresses,
            vec![
                "192.168.1.10".parse::<IpAddr>().unwrap(),
                "fd00::10".parse().unwrap()
            ]
        );
        let old: Node = serde_json::from_value(
            json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.0.0/24"}}),
        )
        .unwrap();
        assert_eq!(node_info(&old).pod_cidrs.len(), 1);
    }
}
