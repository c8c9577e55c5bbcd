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
    runtime::watcher::{self, Event},
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{
    ClusterAccess, KubeConfig, Shared,
    convert::{self, ObjectKey},
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
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            Kind::Pods,
            |p| Item::Pod(convert::pod_item(p)),
            convert::pod_key,
            tx.clone(),
            backoff,
        ));
        tokio::spawn(watch_kind(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            Kind::Namespaces,
            |n| Item::Namespace {
                name: convert::namespace_key(n).1,
                labels: convert::namespace_labels(n),
            },
            convert::namespace_key,
            tx.clone(),
            backoff,
        ));
        tokio::spawn(watch_kind(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            Kind::NetworkPolicies,
            |p| Item::Policy {
                key: convert::policy_key(p),
                policy: convert::network_policy(p),
            },
            convert::policy_key,
            tx.clone(),
            backoff,
        ));
        tokio::spawn(watch_kind(
            Api::<moat_crds::MoatPolicy>::all(client.clone()),
            watcher::Config::default(),
            Kind::MoatPolicies,
            |p| Item::MoatPolicy {
                key: convert::moat_policy_key(p),
                policy: convert::moat_policy(p),
            },
            convert::moat_policy_key,
            tx.clone(),
            backoff,
        ));
        tokio::spawn(watch_kind(
            Api::<Node>::all(client),
            // Every node: the others' pod CIDRs and addresses are routed to (--routing direct).
            watcher::Config::default(),
            Kind::Nodes,
            |n| Item::Node {
                name: convert::node_key(n).1,
                info: convert::node_info(n),
            },
            convert::node_key,
            tx,
            backoff,
        ));
        publish_loop(rx, shared, &config, shutdown).await;
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

async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    to_item: fn(&K) -> Item,
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
    loop {
        let mut stream = watcher::watcher(api.clone(), config.clone()).boxed();
        while let Some(next) = stream.next().await {
            let update = match next {
                Ok(Event::Init) => Update::Init(kind),
                Ok(Event::InitApply(object)) => Update::InitApply(to_item(&object)),
                Ok(Event::InitDone) => Update::InitDone(kind),
                Ok(Event::Apply(object)) => Update::Apply(to_item(&object)),
                Ok(Event::Delete(object)) => Update::Delete(kind, key_of(&object)),
                Err(error) => {
                    let restart = gone_at_watch_start(&error);
                    debug!(kind = kind.name(), %error, "watch error");
                    // An optional kind that is not served is no failure: it has no objects,
                    // and the list is retried (with backoff) in case its CRD is installed.
                    let update = if kind.optional() && not_served(&error) {
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
                    if restart {
                        break;
                    }
                    continue;
                }
            };
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
                state.apply(update);
                // Take whatever else is queued now: one publish for the lot.
                while let Ok(update) = rx.try_recv() {
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
