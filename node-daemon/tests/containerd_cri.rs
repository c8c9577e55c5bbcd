//! A real container runtime end to end: containerd, through its CRI plugin, creates pod
//! sandboxes the way kubelet asks for them, calls moat-cni (standalone, with moat-ipam) from
//! its conflist, and Moat enforces a NetworkPolicy between those pods.
//!
//! - The runtime: a private containerd (its own root, state, socket, runc root and config:
//!   CRI plugin on, `sandbox_image` the local image below, CNI `bin_dir` holding this build's
//!   moat-cni and moat-ipam plus Debian's `loopback`, which containerd runs for every pod's
//!   `lo`). It runs in a network namespace of its own, the "node", like the test moatd, so the
//!   pods' host veths, routes and forwarding sysctls never touch the machine's own network.
//! - The image: no registry and no network. The test writes an OCI image layout itself (one
//!   layer: the static busybox, `/www/index.html`; config, manifest and index with sha256
//!   digests computed here) and imports the tarball with `ctr images import`. Its entrypoint is
//!   the pause process (a shell that sleeps until SIGTERM); the workload containers run
//!   busybox httpd from the same image.
//! - The client: CRI calls over containerd's socket (`support_cri`), since Debian packages no
//!   crictl: RunPodSandbox with metadata, labels and namespace as kubelet fills them,
//!   CreateContainer/StartContainer, ExecSync for the probes, StopPodSandbox and
//!   RemovePodSandbox.
//! - The cluster truth: the local datastore knows pods by the namespace and name containerd
//!   passes in CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME), so the Pod objects with their labels
//!   are written to moatd's policy directory, as a cluster's API server would hold them.
//!
//! What must hold: moatd sees each sandbox as an endpoint under the sandbox's id, pod uid and
//! network namespace with the pod's labels; the address containerd reports is moat-ipam's;
//! client reaches server, other is dropped (and moatd journals the drop), other's own server
//! stays open; StopPodSandbox's CNI DEL leaves no endpoint, veth, endpoint map entry or IPAM
//! allocation, and RemovePodSandbox no sandbox or network namespace.
//!
//! Skipped (SKIP: and the reason) only where containerd is not installed, does not start, or
//! cannot run even a host-network sandbox (no moat-cni involved); `make test` installs it
//! through scripts/bootstrap.sh.
//!
//! Cleanup: a Drop guard stops and removes the sandboxes through CRI (CNI DEL) while moatd
//! still runs, then kills containerd and whatever it left (shims, container processes),
//! unmounts, and removes the pods' cgroup parent (the test sets one, as kubelet does, so
//! nothing lands in a shared `/k8s.io` cgroup). A run killed before its Drop (a timeout, ^C)
//! is cleared by the next run: everything it made is named after its pid.

mod support_cni;
mod support_cri;
mod support_moatd;

use std::{
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use moat_datapath::Maps;
use moatd::api::{EndpointStatus, FlowFilter, Request, Response};
use serde_json::{Value, json};
use support_cri::{Cri, Pb, PodConfig};
use support_moatd::Env;

const NAMESPACE: &str = "cri-e2e";
const NETWORK: &str = "moat-cri";
const SUBNET: &str = "10.244.77.0/24";
const IMAGE: &str = "localhost/moat-test/busybox-pause:1";
const PORT: u16 = 8080;
/// The pause process: PID 1 of the sandbox ignores signals it has no handler for, so the
/// shell traps TERM; `sleep & wait` lets the trap run at once.
const PAUSE: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";
const INDEX_HTML: &str = "moat-cri\n";

fn pods_yaml() -> String {
    ["server", "client", "other"]
        .iter()
        .map(|role| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {role}\n  namespace: {NAMESPACE}\n  labels:\n    role: {role}\nspec:\n  containers:\n  - name: web\n    ports:\n    - name: http\n      containerPort: {PORT}\n---\n"
            )
        })
        .collect()
}

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: server-from-clients
  namespace: cri-e2e
spec:
  podSelector:
    matchLabels:
      role: server
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          role: client
    ports:
    - port: http
"#;

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

/// `name` on PATH or in the sbin directories a root shell has (runc lives in /usr/sbin).
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

struct Tools {
    containerd: PathBuf,
    ctr: PathBuf,
    /// PATH for containerd: where its shim and runc were found, then the test's own.
    path: std::ffi::OsString,
}

/// The runtime's binaries, or None after saying SKIP (containerd not installed).
fn tools() -> Option<Tools> {
    let mut found = Vec::new();
    for name in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
        match on_path(name) {
            Some(p) => found.push(p),
            None => {
                println!(
                    "SKIP: containerd_cri: {name} is not installed (scripts/bootstrap.sh installs \
                     the containerd package)"
                );
                return None;
            }
        }
    }
    let dirs = found.iter().map(|p| p.parent().unwrap().to_path_buf());
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(dirs.chain(std::env::split_paths(&inherited))).unwrap();
    Some(Tools {
        containerd: found[0].clone(),
        ctr: found[1].clone(),
        path,
    })
}

// --- the image ----------------------------------------------------------------------------

/// A ustar archive written in memory; mtime 0 and owner root, so the same content always
/// gives the same bytes and digests.
#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn entry(&mut self, path: &str, mode: u32, kind: u8, link: &str, data: &[u8]) {
        fn octal(field: &mut [u8], value: u64) {
            let digits = format!("{value:0width$o}", width = field.len() - 1);
            assert_eq!(digits.len(), field.len() - 1, "{value} does not fit");
            field[..digits.len()].copy_from_slice(digits.as_bytes());
            field[digits.len()] = 0;
        }
        assert!(
            path.len() < 100 && link.len() < 100,
            "{path}: name too long"
        );
        let mut header = [0u8; 512];
        header[..path.len()].copy_from_slice(path.as_bytes());
        octal(&mut header[100..108], u64::from(mode));
        octal(&mut header[108..116], 0);
        octal(&mut header[116..124], 0);
        octal(&mut header[124..136], data.len() as u64);
        octal(&mut header[136..148], 0);
        header[156] = kind;
        header[157..157 + link.len()].copy_from_slice(link.as_bytes());
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        // The checksum is computed with its own field as spaces: six octal digits, NUL, space.
        header[148..156].fill(b' ');
        let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
        octal(&mut header[148..155], sum);
        self.0.extend_from_slice(&header);
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
    }

    fn dir(&mut self, path: &str) {
        self.entry(&format!("{path}/"), 0o755, b'5', "", b"");
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, mode, b'0', "", data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, 0o777, b'2', target, b"");
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

fn sha256(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256(blob), "size": blob.len()})
}

/// Does this ELF executable name a program interpreter (is it dynamically linked)?
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    let u16_at = |o: usize| usize::from(u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()));
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    const PT_INTERP: u32 = 3;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let ph = phoff + i * phentsize;
        u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// The OCI image layout of IMAGE as a tarball for `ctr images import`: one layer with the
/// static busybox (pause process, httpd, nc, sh) and the page httpd serves.
fn oci_archive() -> Vec<u8> {
    let busybox = fs::read("/bin/busybox")
        .expect("/bin/busybox missing: install busybox-static (scripts/bootstrap.sh does)");
    assert!(
        !has_interpreter(&busybox),
        "/bin/busybox is dynamically linked: the image has no libc, install busybox-static"
    );
    let mut layer = Tar::default();
    for dir in ["bin", "dev", "etc", "proc", "sys", "tmp", "www"] {
        layer.dir(dir);
    }
    layer.file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "sleep"] {
        layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer.file("www/index.html", 0o644, INDEX_HTML.as_bytes());
    let layer = layer.finish();

    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Entrypoint": ["/bin/busybox", "sh", "-c", PAUSE],
            "WorkingDir": "/"
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &layer)]
    }))
    .unwrap();
    let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    entry["platform"] = json!({"architecture": arch, "os": "linux"});
    // containerd names the image after this annotation (the OCI ref.name alone is a tag).
    entry["annotations"] = json!({
        "io.containerd.image.name": IMAGE,
        "org.opencontainers.image.ref.name": "1"
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry]
    }))
    .unwrap();

    let mut archive = Tar::default();
    archive.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    archive.dir("blobs");
    archive.dir("blobs/sha256");
    for blob in [&layer, &config, &manifest] {
        let name = sha256(blob).replace(':', "/");
        archive.file(&format!("blobs/{name}"), 0o644, blob);
    }
    archive.file("index.json", 0o644, &index);
    archive.finish()
}

// --- the node and its runtime -------------------------------------------------------------

/// The node's network namespace (containerd's and moatd's), deleted when dropped.
struct NodeNetns(String);

impl NodeNetns {
    fn new() -> Self {
        let name = node_netns_name(std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        for args in [
            vec!["netns", "add", &name],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self(name)
    }

    fn link_exists(&self, ifname: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.0, "link", "show", ifname])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// `tc filter show` of one hook of a link in the node (moat-datapath's `is_attached`
    /// reads the caller's /sys, which stays the host's after a thread's setns).
    fn tc_filters(&self, ifname: &str, hook: &str) -> String {
        let out = Command::new("tc")
            .args(["-n", &self.0, "filter", "show", "dev", ifname, hook])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tc filter show dev {ifname} {hook}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NodeNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A private containerd: stopped, with every process, mount and sandbox it made, when dropped
/// (also when the test fails).
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    cri: Cri,
}

impl Containerd {
    fn socket(dir: &Path) -> PathBuf {
        dir.join("containerd.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// Starts containerd in the network namespace `node` with `conflist` as its only CNI
    /// network; Err(why, with its log) if it does not come up.
    fn start(tools: &Tools, node: &str, conflist: &Value) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("moat-cri{}-", std::process::id()))
            .tempdir()
            .unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("net.d")).unwrap();
        let bin = support_cni::cni_path(root);
        // go-cni brings up every pod's loopback with the reference plugin.
        let loopback = Path::new("/usr/lib/cni/loopback");
        assert!(
            loopback.is_file(),
            "{} missing: install containernetworking-plugins (scripts/bootstrap.sh does)",
            loopback.display()
        );
        std::os::unix::fs::symlink(loopback, bin.join("loopback")).unwrap();
        fs::write(
            root.join("net.d/10-moat.conflist"),
            serde_json::to_vec_pretty(conflist).unwrap(),
        )
        .unwrap();

        let socket = Self::socket(root);
        let config = format!(
            r#"version = 2
root = "{root}/root"
state = "{root}/state"
# Plugins that would reach outside the test's directories (/opt/containerd) or only log that
# they cannot run here.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  disable_apparmor = true
  # The pods' network namespaces under the state directory, not the host's /run/netns.
  netns_mounts_under_state_dir = true
  # No lower oom_score_adj than containerd's own (the sandbox's default is -998): lowering it
  # takes CAP_SYS_RESOURCE, which root may lack (in a container, or on this build machine).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{root}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{root}/net.d"
    max_conf_num = 1
"#,
            root = root.display(),
            socket = socket.display(),
            bin = bin.display(),
        );
        fs::write(root.join("config.toml"), config).unwrap();

        let log = fs::File::create(root.join("containerd.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .arg(&tools.containerd)
            .arg("--config")
            .arg(root.join("config.toml"))
            .env("PATH", &tools.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut containerd = Self {
            child,
            cri: Cri::new(&socket),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if containerd.cri.version(Duration::from_secs(2)).is_ok() {
                return Ok(containerd);
            }
            if let Ok(Some(status)) = containerd.child.try_wait() {
                return Err(format!(
                    "containerd exited ({status}):\n{}",
                    tail(&containerd.log(), 20)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "containerd's CRI did not answer within 30 s:\n{}",
                    tail(&containerd.log(), 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr images import` into the CRI plugin's namespace, unpacked for its snapshotter.
    fn import(&self, tools: &Tools, archive: &[u8]) {
        let path = self.dir.path().join("image.tar");
        fs::write(&path, archive).unwrap();
        let out = Command::new(&tools.ctr)
            .arg("--address")
            .arg(Self::socket(self.dir.path()))
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr images import: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Can this runtime run a sandbox at all? One on the node's network (no CNI involved),
    /// stopped and removed again. Err is the runtime's reason (cgroups, mounts, seccomp...).
    fn can_run_sandboxes(&self) -> Result<(), String> {
        let logs = self.dir.path().join("logs/preflight");
        fs::create_dir_all(&logs).unwrap();
        let config = PodConfig {
            name: "preflight",
            namespace: "moat-preflight",
            uid: "00000000-0000-4000-8000-000000000000",
            labels: &[],
            log_directory: &logs,
            cgroup_parent: &cgroup_parent(std::process::id()),
            host_network: true,
        }
        .encode();
        let id = self
            .cri
            .run_pod_sandbox(&config)
            .map_err(|e| e.to_string())?;
        self.cri.stop_pod_sandbox(&id).unwrap();
        self.cri.remove_pod_sandbox(&id).unwrap();
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("containerd's log, last lines:\n{}", tail(&self.log(), 40));
        }
        // Sandboxes first, through the runtime and while moatd still runs (it is dropped
        // after this), so that their CNI DEL runs as it would on a node.
        if self.child.try_wait().ok().flatten().is_none()
            && let Ok(sandboxes) = self.cri.list_pod_sandboxes()
        {
            for (id, _) in sandboxes {
                let _ = self.cri.stop_pod_sandbox(&id);
                let _ = self.cri.remove_pod_sandbox(&id);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Traces {
            pid: std::process::id(),
            paths: vec![self.dir.path().to_path_buf()],
        }
        .clear();
    }
}

/// What a run of this test leaves on the host: the processes that name one of `paths` on
/// their command line (containerd names its config, the shims its socket, moatd its pins) or
/// live in the run's pod cgroup (the containers), mounts under `paths` (rootfs overlays,
/// sandboxes' /dev/shm, network namespace files), and the pods' cgroups.
struct Traces {
    pid: u32,
    paths: Vec<PathBuf>,
}

/// The cgroup all pods of the run `pid` go under (as kubelet's go under /kubepods), so that
/// what runc leaves in the cgroup hierarchies is the run's to remove.
fn cgroup_parent(pid: u32) -> String {
    format!("/moat-cri{pid}")
}

fn node_netns_name(pid: u32) -> String {
    format!("moatcri{pid}")
}

impl Traces {
    fn owns(&self, path: &Path) -> bool {
        self.paths.iter().any(|p| path.starts_with(p))
    }

    fn processes(&self) -> Vec<i32> {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let pod_cgroup = format!("{}/", cgroup_parent(self.pid));
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != std::process::id() as i32)
            .filter(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let named = cmdline
                    .split(|&b| b == 0)
                    .any(|arg| self.owns(Path::new(std::ffi::OsStr::from_bytes(arg))));
                // /proc/<pid>/cgroup lines are "<id>:<controllers>:<path>".
                let in_pod = fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        l.splitn(3, ':')
                            .nth(2)
                            .is_some_and(|p| p.starts_with(&pod_cgroup))
                    });
                named || in_pod
            })
            .collect()
    }

    /// Kills the processes (and removes the sockets of the shims among them), unmounts
    /// (deepest first), then removes the pods' cgroup parent and any container cgroup runc
    /// left under it from every hierarchy (/sys/fs/cgroup itself on cgroup v2, each
    /// controller's on v1).
    fn clear(&self) {
        for pid in self.processes() {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            if let Some(socket) = shim_socket(&cmdline) {
                let _ = fs::remove_file(socket);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }

        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| self.owns(p))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for point in points {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }

        let name = cgroup_parent(self.pid);
        let hierarchies = fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .filter_map(|e| Some(e.ok()?.path()))
            .chain([PathBuf::from("/sys/fs/cgroup")]);
        for hierarchy in hierarchies {
            let parent = hierarchy.join(name.trim_start_matches('/'));
            if !parent.is_dir() {
                continue;
            }
            for child in fs::read_dir(&parent).into_iter().flatten().flatten() {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(child.path());
                }
            }
            let _ = fs::remove_dir(&parent);
        }
    }
}

/// The socket a containerd 1.6 shim listens on, from its command line (`-namespace <ns> -id
/// <id> -address <containerd's socket>`): containerd puts it in its fixed /run/containerd/s,
/// named by the sha256 of `<address>/<ns>/<id>`, and a killed shim leaves it there.
fn shim_socket(cmdline: &[u8]) -> Option<PathBuf> {
    let args: Vec<&str> = cmdline
        .split(|&b| b == 0)
        .map(|a| std::str::from_utf8(a).unwrap_or(""))
        .collect();
    if !args.first()?.ends_with("containerd-shim-runc-v2") {
        return None;
    }
    let flag = |name: &str| {
        let at = args.iter().position(|a| *a == name)?;
        args.get(at + 1).copied()
    };
    let key = format!(
        "{}/{}/{}",
        flag("-address")?,
        flag("-namespace")?,
        flag("-id")?
    );
    let hash = sha256(key.as_bytes());
    Some(Path::new("/run/containerd/s").join(hash.trim_start_matches("sha256:")))
}

/// Clears what earlier runs of this test left when they were killed (a timeout, ^C: no Drop
/// ran): containerd, its shims, the pods' processes and the run's moatd outlive the test
/// process, and would stay with their mounts, cgroups, pins and the node's namespace. A run
/// is known by the pid in those names and left alone while that pid lives.
fn reap_killed_runs() {
    let pid_after = |name: &str, prefix: &str| -> Option<u32> {
        let digits: String = name
            .strip_prefix(prefix)?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let names = |dir: &Path| -> Vec<(String, PathBuf)> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect()
    };
    let mut killed: std::collections::BTreeMap<u32, Vec<PathBuf>> = Default::default();
    for (name, path) in names(&std::env::temp_dir()) {
        if let Some(pid) = pid_after(&name, "moat-cri") {
            killed.entry(pid).or_default().push(path);
        }
    }
    for (name, _) in names(Path::new("/run/netns")) {
        if let Some(pid) = pid_after(&name, "moatcri").filter(|&p| name == node_netns_name(p)) {
            killed.entry(pid).or_default();
        }
    }
    for (hierarchy, _) in names(Path::new("/sys/fs/cgroup")) {
        for (name, _) in names(&Path::new("/sys/fs/cgroup").join(hierarchy)) {
            if let Some(pid) =
                pid_after(&name, "moat-cri").filter(|&p| format!("/{name}") == cgroup_parent(p))
            {
                killed.entry(pid).or_default();
            }
        }
    }
    killed.retain(|pid, _| {
        *pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    });
    for (pid, dirs) in killed {
        eprintln!("containerd_cri: clearing what killed run {pid} left: {dirs:?}");
        // support_moatd's Env pins of that run (tag "cri"), named by its moatd.
        let pins = PathBuf::from(format!("/sys/fs/bpf/moat-test/cri{pid}"));
        let mut paths = dirs.clone();
        paths.push(pins.clone());
        Traces { pid, paths }.clear();
        for dir in dirs.iter().chain([&pins]) {
            let _ = fs::remove_dir_all(dir);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &node_netns_name(pid)])
            .output();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// --- pods ---------------------------------------------------------------------------------

struct Pod {
    name: &'static str,
    uid: String,
    sandbox: String,
    container: String,
    ip: String,
    netns: PathBuf,
}

/// What kubelet does for a pod with one container: RunPodSandbox (CNI ADD happens here),
/// then CreateContainer and StartContainer for `web`, busybox httpd on PORT.
fn run_pod(containerd: &Containerd, name: &'static str, index: u32) -> Pod {
    let cri = &containerd.cri;
    let uid = format!("{:08x}-0000-4000-8000-{index:012x}", std::process::id());
    let logs = containerd.dir.path().join("logs").join(name);
    fs::create_dir_all(&logs).unwrap();
    let config: Pb = PodConfig {
        name,
        namespace: NAMESPACE,
        uid: &uid,
        labels: &[("role", name), ("app.kubernetes.io/part-of", "moat-cri")],
        log_directory: &logs,
        cgroup_parent: &cgroup_parent(std::process::id()),
        host_network: false,
    }
    .encode();
    let sandbox = cri
        .run_pod_sandbox(&config)
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"));
    let status = cri.pod_sandbox_status(&sandbox).unwrap();
    assert_eq!(status.state, 0, "{name}: sandbox not ready: {status:?}");
    assert_eq!(
        (
            status.name.as_str(),
            status.namespace.as_str(),
            status.uid.as_str()
        ),
        (name, NAMESPACE, uid.as_str())
    );
    assert_eq!(status.labels.get("role").map(String::as_str), Some(name));
    // containerd's verbose info: the runtime spec names the pod's network namespace.
    let info: Value = serde_json::from_str(
        status
            .info
            .get("info")
            .unwrap_or_else(|| panic!("{name}: no verbose info: {status:?}")),
    )
    .unwrap();
    let netns = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|all| all.iter().find(|ns| ns["type"] == "network"))
        .and_then(|ns| ns["path"].as_str())
        .unwrap_or_else(|| panic!("{name}: no network namespace in {info}"));

    let container = cri
        .create_container(
            &sandbox,
            &config,
            "web",
            IMAGE,
            &[
                "/bin/busybox",
                "httpd",
                "-f",
                "-p",
                &PORT.to_string(),
                "-h",
                "/www",
            ],
        )
        .unwrap_or_else(|e| panic!("CreateContainer in {name}: {e}"));
    cri.start_container(&container)
        .unwrap_or_else(|e| panic!("StartContainer in {name}: {e}"));
    Pod {
        name,
        uid,
        sandbox,
        container,
        ip: status.ip,
        netns: PathBuf::from(netns),
    }
}

/// An HTTP GET from `from`'s container to `to`'s httpd, with busybox nc through ExecSync
/// (busybox's static wget crashes in Debian's build): true when the page came back.
fn fetch(cri: &Cri, from: &Pod, to: &Pod, timeout_s: u64) -> bool {
    let request = format!(
        "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w {timeout_s} {} {PORT}",
        to.ip
    );
    let result = cri
        .exec_sync(
            &from.container,
            &["/bin/busybox", "sh", "-c", &request],
            timeout_s + 5,
        )
        .unwrap_or_else(|e| panic!("ExecSync in {}: {e}", from.name));
    result.exit_code == 0 && result.stdout.contains("200 OK") && result.stdout.contains(INDEX_HTML)
}

fn endpoints(env: &Env) -> Vec<EndpointStatus> {
    match env.call(Request::ListEndpoints) {
        Response::Endpoints { endpoints } => endpoints,
        other => panic!("{other:?}"),
    }
}

fn ipam_allocations(env: &Env) -> usize {
    let path = env.root().join("ipam").join(NETWORK).join("state.json");
    fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["allocations"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// Interface indexes with an entry in the pinned endpoint map.
fn endpoint_map_keys(env: &Env) -> Vec<u32> {
    Maps::open(&env.pins())
        .unwrap()
        .endpoints
        .keys()
        .filter_map(Result::ok)
        .collect()
}

#[test]
fn containerd_cri_pods_get_moat_network_and_policy_and_del_leaves_nothing() {
    let started = Instant::now();
    let Some(tools) = tools() else { return };
    reap_killed_runs();
    let env = Env::new("cri");
    env.write("pods.yaml", &pods_yaml());
    env.write("policy.yaml", POLICY);
    let node = NodeNetns::new();
    let _moatd = env.spawn_and_wait(
        env.moatd_command(Some(&node.0))
            .args(["--metrics-addr", ""]),
    );

    // The network containerd's CRI plugin loads: the standalone config for this moatd (its
    // socket, pins, pending directory and an IPAM directory of the test's).
    let mut plugin = env.standalone_conf(NETWORK, json!([[{"subnet": SUBNET}]]));
    let plugin_obj = plugin.as_object_mut().unwrap();
    plugin_obj.remove("name");
    plugin_obj.remove("cniVersion");
    let conflist = json!({"cniVersion": "1.0.0", "name": NETWORK, "plugins": [plugin]});

    let containerd = match Containerd::start(&tools, &node.0, &conflist) {
        Ok(c) => c,
        Err(reason) => {
            println!("SKIP: containerd_cri: containerd cannot start here: {reason}");
            return;
        }
    };
    let cri = &containerd.cri;
    let (runtime, version, api_version) = cri.version(Duration::from_secs(5)).unwrap();
    eprintln!("CRI runtime: {runtime} {version} (API {api_version})");
    containerd.import(&tools, &oci_archive());
    assert!(
        cri.image_present(IMAGE).unwrap(),
        "the CRI plugin does not see the imported {IMAGE}"
    );
    if let Err(reason) = containerd.can_run_sandboxes() {
        println!("SKIP: containerd_cri: containerd cannot run a pod sandbox here: {reason}");
        return;
    }

    let pods: Vec<Pod> = ["server", "client", "other"]
        .iter()
        .zip(1..)
        .map(|(name, i)| run_pod(&containerd, name, i))
        .collect();
    let [server, client, other] = &pods[..] else {
        unreachable!()
    };

    // containerd ran moat-cni: each sandbox is a moatd endpoint under the sandbox's id, with
    // what containerd put in CNI_ARGS (namespace, name, uid), the sandbox's network namespace
    // and the labels of the cluster's Pod; the address it reports is moat-ipam's.
    let programs = env
        .status()
        .datapath
        .expect("moatd reports its programs")
        .programs;
    let program_id = |name: &str| {
        programs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("moatd has no {name}: {programs:?}"))
            .id
    };
    let registered = endpoints(&env);
    assert_eq!(registered.len(), pods.len(), "{registered:#?}");
    let mut host_ifs = Vec::new();
    for pod in &pods {
        let ep = registered
            .iter()
            .find(|e| e.spec.container_id == pod.sandbox)
            .unwrap_or_else(|| panic!("{}: sandbox {} not registered", pod.name, pod.sandbox));
        assert_eq!(
            (ep.spec.pod_namespace.as_str(), ep.spec.pod_name.as_str()),
            (NAMESPACE, pod.name)
        );
        assert_eq!(ep.spec.pod_uid.as_deref(), Some(pod.uid.as_str()));
        assert_eq!(ep.spec.ifname, "eth0");
        assert_eq!(Path::new(&ep.spec.netns), pod.netns);
        let subnet: ipnetwork::IpNetwork = SUBNET.parse().unwrap();
        assert!(
            pod.ip.parse().is_ok_and(|ip| subnet.contains(ip)),
            "{}: CRI reports {:?}, not in {SUBNET}",
            pod.name,
            pod.ip
        );
        assert!(
            ep.spec.ips.iter().any(|ip| ip.to_string() == pod.ip),
            "{}: CRI's {} is not among moatd's {:?}",
            pod.name,
            pod.ip,
            ep.spec.ips
        );
        assert_eq!(ep.labels.get("role").map(String::as_str), Some(pod.name));
        assert_eq!(ep.mode, "enforce");
        let host_if = ep.spec.host_ifname.clone();
        assert!(node.link_exists(&host_if), "{host_if} not in the node");
        for (hook, program) in [
            ("ingress", "moat_from_container"),
            ("egress", "moat_to_container"),
        ] {
            let filters = node.tc_filters(&host_if, hook);
            assert!(
                filters.contains(&format!(" id {} ", program_id(program))),
                "{}: {program} not on {host_if} {hook}: {filters}",
                pod.name
            );
        }
        host_ifs.push((host_if, ep.spec.host_ifindex));
    }
    assert_eq!(ipam_allocations(&env), pods.len());
    let map_keys = endpoint_map_keys(&env);
    for (host_if, ifindex) in &host_ifs {
        assert!(
            map_keys.contains(ifindex),
            "{host_if}: no endpoint map entry"
        );
    }

    // The operator's view agrees.
    let out = Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .arg("--socket")
        .arg(env.socket())
        .args(["-o", "json", "endpoint", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<EndpointStatus> = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<_> = listed
        .iter()
        .map(|e| {
            format!(
                "{}/{} role={}",
                e.spec.pod_namespace, e.spec.pod_name, e.labels["role"]
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cri-e2e/client role=client",
            "cri-e2e/other role=other",
            "cri-e2e/server role=server"
        ]
    );

    // Policy between the pods: client reaches server (the first tries may race httpd's
    // start), other is dropped, and other's own server stays open to everyone.
    wait_until("client fetches server's page", || {
        fetch(cri, client, server, 2)
    });
    assert!(
        !fetch(cri, other, server, 2),
        "other -> server must be dropped"
    );
    // (The other httpds started with server's; waiting for them weakens nothing.)
    wait_until(
        "other fetches client's page (client is not isolated)",
        || fetch(cri, other, client, 2),
    );
    wait_until(
        "server fetches other's page (other is not isolated)",
        || fetch(cri, server, other, 2),
    );
    assert!(
        fetch(cri, client, server, 2),
        "client -> server after the drop"
    );
    // The drop was Moat's: moatd journaled it on server's perimeter.
    wait_until("moatd journals other -> server as dropped", || {
        let filter = FlowFilter {
            verdict: Some(moatd::api::Verdict::Dropped),
            pod: Some(format!("{NAMESPACE}/server")),
            ..Default::default()
        };
        match env.call(Request::Flows { filter }) {
            Response::Flows { flows } => flows
                .iter()
                .any(|f| f.source == other.ip && f.destination_port == PORT),
            answer => panic!("{answer:?}"),
        }
    });

    // StopPodSandbox runs CNI DEL: moatd forgets the endpoints, their veths go, the endpoint
    // map and moat-ipam hold nothing of them.
    for pod in &pods {
        cri.stop_pod_sandbox(&pod.sandbox)
            .unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}", pod.name));
    }
    assert!(endpoints(&env).is_empty(), "{:#?}", endpoints(&env));
    for (host_if, _) in &host_ifs {
        wait_until(&format!("{host_if} is deleted"), || {
            !node.link_exists(host_if)
        });
    }
    let map_keys = endpoint_map_keys(&env);
    for (host_if, ifindex) in &host_ifs {
        assert!(
            !map_keys.contains(ifindex),
            "{host_if}: endpoint map entry left"
        );
    }
    assert_eq!(ipam_allocations(&env), 0, "IPAM allocations left");

    // RemovePodSandbox: nothing of the pods is left in the runtime, nor their namespaces.
    for pod in &pods {
        cri.remove_pod_sandbox(&pod.sandbox)
            .unwrap_or_else(|e| panic!("RemovePodSandbox {}: {e}", pod.name));
        assert!(
            !pod.netns.exists(),
            "{}: {} left",
            pod.name,
            pod.netns.display()
        );
    }
    assert_eq!(cri.list_pod_sandboxes().unwrap(), Vec::new());
    eprintln!("containerd_cri: passed in {:.1?}", started.elapsed());
}
