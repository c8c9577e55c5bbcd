//! Per-packet cost of threat detection (issue 18): the same new flow and the same established
//! packet judged with every detector off and with the shipped defaults on, through
//! BPF_PROG_TEST_RUN on the real verified programs, each configuration in a datapath of its
//! own, batches interleaved so that machine noise hits both alike.
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

/// Loads two datapaths under `pin_root` (detection off, detection on), measures, and returns
/// the JSON section.
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
    let mut subjects = Vec::new();
    for (name, settings) in [
        ("off", ThreatSettings::off()),
        ("on", ThreatSettings::default()),
    ] {
        let pins = PinDir::new(format!("{pin_root}/detection-{name}"));
        let dp = Datapath::load(&pins).with_context(|| format!("loading the datapath ({name})"))?;
        let mut maps = Maps::open(&pins)?;
        tiers::install(&mut maps, &tiers::compiled(0)?, ifindex)?;
        ThreatConfigMap::open(&pins)?.write(&settings.to_config())?;
        let runner = TestRunner::open(&pins)?;
        if runner
            .run(Hook::ToContainer, ifindex, &established, 1)?
            .verdict
            != TC_ACT_OK
        {
            bail!("detection {name}: the SYN to the open port was not admitted");
        }
        subjects.push((name, dp, runner));
    }
    let mut fresh: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut tracked: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for _ in 0..batches {
        check_interrupted()?;
        for (s, (name, _, runner)) in subjects.iter().enumerate() {
            let r = runner.run(Hook::ToContainer, ifindex, &new_flow, repeat)?;
            if r.verdict != TC_ACT_SHOT {
                bail!(
                    "detection {name}: the SYN to 9999 returned {} (expected a drop)",
                    r.verdict
                );
            }
            fresh[s].push(r.per_run.as_nanos() as f64);
            let r = runner.run(Hook::ToContainer, ifindex, &established, repeat)?;
            tracked[s].push(r.per_run.as_nanos() as f64);
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
        "method": "BPF_PROG_TEST_RUN of moat_to_container with every detector off and with the \
                   shipped defaults on; value = median over batches, configurations interleaved",
        "repeat": repeat,
        "batches": batches,
        "goal": "new-flow ratio_on_vs_off <= 1.02 (issue 18)",
        "new_flow": row(&fresh),
        "established": row(&tracked),
    }))
}
