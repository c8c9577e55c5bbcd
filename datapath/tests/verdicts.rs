//! Every verdict path of the datapath, through BPF_PROG_TEST_RUN on crafted packets: the real
//! programs, verified and run by the kernel, with no network. Each test has its own pinned
//! maps, so they run in parallel.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use moat_common::*;
use moat_testkit::{
    packet::{self, Ext, L4, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    testrun::{Hook, TC_ACT_OK, TC_ACT_SHOT},
};
use support::{
    DummyLink, endpoint,
    fixture::{Fixture, PEER, POD, host_v4, net, peer_v4, peer_v6, pod_v4, pod_v6, service_v4},
};

impl Fixture {
    fn run(&self, hook: Hook, pkt: &Packet) -> u32 {
        self.run_raw(hook, &pkt.bytes())
    }

    fn out(&self, pkt: &Packet) -> u32 {
        self.run(Hook::FromContainer, pkt)
    }

    fn to_pod(&self, pkt: &Packet) -> u32 {
        self.run(Hook::ToContainer, pkt)
    }

    fn rule(
        &mut self,
        remote: u32,
        dport: u16,
        proto: u8,
        direction: u8,
        action: u8,
        rule_id: u32,
    ) {
        self.maps
            .upsert_policy(
                &PolicyKey {
                    policy_id: POD,
                    remote_identity: remote,
                    dport,
                    proto,
                    direction,
                },
                &PolicyValue {
                    rule_id,
                    action,
                    ..PolicyValue::default()
                },
            )
            .unwrap();
    }

    fn allow_out(&mut self, remote: u32, dport: u16, proto: u8, rule_id: u32) {
        self.rule(
            remote,
            dport,
            proto,
            DIRECTION_EGRESS,
            ACTION_ALLOW,
            rule_id,
        );
    }

    fn drained(&mut self) -> Vec<FlowEvent> {
        self.events.drain()
    }

    fn count(&self, verdict: u8, reason: u8, direction: u8) -> u64 {
        self.maps.count(verdict, reason, direction).unwrap()
    }
}

fn syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Packet {
    Packet::tcp(src, dst, sport, dport, TCP_SYN)
}

// --- policy lookups ------------------------------------------------------------------------

#[test]
fn egress_tcp_allowed_by_exact_entry_and_denied_on_other_port() {
    let mut f = Fixture::new("exact");
    f.allow_out(PEER, 80, PROTO_TCP, 100);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 40000, 80)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 40001, 81)), TC_ACT_SHOT);
    let events = f.drained();
    assert_eq!(
        events.len(),
        1,
        "only the drop is reported by default: {events:?}"
    );
    let e = events[0];
    assert_eq!(e.verdict, VERDICT_DROP);
    assert_eq!(e.reason, reason::DEFAULT_DENY);
    assert_eq!(e.rule_id, rule::NONE);
    assert_eq!(e.local_identity, POD);
    assert_eq!(e.remote_identity, PEER);
    assert_eq!(e.direction, DIRECTION_EGRESS);
    assert_eq!(e.dport, 81);
    assert_eq!(e.proto, PROTO_TCP);
    assert_eq!(
        f.count(VERDICT_ALLOW, reason::POLICY_ALLOW, DIRECTION_EGRESS),
        1
    );
    assert_eq!(
        f.count(VERDICT_DROP, reason::DEFAULT_DENY, DIRECTION_EGRESS),
        1
    );
}

#[test]
fn every_l4_protocol_is_judged_on_v4_and_v6() {
    let mut f = Fixture::new("protos");
    f.allow_out(PEER, 53, PROTO_UDP, 101);
    f.allow_out(PEER, 9000, PROTO_SCTP, 102);
    f.allow_out(PEER, 0, PROTO_ICMP, 103);
    f.allow_out(PEER, 0, PROTO_ICMPV6, 104);
    f.allow_out(PEER, 443, PROTO_TCP, 105);
    for (src, dst) in [(pod_v4(), peer_v4()), (pod_v6(), peer_v6())] {
        assert_eq!(
            f.out(&Packet::udp(src, dst, 1000, 53)),
            TC_ACT_OK,
            "udp {dst}"
        );
        assert_eq!(
            f.out(&Packet::udp(src, dst, 1000, 54)),
            TC_ACT_SHOT,
            "udp {dst}"
        );
        let sctp = |dport| Packet::new(src, dst, L4::Sctp { sport: 5000, dport });
        assert_eq!(f.out(&sctp(9000)), TC_ACT_OK, "sctp {dst}");
        assert_eq!(f.out(&sctp(9001)), TC_ACT_SHOT, "sctp {dst}");
        let echo = Packet::new(
            src,
            dst,
            L4::Echo {
                request: true,
                ident: 7,
            },
        );
        assert_eq!(f.out(&echo), TC_ACT_OK, "icmp {dst}");
        assert_eq!(f.out(&syn(src, dst, 40000, 443)), TC_ACT_OK, "tcp {dst}");
        assert_eq!(f.out(&syn(src, dst, 40000, 444)), TC_ACT_SHOT, "tcp {dst}");
    }
    // A protocol without ports is judged by protocol alone.
    let gre = Packet::new(
        pod_v4(),
        peer_v4(),
        L4::Other {
            proto: 47,
            payload: vec![0; 8],
        },
    );
    assert_eq!(f.out(&gre), TC_ACT_SHOT);
    f.allow_out(PEER, 0, 47, 106);
    assert_eq!(f.out(&gre), TC_ACT_OK);
}

#[test]
fn wildcard_entries_match_any_identity_port_and_protocol() {
    let mut f = Fixture::new("wild");
    // Any identity, TCP/8080.
    f.allow_out(IDENTITY_ANY, 8080, PROTO_TCP, 110);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 8080)), TC_ACT_OK);
    assert_eq!(
        f.out(&syn(
            pod_v4(),
            IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
            1,
            8080
        )),
        TC_ACT_OK
    );
    // PEER, any TCP port.
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 2, 9999)), TC_ACT_SHOT);
    f.allow_out(PEER, 0, PROTO_TCP, 111);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 3, 9999)), TC_ACT_OK);
    assert_eq!(
        f.out(&Packet::udp(pod_v4(), peer_v4(), 3, 9999)),
        TC_ACT_SHOT
    );
    // PEER, anything.
    f.allow_out(PEER, 0, 0, 112);
    assert_eq!(f.out(&Packet::udp(pod_v4(), peer_v4(), 4, 9999)), TC_ACT_OK);
    // Allow-all (the entry written for an endpoint no policy isolates).
    let world = IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1));
    assert_eq!(f.out(&Packet::udp(pod_v4(), world, 5, 53)), TC_ACT_SHOT);
    f.allow_out(IDENTITY_ANY, 0, 0, rule::NOT_ISOLATED);
    assert_eq!(f.out(&Packet::udp(pod_v4(), world, 5, 53)), TC_ACT_OK);
}

#[test]
fn deny_wins_over_a_broader_allow_and_names_its_rule() {
    let mut f = Fixture::new("deny");
    f.allow_out(PEER, 0, 0, 120);
    f.rule(PEER, 22, PROTO_TCP, DIRECTION_EGRESS, ACTION_DENY, 121);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 22)), TC_ACT_SHOT);
    // A deny under the identity wildcard still beats an identity-specific allow.
    f.rule(
        IDENTITY_ANY,
        23,
        PROTO_TCP,
        DIRECTION_EGRESS,
        ACTION_DENY,
        122,
    );
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 23)), TC_ACT_SHOT);
    let events = f.drained();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.reason == reason::POLICY_DENY));
    assert_eq!(events[0].rule_id, 121);
    assert_eq!(events[1].rule_id, 122);
}

#[test]
fn port_ranges_cover_end_port() {
    let mut f = Fixture::new("ranges");
    let mut set = PortRuleSet::default();
    set.rules[0] = PortRule {
        rule_id: 130,
        port_start: 1000,
        port_end: 2000,
        proto: PROTO_TCP,
        action: ACTION_ALLOW,
        tier: moat_common::TIER_NETPOL,
        _pad: 0,
    };
    set.count = 1;
    let key = PortRangeKey {
        policy_id: POD,
        remote_identity: PEER,
        proto: PROTO_TCP,
        direction: DIRECTION_EGRESS,
        _pad: [0; 2],
    };
    f.maps.upsert_port_ranges(&key, &set).unwrap();
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 1000)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 1500)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 2000)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 2001)), TC_ACT_SHOT);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 999)), TC_ACT_SHOT);
    assert_eq!(
        f.out(&Packet::udp(pod_v4(), peer_v4(), 1, 1500)),
        TC_ACT_SHOT
    );
}

fn any_port(rule_id: u32, proto: u8, action: u8) -> PortRuleSet {
    let mut set = PortRuleSet::default();
    set.rules[0] = PortRule {
        rule_id,
        port_start: 0,
        port_end: u16::MAX,
        proto,
        action,
        tier: moat_common::TIER_NETPOL,
        _pad: 0,
    };
    set.count = 1;
    set
}

#[test]
fn cidr_rules_use_longest_prefix_with_except_holes_v4_and_v6() {
    let mut f = Fixture::new("cidr");
    let allow = any_port(140, 0, ACTION_ALLOW);
    // 203.0.113.0/24 except 203.0.113.128/25: the except is an entry with no rules.
    f.maps
        .upsert_cidr(POD, DIRECTION_EGRESS, net("203.0.113.0/24"), &allow)
        .unwrap();
    f.maps
        .upsert_cidr(
            POD,
            DIRECTION_EGRESS,
            net("203.0.113.128/25"),
            &PortRuleSet::default(),
        )
        .unwrap();
    f.maps
        .upsert_cidr(POD, DIRECTION_EGRESS, net("2001:db8::/32"), &allow)
        .unwrap();
    f.maps
        .upsert_cidr(
            POD,
            DIRECTION_EGRESS,
            net("2001:db8:ff::/48"),
            &PortRuleSet::default(),
        )
        .unwrap();
    let v4 = |last| IpAddr::V4(Ipv4Addr::new(203, 0, 113, last));
    let v6 = |s: &str| IpAddr::V6(s.parse().unwrap());
    assert_eq!(f.out(&syn(pod_v4(), v4(5), 1, 80)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), v4(200), 1, 80)), TC_ACT_SHOT);
    assert_eq!(
        f.out(&syn(
            pod_v4(),
            IpAddr::V4(Ipv4Addr::new(203, 0, 114, 1)),
            1,
            80
        )),
        TC_ACT_SHOT
    );
    assert_eq!(f.out(&syn(pod_v6(), v6("2001:db8:1::1"), 1, 80)), TC_ACT_OK);
    assert_eq!(
        f.out(&syn(pod_v6(), v6("2001:db8:ff::1"), 1, 80)),
        TC_ACT_SHOT
    );
    // CIDR rules for another direction or endpoint do not apply.
    assert_eq!(f.to_pod(&syn(v4(5), pod_v4(), 1, 80)), TC_ACT_SHOT);
    // Port and protocol inside a CIDR rule set.
    let mut udp_only = any_port(141, PROTO_UDP, ACTION_ALLOW);
    udp_only.rules[0].port_start = 53;
    udp_only.rules[0].port_end = 53;
    f.maps
        .upsert_cidr(POD, DIRECTION_EGRESS, net("198.51.100.0/24"), &udp_only)
        .unwrap();
    let doc = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    assert_eq!(f.out(&Packet::udp(pod_v4(), doc, 9, 53)), TC_ACT_OK);
    assert_eq!(f.out(&Packet::udp(pod_v4(), doc, 9, 54)), TC_ACT_SHOT);
    assert_eq!(f.out(&syn(pod_v4(), doc, 9, 53)), TC_ACT_SHOT);
}

#[test]
fn cidr_rule_can_cover_a_pod_address_that_has_an_identity() {
    // ipBlock may name pod addresses; the CIDR lookup runs alongside the identity lookup.
    let mut f = Fixture::new("cidrpod");
    f.maps
        .upsert_cidr(
            POD,
            DIRECTION_EGRESS,
            net("10.1.0.2/32"),
            &any_port(150, 0, ACTION_ALLOW),
        )
        .unwrap();
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    let events = f.drained();
    assert!(events.is_empty());
    let _ = f.count(VERDICT_ALLOW, reason::POLICY_ALLOW, DIRECTION_EGRESS);
}

// --- conntrack -----------------------------------------------------------------------------

#[test]
fn replies_and_established_flows_pass_on_state() {
    let mut f = Fixture::new("ct");
    f.allow_out(PEER, 80, PROTO_TCP, 160);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 40000, 80)), TC_ACT_OK);
    // The reply enters the pod although no ingress rule exists.
    let synack = Packet::tcp(peer_v4(), pod_v4(), 80, 40000, TCP_SYN | TCP_ACK);
    assert_eq!(f.to_pod(&synack), TC_ACT_OK);
    let ack = Packet::tcp(pod_v4(), peer_v4(), 40000, 80, TCP_ACK);
    assert_eq!(f.out(&ack), TC_ACT_OK);
    let entries = f.maps.conntrack_entries(Some(f.ifindex));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.state, CT_STATE_ESTABLISHED);
    assert_eq!(entries[0].1.rule_id, 160);
    // An unsolicited packet from the peer on another port is a new flow: denied.
    assert_eq!(f.to_pod(&syn(peer_v4(), pod_v4(), 80, 40001)), TC_ACT_SHOT);
    assert_eq!(f.count(VERDICT_ALLOW, reason::REPLY, DIRECTION_INGRESS), 1);
    assert_eq!(
        f.count(VERDICT_ALLOW, reason::ESTABLISHED, DIRECTION_EGRESS),
        1
    );
}

#[test]
fn tcp_state_follows_syn_fin_and_rst() {
    let mut f = Fixture::new("tcpstate");
    f.allow_out(PEER, 80, PROTO_TCP, 161);
    let state = |f: &Fixture, sport: u16| {
        f.maps
            .conntrack_entries(Some(f.ifindex))
            .into_iter()
            .find(|(k, _)| k.sport == sport)
            .map(|(_, v)| v)
            .unwrap()
    };
    f.out(&syn(pod_v4(), peer_v4(), 41000, 80));
    assert_eq!(state(&f, 41000).state, CT_STATE_SYN_SENT);
    f.to_pod(&Packet::tcp(
        peer_v4(),
        pod_v4(),
        80,
        41000,
        TCP_SYN | TCP_ACK,
    ));
    assert_eq!(state(&f, 41000).state, CT_STATE_ESTABLISHED);
    f.out(&Packet::tcp(
        pod_v4(),
        peer_v4(),
        41000,
        80,
        TCP_FIN | TCP_ACK,
    ));
    assert_eq!(state(&f, 41000).state, CT_STATE_ESTABLISHED);
    f.to_pod(&Packet::tcp(
        peer_v4(),
        pod_v4(),
        80,
        41000,
        TCP_FIN | TCP_ACK,
    ));
    let closing = state(&f, 41000);
    assert_eq!(closing.state, CT_STATE_CLOSING);
    // Closing entries expire within seconds, established ones after hours.
    f.out(&syn(pod_v4(), peer_v4(), 41001, 80));
    f.to_pod(&Packet::tcp(
        peer_v4(),
        pod_v4(),
        80,
        41001,
        TCP_SYN | TCP_ACK,
    ));
    let established = state(&f, 41001);
    assert!(established.expires_ns > closing.expires_ns + 3600 * 1_000_000_000);

    // A packet that changes nothing leaves the entry unwritten unless its expiry would move
    // by a second or more (the entry is shared by both directions' CPUs). Marked expiries
    // half a second and two seconds off what the program computes show both cases.
    let set_expiry = |f: &mut Fixture, expires_ns: u64| {
        let (key, mut value) = f
            .maps
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .find(|(k, _)| k.ifindex == f.ifindex && (k.sport == 41001 || k.dport == 41001))
            .unwrap();
        value.expires_ns = expires_ns;
        f.maps.conntrack.insert(key, value, 0).unwrap();
    };
    let ack = Packet::tcp(pod_v4(), peer_v4(), 41001, 80, TCP_ACK);
    let near = established.expires_ns + 500_000_000;
    set_expiry(&mut f, near);
    assert_eq!(f.out(&ack), TC_ACT_OK);
    assert_eq!(
        state(&f, 41001).expires_ns,
        near,
        "rewritten within the second"
    );
    let stale = established.expires_ns - 2_000_000_000;
    set_expiry(&mut f, stale);
    assert_eq!(f.out(&ack), TC_ACT_OK);
    assert!(
        state(&f, 41001).expires_ns >= established.expires_ns,
        "refreshed once off by more than a second"
    );
    f.to_pod(&Packet::tcp(peer_v4(), pod_v4(), 80, 41001, TCP_RST));
    assert_eq!(state(&f, 41001).state, CT_STATE_CLOSING);
}

/// Both directions of a flow share one entry under an ordered key. Which end sorts first (here
/// the pod's address is the lower one) must change nothing: established and reply, FIN
/// tracking, and the initiator's tuple in `conntrack_entries`.
#[test]
fn a_flow_is_tracked_alike_whichever_end_sorts_first() {
    let mut f = Fixture::new("ctorder");
    f.allow_out(PEER, 80, PROTO_TCP, 170);
    f.rule(PEER, 8080, PROTO_TCP, DIRECTION_INGRESS, ACTION_ALLOW, 171);
    // Started by the lower end (the pod).
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 42000, 80)), TC_ACT_OK);
    let synack = Packet::tcp(peer_v4(), pod_v4(), 80, 42000, TCP_SYN | TCP_ACK);
    assert_eq!(f.to_pod(&synack), TC_ACT_OK);
    // Started by the higher end (the peer), then closed from both sides.
    assert_eq!(f.to_pod(&syn(peer_v4(), pod_v4(), 43000, 8080)), TC_ACT_OK);
    let synack = Packet::tcp(pod_v4(), peer_v4(), 8080, 43000, TCP_SYN | TCP_ACK);
    assert_eq!(f.out(&synack), TC_ACT_OK);
    let ack = Packet::tcp(peer_v4(), pod_v4(), 43000, 8080, TCP_ACK);
    assert_eq!(f.to_pod(&ack), TC_ACT_OK);
    let fin = Packet::tcp(peer_v4(), pod_v4(), 43000, 8080, TCP_FIN | TCP_ACK);
    assert_eq!(f.to_pod(&fin), TC_ACT_OK);
    let fin_back = Packet::tcp(pod_v4(), peer_v4(), 8080, 43000, TCP_FIN | TCP_ACK);
    assert_eq!(f.out(&fin_back), TC_ACT_OK);

    assert_eq!(f.count(VERDICT_ALLOW, reason::REPLY, DIRECTION_INGRESS), 1);
    assert_eq!(f.count(VERDICT_ALLOW, reason::REPLY, DIRECTION_EGRESS), 2);
    assert_eq!(
        f.count(VERDICT_ALLOW, reason::ESTABLISHED, DIRECTION_INGRESS),
        2
    );
    let entries = f.maps.conntrack_entries(Some(f.ifindex));
    assert_eq!(
        entries.len(),
        2,
        "one entry per flow, not one per direction"
    );
    let by_initiator = |sport: u16| {
        entries
            .iter()
            .find(|(k, _)| k.sport == sport)
            .unwrap_or_else(|| panic!("no entry keyed by the initiator's port {sport}"))
    };
    let (key, value) = by_initiator(42000);
    assert_eq!((key.dport, value.direction), (80, DIRECTION_EGRESS));
    assert_eq!((value.state, value.rule_id), (CT_STATE_ESTABLISHED, 170));
    let (key, value) = by_initiator(43000);
    assert_eq!((key.dport, value.direction), (8080, DIRECTION_INGRESS));
    assert_eq!((value.state, value.rule_id), (CT_STATE_CLOSING, 171));
}

#[test]
fn a_policy_change_stops_new_connections_but_not_established_ones() {
    let mut f = Fixture::new("change");
    f.allow_out(PEER, 80, PROTO_TCP, 162);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 42000, 80)), TC_ACT_OK);
    f.maps
        .remove_policy(&PolicyKey {
            policy_id: POD,
            remote_identity: PEER,
            dport: 80,
            proto: PROTO_TCP,
            direction: DIRECTION_EGRESS,
        })
        .unwrap();
    assert_eq!(
        f.out(&Packet::tcp(pod_v4(), peer_v4(), 42000, 80, TCP_ACK)),
        TC_ACT_OK
    );
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 42001, 80)), TC_ACT_SHOT);
}

#[test]
fn icmp_echo_reply_and_icmp_errors_relate_to_their_flow() {
    let mut f = Fixture::new("icmp");
    f.allow_out(PEER, 0, PROTO_ICMP, 170);
    f.allow_out(PEER, 0, PROTO_ICMPV6, 171);
    f.allow_out(PEER, 53, PROTO_UDP, 172);
    for (pod, peer) in [(pod_v4(), peer_v4()), (pod_v6(), peer_v6())] {
        let request = Packet::new(
            pod,
            peer,
            L4::Echo {
                request: true,
                ident: 99,
            },
        );
        let reply = Packet::new(
            peer,
            pod,
            L4::Echo {
                request: false,
                ident: 99,
            },
        );
        let stray = Packet::new(
            peer,
            pod,
            L4::Echo {
                request: false,
                ident: 100,
            },
        );
        assert_eq!(f.out(&request), TC_ACT_OK);
        assert_eq!(f.to_pod(&reply), TC_ACT_OK, "echo reply {peer}");
        assert_eq!(
            f.to_pod(&stray),
            TC_ACT_SHOT,
            "unsolicited echo reply {peer}"
        );

        let query = Packet::udp(pod, peer, 33000, 53);
        assert_eq!(f.out(&query), TC_ACT_OK);
        let error = Packet::new(
            peer,
            pod,
            L4::IcmpError {
                quoted: query.ip_bytes(),
            },
        );
        assert_eq!(f.to_pod(&error), TC_ACT_OK, "icmp error {peer}");
        let unrelated = Packet::udp(pod, peer, 33001, 53);
        let stray_error = Packet::new(
            peer,
            pod,
            L4::IcmpError {
                quoted: unrelated.ip_bytes(),
            },
        );
        assert_eq!(
            f.to_pod(&stray_error),
            TC_ACT_SHOT,
            "unrelated icmp error {peer}"
        );
    }
    assert_eq!(
        f.count(VERDICT_ALLOW, reason::RELATED, DIRECTION_INGRESS),
        2
    );
}

#[test]
fn reply_from_a_service_address_is_recognised_after_un_nat() {
    let f = Fixture::new("service");
    // Egress towards a ClusterIP is deferred to after DNAT, with the tuple recorded.
    assert_eq!(f.out(&syn(pod_v4(), service_v4(), 43000, 80)), TC_ACT_OK);
    assert_eq!(
        f.count(VERDICT_ALLOW, reason::SERVICE_DEFERRED, DIRECTION_EGRESS),
        1
    );
    let reply = Packet::tcp(service_v4(), pod_v4(), 80, 43000, TCP_SYN | TCP_ACK);
    assert_eq!(f.to_pod(&reply), TC_ACT_OK);
    assert_eq!(f.count(VERDICT_ALLOW, reason::REPLY, DIRECTION_INGRESS), 1);
    let entries = f.maps.conntrack_entries(Some(f.ifindex));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.flags & CT_FLAG_SERVICE, CT_FLAG_SERVICE);
    // Without the recorded request the same packet is an unsolicited new flow.
    let stray = Packet::tcp(service_v4(), pod_v4(), 80, 43001, TCP_SYN | TCP_ACK);
    assert_eq!(f.to_pod(&stray), TC_ACT_SHOT);
}

#[test]
fn a_local_senders_egress_policy_is_judged_at_the_receiver() {
    // Client B (PEER) reached this pod through a Service: B's hook saw only the ClusterIP,
    // so B's egress policy is applied here, where the real destination is known.
    let mut f = Fixture::new("sender");
    let sender_link = local_sender(&mut f);
    f.rule(PEER, 80, PROTO_TCP, DIRECTION_INGRESS, ACTION_ALLOW, 180);
    // The receiver allows it, the sender has no egress rule: dropped, reported as the
    // sender's egress.
    assert_eq!(f.to_pod(&syn(peer_v4(), pod_v4(), 44000, 80)), TC_ACT_SHOT);
    let events = f.drained();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].direction, DIRECTION_EGRESS);
    assert_eq!(events[0].local_identity, PEER);
    assert_eq!(events[0].remote_identity, POD);
    assert_eq!(events[0].ifindex, sender_link.ifindex);
    // Once the sender may send, the flow passes.
    allow_peer_out(&mut f, 80, PROTO_TCP, 181);
    assert_eq!(f.to_pod(&syn(peer_v4(), pod_v4(), 44001, 80)), TC_ACT_OK);
}

/// A second endpoint of this node, PEER on its own device, known to the ipcache as local.
fn local_sender(f: &mut Fixture) -> DummyLink {
    let sender = DummyLink::new();
    f.maps
        .upsert_endpoint(sender.ifindex, &endpoint(PEER, &[peer_v4()]))
        .unwrap();
    f.maps
        .upsert_ipcache(
            net("10.1.0.2/32"),
            &IpcacheValue {
                identity: PEER,
                ifindex: sender.ifindex,
                ..Default::default()
            },
        )
        .unwrap();
    sender
}

/// PEER (the local sender) may send to POD on `dport`/`proto`.
fn allow_peer_out(f: &mut Fixture, dport: u16, proto: u8, rule_id: u32) {
    f.maps
        .upsert_policy(
            &PolicyKey {
                policy_id: PEER,
                remote_identity: POD,
                dport,
                proto,
                direction: DIRECTION_EGRESS,
            },
            &PolicyValue {
                rule_id,
                action: ACTION_ALLOW,
                ..PolicyValue::default()
            },
        )
        .unwrap();
}

/// Two endpoints of this node (POD on the fixture's device, PEER on `sender`) that may
/// talk on TCP port 80 from PEER to POD.
fn two_local_pods(f: &mut Fixture) -> DummyLink {
    let sender = local_sender(f);
    f.maps
        .upsert_ipcache(
            net("10.1.0.1/32"),
            &IpcacheValue {
                identity: POD,
                ifindex: f.ifindex,
                ..Default::default()
            },
        )
        .unwrap();
    f.rule(PEER, 80, PROTO_TCP, DIRECTION_INGRESS, ACTION_ALLOW, 190);
    allow_peer_out(f, 80, PROTO_TCP, 191);
    sender
}

fn only_entry(f: &Fixture, ifindex: u32) -> CtValue {
    let entries = f.maps.conntrack_entries(Some(ifindex));
    assert_eq!(entries.len(), 1, "entries of {ifindex}: {entries:?}");
    entries[0].1
}

/// The handoff itself travels in skb->tc_index, which BPF_PROG_TEST_RUN neither takes nor
/// returns; `traffic.rs` shows it on real packets. Here: the linking, and the receiver's
/// state kept by the sender's hook.
#[test]
fn a_direct_tcp_flow_between_local_pods_links_both_perimeters_entries() {
    let mut f = Fixture::new("peer");
    let sender = two_local_pods(&mut f);
    let send = |from: u32, pkt: &Packet| {
        f.runner
            .run(Hook::FromContainer, from, &pkt.bytes(), 1)
            .unwrap()
            .verdict
    };
    // The SYN is judged by both perimeters, which links their entries.
    let open = syn(peer_v4(), pod_v4(), 45000, 80);
    assert_eq!(send(sender.ifindex, &open), TC_ACT_OK);
    assert_eq!(only_entry(&f, sender.ifindex).peer_ifindex, 0);
    assert_eq!(f.to_pod(&open), TC_ACT_OK);
    assert_eq!(only_entry(&f, f.ifindex).peer_ifindex, sender.ifindex);
    assert_eq!(only_entry(&f, sender.ifindex).peer_ifindex, f.ifindex);

    // The SYN-ACK, seen only by the answering pod's hook, moves the initiator's entry too:
    // the initiator's own hook will not look at it.
    let synack = Packet::tcp(pod_v4(), peer_v4(), 80, 45000, TCP_SYN | TCP_ACK);
    assert_eq!(send(f.ifindex, &synack), TC_ACT_OK);
    assert_eq!(only_entry(&f, sender.ifindex).state, CT_STATE_ESTABLISHED);
    // A FIN from the initiator is recorded in the receiver's entry the same way.
    let fin = Packet::tcp(peer_v4(), pod_v4(), 45000, 80, TCP_FIN | TCP_ACK);
    assert_eq!(send(sender.ifindex, &fin), TC_ACT_OK);
    assert_ne!(only_entry(&f, f.ifindex).flags & CT_FLAG_FIN_FORWARD, 0);
    assert_ne!(
        only_entry(&f, sender.ifindex).flags & CT_FLAG_FIN_FORWARD,
        0
    );

    // The sender goes away: its entries go, and the receiver's entry is unlinked, so it
    // vouches for no perimeter that is gone.
    f.maps.flush_conntrack(sender.ifindex).unwrap();
    assert!(f.maps.conntrack_entries(Some(sender.ifindex)).is_empty());
    assert_eq!(only_entry(&f, f.ifindex).peer_ifindex, 0);
    let answer = Packet::tcp(pod_v4(), peer_v4(), 80, 45000, TCP_ACK);
    assert_eq!(send(f.ifindex, &answer), TC_ACT_OK);
}

#[test]
fn udp_flows_between_local_pods_are_not_linked() {
    let mut f = Fixture::new("nolink");
    let sender = two_local_pods(&mut f);
    f.rule(PEER, 53, PROTO_UDP, DIRECTION_INGRESS, ACTION_ALLOW, 192);
    allow_peer_out(&mut f, 53, PROTO_UDP, 193);
    let query = Packet::udp(peer_v4(), pod_v4(), 5353, 53);
    let hook = |h: Hook, at: u32| f.runner.run(h, at, &query.bytes(), 1).unwrap().verdict;
    assert_eq!(hook(Hook::FromContainer, sender.ifindex), TC_ACT_OK);
    assert_eq!(hook(Hook::ToContainer, f.ifindex), TC_ACT_OK);
    assert_eq!(only_entry(&f, f.ifindex).peer_ifindex, 0);
    assert_eq!(only_entry(&f, sender.ifindex).peer_ifindex, 0);
}

#[test]
fn a_pod_cannot_borrow_its_peers_address_by_answering_its_own_flow() {
    let mut f = Fixture::new("borrow");
    f.allow_out(PEER, 80, PROTO_TCP, 160);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 40000, 80)), TC_ACT_OK);
    // Sent by the pod, shaped as the peer's answer: the flow's entry matches, but it proves
    // nothing about this source.
    let forged = Packet::tcp(peer_v4(), pod_v4(), 80, 40000, TCP_SYN | TCP_ACK);
    assert_eq!(f.out(&forged), TC_ACT_SHOT);
    let events = f.drained();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, reason::SPOOFED_SOURCE);
    // The real answer still comes in, and the pod's own packets still go out.
    assert_eq!(f.to_pod(&forged), TC_ACT_OK);
    let ack = Packet::tcp(pod_v4(), peer_v4(), 40000, 80, TCP_ACK);
    assert_eq!(f.out(&ack), TC_ACT_OK);
}

#[test]
fn an_answer_to_a_packet_addressed_to_someone_else_gets_the_source_check() {
    let mut f = Fixture::new("foreign");
    f.rule(
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_INGRESS,
        ACTION_ALLOW,
        rule::NOT_ISOLATED,
    );
    // A packet flooded to this pod, addressed to another one: admitted by policy, but its
    // entry is marked so that it cannot vouch for the pod's answers.
    let elsewhere = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 50));
    assert_eq!(f.to_pod(&syn(peer_v4(), elsewhere, 41000, 80)), TC_ACT_OK);
    let entries = f.maps.conntrack_entries(Some(f.ifindex));
    assert_eq!(entries.len(), 1);
    assert_ne!(entries[0].1.flags & CT_FLAG_FOREIGN_DEST, 0);
    let answer = Packet::tcp(elsewhere, peer_v4(), 80, 41000, TCP_SYN | TCP_ACK);
    assert_eq!(f.out(&answer), TC_ACT_SHOT);
    assert_eq!(f.drained()[0].reason, reason::SPOOFED_SOURCE);
    // Addressed to the pod itself: the entry vouches for the answer.
    assert_eq!(f.to_pod(&syn(peer_v4(), pod_v4(), 41001, 80)), TC_ACT_OK);
    let own = f
        .maps
        .conntrack_entries(Some(f.ifindex))
        .into_iter()
        .find(|(k, _)| k.sport == 41001)
        .unwrap();
    assert_eq!(own.1.flags & CT_FLAG_FOREIGN_DEST, 0);
    let answer = Packet::tcp(pod_v4(), peer_v4(), 80, 41001, TCP_SYN | TCP_ACK);
    assert_eq!(f.out(&answer), TC_ACT_OK);
}

#[test]
fn host_entries_have_an_exact_match_mirror_that_a_sync_repairs() {
    let mut f = Fixture::new("hosts");
    let key = |a: [u8; 4]| IpcacheKeyV4 { addr: a };
    // upsert_ipcache writes a host entry to the mirror too; a range stays in the trie only.
    assert_eq!(
        f.maps
            .hosts_v4
            .get(&key([10, 1, 0, 2]), 0)
            .unwrap()
            .identity,
        PEER
    );
    assert!(f.maps.hosts_v4.get(&key([10, 96, 0, 0]), 0).is_err());
    let v6 = IpcacheKeyV6 {
        addr: "fd00:1::2".parse::<Ipv6Addr>().unwrap().octets(),
    };
    assert_eq!(f.maps.hosts_v6.get(&v6, 0).unwrap().identity, PEER);
    f.allow_out(PEER, 80, PROTO_TCP, 170);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);

    // A crash between the two writes: a mirror entry the trie lacks, and one missing.
    let stray = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 77));
    let peer = IpcacheValue {
        identity: PEER,
        ..Default::default()
    };
    f.maps
        .hosts_v4
        .insert(key([10, 1, 0, 77]), peer, 0)
        .unwrap();
    f.maps.hosts_v4.remove(&key([10, 1, 0, 2])).unwrap();
    // The datapath asks the mirror first (the stray address passes as PEER) and the trie
    // when the mirror has nothing (the peer still resolves).
    assert_eq!(f.out(&syn(pod_v4(), stray, 2, 80)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 3, 80)), TC_ACT_OK);
    assert_eq!(f.maps.sync_host_cache().unwrap(), (1, 1));
    assert_eq!(f.maps.sync_host_cache().unwrap(), (0, 0));
    assert_eq!(f.out(&syn(pod_v4(), stray, 4, 80)), TC_ACT_SHOT);
    assert_eq!(
        f.maps
            .hosts_v4
            .get(&key([10, 1, 0, 2]), 0)
            .unwrap()
            .identity,
        PEER
    );
    // remove_ipcache takes it out of both.
    f.maps.remove_ipcache(net("10.1.0.2/32")).unwrap();
    assert!(f.maps.hosts_v4.get(&key([10, 1, 0, 2]), 0).is_err());
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 5, 80)), TC_ACT_SHOT);
}

#[test]
fn traffic_from_the_node_itself_is_always_allowed_in() {
    let f = Fixture::new("host");
    assert_eq!(f.to_pod(&syn(host_v4(), pod_v4(), 50000, 8080)), TC_ACT_OK);
    assert_eq!(f.count(VERDICT_ALLOW, reason::HOST, DIRECTION_INGRESS), 1);
    // ...but the node is no exception for the pod's own egress policy.
    assert_eq!(f.out(&syn(pod_v4(), host_v4(), 50001, 10250)), TC_ACT_SHOT);
}

// --- anti-spoofing, L2, malformed ----------------------------------------------------------

#[test]
fn a_spoofed_source_is_dropped_even_when_policy_allows_all() {
    let mut f = Fixture::new("spoof");
    f.allow_out(IDENTITY_ANY, 0, 0, rule::NOT_ISOLATED);
    let borrowed = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 99));
    assert_eq!(f.out(&syn(borrowed, peer_v4(), 1, 80)), TC_ACT_SHOT);
    let borrowed6 = IpAddr::V6("fd00:1::99".parse().unwrap());
    assert_eq!(f.out(&syn(borrowed6, peer_v6(), 1, 80)), TC_ACT_SHOT);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    let events = f.drained();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.reason == reason::SPOOFED_SOURCE));
    // The same source arriving *to* the pod is not spoofing (it is the remote side).
    f.rule(
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_INGRESS,
        ACTION_ALLOW,
        rule::NOT_ISOLATED,
    );
    assert_eq!(f.to_pod(&syn(borrowed, pod_v4(), 1, 80)), TC_ACT_OK);
}

#[test]
fn arp_and_neighbour_discovery_pass_other_ethertypes_drop() {
    let f = Fixture::new("l2");
    assert_eq!(
        f.run_raw(Hook::FromContainer, &packet::arp_request()),
        TC_ACT_OK
    );
    assert_eq!(
        f.run_raw(Hook::ToContainer, &packet::arp_request()),
        TC_ACT_OK
    );
    for icmp_type in [130, 131, 132, 133, 134, 135, 136, 137, 143] {
        let nd = Packet::new(pod_v6(), peer_v6(), L4::NeighborDiscovery { icmp_type });
        assert_eq!(f.out(&nd), TC_ACT_OK, "ND type {icmp_type}");
        // ND from the link-local or unspecified address is not spoofing.
        let dad = Packet::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            peer_v6(),
            L4::NeighborDiscovery { icmp_type },
        );
        assert_eq!(f.out(&dad), TC_ACT_OK);
    }
    assert_eq!(
        f.run_raw(Hook::FromContainer, &packet::unsupported_frame()),
        TC_ACT_SHOT
    );
    assert_eq!(
        f.count(VERDICT_DROP, reason::UNSUPPORTED_L3, DIRECTION_EGRESS),
        1
    );
}

#[test]
fn malformed_and_truncated_packets_get_a_defined_drop() {
    let mut f = Fixture::new("malformed");
    f.allow_out(IDENTITY_ANY, 0, 0, rule::NOT_ISOLATED);
    let good = syn(pod_v4(), peer_v4(), 1, 80).bytes();
    let good6 = syn(pod_v6(), peer_v6(), 1, 80).bytes();
    // BPF_PROG_TEST_RUN itself refuses frames whose IP header is cut short, so truncated L3
    // headers are covered by injecting raw frames on a real veth (netns tests); here the
    // cuts fall inside L4 and inside the IPv4 options.
    let udp = Packet::udp(pod_v4(), peer_v4(), 1, 53).bytes();
    let echo = Packet::new(
        pod_v4(),
        peer_v4(),
        L4::Echo {
            request: true,
            ident: 1,
        },
    )
    .bytes();
    let sctp = Packet::new(pod_v6(), peer_v6(), L4::Sctp { sport: 1, dport: 2 }).bytes();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated tcp header", good[..14 + 20 + 10].to_vec()),
        ("truncated tcp over ipv6", good6[..14 + 40 + 8].to_vec()),
        ("truncated udp header", udp[..14 + 20 + 6].to_vec()),
        ("icmp echo without identifier", echo[..14 + 20 + 3].to_vec()),
        (
            "truncated sctp common header",
            sctp[..14 + 40 + 10].to_vec(),
        ),
    ];
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    cases.push(("ihl below 5", bad_ihl));
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    cases.push(("version 6 in an ipv4 frame", bad_version));
    let mut long_options = good.clone();
    long_options[14] = 0x4f; // 60-byte header in a 54-byte packet
    cases.push(("options past the end", long_options));
    let mut bad_offset = good.clone();
    bad_offset[14 + 20 + 12] = 0x20; // TCP data offset 2
    cases.push(("tcp data offset below 5", bad_offset));
    let mut too_many_ext = syn(pod_v6(), peer_v6(), 1, 80);
    too_many_ext.v6_extensions = vec![Ext::DestinationOptions; 7];
    cases.push(("seven extension headers", too_many_ext.bytes()));
    for (name, frame) in &cases {
        assert_eq!(f.run_raw(Hook::FromContainer, frame), TC_ACT_SHOT, "{name}");
        assert_eq!(f.run_raw(Hook::ToContainer, frame), TC_ACT_SHOT, "{name}");
    }
    let malformed = f.count(VERDICT_DROP, reason::MALFORMED, DIRECTION_EGRESS)
        + f.count(VERDICT_DROP, reason::MALFORMED, DIRECTION_INGRESS);
    assert_eq!(malformed, 2 * cases.len() as u64);
}

#[test]
fn ipv6_extension_headers_are_skipped_to_reach_the_ports() {
    let mut f = Fixture::new("ext");
    f.allow_out(PEER, 443, PROTO_TCP, 190);
    let mut pkt = syn(pod_v6(), peer_v6(), 1, 443);
    pkt.v6_extensions = vec![Ext::HopByHop, Ext::Routing, Ext::DestinationOptions];
    assert_eq!(f.out(&pkt), TC_ACT_OK);
    pkt.l4 = L4::Tcp {
        sport: 1,
        dport: 444,
        flags: TCP_SYN,
    };
    assert_eq!(f.out(&pkt), TC_ACT_SHOT);
}

#[test]
fn later_fragments_are_judged_with_the_first_fragments_ports() {
    let mut f = Fixture::new("frag");
    f.allow_out(PEER, 53, PROTO_UDP, 200);
    // IPv4: first fragment carries the UDP header, the later one only payload.
    let mut first = Packet::udp(pod_v4(), peer_v4(), 5353, 53);
    first.v4_fragment = Some((0, true, 0x4242));
    let mut later = first.clone();
    later.v4_fragment = Some((2, false, 0x4242));
    later.fragment_payload = Some(vec![0xab; 16]);
    assert_eq!(f.out(&first), TC_ACT_OK);
    assert_eq!(f.out(&later), TC_ACT_OK);
    // A later fragment whose first was never seen.
    let mut orphan = later.clone();
    orphan.v4_fragment = Some((2, false, 0x4343));
    assert_eq!(f.out(&orphan), TC_ACT_SHOT);
    assert_eq!(
        f.count(VERDICT_DROP, reason::FRAGMENT_UNKNOWN, DIRECTION_EGRESS),
        1
    );
    // A datagram to a denied port stays denied in all its fragments.
    let mut denied_first = Packet::udp(pod_v4(), peer_v4(), 5353, 54);
    denied_first.v4_fragment = Some((0, true, 0x4444));
    let mut denied_later = denied_first.clone();
    denied_later.v4_fragment = Some((2, false, 0x4444));
    denied_later.fragment_payload = Some(vec![0; 16]);
    assert_eq!(f.out(&denied_first), TC_ACT_SHOT);
    assert_eq!(f.out(&denied_later), TC_ACT_SHOT);
    // IPv6 fragment header.
    let mut first6 = Packet::udp(pod_v6(), peer_v6(), 5353, 53);
    first6.v6_extensions = vec![Ext::Fragment {
        offset: 0,
        more: true,
        id: 77,
    }];
    let mut later6 = first6.clone();
    later6.v6_extensions = vec![Ext::Fragment {
        offset: 2,
        more: false,
        id: 77,
    }];
    later6.fragment_payload = Some(vec![0xcd; 16]);
    let mut orphan6 = later6.clone();
    orphan6.v6_extensions = vec![Ext::Fragment {
        offset: 2,
        more: false,
        id: 78,
    }];
    assert_eq!(f.out(&first6), TC_ACT_OK);
    assert_eq!(f.out(&later6), TC_ACT_OK);
    assert_eq!(f.out(&orphan6), TC_ACT_SHOT);
}

#[test]
fn an_interface_without_an_endpoint_entry_fails_closed() {
    let f = Fixture::new("unknown");
    let stranger = DummyLink::new();
    let pkt = syn(pod_v4(), peer_v4(), 1, 80).bytes();
    let verdict = f
        .runner
        .run(Hook::FromContainer, stranger.ifindex, &pkt, 1)
        .unwrap();
    assert_eq!(verdict.verdict, TC_ACT_SHOT);
    assert_eq!(
        f.count(VERDICT_DROP, reason::UNKNOWN_ENDPOINT, DIRECTION_EGRESS),
        1
    );
}

// --- modes, events, metrics ----------------------------------------------------------------

fn set_mode(f: &mut Fixture, mode: u8, flags: u8) {
    let mut ep = endpoint(POD, &[pod_v4(), pod_v6()]);
    ep.mode = mode;
    ep.flags = flags;
    f.maps.upsert_endpoint(f.ifindex, &ep).unwrap();
}

#[test]
fn audit_mode_allows_and_reports_the_drop_that_would_have_happened() {
    let mut f = Fixture::new("audit");
    set_mode(&mut f, MODE_AUDIT, 0);
    f.rule(PEER, 22, PROTO_TCP, DIRECTION_EGRESS, ACTION_DENY, 210);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 22)), TC_ACT_OK);
    let events = f.drained();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].verdict, VERDICT_AUDIT);
    assert_eq!(events[0].reason, reason::DEFAULT_DENY);
    assert_eq!(events[1].verdict, VERDICT_AUDIT);
    assert_eq!(events[1].reason, reason::POLICY_DENY);
    assert_eq!(events[1].rule_id, 210);
    assert!(events.iter().all(|e| e.mode == MODE_AUDIT));
    // Anti-spoofing is not subject to audit.
    let borrowed = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 99));
    assert_eq!(f.out(&syn(borrowed, peer_v4(), 1, 80)), TC_ACT_SHOT);
}

#[test]
fn learn_mode_allows_and_reports_every_new_flow() {
    let mut f = Fixture::new("learn");
    set_mode(&mut f, MODE_LEARN, 0);
    f.allow_out(PEER, 80, PROTO_TCP, 220);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 2, 81)), TC_ACT_OK);
    // Established packets are not reported again.
    assert_eq!(
        f.out(&Packet::tcp(pod_v4(), peer_v4(), 1, 80, TCP_ACK)),
        TC_ACT_OK
    );
    let events = f.drained();
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[0].verdict, events[0].reason, events[0].rule_id),
        (VERDICT_ALLOW, reason::POLICY_ALLOW, 220)
    );
    assert_eq!(
        (events[1].verdict, events[1].reason),
        (VERDICT_ALLOW, reason::LEARN)
    );
    assert_eq!(events[1].dport, 81);
}

#[test]
fn allowed_flows_are_reported_when_flow_logging_is_on() {
    let mut f = Fixture::new("flowlog");
    f.allow_out(PEER, 80, PROTO_TCP, 230);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    assert!(f.drained().is_empty());
    set_mode(&mut f, MODE_ENFORCE, ENDPOINT_FLAG_LOG_ALLOWS);
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 2, 80)), TC_ACT_OK);
    let events = f.drained();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].rule_id, 230);
    assert_eq!(events[0].verdict, VERDICT_ALLOW);
    // The global switch does the same for every endpoint.
    set_mode(&mut f, MODE_ENFORCE, 0);
    f.maps
        .set_config(&Config {
            flags: CONFIG_FLAG_LOG_ALL_ALLOWS,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 3, 80)), TC_ACT_OK);
    assert_eq!(f.drained().len(), 1);
}

#[test]
fn event_rate_limit_caps_a_flood_and_counts_what_it_swallowed() {
    let mut f = Fixture::new("ratelimit");
    f.maps
        .set_config(&Config {
            flags: 0,
            events_per_second: 1,
            events_burst: 3,
            _pad: 0,
        })
        .unwrap();
    // 200 denied new flows in a burst, far faster than 1 per second.
    let frame = syn(pod_v4(), peer_v4(), 1, 81).bytes();
    let result = f
        .runner
        .run(Hook::FromContainer, f.ifindex, &frame, 200)
        .unwrap();
    assert_eq!(result.verdict, TC_ACT_SHOT);
    let events = f.events.collect_for(Duration::from_millis(50)).unwrap();
    let limited = f.maps.special_counter(METRIC_EVENTS_RATE_LIMITED).unwrap();
    // Test runs may be spread over both CPUs, each with its own bucket.
    assert!(
        events.len() <= 2 * 4,
        "{} events passed the limiter",
        events.len()
    );
    assert!(!events.is_empty());
    assert_eq!(
        events.len() as u64 + limited,
        200,
        "every drop is either reported or counted"
    );
    assert_eq!(
        f.count(VERDICT_DROP, reason::DEFAULT_DENY, DIRECTION_EGRESS),
        200
    );
}

#[test]
fn lookup_hints_skip_only_lookups_that_cannot_matter() {
    let mut f = Fixture::new("hints");
    f.allow_out(PEER, 80, PROTO_TCP, 240);
    f.maps
        .upsert_cidr(
            POD,
            DIRECTION_EGRESS,
            net("10.1.0.0/24"),
            &any_port(241, 0, ACTION_ALLOW),
        )
        .unwrap();
    let hints = ENDPOINT_FLAG_NO_DENY | ENDPOINT_FLAG_NO_RANGES | ENDPOINT_FLAG_NO_CIDR;
    set_mode(&mut f, MODE_ENFORCE, hints | ENDPOINT_FLAG_LOG_ALLOWS);
    // The exact entry still decides, and names its rule.
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    assert_eq!(f.drained()[0].rule_id, 240);
    // With NO_CIDR the CIDR table is not consulted (moatd sets the hint only when the
    // policy id has no CIDR entry): port 81 falls to default deny.
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 2, 81)), TC_ACT_SHOT);
    // Without the hint, the same packet is admitted by the CIDR rule.
    set_mode(
        &mut f,
        MODE_ENFORCE,
        ENDPOINT_FLAG_NO_DENY | ENDPOINT_FLAG_NO_RANGES,
    );
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 3, 81)), TC_ACT_OK);
}

// --- ClusterNetworkPolicy tiers -------------------------------------------------------------

/// One key's entry with an answer in each tier ((action, rule id), action 0 = none).
fn tiered(netpol: (u8, u32), admin: (u8, u32), baseline: (u8, u32)) -> PolicyValue {
    PolicyValue {
        rule_id: netpol.1,
        action: netpol.0,
        admin_action: admin.0,
        admin_rule: admin.1,
        baseline_action: baseline.0,
        baseline_rule: baseline.1,
        ..PolicyValue::default()
    }
}

impl Fixture {
    fn entry(&mut self, remote: u32, dport: u16, proto: u8, value: PolicyValue) {
        let key = PolicyKey {
            policy_id: POD,
            remote_identity: remote,
            dport,
            proto,
            direction: DIRECTION_EGRESS,
        };
        self.maps.upsert_policy(&key, &value).unwrap();
    }

    /// (verdict, reason, rule id) of the one event the last packets produced.
    fn last_event(&mut self) -> (u8, u8, u32) {
        let e = *self.drained().last().expect("an event");
        (e.verdict, e.reason, e.rule_id)
    }
}

const NONE: (u8, u32) = (0, 0);

#[test]
fn admin_first_rule_decides_and_a_pass_hands_over_to_network_policy() {
    let mut f = Fixture::new("tier-admin");
    set_mode(&mut f, MODE_ENFORCE, ENDPOINT_FLAG_LOG_ALLOWS);
    // A NetworkPolicy allows 80; an Admin Deny (rule 500) covers the same key.
    f.entry(
        PEER,
        80,
        PROTO_TCP,
        tiered((ACTION_ALLOW, 100), (ACTION_DENY, 500), NONE),
    );
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_SHOT);
    assert_eq!(f.last_event(), (VERDICT_DROP, reason::ADMIN_DENY, 500));
    // An earlier Admin rule (200) passes everything: the Deny is skipped, the NetworkPolicy
    // tier decides: 80 allowed by it, 81 not (isolated, no allow).
    f.entry(0, 0, 0, tiered(NONE, (ACTION_PASS, 200), NONE));
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 2, 80)), TC_ACT_OK);
    assert_eq!(f.last_event(), (VERDICT_ALLOW, reason::POLICY_ALLOW, 100));
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 3, 81)), TC_ACT_SHOT);
    assert_eq!(
        f.last_event(),
        (VERDICT_DROP, reason::DEFAULT_DENY, rule::NONE)
    );
    // An even earlier Admin Accept (150) on 81 accepts what no NetworkPolicy allows.
    f.entry(PEER, 81, PROTO_TCP, tiered(NONE, (ACTION_ALLOW, 150), NONE));
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 4, 81)), TC_ACT_OK);
    assert_eq!(f.last_event(), (VERDICT_ALLOW, reason::ADMIN_ACCEPT, 150));
}

#[test]
fn baseline_decides_only_where_no_network_policy_isolates() {
    let mut f = Fixture::new("tier-base");
    set_mode(&mut f, MODE_ENFORCE, ENDPOINT_FLAG_LOG_ALLOWS);
    // Not isolated (the NOT_ISOLATED allow), a Baseline Deny of everything (rule 700) and a
    // Baseline Accept of 80 that comes first (600).
    f.entry(
        0,
        0,
        0,
        tiered((ACTION_ALLOW, rule::NOT_ISOLATED), NONE, (ACTION_DENY, 700)),
    );
    f.entry(PEER, 80, PROTO_TCP, tiered(NONE, NONE, (ACTION_ALLOW, 600)));
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    assert_eq!(
        f.last_event(),
        (VERDICT_ALLOW, reason::BASELINE_ACCEPT, 600)
    );
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 2, 81)), TC_ACT_SHOT);
    assert_eq!(f.last_event(), (VERDICT_DROP, reason::BASELINE_DENY, 700));
    // A Baseline Pass that comes first leaves the default allow.
    f.entry(PEER, 82, PROTO_TCP, tiered(NONE, NONE, (ACTION_PASS, 650)));
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 3, 82)), TC_ACT_OK);
    assert_eq!(
        f.last_event(),
        (VERDICT_ALLOW, reason::POLICY_ALLOW, rule::NOT_ISOLATED)
    );
    // Once a NetworkPolicy isolates the endpoint (no NOT_ISOLATED entry; it allows 81), the
    // Baseline tier is not consulted: 81 allowed by it, 80 default deny.
    f.entry(0, 0, 0, tiered(NONE, NONE, (ACTION_DENY, 700)));
    f.entry(PEER, 81, PROTO_TCP, tiered((ACTION_ALLOW, 110), NONE, NONE));
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 4, 81)), TC_ACT_OK);
    assert_eq!(f.last_event(), (VERDICT_ALLOW, reason::POLICY_ALLOW, 110));
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 5, 80)), TC_ACT_SHOT);
    assert_eq!(
        f.last_event(),
        (VERDICT_DROP, reason::DEFAULT_DENY, rule::NONE)
    );
}

#[test]
fn cidr_rule_sets_carry_their_tier_on_v4_and_v6() {
    let mut f = Fixture::new("tier-cidr");
    let mut set = any_port(130, 0, ACTION_ALLOW);
    set.rules[1] = PortRule {
        rule_id: 900,
        port_start: 443,
        port_end: 443,
        proto: PROTO_TCP,
        action: ACTION_DENY,
        tier: TIER_ADMIN,
        _pad: 0,
    };
    set.count = 2;
    for cidr in ["203.0.113.0/24", "2001:db8::/32"] {
        f.maps
            .upsert_cidr(POD, DIRECTION_EGRESS, net(cidr), &set)
            .unwrap();
    }
    for dst in [
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)),
        IpAddr::V6("2001:db8::5".parse().unwrap()),
    ] {
        let src = if dst.is_ipv4() { pod_v4() } else { pod_v6() };
        assert_eq!(f.out(&syn(src, dst, 1, 80)), TC_ACT_OK, "{dst}");
        assert_eq!(f.out(&syn(src, dst, 2, 443)), TC_ACT_SHOT, "{dst}");
        assert_eq!(f.last_event(), (VERDICT_DROP, reason::ADMIN_DENY, 900));
    }
}

#[test]
fn audit_mode_lets_an_admin_deny_through_and_reports_it() {
    let mut f = Fixture::new("tier-audit");
    set_mode(&mut f, MODE_AUDIT, 0);
    f.entry(
        PEER,
        80,
        PROTO_TCP,
        tiered((ACTION_ALLOW, 100), (ACTION_DENY, 500), NONE),
    );
    assert_eq!(f.out(&syn(pod_v4(), peer_v4(), 1, 80)), TC_ACT_OK);
    assert_eq!(f.last_event(), (VERDICT_AUDIT, reason::ADMIN_DENY, 500));
}

// --- quarantine allowances ----------------------------------------------------------------

#[test]
fn a_quarantine_allows_dns_by_default_what_it_lists_or_nothing() {
    use moat_datapath::threats::{ThreatConfigMap, ThreatSettings, parse_quarantine_allow};
    let mut f = Fixture::new("qallow");
    f.allow_out(IDENTITY_ANY, 0, 0, rule::NOT_ISOLATED);
    f.maps
        .set_endpoint_flag(f.ifindex, ENDPOINT_FLAG_QUARANTINED, true)
        .unwrap();
    let dns = |sport| Packet::udp(pod_v4(), peer_v4(), sport, 53);
    let web = |sport| syn(pod_v4(), peer_v4(), sport, 443);

    // Never configured (no list written): DNS only.
    assert_eq!(f.out(&dns(40000)), TC_ACT_OK);
    assert_eq!(f.out(&web(40001)), TC_ACT_SHOT);

    let mut config = ThreatConfigMap::open(&f.dp.pins).unwrap();
    let mut settings = ThreatSettings {
        quarantine_allow: parse_quarantine_allow("tcp/443").unwrap(),
        ..ThreatSettings::default()
    };
    config.write(&settings.to_config()).unwrap();
    assert_eq!(f.out(&web(40002)), TC_ACT_OK, "listed");
    assert_eq!(f.out(&dns(40003)), TC_ACT_SHOT, "not listed");

    // An empty list allows nothing, DNS included.
    settings.quarantine_allow = parse_quarantine_allow("").unwrap();
    config.write(&settings.to_config()).unwrap();
    assert_eq!(f.out(&dns(40004)), TC_ACT_SHOT);
    assert_eq!(f.out(&web(40005)), TC_ACT_SHOT);
}

// --- FQDN selectors -----------------------------------------------------------------------

#[test]
fn a_learned_destination_is_judged_by_its_selectors_rules_until_it_expires() {
    const SELECTOR: u32 = IDENTITY_FQDN_FIRST + 7;
    let mut f = Fixture::new("fqdnsel");
    let mut ep = f.maps.endpoint(f.ifindex).unwrap();
    ep.flags |= ENDPOINT_FLAG_FQDN;
    f.maps.upsert_endpoint(f.ifindex, &ep).unwrap();
    f.allow_out(SELECTOR, 443, PROTO_TCP, 200);
    let mut set = PortRuleSet::default();
    set.rules[0] = PortRule {
        rule_id: 201,
        port_start: 8000,
        port_end: 8100,
        proto: PROTO_TCP,
        action: ACTION_ALLOW,
        tier: moat_common::TIER_NETPOL,
        _pad: 0,
    };
    set.count = 1;
    let key = PortRangeKey {
        policy_id: POD,
        remote_identity: SELECTOR,
        proto: PROTO_TCP,
        direction: DIRECTION_EGRESS,
        _pad: [0; 2],
    };
    f.maps.upsert_port_ranges(&key, &set).unwrap();
    let named: IpAddr = "203.0.113.5".parse().unwrap();
    let unnamed: IpAddr = "203.0.113.6".parse().unwrap();
    let mut fqdn = moat_datapath::FqdnMaps::open(&f.dp.pins).unwrap();
    let live = FqdnAddr {
        expires_ns: u64::MAX,
        selectors: [SELECTOR, 0, 0, 0],
        ..Default::default()
    };
    fqdn.insert_learned(POD, named, &live).unwrap();

    assert_eq!(f.out(&syn(pod_v4(), named, 40000, 443)), TC_ACT_OK);
    assert_eq!(
        f.out(&syn(pod_v4(), named, 40001, 8050)),
        TC_ACT_OK,
        "range"
    );
    assert_eq!(f.out(&syn(pod_v4(), named, 40002, 9000)), TC_ACT_SHOT);
    assert_eq!(f.out(&syn(pod_v4(), unnamed, 40003, 443)), TC_ACT_SHOT);
    let drained = f.drained();
    assert!(drained.iter().all(|e| e.reason == reason::DEFAULT_DENY));

    // Learned by another identity only: not this pod's.
    fqdn.remove_learned(POD, named).unwrap();
    fqdn.insert_learned(POD + 1, named, &live).unwrap();
    assert_eq!(f.out(&syn(pod_v4(), named, 40004, 443)), TC_ACT_SHOT);

    // Expired: new flows are denied again.
    let expired = FqdnAddr {
        expires_ns: 1,
        ..live
    };
    fqdn.insert_learned(POD, named, &expired).unwrap();
    assert_eq!(f.out(&syn(pod_v4(), named, 40005, 443)), TC_ACT_SHOT);

    // Without the endpoint's FQDN flag nothing learned is consulted.
    fqdn.insert_learned(POD, named, &live).unwrap();
    assert_eq!(f.out(&syn(pod_v4(), named, 40006, 443)), TC_ACT_OK);
    ep.flags &= !ENDPOINT_FLAG_FQDN;
    f.maps.upsert_endpoint(f.ifindex, &ep).unwrap();
    assert_eq!(f.out(&syn(pod_v4(), named, 40007, 443)), TC_ACT_SHOT);
}

#[test]
fn selectors_staged_for_one_decision_never_reach_the_next() {
    // Per-CPU scratch carries the staged selectors: keep both runs on one CPU.
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
    const SELECTOR: u32 = IDENTITY_FQDN_FIRST + 9;
    let mut f = Fixture::new("fqdnstale");
    let sender = local_sender(&mut f);
    let mut ep = f.maps.endpoint(sender.ifindex).unwrap();
    // No deny entries: `decide` returns at the first allow, before the FQDN steps.
    ep.flags |= ENDPOINT_FLAG_FQDN | ENDPOINT_FLAG_NO_DENY;
    f.maps.upsert_endpoint(sender.ifindex, &ep).unwrap();
    f.rule(PEER, 80, PROTO_TCP, DIRECTION_INGRESS, ACTION_ALLOW, 190);
    let peer_rule = |f: &mut Fixture, remote: u32, dport: u16, rule_id: u32| {
        f.maps
            .upsert_policy(
                &PolicyKey {
                    policy_id: PEER,
                    remote_identity: remote,
                    dport,
                    proto: PROTO_TCP,
                    direction: DIRECTION_EGRESS,
                },
                &PolicyValue::allow(rule_id),
            )
            .unwrap();
    };
    peer_rule(&mut f, IDENTITY_ANY, 443, 191);
    peer_rule(&mut f, SELECTOR, 80, 192);
    let named: IpAddr = "203.0.113.5".parse().unwrap();
    moat_datapath::FqdnMaps::open(&f.dp.pins)
        .unwrap()
        .insert_learned(
            PEER,
            named,
            &FqdnAddr {
                expires_ns: u64::MAX,
                selectors: [SELECTOR, 0, 0, 0],
                ..Default::default()
            },
        )
        .unwrap();
    // The sender's flow to the named address stages its selector and is allowed by the
    // plain rule first.
    let out = syn(peer_v4(), named, 45000, 443);
    let r = f
        .runner
        .run(Hook::FromContainer, sender.ifindex, &out.bytes(), 1)
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    // Then the sender's egress to this pod on 80 is judged here: only the selector's rule
    // would allow it, and the selector was not staged for this destination.
    assert_eq!(f.to_pod(&syn(peer_v4(), pod_v4(), 45001, 80)), TC_ACT_SHOT);
}
