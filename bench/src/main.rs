//! `moat-bench datapath`: the datapath part of `make bench`. In one invocation, with the
//! baselines measured in the same run:
//!   1. per-packet cost through BPF_PROG_TEST_RUN with 1 and with 100,000 policy + ipcache
//!      entries, for an established flow and for a new (denied) flow;
//!   2. real traffic between two lab pods under `none`, `moat_1`, `moat_100k`,
//!      `moat_100k_host_stack` and `iptables_10k`, and between two pods wired by the reference
//!      `ptp` plugin + `host-local` (`ptp`, kindnet's datapath), interleaved over several
//!      rounds: sockperf TCP ping-pong latency, new TCP connections per second (a loop in the
//!      pod and a forking client, one process per connection), iperf3 throughput (one stream
//!      and `-P 4`). The moat configurations run moatd's default (linked local flows delivered
//!      directly into the receiving pod) except `moat_100k_host_stack`, which keeps every
//!      packet on the host's stack and so shows what the filter alone costs. Medians and
//!      spread over rounds, overheads against `none` and ratios against `ptp` paired within
//!      each round.
//!
//! Results go under the "datapath" key of the output JSON (other sections are kept). Every
//! namespace, link, pin and iptables rule the run creates is removed again, also on failure.

mod churn;
mod cluster_sim;
mod cni;
mod compile;
mod detection;
mod fill;
mod flows;
mod fqdn;
mod perpacket;
mod tiers;
mod traffic;
mod util;
mod verifier;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use moat_datapath::{Datapath, Maps, PinDir};
use moat_testkit::lab::Lab;
use serde_json::{Map, Value, json};

use traffic::{CONFIGS, Config};
use util::{check_interrupted, median, round};

const PIN_ROOT: &str = "/sys/fs/bpf/moat-bench";
/// Moat's benchmarks (`make bench` runs them all); each writes its own section of the results
/// file and keeps the others.
#[derive(Parser)]
#[command(name = "moat-bench")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Per-packet cost and real pod-to-pod traffic (section "datapath").
    Datapath(Args),
    /// The policy engine's compile cost, pure (section "policy").
    Policy(compile::Args),
    /// Control-plane churn at cluster scale on a real moatd core (section "churn").
    Churn(churn::Args),
    /// CNI ADD/DEL latency against the reference plugins (section "cni").
    Cni(cni::Args),
    /// `moatctl flows --follow` against the ring buffer (section "flows").
    Flows(flows::Args),
    /// A 5,000-node cluster by model (section "cluster_sim"; docs/scale.md).
    ClusterSim(cluster_sim::Args),
    /// What loading the datapath costs the kernel's verifier (section "verifier").
    Verifier(verifier::Args),
    /// The forking connection-rate client's child: one connection to ADDR, exit 0 on success.
    #[command(hide = true)]
    ConnectOnce { addr: std::net::SocketAddr },
}

#[derive(clap::Args)]
struct Args {
    /// The results file.
    #[arg(long, value_name = "FILE", default_value = "bench/results.json")]
    out: PathBuf,
    #[arg(long, value_name = "N", default_value_t = 15)]
    rounds: usize,
    #[arg(long, value_name = "S", default_value_t = 1)]
    secs: u64,
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    repeat: u32,
    #[arg(long, value_name = "N", default_value_t = 7)]
    batches: usize,
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    entries: usize,
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    iptables_rules: usize,
    /// Skip the traffic part: a quick loop for tuning the programs' per-packet cost.
    #[arg(long)]
    per_packet_only: bool,
    /// Only the FQDN part (DNS answer latency, connections to a named host): a quick loop on
    /// its figures.
    #[arg(long, conflicts_with = "per_packet_only")]
    fqdn_only: bool,
    /// Only threat detection's per-packet cost: a quick loop for tuning the detectors.
    #[arg(long, conflicts_with_all = ["per_packet_only", "fqdn_only"])]
    threats_only: bool,
    /// How the traffic part attaches the programs (default: as moat-cni does).
    #[arg(long = "attach", value_name = "tc|tcx", value_parser = parse_attach)]
    attach_flag: Option<moat_datapath::AttachMode>,
    #[arg(skip)]
    attach: moat_datapath::AttachMode,
    /// A subset of the metrics, for a quick loop on one figure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = METRICS)]
    metrics: Vec<Metric>,
    /// A subset of the configurations
    /// (none,moat_1,moat_100k,moat_100k_host_stack,iptables_10k,ptp).
    /// `none` is always measured: every overhead is paired with it.
    #[arg(long = "configs", value_name = "LIST", value_delimiter = ',', value_parser = parse_config)]
    configs_flag: Option<Vec<Config>>,
    #[arg(skip)]
    configs: Vec<Config>,
}

fn parse_attach(value: &str) -> Result<moat_datapath::AttachMode> {
    match value {
        "tc" => Ok(moat_datapath::AttachMode::Tc),
        "tcx" => Ok(moat_datapath::AttachMode::Tcx),
        other => bail!("--attach takes tc or tcx, not {other:?}"),
    }
}

fn parse_config(value: &str) -> Result<Config> {
    CONFIGS
        .into_iter()
        .find(|c| c.name() == value)
        .with_context(|| format!("--configs: unknown configuration {value:?}"))
}

impl Args {
    /// Checks the values and resolves the defaults that depend on other flags.
    fn resolve(&mut self) -> Result<()> {
        if self.rounds == 0 || self.secs == 0 || self.batches == 0 || self.repeat == 0 {
            bail!("--rounds, --secs, --batches and --repeat must be positive");
        }
        self.attach = self.attach_flag.unwrap_or_default();
        self.configs = match &self.configs_flag {
            None => CONFIGS.to_vec(),
            Some(wanted) => CONFIGS
                .into_iter()
                .filter(|c| *c == Config::None || wanted.contains(c))
                .collect(),
        };
        Ok(())
    }
}

fn main() -> ExitCode {
    match Cli::parse().bench {
        Bench::Datapath(args) => datapath(args),
        Bench::Policy(args) => compile::main(args),
        Bench::Churn(args) => churn::main(args),
        Bench::Cni(args) => cni::main(args),
        Bench::Flows(args) => flows::main(args),
        Bench::ClusterSim(args) => cluster_sim::main(args),
        Bench::Verifier(args) => verifier::main(args),
        Bench::ConnectOnce { addr } => traffic::connect_once_main(addr),
    }
}

/// `moat-bench datapath`.
fn datapath(mut args: Args) -> ExitCode {
    if let Err(e) = args.resolve() {
        eprintln!("{e:#}");
        return ExitCode::from(2);
    }
    util::install_signal_handlers();
    let started = Instant::now();
    let mut section = Map::new();
    let outcome = run(&args, &mut section);
    section.insert(
        "wall_time_s".into(),
        json!(round(started.elapsed().as_secs_f64(), 1)),
    );
    if let Err(e) = &outcome {
        eprintln!("moat-bench: {e:#}");
        section.insert("fatal_error".into(), json!(format!("{e:#}")));
    }
    summarize(&mut section);
    if let Err(e) = write_merged(&args.out, Value::Object(section.clone())) {
        eprintln!("moat-bench: writing {}: {e:#}", args.out.display());
        return ExitCode::FAILURE;
    }
    print_table(&section);
    println!("\nwritten: {} (section \"datapath\")", args.out.display());
    if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn preflight() -> Result<Value> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("moat-bench must run as root (it loads eBPF, creates namespaces, edits iptables)");
    }
    let tools = [
        "ip",
        "ss",
        "sysctl",
        "sockperf",
        "iperf3",
        "iptables",
        "iptables-restore",
    ];
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !util::which(t)).collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (scripts/bootstrap.sh installs them)",
            missing.join(", ")
        );
    }
    if util::sh("mountpoint -q /sys/fs/bpf").is_err() {
        util::sh("mount -t bpf bpf /sys/fs/bpf")?;
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let stale = util::remove_tagged_iptables_rules()?;
    Ok(json!({
        "kernel": kernel,
        "cpus": cpus,
        "stale_iptables_rules_removed": stale,
        "sockperf": util::sh("sockperf --version 2>&1 | head -1").unwrap_or_default().trim(),
        "iperf3": util::sh("iperf3 --version 2>&1 | head -1").unwrap_or_default().trim(),
    }))
}

fn run(args: &Args, section: &mut Map<String, Value>) -> Result<()> {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    section.insert("generated_at_unix".into(), json!(unix));
    section.insert("host".into(), preflight()?);

    // Two datapaths side by side, each in its own pin directory: "small" (about one entry)
    // and "large" (100k entries). A configuration attaches one or the other.
    let _pins_guard = util::PinRootGuard::new(PIN_ROOT);
    if args.fqdn_only {
        return fqdn_section(args, section);
    }
    if args.threats_only {
        let detection = threat_detection(args);
        section.insert(
            "threat_detection_per_packet".into(),
            detection.unwrap_or_else(|e| json!({ "error": format!("{e:#}") })),
        );
        return Ok(());
    }
    let small = PinDir::new(format!("{PIN_ROOT}/small"));
    let large = PinDir::new(format!("{PIN_ROOT}/large"));
    let _dp_small = Datapath::load(&small).context("loading the small datapath")?;
    let _dp_large = Datapath::load(&large).context("loading the large datapath")?;

    // --- 1. per-packet cost ---------------------------------------------------------------
    eprintln!("moat-bench: per-packet cost (BPF_PROG_TEST_RUN)");
    let per_packet = per_packet(args, &small, &large);
    section.insert(
        "per_packet".into(),
        per_packet.unwrap_or_else(|e| json!({ "error": format!("{e:#}") })),
    );
    check_interrupted()?;
    eprintln!("moat-bench: per-packet cost of ClusterNetworkPolicy tiers (BPF_PROG_TEST_RUN)");
    let tiers = cluster_tiers(args);
    section.insert(
        "cluster_policy_per_packet".into(),
        tiers.unwrap_or_else(|e| json!({ "error": format!("{e:#}") })),
    );
    check_interrupted()?;
    eprintln!("moat-bench: per-packet cost of threat detection (BPF_PROG_TEST_RUN)");
    let detection = threat_detection(args);
    section.insert(
        "threat_detection_per_packet".into(),
        detection.unwrap_or_else(|e| json!({ "error": format!("{e:#}") })),
    );
    check_interrupted()?;
    if args.per_packet_only {
        return Ok(());
    }

    // --- 2. real traffic ------------------------------------------------------------------
    eprintln!("moat-bench: pod-to-pod traffic");
    let traffic = traffic(args, &small, &large)?;
    section.insert("traffic".into(), traffic);
    check_interrupted()?;
    fqdn_section(args, section)
}

fn fqdn_section(args: &Args, section: &mut Map<String, Value>) -> Result<()> {
    eprintln!("moat-bench: FQDN learning: DNS answer latency and connections to a named host");
    let fqdn = fqdn::measure(
        PIN_ROOT,
        &fqdn::Params {
            queries: 500,
            batches: args.batches,
            secs: args.secs,
        },
    );
    section.insert(
        "fqdn".into(),
        fqdn.unwrap_or_else(|e| json!({ "error": format!("{e:#}") })),
    );
    Ok(())
}

fn cluster_tiers(args: &Args) -> Result<Value> {
    let link = util::VethGuard::new(&format!("mbcn{}", std::process::id() % 10_000))?;
    tiers::measure(
        PIN_ROOT,
        link.ifindex,
        &tiers::Params {
            repeat: args.repeat,
            batches: args.batches,
        },
    )
}

fn threat_detection(args: &Args) -> Result<Value> {
    let link = util::VethGuard::new(&format!("mbtd{}", std::process::id() % 10_000))?;
    detection::measure(PIN_ROOT, link.ifindex, args.repeat, args.batches)
}

fn per_packet(args: &Args, small: &PinDir, large: &PinDir) -> Result<Value> {
    let link = util::VethGuard::new(&format!("mbtr{}", std::process::id() % 10_000))?;
    let mut maps_small = Maps::open(small)?;
    let mut maps_large = Maps::open(large)?;
    perpacket::install(&mut maps_small, link.ifindex)?;
    perpacket::install(&mut maps_large, link.ifindex)?;
    let fill_started = Instant::now();
    fill::fill(&mut maps_large, args.entries, args.entries)?;
    let fill_s = fill_started.elapsed().as_secs_f64();
    let result = (|| {
        let subjects = [
            perpacket::Subject::open("1", small)?,
            perpacket::Subject::open("100k", large)?,
        ];
        perpacket::measure(
            &subjects,
            link.ifindex,
            &perpacket::Params {
                repeat: args.repeat,
                batches: args.batches,
            },
        )
    })();
    // The traffic phase's moat_1 keeps only its own entries; the large map keeps its filler.
    perpacket::uninstall(&mut maps_small, link.ifindex, true)?;
    perpacket::uninstall(&mut maps_large, link.ifindex, false)?;
    let mut v = result?;
    v["fill_time_s"] = json!(round(fill_s, 2));
    Ok(v)
}

#[derive(Default, Clone)]
struct Sample {
    latency_usec: Option<f64>,
    latency_p50_usec: Option<f64>,
    connrate_per_s: Option<f64>,
    conn_errors: Option<u64>,
    connrate_fork_per_s: Option<f64>,
    conn_fork_errors: Option<u64>,
    throughput_gbit_s: Option<f64>,
    throughput_p4_gbit_s: Option<f64>,
    iptables_load_ms: Option<f64>,
}

impl Sample {
    /// Takes every figure `other` has.
    fn merge(&mut self, other: Sample) {
        self.latency_usec = other.latency_usec.or(self.latency_usec);
        self.latency_p50_usec = other.latency_p50_usec.or(self.latency_p50_usec);
        self.connrate_per_s = other.connrate_per_s.or(self.connrate_per_s);
        self.conn_errors = other.conn_errors.or(self.conn_errors);
        self.connrate_fork_per_s = other.connrate_fork_per_s.or(self.connrate_fork_per_s);
        self.conn_fork_errors = other.conn_fork_errors.or(self.conn_fork_errors);
        self.throughput_gbit_s = other.throughput_gbit_s.or(self.throughput_gbit_s);
        self.throughput_p4_gbit_s = other.throughput_p4_gbit_s.or(self.throughput_p4_gbit_s);
        self.iptables_load_ms = other.iptables_load_ms.or(self.iptables_load_ms);
    }

    /// A figure by its JSON name (see [`FIGURES`]).
    fn figure(&self, key: &str) -> Option<f64> {
        match key {
            "latency_usec" => self.latency_usec,
            "connrate_per_s" => self.connrate_per_s,
            "connrate_fork_per_s" => self.connrate_fork_per_s,
            "throughput_gbit_s" => self.throughput_gbit_s,
            "throughput_p4_gbit_s" => self.throughput_p4_gbit_s,
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Metric {
    Latency,
    Connrate,
    /// Connections per second from a forking client (one process per connection).
    ConnrateFork,
    Throughput,
    /// iperf3 -P 4.
    ThroughputP4,
}

const METRICS: [Metric; 5] = [
    Metric::Latency,
    Metric::Connrate,
    Metric::ConnrateFork,
    Metric::Throughput,
    Metric::ThroughputP4,
];

/// The traffic figures by JSON name, with the digits kept and whether lower is better.
const FIGURES: [(&str, i32, bool); 5] = [
    ("latency_usec", 3, true),
    ("connrate_per_s", 1, false),
    ("connrate_fork_per_s", 1, false),
    ("throughput_gbit_s", 3, false),
    ("throughput_p4_gbit_s", 3, false),
];

/// Streams of the multi-stream throughput figure (iperf3 -P).
const P_STREAMS: u32 = 4;

fn traffic(args: &Args, small: &PinDir, large: &PinDir) -> Result<Value> {
    let mut lab = Lab::new("mbn")?;
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;
    traffic::tune_pod(&client)?;
    traffic::tune_pod(&server)?;
    let mut entries = Map::new();
    for (label, pins) in [("moat_1", small), ("moat_100k", large)] {
        let mut maps = Maps::open(pins)?;
        traffic::register(&mut maps, &client, traffic::CLIENT)?;
        traffic::register(&mut maps, &server, traffic::SERVER)?;
        traffic::install_policy(&mut maps)?;
        let hints = traffic::apply_lookup_hints(
            &mut maps,
            &[(&client, traffic::CLIENT), (&server, traffic::SERVER)],
        )?;
        let (policy, ipcache) = fill::counts(&maps)?;
        entries.insert(
            label.into(),
            json!({
                "policy": policy,
                "ipcache_v4": ipcache,
                "ipcache_v6": maps.ipcache_v6.keys().count(),
                "endpoint_lookup_hints": hints
                    .iter()
                    .map(|(id, h)| (id.to_string(), json!(h)))
                    .collect::<Map<String, Value>>(),
            }),
        );
    }
    let mut errors: Vec<Value> = Vec::new();
    let mut configs = args.configs.clone();
    // The ptp baseline's own pods, wired by the reference plugin. If they cannot be made, the
    // other configurations are still measured and the reason is reported.
    let mut ptp = None;
    if configs.contains(&Config::Ptp) {
        let made = traffic::PtpPods::new().and_then(|p| {
            traffic::tune_pod(p.client())?;
            traffic::tune_pod(p.server())?;
            Ok(p)
        });
        match made {
            Ok(p) => ptp = Some(p),
            Err(e) => {
                eprintln!("moat-bench: ptp pods: {e:#}; ptp not measured");
                errors.push(json!({"config": "ptp", "metric": "setup", "error": format!("{e:#}")}));
                configs.retain(|c| *c != Config::Ptp);
            }
        }
    }
    let mut servers = traffic::Servers::start(&server)?;
    let mut ptp_servers = match &ptp {
        Some(p) => Some(traffic::Servers::start(p.server())?),
        None => None,
    };
    let setup = traffic::Setup {
        client: &client,
        server: &server,
        ptp: ptp.as_ref().map(|p| (p.client(), p.server())),
        small,
        large,
        iptables_rules: args.iptables_rules,
        attach: args.attach,
    };

    let mut rounds: Vec<BTreeMap<&'static str, Sample>> = Vec::new();
    let mut orders = Vec::new();
    for r in 0..args.rounds {
        let mut order = configs.clone();
        order.rotate_left(r % configs.len());
        orders.push(order.iter().map(|c| c.name()).collect::<Vec<_>>());
        let mut row: BTreeMap<&'static str, Sample> = BTreeMap::new();
        // One metric at a time across all configurations, so that each configuration's
        // figure and the `none` (and `ptp`) figure it is compared with are taken seconds
        // apart: the shared machine's slow drifts then cancel in the paired figures.
        for &metric in &args.metrics {
            for &config in &order {
                check_interrupted()?;
                servers.check_alive()?;
                if let Some(s) = ptp_servers.as_mut() {
                    s.check_alive()?;
                }
                eprintln!(
                    "moat-bench: round {}/{} {metric:?} {}",
                    r + 1,
                    args.rounds,
                    config.name()
                );
                let sample = measure_config(config, &setup, args.secs, r, metric, &mut errors);
                row.entry(config.name()).or_default().merge(sample);
            }
        }
        rounds.push(row);
    }
    drop(servers);
    drop(ptp_servers);
    let ptp_report = ptp.as_ref().map(|p| {
        json!({
            "conflist": {"plugins": [p.config.clone()]},
            "pods": p.pods.iter().map(|pod| (pod.name.clone(), json!({
                "netns": pod.netns,
                "host_if": pod.host_if,
                "v4": pod.v4.to_string(),
            }))).collect::<Map<String, Value>>(),
        })
    });
    let ptp_left = ptp.as_mut().map(|p| p.teardown());
    drop(ptp);
    drop(lab);

    let mut medians = Map::new();
    let mut spread = Map::new();
    let mut samples = Map::new();
    for config in CONFIGS {
        let col = |key: &str| -> Vec<f64> {
            rounds
                .iter()
                .filter_map(|row| row.get(config.name()).and_then(|s| s.figure(key)))
                .collect()
        };
        let p50 = rounds
            .iter()
            .filter_map(|row| row.get(config.name()).and_then(|s| s.latency_p50_usec))
            .collect::<Vec<_>>();
        let mut m = Map::new();
        let mut sp = Map::new();
        let mut s = Map::new();
        for (key, digits, _) in FIGURES {
            let values = col(key);
            m.insert(key.into(), json!(median(&values).map(|v| round(v, digits))));
            sp.insert(key.into(), util::spread(&values, digits));
            s.insert(
                key.into(),
                json!(values.iter().map(|v| round(*v, digits)).collect::<Vec<_>>()),
            );
        }
        m.insert(
            "latency_p50_usec".into(),
            json!(median(&p50).map(|v| round(v, 3))),
        );
        s.insert("latency_p50_usec".into(), json!(p50));
        let errs = |f: fn(&Sample) -> Option<u64>| -> Vec<Option<u64>> {
            rounds
                .iter()
                .map(|row| row.get(config.name()).and_then(f))
                .collect()
        };
        s.insert("connrate_errors".into(), json!(errs(|s| s.conn_errors)));
        s.insert(
            "connrate_fork_errors".into(),
            json!(errs(|s| s.conn_fork_errors)),
        );
        if config == Config::Iptables10k {
            let load: Vec<f64> = rounds
                .iter()
                .filter_map(|row| row.get(config.name()).and_then(|s| s.iptables_load_ms))
                .collect();
            s.insert("iptables_load_ms".into(), json!(load));
        }
        medians.insert(config.name().into(), Value::Object(m));
        spread.insert(config.name().into(), Value::Object(sp));
        samples.insert(config.name().into(), Value::Object(s));
    }

    // The same overheads within each round (paired with that round's `none`), to show
    // whether a difference between medians is consistent or noise.
    let pct = |base: Option<f64>, x: Option<f64>, slower_is_higher: bool| match (base, x) {
        (Some(b), Some(x)) if b > 0.0 => {
            let d = if slower_is_higher { x - b } else { b - x };
            Some(round(d / b * 100.0, 2))
        }
        _ => None,
    };
    let per_round: Vec<Value> = rounds
        .iter()
        .map(|row| {
            let none = row.get("none").cloned().unwrap_or_default();
            let mut m = Map::new();
            for config in &CONFIGS[1..] {
                let s = row.get(config.name()).cloned().unwrap_or_default();
                m.insert(
                    config.name().into(),
                    json!({
                        "latency_pct": pct(none.latency_usec, s.latency_usec, true),
                        "connrate_pct": pct(none.connrate_per_s, s.connrate_per_s, false),
                        "connrate_fork_pct": pct(none.connrate_fork_per_s, s.connrate_fork_per_s, false),
                        "throughput_pct": pct(none.throughput_gbit_s, s.throughput_gbit_s, false),
                        "throughput_p4_pct": pct(none.throughput_p4_gbit_s, s.throughput_p4_gbit_s, false),
                    }),
                );
            }
            Value::Object(m)
        })
        .collect();
    // Every configuration against that round's `ptp`: x / ptp per figure.
    let per_round_ptp: Vec<Value> = rounds
        .iter()
        .map(|row| {
            let base = row.get("ptp").cloned().unwrap_or_default();
            let mut m = Map::new();
            for config in CONFIGS.iter().filter(|c| **c != Config::Ptp) {
                let s = row.get(config.name()).cloned().unwrap_or_default();
                let ratios: Map<String, Value> = FIGURES
                    .iter()
                    .map(|(key, _, _)| {
                        let r = match (s.figure(key), base.figure(key)) {
                            (Some(x), Some(b)) if b > 0.0 => Some(round(x / b, 4)),
                            _ => None,
                        };
                        (key.to_string(), json!(r))
                    })
                    .collect();
                m.insert(config.name().into(), Value::Object(ratios));
            }
            Value::Object(m)
        })
        .collect();

    let sockperf_client = traffic::sockperf_client_args(&client, &server, args.secs);
    let iperf_client = traffic::iperf_client_args(&client, &server, args.secs, 1);
    let iperf_client_p4 = traffic::iperf_client_args(&client, &server, args.secs, P_STREAMS);
    Ok(json!({
        "rounds": args.rounds,
        "round_orders": orders,
        "durations_s": {
            "latency": args.secs,
            "connrate": args.secs,
            "connrate_fork": args.secs,
            "connrate_warmup": 0.3,
            "throughput": args.secs,
            "throughput_p4": args.secs,
        },
        "entries": entries,
        "medians": medians,
        "spread": spread,
        "samples": samples,
        "per_round_overheads_vs_none_pct": per_round,
        "per_round_ratios_vs_ptp": per_round_ptp,
        "ptp": ptp_report.map(|mut r| {
            r["left_behind"] = ptp_left.unwrap_or(Value::Null);
            r
        }),
        "errors": errors,
        "commands": {
            "latency_server": format!(
                "ip netns exec {} sockperf server --tcp -i {} -p {}",
                server.netns, server.v4, traffic::SOCKPERF_PORT
            ),
            "latency_client": format!("ip {}", sockperf_client.join(" ")),
            "latency_value": "sockperf 'Summary: Latency is X usec' (avg of half round trips)",
            "throughput_server": format!(
                "ip netns exec {} iperf3 -s -B {} -p {}",
                server.netns, server.v4, traffic::IPERF_PORT
            ),
            "throughput_client": format!("ip {}", iperf_client.join(" ")),
            "throughput_p4_client": format!("ip {}", iperf_client_p4.join(" ")),
            "throughput_value": "end.sum_received.bits_per_second / 1e9 (all streams)",
            "connrate": format!(
                "Rust loop in the client pod's netns, sequential for {} s after a 0.3 s \
                 warm-up: connect to {}:{}, send 1 byte, read the echo, close; server: one \
                 thread in the server pod, blocking accept, echo 1 byte, close. Both pods: \
                 net.ipv4.ip_local_port_range='1024 65535', net.ipv4.tcp_tw_reuse=1",
                args.secs, server.v4, traffic::CONN_PORT
            ),
            "connrate_fork": format!(
                "forking client: a loop in the client pod's netns spawns `/proc/self/exe \
                 connect-once {}:{}` (this binary: connect, send 1 byte, read the echo, close, \
                 exit) and waits for it, sequentially, for {} s after a 0.3 s warm-up; the \
                 same server",
                server.v4, traffic::CONN_PORT, args.secs
            ),
            "ptp": format!(
                "two other pods (client, server) created by {}/ptp with host-local IPAM \
                 (CNI_COMMAND=ADD, CNI_NETNS=/run/netns/mbp<pid>-<name>, CNI_IFNAME=eth0, \
                 CNI_PATH={}, the conflist under ptp.conflist on stdin; subnet {}, ipMasq \
                 false, MTU 1500: kindnet's datapath), nothing attached, the same servers and \
                 clients and sysctls; DEL and namespace removal at the end (ptp.left_behind)",
                traffic::REFERENCE_PLUGINS,
                traffic::REFERENCE_PLUGINS,
                traffic::PTP_SUBNET
            ),
            "iptables_10k": format!(
                "iptables-restore -w --noflush with '-A FORWARD -m conntrack --ctstate \
                 ESTABLISHED,RELATED -m comment --comment {tag} -j ACCEPT' then {n} x '-A \
                 FORWARD -s 10.255.X.Y/32 -m comment --comment {tag} -j DROP'; removed \
                 after each measurement with one iptables-restore batch of -D lines",
                tag = format!("{}-<pid>", util::IPTABLES_TAG),
                n = args.iptables_rules
            ),
            "moat": format!("moat_to_container/moat_from_container attached to both pods' \
                     host-side veths by {:?} (--attach; the default is what moat-cni does by \
                     default, tc clsact + cls_bpf); the other datapath's attachment is removed. Endpoint lookup hints \
                     (ENDPOINT_FLAG_NO_DENY/NO_RANGES/NO_CIDR) are set as moatd sets them, from \
                     the entries each policy id has in that datapath's maps, filler included \
                     (see entries.*.endpoint_lookup_hints)", args.attach),
        },
    }))
}

fn measure_config(
    config: Config,
    setup: &traffic::Setup,
    secs: u64,
    round_index: usize,
    metric: Metric,
    errors: &mut Vec<Value>,
) -> Sample {
    let mut sample = Sample::default();
    let mut record = |metric: &str, e: anyhow::Error| {
        eprintln!(
            "moat-bench: {} round {} {metric}: {e:#}",
            config.name(),
            round_index + 1
        );
        errors.push(json!({
            "round": round_index + 1,
            "config": config.name(),
            "metric": metric,
            "error": format!("{e:#}"),
        }));
    };
    let applied = match traffic::apply(config, setup) {
        Ok(a) => a,
        Err(e) => {
            record("setup", e);
            return sample;
        }
    };
    if let Some(ipt) = &applied.iptables {
        sample.iptables_load_ms = Some(round(ipt.load_ms, 1));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (client, server) = match setup.pods(config) {
        Ok(pair) => pair,
        Err(e) => {
            record("setup", e);
            return sample;
        }
    };
    if let Err(e) = traffic::probe(client, server) {
        record("probe", e);
        return sample;
    }
    match metric {
        Metric::Latency => match traffic::latency(client, server, secs) {
            Ok(l) => {
                sample.latency_usec = Some(l.avg_usec);
                sample.latency_p50_usec = l.p50_usec;
            }
            Err(e) => record("latency", e),
        },
        Metric::Connrate => match traffic::connrate(client, server, secs) {
            Ok(c) => {
                sample.connrate_per_s = Some(c.per_second);
                sample.conn_errors = Some(c.errors);
            }
            Err(e) => record("connrate", e),
        },
        Metric::ConnrateFork => match traffic::connrate_fork(client, server, secs) {
            Ok(c) => {
                sample.connrate_fork_per_s = Some(c.per_second);
                sample.conn_fork_errors = Some(c.errors);
            }
            Err(e) => record("connrate_fork", e),
        },
        Metric::Throughput => match traffic::throughput(client, server, secs, 1) {
            Ok(t) => sample.throughput_gbit_s = Some(t),
            Err(e) => record("throughput", e),
        },
        Metric::ThroughputP4 => match traffic::throughput(client, server, secs, P_STREAMS) {
            Ok(t) => sample.throughput_p4_gbit_s = Some(t),
            Err(e) => record("throughput_p4", e),
        },
    }
    drop(applied);
    sample
}

// ---------------------------------------------------------------------------------------------
// Summary, targets, output
// ---------------------------------------------------------------------------------------------

fn get_f64(v: &Value, path: &str) -> Option<f64> {
    v.pointer(path).and_then(Value::as_f64)
}

/// Overhead of `config` vs `none` in percent, positive when worse: the median over rounds of
/// the overhead within each round (each figure paired with that round's `none`, measured
/// seconds apart), which a burst on the shared machine moves far less than a ratio of
/// medians taken minutes apart.
fn overhead(section: &Map<String, Value>, config: &str, metric: &str) -> Option<f64> {
    let key = match metric {
        "latency_usec" => "latency_pct",
        "connrate_per_s" => "connrate_pct",
        "connrate_fork_per_s" => "connrate_fork_pct",
        "throughput_p4_gbit_s" => "throughput_p4_pct",
        _ => "throughput_pct",
    };
    let rounds = section
        .get("traffic")?
        .get("per_round_overheads_vs_none_pct")?
        .as_array()?;
    let paired: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.get(config)?.get(key)?.as_f64())
        .collect();
    median(&paired).map(|m| round(m, 2))
}

/// `config`'s figure over `ptp`'s, paired within each round (x / ptp, both measured seconds
/// apart): the median over rounds.
fn ratio_vs_ptp(section: &Map<String, Value>, config: &str, figure: &str) -> Option<f64> {
    median(&paired_vs_ptp(section, config, figure)).map(|m| round(m, 3))
}

fn paired_vs_ptp(section: &Map<String, Value>, config: &str, figure: &str) -> Vec<f64> {
    section
        .get("traffic")
        .and_then(|t| t.get("per_round_ratios_vs_ptp"))
        .and_then(Value::as_array)
        .map(|rounds| {
            rounds
                .iter()
                .filter_map(|r| r.get(config)?.get(figure)?.as_f64())
                .collect()
        })
        .unwrap_or_default()
}

/// The short names of the traffic figures in the summary keys.
const FIGURE_SHORT: [(&str, &str); 5] = [
    ("latency_usec", "latency"),
    ("connrate_per_s", "connrate"),
    ("connrate_fork_per_s", "connrate_fork"),
    ("throughput_gbit_s", "throughput"),
    ("throughput_p4_gbit_s", "throughput_p4"),
];

/// Ratios against ptp (section "ratios_vs_ptp", the `*_vs_ptp` keys) and the targets
/// with 100k entries (`targets_vs_ptp`): reported, never asserted.
fn summarize_vs_ptp(section: &mut Map<String, Value>) {
    let medians = section
        .get("traffic")
        .and_then(|t| t.get("medians"))
        .cloned()
        .unwrap_or(Value::Null);
    let mut by_config = Map::new();
    for (config, short_config) in [
        ("moat_1", "1"),
        ("moat_100k", "100k"),
        ("moat_100k_host_stack", "100k_host_stack"),
        ("none", "none"),
        ("iptables_10k", "iptables_10k"),
    ] {
        let mut figures = Map::new();
        for (figure, short) in FIGURE_SHORT {
            let paired = paired_vs_ptp(section, config, figure);
            let of_medians = match (
                get_f64(&medians, &format!("/{config}/{figure}")),
                get_f64(&medians, &format!("/ptp/{figure}")),
            ) {
                (Some(x), Some(b)) if b > 0.0 => Some(round(x / b, 3)),
                _ => None,
            };
            let min = paired.iter().copied().reduce(f64::min).map(|v| round(v, 3));
            let max = paired.iter().copied().reduce(f64::max).map(|v| round(v, 3));
            figures.insert(
                short.into(),
                json!({
                    "median": median(&paired).map(|m| round(m, 3)),
                    "min": min,
                    "max": max,
                    "rounds": paired.len(),
                    "ratio_of_medians": of_medians,
                }),
            );
            if ["moat_1", "moat_100k", "moat_100k_host_stack"].contains(&config) {
                section.insert(
                    format!("{short}_ratio_{short_config}_vs_ptp"),
                    json!(ratio_vs_ptp(section, config, figure)),
                );
            }
        }
        by_config.insert(config.into(), Value::Object(figures));
    }
    section.insert(
        "ratios_vs_ptp".into(),
        json!({
            "definition": "x / ptp for every figure (latency: lower is better, so a ratio \
                           above 1 is slower than ptp; connections/s and throughput: higher is \
                           better, a ratio below 1 is slower than ptp), computed within each \
                           round (the figures seconds apart), then the median, min and max \
                           over rounds; ratio_of_medians is the ratio of the two medians",
            "ptp": "two pods wired by the reference ptp plugin + host-local (kindnet's \
                    datapath), no policy enforcement, measured in the same interleaved rounds",
            "by_config": by_config,
        }),
    );

    let mut targets = Map::new();
    let mut all_met = true;
    for (config, path) in [
        (
            "moat_100k",
            "direct delivery (moatd's default --local-delivery direct), 100k entries",
        ),
        (
            "moat_100k_host_stack",
            "host stack (--local-delivery host-stack), 100k entries",
        ),
    ] {
        let mut t = Map::new();
        for (figure, short) in FIGURE_SHORT {
            let (lower_is_better, limit) = if figure == "latency_usec" {
                (true, 1.02)
            } else {
                (false, 0.97)
            };
            let paired = paired_vs_ptp(section, config, figure);
            let value = median(&paired).map(|m| round(m, 3));
            let met = value.map(|v| {
                if lower_is_better {
                    v <= limit
                } else {
                    v >= limit
                }
            });
            all_met &= met == Some(true);
            t.insert(
                short.into(),
                json!({
                    "value": value,
                    "limit": format!("{} {limit}", if lower_is_better { "<=" } else { ">=" }),
                    "met": met,
                    "min": paired.iter().copied().reduce(f64::min).map(|v| round(v, 3)),
                    "max": paired.iter().copied().reduce(f64::max).map(|v| round(v, 3)),
                }),
            );
        }
        t.insert("path".into(), json!(path));
        targets.insert(config.into(), Value::Object(t));
    }
    targets.insert("all_met".into(), json!(all_met));
    targets.insert(
        "note".into(),
        json!(
            "issue 21: with 100k entries, connections/s (both clients) and throughput (one \
               and four streams) >= 0.97x ptp, latency <= 1.02x ptp, in both paths; value = \
               median over rounds of the paired ratio (see ratios_vs_ptp); met is null when \
               not measured. Reported, not asserted: on a shared 2-core machine a few percent \
               is within the noise (see min/max)"
        ),
    );
    section.insert("targets_vs_ptp".into(), Value::Object(targets));
}

fn summarize(section: &mut Map<String, Value>) {
    summarize_vs_ptp(section);
    let v = Value::Object(section.clone());
    let cost_new = get_f64(&v, "/per_packet/new_flow/ratio_100k_vs_1");
    let cost_est = get_f64(&v, "/per_packet/established/ratio_100k_vs_1");
    let lat = overhead(section, "moat_100k", "latency_usec");
    let conn = overhead(section, "moat_100k", "connrate_per_s");
    let tput = overhead(section, "moat_100k", "throughput_gbit_s");
    let ipt = overhead(section, "iptables_10k", "latency_usec");
    let host_stack = "moat_100k_host_stack";
    let lat_hs = overhead(section, host_stack, "latency_usec");
    let conn_hs = overhead(section, host_stack, "connrate_per_s");
    let tput_hs = overhead(section, host_stack, "throughput_gbit_s");
    section.insert("cost_ratio_100k_vs_1".into(), json!(cost_new));
    // The last configuration: 1,000 ClusterNetworkPolicies against none.
    let tiers = v
        .pointer("/cluster_policy_per_packet/configurations")
        .and_then(|c| c.as_array())
        .and_then(|c| c.last())
        .and_then(|c| c.get("ratio_vs_none"))
        .and_then(|r| r.as_f64());
    section.insert(
        "cost_ratio_1000_cluster_policies_vs_none".into(),
        json!(tiers),
    );
    let detection = v
        .pointer("/threat_detection_per_packet/new_flow/ratio_on_vs_off")
        .and_then(|r| r.as_f64());
    section.insert(
        "cost_ratio_threat_detection_on_vs_off".into(),
        json!(detection),
    );
    let fqdn_p99 = v
        .pointer("/fqdn/dns_answer_latency/p99_ratio_on_vs_off")
        .and_then(|r| r.as_f64());
    section.insert("fqdn_dns_p99_ratio_on_vs_off".into(), json!(fqdn_p99));
    section.insert("cost_ratio_established_100k_vs_1".into(), json!(cost_est));
    section.insert("latency_overhead_pct_100k".into(), json!(lat));
    section.insert("connrate_overhead_pct_100k".into(), json!(conn));
    section.insert("throughput_overhead_pct_100k".into(), json!(tput));
    section.insert("iptables_10k_latency_overhead_pct".into(), json!(ipt));
    section.insert("latency_overhead_pct_100k_host_stack".into(), json!(lat_hs));
    section.insert(
        "connrate_overhead_pct_100k_host_stack".into(),
        json!(conn_hs),
    );
    section.insert(
        "throughput_overhead_pct_100k_host_stack".into(),
        json!(tput_hs),
    );

    let mut all = Map::new();
    for config in ["moat_1", "moat_100k", host_stack, "iptables_10k", "ptp"] {
        all.insert(
            config.into(),
            json!({
                "latency_pct": overhead(section, config, "latency_usec"),
                "connrate_pct": overhead(section, config, "connrate_per_s"),
                "connrate_fork_pct": overhead(section, config, "connrate_fork_per_s"),
                "throughput_pct": overhead(section, config, "throughput_gbit_s"),
                "throughput_p4_pct": overhead(section, config, "throughput_p4_gbit_s"),
            }),
        );
    }
    section.insert(
        "overheads_vs_none_pct".into(),
        json!({
            "definition": "latency: (x - none) / none * 100; connrate and throughput: \
                           (none - x) / none * 100; computed within each round (every \
                           configuration measured one metric after another, seconds apart), \
                           then the median over rounds; positive = slower",
            "local_delivery": "moat_1 and moat_100k run moatd's default, --local-delivery \
                               direct: once both perimeters admitted a TCP connection between \
                               the two pods, the sender's hook forwards its packets straight \
                               into the receiving pod; moat_100k_host_stack is moat_100k with \
                               --local-delivery host-stack, every packet through the host's \
                               stack (the filter's cost alone)",
            "by_config": all,
        }),
    );

    let target = |value: Option<f64>, limit: f64, unit: &str| match value {
        Some(x) => json!({"value": x, "limit": format!("<= {limit}{unit}"), "pass": x <= limit}),
        None => json!({"value": null, "limit": format!("<= {limit}{unit}"), "pass": false,
                       "error": "not measured (see errors)"}),
    };
    section.insert(
        "targets".into(),
        json!({
            "cost_ratio_100k_vs_1": target(cost_new, 1.1, ""),
            "cost_ratio_1000_cluster_policies_vs_none": target(tiers, 1.1, ""),
            "cost_ratio_threat_detection_on_vs_off": target(detection, 1.02, ""),
            // "No measurable difference" (issue 19), read as: within 10% at p99, an allowance
            // for the noise of these shared machines (p99 of 2,000 queries a configuration).
            "fqdn_dns_p99_ratio_on_vs_off": target(fqdn_p99, 1.1, ""),
            "latency_overhead_pct_100k": target(lat, 3.0, "%"),
            "connrate_overhead_pct_100k": target(conn, 5.0, "%"),
            "throughput_overhead_pct_100k": target(tput, 3.0, "%"),
        }),
    );
}

fn write_merged(path: &Path, datapath: Value) -> Result<()> {
    let mut root = match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            _ => {
                eprintln!(
                    "moat-bench: {} is not a JSON object; starting a new one",
                    path.display()
                );
                Map::new()
            }
        },
        Err(_) => Map::new(),
    };
    root.insert("datapath".into(), datapath);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&Value::Object(root))? + "\n",
    )?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "error".into())
}

fn print_table(section: &Map<String, Value>) {
    let v = Value::Object(section.clone());
    println!();
    if let Some(pp) = v.get("per_packet") {
        println!(
            "Per-packet cost, BPF_PROG_TEST_RUN (ns/packet, median of {} batches x {} runs)",
            pp.get("batches").and_then(Value::as_u64).unwrap_or(0),
            pp.get("repeat").and_then(Value::as_u64).unwrap_or(0)
        );
        println!(
            "  {:<12} {:>10} {:>14} {:>8}",
            "case", "1 entry", "100k entries", "ratio"
        );
        for case in ["established", "new_flow"] {
            println!(
                "  {:<12} {:>10} {:>14} {:>8}",
                case,
                fmt(get_f64(pp, &format!("/{case}/ns_per_packet_1")), 1),
                fmt(get_f64(pp, &format!("/{case}/ns_per_packet_100k")), 1),
                fmt(get_f64(pp, &format!("/{case}/ratio_100k_vs_1")), 3),
            );
        }
        if let Some(e) = pp.get("error") {
            println!("  error: {e}");
        }
    }
    if let Some(t) = v.get("traffic") {
        // Configurations left out (--configs) or never measured have no row.
        let measured = |name: &str| {
            FIGURES.iter().any(|(figure, _, _)| {
                get_f64(t, &format!("/spread/{name}/{figure}/n")).unwrap_or(0.0) > 0.0
            })
        };
        println!(
            "\nPod-to-pod traffic (median of {} interleaved rounds, {} s per measurement)",
            t.get("rounds").and_then(Value::as_u64).unwrap_or(0),
            get_f64(t, "/durations_s/latency").unwrap_or(0.0)
        );
        println!(
            "  {:<21} {:>11} {:>9} {:>10} {:>9} {:>9} {:>9}",
            "config", "latency us", "ovh %", "conn/s", "ovh %", "Gbit/s", "ovh %"
        );
        for config in CONFIGS {
            let name = config.name();
            if !measured(name) {
                continue;
            }
            let m = |metric: &str| get_f64(t, &format!("/medians/{name}/{metric}"));
            let o = |metric: &str| {
                if config == Config::None {
                    "-".to_string()
                } else {
                    fmt(overhead(section, name, metric), 2)
                }
            };
            println!(
                "  {:<21} {:>11} {:>9} {:>10} {:>9} {:>9} {:>9}",
                name,
                fmt(m("latency_usec"), 2),
                o("latency_usec"),
                fmt(m("connrate_per_s"), 0),
                o("connrate_per_s"),
                fmt(m("throughput_gbit_s"), 2),
                o("throughput_gbit_s"),
            );
        }
        println!(
            "\n  {:<21} {:>12} {:>9} {:>12} {:>9}   (spread: min..max over rounds)",
            "config", "fork conn/s", "ovh %", "Gbit/s -P4", "ovh %"
        );
        for config in CONFIGS {
            let name = config.name();
            if !measured(name) {
                continue;
            }
            let m = |metric: &str| get_f64(t, &format!("/medians/{name}/{metric}"));
            let o = |metric: &str| {
                if config == Config::None {
                    "-".to_string()
                } else {
                    fmt(overhead(section, name, metric), 2)
                }
            };
            println!(
                "  {:<21} {:>12} {:>9} {:>12} {:>9}",
                name,
                fmt(m("connrate_fork_per_s"), 0),
                o("connrate_fork_per_s"),
                fmt(m("throughput_p4_gbit_s"), 2),
                o("throughput_p4_gbit_s"),
            );
        }
        println!("\n  Spread over rounds (min..max)");
        for config in CONFIGS {
            let name = config.name();
            if !measured(name) {
                continue;
            }
            let range = |metric: &str, digits: usize| {
                format!(
                    "{}..{}",
                    fmt(get_f64(t, &format!("/spread/{name}/{metric}/min")), digits),
                    fmt(get_f64(t, &format!("/spread/{name}/{metric}/max")), digits)
                )
            };
            println!(
                "  {:<21} lat {} us, conn/s {}, fork {}, Gbit/s {}, -P4 {}",
                name,
                range("latency_usec", 2),
                range("connrate_per_s", 0),
                range("connrate_fork_per_s", 0),
                range("throughput_gbit_s", 2),
                range("throughput_p4_gbit_s", 2),
            );
        }
        if let Some(errors) = t.get("errors").and_then(Value::as_array)
            && !errors.is_empty()
        {
            println!(
                "  {} measurement error(s), see traffic.errors",
                errors.len()
            );
        }
    }
    if let Some(targets) = v.get("targets").and_then(Value::as_object) {
        println!("\nTargets");
        for (name, t) in targets {
            println!(
                "  {:<30} {:>8} {:>8}  {}",
                name,
                fmt(t.get("value").and_then(Value::as_f64), 3),
                t.get("limit").and_then(Value::as_str).unwrap_or(""),
                if t.get("pass").and_then(Value::as_bool) == Some(true) {
                    "PASS"
                } else {
                    "FAIL"
                }
            );
        }
    }
    if let Some(targets) = v.get("targets_vs_ptp").and_then(Value::as_object) {
        println!("\nAgainst ptp (x / ptp, median over rounds of the paired ratio [min..max])");
        for config in ["moat_100k", "moat_100k_host_stack"] {
            let Some(t) = targets.get(config) else {
                continue;
            };
            for (_, short) in FIGURE_SHORT {
                let f = |k: &str| get_f64(t, &format!("/{short}/{k}"));
                println!(
                    "  {:<21} {:<14} {:>7} [{}..{}] {:>7}  {}",
                    config,
                    short,
                    fmt(f("value"), 3),
                    fmt(f("min"), 3),
                    fmt(f("max"), 3),
                    t.pointer(&format!("/{short}/limit"))
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    match t.pointer(&format!("/{short}/met")).and_then(Value::as_bool) {
                        Some(true) => "met",
                        Some(false) => "missed",
                        None => "not measured",
                    }
                );
            }
        }
    }
    if let Some(e) = v.get("fatal_error") {
        println!("\nFATAL: {e}");
    }
}
