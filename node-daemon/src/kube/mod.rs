//! The `kubernetes` datastore: Pods (all namespaces), Namespaces, NetworkPolicies,
//! MoatPolicies (moat.io/v1alpha1, optional: a cluster without the CRD has none),
//! ClusterNetworkPolicies (policy.networking.k8s.io v1beta1, else v1alpha2; optional too; each
//! one's `Accepted` status condition is written back) and the Nodes, watched from the API server and kept as a snapshot in the same shape as the
//! `local` datastore (`LocalObjects`), so that one policy engine serves both.
//!
//! moatd's core is synchronous: the datastore runs its watchers on a thread of its own (a
//! current-thread tokio runtime) and the core reads `snapshot()` whenever `generation` moves.
//! If the API server goes away the last snapshot stays (enforcement continues) and `status()`
//! says so; watches come back with backoff, and a 410 Gone is answered by a full relist.

pub mod convert;
pub mod events;
mod state;
mod watch;

use std::{
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ipnetwork::IpNetwork;
use tokio::sync::oneshot;

pub use convert::NodeInfo;
pub use state::Kind;

use crate::local::LocalObjects;
use state::ClusterState;

/// How to reach the API server.
#[derive(Clone, Debug)]
pub enum ClusterAccess {
    /// In-cluster service account, else the kubeconfig (`kube::Config::infer`).
    Infer,
    /// A plain URL with no credentials (`http://127.0.0.1:8001` behind `kubectl proxy`, tests).
    Url(String),
    /// A configuration built by the caller.
    Config(Box<kube::Config>),
}

#[derive(Clone, Debug)]
pub struct KubeConfig {
    pub access: ClusterAccess,
    /// This node's name (the Node object whose pod CIDRs and addresses are read).
    pub node_name: String,
    /// At most one snapshot per this period while changes keep coming.
    pub coalesce: Duration,
    /// Watch restarts wait this long after a failure, doubling up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl KubeConfig {
    pub fn infer(node_name: impl Into<String>) -> Self {
        Self::with_access(ClusterAccess::Infer, node_name)
    }

    pub fn url(url: impl Into<String>, node_name: impl Into<String>) -> Self {
        Self::with_access(ClusterAccess::Url(url.into()), node_name)
    }

    pub fn with_access(access: ClusterAccess, node_name: impl Into<String>) -> Self {
        Self {
            access,
            node_name: node_name.into(),
            coalesce: Duration::from_millis(50),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// One watched kind, for `moatctl status` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindStatus {
    pub kind: &'static str,
    /// Its first full list has been applied.
    pub synced: bool,
    /// No failure since the last successful request.
    pub healthy: bool,
    pub last_error: Option<String>,
    /// Full lists completed (1 after the first sync; more after a 410 Gone relist).
    pub lists: u64,
    pub errors: u64,
    pub objects: usize,
    /// The API server does not serve the kind (the MoatPolicy or ClusterNetworkPolicy CRD is
    /// not installed).
    pub not_served: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeStatus {
    /// The first full sync of every kind is in the snapshot (stays true afterwards).
    pub ready: bool,
    /// Every watch is currently working. False while the API server is unreachable: the
    /// snapshot is then the last one seen.
    pub connected: bool,
    pub generation: u64,
    pub kinds: Vec<KindStatus>,
}

struct Published {
    generation: u64,
    objects: Arc<LocalObjects>,
    node: Option<NodeInfo>,
    status: KubeStatus,
}

/// What the watch thread publishes and the synchronous side reads.
pub(crate) struct Shared {
    published: Mutex<Published>,
    changed: Condvar,
}

impl Shared {
    fn new() -> Self {
        Self {
            published: Mutex::new(Published {
                generation: 0,
                objects: Arc::new(LocalObjects::default()),
                node: None,
                status: KubeStatus::default(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Published> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_ready(&self) -> bool {
        self.lock().status.ready
    }

    /// Publishes the status, and the content too when `content` (a new generation).
    fn publish(&self, state: &ClusterState, content: bool) {
        let objects = content.then(|| Arc::new(state.objects()));
        let mut p = self.lock();
        if let Some(objects) = objects {
            p.generation += 1;
            p.objects = objects;
            p.node = state.node().cloned();
            p.status.ready |= state.synced();
        }
        p.status.connected = state.healthy();
        p.status.generation = p.generation;
        p.status.kinds = Kind::ALL
            .iter()
            .map(|&kind| {
                let h = state.health(kind);
                KindStatus {
                    kind: kind.name(),
                    synced: h.synced,
                    healthy: h.healthy,
                    last_error: h.last_error.clone(),
                    lists: h.lists,
                    errors: h.errors,
                    objects: state.object_count(kind),
                    not_served: h.not_served,
                }
            })
            .collect();
        drop(p);
        self.changed.notify_all();
    }
}

/// The reason moatd gives on the Node's `NetworkUnavailable` condition when it clears it.
pub const NETWORK_AVAILABLE_REASON: &str = "MoatRoutesCreated";

/// The strategic-merge patch of a Node's status that sets `NetworkUnavailable` to False (the
/// shape flannel and Calico send: the API server merges `conditions` on `type`, so the
/// node's other conditions stay).
pub fn network_available_patch(now: k8s_openapi::jiff::Timestamp) -> serde_json::Value {
    use k8s_openapi::{api::core::v1::NodeCondition, apimachinery::pkg::apis::meta::v1::Time};
    let condition = NodeCondition {
        type_: "NetworkUnavailable".into(),
        status: "False".into(),
        reason: Some(NETWORK_AVAILABLE_REASON.into()),
        message: Some("Moat routes this node's pod CIDRs".into()),
        last_transition_time: Some(Time(now)),
        last_heartbeat_time: Some(Time(now)),
    };
    serde_json::json!({"status": {"conditions": [condition]}})
}

/// The running datastore. Dropping it stops the watches and joins the thread.
pub struct KubeDatastore {
    shared: Arc<Shared>,
    writer: watch::Writer,
    node_name: String,
    backoff: (Duration, Duration),
    /// The Node's `NetworkUnavailable` condition has been cleared (by this datastore).
    network_available: Arc<AtomicBool>,
    /// A clearing is under way (asked for once; retried in the background).
    network_available_asked: AtomicBool,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeDatastore {
    /// Builds the client and starts the watches. Fails only when the client configuration
    /// cannot be built; an unreachable API server is retried in the background (see `ready`).
    pub fn start(config: KubeConfig) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::new());
        let node_name = config.node_name.clone();
        let backoff = (config.backoff_initial, config.backoff_max);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("moat-kube".into())
            .spawn(move || watch::run(config, thread_shared, started_tx, shutdown_rx))?;
        let started = started_rx
            .recv()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("kubernetes datastore thread died")));
        let writer = match started {
            Ok(writer) => writer,
            Err(e) => {
                let _ = thread.join();
                return Err(e);
            }
        };
        Ok(Self {
            shared,
            writer,
            node_name,
            backoff,
            network_available: Arc::new(AtomicBool::new(false)),
            network_available_asked: AtomicBool::new(false),
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// The generation and the objects; the generation moves on every published change.
    pub fn snapshot(&self) -> (u64, LocalObjects) {
        let (generation, objects) = self.snapshot_shared();
        (generation, (*objects).clone())
    }

    /// Like `snapshot`, without copying the objects.
    pub fn snapshot_shared(&self) -> (u64, Arc<LocalObjects>) {
        let p = self.shared.lock();
        (p.generation, p.objects.clone())
    }

    pub fn generation(&self) -> u64 {
        self.shared.lock().generation
    }

    /// The first full list of every kind is in the snapshot. moatd serves no registration
    /// before this.
    pub fn ready(&self) -> bool {
        self.shared.lock().status.ready
    }

    /// Waits up to `timeout` for `ready`.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |p| p.status.ready)
    }

    /// Waits up to `timeout` for a generation other than `seen`; returns the current one.
    pub fn wait_for_change(&self, seen: u64, timeout: Duration) -> u64 {
        self.wait_until(timeout, |p| p.generation != seen);
        self.generation()
    }

    fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&Published) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.shared.lock();
        loop {
            if done(&p) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            p = self
                .shared
                .changed
                .wait_timeout(p, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// This node's pod CIDRs (spec.podCIDRs); empty until the Node is seen or allocated.
    pub fn node_pod_cidrs(&self) -> Vec<IpNetwork> {
        self.node().map(|n| n.pod_cidrs).unwrap_or_default()
    }

    /// This node's Node object as far as Moat uses it; `None` until it is seen.
    pub fn node(&self) -> Option<NodeInfo> {
        self.shared.lock().node.clone()
    }

    pub fn status(&self) -> KubeStatus {
        self.shared.lock().status.clone()
    }

    /// Clears this node's `NetworkUnavailable` condition (PATCH nodes/<name>/status), as CNIs
    /// that route pods themselves do once their routes are in place: cloud node controllers
    /// set it True on new nodes and some schedulers keep pods off until it is False. Returns
    /// at once; the patch runs on the datastore's runtime and is retried with backoff until
    /// it succeeds (or the datastore stops). Only the first call does anything.
    pub fn mark_network_available(&self) {
        if self.network_available_asked.swap(true, Ordering::SeqCst) {
            return;
        }
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
            kube::Api::all(self.writer.client.clone());
        let name = self.node_name.clone();
        let done = self.network_available.clone();
        let (initial, max) = self.backoff;
        self.writer.runtime.spawn(async move {
            let mut delay = initial;
            loop {
                let patch = network_available_patch(k8s_openapi::jiff::Timestamp::now());
                let params = kube::api::PatchParams::default();
                match nodes
                    .patch_status(&name, &params, &kube::api::Patch::Strategic(patch))
                    .await
                {
                    Ok(_) => {
                        done.store(true, Ordering::SeqCst);
                        tracing::info!(node = %name, "NetworkUnavailable condition cleared");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, "clearing NetworkUnavailable; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(max.max(initial));
                    }
                }
            }
        });
    }

    /// `mark_network_available` has succeeded.
    pub fn network_available(&self) -> bool {
        self.network_available.load(Ordering::SeqCst)
    }

    /// Posts threat detection Events (kube/events.rs) from any thread.
    pub fn event_poster(&self) -> events::EventPoster {
        events::EventPoster {
            writer: self.writer.clone(),
            node: self.node_name.clone(),
            bound: Default::default(),
        }
    }

    /// One-off reads beside the watches, for callers that must not hold up the daemon.
    pub fn reader(&self) -> ApiReader {
        ApiReader {
            writer: self.writer.clone(),
        }
    }
}

/// Reads single objects from the API server on the datastore's runtime, outside the watches
/// (chained mode reads the primary CNI's DaemonSet). Cheap to clone; use it from any thread
/// but the datastore's own.
#[derive(Clone)]
pub struct ApiReader {
    writer: watch::Writer,
}

impl ApiReader {
    /// The DaemonSet `namespace/name`; `Ok(None)` when the API server says it does not
    /// exist. Waits at most `timeout` for the answer.
    pub fn daemonset(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<k8s_openapi::api::apps::v1::DaemonSet>, String> {
        let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
            kube::Api::namespaced(self.writer.client.clone(), namespace);
        let (tx, rx) = std::sync::mpsc::channel();
        let owned = name.to_string();
        self.writer.runtime.spawn(async move {
            let _ = tx.send(api.get_opt(&owned).await);
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(e)) => Err(format!("reading DaemonSet {namespace}/{name}: {e}")),
            Err(_) => Err(format!(
                "reading DaemonSet {namespace}/{name}: no answer within {}s",
                timeout.as_secs()
            )),
        }
    }
}

impl Drop for KubeDatastore {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_available_patch_is_the_condition_other_cnis_send() {
        let now: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        assert_eq!(
            network_available_patch(now),
            serde_json::json!({"status": {"conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "MoatRoutesCreated",
                "message": "Moat routes this node's pod CIDRs",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
                "lastHeartbeatTime": "2026-01-02T03:04:05Z"
            }]}})
        );
    }
}
