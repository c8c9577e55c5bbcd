//! moatd's core: the policy engine, the node's endpoints, and the maps, kept in step. Every
//! change (an endpoint registered or removed, a policy or label edited) recomputes the
//! desired map content and writes only the difference (see desired.rs). No I/O happens in
//! the policy engine; this module is the thin shell that owns the maps, files and links.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use ipnetwork::IpNetwork;
use moat_datapath::{
    Datapath, Maps, PinDir,
    attach::{attached_interfaces, detach_links},
};
use moat_policy::{Engine, LabelSet, Mode, Pod, PodRef};
use tracing::{info, warn};

mod fqdn;
mod promotion;

/// The promotion clock: unix seconds.
pub use promotion::now_secs as promotion_now;
mod threat_response;

use crate::service_nat::BackendPlace;
use crate::{
    api::{
        DaemonStatus, Direction, EndpointSpec, EndpointStatus, MapEntries, PolicyDocument,
        Registered, Request, Response, ServiceBackend, ServiceTrace, Trace, TracePath,
        TraceVerdict, Verdict,
    },
    desired::{self, Applied, NodeConfig, Touched, WriteStats},
    flows::{self, FlowRecord, JournalConfig},
    local::{LocalObjects, LocalStore, Object, ObjectKey, PodMeta},
    store::{EndpointRecord, EndpointStore},
};

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub policy_dir: PathBuf,
    pub socket: PathBuf,
    pub pending_dir: PathBuf,
    pub pin_root: PathBuf,
    pub service_cidrs: Vec<IpNetwork>,
    pub journal: JournalConfig,
    pub datastore: DatastoreConfig,
    /// This node's name: its Node object gives its pod CIDRs; the others' are routed.
    pub node_name: String,
    pub routing: Routing,
    /// Judge pods' egress to DNATed destinations in the host's netfilter (after_dnat.rs).
    /// Off only where this network namespace is not the node's (tests sharing a host).
    pub judge_after_dnat: bool,
    /// Entries of each sized map (`moatd --map-size`); pinned maps of another size are
    /// resized at start.
    pub map_sizes: moat_datapath::MapSizes,
}

/// How pod traffic reaches other nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// Someone else routes (chained mode: the primary CNI does).
    #[default]
    None,
    /// moatd routes each other node's pod CIDRs via that node's address (standalone mode on
    /// a shared L2 network).
    Direct,
}

/// Where namespaces, pods and policies come from.
#[derive(Clone, Debug)]
pub enum DatastoreConfig {
    /// YAML objects in `policy_dir`.
    Local,
    /// The cluster's API server.
    Kubernetes(crate::kube::KubeConfig),
}

/// The running datastore.
pub enum Source {
    Local(LocalStore),
    Kubernetes(crate::kube::KubeDatastore),
}

pub struct Daemon {
    cfg: DaemonConfig,
    pins: PinDir,
    _datapath: Datapath,
    maps: Maps,
    /// The FQDN maps: pattern entries written with the rest, learned addresses read.
    fqdn: moat_datapath::FqdnMaps,
    engine: Engine,
    node: NodeConfig,
    endpoints: BTreeMap<String, EndpointRecord>,
    store: EndpointStore,
    applied: Applied,
    /// Keys engine changes touched since the last reconcile.
    pending: Touched,
    objects: LocalObjects,
    rejected: Vec<String>,
    /// What the maps can hold (the loaded sizes): a change that would overflow one is
    /// refused whole (capacity.rs).
    capacities: crate::capacity::Capacities,
    /// Why the last reconcile was refused for want of room, until one succeeds.
    capacity_refusal: Option<String>,
    generation: u64,
    source: Source,
    /// Kubernetes generation last applied.
    pub applied_source_generation: u64,
    /// Set during start-up: reconcile() only collects what to write.
    hold_writes: bool,
    /// What the first reconcile after start wrote: zero when the pinned maps already held
    /// exactly the from-scratch desired state.
    pub start_stats: WriteStats,
    /// Node objects changed since routes were last synced.
    routes_dirty: bool,
    route_problems: Vec<String>,
    /// The masquerade table (masquerade.rs), once moatd's flags hand it over.
    masquerade: Option<crate::masquerade::nft::Keeper>,
    /// The Kubernetes datastore had not completed its first sync when start-up ended: until
    /// it has, nothing is written (the pinned maps, the attached programs and the routes keep
    /// enforcing what an earlier moatd left) and registrations are refused. The watch loop's
    /// next reload after the sync finishes start-up (`finish_start`).
    awaiting_sync: bool,
    /// Not ready while this node's Node has no podCIDR (standalone: IPAM and the CNI config
    /// need it).
    pod_cidrs_required: bool,
    /// Chained mode: why Moat's CNI config is not chained onto the primary CNI's (a kindnet
    /// that enforces NetworkPolicy itself, or one that cannot be read yet). Not ready while set.
    chain_problem: Option<String>,
    /// The after-DNAT rules (None when turned off) and why they are not in place, if not.
    after_dnat: Option<crate::after_dnat::AfterDnatRules>,
    after_dnat_problems: Vec<String>,
    /// Pods quarantined by request or detector (persisted); annotated pods are read from
    /// their metadata.
    quarantine: crate::quarantine::QuarantineStore,
    /// Endpoints (host ifindex) that became quarantined: their connections are cut once the
    /// flag is in the maps.
    pending_cuts: BTreeSet<u32>,
    /// Connections cut by the last reconcile's quarantines.
    last_cuts: usize,
    /// Workloads under automatic promotion (persisted; daemon/promotion.rs).
    promotions: promotion::Book,
    /// Observed flows changed a promotion since it was last saved.
    promotions_dirty: bool,
    threat_policy: crate::threats::ThreatPolicy,
    /// `on`, `off`, or why detection is unavailable.
    threat_status: String,
    threats: crate::threats::journal::ThreatJournal,
    /// `--fqdn-*` (written into MOAT_FQDNCFG by `configure_fqdn`).
    fqdn_settings: crate::fqdn::FqdnSettings,
}

/// How long start-up waits for the Kubernetes datastore's first sync before it serves the
/// local API anyway (not ready, saying why) and finishes start-up once the sync is in. Short:
/// the local API is not answered meanwhile.
const START_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Daemon {
    pub fn start(cfg: DaemonConfig) -> anyhow::Result<Self> {
        let pins = PinDir::new(&cfg.pin_root);
        let datapath = Datapath::load_sized(&pins, &cfg.map_sizes).map_err(anyhow::Error::from)?;
        let mut maps = Maps::open(&pins).map_err(anyhow::Error::from)?;
        maps.sync_host_cache().map_err(anyhow::Error::from)?;
        let fqdn = moat_datapath::FqdnMaps::open(&pins).map_err(anyhow::Error::from)?;
        let applied = Applied::from_kernel(&maps, &fqdn);
        let store = EndpointStore::new(&cfg.state_dir);
        let endpoints = store.load()?;
        let mut engine = Engine::new();
        // Followed live from here on (host_addresses::follow, and every resync).
        let host_ips = crate::host_addresses::current().context("reading the node's addresses")?;
        engine
            .set_host_ips(host_ips)
            .map_err(|e| anyhow::anyhow!("host addresses: {e}"))?;
        let node = NodeConfig {
            service_cidrs: cfg.service_cidrs.clone(),
        };
        let source = match &cfg.datastore {
            DatastoreConfig::Local => Source::Local(LocalStore::new(&cfg.policy_dir)),
            DatastoreConfig::Kubernetes(kube_cfg) => {
                let ds = crate::kube::KubeDatastore::start(kube_cfg.clone())?;
                // Registrations wait for the first full sync; enforcement from the pinned
                // state continues meanwhile.
                if !ds.wait_ready(START_SYNC_WAIT) {
                    warn!(
                        wait = ?START_SYNC_WAIT,
                        "API server not synced yet; serving as not ready, the pinned state keeps enforcing"
                    );
                }
                Source::Kubernetes(ds)
            }
        };
        let after_dnat = cfg.judge_after_dnat.then(|| {
            crate::after_dnat::AfterDnatRules::new(
                pins.program(moat_common::program_name::AFTER_DNAT),
                crate::after_dnat::host_families(),
            )
        });
        let quarantine = crate::quarantine::QuarantineStore::load(&cfg.state_dir)?;
        let threats = crate::threats::journal::ThreatJournal::open(
            crate::threats::journal::disk_config(&cfg.state_dir.join("threats")),
            crate::threats::journal::CAPACITY,
        );
        let mut daemon = Self {
            quarantine,
            pending_cuts: BTreeSet::new(),
            last_cuts: 0,
            promotions: promotion::load(&cfg.state_dir),
            promotions_dirty: false,
            threat_policy: crate::threats::ThreatPolicy::default(),
            threat_status: "not configured".into(),
            threats,
            fqdn_settings: crate::fqdn::FqdnSettings::default(),
            pins,
            _datapath: datapath,
            maps,
            fqdn,
            engine,
            node,
            endpoints,
            store,
            applied,
            pending: Touched::default(),
            objects: LocalObjects::default(),
            rejected: Vec::new(),
            capacities: crate::capacity::Capacities::of(&cfg.map_sizes),
            capacity_refusal: None,
            generation: 0,
            source,
            applied_source_generation: 0,
            hold_writes: true,
            start_stats: WriteStats::default(),
            routes_dirty: true,
            route_problems: Vec::new(),
            masquerade: None,
            awaiting_sync: false,
            pod_cidrs_required: false,
            chain_problem: None,
            after_dnat,
            after_dnat_problems: Vec::new(),
            cfg,
        };
        // Until everything is loaded, no write: the maps keep enforcing what they hold, and
        // the first reconcile below takes them straight to the complete desired state.
        daemon.drop_vanished_endpoints();
        daemon.process_pending_deletes();
        daemon.detach_orphan_links();
        if daemon.source_synced() {
            daemon.finish_start()?;
        } else {
            // A partial snapshot would compile policies without their pods (or pods without
            // their policies) and flush what the pinned maps enforce: wait for all of it.
            daemon.awaiting_sync = true;
            daemon.store.save(&daemon.endpoints)?;
        }
        Ok(daemon)
    }

    /// The datastore holds a complete view (the local one always does).
    fn source_synced(&self) -> bool {
        match &self.source {
            Source::Local(_) => true,
            Source::Kubernetes(ds) => ds.ready(),
        }
    }

    /// The rest of start-up, once the datastore is complete: load it, compile the endpoints,
    /// take the maps to the desired state in one reconcile, and put the routes in place.
    fn finish_start(&mut self) -> anyhow::Result<()> {
        self.awaiting_sync = false;
        self.hold_writes = true;
        self.reload_objects();
        for key in self.endpoints.keys().cloned().collect::<Vec<_>>() {
            if let Err(e) = self.sync_endpoint_pod(&key) {
                warn!(endpoint = %key, error = %e, "endpoint not compiled");
            }
        }
        self.hold_writes = false;
        let stats = self.reconcile()?;
        self.start_stats = stats;
        self.sync_routes();
        self.sync_masquerade();
        self.routes_dirty = false;
        self.sync_after_dnat();
        self.store.save(&self.endpoints)?;
        info!(
            endpoints = self.endpoints.len(),
            upserts = stats.upserts,
            deletes = stats.deletes,
            "moatd ready"
        );
        Ok(())
    }

    /// Puts the after-DNAT rules back if something removed them (a flush of the ruleset, an
    /// iptables restore by another agent); the problems are in the status until fixed.
    fn sync_after_dnat(&mut self) {
        let Some(rules) = self.after_dnat.as_mut() else {
            return;
        };
        let problems = rules.ensure();
        for problem in &problems {
            if !self.after_dnat_problems.contains(problem) {
                warn!(problem = %problem, "after-DNAT rules");
            }
        }
        self.after_dnat_problems = problems;
    }

    /// Makes readiness wait for this node's podCIDR (standalone mode).
    pub fn require_pod_cidrs(&mut self, required: bool) {
        self.pod_cidrs_required = required;
    }

    /// Chained mode: Moat's config is not chained onto the primary CNI's, and why (`None`
    /// once it is). Keeps moatd not ready, with this as the reason.
    pub fn set_chain_problem(&mut self, problem: Option<String>) {
        self.chain_problem = problem;
    }

    /// A reader of single API objects (Kubernetes datastore only), usable without this lock.
    pub fn kube_reader(&self) -> Option<crate::kube::ApiReader> {
        match &self.source {
            Source::Local(_) => None,
            Source::Kubernetes(ds) => Some(ds.reader()),
        }
    }

    /// Why endpoints cannot be registered yet; `None` when ready.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Source::Kubernetes(ds) = &self.source {
            let status = ds.status();
            if !status.ready {
                let waiting: Vec<&str> = status
                    .kinds
                    .iter()
                    .filter(|k| !k.synced)
                    .map(|k| k.kind)
                    .collect();
                let mut reason = if waiting.is_empty() {
                    "waiting for the first sync from the API server".to_string()
                } else {
                    format!(
                        "waiting for the first sync of {} from the API server",
                        waiting.join(", ")
                    )
                };
                if let Some(error) = status.kinds.iter().find_map(|k| k.last_error.as_ref()) {
                    reason.push_str(&format!(" (last error: {error})"));
                }
                return Some(reason);
            }
            if self.awaiting_sync {
                return Some("applying the first sync from the API server".into());
            }
        }
        if let Some(problem) = &self.chain_problem {
            return Some(problem.clone());
        }
        if self.pod_cidrs_required && self.node_pod_cidrs().is_empty() {
            return Some(format!(
                "waiting for Node {} to get a podCIDR",
                self.cfg.node_name
            ));
        }
        None
    }

    pub fn policy_dir(&self) -> &Path {
        &self.cfg.policy_dir
    }

    /// The datastore's change counter, when it has one (Kubernetes).
    pub fn source_generation(&self) -> Option<u64> {
        match &self.source {
            Source::Local(_) => None,
            Source::Kubernetes(ds) => Some(ds.generation()),
        }
    }

    /// Ready to register endpoints: the datastore has synced at least once (and the Node has
    /// its podCIDR when that is required).
    pub fn ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// The node's pod CIDRs, from its Node object.
    pub fn node_pod_cidrs(&self) -> Vec<IpNetwork> {
        match &self.source {
            Source::Local(_) => self
                .objects
                .nodes
                .get(&self.cfg.node_name)
                .map(|n| n.pod_cidrs.clone())
                .unwrap_or_default(),
            Source::Kubernetes(ds) => ds.node_pod_cidrs(),
        }
    }

    /// Routes to the other nodes' pod CIDRs (with `Routing::Direct`). Problems with the
    /// nodes' CIDRs are reported with the rejected objects.
    fn sync_routes(&mut self) {
        // Before the first sync the Node list is empty or partial: the routes in place stay.
        if self.cfg.routing != Routing::Direct || self.hold_writes || self.awaiting_sync {
            return;
        }
        let nodes = &self.objects.nodes;
        let desired = crate::routes::desired_routes(nodes, &self.cfg.node_name);
        self.route_problems = crate::routes::conflicts(nodes, &self.cfg.node_name);
        let result = crate::routes::reconcile(&desired);
        if result.is_ok()
            && let Source::Kubernetes(ds) = &self.source
        {
            // The routes are in place: the node's network is available (once per start).
            ds.mark_network_available();
        }
        match result {
            Ok(stats) if stats.added + stats.removed > 0 => {
                info!(
                    added = stats.added,
                    removed = stats.removed,
                    "routes to other nodes updated"
                )
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "routes to other nodes");
                self.route_problems.push(format!("routes: {e:#}"));
            }
        }
    }

    // --- Masquerade of pod egress leaving the cluster (masquerade.rs) ---

    /// Hands moatd's masquerade table to this daemon and brings it in line at once. Until
    /// then the daemon leaves nftables alone: in-process daemons of tests and benchmarks share
    /// the host's network namespace.
    pub fn manage_masquerade(&mut self, config: crate::masquerade::Config) {
        self.masquerade = Some(crate::masquerade::nft::Keeper::new(config));
        self.sync_masquerade();
    }

    /// Brings the masquerade table to what the Nodes' pod CIDRs ask for, and puts it back if
    /// it was flushed or changed from outside (on Node changes, moatd's check period and
    /// every resync).
    pub fn sync_masquerade(&mut self) {
        // Before the first sync the Node list is empty or partial: the table in place stays.
        if self.hold_writes || self.awaiting_sync {
            return;
        }
        let Some(keeper) = self.masquerade.as_mut() else {
            return;
        };
        let desired = crate::masquerade::desired(
            keeper.config(),
            &self.objects.nodes,
            &self.cfg.node_name,
            &self.cfg.service_cidrs,
        );
        keeper.reconcile(desired);
    }

    // --- end of masquerade ---

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    pub fn journal_config(&self) -> &JournalConfig {
        &self.cfg.journal
    }

    fn pod_name_of_address(&self, addr: IpAddr) -> Option<String> {
        self.engine
            .inputs()
            .pods
            .iter()
            .find(|(_, p)| p.ips.contains(&addr))
            .map(|(r, _)| r.to_string())
    }

    /// Policies that select the pod for a direction ("isolate" it in Kubernetes terms).
    fn selecting_policies(&self, pod: &PodRef, ingress: bool) -> Vec<String> {
        let Some(p) = self.engine.inputs().pods.get(pod) else {
            return Vec::new();
        };
        self.objects
            .policies
            .values()
            .filter(|np| np.namespace() == pod.namespace)
            .filter(|np| np.spec.pod_selector.matches(&p.labels))
            .filter(|np| {
                let (i, e) = np.effective_policy_types();
                if ingress { i } else { e }
            })
            .map(|np| np.object())
            .collect()
    }

    /// The map entries that apply to a pod, explained.
    fn effective_rules(&self, pod: &str) -> anyhow::Result<Vec<crate::api::EffectiveRule>> {
        use moat_common::*;
        let (ns, name) = pod
            .split_once('/')
            .with_context(|| format!("{pod:?}: expected namespace/pod"))?;
        let state = self.engine.state();
        let endpoint = state
            .endpoints
            .get(&PodRef::new(ns, name))
            .with_context(|| format!("unknown pod {pod}; see `moatctl endpoint list`"))?;
        let p = endpoint.policy_id;
        let dir = |d: u8| {
            if d == DIRECTION_INGRESS {
                "ingress"
            } else {
                "egress"
            }
            .to_string()
        };
        let proto_name = |x: u8| match x {
            0 => "any".to_string(),
            PROTO_TCP => "TCP".into(),
            PROTO_UDP => "UDP".into(),
            PROTO_SCTP => "SCTP".into(),
            other => other.to_string(),
        };
        let identity = |id: u32| {
            if id == IDENTITY_ANY {
                return "any".to_string();
            }
            let labels = state
                .identities
                .get(&moat_policy::Identity(id))
                .map(|l| {
                    l.iter()
                        .filter(|(k, _)| !k.starts_with("io.kubernetes.pod.namespace.labels"))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            format!("identity {id} ({labels})")
        };
        // A tier's rule, by the reason its verdict would carry (the tiers number rules
        // apart).
        let rule = |tier: u8, id: u32| {
            let reason = match tier {
                moat_common::TIER_ADMIN => reason::ADMIN_ACCEPT,
                moat_common::TIER_BASELINE => reason::BASELINE_ACCEPT,
                _ => reason::POLICY_ALLOW,
            };
            self.engine
                .describe_rule(reason, id)
                .unwrap_or_else(|| match id {
                    rule::NOT_ISOLATED => "not isolated (no policy selects it)".into(),
                    other => other.to_string(),
                })
        };
        let action = |tier: u8, a: u8| {
            let name = match a {
                ACTION_DENY => "deny",
                moat_common::ACTION_PASS => "pass",
                _ if tier == moat_common::TIER_NETPOL => "allow",
                _ => "accept",
            };
            match tier {
                moat_common::TIER_ADMIN => format!("admin {name}"),
                moat_common::TIER_BASELINE => format!("baseline {name}"),
                _ => name.to_string(),
            }
        };
        let mut out = Vec::new();
        for (k, v) in state.policy.range(
            PolicyKey {
                policy_id: p,
                remote_identity: 0,
                dport: 0,
                proto: 0,
                direction: 0,
            }..=PolicyKey {
                policy_id: p,
                remote_identity: u32::MAX,
                dport: u16::MAX,
                proto: u8::MAX,
                direction: u8::MAX,
            },
        ) {
            // One row per tier with an answer for this key, the tiers in evaluation order.
            for (tier, a, id) in [
                (moat_common::TIER_ADMIN, v.admin_action, v.admin_rule),
                (moat_common::TIER_NETPOL, v.action, v.rule_id),
                (
                    moat_common::TIER_BASELINE,
                    v.baseline_action,
                    v.baseline_rule,
                ),
            ] {
                if a == 0 {
                    continue;
                }
                out.push(crate::api::EffectiveRule {
                    direction: dir(k.direction),
                    peer: identity(k.remote_identity),
                    protocol: proto_name(k.proto),
                    ports: if k.dport == 0 {
                        "any".into()
                    } else {
                        k.dport.to_string()
                    },
                    action: action(tier, a),
                    rule: rule(tier, id),
                });
            }
        }
        let sets = state
            .port_ranges
            .iter()
            .filter(|(k, _)| k.policy_id == p)
            .map(|(k, set)| {
                (
                    dir(k.direction),
                    identity(k.remote_identity),
                    Some(k.proto),
                    set,
                )
            })
            .chain(
                state
                    .cidr_v4
                    .iter()
                    .filter(|((pid, _, _), _)| *pid == p)
                    .map(|((_, d, n), set)| (dir(*d), n.to_string(), None, set)),
            )
            .chain(
                state
                    .cidr_v6
                    .iter()
                    .filter(|((pid, _, _), _)| *pid == p)
                    .map(|((_, d, n), set)| (dir(*d), n.to_string(), None, set)),
            );
        for (direction, peer, proto, set) in sets {
            for r in &set.rules[..(set.count as usize).min(MAX_PORT_RULES)] {
                out.push(crate::api::EffectiveRule {
                    direction: direction.clone(),
                    peer: peer.clone(),
                    protocol: proto_name(proto.unwrap_or(r.proto)),
                    ports: if r.port_start == 0 && r.port_end == u16::MAX {
                        "any".into()
                    } else if r.port_start == r.port_end {
                        r.port_start.to_string()
                    } else {
                        format!("{}-{}", r.port_start, r.port_end)
                    },
                    action: action(r.tier, r.action),
                    rule: rule(r.tier, r.rule_id),
                });
            }
            if set.count == 0 {
                out.push(crate::api::EffectiveRule {
                    direction: direction.clone(),
                    peer: peer.clone(),
                    protocol: "-".into(),
                    ports: "-".into(),
                    action: "none (except)".into(),
                    rule: "-".into(),
                });
            }
        }
        // What an isolated direction does with everything its rules do not allow, as a row
        // of its own: a direction denied entirely has no other row, and must not read as
        // "nothing applies".
        let pod_ref = PodRef::new(ns, name);
        for (direction, ingress) in [("ingress", true), ("egress", false)] {
            let selected = self.selecting_policies(&pod_ref, ingress);
            if selected.is_empty() {
                continue;
            }
            out.push(crate::api::EffectiveRule {
                direction: direction.into(),
                peer: "any other".into(),
                protocol: "any".into(),
                ports: "any".into(),
                action: "deny".into(),
                rule: format!("default deny (selected by: {})", selected.join(", ")),
            });
        }
        Ok(out)
    }

    fn flow_end(&self, text: &str) -> anyhow::Result<moat_policy::FlowEnd> {
        if let Ok(net) = text.parse::<IpNetwork>() {
            return Ok(moat_policy::FlowEnd::Address(net.network()));
        }
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(moat_policy::FlowEnd::Address(addr));
        }
        let (ns, name) = text
            .split_once('/')
            .with_context(|| format!("{text:?}: expected namespace/pod or an address"))?;
        let pod = PodRef::new(ns, name);
        anyhow::ensure!(
            self.engine.inputs().pods.contains_key(&pod),
            "unknown pod {pod}; see `moatctl endpoint list`"
        );
        Ok(moat_policy::FlowEnd::Pod(pod))
    }

    fn explain_direction(
        &self,
        v: &moat_policy::DirectionVerdict,
        pod: Option<&PodRef>,
        ingress: bool,
    ) -> String {
        if let Some(r) = self.engine.describe_verdict(v) {
            return format!("{} by {r}", if v.allowed { "allowed" } else { "denied" });
        }
        match v.rule_id {
            moat_common::rule::NOT_ISOLATED => "allowed: no policy selects the endpoint".into(),
            moat_common::rule::HOST => "allowed: traffic from the node itself".into(),
            _ => {
                let selected = pod
                    .map(|p| self.selecting_policies(p, ingress))
                    .unwrap_or_default();
                format!(
                    "default deny: selected by {}; no rule allows",
                    selected.join(", ")
                )
            }
        }
    }

    /// The pure engine's verdict, cross-checked against the same lookups on the kernel maps.
    pub fn trace(&self, from: &str, to: &str, port: u16, protocol: &str) -> anyhow::Result<Trace> {
        let proto = match protocol.to_ascii_uppercase().as_str() {
            "TCP" => moat_common::PROTO_TCP,
            "UDP" => moat_common::PROTO_UDP,
            "SCTP" => moat_common::PROTO_SCTP,
            other => anyhow::bail!("protocol {other:?}: expected TCP, UDP or SCTP"),
        };
        let (from_end, to_end) = (self.flow_end(from)?, self.flow_end(to)?);
        if let moat_policy::FlowEnd::Address(vip) = to_end
            && self.cfg.service_cidrs.iter().any(|net| net.contains(vip))
        {
            return self.trace_service(from, &from_end, vip, port, protocol, proto);
        }
        // An address the datapath learned from a DNS answer to the source: its FQDN rules
        // apply to it as they do in the kernel.
        let names = self.learned_names(&from_end, &to_end);
        let engine = self.evaluate_checked(&from_end, &to_end, port, proto, &names)?;
        let pod_of = |end: &moat_policy::FlowEnd| match end {
            moat_policy::FlowEnd::Pod(p) => Some(p.clone()),
            _ => None,
        };
        let (src_pod, dst_pod) = (pod_of(&from_end), pod_of(&to_end));
        let egress = engine.egress.as_ref().map(|v| {
            let explained = self.explain_direction(v, src_pod.as_ref(), false);
            if names.is_empty() {
                explained
            } else {
                format!(
                    "{explained} (address learned from DNS: {})",
                    names.join(", ")
                )
            }
        });
        let ingress = engine
            .ingress
            .as_ref()
            .map(|v| self.explain_direction(v, dst_pod.as_ref(), true));
        let mut trace = Trace {
            from: from.to_string(),
            to: to.to_string(),
            port,
            protocol: protocol.to_ascii_uppercase(),
            verdict: TraceVerdict::of(engine.allowed),
            path: TracePath::Direct {
                egress,
                ingress,
                rule_id: engine.rule_id,
                rule: engine.rule.as_ref().map(|r| r.to_string()),
            },
            maps_agree: true,
        };
        self.quarantine_trace(&mut trace, src_pod.as_ref(), dst_pod.as_ref(), proto);
        Ok(trace)
    }

    /// A connection to a Service address, as the datapath handles it: the source's hook
    /// defers (the address has no identity), the host's DNAT picks a backend, and the
    /// source's egress is judged against that backend, by the backend pod's hook on this node
    /// or by `moat_after_dnat` for anything else. The backends are read from the host's nat
    /// table, where kube-proxy (iptables mode) or anything else that DNATs puts them.
    fn trace_service(
        &self,
        from: &str,
        from_end: &moat_policy::FlowEnd,
        vip: IpAddr,
        port: u16,
        protocol: &str,
        proto: u8,
    ) -> anyhow::Result<Trace> {
        let rules = crate::service_nat::read_nat_table(vip);
        let backends = match &rules {
            Ok(text) => crate::service_nat::dnat_backends(text, vip, port, proto),
            Err(_) => Vec::new(),
        };
        let src_pod = match from_end {
            moat_policy::FlowEnd::Pod(p) => Some(p.clone()),
            _ => None,
        };
        let mut rows = Vec::new();
        let (mut allowed, mut denied) = (0, 0);
        for backend in &backends {
            let (to_end, place) = self.backend_place(backend.ip());
            let v = self.evaluate_checked(from_end, &to_end, backend.port(), proto, &[])?;
            if v.allowed {
                allowed += 1;
            } else {
                denied += 1;
            }
            let dst_pod = match &to_end {
                moat_policy::FlowEnd::Pod(p) => Some(p.clone()),
                _ => None,
            };
            rows.push(ServiceBackend {
                address: backend.ip().to_string(),
                port: backend.port(),
                backend: dst_pod.as_ref().map(|p| p.to_string()),
                place: place.label().to_string(),
                verdict: TraceVerdict::of(v.allowed),
                egress: v
                    .egress
                    .as_ref()
                    .map(|e| self.explain_direction(e, src_pod.as_ref(), false)),
                ingress: match (&v.ingress, place) {
                    (Some(i), _) => Some(self.explain_direction(i, dst_pod.as_ref(), true)),
                    (None, BackendPlace::RemotePod) => {
                        Some("judged on the backend's node".to_string())
                    }
                    (None, _) => None,
                },
                egress_judged_at: place.egress_judged_at().to_string(),
            });
        }
        let verdict = match (allowed, denied) {
            (0, 0) => TraceVerdict::Unknown,
            (_, 0) => TraceVerdict::Allowed,
            (0, _) => TraceVerdict::Denied,
            _ => TraceVerdict::DependsOnTheBackend,
        };
        let note = match (&rules, backends.is_empty()) {
            (Err(e), _) => Some(format!(
                "the host's nat table could not be read ({e}): the source's egress is judged against whichever backend the host's DNAT picks"
            )),
            (Ok(_), true) => Some(
                "no DNAT rule in the host's iptables nat table leads this Service port anywhere (no endpoints, or a kube-proxy mode that does not use iptables): the source's egress is judged against whichever backend the host's DNAT picks".to_string(),
            ),
            (Ok(_), false) => None,
        };
        Ok(Trace {
            from: from.to_string(),
            to: vip.to_string(),
            port,
            protocol: protocol.to_ascii_uppercase(),
            verdict,
            path: TracePath::Service {
                service: ServiceTrace {
                    at_source: "a Service address has no identity: the source's hook records the flow and defers".to_string(),
                    backends: rows,
                    note,
                },
            },
            maps_agree: true,
        })
    }

    /// Where a Service backend lives, and the flow end that evaluates it.
    fn backend_place(&self, addr: IpAddr) -> (moat_policy::FlowEnd, BackendPlace) {
        if let Some((pod, _)) = self
            .engine
            .inputs()
            .pods
            .iter()
            .find(|(_, p)| p.ips.contains(&addr))
        {
            let local = self
                .endpoints
                .values()
                .any(|e| e.spec.pod_namespace == pod.namespace && e.spec.pod_name == pod.name);
            let place = if local {
                BackendPlace::LocalPod
            } else {
                BackendPlace::RemotePod
            };
            return (moat_policy::FlowEnd::Pod(pod.clone()), place);
        }
        let place = if self.host_addresses().contains(&addr) {
            BackendPlace::ThisNodeHost
        } else if self
            .objects
            .nodes
            .values()
            .any(|n| n.addresses.contains(&addr))
        {
            BackendPlace::OtherNodeHost
        } else {
            BackendPlace::Outside
        };
        (moat_policy::FlowEnd::Address(addr), place)
    }

    /// The engine's verdict, checked against the same evaluation over what the kernel maps
    /// hold right now. `names`: the DNS names the destination address was learned for (to
    /// the source), whose FQDN rules apply.
    fn evaluate_checked(
        &self,
        from_end: &moat_policy::FlowEnd,
        to_end: &moat_policy::FlowEnd,
        port: u16,
        proto: u8,
        names: &[String],
    ) -> anyhow::Result<moat_policy::Verdict> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let state = self.engine.state();
        let engine = moat_policy::evaluate_learned(state, from_end, to_end, port, proto, &names)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // The same evaluation over what the kernel maps hold right now (they hold only this
        // node's endpoints' entries; the engine's stand in for the others').
        let actual =
            desired::held_with_remote_owners(state, desired::read_actual(&self.maps, &self.fqdn));
        let mut in_maps = state.clone();
        in_maps.policy = actual.policy;
        in_maps.port_ranges = actual.port_ranges;
        in_maps.cidr_v4 = actual.cidr_v4;
        in_maps.cidr_v6 = actual.cidr_v6;
        in_maps.fqdn_patterns = actual.fqdn_patterns;
        in_maps.ipcache = actual
            .ipcache
            .iter()
            .filter(|(_, v)| v.flags & moat_common::IPCACHE_FLAG_SERVICE == 0)
            .map(|(k, v)| (*k, moat_policy::Identity(v.identity)))
            .collect();
        let kernel = moat_policy::evaluate_learned(&in_maps, from_end, to_end, port, proto, &names)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            kernel.allowed == engine.allowed && kernel.rule_id == engine.rule_id,
            "the maps disagree with the engine (engine: allowed={} rule {}, maps: allowed={} rule {}); \
             run `moatctl reload` and report this",
            engine.allowed,
            engine.rule_id,
            kernel.allowed,
            kernel.rule_id
        );
        Ok(engine)
    }

    /// Explains a datapath event: which pods, which rule, or why no rule.
    pub fn describe(
        &self,
        e: &moat_common::FlowEvent,
        mono_now_ns: u64,
        wall_now_ms: u64,
    ) -> FlowRecord {
        use moat_common::*;
        let (src, dst) = if e.family == FAMILY_V4 {
            (
                IpAddr::V4(v4_from_raw(e.saddr[0])),
                IpAddr::V4(v4_from_raw(e.daddr[0])),
            )
        } else {
            (
                IpAddr::V6(v6_from_raw(e.saddr)),
                IpAddr::V6(v6_from_raw(e.daddr)),
            )
        };
        let endpoint = self
            .endpoints
            .values()
            .find(|r| r.spec.host_ifindex == e.ifindex)
            .map(|r| r.pod_ref());
        let ingress = e.direction == DIRECTION_INGRESS;
        let remote_addr = if ingress { src } else { dst };
        let peer = self.pod_name_of_address(remote_addr).or_else(|| {
            Some(
                match e.remote_identity {
                    IDENTITY_HOST => "host",
                    IDENTITY_WORLD => "world",
                    IDENTITY_UNMANAGED => "unmanaged",
                    IDENTITY_REMOTE_NODE => "remote-node",
                    _ => return None,
                }
                .to_string(),
            )
        });
        let rule = if let Some(r) = self.engine.describe_rule(e.reason, e.rule_id) {
            r
        } else if e.rule_id == rule::NOT_ISOLATED {
            "no policy selects the endpoint (allow all)".into()
        } else if e.reason == reason::DEFAULT_DENY {
            let selected = endpoint
                .as_ref()
                .map(|p| self.selecting_policies(p, ingress))
                .unwrap_or_default();
            if selected.is_empty() {
                "default deny: no rule allows".into()
            } else {
                format!(
                    "default deny: selected by {}; no rule allows",
                    selected.join(", ")
                )
            }
        } else {
            reason::name(e.reason).to_string()
        };
        let rule = match (&endpoint, ingress) {
            (Some(pod), false) => self.with_fqdn_note(rule, pod, e, dst),
            _ => rule,
        };
        let age_ms = mono_now_ns.saturating_sub(e.timestamp_ns) / 1_000_000;
        FlowRecord {
            time_ms: wall_now_ms.saturating_sub(age_ms),
            verdict: Verdict::from_code(e.verdict),
            reason: reason::name(e.reason).into(),
            direction: if ingress {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            mode: Mode::from_code(e.mode),
            protocol: match e.proto {
                PROTO_TCP => "TCP".to_string(),
                PROTO_UDP => "UDP".to_string(),
                PROTO_SCTP => "SCTP".to_string(),
                PROTO_ICMP => "ICMP".to_string(),
                PROTO_ICMPV6 => "ICMPv6".to_string(),
                other => other.to_string(),
            },
            source: src.to_string(),
            destination: dst.to_string(),
            source_port: e.sport,
            destination_port: e.dport,
            endpoint: endpoint.map(|p| p.to_string()),
            peer,
            local_identity: e.local_identity,
            remote_identity: e.remote_identity,
            rule_id: e.rule_id,
            rule,
            bytes: e.bytes,
        }
    }

    /// Endpoints whose host veth is gone (pod deleted while moatd was down) are forgotten.
    fn drop_vanished_endpoints(&mut self) {
        let gone: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, r)| {
                let path = format!("/sys/class/net/{}/ifindex", r.spec.host_ifname);
                std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    != Some(r.spec.host_ifindex)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            info!(endpoint = %key, "host veth gone; forgetting endpoint");
            if let Some(r) = self.endpoints.remove(&key) {
                let _ = detach_links(&self.pins, &r.spec.host_ifname);
            }
        }
    }

    /// DELs that moat-cni queued while moatd was down.
    fn process_pending_deletes(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.cfg.pending_dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            if let Ok(bytes) = std::fs::read(&path)
                && let Ok(Request::Unregister {
                    container_id,
                    ifname,
                }) = serde_json::from_slice(&bytes)
            {
                info!(%container_id, %ifname, "processing queued DEL");
                self.forget(&container_id, &ifname);
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Links pinned for interfaces that no endpoint owns any more.
    fn detach_orphan_links(&mut self) {
        let owned: BTreeSet<&str> = self
            .endpoints
            .values()
            .map(|r| r.spec.host_ifname.as_str())
            .collect();
        if let Ok(names) = attached_interfaces(&self.pins) {
            for name in names {
                if !owned.contains(name.as_str()) {
                    info!(ifname = %name, "detaching orphan link");
                    let _ = detach_links(&self.pins, &name);
                }
            }
        }
    }

    /// Runs an engine change and remembers the keys it touched for the next reconcile.
    fn change(
        &mut self,
        op: impl FnOnce(&mut Engine) -> Result<moat_policy::Delta, moat_policy::Error>,
    ) -> Result<(), moat_policy::Error> {
        let delta = op(&mut self.engine)?;
        self.pending.record(&delta);
        Ok(())
    }

    /// Applies what changed in the datastore: for the local one, only the files that changed
    /// on disk are re-read; for Kubernetes, the snapshot is compared object by object. An
    /// object that fails is reported and skipped; the engine keeps the last good version of
    /// a policy. Returns whether anything changed.
    pub fn reload_objects(&mut self) -> bool {
        self.reload(None)
    }

    /// The local datastore's files a directory watch reported changed (only these are
    /// read); the Kubernetes datastore ignores the paths.
    pub fn reload_files(&mut self, paths: &BTreeSet<PathBuf>) -> bool {
        self.reload(Some(paths))
    }

    fn reload(&mut self, only: Option<&BTreeSet<PathBuf>>) -> bool {
        if self.awaiting_sync {
            if !self.source_synced() {
                return false;
            }
            if let Err(e) = self.finish_start() {
                // The next resync retries the writes from what the kernel holds.
                warn!(error = %format!("{e:#}"), "first reconcile after the sync failed");
            }
            return true;
        }
        let (updates, source_rejected) = match &mut self.source {
            Source::Local(store) => {
                let changed = match only {
                    Some(paths) => store.refresh_files(paths),
                    None => store.refresh(),
                };
                let Some(keys) = changed else {
                    return false;
                };
                let objects = store.objects();
                let updates: Vec<(ObjectKey, Option<Object>)> = keys
                    .into_iter()
                    .map(|k| {
                        let o = objects.get(&k);
                        (k, o)
                    })
                    .collect();
                (updates, objects.rejected.clone())
            }
            Source::Kubernetes(ds) => {
                let (generation, objects) = ds.snapshot_shared();
                if generation == self.applied_source_generation && self.generation > 0 {
                    return false;
                }
                self.applied_source_generation = generation;
                let keys: BTreeSet<ObjectKey> = objects.keys().chain(self.objects.keys()).collect();
                let updates = keys
                    .into_iter()
                    .filter(|k| !objects.same(&self.objects, k))
                    .map(|k| {
                        let new = objects.get(&k);
                        (k, new)
                    })
                    .collect();
                (updates, objects.rejected.clone())
            }
        };
        let mut rejected = source_rejected;
        // Namespaces first, then pods, then policies (the key order), so that a policy
        // compiles against the labels it is meant to see.
        for (key, object) in updates {
            if let Err(reason) = self.apply_object(&key, object) {
                rejected.push(reason);
            }
        }
        self.refresh_modes();
        if self.routes_dirty && !self.hold_writes {
            self.sync_routes();
            self.sync_masquerade();
            self.routes_dirty = false;
        }
        rejected.extend(self.route_problems.iter().cloned());
        for r in &rejected {
            warn!(rejected = %r, "object rejected; last good state stays in force");
        }
        self.rejected = rejected;
        match self.reconcile() {
            Ok(_) => self.generation += 1,
            Err(e) => warn!(error = %e, "reconcile after reload failed"),
        }
        true
    }

    /// Brings one datastore object into the engine (`None`: it was deleted).
    fn apply_object(&mut self, key: &ObjectKey, object: Option<Object>) -> Result<(), String> {
        if self.objects.get(key) == object {
            return Ok(());
        }
        let result = match (key, &object) {
            (ObjectKey::Namespace(name), Some(Object::Namespace(labels))) => {
                self.change(|e| e.upsert_namespace(name, labels.clone()))
            }
            (ObjectKey::Namespace(name), _) => self.change(|e| e.delete_namespace(name)),
            (ObjectKey::NetworkPolicy(..), Some(Object::NetworkPolicy(policy))) => {
                self.change(|e| e.upsert_policy(policy))
            }
            (ObjectKey::NetworkPolicy(ns, name), _) => self.change(|e| e.delete_policy(ns, name)),
            (ObjectKey::MoatPolicy(ns, name), Some(Object::MoatPolicy(policy))) => {
                let effective = self.admit_promotion(ns, name, policy);
                self.change(|e| e.upsert_moat_policy(&effective))
            }
            (ObjectKey::MoatPolicy(ns, name), _) => {
                self.forget_promotion(ns, name);
                self.change(|e| e.delete_moat_policy(ns, name))
            }
            (ObjectKey::ClusterNetworkPolicy(..), Some(Object::ClusterNetworkPolicy(policy))) => {
                self.change(|e| e.upsert_cluster_policy(policy))
            }
            (ObjectKey::ClusterNetworkPolicy(name), _) => {
                self.change(|e| e.delete_cluster_policy(name))
            }
            (ObjectKey::Node(_), _) => {
                self.objects.set(key, object);
                self.routes_dirty = true;
                return Ok(());
            }
            (ObjectKey::Pod(ns, name), _) => {
                // Labels, ports and addresses come from the datastore; the engine sees them
                // through the pod's endpoints (local) or as a remote workload.
                self.objects.set(key, object);
                return self.sync_pod(ns, name).map_err(|e| format!("{key}: {e}"));
            }
        };
        match result {
            Ok(()) => {
                self.objects.set(key, object);
                Ok(())
            }
            // The last good version stays in force (and in `objects`).
            Err(e) => Err(format!("{key}: {e}")),
        }
    }

    /// Puts a pod into the engine as the datastore and the node's endpoints describe it: a
    /// local pod through its endpoints, a remote one (addresses, no local endpoint) from the
    /// datastore alone, and otherwise not at all.
    fn sync_pod(&mut self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let local: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, r)| r.spec.pod_namespace == namespace && r.spec.pod_name == name)
            .map(|(k, _)| k.clone())
            .collect();
        if !local.is_empty() {
            for key in local {
                self.sync_endpoint_pod(&key)?;
            }
            return Ok(());
        }
        let pod_ref = PodRef::new(namespace, name);
        let meta = self.pod_meta(namespace, name);
        if meta.ips.is_empty() {
            self.change(|e| e.delete_pod(&pod_ref))?;
        } else {
            let pod = Pod {
                namespace: namespace.to_string(),
                name: name.to_string(),
                labels: meta.labels,
                ips: meta.ips,
                ports: meta.ports,
            };
            self.change(|e| e.upsert_pod(pod))?;
        }
        Ok(())
    }

    /// Endpoint modes: the pod's annotation wins; else the strictest MoatPolicy selecting
    /// it; else enforce.
    fn refresh_modes(&mut self) {
        let modes = &self.engine.state().modes;
        let pods = &self.objects.pods;
        for record in self.endpoints.values_mut() {
            let key = (
                record.spec.pod_namespace.clone(),
                record.spec.pod_name.clone(),
            );
            record.mode = pods
                .get(&key)
                .and_then(|m| m.mode)
                .or_else(|| modes.get(&record.pod_ref()).copied())
                .unwrap_or_default();
        }
    }

    fn pod_meta(&self, namespace: &str, name: &str) -> PodMeta {
        self.objects
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Puts the endpoint's pod (labels from the datastore, addresses from the CNI) into the
    /// engine.
    fn sync_endpoint_pod(&mut self, key: &str) -> anyhow::Result<()> {
        let record = self.endpoints.get(key).context("unknown endpoint")?.clone();
        let meta = self.pod_meta(&record.spec.pod_namespace, &record.spec.pod_name);
        let annotated = meta.mode;
        let pod = Pod {
            namespace: record.spec.pod_namespace.clone(),
            name: record.spec.pod_name.clone(),
            labels: meta.labels,
            ips: record.spec.ips.clone(),
            ports: meta.ports,
        };
        self.change(|e| e.upsert_pod(pod))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // The pod's annotation wins; else the strictest MoatPolicy selecting it; else enforce.
        let mode = annotated.unwrap_or_else(|| {
            self.engine
                .state()
                .modes
                .get(&record.pod_ref())
                .copied()
                .unwrap_or_default()
        });
        if let Some(r) = self.endpoints.get_mut(key) {
            r.mode = mode;
        }
        Ok(())
    }

    /// Writes what the engine changes since the last reconcile touched (incrementally; from
    /// scratch after start-up or a failed write).
    pub fn reconcile(&mut self) -> anyhow::Result<WriteStats> {
        self.refresh_quarantine_flags();
        if self.hold_writes {
            return Ok(WriteStats::default());
        }
        let touched = std::mem::take(&mut self.pending);
        let plan = self
            .applied
            .plan(self.engine.state(), &self.endpoints, &self.node, &touched);
        if let Err(overflow) =
            crate::capacity::check_plan(&self.applied.maps, &plan, &self.capacities)
        {
            // Nothing was written; planning consumed what moatd knew of the maps, so it is
            // read back, and the next reconcile plans from scratch.
            self.applied = Applied::from_kernel(&self.maps, &self.fqdn);
            let reason = overflow.to_string();
            if self.capacity_refusal.as_ref() != Some(&reason) {
                tracing::error!(reason = %reason, "change refused: a map would overflow");
            }
            self.capacity_refusal = Some(reason);
            crate::metrics::global().capacity_refusal(overflow.map);
            return Err(overflow.into());
        }
        self.capacity_refusal = None;
        match desired::apply(&mut self.maps, &mut self.fqdn, &plan.before, &plan.after) {
            Ok(stats) => {
                self.applied.commit(plan);
                self.cut_quarantined_connections();
                Ok(stats)
            }
            Err(e) => {
                // Part of the plan may be written: rebuild from what the kernel holds.
                self.applied = Applied::from_kernel(&self.maps, &self.fqdn);
                Err(e)
            }
        }
    }

    /// The rejected objects, and the change refused for want of map room if there is one.
    fn rejected_with_refusal(&self) -> Vec<String> {
        self.rejected
            .iter()
            .cloned()
            .chain(self.capacity_refusal.clone())
            .collect()
    }

    /// The node's own addresses, which the datapath maps to the `host` identity.
    pub fn host_addresses(&self) -> &BTreeSet<IpAddr> {
        &self.engine.inputs().host_ips
    }

    /// Makes `addresses` the node's own: only the ipcache entries (and their exact-match
    /// mirrors) of the addresses that came or went are written. Returns what changed.
    pub fn set_host_addresses(
        &mut self,
        addresses: BTreeSet<IpAddr>,
    ) -> anyhow::Result<crate::host_addresses::Diff> {
        let change = crate::host_addresses::diff(self.host_addresses(), &addresses);
        if change.is_empty() {
            return Ok(change);
        }
        self.change(|e| e.set_host_ips(addresses))
            .map_err(|e| anyhow::anyhow!("host addresses: {e}"))?;
        self.reconcile()?;
        Ok(change)
    }

    /// Re-reads the node's addresses: the safety net behind `host_addresses::follow`, which
    /// should have applied every change already.
    fn refresh_host_addresses(&mut self) {
        match crate::host_addresses::current().and_then(|a| self.set_host_addresses(a)) {
            Ok(change) if !change.is_empty() => warn!(
                added = ?change.added,
                removed = ?change.removed,
                "resync found the node's addresses changed unnoticed"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "re-reading the node's addresses"),
        }
    }

    /// A full resync against what the kernel maps really hold (heals any drift).
    pub fn resync(&mut self) -> anyhow::Result<WriteStats> {
        self.sync_routes();
        self.sync_masquerade();
        self.sync_after_dnat();
        self.refresh_host_addresses();
        self.repair_maps()
    }

    /// Writes whatever the kernel maps hold that differs from the desired state: the host
    /// mirrors from the tries, then a from-scratch reconcile against what the maps really hold
    /// (as at start). Under the daemon's lock like every other write.
    pub fn repair_maps(&mut self) -> anyhow::Result<WriteStats> {
        self.maps.sync_host_cache()?;
        self.applied = Applied::from_kernel(&self.maps, &self.fqdn);
        self.reconcile()
    }

    /// The maps moatd owns compared entry by entry with the content its datastore asks for,
    /// recomputed from scratch (`moatctl verify`, the periodic check in verify.rs). Kernel-
    /// written maps (conntrack, learned FQDN addresses, threat state, counters) are not
    /// compared. Refused until start-up has written the datastore's state.
    pub fn verify_maps(&self) -> anyhow::Result<crate::api::VerifyReport> {
        if self.hold_writes || self.awaiting_sync {
            anyhow::bail!(
                "moatd has not written its datastore's state yet ({})",
                self.not_ready_reason()
                    .unwrap_or_else(|| "starting".to_string())
            );
        }
        let desired = desired::build(self.engine.state(), &self.endpoints, &self.node);
        let actual = desired::read_actual(&self.maps, &self.fqdn);
        let hosts = desired::read_hosts(&self.maps);
        Ok(desired::drift(
            &desired,
            &actual,
            &hosts,
            crate::api::DRIFT_SAMPLES,
        ))
    }

    fn register(&mut self, spec: EndpointSpec) -> anyhow::Result<Registered> {
        if let Some(reason) = self.not_ready_reason() {
            anyhow::bail!("moatd is not ready: {reason}");
        }
        anyhow::ensure!(
            !spec.ips.is_empty(),
            "endpoint {} has no address",
            spec.container_id
        );
        let key = EndpointRecord::key(&spec.container_id, &spec.ifname);
        // The same pod name re-registered under another container (a restarted sandbox)
        // replaces the old record.
        let stale: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(k, r)| {
                **k != key
                    && r.spec.pod_namespace == spec.pod_namespace
                    && r.spec.pod_name == spec.pod_name
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            self.endpoints.remove(k);
        }
        let previous = self.endpoints.insert(
            key.clone(),
            EndpointRecord {
                spec: spec.clone(),
                mode: Mode::Enforce,
                flags: 0,
            },
        );
        let result = self.sync_endpoint_pod(&key).and_then(|_| self.reconcile());
        if let Err(e) = result {
            // Undo: never leave a half-registered endpoint.
            match previous {
                Some(p) => {
                    self.endpoints.insert(key.clone(), p);
                }
                None => {
                    self.endpoints.remove(&key);
                    let _ = self.sync_pod(&spec.pod_namespace, &spec.pod_name);
                }
            }
            let _ = self.reconcile();
            return Err(e);
        }
        for k in &stale {
            self.store.remove(k, &self.endpoints)?;
        }
        self.store
            .put(&key, &self.endpoints[&key], &self.endpoints)?;
        let record = &self.endpoints[&key];
        let compiled = self
            .engine
            .state()
            .endpoints
            .get(&record.pod_ref())
            .context("endpoint missing after compile")?;
        info!(
            endpoint = %key,
            pod = %record.pod_ref(),
            identity = compiled.identity.0,
            host_if = %spec.host_ifname,
            "endpoint registered"
        );
        Ok(Registered {
            identity: compiled.identity.0,
            policy_id: compiled.policy_id,
            mode: record.mode,
        })
    }

    /// Removes an endpoint and everything it owned (idempotent).
    fn forget(&mut self, container_id: &str, ifname: &str) -> bool {
        let key = EndpointRecord::key(container_id, ifname);
        let Some(record) = self.endpoints.remove(&key) else {
            return false;
        };
        // Another endpoint of the pod keeps it; else it leaves the engine (or stays as a
        // remote workload if the datastore still gives it addresses).
        if let Err(e) = self.sync_pod(&record.spec.pod_namespace, &record.spec.pod_name) {
            warn!(error = %e, "pod update after unregister failed");
        }
        if let Err(e) = self.reconcile() {
            warn!(error = %e, "reconcile after unregister failed");
        }
        // Pins only: tc filters stay with the device, dropping everything now that the
        // endpoint is gone, until whoever owns the device deletes it (moatd itself after a
        // standalone DEL, the interface plugin in a chain).
        let _ = detach_links(&self.pins, &record.spec.host_ifname);
        if let Err(e) = self.store.remove(&key, &self.endpoints) {
            warn!(error = %e, "saving endpoints");
        }
        info!(endpoint = %key, "endpoint removed");
        true
    }

    pub fn status(&self) -> DaemonStatus {
        let not_ready = self.not_ready_reason();
        DaemonStatus {
            ready: not_ready.is_none(),
            not_ready,
            datastore: match self.source {
                Source::Local(_) => "local".into(),
                Source::Kubernetes(_) => "kubernetes".into(),
            },
            endpoints: self.endpoints.len(),
            identities: self.engine.state().identities.len(),
            policies: self.objects.policies.len(),
            cluster_policies: self.objects.cluster_policies.len(),
            rejected: self.rejected_with_refusal(),
            pin_dir: self.pins.base().display().to_string(),
            generation: self.generation,
            datapath: Some(crate::status::datapath_status(
                &self.pins,
                &self.maps,
                &self._datapath,
            )),
            masquerade: self.masquerade.as_ref().map(|k| k.status()),
            host_addresses: self.host_addresses().iter().copied().collect(),
            warnings: self.after_dnat_problems.clone(),
            quarantined: self.quarantined_pods(),
            threat_detection: self.threat_status.clone(),
            fqdn: self.fqdn_settings.describe(),
            promotions: self.promotion_statuses(false),
        }
    }

    pub fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Register { endpoint } => match self.register(endpoint) {
                Ok(r) => Response::Registered(r),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::Unregister {
                container_id,
                ifname,
            } => Response::Unregistered {
                found: self.forget(&container_id, &ifname),
            },
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Ready => {
                let reason = self.not_ready_reason();
                Response::Ready {
                    ready: reason.is_none(),
                    reason,
                }
            }
            Request::Trace {
                from,
                to,
                port,
                protocol,
            } => match self.trace(&from, &to, port, &protocol) {
                Ok(trace) => Response::Trace { trace },
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::PolicyGet { pod } => match self.effective_rules(&pod) {
                Ok(rules) => Response::PolicyRules { rules },
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::PolicySuggest {
                namespace,
                since_secs,
            } => {
                let filter = flows::FlowFilter {
                    since_secs,
                    ..Default::default()
                };
                let records = flows::read(&self.cfg.journal, &filter);
                let pods = &self.engine.inputs().pods;
                let yaml = crate::suggest::suggest(&namespace, &records, |p| {
                    pods.get(p).map(|pod| pod.labels.clone())
                });
                Response::Suggestion { yaml }
            }
            Request::PolicySuggestBaseline { since_secs } => {
                let filter = flows::FlowFilter {
                    since_secs,
                    ..Default::default()
                };
                let records = flows::read(&self.cfg.journal, &filter);
                Response::Suggestion {
                    yaml: crate::suggest::suggest_baseline(&records),
                }
            }
            Request::Threats { limit } => Response::Threats {
                threats: self.threats.recent(limit),
            },
            Request::Quarantine { pod } => {
                let info = crate::api::QuarantineInfo {
                    reason: crate::quarantine::MANUAL.into(),
                    since_ms: flows::now_ms(),
                    detail: None,
                };
                match self.quarantine_pod(&pod, info) {
                    Ok(r) => Response::Quarantine(r),
                    Err(e) => Response::Error {
                        message: format!("{e:#}"),
                    },
                }
            }
            Request::Release { pod } => match self.release_pod(&pod) {
                Ok(r) => Response::Quarantine(r),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::Fqdn => match self.fqdn_listing() {
                Ok(identities) => Response::Fqdn { identities },
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::Promotion { policy, action } => {
                match self.promotion_request(policy.as_deref(), action) {
                    Ok(promotions) => Response::Promotions { promotions },
                    Err(message) => Response::Error { message },
                }
            }
            Request::Verify => match self.verify_maps() {
                Ok(report) => Response::Verify { report },
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::Flows { filter } => Response::Flows {
                flows: flows::read(&self.cfg.journal, &filter),
            },
            Request::Reload => {
                self.reload_objects();
                Response::Status(Box::new(self.status()))
            }
            Request::FollowFlows { .. } => Response::Error {
                message: "flows --follow is a stream, served by the connection".into(),
            },
            Request::ListEndpoints => {
                let state = self.engine.state();
                let endpoints = self
                    .endpoints
                    .values()
                    .map(|r| {
                        let compiled = state.endpoints.get(&r.pod_ref());
                        let identity = compiled.map(|c| c.identity.0).unwrap_or(0);
                        let labels = state
                            .identities
                            .get(&moat_policy::Identity(identity))
                            .cloned()
                            .unwrap_or_else(LabelSet::new);
                        EndpointStatus {
                            spec: r.spec.clone(),
                            identity,
                            policy_id: compiled.map(|c| c.policy_id).unwrap_or(0),
                            mode: r.mode,
                            labels: labels.0,
                            quarantine: self.effective_quarantine(&r.pod_ref().to_string()),
                        }
                    })
                    .collect();
                Response::Endpoints { endpoints }
            }
            Request::Policy => {
                let state = self.engine.state();
                let maps = &self.applied.maps;
                let document = PolicyDocument {
                    identities: state
                        .identities
                        .iter()
                        .map(|(id, labels)| (id.0.to_string(), labels.0.clone()))
                        .collect(),
                    rules: state
                        .rules
                        .iter()
                        .map(|(id, r)| (id.to_string(), r.to_string()))
                        .collect(),
                    policies: self
                        .objects
                        .policies
                        .keys()
                        .map(|(ns, n)| format!("{ns}/{n}"))
                        .collect(),
                    rejected: self.rejected_with_refusal(),
                    entries: MapEntries {
                        policy: maps.policy.len(),
                        port_ranges: maps.port_ranges.len(),
                        cidr_v4: maps.cidr_v4.len(),
                        cidr_v6: maps.cidr_v6.len(),
                        ipcache: maps.ipcache.len(),
                        endpoints: maps.endpoints.len(),
                    },
                };
                Response::Policy { document }
            }
        }
    }
}
