//! moat-cni's input parsing end to end: the bytes are `CNI_ARGS`, a NUL, then stdin (the
//! network configuration); the first byte picks the command. Each invocation goes through the
//! real dispatcher (environment checks, config decoding and validation, version checks,
//! CNI_ARGS, prevResult, valid-attachments) into a plugin that reads Moat's own keys and
//! answers ADD with the decoded prevResult or a fresh result.
//!
//! Properties: nothing panics; the exit code is 0 or 1; a failure prints one JSON error
//! document with a numeric code and a non-empty message; a successful ADD prints a result that
//! decodes again in its own cniVersion; whatever Moat config is accepted has sane values.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_cni::config::{MAX_PREFIX_LEN, MoatConfig, Mode};
use moat_cni_protocol::{
    AttachmentRequest, CniError, NetworkRequest, Plugin, SuccessResult, dispatch::dispatch,
};
use serde_json::Value;

struct ParseOnly;

fn check_moat_config(config: &moat_cni_protocol::NetworkConfig) -> Result<MoatConfig, CniError> {
    let moat = MoatConfig::from_network(config)?;
    assert!((68..=65535).contains(&moat.mtu));
    assert!(!moat.timeout.is_zero());
    assert!(!moat.host_veth_prefix.is_empty() && moat.host_veth_prefix.len() <= MAX_PREFIX_LEN);
    let name = moat.host_veth_name("container", "eth0");
    assert_eq!(name.len(), 15);
    assert!(name.starts_with(&moat.host_veth_prefix));
    if moat.mode == Mode::Standalone {
        assert!(
            config
                .ipam
                .as_ref()
                .is_some_and(|i| !i.plugin_type.is_empty())
        );
    }
    Ok(moat)
}

impl Plugin for ParseOnly {
    fn add(&self, request: &AttachmentRequest) -> Result<SuccessResult, CniError> {
        check_moat_config(&request.config)?;
        let prev = request.config.prev_result()?;
        Ok(prev.unwrap_or_else(|| SuccessResult::new(request.version)))
    }
    fn del(&self, request: &AttachmentRequest) -> Result<(), CniError> {
        check_moat_config(&request.config)?;
        request.config.prev_result()?;
        Ok(())
    }
    fn check(&self, request: &AttachmentRequest) -> Result<(), CniError> {
        check_moat_config(&request.config)?;
        request.config.prev_result()?;
        Ok(())
    }
    fn status(&self, request: &NetworkRequest) -> Result<(), CniError> {
        check_moat_config(&request.config).map(|_| ())
    }
    fn gc(&self, request: &NetworkRequest) -> Result<(), CniError> {
        check_moat_config(&request.config)?;
        if let Some(valid) = request.config.valid_attachments() {
            for a in valid {
                let _ = (a.container_id.len(), a.ifname.len());
            }
        }
        Ok(())
    }
}

const COMMANDS: [&str; 7] = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "BOGUS"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let command = COMMANDS[selector as usize % COMMANDS.len()];
    let (args, stdin) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&[][..], rest),
    };
    let args = String::from_utf8_lossy(args).into_owned();
    let env = move |key: &str| -> Option<String> {
        Some(match key {
            "CNI_COMMAND" => command.to_string(),
            "CNI_CONTAINERID" => "fuzz-container".to_string(),
            "CNI_NETNS" => "/run/netns/fuzz".to_string(),
            "CNI_IFNAME" => "eth0".to_string(),
            "CNI_PATH" => "/opt/cni/bin".to_string(),
            "CNI_ARGS" => args.clone(),
            _ => return None,
        })
    };
    let mut input = stdin;
    let outcome = dispatch(&env, &mut input, &ParseOnly, "fuzz");
    match outcome.exit_code {
        0 => {
            if command == "ADD" {
                let result: Value =
                    serde_json::from_slice(&outcome.stdout).expect("ADD success prints JSON");
                let version = result["cniVersion"]
                    .as_str()
                    .expect("result has cniVersion");
                let version = moat_cni_protocol::CniVersion::parse_supported(version)
                    .expect("result in a supported version");
                SuccessResult::from_slice(&outcome.stdout, version)
                    .expect("a printed result decodes again");
            }
        }
        1 => {
            let error: Value =
                serde_json::from_slice(&outcome.stdout).expect("errors print JSON on stdout");
            assert!(error["code"].as_u64().is_some(), "{error}");
            assert!(
                error["msg"].as_str().is_some_and(|m| !m.is_empty()),
                "{error}"
            );
        }
        other => panic!("exit code {other}"),
    }
});
