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

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use moat_common::{
    ACTION_ALLOW, MAX_PORT_RULES, PolicyKey, PolicyValue, PortRangeKey, PortRule, PortRuleSet,
};
use serde::{Deserialize, Serialize};

use crate::cidr::{CidrItem, build_rule_set, flatten};
use crate::error::Error;
use crate::identity::{
    CanonicalKey, HashedIds, IDENTITY_END, Identity, IdentityRegistry, SecurityLabels,
};
use crate::labels::LabelSet;
use crate::netpol::{Direction, NormalizedPolicy, Peer, PortSpec, Protocol, Rule};

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
    pub host_ips: BTreeSet<IpAddr>,
}

impl ClusterInputs {
    pub fn security_labels(&self, pod: &Pod) -> SecurityLabels {
        let empty = LabelSet::new();
        let ns_labels = self.namespaces.get(&pod.namespace).unwrap_or(&empty);
        SecurityLabels::new(&pod.namespace, ns_labels, &pod.labels)
    }

    pub fn uses_named_ports(&self) -> bool {
        self.policies.values().any(|p| {
            Direction::BOTH.iter().any(|d| {
                p.rules(*d)
                    .into_iter()
                    .flatten()
                    .flat_map(|r| &r.ports)
                    .any(|port| matches!(port.port, PortSpec::Named(_)))
            })
        })
    }
}

/// Names a compiled rule, for explanations (`rule_id` -> this).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub index: u32,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
        push_str(&mut out, &self.namespace);
        push_str(&mut out, &self.policy);
        out.push(self.direction.as_u8());
        out.extend_from_slice(&self.index.to_le_bytes());
        out
    }
}

/// How one pod resolves the named ports that the ingress policies of its identity use:
/// (name, protocol) -> port numbers.
type Resolution = Vec<(String, u8, Vec<u16>)>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct VariantKey {
    identity: u32,
    resolution: Resolution,
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
}

impl Endpoint {
    /// The MOAT_ENDPOINTS value (addresses beyond the map's slots are left out).
    pub fn to_endpoint_info(&self, mode: u8, flags: u8) -> moat_common::EndpointInfo {
        let mut info = moat_common::EndpointInfo {
            identity: self.identity.0,
            policy_id: self.policy_id,
            mode,
            flags,
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
    rules: HashedIds<RuleRef>,
    variants: HashedIds<VariantKey>,
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
        }
    }
}

/// From-scratch compile with fresh allocators.
pub fn compile(inputs: &ClusterInputs) -> Result<DatapathState, Error> {
    compile_with(inputs, &mut Allocators::default())
}

/// Identities of the current pods, with their labels and pods.
pub(crate) struct IdentityTable {
    pub by_pod: BTreeMap<PodRef, Identity>,
    pub labels: BTreeMap<Identity, SecurityLabels>,
    pub pods: BTreeMap<Identity, Vec<PodRef>>,
}

pub(crate) fn assign_identities(
    inputs: &ClusterInputs,
    alloc: &mut Allocators,
) -> Result<IdentityTable, Error> {
    let per_pod: Vec<(PodRef, SecurityLabels)> = inputs
        .pods
        .iter()
        .map(|(r, p)| (r.clone(), inputs.security_labels(p)))
        .collect();
    let live: BTreeSet<SecurityLabels> = per_pod.iter().map(|(_, s)| s.clone()).collect();
    alloc.identities.sync(&live)?;
    let mut table = IdentityTable {
        by_pod: BTreeMap::new(),
        labels: BTreeMap::new(),
        pods: BTreeMap::new(),
    };
    for (r, s) in per_pod {
        let id = alloc.identities.lookup(&s).expect("synced");
        table.by_pod.insert(r.clone(), id);
        table.pods.entry(id).or_default().push(r);
        table.labels.insert(id, s);
    }
    Ok(table)
}

/// ipcache: world for everything, pod addresses, node addresses (host wins a conflict, then
/// the first pod in name order, so the result never depends on event order).
pub(crate) fn compile_ipcache(
    inputs: &ClusterInputs,
    ids: &IdentityTable,
) -> BTreeMap<IpNetwork, Identity> {
    let mut out = BTreeMap::new();
    out.insert(
        IpNetwork::V4(Ipv4Network::new(0.into(), 0).expect("valid")),
        Identity::WORLD,
    );
    out.insert(
        IpNetwork::V6(Ipv6Network::new(0.into(), 0).expect("valid")),
        Identity::WORLD,
    );
    for (r, pod) in &inputs.pods {
        for ip in &pod.ips {
            out.entry(IpNetwork::from(*ip)).or_insert(ids.by_pod[r]);
        }
    }
    for ip in &inputs.host_ips {
        out.insert(IpNetwork::from(*ip), Identity::HOST);
    }
    out
}

pub fn compile_with(
    inputs: &ClusterInputs,
    alloc: &mut Allocators,
) -> Result<DatapathState, Error> {
    let ids = assign_identities(inputs, alloc)?;
    let mut state = DatapathState {
        identities: ids
            .labels
            .iter()
            .map(|(id, s)| (*id, s.to_label_set()))
            .collect(),
        ipcache: compile_ipcache(inputs, &ids),
        ..Default::default()
    };

    // Rule ids.
    let mut rule_keys = BTreeSet::new();
    for policy in inputs.policies.values() {
        for d in Direction::BOTH {
            for i in 0..policy.rules(d).map_or(0, |r| r.len()) {
                rule_keys.insert(RuleRef {
                    namespace: policy.namespace.clone(),
                    policy: policy.name.clone(),
                    direction: d,
                    index: i as u32,
                });
            }
        }
    }
    alloc.rules.sync(&rule_keys)?;
    state.rules = alloc.rules.iter().map(|(k, id)| (id, k.clone())).collect();

    // Policy ids: per identity, and per named-port resolution when its pods disagree.
    let mut variant_keys = BTreeSet::new();
    let mut groups: Vec<(Identity, Resolution, Vec<PodRef>)> = Vec::new();
    for (id, labels) in &ids.labels {
        let names = ingress_named_ports(inputs, labels);
        let mut by_resolution: BTreeMap<Resolution, Vec<PodRef>> = BTreeMap::new();
        for r in &ids.pods[id] {
            let pod = &inputs.pods[r];
            let res: Resolution = names
                .iter()
                .map(|(n, p)| (n.clone(), *p, pod.resolve(n, *p).into_iter().collect()))
                .collect();
            by_resolution.entry(res).or_default().push(r.clone());
        }
        for (i, (res, pods)) in by_resolution.into_iter().enumerate() {
            if i > 0 {
                variant_keys.insert(VariantKey {
                    identity: id.0,
                    resolution: res.clone(),
                });
            }
            groups.push((*id, res, pods));
        }
    }
    alloc.variants.sync(&variant_keys)?;

    let ctx = Ctx {
        inputs,
        ids: &ids,
        rule_ids: &alloc.rules,
    };
    for (id, res, pods) in &groups {
        let policy_id = alloc
            .variants
            .get(&VariantKey {
                identity: id.0,
                resolution: res.clone(),
            })
            .unwrap_or(id.0);
        for r in pods {
            state.endpoints.insert(
                r.clone(),
                Endpoint {
                    identity: *id,
                    policy_id,
                    ips: inputs.pods[r].ips.clone(),
                },
            );
        }
        for d in Direction::BOTH {
            ctx.compile_policy_id(&mut state, policy_id, &ids.labels[id], res, d)?;
        }
    }
    Ok(state)
}

/// (name, protocol) of every named port in ingress rules of policies that select `labels`.
fn ingress_named_ports(inputs: &ClusterInputs, labels: &SecurityLabels) -> BTreeSet<(String, u8)> {
    selecting(inputs, labels, Direction::Ingress)
        .flat_map(|(_, p)| p.ingress.iter().flatten())
        .flat_map(|r| &r.ports)
        .filter_map(|p| match &p.port {
            PortSpec::Named(n) => Some((n.clone(), p.proto)),
            _ => None,
        })
        .collect()
}

/// Policies that isolate pods with `labels` in `direction`.
fn selecting<'a>(
    inputs: &'a ClusterInputs,
    labels: &'a SecurityLabels,
    direction: Direction,
) -> impl Iterator<Item = (&'a (String, String), &'a NormalizedPolicy)> + 'a {
    inputs.policies.iter().filter(move |(_, p)| {
        p.namespace == labels.namespace
            && p.rules(direction).is_some()
            && p.pod_selector.matches(&labels.pod_labels)
    })
}

/// Whether a selector peer of a policy in `policy_ns` matches an identity.
fn peer_matches(
    policy_ns: &str,
    pods: &Option<crate::LabelSelector>,
    namespaces: &Option<crate::LabelSelector>,
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

struct Ctx<'a> {
    inputs: &'a ClusterInputs,
    ids: &'a IdentityTable,
    rule_ids: &'a HashedIds<RuleRef>,
}

impl Ctx<'_> {
    fn compile_policy_id(
        &self,
        state: &mut DatapathState,
        policy_id: u32,
        labels: &SecurityLabels,
        local_resolution: &Resolution,
        direction: Direction,
    ) -> Result<(), Error> {
        let dir = direction.as_u8();
        let mut selected = false;
        let mut cidr_items: Vec<CidrItem> = Vec::new();
        let mut ranges: BTreeMap<PortRangeKey, Vec<PortRule>> = BTreeMap::new();
        for ((ns, name), policy) in selecting(self.inputs, labels, direction) {
            selected = true;
            for (index, rule) in policy.rules(direction).into_iter().flatten().enumerate() {
                let rule_id = self
                    .rule_ids
                    .get(&RuleRef {
                        namespace: ns.clone(),
                        policy: name.clone(),
                        direction,
                        index: index as u32,
                    })
                    .expect("synced");
                let mut out = RuleOut {
                    state: &mut *state,
                    ranges: &mut ranges,
                    cidr_items: &mut cidr_items,
                    policy_id,
                    dir,
                    rule_id,
                };
                self.compile_rule(
                    &mut out,
                    &policy.namespace,
                    rule,
                    local_resolution,
                    direction,
                );
            }
        }
        if !selected {
            insert_policy(
                state,
                policy_id,
                0,
                0,
                0,
                dir,
                moat_common::rule::NOT_ISOLATED,
            );
            return Ok(());
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
        policy_ns: &str,
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
        let mut remotes: BTreeSet<Identity> = BTreeSet::new();
        let mut blocks: Vec<(IpNetwork, Vec<IpNetwork>)> = Vec::new();
        let all_peers = rule.peers.is_none();
        for peer in rule.peers.iter().flatten() {
            match peer {
                Peer::Selector { pods, namespaces } => {
                    remotes.extend(
                        self.ids
                            .labels
                            .iter()
                            .filter(|(_, l)| peer_matches(policy_ns, pods, namespaces, l))
                            .map(|(id, _)| *id),
                    );
                }
                Peer::IpBlock { cidr, except } => blocks.push((*cidr, except.clone())),
            }
        }

        let identity_targets: Vec<u32> = if all_peers {
            vec![moat_common::IDENTITY_ANY]
        } else {
            remotes.iter().map(|i| i.0).collect()
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
            self.ids.labels.keys().copied().collect()
        } else {
            remotes.iter().copied().collect()
        };
        for (name, proto) in &remote_named {
            for id in &named_remotes {
                let pods = &self.ids.pods[id];
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
    state: &'a mut DatapathState,
    ranges: &'a mut BTreeMap<PortRangeKey, Vec<PortRule>>,
    cidr_items: &'a mut Vec<CidrItem>,
    policy_id: u32,
    dir: u8,
    rule_id: u32,
}

impl RuleOut<'_> {
    fn port_rule(&self, m: PortMatch) -> PortRule {
        PortRule {
            rule_id: self.rule_id,
            port_start: m.start,
            port_end: m.end,
            proto: m.proto,
            action: ACTION_ALLOW,
            _pad: [0; 2],
        }
    }

    /// Identity-keyed entries for one port match: exact keys for single ports, short ranges
    /// and wildcards; a MOAT_PORTRANGES rule for longer ranges.
    fn port_match(&mut self, remote: u32, m: PortMatch) {
        let (pid, dir, rid) = (self.policy_id, self.dir, self.rule_id);
        if (m.start, m.end) == ANY_PORT {
            insert_policy(self.state, pid, remote, 0, m.proto, dir, rid);
        } else if u32::from(m.end) - u32::from(m.start) < EXACT_RANGE_MAX_PORTS {
            for port in m.start..=m.end {
                insert_policy(self.state, pid, remote, port, m.proto, dir, rid);
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

/// Inserts an ALLOW entry; when two rules produce the same key the lower rule id names it, so
/// the result does not depend on iteration order.
fn insert_policy(
    state: &mut DatapathState,
    policy_id: u32,
    remote: u32,
    dport: u16,
    proto: u8,
    direction: u8,
    rule_id: u32,
) {
    let key = PolicyKey {
        policy_id,
        remote_identity: remote,
        dport,
        proto,
        direction,
    };
    let value = PolicyValue {
        rule_id,
        action: ACTION_ALLOW,
        _pad: [0; 3],
    };
    state
        .policy
        .entry(key)
        .and_modify(|v| {
            if rule_id < v.rule_id {
                *v = value;
            }
        })
        .or_insert(value);
}
