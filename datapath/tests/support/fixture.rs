//! The datapath fixture that verdicts.rs and fuzz_packets.rs share: the real programs loaded
//! in a private pin directory, one enforcing endpoint on a device of its own, and the
//! ipcache entries its packets meet (a peer pod, a Service range, the node).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use moat_common::{IDENTITY_HOST, IDENTITY_WORLD, IPCACHE_FLAG_SERVICE, IpcacheValue};
use moat_datapath::{EventReader, Maps};
use moat_testkit::testrun::{Hook, TestRunner};

use super::{DummyLink, LoadedDatapath, endpoint};

pub const POD: u32 = 1000;
pub const PEER: u32 = 2000;

pub fn pod_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1))
}
pub fn peer_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2))
}
pub fn pod_v6() -> IpAddr {
    IpAddr::V6("fd00:1::1".parse::<Ipv6Addr>().unwrap())
}
pub fn peer_v6() -> IpAddr {
    IpAddr::V6("fd00:1::2".parse::<Ipv6Addr>().unwrap())
}
pub fn service_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))
}
pub fn host_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 168, 77, 1))
}
pub fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

/// One endpoint (identity POD, addresses 10.1.0.1 and fd00:1::1) on a dummy device, a peer
/// pod (PEER) known to the ipcache, a Service range and a host address.
pub struct Fixture {
    pub dp: LoadedDatapath,
    _link: DummyLink,
    pub ifindex: u32,
    pub maps: Maps,
    pub runner: TestRunner,
    pub events: EventReader,
}

impl Fixture {
    pub fn new(test: &str) -> Self {
        let dp = LoadedDatapath::new(test);
        let link = DummyLink::new();
        let mut maps = dp.maps();
        maps.upsert_endpoint(link.ifindex, &endpoint(POD, &[pod_v4(), pod_v6()]))
            .unwrap();
        let peer = IpcacheValue {
            identity: PEER,
            ..Default::default()
        };
        maps.upsert_ipcache(net("10.1.0.2/32"), &peer).unwrap();
        maps.upsert_ipcache(net("fd00:1::2/128"), &peer).unwrap();
        maps.upsert_ipcache(
            net("10.96.0.0/12"),
            &IpcacheValue {
                identity: IDENTITY_WORLD,
                flags: IPCACHE_FLAG_SERVICE,
                ..Default::default()
            },
        )
        .unwrap();
        maps.upsert_ipcache(
            net("192.168.77.1/32"),
            &IpcacheValue {
                identity: IDENTITY_HOST,
                ..Default::default()
            },
        )
        .unwrap();
        let runner = TestRunner::open(&dp.pins).unwrap();
        let events = EventReader::open(&dp.pins).unwrap();
        Self {
            ifindex: link.ifindex,
            dp,
            _link: link,
            maps,
            runner,
            events,
        }
    }

    pub fn run_raw(&self, hook: Hook, frame: &[u8]) -> u32 {
        self.runner
            .run(hook, self.ifindex, frame, 1)
            .unwrap()
            .verdict
    }
}
