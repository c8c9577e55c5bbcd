//! The local API between moatd and its clients (moat-cni, moatctl): one JSON request per line
//! on a unix socket, one JSON response per line. moatd (the server) and every client link this
//! one crate, so the wire format has a single definition.
//!
//! Blocking and dependency-light on purpose (serde, serde_json, thiserror, and moat-common's
//! constants for the mode and verdict bytes): the CNI plugin runs once per pod start and must
//! pay neither for an async runtime nor for the Kubernetes client that moatd carries.
//!
//! Compatibility across versions (a moat-cni binary on a node may be older or newer than the
//! running moatd): fields added to answers carry `#[serde(default)]`, and an answer kind this
//! build does not know decodes as [`Response::Other`] instead of failing.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

mod explain;
mod fqdn;
pub mod framing;
mod mode;
mod promotion;
mod threat;
mod verdict;
mod verify;

pub use explain::{
    MapEntries, PolicyDocument, ServiceBackend, ServiceTrace, Trace, TracePath, TraceVerdict,
};
pub use fqdn::{FqdnIdentity, FqdnLearned, FqdnSelector};
pub use mode::{EndpointMode, UnknownMode};
pub use promotion::{PromotionAction, PromotionStatus, PromotionStep};
pub use threat::{QuarantineInfo, QuarantineResult, ThreatRecord};
pub use verdict::{Direction, UnknownVerdict, Verdict};
pub use verify::{DRIFT_SAMPLES, DriftEntry, DriftKind, MapDrift, VerifyReport};

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
    /// The daemon's state for operators: readiness, counts, programs, map fill (which walks
    /// every map, so it costs time in proportion to their size).
    Status,
    /// Is the daemon ready to register endpoints? Answered without reading any map: moat-cni
    /// asks it on every pod start.
    Ready,
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
    Flows { filter: FlowFilter },
    /// The effective rules of one pod, per direction, each with the policy rule it came from.
    PolicyGet { pod: String },
    /// NetworkPolicy YAML that allows exactly the flows learn/audit mode observed in a
    /// namespace.
    PolicySuggest {
        namespace: String,
        since_secs: Option<u64>,
    },
    /// Baseline ClusterNetworkPolicy YAML isolating each namespace from the namespaces it was
    /// not seen receiving traffic from.
    PolicySuggestBaseline { since_secs: Option<u64> },
    /// Re-read the datastore now and answer once the result is in the maps (the watcher
    /// does the same on its own; this makes a change's application observable).
    Reload,
    /// A stream: the journal's matching history as one `Flows` line, then every new
    /// matching record as it is journaled (`Flows` lines, an empty one as a heartbeat) and
    /// `FlowsLost` when this client fell behind. Ends when the client disconnects.
    FollowFlows { filter: FlowFilter },
    /// Recent threat detections, oldest first (at most `limit`, the newest).
    Threats {
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Quarantine a pod (`namespace/name`) until released: only the new flows moatd's
    /// `--quarantine-allow` lists leave it, none enter it, and its connections are cut.
    Quarantine { pod: String },
    /// End a manual or detector quarantine (a pod's `moat.io/quarantine` annotation keeps
    /// it quarantined while present).
    Release { pod: String },
    /// FQDN egress: per identity of this node, its name patterns and the addresses the
    /// datapath learned from DNS answers.
    Fqdn,
    /// Compare the maps moatd owns, entry by entry, with the content its datastore asks for
    /// (recomputed from scratch). Read only: moatd's periodic check (`--verify-interval`)
    /// repairs.
    Verify,
    /// Workloads under automatic promotion (MoatPolicy `promotion`); with `policy`
    /// (`namespace/name`), that one, after applying `action` to it.
    Promotion {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
        action: PromotionAction,
    },
}

/// Requests moatd's server answers around the daemon's state rather than inside it; their
/// `op` tags differ from every [`Request`]'s, so one line decodes as exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HostRequest {
    /// Standalone DEL: forget the endpoint exactly like [`Request::Unregister`] (answered with
    /// `Unregistered` once the maps no longer hold it, so the programs still on its veth drop
    /// everything), then delete the host veth in the background. Deleting a veth that carries
    /// TCX programs takes the kernel tens of milliseconds (an RCU grace period per hook under
    /// RTNL, then an RCU barrier before the device is freed), which DEL does not need to wait
    /// for: the veth is isolated from the answer on. moatd sets the link pins aside (they keep
    /// the programs on until the device goes) and deletes the veth by ifindex, only while that
    /// index still has the expected name, so a veth re-created under the same name by a
    /// later ADD is never touched.
    UnregisterAndDeleteLink {
        container_id: String,
        ifname: String,
        host_ifname: String,
        host_ifindex: u32,
    },
}

impl HostRequest {
    /// The daemon-state part of the request.
    pub fn unregister(&self) -> Request {
        match self {
            HostRequest::UnregisterAndDeleteLink {
                container_id,
                ifname,
                ..
            } => Request::Unregister {
                container_id: container_id.clone(),
                ifname: ifname.clone(),
            },
        }
    }
}

/// A client request of either kind, serialized the same way.
pub trait ClientRequest: Serialize {}
impl ClientRequest for Request {}
impl ClientRequest for HostRequest {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub identity: u32,
    pub policy_id: u32,
    pub mode: EndpointMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub spec: EndpointSpec,
    pub identity: u32,
    pub policy_id: u32,
    pub mode: EndpointMode,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Why the endpoint is quarantined; absent when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineInfo>,
}

/// Only `ready` is required on the wire: the rest is informational, so a client decodes the
/// status of a moatd that reports fewer (or more) fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub ready: bool,
    /// Why `ready` is false (waiting for the first sync, for the Node's podCIDR, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    #[serde(default)]
    pub datastore: String,
    #[serde(default)]
    pub endpoints: usize,
    #[serde(default)]
    pub identities: usize,
    #[serde(default)]
    pub policies: usize,
    /// ClusterNetworkPolicies held (Admin and Baseline tiers).
    #[serde(default)]
    pub cluster_policies: usize,
    /// Objects the datastore refused, with the reason; the last good state stays in force.
    #[serde(default)]
    pub rejected: Vec<String>,
    #[serde(default)]
    pub pin_dir: String,
    /// Incremented by every datastore reload that reached the maps.
    #[serde(default)]
    pub generation: u64,
    /// Programs, maps and the event path (absent from a daemon that predates it).
    #[serde(default)]
    pub datapath: Option<DatapathStatus>,
    /// The masquerade of pod egress leaving the cluster (absent from a daemon that predates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<MasqueradeStatus>,
    /// The node's own addresses as moatd follows them: traffic from them is the `host`
    /// identity, which local pods always admit.
    #[serde(default)]
    pub host_addresses: Vec<std::net::IpAddr>,
    /// What does not work as configured, though moatd serves (e.g. rules it could not put in
    /// place). Empty when all is well.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Quarantined pods (namespace/name) and why.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub quarantined: std::collections::BTreeMap<String, QuarantineInfo>,
    /// Threat detection: `on`, `off`, or why it is unavailable.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub threat_detection: String,
    /// FQDN egress settings: the TTL bounds of learned addresses and the cap per identity.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fqdn: String,
    /// Workloads under automatic promotion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promotions: Vec<PromotionStatus>,
}

/// moatd's nftables table that masquerades pod egress leaving the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasqueradeStatus {
    /// Family and name of the table (`inet moat-masquerade`).
    pub table: String,
    /// Off: moatd keeps the table out (`moatd --masquerade`).
    pub enabled: bool,
    /// Sources masqueraded: this node's pod CIDRs. Empty: no table (off, or no podCIDR yet).
    #[serde(default)]
    pub sources: Vec<String>,
    /// Destinations that keep the pod's address: every Node's pod CIDRs, the Service CIDRs
    /// and `--non-masquerade-cidr`.
    #[serde(default)]
    pub kept: Vec<String>,
    /// Why the table is not as it should be (nft missing or refusing); none when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
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
    /// How linked local TCP flows travel: "direct" (the sender's hook delivers them into the
    /// receiving pod) or "host-stack" (`moatd --local-delivery`).
    #[serde(default)]
    pub local_delivery: String,
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
    // Boxed: by far the largest answer, and the rarest.
    Status(Box<DaemonStatus>),
    Ready {
        ready: bool,
        /// Why not ready; absent when ready (and from a moatd that predates it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Endpoints {
        endpoints: Vec<EndpointStatus>,
    },
    Policy {
        document: PolicyDocument,
    },
    Flows {
        flows: Vec<FlowRecord>,
    },
    Trace {
        trace: Trace,
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
    Threats {
        threats: Vec<ThreatRecord>,
    },
    Quarantine(QuarantineResult),
    Fqdn {
        identities: Vec<FqdnIdentity>,
    },
    Verify {
        report: VerifyReport,
    },
    Promotions {
        promotions: Vec<PromotionStatus>,
    },
    /// An answer kind this build does not know (a newer moatd); never sent by moatd.
    #[serde(other)]
    Other,
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
pub fn call(
    socket: &Path,
    request: &impl ClientRequest,
    timeout: Duration,
) -> Result<Response, ClientError> {
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
    let written = stream.write_all(&line);
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    if let Err(e) = written {
        // moatd may have answered and closed before taking the whole request (a refusal:
        // busy, too long, not root); its answer says more than the broken pipe.
        if reader.read_line(&mut answer).is_err() || answer.is_empty() {
            return Err(io(e));
        }
    } else {
        reader.read_line(&mut answer).map_err(io)?;
    }
    if answer.is_empty() {
        return Err(ClientError::Protocol("moatd closed the connection".into()));
    }
    let response: Response = serde_json::from_str(&answer)
        .map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))?;
    if let Response::Error { message } = response {
        return Err(ClientError::Refused(message));
    }
    Ok(response)
}

/// Records a DEL for moatd to process at its next start (moatd down): the file format moatd's
/// queue reader expects. Idempotent per attachment.
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
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&body)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &final_path)?;
    Ok(())
}

// ---- flow history (moatctl flows) ----

/// One explained verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub verdict: Verdict,
    pub reason: String,
    pub direction: Direction,
    pub mode: EndpointMode,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub source_port: u16,
    pub destination_port: u16,
    /// The endpoint whose perimeter decided (namespace/name), when known.
    pub endpoint: Option<String>,
    /// The peer (namespace/name, a reserved identity name, or "world").
    pub peer: Option<String>,
    pub local_identity: u32,
    pub remote_identity: u32,
    pub rule_id: u32,
    /// "namespace/policy direction[index]", "default deny (selected by: ...)", or a reason.
    pub rule: String,
    pub bytes: u32,
}

/// Which records a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// `drop` and `allow` are accepted for dropped and allowed.
    pub verdict: Option<Verdict>,
    /// namespace/name: matches either side.
    pub pod: Option<String>,
    /// Only records newer than this many seconds.
    pub since_secs: Option<u64>,
    /// At most this many (the newest).
    pub limit: Option<usize>,
}

impl FlowFilter {
    pub fn matches(&self, r: &FlowRecord, now: u64) -> bool {
        if self.verdict.is_some_and(|v| v != r.verdict) {
            return false;
        }
        if let Some(pod) = &self.pod
            && r.endpoint.as_deref() != Some(pod)
            && r.peer.as_deref() != Some(pod)
        {
            return false;
        }
        if let Some(secs) = self.since_secs
            && r.time_ms + secs * 1000 < now
        {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact bytes on the wire: moatd, moat-cni builds and queued DEL files on disk all
    /// depend on them, so a serde attribute change must show up here.
    #[test]
    fn requests_have_a_stable_wire_format() {
        assert_eq!(
            serde_json::to_value(Request::Unregister {
                container_id: "c".into(),
                ifname: "eth0".into(),
            })
            .unwrap(),
            serde_json::json!({"op":"unregister","container_id":"c","ifname":"eth0"})
        );
        assert_eq!(
            serde_json::to_value(Request::ListEndpoints).unwrap(),
            serde_json::json!({"op":"list_endpoints"})
        );
        assert_eq!(
            serde_json::to_value(Request::Ready).unwrap(),
            serde_json::json!({"op":"ready"})
        );
        assert_eq!(
            serde_json::from_str::<Response>(r#"{"result":"ready","ready":false}"#).unwrap(),
            Response::Ready {
                ready: false,
                reason: None
            }
        );
        assert_eq!(
            serde_json::to_value(Response::Ready {
                ready: false,
                reason: Some("waiting for Node n1 to get a podCIDR".into())
            })
            .unwrap(),
            serde_json::json!({"result":"ready","ready":false,
                               "reason":"waiting for Node n1 to get a podCIDR"})
        );
        let spec = EndpointSpec {
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            host_ifname: "moat0123456789a".into(),
            host_ifindex: 7,
            ips: vec!["10.1.2.3".parse().unwrap()],
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: None,
        };
        let register = serde_json::to_value(Request::Register {
            endpoint: spec.clone(),
        })
        .unwrap();
        assert_eq!(register["op"], "register");
        assert_eq!(register["endpoint"]["host_ifindex"], 7);
        assert_eq!(register["endpoint"]["ips"], serde_json::json!(["10.1.2.3"]));
        // pod_uid may be absent (older clients).
        let mut without_uid = register["endpoint"].clone();
        without_uid.as_object_mut().unwrap().remove("pod_uid");
        assert_eq!(
            serde_json::from_value::<EndpointSpec>(without_uid).unwrap(),
            spec
        );
    }

    #[test]
    fn host_requests_never_decode_as_daemon_requests() {
        let line = serde_json::to_string(&HostRequest::UnregisterAndDeleteLink {
            container_id: "c".into(),
            ifname: "eth0".into(),
            host_ifname: "moat0123456789a".into(),
            host_ifindex: 9,
        })
        .unwrap();
        assert!(
            line.contains(r#""op":"unregister_and_delete_link""#),
            "{line}"
        );
        assert!(serde_json::from_str::<Request>(&line).is_err());
        let back: HostRequest = serde_json::from_str(&line).unwrap();
        assert_eq!(
            back.unregister(),
            Request::Unregister {
                container_id: "c".into(),
                ifname: "eth0".into()
            }
        );
        let daemon_line = serde_json::to_string(&Request::Status).unwrap();
        assert!(serde_json::from_str::<HostRequest>(&daemon_line).is_err());
    }

    #[test]
    fn answers_from_another_version_still_decode() {
        let status: Response = serde_json::from_str(
            r#"{"result":"status","ready":true,"datastore":"local","endpoints":0,"generation":3}"#,
        )
        .unwrap();
        let Response::Status(status) = status else {
            panic!("status expected")
        };
        assert!(status.ready);
        assert_eq!(status.generation, 3);
        assert!(status.rejected.is_empty());
        let unknown: Response =
            serde_json::from_str(r#"{"result":"something_new","x":1}"#).unwrap();
        assert_eq!(unknown, Response::Other);
        let registered: Response = serde_json::from_str(
            r#"{"result":"registered","identity":5,"policy_id":2,"mode":"enforce"}"#,
        )
        .unwrap();
        assert!(matches!(registered, Response::Registered(r) if r.identity == 5));
    }

    #[test]
    fn queued_del_is_an_unregister_request_on_disk() {
        let dir = std::env::temp_dir().join(format!("moat-api-queue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        queue_pending_unregister(&dir, "cid", "eth0").unwrap();
        queue_pending_unregister(&dir, "cid", "eth0").unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["cid-eth0.json".to_string()]);
        let request: Request =
            serde_json::from_slice(&std::fs::read(dir.join("cid-eth0.json")).unwrap()).unwrap();
        assert_eq!(
            request,
            Request::Unregister {
                container_id: "cid".into(),
                ifname: "eth0".into()
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn call_reports_an_absent_daemon_as_unreachable() {
        let socket =
            std::env::temp_dir().join(format!("moat-api-none-{}.sock", std::process::id()));
        let error = call(&socket, &Request::Status, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(error, ClientError::Unreachable { .. }), "{error}");
    }
}
