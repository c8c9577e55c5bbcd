//! The node's own addresses, followed live. The datapath maps each of them to the reserved
//! `host` identity, which local pods always admit (kubelet probes come from the node). An
//! address added after moatd started (a new probe source, a new gateway) must become `host`
//! at once, and one removed must stop being `host`, or a default-deny pod drops the node's
//! probes until a restart (or, worse, keeps admitting an address that now belongs to
//! someone else).
//!
//! A thread of its own subscribes to the kernel's address notifications (RTNLGRP_IPV4_IFADDR
//! and RTNLGRP_IPV6_IFADDR), keeps the host namespace's addresses by link, and hands the
//! daemon the new set only when it changed. The subscription is made before the first dump,
//! so nothing between the two is missed; lost notifications (ENOBUFS, reported by the
//! library as an overrun) and a failed socket both end in a fresh dump. The daemon's periodic
//! resync re-reads the set too (`current`), a safety net behind all of this.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
};
use rtnetlink::{
    MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    sys::SocketAddr,
};
use tracing::{info, warn};

use crate::daemon::Daemon;

/// Whether traffic from `ip` is the node itself: every address of the host namespace except
/// loopback (never seen on a pod's veth) and IPv6 link-local (every veth, the pods' host
/// sides included, has its own fe80 address; they are not the node's to claim).
pub fn is_host_address(ip: &IpAddr) -> bool {
    let link_local_v6 = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    !ip.is_loopback() && !link_local_v6
}

/// What changed between two sets of host addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: BTreeSet<IpAddr>,
    pub removed: BTreeSet<IpAddr>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

pub fn diff(old: &BTreeSet<IpAddr>, new: &BTreeSet<IpAddr>) -> Diff {
    Diff {
        added: new.difference(old).copied().collect(),
        removed: old.difference(new).copied().collect(),
    }
}

/// One address as the kernel reports it: the same address may sit on two links, or twice on
/// one link with different prefixes, and stays the node's until the last of them goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Assigned {
    pub ifindex: u32,
    pub address: IpAddr,
    pub prefix: u8,
}

impl Assigned {
    /// The local address of a netlink address message, read as getifaddrs(3) reads it:
    /// IFA_LOCAL when present (on a point-to-point link IFA_ADDRESS is the peer's), else
    /// IFA_ADDRESS.
    pub fn from_message(message: &AddressMessage) -> Option<Self> {
        let mut local = None;
        let mut address = None;
        for attribute in &message.attributes {
            match attribute {
                AddressAttribute::Local(a) => local = Some(*a),
                AddressAttribute::Address(a) => address = Some(*a),
                _ => {}
            }
        }
        Some(Self {
            ifindex: message.header.index,
            address: local.or(address)?,
            prefix: message.header.prefix_len,
        })
    }
}

/// The host namespace's addresses that count as the node's, by link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressBook {
    assigned: BTreeSet<Assigned>,
}

impl AddressBook {
    pub fn new(all: impl IntoIterator<Item = Assigned>) -> Self {
        let mut book = Self::default();
        for a in all {
            book.added(a);
        }
        book
    }

    /// RTM_NEWADDR (also sent again for an address already known, e.g. when its IPv6
    /// lifetimes are refreshed or its DAD completes: then nothing changes).
    pub fn added(&mut self, a: Assigned) {
        if is_host_address(&a.address) {
            self.assigned.insert(a);
        }
    }

    /// RTM_DELADDR (the kernel sends one per address when a link goes away, too).
    pub fn removed(&mut self, a: Assigned) {
        self.assigned.remove(&a);
    }

    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.assigned.iter().map(|a| a.address).collect()
    }
}

/// Every address of this network namespace that counts as the node's, read now (one
/// netlink dump). For start-up and the periodic resync; never call it on a tokio worker.
pub fn current() -> anyhow::Result<BTreeSet<IpAddr>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket")?;
        let task = tokio::spawn(connection);
        let result = dump(&handle).await;
        task.abort();
        Ok(result?.addresses())
    })
}

/// A dump's answer is not lost to a full socket buffer (the kernel holds the rest until the
/// reader catches up), so this only bounds a kernel that does not answer at all.
const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

async fn dump(handle: &rtnetlink::Handle) -> anyhow::Result<AddressBook> {
    let read = async {
        let mut book = AddressBook::default();
        let mut stream = handle.address().get().execute();
        while let Some(message) = stream.try_next().await.context("listing addresses")? {
            if let Some(a) = Assigned::from_message(&message) {
                book.added(a);
            }
        }
        anyhow::Ok(book)
    };
    tokio::time::timeout(DUMP_TIMEOUT, read)
        .await
        .context("listing addresses: no answer")?
}

/// Follows the node's addresses into `daemon` on a thread of its own, for as long as moatd
/// runs. The thread stays in the namespace moatd started in (its sockets belong there), and
/// takes the daemon's lock only to apply a change.
pub fn follow(daemon: Arc<Mutex<Daemon>>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("moatd-host-addrs".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "not following the node's addresses (resync still does)");
                    return;
                }
            };
            runtime.block_on(follow_forever(&daemon));
        })
}

/// Subscriptions end only on errors; each new one starts from a fresh dump.
async fn follow_forever(daemon: &Mutex<Daemon>) {
    let mut applied = None;
    loop {
        let e = subscribe(daemon, &mut applied).await;
        warn!(error = %format!("{e:#}"), "following the node's addresses; subscribing again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One subscription, until it fails. `applied` is the set last handed to the daemon.
async fn subscribe(
    daemon: &Mutex<Daemon>,
    applied: &mut Option<BTreeSet<IpAddr>>,
) -> anyhow::Error {
    let (connection, handle, messages) = match rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ]) {
        Ok(c) => c,
        Err(e) => return anyhow::Error::from(e).context("subscribing to address changes"),
    };
    let task = tokio::spawn(connection);
    let error = match track(daemon, &handle, messages, applied).await {
        Ok(never) => match never {},
        Err(e) => e,
    };
    task.abort();
    error
}

async fn track(
    daemon: &Mutex<Daemon>,
    handle: &rtnetlink::Handle,
    mut messages: impl Stream<Item = (NetlinkMessage<RouteNetlinkMessage>, SocketAddr)> + Unpin,
    applied: &mut Option<BTreeSet<IpAddr>>,
) -> anyhow::Result<Infallible> {
    // Subscribed first, dumped second: a change in between also arrives as a message
    // (replaying it on top of the dump is harmless: the last word per address wins).
    let mut book = dump(handle).await?;
    publish(daemon, &book, applied);
    while let Some((message, _)) = messages.next().await {
        let mut lost = apply(&mut book, message.payload);
        // A burst (a link going away with its addresses) is applied as one change.
        while let Some(Some((message, _))) = messages.next().now_or_never() {
            lost |= apply(&mut book, message.payload);
        }
        if lost {
            warn!("address notifications lost (socket buffer full); reading them all again");
            book = dump(handle).await?;
        }
        publish(daemon, &book, applied);
    }
    anyhow::bail!("the address subscription closed")
}

/// One notification into the book; true when notifications were lost.
fn apply(book: &mut AddressBook, payload: NetlinkPayload<RouteNetlinkMessage>) -> bool {
    match payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => {
            if let Some(a) = Assigned::from_message(&m) {
                book.added(a);
            }
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) => {
            if let Some(a) = Assigned::from_message(&m) {
                book.removed(a);
            }
        }
        NetlinkPayload::Overrun(_) => return true,
        _ => {}
    }
    false
}

/// Hands the book's addresses to the daemon when they differ from what was handed last. A
/// failed apply is retried with the next notification (and by the periodic resync).
fn publish(daemon: &Mutex<Daemon>, book: &AddressBook, applied: &mut Option<BTreeSet<IpAddr>>) {
    let addresses = book.addresses();
    if applied.as_ref() == Some(&addresses) {
        return;
    }
    let result = daemon
        .lock()
        .expect("daemon lock")
        .set_host_addresses(addresses.clone());
    match result {
        Ok(change) => {
            if !change.is_empty() {
                info!(added = ?change.added, removed = ?change.removed, "the node's addresses changed");
            }
            *applied = Some(addresses);
        }
        Err(e) => warn!(error = %format!("{e:#}"), "applying the node's addresses"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::AddressFamily;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn at(ifindex: u32, address: &str, prefix: u8) -> Assigned {
        Assigned {
            ifindex,
            address: ip(address),
            prefix,
        }
    }

    fn set(addresses: &[&str]) -> BTreeSet<IpAddr> {
        addresses.iter().map(|a| ip(a)).collect()
    }

    #[test]
    fn the_diff_names_what_came_and_what_went() {
        let old = set(&["192.0.2.1", "2001:db8::1", "198.51.100.7"]);
        let new = set(&["192.0.2.1", "2001:db8::1", "203.0.113.9"]);
        let d = diff(&old, &new);
        assert_eq!(d.added, set(&["203.0.113.9"]));
        assert_eq!(d.removed, set(&["198.51.100.7"]));
        assert!(!d.is_empty());
        assert!(diff(&new, &new).is_empty());
        assert_eq!(diff(&BTreeSet::new(), &new).added, new);
        assert_eq!(diff(&new, &BTreeSet::new()).removed, new);
    }

    #[test]
    fn loopback_and_ipv6_link_local_are_never_the_nodes() {
        let book = AddressBook::new([
            at(1, "127.0.0.1", 8),
            at(1, "::1", 128),
            at(7, "fe80::1c2b:3ff:fe4d:5e6f", 64),
            at(1, "198.51.100.7", 32),
            at(2, "169.254.10.1", 16),
            at(2, "2001:db8::7", 64),
        ]);
        assert_eq!(
            book.addresses(),
            set(&["198.51.100.7", "169.254.10.1", "2001:db8::7"])
        );
    }

    #[test]
    fn an_address_on_two_links_stays_until_both_are_gone() {
        let mut book = AddressBook::new([at(2, "192.0.2.1", 24), at(3, "192.0.2.1", 32)]);
        book.removed(at(2, "192.0.2.1", 24));
        assert_eq!(book.addresses(), set(&["192.0.2.1"]));
        // A repeated notification (IPv6 lifetimes, DAD done) changes nothing.
        book.added(at(3, "192.0.2.1", 32));
        book.removed(at(3, "192.0.2.1", 32));
        assert!(book.addresses().is_empty());
        // Removing what was never there is harmless (a replay after a dump).
        book.removed(at(9, "192.0.2.9", 32));
        assert!(book.addresses().is_empty());
    }

    #[test]
    fn the_local_address_wins_over_a_point_to_point_peer() {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.index = 4;
        m.header.prefix_len = 32;
        m.attributes = vec![
            AddressAttribute::Address(ip("203.0.113.2")),
            AddressAttribute::Local(ip("203.0.113.1")),
        ];
        assert_eq!(Assigned::from_message(&m), Some(at(4, "203.0.113.1", 32)));
        m.attributes = vec![AddressAttribute::Address(ip("2001:db8::5"))];
        assert_eq!(Assigned::from_message(&m), Some(at(4, "2001:db8::5", 32)));
        m.attributes.clear();
        assert_eq!(Assigned::from_message(&m), None);
    }

    #[test]
    fn notifications_add_remove_and_report_overruns() {
        let mut book = AddressBook::default();
        let mut message = AddressMessage::default();
        message.header.index = 5;
        message.header.prefix_len = 32;
        message.attributes = vec![AddressAttribute::Local(ip("198.51.100.7"))];
        let new = NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(message.clone()));
        let del = NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(message));
        assert!(!apply(&mut book, new));
        assert_eq!(book.addresses(), set(&["198.51.100.7"]));
        assert!(!apply(&mut book, del));
        assert!(book.addresses().is_empty());
        assert!(apply(&mut book, NetlinkPayload::Overrun(Vec::new())));
    }
}
