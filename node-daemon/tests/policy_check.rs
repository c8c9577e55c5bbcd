//! `moatctl policy check` and `moatctl flows export|--graph` from the real moatctl binary.
//! Offline: a cluster directory, candidate files and a journal file written in the
//! journal's own line format in a temp dir, no moatd. Round trip: a real moatd whose journal
//! holds those lines, `flows export`, then the offline check of the exported file.

mod support_moatd;

use std::path::Path;
use std::process::{Command, Output};

use moatd::flows::now_ms;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f8b6c5-x2k4q
  namespace: shop
  labels: {app: web}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: shop
  labels: {app: db}
---
apiVersion: v1
kind: Pod
metadata:
  name: x
  namespace: misc
  labels: {app: x}
"#;

/// What is in force now: db admits web on 5432.
fn db_ingress(ports: &str, extra_from: &str) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-ingress
  namespace: shop
spec:
  podSelector:
    matchLabels: {{app: db}}
  ingress:
  - from:
    - podSelector:
        matchLabels: {{app: web}}
{extra_from}    ports:
{ports}"#
    )
}

const PORT_5432: &str = "    - port: 5432\n";

/// One journal line as moatd writes it (`seq` first, then the record's fields).
#[allow(clippy::too_many_arguments)]
fn line(
    seq: u64,
    age_ms: u64,
    verdict: &str,
    reason: &str,
    direction: &str,
    endpoint: &str,
    peer: &str,
    (source, destination): (&str, &str),
    rule: &str,
) -> String {
    format!(
        r#"{{"seq":{seq},"time_ms":{},"verdict":"{verdict}","reason":"{reason}","direction":"{direction}","mode":"enforce","protocol":"TCP","source":"{source}","destination":"{destination}","source_port":40000,"destination_port":5432,"endpoint":"{endpoint}","peer":"{peer}","local_identity":0,"remote_identity":0,"rule_id":0,"rule":"{rule}","bytes":60}}"#,
        now_ms() - age_ms
    ) + "\n"
}

const WEB: &str = "10.9.0.1";
const DB: &str = "10.9.0.2";
const X: &str = "10.9.0.3";
const DAY_MS: u64 = 86_400_000;

/// web -> db allowed (recorded at both ends), x -> db dropped; and, 8 days ago, x -> db
/// allowed (before db was isolated).
fn journal() -> String {
    let web = "shop/web-7d9f8b6c5-x2k4q";
    [
        line(
            1,
            1000,
            "allowed",
            "policy-allow",
            "egress",
            web,
            "shop/db-0",
            (WEB, DB),
            "not isolated",
        ),
        line(
            2,
            1000,
            "allowed",
            "policy-allow",
            "ingress",
            "shop/db-0",
            web,
            (WEB, DB),
            "shop/db-ingress ingress[0]",
        ),
        line(
            3,
            900,
            "dropped",
            "default-deny",
            "ingress",
            "shop/db-0",
            "misc/x",
            (X, DB),
            "default deny (selected by: shop/db-ingress)",
        ),
        line(
            4,
            8 * DAY_MS,
            "allowed",
            "policy-allow",
            "ingress",
            "shop/db-0",
            "misc/x",
            (X, DB),
            "not isolated",
        ),
    ]
    .concat()
}

struct Offline {
    dir: tempfile::TempDir,
}

impl Offline {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cluster")).unwrap();
        std::fs::create_dir_all(dir.path().join("candidate")).unwrap();
        std::fs::write(dir.path().join("cluster/workloads.yaml"), CLUSTER).unwrap();
        std::fs::write(
            dir.path().join("cluster/db-ingress.yaml"),
            db_ingress(PORT_5432, ""),
        )
        .unwrap();
        std::fs::write(dir.path().join("flows.jsonl"), journal()).unwrap();
        Self { dir }
    }

    fn path(&self, p: &str) -> std::path::PathBuf {
        self.dir.path().join(p)
    }

    fn candidate(&self, file: &str, yaml: &str) {
        std::fs::write(self.path("candidate").join(file), yaml).unwrap();
    }

    fn check(&self, journal: &Path, extra: &[&str]) -> (i32, String, String) {
        let out = moatctl(
            &[
                &["policy", "check", "-f"][..],
                &[self.path("candidate").to_str().unwrap()],
                &["--cluster", self.path("cluster").to_str().unwrap()],
                &["--journal", journal.to_str().unwrap()],
                extra,
            ]
            .concat(),
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn moatctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moatctl"))
        // Offline: a socket nobody listens on, so that any use of moatd would fail loudly.
        .args(["--socket", "/nonexistent/moatd.sock"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_candidate_that_only_widens_exits_0_and_lists_the_newly_allowed() {
    let t = Offline::new();
    let also_x = "    - namespaceSelector: {}\n      podSelector:\n        matchLabels: {app: x}\n";
    t.candidate("db.yaml", &db_ingress(PORT_5432, also_x));
    let (code, out, err) = t.check(&t.path("flows.jsonl"), &["--since", "7d"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("NEWLY DENIED: 0 flows"), "{out}");
    assert!(out.contains("NEWLY ALLOWED: 1 flows"), "{out}");
    assert!(out.contains("  misc/x -> shop/db\n"), "{out}");
    assert!(
        out.contains("now: NetworkPolicy shop/db-ingress ingress[0]")
            || out.contains("now: shop/db-ingress ingress[0]"),
        "{out}"
    );
    assert!(
        out.contains("replayed 3 flows"),
        "the 8-day-old flow is outside --since: {out}"
    );
}

#[test]
fn a_candidate_that_closes_an_observed_flow_exits_1_naming_pair_and_rule() {
    let t = Offline::new();
    t.candidate("db.yaml", &db_ingress("    - port: 5433\n", ""));
    let (code, out, err) = t.check(&t.path("flows.jsonl"), &["--since", "7d"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("NEWLY DENIED: 1 flows"), "{out}");
    // Grouped by workload pair: the replica's generated suffixes are dropped.
    assert!(out.contains("  shop/web -> shop/db\n"), "{out}");
    assert!(out.contains("5432/TCP (ingress of shop/db)"), "{out}");
    assert!(out.contains("was: shop/db-ingress ingress[0]"), "{out}");
    assert!(
        out.contains("now: default deny (selected by: ") && out.contains("shop/db-ingress)"),
        "{out}"
    );
    // web's egress is not isolated either way: unchanged.
    assert!(!out.contains("egress of shop/web"), "{out}");
}

#[test]
fn since_decides_which_observed_flows_count() {
    let t = Offline::new();
    // Unchanged policy: nothing in the last 7 days changes; the 8-day-old flow from x
    // (allowed before db was isolated) would now be denied.
    t.candidate("db.yaml", &db_ingress(PORT_5432, ""));
    let (code, out, _) = t.check(&t.path("flows.jsonl"), &["--since", "7d"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = t.check(&t.path("flows.jsonl"), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  misc/x -> shop/db\n"), "{out}");
}

#[test]
fn an_invalid_candidate_exits_2_with_the_reason() {
    let t = Offline::new();
    t.candidate("db.yaml", &db_ingress("    - port: 70000\n", ""));
    let (code, out, err) = t.check(&t.path("flows.jsonl"), &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("db.yaml"), "{err}");
    assert!(err.contains("70000"), "{err}");
    t.candidate("db.yaml", "kind: NetworkPolicy\n  metadata: [\n");
    let (code, _, err) = t.check(&t.path("flows.jsonl"), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not YAML"), "{err}");
}

#[test]
fn a_damaged_journal_exits_2() {
    let t = Offline::new();
    t.candidate("db.yaml", &db_ingress(PORT_5432, ""));
    std::fs::write(t.path("bad.jsonl"), journal() + "{\"truncated\n").unwrap();
    let (code, _, err) = t.check(&t.path("bad.jsonl"), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 5"), "{err}");
}

#[test]
fn json_output_is_the_report() {
    let t = Offline::new();
    t.candidate("db.yaml", &db_ingress("    - port: 5433\n", ""));
    let (code, out, _) = t.check(&t.path("flows.jsonl"), &["--since", "7d", "-o", "json"]);
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["newly_denied"][0]["from"], "shop/web");
    assert_eq!(report["newly_denied"][0]["to"], "shop/db");
    assert_eq!(report["newly_denied"][0]["flows"], 1);
    assert_eq!(report["replayed"], 3);
}

#[test]
fn graph_from_an_exported_file_counts_verdicts_per_pair() {
    let t = Offline::new();
    let out = moatctl(&[
        "flows",
        "--graph",
        "dot",
        "--journal",
        t.path("flows.jsonl").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dot = String::from_utf8(out.stdout).unwrap();
    assert!(
        dot.contains("\"shop/web\" -> \"shop/db\" [label=\"allowed 2\", color=green];"),
        "{dot}"
    );
    assert!(
        dot.contains("\"misc/x\" -> \"shop/db\" [label=\"allowed 1, denied 1\", color=red];"),
        "{dot}"
    );
    let out = moatctl(&[
        "flows",
        "--graph",
        "mermaid",
        "--journal",
        t.path("flows.jsonl").to_str().unwrap(),
    ]);
    let mermaid = String::from_utf8(out.stdout).unwrap();
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert!(
        mermaid.contains("-->|\"allowed 1, denied 1\"|"),
        "{mermaid}"
    );
}

/// A real moatd whose journal already holds the lines: `flows export` writes them, and the
/// offline check of the exported file judges them as it judges the journal's own lines.
#[test]
fn export_from_a_running_moatd_then_check_offline() {
    let env = support_moatd::Env::new("pcheck");
    let journal_dir = env.root().join("state/flows");
    std::fs::create_dir_all(&journal_dir).unwrap();
    std::fs::write(journal_dir.join("flows.0.jsonl"), journal()).unwrap();
    let _moatd = env.start();
    let t = Offline::new();
    let exported = t.path("exported.jsonl");
    env.moatctl(&[
        "flows",
        "export",
        "--since",
        "7d",
        "-f",
        exported.to_str().unwrap(),
    ]);
    let lines = std::fs::read_to_string(&exported).unwrap();
    assert_eq!(lines.lines().count(), 3, "{lines}");
    assert!(
        lines.lines().all(|l| l.starts_with("{\"time_ms\":")),
        "{lines}"
    );
    drop(_moatd);
    // moatd is gone: the check needs only the file.
    t.candidate("db.yaml", &db_ingress("    - port: 5433\n", ""));
    let (code, out, err) = t.check(&exported, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("  shop/web -> shop/db\n"), "{out}");
    t.candidate("db.yaml", &db_ingress(PORT_5432, ""));
    let (code, out, err) = t.check(&exported, &[]);
    assert_eq!(code, 0, "{out}{err}");
}
