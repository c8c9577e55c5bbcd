//! Incremental compilation: the daemon feeds events, the engine answers with the map writes
//! and deletes that take the datapath from the previous state to the new one. The engine
//! keeps the rule that the result always equals a from-scratch `compile` of its inputs (a
//! property test holds it to that), and it keeps churn cheap: a pod whose label set already
//! has an identity changes only its endpoint and ipcache entries, without recompiling policy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use moat_common::{PolicyKey, PolicyValue, PortRangeKey, PortRuleSet};

use crate::compile::{
    Allocators, ClusterInputs, DatapathState, Endpoint, Pod, PodRef, RuleRef, assign_identities,
    compile_ipcache, compile_with,
};
use crate::error::Error;
use crate::identity::{Collision, Identity, SecurityLabels};
use crate::labels::LabelSet;
use crate::netpol::NetworkPolicy;

/// Writes and deletes for one map.
#[derive(Clone, Debug, PartialEq)]
pub struct MapDelta<K: Ord, V> {
    pub upserts: BTreeMap<K, V>,
    pub deletes: BTreeSet<K>,
}

impl<K: Ord, V> Default for MapDelta<K, V> {
    fn default() -> Self {
        Self {
            upserts: BTreeMap::new(),
            deletes: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone, V: PartialEq + Clone> MapDelta<K, V> {
    pub fn between(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Self {
        let upserts = new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let deletes = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        Self { upserts, deletes }
    }

    pub fn apply(&self, map: &mut BTreeMap<K, V>) {
        for k in &self.deletes {
            map.remove(k);
        }
        for (k, v) in &self.upserts {
            map.insert(k.clone(), v.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// Everything one event changes. Apply deletes before writes only within a map; across maps,
/// a daemon should write policy before ipcache/endpoints and delete in the reverse order, so
/// that no packet sees an identity whose policy is not there yet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub identities: MapDelta<Identity, LabelSet>,
    pub endpoints: MapDelta<PodRef, Endpoint>,
    pub ipcache: MapDelta<IpNetwork, Identity>,
    pub policy: MapDelta<PolicyKey, PolicyValue>,
    pub port_ranges: MapDelta<PortRangeKey, PortRuleSet>,
    pub cidr_v4: MapDelta<(u32, u8, Ipv4Network), PortRuleSet>,
    pub cidr_v6: MapDelta<(u32, u8, Ipv6Network), PortRuleSet>,
    pub rules: MapDelta<u32, RuleRef>,
}

impl Delta {
    pub fn between(old: &DatapathState, new: &DatapathState) -> Self {
        Self {
            identities: MapDelta::between(&old.identities, &new.identities),
            endpoints: MapDelta::between(&old.endpoints, &new.endpoints),
            ipcache: MapDelta::between(&old.ipcache, &new.ipcache),
            policy: MapDelta::between(&old.policy, &new.policy),
            port_ranges: MapDelta::between(&old.port_ranges, &new.port_ranges),
            cidr_v4: MapDelta::between(&old.cidr_v4, &new.cidr_v4),
            cidr_v6: MapDelta::between(&old.cidr_v6, &new.cidr_v6),
            rules: MapDelta::between(&old.rules, &new.rules),
        }
    }

    pub fn apply(&self, state: &mut DatapathState) {
        self.identities.apply(&mut state.identities);
        self.endpoints.apply(&mut state.endpoints);
        self.ipcache.apply(&mut state.ipcache);
        self.policy.apply(&mut state.policy);
        self.port_ranges.apply(&mut state.port_ranges);
        self.cidr_v4.apply(&mut state.cidr_v4);
        self.cidr_v6.apply(&mut state.cidr_v6);
        self.rules.apply(&mut state.rules);
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
            && self.endpoints.is_empty()
            && self.ipcache.is_empty()
            && self.policy.is_empty()
            && self.port_ranges.is_empty()
            && self.cidr_v4.is_empty()
            && self.cidr_v6.is_empty()
            && self.rules.is_empty()
    }

    /// True when only endpoint and ipcache entries change (the cheap-churn case).
    pub fn touches_only_endpoints_and_ipcache(&self) -> bool {
        self.identities.is_empty()
            && self.policy.is_empty()
            && self.port_ranges.is_empty()
            && self.cidr_v4.is_empty()
            && self.cidr_v6.is_empty()
            && self.rules.is_empty()
    }
}

/// The incremental policy engine.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    inputs: ClusterInputs,
    alloc: Allocators,
    state: DatapathState,
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> &DatapathState {
        &self.state
    }

    pub fn inputs(&self) -> &ClusterInputs {
        &self.inputs
    }

    /// Identity hash collisions currently resolved by salting (for logs and metrics).
    pub fn collisions(&self) -> &[Collision<SecurityLabels>] {
        self.alloc.identities.collisions()
    }

    pub fn set_host_ips(&mut self, ips: BTreeSet<IpAddr>) -> Result<Delta, Error> {
        let old = std::mem::replace(&mut self.inputs.host_ips, ips);
        self.recompile(|inputs| inputs.host_ips = old)
    }

    pub fn upsert_namespace(&mut self, name: &str, labels: LabelSet) -> Result<Delta, Error> {
        let old = self.inputs.namespaces.insert(name.to_string(), labels);
        if old.as_ref() == self.inputs.namespaces.get(name) {
            return Ok(Delta::default());
        }
        let name = name.to_string();
        self.recompile(move |inputs| restore(&mut inputs.namespaces, name, old))
    }

    pub fn delete_namespace(&mut self, name: &str) -> Result<Delta, Error> {
        let Some(old) = self.inputs.namespaces.remove(name) else {
            return Ok(Delta::default());
        };
        let name = name.to_string();
        self.recompile(move |inputs| restore(&mut inputs.namespaces, name, Some(old)))
    }

    pub fn upsert_policy(&mut self, policy: &NetworkPolicy) -> Result<Delta, Error> {
        let normalized = policy.normalize()?;
        let key = (normalized.namespace.clone(), normalized.name.clone());
        let old = self.inputs.policies.insert(key.clone(), normalized);
        if old.as_ref() == self.inputs.policies.get(&key) {
            return Ok(Delta::default());
        }
        self.recompile(move |inputs| restore(&mut inputs.policies, key, old))
    }

    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<Delta, Error> {
        let key = (namespace.to_string(), name.to_string());
        let Some(old) = self.inputs.policies.remove(&key) else {
            return Ok(Delta::default());
        };
        self.recompile(move |inputs| restore(&mut inputs.policies, key, Some(old)))
    }

    pub fn upsert_pod(&mut self, pod: Pod) -> Result<Delta, Error> {
        let r = pod.pod_ref();
        let old = self.inputs.pods.insert(r.clone(), pod);
        if old.as_ref() == self.inputs.pods.get(&r) {
            return Ok(Delta::default());
        }
        if let Some(delta) = self.pod_fast_path(&r, old.as_ref())? {
            return Ok(delta);
        }
        self.recompile(move |inputs| restore(&mut inputs.pods, r, old))
    }

    pub fn delete_pod(&mut self, pod: &PodRef) -> Result<Delta, Error> {
        let Some(old) = self.inputs.pods.remove(pod) else {
            return Ok(Delta::default());
        };
        if let Some(delta) = self.pod_fast_path(pod, Some(&old))? {
            return Ok(delta);
        }
        let r = pod.clone();
        self.recompile(move |inputs| restore(&mut inputs.pods, r, Some(old)))
    }

    /// A pod event that leaves the set of live label sets unchanged, with no named ports in
    /// any policy, cannot change policy entries: only its endpoint and the ipcache move.
    fn pod_fast_path(&mut self, r: &PodRef, old: Option<&Pod>) -> Result<Option<Delta>, Error> {
        if self.inputs.uses_named_ports() {
            return Ok(None);
        }
        let live: BTreeSet<SecurityLabels> = self
            .inputs
            .pods
            .values()
            .map(|p| self.inputs.security_labels(p))
            .collect();
        let new_labels = self
            .inputs
            .pods
            .get(r)
            .map(|p| self.inputs.security_labels(p));
        let old_labels = old.map(|p| self.inputs.security_labels(p));
        let known = |l: &Option<SecurityLabels>| {
            l.as_ref()
                .is_none_or(|l| self.alloc.identities.lookup(l).is_some())
        };
        let still_live = |l: &Option<SecurityLabels>| l.as_ref().is_none_or(|l| live.contains(l));
        if !(known(&new_labels) && still_live(&old_labels)) {
            return Ok(None);
        }
        let ids = assign_identities(&self.inputs, &mut self.alloc)?;
        let mut next = self.state.clone();
        next.ipcache = compile_ipcache(&self.inputs, &ids);
        next.endpoints.remove(r);
        if let Some(pod) = self.inputs.pods.get(r) {
            let identity = ids.by_pod[r];
            next.endpoints.insert(
                r.clone(),
                Endpoint {
                    identity,
                    policy_id: identity.0,
                    ips: pod.ips.clone(),
                },
            );
        }
        let delta = Delta::between(&self.state, &next);
        self.state = next;
        Ok(Some(delta))
    }

    /// Full compile and diff. On error the input change is undone (via `undo`), so the engine
    /// keeps describing what is in the maps.
    fn recompile(&mut self, undo: impl FnOnce(&mut ClusterInputs)) -> Result<Delta, Error> {
        match compile_with(&self.inputs, &mut self.alloc) {
            Ok(next) => {
                let delta = Delta::between(&self.state, &next);
                self.state = next;
                Ok(delta)
            }
            Err(e) => {
                undo(&mut self.inputs);
                Err(e)
            }
        }
    }
}

fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, old: Option<V>) {
    match old {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}
