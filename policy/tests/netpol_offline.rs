//! Offline NetworkPolicy conformance: every case of the shared conformance file (upstream
//! e2e and cyclonus) compiled through the incremental engine and judged by the evaluator.
//! No kernel, so SCTP probes run here too. Loopback probes are reported, not failed, as
//! upstream ignores them (kubernetes/kubernetes#95879).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use moat_policy::{
    ContainerPort, Engine, FlowEnd, LabelSet, NetworkPolicy, Pod, PodRef, Protocol, compile,
    evaluate,
};
use serde_json::Value;

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../conformance/cases/netpol-cases.json"
);

/// Deterministic pod addresses: 10.244.<namespace index + 1>.<pod index + 10>.
fn pod_ip(pod: &str, namespaces: &[String], pod_names: &[String]) -> IpAddr {
    let (ns, name) = pod.split_once('/').expect("ns/pod");
    let n = namespaces
        .iter()
        .position(|x| x == ns)
        .expect("known namespace") as u8;
    let p = pod_names.iter().position(|x| x == name).expect("known pod") as u8;
    IpAddr::V4(Ipv4Addr::new(10, 244, n + 1, p + 10))
}

fn labels(v: &Value) -> LabelSet {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("string label").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn protocol(name: &str) -> Protocol {
    match name {
        "TCP" => Protocol::TCP,
        "UDP" => Protocol::UDP,
        "SCTP" => Protocol::SCTP,
        other => panic!("unknown protocol {other}"),
    }
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
    failures: Vec<String>,
    loopback_reports: BTreeMap<String, usize>,
}

#[test]
fn every_conformance_probe_matches_its_expectation() {
    let text = std::fs::read_to_string(CASES).unwrap_or_else(|e| {
        panic!("conformance cases not found at {CASES}: {e}. The shared/ directory must sit next to the repository (as in CI); this test must not pass without it.")
    });
    let doc: Value = serde_json::from_str(&text).expect("netpol-cases.json is JSON");
    let model = &doc["model"];
    let pod_order: Vec<String> = model["podOrder"]
        .as_array()
        .expect("podOrder")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let namespaces: Vec<String> = model["namespaces"]
        .as_object()
        .expect("namespaces")
        .keys()
        .cloned()
        .collect();
    let pod_names: Vec<String> = pod_order
        .iter()
        .map(|p| p.split_once('/').unwrap().1.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let host_ip: IpAddr = "10.0.0.1".parse().unwrap();

    let cases = doc["cases"].as_array().expect("cases");
    let mut tally = Tally::default();
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let served = &case["servedPorts"];
        let ports: Vec<ContainerPort> = served["ports"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|port| {
                served["protocols"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |proto| {
                        let proto = proto.as_str().unwrap();
                        let port = port.as_u64().unwrap() as u16;
                        ContainerPort {
                            name: format!("serve-{port}-{}", proto.to_lowercase()),
                            port,
                            protocol: protocol(proto),
                        }
                    })
            })
            .collect();

        let mut engine = Engine::new();
        engine.set_host_ips([host_ip].into()).unwrap();
        let changes = &case["labelChanges"];
        for ns in &namespaces {
            let mut l = labels(&model["namespaces"][ns]["labels"]);
            l.merge(&labels(&changes["namespaces"][ns]));
            engine.upsert_namespace(ns, l).unwrap();
        }
        for p in &pod_order {
            let m = &model["pods"][p];
            let mut l = labels(&m["labels"]);
            l.merge(&labels(&changes["pods"][p]));
            engine
                .upsert_pod(Pod {
                    namespace: m["namespace"].as_str().unwrap().into(),
                    name: m["name"].as_str().unwrap().into(),
                    labels: l,
                    ips: vec![pod_ip(p, &namespaces, &pod_names)],
                    ports: ports.clone(),
                })
                .unwrap();
        }
        for policy in case["policies"].as_array().unwrap() {
            let mut text = policy.to_string();
            for p in &pod_order {
                text = text.replace(
                    &format!("{{{{ip {p}}}}}"),
                    &pod_ip(p, &namespaces, &pod_names).to_string(),
                );
            }
            assert!(
                !text.contains("{{"),
                "{id}: unresolved placeholder in {text}"
            );
            let policy = NetworkPolicy::from_json(&text).unwrap_or_else(|e| panic!("{id}: {e}"));
            engine
                .upsert_policy(&policy)
                .unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        let state = engine.state();
        assert_eq!(
            state,
            &compile(engine.inputs()).unwrap(),
            "{id}: incremental != from scratch"
        );

        for probe in case["probes"].as_array().unwrap() {
            let from = probe["from"].as_str().unwrap();
            let to = probe["to"].as_str().unwrap();
            let port = probe["port"].as_u64().unwrap() as u16;
            let proto_name = probe["protocol"].as_str().unwrap();
            let expect = probe["expect"].as_bool().unwrap();
            let end = |p: &str| {
                let (ns, name) = p.split_once('/').unwrap();
                FlowEnd::Pod(PodRef::new(ns, name))
            };
            let verdict = evaluate(
                state,
                &end(from),
                &end(to),
                port,
                protocol(proto_name).number(),
            )
            .unwrap_or_else(|e| panic!("{id}: {e}"));
            if verdict.allowed == expect {
                tally.passed += 1;
            } else if probe["loopback"].as_bool() == Some(true) {
                tally.skipped += 1;
                *tally.loopback_reports.entry(id.to_string()).or_default() += 1;
            } else {
                tally.failed += 1;
                if tally.failures.len() < 40 {
                    tally.failures.push(format!(
                        "{id} {from} -> {to} {port}/{proto_name}: expected {expect}, got {} ({:?})",
                        verdict.allowed, verdict
                    ));
                }
            }
        }
    }
    for f in &tally.failures {
        println!("FAIL {f}");
    }
    for (id, n) in &tally.loopback_reports {
        println!("loopback (ignored upstream, not failed): {id}: {n} probe(s) differ from expect");
    }
    println!("offline conformance: {} cases", cases.len());
    println!(
        "{} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    assert_eq!(tally.failed, 0, "{} probes failed", tally.failed);
}
