//! The FQDN map wrappers on the real (pinned) maps: pattern entries and the TTL settings
//! round-trip, learned addresses of both families are listed with their values and deleted
//! one by one (a second delete is no error), names are read back by hash, and the capped
//! counter moatd keeps in MOAT_METRICS adds up and survives reopening the maps.

mod support;

use std::net::IpAddr;

use moat_common::{
    FQDN_MATCH_EXACT, FQDN_MATCH_SUBDOMAIN, FqdnAddr, FqdnConfig, FqdnPatternKey,
    IDENTITY_FQDN_FIRST, METRIC_FQDN_CAPPED, fqdn_name_hash,
};
use moat_datapath::{FqdnMaps, layout};

fn pattern(identity: u32, kind: u8, name: &str) -> FqdnPatternKey {
    FqdnPatternKey {
        identity,
        kind,
        _pad: [0; 3],
        name_hash: fqdn_name_hash(name.as_bytes()).unwrap(),
    }
}

fn learned(expires_ns: u64, name: &str) -> FqdnAddr {
    FqdnAddr {
        expires_ns,
        learned_ns: 5,
        name_hash: fqdn_name_hash(name.as_bytes()).unwrap(),
        ttl: 30,
        count: 1,
        selectors: [IDENTITY_FQDN_FIRST, 0, 0, 0],
    }
}

#[test]
fn the_fqdn_maps_are_pinned_with_the_expected_layout() {
    let dp = support::LoadedDatapath::new("fqlay");
    for spec in layout::specs() {
        assert!(
            layout::check_pinned(&dp.pins.map(spec.name), &spec).unwrap(),
            "{} is not pinned",
            spec.name
        );
    }
}

#[test]
fn patterns_config_learned_addresses_and_names_round_trip() {
    let dp = support::LoadedDatapath::new("fqrt");
    let mut fqdn = FqdnMaps::open(&dp.pins).unwrap();

    let config = FqdnConfig {
        ttl_floor_s: 60,
        ttl_cap_s: 86_400,
    };
    fqdn.write_config(&config).unwrap();
    assert_eq!(fqdn.read_config().unwrap(), config);

    let exact = pattern(300, FQDN_MATCH_EXACT, "api.example.com");
    let wild = pattern(300, FQDN_MATCH_SUBDOMAIN, "example.org");
    fqdn.upsert_pattern(&exact, IDENTITY_FQDN_FIRST).unwrap();
    fqdn.upsert_pattern(&wild, IDENTITY_FQDN_FIRST + 1).unwrap();
    let mut entries = fqdn.pattern_entries();
    entries.sort();
    let mut expected = vec![
        (exact, IDENTITY_FQDN_FIRST),
        (wild, IDENTITY_FQDN_FIRST + 1),
    ];
    expected.sort();
    assert_eq!(entries, expected);
    fqdn.remove_pattern(&exact).unwrap();
    fqdn.remove_pattern(&exact).unwrap();
    assert_eq!(
        fqdn.pattern_entries(),
        vec![(wild, IDENTITY_FQDN_FIRST + 1)]
    );

    let v4: IpAddr = "203.0.113.7".parse().unwrap();
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    fqdn.insert_learned(300, v4, &learned(1_000, "api.example.com"))
        .unwrap();
    fqdn.insert_learned(301, v6, &learned(2_000, "www.example.org"))
        .unwrap();
    let mut all = fqdn.learned();
    all.sort_by_key(|l| l.identity);
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].identity, all[0].addr), (300, v4));
    assert_eq!(all[0].value, learned(1_000, "api.example.com"));
    assert_eq!((all[1].identity, all[1].addr), (301, v6));
    assert_eq!(all[1].value.expires_ns, 2_000);

    let hash = fqdn_name_hash(b"api.example.com").unwrap();
    fqdn.insert_name(hash, "api.example.com").unwrap();
    assert_eq!(fqdn.name(hash).as_deref(), Some("api.example.com"));
    assert_eq!(fqdn.name(hash ^ 1), None);

    fqdn.remove_learned(300, v4).unwrap();
    fqdn.remove_learned(300, v4).unwrap();
    let left: Vec<_> = fqdn.learned().iter().map(|l| l.addr).collect();
    assert_eq!(left, vec![v6]);
    fqdn.remove_learned(301, v6).unwrap();
    assert!(fqdn.learned().is_empty());
}

#[test]
fn the_capped_counter_adds_up_in_the_pinned_metrics() {
    let dp = support::LoadedDatapath::new("fqcap");
    let mut maps = dp.maps();
    assert_eq!(maps.special_counter(METRIC_FQDN_CAPPED).unwrap(), 0);
    maps.add_special_counter(METRIC_FQDN_CAPPED, 3).unwrap();
    maps.add_special_counter(METRIC_FQDN_CAPPED, 4).unwrap();
    drop(maps);
    assert_eq!(
        dp.maps().special_counter(METRIC_FQDN_CAPPED).unwrap(),
        7,
        "kept in the pinned map"
    );
}
