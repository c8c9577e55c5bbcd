//! `moatctl policy suggest`: turns what learn and audit mode observed into standard
//! NetworkPolicy YAML that allows exactly those flows. Pure: records and labels in, text out.

use std::collections::{BTreeMap, BTreeSet};

use moat_policy::{LabelSet, Mode, PodRef};

use crate::api::{Direction, Verdict};
use crate::flows::FlowRecord;

/// Labels that make a good selector: `app`-style keys when present, else all labels.
fn selector_labels(labels: &LabelSet) -> BTreeMap<String, String> {
    for key in ["app.kubernetes.io/name", "app", "k8s-app", "name"] {
        if let Some(v) = labels.get(key) {
            return BTreeMap::from([(key.to_string(), v.to_string())]);
        }
    }
    labels.0.clone()
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Peer {
    Pod {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    Cidr(String),
}

fn yaml_map(indent: usize, map: &BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return " {}\n".to_string();
    }
    let pad = " ".repeat(indent);
    let mut out = String::from("\n");
    for (k, v) in map {
        out.push_str(&format!(
            "{pad}{k}: {}\n",
            serde_json::to_string(v).unwrap_or_default()
        ));
    }
    out
}

/// `records` are journal records; `labels_of` gives a pod's labels (None: unknown pod).
pub fn suggest(
    namespace: &str,
    records: &[FlowRecord],
    labels_of: impl Fn(&PodRef) -> Option<LabelSet>,
) -> String {
    // (pod, direction) -> (peer, protocol, port) -> hits
    type Rules = BTreeMap<(Peer, String, u16), u64>;
    let mut by_pod: BTreeMap<(PodRef, Direction), Rules> = BTreeMap::new();
    for r in records {
        let learned = r.mode == Mode::Learn || r.verdict == Verdict::Audit;
        let Some(endpoint) = r.endpoint.as_deref() else {
            continue;
        };
        let Some((ns, name)) = endpoint.split_once('/') else {
            continue;
        };
        if !learned || ns != namespace || !matches!(r.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            continue;
        }
        let remote_addr = if r.direction == Direction::Ingress {
            &r.source
        } else {
            &r.destination
        };
        let peer = match r.peer.as_deref().and_then(|p| p.split_once('/')) {
            Some((pns, pname)) => match labels_of(&PodRef::new(pns, pname)) {
                Some(labels) => Peer::Pod {
                    namespace: pns.to_string(),
                    labels: selector_labels(&labels),
                },
                None => continue,
            },
            None => {
                let bits = if remote_addr.contains(':') { 128 } else { 32 };
                Peer::Cidr(format!("{remote_addr}/{bits}"))
            }
        };
        *by_pod
            .entry((PodRef::new(ns, name), r.direction))
            .or_default()
            .entry((peer, r.protocol.clone(), r.destination_port))
            .or_default() += 1;
    }

    let pods: BTreeSet<PodRef> = by_pod.keys().map(|(p, _)| p.clone()).collect();
    let mut out = String::new();
    for pod in pods {
        let Some(labels) = labels_of(&pod) else {
            continue;
        };
        let mut types = Vec::new();
        let mut body = String::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(rules) = by_pod.get(&(pod.clone(), direction)) else {
                continue;
            };
            types.push(match direction {
                Direction::Ingress => "Ingress",
                Direction::Egress => "Egress",
            });
            body.push_str(&format!("  {direction}:\n"));
            for ((peer, protocol, port), hits) in rules {
                let key = match direction {
                    Direction::Ingress => "from",
                    Direction::Egress => "to",
                };
                body.push_str(&format!("  # observed {hits} new flow(s)\n"));
                body.push_str(&format!("  - {key}:\n"));
                match peer {
                    Peer::Pod {
                        namespace: pns,
                        labels,
                    } => {
                        if pns != namespace {
                            body.push_str("    - namespaceSelector:\n        matchLabels:\n");
                            body.push_str(&format!(
                                "          kubernetes.io/metadata.name: {}\n",
                                serde_json::to_string(pns).unwrap_or_default()
                            ));
                            body.push_str(&format!(
                                "      podSelector:\n        matchLabels:{}",
                                yaml_map(10, labels)
                            ));
                        } else {
                            body.push_str(&format!(
                                "    - podSelector:\n        matchLabels:{}",
                                yaml_map(10, labels)
                            ));
                        }
                    }
                    Peer::Cidr(cidr) => {
                        body.push_str(&format!("    - ipBlock:\n        cidr: {cidr}\n"));
                    }
                }
                body.push_str(&format!(
                    "    ports:\n    - protocol: {protocol}\n      port: {port}\n"
                ));
            }
        }
        out.push_str("---\n");
        out.push_str(&format!(
            "# Suggested by moatctl from learned flows of {pod}\n"
        ));
        out.push_str("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n");
        out.push_str(&format!(
            "  name: {}-learned\n  namespace: {}\n",
            pod.name, pod.namespace
        ));
        out.push_str(&format!(
            "spec:\n  podSelector:\n    matchLabels:{}",
            yaml_map(6, &selector_labels(&labels))
        ));
        out.push_str(&format!("  policyTypes: [{}]\n", types.join(", ")));
        out.push_str(&body);
    }
    out
}
