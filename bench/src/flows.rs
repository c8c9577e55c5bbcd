//! `moat-bench flows`: can `moatctl flows --follow` keep up with the ring buffer?
//!
//! A real moatd (the release binary next to moat-bench) with a private pin root and state,
//! two lab pods registered with it, and a policy that isolates the sender's egress: every UDP
//! datagram it sends is dropped by default deny at the sender's own perimeter (the cheapest
//! drop the datapath has) and reported as one verdict event. A real
//! `moatctl -o json flows --follow --verdict dropped` process prints them; this benchmark
//! counts its lines.
//!
//! At each offered rate (datagrams/s, paced in 1 ms slices for `--secs` seconds) it compares
//! what the kernel counted (default-deny drops on the sender's egress = events attempted,
//! plus the rate-limited and ring-full counters) with the lines the follower printed. moatd
//! runs with a kernel rate limit far above the offered rates, so what is measured is the
//! pipeline ring -> moatd (explain, journal, publish) -> moatctl, not the limiter. A rate is
//! lossless when every event the kernel attempted reached the follower's stdout.
//!
//! Section "flows" of the results file: `follow_max_lossless_events_per_s`,
//! `target_events_per_s` (50,000) and one row per rate.

use std::{
    io::Read,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use moat_common::{DIRECTION_EGRESS, VERDICT_DROP, reason};
use moat_datapath::{Maps, PinDir, attach_endpoint};
use moat_testkit::{
    Moatd,
    lab::{Lab, LabPod},
};
use moatd::api::{self, EndpointSpec, Request, Response};
use serde_json::{Value, json};

use crate::util::{self, check_interrupted, round};

const PIN_ROOT: &str = "/sys/fs/bpf/moat-bench-flows";
const TARGET_EVENTS_PER_S: u64 = 50_000;
const SINK_PORT: u16 = 9999;
/// `moat-bench flows`'s flags.
#[derive(clap::Args)]
pub struct Args {
    /// The results file.
    #[arg(long, value_name = "FILE", default_value = "bench/results.json")]
    out: PathBuf,
    /// Seconds per offered rate.
    #[arg(long, value_name = "N", default_value_t = 5)]
    secs: u64,
    /// Offered drop events per second, one measurement each.
    #[arg(
        long,
        value_name = "10000,25000,...",
        value_delimiter = ',',
        value_parser = parse_rate,
        default_values_t = [10_000u64, 25_000, 50_000, 100_000, 150_000, 200_000, 300_000]
    )]
    rates: Vec<u64>,
    /// Where moatd and moatctl are (default: next to moat-bench).
    #[arg(long = "bin-dir", value_name = "DIR")]
    bin_dir_flag: Option<PathBuf>,
    #[arg(skip)]
    bin_dir: PathBuf,
}

/// One rate of `--rates` (spaces around it allowed).
fn parse_rate(value: &str) -> Result<u64, std::num::ParseIntError> {
    value.trim().parse()
}

pub fn main(mut args: Args) -> ExitCode {
    args.bin_dir = match args.bin_dir_flag.take().map_or_else(util::exe_dir, Ok) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    util::install_signal_handlers();
    let section = match run(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("moat-bench flows: {e:#}");
            json!({ "fatal_error": format!("{e:#}") })
        }
    };
    let failed = section.get("fatal_error").is_some();
    if let Err(e) = util::write_section(&args.out, "flows", section.clone()) {
        eprintln!("moat-bench flows: writing {}: {e:#}", args.out.display());
        return ExitCode::FAILURE;
    }
    print_table(&section);
    println!("\nwritten: {} (section \"flows\")", args.out.display());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A child process killed (and reaped) on drop; it also dies if this process does.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_tied(command: &mut Command) -> Result<Guard> {
    // SAFETY: prctl is async-signal-safe; the child dies with this process, even on SIGKILL.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(Guard(command.spawn()?))
}

/// The temporary directory (policies, state with the journal, socket), removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const POLICIES: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: sender\n  namespace: bench\n  labels:\n    app: sender\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: sink\n  namespace: bench\n  labels:\n    app: sink\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: sender-no-egress\n  namespace: bench\nspec:\n  podSelector:\n    matchLabels:\n      app: sender\n  policyTypes: [Egress]\n";

fn call(socket: &Path, request: Request) -> Result<Response> {
    Ok(api::call(socket, &request, Duration::from_secs(10))?)
}

fn status(socket: &Path) -> Result<api::DaemonStatus> {
    match call(socket, Request::Status)? {
        Response::Status(s) => Ok(*s),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// What the kernel and moatd counted so far.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    attempted: u64,
    rate_limited: u64,
    ring_full: u64,
    follower_dropped: u64,
}

fn counters(maps: &Maps, socket: &Path) -> Result<Counters> {
    let events = status(socket)?
        .datapath
        .context("moatd reports no datapath status")?
        .events;
    Ok(Counters {
        attempted: maps.count(VERDICT_DROP, reason::DEFAULT_DENY, DIRECTION_EGRESS)?,
        rate_limited: events.rate_limited,
        ring_full: events.ring_full,
        follower_dropped: events.follower_dropped,
    })
}

/// Sends `rate` datagrams/s for `secs` from inside the sender pod; returns how many.
fn send_at(lab_pod: &LabPod, to: SocketAddr, rate: u64, secs: u64) -> u64 {
    lab_pod
        .run(move || {
            let socket = UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
            socket.connect(to).expect("connect");
            let payload = [0u8; 16];
            let start = Instant::now();
            let total = rate * secs;
            let mut sent = 0u64;
            // Paced per millisecond: at slice k, k/1000 of a second's worth should be out.
            while sent < total {
                let due = (start.elapsed().as_micros() as u64 * rate / 1_000_000 + 1).min(total);
                while sent < due {
                    if socket.send(&payload).is_ok() {
                        sent += 1;
                    }
                }
                let next_slice =
                    Duration::from_micros(((start.elapsed().as_micros() as u64 / 1000) + 1) * 1000);
                if let Some(wait) = next_slice.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            sent
        })
        .unwrap_or(0)
}

fn run(args: &Args) -> Result<Value> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (loads eBPF, creates namespaces)");
    }
    let (moatd, moatctl) = (args.bin_dir.join("moatd"), args.bin_dir.join("moatctl"));
    for bin in [&moatd, &moatctl] {
        if !bin.exists() {
            bail!("{} missing: make build builds it", bin.display());
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("moat-bench-flows-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(dir.0.join("policies"))?;
    std::fs::write(dir.0.join("policies/bench.yaml"), POLICIES)?;
    let _pins = util::PinRootGuard::new(PIN_ROOT);
    let socket = dir.0.join("moatd.sock");
    // The limiter far above the offered rates: the pipeline is what is measured.
    let (rate_per_cpu, burst) = (1_000_000u32, 100_000u32);
    let _daemon = Moatd::builder(&moatd)
        // The host's own namespace: no host-wide rules left behind by a benchmark.
        .no_host_rules()
        .layout(&dir.0)
        .pin_root(PIN_ROOT)
        .args(["--metrics-addr", ""])
        .args(["--event-rate-per-cpu", &rate_per_cpu.to_string()])
        .args(["--event-burst", &burst.to_string()])
        .quiet()
        // moatd dies with this process, even on SIGKILL.
        .die_with_parent()
        .wait_for_ready()
        .timeout(Duration::from_secs(30))
        .spawn()?;

    let mut lab = Lab::new("mbf")?;
    let sender = lab.add_pod("sender")?;
    let sink = lab.add_pod("sink")?;
    let pins = PinDir::new(PIN_ROOT);
    for pod in [&sender, &sink] {
        let spec = EndpointSpec {
            container_id: format!("bench-{}", pod.name),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{}", pod.netns),
            host_ifname: pod.host_if.clone(),
            host_ifindex: pod.ifindex,
            ips: pod.addrs().to_vec(),
            pod_namespace: "bench".into(),
            pod_name: pod.name.clone(),
            pod_uid: None,
        };
        match call(&socket, Request::Register { endpoint: spec })? {
            Response::Registered(_) => {}
            other => bail!("registering {}: {other:?}", pod.name),
        }
        attach_endpoint(&pins, &pod.host_if)?;
    }
    let maps = Maps::open(&pins)?;

    // The follower, and a thread counting its lines (checking that each is a JSON object).
    let mut follower = spawn_tied(
        Command::new(&moatctl)
            .arg("--socket")
            .arg(&socket)
            .args(["-o", "json", "flows", "--follow", "--verdict", "dropped"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .with_context(|| format!("starting {}", moatctl.display()))?;
    let lines = Arc::new(AtomicU64::new(0));
    let bad_lines = Arc::new(AtomicU64::new(0));
    let stdout = follower.0.stdout.take().context("follower stdout")?;
    let mut stderr = follower.0.stderr.take().context("follower stderr")?;
    {
        let (lines, bad_lines) = (lines.clone(), bad_lines.clone());
        std::thread::spawn(move || count_lines(stdout, &lines, &bad_lines));
    }
    // Warm-up: one drop must come through before measuring.
    let to = SocketAddr::new(IpAddr::V4(sink.v4), SINK_PORT);
    let warm_deadline = Instant::now() + Duration::from_secs(10);
    while lines.load(Ordering::Relaxed) == 0 {
        send_at(&sender, to, 100, 1);
        if Instant::now() > warm_deadline {
            bail!("no flow reached the follower during warm-up");
        }
    }

    let mut rows = Vec::new();
    let mut best = 0u64;
    for &rate in &args.rates {
        check_interrupted()?;
        follower.0.try_wait()?.map_or(Ok(()), |s| {
            Err(anyhow::anyhow!("moatctl exited early ({s})"))
        })?;
        // Settle: everything from before is printed.
        wait_quiet(&lines, Duration::from_millis(500), Duration::from_secs(10));
        let before = counters(&maps, &socket)?;
        let lines_before = lines.load(Ordering::Relaxed);
        let started = Instant::now();
        let sent = send_at(&sender, to, rate, args.secs);
        let send_secs = started.elapsed().as_secs_f64();
        let after_send = counters(&maps, &socket)?;
        let attempted = after_send.attempted - before.attempted;
        // Drain: until the follower printed everything, or stopped making progress.
        let drain_started = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = (lines.load(Ordering::Relaxed), Instant::now());
        while lines.load(Ordering::Relaxed) - lines_before < attempted && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
            let now = lines.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        let printed = lines.load(Ordering::Relaxed) - lines_before;
        let after = counters(&maps, &socket)?;
        let row = json!({
            "offered_events_per_s": rate,
            "sent": sent,
            "achieved_events_per_s": round(attempted as f64 / send_secs, 0),
            "kernel_events_attempted": attempted,
            "printed_by_follower": printed,
            "lost": attempted.saturating_sub(printed),
            "rate_limited": after.rate_limited - before.rate_limited,
            "ring_full": after.ring_full - before.ring_full,
            "follower_dropped_in_moatd": after.follower_dropped - before.follower_dropped,
            "drain_after_send_ms": round(drain_started.elapsed().as_secs_f64() * 1000.0, 0),
        });
        let lossless = attempted > 0 && printed == attempted;
        if lossless {
            best = best.max((attempted as f64 / send_secs) as u64);
        }
        println!(
            "offered {rate}/s: attempted {attempted}, printed {printed}, ring full {}, \
             follower dropped {}",
            row["ring_full"], row["follower_dropped_in_moatd"]
        );
        rows.push(row);
    }
    drop(follower);
    let mut follower_stderr = String::new();
    let _ = stderr.read_to_string(&mut follower_stderr);
    let final_status = status(&socket)?;
    let status_cost = status_with_full_conntrack(&pins, &socket)?;
    for pod in [&sender, &sink] {
        let _ = moat_datapath::detach_endpoint(&pins, &pod.host_if);
    }
    drop(lab);
    Ok(json!({
        "method": format!(
            "UDP datagrams from a lab pod whose egress is isolated (every one a default-deny \
             drop and one event), paced per ms for {} s per rate; a real moatd (kernel limit \
             {rate_per_cpu}/s per CPU, burst {burst}) and a real `moatctl -o json flows \
             --follow --verdict dropped`; events attempted = the kernel's default-deny egress \
             drop counter; lossless = every attempted event printed by the follower",
            args.secs
        ),
        "target_events_per_s": TARGET_EVENTS_PER_S,
        "follow_max_lossless_events_per_s": best,
        "meets_target": best >= TARGET_EVENTS_PER_S,
        "rates": rows,
        "malformed_lines": bad_lines.load(Ordering::Relaxed),
        "follower_stderr": follower_stderr.trim(),
        "moatd_event_totals": final_status.datapath.map(|d| d.events),
        "status_with_full_conntrack": status_cost,
    }))
}

/// What counting the map fill costs when conntrack is full: `status` (batched counting)
/// against walking the keys one syscall at a time, medians of 3. The filler entries are
/// keyed by an interface that does not exist and are already expired.
fn status_with_full_conntrack(pins: &PinDir, socket: &Path) -> Result<Value> {
    use moat_common::{CtKey, CtValue, FAMILY_V4, PROTO_UDP, map_size};
    let mut maps = Maps::open(pins)?;
    for i in 0..map_size::CONNTRACK {
        let key = CtKey {
            ifindex: u32::MAX,
            saddr: [i, 0, 0, 0],
            daddr: [1, 0, 0, 0],
            sport: 1,
            dport: 1,
            proto: PROTO_UDP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        maps.conntrack.insert(key, CtValue::default(), 0)?;
    }
    let mut status_ms = Vec::new();
    let mut walk_ms = Vec::new();
    let mut entries = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let s = status(socket)?;
        status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        entries = s
            .datapath
            .and_then(|d| d.maps.into_iter().find(|m| m.name == "conntrack"))
            .map(|m| m.entries)
            .unwrap_or(0);
        let t = Instant::now();
        let walked = maps.conntrack.keys().count();
        walk_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if walked as u64 != entries {
            bail!("status counted {entries} conntrack entries, a key walk {walked}");
        }
    }
    Ok(json!({
        "conntrack_entries": entries,
        "status_request_ms_p50": util::median(&status_ms).map(|v| round(v, 1)),
        "key_walk_ms_p50": util::median(&walk_ms).map(|v| round(v, 1)),
    }))
}

/// Counts the follower's lines on raw bytes: parsing every line would cost this process as
/// much CPU as the follower spends, on the same two cores. Each line must look like a flow
/// record: every line starts with `{` and ends with `}`, and the first complete line of each
/// read is checked for `"verdict":"dropped"`.
fn count_lines(mut from: impl Read, lines: &AtomicU64, bad: &AtomicU64) {
    let mut buf = vec![0u8; 1 << 20];
    let mut at_line_start = true;
    let mut prev = b'\n';
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let mut count = 0;
        for &b in chunk {
            if at_line_start && b != b'{' {
                bad.fetch_add(1, Ordering::Relaxed);
            }
            at_line_start = b == b'\n';
            if at_line_start {
                if prev != b'}' {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                count += 1;
            }
            prev = b;
        }
        // The first complete line of the chunk is checked for content.
        let mut newlines = chunk
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i);
        if let (Some(i), Some(j)) = (newlines.next(), newlines.next())
            && !String::from_utf8_lossy(&chunk[i + 1..j]).contains("\"verdict\":\"dropped\"")
        {
            bad.fetch_add(1, Ordering::Relaxed);
        }
        lines.fetch_add(count, Ordering::Relaxed);
    }
}

/// Waits until `lines` has not moved for `quiet` (at most `max`).
fn wait_quiet(lines: &AtomicU64, quiet: Duration, max: Duration) {
    let deadline = Instant::now() + max;
    let mut last = (lines.load(Ordering::Relaxed), Instant::now());
    while Instant::now() < deadline && last.1.elapsed() < quiet {
        std::thread::sleep(Duration::from_millis(20));
        let now = lines.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
}

fn print_table(section: &Value) {
    println!(
        "\n{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "offered/s", "achieved/s", "attempted", "printed", "lost", "ring_full", "fol_drop"
    );
    for r in section["rates"].as_array().into_iter().flatten() {
        let cells: Vec<String> = [
            "offered_events_per_s",
            "achieved_events_per_s",
            "kernel_events_attempted",
            "printed_by_follower",
            "lost",
            "ring_full",
            "follower_dropped_in_moatd",
        ]
        .iter()
        .map(|k| format!("{:>10}", r[*k].to_string()))
        .collect();
        println!("{}", cells.join(" "));
    }
    println!(
        "follow_max_lossless_events_per_s: {} (target {})",
        section["follow_max_lossless_events_per_s"], section["target_events_per_s"]
    );
    let full = &section["status_with_full_conntrack"];
    println!(
        "status with {} conntrack entries: {} ms (a key-by-key walk: {} ms)",
        full["conntrack_entries"], full["status_request_ms_p50"], full["key_walk_ms_p50"]
    );
}
