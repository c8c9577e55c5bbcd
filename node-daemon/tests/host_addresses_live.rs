//! The node's own addresses are followed live, end to end on the real kernel: an address
//! given to the node after moatd started is the `host` identity (which a default-deny pod
//! still admits, as it must for kubelet probes) within moments and without a restart, and
//! an address taken away stops being `host`.
//!
//! moatd and the pods' host sides live in this test's network namespace (the host's, as in
//! moatd_local.rs); the test's addresses (unused documentation ranges, distinct per process)
//! sit on the loopback link and are removed when the test ends, also when it fails.

mod support_moatd;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use moat_common::{IDENTITY_HOST, IpcacheKeyV4, IpcacheKeyV6};
use moat_datapath::Maps;
use moat_testkit::lab::{Lab, probe, sh};
use support_moatd::{Env, register};

/// Every pod of `prod` is isolated for ingress, with no rule admitting anyone.
const DENY_INGRESS: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-ingress
  namespace: prod
spec:
  podSelector: {}
  policyTypes:
  - Ingress
";

const WEB: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: prod
  labels:
    app: web
spec:
  containers:
  - name: main
";

/// How long moatd may take to notice an address change.
const FOLLOW: Duration = Duration::from_secs(5);

/// The test's addresses on this namespace's loopback link (any link of the node counts;
/// this kernel may lack dummy links); whatever is still there is removed when dropped.
#[derive(Default)]
struct NodeAddresses(Vec<IpAddr>);

impl NodeAddresses {
    fn add(&mut self, addr: IpAddr) {
        let _ = sh(&format!(
            "ip addr del {} dev lo 2>/dev/null",
            with_prefix(addr)
        ));
        // No duplicate address detection: usable as a source at once.
        let nodad = if addr.is_ipv6() { " nodad" } else { "" };
        sh(&format!("ip addr add {} dev lo{nodad}", with_prefix(addr))).unwrap();
        self.0.push(addr);
    }

    fn remove(&mut self, addr: IpAddr) {
        self.0.retain(|a| *a != addr);
        sh(&format!("ip addr del {} dev lo", with_prefix(addr))).unwrap();
    }
}

impl Drop for NodeAddresses {
    fn drop(&mut self) {
        for addr in &self.0 {
            let _ = sh(&format!("ip addr del {} dev lo", with_prefix(*addr)));
        }
    }
}

fn with_prefix(addr: IpAddr) -> String {
    format!("{addr}/{}", if addr.is_ipv4() { 32 } else { 128 })
}

/// A TCP exchange with the pod's echo server from this namespace, from `source` (None: the
/// address the kernel picks, one the node had all along).
fn connects(source: Option<IpAddr>, to: IpAddr, port: u16) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let socket = if to.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(source) = source {
                socket.bind(SocketAddr::new(source, 0))?;
            }
            let mut stream = socket.connect(SocketAddr::new(to, port)).await?;
            stream.write_all(b"moat").await?;
            let mut echo = [0u8; 4];
            stream.read_exact(&mut echo).await?;
            std::io::Result::Ok(&echo == b"moat")
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(700), exchange).await,
            Ok(Ok(true))
        )
    })
}

fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {limit:?}");
}

/// The address's identity in the pinned ipcache (longest-prefix, as the datapath looks it
/// up), and whether the exact-match host mirror holds it.
fn pinned(env: &Env, addr: IpAddr) -> (Option<u32>, bool) {
    let maps = Maps::open(&env.pins()).unwrap();
    let identity = maps.lookup_ipcache(addr).map(|v| v.identity);
    let mirrored = match addr {
        IpAddr::V4(a) => maps
            .hosts_v4
            .get(&IpcacheKeyV4 { addr: a.octets() }, 0)
            .is_ok(),
        IpAddr::V6(a) => maps
            .hosts_v6
            .get(&IpcacheKeyV6 { addr: a.octets() }, 0)
            .is_ok(),
    };
    (identity, mirrored)
}

#[test]
fn an_address_added_to_the_node_later_is_host_for_its_pods() {
    let env = Env::new("hadr");
    env.write("pods.yaml", WEB);
    env.write("deny.yaml", DENY_INGRESS);
    let _daemon = env.start_with(&["--metrics-addr", ""]);

    let mut lab = Lab::new("ha").unwrap();
    let web = lab.add_pod("web").unwrap();
    let _server = probe::EchoServer::start(&web, 8080).unwrap();
    let web_identity = register(&env, &web, "prod").identity;
    let (web_v4, web_v6) = (IpAddr::V4(web.v4), IpAddr::V6(web.v6));

    // Addresses no one else uses, given to the node only after moatd started.
    let n = std::process::id();
    let new_v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, (n % 250) as u8 + 2));
    let new_v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x6d, 0xad, 0, 0, 0, n as u16));
    let mut node = NodeAddresses::default();

    // The node's own traffic passes the default deny (IPv4: the node may have no IPv6
    // address but link-local ones); the new addresses are not the node's.
    assert!(connects(None, web_v4, 8080), "the node -> web (v4)");
    for addr in [new_v4, new_v6] {
        assert_ne!(pinned(&env, addr).0, Some(IDENTITY_HOST), "{addr} before");
    }
    let policy_entries = Maps::open(&env.pins()).unwrap().policy.keys().count();

    node.add(new_v4);
    node.add(new_v6);
    eventually("probes from the new v4 address pass", FOLLOW, || {
        connects(Some(new_v4), web_v4, 8080)
    });
    eventually("probes from the new v6 address pass", FOLLOW, || {
        connects(Some(new_v6), web_v6, 8080)
    });
    for addr in [new_v4, new_v6] {
        assert_eq!(pinned(&env, addr), (Some(IDENTITY_HOST), true), "{addr}");
    }
    let status = env.status();
    assert!(
        status.host_addresses.contains(&new_v4) && status.host_addresses.contains(&new_v6),
        "{:?}",
        status.host_addresses
    );

    // Taken away: the addresses are the world again, in the trie and in its mirror.
    node.remove(new_v4);
    node.remove(new_v6);
    eventually(
        "the removed addresses stop being the node's",
        FOLLOW,
        || {
            [new_v4, new_v6].iter().all(|a| {
                let (identity, mirrored) = pinned(&env, *a);
                identity != Some(IDENTITY_HOST) && !mirrored
            })
        },
    );
    assert!(
        !env.status().host_addresses.contains(&new_v4),
        "status still lists {new_v4}"
    );

    // Nothing else was rewritten: the pod keeps its entries and its policy.
    assert_eq!(
        Maps::open(&env.pins()).unwrap().policy.keys().count(),
        policy_entries
    );
    assert_eq!(
        pinned(&env, web_v4).0,
        Some(web_identity),
        "the pod's own entry"
    );
    assert!(connects(None, web_v4, 8080), "the node -> web after");

    let _ = moat_datapath::detach_endpoint(&env.pins(), &web.host_if);
    drop(node);
    drop(lab);
}
