//! Arbitrary and mutated frames through both endpoint programs with BPF_PROG_TEST_RUN. A
//! coverage-guided fuzzer is a poor fit here (the programs run in the kernel, loaded as
//! root), so this is a property test: a few thousand frames per run, from random bytes to
//! well-formed IPv4/IPv6 TCP/UDP/SCTP/ICMP packets with random truncation, IHL, extension
//! headers, fragments, lengths, VLAN tags and byte flips.
//!
//! The endpoint enforces and has no allow rule: default deny both ways. What the design
//! guarantees for any frame, and what is checked:
//! - the program returns a tc verdict (TC_ACT_OK, TC_ACT_SHOT, or TC_ACT_REDIRECT, which
//!   direct delivery between local pods uses) and the test run itself never fails;
//! - every run is counted exactly once, as an allow for TC_ACT_OK and a drop for TC_ACT_SHOT;
//! - nothing is admitted by policy or audit: the only passes are those that need no rule
//!   (ARP and neighbour discovery, the node's own traffic, egress to a Service, which is
//!   judged after DNAT) and packets of flows those started (established, reply, related);
//!   every conntrack entry left behind is such a flow;
//! - a frame whose ethertype is not IPv4, IPv6 or ARP is dropped, as is an IP frame whose
//!   version nibble or IPv4 IHL is wrong;
//! - a well-formed packet cut short inside the IP header, the IPv6 extension headers or the
//!   L4 header the verdict needs is dropped as malformed (parse.rs reads every header it
//!   uses through a checked load and turns a short read into `Parsed::Malformed`), never
//!   looked up in conntrack or policy.

mod support;

use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use moat_common::{
    CT_FLAG_SERVICE, DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_HOST, VERDICT_ALLOW,
    VERDICT_AUDIT, VERDICT_DROP, reason,
};
use moat_testkit::{
    packet::{Ext, L4, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    testrun::{Hook, TC_ACT_OK, TC_ACT_SHOT},
};
use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, TestCaseError, TestRunner},
};
use support::fixture::{Fixture, host_v4, peer_v4, peer_v6, pod_v4, pod_v6, service_v4};

/// The programs' redirect verdict (direct delivery into a local peer pod).
const TC_ACT_REDIRECT: u32 = 7;
const ETH_HLEN: usize = 14;
/// BPF_PROG_TEST_RUN refuses (EINVAL) a frame of no more than an Ethernet header: the skb it
/// would run on is empty. One byte more is the shortest frame a program can be shown.
const MIN_FRAME: usize = ETH_HLEN + 1;

/// Whether BPF_PROG_TEST_RUN itself refuses the frame before any program sees it: recent
/// kernels (6.18 here) want the fixed IPv4 or IPv6 header present when the ethertype names
/// one. Such frames are skipped; any other refusal fails the test. (On the wire a pod can
/// still send them, and parse.rs drops them as malformed: its loads check every length.)
fn kernel_refuses(frame: &[u8]) -> bool {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    match ethertype {
        0x0800 => frame.len() < ETH_HLEN + 20,
        0x86dd => frame.len() < ETH_HLEN + 40,
        _ => frame.len() <= ETH_HLEN,
    }
}

/// Whether the frame names IPv4 or IPv6 (possibly behind one VLAN tag): the test run checks
/// such headers before the program sees them, more strictly on some kernels than others.
fn kernel_validates_ip(frame: &[u8]) -> bool {
    let at = |i: usize| u16::from_be_bytes([frame[i], frame[i + 1]]);
    match at(12) {
        0x0800 | 0x86dd => true,
        0x8100 if frame.len() >= 18 => matches!(at(16), 0x0800 | 0x86dd),
        _ => false,
    }
}

/// Whether the test run failed with EINVAL (the kernel refusing the frame), not otherwise.
fn is_einval(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EINVAL)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Frames per run: each goes through both hooks. A few seconds on the 2-core CI machine.
const CASES: u32 = 3000;

#[derive(Clone, Debug)]
enum L4Spec {
    Tcp(u8),
    Udp,
    Sctp,
    Echo(bool),
    IcmpError,
    NeighborDiscovery(u8),
    Other(u8, Vec<u8>),
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Keep only the first `n` bytes (taken modulo the frame's length, at least MIN_FRAME).
    Truncate(usize),
    /// Overwrite the IPv4 IHL nibble.
    Ihl(u8),
    /// Overwrite the IPv4 total length / IPv6 payload length.
    IpLength(u16),
    /// Overwrite one byte at (position modulo length).
    Flip(usize, u8),
    /// Insert an 802.1Q tag after the MAC addresses.
    Vlan(u16),
    /// Append bytes (trailing garbage, IPv4 options past the header, ...).
    Append(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Spec {
    v6: bool,
    src: usize,
    dst: usize,
    sport: u16,
    dport: u16,
    l4: L4Spec,
    /// IPv4: (offset, more fragments, id).
    v4_fragment: Option<(u16, bool, u16)>,
    /// IPv6 extension headers: 0 hop-by-hop, 1 destination options, 2 routing, 3 fragment.
    v6_extensions: Vec<(u8, u16, bool)>,
    mutations: Vec<Mutation>,
}

#[derive(Clone, Debug)]
enum Frame {
    Bytes(Vec<u8>),
    Built(Spec),
}

fn v4_pool() -> [IpAddr; 6] {
    [
        pod_v4(),
        peer_v4(),
        service_v4(),
        host_v4(),
        IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)),
        IpAddr::V4(Ipv4Addr::new(10, 1, 0, 99)),
    ]
}

fn v6_pool() -> [IpAddr; 4] {
    [
        pod_v6(),
        peer_v6(),
        IpAddr::V6("fd00:1::99".parse::<Ipv6Addr>().unwrap()),
        IpAddr::V6("2001:db8::1".parse::<Ipv6Addr>().unwrap()),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    // A few fixed ports, so that later frames often are replies to earlier ones.
    prop_oneof![Just(80u16), Just(53), Just(40000), any::<u16>()]
}

fn l4_spec() -> impl Strategy<Value = L4Spec> {
    prop_oneof![
        3 => prop::sample::select(vec![TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST, 0xff])
            .prop_map(L4Spec::Tcp),
        2 => Just(L4Spec::Udp),
        1 => Just(L4Spec::Sctp),
        1 => any::<bool>().prop_map(L4Spec::Echo),
        1 => Just(L4Spec::IcmpError),
        1 => (130u8..=143).prop_map(L4Spec::NeighborDiscovery),
        1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(p, payload)| L4Spec::Other(p, payload)),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (0u8..16).prop_map(Mutation::Ihl),
        1 => any::<u16>().prop_map(Mutation::IpLength),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Flip(at, b)),
        1 => any::<u16>().prop_map(Mutation::Vlan),
        1 => prop::collection::vec(any::<u8>(), 1..48).prop_map(Mutation::Append),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<bool>(),
        (0usize..6, 0usize..6),
        (port(), port()),
        l4_spec(),
        prop::option::weighted(0.15, (0u16..4, any::<bool>(), 0u16..4)),
        prop::collection::vec((0u8..4, 0u16..4, any::<bool>()), 0..3),
        prop::collection::vec(mutation(), 0..3),
    )
        .prop_map(
            |(v6, (src, dst), (sport, dport), l4, v4_fragment, v6_extensions, mutations)| Spec {
                v6,
                src,
                dst,
                sport,
                dport,
                l4,
                v4_fragment,
                v6_extensions: if v6 { v6_extensions } else { Vec::new() },
                mutations,
            },
        )
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), MIN_FRAME..160).prop_map(Frame::Bytes),
        // Random bytes behind a real IP ethertype, so the IP parser sees them.
        1 => (prop::sample::select(vec![0x0800u16, 0x86dd]), prop::collection::vec(any::<u8>(), 1..120))
            .prop_map(|(ethertype, body)| {
                let mut b = moat_testkit::packet::ethernet_header(ethertype);
                b.extend_from_slice(&body);
                Frame::Bytes(b)
            }),
        6 => spec().prop_map(Frame::Built),
    ]
}

impl Spec {
    fn addresses(&self) -> (IpAddr, IpAddr) {
        if self.v6 {
            let pool = v6_pool();
            (pool[self.src % pool.len()], pool[self.dst % pool.len()])
        } else {
            let pool = v4_pool();
            (pool[self.src], pool[self.dst])
        }
    }

    fn packet(&self) -> Packet {
        let (src, dst) = self.addresses();
        let l4 = match &self.l4 {
            L4Spec::Tcp(flags) => L4::Tcp {
                sport: self.sport,
                dport: self.dport,
                flags: *flags,
            },
            L4Spec::Udp => L4::Udp {
                sport: self.sport,
                dport: self.dport,
            },
            L4Spec::Sctp => L4::Sctp {
                sport: self.sport,
                dport: self.dport,
            },
            L4Spec::Echo(request) => L4::Echo {
                request: *request,
                ident: self.sport,
            },
            L4Spec::IcmpError => L4::IcmpError {
                // The quoted packet goes the other way: the error is about something the
                // receiver of the error sent.
                quoted: Packet::udp(dst, src, self.dport, self.sport).ip_bytes(),
            },
            L4Spec::NeighborDiscovery(t) if self.v6 => L4::NeighborDiscovery { icmp_type: *t },
            L4Spec::NeighborDiscovery(_) => L4::Other {
                proto: 1,
                payload: vec![13, 0, 0, 0],
            },
            L4Spec::Other(proto, payload) => L4::Other {
                proto: *proto,
                payload: payload.clone(),
            },
        };
        let mut p = Packet::new(src, dst, l4);
        if !self.v6 {
            p.v4_fragment = self.v4_fragment;
        }
        p.v6_extensions = self
            .v6_extensions
            .iter()
            .map(|&(kind, offset, more)| match kind {
                0 => Ext::HopByHop,
                1 => Ext::DestinationOptions,
                2 => Ext::Routing,
                _ => Ext::Fragment {
                    offset,
                    more,
                    id: 7,
                },
            })
            .collect();
        p
    }

    /// Bytes the parser must read before it has a verdict's worth of tuple: the IP header
    /// (IPv6: with its extension headers) and the L4 header fields it uses. None when the
    /// packet may legitimately end earlier (a later fragment carries no L4 header) or when its
    /// layout is not simply the builder's.
    fn required_len(&self) -> Option<usize> {
        let fragmented = self.v4_fragment.is_some() || self.v6_extensions.iter().any(|e| e.0 == 3);
        if fragmented {
            return None;
        }
        let ip = if self.v6 {
            40 + 8 * self.v6_extensions.len()
        } else {
            20
        };
        let l4 = match &self.l4 {
            L4Spec::Tcp(_) => 20,
            L4Spec::Udp => 8,
            L4Spec::Sctp => 12,
            // Type, code, checksum, identifier.
            L4Spec::Echo(_) => 6,
            // Type and code; the quote of an error is optional.
            L4Spec::IcmpError | L4Spec::NeighborDiscovery(_) => 2,
            L4Spec::Other(..) => 0,
        };
        Some(ETH_HLEN + ip + l4)
    }

    /// The frame, and whether it is a well-formed packet cut short before `required_len`
    /// (the only mutation applied).
    fn build(&self) -> (Vec<u8>, bool) {
        let mut b = self.packet().bytes();
        let mut truncated_only = true;
        let mut cut_short = false;
        for m in &self.mutations {
            match m {
                Mutation::Truncate(n) => {
                    let keep = MIN_FRAME + n % (b.len() - MIN_FRAME + 1);
                    b.truncate(keep);
                    if self.required_len().is_some_and(|need| keep < need) {
                        cut_short = true;
                    }
                }
                Mutation::Ihl(ihl) => {
                    truncated_only = false;
                    if !self.v6 && b.len() > ETH_HLEN {
                        b[ETH_HLEN] = 0x40 | ihl;
                    }
                }
                Mutation::IpLength(len) => {
                    truncated_only = false;
                    let at = ETH_HLEN + if self.v6 { 4 } else { 2 };
                    if b.len() >= at + 2 {
                        b[at..at + 2].copy_from_slice(&len.to_be_bytes());
                    }
                }
                Mutation::Flip(at, byte) => {
                    truncated_only = false;
                    let at = at % b.len();
                    b[at] = *byte;
                }
                Mutation::Vlan(tci) => {
                    truncated_only = false;
                    let mut tag = vec![0x81, 0x00];
                    tag.extend_from_slice(&tci.to_be_bytes());
                    b.splice(12..12, tag);
                }
                Mutation::Append(extra) => {
                    truncated_only = false;
                    b.extend_from_slice(extra);
                }
            }
        }
        (b, truncated_only && cut_short)
    }
}

/// What the bytes alone say the verdict must be: a drop for an ethertype Moat does not carry
/// and for an IP header whose version nibble or IPv4 IHL is impossible.
fn must_drop(frame: &[u8]) -> bool {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let first = frame.get(ETH_HLEN).copied();
    match ethertype {
        0x0806 => false,
        0x0800 => first.is_some_and(|b| b >> 4 != 4 || b & 0x0f < 5),
        0x86dd => first.is_some_and(|b| b >> 4 != 6),
        _ => true,
    }
}

fn hook_direction(hook: Hook) -> u8 {
    match hook {
        Hook::FromContainer => DIRECTION_EGRESS,
        Hook::ToContainer => DIRECTION_INGRESS,
    }
}

/// Passes that need no allow rule: everything else would be policy admitting a flow.
const RULELESS_PASSES: [u8; 6] = [
    reason::ESTABLISHED,
    reason::REPLY,
    reason::RELATED,
    reason::HOST,
    reason::NEIGHBOR,
    reason::SERVICE_DEFERRED,
];

#[test]
fn arbitrary_frames_get_a_verdict_and_default_deny_admits_no_new_flow() {
    let f = Fixture::new("fuzzpkt");
    // The premise: this endpoint denies a new flow that a rule would be needed for.
    let syn = Packet::tcp(pod_v4(), peer_v4(), 40000, 80, TCP_SYN).bytes();
    assert_eq!(f.run_raw(Hook::FromContainer, &syn), TC_ACT_SHOT);
    assert_eq!(f.run_raw(Hook::ToContainer, &syn), TC_ACT_SHOT);

    let runs = Cell::new(3u64); // the premise's runs above and below count too
    let passes = Cell::new(0u64);
    let drops = Cell::new(2u64);
    let cut_short = Cell::new(0u64);
    let refused = Cell::new(0u64);
    let unpredicted = Cell::new(0u64);
    let config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(CASES)
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&frame(), |frame| {
        let (bytes, malformed) = match &frame {
            Frame::Bytes(b) => (b.clone(), false),
            Frame::Built(spec) => spec.build(),
        };
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            let direction = hook_direction(hook);
            let before = f
                .maps
                .count(VERDICT_DROP, reason::MALFORMED, direction)
                .unwrap();
            let verdict = match f.runner.run(hook, f.ifindex, &bytes, 1) {
                Ok(result) => result.verdict,
                Err(_) if kernel_refuses(&bytes) => {
                    refused.set(refused.get() + 1);
                    continue;
                }
                Err(e) if kernel_validates_ip(&bytes) && is_einval(&e) => {
                    // Which IP headers the test run itself refuses has changed between kernel
                    // versions; a refusal of a frame with an IP ethertype is the kernel's
                    // business, not a verdict (counted, and bounded below).
                    unpredicted.set(unpredicted.get() + 1);
                    refused.set(refused.get() + 1);
                    continue;
                }
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "{hook:?}: test run failed: {e:#}"
                    )));
                }
            };
            runs.set(runs.get() + 1);
            match verdict {
                TC_ACT_OK | TC_ACT_REDIRECT => passes.set(passes.get() + 1),
                TC_ACT_SHOT => drops.set(drops.get() + 1),
                other => {
                    return Err(TestCaseError::fail(format!(
                        "{hook:?}: verdict {other} is not a tc verdict"
                    )));
                }
            }
            if must_drop(&bytes) {
                prop_assert_eq!(verdict, TC_ACT_SHOT, "{:?}: {:02x?}", hook, bytes);
            }
            if malformed {
                cut_short.set(cut_short.get() + 1);
                prop_assert_eq!(verdict, TC_ACT_SHOT, "{:?}: {:02x?}", hook, bytes);
                let after = f
                    .maps
                    .count(VERDICT_DROP, reason::MALFORMED, direction)
                    .unwrap();
                prop_assert_eq!(after, before + 1, "{:?}: not counted as malformed", hook);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // A frame that only ARP can make pass, run last so the tallies include an ARP pass.
    assert_eq!(
        f.run_raw(Hook::ToContainer, &moat_testkit::packet::arp_request()),
        TC_ACT_OK
    );
    passes.set(passes.get() + 1);

    let counters = f.maps.counters().unwrap();
    let sum = |pred: &dyn Fn(u8, u8) -> bool| -> u64 {
        counters
            .iter()
            .filter(|c| pred(c.verdict, c.reason))
            .map(|c| c.packets)
            .sum()
    };
    assert_eq!(
        sum(&|_, _| true),
        runs.get(),
        "every run counted once: {counters:?}"
    );
    assert_eq!(sum(&|v, _| v == VERDICT_DROP), drops.get(), "{counters:?}");
    assert_eq!(
        sum(&|v, _| v == VERDICT_ALLOW),
        passes.get(),
        "{counters:?}"
    );
    assert_eq!(sum(&|v, _| v == VERDICT_AUDIT), 0, "{counters:?}");
    assert_eq!(
        sum(&|v, r| v == VERDICT_ALLOW && !RULELESS_PASSES.contains(&r)),
        0,
        "a pass that needs an allow rule, with none installed: {counters:?}"
    );
    assert!(
        cut_short.get() > 100,
        "only {} cut-short packets generated",
        cut_short.get()
    );
    // The kernel may refuse frames this test does not predict, but never so many that the
    // programs would be left unexercised.
    assert!(
        refused.get() * 3 < runs.get(),
        "{} of {} frames refused by the kernel's test run ({} unpredicted)",
        refused.get(),
        runs.get() + refused.get(),
        unpredicted.get()
    );
    for (key, value) in f.maps.conntrack_entries(Some(f.ifindex)) {
        assert!(
            value.remote_identity == IDENTITY_HOST || value.flags & CT_FLAG_SERVICE != 0,
            "a flow admitted without a rule: {key:?} {value:?}"
        );
    }
    eprintln!(
        "{} runs: {} passed, {} dropped, {} cut-short packets dropped as malformed; {} frames \
         refused by the kernel's test run ({} of them not predicted by kernel_refuses)",
        runs.get(),
        passes.get(),
        drops.get(),
        cut_short.get(),
        refused.get(),
        unpredicted.get()
    );
}

/// Found by the test above: an IPv6 extension header whose first two bytes are present but
/// whose body is cut off, in front of a protocol whose header the parser does not read, was
/// parsed as a complete packet (only TCP/UDP/SCTP/ICMP loads noticed a short chain). It is
/// malformed, like an IPv4 header whose options run past the end.
#[test]
fn a_truncated_ipv6_extension_header_is_malformed_whatever_follows() {
    let f = Fixture::new("fuzzext");
    let mut p = Packet::new(
        pod_v6(),
        peer_v6(),
        L4::Other {
            proto: 2,
            payload: Vec::new(),
        },
    );
    p.v6_extensions = vec![Ext::HopByHop];
    let mut frame = p.bytes();
    // Next header and length of the hop-by-hop header, then nothing.
    frame.truncate(ETH_HLEN + 40 + 2);
    for hook in [Hook::FromContainer, Hook::ToContainer] {
        assert_eq!(f.run_raw(hook, &frame), TC_ACT_SHOT, "{hook:?}");
        assert_eq!(
            f.maps
                .count(VERDICT_DROP, reason::MALFORMED, hook_direction(hook))
                .unwrap(),
            1,
            "{hook:?}: {:?}",
            f.maps.counters().unwrap()
        );
    }
}
