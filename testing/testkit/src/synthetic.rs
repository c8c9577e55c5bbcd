//! Synthetic clusters for benchmarks and scale tests: deterministic from a seed, shaped like
//! a real cluster (namespaces with team/env labels, Deployments whose replicas share
//! labels, a mix of NetworkPolicy styles including named ports, namespaceSelectors, port
//! ranges and ipBlocks with excepts).

use std::net::{IpAddr, Ipv4Addr};

use serde_json::json;

use moat_policy::{ClusterInputs, ContainerPort, LabelSet, NetworkPolicy, Pod, Protocol};

/// SplitMix64: tiny, deterministic, good enough to shape test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n) (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

pub const TEAMS: usize = 20;
const TIERS: [&str; 3] = ["web", "api", "db"];

pub fn namespace_name(i: usize) -> String {
    format!("ns-{i}")
}

pub fn namespace_labels(i: usize) -> LabelSet {
    [
        ("team", format!("team-{}", i % TEAMS)),
        ("env", ["prod", "staging", "dev"][i % 3].to_string()),
    ]
    .into_iter()
    .collect()
}

/// The address of the n-th pod: 10.0.0.0/8 from 10.0.1.0 on.
pub fn pod_ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0100u32 + n as u32))
}

/// A pod of app `app` (0-based) in namespace `ns`: app label, tier, a volatile hash, and
/// container ports named after the tier.
pub fn pod(ns: usize, app: usize, replica: usize, n: usize, rng: &mut Rng) -> Pod {
    let tier = TIERS[app % 3];
    let labels: LabelSet = [
        ("app", format!("app-{app}")),
        ("tier", tier.to_string()),
        (
            "pod-template-hash",
            format!("{:08x}", rng.next_u64() as u32),
        ),
    ]
    .into_iter()
    .collect();
    let port = |name: &str, port: u16| ContainerPort {
        name: name.into(),
        port,
        protocol: Protocol::TCP,
    };
    let ports = match tier {
        "db" => vec![port("db", 5432)],
        _ => vec![port("http", 8080), port("metrics", 9090)],
    };
    Pod {
        namespace: namespace_name(ns),
        name: format!("app-{app}-{replica}"),
        labels,
        ips: vec![pod_ip(n)],
        ports,
    }
}

/// One NetworkPolicy in one of eight styles chosen by `style`; `rng` picks its details.
pub fn policy(ns: &str, name: &str, style: usize, apps: usize, rng: &mut Rng) -> NetworkPolicy {
    let app = |rng: &mut Rng| format!("app-{}", rng.below(apps));
    let spec = match style % 8 {
        // Default deny ingress for the namespace.
        0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        // App to app on a port, same namespace.
        1 => json!({
            "podSelector": {"matchLabels": {"app": app(rng)}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app(rng)}}}],
                         "ports": [{"port": 8080 + rng.below(4) as u16}]}]
        }),
        // Tier to tier by named port.
        2 => json!({
            "podSelector": {"matchLabels": {"tier": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "api"}}}],
                         "ports": [{"port": "db"}]}]
        }),
        // Web reachable from every namespace of one team, on a port range.
        3 => json!({
            "podSelector": {"matchLabels": {"tier": "web"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", rng.below(TEAMS))}}}],
                         "ports": [{"port": 8000, "endPort": 8099}]}]
        }),
        // Egress to the internet but not the cluster, HTTPS only, plus DNS.
        4 => json!({
            "podSelector": {"matchLabels": {"app": app(rng)}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}],
                 "ports": [{"port": 443}]},
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-0"}}}],
                 "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]}
            ]
        }),
        // Egress within the namespace only.
        5 => json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {}}]}]
        }),
        // Monitoring: metrics port from prod namespaces' api pods.
        6 => json!({
            "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}},
                                   "podSelector": {"matchLabels": {"tier": "api"}}}],
                         "ports": [{"port": "metrics"}]}]
        }),
        // An external partner range.
        _ => json!({
            "podSelector": {"matchLabels": {"app": app(rng)}},
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("203.0.{}.0/24", rng.below(256))}}],
                         "ports": [{"port": 8080}, {"port": 9000, "endPort": 9010, "protocol": "UDP"}]}]
        }),
    };
    NetworkPolicy::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    }))
    .expect("synthetic policies are valid")
}

/// Apps per namespace for a cluster of this shape (about 4 replicas per app).
pub fn apps_per_namespace(pods: usize, namespaces: usize) -> usize {
    (pods / namespaces.max(1) / 4).max(1)
}

/// A cluster of `pods` pods and `policies` NetworkPolicies spread over `namespaces`
/// namespaces, plus three node addresses. Same arguments, same cluster.
pub fn synthetic(pods: usize, policies: usize, namespaces: usize, seed: u64) -> ClusterInputs {
    let namespaces = namespaces.max(1);
    let mut rng = Rng::new(seed);
    let mut inputs = ClusterInputs::default();
    for i in 0..namespaces {
        inputs
            .namespaces
            .insert(namespace_name(i), namespace_labels(i));
    }
    let apps = apps_per_namespace(pods, namespaces);
    for n in 0..pods {
        let ns = n % namespaces;
        let k = n / namespaces;
        let p = pod(ns, k % apps, k / apps, n, &mut rng);
        inputs.pods.insert(p.pod_ref(), p);
    }
    for i in 0..policies {
        let ns = namespace_name(i % namespaces);
        let style = rng.below(8);
        let p = policy(&ns, &format!("pol-{i}"), style, apps, &mut rng)
            .normalize()
            .expect("valid");
        inputs.policies.insert((ns, p.name.clone()), p);
    }
    for h in 1..=3u8 {
        inputs
            .host_ips
            .insert(IpAddr::V4(Ipv4Addr::new(192, 168, 0, h)));
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_policy::{Engine, compile};

    #[test]
    fn synthetic_is_deterministic_sized_and_compiles() {
        let a = synthetic(400, 40, 10, 7);
        assert_eq!(a, synthetic(400, 40, 10, 7));
        assert_ne!(a, synthetic(400, 40, 10, 8));
        assert_eq!(
            (a.pods.len(), a.policies.len(), a.namespaces.len()),
            (400, 40, 10)
        );
        let state = compile(&a).unwrap();
        assert_eq!(state.endpoints.len(), 400);
        assert!(state.identities.len() >= 10 && state.identities.len() < 400);
        assert!(!state.cidr_v4.is_empty() || !state.port_ranges.is_empty());
        let engine = Engine::from_inputs(a).unwrap();
        assert_eq!(engine.state(), &state);
    }
}
