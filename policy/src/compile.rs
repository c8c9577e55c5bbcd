//! Compilation of cluster state (namespaces, pods, policies, node addresses) into the entries
//! of the datapath maps. Policy entries are keyed by identity, not by pod: pods that share
//! labels share entries, so a new pod of a known label set costs only ipcache writes.
//!
//! Decisions worth knowing (see also the crate docs):
//! - A rule with no or an empty peer list uses the remote-identity wildcard 0. world, host,
//!   unmanaged and remote-node are identities too, so 0 covers every address; no 0.0.0.0/0
//!   CIDR entry is needed.
//! - Named ports, ingress: resolved against the local pod. When pods of one identity resolve
//!   the names the policy uses differently, the pods of the smallest resolution keep
//!   policy_id = identity, every other resolution gets an endpoint-scoped policy_id (a
//!   "variant") hashed into [2^24, 2^32) from (identity, resolution).
//! - Named ports, egress: resolved against each destination pod. Identity-keyed entries are
//!   used when all pods of the destination identity agree; when they do not, exact /32 and
//!   /128 entries per destination pod address go to the CIDR LPM instead, so nothing is
//!   allowed that the policy does not allow.
//! - Rule ids are hashed from (namespace, policy, direction, rule index) into
//!   [rule::FIRST_USER, 2^32): stable across restarts and nodes, no state to persist.
//! - DNS-name peers (`Peer::Fqdn`): each distinct pattern gets a selector identity hashed from
//!   its text into [IDENTITY_FQDN_FIRST, IDENTITY_FQDN_END) and is a remote identity like any
//!   other for the rule's policy entries. The datapath gives a learned address the selectors
//!   of the patterns its DNS question matched (MOAT_FQDNPAT: `fqdn_patterns`, per local
//!   identity), so a flow to it finds those entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use moat_common::{
    ACTION_ALLOW, FqdnPatternKey, MAX_PORT_RULES, PolicyKey, PolicyValue, PortRangeKey, PortRule,
    PortRuleSet,
};
use serde::{Deserialize, Serialize};

use crate::cidr::{CidrItem, build_rule_set, flatten};
use crate::cnp::{CnpPeer, NormalizedCnp, NormalizedCnpRule, Tier};
use crate::error::Error;
use crate::fqdn::FqdnPattern;
use crate::identity::{
    CanonicalKey, HashedIds, IDENTITY_END, Identity, IdentityRegistry, SecurityLabels,
};
use crate::labels::LabelSet;
use crate::moatpolicy::{Mode, NormalizedMoatPolicy};
use crate::netpol::{Direction, NormalizedPolicy, Peer, PortSpec, Protocol, Rule};
use crate::selector::LabelSelector;

/// Port ranges up to this many ports become exact MOAT_POLICY entries (one hash lookup in the
/// datapath instead of a range scan); longer ones go to MOAT_PORTRANGES.
pub const EXACT_RANGE_MAX_PORTS: u32 = 8;

/// `namespace/name` of a pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: LabelSet,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    pub fn pod_ref(&self) -> PodRef {
        PodRef::new(&self.namespace, &self.name)
    }

    /// Port numbers a named port resolves to on this pod, for one protocol.
    pub fn resolve(&self, name: &str, proto: u8) -> BTreeSet<u16> {
        self.ports
            .iter()
            .filter(|p| p.name == name && p.protocol.number() == proto)
            .map(|p| p.port)
            .collect()
    }
}

/// Everything compilation reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterInputs {
    pub namespaces: BTreeMap<String, LabelSet>,
    pub pods: BTreeMap<PodRef, Pod>,
    pub policies: BTreeMap<(String, String), NormalizedPolicy>,
    pub moat_policies: BTreeMap<(String, String), NormalizedMoatPolicy>,
    /// ClusterNetworkPolicies by name (cluster-scoped), both tiers.
    pub cluster_policies: BTreeMap<String, NormalizedCnp>,
    /// The cluster's Nodes, for ClusterNetworkPolicy `nodes` peers.
    pub nodes: BTreeMap<String, NodeInfo>,
    pub host_ips: BTreeSet<IpAddr>,
}

/// A Node as ClusterNetworkPolicy `nodes` peers see it: its labels and its addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub labels: LabelSet,
    pub ips: Vec<IpAddr>,
}

/// Which kind of object a policy (and its rules) comes from.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum PolicyKind {
    #[default]
    NetworkPolicy,
    MoatPolicy,
    /// A ClusterNetworkPolicy of the Admin tier (cluster-scoped: its rules' namespace is "").
    AdminClusterNetworkPolicy,
    /// A ClusterNetworkPolicy of the Baseline tier.
    BaselineClusterNetworkPolicy,
}

impl PolicyKind {
    pub fn of_tier(tier: Tier) -> Self {
        match tier {
            Tier::Admin => PolicyKind::AdminClusterNetworkPolicy,
            Tier::Baseline => PolicyKind::BaselineClusterNetworkPolicy,
        }
    }

    /// The datapath tier of this kind's rules (moat_common::TIER_*).
    pub fn tier(self) -> u8 {
        match self {
            PolicyKind::NetworkPolicy | PolicyKind::MoatPolicy => moat_common::TIER_NETPOL,
            PolicyKind::AdminClusterNetworkPolicy => moat_common::TIER_ADMIN,
            PolicyKind::BaselineClusterNetworkPolicy => moat_common::TIER_BASELINE,
        }
    }
}

fn in_namespace<'a, V>(
    map: &'a BTreeMap<(String, String), V>,
    ns: &'a str,
) -> impl Iterator<Item = &'a V> + 'a {
    map.range((ns.to_string(), String::new())..)
        .take_while(move |((n, _), _)| n == ns)
        .map(|(_, v)| v)
}

impl ClusterInputs {
    pub fn security_labels(&self, pod: &Pod) -> SecurityLabels {
        let empty = LabelSet::new();
        let ns_labels = self.namespaces.get(&pod.namespace).unwrap_or(&empty);
        SecurityLabels::new(&pod.namespace, ns_labels, &pod.labels)
    }

    /// Every policy (NetworkPolicies, then MoatPolicies) in its compiler form.
    pub fn all_policies(&self) -> impl Iterator<Item = (PolicyKind, &NormalizedPolicy)> {
        self.policies
            .values()
            .map(|p| (PolicyKind::NetworkPolicy, p))
            .chain(
                self.moat_policies
                    .values()
                    .map(|m| (PolicyKind::MoatPolicy, &m.policy)),
            )
    }

    /// The policies of one namespace.
    pub fn policies_in<'a>(
        &'a self,
        ns: &'a str,
    ) -> impl Iterator<Item = (PolicyKind, &'a NormalizedPolicy)> + 'a {
        in_namespace(&self.policies, ns)
            .map(|p| (PolicyKind::NetworkPolicy, p))
            .chain(
                in_namespace(&self.moat_policies, ns).map(|m| (PolicyKind::MoatPolicy, &m.policy)),
            )
    }

    pub fn policy(&self, kind: PolicyKind, ns: &str, name: &str) -> Option<&NormalizedPolicy> {
        let key = (ns.to_string(), name.to_string());
        match kind {
            PolicyKind::NetworkPolicy => self.policies.get(&key),
            PolicyKind::MoatPolicy => self.moat_policies.get(&key).map(|m| &m.policy),
            // Not namespaced policies: see `cluster_policies`.
            PolicyKind::AdminClusterNetworkPolicy | PolicyKind::BaselineClusterNetworkPolicy => {
                None
            }
        }
    }

    /// The pods of one namespace.
    pub fn pods_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a PodRef> + 'a {
        self.pods
            .range(PodRef::new(ns, "")..)
            .take_while(move |(r, _)| r.namespace == ns)
            .map(|(r, _)| r)
    }

    pub fn uses_named_ports(&self) -> bool {
        self.all_policies().any(|(_, p)| {
            Direction::BOTH.iter().any(|d| {
                p.rules(*d)
                    .into_iter()
                    .flatten()
                    .flat_map(|r| &r.ports)
                    .any(|port| matches!(port.port, PortSpec::Named(_)))
            })
        })
    }

    /// The mode MoatPolicies give a pod: the strictest of those selecting it, if any.
    pub fn mode_of(&self, pod: &PodRef) -> Option<Mode> {
        let p = self.pods.get(pod)?;
        let labels = self.security_labels(p);
        in_namespace(&self.moat_policies, &pod.namespace)
            .filter(|m| m.pod_selector.matches(&labels.pod_labels))
            .filter_map(|m| m.mode)
            .reduce(Mode::strictest)
    }
}

/// Names a compiled rule, for explanations (`rule_id` -> this).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    #[serde(default)]
    pub kind: PolicyKind,
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub index: u32,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            PolicyKind::NetworkPolicy => {}
            PolicyKind::MoatPolicy => write!(f, "MoatPolicy ")?,
            PolicyKind::AdminClusterNetworkPolicy | PolicyKind::BaselineClusterNetworkPolicy => {
                let tier = if self.kind == PolicyKind::AdminClusterNetworkPolicy {
                    "Admin"
                } else {
                    "Baseline"
                };
                return write!(
                    f,
                    "ClusterNetworkPolicy {} ({tier}) {}[{}]",
                    self.policy,
                    self.direction.name(),
                    self.index
                );
            }
        }
        write!(
            f,
            "{}/{} {}[{}]",
            self.namespace,
            self.policy,
            self.direction.name(),
            self.index
        )
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl CanonicalKey for RuleRef {
    fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // NetworkPolicy rules keep the bytes (and so the ids) they had before kinds existed;
        // MoatPolicy rules start with a length no namespace can have.
        if self.kind == PolicyKind::MoatPolicy {
            out.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        push_str(&mut out, &self.namespace);
        push_str(&mut out, &self.policy);
        out.push(self.direction.as_u8());
        out.extend_from_slice(&self.index.to_le_bytes());
        out
    }
}

/// How one pod resolves the named ports that the ingress policies of its identity use:
/// (name, protocol) -> port numbers.
pub(crate) type Resolution = Vec<(String, u8, Vec<u16>)>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct VariantKey {
    pub identity: u32,
    pub resolution: Resolution,
}

impl CanonicalKey for VariantKey {
    fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = self.identity.to_le_bytes().to_vec();
        for (name, proto, ports) in &self.resolution {
            push_str(&mut out, name);
            out.push(*proto);
            out.extend_from_slice(&(ports.len() as u32).to_le_bytes());
            for p in ports {
                out.extend_from_slice(&p.to_le_bytes());
            }
        }
        out
    }
}

/// An endpoint as the compiler sees it (the daemon adds ifindex and mode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub identity: Identity,
    pub policy_id: u32,
    pub ips: Vec<IpAddr>,
    /// Its identity has egress rules with DNS-name peers (ENDPOINT_FLAG_FQDN): the datapath
    /// reads the DNS answers it receives and consults learned addresses for its new flows.
    #[serde(default)]
    pub fqdn: bool,
}

impl Endpoint {
    /// The MOAT_ENDPOINTS value (addresses beyond the map's slots are left out). The policy
    /// decides ENDPOINT_FLAG_FQDN: it is set or cleared here whatever `flags` says.
    pub fn to_endpoint_info(&self, mode: u8, flags: u8) -> moat_common::EndpointInfo {
        let fqdn = if self.fqdn {
            moat_common::ENDPOINT_FLAG_FQDN
        } else {
            0
        };
        let mut info = moat_common::EndpointInfo {
            identity: self.identity.0,
            policy_id: self.policy_id,
            mode,
            flags: flags & !moat_common::ENDPOINT_FLAG_FQDN | fqdn,
            ..Default::default()
        };
        for ip in &self.ips {
            match ip {
                IpAddr::V4(a) if (info.v4_count as usize) < moat_common::MAX_ENDPOINT_V4 => {
                    info.v4[info.v4_count as usize] = moat_common::raw_v4(*a);
                    info.v4_count += 1;
                }
                IpAddr::V6(a) if (info.v6_count as usize) < moat_common::MAX_ENDPOINT_V6 => {
                    info.v6[info.v6_count as usize] = moat_common::raw_v6(*a);
                    info.v6_count += 1;
                }
                _ => {}
            }
        }
        info
    }
}

/// Every map entry Moat's datapath needs for the cluster state, plus the tables that explain
/// them (identities' labels, rule ids).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatapathState {
    pub identities: BTreeMap<Identity, LabelSet>,
    pub endpoints: BTreeMap<PodRef, Endpoint>,
    pub ipcache: BTreeMap<IpNetwork, Identity>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    pub port_ranges: BTreeMap<PortRangeKey, PortRuleSet>,
    pub cidr_v4: BTreeMap<(u32, u8, Ipv4Network), PortRuleSet>,
    pub cidr_v6: BTreeMap<(u32, u8, Ipv6Network), PortRuleSet>,
    pub rules: BTreeMap<u32, RuleRef>,
    /// ClusterNetworkPolicy rules by (tier, rule id): their ids are numbered in evaluation
    /// order within a tier (see `cnp_rule_id`), a space apart from `rules`.
    pub cluster_rules: BTreeMap<(u8, u32), RuleRef>,
    /// Pods whose mode a MoatPolicy sets (strictest wins); other pods keep the daemon's
    /// default (or their `moat.io/mode` annotation).
    pub modes: BTreeMap<PodRef, Mode>,
    /// MOAT_FQDNPAT: for every identity an egress rule with DNS-name peers selects, one entry
    /// per pattern: (identity, EXACT or SUBDOMAIN, hash of the name after `*.`) -> the
    /// pattern's selector identity.
    pub fqdn_patterns: BTreeMap<FqdnPatternKey, u32>,
    /// Selector identity -> the pattern it stands for (`*.example.com`), for explanations.
    pub fqdn_selectors: BTreeMap<u32, String>,
}

/// LPM key and prefix length (in bits, as the kernel wants it) of a CIDR entry.
pub fn cidr_key_v4(
    policy_id: u32,
    direction: u8,
    net: &Ipv4Network,
) -> (moat_common::CidrKeyV4, u32) {
    let key = moat_common::CidrKeyV4 {
        policy_id: policy_id.to_be_bytes(),
        direction,
        _pad: [0; 3],
        addr: net.network().octets(),
    };
    (
        key,
        moat_common::CIDR_KEY_FIXED_BITS + u32::from(net.prefix()),
    )
}

pub fn cidr_key_v6(
    policy_id: u32,
    direction: u8,
    net: &Ipv6Network,
) -> (moat_common::CidrKeyV6, u32) {
    let key = moat_common::CidrKeyV6 {
        policy_id: policy_id.to_be_bytes(),
        direction,
        _pad: [0; 3],
        addr: net.network().octets(),
    };
    (
        key,
        moat_common::CIDR_KEY_FIXED_BITS + u32::from(net.prefix()),
    )
}

/// The id spaces compilation allocates from. Each assignment is a function of the live keys,
/// so keeping them between compiles only saves work; a fresh set gives the same result.
#[derive(Clone, Debug)]
pub struct Allocators {
    pub identities: IdentityRegistry,
    pub(crate) rules: HashedIds<RuleRef>,
    pub(crate) variants: HashedIds<VariantKey>,
    /// Selector identities of DNS-name patterns.
    pub(crate) fqdn: HashedIds<FqdnPattern>,
}

impl Default for Allocators {
    fn default() -> Self {
        Self {
            identities: IdentityRegistry::new(),
            rules: HashedIds::new(
                "rule ids",
                u64::from(moat_common::rule::FIRST_USER),
                1 << 32,
            ),
            variants: HashedIds::new("endpoint policy ids", IDENTITY_END, 1 << 32),
            fqdn: HashedIds::new(
                "FQDN selector identities",
                u64::from(moat_common::IDENTITY_FQDN_FIRST),
                u64::from(moat_common::IDENTITY_FQDN_END),
            ),
        }
    }
}

/// From-scratch compile with fresh allocators.
pub fn compile(inputs: &ClusterInputs) -> Result<DatapathState, Error> {
    compile_with(inputs, &mut Allocators::default())
}

/// The pods of one policy id: the pods of an identity that resolve its ingress named ports
/// alike.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Group {
    pub resolution: Resolution,
    pub policy_id: u32,
    pub pods: Vec<PodRef>,
}

/// One rule's selector peers and the live identities they match (the rule's remotes).
#[derive(Clone, Debug, Default)]
pub(crate) struct Remotes {
    pub policy_ns: String,
    pub peers: Vec<(Option<LabelSelector>, Option<LabelSelector>)>,
    pub ids: BTreeSet<Identity>,
}

impl Remotes {
    pub fn matches(&self, labels: &SecurityLabels) -> bool {
        self.peers
            .iter()
            .any(|(pods, nss)| peer_matches(&self.policy_ns, pods, nss, labels))
    }
}

/// Tables derived from the inputs that compilation reads, kept by the engine between events
/// so that an event recomputes only what it touches.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tables {
    pub by_pod: BTreeMap<PodRef, Identity>,
    pub labels: BTreeMap<Identity, SecurityLabels>,
    pub pods: BTreeMap<Identity, BTreeSet<PodRef>>,
    pub by_namespace: BTreeMap<String, BTreeSet<Identity>>,
    /// Rules with at least one selector peer.
    pub remotes: BTreeMap<RuleRef, Remotes>,
    /// Egress rules with a named port (they look at remote pods, not only identities).
    pub named_egress: BTreeSet<RuleRef>,
    pub groups: BTreeMap<Identity, Vec<Group>>,
    /// Which pods claim an address (the first in name order wins the ipcache entry).
    pub ip_pods: BTreeMap<IpAddr, BTreeSet<PodRef>>,
    /// Each ClusterNetworkPolicy's slot among the policies of its tier and priority (see
    /// `cnp_rule_id`).
    pub cnp_slots: BTreeMap<String, u32>,
}

/// The id of a ClusterNetworkPolicy rule. Within a tier the datapath takes the lowest id as
/// the first rule, so the id orders by priority, then policy (its slot), then rule index:
///   priority (10 bits, 0-1000) | slot (16 bits, 1-65535) | direction (1) | index (5, < 25)
/// Ids depend only on the policy's own name, priority and rule position (the slot is a hash
/// of the name, probed past the other policies of the same tier and priority), so they are
/// the same on every node and across restarts, and adding a policy leaves others' ids alone
/// unless two names collide at one priority.
pub fn cnp_rule_id(priority: u32, slot: u32, direction: Direction, index: u32) -> u32 {
    (priority << 22) | (slot << 6) | (u32::from(direction.as_u8()) << 5) | index
}

const CNP_SLOTS: u32 = (1 << 16) - 1;

/// Slots for every ClusterNetworkPolicy (see `cnp_rule_id`). Policies of one tier and
/// priority that hash to the same slot take the next free one, in name order. Two policies
/// of the same tier and priority may be evaluated in either order (the API says so); the
/// slot fixes one.
pub(crate) fn cnp_slots(policies: &BTreeMap<String, NormalizedCnp>) -> BTreeMap<String, u32> {
    let mut used: BTreeSet<(Tier, u32, u32)> = BTreeSet::new();
    let mut out = BTreeMap::new();
    for (name, p) in policies {
        let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let mut slot = hash % CNP_SLOTS + 1;
        while !used.insert((p.tier, p.priority, slot)) {
            slot = slot % CNP_SLOTS + 1;
        }
        out.insert(name.clone(), slot);
    }
    out
}

/// The rule refs of a ClusterNetworkPolicy with their rules.
pub(crate) fn cnp_rule_refs(
    policy: &NormalizedCnp,
) -> impl Iterator<Item = (RuleRef, &NormalizedCnpRule)> {
    Direction::BOTH.into_iter().flat_map(move |d| {
        policy.rules(d).iter().enumerate().map(move |(i, rule)| {
            (
                RuleRef {
                    kind: PolicyKind::of_tier(policy.tier),
                    namespace: String::new(),
                    policy: policy.name.clone(),
                    direction: d,
                    index: i as u32,
                },
                rule,
            )
        })
    })
}

/// A ClusterNetworkPolicy rule in the form `compile_rule` takes: pod peers become selector
/// peers with an explicit namespace selector, networks and the selected nodes' addresses
/// become address blocks.
pub(crate) fn cnp_as_rule(inputs: &ClusterInputs, rule: &NormalizedCnpRule) -> Rule {
    let peers = rule.peers.as_ref().map(|peers| {
        let mut out = Vec::new();
        for peer in peers {
            match peer {
                CnpPeer::Pods(sel) => out.push(Peer::Selector {
                    pods: Some(sel.pods.clone().unwrap_or_default()),
                    namespaces: Some(sel.namespaces.clone()),
                }),
                CnpPeer::Networks(nets) => out.extend(nets.iter().map(|n| Peer::IpBlock {
                    cidr: *n,
                    except: vec![],
                })),
                CnpPeer::Fqdn(pattern) => out.push(Peer::Fqdn(pattern.clone())),
                CnpPeer::Nodes(sel) => {
                    for node in inputs.nodes.values().filter(|n| sel.matches(&n.labels)) {
                        out.extend(node.ips.iter().map(|ip| Peer::IpBlock {
                            cidr: IpNetwork::from(*ip),
                            except: vec![],
                        }));
                    }
                }
            }
        }
        out
    });
    Rule {
        peers,
        ports: rule.ports.clone(),
    }
}

/// The rule refs of a policy with their rules.
pub(crate) fn rule_refs(
    kind: PolicyKind,
    policy: &NormalizedPolicy,
) -> impl Iterator<Item = (RuleRef, &Rule)> {
    Direction::BOTH.into_iter().flat_map(move |d| {
        policy
            .rules(d)
            .into_iter()
            .flatten()
            .enumerate()
            .map(move |(i, rule)| {
                (
                    RuleRef {
                        kind,
                        namespace: policy.namespace.clone(),
                        policy: policy.name.clone(),
                        direction: d,
                        index: i as u32,
                    },
                    rule,
                )
            })
    })
}

pub(crate) fn selector_peers(rule: &Rule) -> Vec<(Option<LabelSelector>, Option<LabelSelector>)> {
    rule.peers
        .iter()
        .flatten()
        .filter_map(|p| match p {
            Peer::Selector { pods, namespaces } => Some((pods.clone(), namespaces.clone())),
            Peer::IpBlock { .. } | Peer::Fqdn(_) => None,
        })
        .collect()
}

/// The DNS-name patterns of a rule's peers.
pub(crate) fn fqdn_peers(rule: &Rule) -> impl Iterator<Item = &FqdnPattern> {
    rule.peers.iter().flatten().filter_map(|p| match p {
        Peer::Fqdn(pattern) => Some(pattern),
        _ => None,
    })
}

/// Every DNS-name pattern a policy of the inputs names (the live keys of the selector ids).
pub(crate) fn live_fqdn_patterns(inputs: &ClusterInputs) -> BTreeSet<FqdnPattern> {
    let netpol = inputs
        .all_policies()
        .flat_map(|(_, p)| p.egress.iter().flatten())
        .flat_map(fqdn_peers);
    let cluster = inputs
        .cluster_policies
        .values()
        .flat_map(|p| &p.egress)
        .flat_map(|r| r.peers.iter().flatten())
        .filter_map(|p| match p {
            CnpPeer::Fqdn(pattern) => Some(pattern),
            _ => None,
        });
    netpol.chain(cluster).cloned().collect()
}

/// Whether egress rules with DNS-name peers apply to pods with `labels` (exactly when their
/// identity gets `fqdn_patterns` entries).
pub(crate) fn has_fqdn_egress(inputs: &ClusterInputs, labels: &SecurityLabels) -> bool {
    let netpol = selecting(inputs, labels, Direction::Egress)
        .flat_map(|(_, p)| p.egress.iter().flatten())
        .any(|r| fqdn_peers(r).next().is_some());
    netpol
        || cluster_selecting(inputs, labels, Direction::Egress)
            .flat_map(|p| &p.egress)
            .flat_map(|r| r.peers.iter().flatten())
            .any(|p| matches!(p, CnpPeer::Fqdn(_)))
}

pub(crate) fn has_named_port(rule: &Rule) -> bool {
    rule.ports
        .iter()
        .any(|p| matches!(p.port, PortSpec::Named(_)))
}

impl Tables {
    pub fn add_pod(&mut self, r: &PodRef, id: Identity, labels: &SecurityLabels, ips: &[IpAddr]) {
        self.by_pod.insert(r.clone(), id);
        self.pods.entry(id).or_default().insert(r.clone());
        self.labels.entry(id).or_insert_with(|| labels.clone());
        self.by_namespace
            .entry(labels.namespace.clone())
            .or_default()
            .insert(id);
        for ip in ips {
            self.ip_pods.entry(*ip).or_default().insert(r.clone());
        }
    }

    /// Forgets a pod; returns its identity and whether that identity has no pod left (its
    /// labels and groups stay until `remove_identity`).
    pub fn remove_pod(&mut self, r: &PodRef, ips: &[IpAddr]) -> Option<(Identity, bool)> {
        for ip in ips {
            if let Some(set) = self.ip_pods.get_mut(ip) {
                set.remove(r);
                if set.is_empty() {
                    self.ip_pods.remove(ip);
                }
            }
        }
        let id = self.by_pod.remove(r)?;
        let pods = self.pods.get_mut(&id).expect("identity of a pod");
        pods.remove(r);
        Some((id, pods.is_empty()))
    }

    pub fn remove_identity(&mut self, id: Identity) -> Option<Vec<Group>> {
        self.pods.remove(&id);
        if let Some(l) = self.labels.remove(&id)
            && let Some(set) = self.by_namespace.get_mut(&l.namespace)
        {
            set.remove(&id);
            if set.is_empty() {
                self.by_namespace.remove(&l.namespace);
            }
        }
        self.groups.remove(&id)
    }

    /// Live identities a rule's selector peers match, looked up by namespace first.
    pub fn match_peers(
        &self,
        policy_ns: &str,
        peers: &[(Option<LabelSelector>, Option<LabelSelector>)],
    ) -> BTreeSet<Identity> {
        let mut out = BTreeSet::new();
        for (pods, nss) in peers {
            let namespaces: Vec<&BTreeSet<Identity>> = match nss {
                None => self.by_namespace.get(policy_ns).into_iter().collect(),
                Some(sel) => self
                    .by_namespace
                    .values()
                    .filter(|ids| {
                        ids.first()
                            .is_some_and(|id| sel.matches(&self.labels[id].namespace_labels))
                    })
                    .collect(),
            };
            for ids in namespaces {
                out.extend(ids.iter().copied().filter(|id| {
                    pods.as_ref()
                        .is_none_or(|sel| sel.matches(&self.labels[id].pod_labels))
                }));
            }
        }
        out
    }

    /// Live identities a policy's podSelector selects.
    pub fn selected_by(&self, ns: &str, selector: &LabelSelector) -> Vec<Identity> {
        self.by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| selector.matches(&self.labels[id].pod_labels))
            .collect()
    }

    /// Indexes one policy's rules (remotes, named egress).
    pub fn add_policy_rules(&mut self, kind: PolicyKind, policy: &NormalizedPolicy) {
        for (r, rule) in rule_refs(kind, policy) {
            let peers = selector_peers(rule);
            if !peers.is_empty() {
                let ids = self.match_peers(&policy.namespace, &peers);
                self.remotes.insert(
                    r.clone(),
                    Remotes {
                        policy_ns: policy.namespace.clone(),
                        peers,
                        ids,
                    },
                );
            }
            if r.direction == Direction::Egress && has_named_port(rule) {
                self.named_egress.insert(r);
            }
        }
    }

    pub fn remove_policy_rules(&mut self, kind: PolicyKind, policy: &NormalizedPolicy) {
        for (r, _) in rule_refs(kind, policy) {
            self.remotes.remove(&r);
            self.named_egress.remove(&r);
        }
    }

    pub fn endpoint(&self, inputs: &ClusterInputs, r: &PodRef) -> Option<Endpoint> {
        let pod = inputs.pods.get(r)?;
        let identity = *self.by_pod.get(r)?;
        let policy_id = self
            .groups
            .get(&identity)
            .into_iter()
            .flatten()
            .find(|g| g.pods.contains(r))
            .map_or(identity.0, |g| g.policy_id);
        Some(Endpoint {
            identity,
            policy_id,
            ips: pod.ips.clone(),
            fqdn: has_fqdn_egress(inputs, &self.labels[&identity]),
        })
    }

    /// The ipcache entry of one address: the node wins, then the first pod in name order.
    pub fn ipcache_entry(&self, inputs: &ClusterInputs, ip: &IpAddr) -> Option<Identity> {
        if inputs.host_ips.contains(ip) {
            return Some(Identity::HOST);
        }
        let first = self.ip_pods.get(ip)?.first()?;
        self.by_pod.get(first).copied()
    }
}

/// How the pods of an identity resolve the named ports its ingress policies use, smallest
/// resolution first (that group keeps policy_id = identity).
pub(crate) fn grouping(
    inputs: &ClusterInputs,
    t: &Tables,
    id: Identity,
) -> Vec<(Resolution, Vec<PodRef>)> {
    let names = ingress_named_ports(inputs, &t.labels[&id]);
    let mut by_resolution: BTreeMap<Resolution, Vec<PodRef>> = BTreeMap::new();
    for r in t.pods.get(&id).into_iter().flatten() {
        let pod = &inputs.pods[r];
        let res: Resolution = names
            .iter()
            .map(|(n, p)| (n.clone(), *p, pod.resolve(n, *p).into_iter().collect()))
            .collect();
        by_resolution.entry(res).or_default().push(r.clone());
    }
    by_resolution.into_iter().collect()
}

pub(crate) fn variant_keys(
    id: Identity,
    groups: &[(Resolution, Vec<PodRef>)],
) -> impl Iterator<Item = VariantKey> + '_ {
    groups.iter().skip(1).map(move |(res, _)| VariantKey {
        identity: id.0,
        resolution: res.clone(),
    })
}

pub(crate) fn assign_groups(
    variants: &HashedIds<VariantKey>,
    id: Identity,
    groups: Vec<(Resolution, Vec<PodRef>)>,
) -> Vec<Group> {
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (resolution, pods))| {
            let policy_id = if i == 0 {
                id.0
            } else {
                variants
                    .get(&VariantKey {
                        identity: id.0,
                        resolution: resolution.clone(),
                    })
                    .expect("synced")
            };
            Group {
                resolution,
                policy_id,
                pods,
            }
        })
        .collect()
}

/// ipcache: world for every address no longer prefix claims.
pub(crate) fn world_entries() -> [(IpNetwork, Identity); 2] {
    [
        (
            IpNetwork::V4(Ipv4Network::new(0.into(), 0).expect("valid")),
            Identity::WORLD,
        ),
        (
            IpNetwork::V6(Ipv6Network::new(0.into(), 0).expect("valid")),
            Identity::WORLD,
        ),
    ]
}

/// From-scratch build of the tables and the state.
pub(crate) fn build(
    inputs: &ClusterInputs,
    alloc: &mut Allocators,
) -> Result<(Tables, DatapathState), Error> {
    let per_pod: Vec<(&PodRef, &Pod, SecurityLabels)> = inputs
        .pods
        .iter()
        .map(|(r, p)| (r, p, inputs.security_labels(p)))
        .collect();
    let live: BTreeSet<SecurityLabels> = per_pod.iter().map(|(_, _, s)| s.clone()).collect();
    alloc.identities.sync(&live)?;
    let mut t = Tables::default();
    for (r, p, s) in &per_pod {
        let id = alloc.identities.lookup(s).expect("synced");
        t.add_pod(r, id, s, &p.ips);
    }

    let rule_keys: BTreeSet<RuleRef> = inputs
        .all_policies()
        .flat_map(|(k, p)| rule_refs(k, p).map(|(r, _)| r))
        .collect();
    alloc.rules.sync(&rule_keys)?;
    alloc.fqdn.sync(&live_fqdn_patterns(inputs))?;
    for (kind, p) in inputs.all_policies() {
        t.add_policy_rules(kind, p);
    }
    t.cnp_slots = cnp_slots(&inputs.cluster_policies);
    for p in inputs.cluster_policies.values() {
        for (r, rule) in cnp_rule_refs(p) {
            let peers = selector_peers(&cnp_as_rule(inputs, rule));
            if !peers.is_empty() {
                let ids = t.match_peers("", &peers);
                t.remotes.insert(
                    r,
                    Remotes {
                        policy_ns: String::new(),
                        peers,
                        ids,
                    },
                );
            }
        }
    }

    let mut raw = Vec::new();
    let mut vkeys = BTreeSet::new();
    for id in t.labels.keys() {
        let g = grouping(inputs, &t, *id);
        vkeys.extend(variant_keys(*id, &g));
        raw.push((*id, g));
    }
    alloc.variants.sync(&vkeys)?;
    for (id, g) in raw {
        t.groups.insert(id, assign_groups(&alloc.variants, id, g));
    }

    let mut state = DatapathState {
        identities: t
            .labels
            .iter()
            .map(|(id, s)| (*id, s.to_label_set()))
            .collect(),
        rules: alloc.rules.iter().map(|(k, id)| (id, k.clone())).collect(),
        fqdn_selectors: alloc
            .fqdn
            .iter()
            .map(|(p, id)| (id, p.to_string()))
            .collect(),
        cluster_rules: inputs
            .cluster_policies
            .values()
            .flat_map(|p| {
                let slot = t.cnp_slots[&p.name];
                cnp_rule_refs(p).map(move |(r, _)| {
                    let id = cnp_rule_id(p.priority, slot, r.direction, r.index);
                    ((p.tier.as_u8(), id), r)
                })
            })
            .collect(),
        ..Default::default()
    };
    state.ipcache.extend(world_entries());
    for ip in t.ip_pods.keys().chain(&inputs.host_ips) {
        if let Some(id) = t.ipcache_entry(inputs, ip) {
            state.ipcache.insert(IpNetwork::from(*ip), id);
        }
    }
    for r in inputs.pods.keys() {
        if let Some(e) = t.endpoint(inputs, r) {
            state.endpoints.insert(r.clone(), e);
        }
        if let Some(m) = inputs.mode_of(r) {
            state.modes.insert(r.clone(), m);
        }
    }
    let ctx = Ctx {
        inputs,
        tables: &t,
        rule_ids: &alloc.rules,
        fqdn_ids: &alloc.fqdn,
        only_remotes: None,
    };
    for id in t.labels.keys() {
        ctx.compile_identity(&mut state, *id)?;
    }
    Ok((t, state))
}

pub fn compile_with(
    inputs: &ClusterInputs,
    alloc: &mut Allocators,
) -> Result<DatapathState, Error> {
    Ok(build(inputs, alloc)?.1)
}

/// (name, protocol) of every named port in ingress rules of policies that select `labels`.
fn ingress_named_ports(inputs: &ClusterInputs, labels: &SecurityLabels) -> BTreeSet<(String, u8)> {
    let netpol = selecting(inputs, labels, Direction::Ingress)
        .flat_map(|(_, p)| p.ingress.iter().flatten())
        .flat_map(|r| &r.ports);
    let cluster = cluster_selecting(inputs, labels, Direction::Ingress)
        .flat_map(|p| &p.ingress)
        .flat_map(|r| &r.ports);
    netpol
        .chain(cluster)
        .filter_map(|p| match &p.port {
            PortSpec::Named(n) => Some((n.clone(), p.proto)),
            _ => None,
        })
        .collect()
}

/// ClusterNetworkPolicies whose subject selects pods with `labels` and that have rules in
/// `direction` (a policy with no rules in a direction does not affect it).
pub(crate) fn cluster_selecting<'a>(
    inputs: &'a ClusterInputs,
    labels: &'a SecurityLabels,
    direction: Direction,
) -> impl Iterator<Item = &'a NormalizedCnp> + 'a {
    inputs.cluster_policies.values().filter(move |p| {
        !p.rules(direction).is_empty() && p.selects(&labels.namespace_labels, &labels.pod_labels)
    })
}

/// Policies that isolate pods with `labels` in `direction`.
fn selecting<'a>(
    inputs: &'a ClusterInputs,
    labels: &'a SecurityLabels,
    direction: Direction,
) -> impl Iterator<Item = (PolicyKind, &'a NormalizedPolicy)> + 'a {
    inputs.policies_in(&labels.namespace).filter(move |(_, p)| {
        p.rules(direction).is_some() && p.pod_selector.matches(&labels.pod_labels)
    })
}

/// Whether a selector peer of a policy in `policy_ns` matches an identity.
pub(crate) fn peer_matches(
    policy_ns: &str,
    pods: &Option<LabelSelector>,
    namespaces: &Option<LabelSelector>,
    labels: &SecurityLabels,
) -> bool {
    let ns_ok = match namespaces {
        None => labels.namespace == policy_ns,
        Some(sel) => sel.matches(&labels.namespace_labels),
    };
    ns_ok
        && pods
            .as_ref()
            .is_none_or(|sel| sel.matches(&labels.pod_labels))
}

/// A resolved port match: protocol 0 = any, range 0..=65535 = any port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortMatch {
    proto: u8,
    start: u16,
    end: u16,
}

const ANY_PORT: (u16, u16) = (0, u16::MAX);

pub(crate) struct Ctx<'a> {
    pub inputs: &'a ClusterInputs,
    pub tables: &'a Tables,
    pub rule_ids: &'a HashedIds<RuleRef>,
    pub fqdn_ids: &'a HashedIds<FqdnPattern>,
    /// When set, only the identity-keyed entries (policy map, port ranges) whose remote
    /// identity is in the set are produced: what an identity that came or went changes in
    /// the policy ids that allow it by selector.
    pub only_remotes: Option<&'a BTreeSet<u32>>,
}

impl Ctx<'_> {
    /// Every entry of every policy id of one identity.
    pub fn compile_identity(&self, state: &mut DatapathState, id: Identity) -> Result<(), Error> {
        let labels = &self.tables.labels[&id];
        for g in self.tables.groups.get(&id).into_iter().flatten() {
            for d in Direction::BOTH {
                self.compile_policy_id(state, id, g.policy_id, labels, &g.resolution, d)?;
            }
        }
        Ok(())
    }

    fn compile_policy_id(
        &self,
        state: &mut DatapathState,
        identity: Identity,
        policy_id: u32,
        labels: &SecurityLabels,
        local_resolution: &Resolution,
        direction: Direction,
    ) -> Result<(), Error> {
        let dir = direction.as_u8();
        let mut selected = false;
        let mut cidr_items: Vec<CidrItem> = Vec::new();
        let mut ranges: BTreeMap<PortRangeKey, Vec<PortRule>> = BTreeMap::new();
        for (kind, policy) in selecting(self.inputs, labels, direction) {
            selected = true;
            for (index, rule) in policy.rules(direction).into_iter().flatten().enumerate() {
                let rule_ref = RuleRef {
                    kind,
                    namespace: policy.namespace.clone(),
                    policy: policy.name.clone(),
                    direction,
                    index: index as u32,
                };
                let rule_id = self.rule_ids.get(&rule_ref).expect("synced");
                let mut out = RuleOut {
                    only_remotes: self.only_remotes,
                    state: &mut *state,
                    ranges: &mut ranges,
                    cidr_items: &mut cidr_items,
                    identity,
                    policy_id,
                    dir,
                    rule_id,
                    tier: moat_common::TIER_NETPOL,
                    action: ACTION_ALLOW,
                };
                self.compile_rule(&mut out, &rule_ref, rule, local_resolution, direction);
            }
        }
        for policy in cluster_selecting(self.inputs, labels, direction) {
            let slot = self.tables.cnp_slots[&policy.name];
            for (rule_ref, rule) in cnp_rule_refs(policy).filter(|(r, _)| r.direction == direction)
            {
                let mut out = RuleOut {
                    only_remotes: self.only_remotes,
                    state: &mut *state,
                    ranges: &mut ranges,
                    cidr_items: &mut cidr_items,
                    identity,
                    policy_id,
                    dir,
                    rule_id: cnp_rule_id(policy.priority, slot, direction, rule_ref.index),
                    tier: policy.tier.as_u8(),
                    action: rule.action.as_u8(),
                };
                let as_rule = cnp_as_rule(self.inputs, rule);
                self.compile_rule(&mut out, &rule_ref, &as_rule, local_resolution, direction);
            }
        }
        if self.only_remotes.is_some() {
            cidr_items.clear();
        }
        if !selected && self.only_remotes.is_none_or(|only| only.contains(&0)) {
            insert_entry(
                state,
                PolicyKey {
                    policy_id,
                    remote_identity: 0,
                    dport: 0,
                    proto: 0,
                    direction: dir,
                },
                moat_common::TIER_NETPOL,
                ACTION_ALLOW,
                moat_common::rule::NOT_ISOLATED,
            );
        }
        for (key, rules) in ranges {
            let set = build_rule_set(rules).map_err(|count| Error::TooManyPortRules {
                policy_id,
                direction: direction.name(),
                prefix: format!(
                    "port ranges for remote identity {} proto {}",
                    key.remote_identity, key.proto
                ),
                count,
                max: MAX_PORT_RULES,
            })?;
            state.port_ranges.insert(key, set);
        }
        for (prefix, rules) in flatten(&cidr_items) {
            let set = build_rule_set(rules).map_err(|count| Error::TooManyPortRules {
                policy_id,
                direction: direction.name(),
                prefix: prefix.to_string(),
                count,
                max: MAX_PORT_RULES,
            })?;
            match prefix {
                IpNetwork::V4(n) => state.cidr_v4.insert((policy_id, dir, n), set),
                IpNetwork::V6(n) => state.cidr_v6.insert((policy_id, dir, n), set),
            };
        }
        Ok(())
    }

    fn compile_rule(
        &self,
        out: &mut RuleOut<'_>,
        rule_ref: &RuleRef,
        rule: &Rule,
        local_resolution: &Resolution,
        direction: Direction,
    ) {
        // Ports known without looking at the remote side; egress named ports are kept aside.
        let mut fixed: Vec<PortMatch> = Vec::new();
        let mut remote_named: Vec<(&str, u8)> = Vec::new();
        if rule.ports.is_empty() {
            fixed.push(PortMatch {
                proto: 0,
                start: ANY_PORT.0,
                end: ANY_PORT.1,
            });
        }
        for p in &rule.ports {
            match &p.port {
                PortSpec::Any => fixed.push(PortMatch {
                    proto: p.proto,
                    start: ANY_PORT.0,
                    end: ANY_PORT.1,
                }),
                PortSpec::Range(s, e) => fixed.push(PortMatch {
                    proto: p.proto,
                    start: *s,
                    end: *e,
                }),
                PortSpec::Named(name) => match direction {
                    Direction::Ingress => {
                        let ports = local_resolution
                            .iter()
                            .find(|(n, pr, _)| n == name && *pr == p.proto)
                            .map(|(_, _, ports)| ports.as_slice())
                            .unwrap_or_default();
                        fixed.extend(ports.iter().map(|port| PortMatch {
                            proto: p.proto,
                            start: *port,
                            end: *port,
                        }));
                    }
                    Direction::Egress => remote_named.push((name, p.proto)),
                },
            }
        }

        // Remote identities from selector peers (None = every remote, the wildcard).
        let empty = BTreeSet::new();
        let remotes: &BTreeSet<Identity> =
            self.tables.remotes.get(rule_ref).map_or(&empty, |r| &r.ids);
        let mut blocks: Vec<(IpNetwork, Vec<IpNetwork>)> = Vec::new();
        let all_peers = rule.peers.is_none();
        for peer in rule.peers.iter().flatten() {
            if let Peer::IpBlock { cidr, except } = peer {
                blocks.push((*cidr, except.clone()));
            }
        }

        // DNS-name peers: their selector identities, and the local identity's pattern
        // entries that tell the datapath which answers teach it addresses for them.
        let mut selectors = Vec::new();
        for pattern in fqdn_peers(rule) {
            let selector = self.fqdn_ids.get(pattern).expect("synced");
            selectors.push(selector);
            out.fqdn_pattern(pattern, selector);
        }

        let identity_targets: Vec<u32> = if all_peers {
            vec![moat_common::IDENTITY_ANY]
        } else {
            remotes.iter().map(|i| i.0).chain(selectors).collect()
        };
        for remote in &identity_targets {
            for m in &fixed {
                out.port_match(*remote, *m);
            }
        }
        for (cidr, except) in &blocks {
            out.cidr_items.push(CidrItem {
                prefix: *cidr,
                except: except.clone(),
                rules: fixed.iter().map(|m| out.port_rule(*m)).collect(),
            });
        }

        // Egress named ports: resolved per destination pod.
        if remote_named.is_empty() {
            return;
        }
        let named_remotes: Vec<Identity> = if all_peers {
            self.tables.labels.keys().copied().collect()
        } else {
            remotes.iter().copied().collect()
        };
        for (name, proto) in &remote_named {
            for id in &named_remotes {
                let pods = &self.tables.pods[id];
                let per_pod: Vec<(&PodRef, BTreeSet<u16>)> = pods
                    .iter()
                    .map(|r| (r, self.inputs.pods[r].resolve(name, *proto)))
                    .collect();
                if per_pod.iter().all(|(_, ports)| *ports == per_pod[0].1) {
                    for port in &per_pod[0].1 {
                        out.port_match(
                            id.0,
                            PortMatch {
                                proto: *proto,
                                start: *port,
                                end: *port,
                            },
                        );
                    }
                } else {
                    for (r, ports) in &per_pod {
                        self.pod_address_items(out, r, *proto, ports);
                    }
                }
            }
            // ipBlock peers with a named port: the pods whose addresses the block covers.
            for (cidr, except) in &blocks {
                for pod in self.inputs.pods.values() {
                    let inside = |ip: &&IpAddr| {
                        cidr.contains(**ip) && !except.iter().any(|e| e.contains(**ip))
                    };
                    let ports = pod.resolve(name, *proto);
                    for ip in pod.ips.iter().filter(inside) {
                        let rules = ports
                            .iter()
                            .map(|p| {
                                out.port_rule(PortMatch {
                                    proto: *proto,
                                    start: *p,
                                    end: *p,
                                })
                            })
                            .collect();
                        out.cidr_items.push(CidrItem {
                            prefix: IpNetwork::from(*ip),
                            except: vec![],
                            rules,
                        });
                    }
                }
            }
        }
    }

    fn pod_address_items(
        &self,
        out: &mut RuleOut<'_>,
        pod: &PodRef,
        proto: u8,
        ports: &BTreeSet<u16>,
    ) {
        for ip in &self.inputs.pods[pod].ips {
            out.cidr_items.push(CidrItem {
                prefix: IpNetwork::from(*ip),
                except: vec![],
                rules: ports
                    .iter()
                    .map(|p| {
                        out.port_rule(PortMatch {
                            proto,
                            start: *p,
                            end: *p,
                        })
                    })
                    .collect(),
            });
        }
    }
}

/// Where one rule's entries go.
struct RuleOut<'a> {
    only_remotes: Option<&'a BTreeSet<u32>>,
    state: &'a mut DatapathState,
    ranges: &'a mut BTreeMap<PortRangeKey, Vec<PortRule>>,
    cidr_items: &'a mut Vec<CidrItem>,
    /// The local identity (the key of its DNS-name pattern entries).
    identity: Identity,
    policy_id: u32,
    dir: u8,
    rule_id: u32,
    /// moat_common::TIER_* and ACTION_* of the rule.
    tier: u8,
    action: u8,
}

impl RuleOut<'_> {
    fn port_rule(&self, m: PortMatch) -> PortRule {
        PortRule {
            rule_id: self.rule_id,
            port_start: m.start,
            port_end: m.end,
            proto: m.proto,
            action: self.action,
            tier: self.tier,
            _pad: 0,
        }
    }

    /// The pattern entry of the local identity. Patterns depend only on the policies that
    /// select the identity, so a remotes-only pass leaves them alone.
    fn fqdn_pattern(&mut self, pattern: &FqdnPattern, selector: u32) {
        if self.only_remotes.is_some() {
            return;
        }
        let key = FqdnPatternKey {
            identity: self.identity.0,
            kind: pattern.kind(),
            _pad: [0; 3],
            name_hash: pattern.name_hash(),
        };
        self.state.fqdn_patterns.insert(key, selector);
    }

    fn insert(&mut self, remote: u32, dport: u16, proto: u8) {
        let key = PolicyKey {
            policy_id: self.policy_id,
            remote_identity: remote,
            dport,
            proto,
            direction: self.dir,
        };
        insert_entry(self.state, key, self.tier, self.action, self.rule_id);
    }

    /// Identity-keyed entries for one port match: exact keys for single ports, short ranges
    /// and wildcards; a MOAT_PORTRANGES rule for longer ranges.
    fn port_match(&mut self, remote: u32, m: PortMatch) {
        if self
            .only_remotes
            .is_some_and(|only| !only.contains(&remote))
        {
            return;
        }
        let (pid, dir) = (self.policy_id, self.dir);
        if (m.start, m.end) == ANY_PORT {
            self.insert(remote, 0, m.proto);
        } else if u32::from(m.end) - u32::from(m.start) < EXACT_RANGE_MAX_PORTS {
            for port in m.start..=m.end {
                self.insert(remote, port, m.proto);
            }
        } else {
            let key = PortRangeKey {
                policy_id: pid,
                remote_identity: remote,
                proto: m.proto,
                direction: dir,
                _pad: [0; 2],
            };
            let rule = self.port_rule(m);
            self.ranges.entry(key).or_default().push(rule);
        }
    }
}

/// Adds one rule to a key's entry in its tier. Within a tier the lower rule id wins: for
/// NetworkPolicy (allow-only) that names the entry independently of iteration order; for the
/// ClusterNetworkPolicy tiers it is the rule evaluated first (`cnp_rule_id`).
fn insert_entry(state: &mut DatapathState, key: PolicyKey, tier: u8, action: u8, rule_id: u32) {
    let v = state.policy.entry(key).or_default();
    let (current_action, current_rule) = match tier {
        moat_common::TIER_ADMIN => (&mut v.admin_action, &mut v.admin_rule),
        moat_common::TIER_BASELINE => (&mut v.baseline_action, &mut v.baseline_rule),
        _ => (&mut v.action, &mut v.rule_id),
    };
    if *current_action == 0 || rule_id < *current_rule {
        *current_action = action;
        *current_rule = rule_id;
    }
}
