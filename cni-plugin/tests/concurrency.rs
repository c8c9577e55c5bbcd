//! Checklist #84 (concurrent invocations) and issue #3's "50 concurrent ADDs get 50 distinct
//! addresses, and 50 DELs leave nothing behind", for the real plugin: 50 standalone ADDs at
//! once (moat-cni + moat-ipam + one private moatd, real namespaces), then 50 DELs at once.
//! Every pod gets its own addresses, every one is registered, attached and enforced on real
//! traffic, and nothing is left afterwards: no host veth, pod interface or address, IPAM
//! allocation or file, pinned link, moatd endpoint, or endpoint/ipcache map entry. Needs root
//! and the workspace binaries (moatd, moat-ipam), like real_plugin.rs.

mod support;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use moat_datapath::is_attached;
use moat_testkit::lab::probe;
use serde_json::{Value, json};
use support::*;

const PODS: usize = 50;
const NAMESPACE: &str = "conc";
const NETWORK: &str = "moat-conc";

fn pod_name(i: usize) -> String {
    format!("p{i:02}")
}

/// p00 is the client, p01 the outsider, the rest are web servers.
fn app(i: usize) -> &'static str {
    match i {
        0 => "client",
        1 => "other",
        _ => "web",
    }
}

struct Pod {
    netns: Netns,
    inv: Invocation,
    result: Value,
    host_if: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

fn ipam_allocations(world: &World) -> usize {
    ipam_state(world, NETWORK).len()
}

#[test]
fn fifty_parallel_standalone_adds_and_dels_are_unique_enforced_and_leave_nothing() {
    let mut world = World::new("cc");
    let pods_yaml: String = (0..PODS)
        .map(|i| pod_yaml(NAMESPACE, &pod_name(i), app(i)))
        .collect();
    world.write_policy("pods.yaml", &pods_yaml);
    world.write_policy("policy.yaml", &web_policy(NAMESPACE));
    world.start_moatd();
    let list = Conflist::new(
        NETWORK,
        vec![merged(
            json!({
                "type": "moat-cni",
                "mode": "standalone",
                "ipam": {
                    "type": "moat-ipam",
                    "dataDir": world.ipam_dir(),
                    "ranges": [[{"subnet": "10.88.60.0/24"}], [{"subnet": "fd88:60::/64"}]]
                }
            }),
            &world.moat_keys(),
        )],
    );

    // --- 50 ADDs at once ---
    let barrier = std::sync::Barrier::new(PODS);
    let pods: Vec<Pod> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PODS)
            .map(|i| {
                let (world, list, barrier) = (&world, &list, &barrier);
                s.spawn(move || {
                    let netns = Netns::new(&format!("mcc-{i}"));
                    let inv =
                        Invocation::new(&format!("ctrcc{i:02}"), &netns, NAMESPACE, &pod_name(i));
                    barrier.wait();
                    let result = list
                        .add(world, &inv, &json!({}))
                        .unwrap_or_else(|e| panic!("ADD {i}: {e}"));
                    let host_if = result_host_if(&result, &[]);
                    let (Some(IpAddr::V4(v4)), Some(IpAddr::V6(v6))) =
                        (result_ip(&result, false), result_ip(&result, true))
                    else {
                        panic!("dual-stack result expected: {result}");
                    };
                    Pod {
                        netns,
                        inv,
                        result,
                        host_if,
                        v4,
                        v6,
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let v4: HashSet<_> = pods.iter().map(|p| p.v4).collect();
    let v6: HashSet<_> = pods.iter().map(|p| p.v6).collect();
    let hosts: HashSet<_> = pods.iter().map(|p| p.host_if.clone()).collect();
    assert_eq!(v4.len(), PODS, "IPv4 addresses must be unique");
    assert_eq!(v6.len(), PODS, "IPv6 addresses must be unique");
    assert_eq!(hosts.len(), PODS, "host veths must be unique");
    assert_eq!(ipam_allocations(&world), 2 * PODS);
    let endpoints = world.endpoints();
    assert_eq!(endpoints.len(), PODS, "{endpoints:?}");
    for pod in &pods {
        assert!(is_attached(&world.pins(), &pod.host_if), "{}", pod.host_if);
        assert!(endpoints.contains(&(
            pod.inv.container_id.clone(),
            "eth0".into(),
            pod.host_if.clone()
        )));
    }

    // --- enforced: client reaches every web pod, the outsider none (both families) ---
    let lab: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| lab_pod(&p.netns, &pod_name(i), &p.host_if, p.v4, Some(p.v6)))
        .collect();
    let servers: Vec<_> = lab[2..]
        .iter()
        .map(|pod| probe::EchoServer::start(pod, 8080).unwrap())
        .collect();
    std::thread::scope(|s| {
        for web in &lab[2..] {
            let (client, other) = (&lab[0], &lab[1]);
            s.spawn(move || {
                for to in [IpAddr::V4(web.v4), IpAddr::V6(web.v6)] {
                    assert!(
                        probe::tcp(client, to, 8080, Duration::from_secs(3)),
                        "client -> {} {to} must be allowed",
                        web.name
                    );
                    assert!(
                        !probe::tcp(other, to, 8080, Duration::from_millis(700)),
                        "other -> {} {to} must be denied",
                        web.name
                    );
                }
            });
        }
    });
    drop(servers);

    let traces: Vec<Trace> = pods
        .iter()
        .map(|p| Trace {
            container_id: p.inv.container_id.clone(),
            netns: p.netns.name.clone(),
            host_if: p.host_if.clone(),
            host_ifindex: ifindex_of(&p.host_if),
            ips: vec![IpAddr::V4(p.v4), IpAddr::V6(p.v6)],
        })
        .collect();
    {
        // The map entries the DELs must remove are there now.
        let maps = moat_datapath::Maps::open(&world.pins()).unwrap();
        for t in &traces {
            assert!(maps.endpoint(t.host_ifindex).is_some(), "{}", t.host_if);
            for ip in &t.ips {
                assert_eq!(
                    maps.lookup_ipcache(*ip).map(|v| v.ifindex),
                    Some(t.host_ifindex)
                );
            }
        }
    }

    // --- 50 DELs at once (libcni: with the cached result) ---
    std::thread::scope(|s| {
        for pod in &pods {
            let (world, list, barrier) = (&world, &list, &barrier);
            s.spawn(move || {
                barrier.wait();
                list.del(world, &pod.inv, Some(&pod.result), &json!({}))
                    .unwrap_or_else(|e| panic!("DEL {}: {e}", pod.inv.container_id));
            });
        }
    });
    assert!(world.endpoints().is_empty(), "{:?}", world.endpoints());
    assert!(world.attached().is_empty(), "{:?}", world.attached());
    assert_eq!(ipam_allocations(&world), 0, "IPAM allocations left");
    assert_nothing_left(&world, NETWORK, &traces);
}
