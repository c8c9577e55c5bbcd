//! ClusterNetworkPolicy tiers, differentially: random mixes of Admin and Baseline
//! ClusterNetworkPolicies and NetworkPolicies are compiled into the datapath's maps and every
//! flow between the model's pods is judged by replaying the datapath's lookups (`evaluate`);
//! an independent reference evaluator, written straight from the tier rules and reading the
//! policies themselves (never the maps), must agree on every flow.
//!
//! The tier rules the reference follows, per direction at the endpoint that judges it:
//!   1. Admin CNPs selecting the endpoint, by priority, rules in written order: the first
//!      matching rule decides if it is Accept or Deny; Pass skips the rest of the tier.
//!   2. NetworkPolicies selecting the endpoint in that direction: if any, the flow passes iff
//!      one of their rules matches; nothing below is consulted.
//!   3. Baseline CNPs, as Admin; Pass or no match falls through to
//!   4. allow.
//!
//! A flow between two pods passes iff the source's egress and the destination's ingress both
//! pass. Priorities are distinct per tier here: the API leaves equal priorities unordered.
//!
//! DNS names: CNP `domainNames` peers (Accept rules) and MoatPolicies with `fqdn` peers (in
//! the NetworkPolicy tier) join the mix, and each pod also sends to an address outside the
//! cluster that it learned from DNS answers for some names (`evaluate_learned`); the
//! reference matches those names against the patterns as text (`FqdnPattern::matches`),
//! never through the hashes and pattern entries the datapath uses.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use moat_policy::cnp::{Action, CnpPeer, NormalizedCnp, NormalizedCnpRule, Tier};
use moat_policy::netpol::{NormalizedPolicy, Peer, PortSpec, RulePort};
use moat_policy::{
    ClusterNetworkPolicy, ContainerPort, Direction, Engine, FlowEnd, LabelSet, MoatPolicy,
    NetworkPolicy, Pod, PodRef, Protocol, evaluate, evaluate_learned,
};
use proptest::prelude::*;

const NAMESPACES: [(&str, Option<&str>); 3] = [("x", Some("t1")), ("y", Some("t2")), ("z", None)];
const APPS: [&str; 3] = ["web", "db", "api"];
/// (port, protocol number) pairs probed.
const FLOWS: [(u16, u8); 5] = [(80, 6), (53, 17), (85, 6), (443, 6), (9000, 132)];

/// CNP peers, as YAML flow maps (the last is a peer kind this version does not know).
const PEERS: [&str; 8] = [
    "{namespaces: {}}",
    "{namespaces: {matchLabels: {team: t1}}}",
    "{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}",
    "{pods: {namespaceSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}, podSelector: {}}}",
    "{networks: [10.9.0.0/30]}",
    "{networks: [0.0.0.0/0]}",
    "{futurePeer: {x: 1}}",
    "{domainNames: [api.example.com, '*.cdn.example.com']}",
];
/// The outside address pods learn, and the names they learned it for (one set per probe).
const OUTSIDE: &str = "203.0.113.7";
const LEARNED: [&[&str]; 6] = [
    &[],
    &["api.example.com"],
    &["img.cdn.example.com"],
    &["cdn.example.com"],
    &["www.example.org", "API.example.com."],
    &["a.b.example.org"],
];
/// CNP protocol lists ("" = no protocols: every port and protocol).
const PROTOCOLS: [&str; 5] = [
    "",
    "[{tcp: {destinationPort: {number: 80}}}]",
    "[{udp: {destinationPort: {number: 53}}}, {tcp: {destinationPort: {range: {start: 80, end: 90}}}}]",
    "[{destinationNamedPort: http}]",
    "[{sctp: {destinationPort: {number: 9000}}}]",
];
const SUBJECTS: [&str; 3] = [
    "{namespaces: {}}",
    "{namespaces: {matchLabels: {team: t2}}}",
    "{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}",
];
/// MoatPolicy specs (NetworkPolicy tier) with DNS-name peers.
const MOATPOLS: [&str; 2] = [
    r#"{"podSelector":{"matchLabels":{"app":"web"}},"egress":[{"to":[{"fqdn":"*.example.org"}],"ports":[{"port":443}]}]}"#,
    r#"{"podSelector":{},"externalGroups":[{"name":"pods","cidrs":["10.9.0.0/29"]}],"egress":[{"to":[{"group":"pods"},{"fqdn":"api.example.com"}]}]}"#,
];
const NETPOLS: [&str; 4] = [
    r#"{"podSelector":{"matchLabels":{"app":"db"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"web"}}}],"ports":[{"port":"http"}]}]}"#,
    r#"{"podSelector":{},"policyTypes":["Ingress","Egress"]}"#,
    r#"{"podSelector":{"matchLabels":{"app":"web"}},"egress":[{"to":[{"namespaceSelector":{}}],"ports":[{"port":53,"protocol":"UDP"},{"port":80}]}]}"#,
    r#"{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.9.0.0/29","except":["10.9.0.2/32"]}}]}]}"#,
];

#[derive(Clone, Debug)]
struct RuleSpec {
    action: usize,
    peers: Vec<usize>,
    protocols: usize,
}

#[derive(Clone, Debug)]
struct CnpSpec {
    baseline: bool,
    subject: usize,
    ingress: Vec<RuleSpec>,
    egress: Vec<RuleSpec>,
}

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    (
        0..3usize,
        proptest::collection::vec(0..PEERS.len(), 1..3),
        0..PROTOCOLS.len(),
    )
        .prop_map(|(action, peers, protocols)| RuleSpec {
            action,
            peers,
            protocols,
        })
}

fn cnp_spec() -> impl Strategy<Value = CnpSpec> {
    (
        any::<bool>(),
        0..SUBJECTS.len(),
        proptest::collection::vec(rule_spec(), 0..3),
        proptest::collection::vec(rule_spec(), 0..3),
    )
        .prop_map(|(baseline, subject, ingress, egress)| CnpSpec {
            baseline,
            subject,
            ingress,
            egress,
        })
}

fn cnp_yaml(i: usize, spec: &CnpSpec) -> String {
    let rules = |rules: &[RuleSpec], field: &str, egress: bool| -> String {
        let mut out = String::new();
        for r in rules {
            // Networks and domainNames peers exist only in egress rules, domainNames only in
            // Accept rules.
            let peers: Vec<&str> = r
                .peers
                .iter()
                .map(|p| PEERS[*p])
                .filter(|p| egress || !p.contains("networks"))
                .filter(|p| (egress && r.action == 0) || !p.contains("domainNames"))
                .collect();
            let peers = if peers.is_empty() {
                vec![PEERS[0]]
            } else {
                peers
            };
            let named = PROTOCOLS[r.protocols].contains("Named");
            let protocols = if named
                && peers
                    .iter()
                    .any(|p| p.contains("networks") || p.contains("domainNames"))
            {
                ""
            } else {
                PROTOCOLS[r.protocols]
            };
            out.push_str(&format!(
                "  - action: {}\n    {field}: [{}]\n",
                ["Accept", "Deny", "Pass"][r.action],
                peers.join(", ")
            ));
            if !protocols.is_empty() {
                out.push_str(&format!("    protocols: {protocols}\n"));
            }
        }
        out
    };
    let mut y = format!(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: cnp{i}}}\nspec:\n  tier: {}\n  priority: {}\n  subject: {}\n",
        if spec.baseline { "Baseline" } else { "Admin" },
        10 * i + 3,
        SUBJECTS[spec.subject]
    );
    if !spec.ingress.is_empty() {
        y.push_str("  ingress:\n");
        y.push_str(&rules(&spec.ingress, "from", false));
    }
    if !spec.egress.is_empty() {
        y.push_str("  egress:\n");
        y.push_str(&rules(&spec.egress, "to", true));
    }
    y
}

/// The model: in each namespace one pod of each app; addresses 10.9.0.<n>.
fn pods() -> Vec<Pod> {
    let mut out = Vec::new();
    let mut n = 1;
    for (ns, _) in NAMESPACES {
        for app in APPS {
            out.push(Pod {
                namespace: ns.into(),
                name: app.into(),
                labels: [("app", app)].into_iter().collect(),
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 9, 0, n))],
                ports: vec![
                    ContainerPort {
                        name: "http".into(),
                        port: if app == "api" { 85 } else { 80 },
                        protocol: Protocol::TCP,
                    },
                    ContainerPort {
                        name: "dns".into(),
                        port: 53,
                        protocol: Protocol::UDP,
                    },
                ],
            });
            n += 1;
        }
    }
    out
}

fn ns_labels(ns: &str) -> LabelSet {
    let mut l = LabelSet::new();
    l.insert("kubernetes.io/metadata.name", ns);
    if let Some(team) = NAMESPACES
        .iter()
        .find(|(n, _)| *n == ns)
        .and_then(|(_, t)| *t)
    {
        l.insert("team", team);
    }
    l
}

// ---------------------------------------------------------------------------------------------
// The reference evaluator
// ---------------------------------------------------------------------------------------------

/// What one direction's judgement looks at besides the endpoint: the other end, the pod
/// whose named ports apply (the destination), and the port and protocol.
#[derive(Clone, Copy)]
struct Flow<'a> {
    remote: &'a Pod,
    dest: &'a Pod,
    port: u16,
    proto: u8,
    /// Names the remote address was learned for (egress to an outside address).
    learned: &'a [&'a str],
}

/// The outside address, as a "pod" of no namespace: no selector peer matches it.
fn outside() -> Pod {
    Pod {
        namespace: String::new(),
        name: OUTSIDE.into(),
        labels: LabelSet::new(),
        ips: vec![OUTSIDE.parse().unwrap()],
        ports: vec![],
    }
}

fn is_pod(p: &Pod) -> bool {
    !p.namespace.is_empty()
}

fn learned_matches(pattern: &moat_policy::FqdnPattern, learned: &[&str]) -> bool {
    learned.iter().any(|name| pattern.matches(name))
}

struct World {
    pods: Vec<Pod>,
    cnps: Vec<NormalizedCnp>,
    netpols: Vec<NormalizedPolicy>,
}

fn port_matches(ports: &[RulePort], dest: &Pod, port: u16, proto: u8) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| {
            p.proto == proto
                && match &p.port {
                    PortSpec::Any => true,
                    PortSpec::Range(s, e) => *s <= port && port <= *e,
                    PortSpec::Named(name) => dest
                        .ports
                        .iter()
                        .any(|c| &c.name == name && c.port == port && c.protocol.number() == proto),
                }
        })
}

impl World {
    fn cnp_rule_matches(&self, rule: &NormalizedCnpRule, f: Flow) -> bool {
        let Flow {
            remote,
            dest,
            port,
            proto,
            learned,
        } = f;
        let peer_ok = match &rule.peers {
            None => true,
            Some(peers) => peers.iter().any(|p| match p {
                CnpPeer::Pods(sel) => {
                    is_pod(remote) && sel.matches(&ns_labels(&remote.namespace), &remote.labels)
                }
                CnpPeer::Networks(nets) => nets
                    .iter()
                    .any(|n| remote.ips.iter().any(|ip| n.contains(*ip))),
                CnpPeer::Nodes(_) => false,
                CnpPeer::Fqdn(pattern) => learned_matches(pattern, learned),
            }),
        };
        peer_ok && port_matches(&rule.ports, dest, port, proto)
    }

    /// Some(verdict) when the tier decides, None when it passes or nothing matches.
    fn tier(&self, tier: Tier, d: Direction, local: &Pod, f: Flow) -> Option<bool> {
        let mut policies: Vec<&NormalizedCnp> = self
            .cnps
            .iter()
            .filter(|c| c.tier == tier && c.selects(&ns_labels(&local.namespace), &local.labels))
            .collect();
        policies.sort_by_key(|c| c.priority);
        for c in policies {
            for rule in c.rules(d) {
                if self.cnp_rule_matches(rule, f) {
                    return match rule.action {
                        Action::Accept => Some(true),
                        Action::Deny => Some(false),
                        Action::Pass => None,
                    };
                }
            }
        }
        None
    }

    fn netpol(&self, d: Direction, local: &Pod, f: Flow) -> Option<bool> {
        let Flow {
            remote,
            dest,
            port,
            proto,
            learned,
        } = f;
        let selecting: Vec<&NormalizedPolicy> = self
            .netpols
            .iter()
            .filter(|p| {
                p.namespace == local.namespace
                    && p.rules(d).is_some()
                    && p.pod_selector.matches(&local.labels)
            })
            .collect();
        if selecting.is_empty() {
            return None;
        }
        Some(selecting.iter().any(|p| {
            p.rules(d).unwrap().iter().any(|r| {
                let peer_ok = match &r.peers {
                    None => true,
                    Some(peers) => peers.iter().any(|peer| match peer {
                        Peer::Selector { pods, namespaces } => {
                            let ns_ok = is_pod(remote)
                                && match namespaces {
                                    None => remote.namespace == p.namespace,
                                    Some(sel) => sel.matches(&ns_labels(&remote.namespace)),
                                };
                            ns_ok && pods.as_ref().is_none_or(|s| s.matches(&remote.labels))
                        }
                        Peer::IpBlock { cidr, except } => remote.ips.iter().any(|ip| {
                            cidr.contains(*ip) && !except.iter().any(|e| e.contains(*ip))
                        }),
                        Peer::Fqdn(pattern) => learned_matches(pattern, learned),
                    }),
                };
                peer_ok && port_matches(&r.ports, dest, port, proto)
            })
        }))
    }

    fn direction(&self, d: Direction, local: &Pod, f: Flow) -> bool {
        self.tier(Tier::Admin, d, local, f)
            .or_else(|| self.netpol(d, local, f))
            .or_else(|| self.tier(Tier::Baseline, d, local, f))
            .unwrap_or(true)
    }

    fn allowed(&self, src: &Pod, dst: &Pod, port: u16, proto: u8) -> bool {
        let flow = |remote| Flow {
            remote,
            dest: dst,
            port,
            proto,
            learned: &[],
        };
        self.direction(Direction::Egress, src, flow(dst))
            && self.direction(Direction::Ingress, dst, flow(src))
    }

    /// A flow from a pod to the outside address learned for `learned` (egress only: the
    /// destination is not an endpoint).
    fn allowed_outside(&self, src: &Pod, learned: &[&str], port: u16, proto: u8) -> bool {
        let dst = outside();
        let flow = Flow {
            remote: &dst,
            dest: &dst,
            port,
            proto,
            learned,
        };
        self.direction(Direction::Egress, src, flow)
    }
}

fn check(
    cnps: &[CnpSpec],
    netpols: &[(usize, usize)],
    moatpols: &[(usize, usize)],
) -> Result<(), TestCaseError> {
    let mut engine = Engine::new();
    for (ns, _) in NAMESPACES {
        engine.upsert_namespace(ns, ns_labels(ns)).unwrap();
    }
    let pods = pods();
    for p in &pods {
        engine.upsert_pod(p.clone()).unwrap();
    }
    let mut world = World {
        pods: pods.clone(),
        cnps: Vec::new(),
        netpols: Vec::new(),
    };
    for (i, spec) in cnps.iter().enumerate() {
        let yaml = cnp_yaml(i, spec);
        let cnp = ClusterNetworkPolicy::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        engine.upsert_cluster_policy(&cnp).unwrap();
        world.cnps.push(cnp.normalize().unwrap());
    }
    for (i, (ns, which)) in netpols.iter().enumerate() {
        let json = format!(
            r#"{{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{{"name":"np{i}","namespace":"{}"}},"spec":{}}}"#,
            NAMESPACES[*ns].0, NETPOLS[*which]
        );
        let np = NetworkPolicy::from_json(&json).unwrap();
        engine.upsert_policy(&np).unwrap();
        world.netpols.push(np.normalize().unwrap());
    }
    for (i, (ns, which)) in moatpols.iter().enumerate() {
        let json = format!(
            r#"{{"apiVersion":"moat.io/v1alpha1","kind":"MoatPolicy","metadata":{{"name":"mp{i}","namespace":"{}"}},"spec":{}}}"#,
            NAMESPACES[*ns].0, MOATPOLS[*which]
        );
        let mp = MoatPolicy::from_json(&json).unwrap();
        engine.upsert_moat_policy(&mp).unwrap();
        world.netpols.push(mp.normalize().unwrap().policy);
    }
    let state = engine.state();
    let mut disagreements = BTreeMap::new();
    for src in &world.pods {
        for dst in &world.pods {
            for (port, proto) in FLOWS {
                let end = |p: &Pod| FlowEnd::Pod(PodRef::new(&p.namespace, &p.name));
                let got = evaluate(state, &end(src), &end(dst), port, proto)
                    .unwrap()
                    .allowed;
                let want = world.allowed(src, dst, port, proto);
                if got != want {
                    disagreements.insert(
                        format!(
                            "{}/{} -> {}/{} {port}/{proto}",
                            src.namespace, src.name, dst.namespace, dst.name
                        ),
                        (got, want),
                    );
                }
            }
        }
        let from = FlowEnd::Pod(PodRef::new(&src.namespace, &src.name));
        let to = FlowEnd::Address(OUTSIDE.parse().unwrap());
        for learned in LEARNED {
            for (port, proto) in FLOWS {
                let got = evaluate_learned(state, &from, &to, port, proto, learned)
                    .unwrap()
                    .allowed;
                let want = world.allowed_outside(src, learned, port, proto);
                if got != want {
                    disagreements.insert(
                        format!(
                            "{}/{} -> {OUTSIDE} learned for {learned:?} {port}/{proto}",
                            src.namespace, src.name
                        ),
                        (got, want),
                    );
                }
            }
        }
    }
    prop_assert!(
        disagreements.is_empty(),
        "datapath replay vs reference (got, want): {disagreements:#?}\nCNPs:\n{}",
        cnps.iter()
            .enumerate()
            .map(|(i, s)| cnp_yaml(i, s))
            .collect::<Vec<_>>()
            .join("---\n")
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn compiled_tiers_agree_with_the_reference_evaluator(
        cnps in proptest::collection::vec(cnp_spec(), 0..5),
        netpols in proptest::collection::vec((0..3usize, 0..NETPOLS.len()), 0..3),
        moatpols in proptest::collection::vec((0..3usize, 0..MOATPOLS.len()), 0..2),
    ) {
        check(&cnps, &netpols, &moatpols)?;
    }
}

/// The reference can tell the tiers apart: an Admin Deny wins over a NetworkPolicy that
/// allows, a Pass hands over to it, and a Baseline Deny loses to it.
#[test]
fn tier_order_is_what_the_reference_checks() {
    let deny_all_admin = CnpSpec {
        baseline: false,
        subject: 0,
        ingress: vec![RuleSpec {
            action: 1,
            peers: vec![0],
            protocols: 0,
        }],
        egress: vec![],
    };
    let pass_admin = CnpSpec {
        ingress: vec![RuleSpec {
            action: 2,
            peers: vec![0],
            protocols: 0,
        }],
        ..deny_all_admin.clone()
    };
    let deny_baseline = CnpSpec {
        baseline: true,
        ..deny_all_admin.clone()
    };
    for (cnp, netpols) in [
        (deny_all_admin, vec![(0, 0)]),
        (pass_admin, vec![(0, 0), (1, 1)]),
        (deny_baseline, vec![(2, 3)]),
    ] {
        check(&[cnp], &netpols, &[]).unwrap();
    }
}

/// A verdict names the deciding tier, policy, priority and rule (by name, else by index),
/// and the offline replay reports the tier's reason.
#[test]
fn verdicts_name_the_deciding_tier_policy_priority_and_rule() {
    let mut engine = Engine::new();
    for (ns, _) in NAMESPACES {
        engine.upsert_namespace(ns, ns_labels(ns)).unwrap();
    }
    for p in pods() {
        engine.upsert_pod(p).unwrap();
    }
    let admin = ClusterNetworkPolicy::from_yaml(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 7\n  subject: {namespaces: {matchLabels: {team: t1}}}\n  ingress:\n  - {name: no-db, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}\n  - {action: Pass, from: [{namespaces: {}}]}\n",
    )
    .unwrap();
    let baseline = ClusterNetworkPolicy::from_yaml(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: isolate}\nspec:\n  tier: Baseline\n  priority: 3\n  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {matchLabels: {team: t2}}}]}\n",
    )
    .unwrap();
    engine.upsert_cluster_policy(&admin).unwrap();
    engine.upsert_cluster_policy(&baseline).unwrap();
    let pod = |ns: &str, name: &str| FlowEnd::Pod(PodRef::new(ns, name));
    let why = |from: FlowEnd, to: FlowEnd| {
        let v = evaluate(engine.state(), &from, &to, 80, 6).unwrap();
        let ingress = v.ingress.unwrap();
        (
            v.allowed,
            moat_common::reason::name(ingress.reason),
            engine.describe_rule(ingress.reason, ingress.rule_id),
        )
    };
    assert_eq!(
        why(pod("z", "db"), pod("x", "web")),
        (
            false,
            "admin-deny",
            Some(
                "Admin ClusterNetworkPolicy guard (priority 7) ingress rule \"no-db\": Deny".into()
            )
        )
    );
    // x/web passes its Admin tier; no NetworkPolicy; the Baseline denies team t2.
    assert_eq!(
        why(pod("y", "web"), pod("x", "web")),
        (
            false,
            "baseline-deny",
            Some("Baseline ClusterNetworkPolicy isolate (priority 3) ingress rule 0: Deny".into())
        )
    );
    // Passed by the Admin tier, nothing else matches: the default allows.
    assert_eq!(
        why(pod("z", "web"), pod("x", "web")),
        (true, "policy-allow", None)
    );
}
