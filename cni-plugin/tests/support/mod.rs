//! A small libcni-like runtime for the real-plugin tests: runs a conflist's plugins in order
//! with prevResult (DEL in reverse with the cached result), against the real binaries, a
//! private moatd and private network namespaces. Everything is removed on drop.

#![allow(dead_code)]

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use moat_datapath::PinDir;
use moat_testkit::{Moatd, cni::Exec, lab::LabPod};
use serde_json::{Value, json};

pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// target/debug/<name>, where cargo puts the workspace binaries (`make test` builds them first).
pub use moat_testkit::workspace_bin;

pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "run as root (make test does)"
    );
    assert!(
        Path::new(REFERENCE_PLUGINS).join("bridge").exists(),
        "install containernetworking-plugins (scripts/bootstrap.sh does)"
    );
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The private world of one test: a CNI_PATH dir, moatd dirs, a pin root.
pub struct World {
    pub tag: String,
    pub dir: tempfile::TempDir,
    pub pin_root: PathBuf,
    daemon: Option<Moatd>,
}

impl World {
    pub fn new(tag: &str) -> World {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_moat-cni"), bin.join("moat-cni")).unwrap();
        std::os::unix::fs::symlink(workspace_bin("moat-ipam"), bin.join("moat-ipam")).unwrap();
        for plugin in ["bridge", "ptp", "host-local", "portmap", "loopback"] {
            std::os::unix::fs::symlink(Path::new(REFERENCE_PLUGINS).join(plugin), bin.join(plugin))
                .unwrap();
        }
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        let pin_root = PathBuf::from(format!(
            "/sys/fs/bpf/moat-test/cni-{tag}{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin_root);
        World {
            tag: tag.to_string(),
            dir,
            pin_root,
            daemon: None,
        }
    }

    pub fn cni_path(&self) -> PathBuf {
        self.dir.path().join("bin")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("moatd.sock")
    }
    pub fn pending(&self) -> PathBuf {
        self.dir.path().join("pending")
    }
    pub fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }
    pub fn pins(&self) -> PinDir {
        PinDir::new(&self.pin_root)
    }

    /// Moat's plugin keys pointing at this world's moatd.
    pub fn moat_keys(&self) -> Value {
        json!({
            "socket": self.socket(),
            "pinRoot": self.pin_root,
            "pendingDir": self.pending(),
            "registrationTimeoutMs": 5000,
        })
    }

    pub fn start_moatd(&mut self) {
        let daemon = Moatd::builder(workspace_bin("moatd"))
            .layout(self.dir.path())
            .pin_root(&self.pin_root)
            .poll_ms(100)
            .quiet()
            .timeout(Duration::from_secs(30))
            .spawn()
            .unwrap_or_else(|e| panic!("moatd did not become ready: {e:#}"));
        self.daemon = Some(daemon);
    }

    pub fn stop_moatd(&mut self) {
        drop(self.daemon.take());
    }

    /// One raw request to moatd; None when it is not reachable.
    pub fn moatd(&self, request: Value) -> Option<Value> {
        use std::io::{BufRead, BufReader};
        let mut stream = std::os::unix::net::UnixStream::connect(self.socket()).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let mut line = serde_json::to_vec(&request).unwrap();
        line.push(b'\n');
        stream.write_all(&line).ok()?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).ok()?;
        serde_json::from_str(&answer).ok()
    }

    /// (container_id, ifname, host_ifname) of every endpoint moatd knows.
    pub fn endpoints(&self) -> Vec<(String, String, String)> {
        let answer = self
            .moatd(json!({"op": "list_endpoints"}))
            .expect("moatd reachable");
        answer["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let s = &e["spec"];
                (
                    s["container_id"].as_str().unwrap().to_string(),
                    s["ifname"].as_str().unwrap().to_string(),
                    s["host_ifname"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn write_policy(&self, file: &str, yaml: &str) {
        let tmp = self.policies().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, self.policies().join(file)).unwrap();
    }

    pub fn attached(&self) -> Vec<String> {
        moat_datapath::attach::attached_interfaces(&self.pins()).unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_moatd();
        for name in self.attached() {
            let _ = moat_datapath::detach_endpoint(&self.pins(), &name);
        }
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        sh(&format!("ip -n {name} link set lo up"));
        Netns {
            name: name.to_string(),
        }
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.name))
    }
    pub fn delete(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// What a plugin printed: Ok(result or Null) on exit 0, Err(error document) otherwise.
pub type Outcome = Result<Value, Value>;

pub fn code(outcome: &Outcome) -> u64 {
    match outcome {
        Ok(v) => panic!("expected an error, got success {v}"),
        Err(e) => e["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {e}")),
    }
}

/// One attachment's invocation context.
#[derive(Clone)]
pub struct Invocation {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
    /// Extra environment for the plugins (test hooks).
    pub env: Vec<(String, String)>,
}

impl Invocation {
    pub fn new(container_id: &str, netns: &Netns, pod_namespace: &str, pod_name: &str) -> Self {
        Invocation {
            container_id: container_id.to_string(),
            netns: Some(netns.path()),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={pod_namespace};K8S_POD_NAME={pod_name};K8S_POD_UID=uid-{pod_name}"
            ),
            env: Vec::new(),
        }
    }
}

pub fn exec_plugin(
    cni_path: &Path,
    plugin_type: &str,
    command: &str,
    inv: Option<&Invocation>,
    config: &Value,
) -> Outcome {
    exec_plugin_status(cni_path, plugin_type, command, inv, config).0
}

/// Like [`exec_plugin`], also returning how the process ended.
pub fn exec_plugin_status(
    cni_path: &Path,
    plugin_type: &str,
    command: &str,
    inv: Option<&Invocation>,
    config: &Value,
) -> (Outcome, std::process::ExitStatus) {
    let mut exec = Exec::new(cni_path.join(plugin_type), command);
    exec.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .path(cni_path);
    if let Some(inv) = inv {
        exec.container_id(&inv.container_id)
            .ifname(&inv.ifname)
            .args(&inv.args);
        for (key, value) in &inv.env {
            exec.env(key, value);
        }
        if let Some(netns) = &inv.netns {
            exec.netns(netns);
        }
    }
    let output = exec
        .run(Some(config))
        .unwrap_or_else(|e| panic!("spawning {plugin_type}: {e}"));
    let parsed = output.json().unwrap_or_else(|e| {
        panic!(
            "{plugin_type} {command}: stdout not JSON ({e}): {:?} stderr {:?}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let outcome = if output.status.success() {
        Ok(parsed)
    } else {
        Err(parsed)
    };
    (outcome, output.status)
}

/// A network configuration list, run the way libcni runs one.
pub struct Conflist {
    pub name: String,
    pub version: String,
    pub plugins: Vec<Value>,
}

impl Conflist {
    pub fn new(name: &str, plugins: Vec<Value>) -> Conflist {
        Conflist {
            name: name.into(),
            version: "1.1.0".into(),
            plugins,
        }
    }

    pub fn plugin_config(&self, plugin: &Value, prev: Option<&Value>, extra: &Value) -> Value {
        let mut config = plugin.clone();
        config["name"] = json!(self.name);
        config["cniVersion"] = json!(self.version);
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        // runtimeConfig only for declared capabilities, as libcni does.
        if let Some(caps) = plugin["capabilities"].as_object() {
            let mut runtime = serde_json::Map::new();
            for (cap, on) in caps {
                if on.as_bool() == Some(true)
                    && let Some(v) = extra.get(cap)
                {
                    runtime.insert(cap.clone(), v.clone());
                }
            }
            if !runtime.is_empty() {
                config["runtimeConfig"] = Value::Object(runtime);
            }
        }
        config
    }

    fn plugin_type(plugin: &Value) -> String {
        plugin["type"].as_str().unwrap().to_string()
    }

    /// ADD through the list; the last result is the list's result. `runtime` carries
    /// capability arguments (e.g. portMappings).
    pub fn add(&self, world: &World, inv: &Invocation, runtime: &Value) -> Outcome {
        let mut prev: Option<Value> = None;
        for plugin in &self.plugins {
            let config = self.plugin_config(plugin, prev.as_ref(), runtime);
            let result = exec_plugin(
                &world.cni_path(),
                &Self::plugin_type(plugin),
                "ADD",
                Some(inv),
                &config,
            )?;
            prev = Some(result);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL in reverse order, each plugin getting the cached list result (libcni).
    pub fn del(
        &self,
        world: &World,
        inv: &Invocation,
        cached: Option<&Value>,
        runtime: &Value,
    ) -> Outcome {
        for plugin in self.plugins.iter().rev() {
            let config = self.plugin_config(plugin, cached, runtime);
            exec_plugin(
                &world.cni_path(),
                &Self::plugin_type(plugin),
                "DEL",
                Some(inv),
                &config,
            )?;
        }
        Ok(Value::Null)
    }

    pub fn check(
        &self,
        world: &World,
        inv: &Invocation,
        cached: &Value,
        runtime: &Value,
    ) -> Outcome {
        for plugin in &self.plugins {
            let config = self.plugin_config(plugin, Some(cached), runtime);
            exec_plugin(
                &world.cni_path(),
                &Self::plugin_type(plugin),
                "CHECK",
                Some(inv),
                &config,
            )?;
        }
        Ok(Value::Null)
    }

    /// STATUS/GC on one plugin of the list (index), network-wide.
    pub fn network_command(
        &self,
        world: &World,
        index: usize,
        command: &str,
        extra: &Value,
    ) -> Outcome {
        let mut config = self.plugin_config(&self.plugins[index], None, &json!({}));
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        exec_plugin(
            &world.cni_path(),
            &Self::plugin_type(&self.plugins[index]),
            command,
            None,
            &config,
        )
    }
}

/// Merges `extra`'s keys into `base`.
pub fn merged(mut base: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// A pod of a test as the datapath lab's probes see it.
pub fn lab_pod(
    netns: &Netns,
    name: &str,
    host_if: &str,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
) -> LabPod {
    let ifindex: u32 = std::fs::read_to_string(format!("/sys/class/net/{host_if}/ifindex"))
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(0);
    LabPod {
        name: name.into(),
        netns: netns.name.clone(),
        host_if: host_if.into(),
        ifindex,
        v4,
        v6: v6.unwrap_or(Ipv6Addr::LOCALHOST),
    }
}

/// The container-side address of `family` in a result.
pub fn result_ip(result: &Value, v6: bool) -> Option<IpAddr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let address: IpAddr = ip["address"].as_str()?.split('/').next()?.parse().ok()?;
        (address.is_ipv6() == v6).then_some(address)
    })
}

/// The host-side interface (no sandbox, not the bridge) of a result.
pub fn result_host_if(result: &Value, skip: &[&str]) -> String {
    result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.get("sandbox").is_none() && !skip.contains(&i["name"].as_str().unwrap()))
        .map(|i| i["name"].as_str().unwrap().to_string())
        .expect("host interface in result")
}

pub fn pod_yaml(namespace: &str, name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    app: {app}\nspec:\n  containers:\n  - name: main\n    ports:\n    - name: http\n      containerPort: 8080\n---\n"
    )
}

pub fn web_policy(namespace: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web\n  namespace: {namespace}\nspec:\n  podSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: client\n    ports:\n    - port: 8080\n"
    )
}

/// Whether the kernel's device list has the link, asked over netlink (`ip link show`). Not
/// /sys/class/net: a device being unregistered leaves the device list (and its tc filters
/// with it) before its sysfs entry goes, so sysfs would report a link that netlink, the
/// filter query and the packet path no longer see.
pub fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// IFF_UP set on the host link (false when it does not exist).
pub fn link_up(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/flags"))
        .ok()
        .and_then(|t| u32::from_str_radix(t.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & 1 != 0)
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

/// What one attachment may leave behind anywhere, as a test knows it.
pub struct Trace {
    pub container_id: String,
    pub netns: String,
    pub host_if: String,
    /// The host veth's ifindex while it existed (0 if it never did).
    pub host_ifindex: u32,
    pub ips: Vec<IpAddr>,
}

/// Host veth ifindex, 0 when absent.
pub fn ifindex_of(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(0)
}

/// Allocations (address, container id) in moat-ipam's state for `network`.
pub fn ipam_state(world: &World, network: &str) -> Vec<(String, String)> {
    let path = world.ipam_dir().join(network).join("state.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let state: Value = serde_json::from_str(&text).unwrap();
            state["allocations"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|a| {
                            (
                                a["address"].as_str().unwrap().to_string(),
                                a["containerID"].as_str().unwrap().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        }
        Err(_) => Vec::new(),
    }
}

/// Asserts that nothing of these attachments is left: no host veth, no interface or address
/// in the pod namespace but loopback, no IPAM allocation or temp file, no pinned link, no
/// moatd endpoint, no endpoint or ipcache map entry.
pub fn assert_nothing_left(world: &World, network: &str, traces: &[Trace]) {
    // A standalone DEL leaves the host veth (isolated) for moatd to delete right after it
    // answers; give that (and the pod end, which goes with it) a bounded moment.
    for t in traces {
        wait_until(&format!("{} deleted", t.host_if), || {
            !link_exists(&t.host_if)
                && sh(&format!("ip -n {} -o link show", t.netns))
                    .lines()
                    .count()
                    <= 1
                && moat_datapath::attach::set_aside_links_list(&world.pins())
                    .iter()
                    .all(|(index, _)| *index != t.host_ifindex || t.host_ifindex == 0)
        });
    }
    let endpoints = world.endpoints();
    let attached = world.attached();
    let allocations = ipam_state(world, network);
    let maps = moat_datapath::Maps::open(&world.pins()).expect("moatd's pinned maps");
    let endpoint_keys: Vec<u32> = maps.endpoints.keys().filter_map(Result::ok).collect();
    let ipcache: Vec<(IpAddr, u32, u32)> = maps
        .ipcache_v4
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (IpAddr::from(k.data().addr), k.prefix_len(), v.ifindex))
        .chain(
            maps.ipcache_v6
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| (IpAddr::from(k.data().addr), k.prefix_len(), v.ifindex)),
        )
        // The host entries' exact-match mirrors must go with them.
        .chain(
            maps.hosts_v4
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| (IpAddr::from(k.addr), 32, v.ifindex)),
        )
        .chain(
            maps.hosts_v6
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| (IpAddr::from(k.addr), 128, v.ifindex)),
        )
        .collect();
    for t in traces {
        let cid = &t.container_id;
        assert!(
            !link_exists(&t.host_if),
            "{cid}: host veth {} left",
            t.host_if
        );
        let pod_links = sh(&format!("ip -n {} -o link show", t.netns));
        assert_eq!(
            pod_links.lines().count(),
            1,
            "{cid}: only lo may be left in {}: {pod_links}",
            t.netns
        );
        let pod_addrs = sh(&format!("ip -n {} -o addr show", t.netns));
        assert!(
            pod_addrs.lines().all(|l| l.contains(" lo ")),
            "{cid}: addresses left in {}: {pod_addrs}",
            t.netns
        );
        assert!(
            allocations.iter().all(|(_, owner)| owner != cid),
            "{cid}: IPAM allocation left: {allocations:?}"
        );
        for ip in &t.ips {
            assert!(
                allocations.iter().all(|(a, _)| a != &ip.to_string()),
                "{cid}: {ip} still allocated"
            );
            assert!(
                ipcache
                    .iter()
                    .all(|(addr, len, _)| !(addr == ip && (*len == 32 || *len == 128))),
                "{cid}: ipcache entry for {ip} left"
            );
        }
        assert!(
            !attached.contains(&t.host_if),
            "{cid}: pinned links for {} left",
            t.host_if
        );
        if t.host_ifindex != 0 {
            let aside = moat_datapath::attach::set_aside_links_list(&world.pins());
            assert!(
                aside.iter().all(|(index, _)| *index != t.host_ifindex),
                "{cid}: set-aside link pins left: {aside:?}"
            );
        }
        assert!(
            endpoints.iter().all(|(c, _, _)| c != cid),
            "{cid}: moatd still knows the endpoint: {endpoints:?}"
        );
        if t.host_ifindex != 0 {
            assert!(
                !endpoint_keys.contains(&t.host_ifindex),
                "{cid}: endpoint map entry for ifindex {} left",
                t.host_ifindex
            );
            assert!(
                ipcache
                    .iter()
                    .all(|(_, _, ifindex)| *ifindex != t.host_ifindex),
                "{cid}: ipcache entry pointing at ifindex {} left",
                t.host_ifindex
            );
        }
    }
    let network_dir = world.ipam_dir().join(network);
    if let Ok(entries) = std::fs::read_dir(&network_dir) {
        let names: Vec<String> = entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "state.json" && n != "lock")
            .collect();
        assert!(names.is_empty(), "stray IPAM files: {names:?}");
    }
}

/// The host veth name standalone ADD derives, computed independently of the plugin:
/// prefix + leading hex digits of FNV-1a 64 of "containerID/ifname", 15 bytes in all.
pub fn host_veth_name(prefix: &str, container_id: &str, ifname: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{container_id}/{ifname}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{prefix}{}", &format!("{hash:016x}")[..15 - prefix.len()])
}
