//! CNI protocol versions this plugin speaks, and the VERSION command's answer.
//!
//! Versions are an enum rather than strings so that "is CHECK allowed" and "which result layout"
//! are comparisons the compiler checks, not string matching scattered through the code.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::error::{CniError, ErrorCode};

/// A CNI spec version this plugin fully handles (config, results and errors).
///
/// 0.1.0 and 0.2.0 are deliberately absent: their `ip4`/`ip6` result layout cannot carry more
/// than one address per family, and no runtime Moat targets still sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every version listed in VERSION's `supportedVersions`, oldest first.
pub const SUPPORTED_VERSIONS: [CniVersion; 5] = [
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

/// The version assumed when a config carries no `cniVersion` (the reference libcni reads a
/// missing version as 0.1.0, which Moat does not support).
pub const IMPLICIT_VERSION: &str = "0.1.0";

impl CniVersion {
    /// The newest version this plugin speaks.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// 0.3.x and 0.4.0 results carry `ips[].version`; 1.x results dropped it.
    pub fn ips_carry_version_field(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// CHECK, and `prevResult` on DEL, arrived in 0.4.0.
    pub fn supports_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// GC and STATUS arrived in 1.1.0.
    pub fn supports_gc_and_status(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Parses a config's `cniVersion`, answering code 1 with the reference plugins' wording
    /// when the version is not one this plugin lists.
    pub fn parse_supported(version: &str) -> Result<CniVersion, CniError> {
        version
            .parse()
            .map_err(|_| incompatible_version_error(version))
    }
}

fn incompatible_version_error(version: &str) -> CniError {
    CniError::new(ErrorCode::IncompatibleVersion, "incompatible CNI versions").with_details(
        format!(
            "config is \"{version}\", plugin supports [{}]",
            SUPPORTED_VERSIONS
                .iter()
                .map(|v| format!("\"{}\"", v.as_str()))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )
}

/// The error for a version string this plugin does not list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedVersion(pub String);

impl fmt::Display for UnsupportedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unsupported CNI version {:?}", self.0)
    }
}

impl std::error::Error for UnsupportedVersion {}

impl FromStr for CniVersion {
    type Err = UnsupportedVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SUPPORTED_VERSIONS
            .iter()
            .copied()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnsupportedVersion(s.to_string()))
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CniVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The VERSION command's stdout document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<CniVersion>,
}

impl VersionInfo {
    /// Echoes the request's `cniVersion` as the spec asks; falls back to the latest version when
    /// the request gave none (libcni only needs the field to be non-empty).
    pub fn for_request(request_version: Option<&str>) -> VersionInfo {
        let cni_version = match request_version {
            Some(v) if !v.is_empty() => v.to_string(),
            _ => CniVersion::LATEST.as_str().to_string(),
        };
        VersionInfo {
            cni_version,
            supported_versions: SUPPORTED_VERSIONS.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_round_trips_through_its_string() {
        for v in SUPPORTED_VERSIONS {
            assert_eq!(v.as_str().parse::<CniVersion>().unwrap(), v);
        }
    }

    #[test]
    fn versions_order_by_spec_release() {
        assert!(CniVersion::V0_3_0 < CniVersion::V0_3_1);
        assert!(CniVersion::V0_4_0 < CniVersion::V1_0_0);
        assert!(CniVersion::V1_0_0 < CniVersion::V1_1_0);
    }

    #[test]
    fn pre_0_3_and_unknown_versions_are_rejected_with_code_1() {
        for bad in ["0.1.0", "0.2.0", "9.9.9", "", "1.1"] {
            let err = CniVersion::parse_supported(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::IncompatibleVersion);
            assert_eq!(err.msg, "incompatible CNI versions");
            assert!(
                err.details
                    .as_deref()
                    .unwrap()
                    .contains(&format!("\"{bad}\""))
            );
        }
    }

    #[test]
    fn feature_gates_follow_the_spec_history() {
        assert!(!CniVersion::V0_3_1.supports_check());
        assert!(CniVersion::V0_4_0.supports_check());
        assert!(!CniVersion::V1_0_0.supports_gc_and_status());
        assert!(CniVersion::V1_1_0.supports_gc_and_status());
        assert!(CniVersion::V0_4_0.ips_carry_version_field());
        assert!(!CniVersion::V1_0_0.ips_carry_version_field());
    }

    #[test]
    fn version_info_echoes_request_version_and_lists_all_supported() {
        let info = VersionInfo::for_request(Some("0.4.0"));
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "0.4.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
            })
        );
    }

    #[test]
    fn version_info_defaults_to_latest_without_request_version() {
        assert_eq!(VersionInfo::for_request(None).cni_version, "1.1.0");
        assert_eq!(VersionInfo::for_request(Some("")).cni_version, "1.1.0");
    }
}
