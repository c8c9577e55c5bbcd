//! moatd's handling of what the datapath learns from DNS answers, end to end on the real
//! pinned maps and the real moatd and moatctl binaries. The kernel's part is simulated: the
//! test writes learned addresses and names into MOAT_FQDN4/6 and MOAT_FQDNNAME as the
//! datapath would. Asserted: moatd writes the TTL settings; `moatctl fqdn` lists learned
//! addresses per identity with their pods, names, TTLs and time left; the sweeper deletes
//! expired addresses and those of identities not on the node, and keeps an identity at its
//! cap by deleting its oldest first, counted in moat_fqdn_capped_total; a kill -9 and restart
//! of moatd keeps every unexpired learned address.

mod support_moatd;

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::IpAddr,
    time::{Duration, Instant},
};

use moat_common::{FqdnAddr, FqdnConfig, IDENTITY_FQDN_FIRST, fqdn_name_hash};
use moat_datapath::FqdnMaps;
use moat_testkit::lab::Lab;
use moatd::api::FqdnIdentity;
use support_moatd::{Env, register};

const S: u64 = 1_000_000_000;
const NAME: &str = "api.example.com";

const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: fq\n  labels:\n    app: client\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: other\n  namespace: fq\n  labels:\n    app: other\n---\n";

fn now() -> u64 {
    moatd::server::monotonic_ns()
}

/// A learned address as the datapath writes it: learned `age` seconds ago, admitting new
/// connections for `left` more seconds (negative: expired that long ago).
fn learned(age: u64, left: i64) -> FqdnAddr {
    let now = now();
    FqdnAddr {
        expires_ns: now.saturating_add_signed(left * S as i64),
        learned_ns: now - age * S,
        name_hash: fqdn_name_hash(NAME.as_bytes()).unwrap(),
        ttl: 1,
        count: 1,
        selectors: [IDENTITY_FQDN_FIRST + 1, 0, 0, 0],
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// (identity, address) of every learned entry in the maps.
fn in_maps(env: &Env) -> BTreeSet<(u32, IpAddr)> {
    FqdnMaps::open(&env.pins())
        .unwrap()
        .learned()
        .iter()
        .map(|l| (l.identity, l.addr))
        .collect()
}

fn listing(env: &Env) -> Vec<FqdnIdentity> {
    serde_json::from_str(&env.moatctl(&["-o", "json", "fqdn"])).unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting until {what}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One sample of a metric without labels from moatd's /metrics.
fn scrape(port: u16, metric: &str) -> Option<f64> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{metric} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn learned_addresses_are_listed_swept_capped_and_survive_a_kill_9() {
    let env = Env::new("fqdn");
    env.write("pods.yaml", PODS);
    let port = free_port();
    let flags = [
        "--fqdn-ttl-floor=5",
        "--fqdn-max-per-identity=3",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ];
    let mut daemon = env.start_with(&flags);
    let mut lab = Lab::new("fqdn").unwrap();
    let client = lab.add_pod("client").unwrap();
    let other = lab.add_pod("other").unwrap();
    let client_id = register(&env, &client, "fq").identity;
    let other_id = register(&env, &other, "fq").identity;
    assert_ne!(client_id, other_id);

    let mut fqdn = FqdnMaps::open(&env.pins()).unwrap();
    assert_eq!(
        fqdn.read_config().unwrap(),
        FqdnConfig {
            ttl_floor_s: 5,
            ttl_cap_s: 86_400
        },
        "moatd writes the TTL settings at start"
    );
    assert_eq!(
        env.status().fqdn,
        "learned addresses admit new connections 5-86400s (the record's TTL within); at most 3 per identity"
    );
    assert!(
        env.moatctl(&["status"])
            .contains("fqdn:        learned addresses")
    );

    // What the kernel learned: three addresses of the client (v4 and v6), one of the other.
    fqdn.insert_name(fqdn_name_hash(NAME.as_bytes()).unwrap(), NAME)
        .unwrap();
    fqdn.insert_learned(client_id, ip("203.0.113.1"), &learned(30, 600))
        .unwrap();
    fqdn.insert_learned(client_id, ip("2001:db8::2"), &learned(20, 600))
        .unwrap();
    fqdn.insert_learned(client_id, ip("203.0.113.3"), &learned(10, 600))
        .unwrap();
    fqdn.insert_learned(other_id, ip("198.51.100.1"), &learned(1, 600))
        .unwrap();

    let rows = listing(&env);
    let row = rows
        .iter()
        .find(|r| r.identity == client_id)
        .unwrap_or_else(|| panic!("no row for the client: {rows:?}"));
    assert_eq!(row.pods, ["fq/client"]);
    assert_eq!(row.labels.get("app").map(String::as_str), Some("client"));
    let addresses: Vec<IpAddr> = row.learned.iter().map(|l| l.address).collect();
    assert_eq!(
        addresses,
        [ip("203.0.113.1"), ip("203.0.113.3"), ip("2001:db8::2")]
    );
    for l in &row.learned {
        assert_eq!((l.name.as_str(), l.ttl), (NAME, 1));
        assert!((590..=600).contains(&l.expires_in_secs), "{l:?}");
        assert_eq!(l.selectors, [IDENTITY_FQDN_FIRST + 1]);
    }
    assert!(
        rows.iter()
            .any(|r| r.identity == other_id && r.learned.len() == 1)
    );
    let table = env.moatctl(&["fqdn"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("fq/client") && l.contains(NAME) && l.contains("203.0.113.3")),
        "{table}"
    );

    // An expired address, two newer ones (the client is then two over its cap of 3), and an
    // address of an identity that is not on this node.
    fqdn.insert_learned(client_id, ip("203.0.113.9"), &learned(40, -1))
        .unwrap();
    fqdn.insert_learned(client_id, ip("203.0.113.4"), &learned(5, 600))
        .unwrap();
    fqdn.insert_learned(client_id, ip("2001:db8::5"), &learned(2, 600))
        .unwrap();
    let gone_identity = 0x00ab_cdef;
    fqdn.insert_learned(gone_identity, ip("192.0.2.1"), &learned(1, 600))
        .unwrap();
    let kept: BTreeSet<(u32, IpAddr)> = [
        (client_id, ip("203.0.113.3")),
        (client_id, ip("203.0.113.4")),
        (client_id, ip("2001:db8::5")),
        (other_id, ip("198.51.100.1")),
    ]
    .into();
    wait_until(
        "the sweeper prunes to the newest three",
        Duration::from_secs(15),
        || in_maps(&env) == kept,
    );
    wait_until(
        "the capped count is exported",
        Duration::from_secs(10),
        || scrape(port, "moat_fqdn_capped_total") == Some(2.0),
    );
    assert_eq!(scrape(port, "moat_fqdn_malformed_total"), Some(0.0));

    // kill -9, then a new moatd: the learned addresses stay through its first sweeps.
    daemon.kill();
    assert_eq!(in_maps(&env), kept, "lost while moatd was down");
    let mut daemon = env.start_with(&flags);
    std::thread::sleep(moatd::fqdn::sweeper::PERIOD * 2 + Duration::from_secs(1));
    assert_eq!(in_maps(&env), kept, "lost across the restart");
    let rows = listing(&env);
    let client_row = rows.iter().find(|r| r.identity == client_id).unwrap();
    assert_eq!(client_row.learned.len(), 3);
    assert_eq!(client_row.pods, ["fq/client"]);

    daemon.kill();
    for pod in [&client, &other] {
        let _ = moat_datapath::detach_endpoint(&env.pins(), &pod.host_if);
    }
    drop(lab);
}
