//! `moat-bench cluster-sim`: Moat beyond one node, by a deterministic model (docs/scale.md).
//!
//!   moat-bench cluster-sim [--nodes 50,500,5000] [--pods-per-node 30] [--churn-per-pod-hour 0.5]
//!                          [--burst-starts-per-s 100] [--measure-pods 2000,4000,8000] [--out FILE]
//!
//! Two parts:
//! 1. measured, at small scale: synthetic clusters (moat-testkit's `synthetic`, 50 pods per
//!    namespace, one NetworkPolicy per 10 pods, the shape `moat-bench policy` uses) compiled by
//!    the real engine; their map entries are counted and the heap they take is read from the
//!    allocator (glibc `mallinfo2`), and the full-compile time is timed;
//! 2. modelled, at cluster scale: what moatd watches (every Pod, Namespace, Node,
//!    NetworkPolicy, MoatPolicy and ClusterNetworkPolicy in the cluster: node-daemon/src/kube/
//!    watch.rs sets no field selector), so every node receives every pod event, writes every
//!    pod address into its ipcache (and the exact-match mirror), and the policy, port-range
//!    and CIDR entries of its own pods' policy ids (node-daemon/src/desired.rs writes only
//!    local owners' entries; the engine still compiles every identity's). Map fill is set
//!    against the real capacities (`moat_datapath::layout::specs`).
//!
//! Extrapolation, stated in the output, always through the two largest measured sizes: ipcache
//! entries and identities linearly in pods; policy, port-range and CIDR entries and the full
//! compile time as a power law (y = a * pods^k); moatd's heap as a * pods + b * entries (the
//! policy-side entries just extrapolated), which follows the superlinear policy tables.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;
use moat_common::map_name;
use moat_datapath::layout;
use moat_policy::Engine;
use moat_testkit::synthetic::synthetic;
use serde_json::{Value, json};

/// Watches each moatd opens (node-daemon/src/kube/watch.rs): pods, namespaces, NetworkPolicies,
/// MoatPolicies, ClusterNetworkPolicies, nodes.
pub const WATCHES_PER_NODE: u64 = 6;
/// Kernel writes per pod address: the LPM ipcache entry and its exact-match mirror
/// (MOAT_HOSTS4/6; `Maps::upsert_ipcache` writes both for a /32 or /128).
pub const KERNEL_WRITES_PER_ADDRESS: u64 = 2;
/// Pods per namespace and pods per NetworkPolicy of the measured synthetic clusters.
const PODS_PER_NAMESPACE: usize = 50;
const PODS_PER_POLICY: usize = 10;
const SEED: u64 = 42;

#[derive(clap::Args)]
pub struct Args {
    /// Cluster sizes (nodes) to model.
    #[arg(long, value_delimiter = ',', default_values_t = [50usize, 500, 5000])]
    nodes: Vec<usize>,
    #[arg(long, default_value_t = 30)]
    pods_per_node: usize,
    /// Steady churn: replacements (one start, one stop) per pod per hour.
    #[arg(long, default_value_t = 0.5)]
    churn_per_pod_hour: f64,
    /// A rollout burst: pod starts per second cluster-wide (each replacing a pod).
    #[arg(long, default_value_t = 100.0)]
    burst_starts_per_s: f64,
    /// Watch events one pod start causes (ADDED, bound, IP and status updates): an assumption.
    #[arg(long, default_value_t = 5.0)]
    events_per_start: f64,
    /// Watch events one pod stop causes (deletionTimestamp, status, DELETED): an assumption.
    #[arg(long, default_value_t = 3.0)]
    events_per_stop: f64,
    /// Seconds between status updates of one Node object (kubelet's nodeStatusReportFrequency).
    #[arg(long, default_value_t = 300.0)]
    node_update_period_s: f64,
    /// Policy object changes per second, cluster-wide (NetworkPolicy, MoatPolicy, CNP).
    #[arg(long, default_value_t = 0.1)]
    policy_changes_per_s: f64,
    /// Synthetic cluster sizes (pods) measured with the real engine.
    #[arg(long, value_delimiter = ',', default_values_t = [2000usize, 4000, 8000])]
    measure_pods: Vec<usize>,
    /// Also write the result as section "cluster_sim" of this file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// The model's inputs for one cluster size.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub nodes: u64,
    pub pods_per_node: u64,
    pub churn_per_pod_hour: f64,
    pub burst_starts_per_s: f64,
    pub events_per_start: f64,
    pub events_per_stop: f64,
    pub node_update_period_s: f64,
    pub policy_changes_per_s: f64,
}

/// Rates at one churn level.
#[derive(Clone, Debug, PartialEq)]
pub struct Rates {
    /// Pod starts per second, cluster-wide (as many stops).
    pub starts_per_s: f64,
    /// Watch events one moatd receives per second, by resource.
    pub pod_events_per_node: f64,
    pub node_events_per_node: f64,
    pub policy_events_per_node: f64,
    pub events_per_node: f64,
    /// ipcache entries written or deleted per node per second (each is KERNEL_WRITES_PER_ADDRESS
    /// kernel writes).
    pub ipcache_updates_per_node: f64,
    /// Watch events the API server sends per second, all nodes together.
    pub apiserver_events_out: f64,
    /// Pod events per node if each moatd watched only its own node's pods.
    pub pod_events_per_node_local_only: f64,
}

impl Model {
    pub fn pods(&self) -> u64 {
        self.nodes * self.pods_per_node
    }

    pub fn watch_streams(&self) -> u64 {
        self.nodes * WATCHES_PER_NODE
    }

    /// Objects one moatd lists when it starts (and a relist after an expired watch): every
    /// pod and node (namespaces and policies left out).
    pub fn objects_listed_per_start(&self) -> u64 {
        self.pods() + self.nodes
    }

    pub fn rates(&self, starts_per_s: f64) -> Rates {
        let per_lifecycle = self.events_per_start + self.events_per_stop;
        let pod_events_per_node = starts_per_s * per_lifecycle;
        let node_events_per_node = self.nodes as f64 / self.node_update_period_s;
        let policy_events_per_node = self.policy_changes_per_s;
        let events_per_node = pod_events_per_node + node_events_per_node + policy_events_per_node;
        // A start writes the new pod's address, a stop deletes the old one's.
        let ipcache_updates_per_node = 2.0 * starts_per_s;
        let local_share = 1.0 / self.nodes as f64;
        Rates {
            starts_per_s,
            pod_events_per_node,
            node_events_per_node,
            policy_events_per_node,
            events_per_node,
            ipcache_updates_per_node,
            apiserver_events_out: events_per_node * self.nodes as f64,
            pod_events_per_node_local_only: pod_events_per_node * local_share,
        }
    }

    pub fn steady(&self) -> Rates {
        self.rates(self.pods() as f64 * self.churn_per_pod_hour / 3600.0)
    }

    pub fn burst(&self) -> Rates {
        self.rates(self.burst_starts_per_s)
    }
}

/// What one synthetic cluster compiles to, and what it costs.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    pub identities: usize,
    pub ipcache: usize,
    /// ipcache entries that are a pod's address (/32); the rest are the node's own addresses
    /// and the ipBlock CIDRs policies name.
    pub ipcache_pods: usize,
    pub policy: usize,
    pub port_ranges: usize,
    pub cidr: usize,
    /// Heap bytes: the inputs (as moatd's cluster state holds them), the engine (its own copy
    /// of the inputs, tables and compiled state), a copy of the compiled state (as moatd's
    /// record of what it applied).
    pub inputs_bytes: u64,
    pub engine_bytes: u64,
    pub applied_bytes: u64,
    pub full_compile: Duration,
}

impl Sample {
    /// Entries of the policy-side tables (policy, port ranges, CIDR).
    pub fn policy_side(&self) -> usize {
        self.policy + self.port_ranges + self.cidr
    }

    pub fn moatd_bytes(&self) -> u64 {
        self.inputs_bytes + self.engine_bytes + self.applied_bytes
    }
}

/// Live heap bytes (every arena, mmapped chunks included).
fn heap_bytes() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

pub fn measure(pods: usize) -> Sample {
    let namespaces = (pods / PODS_PER_NAMESPACE).max(1);
    let policies = pods / PODS_PER_POLICY;
    let m0 = heap_bytes();
    let inputs = synthetic(pods, policies, namespaces, SEED);
    let m1 = heap_bytes();
    let started = Instant::now();
    let engine = Engine::from_inputs(inputs.clone()).expect("synthetic clusters compile");
    let mut full_compile = started.elapsed();
    let m2 = heap_bytes();
    // The fastest of three compiles: the machine is shared.
    for _ in 0..2 {
        let started = Instant::now();
        drop(Engine::from_inputs(inputs.clone()).expect("synthetic clusters compile"));
        full_compile = full_compile.min(started.elapsed());
    }
    let applied = engine.state().clone();
    let m3 = heap_bytes();
    let state = engine.state();
    let pod_ips: std::collections::BTreeSet<std::net::IpAddr> = inputs
        .pods
        .values()
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    let ipcache_pods = state
        .ipcache
        .keys()
        .filter(|net| net.prefix() == 32 && pod_ips.contains(&net.ip()))
        .count();
    let sample = Sample {
        pods,
        policies,
        namespaces,
        identities: state.identities.len(),
        ipcache: state.ipcache.len(),
        ipcache_pods,
        policy: state.policy.len(),
        port_ranges: state.port_ranges.len(),
        cidr: state.cidr_v4.len() + state.cidr_v6.len(),
        inputs_bytes: m1.saturating_sub(m0),
        engine_bytes: m2.saturating_sub(m1),
        applied_bytes: m3.saturating_sub(m2),
        full_compile,
    };
    drop((applied, engine, inputs));
    sample
}

/// `y = a * x^k` through two points; returns (a, k).
pub fn power_fit(x1: f64, y1: f64, x2: f64, y2: f64) -> (f64, f64) {
    if y1 <= 0.0 || y2 <= 0.0 || x1 == x2 {
        return (0.0, 1.0);
    }
    let k = (y2 / y1).ln() / (x2 / x1).ln();
    (y1 / x1.powf(k), k)
}

pub fn power_at(fit: (f64, f64), x: f64) -> f64 {
    fit.0 * x.powf(fit.1)
}

/// `y = a + b * x` through two points, evaluated at `x`.
pub fn linear_at(x1: f64, y1: f64, x2: f64, y2: f64, x: f64) -> f64 {
    let b = (y2 - y1) / (x2 - x1);
    y1 + b * (x - x1)
}

/// (a, b) with `z = a * x + b * y` through two points `[x, y, z]`; (0, 0) when they are
/// degenerate.
pub fn solve2(p: [f64; 3], q: [f64; 3]) -> (f64, f64) {
    let det = p[0] * q[1] - p[1] * q[0];
    if det == 0.0 {
        return (0.0, 0.0);
    }
    (
        (p[2] * q[1] - p[1] * q[2]) / det,
        (p[0] * q[2] - p[2] * q[0]) / det,
    )
}

/// A map's capacity from the real layout.
#[cfg(test)]
fn capacity(name: &str) -> u64 {
    layout::specs()
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.max_entries as u64)
        .unwrap_or(0)
}

/// Kernel bytes of a map: a preallocated hash map (flags 0, as Moat's are) takes its full
/// capacity whatever it holds; an LPM trie takes memory per entry. The per-element header
/// sizes are the kernel's (struct htab_elem 48 bytes, struct lpm_trie_node 40 bytes on
/// x86-64), as read from the kernel source, not measured here.
pub fn kernel_bytes(kind: MapKind, key: u64, value: u64, max: u64, entries: u64) -> u64 {
    let round8 = |x: u64| x.div_ceil(8) * 8;
    match kind {
        MapKind::Preallocated => max * (48 + round8(key) + round8(value)),
        MapKind::Lpm => entries.min(max) * (40 + key + value),
        MapKind::Other => 0,
    }
}

/// How a map's kernel memory grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// Hash and LRU hash maps (created without BPF_F_NO_PREALLOC).
    Preallocated,
    /// LPM tries.
    Lpm,
    Other,
}

impl MapKind {
    /// From the layout's map type (aya's `MapType`, named by its Debug form: the bench does
    /// not depend on aya itself).
    fn of(map_type: &impl std::fmt::Debug) -> Self {
        match format!("{map_type:?}").as_str() {
            "Hash" | "LruHash" => Self::Preallocated,
            "LpmTrie" => Self::Lpm,
            _ => Self::Other,
        }
    }
}

fn map_row(name: &'static str, entries: f64) -> Value {
    let spec = layout::specs().into_iter().find(|s| s.name == name);
    let Some(spec) = spec else {
        return json!({"map": name, "error": "not in layout"});
    };
    let cap = spec.max_entries as u64;
    let e = entries.round() as u64;
    json!({
        "map": name,
        "key_bytes": spec.key_size,
        "value_bytes": spec.value_size,
        "capacity": cap,
        "entries": e,
        "fill_pct": round1(100.0 * e as f64 / cap as f64),
        "overflows": e > cap,
        "kernel_bytes": kernel_bytes(MapKind::of(&spec.map_type), spec.key_size as u64, spec.value_size as u64, cap, e),
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn rates_json(r: &Rates) -> Value {
    json!({
        "pod_starts_per_s": round1(r.starts_per_s),
        "watch_events_per_node_per_s": {
            "pods": round1(r.pod_events_per_node),
            "nodes": round1(r.node_events_per_node),
            "policies": round1(r.policy_events_per_node),
            "total": round1(r.events_per_node),
        },
        "ipcache_updates_per_node_per_s": round1(r.ipcache_updates_per_node),
        "ipcache_kernel_writes_per_node_per_s":
            round1(r.ipcache_updates_per_node * KERNEL_WRITES_PER_ADDRESS as f64),
        "apiserver_watch_events_out_per_s": r.apiserver_events_out.round(),
        "pod_events_per_node_per_s_if_local_only": (r.pod_events_per_node_local_only * 1000.0).round() / 1000.0,
    })
}

pub fn main(args: Args) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let mut sizes = args.measure_pods.clone();
    sizes.sort();
    sizes.dedup();
    anyhow::ensure!(sizes.len() >= 2, "--measure-pods needs two sizes or more");
    let samples: Vec<Sample> = sizes.iter().map(|&p| measure(p)).collect();
    let (s1, s2) = (&samples[samples.len() - 2], &samples[samples.len() - 1]);
    let fit = |f: fn(&Sample) -> f64| power_fit(s1.pods as f64, f(s1), s2.pods as f64, f(s2));
    let policy_fit = fit(|s| s.policy as f64);
    let ranges_fit = fit(|s| s.port_ranges as f64);
    let cidr_fit = fit(|s| s.cidr as f64);
    let lin =
        |f: fn(&Sample) -> f64, x: f64| linear_at(s1.pods as f64, f(s1), s2.pods as f64, f(s2), x);
    let heap_fit = solve2(
        [
            s1.pods as f64,
            s1.policy_side() as f64,
            s1.moatd_bytes() as f64,
        ],
        [
            s2.pods as f64,
            s2.policy_side() as f64,
            s2.moatd_bytes() as f64,
        ],
    );
    let compile_fit = fit(|s| s.full_compile.as_secs_f64());

    let measured: Vec<Value> = samples
        .iter()
        .map(|s| {
            json!({
                "pods": s.pods, "policies": s.policies, "namespaces": s.namespaces,
                "identities": s.identities, "ipcache": s.ipcache, "ipcache_pod_addresses": s.ipcache_pods,
                "policy": s.policy,
                "port_ranges": s.port_ranges, "cidr": s.cidr,
                "heap_bytes": {"inputs": s.inputs_bytes, "engine": s.engine_bytes,
                               "applied": s.applied_bytes, "moatd_total": s.moatd_bytes()},
                "heap_bytes_per_pod": s.moatd_bytes() / s.pods as u64,
                "full_compile_ms": round1(s.full_compile.as_secs_f64() * 1e3),
            })
        })
        .collect();

    let mut clusters = Vec::new();
    let mut table = Vec::new();
    for &nodes in &args.nodes {
        let model = Model {
            nodes: nodes as u64,
            pods_per_node: args.pods_per_node as u64,
            churn_per_pod_hour: args.churn_per_pod_hour,
            burst_starts_per_s: args.burst_starts_per_s,
            events_per_start: args.events_per_start,
            events_per_stop: args.events_per_stop,
            node_update_period_s: args.node_update_period_s,
            policy_changes_per_s: args.policy_changes_per_s,
        };
        let pods = model.pods() as f64;
        let (steady, burst) = (model.steady(), model.burst());
        let ipcache = lin(|s| s.ipcache as f64, pods);
        let identities = lin(|s| s.identities as f64, pods);
        let policy = power_at(policy_fit, pods);
        let (ranges, cidr) = (power_at(ranges_fit, pods), power_at(cidr_fit, pods));
        let heap = heap_fit.0 * pods + heap_fit.1 * (policy + ranges + cidr);
        // A node writes only the entries of its own pods' policy ids (at most one identity
        // per local pod), at the cluster's average entries per identity.
        let local_share = (args.pods_per_node as f64).min(identities) / identities;
        let (policy_node, ranges_node, cidr_node) = (
            policy * local_share,
            ranges * local_share,
            cidr * local_share,
        );
        let compile_s = power_at(compile_fit, pods);
        let maps = vec![
            map_row(map_name::ENDPOINTS, args.pods_per_node as f64),
            map_row(map_name::IPCACHE_V4, ipcache),
            map_row(map_name::HOSTS_V4, ipcache),
            map_row(map_name::POLICY, policy_node),
            map_row(map_name::PORT_RANGES, ranges_node),
            map_row(map_name::CIDR_V4, cidr_node),
        ];
        let overflowing: Vec<&str> = maps
            .iter()
            .filter(|m| m["overflows"] == json!(true))
            .filter_map(|m| m["map"].as_str())
            .collect();
        table.push(format!(
            "{:>6} {:>8} {:>9.0} {:>9.1} {:>10.1} {:>12.0} {:>9.0} {:>9.0} {:>11.0} {:>9.1} {:>9.2}  {}",
            nodes,
            model.pods(),
            identities,
            steady.events_per_node,
            burst.events_per_node,
            burst.apiserver_events_out,
            burst.ipcache_updates_per_node,
            ipcache,
            policy_node,
            heap / (1 << 20) as f64,
            compile_s,
            if overflowing.is_empty() { "-".to_string() } else { overflowing.join(",") },
        ));
        clusters.push(json!({
            "nodes": nodes,
            "pods": model.pods(),
            "identities_est": identities.round(),
            "policy_entries_cluster_wide": policy.round(),
            "policy_entries_per_node": policy_node.round(),
            "watch_streams": model.watch_streams(),
            "objects_listed_per_moatd_start": model.objects_listed_per_start(),
            "objects_listed_if_every_moatd_restarts": model.objects_listed_per_start() * model.nodes,
            "steady": rates_json(&steady),
            "burst": rates_json(&burst),
            "maps": maps,
            "overflowing_maps": overflowing,
            "moatd_heap_mib_est": round1(heap / (1 << 20) as f64),
            "full_compile_s_est": (compile_s * 100.0).round() / 100.0,
        }));
    }

    let section = json!({
        "assumptions": {
            "pods_per_node": args.pods_per_node,
            "churn_per_pod_hour": args.churn_per_pod_hour,
            "burst_starts_per_s": args.burst_starts_per_s,
            "events_per_start": args.events_per_start,
            "events_per_stop": args.events_per_stop,
            "node_update_period_s": args.node_update_period_s,
            "policy_changes_per_s": args.policy_changes_per_s,
            "watches_per_node": WATCHES_PER_NODE,
            "measured_shape": format!("{PODS_PER_NAMESPACE} pods per namespace, one NetworkPolicy per {PODS_PER_POLICY} pods, seed {SEED}"),
            "extrapolation": "through the two largest measured sizes: ipcache and identities linear in pods; policy, port-range, CIDR entries and full-compile time a power law a*pods^k; heap a*pods + b*(policy + port-range + CIDR entries)",
        },
        "fits": {
            "policy_entries_exponent": (policy_fit.1 * 100.0).round() / 100.0,
            "port_ranges_exponent": (ranges_fit.1 * 100.0).round() / 100.0,
            "cidr_exponent": (cidr_fit.1 * 100.0).round() / 100.0,
            "heap_bytes_per_pod": heap_fit.0.round(),
            "heap_bytes_per_policy_side_entry": heap_fit.1.round(),
            "full_compile_exponent": (compile_fit.1 * 100.0).round() / 100.0,
        },
        "measured": measured,
        "clusters": clusters,
    });
    println!("{}", serde_json::to_string_pretty(&section)?);
    println!();
    println!(
        "{:>6} {:>8} {:>9} {:>9} {:>10} {:>12} {:>9} {:>9} {:>11} {:>9} {:>9}  overflowing",
        "nodes",
        "pods",
        "idents",
        "ev/node",
        "ev/node@b",
        "apisrv ev/s@b",
        "ipc/s@b",
        "ipcache",
        "policy/node",
        "heap MiB",
        "compile s"
    );
    for row in &table {
        println!("{row}");
    }
    println!(
        "(ev/node: watch events per node per second at {} replacements per pod per hour; @b: during a burst of {} pod starts/s)",
        args.churn_per_pod_hour, args.burst_starts_per_s
    );
    if let Some(out) = &args.out {
        crate::util::write_section(out, "cluster_sim", section)?;
        println!("written: {} (section \"cluster_sim\")", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(nodes: u64) -> Model {
        Model {
            nodes,
            pods_per_node: 30,
            churn_per_pod_hour: 0.5,
            burst_starts_per_s: 100.0,
            events_per_start: 5.0,
            events_per_stop: 3.0,
            node_update_period_s: 300.0,
            policy_changes_per_s: 0.1,
        }
    }

    #[test]
    fn rates_by_hand_for_ten_nodes() {
        let m = model(10);
        assert_eq!(m.pods(), 300);
        assert_eq!(m.watch_streams(), 60);
        assert_eq!(m.objects_listed_per_start(), 310);
        let r = m.steady();
        // 300 pods * 0.5 / 3600 s = 1/24 starts per second.
        assert!((r.starts_per_s - 1.0 / 24.0).abs() < 1e-12);
        // 8 events per replacement: 1/3 pod events per node per second.
        assert!((r.pod_events_per_node - 1.0 / 3.0).abs() < 1e-12);
        // 10 nodes every 300 s.
        assert!((r.node_events_per_node - 1.0 / 30.0).abs() < 1e-12);
        assert!((r.events_per_node - (1.0 / 3.0 + 1.0 / 30.0 + 0.1)).abs() < 1e-12);
        assert!((r.ipcache_updates_per_node - 1.0 / 12.0).abs() < 1e-12);
        assert!((r.apiserver_events_out - 10.0 * r.events_per_node).abs() < 1e-9);
        assert!((r.pod_events_per_node_local_only - 1.0 / 30.0).abs() < 1e-12);
    }

    #[test]
    fn five_thousand_nodes_by_hand() {
        let m = model(5000);
        assert_eq!(m.pods(), 150_000);
        let steady = m.steady();
        // 150,000 * 0.5 / 3600 = 20.833 starts/s, * 8 = 166.67 pod events per node per s.
        assert!((steady.pod_events_per_node - 166.666_666).abs() < 1e-3);
        assert!((steady.node_events_per_node - 16.666_666).abs() < 1e-3);
        let burst = m.burst();
        assert_eq!(burst.pod_events_per_node, 800.0);
        assert_eq!(burst.ipcache_updates_per_node, 200.0);
        // (800 + 16.667 + 0.1) * 5000 nodes.
        assert!((burst.apiserver_events_out - 4_083_833.333).abs() < 1e-2);
    }

    #[test]
    fn fits_by_hand() {
        // 100 at 1,000 and 400 at 2,000: k = 2, a = 1e-4.
        let f = power_fit(1000.0, 100.0, 2000.0, 400.0);
        assert!((f.1 - 2.0).abs() < 1e-12);
        assert!((power_at(f, 4000.0) - 1600.0).abs() < 1e-6);
        let lin = power_fit(1000.0, 250.0, 2000.0, 500.0);
        assert!((lin.1 - 1.0).abs() < 1e-12);
        assert_eq!(linear_at(1000.0, 10.0, 2000.0, 30.0, 5000.0), 90.0);
        assert_eq!(power_fit(1000.0, 0.0, 2000.0, 5.0), (0.0, 1.0));
        // 3x + 2y: (1, 1) -> 5, (2, 5) -> 16.
        assert_eq!(solve2([1.0, 1.0, 5.0], [2.0, 5.0, 16.0]), (3.0, 2.0));
        assert_eq!(solve2([1.0, 2.0, 5.0], [2.0, 4.0, 10.0]), (0.0, 0.0));
    }

    #[test]
    fn kernel_bytes_by_hand() {
        // Preallocated: capacity * (48 + 16 + 16), whatever the fill.
        assert_eq!(kernel_bytes(MapKind::Preallocated, 12, 16, 1000, 3), 80_000);
        assert_eq!(kernel_bytes(MapKind::Lpm, 8, 16, 1000, 10), 640);
        assert_eq!(kernel_bytes(MapKind::Lpm, 8, 16, 5, 10), 320);
    }

    #[test]
    fn real_layout_sizes() {
        let policy = map_row(map_name::POLICY, 300_000.0);
        assert_eq!(
            policy["key_bytes"],
            json!(size_of::<moat_common::PolicyKey>())
        );
        assert_eq!(
            policy["value_bytes"],
            json!(size_of::<moat_common::PolicyValue>())
        );
        assert_eq!(policy["capacity"], json!(moat_common::map_size::POLICY));
        assert_eq!(
            policy["overflows"],
            json!(300_000 > moat_common::map_size::POLICY)
        );
        assert_eq!(
            capacity(map_name::IPCACHE_V4),
            moat_common::map_size::IPCACHE as u64
        );
        let kind = |name| {
            MapKind::of(
                &layout::specs()
                    .into_iter()
                    .find(|s| s.name == name)
                    .unwrap()
                    .map_type,
            )
        };
        assert_eq!(kind(map_name::POLICY), MapKind::Preallocated);
        assert_eq!(kind(map_name::IPCACHE_V4), MapKind::Lpm);
    }

    #[test]
    fn measured_small_cluster_counts_every_pod_address() {
        let s = measure(200);
        // One entry per pod address; the synthetic cluster's three host addresses besides.
        assert_eq!(s.ipcache_pods, 200);
        assert!(s.ipcache >= 200 + 3);
        assert_eq!((s.namespaces, s.policies), (4, 20));
        assert!(s.identities > 0 && s.identities <= 200);
        assert!(s.policy > 0);
        assert!(s.engine_bytes > s.applied_bytes);
    }
}
