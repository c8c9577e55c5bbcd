//! Compilation decisions pinned through the evaluator: named-port precision, host traffic,
//! ipBlock excepts on pod addresses, port ranges, rule explanations.

use std::net::IpAddr;

use moat_common::{PROTO_TCP, PROTO_UDP, rule};
use moat_policy::{
    ClusterInputs, ContainerPort, DatapathState, FlowEnd, NetworkPolicy, Pod, PodRef, Protocol,
    compile, evaluate,
};

fn pod(ns: &str, name: &str, app: &str, ip: &str, http: Option<u16>) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app", app)].into_iter().collect(),
        ips: vec![ip.parse().unwrap()],
        ports: http
            .map(|port| ContainerPort {
                name: "http".into(),
                port,
                protocol: Protocol::TCP,
            })
            .into_iter()
            .collect(),
    }
}

fn state(pods: Vec<Pod>, policies: &[&str]) -> DatapathState {
    let mut inputs = ClusterInputs::default();
    inputs.host_ips.insert("192.168.0.1".parse().unwrap());
    for p in pods {
        inputs.pods.insert(p.pod_ref(), p);
    }
    for yaml in policies {
        let p = NetworkPolicy::from_yaml(yaml).unwrap().normalize().unwrap();
        inputs
            .policies
            .insert((p.namespace.clone(), p.name.clone()), p);
    }
    compile(&inputs).unwrap()
}

fn allowed(s: &DatapathState, from: &str, to: &str, port: u16, proto: u8) -> bool {
    let end = |x: &str| match x.parse::<IpAddr>() {
        Ok(ip) => FlowEnd::Address(ip),
        Err(_) => {
            let (ns, n) = x.split_once('/').unwrap();
            FlowEnd::Pod(PodRef::new(ns, n))
        }
    };
    evaluate(s, &end(from), &end(to), port, proto)
        .unwrap()
        .allowed
}

const INGRESS_HTTP: &str = "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: http}]\n";

#[test]
fn ingress_named_port_resolves_per_pod_even_within_one_identity() {
    let s = state(
        vec![
            pod("x", "w1", "web", "10.0.0.1", Some(80)),
            pod("x", "w2", "web", "10.0.0.2", Some(8080)),
            pod("x", "c", "client", "10.0.0.3", None),
        ],
        &[INGRESS_HTTP],
    );
    let (e1, e2) = (
        &s.endpoints[&PodRef::new("x", "w1")],
        &s.endpoints[&PodRef::new("x", "w2")],
    );
    assert_eq!(e1.identity, e2.identity);
    assert_ne!(
        e1.policy_id, e2.policy_id,
        "differently resolving pods need their own entries"
    );
    assert!(e1.policy_id == e1.identity.0 || e2.policy_id == e2.identity.0);
    assert!([e1.policy_id, e2.policy_id].iter().any(|p| *p >= 1 << 24));
    assert!(allowed(&s, "x/c", "x/w1", 80, PROTO_TCP));
    assert!(!allowed(&s, "x/c", "x/w1", 8080, PROTO_TCP));
    assert!(allowed(&s, "x/c", "x/w2", 8080, PROTO_TCP));
    assert!(!allowed(&s, "x/c", "x/w2", 80, PROTO_TCP));
}

#[test]
fn egress_named_port_is_exact_when_one_identity_resolves_it_differently() {
    let egress = "metadata: {name: out, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: http}]\n";
    let s = state(
        vec![
            pod("x", "w1", "web", "10.0.0.1", Some(80)),
            pod("x", "w2", "web", "10.0.0.2", Some(8080)),
            pod("x", "c", "client", "10.0.0.3", None),
        ],
        &[egress],
    );
    assert!(allowed(&s, "x/c", "x/w1", 80, PROTO_TCP));
    assert!(!allowed(&s, "x/c", "x/w1", 8080, PROTO_TCP));
    assert!(allowed(&s, "x/c", "x/w2", 8080, PROTO_TCP));
    assert!(!allowed(&s, "x/c", "x/w2", 80, PROTO_TCP));
}

#[test]
fn the_node_is_always_allowed_and_the_world_is_not_when_isolated() {
    let deny = "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n";
    let s = state(vec![pod("x", "w", "web", "10.0.0.1", None)], &[deny]);
    let v = evaluate(
        &s,
        &FlowEnd::Address("192.168.0.1".parse().unwrap()),
        &FlowEnd::Pod(PodRef::new("x", "w")),
        80,
        PROTO_TCP,
    )
    .unwrap();
    assert!(v.allowed);
    assert_eq!(v.rule_id, rule::HOST);
    assert!(!allowed(&s, "8.8.8.8", "x/w", 80, PROTO_TCP));
    // Egress is not isolated by an ingress-only policy.
    assert!(allowed(&s, "x/w", "8.8.8.8", 443, PROTO_TCP));
}

#[test]
fn ip_block_except_cuts_out_one_pod_address() {
    let p = "metadata: {name: cidr, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.2/32]}}]\n";
    let s = state(
        vec![
            pod("x", "w", "web", "10.0.0.9", None),
            pod("x", "c1", "client", "10.0.0.1", None),
            pod("x", "c2", "client", "10.0.0.2", None),
        ],
        &[p],
    );
    assert!(allowed(&s, "x/c1", "x/w", 80, PROTO_TCP));
    assert!(
        !allowed(&s, "x/c2", "x/w", 80, PROTO_TCP),
        "same identity as c1, but excepted by address"
    );
    assert!(!allowed(&s, "10.0.1.1", "x/w", 80, PROTO_TCP));
}

#[test]
fn long_port_ranges_use_the_range_map_and_short_ones_exact_keys() {
    let p = "metadata: {name: ranges, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 1000, endPort: 2000, protocol: UDP}, {port: 80, endPort: 82}]\n";
    let s = state(vec![pod("x", "w", "web", "10.0.0.1", None)], &[p]);
    assert_eq!(s.port_ranges.len(), 1);
    assert!(allowed(&s, "1.2.3.4", "x/w", 1500, PROTO_UDP));
    assert!(!allowed(&s, "1.2.3.4", "x/w", 1500, PROTO_TCP));
    assert!(!allowed(&s, "1.2.3.4", "x/w", 2001, PROTO_UDP));
    assert!(allowed(&s, "1.2.3.4", "x/w", 82, PROTO_TCP));
    assert!(!allowed(&s, "1.2.3.4", "x/w", 83, PROTO_TCP));
}

#[test]
fn verdicts_name_the_rule_that_allowed_them() {
    let s = state(
        vec![
            pod("x", "w", "web", "10.0.0.1", Some(80)),
            pod("x", "c", "client", "10.0.0.2", None),
        ],
        &[INGRESS_HTTP],
    );
    let v = evaluate(
        &s,
        &FlowEnd::Pod(PodRef::new("x", "c")),
        &FlowEnd::Pod(PodRef::new("x", "w")),
        80,
        PROTO_TCP,
    )
    .unwrap();
    let r = v.rule.expect("a user rule");
    assert_eq!(
        (r.namespace.as_str(), r.policy.as_str(), r.index),
        ("x", "web", 0)
    );
    assert!(v.rule_id >= rule::FIRST_USER);
    assert_eq!(v.egress.unwrap().rule_id, rule::NOT_ISOLATED);
}
