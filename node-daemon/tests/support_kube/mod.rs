//! An in-process fake Kubernetes API server speaking the real list/watch HTTP protocol, for
//! the datastore's tests: a global resourceVersion, LIST with `metadata.resourceVersion`,
//! WATCH (`?watch=true&resourceVersion=N&allowWatchBookmarks=true`) as chunked JSON lines of
//! `{type, object}`, BOOKMARK events, and 410 Gone on a resourceVersion older than the last
//! compaction, either as a watch ERROR event (what the real API server does) or as an HTTP
//! 410 answer. Tests can also stop and restart it on the same port.
//!
//! Plain HTTP/1.1 over tokio TCP on 127.0.0.1, one request per connection.

#![allow(dead_code)]

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
}

impl Res {
    fn from_path(path: &str) -> Option<Res> {
        match path {
            "/api/v1/pods" => Some(Res::Pods),
            "/api/v1/namespaces" => Some(Res::Namespaces),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Res::NetworkPolicies),
            "/api/v1/nodes" => Some(Res::Nodes),
            _ => None,
        }
    }

    fn from_kind(kind: &str) -> Res {
        match kind {
            "Pod" => Res::Pods,
            "Namespace" => Res::Namespaces,
            "NetworkPolicy" => Res::NetworkPolicies,
            "Node" => Res::Nodes,
            other => panic!("fake API server does not serve kind {other}"),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::Namespaces => "Namespace",
            Res::NetworkPolicies => "NetworkPolicy",
            Res::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::NetworkPolicies => "networking.k8s.io/v1",
            _ => "v1",
        }
    }
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
            }),
            wake: watch::channel(0).0,
            kill: watch::channel(0).0,
        });
        let listener = runtime
            .block_on(async { TcpListener::bind("127.0.0.1:0").await })
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
        let mut s = self.inner.lock();
        s.rv += 1;
        let rv = s.rv;
        let mut object = object;
        object["apiVersion"] = json!(res.api_version());
        object["kind"] = json!(res.kind());
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
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
        drop(s);
        self.inner.wake();
        rv
    }

    fn upsert(&self, object: Value, logged: bool) -> u64 {
        let res = Res::from_kind(object["kind"].as_str().expect("object without kind"));
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
    res: Option<Res>,
    query: BTreeMap<String, String>,
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
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Ok(None);
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some("GET"), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(Some(Request {
            res: None,
            query: BTreeMap::new(),
        }));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Some(Request {
        res: Res::from_path(path),
        query,
    }))
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

/// `metadata.name=X` (the one field selector the datastore uses) or nothing.
fn selects(selector: Option<&String>, object: &Value) -> bool {
    match selector.and_then(|s| s.strip_prefix("metadata.name=")) {
        Some(name) => object["metadata"]["name"].as_str() == Some(name),
        None => true,
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
    let Some(res) = request.res else {
        return respond(
            &mut stream,
            "404 Not Found",
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        )
        .await;
    };
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
                .filter(|o| selects(selector, o))
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
                    .filter(|o| selects(selector, o))
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
                .filter(|e| e.res == res && selects(selector, &e.object))
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
