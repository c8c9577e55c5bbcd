//! Running the real moat-cni (with moat-ipam) from moatd's end-to-end tests, as a runtime
//! would: the workspace binaries in a private CNI_PATH, one plugin config on stdin.
#![allow(dead_code)]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use moat_testkit::cni::Exec;
use serde_json::Value;

/// target/debug/<name>, where cargo puts the workspace binaries (`make test` builds them first).
pub use moat_testkit::workspace_bin;

/// A CNI_PATH directory under `dir` with moat-cni and moat-ipam.
pub fn cni_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["moat-cni", "moat-ipam"] {
        std::os::unix::fs::symlink(workspace_bin(name), bin.join(name)).unwrap();
    }
    bin
}

/// One invocation's identity: CNI_CONTAINERID, the pod's netns name and its pod.
pub struct CniPod<'a> {
    pub container_id: &'a str,
    pub netns: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// Runs moat-cni (inside the network namespace `node`, if given, as a kubelet there
/// would). Ok(result) on success, Err(stdout and stderr) on a CNI error. `nsenter --net`
/// changes only the network: unlike `ip netns exec`, it keeps the host's /sys, so moat-cni
/// finds the pins of a moatd that pins into the host's bpffs (`support_moatd::Env`). That
/// /sys does not list the node's links: a DEL there cannot find the pod's host veth, which
/// goes when the test deletes the pod's namespace.
pub fn run(
    node: Option<&str>,
    bin: &Path,
    conf: &Value,
    command: &str,
    pod: &CniPod,
) -> Result<Value, String> {
    let mut exec = Exec::new(bin.join("moat-cni"), command);
    if let Some(ns) = node {
        exec.nsenter_net(format!("/run/netns/{ns}"));
    }
    run_exec(exec, bin, conf, pod)
}

/// Runs moat-cni as `ip netns exec <node>` does: in the node's network namespace and with a
/// /sys of that namespace, for a node whose moatd runs the same way (its pins then live in
/// a bpffs of the test's own, which both see; see multinode.rs).
pub fn run_with_node_sys(
    node: &str,
    bin: &Path,
    conf: &Value,
    command: &str,
    pod: &CniPod,
) -> Result<Value, String> {
    let mut exec = Exec::new(bin.join("moat-cni"), command);
    exec.ip_netns_exec(node);
    run_exec(exec, bin, conf, pod)
}

fn run_exec(mut exec: Exec, bin: &Path, conf: &Value, pod: &CniPod) -> Result<Value, String> {
    let out = exec
        .container_id(pod.container_id)
        .netns(format!("/run/netns/{}", pod.netns))
        .ifname("eth0")
        .args(moat_testkit::cni::pod_args(pod.namespace, pod.name))
        .path(bin)
        .run(Some(conf))
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    } else {
        Err(out.text())
    }
}

/// The result's first address of one family.
pub fn result_ip(result: &Value, v6: bool) -> Option<IpAddr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr: IpAddr = ip["address"].as_str()?.split('/').next()?.parse().ok()?;
        (addr.is_ipv6() == v6).then_some(addr)
    })
}

/// A network namespace (a pod, a node, the world outside), deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    /// `<tag><pid>`, replacing a leftover of the same name.
    pub fn new(tag: &str) -> Self {
        let name = format!("{tag}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let added = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(added.unwrap().success(), "ip netns add {name}");
        Self(name)
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
