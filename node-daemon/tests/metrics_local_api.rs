//! moatd's metrics endpoint and the local API's peer-credential check, against a private
//! moatd on the real kernel: pods register, traffic flows and is denied, a policy is edited,
//! and /metrics must then report verdict counters, per-rule drops, map fill, endpoint and
//! identity counts, event loss and event-to-maps latencies with sane values. A client that is
//! not root is refused by the API even when the socket's mode would let it connect.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use moat_datapath::{PinDir, attach_endpoint, detach_endpoint};
use moat_testkit::{
    Moatd,
    lab::{LabPod, probe, sh},
};
use moatd::api::{self, EndpointSpec, Request, Response};

struct Env {
    root: PathBuf,
    _dir: tempfile::TempDir,
    pin_root: PathBuf,
    metrics_port: u16,
}

impl Env {
    fn new(tag: &str) -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "run as root (make test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/moat-test/{tag}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_root);
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        // A free port (the kernel's pick; released just before moatd binds it).
        let metrics_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            root: dir.path().to_path_buf(),
            _dir: dir,
            pin_root,
            metrics_port,
        }
    }

    fn socket(&self) -> PathBuf {
        self.root.join("moatd.sock")
    }

    fn policies(&self) -> PathBuf {
        self.root.join("policies")
    }

    fn pins(&self) -> PinDir {
        PinDir::new(&self.pin_root)
    }

    fn start(&self) -> Moatd {
        Moatd::builder(env!("CARGO_BIN_EXE_moatd"))
            // The host's own namespace: no host-wide netfilter rules.
            .arg("--judge-after-dnat=false")
            .layout(&self.root)
            .pin_root(&self.pin_root)
            .poll_ms(100)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .spawn()
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn call(&self, request: Request) -> Response {
        api::call(&self.socket(), &request, Duration::from_secs(10)).unwrap()
    }

    fn write(&self, file: &str, yaml: &str) {
        let tmp = self.policies().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, self.policies().join(file)).unwrap();
    }

    /// GET /metrics: (status line, content type, body).
    fn scrape_raw(&self, path: &str) -> (String, String, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.lines().next().unwrap_or("").to_string();
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Type: "))
            .unwrap_or("")
            .to_string();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .expect("Content-Length");
        assert_eq!(length, body.len(), "Content-Length matches the body");
        (status, content_type, body.to_string())
    }

    fn scrape(&self) -> Scrape {
        let (status, content_type, body) = self.scrape_raw("/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(content_type.starts_with("text/plain; version=0.0.4"));
        Scrape::parse(&body)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

/// One sample: metric name and labels.
type Series = (String, BTreeMap<String, String>);

/// A parsed exposition (text format 0.0.4).
struct Scrape {
    samples: Vec<(Series, f64)>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    (name.to_string(), parse_labels(body))
                }
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "metric name {name:?}"
            );
            samples.push(((name, labels), value));
        }
        Self { samples, types }
    }

    /// Samples of `name` whose labels include all of `want`.
    fn find(&self, name: &str, want: &[(&str, &str)]) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|((_, labels), v)| (labels, *v))
            .collect()
    }

    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.find(name, want).iter().map(|(_, v)| v).sum()
    }

    fn one(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let found = self.find(name, want);
        assert_eq!(found.len(), 1, "exactly one {name}{want:?}: {found:?}");
        found[0].1
    }
}

/// `a="x",b="y\"z"` (values may hold escaped quotes and commas).
fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label key");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.expect("closing quote");
        out.insert(key.trim_start_matches(',').to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    out
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

/// Two pods in namespaces of their own, on addresses no other test uses (10.93.<id>.0/24).
struct MiniLab {
    pods: Vec<LabPod>,
}

impl MiniLab {
    fn new(tag: &str, names: &[&str]) -> Self {
        sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1").unwrap();
        let id = std::process::id() % 250 + 1;
        let mut lab = Self { pods: Vec::new() };
        for (i, name) in names.iter().enumerate() {
            let index = i as u8 + 1;
            let netns = format!("{tag}{id}-{name}");
            let host_if = format!("{tag}{id}h{index}");
            let v4 = Ipv4Addr::new(10, 93, id as u8, index);
            let v6: Ipv6Addr = format!("fd93:{id:x}::{index:x}").parse().unwrap();
            let _ = sh(&format!(
                "ip netns del {netns} 2>/dev/null; ip link del {host_if} 2>/dev/null"
            ));
            sh(&format!("ip netns add {netns}")).unwrap();
            lab.pods.push(LabPod {
                name: name.to_string(),
                netns: netns.clone(),
                host_if: host_if.clone(),
                ifindex: 0,
                v4,
                v6,
            });
            sh(&format!(
                "ip link add {host_if} type veth peer name eth0 netns {netns} && \
                 ip link set {host_if} up && \
                 ip -n {netns} link set lo up && ip -n {netns} link set eth0 up"
            ))
            .unwrap();
            let mac = std::fs::read_to_string(format!("/sys/class/net/{host_if}/address"))
                .unwrap()
                .trim()
                .to_string();
            sh(&format!(
                "ip -n {netns} addr add {v4}/32 dev eth0 && \
                 ip -n {netns} addr add {v6}/128 dev eth0 nodad && \
                 ip -n {netns} route add 169.254.1.1 dev eth0 scope link && \
                 ip -n {netns} route add default via 169.254.1.1 dev eth0 && \
                 ip -n {netns} neigh add 169.254.1.1 lladdr {mac} dev eth0 nud permanent && \
                 ip route add {v4}/32 dev {host_if}"
            ))
            .unwrap();
            let last = lab.pods.last_mut().unwrap();
            last.ifindex = std::fs::read_to_string(format!("/sys/class/net/{host_if}/ifindex"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        }
        lab
    }
}

impl Drop for MiniLab {
    fn drop(&mut self) {
        for pod in &self.pods {
            let _ = sh(&format!(
                "ip netns del {} 2>/dev/null; ip link del {} 2>/dev/null",
                pod.netns, pod.host_if
            ));
        }
    }
}

fn register(env: &Env, pod: &LabPod) {
    let spec = EndpointSpec {
        container_id: format!("cid-{}", pod.name),
        ifname: "eth0".into(),
        netns: format!("/run/netns/{}", pod.netns),
        host_ifname: pod.host_if.clone(),
        host_ifindex: pod.ifindex,
        ips: vec![IpAddr::V4(pod.v4), IpAddr::V6(pod.v6)],
        pod_namespace: "shop".into(),
        pod_name: pod.name.clone(),
        pod_uid: None,
    };
    match env.call(Request::Register { endpoint: spec }) {
        Response::Registered(_) => {}
        other => panic!("{other:?}"),
    }
    attach_endpoint(&env.pins(), &pod.host_if).unwrap();
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels:
    app: web
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  labels:
    app: client
"#;

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-only-8080
  namespace: shop
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: client
    ports:
    - port: 8080
"#;

#[test]
fn metrics_report_verdicts_drops_fill_counts_and_latency() {
    let env = Env::new("mmet");
    env.write("objects.yaml", OBJECTS);
    env.write("policy.yaml", POLICY);
    let _daemon = env.start();

    // Served, and only on /metrics.
    let (status, _, _) = env.scrape_raw("/nope");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");

    let lab = MiniLab::new("mm", &["web", "client"]);
    let (web, client) = (&lab.pods[0], &lab.pods[1]);
    let _servers: Vec<_> = [8080u16, 9090]
        .iter()
        .map(|port| probe::EchoServer::start(web, *port).unwrap())
        .collect();
    register(&env, web);
    register(&env, client);
    let to_web = |port| probe::tcp(client, IpAddr::V4(web.v4), port, Duration::from_millis(700));
    assert!(to_web(8080), "allowed by the policy");
    assert!(!to_web(9090), "denied: no rule allows 9090");

    // A live policy edit: a datastore event applied by the watcher.
    env.write("policy.yaml", &POLICY.replace("port: 8080", "port: 8081"));
    wait_until("the edit applies", || !to_web(8080));

    wait_until("the journal has explained the drops", || {
        env.scrape()
            .sum("moat_flow_drop_events_total", &[("verdict", "dropped")])
            >= 2.0
    });
    let m = env.scrape();

    // Every metric is declared with the right type.
    for (name, kind) in [
        ("moat_datapath_packets_total", "counter"),
        ("moat_datapath_bytes_total", "counter"),
        ("moat_flow_events_lost_total", "counter"),
        ("moat_flow_drop_events_total", "counter"),
        ("moat_map_entries", "gauge"),
        ("moat_map_capacity", "gauge"),
        ("moat_fqdn_learned_total", "counter"),
        ("moat_fqdn_unasked_total", "counter"),
        ("moat_fqdn_malformed_total", "counter"),
        ("moat_fqdn_capped_total", "counter"),
        ("moatd_endpoints", "gauge"),
        ("moatd_identities", "gauge"),
        ("moatd_event_to_maps_seconds", "histogram"),
    ] {
        assert_eq!(
            m.types.get(name).map(String::as_str),
            Some(kind),
            "{name} declared as {kind}"
        );
    }

    // Counts.
    assert_eq!(m.one("moatd_endpoints", &[]), 2.0);
    assert!(m.one("moatd_identities", &[]) >= 2.0);
    assert_eq!(m.one("moatd_policies", &[]), 1.0);
    assert_eq!(m.one("moatd_ready", &[]), 1.0);

    // Verdict counters: allowed (the 8080 flow and its replies) and default-deny drops.
    let allowed = m.sum("moat_datapath_packets_total", &[("verdict", "allowed")]);
    let denied = m.one(
        "moat_datapath_packets_total",
        &[
            ("verdict", "dropped"),
            ("reason", "default-deny"),
            ("direction", "ingress"),
        ],
    );
    assert!(allowed >= 3.0, "allowed packets: {allowed}");
    assert!(denied >= 2.0, "denied SYNs: {denied}");
    let denied_bytes = m.one(
        "moat_datapath_bytes_total",
        &[
            ("verdict", "dropped"),
            ("reason", "default-deny"),
            ("direction", "ingress"),
        ],
    );
    assert!(
        denied_bytes >= denied * 40.0,
        "bytes ({denied_bytes}) at least a header per packet ({denied})"
    );

    // Drops per rule, from the journal: the deciding policy is named.
    let drops = m.find("moat_flow_drop_events_total", &[("verdict", "dropped")]);
    assert!(
        drops
            .iter()
            .any(|(l, v)| *v >= 1.0 && l["rule"].contains("shop/web-only-8080")),
        "drops name the selecting policy: {drops:?}"
    );

    // Event loss counters exist (none lost here).
    assert_eq!(
        m.one("moat_flow_events_lost_total", &[("cause", "ring_full")]),
        0.0
    );
    m.one("moat_flow_events_lost_total", &[("cause", "rate_limited")]);

    // Map fill: the two endpoints, their ipcache entries, capacities from moat_common.
    assert_eq!(m.one("moat_map_entries", &[("map", "endpoints")]), 2.0);
    assert_eq!(
        m.one("moat_map_capacity", &[("map", "endpoints")]),
        moat_common::map_size::ENDPOINTS as f64
    );
    assert!(m.one("moat_map_entries", &[("map", "ipcache_v4")]) >= 2.0);
    assert!(m.one("moat_map_entries", &[("map", "policy")]) >= 1.0);
    assert!(m.one("moat_map_entries", &[("map", "conntrack")]) >= 1.0);
    let fill = m.one("moat_map_fill_ratio", &[("map", "endpoints")]);
    assert!(fill > 0.0 && fill < 0.01, "{fill}");

    // Event-to-maps latency: both registrations, and the datastore edit.
    let count = |event| m.one("moatd_event_to_maps_seconds_count", &[("event", event)]);
    let sum = |event| m.one("moatd_event_to_maps_seconds_sum", &[("event", event)]);
    assert_eq!(count("register"), 2.0);
    assert!(count("datastore") >= 1.0);
    for event in ["register", "datastore"] {
        let mean = sum(event) / count(event);
        assert!(mean > 0.0 && mean < 5.0, "{event}: mean {mean}s");
        let inf = m.one(
            "moatd_event_to_maps_seconds_bucket",
            &[("event", event), ("le", "+Inf")],
        );
        assert_eq!(inf, count(event), "{event}: +Inf bucket holds every sample");
    }

    // After an unregistration the counts follow.
    match env.call(Request::Unregister {
        container_id: format!("cid-{}", client.name),
        ifname: "eth0".into(),
    }) {
        Response::Unregistered { found: true } => {}
        other => panic!("{other:?}"),
    }
    let m = env.scrape();
    assert_eq!(m.one("moatd_endpoints", &[]), 1.0);
    assert_eq!(m.one("moat_map_entries", &[("map", "endpoints")]), 1.0);
    assert_eq!(
        m.one(
            "moatd_event_to_maps_seconds_count",
            &[("event", "unregister")]
        ),
        1.0
    );

    for pod in &lab.pods {
        let _ = detach_endpoint(&env.pins(), &pod.host_if);
    }
}

#[test]
fn local_api_refuses_clients_that_are_not_root() {
    let env = Env::new("mcrd");
    let _daemon = env.start();
    let socket = env.socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    // moatctl runs from a copy that uid 65534 can execute: the build tree may sit in a
    // directory only root may enter (a clone under `mktemp -d`), and then the exec, not the
    // socket, would refuse nobody.
    let bin_dir = tempfile::Builder::new()
        .prefix("moatctl-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let moatctl_bin = bin_dir.path().join("moatctl");
    std::fs::copy(env!("CARGO_BIN_EXE_moatctl"), &moatctl_bin).unwrap();
    std::fs::set_permissions(&moatctl_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let moatctl = |uid: Option<u32>| {
        let mut cmd = Command::new(&moatctl_bin);
        cmd.arg("--socket").arg(&socket).arg("status");
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, uid);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let nobody = 65_534;

    // Root is served.
    let (ok, output) = moatctl(None);
    assert!(ok, "root: {output}");

    // With mode 0600 a non-root client cannot even connect: moatctl ran, and the socket
    // refused it.
    let (ok, output) = moatctl(Some(nobody));
    assert!(!ok, "nobody must be refused: {output}");
    assert!(
        output.contains("cannot reach moatd") && output.contains("ermission denied"),
        "a refused connect: {output}"
    );

    // Even when the file mode lets it connect (a mistake, or a socket shared into a
    // container), the daemon checks who connected (SO_PEERCRED) and refuses clearly.
    std::fs::set_permissions(&env.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, output) = moatctl(Some(nobody));
    assert!(!ok, "nobody must be refused: {output}");
    assert!(
        output.contains("permission denied: moatd's API accepts only root"),
        "a clear refusal, from moatd: {output}"
    );
    assert!(output.contains(&format!("uid {nobody}")), "{output}");

    // Read-only requests too: nothing is served to a non-root peer.
    let answer = raw_request_as(&socket, nobody);
    assert!(
        answer.contains("\"result\":\"error\"") && answer.contains("only root"),
        "{answer}"
    );

    // Root is still served, and the daemon is unharmed.
    let (ok, output) = moatctl(None);
    assert!(ok, "root after refusals: {output}");
}

/// A raw request from a forked child that switched to `uid` before connecting (peer
/// credentials are taken at connect): the daemon's answer line. The child makes only plain
/// system calls on memory prepared before the fork.
fn raw_request_as(socket: &std::path::Path, uid: u32) -> String {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    // Close-on-exec: a process another test spawns meanwhile must not hold the write end.
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = socket.as_os_str().as_bytes();
    assert!(path.len() < addr.sun_path.len(), "socket path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(path) {
        *dst = *src as libc::c_char;
    }
    let request = b"{\"op\":\"list_endpoints\"}\n";
    let wr_fd = wr.as_raw_fd();
    // SAFETY: the child only makes async-signal-safe system calls and exits with _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => unsafe {
            let mut buf = [0u8; 4096];
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(2);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0
                || libc::connect(
                    fd,
                    &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ) != 0
            {
                libc::_exit(3);
            }
            if libc::write(fd, request.as_ptr().cast(), request.len()) != request.len() as isize {
                libc::_exit(4);
            }
            let mut total = 0usize;
            while total < buf.len() {
                let n = libc::read(fd, buf.as_mut_ptr().add(total).cast(), buf.len() - total);
                if n <= 0 {
                    break;
                }
                total += n as usize;
                if buf[..total].contains(&b'\n') {
                    break;
                }
            }
            libc::write(wr_fd, buf.as_ptr().cast(), total);
            libc::_exit(0);
        },
        nix::unistd::ForkResult::Parent { child } => {
            drop(wr);
            let mut answer = String::new();
            std::fs::File::from(rd).read_to_string(&mut answer).unwrap();
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "the child ran ({answer})"
            );
            answer
        }
    }
}
