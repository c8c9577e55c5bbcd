//! podman (CNI backend, libcni inside) as a real runtime for moat-cni standalone + moat-ipam:
//! three containers on a private Moat network, a NetworkPolicy that lets one client in and
//! keeps the other out (checked with real HTTP traffic), and `podman rm -f` running DEL so that
//! no host veth, pin, moatd endpoint or IPAM allocation is left.
//!
//! Isolation: everything podman uses is private to the test: CONTAINERS_CONF points at a
//! private containers.conf (network_backend "cni", cni_plugin_dirs and network_config_dir in the
//! test's directory), storage/run/tmp roots are per test (vfs driver, so nothing stays mounted),
//! moatd is private (plugin keys `socket`, `pinRoot`, `pendingDir`).
//!
//! This host mixes cgroup v1 with a cgroup2 hierarchy that holds a controller ("hybrid"), which
//! crun refuses ("cgroups in hybrid mode not supported"). The containers therefore run with
//! `--cgroups=disabled` through a crun wrapper that uses crun's `disabled` cgroup manager in a
//! private mount namespace without /sys/fs/cgroup/unified. Networking is untouched by this.
//!
//! What podman 4.3 passes (logged by the wrapper around moat-cni and asserted below):
//! `CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=<container name>`, no K8S_POD_NAMESPACE, so Moat
//! files the pods under namespace "default" with the container name as pod name.

mod support;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use moat_datapath::is_attached;
use serde_json::{Value, json};
use support::*;

const NETWORK: &str = "moatpodman";
const IMAGE: &str = "localhost/moat-busybox:test";
const SUBNET: &str = "10.88.70.0/24";

/// The private podman of one test.
struct Podman {
    root: PathBuf,
}

impl Podman {
    fn conf(&self) -> PathBuf {
        self.root.join("containers.conf")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg("120")
            .arg("podman")
            .arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .arg("--tmpdir")
            .arg(self.root.join("tmp"))
            .arg("--storage-driver")
            .arg("vfs")
            .args(args)
            .env("CONTAINERS_CONF", self.conf());
        cmd
    }

    /// Runs podman; panics with its output unless it succeeds.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// (success, stdout + stderr)
    fn try_run(&self, args: &[&str]) -> (bool, String) {
        let out = self.command(args).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers first (runs DEL), while moatd (World) is still up.
        let _ = self.command(&["rm", "-af", "-t", "0"]).output();
    }
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn require_tools() {
    for tool in ["podman", "crun", "unshare", "tar", "busybox"] {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .unwrap()
                .status
                .success(),
            "{tool} is missing: install podman, crun and busybox-static (scripts/bootstrap.sh does)"
        );
    }
}

/// containers.conf, the crun wrapper, the CNI dirs with the logging moat-cni wrapper, the
/// conflist and the imported busybox image.
fn set_up(world: &World) -> (Podman, PathBuf) {
    let root = world.dir.path().join("podman");
    for dir in ["storage", "run", "tmp", "net.d", "cni-bin", "image/bin"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let cni_log = root.join("cni-calls.log");

    // moat-cni behind a wrapper that records what podman passes; moat-ipam as is.
    let bin = root.join("cni-bin");
    write_executable(
        &bin.join("moat-cni"),
        &format!(
            "#!/bin/sh\necho \"$CNI_COMMAND|$CNI_CONTAINERID|$CNI_IFNAME|$CNI_ARGS\" >> {log}\nexec {real} \"$@\"\n",
            log = cni_log.display(),
            real = env!("CARGO_BIN_EXE_moat-cni"),
        ),
    );
    std::os::unix::fs::symlink(workspace_bin("moat-ipam"), bin.join("moat-ipam")).unwrap();

    let crun = root.join("crun-no-cgroups");
    write_executable(
        &crun,
        r#"#!/bin/sh
# crun without cgroups: drop podman's cgroup-manager flags, hide the hybrid cgroup2 mount.
skip=0
for a in "$@"; do
  shift
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  case "$a" in
    --cgroup-manager=*|--systemd-cgroup) continue ;;
    --cgroup-manager) skip=1; continue ;;
  esac
  set -- "$@" "$a"
done
exec unshare -m --propagation private sh -c 'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec crun --cgroup-manager=disabled "$@"' crun "$@"
"#,
    );

    std::fs::write(
        root.join("containers.conf"),
        format!(
            r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
network_config_dir = "{netd}"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "moatcrun"
runtime_supports_nocgroup = ["moatcrun"]

[engine.runtimes]
moatcrun = ["{crun}"]
"#,
            bin = bin.display(),
            netd = root.join("net.d").display(),
            crun = crun.display(),
        ),
    )
    .unwrap();

    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [merged(
            json!({
                "type": "moat-cni",
                "mode": "standalone",
                "ipam": {
                    "type": "moat-ipam",
                    "dataDir": world.ipam_dir(),
                    "ranges": [[{"subnet": SUBNET}]]
                }
            }),
            &world.moat_keys(),
        )]
    });
    std::fs::write(
        root.join("net.d").join(format!("{NETWORK}.conflist")),
        serde_json::to_vec_pretty(&conflist).unwrap(),
    )
    .unwrap();

    // The image: /bin/busybox (static) and its applets as symlinks.
    let image = root.join("image");
    std::fs::copy("/bin/busybox", image.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "nc", "httpd", "wget", "sleep", "ip", "mkdir", "echo", "cat",
    ] {
        std::os::unix::fs::symlink("busybox", image.join("bin").join(applet)).unwrap();
    }
    let tar = root.join("busybox.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&image)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar of the busybox image");
    let podman = Podman { root };
    podman.run(&["import", tar.to_str().unwrap(), IMAGE]);
    (podman, cni_log)
}

fn ipam_allocations(world: &World) -> usize {
    let path = world.ipam_dir().join(NETWORK).join("state.json");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["allocations"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn start(podman: &Podman, name: &str, command: &str) -> String {
    let id = podman.run(&[
        "run",
        "-d",
        "--name",
        name,
        "--cgroups=disabled",
        "--network",
        NETWORK,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
        IMAGE,
        "/bin/busybox",
        "sh",
        "-c",
        command,
    ]);
    let ip = podman.run(&[
        "inspect",
        name,
        "--format",
        &format!("{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}"),
    ]);
    assert!(ip.starts_with("10.88.70."), "{name}: address {ip:?}");
    format!("{id} {ip}")
}

/// An HTTP GET from `from` to the web container with busybox nc (busybox's static wget
/// crashes in this glibc build): true when web's page came back.
fn fetch(podman: &Podman, from: &str, ip: &str, timeout_s: u32) -> bool {
    let request = format!(
        "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w {timeout_s} {ip} 8080"
    );
    let (ok, out) = podman.try_run(&["exec", from, "/bin/busybox", "sh", "-c", &request]);
    ok && out.contains("200 OK") && out.contains("moat-web")
}

#[test]
fn podman_runs_moat_standalone_enforces_policy_and_rm_leaves_nothing() {
    require_tools();
    let mut world = World::new("pm");
    // Pods as Moat sees podman's containers: namespace "default", name = container name.
    world.write_policy(
        "pods.yaml",
        &(pod_yaml("default", "web", "web")
            + &pod_yaml("default", "client", "client")
            + &pod_yaml("default", "other", "other")),
    );
    world.write_policy("policy.yaml", &web_policy("default"));
    world.start_moatd();
    let (podman, cni_log) = set_up(&world);

    let web = start(
        &podman,
        "web",
        "mkdir -p /www && echo moat-web > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    let client = start(&podman, "client", "exec sleep 3600");
    let other = start(&podman, "other", "exec sleep 3600");
    let (_, web_ip) = web.split_once(' ').unwrap();
    let ids: Vec<String> = [&web, &client, &other]
        .iter()
        .map(|s| s.split_once(' ').unwrap().0.to_string())
        .collect();

    // What podman passed: one ADD per container, pod name = container name, no namespace.
    let log = std::fs::read_to_string(&cni_log).unwrap();
    for (id, name) in ids.iter().zip(["web", "client", "other"]) {
        let add = format!("ADD|{id}|eth0|IgnoreUnknown=1;K8S_POD_NAME={name}");
        assert!(log.lines().any(|l| l == add), "{add} not in\n{log}");
    }

    // Registered with moatd under those names, programs attached to each host veth.
    let endpoints = world.moatd(json!({"op": "list_endpoints"})).unwrap();
    let endpoints = endpoints["endpoints"].as_array().unwrap().clone();
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");
    let mut host_ifs = Vec::new();
    for (id, name) in ids.iter().zip(["web", "client", "other"]) {
        let spec = &endpoints
            .iter()
            .find(|e| e["spec"]["container_id"] == json!(id))
            .unwrap_or_else(|| panic!("{name} not registered: {endpoints:?}"))["spec"];
        assert_eq!(spec["pod_namespace"], "default", "{spec}");
        assert_eq!(spec["pod_name"], name, "{spec}");
        let host_if = spec["host_ifname"].as_str().unwrap().to_string();
        assert!(link_exists(&host_if) && is_attached(&world.pins(), &host_if));
        host_ifs.push(host_if);
    }
    assert_eq!(ipam_allocations(&world), 3);

    // Real traffic: web serves; client is allowed in, other is not.
    // (The first try may race httpd's start.)
    let mut allowed = false;
    for _ in 0..20 {
        allowed = fetch(&podman, "client", web_ip, 3);
        if allowed {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(allowed, "client -> web must be allowed");
    assert!(
        !fetch(&podman, "other", web_ip, 2),
        "other -> web must be denied"
    );
    // The allowed path still works after the denied attempt.
    assert!(fetch(&podman, "client", web_ip, 3));

    // podman rm -f runs DEL: nothing left.
    podman.run(&["rm", "-f", "-t", "0", "web", "client", "other"]);
    let log = std::fs::read_to_string(&cni_log).unwrap();
    for id in &ids {
        assert!(
            log.lines()
                .any(|l| l.starts_with(&format!("DEL|{id}|eth0|"))),
            "no DEL for {id}:\n{log}"
        );
    }
    assert!(world.endpoints().is_empty(), "{:?}", world.endpoints());
    assert!(world.attached().is_empty(), "{:?}", world.attached());
    for host_if in &host_ifs {
        // moatd deletes the (down) veth right after answering the DEL.
        wait_until(&format!("{host_if} deleted"), || !link_exists(host_if));
    }
    assert_eq!(ipam_allocations(&world), 0, "IPAM allocations left");
    assert!(podman.run(&["ps", "-aq"]).is_empty());
}
