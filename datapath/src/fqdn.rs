//! The FQDN egress maps (see moat-common's "FQDN egress"): moatd writes the name patterns
//! (MOAT_FQDNPAT) and the TTL settings (MOAT_FQDNCFG); the kernel writes what it learns from
//! DNS answers (MOAT_FQDN4/6, MOAT_FQDNNAME), which moatd reads, shows and prunes.
//!
//! A struct of its own rather than fields of `Maps`: `Maps::open` keeps working on a pinned
//! state made before these maps existed, and the sweeper holds its own handle without the
//! daemon's lock.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{Array, HashMap, Map, MapData};
use moat_common::{
    FqdnAddr, FqdnAddrKeyV4, FqdnAddrKeyV6, FqdnConfig, FqdnName, FqdnPatternKey, map_name,
};

use crate::{Error, PinDir, Result};

/// One learned address: which identity may reach `addr`, and until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    pub identity: u32,
    pub addr: IpAddr,
    pub value: FqdnAddr,
}

pub struct FqdnMaps {
    pub config: Array<MapData, FqdnConfig>,
    pub patterns: HashMap<MapData, FqdnPatternKey, u32>,
    pub v4: HashMap<MapData, FqdnAddrKeyV4, FqdnAddr>,
    pub v6: HashMap<MapData, FqdnAddrKeyV6, FqdnAddr>,
    pub names: HashMap<MapData, u64, FqdnName>,
}

fn pinned(pins: &PinDir, name: &'static str) -> Result<Map> {
    let path = pins.map(name);
    let missing = |source| Error::MissingMap {
        name,
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(missing)?;
    Map::from_map_data(data).map_err(|source| Error::MissingMap {
        name,
        path: path.display().to_string(),
        source,
    })
}

fn unexpected(name: &str) -> impl FnOnce(aya::maps::MapError) -> Error + '_ {
    move |source| Error::Map {
        context: format!("map {name} has an unexpected type"),
        source,
    }
}

/// An LRU hash, read and written through aya's HashMap API (same syscalls).
fn lru<K: aya::Pod, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>> {
    match pinned(pins, name)? {
        Map::LruHashMap(data) | Map::HashMap(data) => {
            HashMap::try_from(Map::HashMap(data)).map_err(unexpected(name))
        }
        _ => Err(Error::Map {
            context: format!("map {name} is not a hash"),
            source: aya::maps::MapError::InvalidMapType { map_type: 0 },
        }),
    }
}

fn map_err(context: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> Error {
    let context = context.into();
    move |source| Error::Map { context, source }
}

/// Removing what is not there is not an error: the kernel's LRU may have evicted it first.
fn ignore_missing(
    result: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The name text of a MOAT_FQDNNAME value (lossy: the kernel copies bytes from the wire).
pub fn name_text(name: &FqdnName) -> String {
    let len = (name.len as usize).min(name.bytes.len());
    String::from_utf8_lossy(&name.bytes[..len]).into_owned()
}

/// A MOAT_FQDNNAME value for `text` (tests, and what the kernel would write).
pub fn fqdn_name(text: &str) -> FqdnName {
    let mut name = FqdnName::default();
    let len = text.len().min(name.bytes.len());
    name.bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
    name.len = len as u32;
    name
}

impl FqdnMaps {
    pub fn open(pins: &PinDir) -> Result<Self> {
        Ok(Self {
            config: pinned(pins, map_name::FQDN_CONFIG)?
                .try_into()
                .map_err(unexpected(map_name::FQDN_CONFIG))?,
            patterns: pinned(pins, map_name::FQDN_PATTERNS)?
                .try_into()
                .map_err(unexpected(map_name::FQDN_PATTERNS))?,
            v4: lru(pins, map_name::FQDN_V4)?,
            v6: lru(pins, map_name::FQDN_V6)?,
            names: lru(pins, map_name::FQDN_NAMES)?,
        })
    }

    pub fn write_config(&mut self, config: &FqdnConfig) -> Result<()> {
        self.config
            .set(0, config, 0)
            .map_err(map_err("writing the FQDN config"))
    }

    pub fn read_config(&self) -> Result<FqdnConfig> {
        self.config
            .get(&0, 0)
            .map_err(map_err("reading the FQDN config"))
    }

    pub fn upsert_pattern(&mut self, key: &FqdnPatternKey, selector: u32) -> Result<()> {
        self.patterns
            .insert(key, selector, 0)
            .map_err(map_err(format!("writing FQDN pattern {key:?}")))
    }

    pub fn remove_pattern(&mut self, key: &FqdnPatternKey) -> Result<()> {
        ignore_missing(self.patterns.remove(key))
            .map_err(map_err(format!("removing FQDN pattern {key:?}")))
    }

    /// Every pattern entry: (identity, kind, name hash) -> selector identity.
    pub fn pattern_entries(&self) -> Vec<(FqdnPatternKey, u32)> {
        self.patterns.iter().filter_map(|r| r.ok()).collect()
    }

    /// Every learned address of both families. Entries the kernel evicts during the walk are
    /// skipped, not reported as errors.
    pub fn learned(&self) -> Vec<Learned> {
        let v4 = self
            .v4
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, value)| Learned {
                identity: k.identity,
                addr: IpAddr::V4(Ipv4Addr::from(k.addr)),
                value,
            });
        let v6 = self
            .v6
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, value)| Learned {
                identity: k.identity,
                addr: IpAddr::V6(Ipv6Addr::from(k.addr)),
                value,
            });
        v4.chain(v6).collect()
    }

    /// Writes a learned address as the kernel does (tests, and tools simulating answers).
    pub fn insert_learned(&mut self, identity: u32, addr: IpAddr, value: &FqdnAddr) -> Result<()> {
        match addr {
            IpAddr::V4(a) => self.v4.insert(
                FqdnAddrKeyV4 {
                    identity,
                    addr: a.octets(),
                },
                value,
                0,
            ),
            IpAddr::V6(a) => self.v6.insert(
                FqdnAddrKeyV6 {
                    identity,
                    addr: a.octets(),
                },
                value,
                0,
            ),
        }
        .map_err(map_err(format!("writing learned {addr} of {identity}")))
    }

    /// One learned address's current value (`None` when absent or evicted).
    pub fn get_learned(&self, identity: u32, addr: IpAddr) -> Option<FqdnAddr> {
        match addr {
            IpAddr::V4(a) => self.v4.get(
                &FqdnAddrKeyV4 {
                    identity,
                    addr: a.octets(),
                },
                0,
            ),
            IpAddr::V6(a) => self.v6.get(
                &FqdnAddrKeyV6 {
                    identity,
                    addr: a.octets(),
                },
                0,
            ),
        }
        .ok()
    }

    pub fn remove_learned(&mut self, identity: u32, addr: IpAddr) -> Result<()> {
        ignore_missing(match addr {
            IpAddr::V4(a) => self.v4.remove(&FqdnAddrKeyV4 {
                identity,
                addr: a.octets(),
            }),
            IpAddr::V6(a) => self.v6.remove(&FqdnAddrKeyV6 {
                identity,
                addr: a.octets(),
            }),
        })
        .map_err(map_err(format!("removing learned {addr} of {identity}")))
    }

    /// The question name a learned address came from, if the kernel still holds it.
    pub fn name(&self, name_hash: u64) -> Option<String> {
        self.names.get(&name_hash, 0).ok().map(|n| name_text(&n))
    }

    pub fn insert_name(&mut self, name_hash: u64, text: &str) -> Result<()> {
        self.names
            .insert(name_hash, fqdn_name(text), 0)
            .map_err(map_err(format!("writing FQDN name {text}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_overlong_ones_are_cut_to_the_map_value() {
        assert_eq!(name_text(&fqdn_name("api.example.com")), "api.example.com");
        let long = "a".repeat(400);
        let cut = fqdn_name(&long);
        assert_eq!(cut.len as usize, cut.bytes.len());
        assert_eq!(name_text(&FqdnName { len: 9999, ..cut }).len(), 256);
    }
}
