//! What happens when a map is full, decided before anything is written.
//!
//! A write the kernel refuses halfway through a change would leave the maps part old, part
//! new: some of a policy's entries in, others not, the ipcache half updated. So before a
//! reconcile writes, the size each map reaches at the peak of the write (apply adds and
//! updates first and deletes last, so the peak holds what stays, what goes and what comes)
//! is checked against the map's capacity. A change that does not fit is refused whole:
//! nothing is written, the maps keep enforcing the last state that fit, and the reason
//! names the map, the count and the `--map-size` knob to raise. LRU maps (conntrack,
//! learned FQDN addresses) are not checked here: they evict their least recently used
//! entries by design (see docs/maps.md).

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use moat_common::map_name;
use moat_datapath::MapSizes;

use crate::desired::{DesiredMaps, Plan};

/// The capacity of each map moatd writes, as loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub endpoints: usize,
    /// Each family's trie (and its exact-match mirror of the same size).
    pub ipcache: usize,
    pub policy: usize,
    pub port_ranges: usize,
    /// Each family's trie.
    pub cidr: usize,
    pub fqdn_patterns: usize,
}

impl Capacities {
    pub fn of(sizes: &MapSizes) -> Self {
        let knob = |name: &str| sizes.knob(name).expect("every knob has a size") as usize;
        Self {
            endpoints: knob("endpoints"),
            ipcache: knob("ipcache"),
            policy: knob("policy"),
            port_ranges: knob("port-ranges"),
            cidr: knob("cidr"),
            fqdn_patterns: knob("fqdn-patterns"),
        }
    }
}

impl Default for Capacities {
    fn default() -> Self {
        Self::of(&MapSizes::default())
    }
}

/// A change that does not fit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "map {map} would hold {peak} entries while this change is written, more than its \
     {capacity}: nothing of the change was written and the maps keep enforcing the last state \
     that fit; raise it with `moatd --map-size {knob}=N` (docs/maps.md) or shrink the policy"
)]
pub struct Overflow {
    pub map: &'static str,
    pub knob: &'static str,
    pub peak: usize,
    pub capacity: usize,
}

/// Keys held at the peak of writing `plan` over `held`: `held` with what the plan reads as
/// before (a full plan takes the held maps into `before`) and everything it writes.
fn peak<K: Ord, V>(
    held: &BTreeMap<K, V>,
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
    counted: impl Fn(&K) -> bool,
) -> usize {
    let base = held.keys().filter(|k| counted(k)).count();
    let was = before
        .keys()
        .filter(|k| counted(k) && !held.contains_key(k))
        .count();
    let comes = after
        .keys()
        .filter(|k| counted(k) && !held.contains_key(k) && !before.contains_key(k))
        .count();
    base + was + comes
}

fn check(
    map: &'static str,
    knob: &'static str,
    peak: usize,
    capacity: usize,
) -> Result<(), Overflow> {
    if peak > capacity {
        Err(Overflow {
            map,
            knob,
            peak,
            capacity,
        })
    } else {
        Ok(())
    }
}

/// Counts every key (the tables that are one map each).
fn all<K>(_: &K) -> bool {
    true
}

/// Refuses `plan` when writing it over `held` (what moatd last wrote) would overflow a map.
pub fn check_plan(held: &DesiredMaps, plan: &Plan, caps: &Capacities) -> Result<(), Overflow> {
    let (b, a) = (&plan.before, &plan.after);
    check(
        map_name::ENDPOINTS,
        "endpoints",
        peak(&held.endpoints, &b.endpoints, &a.endpoints, all),
        caps.endpoints,
    )?;
    check(
        map_name::IPCACHE_V4,
        "ipcache",
        peak(&held.ipcache, &b.ipcache, &a.ipcache, |n: &IpNetwork| {
            n.is_ipv4()
        }),
        caps.ipcache,
    )?;
    check(
        map_name::IPCACHE_V6,
        "ipcache",
        peak(&held.ipcache, &b.ipcache, &a.ipcache, |n: &IpNetwork| {
            n.is_ipv6()
        }),
        caps.ipcache,
    )?;
    check(
        map_name::POLICY,
        "policy",
        peak(&held.policy, &b.policy, &a.policy, all),
        caps.policy,
    )?;
    check(
        map_name::PORT_RANGES,
        "port-ranges",
        peak(&held.port_ranges, &b.port_ranges, &a.port_ranges, all),
        caps.port_ranges,
    )?;
    check(
        map_name::CIDR_V4,
        "cidr",
        peak(&held.cidr_v4, &b.cidr_v4, &a.cidr_v4, all),
        caps.cidr,
    )?;
    check(
        map_name::CIDR_V6,
        "cidr",
        peak(&held.cidr_v6, &b.cidr_v6, &a.cidr_v6, all),
        caps.cidr,
    )?;
    check(
        map_name::FQDN_PATTERNS,
        "fqdn-patterns",
        peak(&held.fqdn_patterns, &b.fqdn_patterns, &a.fqdn_patterns, all),
        caps.fqdn_patterns,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_common::{PolicyKey, PolicyValue};

    fn key(i: u32) -> PolicyKey {
        PolicyKey {
            policy_id: 1,
            remote_identity: i,
            dport: 0,
            proto: 0,
            direction: 0,
        }
    }

    fn policy(range: std::ops::Range<u32>) -> DesiredMaps {
        DesiredMaps {
            policy: range.map(|i| (key(i), PolicyValue::default())).collect(),
            ..Default::default()
        }
    }

    fn caps(policy: usize) -> Capacities {
        Capacities {
            policy,
            ..Default::default()
        }
    }

    fn plan(before: DesiredMaps, after: DesiredMaps) -> Plan {
        Plan { before, after }
    }

    #[test]
    fn an_incremental_change_counts_what_stays_what_goes_and_what_comes() {
        // 10 held; the change replaces 5..10 by 10..15: 15 at the peak (deletes come last).
        let held = policy(0..10);
        let change = plan(policy(5..10), policy(10..15));
        assert_eq!(check_plan(&held, &change, &caps(15)), Ok(()));
        let err = check_plan(&held, &change, &caps(14)).unwrap_err();
        assert_eq!((err.map, err.peak, err.capacity), ("MOAT_POLICY", 15, 14));
        assert!(err.to_string().contains("--map-size policy=N"), "{err}");
    }

    #[test]
    fn a_full_rebuild_counts_what_the_kernel_held_and_what_comes() {
        // A full plan took the held maps into `before`: held itself is empty.
        let change = plan(policy(0..10), policy(0..12));
        assert_eq!(
            check_plan(&DesiredMaps::default(), &change, &caps(12)),
            Ok(())
        );
        assert!(check_plan(&DesiredMaps::default(), &change, &caps(11)).is_err());
    }

    #[test]
    fn updating_entries_in_place_needs_no_room() {
        let held = policy(0..10);
        let change = plan(policy(0..10), policy(0..10));
        assert_eq!(check_plan(&held, &change, &caps(10)), Ok(()));
    }

    #[test]
    fn each_family_of_the_ipcache_is_its_own_trie() {
        let v4: IpNetwork = "10.0.0.1/32".parse().unwrap();
        let v6: IpNetwork = "fd00::1/128".parse().unwrap();
        let after = DesiredMaps {
            ipcache: [(v4, Default::default()), (v6, Default::default())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let change = plan(DesiredMaps::default(), after);
        let one_each = Capacities {
            ipcache: 1,
            ..Default::default()
        };
        assert_eq!(
            check_plan(&DesiredMaps::default(), &change, &one_each),
            Ok(())
        );
    }
}
