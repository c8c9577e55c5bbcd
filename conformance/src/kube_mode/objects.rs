//! The Kubernetes objects of the conformance model, as JSON, with no I/O: namespaces x, y, z,
//! pods a, b, c serving the model's ports (one agnhost container per port and protocol, as
//! upstream's netpol e2e does), one ClusterIP Service per pod, and label patches.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::cases::{Model, Proto};

/// Label that ties a pod to its Service. A key of its own, not the model's `pod` label,
/// so that a case changing the model's labels never detaches a Service.
pub const POD_KEY_LABEL: &str = "conformance.moat.io/pod";
/// On every object the runner creates (namespaces included), for cleanup by hand.
pub const MANAGED_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_VALUE: &str = "moat-conformance";

pub fn container_name(port: u16, proto: Proto) -> String {
    format!("cont-{port}-{}", proto.lower())
}

pub fn port_name(port: u16, proto: Proto) -> String {
    format!("serve-{port}-{}", proto.lower())
}

/// `x/a` -> `s-x-a` (upstream's Service naming).
pub fn service_name(pod_key: &str) -> String {
    format!("s-{}", pod_key.replace('/', "-"))
}

pub fn namespace(name: &str, labels: &BTreeMap<String, String>) -> Value {
    let mut labels = labels.clone();
    labels.insert(MANAGED_LABEL.into(), MANAGED_VALUE.into());
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    })
}

/// The pod of `key` (e.g. `x/a`), its containers serving `served`.
pub fn pod(model: &Model, key: &str, served: &[(u16, Proto)], image: &str) -> Value {
    let m = &model.pods[key];
    let mut labels = m.labels.clone();
    labels.insert(POD_KEY_LABEL.into(), m.name.clone());
    let containers: Vec<Value> = served
        .iter()
        .map(|&(port, proto)| {
            let (args, env) = match proto {
                Proto::Tcp => (
                    json!(["serve-hostname", "--tcp", "--http=false", "--port", port.to_string()]),
                    json!([]),
                ),
                Proto::Udp => (
                    json!(["serve-hostname", "--udp", "--http=false", "--port", port.to_string()]),
                    json!([]),
                ),
                Proto::Sctp => (
                    json!(["porter"]),
                    json!([{"name": format!("SERVE_SCTP_PORT_{port}"), "value": "foo"}]),
                ),
            };
            json!({
                "name": container_name(port, proto),
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/agnhost"],
                "args": args,
                "env": env,
                "ports": [{"name": port_name(port, proto), "containerPort": port, "protocol": proto.name()}],
                "securityContext": {},
            })
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": m.name, "namespace": m.namespace, "labels": labels},
        "spec": {"containers": containers, "terminationGracePeriodSeconds": 0},
    })
}

/// One ClusterIP Service per pod, one Service port per served (port, protocol).
pub fn service(model: &Model, key: &str, served: &[(u16, Proto)]) -> Value {
    let m = &model.pods[key];
    let ports: Vec<Value> = served
        .iter()
        .map(|&(port, proto)| {
            json!({"name": port_name(port, proto), "port": port, "protocol": proto.name(),
                   "targetPort": port})
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": service_name(key), "namespace": m.namespace,
                     "labels": {MANAGED_LABEL: MANAGED_VALUE}},
        "spec": {"type": "ClusterIP", "selector": {POD_KEY_LABEL: m.name}, "ports": ports},
    })
}

/// A merge patch turning `current` labels into `desired` (`null` removes a label), or `None`
/// when they are equal. Labels the runner owns (`keep`) are never removed.
pub fn label_patch(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
    keep: &[&str],
) -> Option<Value> {
    let mut changes = serde_json::Map::new();
    for (k, v) in desired {
        if current.get(k) != Some(v) {
            changes.insert(k.clone(), json!(v));
        }
    }
    for k in current.keys() {
        if !desired.contains_key(k) && !keep.contains(&k.as_str()) {
            changes.insert(k.clone(), Value::Null);
        }
    }
    (!changes.is_empty()).then(|| json!({"metadata": {"labels": changes}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_patch_sets_changes_removes_extras_and_keeps_owned_labels() {
        let current = labels(&[("pod", "a"), ("old", "1"), (POD_KEY_LABEL, "a")]);
        let desired = labels(&[("pod", "b"), ("new", "2")]);
        let patch = label_patch(&current, &desired, &[POD_KEY_LABEL]).unwrap();
        assert_eq!(
            patch,
            json!({"metadata": {"labels": {"pod": "b", "new": "2", "old": null}}})
        );
        assert_eq!(label_patch(&desired, &desired, &[]), None);
    }

    #[test]
    fn names_follow_upstream() {
        assert_eq!(container_name(80, Proto::Tcp), "cont-80-tcp");
        assert_eq!(port_name(81, Proto::Sctp), "serve-81-sctp");
        assert_eq!(service_name("x/a"), "s-x-a");
    }
}
