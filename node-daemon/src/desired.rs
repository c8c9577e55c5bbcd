//! What the kernel maps should hold, and how to get them there by writing only the difference.
//!
//! The desired content is a pure function of the policy engine's state, the registered local
//! endpoints and the node's configuration. moatd keeps the content it last applied; each change
//! writes the diff. At start the "applied" side is read back from the pinned maps themselves,
//! so whatever a crash left behind (entries of a pod deleted while moatd was down, half a
//! change) is corrected by the first reconcile, without flushing what is still right.

use std::collections::BTreeMap;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use moat_common::*;
use moat_datapath::Maps;
use moat_policy::DatapathState;

use crate::store::EndpointRecord;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredMaps {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<IpNetwork, IpcacheValue>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    pub port_ranges: BTreeMap<PortRangeKey, PortRuleSet>,
    pub cidr_v4: BTreeMap<(u32, u8, Ipv4Network), PortRuleSet>,
    pub cidr_v6: BTreeMap<(u32, u8, Ipv6Network), PortRuleSet>,
}

/// Node facts that shape the maps beyond policy.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    /// Service (ClusterIP) ranges: egress towards them is judged after DNAT.
    pub service_cidrs: Vec<IpNetwork>,
}

pub fn mode_code(mode: &str) -> u8 {
    match mode {
        "audit" => MODE_AUDIT,
        "learn" => MODE_LEARN,
        _ => MODE_ENFORCE,
    }
}

pub fn build(
    state: &DatapathState,
    endpoints: &BTreeMap<String, EndpointRecord>,
    node: &NodeConfig,
) -> DesiredMaps {
    let mut d = DesiredMaps::default();
    for cidr in &node.service_cidrs {
        d.ipcache.insert(
            *cidr,
            IpcacheValue {
                identity: IDENTITY_WORLD,
                ifindex: 0,
                flags: IPCACHE_FLAG_SERVICE,
                tunnel_endpoint: 0,
            },
        );
    }
    for (net, identity) in &state.ipcache {
        d.ipcache.insert(
            *net,
            IpcacheValue {
                identity: identity.0,
                ..Default::default()
            },
        );
    }
    let hints = lookup_hints(state);
    for record in endpoints.values() {
        let Some(compiled) = state.endpoints.get(&record.pod_ref()) else {
            // Registered but not (yet) known to the engine: no entry, so the datapath fails
            // closed with "unknown endpoint" rather than guessing an identity.
            continue;
        };
        let flags = record.flags & !ENDPOINT_HINT_FLAGS
            | hints
                .get(&compiled.policy_id)
                .copied()
                .unwrap_or(ENDPOINT_HINT_FLAGS);
        let info = compiled.to_endpoint_info(mode_code(&record.mode), flags);
        d.endpoints.insert(record.spec.host_ifindex, info);
        for ip in &record.spec.ips {
            let net = IpNetwork::from(*ip);
            let entry = d.ipcache.entry(net).or_insert(IpcacheValue {
                identity: compiled.identity.0,
                ..Default::default()
            });
            // Local endpoints carry their veth so that a receiver can judge the sender's
            // egress policy (needed for traffic through Services).
            entry.ifindex = record.spec.host_ifindex;
        }
    }
    d.policy = state.policy.clone();
    d.port_ranges = state.port_ranges.clone();
    d.cidr_v4 = state.cidr_v4.clone();
    d.cidr_v6 = state.cidr_v6.clone();
    d
}

/// ENDPOINT_FLAG_NO_* hints per policy id: which lookups can never match for it. A policy id
/// with no entries at all gets every hint (its verdict is default deny either way).
fn lookup_hints(state: &DatapathState) -> BTreeMap<u32, u8> {
    let mut lacks: BTreeMap<u32, u8> = BTreeMap::new();
    let mut clear = |policy_id: u32, bits: u8| {
        *lacks.entry(policy_id).or_insert(ENDPOINT_HINT_FLAGS) &= !bits;
    };
    for (k, v) in &state.policy {
        clear(
            k.policy_id,
            if v.action == ACTION_DENY {
                ENDPOINT_FLAG_NO_DENY
            } else {
                0
            },
        );
    }
    let has_deny = |set: &PortRuleSet| {
        set.rules[..(set.count as usize).min(MAX_PORT_RULES)]
            .iter()
            .any(|r| r.action == ACTION_DENY)
    };
    for (k, set) in &state.port_ranges {
        let deny = if has_deny(set) {
            ENDPOINT_FLAG_NO_DENY
        } else {
            0
        };
        clear(k.policy_id, ENDPOINT_FLAG_NO_RANGES | deny);
    }
    for ((policy_id, _, _), set) in &state.cidr_v4 {
        let deny = if has_deny(set) {
            ENDPOINT_FLAG_NO_DENY
        } else {
            0
        };
        clear(*policy_id, ENDPOINT_FLAG_NO_CIDR | deny);
    }
    for ((policy_id, _, _), set) in &state.cidr_v6 {
        let deny = if has_deny(set) {
            ENDPOINT_FLAG_NO_DENY
        } else {
            0
        };
        clear(*policy_id, ENDPOINT_FLAG_NO_CIDR | deny);
    }
    lacks
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

/// Writes `desired` over `applied`. Order matters for first-packet correctness: policy and
/// ipcache entries go in before the endpoint entry that makes them reachable, and endpoints
/// leave before the entries they used.
pub fn apply(
    maps: &mut Maps,
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
    diff(
        &applied.policy,
        &desired.policy,
        |k, v| Ok(m.borrow_mut().upsert_policy(k, v)?),
        |_| Ok(()),
        &mut stats,
    )?;
    diff(
        &applied.port_ranges,
        &desired.port_ranges,
        |k, v| Ok(m.borrow_mut().upsert_port_ranges(k, v)?),
        |_| Ok(()),
        &mut stats,
    )?;
    diff(
        &applied.cidr_v4,
        &desired.cidr_v4,
        |(p, d, n), v| Ok(m.borrow_mut().upsert_cidr(*p, *d, IpNetwork::V4(*n), v)?),
        |_| Ok(()),
        &mut stats,
    )?;
    diff(
        &applied.cidr_v6,
        &desired.cidr_v6,
        |(p, d, n), v| Ok(m.borrow_mut().upsert_cidr(*p, *d, IpNetwork::V6(*n), v)?),
        |_| Ok(()),
        &mut stats,
    )?;
    diff(
        &applied.ipcache,
        &desired.ipcache,
        |k, v| Ok(m.borrow_mut().upsert_ipcache(*k, v)?),
        |_| Ok(()),
        &mut stats,
    )?;
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
pub fn read_actual(maps: &Maps) -> DesiredMaps {
    let mut d = DesiredMaps::default();
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
            _pad: [0; 3],
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
}
