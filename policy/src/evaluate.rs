//! A pure replay of the datapath's verdict for a new flow, on a `DatapathState`: the same
//! lookups in the same order as the eBPF policy code, so `moatctl` can explain a verdict and
//! the conformance cases can run without a kernel. A flow between two pods is judged twice,
//! as the datapath does: egress at the source endpoint, ingress at the destination endpoint.

use std::net::IpAddr;

use moat_common::{
    ACTION_ALLOW, ACTION_DENY, PolicyKey, PortRangeKey, TIER_ADMIN, TIER_BASELINE, TIER_NETPOL,
    reason, rule,
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
    let dir = direction.as_u8();
    let verdict = |allowed, rule_id, reason| DirectionVerdict {
        allowed,
        rule_id,
        reason,
        remote_identity: remote,
    };
    // (a) A pod never blocks its own node (kubelet probes): what the node sends it. What the
    // pod sends the node is policy like any other destination, as in the datapath, which
    // judges a pod's egress to the host by its rules.
    if remote == Identity::HOST && direction == Direction::Ingress {
        return verdict(true, rule::HOST, reason::HOST);
    }
    // (b) Every lookup, in datapath order, collecting (tier, rule_id, action).
    let mut matches: Vec<(u8, u32, u8)> = Vec::new();
    let r = remote.0;
    for (rid, port, p) in [
        (r, dport, proto),
        (r, 0, proto),
        (r, 0, 0),
        (0, dport, proto),
        (0, 0, proto),
        (0, 0, 0),
    ] {
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
                    matches.push((tier, rule_id, action));
                }
            }
        }
    }
    for rid in [r, 0] {
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
                    matches.push((rule.tier, rule.rule_id, rule.action));
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
                matches.push((rule.tier, rule.rule_id, rule.action));
            }
        }
    }
    // (c) The tiers, as the datapath combines them. Admin: the first rule (lowest id)
    // decides unless it passes.
    let first_in = |tier: u8| {
        matches
            .iter()
            .filter(|(t, _, _)| *t == tier)
            .min_by_key(|(_, rid, _)| *rid)
            .map(|(_, rid, action)| (*rid, *action))
    };
    match first_in(TIER_ADMIN) {
        Some((rid, ACTION_ALLOW)) => return verdict(true, rid, reason::ADMIN_ACCEPT),
        Some((rid, ACTION_DENY)) => return verdict(false, rid, reason::ADMIN_DENY),
        _ => {}
    }
    // NetworkPolicy: deny wins, then the first allow, else default deny.
    let netpol = || matches.iter().filter(|(t, _, _)| *t == TIER_NETPOL);
    if let Some((_, rid, _)) = netpol().find(|(_, _, a)| *a == ACTION_DENY) {
        return verdict(false, *rid, reason::POLICY_DENY);
    }
    match netpol().find(|(_, _, a)| *a == ACTION_ALLOW) {
        // Not isolated by any NetworkPolicy: the Baseline tier may still decide.
        Some((_, rule::NOT_ISOLATED, _)) => match first_in(TIER_BASELINE) {
            Some((rid, ACTION_ALLOW)) => verdict(true, rid, reason::BASELINE_ACCEPT),
            Some((rid, ACTION_DENY)) => verdict(false, rid, reason::BASELINE_DENY),
            _ => verdict(true, rule::NOT_ISOLATED, reason::POLICY_ALLOW),
        },
        Some((_, rid, _)) => verdict(true, *rid, reason::POLICY_ALLOW),
        None => verdict(false, rule::NONE, reason::DEFAULT_DENY),
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
    let (src, dst) = addresses(state, from, to)?;
    let src_id = ipcache_lookup(state, src);
    let dst_id = ipcache_lookup(state, dst);
    let endpoint = |end: &FlowEnd| match end {
        FlowEnd::Pod(r) => state.endpoints.get(r),
        FlowEnd::Address(_) => None,
    };
    let egress = endpoint(from).map(|e| {
        lookup(
            state,
            e.policy_id,
            dst_id,
            dst,
            Direction::Egress,
            proto,
            port,
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
