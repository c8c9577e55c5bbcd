//! The daemon's side of FQDN egress: the TTL settings written at start, the identities the
//! sweeper may keep learned addresses for, and the `moatctl fqdn` listing. (The pattern
//! entries are written by the ordinary reconcile, see desired.rs.)

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use moat_common::{FlowEvent, IDENTITY_WORLD, VERDICT_ALLOW};
use moat_policy::{FlowEnd, PodRef};

use super::Daemon;
use crate::{
    api::FqdnIdentity,
    fqdn::{
        FqdnSettings,
        listing::{self, IdentityInfo},
    },
};

impl Daemon {
    /// Writes the TTL floor and cap into MOAT_FQDNCFG (the kernel reads them for every
    /// learned address).
    pub fn configure_fqdn(&mut self, settings: FqdnSettings) -> anyhow::Result<()> {
        settings.validate().map_err(anyhow::Error::msg)?;
        self.fqdn.write_config(&settings.to_config())?;
        self.fqdn_settings = settings;
        Ok(())
    }

    pub fn fqdn_settings(&self) -> FqdnSettings {
        self.fqdn_settings
    }

    /// Identities of this node's endpoints, as the maps hold them: the only ones the kernel
    /// learns addresses for. `None` until moatd has written its first complete state (a
    /// partial view must not make the sweeper delete what a restart kept).
    pub fn fqdn_live_identities(&self) -> Option<BTreeSet<u32>> {
        if self.hold_writes || self.awaiting_sync {
            return None;
        }
        Some(
            self.applied
                .maps
                .endpoints
                .values()
                .map(|e| e.identity)
                .collect(),
        )
    }

    /// Labels and local pods of each identity of this node.
    fn local_identities(&self) -> BTreeMap<u32, IdentityInfo> {
        let state = self.engine.state();
        let mut out: BTreeMap<u32, IdentityInfo> = BTreeMap::new();
        for record in self.endpoints.values() {
            let Some(compiled) = state.endpoints.get(&record.pod_ref()) else {
                continue;
            };
            let info = out
                .entry(compiled.identity.0)
                .or_insert_with(|| IdentityInfo {
                    labels: state
                        .identities
                        .get(&compiled.identity)
                        .map(|l| l.0.clone())
                        .unwrap_or_default(),
                    pods: Vec::new(),
                });
            let pod = record.pod_ref().to_string();
            if !info.pods.contains(&pod) {
                info.pods.push(pod);
            }
        }
        out
    }

    /// `moatctl fqdn`: read from the maps at request time.
    pub fn fqdn_listing(&self) -> anyhow::Result<Vec<FqdnIdentity>> {
        let maps = &self.fqdn;
        let learned = maps.learned();
        let patterns = maps.pattern_entries();
        let identities = self.local_identities();
        let snapshot = listing::Snapshot {
            learned: &learned,
            patterns: &patterns,
            identities: &identities,
            now_ns: crate::server::monotonic_ns(),
        };
        Ok(listing::build(
            &snapshot,
            |selector| self.fqdn_selector_text(selector),
            |hash| maps.name(hash),
        ))
    }

    /// The DNS names an address was learned for to the source pod's identity, while the
    /// learned entry still admits new connections (what `trace` evaluates as the kernel
    /// would). Empty for any other pair of ends.
    pub(super) fn learned_names(&self, from: &FlowEnd, to: &FlowEnd) -> Vec<String> {
        let (FlowEnd::Pod(pod), FlowEnd::Address(addr)) = (from, to) else {
            return Vec::new();
        };
        let Some(endpoint) = self.engine.state().endpoints.get(pod) else {
            return Vec::new();
        };
        let learned = self.fqdn.get_learned(endpoint.identity.0, *addr);
        learned
            .filter(|v| v.expires_ns > crate::server::monotonic_ns())
            .and_then(|v| self.fqdn.name(v.name_hash))
            .into_iter()
            .collect()
    }

    /// A flow explanation for an egress event of a pod with FQDN rules towards an address
    /// outside the cluster: which DNS name taught the address (and the pattern the allowing
    /// rule matched), or that none did. Other events keep their explanation.
    pub(super) fn with_fqdn_note(
        &self,
        rule: String,
        pod: &PodRef,
        e: &FlowEvent,
        dst: IpAddr,
    ) -> String {
        let has_fqdn_rules = self
            .engine
            .state()
            .endpoints
            .get(pod)
            .is_some_and(|c| c.fqdn);
        if !has_fqdn_rules || e.remote_identity != IDENTITY_WORLD {
            return rule;
        }
        let Some(learned) = self.fqdn.get_learned(e.local_identity, dst) else {
            return if e.verdict == VERDICT_ALLOW {
                rule
            } else {
                format!("{rule} (no DNS answer to the pod named this address)")
            };
        };
        let name = self
            .fqdn
            .name(learned.name_hash)
            .unwrap_or_else(|| "a name no longer held".into());
        // The allowing rule, naming the first of the address's patterns it was written for.
        let via = learned
            .selectors
            .iter()
            .copied()
            .filter(|s| *s != 0)
            .find_map(|s| self.engine.describe_rule_via(e.reason, e.rule_id, Some(s)))
            .filter(|_| e.verdict == VERDICT_ALLOW);
        format!("{} (address learned from DNS: {name})", via.unwrap_or(rule))
    }

    /// The pattern a selector identity stands for, as the engine compiled it.
    fn fqdn_selector_text(&self, selector: u32) -> Option<String> {
        self.engine.state().fqdn_selectors.get(&selector).cloned()
    }
}
