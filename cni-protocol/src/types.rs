//! Network configuration and Success results, with conversion between result versions.
//!
//! One in-memory result shape (the 1.1 one) is used everywhere; the version only matters at the
//! edges, when a `prevResult` is decoded or a result is printed, so conversion lives here.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::env::validate_network_name;
use super::error::{CniError, ErrorCode};
use super::version::{CniVersion, IMPLICIT_VERSION};

/// Key under which the runtime lists the attachments still alive on GC (spec HEAD).
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";
/// The same list under the spec-v1.1.0 tag's name; libcni sends both.
pub const LEGACY_ATTACHMENTS_KEY: &str = "cni.dev/attachments";

/// The request configuration on stdin. Keys Moat does not model land in `plugin_fields`,
/// from which a plugin reads its own typed section with [`NetworkConfig::plugin_config`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Absent means 0.1.0, per the reference decoder.
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    /// Absent or null reads as empty, so that it is reported as a missing name (code 7).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub name: String,
    #[serde(rename = "type", default, deserialize_with = "null_as_empty")]
    pub plugin_type: String,
    #[serde(
        rename = "prevResult",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prev_result: Option<Value>,
    #[serde(
        rename = "runtimeConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub runtime_config: Option<Map<String, Value>>,
    /// The spec says runtimes strip this, but libcni forwards it: accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// Structured metadata (`args.cni.*`); see [`super::args::CniArgs::overlay_config_args`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(
        rename = "cni.dev/attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_attachments: Option<Vec<Attachment>>,
    #[serde(flatten)]
    pub plugin_fields: Map<String, Value>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_default())
}

/// The `ipam` section: only `type` is common to every IPAM plugin.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct IpamSection {
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// One `(container ID, interface)` attachment, as listed on GC.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetworkConfig {
    /// Decodes stdin; malformed JSON is code 6.
    pub fn from_slice(bytes: &[u8]) -> Result<NetworkConfig, CniError> {
        serde_json::from_slice(bytes).map_err(|e| {
            CniError::decoding_failure("failed to decode network configuration")
                .with_details(e.to_string())
        })
    }

    /// The request version string, with the reference default for a missing one.
    pub fn version_str(&self) -> &str {
        self.cni_version.as_deref().unwrap_or(IMPLICIT_VERSION)
    }

    /// The request version if Moat supports it, else code 1.
    pub fn version(&self) -> Result<CniVersion, CniError> {
        CniVersion::parse_supported(self.version_str())
    }

    /// Checks what every command but VERSION relies on: a path-safe network name (code 7) and a
    /// plugin type without path separators (code 7).
    pub fn validate(&self) -> Result<(), CniError> {
        validate_network_name(&self.name)?;
        if self.plugin_type.contains(['/', '\\']) {
            return Err(
                CniError::invalid_network_config("plugin type must not contain / or \\")
                    .with_details(self.plugin_type.clone()),
            );
        }
        Ok(())
    }

    /// The GC list of live attachments: `cni.dev/valid-attachments`, falling back to the older
    /// `cni.dev/attachments`. `None` means the runtime sent neither key (e.g. `cnitool gc`).
    pub fn valid_attachments(&self) -> Option<&[Attachment]> {
        self.valid_attachments
            .as_deref()
            .or(self.legacy_attachments.as_deref())
    }

    /// Deserialises the plugin-specific keys into the plugin's own type; failures are code 7.
    pub fn plugin_config<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        serde_json::from_value(Value::Object(self.plugin_fields.clone())).map_err(|e| {
            CniError::invalid_network_config("invalid plugin configuration")
                .with_details(e.to_string())
        })
    }

    /// Refuses plugin-specific keys outside `known` with code 2, naming key and value as the
    /// spec requires. Plugins that prefer to ignore unknown keys simply do not call this.
    pub fn reject_unknown_fields(&self, known: &[&str]) -> Result<(), CniError> {
        match self
            .plugin_fields
            .iter()
            .find(|(key, _)| !known.contains(&key.as_str()))
        {
            Some((key, value)) => Err(CniError::new(
                ErrorCode::UnsupportedField,
                "unsupported field in network configuration",
            )
            .with_details(format!("{key}: {value}"))),
            None => Ok(()),
        }
    }

    /// The previous result, decoded in its own `cniVersion` (or the request's when it has
    /// none) and converted to the request's version, as libcni does.
    pub fn prev_result(&self) -> Result<Option<SuccessResult>, CniError> {
        let Some(raw) = &self.prev_result else {
            return Ok(None);
        };
        if raw.as_object().is_some_and(|o| o.is_empty()) {
            return Ok(None);
        }
        let request_version = self.version()?;
        let result = SuccessResult::from_value(raw.clone(), request_version)?;
        Ok(Some(result.convert(request_version)))
    }
}

/// An interface the attachment created or touched; `sandbox` is set for container-side ones.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// 1.1.0 and later.
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// 1.1.0 and later.
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

impl Interface {
    /// The fields 0.3.x/0.4.0 results can carry (name, mac, sandbox).
    fn without_1_1_fields(&self) -> Interface {
        Interface {
            name: self.name.clone(),
            mac: self.mac.clone(),
            sandbox: self.sandbox.clone(),
            ..Interface::default()
        }
    }
}

/// An address assigned to the attachment. `interface` indexes `SuccessResult::interfaces`
/// (index 0 is kept); delegated IPAM results leave it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// `mtu`, `advmss`, `priority`, `table` and `scope` are 1.1.0 additions; the reference
    /// types share one Route type, so they survive down-conversion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// 0 global, 253 link, 254 host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// An ADD result in the version stored in `cni_version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuccessResult {
    pub cni_version: CniVersion,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

/// The on-the-wire layout shared by 0.3.0 to 1.1.0; only `ips[].version` and the interface
/// fields differ, and those are handled when converting.
#[derive(Serialize, Deserialize)]
struct WireResult {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ips: Vec<WireIp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns: Option<Dns>,
}

#[derive(Serialize, Deserialize)]
struct WireIp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
}

impl SuccessResult {
    pub fn new(cni_version: CniVersion) -> SuccessResult {
        SuccessResult {
            cni_version,
            interfaces: Vec::new(),
            ips: Vec::new(),
            routes: Vec::new(),
            dns: Dns::default(),
        }
    }

    /// Decodes a result. Its own `cniVersion` wins; `default_version` applies when it has none.
    /// Pre-0.3.0 layouts and unknown versions are code 1; malformed JSON is code 6.
    pub fn from_value(
        value: Value,
        default_version: CniVersion,
    ) -> Result<SuccessResult, CniError> {
        let wire: WireResult = serde_json::from_value(value).map_err(|e| {
            CniError::decoding_failure("failed to decode CNI result").with_details(e.to_string())
        })?;
        let version = match &wire.cni_version {
            Some(v) => CniVersion::parse_supported(v)?,
            None => default_version,
        };
        let legacy_layout = version.ips_carry_version_field();
        let result = SuccessResult {
            cni_version: version,
            interfaces: wire
                .interfaces
                .iter()
                .map(|i| {
                    if legacy_layout {
                        i.without_1_1_fields()
                    } else {
                        i.clone()
                    }
                })
                .collect(),
            ips: wire
                .ips
                .into_iter()
                .map(|ip| IpConfig {
                    address: ip.address,
                    gateway: ip.gateway,
                    interface: ip.interface,
                })
                .collect(),
            routes: wire.routes,
            dns: wire.dns.unwrap_or_default(),
        };
        result.check_interface_indexes()?;
        Ok(result)
    }

    pub fn from_slice(
        bytes: &[u8],
        default_version: CniVersion,
    ) -> Result<SuccessResult, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::decoding_failure("failed to decode CNI result").with_details(e.to_string())
        })?;
        SuccessResult::from_value(value, default_version)
    }

    /// An `ips[].interface` that points past `interfaces` cannot be represented faithfully in
    /// any version, so it is refused rather than passed on.
    fn check_interface_indexes(&self) -> Result<(), CniError> {
        for ip in &self.ips {
            if let Some(index) = ip.interface
                && index >= self.interfaces.len()
            {
                return Err(
                    CniError::decoding_failure("invalid CNI result").with_details(format!(
                        "ip {} refers to interface {index}, but only {} interfaces are listed",
                        ip.address,
                        self.interfaces.len()
                    )),
                );
            }
        }
        Ok(())
    }

    /// Converts between supported versions the way the reference types do: 1.0 and 1.1 are
    /// identical; going below 1.0 drops the 1.1 interface fields (mtu, socketPath, pciID) and
    /// adds `ips[].version` on output; going up drops `ips[].version`. Routes and DNS are kept.
    pub fn convert(&self, target: CniVersion) -> SuccessResult {
        let mut converted = self.clone();
        converted.cni_version = target;
        if target.ips_carry_version_field() {
            converted.interfaces = self
                .interfaces
                .iter()
                .map(Interface::without_1_1_fields)
                .collect();
        }
        converted
    }

    /// Converts to a version named by string; versions Moat cannot write (0.1.0, 0.2.0, unknown)
    /// are code 1.
    pub fn convert_to(&self, target: &str) -> Result<SuccessResult, CniError> {
        let version = CniVersion::parse_supported(target).map_err(|e| CniError {
            msg: format!("cannot convert result to CNI version {target:?}"),
            ..e
        })?;
        Ok(self.convert(version))
    }

    /// The result as JSON in its own version's layout.
    pub fn to_value(&self) -> Value {
        let legacy_layout = self.cni_version.ips_carry_version_field();
        let wire = WireResult {
            cni_version: Some(self.cni_version.as_str().to_string()),
            interfaces: self.interfaces.clone(),
            ips: self
                .ips
                .iter()
                .map(|ip| WireIp {
                    version: legacy_layout
                        .then(|| if ip.address.is_ipv4() { "4" } else { "6" }.to_string()),
                    address: ip.address,
                    gateway: ip.gateway,
                    interface: ip.interface,
                })
                .collect(),
            routes: self.routes.clone(),
            // The reference 1.x encoder drops an empty dns object entirely.
            dns: (!self.dns.is_empty()).then(|| self.dns.clone()),
        };
        serde_json::to_value(wire).expect("result serialises")
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_value()).expect("result serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_1_1_result() -> SuccessResult {
        SuccessResult {
            cni_version: CniVersion::V1_1_0,
            interfaces: vec![
                Interface {
                    name: "lxc1234".into(),
                    mac: Some("aa:bb:cc:dd:ee:ff".into()),
                    mtu: Some(1450),
                    ..Interface::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("11:22:33:44:55:66".into()),
                    sandbox: Some("/run/netns/x".into()),
                    socket_path: Some("/tmp/sock".into()),
                    pci_id: Some("0000:00:01.0".into()),
                    ..Interface::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.1.0.5/16".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(0),
                },
            ],
            routes: vec![Route {
                scope: Some(253),
                ..Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("10.1.0.1".parse().unwrap()),
                )
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Dns::default()
            },
        }
    }

    #[test]
    fn config_decodes_well_known_and_plugin_specific_keys() {
        let config = NetworkConfig::from_slice(
            br#"{"cniVersion":"1.1.0","name":"moat","type":"moat-cni",
                 "ipam":{"type":"moat-ipam","ranges":[]},
                 "capabilities":{"portMappings":true},
                 "runtimeConfig":{"portMappings":[]},
                 "args":{"cni":{"K8S_POD_NAME":"x"}},
                 "mtu":1450,"policyMode":"enforce"}"#,
        )
        .unwrap();
        assert_eq!(config.version().unwrap(), CniVersion::V1_1_0);
        assert_eq!(config.ipam.as_ref().unwrap().plugin_type, "moat-ipam");
        assert!(config.ipam.as_ref().unwrap().fields.contains_key("ranges"));
        assert_eq!(config.plugin_fields.get("mtu"), Some(&json!(1450)));
        assert!(!config.plugin_fields.contains_key("ipam"));

        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct MoatConfig {
            mtu: u32,
            policy_mode: String,
        }
        let moat: MoatConfig = config.plugin_config().unwrap();
        assert_eq!((moat.mtu, moat.policy_mode.as_str()), (1450, "enforce"));
    }

    #[test]
    fn config_without_version_reads_as_0_1_0_and_is_incompatible() {
        let config = NetworkConfig::from_slice(br#"{"name":"n","type":"t"}"#).unwrap();
        assert_eq!(config.version_str(), "0.1.0");
        assert_eq!(
            config.version().unwrap_err().code,
            ErrorCode::IncompatibleVersion
        );
    }

    #[test]
    fn malformed_config_is_code_6() {
        assert_eq!(
            NetworkConfig::from_slice(b"{not json").unwrap_err().code,
            ErrorCode::DecodingFailure
        );
        assert_eq!(
            NetworkConfig::from_slice(br#"{"name": 5}"#)
                .unwrap_err()
                .code,
            ErrorCode::DecodingFailure
        );
    }

    #[test]
    fn plugin_type_with_path_separator_is_invalid_config() {
        for bad in ["../bin/evil", "a\\b"] {
            let config = NetworkConfig {
                name: "n".into(),
                plugin_type: bad.into(),
                ..NetworkConfig::default()
            };
            assert_eq!(
                config.validate().unwrap_err().code,
                ErrorCode::InvalidNetworkConfig
            );
        }
    }

    #[test]
    fn unknown_plugin_fields_can_be_rejected_with_code_2_naming_key_and_value() {
        let config = NetworkConfig::from_slice(
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","bogus":42}"#,
        )
        .unwrap();
        let err = config.reject_unknown_fields(&["mtu"]).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedField);
        assert_eq!(err.details.as_deref(), Some("bogus: 42"));
        config.reject_unknown_fields(&["bogus"]).unwrap();
    }

    #[test]
    fn valid_attachments_prefers_the_new_key_and_falls_back_to_the_old() {
        let both = NetworkConfig::from_slice(
            br#"{"name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],
                 "cni.dev/attachments":[{"containerID":"b","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(both.valid_attachments().unwrap()[0].container_id, "a");
        let old = NetworkConfig::from_slice(
            br#"{"name":"n","cni.dev/attachments":[{"containerID":"b","ifname":"net1"}]}"#,
        )
        .unwrap();
        assert_eq!(
            old.valid_attachments().unwrap(),
            &[Attachment {
                container_id: "b".into(),
                ifname: "net1".into()
            }]
        );
        let none = NetworkConfig::from_slice(br#"{"name":"n"}"#).unwrap();
        assert_eq!(none.valid_attachments(), None);
        let empty =
            NetworkConfig::from_slice(br#"{"name":"n","cni.dev/valid-attachments":[]}"#).unwrap();
        assert_eq!(empty.valid_attachments(), Some(&[][..]));
    }

    #[test]
    fn result_1_1_serialises_without_ip_version_and_with_interface_index_zero() {
        let json = sample_1_1_result().to_value();
        assert_eq!(json["cniVersion"], "1.1.0");
        assert!(json["ips"][0].get("version").is_none());
        assert_eq!(json["ips"][1]["interface"], 0);
        assert_eq!(json["ips"][0]["address"], "10.1.0.5/16");
        assert_eq!(json["interfaces"][0]["mtu"], 1450);
        assert_eq!(json["interfaces"][1]["pciID"], "0000:00:01.0");
        assert_eq!(json["routes"][0]["scope"], 253);
        assert_eq!(json["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn down_conversion_to_0_4_adds_ip_version_and_drops_1_1_interface_fields() {
        let json = sample_1_1_result().convert(CniVersion::V0_4_0).to_value();
        assert_eq!(json["cniVersion"], "0.4.0");
        assert_eq!(json["ips"][0]["version"], "4");
        assert_eq!(json["ips"][1]["version"], "6");
        assert!(json["interfaces"][0].get("mtu").is_none());
        assert!(json["interfaces"][1].get("socketPath").is_none());
        assert!(json["interfaces"][1].get("pciID").is_none());
        assert_eq!(json["interfaces"][1]["sandbox"], "/run/netns/x");
        // The shared route type keeps 1.1 fields.
        assert_eq!(json["routes"][0]["scope"], 253);
    }

    #[test]
    fn up_conversion_from_0_3_1_drops_ip_version() {
        let legacy = json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "sandbox": "/proc/1/ns/net"}],
            "ips": [{"version": "4", "address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}]
        });
        let result = SuccessResult::from_value(legacy, CniVersion::V1_1_0).unwrap();
        assert_eq!(result.cni_version, CniVersion::V0_3_1);
        let json = result.convert(CniVersion::V1_0_0).to_value();
        assert_eq!(json["cniVersion"], "1.0.0");
        assert!(json["ips"][0].get("version").is_none());
        assert_eq!(json["ips"][0]["interface"], 0);
    }

    #[test]
    fn conversion_between_1_0_and_1_1_changes_only_the_version() {
        let original = sample_1_1_result();
        let down = original.convert(CniVersion::V1_0_0);
        assert_eq!(down.interfaces, original.interfaces);
        assert_eq!(down.convert(CniVersion::V1_1_0), original);
    }

    #[test]
    fn round_trip_through_every_supported_version_keeps_addresses_routes_and_dns() {
        let original = sample_1_1_result();
        for version in crate::version::SUPPORTED_VERSIONS {
            let encoded = original.convert(version).to_json();
            let decoded = SuccessResult::from_slice(&encoded, CniVersion::V1_1_0).unwrap();
            assert_eq!(decoded.cni_version, version);
            assert_eq!(decoded.ips, original.ips);
            assert_eq!(decoded.routes, original.routes);
            assert_eq!(decoded.dns, original.dns);
        }
    }

    #[test]
    fn conversion_to_unrepresentable_version_is_code_1() {
        for target in ["0.2.0", "0.1.0", "2.0.0"] {
            let err = sample_1_1_result().convert_to(target).unwrap_err();
            assert_eq!(err.code, ErrorCode::IncompatibleVersion);
            assert!(err.msg.contains(target));
        }
        assert_eq!(
            sample_1_1_result().convert_to("0.3.0").unwrap().cni_version,
            CniVersion::V0_3_0
        );
    }

    #[test]
    fn empty_dns_is_omitted_from_output() {
        let mut result = sample_1_1_result();
        result.dns = Dns::default();
        assert!(result.to_value().get("dns").is_none());
    }

    #[test]
    fn result_without_version_takes_the_default() {
        let result = SuccessResult::from_value(
            json!({"ips": [{"address": "10.0.0.2/24"}]}),
            CniVersion::V0_4_0,
        )
        .unwrap();
        assert_eq!(result.cni_version, CniVersion::V0_4_0);
    }

    #[test]
    fn result_with_dangling_interface_index_is_refused() {
        let err = SuccessResult::from_value(
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": 3}]}),
            CniVersion::V1_0_0,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::DecodingFailure);
    }

    #[test]
    fn pre_0_3_result_is_incompatible() {
        let err = SuccessResult::from_value(
            json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24"}}),
            CniVersion::V1_0_0,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
    }

    #[test]
    fn prev_result_is_converted_to_the_request_version() {
        let config = NetworkConfig::from_slice(
            br#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni",
                 "prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.0.0.2/24"}]}}"#,
        )
        .unwrap();
        let prev = config.prev_result().unwrap().unwrap();
        assert_eq!(prev.cni_version, CniVersion::V1_1_0);
        assert_eq!(
            prev.ips[0].address,
            "10.0.0.2/24".parse::<IpNetwork>().unwrap()
        );
    }

    #[test]
    fn prev_result_without_version_uses_the_request_version() {
        let config = NetworkConfig::from_slice(
            br#"{"cniVersion":"0.4.0","name":"n","prevResult":{"ips":[{"version":"4","address":"10.0.0.2/24"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            config.prev_result().unwrap().unwrap().cni_version,
            CniVersion::V0_4_0
        );
    }

    #[test]
    fn absent_null_or_empty_prev_result_is_none() {
        for doc in [
            &br#"{"cniVersion":"1.0.0","name":"n"}"#[..],
            br#"{"cniVersion":"1.0.0","name":"n","prevResult":null}"#,
            br#"{"cniVersion":"1.0.0","name":"n","prevResult":{}}"#,
        ] {
            assert_eq!(
                NetworkConfig::from_slice(doc)
                    .unwrap()
                    .prev_result()
                    .unwrap(),
                None
            );
        }
    }
}
