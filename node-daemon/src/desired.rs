//! What the kernel maps should hold, and how to get them there by writing only the difference.
//!
//! The desired content is a pure function of the policy engine's state, the registered local
//! endpoints and the node's configuration. moatd keeps the content it last applied; each change
//! writes the diff. At start the "applied" side is read back from the pinned maps themselves,
//! so whatever a crash left behind (entries of a pod deleted while moatd was down, half a
//! change) is corrected by the first reconcile, without flushing what is still right.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    ops::Bound,
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use moat_common::*;
use moat_datapath::{FqdnMaps, Maps};
use moat_policy::{DatapathState, Delta, MapDelta};

use crate::store::EndpointRecord;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredMaps {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<IpNetwork, IpcacheValue>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    pub port_ranges: BTreeMap<PortRangeKey, PortRuleSet>,
    pub cidr_v4: BTreeMap<(u32, u8, Ipv4Network), PortRuleSet>,
    pub cidr_v6: BTreeMap<(u32, u8, Ipv6Network), PortRuleSet>,
    /// MOAT_FQDNPAT: (identity, kind, name hash) -> selector identity.
    pub fqdn_patterns: BTreeMap<FqdnPatternKey, u32>,
}

/// Node facts that shape the maps beyond policy.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    /// Service (ClusterIP) ranges: egress towards them is judged after DNAT.
    pub service_cidrs: Vec<IpNetwork>,
}

/// The local endpoints' part of the maps: their endpoint entries, and the addresses that
/// make ipcache entries carry their veth.
struct LocalPart {
    endpoints: BTreeMap<u32, EndpointInfo>,
    /// address -> (host ifindex, identity)
    addresses: BTreeMap<IpNetwork, (u32, u32)>,
}

fn local_part(
    state: &DatapathState,
    endpoints: &BTreeMap<String, EndpointRecord>,
    hint: impl Fn(u32) -> u8,
) -> LocalPart {
    let mut part = LocalPart {
        endpoints: BTreeMap::new(),
        addresses: BTreeMap::new(),
    };
    for record in endpoints.values() {
        let Some(compiled) = state.endpoints.get(&record.pod_ref()) else {
            // Registered but not (yet) known to the engine: no entry, so the datapath fails
            // closed with "unknown endpoint" rather than guessing an identity.
            continue;
        };
        let flags = record.flags & !ENDPOINT_HINT_FLAGS | hint(compiled.policy_id);
        let info = compiled.to_endpoint_info(record.mode.code(), flags);
        part.endpoints.insert(record.spec.host_ifindex, info);
        for ip in &record.spec.ips {
            part.addresses.insert(
                IpNetwork::from(*ip),
                (record.spec.host_ifindex, compiled.identity.0),
            );
        }
    }
    part
}

/// The ipcache entry for `net`: the engine's identity (else a Service range's marker), and
/// for a local endpoint's address its veth, so that a receiver can judge the sender's egress
/// policy (needed for traffic through Services).
fn ipcache_value(
    state: &DatapathState,
    node: &NodeConfig,
    local: &LocalPart,
    net: &IpNetwork,
) -> Option<IpcacheValue> {
    let base = match state.ipcache.get(net) {
        Some(identity) => Some(IpcacheValue {
            identity: identity.0,
            ..Default::default()
        }),
        None if node.service_cidrs.contains(net) => Some(IpcacheValue {
            identity: IDENTITY_WORLD,
            ifindex: 0,
            flags: IPCACHE_FLAG_SERVICE,
            tunnel_endpoint: 0,
        }),
        None => None,
    };
    match local.addresses.get(net) {
        Some(&(ifindex, identity)) => {
            let mut value = base.unwrap_or(IpcacheValue {
                identity,
                ..Default::default()
            });
            value.ifindex = ifindex;
            Some(value)
        }
        None => base,
    }
}

/// The whole desired content, from scratch (start-up, resync, and the reference the
/// incremental path is tested against).
pub fn build(
    state: &DatapathState,
    endpoints: &BTreeMap<String, EndpointRecord>,
    node: &NodeConfig,
) -> DesiredMaps {
    let hints = lookup_hints(state);
    let local = local_part(state, endpoints, |id| {
        hints.get(&id).copied().unwrap_or(ENDPOINT_HINT_FLAGS)
    });
    let keys: BTreeSet<IpNetwork> = node
        .service_cidrs
        .iter()
        .chain(state.ipcache.keys())
        .chain(local.addresses.keys())
        .copied()
        .collect();
    let ids = LocalIds::of(&local.endpoints);
    DesiredMaps {
        ipcache: keys
            .iter()
            .filter_map(|net| Some((*net, ipcache_value(state, node, &local, net)?)))
            .collect(),
        policy: entries_of(&state.policy, &ids.policy),
        port_ranges: entries_of(&state.port_ranges, &ids.policy),
        cidr_v4: entries_of(&state.cidr_v4, &ids.policy),
        cidr_v6: entries_of(&state.cidr_v6, &ids.policy),
        fqdn_patterns: entries_of(&state.fqdn_patterns, &ids.identities),
        endpoints: local.endpoints,
    }
}

/// The policy ids and identities of this node's endpoints. Only their entries go into the
/// kernel maps: the programs look up nothing else (a pod's own hook, a local sender's egress
/// judged at a local receiver, `moat_after_dnat` for a local sender; FQDN patterns of the
/// pod that asks). A remote pod's perimeter is its own node's to enforce, and holding every
/// identity's entries on every node is what would overflow the policy map from a few hundred
/// nodes on (docs/scale.md).
#[derive(Default)]
struct LocalIds {
    policy: BTreeSet<u32>,
    identities: BTreeSet<u32>,
}

impl LocalIds {
    fn of(endpoints: &BTreeMap<u32, EndpointInfo>) -> Self {
        Self {
            policy: endpoints.values().map(|e| e.policy_id).collect(),
            identities: endpoints.values().map(|e| e.identity).collect(),
        }
    }
}

/// A map key that sorts by one owner id first (a policy id, or for FQDN patterns an
/// identity), so that one owner's entries are one range.
trait OwnedKey: Ord + Clone {
    /// The smallest key of `owner`.
    fn first(owner: u32) -> Self;
    fn owner(&self) -> u32;

    /// The bounds of `owner`'s keys, for `BTreeMap::range`: from its first key to the next
    /// owner's.
    fn owned_range(owner: u32) -> (Bound<Self>, Bound<Self>) {
        let end = match owner.checked_add(1) {
            Some(next) => Bound::Excluded(Self::first(next)),
            None => Bound::Unbounded,
        };
        (Bound::Included(Self::first(owner)), end)
    }
}

impl OwnedKey for PolicyKey {
    fn first(owner: u32) -> Self {
        Self {
            policy_id: owner,
            ..Default::default()
        }
    }
    fn owner(&self) -> u32 {
        self.policy_id
    }
}

impl OwnedKey for PortRangeKey {
    fn first(owner: u32) -> Self {
        Self {
            policy_id: owner,
            ..Default::default()
        }
    }
    fn owner(&self) -> u32 {
        self.policy_id
    }
}

impl OwnedKey for (u32, u8, Ipv4Network) {
    fn first(owner: u32) -> Self {
        let any = Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid");
        (owner, 0, any)
    }
    fn owner(&self) -> u32 {
        self.0
    }
}

impl OwnedKey for (u32, u8, Ipv6Network) {
    fn first(owner: u32) -> Self {
        let any = Ipv6Network::new(std::net::Ipv6Addr::UNSPECIFIED, 0).expect("/0 is valid");
        (owner, 0, any)
    }
    fn owner(&self) -> u32 {
        self.0
    }
}

impl OwnedKey for FqdnPatternKey {
    fn first(owner: u32) -> Self {
        Self {
            identity: owner,
            ..Default::default()
        }
    }
    fn owner(&self) -> u32 {
        self.identity
    }
}

/// The entries of `map` whose owner is in `owners` (a range scan per owner).
fn entries_of<K: OwnedKey, V: Clone>(
    map: &BTreeMap<K, V>,
    owners: &BTreeSet<u32>,
) -> BTreeMap<K, V> {
    owners
        .iter()
        .flat_map(|&owner| map.range(K::owned_range(owner)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The keys an incremental reconcile recomputes in one table: those the engine touched,
/// and every key of an owner that became local or stopped being local (its entries come or
/// go as a whole), on either side.
fn keys_to_recompute<K: OwnedKey, V>(
    touched: &BTreeSet<K>,
    changed_owners: &BTreeSet<u32>,
    state: &BTreeMap<K, V>,
    applied: &BTreeMap<K, V>,
) -> BTreeSet<K> {
    let mut keys = touched.clone();
    for &owner in changed_owners {
        for map in [state, applied] {
            keys.extend(map.range(K::owned_range(owner)).map(|(k, _)| k.clone()));
        }
    }
    keys
}

/// One kind of owner (policy ids, or identities for FQDN patterns) across an incremental
/// reconcile: those local now, and those that became local or stopped being local.
struct Owners<'a> {
    local: &'a BTreeSet<u32>,
    changed: BTreeSet<u32>,
}

impl<'a> Owners<'a> {
    fn new(was: &BTreeSet<u32>, now: &'a BTreeSet<u32>) -> Self {
        Self {
            local: now,
            changed: was.symmetric_difference(now).copied().collect(),
        }
    }

    /// One table's part of a plan: the applied entries of the keys to recompute, and the
    /// engine's entries of those keys whose owner is local.
    fn recompute<K: OwnedKey, V: Clone>(
        &self,
        touched: &BTreeSet<K>,
        state: &BTreeMap<K, V>,
        applied: &BTreeMap<K, V>,
    ) -> (BTreeMap<K, V>, BTreeMap<K, V>) {
        let keys = keys_to_recompute(touched, &self.changed, state, applied);
        (
            restrict(applied, &keys),
            restrict_local(state, &keys, self.local),
        )
    }
}

/// What the kernel maps hold (`read_actual`), completed with the engine's entries of the
/// owners that are not local, which the kernel never holds: an evaluation over it checks the
/// perimeters this node enforces against the maps, and agrees with the engine on the rest.
pub fn held_with_remote_owners(state: &DatapathState, mut held: DesiredMaps) -> DesiredMaps {
    let ids = LocalIds::of(&held.endpoints);
    add_remote(&mut held.policy, &state.policy, &ids.policy);
    add_remote(&mut held.port_ranges, &state.port_ranges, &ids.policy);
    add_remote(&mut held.cidr_v4, &state.cidr_v4, &ids.policy);
    add_remote(&mut held.cidr_v6, &state.cidr_v6, &ids.policy);
    add_remote(
        &mut held.fqdn_patterns,
        &state.fqdn_patterns,
        &ids.identities,
    );
    held
}

fn add_remote<K: OwnedKey, V: Clone>(
    held: &mut BTreeMap<K, V>,
    state: &BTreeMap<K, V>,
    local: &BTreeSet<u32>,
) {
    held.extend(
        state
            .iter()
            .filter(|(k, _)| !local.contains(&k.owner()))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
}

/// `restrict` to the keys whose owner is local.
fn restrict_local<K: OwnedKey, V: Clone>(
    map: &BTreeMap<K, V>,
    keys: &BTreeSet<K>,
    owners: &BTreeSet<u32>,
) -> BTreeMap<K, V> {
    keys.iter()
        .filter(|k| owners.contains(&k.owner()))
        .filter_map(|k| Some((k.clone(), map.get(k)?.clone())))
        .collect()
}

/// ENDPOINT_FLAG_NO_* hints per policy id: which lookups can never match for it. A policy id
/// with no entries at all gets every hint (its verdict is default deny either way).
pub fn lookup_hints(state: &DatapathState) -> BTreeMap<u32, u8> {
    let mut lacks: BTreeMap<u32, u8> = BTreeMap::new();
    let mut clear = |policy_id: u32, bits: u8| {
        *lacks.entry(policy_id).or_insert(ENDPOINT_HINT_FLAGS) &= !bits;
    };
    for (k, v) in &state.policy {
        clear(k.policy_id, policy_entry_needs(v));
    }
    for (k, set) in &state.port_ranges {
        clear(k.policy_id, rule_set_needs(set, ENDPOINT_FLAG_NO_RANGES));
    }
    for ((policy_id, _, _), set) in &state.cidr_v4 {
        clear(*policy_id, rule_set_needs(set, ENDPOINT_FLAG_NO_CIDR));
    }
    for ((policy_id, _, _), set) in &state.cidr_v6 {
        clear(*policy_id, rule_set_needs(set, ENDPOINT_FLAG_NO_CIDR));
    }
    lacks
}

/// The hints of one policy id, from its entries alone (every table is ordered by policy id
/// first, so each is one range scan). None when the id has no entries.
fn hints_of(state: &DatapathState, policy_id: u32) -> Option<u8> {
    let policy = state.policy.range(PolicyKey::owned_range(policy_id));
    let ranges = state
        .port_ranges
        .range(PortRangeKey::owned_range(policy_id));
    let v4 = state
        .cidr_v4
        .range(<(u32, u8, Ipv4Network)>::owned_range(policy_id));
    let v6 = state
        .cidr_v6
        .range(<(u32, u8, Ipv6Network)>::owned_range(policy_id));
    policy
        .map(|(_, v)| policy_entry_needs(v))
        .chain(ranges.map(|(_, set)| rule_set_needs(set, ENDPOINT_FLAG_NO_RANGES)))
        .chain(v4.map(|(_, set)| rule_set_needs(set, ENDPOINT_FLAG_NO_CIDR)))
        .chain(v6.map(|(_, set)| rule_set_needs(set, ENDPOINT_FLAG_NO_CIDR)))
        .reduce(|a, b| a | b)
        .map(|needs| ENDPOINT_HINT_FLAGS & !needs)
}

/// The keys engine changes touched since the last reconcile: the incremental reconcile
/// recomputes exactly these (plus the node's own endpoints, which are few).
#[derive(Clone, Debug, Default)]
pub struct Touched {
    pub policy: BTreeSet<PolicyKey>,
    pub port_ranges: BTreeSet<PortRangeKey>,
    pub cidr_v4: BTreeSet<(u32, u8, Ipv4Network)>,
    pub cidr_v6: BTreeSet<(u32, u8, Ipv6Network)>,
    pub ipcache: BTreeSet<IpNetwork>,
    pub fqdn_patterns: BTreeSet<FqdnPatternKey>,
}

fn touched_keys<K: Ord + Clone, V>(into: &mut BTreeSet<K>, delta: &MapDelta<K, V>) {
    into.extend(delta.upserts.keys().cloned());
    into.extend(delta.deletes.iter().cloned());
}

impl Touched {
    pub fn record(&mut self, delta: &Delta) {
        touched_keys(&mut self.policy, &delta.policy);
        touched_keys(&mut self.port_ranges, &delta.port_ranges);
        touched_keys(&mut self.cidr_v4, &delta.cidr_v4);
        touched_keys(&mut self.cidr_v6, &delta.cidr_v6);
        touched_keys(&mut self.ipcache, &delta.ipcache);
        touched_keys(&mut self.fqdn_patterns, &delta.fqdn_patterns);
    }

    fn policy_ids(&self) -> BTreeSet<u32> {
        let mut ids: BTreeSet<u32> = self.policy.iter().map(|k| k.policy_id).collect();
        ids.extend(self.port_ranges.iter().map(|k| k.policy_id));
        ids.extend(self.cidr_v4.iter().map(|k| k.0));
        ids.extend(self.cidr_v6.iter().map(|k| k.0));
        ids
    }
}

/// A write to the maps: the current content of the keys it covers, and their new content.
/// `apply` writes the difference; `Applied::commit` records it.
pub struct Plan {
    pub before: DesiredMaps,
    pub after: DesiredMaps,
}

/// What the maps hold (as far as moatd knows), with what the incremental path needs to
/// recompute only what an event touched.
#[derive(Default)]
pub struct Applied {
    pub maps: DesiredMaps,
    /// Lookup hints of every policy id that has entries.
    hints: BTreeMap<u32, u8>,
    /// True until a full reconcile ran, and after a failed write: the next reconcile
    /// rebuilds from scratch against what the kernel holds.
    stale: bool,
}

fn restrict<K: Ord + Clone, V: Clone>(map: &BTreeMap<K, V>, keys: &BTreeSet<K>) -> BTreeMap<K, V> {
    keys.iter()
        .filter_map(|k| Some((k.clone(), map.get(k)?.clone())))
        .collect()
}

fn merge<K: Ord + Clone, V>(
    map: &mut BTreeMap<K, V>,
    before: BTreeMap<K, V>,
    after: BTreeMap<K, V>,
) {
    for k in before.keys() {
        map.remove(k);
    }
    map.extend(after);
}

impl Applied {
    /// What the pinned maps hold now (after a restart, a crash, or to heal drift).
    pub fn from_kernel(maps: &Maps, fqdn: &FqdnMaps) -> Self {
        Self {
            maps: read_actual(maps, fqdn),
            hints: BTreeMap::new(),
            stale: true,
        }
    }

    /// The content of an empty set of maps (tests).
    pub fn empty() -> Self {
        Self {
            stale: true,
            ..Default::default()
        }
    }

    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// The write that brings the maps to the desired state. Incremental unless stale: only
    /// the touched keys, the node's endpoints and their addresses are recomputed.
    pub fn plan(
        &mut self,
        state: &DatapathState,
        endpoints: &BTreeMap<String, EndpointRecord>,
        node: &NodeConfig,
        touched: &Touched,
    ) -> Plan {
        if self.stale {
            self.hints = lookup_hints(state);
            return Plan {
                before: std::mem::take(&mut self.maps),
                after: build(state, endpoints, node),
            };
        }
        for id in touched.policy_ids() {
            match hints_of(state, id) {
                Some(h) => self.hints.insert(id, h),
                None => self.hints.remove(&id),
            };
        }
        let hints = &self.hints;
        let local = local_part(state, endpoints, |id| {
            hints.get(&id).copied().unwrap_or(ENDPOINT_HINT_FLAGS)
        });
        // Addresses that were local (their entry carries a veth) may stop being local.
        let mut ipcache_keys = touched.ipcache.clone();
        ipcache_keys.extend(local.addresses.keys().copied());
        for info in self.maps.endpoints.values() {
            ipcache_keys.extend(endpoint_addresses(info));
        }
        // Only local owners' entries are held (see `LocalIds`): an owner that becomes local
        // brings all of its entries, one that stops being local takes them all away.
        let was = LocalIds::of(&self.maps.endpoints);
        let now = LocalIds::of(&local.endpoints);
        let policy_ids = Owners::new(&was.policy, &now.policy);
        let identities = Owners::new(&was.identities, &now.identities);
        let applied = &self.maps;
        let (policy_before, policy) =
            policy_ids.recompute(&touched.policy, &state.policy, &applied.policy);
        let (port_ranges_before, port_ranges) = policy_ids.recompute(
            &touched.port_ranges,
            &state.port_ranges,
            &applied.port_ranges,
        );
        let (cidr_v4_before, cidr_v4) =
            policy_ids.recompute(&touched.cidr_v4, &state.cidr_v4, &applied.cidr_v4);
        let (cidr_v6_before, cidr_v6) =
            policy_ids.recompute(&touched.cidr_v6, &state.cidr_v6, &applied.cidr_v6);
        let (fqdn_patterns_before, fqdn_patterns) = identities.recompute(
            &touched.fqdn_patterns,
            &state.fqdn_patterns,
            &applied.fqdn_patterns,
        );
        let before = DesiredMaps {
            endpoints: applied.endpoints.clone(),
            ipcache: restrict(&applied.ipcache, &ipcache_keys),
            policy: policy_before,
            port_ranges: port_ranges_before,
            cidr_v4: cidr_v4_before,
            cidr_v6: cidr_v6_before,
            fqdn_patterns: fqdn_patterns_before,
        };
        let after = DesiredMaps {
            ipcache: ipcache_keys
                .iter()
                .filter_map(|net| Some((*net, ipcache_value(state, node, &local, net)?)))
                .collect(),
            policy,
            port_ranges,
            cidr_v4,
            cidr_v6,
            fqdn_patterns,
            endpoints: local.endpoints,
        };
        Plan { before, after }
    }

    /// Records a plan that `apply` wrote.
    pub fn commit(&mut self, plan: Plan) {
        let Plan { before, after } = plan;
        merge(&mut self.maps.endpoints, before.endpoints, after.endpoints);
        merge(&mut self.maps.ipcache, before.ipcache, after.ipcache);
        merge(&mut self.maps.policy, before.policy, after.policy);
        merge(
            &mut self.maps.port_ranges,
            before.port_ranges,
            after.port_ranges,
        );
        merge(&mut self.maps.cidr_v4, before.cidr_v4, after.cidr_v4);
        merge(&mut self.maps.cidr_v6, before.cidr_v6, after.cidr_v6);
        merge(
            &mut self.maps.fqdn_patterns,
            before.fqdn_patterns,
            after.fqdn_patterns,
        );
        self.stale = false;
    }
}

/// The addresses an endpoint entry lists (anti-spoofing), as ipcache keys.
fn endpoint_addresses(info: &EndpointInfo) -> impl Iterator<Item = IpNetwork> + '_ {
    let v4 = info.v4[..(info.v4_count as usize).min(MAX_ENDPOINT_V4)]
        .iter()
        .map(|raw| IpNetwork::from(IpAddr::V4(v4_from_raw(*raw))));
    let v6 = info.v6[..(info.v6_count as usize).min(MAX_ENDPOINT_V6)]
        .iter()
        .map(|raw| IpNetwork::from(IpAddr::V6(v6_from_raw(*raw))));
    v4.chain(v6)
}

/// Counts of what a reconcile wrote, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteStats {
    pub upserts: usize,
    pub deletes: usize,
}

fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    applied: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    mut upsert: impl FnMut(&K, &V) -> anyhow::Result<()>,
    mut delete: impl FnMut(&K) -> anyhow::Result<()>,
    stats: &mut WriteStats,
) -> anyhow::Result<()> {
    for (k, v) in desired {
        if applied.get(k) != Some(v) {
            upsert(k, v)?;
            stats.upserts += 1;
        }
    }
    for k in applied.keys() {
        if !desired.contains_key(k) {
            delete(k)?;
            stats.deletes += 1;
        }
    }
    Ok(())
}

/// Writes `desired` over `applied`. Order matters for first-packet correctness: policy,
/// FQDN pattern and ipcache entries go in before the endpoint entry that makes them
/// reachable (its ENDPOINT_FLAG_FQDN included), and endpoints leave before the entries they
/// used.
pub fn apply(
    maps: &mut Maps,
    fqdn: &mut FqdnMaps,
    applied: &DesiredMaps,
    desired: &DesiredMaps,
) -> anyhow::Result<WriteStats> {
    let mut stats = WriteStats::default();
    // Hints first where they shrink: an endpoint about to gain CIDR, range or deny entries
    // must look them up from the moment they exist.
    for (ifindex, old) in &applied.endpoints {
        if let Some(new) = desired.endpoints.get(ifindex) {
            let widened = old.flags & new.flags;
            if widened != old.flags {
                let mut interim = *old;
                interim.flags = widened;
                maps.upsert_endpoint(*ifindex, &interim)?;
            }
        }
    }
    let m = std::cell::RefCell::new(maps);
    // These passes only write: the deletes `diff` counts in them happen (and are counted)
    // in the last passes, so only their upserts are kept.
    let mut writes = WriteStats::default();
    diff(
        &applied.policy,
        &desired.policy,
        |k, v| Ok(m.borrow_mut().upsert_policy(k, v)?),
        |_| Ok(()),
        &mut writes,
    )?;
    diff(
        &applied.port_ranges,
        &desired.port_ranges,
        |k, v| Ok(m.borrow_mut().upsert_port_ranges(k, v)?),
        |_| Ok(()),
        &mut writes,
    )?;
    diff(
        &applied.cidr_v4,
        &desired.cidr_v4,
        |(p, d, n), v| Ok(m.borrow_mut().upsert_cidr(*p, *d, IpNetwork::V4(*n), v)?),
        |_| Ok(()),
        &mut writes,
    )?;
    diff(
        &applied.cidr_v6,
        &desired.cidr_v6,
        |(p, d, n), v| Ok(m.borrow_mut().upsert_cidr(*p, *d, IpNetwork::V6(*n), v)?),
        |_| Ok(()),
        &mut writes,
    )?;
    diff(
        &applied.fqdn_patterns,
        &desired.fqdn_patterns,
        |k, v| Ok(fqdn.upsert_pattern(k, *v)?),
        |_| Ok(()),
        &mut writes,
    )?;
    diff(
        &applied.ipcache,
        &desired.ipcache,
        |k, v| Ok(m.borrow_mut().upsert_ipcache(*k, v)?),
        |_| Ok(()),
        &mut writes,
    )?;
    stats.upserts += writes.upserts;
    // Endpoints: additions and removals.
    let mut removed_endpoints = Vec::new();
    diff(
        &applied.endpoints,
        &desired.endpoints,
        |k, v| Ok(m.borrow_mut().upsert_endpoint(*k, v)?),
        |k| {
            m.borrow_mut().remove_endpoint(*k)?;
            removed_endpoints.push(*k);
            Ok(())
        },
        &mut stats,
    )?;
    for ifindex in removed_endpoints {
        m.borrow_mut().flush_conntrack(ifindex)?;
    }
    // Now the deletions of entries nothing references any more.
    let mut none = WriteStats::default();
    diff(
        &applied.ipcache,
        &desired.ipcache,
        |_, _| Ok(()),
        |k| Ok(m.borrow_mut().remove_ipcache(*k)?),
        &mut none,
    )?;
    diff(
        &applied.cidr_v6,
        &desired.cidr_v6,
        |_, _| Ok(()),
        |(p, d, n)| Ok(m.borrow_mut().remove_cidr(*p, *d, IpNetwork::V6(*n))?),
        &mut none,
    )?;
    diff(
        &applied.cidr_v4,
        &desired.cidr_v4,
        |_, _| Ok(()),
        |(p, d, n)| Ok(m.borrow_mut().remove_cidr(*p, *d, IpNetwork::V4(*n))?),
        &mut none,
    )?;
    diff(
        &applied.port_ranges,
        &desired.port_ranges,
        |_, _| Ok(()),
        |k| Ok(m.borrow_mut().remove_port_ranges(k)?),
        &mut none,
    )?;
    diff(
        &applied.fqdn_patterns,
        &desired.fqdn_patterns,
        |_, _| Ok(()),
        |k| Ok(fqdn.remove_pattern(k)?),
        &mut none,
    )?;
    diff(
        &applied.policy,
        &desired.policy,
        |_, _| Ok(()),
        |k| Ok(m.borrow_mut().remove_policy(k)?),
        &mut none,
    )?;
    stats.deletes += none.deletes;
    Ok(stats)
}

/// Reads back what the pinned maps hold now (after a restart or crash).
pub fn read_actual(maps: &Maps, fqdn: &FqdnMaps) -> DesiredMaps {
    let mut d = DesiredMaps::default();
    d.fqdn_patterns.extend(fqdn.pattern_entries());
    for (k, v) in maps.endpoints.iter().filter_map(Result::ok) {
        d.endpoints.insert(k, v);
    }
    for (k, v) in maps.ipcache_v4.iter().filter_map(Result::ok) {
        if let Ok(net) = Ipv4Network::new(k.data().addr.into(), k.prefix_len() as u8) {
            d.ipcache.insert(IpNetwork::V4(net), v);
        }
    }
    for (k, v) in maps.ipcache_v6.iter().filter_map(Result::ok) {
        if let Ok(net) = Ipv6Network::new(k.data().addr.into(), k.prefix_len() as u8) {
            d.ipcache.insert(IpNetwork::V6(net), v);
        }
    }
    for (k, v) in maps.policy.iter().filter_map(Result::ok) {
        d.policy.insert(k, v);
    }
    for (k, v) in maps.port_ranges.iter().filter_map(Result::ok) {
        d.port_ranges.insert(k, v);
    }
    for (k, v) in maps.cidr_v4.iter().filter_map(Result::ok) {
        let data = k.data();
        let prefix = k.prefix_len().saturating_sub(CIDR_KEY_FIXED_BITS) as u8;
        if let Ok(net) = Ipv4Network::new(data.addr.into(), prefix) {
            d.cidr_v4
                .insert((u32::from_be_bytes(data.policy_id), data.direction, net), v);
        }
    }
    for (k, v) in maps.cidr_v6.iter().filter_map(Result::ok) {
        let data = k.data();
        let prefix = k.prefix_len().saturating_sub(CIDR_KEY_FIXED_BITS) as u8;
        if let Ok(net) = Ipv6Network::new(data.addr.into(), prefix) {
            d.cidr_v6
                .insert((u32::from_be_bytes(data.policy_id), data.direction, net), v);
        }
    }
    d
}

/// What the exact-match host mirrors (MOAT_HOSTS4, MOAT_HOSTS6) hold, as /32 and /128 ipcache
/// keys: they must equal the ipcache's host entries.
pub fn read_hosts(maps: &Maps) -> BTreeMap<IpNetwork, IpcacheValue> {
    let mut hosts = BTreeMap::new();
    for (k, v) in maps.hosts_v4.iter().filter_map(Result::ok) {
        hosts.insert(IpNetwork::from(IpAddr::from(k.addr)), v);
    }
    for (k, v) in maps.hosts_v6.iter().filter_map(Result::ok) {
        hosts.insert(IpNetwork::from(IpAddr::from(k.addr)), v);
    }
    hosts
}

/// Compares what the maps hold (`actual`, from [`read_actual`], and the host mirrors from
/// [`read_hosts`]) with `desired` (from [`build`]) entry by entry, with the same [`diff`]
/// that writes them: an entry `apply` would upsert is missing or different, one it would
/// delete is extra. One row per map moatd owns, named as `moat_map_entries` names them, with
/// at most `samples` entries listed each.
pub fn drift(
    desired: &DesiredMaps,
    actual: &DesiredMaps,
    hosts: &BTreeMap<IpNetwork, IpcacheValue>,
    samples: usize,
) -> crate::api::VerifyReport {
    use render::*;
    let family = |map: &BTreeMap<IpNetwork, IpcacheValue>, v4: bool, hosts_only: bool| {
        map.iter()
            .filter(|(net, _)| net.is_ipv4() == v4)
            .filter(|(net, _)| !hosts_only || net.prefix() == if v4 { 32 } else { 128 })
            .map(|(k, v)| (*k, *v))
            .collect::<BTreeMap<_, _>>()
    };
    let fqdn_value = |v: &u32| format!("selector {v}");
    let maps = vec![
        compare(
            "endpoints",
            &actual.endpoints,
            &desired.endpoints,
            |k| format!("ifindex {k}"),
            endpoint,
            samples,
        ),
        compare(
            "ipcache_v4",
            &family(&actual.ipcache, true, false),
            &family(&desired.ipcache, true, false),
            |k| k.to_string(),
            ipcache,
            samples,
        ),
        compare(
            "ipcache_v6",
            &family(&actual.ipcache, false, false),
            &family(&desired.ipcache, false, false),
            |k| k.to_string(),
            ipcache,
            samples,
        ),
        compare(
            "hosts_v4",
            &family(hosts, true, true),
            &family(&desired.ipcache, true, true),
            |k| k.ip().to_string(),
            ipcache,
            samples,
        ),
        compare(
            "hosts_v6",
            &family(hosts, false, true),
            &family(&desired.ipcache, false, true),
            |k| k.ip().to_string(),
            ipcache,
            samples,
        ),
        compare(
            "policy",
            &actual.policy,
            &desired.policy,
            policy_key,
            policy_value,
            samples,
        ),
        compare(
            "port_ranges",
            &actual.port_ranges,
            &desired.port_ranges,
            port_range_key,
            rule_set,
            samples,
        ),
        compare(
            "cidr_v4",
            &actual.cidr_v4,
            &desired.cidr_v4,
            |(p, d, n)| cidr_key(*p, *d, n),
            rule_set,
            samples,
        ),
        compare(
            "cidr_v6",
            &actual.cidr_v6,
            &desired.cidr_v6,
            |(p, d, n)| cidr_key(*p, *d, n),
            rule_set,
            samples,
        ),
        compare(
            "fqdn_patterns",
            &actual.fqdn_patterns,
            &desired.fqdn_patterns,
            fqdn_pattern_key,
            fqdn_value,
            samples,
        ),
    ];
    crate::api::VerifyReport { maps }
}

fn compare<K: Ord + Clone, V: PartialEq + Clone>(
    name: &str,
    actual: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    key: impl Fn(&K) -> String,
    value: impl Fn(&V) -> String,
    samples: usize,
) -> crate::api::MapDrift {
    use crate::api::{DriftEntry, DriftKind, MapDrift};
    let found = std::cell::RefCell::new(MapDrift {
        map: name.to_string(),
        entries: actual.len(),
        ..Default::default()
    });
    let note = |kind: DriftKind, k: &K, expected: Option<&V>, held: Option<&V>| {
        let mut found = found.borrow_mut();
        match kind {
            DriftKind::Missing => found.missing += 1,
            DriftKind::Extra => found.extra += 1,
            DriftKind::Different => found.different += 1,
        }
        if found.samples.len() < samples {
            found.samples.push(DriftEntry {
                kind,
                key: key(k),
                expected: expected.map(&value),
                actual: held.map(&value),
            });
        }
    };
    let mut stats = WriteStats::default();
    // The closures cannot fail: the comparison writes nothing.
    let _ = diff(
        actual,
        desired,
        |k, v| {
            match actual.get(k) {
                Some(held) => note(DriftKind::Different, k, Some(v), Some(held)),
                None => note(DriftKind::Missing, k, Some(v), None),
            }
            Ok(())
        },
        |k| {
            note(DriftKind::Extra, k, None, actual.get(k));
            Ok(())
        },
        &mut stats,
    );
    found.into_inner()
}

/// Map entries as `moatctl verify` shows them.
mod render {
    use moat_common::*;

    fn direction(d: u8) -> &'static str {
        if d == DIRECTION_INGRESS {
            "ingress"
        } else {
            "egress"
        }
    }

    fn any(n: u32, wildcard: u32) -> String {
        if n == wildcard {
            "*".into()
        } else {
            n.to_string()
        }
    }

    fn action(a: u8) -> String {
        match a {
            ACTION_ALLOW => "allow".into(),
            ACTION_DENY => "deny".into(),
            other => format!("action {other}"),
        }
    }

    pub fn endpoint(e: &EndpointInfo) -> String {
        let addresses: Vec<String> = super::endpoint_addresses(e)
            .map(|n| n.ip().to_string())
            .collect();
        format!(
            "identity {} policy {} mode {} flags {:#x} addresses {}",
            e.identity,
            e.policy_id,
            e.mode,
            e.flags,
            addresses.join(",")
        )
    }

    pub fn ipcache(v: &IpcacheValue) -> String {
        format!(
            "identity {} ifindex {} flags {:#x} tunnel {:#x}",
            v.identity, v.ifindex, v.flags, v.tunnel_endpoint
        )
    }

    pub fn policy_key(k: &PolicyKey) -> String {
        format!(
            "policy {} {} remote {} proto {} port {}",
            k.policy_id,
            direction(k.direction),
            any(k.remote_identity, IDENTITY_ANY),
            any(k.proto as u32, 0),
            any(k.dport as u32, 0)
        )
    }

    pub fn policy_value(v: &PolicyValue) -> String {
        format!(
            "{} rule {} admin {}/{} baseline {}/{}",
            action(v.action),
            v.rule_id,
            v.admin_action,
            v.admin_rule,
            v.baseline_action,
            v.baseline_rule
        )
    }

    pub fn port_range_key(k: &PortRangeKey) -> String {
        format!(
            "policy {} {} remote {} proto {}",
            k.policy_id,
            direction(k.direction),
            any(k.remote_identity, IDENTITY_ANY),
            any(k.proto as u32, 0)
        )
    }

    pub fn cidr_key(policy_id: u32, d: u8, net: &impl std::fmt::Display) -> String {
        format!("policy {policy_id} {} {net}", direction(d))
    }

    pub fn rule_set(set: &PortRuleSet) -> String {
        let rules: Vec<String> = set.rules[..(set.count as usize).min(MAX_PORT_RULES)]
            .iter()
            .map(|r| {
                format!(
                    "{} {}-{} proto {} rule {} tier {}",
                    action(r.action),
                    r.port_start,
                    r.port_end,
                    r.proto,
                    r.rule_id,
                    r.tier
                )
            })
            .collect();
        format!("[{}]", rules.join("; "))
    }

    pub fn fqdn_pattern_key(k: &FqdnPatternKey) -> String {
        let kind = match k.kind {
            FQDN_MATCH_EXACT => "exact".to_string(),
            FQDN_MATCH_SUBDOMAIN => "subdomain".to_string(),
            other => format!("kind {other}"),
        };
        format!(
            "identity {} {kind} name hash {:#018x}",
            k.identity, k.name_hash
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(policy_id: u32) -> PolicyKey {
        PolicyKey {
            policy_id,
            remote_identity: 0,
            dport: 0,
            proto: 0,
            direction: DIRECTION_INGRESS,
        }
    }

    #[test]
    fn hints_name_exactly_the_tables_a_policy_id_does_not_use() {
        let mut state = DatapathState::default();
        let allow = PolicyValue {
            rule_id: 20,
            action: ACTION_ALLOW,
            ..PolicyValue::default()
        };
        state.policy.insert(key(1), allow);
        state.policy.insert(
            key(2),
            PolicyValue {
                action: ACTION_DENY,
                ..allow
            },
        );
        state.cidr_v4.insert(
            (3, DIRECTION_EGRESS, "10.0.0.0/8".parse().unwrap()),
            PortRuleSet::default(),
        );
        state.port_ranges.insert(
            PortRangeKey {
                policy_id: 4,
                ..Default::default()
            },
            PortRuleSet::default(),
        );
        let hints = lookup_hints(&state);
        assert_eq!(hints[&1], ENDPOINT_HINT_FLAGS);
        assert_eq!(hints[&2], ENDPOINT_FLAG_NO_RANGES | ENDPOINT_FLAG_NO_CIDR);
        assert_eq!(hints[&3], ENDPOINT_FLAG_NO_DENY | ENDPOINT_FLAG_NO_RANGES);
        assert_eq!(hints[&4], ENDPOINT_FLAG_NO_DENY | ENDPOINT_FLAG_NO_CIDR);
        assert!(!hints.contains_key(&5));
    }

    #[test]
    fn drift_sorts_each_differing_entry_by_map_and_kind_and_bounds_the_samples() {
        use crate::api::DriftKind;
        let allow = PolicyValue::netpol(ACTION_ALLOW, 20);
        let mut desired = DesiredMaps::default();
        for id in 0..30 {
            desired.policy.insert(key(id), allow);
        }
        let host: IpNetwork = "10.1.2.3/32".parse().unwrap();
        let v6: IpNetwork = "fd00::/64".parse().unwrap();
        let value = IpcacheValue {
            identity: 9,
            ..Default::default()
        };
        desired.ipcache.insert(host, value);
        desired.ipcache.insert(v6, value);
        let mut actual = desired.clone();
        let hosts = BTreeMap::from([(host, value)]);
        let clean = drift(&desired, &actual, &hosts, 5);
        assert_eq!(clean.total(), 0, "{clean:?}");

        // 25 policy entries gone, one changed, one foreign; the v6 entry changed.
        for id in 0..25 {
            actual.policy.remove(&key(id));
        }
        actual
            .policy
            .insert(key(27), PolicyValue::netpol(ACTION_DENY, 20));
        actual.policy.insert(key(99), allow);
        actual.ipcache.insert(v6, IpcacheValue::default());
        let report = drift(&desired, &actual, &BTreeMap::new(), 5);
        let map = |name: &str| report.maps.iter().find(|m| m.map == name).unwrap();
        let policy = map("policy");
        assert_eq!(
            (
                policy.missing,
                policy.extra,
                policy.different,
                policy.entries
            ),
            (25, 1, 1, 6)
        );
        assert_eq!(policy.samples.len(), 5, "bounded");
        assert!(policy.samples.iter().all(|e| e.kind == DriftKind::Missing));
        let v6 = map("ipcache_v6");
        assert_eq!((v6.missing, v6.extra, v6.different), (0, 0, 1));
        assert_eq!(v6.samples[0].key, "fd00::/64");
        assert_eq!(map("ipcache_v4").total(), 0);
        // The host mirror lost its entry.
        let mirror = map("hosts_v4");
        assert_eq!(
            (mirror.missing, mirror.samples[0].key.as_str()),
            (1, "10.1.2.3")
        );
        assert_eq!(report.total(), 25 + 1 + 1 + 1 + 1);

        let few = drift(&desired, &actual, &hosts, 30);
        let kinds: Vec<DriftKind> = few
            .maps
            .iter()
            .find(|m| m.map == "policy")
            .unwrap()
            .samples
            .iter()
            .map(|e| e.kind)
            .collect();
        assert!(kinds.contains(&DriftKind::Different) && kinds.contains(&DriftKind::Extra));
        let changed = few
            .maps
            .iter()
            .find(|m| m.map == "policy")
            .unwrap()
            .samples
            .iter()
            .find(|e| e.kind == DriftKind::Different)
            .unwrap();
        assert_eq!(changed.key, "policy 27 ingress remote * proto * port *");
        assert!(
            changed
                .expected
                .as_deref()
                .unwrap()
                .starts_with("allow rule 20")
        );
        assert!(
            changed
                .actual
                .as_deref()
                .unwrap()
                .starts_with("deny rule 20")
        );
    }

    mod incremental {
        use super::super::*;
        use crate::api::EndpointSpec;
        use moat_policy::{Engine, PodRef};
        use moat_testkit::synthetic as bench;

        struct World {
            engine: Engine,
            endpoints: BTreeMap<String, EndpointRecord>,
            node: NodeConfig,
            applied: Applied,
            touched: Touched,
        }

        impl World {
            fn new() -> Self {
                let mut w = Self {
                    engine: Engine::new(),
                    endpoints: BTreeMap::new(),
                    node: NodeConfig {
                        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
                    },
                    applied: Applied::empty(),
                    touched: Touched::default(),
                };
                for ns in 0..3 {
                    let d = w
                        .engine
                        .upsert_namespace(&bench::namespace_name(ns), bench::namespace_labels(ns))
                        .unwrap();
                    w.touched.record(&d);
                }
                w
            }

            /// One incremental reconcile, checked against a from-scratch build.
            fn reconcile_and_check(&mut self, context: &str) -> Plan {
                let touched = std::mem::take(&mut self.touched);
                let plan =
                    self.applied
                        .plan(self.engine.state(), &self.endpoints, &self.node, &touched);
                let copy = Plan {
                    before: plan.before.clone(),
                    after: plan.after.clone(),
                };
                self.applied.commit(plan);
                let full = build(self.engine.state(), &self.endpoints, &self.node);
                assert_eq!(self.applied.maps, full, "{context}");
                copy
            }

            /// The pod of local slot `slot`: registered as a local endpoint, or only announced
            /// by the datastore with its address (as Kubernetes does before or after the CNI).
            fn local_pod(&mut self, slot: usize, rng: &mut bench::Rng) {
                self.slot_pod(slot, rng, true)
            }

            fn slot_pod(&mut self, slot: usize, rng: &mut bench::Rng, register: bool) {
                let mut pod = bench::pod(slot % 3, slot % 5, slot, 1000 + slot, rng);
                pod.name = format!("local-{slot}");
                if !register {
                    let d = self.engine.upsert_pod(pod).unwrap();
                    self.touched.record(&d);
                    return;
                }
                let spec = EndpointSpec {
                    container_id: format!("c{slot}"),
                    ifname: "eth0".into(),
                    netns: String::new(),
                    host_ifname: format!("moat{slot}"),
                    host_ifindex: 100 + slot as u32,
                    ips: pod.ips.clone(),
                    pod_namespace: pod.namespace.clone(),
                    pod_name: pod.name.clone(),
                    pod_uid: None,
                };
                let record = EndpointRecord {
                    spec,
                    mode: moat_policy::Mode::ALL[rng.below(3)],
                    flags: 0,
                };
                self.endpoints
                    .insert(EndpointRecord::key(&format!("c{slot}"), "eth0"), record);
                let d = self.engine.upsert_pod(pod).unwrap();
                self.touched.record(&d);
            }
        }

        #[test]
        fn incremental_reconciles_equal_a_full_build_after_every_event() {
            for seed in 0..16u64 {
                let mut rng = bench::Rng::new(seed);
                let mut w = World::new();
                w.reconcile_and_check(&format!("seed {seed} start"));
                for step in 0..120 {
                    let what = rng.below(9);
                    match what {
                        0 | 1 => {
                            let ns = bench::namespace_name(rng.below(3));
                            let name = format!("p{}", rng.below(12));
                            let style = rng.below(8);
                            let policy = bench::policy(&ns, &name, style, 5, &mut rng);
                            let d = w.engine.upsert_policy(&policy).unwrap();
                            w.touched.record(&d);
                        }
                        2 => {
                            let ns = bench::namespace_name(rng.below(3));
                            let d = w
                                .engine
                                .delete_policy(&ns, &format!("p{}", rng.below(12)))
                                .unwrap();
                            w.touched.record(&d);
                        }
                        3 => {
                            let n = rng.below(40);
                            let pod = bench::pod(n % 3, n % 5, n, n, &mut rng);
                            let d = w.engine.upsert_pod(pod).unwrap();
                            w.touched.record(&d);
                        }
                        4 => {
                            let n = rng.below(40);
                            let r = PodRef::new(
                                bench::namespace_name(n % 3),
                                format!("app-{}-{n}", n % 5),
                            );
                            let d = w.engine.delete_pod(&r).unwrap();
                            w.touched.record(&d);
                        }
                        5 => w.local_pod(rng.below(6), &mut rng),
                        8 => {
                            // Known to the datastore with its address, not (or no longer)
                            // registered here.
                            let slot = rng.below(6);
                            w.endpoints
                                .remove(&EndpointRecord::key(&format!("c{slot}"), "eth0"));
                            w.slot_pod(slot, &mut rng, false);
                        }
                        6 => {
                            let slot = rng.below(6);
                            if let Some(r) = w
                                .endpoints
                                .remove(&EndpointRecord::key(&format!("c{slot}"), "eth0"))
                            {
                                let d = w.engine.delete_pod(&r.pod_ref()).unwrap();
                                w.touched.record(&d);
                            }
                        }
                        _ => {
                            let ns = rng.below(3);
                            let mut labels = bench::namespace_labels(ns + rng.below(2));
                            labels.insert("kubernetes.io/metadata.name", bench::namespace_name(ns));
                            let d = w
                                .engine
                                .upsert_namespace(&bench::namespace_name(ns), labels)
                                .unwrap();
                            w.touched.record(&d);
                        }
                    }
                    w.reconcile_and_check(&format!("seed {seed} step {step} event {what}"));
                }
            }
        }

        #[test]
        fn fqdn_patterns_come_and_go_incrementally_with_their_policy() {
            const POLICY: &str = "apiVersion: moat.io/v1alpha1\nkind: MoatPolicy\nmetadata: {name: pay, namespace: ns-0}\nspec:\n  podSelector: {}\n  egress:\n  - to: [{fqdn: api.example.com}, {fqdn: '*.example.org'}]\n    ports: [{port: 443}]\n";
            let mut rng = bench::Rng::new(3);
            let mut w = World::new();
            w.local_pod(0, &mut rng);
            w.reconcile_and_check("setup");
            assert!(w.applied.maps.fqdn_patterns.is_empty());

            let policy = moat_policy::MoatPolicy::from_yaml(POLICY).unwrap();
            let d = w.engine.upsert_moat_policy(&policy).unwrap();
            w.touched.record(&d);
            let plan = w.reconcile_and_check("fqdn policy added");
            assert_eq!(plan.after.fqdn_patterns.len(), 2, "{:?}", plan.after);
            let identity = w.applied.maps.endpoints.values().next().unwrap().identity;
            assert!(
                w.applied
                    .maps
                    .fqdn_patterns
                    .keys()
                    .all(|k| k.identity == identity)
            );
            let flags = w.applied.maps.endpoints.values().next().unwrap().flags;
            assert_ne!(flags & ENDPOINT_FLAG_FQDN, 0);

            let d = w.engine.delete_moat_policy("ns-0", "pay").unwrap();
            w.touched.record(&d);
            w.reconcile_and_check("fqdn policy deleted");
            assert!(w.applied.maps.fqdn_patterns.is_empty());
            let flags = w.applied.maps.endpoints.values().next().unwrap().flags;
            assert_eq!(flags & ENDPOINT_FLAG_FQDN, 0);
        }

        #[test]
        fn only_local_endpoints_entries_are_held_and_they_come_and_go_with_them() {
            let mut rng = bench::Rng::new(7);
            let mut w = World::new();
            for (i, style) in (0..8).enumerate() {
                let policy = bench::policy("ns-0", &format!("p{i}"), style, 5, &mut rng);
                let d = w.engine.upsert_policy(&policy).unwrap();
                w.touched.record(&d);
            }
            // Pods the datastore knows, none of them on this node.
            for n in 0..20 {
                let pod = bench::pod(n % 3, n % 5, n, n, &mut rng);
                let d = w.engine.upsert_pod(pod).unwrap();
                w.touched.record(&d);
            }
            w.reconcile_and_check("remote pods only");
            assert!(
                !w.engine.state().policy.is_empty(),
                "the engine has entries"
            );
            let maps = &w.applied.maps;
            assert!(maps.policy.is_empty() && maps.port_ranges.is_empty());
            assert!(maps.cidr_v4.is_empty() && maps.cidr_v6.is_empty());

            w.local_pod(0, &mut rng);
            w.reconcile_and_check("first local pod");
            let id = w.applied.maps.endpoints.values().next().unwrap().policy_id;
            let own: BTreeMap<_, _> = w
                .engine
                .state()
                .policy
                .iter()
                .filter(|(k, _)| k.policy_id == id)
                .map(|(k, v)| (*k, *v))
                .collect();
            assert!(!own.is_empty());
            assert_eq!(
                w.applied.maps.policy, own,
                "exactly the local policy id's entries"
            );

            let r = w
                .endpoints
                .remove(&EndpointRecord::key("c0", "eth0"))
                .unwrap();
            let d = w.engine.delete_pod(&r.pod_ref()).unwrap();
            w.touched.record(&d);
            let plan = w.reconcile_and_check("the local pod left");
            assert_eq!(plan.before.policy, own, "its entries are deleted");
            assert!(w.applied.maps.policy.is_empty());
        }

        #[test]
        fn a_pod_joining_an_existing_identity_writes_no_policy_entry() {
            let mut rng = bench::Rng::new(7);
            let mut w = World::new();
            for (i, style) in (0..8).enumerate() {
                let policy = bench::policy("ns-0", &format!("p{i}"), style, 5, &mut rng);
                let d = w.engine.upsert_policy(&policy).unwrap();
                w.touched.record(&d);
            }
            w.local_pod(0, &mut rng);
            w.reconcile_and_check("setup");
            assert!(!w.applied.maps.policy.is_empty());
            // Slot 15 has slot 0's namespace and app, so the same identity.
            w.local_pod(15, &mut rng);
            let plan = w.reconcile_and_check("second replica");
            assert!(plan.after.policy.is_empty() && plan.before.policy.is_empty());
            assert!(plan.after.cidr_v4.is_empty() && plan.after.port_ranges.is_empty());
            assert!(plan.after.ipcache.len() <= 3, "{:?}", plan.after.ipcache);
            assert_eq!(plan.after.endpoints.len(), 2);
        }
    }
}
