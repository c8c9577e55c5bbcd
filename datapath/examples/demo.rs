//! The local demo (`make demo`): three real pods on this kernel, a micro-perimeter around the
//! backend, real connections, and every drop explained from the event stream.
use std::time::Duration;

use anyhow::Result;
use ipnetwork::IpNetwork;
use moat_common::*;
use moat_datapath::{
    Datapath, EventReader, Maps, PinDir, attach_endpoint,
    lab::{Lab, LabPod, probe},
};

const FRONTEND: u32 = 1001;
const BACKEND: u32 = 1002;
const INTRUDER: u32 = 1003;

fn register(maps: &mut Maps, pod: &LabPod, identity: u32) -> Result<()> {
    let mut ep = EndpointInfo {
        identity,
        policy_id: identity,
        v4_count: 1,
        v6_count: 1,
        ..Default::default()
    };
    ep.v4[0] = raw_v4(pod.v4);
    ep.v6[0] = raw_v6(pod.v6);
    maps.upsert_endpoint(pod.ifindex, &ep)?;
    for addr in pod.addrs() {
        let value = IpcacheValue {
            identity,
            ifindex: pod.ifindex,
            ..Default::default()
        };
        maps.upsert_ipcache(IpNetwork::from(addr), &value)?;
    }
    Ok(())
}

fn rule(
    maps: &mut Maps,
    local: u32,
    remote: u32,
    port: u16,
    proto: u8,
    dir: u8,
    id: u32,
) -> Result<()> {
    let key = PolicyKey {
        policy_id: local,
        remote_identity: remote,
        dport: port,
        proto,
        direction: dir,
    };
    maps.upsert_policy(
        &key,
        &PolicyValue {
            rule_id: id,
            action: ACTION_ALLOW,
            _pad: [0; 3],
        },
    )?;
    Ok(())
}

fn show(what: &str, ok: bool) {
    println!("  {:<52} {}", what, if ok { "ALLOWED" } else { "DENIED" });
}

fn main() -> Result<()> {
    let root = "/sys/fs/bpf/moat-demo";
    let _ = std::fs::remove_dir_all(root);
    let pins = PinDir::new(root);
    let dp = Datapath::load(&pins)?;
    println!(
        "datapath loaded and pinned under {}",
        dp.pins().base().display()
    );

    let mut lab = Lab::new("demo")?;
    let frontend = lab.add_pod("frontend")?;
    let backend = lab.add_pod("backend")?;
    let intruder = lab.add_pod("intruder")?;
    let mut maps = Maps::open(&pins)?;
    for (pod, id) in [
        (&frontend, FRONTEND),
        (&backend, BACKEND),
        (&intruder, INTRUDER),
    ] {
        register(&mut maps, pod, id)?;
        attach_endpoint(&pins, &pod.host_if)?;
        println!(
            "pod {:<9} {} {} on {} (identity {id})",
            pod.name, pod.v4, pod.v6, pod.host_if
        );
    }
    // Frontend and intruder are not isolated; the backend admits only frontend on TCP/8080.
    rule(
        &mut maps,
        FRONTEND,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_EGRESS,
        rule::NOT_ISOLATED,
    )?;
    rule(
        &mut maps,
        FRONTEND,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_INGRESS,
        rule::NOT_ISOLATED,
    )?;
    rule(
        &mut maps,
        INTRUDER,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_EGRESS,
        rule::NOT_ISOLATED,
    )?;
    rule(
        &mut maps,
        INTRUDER,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_INGRESS,
        rule::NOT_ISOLATED,
    )?;
    rule(
        &mut maps,
        BACKEND,
        IDENTITY_ANY,
        0,
        0,
        DIRECTION_EGRESS,
        rule::NOT_ISOLATED,
    )?;
    rule(
        &mut maps,
        BACKEND,
        FRONTEND,
        8080,
        PROTO_TCP,
        DIRECTION_INGRESS,
        100,
    )?;

    let _web = probe::EchoServer::start(&backend, 8080)?;
    let _admin = probe::EchoServer::start(&backend, 9000)?;
    let mut events = EventReader::open(&pins)?;
    let t = Duration::from_millis(800);
    println!("\nperimeter: backend admits frontend on tcp/8080, nothing else");
    for addr in backend.addrs() {
        let fam = if addr.is_ipv4() { "v4" } else { "v6" };
        show(
            &format!("frontend -> backend tcp/8080 ({fam})"),
            probe::tcp(&frontend, addr, 8080, t),
        );
        show(
            &format!("frontend -> backend tcp/9000 ({fam})"),
            probe::tcp(&frontend, addr, 9000, t),
        );
        show(
            &format!("intruder -> backend tcp/8080 ({fam})"),
            probe::tcp(&intruder, addr, 8080, t),
        );
        show(
            &format!("intruder -> backend ping ({fam})"),
            probe::ping(&intruder, addr),
        );
    }

    println!("\ndrops, explained:");
    for e in events.collect_for(Duration::from_millis(200))? {
        let (src, dst) = if e.family == FAMILY_V4 {
            (
                v4_from_raw(e.saddr[0]).to_string(),
                v4_from_raw(e.daddr[0]).to_string(),
            )
        } else {
            (
                v6_from_raw(e.saddr).to_string(),
                v6_from_raw(e.daddr).to_string(),
            )
        };
        println!(
            "  {:<5} {src} -> {dst}:{} proto {} identity {} -> {} : {} (rule {})",
            if e.verdict == VERDICT_DROP {
                "DROP"
            } else {
                "PASS"
            },
            e.dport,
            e.proto,
            e.remote_identity,
            e.local_identity,
            reason::name(e.reason),
            e.rule_id
        );
    }
    println!("\ncounters:");
    for c in maps.counters()? {
        println!(
            "  {:<6} {:<20} {:<8} {:>6} packets",
            ["allow", "drop", "audit"][c.verdict as usize],
            reason::name(c.reason),
            if c.direction == DIRECTION_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            c.packets
        );
    }
    for pod in [&frontend, &backend, &intruder] {
        moat_datapath::detach_endpoint(&pins, &pod.host_if)?;
    }
    drop(lab);
    drop(dp);
    let _ = std::fs::remove_dir_all(root);
    println!("\ndemo done; pods, links and pins removed");
    Ok(())
}
