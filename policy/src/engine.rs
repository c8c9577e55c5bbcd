//! Incremental compilation: the daemon feeds events, the engine answers with the map writes
//! and deletes that take the datapath from the previous state to the new one. The engine
//! keeps the rule that the result always equals a from-scratch `compile` of its inputs (a
//! property test holds it to that), and it recomputes only what an event touches:
//!
//! - Policy entries are keyed by policy id (an identity, or a named-port variant of one), so
//!   the unit of recompilation is "every policy id of one identity".
//! - A NetworkPolicy/MoatPolicy add, update or delete recompiles the identities its old and
//!   new podSelector select; its rule ids and remote-identity sets are recomputed alone.
//! - A pod whose label set already has an identity changes its endpoint, mode and ipcache
//!   entries only, unless it changes a named-port resolution (its identity's ingress, or an
//!   egress rule that resolves named ports on the pods it reaches).
//! - A pod with a new identity compiles that identity, and the identities selected by the
//!   policies with a rule whose peer selectors match it (the new remote is added to those
//!   rules' remote sets); a removed identity is the mirror image.
//! - A namespace label change re-identifies that namespace's pods: old identities go, new
//!   ones come, as above (only rules whose namespaceSelector matched or matches recompile).
//! - Node addresses change ipcache entries only.
//! - DNS-name patterns: an identity's pattern entries are recompiled with its other entries;
//!   selector ids are kept in step with the patterns the policies name (a policy change that
//!   adds or drops a pattern updates them, and their explanations in `fqdn_selectors`).
//!
//! Ids are hashed, and their collision handling is canonical (a function of the live keys);
//! when an event would renumber a surviving identity, rule or variant (a rare collision
//! cascade), the engine falls back to a full compile and diff.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use moat_common::{FqdnPatternKey, PolicyKey, PolicyValue, PortRangeKey, PortRuleSet};

use crate::cnp::ClusterNetworkPolicy;
use crate::compile::{
    Allocators, ClusterInputs, Ctx, DatapathState, Endpoint, Group, NodeInfo, Pod, PodRef,
    PolicyKind, RuleRef, Tables, assign_groups, build, fqdn_peers, grouping, live_fqdn_patterns,
    peer_matches, rule_refs, variant_keys,
};
use crate::error::Error;
use crate::evaluate::DirectionVerdict;
use crate::fqdn::FqdnPattern;
use crate::identity::{Collision, Identity, SecurityLabels};
use crate::labels::LabelSet;
use crate::moatpolicy::{MoatPolicy, Mode};
use crate::netpol::{Direction, NetworkPolicy, NormalizedPolicy, Peer};
use crate::selector::LabelSelector;

/// Writes and deletes for one map.
#[derive(Clone, Debug, PartialEq)]
pub struct MapDelta<K: Ord, V> {
    pub upserts: BTreeMap<K, V>,
    pub deletes: BTreeSet<K>,
}

impl<K: Ord, V> Default for MapDelta<K, V> {
    fn default() -> Self {
        Self {
            upserts: BTreeMap::new(),
            deletes: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone, V: PartialEq + Clone> MapDelta<K, V> {
    pub fn between(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Self {
        let upserts = new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let deletes = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        Self { upserts, deletes }
    }

    pub fn apply(&self, map: &mut BTreeMap<K, V>) {
        for k in &self.deletes {
            map.remove(k);
        }
        for (k, v) in &self.upserts {
            map.insert(k.clone(), v.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// Everything one event changes. Apply deletes before writes only within a map; across maps,
/// a daemon should write policy before ipcache/endpoints and delete in the reverse order, so
/// that no packet sees an identity whose policy is not there yet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub identities: MapDelta<Identity, LabelSet>,
    pub endpoints: MapDelta<PodRef, Endpoint>,
    pub ipcache: MapDelta<IpNetwork, Identity>,
    pub policy: MapDelta<PolicyKey, PolicyValue>,
    pub port_ranges: MapDelta<PortRangeKey, PortRuleSet>,
    pub cidr_v4: MapDelta<(u32, u8, Ipv4Network), PortRuleSet>,
    pub cidr_v6: MapDelta<(u32, u8, Ipv6Network), PortRuleSet>,
    pub rules: MapDelta<u32, RuleRef>,
    pub cluster_rules: MapDelta<(u8, u32), RuleRef>,
    pub modes: MapDelta<PodRef, Mode>,
    pub fqdn_patterns: MapDelta<FqdnPatternKey, u32>,
    pub fqdn_selectors: MapDelta<u32, String>,
}

impl Delta {
    pub fn between(old: &DatapathState, new: &DatapathState) -> Self {
        Self {
            identities: MapDelta::between(&old.identities, &new.identities),
            endpoints: MapDelta::between(&old.endpoints, &new.endpoints),
            ipcache: MapDelta::between(&old.ipcache, &new.ipcache),
            policy: MapDelta::between(&old.policy, &new.policy),
            port_ranges: MapDelta::between(&old.port_ranges, &new.port_ranges),
            cidr_v4: MapDelta::between(&old.cidr_v4, &new.cidr_v4),
            cidr_v6: MapDelta::between(&old.cidr_v6, &new.cidr_v6),
            rules: MapDelta::between(&old.rules, &new.rules),
            cluster_rules: MapDelta::between(&old.cluster_rules, &new.cluster_rules),
            modes: MapDelta::between(&old.modes, &new.modes),
            fqdn_patterns: MapDelta::between(&old.fqdn_patterns, &new.fqdn_patterns),
            fqdn_selectors: MapDelta::between(&old.fqdn_selectors, &new.fqdn_selectors),
        }
    }

    pub fn apply(&self, state: &mut DatapathState) {
        self.identities.apply(&mut state.identities);
        self.endpoints.apply(&mut state.endpoints);
        self.ipcache.apply(&mut state.ipcache);
        self.policy.apply(&mut state.policy);
        self.port_ranges.apply(&mut state.port_ranges);
        self.cidr_v4.apply(&mut state.cidr_v4);
        self.cidr_v6.apply(&mut state.cidr_v6);
        self.rules.apply(&mut state.rules);
        self.cluster_rules.apply(&mut state.cluster_rules);
        self.modes.apply(&mut state.modes);
        self.fqdn_patterns.apply(&mut state.fqdn_patterns);
        self.fqdn_selectors.apply(&mut state.fqdn_selectors);
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
            && self.endpoints.is_empty()
            && self.ipcache.is_empty()
            && self.policy.is_empty()
            && self.port_ranges.is_empty()
            && self.cidr_v4.is_empty()
            && self.cidr_v6.is_empty()
            && self.rules.is_empty()
            && self.cluster_rules.is_empty()
            && self.modes.is_empty()
            && self.fqdn_patterns.is_empty()
            && self.fqdn_selectors.is_empty()
    }

    /// True when only endpoint, mode and ipcache entries change (the cheap-churn case).
    pub fn touches_only_endpoints_and_ipcache(&self) -> bool {
        self.identities.is_empty()
            && self.policy.is_empty()
            && self.port_ranges.is_empty()
            && self.cidr_v4.is_empty()
            && self.cidr_v6.is_empty()
            && self.rules.is_empty()
            && self.cluster_rules.is_empty()
            && self.fqdn_patterns.is_empty()
            && self.fqdn_selectors.is_empty()
    }
}

/// The incremental policy engine.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    inputs: ClusterInputs,
    alloc: Allocators,
    tables: Tables,
    state: DatapathState,
}

/// What one event changed in the inputs (the inputs already hold the new values).
#[derive(Default)]
struct Change {
    pods: BTreeSet<PodRef>,
    /// Changed policies with their previous version.
    policies: Vec<(PolicyKind, String, String, Option<NormalizedPolicy>)>,
    /// Namespaces whose pods' modes must be recomputed.
    mode_namespaces: BTreeSet<String>,
    /// Addresses whose ipcache entry must be recomputed (beyond the changed pods').
    ips: BTreeSet<IpAddr>,
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine holding `inputs`, compiled from scratch (for a start or a resync).
    pub fn from_inputs(inputs: ClusterInputs) -> Result<Self, Error> {
        let mut alloc = Allocators::default();
        let (tables, state) = build(&inputs, &mut alloc)?;
        Ok(Self {
            inputs,
            alloc,
            tables,
            state,
        })
    }

    pub fn state(&self) -> &DatapathState {
        &self.state
    }

    pub fn inputs(&self) -> &ClusterInputs {
        &self.inputs
    }

    /// Names the rule behind a verdict (its reason tells the tier): for a ClusterNetworkPolicy
    /// rule the tier, policy, priority, rule (by name when it has one, else by index) and
    /// action; for a NetworkPolicy or MoatPolicy rule its policy and index.
    pub fn describe_rule(&self, reason: u8, rule_id: u32) -> Option<String> {
        self.describe_rule_via(reason, rule_id, None)
    }

    /// `describe_rule` for a verdict (`DirectionVerdict`): when its rule matched through an
    /// address learned from DNS, the DNS-name pattern is named too:
    /// `MoatPolicy ns/name egress[0] to fqdn "*.example.com"`,
    /// `Admin ClusterNetworkPolicy guard (priority 5) egress rule 0 to fqdn "api.example.com": Accept`.
    pub fn describe_verdict(&self, verdict: &DirectionVerdict) -> Option<String> {
        self.describe_rule_via(verdict.reason, verdict.rule_id, verdict.fqdn_selector)
    }

    /// `describe_rule`, naming the pattern of `fqdn_selector` (a selector identity) if any.
    pub fn describe_rule_via(
        &self,
        reason: u8,
        rule_id: u32,
        fqdn_selector: Option<u32>,
    ) -> Option<String> {
        let peer = fqdn_selector
            .and_then(|s| self.state.fqdn_selectors.get(&s))
            .map(|pattern| format!(" to fqdn {pattern:?}"))
            .unwrap_or_default();
        let r = self.state.rule_for(reason, rule_id)?;
        let Some(cnp) = self.inputs.cluster_policies.get(&r.policy).filter(|_| {
            matches!(
                r.kind,
                PolicyKind::AdminClusterNetworkPolicy | PolicyKind::BaselineClusterNetworkPolicy
            )
        }) else {
            return Some(format!("{r}{peer}"));
        };
        let rule = cnp.rules(r.direction).get(r.index as usize)?;
        let which = match &rule.name {
            Some(name) => format!("rule {name:?}"),
            None => format!("rule {}", r.index),
        };
        Some(format!(
            "{} ClusterNetworkPolicy {} (priority {}) {} {which}{peer}: {}",
            cnp.tier.name(),
            cnp.name,
            cnp.priority,
            r.direction.name(),
            rule.action.name()
        ))
    }

    /// Identity hash collisions currently resolved by salting (for logs and metrics).
    pub fn collisions(&self) -> &[Collision<SecurityLabels>] {
        self.alloc.identities.collisions()
    }

    pub fn set_host_ips(&mut self, ips: BTreeSet<IpAddr>) -> Result<Delta, Error> {
        let old = std::mem::replace(&mut self.inputs.host_ips, ips);
        let change = Change {
            ips: old.union(&self.inputs.host_ips).copied().collect(),
            ..Change::default()
        };
        self.apply(change, |inputs| inputs.host_ips = old)
    }

    pub fn upsert_namespace(&mut self, name: &str, labels: LabelSet) -> Result<Delta, Error> {
        let old = self.inputs.namespaces.insert(name.to_string(), labels);
        if old.as_ref() == self.inputs.namespaces.get(name) {
            return Ok(Delta::default());
        }
        let change = self.namespace_change(name);
        let name = name.to_string();
        self.apply(change, move |inputs| {
            restore(&mut inputs.namespaces, name, old)
        })
    }

    pub fn delete_namespace(&mut self, name: &str) -> Result<Delta, Error> {
        let Some(old) = self.inputs.namespaces.remove(name) else {
            return Ok(Delta::default());
        };
        let change = self.namespace_change(name);
        let name = name.to_string();
        self.apply(change, move |inputs| {
            restore(&mut inputs.namespaces, name, Some(old))
        })
    }

    fn namespace_change(&self, name: &str) -> Change {
        Change {
            pods: self.inputs.pods_in(name).cloned().collect(),
            ..Change::default()
        }
    }

    pub fn upsert_policy(&mut self, policy: &NetworkPolicy) -> Result<Delta, Error> {
        let normalized = policy.normalize()?;
        let key = (normalized.namespace.clone(), normalized.name.clone());
        let old = self.inputs.policies.insert(key.clone(), normalized);
        if old.as_ref() == self.inputs.policies.get(&key) {
            return Ok(Delta::default());
        }
        let change = Change {
            policies: vec![(
                PolicyKind::NetworkPolicy,
                key.0.clone(),
                key.1.clone(),
                old.clone(),
            )],
            ..Change::default()
        };
        self.apply(change, move |inputs| {
            restore(&mut inputs.policies, key, old)
        })
    }

    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<Delta, Error> {
        let key = (namespace.to_string(), name.to_string());
        let Some(old) = self.inputs.policies.remove(&key) else {
            return Ok(Delta::default());
        };
        let change = Change {
            policies: vec![(
                PolicyKind::NetworkPolicy,
                key.0.clone(),
                key.1.clone(),
                Some(old.clone()),
            )],
            ..Change::default()
        };
        self.apply(change, move |inputs| {
            restore(&mut inputs.policies, key, Some(old))
        })
    }

    pub fn upsert_moat_policy(&mut self, policy: &MoatPolicy) -> Result<Delta, Error> {
        let normalized = policy.normalize()?;
        let key = (normalized.namespace.clone(), normalized.name.clone());
        let old = self.inputs.moat_policies.insert(key.clone(), normalized);
        if old.as_ref() == self.inputs.moat_policies.get(&key) {
            return Ok(Delta::default());
        }
        let change = Change {
            policies: vec![(
                PolicyKind::MoatPolicy,
                key.0.clone(),
                key.1.clone(),
                old.as_ref().map(|m| m.policy.clone()),
            )],
            mode_namespaces: [key.0.clone()].into(),
            ..Change::default()
        };
        self.apply(change, move |inputs| {
            restore(&mut inputs.moat_policies, key, old)
        })
    }

    pub fn delete_moat_policy(&mut self, namespace: &str, name: &str) -> Result<Delta, Error> {
        let key = (namespace.to_string(), name.to_string());
        let Some(old) = self.inputs.moat_policies.remove(&key) else {
            return Ok(Delta::default());
        };
        let change = Change {
            policies: vec![(
                PolicyKind::MoatPolicy,
                key.0.clone(),
                key.1.clone(),
                Some(old.policy.clone()),
            )],
            mode_namespaces: [key.0.clone()].into(),
            ..Change::default()
        };
        self.apply(change, move |inputs| {
            restore(&mut inputs.moat_policies, key, Some(old))
        })
    }

    /// A ClusterNetworkPolicy added or changed. Cluster policies change rarely and touch
    /// every identity they select, so this compiles from scratch and diffs.
    pub fn upsert_cluster_policy(&mut self, policy: &ClusterNetworkPolicy) -> Result<Delta, Error> {
        let normalized = policy.normalize()?;
        let name = normalized.name.clone();
        let old = self
            .inputs
            .cluster_policies
            .insert(name.clone(), normalized);
        if old.as_ref() == self.inputs.cluster_policies.get(&name) {
            return Ok(Delta::default());
        }
        self.rebuild(move |inputs| restore(&mut inputs.cluster_policies, name, old))
    }

    pub fn delete_cluster_policy(&mut self, name: &str) -> Result<Delta, Error> {
        let Some(old) = self.inputs.cluster_policies.remove(name) else {
            return Ok(Delta::default());
        };
        let name = name.to_string();
        self.rebuild(move |inputs| restore(&mut inputs.cluster_policies, name, Some(old)))
    }

    /// The cluster's Nodes (for `nodes` peers). A change matters only to cluster policies.
    pub fn set_nodes(&mut self, nodes: BTreeMap<String, NodeInfo>) -> Result<Delta, Error> {
        if nodes == self.inputs.nodes {
            return Ok(Delta::default());
        }
        let old = std::mem::replace(&mut self.inputs.nodes, nodes);
        if self.inputs.cluster_policies.is_empty() {
            return Ok(Delta::default());
        }
        self.rebuild(move |inputs| inputs.nodes = old)
    }

    /// A full compile of the current inputs, applied as a diff; on error the inputs are put
    /// back with `undo` and nothing changes.
    fn rebuild(&mut self, undo: impl FnOnce(&mut ClusterInputs)) -> Result<Delta, Error> {
        let outcome = self.full_compile_delta();
        self.settle(outcome, undo)
    }

    /// A from-scratch compile of the inputs as a delta from the current state (the tables
    /// are replaced by the fresh ones).
    fn full_compile_delta(&mut self) -> Result<Delta, Error> {
        build(&self.inputs, &mut self.alloc).map(|(tables, next)| {
            let delta = Delta::between(&self.state, &next);
            self.tables = tables;
            delta
        })
    }

    /// Applies a computed delta to the state, or on error undoes the input change and
    /// rebuilds the tables and allocators (they may be half-updated).
    fn settle(
        &mut self,
        outcome: Result<Delta, Error>,
        undo: impl FnOnce(&mut ClusterInputs),
    ) -> Result<Delta, Error> {
        match outcome {
            Ok(delta) => {
                delta.apply(&mut self.state);
                Ok(delta)
            }
            Err(e) => {
                undo(&mut self.inputs);
                let (tables, state) =
                    build(&self.inputs, &mut self.alloc).expect("the previous inputs compiled");
                debug_assert!(state == self.state, "undo restores the previous state");
                self.tables = tables;
                Err(e)
            }
        }
    }

    pub fn upsert_pod(&mut self, pod: Pod) -> Result<Delta, Error> {
        let r = pod.pod_ref();
        let old = self.inputs.pods.insert(r.clone(), pod);
        if old.as_ref() == self.inputs.pods.get(&r) {
            return Ok(Delta::default());
        }
        let change = Change {
            pods: [r.clone()].into(),
            ..Change::default()
        };
        self.apply(change, move |inputs| restore(&mut inputs.pods, r, old))
    }

    pub fn delete_pod(&mut self, pod: &PodRef) -> Result<Delta, Error> {
        let Some(old) = self.inputs.pods.remove(pod) else {
            return Ok(Delta::default());
        };
        let change = Change {
            pods: [pod.clone()].into(),
            ..Change::default()
        };
        let r = pod.clone();
        self.apply(change, move |inputs| {
            restore(&mut inputs.pods, r, Some(old))
        })
    }

    /// Applies a change incrementally (or, after an id renumbering, by a full compile and
    /// diff). On error the input change is undone (via `undo`), so the engine keeps
    /// describing what is in the maps.
    fn apply(
        &mut self,
        change: Change,
        undo: impl FnOnce(&mut ClusterInputs),
    ) -> Result<Delta, Error> {
        let outcome = step(
            &self.inputs,
            &mut self.alloc,
            &mut self.tables,
            &self.state,
            &change,
        );
        let outcome = match outcome {
            Ok(Some(delta)) => Ok(delta),
            Ok(None) => self.full_compile_delta(),
            Err(e) => Err(e),
        };
        self.settle(outcome, undo)
    }
}

fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, old: Option<V>) {
    match old {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// Copies every policy, port-range and CIDR entry of one policy id.
fn copy_policy_id(from: &DatapathState, pid: u32, to: &mut DatapathState) {
    let lo = PolicyKey {
        policy_id: pid,
        ..PolicyKey::default()
    };
    let hi = PolicyKey {
        policy_id: pid,
        remote_identity: u32::MAX,
        dport: u16::MAX,
        proto: u8::MAX,
        direction: u8::MAX,
    };
    to.policy
        .extend(from.policy.range(lo..=hi).map(|(k, v)| (*k, *v)));
    let lo = PortRangeKey {
        policy_id: pid,
        ..PortRangeKey::default()
    };
    let hi = PortRangeKey {
        policy_id: pid,
        remote_identity: u32::MAX,
        proto: u8::MAX,
        direction: u8::MAX,
        _pad: [u8::MAX; 2],
    };
    to.port_ranges
        .extend(from.port_ranges.range(lo..=hi).map(|(k, v)| (*k, *v)));
    let v4 = |a: u32, p: u8| Ipv4Network::new(a.into(), p).expect("valid");
    to.cidr_v4.extend(
        from.cidr_v4
            .range((pid, 0, v4(0, 0))..=(pid, u8::MAX, v4(u32::MAX, 32)))
            .map(|(k, v)| (*k, *v)),
    );
    let v6 = |a: u128, p: u8| Ipv6Network::new(a.into(), p).expect("valid");
    to.cidr_v6.extend(
        from.cidr_v6
            .range((pid, 0, v6(0, 0))..=(pid, u8::MAX, v6(u128::MAX, 128)))
            .map(|(k, v)| (*k, *v)),
    );
}

/// Copies the policy and port-range entries of one policy id for one remote identity.
fn copy_remote_entries(from: &DatapathState, pid: u32, remote: u32, to: &mut DatapathState) {
    let lo = PolicyKey {
        policy_id: pid,
        remote_identity: remote,
        ..PolicyKey::default()
    };
    let hi = PolicyKey {
        policy_id: pid,
        remote_identity: remote,
        dport: u16::MAX,
        proto: u8::MAX,
        direction: u8::MAX,
    };
    to.policy
        .extend(from.policy.range(lo..=hi).map(|(k, v)| (*k, *v)));
    let lo = PortRangeKey {
        policy_id: pid,
        remote_identity: remote,
        ..PortRangeKey::default()
    };
    let hi = PortRangeKey {
        policy_id: pid,
        remote_identity: remote,
        proto: u8::MAX,
        direction: u8::MAX,
        _pad: [u8::MAX; 2],
    };
    to.port_ranges
        .extend(from.port_ranges.range(lo..=hi).map(|(k, v)| (*k, *v)));
}

/// Copies the DNS-name pattern entries of one identity.
fn copy_fqdn_patterns(from: &DatapathState, id: Identity, to: &mut DatapathState) {
    let lo = FqdnPatternKey {
        identity: id.0,
        ..FqdnPatternKey::default()
    };
    let hi = FqdnPatternKey {
        identity: id.0,
        kind: u8::MAX,
        _pad: [u8::MAX; 3],
        name_hash: u64::MAX,
    };
    to.fqdn_patterns
        .extend(from.fqdn_patterns.range(lo..=hi).map(|(k, v)| (*k, *v)));
}

fn pids(groups: &[Group]) -> impl Iterator<Item = u32> + '_ {
    groups.iter().map(|g| g.policy_id)
}

/// One incremental step: updates the tables and allocators for `ch` and returns the delta
/// from `state`, or None when an id was renumbered and a full compile is needed.
fn step(
    inputs: &ClusterInputs,
    alloc: &mut Allocators,
    t: &mut Tables,
    state: &DatapathState,
    ch: &Change,
) -> Result<Option<Delta>, Error> {
    // 1. Pods and identities. `touched`: identities that lose or gain a pod, with their
    // labels (before and after), for the rules that look at remote pods.
    let mut ip_keys: BTreeSet<IpAddr> = ch.ips.clone();
    let mut pod_ips: BTreeSet<IpAddr> = BTreeSet::new();
    let mut touched: BTreeMap<Identity, Vec<SecurityLabels>> = BTreeMap::new();
    let mut emptied: BTreeMap<SecurityLabels, Identity> = BTreeMap::new();
    for r in &ch.pods {
        let ips = state
            .endpoints
            .get(r)
            .map(|e| e.ips.clone())
            .unwrap_or_default();
        pod_ips.extend(&ips);
        if let Some((id, last)) = t.remove_pod(r, &ips) {
            let labels = t.labels[&id].clone();
            if last {
                emptied.insert(labels.clone(), id);
            }
            touched.entry(id).or_default().push(labels);
        }
    }
    let mut added = BTreeSet::new();
    let mut arriving = Vec::new();
    for r in &ch.pods {
        let Some(pod) = inputs.pods.get(r) else {
            continue;
        };
        let s = inputs.security_labels(pod);
        if emptied.remove(&s).is_none() && alloc.identities.lookup(&s).is_none() {
            added.insert(s.clone());
        }
        pod_ips.extend(&pod.ips);
        arriving.push((r, pod, s));
    }
    ip_keys.extend(&pod_ips);
    let removed: BTreeSet<SecurityLabels> = emptied.keys().cloned().collect();
    if !alloc.identities.update(&added, &removed)? {
        return Ok(None);
    }
    let removed_ids: Vec<Identity> = emptied.values().copied().collect();
    // Cluster policies select across namespaces and are not indexed for incremental steps:
    // an identity that comes or goes, or pods that named ports of theirs may resolve on,
    // take the full compile.
    if !inputs.cluster_policies.is_empty()
        && (!added.is_empty()
            || !removed_ids.is_empty()
            || (!ch.pods.is_empty() && cluster_named_ports(inputs)))
    {
        return Ok(None);
    }
    // Groups before this step, of every identity whose groups change.
    let mut old_groups: BTreeMap<Identity, Vec<Group>> = BTreeMap::new();
    for id in &removed_ids {
        old_groups.insert(*id, t.remove_identity(*id).unwrap_or_default());
    }
    let mut added_ids = BTreeSet::new();
    for (r, pod, s) in arriving {
        let id = alloc.identities.lookup(&s).expect("updated");
        if added.contains(&s) {
            added_ids.insert(id);
        }
        t.add_pod(r, id, &s, &pod.ips);
        touched.entry(id).or_default().push(s);
    }

    // 2. Changed policies: rule ids, remote sets; old and new selections are dirty.
    let mut rules_old = BTreeMap::new();
    let mut rules_new = BTreeMap::new();
    let mut dirty_selectors: Vec<(&str, LabelSelector)> = Vec::new();
    for (kind, ns, name, old) in &ch.policies {
        let new = inputs.policy(*kind, ns, name);
        let refs = |p: Option<&NormalizedPolicy>| -> BTreeSet<RuleRef> {
            p.into_iter()
                .flat_map(|p| rule_refs(*kind, p).map(|(r, _)| r))
                .collect()
        };
        let (old_refs, new_refs) = (refs(old.as_ref()), refs(new));
        let gone: BTreeSet<RuleRef> = old_refs.difference(&new_refs).cloned().collect();
        let fresh: BTreeSet<RuleRef> = new_refs.difference(&old_refs).cloned().collect();
        for r in &gone {
            rules_old.insert(alloc.rules.get(r).expect("live rule"), r.clone());
        }
        if !alloc.rules.update(&fresh, &gone)? {
            return Ok(None);
        }
        for r in &fresh {
            rules_new.insert(alloc.rules.get(r).expect("updated"), r.clone());
        }
        if let Some(o) = old {
            t.remove_policy_rules(*kind, o);
            dirty_selectors.push((ns, o.pod_selector.clone()));
        }
        if let Some(n) = new {
            t.add_policy_rules(*kind, n);
            dirty_selectors.push((ns, n.pod_selector.clone()));
        }
    }

    // 2b. DNS-name patterns the changed policies named or name: selector ids for new
    // patterns, none for patterns no policy names any more (another may still name one).
    let mut selectors_old = BTreeMap::new();
    let mut selectors_new = BTreeMap::new();
    let names_fqdn = |p: Option<&NormalizedPolicy>| {
        p.and_then(|p| p.egress.as_ref())
            .into_iter()
            .flatten()
            .any(|r| fqdn_peers(r).next().is_some())
    };
    if ch.policies.iter().any(|(kind, ns, name, old)| {
        names_fqdn(old.as_ref()) || names_fqdn(inputs.policy(*kind, ns, name))
    }) {
        let live = live_fqdn_patterns(inputs);
        let known: BTreeSet<FqdnPattern> = alloc.fqdn.iter().map(|(p, _)| p.clone()).collect();
        let fresh: BTreeSet<FqdnPattern> = live.difference(&known).cloned().collect();
        let gone: BTreeSet<FqdnPattern> = known.difference(&live).cloned().collect();
        for p in &gone {
            selectors_old.insert(alloc.fqdn.get(p).expect("live pattern"), p.to_string());
        }
        if !alloc.fqdn.update(&fresh, &gone)? {
            return Ok(None);
        }
        for p in &fresh {
            selectors_new.insert(alloc.fqdn.get(p).expect("updated"), p.to_string());
        }
    }

    // 3. Identities that came or went change the remote sets of the rules that match them;
    // the policy ids those rules apply to need their entries for these remotes only.
    let mut dirty_policies: BTreeSet<(PolicyKind, &str, &str)> = BTreeSet::new();
    let mut remote_changes: BTreeMap<(PolicyKind, &str, &str), BTreeSet<u32>> = BTreeMap::new();
    if !added_ids.is_empty() || !removed_ids.is_empty() {
        let Tables {
            remotes, labels, ..
        } = &mut *t;
        for (rref, rem) in remotes.iter_mut() {
            let mut changed = Vec::new();
            for id in &removed_ids {
                if rem.ids.remove(id) {
                    changed.push(id.0);
                }
            }
            for id in &added_ids {
                if rem.matches(&labels[id]) && rem.ids.insert(*id) {
                    changed.push(id.0);
                }
            }
            if !changed.is_empty() {
                let p = inputs
                    .policy(rref.kind, &rref.namespace, &rref.policy)
                    .expect("indexed rule of a live policy");
                remote_changes
                    .entry((rref.kind, &p.namespace, &p.name))
                    .or_default()
                    .extend(changed);
            }
        }
    }

    // 4. Egress rules with named ports look at the pods they reach.
    if !touched.is_empty() {
        for rref in &t.named_egress {
            let p = inputs
                .policy(rref.kind, &rref.namespace, &rref.policy)
                .expect("indexed rule of a live policy");
            let rule = &p.rules(Direction::Egress).expect("egress rule")[rref.index as usize];
            let hit = match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|peer| match peer {
                    Peer::Selector { pods, namespaces } => touched
                        .values()
                        .flatten()
                        .any(|l| peer_matches(&p.namespace, pods, namespaces, l)),
                    Peer::IpBlock { cidr, .. } => pod_ips.iter().any(|ip| cidr.contains(*ip)),
                    // Learned addresses are not pods: no named port resolves on them.
                    Peer::Fqdn(_) => false,
                }),
            };
            if hit {
                dirty_policies.insert((rref.kind, &p.namespace, &p.name));
            }
        }
    }

    // 5. Named-port groups of the identities whose pods or selecting policies changed.
    let mut regroup: BTreeSet<Identity> = touched
        .keys()
        .copied()
        .filter(|id| t.labels.contains_key(id))
        .collect();
    let mut dirty_ids: BTreeSet<Identity> = added_ids.clone();
    for (ns, sel) in &dirty_selectors {
        let selected = t.selected_by(ns, sel);
        regroup.extend(selected.iter().copied());
        dirty_ids.extend(selected);
    }
    let mut raw = Vec::new();
    let mut vadd = BTreeSet::new();
    let mut vremove = BTreeSet::new();
    for id in &removed_ids {
        vremove.extend(
            old_groups[id]
                .iter()
                .skip(1)
                .map(|g| crate::compile::VariantKey {
                    identity: id.0,
                    resolution: g.resolution.clone(),
                }),
        );
    }
    for id in &regroup {
        let g = grouping(inputs, t, *id);
        let new_keys: BTreeSet<_> = variant_keys(*id, &g).collect();
        for old in t.groups.get(id).into_iter().flatten().skip(1) {
            let k = crate::compile::VariantKey {
                identity: id.0,
                resolution: old.resolution.clone(),
            };
            if !new_keys.contains(&k) {
                vremove.insert(k);
            }
        }
        vadd.extend(new_keys);
        raw.push((*id, g));
    }
    let both: Vec<_> = vadd.intersection(&vremove).cloned().collect();
    for k in both {
        vadd.remove(&k);
        vremove.remove(&k);
    }
    vadd.retain(|k| alloc.variants.get(k).is_none());
    if !alloc.variants.update(&vadd, &vremove)? {
        return Ok(None);
    }
    let mut ep_pods: BTreeSet<PodRef> = ch.pods.clone();
    for (id, g) in raw {
        let groups = assign_groups(&alloc.variants, id, g);
        ep_pods.extend(t.pods.get(&id).into_iter().flatten().cloned());
        let old = t.groups.insert(id, groups);
        let new = &t.groups[&id];
        let same = old.as_ref().is_some_and(|o| {
            o.len() == new.len()
                && o.iter()
                    .zip(new)
                    .all(|(a, b)| a.policy_id == b.policy_id && a.resolution == b.resolution)
        });
        if !same {
            dirty_ids.insert(id);
            old_groups
                .entry(id)
                .or_insert_with(|| old.unwrap_or_default());
        }
    }

    // 6. Recompile the dirty identities in full, and the remote-keyed entries of the
    // identities that only saw remotes come or go.
    for (kind, ns, name) in &dirty_policies {
        if let Some(p) = inputs.policy(*kind, ns, name) {
            dirty_ids.extend(t.selected_by(ns, &p.pod_selector));
        }
    }
    dirty_ids.retain(|id| t.labels.contains_key(id));
    let mut partial: BTreeMap<Identity, BTreeSet<u32>> = BTreeMap::new();
    for ((kind, ns, name), remotes) in &remote_changes {
        if dirty_policies.contains(&(*kind, ns, name)) {
            continue;
        }
        let p = inputs.policy(*kind, ns, name).expect("live policy");
        for id in t.selected_by(ns, &p.pod_selector) {
            if !dirty_ids.contains(&id) {
                partial.entry(id).or_default().extend(remotes);
            }
        }
    }
    let mut policy_ids: BTreeSet<u32> = BTreeSet::new();
    for groups in old_groups.values() {
        policy_ids.extend(pids(groups));
    }
    for id in &dirty_ids {
        policy_ids.extend(pids(&t.groups[id]));
    }
    let mut old_sub = DatapathState::default();
    for pid in &policy_ids {
        copy_policy_id(state, *pid, &mut old_sub);
    }
    // Pattern entries are per identity: those of every identity recompiled in full or gone.
    for id in dirty_ids.iter().chain(old_groups.keys()) {
        copy_fqdn_patterns(state, *id, &mut old_sub);
    }
    let mut new_sub = DatapathState::default();
    let ctx = Ctx {
        inputs,
        tables: t,
        rule_ids: &alloc.rules,
        fqdn_ids: &alloc.fqdn,
        only_remotes: None,
    };
    for id in &dirty_ids {
        ctx.compile_identity(&mut new_sub, *id)?;
    }
    for (id, remotes) in &partial {
        for pid in pids(&t.groups[id]) {
            for remote in remotes {
                copy_remote_entries(state, pid, *remote, &mut old_sub);
            }
        }
        let ctx = Ctx {
            only_remotes: Some(remotes),
            ..ctx
        };
        ctx.compile_identity(&mut new_sub, *id)?;
    }

    // 7. Endpoints, ipcache, identities, modes of what changed.
    for r in &ep_pods {
        if let Some(e) = state.endpoints.get(r) {
            old_sub.endpoints.insert(r.clone(), e.clone());
        }
        if let Some(e) = t.endpoint(inputs, r) {
            new_sub.endpoints.insert(r.clone(), e);
        }
    }
    for ip in &ip_keys {
        let net = IpNetwork::from(*ip);
        if let Some(id) = state.ipcache.get(&net) {
            old_sub.ipcache.insert(net, *id);
        }
        if let Some(id) = t.ipcache_entry(inputs, ip) {
            new_sub.ipcache.insert(net, id);
        }
    }
    for id in removed_ids.iter().chain(&added_ids) {
        if let Some(l) = state.identities.get(id) {
            old_sub.identities.insert(*id, l.clone());
        }
        if let Some(l) = t.labels.get(id) {
            new_sub.identities.insert(*id, l.to_label_set());
        }
    }
    // The world entries, on the first event of an empty engine.
    for (net, id) in crate::compile::world_entries() {
        if state.ipcache.get(&net) != Some(&id) {
            new_sub.ipcache.insert(net, id);
        }
    }
    let mut mode_pods: BTreeSet<&PodRef> = ch.pods.iter().collect();
    for ns in &ch.mode_namespaces {
        mode_pods.extend(inputs.pods_in(ns));
    }
    for r in mode_pods {
        if let Some(m) = state.modes.get(r) {
            old_sub.modes.insert(r.clone(), *m);
        }
        if let Some(m) = inputs.mode_of(r) {
            new_sub.modes.insert(r.clone(), m);
        }
    }
    let mut delta = Delta::between(&old_sub, &new_sub);
    delta.rules = MapDelta::between(&rules_old, &rules_new);
    delta.fqdn_selectors = MapDelta::between(&selectors_old, &selectors_new);
    Ok(Some(delta))
}

/// Whether any cluster policy names a port (its resolution depends on pods).
fn cluster_named_ports(inputs: &ClusterInputs) -> bool {
    inputs.cluster_policies.values().any(|p| {
        p.ingress
            .iter()
            .chain(&p.egress)
            .flat_map(|r| &r.ports)
            .any(|port| matches!(port.port, crate::netpol::PortSpec::Named(_)))
    })
}
