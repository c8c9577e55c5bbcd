//! `moat-bench cni`: the CNI part of `make bench`. In one run, interleaved pod by pod so that
//! drift hits every configuration alike, it times ADD and DEL (each on a fresh network
//! namespace) through four network configuration lists, executed the way libcni executes them
//! (plugins in order with prevResult, DEL in reverse with the cached result):
//!
//!   bridge_host_local:  reference `bridge` + `host-local` (/usr/lib/cni)
//!   moat_standalone:    `moat-cni` standalone + `moat-ipam`, against a private moatd
//!   chained_bridge_moat: `bridge` + `host-local`, then `moat-cni` chained
//!   ptp_host_local:     reference `ptp` + `host-local` (kindnet's datapath on kind)
//!
//! and writes the "cni" section of the results file (other sections are kept): p50/p99 per
//! configuration, `add_p50_ratio_vs_bridge`, `del_p50_ratio_vs_bridge`,
//! `chained_add_overhead_ms` (= p50 chained ADD - p50 bridge ADD), and Moat standalone against
//! ptp: `add_p50_ratio_vs_ptp`, `del_p50_ratio_vs_ptp`, `add_p99_ratio_vs_ptp`,
//! `del_p99_ratio_vs_ptp`. Every pod is registered
//! with moatd under a policy that selects it, so the Moat numbers include real enforcement
//! set-up. Everything created (namespaces, bridges, moatd, pins, state) is removed again.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use moat_testkit::{Moatd, cni};
use serde_json::{Map, Value, json};

use crate::util::{self, check_interrupted, round};

const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const PIN_ROOT: &str = "/sys/fs/bpf/moat-bench-cni";
/// The target: Moat's DEL p50 at most half of bridge + host-local's.
const DEL_RATIO_TARGET: f64 = 0.5;

/// `moat-bench cni`'s flags.
#[derive(clap::Args)]
pub struct Args {
    /// The results file.
    #[arg(long, value_name = "FILE", default_value = "bench/results.json")]
    out: PathBuf,
    /// Timed pods per configuration (at least 2).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pods: usize,
    /// Pods run first and not counted.
    #[arg(long, value_name = "N", default_value_t = 5)]
    warmup: usize,
    /// Where moatd, moat-cni and moat-ipam are (default: next to moat-bench).
    #[arg(long = "bin-dir", value_name = "DIR")]
    bin_dir_flag: Option<PathBuf>,
    #[arg(skip)]
    bin_dir: PathBuf,
}

impl Args {
    fn resolve(&mut self) -> Result<()> {
        self.bin_dir = match self.bin_dir_flag.take() {
            Some(dir) => dir,
            None => util::exe_dir()?,
        };
        if self.pods < 2 {
            bail!("--pods must be at least 2");
        }
        Ok(())
    }
}

pub fn main(mut args: Args) -> ExitCode {
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
        eprintln!("moat-bench cni: {e:#}");
        section.insert("fatal_error".into(), json!(format!("{e:#}")));
    }
    if let Err(e) = write_merged(&args.out, Value::Object(section.clone())) {
        eprintln!("moat-bench cni: writing {}: {e:#}", args.out.display());
        return ExitCode::FAILURE;
    }
    print_table(&section);
    println!("\nwritten: {} (section \"cni\")", args.out.display());
    if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------------------------
// The private world: CNI_PATH, moatd, state directories. Removed on drop.
// ---------------------------------------------------------------------------------------------

struct World {
    dir: PathBuf,
    daemon: Option<Moatd>,
}

impl World {
    fn new(bin_dir: &Path) -> Result<World> {
        let dir = std::env::temp_dir().join(format!("moat-bench-cni-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(PIN_ROOT);
        let world = World { dir, daemon: None };
        for sub in ["bin", "policies", "pending", "state"] {
            std::fs::create_dir_all(world.dir.join(sub))?;
        }
        for name in ["moat-cni", "moat-ipam"] {
            let path = bin_dir.join(name);
            if !path.exists() {
                bail!(
                    "{} missing: build the workspace binaries first (make build)",
                    path.display()
                );
            }
            std::os::unix::fs::symlink(&path, world.cni_path().join(name))?;
        }
        for name in ["bridge", "ptp", "host-local"] {
            let path = Path::new(REFERENCE_PLUGINS).join(name);
            if !path.exists() {
                bail!(
                    "{} missing: install containernetworking-plugins (make bootstrap)",
                    path.display()
                );
            }
            std::os::unix::fs::symlink(&path, world.cni_path().join(name))?;
        }
        Ok(world)
    }

    fn cni_path(&self) -> PathBuf {
        self.dir.join("bin")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("moatd.sock")
    }

    fn moat_keys(&self) -> Value {
        json!({
            "socket": self.socket(),
            "pinRoot": PIN_ROOT,
            "pendingDir": self.dir.join("pending"),
        })
    }

    fn start_moatd(&mut self, moatd: &Path, pods: usize) -> Result<()> {
        // Every pod name the run uses, all selected by one policy: registration does real work.
        let mut yaml = String::new();
        for i in 0..pods {
            yaml += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod{i}\n  namespace: bench\n  labels:\n    app: bench\nspec:\n  containers:\n  - name: main\n---\n"
            );
        }
        std::fs::write(self.dir.join("policies/pods.yaml"), yaml)?;
        std::fs::write(
            self.dir.join("policies/policy.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: bench\n  namespace: bench\nspec:\n  podSelector:\n    matchLabels:\n      app: bench\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: bench\n    ports:\n    - port: 8080\n",
        )?;
        if !moatd.exists() {
            bail!("{} missing: make build builds it", moatd.display());
        }
        let daemon = Moatd::builder(moatd)
            // The host's own namespace: no host-wide rules left behind by a benchmark.
            .no_host_rules()
            .layout(&self.dir)
            .pin_root(PIN_ROOT)
            .poll_ms(100)
            .quiet()
            // moatd dies with this process, even on SIGKILL.
            .die_with_parent()
            .wait_for_ready()
            .timeout(Duration::from_secs(30))
            .spawn()?;
        self.daemon = Some(daemon);
        Ok(())
    }

    fn moatd(&self, request: &Value) -> Option<Value> {
        let mut stream = UnixStream::connect(self.socket()).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let mut line = serde_json::to_vec(request).ok()?;
        line.push(b'\n');
        stream.write_all(&line).ok()?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).ok()?;
        serde_json::from_str(&answer).ok()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        drop(self.daemon.take());
        for link in ["mbcni0", "mbcni2"] {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        let _ = std::fs::remove_dir_all(PIN_ROOT);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A namespace from `ip netns add`, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        util::sh(&format!("ip netns add {name}"))?;
        Ok(Netns(name.to_string()))
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

// ---------------------------------------------------------------------------------------------
// libcni-like execution
// ---------------------------------------------------------------------------------------------

struct Conflist {
    key: &'static str,
    name: String,
    version: &'static str,
    plugins: Vec<Value>,
}

struct Attachment<'a> {
    container_id: String,
    netns: &'a Netns,
    pod: String,
}

fn exec_plugin(
    cni_path: &Path,
    config: &Value,
    command: &str,
    att: &Attachment<'_>,
) -> Result<Value> {
    let plugin = config["type"].as_str().context("plugin type")?;
    let output = cni::Exec::new(cni_path.join(plugin), command)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .path(cni_path)
        .container_id(&att.container_id)
        .netns(att.netns.path())
        .ifname("eth0")
        .args(format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={}",
            att.pod
        ))
        .run(Some(config))
        .with_context(|| format!("spawning {plugin}"))?;
    if !output.status.success() {
        bail!(
            "{plugin} {command} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.json()?)
}

impl Conflist {
    fn config(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut config = plugin.clone();
        config["name"] = json!(self.name);
        config["cniVersion"] = json!(self.version);
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        config
    }

    /// ADD through the list; returns (elapsed, the list's result).
    fn add(&self, world: &World, att: &Attachment<'_>) -> Result<(Duration, Value)> {
        let started = Instant::now();
        let mut prev: Option<Value> = None;
        for plugin in &self.plugins {
            let config = self.config(plugin, prev.as_ref());
            prev = Some(exec_plugin(&world.cni_path(), &config, "ADD", att)?);
        }
        let elapsed = started.elapsed();
        Ok((elapsed, prev.unwrap_or(Value::Null)))
    }

    /// DEL in reverse, each plugin with the cached result.
    fn del(&self, world: &World, att: &Attachment<'_>, cached: &Value) -> Result<Duration> {
        let started = Instant::now();
        for plugin in self.plugins.iter().rev() {
            let config = self.config(plugin, Some(cached));
            exec_plugin(&world.cni_path(), &config, "DEL", att)?;
        }
        Ok(started.elapsed())
    }
}

fn conflists(world: &World) -> Vec<Conflist> {
    let host_local = |subnet: &str, dir: &str| {
        json!({
            "type": "host-local",
            "dataDir": world.dir.join(dir),
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}]
        })
    };
    let with_keys = |mut plugin: Value| {
        for (k, v) in world.moat_keys().as_object().expect("object") {
            plugin[k] = v.clone();
        }
        plugin
    };
    vec![
        Conflist {
            key: "bridge_host_local",
            name: "mbcni-bridge".into(),
            // The Debian reference plugins speak up to 1.0.0.
            version: "1.0.0",
            plugins: vec![json!({
                "type": "bridge",
                "bridge": "mbcni0",
                "isGateway": true,
                "ipam": host_local("10.213.0.0/24", "hl0"),
            })],
        },
        Conflist {
            key: "moat_standalone",
            name: "mbcni-moat".into(),
            version: "1.1.0",
            plugins: vec![with_keys(json!({
                "type": "moat-cni",
                "mode": "standalone",
                "ipam": {
                    "type": "moat-ipam",
                    "dataDir": world.dir.join("moat-ipam"),
                    "ranges": [[{"subnet": "10.213.1.0/24"}]]
                }
            }))],
        },
        Conflist {
            key: "chained_bridge_moat",
            name: "mbcni-chained".into(),
            version: "1.0.0",
            plugins: vec![
                json!({
                    "type": "bridge",
                    "bridge": "mbcni2",
                    "isGateway": true,
                    "ipam": host_local("10.213.2.0/24", "hl2"),
                }),
                with_keys(json!({"type": "moat-cni", "mode": "chained"})),
            ],
        },
        Conflist {
            key: "ptp_host_local",
            name: "mbcni-ptp".into(),
            version: "1.0.0",
            // kindnet's: no masquerade (kindnet does its own), MTU 1500, a default route.
            plugins: vec![json!({
                "type": "ptp",
                "ipMasq": false,
                "mtu": 1500,
                "ipam": host_local("10.213.3.0/24", "hl3"),
            })],
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(samples: &[f64]) -> Value {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    json!({
        "n": v.len(),
        "p50": round(percentile(&v, 50.0), 2),
        "p99": round(percentile(&v, 99.0), 2),
        "mean": round(mean, 2),
        "min": round(v[0], 2),
        "max": round(v[v.len() - 1], 2),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Devices whose tc filters run one of the programs pinned in `pins`.
fn tc_attached_veths(pins: &moat_datapath::PinDir) -> usize {
    let ours: Vec<u32> = moat_datapath::loader::pinned_programs(pins)
        .iter()
        .map(|p| p.id)
        .collect();
    moat_datapath::tc::devices_running(&ours).len()
}

pub(crate) fn host_local_allocations(dir: &Path) -> usize {
    // host-local keeps one file per address (plus last_reserved_ip.* and lock).
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .flat_map(|net| {
                    std::fs::read_dir(net.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                })
                .filter(|f| {
                    f.file_name()
                        .to_string_lossy()
                        .parse::<std::net::IpAddr>()
                        .is_ok()
                })
                .count()
        })
        .unwrap_or(0)
}

fn run(args: &Args, section: &mut Map<String, Value>) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("moat-bench cni must run as root (namespaces, veths, eBPF)");
    }
    if util::sh("mountpoint -q /sys/fs/bpf").is_err() {
        util::sh("mount -t bpf bpf /sys/fs/bpf")?;
    }
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    section.insert("generated_at_unix".into(), json!(unix));
    section.insert(
        "host".into(),
        json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "reference_plugins": util::sh("dpkg-query -W -f '${Version}' containernetworking-plugins 2>/dev/null")
                .map(|v| format!("containernetworking-plugins {}", v.trim()))
                .unwrap_or_else(|_| "unknown".into()),
            "moat_binaries": args.bin_dir,
        }),
    );

    let mut world = World::new(&args.bin_dir)?;
    world.start_moatd(&args.bin_dir.join("moatd"), args.pods)?;
    let lists = conflists(&world);
    section.insert(
        "method".into(),
        json!({
            "summary": "one run, interleaved: for each pod index, each configuration (order rotated per index) gets a fresh netns, one timed ADD through its list, one timed DEL (reverse order, cached result as prevResult, as libcni does), then the netns is deleted. Times are wall-clock around the list's plugin executions (process spawn included). Warm-up pods are discarded.",
            "pods": args.pods,
            "warmup_pods": args.warmup,
            "command": format!("moat-bench cni --out {} --pods {} --warmup {}", args.out.display(), args.pods, args.warmup),
            "make_target": "make bench (bench/run.sh runs `moat-bench datapath` then `moat-bench cni`)",
            "moatd": "private moatd (policy dir with one Pod per pod name and a NetworkPolicy selecting all of them), private pin root",
            "conflists": lists.iter().map(|l| (l.key.to_string(), json!({"name": l.name, "cniVersion": l.version, "plugins": l.plugins}))).collect::<Map<String, Value>>(),
        }),
    );

    let mut add: Vec<Vec<f64>> = vec![Vec::new(); lists.len()];
    let mut del: Vec<Vec<f64>> = vec![Vec::new(); lists.len()];
    let total = args.warmup + args.pods;
    eprintln!(
        "moat-bench: CNI ADD/DEL, {} pods x {} configurations (+{} warm-up)",
        args.pods,
        lists.len(),
        args.warmup
    );
    for i in 0..total {
        check_interrupted()?;
        for k in 0..lists.len() {
            let c = (i + k) % lists.len();
            let list = &lists[c];
            let netns = Netns::new(&format!("mbc{}-{c}", std::process::id() % 100_000))?;
            let pod = i % args.pods;
            let att = Attachment {
                container_id: format!("mbc{i}x{c}"),
                netns: &netns,
                pod: format!("pod{pod}"),
            };
            let (t_add, result) = list
                .add(&world, &att)
                .with_context(|| format!("{} ADD #{i}", list.key))?;
            if result["ips"].as_array().is_none_or(Vec::is_empty) {
                bail!("{} ADD #{i} returned no address: {result}", list.key);
            }
            let t_del = list
                .del(&world, &att, &result)
                .with_context(|| format!("{} DEL #{i}", list.key))?;
            if i >= args.warmup {
                add[c].push(ms(t_add));
                del[c].push(ms(t_del));
            }
        }
        if (i + 1) % 25 == 0 {
            eprintln!("moat-bench:   {}/{total}", i + 1);
        }
    }

    // Nothing may be left behind by any configuration.
    let endpoints = world
        .moatd(&json!({"op": "list_endpoints"}))
        .and_then(|v| v["endpoints"].as_array().map(Vec::len));
    let pin_dir = moat_datapath::PinDir::new(PIN_ROOT);
    let pins = moat_datapath::attach::attached_interfaces(&pin_dir)
        .map(|v| v.len())
        .unwrap_or(0);
    // Veths still carrying this moatd's tc filters: standalone DEL leaves the veth to moatd,
    // which deletes it right after answering, so allow that a bounded moment.
    let tc_veths = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = tc_attached_veths(&pin_dir);
            if left == 0 || Instant::now() >= deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let moat_ipam = std::fs::read_to_string(world.dir.join("moat-ipam/mbcni-moat/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["allocations"].as_array().map(Vec::len));
    let host_local = host_local_allocations(&world.dir.join("hl0"))
        + host_local_allocations(&world.dir.join("hl2"))
        + host_local_allocations(&world.dir.join("hl3"));
    let leaks = json!({
        "moatd_endpoints": endpoints,
        "attached_pins": pins,
        "tc_attached_veths": tc_veths,
        "moat_ipam_allocations": moat_ipam,
        "host_local_allocations": host_local,
    });
    let clean = endpoints == Some(0)
        && pins == 0
        && tc_veths == 0
        && moat_ipam == Some(0)
        && host_local == 0;
    section.insert("left_behind".into(), leaks);

    let mut configs = Map::new();
    for (c, list) in lists.iter().enumerate() {
        configs.insert(
            list.key.into(),
            json!({"add_ms": stats(&add[c]), "del_ms": stats(&del[c])}),
        );
    }
    let pct = |v: &[f64], p: f64| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        percentile(&s, p)
    };
    let p50 = |v: &[f64]| pct(v, 50.0);
    let index = |key: &str| {
        lists
            .iter()
            .position(|l| l.key == key)
            .expect("a configured list")
    };
    let (bridge, moat, chained, ptp) = (
        index("bridge_host_local"),
        index("moat_standalone"),
        index("chained_bridge_moat"),
        index("ptp_host_local"),
    );
    let (bridge_add, bridge_del) = (p50(&add[bridge]), p50(&del[bridge]));
    let add_ratio = p50(&add[moat]) / bridge_add;
    let del_ratio = p50(&del[moat]) / bridge_del;
    let overhead = p50(&add[chained]) - bridge_add;
    let vs_ptp = |times: &[Vec<f64>], p: f64| round(pct(&times[moat], p) / pct(&times[ptp], p), 3);
    let (add_vs_ptp, del_vs_ptp) = (vs_ptp(&add, 50.0), vs_ptp(&del, 50.0));
    let (add_p99_vs_ptp, del_p99_vs_ptp) = (vs_ptp(&add, 99.0), vs_ptp(&del, 99.0));
    section.insert("configs".into(), Value::Object(configs));
    section.insert("add_p50_ratio_vs_bridge".into(), json!(round(add_ratio, 3)));
    section.insert("del_p50_ratio_vs_bridge".into(), json!(round(del_ratio, 3)));
    section.insert("chained_add_overhead_ms".into(), json!(round(overhead, 2)));
    section.insert("add_p50_ratio_vs_ptp".into(), json!(add_vs_ptp));
    section.insert("del_p50_ratio_vs_ptp".into(), json!(del_vs_ptp));
    section.insert("add_p99_ratio_vs_ptp".into(), json!(add_p99_vs_ptp));
    section.insert("del_p99_ratio_vs_ptp".into(), json!(del_p99_vs_ptp));
    section.insert(
        "targets".into(),
        json!({
            "del_p50_ratio_vs_bridge": {
                "target": format!("<= {DEL_RATIO_TARGET}"),
                "value": round(del_ratio, 3),
                "met": del_ratio <= DEL_RATIO_TARGET,
            },
            "add_p50_ratio_vs_bridge": {"value": round(add_ratio, 3), "note": "reported; moat_standalone p50 ADD / bridge_host_local p50 ADD"},
            "chained_add_overhead_ms": {"value": round(overhead, 2), "note": "reported; p50 chained list ADD - p50 bridge list ADD"},
            "vs_ptp": {
                "add_p50_ratio_vs_ptp": add_vs_ptp,
                "del_p50_ratio_vs_ptp": del_vs_ptp,
                "add_p99_ratio_vs_ptp": add_p99_vs_ptp,
                "del_p99_ratio_vs_ptp": del_p99_vs_ptp,
                "note": "reported; moat_standalone / ptp_host_local at the same percentile (below 1: Moat faster)",
            },
            "nothing_left_behind": clean,
        }),
    );
    if !clean {
        bail!("state left behind after DEL: {}", section["left_behind"]);
    }
    Ok(())
}

fn write_merged(path: &Path, cni: Value) -> Result<()> {
    let mut root = match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        Err(_) => Map::new(),
    };
    root.insert("cni".into(), cni);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.cni.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&Value::Object(root))? + "\n",
    )?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn print_table(section: &Map<String, Value>) {
    let Some(Value::Object(configs)) = section.get("configs") else {
        return;
    };
    println!(
        "\n{:<22} {:>9} {:>9} {:>9} {:>9}",
        "CNI (ms)", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    for (name, c) in configs {
        println!(
            "{:<22} {:>9} {:>9} {:>9} {:>9}",
            name, c["add_ms"]["p50"], c["add_ms"]["p99"], c["del_ms"]["p50"], c["del_ms"]["p99"]
        );
    }
    for key in [
        "add_p50_ratio_vs_bridge",
        "del_p50_ratio_vs_bridge",
        "chained_add_overhead_ms",
        "add_p50_ratio_vs_ptp",
        "del_p50_ratio_vs_ptp",
        "add_p99_ratio_vs_ptp",
        "del_p99_ratio_vs_ptp",
    ] {
        if let Some(v) = section.get(key) {
            println!("{key}: {v}");
        }
    }
}
