//! Results: per probe, per case, and the run's totals and JSON report.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use crate::cases::{Case, Probe};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    /// Not judged (SCTP without kernel support, loopback mismatch ignored upstream, a case
    /// that could not run its probes is *failed*, not skipped).
    Skipped,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub expect: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub loopback: bool,
    /// What was observed (None when the probe did not run).
    pub observed: Option<bool>,
    pub outcome: Outcome,
    /// Attempts made (a mismatch is retried once, like upstream's probe).
    pub attempts: u8,
    /// Why skipped or failed, and datapath evidence for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ProbeResult {
    pub fn new(probe: &Probe) -> Self {
        Self {
            from: probe.from.clone(),
            to: probe.to.clone(),
            port: probe.port,
            protocol: probe.protocol.name().to_string(),
            expect: probe.expect,
            loopback: probe.loopback,
            observed: None,
            outcome: Outcome::Skipped,
            attempts: 0,
            detail: None,
        }
    }

    /// Judges an observation: loopback mismatches are reported, not failed.
    pub fn judge(mut self, observed: bool, attempts: u8) -> Self {
        self.observed = Some(observed);
        self.attempts = attempts;
        self.outcome = if observed == self.expect {
            Outcome::Passed
        } else if self.loopback {
            self.detail = Some(
                "loopback probe differs from expect (ignored upstream, kubernetes#95879)".into(),
            );
            Outcome::Skipped
        } else {
            Outcome::Failed
        };
        self
    }

    pub fn skipped(mut self, reason: &str) -> Self {
        self.outcome = Outcome::Skipped;
        self.detail = Some(reason.to_string());
        self
    }

    pub fn failed(mut self, reason: &str) -> Self {
        self.outcome = Outcome::Failed;
        self.detail = Some(reason.to_string());
        self
    }

    pub fn line(&self) -> String {
        let observed = match self.observed {
            Some(true) => "allowed",
            Some(false) => "denied",
            None => "not run",
        };
        let expect = if self.expect { "allowed" } else { "denied" };
        format!(
            "{} -> {} {}/{}: expected {expect}, observed {observed}{}{}",
            self.from,
            self.to,
            self.port,
            self.protocol,
            if self.loopback { " (loopback)" } else { "" },
            self.detail
                .as_ref()
                .map(|d| format!(" [{d}]"))
                .unwrap_or_default()
        )
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Counts {
    pub fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Passed => self.passed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Skipped => self.skipped += 1,
        }
    }
    pub fn merge(&mut self, other: &Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.skipped += other.skipped;
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub id: String,
    pub name: String,
    pub counts: Counts,
    /// A case-level failure (a rejected object, a reload that did not reach the maps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
    /// Probes that passed only on their retry.
    pub passed_on_retry: usize,
    /// Skipped probes by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Every probe that failed or was skipped for a loopback mismatch, with its detail.
    pub failures: Vec<ProbeResult>,
    pub loopback_mismatches: Vec<ProbeResult>,
    /// Every probe, only with --report-all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeResult>,
}

impl CaseResult {
    /// A case whose setup failed: every probe fails with the reason, none is run.
    pub fn not_run(case: &Case, error: String, elapsed: Duration, keep_all: bool) -> Self {
        let results = case
            .probes
            .iter()
            .map(|p| ProbeResult::new(p).failed(&format!("not run: {error}")))
            .collect();
        Self::new(
            &case.id,
            &case.name,
            results,
            Some(error),
            elapsed,
            keep_all,
        )
    }

    /// A case the file marks as not expressible here: every probe skipped with its reason.
    pub fn skipped_case(case: &Case, reason: &str, keep_all: bool) -> Self {
        let results = case
            .probes
            .iter()
            .map(|p| ProbeResult::new(p).skipped(reason))
            .collect();
        Self::new(
            &case.id,
            &case.name,
            results,
            None,
            Duration::ZERO,
            keep_all,
        )
    }

    pub fn new(
        id: &str,
        name: &str,
        results: Vec<ProbeResult>,
        error: Option<String>,
        elapsed: Duration,
        keep_all: bool,
    ) -> Self {
        let mut counts = Counts::default();
        let mut skipped = BTreeMap::new();
        let mut failures = Vec::new();
        let mut loopback_mismatches = Vec::new();
        let mut passed_on_retry = 0;
        for r in &results {
            counts.add(&r.outcome);
            match r.outcome {
                Outcome::Passed if r.attempts > 1 => passed_on_retry += 1,
                Outcome::Passed => {}
                Outcome::Failed => failures.push(r.clone()),
                Outcome::Skipped => {
                    let reason = r.detail.clone().unwrap_or_default();
                    *skipped.entry(reason).or_insert(0) += 1;
                    if r.loopback && r.observed.is_some() {
                        loopback_mismatches.push(r.clone());
                    }
                }
            }
        }
        Self {
            id: id.to_string(),
            name: name.to_string(),
            counts,
            error,
            duration_ms: elapsed.as_millis() as u64,
            passed_on_retry,
            skipped,
            failures,
            loopback_mismatches,
            probes: if keep_all { results } else { Vec::new() },
        }
    }

    pub fn ok(&self) -> bool {
        self.error.is_none() && self.counts.failed == 0
    }

    pub fn line(&self) -> String {
        let status = if self.ok() { "PASS" } else { "FAIL" };
        let mut line = format!(
            "[{status}] {} ({:.1}s): {} passed, {} failed, {} skipped",
            self.id,
            self.duration_ms as f64 / 1000.0,
            self.counts.passed,
            self.counts.failed,
            self.counts.skipped,
        );
        if self.passed_on_retry > 0 {
            line.push_str(&format!(", {} passed on retry", self.passed_on_retry));
        }
        if !self.loopback_mismatches.is_empty() {
            line.push_str(&format!(
                ", {} loopback mismatch(es) ignored",
                self.loopback_mismatches.len()
            ));
        }
        line.push_str(&format!(" - {}", self.name));
        if let Some(e) = &self.error {
            line.push_str(&format!("\n    case error (no probe ran): {e}"));
            return line;
        }
        for f in self.failures.iter().take(20) {
            line.push_str(&format!("\n    FAIL {}", f.line()));
        }
        if self.failures.len() > 20 {
            line.push_str(&format!(
                "\n    ... and {} more failed probes (see the JSON report)",
                self.failures.len() - 20
            ));
        }
        line
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: String,
    pub cases_file: String,
    pub filters: Vec<String>,
    pub setup: BTreeMap<String, String>,
    pub totals: Counts,
    pub cases_run: usize,
    pub cases_failed: Vec<String>,
    pub passed_on_retry: usize,
    pub loopback_mismatches: usize,
    pub skipped_by_reason: BTreeMap<String, usize>,
    pub duration_ms: u64,
    pub cases: Vec<CaseResult>,
}

impl Report {
    pub fn new(
        mode: &str,
        cases_file: &str,
        filters: &[String],
        setup: BTreeMap<String, String>,
        cases: Vec<CaseResult>,
        elapsed: Duration,
    ) -> Self {
        let mut totals = Counts::default();
        let mut skipped_by_reason = BTreeMap::new();
        let mut passed_on_retry = 0;
        let mut loopback_mismatches = 0;
        for c in &cases {
            totals.merge(&c.counts);
            passed_on_retry += c.passed_on_retry;
            loopback_mismatches += c.loopback_mismatches.len();
            for (reason, n) in &c.skipped {
                *skipped_by_reason.entry(reason.clone()).or_insert(0) += n;
            }
        }
        Self {
            mode: mode.to_string(),
            cases_file: cases_file.to_string(),
            filters: filters.to_vec(),
            setup,
            totals,
            cases_run: cases.len(),
            cases_failed: cases
                .iter()
                .filter(|c| !c.ok())
                .map(|c| c.id.clone())
                .collect(),
            passed_on_retry,
            loopback_mismatches,
            skipped_by_reason,
            duration_ms: elapsed.as_millis() as u64,
            cases,
        }
    }

    pub fn ok(&self) -> bool {
        self.cases_failed.is_empty() && self.totals.failed == 0
    }

    pub fn summary_line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.totals.passed, self.totals.failed, self.totals.skipped
        )
    }
}
