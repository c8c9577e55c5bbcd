//! The verdict for a new flow: which rule, if any, admits it.
//!
//! Lookup order (most specific first), for local policy id P, remote identity R, direction D,
//! protocol p, destination port d; 0 is the wildcard:
//!   1. MOAT_POLICY (P, R, d, p, D)     identity + protocol + port
//!   2. MOAT_POLICY (P, R, 0, p, D)     identity + protocol
//!   3. MOAT_POLICY (P, R, 0, 0, D)     identity only
//!   4. MOAT_POLICY (P, *, d, p, D)     any identity + protocol + port
//!   5. MOAT_POLICY (P, *, 0, p, D)     any identity + protocol
//!   6. MOAT_POLICY (P, *, 0, 0, D)     allow-all (also: endpoint not isolated)
//!   7. MOAT_PORTRANGES (P, R, p, D) then (P, *, p, D): endPort ranges
//!   8. MOAT_CIDR4/6 longest prefix of the remote address under (P, D): ipBlocks
//!   9. for egress of an endpoint with FQDN rules, each FQDN selector S the destination
//!      address was learned for (see fqdn.rs): MOAT_POLICY (P, S, d, p, D), (P, S, 0, p, D),
//!      (P, S, 0, 0, D), and MOAT_PORTRANGES (P, S, p, D). FQDN rules only allow, so the
//!      first allow is kept.
//! Each step yields up to three tiers' answers (see `PolicyValue`). They combine as the
//! tiers are judged:
//!   Admin ClusterNetworkPolicy: the first matching rule (lowest id over all steps) decides
//!     if it accepts or denies; a Pass, or no match, hands over to
//!   NetworkPolicy (and MoatPolicy): a DENY found at any step wins over every ALLOW (an
//!     explicit deny is absolute); otherwise the first ALLOW in step order names the rule;
//!     otherwise default deny. The NOT_ISOLATED allow (no NetworkPolicy selects the endpoint
//!     in this direction) hands over to
//!   Baseline ClusterNetworkPolicy: the first matching rule decides if it accepts or denies;
//!     a Pass, or no match, leaves the NOT_ISOLATED allow.
//! Every step is a constant-time hash or a bounded LPM walk, so the cost of a verdict does
//! not grow with the number of rules or policies, in any tier.

use moat_common::{
    ACTION_ALLOW, ACTION_DENY, CIDR_KEY_FIXED_BITS, CidrKeyV4, CidrKeyV6, DIRECTION_EGRESS,
    ENDPOINT_FLAG_FQDN, ENDPOINT_FLAG_NO_CIDR, ENDPOINT_FLAG_NO_DENY, ENDPOINT_FLAG_NO_RANGES,
    FAMILY_V4, IDENTITY_ANY, MAX_FQDN_SELECTORS, MAX_PORT_RULES, PolicyKey, PortRangeKey,
    PortRuleSet, TIER_ADMIN, TIER_BASELINE, TIER_NETPOL, reason, rule,
};

use aya_ebpf::{helpers::bpf_loop, maps::lpm_trie::Key as LpmKey};
use core::ffi::c_void;

use crate::{
    maps::{CIDR_V4, CIDR_V6, POLICY, PORT_RANGES},
    scratch::{self, FqdnWalk, LOOKUP_SLOTS, Lookups, SCRATCH_LOOKUPS},
};

pub struct Decision {
    pub allowed: bool,
    pub reason: u8,
    pub rule_id: u32,
}

#[inline(always)]
fn pack(action: u8, rule_id: u32) -> u64 {
    ((action as u64) << 32) | rule_id as u64
}

/// Keeps in `acc` whichever of it and (action, rule_id) comes first in its tier (the lower
/// rule id); action 0 is no match.
#[inline(always)]
fn first_in_tier(acc: *mut u64, action: u8, rule_id: u32) {
    if action == 0 {
        return;
    }
    let current = scratch::get(acc);
    if current == 0 || rule_id < current as u32 {
        scratch::put(acc, pack(action, rule_id));
    }
}

/// One MOAT_POLICY lookup: folds the Admin and Baseline answers into `lookups` and returns
/// the NetworkPolicy tier's, packed.
#[inline(always)]
fn exact(
    lookups: *mut Lookups,
    policy_id: u32,
    remote: u32,
    dport: u16,
    proto: u8,
    direction: u8,
) -> u64 {
    let key = PolicyKey {
        policy_id,
        remote_identity: remote,
        dport,
        proto,
        direction,
    };
    match unsafe { POLICY.get(&key) } {
        Some(value) => {
            unsafe {
                first_in_tier(&mut (*lookups).admin, value.admin_action, value.admin_rule);
                first_in_tier(
                    &mut (*lookups).baseline,
                    value.baseline_action,
                    value.baseline_rule,
                );
            }
            pack(value.action, value.rule_id)
        }
        None => 0,
    }
}

/// Scans a rule set for rules covering (proto, dport): NetworkPolicy-tier rules into `slot`
/// (the first deny, else the first allow), Admin and Baseline rules into their running
/// firsts. `match_proto` is false for the range map, whose key already fixes the protocol.
/// The running results live in scratch memory so that loop iterations that differ only in
/// them are merged by the verifier.
#[inline(always)]
fn scan(
    lookups: *mut Lookups,
    slot: *mut u64,
    set: &PortRuleSet,
    proto: u8,
    dport: u16,
    match_proto: bool,
) {
    scratch::put(slot, 0);
    let count = set.count as usize;
    for i in 0..MAX_PORT_RULES {
        if i >= count {
            break;
        }
        let r = &set.rules[i];
        let proto_ok = !match_proto || r.proto == 0 || r.proto == proto;
        if proto_ok && r.port_start <= dport && dport <= r.port_end {
            if r.tier == TIER_NETPOL {
                let current = (scratch::get(slot) >> 32) as u8;
                if (r.action == ACTION_DENY && current != ACTION_DENY)
                    || (r.action == ACTION_ALLOW && current == 0)
                {
                    scratch::put(slot, pack(r.action, r.rule_id));
                }
            } else if r.tier == TIER_ADMIN {
                unsafe { first_in_tier(&mut (*lookups).admin, r.action, r.rule_id) };
            } else if r.tier == TIER_BASELINE {
                unsafe { first_in_tier(&mut (*lookups).baseline, r.action, r.rule_id) };
            }
        }
    }
}

#[inline(always)]
fn ranges(
    lookups: *mut Lookups,
    slot: *mut u64,
    policy_id: u32,
    remote: u32,
    dport: u16,
    proto: u8,
    direction: u8,
) {
    let key = PortRangeKey {
        policy_id,
        remote_identity: remote,
        proto,
        direction,
        _pad: [0; 2],
    };
    match unsafe { PORT_RANGES.get(&key) } {
        Some(set) => scan(lookups, slot, set, proto, dport, false),
        None => scratch::put(slot, 0),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cidr(
    lookups: *mut Lookups,
    slot: *mut u64,
    policy_id: u32,
    family: u8,
    remote_addr: &[u32; 4],
    dport: u16,
    proto: u8,
    direction: u8,
) {
    let set = if family == FAMILY_V4 {
        let key = LpmKey::new(
            CIDR_KEY_FIXED_BITS + 32,
            CidrKeyV4 {
                policy_id: policy_id.to_be_bytes(),
                direction,
                _pad: [0; 3],
                addr: remote_addr[0].to_ne_bytes(),
            },
        );
        CIDR_V4.get(&key)
    } else {
        let key = LpmKey::new(
            CIDR_KEY_FIXED_BITS + 128,
            CidrKeyV6 {
                policy_id: policy_id.to_be_bytes(),
                direction,
                _pad: [0; 3],
                addr: crate::endpoint::v6_bytes(remote_addr),
            },
        );
        CIDR_V6.get(&key)
    };
    match set {
        Some(set) => scan(lookups, slot, set, proto, dport, true),
        None => scratch::put(slot, 0),
    }
}

/// Judges a new flow of the endpoint with `policy_id` against the remote peer.
/// `family_hints` is the address family in the low byte and the endpoint's
/// ENDPOINT_FLAG_NO_* hints in the next (five arguments is the limit for a BPF call).
#[inline(never)]
pub fn decide(
    policy_id: u32,
    remote_identity: u32,
    family_hints: u32,
    remote_addr: &[u32; 4],
    proto_port: u32,
) -> Decision {
    let family = family_hints as u8;
    let hints = (family_hints >> 8) as u8;
    // Packed to stay within five arguments: direction << 24 | proto << 16 | dport.
    let direction = (proto_port >> 24) as u8;
    let proto = (proto_port >> 16) as u8;
    let dport = proto_port as u16;
    let Some(lookups) = SCRATCH_LOOKUPS.get_ptr_mut(0) else {
        return Decision {
            allowed: false,
            reason: reason::DEFAULT_DENY,
            rule_id: rule::NONE,
        };
    };
    let slots = unsafe { &mut (*lookups).slots };
    unsafe {
        scratch::put(&mut (*lookups).admin, 0);
        scratch::put(&mut (*lookups).baseline, 0);
        scratch::put(&mut (*lookups).hints, hints as u32);
    }
    let p = policy_id;
    let d = direction;
    let r = remote_identity;
    // Without deny entries the first allow is the answer: the rest is skipped.
    macro_rules! step {
        ($slot:expr, $remote:expr, $port:expr, $protocol:expr) => {
            let found = exact(lookups, p, $remote, $port, $protocol, d);
            if (found >> 32) as u8 == ACTION_ALLOW && hint(lookups, ENDPOINT_FLAG_NO_DENY) {
                return Decision {
                    allowed: true,
                    reason: reason::POLICY_ALLOW,
                    rule_id: found as u32,
                };
            }
            scratch::put(&mut slots[$slot], found);
        };
    }
    step!(0, r, dport, proto);
    step!(1, r, 0, proto);
    step!(2, r, 0, 0);
    step!(3, IDENTITY_ANY, dport, proto);
    step!(4, IDENTITY_ANY, 0, proto);
    step!(5, IDENTITY_ANY, 0, 0);
    if !hint(lookups, ENDPOINT_FLAG_NO_RANGES) {
        ranges(lookups, &mut slots[6], p, r, dport, proto, d);
        ranges(lookups, &mut slots[7], p, IDENTITY_ANY, dport, proto, d);
    } else {
        scratch::put(&mut slots[6], 0);
        scratch::put(&mut slots[7], 0);
    }
    if !hint(lookups, ENDPOINT_FLAG_NO_CIDR) {
        cidr(
            lookups,
            &mut slots[8],
            p,
            family,
            remote_addr,
            dport,
            proto,
            d,
        );
    } else {
        scratch::put(&mut slots[8], 0);
    }
    scratch::put(&mut slots[9], 0);
    scratch::put(&mut slots[10], 0);
    if direction == DIRECTION_EGRESS && hint(lookups, ENDPOINT_FLAG_FQDN) {
        fqdn_steps(
            lookups,
            p,
            dport,
            proto,
            !hint(lookups, ENDPOINT_FLAG_NO_RANGES),
        );
    }

    // Admin tier: its first rule decides unless it passes.
    let admin = unsafe { scratch::get(&(*lookups).admin) };
    if let Some(decision) = tier_decision(admin, reason::ADMIN_ACCEPT, reason::ADMIN_DENY) {
        return decision;
    }

    // NetworkPolicy tier: deny anywhere wins; else the first allow in lookup order names
    // the rule.
    let decision = unsafe { &mut (*lookups).decision };
    scratch::put(decision, (reason::DEFAULT_DENY as u64) << 32);
    for i in 0..LOOKUP_SLOTS {
        let found = scratch::get(&slots[i]);
        let action = (found >> 32) as u8;
        let current = scratch::get(decision);
        if action == ACTION_DENY && (current >> 32) as u8 != reason::POLICY_DENY {
            scratch::put(
                decision,
                ((reason::POLICY_DENY as u64) << 32) | (found & 0xffff_ffff),
            );
        } else if action == ACTION_ALLOW && (current >> 32) as u8 == reason::DEFAULT_DENY {
            scratch::put(
                decision,
                (1u64 << 40) | ((reason::POLICY_ALLOW as u64) << 32) | (found & 0xffff_ffff),
            );
        }
    }
    let packed = scratch::get(decision);

    // Baseline tier: only for an endpoint no NetworkPolicy isolates in this direction.
    if packed as u32 == rule::NOT_ISOLATED && (packed >> 32) as u8 == reason::POLICY_ALLOW {
        let baseline = unsafe { scratch::get(&(*lookups).baseline) };
        if let Some(decision) =
            tier_decision(baseline, reason::BASELINE_ACCEPT, reason::BASELINE_DENY)
        {
            return decision;
        }
    }
    Decision {
        allowed: (packed >> 40) & 1 == 1,
        reason: (packed >> 32) as u8,
        rule_id: packed as u32,
    }
}

/// Whether the endpoint's hints (ENDPOINT_FLAG_NO_*, FQDN) include `flag`, read from scratch
/// memory each time: a hint kept in a register carries what each test learned about its bits
/// into everything after it, and the verifier walks the rest of `decide` once per
/// combination of them instead of once.
#[inline(always)]
fn hint(lookups: *mut Lookups, flag: u8) -> bool {
    let hints: u32 = unsafe { scratch::get(&(*lookups).hints) };
    hints & flag as u32 != 0
}

/// The FQDN selectors staged for this flow (consumed: cleared as read), each looked up like
/// a remote identity: its exact entries (first NetworkPolicy-tier allow into slot 9) and,
/// unless the endpoint has none, its port ranges (first allow into slot 10); the cluster
/// tiers' answers fold into their running firsts. FQDN rules only allow.
///
/// One selector per `bpf_loop` step: the verifier checks the step once, where the unrolled
/// loop cost it a third of the program's budget (four copies, each on every path into it).
#[inline(always)]
fn fqdn_steps(lookups: *mut Lookups, policy_id: u32, dport: u16, proto: u8, with_ranges: bool) {
    unsafe {
        scratch::put(
            &mut (*lookups).fqdn_walk,
            FqdnWalk {
                policy_id,
                dport,
                proto,
                with_ranges: with_ranges as u8,
            },
        );
        bpf_loop(
            MAX_FQDN_SELECTORS as u32,
            fqdn_selector_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
}

/// Step `index` of `fqdn_steps`: selector `index`, or the end at the first 0.
extern "C" fn fqdn_selector_step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(lookups) = SCRATCH_LOOKUPS.get_ptr_mut(0) else {
        return 1;
    };
    let i = index as usize & (MAX_FQDN_SELECTORS - 1);
    let selector = unsafe { scratch::get(&(*lookups).fqdn[i]) };
    if selector == 0 {
        return 1;
    }
    unsafe { scratch::put(&mut (*lookups).fqdn[i], 0) };
    let walk = unsafe { scratch::get(&(*lookups).fqdn_walk) };
    let slots = unsafe { &mut (*lookups).slots };
    for (port, protocol) in [(walk.dport, walk.proto), (0, walk.proto), (0, 0)] {
        let found = exact(
            lookups,
            walk.policy_id,
            selector,
            port,
            protocol,
            DIRECTION_EGRESS,
        );
        if (found >> 32) as u8 == ACTION_ALLOW && scratch::get(&slots[9]) == 0 {
            scratch::put(&mut slots[9], found);
        }
    }
    if walk.with_ranges != 0 {
        // `decision` is free until the NetworkPolicy tier is combined.
        let found = unsafe { &mut (*lookups).decision };
        ranges(
            lookups,
            found,
            walk.policy_id,
            selector,
            walk.dport,
            walk.proto,
            DIRECTION_EGRESS,
        );
        let found = scratch::get(found);
        if (found >> 32) as u8 == ACTION_ALLOW && scratch::get(&slots[10]) == 0 {
            scratch::put(&mut slots[10], found);
        }
    }
    0
}

/// A cluster tier's verdict from its first rule, packed as (action << 32) | rule_id: Accept
/// and Deny decide; a Pass, or no rule, hands the flow to the next tier (None).
#[inline(always)]
fn tier_decision(first: u64, accept: u8, deny: u8) -> Option<Decision> {
    let action = (first >> 32) as u8;
    if action != ACTION_ALLOW && action != ACTION_DENY {
        return None;
    }
    let allowed = action == ACTION_ALLOW;
    Some(Decision {
        allowed,
        reason: if allowed { accept } else { deny },
        rule_id: first as u32,
    })
}

/// Packs the family and an endpoint's lookup hints into `decide`'s third argument.
#[inline(always)]
pub fn family_hints(family: u8, endpoint_flags: u8) -> u32 {
    family as u32 | ((endpoint_flags as u32) << 8)
}

/// Packs direction, protocol and port into `decide`'s last argument.
#[inline(always)]
pub fn proto_port(direction: u8, proto: u8, dport: u16) -> u32 {
    ((direction as u32) << 24) | ((proto as u32) << 16) | dport as u32
}
