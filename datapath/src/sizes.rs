//! How many entries each sized map holds: the defaults in `moat_common::map_size`, or what
//! the operator configured (`moatd --map-size conntrack=524288,policy=65536`). The loader
//! creates maps at these sizes (aya's `set_max_entries`) and resizes pinned ones whose size
//! differs (see `resize`). docs/maps.md gives the sizing rule of each.

use std::{collections::BTreeMap, fmt, str::FromStr};

use moat_common::{map_name, map_size};

/// One configurable size: its name on the command line, the pinned maps it sizes, and its
/// default.
pub struct Knob {
    pub name: &'static str,
    pub maps: &'static [&'static str],
    pub default: u32,
}

/// Every map whose size may be configured. Left out on purpose: the single-entry arrays, the
/// per-CPU metric slots, the rings (bytes, not entries), and MOAT_THREATS, whose slot index
/// is a mask of its size compiled into the program.
pub const KNOBS: [Knob; 11] = [
    Knob {
        name: "endpoints",
        maps: &[map_name::ENDPOINTS],
        default: map_size::ENDPOINTS,
    },
    Knob {
        name: "ipcache",
        maps: &[
            map_name::IPCACHE_V4,
            map_name::IPCACHE_V6,
            map_name::HOSTS_V4,
            map_name::HOSTS_V6,
        ],
        default: map_size::IPCACHE,
    },
    Knob {
        name: "policy",
        maps: &[map_name::POLICY],
        default: map_size::POLICY,
    },
    Knob {
        name: "port-ranges",
        maps: &[map_name::PORT_RANGES],
        default: map_size::PORT_RANGES,
    },
    Knob {
        name: "cidr",
        maps: &[map_name::CIDR_V4, map_name::CIDR_V6],
        default: map_size::CIDR,
    },
    Knob {
        name: "conntrack",
        maps: &[map_name::CONNTRACK],
        default: map_size::CONNTRACK,
    },
    Knob {
        name: "fragments",
        maps: &[map_name::FRAGMENTS],
        default: map_size::FRAGMENTS,
    },
    Knob {
        name: "fqdn-patterns",
        maps: &[map_name::FQDN_PATTERNS],
        default: map_size::FQDN_PATTERNS,
    },
    Knob {
        name: "fqdn-addresses",
        maps: &[map_name::FQDN_V4, map_name::FQDN_V6],
        default: map_size::FQDN_ADDRS,
    },
    Knob {
        name: "fqdn-names",
        maps: &[map_name::FQDN_NAMES],
        default: map_size::FQDN_NAMES,
    },
    Knob {
        name: "dns-queries",
        maps: &[map_name::DNS_QUERIES],
        default: map_size::DNS_QUERIES,
    },
];

/// Smallest configurable size: enough for a test node, and a floor under typos.
pub const MIN_ENTRIES: u32 = 16;
/// Largest: 16 Mi entries. The biggest value (a port-rule set) makes that a few GiB of
/// kernel memory, which is already far past what one node can use.
pub const MAX_ENTRIES: u32 = 1 << 24;

/// The configured size of every knob (defaults where nothing was said).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSizes {
    set: BTreeMap<&'static str, u32>,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            set: KNOBS.iter().map(|k| (k.name, k.default)).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("unknown map size `{0}`; the sizable maps are: {names}", names = knob_names())]
    UnknownKnob(String),
    #[error("`{0}` is not NAME=ENTRIES (for example conntrack=524288)")]
    Syntax(String),
    #[error("map size {name}={value} is outside {MIN_ENTRIES}..={MAX_ENTRIES}")]
    OutOfRange { name: String, value: String },
}

fn knob_names() -> String {
    KNOBS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

impl MapSizes {
    /// Sets one knob by its command-line name.
    pub fn set(&mut self, name: &str, entries: u32) -> Result<(), SizeError> {
        let knob = KNOBS
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| SizeError::UnknownKnob(name.to_string()))?;
        if !(MIN_ENTRIES..=MAX_ENTRIES).contains(&entries) {
            return Err(SizeError::OutOfRange {
                name: name.to_string(),
                value: entries.to_string(),
            });
        }
        self.set.insert(knob.name, entries);
        Ok(())
    }

    /// The size of a knob by its command-line name.
    pub fn knob(&self, name: &str) -> Option<u32> {
        self.set.get(name).copied()
    }

    /// The size of a pinned map by its map name; `None` for maps of fixed size.
    pub fn of_map(&self, map: &str) -> Option<u32> {
        let knob = KNOBS.iter().find(|k| k.maps.contains(&map))?;
        self.set.get(knob.name).copied()
    }

    /// Every sized map with its size, for the loader.
    pub fn per_map(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        KNOBS.iter().flat_map(move |k| {
            let size = self.set[k.name];
            k.maps.iter().map(move |m| (*m, size))
        })
    }

    /// Applies `NAME=ENTRIES` assignments (as given on the command line, one per item).
    pub fn parse_all<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, SizeError> {
        let mut sizes = Self::default();
        for item in items {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| SizeError::Syntax(item.to_string()))?;
            let name = name.trim();
            let entries: u32 =
                value
                    .trim()
                    .replace('_', "")
                    .parse()
                    .map_err(|_| SizeError::OutOfRange {
                        name: name.to_string(),
                        value: value.to_string(),
                    })?;
            sizes.set(name, entries)?;
        }
        Ok(sizes)
    }
}

impl fmt::Display for MapSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = KNOBS
            .iter()
            .map(|k| format!("{}={}", k.name, self.set[k.name]))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for MapSizes {
    type Err = SizeError;

    /// Comma-separated `NAME=ENTRIES` assignments.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_all(s.split(',').filter(|p| !p.trim().is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_compiled_sizes() {
        let sizes = MapSizes::default();
        assert_eq!(sizes.of_map(map_name::CONNTRACK), Some(map_size::CONNTRACK));
        assert_eq!(sizes.of_map(map_name::HOSTS_V6), Some(map_size::IPCACHE));
        assert_eq!(sizes.of_map(map_name::THREATS), None);
        assert_eq!(sizes.per_map().count(), 16);
    }

    #[test]
    fn assignments_set_every_map_of_their_knob() {
        let sizes: MapSizes = "conntrack=1024, cidr=2_048".parse().unwrap();
        assert_eq!(sizes.of_map(map_name::CONNTRACK), Some(1024));
        assert_eq!(sizes.of_map(map_name::CIDR_V4), Some(2048));
        assert_eq!(sizes.of_map(map_name::CIDR_V6), Some(2048));
        assert_eq!(sizes.of_map(map_name::POLICY), Some(map_size::POLICY));
        let round_trip: MapSizes = sizes.to_string().parse().unwrap();
        assert_eq!(round_trip, sizes);
    }

    #[test]
    fn bad_assignments_name_what_is_wrong() {
        let err = "threats=10".parse::<MapSizes>().unwrap_err();
        assert!(err.to_string().contains("conntrack"), "{err}");
        assert_eq!(
            "policy".parse::<MapSizes>().unwrap_err(),
            SizeError::Syntax("policy".into())
        );
        assert!(matches!(
            "policy=8".parse::<MapSizes>().unwrap_err(),
            SizeError::OutOfRange { .. }
        ));
        assert!(matches!(
            "policy=lots".parse::<MapSizes>().unwrap_err(),
            SizeError::OutOfRange { .. }
        ));
        assert!(matches!(
            format!("policy={}", MAX_ENTRIES as u64 + 1)
                .parse::<MapSizes>()
                .unwrap_err(),
            SizeError::OutOfRange { .. }
        ));
    }
}
