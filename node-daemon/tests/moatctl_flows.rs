//! moatctl against a private moatd on the real kernel: `status` reports the programs, map
//! fill and event loss with numbers that match what the test created and what the kernel
//! counted; every drop in `flows` (default deny included) names its reason and the policy
//! that selected the pod; `flows --follow` streams exactly what the journal holds; the
//! journal survives a restart and stays within its size limit. All output is parsed JSON
//! from the real moatctl binary.

mod support_moatd;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use moat_common::{LAYOUT_VERSION, METRIC_EVENTS_RATE_LIMITED};
use moat_datapath::Maps;
use moat_testkit::lab::{Lab, LabPod, probe};
use moatd::{api::DaemonStatus, flows::FlowRecord};
use support_moatd::{Env, LONG, SHORT, register};

fn pod_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: fl\n  labels:\n    app: {name}\n---\n"
    )
}

/// web admits only client on 8080; client may only reach web on 8080; other is open.
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-ingress
  namespace: fl
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: client
    ports:
    - port: 8080
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: client-egress
  namespace: fl
spec:
  podSelector:
    matchLabels:
      app: client
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector:
        matchLabels:
          app: web
    ports:
    - port: 8080
"#;

struct World {
    env: Env,
    lab: Lab,
    web: LabPod,
    client: LabPod,
    other: LabPod,
    _servers: Vec<probe::EchoServer>,
}

impl World {
    fn new(tag: &str, daemon_flags: &[&str]) -> (World, support_moatd::Daemon) {
        let env = Env::new(tag);
        env.write(
            "pods.yaml",
            &(pod_yaml("web") + &pod_yaml("client") + &pod_yaml("other")),
        );
        env.write("policies.yaml", POLICIES);
        let daemon = env.start_with(daemon_flags);
        let mut lab = Lab::new(tag).unwrap();
        let web = lab.add_pod("web").unwrap();
        let client = lab.add_pod("client").unwrap();
        let other = lab.add_pod("other").unwrap();
        let servers = [&web, &other]
            .iter()
            .map(|p| probe::EchoServer::start(p, 8080).unwrap())
            .collect();
        for pod in [&web, &client, &other] {
            register(&env, pod, "fl");
        }
        let world = World {
            env,
            lab,
            web,
            client,
            other,
            _servers: servers,
        };
        (world, daemon)
    }

    fn moatctl(&self, args: &[&str]) -> String {
        self.env.moatctl(args)
    }

    fn status(&self) -> DaemonStatus {
        serde_json::from_str(&self.moatctl(&["-o", "json", "status"])).unwrap()
    }

    fn dropped(&self) -> Vec<FlowRecord> {
        serde_json::from_str(&self.moatctl(&["-o", "json", "flows", "--verdict", "dropped"]))
            .unwrap()
    }

    /// `count` UDP datagrams from `from` to `to`:8080 as fast as one socket sends them.
    fn udp_burst(&self, from: &LabPod, to: &LabPod, count: usize) {
        let target = SocketAddr::new(IpAddr::V4(to.v4), 8080);
        from.run(move || {
            let socket = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            for _ in 0..count {
                socket.send_to(b"x", target).unwrap();
            }
        })
        .unwrap();
    }

    fn cleanup(self) {
        for pod in [&self.web, &self.client, &self.other] {
            let _ = moat_datapath::detach_endpoint(&self.env.pins(), &pod.host_if);
        }
        drop(self.lab);
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

/// Packets dropped by default deny (the only drops these tests cause; each one is an event
/// attempt), both directions, summed over CPUs.
fn kernel_drops(maps: &Maps) -> u64 {
    maps.counters()
        .unwrap()
        .iter()
        .filter(|c| c.reason == moat_common::reason::DEFAULT_DENY)
        .map(|c| c.packets)
        .sum()
}

#[test]
fn status_reports_programs_map_fill_and_event_loss_that_match_the_kernel() {
    // A tiny event budget, so that the rate limiter visibly drops events.
    let flags = [
        "--event-rate-per-cpu",
        "1",
        "--event-burst",
        "2",
        "--local-delivery",
        "host-stack",
    ];
    let (w, _daemon) = World::new("mst", &flags);
    assert!(probe::tcp(&w.client, IpAddr::V4(w.web.v4), 8080, LONG));
    assert!(probe::tcp(&w.web, IpAddr::V4(w.other.v4), 8080, LONG));
    w.udp_burst(&w.other, &w.web, 200);

    let maps = Maps::open(&w.env.pins()).unwrap();
    // Events the kernel attempted are either received by moatd or counted as lost.
    wait_until("every attempted event is received or counted lost", || {
        let s = w.status();
        let e = s.datapath.unwrap().events;
        e.received + e.rate_limited + e.ring_full == kernel_drops(&maps)
    });
    let s = w.status();
    assert!(s.ready);
    assert_eq!(s.datastore, "local");
    assert_eq!(s.endpoints, 3);
    let dp = s.datapath.clone().expect("datapath status");
    assert_eq!(dp.layout_version, LAYOUT_VERSION);
    assert!(!dp.maps_adopted, "a fresh pin root is created, not adopted");
    // --local-delivery reached the datapath's config map, and status reads it back.
    assert_eq!(dp.local_delivery, "host-stack");
    let config = maps.config.get(&0, 0).unwrap();
    assert_ne!(config.flags & moat_common::CONFIG_FLAG_LOCAL_VIA_HOST, 0);

    // Programs: both, with kernel ids, tags and a load time from this test run.
    assert_eq!(dp.programs.len(), 2, "{:?}", dp.programs);
    let now = moatd::flows::now_ms();
    for p in &dp.programs {
        assert!(p.id > 0 && p.tag.len() == 16, "{p:?}");
        assert!(p.loaded_ms <= now && now - p.loaded_ms < 600_000, "{p:?}");
    }

    // Map fill: what the test created, and what walking the keys one by one finds.
    let fill = |name: &str| {
        dp.maps
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no map {name} in {:?}", dp.maps))
            .clone()
    };
    let names: Vec<&str> = dp.maps.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "endpoints",
            "ipcache_v4",
            "ipcache_v6",
            "policy",
            "port_ranges",
            "cidr_v4",
            "cidr_v6",
            "conntrack",
            "fqdn_patterns",
            "fqdn_v4",
            "fqdn_v6",
            "fqdn_names"
        ]
    );
    assert_eq!(fill("endpoints").entries, 3);
    assert_eq!(
        fill("endpoints").capacity,
        moat_common::map_size::ENDPOINTS as u64
    );
    assert_eq!(
        fill("endpoints").entries,
        maps.endpoints.keys().count() as u64
    );
    assert_eq!(
        fill("ipcache_v4").entries,
        maps.ipcache_v4.keys().count() as u64
    );
    assert_eq!(
        fill("ipcache_v6").entries,
        maps.ipcache_v6.keys().count() as u64
    );
    assert!(fill("ipcache_v4").entries >= 3 && fill("ipcache_v6").entries >= 3);
    assert_eq!(fill("policy").entries, maps.policy.keys().count() as u64);
    assert!(fill("policy").entries > 0);
    assert_eq!(
        fill("port_ranges").entries,
        maps.port_ranges.keys().count() as u64
    );
    assert_eq!(fill("cidr_v4").entries, maps.cidr_v4.keys().count() as u64);
    // Two TCP connections, each tracked by both perimeters it crossed (client's egress and
    // web's ingress; web's egress and other's ingress); nothing else made state.
    let ct = fill("conntrack");
    assert_eq!(ct.entries, maps.conntrack.keys().count() as u64);
    assert!(ct.entries >= 4, "{ct:?}");
    assert_eq!(ct.capacity, moat_common::map_size::CONNTRACK as u64);

    // Event loss: the limit in force, and the kernel's own counter.
    let e = dp.events;
    assert_eq!((e.rate_per_cpu, e.burst), (1, 2));
    assert!(e.rate_limited > 0, "{e:?}");
    assert_eq!(
        e.rate_limited,
        maps.special_counter(METRIC_EVENTS_RATE_LIMITED).unwrap()
    );
    assert_eq!(e.journal_write_failed, 0);
    // What was received is what the journal holds.
    assert_eq!(e.received as usize, w.dropped().len());

    // The table is printed from the same struct.
    let table = w.moatctl(&["status"]);
    for needle in [
        "moat_from_container",
        "moat_to_container",
        &format!("rate-limited {}", e.rate_limited),
        "limit 1/s per CPU (burst 2)",
    ] {
        assert!(table.contains(needle), "{needle:?} not in:\n{table}");
    }
    // The map table's columns are as wide as its longest map name.
    let ct_entries = ct.entries.to_string();
    assert!(
        table.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.first() == Some(&"conntrack") && cells.get(1) == Some(&ct_entries.as_str())
        }),
        "conntrack with {ct_entries} entries not in:\n{table}"
    );
    let yaml = moat_policy::yaml::documents(&w.moatctl(&["-o", "yaml", "status"]))
        .unwrap()
        .remove(0);
    assert_eq!(yaml["datapath"]["layout_version"], LAYOUT_VERSION);
    w.cleanup();
}

#[test]
fn drops_are_attributed_followed_and_journaled_across_restarts_within_the_size_limit() {
    let flags = [
        "--journal-file-bytes",
        "16384",
        "--journal-files",
        "3",
        "--event-rate-per-cpu",
        "100000",
        "--event-burst",
        "100000",
    ];
    let (w, mut daemon) = World::new("mfl", &flags);
    // Without --local-delivery, linked local flows are delivered directly.
    assert_eq!(w.status().datapath.unwrap().local_delivery, "direct");
    // A follower from the start: it must print exactly what the journal gets.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .arg("--socket")
        .arg(w.env.socket())
        .args(["-o", "json", "flows", "--follow", "--verdict", "dropped"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    assert!(probe::tcp(&w.client, IpAddr::V4(w.web.v4), 8080, LONG));
    // Ingress default deny at web, egress default deny at client.
    assert!(!probe::tcp(&w.other, IpAddr::V4(w.web.v4), 8080, SHORT));
    assert!(!probe::tcp(&w.client, IpAddr::V4(w.other.v4), 8080, SHORT));
    assert!(!probe::udp(&w.client, IpAddr::V4(w.other.v4), 8080, SHORT));

    wait_until("both drops are journaled", || {
        let d = w.dropped();
        d.iter().any(|r| r.endpoint.as_deref() == Some("fl/web"))
            && d.iter().any(|r| r.endpoint.as_deref() == Some("fl/client"))
    });
    std::thread::sleep(Duration::from_millis(300));
    let drops = w.dropped();
    // Every drop names its reason, the pod whose perimeter dropped it, and the policy.
    for r in &drops {
        assert_eq!(r.verdict, "dropped");
        assert_eq!(r.reason, "default-deny", "{r:?}");
        let want = match (r.endpoint.as_deref(), r.direction.name()) {
            (Some("fl/web"), "ingress") => "fl/web-ingress",
            (Some("fl/client"), "egress") => "fl/client-egress",
            other => panic!("unexpected drop at {other:?}: {r:?}"),
        };
        assert!(
            r.rule.contains(&format!("selected by {want}")) && r.rule.contains("no rule allows"),
            "{r:?}"
        );
        assert!(r.peer.is_some(), "{r:?}");
    }
    assert!(drops.iter().any(|r| r.protocol == "UDP"));

    // The follower printed the same records, one JSON object per line, none twice.
    let stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .map(|l| serde_json::from_str::<FlowRecord>(&l).unwrap())
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(500));
    follower.kill().unwrap();
    follower.wait().unwrap();
    let followed = reader.join().unwrap();
    assert_eq!(followed, drops);

    // Restart: the history is still there, numbering continues, and a follower started
    // later gets the history first.
    daemon.kill();
    daemon = w.env.start_with(&flags);
    assert_eq!(w.dropped(), drops, "journal survives the restart");

    // Flood: far more than the journal may keep (3 files of 16 KiB).
    let maps = Maps::open(&w.env.pins()).unwrap();
    let before = kernel_drops(&maps);
    w.udp_burst(&w.other, &w.web, 3000);
    wait_until("the flood is received", || {
        let e = w.status().datapath.unwrap().events;
        e.received + e.rate_limited + e.ring_full >= kernel_drops(&maps) - before
            && kernel_drops(&maps) - before >= 3000
    });
    std::thread::sleep(Duration::from_millis(300));
    let journal_dir = w.env.root().join("state/flows");
    let files: Vec<u64> = std::fs::read_dir(&journal_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert!(files.len() <= 3, "{files:?}");
    // A file may pass the limit by at most the record that crossed it.
    assert!(files.iter().all(|len| *len < 16384 + 1024), "{files:?}");
    let kept = w.dropped();
    assert!(!kept.is_empty() && kept.len() < 3000, "{}", kept.len());
    assert!(
        !kept.contains(&drops[0]),
        "the oldest records were rotated out"
    );

    drop(daemon);
    w.cleanup();
}
