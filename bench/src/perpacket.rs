//! Per-packet cost through BPF_PROG_TEST_RUN: the real verified programs, run by the kernel
//! on a crafted frame `repeat` times, timed by the kernel (integer ns per run).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};
use ipnetwork::IpNetwork;
use moat_common::*;
use moat_datapath::{Maps, PinDir};
use moat_testkit::{
    packet::{Packet, TCP_ACK, TCP_SYN},
    testrun::{Hook, TC_ACT_OK, TC_ACT_SHOT, TestRunner},
};
use serde_json::{Value, json};

use crate::util::{check_interrupted, median, round};

/// The benchmarked endpoint and its peer (identities below fill::FILLER_IDENTITY_MIN).
pub const POD: u32 = 1000;
pub const PEER: u32 = 2000;
pub const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const ALLOWED_PORT: u16 = 8080;
pub const DENIED_PORT: u16 = 9999;

pub fn allowed_key() -> PolicyKey {
    PolicyKey {
        policy_id: POD,
        remote_identity: PEER,
        dport: ALLOWED_PORT,
        proto: PROTO_TCP,
        direction: DIRECTION_INGRESS,
    }
}

fn endpoint() -> EndpointInfo {
    let mut ep = EndpointInfo {
        identity: POD,
        policy_id: POD,
        mode: MODE_ENFORCE,
        v4_count: 1,
        ..Default::default()
    };
    ep.v4[0] = raw_v4(POD_V4);
    ep
}

fn peer_net() -> IpNetwork {
    IpNetwork::new(IpAddr::V4(PEER_V4), 32).expect("valid /32")
}

/// Exactly one policy entry (the allow) and one ipcache entry (the peer), plus the endpoint.
pub fn install(maps: &mut Maps, ifindex: u32) -> Result<()> {
    maps.upsert_endpoint(ifindex, &endpoint())?;
    maps.upsert_ipcache(
        peer_net(),
        &IpcacheValue {
            identity: PEER,
            ..Default::default()
        },
    )?;
    maps.upsert_policy(
        &allowed_key(),
        &PolicyValue {
            rule_id: 100,
            action: ACTION_ALLOW,
            ..PolicyValue::default()
        },
    )?;
    Ok(())
}

/// Removes the per-packet fixture (`entries` too, or only the endpoint).
pub fn uninstall(maps: &mut Maps, ifindex: u32, entries: bool) -> Result<()> {
    maps.remove_endpoint(ifindex)?;
    if entries {
        maps.remove_ipcache(peer_net())?;
        maps.remove_policy(&allowed_key())?;
    }
    Ok(())
}

/// One datapath under test (its pins, maps and runner).
pub struct Subject {
    pub label: &'static str,
    pub maps: Maps,
    pub runner: TestRunner,
    pub policy_entries: usize,
    pub ipcache_entries: usize,
}

impl Subject {
    pub fn open(label: &'static str, pins: &PinDir) -> Result<Self> {
        let maps = Maps::open(pins)?;
        let (policy_entries, ipcache_entries) = crate::fill::counts(&maps)?;
        Ok(Self {
            label,
            maps,
            runner: TestRunner::open(pins)?,
            policy_entries,
            ipcache_entries,
        })
    }
}

pub struct Params {
    pub repeat: u32,
    pub batches: usize,
}

fn established_packets() -> (Vec<u8>, Vec<u8>) {
    let syn = Packet::tcp(
        IpAddr::V4(PEER_V4),
        IpAddr::V4(POD_V4),
        40000,
        ALLOWED_PORT,
        TCP_SYN,
    );
    let ack = Packet::tcp(
        IpAddr::V4(PEER_V4),
        IpAddr::V4(POD_V4),
        40000,
        ALLOWED_PORT,
        TCP_ACK,
    );
    (syn.bytes(), ack.bytes())
}

fn new_flow_packet() -> Vec<u8> {
    Packet::tcp(
        IpAddr::V4(PEER_V4),
        IpAddr::V4(POD_V4),
        40001,
        DENIED_PORT,
        TCP_SYN,
    )
    .bytes()
}

/// Runs both cases on both subjects, batches interleaved (small, large, small, ...) so that
/// machine noise hits both alike. Returns the JSON section.
pub fn measure(subjects: &[Subject; 2], ifindex: u32, p: &Params) -> Result<Value> {
    let (syn, ack) = established_packets();
    let deny = new_flow_packet();
    let mut samples: [[Vec<f64>; 2]; 2] = Default::default(); // [case][subject]
    let mut checks = Vec::new();

    for subject in subjects {
        // Prime the flow: the SYN is judged by policy and creates the conntrack entry.
        let r = subject.runner.run(Hook::ToContainer, ifindex, &syn, 1)?;
        if r.verdict != TC_ACT_OK {
            bail!(
                "{}: priming SYN to the allowed port returned {} (expected TC_ACT_OK)",
                subject.label,
                r.verdict
            );
        }
    }

    let before: Vec<[u64; 3]> = subjects
        .iter()
        .map(|s| counters(&s.maps))
        .collect::<Result<_>>()?;
    for _ in 0..p.batches {
        check_interrupted()?;
        for (case, frame, expect) in [(0usize, &ack, TC_ACT_OK), (1, &deny, TC_ACT_SHOT)] {
            for (s, subject) in subjects.iter().enumerate() {
                let r = subject
                    .runner
                    .run(Hook::ToContainer, ifindex, frame, p.repeat)?;
                if r.verdict != expect {
                    bail!(
                        "{}: case {case} returned verdict {} (expected {expect})",
                        subject.label,
                        r.verdict
                    );
                }
                samples[case][s].push(r.per_run.as_nanos() as f64);
            }
        }
    }
    for (s, subject) in subjects.iter().enumerate() {
        let after = counters(&subject.maps)?;
        let runs = p.repeat as u64 * p.batches as u64;
        let established = after[0] - before[s][0];
        let denied = after[1] - before[s][1];
        let rate_limited = after[2] - before[s][2];
        if established < runs || denied < runs {
            bail!(
                "{}: counters do not show the expected paths: {established} established, \
                 {denied} default-deny for {runs} runs each",
                subject.label
            );
        }
        checks.push(json!({
            "subject": subject.label,
            "runs_per_case": runs,
            "counted_established": established,
            "counted_default_deny": denied,
            "drop_events_rate_limited": rate_limited,
            "drop_events_not_rate_limited": denied.saturating_sub(rate_limited),
        }));
    }

    let case_json = |case: usize| {
        let m1 = median(&samples[case][0]).unwrap_or(f64::NAN);
        let m2 = median(&samples[case][1]).unwrap_or(f64::NAN);
        json!({
            "ns_per_packet_1": m1,
            "ns_per_packet_100k": m2,
            "ratio_100k_vs_1": round(m2 / m1, 3),
            "samples_ns_1": samples[case][0],
            "samples_ns_100k": samples[case][1],
        })
    };
    Ok(json!({
        "method": "BPF_PROG_TEST_RUN of moat_to_container (packets delivered to the pod, \
                   ingress policy) on a veth's ifindex; the kernel reports the mean time per \
                   run in whole ns; value = median over batches",
        "repeat": p.repeat,
        "batches": p.batches,
        "entries": {
            "1": {"policy": subjects[0].policy_entries, "ipcache_v4": subjects[0].ipcache_entries},
            "100k": {"policy": subjects[1].policy_entries, "ipcache_v4": subjects[1].ipcache_entries},
        },
        "established": case_json(0),
        "new_flow": case_json(1),
        "checks": checks,
        "notes": [
            "established: TCP ACK from the peer to the allowed port 8080, after one SYN run \
             created the conntrack entry; every measured run is a conntrack hit (counted as \
             allow/established).",
            "new_flow: TCP SYN from the peer to port 9999, which no entry allows; nothing is \
             recorded, so every run parses, misses conntrack, looks up the ipcache (host mirror, a hash) and \
             walks the full policy lookup (6 hash probes, port ranges, CIDR LPM) to a default \
             deny. Drop events are rate limited (5000/s per CPU, burst 1000), so most runs \
             only bump the rate-limit counter instead of writing a ring-buffer event; see \
             checks.drop_events_rate_limited.",
            "1 = exactly one policy entry and one ipcache entry; 100k = 100,000 distinct \
             policy keys (varied policy ids, remote identities, protocols, ports, directions) \
             and 100,000 IPv4 /32 ipcache entries, the measured packet's entries among them.",
        ],
    }))
}

/// [allow/established ingress, drop/default-deny ingress, events rate limited].
fn counters(maps: &Maps) -> Result<[u64; 3]> {
    Ok([
        maps.count(VERDICT_ALLOW, reason::ESTABLISHED, DIRECTION_INGRESS)?,
        maps.count(VERDICT_DROP, reason::DEFAULT_DENY, DIRECTION_INGRESS)?,
        maps.special_counter(METRIC_EVENTS_RATE_LIMITED)?,
    ])
}
