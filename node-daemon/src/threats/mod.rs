//! Threat detection in moatd: the detectors run in the datapath (MOAT_THREATCFG holds their
//! settings); moatd configures them, explains each detection (report.rs), keeps the recent
//! ones (journal.rs) and applies the configured response: log only, or quarantine the source
//! when it is a pod of this node (quarantine.rs at the crate root).

pub mod journal;
pub mod report;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::warn;

use crate::daemon::Daemon;

use moat_common::threat;
pub use moat_datapath::threats::{Detector, ThreatSettings};

/// What moatd does when a detector fires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Response {
    /// Record and count it.
    #[default]
    Log,
    /// Also quarantine the source if it is a local endpoint.
    Quarantine,
}

impl Response {
    pub fn name(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Quarantine => "quarantine",
        }
    }
}

/// Detector settings (written to the datapath) and per-kind responses (moatd's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreatPolicy {
    /// False: every detector is off in the datapath (`--threat-detection off`).
    pub enabled: bool,
    pub settings: ThreatSettings,
    /// Indexed by kind.
    pub responses: [Response; threat::SLOTS],
}

impl Default for ThreatPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            settings: ThreatSettings::default(),
            responses: [Response::Log; threat::SLOTS],
        }
    }
}

impl ThreatPolicy {
    pub fn response(&self, kind: u8) -> Response {
        self.responses
            .get(kind as usize)
            .copied()
            .unwrap_or_default()
    }

    /// The value for MOAT_THREATCFG: all zero (detection off) when disabled.
    pub fn datapath_config(&self) -> moat_common::ThreatConfig {
        if self.enabled {
            self.settings.to_config()
        } else {
            ThreatSettings::off().to_config()
        }
    }
}

/// Reads detections from the datapath's ring for as long as moatd runs, each reported by the
/// daemon (explained, answered, recorded) and handed to `publish` with the uid of the pod it
/// is about, when known (the Kubernetes Event).
pub fn follow(
    daemon: Arc<Mutex<Daemon>>,
    publish: impl Fn(&crate::api::ThreatRecord, Option<&str>),
) {
    let pins = daemon
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pins()
        .clone();
    let mut reader = match moat_datapath::ThreatEventReader::open(&pins) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "threat detections unavailable");
            return;
        }
    };
    loop {
        let events = match reader.wait(Duration::from_millis(500)) {
            Ok(events) => events,
            Err(e) => {
                warn!(error = %e, "reading threat detections");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        if events.is_empty() {
            continue;
        }
        let (mono, wall) = (crate::server::monotonic_ns(), crate::flows::now_ms());
        let records: Vec<_> = {
            let mut d = daemon.lock().unwrap_or_else(|e| e.into_inner());
            events
                .iter()
                .map(|e| {
                    let record = d.report_threat(e, mono, wall);
                    let uid = crate::kube::events::subject(&record)
                        .and_then(|(ns, name)| d.pod_uid(&format!("{ns}/{name}")));
                    (record, uid)
                })
                .collect()
        };
        for (record, uid) in &records {
            publish(record, uid.as_deref());
        }
    }
}

/// `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 10s, 500ms or 2m"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if d.is_zero() || d.as_millis() > u32::MAX as u128 {
        return Err(format!("{text:?}: must be between 1ms and 49 days"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_or_mean_seconds() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn detection_off_writes_a_zero_enable_mask_and_responses_default_to_log() {
        let mut policy = ThreatPolicy::default();
        assert_ne!(policy.datapath_config().enabled, 0);
        assert_eq!(policy.response(threat::PORT_SCAN), Response::Log);
        policy.enabled = false;
        assert_eq!(policy.datapath_config().enabled, 0);
    }
}
