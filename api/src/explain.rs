//! The answers that explain policy: `moatctl policy` (the compiled state) and `moatctl
//! trace` (one connection's verdict and why). Typed, so that moatd and moatctl agree on
//! every field; the JSON is what `moatctl -o json` prints.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The policy engine's state as applied: identities, rules and map fill.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDocument {
    /// Identity number -> its labels.
    pub identities: BTreeMap<String, BTreeMap<String, String>>,
    /// Rule id -> the rule, as `namespace/policy direction[index]`.
    pub rules: BTreeMap<String, String>,
    /// NetworkPolicies in force, `namespace/name`.
    pub policies: Vec<String>,
    /// Objects the datastore refused, with the reason.
    pub rejected: Vec<String>,
    pub entries: MapEntries,
}

/// Entries moatd last wrote to each map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapEntries {
    pub policy: usize,
    pub port_ranges: usize,
    pub cidr_v4: usize,
    pub cidr_v6: usize,
    pub ipcache: usize,
    pub endpoints: usize,
}

/// Would a new connection be allowed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// As asked: `namespace/pod` or an address.
    pub from: String,
    pub to: String,
    pub port: u16,
    /// TCP, UDP or SCTP.
    pub protocol: String,
    pub verdict: TraceVerdict,
    /// Fields of their own for a Service address; the two perimeters otherwise.
    #[serde(flatten)]
    pub path: TracePath,
    /// The engine's verdict was checked against the same lookups on the kernel maps (an
    /// answer is an error when they disagree, so this is always true).
    pub maps_agree: bool,
}

/// A trace's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TraceVerdict {
    #[serde(rename = "allowed")]
    Allowed,
    #[serde(rename = "denied")]
    Denied,
    /// A Service address with no backend found in the host's DNAT rules.
    #[serde(rename = "unknown")]
    Unknown,
    /// A Service some of whose backends are allowed and some not.
    #[serde(rename = "depends on the backend")]
    DependsOnTheBackend,
}

/// Compares with a spelling, as the JSON reads.
impl PartialEq<&str> for TraceVerdict {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

impl TraceVerdict {
    pub fn of(allowed: bool) -> Self {
        if allowed { Self::Allowed } else { Self::Denied }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Unknown => "unknown",
            Self::DependsOnTheBackend => "depends on the backend",
        }
    }
}

/// The way a traced connection goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TracePath {
    /// To a Service address: the host's DNAT picks a backend, each judged on its own.
    Service { service: ServiceTrace },
    /// To a pod or an address: the source's egress and the destination's ingress (each
    /// absent when that side is not a local pod's perimeter), and the deciding rule.
    Direct {
        egress: Option<String>,
        ingress: Option<String>,
        rule_id: u32,
        rule: Option<String>,
    },
}

/// A connection to a Service address, per backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTrace {
    /// What the source's hook does with it.
    pub at_source: String,
    pub backends: Vec<ServiceBackend>,
    /// Why there are no backends to show, when so.
    pub note: Option<String>,
}

/// One backend the host's DNAT may pick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBackend {
    pub address: String,
    pub port: u16,
    /// The backend pod (`namespace/name`), when it is one.
    pub backend: Option<String>,
    /// Where it lives: "pod of this node", "outside the cluster", ...
    pub place: String,
    /// Allowed or denied.
    pub verdict: TraceVerdict,
    pub egress: Option<String>,
    pub ingress: Option<String>,
    /// Which hook judges the source's egress towards it.
    pub egress_judged_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes moatctl and the tests have always read: a direct trace carries its two
    /// perimeters and rule (null when absent), a Service trace its backends instead.
    #[test]
    fn traces_keep_their_json_shape() {
        let direct = Trace {
            from: "a/client".into(),
            to: "a/web".into(),
            port: 80,
            protocol: "TCP".into(),
            verdict: TraceVerdict::Denied,
            path: TracePath::Direct {
                egress: None,
                ingress: Some("default deny: selected by a/p; no rule allows".into()),
                rule_id: 7,
                rule: None,
            },
            maps_agree: true,
        };
        let json = serde_json::to_value(&direct).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"from": "a/client", "to": "a/web", "port": 80,
                "protocol": "TCP", "verdict": "denied", "egress": null,
                "ingress": "default deny: selected by a/p; no rule allows",
                "rule_id": 7, "rule": null, "maps_agree": true})
        );
        assert_eq!(serde_json::from_value::<Trace>(json).unwrap(), direct);
        let service = Trace {
            to: "10.96.0.10".into(),
            verdict: TraceVerdict::DependsOnTheBackend,
            path: TracePath::Service {
                service: ServiceTrace {
                    at_source: "defers".into(),
                    backends: vec![ServiceBackend {
                        address: "10.0.0.5".into(),
                        port: 8080,
                        backend: None,
                        place: "outside the cluster".into(),
                        verdict: TraceVerdict::Allowed,
                        egress: Some("allowed by a/p egress[0]".into()),
                        ingress: None,
                        egress_judged_at: "moat_after_dnat".into(),
                    }],
                    note: None,
                },
            },
            ..direct
        };
        let json = serde_json::to_value(&service).unwrap();
        assert_eq!(json["verdict"], "depends on the backend");
        assert_eq!(json["service"]["backends"][0]["verdict"], "allowed");
        assert_eq!(json["service"]["note"], serde_json::Value::Null);
        assert!(json.get("rule_id").is_none() && json.get("egress").is_none());
        assert_eq!(serde_json::from_value::<Trace>(json).unwrap(), service);
    }
}
