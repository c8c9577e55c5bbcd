//! moatd (the real binary) with the Kubernetes datastore against the in-process fake API
//! server, in standalone mode: it never exits for want of a podCIDR or a first sync. It keeps
//! answering the local API as not ready, saying why, and becomes ready by itself (writing the
//! CNI config) when the Node gets its podCIDR or the API server answers.

mod support_cni;
mod support_moatd;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use moat_fake_apiserver::{FakeApiServer, node};
use moatd::api::{self, Request, Response};
use serde_json::json;
use support_moatd::{Daemon, Env};

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(20);

/// A kubeconfig that points at the fake API server (plain HTTP, no credentials).
fn kubeconfig(env: &Env, server: &FakeApiServer) -> PathBuf {
    let path = env.root().join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
         current-context: fake\n",
        server.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn conf_dir(env: &Env) -> PathBuf {
    env.root().join("net.d")
}

/// Starts moatd in standalone mode (`--cni-conf-dir`) and waits until its socket answers.
fn start_moatd(env: &Env, kubeconfig: &Path) -> Daemon {
    start_moatd_with(env, kubeconfig, None, &[])
}

/// `start_moatd`, with extra flags, in the network namespace `netns` if given (with
/// `nsenter --net`, which keeps the host's /sys and so the pins' bpffs).
fn start_moatd_with(env: &Env, kubeconfig: &Path, netns: Option<&Netns>, extra: &[&str]) -> Daemon {
    std::fs::create_dir_all(conf_dir(env)).unwrap();
    let mut command = env.moatd_command(netns.map(|ns| ns.0.as_str()));
    command
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(["--datastore", "kubernetes", "--node-name", NODE])
        .args(["--cni-mode", "standalone", "--metrics-addr", ""])
        .arg("--cni-conf-dir")
        .arg(conf_dir(env));
    env.spawn_and_wait(&mut command)
}

fn ready(env: &Env) -> (bool, Option<String>) {
    match api::call(&env.socket(), &Request::Ready, Duration::from_secs(5)).unwrap() {
        Response::Ready { ready, reason } => (ready, reason),
        other => panic!("{other:?}"),
    }
}

fn moatctl_status(env: &Env) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .arg("--socket")
        .arg(env.socket())
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moatctl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {WAIT:?}");
}

/// A network namespace for a pod, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("{tag}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let added = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(added.unwrap().success(), "ip netns add {name}");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// moat-cni ADD (standalone) against this moatd: Err(its output) when it fails.
fn cni_add(env: &Env, netns: &Netns) -> Result<serde_json::Value, String> {
    let bin = support_cni::cni_path(&env.root().join("cni"));
    let conf = env.standalone_conf("readiness", json!([[{"subnet": "10.244.1.0/24"}]]));
    let pod = support_cni::CniPod {
        container_id: "readiness-1",
        netns: &netns.0,
        namespace: "default",
        name: "p",
    };
    support_cni::run(None, &bin, &conf, "ADD", &pod)
}

fn conflist(env: &Env) -> Option<serde_json::Value> {
    let text = std::fs::read(conf_dir(env).join("10-moat.conflist")).ok()?;
    Some(serde_json::from_slice(&text).unwrap())
}

#[test]
fn node_without_pod_cidr_serves_not_ready_until_the_cidr_appears() {
    let env = Env::new("nocidr");
    let server = FakeApiServer::start();
    server.apply(node(NODE, &[], "192.0.2.10"));
    let mut daemon = start_moatd(&env, &kubeconfig(&env, &server));

    // Up, answering, not ready, and saying why; no CNI config for the runtime yet.
    let why = format!("waiting for Node {NODE} to get a podCIDR");
    eventually("not ready with the podCIDR reason", || {
        ready(&env) == (false, Some(why.clone()))
    });
    let status = env.status();
    assert!(!status.ready);
    assert_eq!(status.not_ready.as_deref(), Some(why.as_str()));
    let text = moatctl_status(&env);
    assert!(text.contains("ready:       false"), "{text}");
    assert!(text.contains(&format!("not ready:   {why}")), "{text}");
    assert!(conflist(&env).is_none(), "CNI config written before ready");
    // A registration is refused with the reason rather than half-done.
    let register = Request::Register {
        endpoint: api::EndpointSpec {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/none".into(),
            host_ifname: "moatnone".into(),
            host_ifindex: 1,
            pod_namespace: "default".into(),
            pod_name: "p".into(),
            ips: vec!["10.244.1.2".parse().unwrap()],
            pod_uid: None,
        },
    };
    match api::call(&env.socket(), &register, Duration::from_secs(5)) {
        Err(api::ClientError::Refused(message)) => assert!(message.contains(&why), "{message}"),
        other => panic!("registered while not ready: {other:?}"),
    }
    // The runtime's ADD fails with CNI's retryable code (11, try again later) and the reason.
    let netns = Netns::new("moatnr");
    let failed = cni_add(&env, &netns).expect_err("ADD succeeded while moatd is not ready");
    assert!(failed.contains("\"code\":11"), "{failed}");
    assert!(failed.contains(&why), "{failed}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(daemon.exited().is_none(), "moatd exited");

    // The Node gets its podCIDR (a watch event): ready without a restart, config written.
    server.apply(node(NODE, &["10.244.1.0/24"], "192.0.2.10"));
    eventually("ready after the podCIDR appeared", || {
        ready(&env) == (true, None)
    });
    assert!(env.status().not_ready.is_none());
    eventually("CNI config written", || conflist(&env).is_some());
    let conf = conflist(&env).unwrap();
    assert!(conf.to_string().contains("10.244.1.0/24"), "{conf}");
    assert!(daemon.exited().is_none(), "moatd exited");
}

#[test]
fn unanswered_first_sync_serves_not_ready_until_the_api_server_answers() {
    let env = Env::new("slowsync");
    let server = FakeApiServer::start();
    server.apply(node(NODE, &["10.244.2.0/24"], "192.0.2.11"));
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "default"}}));
    // The API server does not answer: the first sync cannot complete.
    server.stop();
    let mut daemon = start_moatd(&env, &kubeconfig(&env, &server));

    let (is_ready, reason) = ready(&env);
    assert!(!is_ready);
    let reason = reason.expect("a reason");
    assert!(
        reason.starts_with("waiting for the first sync of "),
        "{reason}"
    );
    let text = moatctl_status(&env);
    assert!(
        text.contains("not ready:   waiting for the first sync of "),
        "{text}"
    );
    assert!(conflist(&env).is_none());
    std::thread::sleep(Duration::from_secs(1));
    assert!(daemon.exited().is_none(), "moatd exited");

    server.restart();
    eventually("ready once the API server answers", || {
        ready(&env) == (true, None)
    });
    eventually("CNI config written", || conflist(&env).is_some());
    assert!(daemon.exited().is_none(), "moatd exited");
}

#[test]
fn direct_routing_clears_the_nodes_network_unavailable_condition() {
    let env = Env::new("netavail");
    // moatd runs in a network namespace of its own (its routes stay out of the host's
    // tables), linked to the host by a veth /30: the host end is the API server's address
    // and also "node-2", whose pod CIDR moatd routes.
    let node_ns = Netns::new("moatnu");
    let n = &node_ns.0;
    let pid = std::process::id();
    // A /30 of 198.18.0.0/15 (benchmarking addresses) of this test process's own.
    let (third, base) = (pid / 64 % 250, pid % 64 * 4);
    let host_ip = format!("198.18.{third}.{}", base + 1);
    let node_ip = format!("198.18.{third}.{}", base + 2);
    let host_if = format!("mnu{pid}");
    let setup = format!(
        "ip link add {host_if} type veth peer name eth0 netns {n} && \
         ip addr add {host_ip}/30 dev {host_if} && ip link set {host_if} up && \
         ip -n {n} link set lo up && ip -n {n} link set eth0 up && \
         ip -n {n} addr add {node_ip}/30 dev eth0"
    );
    let ok = Command::new("sh").arg("-c").arg(&setup).status().unwrap();
    assert!(ok.success(), "{setup}");
    let server = FakeApiServer::start_on(host_ip.parse().unwrap());
    let mut this = node(NODE, &["10.244.3.0/24"], &node_ip);
    // As a cloud node controller leaves a new node: NetworkUnavailable until a CNI says not.
    this["status"]["conditions"] = json!([
        {"type": "Ready", "status": "True", "reason": "KubeletReady"},
        {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
    ]);
    server.apply(this);
    server.apply(node("node-2", &["10.244.4.0/24"], &host_ip));
    let mut daemon = start_moatd_with(
        &env,
        &kubeconfig(&env, &server),
        Some(&node_ns),
        &["--routing", "direct"],
    );

    let condition = |server: &FakeApiServer, kind: &str| {
        server.get("Node", "", NODE).and_then(|n| {
            n["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == kind)
                .cloned()
        })
    };
    eventually("NetworkUnavailable cleared", || {
        condition(&server, "NetworkUnavailable").is_some_and(|c| c["status"] == "False")
    });
    let cleared = condition(&server, "NetworkUnavailable").unwrap();
    assert_eq!(cleared["reason"], "MoatRoutesCreated", "{cleared}");
    assert!(cleared["lastTransitionTime"].is_string(), "{cleared}");
    // A strategic merge on `type`: the node's other conditions are untouched.
    assert_eq!(condition(&server, "Ready").unwrap()["status"], "True");
    let patches: Vec<_> = server
        .writes()
        .into_iter()
        .filter(|w| w.method == "PATCH" && w.res == moat_fake_apiserver::Res::Nodes)
        .collect();
    assert_eq!(patches.len(), 1, "{patches:#?}");
    assert_eq!(patches[0].name, NODE);
    assert!(
        patches[0].status,
        "not the status subresource: {patches:#?}"
    );
    assert!(
        patches[0]
            .content_type
            .contains("application/strategic-merge-patch+json"),
        "{patches:#?}"
    );
    // The routes were in place first: node-2's pod CIDR via its address.
    let routes = Command::new("ip")
        .args(["-n", &node_ns.0, "route", "show", "10.244.4.0/24"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(routes.contains(&format!("via {host_ip}")), "{routes}");
    assert!(daemon.exited().is_none(), "moatd exited");
}
