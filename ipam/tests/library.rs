//! The library API moat-cni calls, exercised against real state directories.

use std::collections::HashSet;
use std::sync::Arc;

use moat_cni_protocol::Attachment;
use moat_ipam::{IpamConfig, RangeConfig};

fn config(data_dir: &std::path::Path, subnets: &[&str]) -> IpamConfig {
    IpamConfig {
        plugin_type: "moat-ipam".into(),
        ranges: subnets
            .iter()
            .map(|s| {
                vec![RangeConfig {
                    subnet: s.parse().unwrap(),
                    range_start: None,
                    range_end: None,
                    gateway: None,
                }]
            })
            .collect(),
        routes: vec![],
        data_dir: Some(data_dir.to_path_buf()),
        reserved: vec![],
        dns: None,
    }
}

#[test]
fn concurrent_threads_never_share_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(config(dir.path(), &["10.40.0.0/24"]));
    let handles: Vec<_> = (0..8)
        .map(|thread| {
            let config = Arc::clone(&config);
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| {
                        moat_ipam::allocate("net", &format!("t{thread}-c{i}"), "eth0", &config)
                            .unwrap()[0]
                            .address
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for handle in handles {
        for address in handle.join().unwrap() {
            assert!(seen.insert(address), "{address} handed out twice");
        }
    }
    assert_eq!(seen.len(), 160);
}

#[test]
fn dual_stack_allocate_release_and_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &["10.41.0.0/24", "fd41::/120"]);
    let first = moat_ipam::allocate("net", "a", "eth0", &config).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first[0].address.is_ipv4() && first[1].address.is_ipv6());
    assert_eq!(
        moat_ipam::check("net", "a", "eth0", &config).unwrap(),
        first
    );
    moat_ipam::release("net", "a", "eth0", &config).unwrap();
    moat_ipam::release("net", "a", "eth0", &config).unwrap();
    assert!(moat_ipam::check("net", "a", "eth0", &config).is_err());
}

#[test]
fn networks_keep_separate_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &["10.42.0.0/24"]);
    let a = moat_ipam::allocate("net-a", "c", "eth0", &config).unwrap();
    let b = moat_ipam::allocate("net-b", "c", "eth0", &config).unwrap();
    assert_eq!(
        a, b,
        "each network starts from the beginning of its own range"
    );
}

#[test]
fn gc_returns_what_it_released() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &["10.43.0.0/24"]);
    for id in ["a", "b"] {
        moat_ipam::allocate("net", id, "eth0", &config).unwrap();
    }
    let released = moat_ipam::gc(
        "net",
        &[Attachment {
            container_id: "a".into(),
            ifname: "eth0".into(),
        }],
        &config,
    )
    .unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].container_id, "b");
    assert!(moat_ipam::gc("net", &[], &config).unwrap().len() == 1);
    assert!(!moat_ipam::is_exhausted("net", &config).unwrap());
}

#[test]
fn exhaustion_is_visible_to_status() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &["10.44.0.0/30"]);
    moat_ipam::allocate("net", "a", "eth0", &config).unwrap();
    moat_ipam::allocate("net", "b", "eth0", &config).unwrap();
    assert!(moat_ipam::is_exhausted("net", &config).unwrap());
    let err = moat_ipam::allocate("net", "c", "eth0", &config).unwrap_err();
    assert!(err.to_string().contains("no free IPv4 address"), "{err}");
}
