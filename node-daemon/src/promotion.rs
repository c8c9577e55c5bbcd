//! Automatic promotion of a workload from learn to audit to enforce (MoatPolicy
//! `spec.promotion`). Pure: flows and the time come in, transitions come out; the daemon
//! wires it to the flow journal, the engine and the state directory (daemon/promotion.rs).
//!
//! A workload is the set of pods one MoatPolicy with `promotion` selects. It starts in learn.
//! Each learned flow (a learn-mode record of one of its pods) is a rule: peer, protocol,
//! destination port, direction. Once no new rule has appeared for `learnFor` (and the stage
//! is at least that old, and something was learned), the rules become a proposed
//! NetworkPolicy (`moat-promoted-<policy>`, selecting the same pods) and the workload moves to
//! audit under it. Every flow that policy would deny (an audit record) restarts the audit
//! window; once none has been seen for `auditFor`, the workload enforces.
//!
//! Never wider: rules are learned in learn only; a would-deny flow in audit is not added to
//! the proposal (it holds the promotion back; the operator decides, e.g. by reverting to
//! learn). Enforcing adds nothing. Every transition is recorded with its reason; `pause`
//! holds the stage, `revert` steps back one stage (audit -> learn drops the proposal).

use std::collections::BTreeMap;

use moat_policy::{LabelSet, Mode, PodRef};
use serde::{Deserialize, Serialize};

use crate::api::{Direction, FlowRecord, Verdict};
use crate::suggest::{LearnedRule, learned_rule, rules_yaml};

/// Rules one workload may learn; past it the workload stays in learn (a proposal that large
/// is not a perimeter) and says so.
pub const MAX_RULES: usize = 512;
/// Transitions kept per workload.
pub const MAX_HISTORY: usize = 32;
/// Prefix of a proposed policy's name.
pub const PROPOSAL_PREFIX: &str = "moat-promoted-";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Learn,
    Audit,
    Enforce,
}

impl Stage {
    pub fn mode(self) -> Mode {
        match self {
            Stage::Learn => Mode::Learn,
            Stage::Audit => Mode::Audit,
            Stage::Enforce => Mode::Enforce,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Learn => "learn",
            Stage::Audit => "audit",
            Stage::Enforce => "enforce",
        }
    }
}

/// One recorded transition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Unix seconds.
    pub at: u64,
    pub from: Stage,
    pub to: Stage,
    pub why: String,
}

/// The windows of one workload, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Windows {
    pub learn: u64,
    pub audit: u64,
}

/// One workload's promotion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub stage: Stage,
    /// When the current stage began (unix seconds).
    pub stage_since: u64,
    /// Learn: when the last new rule was learned; audit: when a flow was last would-denied.
    pub quiet_since: u64,
    pub paused: bool,
    /// Learned rules (ingress and egress) with the flows seen for each.
    #[serde(with = "rule_list")]
    pub rules: BTreeMap<(Direction, LearnedRule), u64>,
    /// Rules not learned because of MAX_RULES.
    pub overflow: u64,
    /// Flows the proposal would have denied during the current audit stage.
    pub would_deny: u64,
    /// The proposed NetworkPolicy (YAML), from the move to audit on.
    pub proposal: Option<String>,
    pub history: Vec<Step>,
}

/// JSON object keys must be strings: the rule map is stored as a list of pairs.
mod rule_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    type Rules = BTreeMap<(Direction, LearnedRule), u64>;

    pub fn serialize<S: Serializer>(rules: &Rules, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(rules.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Rules, D::Error> {
        let pairs: Vec<((Direction, LearnedRule), u64)> = Vec::deserialize(d)?;
        Ok(pairs.into_iter().collect())
    }
}

/// What a tick changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Stage,
    pub to: Stage,
    pub why: String,
}

impl Promotion {
    pub fn start(now: u64) -> Self {
        Self {
            stage: Stage::Learn,
            stage_since: now,
            quiet_since: now,
            paused: false,
            rules: BTreeMap::new(),
            overflow: 0,
            would_deny: 0,
            proposal: None,
            history: Vec::new(),
        }
    }

    /// Takes one flow of one of the workload's pods (already matched to it). Returns whether
    /// anything changed (for persistence).
    pub fn observe(
        &mut self,
        record: &FlowRecord,
        labels_of: &impl Fn(&PodRef) -> Option<LabelSet>,
        now: u64,
    ) -> bool {
        match self.stage {
            Stage::Learn if record.mode == Mode::Learn => {
                let Some((_, direction, rule)) = learned_rule(record, labels_of) else {
                    return false;
                };
                let key = (direction, rule);
                if let Some(hits) = self.rules.get_mut(&key) {
                    *hits += 1;
                    return false;
                }
                if self.rules.len() >= MAX_RULES {
                    self.overflow += 1;
                } else {
                    self.rules.insert(key, 1);
                }
                // A new peer (also one past the cap) restarts the learning window.
                self.quiet_since = now;
                true
            }
            Stage::Audit if record.verdict == Verdict::Audit => {
                self.would_deny += 1;
                self.quiet_since = now;
                true
            }
            _ => false,
        }
    }

    /// Moves on when the current stage's window has passed quietly.
    pub fn tick(
        &mut self,
        now: u64,
        windows: Windows,
        propose: impl FnOnce(&Self) -> String,
    ) -> Option<Transition> {
        if self.paused {
            return None;
        }
        let quiet_for = |window: u64| {
            now.saturating_sub(self.quiet_since) >= window
                && now.saturating_sub(self.stage_since) >= window
        };
        let (to, why) = match self.stage {
            Stage::Learn if quiet_for(windows.learn) => {
                if self.rules.is_empty() || self.overflow > 0 {
                    return None;
                }
                (
                    Stage::Audit,
                    format!(
                        "no new peer for {}s; proposed {} learned rule(s)",
                        windows.learn,
                        self.rules.len()
                    ),
                )
            }
            Stage::Audit if quiet_for(windows.audit) => (
                Stage::Enforce,
                format!("no flow would have been denied for {}s", windows.audit),
            ),
            _ => return None,
        };
        if to == Stage::Audit {
            self.proposal = Some(propose(self));
        }
        Some(self.go(to, now, why))
    }

    fn go(&mut self, to: Stage, now: u64, why: String) -> Transition {
        let from = self.stage;
        self.stage = to;
        self.stage_since = now;
        self.quiet_since = now;
        self.would_deny = 0;
        self.history.push(Step {
            at: now,
            from,
            to,
            why: why.clone(),
        });
        if self.history.len() > MAX_HISTORY {
            self.history.remove(0);
        }
        Transition { from, to, why }
    }

    /// One stage back (enforce -> audit, audit -> learn, dropping the proposal); `None` in
    /// learn.
    pub fn revert(&mut self, now: u64, who: &str) -> Option<Transition> {
        let to = match self.stage {
            Stage::Learn => return None,
            Stage::Audit => Stage::Learn,
            Stage::Enforce => Stage::Audit,
        };
        if to == Stage::Learn {
            self.proposal = None;
        }
        Some(self.go(to, now, format!("reverted by {who}")))
    }

    /// Why the workload is not moving on, for status.
    pub fn waiting_for(&self, now: u64, windows: Windows) -> String {
        if self.paused {
            return "paused".into();
        }
        let left = |window: u64| {
            let quiet = now.saturating_sub(self.quiet_since);
            let age = now.saturating_sub(self.stage_since);
            window.saturating_sub(quiet.min(age))
        };
        match self.stage {
            Stage::Learn if self.overflow > 0 => format!(
                "more than {MAX_RULES} distinct peers: too many for a proposal; narrow the \
                 workload or write its policy"
            ),
            Stage::Learn if self.rules.is_empty() => "no flow learned yet".into(),
            Stage::Learn => format!("{}s without a new peer", left(windows.learn)),
            Stage::Audit => format!("{}s without a would-deny flow", left(windows.audit)),
            Stage::Enforce => "done".into(),
        }
    }
}

/// The proposed NetworkPolicy: the learned rules of each direction that saw any, for the
/// pods `pod_selector` (JSON, valid YAML flow style) selects in `namespace`.
pub fn proposal_yaml(
    namespace: &str,
    policy_name: &str,
    pod_selector: &serde_json::Value,
    promotion: &Promotion,
) -> String {
    let mut types = Vec::new();
    let mut body = String::new();
    for (direction, kind) in [
        (Direction::Ingress, "Ingress"),
        (Direction::Egress, "Egress"),
    ] {
        let rules: Vec<(&LearnedRule, u64)> = promotion
            .rules
            .iter()
            .filter(|((d, _), _)| *d == direction)
            .map(|((_, rule), hits)| (rule, *hits))
            .collect();
        if rules.is_empty() {
            continue;
        }
        types.push(kind);
        body.push_str(&rules_yaml(namespace, direction, rules));
    }
    format!(
        "# Proposed by moatd's promotion of MoatPolicy {namespace}/{policy_name} from the flows \
         it learned\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: \
         {}\n  namespace: {namespace}\nspec:\n  podSelector: {pod_selector}\n  policyTypes: \
         [{}]\n{body}",
        proposal_name(policy_name),
        types.join(", ")
    )
}

/// The proposed policy's name (within the 253 characters of an object name).
pub fn proposal_name(policy_name: &str) -> String {
    let mut name = format!("{PROPOSAL_PREFIX}{policy_name}");
    name.truncate(253);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Windows = Windows {
        learn: 60,
        audit: 120,
    };

    fn labels(app: &str) -> LabelSet {
        LabelSet(BTreeMap::from([("app".to_string(), app.to_string())]))
    }

    fn labels_of(p: &PodRef) -> Option<LabelSet> {
        Some(labels(&p.name))
    }

    fn flow(mode: Mode, verdict: Verdict, peer: &str, port: u16) -> FlowRecord {
        FlowRecord {
            time_ms: 0,
            verdict,
            reason: String::new(),
            direction: Direction::Ingress,
            mode,
            protocol: "TCP".into(),
            source: "10.0.0.9".into(),
            destination: "10.0.0.1".into(),
            source_port: 40000,
            destination_port: port,
            endpoint: Some("shop/web".into()),
            peer: Some(format!("shop/{peer}")),
            local_identity: 1,
            remote_identity: 2,
            rule_id: 0,
            rule: String::new(),
            bytes: 0,
        }
    }

    fn learned(peer: &str, port: u16) -> FlowRecord {
        flow(Mode::Learn, Verdict::Allowed, peer, port)
    }

    fn propose(p: &Promotion) -> String {
        proposal_yaml(
            "shop",
            "web",
            &serde_json::json!({"matchLabels": {"app": "web"}}),
            p,
        )
    }

    #[test]
    fn a_workload_walks_learn_audit_enforce_when_its_windows_pass_quietly() {
        // The fake clock: plain seconds.
        let mut p = Promotion::start(1_000);
        assert!(p.observe(&learned("client", 8080), &labels_of, 1_010));
        assert!(
            !p.observe(&learned("client", 8080), &labels_of, 1_020),
            "seen"
        );
        assert_eq!(p.tick(1_069, W, propose), None, "59 s quiet");
        let t = p.tick(1_070, W, propose).expect("60 s without a new peer");
        assert_eq!((t.from, t.to), (Stage::Learn, Stage::Audit));
        let yaml = p.proposal.clone().unwrap();
        let policy = moat_policy::NetworkPolicy::from_yaml(&yaml).expect("valid NetworkPolicy");
        assert_eq!(policy.name(), "moat-promoted-web");
        assert!(
            yaml.contains("port: 8080") && yaml.contains("app: \"client\""),
            "{yaml}"
        );
        assert!(yaml.contains("policyTypes: [Ingress]"), "{yaml}");

        // A would-deny flow restarts the audit window; a learn record changes nothing now.
        assert!(p.observe(
            &flow(Mode::Audit, Verdict::Audit, "stranger", 22),
            &labels_of,
            1_100
        ));
        assert!(!p.observe(&learned("other", 9), &labels_of, 1_150));
        assert_eq!(p.tick(1_219, W, propose), None);
        let t = p
            .tick(1_220, W, propose)
            .expect("120 s without a would-deny");
        assert_eq!((t.from, t.to), (Stage::Audit, Stage::Enforce));
        assert_eq!(p.rules.len(), 1, "audit and enforce learn nothing");
        assert_eq!(p.tick(99_999, W, propose), None, "enforce is the end");
        let stages: Vec<_> = p.history.iter().map(|s| (s.from, s.to, s.at)).collect();
        assert_eq!(
            stages,
            [
                (Stage::Learn, Stage::Audit, 1_070),
                (Stage::Audit, Stage::Enforce, 1_220)
            ]
        );
    }

    #[test]
    fn new_peers_hold_learning_and_nothing_learned_proposes_nothing() {
        let mut p = Promotion::start(0);
        assert_eq!(p.tick(500, W, propose), None, "nothing learned");
        assert_eq!(p.waiting_for(500, W), "no flow learned yet");
        p.observe(&learned("a", 1), &labels_of, 500);
        p.observe(&learned("b", 2), &labels_of, 550);
        assert_eq!(p.tick(600, W, propose), None);
        assert_eq!(p.waiting_for(600, W), "10s without a new peer");
        assert!(p.tick(610, W, propose).is_some());
    }

    #[test]
    fn pause_holds_and_revert_steps_back_dropping_the_proposal() {
        let mut p = Promotion::start(0);
        p.observe(&learned("a", 1), &labels_of, 0);
        p.paused = true;
        assert_eq!(p.tick(1_000, W, propose), None);
        p.paused = false;
        p.tick(1_000, W, propose).unwrap();
        p.tick(2_000, W, propose).unwrap();
        assert_eq!(p.stage, Stage::Enforce);
        let back = p.revert(2_001, "moatctl").unwrap();
        assert_eq!((back.from, back.to), (Stage::Enforce, Stage::Audit));
        assert!(p.proposal.is_some(), "audit keeps its proposal");
        p.revert(2_002, "moatctl").unwrap();
        assert_eq!((p.stage, p.proposal.clone()), (Stage::Learn, None));
        assert_eq!(p.revert(2_003, "moatctl"), None);
        assert_eq!(p.history.last().unwrap().why, "reverted by moatctl");
    }

    #[test]
    fn too_many_peers_keep_the_workload_learning() {
        let mut p = Promotion::start(0);
        for port in 0..=MAX_RULES as u16 {
            p.observe(&learned("a", port + 1), &labels_of, 0);
        }
        assert_eq!((p.rules.len(), p.overflow), (MAX_RULES, 1));
        assert_eq!(p.tick(10_000, W, propose), None);
        assert!(p.waiting_for(10_000, W).contains("too many"));
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut p = Promotion::start(5);
        p.observe(&learned("a", 1), &labels_of, 6);
        p.tick(100, W, propose).unwrap();
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Promotion>(&text).unwrap(), p);
    }
}
