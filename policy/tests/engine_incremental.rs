//! The incremental engine against a from-scratch compile: after any sequence of events,
//! the deltas applied to an empty state must equal `compile` of the same inputs, at every
//! step. Plus tests that pin what an event is allowed to touch.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_policy::{
    ContainerPort, DatapathState, Engine, Identity, LabelSet, MoatPolicy, Mode, NetworkPolicy, Pod,
    PodRef, Protocol, compile,
};
use proptest::prelude::*;

const POLICIES: &[&str] = &[
    // Ingress by named port from pods of the same namespace.
    r#"{"podSelector":{"matchLabels":{"app":"web"}},"ingress":[{"from":[{"podSelector":{}}],"ports":[{"port":"http"}]}]}"#,
    // Egress to a named port of db pods in any namespace of team t1.
    r#"{"podSelector":{},"egress":[{"to":[{"namespaceSelector":{"matchLabels":{"team":"t1"}},"podSelector":{"matchLabels":{"app":"db"}}}],"ports":[{"port":"http"}]}]}"#,
    // ipBlock with an except that is a pod address, and a long port range.
    r#"{"podSelector":{"matchLabels":{"app":"db"}},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/24","except":["10.0.0.2/32"]}}],"ports":[{"port":1000,"endPort":2000,"protocol":"UDP"}]}]}"#,
    // Default deny both ways.
    r#"{"podSelector":{},"policyTypes":["Ingress","Egress"]}"#,
    // Short range and protocol-only port, all namespaces.
    r#"{"podSelector":{"matchExpressions":[{"key":"tier","operator":"Exists"}]},"ingress":[{"from":[{"namespaceSelector":{}}],"ports":[{"port":80,"endPort":83},{"protocol":"SCTP"}]}]}"#,
    // Egress named port to an ipBlock covering some pod addresses, with an except.
    r#"{"podSelector":{"matchLabels":{"app":"api"}},"egress":[{"to":[{"ipBlock":{"cidr":"10.0.0.0/29","except":["10.0.0.4/30"]}}],"ports":[{"port":"http"},{"port":"dns","protocol":"UDP"}]}]}"#,
    // Egress named port to everyone.
    r#"{"podSelector":{"matchLabels":{"app":"web"}},"egress":[{"ports":[{"port":"dns","protocol":"UDP"}]}]}"#,
    // Two rules: prod api pods from any namespace, and IPv6 egress.
    r#"{"podSelector":{},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"env":"prod"}},"podSelector":{"matchLabels":{"app":"api"}}}]},{"from":[{"podSelector":{"matchLabels":{"tier":"1"}}}],"ports":[{"port":443}]}],"egress":[{"to":[{"ipBlock":{"cidr":"fd00::/64"}}],"ports":[{"port":443}]}]}"#,
    // Ingress from pods of namespaces without a team, on a named port and a plain one.
    r#"{"podSelector":{"matchLabels":{"app":"db"}},"ingress":[{"from":[{"namespaceSelector":{"matchExpressions":[{"key":"team","operator":"DoesNotExist"}]}}],"ports":[{"port":"http"},{"port":5432}]}]}"#,
];

const MOAT_POLICIES: &[&str] = &[
    // Mode only.
    r#"{"podSelector":{"matchLabels":{"app":"web"}},"mode":"audit"}"#,
    // Default deny with a mode.
    r#"{"podSelector":{"matchExpressions":[{"key":"tier","operator":"Exists"}]},"mode":"learn","defaultDeny":true}"#,
    // Groups referenced by egress (named port) and ingress rules.
    r#"{"podSelector":{},"externalGroups":[{"name":"partners","cidrs":["203.0.113.0/24","10.0.0.0/30"]},{"name":"v6","cidrs":["2001:db8::/32"]}],"egress":[{"to":[{"group":"partners"}],"ports":[{"port":"http"},{"port":80}]}],"ingress":[{"from":[{"group":"v6"},{"group":"partners"}],"ports":[{"port":22}]}]}"#,
    // Enforce on db, default deny.
    r#"{"podSelector":{"matchLabels":{"app":"db"}},"mode":"enforce","defaultDeny":true}"#,
    // Learn everywhere.
    r#"{"podSelector":{},"mode":"learn"}"#,
    // DNS names: an exact name and a wildcard, a port and a long range (port-range entries).
    r#"{"podSelector":{"matchLabels":{"app":"web"}},"egress":[{"to":[{"fqdn":"api.example.com"},{"fqdn":"*.example.com"}],"ports":[{"port":443},{"port":8000,"endPort":8100}]}]}"#,
    // A wildcard another policy names too, beside a group rule, every port.
    r#"{"podSelector":{},"externalGroups":[{"name":"dns","cidrs":["10.0.0.0/30"]}],"egress":[{"to":[{"group":"dns"}],"ports":[{"port":53,"protocol":"UDP"}]},{"to":[{"fqdn":"*.example.com"},{"fqdn":"db.internal.example"}]}]}"#,
];

#[derive(Clone, Debug)]
enum Op {
    UpsertNamespace(usize, Option<&'static str>, bool),
    DeleteNamespace(usize),
    UpsertPod {
        ns: usize,
        name: usize,
        app: usize,
        tier: bool,
        hash: usize,
        ip: u8,
        v6: bool,
        ports: usize,
    },
    DeletePod(usize, usize),
    UpsertPolicy(usize, usize, usize),
    DeletePolicy(usize, usize),
    UpsertMoat(usize, usize, usize),
    DeleteMoat(usize, usize),
    HostIps(usize),
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 4] = ["a", "b", "c", "d"];
const SLOTS: usize = 3;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (
            0..3usize,
            prop_oneof![Just(None), Just(Some("t1")), Just(Some("t2"))],
            any::<bool>(),
        )
            .prop_map(|(n, t, prod)| Op::UpsertNamespace(n, t, prod)),
        1 => (0..3usize).prop_map(Op::DeleteNamespace),
        8 => (
            0..3usize,
            0..4usize,
            0..3usize,
            any::<bool>(),
            0..2usize,
            1..9u8,
            any::<bool>(),
            0..4usize,
        )
            .prop_map(|(ns, name, app, tier, hash, ip, v6, ports)| Op::UpsertPod {
                ns,
                name,
                app,
                tier,
                hash,
                ip,
                v6,
                ports,
            }),
        3 => (0..3usize, 0..4usize).prop_map(|(n, p)| Op::DeletePod(n, p)),
        4 => (0..3usize, 0..SLOTS, 0..POLICIES.len()).prop_map(|(n, s, p)| Op::UpsertPolicy(n, s, p)),
        2 => (0..3usize, 0..SLOTS).prop_map(|(n, s)| Op::DeletePolicy(n, s)),
        2 => (0..3usize, 0..2usize, 0..MOAT_POLICIES.len()).prop_map(|(n, s, p)| Op::UpsertMoat(n, s, p)),
        1 => (0..3usize, 0..2usize).prop_map(|(n, s)| Op::DeleteMoat(n, s)),
        1 => (0..3usize).prop_map(Op::HostIps),
    ]
}

fn policy(ns: usize, slot: usize, index: usize) -> NetworkPolicy {
    let spec: serde_json::Value = serde_json::from_str(POLICIES[index]).unwrap();
    NetworkPolicy::from_value(serde_json::json!({
        "metadata": {"name": format!("p{slot}"), "namespace": NAMESPACES[ns]},
        "spec": spec,
    }))
    .unwrap()
}

fn moat_policy(ns: usize, slot: usize, index: usize) -> MoatPolicy {
    let spec: serde_json::Value = serde_json::from_str(MOAT_POLICIES[index]).unwrap();
    MoatPolicy::from_value(serde_json::json!({
        "apiVersion": "moat.io/v1alpha1",
        "kind": "MoatPolicy",
        // Same names as the NetworkPolicies: rule ids must still differ.
        "metadata": {"name": format!("p{slot}"), "namespace": NAMESPACES[ns]},
        "spec": spec,
    }))
    .unwrap()
}

fn container_ports(choice: usize) -> Vec<ContainerPort> {
    let port = |name: &str, port: u16, protocol: Protocol| ContainerPort {
        name: name.into(),
        port,
        protocol,
    };
    match choice {
        0 => vec![],
        1 => vec![port("http", 80, Protocol::TCP)],
        2 => vec![port("http", 8080, Protocol::TCP)],
        _ => vec![
            port("http", 80, Protocol::TCP),
            port("dns", 53, Protocol::UDP),
        ],
    }
}

fn run(engine: &mut Engine, op: &Op) -> moat_policy::Delta {
    match op.clone() {
        Op::UpsertNamespace(n, team, prod) => {
            let mut labels: LabelSet = team.map(|t| ("team", t)).into_iter().collect();
            if prod {
                labels.insert("env", "prod");
            }
            engine.upsert_namespace(NAMESPACES[n], labels)
        }
        Op::DeleteNamespace(n) => engine.delete_namespace(NAMESPACES[n]),
        Op::UpsertPod {
            ns,
            name,
            app,
            tier,
            hash,
            ip,
            v6,
            ports,
        } => {
            let mut labels: LabelSet = [
                ("app", ["web", "db", "api"][app]),
                ("pod-template-hash", ["h1", "h2"][hash]),
            ]
            .into_iter()
            .collect();
            if tier {
                labels.insert("tier", "1");
            }
            let mut ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, ip))];
            if v6 {
                ips.push(IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    ip.into(),
                )));
            }
            engine.upsert_pod(Pod {
                namespace: NAMESPACES[ns].into(),
                name: PODS[name].into(),
                labels,
                ips,
                ports: container_ports(ports),
            })
        }
        Op::DeletePod(n, p) => engine.delete_pod(&PodRef::new(NAMESPACES[n], PODS[p])),
        Op::UpsertPolicy(n, s, p) => engine.upsert_policy(&policy(n, s, p)),
        Op::DeletePolicy(n, s) => engine.delete_policy(NAMESPACES[n], &format!("p{s}")),
        Op::UpsertMoat(n, s, p) => engine.upsert_moat_policy(&moat_policy(n, s, p)),
        Op::DeleteMoat(n, s) => engine.delete_moat_policy(NAMESPACES[n], &format!("p{s}")),
        Op::HostIps(choice) => {
            let ips: &[&str] = [&["10.0.0.1"][..], &["10.0.0.1", "10.0.0.3"], &[]][choice];
            engine.set_host_ips(ips.iter().map(|s| s.parse().unwrap()).collect())
        }
    }
    .expect("small policies always compile")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn deltas_replayed_from_empty_equal_a_from_scratch_compile(ops in proptest::collection::vec(op(), 1..120)) {
        let mut engine = Engine::new();
        let mut replayed = DatapathState::default();
        engine.set_host_ips(["10.0.0.1".parse().unwrap()].into()).unwrap().apply(&mut replayed);
        for op in &ops {
            let delta = run(&mut engine, op);
            delta.apply(&mut replayed);
            prop_assert_eq!(&replayed, engine.state(), "after {:?}", op);
            prop_assert_eq!(&replayed, &compile(engine.inputs()).unwrap(), "after {:?}", op);
        }
    }
}

fn web_pod(ns: &str, name: &str, ip: u8, hash: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app", "web"), ("pod-template-hash", hash)]
            .into_iter()
            .collect(),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, ip))],
        ports: vec![],
    }
}

fn app_pod(ns: &str, name: &str, app: &str, ip: u8) -> Pod {
    Pod {
        labels: [("app", app)].into_iter().collect(),
        ports: container_ports(1),
        ..web_pod(ns, name, ip, "h")
    }
}

fn policy_ids(delta: &moat_policy::Delta) -> BTreeSet<u32> {
    delta
        .policy
        .upserts
        .keys()
        .chain(&delta.policy.deletes)
        .map(|k| k.policy_id)
        .collect()
}

#[test]
fn a_pod_of_a_known_identity_changes_only_endpoint_and_ipcache() {
    // No policy: each identity gets its NOT_ISOLATED entries, written once per identity.
    let mut engine = Engine::new();
    let first = engine.upsert_pod(web_pod("x", "a", 2, "h1")).unwrap();
    assert!(
        !first.policy.is_empty(),
        "a new identity brings its policy entries"
    );
    let second = engine.upsert_pod(web_pod("x", "b", 3, "h2")).unwrap();
    assert!(second.touches_only_endpoints_and_ipcache(), "{second:?}");
    assert_eq!(second.endpoints.upserts.len(), 1);
    assert_eq!(second.ipcache.upserts.len(), 1);
    let gone = engine.delete_pod(&PodRef::new("x", "b")).unwrap();
    assert!(gone.touches_only_endpoints_and_ipcache(), "{gone:?}");
}

#[test]
fn a_known_identity_stays_cheap_even_with_named_ports_elsewhere() {
    let mut engine = Engine::new();
    engine.upsert_pod(web_pod("x", "a", 2, "h1")).unwrap();
    engine.upsert_pod(app_pod("y", "d", "db", 9)).unwrap();
    // A named-port policy in another namespace: it cannot concern x's web pods.
    engine.upsert_policy(&policy(1, 0, 0)).unwrap();
    let delta = engine.upsert_pod(web_pod("x", "b", 3, "h2")).unwrap();
    assert!(delta.touches_only_endpoints_and_ipcache(), "{delta:?}");
}

#[test]
fn a_policy_change_recompiles_only_the_identities_it_selects() {
    let mut engine = Engine::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, app) in ["web", "db", "api"].iter().enumerate() {
            engine
                .upsert_pod(app_pod(ns, app, app, (10 * i + j + 2) as u8))
                .unwrap();
        }
    }
    let web_x = engine.state().endpoints[&PodRef::new("x", "web")].identity;
    // Selects x's web pods, allows from every pod of x.
    let delta = engine.upsert_policy(&policy(0, 0, 0)).unwrap();
    assert_eq!(policy_ids(&delta), [web_x.0].into());
    assert!(delta.endpoints.is_empty() && delta.ipcache.is_empty());
    let delta = engine.delete_policy("x", "p0").unwrap();
    assert_eq!(policy_ids(&delta), [web_x.0].into());
}

#[test]
fn a_pod_with_a_new_identity_recompiles_itself_and_the_rules_that_match_it() {
    let mut engine = Engine::new();
    engine.upsert_namespace("y", LabelSet::new()).unwrap();
    engine
        .upsert_namespace("x", [("team", "t1")].into_iter().collect())
        .unwrap();
    engine.upsert_pod(app_pod("y", "web", "web", 2)).unwrap();
    engine.upsert_pod(app_pod("y", "api", "api", 3)).unwrap();
    let web_y = engine.state().endpoints[&PodRef::new("y", "web")].identity;
    let api_y = engine.state().endpoints[&PodRef::new("y", "api")].identity;
    // y's pods may send to db pods of team t1 namespaces (named port).
    engine.upsert_policy(&policy(1, 0, 1)).unwrap();

    // A db pod in x: matches the peer; y's identities gain entries, nothing else changes.
    let delta = engine.upsert_pod(app_pod("x", "db", "db", 4)).unwrap();
    let db_x = engine.state().endpoints[&PodRef::new("x", "db")].identity;
    assert_eq!(policy_ids(&delta), [db_x.0, web_y.0, api_y.0].into());
    assert!(
        delta
            .policy
            .upserts
            .keys()
            .any(|k| k.policy_id == web_y.0 && k.remote_identity == db_x.0)
    );

    // A web pod in x: matches no peer; only its own entries are written.
    let delta = engine.upsert_pod(app_pod("x", "web", "web", 5)).unwrap();
    let web_x = engine.state().endpoints[&PodRef::new("x", "web")].identity;
    assert_eq!(policy_ids(&delta), [web_x.0].into());
    assert_eq!(delta.identities.upserts.len(), 1);
}

#[test]
fn a_namespace_label_change_touches_only_what_it_affects() {
    let mut engine = Engine::new();
    for ns in ["x", "y", "z"] {
        engine.upsert_namespace(ns, LabelSet::new()).unwrap();
        engine.upsert_pod(app_pod(ns, "db", "db", 0)).unwrap();
    }
    // Give pods distinct addresses.
    for (i, ns) in ["x", "y", "z"].iter().enumerate() {
        engine
            .upsert_pod(app_pod(ns, "db", "db", (i + 2) as u8))
            .unwrap();
    }
    engine.upsert_pod(app_pod("z", "web", "web", 9)).unwrap();
    let web_z = engine.state().endpoints[&PodRef::new("z", "web")].identity;
    let db_y = engine.state().endpoints[&PodRef::new("y", "db")].identity;
    // z's pods may send to db pods of team t1 namespaces.
    engine.upsert_policy(&policy(2, 0, 1)).unwrap();
    let delta = engine
        .upsert_namespace("x", [("team", "t1")].into_iter().collect())
        .unwrap();
    let db_x = engine.state().endpoints[&PodRef::new("x", "db")].identity;
    let touched = policy_ids(&delta);
    assert!(
        touched.contains(&db_x.0),
        "x's pods have a new identity: {touched:?}"
    );
    assert!(
        touched.contains(&web_z.0),
        "z's egress rule now matches x's db"
    );
    assert!(!touched.contains(&db_y.0), "y is not concerned");
}

#[test]
fn moat_policy_modes_and_default_deny_are_compiled() {
    let mut engine = Engine::new();
    engine.upsert_pod(app_pod("x", "web", "web", 2)).unwrap();
    engine.upsert_pod(app_pod("x", "db", "db", 3)).unwrap();
    let web = PodRef::new("x", "web");
    let db = PodRef::new("x", "db");
    let delta = engine.upsert_moat_policy(&moat_policy(0, 0, 0)).unwrap();
    assert_eq!(
        delta.modes.upserts,
        [(web.clone(), Mode::Audit)].into_iter().collect()
    );
    assert!(
        delta.policy.is_empty(),
        "a mode-only MoatPolicy isolates nothing"
    );
    // Default deny on db: no NetworkPolicy, yet isolated both ways.
    engine.upsert_moat_policy(&moat_policy(0, 1, 3)).unwrap();
    assert_eq!(engine.state().modes[&db], Mode::Enforce);
    let s = engine.state();
    let flow = |from: &PodRef, to: &PodRef| {
        moat_policy::evaluate(
            s,
            &moat_policy::FlowEnd::Pod(from.clone()),
            &moat_policy::FlowEnd::Pod(to.clone()),
            80,
            moat_common::PROTO_TCP,
        )
        .unwrap()
        .allowed
    };
    assert!(!flow(&web, &db) && !flow(&db, &web));
    // Strictest wins when several MoatPolicies select a pod.
    engine.upsert_moat_policy(&moat_policy(0, 2, 4)).unwrap();
    assert_eq!(engine.state().modes[&web], Mode::Audit);
    assert_eq!(engine.state().modes[&db], Mode::Enforce);
    engine.delete_moat_policy("x", "p0").unwrap();
    assert_eq!(engine.state().modes[&web], Mode::Learn);
    engine.delete_moat_policy("x", "p2").unwrap();
    assert!(!engine.state().modes.contains_key(&web));
    assert_eq!(engine.state(), &compile(engine.inputs()).unwrap());
}

#[test]
fn moat_policy_groups_allow_what_they_name() {
    let mut engine = Engine::new();
    let mut web = app_pod("x", "web", "web", 9);
    web.ports = container_ports(1);
    engine.upsert_pod(web).unwrap();
    engine.upsert_moat_policy(&moat_policy(0, 0, 2)).unwrap();
    let s = engine.state();
    let check = |to: &str, port: u16| {
        moat_policy::evaluate(
            s,
            &moat_policy::FlowEnd::Pod(PodRef::new("x", "web")),
            &moat_policy::FlowEnd::Address(to.parse().unwrap()),
            port,
            moat_common::PROTO_TCP,
        )
        .unwrap()
    };
    let v = check("203.0.113.7", 80);
    assert!(v.allowed, "{v:?}");
    assert_eq!(
        v.rule.unwrap().to_string(),
        "MoatPolicy x/p0 egress[0]",
        "explanations name the MoatPolicy"
    );
    assert!(!check("203.0.113.7", 443).allowed);
    assert!(!check("198.51.100.1", 80).allowed);
}

#[test]
fn a_failed_event_leaves_the_engine_consistent() {
    let mut engine = Engine::new();
    engine.upsert_pod(web_pod("x", "a", 2, "h1")).unwrap();
    let before = engine.state().clone();
    // More disjoint ports on one ipBlock than a PortRuleSet holds.
    let ports: Vec<serde_json::Value> = (0..64)
        .map(|i| serde_json::json!({"port": 1000 + 2 * i}))
        .collect();
    let p = NetworkPolicy::from_value(serde_json::json!({
        "metadata": {"name": "big", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "1.2.3.0/24"}}], "ports": ports}]},
    }))
    .unwrap();
    assert!(matches!(
        engine.upsert_policy(&p),
        Err(moat_policy::Error::TooManyPortRules { .. })
    ));
    assert_eq!(engine.state(), &before);
    assert!(engine.inputs().policies.is_empty());
    let delta = engine.upsert_pod(web_pod("x", "b", 3, "h2")).unwrap();
    assert!(delta.touches_only_endpoints_and_ipcache());
    assert_eq!(engine.state(), &compile(engine.inputs()).unwrap());
}

#[test]
fn identities_are_hashed_into_the_derived_range() {
    let mut engine = Engine::new();
    engine.upsert_pod(web_pod("x", "a", 2, "h1")).unwrap();
    let id: Identity = engine.state().endpoints[&PodRef::new("x", "a")].identity;
    assert!(!id.is_reserved());
}
