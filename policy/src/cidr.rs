//! ipBlock compilation for the datapath's LPM maps, and `PortRuleSet` building.
//!
//! A longest-prefix match returns one entry, but ipBlocks nest (a block, its excepts, other
//! blocks inside them). Flattening makes the single LPM answer exact: every block or except
//! prefix becomes an entry whose value is the union of the rules of every block that contains
//! it and does not except it. An except prefix with no rule left still gets an (empty) entry:
//! that entry is what stops the broader block from matching inside the except.

use std::collections::BTreeSet;

use ipnetwork::IpNetwork;
use moat_common::{MAX_PORT_RULES, PortRule, PortRuleSet};

/// One ipBlock (or a single pod address) with the port rules it allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrItem {
    pub prefix: IpNetwork,
    pub except: Vec<IpNetwork>,
    pub rules: Vec<PortRule>,
}

/// `outer` contains every address of `inner` (same family, shorter or equal prefix).
pub fn net_contains(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4()
        && outer.prefix() <= inner.prefix()
        && outer.contains(inner.network())
}

/// Flattened entries, one per distinct prefix, each with its (unmerged) rules.
pub fn flatten(items: &[CidrItem]) -> Vec<(IpNetwork, Vec<PortRule>)> {
    let boundaries: BTreeSet<IpNetwork> = items
        .iter()
        .flat_map(|i| std::iter::once(i.prefix).chain(i.except.iter().copied()))
        .collect();
    boundaries
        .into_iter()
        .map(|x| {
            let rules = items
                .iter()
                .filter(|i| {
                    net_contains(&i.prefix, &x) && !i.except.iter().any(|e| net_contains(e, &x))
                })
                .flat_map(|i| i.rules.iter().copied())
                .collect();
            (x, rules)
        })
        .collect()
}

/// Rule `a` makes rule `b` redundant: same tier, covers b's protocol and ports, and either
/// (NetworkPolicy tier) has the same action, or (ClusterNetworkPolicy tiers, where the first
/// matching rule decides) comes first, whatever its action.
fn subsumes(a: &PortRule, b: &PortRule) -> bool {
    let covers = (a.proto == 0 || a.proto == b.proto)
        && a.port_start <= b.port_start
        && b.port_end <= a.port_end;
    let decides = if a.tier == moat_common::TIER_NETPOL {
        a.action == b.action
    } else {
        a.rule_id <= b.rule_id
    };
    a.tier == b.tier && covers && decides
}

/// Packs rules into a `PortRuleSet`: duplicates and subsumed rules go first (the lowest rule
/// id is kept, so explanations stay stable); only if still over the limit are overlapping or
/// adjacent ranges of one protocol merged. Err(count) if even that does not fit.
pub fn build_rule_set(mut rules: Vec<PortRule>) -> Result<PortRuleSet, usize> {
    rules.sort_by_key(|r| (r.rule_id, r.proto, r.port_start, r.port_end, r.action));
    let mut kept: Vec<PortRule> = Vec::new();
    for r in rules {
        // Earlier (lower rule id) rules win ties: drop r if something kept covers it, and
        // drop kept rules that r strictly covers.
        if kept.iter().any(|k| subsumes(k, &r)) {
            continue;
        }
        kept.retain(|k| !subsumes(&r, k));
        kept.push(r);
    }
    if kept.len() > MAX_PORT_RULES {
        kept.sort_by_key(|r| (r.action, r.proto, r.port_start, r.port_end, r.rule_id));
        let mut merged: Vec<PortRule> = Vec::new();
        for r in kept {
            match merged.last_mut() {
                // Only NetworkPolicy-tier rules merge: in the ordered tiers a merged range
                // would move rules past others.
                Some(m)
                    if m.action == r.action
                        && m.tier == moat_common::TIER_NETPOL
                        && r.tier == moat_common::TIER_NETPOL
                        && m.proto == r.proto
                        && u32::from(r.port_start) <= u32::from(m.port_end) + 1 =>
                {
                    m.port_end = m.port_end.max(r.port_end);
                    m.rule_id = m.rule_id.min(r.rule_id);
                }
                _ => merged.push(r),
            }
        }
        kept = merged;
        kept.sort_by_key(|r| (r.rule_id, r.proto, r.port_start, r.port_end, r.action));
    }
    if kept.len() > MAX_PORT_RULES {
        return Err(kept.len());
    }
    let mut set = PortRuleSet {
        count: kept.len() as u32,
        ..PortRuleSet::default()
    };
    set.rules[..kept.len()].copy_from_slice(&kept);
    Ok(set)
}

/// The rules of a set, as a slice.
pub fn rules_of(set: &PortRuleSet) -> &[PortRule] {
    &set.rules[..(set.count as usize).min(MAX_PORT_RULES)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_common::{ACTION_ALLOW, PROTO_TCP, PROTO_UDP};

    fn rule(rule_id: u32, proto: u8, start: u16, end: u16) -> PortRule {
        PortRule {
            rule_id,
            port_start: start,
            port_end: end,
            proto,
            action: ACTION_ALLOW,
            tier: moat_common::TIER_NETPOL,
            _pad: 0,
        }
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn except_gets_an_entry_even_when_empty() {
        let items = [CidrItem {
            prefix: net("10.0.0.0/8"),
            except: vec![net("10.1.0.0/16")],
            rules: vec![rule(16, 0, 0, 65535)],
        }];
        let flat = flatten(&items);
        assert_eq!(flat.len(), 2);
        assert_eq!(flat[0].0, net("10.0.0.0/8"));
        assert_eq!(flat[0].1.len(), 1);
        assert_eq!(flat[1].0, net("10.1.0.0/16"));
        assert!(flat[1].1.is_empty());
    }

    #[test]
    fn nested_block_inherits_the_rules_of_blocks_around_it() {
        let items = [
            CidrItem {
                prefix: net("10.0.0.0/8"),
                except: vec![net("10.1.0.0/16")],
                rules: vec![rule(16, PROTO_TCP, 80, 80)],
            },
            CidrItem {
                prefix: net("10.1.2.0/24"),
                except: vec![],
                rules: vec![rule(17, PROTO_UDP, 53, 53)],
            },
            CidrItem {
                prefix: net("0.0.0.0/0"),
                except: vec![],
                rules: vec![rule(18, PROTO_TCP, 443, 443)],
            },
        ];
        let flat = flatten(&items);
        let get = |p: &str| flat.iter().find(|(n, _)| *n == net(p)).unwrap().1.clone();
        assert_eq!(
            get("10.1.0.0/16")
                .iter()
                .map(|r| r.rule_id)
                .collect::<Vec<_>>(),
            [18]
        );
        let mut inner: Vec<u32> = get("10.1.2.0/24").iter().map(|r| r.rule_id).collect();
        inner.sort();
        assert_eq!(inner, [17, 18]);
    }

    #[test]
    fn rule_sets_drop_subsumed_rules_and_merge_only_when_needed() {
        let set = build_rule_set(vec![rule(20, PROTO_TCP, 80, 80), rule(16, 0, 0, 65535)]).unwrap();
        assert_eq!(rules_of(&set), &[rule(16, 0, 0, 65535)]);
        let many: Vec<PortRule> = (0..20)
            .map(|i| rule(16 + i, PROTO_TCP, 100 + i as u16, 100 + i as u16))
            .collect();
        let set = build_rule_set(many).unwrap();
        assert_eq!(rules_of(&set), &[rule(16, PROTO_TCP, 100, 119)]);
        let sparse: Vec<PortRule> = (0..20)
            .map(|i| rule(16, PROTO_TCP, 100 + 2 * i as u16, 100 + 2 * i as u16))
            .collect();
        assert_eq!(build_rule_set(sparse), Err(20));
    }
}
