//! Runs the real moat-ipam binary the way a runtime does: CNI_* variables and config on stdin.

use std::collections::HashSet;
use std::path::Path;
use std::process::Output;

use moat_testkit::cni::Exec;
use serde_json::{Value, json};

fn network_config(data_dir: &Path, version: &str, extra: Value) -> Value {
    let mut config = json!({
        "cniVersion": version,
        "name": "moat-test",
        "type": "moat-cni",
        "ipam": {
            "type": "moat-ipam",
            "dataDir": data_dir,
            "ranges": [
                [{"subnet": "10.22.0.0/24", "gateway": "10.22.0.1"}],
                [{"subnet": "fd22::/64", "gateway": "fd22::1"}]
            ],
            "routes": [{"dst": "0.0.0.0/0"}]
        }
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    config
}

fn spawn_ipam(command: &str, container_id: &str, config: &Value) -> std::process::Child {
    Exec::new(env!("CARGO_BIN_EXE_moat-ipam"), command)
        .env_clear()
        .container_id(container_id)
        .netns("/run/netns/test")
        .ifname("eth0")
        .path("/opt/cni/bin")
        .args("IgnoreUnknown=1;K8S_POD_NAME=p")
        .spawn(Some(config))
        .expect("moat-ipam binary starts")
}

fn run_ipam(command: &str, container_id: &str, config: &Value) -> Output {
    spawn_ipam(command, container_id, config)
        .wait_with_output()
        .unwrap()
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?} stderr {:?}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn add_check_del_round_trip_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let config = network_config(dir.path(), "1.1.0", json!({}));

    let added = run_ipam("ADD", "ctr-a", &config);
    assert!(added.status.success());
    let result = stdout_json(&added);
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["ips"][0]["address"], "10.22.0.2/24");
    assert_eq!(result["ips"][0]["gateway"], "10.22.0.1");
    assert_eq!(result["ips"][1]["address"], "fd22::2/64");
    assert!(result.get("interfaces").is_none());
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");

    let again = run_ipam("ADD", "ctr-a", &config);
    assert_eq!(stdout_json(&again)["ips"], result["ips"]);

    let check_config = network_config(dir.path(), "1.1.0", json!({"prevResult": result}));
    let checked = run_ipam("CHECK", "ctr-a", &check_config);
    assert!(checked.status.success());
    assert!(checked.stdout.is_empty());

    for _ in 0..2 {
        let deleted = run_ipam("DEL", "ctr-a", &check_config);
        assert!(deleted.status.success(), "DEL is idempotent");
        assert!(deleted.stdout.is_empty());
    }

    let checked = run_ipam("CHECK", "ctr-a", &config);
    assert!(!checked.status.success());
    assert_eq!(stdout_json(&checked)["code"], 101);
}

#[test]
fn add_result_follows_an_older_config_version() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_ipam(
        "ADD",
        "ctr-old",
        &network_config(dir.path(), "0.3.1", json!({})),
    );
    let result = stdout_json(&output);
    assert_eq!(result["cniVersion"], "0.3.1");
    assert_eq!(result["ips"][0]["version"], "4");
    assert_eq!(result["ips"][1]["version"], "6");
}

#[test]
fn del_of_unknown_container_succeeds_without_creating_state() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_ipam(
        "DEL",
        "never-added",
        &network_config(dir.path(), "1.0.0", json!({})),
    );
    assert!(output.status.success());
    assert!(!dir.path().join("moat-test").exists());
}

#[test]
fn version_reports_supported_versions() {
    let output = run_ipam("VERSION", "", &json!({"cniVersion": "1.1.0"}));
    assert!(output.status.success());
    assert_eq!(
        stdout_json(&output),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
    );
}

#[test]
fn concurrent_adds_in_separate_processes_never_share_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = network_config(dir.path(), "1.1.0", json!({}));
    let children: Vec<_> = (0..24)
        .map(|i| spawn_ipam("ADD", &format!("ctr-{i}"), &config))
        .collect();
    let mut seen = HashSet::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
        let result = stdout_json(&output);
        for ip in result["ips"].as_array().unwrap() {
            let address = ip["address"].as_str().unwrap().to_string();
            assert!(seen.insert(address.clone()), "{address} handed out twice");
        }
    }
    assert_eq!(seen.len(), 48);
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("moat-test/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["allocations"].as_array().unwrap().len(), 48);
}

#[test]
fn exhausted_range_fails_add_with_code_100_and_status_with_code_50() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = network_config(dir.path(), "1.1.0", json!({}));
    config["ipam"]["ranges"] = json!([[{"subnet": "10.30.0.0/30", "gateway": "10.30.0.1"}]]);

    assert!(run_ipam("STATUS", "", &config).status.success());
    assert!(run_ipam("ADD", "first", &config).status.success());

    let refused = run_ipam("ADD", "second", &config);
    assert!(!refused.status.success());
    assert_eq!(stdout_json(&refused)["code"], 100);

    let status = run_ipam("STATUS", "", &config);
    assert!(!status.status.success());
    assert_eq!(stdout_json(&status)["code"], 50);
}

#[test]
fn gc_releases_attachments_not_listed_as_valid() {
    let dir = tempfile::tempdir().unwrap();
    let config = network_config(dir.path(), "1.1.0", json!({}));
    for id in ["keep", "stale"] {
        assert!(run_ipam("ADD", id, &config).status.success());
    }
    let gc_config = network_config(
        dir.path(),
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}),
    );
    let output = run_ipam("GC", "", &gc_config);
    assert!(output.status.success());
    assert!(output.stdout.is_empty());

    assert!(run_ipam("CHECK", "keep", &config).status.success());
    assert!(!run_ipam("CHECK", "stale", &config).status.success());
}

#[test]
fn gc_without_attachment_list_releases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = network_config(dir.path(), "1.1.0", json!({}));
    assert!(run_ipam("ADD", "ctr", &config).status.success());
    assert!(run_ipam("GC", "", &config).status.success());
    assert!(run_ipam("CHECK", "ctr", &config).status.success());
}

#[test]
fn corrupt_state_is_reported_as_json_error_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("moat-test")).unwrap();
    std::fs::write(dir.path().join("moat-test/state.json"), b"{\"formatVers").unwrap();
    let output = run_ipam(
        "ADD",
        "ctr",
        &network_config(dir.path(), "1.1.0", json!({})),
    );
    assert!(!output.status.success());
    let error = stdout_json(&output);
    assert_eq!(error["code"], 102);
    assert!(error["details"].as_str().unwrap().contains("state.json"));
}

#[test]
fn invalid_ipam_config_is_code_7() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = network_config(dir.path(), "1.1.0", json!({}));
    config["ipam"]["ranges"] = json!([[{"subnet": "10.0.0.0/24", "gateway": "10.9.9.9"}]]);
    let output = run_ipam("ADD", "ctr", &config);
    assert_eq!(stdout_json(&output)["code"], 7);
}
