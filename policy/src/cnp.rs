//! ClusterNetworkPolicy (policy.networking.k8s.io, v1beta1 and v1alpha2, which share one
//! schema) as Moat reads it: the cluster-wide Admin and Baseline tiers around NetworkPolicy.
//!
//! Parsing refuses unknown fields everywhere except inside a peer: the upstream types ask an
//! implementation that meets a peer with no field it knows (a newer CRD's peer kind) to
//! *fail closed* rather than reject the object, so such a peer is kept as `Unknown` and
//! normalize` applies the rule written in the types: an Accept rule treats it as matching
//! nothing, a Deny or Pass rule becomes "deny everything".
//!
//! `domainNames` egress peers (upstream's experimental channel) are read where upstream
//! supports them: in Accept rules ("DomainNames is only supported for Accept rules"), of
//! either tier (v1alpha2 opened them to Baseline; no CEL rule restricts the tier). A Deny or
//! Pass rule naming domains is refused with that reason rather than guessed at. Patterns
//! follow upstream's DomainName (see [`crate::fqdn`]).
//!
//! Validation applies what the CRD's schema says (tier, priority 0-1000, exactly one subject,
//! 1-25 peers and at most 25 rules per direction, exactly one field per protocol and per
//! port, start < end, masked CIDRs, no named port beside networks or nodes peers).

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::fqdn::FqdnPattern;
use crate::netpol::{
    Direction, ObjectMeta, PathMessage, PortSpec, RulePort, deserialize_object, parse_all_yaml,
    parse_json, parse_one_yaml,
};
use crate::selector::LabelSelector;

pub const API_GROUP: &str = "policy.networking.k8s.io";
/// The API versions read; they carry the same schema.
pub const API_VERSIONS: [&str; 2] = [
    "policy.networking.k8s.io/v1beta1",
    "policy.networking.k8s.io/v1alpha2",
];
pub const KIND: &str = "ClusterNetworkPolicy";
pub const MAX_PRIORITY: u32 = 1000;
pub const MAX_RULES: usize = 25;
pub const MAX_PEERS: usize = 25;
pub const MAX_RULE_NAME: usize = 100;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterNetworkPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    pub spec: CnpSpec,
    /// Written by implementations; nothing in it changes what the policy means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    /// The datapath's tier number (moat_common::TIER_*).
    pub fn as_u8(self) -> u8 {
        match self {
            Tier::Admin => moat_common::TIER_ADMIN,
            Tier::Baseline => moat_common::TIER_BASELINE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    Accept,
    Deny,
    Pass,
}

impl Action {
    /// The datapath's action number (moat_common::ACTION_*).
    pub fn as_u8(self) -> u8 {
        match self {
            Action::Accept => moat_common::ACTION_ALLOW,
            Action::Deny => moat_common::ACTION_DENY,
            Action::Pass => moat_common::ACTION_PASS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpSpec {
    pub tier: Tier,
    pub priority: i64,
    pub subject: Subject,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<CnpRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<CnpRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    pub pod_selector: LabelSelector,
}

/// One rule; ingress rules use `from`, egress rules `to` (the other must be absent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<PeerSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<PeerSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<ProtocolSpec>>,
}

/// A peer as written. Unknown fields are kept, not refused (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtocolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<PortMatchSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<PortMatchSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<PortMatchSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortMatchSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<PortSpecRaw>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpecRaw {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRangeRaw>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRangeRaw {
    pub start: i64,
    pub end: i64,
}

// ---------------------------------------------------------------------------------------------
// The compiler's form
// ---------------------------------------------------------------------------------------------

/// A valid ClusterNetworkPolicy with fail-closed peers resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalizedCnp {
    pub name: String,
    pub tier: Tier,
    pub priority: u32,
    pub subject: CnpSelector,
    pub ingress: Vec<NormalizedCnpRule>,
    pub egress: Vec<NormalizedCnpRule>,
}

impl NormalizedCnp {
    pub fn rules(&self, direction: Direction) -> &[NormalizedCnpRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn selects(
        &self,
        namespace_labels: &crate::LabelSet,
        pod_labels: &crate::LabelSet,
    ) -> bool {
        self.subject.matches(namespace_labels, pod_labels)
    }
}

/// Pods by namespace labels AND pod labels (`pods: None` = every pod of the namespaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnpSelector {
    pub namespaces: LabelSelector,
    pub pods: Option<LabelSelector>,
}

impl CnpSelector {
    pub fn matches(
        &self,
        namespace_labels: &crate::LabelSet,
        pod_labels: &crate::LabelSet,
    ) -> bool {
        self.namespaces.matches(namespace_labels)
            && self.pods.as_ref().is_none_or(|p| p.matches(pod_labels))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalizedCnpRule {
    pub name: Option<String>,
    pub action: Action,
    /// `None`: every peer (a fail-closed Deny or Pass, turned into a deny of everything).
    pub peers: Option<Vec<CnpPeer>>,
    /// Empty: every protocol and port, ICMP included.
    pub ports: Vec<RulePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CnpPeer {
    Pods(CnpSelector),
    /// Node addresses, by the Node's labels (egress only).
    Nodes(LabelSelector),
    Networks(Vec<IpNetwork>),
    /// Addresses learned from DNS answers for one domain-name pattern (egress Accept only).
    Fqdn(FqdnPattern),
}

// ---------------------------------------------------------------------------------------------
// Parsing and validation
// ---------------------------------------------------------------------------------------------

impl ClusterNetworkPolicy {
    pub fn from_value(value: serde_json::Value) -> Result<Self, Error> {
        let policy: ClusterNetworkPolicy = deserialize_object(&value)?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn from_json(text: &str) -> Result<Self, Error> {
        parse_json(text, Self::from_value)
    }

    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        parse_one_yaml(text, KIND, Self::from_value)
    }

    pub fn all_from_yaml(text: &str) -> Result<Vec<Self>, Error> {
        parse_all_yaml(text, Self::from_value)
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Is a generic object one of these (by apiVersion and kind)?
    pub fn is_one(value: &serde_json::Value) -> bool {
        value.get("kind").and_then(|k| k.as_str()) == Some(KIND)
            && value
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .is_some_and(|v| v.starts_with(&format!("{API_GROUP}/")))
    }

    fn invalid(&self, (path, message): PathMessage) -> Error {
        Error::Invalid {
            object: format!("{KIND} {}", self.metadata.name),
            path,
            message,
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        self.check().map_err(|e| self.invalid(e))
    }

    fn check(&self) -> Result<(), PathMessage> {
        if let Some(v) = &self.api_version
            && !API_VERSIONS.contains(&v.as_str())
        {
            return Err((
                "apiVersion".into(),
                format!("{v:?} is not one of {}", API_VERSIONS.join(", ")),
            ));
        }
        if let Some(k) = &self.kind
            && k != KIND
        {
            return Err(("kind".into(), format!("{k:?} is not {KIND}")));
        }
        if self.metadata.name.is_empty() {
            return Err(("metadata.name".into(), "must not be empty".into()));
        }
        let spec = &self.spec;
        if !(0..=i64::from(MAX_PRIORITY)).contains(&spec.priority) {
            return Err((
                "spec.priority".into(),
                format!("{} must be between 0 and {MAX_PRIORITY}", spec.priority),
            ));
        }
        check_subject(&spec.subject).map_err(|(p, m)| (format!("spec.subject{p}"), m))?;
        for (direction, rules) in [("ingress", &spec.ingress), ("egress", &spec.egress)] {
            if rules.len() > MAX_RULES {
                return Err((
                    format!("spec.{direction}"),
                    format!("{} rules; at most {MAX_RULES} are allowed", rules.len()),
                ));
            }
            for (i, rule) in rules.iter().enumerate() {
                check_rule(rule, direction == "egress")
                    .map_err(|(p, m)| (format!("spec.{direction}[{i}]{p}"), m))?;
            }
        }
        Ok(())
    }

    pub fn normalize(&self) -> Result<NormalizedCnp, Error> {
        self.validate()?;
        let spec = &self.spec;
        let subject = match (&spec.subject.namespaces, &spec.subject.pods) {
            (Some(ns), _) => CnpSelector {
                namespaces: ns.clone(),
                pods: None,
            },
            (None, Some(p)) => CnpSelector {
                namespaces: p.namespace_selector.clone(),
                pods: Some(p.pod_selector.clone()),
            },
            (None, None) => unreachable!("validated: exactly one subject"),
        };
        let rules = |rules: &[CnpRule]| -> Vec<NormalizedCnpRule> {
            rules.iter().map(normalize_rule).collect()
        };
        Ok(NormalizedCnp {
            name: self.metadata.name.clone(),
            tier: spec.tier,
            priority: spec.priority as u32,
            subject,
            ingress: rules(&spec.ingress),
            egress: rules(&spec.egress),
        })
    }
}

fn check_selector(sel: &LabelSelector, at: &str) -> Result<(), PathMessage> {
    sel.validate().map_err(|(p, m)| (format!("{at}.{p}"), m))
}

fn check_subject(subject: &Subject) -> Result<(), PathMessage> {
    match (&subject.namespaces, &subject.pods) {
        (Some(ns), None) => check_selector(ns, ".namespaces"),
        (None, Some(p)) => {
            check_selector(&p.namespace_selector, ".pods.namespaceSelector")?;
            check_selector(&p.pod_selector, ".pods.podSelector")
        }
        _ => Err((
            String::new(),
            "exactly one of namespaces and pods must be set".into(),
        )),
    }
}

fn check_rule(rule: &CnpRule, egress: bool) -> Result<(), PathMessage> {
    if let Some(name) = &rule.name
        && name.len() > MAX_RULE_NAME
    {
        return Err((
            ".name".into(),
            format!("{} characters; at most {MAX_RULE_NAME}", name.len()),
        ));
    }
    let (field, peers, other) = if egress {
        ("to", &rule.to, &rule.from)
    } else {
        ("from", &rule.from, &rule.to)
    };
    if other.is_some() {
        let wrong = if egress { "from" } else { "to" };
        return Err((
            format!(".{wrong}"),
            format!(
                "not a field of an {} rule",
                if egress { "egress" } else { "ingress" }
            ),
        ));
    }
    let peers = peers
        .as_ref()
        .ok_or_else(|| (format!(".{field}"), "is required".to_string()))?;
    if peers.is_empty() || peers.len() > MAX_PEERS {
        return Err((
            format!(".{field}"),
            format!("{} peers; 1 to {MAX_PEERS} are allowed", peers.len()),
        ));
    }
    let mut address_peer = false;
    for (i, peer) in peers.iter().enumerate() {
        let at = format!(".{field}[{i}]");
        check_peer(peer, egress).map_err(|(p, m)| (format!("{at}{p}"), m))?;
        if peer.domain_names.is_some() && rule.action != Action::Accept {
            return Err((
                format!("{at}.domainNames"),
                format!(
                    "domainNames peers are only supported in Accept rules (upstream: \"DomainNames is only supported for Accept rules\"), not {}; deny by default at a lower precedence and accept the names",
                    rule.action.name()
                ),
            ));
        }
        address_peer |=
            peer.nodes.is_some() || peer.networks.is_some() || peer.domain_names.is_some();
    }
    if let Some(protocols) = &rule.protocols {
        if protocols.is_empty() || protocols.len() > MAX_PEERS {
            return Err((
                ".protocols".into(),
                format!("{} entries; 1 to {MAX_PEERS} are allowed", protocols.len()),
            ));
        }
        for (i, p) in protocols.iter().enumerate() {
            check_protocol(p).map_err(|(path, m)| (format!(".protocols[{i}]{path}"), m))?;
            if address_peer && p.destination_named_port.is_some() {
                return Err((
                    format!(".protocols[{i}].destinationNamedPort"),
                    "a named port cannot be used with networks, nodes or domainNames peers (addresses have no named ports)"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}

fn check_peer(peer: &PeerSpec, egress: bool) -> Result<(), PathMessage> {
    let set = [
        peer.namespaces.is_some(),
        peer.pods.is_some(),
        peer.nodes.is_some(),
        peer.networks.is_some(),
        peer.domain_names.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count()
        + peer.unknown.len();
    if set > 1 {
        return Err((
            String::new(),
            "exactly one field of a peer may be set".into(),
        ));
    }
    if let Some(ns) = &peer.namespaces {
        check_selector(ns, ".namespaces")?;
    }
    if let Some(p) = &peer.pods {
        check_selector(&p.namespace_selector, ".pods.namespaceSelector")?;
        check_selector(&p.pod_selector, ".pods.podSelector")?;
    }
    if let Some(n) = &peer.nodes {
        if !egress {
            return Err((".nodes".into(), "only egress peers may select nodes".into()));
        }
        check_selector(n, ".nodes")?;
    }
    if let Some(nets) = &peer.networks {
        if !egress {
            return Err((
                ".networks".into(),
                "only egress peers may name networks".into(),
            ));
        }
        if nets.is_empty() || nets.len() > MAX_PEERS {
            return Err((
                ".networks".into(),
                format!("{} CIDRs; 1 to {MAX_PEERS} are allowed", nets.len()),
            ));
        }
        for (i, text) in nets.iter().enumerate() {
            parse_masked_cidr(text).map_err(|m| (format!(".networks[{i}]"), m))?;
        }
    }
    if let Some(names) = &peer.domain_names {
        if !egress {
            return Err((
                ".domainNames".into(),
                "only egress peers may name domains".into(),
            ));
        }
        if names.is_empty() || names.len() > MAX_PEERS {
            return Err((
                ".domainNames".into(),
                format!("{} domain names; 1 to {MAX_PEERS} are allowed", names.len()),
            ));
        }
        for (i, name) in names.iter().enumerate() {
            FqdnPattern::parse(name).map_err(|m| (format!(".domainNames[{i}]"), m))?;
        }
    }
    Ok(())
}

/// A CIDR whose host bits are zero (the CRD's `cidr(self) == cidr(self).masked()`).
pub fn parse_masked_cidr(text: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = text
        .parse()
        .map_err(|e| format!("invalid CIDR {text:?}: {e}"))?;
    if !text.contains('/') {
        return Err(format!("{text:?} is not a CIDR (missing /prefix)"));
    }
    if net.ip() != net.network() {
        return Err(format!(
            "{text:?} has host bits set; write {}/{}",
            net.network(),
            net.prefix()
        ));
    }
    Ok(net)
}

fn check_protocol(p: &ProtocolSpec) -> Result<(), PathMessage> {
    let set = [
        p.tcp.is_some(),
        p.udp.is_some(),
        p.sctp.is_some(),
        p.destination_named_port.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        return Err((
            String::new(),
            "exactly one of tcp, udp, sctp and destinationNamedPort must be set".into(),
        ));
    }
    for (field, m) in [("tcp", &p.tcp), ("udp", &p.udp), ("sctp", &p.sctp)] {
        if let Some(m) = m {
            let port = m.destination_port.as_ref().ok_or_else(|| {
                (
                    format!(".{field}"),
                    "destinationPort is required".to_string(),
                )
            })?;
            check_port(port)
                .map_err(|(path, msg)| (format!(".{field}.destinationPort{path}"), msg))?;
        }
    }
    if let Some(name) = &p.destination_named_port
        && name.is_empty()
    {
        return Err((".destinationNamedPort".into(), "must not be empty".into()));
    }
    Ok(())
}

fn check_port(port: &PortSpecRaw) -> Result<(), PathMessage> {
    let in_range = |v: i64| (1..=65535).contains(&v);
    match (&port.number, &port.range) {
        (Some(n), None) if in_range(*n) => Ok(()),
        (Some(n), None) => Err((".number".into(), format!("{n} must be between 1 and 65535"))),
        (None, Some(r)) => {
            if !in_range(r.start) {
                return Err((
                    ".range.start".into(),
                    format!("{} must be between 1 and 65535", r.start),
                ));
            }
            if !in_range(r.end) {
                return Err((
                    ".range.end".into(),
                    format!("{} must be between 1 and 65535", r.end),
                ));
            }
            if r.start >= r.end {
                return Err((
                    ".range".into(),
                    format!("start {} must be less than end {}", r.start, r.end),
                ));
            }
            Ok(())
        }
        _ => Err((
            String::new(),
            "exactly one of number and range must be set".into(),
        )),
    }
}

fn normalize_rule(rule: &CnpRule) -> NormalizedCnpRule {
    let written = rule
        .from
        .as_ref()
        .or(rule.to.as_ref())
        .cloned()
        .unwrap_or_default();
    let mut peers = Vec::new();
    let mut unknown = false;
    for p in &written {
        if let Some(ns) = &p.namespaces {
            peers.push(CnpPeer::Pods(CnpSelector {
                namespaces: ns.clone(),
                pods: None,
            }));
        } else if let Some(pods) = &p.pods {
            peers.push(CnpPeer::Pods(CnpSelector {
                namespaces: pods.namespace_selector.clone(),
                pods: Some(pods.pod_selector.clone()),
            }));
        } else if let Some(n) = &p.nodes {
            peers.push(CnpPeer::Nodes(n.clone()));
        } else if let Some(nets) = &p.networks {
            peers.push(CnpPeer::Networks(
                nets.iter()
                    .map(|t| parse_masked_cidr(t).expect("validated"))
                    .collect(),
            ));
        } else if let Some(names) = &p.domain_names {
            peers.extend(
                names
                    .iter()
                    .map(|n| CnpPeer::Fqdn(FqdnPattern::parse(n).expect("validated"))),
            );
        } else {
            unknown = true;
        }
    }
    let ports = rule
        .protocols
        .iter()
        .flatten()
        .flat_map(normalize_protocol)
        .collect();
    match (unknown, rule.action) {
        // Fail closed: an Accept never matches through a peer it does not understand.
        (true, Action::Accept) => NormalizedCnpRule {
            name: rule.name.clone(),
            action: Action::Accept,
            peers: Some(peers),
            ports,
        },
        // Fail closed: a Deny or Pass with a peer it does not understand denies everything.
        (true, _) => NormalizedCnpRule {
            name: rule.name.clone(),
            action: Action::Deny,
            peers: None,
            ports: Vec::new(),
        },
        (false, action) => NormalizedCnpRule {
            name: rule.name.clone(),
            action,
            peers: Some(peers),
            ports,
        },
    }
}

fn normalize_protocol(p: &ProtocolSpec) -> Vec<RulePort> {
    let numbered = [
        (moat_common::PROTO_TCP, &p.tcp),
        (moat_common::PROTO_UDP, &p.udp),
        (moat_common::PROTO_SCTP, &p.sctp),
    ];
    let mut out = Vec::new();
    for (proto, m) in numbered {
        let Some(port) = m.as_ref().and_then(|m| m.destination_port.as_ref()) else {
            continue;
        };
        let spec = match (&port.number, &port.range) {
            (Some(n), _) => PortSpec::Range(*n as u16, *n as u16),
            (None, Some(r)) => PortSpec::Range(r.start as u16, r.end as u16),
            (None, None) => PortSpec::Any,
        };
        out.push(RulePort { proto, port: spec });
    }
    // A container port name carries its own protocol: the name is looked up under each,
    // and only the protocol the pod declares it with resolves.
    if let Some(name) = &p.destination_named_port {
        for proto in [
            moat_common::PROTO_TCP,
            moat_common::PROTO_UDP,
            moat_common::PROTO_SCTP,
        ] {
            out.push(RulePort {
                proto,
                port: PortSpec::Named(name.clone()),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ClusterNetworkPolicy, Error> {
        ClusterNetworkPolicy::from_yaml(yaml)
    }

    const HEAD: &str = "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\n";

    fn path_of(spec: &str) -> String {
        match parse(&format!("{HEAD}{spec}")).unwrap_err() {
            Error::Parse { path, .. } | Error::Invalid { path, .. } => path,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_full_policy_normalizes() {
        let p = parse(&format!(
            "{HEAD}spec:\n  tier: Admin\n  priority: 10\n  subject:\n    pods:\n      namespaceSelector: {{matchLabels: {{team: a}}}}\n      podSelector: {{matchLabels: {{app: db}}}}\n  ingress:\n  - name: gate\n    action: Accept\n    from: [{{namespaces: {{matchLabels: {{team: gw}}}}}}]\n    protocols: [{{tcp: {{destinationPort: {{number: 5432}}}}}}, {{udp: {{destinationPort: {{range: {{start: 1000, end: 2000}}}}}}}}]\n  egress:\n  - action: Deny\n    to: [{{networks: [169.254.169.254/32, 'fd00::/8']}}]\n"
        ))
        .unwrap();
        let n = p.normalize().unwrap();
        assert_eq!((n.tier, n.priority), (Tier::Admin, 10));
        assert!(n.subject.pods.is_some());
        assert_eq!(n.ingress[0].name.as_deref(), Some("gate"));
        assert_eq!(
            n.ingress[0].ports,
            vec![
                RulePort {
                    proto: 6,
                    port: PortSpec::Range(5432, 5432)
                },
                RulePort {
                    proto: 17,
                    port: PortSpec::Range(1000, 2000)
                },
            ]
        );
        match &n.egress[0].peers.as_ref().unwrap()[0] {
            CnpPeer::Networks(nets) => assert_eq!(nets.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn schema_violations_are_refused_with_their_path() {
        let base = "spec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n";
        assert_eq!(
            path_of("spec:\n  tier: Middle\n  priority: 1\n  subject: {namespaces: {}}\n"),
            "spec.tier"
        );
        assert_eq!(
            path_of("spec:\n  tier: Admin\n  priority: 1001\n  subject: {namespaces: {}}\n"),
            "spec.priority"
        );
        assert_eq!(
            path_of(
                "spec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}, pods: {podSelector: {}}}\n"
            ),
            "spec.subject"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  ingress: [{{action: Accept, from: []}}]\n"
            )),
            "spec.ingress[0].from"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  ingress: [{{action: Allow, from: [{{namespaces: {{}}}}]}}]\n"
            )),
            "spec.ingress[0].action"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  egress: [{{action: Deny, to: [{{networks: [10.0.0.1/8]}}]}}]\n"
            )),
            "spec.egress[0].to[0].networks[0]"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  ingress: [{{action: Deny, from: [{{networks: [10.0.0.0/8]}}]}}]\n"
            )),
            "spec.ingress[0].from[0].networks"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  egress: [{{action: Deny, to: [{{namespaces: {{}}, networks: [10.0.0.0/8]}}]}}]\n"
            )),
            "spec.egress[0].to[0]"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  egress: [{{action: Deny, to: [{{networks: [10.0.0.0/8]}}], protocols: [{{destinationNamedPort: web}}]}}]\n"
            )),
            "spec.egress[0].protocols[0].destinationNamedPort"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  ingress: [{{action: Deny, from: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{range: {{start: 90, end: 80}}}}}}}}]}}]\n"
            )),
            "spec.ingress[0].protocols[0].tcp.destinationPort.range"
        );
        let many: String = (0..26)
            .map(|_| "  - {action: Deny, from: [{namespaces: {}}]}\n")
            .collect();
        assert_eq!(
            path_of(&format!("{base}  ingress:\n{many}")),
            "spec.ingress"
        );
    }

    #[test]
    fn unknown_peers_fail_closed_as_the_types_say() {
        let base = "spec:\n  tier: Baseline\n  priority: 1\n  subject: {namespaces: {}}\n";
        for (action, want_action, want_all) in [
            ("Accept", Action::Accept, false),
            ("Deny", Action::Deny, true),
            ("Pass", Action::Deny, true),
        ] {
            let p = parse(&format!(
                "{HEAD}{base}  ingress: [{{action: {action}, from: [{{futurePeer: {{x: 1}}}}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]}}]\n"
            ))
            .unwrap()
            .normalize()
            .unwrap();
            let rule = &p.ingress[0];
            assert_eq!(rule.action, want_action, "{action}");
            if want_all {
                assert_eq!(rule.peers, None, "{action} denies everything");
                assert!(rule.ports.is_empty(), "{action} on every port");
            } else {
                assert_eq!(rule.peers, Some(vec![]), "Accept matches nothing");
            }
        }
    }

    fn message_of(spec: &str) -> (String, String) {
        match parse(&format!("{HEAD}{spec}")).unwrap_err() {
            Error::Parse { path, message, .. } | Error::Invalid { path, message, .. } => {
                (path, message)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn domain_names_are_read_in_accept_rules_of_both_tiers() {
        for tier in ["Admin", "Baseline"] {
            let p = parse(&format!(
                "{HEAD}spec:\n  tier: {tier}\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress: [{{action: Accept, to: [{{domainNames: [API.example.com., '*.s3.amazonaws.com']}}], protocols: [{{tcp: {{destinationPort: {{number: 443}}}}}}]}}]\n"
            ))
            .unwrap()
            .normalize()
            .unwrap();
            let peers = p.egress[0].peers.as_ref().unwrap();
            assert_eq!(
                peers,
                &vec![
                    CnpPeer::Fqdn(FqdnPattern::parse("api.example.com").unwrap()),
                    CnpPeer::Fqdn(FqdnPattern::parse("*.s3.amazonaws.com").unwrap()),
                ],
                "{tier}"
            );
        }
    }

    #[test]
    fn domain_names_are_refused_where_upstream_does_not_support_them() {
        let base = "spec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n";
        for action in ["Deny", "Pass"] {
            let (path, message) = message_of(&format!(
                "{base}  egress: [{{action: {action}, to: [{{domainNames: [example.com]}}]}}]\n"
            ));
            assert_eq!(path, "spec.egress[0].to[0].domainNames", "{action}");
            assert!(
                message.contains("only supported in Accept rules") && message.contains(action),
                "{message}"
            );
        }
        assert_eq!(
            path_of(&format!(
                "{base}  ingress: [{{action: Accept, from: [{{domainNames: [example.com]}}]}}]\n"
            )),
            "spec.ingress[0].from[0].domainNames"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  egress: [{{action: Accept, to: [{{domainNames: [example.com, 'a.*.com']}}]}}]\n"
            )),
            "spec.egress[0].to[0].domainNames[1]"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  egress: [{{action: Accept, to: [{{domainNames: []}}]}}]\n"
            )),
            "spec.egress[0].to[0].domainNames"
        );
        assert_eq!(
            path_of(&format!(
                "{base}  egress: [{{action: Accept, to: [{{domainNames: [example.com]}}], protocols: [{{destinationNamedPort: web}}]}}]\n"
            )),
            "spec.egress[0].protocols[0].destinationNamedPort"
        );
        let many: Vec<String> = (0..26).map(|i| format!("h{i}.example.com")).collect();
        assert_eq!(
            path_of(&format!(
                "{base}  egress: [{{action: Accept, to: [{{domainNames: [{}]}}]}}]\n",
                many.join(", ")
            )),
            "spec.egress[0].to[0].domainNames"
        );
    }

    #[test]
    fn named_ports_are_looked_up_under_every_protocol() {
        let p = parse(&format!(
            "{HEAD}spec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress: [{{action: Accept, from: [{{namespaces: {{}}}}], protocols: [{{destinationNamedPort: web}}]}}]\n"
        ))
        .unwrap()
        .normalize()
        .unwrap();
        let protos: Vec<u8> = p.ingress[0].ports.iter().map(|p| p.proto).collect();
        assert_eq!(protos, [6, 17, 132]);
    }
}
