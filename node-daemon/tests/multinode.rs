//! Two nodes on one machine. Each node is a network namespace with its own moatd (state,
//! socket and pin directory), running with `--routing direct`; the nodes' `eth0`s meet on a
//! bridge in a third namespace (the "fabric", so that the host's own bridge netfilter
//! settings play no part). Pods are made by the real moat-cni (standalone, moat-ipam) run
//! inside each node's namespace, and both moatds read one local datastore directory: the
//! cluster's truth, with Node objects (pod CIDRs, addresses) and the pods' status.podIPs.
//!
//! Checked: each moatd routes the other node's pod CIDRs (v4 and v6) via its address; a pod
//! on node A reaches a pod on node B only as policy allows, which needs node B to know node
//! A's pod from the datastore (before its podIPs are published it is "world" and denied);
//! a Node removed from the datastore takes its routes with it; moatd killed with -9 leaves
//! routes and enforcement in place, and after a restart DEL leaves nothing behind.
//!
//! Services whose backends are not local pods: node-a DNATs Service addresses as kube-proxy
//! does, to a pod on node-b, to node-a's own host network, to node-b's host network and to
//! an address outside the cluster (the fabric stands in for the internet). A client under
//! egress default-deny reaches none of them, each is allowed by its own rule, and the drop is
//! journaled against the real destination.

mod support_cni;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use moat_testkit::{
    Moatd,
    lab::{LabPod, probe},
    moatd::Netns,
};
use moatd::api::{self, Request, Response};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_millis(700);

/// `lab::sh`, failing the test on an error (its message carries the command's output).
fn sh(cmd: &str) -> String {
    moat_testkit::lab::sh(cmd).unwrap()
}

fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {limit:?}");
}

struct Node {
    name: &'static str,
    netns: String,
    dir: PathBuf,
    pin_root: PathBuf,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    pod_v4: &'static str,
    pod_v6: &'static str,
    daemon: Option<Moatd>,
    /// moatd flags beyond the common ones.
    extra_args: Vec<String>,
}

impl Node {
    fn socket(&self) -> PathBuf {
        self.dir.join("moatd.sock")
    }

    fn start(&mut self, policies: &Path) {
        let daemon = Moatd::builder(env!("CARGO_BIN_EXE_moatd"))
            .netns(Netns::IpNetnsExec(self.netns.clone()))
            .args(["--node-name", self.name, "--routing", "direct"])
            .policy_dir(policies)
            .state_dir(self.dir.join("state"))
            .socket(self.socket())
            .pending_dir(self.dir.join("pending"))
            .pin_root(&self.pin_root)
            .poll_ms(100)
            .args(["--metrics-addr", ""])
            .args(&self.extra_args)
            .spawn()
            .unwrap_or_else(|e| panic!("moatd ready: {e:#}"));
        self.daemon = Some(daemon);
    }

    fn kill(&mut self) {
        drop(self.daemon.take());
    }

    fn status(&self) -> api::DaemonStatus {
        match api::call(&self.socket(), &Request::Status, Duration::from_secs(5)).unwrap() {
            Response::Status(s) => *s,
            other => panic!("{other:?}"),
        }
    }

    /// moatd's routes in this node (`ip route show proto 77`), both families.
    fn routes(&self) -> String {
        let proto = moatd::routes::RTPROT_MOAT;
        sh(&format!(
            "ip -n {ns} -4 route show proto {proto}; ip -n {ns} -6 route show proto {proto}",
            ns = self.netns
        ))
    }

    fn conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "multinode",
            "type": "moat-cni",
            "mode": "standalone",
            "socket": self.socket(),
            "pinRoot": self.pin_root,
            "pendingDir": self.dir.join("pending"),
            "registrationTimeoutMs": 5000,
            "ipam": {
                "type": "moat-ipam",
                "dataDir": self.dir.join("ipam"),
                "ranges": [[{"subnet": self.pod_v4}], [{"subnet": self.pod_v6}]]
            }
        })
    }

    /// Runs moat-cni inside this node, as a kubelet on it would.
    fn cni(&self, command: &str, bin: &Path, pod: &PodSpot) -> Value {
        let container_id = format!("mn-{}", pod.name);
        let call = support_cni::CniPod {
            container_id: &container_id,
            netns: &pod.netns,
            namespace: "mn",
            name: pod.name,
        };
        support_cni::run_with_node_sys(&self.netns, bin, &self.conf(), command, &call)
            .unwrap_or_else(|e| panic!("{command} {}: {e}", pod.name))
    }
}

/// A pod: where it runs and, once added, its addresses.
struct PodSpot {
    name: &'static str,
    node: usize,
    app: &'static str,
    netns: String,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl PodSpot {
    fn lab(&self) -> LabPod {
        LabPod {
            name: self.name.into(),
            netns: self.netns.clone(),
            host_if: String::new(),
            ifindex: 0,
            v4: self.v4.unwrap(),
            v6: self.v6.unwrap(),
        }
    }
}

/// Everything the test creates; removed on drop, also when an assertion fails.
struct Cluster {
    tag: String,
    dir: tempfile::TempDir,
    bpffs: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<PodSpot>,
}

impl Cluster {
    fn new() -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "run as root (make test does)"
        );
        // Unique per cluster: the tests of this file run at once in one process.
        static CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let dir = tempfile::tempdir().unwrap();
        // `ip netns exec` gives moatd a fresh /sys, without the host's bpffs: the nodes pin
        // into a bpffs instance of their own.
        let bpffs = dir.path().join("bpf");
        std::fs::create_dir_all(&bpffs).unwrap();
        sh(&format!("mount -t bpf bpf {}", bpffs.display()));
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        let mut cluster = Self {
            nodes: Vec::new(),
            pods: Vec::new(),
            bpffs,
            dir,
            tag,
        };
        cluster.wire();
        cluster
    }

    fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    fn fabric(&self) -> String {
        format!("mnf{}", self.tag)
    }

    /// The fabric bridge and two nodes with an eth0 on it (v4 and v6), forwarding on.
    fn wire(&mut self) {
        let fabric = self.fabric();
        sh(&format!(
            "ip netns add {fabric} && ip -n {fabric} link add br0 type bridge && ip -n {fabric} link set br0 up"
        ));
        let specs = [
            ("node-a", 1u8, "10.61.1.0/24", "fd61:1::/64"),
            ("node-b", 2u8, "10.61.2.0/24", "fd61:2::/64"),
        ];
        for (name, n, pod_v4, pod_v6) in specs {
            let netns = format!("mn{}{}", self.tag, &name[5..]);
            let root_if = format!("mnv{}{n}", self.tag);
            let node_dir = self.dir.path().join(name);
            std::fs::create_dir_all(&node_dir).unwrap();
            let v4 = Ipv4Addr::new(192, 168, 251, n);
            let v6: Ipv6Addr = format!("fd51::{n}").parse().unwrap();
            // No DAD on the node's link: while its link-local address is tentative the node
            // cannot resolve its peer's IPv6 address, and the first cross-node v6 packets
            // would be lost for a second or two after start (real nodes are long up).
            sh(&format!(
                "ip netns add {netns} && \
                 ip -n {netns} link set lo up && \
                 ip link add {root_if} netns {fabric} type veth peer name eth0 netns {netns} && \
                 ip -n {fabric} link set {root_if} master br0 up && \
                 ip netns exec {netns} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                     net.ipv6.conf.eth0.accept_dad=0 && \
                 ip -n {netns} addr add {v4}/24 dev eth0 && \
                 ip -n {netns} addr add {v6}/64 dev eth0 nodad && \
                 ip -n {netns} link set eth0 up"
            ));
            self.nodes.push(Node {
                name,
                netns,
                pin_root: self.bpffs.join(name),
                dir: node_dir,
                v4,
                v6,
                pod_v4,
                pod_v6,
                daemon: None,
                extra_args: Vec::new(),
            });
        }
    }

    fn write(&self, file: &str, body: &str) {
        let tmp = self.policies().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(tmp, self.policies().join(file)).unwrap();
    }

    fn node_yaml(node: &Node) -> String {
        format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nspec:\n  podCIDRs: [\"{}\", \"{}\"]\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{}\"}}\n  - {{type: InternalIP, address: \"{}\"}}\n",
            node.name, node.pod_v4, node.pod_v6, node.v4, node.v6
        )
    }

    /// The pods as the API server would show them; with `published`, their status.podIPs.
    fn pods_yaml(&self, published: bool) -> String {
        let mut out = String::new();
        for pod in &self.pods {
            out += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: mn\n  labels: {{app: {}}}\n",
                pod.name, pod.app
            );
            if published && let (Some(v4), Some(v6)) = (pod.v4, pod.v6) {
                out += &format!("status:\n  podIPs:\n  - ip: \"{v4}\"\n  - ip: \"{v6}\"\n");
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .status();
        }
        for node in &self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &node.netns])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.fabric()])
            .status();
        let _ = Command::new("umount").arg(&self.bpffs).status();
    }
}

#[test]
fn two_nodes_route_pod_cidrs_and_enforce_policy_across_them() {
    let mut c = Cluster::new();
    let bin_dir = support_cni::cni_path(c.dir.path());
    let nodes_yaml = Cluster::node_yaml(&c.nodes[0]) + &Cluster::node_yaml(&c.nodes[1]);
    c.write("00-cluster.yaml", &format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: mn\n  labels: {{kubernetes.io/metadata.name: mn}}\n{nodes_yaml}"
    ));
    c.write(
        "20-policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: server-from-client\n  namespace: mn\nspec:\n  podSelector:\n    matchLabels: {app: server}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: client}\n    ports:\n    - {port: 8080, protocol: TCP}\n",
    );
    for (name, node, app) in [
        ("client", 0, "client"),
        ("intruder", 0, "intruder"),
        ("server", 1, "server"),
    ] {
        let netns = format!("mn{}p{name}", c.tag);
        sh(&format!("ip netns add {netns}"));
        c.pods.push(PodSpot {
            name,
            node,
            app,
            netns,
            v4: None,
            v6: None,
        });
    }
    c.write("10-pods.yaml", &c.pods_yaml(false));
    let policies = c.policies();
    for node in &mut c.nodes {
        node.start(&policies);
    }

    // Each node routes the other's pod CIDRs via its address, both families.
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let expect = |from: &Node, to: &Node| {
        let routes = from.routes();
        let v4 = format!("{} via {}", to.pod_v4, to.v4);
        let v6 = format!("{} via {}", to.pod_v6, to.v6);
        routes.contains(&v4) && routes.contains(&v6)
    };
    eventually("node-a routes to node-b", Duration::from_secs(5), || {
        expect(a, b)
    });
    eventually("node-b routes to node-a", Duration::from_secs(5), || {
        expect(b, a)
    });
    assert_eq!(a.routes().lines().count(), 2, "{}", a.routes());

    // Pods, by moat-cni on their node.
    for i in 0..c.pods.len() {
        let node = &c.nodes[c.pods[i].node];
        let result = node.cni("ADD", &bin_dir, &c.pods[i]);
        let pod = &mut c.pods[i];
        pod.v4 = match support_cni::result_ip(&result, false) {
            Some(IpAddr::V4(v4)) => Some(v4),
            _ => panic!("no IPv4 in {result}"),
        };
        pod.v6 = match support_cni::result_ip(&result, true) {
            Some(IpAddr::V6(v6)) => Some(v6),
            _ => panic!("no IPv6 in {result}"),
        };
    }
    let (client, intruder, server) = (c.pods[0].lab(), c.pods[1].lab(), c.pods[2].lab());
    let _echo = probe::EchoServer::start(&server, 8080).unwrap();
    let server_v4 = IpAddr::V4(server.v4);
    let server_v6 = IpAddr::V6(server.v6);

    // Before the datastore publishes the client's addresses, node-b cannot tell it from
    // the world: denied.
    assert!(!probe::tcp(&client, server_v4, 8080, TIMEOUT));

    c.write("10-pods.yaml", &c.pods_yaml(true));
    eventually(
        "client -> server (v4) once published",
        Duration::from_secs(5),
        || probe::tcp(&client, server_v4, 8080, TIMEOUT),
    );
    assert!(
        probe::tcp(&client, server_v6, 8080, TIMEOUT),
        "client -> server v6"
    );
    assert!(
        !probe::tcp(&intruder, server_v4, 8080, TIMEOUT),
        "intruder v4"
    );
    assert!(
        !probe::tcp(&intruder, server_v6, 8080, TIMEOUT),
        "intruder v6"
    );
    assert!(
        !probe::udp(&client, server_v4, 8080, TIMEOUT),
        "UDP is not allowed"
    );
    // node-b knows both node-a pods as remote workloads; node-a knows the server.
    assert_eq!(c.nodes[1].status().endpoints, 1);
    assert_eq!(c.nodes[0].status().endpoints, 2);

    // kill -9 of node-a's moatd: routes and enforcement stay.
    c.nodes[0].kill();
    assert!(expect(&c.nodes[0], &c.nodes[1]), "routes survive a kill");
    assert!(probe::tcp(&client, server_v4, 8080, TIMEOUT));
    assert!(!probe::tcp(&intruder, server_v4, 8080, TIMEOUT));
    c.nodes[0].start(&policies);
    assert!(probe::tcp(&client, server_v6, 8080, TIMEOUT));
    assert!(!probe::tcp(&intruder, server_v6, 8080, TIMEOUT));

    // node-b leaves the datastore: node-a's routes to it go, and come back with it.
    c.write("00-cluster.yaml", &format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: mn\n  labels: {{kubernetes.io/metadata.name: mn}}\n{}",
        Cluster::node_yaml(&c.nodes[0])
    ));
    eventually(
        "node-a drops its routes to node-b",
        Duration::from_secs(5),
        || c.nodes[0].routes().trim().is_empty(),
    );
    assert!(
        !probe::tcp(&client, server_v4, 8080, TIMEOUT),
        "no route, no path"
    );
    c.write("00-cluster.yaml", &format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: mn\n  labels: {{kubernetes.io/metadata.name: mn}}\n{nodes_yaml}"
    ));
    eventually(
        "node-a routes to node-b again",
        Duration::from_secs(5),
        || expect(&c.nodes[0], &c.nodes[1]),
    );
    eventually("client -> server again", Duration::from_secs(5), || {
        probe::tcp(&client, server_v4, 8080, TIMEOUT)
    });

    // DEL on every pod leaves no veth and no endpoint on either node.
    for pod in &c.pods {
        c.nodes[pod.node].cni("DEL", &bin_dir, pod);
    }
    for node in &c.nodes {
        assert_eq!(node.status().endpoints, 0, "{}", node.name);
        // moatd deletes a DELed pod's veth in the background: bounded wait.
        let veths = || sh(&format!("ip -n {} -o link show type veth", node.netns));
        eventually("only eth0 is left", Duration::from_secs(10), || {
            veths().lines().count() == 1
        });
    }
}

/// The world outside the cluster, on the fabric: 198.51.100.1 and 2001:db8:51::1, routed by
/// both nodes via the fabric's own address, with routes back to the pod CIDRs (so that
/// reaching it does not depend on moatd's masquerade). Its answers leave from those
/// addresses: a UDP server bound to the wildcard answers from the address its route picks,
/// and an answer from another address is no answer to the client's conntrack.
fn wire_outside(c: &Cluster) -> LabPod {
    let fabric = c.fabric();
    sh(&format!(
        "ip -n {fabric} addr add 192.168.251.100/24 dev br0 && \
         ip -n {fabric} addr add fd51::100/64 dev br0 nodad && \
         ip -n {fabric} link set lo up && \
         ip -n {fabric} addr add 198.51.100.1/32 dev lo && \
         ip -n {fabric} addr add 2001:db8:51::1/128 dev lo && \
         ip -n {fabric} route replace 192.168.251.0/24 dev br0 src 198.51.100.1 && \
         ip -n {fabric} -6 route replace fd51::/64 dev br0 src 2001:db8:51::1"
    ));
    for node in &c.nodes {
        sh(&format!(
            "ip -n {fabric} route add {} via {} && ip -n {fabric} route add {} via {} && \
             ip -n {ns} route add 198.51.100.0/24 via 192.168.251.100 && \
             ip -n {ns} route add 2001:db8:51::/64 via fd51::100",
            node.pod_v4,
            node.v4,
            node.pod_v6,
            node.v6,
            ns = node.netns
        ));
    }
    LabPod {
        name: "outside".into(),
        netns: fabric,
        host_if: String::new(),
        ifindex: 0,
        v4: Ipv4Addr::new(198, 51, 100, 1),
        v6: "2001:db8:51::1".parse().unwrap(),
    }
}

/// A node's host network as a place to listen.
fn host_network(node: &Node) -> LabPod {
    LabPod {
        name: format!("{}-host", node.name),
        netns: node.netns.clone(),
        host_if: String::new(),
        ifindex: 0,
        v4: node.v4,
        v6: node.v6,
    }
}

/// kube-proxy's rule for one Service port: DNAT at PREROUTING, in node-a's namespace.
fn dnat(node: &Node, vip: IpAddr, proto: &str, backend: IpAddr, port: u16) {
    let (tool, to) = match backend {
        IpAddr::V4(b) => ("iptables", format!("{b}:{port}")),
        IpAddr::V6(b) => ("ip6tables", format!("[{b}]:{port}")),
    };
    sh(&format!(
        "ip netns exec {} {tool} -w -t nat -A PREROUTING -d {vip} -p {proto} --dport 80 -j DNAT --to-destination {to}",
        node.netns
    ));
}

#[test]
fn service_egress_is_judged_after_dnat_wherever_the_backend_is() {
    let mut c = Cluster::new();
    let bin_dir = support_cni::cni_path(c.dir.path());
    let outside = wire_outside(&c);
    let nodes_yaml = Cluster::node_yaml(&c.nodes[0]) + &Cluster::node_yaml(&c.nodes[1]);
    let namespace = "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: mn\n  labels: {kubernetes.io/metadata.name: mn}\n";
    c.write("00-cluster.yaml", &format!("{namespace}{nodes_yaml}"));
    // The client may send nothing at all.
    let deny_all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: client-egress\n  namespace: mn\nspec:\n  podSelector:\n    matchLabels: {app: client}\n  policyTypes: [Egress]\n";
    c.write("20-policy.yaml", deny_all);
    for (name, node, app) in [("client", 0, "client"), ("server", 1, "server")] {
        let netns = format!("mn{}p{name}", c.tag);
        sh(&format!("ip netns add {netns}"));
        c.pods.push(PodSpot {
            name,
            node,
            app,
            netns,
            v4: None,
            v6: None,
        });
    }
    for node in &mut c.nodes {
        node.extra_args = [
            "--service-cidr",
            "10.96.0.0/12,fd96::/108",
            "--resync-secs",
            "1",
        ]
        .map(String::from)
        .to_vec();
    }
    // The gap this closes, shown first: without the after-DNAT judgement node-a lets the
    // client through a Service to a pod on node-b although its egress is denied.
    c.nodes[0]
        .extra_args
        .push("--judge-after-dnat=false".into());
    let policies = c.policies();
    for node in &mut c.nodes {
        node.start(&policies);
    }
    for i in 0..c.pods.len() {
        let node = &c.nodes[c.pods[i].node];
        let result = node.cni("ADD", &bin_dir, &c.pods[i]);
        let pod = &mut c.pods[i];
        pod.v4 = match support_cni::result_ip(&result, false) {
            Some(IpAddr::V4(v4)) => Some(v4),
            _ => panic!("no IPv4 in {result}"),
        };
        pod.v6 = match support_cni::result_ip(&result, true) {
            Some(IpAddr::V6(v6)) => Some(v6),
            _ => panic!("no IPv6 in {result}"),
        };
    }
    c.write("10-pods.yaml", &c.pods_yaml(true));
    let (client, server) = (c.pods[0].lab(), c.pods[1].lab());
    let (node_a_host, node_b_host) = (host_network(&c.nodes[0]), host_network(&c.nodes[1]));

    // One Service per kind of backend, v4 and v6 where the backend has both.
    let backends: [(&str, IpAddr, IpAddr, u16); 6] = [
        (
            "remote pod",
            "10.96.0.10".parse().unwrap(),
            IpAddr::V4(server.v4),
            8080,
        ),
        (
            "remote pod v6",
            "fd96::10".parse().unwrap(),
            IpAddr::V6(server.v6),
            8080,
        ),
        (
            "this node's host network",
            "10.96.0.11".parse().unwrap(),
            IpAddr::V4(node_a_host.v4),
            8081,
        ),
        (
            "node-b's host network",
            "10.96.0.12".parse().unwrap(),
            IpAddr::V4(node_b_host.v4),
            8082,
        ),
        (
            "outside the cluster",
            "10.96.0.13".parse().unwrap(),
            IpAddr::V4(outside.v4),
            8083,
        ),
        (
            "outside the cluster v6",
            "fd96::13".parse().unwrap(),
            IpAddr::V6(outside.v6),
            8083,
        ),
    ];
    let _servers = [
        probe::EchoServer::start(&server, 8080).unwrap(),
        probe::EchoServer::start(&node_a_host, 8081).unwrap(),
        probe::EchoServer::start(&node_b_host, 8082).unwrap(),
        probe::EchoServer::start(&outside, 8083).unwrap(),
    ];
    for (_, vip, backend, port) in &backends {
        dnat(&c.nodes[0], *vip, "tcp", *backend, *port);
        dnat(&c.nodes[0], *vip, "udp", *backend, *port);
    }
    let reach = |vip: IpAddr| probe::tcp(&client, vip, 80, TIMEOUT);

    eventually(
        "control: unjudged, the Service leads past the denied egress",
        Duration::from_secs(5),
        || reach(backends[0].1),
    );

    // With the judgement (moatd's default), every kind of backend is refused, TCP and UDP.
    c.nodes[0].kill();
    c.nodes[0].extra_args.pop();
    c.nodes[0].start(&policies);
    let status = c.nodes[0].status();
    assert!(status.warnings.is_empty(), "{:?}", status.warnings);
    for (what, vip, ..) in &backends {
        assert!(
            !reach(*vip),
            "{what}: TCP through {vip} under egress default-deny"
        );
        assert!(
            !probe::udp(&client, *vip, 80, TIMEOUT),
            "{what}: UDP through {vip} under egress default-deny"
        );
    }
    // The drop is journaled against the real destination, not the Service address.
    let socket = c.nodes[0].socket();
    let flows = || match api::call(
        &socket,
        &Request::Flows {
            filter: api::FlowFilter {
                verdict: Some(api::Verdict::Dropped),
                pod: Some("mn/client".into()),
                ..Default::default()
            },
        },
        Duration::from_secs(5),
    )
    .unwrap()
    {
        Response::Flows { flows } => flows,
        other => panic!("{other:?}"),
    };
    eventually(
        "a drop record towards node-b's pod",
        Duration::from_secs(5),
        || {
            flows().iter().any(|f| {
                f.destination == server.v4.to_string()
                    && f.destination_port == 8080
                    && f.direction == "egress"
            })
        },
    );

    // `moatctl trace` to a Service address follows the host's DNAT to each backend and
    // gives the verdict made there; `moatctl policy get` shows the denied direction.
    let trace = |vip: &str| match api::call(
        &socket,
        &Request::Trace {
            from: "mn/client".into(),
            to: vip.into(),
            port: 80,
            protocol: "TCP".into(),
        },
        Duration::from_secs(10),
    )
    .unwrap()
    {
        // Read as the JSON moatctl prints.
        Response::Trace { trace } => serde_json::to_value(trace).unwrap(),
        other => panic!("{other:?}"),
    };
    for (vip, backend, place) in [
        (
            "10.96.0.10",
            format!("{}", server.v4),
            "pod on another node",
        ),
        (
            "10.96.0.11",
            node_a_host.v4.to_string(),
            "this node's host network",
        ),
        (
            "10.96.0.12",
            node_b_host.v4.to_string(),
            "another node's host network",
        ),
        ("10.96.0.13", outside.v4.to_string(), "outside the cluster"),
        ("fd96::10", server.v6.to_string(), "pod on another node"),
    ] {
        let t = trace(vip);
        assert_eq!(t["verdict"], "denied", "{vip}: {t}");
        let backends = t["service"]["backends"].as_array().unwrap();
        assert_eq!(backends.len(), 1, "{vip}: {t}");
        assert_eq!(backends[0]["address"], backend.as_str(), "{vip}: {t}");
        assert_eq!(backends[0]["place"], place, "{vip}: {t}");
        assert!(
            backends[0]["egress_judged_at"]
                .as_str()
                .unwrap()
                .contains("moat_after_dnat"),
            "{vip}: {t}"
        );
    }
    let unknown = trace("10.96.0.99");
    assert_eq!(unknown["verdict"], "unknown", "{unknown}");
    assert!(
        unknown["service"]["note"]
            .as_str()
            .unwrap()
            .contains("no DNAT rule")
    );
    let rules = match api::call(
        &socket,
        &Request::PolicyGet {
            pod: "mn/client".into(),
        },
        Duration::from_secs(5),
    )
    .unwrap()
    {
        Response::PolicyRules { rules } => rules,
        other => panic!("{other:?}"),
    };
    assert!(
        rules.iter().any(|r| r.direction == "egress"
            && r.action == "deny"
            && r.rule
                .contains("default deny (selected by: mn/client-egress")),
        "{rules:?}"
    );

    // Each backend is reached once the client's policy allows it, and only then.
    let allow = |rules: &str| {
        c.write("20-policy.yaml", &format!("{deny_all}  egress:\n{rules}"));
    };
    allow(
        "  - to:\n    - podSelector:\n        matchLabels: {app: server}\n    ports:\n    - {port: 8080, protocol: TCP}\n",
    );
    eventually("the pod on node-b, v4", Duration::from_secs(5), || {
        reach(backends[0].1)
    });
    assert!(reach(backends[1].1), "the pod on node-b, v6");
    assert_eq!(trace("10.96.0.10")["verdict"], "allowed");
    assert!(
        !probe::udp(&client, backends[0].1, 80, TIMEOUT),
        "UDP is still refused"
    );
    for (what, vip, ..) in &backends[2..] {
        assert!(!reach(*vip), "{what} is not allowed yet");
    }
    allow(
        "  - to:\n    - ipBlock: {cidr: 192.168.251.0/24}\n    - ipBlock: {cidr: 198.51.100.0/24}\n    - ipBlock: {cidr: \"2001:db8:51::/64\"}\n",
    );
    eventually("the outside, v4", Duration::from_secs(5), || {
        reach(backends[4].1)
    });
    for (what, vip, ..) in &backends[2..] {
        assert!(
            reach(*vip),
            "{what} through {vip} once its ipBlock is allowed"
        );
    }
    assert!(
        probe::udp(&client, backends[4].1, 80, TIMEOUT),
        "UDP to the outside once allowed"
    );
    assert!(!reach(backends[0].1), "the pod rule is gone");

    // Someone restores the mangle table without Moat's chain: moatd puts it back (resync), and the
    // judgement holds again.
    allow("  - to:\n    - ipBlock: {cidr: 198.51.100.0/24}\n");
    // One iptables-restore replaces the whole table at once: a separate -F then -X would
    // race moatd's resync, which may put the jumps back in between and make -X fail.
    sh(&format!(
        "printf '*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n' | ip netns exec {} iptables-restore -w",
        c.nodes[0].netns
    ));
    eventually(
        "the rules come back and the host network is refused again",
        Duration::from_secs(5),
        || {
            sh(&format!(
                "ip netns exec {} iptables -w -t mangle -S",
                c.nodes[0].netns
            ))
            .contains("MOAT-AFTER-DNAT")
                && !reach(backends[2].1)
        },
    );
    assert!(reach(backends[4].1), "the outside is still allowed");

    for pod in &c.pods {
        c.nodes[pod.node].cni("DEL", &bin_dir, pod);
    }
}
