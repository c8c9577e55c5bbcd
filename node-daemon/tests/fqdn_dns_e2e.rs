//! DNS-name egress end to end: real moatd (local datastore) with a MoatPolicy naming
//! `*.example.test`, a real resolver (dnsmasq) and named hosts outside the pod set, the pod
//! resolving and connecting with real sockets. moatd is killed with -9 in the middle of a
//! stream of new connections to a named host: none fails, and while it is down the kernel
//! keeps learning (a name resolved then is reachable at once).
//!
//! For many nodes: learning happens in the asking pod's own hook, from the answer's bytes,
//! and the learned maps are per node; the resolver and the hosts here are outside the pod set
//! (the world), reached through the host's routes as they would be from any node.

mod support_moatd;

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moat_testkit::{
    dns::{self, Dnsmasq, TYPE_A},
    lab::{Lab, LabPod, probe},
};
use support_moatd::{Env, SHORT, register};

const NS: &str = "fqe";

fn resolve(client: &LabPod, server: IpAddr, name: &str) -> Vec<IpAddr> {
    let name = name.to_string();
    client
        .run(move || {
            let m = dns::ask_udp(server, 0, &dns::query(0x2a2a, &name, TYPE_A))
                .unwrap_or_else(|e| panic!("resolving {name}: {e:#}"));
            dns::answers(&m)
                .unwrap()
                .1
                .into_iter()
                .map(|(a, _)| a)
                .collect()
        })
        .unwrap()
}

#[test]
fn names_resolve_into_allowed_connections_and_a_kill_9_loses_none() {
    let env = Env::new("fqe");
    let mut lab = Lab::new("fqe").unwrap();
    let client = lab.add_pod("client").unwrap();
    let resolver = lab.add_pod("dns").unwrap();
    let web = lab.add_pod("web").unwrap();
    let web2 = lab.add_pod("web2").unwrap();
    let other = lab.add_pod("other").unwrap();
    env.write(
        "pods.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: {NS}\n  labels:\n    app: client\n"
        ),
    );
    env.write(
        "policy.yaml",
        &format!(
            "apiVersion: moat.io/v1alpha1\nkind: MoatPolicy\nmetadata: {{name: names, namespace: {NS}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n\
             \x20 externalGroups: [{{name: resolver, cidrs: ['{}/32']}}]\n\
             \x20 egress:\n\
             \x20 - to: [{{fqdn: '*.example.test'}}]\n    ports: [{{port: 8080}}]\n\
             \x20 - to: [{{group: resolver}}]\n    ports: [{{port: 53, protocol: UDP}}]\n",
            resolver.v4
        ),
    );
    let mut daemon = env.start();
    register(&env, &client, NS);

    let _dnsmasq = Dnsmasq::start(
        &resolver.netns,
        &[IpAddr::V4(resolver.v4)],
        &format!(
            "{} www.example.test\n{} later.example.test\n{} other.test\n",
            web.v4, web2.v4, other.v4
        ),
        1,
        &[],
    )
    .unwrap();
    let _servers: Vec<_> = [&web, &web2, &other]
        .iter()
        .map(|p| probe::EchoServer::start(p, 8080).unwrap())
        .collect();
    let server = IpAddr::V4(resolver.v4);
    let (web4, web2_4, other4) = (
        IpAddr::V4(web.v4),
        IpAddr::V4(web2.v4),
        IpAddr::V4(other.v4),
    );

    // Policy applied and dnsmasq up: the name answers and its address admits a connection.
    assert!(
        !probe::tcp(&client, web4, 8080, SHORT),
        "denied before resolution"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answered = client
            .run(move || dns::ask_udp(server, 0, &dns::query(1, "www.example.test", TYPE_A)))
            .unwrap()
            .is_ok();
        if answered && probe::tcp(&client, web4, 8080, SHORT) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "www.example.test never became reachable"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A name outside the policy resolves but stays denied.
    assert_eq!(resolve(&client, server, "other.test"), vec![other4]);
    assert!(!probe::tcp(&client, other4, 8080, SHORT));
    // TTL 1 s, floor 60 s (moatd's default): still admitted after the TTL.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(probe::tcp(&client, web4, 8080, SHORT), "the TTL floor");
    let listing = env.moatctl(&["fqdn"]);
    assert!(
        listing.contains("www.example.test"),
        "moatctl fqdn:\n{listing}"
    );

    // A stream of new connections to the named host across a kill -9 and restart of moatd.
    let stop = Arc::new(AtomicBool::new(false));
    let (made, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stream = {
        let (client, stop, made, failed) =
            (client.clone(), stop.clone(), made.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if probe::tcp(&client, web4, 8080, SHORT) {
                    made.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    daemon.kill();
    // moatd is down: the kernel still learns, and the new name is reachable at once.
    assert_eq!(resolve(&client, server, "later.example.test"), vec![web2_4]);
    assert!(
        probe::tcp(&client, web2_4, 8080, SHORT),
        "learned while moatd was down"
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut daemon = env.start();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    stream.join().unwrap();
    let (made, failed) = (made.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(
        failed,
        0,
        "connections lost across the kill: {failed} of {}",
        made + failed
    );
    assert!(made >= 20, "only {made} connections in the stream");
    assert!(
        probe::tcp(&client, web2_4, 8080, SHORT),
        "after the restart too"
    );
    eprintln!("fqdn_dns_e2e: {made} connections across kill -9 and restart, 0 failed");

    daemon.kill();
    let _ = moat_datapath::detach_endpoint(&env.pins(), &client.host_if);
    drop(lab);
}
