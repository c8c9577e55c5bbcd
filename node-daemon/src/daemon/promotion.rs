//! The daemon's side of automatic promotion (crate::promotion has the state machine): the
//! stage of each workload is the mode its MoatPolicy gives the engine, the proposal is a
//! NetworkPolicy in the engine, flows from the journal feed the machines, a tick moves them
//! on, and the state lives in `promotions.json` in the state directory.

use std::{collections::BTreeMap, path::Path};

use moat_policy::{MoatPolicy, NetworkPolicy, PodRef};
use tracing::{info, warn};

use super::Daemon;
use crate::{
    api::{FlowRecord, PromotionAction, PromotionStatus, PromotionStep},
    promotion::{Promotion, Stage, Windows, proposal_name, proposal_yaml},
};

/// (namespace, MoatPolicy name) -> its promotion.
pub type Book = BTreeMap<(String, String), Promotion>;

const FILE: &str = "promotions.json";

/// Stored as a list: JSON object keys must be strings.
pub fn load(state_dir: &Path) -> Book {
    let path = state_dir.join(FILE);
    let pairs: Vec<((String, String), Promotion)> = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(pairs) => pairs,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "promotion state unreadable; workloads under promotion start again in learn");
                Vec::new()
            }
        },
        Err(_) => Vec::new(),
    };
    pairs.into_iter().collect()
}

pub fn now_secs() -> u64 {
    crate::flows::now_ms() / 1000
}

fn windows_of(policy: &MoatPolicy) -> Option<Windows> {
    let (learn, audit) = policy.spec.promotion.as_ref()?.windows().ok()?;
    Some(Windows { learn, audit })
}

impl Daemon {
    /// The MoatPolicy the engine sees: under promotion, with the stage as its mode (a new
    /// workload starts in learn), and the stage's proposal in the engine beside it.
    pub(super) fn admit_promotion(
        &mut self,
        namespace: &str,
        name: &str,
        policy: &MoatPolicy,
    ) -> MoatPolicy {
        let key = (namespace.to_string(), name.to_string());
        if policy.spec.promotion.is_none() {
            self.forget_promotion(namespace, name);
            return policy.clone();
        }
        let promotion = self.promotions.entry(key).or_insert_with(|| {
            info!(policy = %format!("{namespace}/{name}"), "promotion starts in learn");
            Promotion::start(now_secs())
        });
        let stage = promotion.stage;
        let proposal = promotion.proposal.clone();
        self.save_promotions();
        if stage >= Stage::Audit
            && let Some(yaml) = proposal
        {
            self.install_proposal(&yaml);
        }
        let mut effective = policy.clone();
        effective.spec.mode = Some(stage.mode());
        effective.spec.promotion = None;
        effective
    }

    /// The MoatPolicy is gone or no longer promotes: its state and proposal go.
    pub(super) fn forget_promotion(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        if let Some(old) = self.promotions.remove(&key) {
            if old.proposal.is_some() {
                let _ = self.change(|e| e.delete_policy(namespace, &proposal_name(name)));
            }
            self.save_promotions();
        }
    }

    fn install_proposal(&mut self, yaml: &str) {
        match NetworkPolicy::from_yaml(yaml) {
            Ok(policy) => {
                if let Err(e) = self.change(|e| e.upsert_policy(&policy)) {
                    warn!(error = %e, "promotion proposal refused by the engine");
                }
            }
            Err(e) => warn!(error = %e, "promotion proposal does not parse"),
        }
    }

    /// Feeds journaled flows to the promotions of the workloads they belong to.
    pub fn observe_promotions(&mut self, records: &[FlowRecord]) {
        if self.promotions.is_empty() {
            return;
        }
        let now = now_secs();
        let pods = &self.objects.pods;
        let labels_of = |p: &PodRef| {
            pods.get(&(p.namespace.clone(), p.name.clone()))
                .map(|m| m.labels.clone())
        };
        for record in records {
            let Some((ns, pod)) = record.endpoint.as_deref().and_then(|e| e.split_once('/')) else {
                continue;
            };
            let Some(labels) = labels_of(&PodRef::new(ns, pod)) else {
                continue;
            };
            for ((pns, pname), promotion) in self
                .promotions
                .range_mut((ns.to_string(), String::new())..(format!("{ns}\u{0}"), String::new()))
            {
                let selects = self
                    .objects
                    .moat_policies
                    .get(&(pns.clone(), pname.clone()))
                    .is_some_and(|p| p.spec.pod_selector.matches(&labels));
                if selects && promotion.observe(record, &labels_of, now) {
                    self.promotions_dirty = true;
                }
            }
        }
    }

    /// Moves each workload on whose window passed; writes the maps if any did.
    pub fn tick_promotions(&mut self, now: u64) {
        if self.hold_writes || self.awaiting_sync {
            return;
        }
        // A MoatPolicy deleted (or no longer promoting) while moatd was down.
        let stale: Vec<(String, String)> = self
            .promotions
            .keys()
            .filter(|k| {
                self.objects
                    .moat_policies
                    .get(k)
                    .is_none_or(|p| p.spec.promotion.is_none())
            })
            .cloned()
            .collect();
        for (ns, name) in stale {
            self.forget_promotion(&ns, &name);
        }
        let mut moved = Vec::new();
        for ((ns, name), promotion) in self.promotions.iter_mut() {
            let Some(policy) = self.objects.moat_policies.get(&(ns.clone(), name.clone())) else {
                continue;
            };
            let Some(windows) = windows_of(policy) else {
                continue;
            };
            let selector = serde_json::to_value(&policy.spec.pod_selector).unwrap_or_default();
            if let Some(t) = promotion.tick(now, windows, |p| proposal_yaml(ns, name, &selector, p))
            {
                info!(
                    policy = %format!("{ns}/{name}"),
                    from = t.from.name(),
                    to = t.to.name(),
                    why = %t.why,
                    "promotion"
                );
                moved.push((ns.clone(), name.clone()));
            }
        }
        if moved.is_empty() {
            if std::mem::take(&mut self.promotions_dirty) {
                self.save_promotions();
            }
            return;
        }
        self.save_promotions();
        self.readmit(&moved);
    }

    /// Puts the moved workloads' MoatPolicies (with their new stage) and proposals into the
    /// engine and the maps.
    fn readmit(&mut self, keys: &[(String, String)]) {
        for (ns, name) in keys {
            let Some(policy) = self
                .objects
                .moat_policies
                .get(&(ns.clone(), name.clone()))
                .cloned()
            else {
                continue;
            };
            if self
                .promotions
                .get(&(ns.clone(), name.clone()))
                .is_some_and(|p| p.proposal.is_none())
            {
                let _ = self.change(|e| e.delete_policy(ns, &proposal_name(name)));
            }
            let effective = self.admit_promotion(ns, name, &policy);
            if let Err(e) = self.change(|e| e.upsert_moat_policy(&effective)) {
                warn!(policy = %format!("{ns}/{name}"), error = %e, "promotion: applying the new stage");
            }
        }
        self.refresh_modes();
        if let Err(e) = self.reconcile() {
            warn!(error = %format!("{e:#}"), "promotion: writing the new stage");
        }
    }

    fn save_promotions(&mut self) {
        self.promotions_dirty = false;
        let pairs: Vec<_> = self.promotions.iter().collect();
        if let Err(e) = crate::store::save_json(&self.cfg.state_dir.join(FILE), &pairs) {
            warn!(error = %format!("{e:#}"), "saving promotion state");
        }
    }

    /// Every promotion, for status and `moatctl promotion`.
    pub fn promotion_statuses(&self, with_detail: bool) -> Vec<PromotionStatus> {
        let now = now_secs();
        self.promotions
            .iter()
            .map(|((ns, name), p)| {
                let windows = self
                    .objects
                    .moat_policies
                    .get(&(ns.clone(), name.clone()))
                    .and_then(windows_of)
                    .unwrap_or(Windows { learn: 0, audit: 0 });
                PromotionStatus {
                    policy: format!("{ns}/{name}"),
                    stage: p.stage.name().into(),
                    since: p.stage_since,
                    paused: p.paused,
                    waiting_for: p.waiting_for(now, windows),
                    learned_rules: p.rules.len(),
                    would_deny: p.would_deny,
                    proposal: p.proposal.clone().filter(|_| with_detail),
                    history: p
                        .history
                        .iter()
                        .filter(|_| with_detail)
                        .map(|s| PromotionStep {
                            at: s.at,
                            from: s.from.name().into(),
                            to: s.to.name().into(),
                            why: s.why.clone(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// `moatctl promotion`: pause, resume or revert one workload, or report.
    pub fn promotion_request(
        &mut self,
        policy: Option<&str>,
        action: PromotionAction,
    ) -> Result<Vec<PromotionStatus>, String> {
        let Some(policy) = policy else {
            return Ok(self.promotion_statuses(false));
        };
        let (ns, name) = policy
            .split_once('/')
            .ok_or_else(|| format!("{policy:?}: expected namespace/name"))?;
        let key = (ns.to_string(), name.to_string());
        let promotion = self
            .promotions
            .get_mut(&key)
            .ok_or_else(|| format!("{policy}: no MoatPolicy with promotion"))?;
        match action {
            PromotionAction::Show => {}
            PromotionAction::Pause | PromotionAction::Resume => {
                promotion.paused = action == PromotionAction::Pause;
                info!(policy, paused = promotion.paused, "promotion");
                self.save_promotions();
            }
            PromotionAction::Revert => {
                let t = promotion
                    .revert(now_secs(), "moatctl")
                    .ok_or_else(|| format!("{policy}: in learn, nothing to revert"))?;
                info!(
                    policy,
                    from = t.from.name(),
                    to = t.to.name(),
                    "promotion reverted"
                );
                self.save_promotions();
                self.readmit(std::slice::from_ref(&key));
            }
        }
        Ok(self
            .promotion_statuses(true)
            .into_iter()
            .filter(|s| s.policy == policy)
            .collect())
    }
}
