//! Typed access to the pinned maps. Opened from the pins, so any process (moatd, moat-cni,
//! moatctl, tests) can read and write the datapath state without loading programs.

use std::net::IpAddr;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key as LpmKey};
use ipnetwork::IpNetwork;
use moat_common::*;

use crate::{Error, PinDir, Result};

pub struct Maps {
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    pub ipcache_v4: LpmTrie<MapData, IpcacheKeyV4, IpcacheValue>,
    pub ipcache_v6: LpmTrie<MapData, IpcacheKeyV6, IpcacheValue>,
    /// Exact-match mirrors of the tries' host entries; kept by `upsert_ipcache`,
    /// `remove_ipcache` and `sync_host_cache`, never written on their own.
    pub hosts_v4: HashMap<MapData, IpcacheKeyV4, IpcacheValue>,
    pub hosts_v6: HashMap<MapData, IpcacheKeyV6, IpcacheValue>,
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    pub port_ranges: HashMap<MapData, PortRangeKey, PortRuleSet>,
    pub cidr_v4: LpmTrie<MapData, CidrKeyV4, PortRuleSet>,
    pub cidr_v6: LpmTrie<MapData, CidrKeyV6, PortRuleSet>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub config: Array<MapData, Config>,
    pub metrics: PerCpuArray<MapData, MetricValue>,
}

fn open(pins: &PinDir, name: &'static str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|source| Error::MissingMap {
        name,
        path: path.display().to_string(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| Error::MissingMap {
        name,
        path: path.display().to_string(),
        source,
    })
}

macro_rules! typed {
    ($pins:expr, $name:expr) => {{
        let map = open($pins, $name)?;
        map.try_into().map_err(|source| Error::Map {
            context: format!("map {} has an unexpected type", $name),
            source,
        })?
    }};
}

fn map_err(context: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> Error {
    let context = context.into();
    move |source| Error::Map { context, source }
}

/// The map update flag that only replaces an existing entry (uapi BPF_EXIST).
const BPF_EXIST: u64 = 2;

/// A key that is not there is not an error when removing: removal is idempotent.
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

/// One family's half of `Maps::sync_host_cache`: `addr` names a host key for set lookups.
fn sync_mirror<K, A>(
    trie: &LpmTrie<MapData, K, IpcacheValue>,
    hosts: &mut HashMap<MapData, K, IpcacheValue>,
    host_prefix: u32,
    addr: impl Fn(&K) -> A,
) -> Result<(usize, usize)>
where
    K: aya::Pod,
    A: std::hash::Hash + Eq,
{
    let wanted: Vec<(K, IpcacheValue)> = trie
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(k, _)| k.prefix_len() == host_prefix)
        .map(|(k, v)| (k.data(), v))
        .collect();
    let mut written = 0;
    for (host, value) in &wanted {
        if hosts.get(host, 0).ok() != Some(*value) {
            hosts
                .insert(host, value, 0)
                .map_err(map_err("syncing host cache"))?;
            written += 1;
        }
    }
    let keep: std::collections::HashSet<A> = wanted.iter().map(|(h, _)| addr(h)).collect();
    let stale: Vec<K> = hosts
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !keep.contains(&addr(k)))
        .collect();
    for host in &stale {
        ignore_missing(hosts.remove(host)).map_err(map_err("syncing host cache"))?;
    }
    Ok((written, stale.len()))
}

pub fn ipcache_key_v4(net: ipnetwork::Ipv4Network) -> LpmKey<IpcacheKeyV4> {
    LpmKey::new(
        net.prefix() as u32,
        IpcacheKeyV4 {
            addr: net.network().octets(),
        },
    )
}

pub fn ipcache_key_v6(net: ipnetwork::Ipv6Network) -> LpmKey<IpcacheKeyV6> {
    LpmKey::new(
        net.prefix() as u32,
        IpcacheKeyV6 {
            addr: net.network().octets(),
        },
    )
}

pub fn cidr_key_v4(
    policy_id: u32,
    direction: u8,
    net: ipnetwork::Ipv4Network,
) -> LpmKey<CidrKeyV4> {
    LpmKey::new(
        CIDR_KEY_FIXED_BITS + net.prefix() as u32,
        CidrKeyV4 {
            policy_id: policy_id.to_be_bytes(),
            direction,
            _pad: [0; 3],
            addr: net.network().octets(),
        },
    )
}

pub fn cidr_key_v6(
    policy_id: u32,
    direction: u8,
    net: ipnetwork::Ipv6Network,
) -> LpmKey<CidrKeyV6> {
    LpmKey::new(
        CIDR_KEY_FIXED_BITS + net.prefix() as u32,
        CidrKeyV6 {
            policy_id: policy_id.to_be_bytes(),
            direction,
            _pad: [0; 3],
            addr: net.network().octets(),
        },
    )
}

/// Totals of one metric slot across CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counter {
    pub verdict: u8,
    pub reason: u8,
    pub direction: u8,
    pub packets: u64,
    pub bytes: u64,
}

impl Maps {
    pub fn open(pins: &PinDir) -> Result<Self> {
        Ok(Self {
            endpoints: typed!(pins, map_name::ENDPOINTS),
            ipcache_v4: typed!(pins, map_name::IPCACHE_V4),
            ipcache_v6: typed!(pins, map_name::IPCACHE_V6),
            hosts_v4: typed!(pins, map_name::HOSTS_V4),
            hosts_v6: typed!(pins, map_name::HOSTS_V6),
            policy: typed!(pins, map_name::POLICY),
            port_ranges: typed!(pins, map_name::PORT_RANGES),
            cidr_v4: typed!(pins, map_name::CIDR_V4),
            cidr_v6: typed!(pins, map_name::CIDR_V6),
            conntrack: {
                // LRU hash maps are read through the HashMap API.
                let map = open(pins, map_name::CONNTRACK)?;
                let Map::LruHashMap(data) = map else {
                    return Err(Error::Map {
                        context: "conntrack map is not an LRU hash".into(),
                        source: aya::maps::MapError::InvalidMapType { map_type: 0 },
                    });
                };
                HashMap::try_from(Map::HashMap(data)).map_err(map_err("conntrack"))?
            },
            config: typed!(pins, map_name::CONFIG),
            metrics: typed!(pins, map_name::METRICS),
        })
    }

    pub fn upsert_endpoint(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<()> {
        self.endpoints
            .insert(ifindex, info, 0)
            .map_err(map_err(format!("writing endpoint {ifindex}")))
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        ignore_missing(self.endpoints.remove(&ifindex))
            .map_err(map_err(format!("removing endpoint {ifindex}")))
    }

    pub fn endpoint(&self, ifindex: u32) -> Option<EndpointInfo> {
        self.endpoints.get(&ifindex, 0).ok()
    }

    /// Writes an ipcache entry; a host entry (/32, /128) also goes to its exact-match mirror.
    /// Mirror first: a crash in between leaves the mirror ahead of the trie, which the next
    /// start's `sync_host_cache` and reconcile (reading the trie) put right.
    pub fn upsert_ipcache(&mut self, net: IpNetwork, value: &IpcacheValue) -> Result<()> {
        let context = || format!("writing ipcache {net}");
        match net {
            IpNetwork::V4(n) => {
                if n.prefix() == 32 {
                    let host = IpcacheKeyV4 {
                        addr: n.ip().octets(),
                    };
                    self.hosts_v4
                        .insert(host, value, 0)
                        .map_err(map_err(context()))?;
                }
                self.ipcache_v4.insert(&ipcache_key_v4(n), value, 0)
            }
            IpNetwork::V6(n) => {
                if n.prefix() == 128 {
                    let host = IpcacheKeyV6 {
                        addr: n.ip().octets(),
                    };
                    self.hosts_v6
                        .insert(host, value, 0)
                        .map_err(map_err(context()))?;
                }
                self.ipcache_v6.insert(&ipcache_key_v6(n), value, 0)
            }
        }
        .map_err(map_err(context()))
    }

    /// Removes an ipcache entry, from the mirror first: a crash in between leaves the trie's
    /// entry, which answers as before until the next reconcile removes it.
    pub fn remove_ipcache(&mut self, net: IpNetwork) -> Result<()> {
        let context = || format!("removing ipcache {net}");
        match net {
            IpNetwork::V4(n) => {
                if n.prefix() == 32 {
                    let host = IpcacheKeyV4 {
                        addr: n.ip().octets(),
                    };
                    ignore_missing(self.hosts_v4.remove(&host)).map_err(map_err(context()))?;
                }
                ignore_missing(self.ipcache_v4.remove(&ipcache_key_v4(n)))
            }
            IpNetwork::V6(n) => {
                if n.prefix() == 128 {
                    let host = IpcacheKeyV6 {
                        addr: n.ip().octets(),
                    };
                    ignore_missing(self.hosts_v6.remove(&host)).map_err(map_err(context()))?;
                }
                ignore_missing(self.ipcache_v6.remove(&ipcache_key_v6(n)))
            }
        }
        .map_err(map_err(context()))
    }

    /// Makes the exact-match mirrors hold exactly the tries' host entries: after a crash
    /// between the two writes, or on maps pinned before the mirrors existed. Returns
    /// (entries written, entries removed).
    pub fn sync_host_cache(&mut self) -> Result<(usize, usize)> {
        let v4 = sync_mirror(&self.ipcache_v4, &mut self.hosts_v4, 32, |k| k.addr)?;
        let v6 = sync_mirror(&self.ipcache_v6, &mut self.hosts_v6, 128, |k| k.addr)?;
        Ok((v4.0 + v6.0, v4.1 + v6.1))
    }

    /// Longest-prefix lookup, as the datapath does it.
    pub fn lookup_ipcache(&self, addr: IpAddr) -> Option<IpcacheValue> {
        match addr {
            IpAddr::V4(a) => self
                .ipcache_v4
                .get(&LpmKey::new(32, IpcacheKeyV4 { addr: a.octets() }), 0)
                .ok(),
            IpAddr::V6(a) => self
                .ipcache_v6
                .get(&LpmKey::new(128, IpcacheKeyV6 { addr: a.octets() }), 0)
                .ok(),
        }
    }

    pub fn upsert_policy(&mut self, key: &PolicyKey, value: &PolicyValue) -> Result<()> {
        self.policy
            .insert(key, value, 0)
            .map_err(map_err(format!("writing policy entry {key:?}")))
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) -> Result<()> {
        ignore_missing(self.policy.remove(key))
            .map_err(map_err(format!("removing policy entry {key:?}")))
    }

    pub fn upsert_port_ranges(&mut self, key: &PortRangeKey, rules: &PortRuleSet) -> Result<()> {
        self.port_ranges
            .insert(key, rules, 0)
            .map_err(map_err(format!("writing port ranges {key:?}")))
    }

    pub fn remove_port_ranges(&mut self, key: &PortRangeKey) -> Result<()> {
        ignore_missing(self.port_ranges.remove(key))
            .map_err(map_err(format!("removing port ranges {key:?}")))
    }

    pub fn upsert_cidr(
        &mut self,
        policy_id: u32,
        direction: u8,
        net: IpNetwork,
        rules: &PortRuleSet,
    ) -> Result<()> {
        match net {
            IpNetwork::V4(n) => {
                self.cidr_v4
                    .insert(&cidr_key_v4(policy_id, direction, n), rules, 0)
            }
            IpNetwork::V6(n) => {
                self.cidr_v6
                    .insert(&cidr_key_v6(policy_id, direction, n), rules, 0)
            }
        }
        .map_err(map_err(format!("writing CIDR rules {net} for {policy_id}")))
    }

    pub fn remove_cidr(&mut self, policy_id: u32, direction: u8, net: IpNetwork) -> Result<()> {
        ignore_missing(match net {
            IpNetwork::V4(n) => self.cidr_v4.remove(&cidr_key_v4(policy_id, direction, n)),
            IpNetwork::V6(n) => self.cidr_v6.remove(&cidr_key_v6(policy_id, direction, n)),
        })
        .map_err(map_err(format!(
            "removing CIDR rules {net} for {policy_id}"
        )))
    }

    pub fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config
            .set(0, config, 0)
            .map_err(map_err("writing config"))
    }

    /// Conntrack entries of one endpoint (by host-side ifindex), each keyed by the tuple of the
    /// flow's first packet (the map stores one end order for both directions; see `CtKey`).
    pub fn conntrack_entries(&self, ifindex: Option<u32>) -> Vec<(CtKey, CtValue)> {
        self.conntrack
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| ifindex.is_none_or(|i| k.ifindex == i))
            .map(|(k, v)| {
                if v.flags & CT_FLAG_KEY_REVERSED != 0 {
                    (k.reversed(), v)
                } else {
                    (k, v)
                }
            })
            .collect()
    }

    /// Drops an endpoint's connection state (on DEL): nothing of a gone pod stays behind.
    /// Entries of other endpoints linked to it (`CtValue::peer_ifindex`) are unlinked, so
    /// that no packet is handed over as admitted by a perimeter that no longer exists.
    pub fn flush_conntrack(&mut self, ifindex: u32) -> Result<usize> {
        let mut own = Vec::new();
        let mut linked = Vec::new();
        for (key, value) in self.conntrack.iter().filter_map(|r| r.ok()) {
            if key.ifindex == ifindex {
                own.push(key);
            } else if value.peer_ifindex == ifindex {
                linked.push((key, value));
            }
        }
        for key in &own {
            ignore_missing(self.conntrack.remove(key))
                .map_err(map_err("removing conntrack entry"))?;
        }
        for (key, value) in linked {
            let unlinked = CtValue {
                peer_ifindex: 0,
                ..value
            };
            // BPF_EXIST: an entry evicted meanwhile is not brought back.
            ignore_missing(self.conntrack.insert(key, unlinked, BPF_EXIST))
                .map_err(map_err("unlinking conntrack entry"))?;
        }
        Ok(own.len())
    }

    /// Sets or clears `flag` in an endpoint's entry, keeping the rest of it. Only replaces an
    /// existing entry (an endpoint removed meanwhile is not brought back); `Ok(false)` when
    /// there is none. moatd's own endpoint writes carry the same bit (see `EndpointRecord`),
    /// so a later rewrite of the entry does not undo this.
    pub fn set_endpoint_flag(&mut self, ifindex: u32, flag: u8, on: bool) -> Result<bool> {
        let Some(mut info) = self.endpoint(ifindex) else {
            return Ok(false);
        };
        if on {
            info.flags |= flag;
        } else {
            info.flags &= !flag;
        }
        match self.endpoints.insert(ifindex, info, BPF_EXIST) {
            Ok(()) => Ok(true),
            Err(e) => match ignore_missing(Err(e)) {
                Ok(()) => Ok(false),
                Err(e) => Err(map_err(format!("writing endpoint {ifindex}"))(e)),
            },
        }
    }

    /// Deletes every connection of an endpoint: its own entries and those of other endpoints
    /// linked to it. Used when it is quarantined, so that its established connections end at
    /// once: its next packets are judged as new flows. Returns the entries deleted.
    pub fn cut_conntrack(&mut self, ifindex: u32) -> Result<usize> {
        let doomed: Vec<CtKey> = self
            .conntrack
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v)| k.ifindex == ifindex || v.peer_ifindex == ifindex)
            .map(|(k, _)| k)
            .collect();
        for key in &doomed {
            ignore_missing(self.conntrack.remove(key))
                .map_err(map_err("removing conntrack entry"))?;
        }
        Ok(doomed.len())
    }

    /// Every non-zero counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>> {
        let mut out = Vec::new();
        for verdict in 0..VERDICT_COUNT as u8 {
            for reason in 0..reason::COUNT as u8 {
                for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
                    let values = self
                        .metrics
                        .get(&metric_index(verdict, reason, direction), 0)
                        .map_err(map_err("reading metrics"))?;
                    let (packets, bytes) = values
                        .iter()
                        .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
                    if packets > 0 {
                        out.push(Counter {
                            verdict,
                            reason,
                            direction,
                            packets,
                            bytes,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Sum of one special counter (see METRIC_EVENTS_*).
    pub fn special_counter(&self, index: u32) -> Result<u64> {
        let values = self
            .metrics
            .get(&index, 0)
            .map_err(map_err("reading metrics"))?;
        Ok(values.iter().map(|v| v.packets).sum())
    }

    /// Adds `n` to a special counter that userspace keeps (METRIC_FQDN_CAPPED): in the pinned
    /// map rather than in moatd's memory so that it survives moatd restarts. Only moatd
    /// writes such a slot, so read-add-write does not race with the kernel.
    pub fn add_special_counter(&mut self, index: u32, n: u64) -> Result<()> {
        let mut values: Vec<MetricValue> = self
            .metrics
            .get(&index, 0)
            .map_err(map_err("reading metrics"))?
            .iter()
            .copied()
            .collect();
        let Some(first) = values.first_mut() else {
            return Ok(());
        };
        first.packets = first.packets.saturating_add(n);
        let values = aya::maps::PerCpuValues::try_from(values).map_err(|e| Error::Map {
            context: format!("writing metric slot {index}: {e}"),
            source: aya::maps::MapError::InvalidMapType { map_type: 0 },
        })?;
        self.metrics
            .set(index, values, 0)
            .map_err(map_err(format!("writing metric slot {index}")))
    }

    /// Packets counted for (verdict, reason, direction), summed over CPUs.
    pub fn count(&self, verdict: u8, reason: u8, direction: u8) -> Result<u64> {
        let values = self
            .metrics
            .get(&metric_index(verdict, reason, direction), 0)
            .map_err(map_err("reading metrics"))?;
        Ok(values.iter().map(|v| v.packets).sum())
    }
}
