//! `CNI_ARGS` (`K=V;K2=V2`) and the Kubernetes pod identity runtimes pass in it.
//!
//! Moat's policy needs to know which pod an attachment belongs to, so the four `K8S_*` keys
//! are typed; other keys are refused unless `IgnoreUnknown` is set, like the reference plugins.

use std::collections::BTreeMap;

use serde_json::Value;

use super::error::CniError;

pub const IGNORE_UNKNOWN: &str = "IgnoreUnknown";
pub const K8S_POD_NAMESPACE: &str = "K8S_POD_NAMESPACE";
pub const K8S_POD_NAME: &str = "K8S_POD_NAME";
pub const K8S_POD_UID: &str = "K8S_POD_UID";
pub const K8S_POD_INFRA_CONTAINER_ID: &str = "K8S_POD_INFRA_CONTAINER_ID";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ignore_unknown: bool,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub pod_infra_container_id: Option<String>,
    /// Keys Moat does not understand, kept only when `IgnoreUnknown` allowed them.
    pub unknown: BTreeMap<String, String>,
}

impl CniArgs {
    /// Parses `CNI_ARGS`. A segment that is not exactly `K=V` is an error, as is an unknown key
    /// unless `IgnoreUnknown=1|true` appears anywhere in the string. Empty segments (a trailing
    /// `;`) are skipped. Errors are code 4: the variable is malformed.
    pub fn parse(raw: &str) -> Result<CniArgs, CniError> {
        let mut pairs = Vec::new();
        for segment in raw.split(';').filter(|s| !s.is_empty()) {
            let mut parts = segment.split('=');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(key), Some(value), None) if !key.is_empty() => pairs.push((key, value)),
                _ => {
                    return Err(CniError::invalid_environment(format!(
                        "CNI_ARGS: invalid pair {segment:?}, expected KEY=VALUE"
                    )));
                }
            }
        }

        let mut args = CniArgs::default();
        if let Some((_, value)) = pairs.iter().find(|(key, _)| *key == IGNORE_UNKNOWN) {
            args.ignore_unknown = parse_bool(value).ok_or_else(|| {
                CniError::invalid_environment(format!(
                    "CNI_ARGS: IgnoreUnknown={value:?} is not a boolean (1, true, 0, false)"
                ))
            })?;
        }

        for (key, value) in pairs {
            if key == IGNORE_UNKNOWN {
                continue;
            }
            if !args.set_known(key, value) {
                if !args.ignore_unknown {
                    return Err(CniError::invalid_environment(format!(
                        "CNI_ARGS: unknown key {key:?} (set IgnoreUnknown=1 to allow it)"
                    )));
                }
                args.unknown.insert(key.to_string(), value.to_string());
            }
        }
        Ok(args)
    }

    /// Stores a key Moat understands; false for any other key.
    fn set_known(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            K8S_POD_NAMESPACE => &mut self.pod_namespace,
            K8S_POD_NAME => &mut self.pod_name,
            K8S_POD_UID => &mut self.pod_uid,
            K8S_POD_INFRA_CONTAINER_ID => &mut self.pod_infra_container_id,
            _ => return false,
        };
        *slot = Some(value.to_string());
        true
    }

    /// Applies the config's `args.cni` object over these values: the conventions say a plugin
    /// that understands `args` must prefer it to `CNI_ARGS` for the same key. Non-string values
    /// and unknown keys are ignored, since `args` is optional metadata.
    pub fn overlay_config_args(&mut self, config_args: Option<&Value>) {
        let Some(Value::Object(cni)) = config_args.and_then(|args| args.get("cni")) else {
            return;
        };
        for (key, value) in cni {
            if let Value::String(value) = value {
                self.set_known(key, value);
            }
        }
    }
}

/// The reference "UnmarshallableBool": 1/true/0/false, case-insensitive.
fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    const KUBELET_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
        K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=1f2e-33";

    #[test]
    fn kubernetes_pod_identity_is_typed_out() {
        let args = CniArgs::parse(KUBELET_ARGS).unwrap();
        assert!(args.ignore_unknown);
        assert_eq!(args.pod_namespace.as_deref(), Some("default"));
        assert_eq!(args.pod_name.as_deref(), Some("web-0"));
        assert_eq!(args.pod_infra_container_id.as_deref(), Some("abc123"));
        assert_eq!(args.pod_uid.as_deref(), Some("1f2e-33"));
    }

    #[test]
    fn empty_args_parse_to_defaults() {
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }

    #[test]
    fn unknown_key_is_an_error_without_ignore_unknown() {
        let err = CniArgs::parse("K8S_POD_NAME=x;FOO=bar").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.msg.contains("FOO"));
    }

    #[test]
    fn unknown_key_is_kept_when_ignore_unknown_is_true_anywhere() {
        for flag in ["1", "true", "TRUE", "True"] {
            let args = CniArgs::parse(&format!("FOO=bar;IgnoreUnknown={flag}")).unwrap();
            assert_eq!(args.unknown.get("FOO").map(String::as_str), Some("bar"));
        }
    }

    #[test]
    fn ignore_unknown_false_still_rejects_unknown_keys() {
        assert!(CniArgs::parse("IgnoreUnknown=0;FOO=bar").is_err());
        assert!(CniArgs::parse("IgnoreUnknown=false;FOO=bar").is_err());
    }

    #[test]
    fn ignore_unknown_with_non_boolean_value_is_an_error() {
        assert!(CniArgs::parse("IgnoreUnknown=yes").is_err());
    }

    #[test]
    fn pairs_must_be_exactly_key_equals_value() {
        for bad in ["FOO", "A=B=C", "=x", "K8S_POD_NAME"] {
            assert!(CniArgs::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_value_is_allowed() {
        let args = CniArgs::parse("K8S_POD_NAME=").unwrap();
        assert_eq!(args.pod_name.as_deref(), Some(""));
    }

    #[test]
    fn trailing_separator_is_tolerated() {
        let args = CniArgs::parse("K8S_POD_NAME=a;").unwrap();
        assert_eq!(args.pod_name.as_deref(), Some("a"));
    }

    #[test]
    fn config_args_override_cni_args_for_the_same_key() {
        let mut args = CniArgs::parse("K8S_POD_NAME=from-env;K8S_POD_NAMESPACE=ns").unwrap();
        let config_args = serde_json::json!({"cni": {"K8S_POD_NAME": "from-config", "other": 1}});
        args.overlay_config_args(Some(&config_args));
        assert_eq!(args.pod_name.as_deref(), Some("from-config"));
        assert_eq!(args.pod_namespace.as_deref(), Some("ns"));
    }

    #[test]
    fn config_args_without_cni_namespace_change_nothing() {
        let mut args = CniArgs::parse("K8S_POD_NAME=a").unwrap();
        args.overlay_config_args(Some(&serde_json::json!({"labels": []})));
        args.overlay_config_args(None);
        assert_eq!(args.pod_name.as_deref(), Some("a"));
    }
}
