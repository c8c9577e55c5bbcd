//! A minimal CRI client for end-to-end tests: unary gRPC calls over HTTP/2 on a runtime's unix
//! socket, with the few `runtime.v1` messages a test that plays kubelet needs, encoded by hand.
//!
//! Why not crictl: Debian 12 does not package cri-tools, and building it takes a Go toolchain
//! newer than Debian's. Why not tonic and generated code: a gRPC stack and the whole CRI schema
//! for ten calls. Protobuf's wire format for the fields used here (strings, maps, nested
//! messages, varints) is a few lines each way. Field numbers are those of k8s.io/cri-api's
//! `api.proto` (package runtime.v1), which containerd serves since 1.5.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;

/// A protobuf message being built. Scalars at their proto3 default are left out, as every
/// encoder does, so the runtime sees exactly what kubelet's generated code would send.
#[derive(Clone, Debug, Default)]
pub struct Pb(Vec<u8>);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl Pb {
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, field: u32, wire_type: u8) {
        put_varint(&mut self.0, (u64::from(field) << 3) | u64::from(wire_type));
    }

    /// A length-delimited field (bytes, string, embedded message, map entry), even if empty.
    pub fn bytes(mut self, field: u32, value: &[u8]) -> Self {
        self.key(field, 2);
        put_varint(&mut self.0, value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    pub fn str(self, field: u32, value: &str) -> Self {
        if value.is_empty() {
            self
        } else {
            self.bytes(field, value.as_bytes())
        }
    }

    /// A repeated string field: every element, empty ones included.
    pub fn strs(mut self, field: u32, values: &[&str]) -> Self {
        for v in values {
            self = self.bytes(field, v.as_bytes());
        }
        self
    }

    pub fn msg(self, field: u32, message: Pb) -> Self {
        self.bytes(field, &message.0)
    }

    /// A varint field (uint32/uint64/int64/bool/enum).
    pub fn uint(mut self, field: u32, value: u64) -> Self {
        if value != 0 {
            self.key(field, 0);
            put_varint(&mut self.0, value);
        }
        self
    }

    /// A `map<string, string>`: one entry message (key = 1, value = 2) per pair.
    pub fn map(mut self, field: u32, entries: &[(&str, &str)]) -> Self {
        for (k, v) in entries {
            self = self.msg(field, Pb::new().str(1, k).str(2, v));
        }
        self
    }
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// A decoded message: its fields in wire order. Unknown fields and fixed-width ones are
/// kept or skipped as the wire format says, so newer runtimes' additions do no harm.
pub struct Msg<'a>(Vec<(u32, Value<'a>)>);

impl<'a> Msg<'a> {
    pub fn parse(mut buf: &'a [u8]) -> Result<Self, String> {
        fn varint(buf: &mut &[u8]) -> Result<u64, String> {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
                *buf = rest;
                v |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    return Ok(v);
                }
            }
            Err("varint longer than 10 bytes".into())
        }
        let mut fields = Vec::new();
        while !buf.is_empty() {
            let key = varint(&mut buf)?;
            let field = (key >> 3) as u32;
            let skip = |buf: &mut &'a [u8], n: usize| -> Result<&'a [u8], String> {
                if buf.len() < n {
                    return Err(format!("field {field}: truncated"));
                }
                let (head, rest) = buf.split_at(n);
                *buf = rest;
                Ok(head)
            };
            match key & 7 {
                0 => fields.push((field, Value::Varint(varint(&mut buf)?))),
                1 => drop(skip(&mut buf, 8)?),
                2 => {
                    let len = varint(&mut buf)? as usize;
                    fields.push((field, Value::Bytes(skip(&mut buf, len)?)));
                }
                5 => drop(skip(&mut buf, 4)?),
                other => return Err(format!("field {field}: wire type {other} not supported")),
            }
        }
        Ok(Self(fields))
    }

    fn last_bytes(&self, field: u32) -> Option<&'a [u8]> {
        self.0.iter().rev().find_map(|(f, v)| match v {
            Value::Bytes(b) if *f == field => Some(*b),
            _ => None,
        })
    }

    pub fn bytes(&self, field: u32) -> Vec<u8> {
        self.last_bytes(field).unwrap_or_default().to_vec()
    }

    pub fn string(&self, field: u32) -> String {
        String::from_utf8_lossy(self.last_bytes(field).unwrap_or_default()).into_owned()
    }

    pub fn varint(&self, field: u32) -> u64 {
        self.0
            .iter()
            .rev()
            .find_map(|(f, v)| match v {
                Value::Varint(x) if *f == field => Some(*x),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// An embedded message (empty when absent, as proto3 reads a missing one).
    pub fn message(&self, field: u32) -> Result<Msg<'a>, String> {
        Msg::parse(self.last_bytes(field).unwrap_or_default())
    }

    pub fn repeated(&self, field: u32) -> Result<Vec<Msg<'a>>, String> {
        self.0
            .iter()
            .filter_map(|(f, v)| match v {
                Value::Bytes(b) if *f == field => Some(Msg::parse(b)),
                _ => None,
            })
            .collect()
    }

    pub fn map(&self, field: u32) -> Result<BTreeMap<String, String>, String> {
        self.repeated(field)?
            .into_iter()
            .map(|entry| Ok((entry.string(1), entry.string(2))))
            .collect()
    }
}

#[derive(Debug)]
pub enum CriError {
    /// The call never got an answer (connection, HTTP/2, framing, deadline).
    Transport(String),
    /// The runtime answered with a gRPC error.
    Status { code: u32, message: String },
}

impl fmt::Display for CriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CriError::Transport(e) => write!(f, "transport: {e}"),
            CriError::Status { code, message } => write!(f, "gRPC status {code}: {message}"),
        }
    }
}

fn transport(e: impl fmt::Display) -> CriError {
    CriError::Transport(e.to_string())
}

/// grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of a call, from the trailers (or from the headers of a trailers-only answer).
fn grpc_status(headers: &http::HeaderMap) -> Option<Result<(), CriError>> {
    let code: u32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    if code == 0 {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(Err(CriError::Status { code, message }))
}

/// One unary call on a fresh connection: a request message in, the response message out.
async fn unary(socket: &Path, path: &str, message: Vec<u8>) -> Result<Vec<u8>, CriError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| CriError::Transport(format!("connecting to {}: {e}", socket.display())))?;
    let (client, connection) = h2::client::handshake(stream).await.map_err(transport)?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.map_err(transport)?;
    // Authority and scheme are required by HTTP/2; on a unix socket they name nothing.
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(transport)?;
    let (response, mut send) = client.send_request(request, false).map_err(transport)?;
    // Length-prefixed message: compressed flag (0), length (u32, big endian), message.
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    send.send_data(Bytes::from(frame), true)
        .map_err(transport)?;

    let (parts, mut body) = response.await.map_err(transport)?.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(CriError::Transport(format!("HTTP status {}", parts.status)));
    }
    let header_status = grpc_status(&parts.headers);
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(transport)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(transport)?;
    drop(client);
    driver.abort();
    match trailers.as_ref().and_then(grpc_status).or(header_status) {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(e),
        None => return Err(CriError::Transport("answer without grpc-status".into())),
    }
    if data.len() < 5 || data[0] != 0 {
        return Err(CriError::Transport(format!(
            "unexpected response framing ({} bytes)",
            data.len()
        )));
    }
    let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
    data.get(5..5 + len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| CriError::Transport("truncated response message".into()))
}

/// What a pod sandbox is created with (PodSandboxConfig), as kubelet fills it for a pod.
pub struct PodConfig<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub log_directory: &'a Path,
    /// The cgroup (cgroupfs syntax) the runtime puts the pod's containers under; kubelet's
    /// is `/kubepods/<qos>/pod<uid>`. Without one, containerd uses `/<namespace>/<id>`.
    pub cgroup_parent: &'a str,
    /// The node's network namespace (hostNetwork) instead of one of the pod's own.
    pub host_network: bool,
}

/// NamespaceMode values.
const NAMESPACE_CONTAINER: u64 = 1;
const NAMESPACE_NODE: u64 = 2;

impl PodConfig<'_> {
    pub fn encode(&self) -> Pb {
        let mut namespaces = Pb::new()
            // kubelet gives each container its own PID namespace unless the pod shares one.
            .uint(2, NAMESPACE_CONTAINER);
        // A pod on the node's network keeps the node's UTS namespace and hostname (kubelet
        // leaves `hostname` empty for it; runc refuses to set one there).
        let hostname = if self.host_network {
            namespaces = namespaces.uint(1, NAMESPACE_NODE);
            ""
        } else {
            self.name
        };
        Pb::new()
            .msg(
                1,
                Pb::new()
                    .str(1, self.name)
                    .str(2, self.uid)
                    .str(3, self.namespace),
            )
            .str(2, hostname)
            .str(3, &self.log_directory.to_string_lossy())
            .map(6, self.labels)
            .msg(
                8,
                Pb::new()
                    .str(1, self.cgroup_parent)
                    .msg(2, Pb::new().msg(1, namespaces)),
            )
    }
}

/// PodSandboxStatus (with the verbose `info` map).
#[derive(Debug)]
pub struct SandboxStatus {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// SANDBOX_READY = 0, SANDBOX_NOTREADY = 1.
    pub state: u64,
    /// The pod IP the runtime took from the CNI result (empty for host network).
    pub ip: String,
    pub labels: BTreeMap<String, String>,
    /// containerd: `info` is a JSON document with the pid, the runtime spec (namespaces'
    /// paths) and the CNI result.
    pub info: BTreeMap<String, String>,
}

/// ExecSyncResponse.
#[derive(Debug)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A CRI client for one runtime socket; each call opens its own connection.
pub struct Cri {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

const RUNTIME: &str = "runtime.v1.RuntimeService";
const IMAGES: &str = "runtime.v1.ImageService";

impl Cri {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    pub fn call(
        &self,
        service: &str,
        method: &str,
        request: Pb,
        timeout: Duration,
    ) -> Result<Vec<u8>, CriError> {
        let path = format!("/{service}/{method}");
        self.rt.block_on(async {
            tokio::time::timeout(timeout, unary(&self.socket, &path, request.0))
                .await
                .map_err(|_| CriError::Transport(format!("{path}: no answer within {timeout:?}")))?
        })
    }

    fn runtime(&self, method: &str, request: Pb) -> Result<Vec<u8>, CriError> {
        self.call(RUNTIME, method, request, Duration::from_secs(60))
    }

    /// (runtime_name, runtime_version, runtime_api_version)
    pub fn version(&self, timeout: Duration) -> Result<(String, String, String), CriError> {
        let answer = self.call(RUNTIME, "Version", Pb::new().str(1, "v1"), timeout)?;
        let m = Msg::parse(&answer).map_err(CriError::Transport)?;
        Ok((m.string(2), m.string(3), m.string(4)))
    }

    /// ImageStatus: is `image` known to the runtime's CRI image store?
    pub fn image_present(&self, image: &str) -> Result<bool, CriError> {
        let answer = self.call(
            IMAGES,
            "ImageStatus",
            Pb::new().msg(1, Pb::new().str(1, image)),
            Duration::from_secs(30),
        )?;
        let m = Msg::parse(&answer).map_err(CriError::Transport)?;
        Ok(!m
            .message(1)
            .map_err(CriError::Transport)?
            .string(1)
            .is_empty())
    }

    /// RunPodSandbox: the runtime creates the sandbox and its network (CNI ADD).
    pub fn run_pod_sandbox(&self, config: &Pb) -> Result<String, CriError> {
        let answer = self.runtime("RunPodSandbox", Pb::new().msg(1, config.clone()))?;
        Ok(Msg::parse(&answer).map_err(CriError::Transport)?.string(1))
    }

    pub fn pod_sandbox_status(&self, id: &str) -> Result<SandboxStatus, CriError> {
        let answer = self.runtime("PodSandboxStatus", Pb::new().str(1, id).uint(2, 1))?;
        let parse = || -> Result<SandboxStatus, String> {
            let m = Msg::parse(&answer)?;
            let status = m.message(1)?;
            let metadata = status.message(2)?;
            Ok(SandboxStatus {
                id: status.string(1),
                name: metadata.string(1),
                uid: metadata.string(2),
                namespace: metadata.string(3),
                state: status.varint(3),
                ip: status.message(5)?.string(1),
                labels: status.map(7)?,
                info: m.map(2)?,
            })
        };
        parse().map_err(CriError::Transport)
    }

    /// (id, pod name) of every sandbox the runtime has.
    pub fn list_pod_sandboxes(&self) -> Result<Vec<(String, String)>, CriError> {
        let answer = self.runtime("ListPodSandbox", Pb::new())?;
        let parse = || -> Result<Vec<(String, String)>, String> {
            Msg::parse(&answer)?
                .repeated(1)?
                .into_iter()
                .map(|item| Ok((item.string(1), item.message(2)?.string(1))))
                .collect()
        };
        parse().map_err(CriError::Transport)
    }

    /// StopPodSandbox: stops its containers and tears its network down (CNI DEL).
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        self.runtime("StopPodSandbox", Pb::new().str(1, id))
            .map(drop)
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        self.runtime("RemovePodSandbox", Pb::new().str(1, id))
            .map(drop)
    }

    /// CreateContainer in `sandbox` from `image`; `command` replaces the image's entrypoint
    /// when not empty. Its log goes to `<sandbox log_directory>/<name>.log`.
    pub fn create_container(
        &self,
        sandbox: &str,
        sandbox_config: &Pb,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, CriError> {
        let config = Pb::new()
            .msg(1, Pb::new().str(1, name))
            .msg(2, Pb::new().str(1, image))
            .strs(3, command)
            .str(11, &format!("{name}.log"))
            .msg(
                15,
                Pb::new().msg(2, Pb::new().msg(3, Pb::new().uint(2, NAMESPACE_CONTAINER))),
            );
        let request = Pb::new()
            .str(1, sandbox)
            .msg(2, config)
            .msg(3, sandbox_config.clone());
        let answer = self.runtime("CreateContainer", request)?;
        Ok(Msg::parse(&answer).map_err(CriError::Transport)?.string(1))
    }

    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        self.runtime("StartContainer", Pb::new().str(1, id))
            .map(drop)
    }

    /// ExecSync: runs `cmd` in the container, at most `timeout_s` seconds.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_s: u64,
    ) -> Result<ExecResult, CriError> {
        let answer = self.call(
            RUNTIME,
            "ExecSync",
            Pb::new().str(1, id).strs(2, cmd).uint(3, timeout_s),
            Duration::from_secs(timeout_s + 30),
        )?;
        let m = Msg::parse(&answer).map_err(CriError::Transport)?;
        Ok(ExecResult {
            // int32 on the wire: a negative value is sign-extended to 64 bits.
            exit_code: m.varint(3) as i64 as i32,
            stdout: String::from_utf8_lossy(&m.bytes(1)).into_owned(),
            stderr: String::from_utf8_lossy(&m.bytes(2)).into_owned(),
        })
    }
}
