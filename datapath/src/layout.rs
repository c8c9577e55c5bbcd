//! The expected shape of every pinned map. aya reuses whatever map sits at a pin path without
//! comparing it to the object, so before loading we check each existing pin ourselves and
//! refuse, naming the path, anything that does not match.

use std::{mem::size_of, path::Path};

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{MapInfo, MapType};
use moat_common::*;

use crate::{Error, PinDir, Result, sizes::MapSizes};

pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn spec(
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    }
}

/// Every map's shape at the default sizes.
pub fn specs() -> [MapSpec; 25] {
    specs_sized(&MapSizes::default())
}

/// Every map's shape, the sized ones at `sizes`.
pub fn specs_sized(sizes: &MapSizes) -> [MapSpec; 25] {
    let mut specs = [
        spec(
            map_name::ENDPOINTS,
            MapType::Hash,
            4,
            size_of::<EndpointInfo>(),
            map_size::ENDPOINTS,
        ),
        spec(
            map_name::IPCACHE_V4,
            MapType::LpmTrie,
            size_of::<LpmKey<IpcacheKeyV4>>(),
            size_of::<IpcacheValue>(),
            map_size::IPCACHE,
        ),
        spec(
            map_name::IPCACHE_V6,
            MapType::LpmTrie,
            size_of::<LpmKey<IpcacheKeyV6>>(),
            size_of::<IpcacheValue>(),
            map_size::IPCACHE,
        ),
        spec(
            map_name::HOSTS_V4,
            MapType::Hash,
            size_of::<IpcacheKeyV4>(),
            size_of::<IpcacheValue>(),
            map_size::IPCACHE,
        ),
        spec(
            map_name::HOSTS_V6,
            MapType::Hash,
            size_of::<IpcacheKeyV6>(),
            size_of::<IpcacheValue>(),
            map_size::IPCACHE,
        ),
        spec(
            map_name::POLICY,
            MapType::Hash,
            size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
            map_size::POLICY,
        ),
        spec(
            map_name::PORT_RANGES,
            MapType::Hash,
            size_of::<PortRangeKey>(),
            size_of::<PortRuleSet>(),
            map_size::PORT_RANGES,
        ),
        spec(
            map_name::CIDR_V4,
            MapType::LpmTrie,
            size_of::<LpmKey<CidrKeyV4>>(),
            size_of::<PortRuleSet>(),
            map_size::CIDR,
        ),
        spec(
            map_name::CIDR_V6,
            MapType::LpmTrie,
            size_of::<LpmKey<CidrKeyV6>>(),
            size_of::<PortRuleSet>(),
            map_size::CIDR,
        ),
        spec(
            map_name::CONNTRACK,
            MapType::LruHash,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            map_size::CONNTRACK,
        ),
        spec(
            map_name::FRAGMENTS,
            MapType::LruHash,
            size_of::<FragKey>(),
            size_of::<FragValue>(),
            map_size::FRAGMENTS,
        ),
        spec(map_name::CONFIG, MapType::Array, 4, size_of::<Config>(), 1),
        spec(
            map_name::RATE_LIMIT,
            MapType::PerCpuArray,
            4,
            size_of::<RateLimitState>(),
            1,
        ),
        spec(
            map_name::METRICS,
            MapType::PerCpuArray,
            4,
            size_of::<MetricValue>(),
            METRIC_SLOTS,
        ),
        spec(
            map_name::EVENTS,
            MapType::RingBuf,
            0,
            0,
            map_size::EVENTS_BYTES,
        ),
        spec(map_name::META, MapType::Array, 4, size_of::<Meta>(), 1),
        spec(
            map_name::THREAT_CONFIG,
            MapType::Array,
            4,
            size_of::<ThreatConfig>(),
            1,
        ),
        spec(
            map_name::THREATS,
            MapType::Array,
            4,
            size_of::<ThreatSlot>(),
            map_size::THREATS,
        ),
        spec(
            map_name::THREAT_EVENTS,
            MapType::RingBuf,
            0,
            0,
            map_size::THREAT_EVENTS_BYTES,
        ),
        spec(
            map_name::FQDN_CONFIG,
            MapType::Array,
            4,
            size_of::<FqdnConfig>(),
            1,
        ),
        spec(
            map_name::FQDN_PATTERNS,
            MapType::Hash,
            size_of::<FqdnPatternKey>(),
            4,
            map_size::FQDN_PATTERNS,
        ),
        spec(
            map_name::FQDN_V4,
            MapType::LruHash,
            size_of::<FqdnAddrKeyV4>(),
            size_of::<FqdnAddr>(),
            map_size::FQDN_ADDRS,
        ),
        spec(
            map_name::FQDN_V6,
            MapType::LruHash,
            size_of::<FqdnAddrKeyV6>(),
            size_of::<FqdnAddr>(),
            map_size::FQDN_ADDRS,
        ),
        spec(
            map_name::FQDN_NAMES,
            MapType::LruHash,
            8,
            size_of::<FqdnName>(),
            map_size::FQDN_NAMES,
        ),
        spec(
            map_name::DNS_QUERIES,
            MapType::LruHash,
            size_of::<DnsQueryKey>(),
            size_of::<DnsQuery>(),
            map_size::DNS_QUERIES,
        ),
    ];
    for spec in &mut specs {
        if let Some(size) = sizes.of_map(spec.name) {
            spec.max_entries = size;
        }
    }
    specs
}

/// What is pinned at a map's path.
#[derive(Debug, PartialEq, Eq)]
pub enum Pinned {
    Absent,
    Matches,
    /// The same map but for its size, which is configurable: the loader resizes it.
    OtherSize {
        entries: u32,
    },
}

/// Checks one pinned map against its spec. `Ok(false)` when nothing is pinned there yet; a
/// size other than the spec's is an incompatible layout here (see `inspect_pinned`).
pub fn check_pinned(path: &Path, spec: &MapSpec) -> Result<bool> {
    match inspect_pinned(path, spec, false)? {
        Pinned::Absent => Ok(false),
        Pinned::Matches => Ok(true),
        Pinned::OtherSize { .. } => unreachable!("sizes are not resizable here"),
    }
}

/// Compares the map pinned at `path` with `spec`. A type, key or value that differs is
/// another layout (refused, naming the pin); a size that differs is `OtherSize` when the
/// map's size is `resizable`, else also refused.
pub fn inspect_pinned(path: &Path, spec: &MapSpec, resizable: bool) -> Result<Pinned> {
    if !path.exists() {
        return Ok(Pinned::Absent);
    }
    let info = MapInfo::from_pin(path).map_err(|e| Error::IncompatibleLayout {
        path: path.display().to_string(),
        detail: format!("cannot read map info: {e}"),
    })?;
    let map_type = info.map_type().map_err(|e| Error::IncompatibleLayout {
        path: path.display().to_string(),
        detail: format!("unknown map type: {e}"),
    })?;
    let mut problems = Vec::new();
    if map_type != spec.map_type {
        problems.push(format!("type {map_type:?}, expected {:?}", spec.map_type));
    }
    if info.key_size() != spec.key_size {
        problems.push(format!(
            "key size {}, expected {}",
            info.key_size(),
            spec.key_size
        ));
    }
    if info.value_size() != spec.value_size {
        problems.push(format!(
            "value size {}, expected {}",
            info.value_size(),
            spec.value_size
        ));
    }
    let other_size = info.max_entries() != spec.max_entries;
    if other_size && (!resizable || !problems.is_empty()) {
        problems.push(format!(
            "max entries {}, expected {}",
            info.max_entries(),
            spec.max_entries
        ));
    }
    if !problems.is_empty() {
        return Err(Error::IncompatibleLayout {
            path: path.display().to_string(),
            detail: problems.join(", "),
        });
    }
    if other_size {
        Ok(Pinned::OtherSize {
            entries: info.max_entries(),
        })
    } else {
        Ok(Pinned::Matches)
    }
}

/// What is already pinned: how many maps, and which of them the loader must resize.
#[derive(Debug, Default)]
pub struct Existing {
    pub count: usize,
    /// (map name, pinned size, configured size)
    pub resize: Vec<(&'static str, u32, u32)>,
}

/// Checks every pinned map against the shapes at `sizes`.
pub fn check_all(pins: &PinDir, sizes: &MapSizes) -> Result<Existing> {
    let mut existing = Existing::default();
    for spec in specs_sized(sizes) {
        let resizable = sizes.of_map(spec.name).is_some();
        match inspect_pinned(&pins.map(spec.name), &spec, resizable)? {
            Pinned::Absent => {}
            Pinned::Matches => existing.count += 1,
            Pinned::OtherSize { entries } => {
                existing.count += 1;
                existing.resize.push((spec.name, entries, spec.max_entries));
            }
        }
    }
    Ok(existing)
}
