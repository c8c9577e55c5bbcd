//! The kube mode against the in-process fake API server: the objects it creates, patches and
//! deletes for real cases, and probes answered by the pure policy engine from what the server
//! holds at probe time (so a label or policy the runner failed to apply, or forgot to remove,
//! shows up as a failed probe).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Mutex,
    time::Duration,
};

use moat_fake_apiserver::{FakeApiServer, Res};
use moat_policy::{ContainerPort, Engine, FlowEnd, LabelSet, NetworkPolicy, Pod, PodRef, evaluate};
use serde_json::Value;

use super::*;
use crate::cases::CaseFile;

fn case_file() -> CaseFile {
    let path = PathBuf::from(crate::DEFAULT_CASES);
    CaseFile::load(&path).unwrap()
}

fn options() -> KubeOptions {
    KubeOptions {
        direct: false,
        parallel: 4,
        timeout: Duration::from_secs(1),
        keep_all: false,
        image: "agnhost:test".into(),
        settle: Duration::ZERO,
        ready_timeout: Duration::from_secs(10),
        sctp: false,
        poll: Duration::from_millis(10),
    }
}

fn labels(object: &Value) -> LabelSet {
    let mut set = LabelSet::new();
    if let Some(map) = object["metadata"]["labels"].as_object() {
        for (k, v) in map {
            set.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
        }
    }
    set
}

/// Judges each probe with the engine over the server's current objects, and records it.
struct EngineProber<'a> {
    server: &'a FakeApiServer,
    calls: Mutex<Vec<(ProbeFrom, IpAddr, u16, Proto)>>,
}

impl EngineProber<'_> {
    fn engine(&self) -> (Engine, BTreeMap<IpAddr, (String, String)>) {
        let mut engine = Engine::new();
        engine
            .set_host_ips([IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))].into())
            .unwrap();
        for ns in self.server.list("Namespace") {
            engine
                .upsert_namespace(ns["metadata"]["name"].as_str().unwrap(), labels(&ns))
                .unwrap();
        }
        // Where an address leads: pod IPs, and ClusterIPs to the pod their selector picks.
        let mut by_ip = BTreeMap::new();
        for pod in self.server.list("Pod") {
            let (ns, name) = (
                pod["metadata"]["namespace"].as_str().unwrap().to_string(),
                pod["metadata"]["name"].as_str().unwrap().to_string(),
            );
            let ip: IpAddr = pod["status"]["podIP"].as_str().unwrap().parse().unwrap();
            let mut ports = Vec::new();
            for c in pod["spec"]["containers"].as_array().unwrap() {
                for p in c["ports"].as_array().into_iter().flatten() {
                    ports.push(ContainerPort {
                        name: p["name"].as_str().unwrap().to_string(),
                        port: p["containerPort"].as_u64().unwrap() as u16,
                        protocol: match p["protocol"].as_str().unwrap() {
                            "UDP" => moat_policy::Protocol::UDP,
                            "SCTP" => moat_policy::Protocol::SCTP,
                            _ => moat_policy::Protocol::TCP,
                        },
                    });
                }
            }
            engine
                .upsert_pod(Pod {
                    namespace: ns.clone(),
                    name: name.clone(),
                    labels: labels(&pod),
                    ips: vec![ip],
                    ports,
                })
                .unwrap();
            by_ip.insert(ip, (ns, name));
        }
        for service in self.server.list("Service") {
            let ns = service["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .to_string();
            let pod = service["spec"]["selector"][objects::POD_KEY_LABEL]
                .as_str()
                .unwrap()
                .to_string();
            let ip: IpAddr = service["spec"]["clusterIP"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            by_ip.insert(ip, (ns, pod));
        }
        for policy in self.server.list("NetworkPolicy") {
            let policy = NetworkPolicy::from_value(policy).unwrap();
            engine.upsert_policy(&policy).unwrap();
        }
        (engine, by_ip)
    }
}

impl Prober for EngineProber<'_> {
    fn connect(
        &self,
        from: &ProbeFrom,
        target: IpAddr,
        port: u16,
        proto: Proto,
        _timeout: Duration,
    ) -> Result<bool, String> {
        self.calls
            .lock()
            .unwrap()
            .push((from.clone(), target, port, proto));
        let (engine, by_ip) = self.engine();
        let (ns, pod) = by_ip
            .get(&target)
            .ok_or_else(|| format!("nothing at {target}"))?;
        let verdict = evaluate(
            engine.state(),
            &FlowEnd::Pod(PodRef::new(&from.namespace, &from.pod)),
            &FlowEnd::Pod(PodRef::new(ns, pod)),
            port,
            proto.number(),
        )
        .map_err(|e| e.to_string())?;
        Ok(verdict.allowed)
    }
}

fn writes_of(server: &FakeApiServer, method: &str, res: Res) -> Vec<moat_fake_apiserver::Write> {
    server
        .writes()
        .into_iter()
        .filter(|w| w.method == method && w.res == res)
        .collect()
}

#[test]
fn cases_run_against_the_api_with_the_right_objects_and_cleanup() {
    let server = FakeApiServer::start();
    server.run_created_pods();
    let file = case_file();
    let prober = EngineProber {
        server: &server,
        calls: Mutex::new(Vec::new()),
    };
    let cluster = Cluster::url(&server.url()).unwrap();
    let mut runner = KubeRunner::setup(cluster, prober, &file, options()).unwrap();

    // Namespaces x, y, z with the model's labels; 9 pods and 9 Services.
    let namespaces = writes_of(&server, "POST", Res::Namespaces);
    assert_eq!(
        namespaces
            .iter()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>(),
        vec!["x", "y", "z"]
    );
    assert_eq!(namespaces[0].body["metadata"]["labels"]["ns"], "x");
    let pods = writes_of(&server, "POST", Res::Pods);
    assert_eq!(pods.len(), 9);
    let containers: Vec<&str> = pods[0].body["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        containers,
        vec!["cont-80-tcp", "cont-80-udp", "cont-81-tcp", "cont-81-udp"],
        "every served TCP/UDP port (SCTP only with --kube-sctp)"
    );
    assert_eq!(
        pods[0].body["spec"]["containers"][1]["ports"][0],
        serde_json::json!({"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"})
    );
    let services = writes_of(&server, "POST", Res::Services);
    assert_eq!(services.len(), 9);
    assert_eq!(services[4].name, "s-y-b");
    assert_eq!(
        services[4].body["spec"]["selector"][objects::POD_KEY_LABEL],
        "b"
    );

    // A case with a label change, one with IP placeholders, then a plain one: each must see
    // exactly its own labels and policies.
    let order = ["k8s-e2e-029", "k8s-e2e-043", "k8s-e2e-001"];
    let mut results = Vec::new();
    for id in order {
        let case = file.cases.iter().find(|c| c.id == id).unwrap();
        let before = server.writes().len();
        let r = runner.run_case(&file, case);
        assert!(r.ok(), "{}: {:#?}", r.line(), r.failures);
        assert!(r.counts.passed > 0);
        results.push((id, before, r));
    }

    let writes = server.writes();
    // 029 labelled x/a target=isolated; 043 took the label off again.
    let pod_patches: Vec<_> = writes
        .iter()
        .filter(|w| w.method == "PATCH" && w.res == Res::Pods)
        .collect();
    assert_eq!(pod_patches.len(), 2, "{pod_patches:#?}");
    assert_eq!(
        pod_patches[0].body,
        serde_json::json!({"metadata": {"labels": {"target": "isolated"}}})
    );
    assert_eq!(
        pod_patches[1].body,
        serde_json::json!({"metadata": {"labels": {"target": null}}})
    );
    assert_eq!(
        (
            pod_patches[1].namespace.as_str(),
            pod_patches[1].name.as_str()
        ),
        ("x", "a")
    );
    // Each case's policy created; the previous case's deleted before the next one's.
    let policy_writes: Vec<(String, String)> = writes
        .iter()
        .filter(|w| w.res == Res::NetworkPolicies)
        .map(|w| (w.method.clone(), w.name.clone()))
        .collect();
    let expected: Vec<(String, String)> = [
        ("POST", "deny-ingress-via-label-selector"),
        ("DELETE", "deny-ingress-via-label-selector"),
        ("POST", "allow-client-a-via-cidr-egress-rule"),
        ("DELETE", "allow-client-a-via-cidr-egress-rule"),
        ("POST", "deny-ingress"),
    ]
    .iter()
    .map(|(m, n)| (m.to_string(), n.to_string()))
    .collect();
    assert_eq!(policy_writes, expected);
    // Placeholders were replaced by the pod's address.
    let cidr_policy = writes
        .iter()
        .find(|w| w.method == "POST" && w.name == "allow-client-a-via-cidr-egress-rule")
        .unwrap();
    let x_a_ip = server.get("Pod", "x", "a").unwrap()["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        cidr_policy.body["spec"]["egress"][0]["to"][0]["ipBlock"]["cidr"],
        format!("{x_a_ip}/4")
    );

    // Probes ran from the first container, to the Services' ClusterIPs.
    let calls = runner.prober.calls.lock().unwrap().clone();
    let probes: usize = results
        .iter()
        .map(|(_, _, r)| r.counts.passed + r.counts.failed)
        .sum();
    assert!(calls.len() >= probes && probes > 0);
    assert!(
        calls
            .iter()
            .all(|(from, _, _, _)| from.container == "cont-80-tcp")
    );
    assert!(
        calls
            .iter()
            .all(|(_, ip, _, _)| ip.to_string().starts_with("10.96.")),
        "probes go through the Services"
    );

    runner.teardown(false, &file).unwrap();
    let deleted: Vec<String> = writes_of(&server, "DELETE", Res::Namespaces)
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(deleted, vec!["x", "y", "z"]);
    assert!(server.list("Pod").is_empty() && server.list("NetworkPolicy").is_empty());
    assert!(server.list("Namespace").is_empty());
}

#[test]
fn a_wrong_verdict_is_a_failed_probe() {
    // The runner must not turn what the prober saw into a pass: a prober that allows
    // everything fails the default-deny case's denied probes.
    struct AllowAll;
    impl Prober for AllowAll {
        fn connect(
            &self,
            _: &ProbeFrom,
            _: IpAddr,
            _: u16,
            _: Proto,
            _: Duration,
        ) -> Result<bool, String> {
            Ok(true)
        }
    }
    let server = FakeApiServer::start();
    server.run_created_pods();
    let file = case_file();
    let cluster = Cluster::url(&server.url()).unwrap();
    let mut runner = KubeRunner::setup(cluster, AllowAll, &file, options()).unwrap();
    let case = file.cases.iter().find(|c| c.id == "k8s-e2e-001").unwrap();
    let r = runner.run_case(&file, case);
    assert!(!r.ok());
    assert!(r.counts.failed > 0);
    assert!(
        r.failures
            .iter()
            .all(|p| !p.expect && p.observed == Some(true))
    );
}

#[test]
fn leftover_namespaces_stop_the_setup() {
    let server = FakeApiServer::start();
    server.run_created_pods();
    server.apply(moat_fake_apiserver::namespace("y", serde_json::json!({})));
    let file = case_file();
    let cluster = Cluster::url(&server.url()).unwrap();
    let error = match KubeRunner::setup(
        cluster,
        KubectlExec {
            kubectl: "kubectl".into(),
        },
        &file,
        options(),
    ) {
        Ok(_) => panic!("setup went ahead over an existing namespace"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("namespace y already exists"), "{error}");
    assert!(writes_of(&server, "POST", Res::Pods).is_empty());
}
