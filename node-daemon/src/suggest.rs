//! `moatctl policy suggest`: turns what learn and audit mode observed into standard
//! NetworkPolicy YAML that allows exactly those flows; `moatctl policy suggest-baseline`
//! turns the flows seen between namespaces into Baseline ClusterNetworkPolicies that isolate
//! each namespace from every other it was not seen talking to. Pure: records and labels in,
//! text out.

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

/// Who a learned flow talked to: a pod (by its namespace and selector labels) or an address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Peer {
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

/// One learned rule: the peer, the protocol and the destination port.
pub type LearnedRule = (Peer, String, u16);

/// What a learn-mode (or audit-mode would-deny) record says a pod needs: the pod, the
/// direction and the rule. None for other records, records of unknown pods, and protocols a
/// NetworkPolicy cannot name.
pub fn learned_rule(
    r: &FlowRecord,
    labels_of: &impl Fn(&PodRef) -> Option<LabelSet>,
) -> Option<(PodRef, Direction, LearnedRule)> {
    let learned = r.mode == Mode::Learn || r.verdict == Verdict::Audit;
    let (ns, name) = r.endpoint.as_deref()?.split_once('/')?;
    if !learned || !matches!(r.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
        return None;
    }
    let remote_addr = if r.direction == Direction::Ingress {
        &r.source
    } else {
        &r.destination
    };
    let peer = match r.peer.as_deref().and_then(|p| p.split_once('/')) {
        Some((pns, pname)) => Peer::Pod {
            namespace: pns.to_string(),
            labels: selector_labels(&labels_of(&PodRef::new(pns, pname))?),
        },
        None => {
            let bits = if remote_addr.contains(':') { 128 } else { 32 };
            Peer::Cidr(format!("{remote_addr}/{bits}"))
        }
    };
    Some((
        PodRef::new(ns, name),
        r.direction,
        (peer, r.protocol.clone(), r.destination_port),
    ))
}

/// The `ingress:` or `egress:` section of a NetworkPolicy spec allowing `rules` (each with
/// the number of flows observed), from a policy in `namespace`.
pub fn rules_yaml<'a>(
    namespace: &str,
    direction: Direction,
    rules: impl IntoIterator<Item = (&'a LearnedRule, u64)>,
) -> String {
    let key = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let mut body = format!("  {direction}:\n");
    for ((peer, protocol, port), hits) in rules {
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
    body
}

/// `records` are journal records; `labels_of` gives a pod's labels (None: unknown pod).
pub fn suggest(
    namespace: &str,
    records: &[FlowRecord],
    labels_of: impl Fn(&PodRef) -> Option<LabelSet>,
) -> String {
    // (pod, direction) -> (peer, protocol, port) -> hits
    let mut by_pod: BTreeMap<(PodRef, Direction), BTreeMap<LearnedRule, u64>> = BTreeMap::new();
    for r in records {
        let Some((pod, direction, rule)) = learned_rule(r, &labels_of) else {
            continue;
        };
        if pod.namespace != namespace {
            continue;
        }
        *by_pod
            .entry((pod, direction))
            .or_default()
            .entry(rule)
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
            body.push_str(&rules_yaml(
                namespace,
                direction,
                rules.iter().map(|(rule, hits)| (rule, *hits)),
            ));
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

/// Baseline ClusterNetworkPolicies isolating namespaces: one per namespace that received
/// traffic, accepting what came from its own namespace and from every namespace it was seen
/// receiving from (pod peers only), then denying every other pod. Flows a perimeter dropped
/// are not evidence of need and are left out; anything else seen (allowed, audited, learned)
/// is. Baseline is the tier a team's NetworkPolicy overrides, so this is a starting posture,
/// not a ceiling.
pub fn suggest_baseline(records: &[FlowRecord]) -> String {
    // destination namespace -> source namespace -> flows seen
    let mut edges: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in records {
        if r.verdict == Verdict::Dropped {
            continue;
        }
        let (Some(endpoint), Some(peer)) = (r.endpoint.as_deref(), r.peer.as_deref()) else {
            continue;
        };
        let (Some((local_ns, _)), Some((peer_ns, _))) =
            (endpoint.split_once('/'), peer.split_once('/'))
        else {
            continue;
        };
        let (from, to) = match r.direction {
            Direction::Ingress => (peer_ns, local_ns),
            Direction::Egress => (local_ns, peer_ns),
        };
        *edges
            .entry(to.to_string())
            .or_default()
            .entry(from.to_string())
            .or_default() += 1;
    }
    let mut out = String::new();
    for (ns, sources) in &edges {
        let mut allowed: BTreeSet<&str> = sources.keys().map(String::as_str).collect();
        allowed.insert(ns);
        let quoted = |n: &str| serde_json::to_string(n).unwrap_or_default();
        let seen: Vec<String> = sources
            .iter()
            .filter(|(from, _)| *from != ns)
            .map(|(from, n)| format!("{from} ({n})"))
            .collect();
        out.push_str(
            "---
",
        );
        out.push_str(&format!(
            "# Suggested by moatctl: isolate namespace {ns}; other namespaces seen sending to it: {}\n",
            if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
        ));
        out.push_str(
            "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata:\n",
        );
        out.push_str(&format!("  name: baseline-isolate-{ns}\n"));
        out.push_str("spec:\n  tier: Baseline\n  priority: 500\n  subject:\n    namespaces:\n");
        out.push_str(&format!(
            "      matchLabels:\n        kubernetes.io/metadata.name: {}\n",
            quoted(ns)
        ));
        out.push_str(
            "  ingress:\n  - name: seen\n    action: Accept\n    from:\n    - namespaces:\n",
        );
        out.push_str("        matchExpressions:\n        - key: kubernetes.io/metadata.name\n          operator: In\n");
        out.push_str(&format!(
            "          values: [{}]\n",
            allowed
                .iter()
                .map(|n| quoted(n))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out.push_str(
            "  - name: everyone-else\n    action: Deny\n    from:\n    - namespaces: {}\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_policy::{ClusterNetworkPolicy, Engine, FlowEnd, Pod, evaluate};

    fn record(direction: Direction, endpoint: &str, peer: &str, verdict: Verdict) -> FlowRecord {
        FlowRecord {
            time_ms: 0,
            verdict,
            reason: "policy-allow".into(),
            direction,
            mode: Mode::Learn,
            protocol: "TCP".into(),
            source: "10.0.0.1".into(),
            destination: "10.0.0.2".into(),
            source_port: 40000,
            destination_port: 80,
            endpoint: Some(endpoint.into()),
            peer: Some(peer.into()),
            local_identity: 0,
            remote_identity: 0,
            rule_id: 0,
            rule: String::new(),
            bytes: 0,
        }
    }

    /// The suggestion parses, and compiled it keeps every flow seen and refuses the rest.
    #[test]
    fn baseline_suggestion_keeps_what_was_seen_and_isolates_the_rest() {
        let records = [
            record(Direction::Ingress, "shop/db", "web/front", Verdict::Allowed),
            record(Direction::Egress, "shop/api", "shop/db", Verdict::Allowed),
            // Dropped flows are not evidence.
            record(Direction::Ingress, "shop/db", "misc/x", Verdict::Dropped),
            record(Direction::Egress, "misc/x", "web/front", Verdict::Audit),
        ];
        let yaml = suggest_baseline(&records);
        let policies =
            ClusterNetworkPolicy::all_from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(policies.len(), 2, "{yaml}");
        let mut engine = Engine::new();
        for ns in ["shop", "web", "misc"] {
            let mut l = LabelSet::new();
            l.insert("kubernetes.io/metadata.name", ns);
            engine.upsert_namespace(ns, l).unwrap();
        }
        for (i, (ns, name)) in [
            ("shop", "db"),
            ("shop", "api"),
            ("web", "front"),
            ("misc", "x"),
        ]
        .into_iter()
        .enumerate()
        {
            engine
                .upsert_pod(Pod {
                    namespace: ns.into(),
                    name: name.into(),
                    labels: LabelSet::new(),
                    ips: vec![std::net::IpAddr::from([10, 3, 0, i as u8 + 1])],
                    ports: vec![],
                })
                .unwrap();
        }
        for p in &policies {
            engine.upsert_cluster_policy(p).unwrap();
        }
        let ok = |from: (&str, &str), to: (&str, &str)| {
            evaluate(
                engine.state(),
                &FlowEnd::Pod(PodRef::new(from.0, from.1)),
                &FlowEnd::Pod(PodRef::new(to.0, to.1)),
                80,
                6,
            )
            .unwrap()
            .allowed
        };
        assert!(ok(("web", "front"), ("shop", "db")));
        assert!(ok(("shop", "api"), ("shop", "db")));
        assert!(ok(("misc", "x"), ("web", "front")));
        assert!(!ok(("misc", "x"), ("shop", "db")), "only dropped before");
        assert!(!ok(("shop", "db"), ("web", "front")), "never seen");
        // misc received nothing: no policy for it, it stays open.
        assert!(ok(("shop", "db"), ("misc", "x")));
    }
}
