//! The datapath run: real pods (network namespaces wired by the real moat-cni binary in
//! standalone mode, with moat-ipam, as a runtime would call it), a private moatd that owns
//! the eBPF datapath and reads Namespace/Pod/NetworkPolicy objects from its own
//! directory, real TCP/UDP echo listeners in every pod, optional per-pod ClusterIP Services
//! (iptables DNAT, as kube-proxy installs them), and probes made with real sockets from inside
//! the client pod. The model is built once; each case only rewrites objects and reloads.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use moat_common::{FlowEvent, reason, v4_from_raw, v6_from_raw};
use moat_datapath::{EventReader, PinDir};
use moat_testkit::lab::{Lab, LabPod, sh};
use moatd::api::Request;
use nix::sched::{CloneFlags, setns};
use serde_json::json;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    cases::{Case, CaseFile, Probe, Proto},
    cleanup,
    report::{CaseResult, ProbeResult},
};

pub struct LiveOptions {
    pub direct: bool,
    /// Every Service's backend on another node: two node namespaces on a fabric, a moatd in
    /// each, and each pod's Service DNATed on the client's node to the pod's twin on the other.
    pub remote_backends: bool,
    /// Probe the pods' IPv6 addresses (with `direct`); IP placeholders become /128s.
    pub ipv6: bool,
    pub parallel: usize,
    pub timeout: Duration,
    pub moatd: PathBuf,
    pub keep_all: bool,
}

struct LivePod {
    key: String,
    lab: LabPod,
    netns: Arc<File>,
    cluster_ip: Ipv4Addr,
    /// Next client source port (each probe gets a port never used before in this run, so a
    /// probe is always a new flow for every conntrack on the path).
    next_port: AtomicU32,
}

/// A probe's result and the client source ports its attempts used.
type Observed = (ProbeResult, Vec<u16>);

const SRC_PORT_LO: u32 = 20000;
const SRC_PORT_SPAN: u32 = 40000;
const CHAIN_PREFIX: &str = "MOAT-CONFORMANCE-SVC";

/// Drop/verdict events read from the datapath's ring while the run goes on.
struct Events {
    /// (index of the host whose ring it came from, event)
    buf: Arc<Mutex<Vec<(usize, FlowEvent)>>>,
    lost: Arc<AtomicUsize>,
}

pub struct Node {
    /// The pods probes start from, on the first host, each with its Service address.
    pods: BTreeMap<String, LivePod>,
    /// With remote backends: each pod's twin on the second host (same namespace and labels,
    /// a replica of the same workload), the backend its Service leads to.
    twins: BTreeMap<String, LivePod>,
    /// Keeps the namespaces alive; dropped (deleted) at the end.
    lab: Option<Lab>,
    workdir: PathBuf,
    policy_dir: PathBuf,
    /// One moatd each: the machine itself, or two node namespaces (remote backends).
    hosts: Vec<Host>,
    /// The host chain of this run's Services (one-node runs only: with remote backends the
    /// rules live in the first node's namespace and go with it).
    chain: Option<String>,
    served: Vec<(u16, Proto)>,
    sctp: Result<(), String>,
    events: Option<Events>,
    opts: LiveOptions,
    pub setup: BTreeMap<String, String>,
}

/// Where a moatd runs with the host ends of its pods: this machine's own network namespace,
/// or a namespace standing in for a cluster node (its own uplink on a shared fabric, routes
/// to the other node's pod CIDRs, its own netfilter tables and bpffs pins).
struct Host {
    /// The Node object's name (remote backends), or "this node".
    name: String,
    /// The node's network namespace; `None`: the machine's own.
    netns: Option<String>,
    dir: PathBuf,
    socket: PathBuf,
    pin_root: PathBuf,
    pins: PinDir,
    daemon: Option<Child>,
    generation: Option<u64>,
    cni: Cni,
}

/// One request to moatd, the answer as JSON (read leniently, so that a moatd of a slightly
/// different version, e.g. without `generation` in its status, still works). An `error`
/// answer is an Err.
fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<serde_json::Value> {
    use std::io::BufRead;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to moatd at {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    let value: serde_json::Value =
        serde_json::from_str(&answer).with_context(|| format!("moatd answered {answer:?}"))?;
    if value["result"] == "error" {
        bail!(
            "moatd refused: {}",
            value["message"].as_str().unwrap_or(&answer)
        );
    }
    Ok(value)
}

fn write_atomic(dir: &Path, file: &str, body: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file)).context("renaming into place")?;
    Ok(())
}

fn yaml_docs(values: &[serde_json::Value]) -> Result<String> {
    let mut out = String::new();
    for v in values {
        out.push_str("---\n");
        out.push_str(&moat_policy::yaml::to_string(v));
    }
    Ok(out)
}

/// Whether this kernel can open SCTP sockets (the module may be missing or blocked).
fn sctp_support() -> Result<(), String> {
    match Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::from(132))) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "SCTP not supported by this kernel (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {e})"
        )),
    }
}

fn socket_for(proto: Proto, domain: Domain) -> std::io::Result<Socket> {
    match proto {
        Proto::Tcp => Socket::new(domain, Type::STREAM, Some(Protocol::TCP)),
        Proto::Udp => Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)),
        Proto::Sctp => Socket::new(domain, Type::STREAM, Some(Protocol::from(132))),
    }
}

fn enter(netns: &File) -> std::io::Result<()> {
    setns(netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

/// Starts an echo listener for (port, proto) inside a pod; returns once it is bound.
fn start_listener(netns: Arc<File>, port: u16, proto: Proto) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("srv-{port}-{}", proto.lower()))
        .spawn(move || {
            let bound = (|| -> std::io::Result<Socket> {
                enter(&netns)?;
                // One dual-stack socket answers probes to the pod's IPv4 and IPv6 addresses.
                let sock = socket_for(proto, Domain::IPV6)?;
                sock.set_only_v6(false)?;
                sock.set_reuse_address(true)?;
                sock.bind(&SockAddr::from(SocketAddrV6::new(
                    Ipv6Addr::UNSPECIFIED,
                    port,
                    0,
                    0,
                )))?;
                if proto != Proto::Udp {
                    sock.listen(1024)?;
                }
                Ok(sock)
            })();
            let sock = match bound {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            if proto == Proto::Udp {
                let udp: std::net::UdpSocket = sock.into();
                let mut buf = [0u8; 2048];
                loop {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            }
            loop {
                let Ok((conn, _)) = sock.accept() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                let _ = std::thread::Builder::new()
                    .name("echo".into())
                    .spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
                        let mut conn = conn;
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = conn.read(&mut buf) {
                            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
            }
        })?;
    rx.recv()
        .map_err(|_| anyhow!("listener thread died"))?
        .with_context(|| format!("listening on {port}/{proto}"))
}

/// One probe attempt from the current thread's network namespace. Ok(true): the echo came
/// back; Ok(false): refused, timed out or wrong echo. Err: the source port was taken.
fn probe_once(
    proto: Proto,
    target: SocketAddr,
    src_port: u16,
    timeout: Duration,
) -> std::io::Result<bool> {
    let (domain, unspecified) = match target {
        SocketAddr::V4(_) => (Domain::IPV4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        SocketAddr::V6(_) => (Domain::IPV6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    };
    let sock = socket_for(proto, domain)?;
    sock.bind(&SockAddr::from(SocketAddr::new(unspecified, src_port)))?;
    let payload = format!("moat-conformance {src_port}");
    let deadline = Instant::now() + timeout;
    let target = SockAddr::from(target);
    match proto {
        Proto::Udp => {
            if sock.connect(&target).is_err() {
                return Ok(false);
            }
            if sock.send(payload.as_bytes()).is_err() {
                return Ok(false);
            }
            let udp: std::net::UdpSocket = sock.into();
            let mut buf = [0u8; 128];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                udp.set_read_timeout(Some(left))?;
                match udp.recv(&mut buf) {
                    Ok(n) if &buf[..n] == payload.as_bytes() => return Ok(true),
                    Ok(_) => continue,
                    Err(_) => return Ok(false),
                }
            }
        }
        Proto::Tcp | Proto::Sctp => {
            if sock.connect_timeout(&target, timeout).is_err() {
                return Ok(false);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let left = left.max(Duration::from_millis(50));
            sock.set_read_timeout(Some(left))?;
            sock.set_write_timeout(Some(left))?;
            let mut sock = sock;
            if sock.write_all(payload.as_bytes()).is_err() {
                return Ok(false);
            }
            let mut got = vec![0u8; payload.len()];
            Ok(sock.read_exact(&mut got).is_ok() && got == payload.as_bytes())
        }
    }
}

impl LivePod {
    fn next_src_port(&self) -> u16 {
        let n = self.next_port.fetch_add(1, Ordering::Relaxed);
        (SRC_PORT_LO + n % SRC_PORT_SPAN) as u16
    }

    /// Probes with a fresh source port (skipping ports that happen to be taken).
    fn probe(&self, proto: Proto, target: SocketAddr, timeout: Duration) -> (bool, u16) {
        for _ in 0..64 {
            let port = self.next_src_port();
            match probe_once(proto, target, port, timeout) {
                Ok(v) => return (v, port),
                Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
                Err(_) => return (false, port),
            }
        }
        (false, 0)
    }
}

/// Netfilter chain name for this run (unique per process).
fn chain_name() -> String {
    format!("{CHAIN_PREFIX}-{}", std::process::id())
}

fn remove_chain(chain: &str) {
    for hook in ["PREROUTING", "OUTPUT"] {
        // Delete every jump (there is one; loop in case a previous run left more).
        for _ in 0..8 {
            if Command::new("iptables")
                .args(["-w", "-t", "nat", "-D", hook, "-j", chain])
                .stderr(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                break;
            }
        }
    }
    let _ = Command::new("iptables")
        .args(["-w", "-t", "nat", "-F", chain])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("iptables")
        .args(["-w", "-t", "nat", "-X", chain])
        .stderr(Stdio::null())
        .status();
}

/// Chains left by runs whose process is gone (killed with SIGKILL).
fn remove_stale_chains() {
    let Ok(out) = Command::new("iptables")
        .args(["-w", "-t", "nat", "-S"])
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let Some(name) = line.strip_prefix("-N ") else {
            continue;
        };
        let Some(pid) = name.strip_prefix(&format!("{CHAIN_PREFIX}-")) else {
            continue;
        };
        if let Ok(pid) = pid.parse::<u32>()
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            remove_chain(name);
        }
    }
}

/// A lab whose /24 and namespace names nobody else on the node uses right now.
fn fresh_lab() -> Result<Lab> {
    for _ in 0..32 {
        let lab = Lab::new("cf")?;
        let subnet = format!("10.77.{}.0/24", lab.id);
        let routes = sh(&format!("ip -4 route show root {subnet}"))?;
        let busy_ns = std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().starts_with(&lab.tag))
            })
            .unwrap_or(false);
        if routes.trim().is_empty() && !busy_ns {
            return Ok(lab);
        }
    }
    bail!("no free lab subnet 10.77.<n>.0/24 found")
}

/// One pod's attachment as the runtime describes it to the plugin.
#[derive(Clone, Debug)]
struct Attachment {
    container_id: String,
    netns: String,
    args: String,
}

/// The real moat-cni (standalone, moat-ipam) as a runtime runs it: a CNI_PATH with both
/// binaries (from next to moatd) and one network configuration; run inside the node's
/// namespace when the host is one (as the kubelet of that node would).
#[derive(Clone, Debug)]
struct Cni {
    bin_dir: PathBuf,
    config: serde_json::Value,
    netns: Option<String>,
}

impl Cni {
    fn new(
        host_dir: &Path,
        moatd: &Path,
        pin_root: &Path,
        subnets: (&str, &str),
        netns: Option<&str>,
    ) -> Result<Cni> {
        // Absolute: the links are followed from the CNI_PATH directory.
        let moatd = moatd
            .canonicalize()
            .with_context(|| format!("{}", moatd.display()))?;
        let from = moatd.parent().context("moatd has no directory")?;
        let bin_dir = host_dir.join("cni-bin");
        std::fs::create_dir_all(&bin_dir)?;
        for plugin in ["moat-cni", "moat-ipam"] {
            let binary = from.join(plugin);
            anyhow::ensure!(
                binary.is_file(),
                "{} not found next to moatd (build it: cargo build --release --workspace --bins)",
                binary.display()
            );
            let link = bin_dir.join(plugin);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&binary, &link)?;
        }
        let config = json!({
            "cniVersion": "1.1.0",
            "name": "moat-conformance",
            "type": "moat-cni",
            "mode": "standalone",
            "socket": host_dir.join("moatd.sock"),
            "pinRoot": pin_root,
            "pendingDir": host_dir.join("pending"),
            "hostVethPrefix": "mcf",
            "ipam": {
                "type": "moat-ipam",
                "dataDir": host_dir.join("ipam"),
                "ranges": [[{"subnet": subnets.0}], [{"subnet": subnets.1}]]
            }
        });
        Ok(Cni {
            bin_dir,
            config,
            netns: netns.map(str::to_string),
        })
    }

    fn describe(&self) -> String {
        format!(
            "network namespaces wired by moat-cni (standalone) with moat-ipam, run as a runtime does (ADD at setup, DEL at teardown); CNI_PATH {}; config {}",
            self.bin_dir.display(),
            self.config
        )
    }

    /// Runs one command; the result on success, the plugin's error document otherwise.
    fn run(&self, command: &str, attachment: &Attachment) -> Result<serde_json::Value> {
        let plugin = self.bin_dir.join("moat-cni");
        // `ip netns exec` also mounts the node's own /sys, where the plugin looks up links.
        let mut cmd = match &self.netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns]).arg(&plugin);
                cmd
            }
            None => Command::new(&plugin),
        };
        let mut child = cmd
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &attachment.container_id)
            .env("CNI_NETNS", &attachment.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bin_dir)
            .env("CNI_ARGS", &attachment.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running moat-cni")?;
        child
            .stdin
            .take()
            .context("moat-cni stdin")?
            .write_all(&serde_json::to_vec(&self.config)?)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "moat-cni {command} failed ({}): {} {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if out.stdout.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// The pod as probes and evidence see it, from moat-cni's ADD result.
fn lab_pod_from_result(
    key: &str,
    netns: &str,
    result: &serde_json::Value,
    host_netns: Option<&str>,
) -> Result<LabPod> {
    let host_if = result["interfaces"]
        .as_array()
        .and_then(|list| list.iter().find(|i| i.get("sandbox").is_none()))
        .and_then(|i| i["name"].as_str())
        .context("no host interface in the result")?
        .to_string();
    let address = |v6: bool| -> Option<IpAddr> {
        result["ips"].as_array()?.iter().find_map(|ip| {
            let a: IpAddr = ip["address"].as_str()?.split('/').next()?.parse().ok()?;
            (a.is_ipv6() == v6).then_some(a)
        })
    };
    let (Some(IpAddr::V4(v4)), Some(IpAddr::V6(v6))) = (address(false), address(true)) else {
        bail!("the result lacks an IPv4 or IPv6 address");
    };
    // `ip -o link show` starts with "<ifindex>: <name>...", in whichever namespace holds it.
    let in_netns = host_netns.map(|n| format!("-n {n} ")).unwrap_or_default();
    let shown = sh(&format!("ip {in_netns}-o link show dev {host_if}"))?;
    let ifindex: u32 = shown
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("ifindex of {host_if} in {shown:?}"))?;
    Ok(LabPod {
        name: key.replace('/', "-"),
        netns: netns.to_string(),
        host_if,
        ifindex,
        v4,
        v6,
    })
}

/// The Pod object's name of a model pod on a host: the model's own name on the first host,
/// `<name>-twin` for its replica on the second.
fn pod_name(model_name: &str, host: usize) -> String {
    match host {
        0 => model_name.to_string(),
        _ => format!("{model_name}-twin"),
    }
}

/// The one-node run: moatd in the machine's own namespace, pins under /sys/fs/bpf.
fn local_host(lab: &Lab, workdir: &Path, opts: &LiveOptions) -> Result<Host> {
    let pin_root = PathBuf::from(format!(
        "/sys/fs/bpf/moat-test/conformance-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&pin_root);
    {
        let pin_root = pin_root.clone();
        cleanup::register("pin root", move || {
            let _ = std::fs::remove_dir_all(&pin_root);
        });
    }
    let v6 = format!("fd77:{:x}::/64", lab.id);
    let cni = Cni::new(
        workdir,
        &opts.moatd,
        &pin_root,
        (&lab.v4_subnet(), &v6),
        None,
    )?;
    Ok(Host {
        name: "this node".into(),
        netns: None,
        dir: workdir.to_path_buf(),
        socket: workdir.join("moatd.sock"),
        pins: PinDir::new(&pin_root),
        pin_root,
        daemon: None,
        generation: None,
        cni,
    })
}

/// Two nodes: each a network namespace whose `eth0` meets the other's on a bridge in a third
/// namespace (the fabric, so the machine's own bridge netfilter settings play no part), with
/// half of the lab's /24 and a v6 /64 as pod CIDRs, and its pins in a bpffs of the run's own
/// (`ip netns exec` gives moatd a fresh /sys without the machine's bpffs).
fn remote_hosts(lab: &Lab, workdir: &Path, opts: &LiveOptions) -> Result<Vec<Host>> {
    let bpffs = workdir.join("bpf");
    std::fs::create_dir_all(&bpffs)?;
    sh(&format!("mount -t bpf bpf {}", bpffs.display()))?;
    {
        let bpffs = bpffs.clone();
        cleanup::register("bpffs", move || {
            let _ = Command::new("umount").arg("-l").arg(&bpffs).output();
        });
    }
    let fabric = format!("{}-fabric", lab.tag);
    sh(&format!(
        "ip netns del {fabric} 2>/dev/null; ip netns add {fabric} && \
         ip -n {fabric} link add br0 type bridge && ip -n {fabric} link set br0 up"
    ))?;
    {
        let fabric = fabric.clone();
        cleanup::register("fabric", move || {
            let _ = Command::new("ip").args(["netns", "del", &fabric]).output();
        });
    }
    let mut hosts = Vec::new();
    for (n, name) in [(1u8, "node-a"), (2, "node-b")] {
        let netns = format!("{}-{name}", lab.tag);
        // No DAD on the uplink: while the link-local address is tentative the node cannot
        // resolve its peer's IPv6 address (real nodes are long up).
        sh(&format!(
            "ip netns del {netns} 2>/dev/null; ip netns add {netns} && \
             ip -n {netns} link set lo up && \
             ip link add up-{n} netns {fabric} type veth peer name eth0 netns {netns} && \
             ip -n {fabric} link set up-{n} master br0 up && \
             ip netns exec {netns} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                 net.ipv6.conf.eth0.accept_dad=0 && \
             ip -n {netns} addr add 192.168.250.{n}/24 dev eth0 && \
             ip -n {netns} addr add fd50::{n}/64 dev eth0 nodad && \
             ip -n {netns} link set eth0 up"
        ))
        .with_context(|| format!("wiring {name}"))?;
        {
            let netns = netns.clone();
            cleanup::register(format!("netns {name}"), move || {
                let _ = Command::new("ip").args(["netns", "del", &netns]).output();
            });
        }
        let dir = workdir.join(name);
        std::fs::create_dir_all(&dir)?;
        let pin_root = bpffs.join(name);
        let v4 = format!("10.77.{}.{}/25", lab.id, (n - 1) * 128);
        let v6 = format!("fd77:{:x}:{n}::/64", lab.id);
        let cni = Cni::new(&dir, &opts.moatd, &pin_root, (&v4, &v6), Some(&netns))?;
        hosts.push(Host {
            name: name.into(),
            netns: Some(netns),
            socket: dir.join("moatd.sock"),
            dir,
            pins: PinDir::new(&pin_root),
            pin_root,
            daemon: None,
            generation: None,
            cni,
        });
    }
    Ok(hosts)
}

/// The Node objects of a remote-backend run: pod CIDRs and addresses, as the API server
/// holds them (each moatd routes the other's pod CIDRs via its address).
fn node_objects(hosts: &[Host]) -> Vec<serde_json::Value> {
    hosts
        .iter()
        .filter(|h| h.netns.is_some())
        .enumerate()
        .map(|(i, host)| {
            let n = i + 1;
            let ranges = host.cni.config["ipam"]["ranges"].clone();
            let cidrs: Vec<serde_json::Value> = ranges
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| r[0]["subnet"].clone())
                .collect();
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": host.name},
                "spec": {"podCIDRs": cidrs},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": format!("192.168.250.{n}")},
                    {"type": "InternalIP", "address": format!("fd50::{n}")},
                ]},
            })
        })
        .collect()
}

impl Host {
    fn log_path(&self) -> PathBuf {
        self.dir.join("moatd.log")
    }

    fn call(&self, request: &Request, timeout: Duration) -> Result<serde_json::Value> {
        call(&self.socket, request, timeout).with_context(|| format!("moatd of {}", self.name))
    }

    fn start_moatd(&mut self, opts: &LiveOptions, policy_dir: &Path) -> Result<()> {
        let log = File::create(self.log_path())?;
        let mut cmd = match &self.netns {
            // A node of its own: moatd judges Service traffic after DNAT and masquerades
            // as it would on a cluster node; its netfilter rules go with the namespace.
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns])
                    .arg(&opts.moatd)
                    .args(["--node-name", &self.name, "--routing", "direct"])
                    .args(["--metrics-addr", ""]);
                cmd
            }
            // The machine's own namespace: no host-wide netfilter rules that would outlive
            // the run. Its Service backends are local pods, judged by their own hooks.
            None => {
                let mut cmd = Command::new(&opts.moatd);
                cmd.arg("--judge-after-dnat=false");
                cmd
            }
        };
        cmd.arg("--policy-dir")
            .arg(policy_dir)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pending-dir")
            .arg(self.dir.join("pending"))
            .arg("--pin-root")
            .arg(&self.pin_root)
            .arg("--poll-ms")
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; moatd must not outlive the runner.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", opts.moatd.display()))?;
        // `ip netns exec` execs moatd in place: the child's pid is moatd's.
        let pid = child.id() as i32;
        cleanup::register(format!("moatd of {}", self.name), move || {
            // SAFETY: plain kill(2) of our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let mut status = 0;
            for _ in 0..100 {
                // SAFETY: reaping our own child.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != 0 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
        });
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut last;
        loop {
            match call(&self.socket, &Request::Status, Duration::from_secs(5)) {
                Ok(s) if s["result"] == "status" => {
                    self.generation = s["generation"].as_u64();
                    return Ok(());
                }
                Ok(other) => last = format!("unexpected answer {other}"),
                Err(e) => last = format!("{e:#}"),
            }
            if let Some(child) = self.daemon.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "moatd of {} exited during start ({status}); log: {}\n{}",
                    self.name,
                    self.log_path().display(),
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("moatd did not answer on {}: {last}", self.socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reload, and check that this moatd took every object into its maps.
    fn reload(&mut self, expected_policies: usize) -> Result<()> {
        let status = self
            .call(&Request::Reload, Duration::from_secs(120))
            .context("Reload")?;
        if status["result"] != "status" {
            bail!("{}: Reload answered {status}", self.name);
        }
        let rejected: Vec<String> = status["rejected"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| r.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default();
        if !rejected.is_empty() {
            bail!("moatd rejected: {} ({})", rejected.join("; "), self.name);
        }
        // A moatd that reports generations must have applied this reload to the maps.
        let generation = status["generation"].as_u64();
        if let (Some(before), Some(after)) = (self.generation, generation)
            && after <= before
        {
            bail!(
                "reload did not reach the maps of {} (generation {before} -> {after}); see {}",
                self.name,
                self.log_path().display()
            );
        }
        self.generation = generation;
        // NetworkPolicies and ClusterNetworkPolicies together: the case lists both.
        let held = (status["policies"].as_u64().unwrap_or(0)
            + status["cluster_policies"].as_u64().unwrap_or(0)) as usize;
        if held != expected_policies {
            bail!(
                "moatd of {} holds {held} policies, the case has {expected_policies}",
                self.name
            );
        }
        Ok(())
    }
}

impl Node {
    pub fn setup(file: &CaseFile, opts: LiveOptions) -> Result<Self> {
        anyhow::ensure!(
            nix::unistd::Uid::effective().is_root(),
            "the datapath run needs root (network namespaces, bpffs, netfilter)"
        );
        anyhow::ensure!(
            opts.moatd.is_file(),
            "moatd binary not found at {} (build it: cargo build -p moat-node-daemon --bin moatd, or pass --moatd)",
            opts.moatd.display()
        );
        let pid = std::process::id();
        let served = file.served_union();
        let sctp = sctp_support();
        let mut setup = BTreeMap::new();

        // Work directory, private to this run.
        let workdir = std::env::temp_dir().join(format!("moat-conformance-{pid}"));
        let _ = std::fs::remove_dir_all(&workdir);
        let policy_dir = workdir.join("policies");
        std::fs::create_dir_all(&policy_dir)?;

        // The lab reserves a 10.77.<id>.0/24 and a name tag nobody else on the machine uses.
        let lab = fresh_lab()?;
        let hosts = if opts.remote_backends {
            remote_hosts(&lab, &workdir, &opts)?
        } else {
            vec![local_host(&lab, &workdir, &opts)?]
        };
        for host in &hosts {
            setup.insert(format!("pods on {}", host.name), host.cni.describe());
        }
        setup.insert("lab_subnet".into(), lab.v4_subnet());

        // Pods: a network namespace each (the runtime's part); moat-cni wires them once
        // moatd runs. With remote backends each pod has a twin on the second node.
        let mut namespaces = Vec::new();
        for (host, suffix) in [(0, ""), (1, "-b")].into_iter().take(hosts.len()) {
            for key in &file.model.pod_order {
                let netns = format!("{}-{}{suffix}", lab.tag, key.replace('/', "-"));
                sh(&format!(
                    "ip netns del {netns} 2>/dev/null; ip netns add {netns} && ip -n {netns} link set lo up"
                ))
                .with_context(|| format!("creating the namespace of pod {key}"))?;
                {
                    let netns = netns.clone();
                    cleanup::register(format!("netns {key}{suffix}"), move || {
                        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
                    });
                }
                namespaces.push((host, key.clone(), netns));
            }
        }

        let mut node = Node {
            pods: BTreeMap::new(),
            twins: BTreeMap::new(),
            lab: Some(lab),
            workdir,
            policy_dir,
            hosts,
            chain: None,
            served,
            sctp,
            events: None,
            opts,
            setup,
        };

        // Base objects, then moatd, then the pods.
        node.write_cluster_objects()?;
        let first_case = None::<&Case>;
        node.write_model_objects(file, first_case)?;
        for host in &mut node.hosts {
            host.start_moatd(&node.opts, &node.policy_dir)?;
        }
        node.add_pods(namespaces)?;
        if node.opts.remote_backends {
            // Each node knows the other's pods only from the datastore (status.podIPs, as
            // the kubelets publish them): until then they are "world" to it.
            node.write_model_objects(file, first_case)?;
            for host in &mut node.hosts {
                host.reload(0)?;
            }
        }

        // Listeners, in the pods that Services lead to.
        for key in &file.model.pod_order {
            let pod = node.backend(key);
            for (port, proto) in &node.served {
                if *proto == Proto::Sctp && node.sctp.is_err() {
                    continue;
                }
                start_listener(pod.netns.clone(), *port, *proto)
                    .with_context(|| format!("pod {}", pod.key))?;
            }
        }

        // Services.
        if !node.opts.direct {
            node.install_services()?;
        }

        node.start_events();
        for host in &node.hosts {
            node.setup.insert(
                format!("moatd of {}", host.name),
                format!(
                    "{} (log: {})",
                    node.opts.moatd.display(),
                    host.log_path().display()
                ),
            );
            node.setup.insert(
                format!("pin_root of {}", host.name),
                host.pin_root.display().to_string(),
            );
        }
        node.setup.insert(
            "sctp".into(),
            match &node.sctp {
                Ok(()) => "supported".into(),
                Err(e) => e.clone(),
            },
        );
        Ok(node)
    }

    /// CNI ADD for every pod through moat-cni on its host (which registers the endpoint with
    /// moatd and attaches the programs before it answers); DEL registered for teardown. Then
    /// every host must know its own pods as endpoints with an identity.
    fn add_pods(&mut self, namespaces: Vec<(usize, String, String)>) -> Result<()> {
        let pid = std::process::id();
        let lab_id = self.lab.as_ref().map(|l| l.id).unwrap_or(0);
        for (index, (host, key, netns)) in namespaces.into_iter().enumerate() {
            let (ns, model_name) = key.split_once('/').context("pod key ns/name")?;
            let name = pod_name(model_name, host);
            let attachment = Attachment {
                container_id: format!("conformance-{pid}-{ns}-{name}"),
                netns: format!("/run/netns/{netns}"),
                args: format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
            };
            let cni = self.hosts[host].cni.clone();
            let result = cni
                .run("ADD", &attachment)
                .with_context(|| format!("CNI ADD of pod {ns}/{name}"))?;
            {
                let attachment = attachment.clone();
                cleanup::register(format!("CNI DEL {ns}/{name}"), move || {
                    let _ = cni.run("DEL", &attachment);
                });
            }
            let lab = lab_pod_from_result(
                &format!("{ns}/{name}"),
                &netns,
                &result,
                self.hosts[host].netns.as_deref(),
            )
            .with_context(|| format!("pod {key}: CNI result {result}"))?;
            let netns_file = Arc::new(File::open(format!("/run/netns/{netns}"))?);
            let pod = LivePod {
                key: key.clone(),
                lab,
                netns: netns_file,
                cluster_ip: Ipv4Addr::new(10, 100, lab_id as u8, index as u8 + 1),
                next_port: AtomicU32::new((pid.wrapping_mul(7919)) % SRC_PORT_SPAN),
            };
            if host == 0 {
                self.pods.insert(key, pod);
            } else {
                self.twins.insert(key, pod);
            }
        }
        for (host, local) in self.hosts.iter().zip([self.pods.len(), self.twins.len()]) {
            let answer = host.call(&Request::ListEndpoints, Duration::from_secs(10))?;
            let endpoints = answer["endpoints"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(
                endpoints.len() == local
                    && endpoints
                        .iter()
                        .all(|e| e["identity"].as_u64().unwrap_or(0) != 0),
                "endpoints of {} after CNI ADD: {answer}",
                host.name
            );
        }
        Ok(())
    }

    /// Per-pod ClusterIPs as kube-proxy's iptables mode installs them, on the clients' node:
    /// the machine itself (a chain removed at the end) or the first node's namespace (gone
    /// with it). The DNAT target is the pod's backend: itself, or its twin on the other node.
    fn install_services(&mut self) -> Result<()> {
        let chain = chain_name();
        let netns = self.hosts[0].netns.clone();
        if netns.is_none() {
            remove_stale_chains();
            remove_chain(&chain);
        }
        let mut rules = format!("*nat\n:{chain} - [0:0]\n");
        for pod in self.pods.values() {
            let backend = self.backend(&pod.key);
            for (port, proto) in &self.served {
                if *proto == Proto::Sctp && self.sctp.is_err() {
                    // No SCTP conntrack/NAT helper to rely on, and nothing listens.
                    continue;
                }
                rules.push_str(&format!(
                    "-A {chain} -d {cip}/32 -p {p} -m {p} --dport {port} -m comment --comment \"moat-conformance svc {key}\" -j DNAT --to-destination {ip}:{port}\n",
                    cip = pod.cluster_ip,
                    p = proto.lower(),
                    key = pod.key,
                    ip = backend.lab.v4,
                ));
            }
        }
        rules.push_str(&format!(
            "-I PREROUTING 1 -j {chain}\n-I OUTPUT 1 -j {chain}\nCOMMIT\n"
        ));
        if netns.is_none() {
            let chain = chain.clone();
            cleanup::register("iptables chain", move || remove_chain(&chain));
        }
        let mut cmd = match &netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns, "iptables-restore"]);
                cmd
            }
            None => Command::new("iptables-restore"),
        };
        let mut child = cmd
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running iptables-restore")?;
        child
            .stdin
            .take()
            .context("iptables-restore stdin")?
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "iptables-restore failed: {}\n{rules}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (place, target) = match &netns {
            Some(netns) => (
                format!("in {}'s namespace {netns}", self.hosts[0].name),
                format!("the pod's twin on {}", self.hosts[1].name),
            ),
            None => ("on this machine".to_string(), "the pod itself".to_string()),
        };
        self.setup.insert(
            "services".into(),
            format!(
                "per-pod ClusterIP 10.100.{}.<n> (moatd --service-cidr default 10.96.0.0/12), iptables nat chain {chain} {place} jumped from PREROUTING and OUTPUT, DNAT to {target}",
                self.lab.as_ref().map(|l| l.id).unwrap_or(0)
            ),
        );
        if netns.is_none() {
            self.chain = Some(chain);
        }
        Ok(())
    }

    /// One reader per host's ring; events are kept with the index of the host they came from.
    fn start_events(&mut self) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = 0;
        for (index, host) in self.hosts.iter().enumerate() {
            let mut reader = match EventReader::open(&host.pins) {
                Ok(r) => r,
                Err(e) => {
                    self.setup.insert(
                        format!("events of {}", host.name),
                        format!("not available: {e}"),
                    );
                    continue;
                }
            };
            let (b, l, s) = (buf.clone(), lost.clone(), stop.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("events-{index}"))
                .spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        let Ok(events) = reader.wait(Duration::from_millis(100)) else {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        };
                        let mut guard = b.lock().unwrap_or_else(|e| e.into_inner());
                        for e in events {
                            if guard.len() < 200_000 {
                                guard.push((index, e));
                            } else {
                                l.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            if spawned.is_ok() {
                readers += 1;
            }
        }
        if readers > 0 {
            cleanup::register("events", move || stop.store(true, Ordering::Relaxed));
            self.events = Some(Events { buf, lost });
            self.setup.insert(
                "events".into(),
                "datapath ring(s) read by this runner (moatd does not read them)".into(),
            );
        }
    }

    fn take_events(&self) -> Vec<(usize, FlowEvent)> {
        match &self.events {
            Some(ev) => std::mem::take(&mut *ev.buf.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }

    /// The Node objects (remote backends only), written once.
    fn write_cluster_objects(&self) -> Result<()> {
        let nodes = node_objects(&self.hosts);
        if nodes.is_empty() {
            return Ok(());
        }
        write_atomic(&self.policy_dir, "02-nodes.yaml", &yaml_docs(&nodes)?)
    }

    /// Namespace and Pod objects with the case's labels (the base labels when `case` is None).
    fn write_model_objects(&self, file: &CaseFile, case: Option<&Case>) -> Result<()> {
        let model = &file.model;
        let mut namespaces = Vec::new();
        for ns in model.namespaces.keys() {
            let labels = match case {
                Some(c) => c.namespace_labels(model, ns),
                None => model.namespaces[ns].labels.clone(),
            };
            namespaces.push(json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": labels},
            }));
        }
        let containers: Vec<serde_json::Value> = self
            .served
            .iter()
            .map(|(port, proto)| {
                json!({
                    "name": format!("cont-{port}-{}", proto.lower()),
                    "ports": [{
                        "name": format!("serve-{port}-{}", proto.lower()),
                        "containerPort": port,
                        "protocol": proto.name(),
                    }],
                })
            })
            .collect();
        let mut pods = Vec::new();
        for key in &model.pod_order {
            let m = &model.pods[key];
            let labels = match case {
                Some(c) => c.pod_labels(model, key),
                None => m.labels.clone(),
            };
            // One Pod per host (a twin on the second with remote backends), with the
            // addresses moat-cni gave it once it has them, as the kubelet publishes them.
            // The names the case file gives this pod's ports (upstream's `web` for 80/TCP),
            // in a container of their own beside the `serve-` ones.
            let mut pod_containers = containers.clone();
            if !m.ports.is_empty() {
                let ports: Vec<serde_json::Value> = m
                    .ports
                    .iter()
                    .map(|p| {
                        json!({
                            "name": p.name,
                            "containerPort": p.port,
                            "protocol": p.protocol.name(),
                        })
                    })
                    .collect();
                pod_containers.push(json!({"name": "cont-named", "ports": ports}));
            }
            for (host, placed) in [&self.pods, &self.twins]
                .into_iter()
                .take(self.hosts.len())
                .enumerate()
            {
                let mut pod = json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": pod_name(&m.name, host),
                        "namespace": m.namespace,
                        "labels": labels,
                    },
                    "spec": {"containers": pod_containers},
                });
                if self.opts.remote_backends
                    && let Some(p) = placed.get(key)
                {
                    pod["status"] = json!({"podIPs": [
                        {"ip": p.lab.v4.to_string()},
                        {"ip": p.lab.v6.to_string()},
                    ]});
                }
                pods.push(pod);
            }
        }
        write_atomic(
            &self.policy_dir,
            "00-namespaces.yaml",
            &yaml_docs(&namespaces)?,
        )?;
        write_atomic(&self.policy_dir, "01-pods.yaml", &yaml_docs(&pods)?)?;
        Ok(())
    }

    /// The pod a probe to `key`'s Service reaches: its twin on the other node with remote
    /// backends, the pod itself otherwise.
    fn backend(&self, key: &str) -> &LivePod {
        self.twins.get(key).unwrap_or(&self.pods[key])
    }

    /// Puts the case's objects in place and waits until moatd has them in the maps.
    fn apply_case(&mut self, file: &CaseFile, case: &Case) -> Result<()> {
        // An address in a policy means the pod a probe reaches: the backend.
        let policies =
            case.resolved_policies(&file.model, &|k| self.address(self.backend(k)).to_string())?;
        self.write_model_objects(file, Some(case))?;
        if policies.is_empty() {
            let _ = std::fs::remove_file(self.policy_dir.join("10-policies.yaml"));
        } else {
            write_atomic(&self.policy_dir, "10-policies.yaml", &yaml_docs(&policies)?)?;
        }
        // Every node reads the same objects (one cluster); each must hold them all.
        for host in &mut self.hosts {
            host.reload(policies.len())?;
        }
        Ok(())
    }

    /// The address probes use for a pod: IPv4, or IPv6 with `--ipv6`.
    fn address(&self, pod: &LivePod) -> IpAddr {
        if self.opts.ipv6 {
            IpAddr::V6(pod.lab.v6)
        } else {
            IpAddr::V4(pod.lab.v4)
        }
    }

    fn target(&self, probe: &Probe) -> SocketAddr {
        let pod = &self.pods[&probe.to];
        let ip = if self.opts.direct {
            self.address(pod)
        } else {
            IpAddr::V4(pod.cluster_ip)
        };
        SocketAddr::new(ip, probe.port)
    }

    pub fn run_case(&mut self, file: &CaseFile, case: &Case) -> CaseResult {
        if let Some(reason) = &case.skip {
            return CaseResult::skipped_case(case, reason, self.opts.keep_all);
        }
        let start = Instant::now();
        if let Err(e) = self.apply_case(file, case) {
            return CaseResult::not_run(
                case,
                format!("{e:#}"),
                start.elapsed(),
                self.opts.keep_all,
            );
        }
        let _ = self.take_events();
        let results = self.run_probes(case);
        CaseResult::new(
            &case.id,
            &case.name,
            results,
            None,
            start.elapsed(),
            self.opts.keep_all,
        )
    }

    /// Every probe of the case, `--parallel` at a time, each from inside its client pod.
    fn run_probes(&self, case: &Case) -> Vec<ProbeResult> {
        let n = case.probes.len();
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Observed>>> = Mutex::new(vec![None; n]);
        let timeout = self.opts.timeout;
        let retry_timeout = (timeout * 5).max(Duration::from_secs(2));
        let workers = self.opts.parallel.clamp(1, n.max(1));
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    let mut current: Option<String> = None;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let probe = &case.probes[i];
                        let r = ProbeResult::new(probe);
                        let out = if probe.protocol == Proto::Sctp
                            && let Err(reason) = &self.sctp
                        {
                            (r.skipped(reason), Vec::new())
                        } else {
                            let from = &self.pods[&probe.from];
                            if current.as_deref() != Some(probe.from.as_str()) {
                                if let Err(e) = enter(&from.netns) {
                                    let r = r.failed(&format!("entering {}: {e}", probe.from));
                                    results.lock().unwrap()[i] = Some((r, Vec::new()));
                                    current = None;
                                    continue;
                                }
                                current = Some(probe.from.clone());
                            }
                            let target = self.target(probe);
                            let (first, p1) = from.probe(probe.protocol, target, timeout);
                            // Loopback results never count, so they are not retried.
                            if first == probe.expect || probe.loopback {
                                (r.judge(first, 1), vec![p1])
                            } else {
                                // Retried once, as upstream's probe does; a denied probe
                                // keeps the short timeout, an allowed one gets longer.
                                let t = if probe.expect { retry_timeout } else { timeout };
                                let (second, p2) = from.probe(probe.protocol, target, t);
                                (r.judge(second, 2), vec![p1, p2])
                            }
                        };
                        results.lock().unwrap()[i] = Some(out);
                    }
                });
            }
        });
        let mut results: Vec<Observed> = results
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|r| r.expect("every probe ran"))
            .collect();
        for (r, _) in results.iter_mut() {
            self.cross_check_trace(r);
        }

        // Evidence for failures: the datapath's events for the failing flows.
        if results
            .iter()
            .any(|(r, _)| r.outcome == crate::report::Outcome::Failed)
        {
            std::thread::sleep(Duration::from_millis(300));
            let events = self.take_events();
            let rules = self.rule_texts();
            for (r, ports) in results.iter_mut() {
                if r.outcome != crate::report::Outcome::Failed {
                    continue;
                }
                let evidence = self.evidence(r, ports, &events, &rules);
                r.detail = Some(evidence);
            }
        }
        results.into_iter().map(|(r, _)| r).collect()
    }

    /// `moatctl trace` must agree with what the probe saw: the offline explanation
    /// (engine, cross-checked with the maps by moatd) against real packets. A disagreement,
    /// or a trace moatd refuses, fails the probe.
    fn cross_check_trace(&self, r: &mut ProbeResult) {
        let Some(observed) = r.observed else { return };
        // The trace of a pod-to-pod flow judges the addresses both pods have, IPv4 first: it
        // says nothing about the IPv6 probe (the IPv6 verdicts are checked by the probes).
        if r.loopback || r.outcome == crate::report::Outcome::Skipped || self.opts.ipv6 {
            return;
        }
        // With remote backends the trace goes to the Service address the probe used: the
        // client's moatd reads its node's DNAT rules, finds the backend on the other node and
        // judges it as the datapath does (egress after DNAT here, ingress there).
        let to = if self.opts.remote_backends {
            self.pods[&r.to].cluster_ip.to_string()
        } else {
            r.to.clone()
        };
        let request = Request::Trace {
            from: r.from.clone(),
            to,
            port: r.port,
            protocol: r.protocol.clone(),
        };
        let traced = self.hosts[0]
            .call(&request, Duration::from_secs(10))
            .map(|answer| answer["trace"]["verdict"].as_str().map(str::to_string));
        let seen = if observed { "allowed" } else { "denied" };
        let problem = match traced {
            Ok(Some(v)) if v == seen => return,
            Ok(Some(v)) => format!("trace says {v}, the probe was {seen}"),
            Ok(None) => "trace answered without a verdict".to_string(),
            Err(e) => format!("trace failed: {e:#}"),
        };
        let detail = match r.detail.take() {
            Some(d) => format!("{problem}; {d}"),
            None => problem,
        };
        *r = r.clone().failed(&detail);
    }

    /// Each host's rule texts by rule id (ids are each moatd's own).
    fn rule_texts(&self) -> Vec<BTreeMap<u32, String>> {
        self.hosts.iter().map(Self::host_rule_texts).collect()
    }

    fn host_rule_texts(host: &Host) -> BTreeMap<u32, String> {
        let Ok(answer) = host.call(&Request::Policy, Duration::from_secs(10)) else {
            return BTreeMap::new();
        };
        let document = &answer["document"];
        document["rules"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn ifname(&self, host: usize, ifindex: u32) -> String {
        let placed = if host == 0 { &self.pods } else { &self.twins };
        placed
            .values()
            .find(|p| p.lab.ifindex == ifindex)
            .map(|p| format!("{}({})", p.lab.host_if, p.key))
            .unwrap_or_else(|| format!("ifindex {ifindex}"))
            + &if self.hosts.len() > 1 {
                format!(" on {}", self.hosts[host].name)
            } else {
                String::new()
            }
    }

    fn evidence(
        &self,
        r: &ProbeResult,
        src_ports: &[u16],
        events: &[(usize, FlowEvent)],
        rules: &[BTreeMap<u32, String>],
    ) -> String {
        let client = self.address(&self.pods[&r.from]);
        let proto = match r.protocol.as_str() {
            "TCP" => 6,
            "UDP" => 17,
            _ => 132,
        };
        let mut lines = Vec::new();
        for (host, e) in events {
            if e.family != if client.is_ipv6() { 6 } else { 4 } || e.proto != proto {
                continue;
            }
            let (s, d) = if client.is_ipv6() {
                (
                    IpAddr::V6(v6_from_raw(e.saddr)),
                    IpAddr::V6(v6_from_raw(e.daddr)),
                )
            } else {
                (
                    IpAddr::V4(v4_from_raw(e.saddr[0])),
                    IpAddr::V4(v4_from_raw(e.daddr[0])),
                )
            };
            let forward = s == client && src_ports.contains(&e.sport) && e.dport == r.port;
            let reply = d == client && src_ports.contains(&e.dport) && e.sport == r.port;
            if !(forward || reply) {
                continue;
            }
            let rule = rules
                .get(*host)
                .and_then(|r| r.get(&e.rule_id))
                .map(|t| format!(" ({t})"))
                .unwrap_or_default();
            lines.push(format!(
                "{} {} at {} {}: {s}:{} -> {d}:{} reason={} rule={}{rule} local_id={} remote_id={}",
                if reason::is_drop(e.reason) {
                    "DROP"
                } else {
                    "PASS"
                },
                if e.direction == moat_common::DIRECTION_EGRESS {
                    "egress"
                } else {
                    "ingress"
                },
                self.ifname(*host, e.ifindex),
                if forward { "forward" } else { "reply" },
                e.sport,
                e.dport,
                reason::name(e.reason),
                e.rule_id,
                e.local_identity,
                e.remote_identity,
            ));
        }
        let target = self.target(&Probe {
            from: r.from.clone(),
            to: r.to.clone(),
            port: r.port,
            protocol: match proto {
                6 => Proto::Tcp,
                17 => Proto::Udp,
                _ => Proto::Sctp,
            },
            expect: r.expect,
            loopback: r.loopback,
        });
        let head = format!(
            "{client} -> {target} (backend {}), source ports {src_ports:?}",
            self.address(self.backend(&r.to))
        );
        if lines.is_empty() {
            format!(
                "{head}; no datapath event for this flow (allows are not logged by default; the ring is rate-limited)"
            )
        } else {
            format!("{head}; datapath events: {}", lines.join(" | "))
        }
    }

    /// Warnings moatd logged during the run (resync drift, rejected objects...).
    pub fn moatd_warnings(&self) -> Vec<String> {
        let several = self.hosts.len() > 1;
        self.hosts
            .iter()
            .flat_map(|host| {
                std::fs::read_to_string(host.log_path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| match several {
                        true => format!("{}: {l}", host.name),
                        false => l.to_string(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn events_lost(&self) -> usize {
        self.events
            .as_ref()
            .map(|e| e.lost.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Undoes the node changes; keeps the work directory (moatd log) when asked to.
    pub fn teardown(mut self, keep_workdir: bool) {
        cleanup::run_all();
        for host in &mut self.hosts {
            if let Some(mut child) = host.daemon.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        drop(self.lab.take());
        if let Some(chain) = self.chain.take() {
            remove_chain(&chain);
        }
        if !keep_workdir {
            let _ = std::fs::remove_dir_all(&self.workdir);
        }
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }
}
