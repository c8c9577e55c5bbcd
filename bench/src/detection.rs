//! Per-packet cost of threat detection (issue 18): the same new flow and the same established
//! packet judged with every detector off and with the shipped defaults on, through
//! BPF_PROG_TEST_RUN on the real verified programs.
//!
//! One datapath, with the detector settings rewritten between runs: two datapaths side by side
//! differ by more than detection does (an A/A run of two loaded datapaths, both with detection
//! off, measured 441 vs 528 ns for the same packet), so only the settings may change. The
//! order alternates from batch to batch so that drift hits both alike.
//!
//! The new flow is a SYN from a peer to a port the endpoint's policy does not open: every
//! run is judged afresh (a drop leaves no conntrack entry) and passes every detector that a
//! new flow feeds (port scan, host sweep, policy probing). The established packet is a SYN to
//! the open port, admitted once and then matched by its conntrack entry on every run.

use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use moat_common::threat;
use moat_datapath::{
    Datapath, Maps, PinDir,
    threats::{ThreatConfigMap, ThreatSettings},
};
use moat_testkit::{
    packet::{Packet, TCP_SYN},
    testrun::{Hook, TC_ACT_OK, TC_ACT_SHOT, TestRunner},
};
use serde_json::{Value, json};

use crate::{
    tiers,
    util::{check_interrupted, median, round},
};

/// Loads a datapath under `pin_root`, measures with detection off and on, and returns the
/// JSON section.
pub fn measure(pin_root: &str, ifindex: u32, repeat: u32, batches: usize) -> Result<Value> {
    let new_flow = Packet::tcp(
        IpAddr::V4(tiers::PEER_V4),
        IpAddr::V4(tiers::POD_V4),
        40001,
        9999,
        TCP_SYN,
    )
    .bytes();
    let established = Packet::tcp(
        IpAddr::V4(tiers::PEER_V4),
        IpAddr::V4(tiers::POD_V4),
        40002,
        8080,
        TCP_SYN,
    )
    .bytes();
    let pins = PinDir::new(format!("{pin_root}/detection"));
    let _dp = Datapath::load(&pins).context("loading the datapath")?;
    let mut maps = Maps::open(&pins)?;
    tiers::install(&mut maps, &tiers::compiled(0)?, ifindex)?;
    let mut settings = ThreatConfigMap::open(&pins)?;
    // Off, the shipped defaults, then each new-flow detector alone: where the cost goes.
    let alone = |kind: u8| {
        let mut only = ThreatSettings::off();
        *only.detector_mut(kind) = *ThreatSettings::default().detector(kind);
        only.to_config()
    };
    let configs = [
        ("off", ThreatSettings::off().to_config()),
        ("on", ThreatSettings::default().to_config()),
        ("port_scan_only", alone(threat::PORT_SCAN)),
        ("host_sweep_only", alone(threat::HOST_SWEEP)),
        ("policy_probing_only", alone(threat::POLICY_PROBING)),
    ];
    let runner = TestRunner::open(&pins)?;
    if runner
        .run(Hook::ToContainer, ifindex, &established, 1)?
        .verdict
        != TC_ACT_OK
    {
        bail!("the SYN to the open port was not admitted");
    }
    let n = configs.len();
    let mut fresh: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut tracked: Vec<Vec<f64>> = vec![Vec::new(); n];
    for batch in 0..batches {
        check_interrupted()?;
        for step in 0..n {
            let c = (batch + step) % n;
            settings.write(&configs[c].1)?;
            let r = runner.run(Hook::ToContainer, ifindex, &new_flow, repeat)?;
            if r.verdict != TC_ACT_SHOT {
                bail!("the SYN to 9999 returned {} (expected a drop)", r.verdict);
            }
            fresh[c].push(r.per_run.as_nanos() as f64);
            let r = runner.run(Hook::ToContainer, ifindex, &established, repeat)?;
            tracked[c].push(r.per_run.as_nanos() as f64);
        }
    }
    let row = |samples: &[Vec<f64>]| {
        let off = median(&samples[0]).unwrap_or(f64::NAN);
        let on = median(&samples[1]).unwrap_or(f64::NAN);
        json!({
            "ns_per_packet_off": off,
            "ns_per_packet_on": on,
            "ratio_on_vs_off": round(on / off, 3),
            "samples_off_ns": samples[0],
            "samples_on_ns": samples[1],
        })
    };
    let off = median(&fresh[0]).unwrap_or(f64::NAN);
    let by_detector: serde_json::Map<String, Value> = configs[2..]
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let ns = median(&fresh[i + 2]).unwrap_or(f64::NAN);
            (
                (*name).to_string(),
                json!({"ns_per_packet": ns, "ratio_vs_off": round(ns / off, 3)}),
            )
        })
        .collect();
    Ok(json!({
        "method": "BPF_PROG_TEST_RUN of moat_to_container on one datapath, its detector settings \
                   rewritten between runs (every detector off / the shipped defaults / each \
                   new-flow detector alone), order rotating by batch; value = median over \
                   batches",
        "repeat": repeat,
        "batches": batches,
        "goal": "new-flow ratio_on_vs_off <= 1.02 (issue 18)",
        "new_flow": row(&fresh),
        "new_flow_by_detector": by_detector,
        "established": row(&tracked),
    }))
}
