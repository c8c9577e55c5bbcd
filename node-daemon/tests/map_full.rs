//! Full maps (issue 21 item 5), on a real moatd with small configured maps and real traffic.
//!
//! The policy map: a policy whose entries do not fit is refused whole before anything is
//! written. Its reason is in `moatctl status` and `moat_map_full_refusals_total`; the maps
//! keep enforcing the last state (the allowed client still connects, the pod the refused
//! policy would have admitted still cannot); once the policy is withdrawn the refusal clears
//! and later changes apply again.
//!
//! Conntrack: a flood of allowed new flows (hping3, one UDP flow per destination port) runs
//! the 4,096-entry table through its capacity many times over while an allowed TCP connection
//! exchanges a message every 50 ms: not one exchange fails. A flood the policy denies takes
//! no entry in the receiving pod's table. The fill warning fires for conntrack (log and
//! `moat_map_fill_warning`).
//!
//! For many nodes: the pods are on one node, but what is shown is per node: each node's
//! moatd checks its own maps before writing, and each node's conntrack holds only its own
//! endpoints' flows, whichever node the peer is on.

mod support_moatd;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use moat_datapath::{Maps, fill::map_fill};
use moat_testkit::lab::{Lab, probe};
use support_moatd::{Env, SHORT, register};

const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels:\n    app: web\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: shop\n  labels:\n    app: client\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: flooder\n  namespace: shop\n  labels:\n    app: flooder\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: attacker\n  namespace: shop\n  labels:\n    app: attacker\n";

/// The client on TCP 8080; the flooder on any UDP port.
const WEB_INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web-ingress\n  namespace: shop\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080, protocol: TCP}]\n  - from: [{podSelector: {matchLabels: {app: flooder}}}]\n    ports: [{port: 1, endPort: 65535, protocol: UDP}]\n";

/// The attacker on `ports` (TCP).
fn attacker_policy(ports: impl IntoIterator<Item = u16>) -> String {
    let ports: Vec<String> = ports
        .into_iter()
        .map(|p| format!("{{port: {p}, protocol: TCP}}"))
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web-from-attacker\n  namespace: shop\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: attacker}}}}}}]\n    ports: [{}]\n",
        ports.join(", ")
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of GET /metrics.
fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// The value of the series `series` (name and labels, exactly as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn policy_entries(env: &Env) -> usize {
    Maps::open(&env.pins()).unwrap().policy.iter().count()
}

#[test]
fn a_policy_that_would_overflow_the_policy_map_is_refused_whole_and_the_last_state_keeps_enforcing()
{
    let env = Env::new("mfpol");
    env.write("pods.yaml", PODS);
    env.write("web.yaml", WEB_INGRESS);
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _daemon = env.start_with(&["--map-size", "policy=64", "--metrics-addr", &metrics_addr]);
    let mut lab = Lab::new("mfpol").unwrap();
    let web = lab.add_pod("web").unwrap();
    let client = lab.add_pod("client").unwrap();
    let attacker = lab.add_pod("attacker").unwrap();
    for pod in [&web, &client, &attacker] {
        register(&env, pod, "shop");
    }
    let _echo = probe::EchoServer::start(&web, 8080).unwrap();
    let to_web = IpAddr::V4(web.v4);
    assert!(probe::tcp(&client, to_web, 8080, SHORT));
    assert!(!probe::tcp(&attacker, to_web, 8080, SHORT));
    let before = policy_entries(&env);
    assert!(before < 64, "the base state fits: {before}");

    // 100 ports for the attacker: 100 more entries than the 64-entry map can take.
    env.write("big.yaml", &attacker_policy((9000..9099).chain([8080])));
    wait_for("the refusal in status", Duration::from_secs(10), || {
        env.status()
            .rejected
            .iter()
            .any(|r| r.contains("MOAT_POLICY") && r.contains("--map-size policy="))
    });
    let status = env.moatctl(&["status"]);
    assert!(status.contains("MOAT_POLICY"), "{status}");
    assert_eq!(
        policy_entries(&env),
        before,
        "nothing of the change written"
    );
    assert!(
        !probe::tcp(&attacker, to_web, 8080, SHORT),
        "no part of the refused policy enforces"
    );
    assert!(
        probe::tcp(&client, to_web, 8080, SHORT),
        "the last state keeps enforcing"
    );
    let metrics = scrape(metrics_port);
    let refusals = sample(
        &metrics,
        "moat_map_full_refusals_total{map=\"MOAT_POLICY\"}",
    );
    assert!(refusals.is_some_and(|n| n >= 1.0), "{metrics}");

    // Withdrawn: the refusal clears; a policy that fits applies.
    std::fs::remove_file(env.policies().join("big.yaml")).unwrap();
    wait_for("the refusal to clear", Duration::from_secs(10), || {
        !env.status()
            .rejected
            .iter()
            .any(|r| r.contains("MOAT_POLICY"))
    });
    env.write("small.yaml", &attacker_policy([8080]));
    wait_for("the small policy to apply", Duration::from_secs(10), || {
        probe::tcp(&attacker, to_web, 8080, SHORT)
    });
    assert!(probe::tcp(&client, to_web, 8080, SHORT));
}

/// Sends `count` UDP packets from `pod` to `to`, one destination port each from port 1.
fn hping_udp_sweep(netns: &str, to: IpAddr, count: u32) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "hping3", "--udp", "-p", "++1"])
        .args(["-i", "u100", "-c", &count.to_string(), &to.to_string()])
        .output()
        .expect("hping3 (scripts/bootstrap.sh installs it)");
    // hping3 exits 1 when nothing answered; it must at least have sent.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("packets transmitted"),
        "hping3 did not run: {stderr}"
    );
}

#[test]
fn a_conntrack_flood_keeps_allowed_established_flows_and_denied_floods_take_no_entries() {
    let env = Env::new("mfct");
    env.write("pods.yaml", PODS);
    env.write("web.yaml", WEB_INGRESS);
    let metrics_port = free_port();
    let log = env.root().join("moatd.log");
    let _daemon = env.spawn_and_wait(
        env.moatd_command(None)
            .args(["--map-size", "conntrack=4096", "--fill-check-interval=1s"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .log_to(&log),
    );
    let mut lab = Lab::new("mfct").unwrap();
    let web = lab.add_pod("web").unwrap();
    let client = lab.add_pod("client").unwrap();
    let flooder = lab.add_pod("flooder").unwrap();
    let attacker = lab.add_pod("attacker").unwrap();
    for pod in [&web, &client, &flooder, &attacker] {
        register(&env, pod, "shop");
    }
    let _echo = probe::EchoServer::start(&web, 8080).unwrap();
    let to_web = IpAddr::V4(web.v4);

    // The established flow: one connection, a message and its echo every 50 ms.
    let stream = client
        .run(move || TcpStream::connect_timeout(&SocketAddr::new(to_web, 8080), SHORT))
        .unwrap()
        .expect("the client connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (exchanged, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let talker = {
        let (stop, exchanged, failed) = (stop.clone(), exchanged.clone(), failed.clone());
        let mut stream = stream;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4];
            while !stop.load(Ordering::SeqCst) {
                let ok = stream.write_all(b"ping").is_ok()
                    && stream.read_exact(&mut buf).is_ok()
                    && &buf == b"ping";
                if ok {
                    exchanged.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // 6,000 allowed flows through a 4,096-entry table (each is an entry in the flooder's and
    // in the web pod's view), then 2,000 denied ones. (An LRU map never reports all of its
    // capacity in use: each CPU keeps a batch of free entries of its own.)
    hping_udp_sweep(&flooder.netns, to_web, 6000);
    let pins = env.pins();
    let ct = map_fill(&pins)
        .into_iter()
        .find(|f| f.name == "conntrack")
        .unwrap();
    assert_eq!(ct.capacity, 4096);
    assert!(
        ct.entries * 10 >= ct.capacity * 8,
        "the flood filled the table: {ct:?}"
    );
    hping_udp_sweep(&attacker.netns, to_web, 2000);

    stop.store(true, Ordering::SeqCst);
    talker.join().unwrap();
    let (exchanged, failed) = (
        exchanged.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
    );
    assert_eq!(
        failed, 0,
        "the established connection broke after {exchanged}"
    );
    assert!(exchanged >= 10, "it ran through the floods: {exchanged}");

    // The web pod's table holds nothing of the denied flood.
    let attacker_raw = u32::from_ne_bytes(attacker.v4.octets());
    let denied_entries = Maps::open(&pins)
        .unwrap()
        .conntrack_entries(Some(web.ifindex))
        .into_iter()
        .filter(|(k, _)| k.saddr[0] == attacker_raw || k.daddr[0] == attacker_raw)
        .count();
    assert_eq!(denied_entries, 0);
    // New allowed connections still open.
    assert!(probe::tcp(&client, to_web, 8080, SHORT));

    wait_for("the fill warning", Duration::from_secs(10), || {
        sample(
            &scrape(metrics_port),
            "moat_map_fill_warning{map=\"conntrack\"}",
        ) == Some(1.0)
    });
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("conntrack") && l.contains("full (warning at 80%)")),
        "{logged}"
    );
}
