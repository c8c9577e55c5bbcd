//! Connection tracking. Each endpoint keeps its own view (the host-side ifindex is part of the
//! key), so a flow between two local pods is admitted by each perimeter on its own. A packet
//! is ESTABLISHED when its tuple matches an entry, a REPLY when its reversed tuple does; only
//! packets that match neither are judged by policy.
//!
//! Services: a pod's packet to a ClusterIP is recorded here under the ClusterIP tuple before
//! the host's DNAT rewrites it; the un-NATed reply (source = ClusterIP) then matches that
//! entry reversed.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use moat_common::{
    CT_FLAG_FIN_FORWARD, CT_FLAG_FIN_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
    CT_STATE_SYN_SENT, CtKey, CtValue, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ct_timeout,
};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS_PER_SEC: u64 = 1_000_000_000;

pub enum Lookup {
    Established,
    Reply,
    Miss,
}

/// CLOCK_MONOTONIC_COARSE: a plain read of the time kept at the last tick, where
/// bpf_ktime_get_ns reads the clock source on every packet (measured in BPF_PROG_TEST_RUN:
/// ~18 ns of a ~213 ns conntrack hit). A tick (a few ms) of lag is nothing against timeouts
/// counted in seconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn forward_key(ifindex: u32, pkt: &Packet) -> CtKey {
    CtKey {
        ifindex,
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn reverse_key(key: &CtKey) -> CtKey {
    CtKey {
        ifindex: key.ifindex,
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// Finds the packet's flow and advances its state. An expired entry counts as a miss, so
/// the packet is judged afresh by current policy.
#[inline(always)]
pub fn lookup_and_update(key: &CtKey, pkt: &Packet, now: u64) -> Lookup {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        let entry = unsafe { &mut *entry };
        if entry.expires_ns > now {
            advance(entry, pkt, false, now);
            return Lookup::Established;
        }
        return Lookup::Miss;
    }
    let reverse = reverse_key(key);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&reverse) {
        let entry = unsafe { &mut *entry };
        if entry.expires_ns > now {
            advance(entry, pkt, true, now);
            return Lookup::Reply;
        }
    }
    Lookup::Miss
}

/// True when endpoint `ifindex` has a live entry for exactly this packet's tuple.
#[inline(always)]
pub fn is_tracked(ifindex: u32, pkt: &Packet, now: u64) -> bool {
    let key = forward_key(ifindex, pkt);
    match unsafe { CONNTRACK.get(&key) } {
        Some(entry) => entry.expires_ns > now,
        None => false,
    }
}

/// True when the tuple quoted by an ICMP error belongs to a flow this endpoint tracks.
#[inline(always)]
pub fn is_related(ifindex: u32, pkt: &Packet, now: u64) -> bool {
    let inner = CtKey {
        ifindex,
        saddr: pkt.inner.saddr,
        daddr: pkt.inner.daddr,
        sport: pkt.inner.sport,
        dport: pkt.inner.dport,
        proto: pkt.inner.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    if let Some(entry) = unsafe { CONNTRACK.get(&inner) } {
        if entry.expires_ns > now {
            return true;
        }
    }
    let reverse = reverse_key(&inner);
    if let Some(entry) = unsafe { CONNTRACK.get(&reverse) } {
        if entry.expires_ns > now {
            return true;
        }
    }
    false
}

/// Records an admitted new flow. Err means the map refused the entry: the caller drops.
#[inline(always)]
pub fn create(
    key: &CtKey,
    pkt: &Packet,
    now: u64,
    direction: u8,
    remote_identity: u32,
    rule_id: u32,
    flags: u8,
) -> Result<(), ()> {
    let mut entry = CtValue {
        expires_ns: 0,
        rule_id,
        remote_identity,
        state: CT_STATE_ESTABLISHED,
        flags,
        direction,
        _pad: 0,
        packets: 0,
    };
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN != 0 && pkt.tcp_flags & TCP_ACK == 0 {
        entry.state = CT_STATE_SYN_SENT;
    }
    advance(&mut entry, pkt, false, now);
    CONNTRACK.insert(key, &entry, 0).map_err(|_| ())
}

#[inline(always)]
fn advance(entry: &mut CtValue, pkt: &Packet, is_reply: bool, now: u64) {
    entry.packets = entry.packets.wrapping_add(1);
    let timeout = match pkt.proto {
        PROTO_TCP => {
            let flags = pkt.tcp_flags;
            if flags & TCP_RST != 0 {
                entry.state = CT_STATE_CLOSING;
            } else {
                if flags & TCP_FIN != 0 {
                    entry.flags |= if is_reply {
                        CT_FLAG_FIN_REPLY
                    } else {
                        CT_FLAG_FIN_FORWARD
                    };
                }
                if entry.flags & (CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY)
                    == (CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY)
                {
                    entry.state = CT_STATE_CLOSING;
                } else if entry.state == CT_STATE_SYN_SENT && is_reply {
                    entry.state = CT_STATE_ESTABLISHED;
                }
            }
            match entry.state {
                CT_STATE_SYN_SENT => ct_timeout::TCP_SYN,
                CT_STATE_CLOSING => ct_timeout::TCP_CLOSING,
                _ => ct_timeout::TCP_ESTABLISHED,
            }
        }
        PROTO_UDP => ct_timeout::UDP,
        PROTO_ICMP | PROTO_ICMPV6 => ct_timeout::ICMP,
        _ => ct_timeout::OTHER,
    };
    entry.expires_ns = now + timeout * NS_PER_SEC;
}
