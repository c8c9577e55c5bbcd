//! Shared fixtures for the datapath tests: a private pin directory per test (so tests run in
//! parallel without sharing maps), real links made with iproute2, and cleanup on drop.
#![allow(dead_code)]

pub mod fixture;

use std::{
    net::IpAddr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use moat_common::{EndpointInfo, MODE_ENFORCE, raw_v4, raw_v6};
use moat_datapath::{Datapath, Maps, PinDir};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "datapath tests load eBPF programs and create links: run them as root (make test does)"
    );
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh_ok(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .unwrap_or_else(|e| panic!("ifindex of {name}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// A short unique tag for link and namespace names (IFNAMSIZ is 16).
pub fn unique_tag(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        std::process::id() % 10000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A freshly loaded datapath in its own pin directory.
pub struct LoadedDatapath {
    pub root: PathBuf,
    pub pins: PinDir,
    pub datapath: Option<Datapath>,
}

impl LoadedDatapath {
    pub fn new(test: &str) -> Self {
        require_root();
        ensure_bpffs();
        let root = PathBuf::from(format!("/sys/fs/bpf/moat-test/{}", unique_tag(test)));
        let _ = std::fs::remove_dir_all(&root);
        let pins = PinDir::new(&root);
        let datapath = Datapath::load(&pins).expect("load datapath");
        Self {
            root,
            pins,
            datapath: Some(datapath),
        }
    }

    pub fn maps(&self) -> Maps {
        Maps::open(&self.pins).expect("open maps")
    }
}

impl Drop for LoadedDatapath {
    fn drop(&mut self) {
        self.datapath.take();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

pub fn ensure_bpffs() {
    if !sh_ok("mountpoint -q /sys/fs/bpf") {
        sh("mount -t bpf bpf /sys/fs/bpf");
    }
}

/// A real device for BPF_PROG_TEST_RUN's ifindex (a veth pair: this kernel has no dummy
/// driver), removed on drop.
pub struct DummyLink {
    pub name: String,
    pub ifindex: u32,
}

impl DummyLink {
    pub fn new() -> Self {
        let name = unique_tag("mtd");
        sh(&format!(
            "ip link add {name} type veth peer name {name}p && ip link set {name} up"
        ));
        let ifindex = ifindex(&name);
        Self { name, ifindex }
    }
}

impl Drop for DummyLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

pub fn endpoint(identity: u32, addrs: &[IpAddr]) -> EndpointInfo {
    let mut ep = EndpointInfo {
        identity,
        policy_id: identity,
        mode: MODE_ENFORCE,
        ..Default::default()
    };
    for a in addrs {
        match a {
            IpAddr::V4(v4) => {
                ep.v4[ep.v4_count as usize] = raw_v4(*v4);
                ep.v4_count += 1;
            }
            IpAddr::V6(v6) => {
                ep.v6[ep.v6_count as usize] = raw_v6(*v6);
                ep.v6_count += 1;
            }
        }
    }
    ep
}
