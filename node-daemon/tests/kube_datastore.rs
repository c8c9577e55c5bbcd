//! The Kubernetes datastore against an in-process API server that speaks the real list/watch
//! protocol (moat-fake-apiserver): initial sync, every kind's add/modify/delete, rejected
//! policies, MoatPolicies (and a cluster without their CRD), ClusterNetworkPolicies (v1beta1 or
//! v1alpha2, their Accepted status condition, a cluster without their CRD), 410 Gone and
//! relists, bookmarks, API server restarts, and churn.

use moat_fake_apiserver as support_kube;

use std::time::{Duration, Instant};

use moatd::{
    kube::{KubeConfig, KubeDatastore, KubeStatus},
    local::LocalObjects,
};
use serde_json::json;
use support_kube::{
    FakeApiServer, GoneStyle, Res, moat_policy, namespace, network_policy, node, pod,
};

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(10);

fn config(server: &FakeApiServer) -> KubeConfig {
    let mut config = KubeConfig::url(server.url(), NODE);
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config
}

fn start(server: &FakeApiServer) -> KubeDatastore {
    let ds = KubeDatastore::start(config(server)).expect("start the datastore");
    assert!(ds.wait_ready(WAIT), "no first sync: {:?}", ds.status());
    ds
}

/// Waits (bounded) until the snapshot satisfies `done`; panics with the last one otherwise.
fn wait_for(ds: &KubeDatastore, what: &str, done: impl Fn(&LocalObjects) -> bool) -> u64 {
    let deadline = Instant::now() + WAIT;
    let mut generation = 0;
    loop {
        let (g, objects) = ds.snapshot_shared();
        if done(&objects) {
            return g;
        }
        if g == generation && Instant::now() >= deadline {
            panic!("timed out waiting for {what}; last snapshot: {objects:#?}");
        }
        generation = g;
        ds.wait_for_change(g, deadline.saturating_duration_since(Instant::now()));
    }
}

fn wait_status(ds: &KubeDatastore, what: &str, done: impl Fn(&KubeStatus) -> bool) -> KubeStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = ds.status();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {status:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

fn lists(status: &KubeStatus, kind: &str) -> u64 {
    status
        .kinds
        .iter()
        .find(|k| k.kind == kind)
        .map(|k| k.lists)
        .unwrap()
}

fn allow_web() -> serde_json::Value {
    network_policy(
        "shop",
        "allow-web",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                            "ports": [{"port": "http"}]}],
               "policyTypes": ["Ingress"]}),
    )
}

fn populated_server() -> FakeApiServer {
    let server = FakeApiServer::start();
    server.apply(namespace(
        "shop",
        json!({"team": "a", "kubernetes.io/metadata.name": "shop"}),
    ));
    server.apply(namespace("kube-system", json!({})));
    let mut web = pod("shop", "web-1", json!({"app": "web"}), "10.244.1.5");
    web["metadata"]["annotations"] = json!({"moat.io/mode": "audit"});
    web["spec"]["containers"][0]["ports"] = json!([
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        {"containerPort": 9000}
    ]);
    web["status"]["podIPs"] = json!([{"ip": "10.244.1.5"}, {"ip": "fd00:1::5"}]);
    server.apply(web);
    server.apply(pod(
        "shop",
        "client",
        json!({"app": "client"}),
        "10.244.2.7",
    ));
    let mut host = pod(
        "kube-system",
        "kube-proxy-x",
        json!({"k8s-app": "kube-proxy"}),
        "192.168.1.10",
    );
    host["spec"]["hostNetwork"] = json!(true);
    server.apply(host);
    let mut done = pod("shop", "job-1", json!({"app": "job"}), "10.244.1.9");
    done["status"]["phase"] = json!("Succeeded");
    server.apply(done);
    server.apply(allow_web());
    server.apply(node(
        NODE,
        &["10.244.1.0/24", "fd00:1::/64"],
        "192.168.1.10",
    ));
    server.apply(node("node-2", &["10.244.2.0/24"], "192.168.1.11"));
    server
}

#[test]
fn initial_sync_builds_the_snapshot_and_becomes_ready() {
    let server = populated_server();
    let ds = start(&server);
    let (generation, objects) = ds.snapshot();
    assert!(generation >= 1);
    assert_eq!(
        objects.namespaces.keys().collect::<Vec<_>>(),
        vec!["kube-system", "shop"]
    );
    assert_eq!(objects.namespaces["shop"].get("team"), Some("a"));
    // The host-network pod is the node itself and the finished job holds no address.
    assert_eq!(
        objects.pods.keys().cloned().collect::<Vec<_>>(),
        vec![key("shop", "client"), key("shop", "web-1")]
    );
    let web = &objects.pods[&key("shop", "web-1")];
    assert_eq!(web.labels.get("app"), Some("web"));
    assert_eq!(web.mode, Some(moat_policy::Mode::Audit));
    assert_eq!(
        web.ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect::<Vec<_>>(),
        vec![
            ("http", 8080, moat_policy::Protocol::TCP),
            ("dns", 53, moat_policy::Protocol::UDP)
        ]
    );
    assert_eq!(
        web.ips,
        vec![
            "10.244.1.5".parse::<std::net::IpAddr>().unwrap(),
            "fd00:1::5".parse().unwrap()
        ]
    );
    assert_eq!(
        objects.policies.keys().cloned().collect::<Vec<_>>(),
        vec![key("shop", "allow-web")]
    );
    assert!(objects.rejected.is_empty(), "{:?}", objects.rejected);
    assert_eq!(
        ds.node_pod_cidrs(),
        vec![
            "10.244.1.0/24".parse::<ipnetwork::IpNetwork>().unwrap(),
            "fd00:1::/64".parse().unwrap()
        ]
    );
    assert_eq!(
        ds.node().unwrap().addresses,
        vec!["192.168.1.10".parse::<std::net::IpAddr>().unwrap()]
    );
    let status = ds.status();
    assert!(status.ready && status.connected, "{status:#?}");
    for kind in ["pods", "namespaces", "networkpolicies", "nodes"] {
        assert_eq!(lists(&status, kind), 1, "{status:#?}");
    }
    // The node watch asks only for this node.
    assert_eq!(server.lists(Res::Nodes), 1);
}

#[test]
fn add_modify_delete_of_every_kind_updates_the_snapshot() {
    let server = populated_server();
    let ds = start(&server);

    // Namespaces
    server.apply(namespace("new", json!({"team": "b"})));
    wait_for(&ds, "namespace added", |o| o.namespaces.contains_key("new"));
    server.apply(namespace("new", json!({"team": "c"})));
    wait_for(&ds, "namespace relabelled", |o| {
        o.namespaces.get("new").and_then(|l| l.get("team")) == Some("c")
    });
    server.delete("Namespace", "", "new");
    wait_for(&ds, "namespace deleted", |o| {
        !o.namespaces.contains_key("new")
    });

    // Pods, including one that finishes and one that moves to the host network
    server.apply(pod("shop", "db", json!({"app": "db"}), "10.244.1.20"));
    wait_for(&ds, "pod added", |o| {
        o.pods.contains_key(&key("shop", "db"))
    });
    let mut db = pod(
        "shop",
        "db",
        json!({"app": "db", "tier": "2"}),
        "10.244.1.21",
    );
    db["metadata"]["annotations"] = json!({"moat.io/mode": "learn"});
    server.apply(db.clone());
    wait_for(&ds, "pod modified", |o| {
        o.pods.get(&key("shop", "db")).is_some_and(|p| {
            p.labels.get("tier") == Some("2")
                && p.mode == Some(moat_policy::Mode::Learn)
                && p.ips == vec!["10.244.1.21".parse::<std::net::IpAddr>().unwrap()]
        })
    });
    db["status"]["phase"] = json!("Failed");
    server.apply(db);
    wait_for(&ds, "failed pod dropped", |o| {
        !o.pods.contains_key(&key("shop", "db"))
    });
    server.delete("Pod", "shop", "client");
    wait_for(&ds, "pod deleted", |o| {
        !o.pods.contains_key(&key("shop", "client"))
    });

    // NetworkPolicies
    server.apply(network_policy(
        "shop",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    ));
    wait_for(&ds, "policy added", |o| {
        o.policies.contains_key(&key("shop", "deny-all"))
    });
    server.apply(network_policy(
        "shop",
        "deny-all",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}),
    ));
    wait_for(&ds, "policy modified", |o| {
        o.policies
            .get(&key("shop", "deny-all"))
            .is_some_and(|p| p.spec.pod_selector.match_labels.contains_key("app"))
    });
    server.delete("NetworkPolicy", "shop", "deny-all");
    wait_for(&ds, "policy deleted", |o| {
        !o.policies.contains_key(&key("shop", "deny-all"))
    });

    // This node (other nodes are not watched)
    let g = ds.generation();
    server.apply(node(NODE, &["10.244.9.0/24"], "192.168.1.10"));
    ds.wait_for_change(g, WAIT);
    let deadline = Instant::now() + WAIT;
    while ds.node_pod_cidrs() != vec!["10.244.9.0/24".parse::<ipnetwork::IpNetwork>().unwrap()] {
        assert!(
            Instant::now() < deadline,
            "node update not seen: {:?}",
            ds.node()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    server.delete("Node", "", NODE);
    let deadline = Instant::now() + WAIT;
    while ds.node().is_some() {
        assert!(Instant::now() < deadline, "node delete not seen");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn invalid_network_policy_is_rejected_naming_object_and_field() {
    let server = populated_server();
    server.apply(network_policy(
        "shop",
        "bad-port",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}),
    ));
    let ds = start(&server);
    let (_, objects) = ds.snapshot();
    assert!(!objects.policies.contains_key(&key("shop", "bad-port")));
    assert_eq!(objects.rejected.len(), 1, "{:?}", objects.rejected);
    let reason = &objects.rejected[0];
    assert!(reason.contains("NetworkPolicy shop/bad-port"), "{reason}");
    assert!(reason.contains("spec.ingress[0].ports[0].port"), "{reason}");
    // Valid policies are unaffected.
    assert!(objects.policies.contains_key(&key("shop", "allow-web")));

    // A bad update of a good policy: reported, left out (the caller keeps its last good one).
    server.apply(network_policy(
        "shop",
        "allow-web",
        json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}),
    ));
    wait_for(&ds, "bad update rejected", |o| {
        !o.policies.contains_key(&key("shop", "allow-web"))
            && o.rejected
                .iter()
                .any(|r| r.contains("shop/allow-web") && r.contains("spec.egress[0].to[0].ipBlock"))
    });
    // Fixed: accepted again, and the rejection is gone.
    server.apply(network_policy(
        "shop",
        "bad-port",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 7000}]}]}),
    ));
    server.apply(allow_web());
    wait_for(&ds, "fixed policies accepted", |o| {
        o.policies.contains_key(&key("shop", "bad-port"))
            && o.policies.contains_key(&key("shop", "allow-web"))
            && o.rejected.is_empty()
    });
}

/// Changes that no watch event carries (lost to compaction), then 410 Gone: only a relist
/// can see them, deletions included.
fn change_unseen(server: &FakeApiServer) {
    server.apply_unseen(pod("shop", "late", json!({"app": "late"}), "10.244.1.30"));
    server.delete_unseen("Pod", "shop", "client");
    server.apply_unseen(namespace("shop", json!({"team": "z"})));
    server.delete_unseen("NetworkPolicy", "shop", "allow-web");
    server.apply_unseen(node(NODE, &["10.244.7.0/24"], "192.168.1.10"));
}

fn assert_unseen_changes_applied(ds: &KubeDatastore) {
    wait_for(ds, "relisted snapshot", |o| {
        o.pods.contains_key(&key("shop", "late"))
            && !o.pods.contains_key(&key("shop", "client"))
            && o.namespaces["shop"].get("team") == Some("z")
            && o.policies.is_empty()
    });
    let deadline = Instant::now() + WAIT;
    while ds.node_pod_cidrs() != vec!["10.244.7.0/24".parse::<ipnetwork::IpNetwork>().unwrap()] {
        assert!(
            Instant::now() < deadline,
            "node not relisted: {:?}",
            ds.node()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, objects) = ds.snapshot();
    assert_eq!(
        objects.pods.keys().cloned().collect::<Vec<_>>(),
        vec![key("shop", "late"), key("shop", "web-1")]
    );
}

#[test]
fn gone_watch_event_leads_to_relist_and_a_correct_snapshot() {
    let server = populated_server();
    let ds = start(&server);
    let lists_before = server.lists(Res::Pods);
    change_unseen(&server);
    server.expire_watches();
    assert_unseen_changes_applied(&ds);
    assert!(server.gone_answers() >= 4, "every watch got 410");
    assert!(server.lists(Res::Pods) > lists_before);
    let status = wait_status(&ds, "connected after relist", |s| s.connected);
    for kind in ["pods", "namespaces", "networkpolicies", "nodes"] {
        assert!(lists(&status, kind) >= 2, "{status:#?}");
    }
    // Live events flow again after the relist.
    server.apply(pod("shop", "after", json!({"app": "after"}), "10.244.1.31"));
    wait_for(&ds, "event after relist", |o| {
        o.pods.contains_key(&key("shop", "after"))
    });
}

#[test]
fn gone_http_status_at_watch_start_leads_to_relist() {
    let server = populated_server();
    server.set_gone_style(GoneStyle::Http);
    let ds = start(&server);
    change_unseen(&server);
    // The watches break; resuming from their old resourceVersion gets HTTP 410.
    server.drop_connections();
    assert_unseen_changes_applied(&ds);
    assert!(server.gone_answers() >= 1);
    let status = wait_status(&ds, "connected after relist", |s| s.connected);
    assert!(lists(&status, "pods") >= 2, "{status:#?}");
}

#[test]
fn bookmarks_let_a_resumed_watch_skip_the_relist() {
    let server = populated_server();
    let ds = start(&server);
    // Other kinds move the global resourceVersion past the pod watch's last event.
    for i in 0..5 {
        server.apply(namespace(&format!("ns-{i}"), json!({})));
    }
    wait_for(&ds, "namespaces", |o| o.namespaces.len() == 7);
    let head = server.resource_version();
    server.send_bookmarks();
    // The bookmark reaches the client over a local socket; give it ample time to be read.
    std::thread::sleep(Duration::from_millis(300));
    server.compact();
    server.drop_connections();
    let deadline = Instant::now() + WAIT;
    while server.watches(Res::Pods).len() < 2 {
        assert!(Instant::now() < deadline, "pod watch not resumed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let resumed_from = *server.watches(Res::Pods).last().unwrap();
    assert_eq!(
        resumed_from, head,
        "the pod watch resumed from the bookmark"
    );
    server.apply(pod("shop", "after", json!({"app": "after"}), "10.244.1.31"));
    wait_for(&ds, "event after resume", |o| {
        o.pods.contains_key(&key("shop", "after"))
    });
    assert_eq!(server.lists(Res::Pods), 1, "no relist was needed");
}

#[test]
fn api_server_down_keeps_the_snapshot_and_recovers_after_restart() {
    let server = populated_server();
    let ds = start(&server);
    let (generation, before) = ds.snapshot();

    server.stop();
    let status = wait_status(&ds, "disconnected", |s| !s.connected);
    assert!(status.ready, "ready stays true: the first sync happened");
    assert!(
        status.kinds.iter().any(|k| k.last_error.is_some()),
        "{status:#?}"
    );
    // Enforcement continues from the last snapshot.
    let (g, during) = ds.snapshot();
    assert_eq!(g, generation);
    assert_eq!(during.pods, before.pods);
    assert_eq!(during.policies, before.policies);

    // Changes while the watches are down are caught up from their resourceVersion.
    server.apply(pod(
        "shop",
        "while-down",
        json!({"app": "x"}),
        "10.244.1.40",
    ));
    server.delete("Pod", "shop", "client");
    server.restart();
    wait_for(&ds, "caught up after restart", |o| {
        o.pods.contains_key(&key("shop", "while-down"))
            && !o.pods.contains_key(&key("shop", "client"))
    });
    let status = wait_status(&ds, "connected again", |s| s.connected);
    assert!(status.ready && status.kinds.iter().all(|k| k.last_error.is_none()));
}

#[test]
fn not_ready_until_the_api_server_answers() {
    let server = populated_server();
    server.stop();
    let ds = KubeDatastore::start(config(&server)).expect("start without an API server");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!ds.ready());
    let status = ds.status();
    assert!(!status.ready && !status.connected, "{status:#?}");
    assert_eq!(ds.snapshot().0, 0);
    server.restart();
    assert!(ds.wait_ready(WAIT), "{:?}", ds.status());
    assert_eq!(ds.snapshot().1.pods.len(), 2);
}

#[test]
fn churn_of_a_thousand_pod_events_ends_in_the_exact_snapshot() {
    let server = populated_server();
    let ds = start(&server);
    let g0 = ds.generation();
    let mut expected: std::collections::BTreeSet<(String, String)> =
        ds.snapshot().1.pods.keys().cloned().collect();
    let mut events = 0;
    for i in 0..600u32 {
        let name = format!("churn-{i}");
        let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        server.apply(pod(
            "shop",
            &name,
            json!({"app": "churn", "n": i.to_string()}),
            &ip,
        ));
        expected.insert(key("shop", &name));
        events += 1;
        if i % 3 == 2 {
            let gone = format!("churn-{}", i - 1);
            server.delete("Pod", "shop", &gone);
            expected.remove(&key("shop", &gone));
            events += 1;
        }
    }
    for i in (0..600u32).step_by(3) {
        let name = format!("churn-{i}");
        server.delete("Pod", "shop", &name);
        expected.remove(&key("shop", &name));
        events += 1;
    }
    assert!(events >= 1000);
    wait_for(&ds, "final churn snapshot", |o| {
        o.pods
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            == expected
    });
    let (g, objects) = ds.snapshot();
    assert_eq!(objects.pods.len(), expected.len());
    for ((ns, name), meta) in &objects.pods {
        if let Some(i) = name.strip_prefix("churn-") {
            let i: u32 = i.parse().unwrap();
            let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
            assert_eq!(
                meta.ips,
                vec![ip.parse::<std::net::IpAddr>().unwrap()],
                "{ns}/{name}"
            );
            assert_eq!(meta.labels.get("n"), Some(i.to_string().as_str()));
        }
    }
    // Bursts are coalesced: far fewer generations than events.
    assert!(
        g - g0 < events / 2,
        "{} generations for {events} events",
        g - g0
    );
}

#[test]
fn start_fails_on_an_unusable_url() {
    let err = KubeDatastore::start(KubeConfig::url("not a url at all", NODE))
        .err()
        .expect("a bad URL is refused at start");
    assert!(err.to_string().contains("URL"), "{err}");
}

fn payments_policy(mode: &str) -> serde_json::Value {
    moat_policy(
        "shop",
        "payments",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "mode": mode, "defaultDeny": true,
               "externalGroups": [{"name": "psp", "cidrs": ["203.0.113.0/24"]}],
               "egress": [{"to": [{"group": "psp"}], "ports": [{"port": 443}]}]}),
    )
}

#[test]
fn moat_policies_are_watched_converted_and_rejected_when_invalid() {
    let server = populated_server();
    server.apply(payments_policy("audit"));
    let ds = start(&server);
    let objects = ds.snapshot().1;
    let policy = &objects.moat_policies[&key("shop", "payments")];
    assert_eq!(policy.spec.mode, Some(moat_policy::Mode::Audit));
    assert!(policy.spec.default_deny);
    assert_eq!(policy.spec.egress.as_ref().unwrap()[0].to[0].group, "psp");
    assert_eq!(lists(&ds.status(), "moatpolicies"), 1);

    server.apply(payments_policy("enforce"));
    wait_for(&ds, "MoatPolicy modified", |o| {
        o.moat_policies
            .get(&key("shop", "payments"))
            .is_some_and(|p| p.spec.mode == Some(moat_policy::Mode::Enforce))
    });

    // Well-typed for the schema, invalid for the engine: reported, left out.
    server.apply(moat_policy(
        "shop",
        "dangling",
        json!({"podSelector": {}, "egress": [{"to": [{"group": "nowhere"}]}]}),
    ));
    let g = wait_for(&ds, "invalid MoatPolicy reported", |o| {
        o.rejected
            .iter()
            .any(|r| r.starts_with("MoatPolicy shop/dangling"))
    });
    let (_, objects) = ds.snapshot_shared();
    assert!(
        !objects.moat_policies.contains_key(&key("shop", "dangling")),
        "{g}"
    );
    assert!(
        objects.rejected.iter().any(|r| r.contains("nowhere")),
        "{:?}",
        objects.rejected
    );

    server.delete("MoatPolicy", "shop", "dangling");
    server.delete("MoatPolicy", "shop", "payments");
    wait_for(&ds, "MoatPolicies deleted", |o| {
        o.moat_policies.is_empty() && o.rejected.is_empty()
    });
}

#[test]
fn cluster_without_the_moatpolicy_crd_is_ready_and_picks_it_up_later() {
    let server = populated_server();
    server.set_served(Res::MoatPolicies, false);
    let ds = start(&server);
    let status = ds.status();
    let kind = status
        .kinds
        .iter()
        .find(|k| k.kind == "moatpolicies")
        .unwrap();
    assert!(
        kind.not_served && kind.synced && kind.healthy,
        "{status:#?}"
    );
    assert!(status.connected, "{status:#?}");
    assert!(ds.snapshot().1.moat_policies.is_empty());
    // Everything else is served as usual.
    assert_eq!(ds.snapshot().1.policies.len(), 1);

    // The CRD gets installed and a MoatPolicy created: the retried list finds it.
    server.set_served(Res::MoatPolicies, true);
    server.apply(payments_policy("learn"));
    wait_for(&ds, "MoatPolicy after the CRD appeared", |o| {
        o.moat_policies.contains_key(&key("shop", "payments"))
    });
    let status = wait_status(&ds, "moatpolicies served", |s| {
        s.kinds
            .iter()
            .any(|k| k.kind == "moatpolicies" && !k.not_served)
    });
    assert!(status.ready);
}

// ---------------------------------------------------------------------------------------------
// ClusterNetworkPolicy (issue 17)
// ---------------------------------------------------------------------------------------------

/// An Admin CNP at `version`: namespaces of team a refuse ingress from team b's.
fn guardrail(version: &str, name: &str, priority: i64) -> serde_json::Value {
    json!({"apiVersion": format!("policy.networking.k8s.io/{version}"),
           "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name},
           "spec": {"tier": "Admin", "priority": priority,
                    "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                    "ingress": [{"name": "no-team-b", "action": "Deny",
                                 "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]}]}})
}

/// The policies the engine would enforce: every CNP of the snapshot compiled by the policy
/// engine moatd runs (what `apply_object` feeds it), by name and priority.
fn enforced(objects: &LocalObjects) -> Vec<(String, i64)> {
    let mut engine = moat_policy::Engine::new();
    objects
        .cluster_policies
        .values()
        .map(|p| {
            engine
                .upsert_cluster_policy(p)
                .unwrap_or_else(|e| panic!("{} does not compile: {e}", p.name()));
            (p.name().to_string(), p.spec.priority)
        })
        .collect()
}

/// The Accepted condition on the stored object, once it says `status`.
fn wait_accepted(
    server: &FakeApiServer,
    kind: &str,
    name: &str,
    status: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let object = server.get(kind, "", name).expect("stored");
        let conditions = object["status"]["conditions"].as_array().cloned();
        if let Some(c) = conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c["type"] == "Accepted" && c["status"] == status)
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no Accepted={status} on {name}: {object:#}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_writes(server: &FakeApiServer, name: &str) -> usize {
    server
        .writes()
        .iter()
        .filter(|w| w.res == Res::ClusterNetworkPolicies && w.status && w.name == name)
        .count()
}

#[test]
fn cluster_network_policy_is_enforced_updated_and_deleted() {
    let server = populated_server();
    server.apply(guardrail("v1beta1", "guard", 10));
    let ds = start(&server);
    let objects = ds.snapshot().1;
    assert_eq!(enforced(&objects), vec![("guard".to_string(), 10)]);
    assert!(objects.rejected.is_empty(), "{:?}", objects.rejected);
    let status = ds.status();
    let kind = status
        .kinds
        .iter()
        .find(|k| k.kind == "clusternetworkpolicies")
        .unwrap();
    assert!(
        kind.synced && !kind.not_served && kind.objects == 1,
        "{status:#?}"
    );

    server.apply(guardrail("v1beta1", "guard", 20));
    wait_for(&ds, "CNP updated", |o| {
        enforced(o) == vec![("guard".to_string(), 20)]
    });
    server.apply(guardrail("v1beta1", "second", 30));
    wait_for(&ds, "second CNP", |o| o.cluster_policies.len() == 2);

    server.delete("ClusterNetworkPolicy", "", "guard");
    wait_for(&ds, "CNP deleted", |o| {
        enforced(o) == vec![("second".to_string(), 30)]
    });
}

#[test]
fn good_cluster_network_policy_gets_accepted_true_once() {
    let server = populated_server();
    server.apply(guardrail("v1beta1", "guard", 10));
    let ds = start(&server);
    let condition = wait_accepted(&server, "ClusterNetworkPolicy", "guard", "True");
    assert_eq!(condition["reason"], "Accepted");
    assert_eq!(condition["observedGeneration"], 1);
    assert!(condition["lastTransitionTime"].is_string(), "{condition}");
    assert!(condition["message"].as_str().unwrap().contains("accepted"));
    let write = server
        .writes()
        .into_iter()
        .find(|w| w.status && w.name == "guard")
        .unwrap();
    assert_eq!(write.method, "PATCH");
    assert!(write.content_type.contains("merge-patch"), "{write:?}");
    assert_eq!(status_writes(&server, "guard"), 1);

    // A relist, a resync and an unrelated change write nothing more: the condition already
    // says it.
    server.expire_watches();
    wait_status(&ds, "CNPs relisted", |s| {
        lists(s, "clusternetworkpolicies") >= 2
    });
    server.apply(namespace("other", json!({"team": "c"})));
    wait_for(&ds, "namespace added", |o| {
        o.namespaces.contains_key("other")
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status_writes(&server, "guard"), 1);

    // A new generation is reported as observed.
    server.apply(guardrail("v1beta1", "guard", 11));
    let deadline = Instant::now() + WAIT;
    while wait_accepted(&server, "ClusterNetworkPolicy", "guard", "True")["observedGeneration"] != 2
    {
        assert!(Instant::now() < deadline, "observedGeneration not 2");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status_writes(&server, "guard"), 2);
}

#[test]
fn invalid_cluster_network_policy_is_rejected_and_its_last_good_version_stays() {
    let server = populated_server();
    server.apply(guardrail("v1beta1", "guard", 10));
    let ds = start(&server);
    wait_accepted(&server, "ClusterNetworkPolicy", "guard", "True");

    // Accepted by the fake API server (no schema there), refused by Moat.
    server.apply(guardrail("v1beta1", "guard", 5000));
    wait_for(&ds, "CNP rejected", |o| {
        o.rejected
            .iter()
            .any(|r| r.starts_with("ClusterNetworkPolicy guard"))
    });
    let objects = ds.snapshot().1;
    assert_eq!(
        enforced(&objects),
        vec![("guard".to_string(), 10)],
        "the last good version keeps enforcing"
    );
    let rejected = objects
        .rejected
        .iter()
        .find(|r| r.starts_with("ClusterNetworkPolicy guard"))
        .unwrap();
    assert!(rejected.contains("priority"), "{rejected}");
    assert!(rejected.contains("last good version"), "{rejected}");
    let condition = wait_accepted(&server, "ClusterNetworkPolicy", "guard", "False");
    assert_eq!(condition["reason"], "Invalid");
    assert_eq!(condition["observedGeneration"], 2);
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains("priority"), "{message}");

    // A policy that was never good is rejected and enforces nothing.
    server.apply(guardrail("v1beta1", "broken", -1));
    wait_accepted(&server, "ClusterNetworkPolicy", "broken", "False");
    let objects = ds.snapshot().1;
    assert!(!objects.cluster_policies.contains_key("broken"));

    // Fixed: enforced in its new version, accepted again, nothing rejected about it.
    server.apply(guardrail("v1beta1", "guard", 15));
    wait_for(&ds, "CNP fixed", |o| {
        enforced(o).contains(&("guard".to_string(), 15))
    });
    wait_accepted(&server, "ClusterNetworkPolicy", "guard", "True");
    server.delete("ClusterNetworkPolicy", "", "broken");
    wait_for(&ds, "rejection gone with the object", |o| {
        o.rejected.is_empty()
    });
}

#[test]
fn v1alpha2_only_api_server_is_watched_at_v1alpha2() {
    let server = populated_server();
    server.set_served(Res::ClusterNetworkPolicies, false);
    server.apply(guardrail("v1alpha2", "guard", 10));
    let ds = start(&server);
    let objects = ds.snapshot().1;
    assert_eq!(enforced(&objects), vec![("guard".to_string(), 10)]);
    let status = ds.status();
    let kind = status
        .kinds
        .iter()
        .find(|k| k.kind == "clusternetworkpolicies")
        .unwrap();
    assert!(
        kind.synced && kind.healthy && !kind.not_served,
        "{status:#?}"
    );
    assert!(status.connected, "{status:#?}");
    assert_eq!(server.lists(Res::ClusterNetworkPolicies), 0);
    assert!(server.lists(Res::ClusterNetworkPoliciesV1alpha2) >= 1);
    // The status goes to the version the object was read at.
    let v1alpha2 = "policy.networking.k8s.io/v1alpha2/ClusterNetworkPolicy";
    wait_accepted(&server, v1alpha2, "guard", "True");
    server.apply(guardrail("v1alpha2", "guard", 9999));
    wait_accepted(&server, v1alpha2, "guard", "False");
    assert_eq!(enforced(&ds.snapshot().1), vec![("guard".to_string(), 10)]);
    server.delete(v1alpha2, "", "guard");
    wait_for(&ds, "CNP deleted", |o| {
        o.cluster_policies.is_empty() && o.rejected.is_empty()
    });
}

#[test]
fn cluster_without_the_cnp_crd_runs_without_cluster_policies_and_picks_it_up_later() {
    let server = populated_server();
    server.set_served(Res::ClusterNetworkPolicies, false);
    server.set_served(Res::ClusterNetworkPoliciesV1alpha2, false);
    let ds = start(&server);
    let status = ds.status();
    let kind = status
        .kinds
        .iter()
        .find(|k| k.kind == "clusternetworkpolicies")
        .unwrap();
    assert!(
        kind.not_served && kind.synced && kind.healthy && kind.errors == 0,
        "{status:#?}"
    );
    assert!(status.connected, "{status:#?}");
    assert!(ds.snapshot().1.cluster_policies.is_empty());

    // The CRD gets installed (both versions); v1beta1 is preferred.
    server.set_served(Res::ClusterNetworkPolicies, true);
    server.set_served(Res::ClusterNetworkPoliciesV1alpha2, true);
    server.apply(guardrail("v1beta1", "guard", 10));
    wait_for(&ds, "CNP after the CRD appeared", |o| {
        o.cluster_policies.contains_key("guard")
    });
    wait_status(&ds, "clusternetworkpolicies served", |s| {
        s.kinds
            .iter()
            .any(|k| k.kind == "clusternetworkpolicies" && !k.not_served)
    });
    wait_accepted(&server, "ClusterNetworkPolicy", "guard", "True");
}

fn threat_events(server: &FakeApiServer) -> Vec<serde_json::Value> {
    server
        .writes()
        .into_iter()
        .filter(|w| w.res == Res::Events && w.method == "POST")
        .map(|w| w.body)
        .collect()
}

#[test]
fn a_detection_becomes_a_warning_event_on_the_pod_once_per_window() {
    let server = populated_server();
    let ds = start(&server);
    let poster = ds.event_poster();
    let record = moatd::api::ThreatRecord {
        kind: "port-scan".into(),
        source: "10.0.1.5".into(),
        source_pod: Some("shop/web".into()),
        count: 60,
        distinct: Some(40),
        refused: Some(55),
        samples: vec!["22".into(), "23".into()],
        window_ms: 3_000,
        response: "log".into(),
        ..Default::default()
    };
    poster.post(&record, Some("uid-web"));
    // The same pod and kind again at once: held back by the rate bound.
    poster.post(&record, Some("uid-web"));
    let deadline = Instant::now() + WAIT;
    while threat_events(&server).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let events = threat_events(&server);
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event["metadata"]["namespace"], "shop");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "ThreatDetected");
    assert_eq!(
        event["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web", "uid": "uid-web"})
    );
    let message = event["message"].as_str().unwrap();
    assert!(
        message.starts_with("port-scan from shop/web: count 60, ~40 distinct, 55 refused"),
        "{message}"
    );
    assert_eq!(event["source"]["host"], NODE);
    // The API server kept it: `kubectl get events -n shop` shows it.
    let name = event["metadata"]["name"].as_str().unwrap();
    assert!(server.get("Event", "shop", name).is_some());
    // Another kind about the same pod is an Event of its own.
    poster.post(
        &moatd::api::ThreatRecord {
            kind: "host-sweep".into(),
            ..record
        },
        None,
    );
    let deadline = Instant::now() + WAIT;
    while threat_events(&server).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(threat_events(&server).len(), 2);
}
