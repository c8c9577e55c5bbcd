//! `--kube`: the conformance cases against a real cluster with Moat installed (kind-tests/).
//!
//! Creates namespaces x, y, z and pods a, b, c in each (agnhost serving every port and protocol
//! the cases use, one container each), one ClusterIP Service per pod, then for every case:
//! removes the previous case's NetworkPolicies, sets the namespace and pod labels the case
//! wants (model labels plus its labelChanges), creates its policies (IP placeholders replaced
//! by pod addresses), waits `--kube-settle-ms`, and probes each (from, to, port, protocol)
//! with `kubectl exec ... /agnhost connect` to the target's Service ClusterIP (or pod IP with
//! `--direct`). A probe that disagrees is retried once, as in the other modes. Results are
//! reported exactly like the other modes. The namespaces are deleted at the end (unless
//! `--kube-keep`). Objects go through the API with kube-rs; only probes use kubectl.

mod cluster;
mod objects;
mod probe;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub use cluster::Cluster;
pub use probe::{KubectlExec, ProbeFrom, Prober};

use crate::{
    cases::{Case, CaseFile, Proto},
    report::{CaseResult, ProbeResult},
};

/// Command-line options of the kube mode.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeArgs {
    /// Server image (agnhost: serve-hostname, porter, connect).
    #[arg(long, default_value = "registry.k8s.io/e2e-test-images/agnhost:2.53")]
    pub kube_image: String,
    /// kubectl binary used for the probes (`kubectl exec`); KUBECONFIG selects the cluster,
    /// for the API calls too.
    #[arg(long, default_value = "kubectl")]
    pub kubectl: PathBuf,
    /// Wait after a case's objects are applied, before probing (policy propagation).
    #[arg(long, default_value_t = 3000)]
    pub kube_settle_ms: u64,
    /// How long the pods may take to be Ready.
    #[arg(long, default_value_t = 300)]
    pub kube_ready_secs: u64,
    /// Also serve and probe SCTP (needs the sctp kernel module on the nodes).
    #[arg(long)]
    pub kube_sctp: bool,
    /// Keep the namespaces x, y, z at the end.
    #[arg(long)]
    pub kube_keep: bool,
    /// Talk to the API server at this plain URL without credentials (e.g. behind
    /// `kubectl proxy`) instead of KUBECONFIG's.
    #[arg(long)]
    pub kube_api_url: Option<String>,
}

#[derive(Clone, Debug)]
pub struct KubeOptions {
    pub direct: bool,
    pub parallel: usize,
    pub timeout: Duration,
    pub keep_all: bool,
    pub image: String,
    pub settle: Duration,
    pub ready_timeout: Duration,
    pub sctp: bool,
    pub poll: Duration,
}

impl KubeOptions {
    pub fn new(
        args: &KubeArgs,
        direct: bool,
        parallel: usize,
        timeout: Duration,
        keep_all: bool,
    ) -> Self {
        Self {
            direct,
            parallel: parallel.max(1),
            // kubectl exec adds its own latency; below a second agnhost gives up too early.
            timeout: timeout.max(Duration::from_secs(1)),
            keep_all,
            image: args.kube_image.clone(),
            settle: Duration::from_millis(args.kube_settle_ms),
            ready_timeout: Duration::from_secs(args.kube_ready_secs),
            sctp: args.kube_sctp,
            poll: Duration::from_millis(500),
        }
    }
}

/// Where a model pod ended up.
#[derive(Clone, Debug)]
struct PodState {
    ip: IpAddr,
    service_ip: IpAddr,
    client: ProbeFrom,
}

pub struct KubeRunner<P: Prober> {
    cluster: Cluster,
    prober: P,
    opts: KubeOptions,
    served: Vec<(u16, Proto)>,
    pods: BTreeMap<String, PodState>,
    /// Labels as last applied, per namespace and per pod key.
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// NetworkPolicies of the current case: (namespace, name).
    policies: Vec<(String, String)>,
    pub setup: BTreeMap<String, String>,
}

impl<P: Prober> KubeRunner<P> {
    /// Creates the namespaces, pods and Services and waits until every pod is Ready.
    pub fn setup(cluster: Cluster, prober: P, file: &CaseFile, opts: KubeOptions) -> Result<Self> {
        let model = &file.model;
        let served: Vec<(u16, Proto)> = file
            .served_union()
            .into_iter()
            .filter(|(_, proto)| opts.sctp || *proto != Proto::Sctp)
            .collect();
        if served.is_empty() {
            bail!("no port to serve");
        }
        for ns in model.namespaces.keys() {
            if cluster.namespace_exists(ns)? {
                bail!(
                    "namespace {ns} already exists (left by an earlier run?); delete it first: kubectl delete namespace {}",
                    model
                        .namespaces
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        let mut namespace_labels = BTreeMap::new();
        for (ns, m) in &model.namespaces {
            cluster.create(&objects::namespace(ns, &m.labels))?;
            namespace_labels.insert(ns.clone(), m.labels.clone());
        }
        let mut pod_labels = BTreeMap::new();
        for key in &model.pod_order {
            cluster.create(&objects::pod(model, key, &served, &opts.image))?;
            cluster.create(&objects::service(model, key, &served))?;
            pod_labels.insert(key.clone(), model.pods[key].labels.clone());
        }
        let deadline = Instant::now() + opts.ready_timeout;
        let (first_port, first_proto) = served[0];
        let mut pods = BTreeMap::new();
        for key in &model.pod_order {
            let m = &model.pods[key];
            let ip = cluster
                .wait_pod_ready(&m.namespace, &m.name, deadline, opts.poll)
                .with_context(|| format!("pod {key}"))?;
            let service_ip = cluster
                .service_ip(&m.namespace, &objects::service_name(key))
                .with_context(|| format!("Service of {key}"))?;
            pods.insert(
                key.clone(),
                PodState {
                    ip,
                    service_ip,
                    client: ProbeFrom {
                        namespace: m.namespace.clone(),
                        pod: m.name.clone(),
                        container: objects::container_name(first_port, first_proto),
                    },
                },
            );
        }
        let mut setup = BTreeMap::new();
        setup.insert("pods".into(), pods.len().to_string());
        setup.insert(
            "served".into(),
            served
                .iter()
                .map(|(p, proto)| format!("{p}/{proto}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        setup.insert("image".into(), opts.image.clone());
        Ok(Self {
            cluster,
            prober,
            opts,
            served,
            pods,
            namespace_labels,
            pod_labels,
            policies: Vec::new(),
            setup,
        })
    }

    fn apply_case(&mut self, file: &CaseFile, case: &Case) -> Result<()> {
        let model = &file.model;
        for (ns, name) in std::mem::take(&mut self.policies) {
            self.cluster.delete_network_policy(&ns, &name)?;
        }
        for ns in model.namespaces.keys() {
            let desired = case.namespace_labels(model, ns);
            let current = &self.namespace_labels[ns];
            let keep = [objects::MANAGED_LABEL, "kubernetes.io/metadata.name"];
            if let Some(patch) = objects::label_patch(current, &desired, &keep) {
                self.cluster.patch_namespace(ns, &patch)?;
            }
            self.namespace_labels.insert(ns.clone(), desired);
        }
        for key in &model.pod_order {
            let desired = case.pod_labels(model, key);
            let current = &self.pod_labels[key];
            if let Some(patch) = objects::label_patch(current, &desired, &[objects::POD_KEY_LABEL])
            {
                let m = &model.pods[key];
                self.cluster.patch_pod(&m.namespace, &m.name, &patch)?;
            }
            self.pod_labels.insert(key.clone(), desired);
        }
        let policies = case.resolved_policies(model, &|key| self.pods[key].ip.to_string())?;
        for policy in policies {
            let ns = policy["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = policy["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            self.cluster
                .create_network_policy(&ns, &policy)
                .with_context(|| format!("NetworkPolicy {ns}/{name}"))?;
            self.policies.push((ns, name));
        }
        std::thread::sleep(self.opts.settle);
        Ok(())
    }

    pub fn run_case(&mut self, file: &CaseFile, case: &Case) -> CaseResult {
        let start = Instant::now();
        if let Err(e) = self.apply_case(file, case) {
            return CaseResult::not_run(
                case,
                format!("{e:#}"),
                start.elapsed(),
                self.opts.keep_all,
            );
        }
        let results = self.run_probes(case);
        CaseResult::new(
            &case.id,
            &case.name,
            results,
            None,
            start.elapsed(),
            self.opts.keep_all,
        )
    }

    fn target(&self, key: &str) -> IpAddr {
        let pod = &self.pods[key];
        if self.opts.direct {
            pod.ip
        } else {
            pod.service_ip
        }
    }

    fn run_probes(&self, case: &Case) -> Vec<ProbeResult> {
        let n = case.probes.len();
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<ProbeResult>>> = Mutex::new(vec![None; n]);
        let timeout = self.opts.timeout;
        let retry_timeout = timeout * 3;
        std::thread::scope(|s| {
            for _ in 0..self.opts.parallel.clamp(1, n.max(1)) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let probe = &case.probes[i];
                        let r = ProbeResult::new(probe);
                        let served = self.served.contains(&(probe.port, probe.protocol));
                        let out = if probe.protocol == Proto::Sctp && !self.opts.sctp {
                            r.skipped("SCTP not probed in kube mode (pass --kube-sctp)")
                        } else if !served {
                            r.failed("port not served by the pods")
                        } else {
                            let from = &self.pods[&probe.from].client;
                            let target = self.target(&probe.to);
                            let attempt = |t| {
                                self.prober
                                    .connect(from, target, probe.port, probe.protocol, t)
                            };
                            match attempt(timeout) {
                                Err(e) => r.failed(&e),
                                Ok(first) if first == probe.expect || probe.loopback => {
                                    r.judge(first, 1)
                                }
                                Ok(_) => {
                                    // Once more, as upstream's probe does.
                                    let t = if probe.expect { retry_timeout } else { timeout };
                                    match attempt(t) {
                                        Ok(second) => r.judge(second, 2),
                                        Err(e) => r.failed(&e),
                                    }
                                }
                            }
                        };
                        results.lock().unwrap()[i] = Some(out);
                    }
                });
            }
        });
        results
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|r| r.expect("every probe ran"))
            .collect()
    }

    /// Deletes the case's policies and the namespaces (with everything in them).
    pub fn teardown(self, keep_namespaces: bool, file: &CaseFile) -> Result<()> {
        for (ns, name) in &self.policies {
            self.cluster.delete_network_policy(ns, name)?;
        }
        if !keep_namespaces {
            for ns in file.model.namespaces.keys() {
                self.cluster.delete_namespace(ns)?;
            }
        }
        Ok(())
    }
}

/// The whole kube-mode run: setup, every selected case (printing a line each), teardown.
pub fn run(
    file: &CaseFile,
    selected: &[&Case],
    args: &KubeArgs,
    opts: KubeOptions,
) -> Result<(Vec<CaseResult>, BTreeMap<String, String>)> {
    let t = Instant::now();
    let cluster = match &args.kube_api_url {
        Some(url) => Cluster::url(url)?,
        None => Cluster::infer()?,
    };
    let prober = KubectlExec {
        kubectl: args.kubectl.clone(),
    };
    let mut runner = KubeRunner::setup(cluster, prober, file, opts)
        .context("setting up namespaces, pods and Services")?;
    println!(
        "setup: {:.1}s ({} pods, Services)",
        t.elapsed().as_secs_f64(),
        runner.pods.len()
    );
    let mut results = Vec::new();
    for case in selected {
        let r = runner.run_case(file, case);
        println!("{}", r.line());
        results.push(r);
    }
    let setup = runner.setup.clone();
    runner.teardown(args.kube_keep, file)?;
    Ok((results, setup))
}
