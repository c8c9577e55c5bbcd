//! The thin async shell: one kube watcher per kind on a current-thread runtime of its own,
//! every event converted at once (only what Moat needs is kept) and fed to one loop that owns
//! the `ClusterState` and publishes snapshots, at most one per coalescing period.

use std::{
    fmt::Debug,
    future::Future,
    hash::{BuildHasher, Hasher},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource,
    api::{DynamicObject, Patch, PatchParams},
    runtime::watcher::{self, Event},
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{
    ClusterAccess, KubeConfig, Shared,
    convert::{self, ObjectKey, StatusPatch},
    state::{ClusterState, Item, Kind, Update},
};

/// Runs on the datastore's own thread until `shutdown` fires (or its sender is dropped).
pub(super) fn run(
    config: KubeConfig,
    shared: Arc<Shared>,
    started: std::sync::mpsc::Sender<anyhow::Result<Writer>>,
    shutdown: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(anyhow::anyhow!("tokio runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = match make_client(&config.access, tx.clone()).await {
            Ok(client) => client,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        // Writes (the Node's status) run on this runtime, with the watches' client.
        let _ = started.send(Ok(Writer {
            client: client.clone(),
            runtime: tokio::runtime::Handle::current(),
        }));
        let backoff = Backoff {
            initial: config.backoff_initial,
            max: config.backoff_max.max(config.backoff_initial),
        };
        tokio::spawn(watch_kind(
            vec![Api::<Pod>::all(client.clone())],
            watcher::Config::default(),
            Kind::Pods,
            |p, _| (Item::Pod(convert::pod_item(p)), None),
            convert::pod_key,
            tx.clone(),
            backoff,
        ));
        tokio::spawn(watch_kind(
            vec![Api::<Namespace>::all(client.clone())],
            watcher::Config::default(),
            Kind::Namespaces,
            |n, _| {
                let item = Item::Namespace {
                    name: convert::namespace_key(n).1,
                    labels: convert::namespace_labels(n),
                };
                (item, None)
            },
            convert::namespace_key,
            tx.clone(),
            backoff,
        ));
        tokio::spawn(watch_kind(
            vec![Api::<NetworkPolicy>::all(client.clone())],
            watcher::Config::default(),
            Kind::NetworkPolicies,
            |p, _| {
                let item = Item::Policy {
                    key: convert::policy_key(p),
                    policy: convert::network_policy(p),
                };
                (item, None)
            },
            convert::policy_key,
            tx.clone(),
            backoff,
        ));
        tokio::spawn(watch_kind(
            vec![Api::<moat_crds::MoatPolicy>::all(client.clone())],
            watcher::Config::default(),
            Kind::MoatPolicies,
            |p, _| {
                let item = Item::MoatPolicy {
                    key: convert::moat_policy_key(p),
                    policy: convert::moat_policy(p),
                };
                (item, None)
            },
            convert::moat_policy_key,
            tx.clone(),
            backoff,
        ));
        // ClusterNetworkPolicies, at the first version served: v1beta1, else v1alpha2 (see
        // `watch_kind`); neither served means no CRD, and no cluster policies.
        let cnp_apis = convert::CLUSTER_POLICY_VERSIONS
            .iter()
            .map(|v| {
                Api::<DynamicObject>::all_with(client.clone(), &convert::cluster_policy_resource(v))
            })
            .collect();
        tokio::spawn(watch_kind(
            cnp_apis,
            watcher::Config::default(),
            Kind::ClusterPolicies,
            cluster_policy_item,
            convert::cluster_policy_key,
            tx.clone(),
            backoff,
        ));
        tokio::spawn(watch_kind(
            vec![Api::<Node>::all(client.clone())],
            // Every node: the others' pod CIDRs and addresses are routed to (--routing direct).
            watcher::Config::default(),
            Kind::Nodes,
            |n, _| {
                let item = Item::Node {
                    name: convert::node_key(n).1,
                    info: convert::node_info(n),
                };
                (item, None)
            },
            convert::node_key,
            tx,
            backoff,
        ));
        let status = StatusWriter::new(client, backoff);
        publish_loop(rx, shared, &config, status, shutdown).await;
    });
    // Dropping the runtime cancels the watchers.
}

/// What the synchronous side needs to write to the API server: the client, and the runtime
/// that drives it (the datastore thread's; a task spawned on it runs while the watches do).
#[derive(Clone)]
pub(super) struct Writer {
    pub client: Client,
    pub runtime: tokio::runtime::Handle,
}

async fn make_client(
    access: &ClusterAccess,
    tx: mpsc::UnboundedSender<Update>,
) -> anyhow::Result<Client> {
    let config = match access {
        ClusterAccess::Infer => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!("kubernetes client config (in-cluster or kubeconfig): {e}")
        })?,
        ClusterAccess::Url(url) => {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| anyhow::anyhow!("API server URL {url:?}: {e}"))?;
            kube::Config::new(uri)
        }
        ClusterAccess::Config(config) => (**config).clone(),
    };
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| anyhow::anyhow!("kubernetes client: {e}"))?;
    Ok(builder.with_layer(&Reachability { tx }).build())
}

#[derive(Clone, Copy)]
struct Backoff {
    initial: Duration,
    max: Duration,
}

/// Up to ±25%, so that every node does not retry in the same instant after an API server
/// restart.
fn jitter(delay: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let factor = 0.75 + (random % 1000) as f64 / 2000.0;
    delay.mul_f64(factor)
}

/// A watch that cannot start because its resourceVersion is gone (HTTP 410 on the watch
/// request itself, rather than the usual ERROR event): the kube watcher would retry the same
/// version forever, so it is replaced by a fresh one, which relists.
fn gone_at_watch_start(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}

/// The list itself is answered 404: the API server does not serve the resource (for a
/// MoatPolicy, its CRD is not installed).
fn not_served(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
            | watcher::Error::WatchStartFailed(kube::Error::Api(status))
            if status.code == 404
    )
}

/// What one object becomes: the item the state keeps, and for a ClusterNetworkPolicy the
/// status write it needs, if any (sent ahead of the item). The index says which of the
/// watch's `apis` the object came from.
type ToItem<K> = fn(&K, usize) -> (Item, Option<StatusPatch>);

fn cluster_policy_item(object: &DynamicObject, api: usize) -> (Item, Option<StatusPatch>) {
    let version = convert::CLUSTER_POLICY_VERSIONS[api];
    let policy = convert::cluster_policy(object, version);
    let status = convert::cluster_policy_status(
        object,
        version,
        &policy,
        k8s_openapi::jiff::Timestamp::now(),
    );
    let item = Item::ClusterPolicy {
        name: convert::cluster_policy_key(object).1,
        policy,
    };
    (item, status)
}

/// Watches one kind through the first of `apis` the API server serves (one API for most
/// kinds; the versions of a ClusterNetworkPolicy, preferred first). A list answered 404 moves
/// on to the next version at once; when none is served, an optional kind counts as listed and
/// empty (said once in the log, not as an error), and the preferred version is tried again
/// after the backoff, in case the CRD is installed. A version that stops being served (its
/// CRD deleted or changed) sends the watch back through the same order.
async fn watch_kind<K>(
    apis: Vec<Api<K>>,
    config: watcher::Config,
    kind: Kind,
    to_item: ToItem<K>,
    key_of: fn(&K) -> ObjectKey,
    tx: mpsc::UnboundedSender<Update>,
    backoff: Backoff,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut delay = backoff.initial;
    let mut last_error: Option<Instant> = None;
    // After this long without errors the backoff starts over from the initial delay.
    let settled = backoff.max * 2;
    let mut candidate = 0;
    // "Not served" is logged once, and again only after the kind has been served meanwhile.
    let mut said_not_served = false;
    loop {
        let api = apis[candidate].clone();
        let mut stream = watcher::watcher(api.clone(), config.clone()).boxed();
        while let Some(next) = stream.next().await {
            let mut status = None;
            let update = match next {
                Ok(Event::Init) => Update::Init(kind),
                Ok(Event::InitApply(object)) => {
                    let (item, s) = to_item(&object, candidate);
                    status = s;
                    Update::InitApply(item)
                }
                Ok(Event::InitDone) => {
                    if said_not_served || candidate > 0 {
                        info!(kind = kind.name(), path = %api.resource_url(), "served; watching it");
                    }
                    said_not_served = false;
                    Update::InitDone(kind)
                }
                Ok(Event::Apply(object)) => {
                    let (item, s) = to_item(&object, candidate);
                    status = s;
                    Update::Apply(item)
                }
                Ok(Event::Delete(object)) => Update::Delete(kind, key_of(&object)),
                Err(error) => {
                    let restart = gone_at_watch_start(&error);
                    debug!(kind = kind.name(), %error, "watch error");
                    // An optional kind that is not served is no failure: it has no objects,
                    // and the list is retried (with backoff) in case its CRD is installed.
                    let unserved = kind.optional() && not_served(&error);
                    if unserved && candidate + 1 < apis.len() {
                        // The next version, at once.
                        candidate += 1;
                        break;
                    }
                    let update = if unserved {
                        candidate = 0;
                        if !said_not_served {
                            info!(
                                kind = kind.name(),
                                "not served by the API server (CRD not installed); running without them"
                            );
                            said_not_served = true;
                        }
                        Update::NotServed(kind)
                    } else {
                        Update::Error(kind, error.to_string())
                    };
                    if tx.send(update).is_err() {
                        return;
                    }
                    if last_error.is_some_and(|t| t.elapsed() > settled) {
                        delay = backoff.initial;
                    }
                    last_error = Some(Instant::now());
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(backoff.max);
                    if restart || unserved {
                        break;
                    }
                    continue;
                }
            };
            if let Some(status) = status
                && tx.send(Update::Status(status)).is_err()
            {
                return;
            }
            if tx.send(update).is_err() {
                return;
            }
        }
    }
}

async fn publish_loop(
    mut rx: mpsc::UnboundedReceiver<Update>,
    shared: Arc<Shared>,
    config: &KubeConfig,
    mut status: StatusWriter,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut state = ClusterState::new(config.node_name.clone());
    let mut last_publish: Option<Instant> = None;
    let mut pending = false;
    let mut was_healthy = true;
    loop {
        let deadline = last_publish.map_or_else(Instant::now, |t| t + config.coalesce);
        tokio::select! {
            _ = &mut shutdown => break,
            update = rx.recv() => {
                let Some(update) = update else { break };
                status.take(&update);
                state.apply(update);
                // Take whatever else is queued now: one publish for the lot.
                while let Ok(update) = rx.try_recv() {
                    status.take(&update);
                    state.apply(update);
                }
                pending |= state.take_dirty();
                let first_sync = state.synced() && !shared.is_ready();
                if first_sync {
                    // The first full sync is visible at once, together with `ready`.
                    shared.publish(&state, true);
                    last_publish = Some(Instant::now());
                    pending = false;
                    info!("kubernetes datastore synced");
                } else if state.take_health_changed() {
                    shared.publish(&state, false);
                }
                let healthy = state.healthy();
                if healthy != was_healthy && state.synced() {
                    if healthy {
                        info!("kubernetes API server reachable again");
                    } else {
                        warn!("kubernetes API server unreachable; keeping the last snapshot");
                    }
                }
                was_healthy = healthy;
            }
            _ = tokio::time::sleep_until(deadline.into()), if pending => {
                // Before the first full sync nothing is published: a partial view must not
                // look like a cluster.
                if state.synced() {
                    shared.publish(&state, true);
                    last_publish = Some(Instant::now());
                    pending = false;
                } else {
                    pending = false;
                }
            }
        }
    }
}

/// Writes the Accepted condition of ClusterNetworkPolicies (PATCH .../<name>/status, a JSON
/// merge patch). Every node writes, with the same content: moatd has no leader election, and
/// a condition that already says what a node would write is not written again (see
/// `convert::cluster_policy_status`), so after the first node's patch the others see it in
/// the watch and stay quiet. Two nodes racing can both write once; they differ at most in
/// `lastTransitionTime`. The same patch for the same resourceVersion is sent once.
struct StatusWriter {
    client: Client,
    backoff: Backoff,
    /// name -> (what was last sent, for which resourceVersion).
    sent: std::collections::HashMap<String, (StatusPatch, String)>,
}

impl StatusWriter {
    fn new(client: Client, backoff: Backoff) -> Self {
        Self {
            client,
            backoff,
            sent: Default::default(),
        }
    }

    fn take(&mut self, update: &Update) {
        match update {
            Update::Status(patch) => self.write(patch.clone()),
            Update::Delete(Kind::ClusterPolicies, key) => {
                self.sent.remove(&key.1);
            }
            _ => {}
        }
    }

    fn write(&mut self, patch: StatusPatch) {
        if let Some((sent, rv)) = self.sent.get(&patch.name)
            && sent.wanted == patch.wanted
            && *rv == patch.resource_version
        {
            return;
        }
        self.sent.insert(
            patch.name.clone(),
            (patch.clone(), patch.resource_version.clone()),
        );
        let api: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &convert::cluster_policy_resource(&patch.version),
        );
        let backoff = self.backoff;
        tokio::spawn(async move {
            let mut delay = backoff.initial;
            for attempt in 1..=5 {
                let result = api
                    .patch_status(
                        &patch.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch.body),
                    )
                    .await;
                match result {
                    Ok(_) => {
                        debug!(name = %patch.name, status = %patch.wanted.0, "ClusterNetworkPolicy status written");
                        return;
                    }
                    // Deleted meanwhile, or not ours to write (RBAC): no retry.
                    Err(kube::Error::Api(s)) if matches!(s.code, 403 | 404) => {
                        warn!(name = %patch.name, error = %s.message, "ClusterNetworkPolicy status not written");
                        return;
                    }
                    Err(e) => {
                        debug!(name = %patch.name, attempt, error = %e, "ClusterNetworkPolicy status write failed; retrying");
                        tokio::time::sleep(jitter(delay)).await;
                        delay = (delay * 2).min(backoff.max);
                    }
                }
            }
            warn!(name = %patch.name, "ClusterNetworkPolicy status not written after 5 attempts");
        });
    }
}

/// Tells the state that a request for a kind succeeded, so that "connected" comes back as
/// soon as the API server answers again, even if the resumed watch has nothing to say yet.
#[derive(Clone)]
struct Reachability {
    tx: mpsc::UnboundedSender<Update>,
}

impl<S> tower::Layer<S> for Reachability {
    type Service = ReachabilityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReachabilityService {
            inner,
            tx: self.tx.clone(),
        }
    }
}

struct ReachabilityService<S> {
    inner: S,
    tx: mpsc::UnboundedSender<Update>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for ReachabilityService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let kind = Kind::from_path(request.uri().path());
        let tx = self.tx.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            if let (Some(kind), Ok(r)) = (kind, &response)
                && r.status().is_success()
            {
                let _ = tx.send(Update::Reachable(kind));
            }
            response
        })
    }
}
