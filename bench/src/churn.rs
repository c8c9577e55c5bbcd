//! `moat-bench churn`: control-plane cost at cluster scale, on a real Daemon (lib API, real
//! eBPF maps in a private pin directory), with no network namespaces: endpoints register with
//! fake host interfaces, as moat-cni would after attaching.
//!
//! Synthetic scale (defaults): 10,000 pods in 500 namespaces with 1,000 NetworkPolicies
//! (local-datastore YAML, see `moat_testkit::churn`); 100 pods on this node. Measured, each as the
//! time from the event to the maps holding its result:
//!   - a pod registering with labels an identity already has (CNI ADD);
//!   - a pod registering with a label set of its own (a new identity);
//!   - a policy edit: one policy file rewritten, then the reload of that file that moatd's
//!     inotify watch triggers (the inotify delivery itself is not included);
//!   - 200 pod events/s (ADD and DEL) for 60 s, with the backlog (events due, not yet done);
//!   - a full resync against the kernel maps; the process's RSS.
//!
//! Results go under "churn" in the output JSON (other sections are kept).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use moat_testkit::churn::{self, LocalPod, Scale};
use moatd::{
    api::{Request, Response},
    daemon::{Daemon, DaemonConfig, DatastoreConfig, Routing},
    flows::JournalConfig,
};
use serde_json::{Map, Value, json};

use crate::util::{check_interrupted, round};

/// `moat-bench churn`'s flags.
#[derive(clap::Args)]
pub struct Args {
    /// The results file.
    #[arg(long, value_name = "FILE", default_value = "bench/results.json")]
    out: PathBuf,
    /// Where the endpoint registry is kept (default: under the run's temp directory).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[arg(long, value_name = "N", default_value_t = Scale::default().pods)]
    pods: usize,
    #[arg(long, value_name = "N", default_value_t = Scale::default().namespaces)]
    namespaces: usize,
    #[arg(long, value_name = "N", default_value_t = Scale::default().policies)]
    policies: usize,
    /// Pods on this node before measuring.
    #[arg(long, value_name = "N", default_value_t = Scale::default().local_base)]
    local: usize,
    /// Pod events per second in the sustained part.
    #[arg(long, value_name = "PER_S", default_value_t = 200)]
    rate: u64,
    #[arg(long, value_name = "S", default_value_t = 60)]
    secs: u64,
    #[arg(long, value_name = "N", default_value_t = 300)]
    samples: usize,
    #[arg(long, value_name = "N", default_value_t = 150)]
    new_samples: usize,
    #[arg(long, value_name = "N", default_value_t = 200)]
    policy_samples: usize,
    /// The cluster's shape, from the flags above.
    #[arg(skip)]
    scale: Scale,
}

impl Args {
    fn resolve(&mut self) -> Result<()> {
        self.scale = Scale {
            pods: self.pods,
            namespaces: self.namespaces,
            policies: self.policies,
            local_base: self.local,
            existing_pool: self.samples.max(100),
            new_identity_pool: self.new_samples.max(1),
        };
        if self.scale.namespaces == 0 || self.rate == 0 || self.secs == 0 {
            bail!("--namespaces, --rate and --secs must be positive");
        }
        Ok(())
    }
}

/// `moat-bench churn`.
pub fn main(mut args: Args) -> ExitCode {
    if let Err(e) = args.resolve() {
        eprintln!("{e:#}");
        return ExitCode::from(2);
    }
    crate::util::install_signal_handlers();
    let started = Instant::now();
    let mut section = Map::new();
    let outcome = run(&args, &mut section);
    section.insert(
        "wall_time_s".into(),
        json!(round(started.elapsed().as_secs_f64(), 1)),
    );
    if let Err(e) = &outcome {
        eprintln!("moat-bench churn: {e:#}");
        section.insert("fatal_error".into(), json!(format!("{e:#}")));
    }
    if let Err(e) = crate::util::write_section(&args.out, "churn", Value::Object(section.clone())) {
        eprintln!("moat-bench: writing {}: {e:#}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&Value::Object(section)).unwrap_or_default()
    );
    println!("\nwritten: {} (section \"churn\")", args.out.display());
    if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Removes the run's files and pins, also on failure.
struct Scratch {
    dir: PathBuf,
    pin_root: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50/p99/max (ms) and the sample count under `prefix_*`.
fn summarize(section: &mut Map<String, Value>, prefix: &str, samples: &[f64]) {
    for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        section.insert(
            format!("{prefix}_{name}_ms"),
            json!(percentile(samples, p).map(|v| round(v, 3))),
        );
    }
    section.insert(format!("{prefix}_samples"), json!(samples.len()));
}

fn register(daemon: &mut Daemon, pod: &LocalPod, generation: usize) -> Result<Duration> {
    let t = Instant::now();
    let response = daemon.handle(Request::Register {
        endpoint: pod.spec(generation),
    });
    let elapsed = t.elapsed();
    match response {
        Response::Registered(_) => Ok(elapsed),
        other => bail!("registering {}/{}: {other:?}", pod.namespace, pod.name),
    }
}

fn unregister(daemon: &mut Daemon, pod: &LocalPod, generation: usize) -> Result<Duration> {
    let spec = pod.spec(generation);
    let t = Instant::now();
    let response = daemon.handle(Request::Unregister {
        container_id: spec.container_id,
        ifname: spec.ifname,
    });
    let elapsed = t.elapsed();
    match response {
        Response::Unregistered { found: true } => Ok(elapsed),
        other => bail!("unregistering {}/{}: {other:?}", pod.namespace, pod.name),
    }
}

/// Median cost (ms) of a crash-safe save like the endpoint store's (store.rs): write a 20 KB
/// file, fsync, rename.
fn save_cost_ms(dir: &Path) -> Option<f64> {
    use std::io::Write;
    std::fs::create_dir_all(dir).ok()?;
    let (tmp, path) = (dir.join(".probe.tmp"), dir.join(".probe"));
    let body = vec![b'x'; 20_000];
    let mut samples = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        let mut f = std::fs::File::create(&tmp).ok()?;
        f.write_all(&body).ok()?;
        f.sync_all().ok()?;
        std::fs::rename(&tmp, &path).ok()?;
        samples.push(ms(t.elapsed()));
    }
    let _ = std::fs::remove_file(&path);
    percentile(&samples, 50.0)
}

/// Resident set size of this process (kB field of /proc/self/status), in MiB.
fn proc_status_mib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(round(kb / 1024.0, 1))
}

fn status(daemon: &mut Daemon) -> Result<moatd::api::DaemonStatus> {
    match daemon.handle(Request::Status) {
        Response::Status(s) => Ok(*s),
        other => bail!("status: {other:?}"),
    }
}

fn run(args: &Args, section: &mut Map<String, Value>) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("moat-bench churn must run as root (it loads eBPF)");
    }
    if crate::util::sh("mountpoint -q /sys/fs/bpf").is_err() {
        crate::util::sh("mount -t bpf bpf /sys/fs/bpf")?;
    }
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("moat-bench-churn-{pid}"));
    let scratch = Scratch {
        state_dir: args
            .state_dir
            .as_ref()
            .map(|d| d.join(format!("moat-bench-churn-{pid}")))
            .unwrap_or_else(|| dir.join("state")),
        dir,
        pin_root: PathBuf::from(format!("/sys/fs/bpf/moat-bench-churn-{pid}")),
    };
    let _ = std::fs::remove_dir_all(&scratch.dir);
    let policy_dir = scratch.dir.join("policies");
    let s = &args.scale;
    section.insert(
        "scale".into(),
        json!({
            "pods": s.pods, "namespaces": s.namespaces, "policies": s.policies,
            "local_endpoints": s.local_base, "existing_identity_pool": s.existing_pool,
            "new_identity_pool": s.new_identity_pool,
        }),
    );
    section.insert(
        "generated_at_unix".into(),
        json!(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
    );
    section.insert(
        "targets".into(),
        json!({
            "existing_identity_p99_ms": 5.0, "new_identity_p99_ms": 20.0,
            "policy_change_p99_ms": 5.0, "rss_mib": 150.0,
        }),
    );

    // The endpoint registry is saved crash-safely (fsync of the file, rename) on every
    // registration: measure what that costs on the state directory's filesystem.
    let state_dir = scratch.state_dir.clone();
    section.insert("state_dir".into(), json!(state_dir.display().to_string()));
    section.insert(
        "state_save_ms".into(),
        json!(save_cost_ms(&state_dir).map(|v| round(v, 2))),
    );

    let cluster = churn::generate(s);
    churn::write(&policy_dir, &cluster).context("writing the synthetic cluster")?;
    // What parsing the whole local datastore costs (every reload pays it).
    let t = Instant::now();
    let objects = moatd::local::load(&policy_dir);
    section.insert(
        "local_datastore_load_ms".into(),
        json!(round(ms(t.elapsed()), 1)),
    );
    if !objects.rejected.is_empty() {
        bail!("synthetic objects rejected: {:?}", &objects.rejected[..1]);
    }
    drop(objects);
    println!(
        "churn: {} pods, {} namespaces, {} policies written; starting the daemon",
        s.pods, s.namespaces, s.policies
    );

    let t = Instant::now();
    let mut daemon = Daemon::start(DaemonConfig {
        state_dir: state_dir.clone(),
        policy_dir: policy_dir.clone(),
        socket: scratch.dir.join("moatd.sock"),
        pending_dir: scratch.dir.join("pending"),
        pin_root: scratch.pin_root.clone(),
        service_cidrs: vec!["10.96.0.0/12".parse()?],
        journal: JournalConfig::new(scratch.dir.join("flows")),
        datastore: DatastoreConfig::Local,
        node_name: String::new(),
        routing: Routing::None,
        // Shares the host's network namespace with other runs: no host-wide rules.
        judge_after_dnat: false,
        map_sizes: Default::default(),
    })
    .context("starting the daemon")?;
    section.insert(
        "startup_s".into(),
        json!(round(t.elapsed().as_secs_f64(), 2)),
    );
    let st = status(&mut daemon)?;
    if !st.rejected.is_empty() {
        bail!("the daemon rejected objects: {:?}", &st.rejected[..1]);
    }
    // The remote pods must be in the engine (ipcache), or the scale is not what it says.
    let remote = s
        .pods
        .saturating_sub(s.local_base + s.existing_pool + s.new_identity_pool);
    if let Response::Policy { document } = daemon.handle(Request::Policy) {
        let ipcache = document.entries.ipcache;
        if ipcache < remote {
            bail!(
                "only {ipcache} ipcache entries for {remote} remote pods: pod addresses not read"
            );
        }
        section.insert("identities_at_start".into(), json!(st.identities));
    }
    println!(
        "churn: daemon up in {:.1}s ({} identities, {} policies)",
        t.elapsed().as_secs_f64(),
        st.identities,
        st.policies
    );

    // The node's own population.
    let t = Instant::now();
    let mut base = Vec::new();
    for pod in &cluster.base {
        base.push(ms(register(&mut daemon, pod, 0)?));
    }
    section.insert(
        "base_registration_s".into(),
        json!(round(t.elapsed().as_secs_f64(), 2)),
    );
    check_interrupted()?;

    // Each phase is also bounded in time, so the whole run stays within about 3 minutes
    // whatever the per-event cost; the sample counts say how many were taken.
    let phase_cap = Duration::from_secs(20);

    // Pods joining an existing identity.
    let (mut existing, mut removals) = (Vec::new(), Vec::new());
    let t = Instant::now();
    let pool = &cluster.existing;
    let n = args.samples.min(pool.len());
    let mut registered = Vec::new();
    for pod in pool.iter().take(n) {
        existing.push(ms(register(&mut daemon, pod, 1)?));
        registered.push(pod);
        if t.elapsed() > phase_cap {
            break;
        }
    }
    for pod in registered {
        removals.push(ms(unregister(&mut daemon, pod, 1)?));
    }
    summarize(section, "existing_identity", &existing);
    check_interrupted()?;
    println!(
        "churn: existing identity p99 {:.2} ms",
        percentile(&existing, 99.0).unwrap_or(f64::NAN)
    );

    // Pods bringing a new identity.
    let mut new_identity = Vec::new();
    let t = Instant::now();
    let mut registered = Vec::new();
    for pod in cluster.new_identity.iter().take(args.new_samples) {
        new_identity.push(ms(register(&mut daemon, pod, 1)?));
        registered.push(pod);
        if t.elapsed() > phase_cap {
            break;
        }
    }
    for pod in registered {
        removals.push(ms(unregister(&mut daemon, pod, 1)?));
    }
    summarize(section, "new_identity", &new_identity);
    summarize(section, "unregister", &removals);
    check_interrupted()?;
    println!(
        "churn: new identity p99 {:.2} ms",
        percentile(&new_identity, 99.0).unwrap_or(f64::NAN)
    );

    // Policy edits: one file rewritten, then the reload that applies it.
    let mut policy = Vec::new();
    let t = Instant::now();
    for i in 0..args.policy_samples.min(cluster.policies.len()) {
        let (file, k, j) = &cluster.policies[i * 37 % cluster.policies.len()];
        churn::write_file(
            &policy_dir,
            file,
            &churn::policy_yaml(s.namespaces, *k, *j, i + 1),
        )?;
        let edited = Instant::now();
        // What moatd's directory watch does with the inotify event for this file.
        if !daemon.reload_files(&[policy_dir.join(file)].into()) {
            bail!("a policy edit of {file} changed nothing");
        }
        policy.push(ms(edited.elapsed()));
        let st = status(&mut daemon)?;
        if !st.rejected.is_empty() {
            bail!("reload after a policy edit rejected: {:?}", st.rejected);
        }
        if t.elapsed() > phase_cap {
            break;
        }
    }
    summarize(section, "policy_change", &policy);
    check_interrupted()?;
    println!(
        "churn: policy change p99 {:.2} ms",
        percentile(&policy, 99.0).unwrap_or(f64::NAN)
    );

    sustained(args, &mut daemon, &cluster.existing, section)?;
    check_interrupted()?;

    // Full resyncs: read every map back from the kernel, diff, write the difference.
    let mut resyncs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let stats = daemon.resync()?;
        resyncs.push(t.elapsed().as_secs_f64());
        if stats.upserts + stats.deletes > 0 {
            bail!("resync found drift after the run: {stats:?}");
        }
    }
    resyncs.sort_by(f64::total_cmp);
    section.insert("resync_s".into(), json!(round(resyncs[1], 3)));

    if let Response::Policy { document } = daemon.handle(Request::Policy) {
        section.insert("map_entries".into(), json!(document.entries));
    }
    let st = status(&mut daemon)?;
    section.insert(
        "state".into(),
        json!({"identities": st.identities, "policies": st.policies, "endpoints": st.endpoints}),
    );
    drop(cluster);
    section.insert("rss_mib".into(), json!(proc_status_mib("VmRSS:")));
    section.insert("rss_peak_mib".into(), json!(proc_status_mib("VmHWM:")));
    drop(daemon);
    drop(scratch);

    let get = |k: &str| section.get(k).and_then(Value::as_f64);
    let meets = json!({
        "existing_identity_p99_ms": get("existing_identity_p99_ms").map(|v| v <= 5.0),
        "new_identity_p99_ms": get("new_identity_p99_ms").map(|v| v <= 20.0),
        "policy_change_p99_ms": get("policy_change_p99_ms").map(|v| v <= 5.0),
        "rss_mib": get("rss_mib").map(|v| v <= 150.0),
    });
    section.insert("meets_targets".into(), meets);
    Ok(())
}

/// Pod ADD and DEL at `rate` per second for `secs`: the events follow a fixed schedule; one
/// thread applies them in order (as moatd's single lock does). Backlog = events whose time
/// has come but that are not applied yet; latency = from an event's due time to its
/// application (queueing included).
fn sustained(
    args: &Args,
    daemon: &mut Daemon,
    pool: &[LocalPod],
    section: &mut Map<String, Value>,
) -> Result<()> {
    // About 50 churning pods live at a time on top of the base population.
    let live_target = 50.min(pool.len() / 2).max(1);
    let mut live: std::collections::VecDeque<(&LocalPod, usize)> = Default::default();
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let total = args.rate * args.secs;
    let start = Instant::now();
    let end = start + Duration::from_secs(args.secs);
    let (mut done, mut next_pod) = (0u64, 0usize);
    let (mut backlog_max, mut latencies) = (0u64, Vec::new());
    while done < total {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = ((now - start).as_secs_f64() * args.rate as f64) as u64 + 1;
        let due = due.min(total);
        if done >= due {
            std::thread::sleep((start + interval * done as u32).saturating_duration_since(now));
            continue;
        }
        backlog_max = backlog_max.max(due - done - 1);
        let scheduled = start + interval * done as u32;
        if live.len() >= live_target {
            let (pod, generation) = live.pop_front().expect("live pods");
            unregister(daemon, pod, generation)?;
        } else {
            let pod = &pool[next_pod % pool.len()];
            let generation = 100 + done as usize;
            register(daemon, pod, generation)?;
            live.push_back((pod, generation));
            next_pod += 1;
        }
        done += 1;
        latencies.push(ms(scheduled.elapsed()));
        if done % 1000 == 0 {
            check_interrupted()?;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let due_at_end = ((elapsed * args.rate as f64) as u64).min(total);
    for (pod, generation) in live {
        unregister(daemon, pod, generation)?;
    }
    section.insert(
        "sustained_200_per_s_backlog_max".into(),
        json!(backlog_max.max(due_at_end.saturating_sub(done))),
    );
    section.insert("sustained_rate_per_s".into(), json!(args.rate));
    section.insert("sustained_secs".into(), json!(args.secs));
    section.insert("sustained_events_due".into(), json!(due_at_end));
    section.insert("sustained_events_done".into(), json!(done));
    section.insert(
        "sustained_achieved_per_s".into(),
        json!(round(done as f64 / elapsed, 1)),
    );
    summarize(section, "sustained_event", &latencies);
    println!(
        "churn: sustained {} events/s for {}s: {done} of {due_at_end} due applied, backlog max {}",
        args.rate, args.secs, backlog_max
    );
    Ok(())
}
