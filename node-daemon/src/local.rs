//! The `local` datastore: Kubernetes-shaped YAML objects in a directory. Namespaces and Pods
//! (labels, container ports, the `moat.io/mode` annotation) describe workloads; NetworkPolicy
//! objects describe their perimeters. An object that does not parse or validate is reported
//! with the reason and left out; everything else keeps working.
//!
//! Objects are read into the Kubernetes API types and converted by [`crate::kube::convert`],
//! exactly as the kubernetes datastore converts what the API server sends: a pod means the
//! same to Moat whichever datastore holds it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use crate::kube::convert::{self, NodeInfo};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use moat_policy::{ClusterNetworkPolicy, ContainerPort, LabelSet, MoatPolicy, NetworkPolicy};
use serde::Deserialize;

pub const MODE_ANNOTATION: &str = "moat.io/mode";

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodMeta {
    pub labels: LabelSet,
    pub ports: Vec<ContainerPort>,
    pub mode: Option<moat_policy::Mode>,
    /// The pod carries `moat.io/quarantine: "true"` (crate::quarantine).
    pub quarantine: bool,
    /// Addresses the datastore reports (status.podIPs). Pods that are not registered on
    /// this node but have addresses are remote workloads: they get ipcache entries so that
    /// policy can name them.
    pub ips: Vec<std::net::IpAddr>,
}

#[derive(Clone, Debug, Default)]
pub struct LocalObjects {
    pub namespaces: BTreeMap<String, LabelSet>,
    pub pods: BTreeMap<(String, String), PodMeta>,
    pub policies: BTreeMap<(String, String), NetworkPolicy>,
    /// Moat's own policy objects (mode, default-deny posture, external CIDR groups).
    pub moat_policies: BTreeMap<(String, String), MoatPolicy>,
    /// ClusterNetworkPolicies (Admin and Baseline tiers) by name.
    pub cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    /// Nodes by name: their pod CIDRs and addresses (routes between nodes).
    pub nodes: BTreeMap<String, NodeInfo>,
    /// "<file>: <kind> <ns/name>: <reason>"
    pub rejected: Vec<String>,
}

#[derive(Deserialize)]
struct Header {
    kind: Option<String>,
}

/// Object files: YAML or JSON, not hidden (editors' and atomic writers' temp files are).
pub fn is_object_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    !hidden
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| is_object_file(p))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// One object of the datastore, by kind and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKey {
    Namespace(String),
    Pod(String, String),
    NetworkPolicy(String, String),
    MoatPolicy(String, String),
    ClusterNetworkPolicy(String),
    Node(String),
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Namespace(name) => write!(f, "Namespace {name}"),
            Self::Pod(ns, name) => write!(f, "Pod {ns}/{name}"),
            Self::NetworkPolicy(ns, name) => write!(f, "NetworkPolicy {ns}/{name}"),
            Self::MoatPolicy(ns, name) => write!(f, "MoatPolicy {ns}/{name}"),
            Self::ClusterNetworkPolicy(name) => write!(f, "ClusterNetworkPolicy {name}"),
            Self::Node(name) => write!(f, "Node {name}"),
        }
    }
}

/// One object's content.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(LabelSet),
    Pod(PodMeta),
    NetworkPolicy(NetworkPolicy),
    MoatPolicy(MoatPolicy),
    ClusterNetworkPolicy(ClusterNetworkPolicy),
    Node(NodeInfo),
}

impl LocalObjects {
    /// Every object's key.
    pub fn keys(&self) -> impl Iterator<Item = ObjectKey> + '_ {
        let two = |(ns, name): &(String, String)| (ns.clone(), name.clone());
        self.namespaces
            .keys()
            .map(|n| ObjectKey::Namespace(n.clone()))
            .chain(self.pods.keys().map(move |k| {
                let (ns, name) = two(k);
                ObjectKey::Pod(ns, name)
            }))
            .chain(self.policies.keys().map(move |k| {
                let (ns, name) = two(k);
                ObjectKey::NetworkPolicy(ns, name)
            }))
            .chain(self.moat_policies.keys().map(move |k| {
                let (ns, name) = two(k);
                ObjectKey::MoatPolicy(ns, name)
            }))
            .chain(
                self.cluster_policies
                    .keys()
                    .map(|n| ObjectKey::ClusterNetworkPolicy(n.clone())),
            )
            .chain(self.nodes.keys().map(|n| ObjectKey::Node(n.clone())))
    }

    /// A copy of one object, if present.
    pub fn get(&self, key: &ObjectKey) -> Option<Object> {
        let pair = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        match key {
            ObjectKey::Namespace(n) => self.namespaces.get(n).cloned().map(Object::Namespace),
            ObjectKey::Pod(ns, name) => self.pods.get(&pair(ns, name)).cloned().map(Object::Pod),
            ObjectKey::NetworkPolicy(ns, name) => self
                .policies
                .get(&pair(ns, name))
                .cloned()
                .map(Object::NetworkPolicy),
            ObjectKey::MoatPolicy(ns, name) => self
                .moat_policies
                .get(&pair(ns, name))
                .cloned()
                .map(Object::MoatPolicy),
            ObjectKey::ClusterNetworkPolicy(n) => self
                .cluster_policies
                .get(n)
                .cloned()
                .map(Object::ClusterNetworkPolicy),
            ObjectKey::Node(n) => self.nodes.get(n).cloned().map(Object::Node),
        }
    }

    /// Whether `other` holds the same version of one object (compared in place).
    pub fn same(&self, other: &LocalObjects, key: &ObjectKey) -> bool {
        let pair = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        match key {
            ObjectKey::Namespace(n) => self.namespaces.get(n) == other.namespaces.get(n),
            ObjectKey::Pod(ns, name) => {
                let k = pair(ns, name);
                self.pods.get(&k) == other.pods.get(&k)
            }
            ObjectKey::NetworkPolicy(ns, name) => {
                let k = pair(ns, name);
                self.policies.get(&k) == other.policies.get(&k)
            }
            ObjectKey::MoatPolicy(ns, name) => {
                let k = pair(ns, name);
                self.moat_policies.get(&k) == other.moat_policies.get(&k)
            }
            ObjectKey::ClusterNetworkPolicy(n) => {
                self.cluster_policies.get(n) == other.cluster_policies.get(n)
            }
            ObjectKey::Node(n) => self.nodes.get(n) == other.nodes.get(n),
        }
    }

    pub fn set(&mut self, key: &ObjectKey, object: Option<Object>) {
        let pair = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        match (key, object) {
            (ObjectKey::Namespace(n), Some(Object::Namespace(v))) => {
                self.namespaces.insert(n.clone(), v);
            }
            (ObjectKey::Namespace(n), _) => {
                self.namespaces.remove(n);
            }
            (ObjectKey::Pod(ns, name), Some(Object::Pod(v))) => {
                self.pods.insert(pair(ns, name), v);
            }
            (ObjectKey::Pod(ns, name), _) => {
                self.pods.remove(&pair(ns, name));
            }
            (ObjectKey::NetworkPolicy(ns, name), Some(Object::NetworkPolicy(v))) => {
                self.policies.insert(pair(ns, name), v);
            }
            (ObjectKey::NetworkPolicy(ns, name), _) => {
                self.policies.remove(&pair(ns, name));
            }
            (ObjectKey::MoatPolicy(ns, name), Some(Object::MoatPolicy(v))) => {
                self.moat_policies.insert(pair(ns, name), v);
            }
            (ObjectKey::MoatPolicy(ns, name), _) => {
                self.moat_policies.remove(&pair(ns, name));
            }
            (ObjectKey::ClusterNetworkPolicy(n), Some(Object::ClusterNetworkPolicy(v))) => {
                self.cluster_policies.insert(n.clone(), v);
            }
            (ObjectKey::ClusterNetworkPolicy(n), _) => {
                self.cluster_policies.remove(n);
            }
            (ObjectKey::Node(n), Some(Object::Node(v))) => {
                self.nodes.insert(n.clone(), v);
            }
            (ObjectKey::Node(n), _) => {
                self.nodes.remove(n);
            }
        }
    }
}

/// What identifies a file's version without reading it: a rename over it changes the inode,
/// an in-place write the change time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some(FileStamp {
        inode: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// One file as last read: its stamp (to tell when it changes) and what its text held.
struct ParsedFile {
    stamp: Option<FileStamp>,
    text: ParsedText,
}

/// What one file's text holds: its objects, and one line per problem.
#[derive(Debug, Default)]
pub struct ParsedText {
    pub objects: BTreeMap<ObjectKey, Object>,
    pub rejected: Vec<String>,
    /// Objects the text names (kind, namespace, name) whose content was rejected: their last
    /// good version (from the file's previous read) stays in force.
    pub failed: BTreeSet<ObjectKey>,
    /// No object could be taken from the text (it is not YAML, over a limit, or unreadable):
    /// every object of the file's previous read stays in force.
    pub unreadable: bool,
}

/// Rejections listed per file: enough to fix a file, few enough that one file of thousands of
/// bad objects cannot crowd the status out.
pub const MAX_REJECTIONS_PER_FILE: usize = 20;

/// Parses one file's text (`file` names it in the rejections). Total and bounded: at most
/// [`MAX_REJECTIONS_PER_FILE`] + 1 rejections, whatever the input.
pub fn parse_text(file: &str, text: &str) -> ParsedText {
    let mut out = ParsedText::default();
    let documents = match moat_policy::yaml::documents(text) {
        Ok(documents) => documents,
        Err(e) => {
            out.rejected.push(format!("{file}: {e}"));
            out.unreadable = true;
            return out;
        }
    };
    let mut parsed = LocalObjects::default();
    let mut unreported = 0;
    for value in documents {
        if value.is_null() {
            continue;
        }
        let problem = match add_object(&mut parsed, &value) {
            Ok(warning) => warning,
            Err(reason) => {
                out.failed.extend(object_key(&value));
                Some(reason)
            }
        };
        if let Some(problem) = problem {
            if out.rejected.len() < MAX_REJECTIONS_PER_FILE {
                out.rejected.push(format!("{file}: {problem}"));
            } else {
                unreported += 1;
            }
        }
    }
    if unreported > 0 {
        out.rejected.push(format!(
            "{file}: {unreported} more objects rejected (not listed)"
        ));
    }
    out.objects = parsed
        .keys()
        .collect::<Vec<_>>()
        .into_iter()
        .filter_map(|k| {
            let o = parsed.get(&k)?;
            Some((k, o))
        })
        .collect();
    out
}

/// The key an object claims (kind, namespace, name), read without validating the rest, so
/// that a rejected edit can keep the object's last good version.
fn object_key(value: &serde_json::Value) -> Option<ObjectKey> {
    let name = value.pointer("/metadata/name")?.as_str()?.to_string();
    let namespace = || {
        value
            .pointer("/metadata/namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string()
    };
    Some(match value.get("kind")?.as_str()? {
        "Namespace" => ObjectKey::Namespace(name),
        "Pod" => ObjectKey::Pod(namespace(), name),
        "NetworkPolicy" => ObjectKey::NetworkPolicy(namespace(), name),
        "MoatPolicy" => ObjectKey::MoatPolicy(namespace(), name),
        "ClusterNetworkPolicy" => ObjectKey::ClusterNetworkPolicy(name),
        "Node" => ObjectKey::Node(name),
        _ => return None,
    })
}

/// A file's text, read only when it is within the YAML size limit (a larger file is never
/// read into memory).
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = fs::File::open(path)?;
    let limit = moat_policy::yaml::MAX_TEXT_BYTES;
    let mut text = String::new();
    file.take(limit as u64 + 1).read_to_string(&mut text)?;
    if text.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("over the limit of {limit} bytes; not read"),
        ));
    }
    Ok(text)
}

fn parse_file(path: &Path) -> ParsedFile {
    let stamp = stamp(path);
    let file = path.display().to_string();
    let parsed = match read_bounded(path) {
        Ok(text) => parse_text(&file, &text),
        Err(e) => ParsedText {
            rejected: vec![format!("{file}: {e}")],
            unreadable: true,
            ..ParsedText::default()
        },
    };
    ParsedFile {
        stamp,
        text: parsed,
    }
}

/// What of a file's previous parse stays in force after a new parse: everything when the
/// file became unreadable, else the objects whose new version was rejected (and that the
/// file does not define validly elsewhere). An editor's typo never opens a perimeter.
fn keep_last_good(file: &Path, new: &mut ParsedText, old: Option<BTreeMap<ObjectKey, Object>>) {
    let Some(old) = old else { return };
    let mut kept = 0;
    for (key, object) in old {
        if (new.unreadable || new.failed.contains(&key)) && !new.objects.contains_key(&key) {
            new.objects.insert(key, object);
            kept += 1;
        }
    }
    if kept > 0 {
        new.rejected.push(format!(
            "{}: {kept} object(s) keep their last good version until the file is fixed",
            file.display()
        ));
    }
}

/// After parsing this much text, the parse's garbage (tens of times the text) is handed back
/// to the kernel rather than kept as resident free memory.
const RELEASE_AFTER_PARSING_BYTES: u64 = 256 << 10;

/// The local datastore directory, parsed file by file. A refresh stats every file and
/// re-parses only those that changed, so an edit of one small policy file costs that file,
/// not the whole cluster. An object defined in two files is taken from the first (by file
/// name) and reported for the other.
pub struct LocalStore {
    dir: PathBuf,
    files: BTreeMap<PathBuf, ParsedFile>,
    /// The files defining each object, in name order: the first one wins.
    definers: BTreeMap<ObjectKey, BTreeSet<PathBuf>>,
    merged: LocalObjects,
}

impl LocalStore {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            definers: BTreeMap::new(),
            merged: LocalObjects::default(),
        }
    }

    /// The objects as of the last refresh (with every file's rejections).
    pub fn objects(&self) -> &LocalObjects {
        &self.merged
    }

    /// Re-reads what changed on disk. Returns the objects whose content may have changed, or
    /// None when no file changed.
    pub fn refresh(&mut self) -> Option<BTreeSet<ObjectKey>> {
        let listing: BTreeMap<PathBuf, Option<FileStamp>> = yaml_files(&self.dir)
            .into_iter()
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect();
        let mut changed_files: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !listing.contains_key(*p))
            .cloned()
            .collect();
        changed_files.extend(
            listing
                .iter()
                .filter(|(p, s)| self.files.get(*p).is_none_or(|f| f.stamp != **s))
                .map(|(p, _)| p.clone()),
        );
        let present: BTreeSet<PathBuf> = listing.into_keys().collect();
        self.reparse(changed_files, &present)
    }

    /// Re-reads only `paths` (names a directory watch reported). Paths that are not object
    /// files are ignored; a file that is gone takes its objects with it.
    pub fn refresh_files(&mut self, paths: &BTreeSet<PathBuf>) -> Option<BTreeSet<ObjectKey>> {
        let mut changed = Vec::new();
        let mut present = BTreeSet::new();
        for path in paths.iter().filter(|p| is_object_file(p)) {
            let now = stamp(path);
            if now.is_some() {
                present.insert(path.clone());
            }
            let known = self.files.get(path).map(|f| f.stamp);
            if known != Some(now) && !(known.is_none() && now.is_none()) {
                changed.push(path.clone());
            }
        }
        self.reparse(changed, &present)
    }

    /// Drops what `changed` files defined and parses those of them in `present`.
    fn reparse(
        &mut self,
        changed_files: Vec<PathBuf>,
        present: &BTreeSet<PathBuf>,
    ) -> Option<BTreeSet<ObjectKey>> {
        if changed_files.is_empty() {
            return None;
        }
        let mut keys = BTreeSet::new();
        let mut parsed_bytes = 0;
        for path in changed_files {
            let old_objects = self.files.remove(&path).map(|old| {
                for key in old.text.objects.keys() {
                    if let Some(set) = self.definers.get_mut(key) {
                        set.remove(&path);
                        if set.is_empty() {
                            self.definers.remove(key);
                        }
                    }
                    keys.insert(key.clone());
                }
                old.text.objects
            });
            if present.contains(&path) {
                let mut parsed = parse_file(&path);
                parsed_bytes += parsed.stamp.map_or(0, |s| s.size);
                keep_last_good(&path, &mut parsed.text, old_objects);
                for key in parsed.text.objects.keys() {
                    self.definers
                        .entry(key.clone())
                        .or_default()
                        .insert(path.clone());
                    keys.insert(key.clone());
                }
                self.files.insert(path, parsed);
            }
        }
        if parsed_bytes > RELEASE_AFTER_PARSING_BYTES {
            crate::memory::release_free_memory();
        }
        for key in &keys {
            let winner = self
                .definers
                .get(key)
                .and_then(|set| set.first())
                .and_then(|path| self.files.get(path)?.text.objects.get(key).cloned());
            self.merged.set(key, winner);
        }
        self.merged.rejected = self
            .files
            .values()
            .flat_map(|f| f.text.rejected.iter().cloned())
            .collect();
        for (key, paths) in &self.definers {
            if let Some(first) = paths.first() {
                for other in paths.iter().skip(1) {
                    self.merged.rejected.push(format!(
                        "{}: {key} is also defined in {}, which wins",
                        other.display(),
                        first.display()
                    ));
                }
            }
        }
        Some(keys)
    }
}

/// Every object in `dir`, parsed now.
pub fn load(dir: &Path) -> LocalObjects {
    let mut store = LocalStore::new(dir);
    store.refresh();
    store.merged
}

/// Adds one object. Err: the object is refused (its last good version stays in force);
/// Ok(Some): it is taken, with a problem to report (e.g. a pod's unknown mode annotation).
fn add_object(out: &mut LocalObjects, json: &serde_json::Value) -> Result<Option<String>, String> {
    let header = Header::deserialize(json).map_err(|e| e.to_string())?;
    match header.kind.as_deref() {
        Some("Namespace") => {
            let ns = Namespace::deserialize(json).map_err(|e| format!("Namespace: {e}"))?;
            if ns.metadata.name.is_none() {
                return Err("Namespace without metadata.name".into());
            }
            let (_, name) = convert::namespace_key(&ns);
            out.namespaces.insert(name, convert::namespace_labels(&ns));
        }
        Some("Pod") => {
            let pod = Pod::deserialize(json).map_err(|e| format!("Pod: {e}"))?;
            if pod.metadata.name.is_none() {
                return Err("Pod without metadata.name".into());
            }
            let item = convert::pod_item(&pod);
            // A host-network or finished pod is no workload of Moat's: absent, as in the
            // kubernetes datastore (a version of it that was, is removed).
            if let Some(meta) = item.meta {
                out.pods.insert(item.key, meta);
            }
            return Ok(item.warning);
        }
        Some("NetworkPolicy") => {
            let policy = NetworkPolicy::from_value(json.clone()).map_err(|e| e.to_string())?;
            out.policies.insert(
                (policy.namespace().to_string(), policy.name().to_string()),
                policy,
            );
        }
        Some("MoatPolicy") => {
            let policy = MoatPolicy::from_value(json.clone()).map_err(|e| e.to_string())?;
            out.moat_policies.insert(
                (policy.namespace().to_string(), policy.name().to_string()),
                policy,
            );
        }
        Some("ClusterNetworkPolicy") => {
            let policy =
                ClusterNetworkPolicy::from_value(json.clone()).map_err(|e| e.to_string())?;
            out.cluster_policies
                .insert(policy.name().to_string(), policy);
        }
        Some("Node") => {
            let node = Node::deserialize(json).map_err(|e| format!("Node: {e}"))?;
            let name = node
                .metadata
                .name
                .clone()
                .ok_or("Node without metadata.name")?;
            out.nodes.insert(name, convert::node_info(&node));
        }
        Some(other) => return Err(format!("unsupported kind {other:?}")),
        None => return Err("object without a kind".into()),
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {app}}}\n"
        )
    }

    fn write(dir: &Path, name: &str, body: &str) {
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, body).unwrap();
        fs::rename(tmp, dir.join(name)).unwrap();
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey::Pod("shop".into(), name.into())
    }

    #[test]
    fn a_refresh_reports_exactly_the_objects_of_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &(pod("a1", "web") + &pod("a2", "web")),
        );
        write(dir.path(), "b.yaml", &pod("b1", "db"));
        let mut store = LocalStore::new(dir.path());
        let first = store.refresh().unwrap();
        assert_eq!(first, [key("a1"), key("a2"), key("b1")].into());
        assert!(store.refresh().is_none(), "nothing changed on disk");

        // b.yaml rewritten: only its objects (old and new) are reported.
        write(dir.path(), "b.yaml", &(pod("b1", "api") + &pod("b2", "db")));
        assert_eq!(store.refresh().unwrap(), [key("b1"), key("b2")].into());
        let labels = &store.objects().pods[&("shop".into(), "b1".into())].labels;
        assert_eq!(labels.get("app"), Some("api"));

        // a.yaml removed: its objects are gone.
        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(store.refresh().unwrap(), [key("a1"), key("a2")].into());
        assert!(store.objects().get(&key("a1")).is_none());
        assert_eq!(store.objects().pods.len(), 2);
        assert_eq!(load(dir.path()).pods, store.objects().pods);
    }

    #[test]
    fn an_object_in_two_files_comes_from_the_first_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1.yaml", &pod("p", "first"));
        write(dir.path(), "2.yaml", &pod("p", "second"));
        let mut store = LocalStore::new(dir.path());
        store.refresh();
        let app = |s: &LocalStore| {
            s.objects().pods[&("shop".into(), "p".into())]
                .labels
                .get("app")
                .map(str::to_string)
        };
        assert_eq!(app(&store).as_deref(), Some("first"));
        assert_eq!(store.objects().rejected.len(), 1);
        assert!(store.objects().rejected[0].contains("also defined in"));
        // The winner's file goes: the other definition takes over, and the report clears.
        fs::remove_file(dir.path().join("1.yaml")).unwrap();
        assert_eq!(store.refresh().unwrap(), [key("p")].into());
        assert_eq!(app(&store).as_deref(), Some("second"));
        assert!(store.objects().rejected.is_empty());
    }

    #[test]
    fn a_bad_document_is_reported_with_its_file_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        let body = pod("ok", "web") + "---\nkind: Pod\nmetadata: [not, a, map]\n";
        write(dir.path(), "x.yaml", &body);
        let objects = load(dir.path());
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(objects.rejected.len(), 1);
        assert!(
            objects.rejected[0].contains("x.yaml"),
            "{:?}",
            objects.rejected
        );
    }

    /// Issue 15's reproducer: before, the document iterator yielded this syntax error forever
    /// and each copy was pushed into the rejections (7.5 GB in 4 s).
    const BROKEN: &str =
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x\n  spec: [[[\n";

    #[test]
    fn a_malformed_yaml_file_is_one_rejection_naming_the_file() {
        let parsed = parse_text("D/50-broken.yaml", BROKEN);
        assert!(parsed.unreadable);
        assert!(parsed.objects.is_empty());
        assert_eq!(parsed.rejected.len(), 1, "{:?}", parsed.rejected);
        assert!(
            parsed.rejected[0].starts_with("D/50-broken.yaml: not YAML: line 4"),
            "{:?}",
            parsed.rejected
        );
    }

    #[test]
    fn a_file_that_breaks_keeps_its_last_good_objects_in_force() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &(pod("a1", "web") + &pod("a2", "web")),
        );
        let mut store = LocalStore::new(dir.path());
        store.refresh();
        write(dir.path(), "a.yaml", &(pod("a1", "db") + BROKEN));
        store.refresh();
        let objects = store.objects();
        assert_eq!(objects.pods.len(), 2, "the last good version stays");
        let a1 = &objects.pods[&("shop".into(), "a1".into())];
        assert_eq!(
            a1.labels.get("app"),
            Some("web"),
            "not half of the broken edit"
        );
        assert_eq!(objects.rejected.len(), 2, "{:?}", objects.rejected);
        assert!(objects.rejected[0].contains("a.yaml: not YAML"));
        assert!(objects.rejected[1].contains("keep their last good version"));
        // Fixed: the new content applies and the reports clear.
        write(dir.path(), "a.yaml", &pod("a1", "db"));
        store.refresh();
        let objects = store.objects();
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(
            objects.pods[&("shop".into(), "a1".into())]
                .labels
                .get("app"),
            Some("db")
        );
        assert!(objects.rejected.is_empty());
    }

    #[test]
    fn an_invalid_edit_of_a_policy_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let policy = |port: &str| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  podSelector: {{}}\n  ingress: [{{ports: [{{port: {port}}}]}}]\n"
            )
        };
        write(dir.path(), "p.yaml", &policy("80"));
        let mut store = LocalStore::new(dir.path());
        store.refresh();
        write(dir.path(), "p.yaml", &policy("70000"));
        store.refresh();
        let objects = store.objects();
        assert_eq!(objects.policies.len(), 1, "{:?}", objects.rejected);
        assert_eq!(objects.rejected.len(), 2, "{:?}", objects.rejected);
        assert!(objects.rejected[0].contains("p.yaml"));
        // A policy that never validated is simply absent.
        write(
            dir.path(),
            "q.yaml",
            &policy("70000").replace("name: p", "name: q"),
        );
        store.refresh();
        assert_eq!(store.objects().policies.len(), 1);
    }

    #[test]
    fn a_file_over_the_size_limit_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.yaml");
        let f = fs::File::create(&path).unwrap();
        f.set_len(moat_policy::yaml::MAX_TEXT_BYTES as u64 + 1)
            .unwrap();
        let objects = load(dir.path());
        assert_eq!(objects.rejected.len(), 1, "{:?}", objects.rejected);
        assert!(objects.rejected[0].contains("over the limit"));
    }

    /// One Pod (YAML) through both datastores: the local one's parse of a file holding it,
    /// and the kubernetes one's conversion of the same object as the API server sends it.
    /// Returns what each made of it: the pod's model (None: no workload) and the problems
    /// reported about it.
    fn both_datastores(yaml: &str) -> [(Option<PodMeta>, Vec<String>); 2] {
        let parsed = parse_text("f.yaml", yaml);
        let value = moat_policy::yaml::documents(yaml).unwrap().remove(0);
        let item = convert::pod_item(&serde_json::from_value::<Pod>(value).unwrap());
        let key = ObjectKey::Pod(item.key.0.clone(), item.key.1.clone());
        let local = match parsed.objects.get(&key) {
            Some(Object::Pod(meta)) => Some(meta.clone()),
            None => None,
            Some(other) => panic!("{other:?}"),
        };
        let local_problems = parsed
            .rejected
            .iter()
            .map(|r| {
                r.strip_prefix("f.yaml: ")
                    .expect("names the file")
                    .to_string()
            })
            .collect();
        let both = [
            (local, local_problems),
            (item.meta, item.warning.into_iter().collect()),
        ];
        assert_eq!(both[0], both[1], "the datastores disagree on {yaml}");
        both
    }

    const POD: &str =
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n";

    #[test]
    fn both_datastores_leave_out_a_host_network_pod() {
        let yaml = format!("{POD}spec: {{hostNetwork: true, containers: [{{name: c}}]}}\n");
        let [(meta, problems), _] = both_datastores(&yaml);
        assert_eq!((meta, problems), (None, vec![]));
    }

    #[test]
    fn both_datastores_leave_out_a_finished_pod() {
        for phase in ["Succeeded", "Failed"] {
            let yaml = format!(
                "{POD}spec: {{containers: [{{name: c}}]}}\nstatus: {{phase: {phase}, podIPs: [{{ip: 10.0.0.5}}]}}\n"
            );
            let [(meta, problems), _] = both_datastores(&yaml);
            assert_eq!((meta, problems), (None, vec![]), "{phase}");
        }
        let running = format!("{POD}status: {{phase: Running, podIPs: [{{ip: 10.0.0.5}}]}}\n");
        let [(meta, _), _] = both_datastores(&running);
        assert_eq!(
            meta.unwrap().ips,
            vec!["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn both_datastores_name_the_ports_of_sidecars_only() {
        let yaml = format!(
            "{POD}spec:\n  containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]\n  initContainers:\n  - {{name: side, restartPolicy: Always, ports: [{{name: metrics, containerPort: 9090, protocol: UDP}}]}}\n  - {{name: init, ports: [{{name: setup, containerPort: 1}}]}}\n"
        );
        let [(meta, _), _] = both_datastores(&yaml);
        let ports: Vec<(String, u16, moat_policy::Protocol)> = meta
            .unwrap()
            .ports
            .into_iter()
            .map(|p| (p.name, p.port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            vec![
                ("http".to_string(), 8080, moat_policy::Protocol::TCP),
                ("metrics".to_string(), 9090, moat_policy::Protocol::UDP)
            ]
        );
    }

    #[test]
    fn both_datastores_keep_a_pod_with_a_bad_mode_annotation_and_report_it() {
        let annotated = |mode: &str| {
            POD.replace(
                "labels: {app: web}",
                &format!("labels: {{app: web}}, annotations: {{moat.io/mode: {mode}}}"),
            )
        };
        let [(meta, problems), _] = both_datastores(&annotated("Audit"));
        let meta = meta.expect("the pod is kept: its labels still name it in policies");
        assert_eq!(meta.labels.get("app"), Some("web"));
        assert_eq!(meta.mode, None, "the default mode applies, not a guess");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("shop/web") && problems[0].contains("\"Audit\""),
            "{problems:?}"
        );
        let [(meta, problems), _] = both_datastores(&annotated("learn"));
        assert_eq!(meta.unwrap().mode, Some(moat_policy::Mode::Learn));
        assert!(problems.is_empty());
    }

    #[test]
    fn both_datastores_read_the_quarantine_annotation_only_when_true() {
        let annotated = |value: &str| {
            POD.replace(
                "labels: {app: web}",
                &format!("labels: {{app: web}}, annotations: {{moat.io/quarantine: {value}}}"),
            )
        };
        let [(meta, _), _] = both_datastores(&annotated("\"true\""));
        assert!(meta.unwrap().quarantine);
        let [(meta, _), _] = both_datastores(&annotated("\"false\""));
        assert!(!meta.unwrap().quarantine);
        let [(meta, _), _] = both_datastores(POD);
        assert!(!meta.unwrap().quarantine);
    }

    #[test]
    fn a_pod_that_becomes_host_network_leaves_the_datastore() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "p.yaml", &pod("web", "web"));
        let mut store = LocalStore::new(dir.path());
        store.refresh();
        assert_eq!(store.objects().pods.len(), 1);
        write(
            dir.path(),
            "p.yaml",
            &format!("{}spec: {{hostNetwork: true}}\n", pod("web", "web")),
        );
        assert_eq!(store.refresh(), Some([key("web")].into()));
        assert!(store.objects().pods.is_empty());
        assert!(store.objects().rejected.is_empty());
    }
}
