//! `moatctl fqdn`: per identity, its name patterns and what the datapath learned for it,
//! built from a snapshot of the maps and what moatd knows of its identities (pure).

use std::collections::BTreeMap;

use moat_common::{FqdnPatternKey, MAX_FQDN_SELECTORS};
use moat_datapath::fqdn::Learned;

use crate::api::{FqdnIdentity, FqdnLearned, FqdnSelector};

/// What the listing shows of an identity besides the maps: its labels and local pods.
#[derive(Clone, Debug, Default)]
pub struct IdentityInfo {
    pub labels: BTreeMap<String, String>,
    pub pods: Vec<String>,
}

/// The snapshot a listing is made from.
pub struct Snapshot<'a> {
    pub learned: &'a [Learned],
    pub patterns: &'a [(FqdnPatternKey, u32)],
    pub identities: &'a BTreeMap<u32, IdentityInfo>,
    pub now_ns: u64,
}

const NS_PER_S: u64 = 1_000_000_000;

/// The row of `identity`, made on first use with what moatd knows of it.
fn row<'r>(
    rows: &'r mut BTreeMap<u32, FqdnIdentity>,
    identities: &BTreeMap<u32, IdentityInfo>,
    identity: u32,
) -> &'r mut FqdnIdentity {
    rows.entry(identity).or_insert_with(|| {
        let info = identities.get(&identity);
        FqdnIdentity {
            identity,
            labels: info.map(|i| i.labels.clone()).unwrap_or_default(),
            pods: info.map(|i| i.pods.clone()).unwrap_or_default(),
            ..Default::default()
        }
    })
}

/// One row per identity that has patterns or learned addresses, in identity order.
pub fn build(
    snapshot: &Snapshot,
    selector_text: impl Fn(u32) -> Option<String>,
    name_of: impl Fn(u64) -> Option<String>,
) -> Vec<FqdnIdentity> {
    let mut rows: BTreeMap<u32, FqdnIdentity> = BTreeMap::new();
    for (key, selector) in snapshot.patterns {
        let r = row(&mut rows, snapshot.identities, key.identity);
        if !r.selectors.iter().any(|s| s.selector == *selector) {
            r.selectors.push(FqdnSelector {
                selector: *selector,
                pattern: selector_text(*selector).unwrap_or_default(),
            });
        }
    }
    for entry in snapshot.learned {
        let v = &entry.value;
        row(&mut rows, snapshot.identities, entry.identity)
            .learned
            .push(FqdnLearned {
                name: name_of(v.name_hash).unwrap_or_default(),
                address: entry.addr,
                ttl: v.ttl,
                expires_in_secs: v
                    .expires_ns
                    .saturating_sub(snapshot.now_ns)
                    .div_ceil(NS_PER_S),
                age_secs: snapshot.now_ns.saturating_sub(v.learned_ns) / NS_PER_S,
                selectors: v.selectors[..MAX_FQDN_SELECTORS]
                    .iter()
                    .copied()
                    .filter(|s| *s != 0)
                    .collect(),
                count: v.count,
            });
    }
    let mut out: Vec<FqdnIdentity> = rows.into_values().collect();
    for r in &mut out {
        r.selectors.sort_by_key(|s| s.selector);
        r.learned
            .sort_by(|a, b| (&a.name, a.address).cmp(&(&b.name, b.address)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_common::{FQDN_MATCH_EXACT, FqdnAddr, IDENTITY_FQDN_FIRST};

    #[test]
    fn rows_join_patterns_learned_addresses_names_and_labels() {
        let sel = IDENTITY_FQDN_FIRST + 5;
        let patterns = [(
            FqdnPatternKey {
                identity: 300,
                kind: FQDN_MATCH_EXACT,
                _pad: [0; 3],
                name_hash: 42,
            },
            sel,
        )];
        let learned = [
            Learned {
                identity: 300,
                addr: "203.0.113.9".parse().unwrap(),
                value: FqdnAddr {
                    expires_ns: 100 * NS_PER_S + 1,
                    learned_ns: 40 * NS_PER_S,
                    name_hash: 42,
                    ttl: 1,
                    count: 3,
                    selectors: [sel, 0, 0, 0],
                },
            },
            Learned {
                identity: 301,
                addr: "2001:db8::1".parse().unwrap(),
                value: FqdnAddr {
                    expires_ns: 10 * NS_PER_S,
                    name_hash: 7,
                    ..Default::default()
                },
            },
        ];
        let identities = BTreeMap::from([(
            300,
            IdentityInfo {
                labels: BTreeMap::from([("app".into(), "client".into())]),
                pods: vec!["ns/client".into()],
            },
        )]);
        let rows = build(
            &Snapshot {
                learned: &learned,
                patterns: &patterns,
                identities: &identities,
                now_ns: 50 * NS_PER_S,
            },
            |s| (s == sel).then(|| "api.example.com".to_string()),
            |h| (h == 42).then(|| "api.example.com".to_string()),
        );
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!(
            (r.identity, r.pods.clone()),
            (300, vec!["ns/client".into()])
        );
        assert_eq!(r.labels["app"], "client");
        assert_eq!(r.selectors[0].pattern, "api.example.com");
        let l = &r.learned[0];
        assert_eq!(l.name, "api.example.com");
        assert_eq!((l.ttl, l.expires_in_secs, l.age_secs), (1, 51, 10));
        assert_eq!((l.selectors.clone(), l.count), (vec![sel], 3));
        // An identity moatd does not know, with an expired address and an evicted name.
        let gone = &rows[1];
        assert!(gone.labels.is_empty() && gone.selectors.is_empty());
        assert_eq!(gone.learned[0].expires_in_secs, 0);
        assert_eq!(gone.learned[0].name, "");
    }
}
