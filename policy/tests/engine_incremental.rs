//! The incremental engine against a from-scratch compile: after any sequence of events,
//! the deltas applied to an empty state must equal `compile` of the same inputs.

use std::net::{IpAddr, Ipv4Addr};

use moat_policy::{
    ContainerPort, DatapathState, Engine, LabelSet, NetworkPolicy, Pod, PodRef, Protocol, compile,
};
use proptest::prelude::*;

const POLICIES: &[&str] = &[
    // Ingress by named port from pods of the same namespace.
    r#"{"spec":{"podSelector":{"matchLabels":{"app":"web"}},"ingress":[{"from":[{"podSelector":{}}],"ports":[{"port":"http"}]}]}}"#,
    // Egress to a named port of db pods in any namespace of team t1.
    r#"{"spec":{"podSelector":{},"egress":[{"to":[{"namespaceSelector":{"matchLabels":{"team":"t1"}},"podSelector":{"matchLabels":{"app":"db"}}}],"ports":[{"port":"http"}]}]}}"#,
    // ipBlock with an except that is a pod address, and a long port range.
    r#"{"spec":{"podSelector":{"matchLabels":{"app":"db"}},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/24","except":["10.0.0.2/32"]}}],"ports":[{"port":1000,"endPort":2000,"protocol":"UDP"}]}]}}"#,
    // Default deny both ways.
    r#"{"spec":{"podSelector":{},"policyTypes":["Ingress","Egress"]}}"#,
    // Short range and protocol-only port, all namespaces.
    r#"{"spec":{"podSelector":{"matchExpressions":[{"key":"tier","operator":"Exists"}]},"ingress":[{"from":[{"namespaceSelector":{}}],"ports":[{"port":80,"endPort":83},{"protocol":"SCTP"}]}]}}"#,
];

#[derive(Clone, Debug)]
enum Op {
    UpsertNamespace(usize, Option<&'static str>),
    DeleteNamespace(usize),
    UpsertPod {
        ns: usize,
        name: usize,
        app: usize,
        tier: bool,
        hash: usize,
        ip: u8,
        port: usize,
    },
    DeletePod(usize, usize),
    UpsertPolicy(usize, usize),
    DeletePolicy(usize, usize),
}

const NAMESPACES: [&str; 2] = ["x", "y"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0..2usize,
            prop_oneof![Just(None), Just(Some("t1")), Just(Some("t2"))]
        )
            .prop_map(|(n, t)| Op::UpsertNamespace(n, t)),
        (0..2usize).prop_map(Op::DeleteNamespace),
        (
            0..2usize,
            0..3usize,
            0..2usize,
            any::<bool>(),
            0..2usize,
            1..6u8,
            0..3usize
        )
            .prop_map(|(ns, name, app, tier, hash, ip, port)| Op::UpsertPod {
                ns,
                name,
                app,
                tier,
                hash,
                ip,
                port
            }),
        (0..2usize, 0..3usize).prop_map(|(n, p)| Op::DeletePod(n, p)),
        (0..2usize, 0..POLICIES.len()).prop_map(|(n, p)| Op::UpsertPolicy(n, p)),
        (0..2usize, 0..POLICIES.len()).prop_map(|(n, p)| Op::DeletePolicy(n, p)),
    ]
}

fn policy(ns: usize, index: usize) -> NetworkPolicy {
    let mut v: serde_json::Value = serde_json::from_str(POLICIES[index]).unwrap();
    v["metadata"] = serde_json::json!({"name": format!("p{index}"), "namespace": NAMESPACES[ns]});
    NetworkPolicy::from_value(v).unwrap()
}

fn run(engine: &mut Engine, op: &Op) -> moat_policy::Delta {
    match op.clone() {
        Op::UpsertNamespace(n, team) => {
            let labels: LabelSet = team.map(|t| ("team", t)).into_iter().collect();
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
            port,
        } => {
            let mut labels: LabelSet = [
                ("app", ["web", "db"][app]),
                ("pod-template-hash", ["h1", "h2"][hash]),
            ]
            .into_iter()
            .collect();
            if tier {
                labels.insert("tier", "1");
            }
            let ports = match port {
                0 => vec![],
                n => vec![ContainerPort {
                    name: "http".into(),
                    port: [80, 8080][n - 1],
                    protocol: Protocol::TCP,
                }],
            };
            engine.upsert_pod(Pod {
                namespace: NAMESPACES[ns].into(),
                name: PODS[name].into(),
                labels,
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, ip))],
                ports,
            })
        }
        Op::DeletePod(n, p) => engine.delete_pod(&PodRef::new(NAMESPACES[n], PODS[p])),
        Op::UpsertPolicy(n, p) => engine.upsert_policy(&policy(n, p)),
        Op::DeletePolicy(n, p) => engine.delete_policy(NAMESPACES[n], &format!("p{p}")),
    }
    .expect("small policies always compile")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn deltas_replayed_from_empty_equal_a_from_scratch_compile(ops in proptest::collection::vec(op(), 1..40)) {
        let mut engine = Engine::new();
        let mut replayed = DatapathState::default();
        engine.set_host_ips(["10.0.0.1".parse().unwrap()].into()).unwrap().apply(&mut replayed);
        for op in &ops {
            let delta = run(&mut engine, op);
            delta.apply(&mut replayed);
            prop_assert_eq!(&replayed, engine.state());
        }
        prop_assert_eq!(&replayed, &compile(engine.inputs()).unwrap());
    }
}

#[test]
fn a_pod_of_a_known_identity_changes_only_endpoint_and_ipcache() {
    // No policy: each identity gets its NOT_ISOLATED entries, written once per identity.
    let mut engine = Engine::new();
    let pod = |name: &str, ip: u8, hash: &str| Pod {
        namespace: "x".into(),
        name: name.into(),
        labels: [("app", "web"), ("pod-template-hash", hash)]
            .into_iter()
            .collect(),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, ip))],
        ports: vec![],
    };
    let first = engine.upsert_pod(pod("a", 2, "h1")).unwrap();
    assert!(
        !first.policy.is_empty(),
        "a new identity brings its policy entries"
    );
    let second = engine.upsert_pod(pod("b", 3, "h2")).unwrap();
    assert!(second.touches_only_endpoints_and_ipcache(), "{second:?}");
    assert_eq!(second.endpoints.upserts.len(), 1);
    assert_eq!(second.ipcache.upserts.len(), 1);
    let gone = engine.delete_pod(&PodRef::new("x", "b")).unwrap();
    assert!(gone.touches_only_endpoints_and_ipcache(), "{gone:?}");
}
