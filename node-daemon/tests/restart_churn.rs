//! Restart under load: pods churn through the real moat-cni (standalone, moat-ipam) while
//! moatd is killed with -9 and restarted again and again, and probes run the whole time.
//!
//! Asserted:
//! - a denied probe (intruder -> server) never passes;
//! - an established allowed connection (client -> server) survives every kill and restart;
//! - new allowed connections keep passing (the maps keep enforcing while moatd is down);
//! - afterwards, the pinned maps equal a from-scratch build of the state (a fresh Daemon's
//!   first reconcile has nothing to write);
//! - after the last DELs, no veth, IPAM allocation, pinned link or endpoint entry is left.
//!
//! ADDs that land while moatd is down fail (moat-cni never fails open) and are rolled back;
//! the churn loop then sends DEL, as a runtime does after a failed ADD, and DELs while moatd
//! is down are queued for its return.

mod support_cni;
mod support_moatd;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use moat_datapath::attach::attached_interfaces;
use moat_testkit::lab::{LabPod, probe};
use moatd::{
    daemon::{Daemon as InProcess, DaemonConfig, DatastoreConfig, Routing},
    flows::JournalConfig,
};
use serde_json::{Value, json};
use support_moatd::Env;

const NETWORK: &str = "restart-churn";
const CHURN_SLOTS: usize = 6;
const KILLS: usize = 5;

struct Cni {
    bin: PathBuf,
    conf: Value,
}

struct CniPod {
    name: String,
    netns: String,
}

impl Cni {
    fn new(env: &Env) -> Self {
        let mut conf = env.standalone_conf(
            NETWORK,
            json!([[{"subnet": "10.94.0.0/24"}], [{"subnet": "fd94::/64"}]]),
        );
        conf["registrationTimeoutMs"] = 5000.into();
        Self {
            bin: support_cni::cni_path(env.root()),
            conf,
        }
    }

    /// Runs moat-cni; Ok(result) on success, Err(output) on a CNI error.
    fn run(&self, command: &str, pod: &CniPod) -> Result<Value, String> {
        let container_id = format!("rc-{}", pod.name);
        let call = support_cni::CniPod {
            container_id: &container_id,
            netns: &pod.netns,
            namespace: "rc",
            name: &pod.name,
        };
        support_cni::run(None, &self.bin, &self.conf, command, &call)
    }
}

fn result_ip(result: &Value, v6: bool) -> IpAddr {
    support_cni::result_ip(result, v6).unwrap_or_else(|| panic!("no address in {result}"))
}

fn host_if(result: &Value) -> String {
    result["interfaces"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i.get("sandbox").is_none()))
        .and_then(|i| i["name"].as_str())
        .unwrap_or_else(|| panic!("no host interface in {result}"))
        .to_string()
}

fn ipam_allocations(dir: &Path) -> usize {
    match std::fs::read_to_string(dir.join(NETWORK).join("state.json")) {
        Ok(text) => {
            let state: Value = serde_json::from_str(&text).unwrap();
            state["allocations"].as_array().map_or(0, Vec::len)
        }
        Err(_) => 0,
    }
}

/// Namespaces of the test, deleted on drop (also when an assertion fails).
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn pods_yaml() -> String {
    let mut out = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: rc\n  labels: {kubernetes.io/metadata.name: rc}\n".to_string();
    let mut pod = |name: &str, app: &str| {
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: rc\n  labels: {{app: {app}}}\n"
        );
    };
    pod("client", "client");
    pod("intruder", "intruder");
    pod("server", "server");
    for i in 0..CHURN_SLOTS {
        // Half the churn joins the client's identity, half brings identities of its own.
        if i.is_multiple_of(2) {
            pod(&format!("churn-{i}"), "client");
        } else {
            pod(&format!("churn-{i}"), &format!("churn-{i}"));
        }
    }
    out
}

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: server-from-client\n  namespace: rc\nspec:\n  podSelector:\n    matchLabels: {app: server}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: client}\n    ports:\n    - {port: 8080, protocol: TCP}\n";

#[test]
fn kill_9_under_churn_never_gives_a_wrong_verdict_and_leaves_nothing() {
    let env = Env::new("rc");
    env.write("00-pods.yaml", &pods_yaml());
    env.write("10-policy.yaml", POLICY);
    let mut daemon = env.start();
    let cni = Cni::new(&env);
    let tag = std::process::id() % 100_000;
    let mut namespaces = Netns(Vec::new());
    let mut fixed = Vec::new();
    for name in ["client", "intruder", "server"] {
        let netns = format!("rc{tag}{name}");
        Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .unwrap();
        namespaces.0.push(netns.clone());
        let pod = CniPod {
            name: name.into(),
            netns: netns.clone(),
        };
        let result = cni.run("ADD", &pod).expect("ADD with moatd up");
        let (IpAddr::V4(v4), IpAddr::V6(v6)) =
            (result_ip(&result, false), result_ip(&result, true))
        else {
            unreachable!()
        };
        fixed.push((
            pod,
            LabPod {
                name: name.into(),
                netns,
                host_if: host_if(&result),
                ifindex: 0,
                v4,
                v6,
            },
        ));
    }
    for i in 0..CHURN_SLOTS {
        let netns = format!("rc{tag}c{i}");
        Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .unwrap();
        namespaces.0.push(netns);
    }
    let (client, intruder, server) = (fixed[0].1.clone(), fixed[1].1.clone(), fixed[2].1.clone());
    let _echo = probe::EchoServer::start(&server, 8080).unwrap();
    let server_v4 = IpAddr::V4(server.v4);
    let server_v6 = IpAddr::V6(server.v6);
    assert!(probe::tcp(&client, server_v4, 8080, Duration::from_secs(2)));
    assert!(!probe::tcp(
        &intruder,
        server_v4,
        8080,
        Duration::from_millis(500)
    ));

    // The established connection: one exchange every 50 ms for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicUsize::new(0));
    let mut stream = client
        .run(move || {
            TcpStream::connect_timeout(&SocketAddr::new(server_v4, 8080), Duration::from_secs(2))
        })
        .unwrap()
        .expect("established connection");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let established = {
        let (stop, exchanges) = (stop.clone(), exchanges.clone());
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::SeqCst) {
                let mut buf = [0u8; 4];
                stream
                    .write_all(b"ping")
                    .map_err(|e| format!("write: {e}"))?;
                stream
                    .read_exact(&mut buf)
                    .map_err(|e| format!("read: {e}"))?;
                if &buf != b"ping" {
                    return Err(format!("echo {buf:?}"));
                }
                exchanges.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
    };

    // New connections: denied ones must never pass, allowed ones must keep passing.
    let prober = {
        let stop = stop.clone();
        let (client, intruder) = (client.clone(), intruder.clone());
        std::thread::spawn(move || {
            let (mut denied_passed, mut allowed_failed, mut probes) = (0, 0, 0);
            let mut round = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let to = if round.is_multiple_of(2) {
                    server_v4
                } else {
                    server_v6
                };
                round += 1;
                if probe::tcp(&intruder, to, 8080, Duration::from_millis(300)) {
                    denied_passed += 1;
                }
                if !probe::tcp(&client, to, 8080, Duration::from_secs(3)) {
                    allowed_failed += 1;
                }
                probes += 2;
            }
            (denied_passed, allowed_failed, probes)
        })
    };

    // Pod churn through moat-cni.
    let churn = {
        let stop = stop.clone();
        let conf = cni.conf.clone();
        let bin = cni.bin.clone();
        std::thread::spawn(move || {
            let cni = Cni { bin, conf };
            let (mut added, mut refused, mut i) = (0, 0, 0usize);
            while !stop.load(Ordering::SeqCst) {
                let slot = i % CHURN_SLOTS;
                i += 1;
                let pod = CniPod {
                    name: format!("churn-{slot}"),
                    netns: format!("rc{tag}c{slot}"),
                };
                match cni.run("ADD", &pod) {
                    Ok(_) => added += 1,
                    Err(_) => refused += 1,
                }
                cni.run("DEL", &pod).expect("DEL never fails");
            }
            (added, refused)
        })
    };

    let mut rng = moat_testkit::synthetic::Rng::new(u64::from(tag));
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(400 + rng.below(600) as u64));
        daemon.kill();
        std::thread::sleep(Duration::from_millis(100 + rng.below(500) as u64));
        daemon = env.start();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let established = established.join().unwrap();
    let (denied_passed, allowed_failed, probes) = prober.join().unwrap();
    let (added, refused) = churn.join().unwrap();
    eprintln!(
        "restart_churn: {KILLS} kills, {probes} probes, {} exchanges, churn {added} ADDs ok / {refused} refused",
        exchanges.load(Ordering::SeqCst)
    );
    assert_eq!(established, Ok(()), "the established connection broke");
    assert_eq!(denied_passed, 0, "denied probes that passed");
    assert_eq!(allowed_failed, 0, "allowed probes that failed");
    assert!(added > 0, "the churn added pods");

    // The maps equal a from-scratch build: a fresh daemon's first reconcile writes nothing.
    // (Queued DELs were processed by the running moatd; it is stopped first.)
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill();
    let fresh = InProcess::start(DaemonConfig {
        state_dir: env.root().join("state"),
        policy_dir: env.policies(),
        socket: env.root().join("unused.sock"),
        pending_dir: env.pending(),
        pin_root: env.pin_root().to_path_buf(),
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        journal: JournalConfig::new(env.root().join("flows-check")),
        datastore: DatastoreConfig::Local,
        node_name: String::new(),
        routing: Routing::None,
        // Shares the host's network namespace with other runs: no host-wide rules.
        judge_after_dnat: false,
        map_sizes: Default::default(),
    })
    .unwrap();
    assert_eq!(
        fresh.start_stats,
        Default::default(),
        "the maps differ from a from-scratch build"
    );
    assert_eq!(fresh.status().endpoints, 3, "only the fixed pods are left");
    drop(fresh);

    // Nothing leaks once the fixed pods go too.
    let _daemon = env.start();
    for (pod, _) in &fixed {
        cni.run("DEL", pod).expect("DEL");
    }
    assert_eq!(env.status().endpoints, 0);
    assert_eq!(
        ipam_allocations(&env.root().join("ipam")),
        0,
        "IPAM allocations"
    );
    assert_eq!(
        attached_interfaces(&env.pins()).unwrap(),
        Vec::<String>::new()
    );
    // moatd deletes a DELed pod's veth in the background (the kernel's teardown of a veth
    // with TCX programs takes tens of milliseconds); bounded wait.
    let ours = || -> Vec<String> {
        let links = Command::new("ip")
            .args(["-o", "link", "show", "type", "veth"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&links.stdout)
            .lines()
            .filter(|l| {
                namespaces
                    .0
                    .iter()
                    .any(|ns| l.contains(&format!("link-netns {ns}")))
            })
            .map(str::to_string)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ours().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = ours();
    assert!(left.is_empty(), "veths left: {left:?}");
}
