//! Warns before a map fills up. Every `interval` the fill of each map is read (the same
//! cheap count `moatctl status` and the metrics use); a map that reaches 80% of its capacity
//! is logged as a warning once, and exported as `moat_map_fill_warning{map} 1`, until it
//! drops under 75% (the gap keeps a map hovering at the line from warning on every check).
//! What happens when a map does fill is in capacity.rs (maps moatd writes) and docs/maps.md
//! (the LRU maps the datapath writes).

use std::{collections::BTreeSet, time::Duration};

use moat_datapath::{PinDir, fill::MapFill};
use tracing::{info, warn};

/// Fill ratio at which a map is warned about.
pub const WARN_AT: f64 = 0.80;
/// Fill ratio under which the warning clears.
pub const CLEAR_UNDER: f64 = 0.75;
/// How often the maps are counted.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);

/// A map crossing one of the thresholds.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    Warn(MapFill),
    Clear(MapFill),
}

/// Which maps are past the warning, from one observation to the next.
#[derive(Debug, Default)]
pub struct FillAlarm {
    on: BTreeSet<&'static str>,
}

fn ratio(fill: &MapFill) -> f64 {
    if fill.capacity == 0 {
        0.0
    } else {
        fill.entries as f64 / fill.capacity as f64
    }
}

impl FillAlarm {
    /// The maps that crossed a threshold since the last observation.
    pub fn observe(&mut self, fills: &[MapFill]) -> Vec<Transition> {
        let mut changes = Vec::new();
        for fill in fills {
            let r = ratio(fill);
            if !self.on.contains(fill.name) && r >= WARN_AT {
                self.on.insert(fill.name);
                changes.push(Transition::Warn(fill.clone()));
            } else if self.on.contains(fill.name) && r < CLEAR_UNDER {
                self.on.remove(fill.name);
                changes.push(Transition::Clear(fill.clone()));
            }
        }
        changes
    }

    pub fn is_on(&self, map: &str) -> bool {
        self.on.contains(map)
    }
}

/// Logs and exports one observation's transitions.
fn report(changes: &[Transition]) {
    for change in changes {
        match change {
            Transition::Warn(f) => {
                warn!(
                    map = f.name,
                    entries = f.entries,
                    capacity = f.capacity,
                    "map is {:.0}% full (warning at {:.0}%); raise it with `moatd --map-size` \
                     before it fills (docs/maps.md)",
                    ratio(f) * 100.0,
                    WARN_AT * 100.0
                );
                crate::metrics::global().fill_alarm(f.name, true);
            }
            Transition::Clear(f) => {
                info!(
                    map = f.name,
                    entries = f.entries,
                    capacity = f.capacity,
                    "map fill back under {:.0}%",
                    CLEAR_UNDER * 100.0
                );
                crate::metrics::global().fill_alarm(f.name, false);
            }
        }
    }
}

/// Counts the maps every `interval`, forever (moatd's thread).
pub fn run(pins: PinDir, interval: Duration) {
    let mut alarm = FillAlarm::default();
    for fill in moat_datapath::fill::map_fill(&pins) {
        crate::metrics::global().fill_alarm(fill.name, false);
    }
    loop {
        let fills = moat_datapath::fill::map_fill(&pins);
        report(&alarm.observe(&fills));
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(entries: u64) -> MapFill {
        MapFill {
            name: "conntrack",
            map: "MOAT_CT",
            entries,
            capacity: 1000,
        }
    }

    #[test]
    fn a_map_is_warned_about_once_at_80_percent_and_cleared_under_75() {
        let mut alarm = FillAlarm::default();
        assert!(alarm.observe(&[fill(799)]).is_empty());
        assert_eq!(
            alarm.observe(&[fill(800)]),
            vec![Transition::Warn(fill(800))]
        );
        assert!(alarm.is_on("conntrack"));
        // Still high, or back between the thresholds: no new warning, not cleared.
        assert!(alarm.observe(&[fill(950)]).is_empty());
        assert!(alarm.observe(&[fill(760)]).is_empty());
        assert!(alarm.is_on("conntrack"));
        assert_eq!(
            alarm.observe(&[fill(749)]),
            vec![Transition::Clear(fill(749))]
        );
        assert!(!alarm.is_on("conntrack"));
        assert_eq!(
            alarm.observe(&[fill(1000)]),
            vec![Transition::Warn(fill(1000))]
        );
    }

    #[test]
    fn a_map_of_unknown_capacity_never_warns() {
        let mut alarm = FillAlarm::default();
        let unknown = MapFill {
            capacity: 0,
            ..fill(5)
        };
        assert!(alarm.observe(&[unknown]).is_empty());
    }
}
