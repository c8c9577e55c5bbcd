//! Threat detection with real attack tools against real pods: nmap and hping3 run inside an
//! attacker pod's network namespace, moatd's datapath detects in the kernel, and the
//! detection is read back through `moatctl threats -o json`. Quarantine is checked with real
//! traffic: the scanner's established connection stops, its new connections fail, its DNS
//! still works, and `release` restores it.
//!
//! For many nodes: every detector keys by addresses and counts at the hook that sees the
//! flow first, so a scanner on another node is counted at the victims' hooks on this node
//! exactly as a local one is at its own (the remote-source branch is the same code with the
//! prober's address from the packet). These tests run the local case only.

mod support_moatd;

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use moat_testkit::lab::{Lab, LabPod, probe};
use moatd::api::ThreatRecord;
use support_moatd::{Env, LONG, SHORT, register};

const NS: &str = "tt";

fn pods(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels:\n    app: {name}\n---\n"
            )
        })
        .collect()
}

fn moatctl(env: &Env, args: &[&str]) -> String {
    env.moatctl(args)
}

fn threats(env: &Env) -> Vec<ThreatRecord> {
    serde_json::from_str(&moatctl(env, &["-o", "json", "threats"])).unwrap()
}

/// Waits for a detection of `kind` whose source is pod `source`; panics with what was seen.
fn wait_for(env: &Env, kind: &str, source: &str) -> ThreatRecord {
    wait_for_pod(env, kind, source, |t| t.source_pod.as_deref())
}

/// Waits for a detection of `kind` whose `side` (source or destination pod) is `pod`.
fn wait_for_pod(
    env: &Env,
    kind: &str,
    pod: &str,
    side: impl Fn(&ThreatRecord) -> Option<&str>,
) -> ThreatRecord {
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = format!("{NS}/{pod}");
    loop {
        let all = threats(env);
        if let Some(t) = all
            .iter()
            .find(|t| t.kind == kind && side(t) == Some(want.as_str()))
        {
            return t.clone();
        }
        if Instant::now() > deadline {
            panic!("no {kind} detection from {want}; detections: {all:#?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs a tool inside a pod; the tool's own exit status does not matter (scans of closed
/// ports "fail"), only that it ran.
fn run_in(pod: &LabPod, cmd: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns, "sh", "-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.code().is_some(),
        "{cmd} was killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Setup {
    env: Env,
    _daemon: support_moatd::Daemon,
    _lab: Lab,
    attacker: LabPod,
    victim: LabPod,
    resolver: LabPod,
    _servers: Vec<probe::EchoServer>,
}

fn setup(tag: &str, extra_flags: &[&str], policy: Option<&str>) -> Setup {
    let env = Env::new(tag);
    env.write("pods.yaml", &pods(&["attacker", "victim", "resolver"]));
    if let Some(policy) = policy {
        env.write("policy.yaml", policy);
    }
    let daemon = env.start_with(extra_flags);
    let mut lab = Lab::new(tag).unwrap();
    let attacker = lab.add_pod("attacker").unwrap();
    let victim = lab.add_pod("victim").unwrap();
    let resolver = lab.add_pod("resolver").unwrap();
    let servers = vec![
        probe::EchoServer::start(&victim, 9000).unwrap(),
        probe::EchoServer::start(&resolver, 53).unwrap(),
    ];
    for pod in [&attacker, &victim, &resolver] {
        register(&env, pod, NS);
    }
    Setup {
        env,
        _daemon: daemon,
        _lab: lab,
        attacker,
        victim,
        resolver,
        _servers: servers,
    }
}

/// A DNS query for `name` (A, recursion desired) in wire format.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Sends DNS queries for `names` from `pod` to `resolver`:53 (an echo server answers with the
/// query itself, which is all a client needs to see a reply).
fn send_queries(pod: &LabPod, resolver: IpAddr, names: Vec<String>) -> usize {
    pod.run(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(SHORT)).unwrap();
        let mut answered = 0;
        for (i, name) in names.iter().enumerate() {
            socket
                .send_to(&dns_query(i as u16, name), (resolver, 53))
                .unwrap();
            let mut buf = [0u8; 512];
            if socket.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
        answered
    })
    .unwrap()
}

#[test]
fn an_nmap_syn_scan_is_detected_and_quarantine_cuts_the_scanner_but_keeps_its_dns() {
    let s = setup(
        "ttscan",
        &["--threat-port-scan-response", "quarantine"],
        None,
    );
    let victim = IpAddr::V4(s.victim.v4);

    // The scanner's established connection, opened before the scan, on a thread of its own
    // inside the attacker's namespace (it answers one echo now and one on request).
    let (tx_cmd, rx_cmd) = std::sync::mpsc::channel::<()>();
    let (tx_res, rx_res) = std::sync::mpsc::channel::<bool>();
    let attacker = s.attacker.clone();
    let _conn = std::thread::spawn(move || {
        attacker.run(move || {
            let mut stream = TcpStream::connect_timeout(&(victim, 9000).into(), LONG).unwrap();
            stream.set_read_timeout(Some(LONG)).unwrap();
            let echo = |stream: &mut TcpStream| -> bool {
                let mut buf = [0u8; 4];
                stream.write_all(b"ping").is_ok() && stream.read_exact(&mut buf).is_ok()
            };
            let _ = tx_res.send(echo(&mut stream));
            if rx_cmd.recv().is_ok() {
                let _ = tx_res.send(echo(&mut stream));
            }
        })
    });
    assert!(
        rx_res.recv_timeout(LONG).unwrap(),
        "connection did not work before the scan"
    );

    run_in(
        &s.attacker,
        &format!("nmap -sS -Pn -n --max-retries 0 -p 1-200 {}", s.victim.v4),
    );
    let t = wait_for(&s.env, "port-scan", "attacker");
    assert_eq!(t.destination, s.victim.v4.to_string());
    assert!(t.distinct.unwrap_or(0) >= 20, "{t:?}");
    assert!(t.refused.unwrap_or(0) * 2 >= t.count, "{t:?}");
    assert_eq!(t.response, "quarantine");

    // Quarantined: the established connection is cut, new ones fail, DNS still works.
    tx_cmd.send(()).unwrap();
    assert!(
        !rx_res.recv_timeout(Duration::from_secs(10)).unwrap(),
        "the established connection survived the quarantine"
    );
    assert!(!probe::tcp(&s.attacker, victim, 9000, SHORT));
    assert!(probe::udp(&s.attacker, IpAddr::V4(s.resolver.v4), 53, LONG));
    let flows = moatctl(
        &s.env,
        &["flows", "--verdict", "dropped", "--pod", "tt/attacker"],
    );
    assert!(flows.contains("quarantined"), "{flows}");

    moatctl(&s.env, &["release", &format!("{NS}/attacker")]);
    assert!(probe::tcp(&s.attacker, victim, 9000, LONG));
}

#[test]
fn fin_null_xmas_and_udp_scans_are_port_scans() {
    for (i, scan) in ["-sF", "-sN", "-sX", "-sU"].into_iter().enumerate() {
        let s = setup(&format!("ttfx{i}"), &[], None);
        // Linux answers closed UDP ports with ICMP errors at 1 per second by default.
        run_in(&s.victim, "sysctl -qw net.ipv4.icmp_ratelimit=0");
        run_in(
            &s.attacker,
            &format!(
                "nmap {scan} -Pn -n --max-retries 0 -p 1000-1100 {}",
                s.victim.v4
            ),
        );
        let t = wait_for(&s.env, "port-scan", "attacker");
        assert!(t.distinct.unwrap_or(0) >= 20, "{scan}: {t:?}");
    }
}

#[test]
fn an_nmap_ping_sweep_is_a_host_sweep() {
    let s = setup("ttsweep", &[], None);
    let subnet = format!("{}/24", s.victim.v4);
    run_in(
        &s.attacker,
        &format!("nmap -sn -n --max-retries 0 {subnet}"),
    );
    let t = wait_for(&s.env, "host-sweep", "attacker");
    assert!(t.distinct.unwrap_or(0) >= 20, "{t:?}");
    assert!(!t.samples.is_empty(), "{t:?}");
}

#[test]
fn an_hping3_syn_flood_is_detected_at_the_victim() {
    let s = setup("ttflood", &[], None);
    run_in(
        &s.attacker,
        &format!(
            "timeout 5 hping3 -q -S -p 9000 -i u200 -c 3000 {}",
            s.victim.v4
        ),
    );
    // The subject of a SYN flood is its target.
    let t = wait_for_pod(&s.env, "syn-flood", "victim", |t| {
        t.destination_pod.as_deref()
    });
    assert_eq!(t.destination, s.victim.v4.to_string());
    assert_eq!(t.port, 9000);
    assert!(t.half_open.unwrap_or(0) >= 512, "{t:?}");
    // The first sources seen name the flood's source (one here: the attacker).
    assert_eq!(t.source, s.attacker.v4.to_string(), "{t:?}");
    assert_eq!(
        t.source_pod.as_deref(),
        Some(format!("{NS}/attacker").as_str())
    );
    assert_eq!(t.samples, [s.attacker.v4.to_string()]);
}

#[test]
fn scanning_a_pod_policy_isolates_is_policy_probing() {
    let deny = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{app: victim}}}}\n  policyTypes: [Ingress]\n"
    );
    let s = setup("ttprobe", &[], Some(&deny));
    run_in(
        &s.attacker,
        &format!("nmap -sS -Pn -n --max-retries 1 -p 1-100 {}", s.victim.v4),
    );
    let t = wait_for(&s.env, "policy-probing", "attacker");
    assert!(t.count >= 64, "{t:?}");
}

#[test]
fn tunnel_like_dns_names_are_detected_and_ordinary_lookups_are_not() {
    let s = setup("ttdns", &[], None);
    let resolver = IpAddr::V4(s.resolver.v4);
    // Ordinary lookups, many times over: no detection.
    let ordinary: Vec<String> = (0..300)
        .map(|i| format!("svc{}.prod.svc.cluster.local", i % 20))
        .collect();
    assert!(send_queries(&s.attacker, resolver, ordinary) > 250);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        threats(&s.env).is_empty(),
        "ordinary DNS lookups raised {:#?}",
        threats(&s.env)
    );
    // Base32-like 60-character labels, as DNS tunnels encode data.
    let tunnel: Vec<String> = (0..8)
        .map(|i| {
            let label: String = (0..60)
                .map(|j| b"abcdefghijklmnopqrstuvwxyz234567"[(i * 7 + j * 13) % 32] as char)
                .collect();
            format!("{label}.t.example.net")
        })
        .collect();
    send_queries(&s.attacker, resolver, tunnel);
    let t = wait_for(&s.env, "dns-tunnel", "attacker");
    assert!(t.suspicious.unwrap_or(0) >= 5, "{t:?}");
}

#[test]
fn hping3_with_a_forged_source_is_spoofing() {
    let s = setup("ttspoof", &[], None);
    run_in(
        &s.attacker,
        &format!(
            "hping3 -q -S -a 10.99.99.99 -p 9000 -c 3 -i u10000 {}",
            s.victim.v4
        ),
    );
    let t = wait_for(&s.env, "spoofing", "attacker");
    assert_eq!(t.source, "10.99.99.99");
}

#[test]
fn ordinary_traffic_raises_nothing() {
    let s = setup("ttquiet", &[], None);
    let victim = IpAddr::V4(s.victim.v4);
    // Many connections to one service, UDP exchanges, pings both ways.
    for _ in 0..200 {
        assert!(probe::tcp(&s.attacker, victim, 9000, LONG));
    }
    for _ in 0..50 {
        assert!(probe::udp(&s.attacker, victim, 9000, LONG));
        assert!(probe::ping(&s.victim, IpAddr::V4(s.attacker.v4)));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(threats(&s.env).is_empty(), "{:#?}", threats(&s.env));
}
