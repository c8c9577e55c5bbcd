//! Running the real moat-cni (with moat-ipam) from moatd's end-to-end tests, as a runtime
//! would: the workspace binaries in a private CNI_PATH, one plugin config on stdin.
#![allow(dead_code)]

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

/// target/debug/, where cargo puts the workspace binaries (`make test` builds them first).
pub fn workspace_bin(name: &str) -> PathBuf {
    let moatd = PathBuf::from(env!("CARGO_BIN_EXE_moatd"));
    let path = moatd.parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

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
    let plugin = bin.join("moat-cni");
    let cmd = match node {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(&plugin);
            c
        }
        None => Command::new(&plugin),
    };
    run_command(cmd, bin, conf, command, pod)
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
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node]).arg(bin.join("moat-cni"));
    run_command(cmd, bin, conf, command, pod)
}

fn run_command(
    mut cmd: Command,
    bin: &Path,
    conf: &Value,
    command: &str,
    pod: &CniPod,
) -> Result<Value, String> {
    let mut child = cmd
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod.container_id)
        .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                pod.namespace, pod.name
            ),
        )
        .env("CNI_PATH", bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    } else {
        Err(format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
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
