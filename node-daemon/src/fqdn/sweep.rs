//! Which learned addresses to delete, decided from a snapshot of the maps alone (no I/O, so
//! the rules are tested without a kernel):
//!
//! - an address of an identity that no longer exists on this node goes (nothing can use it,
//!   and the identity may come back with other rules);
//! - an expired address goes (the datapath already ignores it for new flows; connections it
//!   admitted live on in conntrack);
//! - an identity holding more than the cap loses its oldest addresses (`learned_ns`) until it
//!   is at the cap: a pod resolving many names keeps the ones it learned last.
//!
//! At most `budget` deletions per pass, so one pass never holds the maps for long; what is
//! left over goes in the next pass.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use moat_common::FqdnAddr;
use moat_datapath::fqdn::Learned;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// The identity is not on this node any more.
    Gone,
    Expired,
    /// Over `--fqdn-max-per-identity`: the identity's oldest.
    Capped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub identity: u32,
    pub addr: IpAddr,
    pub cause: Cause,
    /// The entry's value in the snapshot (the sweeper deletes only an entry still holding it).
    pub seen: FqdnAddr,
}

/// The rules a pass applies.
#[derive(Clone, Copy, Debug)]
pub struct Limits<'a> {
    pub now_ns: u64,
    pub max_per_identity: usize,
    /// Identities of this node's endpoints; `None` while moatd does not know them yet (start-up
    /// before the datastore synced): then nothing is deleted for being gone.
    pub live: Option<&'a BTreeSet<u32>>,
    pub budget: usize,
}

/// The deletions of one pass: gone and expired entries first, then the cap's.
pub fn plan(entries: &[Learned], limits: Limits) -> Vec<Deletion> {
    let mut out = Vec::new();
    let mut kept: BTreeMap<u32, Vec<&Learned>> = BTreeMap::new();
    for entry in entries {
        let cause = if limits
            .live
            .is_some_and(|live| !live.contains(&entry.identity))
        {
            Some(Cause::Gone)
        } else if entry.value.expires_ns <= limits.now_ns {
            Some(Cause::Expired)
        } else {
            None
        };
        match cause {
            Some(cause) => out.push(Deletion {
                identity: entry.identity,
                addr: entry.addr,
                cause,
                seen: entry.value,
            }),
            None => kept.entry(entry.identity).or_default().push(entry),
        }
    }
    for (identity, mut held) in kept {
        let over = held.len().saturating_sub(limits.max_per_identity);
        if over == 0 {
            continue;
        }
        // Oldest first; the address breaks ties so that a pass is deterministic.
        held.sort_by_key(|e| (e.value.learned_ns, e.addr));
        out.extend(held[..over].iter().map(|e| Deletion {
            identity,
            addr: e.addr,
            cause: Cause::Capped,
            seen: e.value,
        }));
    }
    out.truncate(limits.budget);
    out
}

/// Deletions per cause, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub gone: usize,
    pub expired: usize,
    pub capped: usize,
}

impl SweepStats {
    pub fn of(deletions: &[Deletion]) -> Self {
        let mut s = Self::default();
        for d in deletions {
            match d.cause {
                Cause::Gone => s.gone += 1,
                Cause::Expired => s.expired += 1,
                Cause::Capped => s.capped += 1,
            }
        }
        s
    }

    pub fn total(&self) -> usize {
        self.gone + self.expired + self.capped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(identity: u32, addr: &str, learned_ns: u64, expires_ns: u64) -> Learned {
        Learned {
            identity,
            addr: addr.parse().unwrap(),
            value: FqdnAddr {
                learned_ns,
                expires_ns,
                ..Default::default()
            },
        }
    }

    fn limits(now_ns: u64, max: usize, live: Option<&BTreeSet<u32>>) -> Limits<'_> {
        Limits {
            now_ns,
            max_per_identity: max,
            live,
            budget: usize::MAX,
        }
    }

    fn addrs(deletions: &[Deletion], cause: Cause) -> Vec<String> {
        deletions
            .iter()
            .filter(|d| d.cause == cause)
            .map(|d| d.addr.to_string())
            .collect()
    }

    #[test]
    fn expired_entries_go_and_unexpired_ones_stay() {
        let entries = [
            entry(7, "192.0.2.1", 10, 100),
            entry(7, "192.0.2.2", 10, 101),
            entry(7, "2001:db8::1", 10, 99),
        ];
        let d = plan(&entries, limits(100, 10, None));
        assert_eq!(addrs(&d, Cause::Expired), ["192.0.2.1", "2001:db8::1"]);
        assert_eq!(d.len(), 2, "192.0.2.2 expires after now: {d:?}");
    }

    #[test]
    fn an_identity_over_its_cap_loses_its_oldest_across_both_families() {
        let entries = [
            entry(7, "192.0.2.4", 40, u64::MAX),
            entry(7, "2001:db8::1", 10, u64::MAX),
            entry(7, "192.0.2.3", 30, u64::MAX),
            entry(7, "192.0.2.2", 20, u64::MAX),
            // Another identity at its cap is left alone.
            entry(8, "192.0.2.9", 1, u64::MAX),
            entry(8, "192.0.2.8", 2, u64::MAX),
        ];
        let d = plan(&entries, limits(0, 2, None));
        assert_eq!(addrs(&d, Cause::Capped), ["2001:db8::1", "192.0.2.2"]);
        assert!(d.iter().all(|x| x.identity == 7));
    }

    #[test]
    fn expired_entries_do_not_count_against_the_cap() {
        let entries = [
            entry(7, "192.0.2.1", 1, 50),
            entry(7, "192.0.2.2", 2, 500),
            entry(7, "192.0.2.3", 3, 500),
        ];
        let d = plan(&entries, limits(100, 2, None));
        assert_eq!(addrs(&d, Cause::Expired), ["192.0.2.1"]);
        assert!(addrs(&d, Cause::Capped).is_empty(), "{d:?}");
    }

    #[test]
    fn entries_of_identities_gone_from_the_node_go_once_the_node_is_known() {
        let entries = [
            entry(7, "192.0.2.1", 1, u64::MAX),
            entry(9, "192.0.2.2", 1, u64::MAX),
        ];
        let live = BTreeSet::from([7]);
        let d = plan(&entries, limits(0, 10, Some(&live)));
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].identity, d[0].cause), (9, Cause::Gone));
        assert!(
            plan(&entries, limits(0, 10, None)).is_empty(),
            "not before moatd knows its endpoints"
        );
    }

    #[test]
    fn a_pass_stops_at_its_budget_and_the_next_pass_continues() {
        let entries: Vec<Learned> = (0..10u8)
            .map(|i| entry(7, &format!("192.0.2.{i}"), i as u64, 5))
            .collect();
        let first = plan(
            &entries,
            Limits {
                budget: 4,
                ..limits(10, 100, None)
            },
        );
        assert_eq!(first.len(), 4);
        let rest: Vec<Learned> = entries
            .iter()
            .filter(|e| !first.iter().any(|d| d.addr == e.addr))
            .copied()
            .collect();
        assert_eq!(plan(&rest, limits(10, 100, None)).len(), 6);
        assert_eq!(
            SweepStats::of(&first),
            SweepStats {
                expired: 4,
                ..Default::default()
            }
        );
    }
}
