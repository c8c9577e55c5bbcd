//! moat-conformance: runs the shared NetworkPolicy conformance cases (upstream Kubernetes
//! netpol e2e and cyclonus) against Moat.
//!
//! Default: on this node, with real pods (network namespaces), a private moatd owning the eBPF
//! datapath, real echo listeners and real probes through per-pod ClusterIP Services (iptables
//! DNAT). `--direct` probes pod IPs instead; `--offline` judges every probe with the pure
//! engine (no kernel; SCTP included). `--kube` runs them on the cluster of KUBECONFIG (Moat
//! installed; see kube_mode.rs and kind-tests/). The last line is always `N passed, M failed, K skipped`.

mod cases;
mod cleanup;
mod kube_mode;
mod live;
mod offline;
mod report;

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::{
    cases::CaseFile,
    live::{LiveOptions, Node},
    report::{CaseResult, Report},
};

const DEFAULT_CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/cases/netpol-cases.json");

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Runs NetworkPolicy conformance cases (netpol-cases/v1) against Moat's datapath or its pure engine"
)]
struct Args {
    /// Case file (netpol-cases/v1). Default: <repo>/conformance/cases/netpol-cases.json.
    #[arg(long)]
    cases: Option<PathBuf>,
    /// Probe pod IPs instead of per-pod ClusterIP Services.
    #[arg(long, conflicts_with = "offline")]
    direct: bool,
    /// Every Service's backend on another node: two node namespaces (own uplink, routes and
    /// moatd each), every pod with a twin on the second node, and each pod's Service DNATed
    /// on the first node to that twin; probes start on the first node.
    #[arg(long, conflicts_with_all = ["offline", "direct", "kube"])]
    remote_backends: bool,
    /// Probe the pods' IPv6 addresses (direct only): IP placeholders in policies become the
    /// pods' IPv6 addresses (a /32 after one becomes /128).
    #[arg(long, requires = "direct")]
    ipv6: bool,
    /// Judge every probe with the pure policy engine only (no kernel, SCTP included).
    #[arg(long)]
    offline: bool,
    /// Run on the Kubernetes cluster of KUBECONFIG (Moat installed): namespaces x, y, z,
    /// pods, Services and policies through the API, probes with kubectl exec.
    #[arg(long, conflicts_with = "offline")]
    kube: bool,
    #[command(flatten)]
    kube_args: kube_mode::KubeArgs,
    /// Write a JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Run only cases whose id or name contains this (repeatable: any of them).
    #[arg(long)]
    filter: Vec<String>,
    /// Probes in flight at once.
    #[arg(long, default_value_t = 48)]
    parallel: usize,
    /// Probe timeout in milliseconds (what a denied probe waits; an allowed probe that misses
    /// it is retried once with max(5x, 2s)).
    #[arg(long, default_value_t = 400)]
    timeout_ms: u64,
    /// moatd binary. Default: next to this binary (or one directory up, for test binaries).
    #[arg(long)]
    moatd: Option<PathBuf>,
    /// Put every probe (not only failures) in the JSON report.
    #[arg(long)]
    report_all: bool,
}

fn default_moatd() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for candidate in [dir.join("moatd"), dir.join("../moatd")] {
        if candidate.is_file() {
            return candidate;
        }
    }
    dir.join("moatd")
}

fn cases_path(args: &Args) -> PathBuf {
    match &args.cases {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from(DEFAULT_CASES);
            p.canonicalize().unwrap_or(p)
        }
    }
}

fn run(args: Args) -> Result<bool> {
    let path = cases_path(&args);
    let file = CaseFile::load(&path)?;
    let selected = cases::select(&file.cases, &args.filter);
    if selected.is_empty() {
        bail!("no case matches the filters {:?}", args.filter);
    }
    let served = file.served_union();
    let start = Instant::now();
    let mode = if args.offline {
        "offline (pure engine)"
    } else if args.kube && args.direct {
        "kubernetes, direct to pod IPs"
    } else if args.kube {
        "kubernetes, through per-pod ClusterIP Services"
    } else if args.direct && args.ipv6 {
        "datapath, direct to pod IPv6 addresses"
    } else if args.direct {
        "datapath, direct to pod IPs"
    } else if args.remote_backends {
        "datapath, two nodes, through per-pod ClusterIP Services to backends on the other node"
    } else {
        "datapath, through per-pod ClusterIP Services"
    };
    println!(
        "moat-conformance: {} case(s) of {} from {} [{mode}]",
        selected.len(),
        file.cases.len(),
        path.display()
    );

    let mut results: Vec<CaseResult> = Vec::new();
    let mut setup = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut keep_dir = None;
    if args.offline {
        for case in &selected {
            let r = offline::run_case(&file, case, &served, args.report_all);
            println!("{}", r.line());
            results.push(r);
        }
    } else if args.kube {
        let opts = kube_mode::KubeOptions::new(
            &args.kube_args,
            args.direct,
            args.parallel,
            Duration::from_millis(args.timeout_ms),
            args.report_all,
        );
        (results, setup) = kube_mode::run(&file, &selected, &args.kube_args, opts)?;
    } else {
        let opts = LiveOptions {
            direct: args.direct,
            remote_backends: args.remote_backends,
            ipv6: args.ipv6,
            parallel: args.parallel.max(1),
            timeout: Duration::from_millis(args.timeout_ms.max(1)),
            moatd: args.moatd.clone().unwrap_or_else(default_moatd),
            keep_all: args.report_all,
        };
        let t = Instant::now();
        let mut node = Node::setup(&file, opts).context("setting up the node")?;
        println!(
            "setup: {:.1}s ({} pods, moatd, listeners{})",
            t.elapsed().as_secs_f64(),
            file.model.pod_order.len(),
            if args.direct { "" } else { ", Services" }
        );
        for case in &selected {
            let r = node.run_case(&file, case);
            println!("{}", r.line());
            let _ = std::io::stdout().flush();
            results.push(r);
        }
        setup = node.setup.clone();
        warnings = node.moatd_warnings();
        let lost = node.events_lost();
        if lost > 0 {
            setup.insert("events_lost".into(), lost.to_string());
        }
        let failed = results.iter().any(|r| !r.ok());
        if failed {
            keep_dir = Some(node.workdir().to_path_buf());
        }
        node.teardown(failed);
    }

    let report = Report::new(
        mode,
        &path.display().to_string(),
        &args.filter,
        setup,
        results,
        start.elapsed(),
    );
    println!();
    println!(
        "mode: {mode}; {} case(s), {} failed case(s){}; {:.1}s",
        report.cases_run,
        report.cases_failed.len(),
        if report.cases_failed.is_empty() {
            String::new()
        } else {
            format!(": {}", report.cases_failed.join(", "))
        },
        start.elapsed().as_secs_f64()
    );
    for (reason, n) in &report.skipped_by_reason {
        println!("skipped {n}: {reason}");
    }
    if report.passed_on_retry > 0 {
        println!(
            "{} probe(s) passed only on their retry",
            report.passed_on_retry
        );
    }
    if !warnings.is_empty() {
        println!("moatd logged {} warning(s):", warnings.len());
        for w in warnings.iter().take(10) {
            println!("  {w}");
        }
    }
    if let Some(dir) = keep_dir {
        println!("work directory kept for inspection: {}", dir.display());
    }
    if let Some(out) = &args.report {
        let body = serde_json::to_vec_pretty(&report)?;
        std::fs::write(out, body).with_context(|| format!("writing {}", out.display()))?;
        println!("report: {}", out.display());
    }
    println!("{}", report.summary_line());
    Ok(report.ok())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let guard = match cleanup::install_signal_handler() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("moat-conformance: {e:#}");
            return ExitCode::from(2);
        }
    };
    let outcome = run(args);
    drop(guard);
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("moat-conformance: {e:#}");
            ExitCode::from(2)
        }
    }
}
