//! A private moatd for end-to-end tests: its own socket, state, policy directory and pin
//! root, killed when dropped (also when a test fails).
#![allow(dead_code)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use moat_datapath::{PinDir, attach_endpoint};
use moat_testkit::lab::LabPod;
use moatd::api::{self, EndpointSpec, Request, Response};

pub const SHORT: Duration = Duration::from_millis(700);
pub const LONG: Duration = Duration::from_secs(3);

/// A running moatd, killed when dropped (also when a test fails).
pub struct Daemon(Child);

impl Daemon {
    /// Takes over a moatd a test spawned itself (other flags, environment).
    pub fn from_child(child: Child) -> Self {
        Self(child)
    }

    /// The exit status if moatd has exited (it should not).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }

    /// moatd's process id (for its /proc/<pid>/status).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Env {
    root: PathBuf,
    dir: tempfile::TempDir,
    pin_root: PathBuf,
}

impl Env {
    pub fn new(tag: &str) -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "run as root (make test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/moat-test/{tag}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_root);
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        Self {
            root: dir.path().to_path_buf(),
            dir,
            pin_root,
        }
    }
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }
    pub fn pin_root(&self) -> &std::path::Path {
        &self.pin_root
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("moatd.sock")
    }
    pub fn policies(&self) -> PathBuf {
        self.root.join("policies")
    }
    pub fn pending(&self) -> PathBuf {
        self.root.join("pending")
    }
    pub fn pins(&self) -> PinDir {
        PinDir::new(&self.pin_root)
    }

    pub fn start(&self) -> Daemon {
        self.start_with(&[])
    }

    /// Starts moatd with extra flags (journal limits, event rate, ...).
    pub fn start_with(&self, extra: &[&str]) -> Daemon {
        self.spawn_and_wait(self.moatd_command(None).args(extra))
    }

    /// moatd with this environment's own policy directory, state, socket, pending directory
    /// and pins, in the network namespace `netns` (a name under /run/netns) if given:
    /// `nsenter --net` changes only the network, so the host's bpffs stays visible.
    pub fn moatd_command(&self, netns: Option<&str>) -> Command {
        let mut command = match netns {
            Some(name) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{name}"))
                    .arg(env!("CARGO_BIN_EXE_moatd"));
                c
            }
            None => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_moatd"));
                // In the host's own namespace, shared with other tests and the user: no
                // host-wide netfilter rules (tests of them run moatd in a namespace).
                c.arg("--judge-after-dnat=false");
                c
            }
        };
        if netns.is_none() {
            // The host's nftables are shared with everyone: no masquerade table there from a
            // test's moatd (the masquerade test runs its moatd in a namespace).
            command.arg("--masquerade=false");
        }
        command
            .arg("--policy-dir")
            .arg(self.policies())
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--pending-dir")
            .arg(self.pending())
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(["--poll-ms", "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        command
    }

    /// Spawns `command` (a [`Self::moatd_command`]) and returns once moatd answers on this
    /// environment's socket; fails at once if it exits instead.
    pub fn spawn_and_wait(&self, command: &mut Command) -> Daemon {
        let mut daemon = Daemon(command.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if api::call(&self.socket(), &Request::Status, Duration::from_secs(2)).is_ok() {
                return daemon;
            }
            if let Some(status) = daemon.exited() {
                panic!("moatd exited ({status}) before it answered");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("moatd did not answer within 20 s");
    }

    /// A standalone moat-cni network config for pods of this moatd: its socket, pins and
    /// pending directory, and moat-ipam keeping its leases under this environment and
    /// allocating from `ranges` (CNI range sets, e.g. `[[{"subnet": "10.244.1.0/24"}]]`).
    pub fn standalone_conf(&self, network: &str, ranges: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "type": "moat-cni",
            "mode": "standalone",
            "socket": self.socket(),
            "pinRoot": self.pin_root(),
            "pendingDir": self.pending(),
            "ipam": {"type": "moat-ipam", "dataDir": self.root.join("ipam"), "ranges": ranges}
        })
    }

    pub fn call(&self, request: Request) -> Response {
        api::call(&self.socket(), &request, Duration::from_secs(10)).unwrap()
    }

    pub fn status(&self) -> api::DaemonStatus {
        match self.call(Request::Status) {
            Response::Status(s) => *s,
            other => panic!("{other:?}"),
        }
    }

    pub fn write(&self, file: &str, yaml: &str) {
        let tmp = self.policies().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, self.policies().join(file)).unwrap();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = &self.dir;
    }
}

pub fn register(env: &Env, pod: &LabPod, namespace: &str) -> api::Registered {
    let spec = EndpointSpec {
        container_id: format!("cid-{}", pod.name),
        ifname: "eth0".into(),
        netns: format!("/run/netns/{}", pod.netns),
        host_ifname: pod.host_if.clone(),
        host_ifindex: pod.ifindex,
        ips: pod.addrs().to_vec(),
        pod_namespace: namespace.into(),
        pod_name: pod.name.clone(),
        pod_uid: None,
    };
    let r = match env.call(Request::Register { endpoint: spec }) {
        Response::Registered(r) => r,
        other => panic!("{other:?}"),
    };
    attach_endpoint(&env.pins(), &pod.host_if).unwrap();
    r
}
