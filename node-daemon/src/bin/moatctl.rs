//! moatctl: the node-level troubleshooting CLI. Talks to moatd's socket (and reads the pinned
//! maps directly for `bpf` dumps). Output follows kubectl: `-o table|wide|json|yaml`, where
//! JSON and YAML are the same structs the table is printed from.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use moat_common::*;
use moat_datapath::{Maps, PinDir};
use moatd::{
    api::{self, Request, Response},
    flows::{FlowFilter, FlowRecord},
};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(version, about = "Moat node troubleshooting CLI")]
struct Args {
    /// moatd's socket.
    #[arg(long, default_value = api::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// bpffs root of the installation (for `bpf` dumps).
    #[arg(long, default_value = moat_datapath::pins::DEFAULT_ROOT, global = true)]
    pin_root: PathBuf,
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Daemon readiness, datastore, endpoints, rejected objects.
    Status,
    /// Endpoints on this node.
    Endpoint {
        #[command(subcommand)]
        what: EndpointCmd,
    },
    /// Identities and their labels.
    Identity {
        #[command(subcommand)]
        what: IdentityCmd,
    },
    /// Policy: the compiled state, one pod's effective rules, or suggestions from learning.
    Policy {
        #[command(subcommand)]
        what: Option<PolicyCmd>,
    },
    /// Re-read the policy directory now; prints the status once applied.
    Reload,
    /// Flow history with the reason and rule of every verdict (like hubble observe).
    Flows {
        #[command(subcommand)]
        what: Option<FlowsCmd>,
        /// Keep printing new flows.
        #[arg(long)]
        follow: bool,
        /// Print the observed workload graph instead (edges counted per verdict).
        #[arg(long, value_enum, conflicts_with = "follow")]
        graph: Option<GraphFormat>,
        /// Read an exported journal file (`flows export`) instead of asking moatd.
        #[arg(long, conflicts_with = "follow")]
        journal: Option<PathBuf>,
        /// dropped | allowed | audit (drop and allow also do)
        #[arg(long)]
        verdict: Option<api::Verdict>,
        /// namespace/name (either side).
        #[arg(long)]
        pod: Option<String>,
        /// Only the last period, e.g. 30s, 10m, 2h.
        #[arg(long)]
        since: Option<String>,
        /// At most this many (the newest).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Would a new connection be allowed, and why (engine, cross-checked with the maps).
    Trace {
        /// namespace/pod or an address
        #[arg(long)]
        from: String,
        /// namespace/pod or an address
        #[arg(long)]
        to: String,
        /// PORT/PROTO, e.g. 80/TCP
        #[arg(long)]
        port: String,
    },
    /// Recent threat detections (port scans, host sweeps, SYN floods, policy probing, DNS
    /// tunnels, spoofing) with their evidence and moatd's response.
    Threats {
        /// At most this many (the newest).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Quarantine a pod of this node (namespace/name): only the new flows moatd's
    /// --quarantine-allow lists (DNS by default) leave it, nothing enters it, and its open
    /// connections are cut. Lasts until `moatctl release`, across moatd restarts.
    Quarantine { pod: String },
    /// End a pod's quarantine (a `moat.io/quarantine: "true"` annotation keeps it).
    Release { pod: String },
    /// FQDN egress: per identity of this node, its name patterns and the addresses the
    /// datapath learned from DNS answers (name, TTL, seconds left).
    Fqdn,
    /// Compare the maps moatd owns entry by entry with the content its datastore asks for
    /// (recomputed from scratch) and list the drift: entries missing, extra or different,
    /// per map (at most 20 listed each). Exit 0: no drift; 1: drift; 2: moatd could not be
    /// asked.
    Verify,
    /// Workloads walking from learn to audit to enforce (MoatPolicy `promotion`): without
    /// arguments, each with its stage and what it waits for; `show`, `pause`, `resume` or
    /// `revert` (one stage back) one of them by its MoatPolicy, namespace/name.
    Promotion {
        #[command(subcommand)]
        what: Option<PromotionCmd>,
    },
    /// Decoded dumps of the datapath maps.
    Bpf {
        #[command(subcommand)]
        what: BpfCmd,
    },
}

#[derive(Subcommand, Debug)]
enum PromotionCmd {
    /// Stage, history and the proposed NetworkPolicy of one workload.
    Show {
        policy: String,
    },
    /// Hold the stage until resumed.
    Pause {
        policy: String,
    },
    Resume {
        policy: String,
    },
    /// One stage back: enforce -> audit, audit -> learn (the proposal is dropped).
    Revert {
        policy: String,
    },
}

#[derive(Subcommand, Debug)]
enum EndpointCmd {
    List,
    /// One endpoint by namespace/name or container id.
    Get {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Identities, rules and map entry counts.
    State,
    /// The effective rules of a pod per direction, each with the rule it came from.
    Get { pod: String },
    /// NetworkPolicy YAML allowing exactly what learn/audit mode observed in a namespace.
    Suggest {
        #[arg(long)]
        namespace: String,
        /// Only flows of the last period, e.g. 10m.
        #[arg(long)]
        since: Option<String>,
    },
    /// Baseline ClusterNetworkPolicy YAML isolating every namespace that received traffic
    /// from the namespaces it was not seen receiving from (cluster-wide, from the journal).
    SuggestBaseline {
        /// Only flows of the last period, e.g. 10m.
        #[arg(long)]
        since: Option<String>,
    },
    /// Replay observed flows against a candidate policy set and list the flows whose verdict
    /// would change. Exit 0: nothing observed newly denied; 1: something would be; 2: the
    /// input is invalid (candidate, cluster directory or journal).
    Check {
        /// Candidate policy YAML: a file, or a directory of them.
        #[arg(short = 'f', long = "filename")]
        candidate: PathBuf,
        /// The objects in force now, as the local datastore reads them (Namespaces, Pods,
        /// NetworkPolicy, MoatPolicy, ClusterNetworkPolicy); the candidate's objects are
        /// added to them or replace those of the same kind and name.
        #[arg(long)]
        cluster: PathBuf,
        /// An exported journal (`flows export`): no moatd needed.
        #[arg(long)]
        journal: Option<PathBuf>,
        /// Only flows of the last period, e.g. 7d.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

#[derive(Subcommand, Debug)]
enum FlowsCmd {
    /// Write the journal's flows to a file as JSON lines (one flow record per line), for
    /// `policy check --journal` and `flows --graph --journal` away from the node.
    Export {
        /// Output file; `-` is standard output.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Only the last period, e.g. 7d, 2h.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum IdentityCmd {
    List,
    Get { id: u32 },
}

#[derive(Subcommand, Debug)]
enum BpfCmd {
    Endpoints,
    Ipcache,
    Policy,
    Conntrack,
    Counters,
}

fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("moatctl: {message}");
    std::process::exit(1);
}

fn call(args: &Args, request: Request) -> Response {
    match api::call(&args.socket, &request, Duration::from_secs(15)) {
        Ok(r) => r,
        Err(api::ClientError::Unreachable { path, source }) => fail(format!(
            "cannot reach moatd at {} ({source}); start it (moatd --help) or pass --socket",
            path.display()
        )),
        Err(e) => fail(e),
    }
}

/// Prints rows as a table (columns chosen by `wide`) or the structs as JSON/YAML.
fn print<T: Serialize>(
    output: Output,
    rows: &[T],
    columns: &[&str],
    wide_columns: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default()),
        Output::Yaml => print!("{}", moat_policy::yaml::to_string(rows)),
        Output::Table | Output::Wide => {
            let count = if output == Output::Wide {
                columns.len() + wide_columns.len()
            } else {
                columns.len()
            };
            let header: Vec<String> = columns
                .iter()
                .chain(wide_columns)
                .take(count)
                .map(|c| c.to_string())
                .collect();
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| cells(r).into_iter().take(count).collect())
                .collect();
            let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
            for row in &body {
                for (i, c) in row.iter().enumerate() {
                    widths[i] = widths[i].max(c.len());
                }
            }
            for row in std::iter::once(&header).chain(&body) {
                let line: Vec<String> = row
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                    .collect();
                println!("{}", line.join("  ").trim_end());
            }
        }
    }
}

/// An answer as JSON, as moatd sent it (its keys sorted, as `-o json` has always printed
/// them).
fn to_value(answer: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(answer).unwrap_or_default()
}

fn print_value(output: Output, value: &serde_json::Value) {
    match output {
        Output::Yaml => print!("{}", moat_policy::yaml::to_string(value)),
        _ => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
    }
}

fn parse_since(text: &str) -> u64 {
    let (num, unit) = text.split_at(text.trim_end_matches(|c: char| c.is_alphabetic()).len());
    let n: u64 = num
        .parse()
        .unwrap_or_else(|_| fail(format!("--since {text:?}: expected e.g. 30s, 10m, 2h")));
    match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => fail(format!("--since {text:?}: unit must be s, m, h or d")),
    }
}

fn flow_cells(f: &FlowRecord) -> Vec<String> {
    let secs = f.time_ms / 1000;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        f.time_ms % 1000
    );
    let src = format!("{}:{}", f.source, f.source_port);
    let dst = format!("{}:{}", f.destination, f.destination_port);
    let (from, to) = match f.direction {
        api::Direction::Ingress => (f.peer.clone(), f.endpoint.clone()),
        api::Direction::Egress => (f.endpoint.clone(), f.peer.clone()),
    };
    vec![
        time,
        f.verdict.name().to_uppercase(),
        from.unwrap_or_else(|| src.clone()),
        to.unwrap_or_else(|| dst.clone()),
        f.protocol.clone(),
        f.destination_port.to_string(),
        f.reason.clone(),
        f.rule.clone(),
        src,
        dst,
        f.direction.to_string(),
        f.mode.to_string(),
        f.rule_id.to_string(),
    ]
}

const FLOW_COLUMNS: &[&str] = &[
    "TIME", "VERDICT", "FROM", "TO", "PROTO", "PORT", "REASON", "RULE",
];
const FLOW_WIDE: &[&str] = &["SOURCE", "DESTINATION", "DIRECTION", "MODE", "RULE-ID"];

fn flows(args: &Args, follow: bool, filter: FlowFilter) {
    if follow {
        return follow_flows(args, filter);
    }
    let records = fetch_flows(args, filter);
    print(args.output, &records, FLOW_COLUMNS, FLOW_WIDE, flow_cells);
}

fn fetch_flows(args: &Args, filter: FlowFilter) -> Vec<FlowRecord> {
    match call(args, Request::Flows { filter }) {
        Response::Flows { flows } => flows,
        other => fail(format!("unexpected answer {other:?}")),
    }
}

/// An exported journal file's records that `filter` takes (its age, verdict and pod tests;
/// `limit` keeps the newest).
fn read_journal_file(
    path: &std::path::Path,
    filter: &FlowFilter,
) -> Result<Vec<FlowRecord>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut records = moatd::flow_export::read(std::io::BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let now = moatd::flows::now_ms();
    records.retain(|r| filter.matches(r, now));
    if let Some(limit) = filter.limit
        && records.len() > limit
    {
        records.drain(..records.len() - limit);
    }
    Ok(records)
}

/// `flows export`: what moatd's journal holds, as JSON lines.
fn export_flows(args: &Args, file: &std::path::Path, filter: FlowFilter) {
    let records = fetch_flows(args, filter);
    let written = if file == std::path::Path::new("-") {
        moatd::flow_export::write(&mut std::io::stdout().lock(), &records)
    } else {
        std::fs::File::create(file)
            .and_then(|f| moatd::flow_export::write(&mut std::io::BufWriter::new(f), &records))
    };
    if let Err(e) = written {
        fail(format!("{}: {e}", file.display()));
    }
    if file != std::path::Path::new("-") {
        eprintln!("exported {} flows to {}", records.len(), file.display());
    }
}

fn print_graph(format: GraphFormat, records: &[FlowRecord]) {
    let graph = moatd::flow_graph::WorkloadGraph::from_records(records);
    match format {
        GraphFormat::Dot => print!("{}", graph.to_dot()),
        GraphFormat::Mermaid => print!("{}", graph.to_mermaid()),
    }
}

/// `policy check` cannot judge its input: exit 2, so that a pipeline tells a broken
/// candidate (or journal, or moatd out of reach) from one that would deny flows (exit 1).
fn invalid(problems: &[String]) -> ! {
    eprintln!("moatctl: policy check: invalid input:");
    for p in problems {
        eprintln!("  {p}");
    }
    std::process::exit(2);
}

fn policy_check(
    args: &Args,
    candidate: &std::path::Path,
    cluster: &std::path::Path,
    journal: Option<&std::path::Path>,
    since: Option<&str>,
) {
    use moatd::policy_check as check;
    let filter = FlowFilter {
        since_secs: since.map(parse_since),
        ..Default::default()
    };
    let candidate = check::read_candidate(candidate).unwrap_or_else(|e| invalid(&e));
    let cluster = check::read_cluster(cluster).unwrap_or_else(|e| invalid(&e));
    let records = match journal {
        Some(path) => read_journal_file(path, &filter).unwrap_or_else(|e| invalid(&[e])),
        None => match api::call(
            &args.socket,
            &Request::Flows { filter },
            Duration::from_secs(15),
        ) {
            Ok(Response::Flows { flows }) => flows,
            Ok(other) => invalid(&[format!("unexpected answer from moatd {other:?}")]),
            Err(e) => invalid(&[format!("{e} (or pass --journal FILE)")]),
        },
    };
    let set = check::candidate_set(cluster, candidate);
    let report = check::check(&set, &records).unwrap_or_else(|e| invalid(&e));
    match args.output {
        Output::Json | Output::Yaml => print_value(args.output, &to_value(&report)),
        Output::Table | Output::Wide => print!("{}", check::render(&report)),
    }
    std::process::exit(report.exit_code());
}

/// `flows --follow`: one `FollowFlows` stream from moatd (the history, then every new
/// record as it is journaled). JSON output is one record per line; a table prints its
/// header with the history and then a row per record.
fn follow_flows(args: &Args, filter: FlowFilter) {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(&args.socket).unwrap_or_else(|e| {
        fail(format!(
            "cannot reach moatd at {} ({e}); start it (moatd --help) or pass --socket",
            args.socket.display()
        ))
    });
    let mut request = serde_json::to_vec(&Request::FollowFlows { filter }).unwrap_or_default();
    request.push(b'\n');
    if let Err(e) = stream.write_all(&request) {
        fail(format!("talking to moatd: {e}"));
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut first = true;
    for line in BufReader::with_capacity(1 << 20, stream).lines() {
        let line = line.unwrap_or_else(|e| fail(format!("reading from moatd: {e}")));
        let response: Response = serde_json::from_str(&line)
            .unwrap_or_else(|e| fail(format!("moatd sent an unreadable answer: {e}")));
        match response {
            Response::Flows { flows } => {
                if first && matches!(args.output, Output::Table | Output::Wide) {
                    // The history as an aligned table (the header too).
                    drop(out);
                    print(args.output, &flows, FLOW_COLUMNS, FLOW_WIDE, flow_cells);
                    out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
                } else {
                    for r in &flows {
                        let written = match args.output {
                            Output::Json => serde_json::to_writer(&mut out, r)
                                .map_err(std::io::Error::from)
                                .and_then(|()| out.write_all(b"\n")),
                            Output::Yaml => {
                                write!(out, "---\n{}", moat_policy::yaml::to_string(r))
                            }
                            Output::Table => writeln!(out, "{}", flow_cells(r)[..8].join("  ")),
                            Output::Wide => writeln!(out, "{}", flow_cells(r).join("  ")),
                        };
                        if written.is_err() {
                            // stdout closed (e.g. `| head`): done.
                            return;
                        }
                    }
                }
                first = false;
                if out.flush().is_err() {
                    return;
                }
            }
            Response::FlowsLost { lost } => {
                eprintln!("moatctl: {lost} flows not shown: this client did not keep up");
            }
            Response::Error { message } => fail(format!("moatd refused: {message}")),
            other => fail(format!("unexpected answer {other:?}")),
        }
    }
    fail("moatd closed the stream (did it stop?)");
}

#[derive(Serialize)]
struct BpfRow {
    key: String,
    value: String,
}

fn bpf(args: &Args, what: &BpfCmd) {
    let pins = PinDir::new(&args.pin_root);
    let maps = Maps::open(&pins).unwrap_or_else(|e| {
        fail(format!(
            "{e}; is moatd running with --pin-root {}?",
            args.pin_root.display()
        ))
    });
    let addr = |family: u8, raw: [u32; 4]| -> IpAddr {
        if family == FAMILY_V4 {
            IpAddr::V4(v4_from_raw(raw[0]))
        } else {
            IpAddr::V6(v6_from_raw(raw))
        }
    };
    let mut rows = Vec::new();
    match what {
        BpfCmd::Endpoints => {
            for (ifindex, e) in maps.endpoints.iter().filter_map(Result::ok) {
                let mut ips: Vec<String> = e.v4[..e.v4_count as usize]
                    .iter()
                    .map(|a| v4_from_raw(*a).to_string())
                    .collect();
                ips.extend(
                    e.v6[..e.v6_count as usize]
                        .iter()
                        .map(|a| v6_from_raw(*a).to_string()),
                );
                rows.push(BpfRow {
                    key: format!("ifindex {ifindex}"),
                    value: format!(
                        "identity {} policy {} mode {} flags {:#x} {}",
                        e.identity,
                        e.policy_id,
                        ["enforce", "audit", "learn"]
                            .get(e.mode as usize)
                            .unwrap_or(&"?"),
                        e.flags,
                        ips.join(",")
                    ),
                });
            }
        }
        BpfCmd::Ipcache => {
            for (k, v) in maps.ipcache_v4.iter().filter_map(Result::ok) {
                rows.push(BpfRow {
                    key: format!(
                        "{}/{}",
                        std::net::Ipv4Addr::from(k.data().addr),
                        k.prefix_len()
                    ),
                    value: format!(
                        "identity {} ifindex {} flags {:#x}",
                        v.identity, v.ifindex, v.flags
                    ),
                });
            }
            for (k, v) in maps.ipcache_v6.iter().filter_map(Result::ok) {
                rows.push(BpfRow {
                    key: format!(
                        "{}/{}",
                        std::net::Ipv6Addr::from(k.data().addr),
                        k.prefix_len()
                    ),
                    value: format!(
                        "identity {} ifindex {} flags {:#x}",
                        v.identity, v.ifindex, v.flags
                    ),
                });
            }
        }
        BpfCmd::Policy => {
            for (k, v) in maps.policy.iter().filter_map(Result::ok) {
                rows.push(BpfRow {
                    key: format!(
                        "policy {} {} remote {} proto {} port {}",
                        k.policy_id,
                        if k.direction == DIRECTION_INGRESS {
                            "ingress"
                        } else {
                            "egress"
                        },
                        if k.remote_identity == IDENTITY_ANY {
                            "*".to_string()
                        } else {
                            k.remote_identity.to_string()
                        },
                        if k.proto == 0 {
                            "*".to_string()
                        } else {
                            k.proto.to_string()
                        },
                        if k.dport == 0 {
                            "*".to_string()
                        } else {
                            k.dport.to_string()
                        },
                    ),
                    value: format!(
                        "{} rule {}",
                        if v.action == ACTION_DENY {
                            "deny"
                        } else {
                            "allow"
                        },
                        v.rule_id
                    ),
                });
            }
        }
        BpfCmd::Conntrack => {
            let now = moatd::server::monotonic_ns();
            for (k, v) in maps.conntrack_entries(None) {
                if v.expires_ns <= now {
                    continue;
                }
                rows.push(BpfRow {
                    key: format!(
                        "ifindex {} {} {}:{} -> {}:{}",
                        k.ifindex,
                        k.proto,
                        addr(k.family, k.saddr),
                        k.sport,
                        addr(k.family, k.daddr),
                        k.dport
                    ),
                    value: format!(
                        "state {} rule {} remote {} expires in {}s{}",
                        v.state,
                        v.rule_id,
                        v.remote_identity,
                        (v.expires_ns - now) / 1_000_000_000,
                        // Linked: the peer pod's hook trusts this endpoint's handoffs.
                        if v.peer_ifindex != 0 {
                            format!(" linked to ifindex {}", v.peer_ifindex)
                        } else {
                            String::new()
                        }
                    ),
                });
            }
        }
        BpfCmd::Counters => {
            for c in maps.counters().unwrap_or_else(|e| fail(e)) {
                rows.push(BpfRow {
                    key: format!(
                        "{} {} {}",
                        ["allow", "drop", "audit"]
                            .get(c.verdict as usize)
                            .unwrap_or(&"?"),
                        reason::name(c.reason),
                        if c.direction == DIRECTION_INGRESS {
                            "ingress"
                        } else {
                            "egress"
                        }
                    ),
                    value: format!("{} packets {} bytes", c.packets, c.bytes),
                });
            }
            for (name, index) in [
                ("events rate-limited", METRIC_EVENTS_RATE_LIMITED),
                ("events lost (ring full)", METRIC_EVENTS_RING_FULL),
            ] {
                rows.push(BpfRow {
                    key: name.into(),
                    value: maps.special_counter(index).unwrap_or(0).to_string(),
                });
            }
        }
    }
    print(args.output, &rows, &["KEY", "VALUE"], &[], |r| {
        vec![r.key.clone(), r.value.clone()]
    });
}

fn clock_text(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    )
}

fn threat_cells(t: &api::ThreatRecord) -> Vec<String> {
    vec![
        clock_text(t.time_ms),
        t.kind.clone(),
        t.source_pod.clone().unwrap_or_else(|| t.source.clone()),
        t.source_identity.to_string(),
        t.evidence(),
        t.response.clone(),
        t.destination_pod
            .clone()
            .unwrap_or_else(|| t.destination.clone()),
        t.endpoint.clone().unwrap_or_default(),
        t.action.clone().unwrap_or_default(),
    ]
}

/// The answer to `quarantine` or (`release`) `release`.
fn print_quarantine(output: Output, answer: Response, release: bool) {
    let Response::Quarantine(r) = answer else {
        fail(format!("unexpected answer {answer:?}"));
    };
    if matches!(output, Output::Json | Output::Yaml) {
        print_value(output, &to_value(&r));
        return;
    }
    match (&r.info, release) {
        (None, _) => println!("{} released", r.pod),
        (Some(info), true) => println!(
            "{} still quarantined ({}): remove the annotation to release it",
            r.pod, info.reason
        ),
        (Some(info), false) => println!(
            "{} quarantined ({}): {} endpoint(s), {} connection(s) cut",
            r.pod, info.reason, r.endpoints, r.connections_cut
        ),
    }
}

fn unix_ms_text(ms: u64) -> String {
    if ms == 0 {
        return "unknown".into();
    }
    let ago = moatd::flows::now_ms().saturating_sub(ms) / 1000;
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02} UTC ({ago}s ago)",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `status`: JSON/YAML are the API struct itself; the table is printed from it.
fn print_status(output: Output, s: &api::DaemonStatus) {
    if matches!(output, Output::Json | Output::Yaml) {
        print_value(output, &serde_json::to_value(s).unwrap_or_default());
        return;
    }
    println!("ready:       {}", s.ready);
    if let Some(reason) = &s.not_ready {
        println!("not ready:   {reason}");
    }
    println!("datastore:   {}", s.datastore);
    println!("pin dir:     {}", s.pin_dir);
    println!("endpoints:   {}", s.endpoints);
    println!("identities:  {}", s.identities);
    println!("policies:    {}", s.policies);
    println!("generation:  {}", s.generation);
    if !s.threat_detection.is_empty() {
        println!("threats:     detection {}", s.threat_detection);
    }
    if !s.fqdn.is_empty() {
        println!("fqdn:        {}", s.fqdn);
    }
    for p in &s.promotions {
        println!(
            "promotion:   {} {}{} ({})",
            p.policy,
            p.stage,
            if p.paused { ", paused" } else { "" },
            p.waiting_for
        );
    }
    if s.quarantined.is_empty() {
        println!("quarantined: none");
    } else {
        println!("quarantined:");
        for (pod, q) in &s.quarantined {
            let detail = q
                .detail
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            println!("  {pod} ({}{detail})", q.reason);
        }
    }
    if s.rejected.is_empty() {
        println!("rejected:    none");
    } else {
        println!("rejected:");
        for r in &s.rejected {
            println!("  {r}");
        }
    }
    if let Some(m) = &s.masquerade {
        let state = if !m.enabled {
            "off".to_string()
        } else if m.sources.is_empty() {
            "on; nothing to masquerade until this node has a pod CIDR".to_string()
        } else {
            format!(
                "on; from {} to anywhere but {}",
                m.sources.join(", "),
                m.kept.join(", ")
            )
        };
        println!("masquerade:  {state} (nftables table {})", m.table);
        if let Some(problem) = &m.problem {
            println!("  problem:   {problem}");
        }
    }
    let Some(dp) = &s.datapath else {
        println!("datapath:    not reported by this moatd");
        return;
    };
    println!(
        "layout:      v{} (pinned maps {}; {} endpoint links moved onto these programs)",
        dp.layout_version,
        if dp.maps_adopted {
            "adopted from an earlier run"
        } else {
            "created by this run"
        },
        dp.links_updated
    );
    if !dp.local_delivery.is_empty() {
        println!(
            "local flows: {} (linked TCP flows between this node's pods)",
            dp.local_delivery
        );
    }
    println!();
    print(
        output,
        &dp.programs,
        &["PROGRAM", "ID", "TAG", "LOADED"],
        &[],
        |p| {
            vec![
                p.name.clone(),
                p.id.to_string(),
                p.tag.clone(),
                unix_ms_text(p.loaded_ms),
            ]
        },
    );
    println!();
    print(
        output,
        &dp.maps,
        &["MAP", "ENTRIES", "CAPACITY", "FILL"],
        &[],
        |m| {
            vec![
                m.name.clone(),
                m.entries.to_string(),
                m.capacity.to_string(),
                format!(
                    "{:.1}%",
                    m.entries as f64 * 100.0 / m.capacity.max(1) as f64
                ),
            ]
        },
    );
    let e = &dp.events;
    println!();
    println!(
        "events:      limit {}/s per CPU (burst {}); received {}",
        e.rate_per_cpu, e.burst, e.received
    );
    println!(
        "event loss:  rate-limited {}, ring full {}, journal write failed {}, follower dropped {}",
        e.rate_limited, e.ring_full, e.journal_write_failed, e.follower_dropped
    );
}

fn main() {
    let args = Args::parse();
    match &args.command {
        Command::Status => match call(&args, Request::Status) {
            Response::Status(s) => print_status(args.output, &s),
            other => fail(format!("unexpected answer {other:?}")),
        },
        Command::Endpoint { what } => {
            let Response::Endpoints { endpoints } = call(&args, Request::ListEndpoints) else {
                fail("unexpected answer");
            };
            let rows: Vec<_> = match what {
                EndpointCmd::List => endpoints,
                EndpointCmd::Get { name } => {
                    let found: Vec<_> = endpoints
                        .into_iter()
                        .filter(|e| {
                            format!("{}/{}", e.spec.pod_namespace, e.spec.pod_name) == *name
                                || e.spec.container_id.starts_with(name.as_str())
                        })
                        .collect();
                    if found.is_empty() {
                        fail(format!(
                            "no endpoint {name:?} on this node; see `moatctl endpoint list`"
                        ));
                    }
                    found
                }
            };
            print(
                args.output,
                &rows,
                &[
                    "ENDPOINT",
                    "IDENTITY",
                    "MODE",
                    "ADDRESSES",
                    "INTERFACE",
                    "QUARANTINE",
                ],
                &["CONTAINER", "POLICY-ID", "LABELS"],
                |e| {
                    vec![
                        format!("{}/{}", e.spec.pod_namespace, e.spec.pod_name),
                        e.identity.to_string(),
                        e.mode.to_string(),
                        e.spec
                            .ips
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        e.spec.host_ifname.clone(),
                        e.quarantine
                            .as_ref()
                            .map_or_else(|| "-".into(), |q| q.reason.clone()),
                        e.spec.container_id.chars().take(12).collect(),
                        e.policy_id.to_string(),
                        e.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                },
            );
        }
        Command::Identity { what } => {
            let Response::Policy { document } = call(&args, Request::Policy) else {
                fail("unexpected answer");
            };
            #[derive(Serialize)]
            struct IdentityRow {
                identity: u32,
                labels: std::collections::BTreeMap<String, String>,
            }
            let mut rows: Vec<IdentityRow> = document
                .identities
                .into_iter()
                .map(|(k, labels)| IdentityRow {
                    identity: k.parse().unwrap_or(0),
                    labels,
                })
                .collect();
            if let IdentityCmd::Get { id } = what {
                rows.retain(|r| r.identity == *id);
                if rows.is_empty() {
                    fail(format!("no identity {id}; see `moatctl identity list`"));
                }
            }
            print(args.output, &rows, &["IDENTITY", "LABELS"], &[], |r| {
                let labels = r
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                vec![r.identity.to_string(), labels]
            });
        }
        Command::Policy { what } => match what.as_ref().unwrap_or(&PolicyCmd::State) {
            PolicyCmd::State => match call(&args, Request::Policy) {
                Response::Policy { document } => print_value(args.output, &to_value(&document)),
                other => fail(format!("unexpected answer {other:?}")),
            },
            PolicyCmd::Get { pod } => match call(&args, Request::PolicyGet { pod: pod.clone() }) {
                Response::PolicyRules { rules } => print(
                    args.output,
                    &rules,
                    &["DIRECTION", "PEER", "PROTO", "PORTS", "ACTION", "RULE"],
                    &[],
                    |r| {
                        vec![
                            r.direction.clone(),
                            r.peer.clone(),
                            r.protocol.clone(),
                            r.ports.clone(),
                            r.action.clone(),
                            r.rule.clone(),
                        ]
                    },
                ),
                other => fail(format!("unexpected answer {other:?}")),
            },
            PolicyCmd::SuggestBaseline { since } => {
                let request = Request::PolicySuggestBaseline {
                    since_secs: since.as_deref().map(parse_since),
                };
                match call(&args, request) {
                    Response::Suggestion { yaml } => {
                        if yaml.is_empty() {
                            fail("no flows between pods in the journal yet".to_string());
                        }
                        print!("{yaml}");
                    }
                    other => fail(format!("unexpected answer {other:?}")),
                }
            }
            PolicyCmd::Check {
                candidate,
                cluster,
                journal,
                since,
            } => policy_check(
                &args,
                candidate,
                cluster,
                journal.as_deref(),
                since.as_deref(),
            ),
            PolicyCmd::Suggest { namespace, since } => {
                let request = Request::PolicySuggest {
                    namespace: namespace.clone(),
                    since_secs: since.as_deref().map(parse_since),
                };
                match call(&args, request) {
                    Response::Suggestion { yaml } => {
                        if yaml.is_empty() {
                            fail(format!(
                                "no learned flows in namespace {namespace:?}; put workloads in \
                                 learn or audit mode (annotation moat.io/mode) and drive traffic"
                            ));
                        }
                        print!("{yaml}");
                    }
                    other => fail(format!("unexpected answer {other:?}")),
                }
            }
        },
        Command::Reload => match call(&args, Request::Reload) {
            Response::Status(s) => print_value(args.output, &to_value(&s)),
            other => fail(format!("unexpected answer {other:?}")),
        },
        Command::Flows {
            what: Some(FlowsCmd::Export { file, since }),
            ..
        } => {
            let filter = FlowFilter {
                since_secs: since.as_deref().map(parse_since),
                ..Default::default()
            };
            export_flows(&args, file, filter);
        }
        Command::Flows {
            what: None,
            follow,
            graph,
            journal,
            verdict,
            pod,
            since,
            limit,
        } => {
            let filter = FlowFilter {
                verdict: *verdict,
                pod: pod.clone(),
                since_secs: since.as_deref().map(parse_since),
                limit: *limit,
            };
            match (graph, journal) {
                (None, None) => flows(&args, *follow, filter),
                _ => {
                    let records = match journal {
                        Some(path) => read_journal_file(path, &filter).unwrap_or_else(|e| fail(e)),
                        None => fetch_flows(&args, filter),
                    };
                    match graph {
                        Some(format) => print_graph(*format, &records),
                        None => print(args.output, &records, FLOW_COLUMNS, FLOW_WIDE, flow_cells),
                    }
                }
            }
        }
        Command::Trace { from, to, port } => {
            let (number, protocol) = port.split_once('/').unwrap_or((port.as_str(), "TCP"));
            let number: u16 = number
                .parse()
                .unwrap_or_else(|_| fail(format!("--port {port:?}: expected e.g. 80/TCP")));
            let request = Request::Trace {
                from: from.clone(),
                to: to.clone(),
                port: number,
                protocol: protocol.to_string(),
            };
            match call(&args, request) {
                Response::Trace { trace } => {
                    if matches!(args.output, Output::Json | Output::Yaml) {
                        print_value(args.output, &to_value(&trace));
                    } else {
                        println!(
                            "{} -> {} {}/{}: {}",
                            trace.from,
                            trace.to,
                            trace.port,
                            trace.protocol,
                            trace.verdict.name().to_uppercase()
                        );
                        match &trace.path {
                            api::TracePath::Service { service } => print_service_trace(service),
                            api::TracePath::Direct {
                                egress, ingress, ..
                            } => {
                                if let Some(e) = egress {
                                    println!("  egress of source:        {e}");
                                }
                                if let Some(i) = ingress {
                                    println!("  ingress of destination:  {i}");
                                }
                            }
                        }
                        println!("  kernel maps agree:       yes");
                    }
                }
                other => fail(format!("unexpected answer {other:?}")),
            }
        }
        Command::Threats { limit } => {
            let Response::Threats { threats } = call(&args, Request::Threats { limit: *limit })
            else {
                fail("unexpected answer");
            };
            print(
                args.output,
                &threats,
                &["TIME", "KIND", "SOURCE", "IDENTITY", "EVIDENCE", "RESPONSE"],
                &["DESTINATION", "ENDPOINT", "ACTION"],
                threat_cells,
            );
        }
        Command::Quarantine { pod } => {
            let request = Request::Quarantine { pod: pod.clone() };
            print_quarantine(args.output, call(&args, request), false);
        }
        Command::Release { pod } => {
            let request = Request::Release { pod: pod.clone() };
            print_quarantine(args.output, call(&args, request), true);
        }
        Command::Bpf { what } => bpf(&args, what),
        Command::Verify => verify(&args),
        Command::Promotion { what } => promotion(&args, what.as_ref()),
        Command::Fqdn => match call(&args, Request::Fqdn) {
            Response::Fqdn { identities } => print_fqdn(args.output, &identities),
            Response::Error { message } => fail(format!("moatd refused: {message}")),
            other => fail(format!("unexpected answer {other:?}")),
        },
    }
}

/// `promotion`: the list, or one workload after an action.
fn promotion(args: &Args, what: Option<&PromotionCmd>) {
    let (policy, action) = match what {
        None => (None, api::PromotionAction::Show),
        Some(PromotionCmd::Show { policy }) => (Some(policy), api::PromotionAction::Show),
        Some(PromotionCmd::Pause { policy }) => (Some(policy), api::PromotionAction::Pause),
        Some(PromotionCmd::Resume { policy }) => (Some(policy), api::PromotionAction::Resume),
        Some(PromotionCmd::Revert { policy }) => (Some(policy), api::PromotionAction::Revert),
    };
    let request = Request::Promotion {
        policy: policy.cloned(),
        action,
    };
    let promotions = match call(args, request) {
        Response::Promotions { promotions } => promotions,
        Response::Error { message } => fail(format!("moatd refused: {message}")),
        other => fail(format!("unexpected answer {other:?}")),
    };
    if matches!(args.output, Output::Json | Output::Yaml) {
        print_value(args.output, &to_value(&promotions));
        return;
    }
    print(
        args.output,
        &promotions,
        &["POLICY", "STAGE", "SINCE", "LEARNED", "WAITING FOR"],
        &["WOULD-DENY", "PAUSED"],
        |p| {
            vec![
                p.policy.clone(),
                p.stage.clone(),
                unix_ms_text(p.since * 1000),
                p.learned_rules.to_string(),
                p.waiting_for.clone(),
                p.would_deny.to_string(),
                p.paused.to_string(),
            ]
        },
    );
    if policy.is_none() {
        return;
    }
    for p in &promotions {
        for step in &p.history {
            println!(
                "{}  {} -> {}: {}",
                unix_ms_text(step.at * 1000),
                step.from,
                step.to,
                step.why
            );
        }
        if let Some(yaml) = &p.proposal {
            println!();
            print!("{yaml}");
        }
    }
}

/// `verify`: exit 0 without drift, 1 with, 2 when moatd cannot answer.
fn verify(args: &Args) {
    let cannot = |message: String| -> ! {
        eprintln!("moatctl: verify: {message}");
        std::process::exit(2);
    };
    let report = match api::call(&args.socket, &Request::Verify, Duration::from_secs(60)) {
        Ok(Response::Verify { report }) => report,
        Ok(other) => cannot(format!("unexpected answer {other:?} (is moatd older?)")),
        Err(e) => cannot(e.to_string()),
    };
    match args.output {
        Output::Json | Output::Yaml => print_value(args.output, &to_value(&report)),
        Output::Table | Output::Wide => {
            print(
                args.output,
                &report.maps,
                &["MAP", "ENTRIES", "MISSING", "EXTRA", "DIFFERENT"],
                &[],
                |m| {
                    vec![
                        m.map.clone(),
                        m.entries.to_string(),
                        m.missing.to_string(),
                        m.extra.to_string(),
                        m.different.to_string(),
                    ]
                },
            );
            for m in report.drifted() {
                println!();
                let listed = m.samples.len();
                if listed < m.total() {
                    println!("{}: {} entries differ, {listed} listed", m.map, m.total());
                } else {
                    println!("{}: {} entries differ", m.map, m.total());
                }
                for e in &m.samples {
                    let mut line = format!("  {:<9} {}", e.kind.name(), e.key);
                    if let Some(expected) = &e.expected {
                        line.push_str(&format!("\n            want {expected}"));
                    }
                    if let Some(actual) = &e.actual {
                        line.push_str(&format!("\n            have {actual}"));
                    }
                    println!("{line}");
                }
            }
            if report.total() == 0 {
                println!();
                println!("no drift: the maps hold exactly the datastore's desired state");
            }
        }
    }
    std::process::exit(if report.total() == 0 { 0 } else { 1 });
}

/// A row of the `fqdn` table: one learned address, or an identity's patterns when it has
/// learned nothing yet.
#[derive(Serialize)]
struct FqdnRow<'a> {
    identity: &'a api::FqdnIdentity,
    learned: Option<&'a api::FqdnLearned>,
}

fn fqdn_cells(r: &FqdnRow) -> Vec<String> {
    let id = r.identity;
    let who = if id.pods.is_empty() {
        "-".to_string()
    } else {
        id.pods.join(",")
    };
    let patterns = id
        .selectors
        .iter()
        .map(|s| {
            if s.pattern.is_empty() {
                format!("selector {}", s.selector)
            } else {
                s.pattern.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let labels = id
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with("io.kubernetes.pod.namespace.labels"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let dash = || "-".to_string();
    let (name, address, ttl, left, age, count) = match r.learned {
        Some(l) => (
            if l.name.is_empty() {
                "?".to_string()
            } else {
                l.name.clone()
            },
            l.address.to_string(),
            format!("{}s", l.ttl),
            if l.expires_in_secs == 0 {
                "expired".to_string()
            } else {
                format!("{}s", l.expires_in_secs)
            },
            format!("{}s", l.age_secs),
            l.count.to_string(),
        ),
        None => (dash(), dash(), dash(), dash(), dash(), dash()),
    };
    vec![
        id.identity.to_string(),
        who,
        name,
        address,
        ttl,
        left,
        if patterns.is_empty() {
            dash()
        } else {
            patterns
        },
        age,
        count,
        labels,
    ]
}

/// `fqdn`: JSON/YAML are the API's per-identity structs; the table has a row per learned
/// address.
fn print_fqdn(output: Output, identities: &[api::FqdnIdentity]) {
    if matches!(output, Output::Json | Output::Yaml) {
        print_value(output, &to_value(&identities));
        return;
    }
    let rows: Vec<FqdnRow> = identities
        .iter()
        .flat_map(|identity| {
            let learned: Vec<FqdnRow> = identity
                .learned
                .iter()
                .map(|l| FqdnRow {
                    identity,
                    learned: Some(l),
                })
                .collect();
            if learned.is_empty() {
                vec![FqdnRow {
                    identity,
                    learned: None,
                }]
            } else {
                learned
            }
        })
        .collect();
    print(
        output,
        &rows,
        &[
            "IDENTITY", "PODS", "NAME", "ADDRESS", "TTL", "LEFT", "PATTERNS",
        ],
        &["AGE", "ANSWERS", "LABELS"],
        fqdn_cells,
    );
}

/// A trace to a Service address: what the source's hook does, then each backend the host's
/// DNAT may pick, with the verdict there and where it is made.
fn print_service_trace(service: &api::ServiceTrace) {
    println!("  at the source's hook:    {}", service.at_source);
    for b in &service.backends {
        println!(
            "  backend {}:{} ({}{}): {}",
            b.address,
            b.port,
            b.place,
            b.backend
                .as_deref()
                .map(|p| format!(", {p}"))
                .unwrap_or_default(),
            b.verdict.name().to_uppercase()
        );
        if let Some(e) = &b.egress {
            println!("    egress of source:      {e}");
            println!("    judged at:             {}", b.egress_judged_at);
        }
        if let Some(i) = &b.ingress {
            println!("    ingress of backend:    {i}");
        }
    }
    if let Some(note) = &service.note {
        println!("  note: {note}");
    }
}
