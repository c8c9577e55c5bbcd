//! Turns one invocation (environment + stdin) into stdout bytes and an exit code.
//!
//! All spec checks that do not depend on what the plugin does live here, in the order the
//! reference skel applies them, so a plugin's `add`/`del`/... only see validated requests and a
//! binary's `main` is a single call.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::args::CniArgs;
use super::env::{CniEnvironment, Command, read_command};
use super::error::{CniError, ErrorCode};
use super::types::{NetworkConfig, SuccessResult};
use super::version::{CniVersion, SUPPORTED_VERSIONS, VersionInfo};

/// ADD, DEL or CHECK on one attachment `(container_id, ifname)`.
#[derive(Debug, Clone)]
pub struct AttachmentRequest {
    pub command: Command,
    pub container_id: String,
    pub ifname: String,
    /// Always set for ADD and CHECK; may be absent on DEL (the namespace may be gone).
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS` with `args.cni` from the config applied over it.
    pub args: CniArgs,
    pub cni_path: Vec<PathBuf>,
    pub version: CniVersion,
    pub config: NetworkConfig,
    /// Complete stdin, to hand unchanged to delegated plugins such as IPAM.
    pub raw_config: Vec<u8>,
}

/// STATUS or GC: network-wide, no attachment. For GC, read the live attachments with
/// `config.valid_attachments()`.
#[derive(Debug, Clone)]
pub struct NetworkRequest {
    pub command: Command,
    pub cni_path: Vec<PathBuf>,
    pub version: CniVersion,
    pub config: NetworkConfig,
    pub raw_config: Vec<u8>,
}

/// What a CNI plugin implements. Only `add` produces output; the others succeed silently.
pub trait Plugin {
    fn add(&self, request: &AttachmentRequest) -> Result<SuccessResult, CniError>;
    /// Must be idempotent and best-effort: succeed when things are already gone.
    fn del(&self, request: &AttachmentRequest) -> Result<(), CniError>;
    fn check(&self, request: &AttachmentRequest) -> Result<(), CniError>;
    /// Err with code 50 or 51 when ADD cannot be served.
    fn status(&self, request: &NetworkRequest) -> Result<(), CniError>;
    fn gc(&self, request: &NetworkRequest) -> Result<(), CniError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchOutcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl DispatchOutcome {
    fn success(stdout: Vec<u8>) -> DispatchOutcome {
        DispatchOutcome {
            stdout,
            stderr: Vec::new(),
            exit_code: 0,
        }
    }

    /// Errors go to stdout as JSON (libcni parses stdout); the exit code is 1 like the
    /// reference skel.
    fn failure(error: &CniError, version: &str) -> DispatchOutcome {
        DispatchOutcome {
            stdout: error.to_json(version),
            stderr: Vec::new(),
            exit_code: 1,
        }
    }
}

/// Runs one CNI invocation. `about` is printed to stderr when `CNI_COMMAND` is unset.
pub fn dispatch(
    lookup_env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    plugin: &dyn Plugin,
    about: &str,
) -> DispatchOutcome {
    let command = match read_command(lookup_env) {
        Ok(Some(command)) => command,
        Ok(None) => return about_outcome(about),
        Err(error) => return DispatchOutcome::failure(&error, CniVersion::LATEST.as_str()),
    };
    if command == Command::Version {
        return version_outcome(stdin);
    }

    // Once the config is decoded, errors are written in its version when Moat speaks it.
    let mut reply_version = CniVersion::LATEST;
    match run_command(command, lookup_env, stdin, plugin, &mut reply_version) {
        Ok(stdout) => DispatchOutcome::success(stdout),
        Err(error) => DispatchOutcome::failure(&error, reply_version.as_str()),
    }
}

fn about_outcome(about: &str) -> DispatchOutcome {
    let versions: Vec<&str> = SUPPORTED_VERSIONS.iter().map(|v| v.as_str()).collect();
    DispatchOutcome {
        stdout: Vec::new(),
        stderr: format!(
            "{about}\nCNI protocol versions supported: {}\n",
            versions.join(", ")
        )
        .into_bytes(),
        exit_code: 0,
    }
}

/// VERSION needs nothing but the command; stdin (libcni sends `{"cniVersion": ...}`) only
/// supplies the version to echo, so unreadable or odd input falls back to the latest.
fn version_outcome(stdin: &mut dyn Read) -> DispatchOutcome {
    let mut input = Vec::new();
    let request_version = stdin
        .read_to_end(&mut input)
        .ok()
        .and_then(|_| serde_json::from_slice::<Value>(&input).ok())
        .and_then(|doc| doc.get("cniVersion")?.as_str().map(str::to_string));
    let info = VersionInfo::for_request(request_version.as_deref());
    DispatchOutcome::success(serde_json::to_vec(&info).expect("version info serialises"))
}

fn run_command(
    command: Command,
    lookup_env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    plugin: &dyn Plugin,
    reply_version: &mut CniVersion,
) -> Result<Vec<u8>, CniError> {
    let environment = CniEnvironment::from_lookup(command, lookup_env)?;

    let mut raw_config = Vec::new();
    stdin.read_to_end(&mut raw_config).map_err(|e| {
        CniError::new(ErrorCode::IoFailure, "error reading from stdin").with_details(e.to_string())
    })?;
    let config = NetworkConfig::from_slice(&raw_config)?;
    if let Ok(version) = config.version() {
        *reply_version = version;
    }
    config.validate()?;
    let version = config.version()?;
    require_version_for_command(command, version)?;

    if command.targets_attachment() {
        let request = attachment_request(environment, version, config, raw_config)?;
        if !netns_override(lookup_env) {
            refuse_own_netns(request.netns.as_deref())?;
        }
        match command {
            Command::Add => {
                let result = plugin.add(&request)?;
                Ok(result.convert(version).to_json())
            }
            Command::Del => plugin.del(&request).map(|()| Vec::new()),
            _ => plugin.check(&request).map(|()| Vec::new()),
        }
    } else {
        let request = NetworkRequest {
            command,
            cni_path: environment.path,
            version,
            config,
            raw_config,
        };
        match command {
            Command::Gc => plugin.gc(&request)?,
            _ => plugin.status(&request)?,
        }
        Ok(Vec::new())
    }
}

/// CHECK needs 0.4.0; GC and STATUS need 1.1.0 (code 1 otherwise, as in the reference skel).
fn require_version_for_command(command: Command, version: CniVersion) -> Result<(), CniError> {
    let allowed = match command {
        Command::Check => version.supports_check(),
        Command::Gc | Command::Status => version.supports_gc_and_status(),
        _ => true,
    };
    if allowed {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("config version does not allow {command}"),
        )
        .with_details(format!("config is \"{version}\"")))
    }
}

/// `CNI_NETNS_OVERRIDE=1|true` (any case) skips the own-namespace check, as in the reference
/// skel.
fn netns_override(lookup_env: &dyn Fn(&str) -> Option<String>) -> bool {
    lookup_env("CNI_NETNS_OVERRIDE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false)
}

/// Code 8 when `CNI_NETNS` names the namespace this process runs in: ADD would build the pod
/// interface (or attach enforcement) in the host namespace, and DEL would remove host state.
/// Checked before the plugin runs (the reference skel checks after ADD/DEL, when the damage is
/// done). A path that cannot be inspected is left to the plugin (DEL: the namespace may be
/// gone), so only a positive match refuses.
fn refuse_own_netns(netns: Option<&Path>) -> Result<(), CniError> {
    let Some(netns) = netns else {
        return Ok(());
    };
    if same_namespace(netns, Path::new("/proc/self/ns/net")) {
        return Err(CniError::new(
            ErrorCode::InvalidNetns,
            "plugin's netns and netns from CNI_NETNS should not be the same",
        )
        .with_details(format!(
            "CNI_NETNS={} is the plugin's own network namespace",
            netns.display()
        )));
    }
    Ok(())
}

/// Both paths resolve to the same namespace inode (device and inode number).
fn same_namespace(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn attachment_request(
    environment: CniEnvironment,
    version: CniVersion,
    config: NetworkConfig,
    raw_config: Vec<u8>,
) -> Result<AttachmentRequest, CniError> {
    let mut args = CniArgs::parse(environment.args.as_deref().unwrap_or(""))?;
    args.overlay_config_args(config.args.as_ref());
    Ok(AttachmentRequest {
        command: environment.command,
        // from_lookup guarantees both for ADD/DEL/CHECK.
        container_id: environment.container_id.unwrap_or_default(),
        ifname: environment.ifname.unwrap_or_default(),
        netns: environment.netns,
        args,
        cni_path: environment.path,
        version,
        config,
        raw_config,
    })
}

/// The whole life of a plugin process: reads the real environment and stdin, writes stdout and
/// stderr, and returns the exit code for `std::process::exit`.
pub fn run_as_process(plugin: &dyn Plugin, about: &str) -> i32 {
    let lookup = |name: &str| std::env::var(name).ok();
    let outcome = dispatch(&lookup, &mut std::io::stdin().lock(), plugin, about);
    // If stdout itself is gone there is nobody left to tell; the exit code still reports it.
    let _ = std::io::stdout().write_all(&outcome.stdout);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(&outcome.stderr);
    outcome.exit_code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::IpConfig;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Records what it was asked and answers with a fixed result or error.
    #[derive(Default)]
    struct RecordingPlugin {
        calls: RefCell<Vec<String>>,
        fail_with: Option<CniError>,
    }

    impl RecordingPlugin {
        fn answer(&self, name: &str) -> Result<(), CniError> {
            self.calls.borrow_mut().push(name.to_string());
            match &self.fail_with {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            }
        }
    }

    impl Plugin for RecordingPlugin {
        fn add(&self, request: &AttachmentRequest) -> Result<SuccessResult, CniError> {
            self.answer("add")?;
            let mut result = SuccessResult::new(CniVersion::V1_1_0);
            result.ips.push(IpConfig {
                address: "10.0.0.9/24".parse().unwrap(),
                gateway: None,
                interface: None,
            });
            result.dns.domain = Some(request.container_id.clone());
            Ok(result)
        }
        fn del(&self, _: &AttachmentRequest) -> Result<(), CniError> {
            self.answer("del")
        }
        fn check(&self, _: &AttachmentRequest) -> Result<(), CniError> {
            self.answer("check")
        }
        fn status(&self, _: &NetworkRequest) -> Result<(), CniError> {
            self.answer("status")
        }
        fn gc(&self, request: &NetworkRequest) -> Result<(), CniError> {
            let count = request.config.valid_attachments().map_or(0, |a| a.len());
            self.answer(&format!("gc:{count}"))
        }
    }

    fn run(pairs: &[(&str, &str)], stdin: &str, plugin: &RecordingPlugin) -> DispatchOutcome {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        dispatch(
            &|k| map.get(k).cloned(),
            &mut stdin.as_bytes(),
            plugin,
            "moat test plugin",
        )
    }

    fn attachment_env(command: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "ctr1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
    }

    fn json(outcome: &DispatchOutcome) -> Value {
        serde_json::from_slice(&outcome.stdout).unwrap()
    }

    const CONFIG_1_1: &str = r#"{"cniVersion":"1.1.0","name":"moat","type":"moat-cni"}"#;

    #[test]
    fn add_prints_result_in_the_config_version() {
        let plugin = RecordingPlugin::default();
        let outcome = run(
            &attachment_env("ADD"),
            r#"{"cniVersion":"0.4.0","name":"moat","type":"moat-cni"}"#,
            &plugin,
        );
        assert_eq!(outcome.exit_code, 0);
        let result = json(&outcome);
        assert_eq!(result["cniVersion"], "0.4.0");
        assert_eq!(result["ips"][0]["version"], "4");
        assert_eq!(result["dns"]["domain"], "ctr1");
    }

    #[test]
    fn del_check_status_gc_succeed_with_no_output() {
        for (command, expected_call) in [
            ("DEL", "del"),
            ("CHECK", "check"),
            ("STATUS", "status"),
            ("GC", "gc:0"),
        ] {
            let plugin = RecordingPlugin::default();
            let outcome = run(&attachment_env(command), CONFIG_1_1, &plugin);
            assert_eq!(outcome.exit_code, 0, "{command}");
            assert!(outcome.stdout.is_empty(), "{command}");
            assert_eq!(plugin.calls.borrow().as_slice(), [expected_call]);
        }
    }

    #[test]
    fn gc_sees_the_valid_attachments() {
        let plugin = RecordingPlugin::default();
        let outcome = run(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/bin")],
            r#"{"cniVersion":"1.1.0","name":"moat","cni.dev/valid-attachments":[
                {"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"eth0"}]}"#,
            &plugin,
        );
        assert_eq!(outcome.exit_code, 0);
        assert_eq!(plugin.calls.borrow().as_slice(), ["gc:2"]);
    }

    #[test]
    fn plugin_error_is_printed_on_stdout_in_config_version_with_exit_1() {
        let plugin = RecordingPlugin {
            fail_with: Some(CniError::new(ErrorCode::PluginNotAvailable, "daemon down")),
            ..RecordingPlugin::default()
        };
        let outcome = run(
            &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/bin")],
            CONFIG_1_1,
            &plugin,
        );
        assert_eq!(outcome.exit_code, 1);
        assert_eq!(
            json(&outcome),
            serde_json::json!({"cniVersion":"1.1.0","code":50,"msg":"daemon down"})
        );
    }

    #[test]
    fn unsupported_config_version_is_code_1_and_plugin_is_not_called() {
        let plugin = RecordingPlugin::default();
        let outcome = run(
            &attachment_env("ADD"),
            r#"{"cniVersion":"9.9.9","name":"moat","type":"moat-cni"}"#,
            &plugin,
        );
        assert_eq!(outcome.exit_code, 1);
        let error = json(&outcome);
        assert_eq!(error["code"], 1);
        assert_eq!(error["msg"], "incompatible CNI versions");
        assert!(error["details"].as_str().unwrap().contains("\"9.9.9\""));
        assert!(plugin.calls.borrow().is_empty());
    }

    #[test]
    fn check_below_0_4_and_gc_status_below_1_1_are_code_1() {
        for (command, version) in [("CHECK", "0.3.1"), ("GC", "1.0.0"), ("STATUS", "0.4.0")] {
            let plugin = RecordingPlugin::default();
            let config = format!(r#"{{"cniVersion":"{version}","name":"moat","type":"t"}}"#);
            let outcome = run(&attachment_env(command), &config, &plugin);
            let error = json(&outcome);
            assert_eq!(error["code"], 1, "{command}");
            assert_eq!(
                error["msg"],
                format!("config version does not allow {command}")
            );
            assert!(plugin.calls.borrow().is_empty());
        }
    }

    #[test]
    fn unknown_command_is_code_4() {
        let outcome = run(
            &[("CNI_COMMAND", "FROB")],
            CONFIG_1_1,
            &RecordingPlugin::default(),
        );
        assert_eq!(json(&outcome)["code"], 4);
        assert_eq!(json(&outcome)["msg"], "unknown CNI_COMMAND: FROB");
    }

    #[test]
    fn missing_command_prints_about_to_stderr_and_exits_0() {
        let outcome = run(&[], "", &RecordingPlugin::default());
        assert_eq!(outcome.exit_code, 0);
        assert!(outcome.stdout.is_empty());
        let stderr = String::from_utf8(outcome.stderr).unwrap();
        assert!(stderr.starts_with("moat test plugin\n"));
        assert!(
            stderr.contains("CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0")
        );
    }

    #[test]
    fn version_echoes_request_version_without_other_variables() {
        let outcome = run(
            &[("CNI_COMMAND", "VERSION")],
            r#"{"cniVersion":"1.0.0"}"#,
            &RecordingPlugin::default(),
        );
        assert_eq!(outcome.exit_code, 0);
        assert_eq!(json(&outcome)["cniVersion"], "1.0.0");
        assert_eq!(
            json(&outcome)["supportedVersions"]
                .as_array()
                .unwrap()
                .len(),
            5
        );
    }

    #[test]
    fn version_with_unreadable_stdin_still_answers() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("boom"))
            }
        }
        let outcome = dispatch(
            &|k| (k == "CNI_COMMAND").then(|| "VERSION".to_string()),
            &mut Broken,
            &RecordingPlugin::default(),
            "",
        );
        assert_eq!(outcome.exit_code, 0);
        assert_eq!(json(&outcome)["cniVersion"], "1.1.0");
    }

    #[test]
    fn unreadable_stdin_is_code_5() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("boom"))
            }
        }
        let env: HashMap<&str, &str> = attachment_env("ADD").into_iter().collect();
        let outcome = dispatch(
            &|k| env.get(k).map(|v| v.to_string()),
            &mut Broken,
            &RecordingPlugin::default(),
            "",
        );
        assert_eq!(json(&outcome)["code"], 5);
    }

    #[test]
    fn invalid_json_is_code_6() {
        let outcome = run(&attachment_env("ADD"), "{oops", &RecordingPlugin::default());
        assert_eq!(json(&outcome)["code"], 6);
    }

    #[test]
    fn missing_network_name_is_code_7() {
        let outcome = run(
            &attachment_env("DEL"),
            r#"{"cniVersion":"1.1.0","type":"t"}"#,
            &RecordingPlugin::default(),
        );
        assert_eq!(json(&outcome)["code"], 7);
        assert_eq!(json(&outcome)["msg"], "missing network name");
    }

    #[test]
    fn bad_cni_args_is_code_4_and_args_reach_the_plugin() {
        let mut env = attachment_env("ADD");
        env.push(("CNI_ARGS", "NOPE=1"));
        let outcome = run(&env, CONFIG_1_1, &RecordingPlugin::default());
        assert_eq!(json(&outcome)["code"], 4);
    }

    #[test]
    fn errors_are_stamped_with_the_config_version_when_supported() {
        let plugin = RecordingPlugin {
            fail_with: Some(CniError::new(ErrorCode::TryAgainLater, "busy")),
            ..RecordingPlugin::default()
        };
        let outcome = run(
            &attachment_env("ADD"),
            r#"{"cniVersion":"0.3.1","name":"moat","type":"t"}"#,
            &plugin,
        );
        assert_eq!(json(&outcome)["cniVersion"], "0.3.1");
        assert_eq!(json(&outcome)["code"], 11);
    }
}
