//! moatd with the local datastore, end to end on the real kernel: pods (namespaces) register
//! over the socket, NetworkPolicy YAML in the policy directory becomes enforcement, edits
//! apply live, a bad object is rejected while the last good state keeps enforcing, and a
//! killed daemon leaves enforcement running and adopts it again on restart.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use moat_datapath::{
    PinDir, attach_endpoint, is_attached,
    lab::{Lab, LabPod, probe},
};
use moatd::api::{self, EndpointSpec, Request, Response};

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);

/// A running moatd, killed when dropped (also when a test fails).
struct Daemon(Child);

impl Daemon {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Env {
    root: PathBuf,
    dir: tempfile::TempDir,
    pin_root: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "run as root (make test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/moat-test/{tag}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_root);
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        Self {
            root: dir.path().to_path_buf(),
            dir,
            pin_root,
        }
    }
    fn socket(&self) -> PathBuf {
        self.root.join("moatd.sock")
    }
    fn policies(&self) -> PathBuf {
        self.root.join("policies")
    }
    fn pending(&self) -> PathBuf {
        self.root.join("pending")
    }
    fn pins(&self) -> PinDir {
        PinDir::new(&self.pin_root)
    }

    fn start(&self) -> Daemon {
        let daemon = Daemon(
            Command::new(env!("CARGO_BIN_EXE_moatd"))
                .arg("--policy-dir")
                .arg(self.policies())
                .arg("--state-dir")
                .arg(self.root.join("state"))
                .arg("--socket")
                .arg(self.socket())
                .arg("--pending-dir")
                .arg(self.pending())
                .arg("--pin-root")
                .arg(&self.pin_root)
                .arg("--poll-ms")
                .arg("100")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if api::call(&self.socket(), &Request::Status, Duration::from_secs(2)).is_ok() {
                return daemon;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("moatd did not become ready");
    }

    fn call(&self, request: Request) -> Response {
        api::call(&self.socket(), &request, Duration::from_secs(10)).unwrap()
    }

    fn status(&self) -> api::DaemonStatus {
        match self.call(Request::Status) {
            Response::Status(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn write(&self, file: &str, yaml: &str) {
        let tmp = self.policies().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, self.policies().join(file)).unwrap();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = &self.dir;
    }
}

fn register(env: &Env, pod: &LabPod, namespace: &str) -> api::Registered {
    let spec = EndpointSpec {
        container_id: format!("cid-{}", pod.name),
        ifname: "eth0".into(),
        netns: format!("/run/netns/{}", pod.netns),
        host_ifname: pod.host_if.clone(),
        host_ifindex: pod.ifindex,
        ips: pod.addrs().to_vec(),
        pod_namespace: namespace.into(),
        pod_name: pod.name.clone(),
        pod_uid: None,
    };
    let r = match env.call(Request::Register { endpoint: spec }) {
        Response::Registered(r) => r,
        other => panic!("{other:?}"),
    };
    attach_endpoint(&env.pins(), &pod.host_if).unwrap();
    r
}

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
