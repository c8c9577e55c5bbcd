//! The quarantine helpers on the real (pinned) maps: the endpoint flag is set and cleared
//! leaving the rest of the entry alone and never creates an entry, and cutting an endpoint's
//! connections deletes its own conntrack entries and those linked to it, nothing else.

mod support;

use moat_common::{CtKey, CtValue, ENDPOINT_FLAG_NO_DENY, ENDPOINT_FLAG_QUARANTINED, FAMILY_V4};

fn key(ifindex: u32, sport: u16) -> CtKey {
    CtKey {
        ifindex,
        saddr: [1, 0, 0, 0],
        daddr: [2, 0, 0, 0],
        sport,
        dport: 80,
        proto: moat_common::PROTO_TCP,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

fn value(peer_ifindex: u32) -> CtValue {
    CtValue {
        expires_ns: u64::MAX,
        peer_ifindex,
        ..Default::default()
    }
}

#[test]
fn the_quarantine_flag_is_set_and_cleared_in_place() {
    let dp = support::LoadedDatapath::new("qflag");
    let mut maps = dp.maps();
    let mut info = support::endpoint(300, &["10.9.0.1".parse().unwrap()]);
    info.flags = ENDPOINT_FLAG_NO_DENY;
    maps.upsert_endpoint(41, &info).unwrap();

    assert!(
        maps.set_endpoint_flag(41, ENDPOINT_FLAG_QUARANTINED, true)
            .unwrap()
    );
    let flagged = maps.endpoint(41).unwrap();
    assert_eq!(
        flagged.flags,
        ENDPOINT_FLAG_NO_DENY | ENDPOINT_FLAG_QUARANTINED
    );
    assert_eq!(
        moat_common::EndpointInfo {
            flags: info.flags,
            ..flagged
        },
        info,
        "only the flag changed"
    );
    assert!(
        maps.set_endpoint_flag(41, ENDPOINT_FLAG_QUARANTINED, false)
            .unwrap()
    );
    assert_eq!(maps.endpoint(41).unwrap(), info);

    assert!(
        !maps
            .set_endpoint_flag(42, ENDPOINT_FLAG_QUARANTINED, true)
            .unwrap()
    );
    assert!(maps.endpoint(42).is_none(), "no entry is created");
}

#[test]
fn cutting_an_endpoints_connections_deletes_its_own_and_linked_entries_only() {
    let dp = support::LoadedDatapath::new("qcut");
    let mut maps = dp.maps();
    maps.conntrack.insert(key(41, 1), value(0), 0).unwrap();
    maps.conntrack.insert(key(41, 2), value(43), 0).unwrap();
    maps.conntrack.insert(key(43, 3), value(41), 0).unwrap();
    maps.conntrack.insert(key(43, 4), value(0), 0).unwrap();
    maps.conntrack.insert(key(44, 5), value(45), 0).unwrap();

    assert_eq!(maps.cut_conntrack(41).unwrap(), 3);
    let mut left: Vec<u16> = maps
        .conntrack
        .keys()
        .filter_map(Result::ok)
        .map(|k| k.sport)
        .collect();
    left.sort();
    assert_eq!(left, [4, 5]);
    assert_eq!(maps.cut_conntrack(41).unwrap(), 0, "nothing left to cut");
}
