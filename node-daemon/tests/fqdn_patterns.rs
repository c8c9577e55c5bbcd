//! FQDN rules reach the maps through moatd like every other policy entry (real moatd, local
//! datastore, pinned maps): a MoatPolicy with `fqdn` peers writes one MOAT_FQDNPAT entry per
//! pattern for the selected pod's identity and sets its endpoint's ENDPOINT_FLAG_FQDN;
//! `moatctl fqdn` names the patterns; after a restart the entries are exactly the policy's
//! again (a stale entry left in the pinned map is deleted, a missing one written); `moatctl
//! trace` to an address learned for the pod allows it by the FQDN rule, naming the name and
//! the pattern; deleting the policy removes the entries and clears the flag. Flow
//! explanations of such a pod's egress name the DNS name behind the destination, or say
//! that no answer named it.

mod support_moatd;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use moat_common::{
    DIRECTION_EGRESS, ENDPOINT_FLAG_FQDN, FAMILY_V4, FQDN_MATCH_EXACT, FQDN_MATCH_SUBDOMAIN,
    FlowEvent, FqdnAddr, FqdnPatternKey, IDENTITY_FQDN_END, IDENTITY_FQDN_FIRST, IDENTITY_WORLD,
    PROTO_TCP, VERDICT_ALLOW, VERDICT_DROP, fqdn_name_hash, raw_v4, reason, rule,
};
use moat_datapath::{FqdnMaps, Maps};
use moat_testkit::lab::{Lab, LabPod};
use moatd::{
    api::{EndpointSpec, FqdnIdentity, Request, Response},
    daemon::{Daemon as InProcess, DaemonConfig, DatastoreConfig, Routing},
    flows::JournalConfig,
};
use support_moatd::{Env, register};

const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels:\n    app: web\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: db\n  namespace: shop\n  labels:\n    app: db\n---\n";

const POLICY: &str = "apiVersion: moat.io/v1alpha1\nkind: MoatPolicy\nmetadata: {name: pay, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  egress:\n  - to: [{fqdn: api.stripe.com}, {fqdn: '*.s3.amazonaws.com'}]\n    ports: [{port: 443}]\n";

fn key(identity: u32, kind: u8, name: &str) -> FqdnPatternKey {
    FqdnPatternKey {
        identity,
        kind,
        _pad: [0; 3],
        name_hash: fqdn_name_hash(name.as_bytes()).unwrap(),
    }
}

/// The pattern keys in MOAT_FQDNPAT.
fn pattern_keys(env: &Env) -> BTreeSet<FqdnPatternKey> {
    FqdnMaps::open(&env.pins())
        .unwrap()
        .pattern_entries()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

fn fqdn_flag(env: &Env, pod: &LabPod) -> bool {
    let maps = Maps::open(&env.pins()).unwrap();
    maps.endpoint(pod.ifindex).expect("endpoint entry").flags & ENDPOINT_FLAG_FQDN != 0
}

#[test]
fn fqdn_rules_write_pattern_entries_and_the_flag_and_a_restart_heals_them() {
    let env = Env::new("fqpat");
    env.write("pods.yaml", PODS);
    env.write("policy.yaml", POLICY);
    let mut daemon = env.start();
    let mut lab = Lab::new("fqpat").unwrap();
    let web = lab.add_pod("web").unwrap();
    let db = lab.add_pod("db").unwrap();
    let web_id = register(&env, &web, "shop").identity;
    register(&env, &db, "shop");

    let expected: BTreeSet<FqdnPatternKey> = [
        key(web_id, FQDN_MATCH_EXACT, "api.stripe.com"),
        key(web_id, FQDN_MATCH_SUBDOMAIN, "s3.amazonaws.com"),
    ]
    .into();
    assert_eq!(pattern_keys(&env), expected);
    let entries = FqdnMaps::open(&env.pins()).unwrap().pattern_entries();
    let selectors: BTreeSet<u32> = entries.iter().map(|(_, s)| *s).collect();
    assert_eq!(selectors.len(), 2, "one selector per pattern: {entries:?}");
    assert!(
        selectors
            .iter()
            .all(|s| (IDENTITY_FQDN_FIRST..IDENTITY_FQDN_END).contains(s))
    );
    assert!(fqdn_flag(&env, &web), "the selected pod reads DNS answers");
    assert!(!fqdn_flag(&env, &db), "the other pod does not");

    let rows: Vec<FqdnIdentity> =
        serde_json::from_str(&env.moatctl(&["-o", "json", "fqdn"])).unwrap();
    let row = rows.iter().find(|r| r.identity == web_id).unwrap();
    assert_eq!(row.pods, ["shop/web"]);
    let patterns: BTreeSet<&str> = row.selectors.iter().map(|s| s.pattern.as_str()).collect();
    assert_eq!(
        patterns,
        BTreeSet::from(["api.stripe.com", "*.s3.amazonaws.com"])
    );
    assert!(row.learned.is_empty());
    let table = env.moatctl(&["fqdn"]);
    assert!(table.contains("*.s3.amazonaws.com"), "{table}");

    // While moatd is down, the pinned map drifts: a stale entry appears, a real one goes.
    daemon.kill();
    let mut fqdn = FqdnMaps::open(&env.pins()).unwrap();
    let stale = key(web_id, FQDN_MATCH_EXACT, "stale.example");
    fqdn.upsert_pattern(&stale, IDENTITY_FQDN_FIRST + 7)
        .unwrap();
    fqdn.remove_pattern(&key(web_id, FQDN_MATCH_EXACT, "api.stripe.com"))
        .unwrap();
    let mut daemon = env.start();
    assert_eq!(
        pattern_keys(&env),
        expected,
        "the first reconcile after the restart"
    );

    // trace evaluates an address learned for the pod as the kernel does, naming the name
    // and the pattern; an address learned for nothing is denied.
    let stripe = FqdnMaps::open(&env.pins())
        .unwrap()
        .pattern_entries()
        .into_iter()
        .find(|(k, _)| k.kind == FQDN_MATCH_EXACT)
        .map(|(_, s)| s)
        .unwrap();
    let hash = fqdn_name_hash(b"api.stripe.com").unwrap();
    fqdn.insert_name(hash, "api.stripe.com").unwrap();
    let learned = FqdnAddr {
        expires_ns: moatd::server::monotonic_ns() + 600 * 1_000_000_000,
        learned_ns: moatd::server::monotonic_ns(),
        name_hash: hash,
        ttl: 60,
        count: 1,
        selectors: [stripe, 0, 0, 0],
    };
    fqdn.insert_learned(web_id, "203.0.113.7".parse().unwrap(), &learned)
        .unwrap();
    let trace = |to: &str| {
        env.moatctl(&[
            "trace", "--from", "shop/web", "--to", to, "--port", "443/TCP",
        ])
    };
    let allowed = trace("203.0.113.7");
    assert!(allowed.contains("ALLOWED"), "{allowed}");
    assert!(
        allowed.contains("fqdn \"api.stripe.com\"")
            && allowed.contains("learned from DNS: api.stripe.com"),
        "{allowed}"
    );
    let denied = trace("203.0.113.8");
    assert!(denied.contains("DENIED"), "{denied}");

    // Deleting the policy deletes its entries and clears the flag.
    std::fs::remove_file(env.policies().join("policy.yaml")).unwrap();
    env.moatctl(&["reload"]);
    assert!(pattern_keys(&env).is_empty());
    assert!(!fqdn_flag(&env, &web));

    daemon.kill();
    for pod in [&web, &db] {
        let _ = moat_datapath::detach_endpoint(&env.pins(), &pod.host_if);
    }
    drop(lab);
}

fn in_process(env: &Env) -> InProcess {
    InProcess::start(DaemonConfig {
        state_dir: env.root().join("state"),
        policy_dir: env.policies(),
        socket: env.root().join("unused.sock"),
        pending_dir: env.pending(),
        pin_root: env.pin_root().to_path_buf(),
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        journal: JournalConfig::new(env.root().join("flows")),
        datastore: DatastoreConfig::Local,
        node_name: String::new(),
        routing: Routing::None,
        // Shares the host's network namespace with other runs: no host-wide rules.
        judge_after_dnat: false,
        map_sizes: Default::default(),
    })
    .unwrap()
}

/// A flow event of `pod`'s egress to `to`, as the datapath reports it.
fn egress_event(pod: &LabPod, identity: u32, to: Ipv4Addr, verdict: u8, rule_id: u32) -> FlowEvent {
    FlowEvent {
        ifindex: pod.ifindex,
        local_identity: identity,
        remote_identity: IDENTITY_WORLD,
        rule_id,
        saddr: [raw_v4(pod.v4), 0, 0, 0],
        daddr: [raw_v4(to), 0, 0, 0],
        sport: 40000,
        dport: 443,
        proto: PROTO_TCP,
        family: FAMILY_V4,
        direction: DIRECTION_EGRESS,
        verdict,
        reason: if verdict == VERDICT_ALLOW {
            reason::POLICY_ALLOW
        } else {
            reason::DEFAULT_DENY
        },
        ..Default::default()
    }
}

#[test]
fn flow_explanations_name_the_dns_name_behind_an_egress_destination() {
    let env = Env::new("fqflow");
    env.write("pods.yaml", PODS);
    env.write("policy.yaml", POLICY);
    let mut lab = Lab::new("fqflow").unwrap();
    let web = lab.add_pod("web").unwrap();
    let mut daemon = in_process(&env);
    let endpoint = EndpointSpec {
        container_id: "cid-web".into(),
        ifname: "eth0".into(),
        netns: format!("/run/netns/{}", web.netns),
        host_ifname: web.host_if.clone(),
        host_ifindex: web.ifindex,
        ips: web.addrs().to_vec(),
        pod_namespace: "shop".into(),
        pod_name: "web".into(),
        pod_uid: None,
    };
    let Response::Registered(registered) = daemon.handle(Request::Register { endpoint }) else {
        panic!("not registered")
    };
    let web_id = registered.identity;

    let mut fqdn = FqdnMaps::open(&env.pins()).unwrap();
    let (_, stripe) = fqdn
        .pattern_entries()
        .into_iter()
        .find(|(k, _)| k.kind == FQDN_MATCH_EXACT)
        .unwrap();
    let hash = fqdn_name_hash(b"api.stripe.com").unwrap();
    fqdn.insert_name(hash, "api.stripe.com").unwrap();
    let learned_addr = Ipv4Addr::new(203, 0, 113, 7);
    let learned = FqdnAddr {
        expires_ns: moatd::server::monotonic_ns() + 600 * 1_000_000_000,
        learned_ns: moatd::server::monotonic_ns(),
        name_hash: hash,
        ttl: 60,
        count: 1,
        selectors: [stripe, 0, 0, 0],
    };
    fqdn.insert_learned(web_id, IpAddr::V4(learned_addr), &learned)
        .unwrap();

    // The rule that allows it: the engine's verdict for the learned address.
    let trace = daemon.trace("shop/web", "203.0.113.7", 443, "TCP").unwrap();
    let moatd::api::TracePath::Direct { rule_id, .. } = trace.path else {
        panic!("{trace:?}")
    };
    let now = moatd::server::monotonic_ns();
    let allowed = daemon.describe(
        &egress_event(&web, web_id, learned_addr, VERDICT_ALLOW, rule_id),
        now,
        0,
    );
    assert!(
        allowed.rule.contains("to fqdn \"api.stripe.com\"")
            && allowed
                .rule
                .ends_with("(address learned from DNS: api.stripe.com)"),
        "{}",
        allowed.rule
    );
    let dropped = daemon.describe(
        &egress_event(
            &web,
            web_id,
            Ipv4Addr::new(203, 0, 113, 8),
            VERDICT_DROP,
            rule::NONE,
        ),
        now,
        0,
    );
    assert!(
        dropped
            .rule
            .ends_with("(no DNS answer to the pod named this address)"),
        "{}",
        dropped.rule
    );
    drop(daemon);
    let _ = moat_datapath::detach_endpoint(&env.pins(), &web.host_if);
    drop(lab);
}
