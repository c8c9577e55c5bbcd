//! Identities: a number per security label set, derived by hashing so that every node computes
//! the same number with no coordination. Hash collisions are detected and resolved by
//! rehashing with a salt; which label set keeps the unsalted number depends only on the set of
//! live label sets (sorted order), never on arrival order, so nodes agree and an incremental
//! engine agrees with a from-scratch compile.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::labels::LabelSet;

/// A security identity as stored in the maps (reserved values from `moat_common`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Identity(pub u32);

impl Identity {
    pub const ANY: Identity = Identity(moat_common::IDENTITY_ANY);
    pub const HOST: Identity = Identity(moat_common::IDENTITY_HOST);
    pub const WORLD: Identity = Identity(moat_common::IDENTITY_WORLD);
    pub const UNMANAGED: Identity = Identity(moat_common::IDENTITY_UNMANAGED);
    pub const REMOTE_NODE: Identity = Identity(moat_common::IDENTITY_REMOTE_NODE);

    pub fn is_reserved(self) -> bool {
        self.0 < moat_common::IDENTITY_FIRST_DERIVED
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Derived identities live in [IDENTITY_FIRST_DERIVED, 2^24): policy ids above that range are
/// free for endpoint-scoped policy variants.
pub const IDENTITY_END: u64 = 1 << 24;

/// Pod labels that differ between pods of one workload and carry no security meaning; keeping
/// them would give every ReplicaSet generation (or StatefulSet pod) its own identity.
pub const VOLATILE_LABEL_KEYS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "pod-template-generation",
];

/// The namespace name, as a label of the identity.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of the namespace's labels inside the identity's labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.kubernetes.pod.namespace.labels.";
/// Set by the API server on every namespace; added here when a datastore omits it, so that
/// selectors on it behave the same everywhere.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The labels that decide a pod's identity, kept in three parts because selectors look at
/// them separately (podSelector at the pod's, namespaceSelector at the namespace's).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecurityLabels {
    pub namespace: String,
    pub namespace_labels: LabelSet,
    pub pod_labels: LabelSet,
}

impl SecurityLabels {
    /// Drops volatile keys, and pod labels under the namespace prefix: a pod must not be able
    /// to claim another namespace's identity by labelling itself.
    pub fn new(namespace: &str, namespace_labels: &LabelSet, pod_labels: &LabelSet) -> Self {
        let pod_labels = pod_labels
            .iter()
            .filter(|(k, _)| !VOLATILE_LABEL_KEYS.contains(k) && !k.starts_with(NAMESPACE_LABEL))
            .collect();
        let mut namespace_labels = namespace_labels.clone();
        if !namespace_labels.contains_key(NAMESPACE_NAME_LABEL) {
            namespace_labels.insert(NAMESPACE_NAME_LABEL, namespace);
        }
        Self {
            namespace: namespace.to_string(),
            namespace_labels,
            pod_labels,
        }
    }

    /// The flat label set (pod labels, prefixed namespace labels, namespace name): what the
    /// identity hashes and what `moatctl` shows.
    pub fn to_label_set(&self) -> LabelSet {
        let mut out = self.pod_labels.clone();
        for (k, v) in self.namespace_labels.iter() {
            out.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v);
        }
        out.insert(NAMESPACE_LABEL, self.namespace.as_str());
        out
    }
}

/// Keys of a hashed id space serialize themselves canonically (platform independent).
pub trait CanonicalKey: Ord + Clone {
    fn canonical_bytes(&self) -> Vec<u8>;
}

impl CanonicalKey for SecurityLabels {
    fn canonical_bytes(&self) -> Vec<u8> {
        self.to_label_set().canonical_bytes()
    }
}

/// FNV-1a 64 followed by a SplitMix64 finalizer (FNV's low bits mix poorly on their own).
/// Written out here so that the result never depends on a library's version or platform.
pub fn stable_hash(salt: u32, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Two keys that hashed to the same id; `key` was moved to `assigned` by salting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collision<K> {
    pub key: K,
    pub collided_with: K,
    pub base_id: u32,
    pub salt: u32,
    pub assigned: u32,
}

/// A space of ids in [start, end) derived by hashing keys, with collision resolution that is
/// a function of the live key set only.
#[derive(Clone, Debug)]
pub struct HashedIds<K: CanonicalKey> {
    space: &'static str,
    start: u64,
    end: u64,
    ids: BTreeMap<K, (u32, u32)>,
    owners: BTreeMap<u32, K>,
    /// Keys that did not get their unsalted id (few: only collisions).
    salted: BTreeSet<K>,
    collisions: Vec<Collision<K>>,
}

impl<K: CanonicalKey> HashedIds<K> {
    pub fn new(space: &'static str, start: u64, end: u64) -> Self {
        Self {
            space,
            start,
            end,
            ids: BTreeMap::new(),
            owners: BTreeMap::new(),
            salted: BTreeSet::new(),
            collisions: Vec::new(),
        }
    }

    pub fn candidate(&self, key: &K, salt: u32) -> u32 {
        let span = self.end - self.start;
        (self.start + stable_hash(salt, &key.canonical_bytes()) % span) as u32
    }

    pub fn get(&self, key: &K) -> Option<u32> {
        self.ids.get(key).map(|(id, _)| *id)
    }

    pub fn owner(&self, id: u32) -> Option<&K> {
        self.owners.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, u32)> {
        self.ids.iter().map(|(k, (id, _))| (k, *id))
    }

    pub fn collisions(&self) -> &[Collision<K>] {
        &self.collisions
    }

    /// Makes `live` the set of keys with ids (see `update`).
    pub fn sync(&mut self, live: &BTreeSet<K>) -> Result<(), Error> {
        let gone: BTreeSet<K> = self
            .ids
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        let new: BTreeSet<K> = live
            .iter()
            .filter(|k| !self.ids.contains_key(*k))
            .cloned()
            .collect();
        self.update(&new, &gone).map(|_| ())
    }

    /// Adds and removes keys. The result is always what a from-scratch assignment of the live
    /// keys in sorted order gives (each key takes its first free salted candidate among the
    /// ids of the keys before it). That assignment changes only locally:
    /// - a removed key's id matters to the salted keys after it that tried that id first;
    /// - an added key displaces nothing unless its id belonged to a key after it.
    ///
    /// Both are checked; only then is the whole space reassigned. Returns whether every key
    /// that stays kept its id (false tells the caller that derived state must be rebuilt).
    pub fn update(&mut self, added: &BTreeSet<K>, removed: &BTreeSet<K>) -> Result<bool, Error> {
        let mut local = true;
        for k in removed {
            let Some((id, salt)) = self.ids.remove(k) else {
                continue;
            };
            self.owners.remove(&id);
            if salt > 0 {
                self.salted.remove(k);
                self.collisions.retain(|c| &c.key != k);
            }
            let tried_it = |l: &K| {
                let s = self.ids[l].1;
                (0..s).any(|s| self.candidate(l, s) == id)
            };
            if local
                && self
                    .salted
                    .range((Bound::Excluded(k), Bound::Unbounded))
                    .any(tried_it)
            {
                local = false;
            }
        }
        let fresh: BTreeSet<&K> = added
            .iter()
            .filter(|k| !self.ids.contains_key(*k))
            .collect();
        for k in fresh.iter().copied() {
            if !local {
                break;
            }
            if self.ids.contains_key(k) {
                continue;
            }
            let span = self.end - self.start;
            let base = self.candidate(k, 0);
            let mut salt = 0u32;
            let mut id = base;
            loop {
                match self.owners.get(&id) {
                    None => break,
                    Some(owner) if owner < k => {
                        salt += 1;
                        if u64::from(salt) > span {
                            return Err(Error::IdSpaceExhausted { space: self.space });
                        }
                        id = self.candidate(k, salt);
                    }
                    Some(_) => {
                        local = false;
                        break;
                    }
                }
            }
            if !local {
                break;
            }
            if salt > 0 {
                self.salted.insert(k.clone());
                self.collisions.push(Collision {
                    key: k.clone(),
                    collided_with: self.owners[&base].clone(),
                    base_id: base,
                    salt,
                    assigned: id,
                });
            }
            self.ids.insert(k.clone(), (id, salt));
            self.owners.insert(id, k.clone());
        }
        if local {
            return Ok(true);
        }
        let before: BTreeMap<K, u32> = self
            .ids
            .iter()
            .map(|(k, (id, _))| (k.clone(), *id))
            .collect();
        let live: BTreeSet<K> = self
            .ids
            .keys()
            .cloned()
            .chain(added.iter().cloned())
            .collect();
        self.reassign(&live)?;
        Ok(before
            .iter()
            .filter(|(k, _)| !fresh.contains(k))
            .all(|(k, id)| self.get(k) == Some(*id)))
    }

    fn reassign(&mut self, live: &BTreeSet<K>) -> Result<(), Error> {
        self.ids.clear();
        self.owners.clear();
        self.collisions.clear();
        self.salted.clear();
        let span = self.end - self.start;
        for key in live {
            let base = self.candidate(key, 0);
            let mut salt = 0u32;
            let mut id = base;
            while self.owners.contains_key(&id) {
                salt += 1;
                if u64::from(salt) > span {
                    return Err(Error::IdSpaceExhausted { space: self.space });
                }
                id = self.candidate(key, salt);
            }
            if salt > 0 {
                self.salted.insert(key.clone());
                self.collisions.push(Collision {
                    key: key.clone(),
                    collided_with: self.owners[&base].clone(),
                    base_id: base,
                    salt,
                    assigned: id,
                });
            }
            self.ids.insert(key.clone(), (id, salt));
            self.owners.insert(id, key.clone());
        }
        Ok(())
    }
}

/// Identities of security label sets.
#[derive(Clone, Debug)]
pub struct IdentityRegistry {
    ids: HashedIds<SecurityLabels>,
}

impl Default for IdentityRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityRegistry {
    pub fn new() -> Self {
        Self {
            ids: HashedIds::new(
                "identities",
                u64::from(moat_common::IDENTITY_FIRST_DERIVED),
                IDENTITY_END,
            ),
        }
    }

    /// The identity a label set gets when nothing collides with it.
    pub fn derive(labels: &SecurityLabels) -> Identity {
        Identity(Self::new().ids.candidate(labels, 0))
    }

    pub fn sync(&mut self, live: &BTreeSet<SecurityLabels>) -> Result<(), Error> {
        self.ids.sync(live)
    }

    /// Adds and removes label sets; false when an identity that stays changed number.
    pub fn update(
        &mut self,
        added: &BTreeSet<SecurityLabels>,
        removed: &BTreeSet<SecurityLabels>,
    ) -> Result<bool, Error> {
        self.ids.update(added, removed)
    }

    pub fn lookup(&self, labels: &SecurityLabels) -> Option<Identity> {
        self.ids.get(labels).map(Identity)
    }

    pub fn labels(&self, identity: Identity) -> Option<&SecurityLabels> {
        self.ids.owner(identity.0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SecurityLabels, Identity)> {
        self.ids.iter().map(|(k, id)| (k, Identity(id)))
    }

    /// Current collisions, each resolved by salting; never a merge of two label sets.
    pub fn collisions(&self) -> &[Collision<SecurityLabels>] {
        self.ids.collisions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(ns: &str, pod: &[(&str, &str)]) -> SecurityLabels {
        SecurityLabels::new(ns, &LabelSet::new(), &pod.iter().copied().collect())
    }

    #[test]
    fn identity_ignores_volatile_labels_and_is_in_the_derived_range() {
        let a = labels("x", &[("app", "web"), ("pod-template-hash", "abc")]);
        let b = labels("x", &[("app", "web"), ("pod-template-hash", "def")]);
        assert_eq!(a, b);
        let id = IdentityRegistry::derive(&a).0;
        assert!((moat_common::IDENTITY_FIRST_DERIVED..1 << 24).contains(&id));
    }

    #[test]
    fn identity_depends_on_namespace_and_its_labels() {
        let a = labels("x", &[("app", "web")]);
        let b = labels("y", &[("app", "web")]);
        assert_ne!(IdentityRegistry::derive(&a), IdentityRegistry::derive(&b));
        let c = SecurityLabels::new(
            "x",
            &[("team", "t")].into_iter().collect(),
            &LabelSet::new(),
        );
        let d = SecurityLabels::new("x", &LabelSet::new(), &LabelSet::new());
        assert_ne!(IdentityRegistry::derive(&c), IdentityRegistry::derive(&d));
    }

    #[test]
    fn pod_cannot_claim_another_namespace_by_label() {
        let spoof = labels("x", &[(NAMESPACE_LABEL, "kube-system")]);
        assert_eq!(spoof.to_label_set().get(NAMESPACE_LABEL), Some("x"));
    }

    #[test]
    fn hash_is_pinned_across_platforms() {
        // Changing this value changes every identity in every cluster: do it deliberately.
        assert_eq!(stable_hash(0, b"moat"), 0x6fb0a8ae8a406314);
        assert_ne!(stable_hash(1, b"moat"), stable_hash(0, b"moat"));
    }

    /// A tiny id space forces collisions; the assignment must not depend on arrival order
    /// and must never give two keys one id.
    #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
    struct Key(u32);
    impl CanonicalKey for Key {
        fn canonical_bytes(&self) -> Vec<u8> {
            self.0.to_le_bytes().to_vec()
        }
    }

    #[test]
    fn collisions_are_resolved_by_salt_independently_of_order() {
        let all: BTreeSet<Key> = (0..6).map(Key).collect();
        let mut forward = HashedIds::new("test", 0, 8);
        let mut grown = BTreeSet::new();
        for k in all.iter() {
            grown.insert(k.clone());
            forward.sync(&grown).unwrap();
        }
        let mut backward = HashedIds::new("test", 0, 8);
        let mut grown = BTreeSet::new();
        for k in all.iter().rev() {
            grown.insert(k.clone());
            backward.sync(&grown).unwrap();
        }
        let f: Vec<_> = forward.iter().map(|(k, id)| (k.clone(), id)).collect();
        let b: Vec<_> = backward.iter().map(|(k, id)| (k.clone(), id)).collect();
        assert_eq!(f, b);
        let distinct: BTreeSet<u32> = f.iter().map(|(_, id)| *id).collect();
        assert_eq!(distinct.len(), all.len());
        assert!(
            !forward.collisions().is_empty(),
            "6 keys in 8 slots should collide"
        );
    }

    proptest::proptest! {
        /// Incremental updates in a tiny space (many collisions) always equal a from-scratch
        /// assignment, and report honestly whether surviving keys kept their ids.
        #[test]
        fn incremental_update_equals_from_scratch(
            steps in proptest::collection::vec(
                (proptest::collection::btree_set(0u32..14, 0..4),
                 proptest::collection::btree_set(0u32..14, 0..4)),
                1..30,
            )
        ) {
            let mut inc: HashedIds<Key> = HashedIds::new("test", 0, 40);
            for (add, remove) in steps {
                let add: BTreeSet<Key> = add.into_iter().map(Key).collect();
                let remove: BTreeSet<Key> = remove.into_iter().map(Key).filter(|k| !add.contains(k)).collect();
                let before: BTreeMap<Key, u32> = inc.iter().map(|(k, id)| (k.clone(), id)).collect();
                let stable = inc.update(&add, &remove).unwrap();
                let live: BTreeSet<Key> = inc.iter().map(|(k, _)| k.clone()).collect();
                let mut fresh = HashedIds::new("test", 0, 40);
                fresh.reassign(&live).unwrap();
                let a: Vec<_> = inc.iter().map(|(k, id)| (k.clone(), id)).collect();
                let b: Vec<_> = fresh.iter().map(|(k, id)| (k.clone(), id)).collect();
                proptest::prop_assert_eq!(&a, &b);
                let kept = before.iter().filter(|(k, _)| live.contains(*k)).all(|(k, id)| inc.get(k) == Some(*id));
                proptest::prop_assert_eq!(stable, kept);
                proptest::prop_assert_eq!(inc.collisions().len(), fresh.collisions().len());
            }
        }
    }

    #[test]
    fn a_full_space_reports_exhaustion() {
        let mut ids = HashedIds::new("test", 0, 2);
        let live: BTreeSet<Key> = (0..3).map(Key).collect();
        assert!(matches!(
            ids.sync(&live),
            Err(Error::IdSpaceExhausted { .. })
        ));
    }
}
