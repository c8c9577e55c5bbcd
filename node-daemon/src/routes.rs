//! Direct routing between nodes (standalone mode): every other node's pod CIDRs are routed
//! through that node's address on the network the nodes share, as the reference plugins'
//! host-gateway mode does. Pod traffic between nodes is then plain routed IP, so the same
//! programs judge it on both ends, and remote pods are known by their ipcache entries.
//!
//! moatd's routes carry a routing-protocol number of their own (`RTPROT_MOAT`), so moatd can
//! tell them from everyone else's: a reconcile adds what is missing, moves what changed and
//! removes what no node claims any more, also when the removal happened while moatd was down.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Context;
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol},
};
use rtnetlink::RouteMessageBuilder;

use crate::kube::convert::NodeInfo;

/// Routing protocol number on moatd's routes (`ip route show proto 77`). Unassigned in
/// iproute2's rt_protos, and distinct from the numbers other CNIs use.
pub const RTPROT_MOAT: u8 = 77;

/// The main routing table.
const MAIN_TABLE: u32 = 254;

/// The routes this node needs: each other node's pod CIDRs via that node's address of the
/// same family. A CIDR two nodes claim goes to the first by name; a CIDR overlapping this
/// node's own is never routed away (both are reported by `conflicts`).
pub fn desired_routes(
    nodes: &BTreeMap<String, NodeInfo>,
    this_node: &str,
) -> BTreeMap<IpNetwork, IpAddr> {
    let own: Vec<IpNetwork> = nodes
        .get(this_node)
        .map(|n| n.pod_cidrs.clone())
        .unwrap_or_default();
    let mut routes = BTreeMap::new();
    for (name, node) in nodes {
        if name == this_node {
            continue;
        }
        for cidr in &node.pod_cidrs {
            let Some(gateway) = node
                .addresses
                .iter()
                .find(|a| a.is_ipv4() == cidr.is_ipv4())
            else {
                continue;
            };
            if own.iter().any(|o| overlaps(o, cidr)) {
                continue;
            }
            routes.entry(*cidr).or_insert(*gateway);
        }
    }
    routes
}

/// Problems with the nodes' pod CIDRs, one line each (for status and logs).
pub fn conflicts(nodes: &BTreeMap<String, NodeInfo>, this_node: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut claimed: Vec<(&IpNetwork, &str)> = Vec::new();
    for (name, node) in nodes {
        for cidr in &node.pod_cidrs {
            if let Some((_, other)) = claimed.iter().find(|(c, _)| overlaps(c, cidr)) {
                out.push(format!(
                    "Node {name}: pod CIDR {cidr} overlaps node {other}'s"
                ));
            }
            claimed.push((cidr, name));
            if name != this_node && !node.addresses.iter().any(|a| a.is_ipv4() == cidr.is_ipv4()) {
                out.push(format!(
                    "Node {name}: no {} address to route its pod CIDR {cidr} through",
                    if cidr.is_ipv4() { "IPv4" } else { "IPv6" }
                ));
            }
        }
    }
    out
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// What a route reconcile changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    pub added: usize,
    pub removed: usize,
}

/// Brings moatd's routes in this network namespace's main table to `desired`.
pub fn reconcile(desired: &BTreeMap<IpNetwork, IpAddr>) -> anyhow::Result<RouteStats> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket")?;
        let task = tokio::spawn(connection);
        let result = reconcile_with(&handle, desired).await;
        task.abort();
        result
    })
}

async fn reconcile_with(
    handle: &rtnetlink::Handle,
    desired: &BTreeMap<IpNetwork, IpAddr>,
) -> anyhow::Result<RouteStats> {
    let mut stats = RouteStats::default();
    let present = ours(handle).await?;
    for (cidr, gateway) in desired {
        if present.get(cidr).map(|(gw, _)| gw) == Some(gateway) {
            continue;
        }
        handle
            .route()
            .add(route_message(cidr, gateway))
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding route {cidr} via {gateway}"))?;
        stats.added += 1;
    }
    for (cidr, (_, message)) in present {
        if !desired.contains_key(&cidr) {
            handle
                .route()
                .del(message)
                .execute()
                .await
                .with_context(|| format!("removing route {cidr}"))?;
            stats.removed += 1;
        }
    }
    Ok(stats)
}

fn route_message(cidr: &IpNetwork, gateway: &IpAddr) -> RouteMessage {
    let protocol = RouteProtocol::from(RTPROT_MOAT);
    match (cidr, gateway) {
        (IpNetwork::V4(net), IpAddr::V4(gw)) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix())
            .gateway(*gw)
            .protocol(protocol)
            .build(),
        (IpNetwork::V6(net), IpAddr::V6(gw)) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(net.network(), net.prefix())
            .gateway(*gw)
            .protocol(protocol)
            .build(),
        // desired_routes pairs each CIDR with an address of its own family.
        _ => unreachable!("route {cidr} via {gateway}: families differ"),
    }
}

/// The main table's routes with moatd's protocol number: destination -> (gateway, message).
async fn ours(
    handle: &rtnetlink::Handle,
) -> anyhow::Result<BTreeMap<IpNetwork, (IpAddr, RouteMessage)>> {
    let mut out = BTreeMap::new();
    let dumps = [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ];
    for dump in dumps {
        let mut stream = handle.route().get(dump).execute();
        while let Some(message) = stream.try_next().await.context("listing routes")? {
            if u8::from(message.header.protocol) != RTPROT_MOAT {
                continue;
            }
            if let Some((cidr, gateway)) = parse(&message) {
                out.insert(cidr, (gateway, message));
            }
        }
    }
    Ok(out)
}

fn parse(message: &RouteMessage) -> Option<(IpNetwork, IpAddr)> {
    let mut table = u32::from(message.header.table);
    let (mut destination, mut gateway) = (None, None);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => destination = address(a),
            RouteAttribute::Gateway(a) => gateway = address(a),
            _ => {}
        }
    }
    if table != MAIN_TABLE {
        return None;
    }
    let prefix = message.header.destination_prefix_length;
    let destination = destination.unwrap_or(match message.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    Some((IpNetwork::new(destination, prefix).ok()?, gateway?))
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cidrs: &[&str], addresses: &[&str]) -> NodeInfo {
        NodeInfo {
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn other_nodes_cidrs_go_via_their_address_of_the_same_family() {
        let nodes: BTreeMap<String, NodeInfo> = [
            (
                "a".into(),
                node(
                    &["10.1.1.0/24", "fd01:1::/64"],
                    &["192.0.2.1", "2001:db8::1"],
                ),
            ),
            (
                "b".into(),
                node(
                    &["10.1.2.0/24", "fd01:2::/64"],
                    &["2001:db8::2", "192.0.2.2"],
                ),
            ),
            (
                "c".into(),
                node(&["10.1.3.0/24", "fd01:3::/64"], &["192.0.2.3"]),
            ),
        ]
        .into();
        let routes = desired_routes(&nodes, "a");
        let expected: BTreeMap<IpNetwork, IpAddr> = [
            ("10.1.2.0/24", "192.0.2.2"),
            ("fd01:2::/64", "2001:db8::2"),
            ("10.1.3.0/24", "192.0.2.3"),
        ]
        .iter()
        .map(|(c, g)| (c.parse().unwrap(), g.parse().unwrap()))
        .collect();
        assert_eq!(routes, expected);
        let problems = conflicts(&nodes, "a");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("no IPv6 address"), "{problems:?}");
    }

    #[test]
    fn overlapping_cidrs_never_route_this_nodes_pods_away() {
        let nodes: BTreeMap<String, NodeInfo> = [
            ("a".into(), node(&["10.1.0.0/16"], &["192.0.2.1"])),
            ("b".into(), node(&["10.1.2.0/24"], &["192.0.2.2"])),
            ("c".into(), node(&["10.2.0.0/24"], &["192.0.2.3"])),
            ("d".into(), node(&["10.2.0.0/24"], &["192.0.2.4"])),
        ]
        .into();
        let routes = desired_routes(&nodes, "a");
        assert_eq!(routes.len(), 1);
        assert_eq!(
            routes[&"10.2.0.0/24".parse().unwrap()],
            "192.0.2.3".parse::<IpAddr>().unwrap(),
            "the first claimant by name wins"
        );
        assert_eq!(conflicts(&nodes, "a").len(), 2);
    }
}
