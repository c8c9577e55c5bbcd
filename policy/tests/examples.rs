//! The guardrail example of the README (examples/cluster-policies/) does what the README says:
//! an Admin Deny that a NetworkPolicy cannot open, a Pass that hands a namespace to its team,
//! a Baseline isolation that a team's NetworkPolicy overrides, and an Admin egress Deny.
//! The DNS-name examples (examples/moatpolicy/fqdn-egress.yaml,
//! examples/cluster-policies/egress-allowlist.yaml) allow what their comments say.

use std::net::{IpAddr, Ipv4Addr};

use moat_policy::{
    ClusterNetworkPolicy, ContainerPort, Engine, FlowEnd, LabelSet, MoatPolicy, NetworkPolicy, Pod,
    PodRef, Protocol, evaluate, evaluate_learned,
};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/cluster-policies");

fn engine() -> Engine {
    let mut engine = Engine::new();
    for (ns, extra) in [
        ("payments", None),
        ("gateway", None),
        ("shop", Some(("self-managed", "true"))),
        ("misc", None),
    ] {
        let mut l = LabelSet::new();
        l.insert("kubernetes.io/metadata.name", ns);
        if let Some((k, v)) = extra {
            l.insert(k, v);
        }
        engine.upsert_namespace(ns, l).unwrap();
    }
    let pods = [
        ("payments", "api"),
        ("gateway", "gateway"),
        ("shop", "web"),
        ("shop", "db"),
        ("misc", "x"),
        ("misc", "y"),
    ];
    for (i, (ns, app)) in pods.into_iter().enumerate() {
        engine
            .upsert_pod(Pod {
                namespace: ns.into(),
                name: app.into(),
                labels: [("app", app)].into_iter().collect(),
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 2, 0, i as u8 + 1))],
                ports: vec![ContainerPort {
                    name: "pg".into(),
                    port: 5432,
                    protocol: Protocol::TCP,
                }],
            })
            .unwrap();
    }
    let read = |f: &str| std::fs::read_to_string(format!("{DIR}/{f}")).unwrap();
    for cnp in ClusterNetworkPolicy::all_from_yaml(&read("guardrails.yaml")).unwrap() {
        engine.upsert_cluster_policy(&cnp).unwrap();
    }
    for np in NetworkPolicy::all_from_yaml(&read("team-policy.yaml")).unwrap() {
        engine.upsert_policy(&np).unwrap();
    }
    engine
}

fn allowed(engine: &Engine, from: FlowEnd, to: FlowEnd) -> (bool, String) {
    let v = evaluate(engine.state(), &from, &to, 5432, 6).unwrap();
    let deciding = [&v.egress, &v.ingress]
        .into_iter()
        .flatten()
        .find(|d| !d.allowed)
        .or(v.ingress.as_ref())
        .or(v.egress.as_ref())
        .unwrap();
    let why = engine
        .describe_rule(deciding.reason, deciding.rule_id)
        .unwrap_or_else(|| moat_common::reason::name(deciding.reason).to_string());
    (v.allowed, why)
}

fn pod(ns: &str, name: &str) -> FlowEnd {
    FlowEnd::Pod(PodRef::new(ns, name))
}

#[test]
fn the_readme_guardrails_hold() {
    let e = engine();
    // The gateway is the one way into payments.
    let (ok, why) = allowed(&e, pod("gateway", "gateway"), pod("payments", "api"));
    assert!(ok, "{why}");
    assert!(
        why.contains("payments-only-from-gateway") && why.contains("gateway-in"),
        "{why}"
    );
    // payments' own NetworkPolicy lets shop in; the Admin Deny wins.
    let (ok, why) = allowed(&e, pod("shop", "web"), pod("payments", "api"));
    assert!(!ok);
    assert!(why.contains("nobody-else") && why.contains("Deny"), "{why}");
    // Inside shop (self-managed): the Admin tier passes, the team's NetworkPolicy decides.
    let (ok, why) = allowed(&e, pod("shop", "web"), pod("shop", "db"));
    assert!(ok, "{why}");
    assert!(why.contains("shop/web-to-db"), "{why}");
    // From outside to shop's db: no Pass (misc is not self-managed), db is isolated by its
    // team's NetworkPolicy, which does not name misc.
    let (ok, why) = allowed(&e, pod("misc", "x"), pod("shop", "db"));
    assert!(!ok);
    assert_eq!(why, "default-deny");
    // misc has no NetworkPolicy: the Baseline isolation applies.
    let (ok, why) = allowed(&e, pod("misc", "x"), pod("misc", "y"));
    assert!(!ok);
    assert!(
        why.contains("Baseline") && why.contains("default-isolation"),
        "{why}"
    );
    // Nobody reaches the metadata address.
    let metadata = FlowEnd::Address(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)));
    let (ok, why) = allowed(&e, pod("shop", "web"), metadata);
    assert!(!ok);
    assert!(why.contains("no-metadata"), "{why}");
}

const FQDN_EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/moatpolicy/fqdn-egress.yaml"
);

#[test]
fn the_fqdn_example_allows_its_names_and_dns_only() {
    let mut e = Engine::new();
    for ns in ["shop", "kube-system"] {
        let mut l = LabelSet::new();
        l.insert("kubernetes.io/metadata.name", ns);
        e.upsert_namespace(ns, l).unwrap();
    }
    for (ns, name, label, ip) in [
        ("shop", "checkout", ("app", "checkout"), 1),
        ("shop", "web", ("app", "web"), 2),
        ("kube-system", "coredns", ("k8s-app", "kube-dns"), 3),
    ] {
        e.upsert_pod(Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: [label].into_iter().collect(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 3, 0, ip))],
            ports: vec![],
        })
        .unwrap();
    }
    let text = std::fs::read_to_string(FQDN_EXAMPLE).unwrap();
    let docs = moat_policy::yaml::documents(&text).unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["MoatPolicy", "NetworkPolicy"]);
    e.upsert_moat_policy(&MoatPolicy::from_value(docs[0].clone()).unwrap())
        .unwrap();
    e.upsert_policy(&NetworkPolicy::from_value(docs[1].clone()).unwrap())
        .unwrap();

    let s = e.state();
    let checkout = pod("shop", "checkout");
    let outside = FlowEnd::Address(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9)));
    let to_outside = |from: &FlowEnd, names: &[&str], port: u16| {
        evaluate_learned(s, from, &outside, port, 6, names).unwrap()
    };
    let v = to_outside(&checkout, &["api.stripe.com"], 443);
    assert!(v.allowed);
    assert_eq!(
        e.describe_verdict(v.egress.as_ref().unwrap()).as_deref(),
        Some("MoatPolicy shop/checkout-egress egress[0] to fqdn \"api.stripe.com\"")
    );
    assert!(to_outside(&checkout, &["eu-1.S3.amazonaws.com."], 443).allowed);
    assert!(to_outside(&checkout, &["a.b.s3.amazonaws.com"], 443).allowed);
    assert!(!to_outside(&checkout, &["s3.amazonaws.com"], 443).allowed);
    assert!(!to_outside(&checkout, &["api.stripe.com"], 80).allowed);
    assert!(!to_outside(&checkout, &["evil.example"], 443).allowed);
    assert!(!to_outside(&checkout, &[], 443).allowed);
    // Asking is allowed (cluster DNS), and web, not selected, is not restricted.
    let dns = evaluate(s, &checkout, &pod("kube-system", "coredns"), 53, 17).unwrap();
    assert!(dns.allowed);
    assert!(to_outside(&pod("shop", "web"), &[], 80).allowed);
    let flagged: Vec<String> = s
        .endpoints
        .iter()
        .filter(|(_, ep)| ep.fqdn)
        .map(|(r, _)| r.to_string())
        .collect();
    assert_eq!(flagged, ["shop/checkout"]);
}

#[test]
fn the_cluster_allowlist_example_allows_its_names_and_denies_the_rest() {
    let mut e = Engine::new();
    for (ns, extra) in [
        ("build", Some(("egress", "allowlist"))),
        ("kube-system", None),
        ("free", None),
    ] {
        let mut l = LabelSet::new();
        l.insert("kubernetes.io/metadata.name", ns);
        if let Some((k, v)) = extra {
            l.insert(k, v);
        }
        e.upsert_namespace(ns, l).unwrap();
    }
    for (ns, name, label, ip) in [
        ("build", "runner", ("app", "runner"), 1),
        ("kube-system", "coredns", ("k8s-app", "kube-dns"), 2),
        ("free", "web", ("app", "web"), 3),
    ] {
        e.upsert_pod(Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: [label].into_iter().collect(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 4, 0, ip))],
            ports: vec![],
        })
        .unwrap();
    }
    let text = std::fs::read_to_string(format!("{DIR}/egress-allowlist.yaml")).unwrap();
    for cnp in ClusterNetworkPolicy::all_from_yaml(&text).unwrap() {
        e.upsert_cluster_policy(&cnp).unwrap();
    }
    let s = e.state();
    let runner = pod("build", "runner");
    let outside = FlowEnd::Address(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 80)));
    let to_outside = |from: &FlowEnd, names: &[&str], port: u16| {
        let v = evaluate_learned(s, from, &outside, port, 6, names).unwrap();
        let why = v.egress.as_ref().and_then(|d| e.describe_verdict(d));
        (v.allowed, why.unwrap_or_default())
    };
    let (ok, why) = to_outside(&runner, &["deb.debian.org"], 443);
    assert!(ok, "{why}");
    assert_eq!(
        why,
        "Admin ClusterNetworkPolicy egress-allowlist (priority 30) egress rule \"allowed-names\" to fqdn \"*.debian.org\": Accept"
    );
    assert!(to_outside(&runner, &["API.stripe.com"], 443).0);
    for (names, port) in [
        (&["debian.org"][..], 443),
        (&["deb.debian.org"], 80),
        (&[], 443),
    ] {
        let (ok, why) = to_outside(&runner, names, port);
        assert!(!ok, "{names:?} {port}");
        assert!(why.contains("nothing-else-outside"), "{why}");
    }
    let dns = evaluate(s, &runner, &pod("kube-system", "coredns"), 53, 17).unwrap();
    assert!(dns.allowed);
    // Namespaces without the label are not subjects.
    assert!(to_outside(&pod("free", "web"), &[], 80).0);
}
