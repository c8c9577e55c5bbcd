//! The `ipam` section of the network config, checked and turned into address ranges.
//!
//! Validation happens once, up front, so the allocator can assume every range is inside its
//! subnet, ranges of a set do not overlap, and each address family has at most one range set.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use moat_cni_protocol::{Dns, NetworkConfig, Route};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{IpamError, Result};

/// Where state lives when `dataDir` is not set; the network name is appended.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/moat/ipam";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConfig {
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// One range set per address family; a set is a list of ranges of the same family.
    pub ranges: Vec<Vec<RangeConfig>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Parent directory of the per-network state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Addresses never handed out, in addition to network, broadcast and gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeConfig {
    pub subnet: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(address: IpAddr) -> Family {
        if address.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Addresses as integers so that ranges can be walked and counted for both families alike.
pub fn address_to_number(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn number_to_address(family: Family, number: u128) -> IpAddr {
    match family {
        // Callers only pass numbers taken from IPv4 ranges, which fit in 32 bits.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(number as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(number)),
    }
}

/// A validated range: `[first, last]` inclusive, inside `subnet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRange {
    /// The subnet with host bits cleared; its prefix is the one handed out with addresses.
    pub subnet: IpNetwork,
    pub first: u128,
    pub last: u128,
    pub gateway: Option<IpAddr>,
}

impl AddressRange {
    pub fn contains(&self, address: IpAddr) -> bool {
        self.subnet.contains(address)
            && (self.first..=self.last).contains(&address_to_number(address))
    }

    pub fn size(&self) -> u128 {
        self.last - self.first + 1
    }

    /// The network address, the IPv4 broadcast address and the gateway are never handed out.
    pub fn is_structurally_reserved(&self, address: IpAddr) -> bool {
        address == self.subnet.network()
            || (self.subnet.is_ipv4() && address == self.subnet.broadcast())
            || Some(address) == self.gateway
    }
}

/// The ranges of one address family, walked in order by the allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet {
    pub family: Family,
    pub ranges: Vec<AddressRange>,
}

impl RangeSet {
    pub fn range_of(&self, address: IpAddr) -> Option<&AddressRange> {
        self.ranges.iter().find(|r| r.contains(address))
    }

    pub fn describe(&self) -> String {
        self.ranges
            .iter()
            .map(|r| {
                format!(
                    "{}-{}",
                    number_to_address(self.family, r.first),
                    number_to_address(self.family, r.last)
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl IpamConfig {
    /// Reads the `ipam` section of a network configuration.
    pub fn from_network_config(config: &NetworkConfig) -> Result<IpamConfig> {
        let section = config
            .ipam
            .as_ref()
            .ok_or_else(|| IpamError::InvalidConfig("missing \"ipam\" section".into()))?;
        let mut object = section.fields.clone();
        object.insert("type".into(), Value::String(section.plugin_type.clone()));
        serde_json::from_value(Value::Object(object))
            .map_err(|e| IpamError::InvalidConfig(e.to_string()))
    }

    /// The directory holding this network's state and lock.
    pub fn network_dir(&self, network_name: &str) -> Result<PathBuf> {
        // The name becomes a path component; refuse anything that could escape dataDir.
        if network_name.is_empty()
            || network_name.starts_with('.')
            || network_name.contains(['/', '\\', '\0'])
        {
            return Err(IpamError::InvalidConfig(format!(
                "network name {network_name:?} cannot be used as a directory name"
            )));
        }
        let base = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        Ok(base.join(network_name))
    }

    /// Checks the ranges and returns them with defaults filled in.
    pub fn range_sets(&self) -> Result<Vec<RangeSet>> {
        if self.ranges.is_empty() {
            return Err(IpamError::InvalidConfig("\"ranges\" is empty".into()));
        }
        let mut sets: Vec<RangeSet> = Vec::new();
        for (index, set_config) in self.ranges.iter().enumerate() {
            let set = validate_range_set(index, set_config)?;
            if sets.iter().any(|s| s.family == set.family) {
                return Err(IpamError::InvalidConfig(format!(
                    "range set {index} is a second {} range set; use one set per family",
                    set.family.name()
                )));
            }
            sets.push(set);
        }
        Ok(sets)
    }
}

fn validate_range_set(index: usize, set_config: &[RangeConfig]) -> Result<RangeSet> {
    let first = set_config
        .first()
        .ok_or_else(|| IpamError::InvalidConfig(format!("range set {index} is empty")))?;
    let family = Family::of(first.subnet.ip());
    let mut ranges = Vec::new();
    for range_config in set_config {
        let range = validate_range(range_config)?;
        if Family::of(range.subnet.ip()) != family {
            return Err(IpamError::InvalidConfig(format!(
                "range set {index} mixes IPv4 and IPv6 subnets"
            )));
        }
        if let Some(other) = ranges
            .iter()
            .find(|r: &&AddressRange| r.first <= range.last && range.first <= r.last)
        {
            return Err(IpamError::InvalidConfig(format!(
                "ranges {} and {} of range set {index} overlap",
                other.subnet, range.subnet
            )));
        }
        ranges.push(range);
    }
    Ok(RangeSet { family, ranges })
}

fn validate_range(config: &RangeConfig) -> Result<AddressRange> {
    let subnet = IpNetwork::new(config.subnet.network(), config.subnet.prefix())
        .map_err(|e| IpamError::InvalidConfig(e.to_string()))?;
    let network = address_to_number(subnet.network());
    let last_in_subnet = address_to_number(subnet.broadcast());
    let inside = |what: &str, address: IpAddr| {
        if subnet.contains(address) {
            Ok(address_to_number(address))
        } else {
            Err(IpamError::InvalidConfig(format!(
                "{what} {address} is outside subnet {subnet}"
            )))
        }
    };
    let first = match config.range_start {
        Some(start) => inside("rangeStart", start)?,
        None => network.saturating_add(1).min(last_in_subnet),
    };
    let last = match config.range_end {
        Some(end) => inside("rangeEnd", end)?,
        None if subnet.is_ipv4() => last_in_subnet.saturating_sub(1).max(network),
        None => last_in_subnet,
    };
    if first > last {
        return Err(IpamError::InvalidConfig(format!(
            "subnet {subnet}: range start is after range end"
        )));
    }
    if let Some(gateway) = config.gateway {
        inside("gateway", gateway)?;
    }
    Ok(AddressRange {
        subnet,
        first,
        last,
        gateway: config.gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(subnet: &str) -> RangeConfig {
        RangeConfig {
            subnet: subnet.parse().unwrap(),
            range_start: None,
            range_end: None,
            gateway: None,
        }
    }

    fn config(ranges: Vec<Vec<RangeConfig>>) -> IpamConfig {
        IpamConfig {
            plugin_type: "moat-ipam".into(),
            ranges,
            routes: vec![],
            data_dir: None,
            reserved: vec![],
            dns: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_defaults_skip_network_and_broadcast() {
        let sets = config(vec![vec![range("10.0.0.0/24")]])
            .range_sets()
            .unwrap();
        let r = &sets[0].ranges[0];
        assert_eq!(number_to_address(Family::V4, r.first), ip("10.0.0.1"));
        assert_eq!(number_to_address(Family::V4, r.last), ip("10.0.0.254"));
    }

    #[test]
    fn ipv6_default_end_is_the_last_address() {
        let sets = config(vec![vec![range("fd00::/120")]])
            .range_sets()
            .unwrap();
        assert_eq!(
            number_to_address(Family::V6, sets[0].ranges[0].last),
            ip("fd00::ff")
        );
    }

    #[test]
    fn subnet_with_host_bits_is_normalised() {
        let sets = config(vec![vec![range("10.0.0.77/24")]])
            .range_sets()
            .unwrap();
        assert_eq!(sets[0].ranges[0].subnet.to_string(), "10.0.0.0/24");
    }

    #[test]
    fn explicit_bounds_outside_the_subnet_are_refused() {
        let mut r = range("10.0.0.0/24");
        r.range_start = Some(ip("10.0.1.5"));
        assert!(config(vec![vec![r]]).range_sets().is_err());
        let mut r = range("10.0.0.0/24");
        r.gateway = Some(ip("192.168.0.1"));
        assert!(config(vec![vec![r]]).range_sets().is_err());
    }

    #[test]
    fn start_after_end_is_refused() {
        let mut r = range("10.0.0.0/24");
        r.range_start = Some(ip("10.0.0.20"));
        r.range_end = Some(ip("10.0.0.10"));
        assert!(config(vec![vec![r]]).range_sets().is_err());
    }

    #[test]
    fn mixed_families_in_one_set_are_refused() {
        assert!(
            config(vec![vec![range("10.0.0.0/24"), range("fd00::/64")]])
                .range_sets()
                .is_err()
        );
    }

    #[test]
    fn two_sets_of_the_same_family_are_refused() {
        assert!(
            config(vec![vec![range("10.0.0.0/24")], vec![range("10.1.0.0/24")]])
                .range_sets()
                .is_err()
        );
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        assert!(
            config(vec![vec![range("10.0.0.0/24"), range("10.0.0.0/25")]])
                .range_sets()
                .is_err()
        );
    }

    #[test]
    fn empty_ranges_are_refused() {
        assert!(config(vec![]).range_sets().is_err());
        assert!(config(vec![vec![]]).range_sets().is_err());
    }

    #[test]
    fn config_is_read_from_the_ipam_section() {
        let network = NetworkConfig::from_slice(
            br#"{"cniVersion":"1.1.0","name":"n","type":"moat-cni","ipam":{"type":"moat-ipam",
                "ranges":[[{"subnet":"10.0.0.0/24","gateway":"10.0.0.1"}]],
                "routes":[{"dst":"0.0.0.0/0"}],"dataDir":"/tmp/x","reserved":["10.0.0.9"]}}"#,
        )
        .unwrap();
        let ipam = IpamConfig::from_network_config(&network).unwrap();
        assert_eq!(ipam.plugin_type, "moat-ipam");
        assert_eq!(ipam.ranges[0][0].gateway, Some(ip("10.0.0.1")));
        assert_eq!(ipam.reserved, vec![ip("10.0.0.9")]);
        assert_eq!(ipam.network_dir("n").unwrap(), PathBuf::from("/tmp/x/n"));
    }

    #[test]
    fn missing_ipam_section_is_invalid_config() {
        let network = NetworkConfig::from_slice(br#"{"name":"n"}"#).unwrap();
        assert!(matches!(
            IpamConfig::from_network_config(&network),
            Err(IpamError::InvalidConfig(_))
        ));
    }

    #[test]
    fn network_names_that_escape_the_data_dir_are_refused() {
        let c = config(vec![vec![range("10.0.0.0/24")]]);
        for bad in ["", "..", "../x", "a/b", ".hidden"] {
            assert!(c.network_dir(bad).is_err(), "{bad}");
        }
        assert_eq!(
            c.network_dir("pods").unwrap(),
            PathBuf::from("/var/lib/moat/ipam/pods")
        );
    }
}
