//! Threat detections and quarantine as the local API carries them (`moatctl threats`,
//! `moatctl quarantine` / `release`).

use serde::{Deserialize, Serialize};

/// One detection from the datapath, explained: who, what evidence, and what moatd did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreatRecord {
    /// Unix time in milliseconds of the detection.
    pub time_ms: u64,
    /// `port-scan`, `host-sweep`, `syn-flood`, `policy-probing`, `dns-tunnel`, `spoofing`.
    pub kind: String,
    /// The source address (for `spoofing`, the address the pod forged).
    pub source: String,
    /// The source's pod (namespace/name) when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod: Option<String>,
    pub source_identity: u32,
    /// The subject's address, when the detector keys by one (empty otherwise).
    #[serde(default)]
    pub destination: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_pod: Option<String>,
    /// The local endpoint whose hook saw it (namespace/name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Protocol and port of the subject (host-sweep, syn-flood); empty / 0 otherwise.
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub port: u16,
    /// Events counted in the window (new flows, drops, queries, SYNs, spoofed packets).
    pub count: u32,
    /// Distinct ports, addresses or names, estimated from the datapath's sketch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distinct: Option<u32>,
    /// Port scan: probes refused or dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<u32>,
    /// SYN flood: handshakes not completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open: Option<u32>,
    /// DNS tunnel: names that looked encoded (long labels or names, many distinct characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspicious: Option<u32>,
    /// Sampled ports (port-scan) or addresses (host-sweep).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<String>,
    /// How long the window had run when it fired.
    pub window_ms: u64,
    /// The configured response: `log` or `quarantine`.
    pub response: String,
    /// What the response did (`quarantined prod/web`, or why it could not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

impl ThreatRecord {
    /// The evidence in one line: `count 40, ~31 distinct, 28 refused, ports 22,23,80`.
    pub fn evidence(&self) -> String {
        let mut parts = vec![format!("count {}", self.count)];
        if let Some(n) = self.distinct {
            parts.push(format!("~{n} distinct"));
        }
        if let Some(n) = self.refused {
            parts.push(format!("{n} refused"));
        }
        if let Some(n) = self.half_open {
            parts.push(format!("{n} half-open"));
        }
        if let Some(n) = self.suspicious {
            parts.push(format!("{n} suspicious"));
        }
        if !self.samples.is_empty() {
            let what = if self.kind == "port-scan" {
                "ports"
            } else {
                "addresses"
            };
            parts.push(format!("{what} {}", self.samples.join(",")));
        }
        if self.port != 0 {
            parts.push(format!("{}/{}", self.protocol, self.port));
        }
        parts.push(format!("in {:.1}s", self.window_ms as f64 / 1000.0));
        parts.join(", ")
    }
}

/// Why an endpoint is quarantined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineInfo {
    /// `manual`, `annotation`, or the detector kind that fired (`port-scan`, ...).
    pub reason: String,
    /// Unix time in milliseconds it began.
    pub since_ms: u64,
    /// Detector quarantines: the evidence line of the detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The answer to `Quarantine` and `Release`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineResult {
    pub pod: String,
    /// Quarantined after the request (a release leaves an annotated pod quarantined).
    pub quarantined: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<QuarantineInfo>,
    /// Local endpoints of the pod whose map entry changed.
    pub endpoints: usize,
    /// Connection tracking entries deleted.
    pub connections_cut: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_names_what_each_detector_counted() {
        let r = ThreatRecord {
            kind: "port-scan".into(),
            count: 40,
            distinct: Some(31),
            refused: Some(28),
            samples: vec!["22".into(), "80".into()],
            window_ms: 2_500,
            ..Default::default()
        };
        assert_eq!(
            r.evidence(),
            "count 40, ~31 distinct, 28 refused, ports 22,80, in 2.5s"
        );
        let r = ThreatRecord {
            kind: "syn-flood".into(),
            count: 900,
            half_open: Some(880),
            protocol: "TCP".into(),
            port: 443,
            window_ms: 1_000,
            ..Default::default()
        };
        assert_eq!(r.evidence(), "count 900, 880 half-open, TCP/443, in 1.0s");
    }
}
