//! Per-CPU scratch space used to hand values between the stages of a verdict.
//!
//! Why: the verifier walks every path through a program and tracks constants exactly. Parsing
//! alone yields dozens of paths (family x protocol x fragment x ICMP kind), each carrying
//! different constants, and each would re-walk the policy lookups: the product exceeds the
//! verifier's budget. A value stored to map memory and read back is just "some scalar" to the
//! verifier, so paths that differ only in such values merge again. Reads and writes are
//! volatile so the compiler cannot short-circuit the round trip.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use moat_common::EndpointInfo;

use crate::parse::Packet;

/// Lookup results of one verdict: 0 = no match, else (action << 32) | rule_id.
pub const LOOKUP_SLOTS: usize = 11;

#[repr(C)]
pub struct Lookups {
    pub slots: [u64; LOOKUP_SLOTS],
    /// The combined decision: (allowed << 40) | (reason << 32) | rule_id.
    pub decision: u64,
    /// The first Admin and Baseline ClusterNetworkPolicy rules found so far (the lowest rule
    /// id): (action << 32) | rule_id, 0 for none.
    pub admin: u64,
    pub baseline: u64,
    /// FQDN selectors of a new egress flow's learned destination, 0-terminated: written by
    /// `fqdn::stage_selectors` right before `policy::decide`, which consumes them.
    pub fqdn: [u32; moat_common::MAX_FQDN_SELECTORS],
    /// The arguments of `policy::fqdn_steps`' loop, which runs under `bpf_loop`: its
    /// callback reads them here.
    pub fqdn_walk: FqdnWalk,
    /// The endpoint's lookup hints for this decision, read afresh at each test (see
    /// `policy::hint`).
    pub hints: u32,
}

#[repr(C)]
pub struct FqdnWalk {
    pub policy_id: u32,
    pub dport: u16,
    pub proto: u8,
    /// 1 when the endpoint has port-range entries to look up.
    pub with_ranges: u8,
}

/// What the first stage hands the second about a new flow. The endpoint entry travels as a
/// copy (an array slot costs no hash lookup) and the clock is read once per packet.
#[repr(C)]
pub struct NewFlow {
    pub pkt: Packet,
    pub ep: EndpointInfo,
    pub now: u64,
}

#[map]
pub static SCRATCH_NEW_FLOW: PerCpuArray<NewFlow> = PerCpuArray::with_max_entries(1, 0);

/// The packet `moat_after_dnat` parsed, for its verdict stage: the parser's frame and the
/// policy lookups' would not fit the verifier's stack budget together.
#[map]
pub static SCRATCH_AFTER_DNAT: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static SCRATCH_LOOKUPS: PerCpuArray<Lookups> = PerCpuArray::with_max_entries(1, 0);

/// The question name of a DNS query, copied out of the packet to be read byte by byte.
#[map]
pub static SCRATCH_DNS_NAME: PerCpuArray<[u8; crate::threats::DNS_NAME_MAX]> =
    PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn put<T>(slot: *mut T, value: T) {
    unsafe { core::ptr::write_volatile(slot, value) }
}

#[inline(always)]
pub fn get<T>(slot: *const T) -> T {
    unsafe { core::ptr::read_volatile(slot) }
}
