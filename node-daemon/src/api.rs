//! The local API between moatd and its clients (moat-cni, moatctl): one JSON request per line
//! on a unix socket, one JSON response per line. Blocking and dependency-light on purpose: the
//! CNI plugin runs once per pod start and must not pay for an async runtime.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/moat/moatd.sock";

/// Directory where moat-cni leaves DEL requests that could not reach moatd; moatd processes
/// them when it starts, so a pod removed while the daemon is down leaves nothing behind.
pub const DEFAULT_PENDING_DIR: &str = "/var/lib/moat/pending-del";

/// A workload attachment, as moat-cni saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub container_id: String,
    /// Interface name inside the container (CNI_IFNAME).
    pub ifname: String,
    pub netns: String,
    /// Host-side veth that carries the programs.
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ips: Vec<IpAddr>,
    pub pod_namespace: String,
    pub pod_name: String,
    #[serde(default)]
    pub pod_uid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Register an endpoint; answered once its identity, policy and ipcache entries are in
    /// the maps (first packet correct).
    Register { endpoint: EndpointSpec },
    /// Forget an endpoint (idempotent).
    Unregister {
        container_id: String,
        ifname: String,
    },
    /// Is the daemon ready to register endpoints?
    Status,
    /// Everything moatd knows about its endpoints.
    ListEndpoints,
    /// Policy state: identities, rules, rejected objects.
    Policy,
    /// Would a new flow be allowed, and why: computed by the pure engine and cross-checked
    /// against the maps. `from`/`to` are `namespace/pod` or an address.
    Trace {
        from: String,
        to: String,
        port: u16,
        protocol: String,
    },
    /// Flow history from the journal.
    Flows { filter: crate::flows::FlowFilter },
    /// The effective rules of one pod, per direction, each with the policy rule it came from.
    PolicyGet { pod: String },
    /// NetworkPolicy YAML that allows exactly the flows learn/audit mode observed in a
    /// namespace.
    PolicySuggest {
        namespace: String,
        since_secs: Option<u64>,
    },
    /// Re-read the datastore now and answer once the result is in the maps (the watcher
    /// does the same on its own; this makes a change's application observable).
    Reload,
    /// A stream: the journal's matching history as one `Flows` line, then every new
    /// matching record as it is journaled (`Flows` lines, an empty one as a heartbeat) and
    /// `FlowsLost` when this client fell behind. Ends when the client disconnects.
    FollowFlows { filter: crate::flows::FlowFilter },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub identity: u32,
    pub policy_id: u32,
    pub mode: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub spec: EndpointSpec,
    pub identity: u32,
    pub policy_id: u32,
    pub mode: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub ready: bool,
    pub datastore: String,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    /// Objects the datastore refused, with the reason; the last good state stays in force.
    pub rejected: Vec<String>,
    pub pin_dir: String,
    /// Incremented by every datastore reload that reached the maps.
    pub generation: u64,
    /// Programs, maps and the event path (absent from a daemon that predates it).
    #[serde(default)]
    pub datapath: Option<DatapathStatus>,
}

/// What the kernel runs and holds for this installation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStatus {
    /// Map layout version (the `v<N>` of the pin directory).
    pub layout_version: u32,
    /// True when the maps pinned by an earlier moatd were adopted (not created) at start.
    pub maps_adopted: bool,
    /// Pinned endpoint links moved onto this daemon's programs at start.
    pub links_updated: usize,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapFillStatus>,
    pub events: EventLoss,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub name: String,
    /// Kernel program id (changes on every load).
    pub id: u32,
    /// Hash of the instructions, hex (the same build gives the same tag).
    pub tag: String,
    /// When the kernel loaded it (Unix ms), 0 if unknown.
    pub loaded_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFillStatus {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

/// Verdict events not journaled, by where they were lost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLoss {
    /// The kernel's per-CPU token bucket (events/s per CPU and burst) in force.
    pub rate_per_cpu: u32,
    pub burst: u32,
    /// Not emitted: the per-CPU rate limit was exhausted (kernel counter, all CPUs).
    pub rate_limited: u64,
    /// Not emitted: the ring buffer was full, moatd fell behind (kernel counter).
    pub ring_full: u64,
    /// Read from the ring by this daemon since it started.
    pub received: u64,
    /// Read but not written to the journal (write errors).
    pub journal_write_failed: u64,
    /// Journaled but not delivered to a `flows --follow` client that fell behind.
    pub follower_dropped: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Registered(Registered),
    Unregistered {
        found: bool,
    },
    Status(DaemonStatus),
    Endpoints {
        endpoints: Vec<EndpointStatus>,
    },
    Policy {
        document: serde_json::Value,
    },
    Flows {
        flows: Vec<crate::flows::FlowRecord>,
    },
    Trace {
        trace: serde_json::Value,
    },
    PolicyRules {
        rules: Vec<EffectiveRule>,
    },
    Suggestion {
        yaml: String,
    },
    Error {
        message: String,
    },
    /// In a `FollowFlows` stream: this many records were skipped because the client did
    /// not keep up.
    FlowsLost {
        lost: u64,
    },
}

/// One effective rule of a pod (a map entry, explained).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveRule {
    pub direction: String,
    /// "any", "identity 1234 (k=v,...)", or a CIDR.
    pub peer: String,
    pub protocol: String,
    /// "any", "80", or "1000-2000".
    pub ports: String,
    pub action: String,
    pub rule: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("moatd is not reachable at {path}: {source} (is moatd running?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to moatd at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("moatd sent an unreadable answer: {0}")]
    Protocol(String),
    #[error("moatd refused: {0}")]
    Refused(String),
}

/// One request, one response, with a bounded wait.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let unreachable = |source| ClientError::Unreachable {
        path: socket.to_path_buf(),
        source,
    };
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io)?;
    let response: Response = serde_json::from_str(&answer)
        .map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))?;
    if let Response::Error { message } = response {
        return Err(ClientError::Refused(message));
    }
    Ok(response)
}

/// Records a DEL for moatd to process later (moatd down). Idempotent per attachment.
pub fn queue_pending_unregister(
    dir: &Path,
    container_id: &str,
    ifname: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let request = Request::Unregister {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    };
    let body = serde_json::to_vec(&request).map_err(std::io::Error::other)?;
    let final_path = dir.join(format!("{container_id}-{ifname}.json"));
    let tmp = dir.join(format!(".{container_id}-{ifname}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &final_path)?;
    Ok(())
}
