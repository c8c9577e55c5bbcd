//! Threat detectors and quarantine, in the hooks that already see every new flow and drop.
//!
//! Each detector counts per subject (a source, a source and peer, a victim and port) in a
//! window, in MOAT_THREATS: a fixed array used as a direct-mapped cache, so state is bounded,
//! nothing is allocated per packet, and a crowded table costs detection accuracy, never a
//! verdict. Distinct ports, addresses and names are counted in a 256-bit linear-counting
//! sketch (moatd turns distinct counts into set bits). A subject is reported once per window
//! on MOAT_THREATEV; moatd decides the response.
//!
//! Nothing here changes a verdict except `quarantine_blocks`, which the caller checks before
//! policy. Counting happens only where detection is switched on (`config`), and the
//! established path pays a flag test at most (see `handshake_completed`).

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_loop, bpf_skb_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use moat_common::{
    CT_FLAG_HANDSHAKE_SEEN, CT_STATE_ESTABLISHED, CtKey, CtValue, DIRECTION_EGRESS,
    DIRECTION_INGRESS, FAMILY_V4, FAMILY_V6, MAX_QUARANTINE_ALLOW, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP, ThreatConfig, ThreatEvent, ThreatKey, ThreatSlot, map_size, threat,
};

use crate::{
    conntrack::now_ns,
    endpoint,
    maps::{THREAT_CONFIG, THREAT_EVENTS, THREATS},
    parse::{ETH_HLEN, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    scratch::{SCRATCH_AFTER_DNAT, SCRATCH_DNS_NAME, SCRATCH_NEW_FLOW},
};

const NS_PER_MS: u64 = 1_000_000;
const DNS_PORT: u16 = 53;
/// A DNS name on the wire is at most 255 bytes.
pub const DNS_NAME_MAX: usize = 256;

/// The detector settings, or None when detection is off (no detector enabled).
#[inline(always)]
pub fn config() -> Option<&'static ThreatConfig> {
    let cfg = THREAT_CONFIG.get(0)?;
    if cfg.enabled == 0 { None } else { Some(cfg) }
}

/// Whether the DNS tunnel detector is on (for `fqdn::after_verdict`, which reads a DNS
/// packet only when something will use it).
#[inline(always)]
pub fn dns_tunnel_enabled() -> bool {
    config().is_some_and(|cfg| enabled(cfg, threat::DNS_TUNNEL))
}

#[inline(always)]
fn enabled(cfg: &ThreatConfig, kind: u8) -> bool {
    cfg.enabled & (1u32 << kind) != 0
}

#[inline(always)]
fn window_ns(cfg: &ThreatConfig, kind: u8) -> u64 {
    cfg.window_ms[(kind as usize) & (threat::SLOTS - 1)] as u64 * NS_PER_MS
}

#[inline(always)]
fn threshold(cfg: &ThreatConfig, kind: u8) -> u32 {
    cfg.threshold[(kind as usize) & (threat::SLOTS - 1)]
}

// ---------------------------------------------------------------------------------------------
// Quarantine
// ---------------------------------------------------------------------------------------------

/// True when a quarantined endpoint's new flow must be dropped: everything coming in, and
/// everything going out that the quarantine allowance does not list. With no settings at
/// all (moatd not yet configured the maps) only DNS leaves, the documented default.
#[inline(always)]
pub fn quarantine_blocks(pkt: &Packet, direction: u8) -> bool {
    if direction != DIRECTION_EGRESS {
        return true;
    }
    let Some(cfg) = THREAT_CONFIG.get(0) else {
        return !is_dns(pkt);
    };
    if cfg.quarantine_allow[0].proto == 0 {
        return !is_dns(pkt);
    }
    let mut i = 0;
    while i < MAX_QUARANTINE_ALLOW {
        let allow = &cfg.quarantine_allow[i];
        if allow.proto == 0 {
            break;
        }
        if allow.proto == pkt.proto && allow.port == pkt.dport {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn is_dns(pkt: &Packet) -> bool {
    (pkt.proto == PROTO_UDP || pkt.proto == PROTO_TCP) && pkt.dport == DNS_PORT
}

// ---------------------------------------------------------------------------------------------
// Slots and sketches
// ---------------------------------------------------------------------------------------------

/// The key's words folded with rotations, then one avalanche: two multiplies per subject
/// where a word-by-word hash takes ten (this runs on every new flow, up to three times).
#[inline(always)]
fn slot_index(key: &ThreatKey) -> u32 {
    let words: &[u32; 10] = unsafe { &*(key as *const ThreatKey as *const [u32; 10]) };
    let mut h: u32 = 0;
    let mut i = 0;
    while i < 10 {
        h = h.rotate_left(5) ^ words[i];
        i += 1;
    }
    h = (h ^ (h >> 16)).wrapping_mul(0x85eb_ca6b);
    h = (h ^ (h >> 13)).wrapping_mul(0xc2b2_ae35);
    (h ^ (h >> 16)) & (map_size::THREATS - 1)
}

/// The subject's slot for this window: taken over from another subject, or restarted when
/// its window is over.
#[inline(always)]
fn slot_for(key: &ThreatKey, window: u64, now: u64) -> Option<&'static mut ThreatSlot> {
    let slot = unsafe { &mut *THREATS.get_ptr_mut(slot_index(key))? };
    if slot.key != *key || now.wrapping_sub(slot.window_start_ns) > window {
        slot.key = *key;
        slot.window_start_ns = now;
        slot.count = 0;
        slot.marks = 0;
        slot.reported = 0;
        slot.seen = [0; 4];
        slot.samples = [0; 4];
    }
    Some(slot)
}

/// The subject's slot only if it still holds this window (for late evidence such as a
/// refusal: it never starts a window of its own).
#[inline(always)]
fn live_slot(key: &ThreatKey, window: u64, now: u64) -> Option<&'static mut ThreatSlot> {
    let slot = unsafe { &mut *THREATS.get_ptr_mut(slot_index(key))? };
    if slot.key != *key || now.wrapping_sub(slot.window_start_ns) > window {
        return None;
    }
    Some(slot)
}

/// Sets the sketch bit of `hash`; true when it was not set (a value not seen before, up to
/// collisions).
#[inline(always)]
fn mark_seen(slot: &mut ThreatSlot, hash: u32) -> bool {
    let bit = hash & (threat::SKETCH_BITS - 1);
    let word = ((bit >> 6) & 3) as usize;
    let mask = 1u64 << (bit & 63);
    let fresh = slot.seen[word] & mask == 0;
    slot.seen[word] |= mask;
    fresh
}

#[inline(always)]
fn popcount(mut x: u64) -> u32 {
    x -= (x >> 1) & 0x5555_5555_5555_5555;
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

#[inline(always)]
fn sketch_bits(slot: &ThreatSlot) -> u32 {
    popcount(slot.seen[0])
        + popcount(slot.seen[1])
        + popcount(slot.seen[2])
        + popcount(slot.seen[3])
}

#[inline(always)]
fn mix(a: u32, b: u32) -> u32 {
    let h = (a ^ 0x9e37_79b9).wrapping_mul(0x85eb_ca6b) ^ b;
    let h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 15)
}

#[inline(always)]
fn addr_hash(addr: &[u32; 4]) -> u32 {
    mix(mix(addr[0], addr[1]), mix(addr[2], addr[3]))
}

/// The word of an address kept as evidence: the address itself for IPv4, its last word for
/// IPv6.
#[inline(always)]
fn addr_sample(family: u8, addr: &[u32; 4]) -> u32 {
    if family == FAMILY_V4 {
        addr[0]
    } else {
        addr[3]
    }
}

/// Records a port as evidence (two per word, first come first kept).
#[inline(always)]
fn sample_port(slot: &mut ThreatSlot, port: u16) {
    let mut i = 0;
    while i < 4 {
        let word = slot.samples[i];
        if word & 0xffff == 0 {
            slot.samples[i] = port as u32;
            return;
        }
        if word >> 16 == 0 {
            slot.samples[i] = word | (port as u32) << 16;
            return;
        }
        i += 1;
    }
}

#[inline(always)]
fn sample_word(slot: &mut ThreatSlot, word: u32) {
    let mut i = 0;
    while i < 4 {
        if slot.samples[i] == 0 {
            slot.samples[i] = word;
            return;
        }
        i += 1;
    }
}

#[inline(always)]
fn key(kind: u8, family: u8) -> ThreatKey {
    ThreatKey {
        kind,
        family,
        proto: 0,
        _pad: 0,
        port: 0,
        _pad2: 0,
        src: [0; 4],
        dst: [0; 4],
    }
}

/// Reports the slot's subject once per window.
#[inline(always)]
fn report(slot: &mut ThreatSlot, ifindex: u32, direction: u8, bits: u32, now: u64) {
    if slot.reported != 0 {
        return;
    }
    slot.reported = 1;
    let Some(mut entry) = THREAT_EVENTS.reserve::<ThreatEvent>(0) else {
        // A full ring loses this report; the next window reports again.
        return;
    };
    entry.write(ThreatEvent {
        timestamp_ns: now,
        window_start_ns: slot.window_start_ns,
        ifindex,
        count: slot.count,
        marks: slot.marks,
        sketch_bits: bits,
        kind: slot.key.kind,
        family: slot.key.family,
        proto: slot.key.proto,
        direction,
        port: slot.key.port,
        _pad: 0,
        src: slot.key.src,
        dst: slot.key.dst,
        samples: slot.samples,
    });
    entry.submit(0);
}

// ---------------------------------------------------------------------------------------------
// Detectors on new flows
// ---------------------------------------------------------------------------------------------

/// Facts about a judged new flow, packed beside the hook's direction (bit 0).
pub mod judged {
    /// The sender is a pod of this node whose own hook counted the flow.
    pub const LOCAL_SENDER: u32 = 2;
    /// Policy refused it (dropped, or let through by audit or learn mode).
    pub const REFUSED: u32 = 4;
    /// Policy dropped it.
    pub const POLICY_DROP: u32 = 8;
    /// It was let through.
    pub const ADMITTED: u32 = 16;
}

/// What the detectors learn from a new flow this hook judged (left in SCRATCH_NEW_FLOW).
/// Scans and sweeps are counted once per flow: at the sender's hook or, for a sender on
/// another node, at the receiver's. A local sender's probe refused by the receiver's policy
/// is a refusal of the scan its own hook counted. Not inlined, with scalar arguments, so it
/// takes nothing from `new_flow`'s frame.
#[inline(never)]
pub fn judged_new_flow(ifindex: u32, now: u64) {
    let Some(note) = SCRATCH_WATCH.get_ptr(0) else {
        return;
    };
    let facts = unsafe { core::ptr::read_volatile(&(*note).judged) };
    let Some(cfg) = config() else {
        return;
    };
    let Some(slot) = SCRATCH_NEW_FLOW.get_ptr(0) else {
        return;
    };
    let pkt: &Packet = unsafe { &(*slot).pkt };
    let direction = (facts & 1) as u8;
    if facts & judged::LOCAL_SENDER != 0 {
        if facts & judged::REFUSED != 0 {
            refused(
                cfg, pkt.family, &pkt.saddr, &pkt.daddr, 0, ifindex, direction, now,
            );
        }
    } else {
        new_flow(
            cfg,
            pkt,
            ifindex,
            direction,
            facts & judged::REFUSED != 0,
            now,
        );
    }
    if facts & judged::POLICY_DROP != 0 {
        policy_drop(cfg, pkt, ifindex, direction, now);
    } else if facts & judged::ADMITTED != 0
        && direction == DIRECTION_INGRESS
        && pkt.proto == PROTO_TCP
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        syn_received(cfg, pkt, ifindex, now);
    }
}

#[inline(always)]
fn new_flow(
    cfg: &ThreatConfig,
    pkt: &Packet,
    ifindex: u32,
    direction: u8,
    refused: bool,
    now: u64,
) {
    let is_icmp = pkt.proto == PROTO_ICMP || pkt.proto == PROTO_ICMPV6;
    if !is_icmp && enabled(cfg, threat::PORT_SCAN) {
        port_scan(cfg, pkt, ifindex, direction, refused, now);
    }
    if enabled(cfg, threat::HOST_SWEEP) {
        host_sweep(cfg, pkt, ifindex, direction, is_icmp, now);
    }
}

/// One source, many ports of one peer, mostly refused (dropped by policy here, or answered
/// with a RST or an ICMP unreachable: see `refused`). TCP SYN, FIN, NULL and Xmas probes and
/// UDP probes all start new flows, so all count.
#[inline(always)]
fn port_scan(
    cfg: &ThreatConfig,
    pkt: &Packet,
    ifindex: u32,
    direction: u8,
    refused: bool,
    now: u64,
) {
    let mut k = key(threat::PORT_SCAN, pkt.family);
    k.src = pkt.saddr;
    k.dst = pkt.daddr;
    let Some(slot) = slot_for(&k, window_ns(cfg, threat::PORT_SCAN), now) else {
        return;
    };
    slot.count += 1;
    if refused {
        slot.marks += 1;
    }
    if mark_seen(slot, mix(pkt.dport as u32, pkt.proto as u32)) {
        sample_port(slot, pkt.dport);
    }
    check_port_scan(cfg, slot, ifindex, direction, now);
}

#[inline(always)]
fn check_port_scan(
    cfg: &ThreatConfig,
    slot: &mut ThreatSlot,
    ifindex: u32,
    direction: u8,
    now: u64,
) {
    // A scan is mostly refused; a client opening many allowed ports is not one.
    if slot.marks * 2 < slot.count {
        return;
    }
    let needed = threshold(cfg, threat::PORT_SCAN);
    report_when_distinct(slot, needed, ifindex, direction, now);
}

/// The end the distinct-value detectors share: report the slot (once per window) when its
/// sketch holds `needed` set bits. Distinct values never exceed the count, so the sketch is
/// not counted until the count could reach them.
#[inline(always)]
fn report_when_distinct(slot: &mut ThreatSlot, needed: u32, ifindex: u32, direction: u8, now: u64) {
    if slot.reported != 0 || slot.count < needed {
        return;
    }
    let bits = sketch_bits(slot);
    if bits >= needed {
        report(slot, ifindex, direction, bits, now);
    }
}

/// One source, many addresses on one protocol and port (ICMP echo: any identifier).
#[inline(always)]
fn host_sweep(
    cfg: &ThreatConfig,
    pkt: &Packet,
    ifindex: u32,
    direction: u8,
    is_icmp: bool,
    now: u64,
) {
    let mut k = key(threat::HOST_SWEEP, pkt.family);
    k.proto = pkt.proto;
    k.port = if is_icmp { 0 } else { pkt.dport };
    k.src = pkt.saddr;
    let Some(slot) = slot_for(&k, window_ns(cfg, threat::HOST_SWEEP), now) else {
        return;
    };
    slot.count += 1;
    if mark_seen(slot, addr_hash(&pkt.daddr)) {
        sample_word(slot, addr_sample(pkt.family, &pkt.daddr));
    }
    let needed = threshold(cfg, threat::HOST_SWEEP);
    report_when_distinct(slot, needed, ifindex, direction, now);
}

/// What `track` noted for the detectors (see `note` and `watched`).
pub mod watch {
    /// A TCP RST answering a SYN: it runs back to the prober.
    pub const RESET_REFUSED: u32 = 1;
    /// An ICMP error quoting a probe.
    pub const ICMP_REFUSED: u32 = 2;
    /// The client's ACK completing a handshake (the note carries the receiver).
    pub const HANDSHAKE: u32 = 4;
    /// A packet with a source address that is not its sender's.
    pub const SPOOFED: u32 = 8;
    /// With a refusal: count it only if the prober is not a pod of this node.
    pub const UNLESS_PROBER_LOCAL: u32 = 16;
    /// A DNS query over UDP leaving the pod (any flow state: a tunnel reuses one socket).
    pub const DNS_QUERY: u32 = 32;
}

/// A note from `track` to `watched`, through map memory: `track`'s frame has no room for
/// what the detectors need, and the packet itself is still there to read afterwards.
#[repr(C)]
pub struct WatchNote {
    pub what: u32,
    pub victim: u32,
    pub family_port: u32,
    /// `judged` facts for `judged_new_flow`: passed in memory so that the verifier sees one
    /// unknown value, not one constant per path of the verdict (each walked on its own).
    pub judged: u32,
    /// `fqdn::NOTE_QUERY` or `fqdn::NOTE_ANSWER`: a DNS packet for FQDN learning, read after
    /// the verdict by `fqdn::after_verdict` (kept apart from `what`, which other notes
    /// replace).
    pub dns: u32,
    /// The hook's verdict, parked across the detectors' work: see `park_verdict`.
    pub verdict: i32,
}

#[map]
static SCRATCH_WATCH: PerCpuArray<WatchNote> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn note(what: u32, victim: u32, family_port: u32) {
    if let Some(slot) = SCRATCH_WATCH.get_ptr_mut(0) {
        unsafe {
            (*slot).what = what;
            (*slot).victim = victim;
            (*slot).family_port = family_port;
        }
    }
}

/// Leaves `judged` facts for `judged_new_flow`.
#[inline(always)]
pub fn note_judged(facts: u32) {
    if let Some(slot) = SCRATCH_WATCH.get_ptr_mut(0) {
        unsafe { core::ptr::write_volatile(&mut (*slot).judged, facts) };
    }
}

/// Notes a packet to or from port 53, for `fqdn::after_verdict`.
/// Keeps the hook's verdict in memory across `after_verdict`. Held in a register it is a
/// different constant on each path of the verdict, and the verifier would walk the
/// detectors once per constant; read back from memory it is one unknown value.
#[inline(always)]
pub fn park_verdict(verdict: i32) {
    if let Some(slot) = SCRATCH_WATCH.get_ptr_mut(0) {
        unsafe { core::ptr::write_volatile(&mut (*slot).verdict, verdict) };
    }
}

/// The verdict `park_verdict` kept (TC_ACT_SHOT if the scratch slot were ever missing).
#[inline(always)]
pub fn parked_verdict() -> i32 {
    match SCRATCH_WATCH.get_ptr(0) {
        Some(slot) => unsafe { core::ptr::read_volatile(&(*slot).verdict) },
        None => aya_ebpf::bindings::TC_ACT_SHOT,
    }
}

#[inline(always)]
pub fn note_dns() {
    if let Some(slot) = SCRATCH_WATCH.get_ptr_mut(0) {
        unsafe { (*slot).dns = 1 };
    }
}

/// True when `track` left a note about this packet.
#[inline(always)]
pub fn noted() -> bool {
    match SCRATCH_WATCH.get_ptr(0) {
        Some(slot) => unsafe { (*slot).what | (*slot).dns != 0 },
        None => false,
    }
}

/// Acts on `track`'s note about this hook's packet (and clears it), and reads a DNS query
/// leaving the pod.
/// Returns whether the packet was noted as DNS (the note cleared), for the caller to read
/// in a frame of its own (`fqdn::after_verdict`, which also runs the tunnel detector).
#[inline(never)]
pub fn after_verdict(ctx: &TcContext, ifindex: u32, direction: u32) -> bool {
    let Some(slot) = SCRATCH_WATCH.get_ptr_mut(0) else {
        return false;
    };
    let dns = unsafe { (*slot).dns };
    unsafe { (*slot).dns = 0 };
    detect(ctx, ifindex, direction);
    dns != 0
}

#[inline(always)]
fn detect(ctx: &TcContext, ifindex: u32, direction: u32) {
    let Some(slot) = SCRATCH_WATCH.get_ptr_mut(0) else {
        return;
    };
    let (what, victim, family_port) =
        unsafe { ((*slot).what, (*slot).victim, (*slot).family_port) };
    if what == 0 {
        return;
    }
    unsafe { (*slot).what = 0 };
    let Some(cfg) = config() else {
        return;
    };
    let now = now_ns();
    if what & watch::HANDSHAKE != 0 {
        handshake_completed(cfg, victim, family_port, now);
        return;
    }
    if what & watch::SPOOFED != 0 {
        spoofed(cfg, ctx, ifindex, now);
        return;
    }
    let Some((family, header_len)) = ip_header(ctx) else {
        return;
    };
    let offset = if what & watch::ICMP_REFUSED != 0 {
        // The quoted IP header follows the 8-byte ICMP header. (IPv6 extension headers
        // before the ICMPv6 header are not followed: such an error is not counted.)
        ETH_HLEN + header_len + 8
    } else {
        ETH_HLEN
    };
    let Some((src, dst)) = addresses(ctx, family, offset) else {
        return;
    };
    // A RST runs back to the prober (its destination); a quoted packet is the probe.
    let (scanner, target) = if what & watch::ICMP_REFUSED != 0 {
        (src, dst)
    } else {
        (dst, src)
    };
    refused(
        cfg,
        family,
        &scanner,
        &target,
        what,
        ifindex,
        direction as u8,
        now,
    );
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn refused(
    cfg: &ThreatConfig,
    family: u8,
    scanner: &[u32; 4],
    target: &[u32; 4],
    what: u32,
    ifindex: u32,
    direction: u8,
    now: u64,
) {
    if !enabled(cfg, threat::PORT_SCAN) {
        return;
    }
    if what & watch::UNLESS_PROBER_LOCAL != 0 && endpoint::remote(family, scanner).ifindex != 0 {
        return;
    }
    let mut k = key(threat::PORT_SCAN, family);
    k.src = *scanner;
    k.dst = *target;
    let Some(slot) = live_slot(&k, window_ns(cfg, threat::PORT_SCAN), now) else {
        return;
    };
    slot.marks += 1;
    check_port_scan(cfg, slot, ifindex, direction, now);
}

// ---------------------------------------------------------------------------------------------
// Reading addresses again from the packet (cheaper for `track`'s stack than passing them)
// ---------------------------------------------------------------------------------------------

/// The IP family and header length of the packet's IP header (at ETH_HLEN).
#[inline(always)]
fn ip_header(ctx: &TcContext) -> Option<(u8, usize)> {
    let first: u8 = ctx.load(ETH_HLEN).ok()?;
    match first >> 4 {
        4 => Some((FAMILY_V4, ((first & 0x0f) as usize) * 4)),
        6 => Some((FAMILY_V6, 40)),
        _ => None,
    }
}

/// Source and destination of the IP header at `offset`, as raw words.
#[inline(always)]
fn addresses(ctx: &TcContext, family: u8, offset: usize) -> Option<([u32; 4], [u32; 4])> {
    if family == FAMILY_V4 {
        let s: u32 = ctx.load(offset + 12).ok()?;
        let d: u32 = ctx.load(offset + 16).ok()?;
        Some(([s, 0, 0, 0], [d, 0, 0, 0]))
    } else {
        let s: [u32; 4] = ctx.load(offset + 8).ok()?;
        let d: [u32; 4] = ctx.load(offset + 24).ok()?;
        Some((s, d))
    }
}

/// A new flow `moat_after_dnat` dropped by policy (left in SCRATCH_AFTER_DNAT).
#[inline(never)]
pub fn policy_drop_after_dnat(ifindex: u32, now: u64) {
    let Some(cfg) = config() else {
        return;
    };
    let Some(slot) = SCRATCH_AFTER_DNAT.get_ptr(0) else {
        return;
    };
    policy_drop(cfg, unsafe { &*slot }, ifindex, DIRECTION_EGRESS, now);
}

/// A new flow policy dropped (enforced): a burst of them from one source is probing.
#[inline(always)]
fn policy_drop(cfg: &ThreatConfig, pkt: &Packet, ifindex: u32, direction: u8, now: u64) {
    if !enabled(cfg, threat::POLICY_PROBING) {
        return;
    }
    let mut k = key(threat::POLICY_PROBING, pkt.family);
    k.src = pkt.saddr;
    let Some(slot) = slot_for(&k, window_ns(cfg, threat::POLICY_PROBING), now) else {
        return;
    };
    slot.count += 1;
    if mark_seen(slot, mix(addr_hash(&pkt.daddr), pkt.dport as u32)) {
        sample_port(slot, pkt.dport);
    }
    if slot.reported == 0 && slot.count >= threshold(cfg, threat::POLICY_PROBING) {
        let bits = sketch_bits(slot);
        report(slot, ifindex, direction, bits, now);
    }
}

/// A packet an endpoint sent from an address that is not its own (already dropped).
#[inline(always)]
fn spoofed(cfg: &ThreatConfig, ctx: &TcContext, ifindex: u32, now: u64) {
    if !enabled(cfg, threat::SPOOFING) {
        return;
    }
    let Some((family, _)) = ip_header(ctx) else {
        return;
    };
    let Some((saddr, _)) = addresses(ctx, family, ETH_HLEN) else {
        return;
    };
    let mut k = key(threat::SPOOFING, family);
    k.dst[0] = ifindex;
    let Some(slot) = slot_for(&k, window_ns(cfg, threat::SPOOFING), now) else {
        return;
    };
    slot.count += 1;
    if mark_seen(slot, addr_hash(&saddr)) {
        sample_word(slot, addr_sample(family, &saddr));
    }
    if slot.count >= threshold(cfg, threat::SPOOFING) && slot.reported == 0 {
        let bits = sketch_bits(slot);
        // The report names the spoofed source; the slot stays keyed by the endpoint.
        slot.key.src = saddr;
        report(slot, ifindex, DIRECTION_EGRESS, bits, now);
        slot.key.src = [0; 4];
    }
}

// ---------------------------------------------------------------------------------------------
// SYN flood: half-open connections towards one endpoint and port
// ---------------------------------------------------------------------------------------------

/// A TCP SYN starting a flow towards a local endpoint (counted at the receiver's hook,
/// `ifindex`). The subject is the receiving endpoint and port, keyed by its ifindex so that
/// the completing ACK (see `handshake_completed`) finds it without the packet.
#[inline(always)]
fn syn_received(cfg: &ThreatConfig, pkt: &Packet, ifindex: u32, now: u64) {
    if !enabled(cfg, threat::SYN_FLOOD) {
        return;
    }
    let k = flood_key(pkt.family, ifindex, pkt.dport);
    let Some(slot) = slot_for(&k, window_ns(cfg, threat::SYN_FLOOD), now) else {
        return;
    };
    slot.count += 1;
    if mark_seen(slot, addr_hash(&pkt.saddr)) {
        sample_word(slot, addr_sample(pkt.family, &pkt.saddr));
    }
    let half_open = slot.count.saturating_sub(slot.marks);
    if half_open >= threshold(cfg, threat::SYN_FLOOD) && slot.reported == 0 {
        let bits = sketch_bits(slot);
        // The report names the victim's address; the slot stays keyed by its ifindex.
        slot.key.dst = pkt.daddr;
        report(slot, ifindex, DIRECTION_INGRESS, bits, now);
        slot.key.dst = k.dst;
    }
}

#[inline(always)]
fn flood_key(family: u8, victim_ifindex: u32, port: u16) -> ThreatKey {
    ThreatKey {
        kind: threat::SYN_FLOOD,
        family,
        proto: PROTO_TCP,
        _pad: 0,
        port,
        _pad2: 0,
        src: [0; 4],
        dst: [victim_ifindex, 0, 0, 0],
    }
}

/// True for the client's first plain ACK on an established flow this hook must count for
/// the SYN-flood detector: at the receiver's hook, or at the sender's when the flow is linked
/// (the receiver's hook then never sees that ACK). A flag test for every other packet.
#[inline(always)]
pub fn completes_handshake(entry: &CtValue, pkt: &Packet, reply: bool, direction: u8) -> bool {
    entry.flags & CT_FLAG_HANDSHAKE_SEEN == 0
        && !reply
        && pkt.proto == PROTO_TCP
        && pkt.tcp_flags & (TCP_SYN | TCP_RST | TCP_FIN | TCP_ACK) == TCP_ACK
        && entry.state == CT_STATE_ESTABLISHED
        && entry.direction == direction
        && (direction == DIRECTION_INGRESS || entry.peer_ifindex != 0)
}

/// Counts a completed handshake against its SYN (see `completes_handshake`; the caller set
/// the entry's flag). `family_port` is the family in the high 16 bits and the port in the
/// low.
#[inline(always)]
fn handshake_completed(cfg: &ThreatConfig, victim: u32, family_port: u32, now: u64) {
    if !enabled(cfg, threat::SYN_FLOOD) {
        return;
    }
    let k = flood_key((family_port >> 16) as u8, victim, family_port as u16);
    if let Some(slot) = live_slot(&k, window_ns(cfg, threat::SYN_FLOOD), now) {
        slot.marks += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// DNS tunnelling: long or high-entropy names, or many unique names, from one source
// ---------------------------------------------------------------------------------------------

/// What a query name looks like, read from the wire format.
struct NameShape {
    hash: u32,
    length: u32,
    longest_label: u32,
    distinct_chars: u32,
}

/// Reads the question name of the DNS query `stage`d (a UDP packet of `ctx`) and counts it
/// for its source.
#[inline(never)]
pub fn dns_query(ctx: &TcContext, ifindex: u32) {
    let Some(cfg) = config() else {
        return;
    };
    let now = now_ns();
    if !enabled(cfg, threat::DNS_TUNNEL) {
        return;
    }
    let Some((family, header_len)) = ip_header(ctx) else {
        return;
    };
    if family == FAMILY_V6 {
        // Only a UDP header right after the fixed header is read: DNS queries carry no
        // extension headers in practice.
        match ctx.load::<u8>(ETH_HLEN + 6) {
            Ok(next) if next == PROTO_UDP => {}
            _ => return,
        }
    }
    let Some((saddr, _)) = addresses(ctx, family, ETH_HLEN) else {
        return;
    };
    let Some(shape) = read_name(ctx, ETH_HLEN + header_len) else {
        return;
    };
    let mut k = key(threat::DNS_TUNNEL, family);
    k.proto = PROTO_UDP;
    k.port = DNS_PORT;
    k.src = saddr;
    let Some(slot) = slot_for(&k, window_ns(cfg, threat::DNS_TUNNEL), now) else {
        return;
    };
    slot.count += 1;
    let suspicious = shape.longest_label >= cfg.dns_long_label as u32
        || shape.length >= cfg.dns_long_name as u32
        || (shape.length >= cfg.dns_entropy_min_len as u32
            && shape.distinct_chars >= cfg.dns_entropy_chars as u32);
    if suspicious {
        slot.marks += 1;
        sample_word(slot, shape.length | shape.longest_label << 16);
    }
    mark_seen(slot, shape.hash);
    if slot.reported != 0 {
        return;
    }
    let bits = sketch_bits(slot);
    if slot.marks >= threshold(cfg, threat::DNS_TUNNEL) || bits >= cfg.dns_unique_bits {
        report(slot, ifindex, DIRECTION_EGRESS, bits, now);
    }
}

/// The question name's shape, lower-cased for the hash (resolvers may randomise case).
/// `l4` is the UDP header's offset. None when the packet is too short or the name is not a
/// plain sequence of labels.
#[inline(always)]
fn read_name(ctx: &TcContext, l4: usize) -> Option<NameShape> {
    // The question follows the UDP header (8 bytes) and the DNS header (12 bytes).
    let offset = l4 + 8 + 12;
    let buf = unsafe { &mut *SCRATCH_DNS_NAME.get_ptr_mut(0)? };
    let available = (ctx.len() as usize).checked_sub(offset)?;
    if available == 0 {
        return None;
    }
    // 1..=DNS_NAME_MAX in a form the verifier can bound from both sides.
    let read = ((available.min(DNS_NAME_MAX) - 1) & (DNS_NAME_MAX - 1)) + 1;
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset as u32,
            buf.as_mut_ptr() as *mut _,
            read as u32,
        )
    };
    if loaded != 0 {
        return None;
    }
    // bpf_loop: the verifier checks the step once, where an unrolled walk of 256 bytes
    // would cost it most of its budget for the whole program.
    let mut walk = NameWalk {
        read: read as u32,
        next_label: 0,
        length: 0,
        longest_label: 0,
        hash: 0x811c_9dc5,
        ended: 0,
        chars: [0; 2],
    };
    unsafe {
        bpf_loop(
            DNS_NAME_MAX as u32,
            name_step as *mut c_void,
            &mut walk as *mut NameWalk as *mut c_void,
            0,
        );
    }
    if walk.ended == 0 {
        return None;
    }
    Some(NameShape {
        hash: walk.hash,
        length: walk.length,
        longest_label: walk.longest_label,
        distinct_chars: popcount(walk.chars[0]) + popcount(walk.chars[1]),
    })
}

/// State of one walk over a question name (see `name_step`).
#[repr(C)]
struct NameWalk {
    read: u32,
    next_label: u32,
    length: u32,
    longest_label: u32,
    hash: u32,
    /// 1 when the name's terminating zero label was reached.
    ended: u32,
    /// Characters seen, as a bit set of their low 7 bits.
    chars: [u64; 2],
}

/// One byte of the name in SCRATCH_DNS_NAME: a label length at a label boundary, else a
/// character. 0 goes on, 1 stops the walk.
extern "C" fn name_step(index: u64, walk: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(walk as *mut NameWalk) };
    let i = index as usize;
    if i >= walk.read as usize || i >= DNS_NAME_MAX {
        return 1;
    }
    let Some(buf) = SCRATCH_DNS_NAME.get_ptr(0) else {
        return 1;
    };
    let b = unsafe { (*buf)[i & (DNS_NAME_MAX - 1)] };
    if i == walk.next_label as usize {
        if b == 0 {
            walk.ended = 1;
            return 1;
        }
        if b > 63 {
            // A compression pointer or a reserved label type: not a query name.
            return 1;
        }
        walk.next_label = (i + 1 + b as usize) as u32;
        if b as u32 > walk.longest_label {
            walk.longest_label = b as u32;
        }
        walk.length += b as u32 + 1;
        walk.hash = (walk.hash ^ b'.' as u32).wrapping_mul(0x0100_0193);
    } else {
        let c = if b.is_ascii_uppercase() { b | 0x20 } else { b };
        walk.chars[((c >> 6) & 1) as usize] |= 1u64 << (c & 63);
        walk.hash = (walk.hash ^ c as u32).wrapping_mul(0x0100_0193);
    }
    0
}
