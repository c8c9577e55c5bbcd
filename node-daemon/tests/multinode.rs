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

mod support_cni;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use moat_datapath::lab::{LabPod, probe};
use moatd::api::{self, Request, Response};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_millis(700);

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    daemon: Option<Child>,
}

impl Node {
    fn socket(&self) -> PathBuf {
        self.dir.join("moatd.sock")
    }

    fn start(&mut self, policies: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(env!("CARGO_BIN_EXE_moatd"))
            .args(["--node-name", self.name, "--routing", "direct"])
            .arg("--policy-dir")
            .arg(policies)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--pending-dir")
            .arg(self.dir.join("pending"))
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(["--poll-ms", "100", "--metrics-addr", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let socket = self.socket();
        eventually("moatd ready", Duration::from_secs(20), || {
            api::call(&socket, &Request::Status, Duration::from_secs(2)).is_ok()
        });
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
        support_cni::run(Some(&self.netns), bin, &self.conf(), command, &call)
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
        let tag = format!("{}", std::process::id() % 100_000);
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
