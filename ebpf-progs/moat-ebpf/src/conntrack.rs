//! Connection tracking. Each endpoint keeps its own view (the host-side ifindex is part of the
//! key), so a flow between two local pods is admitted by each perimeter on its own. A packet
//! is ESTABLISHED when it runs the way the flow's first packet did, a REPLY when it runs the
//! other way; only packets of no live flow are judged by policy. Both directions share one
//! entry under an ordered key (see `CtKey`), so every packet costs one lookup.
//!
//! Services: a pod's packet to a ClusterIP is recorded here under the ClusterIP tuple before
//! the host's DNAT rewrites it; the un-NATed reply (source = ClusterIP) then matches that
//! entry reversed.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use moat_common::{
    CT_FLAG_FIN_FORWARD, CT_FLAG_FIN_REPLY, CT_FLAG_FOREIGN_DEST, CT_FLAG_KEY_REVERSED,
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_SYN_SENT, CtKey, CtValue, DIRECTION_EGRESS,
    DIRECTION_INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ct_timeout,
};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS_PER_SEC: u64 = 1_000_000_000;

pub enum Lookup {
    Established,
    Reply,
}

/// CLOCK_MONOTONIC_COARSE: a plain read of the time kept at the last tick, where
/// bpf_ktime_get_ns reads the clock source on every packet (measured in BPF_PROG_TEST_RUN:
/// ~18 ns of a ~213 ns conntrack hit). A tick (a few ms) of lag is nothing against timeouts
/// counted in seconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A packet's flow key, and whether the packet runs against the key's order.
pub struct FlowKey {
    pub key: CtKey,
    pub reversed: bool,
}

#[inline(always)]
pub fn flow_key(ifindex: u32, pkt: &Packet) -> FlowKey {
    ordered_key(
        ifindex,
        pkt.family,
        pkt.proto,
        (&pkt.saddr, pkt.sport),
        (&pkt.daddr, pkt.dport),
    )
}

/// Puts the lower end (address words in order, then port) first.
#[inline(always)]
fn ordered_key(
    ifindex: u32,
    family: u8,
    proto: u8,
    src: (&[u32; 4], u16),
    dst: (&[u32; 4], u16),
) -> FlowKey {
    let reversed = lower(dst, src);
    let mut key = CtKey {
        ifindex,
        saddr: *src.0,
        daddr: *dst.0,
        sport: src.1,
        dport: dst.1,
        proto,
        family,
        _pad: [0; 2],
    };
    if reversed {
        core::mem::swap(&mut key.saddr, &mut key.daddr);
        core::mem::swap(&mut key.sport, &mut key.dport);
    }
    FlowKey { key, reversed }
}

#[inline(always)]
fn lower(a: (&[u32; 4], u16), b: (&[u32; 4], u16)) -> bool {
    let mut i = 0;
    while i < 4 {
        if a.0[i] != b.0[i] {
            return a.0[i] < b.0[i];
        }
        i += 1;
    }
    a.1 < b.1
}

/// True when a packet with `reversed` runs the other way from the flow's first packet.
#[inline(always)]
fn is_reply(entry: &CtValue, reversed: bool) -> bool {
    reversed != (entry.flags & CT_FLAG_KEY_REVERSED != 0)
}

/// The packet's live flow, if any. An expired entry counts as none, so the packet is judged
/// afresh by current policy.
#[inline(always)]
pub fn find(flow: &FlowKey, now: u64) -> Option<&'static mut CtValue> {
    let entry = unsafe { &mut *CONNTRACK.get_ptr_mut(&flow.key)? };
    if entry.expires_ns <= now {
        return None;
    }
    Some(entry)
}

/// True when a live entry alone proves the packet may pass at this hook, without looking at
/// the endpoint entry. Going in, any packet of an admitted flow may. Going out, the source
/// must be the endpoint's own, which the entry proves in two cases: the packet runs the way
/// of a first packet that went out (whose source passed the check), or it answers a first
/// packet that came in addressed to one of the endpoint's addresses. Anything else (a
/// "reply" to the endpoint's own outgoing flow, an answer to a flooded packet) takes the
/// full path, where the source check drops a spoofed packet.
#[inline(always)]
pub fn proves_source(entry: &CtValue, flow: &FlowKey, direction: u8) -> bool {
    if direction != DIRECTION_EGRESS {
        return true;
    }
    let reply = is_reply(entry, flow.reversed);
    if reply {
        entry.direction == DIRECTION_INGRESS && entry.flags & CT_FLAG_FOREIGN_DEST == 0
    } else {
        entry.direction == DIRECTION_EGRESS
    }
}

/// Advances a live flow's state with this packet and says which way the packet runs.
#[inline(always)]
pub fn update(entry: &mut CtValue, flow: &FlowKey, pkt: &Packet, now: u64) -> Lookup {
    let reply = is_reply(entry, flow.reversed);
    advance(entry, pkt, reply, now);
    if reply {
        Lookup::Reply
    } else {
        Lookup::Established
    }
}

/// Endpoint `ifindex`'s live entry for a flow this packet's tuple started, if any.
#[inline(always)]
pub fn started(ifindex: u32, pkt: &Packet, now: u64) -> Option<&'static mut CtValue> {
    let flow = flow_key(ifindex, pkt);
    let entry = find(&flow, now)?;
    if is_reply(entry, flow.reversed) {
        return None;
    }
    Some(entry)
}

/// True when the tuple quoted by an ICMP error belongs to a flow this endpoint tracks.
#[inline(always)]
pub fn is_related(ifindex: u32, pkt: &Packet, now: u64) -> bool {
    let inner = ordered_key(
        ifindex,
        pkt.family,
        pkt.inner.proto,
        (&pkt.inner.saddr, pkt.inner.sport),
        (&pkt.inner.daddr, pkt.inner.dport),
    );
    match unsafe { CONNTRACK.get(&inner.key) } {
        Some(entry) => entry.expires_ns > now,
        None => false,
    }
}

/// What a perimeter decided about a new flow, as its entry records it.
pub struct Admission {
    pub direction: u8,
    pub remote_identity: u32,
    pub rule_id: u32,
    pub flags: u8,
    /// See `CtValue::peer_ifindex`.
    pub peer_ifindex: u32,
}

/// Records an admitted new flow. Err means the map refused the entry: the caller drops.
#[inline(always)]
pub fn create(flow: &FlowKey, pkt: &Packet, now: u64, admission: &Admission) -> Result<(), ()> {
    let mut entry = CtValue {
        expires_ns: 0,
        rule_id: admission.rule_id,
        remote_identity: admission.remote_identity,
        state: CT_STATE_ESTABLISHED,
        flags: admission.flags,
        direction: admission.direction,
        _pad: 0,
        peer_ifindex: admission.peer_ifindex,
    };
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN != 0 && pkt.tcp_flags & TCP_ACK == 0 {
        entry.state = CT_STATE_SYN_SENT;
    }
    if flow.reversed {
        entry.flags |= CT_FLAG_KEY_REVERSED;
    }
    advance(&mut entry, pkt, false, now);
    CONNTRACK.insert(&flow.key, &entry, 0).map_err(|_| ())
}

/// An expiry is rewritten only when it moves by at least this much (or the state changes).
const EXPIRY_REFRESH_NS: u64 = NS_PER_SEC;

/// Advances the entry's TCP state and refreshes its expiry, storing only what changed. A
/// flow's entry is read by the CPUs of both its directions; a store on every packet would
/// move its cache line between them on every packet. In the steady state of a flow nothing
/// changes but the expiry, which is then written about once a second (a timeout may end up
/// to a second short of its nominal length; the shortest is 10 s).
#[inline(always)]
fn advance(entry: &mut CtValue, pkt: &Packet, is_reply: bool, now: u64) {
    let mut state = entry.state;
    let mut flags = entry.flags;
    let timeout = match pkt.proto {
        PROTO_TCP => {
            let tcp = pkt.tcp_flags;
            if tcp & TCP_RST != 0 {
                state = CT_STATE_CLOSING;
            } else {
                if tcp & TCP_FIN != 0 {
                    flags |= if is_reply {
                        CT_FLAG_FIN_REPLY
                    } else {
                        CT_FLAG_FIN_FORWARD
                    };
                }
                if flags & (CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY)
                    == (CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY)
                {
                    state = CT_STATE_CLOSING;
                } else if state == CT_STATE_SYN_SENT && is_reply {
                    state = CT_STATE_ESTABLISHED;
                }
            }
            match state {
                CT_STATE_SYN_SENT => ct_timeout::TCP_SYN,
                CT_STATE_CLOSING => ct_timeout::TCP_CLOSING,
                _ => ct_timeout::TCP_ESTABLISHED,
            }
        }
        PROTO_UDP => ct_timeout::UDP,
        PROTO_ICMP | PROTO_ICMPV6 => ct_timeout::ICMP,
        _ => ct_timeout::OTHER,
    };
    let changed = state != entry.state || flags != entry.flags;
    if changed {
        entry.state = state;
        entry.flags = flags;
    }
    let expires = now + timeout * NS_PER_SEC;
    if changed || expires.abs_diff(entry.expires_ns) >= EXPIRY_REFRESH_NS {
        entry.expires_ns = expires;
    }
}
