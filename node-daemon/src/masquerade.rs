//! Masquerade of pod egress that leaves the cluster (standalone mode). A pod's address is
//! routable only inside the cluster: without SNAT to the node's address, a reply from the
//! outside world (CoreDNS's upstream resolver, any pod's internet access) has no way back.
//!
//! moatd owns exactly one nftables table for it, [`TABLE`] (`inet moat-masquerade`): a
//! postrouting NAT chain at priority `srcnat` that masquerades packets whose source is one of
//! this node's pod CIDRs and whose destination is outside every cluster CIDR (every Node's pod
//! CIDRs, the Service CIDRs, and the configured non-masquerade CIDRs). A packet routed out
//! of a pod's host-side veth is never masqueraded: it is delivered to a pod of this node,
//! whose policy must see the real sender, whatever its address.
//!
//! The table is always written whole, in one `nft -f` transaction that declares it, deletes
//! it and defines it again: nftables applies a transaction atomically, so no packet ever sees
//! the table missing or half written, and whatever someone else added to it is gone.
//!
//! This module is pure (what the table should be, and its text); `nft.rs` runs nft.

pub mod nft;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
    path::PathBuf,
};

use ipnetwork::IpNetwork;

use crate::kube::convert::NodeInfo;

/// The nftables family and name of moatd's table.
pub const TABLE: &str = "inet moat-masquerade";

/// moat-cni's default `hostVethPrefix`, which the conflists moatd writes keep: the host-side
/// veths of this node's pods are `moat` and a hash.
pub const POD_VETH_PREFIX: &str = "moat";

/// moatd's masquerade settings (its flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Off: the table is removed (chained mode: the primary CNI masquerades).
    pub enabled: bool,
    /// Destinations that keep the pod's address besides the cluster's pod and Service CIDRs
    /// (e.g. a VPC that routes the pod CIDRs back).
    pub non_masquerade_cidrs: Vec<IpNetwork>,
    /// The nft binary.
    pub nft: PathBuf,
}

/// What the table masquerades.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// This node's pod CIDRs: the sources masqueraded.
    pub sources: Vec<IpNetwork>,
    /// Destinations never masqueraded, without overlaps (nftables refuses overlapping
    /// intervals in a set).
    pub cluster: Vec<IpNetwork>,
}

/// The table this node needs, `None` when it needs none: masquerade is off, or this node
/// has no pod CIDR yet (no pod of it has an address to masquerade).
pub fn desired(
    config: &Config,
    nodes: &BTreeMap<String, NodeInfo>,
    this_node: &str,
    service_cidrs: &[IpNetwork],
) -> Option<Table> {
    if !config.enabled {
        return None;
    }
    let own = nodes.get(this_node).map(|n| n.pod_cidrs.as_slice())?;
    if own.is_empty() {
        return None;
    }
    let cluster = nodes
        .values()
        .flat_map(|n| n.pod_cidrs.iter())
        .chain(service_cidrs)
        .chain(&config.non_masquerade_cidrs);
    Some(Table {
        sources: without_overlaps(own.iter()),
        cluster: without_overlaps(cluster),
    })
}

/// The networks (host bits cleared), minus those inside another: what is left covers the
/// same addresses with no two intervals overlapping (two CIDRs either nest or are disjoint).
fn without_overlaps<'a>(cidrs: impl Iterator<Item = &'a IpNetwork>) -> Vec<IpNetwork> {
    let all: BTreeSet<IpNetwork> = cidrs
        .filter_map(|c| IpNetwork::new(c.network(), c.prefix()).ok())
        .collect();
    all.iter()
        .filter(|c| {
            !all.iter().any(|o| {
                o != *c
                    && o.is_ipv4() == c.is_ipv4()
                    && o.prefix() <= c.prefix()
                    && o.contains(c.network())
            })
        })
        .copied()
        .collect()
}

/// The nft script that replaces moatd's table with `table`, in one transaction.
pub fn render(table: &Table) -> String {
    let mut out = String::new();
    // Declaring first makes the delete succeed whether or not the table exists.
    let _ = writeln!(out, "table {TABLE} {{}}");
    let _ = writeln!(out, "delete table {TABLE}");
    let _ = writeln!(out, "table {TABLE} {{");
    let families = [
        ("v4", "ipv4_addr", "ip", true),
        ("v6", "ipv6_addr", "ip6", false),
    ];
    let mut rules = Vec::new();
    for (suffix, addr_type, match_family, v4) in families {
        let sources: Vec<&IpNetwork> = table.sources.iter().filter(|c| c.is_ipv4() == v4).collect();
        if sources.is_empty() {
            continue;
        }
        // Never empty: this node's own pod CIDRs are cluster CIDRs.
        let cluster: Vec<&IpNetwork> = table.cluster.iter().filter(|c| c.is_ipv4() == v4).collect();
        for (name, cidrs) in [("pod-cidrs", &sources), ("cluster-cidrs", &cluster)] {
            let _ = writeln!(
                out,
                "\tset {name}-{suffix} {{\n\t\ttype {addr_type}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}",
                join(cidrs)
            );
        }
        rules.push(format!(
            "\t\t{match_family} saddr @pod-cidrs-{suffix} {match_family} daddr != @cluster-cidrs-{suffix} masquerade comment \"pod egress leaving the cluster\""
        ));
    }
    let _ = writeln!(
        out,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    let _ = writeln!(
        out,
        "\t\toifname \"{POD_VETH_PREFIX}*\" return comment \"to a pod of this node: its policy sees the sender\""
    );
    for rule in rules {
        let _ = writeln!(out, "{rule}");
    }
    let _ = writeln!(out, "\t}}\n}}");
    out
}

/// The nft script that removes moatd's table (also when there is none).
pub fn render_removal() -> String {
    format!("table {TABLE} {{}}\ndelete table {TABLE}\n")
}

fn join(cidrs: &[&IpNetwork]) -> String {
    cidrs
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(enabled: bool, extra: &[&str]) -> Config {
        Config {
            enabled,
            non_masquerade_cidrs: extra.iter().map(|c| c.parse().unwrap()).collect(),
            nft: "nft".into(),
        }
    }

    fn nodes(specs: &[(&str, &[&str])]) -> BTreeMap<String, NodeInfo> {
        specs
            .iter()
            .map(|(name, cidrs)| {
                (
                    name.to_string(),
                    NodeInfo {
                        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
                        addresses: Vec::new(),
                    },
                )
            })
            .collect()
    }

    fn cidrs(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn sources_are_this_nodes_pod_cidrs_and_every_cluster_cidr_keeps_the_address() {
        let nodes = nodes(&[
            ("a", &["10.244.1.0/24", "fd44:1::/64"]),
            ("b", &["10.244.2.0/24", "fd44:2::/64"]),
        ]);
        let services = cidrs(&["10.96.0.0/12", "fd96::/108"]);
        let table = desired(&config(true, &["192.168.0.0/16"]), &nodes, "a", &services).unwrap();
        assert_eq!(table.sources, cidrs(&["10.244.1.0/24", "fd44:1::/64"]));
        assert_eq!(
            table.cluster,
            cidrs(&[
                "10.96.0.0/12",
                "10.244.1.0/24",
                "10.244.2.0/24",
                "192.168.0.0/16",
                "fd44:1::/64",
                "fd44:2::/64",
                "fd96::/108",
            ])
        );
    }

    #[test]
    fn no_table_when_off_or_before_this_node_has_a_pod_cidr() {
        let services = cidrs(&["10.96.0.0/12"]);
        let with_cidr = nodes(&[("a", &["10.244.1.0/24"])]);
        assert_eq!(
            desired(&config(false, &[]), &with_cidr, "a", &services),
            None
        );
        assert_eq!(
            desired(&config(true, &[]), &with_cidr, "b", &services),
            None
        );
        let without = nodes(&[("a", &[]), ("b", &["10.244.2.0/24"])]);
        assert_eq!(desired(&config(true, &[]), &without, "a", &services), None);
    }

    #[test]
    fn nested_and_repeated_cidrs_leave_intervals_that_do_not_overlap() {
        let nodes = nodes(&[("a", &["10.244.1.7/24"]), ("b", &["10.244.2.0/24"])]);
        let services = cidrs(&["10.96.0.0/12", "10.96.0.0/12"]);
        let table = desired(
            &config(true, &["10.0.0.0/8", "10.244.0.0/16", "fd00::/8"]),
            &nodes,
            "a",
            &services,
        )
        .unwrap();
        // Host bits are cleared (nft refuses them); 10.0.0.0/8 holds all the others.
        assert_eq!(table.sources, cidrs(&["10.244.1.0/24"]));
        assert_eq!(table.cluster, cidrs(&["10.0.0.0/8", "fd00::/8"]));
    }

    #[test]
    fn the_script_replaces_the_whole_table_in_one_transaction() {
        let table = Table {
            sources: cidrs(&["10.244.1.0/24", "fd44:1::/64"]),
            cluster: cidrs(&["10.96.0.0/12", "10.244.0.0/16", "fd44::/32", "fd96::/108"]),
        };
        let expected = "\
table inet moat-masquerade {}
delete table inet moat-masquerade
table inet moat-masquerade {
\tset pod-cidrs-v4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.244.1.0/24 }
\t}
\tset cluster-cidrs-v4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.96.0.0/12, 10.244.0.0/16 }
\t}
\tset pod-cidrs-v6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = { fd44:1::/64 }
\t}
\tset cluster-cidrs-v6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = { fd44::/32, fd96::/108 }
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"moat*\" return comment \"to a pod of this node: its policy sees the sender\"
\t\tip saddr @pod-cidrs-v4 ip daddr != @cluster-cidrs-v4 masquerade comment \"pod egress leaving the cluster\"
\t\tip6 saddr @pod-cidrs-v6 ip6 daddr != @cluster-cidrs-v6 masquerade comment \"pod egress leaving the cluster\"
\t}
}
";
        assert_eq!(render(&table), expected);
    }

    #[test]
    fn a_single_stack_node_gets_no_rule_or_set_for_the_other_family() {
        let table = Table {
            sources: cidrs(&["10.244.1.0/24"]),
            cluster: cidrs(&["10.244.0.0/16", "fd96::/108"]),
        };
        let script = render(&table);
        assert!(script.contains("ip saddr @pod-cidrs-v4 ip daddr != @cluster-cidrs-v4 masquerade"));
        assert!(!script.contains("ip6"), "{script}");
        assert!(!script.contains("-v6"), "{script}");
        // The pod-veth exception is there whatever the families.
        assert!(script.contains("oifname \"moat*\" return"));
    }

    #[test]
    fn removal_succeeds_whether_or_not_the_table_exists() {
        assert_eq!(
            render_removal(),
            "table inet moat-masquerade {}\ndelete table inet moat-masquerade\n"
        );
    }
}
