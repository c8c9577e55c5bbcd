//! `--offline`: every probe judged by the pure engine (moat-policy), the same model the
//! datapath run builds (same labels, same named ports, same address plan), SCTP included.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::{Result, anyhow};
use moat_policy::{
    ClusterNetworkPolicy, ContainerPort, Engine, FlowEnd, LabelSet, NetworkPolicy, Pod, PodRef,
    evaluate,
};

use crate::{
    cases::{Case, CaseFile, NamedPort, Proto},
    report::{CaseResult, ProbeResult},
};

/// Pod addresses for the offline model: 10.77.0.<pod index + 1> (one /24, like the lab).
pub fn offline_ip(file: &CaseFile, pod: &str) -> Ipv4Addr {
    let index = file
        .model
        .pod_order
        .iter()
        .position(|p| p == pod)
        .expect("pod in podOrder");
    Ipv4Addr::new(10, 77, 0, index as u8 + 1)
}

/// A pod's container ports: `serve-<port>-<proto>` for every served port, plus the names
/// the case file gives the pod itself (e.g. upstream's `web` for 80/TCP).
pub fn container_ports(served: &[(u16, Proto)], named: &[NamedPort]) -> Vec<ContainerPort> {
    served
        .iter()
        .map(|(port, proto)| ContainerPort {
            name: format!("serve-{port}-{}", proto.lower()),
            port: *port,
            protocol: proto.policy(),
        })
        .chain(named.iter().map(|p| ContainerPort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.policy(),
        }))
        .collect()
}

/// Applies a case's policies: ClusterNetworkPolicies and NetworkPolicies, told apart by
/// apiVersion and kind.
pub fn apply_policies(engine: &mut Engine, policies: Vec<serde_json::Value>) -> Result<()> {
    for value in policies {
        if ClusterNetworkPolicy::is_one(&value) {
            let policy = ClusterNetworkPolicy::from_value(value).map_err(|e| anyhow!("{e}"))?;
            engine
                .upsert_cluster_policy(&policy)
                .map_err(|e| anyhow!("ClusterNetworkPolicy {}: {e}", policy.name()))?;
        } else {
            let policy = NetworkPolicy::from_value(value).map_err(|e| anyhow!("{e}"))?;
            engine
                .upsert_policy(&policy)
                .map_err(|e| anyhow!("NetworkPolicy {}: {e}", policy.object()))?;
        }
    }
    Ok(())
}

fn label_set(map: &std::collections::BTreeMap<String, String>) -> LabelSet {
    let mut l = LabelSet::new();
    for (k, v) in map {
        l.insert(k.clone(), v.clone());
    }
    l
}

fn build_engine(file: &CaseFile, case: &Case, served: &[(u16, Proto)]) -> Result<Engine> {
    let model = &file.model;
    let mut engine = Engine::new();
    engine
        .set_host_ips([IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))].into())
        .map_err(|e| anyhow!("host addresses: {e}"))?;
    for ns in model.namespaces.keys() {
        engine
            .upsert_namespace(ns, label_set(&case.namespace_labels(model, ns)))
            .map_err(|e| anyhow!("Namespace {ns}: {e}"))?;
    }
    for key in &model.pod_order {
        let m = &model.pods[key];
        let ports = container_ports(served, &m.ports);
        engine
            .upsert_pod(Pod {
                namespace: m.namespace.clone(),
                name: m.name.clone(),
                labels: label_set(&case.pod_labels(model, key)),
                ips: vec![IpAddr::V4(offline_ip(file, key))],
                ports,
            })
            .map_err(|e| anyhow!("Pod {key}: {e}"))?;
    }
    let policies = case.resolved_policies(model, &|p| offline_ip(file, p).to_string())?;
    apply_policies(&mut engine, policies)?;
    Ok(engine)
}

pub fn run_case(
    file: &CaseFile,
    case: &Case,
    served: &[(u16, Proto)],
    keep_all: bool,
) -> CaseResult {
    if let Some(reason) = &case.skip {
        return CaseResult::skipped_case(case, reason, keep_all);
    }
    let start = Instant::now();
    let engine = match build_engine(file, case, served) {
        Ok(e) => e,
        Err(e) => {
            return CaseResult::not_run(case, format!("{e:#}"), start.elapsed(), keep_all);
        }
    };
    let state = engine.state();
    let end = |key: &str| {
        let m = &file.model.pods[key];
        FlowEnd::Pod(PodRef::new(&m.namespace, &m.name))
    };
    let results = case
        .probes
        .iter()
        .map(|probe| {
            let r = ProbeResult::new(probe);
            match evaluate(
                state,
                &end(&probe.from),
                &end(&probe.to),
                probe.port,
                probe.protocol.number(),
            ) {
                Ok(v) => r.judge(v.allowed, 1),
                Err(e) => r.failed(&format!("evaluate: {e}")),
            }
        })
        .collect();
    CaseResult::new(
        &case.id,
        &case.name,
        results,
        None,
        start.elapsed(),
        keep_all,
    )
}
