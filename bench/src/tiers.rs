//! Per-packet cost of ClusterNetworkPolicy tiers (issue 17): a new flow's verdict with 0, 1,
//! 100 and 1,000 ClusterNetworkPolicies selecting the endpoint, through BPF_PROG_TEST_RUN on
//! the real verified programs. Each configuration is compiled by the policy engine from the
//! same cluster (one NetworkPolicy isolating the endpoint's ingress, plus N Admin and
//! Baseline policies), installed with the lookup hints moatd would set, into a datapath of
//! its own; batches are interleaved across configurations so machine noise hits all alike.
//!
//! The measured packet walks every tier: a SYN from the peer to port 9999 matches an Admin
//! Pass (policy 0), no other Admin rule (the others name ports 20000+), then the NetworkPolicy
//! tier, which isolates the endpoint and allows only 8080: default deny. With no cluster
//! policy the same packet is judged by the NetworkPolicy alone, with the no-deny shortcut
//! that moatd's hints allow, which is the cost the issue's "≤ 1.1× the cost with none" is
//! measured against.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, bail};
use moat_common::{IpcacheValue, MODE_ENFORCE};
use moat_datapath::{Datapath, Maps, PinDir};
use moat_policy::{
    ClusterNetworkPolicy, ContainerPort, DatapathState, Engine, LabelSet, NetworkPolicy, Pod,
    PodRef, Protocol,
};
use moat_testkit::{
    packet::{Packet, TCP_SYN},
    testrun::{Hook, TC_ACT_SHOT, TestRunner},
};
use serde_json::{Value, json};

use crate::util::{check_interrupted, median, round};

pub const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const COUNTS: [usize; 4] = [0, 1, 100, 1000];

fn pod(name: &str, ip: Ipv4Addr) -> Pod {
    Pod {
        namespace: "bench".into(),
        name: name.into(),
        labels: [("app", name)].into_iter().collect(),
        ips: vec![IpAddr::V4(ip)],
        ports: vec![ContainerPort {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::TCP,
        }],
    }
}

/// Policy `i` of `n`: the first passes the measured port; the rest deny the peer on a port
/// of their own (a key the measured packet never hits), alternating Admin and Baseline.
fn cluster_policy(i: usize) -> String {
    let tier = if i.is_multiple_of(2) {
        "Admin"
    } else {
        "Baseline"
    };
    let rule = if i == 0 {
        "  - {name: hand-over, action: Pass, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 9999}}}]}\n".to_string()
    } else {
        format!(
            "  - {{action: Deny, from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: peer}}}}}}}}], protocols: [{{tcp: {{destinationPort: {{number: {}}}}}}}]}}\n",
            20000 + i
        )
    };
    format!(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: bench-{i}}}\nspec:\n  tier: {tier}\n  priority: {}\n  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: pod}}}}}}}}\n  ingress:\n{rule}",
        i % 1001
    )
}

pub fn compiled(n: usize) -> Result<DatapathState> {
    let mut engine = Engine::new();
    let mut ns = LabelSet::new();
    ns.insert("kubernetes.io/metadata.name", "bench");
    engine.upsert_namespace("bench", ns)?;
    engine.upsert_pod(pod("pod", POD_V4))?;
    engine.upsert_pod(pod("peer", PEER_V4))?;
    let np = NetworkPolicy::from_json(
        r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"only-8080","namespace":"bench"},"spec":{"podSelector":{"matchLabels":{"app":"pod"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"peer"}}}],"ports":[{"port":8080}]}]}}"#,
    )?;
    engine.upsert_policy(&np)?;
    for i in 0..n {
        let cnp = ClusterNetworkPolicy::from_yaml(&cluster_policy(i))?;
        engine.upsert_cluster_policy(&cnp)?;
    }
    Ok(engine.state().clone())
}

/// Writes one compiled state's entries, and the endpoint on `ifindex`, into a datapath.
pub fn install(maps: &mut Maps, state: &DatapathState, ifindex: u32) -> Result<usize> {
    let hints = moatd::desired::lookup_hints(state);
    let endpoint = &state.endpoints[&PodRef::new("bench", "pod")];
    let flags = hints
        .get(&endpoint.policy_id)
        .copied()
        .unwrap_or(moat_common::ENDPOINT_HINT_FLAGS);
    maps.upsert_endpoint(ifindex, &endpoint.to_endpoint_info(MODE_ENFORCE, flags))?;
    for (net, id) in &state.ipcache {
        maps.upsert_ipcache(
            *net,
            &IpcacheValue {
                identity: id.0,
                ..Default::default()
            },
        )?;
    }
    for (k, v) in &state.policy {
        maps.upsert_policy(k, v)?;
    }
    for (k, set) in &state.port_ranges {
        maps.upsert_port_ranges(k, set)?;
    }
    for ((pid, dir, net), set) in &state.cidr_v4 {
        maps.upsert_cidr(*pid, *dir, ipnetwork::IpNetwork::V4(*net), set)?;
    }
    Ok(state.policy.len())
}

pub struct Params {
    pub repeat: u32,
    pub batches: usize,
}

/// Loads one datapath per count under `pin_root`, measures, and returns the JSON section.
pub fn measure(pin_root: &str, ifindex: u32, p: &Params) -> Result<Value> {
    let syn = Packet::tcp(
        IpAddr::V4(PEER_V4),
        IpAddr::V4(POD_V4),
        40001,
        9999,
        TCP_SYN,
    )
    .bytes();
    let mut subjects = Vec::new();
    for n in COUNTS {
        let pins = PinDir::new(format!("{pin_root}/tiers-{n}"));
        let dp = Datapath::load(&pins).with_context(|| format!("loading the datapath for {n}"))?;
        let mut maps = Maps::open(&pins)?;
        let state = compiled(n).with_context(|| format!("compiling {n} cluster policies"))?;
        let entries = install(&mut maps, &state, ifindex)?;
        subjects.push((n, dp, TestRunner::open(&pins)?, entries));
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    for _ in 0..p.batches {
        check_interrupted()?;
        for (s, (n, _, runner, _)) in subjects.iter().enumerate() {
            let r = runner.run(Hook::ToContainer, ifindex, &syn, p.repeat)?;
            if r.verdict != TC_ACT_SHOT {
                bail!(
                    "{n} cluster policies: the SYN to 9999 returned {} (expected a drop)",
                    r.verdict
                );
            }
            samples[s].push(r.per_run.as_nanos() as f64);
        }
    }
    let base = median(&samples[0]).unwrap_or(f64::NAN);
    let rows: Vec<Value> = subjects
        .iter()
        .zip(&samples)
        .map(|((n, _, _, entries), s)| {
            let m = median(s).unwrap_or(f64::NAN);
            json!({
                "cluster_policies": n,
                "policy_entries": entries,
                "ns_per_packet": m,
                "ratio_vs_none": round(m / base, 3),
                "samples_ns": s,
            })
        })
        .collect();
    Ok(json!({
        "method": "BPF_PROG_TEST_RUN of moat_to_container: a new TCP SYN judged through the \
                   Admin (a Pass), NetworkPolicy (isolated, default deny) and Baseline tiers; \
                   the kernel reports the mean time per run in whole ns; value = median over \
                   batches, configurations interleaved",
        "repeat": p.repeat,
        "batches": p.batches,
        "goal": "ratio_vs_none <= 1.1 at 1,000 cluster policies (issue 17)",
        "configurations": rows,
    }))
}
