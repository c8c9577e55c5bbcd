//! Learn mode end to end: a workload in learn mode lets traffic through and reports it;
//! `policy suggest` turns the report into NetworkPolicy YAML; applied in enforce mode, that
//! policy allows exactly the learned flows and denies a new one.

mod support_moatd;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use moat_testkit::lab::{Lab, LabPod, probe};
use moatd::api::{Request, Response};
use support_moatd::{Env, LONG, SHORT, register};

fn pod_yaml(name: &str, app: &str, mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: learn\n  labels:\n    app: {app}\n  annotations:\n    moat.io/mode: {mode}\n---\n"
    )
}

const ISOLATE_WEB: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: isolate-web
  namespace: learn
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: [Ingress]
"#;

fn reachable(from: &LabPod, to: &LabPod, port: u16) -> bool {
    probe::tcp(from, IpAddr::V4(to.v4), port, SHORT)
}

#[test]
fn suggested_policy_from_learn_mode_allows_exactly_the_learned_flows() {
    let env = Env::new("learn");
    let pods = |web_mode: &str| {
        pod_yaml("web", "web", web_mode)
            + &pod_yaml("client", "client", "enforce")
            + &pod_yaml("other", "other", "enforce")
    };
    env.write("pods.yaml", &pods("learn"));
    env.write("isolate.yaml", ISOLATE_WEB);
    let _daemon = env.start();
    let mut lab = Lab::new("ln").unwrap();
    let web = lab.add_pod("web").unwrap();
    let client = lab.add_pod("client").unwrap();
    let other = lab.add_pod("other").unwrap();
    let _s1 = probe::EchoServer::start(&web, 8080).unwrap();
    let _s2 = probe::EchoServer::start(&web, 9090).unwrap();
    for pod in [&web, &client, &other] {
        register(&env, pod, "learn");
    }

    // Learn: web is isolated by policy, yet its flows pass and are recorded.
    assert!(
        probe::tcp(&client, IpAddr::V4(web.v4), 8080, LONG),
        "learn mode lets it through"
    );
    let yaml = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = env.call(Request::PolicySuggest {
                namespace: "learn".into(),
                since_secs: None,
            });
            let Response::Suggestion { yaml } = r else {
                panic!("{r:?}")
            };
            if !yaml.is_empty() || Instant::now() > deadline {
                break yaml;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(yaml.contains("name: web-learned"), "{yaml}");
    assert!(yaml.contains("app: \"client\""), "{yaml}");
    assert!(yaml.contains("port: 8080"), "{yaml}");
    assert!(yaml.contains("# observed 1 new flow(s)"), "{yaml}");
    // It parses as the NetworkPolicy it claims to be.
    let parsed = moat_policy::NetworkPolicy::all_from_yaml(&yaml).expect("suggested YAML parses");
    assert_eq!(parsed.len(), 1);

    // Enforce with the suggestion: exactly the learned flow passes.
    env.write("suggested.yaml", &yaml);
    env.write("pods.yaml", &pods("enforce"));
    match env.call(Request::Reload) {
        Response::Status(s) => assert!(s.rejected.is_empty(), "{:?}", s.rejected),
        other => panic!("{other:?}"),
    }
    assert!(
        probe::tcp(&client, IpAddr::V4(web.v4), 8080, LONG),
        "learned flow allowed"
    );
    assert!(
        !reachable(&other, &web, 8080),
        "a peer never seen stays denied"
    );
    assert!(
        !reachable(&client, &web, 9090),
        "a port never seen stays denied"
    );

    for pod in [&web, &client, &other] {
        let _ = moat_datapath::detach_endpoint(&env.pins(), &pod.host_if);
    }
    drop(lab);
}
