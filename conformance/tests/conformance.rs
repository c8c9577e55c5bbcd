//! moat-conformance end to end: the whole shared file through the pure engine, and a diverse
//! subset of cases through the real datapath (pods, moatd, eBPF), to pod IPs, through
//! per-pod ClusterIP Services, and through Services whose backends are all on a second node
//! (two node namespaces, a moatd each); the runner also fails any probe whose outcome `moatctl trace`
//! (the engine's explanation, cross-checked with the maps) does not predict. A doctored file
//! checks that the runner really detects wrong expectations and rejected objects (a runner
//! that always passes would pass nothing here).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_moat-conformance");
const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/cases/netpol-cases.json");
/// The upstream ClusterNetworkPolicy conformance tests, translated (Admin and Baseline tiers
/// mixed with NetworkPolicies).
const CNP_CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/cases/cnp-cases.json");

/// Datapath runs one at a time: they share the node's CPUs and netfilter.
static NODE: Mutex<()> = Mutex::new(());

/// Diverse: default-deny ingress; a pod label change; TCP+UDP with an any-port rule; egress
/// ipBlock with except (IP placeholders, a /4 with host bits set); cyclonus egress named port
/// over TCP/UDP/SCTP.
const SUBSET: &[&str] = &[
    "k8s-e2e-001",
    "k8s-e2e-029",
    "k8s-e2e-035",
    "k8s-e2e-043",
    "cyclonus-014",
];

struct Run {
    code: i32,
    stdout: String,
    counts: (usize, usize, usize),
}

fn parse_counts(stdout: &str) -> (usize, usize, usize) {
    let last = stdout.lines().last().unwrap_or_default();
    let n: Vec<usize> = last
        .split(", ")
        .map(|part| {
            part.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("last line is not the summary: {last:?}"))
        })
        .collect();
    assert!(
        last.ends_with(" skipped") && n.len() == 3,
        "summary line: {last:?}"
    );
    (n[0], n[1], n[2])
}

/// moatd from the same target directory and profile; built if this test run did not build it.
fn moatd() -> PathBuf {
    let dir = Path::new(BIN).parent().unwrap().to_path_buf();
    let moatd = dir.join("moatd");
    if !moatd.is_file() {
        let target_dir = dir.parent().unwrap();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "moat-node-daemon", "--bin", "moatd"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for moatd");
        assert!(status.success(), "building moatd failed");
    }
    moatd
}

fn run(args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("running moat-conformance");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("$ moat-conformance {}\n{stdout}{stderr}", args.join(" "));
    Run {
        code: out.status.code().unwrap_or(-1),
        counts: parse_counts(&stdout),
        stdout,
    }
}

fn load() -> Value {
    let text = std::fs::read_to_string(CASES).unwrap_or_else(|e| {
        panic!("{CASES}: {e}. The shared/ directory must sit next to the repository.")
    });
    serde_json::from_str(&text).unwrap()
}

fn probes_of(doc: &Value, ids: &[&str]) -> Vec<Value> {
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| ids.is_empty() || ids.contains(&c["id"].as_str().unwrap()))
        .flat_map(|c| c["probes"].as_array().unwrap().clone())
        .collect()
}

fn sctp_supported() -> bool {
    // SAFETY: plain socket(2)/close(2).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 132);
        if fd >= 0 {
            libc::close(fd);
        }
        fd >= 0
    }
}

#[test]
fn offline_whole_file() {
    let doc = load();
    let total = probes_of(&doc, &[]).len();
    let r = run(&["--offline"]);
    let (passed, failed, skipped) = r.counts;
    assert_eq!(r.code, 0, "offline run failed");
    assert_eq!(failed, 0);
    assert_eq!(passed + skipped, total);
    assert!(
        !r.stdout.contains("SCTP not supported"),
        "offline never skips SCTP"
    );
}

/// `mode`: the runner's flag choosing where probes go (none: through per-pod Services to
/// the pod on this node).
fn datapath_subset(mode: Option<&str>) {
    let _serial = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let doc = load();
    let probes = probes_of(&doc, SUBSET);
    let sctp = probes.iter().filter(|p| p["protocol"] == "SCTP").count();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let moatd = moatd();
    let mut args = vec![
        "--moatd",
        moatd.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend(mode);
    for id in SUBSET {
        args.extend(["--filter", id]);
    }
    let r = run(&args);
    let (passed, failed, skipped) = r.counts;
    assert_eq!(failed, 0, "failed probes");
    assert_eq!(r.code, 0);
    assert_eq!(passed + skipped, probes.len());
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["cases_run"], SUBSET.len());
    // SCTP is never reported as passed where the kernel cannot open SCTP sockets.
    if !sctp_supported() {
        let sctp_skipped: u64 = report["skipped_by_reason"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains("SCTP"))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum();
        assert_eq!(sctp_skipped as usize, sctp);
    }
    // Everything else that is skipped is a loopback probe (reported, not failed).
    let loopback = probes.iter().filter(|p| p["loopback"] == true).count();
    assert!(skipped - sctp.min(skipped) <= loopback);
    // Nothing left behind: no Services chain of a run that has ended.
    let nat = Command::new("iptables")
        .args(["-w", "-t", "nat", "-S"])
        .output()
        .unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout);
    for line in nat.lines() {
        if let Some(pid) = line.strip_prefix("-N MOAT-CONFORMANCE-SVC-") {
            assert!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "a Services chain was left behind:\n{nat}"
            );
        }
    }
}

#[test]
fn datapath_subset_direct() {
    datapath_subset(Some("--direct"));
}

#[test]
fn datapath_subset_through_services() {
    datapath_subset(None);
}

/// Every Service's backend on another node: the clients' node judges their egress after
/// DNAT (the real destination is a remote pod it knows only from the datastore), the
/// backends' node judges ingress from clients it knows only from the datastore, and
/// `moatctl trace` to each Service address names the remote backend and the verdict.
#[test]
fn datapath_subset_remote_backends() {
    datapath_subset(Some("--remote-backends"));
}

/// Inverted expectations must fail probe by probe, and a policy moatd rejects must fail its
/// case with the reason.
#[test]
fn wrong_expectations_and_rejected_objects_fail() {
    let _serial = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let mut doc = load();
    let cases = doc["cases"].as_array().unwrap().clone();
    let mut inverted = cases
        .iter()
        .find(|c| c["id"] == "k8s-e2e-001")
        .unwrap()
        .clone();
    inverted["id"] = "inverted-001".into();
    let mut non_loopback = 0;
    for p in inverted["probes"].as_array_mut().unwrap() {
        let e = p["expect"].as_bool().unwrap();
        p["expect"] = (!e).into();
        if p["loopback"] != true {
            non_loopback += 1;
        }
    }
    let mut rejected = inverted.clone();
    rejected["id"] = "rejected-001".into();
    rejected["policies"][0]["spec"]["ingress"] = serde_json::json!([{"ports": [{"port": 70000}]}]);
    let rejected_probes = rejected["probes"].as_array().unwrap().len();
    doc["cases"] = Value::Array(vec![inverted, rejected]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doctored.json");
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let moatd = moatd();
    let r = run(&[
        "--direct",
        "--cases",
        file.to_str().unwrap(),
        "--moatd",
        moatd.to_str().unwrap(),
    ]);
    // A failing run keeps its work directory (moatd's log) for inspection; not wanted here.
    for line in r.stdout.lines() {
        if let Some(dir) = line.strip_prefix("work directory kept for inspection: ") {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let (_, failed, _) = r.counts;
    assert_eq!(r.code, 1);
    assert_eq!(failed, non_loopback + rejected_probes);
    assert!(r.stdout.contains("[FAIL] inverted-001"));
    assert!(r.stdout.contains("moatd rejected") && r.stdout.contains("70000"));
}

fn cnp_doc() -> Value {
    serde_json::from_str(&std::fs::read_to_string(CNP_CASES).unwrap()).unwrap()
}

/// (probes in the file, probes of cases the file marks as not expressible here).
fn cnp_probe_counts(doc: &Value) -> (usize, usize) {
    let cases = doc["cases"].as_array().unwrap();
    let probes = |c: &Value| c["probes"].as_array().unwrap().len();
    let total = cases.iter().map(probes).sum();
    let marked = cases
        .iter()
        .filter(|c| c.get("skip").is_some_and(|s| s.is_string()))
        .map(probes)
        .sum();
    (total, marked)
}

/// Every translated upstream ClusterNetworkPolicy case through the pure engine: all pass,
/// SCTP included; only the cases marked as not expressible (node peers) are skipped.
#[test]
fn cnp_offline_whole_file() {
    let doc = cnp_doc();
    let (total, marked) = cnp_probe_counts(&doc);
    assert!(marked < total / 10, "most of the file runs");
    let r = run(&["--offline", "--cases", CNP_CASES]);
    let (passed, failed, skipped) = r.counts;
    assert_eq!(r.code, 0, "offline run failed");
    assert_eq!(failed, 0);
    assert_eq!(skipped, marked);
    assert_eq!(passed + skipped, total);
}

/// The same file on the real datapath, through per-pod ClusterIP Services: Admin, Baseline
/// and NetworkPolicy verdicts combined by the eBPF programs, every probe a real connection.
#[test]
fn cnp_datapath_through_services() {
    cnp_datapath(&[]);
}

/// And over IPv6, to the pods' IPv6 addresses (networks peers as /128s).
#[test]
fn cnp_datapath_ipv6_direct() {
    cnp_datapath(&["--direct", "--ipv6"]);
}

fn cnp_datapath(mode: &[&str]) {
    let _serial = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let doc = cnp_doc();
    let (total, marked) = cnp_probe_counts(&doc);
    let moatd = moatd();
    let mut args = vec!["--cases", CNP_CASES, "--moatd", moatd.to_str().unwrap()];
    args.extend(mode);
    let r = run(&args);
    let (passed, failed, skipped) = r.counts;
    assert_eq!(failed, 0, "failed probes");
    assert_eq!(r.code, 0);
    assert_eq!(passed + skipped, total);
    let sctp = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("skip").is_none())
        .flat_map(|c| c["probes"].as_array().unwrap())
        .filter(|p| p["protocol"] == "SCTP")
        .count();
    // Skipped: the marked cases, and SCTP where the kernel cannot open SCTP sockets.
    let allowed_skips = marked + if sctp_supported() { 0 } else { sctp };
    assert_eq!(skipped, allowed_skips);
    assert!(passed > total / 2, "most probes ran for real");
}
