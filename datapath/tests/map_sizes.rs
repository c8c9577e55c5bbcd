//! Configured map sizes on the real kernel: maps are created at the configured size; a
//! pinned map of another size is resized with its entries carried over (policy and
//! conntrack here); a resize to fewer entries than a hash map holds is refused naming the
//! map, and the old map, with its size and entries, stays pinned in place.

mod support;

use moat_common::{PolicyKey, PolicyValue, map_name};
use moat_datapath::{Datapath, MapSizes, PinDir, fill::map_fill};

fn policy_key(i: u32) -> PolicyKey {
    PolicyKey {
        policy_id: 7,
        remote_identity: 1000 + i,
        dport: 80,
        proto: 6,
        direction: 1,
    }
}

fn allow(rule_id: u32) -> PolicyValue {
    PolicyValue {
        rule_id,
        action: moat_common::ACTION_ALLOW,
        ..Default::default()
    }
}

/// (entries, capacity) of one map by its short name.
fn fill(pins: &PinDir, name: &str) -> (u64, u64) {
    let f = map_fill(pins)
        .into_iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("{name} not reported"));
    (f.entries, f.capacity)
}

#[test]
fn pinned_maps_are_resized_to_the_configured_size_keeping_their_entries() {
    let dp = support::LoadedDatapath::new("sizes");
    let pins = dp.pins.clone();
    {
        let mut maps = dp.maps();
        for i in 0..100 {
            maps.upsert_policy(&policy_key(i), &allow(i + 1)).unwrap();
        }
    }
    assert_eq!(
        fill(&pins, "policy"),
        (100, moat_common::map_size::POLICY as u64)
    );

    let sizes: MapSizes = "policy=1024,conntrack=2048".parse().unwrap();
    let resized = Datapath::load_sized(&pins, &sizes).expect("load with new sizes");
    assert!(resized.adopted);
    assert_eq!(fill(&pins, "policy"), (100, 1024));
    assert_eq!(fill(&pins, "conntrack").1, 2048);
    {
        let data = aya::maps::MapData::from_pin(pins.map(map_name::POLICY)).unwrap();
        let policy: aya::maps::HashMap<_, PolicyKey, PolicyValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        for i in 0..100 {
            assert_eq!(
                policy.get(&policy_key(i), 0).unwrap(),
                allow(i + 1),
                "entry {i} carried over"
            );
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(pins.maps())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with(moat_datapath::resize::ASIDE_SUFFIX)
        })
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "old pins left: {leftovers:?}");

    // Loading again at the same sizes adopts the maps as they are.
    drop(resized);
    let again = Datapath::load_sized(&pins, &sizes).expect("reload");
    assert_eq!(fill(&pins, "policy"), (100, 1024));
    drop(again);

    // 100 entries do not fit in 64: refused, naming the map; the 1024-entry map stays.
    let too_small: MapSizes = "policy=64".parse().unwrap();
    let err = match Datapath::load_sized(&pins, &too_small) {
        Ok(_) => panic!("resized a map below what it holds"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(map_name::POLICY), "{err}");
    assert!(err.contains("from 1024 to 64"), "{err}");
    assert_eq!(fill(&pins, "policy"), (100, 1024));
    assert!(
        !pins
            .map(&format!(
                "{}{}",
                map_name::POLICY,
                moat_datapath::resize::ASIDE_SUFFIX
            ))
            .exists()
    );
}
