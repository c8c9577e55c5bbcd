//! moatd (the real binary) in chained mode onto kindnet, with the Kubernetes datastore against
//! the in-process fake API server: it reads kindnet's DaemonSet (kube-system/kindnet) and does
//! not chain onto a kindnet that enforces NetworkPolicy itself (kind >= v0.24.0). It then
//! stays up, not ready, saying why, with no 00-moat-chained.conflist, and chains by itself
//! once kindnet no longer enforces.

mod support_moatd;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use moat_fake_apiserver::{FakeApiServer, node};
use moatd::{
    api::{self, Request, Response},
    install::CHAINED_CONFLIST_NAME,
};
use serde_json::{Value, json};
use support_moatd::{Daemon, Env};

const NODE: &str = "node-1";
/// kindnet's DaemonSet is read again every 10 s while moatd refuses (moatd.rs).
const WAIT: Duration = Duration::from_secs(40);
/// kindnetd of kind v0.24.0's node images (enforces NetworkPolicy, no setting to stop it) and
/// of kind v0.23.0's (no NetworkPolicy code at all).
const KINDNETD_V0_24: &str = "docker.io/kindest/kindnetd:v20240813-c6f155d6";
const KINDNETD_V0_23: &str = "docker.io/kindest/kindnetd:v20240513-cd2ac642";

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

/// kind's kindnet DaemonSet (pkg/build/nodeimage/const_cni.go) running `image`.
fn kindnet_daemonset(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "kindnet", "namespace": "kube-system",
                     "labels": {"app": "kindnet", "k8s-app": "kindnet", "tier": "node"}},
        "spec": {
            "selector": {"matchLabels": {"app": "kindnet"}},
            "template": {
                "metadata": {"labels": {"app": "kindnet", "k8s-app": "kindnet", "tier": "node"}},
                "spec": {
                    "hostNetwork": true,
                    "serviceAccountName": "kindnet",
                    "containers": [{
                        "name": "kindnet-cni",
                        "image": image,
                        "env": [{"name": "POD_SUBNET", "value": "10.244.0.0/16"}]
                    }]
                }
            }
        }
    })
}

/// kindnet's /etc/cni/net.d/10-kindnet.conflist on this node.
fn kindnet_conflist() -> Value {
    json!({
        "cniVersion": "0.3.1", "name": "kindnet",
        "plugins": [
            {"type": "ptp", "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state",
                      "routes": [{"dst": "0.0.0.0/0"}],
                      "ranges": [[{"subnet": "10.244.1.0/24"}]]},
             "mtu": 1500},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

fn ready(env: &Env) -> (bool, Option<String>) {
    match api::call(&env.socket(), &Request::Ready, Duration::from_secs(5)).unwrap() {
        Response::Ready { ready, reason } => (ready, reason),
        other => panic!("{other:?}"),
    }
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not within {WAIT:?}");
}

fn not_ready_with(env: &Env, needles: &[&str]) -> bool {
    match ready(env) {
        (false, Some(reason)) => needles.iter().all(|n| reason.contains(n)),
        _ => false,
    }
}

#[test]
fn moatd_refuses_to_chain_onto_a_kindnet_that_enforces_network_policy() {
    let env = Env::new("kindnet");
    let server = FakeApiServer::start();
    server.apply(node(NODE, &["10.244.1.0/24"], "192.0.2.20"));
    let conf_dir = env.root().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("10-kindnet.conflist"),
        serde_json::to_vec_pretty(&kindnet_conflist()).unwrap(),
    )
    .unwrap();
    let chained = conf_dir.join(CHAINED_CONFLIST_NAME);

    let mut command = env.moatd_command(None);
    command
        .env("KUBECONFIG", kubeconfig(&env, &server))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(["--datastore", "kubernetes", "--node-name", NODE])
        .args(["--cni-mode", "chained", "--metrics-addr", ""])
        .arg("--cni-conf-dir")
        .arg(&conf_dir);
    let mut daemon: Daemon = env.spawn_and_wait(&mut command);

    // kindnet's config is there but its DaemonSet is not: moatd cannot tell, and waits.
    eventually("not ready: no kindnet DaemonSet", || {
        not_ready_with(
            &env,
            &[
                "cannot tell whether kindnet enforces",
                "kube-system/kindnet",
            ],
        )
    });
    assert!(!chained.exists(), "chained before kindnet was checked");

    // kind >= v0.24.0's kindnet: refused, with the reason and what to do.
    server.apply(kindnet_daemonset(KINDNETD_V0_24));
    eventually("not ready: kindnet enforces NetworkPolicy", || {
        not_ready_with(
            &env,
            &[
                "kindnet enforces NetworkPolicy itself",
                "v20240813-c6f155d6",
                "standalone",
            ],
        )
    });
    let status = Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .arg("--socket")
        .arg(env.socket())
        .arg("status")
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("not ready:   kindnet enforces NetworkPolicy itself"),
        "{status}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!chained.exists(), "chained onto an enforcing kindnet");
    assert!(daemon.exited().is_none(), "moatd exited");

    // kindnet replaced by one that does not enforce (kind v0.23.0's): chained, ready.
    server.apply(kindnet_daemonset(KINDNETD_V0_23));
    eventually("chained and ready", || {
        chained.exists() && ready(&env) == (true, None)
    });
    let list: Value = serde_json::from_slice(&std::fs::read(&chained).unwrap()).unwrap();
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ptp", "moat-cni", "portmap"]);
    assert!(daemon.exited().is_none(), "moatd exited");
}
