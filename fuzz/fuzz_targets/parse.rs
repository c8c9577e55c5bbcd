//! Any bytes, as YAML and as JSON, through the policy parsers (NetworkPolicy, MoatPolicy,
//! ClusterNetworkPolicy). Parsing must never panic; an accepted object must normalize
//! (validation promised it) and compile into an engine holding a few pods (compilation may
//! refuse it with an error, never panic); a refused object's error must name an object and a
//! field. DNS-name peers (MoatPolicy `fqdn`, ClusterNetworkPolicy `domainNames`) normalize to
//! patterns that read back as themselves. The same text also goes through the promotion
//! window parser and moatd's `--map-size` parser: accepted values are within their bounds and
//! map sizes print back as themselves.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_policy::cnp::CnpPeer;
use moat_policy::moatpolicy::{MAX_PROMOTION_WINDOW_S, MIN_PROMOTION_WINDOW_S, parse_window};
use moat_policy::netpol::Peer;
use moat_policy::{
    ClusterNetworkPolicy, ContainerPort, Engine, Error, FqdnPattern, MoatPolicy, NetworkPolicy,
    Pod, Protocol,
};

fn engine() -> Engine {
    let mut e = Engine::new();
    for (i, (ns, app)) in [("default", "web"), ("default", "db"), ("ns1", "web")]
        .iter()
        .enumerate()
    {
        e.upsert_pod(Pod {
            namespace: ns.to_string(),
            name: format!("p{i}"),
            labels: [("app", *app)].into_iter().collect(),
            ips: vec![format!("10.0.0.{}", i + 2).parse().unwrap()],
            ports: vec![ContainerPort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::TCP,
            }],
        })
        .unwrap();
    }
    e
}

fn check_error(e: &Error) {
    match e {
        Error::Parse { object, path, .. } | Error::Invalid { object, path, .. } => {
            assert!(!object.is_empty() && !path.is_empty(), "{e}");
        }
        _ => {}
    }
    assert!(!e.to_string().is_empty());
}

fn network_policy(r: Result<NetworkPolicy, Error>) {
    match r {
        Ok(p) => {
            p.normalize().expect("a parsed policy normalizes");
            let mut e = engine();
            let _ = e.upsert_policy(&p);
            let _ = e.delete_policy(p.namespace(), p.name());
        }
        Err(e) => check_error(&e),
    }
}

/// A normalized pattern is canonical: its text parses back to it.
fn check_pattern(p: &FqdnPattern) {
    assert_eq!(FqdnPattern::parse(&p.to_string()).as_ref(), Ok(p), "{p}");
    let _ = p.name_hash();
}

fn moat_policy(r: Result<MoatPolicy, Error>) {
    match r {
        Ok(p) => {
            let n = p.normalize().expect("a parsed policy normalizes");
            for peer in n
                .policy
                .egress
                .iter()
                .flatten()
                .flat_map(|r| r.peers.iter().flatten())
            {
                if let Peer::Fqdn(pattern) = peer {
                    check_pattern(pattern);
                }
            }
            // Validation promised readable promotion windows within bounds, and no mode.
            if let Some(promotion) = &p.spec.promotion {
                let (learn, audit) = promotion.windows().expect("validated windows");
                let bounds = MIN_PROMOTION_WINDOW_S..=MAX_PROMOTION_WINDOW_S;
                assert!(bounds.contains(&learn) && bounds.contains(&audit));
                assert!(p.spec.mode.is_none());
            }
            let mut e = engine();
            let _ = e.upsert_moat_policy(&p);
            let _ = e.delete_moat_policy(p.namespace(), p.name());
        }
        Err(e) => check_error(&e),
    }
}

fn cluster_policy(r: Result<ClusterNetworkPolicy, Error>) {
    match r {
        Ok(p) => {
            let n = p.normalize().expect("a parsed policy normalizes");
            for peer in n.egress.iter().flat_map(|r| r.peers.iter().flatten()) {
                if let CnpPeer::Fqdn(pattern) = peer {
                    check_pattern(pattern);
                }
            }
            let mut e = engine();
            let _ = e.upsert_cluster_policy(&p);
            let _ = e.delete_cluster_policy(p.name());
        }
        Err(e) => check_error(&e),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    network_policy(NetworkPolicy::from_json(text));
    network_policy(NetworkPolicy::from_yaml(text));
    moat_policy(MoatPolicy::from_json(text));
    moat_policy(MoatPolicy::from_yaml(text));
    // The promotion window syntax on its own, and moatd's --map-size assignments.
    if let Ok(secs) = parse_window(text) {
        assert!((MIN_PROMOTION_WINDOW_S..=MAX_PROMOTION_WINDOW_S).contains(&secs));
    }
    if let Ok(sizes) = text.parse::<moat_datapath::MapSizes>() {
        for (_, entries) in sizes.per_map() {
            assert!(
                (moat_datapath::sizes::MIN_ENTRIES..=moat_datapath::sizes::MAX_ENTRIES)
                    .contains(&entries)
            );
        }
        assert_eq!(
            sizes.to_string().parse::<moat_datapath::MapSizes>(),
            Ok(sizes)
        );
    }
    cluster_policy(ClusterNetworkPolicy::from_json(text));
    cluster_policy(ClusterNetworkPolicy::from_yaml(text));
    if let Ok(all) = NetworkPolicy::all_from_yaml(text) {
        all.into_iter().for_each(|p| network_policy(Ok(p)));
    }
});
