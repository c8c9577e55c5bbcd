//! FQDN egress on the real datapath with a real resolver: dnsmasq runs in a namespace of its
//! own and serves names with many addresses, a CNAME chain, AAAA records and answers over
//! TCP; the client pod resolves through it with real sockets and connects at once to the
//! answered address. Forged answers come from a hand-made resolver and an attacker
//! namespace.
//!
//! For many nodes: learning happens at the asking pod's own hook, from the answer's bytes,
//! so where the resolver runs (another node, the host network, outside the cluster) does not
//! matter; the resolver and the named hosts here are namespaces outside the pod set (the
//! world), reached through the host's routes as a remote node's would be.

mod support;

use std::{
    net::{IpAddr, UdpSocket},
    time::Duration,
};

use moat_common::*;
use moat_datapath::{FqdnMaps, Maps, attach_endpoint};
use moat_testkit::{
    dns::{self, Dnsmasq, Record, TYPE_A, TYPE_AAAA},
    lab::{Lab, LabPod, probe},
};
use support::LoadedDatapath;

const CLIENT: u32 = 1000;
const WILDCARD: u32 = IDENTITY_FQDN_FIRST + 1;
const PARTNER: u32 = IDENTITY_FQDN_FIRST + 2;
const SHORT: Duration = Duration::from_millis(700);
const PORT: u16 = 8080;

fn allow(maps: &mut Maps, remote: u32, dport: u16, proto: u8, direction: u8, rule_id: u32) {
    let key = PolicyKey {
        policy_id: CLIENT,
        remote_identity: remote,
        dport,
        proto,
        direction,
    };
    maps.upsert_policy(&key, &PolicyValue::allow(rule_id))
        .unwrap();
}

fn pattern(fqdn: &mut FqdnMaps, kind: u8, name: &str, selector: u32) {
    let key = FqdnPatternKey {
        identity: CLIENT,
        kind,
        _pad: [0; 3],
        name_hash: fqdn_name_hash(name.as_bytes()).unwrap(),
    };
    fqdn.upsert_pattern(&key, selector).unwrap();
}

struct Setup {
    _lab: Lab,
    dp: LoadedDatapath,
    client: LabPod,
    resolver: LabPod,
    web: LabPod,
    partner: LabPod,
    cdn: LabPod,
    other: LabPod,
    fake: LabPod,
    _servers: Vec<probe::EchoServer>,
    _dnsmasq: Dnsmasq,
}

/// The client (FQDN rules: `*.example.test` on TCP 8080, `api.partner.test` on any port;
/// DNS to anyone; nothing else) and, outside the pod set, a dnsmasq resolver, four named
/// hosts with echo servers and a namespace for a hand-made resolver. The client admits any
/// ingress, so that forged answers reach its hook and are judged by the parser alone.
fn setup(tag: &str, ttl_floor_s: u32) -> Setup {
    let dp = LoadedDatapath::new(tag);
    let mut lab = Lab::new(tag).unwrap();
    let client = lab.add_pod("cli").unwrap();
    let resolver = lab.add_pod("dns").unwrap();
    let web = lab.add_pod("web").unwrap();
    let partner = lab.add_pod("prt").unwrap();
    let cdn = lab.add_pod("cdn").unwrap();
    let other = lab.add_pod("oth").unwrap();
    let fake = lab.add_pod("fak").unwrap();
    let mut maps = dp.maps();
    client.register(&mut maps, CLIENT).unwrap();
    let mut ep = maps.endpoint(client.ifindex).unwrap();
    ep.flags |= ENDPOINT_FLAG_FQDN;
    maps.upsert_endpoint(client.ifindex, &ep).unwrap();
    allow(
        &mut maps,
        IDENTITY_ANY,
        53,
        PROTO_UDP,
        DIRECTION_EGRESS,
        101,
    );
    allow(
        &mut maps,
        IDENTITY_ANY,
        53,
        PROTO_TCP,
        DIRECTION_EGRESS,
        102,
    );
    allow(&mut maps, WILDCARD, PORT, PROTO_TCP, DIRECTION_EGRESS, 103);
    allow(&mut maps, PARTNER, 0, 0, DIRECTION_EGRESS, 104);
    allow(
        &mut maps,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_INGRESS,
        rule::NOT_ISOLATED,
    );
    let mut fqdn = FqdnMaps::open(&dp.pins).unwrap();
    fqdn.write_config(&FqdnConfig {
        ttl_floor_s,
        ttl_cap_s: 3600,
    })
    .unwrap();
    pattern(&mut fqdn, FQDN_MATCH_SUBDOMAIN, "example.test", WILDCARD);
    pattern(&mut fqdn, FQDN_MATCH_EXACT, "api.partner.test", PARTNER);
    attach_endpoint(&dp.pins, &client.host_if).unwrap();

    let mut lines = vec![
        format!("{} www.example.test", web.v4),
        format!("{} www.example.test", web.v6),
        format!("{} deep.a.b.example.test", web.v4),
        format!("{} api.partner.test", partner.v4),
        format!("{} api.partner.test", partner.v6),
        format!("{} edge.cdn-provider.test", cdn.v4),
        format!("{} edge.cdn-provider.test", cdn.v6),
        format!("{} deep.a.b.example.test", web.v6),
        format!("{} blocked.other.test", other.v6),
        format!("{} blocked.other.test", other.v4),
        format!("{} example.test", other.v4),
    ];
    // One name, many addresses: the web host's and 39 more of the documentation range.
    lines.push(format!("{} many.example.test", web.v4));
    for i in 1..40 {
        lines.push(format!("198.51.100.{i} many.example.test"));
    }
    let dnsmasq = Dnsmasq::start(
        &resolver.netns,
        &[IpAddr::V4(resolver.v4), IpAddr::V6(resolver.v6)],
        &(lines.join("\n") + "\n"),
        1,
        &["--cname=cdn.example.test,edge.cdn-provider.test"],
    )
    .unwrap();
    // Up when it answers (a name outside the policy: nothing is learned from it).
    let server = resolver.v4;
    let up = (0..50).any(|_| {
        let ok = client
            .run(move || {
                dns::ask_udp(
                    IpAddr::V4(server),
                    0,
                    &dns::query(1, "blocked.other.test", TYPE_A),
                )
                .is_ok()
            })
            .unwrap();
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    assert!(up, "dnsmasq did not answer");
    let servers = [&web, &partner, &cdn, &other]
        .iter()
        .map(|p| probe::EchoServer::start(p, PORT).unwrap())
        .collect();
    Setup {
        _lab: lab,
        dp,
        client,
        resolver,
        web,
        partner,
        cdn,
        other,
        fake,
        _servers: servers,
        _dnsmasq: dnsmasq,
    }
}

fn resolve(s: &Setup, server: IpAddr, name: &str, qtype: u16, tcp: bool) -> Vec<IpAddr> {
    let name = name.to_string();
    s.client
        .run(move || {
            let q = dns::query(0x4242, &name, qtype);
            let m = if tcp {
                dns::ask_tcp(server, &q)
            } else {
                dns::ask_udp(server, 0, &q)
            }
            .unwrap_or_else(|e| panic!("resolving {name}: {e:#}"));
            dns::answers(&m)
                .unwrap()
                .1
                .into_iter()
                .map(|(a, _)| a)
                .collect()
        })
        .unwrap()
}

fn learned(s: &Setup) -> Vec<IpAddr> {
    FqdnMaps::open(&s.dp.pins)
        .unwrap()
        .learned()
        .into_iter()
        .filter(|l| l.identity == CLIENT)
        .map(|l| l.addr)
        .collect()
}

fn connects(s: &Setup, to: IpAddr) -> bool {
    probe::tcp(&s.client, to, PORT, SHORT)
}

fn counter(s: &Setup, index: u32) -> u64 {
    s.dp.maps().special_counter(index).unwrap()
}

#[test]
fn the_first_connection_after_resolution_is_allowed_on_both_families() {
    let s = setup("fqa", 60);
    let (web4, web6) = (IpAddr::V4(s.web.v4), IpAddr::V6(s.web.v6));
    assert!(!connects(&s, web4), "nothing learned yet: denied");
    assert!(!connects(&s, web6));

    // Resolution and connection back to back: the answer taught the datapath before the
    // client could read it.
    let got = resolve(
        &s,
        IpAddr::V4(s.resolver.v4),
        "www.example.test",
        TYPE_A,
        false,
    );
    assert_eq!(got, vec![web4]);
    assert!(connects(&s, web4), "first connection to a fresh answer");
    // AAAA over IPv6 transport.
    let got = resolve(
        &s,
        IpAddr::V6(s.resolver.v6),
        "WWW.Example.TEST",
        TYPE_AAAA,
        false,
    );
    assert_eq!(got, vec![web6]);
    assert!(connects(&s, web6));
    // Only the rule's port: the wildcard rule is TCP 8080.
    assert!(!probe::udp(&s.client, web4, PORT, SHORT));

    // An exact name, over TCP this time.
    let partner4 = IpAddr::V4(s.partner.v4);
    assert!(!connects(&s, partner4));
    assert_eq!(
        resolve(
            &s,
            IpAddr::V4(s.resolver.v4),
            "api.partner.test",
            TYPE_A,
            true
        ),
        vec![partner4]
    );
    assert!(connects(&s, partner4), "answer over TCP");
    assert!(
        probe::udp(&s.client, partner4, PORT, SHORT),
        "the exact rule admits any port"
    );
}

#[test]
fn wildcards_chains_and_many_addresses() {
    let s = setup("fqb", 60);
    // Two labels before the suffix still match `*.example.test`.
    let web4 = IpAddr::V4(s.web.v4);
    resolve(
        &s,
        IpAddr::V4(s.resolver.v4),
        "deep.a.b.example.test",
        TYPE_A,
        false,
    );
    assert!(connects(&s, web4));

    // cdn.example.test is a CNAME to a name outside the pattern: its address is learned
    // because the chain starts at the asked name.
    let cdn4 = IpAddr::V4(s.cdn.v4);
    let got = resolve(
        &s,
        IpAddr::V4(s.resolver.v4),
        "cdn.example.test",
        TYPE_A,
        false,
    );
    assert_eq!(got, vec![cdn4]);
    assert!(connects(&s, cdn4), "address at the end of a CNAME chain");

    // Forty addresses: over UDP dnsmasq sends what fits in 512 bytes (and sets TC), over
    // TCP all forty; every address the client receives is learned.
    let udp = resolve(
        &s,
        IpAddr::V4(s.resolver.v4),
        "many.example.test",
        TYPE_A,
        false,
    );
    let tcp = resolve(
        &s,
        IpAddr::V4(s.resolver.v4),
        "many.example.test",
        TYPE_A,
        true,
    );
    assert_eq!(tcp.len(), 40);
    let known = learned(&s);
    for addr in udp.iter().chain(&tcp) {
        assert!(
            known.contains(addr),
            "{addr} of many.example.test not learned"
        );
    }

    // Names the policy does not name: the bare suffix (`*.` needs a label before it) and
    // another domain. Resolved fine, never learned, connections denied.
    let other4 = IpAddr::V4(s.other.v4);
    for name in ["example.test", "blocked.other.test"] {
        assert_eq!(
            resolve(&s, IpAddr::V4(s.resolver.v4), name, TYPE_A, false),
            vec![other4]
        );
        assert!(!connects(&s, other4), "{name} is not in policy");
    }
    assert!(!learned(&s).contains(&other4));
}

#[test]
fn short_ttls_expire_for_new_connections_but_established_ones_live_on() {
    // No floor: dnsmasq's TTL of 1 s is what the datapath keeps.
    let s = setup("fqc", 0);
    let web4 = IpAddr::V4(s.web.v4);
    resolve(
        &s,
        IpAddr::V4(s.resolver.v4),
        "www.example.test",
        TYPE_A,
        false,
    );
    let (opened, after) = s
        .client
        .run(move || {
            use std::io::{Read, Write};
            let mut conn =
                std::net::TcpStream::connect_timeout(&(web4, PORT).into(), SHORT).unwrap();
            conn.set_read_timeout(Some(SHORT)).unwrap();
            std::thread::sleep(Duration::from_millis(2500));
            let mut buf = [0u8; 4];
            let after = conn.write_all(b"late").is_ok()
                && conn.read_exact(&mut buf).is_ok()
                && &buf == b"late";
            (true, after)
        })
        .unwrap();
    assert!(opened);
    assert!(
        after,
        "an established connection outlives its address's expiry"
    );
    assert!(
        !connects(&s, web4),
        "a new connection after the TTL is denied"
    );

    // With a floor, a TTL of 1 s admits new connections for the floor's length.
    let mut fqdn = FqdnMaps::open(&s.dp.pins).unwrap();
    fqdn.write_config(&FqdnConfig {
        ttl_floor_s: 30,
        ttl_cap_s: 3600,
    })
    .unwrap();
    resolve(
        &s,
        IpAddr::V4(s.resolver.v4),
        "www.example.test",
        TYPE_A,
        false,
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        connects(&s, web4),
        "the floor keeps the address past its TTL"
    );
}

/// A resolver that answers one query with `answer(query)` after `delay`, from the fake
/// namespace; returns the query's id and source port.
fn fake_resolver(
    s: &Setup,
    delay: Duration,
    answer: impl FnOnce(u16) -> Vec<u8> + Send + 'static,
) -> std::thread::JoinHandle<(u16, u16)> {
    let fake = s.fake.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        fake.run(move || {
            let socket = UdpSocket::bind(("::", 53)).unwrap();
            tx.send(()).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 512];
            let (_, from) = socket.recv_from(&mut buf).unwrap();
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            std::thread::sleep(delay);
            socket.send_to(&answer(id), from).unwrap();
            (id, from.port())
        })
        .unwrap()
    });
    rx.recv().unwrap();
    handle
}

#[test]
fn forged_answers_teach_nothing() {
    let s = setup("fqd", 60);
    let fake4 = IpAddr::V4(s.fake.v4);
    let other4 = IpAddr::V4(s.other.v4);
    let web4 = IpAddr::V4(s.web.v4);

    // 1. Unsolicited: an answer nobody asked for, sent to the client from port 53.
    let unasked = counter(&s, METRIC_FQDN_UNASKED);
    let forged = dns::response(
        0x4242,
        "www.example.test",
        TYPE_A,
        &[Record::Addr("www.example.test".into(), other4, 300)],
    );
    send_from_port_53(&s.other, &forged, IpAddr::V4(s.client.v4), 40_000);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!learned(&s).contains(&other4));
    assert!(!connects(&s, other4));
    assert!(
        counter(&s, METRIC_FQDN_UNASKED) > unasked,
        "counted as unasked"
    );

    // 2. A resolver answering another question under the query's id.
    let resolver = fake_resolver(&s, Duration::ZERO, move |id| {
        dns::response(
            id,
            "evil.example.test",
            TYPE_A,
            &[Record::Addr("evil.example.test".into(), other4, 300)],
        )
    });
    let unasked = counter(&s, METRIC_FQDN_UNASKED);
    s.client
        .run(move || dns::ask_udp(fake4, 0, &dns::query(7, "www.example.test", TYPE_A)))
        .unwrap()
        .unwrap();
    resolver.join().unwrap();
    assert!(!learned(&s).contains(&other4));
    assert!(counter(&s, METRIC_FQDN_UNASKED) > unasked);

    // 3. Records for a name outside the answer's chain are ignored, the chain's are kept.
    let resolver = fake_resolver(&s, Duration::ZERO, move |id| {
        dns::response(
            id,
            "www.example.test",
            TYPE_A,
            &[
                Record::Addr("unrelated.test".into(), other4, 300),
                Record::Addr("www.example.test".into(), web4, 0),
            ],
        )
    });
    s.client
        .run(move || dns::ask_udp(fake4, 0, &dns::query(8, "www.example.test", TYPE_A)))
        .unwrap()
        .unwrap();
    resolver.join().unwrap();
    let known = learned(&s);
    assert!(!known.contains(&other4), "a record outside the chain");
    assert!(known.contains(&web4), "TTL 0 raised to the floor");
    assert!(connects(&s, web4));

    // 4. A forged answer from another address while the real query is pending: the real
    // resolver waits, the attacker answers first with the query's id and port.
    let real = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 77));
    attacker_answers_a_pending_query_first(&s, TYPE_A, real, other4);
}

/// The client asks the hand-made resolver (which answers `real` after 600 ms) from a fixed
/// port; meanwhile an attacker sends an answer with the query's id and port and the address
/// `forged` from its own address. The client application may well take the forgery (it came
/// first); the datapath must learn only the real answer, and count the forgery.
fn attacker_answers_a_pending_query_first(s: &Setup, qtype: u16, real: IpAddr, forged: IpAddr) {
    let v6 = real.is_ipv6();
    let (fake, client_addr) = if v6 {
        (IpAddr::V6(s.fake.v6), IpAddr::V6(s.client.v6))
    } else {
        (IpAddr::V4(s.fake.v4), IpAddr::V4(s.client.v4))
    };
    let (port, id) = (35_353, 0x5151);
    let resolver = fake_resolver(s, Duration::from_millis(600), move |id| {
        dns::response(
            id,
            "api.partner.test",
            qtype,
            &[Record::Addr("api.partner.test".into(), real, 300)],
        )
    });
    let client = s.client.clone();
    let asker = std::thread::spawn(move || {
        client
            .run(move || dns::ask_udp(fake, port, &dns::query(id, "api.partner.test", qtype)))
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(200));
    let message = dns::response(
        id,
        "api.partner.test",
        qtype,
        &[Record::Addr("api.partner.test".into(), forged, 300)],
    );
    let unasked = counter(s, METRIC_FQDN_UNASKED);
    send_from_port_53(&s.other, &message, client_addr, port);
    let _ = asker.join().unwrap();
    resolver.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let known = learned(s);
    assert!(!known.contains(&forged), "the attacker's address");
    assert!(known.contains(&real), "the real answer, after the forgery");
    assert!(counter(s, METRIC_FQDN_UNASKED) > unasked);
    assert!(!connects(s, forged));
}

/// Sends `message` from port 53 of `pod` to `to`:`port`.
fn send_from_port_53(pod: &LabPod, message: &[u8], to: IpAddr, port: u16) {
    let message = message.to_vec();
    pod.run(move || {
        let socket = UdpSocket::bind(("::", 53)).unwrap();
        socket.send_to(&message, (to, port)).unwrap();
    })
    .unwrap();
}

#[test]
fn over_ipv6_chains_wildcards_and_forgeries_behave_alike() {
    let s = setup("fqe", 60);
    let resolver6 = IpAddr::V6(s.resolver.v6);
    let (web6, cdn6, other6) = (
        IpAddr::V6(s.web.v6),
        IpAddr::V6(s.cdn.v6),
        IpAddr::V6(s.other.v6),
    );
    assert!(!connects(&s, web6));
    assert_eq!(
        resolve(&s, resolver6, "deep.a.b.example.test", TYPE_AAAA, false),
        vec![web6]
    );
    assert!(
        connects(&s, web6),
        "wildcard, two labels deep, AAAA over IPv6"
    );
    assert_eq!(
        resolve(&s, resolver6, "cdn.example.test", TYPE_AAAA, true),
        vec![cdn6]
    );
    assert!(
        connects(&s, cdn6),
        "the end of a CNAME chain, answered over TCP"
    );
    assert_eq!(
        resolve(&s, resolver6, "blocked.other.test", TYPE_AAAA, false),
        vec![other6]
    );
    assert!(!connects(&s, other6), "not in policy");

    // An attacker answering a pending IPv6 query first, from its own address.
    let real: IpAddr = "2001:db8::77".parse().unwrap();
    attacker_answers_a_pending_query_first(&s, TYPE_AAAA, real, other6);
}
