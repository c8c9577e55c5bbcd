//! Netlink work for moat-cni. Anything inside a pod's namespace runs on a dedicated std
//! thread that `setns`es into it, with a current-thread tokio runtime and a fresh netlink
//! socket created there (a netlink socket belongs to the namespace it was opened in).

use std::{
    fs::File,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::Path,
};

use anyhow::{Context, Result, anyhow, bail};
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteScope},
};
use nix::sched::{CloneFlags, setns};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Link-local next hops the pod routes through (answered by the host veth's MAC, installed
/// as permanent neighbours, so nothing depends on proxy ARP or a bridge).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<Vec<u8>>,
    pub mtu: Option<u32>,
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
    pub peer_index: Option<u32>,
    pub kind_veth: bool,
    /// IFLA_IFALIAS: on the host veths Moat creates, the owning network and attachment
    /// (see [`veth_alias`]).
    pub alias: Option<String>,
    /// IFF_UP.
    pub up: bool,
}

/// The alias standalone ADD gives its host veth: "moat-cni <network> <containerID> <ifname>".
/// GC uses it to tell this network's veths from another network's with the same prefix.
pub fn veth_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("moat-cni {network} {container_id} {ifname}")
}

/// The network named by a host veth's alias, if it is a Moat alias.
pub fn alias_network(alias: &str) -> Option<&str> {
    let mut words = alias.split(' ');
    (words.next() == Some("moat-cni"))
        .then(|| words.next())
        .flatten()
}

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `f` with a netlink handle in `netns` (None: the caller's namespace, still on a fresh
/// thread so the caller's thread never changes namespace).
pub fn run_in<T, F, Fut>(netns: Option<&Path>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let file = match netns {
        Some(path) => {
            Some(File::open(path).with_context(|| format!("opening netns {}", path.display()))?)
        }
        None => None,
    };
    std::thread::spawn(move || -> Result<T> {
        if let Some(file) = &file {
            setns(file, CloneFlags::CLONE_NEWNET).context("entering the pod network namespace")?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the netlink runtime")?;
        runtime.block_on(async move {
            let (connection, handle, _) =
                rtnetlink::new_connection().context("opening a netlink socket")?;
            tokio::spawn(connection);
            f(handle).await
        })
    })
    .join()
    .map_err(|_| anyhow!("netlink thread panicked"))?
}

fn link_info(message: LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: message.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        peer_index: None,
        kind_veth: false,
        alias: None,
        up: message
            .header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Up),
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => info.name = name,
            LinkAttribute::Address(mac) => info.mac = Some(mac),
            LinkAttribute::Mtu(mtu) => info.mtu = Some(mtu),
            LinkAttribute::Link(peer) => info.peer_index = Some(peer),
            LinkAttribute::IfAlias(alias) => info.alias = Some(alias),
            LinkAttribute::LinkInfo(infos) => {
                info.kind_veth = infos.iter().any(|i| {
                    matches!(
                        i,
                        netlink_packet_route::link::LinkInfo::Kind(InfoKind::Veth)
                    )
                })
            }
            _ => {}
        }
    }
    info
}

fn is_not_found(error: &rtnetlink::Error) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(m)
        if m.raw_code() == -libc_enodev() || m.raw_code() == -libc_enoent())
}

const fn libc_enodev() -> i32 {
    19
}
const fn libc_enoent() -> i32 {
    2
}

pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkInfo>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(message)) => Ok(Some(link_info(message))),
        Ok(None) => Ok(None),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context(format!("looking up link {name}"))),
    }
}

pub async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<LinkInfo>> {
    let mut links = handle.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(Some(message)) => Ok(Some(link_info(message))),
        Ok(None) => Ok(None),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context(format!("looking up link #{index}"))),
    }
}

/// The link `name` in `netns`, if both exist.
pub fn container_link(netns: &Path, name: &str) -> Result<Option<LinkInfo>> {
    let name = name.to_string();
    run_in(Some(netns), move |h| async move {
        link_by_name(&h, &name).await
    })
}

/// The host side of the veth whose container end is `ifname` in `netns`: IFLA_LINK of the
/// container end is the peer's ifindex in the host namespace.
pub fn host_peer_of(netns: &Path, ifname: &str) -> Result<LinkInfo> {
    let inner = container_link(netns, ifname)?
        .ok_or_else(|| anyhow!("interface {ifname} not found in {}", netns.display()))?;
    let peer = inner
        .peer_index
        .filter(|i| *i != 0 && *i != inner.index)
        .ok_or_else(|| anyhow!("{ifname} in {} has no peer link", netns.display()))?;
    let host = run_in(None, move |h| async move { link_by_index(&h, peer).await })?
        .ok_or_else(|| anyhow!("peer #{peer} of {ifname} not found in the host namespace"))?;
    Ok(host)
}

/// Host-namespace veths whose name starts with `prefix` (one netlink dump).
pub fn host_veths_with_prefix(prefix: &str) -> Result<Vec<LinkInfo>> {
    let prefix = prefix.to_string();
    run_in(None, move |h| async move {
        let mut out = Vec::new();
        let mut links = h.link().get().execute();
        while let Some(message) = links.try_next().await? {
            let link = link_info(message);
            if link.kind_veth && link.name.starts_with(&prefix) {
                out.push(link);
            }
        }
        Ok(out)
    })
}

/// Deletes a host link by name; a missing link is fine.
pub fn delete_host_link(name: &str) -> Result<()> {
    let name = name.to_string();
    run_in(None, move |h| async move {
        if let Some(link) = link_by_name(&h, &name).await? {
            match h.link().del(link.index).execute().await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(anyhow::Error::from(e).context(format!("deleting {name}"))),
            }
        }
        Ok(())
    })
}

/// What standalone ADD builds.
#[derive(Clone, Debug)]
pub struct VethPlan {
    pub host_ifname: String,
    /// Set on the host end when it comes up (see [`veth_alias`]).
    pub host_alias: String,
    pub container_ifname: String,
    pub mtu: u32,
}

/// Step 1 of standalone ADD: the pair, the container end created directly inside `netns`,
/// both ends down (no traffic can pass before the programs are attached).
pub fn create_pair(netns: &Path, plan: &VethPlan) -> Result<LinkInfo> {
    let ns_file =
        File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let p = plan.clone();
    run_in(None, move |h| async move {
        if link_by_name(&h, &p.host_ifname).await?.is_some() {
            bail!("host interface {} already exists", p.host_ifname);
        }
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(p.container_ifname.clone())
            .mtu(p.mtu)
            .setns_by_fd(ns_file.as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(p.host_ifname.clone())
            .mtu(p.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        h.link()
            .add(message)
            .execute()
            .await
            .with_context(|| format!("creating veth {}", p.host_ifname))?;
        drop(ns_file);
        crate::test_hook::abort_point("veth-pair-created");
        // The host side's link-local address is what answers the pod's and the host's
        // neighbour discovery; without DAD it is usable the moment the link is up, so the
        // pod's first IPv6 packet does not wait a second or two for it.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/accept_dad", p.host_ifname),
            "0",
        );
        link_by_name(&h, &p.host_ifname)
            .await?
            .ok_or_else(|| anyhow!("veth {} vanished", p.host_ifname))
    })
}

/// Step 2: inside the pod, the addresses (/32, /128), the interface up, and the default
/// routes through the link-local gateways, answered by `host_mac` (permanent neighbours).
pub fn configure_pod(
    netns: &Path,
    plan: &VethPlan,
    host_mac: &[u8],
    addresses: &[IpAddr],
) -> Result<LinkInfo> {
    let p = plan.clone();
    let host_mac = host_mac.to_vec();
    let addresses = addresses.to_vec();
    run_in(Some(netns), move |h| async move {
        let link = link_by_name(&h, &p.container_ifname)
            .await?
            .ok_or_else(|| anyhow!("{} not created in the pod", p.container_ifname))?;
        let index = link.index;
        for address in &addresses {
            let prefix = if address.is_ipv4() { 32 } else { 128 };
            let mut request = h.address().add(index, *address, prefix);
            if address.is_ipv6() {
                request
                    .message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            request
                .execute()
                .await
                .with_context(|| format!("adding {address}/{prefix}"))?;
        }
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .context("setting the pod interface up")?;
        if addresses.iter().any(IpAddr::is_ipv4) {
            let gateway = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(GATEWAY_V4, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build();
            h.route()
                .add(gateway)
                .execute()
                .await
                .context("adding the 169.254.1.1 link route")?;
            h.neighbours()
                .add(index, IpAddr::V4(GATEWAY_V4))
                .link_layer_address(&host_mac)
                .execute()
                .await
                .context("adding the 169.254.1.1 neighbour")?;
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(GATEWAY_V4)
                .output_interface(index)
                .build();
            h.route()
                .add(default)
                .execute()
                .await
                .context("adding the IPv4 default route")?;
        }
        if addresses.iter().any(IpAddr::is_ipv6) {
            h.neighbours()
                .add(index, IpAddr::V6(GATEWAY_V6))
                .link_layer_address(&host_mac)
                .execute()
                .await
                .context("adding the fe80::1 neighbour")?;
            let default = RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(GATEWAY_V6)
                .output_interface(index)
                .build();
            h.route()
                .add(default)
                .execute()
                .await
                .context("adding the IPv6 default route")?;
        }
        link_by_name(&h, &p.container_ifname)
            .await?
            .ok_or_else(|| anyhow!("{} vanished", p.container_ifname))
    })
}

/// Step 3, once the programs are attached: the host end up, with its alias (one message: the
/// kernel ignores IFLA_IFALIAS on RTM_NEWLINK, and a veth of ours that is up always carries its
/// owner, which GC relies on), then the /32 and /128 routes to the pod.
pub fn activate_host(plan: &VethPlan, host_index: u32, addresses: &[IpAddr]) -> Result<()> {
    let p = plan.clone();
    let addresses = addresses.to_vec();
    run_in(None, move |h| async move {
        h.link()
            .set(
                LinkUnspec::new_with_index(host_index)
                    .up()
                    .alias(p.host_alias.clone())
                    .build(),
            )
            .execute()
            .await
            .context("setting the host veth up")?;
        for address in &addresses {
            let message = match address {
                IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(*v4, 32)
                    .output_interface(host_index)
                    .scope(RouteScope::Link)
                    .build(),
                IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(*v6, 128)
                    .output_interface(host_index)
                    .build(),
            };
            h.route()
                .add(message)
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding the host route to {address}"))?;
        }
        Ok(())
    })
}

/// Addresses on `ifname` inside `netns`.
pub fn container_addresses(netns: &Path, ifname: &str) -> Result<Option<Vec<IpNetwork>>> {
    let ifname = ifname.to_string();
    run_in(Some(netns), move |h| async move {
        let Some(link) = link_by_name(&h, &ifname).await? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        let mut stream = h
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        while let Some(message) = stream.try_next().await? {
            let prefix = message.header.prefix_len;
            for attribute in message.attributes {
                if let AddressAttribute::Address(ip) = attribute
                    && let Ok(net) = IpNetwork::new(ip, prefix)
                {
                    out.push(net);
                }
            }
        }
        Ok(Some(out))
    })
}

/// (IPv4 default route present, IPv6 default route present) inside `netns`, via `ifname`.
pub fn container_default_routes(netns: &Path, ifname: &str) -> Result<(bool, bool)> {
    let ifname = ifname.to_string();
    run_in(Some(netns), move |h| async move {
        let Some(link) = link_by_name(&h, &ifname).await? else {
            return Ok((false, false));
        };
        let mut found = (false, false);
        for v6 in [false, true] {
            let query = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            let mut stream = h.route().get(query).execute();
            while let Some(route) = stream.try_next().await? {
                if route.header.destination_prefix_length != 0 {
                    continue;
                }
                let via_link = route
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == link.index));
                let has_gateway = route.attributes.iter().any(|a| {
                    matches!(
                        a,
                        RouteAttribute::Gateway(RouteAddress::Inet(_))
                            | RouteAttribute::Gateway(RouteAddress::Inet6(_))
                    )
                });
                if via_link && has_gateway {
                    if v6 {
                        found.1 = true;
                    } else {
                        found.0 = true;
                    }
                }
            }
        }
        Ok(found)
    })
}

/// The MTU of the node's uplink: the device of the main table's default route (IPv4's,
/// else IPv6's; the lowest metric when there are several) in `netns` (None: moat-cni's own,
/// the host's). `None` when there is no default route through a device. Moat routes pods
/// without an overlay (no encapsulation), so the pods' MTU is the uplink's as is.
pub fn uplink_mtu(netns: Option<&Path>) -> Result<Option<u32>> {
    run_in(netns, move |h| async move {
        for v6 in [false, true] {
            let query = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            let mut best: Option<(u32, u32)> = None;
            let mut stream = h.route().get(query).execute();
            while let Some(route) = stream.try_next().await? {
                let main = route.header.table == RT_TABLE_MAIN
                    || route.attributes.iter().any(
                        |a| matches!(a, RouteAttribute::Table(t) if *t == RT_TABLE_MAIN as u32),
                    );
                if route.header.destination_prefix_length != 0 || !main {
                    continue;
                }
                let oif = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                let metric = route
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Priority(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(0);
                if let Some(oif) = oif
                    && best.is_none_or(|(m, _)| metric < m)
                {
                    best = Some((metric, oif));
                }
            }
            if let Some((_, oif)) = best {
                return Ok(link_by_index(&h, oif).await?.and_then(|l| l.mtu));
            }
        }
        Ok(None)
    })
}

/// The kernel's main routing table (`RT_TABLE_MAIN`).
const RT_TABLE_MAIN: u8 = 254;

/// Where the kernel's sysctls live; `ensure_forwarding` takes the root so tests can point it
/// at a directory shaped like a host's.
pub const PROC_SYS: &str = "/proc/sys";

/// The forwarding sysctls (relative to /proc/sys) a pod with `addresses` needs: IPv4's for
/// an IPv4 address, IPv6's for an IPv6 one, nothing else. A host booted with ipv6.disable=1
/// has no net/ipv6 at all, and IPAM hands out IPv6 addresses only from the node's IPv6 pod
/// CIDRs, so an IPv4-only pod never touches it.
pub fn forwarding_sysctls(addresses: &[IpAddr]) -> Vec<&'static str> {
    let mut sysctls = Vec::new();
    if addresses.iter().any(IpAddr::is_ipv4) {
        sysctls.push("net/ipv4/ip_forward");
    }
    if addresses.iter().any(IpAddr::is_ipv6) {
        sysctls.push("net/ipv6/conf/all/forwarding");
    }
    sysctls
}

/// Turns on forwarding for the families of `addresses` when off (standalone mode routes pods
/// through the host). `sysctl_root` is /proc/sys ([`PROC_SYS`]) outside tests.
pub fn ensure_forwarding(sysctl_root: &Path, addresses: &[IpAddr]) -> Result<()> {
    for sysctl in forwarding_sysctls(addresses) {
        let path = sysctl_root.join(sysctl);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current.trim() != "1" {
            std::fs::write(&path, "1").with_context(|| format!("enabling {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn forwarding_follows_the_pod_address_families() {
        assert_eq!(
            forwarding_sysctls(&ips(&["10.244.1.5"])),
            ["net/ipv4/ip_forward"]
        );
        assert_eq!(
            forwarding_sysctls(&ips(&["fd00:1::5"])),
            ["net/ipv6/conf/all/forwarding"]
        );
        assert_eq!(
            forwarding_sysctls(&ips(&["10.244.1.5", "fd00:1::5"])),
            ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"]
        );
        assert!(forwarding_sysctls(&[]).is_empty());
    }

    /// A root shaped like /proc/sys on a host booted with ipv6.disable=1: no net/ipv6.
    fn ipv6_disabled_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("net/ipv4")).unwrap();
        std::fs::write(root.path().join("net/ipv4/ip_forward"), "0\n").unwrap();
        root
    }

    #[test]
    fn ipv4_pod_on_a_host_without_ipv6_enables_only_ipv4_forwarding() {
        let root = ipv6_disabled_root();
        ensure_forwarding(root.path(), &ips(&["10.244.1.5"])).unwrap();
        let v4 = std::fs::read_to_string(root.path().join("net/ipv4/ip_forward")).unwrap();
        assert_eq!(v4, "1");
        assert!(!root.path().join("net/ipv6").exists());
    }

    #[test]
    fn ipv6_pod_on_a_host_without_ipv6_names_the_sysctl() {
        let root = ipv6_disabled_root();
        let error = ensure_forwarding(root.path(), &ips(&["fd00:1::5"])).unwrap_err();
        assert!(
            format!("{error:#}").contains("net/ipv6/conf/all/forwarding"),
            "{error:#}"
        );
    }

    /// A network namespace for a test, deleted when dropped.
    struct TestNetns(String);

    impl TestNetns {
        fn new(tag: &str) -> Self {
            let name = format!("{tag}{}", std::process::id());
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .output();
            sh(&format!("ip netns add {name}"));
            Self(name)
        }

        fn path(&self) -> std::path::PathBuf {
            std::path::PathBuf::from(format!("/run/netns/{}", self.0))
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .output();
        }
    }

    fn sh(cmd: &str) {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn uplink_mtu_is_the_default_route_device_mtu() {
        let ns = TestNetns::new("moatmtu");
        let n = &ns.0;
        // No default route: no uplink to take the MTU from. (veth pairs: the kernel may lack the
        // dummy driver.)
        sh(&format!(
            "ip -n {n} link add uplink0 mtu 1400 type veth peer name uplink0p mtu 1400 && \
             ip -n {n} link add other0 mtu 9000 type veth peer name other0p mtu 9000 && \
             for l in uplink0 uplink0p other0 other0p; do ip -n {n} link set $l up; done && \
             ip -n {n} addr add 192.0.2.1/24 dev uplink0 && ip -n {n} addr add 198.51.100.1/24 dev other0"
        ));
        assert_eq!(uplink_mtu(Some(&ns.path())).unwrap(), None);
        // The default route's device, not merely any link; the lowest metric wins.
        sh(&format!(
            "ip -n {n} route add default via 192.0.2.254 dev uplink0 metric 10 && \
             ip -n {n} route add default via 198.51.100.254 dev other0 metric 20"
        ));
        assert_eq!(uplink_mtu(Some(&ns.path())).unwrap(), Some(1400));
    }

    #[test]
    fn forwarding_already_on_is_left_alone() {
        let root = ipv6_disabled_root();
        let path = root.path().join("net/ipv4/ip_forward");
        std::fs::write(&path, "1\n").unwrap();
        ensure_forwarding(root.path(), &ips(&["10.244.1.5"])).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
    }
}
