//! The CNI error document and its well-known codes.
//!
//! Every failure a plugin reports ends up as `{"cniVersion","code","msg","details"}` on stdout
//! with a non-zero exit (the runtime parses stdout, not stderr), so one type carries all of them.

use serde::Serialize;

/// Well-known CNI error codes (spec §5 error table); `Plugin` carries plugin-defined codes
/// (100 and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    IncompatibleVersion,
    UnsupportedField,
    UnknownContainer,
    InvalidEnvironment,
    IoFailure,
    DecodingFailure,
    InvalidNetworkConfig,
    /// 8: `CNI_NETNS` is the plugin's own network namespace (reference skel's
    /// `ErrInvalidNetNS`; not in the spec table).
    InvalidNetns,
    TryAgainLater,
    PluginNotAvailable,
    LimitedConnectivity,
    Plugin(u32),
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::IoFailure => 5,
            ErrorCode::DecodingFailure => 6,
            ErrorCode::InvalidNetworkConfig => 7,
            ErrorCode::InvalidNetns => 8,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::PluginNotAvailable => 50,
            ErrorCode::LimitedConnectivity => 51,
            ErrorCode::Plugin(code) => code,
        }
    }

    pub fn from_u32(code: u32) -> ErrorCode {
        match code {
            1 => ErrorCode::IncompatibleVersion,
            2 => ErrorCode::UnsupportedField,
            3 => ErrorCode::UnknownContainer,
            4 => ErrorCode::InvalidEnvironment,
            5 => ErrorCode::IoFailure,
            6 => ErrorCode::DecodingFailure,
            7 => ErrorCode::InvalidNetworkConfig,
            8 => ErrorCode::InvalidNetns,
            11 => ErrorCode::TryAgainLater,
            50 => ErrorCode::PluginNotAvailable,
            51 => ErrorCode::LimitedConnectivity,
            other => ErrorCode::Plugin(other),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.as_u32())
    }
}

/// A CNI error as the runtime sees it. `msg` is short; `details` says what went wrong and,
/// where possible, what to do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (code {}){}", code.as_u32(), details.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: Option<String>,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = Some(details.into());
        self
    }

    pub fn invalid_environment(msg: impl Into<String>) -> CniError {
        CniError::new(ErrorCode::InvalidEnvironment, msg)
    }

    pub fn invalid_network_config(msg: impl Into<String>) -> CniError {
        CniError::new(ErrorCode::InvalidNetworkConfig, msg)
    }

    pub fn decoding_failure(msg: impl Into<String>) -> CniError {
        CniError::new(ErrorCode::DecodingFailure, msg)
    }

    /// The spec's error document, stamped with the version the response is written in.
    pub fn to_json(&self, cni_version: &str) -> Vec<u8> {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: ErrorCode,
            msg: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            details: Option<&'a str>,
        }
        let wire = Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: self.details.as_deref(),
        };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(&wire).expect("error document serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_codes_have_spec_numbers() {
        let expected = [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::UnsupportedField, 2),
            (ErrorCode::UnknownContainer, 3),
            (ErrorCode::InvalidEnvironment, 4),
            (ErrorCode::IoFailure, 5),
            (ErrorCode::DecodingFailure, 6),
            (ErrorCode::InvalidNetworkConfig, 7),
            (ErrorCode::InvalidNetns, 8),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::PluginNotAvailable, 50),
            (ErrorCode::LimitedConnectivity, 51),
        ];
        for (code, number) in expected {
            assert_eq!(code.as_u32(), number);
            assert_eq!(ErrorCode::from_u32(number), code);
        }
        assert_eq!(ErrorCode::from_u32(100), ErrorCode::Plugin(100));
    }

    #[test]
    fn error_serialises_to_spec_document() {
        let err =
            CniError::new(ErrorCode::InvalidEnvironment, "bad env").with_details("CNI_IFNAME");
        let json: serde_json::Value = serde_json::from_slice(&err.to_json("1.1.0")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"cniVersion": "1.1.0", "code": 4, "msg": "bad env", "details": "CNI_IFNAME"})
        );
    }

    #[test]
    fn error_without_details_omits_the_field() {
        let err = CniError::new(ErrorCode::TryAgainLater, "busy");
        let json: serde_json::Value = serde_json::from_slice(&err.to_json("0.4.0")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"cniVersion": "0.4.0", "code": 11, "msg": "busy"})
        );
    }

    #[test]
    fn display_includes_code_and_details() {
        let err = CniError::new(ErrorCode::IoFailure, "read failed").with_details("stdin closed");
        assert_eq!(err.to_string(), "read failed (code 5): stdin closed");
    }
}
