//! A pure replay of the datapath's verdict for a new flow, on a `DatapathState`: the same
//! lookups in the same order as the eBPF policy code, so `moatctl` can explain a verdict and
//! the conformance cases can run without a kernel. A flow between two pods is judged twice,
//! as the datapath does: egress at the source endpoint, ingress at the destination endpoint.
//!
//! DNS-name rules: `evaluate_learned` judges a flow to an address the datapath learned from
//! DNS answers to the source pod for some names. Each name gives the selector identities of
//! the patterns it matches for the pod's identity (`DatapathState::fqdn_selectors_for`, the
//! MOAT_FQDNPAT lookups), and the egress lookup then collects the entries of those selectors
//! beside the address's own identity's before the tiers decide: a learned address is one
//! more remote identity, so an Admin Deny of its network still wins over an Accept of its
//! name, and the first rule of a tier is the first whichever way it matched.

use std::net::IpAddr;

use moat_common::{
    ACTION_ALLOW, ACTION_DENY, FQDN_MATCH_EXACT, FQDN_MATCH_SUBDOMAIN, FqdnPatternKey, PolicyKey,
    PortRangeKey, TIER_ADMIN, TIER_BASELINE, TIER_NETPOL, fqdn_name_hash, reason, rule,
};
use serde::Serialize;

use crate::cidr::rules_of;
use crate::compile::{DatapathState, PodRef, RuleRef};
use crate::error::Error;
use crate::identity::Identity;
use crate::netpol::Direction;

/// One end of a flow: a pod the state knows, or a bare address (outside, host, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowEnd {
    Pod(PodRef),
    Address(IpAddr),
}

/// The verdict of one direction at one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectionVerdict {
    pub allowed: bool,
    /// moat_common::rule id: a user rule, NOT_ISOLATED, HOST, or NONE for default deny.
    pub rule_id: u32,
    pub reason: u8,
    pub remote_identity: Identity,
    /// When the deciding rule matched through a learned address: the selector identity of
    /// the DNS-name pattern (`DatapathState::fqdn_selectors` names it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fqdn_selector: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// The rule that decided: the dropping direction's, else ingress's, else egress's.
    pub rule_id: u32,
    pub rule: Option<RuleRef>,
    /// Present when the source is a local endpoint.
    pub egress: Option<DirectionVerdict>,
    /// Present when the destination is a local endpoint.
    pub ingress: Option<DirectionVerdict>,
}

/// The identity the ipcache gives an address (longest prefix; 0.0.0.0/0 and ::/0 are world).
pub fn ipcache_lookup(state: &DatapathState, addr: IpAddr) -> Identity {
    state
        .ipcache
        .iter()
        .filter(|(net, _)| net.contains(addr))
        .max_by_key(|(net, _)| net.prefix())
        .map_or(Identity::WORLD, |(_, id)| *id)
}

/// The datapath's policy decision for a new flow at an endpoint with `policy_id`.
pub fn lookup(
    state: &DatapathState,
    policy_id: u32,
    remote: Identity,
    remote_addr: IpAddr,
    direction: Direction,
    proto: u8,
    dport: u16,
) -> DirectionVerdict {
    lookup_learned(
        state,
        policy_id,
        remote,
        remote_addr,
        direction,
        proto,
        dport,
        &[],
    )
}

/// `lookup` for a remote address learned for the DNS-name selectors `selectors` (egress):
/// their identity-keyed entries count as the address's own.
#[allow(clippy::too_many_arguments)]
pub fn lookup_learned(
    state: &DatapathState,
    policy_id: u32,
    remote: Identity,
    remote_addr: IpAddr,
    direction: Direction,
    proto: u8,
    dport: u16,
    selectors: &[u32],
) -> DirectionVerdict {
    let dir = direction.as_u8();
    let verdict = |allowed, rule_id, reason, via: Option<u32>| DirectionVerdict {
        allowed,
        rule_id,
        reason,
        remote_identity: remote,
        fqdn_selector: via,
    };
    // (a) A pod never blocks its own node (kubelet probes): what the node sends it. What the
    // pod sends the node is policy like any other destination, as in the datapath, which
    // judges a pod's egress to the host by its rules.
    if remote == Identity::HOST && direction == Direction::Ingress {
        return verdict(true, rule::HOST, reason::HOST, None);
    }
    // (b) Every lookup, in datapath order, collecting (tier, rule_id, action, selector it
    // matched through); the learned selectors' come after the address's own.
    let mut matches: Vec<(u8, u32, u8, Option<u32>)> = Vec::new();
    let r = remote.0;
    let identity_keys = [
        (r, dport, proto),
        (r, 0, proto),
        (r, 0, 0),
        (0, dport, proto),
        (0, 0, proto),
        (0, 0, 0),
    ]
    .map(|k| (k, None));
    let selector_keys = selectors
        .iter()
        .flat_map(|s| [(*s, dport, proto), (*s, 0, proto), (*s, 0, 0)].map(|k| (k, Some(*s))));
    for ((rid, port, p), via) in identity_keys.into_iter().chain(selector_keys) {
        let key = PolicyKey {
            policy_id,
            remote_identity: rid,
            dport: port,
            proto: p,
            direction: dir,
        };
        if let Some(v) = state.policy.get(&key) {
            for (tier, rule_id, action) in [
                (TIER_NETPOL, v.rule_id, v.action),
                (TIER_ADMIN, v.admin_rule, v.admin_action),
                (TIER_BASELINE, v.baseline_rule, v.baseline_action),
            ] {
                if action != 0 {
                    matches.push((tier, rule_id, action, via));
                }
            }
        }
    }
    let range_remotes = [(r, None), (0, None)]
        .into_iter()
        .chain(selectors.iter().map(|s| (*s, Some(*s))));
    for (rid, via) in range_remotes {
        let key = PortRangeKey {
            policy_id,
            remote_identity: rid,
            proto,
            direction: dir,
            _pad: [0; 2],
        };
        if let Some(set) = state.port_ranges.get(&key) {
            // The key already fixed the protocol; rules only bound the port.
            for rule in rules_of(set) {
                if rule.port_start <= dport && dport <= rule.port_end {
                    matches.push((rule.tier, rule.rule_id, rule.action, via));
                }
            }
        }
    }
    let lpm = match remote_addr {
        IpAddr::V4(a) => state
            .cidr_v4
            .range((policy_id, dir, min_v4())..=(policy_id, dir, max_v4()))
            .filter(|((_, _, net), _)| net.contains(a))
            .max_by_key(|((_, _, net), _)| net.prefix())
            .map(|(_, set)| set),
        IpAddr::V6(a) => state
            .cidr_v6
            .range((policy_id, dir, min_v6())..=(policy_id, dir, max_v6()))
            .filter(|((_, _, net), _)| net.contains(a))
            .max_by_key(|((_, _, net), _)| net.prefix())
            .map(|(_, set)| set),
    };
    if let Some(set) = lpm {
        for rule in rules_of(set) {
            if (rule.proto == 0 || rule.proto == proto)
                && rule.port_start <= dport
                && dport <= rule.port_end
            {
                matches.push((rule.tier, rule.rule_id, rule.action, None));
            }
        }
    }
    // (c) The tiers, as the datapath combines them. Admin: the first rule (lowest id)
    // decides unless it passes.
    let first_in = |tier: u8| {
        matches
            .iter()
            .filter(|(t, _, _, _)| *t == tier)
            .min_by_key(|(_, rid, _, _)| *rid)
            .map(|(_, rid, action, via)| (*rid, *action, *via))
    };
    match first_in(TIER_ADMIN) {
        Some((rid, ACTION_ALLOW, via)) => return verdict(true, rid, reason::ADMIN_ACCEPT, via),
        Some((rid, ACTION_DENY, via)) => return verdict(false, rid, reason::ADMIN_DENY, via),
        _ => {}
    }
    // NetworkPolicy: deny wins, then the first allow, else default deny.
    let netpol = || matches.iter().filter(|(t, _, _, _)| *t == TIER_NETPOL);
    if let Some((_, rid, _, via)) = netpol().find(|(_, _, a, _)| *a == ACTION_DENY) {
        return verdict(false, *rid, reason::POLICY_DENY, *via);
    }
    match netpol().find(|(_, _, a, _)| *a == ACTION_ALLOW) {
        // Not isolated by any NetworkPolicy: the Baseline tier may still decide.
        Some((_, rule::NOT_ISOLATED, _, _)) => match first_in(TIER_BASELINE) {
            Some((rid, ACTION_ALLOW, via)) => verdict(true, rid, reason::BASELINE_ACCEPT, via),
            Some((rid, ACTION_DENY, via)) => verdict(false, rid, reason::BASELINE_DENY, via),
            _ => verdict(true, rule::NOT_ISOLATED, reason::POLICY_ALLOW, None),
        },
        Some((_, rid, _, via)) => verdict(true, *rid, reason::POLICY_ALLOW, *via),
        None => verdict(false, rule::NONE, reason::DEFAULT_DENY, None),
    }
}

impl DatapathState {
    /// The rule a verdict names: a ClusterNetworkPolicy rule when the reason is one of the
    /// tiers', else a NetworkPolicy or MoatPolicy rule.
    pub fn rule_for(&self, reason: u8, rule_id: u32) -> Option<&RuleRef> {
        let tier = match reason {
            reason::ADMIN_ACCEPT | reason::ADMIN_DENY => TIER_ADMIN,
            reason::BASELINE_ACCEPT | reason::BASELINE_DENY => TIER_BASELINE,
            _ => return self.rules.get(&rule_id),
        };
        self.cluster_rules.get(&(tier, rule_id))
    }

    /// The selector identities a pod of `identity` learns an answer to `name` for, as the
    /// datapath finds them in MOAT_FQDNPAT: (identity, EXACT, hash of the name), then
    /// (identity, SUBDOMAIN, hash of each proper suffix at a label boundary). Sorted, without
    /// repeats; empty for a name the datapath would not hash.
    pub fn fqdn_selectors_for(&self, identity: Identity, name: &str) -> Vec<u32> {
        let name = name.strip_suffix('.').unwrap_or(name);
        let key = |kind: u8, text: &str| {
            fqdn_name_hash(text.as_bytes()).map(|name_hash| FqdnPatternKey {
                identity: identity.0,
                kind,
                _pad: [0; 3],
                name_hash,
            })
        };
        if key(FQDN_MATCH_EXACT, name).is_none() {
            return Vec::new();
        }
        let suffixes = name
            .match_indices('.')
            .map(|(i, _)| &name[i + 1..])
            .filter_map(|suffix| key(FQDN_MATCH_SUBDOMAIN, suffix));
        let mut out: Vec<u32> = key(FQDN_MATCH_EXACT, name)
            .into_iter()
            .chain(suffixes)
            .filter_map(|k| self.fqdn_patterns.get(&k).copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn min_v4() -> ipnetwork::Ipv4Network {
    ipnetwork::Ipv4Network::new(0.into(), 0).expect("valid")
}
fn max_v4() -> ipnetwork::Ipv4Network {
    ipnetwork::Ipv4Network::new(u32::MAX.into(), 32).expect("valid")
}
fn min_v6() -> ipnetwork::Ipv6Network {
    ipnetwork::Ipv6Network::new(0.into(), 0).expect("valid")
}
fn max_v6() -> ipnetwork::Ipv6Network {
    ipnetwork::Ipv6Network::new(u128::MAX.into(), 128).expect("valid")
}

/// Picks the addresses a flow between the two ends uses: the family both ends have,
/// IPv4 first.
fn addresses(
    state: &DatapathState,
    from: &FlowEnd,
    to: &FlowEnd,
) -> Result<(IpAddr, IpAddr), Error> {
    let ips = |end: &FlowEnd| -> Result<Vec<IpAddr>, Error> {
        match end {
            FlowEnd::Address(a) => Ok(vec![*a]),
            FlowEnd::Pod(r) => state
                .endpoints
                .get(r)
                .map(|e| e.ips.clone())
                .ok_or_else(|| Error::UnknownPod(r.to_string())),
        }
    };
    let (a, b) = (ips(from)?, ips(to)?);
    for want_v4 in [true, false] {
        let x = a.iter().find(|ip| ip.is_ipv4() == want_v4);
        let y = b.iter().find(|ip| ip.is_ipv4() == want_v4);
        if let (Some(x), Some(y)) = (x, y) {
            return Ok((*x, *y));
        }
    }
    let name = match (from, to) {
        (FlowEnd::Pod(r), _) | (_, FlowEnd::Pod(r)) => r.to_string(),
        _ => "address".into(),
    };
    Err(Error::NoAddress(name))
}

/// Would a new flow from `from` to `to` (destination port and IP protocol) be allowed?
pub fn evaluate(
    state: &DatapathState,
    from: &FlowEnd,
    to: &FlowEnd,
    port: u16,
    proto: u8,
) -> Result<Verdict, Error> {
    evaluate_learned(state, from, to, port, proto, &[])
}

/// `evaluate` for a destination address the datapath learned from DNS answers for `names`
/// (to the source pod): egress also consults the DNS-name rules whose patterns match them.
pub fn evaluate_learned(
    state: &DatapathState,
    from: &FlowEnd,
    to: &FlowEnd,
    port: u16,
    proto: u8,
    names: &[&str],
) -> Result<Verdict, Error> {
    let (src, dst) = addresses(state, from, to)?;
    let src_id = ipcache_lookup(state, src);
    let dst_id = ipcache_lookup(state, dst);
    let endpoint = |end: &FlowEnd| match end {
        FlowEnd::Pod(r) => state.endpoints.get(r),
        FlowEnd::Address(_) => None,
    };
    let egress = endpoint(from).map(|e| {
        // Only an endpoint with DNS-name rules (ENDPOINT_FLAG_FQDN) learns addresses.
        let mut selectors: Vec<u32> = names
            .iter()
            .filter(|_| e.fqdn)
            .flat_map(|n| state.fqdn_selectors_for(e.identity, n))
            .collect();
        selectors.sort_unstable();
        selectors.dedup();
        lookup_learned(
            state,
            e.policy_id,
            dst_id,
            dst,
            Direction::Egress,
            proto,
            port,
            &selectors,
        )
    });
    let ingress = endpoint(to).map(|e| {
        lookup(
            state,
            e.policy_id,
            src_id,
            src,
            Direction::Ingress,
            proto,
            port,
        )
    });
    let allowed =
        egress.as_ref().is_none_or(|v| v.allowed) && ingress.as_ref().is_none_or(|v| v.allowed);
    let deciding = [&egress, &ingress]
        .into_iter()
        .flatten()
        .find(|v| !v.allowed)
        .or(ingress.as_ref())
        .or(egress.as_ref());
    let rule_id = deciding.map_or(rule::NONE, |v| v.rule_id);
    Ok(Verdict {
        allowed,
        rule_id,
        rule: deciding.and_then(|v| state.rule_for(v.reason, v.rule_id).cloned()),
        egress,
        ingress,
    })
}
