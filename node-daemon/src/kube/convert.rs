//! Kubernetes objects to the datastore's own shapes, with no I/O: what a Pod, Namespace,
//! NetworkPolicy, MoatPolicy, ClusterNetworkPolicy or Node means to Moat. Kept apart from the watches so that it is tested in
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
    meta.quarantine = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::quarantine::ANNOTATION))
        .is_some_and(|v| v == "true");
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

// ---------------------------------------------------------------------------------------------
// ClusterNetworkPolicy (policy.networking.k8s.io, issue 17)
// ---------------------------------------------------------------------------------------------

/// The versions moatd may watch, preferred first. Both carry one schema (moat_policy::cnp), so
/// the first one the API server serves is used: v1beta1 (the storage version of Moat's CRD),
/// else v1alpha2 (what upstream's v0.2 CRD and other implementations install).
pub const CLUSTER_POLICY_VERSIONS: [&str; 2] = ["v1beta1", "v1alpha2"];

pub const CLUSTER_POLICY_PLURAL: &str = "clusternetworkpolicies";

/// The condition type moatd writes on each ClusterNetworkPolicy's status. Upstream defines
/// `status.conditions` (metav1.Condition, merged on `type`) but names no type; `Accepted` is
/// the Gateway API's convention for "the implementation took the object", which this is.
pub const ACCEPTED_CONDITION: &str = "Accepted";
/// Reasons of the Accepted condition (CamelCase, as metav1.Condition requires).
pub const ACCEPTED_REASON: &str = "Accepted";
pub const INVALID_REASON: &str = "Invalid";

/// The API resource of one ClusterNetworkPolicy version (cluster-scoped).
pub fn cluster_policy_resource(version: &str) -> kube::core::ApiResource {
    kube::core::ApiResource {
        group: moat_policy::cnp::API_GROUP.into(),
        version: version.into(),
        api_version: format!("{}/{version}", moat_policy::cnp::API_GROUP),
        kind: moat_policy::cnp::KIND.into(),
        plural: CLUSTER_POLICY_PLURAL.into(),
    }
}

pub fn cluster_policy_key(object: &kube::core::DynamicObject) -> ObjectKey {
    (
        String::new(),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

/// The object as moat_policy reads it: the whole object, with its apiVersion and kind (list
/// items may come without them; `version` is the one it was read at), minus what the API
/// server and implementations add (status) and that means nothing to policy. The metadata is
/// reduced by moat_policy itself (it keeps name, labels, annotations).
fn cluster_policy_value(
    object: &kube::core::DynamicObject,
    version: &str,
) -> Result<serde_json::Value, String> {
    let mut value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
        map.entry("apiVersion").or_insert_with(|| {
            serde_json::json!(format!("{}/{version}", moat_policy::cnp::API_GROUP))
        });
        map.entry("kind")
            .or_insert_with(|| serde_json::json!(moat_policy::cnp::KIND));
    }
    Ok(value)
}

/// Parsed and validated by the engine's own `ClusterNetworkPolicy::from_value`, so that a CNP
/// from the API server and one from a local YAML file are judged alike. Err: "<name>: reason".
pub fn cluster_policy(
    object: &kube::core::DynamicObject,
    version: &str,
) -> Result<moat_policy::ClusterNetworkPolicy, String> {
    let name = cluster_policy_key(object).1;
    let result = cluster_policy_value(object, version)
        .and_then(|v| moat_policy::ClusterNetworkPolicy::from_value(v).map_err(|e| e.to_string()));
    result.map_err(|text| {
        if text.starts_with(&name) {
            text
        } else {
            format!("{name}: {text}")
        }
    })
}

/// The Accepted condition moatd wants on a CNP: (status, reason, message).
pub fn accepted_condition(
    policy: &Result<moat_policy::ClusterNetworkPolicy, String>,
) -> (&'static str, &'static str, String) {
    match policy {
        Ok(_) => (
            "True",
            ACCEPTED_REASON,
            "Moat accepted the policy: it is valid and enforced in its tier".into(),
        ),
        Err(e) => {
            // metav1.Condition's message is at most 32768 bytes.
            let mut message = format!(
                "Moat rejected the policy (its last good version, if any, stays in force): {e}"
            );
            if message.len() > 32768 {
                let mut end = 32768;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
            }
            ("False", INVALID_REASON, message)
        }
    }
}

/// A status write moatd owes one ClusterNetworkPolicy.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusPatch {
    pub name: String,
    /// The version the object was watched at; the patch goes to the same one.
    pub version: String,
    /// The object's resourceVersion when it was read.
    pub resource_version: String,
    /// (status, reason, message, observedGeneration): what the patch sets, timestamps aside.
    pub wanted: (String, String, String, Option<i64>),
    /// A JSON merge patch of `status.conditions`: the object's other conditions as they were,
    /// Accepted replaced (a merge patch replaces a list whole; CRDs take no strategic merge).
    pub body: serde_json::Value,
}

/// The status patch a CNP needs, or None when its Accepted condition already says what moatd
/// would write (status, reason, message and observedGeneration): a resync or a relist of an
/// unchanged object writes nothing, and neither does the event of moatd's own patch.
pub fn cluster_policy_status(
    object: &kube::core::DynamicObject,
    version: &str,
    policy: &Result<moat_policy::ClusterNetworkPolicy, String>,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<StatusPatch> {
    let (status, reason, message) = accepted_condition(policy);
    let generation = object.metadata.generation;
    let conditions: Vec<serde_json::Value> = object.data["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let current = conditions.iter().find(|c| c["type"] == ACCEPTED_CONDITION);
    if let Some(c) = current
        && c["status"] == status
        && c["reason"] == reason
        && c["message"] == message.as_str()
        && c["observedGeneration"].as_i64() == generation
    {
        return None;
    }
    // lastTransitionTime moves only when the status does.
    let transition = match current {
        Some(c) if c["status"] == status && c["lastTransitionTime"].is_string() => {
            c["lastTransitionTime"].clone()
        }
        _ => serde_json::json!(now.to_string()),
    };
    let mut condition = serde_json::json!({
        "type": ACCEPTED_CONDITION,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    });
    if let Some(g) = generation {
        condition["observedGeneration"] = serde_json::json!(g);
    }
    let mut all: Vec<serde_json::Value> = conditions
        .into_iter()
        .filter(|c| c["type"] != ACCEPTED_CONDITION)
        .collect();
    all.push(condition);
    Some(StatusPatch {
        name: cluster_policy_key(object).1,
        version: version.to_string(),
        resource_version: object.metadata.resource_version.clone().unwrap_or_default(),
        wanted: (status.into(), reason.into(), message, generation),
        body: serde_json::json!({"status": {"conditions": all}}),
    })
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

    fn cnp_object(priority: i64, status: serde_json::Value) -> kube::core::DynamicObject {
        // As a list item: no apiVersion nor kind, with what the API server adds.
        serde_json::from_value(json!({
            "metadata": {"name": "guard", "uid": "u-1", "resourceVersion": "7",
                         "generation": 3, "managedFields": [{"manager": "kubectl"}]},
            "spec": {"tier": "Baseline", "priority": priority,
                     "subject": {"namespaces": {}},
                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn cluster_policy_reads_an_api_object_like_a_local_file() {
        let object = cnp_object(100, json!({"conditions": []}));
        let from_api = cluster_policy(&object, "v1alpha2").unwrap();
        let local = moat_policy::ClusterNetworkPolicy::from_yaml(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Baseline\n  priority: 100\n  subject: {namespaces: {}}\n  ingress: [{action: Deny, from: [{namespaces: {}}]}]\n",
        )
        .unwrap();
        assert_eq!(from_api, local);
        let error = cluster_policy(&cnp_object(1001, json!({})), "v1beta1").unwrap_err();
        assert!(error.starts_with("guard"), "{error}");
        assert!(error.contains("priority"), "{error}");
    }

    #[test]
    fn cluster_policy_status_is_written_only_when_it_would_change() {
        let now: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        let object = cnp_object(
            100,
            json!({"conditions": [
            {"type": "Other", "status": "True", "reason": "X", "message": "",
             "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
        );
        let policy = cluster_policy(&object, "v1beta1");
        let patch = cluster_policy_status(&object, "v1beta1", &policy, now).unwrap();
        assert_eq!(patch.version, "v1beta1");
        assert_eq!(patch.resource_version, "7");
        let conditions = patch.body["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 2, "the other condition is kept");
        let accepted = &conditions[1];
        assert_eq!(accepted["type"], "Accepted");
        assert_eq!(accepted["status"], "True");
        assert_eq!(accepted["reason"], "Accepted");
        assert_eq!(accepted["observedGeneration"], 3);
        assert_eq!(accepted["lastTransitionTime"], "2026-01-02T03:04:05Z");
        // Once written, the same object needs nothing.
        let written = cnp_object(100, patch.body["status"].clone());
        assert_eq!(
            cluster_policy_status(&written, "v1beta1", &policy, now),
            None
        );
        // Rejected: False, with the reason; the transition time moves.
        let bad = cnp_object(1001, patch.body["status"].clone());
        let rejected = cluster_policy(&bad, "v1beta1");
        let later: k8s_openapi::jiff::Timestamp = "2026-01-02T04:00:00Z".parse().unwrap();
        let patch = cluster_policy_status(&bad, "v1beta1", &rejected, later).unwrap();
        let accepted = &patch.body["status"]["conditions"][1];
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "Invalid");
        assert!(
            accepted["message"].as_str().unwrap().contains("priority"),
            "{accepted}"
        );
        assert_eq!(accepted["lastTransitionTime"], "2026-01-02T04:00:00Z");
    }
}
