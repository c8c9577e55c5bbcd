//! A private moatd for end-to-end tests: its own socket, state, policy directory and pin
//! root, killed when dropped (also when a test fails).
#![allow(dead_code)]

use std::{path::PathBuf, time::Duration};

use moat_datapath::{PinDir, attach_endpoint};
use moat_testkit::{Moatd, MoatdBuilder, lab::LabPod, moatd::Netns};
use moatd::api::{self, EndpointSpec, Request, Response};

pub const SHORT: Duration = Duration::from_millis(700);
pub const LONG: Duration = Duration::from_secs(3);

/// A running moatd, killed when dropped (also when a test fails).
pub type Daemon = Moatd;

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
    pub fn moatd_command(&self, netns: Option<&str>) -> MoatdBuilder {
        let mut moatd = Moatd::builder(env!("CARGO_BIN_EXE_moatd"));
        match netns {
            Some(name) => moatd.netns(Netns::Nsenter(name.into())),
            // In the host's own namespace, shared with other tests and the user: no host-wide
            // netfilter rules, neither after-DNAT judgement nor the masquerade table (tests of
            // them run moatd in a namespace).
            None => moatd.no_host_rules(),
        };
        moatd
            .layout(&self.root)
            .pin_root(&self.pin_root)
            .poll_ms(100);
        moatd
    }

    /// Spawns `moatd` (a [`Self::moatd_command`]) and returns once it answers on this
    /// environment's socket; fails at once if it exits instead.
    pub fn spawn_and_wait(&self, moatd: &mut MoatdBuilder) -> Daemon {
        moatd.spawn().unwrap_or_else(|e| panic!("{e:#}"))
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

    /// Runs moatctl against this moatd and returns its stdout; fails the test on an error.
    pub fn moatctl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_moatctl"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--pin-root")
            .arg(self.pin_root())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "moatctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
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
