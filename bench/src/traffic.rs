//! Real traffic between two lab pods (network namespaces routed through the host), under each
//! configuration: TCP ping-pong latency (sockperf), new connections per second (a Rust loop in
//! the client pod), and bulk throughput (iperf3).

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
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
use moat_testkit::lab::LabPod;

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
}

pub const CONFIGS: [Config; 5] = [
    Config::None,
    Config::Moat1,
    Config::Moat100k,
    Config::Moat100kHostStack,
    Config::Iptables10k,
];

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Moat1 => "moat_1",
            Config::Moat100k => "moat_100k",
            Config::Moat100kHostStack => "moat_100k_host_stack",
            Config::Iptables10k => "iptables_10k",
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

pub fn apply(config: Config, s: &Setup) -> Result<Applied> {
    let ifs = [s.client.host_if.as_str(), s.server.host_if.as_str()];
    for pins in [s.small, s.large] {
        set_local_via_host(pins, config == Config::Moat100kHostStack)?;
    }
    Ok(match config {
        Config::None => Applied {
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

pub fn iperf_client_args(client: &LabPod, server: &LabPod, secs: u64) -> Vec<String> {
    [
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
    .collect()
}

/// Gbit/s received by the server (end.sum_received.bits_per_second).
pub fn throughput(client: &LabPod, server: &LabPod, secs: u64) -> Result<f64> {
    let args = iperf_client_args(client, server, secs);
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
