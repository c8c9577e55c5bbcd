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
    let configs = [
        ThreatSettings::off().to_config(),
        ThreatSettings::default().to_config(),
    ];
    let runner = TestRunner::open(&pins)?;
    if runner
        .run(Hook::ToContainer, ifindex, &established, 1)?
        .verdict
        != TC_ACT_OK
    {
        bail!("the SYN to the open port was not admitted");
    }
    let mut fresh: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut tracked: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for batch in 0..batches {
        check_interrupted()?;
        for step in 0..2 {
            let c = (batch + step) % 2;
            settings.write(&configs[c])?;
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
    Ok(json!({
        "method": "BPF_PROG_TEST_RUN of moat_to_container on one datapath, its detector settings \
                   rewritten between runs (every detector off / the shipped defaults), order \
                   alternating by batch; value = median over batches",
        "repeat": repeat,
        "batches": batches,
        "goal": "new-flow ratio_on_vs_off <= 1.02 (issue 18)",
        "new_flow": row(&fresh),
        "established": row(&tracked),
    }))
}
