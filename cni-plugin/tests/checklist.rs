//! One test per requirement of cni-plugin/cni-spec-checklist.md that the
//! protocol layer alone decides. Names start with `req_<number>_`; CHECKLIST.md maps the rest.

use std::cell::RefCell;
use std::collections::HashMap;

use moat_cni_protocol::{
    AttachmentRequest, CniError, CniVersion, DispatchOutcome, ErrorCode, Interface, IpConfig,
    NetworkConfig, NetworkRequest, Plugin, Route, SuccessResult, dispatch,
};
use moat_testkit::cni::Exec;
use serde_json::{Value, json};

/// One recorded call: the command, and the request it carried.
type RecordedCall = (String, Option<AttachmentRequest>, Option<NetworkRequest>);

/// Remembers each request and answers ADD with a fixed dual-stack result.
#[derive(Default)]
struct FakePlugin {
    seen: RefCell<Vec<RecordedCall>>,
}

impl FakePlugin {
    fn commands(&self) -> Vec<String> {
        self.seen
            .borrow()
            .iter()
            .map(|(c, _, _)| c.clone())
            .collect()
    }
    fn last_attachment(&self) -> AttachmentRequest {
        self.seen.borrow().last().unwrap().1.clone().unwrap()
    }
    fn last_network(&self) -> NetworkRequest {
        self.seen.borrow().last().unwrap().2.clone().unwrap()
    }
}

impl Plugin for FakePlugin {
    fn add(&self, request: &AttachmentRequest) -> Result<SuccessResult, CniError> {
        self.seen
            .borrow_mut()
            .push(("ADD".into(), Some(request.clone()), None));
        let mut result = SuccessResult::new(CniVersion::V1_1_0);
        result.interfaces = vec![
            Interface {
                name: "lxc0".into(),
                mtu: Some(1500),
                ..Interface::default()
            },
            Interface {
                name: request.ifname.clone(),
                sandbox: request.netns.as_ref().map(|p| p.display().to_string()),
                ..Interface::default()
            },
        ];
        result.ips = vec![
            IpConfig {
                address: "10.1.0.5/16".parse().unwrap(),
                gateway: Some("10.1.0.1".parse().unwrap()),
                interface: Some(1),
            },
            IpConfig {
                address: "fd00::5/64".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            },
        ];
        result.routes = vec![Route::new("0.0.0.0/0".parse().unwrap(), None)];
        Ok(result)
    }
    fn del(&self, request: &AttachmentRequest) -> Result<(), CniError> {
        self.seen
            .borrow_mut()
            .push(("DEL".into(), Some(request.clone()), None));
        Ok(())
    }
    fn check(&self, request: &AttachmentRequest) -> Result<(), CniError> {
        self.seen
            .borrow_mut()
            .push(("CHECK".into(), Some(request.clone()), None));
        Ok(())
    }
    fn status(&self, request: &NetworkRequest) -> Result<(), CniError> {
        self.seen
            .borrow_mut()
            .push(("STATUS".into(), None, Some(request.clone())));
        Ok(())
    }
    fn gc(&self, request: &NetworkRequest) -> Result<(), CniError> {
        self.seen
            .borrow_mut()
            .push(("GC".into(), None, Some(request.clone())));
        Ok(())
    }
}

fn env_for(command: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "ctr1"),
        ("CNI_NETNS", "/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ("CNI_ARGS", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn config(version: &str) -> Value {
    json!({"cniVersion": version, "name": "moat", "type": "moat-cni"})
}

fn run_with(env: &HashMap<String, String>, stdin: &Value, plugin: &FakePlugin) -> DispatchOutcome {
    let bytes = serde_json::to_vec(stdin).unwrap();
    dispatch(
        &|k| env.get(k).cloned(),
        &mut bytes.as_slice(),
        plugin,
        "moat-cni",
    )
}

fn run(command: &str, stdin: &Value) -> (DispatchOutcome, FakePlugin) {
    let plugin = FakePlugin::default();
    let outcome = run_with(&env_for(command), stdin, &plugin);
    (outcome, plugin)
}

fn stdout(outcome: &DispatchOutcome) -> Value {
    serde_json::from_slice(&outcome.stdout).unwrap()
}

#[test]
fn req_01_takes_env_and_stdin_and_writes_result_to_stdout() {
    let (outcome, plugin) = run("ADD", &config("1.1.0"));
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(stdout(&outcome)["cniVersion"], "1.1.0");
    assert_eq!(plugin.last_attachment().container_id, "ctr1");
}

#[test]
fn req_02_exit_code_zero_on_success_non_zero_on_failure() {
    assert_eq!(run("ADD", &config("1.1.0")).0.exit_code, 0);
    assert_ne!(run("ADD", &config("9.9.9")).0.exit_code, 0);
}

#[test]
fn req_03_six_commands_accepted_and_unknown_is_code_4() {
    for command in ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"] {
        assert_eq!(run(command, &config("1.1.0")).0.exit_code, 0, "{command}");
    }
    let (outcome, _) = run("RESET", &config("1.1.0"));
    assert_eq!(stdout(&outcome)["code"], 4);
    assert_eq!(stdout(&outcome)["msg"], "unknown CNI_COMMAND: RESET");
}

#[test]
fn req_04_missing_variables_are_all_named_with_code_4() {
    let cases = [
        ("ADD", "[CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH]"),
        ("CHECK", "[CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH]"),
        ("DEL", "[CNI_CONTAINERID,CNI_IFNAME,CNI_PATH]"),
        ("GC", "[CNI_PATH]"),
        ("STATUS", "[CNI_PATH]"),
    ];
    for (command, names) in cases {
        let env: HashMap<String, String> =
            [("CNI_COMMAND".to_string(), command.to_string())].into();
        let outcome = run_with(&env, &config("1.1.0"), &FakePlugin::default());
        let error = stdout(&outcome);
        assert_eq!(error["code"], 4);
        assert_eq!(
            error["msg"],
            format!("required env variables {names} missing")
        );
    }
}

#[test]
fn req_05_empty_variables_count_as_unset_and_gc_ignores_empty_attachment_vars() {
    let mut env = env_for("GC");
    env.insert("CNI_CONTAINERID".into(), String::new());
    env.insert("CNI_NETNS".into(), String::new());
    env.insert("CNI_IFNAME".into(), String::new());
    assert_eq!(
        run_with(&env, &config("1.1.0"), &FakePlugin::default()).exit_code,
        0
    );

    let mut env = env_for("ADD");
    env.insert("CNI_NETNS".into(), String::new());
    let outcome = run_with(&env, &config("1.1.0"), &FakePlugin::default());
    assert_eq!(
        stdout(&outcome)["msg"],
        "required env variables [CNI_NETNS] missing"
    );
}

#[test]
fn req_05_version_accepts_libcni_dummy_variables() {
    let mut env = env_for("VERSION");
    env.insert("CNI_NETNS".into(), "dummy".into());
    env.insert("CNI_IFNAME".into(), "dummy".into());
    env.insert("CNI_PATH".into(), "dummy".into());
    assert_eq!(
        run_with(
            &env,
            &json!({"cniVersion": "1.1.0"}),
            &FakePlugin::default()
        )
        .exit_code,
        0
    );
}

#[test]
fn req_06_container_id_alphabet_enforced_with_code_4() {
    for bad in ["-ctr", "ctr/1", "ctr 1", "_x"] {
        let mut env = env_for("ADD");
        env.insert("CNI_CONTAINERID".into(), bad.into());
        let outcome = run_with(&env, &config("1.1.0"), &FakePlugin::default());
        assert_eq!(stdout(&outcome)["code"], 4, "{bad}");
    }
    assert_eq!(
        moat_cni_protocol::env::validate_container_id("")
            .unwrap_err()
            .code,
        ErrorCode::UnknownContainer
    );
}

#[test]
fn req_07_unusable_interface_names_are_code_4() {
    for bad in ["", "0123456789abcdef", ".", "..", "a/b", "a:b", "a b"] {
        let mut env = env_for("ADD");
        env.insert("CNI_IFNAME".into(), bad.into());
        let outcome = run_with(&env, &config("1.1.0"), &FakePlugin::default());
        assert_eq!(stdout(&outcome)["code"], 4, "{bad:?}");
    }
}

#[test]
fn req_08_own_netns_is_code_8_before_the_plugin_runs_unless_overridden() {
    // The test process and the dispatcher share a namespace: both paths name it.
    let own_pid = format!("/proc/{}/ns/net", std::process::id());
    for own in ["/proc/self/ns/net", own_pid.as_str()] {
        for command in ["ADD", "DEL", "CHECK"] {
            let mut env = env_for(command);
            env.insert("CNI_NETNS".into(), own.into());
            let mut stdin = config("1.1.0");
            if command == "CHECK" {
                stdin["prevResult"] = json!({"cniVersion": "1.1.0"});
            }
            let plugin = FakePlugin::default();
            let outcome = run_with(&env, &stdin, &plugin);
            assert_eq!(outcome.exit_code, 1, "{command} {own}");
            let error = stdout(&outcome);
            assert_eq!(error["code"], 8, "{command} {own}: {error}");
            assert_eq!(
                error["msg"],
                "plugin's netns and netns from CNI_NETNS should not be the same"
            );
            assert!(plugin.commands().is_empty(), "plugin must not run");
        }
    }
    // CNI_NETNS_OVERRIDE=1/true (skel's escape hatch) lets it through.
    for value in ["1", "true", "TRUE"] {
        let mut env = env_for("ADD");
        env.insert("CNI_NETNS".into(), "/proc/self/ns/net".into());
        env.insert("CNI_NETNS_OVERRIDE".into(), value.into());
        let plugin = FakePlugin::default();
        assert_eq!(run_with(&env, &config("1.1.0"), &plugin).exit_code, 0);
        assert_eq!(plugin.commands(), ["ADD"]);
    }
    // A path that does not exist (DEL after the namespace is gone) is not refused.
    let mut env = env_for("DEL");
    env.insert("CNI_NETNS".into(), "/run/netns/gone-for-good".into());
    let plugin = FakePlugin::default();
    assert_eq!(run_with(&env, &config("1.1.0"), &plugin).exit_code, 0);
    assert_eq!(plugin.commands(), ["DEL"]);
}

#[test]
fn req_08_binary_refuses_its_own_netns_with_code_8() {
    let binary = env!("CARGO_BIN_EXE_moat-cni");
    let run_binary = |netns: &str, override_set: bool| {
        let mut exec = Exec::new(binary, "ADD");
        exec.env_clear()
            .container_id("ctr1")
            .netns(netns)
            .ifname("eth0")
            .path("/opt/cni/bin");
        if override_set {
            exec.env("CNI_NETNS_OVERRIDE", "1");
        }
        let output = exec.run(Some(&config("1.1.0"))).unwrap();
        assert_eq!(output.status.code(), Some(1));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    // /proc/self in the plugin process, and the namespace of its parent (this test).
    let parent = format!("/proc/{}/ns/net", std::process::id());
    for netns in ["/proc/self/ns/net", parent.as_str()] {
        assert_eq!(run_binary(netns, false)["code"], 8, "{netns}");
    }
    // Overridden, the request reaches the plugin (chained without prevResult: 7).
    assert_eq!(run_binary("/proc/self/ns/net", true)["code"], 7);
}

#[test]
fn req_09_cni_args_pod_identity_parsed_and_unknown_keys_need_ignore_unknown() {
    let mut env = env_for("ADD");
    env.insert(
        "CNI_ARGS".into(),
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=ctr1;K8S_POD_UID=u1;EXTRA=x".into(),
    );
    let plugin = FakePlugin::default();
    assert_eq!(run_with(&env, &config("1.1.0"), &plugin).exit_code, 0);
    let args = plugin.last_attachment().args;
    assert_eq!(args.pod_namespace.as_deref(), Some("ns"));
    assert_eq!(args.pod_name.as_deref(), Some("web"));
    assert_eq!(args.pod_uid.as_deref(), Some("u1"));
    assert_eq!(args.pod_infra_container_id.as_deref(), Some("ctr1"));

    env.insert("CNI_ARGS".into(), "EXTRA=x".into());
    assert_ne!(
        run_with(&env, &config("1.1.0"), &FakePlugin::default()).exit_code,
        0
    );
    env.insert("CNI_ARGS".into(), "NOT_A_PAIR".into());
    assert_ne!(
        run_with(&env, &config("1.1.0"), &FakePlugin::default()).exit_code,
        0
    );
}

#[test]
fn req_09_config_args_override_cni_args() {
    let mut env = env_for("ADD");
    env.insert("CNI_ARGS".into(), "K8S_POD_NAME=from-env".into());
    let mut stdin = config("1.1.0");
    stdin["args"] = json!({"cni": {"K8S_POD_NAME": "from-args"}});
    let plugin = FakePlugin::default();
    run_with(&env, &stdin, &plugin);
    assert_eq!(
        plugin.last_attachment().args.pod_name.as_deref(),
        Some("from-args")
    );
}

#[test]
fn req_10_cni_path_is_split_on_colons() {
    let (_, plugin) = run("ADD", &config("1.1.0"));
    let paths: Vec<String> = plugin
        .last_attachment()
        .cni_path
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(paths, ["/opt/cni/bin", "/usr/lib/cni"]);
}

#[test]
fn req_11_no_command_prints_about_to_stderr_and_exits_zero() {
    let outcome = run_with(&HashMap::new(), &json!({}), &FakePlugin::default());
    assert_eq!(outcome.exit_code, 0);
    assert!(outcome.stdout.is_empty());
    assert!(
        String::from_utf8(outcome.stderr)
            .unwrap()
            .contains("CNI protocol versions supported")
    );
}

#[test]
fn req_12_stdin_read_failure_is_code_5_and_bad_json_is_code_6() {
    struct Unreadable;
    impl std::io::Read for Unreadable {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("closed"))
        }
    }
    let env = env_for("ADD");
    let outcome = dispatch(
        &|k| env.get(k).cloned(),
        &mut Unreadable,
        &FakePlugin::default(),
        "",
    );
    assert_eq!(stdout(&outcome)["code"], 5);

    let outcome = dispatch(
        &|k| env.get(k).cloned(),
        &mut &b"{nope"[..],
        &FakePlugin::default(),
        "",
    );
    assert_eq!(stdout(&outcome)["code"], 6);
}

#[test]
fn req_13_missing_or_unsupported_version_is_code_1_with_reference_wording() {
    let (outcome, plugin) = run("ADD", &json!({"name": "moat", "type": "moat-cni"}));
    assert_eq!(stdout(&outcome)["code"], 1);
    assert!(plugin.commands().is_empty());
    let (outcome, _) = run("ADD", &config("9.9.9"));
    let error = stdout(&outcome);
    assert_eq!(error["msg"], "incompatible CNI versions");
    assert_eq!(
        error["details"],
        r#"config is "9.9.9", plugin supports ["0.3.0" "0.3.1" "0.4.0" "1.0.0" "1.1.0"]"#
    );
}

#[test]
fn req_14_missing_or_bad_network_name_is_code_7() {
    for name in [json!(null), json!(""), json!("a/b"), json!("-x")] {
        let mut stdin = config("1.1.0");
        stdin["name"] = name.clone();
        let (outcome, _) = run("DEL", &stdin);
        assert_eq!(stdout(&outcome)["code"], 7, "{name}");
    }
}

#[test]
fn req_15_plugin_type_with_path_separator_is_refused() {
    let mut stdin = config("1.1.0");
    stdin["type"] = json!("../moat-cni");
    assert_eq!(stdout(&run("ADD", &stdin).0)["code"], 7);
}

#[test]
fn req_16_del_succeeds_without_or_with_empty_prev_result() {
    for prev in [None, Some(json!({}))] {
        let mut stdin = config("1.0.0");
        if let Some(prev) = prev {
            stdin["prevResult"] = prev;
        }
        let (outcome, plugin) = run("DEL", &stdin);
        assert_eq!(outcome.exit_code, 0);
        assert_eq!(plugin.last_attachment().config.prev_result().unwrap(), None);
    }
}

#[test]
fn req_17_prev_result_decoded_in_its_version_and_converted_to_request_version() {
    let mut stdin = config("1.1.0");
    stdin["prevResult"] = json!({"cniVersion": "0.4.0",
        "ips": [{"version": "4", "address": "10.0.0.2/24"}]});
    let (_, plugin) = run("CHECK", &stdin);
    let prev = plugin
        .last_attachment()
        .config
        .prev_result()
        .unwrap()
        .unwrap();
    assert_eq!(prev.cni_version, CniVersion::V1_1_0);
    assert_eq!(prev.ips.len(), 1);
}

#[test]
fn req_18_runtime_config_is_optional_and_passed_through() {
    let (outcome, plugin) = run("ADD", &config("1.1.0"));
    assert_eq!(outcome.exit_code, 0);
    assert!(plugin.last_attachment().config.runtime_config.is_none());
    let mut stdin = config("1.1.0");
    stdin["runtimeConfig"] = json!({"portMappings": [{"hostPort": 80}]});
    let (_, plugin) = run("ADD", &stdin);
    assert!(
        plugin
            .last_attachment()
            .config
            .runtime_config
            .unwrap()
            .contains_key("portMappings")
    );
}

#[test]
fn req_19_capabilities_in_request_are_accepted() {
    let mut stdin = config("1.1.0");
    stdin["capabilities"] = json!({"portMappings": true});
    assert_eq!(run("ADD", &stdin).0.exit_code, 0);
}

#[test]
fn req_20_args_object_is_accepted_when_not_understood() {
    let mut stdin = config("1.1.0");
    stdin["args"] = json!({"cni": {"labels": [{"key": "a", "value": "b"}]}, "other": 1});
    assert_eq!(run("ADD", &stdin).0.exit_code, 0);
}

#[test]
fn req_21_ipam_and_dns_keys_are_decoded() {
    let mut stdin = config("1.1.0");
    stdin["ipam"] = json!({"type": "moat-ipam", "ranges": []});
    stdin["dns"] = json!({"nameservers": ["10.96.0.10"]});
    let (_, plugin) = run("ADD", &stdin);
    let config = plugin.last_attachment().config;
    assert_eq!(config.ipam.unwrap().plugin_type, "moat-ipam");
    assert_eq!(config.dns.unwrap().nameservers, ["10.96.0.10"]);
}

#[test]
fn req_22_unknown_keys_pass_through_and_can_be_rejected_with_code_2() {
    let mut stdin = config("1.1.0");
    stdin["someVendorKey"] = json!("v");
    let (outcome, plugin) = run("ADD", &stdin);
    assert_eq!(outcome.exit_code, 0);
    let config = plugin.last_attachment().config;
    assert_eq!(config.plugin_fields["someVendorKey"], "v");
    let err = config.reject_unknown_fields(&[]).unwrap_err();
    assert_eq!(err.code, ErrorCode::UnsupportedField);
    assert!(err.details.unwrap().contains("someVendorKey"));
}

#[test]
fn req_23_gc_request_carries_valid_attachments() {
    let mut stdin = config("1.1.0");
    stdin["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
    let (_, plugin) = run("GC", &stdin);
    let network = plugin.last_network();
    assert_eq!(
        network.config.valid_attachments().unwrap()[0].container_id,
        "a"
    );
}

#[test]
fn req_36_check_below_0_4_0_is_code_1() {
    for version in ["0.3.0", "0.3.1"] {
        let (outcome, plugin) = run("CHECK", &config(version));
        assert_eq!(stdout(&outcome)["code"], 1);
        assert_eq!(
            stdout(&outcome)["msg"],
            "config version does not allow CHECK"
        );
        assert!(plugin.commands().is_empty());
    }
    assert_eq!(run("CHECK", &config("0.4.0")).0.exit_code, 0);
}

#[test]
fn req_41_check_success_prints_nothing() {
    let (outcome, _) = run("CHECK", &config("1.0.0"));
    assert_eq!(outcome.exit_code, 0);
    assert!(outcome.stdout.is_empty());
}

#[test]
fn req_43_status_failure_is_an_error_on_stdout_with_code_50_or_51() {
    struct Down(ErrorCode);
    impl Plugin for Down {
        fn add(&self, _: &AttachmentRequest) -> Result<SuccessResult, CniError> {
            unreachable!()
        }
        fn del(&self, _: &AttachmentRequest) -> Result<(), CniError> {
            unreachable!()
        }
        fn check(&self, _: &AttachmentRequest) -> Result<(), CniError> {
            unreachable!()
        }
        fn status(&self, _: &NetworkRequest) -> Result<(), CniError> {
            Err(CniError::new(self.0, "moatd is not running"))
        }
        fn gc(&self, _: &NetworkRequest) -> Result<(), CniError> {
            unreachable!()
        }
    }
    for code in [
        ErrorCode::PluginNotAvailable,
        ErrorCode::LimitedConnectivity,
    ] {
        let env = env_for("STATUS");
        let bytes = serde_json::to_vec(&config("1.1.0")).unwrap();
        let outcome = dispatch(
            &|k| env.get(k).cloned(),
            &mut bytes.as_slice(),
            &Down(code),
            "",
        );
        assert_eq!(outcome.exit_code, 1);
        assert_eq!(stdout(&outcome)["code"], code.as_u32());
    }
    let (outcome, _) = run("STATUS", &config("1.1.0"));
    assert_eq!(outcome.exit_code, 0);
    assert!(outcome.stdout.is_empty());
}

#[test]
fn req_44_status_needs_only_command_and_path() {
    let env: HashMap<String, String> = [
        ("CNI_COMMAND".to_string(), "STATUS".to_string()),
        ("CNI_PATH".to_string(), "/opt/cni/bin".to_string()),
    ]
    .into();
    let outcome = run_with(
        &env,
        &json!({"cniVersion": "1.1.0", "name": "moat"}),
        &FakePlugin::default(),
    );
    assert_eq!(outcome.exit_code, 0);
}

#[test]
fn req_45_status_below_1_1_0_is_code_1() {
    for version in ["0.4.0", "1.0.0"] {
        assert_eq!(stdout(&run("STATUS", &config(version)).0)["code"], 1);
    }
}

#[test]
fn req_48_version_output_echoes_request_and_lists_supported_versions() {
    let (outcome, plugin) = run("VERSION", &json!({"cniVersion": "0.4.0"}));
    assert_eq!(
        stdout(&outcome),
        json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
    );
    assert!(plugin.commands().is_empty());
}

#[test]
fn req_49_version_needs_only_cni_command() {
    let env: HashMap<String, String> = [("CNI_COMMAND".to_string(), "VERSION".to_string())].into();
    let outcome = run_with(
        &env,
        &json!({"cniVersion": "1.1.0"}),
        &FakePlugin::default(),
    );
    assert_eq!(stdout(&outcome)["cniVersion"], "1.1.0");
}

#[test]
fn req_50_every_listed_version_is_handled_for_add_and_del() {
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let (outcome, _) = run("ADD", &config(version));
        assert_eq!(stdout(&outcome)["cniVersion"], version);
        assert_eq!(run("DEL", &config(version)).0.exit_code, 0);
    }
}

#[test]
fn req_51_gc_reads_valid_attachments_and_falls_back_to_old_key() {
    let mut stdin = config("1.1.0");
    stdin["cni.dev/attachments"] = json!([{"containerID": "old", "ifname": "eth0"}]);
    let (_, plugin) = run("GC", &stdin);
    assert_eq!(
        plugin.last_network().config.valid_attachments().unwrap()[0].container_id,
        "old"
    );
    stdin["cni.dev/valid-attachments"] = json!([{"containerID": "new", "ifname": "eth0"}]);
    let (_, plugin) = run("GC", &stdin);
    assert_eq!(
        plugin.last_network().config.valid_attachments().unwrap()[0].container_id,
        "new"
    );
}

#[test]
fn req_52_gc_needs_cni_path() {
    let env: HashMap<String, String> = [("CNI_COMMAND".to_string(), "GC".to_string())].into();
    let outcome = run_with(&env, &config("1.1.0"), &FakePlugin::default());
    assert_eq!(
        stdout(&outcome)["msg"],
        "required env variables [CNI_PATH] missing"
    );
}

#[test]
fn req_54_gc_without_any_attachment_key_is_distinguishable_from_empty_list() {
    let (_, plugin) = run("GC", &config("1.1.0"));
    assert_eq!(plugin.last_network().config.valid_attachments(), None);
    let mut stdin = config("1.1.0");
    stdin["cni.dev/valid-attachments"] = json!([]);
    let (_, plugin) = run("GC", &stdin);
    assert_eq!(
        plugin.last_network().config.valid_attachments(),
        Some(&[][..])
    );
}

#[test]
fn req_55_gc_success_prints_nothing() {
    let (outcome, _) = run("GC", &config("1.1.0"));
    assert_eq!(outcome.exit_code, 0);
    assert!(outcome.stdout.is_empty());
}

#[test]
fn req_57_gc_below_1_1_0_is_code_1() {
    assert_eq!(stdout(&run("GC", &config("1.0.0")).0)["code"], 1);
}

#[test]
fn req_59_result_uses_the_request_version() {
    for version in ["0.3.0", "0.4.0", "1.0.0"] {
        assert_eq!(
            stdout(&run("ADD", &config(version)).0)["cniVersion"],
            version
        );
    }
}

#[test]
fn req_60_interfaces_list_host_and_sandbox_side() {
    let result = stdout(&run("ADD", &config("1.1.0")).0);
    assert_eq!(result["interfaces"][0]["name"], "lxc0");
    assert!(result["interfaces"][0].get("sandbox").is_none());
    assert_eq!(result["interfaces"][0]["mtu"], 1500);
    assert_eq!(result["interfaces"][1]["sandbox"], "/run/netns/pod");
}

#[test]
fn req_61_ips_keep_interface_index_zero_and_have_no_version_in_1_x() {
    let result = stdout(&run("ADD", &config("1.0.0")).0);
    assert_eq!(result["ips"][1]["interface"], 0);
    assert_eq!(result["ips"][0]["address"], "10.1.0.5/16");
    assert!(result["ips"][0].get("version").is_none());
}

#[test]
fn req_62_route_1_1_fields_are_serialised() {
    let route = Route {
        mtu: Some(1400),
        advmss: Some(1360),
        priority: Some(10),
        table: Some(100),
        scope: Some(253),
        ..Route::new(
            "10.0.0.0/8".parse().unwrap(),
            Some("10.1.0.1".parse().unwrap()),
        )
    };
    assert_eq!(
        serde_json::to_value(&route).unwrap(),
        json!({"dst": "10.0.0.0/8", "gw": "10.1.0.1", "mtu": 1400, "advmss": 1360,
               "priority": 10, "table": 100, "scope": 253})
    );
}

#[test]
fn req_63_empty_dns_is_dropped() {
    assert!(stdout(&run("ADD", &config("1.1.0")).0).get("dns").is_none());
}

#[test]
fn req_64_abbreviated_ipam_result_decodes_without_interfaces() {
    let result = SuccessResult::from_value(
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]}),
        CniVersion::V1_0_0,
    )
    .unwrap();
    assert!(result.interfaces.is_empty());
    assert_eq!(result.ips[0].interface, None);
    assert!(result.to_value()["ips"][0].get("interface").is_none());
}

#[test]
fn req_66_stdout_holds_only_the_json_result() {
    let (outcome, _) = run("ADD", &config("1.1.0"));
    serde_json::from_slice::<Value>(&outcome.stdout).expect("stdout is a single JSON document");
    assert!(outcome.stderr.is_empty());
}

#[test]
fn req_67_1_0_and_1_1_results_differ_only_in_version() {
    let v11 = stdout(&run("ADD", &config("1.1.0")).0);
    let mut v10 = stdout(&run("ADD", &config("1.0.0")).0);
    v10["cniVersion"] = json!("1.1.0");
    assert_eq!(v10, v11);
}

#[test]
fn req_68_down_conversion_below_1_0_adds_ip_version_and_drops_1_1_interface_fields() {
    for version in ["0.3.0", "0.3.1", "0.4.0"] {
        let result = stdout(&run("ADD", &config(version)).0);
        assert_eq!(result["ips"][0]["version"], "4");
        assert_eq!(result["ips"][1]["version"], "6");
        assert!(result["interfaces"][0].get("mtu").is_none());
        assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    }
}

#[test]
fn req_69_conversion_to_0_1_and_0_2_is_refused_as_not_supported() {
    let (_, plugin) = run("ADD", &config("1.1.0"));
    let result = plugin.add(&plugin.last_attachment()).unwrap();
    for version in ["0.1.0", "0.2.0"] {
        assert_eq!(
            result.convert_to(version).unwrap_err().code,
            ErrorCode::IncompatibleVersion
        );
    }
}

#[test]
fn req_70_up_conversion_from_0_x_drops_ip_version() {
    let legacy = json!({"cniVersion": "0.3.0", "interfaces": [{"name": "eth0"}],
        "ips": [{"version": "4", "address": "10.0.0.2/24", "interface": 0}]});
    let upgraded = SuccessResult::from_value(legacy, CniVersion::V0_3_0)
        .unwrap()
        .convert(CniVersion::V1_1_0)
        .to_value();
    assert_eq!(upgraded["cniVersion"], "1.1.0");
    assert!(upgraded["ips"][0].get("version").is_none());
}

#[test]
fn req_71_feature_gates_by_version() {
    assert!(!CniVersion::V0_3_1.supports_check());
    assert!(CniVersion::V0_4_0.supports_check());
    assert!(!CniVersion::V1_0_0.supports_gc_and_status());
    assert!(CniVersion::V1_1_0.supports_gc_and_status());
}

#[test]
fn req_72_any_listed_version_is_accepted_as_request_version() {
    for version in moat_cni_protocol::SUPPORTED_VERSIONS {
        let config = NetworkConfig {
            cni_version: Some(version.as_str().into()),
            name: "moat".into(),
            ..NetworkConfig::default()
        };
        assert_eq!(config.version().unwrap(), version);
    }
}

#[test]
fn req_73_error_document_has_version_code_msg_details() {
    let (outcome, _) = run("ADD", &config("9.9.9"));
    let error = stdout(&outcome);
    let keys: Vec<&str> = error
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4);
    for key in ["cniVersion", "code", "msg", "details"] {
        assert!(keys.contains(&key), "{key}");
    }
}

#[test]
fn req_74_errors_go_to_stdout_with_non_zero_exit() {
    let (outcome, _) = run("BOGUS", &config("1.1.0"));
    assert_ne!(outcome.exit_code, 0);
    assert!(outcome.stderr.is_empty());
    assert_eq!(stdout(&outcome)["code"], 4);
}

#[test]
fn req_75_well_known_codes() {
    let expected = [
        (ErrorCode::IncompatibleVersion, 1),
        (ErrorCode::UnsupportedField, 2),
        (ErrorCode::UnknownContainer, 3),
        (ErrorCode::InvalidEnvironment, 4),
        (ErrorCode::IoFailure, 5),
        (ErrorCode::DecodingFailure, 6),
        (ErrorCode::InvalidNetworkConfig, 7),
        (ErrorCode::TryAgainLater, 11),
        (ErrorCode::PluginNotAvailable, 50),
        (ErrorCode::LimitedConnectivity, 51),
    ];
    for (code, number) in expected {
        assert_eq!(code.as_u32(), number);
    }
}

#[test]
fn req_86_attachment_identity_is_container_id_plus_ifname() {
    let mut env = env_for("ADD");
    env.insert("CNI_IFNAME".into(), "net1".into());
    let plugin = FakePlugin::default();
    run_with(&env, &config("1.1.0"), &plugin);
    let request = plugin.last_attachment();
    assert_eq!(
        (request.container_id.as_str(), request.ifname.as_str()),
        ("ctr1", "net1")
    );
}

#[test]
fn req_48_binary_answers_version_and_chained_add_without_prev_result_is_code_7() {
    let binary = env!("CARGO_BIN_EXE_moat-cni");
    let run_binary = |command: &str, stdin: &Value| {
        Exec::new(binary, command)
            .env_clear()
            .container_id("ctr1")
            .netns("/run/netns/pod")
            .ifname("eth0")
            .path("/opt/cni/bin")
            .run(Some(stdin))
            .unwrap()
    };
    let version = run_binary("VERSION", &json!({"cniVersion": "1.1.0"}));
    assert!(version.status.success());
    let doc: Value = serde_json::from_slice(&version.stdout).unwrap();
    assert_eq!(doc["supportedVersions"].as_array().unwrap().len(), 5);

    let add = run_binary("ADD", &config("1.1.0"));
    assert_eq!(add.status.code(), Some(1));
    let error: Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(error["code"], 7);
    // The real plugin: chained mode (no ipam) without a prevResult cannot work (req 78).
    assert_eq!(
        error["msg"],
        "moat-cni in chained mode requires a prevResult"
    );
}
