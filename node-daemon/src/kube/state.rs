//! The datastore's state machine, with no I/O: it takes the watchers' events (already
//! converted) and keeps what the snapshot is built from. A relist (after a 410 Gone, or the
//! first list) is buffered and swapped in whole at its end, so a snapshot never shows half a
//! list; objects missing from a relist are deleted then. Every change that alters content
//! marks the state dirty; unchanged re-deliveries (relists, resyncs) do not.

use std::collections::BTreeMap;

use moat_policy::{ClusterNetworkPolicy, LabelSet, MoatPolicy, NetworkPolicy};

use super::convert::{NodeInfo, ObjectKey, PodItem, StatusPatch};
use crate::local::{LocalObjects, PodMeta};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pods,
    Namespaces,
    NetworkPolicies,
    Nodes,
    MoatPolicies,
    ClusterPolicies,
}

const KINDS: usize = 6;

impl Kind {
    pub const ALL: [Kind; KINDS] = [
        Kind::Pods,
        Kind::Namespaces,
        Kind::NetworkPolicies,
        Kind::Nodes,
        Kind::MoatPolicies,
        Kind::ClusterPolicies,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::NetworkPolicies => "networkpolicies",
            Kind::Nodes => "nodes",
            Kind::MoatPolicies => "moatpolicies",
            Kind::ClusterPolicies => "clusternetworkpolicies",
        }
    }

    /// A kind whose API may not be served at all (a CRD not installed): "not found" then
    /// means "no objects", not a failure.
    pub fn optional(self) -> bool {
        matches!(self, Kind::MoatPolicies | Kind::ClusterPolicies)
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The kind a request path lists or watches (cluster-wide collection paths, possibly behind
    /// a URL prefix).
    pub fn from_path(path: &str) -> Option<Kind> {
        if path.ends_with("/api/v1/pods") {
            Some(Kind::Pods)
        } else if path.ends_with("/api/v1/namespaces") {
            Some(Kind::Namespaces)
        } else if path.ends_with("/apis/networking.k8s.io/v1/networkpolicies") {
            Some(Kind::NetworkPolicies)
        } else if path.ends_with("/api/v1/nodes") {
            Some(Kind::Nodes)
        } else if path.ends_with("/apis/moat.io/v1alpha1/moatpolicies") {
            Some(Kind::MoatPolicies)
        } else if super::convert::CLUSTER_POLICY_VERSIONS.iter().any(|v| {
            path.ends_with(&format!(
                "/apis/{}/{v}/{}",
                moat_policy::cnp::API_GROUP,
                super::convert::CLUSTER_POLICY_PLURAL
            ))
        }) {
            Some(Kind::ClusterPolicies)
        } else {
            None
        }
    }
}

/// One object as the state keeps it.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Namespace {
        name: String,
        labels: LabelSet,
    },
    Pod(PodItem),
    Policy {
        key: ObjectKey,
        policy: Result<NetworkPolicy, String>,
    },
    Node {
        name: String,
        info: NodeInfo,
    },
    MoatPolicy {
        key: ObjectKey,
        policy: Result<MoatPolicy, String>,
    },
    /// A ClusterNetworkPolicy (cluster-scoped: keyed by name). Err: "<name>: reason"; its last
    /// good version, if any, stays in force.
    ClusterPolicy {
        name: String,
        policy: Result<ClusterNetworkPolicy, String>,
    },
}

impl Item {
    pub fn kind(&self) -> Kind {
        match self {
            Item::Namespace { .. } => Kind::Namespaces,
            Item::Pod(_) => Kind::Pods,
            Item::Policy { .. } => Kind::NetworkPolicies,
            Item::Node { .. } => Kind::Nodes,
            Item::MoatPolicy { .. } => Kind::MoatPolicies,
            Item::ClusterPolicy { .. } => Kind::ClusterPolicies,
        }
    }
}

/// What the watch shell feeds the state.
#[derive(Clone, Debug)]
pub enum Update {
    /// A (re)list starts: buffer until `InitDone`.
    Init(Kind),
    InitApply(Item),
    /// The list is complete: it replaces everything of that kind.
    InitDone(Kind),
    Apply(Item),
    Delete(Kind, ObjectKey),
    /// The watch failed (the watcher retries on its own).
    Error(Kind, String),
    /// A request for that kind got a successful answer: the API server is reachable again.
    Reachable(Kind),
    /// The API server does not serve this (optional) kind: its CRD is not installed. It
    /// counts as listed, with no objects, until a list succeeds.
    NotServed(Kind),
    /// A ClusterNetworkPolicy's status condition should be written. For the watch shell,
    /// which writes it; it changes nothing here.
    Status(StatusPatch),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KindHealth {
    /// The first full list has been applied (sticky).
    pub synced: bool,
    /// No error since the last successful request or event.
    pub healthy: bool,
    pub last_error: Option<String>,
    /// Full lists completed, the first one included.
    pub lists: u64,
    pub errors: u64,
    /// The API server does not serve the kind (an optional kind whose CRD is missing).
    pub not_served: bool,
}

#[derive(Default)]
struct Content {
    namespaces: BTreeMap<String, LabelSet>,
    pods: BTreeMap<ObjectKey, PodMeta>,
    pod_warnings: BTreeMap<ObjectKey, String>,
    policies: BTreeMap<ObjectKey, NetworkPolicy>,
    policy_errors: BTreeMap<ObjectKey, String>,
    moat_policies: BTreeMap<ObjectKey, MoatPolicy>,
    moat_policy_errors: BTreeMap<ObjectKey, String>,
    /// The last good version of each ClusterNetworkPolicy (kept while a newer one is
    /// rejected), and the rejections.
    cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    cluster_policy_errors: BTreeMap<String, String>,
    /// Every node: this node's pod CIDRs, and the others' for routes between nodes.
    nodes: BTreeMap<String, NodeInfo>,
}

pub struct ClusterState {
    node_name: String,
    content: Content,
    relist: [Option<Vec<Item>>; KINDS],
    health: [KindHealth; KINDS],
    dirty: bool,
    /// Health changed since the last `take_health_changed`.
    health_changed: bool,
}

fn set<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) -> bool {
    match value {
        Some(v) => {
            if map.get(&key) == Some(&v) {
                false
            } else {
                map.insert(key, v);
                true
            }
        }
        None => map.remove(&key).is_some(),
    }
}

impl ClusterState {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            content: Content::default(),
            relist: Default::default(),
            health: Default::default(),
            dirty: false,
            health_changed: false,
        }
    }

    /// Every kind has completed its first full list.
    pub fn synced(&self) -> bool {
        self.health.iter().all(|h| h.synced)
    }

    pub fn healthy(&self) -> bool {
        self.health.iter().all(|h| h.healthy)
    }

    pub fn health(&self, kind: Kind) -> &KindHealth {
        &self.health[kind.index()]
    }

    /// Content changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub fn take_health_changed(&mut self) -> bool {
        std::mem::take(&mut self.health_changed)
    }

    pub fn object_count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Pods => self.content.pods.len(),
            Kind::Namespaces => self.content.namespaces.len(),
            Kind::NetworkPolicies => self.content.policies.len() + self.content.policy_errors.len(),
            Kind::Nodes => self.content.nodes.len(),
            Kind::MoatPolicies => {
                self.content.moat_policies.len() + self.content.moat_policy_errors.len()
            }
            Kind::ClusterPolicies => {
                let c = &self.content;
                c.cluster_policies.len()
                    + c.cluster_policy_errors
                        .keys()
                        .filter(|k| !c.cluster_policies.contains_key(*k))
                        .count()
            }
        }
    }

    fn mark_health(&mut self, kind: Kind, f: impl FnOnce(&mut KindHealth)) {
        let h = &mut self.health[kind.index()];
        let before = h.clone();
        f(h);
        if *h != before {
            self.health_changed = true;
        }
    }

    fn mark_reachable(&mut self, kind: Kind) {
        self.mark_health(kind, |h| {
            h.healthy = true;
            h.last_error = None;
        });
    }

    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Init(kind) => {
                // Emitted before the list request is made: says nothing about reachability.
                self.relist[kind.index()] = Some(Vec::new());
            }
            Update::InitApply(item) => {
                let kind = item.kind();
                match &mut self.relist[kind.index()] {
                    Some(buffer) => buffer.push(item),
                    // Not expected (InitApply always follows Init); applying is still right.
                    None => self.upsert(item),
                }
            }
            Update::InitDone(kind) => {
                let items = self.relist[kind.index()].take().unwrap_or_default();
                self.replace_all(kind, items);
                self.mark_health(kind, |h| {
                    h.synced = true;
                    h.lists += 1;
                    h.not_served = false;
                });
                self.mark_reachable(kind);
            }
            Update::NotServed(kind) => {
                self.relist[kind.index()] = None;
                self.replace_all(kind, Vec::new());
                self.mark_health(kind, |h| {
                    h.synced = true;
                    h.not_served = true;
                });
                // The API server answered: that is reachable, whatever the answer.
                self.mark_reachable(kind);
            }
            Update::Apply(item) => {
                let kind = item.kind();
                self.upsert(item);
                self.mark_reachable(kind);
            }
            Update::Delete(kind, key) => {
                self.delete(kind, &key);
                self.mark_reachable(kind);
            }
            Update::Error(kind, message) => self.mark_health(kind, |h| {
                h.healthy = false;
                h.errors += 1;
                h.last_error = Some(message);
            }),
            Update::Reachable(kind) => self.mark_reachable(kind),
            Update::Status(_) => {}
        }
    }

    fn upsert(&mut self, item: Item) {
        let c = &mut self.content;
        let changed = match item {
            Item::Namespace { name, labels } => set(&mut c.namespaces, name, Some(labels)),
            Item::Pod(PodItem { key, meta, warning }) => {
                let a = set(&mut c.pod_warnings, key.clone(), warning);
                let b = set(&mut c.pods, key, meta);
                a | b
            }
            Item::Policy { key, policy } => {
                let (good, bad) = match policy {
                    Ok(p) => (Some(p), None),
                    Err(e) => (None, Some(e)),
                };
                let a = set(&mut c.policy_errors, key.clone(), bad);
                let b = set(&mut c.policies, key, good);
                a | b
            }
            Item::Node { name, info } => set(&mut c.nodes, name, Some(info)),
            Item::MoatPolicy { key, policy } => {
                let (good, bad) = match policy {
                    Ok(p) => (Some(p), None),
                    Err(e) => (None, Some(e)),
                };
                let a = set(&mut c.moat_policy_errors, key.clone(), bad);
                let b = set(&mut c.moat_policies, key, good);
                a | b
            }
            // Unlike a NetworkPolicy, a rejected CNP does not take its last good version
            // out: an admin guardrail must not vanish because of a bad edit (issue 17).
            Item::ClusterPolicy { name, policy } => match policy {
                Ok(p) => {
                    let a = set(&mut c.cluster_policy_errors, name.clone(), None);
                    let b = set(&mut c.cluster_policies, name, Some(p));
                    a | b
                }
                Err(e) => set(&mut c.cluster_policy_errors, name, Some(e)),
            },
        };
        self.dirty |= changed;
    }

    fn delete(&mut self, kind: Kind, key: &ObjectKey) {
        let c = &mut self.content;
        let changed = match kind {
            Kind::Namespaces => c.namespaces.remove(&key.1).is_some(),
            Kind::Pods => {
                let a = c.pod_warnings.remove(key).is_some();
                let b = c.pods.remove(key).is_some();
                a | b
            }
            Kind::NetworkPolicies => {
                let a = c.policy_errors.remove(key).is_some();
                let b = c.policies.remove(key).is_some();
                a | b
            }
            Kind::Nodes => c.nodes.remove(&key.1).is_some(),
            Kind::MoatPolicies => {
                let a = c.moat_policy_errors.remove(key).is_some();
                let b = c.moat_policies.remove(key).is_some();
                a | b
            }
            Kind::ClusterPolicies => {
                let a = c.cluster_policy_errors.remove(&key.1).is_some();
                let b = c.cluster_policies.remove(&key.1).is_some();
                a | b
            }
        };
        self.dirty |= changed;
    }

    /// A complete list of one kind: what it holds is the truth, what it lacks was deleted.
    fn replace_all(&mut self, kind: Kind, items: Vec<Item>) {
        let mut fresh_state = ClusterState::new(self.node_name.clone());
        for item in items {
            if item.kind() == kind {
                fresh_state.upsert(item);
            }
        }
        let f = fresh_state.content;
        let c = &mut self.content;
        let changed = match kind {
            Kind::Namespaces => replace(&mut c.namespaces, f.namespaces),
            Kind::Pods => {
                let a = replace(&mut c.pods, f.pods);
                let b = replace(&mut c.pod_warnings, f.pod_warnings);
                a | b
            }
            Kind::NetworkPolicies => {
                let a = replace(&mut c.policies, f.policies);
                let b = replace(&mut c.policy_errors, f.policy_errors);
                a | b
            }
            Kind::Nodes => replace(&mut c.nodes, f.nodes),
            Kind::MoatPolicies => {
                let a = replace(&mut c.moat_policies, f.moat_policies);
                let b = replace(&mut c.moat_policy_errors, f.moat_policy_errors);
                a | b
            }
            Kind::ClusterPolicies => {
                // A policy listed but rejected keeps its last good version from before.
                let mut good = f.cluster_policies;
                for name in f.cluster_policy_errors.keys() {
                    if let Some(p) = c.cluster_policies.get(name) {
                        good.entry(name.clone()).or_insert_with(|| p.clone());
                    }
                }
                let a = replace(&mut c.cluster_policies, good);
                let b = replace(&mut c.cluster_policy_errors, f.cluster_policy_errors);
                a | b
            }
        };
        self.dirty |= changed;
    }

    /// This node's Node object, once seen.
    pub fn node(&self) -> Option<&NodeInfo> {
        self.content.nodes.get(&self.node_name)
    }

    /// The snapshot in the local datastore's shape.
    pub fn objects(&self) -> LocalObjects {
        let c = &self.content;
        let mut rejected: Vec<String> = c
            .policy_errors
            .values()
            .map(|e| format!("NetworkPolicy {e}"))
            .chain(
                c.moat_policy_errors
                    .values()
                    .map(|e| format!("MoatPolicy {e}")),
            )
            .chain(c.cluster_policy_errors.iter().map(|(name, e)| {
                if c.cluster_policies.contains_key(name) {
                    format!("ClusterNetworkPolicy {e} (its last good version stays in force)")
                } else {
                    format!("ClusterNetworkPolicy {e}")
                }
            }))
            .collect();
        rejected.extend(c.pod_warnings.values().cloned());
        LocalObjects {
            namespaces: c.namespaces.clone(),
            pods: c.pods.clone(),
            policies: c.policies.clone(),
            moat_policies: c.moat_policies.clone(),
            cluster_policies: c.cluster_policies.clone(),
            nodes: c.nodes.clone(),
            rejected,
        }
    }
}

fn replace<T: PartialEq>(slot: &mut T, value: T) -> bool {
    if *slot == value {
        false
    } else {
        *slot = value;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, team: &str) -> Item {
        let mut labels = LabelSet::new();
        labels.insert("team", team);
        Item::Namespace {
            name: name.into(),
            labels,
        }
    }

    fn pod(ns: &str, name: &str, app: &str) -> Item {
        let mut meta = PodMeta::default();
        meta.labels.insert("app", app);
        Item::Pod(PodItem {
            key: (ns.into(), name.into()),
            meta: Some(meta),
            warning: None,
        })
    }

    fn synced_state() -> ClusterState {
        let mut s = ClusterState::new("n1");
        for kind in Kind::ALL {
            s.apply(Update::Init(kind));
            s.apply(Update::InitDone(kind));
        }
        s.take_dirty();
        s
    }

    #[test]
    fn not_synced_until_every_kind_listed_once() {
        let mut s = ClusterState::new("n1");
        for kind in [
            Kind::Pods,
            Kind::Namespaces,
            Kind::NetworkPolicies,
            Kind::MoatPolicies,
            Kind::ClusterPolicies,
        ] {
            s.apply(Update::Init(kind));
            s.apply(Update::InitDone(kind));
        }
        assert!(!s.synced());
        s.apply(Update::Init(Kind::Nodes));
        assert!(!s.synced());
        s.apply(Update::InitDone(Kind::Nodes));
        assert!(s.synced() && s.healthy());
    }

    #[test]
    fn relist_is_swapped_in_whole_and_drops_missing_objects() {
        let mut s = synced_state();
        s.apply(Update::Apply(pod("a", "p1", "web")));
        s.apply(Update::Apply(pod("a", "p2", "db")));
        assert!(s.take_dirty());
        s.apply(Update::Init(Kind::Pods));
        s.apply(Update::InitApply(pod("a", "p2", "db")));
        // Mid-relist the old content is still what is served.
        assert_eq!(s.objects().pods.len(), 2);
        assert!(!s.take_dirty());
        s.apply(Update::InitDone(Kind::Pods));
        assert!(s.take_dirty());
        let pods = s.objects().pods;
        assert_eq!(
            pods.keys().collect::<Vec<_>>(),
            vec![&("a".to_string(), "p2".to_string())]
        );
        assert_eq!(s.health(Kind::Pods).lists, 2);
    }

    #[test]
    fn identical_relist_and_reapply_are_not_changes() {
        let mut s = synced_state();
        s.apply(Update::Apply(ns("a", "x")));
        assert!(s.take_dirty());
        s.apply(Update::Apply(ns("a", "x")));
        assert!(!s.take_dirty());
        s.apply(Update::Init(Kind::Namespaces));
        s.apply(Update::InitApply(ns("a", "x")));
        s.apply(Update::InitDone(Kind::Namespaces));
        assert!(!s.take_dirty());
    }

    #[test]
    fn rejected_policy_is_reported_and_left_out_until_fixed_or_deleted() {
        let mut s = synced_state();
        let key = ("a".to_string(), "bad".to_string());
        s.apply(Update::Apply(Item::Policy {
            key: key.clone(),
            policy: Err("a/bad: spec.x: nope".into()),
        }));
        let o = s.objects();
        assert!(o.policies.is_empty());
        assert_eq!(
            o.rejected,
            vec!["NetworkPolicy a/bad: spec.x: nope".to_string()]
        );
        s.apply(Update::Delete(Kind::NetworkPolicies, key));
        assert!(s.objects().rejected.is_empty());
    }

    #[test]
    fn errors_mark_unhealthy_until_reachable_again_and_keep_content() {
        let mut s = synced_state();
        s.apply(Update::Apply(ns("a", "x")));
        s.take_health_changed();
        s.apply(Update::Error(Kind::Pods, "connection refused".into()));
        assert!(!s.healthy() && s.synced());
        assert!(s.take_health_changed());
        assert_eq!(s.objects().namespaces.len(), 1);
        s.apply(Update::Reachable(Kind::Pods));
        assert!(s.healthy());
    }

    #[test]
    fn every_node_is_kept_and_this_one_is_known() {
        let mut s = synced_state();
        let info = NodeInfo {
            pod_cidrs: vec!["10.0.0.0/24".parse().unwrap()],
            addresses: vec![],
        };
        s.apply(Update::Apply(Item::Node {
            name: "other".into(),
            info: info.clone(),
        }));
        assert!(s.node().is_none() && s.take_dirty());
        assert_eq!(
            s.objects().nodes.len(),
            1,
            "other nodes are kept for routing"
        );
        s.apply(Update::Apply(Item::Node {
            name: "n1".into(),
            info: info.clone(),
        }));
        assert_eq!(s.node(), Some(&info));
        assert_eq!(s.objects().nodes.len(), 2);
        s.apply(Update::Delete(Kind::Nodes, (String::new(), "n1".into())));
        assert!(s.node().is_none());
        assert_eq!(s.objects().nodes.len(), 1);
    }

    #[test]
    fn an_unserved_kind_counts_as_listed_and_empty() {
        let mut s = ClusterState::new("n1");
        for kind in [
            Kind::Pods,
            Kind::Namespaces,
            Kind::NetworkPolicies,
            Kind::Nodes,
        ] {
            s.apply(Update::Init(kind));
            s.apply(Update::InitDone(kind));
        }
        s.apply(Update::Init(Kind::ClusterPolicies));
        s.apply(Update::NotServed(Kind::ClusterPolicies));
        assert!(!s.synced());
        s.apply(Update::Init(Kind::MoatPolicies));
        s.apply(Update::NotServed(Kind::MoatPolicies));
        assert!(s.synced() && s.healthy());
        assert!(s.health(Kind::MoatPolicies).not_served);
        // Served again: a successful list clears the flag.
        s.apply(Update::Init(Kind::MoatPolicies));
        s.apply(Update::InitDone(Kind::MoatPolicies));
        assert!(!s.health(Kind::MoatPolicies).not_served);
    }

    #[test]
    fn finished_pod_is_removed_by_its_modification() {
        let mut s = synced_state();
        s.apply(Update::Apply(pod("a", "job", "batch")));
        s.apply(Update::Apply(Item::Pod(PodItem {
            key: ("a".into(), "job".into()),
            meta: None,
            warning: None,
        })));
        assert!(s.objects().pods.is_empty());
    }

    fn cnp(name: &str, priority: u32) -> Item {
        let value = serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1beta1",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {
                "tier": "Admin",
                "priority": priority,
                "subject": {"namespaces": {}},
                "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
            },
        });
        Item::ClusterPolicy {
            name: name.into(),
            policy: Ok(ClusterNetworkPolicy::from_value(value).unwrap()),
        }
    }

    fn bad_cnp(name: &str) -> Item {
        Item::ClusterPolicy {
            name: name.into(),
            policy: Err(format!("{name}: spec.priority: above 1000")),
        }
    }

    #[test]
    fn rejected_cluster_policy_keeps_its_last_good_version_through_relists() {
        let mut s = synced_state();
        s.apply(Update::Apply(cnp("guard", 10)));
        assert!(s.take_dirty());
        assert_eq!(s.objects().cluster_policies.len(), 1);
        s.apply(Update::Apply(bad_cnp("guard")));
        assert!(s.take_dirty());
        let o = s.objects();
        assert_eq!(o.cluster_policies["guard"], {
            let Item::ClusterPolicy { policy, .. } = cnp("guard", 10) else {
                unreachable!()
            };
            policy.unwrap()
        });
        assert_eq!(
            o.rejected,
            vec![
                "ClusterNetworkPolicy guard: spec.priority: above 1000 (its last good version \
                 stays in force)"
                    .to_string()
            ]
        );
        assert_eq!(s.object_count(Kind::ClusterPolicies), 1);
        // A relist that still holds the bad version changes nothing.
        s.apply(Update::Init(Kind::ClusterPolicies));
        s.apply(Update::InitApply(bad_cnp("guard")));
        s.apply(Update::InitDone(Kind::ClusterPolicies));
        assert!(!s.take_dirty());
        assert_eq!(s.objects().cluster_policies.len(), 1);
        // Fixed: the new version, no rejection.
        s.apply(Update::Apply(cnp("guard", 20)));
        assert!(s.take_dirty());
        assert!(s.objects().rejected.is_empty());
        // Deleted: gone.
        s.apply(Update::Delete(
            Kind::ClusterPolicies,
            (String::new(), "guard".into()),
        ));
        assert!(s.objects().cluster_policies.is_empty());
        // Never good: rejected and absent.
        s.apply(Update::Apply(bad_cnp("new")));
        let o = s.objects();
        assert!(o.cluster_policies.is_empty());
        assert_eq!(
            o.rejected,
            vec!["ClusterNetworkPolicy new: spec.priority: above 1000".to_string()]
        );
    }

    #[test]
    fn cluster_policy_paths_of_both_versions_are_that_kind() {
        for v in ["v1beta1", "v1alpha2"] {
            assert_eq!(
                Kind::from_path(&format!(
                    "/apis/policy.networking.k8s.io/{v}/clusternetworkpolicies"
                )),
                Some(Kind::ClusterPolicies)
            );
        }
    }
}
