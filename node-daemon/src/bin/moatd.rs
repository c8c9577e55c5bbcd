//! moatd: Moat's node daemon. See `moatd --help`.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser;
use ipnetwork::IpNetwork;
use moatd::{
    api,
    daemon::{Daemon, DaemonConfig, DatastoreConfig},
    install, server,
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Moat node daemon: loads the datapath and keeps identities and policy current"
)]
struct Args {
    /// `local` (YAML objects in --policy-dir) or `kubernetes` (the API server, in-cluster
    /// config or KUBECONFIG).
    #[arg(long, value_enum, default_value = "local")]
    datastore: Datastore,
    /// This node's name (from the downward API): its Node object gives its pod CIDRs.
    /// Needed by the Kubernetes datastore and by `--routing direct`.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// `none` (the primary CNI or the network routes pod CIDRs between nodes: chained
    /// mode) or `direct` (moatd routes every other node's pod CIDRs via that node's address
    /// on a shared network: standalone mode).
    #[arg(long, value_enum, default_value = "none")]
    routing: Routing,
    /// Kubernetes mode: copy moat-cni and moat-ipam from this directory...
    #[arg(long)]
    install_cni_from: Option<PathBuf>,
    /// ...into the runtime's CNI plugin directory...
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// ...and write the CNI configuration here: 10-moat.conflist (standalone, IPAM over the
    /// node's pod CIDRs) or 00-moat-chained.conflist (chained onto the directory's existing
    /// configuration, kept in step with it).
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// standalone: Moat is the cluster's CNI. chained: after the cluster's CNI (e.g. kindnet),
    /// Moat only enforces policy.
    #[arg(long, value_enum, default_value = "standalone")]
    cni_mode: install::CniMode,
    /// MTU of the pods' interfaces written into the conflist (standalone). Without it
    /// moat-cni gives pods the MTU of the node's uplink (the default route's device; Moat has
    /// no overlay to subtract), else 1500.
    #[arg(long)]
    cni_mtu: Option<u32>,
    /// Where policy and workload objects (YAML) are read from (the local datastore).
    #[arg(long, default_value = "/etc/moat/policies")]
    policy_dir: PathBuf,
    /// Persistent state (endpoint registry).
    #[arg(long, default_value = "/var/lib/moat")]
    state_dir: PathBuf,
    /// The local API socket used by moat-cni and moatctl.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// DEL requests queued by moat-cni while moatd was down.
    #[arg(long, default_value = api::DEFAULT_PENDING_DIR)]
    pending_dir: PathBuf,
    /// bpffs directory of this installation (state lives in <dir>/v<layout>).
    #[arg(long, default_value = moat_datapath::pins::DEFAULT_ROOT)]
    pin_root: PathBuf,
    /// Service ClusterIP ranges (repeatable, or comma-separated).
    #[arg(
        long = "service-cidr",
        default_value = "10.96.0.0/12",
        value_delimiter = ','
    )]
    service_cidrs: Vec<IpNetwork>,
    /// How often the policy directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 300)]
    poll_ms: u64,
    /// Flow journal: bytes per file, files kept, and maximum age in seconds.
    #[arg(long, default_value_t = 16 << 20)]
    journal_file_bytes: u64,
    #[arg(long, default_value_t = 4)]
    journal_files: usize,
    #[arg(long, default_value_t = 86_400)]
    journal_max_age_secs: u64,
    /// Verdict events each CPU may put into the ring per second (the kernel's token bucket);
    /// what exceeds it is counted as rate-limited (`moatctl status`), not reported.
    #[arg(long, default_value_t = moat_common::DEFAULT_EVENTS_PER_SECOND)]
    event_rate_per_cpu: u32,
    /// Events each CPU may emit in a burst above that rate.
    #[arg(long, default_value_t = moat_common::DEFAULT_EVENTS_BURST)]
    event_burst: u32,
    /// How the packets of a direct TCP connection between two pods of this node travel once
    /// both perimeters have admitted it: `direct` (the sender's hook forwards them into the
    /// receiving pod as the host's routing would, past the host's stack) or `host-stack`
    /// (every packet crosses the host, where its netfilter rules and captures see it).
    #[arg(long, value_enum, default_value = "direct")]
    local_delivery: LocalDelivery,
    /// Full resync of the maps against the kernel, in seconds.
    #[arg(long, default_value_t = 60)]
    resync_secs: u64,
    /// How often the maps moatd owns are compared entry by entry with the datastore's desired
    /// state (`moatctl verify`), the drift exported as moat_map_drift_entries and repaired; a
    /// duration (30s, 500ms, 2m), 0 turns the check off.
    #[arg(long, default_value = moatd::verify::DEFAULT_INTERVAL, value_parser = moatd::verify::parse_interval)]
    verify_interval: Duration,
    /// Masquerade pod egress that leaves the cluster (SNAT to the node's address) from the
    /// one nftables table moatd owns, `inet moat-masquerade`: `auto` is on with `--cni-mode
    /// standalone` and off with `chained` (the primary CNI masquerades); `false` removes the
    /// table. `--masquerade` alone is `true`.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    masquerade: Masquerade,
    /// Destinations that keep the pod's address besides every Node's pod CIDRs and the
    /// Service CIDRs (repeatable, or comma-separated).
    #[arg(long = "non-masquerade-cidr", value_delimiter = ',')]
    non_masquerade_cidrs: Vec<IpNetwork>,
    /// How often the masquerade table is compared with what moatd wrote, and written again
    /// if it was flushed or changed, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    masquerade_check_secs: u64,
    /// The nft binary that writes the masquerade table.
    #[arg(long, default_value = "nft")]
    nft: PathBuf,
    /// Prometheus metrics endpoint (`GET /metrics`); an empty value disables it.
    #[arg(long, default_value = moatd::metrics::DEFAULT_ADDR)]
    metrics_addr: String,
    /// Local API connections open at once (one thread each). At the limit a new connection
    /// takes the place of the one that has waited longest for its request; a request being
    /// served is never cut off.
    #[arg(
        long,
        default_value_t = server::DEFAULT_MAX_CONNECTIONS as u32,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    api_max_connections: u32,
    /// A local API client must send a complete request line within this many milliseconds of
    /// connecting (or of its previous answer), and must take each part of an answer within
    /// it; otherwise it is dropped.
    #[arg(
        long,
        default_value_t = server::DEFAULT_REQUEST_TIMEOUT.as_millis() as u64,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    api_request_timeout_ms: u64,
    /// Judge a pod's egress to a Service backend that is not a pod of this node (another
    /// node, the host network, outside the cluster) after the host's DNAT, from Moat's chain
    /// in the mangle table (iptables and ip6tables). Turning it off leaves such connections
    /// unjudged: only for a network namespace that is not the node's own.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    judge_after_dnat: bool,
    /// Entries of a datapath map, NAME=ENTRIES (repeatable, or comma-separated): endpoints,
    /// ipcache, policy, port-ranges, cidr, conntrack, fragments, fqdn-patterns,
    /// fqdn-addresses, fqdn-names, dns-queries. docs/maps.md gives each one's sizing rule. A
    /// pinned map of another size is resized at start with its entries.
    #[arg(long = "map-size", value_delimiter = ',', value_parser = parse_map_size)]
    map_sizes: Vec<(String, u32)>,
    /// How often every map's fill is counted; one past 80% is warned about (log and
    /// moat_map_fill_warning) until it drops under 75%. A duration; 0 turns it off.
    #[arg(long, default_value = "15s", value_parser = moatd::verify::parse_interval)]
    fill_check_interval: Duration,
    #[command(flatten)]
    threats: ThreatArgs,
    #[command(flatten)]
    fqdn: FqdnArgs,
}

/// One `--map-size` assignment, checked against the sizable maps and their bounds.
fn parse_map_size(text: &str) -> Result<(String, u32), String> {
    let sizes: moat_datapath::MapSizes = text.parse().map_err(|e| format!("{e}"))?;
    let (name, _) = text.split_once('=').unwrap_or_default();
    let name = name.trim().to_string();
    let entries = sizes.knob(&name).unwrap_or_default();
    Ok((name, entries))
}

/// FQDN egress settings (`--fqdn-*`).
#[derive(clap::Args, Debug)]
struct FqdnArgs {
    /// A learned address admits new connections at least this many seconds, even when the
    /// DNS record's TTL is 0 or 1 (a client connects a moment after its lookup, and may open
    /// more connections from one answer).
    #[arg(long, default_value_t = moatd::fqdn::settings::DEFAULT_TTL_FLOOR_S)]
    fqdn_ttl_floor: u32,
    /// ...and at most this many seconds, whatever the record's TTL.
    #[arg(long, default_value_t = moatd::fqdn::settings::DEFAULT_TTL_CAP_S)]
    fqdn_ttl_cap: u32,
    /// Learned addresses one identity keeps; above it moatd deletes its oldest first (counted
    /// in moat_fqdn_capped_total).
    #[arg(
        long,
        default_value_t = moatd::fqdn::settings::DEFAULT_MAX_PER_IDENTITY,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    fqdn_max_per_identity: usize,
}

impl FqdnArgs {
    fn settings(&self) -> moatd::fqdn::FqdnSettings {
        moatd::fqdn::FqdnSettings {
            ttl_floor_s: self.fqdn_ttl_floor,
            ttl_cap_s: self.fqdn_ttl_cap,
            max_per_identity: self.fqdn_max_per_identity,
        }
    }
}

/// Threat detection settings (`--threat-*`, `--quarantine-allow`).
#[derive(clap::Args, Debug)]
struct ThreatArgs {
    /// `on` or `off`: the datapath's threat detectors (port scans, host sweeps, SYN floods,
    /// policy probing, DNS tunnels, spoofing).
    #[arg(long, value_enum, default_value = "on")]
    threat_detection: OnOff,
    /// port-scan: the detection window...
    #[arg(long = "threat-port-scan-window", default_value = "10s", value_parser = moatd::threats::parse_duration)]
    threat_port_scan_window: Duration,
    /// ...and how many distinct destination ports one source probes on one peer in it fire the detector.
    #[arg(long = "threat-port-scan-threshold", default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..))]
    threat_port_scan_threshold: u32,
    /// What moatd does when port-scan fires: `log`, or `quarantine` the source if it is a pod of
    /// this node.
    #[arg(long = "threat-port-scan-response", value_enum, default_value = "log")]
    threat_port_scan_response: moatd::threats::Response,
    /// host-sweep: the detection window...
    #[arg(long = "threat-host-sweep-window", default_value = "10s", value_parser = moatd::threats::parse_duration)]
    threat_host_sweep_window: Duration,
    /// ...and how many distinct addresses one source contacts on one protocol and port in it fire the detector.
    #[arg(long = "threat-host-sweep-threshold", default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..))]
    threat_host_sweep_threshold: u32,
    /// What moatd does when host-sweep fires: `log`, or `quarantine` the source if it is a pod of
    /// this node.
    #[arg(long = "threat-host-sweep-response", value_enum, default_value = "log")]
    threat_host_sweep_response: moatd::threats::Response,
    /// syn-flood: the detection window...
    #[arg(long = "threat-syn-flood-window", default_value = "5s", value_parser = moatd::threats::parse_duration)]
    threat_syn_flood_window: Duration,
    /// ...and how many half-open TCP connections towards one endpoint and port in it fire the detector.
    #[arg(long = "threat-syn-flood-threshold", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    threat_syn_flood_threshold: u32,
    /// What moatd does when syn-flood fires: `log`, or `quarantine` the source if it is a pod of
    /// this node.
    #[arg(long = "threat-syn-flood-response", value_enum, default_value = "log")]
    threat_syn_flood_response: moatd::threats::Response,
    /// policy-probing: the detection window...
    #[arg(long = "threat-policy-probing-window", default_value = "10s", value_parser = moatd::threats::parse_duration)]
    threat_policy_probing_window: Duration,
    /// ...and how many policy drops of one source's new flows in it fire the detector.
    #[arg(long = "threat-policy-probing-threshold", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    threat_policy_probing_threshold: u32,
    /// What moatd does when policy-probing fires: `log`, or `quarantine` the source if it is a pod of
    /// this node.
    #[arg(
        long = "threat-policy-probing-response",
        value_enum,
        default_value = "log"
    )]
    threat_policy_probing_response: moatd::threats::Response,
    /// dns-tunnel: the detection window...
    #[arg(long = "threat-dns-tunnel-window", default_value = "10s", value_parser = moatd::threats::parse_duration)]
    threat_dns_tunnel_window: Duration,
    /// ...and how many suspicious DNS names (long labels or names, many distinct characters) from one source in it fire the detector.
    #[arg(long = "threat-dns-tunnel-threshold", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    threat_dns_tunnel_threshold: u32,
    /// What moatd does when dns-tunnel fires: `log`, or `quarantine` the source if it is a pod of
    /// this node.
    #[arg(long = "threat-dns-tunnel-response", value_enum, default_value = "log")]
    threat_dns_tunnel_response: moatd::threats::Response,
    /// spoofing: the detection window...
    #[arg(long = "threat-spoofing-window", default_value = "10s", value_parser = moatd::threats::parse_duration)]
    threat_spoofing_window: Duration,
    /// ...and how many packets a pod sends from an address that is not its own in it fire the detector.
    #[arg(long = "threat-spoofing-threshold", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    threat_spoofing_threshold: u32,
    /// What moatd does when spoofing fires: `log`, or `quarantine` the source if it is a pod of
    /// this node.
    #[arg(long = "threat-spoofing-response", value_enum, default_value = "log")]
    threat_spoofing_response: moatd::threats::Response,
    /// What a quarantined pod may still open: egress new flows to these protocol/ports
    /// (comma-separated, at most 4); everything else to and from it is dropped.
    #[arg(long, default_value = "udp/53,tcp/53", value_parser = moat_datapath::threats::parse_quarantine_allow)]
    quarantine_allow: std::vec::Vec<moat_common::QuarantineAllow>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl ThreatArgs {
    fn policy(&self) -> moatd::threats::ThreatPolicy {
        use moat_common::threat;
        let mut policy = moatd::threats::ThreatPolicy {
            enabled: self.threat_detection == OnOff::On,
            ..Default::default()
        };
        let per_kind = [
            (
                threat::PORT_SCAN,
                self.threat_port_scan_window,
                self.threat_port_scan_threshold,
                self.threat_port_scan_response,
            ),
            (
                threat::HOST_SWEEP,
                self.threat_host_sweep_window,
                self.threat_host_sweep_threshold,
                self.threat_host_sweep_response,
            ),
            (
                threat::SYN_FLOOD,
                self.threat_syn_flood_window,
                self.threat_syn_flood_threshold,
                self.threat_syn_flood_response,
            ),
            (
                threat::POLICY_PROBING,
                self.threat_policy_probing_window,
                self.threat_policy_probing_threshold,
                self.threat_policy_probing_response,
            ),
            (
                threat::DNS_TUNNEL,
                self.threat_dns_tunnel_window,
                self.threat_dns_tunnel_threshold,
                self.threat_dns_tunnel_response,
            ),
            (
                threat::SPOOFING,
                self.threat_spoofing_window,
                self.threat_spoofing_threshold,
                self.threat_spoofing_response,
            ),
        ];
        for (kind, window, threshold, response) in per_kind {
            let d = policy.settings.detector_mut(kind);
            d.window = window;
            d.threshold = threshold;
            policy.responses[kind as usize] = response;
        }
        policy.settings.quarantine_allow = self.quarantine_allow.clone();
        policy
    }
}

/// Chained onto kindnet: how often its DaemonSet is read again while Moat refuses to chain
/// (or could not tell), and once it has chained; how long one read may take.
const KINDNET_RECHECK_REFUSED: Duration = Duration::from_secs(10);
const KINDNET_RECHECK_CHAINED: Duration = Duration::from_secs(300);
const KINDNET_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// kindnet's NetworkPolicy enforcement, read from its DaemonSet through the API server.
fn read_kindnet(reader: Option<&moatd::kube::ApiReader>) -> Result<install::KindnetPolicy, String> {
    let (namespace, name) = install::KINDNET_DAEMONSET;
    let Some(reader) = reader else {
        return Ok(install::KindnetPolicy::NotEnforcing(
            "not checked: the local datastore has no API server to read kindnet's DaemonSet from"
                .into(),
        ));
    };
    match reader.daemonset(namespace, name, KINDNET_READ_TIMEOUT)? {
        Some(ds) => Ok(install::kindnet_policy(&ds)),
        None => Err(format!(
            "kindnet's CNI config is on this node but there is no DaemonSet {namespace}/{name} \
             (where kind and kubernetes-sigs/kindnet install it) to read its settings from"
        )),
    }
}

/// `--masquerade`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Masquerade {
    Auto,
    True,
    False,
}

/// `--datastore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Datastore {
    Local,
    Kubernetes,
}

/// `--routing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Routing {
    None,
    Direct,
}

/// `--local-delivery`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LocalDelivery {
    Direct,
    HostStack,
}

/// Chained mode: keeps 00-moat-chained.conflist in step with the cluster's own config. Onto
/// a kindnet that enforces NetworkPolicy itself it does not chain: moatd is not ready then,
/// with the reason (`moatctl status`), until kindnet stops enforcing or is replaced.
fn chain_forever(daemon: &Mutex<Daemon>, conf_dir: &std::path::Path, moat: &serde_json::Value) {
    let lock = || daemon.lock().unwrap_or_else(|e| e.into_inner());
    let reader = lock().kube_reader();
    let mut kindnet: Option<(std::time::Instant, Result<install::KindnetPolicy, String>)> = None;
    let mut last: Option<Result<install::ChainState, String>> = None;
    loop {
        let check = || {
            let due = match &kindnet {
                None => true,
                Some((at, Ok(install::KindnetPolicy::NotEnforcing(_)))) => {
                    at.elapsed() >= KINDNET_RECHECK_CHAINED
                }
                Some((at, _)) => at.elapsed() >= KINDNET_RECHECK_REFUSED,
            };
            if due {
                let previous = kindnet.take().map(|(_, verdict)| verdict);
                let verdict = match (read_kindnet(reader.as_ref()), previous) {
                    // A failed read keeps what was known: an API server restart must not
                    // flip the node's readiness.
                    (Err(e), Some(Ok(known))) => {
                        tracing::warn!(error = %e, "re-reading kindnet's DaemonSet; keeping the last answer");
                        Ok(known)
                    }
                    (verdict, previous) => {
                        if previous.as_ref() != Some(&verdict) {
                            match &verdict {
                                Ok(install::KindnetPolicy::NotEnforcing(why)) => {
                                    tracing::info!(%why, "kindnet does not enforce NetworkPolicy")
                                }
                                Ok(install::KindnetPolicy::Enforcing(why)) => {
                                    tracing::warn!(%why, "kindnet enforces NetworkPolicy")
                                }
                                Err(e) => tracing::warn!(error = %e, "reading kindnet's DaemonSet"),
                            }
                        }
                        verdict
                    }
                };
                kindnet = Some((std::time::Instant::now(), verdict));
            }
            kindnet.as_ref().map(|(_, v)| v.clone()).expect("just read")
        };
        let now =
            install::sync_chained_checked(conf_dir, moat, check).map_err(|e| format!("{e:#}"));
        if last.as_ref() != Some(&now) {
            match &now {
                Ok(install::ChainState::Chained(base)) => {
                    tracing::info!(base = %base.display(), "CNI chained onto the cluster's config")
                }
                Ok(install::ChainState::Waiting) => {
                    tracing::warn!(dir = %conf_dir.display(), "waiting for the cluster's CNI config to chain onto")
                }
                Ok(install::ChainState::Refused { base, reason }) => {
                    tracing::error!(base = %base.display(), %reason, "not chaining onto the cluster's CNI")
                }
                Ok(install::ChainState::Undecided { base, reason }) => {
                    tracing::warn!(base = %base.display(), %reason, "not chaining onto the cluster's CNI yet")
                }
                Err(e) => tracing::error!(error = %e, "chaining the CNI config"),
            }
            if let Ok(state) = &now {
                lock().set_chain_problem(state.not_ready_reason().map(str::to_string));
            }
            last = Some(now);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Standalone: writes 10-moat.conflist once moatd is ready, the Node's podCIDRs included (a
/// node may get them after moatd starts). Until then the runtime sees no Moat config and
/// moatd answers not ready with the reason; nothing exits, so the DaemonSet does not
/// crash-loop.
fn write_conflist_when_ready(
    daemon: &Mutex<Daemon>,
    conf_dir: &std::path::Path,
    socket: &std::path::Path,
    pin_root: &std::path::Path,
    mtu: Option<u32>,
) {
    let mut last_reason = None;
    loop {
        let (reason, cidrs) = {
            let d = daemon.lock().unwrap_or_else(|e| e.into_inner());
            (d.not_ready_reason(), d.node_pod_cidrs())
        };
        match reason {
            None => {
                let conflist = install::standalone_conflist(&cidrs, socket, pin_root, mtu);
                match install::write_conflist(conf_dir, &conflist) {
                    Ok(()) => {
                        tracing::info!(dir = %conf_dir.display(), ?cidrs, "CNI config written");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "writing the CNI config")
                    }
                }
            }
            Some(reason) if last_reason.as_ref() != Some(&reason) => {
                tracing::warn!(%reason, "not ready; the CNI config waits");
                last_reason = Some(reason);
            }
            Some(_) => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn main() -> anyhow::Result<()> {
    moatd::memory::limit_allocator_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let fqdn = args.fqdn.settings();
    fqdn.validate().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.policy_dir)?;
    let listener = server::bind(&args.socket)?;
    // Metrics are an aid: a taken port must not keep enforcement from starting.
    let metrics_listener = moatd::metrics::bind(&args.metrics_addr).unwrap_or_else(|e| {
        tracing::error!(error = %format!("{e:#}"), "metrics endpoint disabled");
        None
    });
    let journal = moatd::flows::JournalConfig {
        dir: args.state_dir.join("flows"),
        stem: "flows",
        max_file_bytes: args.journal_file_bytes,
        max_files: args.journal_files.max(1),
        max_age: Duration::from_secs(args.journal_max_age_secs),
    };
    let datastore = match args.datastore {
        Datastore::Kubernetes => {
            anyhow::ensure!(
                !args.node_name.is_empty(),
                "--datastore kubernetes needs --node-name (or NODE_NAME)"
            );
            DatastoreConfig::Kubernetes(moatd::kube::KubeConfig::infer(args.node_name.clone()))
        }
        Datastore::Local => DatastoreConfig::Local,
    };
    let routing = match args.routing {
        Routing::Direct => {
            anyhow::ensure!(
                !args.node_name.is_empty(),
                "--routing direct needs --node-name (or NODE_NAME)"
            );
            moatd::daemon::Routing::Direct
        }
        Routing::None => moatd::daemon::Routing::None,
    };
    let socket_path = args.socket.clone();
    let pin_root = args.pin_root.clone();
    let datapath_settings = server::DatapathSettings {
        event_rate_per_cpu: args.event_rate_per_cpu,
        event_burst: args.event_burst,
        local_via_host: args.local_delivery == LocalDelivery::HostStack,
    };
    let mut map_sizes = moat_datapath::MapSizes::default();
    for (name, entries) in &args.map_sizes {
        map_sizes.set(name, *entries)?;
    }
    let mut daemon = Daemon::start(DaemonConfig {
        datastore,
        journal,
        state_dir: args.state_dir,
        policy_dir: args.policy_dir,
        socket: args.socket,
        pending_dir: args.pending_dir,
        pin_root: args.pin_root,
        service_cidrs: args.service_cidrs,
        node_name: args.node_name,
        routing,
        judge_after_dnat: args.judge_after_dnat,
        map_sizes: map_sizes.clone(),
    })?;
    server::configure_datapath(daemon.pins(), &datapath_settings)?;
    daemon.configure_threats(args.threats.policy());
    daemon.configure_fqdn(fqdn)?;
    // The runtime sees Moat's CNI only once moatd can serve it: first packet correct.
    if let Some(from) = &args.install_cni_from {
        install::install_binaries(from, &args.cni_bin_dir)?;
    }
    if let (Some(_), install::CniMode::Standalone) = (&args.cni_conf_dir, args.cni_mode) {
        // Written once moatd is ready (see below); until then moatd says what it waits for.
        daemon.require_pod_cidrs(true);
    }
    // Standalone, nothing else SNATs pod egress; chained, the primary CNI does.
    daemon.manage_masquerade(moatd::masquerade::Config {
        enabled: match args.masquerade {
            Masquerade::Auto => args.cni_mode == install::CniMode::Standalone,
            Masquerade::True => true,
            Masquerade::False => false,
        },
        non_masquerade_cidrs: args.non_masquerade_cidrs.clone(),
        nft: args.nft.clone(),
    });
    let daemon = Arc::new(Mutex::new(daemon));
    if let (Some(conf_dir), install::CniMode::Chained) = (&args.cni_conf_dir, args.cni_mode) {
        let moat = install::moat_plugin(install::CniMode::Chained, &socket_path, &pin_root, None);
        let (daemon, conf_dir) = (daemon.clone(), conf_dir.clone());
        // The cluster's CNI may write (and rewrite) its config after moatd starts.
        std::thread::Builder::new()
            .name("moatd-cni-chain".into())
            .spawn(move || chain_forever(&daemon, &conf_dir, &moat))?;
    }
    if let (Some(conf_dir), install::CniMode::Standalone) = (&args.cni_conf_dir, args.cni_mode) {
        let (daemon, conf_dir) = (daemon.clone(), conf_dir.clone());
        let mtu = args.cni_mtu;
        std::thread::Builder::new()
            .name("moatd-cni-conf".into())
            .spawn(move || {
                write_conflist_when_ready(&daemon, &conf_dir, &socket_path, &pin_root, mtu)
            })?;
    }
    let watcher = daemon.clone();
    let (poll, resync) = (
        Duration::from_millis(args.poll_ms),
        Duration::from_secs(args.resync_secs),
    );
    std::thread::spawn(move || server::watch(watcher, poll, resync));
    // Someone may flush the ruleset: the table comes back within a check period.
    let masquerade = daemon.clone();
    let check = Duration::from_secs(args.masquerade_check_secs);
    std::thread::Builder::new()
        .name("moatd-masquerade".into())
        .spawn(move || {
            loop {
                std::thread::sleep(check);
                let mut d = masquerade.lock().unwrap_or_else(|e| e.into_inner());
                d.sync_masquerade();
            }
        })?;
    // The self-audit: drift between the maps and the datastore's state, exported and repaired.
    if !args.verify_interval.is_zero() {
        let verifier = daemon.clone();
        let interval = args.verify_interval;
        std::thread::Builder::new()
            .name("moatd-verify".into())
            .spawn(move || moatd::verify::run(verifier, interval))?;
    }
    // Workloads under automatic promotion move on when their windows pass.
    let promoter = daemon.clone();
    std::thread::Builder::new()
        .name("moatd-promotion".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = moatd::daemon::promotion_now();
                let mut d = promoter.lock().unwrap_or_else(|e| e.into_inner());
                d.tick_promotions(now);
            }
        })?;
    if !args.fill_check_interval.is_zero() {
        let pins = daemon
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pins()
            .clone();
        let interval = args.fill_check_interval;
        std::thread::Builder::new()
            .name("moatd-fill".into())
            .spawn(move || moatd::fill_watch::run(pins, interval))?;
    }
    // The node's addresses are the `host` identity: followed as they come and go.
    moatd::host_addresses::follow(daemon.clone())?;
    let events = daemon.clone();
    std::thread::spawn(move || server::journal_events(events));
    let threats = daemon.clone();
    // With the Kubernetes datastore each detection is also a Warning Event on the pod.
    let poster = daemon
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .threat_event_poster();
    std::thread::Builder::new()
        .name("moatd-threats".into())
        .spawn(move || {
            moatd::threats::follow(threats, |record, uid| {
                if let Some(poster) = &poster {
                    poster.post(record, uid);
                }
            })
        })?;
    // Expired learned addresses, identities over their cap, identities gone from the node.
    let sweeper = daemon.clone();
    std::thread::Builder::new()
        .name("moatd-fqdn-sweep".into())
        .spawn(move || moatd::fqdn::sweeper::run(sweeper, fqdn))?;
    if let Some(metrics_listener) = metrics_listener {
        let registry = moatd::metrics::registry(daemon.clone());
        std::thread::Builder::new()
            .name("moatd-metrics".into())
            .spawn(move || moatd::metrics::serve(metrics_listener, registry))?;
    }
    let api_limits = server::ApiLimits {
        max_connections: args.api_max_connections as usize,
        request_timeout: Duration::from_millis(args.api_request_timeout_ms),
        ..server::ApiLimits::default()
    };
    server::serve(daemon, listener, api_limits);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("moatd").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let a = parse(&[]);
        assert_eq!(a.datastore, Datastore::Local);
        assert_eq!(a.routing, Routing::None);
        assert_eq!(a.local_delivery, LocalDelivery::Direct);
        assert_eq!(a.masquerade, Masquerade::Auto);
        assert_eq!(a.cni_mode, install::CniMode::Standalone);
        assert!(a.judge_after_dnat);
        assert_eq!(a.poll_ms, 300);
        assert_eq!(a.metrics_addr, moatd::metrics::DEFAULT_ADDR);
        assert_eq!(a.fqdn.settings(), moatd::fqdn::FqdnSettings::default());
        assert_eq!(a.verify_interval, Duration::from_secs(30));
    }

    #[test]
    fn verify_interval_takes_a_duration_or_zero_for_off() {
        assert_eq!(
            parse(&["--verify-interval=1s"]).verify_interval,
            Duration::from_secs(1)
        );
        assert_eq!(
            parse(&["--verify-interval", "0"]).verify_interval,
            Duration::ZERO
        );
        assert!(Args::try_parse_from(["moatd", "--verify-interval=often"]).is_err());
    }

    #[test]
    fn fqdn_flags_set_the_ttl_bounds_and_the_cap_and_refuse_a_zero_cap() {
        let s = parse(&[
            "--fqdn-ttl-floor=5",
            "--fqdn-ttl-cap",
            "600",
            "--fqdn-max-per-identity=2",
        ])
        .fqdn
        .settings();
        assert_eq!(
            (s.ttl_floor_s, s.ttl_cap_s, s.max_per_identity),
            (5, 600, 2)
        );
        assert!(
            Args::try_parse_from(["moatd", "--fqdn-max-per-identity=0"]).is_err(),
            "a cap of 0 would delete every learned address"
        );
    }

    #[test]
    fn threat_flags_default_to_the_datapaths_defaults_and_set_one_kind_each() {
        use moat_common::threat;
        assert_eq!(
            parse(&[]).threats.policy(),
            moatd::threats::ThreatPolicy::default()
        );
        let policy = parse(&[
            "--threat-port-scan-window=3s",
            "--threat-port-scan-threshold",
            "50",
            "--threat-syn-flood-response=quarantine",
            "--quarantine-allow=udp/53",
            "--threat-detection=off",
        ])
        .threats
        .policy();
        assert!(!policy.enabled);
        let scan = policy.settings.detector(threat::PORT_SCAN);
        assert_eq!((scan.window, scan.threshold), (Duration::from_secs(3), 50));
        assert_eq!(
            policy.response(threat::SYN_FLOOD),
            moatd::threats::Response::Quarantine
        );
        assert_eq!(
            policy.response(threat::PORT_SCAN),
            moatd::threats::Response::Log
        );
        assert_eq!(policy.settings.quarantine_allow.len(), 1);
    }

    /// The forms the tests, scripts, manifests and benchmarks start moatd with.
    #[test]
    fn flags_take_their_value_joined_or_separate() {
        let a = parse(&[
            "--datastore=kubernetes",
            "--routing",
            "direct",
            "--local-delivery=host-stack",
            "--judge-after-dnat=false",
            "--masquerade=false",
            "--poll-ms",
            "100",
            "--metrics-addr",
            "",
            "--service-cidr=10.96.0.0/12,fd00:96::/108",
            "--service-cidr",
            "10.100.0.0/16",
        ]);
        assert_eq!(a.datastore, Datastore::Kubernetes);
        assert_eq!(a.routing, Routing::Direct);
        assert_eq!(a.local_delivery, LocalDelivery::HostStack);
        assert!(!a.judge_after_dnat);
        assert_eq!(a.masquerade, Masquerade::False);
        assert_eq!(a.poll_ms, 100);
        assert_eq!(a.metrics_addr, "");
        assert_eq!(a.service_cidrs.len(), 3);
        assert_eq!(parse(&["--masquerade"]).masquerade, Masquerade::True);
        assert_eq!(
            parse(&["--masquerade", "true"]).masquerade,
            Masquerade::True
        );
    }

    #[test]
    fn an_unknown_value_is_refused_naming_the_choices() {
        for args in [
            ["--datastore", "etcd"],
            ["--routing", "overlay"],
            ["--local-delivery", "bypass"],
        ] {
            let e = Args::try_parse_from(std::iter::once("moatd").chain(args))
                .unwrap_err()
                .to_string();
            assert!(e.contains("possible values"), "{args:?}: {e}");
        }
    }
}
