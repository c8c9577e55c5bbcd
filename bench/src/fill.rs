//! Filling a datapath's maps to a realistic large size: distinct policy keys over many
//! policy ids, remote identities, protocols, ports and both directions, and /32 ipcache
//! entries spread over 10.0.0.0/8. None of the filler can match a benchmarked packet: filler
//! remote identities are all >= FILLER_IDENTITY_MIN (benchmarked identities are below it and
//! never the wildcard), and filler addresses avoid the ranges the benchmark uses.

use std::{collections::HashSet, net::Ipv4Addr};

use anyhow::Result;
use ipnetwork::{IpNetwork, Ipv4Network};
use moat_common::*;
use moat_datapath::Maps;

use crate::util::Rng;

pub const FILLER_IDENTITY_MIN: u32 = 3000;

/// Adds random policy entries until MOAT_POLICY holds `policy_target` keys, and random /32s
/// until MOAT_IPCACHE4 holds `ipcache_target` entries. Returns the final counts, read back
/// from the maps.
pub fn fill(
    maps: &mut Maps,
    policy_target: usize,
    ipcache_target: usize,
) -> Result<(usize, usize)> {
    let mut rng = Rng::new(0x6d6f_6174_6265_6e63);

    let mut keys: HashSet<PolicyKey> = maps.policy.keys().filter_map(|k| k.ok()).collect();
    while keys.len() < policy_target {
        let key = PolicyKey {
            // Shares policy ids with the benchmarked endpoints (1000..1300), so their own
            // hash buckets are not artificially empty.
            policy_id: rng.range(256, 2256) as u32,
            remote_identity: rng.range(FILLER_IDENTITY_MIN as u64, 9000) as u32,
            dport: match rng.range(0, 4) {
                0 => 0,
                _ => rng.range(1, 65536) as u16,
            },
            proto: [PROTO_TCP, PROTO_UDP, PROTO_TCP, 0][rng.range(0, 4) as usize],
            direction: rng.range(0, 2) as u8,
        };
        if keys.insert(key) {
            let value = PolicyValue {
                rule_id: rule::FIRST_USER + rng.range(0, 50_000) as u32,
                action: if rng.range(0, 10) == 0 {
                    ACTION_DENY
                } else {
                    ACTION_ALLOW
                },
                ..PolicyValue::default()
            };
            maps.upsert_policy(&key, &value)?;
        }
    }

    let mut addrs: HashSet<[u8; 4]> = maps
        .ipcache_v4
        .keys()
        .filter_map(|k| k.ok())
        .map(|k| k.data().addr)
        .collect();
    while addrs.len() < ipcache_target {
        let a = [
            10,
            rng.range(0, 256) as u8,
            rng.range(0, 256) as u8,
            rng.range(1, 255) as u8,
        ];
        // 10.1/16: per-packet peers; 10.77/16: lab pods; 10.255/16: iptables filler.
        if matches!(a[1], 1 | 77 | 255) {
            continue;
        }
        if addrs.insert(a) {
            let net = Ipv4Network::new(Ipv4Addr::from(a), 32)?;
            let value = IpcacheValue {
                identity: rng.range(FILLER_IDENTITY_MIN as u64, 9000) as u32,
                ..Default::default()
            };
            maps.upsert_ipcache(IpNetwork::V4(net), &value)?;
        }
    }
    counts(maps)
}

/// (policy entries, IPv4 ipcache entries), counted by walking the maps.
pub fn counts(maps: &Maps) -> Result<(usize, usize)> {
    Ok((maps.policy.keys().count(), maps.ipcache_v4.keys().count()))
}
