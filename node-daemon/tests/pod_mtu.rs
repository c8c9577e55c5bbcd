//! The pods' MTU in standalone mode: without an `mtu` in the CNI config, a real moat-cni ADD
//! gives the pod the MTU of the node's uplink (the default route's device), not 1500; an
//! explicit `mtu` still wins. The "node" is a network namespace whose uplink has MTU 1400;
//! moatd and moat-cni run in it with `nsenter --net` (unlike `ip netns exec`, that keeps the
//! host's /sys, so the pins stay where the test's moatd put them).

mod support_cni;
mod support_moatd;

use std::process::Command;

use moat_testkit::cni::Exec;
use serde_json::{Value, json};
use support_moatd::{Daemon, Env};

/// `lab::sh`, failing the test on an error (its message carries the command's output).
fn sh(cmd: &str) -> String {
    moat_testkit::lab::sh(cmd).unwrap()
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("{tag}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&format!("ip netns add {name}"));
        Self(name)
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

/// The node: its uplink (a veth; the kernel may lack the dummy driver) has MTU 1400 and
/// carries the default route.
fn node_with_uplink_mtu_1400() -> Netns {
    let node = Netns::new("moatmtun");
    let n = &node.0;
    sh(&format!(
        "ip -n {n} link set lo up && \
         ip -n {n} link add uplink0 mtu 1400 type veth peer name uplink0p mtu 1400 && \
         ip -n {n} link set uplink0 up && ip -n {n} link set uplink0p up && \
         ip -n {n} addr add 192.0.2.1/24 dev uplink0 && \
         ip -n {n} route add default via 192.0.2.254 dev uplink0"
    ));
    node
}

fn start_moatd_in(node: &Netns, env: &Env) -> Daemon {
    env.spawn_and_wait(
        env.moatd_command(Some(&node.0))
            .args(["--metrics-addr", ""]),
    )
}

/// moat-cni ADD inside the node, as its kubelet would run it.
fn add_in(node: &Netns, env: &Env, pod: &Netns, container_id: &str, mtu: Option<u32>) -> Value {
    let bin = support_cni::cni_path(&env.root().join(container_id));
    let mut conf = env.standalone_conf("podmtu", json!([[{"subnet": "10.244.9.0/24"}]]));
    if let Some(mtu) = mtu {
        conf["mtu"] = mtu.into();
    }
    let out = Exec::new(bin.join("moat-cni"), "ADD")
        .nsenter_net(node.path())
        .container_id(container_id)
        .netns(pod.path())
        .ifname("eth0")
        .args(moat_testkit::cni::pod_args("default", container_id))
        .path(&bin)
        .run(Some(&conf))
        .unwrap();
    assert!(out.status.success(), "ADD failed: {}", out.text());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The MTU of `eth0` in the pod, as the kernel has it.
fn pod_eth0_mtu(pod: &Netns) -> u64 {
    let links: Value =
        serde_json::from_str(&sh(&format!("ip -n {} -j link show eth0", pod.0))).unwrap();
    links[0]["mtu"].as_u64().expect("eth0 has an MTU")
}

#[test]
fn pod_mtu_follows_the_uplink_unless_configured() {
    let env = Env::new("podmtu");
    let node = node_with_uplink_mtu_1400();
    let _moatd = start_moatd_in(&node, &env);

    // No `mtu` in the config: the uplink's 1400 (no overlay, so nothing subtracted).
    let pod = Netns::new("moatmtup");
    let result = add_in(&node, &env, &pod, "mtu-uplink", None);
    assert_eq!(pod_eth0_mtu(&pod), 1400);
    let eth0 = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth0")
        .unwrap();
    assert_eq!(eth0["mtu"], 1400, "{result}");

    // An explicit `mtu` wins over the uplink's.
    let pinned = Netns::new("moatmtux");
    add_in(&node, &env, &pinned, "mtu-explicit", Some(1300));
    assert_eq!(pod_eth0_mtu(&pinned), 1300);
}
