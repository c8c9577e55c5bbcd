//! Every map key, map value, event and constant that Moat's eBPF programs and its userspace
//! share. Both sides compile these exact definitions, so they cannot drift; the size
//! assertions at the bottom catch an accidental layout change at compile time, and
//! `LAYOUT_VERSION` (part of the bpffs pin path) must be bumped whenever one changes.
#![no_std]

use core::net::{Ipv4Addr, Ipv6Addr};

/// Bumped on any change to a type below. Pinned state of another layout is never reused.
pub const LAYOUT_VERSION: u32 = 5;

// ---------------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------------

/// Wildcard: in a policy key, matches any remote identity.
pub const IDENTITY_ANY: u32 = 0;
/// The local node's own addresses (kubelet probes, host-network pods).
pub const IDENTITY_HOST: u32 = 1;
/// Anything outside the cluster that no ipBlock names more precisely.
pub const IDENTITY_WORLD: u32 = 2;
/// A cluster address with no known endpoint (for example a pod Moat does not manage).
pub const IDENTITY_UNMANAGED: u32 = 3;
/// Another node of the cluster.
pub const IDENTITY_REMOTE_NODE: u32 = 4;
/// First identity that can be derived from labels; everything below is reserved.
pub const IDENTITY_FIRST_DERIVED: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Enumerations stored as integers in maps and events
// ---------------------------------------------------------------------------------------------

/// Traffic entering the pod (TCX egress of the host-side veth).
pub const DIRECTION_INGRESS: u8 = 0;
/// Traffic leaving the pod (TCX ingress of the host-side veth).
pub const DIRECTION_EGRESS: u8 = 1;

pub const MODE_ENFORCE: u8 = 0;
/// Evaluate, allow, and report what would have been dropped.
pub const MODE_AUDIT: u8 = 1;
/// Allow and report every new flow, so that policy can be suggested from it.
pub const MODE_LEARN: u8 = 2;

pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DROP: u8 = 1;
/// Allowed only because the endpoint is in audit mode; enforce would have dropped it.
pub const VERDICT_AUDIT: u8 = 2;

/// A rule's action. NetworkPolicy and MoatPolicy rules allow or deny; ClusterNetworkPolicy
/// rules accept (ACTION_ALLOW), deny, or pass (skip the rest of their tier).
pub const ACTION_ALLOW: u8 = 1;
pub const ACTION_DENY: u8 = 2;
pub const ACTION_PASS: u8 = 3;

/// The tiers a rule belongs to, judged in this order: Admin ClusterNetworkPolicies, then
/// NetworkPolicies (and MoatPolicies), then Baseline ClusterNetworkPolicies, then the default
/// (allow). Within Admin and Baseline the first matching rule decides, and "first" is the
/// lowest rule id: moatd numbers those rules in evaluation order (priority, policy, index).
pub const TIER_NETPOL: u8 = 0;
pub const TIER_ADMIN: u8 = 1;
pub const TIER_BASELINE: u8 = 2;

/// Why a packet got its verdict. Values below `REASON_FIRST_DROP` allow.
pub mod reason {
    pub const UNKNOWN: u8 = 0;
    /// A new flow matched an allow rule.
    pub const POLICY_ALLOW: u8 = 1;
    /// Part of a tracked flow, same direction as its first packet.
    pub const ESTABLISHED: u8 = 2;
    /// Part of a tracked flow, opposite direction (a reply).
    pub const REPLY: u8 = 3;
    /// An ICMP error about a tracked flow.
    pub const RELATED: u8 = 4;
    /// From the node itself: a pod may never block its own node.
    pub const HOST: u8 = 5;
    /// ARP or IPv6 neighbour discovery.
    pub const NEIGHBOR: u8 = 6;
    /// Egress to a Service address: judged after the host's DNAT, where the backend is known.
    pub const SERVICE_DEFERRED: u8 = 7;
    /// Allowed because the endpoint is in learn mode.
    pub const LEARN: u8 = 8;
    /// Part of a flow this endpoint admitted, as the sending pod's hook found in the flow's
    /// linked entry (a direct TCP connection between two pods of this node).
    pub const PEER_ADMITTED: u8 = 9;
    /// Part of a flow this endpoint admitted, forwarded by the sending pod's hook straight
    /// into this pod (the host's stack and this endpoint's own hook never see the packet).
    pub const PEER_DELIVERED: u8 = 10;
    /// A new flow matched an Accept rule of an Admin ClusterNetworkPolicy.
    pub const ADMIN_ACCEPT: u8 = 11;
    /// A new flow matched an Accept rule of a Baseline ClusterNetworkPolicy.
    pub const BASELINE_ACCEPT: u8 = 12;
    /// A quarantined endpoint's new flow that its quarantine allows (DNS by default); the
    /// endpoint's policy judged it too.
    pub const QUARANTINE_ALLOWED: u8 = 13;

    pub const FIRST_DROP: u8 = 16;
    /// A new flow matched a deny rule.
    pub const POLICY_DENY: u8 = 16;
    /// A new flow matched no rule of an isolated endpoint.
    pub const DEFAULT_DENY: u8 = 17;
    /// Leaving the pod with a source address that is not the pod's.
    pub const SPOOFED_SOURCE: u8 = 18;
    /// Truncated or malformed headers.
    pub const MALFORMED: u8 = 19;
    /// An ethertype other than IPv4, IPv6 and ARP.
    pub const UNSUPPORTED_L3: u8 = 20;
    /// A non-first IP fragment whose first fragment was never seen.
    pub const FRAGMENT_UNKNOWN: u8 = 21;
    /// The conntrack or fragment map refused a new entry: fail closed.
    pub const STATE_MAP_FULL: u8 = 22;
    /// The interface has programs but no endpoint entry (not registered, or being torn down).
    pub const UNKNOWN_ENDPOINT: u8 = 23;
    /// A new flow matched a Deny rule of an Admin ClusterNetworkPolicy.
    pub const ADMIN_DENY: u8 = 24;
    /// A new flow matched a Deny rule of a Baseline ClusterNetworkPolicy.
    pub const BASELINE_DENY: u8 = 25;
    /// A new flow of a quarantined endpoint that its quarantine does not allow. Checked
    /// before policy.
    pub const QUARANTINED: u8 = 26;

    pub const COUNT: usize = 32;

    pub const fn is_drop(reason: u8) -> bool {
        reason >= FIRST_DROP
    }

    pub const fn name(reason: u8) -> &'static str {
        match reason {
            POLICY_ALLOW => "policy-allow",
            ESTABLISHED => "established",
            REPLY => "reply",
            RELATED => "related",
            HOST => "host",
            NEIGHBOR => "neighbor-discovery",
            SERVICE_DEFERRED => "service-deferred",
            LEARN => "learn",
            PEER_ADMITTED => "peer-admitted",
            PEER_DELIVERED => "peer-delivered",
            ADMIN_ACCEPT => "admin-accept",
            BASELINE_ACCEPT => "baseline-accept",
            QUARANTINE_ALLOWED => "quarantine-allowed",
            POLICY_DENY => "policy-deny",
            DEFAULT_DENY => "default-deny",
            SPOOFED_SOURCE => "spoofed-source",
            MALFORMED => "malformed",
            UNSUPPORTED_L3 => "unsupported-l3",
            FRAGMENT_UNKNOWN => "fragment-unknown",
            STATE_MAP_FULL => "state-map-full",
            UNKNOWN_ENDPOINT => "unknown-endpoint",
            ADMIN_DENY => "admin-deny",
            BASELINE_DENY => "baseline-deny",
            QUARANTINED => "quarantined",
            _ => "unknown",
        }
    }
}

/// Compact rule ids with a fixed meaning; the daemon numbers real rules from `RULE_FIRST_USER`.
pub mod rule {
    /// No rule decided (default deny, or a verdict that is not a policy decision).
    pub const NONE: u32 = 0;
    /// Allow-all written for an endpoint that no policy isolates in that direction.
    pub const NOT_ISOLATED: u32 = 1;
    /// The node's own traffic.
    pub const HOST: u32 = 2;
    pub const FIRST_USER: u32 = 16;
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

// ---------------------------------------------------------------------------------------------
// Map names and sizes (one place, used by the programs and by the pinning code)
// ---------------------------------------------------------------------------------------------

pub mod map_name {
    pub const ENDPOINTS: &str = "MOAT_ENDPOINTS";
    pub const IPCACHE_V4: &str = "MOAT_IPCACHE4";
    pub const IPCACHE_V6: &str = "MOAT_IPCACHE6";
    /// Exact-match mirrors of the ipcache's host entries (/32, /128): see `HOSTS_V4`.
    pub const HOSTS_V4: &str = "MOAT_HOSTS4";
    pub const HOSTS_V6: &str = "MOAT_HOSTS6";
    pub const POLICY: &str = "MOAT_POLICY";
    pub const PORT_RANGES: &str = "MOAT_PORTRANGES";
    pub const CIDR_V4: &str = "MOAT_CIDR4";
    pub const CIDR_V6: &str = "MOAT_CIDR6";
    pub const CONNTRACK: &str = "MOAT_CT";
    pub const FRAGMENTS: &str = "MOAT_FRAGS";
    pub const CONFIG: &str = "MOAT_CONFIG";
    pub const RATE_LIMIT: &str = "MOAT_RATELIM";
    pub const METRICS: &str = "MOAT_METRICS";
    pub const EVENTS: &str = "MOAT_EVENTS";
    pub const META: &str = "MOAT_META";
    pub const THREAT_CONFIG: &str = "MOAT_THREATCFG";
    pub const THREATS: &str = "MOAT_THREATS";
    pub const THREAT_EVENTS: &str = "MOAT_THREATEV";
    pub const FQDN_CONFIG: &str = "MOAT_FQDNCFG";
    pub const FQDN_PATTERNS: &str = "MOAT_FQDNPAT";
    pub const FQDN_V4: &str = "MOAT_FQDN4";
    pub const FQDN_V6: &str = "MOAT_FQDN6";
    pub const FQDN_NAMES: &str = "MOAT_FQDNNAME";
    pub const DNS_QUERIES: &str = "MOAT_DNSQ";
}

pub mod map_size {
    pub const ENDPOINTS: u32 = 16_384;
    pub const IPCACHE: u32 = 262_144;
    pub const POLICY: u32 = 262_144;
    pub const PORT_RANGES: u32 = 65_536;
    pub const CIDR: u32 = 65_536;
    pub const CONNTRACK: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8_192;
    pub const EVENTS_BYTES: u32 = 1 << 22;
    /// Detector slots (see `ThreatSlot`): 8,192 x 112 bytes, about 0.9 MiB.
    pub const THREATS: u32 = 8_192;
    /// A detection is reported once per subject and window, so the ring stays small.
    pub const THREAT_EVENTS_BYTES: u32 = 1 << 18;
    /// (identity, kind, name hash) -> FQDN selector: one entry per pattern and identity.
    pub const FQDN_PATTERNS: u32 = 65_536;
    /// Learned addresses per family, node-wide (LRU: at the cap the least recently used
    /// learned address goes first; see `FqdnAddr`).
    pub const FQDN_ADDRS: u32 = 65_536;
    /// Names of learned addresses, for `moatctl fqdn` and flow explanations (LRU).
    pub const FQDN_NAMES: u32 = 16_384;
    /// DNS queries awaiting their answer (LRU): a burst of queries evicts the oldest.
    pub const DNS_QUERIES: u32 = 16_384;
}

/// Program names (the `#[classifier]` function names) and their pin file names.
pub mod program_name {
    /// Attached at TCX ingress of the host-side veth: packets the pod sends.
    pub const FROM_CONTAINER: &str = "moat_from_container";
    /// Attached at TCX egress of the host-side veth: packets delivered to the pod.
    pub const TO_CONTAINER: &str = "moat_to_container";
    /// A socket filter that netfilter runs (an iptables `bpf` match) after the host's DNAT:
    /// the sender's egress for a connection to a Service whose backend is not a local pod.
    pub const AFTER_DNAT: &str = "moat_after_dnat";
}

// ---------------------------------------------------------------------------------------------
// Metrics: MOAT_METRICS is a per-CPU array indexed by `metric_index(verdict, reason,
// direction)`, followed by a few counters about the event path itself.
// ---------------------------------------------------------------------------------------------

pub const VERDICT_COUNT: u32 = 3;

pub const fn metric_index(verdict: u8, reason: u8, direction: u8) -> u32 {
    ((verdict as u32 % VERDICT_COUNT) * (reason::COUNT as u32)
        + (reason as u32 % reason::COUNT as u32))
        * 2
        + (direction as u32 & 1)
}
/// Events not emitted because the per-CPU rate limit was exhausted.
pub const METRIC_EVENTS_RATE_LIMITED: u32 = VERDICT_COUNT * (reason::COUNT as u32) * 2;
/// Events lost because the ring buffer was full (the daemon fell behind).
pub const METRIC_EVENTS_RING_FULL: u32 = METRIC_EVENTS_RATE_LIMITED + 1;
/// FQDN learning (see `FqdnAddr`): addresses written from DNS answers.
pub const METRIC_FQDN_LEARNED: u32 = METRIC_EVENTS_RING_FULL + 1;
/// DNS answers read and refused: no matching query (id, ports, resolver), or a question
/// name other than the one asked.
pub const METRIC_FQDN_UNASKED: u32 = METRIC_FQDN_LEARNED + 1;
/// DNS answers that could not be parsed within the datapath's bounds (malformed,
/// truncated, too many records or compression jumps): nothing learned from them.
pub const METRIC_FQDN_MALFORMED: u32 = METRIC_FQDN_UNASKED + 1;
/// Learned addresses removed by moatd to keep an identity under its cap (oldest first).
pub const METRIC_FQDN_CAPPED: u32 = METRIC_FQDN_MALFORMED + 1;
pub const METRIC_SLOTS: u32 = METRIC_FQDN_CAPPED + 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricValue {
    pub packets: u64,
    pub bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// Endpoints: host-side veth ifindex -> the pod behind it
// ---------------------------------------------------------------------------------------------

pub const MAX_ENDPOINT_V4: usize = 2;
pub const MAX_ENDPOINT_V6: usize = 2;
/// Report allowed new flows of this endpoint too (drops are always reported).
pub const ENDPOINT_FLAG_LOG_ALLOWS: u8 = 1;
/// Lookup hints, set by moatd from the entries it wrote for the endpoint's policy id. Each
/// lets the datapath skip work that cannot change the verdict; 0 (no hints) is always safe.
/// No deny entry and no ClusterNetworkPolicy entry exists for this policy id: the first allow
/// found decides.
pub const ENDPOINT_FLAG_NO_DENY: u8 = 2;
/// No port-range entry exists for this policy id.
pub const ENDPOINT_FLAG_NO_RANGES: u8 = 4;
/// No CIDR entry exists for this policy id.
pub const ENDPOINT_FLAG_NO_CIDR: u8 = 8;
/// The endpoint is quarantined: only the new flows `ThreatConfig::quarantine_allow` lists
/// leave it, and none enter it (checked before policy; see the datapath's threats.rs).
pub const ENDPOINT_FLAG_QUARANTINED: u8 = 16;
/// The endpoint's identity has FQDN rules: DNS answers it receives are read for addresses
/// (see `FqdnPatternKey`), and its new egress flows consult the learned addresses.
pub const ENDPOINT_FLAG_FQDN: u8 = 32;
pub const ENDPOINT_HINT_FLAGS: u8 =
    ENDPOINT_FLAG_NO_DENY | ENDPOINT_FLAG_NO_RANGES | ENDPOINT_FLAG_NO_CIDR;

/// The ENDPOINT_FLAG_NO_* hints a policy entry rules out for its policy id (a deny entry or a
/// tier entry makes every lookup necessary).
pub fn policy_entry_needs(value: &PolicyValue) -> u8 {
    if value.action == ACTION_DENY || value.admin_action != 0 || value.baseline_action != 0 {
        ENDPOINT_FLAG_NO_DENY
    } else {
        0
    }
}

/// The hints a port-range or CIDR rule set (`table`: ENDPOINT_FLAG_NO_RANGES or
/// ENDPOINT_FLAG_NO_CIDR) rules out for its policy id: its table, and deny lookups when one
/// of its rules denies.
pub fn rule_set_needs(set: &PortRuleSet, table: u8) -> u8 {
    let count = (set.count as usize).min(MAX_PORT_RULES);
    let mut i = 0;
    let mut has_deny = false;
    while i < count {
        has_deny |= set.rules[i].action == ACTION_DENY || set.rules[i].tier != TIER_NETPOL;
        i += 1;
    }
    table | if has_deny { ENDPOINT_FLAG_NO_DENY } else { 0 }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub identity: u32,
    /// Key into the policy maps. Equal to `identity` unless the endpoint needs entries of its
    /// own (named ports that resolve differently from its identity's other pods).
    pub policy_id: u32,
    pub mode: u8,
    pub flags: u8,
    pub v4_count: u8,
    pub v6_count: u8,
    pub _reserved: u32,
    /// Addresses as raw network-order words (see `raw_v4`/`raw_v6`).
    pub v4: [u32; MAX_ENDPOINT_V4],
    pub v6: [[u32; 4]; MAX_ENDPOINT_V6],
}

// ---------------------------------------------------------------------------------------------
// ipcache: longest-prefix match from an address to its identity
// ---------------------------------------------------------------------------------------------

/// The address is a Service (ClusterIP) address: egress towards it is judged after DNAT.
pub const IPCACHE_FLAG_SERVICE: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheKeyV4 {
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheKeyV6 {
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Host-side veth of the endpoint when it lives on this node, else 0.
    pub ifindex: u32,
    pub flags: u32,
    /// Node address to tunnel to for a remote endpoint (raw v4), 0 when local or unknown.
    pub tunnel_endpoint: u32,
}

// ---------------------------------------------------------------------------------------------
// Policy. Three lookups make up a verdict for a new flow (see policy.rs in moat-ebpf):
//   MOAT_POLICY      hash: exact (policy_id, remote identity, direction, protocol, port),
//                    with 0 as the wildcard for identity, protocol and port;
//   MOAT_PORTRANGES  hash: port ranges (endPort) per (policy_id, remote identity, direction,
//                    protocol);
//   MOAT_CIDR4/6     LPM: ipBlocks per (policy_id, direction) on the remote address, because
//                    a CIDR can cover only some of the pods that share an identity.
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub policy_id: u32,
    pub remote_identity: u32,
    /// Destination port in host byte order; 0 = any port.
    pub dport: u16,
    /// IP protocol; 0 = any protocol.
    pub proto: u8,
    pub direction: u8,
}

/// One key's verdicts in each tier. The NetworkPolicy tier (`rule_id`, `action`) is as it has
/// always been: ACTION_ALLOW or ACTION_DENY, 0 for none. The Admin and Baseline tiers hold
/// the first ClusterNetworkPolicy rule (lowest id) of that tier that covers the key, with its
/// action, or action 0. One value per key keeps a verdict at the same number of lookups
/// whatever the number of tiers and rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub rule_id: u32,
    pub action: u8,
    pub admin_action: u8,
    pub baseline_action: u8,
    pub _pad: u8,
    pub admin_rule: u32,
    pub baseline_rule: u32,
}

impl PolicyValue {
    /// A NetworkPolicy-tier entry and nothing in the other tiers.
    pub const fn netpol(action: u8, rule_id: u32) -> Self {
        Self {
            rule_id,
            action,
            admin_action: 0,
            baseline_action: 0,
            _pad: 0,
            admin_rule: 0,
            baseline_rule: 0,
        }
    }

    pub const fn allow(rule_id: u32) -> Self {
        Self::netpol(ACTION_ALLOW, rule_id)
    }

    pub const fn deny(rule_id: u32) -> Self {
        Self::netpol(ACTION_DENY, rule_id)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRangeKey {
    pub policy_id: u32,
    pub remote_identity: u32,
    pub proto: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// One port rule inside a `PortRuleSet`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    pub rule_id: u32,
    /// Inclusive range in host byte order; 0..=65535 covers every port.
    pub port_start: u16,
    pub port_end: u16,
    /// 0 = any protocol.
    pub proto: u8,
    pub action: u8,
    /// TIER_NETPOL, TIER_ADMIN or TIER_BASELINE.
    pub tier: u8,
    pub _pad: u8,
}

pub const MAX_PORT_RULES: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRuleSet {
    pub count: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

impl Default for PortRuleSet {
    fn default() -> Self {
        Self {
            count: 0,
            rules: [PortRule::default(); MAX_PORT_RULES],
        }
    }
}

/// Bits of a CIDR key before the address: policy_id (32) + direction and padding (32).
pub const CIDR_KEY_FIXED_BITS: u32 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKeyV4 {
    pub policy_id: [u8; 4],
    pub direction: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKeyV6 {
    pub policy_id: [u8; 4],
    pub direction: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

// ---------------------------------------------------------------------------------------------
// Connection tracking. Each endpoint tracks its own connections (ifindex is in the key), so a
// flow between two local pods is judged by both perimeters independently.
// ---------------------------------------------------------------------------------------------

/// A flow's key. Its two ends are stored in a fixed order (the lower address, then the lower
/// port, as source), so that a packet finds its flow in one lookup whichever way it runs;
/// `CT_FLAG_KEY_REVERSED` in the value tells which end started the flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ifindex: u32,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The same flow seen from its other end.
    pub fn reversed(&self) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

pub const CT_STATE_SYN_SENT: u8 = 1;
pub const CT_STATE_ESTABLISHED: u8 = 2;
pub const CT_STATE_CLOSING: u8 = 3;

/// The flow went to a Service address and was let through for judgement after DNAT.
pub const CT_FLAG_SERVICE: u8 = 1;
pub const CT_FLAG_FIN_FORWARD: u8 = 2;
pub const CT_FLAG_FIN_REPLY: u8 = 4;
/// Allowed only because of audit or learn mode.
pub const CT_FLAG_NOT_ENFORCED: u8 = 8;
/// The flow's first packet ran from the key's destination to its source: the initiator's
/// tuple is the key reversed.
pub const CT_FLAG_KEY_REVERSED: u8 = 16;
/// The flow's first packet came in to the endpoint addressed to none of the endpoint's own
/// addresses (a flooded or misrouted packet). Packets the endpoint sends in such a flow get
/// the full source-address check: the entry proves nothing about their source.
pub const CT_FLAG_FOREIGN_DEST: u8 = 32;
/// The client's ACK completing this TCP flow's handshake was counted by the SYN-flood
/// detector (once per entry).
pub const CT_FLAG_HANDSHAKE_SEEN: u8 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// CLOCK_MONOTONIC time (read coarse, bpf_ktime_get_coarse_ns) after which the entry is
    /// dead.
    pub expires_ns: u64,
    pub rule_id: u32,
    pub remote_identity: u32,
    pub state: u8,
    pub flags: u8,
    /// Direction of the flow's first packet, as seen by this endpoint.
    pub direction: u8,
    pub _pad: u8,
    /// For a TCP flow between two endpoints of this node that both perimeters admitted
    /// under the same tuple: the other endpoint's host-side ifindex (0 otherwise). Packets
    /// this endpoint sends in the flow are then delivered straight into the other pod, or
    /// carry a `peer_handoff` telling the other endpoint's hook that its perimeter already
    /// admitted them. Was a packet count (always 0
    /// since layout 2), so entries written before read as unlinked.
    pub peer_ifindex: u32,
}

// ---------------------------------------------------------------------------------------------
// Peer handoff: a same-node flow judged once per packet instead of twice.
// ---------------------------------------------------------------------------------------------

/// Set in `skb->tc_index` by the sending pod's hook: the receiving endpoint (the ifindex in
/// the low bits) already admitted this packet's flow. tc_index, not the mark: netfilter
/// rules of other tools match mark bits (portmap's masquerade bit 13, kube-proxy's 14 and
/// 15; a mark with bit 13 set got pod-to-pod packets masqueraded here), and nothing on the
/// host's forwarding path reads or rewrites tc_index but tc itself. The sending hook
/// rewrites it on every packet a pod sends, so a pod cannot bring its own.
pub const PEER_HANDOFF_FLAG: u32 = 0x8000;
/// The low 15 bits of the receiver's ifindex: a packet can only reach another device with
/// the same low bits by being routed to the wrong pod, and a perimeter that goes away is
/// unlinked first (see `CtValue::peer_ifindex`).
pub const PEER_HANDOFF_IFINDEX_BITS: u32 = 0x7fff;

/// The tc_index telling endpoint `ifindex`'s receiving hook that its perimeter already
/// admitted the packet's flow.
#[inline(always)]
pub const fn peer_handoff(ifindex: u32) -> u32 {
    PEER_HANDOFF_FLAG | (ifindex & PEER_HANDOFF_IFINDEX_BITS)
}

/// True when `tc_index`, read at endpoint `ifindex`'s receiving hook, is a handoff for it.
#[inline(always)]
pub const fn is_peer_handoff(tc_index: u32, ifindex: u32) -> bool {
    ifindex != 0 && tc_index == peer_handoff(ifindex)
}

/// Timeouts, in seconds, from the first and every later packet of a flow.
pub mod ct_timeout {
    pub const TCP_SYN: u64 = 60;
    pub const TCP_ESTABLISHED: u64 = 21_600;
    pub const TCP_CLOSING: u64 = 10;
    pub const UDP: u64 = 60;
    pub const ICMP: u64 = 30;
    pub const OTHER: u64 = 60;
}

// ---------------------------------------------------------------------------------------------
// IP fragments: ports of a datagram, remembered from its first fragment
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}

// ---------------------------------------------------------------------------------------------
// Global configuration, rate limiting, layout guard
// ---------------------------------------------------------------------------------------------

/// Report every allowed new flow on every endpoint.
pub const CONFIG_FLAG_LOG_ALL_ALLOWS: u32 = 1;
/// Send linked local flows through the host's stack instead of delivering them directly
/// into the receiving pod (see the datapath's deliver.rs).
pub const CONFIG_FLAG_LOCAL_VIA_HOST: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    /// Events each CPU may emit per second; 0 means the built-in default.
    pub events_per_second: u32,
    /// Burst of events above the rate; 0 means the built-in default.
    pub events_burst: u32,
    pub _pad: u32,
}

impl Config {
    /// Sets or clears one `CONFIG_FLAG_*` bit, leaving the others.
    pub fn set_flag(&mut self, flag: u32, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }
}

pub const DEFAULT_EVENTS_PER_SECOND: u32 = 5_000;
pub const DEFAULT_EVENTS_BURST: u32 = 1_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitState {
    /// Tokens, scaled by `RATE_LIMIT_SCALE` to avoid division in the kernel.
    pub tokens: u64,
    pub last_ns: u64,
}

/// Written by the loader into MOAT_META[0]; checked before pinned maps are reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub layout_version: u32,
    pub _pad: u32,
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    pub ifindex: u32,
    pub local_identity: u32,
    pub remote_identity: u32,
    pub rule_id: u32,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub mode: u8,
    pub tcp_flags: u8,
    pub _pad: u8,
    pub bytes: u32,
}

// ---------------------------------------------------------------------------------------------
// Threat detection: detector kinds, thresholds, per-subject state and detection events
// ---------------------------------------------------------------------------------------------

/// Detector kinds. Each indexes `ThreatConfig`'s arrays and names a `ThreatEvent`.
pub mod threat {
    /// One source, many distinct destination ports on one peer, mostly refused or dropped.
    pub const PORT_SCAN: u8 = 1;
    /// One source, many distinct destination addresses on one protocol and port.
    pub const HOST_SWEEP: u8 = 2;
    /// Half-open TCP connections towards one endpoint and port.
    pub const SYN_FLOOD: u8 = 3;
    /// Policy drops of one source's new flows.
    pub const POLICY_PROBING: u8 = 4;
    /// DNS queries with long or high-entropy names, or many unique names, from one source.
    pub const DNS_TUNNEL: u8 = 5;
    /// Packets an endpoint sent with a source address that is not its own.
    pub const SPOOFING: u8 = 6;
    /// Array length for per-kind settings (index 0 unused).
    pub const SLOTS: usize = 8;
    pub const ALL: [u8; 6] = [
        PORT_SCAN,
        HOST_SWEEP,
        SYN_FLOOD,
        POLICY_PROBING,
        DNS_TUNNEL,
        SPOOFING,
    ];

    pub const fn name(kind: u8) -> &'static str {
        match kind {
            PORT_SCAN => "port-scan",
            HOST_SWEEP => "host-sweep",
            SYN_FLOOD => "syn-flood",
            POLICY_PROBING => "policy-probing",
            DNS_TUNNEL => "dns-tunnel",
            SPOOFING => "spoofing",
            _ => "unknown",
        }
    }

    pub fn from_name(name: &str) -> Option<u8> {
        ALL.iter().copied().find(|k| self::name(*k) == name)
    }

    /// Bits of the distinct-value sketch in `ThreatSlot::seen`.
    pub const SKETCH_BITS: u32 = 256;
}

/// A quarantine allowance: egress new flows to this protocol and destination port.
/// `proto` 0 ends the list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuarantineAllow {
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

pub const MAX_QUARANTINE_ALLOW: usize = 4;
/// `proto` of a first allowance that allows nothing: moatd writes it for an empty list. A
/// first `proto` of 0 means no list was ever written, and then DNS alone leaves (the
/// documented default). 255 is a reserved IP protocol, so it matches no packet.
pub const QUARANTINE_ALLOW_NOTHING: u8 = 255;

/// Detector settings, written by moatd into MOAT_THREATCFG[0]. A zero `enabled` turns
/// every detector off (the datapath then does no detection work at all).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreatConfig {
    /// Bit `1 << kind` per enabled detector.
    pub enabled: u32,
    /// Per kind: the window in milliseconds.
    pub window_ms: [u32; threat::SLOTS],
    /// Per kind: the count that fires the detector. For PORT_SCAN and HOST_SWEEP it is a
    /// number of set bits in the distinct sketch (userspace converts a distinct count with
    /// m(1 - e^(-n/m)), m = `threat::SKETCH_BITS`); for DNS_TUNNEL,
    /// suspicious names.
    pub threshold: [u32; threat::SLOTS],
    /// DNS_TUNNEL only: set bits of the unique-name sketch that fire the detector too.
    pub dns_unique_bits: u32,
    /// DNS_TUNNEL: a label at least this long makes a name suspicious.
    pub dns_long_label: u16,
    /// DNS_TUNNEL: a name at least this long is suspicious.
    pub dns_long_name: u16,
    /// DNS_TUNNEL: a name at least `dns_entropy_min_len` long using at least this many
    /// distinct characters is suspicious (a cheap stand-in for Shannon entropy).
    pub dns_entropy_chars: u16,
    pub dns_entropy_min_len: u16,
    pub quarantine_allow: [QuarantineAllow; MAX_QUARANTINE_ALLOW],
}

/// Who a detector's state belongs to. `src`/`dst` are raw address words as in `CtKey`;
/// SPOOFING keys by the endpoint's ifindex in `dst[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreatKey {
    pub kind: u8,
    pub family: u8,
    pub proto: u8,
    pub _pad: u8,
    pub port: u16,
    pub _pad2: u16,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// One detector slot of MOAT_THREATS, an array used as a direct-mapped cache: a subject
/// hashes to one slot and takes it over from whoever held it (the least recently seen loses,
/// as in an LRU of one way). Fixed size, no allocation, and a full table costs detection
/// accuracy, never a verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreatSlot {
    pub key: ThreatKey,
    pub window_start_ns: u64,
    /// Events of the window: new flows, drops, queries or SYNs.
    pub count: u32,
    /// The detector's second count: refused probes (PORT_SCAN), completed handshakes
    /// (SYN_FLOOD), suspicious names (DNS_TUNNEL).
    pub marks: u32,
    /// Non-zero once this window's detection was reported.
    pub reported: u32,
    pub _pad: u32,
    /// Linear-counting sketch of distinct ports, addresses or names.
    pub seen: [u64; 4],
    /// The first few ports (PORT_SCAN: two per word) or IPv4 addresses / IPv6 last words
    /// (HOST_SWEEP) seen this window, as evidence.
    pub samples: [u32; 4],
}

/// A detection, from MOAT_THREATEV.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreatEvent {
    pub timestamp_ns: u64,
    pub window_start_ns: u64,
    /// The local endpoint whose hook saw it (its host-side ifindex).
    pub ifindex: u32,
    pub count: u32,
    pub marks: u32,
    /// Set bits of the distinct sketch (distinct values ~ -m ln(1 - bits/m)).
    pub sketch_bits: u32,
    pub kind: u8,
    pub family: u8,
    pub proto: u8,
    pub direction: u8,
    pub port: u16,
    pub _pad: u16,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub samples: [u32; 4],
}

// ---------------------------------------------------------------------------------------------
// Address helpers: maps store addresses as the raw network-order words read from packets
// ---------------------------------------------------------------------------------------------

pub const fn raw_v4(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub const fn raw_v6(addr: Ipv6Addr) -> [u32; 4] {
    let o = addr.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

pub const fn v4_from_raw(raw: u32) -> Ipv4Addr {
    let o = raw.to_ne_bytes();
    Ipv4Addr::new(o[0], o[1], o[2], o[3])
}

pub fn v6_from_raw(raw: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in raw.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

// ---------------------------------------------------------------------------------------------
// FQDN egress: policy names external hosts; the datapath reads DNS answers on their way to the
// pod and learns the answered addresses before the pod sees them.
//
//   MOAT_DNSQ       LRU hash: queries the pod sent (resolver, ports, id, question hash); only
//                   an answer that matches one is read;
//   MOAT_FQDNPAT    hash: (identity, EXACT|SUBDOMAIN, name hash) -> FQDN selector identity;
//   MOAT_FQDN4/6    LRU hash: (identity, address) -> the selectors it was learned for, until
//                   its expiry;
//   MOAT_FQDNNAME   LRU hash: question hash -> the name as text, for explanations;
//   MOAT_FQDNCFG    array[1]: TTL floor and cap.
//
// A learned address is a remote identity like any other for the policy lookup: the policy map
// holds (policy_id, selector identity, port, protocol, egress) entries for FQDN rules.
// ---------------------------------------------------------------------------------------------

/// FQDN selector identities (one per distinct name pattern) live in
/// [IDENTITY_FQDN_FIRST, IDENTITY_FQDN_END), above every derived identity.
pub const IDENTITY_FQDN_FIRST: u32 = 1 << 24;
pub const IDENTITY_FQDN_END: u32 = 1 << 25;

/// The pattern names exactly this name (`api.example.com`).
pub const FQDN_MATCH_EXACT: u8 = 1;
/// The pattern is `*.` + this name: it matches names with one or more labels before it
/// (`*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`).
pub const FQDN_MATCH_SUBDOMAIN: u8 = 2;

/// Longest name (in wire form) the datapath reads, and most labels it hashes.
pub const FQDN_MAX_NAME: usize = 255;
pub const FQDN_MAX_LABELS: usize = 32;
/// Answer records read per response, CNAME links followed, compression jumps per name.
pub const FQDN_MAX_ANSWERS: usize = 64;
pub const FQDN_MAX_CHAIN: usize = 8;
pub const FQDN_MAX_JUMPS: usize = 8;
/// Selectors one learned address can carry (a name can match an exact and wildcards).
pub const MAX_FQDN_SELECTORS: usize = 4;

const FQDN_LABEL_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const FQDN_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Hash of the root (the empty suffix).
pub const FQDN_ROOT_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

/// One byte into a label's hash (FNV-1a, ASCII case folded: DNS names compare without case).
#[inline(always)]
pub const fn fqdn_hash_byte(hash: u64, byte: u8) -> u64 {
    let b = if byte >= b'A' && byte <= b'Z' {
        byte + 32
    } else {
        byte
    };
    (hash ^ b as u64).wrapping_mul(FQDN_PRIME)
}

/// Start of a label's hash.
pub const fn fqdn_label_start(len: u8) -> u64 {
    fqdn_hash_byte(FQDN_LABEL_SEED, len)
}

/// The hash of a name, from its first label's hash and the hash of the rest (the suffix after
/// that label). Names hash label by label so that the datapath can look up every suffix of
/// a question (`*.` patterns) from one walk over it.
#[inline(always)]
pub const fn fqdn_join(label_hash: u64, suffix_hash: u64) -> u64 {
    let mut x = label_hash
        ^ suffix_hash
            .rotate_left(29)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 29)
}

/// The hash of a dotted name (`api.Example.com`, a trailing dot allowed), as the datapath
/// computes it from the wire form. `None` for an empty label, a label over 63 bytes or more
/// than FQDN_MAX_LABELS labels.
pub fn fqdn_name_hash(name: &[u8]) -> Option<u64> {
    let name = match name.split_last() {
        Some((b'.', rest)) => rest,
        _ => name,
    };
    if name.is_empty() {
        return Some(FQDN_ROOT_HASH);
    }
    let mut hash = FQDN_ROOT_HASH;
    let mut labels = 0;
    for label in name.rsplit(|&b| b == b'.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        labels += 1;
        if labels > FQDN_MAX_LABELS {
            return None;
        }
        let mut h = fqdn_label_start(label.len() as u8);
        let mut i = 0;
        while i < label.len() {
            h = fqdn_hash_byte(h, label[i]);
            i += 1;
        }
        hash = fqdn_join(h, hash);
    }
    Some(hash)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnPatternKey {
    pub identity: u32,
    /// FQDN_MATCH_EXACT or FQDN_MATCH_SUBDOMAIN.
    pub kind: u8,
    pub _pad: [u8; 3],
    /// `fqdn_name_hash` of the name (for SUBDOMAIN, of the part after `*.`).
    pub name_hash: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnAddrKeyV4 {
    pub identity: u32,
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnAddrKeyV6 {
    pub identity: u32,
    pub addr: [u8; 16],
}

/// A learned address. It admits new flows until `expires_ns` (CLOCK_MONOTONIC, coarse);
/// flows it admitted live on in conntrack after it expires. moatd deletes expired entries and
/// keeps each identity under its cap by deleting its oldest (`learned_ns`) first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnAddr {
    pub expires_ns: u64,
    pub learned_ns: u64,
    /// Hash of the question that taught it (a key of MOAT_FQDNNAME).
    pub name_hash: u64,
    /// The record's TTL in seconds, before the floor and cap.
    pub ttl: u32,
    pub count: u32,
    pub selectors: [u32; MAX_FQDN_SELECTORS],
}

/// A query the pod sent, keyed so that only its answer finds it: the answer comes from the
/// query's destination to the query's source port, with the same id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsQueryKey {
    /// Host-side veth of the asking pod.
    pub ifindex: u32,
    /// Resolver address (raw words; v4 in the first word, the rest 0).
    pub resolver: [u32; 4],
    pub resolver_port: u16,
    pub pod_port: u16,
    /// DNS message id.
    pub id: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsQuery {
    pub name_hash: u64,
    pub sent_ns: u64,
}

/// A question name as text (dotted, lower case, no trailing dot), `len` bytes of `bytes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FqdnName {
    pub len: u32,
    pub bytes: [u8; FQDN_MAX_NAME + 1],
}

impl Default for FqdnName {
    fn default() -> Self {
        Self {
            len: 0,
            bytes: [0; FQDN_MAX_NAME + 1],
        }
    }
}

/// FQDN settings, MOAT_FQDNCFG[0]. A learned address lives max(ttl, ttl_floor_s), at most
/// ttl_cap_s, seconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnConfig {
    pub ttl_floor_s: u32,
    pub ttl_cap_s: u32,
}

// ---------------------------------------------------------------------------------------------
// Layout checks: a size change here must be deliberate (and bump LAYOUT_VERSION).
// ---------------------------------------------------------------------------------------------

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<MetricValue>() == 16);
    assert!(size_of::<EndpointInfo>() == 56);
    assert!(size_of::<IpcacheKeyV4>() == 4);
    assert!(size_of::<IpcacheKeyV6>() == 16);
    assert!(size_of::<IpcacheValue>() == 16);
    assert!(size_of::<PolicyKey>() == 12);
    assert!(size_of::<PolicyValue>() == 16);
    assert!(size_of::<PortRangeKey>() == 12);
    assert!(size_of::<PortRule>() == 12);
    assert!(size_of::<PortRuleSet>() == 196);
    assert!(size_of::<CidrKeyV4>() == 12);
    assert!(size_of::<CidrKeyV6>() == 24);
    assert!(size_of::<CtKey>() == 44);
    assert!(size_of::<CtValue>() == 24);
    assert!(size_of::<FragKey>() == 40);
    assert!(size_of::<FragValue>() == 4);
    assert!(size_of::<Config>() == 16);
    assert!(size_of::<RateLimitState>() == 16);
    assert!(size_of::<Meta>() == 8);
    assert!(size_of::<FlowEvent>() == 72);
    assert!(size_of::<QuarantineAllow>() == 4);
    assert!(size_of::<ThreatConfig>() == 96);
    assert!(size_of::<ThreatKey>() == 40);
    assert!(size_of::<ThreatSlot>() == 112);
    assert!(size_of::<ThreatEvent>() == 88);
    assert!(size_of::<FqdnPatternKey>() == 16);
    assert!(size_of::<FqdnAddrKeyV4>() == 8);
    assert!(size_of::<FqdnAddrKeyV6>() == 20);
    assert!(size_of::<FqdnAddr>() == 48);
    assert!(size_of::<DnsQueryKey>() == 28);
    assert!(size_of::<DnsQuery>() == 16);
    assert!(size_of::<FqdnName>() == 260);
    assert!(size_of::<FqdnConfig>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made only of integers and arrays of integers, with
    // explicit padding fields, so any bit pattern is a valid value.
    unsafe impl aya::Pod for MetricValue {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for IpcacheKeyV4 {}
    unsafe impl aya::Pod for IpcacheKeyV6 {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PortRangeKey {}
    unsafe impl aya::Pod for PortRuleSet {}
    unsafe impl aya::Pod for CidrKeyV4 {}
    unsafe impl aya::Pod for CidrKeyV6 {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for RateLimitState {}
    unsafe impl aya::Pod for Meta {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for ThreatConfig {}
    unsafe impl aya::Pod for ThreatSlot {}
    unsafe impl aya::Pod for ThreatEvent {}
    unsafe impl aya::Pod for FqdnPatternKey {}
    unsafe impl aya::Pod for FqdnAddrKeyV4 {}
    unsafe impl aya::Pod for FqdnAddrKeyV6 {}
    unsafe impl aya::Pod for FqdnAddr {}
    unsafe impl aya::Pod for DnsQueryKey {}
    unsafe impl aya::Pod for DnsQuery {}
    unsafe impl aya::Pod for FqdnName {}
    unsafe impl aya::Pod for FqdnConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_a_config_flag_leaves_the_others() {
        let mut config = Config {
            flags: CONFIG_FLAG_LOG_ALL_ALLOWS,
            ..Default::default()
        };
        config.set_flag(CONFIG_FLAG_LOCAL_VIA_HOST, true);
        assert_eq!(
            config.flags,
            CONFIG_FLAG_LOG_ALL_ALLOWS | CONFIG_FLAG_LOCAL_VIA_HOST
        );
        config.set_flag(CONFIG_FLAG_LOCAL_VIA_HOST, false);
        assert_eq!(config.flags, CONFIG_FLAG_LOG_ALL_ALLOWS);
    }

    #[test]
    fn a_peer_handoff_is_for_one_endpoint_only() {
        for ifindex in [1, 2, 31, 32, 1000, 32_767] {
            let handoff = peer_handoff(ifindex);
            assert!(is_peer_handoff(handoff, ifindex));
            assert!(!is_peer_handoff(handoff, ifindex + 1));
            assert!(!is_peer_handoff(handoff & !PEER_HANDOFF_FLAG, ifindex));
            assert!(!is_peer_handoff(0, ifindex));
        }
        // Beyond 15 bits the low bits carry it.
        assert!(is_peer_handoff(peer_handoff(40_000), 40_000));
        assert!(!is_peer_handoff(peer_handoff(40_000), 40_001));
        assert!(!is_peer_handoff(peer_handoff(0), 0));
        // Fits the 16 bits the kernel keeps for tc_index.
        assert!(peer_handoff(u32::MAX) <= u16::MAX as u32);
    }

    #[test]
    fn a_name_hashes_as_its_first_label_joined_to_its_suffix() {
        let full = fqdn_name_hash(b"api.example.com").unwrap();
        let suffix = fqdn_name_hash(b"example.com").unwrap();
        let mut label = fqdn_label_start(3);
        for b in b"api" {
            label = fqdn_hash_byte(label, *b);
        }
        assert_eq!(fqdn_join(label, suffix), full);
        assert_ne!(full, suffix);
    }

    #[test]
    fn name_hashes_ignore_case_and_a_trailing_dot_but_not_label_boundaries() {
        let h = fqdn_name_hash(b"api.example.com").unwrap();
        assert_eq!(fqdn_name_hash(b"API.Example.COM.").unwrap(), h);
        assert_ne!(fqdn_name_hash(b"apie.xample.com").unwrap(), h);
        assert_ne!(fqdn_name_hash(b"com.example.api").unwrap(), h);
        assert_eq!(fqdn_name_hash(b"."), Some(FQDN_ROOT_HASH));
        assert_eq!(fqdn_name_hash(b"a..b"), None);
        assert_eq!(fqdn_name_hash(&[b'x'; 64]), None);
    }
}
