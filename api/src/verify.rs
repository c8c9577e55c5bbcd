//! `moatctl verify`: how far the maps moatd owns are from what its datastore asks for, per
//! map, with a bounded sample of the differing entries.

use serde::{Deserialize, Serialize};

/// How one entry differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// Desired, absent from the map.
    Missing,
    /// In the map, not desired.
    Extra,
    /// In the map with another value than the desired one.
    Different,
}

impl DriftKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Extra => "extra",
            Self::Different => "different",
        }
    }
}

/// One differing entry, rendered for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftEntry {
    pub kind: DriftKind,
    pub key: String,
    /// The desired value (absent for `extra`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// What the map holds (absent for `missing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<String>,
}

/// The drift of one map. Every map moatd owns is listed, with zero counts when it holds
/// exactly the desired content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDrift {
    /// The map, as `moat_map_entries` names it (`policy`, `ipcache_v4`, ...).
    pub map: String,
    /// Entries the map holds.
    #[serde(default)]
    pub entries: usize,
    pub missing: usize,
    pub extra: usize,
    pub different: usize,
    /// At most [`DRIFT_SAMPLES`] of the differing entries.
    #[serde(default)]
    pub samples: Vec<DriftEntry>,
}

/// Sample entries listed per map.
pub const DRIFT_SAMPLES: usize = 20;

impl MapDrift {
    /// Differing entries (missing, extra and different).
    pub fn total(&self) -> usize {
        self.missing + self.extra + self.different
    }
}

/// The answer to [`crate::Request::Verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub maps: Vec<MapDrift>,
}

impl VerifyReport {
    /// Differing entries over every map.
    pub fn total(&self) -> usize {
        self.maps.iter().map(MapDrift::total).sum()
    }

    /// The maps with drift.
    pub fn drifted(&self) -> impl Iterator<Item = &MapDrift> {
        self.maps.iter().filter(|m| m.total() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response};

    #[test]
    fn verify_has_a_stable_wire_format() {
        assert_eq!(
            serde_json::to_value(Request::Verify).unwrap(),
            serde_json::json!({"op": "verify"})
        );
        let answer = serde_json::json!({"result": "verify", "report": {"maps": [
            {"map": "endpoints", "entries": 2, "missing": 0, "extra": 0, "different": 0,
             "samples": []},
            {"map": "policy", "entries": 3, "missing": 1, "extra": 0, "different": 0,
             "samples": [{"kind": "missing", "key": "policy 1 ingress remote * proto * port *",
                          "expected": "allow rule 2"}]}
        ]}});
        let Response::Verify { report } = serde_json::from_value(answer.clone()).unwrap() else {
            panic!("a verify answer")
        };
        assert_eq!(report.total(), 1);
        let drifted: Vec<&str> = report.drifted().map(|m| m.map.as_str()).collect();
        assert_eq!(drifted, ["policy"]);
        assert_eq!(report.maps[1].samples[0].kind, DriftKind::Missing);
        assert_eq!(report.maps[1].samples[0].actual, None);
        assert_eq!(
            serde_json::to_value(Response::Verify { report }).unwrap(),
            answer
        );
    }
}
