//! Automatic promotion (issue 20 item 5) on a real moatd with real traffic, in accelerated
//! time (windows of 3 s): a workload whose MoatPolicy has `promotion` starts in learn; after
//! a connection from its client and 3 s without a new peer, moatd proposes a NetworkPolicy
//! allowing exactly that and moves it to audit; a stranger's connection is still let through
//! but counts as would-deny and holds the promotion back; `pause` holds it; once 3 s pass
//! without a would-deny flow it enforces, and the stranger is dropped while the client still
//! connects. `revert` steps back to audit (the stranger passes again), and the stage (paused) survives
//! a moatd restart. (The state machine's own tests, with a fake clock, are in
//! node-daemon/src/promotion.rs.)
//!
//! For many nodes: each node's moatd promotes the workload's pods of its own node from the
//! flows its own datapath reports; the peers may be anywhere (they are learned by identity or
//! address).

mod support_moatd;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use moat_testkit::lab::{Lab, probe};
use moatd::api::PromotionStatus;
use support_moatd::{Env, SHORT, register};

const OBJECTS: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels:\n    app: web\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: shop\n  labels:\n    app: client\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: stranger\n  namespace: shop\n  labels:\n    app: stranger\n---\napiVersion: moat.io/v1alpha1\nkind: MoatPolicy\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  podSelector: {matchLabels: {app: web}}\n  promotion: {learnFor: 3s, auditFor: 3s}\n";

fn promotion(env: &Env) -> PromotionStatus {
    let out = env.moatctl(&["-o", "json", "promotion", "show", "shop/web"]);
    let mut all: Vec<PromotionStatus> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(all.len(), 1, "{out}");
    all.remove(0)
}

fn wait_for_stage(env: &Env, stage: &str, timeout: Duration) -> PromotionStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let p = promotion(env);
        if p.stage == stage {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "still {p:?}, waiting for {stage}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_workload_walks_from_learn_to_enforce_on_its_own_and_can_be_held_and_reverted() {
    let env = Env::new("promo");
    env.write("objects.yaml", OBJECTS);
    let daemon = env.start_with(&["--metrics-addr", ""]);
    let mut lab = Lab::new("promo").unwrap();
    let web = lab.add_pod("web").unwrap();
    let client = lab.add_pod("client").unwrap();
    let stranger = lab.add_pod("stranger").unwrap();
    for pod in [&web, &client, &stranger] {
        register(&env, pod, "shop");
    }
    let _echo = probe::EchoServer::start(&web, 8080).unwrap();
    let to_web = IpAddr::V4(web.v4);

    let p = promotion(&env);
    assert_eq!((p.stage.as_str(), p.learned_rules), ("learn", 0), "{p:?}");
    assert_eq!(p.waiting_for, "no flow learned yet");

    // Learn: the client's connection is the workload's one peer.
    assert!(probe::tcp(&client, to_web, 8080, SHORT));
    let p = wait_for_stage(&env, "audit", Duration::from_secs(20));
    assert_eq!(p.learned_rules, 1, "{p:?}");
    let proposal = p.proposal.clone().expect("a proposal in audit");
    assert!(proposal.contains("name: moat-promoted-web"), "{proposal}");
    assert!(proposal.contains("app: \"client\""), "{proposal}");
    assert!(proposal.contains("port: 8080"), "{proposal}");
    assert!(!proposal.contains("stranger"), "{proposal}");
    assert_eq!(
        (p.history[0].from.as_str(), p.history[0].to.as_str()),
        ("learn", "audit")
    );

    // Audit: the stranger passes, but as a would-deny flow that holds the promotion back.
    assert!(
        probe::tcp(&stranger, to_web, 8080, SHORT),
        "audit drops nothing"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while promotion(&env).would_deny == 0 {
        assert!(Instant::now() < deadline, "the stranger was not counted");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Held: paused past the window, it stays in audit.
    env.moatctl(&["promotion", "pause", "shop/web"]);
    std::thread::sleep(Duration::from_secs(4));
    let p = promotion(&env);
    assert_eq!((p.stage.as_str(), p.paused), ("audit", true), "{p:?}");
    env.moatctl(&["promotion", "resume", "shop/web"]);

    // Enforce: the proposal is the perimeter.
    let p = wait_for_stage(&env, "enforce", Duration::from_secs(20));
    assert_eq!(p.history.len(), 2, "{p:?}");
    assert!(probe::tcp(&client, to_web, 8080, SHORT), "the learned peer");
    assert!(!probe::tcp(&stranger, to_web, 8080, SHORT), "not learned");
    let status = env.moatctl(&["status"]);
    assert!(status.contains("promotion:   shop/web enforce"), "{status}");

    // Revert: one stage back, and the stage outlives moatd.
    let reverted = env.moatctl(&["promotion", "revert", "shop/web"]);
    assert!(reverted.contains("audit"), "{reverted}");
    assert!(probe::tcp(&stranger, to_web, 8080, SHORT), "audit again");
    // Paused, so that the restart's seconds cannot promote it again meanwhile.
    env.moatctl(&["promotion", "pause", "shop/web"]);
    drop(daemon);
    let _daemon = env.start_with(&["--metrics-addr", ""]);
    let p = promotion(&env);
    assert_eq!(
        (p.stage.as_str(), p.paused),
        ("audit", true),
        "after a restart: {p:?}"
    );
    assert_eq!(p.history.last().unwrap().why, "reverted by moatctl");
    assert!(probe::tcp(&stranger, to_web, 8080, SHORT), "still audit");
}
