//! FQDN egress: policy names external hosts, and the addresses they resolve to are learned
//! from the DNS answers on their way to the pod, before the pod reads them. The pod's first
//! connection to a fresh address is therefore already judged with the name's rules, and
//! nothing in userspace stands between the answer and the connection (a daemon restart
//! changes nothing: the maps are pinned).
//!
//! Trust: an answer is read only when it answers a query this pod sent and this hook let
//! through (same resolver address and port, same pod port, same message id, same question
//! name; see `DnsQueryKey`), only for endpoints with FQDN rules, and only for names their
//! identity's patterns match (MOAT_FQDNPAT). Only A and AAAA records of the question name or
//! of the CNAME chain that starts at it are learned.
//!
//! Bounds: the message is copied into per-CPU scratch (at most MSG_MAX bytes) and walked one
//! byte per `bpf_loop` step, so the verifier checks each step once. Names are at most
//! FQDN_MAX_NAME bytes and FQDN_MAX_LABELS labels, compression pointers must point backwards
//! and at most FQDN_MAX_JUMPS are followed per name, at most FQDN_MAX_ANSWERS records and
//! FQDN_MAX_CHAIN CNAME links are read. A message that breaks a bound is counted as
//! malformed; whatever was learned from its earlier records stays (each was checked alone).

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_loop, bpf_skb_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use moat_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, DnsQuery, DnsQueryKey, ENDPOINT_FLAG_FQDN, FAMILY_V4,
    FAMILY_V6, FQDN_MATCH_EXACT, FQDN_MATCH_SUBDOMAIN, FQDN_MAX_ANSWERS, FQDN_MAX_CHAIN,
    FQDN_MAX_JUMPS, FQDN_MAX_LABELS, FQDN_MAX_NAME, FQDN_ROOT_HASH, FqdnAddr, FqdnAddrKeyV4,
    FqdnAddrKeyV6, FqdnName, FqdnPatternKey, MAX_FQDN_SELECTORS, METRIC_FQDN_LEARNED,
    METRIC_FQDN_MALFORMED, METRIC_FQDN_UNASKED, PROTO_TCP, PROTO_UDP, fqdn_hash_byte, fqdn_join,
    fqdn_label_start,
};

use crate::{
    conntrack::now_ns,
    endpoint,
    maps::{DNS_QUERIES, FQDN_CONFIG, FQDN_NAMES, FQDN_PATTERNS, FQDN_V4, FQDN_V6},
    metrics,
    parse::ETH_HLEN,
    scratch::{SCRATCH_LOOKUPS, SCRATCH_NEW_FLOW},
    threats,
};

pub const DNS_PORT: u16 = 53;
/// Bytes of a DNS message read (a power of two, for the verifier's index masks). Records
/// past it are not read: a larger answer teaches only its first addresses.
const MSG_MAX: usize = 2048;
const DNS_HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const NS_PER_S: u64 = 1_000_000_000;
/// Stream hash of names compared inside one answer (question, owners, CNAME targets).
const STREAM_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const STREAM_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Per-CPU working memory of one message: too large for the stack.
#[repr(C)]
pub struct Scratch {
    msg: [u8; MSG_MAX],
    /// Label hashes of the question, left to right (see `fqdn_join`).
    labels: [u64; FQDN_MAX_LABELS],
    /// The question as text, for MOAT_FQDNNAME.
    name: FqdnName,
    /// Selectors the question matched, 0-terminated.
    selectors: [u32; MAX_FQDN_SELECTORS],
    identity: u32,
    now: u64,
    /// `fqdn_name_hash` of the question.
    name_hash: u64,
    /// The walks' states live here rather than on the stack: the verifier checks a
    /// `bpf_loop` callback again and again until its state stops changing, and exact
    /// positions on the stack would change on every pass, where a scalar read from map
    /// memory is simply unknown and the passes converge at once.
    question: QuestionWalk,
    suffixes: SuffixWalk,
    answer: AnswerWalk,
}

#[map]
static SCRATCH_FQDN: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Where the DNS message of the hook's packet lies, and its tuple.
struct Message {
    family: u8,
    proto: u8,
    offset: usize,
    len: usize,
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}

/// A packet to or from port 53 (noted by `track`): a UDP query leaving the pod feeds the
/// tunnel detector, whatever its verdict; for an endpoint with FQDN rules, a query the hook
/// lets through is recorded and an answer it lets through is learned from.
#[inline(never)]
pub fn after_verdict(ctx: &TcContext, ifindex: u32, direction: u32, delivered: u32) {
    // Who would use the packet, before any header is read again: most pods have no FQDN
    // rules, and the tunnel detector is off unless configured.
    let (learn, identity) = match endpoint::endpoint_ref(ifindex) {
        Some(ep) if delivered != 0 && ep.flags & ENDPOINT_FLAG_FQDN != 0 => (true, ep.identity),
        _ => (false, 0),
    };
    let tunnel = direction == DIRECTION_EGRESS as u32 && threats::dns_tunnel_enabled();
    if !learn && !tunnel {
        return;
    }
    let Some(m) = message(ctx) else {
        return;
    };
    let query = direction == DIRECTION_EGRESS as u32 && m.dport == DNS_PORT;
    let answer = direction == DIRECTION_INGRESS as u32 && m.sport == DNS_PORT;
    if tunnel && query && m.proto == PROTO_UDP {
        threats::dns_query(ctx, ifindex);
    }
    if !learn || !(query || answer) {
        return;
    }
    let Some(sp) = SCRATCH_FQDN.get_ptr_mut(0) else {
        return;
    };
    if load(ctx, sp, m.offset, m.len).is_none() {
        return;
    }
    let loaded = m.len.min(MSG_MAX) as u32;
    if query {
        record_query(sp, &m, ifindex, loaded);
    } else {
        unsafe {
            (*sp).identity = identity;
            (*sp).now = now_ns();
        }
        read_answer(sp, &m, ifindex, loaded);
    }
}

/// Finds the DNS message: after the UDP header, or after the TCP header and the two-byte
/// length prefix (a TCP message is read only when it starts in this segment). IPv6
/// extension headers are not followed: DNS does not use them.
#[inline(always)]
fn message(ctx: &TcContext) -> Option<Message> {
    let first: u8 = ctx.load(ETH_HLEN).ok()?;
    let (family, l4, proto) = match first >> 4 {
        4 => {
            let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
            (FAMILY_V4, ETH_HLEN + ((first & 0x0f) as usize) * 4, proto)
        }
        6 => {
            let proto: u8 = ctx.load(ETH_HLEN + 6).ok()?;
            (FAMILY_V6, ETH_HLEN + 40, proto)
        }
        _ => return None,
    };
    let (saddr, daddr) = if family == FAMILY_V4 {
        let s: u32 = ctx.load(ETH_HLEN + 12).ok()?;
        let d: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        ([s, 0, 0, 0], [d, 0, 0, 0])
    } else {
        let s: [u32; 4] = ctx.load(ETH_HLEN + 8).ok()?;
        let d: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
        (s, d)
    };
    let sport = u16::from_be(ctx.load::<u16>(l4).ok()?);
    let dport = u16::from_be(ctx.load::<u16>(l4 + 2).ok()?);
    let offset = match proto {
        PROTO_UDP => l4 + 8,
        PROTO_TCP => {
            let data_offset: u8 = ctx.load(l4 + 12).ok()?;
            l4 + ((data_offset >> 4) as usize) * 4 + 2
        }
        _ => return None,
    };
    let len = (ctx.len() as usize).checked_sub(offset)?;
    if len < DNS_HEADER + 5 {
        return None;
    }
    Some(Message {
        family,
        proto,
        offset,
        len,
        saddr,
        daddr,
        sport,
        dport,
    })
}

/// Copies up to MSG_MAX bytes of the message into scratch.
#[inline(always)]
fn load(ctx: &TcContext, s: *mut Scratch, offset: usize, len: usize) -> Option<()> {
    // 1..=MSG_MAX in a form the verifier can bound from both sides.
    let read = ((len.min(MSG_MAX) - 1) & (MSG_MAX - 1)) + 1;
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset as u32,
            (&raw mut (*s).msg) as *mut _,
            read as u32,
        )
    };
    if rc == 0 { Some(()) } else { None }
}

// The scratch is read through short-lived references made from its pointer after each call
// that may write it (the walks write it through their own pointer).
#[inline(always)]
fn byte(s: &Scratch, at: u32) -> u8 {
    s.msg[at as usize & (MSG_MAX - 1)]
}

#[inline(always)]
fn msg16(s: *const Scratch, at: u32) -> u16 {
    be16(unsafe { &*s }, at)
}

#[inline(always)]
fn be16(s: &Scratch, at: u32) -> u16 {
    ((byte(s, at) as u16) << 8) | byte(s, at + 1) as u16
}

#[inline(always)]
fn be32(s: &Scratch, at: u32) -> u32 {
    ((be16(s, at) as u32) << 16) | be16(s, at + 2) as u32
}

#[inline(always)]
fn query_key(ifindex: u32, m: &Message, id: u16, answer: bool) -> DnsQueryKey {
    // The answer runs back: its source is the query's destination.
    let (resolver, resolver_port, pod_port) = if answer {
        (m.saddr, m.sport, m.dport)
    } else {
        (m.daddr, m.dport, m.sport)
    };
    DnsQueryKey {
        ifindex,
        resolver,
        resolver_port,
        pod_port,
        id,
        proto: m.proto,
        family: m.family,
    }
}

/// Remembers a query (one question, not a response) so that only its answer is read.
#[inline(always)]
fn record_query(s: *mut Scratch, m: &Message, ifindex: u32, loaded: u32) {
    let flags = msg16(s, 2);
    if flags & 0x8000 != 0 || msg16(s, 4) != 1 {
        return;
    }
    let id = msg16(s, 0);
    let Some(q) = walk_question(loaded) else {
        return;
    };
    let key = query_key(ifindex, m, id, false);
    let value = DnsQuery {
        name_hash: q.stream,
        sent_ns: now_ns(),
    };
    let _ = DNS_QUERIES.insert(&key, &value, 0);
}

/// Reads an answer to a recorded query and learns its addresses.
#[inline(always)]
fn read_answer(s: *mut Scratch, m: &Message, ifindex: u32, loaded: u32) {
    let flags = msg16(s, 2);
    // A response (QR), a standard query (opcode 0), one question.
    if flags & 0x8000 == 0 || flags & 0x7800 != 0 || msg16(s, 4) != 1 {
        return;
    }
    let answers = msg16(s, 6) as u32;
    let key = query_key(ifindex, m, msg16(s, 0), true);
    let Some(asked) = (unsafe { DNS_QUERIES.get(&key) }) else {
        metrics::bump(METRIC_FQDN_UNASKED, 1);
        return;
    };
    let asked_hash = asked.name_hash;
    let Some(q) = walk_question(loaded) else {
        metrics::bump(METRIC_FQDN_MALFORMED, 1);
        return;
    };
    if q.stream != asked_hash {
        // An answer to another question under the query's id: forged, or a resolver bug.
        metrics::bump(METRIC_FQDN_UNASKED, 1);
        return;
    }
    // One answer per query: a second copy (forged or replayed) finds nothing.
    let _ = DNS_QUERIES.remove(&key);
    // RCODE other than NOERROR, or no answers: nothing to learn.
    if flags & 0x000f != 0 || answers == 0 {
        return;
    }
    if !match_patterns(q.labels) {
        return;
    }
    unsafe {
        let _ = FQDN_NAMES.insert(&(*s).name_hash, &(*s).name, 0);
    }
    // The question's 4 bytes of type and class follow its name.
    unsafe {
        (*s).answer = AnswerWalk {
            pos: q.end + 4,
            len: loaded,
            state: STATE_NAME,
            label_left: 0,
            resume: 0,
            jumps: 0,
            hash: STREAM_SEED,
            records_left: answers.min(FQDN_MAX_ANSWERS as u32),
            rr_end: 0,
            target: 0,
            chain_len: 1,
            malformed: 0,
            chain: [q.stream, 0, 0, 0, 0, 0, 0, 0],
        };
        bpf_loop(16_384, answer_step as *mut c_void, core::ptr::null_mut(), 0);
        if (*s).answer.malformed != 0 || (*s).answer.records_left != 0 {
            metrics::bump(METRIC_FQDN_MALFORMED, 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The question: one uncompressed name at offset 12
// ---------------------------------------------------------------------------------------------

struct Question {
    /// Stream hash (compared with the query's and with owner names).
    stream: u64,
    /// Offset just past the name.
    end: u32,
    labels: u32,
}

#[repr(C)]
struct QuestionWalk {
    pos: u32,
    len: u32,
    label_left: u32,
    labels: u32,
    text_len: u32,
    ended: u32,
    stream: u64,
    label_hash: u64,
}

/// Walks the question name: its stream hash, its label hashes and its text into scratch.
#[inline(never)]
fn walk_question(len: u32) -> Option<Question> {
    let sp = SCRATCH_FQDN.get_ptr_mut(0)?;
    unsafe {
        (*sp).question = QuestionWalk {
            pos: DNS_HEADER as u32,
            len,
            label_left: 0,
            labels: 0,
            text_len: 0,
            ended: 0,
            stream: STREAM_SEED,
            label_hash: 0,
        };
        bpf_loop(
            (FQDN_MAX_NAME + 1) as u32,
            question_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    let s = unsafe { &mut *sp };
    let walk = &s.question;
    if walk.ended == 0 || walk.labels == 0 {
        return None;
    }
    s.name.len = walk.text_len;
    Some(Question {
        stream: walk.stream,
        end: walk.pos,
        labels: walk.labels,
    })
}

/// One byte of the question: a label length at a label boundary, else a character.
extern "C" fn question_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(sp) = SCRATCH_FQDN.get_ptr_mut(0) else {
        return 1;
    };
    let s = unsafe { &mut *sp };
    let walk = unsafe { &mut (*sp).question };
    if walk.pos >= walk.len || walk.pos as usize >= MSG_MAX {
        return 1;
    }
    let b = byte(s, walk.pos);
    walk.pos += 1;
    if walk.label_left > 0 {
        let c = if b.is_ascii_uppercase() { b | 0x20 } else { b };
        walk.stream = (walk.stream ^ c as u64).wrapping_mul(STREAM_PRIME);
        walk.label_hash = fqdn_hash_byte(walk.label_hash, c);
        put_text(s, walk.text_len, c);
        walk.text_len += 1;
        walk.label_left -= 1;
        if walk.label_left == 0 {
            let at = walk.labels as usize;
            if at >= FQDN_MAX_LABELS {
                return 1;
            }
            s.labels[at & (FQDN_MAX_LABELS - 1)] = walk.label_hash;
            walk.labels += 1;
        }
        return 0;
    }
    if b == 0 {
        walk.ended = 1;
        return 1;
    }
    // A compression pointer has nothing to point back to in the question; 64..=191 are
    // reserved label types.
    if b > 63 || walk.labels as usize >= FQDN_MAX_LABELS {
        return 1;
    }
    if walk.text_len != 0 {
        put_text(s, walk.text_len, b'.');
        walk.text_len += 1;
    }
    walk.stream = (walk.stream ^ b'.' as u64).wrapping_mul(STREAM_PRIME);
    walk.label_hash = fqdn_label_start(b);
    walk.label_left = b as u32;
    0
}

#[inline(always)]
fn put_text(s: &mut Scratch, at: u32, c: u8) {
    if (at as usize) < FQDN_MAX_NAME {
        s.name.bytes[at as usize & FQDN_MAX_NAME] = c;
    }
}

// ---------------------------------------------------------------------------------------------
// Patterns: the question and each of its proper suffixes against the identity's patterns
// ---------------------------------------------------------------------------------------------

#[repr(C)]
struct SuffixWalk {
    labels: u32,
    found: u32,
    suffix: u64,
}

/// Looks the question up in MOAT_FQDNPAT: the whole name (EXACT), then every suffix that
/// leaves at least one label before it (SUBDOMAIN, for `*.` patterns). The selectors found
/// go to scratch; false when there are none.
#[inline(never)]
fn match_patterns(labels: u32) -> bool {
    let Some(s) = SCRATCH_FQDN.get_ptr_mut(0) else {
        return false;
    };
    unsafe {
        (*s).selectors = [0; MAX_FQDN_SELECTORS];
        (*s).suffixes = SuffixWalk {
            labels,
            found: 0,
            suffix: FQDN_ROOT_HASH,
        };
        bpf_loop(
            FQDN_MAX_LABELS as u32,
            suffix_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        (*s).name_hash = (*s).suffixes.suffix;
        (*s).suffixes.found != 0
    }
}

/// Step `index` joins label `labels - 1 - index` to the suffix after it.
extern "C" fn suffix_step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(sp) = SCRATCH_FQDN.get_ptr_mut(0) else {
        return 1;
    };
    let s = unsafe { &mut *sp };
    let walk = unsafe { &mut (*sp).suffixes };
    if index >= walk.labels as u64 {
        return 1;
    }
    let at = (walk.labels as u64 - 1 - index) as usize;
    walk.suffix = fqdn_join(s.labels[at & (FQDN_MAX_LABELS - 1)], walk.suffix);
    let kind = if at == 0 {
        FQDN_MATCH_EXACT
    } else {
        FQDN_MATCH_SUBDOMAIN
    };
    let key = FqdnPatternKey {
        identity: s.identity,
        kind,
        _pad: [0; 3],
        name_hash: walk.suffix,
    };
    if let Some(selector) = unsafe { FQDN_PATTERNS.get(&key) } {
        let selector = *selector;
        let at = walk.found as usize;
        if at < MAX_FQDN_SELECTORS && selector != 0 {
            s.selectors[at & (MAX_FQDN_SELECTORS - 1)] = selector;
            walk.found += 1;
        }
    }
    0
}

// ---------------------------------------------------------------------------------------------
// The answer section: owner names, CNAME targets and A/AAAA records, one byte per step
// ---------------------------------------------------------------------------------------------

/// Walking a name (an owner, or a CNAME target when `target` is 1).
const STATE_NAME: u32 = 0;
/// At the record's fixed part (type, class, TTL, length).
const STATE_FIXED: u32 = 1;

#[repr(C)]
struct AnswerWalk {
    pos: u32,
    len: u32,
    state: u32,
    label_left: u32,
    /// Where the record continues after a compressed name (0: no jump taken yet).
    resume: u32,
    jumps: u32,
    hash: u64,
    records_left: u32,
    rr_end: u32,
    target: u32,
    chain_len: u32,
    malformed: u32,
    /// Stream hashes of the question and the CNAME targets reached from it.
    chain: [u64; FQDN_MAX_CHAIN],
}

extern "C" fn answer_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(sp) = SCRATCH_FQDN.get_ptr_mut(0) else {
        return 1;
    };
    let s = unsafe { &*sp };
    let walk = unsafe { &mut (*sp).answer };
    if walk.records_left == 0 {
        return 1;
    }
    if walk.state == STATE_FIXED {
        return record(s, walk);
    }
    if walk.pos >= walk.len {
        // The message ends inside a name (or was longer than MSG_MAX).
        walk.malformed = 1;
        return 1;
    }
    let b = byte(s, walk.pos);
    if walk.label_left > 0 {
        let c = if b.is_ascii_uppercase() { b | 0x20 } else { b };
        walk.hash = (walk.hash ^ c as u64).wrapping_mul(STREAM_PRIME);
        walk.label_left -= 1;
        walk.pos += 1;
        return 0;
    }
    if b == 0 {
        walk.pos = if walk.resume != 0 {
            walk.resume
        } else {
            walk.pos + 1
        };
        return name_ended(walk);
    }
    if b & 0xc0 == 0xc0 {
        if walk.pos + 1 >= walk.len {
            walk.malformed = 1;
            return 1;
        }
        let to = (((b & 0x3f) as u32) << 8) | byte(s, walk.pos + 1) as u32;
        walk.jumps += 1;
        // Backwards only, and few: a pointer loop ends here.
        if to >= walk.pos || walk.jumps > FQDN_MAX_JUMPS as u32 {
            walk.malformed = 1;
            return 1;
        }
        if walk.resume == 0 {
            walk.resume = walk.pos + 2;
        }
        walk.pos = to;
        return 0;
    }
    if b > 63 {
        walk.malformed = 1;
        return 1;
    }
    walk.hash = (walk.hash ^ b'.' as u64).wrapping_mul(STREAM_PRIME);
    walk.label_left = b as u32;
    walk.pos += 1;
    0
}

/// A name ended: an owner leads to its record's fixed part; a CNAME target joins the chain
/// and the next record begins.
#[inline(always)]
fn name_ended(walk: &mut AnswerWalk) -> i64 {
    if walk.target == 0 {
        walk.state = STATE_FIXED;
        return 0;
    }
    let at = walk.chain_len as usize;
    if at < FQDN_MAX_CHAIN {
        walk.chain[at & (FQDN_MAX_CHAIN - 1)] = walk.hash;
        walk.chain_len += 1;
    }
    walk.pos = walk.rr_end;
    next_record(walk)
}

#[inline(always)]
fn next_record(walk: &mut AnswerWalk) -> i64 {
    walk.records_left -= 1;
    walk.state = STATE_NAME;
    walk.target = 0;
    walk.hash = STREAM_SEED;
    walk.resume = 0;
    walk.jumps = 0;
    walk.label_left = 0;
    if walk.records_left == 0 { 1 } else { 0 }
}

#[inline(always)]
fn in_chain(walk: &AnswerWalk) -> bool {
    let mut i = 0;
    while i < FQDN_MAX_CHAIN {
        if i < walk.chain_len as usize && walk.chain[i] == walk.hash {
            return true;
        }
        i += 1;
    }
    false
}

/// The fixed part of a record whose owner was just walked.
#[inline(always)]
fn record(s: &Scratch, walk: &mut AnswerWalk) -> i64 {
    let at = walk.pos;
    if at + 10 > walk.len {
        walk.malformed = 1;
        return 1;
    }
    let rtype = be16(s, at);
    let class = be16(s, at + 2);
    let ttl = be32(s, at + 4);
    let rdlen = be16(s, at + 8) as u32;
    let rdata = at + 10;
    walk.rr_end = rdata + rdlen;
    if walk.rr_end > walk.len {
        walk.malformed = 1;
        return 1;
    }
    if class == CLASS_IN && in_chain(walk) {
        // Both families are learned whatever the transport: the pod may connect over
        // either.
        if rtype == TYPE_A && rdlen == 4 {
            learn_v4(s, rdata, ttl);
        } else if rtype == TYPE_AAAA && rdlen == 16 {
            learn_v6(s, rdata, ttl);
        } else if rtype == TYPE_CNAME {
            walk.state = STATE_NAME;
            walk.target = 1;
            walk.hash = STREAM_SEED;
            walk.resume = 0;
            walk.jumps = 0;
            walk.label_left = 0;
            walk.pos = rdata;
            return 0;
        }
    }
    walk.pos = walk.rr_end;
    next_record(walk)
}

/// How long a learned address admits new flows: the record's TTL, raised to the floor and
/// held under the cap (MOAT_FQDNCFG).
#[inline(always)]
fn expiry(now: u64, ttl: u32) -> u64 {
    let (floor, cap) = match FQDN_CONFIG.get(0) {
        Some(c) => (c.ttl_floor_s, c.ttl_cap_s),
        None => (0, 0),
    };
    let mut life = if ttl < floor { floor } else { ttl };
    if cap != 0 && life > cap {
        life = cap;
    }
    now + life as u64 * NS_PER_S
}

/// Adds the question's selectors to a learned entry's (union, first come first kept).
#[inline(always)]
fn merge(entry: &mut FqdnAddr, s: &Scratch) {
    for i in 0..MAX_FQDN_SELECTORS {
        let sel = s.selectors[i];
        if sel == 0 {
            break;
        }
        let mut have = false;
        for j in 0..MAX_FQDN_SELECTORS {
            have |= entry.selectors[j] == sel;
        }
        if have {
            continue;
        }
        for j in 0..MAX_FQDN_SELECTORS {
            if entry.selectors[j] == 0 {
                entry.selectors[j] = sel;
                break;
            }
        }
    }
}

#[inline(always)]
fn fresh(s: &Scratch, ttl: u32) -> FqdnAddr {
    FqdnAddr {
        expires_ns: expiry(s.now, ttl),
        learned_ns: s.now,
        name_hash: s.name_hash,
        ttl,
        count: 1,
        selectors: s.selectors,
    }
}

#[inline(always)]
fn refresh(entry: &mut FqdnAddr, s: &Scratch, ttl: u32) {
    let expires = expiry(s.now, ttl);
    if expires > entry.expires_ns {
        entry.expires_ns = expires;
    }
    entry.learned_ns = s.now;
    entry.name_hash = s.name_hash;
    entry.ttl = ttl;
    entry.count = entry.count.wrapping_add(1);
    merge(entry, s);
}

#[inline(never)]
fn learn_v4(s: &Scratch, at: u32, ttl: u32) {
    let key = FqdnAddrKeyV4 {
        identity: s.identity,
        addr: [
            byte(s, at),
            byte(s, at + 1),
            byte(s, at + 2),
            byte(s, at + 3),
        ],
    };
    match FQDN_V4.get_ptr_mut(&key) {
        Some(entry) => refresh(unsafe { &mut *entry }, s, ttl),
        None => {
            let _ = FQDN_V4.insert(&key, &fresh(s, ttl), 0);
        }
    }
    metrics::bump(METRIC_FQDN_LEARNED, 1);
}

#[inline(never)]
fn learn_v6(s: &Scratch, at: u32, ttl: u32) {
    let mut addr = [0u8; 16];
    for (i, b) in addr.iter_mut().enumerate() {
        *b = byte(s, at + i as u32);
    }
    let key = FqdnAddrKeyV6 {
        identity: s.identity,
        addr,
    };
    match FQDN_V6.get_ptr_mut(&key) {
        Some(entry) => refresh(unsafe { &mut *entry }, s, ttl),
        None => {
            let _ = FQDN_V6.insert(&key, &fresh(s, ttl), 0);
        }
    }
    metrics::bump(METRIC_FQDN_LEARNED, 1);
}

// ---------------------------------------------------------------------------------------------
// New flows: the selectors a learned destination carries, for the policy lookup
// ---------------------------------------------------------------------------------------------

/// Puts the selectors of the new flow's destination (in SCRATCH_NEW_FLOW) into
/// SCRATCH_LOOKUPS for `policy::decide`: those of a live learned entry for the endpoint's
/// identity, else none. Called for egress new flows of endpoints with FQDN rules, right
/// before `decide`, which consumes them.
#[inline(never)]
pub fn stage_selectors() {
    let Some(lookups) = SCRATCH_LOOKUPS.get_ptr_mut(0) else {
        return;
    };
    let found = learned_selectors();
    unsafe { (*lookups).fqdn = found };
}

/// Forgets the staged selectors (see `stage_selectors`).
#[inline(always)]
pub fn clear_staged() {
    if let Some(lookups) = SCRATCH_LOOKUPS.get_ptr_mut(0) {
        unsafe { (*lookups).fqdn = [0; MAX_FQDN_SELECTORS] };
    }
}

#[inline(always)]
fn learned_selectors() -> [u32; MAX_FQDN_SELECTORS] {
    let none = [0; MAX_FQDN_SELECTORS];
    let Some(slot) = SCRATCH_NEW_FLOW.get_ptr(0) else {
        return none;
    };
    let handover = unsafe { &*slot };
    let identity = handover.ep.identity;
    let now = handover.now;
    let entry = if handover.pkt.family == FAMILY_V4 {
        let key = FqdnAddrKeyV4 {
            identity,
            addr: handover.pkt.daddr[0].to_ne_bytes(),
        };
        unsafe { FQDN_V4.get(&key) }
    } else {
        let key = FqdnAddrKeyV6 {
            identity,
            addr: endpoint::v6_bytes(&handover.pkt.daddr),
        };
        unsafe { FQDN_V6.get(&key) }
    };
    match entry {
        Some(e) if e.expires_ns > now => e.selectors,
        _ => none,
    }
}
