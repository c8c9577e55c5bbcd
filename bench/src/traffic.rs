//! Real traffic between two lab pods (network namespaces routed through the host), under each
//! configuration: TCP ping-pong latency (sockperf), new connections per second (a Rust loop in
//! the client pod, and a forking client: one process per connection), and bulk throughput
//! (iperf3, one stream and four). The `ptp` configuration measures the same tools between two
//! other pods, wired by the reference `ptp` plugin with `host-local` IPAM (kindnet's datapath
//! on kind), as the baseline users already run.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use moat_common::*;
use moat_datapath::{Maps, PinDir};
use moat_testkit::{cni, lab::LabPod};
use serde_json::{Value, json};

use crate::util::{AttachGuard, ChildGuard, IptablesGuard, run_timeout, sh, wait_listening};

pub const CLIENT: u32 = 1100;
pub const SERVER: u32 = 1200;
pub const SOCKPERF_PORT: u16 = 11111;
pub const CONN_PORT: u16 = 12345;
pub const IPERF_PORT: u16 = 5201;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config {
    None,
    Moat1,
    Moat100k,
    /// moat_100k with `--local-delivery host-stack`: every packet crosses the host's stack,
    /// so the figure is the cost of the filter alone.
    Moat100kHostStack,
    Iptables10k,
    /// Two other pods, wired by the reference `ptp` plugin + `host-local` (see [`PtpPods`]),
    /// nothing attached: the baseline of kindnet's datapath.
    Ptp,
}

pub const CONFIGS: [Config; 6] = [
    Config::None,
    Config::Moat1,
    Config::Moat100k,
    Config::Moat100kHostStack,
    Config::Iptables10k,
    Config::Ptp,
];

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Moat1 => "moat_1",
            Config::Moat100k => "moat_100k",
            Config::Moat100kHostStack => "moat_100k_host_stack",
            Config::Iptables10k => "iptables_10k",
            Config::Ptp => "ptp",
        }
    }
}

/// Endpoint and ipcache entries for a lab pod (both families), as moatd would write them.
pub fn register(maps: &mut Maps, pod: &LabPod, identity: u32) -> Result<()> {
    Ok(pod.register(maps, identity)?)
}

/// Sets each endpoint's ENDPOINT_FLAG_NO_* lookup hints as moatd sets them: from the entries
/// its policy id has (no deny entry, no port-range entry, no CIDR entry), here read back from
/// the maps, filler included. Returns the hints by policy id, for the report.
pub fn apply_lookup_hints(maps: &mut Maps, pods: &[(&LabPod, u32)]) -> Result<Vec<(u32, u8)>> {
    let mut out = Vec::new();
    for (pod, policy_id) in pods {
        let mut needs = 0u8;
        for entry in maps.policy.iter() {
            let (key, value) = entry?;
            if key.policy_id == *policy_id {
                needs |= policy_entry_needs(&value);
            }
        }
        for entry in maps.port_ranges.iter() {
            let (key, set) = entry?;
            if key.policy_id == *policy_id {
                needs |= rule_set_needs(&set, ENDPOINT_FLAG_NO_RANGES);
            }
        }
        for entry in maps.cidr_v4.iter() {
            let (key, set) = entry?;
            if key.data().policy_id == policy_id.to_be_bytes() {
                needs |= rule_set_needs(&set, ENDPOINT_FLAG_NO_CIDR);
            }
        }
        for entry in maps.cidr_v6.iter() {
            let (key, set) = entry?;
            if key.data().policy_id == policy_id.to_be_bytes() {
                needs |= rule_set_needs(&set, ENDPOINT_FLAG_NO_CIDR);
            }
        }
        let hints = ENDPOINT_HINT_FLAGS & !needs;
        let mut ep = maps.endpoints.get(&pod.ifindex, 0)?;
        ep.flags = (ep.flags & !ENDPOINT_HINT_FLAGS) | hints;
        maps.upsert_endpoint(pod.ifindex, &ep)?;
        out.push((*policy_id, hints));
    }
    Ok(out)
}

/// The policy that admits the benchmark's flows: the client may send anything (not isolated
/// for egress); the server admits TCP from the client on any port. Replies pass on conntrack.
pub fn install_policy(maps: &mut Maps) -> Result<()> {
    for (key, rule_id) in [
        (
            PolicyKey {
                policy_id: CLIENT,
                remote_identity: IDENTITY_ANY,
                dport: 0,
                proto: 0,
                direction: DIRECTION_EGRESS,
            },
            rule::NOT_ISOLATED,
        ),
        (
            PolicyKey {
                policy_id: SERVER,
                remote_identity: CLIENT,
                dport: 0,
                proto: PROTO_TCP,
                direction: DIRECTION_INGRESS,
            },
            200,
        ),
    ] {
        maps.upsert_policy(
            &key,
            &PolicyValue {
                rule_id,
                action: ACTION_ALLOW,
                ..PolicyValue::default()
            },
        )?;
    }
    Ok(())
}

/// What a configuration put in place; undone on drop.
pub struct Applied {
    _attach: Option<AttachGuard>,
    pub iptables: Option<IptablesGuard>,
}

pub struct Setup<'a> {
    pub client: &'a LabPod,
    pub server: &'a LabPod,
    /// The ptp pods (client, server), when the `ptp` configuration is measured.
    pub ptp: Option<(&'a LabPod, &'a LabPod)>,
    pub small: &'a PinDir,
    pub large: &'a PinDir,
    pub iptables_rules: usize,
    pub attach: moat_datapath::AttachMode,
}

/// Sets or clears the flag that keeps linked local flows on the host's stack.
fn set_local_via_host(pins: &PinDir, via_host: bool) -> Result<()> {
    let mut maps = Maps::open(pins)?;
    let mut config = maps.config.get(&0, 0).unwrap_or_default();
    config.set_flag(CONFIG_FLAG_LOCAL_VIA_HOST, via_host);
    Ok(maps.set_config(&config)?)
}

impl Setup<'_> {
    /// The (client, server) pair a configuration is measured between.
    pub fn pods(&self, config: Config) -> Result<(&LabPod, &LabPod)> {
        match config {
            Config::Ptp => self.ptp.context("the ptp pods were not set up"),
            _ => Ok((self.client, self.server)),
        }
    }
}

pub fn apply(config: Config, s: &Setup) -> Result<Applied> {
    let ifs = [s.client.host_if.as_str(), s.server.host_if.as_str()];
    for pins in [s.small, s.large] {
        set_local_via_host(pins, config == Config::Moat100kHostStack)?;
    }
    Ok(match config {
        Config::None | Config::Ptp => Applied {
            _attach: None,
            iptables: None,
        },
        Config::Moat1 => Applied {
            _attach: Some(AttachGuard::attach(s.small, &ifs, s.attach)?),
            iptables: None,
        },
        Config::Moat100k | Config::Moat100kHostStack => Applied {
            _attach: Some(AttachGuard::attach(s.large, &ifs, s.attach)?),
            iptables: None,
        },
        Config::Iptables10k => Applied {
            _attach: None,
            iptables: Some(IptablesGuard::load(s.iptables_rules)?),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Servers, started once in the server pod for the whole run
// ---------------------------------------------------------------------------------------------

/// Accepts, reads one byte, echoes it and closes; one connection at a time (the client is
/// sequential), with a blocking accept so that no polling delay enters the measurement.
pub struct ConnServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConnServer {
    pub fn start(pod: &LabPod, port: u16) -> Result<Self> {
        let ip = IpAddr::V4(pod.v4);
        let listener = pod.run(move || TcpListener::bind((ip, port)))??;
        // SO_RCVTIMEO bounds accept(), so the stop flag is seen within 200 ms.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a valid socket fd and a correctly sized timeval.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop_thread.load(Ordering::SeqCst) {
                if let Ok((mut s, _)) = listener.accept() {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).is_ok() {
                        let _ = s.write_all(&b);
                    }
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Servers {
    sockperf: ChildGuard,
    iperf: ChildGuard,
    _conn: ConnServer,
}

impl Servers {
    pub fn start(server: &LabPod) -> Result<Self> {
        let ip = server.v4.to_string();
        let sockperf_port = SOCKPERF_PORT.to_string();
        let iperf_port = IPERF_PORT.to_string();
        let sockperf = ChildGuard::spawn(
            "ip",
            &[
                "netns",
                "exec",
                &server.netns,
                "sockperf",
                "server",
                "--tcp",
                "-i",
                &ip,
                "-p",
                &sockperf_port,
            ],
        )?;
        let iperf = ChildGuard::spawn(
            "ip",
            &[
                "netns",
                "exec",
                &server.netns,
                "iperf3",
                "-s",
                "-B",
                &ip,
                "-p",
                &iperf_port,
            ],
        )?;
        let conn = ConnServer::start(server, CONN_PORT)?;
        wait_listening(&server.netns, SOCKPERF_PORT, Duration::from_secs(5))?;
        wait_listening(&server.netns, IPERF_PORT, Duration::from_secs(5))?;
        Ok(Self {
            sockperf,
            iperf,
            _conn: conn,
        })
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.sockperf.check_alive()?;
        self.iperf.check_alive()
    }
}

/// Per-netns settings for the connection-rate loop: a wide ephemeral range and TIME_WAIT
/// reuse, so the client never runs out of ports (lab namespaces only, not the host).
pub fn tune_pod(pod: &LabPod) -> Result<()> {
    sh(&format!(
        "ip netns exec {} sysctl -qw net.ipv4.ip_local_port_range='1024 65535' \
         net.ipv4.tcp_tw_reuse=1",
        pod.netns
    ))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

fn one_connection(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(&[0x6d])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

/// One connection through the current configuration: the flow must pass before we time it.
pub fn probe(client: &LabPod, server: &LabPod) -> Result<()> {
    let addr = SocketAddr::new(IpAddr::V4(server.v4), CONN_PORT);
    client
        .run(move || one_connection(addr))?
        .with_context(|| format!("probe connection to {addr}"))
}

pub struct Latency {
    pub avg_usec: f64,
    pub p50_usec: Option<f64>,
}

pub fn sockperf_client_args(client: &LabPod, server: &LabPod, secs: u64) -> Vec<String> {
    [
        "netns",
        "exec",
        &client.netns,
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        &server.v4.to_string(),
        "-p",
        &SOCKPERF_PORT.to_string(),
        "-t",
        &secs.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn latency(client: &LabPod, server: &LabPod, secs: u64) -> Result<Latency> {
    let args = sockperf_client_args(client, server, secs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, err) = run_timeout("ip", &args, Duration::from_secs(secs + 20))?;
    let text = format!("{out}\n{err}");
    let avg = text
        .lines()
        .find_map(|l| {
            l.split("Summary: Latency is ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .ok_or_else(|| anyhow!("no 'Summary: Latency is' in sockperf output:\n{text}"))?;
    let p50 = text.lines().find_map(|l| {
        l.split("percentile 50.000 =")
            .nth(1)
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    Ok(Latency {
        avg_usec: avg,
        p50_usec: p50,
    })
}

pub struct ConnRate {
    pub per_second: f64,
    pub errors: u64,
}

pub fn connrate(client: &LabPod, server: &LabPod, secs: u64) -> Result<ConnRate> {
    let addr = SocketAddr::new(IpAddr::V4(server.v4), CONN_PORT);
    let (ok, errors, elapsed, first_error) = client.run(move || {
        // Short warm-up, not counted.
        let warm = Instant::now() + Duration::from_millis(300);
        while Instant::now() < warm {
            let _ = one_connection(addr);
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
        while Instant::now() < deadline {
            match one_connection(addr) {
                Ok(()) => ok += 1,
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        (ok, errors, start.elapsed(), first_error)
    })?;
    if ok == 0 || errors * 100 > ok {
        bail!(
            "{ok} connections, {errors} errors (first: {})",
            first_error.unwrap_or_default()
        );
    }
    Ok(ConnRate {
        per_second: ok as f64 / elapsed.as_secs_f64(),
        errors,
    })
}

/// iperf3's client; `streams` > 1 adds `-P streams` (parallel streams in one test).
pub fn iperf_client_args(client: &LabPod, server: &LabPod, secs: u64, streams: u32) -> Vec<String> {
    let mut args: Vec<String> = [
        "netns",
        "exec",
        &client.netns,
        "iperf3",
        "-c",
        &server.v4.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if streams > 1 {
        args.extend(["-P".to_string(), streams.to_string()]);
    }
    args
}

/// Gbit/s received by the server (end.sum_received.bits_per_second: all streams).
pub fn throughput(client: &LabPod, server: &LabPod, secs: u64, streams: u32) -> Result<f64> {
    let args = iperf_client_args(client, server, secs, streams);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, _) = run_timeout("ip", &args, Duration::from_secs(secs + 20))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing iperf3 -J output")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(|b| b.as_f64())
        .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second in iperf3 output"))?;
    Ok(bps / 1e9)
}

// ---------------------------------------------------------------------------------------------
// Forking client and multi-stream throughput
// ---------------------------------------------------------------------------------------------

/// `moat-bench connect-once ADDR`: the forking client's child. One connection as the loop
/// makes it (connect, send 1 byte, read the echo, close); exit status 0 when it worked.
pub fn connect_once_main(addr: SocketAddr) -> std::process::ExitCode {
    match one_connection(addr) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connect-once {addr}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// New connections per second with one process per connection: a loop in the client pod
/// that spawns `/proc/self/exe connect-once ADDR` (this binary) and waits for it, sequentially,
/// for `secs` after a 0.3 s warm-up. What a forking client (a shell loop of `curl`, an
/// exec-per-request health check) sees: process creation is part of every connection.
pub fn connrate_fork(client: &LabPod, server: &LabPod, secs: u64) -> Result<ConnRate> {
    let addr = SocketAddr::new(IpAddr::V4(server.v4), CONN_PORT).to_string();
    let (ok, errors, elapsed, first_error) = client.run(move || {
        let once = || -> std::io::Result<bool> {
            Ok(Command::new("/proc/self/exe")
                .args(["connect-once", &addr])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success())
        };
        let warm = Instant::now() + Duration::from_millis(300);
        while Instant::now() < warm {
            let _ = once();
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
        while Instant::now() < deadline {
            match once() {
                Ok(true) => ok += 1,
                Ok(false) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| "connect-once failed".to_string());
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| format!("spawning: {e}"));
                }
            }
        }
        (ok, errors, start.elapsed(), first_error)
    })?;
    if ok == 0 || errors * 100 > ok {
        bail!(
            "{ok} forked connections, {errors} errors (first: {})",
            first_error.unwrap_or_default()
        );
    }
    Ok(ConnRate {
        per_second: ok as f64 / elapsed.as_secs_f64(),
        errors,
    })
}

// ---------------------------------------------------------------------------------------------
// The ptp baseline: two pods wired by the reference plugin
// ---------------------------------------------------------------------------------------------

pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The ptp pods' subnet: apart from the lab pods' 10.77.x.0/24 and `moat-bench cni`'s
/// 10.213.x.0/24.
pub const PTP_SUBNET: &str = "10.78.0.0/24";

/// A client and a server pod created by `ptp` + `host-local` exactly as a runtime creates
/// them (CNI_COMMAND=ADD, the configuration on stdin; kindnet's: ipMasq false, MTU 1500, a
/// default route), host-local's state in a directory of this run. Everything is undone by
/// [`PtpPods::teardown`] or on drop, also after a failure halfway: DEL for every ADD
/// attempted, then the namespaces, then the state directory.
pub struct PtpPods {
    pub dir: PathBuf,
    pub config: Value,
    tag: String,
    /// Namespaces created (deleted last).
    netns: Vec<String>,
    /// Container ids an ADD was attempted for, with their namespace (DEL is idempotent).
    added: Vec<(String, String)>,
    pub pods: Vec<LabPod>,
    torn_down: bool,
}

impl PtpPods {
    pub fn new() -> Result<Self> {
        for plugin in ["ptp", "host-local"] {
            let path = Path::new(REFERENCE_PLUGINS).join(plugin);
            if !path.exists() {
                bail!(
                    "{} missing: install containernetworking-plugins (make bootstrap)",
                    path.display()
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("moat-bench-ptp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config = json!({
            "cniVersion": "1.0.0",
            "name": "moat-bench-ptp",
            "type": "ptp",
            "ipMasq": false,
            "mtu": 1500,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.join("host-local"),
                "ranges": [[{"subnet": PTP_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        });
        let mut pods = PtpPods {
            dir,
            config,
            tag: format!("mbp{}", std::process::id() % 100_000),
            netns: Vec::new(),
            added: Vec::new(),
            pods: Vec::new(),
            torn_down: false,
        };
        for name in ["client", "server"] {
            pods.add(name)
                .with_context(|| format!("creating the ptp {name} pod"))?;
        }
        Ok(pods)
    }

    pub fn client(&self) -> &LabPod {
        &self.pods[0]
    }

    pub fn server(&self) -> &LabPod {
        &self.pods[1]
    }

    fn exec(&self, command: &str, container_id: &str, netns: &str) -> Result<Value> {
        let plugin = Path::new(REFERENCE_PLUGINS).join("ptp");
        let out = cni::Exec::new(&plugin, command)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .path(REFERENCE_PLUGINS)
            .container_id(container_id)
            .netns(format!("/run/netns/{netns}"))
            .ifname("eth0")
            .run(Some(&self.config))
            .context("spawning ptp")?;
        if !out.status.success() {
            bail!("ptp {command} failed: {}", out.text());
        }
        Ok(out.json()?)
    }

    fn add(&mut self, name: &str) -> Result<()> {
        let netns = format!("{}-{name}", self.tag);
        let _ = sh(&format!("ip netns del {netns} 2>/dev/null; true"));
        sh(&format!("ip netns add {netns}"))?;
        self.netns.push(netns.clone());
        let container_id = netns.clone();
        self.added.push((container_id.clone(), netns.clone()));
        let result = self.exec("ADD", &container_id, &netns)?;
        // A runtime's loopback plugin does this; ptp leaves lo down.
        sh(&format!("ip -n {netns} link set lo up"))?;
        let v4: Ipv4Addr = result
            .pointer("/ips/0/address")
            .and_then(Value::as_str)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no IPv4 address in ptp's result: {result}"))?;
        let host_if = result["interfaces"]
            .as_array()
            .and_then(|ifs| {
                ifs.iter()
                    .find(|i| i.get("sandbox").is_none())
                    .and_then(|i| i["name"].as_str())
            })
            .with_context(|| format!("no host interface in ptp's result: {result}"))?
            .to_string();
        let ifindex: u32 = std::fs::read_to_string(format!("/sys/class/net/{host_if}/ifindex"))?
            .trim()
            .parse()?;
        self.pods.push(LabPod {
            name: name.to_string(),
            netns,
            host_if,
            ifindex,
            v4,
            v6: Ipv6Addr::UNSPECIFIED,
        });
        Ok(())
    }

    /// DEL for every ADD, the namespaces removed, then what is left: DEL errors, host-local
    /// allocations still on disk, host-side veths still present (all zero when clean). The
    /// state directory is removed after counting.
    pub fn teardown(&mut self) -> Value {
        if self.torn_down {
            return Value::Null;
        }
        self.torn_down = true;
        let mut del_errors = Vec::new();
        for (container_id, netns) in self.added.iter().rev() {
            if let Err(e) = self.exec("DEL", container_id, netns) {
                del_errors.push(format!("{container_id}: {e:#}"));
            }
        }
        for netns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", netns]).output();
        }
        let allocations = crate::cni::host_local_allocations(&self.dir.join("host-local"));
        // DEL removes the pair; after a failed DEL the namespace's removal does, a moment
        // later.
        let deadline = Instant::now() + Duration::from_secs(3);
        let veths = loop {
            let left = self
                .pods
                .iter()
                .filter(|p| Path::new(&format!("/sys/class/net/{}", p.host_if)).exists())
                .count();
            if left == 0 || Instant::now() >= deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        json!({
            "del_errors": del_errors,
            "host_local_allocations": allocations,
            "host_veths": veths,
        })
    }
}

impl Drop for PtpPods {
    fn drop(&mut self) {
        let left = self.teardown();
        if !left.is_null()
            && (left["host_local_allocations"] != 0
                || left["host_veths"] != 0
                || left["del_errors"].as_array().is_some_and(|e| !e.is_empty()))
        {
            eprintln!("moat-bench: ptp pods left behind: {left}");
        }
    }
}
