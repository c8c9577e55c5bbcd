//! Quarantine end to end on the real kernel, through the real moatctl: quarantining a pod sets
//! its endpoint entry's quarantine flag and deletes its connection tracking entries (its own
//! and those linked to it), the quarantine survives a moatd restart, `release` clears it, and
//! the `moat.io/quarantine` annotation quarantines while present. (That the datapath then
//! drops the pod's traffic is tested with real traffic in the datapath's tests.)

mod support_moatd;

use std::{net::IpAddr, process::Command, time::Duration};

use moat_common::{ENDPOINT_FLAG_QUARANTINED, FAMILY_V4, PROTO_TCP, ThreatEvent, raw_v4, threat};
use moat_datapath::Maps;
use moat_testkit::lab::{Lab, LabPod, probe};
use moatd::{
    api::{DaemonStatus, EndpointSpec, EndpointStatus, QuarantineResult, Request, Response},
    daemon::{Daemon as InProcess, DaemonConfig, DatastoreConfig, Routing},
    flows::JournalConfig,
    threats::{Response as ThreatResponse, ThreatPolicy},
};
use support_moatd::{Env, LONG, register};

fn pod_yaml(name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: qt\n  labels:\n    app: {name}\n{annotations}---\n"
    )
}

fn pods(annotated: bool) -> String {
    let annotation = if annotated {
        "  annotations:\n    moat.io/quarantine: \"true\"\n"
    } else {
        ""
    };
    pod_yaml("web", "") + &pod_yaml("client", "") + &pod_yaml("tagged", annotation)
}

fn moatctl(env: &Env, args: &[&str]) -> String {
    env.moatctl(args)
}

fn flag_set(env: &Env, pod: &LabPod) -> bool {
    let maps = Maps::open(&env.pins()).unwrap();
    let entry = maps.endpoint(pod.ifindex).expect("endpoint entry");
    entry.flags & ENDPOINT_FLAG_QUARANTINED != 0
}

/// Conntrack entries of the pod's own, or linked to it.
fn connections_of(env: &Env, pod: &LabPod) -> usize {
    let maps = Maps::open(&env.pins()).unwrap();
    maps.conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| k.ifindex == pod.ifindex || v.peer_ifindex == pod.ifindex)
        .count()
}

fn endpoint(env: &Env, name: &str) -> EndpointStatus {
    let all: Vec<EndpointStatus> =
        serde_json::from_str(&moatctl(env, &["-o", "json", "endpoint", "list"])).unwrap();
    all.into_iter()
        .find(|e| e.spec.pod_name == name)
        .unwrap_or_else(|| panic!("no endpoint {name}"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

#[test]
fn quarantine_flags_the_endpoint_cuts_its_connections_survives_restart_and_releases() {
    let env = Env::new("qtn");
    env.write("pods.yaml", &pods(false));
    let mut daemon = env.start();
    let mut lab = Lab::new("qtn").unwrap();
    let web = lab.add_pod("web").unwrap();
    let client = lab.add_pod("client").unwrap();
    let tagged = lab.add_pod("tagged").unwrap();
    let _server = probe::EchoServer::start(&web, 8080).unwrap();
    for pod in [&web, &client, &tagged] {
        register(&env, pod, "qt");
    }

    // Established state the quarantine must cut: the client's connections to web.
    assert!(probe::tcp(&client, IpAddr::V4(web.v4), 8080, LONG));
    assert!(probe::udp(&client, IpAddr::V4(web.v4), 8080, LONG));
    assert!(
        connections_of(&env, &client) > 0,
        "no conntrack entries to cut"
    );
    assert!(!flag_set(&env, &client));

    let answer: QuarantineResult =
        serde_json::from_str(&moatctl(&env, &["-o", "json", "quarantine", "qt/client"])).unwrap();
    assert!(answer.quarantined);
    assert_eq!(answer.endpoints, 1);
    assert!(answer.connections_cut > 0, "{answer:?}");
    assert_eq!(answer.info.as_ref().unwrap().reason, "manual");
    assert!(flag_set(&env, &client));
    assert_eq!(
        connections_of(&env, &client),
        0,
        "connections survived quarantine"
    );
    assert!(!flag_set(&env, &web), "only the quarantined pod is flagged");
    assert_eq!(
        endpoint(&env, "client").quarantine.map(|q| q.reason),
        Some("manual".into())
    );
    let table = moatctl(&env, &["endpoint", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("qt/client") && l.contains("manual")),
        "{table}"
    );
    // Unknown pods are refused, not recorded.
    let refused = Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .arg("--socket")
        .arg(env.socket())
        .args(["quarantine", "qt/nobody"])
        .output()
        .unwrap();
    assert!(!refused.status.success());

    // A restarted moatd keeps the quarantine (and rewrites every endpoint entry with it).
    daemon.kill();
    let mut daemon = env.start();
    assert!(flag_set(&env, &client), "quarantine lost across a restart");
    let status: DaemonStatus =
        serde_json::from_str(&moatctl(&env, &["-o", "json", "status"])).unwrap();
    assert_eq!(status.quarantined["qt/client"].reason, "manual");
    // A policy change rewrites endpoint entries (lookup hints): the flag stays.
    env.write(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: qt}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n",
    );
    moatctl(&env, &["reload"]);
    assert!(
        flag_set(&env, &client),
        "a rewrite of the entry lost the flag"
    );

    let released: QuarantineResult =
        serde_json::from_str(&moatctl(&env, &["-o", "json", "release", "qt/client"])).unwrap();
    assert!(!released.quarantined);
    assert!(!flag_set(&env, &client));
    assert_eq!(endpoint(&env, "client").quarantine, None);

    // The annotation quarantines while present.
    env.write("pods.yaml", &pods(true));
    wait_until("the annotated pod is flagged", || flag_set(&env, &tagged));
    assert_eq!(
        endpoint(&env, "tagged").quarantine.map(|q| q.reason),
        Some("annotation".into())
    );
    env.write("pods.yaml", &pods(false));
    wait_until("the annotation's removal clears the flag", || {
        !flag_set(&env, &tagged)
    });

    daemon.kill();
    for pod in [&web, &client, &tagged] {
        let _ = moat_datapath::detach_endpoint(&env.pins(), &pod.host_if);
    }
    drop(lab);
}

fn in_process(env: &Env) -> InProcess {
    InProcess::start(DaemonConfig {
        state_dir: env.root().join("state"),
        policy_dir: env.policies(),
        socket: env.root().join("unused.sock"),
        pending_dir: env.pending(),
        pin_root: env.pin_root().to_path_buf(),
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        journal: JournalConfig::new(env.root().join("flows")),
        datastore: DatastoreConfig::Local,
        node_name: String::new(),
        routing: Routing::None,
        // Shares the host's network namespace with other runs: no host-wide rules.
        judge_after_dnat: false,
        map_sizes: Default::default(),
    })
    .unwrap()
}

fn register_in_process(daemon: &mut InProcess, pod: &LabPod) {
    let endpoint = EndpointSpec {
        container_id: format!("cid-{}", pod.name),
        ifname: "eth0".into(),
        netns: format!("/run/netns/{}", pod.netns),
        host_ifname: pod.host_if.clone(),
        host_ifindex: pod.ifindex,
        ips: pod.addrs().to_vec(),
        pod_namespace: "qt".into(),
        pod_name: pod.name.clone(),
        pod_uid: None,
    };
    match daemon.handle(Request::Register { endpoint }) {
        Response::Registered(_) => {}
        other => panic!("{other:?}"),
    }
}

/// A detection whose response is `quarantine` quarantines its source pod (the datapath's
/// report is handed to the daemon as the reader thread does), and is journaled with what
/// was done; one whose response is `log` only records.
#[test]
fn a_detector_set_to_quarantine_quarantines_its_local_source_pod() {
    let env = Env::new("qtd");
    env.write("pods.yaml", &pods(false));
    let mut lab = Lab::new("qtd").unwrap();
    let scanner = lab.add_pod("client").unwrap();
    let victim = lab.add_pod("web").unwrap();
    let mut daemon = in_process(&env);
    for pod in [&scanner, &victim] {
        register_in_process(&mut daemon, pod);
    }
    let mut policy = ThreatPolicy::default();
    policy.responses[threat::PORT_SCAN as usize] = ThreatResponse::Quarantine;
    daemon.configure_threats(policy.clone());
    // The detectors' settings are in the datapath, as moatd's defaults say.
    let written = moat_datapath::threats::ThreatConfigMap::open(&env.pins())
        .unwrap()
        .read()
        .unwrap();
    assert_eq!(written, policy.datapath_config());
    assert_eq!(daemon.status().threat_detection, "on");

    let scan = ThreatEvent {
        kind: threat::PORT_SCAN,
        family: FAMILY_V4,
        proto: PROTO_TCP,
        src: [raw_v4(scanner.v4), 0, 0, 0],
        dst: [raw_v4(victim.v4), 0, 0, 0],
        ifindex: scanner.ifindex,
        count: 40,
        marks: 38,
        sketch_bits: 30,
        samples: [22 | 23 << 16, 80, 0, 0],
        ..Default::default()
    };
    let record = daemon.report_threat(&scan, 0, moatd::flows::now_ms());
    assert_eq!(record.source_pod.as_deref(), Some("qt/client"));
    assert_eq!(record.destination_pod.as_deref(), Some("qt/web"));
    assert_eq!(record.response, "quarantine");
    assert!(
        record
            .action
            .as_deref()
            .unwrap()
            .starts_with("quarantined qt/client"),
        "{record:?}"
    );
    assert!(flag_set(&env, &scanner));
    assert!(!flag_set(&env, &victim));
    let Response::Endpoints { endpoints } = daemon.handle(Request::ListEndpoints) else {
        panic!()
    };
    let q = endpoints
        .iter()
        .find(|e| e.spec.pod_name == "client")
        .and_then(|e| e.quarantine.clone())
        .unwrap();
    assert_eq!(q.reason, "port-scan");
    assert!(q.detail.unwrap().contains("38 refused"));

    // A log-only detector records without quarantining.
    let flood = ThreatEvent {
        kind: threat::SYN_FLOOD,
        src: [raw_v4(victim.v4), 0, 0, 0],
        ..scan
    };
    let logged = daemon.report_threat(&flood, 0, moatd::flows::now_ms());
    assert_eq!((logged.response.as_str(), logged.action), ("log", None));
    assert!(!flag_set(&env, &victim));

    let Response::Threats { threats } = daemon.handle(Request::Threats { limit: None }) else {
        panic!()
    };
    let kinds: Vec<&str> = threats.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(kinds, ["port-scan", "syn-flood"]);
    let Response::Threats { threats } = daemon.handle(Request::Threats { limit: Some(1) }) else {
        panic!()
    };
    assert_eq!(threats[0].kind, "syn-flood");

    // Both survive a restart: the quarantine in the maps, the detections in the journal.
    drop(daemon);
    let mut daemon = in_process(&env);
    assert!(flag_set(&env, &scanner));
    let Response::Threats { threats } = daemon.handle(Request::Threats { limit: None }) else {
        panic!()
    };
    assert_eq!(threats.len(), 2);
    drop(daemon);
    drop(lab);
}
