//! NetworkPolicy (networking.k8s.io/v1) as Moat reads it: serde types that refuse unknown
//! fields, parsing from YAML/JSON with errors that carry the field path, and the validation
//! the API server would apply. `NetworkPolicy::normalize` turns a valid object into the
//! simpler form the compiler works on (defaults applied, CIDRs parsed).

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::fqdn::FqdnPattern;
use crate::selector::LabelSelector;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NetworkPolicySpec,
    /// Older API versions had a status; it carries nothing policy needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// Object metadata. Unknown fields are tolerated here (unlike everywhere else) because the API
/// server adds many (uid, resourceVersion, managedFields, ...) that mean nothing to policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<PolicyType>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PolicyPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<PolicyPeer>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PolicyPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<PolicyPeer>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::TCP => moat_common::PROTO_TCP,
            Protocol::UDP => moat_common::PROTO_UDP,
            Protocol::SCTP => moat_common::PROTO_SCTP,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

/// Ingress or egress, as stored in the maps (`moat_common::DIRECTION_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => moat_common::DIRECTION_INGRESS,
            Direction::Egress => moat_common::DIRECTION_EGRESS,
        }
    }

    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            moat_common::DIRECTION_INGRESS => Some(Direction::Ingress),
            moat_common::DIRECTION_EGRESS => Some(Direction::Egress),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// `ns/name` of a document, read leniently before the strict parse so that even a parse error
/// can name its object.
pub(crate) fn object_name(value: &serde_json::Value) -> String {
    let meta = &value["metadata"];
    let ns = meta["namespace"].as_str().unwrap_or("default");
    let name = meta["name"].as_str().unwrap_or("<unnamed>");
    format!("{ns}/{name}")
}

/// Strict deserialization of one object; errors carry the object's name and the field path
/// (never empty: a problem at the top level, or with an empty key there, is reported at
/// `.` / `""`).
pub(crate) fn deserialize_object<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
) -> Result<T, Error> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path.is_empty() {
            ".".to_string()
        } else {
            path
        };
        Error::Parse {
            object: object_name(value),
            path,
            message: e.inner().to_string(),
        }
    })
}

/// A JSON document, parsed as one object by `from_value`.
pub(crate) fn parse_json<T>(
    text: &str,
    from_value: fn(serde_json::Value) -> Result<T, Error>,
) -> Result<T, Error> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Parse {
        object: "<document>".into(),
        path: ".".into(),
        message: e.to_string(),
    })?;
    from_value(value)
}

/// Exactly one `kind` object in a YAML stream.
pub(crate) fn parse_one_yaml<T>(
    text: &str,
    kind: &str,
    from_value: fn(serde_json::Value) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut all = parse_all_yaml(text, from_value)?;
    match all.len() {
        1 => Ok(all.remove(0)),
        n => Err(Error::Parse {
            object: "<document>".into(),
            path: ".".into(),
            message: format!("expected one {kind}, found {n} documents"),
        }),
    }
}

/// Every object of a multi-document YAML stream (empty documents are skipped).
pub(crate) fn parse_all_yaml<T>(
    text: &str,
    from_value: fn(serde_json::Value) -> Result<T, Error>,
) -> Result<Vec<T>, Error> {
    let documents = crate::yaml::documents(text).map_err(|e| Error::Parse {
        object: "<yaml>".into(),
        path: ".".into(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for value in documents {
        if value.is_null() {
            continue;
        }
        out.push(from_value(value)?);
    }
    Ok(out)
}

impl NetworkPolicy {
    /// Parses and validates one object from an already generic JSON value.
    pub fn from_value(value: serde_json::Value) -> Result<Self, Error> {
        let policy: NetworkPolicy = deserialize_object(&value)?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn from_json(text: &str) -> Result<Self, Error> {
        parse_json(text, Self::from_value)
    }

    /// One YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        parse_one_yaml(text, "NetworkPolicy", Self::from_value)
    }

    /// Every NetworkPolicy of a multi-document YAML stream (empty documents are skipped).
    pub fn all_from_yaml(text: &str) -> Result<Vec<Self>, Error> {
        parse_all_yaml(text, Self::from_value)
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// `namespace/name`, the way every error and explanation names a policy.
    pub fn object(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }

    /// Policy types as Kubernetes defaults them: explicit if given; otherwise Ingress always,
    /// and Egress when the object has egress rules.
    pub fn effective_policy_types(&self) -> (bool, bool) {
        match &self.spec.policy_types {
            Some(types) if !types.is_empty() => (
                types.contains(&PolicyType::Ingress),
                types.contains(&PolicyType::Egress),
            ),
            _ => (
                true,
                self.spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
            ),
        }
    }

    /// The API server's checks. The first error found is returned, with its field path.
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
            && kind != "NetworkPolicy"
        {
            return Err(invalid(
                "kind".into(),
                format!("expected NetworkPolicy, got {kind}"),
            ));
        }
        if let Some(v) = &self.api_version
            && v != "networking.k8s.io/v1"
        {
            return Err(invalid(
                "apiVersion".into(),
                format!("expected networking.k8s.io/v1, got {v}"),
            ));
        }
        self.spec
            .pod_selector
            .validate()
            .map_err(|(p, m)| invalid(format!("spec.podSelector.{p}"), m))?;
        if let Some(types) = &self.spec.policy_types {
            let mut seen = Vec::new();
            for (i, t) in types.iter().enumerate() {
                if seen.contains(t) {
                    return Err(invalid(
                        format!("spec.policyTypes[{i}]"),
                        format!("duplicate {t:?}"),
                    ));
                }
                seen.push(*t);
            }
        }
        let rules = self
            .spec
            .ingress
            .iter()
            .flatten()
            .map(|r| ("ingress", "from", &r.ports, &r.from))
            .chain(
                self.spec
                    .egress
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
            for (j, peer) in peers.iter().flatten().enumerate() {
                let path = format!("{base}.{peers_field}[{j}]");
                validate_peer(peer).map_err(|m| invalid(format!("{path}{}", m.0), m.1))?;
            }
        }
        Ok(())
    }

    /// The compiler's view of a valid policy. Call `validate` first (parsing does).
    pub fn normalize(&self) -> Result<NormalizedPolicy, Error> {
        self.validate()?;
        let (has_ingress, has_egress) = self.effective_policy_types();
        let ingress = has_ingress.then(|| {
            self.spec
                .ingress
                .iter()
                .flatten()
                .map(|r| normalize_rule(&r.ports, &r.from))
                .collect()
        });
        let egress = has_egress.then(|| {
            self.spec
                .egress
                .iter()
                .flatten()
                .map(|r| normalize_rule(&r.ports, &r.to))
                .collect()
        });
        Ok(NormalizedPolicy {
            namespace: self.namespace().to_string(),
            name: self.name().to_string(),
            pod_selector: self.spec.pod_selector.clone(),
            ingress,
            egress,
        })
    }
}

pub(crate) type PathMessage = (String, String);

pub(crate) fn validate_port(port: &PolicyPort) -> Result<(), PathMessage> {
    match &port.port {
        None => {
            if port.end_port.is_some() {
                return Err((".endPort".into(), "may not be set without port".into()));
            }
        }
        Some(IntOrString::Int(p)) => {
            if !(1..=65535).contains(p) {
                return Err((".port".into(), format!("{p} must be between 1 and 65535")));
            }
            if let Some(end) = port.end_port {
                if !(1..=65535).contains(&end) {
                    return Err((
                        ".endPort".into(),
                        format!("{end} must be between 1 and 65535"),
                    ));
                }
                if end < *p {
                    return Err((
                        ".endPort".into(),
                        format!("{end} must be greater than or equal to port {p}"),
                    ));
                }
            }
        }
        Some(IntOrString::String(name)) => {
            if port.end_port.is_some() {
                return Err((
                    ".endPort".into(),
                    format!("may not be set when port is the named port {name:?}"),
                ));
            }
            check_port_name(name).map_err(|m| (".port".to_string(), m))?;
        }
    }
    Ok(())
}

/// IANA service name syntax, as the API server checks named ports.
fn check_port_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid named port {name:?}: 1-15 lowercase letters, digits and single '-', with at least one letter"
        ))
    }
}

/// Parses a CIDR the way the API server's net.ParseCIDR does: host bits are allowed and
/// masked off (`10.1.2.3/4` means 0.0.0.0/4), as the upstream e2e suite writes them.
pub fn parse_cidr(text: &str) -> Result<IpNetwork, String> {
    if !text.contains('/') {
        return Err(format!("{text:?} is not a CIDR (missing /prefix)"));
    }
    let net: IpNetwork = text
        .parse()
        .map_err(|e| format!("invalid CIDR {text:?}: {e}"))?;
    IpNetwork::new(net.network(), net.prefix()).map_err(|e| format!("invalid CIDR {text:?}: {e}"))
}

fn validate_peer(peer: &PolicyPeer) -> Result<(), PathMessage> {
    let has_selector = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (&peer.ip_block, has_selector) {
        (None, false) => {
            return Err((
                String::new(),
                "must specify podSelector, namespaceSelector or ipBlock".into(),
            ));
        }
        (Some(_), true) => {
            return Err((
                ".ipBlock".into(),
                "may not be combined with podSelector or namespaceSelector".into(),
            ));
        }
        _ => {}
    }
    if let Some(sel) = &peer.pod_selector {
        sel.validate()
            .map_err(|(p, m)| (format!(".podSelector.{p}"), m))?;
    }
    if let Some(sel) = &peer.namespace_selector {
        sel.validate()
            .map_err(|(p, m)| (format!(".namespaceSelector.{p}"), m))?;
    }
    if let Some(block) = &peer.ip_block {
        let cidr = parse_cidr(&block.cidr).map_err(|m| (".ipBlock.cidr".to_string(), m))?;
        for (k, text) in block.except.iter().flatten().enumerate() {
            let path = format!(".ipBlock.except[{k}]");
            let except = parse_cidr(text).map_err(|m| (path.clone(), m))?;
            let inside = cidr.is_ipv4() == except.is_ipv4()
                && cidr.contains(except.network())
                && except.prefix() > cidr.prefix();
            if !inside {
                return Err((
                    path,
                    format!("{text} must be a strict subset of cidr {}", block.cidr),
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn normalize_ports(ports: &Option<Vec<PolicyPort>>) -> Vec<RulePort> {
    ports
        .iter()
        .flatten()
        .map(|p| {
            let proto = p.protocol.unwrap_or_default().number();
            let port = match &p.port {
                None => PortSpec::Any,
                Some(IntOrString::Int(start)) => {
                    let start = *start as u16;
                    PortSpec::Range(start, p.end_port.map_or(start, |e| e as u16))
                }
                Some(IntOrString::String(name)) => PortSpec::Named(name.clone()),
            };
            RulePort { proto, port }
        })
        .collect()
}

fn normalize_rule(ports: &Option<Vec<PolicyPort>>, peers: &Option<Vec<PolicyPeer>>) -> Rule {
    let ports = normalize_ports(ports);
    // An empty peer list means the same as none: everyone.
    let peers = peers.as_ref().filter(|p| !p.is_empty()).map(|peers| {
        peers
            .iter()
            .map(|p| match &p.ip_block {
                Some(block) => Peer::IpBlock {
                    cidr: parse_cidr(&block.cidr).expect("validated"),
                    except: block
                        .except
                        .iter()
                        .flatten()
                        .map(|e| parse_cidr(e).expect("validated"))
                        .collect(),
                },
                None => Peer::Selector {
                    pods: p.pod_selector.clone(),
                    namespaces: p.namespace_selector.clone(),
                },
            })
            .collect()
    });
    Rule { peers, ports }
}

// ---------------------------------------------------------------------------------------------
// The compiler's form
// ---------------------------------------------------------------------------------------------

/// A valid policy with defaults applied. `ingress`/`egress` is `None` when the policy does not
/// isolate that direction, `Some(vec![])` when it isolates and allows nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalizedPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl NormalizedPolicy {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `None`: every peer (the rule had no or an empty from/to).
    pub peers: Option<Vec<Peer>>,
    /// Empty: every port of every protocol.
    pub ports: Vec<RulePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods. `namespaces: None` means the policy's own namespace; both set means AND.
    Selector {
        pods: Option<LabelSelector>,
        namespaces: Option<LabelSelector>,
    },
    IpBlock {
        cidr: IpNetwork,
        except: Vec<IpNetwork>,
    },
    /// Addresses the datapath learned from DNS answers for names the pattern matches
    /// (egress only: MoatPolicy `fqdn`, ClusterNetworkPolicy `domainNames`).
    Fqdn(FqdnPattern),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulePort {
    /// IP protocol number (TCP when the policy left it out).
    pub proto: u8,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    Any,
    /// Inclusive; a single port is `Range(p, p)`.
    Range(u16, u16),
    /// A container port name, resolved per pod.
    Named(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<NetworkPolicy, Error> {
        NetworkPolicy::from_yaml(yaml)
    }

    const BASE: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\n";

    fn err_path(yaml: &str) -> (String, String) {
        match parse(&format!("{BASE}{yaml}")).unwrap_err() {
            Error::Parse { object, path, .. } | Error::Invalid { object, path, .. } => {
                (object, path)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn policy_types_are_inferred_from_rules() {
        let p = parse(&format!("{BASE}spec:\n  podSelector: {{}}\n")).unwrap();
        assert_eq!(p.effective_policy_types(), (true, false));
        let p = parse(&format!("{BASE}spec:\n  egress: [{{}}]\n")).unwrap();
        assert_eq!(p.effective_policy_types(), (true, true));
        let p = parse(&format!("{BASE}spec:\n  egress: []\n")).unwrap();
        assert_eq!(p.effective_policy_types(), (true, false));
        let p = parse(&format!("{BASE}spec:\n  policyTypes: [Egress]\n")).unwrap();
        assert_eq!(p.effective_policy_types(), (false, true));
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let (object, path) = err_path("spec:\n  ingress:\n  - from:\n    - podSelektor: {}\n");
        assert_eq!(object, "ns1/p");
        assert_eq!(path, "spec.ingress[0].from[0].podSelektor");
    }

    #[test]
    fn bad_cidr_and_except_outside_cidr_are_rejected() {
        let (_, path) = err_path("spec:\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/33}\n");
        assert_eq!(path, "spec.egress[0].to[0].ipBlock.cidr");
        let (_, path) = err_path(
            "spec:\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}\n",
        );
        assert_eq!(path, "spec.egress[0].to[0].ipBlock.except[0]");
        let (_, path) = err_path(
            "spec:\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}\n",
        );
        assert_eq!(path, "spec.egress[0].to[0].ipBlock.except[0]");
    }

    #[test]
    fn host_bits_in_a_cidr_are_masked() {
        assert_eq!(parse_cidr("10.244.1.7/4").unwrap().to_string(), "0.0.0.0/4");
    }

    #[test]
    fn port_rules_are_checked() {
        let (_, path) = err_path("spec:\n  ingress:\n  - ports: [{port: 0}]\n");
        assert_eq!(path, "spec.ingress[0].ports[0].port");
        let (_, path) = err_path("spec:\n  ingress:\n  - ports: [{port: 70000}]\n");
        assert_eq!(path, "spec.ingress[0].ports[0].port");
        let (_, path) = err_path("spec:\n  ingress:\n  - ports: [{port: 90, endPort: 80}]\n");
        assert_eq!(path, "spec.ingress[0].ports[0].endPort");
        let (_, path) = err_path("spec:\n  egress:\n  - ports: [{port: http, endPort: 80}]\n");
        assert_eq!(path, "spec.egress[0].ports[0].endPort");
        let (_, path) = err_path("spec:\n  egress:\n  - ports: [{protocol: ICMP}]\n");
        assert_eq!(path, "spec.egress[0].ports[0].protocol");
    }

    #[test]
    fn selector_operator_and_values_are_checked() {
        let (_, path) = err_path(
            "spec:\n  podSelector:\n    matchExpressions: [{key: a, operator: Equals, values: [b]}]\n",
        );
        assert_eq!(path, "spec.podSelector.matchExpressions[0].operator");
        let (_, path) = err_path(
            "spec:\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: a, operator: In}]\n",
        );
        assert_eq!(
            path,
            "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values"
        );
    }

    #[test]
    fn peer_must_name_something_and_not_mix_ip_block_with_selectors() {
        let (_, path) = err_path("spec:\n  ingress:\n  - from: [{}]\n");
        assert_eq!(path, "spec.ingress[0].from[0]");
        let (_, path) = err_path(
            "spec:\n  ingress:\n  - from: [{podSelector: {}, ipBlock: {cidr: 1.2.3.0/24}}]\n",
        );
        assert_eq!(path, "spec.ingress[0].from[0].ipBlock");
    }

    #[test]
    fn multi_document_yaml_parses_every_policy() {
        let text = format!(
            "{BASE}spec: {{}}\n---\n{}",
            BASE.replace("name: p", "name: q")
        );
        let all = NetworkPolicy::all_from_yaml(&text).unwrap();
        assert_eq!(
            all.iter().map(|p| p.object()).collect::<Vec<_>>(),
            ["ns1/p", "ns1/q"]
        );
    }
}
