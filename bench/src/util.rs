//! Process helpers, statistics, and the guards that undo everything the benchmark creates
//! (interfaces, pins, iptables rules, server processes) even when a step fails.

use std::{
    io::Read,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use moat_datapath::{PinDir, detach_endpoint};

// ---------------------------------------------------------------------------------------------
// Interruption: SIGINT/SIGTERM only set a flag, so that the guards below still run.
// ---------------------------------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// The directory of the running executable (where `make build` puts moatd, moatctl, moat-cni
/// and moat-ipam next to moat-bench).
pub fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("exe dir")?.to_path_buf())
}

/// Runs a shell command, failing with its output.
pub fn sh(cmd: &str) -> Result<String> {
    moat_testkit::lab::sh(cmd)
}

pub fn which(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `program args` and returns (stdout, stderr); kills it if it outlives `timeout`.
pub fn run_timeout(program: &str, args: &[&str], timeout: Duration) -> Result<(String, String)> {
    let display = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {display}"))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline || INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    match status {
        None => bail!("timed out after {timeout:?}: {display}\n{out}{err}"),
        Some(s) if !s.success() => bail!("failed ({s}): {display}\n{out}{err}"),
        Some(_) => Ok((out, err)),
    }
}

/// A long-running process (a server in a pod), killed on drop.
pub struct ChildGuard {
    pub what: String,
    child: Child,
}

impl ChildGuard {
    pub fn spawn(program: &str, args: &[&str]) -> Result<Self> {
        let what = format!("{program} {}", args.join(" "));
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        Ok(Self { what, child })
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status})", self.what);
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something listens on TCP `port` inside `netns`.
pub fn wait_listening(netns: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = sh(&format!("ip netns exec {netns} ss -Hltn 'sport = :{port}'"))?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on port {port} in {netns} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------------------------

/// A bpffs directory removed (with every pin, hence every pinned link, under it) on drop.
pub struct PinRootGuard {
    pub root: PathBuf,
}

impl PinRootGuard {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let _ = std::fs::remove_dir_all(&root);
        Self { root }
    }
}

impl Drop for PinRootGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A veth pair in the host namespace (a real device for BPF_PROG_TEST_RUN).
pub struct VethGuard {
    pub name: String,
    pub ifindex: u32,
}

impl VethGuard {
    pub fn new(name: &str) -> Result<Self> {
        let _ = sh(&format!("ip link del {name} 2>/dev/null"));
        sh(&format!(
            "ip link add {name} type veth peer name {name}p && ip link set {name} up"
        ))?;
        // Owned from here on: a failure below still removes the pair.
        let mut guard = Self {
            name: name.to_string(),
            ifindex: 0,
        };
        guard.ifindex = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))?
            .trim()
            .parse()?;
        Ok(guard)
    }
}

impl Drop for VethGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// Moat's programs attached to some host-side veths; detached on drop.
pub struct AttachGuard {
    pins: PinDir,
    ifnames: Vec<String>,
}

impl AttachGuard {
    pub fn attach(
        pins: &PinDir,
        ifnames: &[&str],
        mode: moat_datapath::AttachMode,
    ) -> Result<Self> {
        let mut guard = Self {
            pins: pins.clone(),
            ifnames: Vec::new(),
        };
        for ifname in ifnames {
            moat_datapath::attach_endpoint_with(pins, ifname, mode)
                .with_context(|| format!("attaching {ifname}"))?;
            guard.ifnames.push(ifname.to_string());
        }
        Ok(guard)
    }
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        for ifname in &self.ifnames {
            let _ = detach_endpoint(&self.pins, ifname);
        }
    }
}

/// Every iptables rule this benchmark adds carries this comment prefix.
pub const IPTABLES_TAG: &str = "moat-bench";

/// Removes every FORWARD rule tagged by this benchmark (this run's or a crashed earlier run's),
/// in one iptables-restore batch built from the rules' canonical form.
pub fn remove_tagged_iptables_rules() -> Result<usize> {
    let rules = sh("iptables -w -S FORWARD")?;
    let deletes: Vec<String> = rules
        .lines()
        .filter(|l| l.starts_with("-A FORWARD ") && l.contains(IPTABLES_TAG))
        .map(|l| l.replacen("-A FORWARD ", "-D FORWARD ", 1))
        .collect();
    if deletes.is_empty() {
        return Ok(0);
    }
    let script = format!("*filter\n{}\nCOMMIT\n", deletes.join("\n"));
    restore(&script)?;
    Ok(deletes.len())
}

pub fn restore(script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning iptables-restore")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `count` never-matching FORWARD DROP rules behind a conntrack fast path; removed on drop.
pub struct IptablesGuard {
    pub load_ms: f64,
}

impl IptablesGuard {
    pub fn load(count: usize) -> Result<Self> {
        let tag = format!("{IPTABLES_TAG}-{}", std::process::id());
        let mut script = String::from("*filter\n");
        script.push_str(&format!(
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -m comment --comment {tag} \
             -j ACCEPT\n"
        ));
        for i in 0..count {
            // 10.255.0.0/16 is never a lab address: none of these rules ever matches.
            script.push_str(&format!(
                "-A FORWARD -s 10.255.{}.{}/32 -m comment --comment {tag} -j DROP\n",
                i / 250,
                i % 250 + 1
            ));
        }
        script.push_str("COMMIT\n");
        let started = Instant::now();
        if let Err(e) = restore(&script) {
            let _ = remove_tagged_iptables_rules();
            return Err(e);
        }
        Ok(Self {
            load_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

impl Drop for IptablesGuard {
    fn drop(&mut self) {
        if let Err(e) = remove_tagged_iptables_rules() {
            eprintln!("moat-bench: removing iptables rules: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The spread of a figure over rounds: n, min, first quartile, median, third quartile, max
/// (quartiles interpolated linearly between order statistics); nulls when there is no value.
pub fn spread(values: &[f64], digits: i32) -> serde_json::Value {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        let pos = p * (v.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        Some(round(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64), digits))
    };
    serde_json::json!({
        "n": v.len(),
        "min": q(0.0),
        "q1": q(0.25),
        "median": q(0.5),
        "q3": q(0.75),
        "max": q(1.0),
    })
}

/// Rounds to `digits` decimals, for readable JSON.
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// A small deterministic generator (xorshift64*), so every run fills the maps alike.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Replaces one section of the results file, keeping the others (atomically).
pub fn write_section(path: &std::path::Path, name: &str, section: serde_json::Value) -> Result<()> {
    use serde_json::{Map, Value};
    let mut root = match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        Err(_) => Map::new(),
    };
    root.insert(name.into(), section);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("json.{name}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&Value::Object(root))? + "\n",
    )?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
