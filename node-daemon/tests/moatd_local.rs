//! moatd with the local datastore, end to end on the real kernel: pods (namespaces) register
//! over the socket, NetworkPolicy YAML in the policy directory becomes enforcement, edits
//! apply live, a bad object is rejected while the last good state keeps enforcing, and a
//! killed daemon leaves enforcement running and adopts it again on restart.

mod support_moatd;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use moat_datapath::is_attached;
use moat_testkit::lab::{Lab, LabPod, probe};
use moatd::api;
use support_moatd::{Env, LONG, SHORT, register};

fn pod_yaml(name: &str, app: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: prod\n  labels:\n    app: {app}\n{extra}spec:\n  containers:\n  - name: main\n    ports:\n    - name: http\n      containerPort: 8080\n---\n"
    )
}

const WEB_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  namespace: prod
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: client
    ports:
    - port: http
"#;

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

fn reachable(from: &LabPod, to: &LabPod) -> bool {
    probe::tcp(from, IpAddr::V4(to.v4), 8080, SHORT)
}

#[test]
fn local_datastore_policy_is_enforced_edited_live_and_survives_restarts() {
    let env = Env::new("moatd");
    env.write(
        "pods.yaml",
        &(pod_yaml("web", "web", "")
            + &pod_yaml("client", "client", "")
            + &pod_yaml("other", "other", "")),
    );
    env.write("web-policy.yaml", WEB_POLICY);
    let mut daemon = env.start();

    let mut lab = Lab::new("md").unwrap();
    let web = lab.add_pod("web").unwrap();
    let client = lab.add_pod("client").unwrap();
    let other = lab.add_pod("other").unwrap();
    let _servers: Vec<_> = [&web, &client, &other]
        .iter()
        .map(|p| probe::EchoServer::start(p, 8080).unwrap())
        .collect();
    let r_web = register(&env, &web, "prod");
    let r_client = register(&env, &client, "prod");
    let r_other = register(&env, &other, "prod");
    assert_ne!(r_web.identity, r_client.identity);
    assert_ne!(r_client.identity, r_other.identity);

    // First packet correct: enforcement is in place as soon as registration returns.
    assert!(
        probe::tcp(&client, IpAddr::V4(web.v4), 8080, LONG),
        "client -> web"
    );
    assert!(
        probe::tcp(&client, IpAddr::V6(web.v6), 8080, LONG),
        "client -> web v6"
    );
    assert!(!reachable(&other, &web), "other -> web must be denied");
    assert!(
        probe::tcp(&web, IpAddr::V4(other.v4), 8080, LONG),
        "other is not isolated"
    );

    // A live edit: admit app=other as well.
    env.write(
        "web-policy.yaml",
        &WEB_POLICY.replace(
            "          app: client\n",
            "          app: client\n    - podSelector:\n        matchLabels:\n          app: other\n",
        ),
    );
    wait_until("other may reach web", || reachable(&other, &web));

    // A bad object is rejected with the reason; the last good state keeps enforcing.
    env.write(
        "web-policy.yaml",
        &WEB_POLICY.replace("    - port: http\n", "    - port: 70000\n"),
    );
    wait_until("the bad policy is reported", || {
        env.status()
            .rejected
            .iter()
            .any(|r| r.contains("prod/web") && r.contains("70000"))
    });
    assert!(
        reachable(&other, &web),
        "last good version must stay in force"
    );
    assert!(reachable(&client, &web));
    env.write("web-policy.yaml", WEB_POLICY);
    wait_until("the fixed policy applies", || !reachable(&other, &web));

    // Kill the daemon: enforcement stays; restart: it adopts the state and its endpoints.
    daemon.kill();
    assert!(!reachable(&other, &web), "denied while moatd is down");
    assert!(reachable(&client, &web), "allowed while moatd is down");
    let entries_before = moat_datapath::Maps::open(&env.pins())
        .unwrap()
        .policy
        .keys()
        .count();

    // A DEL while the daemon is down is queued and processed at start.
    api::queue_pending_unregister(&env.pending(), "cid-other", "eth0").unwrap();
    daemon = env.start();
    let status = env.status();
    assert_eq!(status.endpoints, 2, "{status:?}");
    assert!(
        !is_attached(&env.pins(), &other.host_if),
        "queued DEL detached the pod"
    );
    assert!(reachable(&client, &web), "allowed after restart");
    assert!(
        moat_datapath::Maps::open(&env.pins())
            .unwrap()
            .policy
            .keys()
            .count()
            <= entries_before,
        "no entries leaked"
    );
    // Registering again is idempotent.
    let again = register(&env, &web, "prod");
    assert_eq!(again.identity, r_web.identity);

    daemon.kill();
    for pod in [&web, &client, &other] {
        let _ = moat_datapath::detach_endpoint(&env.pins(), &pod.host_if);
    }
    drop(lab);
}
