//! Client side of moatd's local API (node-daemon/src/api.rs): one JSON request per line on a
//! unix socket, one JSON response per line.
//!
//! Mirrored here rather than linked: moat-cni runs once per pod start and must stay small, and
//! the daemon crate carries the Kubernetes client. Only the fields moat-cni uses are decoded
//! from answers (unknown ones are ignored), so the daemon may grow its types freely.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/moat/moatd.sock";
pub const DEFAULT_PENDING_DIR: &str = "/var/lib/moat/pending-del";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ips: Vec<IpAddr>,
    pub pod_namespace: String,
    pub pod_name: String,
    #[serde(default)]
    pub pod_uid: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Register {
        endpoint: EndpointSpec,
    },
    Unregister {
        container_id: String,
        ifname: String,
    },
    Status,
    ListEndpoints,
}

#[derive(Clone, Debug, Deserialize)]
pub struct EndpointStatus {
    pub spec: EndpointSpec,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DaemonStatus {
    pub ready: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Registered {},
    Unregistered {},
    Status(DaemonStatus),
    Endpoints {
        endpoints: Vec<EndpointStatus>,
    },
    Error {
        message: String,
    },
    #[serde(other)]
    Other,
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

/// One request, one response, each direction bounded by `timeout`.
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

/// Leaves a DEL for moatd to process at its next start (the file format moatd reads).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_matches_moatd() {
        let json = serde_json::to_value(Request::Unregister {
            container_id: "c".into(),
            ifname: "eth0".into(),
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op":"unregister","container_id":"c","ifname":"eth0"})
        );
        assert_eq!(
            serde_json::to_value(Request::ListEndpoints).unwrap(),
            serde_json::json!({"op":"list_endpoints"})
        );
        let status: Response = serde_json::from_str(
            r#"{"result":"status","ready":true,"datastore":"local","endpoints":0,"generation":3}"#,
        )
        .unwrap();
        assert!(matches!(
            status,
            Response::Status(DaemonStatus { ready: true })
        ));
        let other: Response = serde_json::from_str(r#"{"result":"policy","document":{}}"#).unwrap();
        assert!(matches!(other, Response::Other));
    }
}
