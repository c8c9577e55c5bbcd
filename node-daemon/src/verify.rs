//! The periodic self-audit (`moatd --verify-interval`): the maps moatd owns are compared
//! entry by entry with the content its datastore asks for ([`Daemon::verify_maps`]), the
//! drift per map is exported as `moat_map_drift_entries`, and drift is repaired by the
//! reconcile that heals the maps at start ([`Daemon::repair_maps`]). Check and repair run
//! under the daemon's lock, so they never interleave with an event's write.
//!
//! The gauge holds what the last check found, the drift it then repaired included: it falls
//! back to 0 at the next check, so a scrape within one interval sees the alarm.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{info, warn};

use crate::{api::VerifyReport, daemon::Daemon};

pub const DEFAULT_INTERVAL: &str = "30s";

/// `--verify-interval`: a duration (`30s`, `500ms`, `2m`), or 0 to turn the check off.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    if !digits.is_empty()
        && digits.bytes().all(|b| b == b'0')
        && ["", "ms", "s", "m", "h"].contains(&unit)
    {
        return Ok(Duration::ZERO);
    }
    crate::threats::parse_duration(text)
}

/// Checks every `interval` for as long as moatd runs.
pub fn run(daemon: Arc<Mutex<Daemon>>, interval: Duration) {
    loop {
        std::thread::sleep(interval);
        let mut d = daemon.lock().unwrap_or_else(|e| e.into_inner());
        check_and_repair(&mut d);
    }
}

/// One check: the gauge set from what it found, a warning naming the maps that drifted, and
/// the repair. None when moatd cannot check yet (start-up not finished).
pub fn check_and_repair(daemon: &mut Daemon) -> Option<VerifyReport> {
    let report = match daemon.verify_maps() {
        Ok(report) => report,
        Err(e) => {
            info!(error = %format!("{e:#}"), "map verification skipped");
            return None;
        }
    };
    crate::metrics::global().map_drift(&report);
    if report.total() == 0 {
        return Some(report);
    }
    let maps: Vec<String> = report
        .drifted()
        .map(|m| {
            format!(
                "{} ({} missing, {} extra, {} different)",
                m.map, m.missing, m.extra, m.different
            )
        })
        .collect();
    let first = report
        .drifted()
        .flat_map(|m| m.samples.first().map(|s| (m.map.as_str(), s)))
        .next()
        .map(|(map, s)| format!("{map}: {} {}", s.kind.name(), s.key))
        .unwrap_or_default();
    warn!(
        maps = %maps.join(", "),
        entries = report.total(),
        example = %first,
        "the maps drifted from the datastore's state; repairing"
    );
    match daemon.repair_maps() {
        Ok(stats) => info!(?stats, "map drift repaired"),
        Err(e) => warn!(error = %format!("{e:#}"), "repairing map drift failed"),
    }
    Some(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_turns_the_check_off_and_other_values_are_durations() {
        for off in ["0", "0s", "00", "0ms"] {
            assert_eq!(parse_interval(off), Ok(Duration::ZERO), "{off}");
        }
        assert_eq!(parse_interval("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_interval("soon").is_err());
        assert!(parse_interval("").is_err());
        assert!(parse_interval("0d").is_err());
    }
}
