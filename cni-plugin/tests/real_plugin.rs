//! The real moat-cni binary on this kernel, driven like a runtime drives it: chained after the
//! reference bridge and ptp plugins (with portmap after Moat), standalone with moat-ipam,
//! policy enforced on real TCP traffic, DEL idempotency, rollback when moatd is down, CHECK,
//! GC and STATUS. Needs root, the reference plugins in /usr/lib/cni and the workspace
//! binaries (moatd, moat-ipam) built next to this test (`make test` builds them).

mod support;

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use moat_datapath::is_attached;
use moat_testkit::lab::probe;
use serde_json::{Value, json};
use support::*;

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);

fn bridge_conflist(world: &World, n: u8, with_portmap: bool) -> Conflist {
    let mut plugins = vec![
        json!({
            "type": "bridge",
            "bridge": format!("mcb{n}"),
            "isGateway": true,
            "ipam": {
                "type": "host-local",
                "dataDir": world.ipam_dir(),
                "ranges": [[{"subnet": format!("10.88.{n}.0/24")}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }),
        merged(
            json!({"type": "moat-cni", "mode": "chained"}),
            &world.moat_keys(),
        ),
    ];
    if with_portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    let mut list = Conflist::new(&format!("moat-bridge-{n}"), plugins);
    // The Debian reference plugins speak up to 1.0.0.
    list.version = "1.0.0".into();
    list
}

fn standalone_conflist(world: &World, n: u8) -> Conflist {
    Conflist::new(
        &format!("moat-sa-{n}"),
        vec![merged(
            json!({
                "type": "moat-cni",
                "mode": "standalone",
                "mtu": 1400,
                "ipam": {
                    "type": "moat-ipam",
                    "dataDir": world.ipam_dir(),
                    "ranges": [
                        [{"subnet": format!("10.88.{n}.0/24")}],
                        [{"subnet": format!("fd88:{n:x}::/64")}]
                    ]
                }
            }),
            &world.moat_keys(),
        )],
    )
}

/// The chained list's result must be bridge's result passed through unchanged.
fn assert_pass_through(result: &Value, netns: &Netns) {
    assert_eq!(result["cniVersion"], "1.0.0");
    let interfaces = result["interfaces"].as_array().unwrap();
    assert!(
        interfaces
            .iter()
            .any(|i| i["name"] == "eth0" && i["sandbox"] == json!(netns.path())),
        "{result}"
    );
    assert!(result_ip(result, false).is_some(), "{result}");
}

#[test]
fn chained_after_bridge_with_portmap_enforces_policy_check_and_del() {
    let n = 41;
    let mut world = World::new("br");
    world.write_policy(
        "pods.yaml",
        &(pod_yaml("prod", "web", "web")
            + &pod_yaml("prod", "client", "client")
            + &pod_yaml("prod", "other", "other")),
    );
    world.write_policy("policy.yaml", &web_policy("prod"));
    world.start_moatd();
    let list = bridge_conflist(&world, n, true);
    let ports =
        json!({"portMappings": [{"hostPort": 18041, "containerPort": 8080, "protocol": "tcp"}]});

    let mut pods = Vec::new();
    for name in ["web", "client", "other"] {
        let netns = Netns::new(&format!("mc{n}-{name}"));
        let inv = Invocation::new(&format!("ctr{n}{name}"), &netns, "prod", name);
        let runtime = if name == "web" {
            ports.clone()
        } else {
            json!({})
        };
        let result = list
            .add(&world, &inv, &runtime)
            .expect("ADD through the list");
        assert_pass_through(&result, &netns);
        let host_if = result_host_if(&result, &[&format!("mcb{n}")]);
        assert!(is_attached(&world.pins(), &host_if), "{host_if} attached");
        let v4 = match result_ip(&result, false).unwrap() {
            IpAddr::V4(v4) => v4,
            _ => unreachable!(),
        };
        pods.push((netns, inv, result, host_if, v4, runtime));
    }
    let endpoints = world.endpoints();
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");
    for (_, inv, _, host_if, _, _) in &pods {
        assert!(endpoints.contains(&(inv.container_id.clone(), "eth0".into(), host_if.clone())));
    }

    let lab: Vec<_> = pods
        .iter()
        .zip(["web", "client", "other"])
        .map(|((netns, _, _, host_if, v4, _), name)| lab_pod(netns, name, host_if, *v4, None))
        .collect();
    let _server = probe::EchoServer::start(&lab[0], 8080).unwrap();
    assert!(
        probe::tcp(&lab[1], IpAddr::V4(lab[0].v4), 8080, LONG),
        "client -> web must be allowed"
    );
    assert!(
        !probe::tcp(&lab[2], IpAddr::V4(lab[0].v4), 8080, SHORT),
        "other -> web must be denied"
    );

    // CHECK passes for every plugin of the list, then fails once enforcement is removed.
    // (The reference portmap's CHECK fails on a pod with port mappings but no IPv6 address:
    // it looks for its IPv6 DNAT chain. The web pod is therefore checked without portmap.)
    let without_portmap = bridge_conflist(&world, n, false);
    for (i, (_, inv, result, _, _, runtime)) in pods.iter().enumerate() {
        let checked = if i == 0 { &without_portmap } else { &list };
        checked.check(&world, inv, result, runtime).expect("CHECK");
    }
    let (_, web_inv, web_result, web_host, _, web_rt) = &pods[0];
    moat_datapath::detach_endpoint(&world.pins(), web_host).unwrap();
    let failed = without_portmap.check(&world, web_inv, web_result, web_rt);
    assert_eq!(code(&failed), 111, "{failed:?}");
    assert!(
        failed.unwrap_err()["msg"]
            .as_str()
            .unwrap()
            .contains("not attached")
    );

    // DEL in reverse order, twice; then once more after the namespace is gone.
    for (netns, inv, result, host_if, _, runtime) in &pods {
        list.del(&world, inv, Some(result), runtime).expect("DEL");
        list.del(&world, inv, Some(result), runtime)
            .expect("repeated DEL");
        netns.delete();
        list.del(&world, inv, None, runtime)
            .expect("DEL without netns or prevResult");
        assert!(!is_attached(&world.pins(), host_if));
    }
    assert!(world.endpoints().is_empty());
    assert!(world.attached().is_empty(), "{:?}", world.attached());
    let _ = sh(&format!("ip link del mcb{n}"));
}

#[test]
fn chained_after_ptp_registers_the_peer_found_through_iflink() {
    let n = 42;
    let mut world = World::new("ptp");
    world.start_moatd();
    let mut list = Conflist::new(
        "moat-ptp",
        vec![
            json!({
                "type": "ptp",
                "ipam": {
                    "type": "host-local",
                    "dataDir": world.ipam_dir(),
                    "ranges": [[{"subnet": format!("10.88.{n}.0/24")}]]
                }
            }),
            merged(json!({"type": "moat-cni"}), &world.moat_keys()),
        ],
    );
    list.version = "1.0.0".into();
    let netns = Netns::new(&format!("mc{n}-a"));
    let inv = Invocation::new(&format!("ctr{n}a"), &netns, "default", "a");
    let result = list.add(&world, &inv, &json!({})).expect("ADD");
    // ptp's host veth is whatever it named it; Moat found it through IFLA_LINK.
    let host_if = result_host_if(&result, &[]);
    assert!(is_attached(&world.pins(), &host_if));
    assert_eq!(
        world.endpoints(),
        vec![(inv.container_id.clone(), "eth0".into(), host_if.clone())]
    );
    list.check(&world, &inv, &result, &json!({}))
        .expect("CHECK");

    // A second ADD on an unknown pod identity falls back to default/<container id>.
    let netns_b = Netns::new(&format!("mc{n}-b"));
    let mut inv_b = Invocation::new(&format!("ctr{n}b"), &netns_b, "x", "y");
    inv_b.args = String::new();
    let result_b = list
        .add(&world, &inv_b, &json!({}))
        .expect("ADD without K8S args");
    list.del(&world, &inv_b, Some(&result_b), &json!({}))
        .expect("DEL");

    netns.delete();
    list.del(&world, &inv, Some(&result), &json!({}))
        .expect("DEL after netns is gone");
    list.del(&world, &inv, Some(&result), &json!({}))
        .expect("repeated DEL");
    assert!(!is_attached(&world.pins(), &host_if));
    assert!(world.endpoints().is_empty());
}

#[test]
fn standalone_dual_stack_builds_routes_enforces_and_cleans_up() {
    let n = 43;
    let mut world = World::new("sa");
    world.write_policy(
        "pods.yaml",
        &(pod_yaml("shop", "web", "web")
            + &pod_yaml("shop", "client", "client")
            + &pod_yaml("shop", "other", "other")),
    );
    world.write_policy("policy.yaml", &web_policy("shop"));
    world.start_moatd();
    let list = standalone_conflist(&world, n);
    let mut pods = Vec::new();
    for name in ["web", "client", "other"] {
        let netns = Netns::new(&format!("mc{n}-{name}"));
        let inv = Invocation::new(&format!("ctr{n}{name}"), &netns, "shop", name);
        let result = list.add(&world, &inv, &json!({})).expect("standalone ADD");
        let host_if = result["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            host_if.starts_with("moat") && host_if.len() == 15,
            "{result}"
        );
        assert_eq!(result["interfaces"][1]["name"], "eth0");
        assert_eq!(result["interfaces"][1]["sandbox"], json!(netns.path()));
        assert_eq!(result["interfaces"][1]["mtu"], 1400);
        let ips = result["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2, "{result}");
        assert!(ips.iter().all(|ip| ip["interface"] == 1));
        assert!(ips[0]["address"].as_str().unwrap().ends_with("/32"));
        assert!(ips[1]["address"].as_str().unwrap().ends_with("/128"));
        let routes: Vec<&str> = result["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap())
            .collect();
        assert_eq!(routes, ["0.0.0.0/0", "::/0"]);
        assert!(is_attached(&world.pins(), &host_if));
        let neigh = netns.exec("ip neigh show dev eth0");
        assert!(
            neigh.contains("169.254.1.1") && neigh.contains("PERMANENT"),
            "{neigh}"
        );
        assert!(neigh.contains("fe80::1"), "{neigh}");
        let (IpAddr::V4(v4), Some(IpAddr::V6(v6))) =
            (result_ip(&result, false).unwrap(), result_ip(&result, true))
        else {
            panic!("{result}")
        };
        assert!(sh(&format!("ip route show {v4}")).contains(&host_if));
        pods.push((netns, inv, result, host_if, v4, v6));
    }
    let lab: Vec<_> = pods
        .iter()
        .zip(["web", "client", "other"])
        .map(|((netns, _, _, host_if, v4, v6), name)| lab_pod(netns, name, host_if, *v4, Some(*v6)))
        .collect();
    let _servers: Vec<_> = lab
        .iter()
        .map(|p| probe::EchoServer::start(p, 8080).unwrap())
        .collect();
    assert!(
        probe::tcp(&lab[1], IpAddr::V4(lab[0].v4), 8080, LONG),
        "client -> web v4"
    );
    assert!(
        probe::tcp(&lab[1], IpAddr::V6(lab[0].v6), 8080, LONG),
        "client -> web v6"
    );
    assert!(
        !probe::tcp(&lab[2], IpAddr::V4(lab[0].v4), 8080, SHORT),
        "other -> web denied"
    );
    assert!(
        !probe::tcp(&lab[2], IpAddr::V6(lab[0].v6), 8080, SHORT),
        "other -> web v6 denied"
    );
    assert!(
        probe::tcp(&lab[0], IpAddr::V4(lab[2].v4), 8080, LONG),
        "other is not isolated"
    );

    // CHECK: success, then failure when the container lost its default route.
    let (web_ns, web_inv, web_result, _, _, _) = &pods[0];
    list.check(&world, web_inv, web_result, &json!({}))
        .expect("CHECK");
    web_ns.exec("ip route del default");
    let failed = list.check(&world, web_inv, web_result, &json!({}));
    assert_eq!(code(&failed), 111);
    assert!(
        failed.unwrap_err()["msg"]
            .as_str()
            .unwrap()
            .contains("default route")
    );

    // A second ADD for an attachment whose interface exists is refused (spec: interface
    // exists), and does not disturb the first.
    let again = list.add(&world, web_inv, &json!({}));
    assert_eq!(code(&again), 112, "{again:?}");
    assert!(is_attached(&world.pins(), &pods[0].3));

    drop(_servers);
    for (netns, inv, result, host_if, v4, _) in &pods {
        list.del(&world, inv, Some(result), &json!({}))
            .expect("DEL");
        // At once: moatd no longer knows the endpoint, and the veth keeps its (tc) filters,
        // which now drop everything, for as long as it exists: never a moment unfiltered.
        // moatd deletes the veth, and the pod's end and the host route with it, right after
        // answering.
        assert!(
            world
                .endpoints()
                .iter()
                .all(|(c, _, _)| *c != inv.container_id),
            "endpoint forgotten when DEL returns"
        );
        assert!(
            is_attached(&world.pins(), host_if) || !link_exists(host_if),
            "{host_if} exists without its filters"
        );
        wait_until("host veth deleted", || !link_exists(host_if));
        wait_until("eth0 gone from the pod", || {
            !netns.exec("ip link").contains("eth0")
        });
        assert!(!sh("ip route").contains(&format!("{v4} ")));
        list.del(&world, inv, Some(result), &json!({}))
            .expect("repeated DEL");
        netns.delete();
        list.del(&world, inv, None, &json!({}))
            .expect("DEL with netns gone");
    }
    assert!(world.endpoints().is_empty());
    // IPAM DEL was delegated: moat-ipam holds nothing for these attachments.
    for (_, inv, _, _, _, _) in &pods {
        assert!(!ipam_holds(&world, &list, inv));
    }
}

#[test]
fn moatd_down_add_fails_with_11_and_leaves_nothing_del_queues_status_is_50() {
    let n = 44;
    let world = World::new("down");
    let netns = Netns::new(&format!("mc{n}-a"));
    let inv = Invocation::new(&format!("ctr{n}a"), &netns, "default", "a");

    // Standalone: nothing created at all.
    let list = standalone_conflist(&world, n);
    let failed = list.add(&world, &inv, &json!({}));
    assert_eq!(code(&failed), 11, "{failed:?}");
    let error = failed.unwrap_err();
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("moatd is not reachable"),
        "{error}"
    );
    let host_if = moat_host_name(&inv);
    assert!(!link_exists(&host_if));
    assert!(!netns.exec("ip link").contains("eth0"));
    assert!(world.attached().is_empty());
    assert!(
        !world.ipam_dir().join(&list.name).exists()
            || std::fs::read_dir(world.ipam_dir().join(&list.name))
                .unwrap()
                .all(|e| !e.unwrap().file_name().to_string_lossy().contains("ctr"))
    );
    // The runtime's DEL after the failed ADD succeeds and queues the unregister.
    list.del(&world, &inv, None, &json!({}))
        .expect("DEL with moatd down");
    assert!(
        world
            .pending()
            .join(format!("{}-eth0.json", inv.container_id))
            .exists()
    );
    let queued: Value = serde_json::from_slice(
        &std::fs::read(
            world
                .pending()
                .join(format!("{}-eth0.json", inv.container_id)),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        queued,
        json!({"op": "unregister", "container_id": inv.container_id, "ifname": "eth0"})
    );

    // Chained after bridge: bridge made the interface, Moat refuses; the runtime DELs.
    let chained = bridge_conflist(&world, n, false);
    let netns_b = Netns::new(&format!("mc{n}-b"));
    let inv_b = Invocation::new(&format!("ctr{n}b"), &netns_b, "default", "b");
    let failed = chained.add(&world, &inv_b, &json!({}));
    assert_eq!(code(&failed), 11, "{failed:?}");
    assert!(world.attached().is_empty());
    chained
        .del(&world, &inv_b, None, &json!({}))
        .expect("DEL after failed ADD");
    assert!(!netns_b.exec("ip link").contains("eth0"));

    // STATUS: 50 while moatd is down.
    let status = list.network_command(&world, 0, "STATUS", &json!({}));
    assert_eq!(code(&status), 50, "{status:?}");
    let _ = sh(&format!("ip link del mcb{n}"));
}

/// Whether moat-ipam still holds an allocation for the attachment (its CHECK: 101 = none).
fn ipam_holds(world: &World, list: &Conflist, inv: &Invocation) -> bool {
    let mut config = list.plugins[0].clone();
    config["name"] = json!(list.name);
    config["cniVersion"] = json!(list.version);
    match exec_plugin(&world.cni_path(), "moat-ipam", "CHECK", Some(inv), &config) {
        Ok(_) => true,
        Err(e) if e["code"] == 101 => false,
        Err(e) => panic!("moat-ipam CHECK: {e}"),
    }
}

fn moat_host_name(inv: &Invocation) -> String {
    // Same derivation as the plugin: "moat" + 11 hex digits of FNV-1a 64 of "cid/ifname".
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{}/{}", inv.container_id, inv.ifname).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("moat{}", &format!("{hash:016x}")[..11])
}

#[test]
fn attach_failure_after_registration_rolls_everything_back() {
    let n = 45;
    let mut world = World::new("rb");
    world.start_moatd();
    // A pin root without programs: registration succeeds, attaching cannot.
    let empty_pins = world.dir.path().join("no-programs");
    let list = Conflist::new(
        "moat-rb",
        vec![merged(
            json!({
                "type": "moat-cni",
                "ipam": {
                    "type": "moat-ipam",
                    "dataDir": world.ipam_dir(),
                    "ranges": [[{"subnet": format!("10.88.{n}.0/24")}]]
                }
            }),
            &merged(world.moat_keys(), &json!({"pinRoot": empty_pins})),
        )],
    );
    let netns = Netns::new(&format!("mc{n}-a"));
    let inv = Invocation::new(&format!("ctr{n}a"), &netns, "default", "a");
    let failed = list.add(&world, &inv, &json!({}));
    assert_eq!(code(&failed), 11, "{failed:?}");
    assert!(world.endpoints().is_empty(), "unregistered on rollback");
    assert!(
        !link_exists(&moat_host_name(&inv)),
        "veth deleted on rollback"
    );
    assert!(!netns.exec("ip link").contains("eth0"));
    // IPAM released on rollback.
    assert!(!ipam_holds(&world, &list, &inv));
    let good = standalone_conflist(&world, n);
    let result = good.add(&world, &inv, &json!({})).expect("ADD");
    assert!(ipam_holds(&world, &good, &inv));
    good.del(&world, &inv, Some(&result), &json!({}))
        .expect("DEL");
}

#[test]
fn gc_removes_stale_attachments_and_status_reports_ready() {
    let n = 46;
    let mut world = World::new("gc");
    world.start_moatd();
    let list = standalone_conflist(&world, n);
    let keep_ns = Netns::new(&format!("mc{n}-keep"));
    let stale_ns = Netns::new(&format!("mc{n}-stale"));
    let keep = Invocation::new(&format!("ctr{n}keep"), &keep_ns, "default", "keep");
    let stale = Invocation::new(&format!("ctr{n}stale"), &stale_ns, "default", "stale");
    let keep_result = list.add(&world, &keep, &json!({})).expect("ADD keep");
    let stale_result = list.add(&world, &stale, &json!({})).expect("ADD stale");
    let stale_host = moat_host_name(&stale);
    assert!(is_attached(&world.pins(), &stale_host));

    list.network_command(&world, 0, "STATUS", &json!({}))
        .expect("STATUS ready");

    // GC without any attachment list removes nothing.
    list.network_command(&world, 0, "GC", &json!({}))
        .expect("GC");
    assert_eq!(world.endpoints().len(), 2);

    let gc = list.network_command(
        &world,
        0,
        "GC",
        &json!({"cni.dev/valid-attachments": [{"containerID": keep.container_id, "ifname": "eth0"}]}),
    );
    assert_eq!(gc, Ok(Value::Null), "GC prints nothing");
    let endpoints = world.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].0, keep.container_id);
    assert!(!is_attached(&world.pins(), &stale_host));
    assert!(!link_exists(&stale_host));
    assert!(is_attached(&world.pins(), &moat_host_name(&keep)));
    // IPAM got the GC too: the stale allocation is released, the live one kept.
    assert!(!ipam_holds(&world, &list, &stale));
    assert!(ipam_holds(&world, &list, &keep));
    let _ = stale_result;
    // The legacy key works as well.
    list.network_command(
        &world,
        0,
        "GC",
        &json!({"cni.dev/attachments": [{"containerID": keep.container_id, "ifname": "eth0"}]}),
    )
    .expect("GC with the legacy key");
    assert_eq!(world.endpoints().len(), 1);
    list.del(&world, &keep, Some(&keep_result), &json!({}))
        .expect("DEL");
    assert!(world.endpoints().is_empty());
    assert!(world.attached().is_empty());
}

#[test]
fn chained_without_prev_result_is_code_7_and_unknown_del_succeeds() {
    let n = 47;
    let mut world = World::new("pr");
    world.start_moatd();
    let list = Conflist::new(
        "moat-only",
        vec![merged(
            json!({"type": "moat-cni", "mode": "chained"}),
            &world.moat_keys(),
        )],
    );
    let netns = Netns::new(&format!("mc{n}-a"));
    let inv = Invocation::new(&format!("ctr{n}a"), &netns, "default", "a");
    let failed = list.add(&world, &inv, &json!({}));
    assert_eq!(code(&failed), 7, "{failed:?}");
    assert!(
        failed.unwrap_err()["msg"]
            .as_str()
            .unwrap()
            .contains("prevResult")
    );
    // DEL of a container Moat never saw.
    list.del(&world, &inv, None, &json!({}))
        .expect("DEL unknown container");
    let _ = Ipv6Addr::LOCALHOST;
}
