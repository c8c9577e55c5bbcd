//! Moat's datapath entry points. Two attach to a pod's host-side veth (tc `cls_bpf` by
//! default, TCX when the conflist asks): `moat_from_container` at its ingress (what the pod
//! sends, its egress) and `moat_to_container` at its egress (what is delivered to it, its
//! ingress). The third,
//! `moat_after_dnat`, runs in the host's netfilter after DNAT, where a connection to a
//! Service has its real destination.
//! The modules hold the concerns; this file only composes them into a verdict.
#![no_std]
#![no_main]

mod conntrack;
mod deliver;
mod endpoint;
mod events;
mod fqdn;
mod maps;
mod metrics;
mod parse;
mod policy;
mod scratch;
mod threats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, socket_filter},
    programs::{SkBuffContext, TcContext},
};
use moat_common::{
    CONFIG_FLAG_LOG_ALL_ALLOWS, CT_FLAG_FOREIGN_DEST, CT_FLAG_HANDSHAKE_SEEN, CT_FLAG_NOT_ENFORCED,
    CT_FLAG_SERVICE, CT_STATE_CLOSING, CtValue, DIRECTION_EGRESS, DIRECTION_INGRESS,
    ENDPOINT_FLAG_FQDN, ENDPOINT_FLAG_LOG_ALLOWS, ENDPOINT_FLAG_QUARANTINED, EndpointInfo,
    IDENTITY_HOST, IPCACHE_FLAG_SERVICE, MODE_AUDIT, MODE_ENFORCE, MODE_LEARN, PROTO_TCP,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DROP, is_peer_handoff, peer_handoff, reason, rule,
};

use crate::{
    conntrack::{Admission, Lookup},
    events::EventFields,
    parse::{Packet, Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[classifier]
pub fn moat_from_container(ctx: TcContext) -> i32 {
    // Whatever tc_index a packet brings from the pod is not ours: only this hook may hand a
    // packet over to a peer's hook (see `hand_to_peer`). (Under a cls_bpf filter the kernel
    // rewrites tc_index from the classid anyway.)
    unsafe { (*ctx.skb.skb).tc_index = 0 };
    judge(&ctx, DIRECTION_EGRESS)
}

#[classifier]
pub fn moat_to_container(ctx: TcContext) -> i32 {
    // A packet whose sender's hook, on this node, found this endpoint's admission in the
    // flow's linked entry: judged once already, it passes without a second look.
    let skb = ctx.skb.skb;
    let (tc_index, ifindex, len) = unsafe { ((*skb).tc_index, (*skb).ifindex, (*skb).len) };
    if is_peer_handoff(tc_index, ifindex) {
        unsafe { (*skb).tc_index = 0 };
        return pass(reason::PEER_ADMITTED, DIRECTION_INGRESS, len);
    }
    judge(&ctx, DIRECTION_INGRESS)
}

/// The sender's egress for a connection the host DNATed (a Service): kube-proxy has replaced
/// the Service address with the backend it picked, so the real destination is known here.
/// moatd runs this program from an iptables `bpf` match in the mangle table's FORWARD and
/// INPUT chains, for the first packets of DNATed connections only (node-daemon's
/// after_dnat.rs); the packet starts at its IP header. 1 means "drop" (the match hits),
/// 0 lets the packet go on.
#[socket_filter]
pub fn moat_after_dnat(ctx: SkBuffContext) -> i64 {
    // Two stages one after the other, so that their stack frames never add up.
    if !parse_after_dnat(&ctx) {
        return 0;
    }
    after_dnat()
}

/// Leaves the packet in SCRATCH_AFTER_DNAT. False for what is not a TCP/UDP/SCTP/ICMP packet
/// Moat can read: conntrack parsed it to DNAT it, and netfilter judges the rest.
#[inline(never)]
fn parse_after_dnat(ctx: &SkBuffContext) -> bool {
    let Parsed::Ip(pkt) = parse::parse_ip(ctx) else {
        return false;
    };
    let Some(slot) = scratch::SCRATCH_AFTER_DNAT.get_ptr_mut(0) else {
        return false;
    };
    scratch::put(slot, pkt);
    true
}

#[inline(never)]
fn after_dnat() -> i64 {
    let Some(slot) = scratch::SCRATCH_AFTER_DNAT.get_ptr(0) else {
        return 0;
    };
    // Read in place: a copy would cost stack the verifier does not have to give.
    let pkt: &Packet = unsafe { &*slot };
    let sender = endpoint::remote(pkt.family, &pkt.saddr);
    if sender.ifindex == 0 {
        // Not a pod of this node: its own node judged its egress.
        return 0;
    }
    let backend = endpoint::remote(pkt.family, &pkt.daddr);
    if backend.ifindex != 0 {
        // A pod of this node: its hook judges both perimeters (see `new_flow`).
        return 0;
    }
    let Some(ep) = endpoint::endpoint_ref(sender.ifindex) else {
        // Being torn down: its own hook already drops whatever it sends.
        return 0;
    };
    let own = policy::decide(
        ep.policy_id,
        backend.identity,
        policy::family_hints(pkt.family, ep.flags),
        &pkt.daddr,
        policy::proto_port(DIRECTION_EGRESS, pkt.proto, pkt.dport),
    );
    let verdict = Judgement {
        ifindex: sender.ifindex,
        local_identity: ep.identity,
        remote_identity: backend.identity,
        mode: ep.mode,
        direction: DIRECTION_EGRESS,
        allowed: own.allowed,
        reason: own.reason,
        rule_id: own.rule_id,
    };
    let cfg = events::config();
    let now = conntrack::now_ns();
    if verdict.enforced_drop() {
        if is_policy_refusal(verdict.reason) {
            threats::policy_drop_after_dnat(sender.ifindex, now);
        }
        drop_judged(&cfg, pkt, &verdict, now);
        return 1;
    }
    report_admitted(&cfg, pkt, &verdict, ep.flags, DIRECTION_EGRESS, now);
    0
}

/// What the first stage leaves to the next.
enum Tracked {
    /// Decided: the tc verdict.
    Verdict(i32),
    /// The packet starts a flow and policy must decide.
    NeedsPolicy,
    /// A packet of a linked flow, passed by this perimeter, that the peer's perimeter
    /// admitted too (its entry already advanced): deliver it to the peer with this ifindex.
    ToPeer(u32),
}

/// Stages called one after the other rather than nested, so that their stack frames never
/// add up (the verifier allows 512 bytes for the whole call chain).
#[inline(always)]
fn judge(ctx: &TcContext, direction: u8) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let verdict = match track(ctx, ifindex, direction) {
        Tracked::Verdict(verdict) => verdict,
        Tracked::NeedsPolicy => new_flow(ifindex, direction),
        Tracked::ToPeer(peer_ifindex) => to_peer(ctx, peer_ifindex),
    };
    // The detectors' work that `track` only noted, after the verdict and in a function of its
    // own: the verifier then walks the verdict's paths once, not once per note.
    // DNS (the tunnel detector, FQDN learning) in a frame of its own too.
    // The verdict waits in memory meanwhile: see `threats::park_verdict`.
    threats::park_verdict(verdict);
    if threats::noted() && threats::after_verdict(ctx, ifindex, direction as u32) {
        fqdn::after_verdict(
            ctx,
            ifindex,
            direction as u32,
            (threats::parked_verdict() != TC_ACT_SHOT) as u32,
        );
    }
    threats::parked_verdict()
}

/// Direct delivery when the host would route the packet to the peer anyway; otherwise the
/// packet takes the host's stack with the handoff that spares the peer's hook its lookups.
#[inline(always)]
fn to_peer(ctx: &TcContext, peer_ifindex: u32) -> i32 {
    if deliver::enabled(&events::config()) {
        match deliver::to_peer(ctx, peer_ifindex) {
            deliver::Delivery::Direct(redirect) => {
                metrics::count(
                    VERDICT_ALLOW,
                    reason::PEER_DELIVERED,
                    DIRECTION_INGRESS,
                    ctx.len(),
                );
                return redirect;
            }
            deliver::Delivery::ViaNeighbour(redirect) => {
                hand_to_peer(ctx, peer_ifindex);
                return redirect;
            }
            deliver::Delivery::NotDelivered => {}
        }
    }
    hand_to_peer(ctx, peer_ifindex);
    TC_ACT_OK
}

/// Parsing, anti-spoofing and conntrack: everything decided without policy.
#[inline(never)]
fn track(ctx: &TcContext, ifindex: u32, direction: u8) -> Tracked {
    let pkt = match parse::parse(ctx) {
        Parsed::Ip(pkt) => pkt,
        Parsed::Arp => return Tracked::Verdict(pass(reason::NEIGHBOR, direction, ctx.len())),
        Parsed::Unsupported => {
            return Tracked::Verdict(drop_unjudged(reason::UNSUPPORTED_L3, direction, ctx.len()));
        }
        Parsed::Malformed => {
            return Tracked::Verdict(drop_unjudged(reason::MALFORMED, direction, ctx.len()));
        }
        Parsed::FragmentUnknown => {
            return Tracked::Verdict(drop_unjudged(
                reason::FRAGMENT_UNKNOWN,
                direction,
                ctx.len(),
            ));
        }
        Parsed::FragmentStateFull => {
            return Tracked::Verdict(drop_unjudged(reason::STATE_MAP_FULL, direction, ctx.len()));
        }
    };
    if parse::is_neighbor_discovery(&pkt) {
        return Tracked::Verdict(pass(reason::NEIGHBOR, direction, pkt.len));
    }
    // Port 53 either way: read after the verdict (the DNS tunnel detector, FQDN learning),
    // which tells queries from answers. One test here: `track` has no stack to spare.
    if pkt.dport == fqdn::DNS_PORT || pkt.sport == fqdn::DNS_PORT {
        threats::note_dns();
    }
    let now = conntrack::now_ns();
    // Conntrack first: most packets belong to a live flow, and when its entry proves the
    // packet's source the endpoint entry need not be read at all (see `proves_source`).
    let flow = conntrack::flow_key(ifindex, &pkt);
    let mut live = conntrack::find(&flow, now);
    if let Some(entry) = live.as_deref_mut() {
        if conntrack::proves_source(entry, &flow, direction) {
            let was_open = entry.state != CT_STATE_CLOSING;
            let lookup = conntrack::update(entry, &flow, &pkt, now);
            watch_established(entry, &pkt, &lookup, was_open, ifindex, direction);
            let peer_ifindex = entry.peer_ifindex;
            if direction == DIRECTION_EGRESS
                && peer_ifindex != 0
                && pkt.proto == PROTO_TCP
                && advance_peer(peer_ifindex, &pkt, now)
            {
                pass_tracked(lookup, direction, pkt.len);
                return Tracked::ToPeer(peer_ifindex);
            }
            let verdict = pass_tracked(lookup, direction, pkt.len);
            return Tracked::Verdict(verdict);
        }
    }
    let Some(ep) = endpoint::endpoint_ref(ifindex) else {
        // Programs without an endpoint entry: registration has not finished, or teardown
        // has begun. Never fail open.
        let cfg = events::config();
        return Tracked::Verdict(drop_judged(
            &cfg,
            &pkt,
            &unknown_endpoint(ifindex, direction),
            now,
        ));
    };
    if direction == DIRECTION_EGRESS && !endpoint::owns_address(ep, pkt.family, &pkt.saddr) {
        let cfg = events::config();
        let j = Judgement {
            ifindex,
            local_identity: ep.identity,
            remote_identity: 0,
            mode: MODE_ENFORCE,
            direction,
            allowed: false,
            reason: reason::SPOOFED_SOURCE,
            rule_id: rule::NONE,
        };
        threats::note(threats::watch::SPOOFED, 0, 0);
        return Tracked::Verdict(drop_judged(&cfg, &pkt, &j, now));
    }
    if let Some(entry) = live {
        let was_open = entry.state != CT_STATE_CLOSING;
        let lookup = conntrack::update(entry, &flow, &pkt, now);
        watch_established(entry, &pkt, &lookup, was_open, ifindex, direction);
        let verdict = pass_tracked(lookup, direction, pkt.len);
        return Tracked::Verdict(verdict);
    }
    if pkt.icmp_error && conntrack::is_related(ifindex, &pkt, now) {
        threats::note(
            threats::watch::ICMP_REFUSED | refusal_counting(direction, false),
            0,
            0,
        );
        return Tracked::Verdict(pass(reason::RELATED, direction, pkt.len));
    }
    // Hand the packet over through scratch memory: see scratch.rs for why.
    let Some(slot) = scratch::SCRATCH_NEW_FLOW.get_ptr_mut(0) else {
        return Tracked::Verdict(drop_unjudged(reason::STATE_MAP_FULL, direction, pkt.len));
    };
    unsafe {
        scratch::put(&raw mut (*slot).pkt, pkt);
        scratch::put(&raw mut (*slot).ep, *ep);
        scratch::put(&raw mut (*slot).now, now);
    }
    Tracked::NeedsPolicy
}

/// What the detectors learn from a packet of a live flow: a refused probe (a RST answering a
/// SYN, or a FIN, NULL or Xmas probe) and a completed handshake (the SYN-flood detector's other half), noted for
/// `threats::after_verdict`; a few flag tests on every other packet. The work itself
/// happens after `track` returns, whose frame has no stack to spare.
#[inline(always)]
fn watch_established(
    entry: &mut CtValue,
    pkt: &Packet,
    lookup: &Lookup,
    was_open: bool,
    ifindex: u32,
    direction: u8,
) {
    let reply = matches!(lookup, Lookup::Reply);
    if was_open && reply && pkt.tcp_flags & TCP_RST != 0 {
        let how =
            threats::watch::RESET_REFUSED | refusal_counting(direction, entry.peer_ifindex != 0);
        threats::note(how, 0, 0);
        return;
    }
    if threats::completes_handshake(entry, pkt, reply, direction) {
        entry.flags |= CT_FLAG_HANDSHAKE_SEEN;
        let victim = if direction == DIRECTION_INGRESS {
            ifindex
        } else {
            entry.peer_ifindex
        };
        let family_port = (pkt.family as u32) << 16 | pkt.dport as u32;
        threats::note(threats::watch::HANDSHAKE, victim, family_port);
    }
}

/// A refusal (RST or ICMP error) travelling back to a prober is counted once: at the
/// prober's own hook (it arrives there, INGRESS), or at the refusing endpoint's hook when the
/// flow is linked (then the prober's hook never sees the packet) or the prober is not a pod
/// of this node (`threats::refusal::UNLESS_PROBER_LOCAL` leaves that lookup to the rare path).
#[inline(always)]
fn refusal_counting(direction: u8, linked: bool) -> u32 {
    let counted_here = if direction == DIRECTION_INGRESS || linked {
        0
    } else {
        threats::watch::UNLESS_PROBER_LOCAL
    };
    counted_here
}

/// Policy's own refusals (not state, parsing or quarantine drops): what probing looks like.
#[inline(always)]
fn is_policy_refusal(why: u8) -> bool {
    matches!(
        why,
        reason::POLICY_DENY | reason::DEFAULT_DENY | reason::ADMIN_DENY | reason::BASELINE_DENY
    )
}

/// A packet that moves TCP state (SYN, FIN, RST) advances the receiving pod's entry of a
/// linked flow here, exactly as the receiver's own hook would have. False when that entry is
/// gone: the packet is then not handed over, and the receiver's hook judges it in full.
#[inline(always)]
fn advance_peer(peer_ifindex: u32, pkt: &Packet, now: u64) -> bool {
    if pkt.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        return true;
    }
    let peer_flow = conntrack::flow_key(peer_ifindex, pkt);
    let Some(peer_entry) = conntrack::find(&peer_flow, now) else {
        return false;
    };
    conntrack::update(peer_entry, &peer_flow, pkt, now);
    true
}

/// Tells the receiving pod's hook that its perimeter already admitted this packet's flow
/// (when the packet takes the host's stack rather than direct delivery).
#[inline(always)]
fn hand_to_peer(ctx: &TcContext, peer_ifindex: u32) {
    let handoff = peer_handoff(peer_ifindex);
    // TCX leaves tc_index as the program wrote it. A cls_bpf filter's verdict rewrites it
    // from the classid when the program returns (tc_run: tc_index = TC_H_MIN(classid)), and
    // a direct-action program's classid is what it writes to tc_classid: set both.
    unsafe {
        (*ctx.skb.skb).tc_index = handoff;
        (*ctx.skb.skb).tc_classid = handoff;
    }
}

/// One perimeter's decision about a new flow, with what an event needs to explain it.
struct Judgement {
    ifindex: u32,
    local_identity: u32,
    remote_identity: u32,
    mode: u8,
    direction: u8,
    allowed: bool,
    reason: u8,
    rule_id: u32,
}

impl Judgement {
    /// Enforce mode turns a refusal into a drop; audit and learn let it through.
    #[inline(always)]
    fn enforced_drop(&self) -> bool {
        !self.allowed && self.mode != MODE_AUDIT && self.mode != MODE_LEARN
    }
}

#[inline(always)]
fn unknown_endpoint(ifindex: u32, direction: u8) -> Judgement {
    Judgement {
        ifindex,
        local_identity: 0,
        remote_identity: 0,
        mode: MODE_ENFORCE,
        direction,
        allowed: false,
        reason: reason::UNKNOWN_ENDPOINT,
        rule_id: rule::NONE,
    }
}

/// Judges the first packet of a flow (left in SCRATCH_NEW_FLOW) against policy.
#[inline(never)]
fn new_flow(ifindex: u32, direction: u8) -> i32 {
    let Some(slot) = scratch::SCRATCH_NEW_FLOW.get_ptr(0) else {
        return TC_ACT_SHOT;
    };
    // Read in place: a copy would cost stack the verifier does not have to give.
    let handover = unsafe { &*slot };
    let pkt: &Packet = &handover.pkt;
    let ep = &handover.ep;
    let now = handover.now;
    let flow = conntrack::flow_key(ifindex, pkt);
    let key = &flow;
    let cfg = events::config();
    let remote_addr = if direction == DIRECTION_EGRESS {
        pkt.daddr
    } else {
        pkt.saddr
    };
    let remote = endpoint::remote(pkt.family, &remote_addr);

    // Quarantine comes before everything else, Services and the node included: only the
    // allowance (DNS by default) leaves, nothing enters.
    if ep.flags & ENDPOINT_FLAG_QUARANTINED != 0 && threats::quarantine_blocks(pkt, direction) {
        return quarantine_drop(ifindex, direction, remote.identity);
    }

    // A Service address has no identity of its own: the host's DNAT picks the backend after
    // this hook. Record the tuple (so the un-NATed reply is recognised) and let the backend's
    // own hook (a pod of this node) or `moat_after_dnat` (anything else) judge the sender's
    // egress against the real destination.
    if direction == DIRECTION_EGRESS && remote.flags & IPCACHE_FLAG_SERVICE != 0 {
        let admission = Admission {
            direction,
            remote_identity: remote.identity,
            rule_id: rule::NONE,
            flags: CT_FLAG_SERVICE,
            peer_ifindex: 0,
        };
        if conntrack::create(key, pkt, now, &admission).is_err() {
            return drop_judged(&cfg, pkt, &state_full(ifindex, ep, direction), now);
        }
        return pass(reason::SERVICE_DEFERRED, direction, pkt.len);
    }

    // An entry made for a packet that came in addressed to someone else proves nothing about
    // the source of what the endpoint sends back (see `conntrack::proves_source`).
    let foreign =
        if direction == DIRECTION_INGRESS && !endpoint::owns_address(ep, pkt.family, &pkt.daddr) {
            CT_FLAG_FOREIGN_DEST
        } else {
            0
        };

    // A pod can never block its own node (kubelet probes).
    if direction == DIRECTION_INGRESS && remote.identity == IDENTITY_HOST {
        let admission = Admission {
            direction,
            remote_identity: remote.identity,
            rule_id: rule::HOST,
            flags: foreign,
            peer_ifindex: 0,
        };
        if conntrack::create(key, pkt, now, &admission).is_err() {
            return drop_judged(&cfg, pkt, &state_full(ifindex, ep, direction), now);
        }
        return pass(reason::HOST, direction, pkt.len);
    }

    if direction == DIRECTION_EGRESS && ep.flags & ENDPOINT_FLAG_FQDN != 0 {
        fqdn::stage_selectors();
    }
    let own = policy::decide(
        ep.policy_id,
        remote.identity,
        policy::family_hints(pkt.family, ep.flags),
        &remote_addr,
        policy::proto_port(direction, pkt.proto, pkt.dport),
    );
    // The staged selectors belong to this decision only: `decide` may have returned before
    // reading them (the first allow, when no deny exists), and a later decision in this run
    // (a local sender's egress, judged below) must not find them.
    if direction == DIRECTION_EGRESS
        && unsafe { core::ptr::read_volatile(&ep.flags) } & ENDPOINT_FLAG_FQDN != 0
    {
        fqdn::clear_staged();
    }
    let mut verdict = Judgement {
        ifindex,
        local_identity: ep.identity,
        remote_identity: remote.identity,
        mode: ep.mode,
        direction,
        allowed: own.allowed,
        reason: own.reason,
        rule_id: own.rule_id,
    };

    // A local sender's egress policy is judged here too: when it connected through a
    // Service, its own hook saw only the ClusterIP. When its hook saw this very tuple (a
    // direct connection), that hook already judged it and recorded the flow.
    let local_sender =
        !verdict.enforced_drop() && direction == DIRECTION_INGRESS && remote.ifindex != 0;
    let sender_entry = if local_sender {
        conntrack::started(remote.ifindex, pkt, now)
    } else {
        None
    };
    if local_sender && sender_entry.is_none() {
        if let Some(sender) = endpoint::endpoint_ref(remote.ifindex) {
            let theirs = policy::decide(
                sender.policy_id,
                ep.identity,
                // Never FQDN selectors: they are staged only for a decision taken at the
                // sender's own hook, and none is staged here. Saying so spares the verifier
                // the selector walk on this path (about half of this program's cost).
                policy::family_hints(pkt.family, sender.flags & !ENDPOINT_FLAG_FQDN),
                &pkt.daddr,
                policy::proto_port(DIRECTION_EGRESS, pkt.proto, pkt.dport),
            );
            let sender_verdict = Judgement {
                ifindex: remote.ifindex,
                local_identity: sender.identity,
                remote_identity: ep.identity,
                mode: sender.mode,
                direction: DIRECTION_EGRESS,
                allowed: theirs.allowed,
                reason: theirs.reason,
                rule_id: theirs.rule_id,
            };
            // Report the more severe of the two: an enforced drop, else a would-be drop.
            if sender_verdict.enforced_drop() || (verdict.allowed && !sender_verdict.allowed) {
                verdict = sender_verdict;
            }
        }
    }

    threats::note_judged(judged_facts(&verdict, direction, remote.ifindex));
    threats::judged_new_flow(ifindex, now);
    if verdict.enforced_drop() {
        return drop_judged(&cfg, pkt, &verdict, now);
    }
    // Read again rather than kept: a value kept alive would double the paths the verifier
    // walks through the policy lookups.
    if verdict.allowed
        && unsafe { core::ptr::read_volatile(&ep.flags) } & ENDPOINT_FLAG_QUARANTINED != 0
    {
        verdict.reason = reason::QUARANTINE_ALLOWED;
    }

    let ct_flags = foreign
        | if verdict.allowed {
            0
        } else {
            CT_FLAG_NOT_ENFORCED
        };
    // Both perimeters of a direct TCP connection between two pods of this node have now
    // admitted the same tuple: link the two entries, so that from here on each packet is
    // judged at the sender's hook only, which delivers it into the receiving pod (deliver.rs)
    // or hands it to the receiver's hook (see `hand_to_peer`). Not DNS: its answers must
    // reach the asker's own hook, which learns FQDN addresses from them. TCP only, because its answers keep both entries alive; a one-way
    // UDP stream would let the receiver's entry expire unseen.
    let mut linked = match sender_entry {
        Some(sender)
            if pkt.proto == PROTO_TCP
                && foreign == 0
                && sender.direction == DIRECTION_EGRESS
                && pkt.dport != fqdn::DNS_PORT =>
        {
            Some(sender)
        }
        _ => None,
    };
    let peer_ifindex = if linked.is_some() { remote.ifindex } else { 0 };
    let admission = Admission {
        direction,
        remote_identity: remote.identity,
        rule_id: verdict.rule_id,
        flags: ct_flags,
        peer_ifindex,
    };
    // The sender's entry is linked before this one is inserted: an insert may evict and
    // recycle entries, and the pointer must not outlive the entry it points to.
    if let Some(sender) = linked.as_deref_mut() {
        sender.peer_ifindex = ifindex;
    }
    if conntrack::create(key, pkt, now, &admission).is_err() {
        // Not recorded here: the sender's handoff must not vouch for it.
        if let Some(sender) = linked {
            sender.peer_ifindex = 0;
        }
        return drop_judged(&cfg, pkt, &state_full(ifindex, ep, direction), now);
    }

    report_admitted(&cfg, pkt, &verdict, ep.flags, direction, now);
    TC_ACT_OK
}

/// A quarantined endpoint's new flow (left in SCRATCH_NEW_FLOW) that its quarantine does not
/// allow. A function of its own so that its judgement takes no room in `new_flow`'s frame.
#[inline(never)]
fn quarantine_drop(ifindex: u32, direction: u8, remote_identity: u32) -> i32 {
    let Some(slot) = scratch::SCRATCH_NEW_FLOW.get_ptr(0) else {
        return TC_ACT_SHOT;
    };
    let handover = unsafe { &*slot };
    let j = Judgement {
        ifindex,
        local_identity: handover.ep.identity,
        remote_identity,
        mode: MODE_ENFORCE,
        direction,
        allowed: false,
        reason: reason::QUARANTINED,
        rule_id: rule::NONE,
    };
    drop_judged(&events::config(), &handover.pkt, &j, handover.now)
}

/// What the detectors need to know about a judged new flow, packed for
/// `threats::judged_new_flow` (see `threats::judged`).
#[inline(always)]
fn judged_facts(verdict: &Judgement, direction: u8, remote_ifindex: u32) -> u32 {
    let mut facts = direction as u32;
    if direction == DIRECTION_INGRESS && remote_ifindex != 0 {
        facts |= threats::judged::LOCAL_SENDER;
    }
    if !verdict.allowed {
        facts |= threats::judged::REFUSED;
    }
    if verdict.enforced_drop() {
        if is_policy_refusal(verdict.reason) {
            facts |= threats::judged::POLICY_DROP;
        }
    } else {
        facts |= threats::judged::ADMITTED;
    }
    facts
}

/// Reports a flow that was let through: always when policy refused it (audit and learn
/// modes), and an allow when the endpoint or the node logs allows. Counted under
/// `direction`, the hook's own, which for a sender judged at the receiver's hook differs
/// from the verdict's.
#[inline(always)]
fn report_admitted(
    cfg: &moat_common::Config,
    pkt: &Packet,
    verdict: &Judgement,
    endpoint_flags: u8,
    direction: u8,
    now: u64,
) {
    let (event_verdict, event_reason) = if verdict.allowed {
        (VERDICT_ALLOW, verdict.reason)
    } else if verdict.mode == MODE_LEARN {
        (VERDICT_ALLOW, reason::LEARN)
    } else {
        (VERDICT_AUDIT, verdict.reason)
    };
    let report = !verdict.allowed
        || verdict.mode == MODE_LEARN
        || endpoint_flags & ENDPOINT_FLAG_LOG_ALLOWS != 0
        || cfg.flags & CONFIG_FLAG_LOG_ALL_ALLOWS != 0;
    if report {
        let fields = EventFields {
            ifindex: verdict.ifindex,
            local_identity: verdict.local_identity,
            remote_identity: verdict.remote_identity,
            rule_id: verdict.rule_id,
            direction: verdict.direction,
            verdict: event_verdict,
            reason: event_reason,
            mode: verdict.mode,
        };
        events::emit(cfg, pkt, &fields, now);
    }
    metrics::count(event_verdict, event_reason, direction, pkt.len);
}

#[inline(always)]
fn state_full(ifindex: u32, ep: &EndpointInfo, direction: u8) -> Judgement {
    Judgement {
        ifindex,
        local_identity: ep.identity,
        remote_identity: 0,
        mode: MODE_ENFORCE,
        direction,
        allowed: false,
        reason: reason::STATE_MAP_FULL,
        rule_id: rule::NONE,
    }
}

#[inline(always)]
fn pass_tracked(lookup: Lookup, direction: u8, bytes: u32) -> i32 {
    match lookup {
        Lookup::Established => pass(reason::ESTABLISHED, direction, bytes),
        Lookup::Reply => pass(reason::REPLY, direction, bytes),
    }
}

#[inline(always)]
fn pass(why: u8, direction: u8, bytes: u32) -> i32 {
    metrics::count(VERDICT_ALLOW, why, direction, bytes);
    TC_ACT_OK
}

/// Drops that happen before a tuple exists (non-IP, malformed): counted, not reported.
#[inline(always)]
fn drop_unjudged(why: u8, direction: u8, bytes: u32) -> i32 {
    metrics::count(VERDICT_DROP, why, direction, bytes);
    TC_ACT_SHOT
}

#[inline(always)]
fn drop_judged(cfg: &moat_common::Config, pkt: &Packet, j: &Judgement, now: u64) -> i32 {
    let fields = EventFields {
        ifindex: j.ifindex,
        local_identity: j.local_identity,
        remote_identity: j.remote_identity,
        rule_id: j.rule_id,
        direction: j.direction,
        verdict: VERDICT_DROP,
        reason: j.reason,
        mode: j.mode,
    };
    events::emit(cfg, pkt, &fields, now);
    metrics::count(VERDICT_DROP, j.reason, j.direction, pkt.len);
    TC_ACT_SHOT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
