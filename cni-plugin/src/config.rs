//! Moat's own keys in the network configuration (camelCase), with their defaults.

use std::{path::PathBuf, time::Duration};

use moat_cni_protocol::{CniError, NetworkConfig};
pub use moat_datapath::AttachMode;
use serde::Deserialize;

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/moat";
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_HOST_VETH_PREFIX: &str = "moat";
/// Longest prefix that still leaves 7 hex digits of hash in a 15-byte interface name.
pub const MAX_PREFIX_LEN: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// After bridge, ptp, ...: the interface exists; Moat attaches enforcement to it.
    Chained,
    /// Moat creates the veth, routes and addresses (IPAM delegated).
    Standalone,
}

/// The keys moat-cni reads from its own entry of the network config, besides the CNI spec's
/// `type` and `ipam` (README's "Conflist: moat-cni's keys" is checked against this list).
pub const KEYS: &[&str] = &[
    "mode",
    "socket",
    "pinRoot",
    "pendingDir",
    "registrationTimeoutMs",
    "mtu",
    "hostVethPrefix",
    "attach",
];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    mode: Option<Mode>,
    socket: Option<PathBuf>,
    pin_root: Option<PathBuf>,
    pending_dir: Option<PathBuf>,
    registration_timeout_ms: Option<u64>,
    mtu: Option<u32>,
    host_veth_prefix: Option<String>,
    attach: Option<AttachMode>,
}

#[derive(Clone, Debug)]
pub struct MoatConfig {
    pub mode: Mode,
    pub socket: PathBuf,
    pub pin_root: PathBuf,
    pub pending_dir: PathBuf,
    pub timeout: Duration,
    /// The configured `mtu`, else [`DEFAULT_MTU`]; see `mtu_explicit`.
    pub mtu: u32,
    /// `mtu` was given. When not, a standalone ADD gives the pod the MTU of the node's uplink
    /// (the default route's device) and falls back to `mtu` only without one.
    pub mtu_explicit: bool,
    pub host_veth_prefix: String,
    /// How the programs go onto the host veth: `"tc"` (default; about 0.2 ms) or `"tcx"`
    /// (pinned TCX links; each costs an RCU grace period, ~15 ms, under RTNL).
    pub attach: AttachMode,
}

impl MoatConfig {
    /// Mode: the explicit `mode`, else standalone when an `ipam` section names a plugin, else
    /// chained. Deliberately not inferred from `prevResult`: libcni hands the cached result to
    /// every plugin on DEL, so that would flip a standalone network to chained on DEL.
    pub fn from_network(config: &NetworkConfig) -> Result<MoatConfig, CniError> {
        let raw: Raw = config.plugin_config()?;
        let has_ipam = config
            .ipam
            .as_ref()
            .is_some_and(|i| !i.plugin_type.is_empty());
        let mode = raw.mode.unwrap_or(if has_ipam {
            Mode::Standalone
        } else {
            Mode::Chained
        });
        let prefix = raw
            .host_veth_prefix
            .unwrap_or_else(|| DEFAULT_HOST_VETH_PREFIX.to_string());
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_LEN
            || !prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(
                CniError::invalid_network_config("invalid hostVethPrefix").with_details(format!(
                    "{prefix:?}: 1 to {MAX_PREFIX_LEN} ASCII letters or digits"
                )),
            );
        }
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if !(68..=65535).contains(&mtu) {
            return Err(
                CniError::invalid_network_config("invalid mtu").with_details(mtu.to_string())
            );
        }
        if mode == Mode::Standalone && !has_ipam {
            return Err(CniError::invalid_network_config(
                "standalone mode needs an ipam section with a type",
            ));
        }
        Ok(MoatConfig {
            mode,
            socket: raw
                .socket
                .unwrap_or_else(|| PathBuf::from(moat_api::DEFAULT_SOCKET)),
            pin_root: raw
                .pin_root
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT)),
            pending_dir: raw
                .pending_dir
                .unwrap_or_else(|| PathBuf::from(moat_api::DEFAULT_PENDING_DIR)),
            timeout: Duration::from_millis(
                raw.registration_timeout_ms
                    .unwrap_or(DEFAULT_TIMEOUT_MS)
                    .max(1),
            ),
            mtu,
            mtu_explicit: raw.mtu.is_some(),
            host_veth_prefix: prefix,
            attach: raw.attach.unwrap_or_default(),
        })
    }

    /// Deterministic host-side veth name for an attachment: prefix + hex of FNV-1a 64 of
    /// "containerID/ifname", 15 bytes in all.
    pub fn host_veth_name(&self, container_id: &str, ifname: &str) -> String {
        host_veth_name(&self.host_veth_prefix, container_id, ifname)
    }
}

pub fn host_veth_name(prefix: &str, container_id: &str, ifname: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(ifname.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let hex = format!("{hash:016x}");
    let room = 15 - prefix.len();
    format!("{prefix}{}", &hex[..room])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(doc: &str) -> Result<MoatConfig, CniError> {
        MoatConfig::from_network(&NetworkConfig::from_slice(doc.as_bytes()).unwrap())
    }

    /// Every key of `KEYS` reaches its field of `Raw`, and the exhaustive destructuring below
    /// stops compiling when `Raw` gains a field (which then belongs in `KEYS` and the README).
    #[test]
    fn keys_are_the_raw_fields() {
        let value = |key: &str| match key {
            "mode" => r#""standalone""#,
            "socket" | "pinRoot" | "pendingDir" => r#""/x""#,
            "registrationTimeoutMs" | "mtu" => "1400",
            "hostVethPrefix" => r#""abc""#,
            "attach" => r#""tcx""#,
            other => panic!("no sample value for {other}"),
        };
        let body: Vec<String> = KEYS
            .iter()
            .map(|k| format!(r#""{k}":{}"#, value(k)))
            .collect();
        let raw: Raw = serde_json::from_str(&format!("{{{}}}", body.join(","))).unwrap();
        let Raw {
            mode,
            socket,
            pin_root,
            pending_dir,
            registration_timeout_ms,
            mtu,
            host_veth_prefix,
            attach,
        } = raw;
        let set = [
            mode.is_some(),
            socket.is_some(),
            pin_root.is_some(),
            pending_dir.is_some(),
            registration_timeout_ms.is_some(),
            mtu.is_some(),
            host_veth_prefix.is_some(),
            attach.is_some(),
        ];
        assert_eq!(set.len(), KEYS.len());
        assert!(set.iter().all(|s| *s), "{set:?}");
    }

    #[test]
    fn defaults_and_mode_inference() {
        let chained = parse(r#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni"}"#).unwrap();
        assert_eq!(chained.mode, Mode::Chained);
        assert_eq!(chained.socket, PathBuf::from("/run/moat/moatd.sock"));
        assert_eq!(chained.timeout, Duration::from_millis(5000));
        assert_eq!(chained.mtu, 1500);
        assert!(!chained.mtu_explicit);
        assert_eq!(chained.attach, AttachMode::Tc);
        let tcx =
            parse(r#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni","attach":"tcx"}"#).unwrap();
        assert_eq!(tcx.attach, AttachMode::Tcx);
        assert!(
            parse(r#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni","attach":"xdp"}"#).is_err()
        );
        let standalone = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni","ipam":{"type":"moat-ipam"}}"#,
        )
        .unwrap();
        assert_eq!(standalone.mode, Mode::Standalone);
        let mtu =
            parse(r#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni","mtu":1300}"#).unwrap();
        assert_eq!((mtu.mtu, mtu.mtu_explicit), (1300, true));
        let explicit = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni","mode":"chained","ipam":{"type":"x"}}"#,
        )
        .unwrap();
        assert_eq!(explicit.mode, Mode::Chained);
        assert!(
            parse(r#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni","mode":"standalone"}"#)
                .is_err()
        );
        assert!(
            parse(r#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni","hostVethPrefix":"waytoolongprefix"}"#)
                .is_err()
        );
    }

    #[test]
    fn host_veth_names_are_deterministic_and_fit() {
        let a = host_veth_name("moat", "abc", "eth0");
        assert_eq!(a, host_veth_name("moat", "abc", "eth0"));
        assert_ne!(a, host_veth_name("moat", "abc", "eth1"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("moat"));
        assert_eq!(host_veth_name("m", "abc", "eth0").len(), 15);
    }
}
