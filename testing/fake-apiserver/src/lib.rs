//! Tests only. An in-process fake Kubernetes API server speaking the real HTTP protocol, for
//! moatd's datastore tests and the conformance runner's kube mode: create (POST), get, replace
//! (PUT), merge patch (PATCH), delete (a namespace takes its objects with it), a global
//! resourceVersion, LIST with `metadata.resourceVersion`,
//! WATCH (`?watch=true&resourceVersion=N&allowWatchBookmarks=true`) as chunked JSON lines of
//! `{type, object}`, BOOKMARK events, and 410 Gone on a resourceVersion older than the last
//! compaction, either as a watch ERROR event (what the real API server does) or as an HTTP
//! 410 answer. Tests can also stop and restart it on the same port, stop serving a resource
//! (a CRD that is not installed answers 404), read back every write request, and have created
//! pods "run" at once (phase Running, Ready, an address) since no kubelet is there.
//! ClusterNetworkPolicies are served at v1beta1 and v1alpha2 (stored apart, no conversion),
//! cluster-scoped, with a status subresource and metadata.generation. core/v1 Events are
//! accepted like any object (tests read what was posted).
//!
//! Plain HTTP/1.1 over tokio TCP on 127.0.0.1, one request per connection.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    Pods,
    Namespaces,
    NetworkPolicies,
    Nodes,
    Services,
    MoatPolicies,
    DaemonSets,
    /// policy.networking.k8s.io/v1beta1 ClusterNetworkPolicy (cluster-scoped, with a status
    /// subresource).
    ClusterNetworkPolicies,
    /// The same kind at v1alpha2. Stored apart from v1beta1 (no conversion here): a test
    /// serves one or the other, or both with different objects.
    ClusterNetworkPoliciesV1alpha2,
    /// core/v1 Events (what moatd posts about detections).
    Events,
}

impl Res {
    pub const ALL: [Res; 10] = [
        Res::Pods,
        Res::Namespaces,
        Res::NetworkPolicies,
        Res::Nodes,
        Res::Services,
        Res::MoatPolicies,
        Res::DaemonSets,
        Res::ClusterNetworkPolicies,
        Res::ClusterNetworkPoliciesV1alpha2,
        Res::Events,
    ];

    /// URL prefix of its API group/version, plural, namespaced.
    fn info(self) -> (&'static str, &'static str, bool) {
        match self {
            Res::Pods => ("/api/v1", "pods", true),
            Res::Namespaces => ("/api/v1", "namespaces", false),
            Res::NetworkPolicies => ("/apis/networking.k8s.io/v1", "networkpolicies", true),
            Res::Nodes => ("/api/v1", "nodes", false),
            Res::Services => ("/api/v1", "services", true),
            Res::MoatPolicies => ("/apis/moat.io/v1alpha1", "moatpolicies", true),
            Res::DaemonSets => ("/apis/apps/v1", "daemonsets", true),
            Res::Events => ("/api/v1", "events", true),
            Res::ClusterNetworkPolicies => (
                "/apis/policy.networking.k8s.io/v1beta1",
                "clusternetworkpolicies",
                false,
            ),
            Res::ClusterNetworkPoliciesV1alpha2 => (
                "/apis/policy.networking.k8s.io/v1alpha2",
                "clusternetworkpolicies",
                false,
            ),
        }
    }

    /// By kind (the first resource of that kind: v1beta1 for a ClusterNetworkPolicy), or by
    /// `<apiVersion>/<kind>` (`policy.networking.k8s.io/v1alpha2/ClusterNetworkPolicy`).
    fn from_kind(kind: &str) -> Res {
        Res::ALL
            .into_iter()
            .find(|r| r.kind() == kind || format!("{}/{}", r.api_version(), r.kind()) == kind)
            .unwrap_or_else(|| panic!("fake API server does not serve kind {kind}"))
    }

    /// Writes to the object itself leave its status alone; metadata.generation is kept.
    fn has_status_subresource(self) -> bool {
        matches!(
            self,
            Res::ClusterNetworkPolicies | Res::ClusterNetworkPoliciesV1alpha2
        )
    }

    /// By the object's kind and, when it has one that is served here, its apiVersion.
    fn of_object(object: &Value) -> Res {
        let kind = object["kind"].as_str().expect("object without kind");
        Res::ALL
            .into_iter()
            .find(|r| r.kind() == kind && object["apiVersion"] == r.api_version())
            .unwrap_or_else(|| Res::from_kind(kind))
    }

    pub fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::Namespaces => "Namespace",
            Res::NetworkPolicies => "NetworkPolicy",
            Res::Nodes => "Node",
            Res::Services => "Service",
            Res::MoatPolicies => "MoatPolicy",
            Res::DaemonSets => "DaemonSet",
            Res::Events => "Event",
            Res::ClusterNetworkPolicies | Res::ClusterNetworkPoliciesV1alpha2 => {
                "ClusterNetworkPolicy"
            }
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::NetworkPolicies => "networking.k8s.io/v1",
            Res::MoatPolicies => "moat.io/v1alpha1",
            Res::DaemonSets => "apps/v1",
            Res::ClusterNetworkPolicies => "policy.networking.k8s.io/v1beta1",
            Res::ClusterNetworkPoliciesV1alpha2 => "policy.networking.k8s.io/v1alpha2",
            _ => "v1",
        }
    }
}

/// What a request path names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    /// All objects (cluster-wide), or those of one namespace.
    Collection { res: Res, namespace: Option<String> },
    Item {
        res: Res,
        namespace: Option<String>,
        name: String,
        /// The `status` subresource (`.../<name>/status`): only the object's status changes.
        status: bool,
    },
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        for res in Res::ALL {
            let (prefix, plural, namespaced) = res.info();
            let Some(rest) = path.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            let segments: Vec<&str> = rest.split('/').collect();
            let route = match segments.as_slice() {
                [p] if *p == plural => Route::Collection {
                    res,
                    namespace: None,
                },
                [p, name] if *p == plural && !namespaced => Route::Item {
                    res,
                    namespace: None,
                    name: name.to_string(),
                    status: false,
                },
                [p, name, "status"] if *p == plural && !namespaced => Route::Item {
                    res,
                    namespace: None,
                    name: name.to_string(),
                    status: true,
                },
                ["namespaces", ns, p] if *p == plural && namespaced => Route::Collection {
                    res,
                    namespace: Some(ns.to_string()),
                },
                ["namespaces", ns, p, name] if *p == plural && namespaced => Route::Item {
                    res,
                    namespace: Some(ns.to_string()),
                    name: name.to_string(),
                    status: false,
                },
                ["namespaces", ns, p, name, "status"] if *p == plural && namespaced => {
                    Route::Item {
                        res,
                        namespace: Some(ns.to_string()),
                        name: name.to_string(),
                        status: true,
                    }
                }
                _ => continue,
            };
            return Some(route);
        }
        None
    }

    fn res(&self) -> Res {
        match self {
            Route::Collection { res, .. } | Route::Item { res, .. } => *res,
        }
    }
}

/// One write request the server accepted (POST, PUT, PATCH, DELETE), in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Write {
    pub method: String,
    pub res: Res,
    pub namespace: String,
    pub name: String,
    /// The request went to the object's `status` subresource.
    pub status: bool,
    /// The request's Content-Type (for PATCH: which kind of patch).
    pub content_type: String,
    /// The request body (the object, or the patch); Null for DELETE.
    pub body: Value,
}

/// How a watch from a compacted resourceVersion is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoneStyle {
    /// HTTP 200 and a watch ERROR event with code 410 (the real API server).
    Event,
    /// HTTP 410 with a Status body.
    Http,
}

struct LogEntry {
    rv: u64,
    res: Res,
    event_type: &'static str,
    object: Value,
}

struct State {
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<(String, String), Value>>,
    log: Vec<LogEntry>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    compacted: u64,
    gone_style: GoneStyle,
    /// Bumped to make every open watch send ERROR 410 and end.
    expire_epoch: u64,
    /// Bumped to make every open watch (that asked for them) send a BOOKMARK.
    bookmark_epoch: u64,
    lists: BTreeMap<Res, u64>,
    watches: BTreeMap<Res, Vec<u64>>,
    gone_answers: u64,
    not_served: Vec<Res>,
    writes: Vec<Write>,
    /// Created pods get phase Running, Ready and the next address of 10.244.0.0/16.
    run_pods: bool,
    next_pod: u32,
    next_service: u32,
}

struct Inner {
    state: Mutex<State>,
    /// Bumped on every change open watches must look at.
    wake: watch::Sender<u64>,
    /// Bumped to drop every open connection at once.
    kill: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.wake.send_modify(|v| *v += 1);
    }
}

pub struct FakeApiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    runtime: tokio::runtime::Handle,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Stores (or deletes) the object under a new resourceVersion and logs the event; returns the
/// resourceVersion.
fn record(s: &mut State, res: Res, event_type: &'static str, object: Value, logged: bool) -> u64 {
    s.rv += 1;
    let rv = s.rv;
    let mut object = object;
    object["apiVersion"] = json!(res.api_version());
    object["kind"] = json!(res.kind());
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let key = key_of(&object);
    if res.has_status_subresource() && event_type != "DELETED" {
        // As the real API server does for a custom resource with a status subresource:
        // metadata.generation moves when the spec does, and a write without a status (a
        // test's `apply` of the object) keeps the one stored.
        let previous = s.objects.get(&res).and_then(|m| m.get(&key));
        let generation = match previous {
            Some(p) if p["spec"] == object["spec"] => {
                p["metadata"]["generation"].as_i64().unwrap_or(1)
            }
            Some(p) => p["metadata"]["generation"].as_i64().unwrap_or(0) + 1,
            None => 1,
        };
        if object.get("status").is_none()
            && let Some(status) = previous.and_then(|p| p.get("status"))
        {
            object["status"] = status.clone();
        }
        object["metadata"]["generation"] = json!(generation);
    }
    if event_type == "DELETED" {
        s.objects.entry(res).or_default().remove(&key);
    } else {
        s.objects
            .entry(res)
            .or_default()
            .insert(key, object.clone());
    }
    if logged {
        s.log.push(LogEntry {
            rv,
            res,
            event_type,
            object,
        });
    } else {
        // The event is lost for good: nobody may resume from before it.
        s.compacted = rv;
    }
    rv
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("").to_string(),
        meta["name"]
            .as_str()
            .expect("object without metadata.name")
            .to_string(),
    )
}

impl FakeApiServer {
    pub fn start() -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Listens on `ip` (a free port) rather than 127.0.0.1: a client in another network
    /// namespace reaches it over a veth whose host end has `ip`.
    pub fn start_on(ip: std::net::IpAddr) -> Self {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(rt.handle().clone()).unwrap();
            rt.block_on(async move {
                let _ = stop_rx.await;
            });
        });
        let runtime = handle_rx.recv().unwrap();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 100,
                objects: BTreeMap::new(),
                log: Vec::new(),
                compacted: 0,
                gone_style: GoneStyle::Event,
                expire_epoch: 0,
                bookmark_epoch: 0,
                lists: BTreeMap::new(),
                watches: BTreeMap::new(),
                gone_answers: 0,
                not_served: Vec::new(),
                writes: Vec::new(),
                run_pods: false,
                next_pod: 0,
                next_service: 0,
            }),
            wake: watch::channel(0).0,
            kill: watch::channel(0).0,
        });
        let listener = runtime
            .block_on(async move { TcpListener::bind((ip, 0)).await })
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Self {
            addr,
            inner,
            runtime,
            accept: Mutex::new(None),
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: TcpListener) {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let inner = inner.clone();
                let kill = inner.kill.subscribe();
                tokio::spawn(async move {
                    let _ = handle_connection(stream, inner, kill).await;
                });
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and stops listening (the API server is down). State is kept,
    /// like etcd's.
    pub fn stop(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        // Wait for the listener to be gone, so nothing connects any more.
        let inner = self.inner.clone();
        self.runtime.block_on(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            inner.kill.send_modify(|v| *v += 1);
        });
    }

    /// Listens again on the same address.
    pub fn restart(&self) {
        let addr = self.addr;
        let listener = self
            .runtime
            .block_on(async move {
                let mut last = None;
                for _ in 0..100 {
                    match TcpListener::bind(addr).await {
                        Ok(l) => return Ok(l),
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(last.unwrap())
            })
            .expect("rebind the fake API server");
        self.serve(listener);
    }

    /// Drops every open connection (watches included); the server keeps listening.
    pub fn drop_connections(&self) {
        self.inner.kill.send_modify(|v| *v += 1);
    }

    fn record(&self, res: Res, event_type: &'static str, object: Value, logged: bool) -> u64 {
        let rv = record(&mut self.inner.lock(), res, event_type, object, logged);
        self.inner.wake();
        rv
    }

    fn upsert(&self, object: Value, logged: bool) -> u64 {
        let res = Res::of_object(&object);
        let key = key_of(&object);
        let exists = self
            .inner
            .lock()
            .objects
            .get(&res)
            .is_some_and(|m| m.contains_key(&key));
        let event_type = if exists { "MODIFIED" } else { "ADDED" };
        self.record(res, event_type, object, logged)
    }

    fn remove(&self, kind: &str, namespace: &str, name: &str, logged: bool) -> u64 {
        let res = Res::from_kind(kind);
        let key = (namespace.to_string(), name.to_string());
        let object = self
            .inner
            .lock()
            .objects
            .get(&res)
            .and_then(|m| m.get(&key))
            .cloned()
            .unwrap_or_else(|| panic!("delete of unknown {kind} {namespace}/{name}"));
        self.record(res, "DELETED", object, logged)
    }

    /// Creates or updates an object (ADDED or MODIFIED); returns its resourceVersion.
    pub fn apply(&self, object: Value) -> u64 {
        self.upsert(object, true)
    }

    /// DELETED; an empty namespace for cluster-scoped kinds.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> u64 {
        self.remove(kind, namespace, name, true)
    }

    /// Changes the object without any watch event, as if the event had been compacted away:
    /// a watch resuming from before it gets 410 Gone, and only a relist sees the change.
    pub fn apply_unseen(&self, object: Value) -> u64 {
        self.upsert(object, false)
    }

    pub fn delete_unseen(&self, kind: &str, namespace: &str, name: &str) -> u64 {
        self.remove(kind, namespace, name, false)
    }

    /// Every open watch gets ERROR 410 (Expired) and ends; resuming from any resourceVersion
    /// before now is refused too.
    pub fn expire_watches(&self) {
        let mut s = self.inner.lock();
        s.expire_epoch += 1;
        s.compacted = s.rv;
        drop(s);
        self.inner.wake();
    }

    /// Watches resuming from before the current resourceVersion get 410 Gone.
    pub fn compact(&self) {
        let mut s = self.inner.lock();
        s.compacted = s.rv;
    }

    pub fn set_gone_style(&self, style: GoneStyle) {
        self.inner.lock().gone_style = style;
    }

    /// Every open watch that asked for bookmarks gets one at the current resourceVersion.
    pub fn send_bookmarks(&self) {
        self.inner.lock().bookmark_epoch += 1;
        self.inner.wake();
    }

    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    pub fn lists(&self, res: Res) -> u64 {
        self.inner.lock().lists.get(&res).copied().unwrap_or(0)
    }

    /// The resourceVersions watches were started from, in order.
    pub fn watches(&self, res: Res) -> Vec<u64> {
        self.inner
            .lock()
            .watches
            .get(&res)
            .cloned()
            .unwrap_or_default()
    }

    pub fn gone_answers(&self) -> u64 {
        self.inner.lock().gone_answers
    }

    /// Answer 404 for every path of this resource (its CRD is not installed), or serve it
    /// again.
    pub fn set_served(&self, res: Res, served: bool) {
        let mut s = self.inner.lock();
        s.not_served.retain(|r| *r != res);
        if !served {
            s.not_served.push(res);
        }
    }

    /// Pods created from now on run at once: phase Running, condition Ready, an address.
    pub fn run_created_pods(&self) {
        self.inner.lock().run_pods = true;
    }

    /// Every write request accepted so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.inner.lock().writes.clone()
    }

    /// The stored object, if any (an empty namespace for cluster-scoped kinds).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Res::from_kind(kind);
        self.inner
            .lock()
            .objects
            .get(&res)
            .and_then(|m| m.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }

    /// Every stored object of a kind, ordered by (namespace, name).
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let res = Res::from_kind(kind);
        self.inner
            .lock()
            .objects
            .get(&res)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

struct Request {
    method: String,
    route: Option<Route>,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Option<Value>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut body = buf[head_end..].to_vec();
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while body.len() < len {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = read_chunked(stream, body).await?;
    } else {
        body.clear();
    }
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let body = (!body.is_empty()).then(|| serde_json::from_slice(&body).unwrap_or(Value::Null));
    Ok(Some(Request {
        method,
        route: Route::parse(path),
        query,
        content_type: header("content-type").unwrap_or_default(),
        body,
    }))
}

/// Decodes a chunked body (`size CRLF data CRLF ... 0 CRLF CRLF`), reading more as needed.
async fn read_chunked(stream: &mut TcpStream, mut raw: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let line_end = loop {
            if let Some(p) = raw[at..].windows(2).position(|w| w == b"\r\n") {
                break at + p;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(out);
            }
            raw.extend_from_slice(&chunk[..n]);
        };
        let size_text = String::from_utf8_lossy(&raw[at..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return Ok(out);
        }
        let start = line_end + 2;
        while raw.len() < start + size + 2 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(out);
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        out.extend_from_slice(&raw[start..start + size]);
        at = start + size + 2;
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    stream.shutdown().await
}

async fn write_chunk(stream: &mut TcpStream, value: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).unwrap();
    line.push(b'\n');
    let mut out = format!("{:x}\r\n", line.len()).into_bytes();
    out.extend_from_slice(&line);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await?;
    stream.flush().await
}

const CHUNKED_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";

async fn end_chunked(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await?;
    stream.shutdown().await
}

fn gone_status(rv: u64, compacted: u64) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {rv} ({compacted})"),
        "reason": "Expired", "code": 410
    })
}

/// `metadata.name=X` (the one field selector the datastore uses) or nothing, within one
/// namespace or all.
fn selects(selector: Option<&String>, namespace: Option<&str>, object: &Value) -> bool {
    let in_namespace =
        namespace.is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns));
    in_namespace
        && match selector.and_then(|s| s.strip_prefix("metadata.name=")) {
            Some(name) => object["metadata"]["name"].as_str() == Some(name),
            None => true,
        }
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "code": code, "message": message})
}

/// RFC 7386 JSON merge patch (what merge and strategic-merge patches of labels amount to).
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("an object");
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A strategic merge patch, as far as the objects served here need it: a JSON merge patch,
/// except that a list of objects that all have a `type` (a status's `conditions`) is merged
/// element by element on `type` rather than replaced.
fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let by_type = |v: &Value| {
        v.as_array()
            .is_some_and(|a| a.iter().all(|e| e["type"].is_string()))
    };
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("object");
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else if by_type(v) && map.get(k).is_some_and(by_type) {
                    let list = map.get_mut(k).and_then(Value::as_array_mut).expect("list");
                    for element in v.as_array().expect("list") {
                        match list.iter_mut().find(|e| e["type"] == element["type"]) {
                            Some(existing) => strategic_merge_patch(existing, element),
                            None => list.push(element.clone()),
                        }
                    }
                } else {
                    strategic_merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// What the real API server adds on create: a Namespace's kubernetes.io/metadata.name label,
/// a Service's ClusterIP; and, when asked, a running pod's status.
fn defaults_on_create(s: &mut State, res: Res, object: &mut Value) {
    match res {
        Res::Namespaces => {
            let name = object["metadata"]["name"].clone();
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
        }
        Res::Services
            if object["spec"]["clusterIP"]
                .as_str()
                .is_none_or(str::is_empty) =>
        {
            s.next_service += 1;
            let n = s.next_service;
            object["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", n / 250, n % 250 + 1));
        }
        Res::Pods if s.run_pods => {
            s.next_pod += 1;
            let n = s.next_pod;
            let ip = format!("10.244.{}.{}", n / 250, n % 250 + 1);
            if object["spec"]["nodeName"].is_null() {
                object["spec"]["nodeName"] = json!("node-1");
            }
            object["status"] = json!({
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}]
            });
        }
        _ => {}
    }
}

/// POST, GET (one object), PUT, PATCH and DELETE. Returns the HTTP status and body.
fn write_or_get(inner: &Inner, request: &Request) -> (&'static str, Value) {
    let route = request.route.clone().expect("routed");
    let mut s = inner.lock();
    let res = route.res();
    let stored = |s: &State, ns: &str, name: &str| {
        s.objects
            .get(&res)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
    };
    let subresource_status = matches!(route, Route::Item { status: true, .. });
    let log_write = |s: &mut State, ns: &str, name: &str| {
        s.writes.push(Write {
            method: request.method.clone(),
            res,
            namespace: ns.to_string(),
            name: name.to_string(),
            status: subresource_status,
            content_type: request.content_type.clone(),
            body: request.body.clone().unwrap_or(Value::Null),
        })
    };
    match (request.method.as_str(), route) {
        ("POST", Route::Collection { namespace, .. }) => {
            let Some(mut object) = request.body.clone().filter(Value::is_object) else {
                return (
                    "400 Bad Request",
                    status(400, "BadRequest", "no object".into()),
                );
            };
            if let Some(ns) = &namespace {
                object["metadata"]["namespace"] = json!(ns);
            }
            let ns = namespace.unwrap_or_default();
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return (
                    "422 Unprocessable Entity",
                    status(422, "Invalid", "metadata.name: Required value".into()),
                );
            };
            if stored(&s, &ns, &name).is_some() {
                let message = format!("{} \"{name}\" already exists", res.kind());
                return ("409 Conflict", status(409, "AlreadyExists", message));
            }
            log_write(&mut s, &ns, &name);
            defaults_on_create(&mut s, res, &mut object);
            record(&mut s, res, "ADDED", object, true);
            let created = stored(&s, &ns, &name).expect("just stored");
            drop(s);
            inner.wake();
            ("201 Created", created)
        }
        (
            method,
            Route::Item {
                namespace, name, ..
            },
        ) => {
            let ns = namespace.unwrap_or_default();
            let Some(current) = stored(&s, &ns, &name) else {
                let message = format!("{} \"{name}\" not found", res.kind());
                return ("404 Not Found", status(404, "NotFound", message));
            };
            let (event, object) = match method {
                "GET" => return ("200 OK", current),
                "PUT" => {
                    let Some(mut object) = request.body.clone().filter(Value::is_object) else {
                        return (
                            "400 Bad Request",
                            status(400, "BadRequest", "no object".into()),
                        );
                    };
                    if res == Res::Namespaces {
                        object["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
                    }
                    ("MODIFIED", object)
                }
                "PATCH" => {
                    let mut object = current.clone();
                    let mut patch = request.body.clone().unwrap_or(Value::Null);
                    if subresource_status {
                        // The status subresource changes the status and nothing else.
                        patch = json!({"status": patch["status"].clone()});
                    }
                    if request.content_type.contains("strategic-merge-patch") {
                        strategic_merge_patch(&mut object, &patch);
                    } else {
                        merge_patch(&mut object, &patch);
                    }
                    if res == Res::Namespaces {
                        object["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
                    }
                    ("MODIFIED", object)
                }
                "DELETE" => ("DELETED", current.clone()),
                _ => {
                    return (
                        "405 Method Not Allowed",
                        status(405, "MethodNotAllowed", method.into()),
                    );
                }
            };
            log_write(&mut s, &ns, &name);
            if res == Res::Namespaces && event == "DELETED" {
                // Namespace deletion takes the namespace's objects with it.
                for other in Res::ALL.into_iter().filter(|r| r.info().2) {
                    let doomed: Vec<Value> = s
                        .objects
                        .get(&other)
                        .map(|m| {
                            m.iter()
                                .filter(|((o_ns, _), _)| *o_ns == name)
                                .map(|(_, v)| v.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    for object in doomed {
                        record(&mut s, other, "DELETED", object, true);
                    }
                }
            }
            record(&mut s, res, event, object, true);
            let answer = if event == "DELETED" {
                current
            } else {
                stored(&s, &ns, &name).expect("just stored")
            };
            drop(s);
            inner.wake();
            ("200 OK", answer)
        }
        (method, Route::Collection { .. }) => (
            "405 Method Not Allowed",
            status(405, "MethodNotAllowed", method.into()),
        ),
    }
}

async fn handle_connection(
    mut stream: TcpStream,
    inner: Arc<Inner>,
    mut kill: watch::Receiver<u64>,
) -> std::io::Result<()> {
    let request = tokio::select! {
        r = read_request(&mut stream) => r?,
        _ = kill.changed() => return Ok(()),
    };
    let Some(request) = request else {
        return Ok(());
    };
    let served = request
        .route
        .as_ref()
        .is_some_and(|r| !inner.lock().not_served.contains(&r.res()));
    if !served {
        return respond(
            &mut stream,
            "404 Not Found",
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
            ),
        )
        .await;
    }
    let (res, namespace) = match request.route.clone() {
        Some(Route::Collection { res, namespace }) if request.method == "GET" => (res, namespace),
        _ => {
            let (code, body) = write_or_get(&inner, &request);
            return respond(&mut stream, code, &body).await;
        }
    };
    let namespace = namespace.as_deref();
    let selector = request.query.get("fieldSelector");
    if request.query.get("watch").map(String::as_str) != Some("true") {
        let body = {
            let mut s = inner.lock();
            *s.lists.entry(res).or_default() += 1;
            let items: Vec<Value> = s
                .objects
                .get(&res)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|o| selects(selector, namespace, o))
                .map(|o| {
                    // Like the real API server, list items carry no apiVersion/kind.
                    let mut o = o.clone();
                    if let Some(map) = o.as_object_mut() {
                        map.remove("apiVersion");
                        map.remove("kind");
                    }
                    o
                })
                .collect();
            json!({
                "apiVersion": res.api_version(),
                "kind": format!("{}List", res.kind()),
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": items,
            })
        };
        return respond(&mut stream, "200 OK", &body).await;
    }

    // WATCH
    let bookmarks = request.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let requested: Option<u64> = request
        .query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .and_then(|v| v.parse().ok());
    let mut wake = inner.wake.subscribe();
    enum Start {
        Gone(GoneStyle, Value),
        Stream(u64, Vec<Value>, u64, u64),
    }
    let start = {
        let mut s = inner.lock();
        s.watches
            .entry(res)
            .or_default()
            .push(requested.unwrap_or(0));
        match requested {
            Some(rv) if rv < s.compacted => {
                s.gone_answers += 1;
                let status = gone_status(rv, s.compacted);
                Start::Gone(s.gone_style, status)
            }
            Some(rv) => Start::Stream(rv, Vec::new(), s.expire_epoch, s.bookmark_epoch),
            None => {
                // No resourceVersion: start with the current state as ADDED events.
                let initial: Vec<Value> = s
                    .objects
                    .get(&res)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|o| selects(selector, namespace, o))
                    .map(|o| json!({"type": "ADDED", "object": o}))
                    .collect();
                Start::Stream(s.rv, initial, s.expire_epoch, s.bookmark_epoch)
            }
        }
    };
    let (mut cursor, initial, expire_seen, mut bookmark_seen) = match start {
        Start::Gone(GoneStyle::Http, status) => {
            return respond(&mut stream, "410 Gone", &status).await;
        }
        Start::Gone(GoneStyle::Event, status) => {
            stream.write_all(CHUNKED_OK).await?;
            write_chunk(&mut stream, &json!({"type": "ERROR", "object": status})).await?;
            return end_chunked(&mut stream).await;
        }
        Start::Stream(cursor, initial, expire_seen, bookmark_seen) => {
            (cursor, initial, expire_seen, bookmark_seen)
        }
    };
    stream.write_all(CHUNKED_OK).await?;
    for event in initial {
        write_chunk(&mut stream, &event).await?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Everything after the cursor, then a bookmark or the expiry if asked for.
        let (events, bookmark, expired) = {
            let s = inner.lock();
            let start = s.log.partition_point(|e| e.rv <= cursor);
            let events: Vec<Value> = s.log[start..]
                .iter()
                .filter(|e| e.res == res && selects(selector, namespace, &e.object))
                .map(|e| json!({"type": e.event_type, "object": e.object}))
                .collect();
            cursor = cursor.max(s.rv);
            let bookmark = (bookmarks && s.bookmark_epoch != bookmark_seen).then(|| {
                json!({"type": "BOOKMARK", "object": {
                    "kind": res.kind(), "apiVersion": res.api_version(),
                    "metadata": {"resourceVersion": s.rv.to_string()}
                }})
            });
            bookmark_seen = s.bookmark_epoch;
            let expired = (s.expire_epoch != expire_seen).then(|| gone_status(cursor, s.compacted));
            (events, bookmark, expired)
        };
        for event in events {
            write_chunk(&mut stream, &event).await?;
        }
        if let Some(bookmark) = bookmark {
            write_chunk(&mut stream, &bookmark).await?;
        }
        if let Some(status) = expired {
            inner.lock().gone_answers += 1;
            write_chunk(&mut stream, &json!({"type": "ERROR", "object": status})).await?;
            return end_chunked(&mut stream).await;
        }
        tokio::select! {
            _ = wake.changed() => {}
            _ = kill.changed() => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => return end_chunked(&mut stream).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels}})
}

/// A running pod with one container, the given labels and one IPv4 address.
pub fn pod(namespace: &str, name: &str, labels: Value, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels},
           "spec": {"nodeName": "node-1", "containers": [{"name": "main", "image": "busybox"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

pub fn network_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": namespace},
           "spec": spec})
}

pub fn node(name: &str, pod_cidrs: &[&str], internal_ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name},
           "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs},
           "status": {"addresses": [
               {"type": "InternalIP", "address": internal_ip},
               {"type": "Hostname", "address": name}]}})
}

pub fn moat_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "moat.io/v1alpha1", "kind": "MoatPolicy",
           "metadata": {"name": name, "namespace": namespace},
           "spec": spec})
}
