//! A synthetic cluster for churn benchmarks (`moat-bench churn`): namespaces, pods and
//! NetworkPolicies as local-datastore YAML, plus endpoint specs for the pods that "start on
//! this node" during the run. No network namespace is needed: registrations carry fake host
//! interface names and indexes (moatd only attaches what the CNI attached).
//!
//! Shape: pod `i` lives in namespace `ns-(i % namespaces)` with `app: app-(i / namespaces %
//! APPS)`, so every (namespace, app) identity has several pods. Most pods are remote (they
//! carry `status.podIPs`, so they become ipcache entries); a pool of pods has no address in
//! the datastore and is registered locally during the run, either with labels that an
//! identity already has, or with a unique `instance` label (a new identity each).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use moat_api::EndpointSpec;

/// Distinct `app` labels per namespace.
pub const APPS: usize = 5;

/// Address ranges used by the synthetic objects (map entries only; no traffic is sent).
const REMOTE_NET: [u8; 2] = [10, 42];
const LOCAL_NET: [u8; 2] = [10, 43];
const BLOCK_NET: u8 = 60;

#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// All pods in the datastore (remote and local pools together).
    pub pods: usize,
    pub namespaces: usize,
    pub policies: usize,
    /// Pods registered on this node before measuring (a node's usual population).
    pub local_base: usize,
    /// Local pods whose labels an identity already has, registered and removed by the churn.
    pub existing_pool: usize,
    /// Local pods with a label set of their own (each registration creates an identity).
    pub new_identity_pool: usize,
}

impl Default for Scale {
    fn default() -> Self {
        Self {
            pods: 10_000,
            namespaces: 500,
            policies: 1_000,
            local_base: 100,
            existing_pool: 400,
            new_identity_pool: 200,
        }
    }
}

/// A pod that registers on this node during the run.
#[derive(Clone, Debug)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    /// Its (fake) address as the CNI would report it.
    pub ip: IpAddr,
    /// Index into the local pools: unique fake host interface name and ifindex.
    pub slot: usize,
}

impl LocalPod {
    /// The registration moat-cni would send; `generation` makes container ids unique across
    /// repeated registrations of the same pod.
    pub fn spec(&self, generation: usize) -> EndpointSpec {
        EndpointSpec {
            container_id: format!("churn-{}-{generation}", self.slot),
            ifname: "eth0".into(),
            netns: format!("/run/netns/churn-{}", self.slot),
            host_ifname: format!("mchurn{}", self.slot),
            // Far above any real interface index on the machine.
            host_ifindex: 1_000_000 + self.slot as u32,
            ips: vec![self.ip],
            pod_namespace: self.namespace.clone(),
            pod_name: self.name.clone(),
            pod_uid: None,
        }
    }
}

/// The generated cluster: file name and YAML, plus the local pools.
pub struct Cluster {
    pub files: Vec<(String, String)>,
    pub base: Vec<LocalPod>,
    pub existing: Vec<LocalPod>,
    pub new_identity: Vec<LocalPod>,
    /// Each policy's file, namespace index and index within the namespace (for edits with
    /// [`policy_yaml`]).
    pub policies: Vec<(String, usize, usize)>,
}

fn ns_name(k: usize) -> String {
    format!("ns-{k}")
}

fn addr(net: [u8; 2], n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        net[0],
        net[1],
        (n / 250 % 256) as u8,
        (n % 250 + 1) as u8,
    ))
}

/// The key the local datastore reads pod addresses from. Kubernetes spells it `podIPs`; the
/// local parser has read `podIps` (serde camelCase), so ask it which one it understands.
fn pod_ips_key() -> &'static str {
    static KEY: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let Ok(dir) = tempfile_dir() else {
            return "podIPs";
        };
        let mut probe = String::new();
        pod_yaml_with(
            &mut probe,
            "podIPs",
            "p",
            "x",
            &[("app", "x".into())],
            Some(addr(REMOTE_NET, 0)),
        );
        let ok = write_file(&dir, "probe.yaml", &probe).is_ok()
            && moatd::local::load(&dir)
                .pods
                .values()
                .any(|p| !p.ips.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
        if ok { "podIPs" } else { "podIps" }
    })
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("moat-churn-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn pod_yaml(out: &mut String, ns: &str, name: &str, labels: &[(&str, String)], ip: Option<IpAddr>) {
    pod_yaml_with(out, pod_ips_key(), ns, name, labels, ip)
}

fn pod_yaml_with(
    out: &mut String,
    ips_key: &str,
    ns: &str,
    name: &str,
    labels: &[(&str, String)],
    ip: Option<IpAddr>,
) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n"
    );
    for (k, v) in labels {
        let _ = writeln!(out, "    {k}: {v}");
    }
    out.push_str(
        "spec:\n  containers:\n  - name: main\n    ports:\n    - name: http\n      containerPort: 8080\n",
    );
    if let Some(ip) = ip {
        let _ = write!(out, "status:\n  {ips_key}:\n  - ip: {ip}\n");
    }
}

/// Policy `j` of namespace `k`; `variant` changes its ports (an edit).
pub fn policy_yaml(namespaces: usize, k: usize, j: usize, variant: usize) -> String {
    let ns = ns_name(k);
    let app = (k + j) % APPS;
    let peer_app = (k + j + 1) % APPS;
    let team = (k + j) % 20;
    let port = 8080 + (variant % 7) as u16;
    if j.is_multiple_of(2) {
        // Ingress from a selector in the namespace, and from a team's namespaces.
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: pol-{j}\n  namespace: {ns}\nspec:\n  podSelector:\n    matchLabels:\n      app: app-{app}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: app-{peer_app}\n    ports:\n    - port: http\n    - port: {port}\n  - from:\n    - namespaceSelector:\n        matchLabels:\n          team: t-{team}\n      podSelector:\n        matchLabels:\n          app: app-{app}\n    ports:\n    - port: {port}\n      protocol: TCP\n"
        )
    } else {
        // Egress to a CIDR block and to DNS anywhere in one other namespace.
        let other = ns_name((k + 1) % namespaces);
        let block = (k * 7 + j) % 256;
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: pol-{j}\n  namespace: {ns}\nspec:\n  podSelector:\n    matchLabels:\n      app: app-{app}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: 10.{BLOCK_NET}.{block}.0/24\n        except: [10.{BLOCK_NET}.{block}.128/25]\n    ports:\n    - port: {}\n  - to:\n    - namespaceSelector:\n        matchLabels:\n          kubernetes.io/metadata.name: {other}\n    ports:\n    - port: 53\n      protocol: UDP\n",
            443 + (variant % 5) as u16
        )
    }
}

/// Builds the cluster for `scale`.
pub fn generate(scale: &Scale) -> Cluster {
    let namespaces = scale.namespaces.max(1);
    let mut ns_out = String::new();
    for k in 0..namespaces {
        let _ = write!(
            ns_out,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {n}\n  labels:\n    team: t-{t}\n    kubernetes.io/metadata.name: {n}\n",
            n = ns_name(k),
            t = k % 20
        );
    }
    let local = scale.local_base + scale.existing_pool + scale.new_identity_pool;
    let remote = scale.pods.saturating_sub(local);
    let mut pods_out = String::new();
    let mut base = Vec::new();
    let mut existing = Vec::new();
    let mut new_identity = Vec::new();
    for i in 0..remote + local {
        let ns = ns_name(i % namespaces);
        let app = format!("app-{}", i / namespaces % APPS);
        let name = format!("pod-{i}");
        if i < remote {
            pod_yaml(
                &mut pods_out,
                &ns,
                &name,
                &[("app", app)],
                Some(addr(REMOTE_NET, i)),
            );
            continue;
        }
        let slot = i - remote;
        let pod = LocalPod {
            namespace: ns.clone(),
            name: name.clone(),
            ip: addr(LOCAL_NET, slot),
            slot,
        };
        if slot < scale.local_base + scale.existing_pool {
            pod_yaml(&mut pods_out, &ns, &name, &[("app", app)], None);
            if slot < scale.local_base {
                base.push(pod);
            } else {
                existing.push(pod);
            }
        } else {
            pod_yaml(
                &mut pods_out,
                &ns,
                &name,
                &[("app", app), ("instance", format!("u{slot}"))],
                None,
            );
            new_identity.push(pod);
        }
    }
    let mut files = vec![
        ("00-namespaces.yaml".to_string(), ns_out),
        ("10-pods.yaml".to_string(), pods_out),
    ];
    // One file per policy, so an edit rewrites one small file as a user would.
    let mut policies = Vec::new();
    let per_ns = scale.policies.div_ceil(namespaces).max(1);
    for p in 0..scale.policies {
        let (k, j) = (p % namespaces, p / namespaces % per_ns);
        let file = format!("20-policy-{p}.yaml");
        files.push((file.clone(), policy_yaml(namespaces, k, j, 0)));
        policies.push((file, k, j));
    }
    Cluster {
        files,
        base,
        existing,
        new_identity,
        policies,
    }
}

/// Writes the cluster's files into `dir` (atomically each).
pub fn write(dir: &Path, cluster: &Cluster) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, body) in &cluster.files {
        write_file(dir, name, body)?;
    }
    Ok(())
}

/// Replaces one file in `dir` atomically (a temp file renamed over it).
pub fn write_file(dir: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, body)?;
    std::fs::rename(tmp, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_objects_parse_and_count() {
        let scale = Scale {
            pods: 300,
            namespaces: 10,
            policies: 20,
            local_base: 10,
            existing_pool: 20,
            new_identity_pool: 5,
        };
        let cluster = generate(&scale);
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &cluster).unwrap();
        let objects = moatd::local::load(dir.path());
        assert!(objects.rejected.is_empty(), "{:?}", objects.rejected);
        assert_eq!(objects.namespaces.len(), 10);
        assert_eq!(objects.pods.len(), 300);
        assert_eq!(objects.policies.len(), 20);
        assert_eq!(
            objects.pods.values().filter(|p| !p.ips.is_empty()).count(),
            300 - 35
        );
        assert_eq!(
            (
                cluster.base.len(),
                cluster.existing.len(),
                cluster.new_identity.len()
            ),
            (10, 20, 5)
        );
        // Edits parse too.
        for v in 0..3 {
            moat_policy::NetworkPolicy::all_from_yaml(&policy_yaml(10, 3, 1, v)).unwrap();
            moat_policy::NetworkPolicy::all_from_yaml(&policy_yaml(10, 3, 0, v)).unwrap();
        }
    }
}
