//! A detection from the datapath, explained: addresses resolved to pods and identities like
//! the flow journal does for verdicts, the sketch turned back into a distinct count, and the
//! samples into ports or addresses.

use std::net::IpAddr;

use moat_common::{FAMILY_V4, ThreatEvent, threat, v4_from_raw, v6_from_raw};
use moat_datapath::threats::estimate_distinct;

use super::Response;
use crate::api::ThreatRecord;

/// What moatd knows about addresses and endpoints, for explaining.
pub trait Directory {
    /// The pod (namespace/name) that has the address.
    fn pod_of_address(&self, addr: IpAddr) -> Option<String>;
    /// The identity the datapath gives the address (0 unknown).
    fn identity_of_address(&self, addr: IpAddr) -> u32;
    /// The local endpoint's pod with that host-side ifindex.
    fn pod_of_ifindex(&self, ifindex: u32) -> Option<String>;
    /// The identity of a local endpoint's pod.
    fn identity_of_pod(&self, pod: &str) -> u32;
}

fn address(family: u8, raw: [u32; 4]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(v4_from_raw(raw[0]))
    } else {
        IpAddr::V6(v6_from_raw(raw))
    }
}

pub fn protocol_name(proto: u8) -> String {
    match proto {
        0 => String::new(),
        moat_common::PROTO_TCP => "TCP".into(),
        moat_common::PROTO_UDP => "UDP".into(),
        moat_common::PROTO_SCTP => "SCTP".into(),
        moat_common::PROTO_ICMP => "ICMP".into(),
        moat_common::PROTO_ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

/// Port-scan samples are two ports per word (low half first); host-sweep samples (the
/// addresses swept) and SYN-flood samples (the first sources) one IPv4 address or the last
/// 32 bits of an IPv6 one; zero is an empty slot.
fn samples(e: &ThreatEvent) -> Vec<String> {
    match e.kind {
        threat::PORT_SCAN => e
            .samples
            .iter()
            .flat_map(|w| [w & 0xffff, w >> 16])
            .filter(|p| *p != 0)
            .map(|p| p.to_string())
            .collect(),
        threat::HOST_SWEEP | threat::SYN_FLOOD => e
            .samples
            .iter()
            .filter(|w| **w != 0)
            .map(|w| {
                if e.family == FAMILY_V4 {
                    v4_from_raw(*w).to_string()
                } else {
                    let o = w.to_ne_bytes();
                    let (hi, lo) = (
                        u16::from_be_bytes([o[0], o[1]]),
                        u16::from_be_bytes([o[2], o[3]]),
                    );
                    format!("…:{hi:x}:{lo:x}")
                }
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub fn explain(
    e: &ThreatEvent,
    dir: &impl Directory,
    mono_now_ns: u64,
    wall_now_ms: u64,
    response: Response,
) -> ThreatRecord {
    let src = address(e.family, e.src);
    let age_ms = mono_now_ns.saturating_sub(e.timestamp_ns) / 1_000_000;
    let (source_pod, source_identity, destination, destination_pod) = if e.kind == threat::SPOOFING
    {
        // The forged address says nothing about who sent it: the endpoint does.
        let pod = dir.pod_of_ifindex(e.dst[0]);
        let identity = pod.as_deref().map_or(0, |p| dir.identity_of_pod(p));
        (pod, identity, String::new(), None)
    } else if e.kind == threat::SYN_FLOOD {
        // A flood has no one source (its sources are often forged): the slot is the victim's,
        // and the first sources seen are in the samples. An IPv4 first source is named here;
        // an IPv6 sample keeps only the address's last 32 bits.
        let first = (e.family == FAMILY_V4 && e.samples[0] != 0)
            .then(|| IpAddr::V4(v4_from_raw(e.samples[0])));
        let dst = address(e.family, e.dst);
        (
            first.and_then(|a| dir.pod_of_address(a)),
            first.map_or(0, |a| dir.identity_of_address(a)),
            dst.to_string(),
            dir.pod_of_address(dst),
        )
    } else {
        let dst = (e.dst != [0; 4]).then(|| address(e.family, e.dst));
        (
            dir.pod_of_address(src),
            dir.identity_of_address(src),
            dst.map(|d| d.to_string()).unwrap_or_default(),
            dst.and_then(|d| dir.pod_of_address(d)),
        )
    };
    let distinct = matches!(
        e.kind,
        threat::PORT_SCAN | threat::HOST_SWEEP | threat::DNS_TUNNEL | threat::SYN_FLOOD
    )
    .then(|| estimate_distinct(e.sketch_bits));
    let source = if e.kind == threat::SYN_FLOOD {
        samples(e).into_iter().next().unwrap_or_default()
    } else {
        src.to_string()
    };
    ThreatRecord {
        time_ms: wall_now_ms.saturating_sub(age_ms),
        kind: threat::name(e.kind).into(),
        source,
        source_pod,
        source_identity,
        destination,
        destination_pod,
        endpoint: (e.ifindex != 0)
            .then(|| dir.pod_of_ifindex(e.ifindex))
            .flatten(),
        protocol: protocol_name(e.proto),
        port: e.port,
        count: e.count,
        distinct,
        refused: (e.kind == threat::PORT_SCAN).then_some(e.marks),
        half_open: (e.kind == threat::SYN_FLOOD).then(|| e.count.saturating_sub(e.marks)),
        suspicious: (e.kind == threat::DNS_TUNNEL).then_some(e.marks),
        samples: samples(e),
        window_ms: e.timestamp_ns.saturating_sub(e.window_start_ns) / 1_000_000,
        response: response.name().into(),
        action: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_common::{FAMILY_V6, PROTO_TCP, raw_v4};
    use std::net::Ipv4Addr;

    struct Node;
    impl Directory for Node {
        fn pod_of_address(&self, addr: IpAddr) -> Option<String> {
            (addr == IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))).then(|| "prod/scanner".into())
        }
        fn identity_of_address(&self, addr: IpAddr) -> u32 {
            if self.pod_of_address(addr).is_some() {
                300
            } else {
                2
            }
        }
        fn pod_of_ifindex(&self, ifindex: u32) -> Option<String> {
            (ifindex == 7).then(|| "prod/scanner".into())
        }
        fn identity_of_pod(&self, _: &str) -> u32 {
            300
        }
    }

    fn raw(a: Ipv4Addr) -> [u32; 4] {
        [raw_v4(a), 0, 0, 0]
    }

    #[test]
    fn a_port_scan_names_its_pod_ports_and_distinct_estimate() {
        let e = ThreatEvent {
            kind: threat::PORT_SCAN,
            family: FAMILY_V4,
            proto: PROTO_TCP,
            src: raw(Ipv4Addr::new(10, 0, 0, 5)),
            dst: raw(Ipv4Addr::new(10, 0, 0, 9)),
            ifindex: 7,
            count: 40,
            marks: 35,
            sketch_bits: 22,
            samples: [22 | 80 << 16, 443, 0, 0],
            timestamp_ns: 5_000_000_000,
            window_start_ns: 2_000_000_000,
            ..Default::default()
        };
        let r = explain(&e, &Node, 6_000_000_000, 100_000, Response::Quarantine);
        assert_eq!(r.time_ms, 99_000);
        assert_eq!(r.kind, "port-scan");
        assert_eq!(r.source_pod.as_deref(), Some("prod/scanner"));
        assert_eq!(r.source_identity, 300);
        assert_eq!(r.destination, "10.0.0.9");
        assert_eq!(r.endpoint.as_deref(), Some("prod/scanner"));
        assert_eq!(r.distinct, Some(23));
        assert_eq!(r.refused, Some(35));
        assert_eq!(r.half_open, None);
        assert_eq!(r.samples, ["22", "80", "443"]);
        assert_eq!(r.window_ms, 3_000);
        assert_eq!(r.response, "quarantine");
    }

    #[test]
    fn spoofing_is_blamed_on_the_endpoint_not_the_forged_address() {
        let e = ThreatEvent {
            kind: threat::SPOOFING,
            family: FAMILY_V4,
            src: raw(Ipv4Addr::new(192, 0, 2, 1)),
            dst: [7, 0, 0, 0],
            ifindex: 7,
            count: 1,
            ..Default::default()
        };
        let r = explain(&e, &Node, 0, 0, Response::Log);
        assert_eq!(r.source, "192.0.2.1");
        assert_eq!(r.source_pod.as_deref(), Some("prod/scanner"));
        assert_eq!(r.source_identity, 300);
        assert_eq!(r.destination, "");
    }

    #[test]
    fn syn_floods_count_half_open_and_sweeps_show_addresses() {
        let flood = ThreatEvent {
            kind: threat::SYN_FLOOD,
            family: FAMILY_V4,
            proto: PROTO_TCP,
            port: 443,
            count: 600,
            marks: 10,
            ..Default::default()
        };
        let r = explain(&flood, &Node, 0, 0, Response::Log);
        assert_eq!(
            (r.half_open, r.protocol.as_str(), r.port),
            (Some(590), "TCP", 443)
        );
        assert_eq!(r.source, "", "no sample: no source, not 0.0.0.0");
        // The first sources seen: the first one names the record's source.
        let flood = ThreatEvent {
            samples: [
                raw(Ipv4Addr::new(10, 0, 0, 5))[0],
                raw(Ipv4Addr::new(192, 0, 2, 9))[0],
                0,
                0,
            ],
            dst: raw(Ipv4Addr::new(10, 0, 0, 7)),
            sketch_bits: 2,
            ..flood
        };
        let r = explain(&flood, &Node, 0, 0, Response::Log);
        assert_eq!(r.source, "10.0.0.5");
        assert_eq!(r.source_pod.as_deref(), Some("prod/scanner"));
        assert_eq!(r.samples, ["10.0.0.5", "192.0.2.9"]);
        assert_eq!(r.destination, "10.0.0.7");
        assert_eq!(r.distinct, Some(estimate_distinct(2)));
        let sweep = ThreatEvent {
            kind: threat::HOST_SWEEP,
            family: FAMILY_V6,
            samples: [u32::from_ne_bytes([0, 0x0a, 0, 0x01]), 0, 0, 0],
            ..Default::default()
        };
        assert_eq!(
            explain(&sweep, &Node, 0, 0, Response::Log).samples,
            ["…:a:1"]
        );
    }
}
