//! Issue #3: "`kill -9` of an ADD at random points, then GC or the next ADD, leaves nothing
//! behind". Rather than random timing, the plugin is stopped deterministically at every step
//! of a standalone ADD: the binary these tests run is built with the `test-hooks` feature,
//! and `MOAT_CNI_TEST_ABORT_AT=<step>` makes it SIGKILL itself there (test_hook.rs). For each
//! step the test checks that the kill really left state behind, then that
//! - GC, with the killed container absent from the valid attachments, removes all of it
//!   while a live pod listed as valid keeps everything; and
//! - the next ADD of the same attachment succeeds, and its DEL leaves nothing (after the
//!   last step the ADD is complete but unreported: the next ADD is a repeat, refused as
//!   "interface exists", and the runtime's DEL leaves nothing).
//!
//! Each killed ADD also leaves a veth of its own, so these checks cover the IPAM allocation
//! made after the veth, and the registration with moatd made while the programs go on.
//!
//! "Nothing" is checked everywhere state lives: host veth, pod interface and addresses, IPAM
//! allocation and files, pinned links, moatd's endpoint, endpoint and ipcache map entries.
//! Needs root and the workspace binaries (moatd, moat-ipam), like real_plugin.rs.

mod support;

use std::{net::IpAddr, os::unix::process::ExitStatusExt};

use moat_datapath::is_attached;
use serde_json::{Value, json};
use support::*;

/// The steps of a standalone ADD, in order (test_hook.rs).
const STEPS: [&str; 5] = [
    "veth-pair-created",
    "ipam-allocated",
    "registered",
    "attached",
    "veth-configured",
];
const NETWORK: &str = "moat-crash";
/// This test's own host veth prefix: GC sweeps veths by prefix, so the test's GC sees only
/// its own veths, never another test's running at the same time.
const PREFIX: &str = "mkl";
const NAMESPACE: &str = "crash";

fn conflist(world: &World) -> Conflist {
    Conflist::new(
        NETWORK,
        vec![merged(
            json!({
                "type": "moat-cni",
                "mode": "standalone",
                "hostVethPrefix": PREFIX,
                "ipam": {
                    "type": "moat-ipam",
                    "dataDir": world.ipam_dir(),
                    "ranges": [[{"subnet": "10.88.70.0/24"}], [{"subnet": "fd88:70::/64"}]]
                }
            }),
            &world.moat_keys(),
        )],
    )
}

/// Runs moat-cni ADD with the abort hook at `step`; asserts it died of SIGKILL and printed
/// nothing, and that the state the step implies is there. Returns what to look for later.
fn killed_add(
    world: &World,
    list: &Conflist,
    inv: &Invocation,
    netns: &Netns,
    step: &str,
) -> Trace {
    let mut inv = inv.clone();
    inv.env.push(("MOAT_CNI_TEST_ABORT_AT".into(), step.into()));
    let config = list.plugin_config(&list.plugins[0], None, &json!({}));
    let (outcome, status) =
        exec_plugin_status(&world.cni_path(), "moat-cni", "ADD", Some(&inv), &config);
    assert_eq!(
        status.signal(),
        Some(9),
        "{step}: ADD must die of SIGKILL: {outcome:?}"
    );
    assert_eq!(
        outcome,
        Err(Value::Null),
        "{step}: a killed ADD prints nothing"
    );

    let host_if = host_veth_name(PREFIX, &inv.container_id, &inv.ifname);
    let index = STEPS.iter().position(|s| *s == step).unwrap();
    let ips: Vec<IpAddr> = ipam_state(world, NETWORK)
        .into_iter()
        .filter(|(_, owner)| *owner == inv.container_id)
        .map(|(address, _)| address.parse().unwrap())
        .collect();
    assert_eq!(
        ips.len(),
        if index >= 1 { 2 } else { 0 },
        "{step}: allocations"
    );
    assert!(link_exists(&host_if), "{step}: host veth {host_if}");
    assert!(
        !netns.exec("ip -o link show eth0").is_empty(),
        "{step}: eth0 in the pod"
    );
    assert_eq!(link_up(&host_if), index >= 4, "{step}: host veth up");
    let registered = world
        .endpoints()
        .iter()
        .any(|(cid, _, _)| *cid == inv.container_id);
    assert_eq!(registered, index >= 2, "{step}: moatd registration");
    // The programs go on concurrently with IPAM and the registration, so in between their
    // state is whatever the attaching thread had reached.
    let attached = is_attached(&world.pins(), &host_if);
    match index {
        0 => assert!(!attached, "{step}: nothing attached yet"),
        1 | 2 => {}
        _ => assert!(attached, "{step}: pinned links"),
    }
    Trace {
        container_id: inv.container_id.clone(),
        netns: netns.name.clone(),
        host_ifindex: ifindex_of(&host_if),
        host_if,
        ips,
    }
}

fn assert_live(world: &World, live: &Invocation, host_if: &str) {
    assert!(link_exists(host_if), "live pod's veth must survive GC");
    assert!(
        is_attached(&world.pins(), host_if),
        "live pod must stay attached"
    );
    assert!(
        world
            .endpoints()
            .iter()
            .any(|(cid, _, _)| *cid == live.container_id),
        "live pod must stay registered"
    );
    assert_eq!(
        ipam_state(world, NETWORK)
            .iter()
            .filter(|(_, owner)| *owner == live.container_id)
            .count(),
        2,
        "live pod keeps its addresses"
    );
}

#[test]
fn an_add_killed_at_any_step_is_cleaned_up_by_gc_or_by_the_next_add() {
    let mut world = World::new("kl");
    world.start_moatd();
    let list = conflist(&world);

    // A healthy pod that every GC below is told is valid.
    let live_ns = Netns::new("mkl-live");
    let live = Invocation::new("ctrkl-live", &live_ns, NAMESPACE, "live");
    let live_result = list.add(&world, &live, &json!({})).expect("ADD live");
    let live_host = host_veth_name(PREFIX, &live.container_id, "eth0");
    assert_eq!(result_host_if(&live_result, &[]), live_host);
    let valid = json!({
        "cni.dev/valid-attachments": [{"containerID": live.container_id, "ifname": "eth0"}]
    });

    for (n, step) in STEPS.iter().enumerate() {
        // --- killed, then GC ---
        let netns = Netns::new(&format!("mkl-gc{n}"));
        let inv = Invocation::new(
            &format!("ctrkl-gc{n}"),
            &netns,
            NAMESPACE,
            &format!("gc{n}"),
        );
        let trace = killed_add(&world, &list, &inv, &netns, step);
        let gc = list.network_command(&world, 0, "GC", &valid);
        assert_eq!(gc, Ok(Value::Null), "{step}: GC");
        assert_nothing_left(&world, NETWORK, &[trace]);
        assert_live(&world, &live, &live_host);

        // --- killed, then the runtime's next ADD of the same attachment, then DEL ---
        let netns = Netns::new(&format!("mkl-re{n}"));
        let inv = Invocation::new(
            &format!("ctrkl-re{n}"),
            &netns,
            NAMESPACE,
            &format!("re{n}"),
        );
        let killed = killed_add(&world, &list, &inv, &netns, step);
        if *step == "veth-configured" {
            // Everything was done but the result not printed: indistinguishable from a
            // completed ADD, so the next ADD is a repeat and is refused as "interface exists"
            // (spec), leaving the attachment as it was; the runtime's DEL then removes it.
            let again = list.add(&world, &inv, &json!({}));
            assert_eq!(code(&again), 112, "{again:?}");
            assert!(is_attached(&world.pins(), &killed.host_if));
            list.del(&world, &inv, None, &json!({}))
                .unwrap_or_else(|e| panic!("{step}: DEL: {e}"));
            assert_nothing_left(&world, NETWORK, &[killed]);
            assert_live(&world, &live, &live_host);
            continue;
        }
        let result = list
            .add(&world, &inv, &json!({}))
            .unwrap_or_else(|e| panic!("{step}: ADD after the kill: {e}"));
        let host_if = result_host_if(&result, &[]);
        assert_eq!(host_if, killed.host_if);
        assert!(
            is_attached(&world.pins(), &host_if),
            "{step}: re-ADD attached"
        );
        let mut ips = vec![
            result_ip(&result, false).unwrap(),
            result_ip(&result, true).unwrap(),
        ];
        // IPAM hands the same attachment the same addresses (when it had got any).
        ips.sort();
        let mut before = killed.ips.clone();
        before.sort();
        if !before.is_empty() {
            assert_eq!(ips, before, "{step}: same addresses on the next ADD");
        }
        assert_eq!(
            ipam_state(&world, NETWORK)
                .iter()
                .filter(|(_, owner)| *owner == inv.container_id)
                .count(),
            2,
            "{step}: no extra allocation"
        );
        let new_ifindex = ifindex_of(&host_if);
        list.del(&world, &inv, Some(&result), &json!({}))
            .unwrap_or_else(|e| panic!("{step}: DEL: {e}"));
        assert_nothing_left(
            &world,
            NETWORK,
            &[
                killed,
                Trace {
                    container_id: inv.container_id.clone(),
                    netns: netns.name.clone(),
                    host_if,
                    host_ifindex: new_ifindex,
                    ips,
                },
            ],
        );
        assert_live(&world, &live, &live_host);
    }

    list.del(&world, &live, Some(&live_result), &json!({}))
        .expect("DEL live");
    assert!(world.endpoints().is_empty(), "{:?}", world.endpoints());
    assert!(world.attached().is_empty(), "{:?}", world.attached());
}
