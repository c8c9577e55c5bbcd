//! moatd's masquerade of pod egress leaving the cluster, on the real kernel. A network
//! namespace stands in for the node: moatd and moat-cni run in it (`nsenter --net`, so the
//! pins stay in the host's bpffs). Its uplink leads to a second namespace, the internet
//! (203.0.113.1, 2001:db8:113::1), which has no route back to any pod CIDR: a pod's
//! connection to it completes only when masqueraded. The same namespace also holds an
//! address of another node's pod CIDR, of a Service CIDR and of a `--non-masquerade-cidr`;
//! a datagram needs no way back, so a UDP listener there shows what source arrives.
//!
//! - To the internet the listener sees the node's uplink address (TCP, both families).
//! - To every cluster CIDR, and to a pod of this node whose address is in no cluster CIDR,
//!   it sees the pod's own address.
//! - A Node added later: traffic to its pod CIDR stops being masqueraded.
//! - After `nft flush ruleset` moatd writes its table again within its check period.
//! - A killed moatd leaves the table; `auto` in chained mode and `--masquerade=false` remove
//!   it (the internet is then unreachable); bare `--masquerade` turns it on.
//! - Without nft, moatd runs on and says why in its status.

mod support_cni;
mod support_moatd;

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use moat_testkit::lab::in_netns;
use moatd::api::MasqueradeStatus;
use serde_json::json;
use support_cni::Netns;
use support_moatd::{Daemon, Env};

const TABLE: &str = "inet moat-masquerade";
const NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
const INTERNET_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const INTERNET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 1);
/// In node-b's pod CIDRs.
const NODE_B_POD_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const NODE_B_POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd44, 2, 0, 0, 0, 0, 0, 0x10);
/// In node-c's pod CIDR, once node-c exists.
const NODE_C_POD_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 10);
/// In moatd's default Service CIDR (10.96.0.0/12).
const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// In the `--non-masquerade-cidr` the test gives moatd.
const KEPT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const TIMEOUT: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(10);

/// `lab::sh`, failing the test on an error (its message carries the command's output).
fn sh(cmd: &str) -> String {
    moat_testkit::lab::sh(cmd).unwrap()
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if check() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {WAIT:?}");
}

/// The node and the internet, wired; forwarding on in the node, as on a real one.
fn wire(node: &Netns, internet: &Netns) {
    let (n, i) = (node.name(), internet.name());
    // No DAD: a tentative link-local address would hold up neighbour discovery. No reverse
    // path filter in the internet: a datagram from a pod address it cannot route back to
    // must still reach the listener, which is how the test reads unmasqueraded sources.
    sh(&format!(
        "ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
             net.ipv6.conf.default.accept_dad=0 && \
         ip netns exec {i} sysctl -qw net.ipv4.conf.all.rp_filter=0 \
             net.ipv4.conf.default.rp_filter=0 net.ipv6.conf.default.accept_dad=0 && \
         ip -n {n} link set lo up && ip -n {i} link set lo up && \
         ip -n {n} link add up0 type veth peer name up0p netns {i} && \
         ip -n {n} addr add {NODE_V4}/24 dev up0 && ip -n {n} addr add {NODE_V6}/64 dev up0 nodad && \
         ip -n {i} addr add 192.0.2.254/24 dev up0p && ip -n {i} addr add 2001:db8:2::254/64 dev up0p nodad && \
         ip -n {n} link set up0 up && ip -n {i} link set up0p up && \
         ip -n {n} route add default via 192.0.2.254 && ip -n {n} -6 route add default via 2001:db8:2::254"
    ));
    for addr in [
        format!("{INTERNET_V4}/32"),
        format!("{INTERNET_V6}/128"),
        format!("{NODE_B_POD_V4}/32"),
        format!("{NODE_B_POD_V6}/128"),
        format!("{NODE_C_POD_V4}/32"),
        format!("{SERVICE_V4}/32"),
        format!("{KEPT_V4}/32"),
    ] {
        sh(&format!("ip -n {i} addr add {addr} dev lo"));
    }
}

fn node_yaml(name: &str, cidrs: [&str; 2], address: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDRs: [\"{}\", \"{}\"]\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{address}\"}}\n",
        cidrs[0], cidrs[1]
    )
}

/// moatd as node-a, in the node, checking its table every second.
fn start_moatd(env: &Env, node: &Netns, extra: &[&str]) -> Daemon {
    env.spawn_and_wait(
        env.moatd_command(Some(node.name()))
            .args(["--node-name", "node-a", "--metrics-addr", ""])
            .args(["--masquerade-check-secs", "1"])
            .args(["--non-masquerade-cidr", "198.51.100.0/24"])
            .args(extra),
    )
}

/// The node: its namespace, and the moat-cni and moat-ipam it runs.
struct Node {
    netns: Netns,
    cni_bin: PathBuf,
}

/// A pod moat-cni added in the node: its network (also its container id and name) and
/// addresses.
struct Pod {
    netns: Netns,
    network: &'static str,
    ranges: serde_json::Value,
    v4: IpAddr,
    v6: Option<IpAddr>,
}

impl Pod {
    fn add(
        env: &Env,
        node: &Node,
        netns: Netns,
        network: &'static str,
        ranges: serde_json::Value,
    ) -> Self {
        let added = cni(env, node, &netns, network, &ranges, "ADD");
        Self {
            v4: support_cni::result_ip(&added, false).expect("an IPv4 address"),
            v6: support_cni::result_ip(&added, true),
            netns,
            network,
            ranges,
        }
    }

    /// moat-cni DEL, then the namespace goes (and the veth pair with it), as a runtime does.
    /// Done before each moatd restart: moat-cni and moatd, entered with `nsenter --net`, read
    /// the host's /sys, where the node's links are not, so DEL cannot hand the host veth
    /// over for deletion and a restarted moatd would not find veths it has filters on.
    fn delete(self, env: &Env, node: &Node) {
        cni(env, node, &self.netns, self.network, &self.ranges, "DEL");
    }
}

fn cni(
    env: &Env,
    node: &Node,
    pod: &Netns,
    network: &str,
    ranges: &serde_json::Value,
    command: &str,
) -> serde_json::Value {
    let conf = env.standalone_conf(network, ranges.clone());
    let call = support_cni::CniPod {
        container_id: network,
        netns: pod.name(),
        namespace: "default",
        name: network,
    };
    support_cni::run(
        Some(node.netns.name()),
        &node.cni_bin,
        &conf,
        command,
        &call,
    )
    .unwrap_or_else(|e| panic!("{command} {network}: {e}"))
}

/// The source of a TCP connection from `pod` to `to`, as the listener (in `at`) accepted
/// it; `None` when the connection did not complete.
fn tcp_source(pod: &Netns, at: &Netns, to: IpAddr) -> Option<IpAddr> {
    let listener = in_netns(at.name(), move || TcpListener::bind((to, 0)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let target = listener.local_addr().unwrap();
    let pod = pod.name().to_string();
    let client = std::thread::spawn(move || {
        in_netns(&pod, move || {
            // Held open until the listener has accepted.
            let stream = TcpStream::connect_timeout(&target, TIMEOUT);
            std::thread::sleep(Duration::from_millis(200));
            stream.is_ok()
        })
        .unwrap()
    });
    let deadline = Instant::now() + TIMEOUT + Duration::from_secs(1);
    let seen = loop {
        match listener.accept() {
            Ok((_, peer)) => break Some(peer.ip().to_canonical()),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => break None,
        }
    };
    let connected = client.join().unwrap();
    assert_eq!(connected, seen.is_some(), "client and listener disagree");
    seen
}

/// The source of one datagram from `pod` to `to`, as the socket in `at` received it.
fn udp_source(pod: &Netns, at: &Netns, to: IpAddr) -> Option<IpAddr> {
    let socket = in_netns(at.name(), move || UdpSocket::bind((to, 0)))
        .unwrap()
        .unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let target = socket.local_addr().unwrap();
    in_netns(pod.name(), move || {
        let any: IpAddr = if target.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        // A fresh socket each time: a new port is a new conntrack entry, judged by the
        // table as it is now.
        UdpSocket::bind(SocketAddr::new(any, 0))
            .and_then(|s| s.send_to(b"moat", target))
            .unwrap();
    })
    .unwrap();
    let mut buf = [0u8; 16];
    socket
        .recv_from(&mut buf)
        .ok()
        .map(|(_, from)| from.ip().to_canonical())
}

/// `nft list table` in the node: `None` when the table does not exist.
fn table(node: &Netns) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", node.name(), "nft", "list", "table"])
        .args(TABLE.split(' '))
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn masquerade_status(env: &Env) -> MasqueradeStatus {
    env.status()
        .masquerade
        .expect("moatd reports its masquerade")
}

#[test]
fn moatd_masquerades_pod_egress_leaving_the_cluster_and_nothing_else() {
    let env = Env::new("masq");
    let node = Node {
        netns: Netns::new("moatmqn"),
        cni_bin: support_cni::cni_path(env.root()),
    };
    let internet = Netns::new("moatmqi");
    wire(&node.netns, &internet);
    env.write(
        "00-nodes.yaml",
        &(node_yaml("node-a", ["10.244.1.0/24", "fd44:1::/64"], "192.0.2.1")
            + &node_yaml("node-b", ["10.244.2.0/24", "fd44:2::/64"], "192.0.2.254")),
    );
    let pod_ranges = json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd44:1::/64"}]]);
    // Standalone by default: masquerade on.
    let mut moatd = start_moatd(&env, &node.netns, &[]);
    let pod = Pod::add(
        &env,
        &node,
        Netns::new("moatmqp"),
        "masq",
        pod_ranges.clone(),
    );
    let (pod_v4, pod_v6) = (pod.v4, pod.v6.expect("an IPv6 address"));
    // A pod of this node whose address is in no cluster CIDR: what reaches it through its
    // veth keeps its source all the same.
    let stray = Pod::add(
        &env,
        &node,
        Netns::new("moatmqs"),
        "masq-stray",
        json!([[{"subnet": "10.250.0.0/24"}]]),
    );

    let status = masquerade_status(&env);
    assert!(status.enabled, "{status:?}");
    assert_eq!(status.table, TABLE);
    assert_eq!(
        status.sources,
        ["10.244.1.0/24", "fd44:1::/64"],
        "{status:?}"
    );
    assert_eq!(status.problem, None);
    let listed = table(&node.netns).expect("moatd's table in the node");
    assert!(listed.contains("masquerade"), "{listed}");

    // The internet answers only because the node's address is the source.
    let node_v4 = IpAddr::V4(NODE_V4);
    let node_v6 = IpAddr::V6(NODE_V6);
    assert_eq!(
        tcp_source(&pod.netns, &internet, INTERNET_V4.into()),
        Some(node_v4)
    );
    assert_eq!(
        tcp_source(&pod.netns, &internet, INTERNET_V6.into()),
        Some(node_v6)
    );
    assert_eq!(
        udp_source(&pod.netns, &internet, INTERNET_V4.into()),
        Some(node_v4)
    );

    // Inside the cluster the pod's address is kept.
    for (what, to, want) in [
        ("node-b's pod CIDR", IpAddr::V4(NODE_B_POD_V4), pod_v4),
        ("node-b's pod CIDR, v6", IpAddr::V6(NODE_B_POD_V6), pod_v6),
        ("a Service CIDR", IpAddr::V4(SERVICE_V4), pod_v4),
        ("a --non-masquerade-cidr", IpAddr::V4(KEPT_V4), pod_v4),
    ] {
        assert_eq!(udp_source(&pod.netns, &internet, to), Some(want), "{what}");
    }
    assert_eq!(
        udp_source(&pod.netns, &stray.netns, stray.v4),
        Some(pod_v4),
        "a pod of this node outside the pod CIDRs"
    );

    // A Node that appears later: its pod CIDR is the cluster's from then on.
    assert_eq!(
        udp_source(&pod.netns, &internet, NODE_C_POD_V4.into()),
        Some(node_v4),
        "before node-c exists, 10.244.3.0/24 is outside the cluster"
    );
    env.write(
        "01-node-c.yaml",
        &node_yaml("node-c", ["10.244.3.0/24", "fd44:3::/64"], "192.0.2.254"),
    );
    eventually("node-c's pod CIDR keeps the pod's address", || {
        udp_source(&pod.netns, &internet, NODE_C_POD_V4.into()) == Some(pod_v4)
    });
    assert!(
        masquerade_status(&env)
            .kept
            .contains(&"10.244.3.0/24".to_string())
    );

    // Someone flushes the node's ruleset: moatd writes its table again.
    sh(&format!(
        "ip netns exec {n} nft flush ruleset && ! ip netns exec {n} nft list table {TABLE} 2>/dev/null",
        n = node.netns.name()
    ));
    let back = eventually("the table back after a flush", || {
        table(&node.netns).is_some()
    });
    println!("masquerade table back {back:?} after `nft flush ruleset`");
    assert_eq!(
        tcp_source(&pod.netns, &internet, INTERNET_V4.into()),
        Some(node_v4)
    );

    // A killed moatd leaves it: pods keep their egress while moatd restarts.
    pod.delete(&env, &node);
    stray.delete(&env, &node);
    moatd.kill();
    assert!(table(&node.netns).is_some(), "the table outlives moatd");

    // Chained mode, where the primary CNI masquerades: `auto` is off and the table goes.
    let mut moatd = start_moatd(&env, &node.netns, &["--cni-mode", "chained"]);
    eventually("no table in chained mode", || table(&node.netns).is_none());
    assert!(!masquerade_status(&env).enabled);
    moatd.kill();
    // ...unless asked for.
    let mut moatd = start_moatd(
        &env,
        &node.netns,
        &["--cni-mode", "chained", "--masquerade"],
    );
    eventually("the table with --masquerade", || {
        table(&node.netns).is_some()
    });
    moatd.kill();

    // --masquerade=false: no table, and the internet is out of reach.
    let mut moatd = start_moatd(&env, &node.netns, &["--masquerade=false"]);
    eventually("no table with --masquerade=false", || {
        table(&node.netns).is_none()
    });
    let status = masquerade_status(&env);
    assert!(!status.enabled && status.sources.is_empty(), "{status:?}");
    let pod = Pod::add(&env, &node, Netns::new("moatmqp"), "masq-off", pod_ranges);
    assert_eq!(tcp_source(&pod.netns, &internet, INTERNET_V4.into()), None);
    assert_eq!(tcp_source(&pod.netns, &internet, INTERNET_V6.into()), None);
    assert_eq!(
        udp_source(&pod.netns, &internet, INTERNET_V4.into()),
        Some(pod.v4),
        "unmasqueraded, the pod's own address arrives"
    );
    pod.delete(&env, &node);
    moatd.kill();

    // Without nft moatd serves on, ready, and says what is wrong.
    let mut moatd = start_moatd(&env, &node.netns, &["--nft", "/nonexistent/nft"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(moatd.exited(), None, "moatd exited without nft");
    let status = env.status();
    assert!(status.ready, "{:?}", status.not_ready);
    let problem = status
        .masquerade
        .and_then(|m| m.problem)
        .unwrap_or_default();
    assert!(
        problem.contains("/nonexistent/nft not found") && problem.contains("nftables"),
        "{problem:?}"
    );
}
