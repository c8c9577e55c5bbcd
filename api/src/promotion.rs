//! `moatctl promotion`: the workloads MoatPolicies walk from learn to audit to enforce, and
//! the operator's hold on them.

use serde::{Deserialize, Serialize};

/// What an operator does to one workload's promotion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromotionAction {
    /// Only report.
    Show,
    /// Hold the current stage until resumed.
    Pause,
    Resume,
    /// One stage back: enforce -> audit, audit -> learn (dropping the proposal).
    Revert,
}

/// One recorded transition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionStep {
    /// Unix seconds.
    pub at: u64,
    pub from: String,
    pub to: String,
    pub why: String,
}

/// One workload's promotion (the pods one MoatPolicy with `promotion` selects).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionStatus {
    /// `namespace/name` of the MoatPolicy.
    pub policy: String,
    /// learn, audit or enforce.
    pub stage: String,
    /// When the stage began (unix seconds).
    pub since: u64,
    pub paused: bool,
    /// What the workload waits for before the next stage.
    pub waiting_for: String,
    pub learned_rules: usize,
    /// Flows the proposal would have denied in the current audit stage.
    pub would_deny: u64,
    /// The proposed NetworkPolicy (YAML), from audit on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal: Option<String>,
    #[serde(default)]
    pub history: Vec<PromotionStep>,
}
