//! DNS-name egress rules, compiled: the pattern entries (MOAT_FQDNPAT), the selector
//! identities and their policy entries, the endpoint flag, and verdicts and explanations for
//! flows to addresses learned from DNS answers.

use std::collections::BTreeSet;

use moat_common::{
    ACTION_ALLOW, DIRECTION_EGRESS, ENDPOINT_FLAG_FQDN, ENDPOINT_FLAG_LOG_ALLOWS, FQDN_MATCH_EXACT,
    FQDN_MATCH_SUBDOMAIN, FqdnPatternKey, IDENTITY_FQDN_END, IDENTITY_FQDN_FIRST, PROTO_TCP,
    PROTO_UDP, fqdn_name_hash,
};
use moat_policy::{
    ClusterNetworkPolicy, DatapathState, Engine, FlowEnd, LabelSet, MoatPolicy, Pod, PodRef,
    compile, evaluate, evaluate_learned,
};

const STRIPE: &str = "apiVersion: moat.io/v1alpha1\nkind: MoatPolicy\nmetadata: {name: pay, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  egress:\n  - to: [{fqdn: api.stripe.com}, {fqdn: '*.s3.amazonaws.com'}]\n    ports: [{port: 443}, {port: 8000, endPort: 8100}]\n";

/// 203.0.113.7: an address outside the cluster that DNS answers may name.
const OUTSIDE: &str = "203.0.113.7";

fn pod(ns: &str, name: &str, app: &str, ip: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app", app)].into_iter().collect(),
        ips: vec![ip.parse().unwrap()],
        ports: vec![],
    }
}

fn engine(moat: &[&str], cnps: &[&str]) -> Engine {
    let mut e = Engine::new();
    e.upsert_namespace("shop", LabelSet::new()).unwrap();
    e.upsert_pod(pod("shop", "web-1", "web", "10.0.0.1"))
        .unwrap();
    e.upsert_pod(pod("shop", "db-1", "db", "10.0.0.2")).unwrap();
    for y in moat {
        e.upsert_moat_policy(&MoatPolicy::from_yaml(y).unwrap())
            .unwrap();
    }
    for y in cnps {
        e.upsert_cluster_policy(&ClusterNetworkPolicy::from_yaml(y).unwrap())
            .unwrap();
    }
    e
}

fn web() -> FlowEnd {
    FlowEnd::Pod(PodRef::new("shop", "web-1"))
}

fn outside() -> FlowEnd {
    FlowEnd::Address(OUTSIDE.parse().unwrap())
}

fn selector(state: &DatapathState, pattern: &str) -> u32 {
    *state
        .fqdn_selectors
        .iter()
        .find(|(_, p)| *p == pattern)
        .unwrap_or_else(|| panic!("no selector for {pattern}: {:?}", state.fqdn_selectors))
        .0
}

#[test]
fn patterns_compile_to_exact_and_suffix_keys_for_the_selected_identity() {
    let e = engine(&[STRIPE], &[]);
    let s = e.state();
    let web = s.endpoints[&PodRef::new("shop", "web-1")].identity;
    let exact = selector(s, "api.stripe.com");
    let wild = selector(s, "*.s3.amazonaws.com");
    for id in [exact, wild] {
        assert!((IDENTITY_FQDN_FIRST..IDENTITY_FQDN_END).contains(&id));
    }
    let key = |kind, name: &str| FqdnPatternKey {
        identity: web.0,
        kind,
        _pad: [0; 3],
        name_hash: fqdn_name_hash(name.as_bytes()).unwrap(),
    };
    assert_eq!(
        s.fqdn_patterns,
        [
            (key(FQDN_MATCH_EXACT, "api.stripe.com"), exact),
            // The wildcard's key hashes the suffix after "*.".
            (key(FQDN_MATCH_SUBDOMAIN, "s3.amazonaws.com"), wild),
        ]
        .into(),
        "only the selected identity (web, not db) gets pattern entries"
    );
}

#[test]
fn selector_identities_carry_the_rules_ports_like_any_remote() {
    let e = engine(&[STRIPE], &[]);
    let s = e.state();
    let web = s.endpoints[&PodRef::new("shop", "web-1")].policy_id;
    let rule = *s.rules.iter().find(|(_, r)| r.policy == "pay").unwrap().0;
    for pattern in ["api.stripe.com", "*.s3.amazonaws.com"] {
        let sel = selector(s, pattern);
        let key = moat_common::PolicyKey {
            policy_id: web,
            remote_identity: sel,
            dport: 443,
            proto: PROTO_TCP,
            direction: DIRECTION_EGRESS,
        };
        let v = s.policy[&key];
        assert_eq!((v.action, v.rule_id), (ACTION_ALLOW, rule), "{pattern}");
        // The long range goes where long ranges go, keyed by the selector.
        assert!(
            s.port_ranges
                .keys()
                .any(|k| k.policy_id == web && k.remote_identity == sel),
            "{pattern}"
        );
    }
}

#[test]
fn selector_ids_depend_only_on_the_pattern() {
    let one = engine(&[STRIPE], &[]);
    let other_policy = STRIPE
        .replace("name: pay", "name: other")
        .replace("app: web", "app: db");
    let two = engine(&[&other_policy], &[]);
    let three = engine(&[STRIPE, &other_policy], &[]);
    for pattern in ["api.stripe.com", "*.s3.amazonaws.com"] {
        let id = selector(one.state(), pattern);
        assert_eq!(id, selector(two.state(), pattern), "{pattern}");
        assert_eq!(id, selector(three.state(), pattern), "{pattern}");
    }
    assert_eq!(three.state().fqdn_selectors.len(), 2, "one id per pattern");
    // Exact and wildcard of one name are different patterns.
    let both = STRIPE.replace("{fqdn: api.stripe.com}", "{fqdn: '*.api.stripe.com'}");
    let four = engine(&[STRIPE, &both.replace("name: pay", "name: both")], &[]);
    assert_ne!(
        selector(four.state(), "api.stripe.com"),
        selector(four.state(), "*.api.stripe.com")
    );
}

#[test]
fn the_fqdn_flag_marks_exactly_the_endpoints_with_patterns() {
    let mut e = engine(&[], &[]);
    let flagged = |e: &Engine| -> BTreeSet<String> {
        e.state()
            .endpoints
            .iter()
            .filter(|(_, ep)| ep.fqdn)
            .map(|(r, _)| r.to_string())
            .collect()
    };
    assert!(flagged(&e).is_empty());
    let d = e
        .upsert_moat_policy(&MoatPolicy::from_yaml(STRIPE).unwrap())
        .unwrap();
    assert_eq!(flagged(&e), ["shop/web-1".to_string()].into());
    assert!(
        d.endpoints
            .upserts
            .contains_key(&PodRef::new("shop", "web-1"))
    );
    let patterns: BTreeSet<u32> = e.state().fqdn_patterns.keys().map(|k| k.identity).collect();
    for ep in e.state().endpoints.values() {
        assert_eq!(ep.fqdn, patterns.contains(&ep.identity.0));
    }
    // The flag is the policy's to set: it survives the daemon's flags and is cleared when
    // the daemon's copy has it but the policy no longer does.
    let ep = &e.state().endpoints[&PodRef::new("shop", "web-1")];
    let info = ep.to_endpoint_info(0, ENDPOINT_FLAG_LOG_ALLOWS);
    assert_eq!(info.flags, ENDPOINT_FLAG_LOG_ALLOWS | ENDPOINT_FLAG_FQDN);
    let d = e.delete_moat_policy("shop", "pay").unwrap();
    let ep = &e.state().endpoints[&PodRef::new("shop", "web-1")];
    assert_eq!(ep.to_endpoint_info(0, ENDPOINT_FLAG_FQDN).flags, 0);
    assert!(e.state().fqdn_patterns.is_empty() && e.state().fqdn_selectors.is_empty());
    assert_eq!(d.fqdn_selectors.deletes.len(), 2);
    assert_eq!(d.fqdn_patterns.deletes.len(), 2);
}

#[test]
fn learned_addresses_are_allowed_for_matching_names_only() {
    let e = engine(&[STRIPE], &[]);
    let s = e.state();
    let judge = |names: &[&str], port: u16| {
        evaluate_learned(s, &web(), &outside(), port, PROTO_TCP, names)
            .unwrap()
            .allowed
    };
    assert!(judge(&["api.stripe.com"], 443));
    assert!(judge(&["API.Stripe.com."], 8050));
    assert!(judge(&["eu-1.s3.amazonaws.com"], 443));
    assert!(judge(&["a.b.s3.amazonaws.com"], 443));
    assert!(!judge(&["s3.amazonaws.com"], 443), "*. needs a label more");
    assert!(!judge(&["www.stripe.com"], 443));
    assert!(!judge(&["api.stripe.com"], 80), "ports still apply");
    assert!(
        !judge(&[], 443),
        "an address nobody resolved is not allowed"
    );
    assert!(
        !evaluate(s, &web(), &outside(), 443, PROTO_TCP)
            .unwrap()
            .allowed
    );
    // db is not selected: what it learns allows nothing (it has no patterns at all).
    let db = FlowEnd::Pod(PodRef::new("shop", "db-1"));
    assert!(
        evaluate_learned(s, &db, &outside(), 443, PROTO_TCP, &["api.stripe.com"])
            .unwrap()
            .allowed,
        "db is not isolated for egress"
    );
}

#[test]
fn explanations_name_the_pattern() {
    let e = engine(&[STRIPE], &[]);
    let v = evaluate_learned(
        e.state(),
        &web(),
        &outside(),
        443,
        PROTO_TCP,
        &["x.s3.amazonaws.com"],
    )
    .unwrap();
    let egress = v.egress.unwrap();
    assert_eq!(
        egress.fqdn_selector,
        Some(selector(e.state(), "*.s3.amazonaws.com"))
    );
    assert_eq!(
        e.describe_verdict(&egress).as_deref(),
        Some("MoatPolicy shop/pay egress[0] to fqdn \"*.s3.amazonaws.com\"")
    );
    assert_eq!(
        e.describe_rule(egress.reason, egress.rule_id).as_deref(),
        Some("MoatPolicy shop/pay egress[0]")
    );
}

const GUARD: &str = "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 5\n  subject: {namespaces: {}}\n  egress:\n  - {name: names, action: Accept, to: [{domainNames: [api.example.com, '*.cdn.example.com']}], protocols: [{tcp: {destinationPort: {number: 443}}}]}\n  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}\n";

#[test]
fn cluster_policy_domain_names_accept_in_their_tier_and_order() {
    let e = engine(&[], &[GUARD]);
    let s = e.state();
    let judge = |names: &[&str], port: u16, proto: u8| {
        let v = evaluate_learned(s, &web(), &outside(), port, proto, names).unwrap();
        (v.allowed, v.egress.unwrap())
    };
    let (ok, egress) = judge(&["api.example.com"], 443, PROTO_TCP);
    assert!(ok);
    assert_eq!(egress.reason, moat_common::reason::ADMIN_ACCEPT);
    assert_eq!(
        e.describe_verdict(&egress).as_deref(),
        Some(
            "Admin ClusterNetworkPolicy guard (priority 5) egress rule \"names\" to fqdn \"api.example.com\": Accept"
        )
    );
    assert!(judge(&["img.cdn.example.com"], 443, PROTO_TCP).0);
    // The later Deny decides what the names do not accept.
    let (ok, egress) = judge(&["api.example.com"], 53, PROTO_UDP);
    assert!(!ok);
    assert_eq!(egress.reason, moat_common::reason::ADMIN_DENY);
    assert!(!judge(&["cdn.example.com"], 443, PROTO_TCP).0);
    // Every namespace's pods are subjects: db-1 gets the patterns too.
    let identities: BTreeSet<u32> = s.fqdn_patterns.keys().map(|k| k.identity).collect();
    assert_eq!(identities.len(), 2);
    assert!(s.endpoints.values().all(|ep| ep.fqdn));
    // The Accept entry is an Admin-tier entry of the selector.
    let sel = selector(s, "api.example.com");
    let v = s
        .policy
        .iter()
        .find(|(k, _)| k.remote_identity == sel)
        .unwrap()
        .1;
    assert_eq!((v.admin_action, v.action), (ACTION_ALLOW, 0));
}

#[test]
fn an_earlier_deny_still_wins_over_a_name() {
    // The Deny of the address's network comes first: the name does not reopen it.
    let deny_first = GUARD
        .replace(
            "  - {name: names,",
            "  - {action: Deny, to: [{networks: [203.0.113.0/24]}]}\n  - {name: names,",
        )
        .replace("metadata: {name: guard}", "metadata: {name: strict}");
    let e = engine(&[], &[&deny_first]);
    let v = evaluate_learned(
        e.state(),
        &web(),
        &outside(),
        443,
        PROTO_TCP,
        &["api.example.com"],
    )
    .unwrap();
    assert!(!v.allowed);
    assert_eq!(v.egress.unwrap().fqdn_selector, None);
}

#[test]
fn baseline_domain_names_accept_when_no_networkpolicy_decides() {
    let baseline = GUARD
        .replace("tier: Admin", "tier: Baseline")
        .replace("metadata: {name: guard}", "metadata: {name: floor}");
    let e = engine(&[], &[&baseline]);
    let v = evaluate_learned(
        e.state(),
        &web(),
        &outside(),
        443,
        PROTO_TCP,
        &["api.example.com"],
    )
    .unwrap();
    assert!(v.allowed);
    assert_eq!(
        v.egress.unwrap().reason,
        moat_common::reason::BASELINE_ACCEPT
    );
    let sel = selector(e.state(), "api.example.com");
    assert!(
        e.state()
            .policy
            .iter()
            .any(|(k, v)| k.remote_identity == sel && v.baseline_action == ACTION_ALLOW)
    );
}

type Step = Box<dyn Fn(&mut Engine) -> moat_policy::Delta>;

#[test]
fn incremental_equals_from_scratch_through_fqdn_policy_churn() {
    let mut e = engine(&[], &[]);
    let mut replayed = compile(e.inputs()).unwrap();
    let other = STRIPE
        .replace("name: pay", "name: other")
        .replace("{fqdn: api.stripe.com}, ", "");
    let steps: Vec<Step> = vec![
        Box::new(|e| {
            e.upsert_moat_policy(&MoatPolicy::from_yaml(STRIPE).unwrap())
                .unwrap()
        }),
        Box::new(move |e| {
            e.upsert_moat_policy(&MoatPolicy::from_yaml(&other).unwrap())
                .unwrap()
        }),
        Box::new(|e| {
            // A pod of a known identity: its endpoint (flag included) and address only.
            let d = e
                .upsert_pod(pod("shop", "web-2", "web", "10.0.0.3"))
                .unwrap();
            assert!(d.touches_only_endpoints_and_ipcache(), "{d:?}");
            assert!(d.endpoints.upserts[&PodRef::new("shop", "web-2")].fqdn);
            d
        }),
        Box::new(|e| {
            let mut p = pod("shop", "web-3", "web", "10.0.0.4");
            p.labels.insert("tier", "new");
            e.upsert_pod(p).unwrap()
        }),
        Box::new(|e| e.delete_moat_policy("shop", "pay").unwrap()),
        Box::new(|e| e.delete_pod(&PodRef::new("shop", "web-1")).unwrap()),
        Box::new(|e| e.delete_moat_policy("shop", "other").unwrap()),
    ];
    for (i, step) in steps.iter().enumerate() {
        step(&mut e).apply(&mut replayed);
        assert_eq!(&replayed, e.state(), "step {i}");
        assert_eq!(&replayed, &compile(e.inputs()).unwrap(), "step {i}");
    }
}
