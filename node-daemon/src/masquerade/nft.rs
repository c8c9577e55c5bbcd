//! Keeps moatd's masquerade table as `masquerade::desired` says, with the nft binary.
//!
//! After each write moatd lists the table and keeps the listing; a later check lists it
//! again, and any difference (the table gone after `nft flush ruleset`, a rule deleted, an
//! element added by hand) rewrites it whole. So a check that finds the table as written costs
//! one `nft list table` and writes nothing.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use ipnetwork::IpNetwork;
use tracing::{info, warn};

use super::{Config, TABLE, Table, render, render_removal};

/// Why the table could not be listed or written, worded for `moatctl status`.
type Problem = String;

/// A failed nft run: the binary is missing, or it ran and failed.
enum NftError {
    Missing(Problem),
    Failed(Problem),
}

impl From<NftError> for Problem {
    fn from(e: NftError) -> Self {
        match e {
            NftError::Missing(p) | NftError::Failed(p) => p,
        }
    }
}

/// The masquerade table of this network namespace, as moatd last left it.
pub struct Keeper {
    config: Config,
    /// What moatd wants now: `None`, no table.
    desired: Option<Table>,
    /// The script last applied and `nft list table`'s answer right after it.
    written: Option<(String, String)>,
    problem: Option<Problem>,
}

impl Keeper {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            desired: None,
            written: None,
            problem: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Brings the table to `desired` (or removes it), and puts it back if it was changed from
    /// outside since moatd wrote it. A failure is logged once and kept for the status until
    /// a later call succeeds.
    pub fn reconcile(&mut self, desired: Option<Table>) {
        let result = match &desired {
            Some(table) => self.ensure(table),
            None => self.ensure_absent(),
        };
        self.desired = desired;
        match result {
            Ok(()) => {
                if self.problem.take().is_some() {
                    info!(table = TABLE, "masquerade table in place again");
                }
            }
            Err(problem) => {
                if self.problem.as_ref() != Some(&problem) {
                    warn!(table = TABLE, %problem, "pod egress leaving the cluster");
                }
                self.problem = Some(problem);
            }
        }
    }

    fn ensure(&mut self, table: &Table) -> Result<(), Problem> {
        let script = render(table);
        let listed = list(&self.config.nft)?;
        if let (Some((applied, seen)), Some(now)) = (&self.written, &listed)
            && *applied == script
            && seen == now
        {
            return Ok(());
        }
        match (&self.written, &listed) {
            (Some((applied, _)), _) if *applied == script => warn!(
                table = TABLE,
                present = listed.is_some(),
                "masquerade table changed or removed from outside moatd; writing it again"
            ),
            _ => info!(
                table = TABLE,
                sources = %cidr_list(&table.sources),
                kept = %cidr_list(&table.cluster),
                "masquerade table written"
            ),
        }
        self.written = None;
        apply(&self.config.nft, &script)?;
        let listed = list(&self.config.nft)?
            .ok_or_else(|| format!("{TABLE} is missing right after nft wrote it"))?;
        self.written = Some((script, listed));
        Ok(())
    }

    fn ensure_absent(&mut self) -> Result<(), Problem> {
        self.written = None;
        let listed = match list(&self.config.nft) {
            Ok(listed) => listed,
            // Without nft there is no table to remove (nft wrote it, if anything did), and
            // nothing is wrong unless masquerade is wanted.
            Err(NftError::Missing(_)) if !self.config.enabled => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if listed.is_some() {
            apply(&self.config.nft, &render_removal())?;
            info!(table = TABLE, "masquerade table removed");
        }
        Ok(())
    }

    pub fn status(&self) -> crate::api::MasqueradeStatus {
        let (sources, kept) = match &self.desired {
            Some(t) => (strings(&t.sources), strings(&t.cluster)),
            None => (Vec::new(), Vec::new()),
        };
        crate::api::MasqueradeStatus {
            table: TABLE.to_string(),
            enabled: self.config.enabled,
            sources,
            kept,
            problem: self.problem.clone(),
        }
    }
}

fn strings(cidrs: &[IpNetwork]) -> Vec<String> {
    cidrs.iter().map(|c| c.to_string()).collect()
}

fn cidr_list(cidrs: &[IpNetwork]) -> String {
    strings(cidrs).join(",")
}

/// `nft list table`: the listing, or `None` when the table does not exist.
fn list(nft: &Path) -> Result<Option<String>, NftError> {
    let (family, name) = TABLE.split_once(' ').expect("TABLE is `family name`");
    let out = Command::new(nft)
        .args(["list", "table", family, name])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_problem(nft, &e))?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No such file or directory") {
        return Ok(None);
    }
    Err(NftError::Failed(format!(
        "`{} list table {TABLE}` failed: {}",
        nft.display(),
        stderr.trim()
    )))
}

/// Runs `script` as one nft transaction (`nft -f -`).
fn apply(nft: &Path, script: &str) -> Result<(), NftError> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_problem(nft, &e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| NftError::Failed(format!("writing to {}: {e}", nft.display())))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NftError::Failed(format!("waiting for {}: {e}", nft.display())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed(format!(
            "nft refused {TABLE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn spawn_problem(nft: &Path, e: &std::io::Error) -> NftError {
    if e.kind() == std::io::ErrorKind::NotFound {
        NftError::Missing(format!(
            "{} not found (install nftables): pod egress leaving the cluster is not masqueraded",
            nft.display()
        ))
    } else {
        NftError::Failed(format!("running {}: {e}", nft.display()))
    }
}
