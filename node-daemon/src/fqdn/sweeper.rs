//! The periodic pass that deletes what `sweep::plan` decides, on its own handle of the maps:
//! the daemon's lock is taken only to read which identities are live, never while the maps
//! are walked.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use moat_common::METRIC_FQDN_CAPPED;
use moat_datapath::{FqdnMaps, Maps, PinDir};
use tracing::{info, warn};

use super::{
    FqdnSettings,
    sweep::{self, Cause, Limits, SweepStats},
};
use crate::daemon::Daemon;

/// Time between passes: an expired address lingers at most this long (the datapath ignores
/// it for new flows meanwhile), an identity stays above its cap at most this long.
pub const PERIOD: Duration = Duration::from_secs(5);
/// Deletions per pass (about 2 syscalls each): a pass costs milliseconds, and the whole of
/// both learned maps (2 x 65,536) is cleared in a few passes.
pub const BUDGET: usize = 16_384;

pub struct Sweeper {
    fqdn: FqdnMaps,
    maps: Maps,
    max_per_identity: usize,
}

impl Sweeper {
    pub fn open(pins: &PinDir, settings: &FqdnSettings) -> moat_datapath::Result<Self> {
        Ok(Self {
            fqdn: FqdnMaps::open(pins)?,
            maps: Maps::open(pins)?,
            max_per_identity: settings.max_per_identity,
        })
    }

    /// One pass over a snapshot of the learned maps. An entry the kernel rewrote since the
    /// snapshot (a fresh answer for it) is not deleted for being expired or the oldest: its
    /// value is read again just before the delete.
    pub fn pass(
        &mut self,
        live: Option<&BTreeSet<u32>>,
        now_ns: u64,
    ) -> moat_datapath::Result<SweepStats> {
        let entries = self.fqdn.learned();
        let deletions = sweep::plan(
            &entries,
            Limits {
                now_ns,
                max_per_identity: self.max_per_identity,
                live,
                budget: BUDGET,
            },
        );
        let mut done = Vec::with_capacity(deletions.len());
        for d in deletions {
            if d.cause != Cause::Gone && self.fqdn.get_learned(d.identity, d.addr) != Some(d.seen) {
                continue;
            }
            self.fqdn.remove_learned(d.identity, d.addr)?;
            done.push(d);
        }
        let stats = SweepStats::of(&done);
        if stats.capped > 0 {
            self.maps
                .add_special_counter(METRIC_FQDN_CAPPED, stats.capped as u64)?;
        }
        Ok(stats)
    }
}

/// Runs a pass every `PERIOD`, forever (moatd's sweeper thread).
pub fn run(daemon: Arc<Mutex<Daemon>>, settings: FqdnSettings) {
    let pins = daemon
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pins()
        .clone();
    let mut sweeper = match Sweeper::open(&pins, &settings) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "FQDN sweeper not running: learned addresses are not pruned");
            return;
        }
    };
    loop {
        std::thread::sleep(PERIOD);
        let live = daemon
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fqdn_live_identities();
        match sweeper.pass(live.as_ref(), crate::server::monotonic_ns()) {
            Ok(s) if s.total() > 0 => info!(
                expired = s.expired,
                capped = s.capped,
                gone = s.gone,
                "FQDN learned addresses pruned"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "FQDN sweep"),
        }
    }
}
