//! Delegated IPAM: the plugin named in `ipam.type` is looked up in CNI_PATH and run with the
//! same environment (CNI_COMMAND overridden where needed) and the complete stdin, its stderr
//! going to ours (spec §4).

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use moat_cni_protocol::{CniError, CniVersion, ErrorCode, SuccessResult};

pub struct Delegate<'a> {
    pub plugin_type: &'a str,
    pub cni_path: &'a [PathBuf],
    pub raw_config: &'a [u8],
    pub version: CniVersion,
}

impl Delegate<'_> {
    fn find(&self) -> Result<PathBuf, CniError> {
        if self.plugin_type.is_empty() || self.plugin_type.contains(['/', '\\']) {
            return Err(CniError::invalid_network_config("invalid ipam.type")
                .with_details(self.plugin_type.to_string()));
        }
        self.cni_path
            .iter()
            .map(|dir| dir.join(self.plugin_type))
            .find(|candidate| is_executable(candidate))
            .ok_or_else(|| {
                CniError::invalid_network_config(format!(
                    "failed to find plugin \"{}\" in path",
                    self.plugin_type
                ))
                .with_details(format!("CNI_PATH {:?}", self.cni_path))
            })
    }

    /// Runs the delegate; Ok(stdout) on exit 0, the delegate's own error document otherwise.
    pub fn run(&self, command: &str) -> Result<Vec<u8>, CniError> {
        let binary = self.find()?;
        let mut child = Command::new(&binary)
            .env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                CniError::new(ErrorCode::IoFailure, "failed to run the IPAM plugin")
                    .with_details(format!("{}: {e}", binary.display()))
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A delegate that exits without reading stdin is judged by its exit status.
            let _ = stdin.write_all(self.raw_config);
        }
        let output = child.wait_with_output().map_err(|e| {
            CniError::new(ErrorCode::IoFailure, "failed to wait for the IPAM plugin")
                .with_details(e.to_string())
        })?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        Err(decode_error(&output.stdout, self.plugin_type, command))
    }

    pub fn add(&self) -> Result<SuccessResult, CniError> {
        let stdout = self.run("ADD")?;
        SuccessResult::from_slice(&stdout, self.version)
    }
}

fn decode_error(stdout: &[u8], plugin: &str, command: &str) -> CniError {
    #[derive(serde::Deserialize)]
    struct Wire {
        code: u32,
        msg: String,
        #[serde(default)]
        details: Option<String>,
    }
    match serde_json::from_slice::<Wire>(stdout) {
        Ok(w) => CniError {
            code: ErrorCode::from_u32(w.code),
            msg: w.msg,
            details: w.details,
        },
        Err(_) => CniError::new(
            ErrorCode::Plugin(999),
            format!("IPAM plugin {plugin} failed on {command}"),
        )
        .with_details(String::from_utf8_lossy(stdout).into_owned()),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
