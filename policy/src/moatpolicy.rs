//! MoatPolicy (moat.io/v1alpha1): Moat's own namespaced policy object, for what NetworkPolicy
//! cannot say (schema: manifests/crds/moatpolicies.moat.io.yaml).
//!
//! - `spec.podSelector` selects pods of the object's namespace (same matching as
//!   NetworkPolicy's podSelector, on the pod's security labels).
//! - `spec.mode` (enforce | audit | learn): the enforcement mode of the selected pods. When
//!   several MoatPolicies select a pod with different modes, the strictest wins
//!   (enforce > audit > learn), so that the result never depends on arrival order and a
//!   looser object cannot switch enforcement off behind a stricter one.
//! - `spec.defaultDeny`: the selected pods are isolated for ingress and egress, even when no
//!   NetworkPolicy selects them; allows then come from NetworkPolicies and the rules below.
//! - `spec.externalGroups`: named CIDR sets (`{name, cidrs}`).
//! - `spec.ingress` / `spec.egress`: rule
//!   lists shaped like NetworkPolicy's, whose peers name external groups of the same object:
//!   `ingress: [{from: [{group: payments-api}], ports: [{port: 443}]}]`. As in NetworkPolicy,
//!   a present list isolates its direction for the selected pods (an empty one allows
//!   nothing); `ports` has NetworkPolicy's syntax and meaning (named ports included). Unlike
//!   NetworkPolicy, `from`/`to` must name at least one peer: "every peer" is not something
//!   these rules express.
//! - Egress peers may also name DNS names: `to: [{fqdn: api.stripe.com},
//!   {fqdn: "*.s3.amazonaws.com"}]` (see [`crate::fqdn`] for the pattern rules; at most
//!   MAX_FQDN_PEERS per rule). The datapath learns the addresses such names resolve to from
//!   the DNS answers the selected pods receive. A peer is exactly one of `group` and `fqdn`;
//!   `fqdn` is refused in ingress rules (a DNS answer says where a pod connects to, not who
//!   connects to it) and beside named ports (a name has no container ports).
//!
//! Compilation turns a MoatPolicy into the same normalized form as a NetworkPolicy (group
//! peers become ipBlock peers, fqdn peers `Peer::Fqdn`), so the engine, evaluator and tests
//! treat both alike; rule ids of MoatPolicy rules are distinct from those of a NetworkPolicy
//! of the same name.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::fqdn::FqdnPattern;
use crate::netpol::IntOrString;
use crate::netpol::{
    NormalizedPolicy, ObjectMeta, Peer, PolicyPort, Rule, deserialize_object, normalize_ports,
    parse_all_yaml, parse_cidr, parse_json, parse_one_yaml, validate_port,
};
use crate::selector::LabelSelector;

pub const API_VERSION: &str = "moat.io/v1alpha1";
pub const KIND: &str = "MoatPolicy";
/// Schema limits (the API server enforces them too; checked here for other sources).
pub const MAX_EXTERNAL_GROUPS: usize = 64;
pub const MAX_GROUP_CIDRS: usize = 256;
/// DNS-name peers per rule (upstream ClusterNetworkPolicy's limit for domainNames).
pub const MAX_FQDN_PEERS: usize = 25;

/// Enforcement mode of an endpoint: the one type moatd, its API and its clients share.
pub use moat_api::EndpointMode as Mode;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoatPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    pub spec: MoatPolicySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoatPolicySpec {
    /// Required by the schema; `{}` selects every pod of the namespace.
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub default_deny: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_groups: Vec<ExternalGroup>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<MoatIngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<MoatEgressRule>>,
    /// Walk the selected pods from learn to audit to enforce on their own (see
    /// [`Promotion`]); the mode then comes from the promotion's stage, so `mode` is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
}

/// Automatic promotion of the selected pods (the workload): they start in learn; once no new
/// peer has been seen for `learnFor`, moatd proposes a NetworkPolicy allowing exactly what
/// was learned and moves them to audit; once no flow would have been denied for `auditFor`,
/// to enforce. Durations: a number and a unit, s, m, h or d ("90s", "24h", "7d").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Promotion {
    pub learn_for: String,
    pub audit_for: String,
}

/// Bounds of a promotion window.
pub const MIN_PROMOTION_WINDOW_S: u64 = 1;
pub const MAX_PROMOTION_WINDOW_S: u64 = 365 * 86_400;

impl Promotion {
    /// (learn window, audit window) in seconds.
    pub fn windows(&self) -> Result<(u64, u64), (String, String)> {
        let learn = parse_window(&self.learn_for).map_err(|m| ("learnFor".to_string(), m))?;
        let audit = parse_window(&self.audit_for).map_err(|m| ("auditFor".to_string(), m))?;
        Ok((learn, audit))
    }
}

/// "90s", "15m", "24h", "7d" as seconds, within the window bounds.
pub fn parse_window(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = match &text[digits.len()..] {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        other => {
            return Err(format!("{text:?}: unit {other:?} is not one of s, m, h, d"));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: not a number and a unit (e.g. 24h)"))?;
    let secs = n.saturating_mul(unit);
    if !(MIN_PROMOTION_WINDOW_S..=MAX_PROMOTION_WINDOW_S).contains(&secs) {
        return Err(format!("{text:?}: between 1s and 365d"));
    }
    Ok(secs)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalGroup {
    pub name: String,
    pub cidrs: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoatIngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PolicyPort>>,
    pub from: Vec<MoatPeer>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoatEgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PolicyPort>>,
    pub to: Vec<MoatPeer>,
}

/// A rule peer: exactly one of an external group of the same MoatPolicy (by name) and, in
/// egress rules, a DNS-name pattern.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoatPeer {
    /// Empty when absent (a group name is never empty), so that group peers read as before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
}

impl MoatPeer {
    pub fn group(name: &str) -> Self {
        Self {
            group: name.to_string(),
            fqdn: None,
        }
    }

    pub fn fqdn(pattern: &str) -> Self {
        Self {
            group: String::new(),
            fqdn: Some(pattern.to_string()),
        }
    }
}

/// The compiler's view of a valid MoatPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalizedMoatPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    pub mode: Option<Mode>,
    pub default_deny: bool,
    pub groups: BTreeMap<String, Vec<IpNetwork>>,
    /// Isolation and allows in NetworkPolicy form: a direction is isolated when
    /// `defaultDeny` is set or the object has a rule list for it; group peers are ipBlocks.
    pub policy: NormalizedPolicy,
}

impl MoatPolicy {
    pub fn from_value(value: serde_json::Value) -> Result<Self, Error> {
        let policy: MoatPolicy = deserialize_object(&value)?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn from_json(text: &str) -> Result<Self, Error> {
        parse_json(text, Self::from_value)
    }

    /// One YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        parse_one_yaml(text, "MoatPolicy", Self::from_value)
    }

    /// Every MoatPolicy of a multi-document YAML stream (empty documents are skipped).
    pub fn all_from_yaml(text: &str) -> Result<Vec<Self>, Error> {
        parse_all_yaml(text, Self::from_value)
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn object(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }

    /// The schema's checks plus references: every group a rule names must be defined.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |path: String, message: String| Error::Invalid {
            object: self.object(),
            path,
            message,
        };
        if self.metadata.name.is_empty() {
            return Err(invalid("metadata.name".into(), "must not be empty".into()));
        }
        if let Some(kind) = &self.kind
            && kind != KIND
        {
            return Err(invalid(
                "kind".into(),
                format!("expected {KIND}, got {kind}"),
            ));
        }
        if let Some(v) = &self.api_version
            && v != API_VERSION
        {
            return Err(invalid(
                "apiVersion".into(),
                format!("expected {API_VERSION}, got {v}"),
            ));
        }
        let spec = &self.spec;
        spec.pod_selector
            .validate()
            .map_err(|(p, m)| invalid(format!("spec.podSelector.{p}"), m))?;
        if let Some(promotion) = &spec.promotion {
            promotion
                .windows()
                .map_err(|(p, m)| invalid(format!("spec.promotion.{p}"), m))?;
            if spec.mode.is_some() {
                return Err(invalid(
                    "spec.mode".into(),
                    "leave mode out with promotion: the promotion's stage is the mode".into(),
                ));
            }
        }
        if spec.external_groups.len() > MAX_EXTERNAL_GROUPS {
            return Err(invalid(
                "spec.externalGroups".into(),
                format!(
                    "{} groups, at most {MAX_EXTERNAL_GROUPS} allowed",
                    spec.external_groups.len()
                ),
            ));
        }
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, g) in spec.external_groups.iter().enumerate() {
            let base = format!("spec.externalGroups[{i}]");
            check_dns_label(&g.name).map_err(|m| invalid(format!("{base}.name"), m))?;
            if let Some(first) = names.insert(&g.name, i) {
                return Err(invalid(
                    format!("{base}.name"),
                    format!(
                        "duplicate group {:?} (also spec.externalGroups[{first}])",
                        g.name
                    ),
                ));
            }
            if g.cidrs.is_empty() || g.cidrs.len() > MAX_GROUP_CIDRS {
                return Err(invalid(
                    format!("{base}.cidrs"),
                    format!(
                        "{} CIDRs, between 1 and {MAX_GROUP_CIDRS} allowed",
                        g.cidrs.len()
                    ),
                ));
            }
            for (j, c) in g.cidrs.iter().enumerate() {
                parse_cidr(c).map_err(|m| invalid(format!("{base}.cidrs[{j}]"), m))?;
            }
        }
        let rules = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| ("ingress", "from", &r.ports, &r.from))
            .chain(
                spec.egress
                    .iter()
                    .flatten()
                    .map(|r| ("egress", "to", &r.ports, &r.to)),
            );
        let mut index = BTreeMap::<&str, usize>::new();
        for (dir, peers_field, ports, peers) in rules {
            let i = index.entry(dir).or_default();
            let base = format!("spec.{dir}[{i}]");
            *i += 1;
            for (j, port) in ports.iter().flatten().enumerate() {
                validate_port(port)
                    .map_err(|m| invalid(format!("{base}.ports[{j}]{}", m.0), m.1))?;
            }
            if peers.is_empty() {
                return Err(invalid(
                    format!("{base}.{peers_field}"),
                    "must name at least one external group or DNS name".into(),
                ));
            }
            let fqdn_peers = peers.iter().filter(|p| p.fqdn.is_some()).count();
            if fqdn_peers > MAX_FQDN_PEERS {
                return Err(invalid(
                    format!("{base}.{peers_field}"),
                    format!("{fqdn_peers} fqdn peers; at most {MAX_FQDN_PEERS} per rule"),
                ));
            }
            if fqdn_peers > 0
                && let Some(k) = ports
                    .iter()
                    .flatten()
                    .position(|p| matches!(p.port, Some(IntOrString::String(_))))
            {
                return Err(invalid(
                    format!("{base}.ports[{k}].port"),
                    "a named port cannot be used with fqdn peers (DNS names have no container ports)".into(),
                ));
            }
            for (j, peer) in peers.iter().enumerate() {
                let at = format!("{base}.{peers_field}[{j}]");
                if let Some(pattern) = &peer.fqdn {
                    if !peer.group.is_empty() {
                        return Err(invalid(
                            at,
                            "exactly one of group and fqdn may be set".into(),
                        ));
                    }
                    if dir == "ingress" {
                        return Err(invalid(
                            format!("{at}.fqdn"),
                            "fqdn peers are for egress rules only (a DNS answer says where a pod connects to, not who connects to it)".into(),
                        ));
                    }
                    FqdnPattern::parse(pattern).map_err(|m| invalid(format!("{at}.fqdn"), m))?;
                    continue;
                }
                if peer.group.is_empty() {
                    return Err(invalid(at, "one of group and fqdn must be set".into()));
                }
                if !names.contains_key(peer.group.as_str()) {
                    let defined: Vec<&str> = names.keys().copied().collect();
                    return Err(invalid(
                        format!("{base}.{peers_field}[{j}].group"),
                        format!(
                            "unknown external group {:?} (defined: {})",
                            peer.group,
                            if defined.is_empty() {
                                "none".to_string()
                            } else {
                                defined.join(", ")
                            }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn normalize(&self) -> Result<NormalizedMoatPolicy, Error> {
        self.validate()?;
        let spec = &self.spec;
        let groups: BTreeMap<String, Vec<IpNetwork>> = spec
            .external_groups
            .iter()
            .map(|g| {
                let mut cidrs: Vec<IpNetwork> = g
                    .cidrs
                    .iter()
                    .map(|c| parse_cidr(c).expect("validated"))
                    .collect();
                cidrs.sort();
                cidrs.dedup();
                (g.name.clone(), cidrs)
            })
            .collect();
        let peer = |p: &MoatPeer| -> Vec<Peer> {
            match &p.fqdn {
                Some(pattern) => vec![Peer::Fqdn(FqdnPattern::parse(pattern).expect("validated"))],
                None => groups[&p.group]
                    .iter()
                    .map(|cidr| Peer::IpBlock {
                        cidr: *cidr,
                        except: vec![],
                    })
                    .collect(),
            }
        };
        let rule = |ports: &Option<Vec<PolicyPort>>, peers: &[MoatPeer]| Rule {
            peers: Some(peers.iter().flat_map(peer).collect()),
            ports: normalize_ports(ports),
        };
        let ingress = match &spec.ingress {
            Some(rules) => Some(rules.iter().map(|r| rule(&r.ports, &r.from)).collect()),
            None => spec.default_deny.then(Vec::new),
        };
        let egress = match &spec.egress {
            Some(rules) => Some(rules.iter().map(|r| rule(&r.ports, &r.to)).collect()),
            None => spec.default_deny.then(Vec::new),
        };
        Ok(NormalizedMoatPolicy {
            namespace: self.namespace().to_string(),
            name: self.name().to_string(),
            pod_selector: spec.pod_selector.clone(),
            mode: spec.mode,
            default_deny: spec.default_deny,
            groups,
            policy: NormalizedPolicy {
                namespace: self.namespace().to_string(),
                name: self.name().to_string(),
                pod_selector: spec.pod_selector.clone(),
                ingress,
                egress,
            },
        })
    }
}

/// DNS-1123 label, as the schema's pattern: 1-63 of [a-z0-9-], alphanumeric at both ends.
fn check_dns_label(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid group name {name:?}: a DNS-1123 label (1-63 lowercase letters, digits and '-', alphanumeric at both ends)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "apiVersion: moat.io/v1alpha1\nkind: MoatPolicy\nmetadata: {name: m, namespace: ns1}\n";

    fn parse(spec: &str) -> Result<MoatPolicy, Error> {
        MoatPolicy::from_yaml(&format!("{BASE}{spec}"))
    }

    fn err(spec: &str) -> (String, String, String) {
        match parse(spec).unwrap_err() {
            Error::Parse {
                object,
                path,
                message,
            }
            | Error::Invalid {
                object,
                path,
                message,
            } => (object, path, message),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn full_object_parses_and_normalizes() {
        let p = parse(
            "spec:\n  podSelector: {matchLabels: {app: pay}}\n  mode: audit\n  defaultDeny: true\n  externalGroups:\n  - {name: payments-api, cidrs: [203.0.113.0/24, 2001:db8::/32]}\n  egress:\n  - to: [{group: payments-api}]\n    ports: [{port: 443}]\n",
        )
        .unwrap();
        let n = p.normalize().unwrap();
        assert_eq!(n.mode, Some(Mode::Audit));
        assert_eq!(n.groups["payments-api"].len(), 2);
        assert_eq!(
            n.policy.ingress,
            Some(vec![]),
            "defaultDeny isolates ingress"
        );
        let egress = n.policy.egress.unwrap();
        assert_eq!(egress.len(), 1);
        assert_eq!(egress[0].peers.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn mode_only_isolates_nothing() {
        let n = parse("spec:\n  podSelector: {}\n  mode: learn\n")
            .unwrap()
            .normalize()
            .unwrap();
        assert_eq!((n.policy.ingress, n.policy.egress), (None, None));
    }

    #[test]
    fn unknown_fields_and_bad_values_name_object_and_field() {
        let (object, path, _) = err("spec:\n  podSelector: {}\n  defaultDenied: true\n");
        assert_eq!(
            (object.as_str(), path.as_str()),
            ("ns1/m", "spec.defaultDenied")
        );
        let (_, path, _) = err("spec:\n  podSelector: {}\n  mode: relaxed\n");
        assert_eq!(path, "spec.mode");
        let (_, path, _) = err("spec:\n  mode: audit\n");
        assert_eq!(path, "spec", "podSelector is required");
        let (_, path, _) = err(
            "spec:\n  podSelector: {}\n  externalGroups:\n  - {name: a, cidrs: [10.0.0.0/8], extra: 1}\n",
        );
        assert_eq!(path, "spec.externalGroups[0].extra");
        let (_, path, _) = err(
            "spec:\n  podSelector: {}\n  externalGroups:\n  - {name: a, cidrs: [10.0.0.0/33]}\n",
        );
        assert_eq!(path, "spec.externalGroups[0].cidrs[0]");
        let (_, path, _) = err(
            "spec:\n  podSelector: {}\n  externalGroups:\n  - {name: A_b, cidrs: [10.0.0.0/8]}\n",
        );
        assert_eq!(path, "spec.externalGroups[0].name");
        let (_, path, _) = err(
            "spec:\n  podSelector: {}\n  externalGroups:\n  - {name: a, cidrs: [10.0.0.0/8]}\n  - {name: a, cidrs: [10.0.0.0/8]}\n",
        );
        assert_eq!(path, "spec.externalGroups[1].name");
        let (_, path, _) =
            err("spec:\n  podSelector: {}\n  externalGroups:\n  - {name: a, cidrs: []}\n");
        assert_eq!(path, "spec.externalGroups[0].cidrs");
        let (_, path, _) = err("spec:\n  podSelector: {}\n  kind2: x\n");
        assert_eq!(path, "spec.kind2");
        let (_, path, _) = err("spec:\n  podSelector: {}\n  egress: [{to: []}]\n");
        assert_eq!(path, "spec.egress[0].to");
        let (_, path, _) = err(
            "spec:\n  podSelector: {}\n  ingress: [{from: [{group: a}], ports: [{port: 0}]}]\n",
        );
        assert_eq!(path, "spec.ingress[0].ports[0].port");
    }

    #[test]
    fn rules_must_name_defined_groups() {
        let (_, path, message) = err(
            "spec:\n  podSelector: {}\n  externalGroups:\n  - {name: dns, cidrs: [8.8.8.8/32]}\n  egress:\n  - to: [{group: dns}, {group: payments}]\n",
        );
        assert_eq!(path, "spec.egress[0].to[1].group");
        assert!(
            message.contains("\"payments\"") && message.contains("dns"),
            "{message}"
        );
    }

    #[test]
    fn fqdn_peers_normalize_to_patterns_beside_groups() {
        let n = parse(
            "spec:\n  podSelector: {}\n  externalGroups:\n  - {name: dns, cidrs: [10.96.0.10/32]}\n  egress:\n  - to: [{fqdn: API.Stripe.com.}, {fqdn: '*.s3.amazonaws.com'}, {group: dns}]\n    ports: [{port: 443}]\n",
        )
        .unwrap()
        .normalize()
        .unwrap();
        let egress = n.policy.egress.unwrap();
        assert_eq!(
            egress[0].peers.as_ref().unwrap(),
            &vec![
                Peer::Fqdn(FqdnPattern::parse("api.stripe.com").unwrap()),
                Peer::Fqdn(FqdnPattern::parse("*.s3.amazonaws.com").unwrap()),
                Peer::IpBlock {
                    cidr: "10.96.0.10/32".parse().unwrap(),
                    except: vec![]
                },
            ]
        );
    }

    #[test]
    fn bad_fqdn_peers_name_the_field_and_the_reason() {
        for (spec, want_path, want_message) in [
            (
                "  ingress: [{from: [{fqdn: example.com}]}]\n",
                "spec.ingress[0].from[0].fqdn",
                "egress rules only",
            ),
            (
                "  egress: [{to: [{fqdn: 'a.*.example.com'}]}]\n",
                "spec.egress[0].to[0].fqdn",
                "only as the whole first label",
            ),
            (
                "  egress: [{to: [{fqdn: localhost}]}]\n",
                "spec.egress[0].to[0].fqdn",
                "at least 2 labels",
            ),
            (
                "  egress: [{to: [{fqdn: -a.example.com}]}]\n",
                "spec.egress[0].to[0].fqdn",
                "starts or ends with '-'",
            ),
            (
                "  externalGroups: [{name: g, cidrs: [10.0.0.0/8]}]\n  egress: [{to: [{group: g, fqdn: example.com}]}]\n",
                "spec.egress[0].to[0]",
                "exactly one of group and fqdn",
            ),
            (
                "  egress: [{to: [{}]}]\n",
                "spec.egress[0].to[0]",
                "one of group and fqdn must be set",
            ),
            (
                "  egress: [{to: [{fqdn: example.com}], ports: [{port: 80}, {port: https}]}]\n",
                "spec.egress[0].ports[1].port",
                "named port",
            ),
        ] {
            let (_, path, message) = err(&format!("spec:\n  podSelector: {{}}\n{spec}"));
            assert_eq!(path, want_path, "{spec}");
            assert!(message.contains(want_message), "{spec}: {message}");
        }
    }

    #[test]
    fn at_most_25_fqdn_peers_per_rule() {
        let peers = |n: usize| -> String {
            (0..n)
                .map(|i| format!("{{fqdn: h{i}.example.com}}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        parse(&format!(
            "spec:\n  podSelector: {{}}\n  egress: [{{to: [{}]}}]\n",
            peers(MAX_FQDN_PEERS)
        ))
        .unwrap();
        let (_, path, message) = err(&format!(
            "spec:\n  podSelector: {{}}\n  egress: [{{to: [{}]}}]\n",
            peers(MAX_FQDN_PEERS + 1)
        ));
        assert_eq!(path, "spec.egress[0].to");
        assert!(message.contains("at most 25"), "{message}");
    }

    #[test]
    fn wrong_kind_or_version_is_rejected() {
        let e = MoatPolicy::from_yaml(
            "apiVersion: moat.io/v1\nkind: MoatPolicy\nmetadata: {name: m}\nspec: {podSelector: {}}\n",
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Invalid { ref path, .. } if path == "apiVersion"),
            "{e}"
        );
        let e = MoatPolicy::from_json(
            r#"{"kind":"NetworkPolicy","metadata":{"name":"m"},"spec":{"podSelector":{}}}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "default/m: kind: expected MoatPolicy, got NetworkPolicy"
        );
    }

    #[test]
    fn an_empty_unknown_key_still_has_a_path() {
        // Found by the fuzzer: this used to report an empty field path.
        let e =
            MoatPolicy::from_json(r#"{"metadata":{"name":"j"},"":"j","spec":{"podSelector":{}}}"#)
                .unwrap_err();
        match e {
            Error::Parse { object, path, .. } => {
                assert_eq!(object, "default/j");
                assert_eq!(path, ".");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn promotion_windows_parse_and_exclude_a_mode() {
        let p = parse(
            "spec:\n  podSelector: {matchLabels: {app: web}}\n  promotion: {learnFor: 90s, auditFor: 2d}\n",
        )
        .unwrap();
        assert_eq!(p.spec.promotion.unwrap().windows(), Ok((90, 172_800)));
        for (spec, path, message) in [
            (
                "spec:\n  podSelector: {}\n  promotion: {learnFor: 24x, auditFor: 1h}\n",
                "spec.promotion.learnFor",
                "unit",
            ),
            (
                "spec:\n  podSelector: {}\n  promotion: {learnFor: 1h, auditFor: 0s}\n",
                "spec.promotion.auditFor",
                "between 1s and 365d",
            ),
            (
                "spec:\n  podSelector: {}\n  mode: enforce\n  promotion: {learnFor: 1h, auditFor: 1h}\n",
                "spec.mode",
                "leave mode out",
            ),
        ] {
            let (_, p, m) = err(spec);
            assert_eq!(p, path, "{spec}");
            assert!(m.contains(message), "{spec}: {m}");
        }
    }

    #[test]
    fn strictest_mode_wins() {
        assert_eq!(Mode::Learn.strictest(Mode::Audit), Mode::Audit);
        assert_eq!(Mode::Enforce.strictest(Mode::Learn), Mode::Enforce);
        assert_eq!(Mode::Audit.code(), moat_common::MODE_AUDIT);
    }
}
