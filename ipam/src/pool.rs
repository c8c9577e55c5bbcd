//! The allocator over in-memory state: which address each attachment holds, and where the
//! next search starts.
//!
//! Kept free of I/O so the allocation rules (round robin from the last address, reserved
//! addresses, idempotent ADD, exhaustion) are tested directly; `store` adds locking and disk.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use moat_cni_protocol::Attachment;
use serde::{Deserialize, Serialize};

use crate::config::{Family, RangeSet, address_to_number, number_to_address};
use crate::error::{IpamError, Result};

/// Bumped if the on-disk layout changes incompatibly.
pub const STATE_FORMAT_VERSION: u32 = 1;

/// The whole state of one network, as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolState {
    pub format_version: u32,
    pub allocations: Vec<StoredAllocation>,
    /// The most recently handed-out address of each family: the next search starts after it,
    /// so a just-released address is not reused at once.
    #[serde(default)]
    pub last_allocated: Vec<IpAddr>,
}

impl Default for PoolState {
    fn default() -> PoolState {
        PoolState {
            format_version: STATE_FORMAT_VERSION,
            allocations: Vec::new(),
            last_allocated: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAllocation {
    pub address: IpAddr,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl StoredAllocation {
    fn belongs_to(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }
}

/// An address handed to an attachment, with the subnet prefix and gateway of its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
}

/// Addresses the allocator never hands out: network, IPv4 broadcast, gateways, and the
/// config's `reserved` list.
fn is_unusable(set: &RangeSet, reserved: &[IpAddr], address: IpAddr) -> bool {
    reserved.contains(&address)
        || set
            .ranges
            .iter()
            .any(|r| r.is_structurally_reserved(address))
}

fn allocation_in(set: &RangeSet, address: IpAddr) -> Option<Allocation> {
    let range = set.range_of(address)?;
    Some(Allocation {
        // The prefix of a validated subnet is valid for any address inside it.
        address: IpNetwork::new(address, range.subnet.prefix()).expect("prefix fits family"),
        gateway: range.gateway,
    })
}

impl PoolState {
    fn last_allocated_in(&self, family: Family) -> Option<IpAddr> {
        self.last_allocated
            .iter()
            .copied()
            .find(|a| Family::of(*a) == family)
    }

    fn set_last_allocated(&mut self, address: IpAddr) {
        self.last_allocated
            .retain(|a| Family::of(*a) != Family::of(address));
        self.last_allocated.push(address);
    }

    /// One address per range set for the attachment. A repeated ADD returns what the attachment
    /// already holds; nothing changes unless every set can serve it.
    pub fn allocate(
        &mut self,
        sets: &[RangeSet],
        reserved: &[IpAddr],
        container_id: &str,
        ifname: &str,
    ) -> Result<Vec<Allocation>> {
        // An address the attachment holds outside every configured range (config changed)
        // is stale: drop it so the attachment gets one from the current ranges.
        self.allocations.retain(|a| {
            !a.belongs_to(container_id, ifname)
                || sets.iter().any(|s| s.range_of(a.address).is_some())
        });

        let taken: HashSet<IpAddr> = self.allocations.iter().map(|a| a.address).collect();
        let mut chosen = Vec::new();
        for set in sets {
            let held = self
                .allocations
                .iter()
                .find(|a| a.belongs_to(container_id, ifname) && set.range_of(a.address).is_some());
            if held.is_none() {
                let address = self.find_free(set, reserved, &taken).ok_or_else(|| {
                    IpamError::RangeExhausted {
                        family: set.family.name(),
                        ranges: set.describe(),
                    }
                })?;
                chosen.push(address);
            }
        }

        for address in chosen {
            self.allocations.push(StoredAllocation {
                address,
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            });
            self.set_last_allocated(address);
        }
        Ok(self.allocations_of(sets, container_id, ifname))
    }

    /// Walks the set's ranges in order, starting just after the last handed-out address and
    /// wrapping around, and returns the first address that is neither taken nor reserved.
    fn find_free(
        &self,
        set: &RangeSet,
        reserved: &[IpAddr],
        taken: &HashSet<IpAddr>,
    ) -> Option<IpAddr> {
        let total: u128 = set.ranges.iter().map(|r| r.size()).sum();
        let (mut range_index, mut number) =
            match self.last_allocated_in(set.family).and_then(|last| {
                let index = set.ranges.iter().position(|r| r.contains(last))?;
                Some((index, address_to_number(last)))
            }) {
                Some((index, last)) => step(set, index, last),
                None => (0, set.ranges[0].first),
            };
        // Every failed probe is a distinct taken or reserved address, so on a large range this
        // ends after a few steps; `total` only bounds a full range.
        let mut probed: u128 = 0;
        while probed < total {
            let address = number_to_address(set.family, number);
            if !taken.contains(&address) && !is_unusable(set, reserved, address) {
                return Some(address);
            }
            (range_index, number) = step(set, range_index, number);
            probed += 1;
        }
        None
    }

    /// The attachment's addresses that fall inside the configured ranges.
    pub fn allocations_of(
        &self,
        sets: &[RangeSet],
        container_id: &str,
        ifname: &str,
    ) -> Vec<Allocation> {
        sets.iter()
            .filter_map(|set| {
                self.allocations
                    .iter()
                    .filter(|a| a.belongs_to(container_id, ifname))
                    .find_map(|a| allocation_in(set, a.address))
            })
            .collect()
    }

    /// Forgets the attachment's addresses; returns how many there were (0 is not an error).
    pub fn release(&mut self, container_id: &str, ifname: &str) -> usize {
        let before = self.allocations.len();
        self.allocations
            .retain(|a| !a.belongs_to(container_id, ifname));
        before - self.allocations.len()
    }

    /// Releases every allocation whose attachment is not in `valid`; returns the released ones.
    pub fn retain_only(&mut self, valid: &[Attachment]) -> Vec<StoredAllocation> {
        let valid: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let (kept, released) = std::mem::take(&mut self.allocations)
            .into_iter()
            .partition(|a| valid.contains(&(a.container_id.as_str(), a.ifname.as_str())));
        self.allocations = kept;
        released
    }

    /// The first family whose range set has no free address left, if any: an ADD would fail.
    pub fn exhausted_family(&self, sets: &[RangeSet], reserved: &[IpAddr]) -> Option<Family> {
        sets.iter()
            .find(|set| self.free_count(set, reserved) == 0)
            .map(|set| set.family)
    }

    /// Free addresses of a set, counted without walking it (IPv6 ranges are huge).
    pub fn free_count(&self, set: &RangeSet, reserved: &[IpAddr]) -> u128 {
        let total: u128 = set.ranges.iter().map(|r| r.size()).sum();
        let mut unusable: HashSet<IpAddr> = reserved
            .iter()
            .copied()
            .filter(|a| set.range_of(*a).is_some())
            .collect();
        for range in &set.ranges {
            let structural = [
                Some(range.subnet.network()),
                range.subnet.is_ipv4().then(|| range.subnet.broadcast()),
                range.gateway,
            ];
            unusable.extend(
                structural
                    .into_iter()
                    .flatten()
                    .filter(|a| set.range_of(*a).is_some()),
            );
        }
        let allocated: HashSet<IpAddr> = self
            .allocations
            .iter()
            .map(|a| a.address)
            .filter(|a| set.range_of(*a).is_some() && !unusable.contains(a))
            .collect();
        total - unusable.len() as u128 - allocated.len() as u128
    }
}

/// The address after `number` in the set, moving to the next range (and wrapping) at a range's
/// end.
fn step(set: &RangeSet, range_index: usize, number: u128) -> (usize, u128) {
    let range = &set.ranges[range_index];
    if number < range.last {
        (range_index, number + 1)
    } else {
        let next = (range_index + 1) % set.ranges.len();
        (next, set.ranges[next].first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IpamConfig, RangeConfig};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// (subnet, rangeStart, rangeEnd, gateway)
    type RangeSpec<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);

    fn sets(ranges: &[RangeSpec]) -> Vec<RangeSet> {
        let mut by_family: Vec<Vec<RangeConfig>> = Vec::new();
        for (subnet, start, end, gateway) in ranges {
            let config = RangeConfig {
                subnet: subnet.parse().unwrap(),
                range_start: start.map(ip),
                range_end: end.map(ip),
                gateway: gateway.map(ip),
            };
            match by_family
                .iter_mut()
                .find(|s| s[0].subnet.is_ipv4() == config.subnet.is_ipv4())
            {
                Some(set) => set.push(config),
                None => by_family.push(vec![config]),
            }
        }
        IpamConfig {
            plugin_type: "moat-ipam".into(),
            ranges: by_family,
            routes: vec![],
            data_dir: None,
            reserved: vec![],
            dns: None,
        }
        .range_sets()
        .unwrap()
    }

    fn addresses(allocations: &[Allocation]) -> Vec<String> {
        allocations.iter().map(|a| a.address.to_string()).collect()
    }

    #[test]
    fn first_allocation_skips_network_and_gateway() {
        let sets = sets(&[("10.0.0.0/24", None, None, Some("10.0.0.1"))]);
        let mut state = PoolState::default();
        let got = state.allocate(&sets, &[], "c1", "eth0").unwrap();
        assert_eq!(addresses(&got), ["10.0.0.2/24"]);
        assert_eq!(got[0].gateway, Some(ip("10.0.0.1")));
    }

    #[test]
    fn repeated_add_for_same_attachment_returns_same_address() {
        let sets = sets(&[("10.0.0.0/24", None, None, None)]);
        let mut state = PoolState::default();
        let first = state.allocate(&sets, &[], "c1", "eth0").unwrap();
        let again = state.allocate(&sets, &[], "c1", "eth0").unwrap();
        assert_eq!(first, again);
        assert_eq!(state.allocations.len(), 1);
    }

    #[test]
    fn same_container_on_two_interfaces_gets_two_addresses() {
        let sets = sets(&[("10.0.0.0/24", None, None, None)]);
        let mut state = PoolState::default();
        let a = state.allocate(&sets, &[], "c1", "eth0").unwrap();
        let b = state.allocate(&sets, &[], "c1", "net1").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn allocation_continues_after_the_last_address_instead_of_reusing_a_freed_one() {
        let sets = sets(&[("10.0.0.0/24", None, None, None)]);
        let mut state = PoolState::default();
        state.allocate(&sets, &[], "c1", "eth0").unwrap(); // .1
        state.allocate(&sets, &[], "c2", "eth0").unwrap(); // .2
        state.release("c1", "eth0");
        let got = state.allocate(&sets, &[], "c3", "eth0").unwrap();
        assert_eq!(addresses(&got), ["10.0.0.3/24"]);
    }

    #[test]
    fn allocation_wraps_around_to_the_start_of_the_range() {
        let sets = sets(&[("10.0.0.0/24", Some("10.0.0.10"), Some("10.0.0.12"), None)]);
        let mut state = PoolState::default();
        for c in ["a", "b", "c"] {
            state.allocate(&sets, &[], c, "eth0").unwrap();
        }
        state.release("a", "eth0");
        let got = state.allocate(&sets, &[], "d", "eth0").unwrap();
        assert_eq!(addresses(&got), ["10.0.0.10/24"]);
    }

    #[test]
    fn exhausted_range_is_an_error_and_changes_nothing() {
        let sets = sets(&[("10.0.0.0/30", None, None, Some("10.0.0.1"))]);
        let mut state = PoolState::default();
        state.allocate(&sets, &[], "a", "eth0").unwrap(); // only .2 is usable
        assert_eq!(state.exhausted_family(&sets, &[]), Some(Family::V4));
        let before = state.clone();
        let err = state.allocate(&sets, &[], "b", "eth0").unwrap_err();
        assert!(matches!(
            err,
            IpamError::RangeExhausted { family: "IPv4", .. }
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn reserved_addresses_are_never_handed_out() {
        let sets = sets(&[("10.0.0.0/29", None, None, Some("10.0.0.1"))]);
        let reserved = [ip("10.0.0.2"), ip("10.0.0.4")];
        let mut state = PoolState::default();
        let mut got = Vec::new();
        while let Ok(a) = state.allocate(&sets, &reserved, &format!("c{}", got.len()), "eth0") {
            got.extend(addresses(&a));
        }
        // /29: .0 network, .7 broadcast, .1 gateway, .2 and .4 reserved.
        assert_eq!(got, ["10.0.0.3/29", "10.0.0.5/29", "10.0.0.6/29"]);
        assert_eq!(state.free_count(&sets[0], &reserved), 0);
    }

    #[test]
    fn dual_stack_allocates_one_address_per_family() {
        let sets = sets(&[
            ("10.0.0.0/24", None, None, Some("10.0.0.1")),
            ("fd00::/64", None, None, Some("fd00::1")),
        ]);
        let mut state = PoolState::default();
        let got = state.allocate(&sets, &[], "c1", "eth0").unwrap();
        assert_eq!(addresses(&got), ["10.0.0.2/24", "fd00::2/64"]);
        assert_eq!(got[1].gateway, Some(ip("fd00::1")));
    }

    #[test]
    fn dual_stack_failure_in_one_family_allocates_nothing() {
        let sets = sets(&[
            ("10.0.0.0/24", None, None, None),
            ("fd00::/64", Some("fd00::5"), Some("fd00::5"), None),
        ]);
        let mut state = PoolState::default();
        state.allocate(&sets, &[], "a", "eth0").unwrap();
        assert!(state.allocate(&sets, &[], "b", "eth0").is_err());
        assert_eq!(state.allocations.len(), 2);
    }

    #[test]
    fn multiple_ranges_in_a_set_are_used_in_order() {
        let sets = sets(&[
            ("10.0.0.0/24", Some("10.0.0.10"), Some("10.0.0.10"), None),
            ("10.0.1.0/24", Some("10.0.1.10"), Some("10.0.1.11"), None),
        ]);
        let mut state = PoolState::default();
        let a = state.allocate(&sets, &[], "a", "eth0").unwrap();
        let b = state.allocate(&sets, &[], "b", "eth0").unwrap();
        assert_eq!(addresses(&a), ["10.0.0.10/24"]);
        assert_eq!(addresses(&b), ["10.0.1.10/24"]);
    }

    #[test]
    fn huge_ipv6_range_is_counted_without_walking_it() {
        let sets = sets(&[("fd00::/64", None, None, None)]);
        let state = PoolState::default();
        // 2^64 addresses minus the network address.
        assert_eq!(state.free_count(&sets[0], &[]), (1u128 << 64) - 1);
        assert_eq!(state.exhausted_family(&sets, &[]), None);
    }

    #[test]
    fn release_of_unknown_attachment_is_a_no_op() {
        let mut state = PoolState::default();
        assert_eq!(state.release("nope", "eth0"), 0);
    }

    #[test]
    fn retain_only_releases_attachments_not_listed() {
        let sets = sets(&[("10.0.0.0/24", None, None, None)]);
        let mut state = PoolState::default();
        for c in ["a", "b", "c"] {
            state.allocate(&sets, &[], c, "eth0").unwrap();
        }
        let released = state.retain_only(&[Attachment {
            container_id: "b".into(),
            ifname: "eth0".into(),
        }]);
        let mut ids: Vec<_> = released.iter().map(|a| a.container_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(state.allocations.len(), 1);
    }

    #[test]
    fn allocation_outside_changed_ranges_is_replaced() {
        let old = sets(&[("10.0.0.0/24", None, None, None)]);
        let new = sets(&[("10.9.0.0/24", None, None, None)]);
        let mut state = PoolState::default();
        state.allocate(&old, &[], "a", "eth0").unwrap();
        let got = state.allocate(&new, &[], "a", "eth0").unwrap();
        assert_eq!(addresses(&got), ["10.9.0.1/24"]);
        assert_eq!(state.allocations.len(), 1);
    }
}
