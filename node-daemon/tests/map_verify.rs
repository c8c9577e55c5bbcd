//! Self-audit (issue 20): the maps moatd owns are compared entry by entry with what its
//! datastore asks for. A real moatd (local datastore, private pins) enforces a policy on a
//! pod; entries are then changed behind its back with the datapath crate's map access.
//! `moatctl verify` names each drifted entry (different, extra, missing) with its map, exits
//! 1, and changes nothing; with `--verify-interval` moatd exports the drift as
//! `moat_map_drift_entries{map=...}` and repairs it (the value written back, the extra entry
//! deleted), after which verify exits 0 and the gauge returns to 0.

mod support_moatd;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use moat_common::{ACTION_ALLOW, DIRECTION_INGRESS, PROTO_TCP, PolicyKey, PolicyValue};
use moat_datapath::Maps;
use moat_testkit::lab::{Lab, LabPod};
use moatd::api::{DriftKind, VerifyReport};
use support_moatd::{Daemon, Env, register};

const OBJECTS: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels:\n    app: web\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: shop\n  labels:\n    app: client\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web-from-client\n  namespace: shop\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080, protocol: TCP}]\n";

/// A key moatd never writes: no policy id is this large.
const FOREIGN: PolicyKey = PolicyKey {
    policy_id: 0x00de_ad00,
    remote_identity: 4242,
    dport: 9999,
    proto: PROTO_TCP,
    direction: DIRECTION_INGRESS,
};

struct Setup {
    env: Env,
    _daemon: Daemon,
    _lab: Lab,
    client: LabPod,
    /// The web pod's ingress entry from the client (the policy's one allow).
    entry: (PolicyKey, PolicyValue),
}

fn setup(tag: &str, flags: &[&str]) -> Setup {
    let env = Env::new(tag);
    env.write("objects.yaml", OBJECTS);
    let daemon = env.start_with(flags);
    let mut lab = Lab::new(tag).unwrap();
    let web = lab.add_pod("web").unwrap();
    let client = lab.add_pod("client").unwrap();
    let web_reg = register(&env, &web, "shop");
    let client_id = register(&env, &client, "shop").identity;
    let maps = Maps::open(&env.pins()).unwrap();
    let entries: Vec<(PolicyKey, PolicyValue)> =
        maps.policy.iter().filter_map(Result::ok).collect();
    let entry = *entries
        .iter()
        .find(|(k, _)| {
            k.policy_id == web_reg.policy_id
                && k.remote_identity == client_id
                && k.dport == 8080
                && k.direction == DIRECTION_INGRESS
        })
        .unwrap_or_else(|| panic!("no allow entry for the client in {entries:?}"));
    Setup {
        env,
        _daemon: daemon,
        _lab: lab,
        client,
        entry,
    }
}

/// `moatctl verify` with `args`: exit code, stdout, stderr.
fn verify(env: &Env, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .arg("--socket")
        .arg(env.socket())
        .arg("verify")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().expect("moatctl exited"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn verify_json(env: &Env) -> (i32, VerifyReport) {
    let (code, stdout, stderr) = verify(env, &["-o", "json"]);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout:?} (stderr {stderr})"));
    (code, report)
}

fn policy_entry(env: &Env, key: &PolicyKey) -> Option<PolicyValue> {
    Maps::open(&env.pins()).unwrap().policy.get(key, 0).ok()
}

/// Writes a wrong value over the entry and adds the foreign key: behind moatd's back.
fn corrupt(env: &Env, (key, value): &(PolicyKey, PolicyValue)) -> PolicyValue {
    let mut maps = Maps::open(&env.pins()).unwrap();
    let wrong = PolicyValue {
        rule_id: value.rule_id + 7777,
        ..*value
    };
    maps.upsert_policy(key, &wrong).unwrap();
    maps.upsert_policy(&FOREIGN, &PolicyValue::netpol(ACTION_ALLOW, 1))
        .unwrap();
    wrong
}

#[test]
fn moatctl_verify_names_each_drifted_entry_and_changes_nothing() {
    let s = setup("mvfy", &["--verify-interval=0", "--metrics-addr="]);
    let env = &s.env;

    let (code, report) = verify_json(env);
    assert_eq!(code, 0, "{report:?}");
    assert_eq!(report.total(), 0, "{report:?}");
    let names: Vec<&str> = report.maps.iter().map(|m| m.map.as_str()).collect();
    for map in [
        "endpoints",
        "ipcache_v4",
        "hosts_v4",
        "policy",
        "fqdn_patterns",
    ] {
        assert!(names.contains(&map), "{map} not compared: {names:?}");
    }
    let policy = report.maps.iter().find(|m| m.map == "policy").unwrap();
    assert!(policy.entries > 0, "{policy:?}");
    let (code, table, _) = verify(env, &[]);
    assert_eq!(code, 0, "{table}");
    assert!(table.contains("no drift"), "{table}");

    // Behind moatd's back: a value changed, a foreign key added, the client's address gone
    // from the ipcache (the trie and its exact-match mirror).
    let wrong = corrupt(env, &s.entry);
    let client_net = ipnetwork::IpNetwork::from(std::net::IpAddr::V4(s.client.v4));
    Maps::open(&env.pins())
        .unwrap()
        .remove_ipcache(client_net)
        .unwrap();

    let (code, report) = verify_json(env);
    assert_eq!(code, 1, "{report:?}");
    let policy = report.maps.iter().find(|m| m.map == "policy").unwrap();
    assert_eq!(
        (policy.missing, policy.extra, policy.different),
        (0, 1, 1),
        "{policy:?}"
    );
    let (key, value) = s.entry;
    let different = policy
        .samples
        .iter()
        .find(|e| e.kind == DriftKind::Different)
        .unwrap();
    assert_eq!(
        different.key,
        format!(
            "policy {} ingress remote {} proto 6 port 8080",
            key.policy_id, key.remote_identity
        )
    );
    let expected = different.expected.as_deref().unwrap();
    let actual = different.actual.as_deref().unwrap();
    assert!(
        expected.starts_with(&format!("allow rule {} ", value.rule_id)),
        "{expected}"
    );
    assert!(
        actual.starts_with(&format!("allow rule {} ", wrong.rule_id)),
        "{actual}"
    );
    let extra = policy
        .samples
        .iter()
        .find(|e| e.kind == DriftKind::Extra)
        .unwrap();
    assert_eq!(
        extra.key,
        "policy 14593280 ingress remote 4242 proto 6 port 9999"
    );
    assert!(
        extra.expected.is_none() && extra.actual.is_some(),
        "{extra:?}"
    );
    for map in ["ipcache_v4", "hosts_v4"] {
        let m = report.maps.iter().find(|m| m.map == map).unwrap();
        assert_eq!((m.missing, m.extra, m.different), (1, 0, 0), "{m:?}");
        assert!(
            m.samples[0].key.starts_with(&s.client.v4.to_string()),
            "{m:?}"
        );
    }
    assert_eq!(report.total(), 4, "nothing else drifted: {report:?}");

    // The table names the map and the entry too.
    let (code, table, _) = verify(env, &[]);
    assert_eq!(code, 1, "{table}");
    assert!(table.contains("policy: 2 entries differ"), "{table}");
    assert!(table.contains("remote 4242 proto 6 port 9999"), "{table}");
    assert!(
        table.contains(&format!("have allow rule {}", wrong.rule_id)),
        "{table}"
    );

    // verify only reads: the drift is still there.
    assert_eq!(policy_entry(env, &key), Some(wrong));
    assert!(policy_entry(env, &FOREIGN).is_some());

    // No moatd to ask: exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .args(["--socket", "/nonexistent/moatd.sock", "verify"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `moat_map_drift_entries{map="<map>"}` from moatd's /metrics, None before the first check.
fn drift_gauge(port: u16, map: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let series = format!("moat_map_drift_entries{{map=\"{map}\"}} ");
    answer
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
}

/// Polls `probe` every 20 ms until it holds, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let start = Instant::now();
    while !probe() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn moatd_alarms_on_drift_and_repairs_it() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("--metrics-addr=127.0.0.1:{port}");
    let s = setup("mvfa", &["--verify-interval=1s", &addr]);
    let env = &s.env;
    let limit = Duration::from_secs(15);

    eventually(limit, "a first check with no drift", || {
        drift_gauge(port, "policy") == Some(0.0)
    });
    let (code, report) = verify_json(env);
    assert_eq!(code, 0, "{report:?}");

    let (key, value) = s.entry;
    let wrong = corrupt(env, &s.entry);
    assert_eq!(policy_entry(env, &key), Some(wrong));
    eventually(limit, "moat_map_drift_entries{map=\"policy\"} > 0", || {
        drift_gauge(port, "policy").is_some_and(|v| v > 0.0)
    });
    // Only the policy map drifted.
    assert_eq!(drift_gauge(port, "ipcache_v4"), Some(0.0));
    assert_eq!(drift_gauge(port, "endpoints"), Some(0.0));

    eventually(limit, "the entry repaired, the foreign key deleted", || {
        policy_entry(env, &key) == Some(value) && policy_entry(env, &FOREIGN).is_none()
    });
    let (code, report) = verify_json(env);
    assert_eq!(code, 0, "after the repair: {report:?}");
    eventually(limit, "the gauge back to 0 at the next check", || {
        drift_gauge(port, "policy") == Some(0.0)
    });
}
