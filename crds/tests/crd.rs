//! The CRD and the policy engine agree, and the checked-in YAML is what the code generates.

use std::path::{Path, PathBuf};

use moat_crds::{MoatPolicy, crd_yaml, moatpolicy_schema, unknown_fields};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every YAML document of a file, as JSON values (empty documents skipped).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    moat_policy::yaml::documents(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// The MoatPolicies of examples/ and the policy crate's own MoatPolicy test objects (its
/// unit tests build them from these specs under a fixed header).
fn all_examples() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    yaml_files(&repo().join("examples"), &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in &files {
        for doc in documents(file) {
            if doc["kind"] == "MoatPolicy" {
                out.push((
                    format!("{}: {}", file.display(), doc["metadata"]["name"]),
                    doc,
                ));
            }
        }
    }
    const POLICY_CRATE_BASE: &str =
        "apiVersion: moat.io/v1alpha1\nkind: MoatPolicy\nmetadata: {name: m, namespace: ns1}\n";
    for spec in [
        "spec:\n  podSelector: {matchLabels: {app: pay}}\n  mode: audit\n  defaultDeny: true\n  externalGroups:\n  - {name: payments-api, cidrs: [203.0.113.0/24, 2001:db8::/32]}\n  egress:\n  - to: [{group: payments-api}]\n    ports: [{port: 443}]\n",
        "spec:\n  podSelector: {}\n  mode: learn\n",
        "spec:\n  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [a, b]}]}\n  ingress: []\n",
    ] {
        let text = format!("{POLICY_CRATE_BASE}{spec}");
        out.push((
            format!("policy crate: {spec:?}"),
            moat_policy::yaml::documents(&text).unwrap().remove(0),
        ));
    }
    out
}

#[test]
fn examples_mean_the_same_to_the_crd_and_the_engine() {
    let examples = all_examples();
    assert!(
        examples.len() >= 6,
        "expected the example files and the policy crate's objects, got {}",
        examples.len()
    );
    let schema = moatpolicy_schema();
    for (name, value) in examples {
        // Nothing the API server would prune.
        assert_eq!(
            unknown_fields(&value, &schema),
            Vec::<String>::new(),
            "{name}"
        );
        let engine = moat_policy::MoatPolicy::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{name}: the engine rejects it: {e}"));
        let object: MoatPolicy = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{name}: the CRD type rejects it: {e}"));
        // CRD type -> engine: the same policy as parsing the YAML directly.
        assert_eq!(object.to_policy().unwrap(), engine, "{name}");
        // Engine -> CRD type: the same object, and the same JSON on the wire.
        let back = MoatPolicy::from_policy(&engine).unwrap();
        assert_eq!(back, object, "{name}");
        assert_eq!(
            serde_json::to_value(&back.spec).unwrap(),
            serde_json::to_value(&engine.spec).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn fields_outside_the_schema_are_found() {
    let schema = moatpolicy_schema();
    let value = serde_json::json!({
        "apiVersion": "moat.io/v1alpha1", "kind": "MoatPolicy",
        "metadata": {"name": "typo", "namespace": "a"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "x"}},
            "defaltDeny": true,
            "mode": "strict",
            "egress": [{"to": [{"group": "g", "cidr": "1.2.3.4/32"}]}]
        }
    });
    assert_eq!(
        unknown_fields(&value, &schema),
        vec![
            ".spec.defaltDeny".to_string(),
            ".spec.egress[0].to[0].cidr".to_string(),
            ".spec.mode (value \"strict\" not in enum)".to_string(),
        ]
    );
}

#[test]
fn invalid_objects_are_refused_on_conversion() {
    // Valid for the schema's types, invalid for the engine (an undefined group): conversion
    // fails rather than passing a broken policy on.
    let object: MoatPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "moat.io/v1alpha1", "kind": "MoatPolicy",
        "metadata": {"name": "dangling", "namespace": "a"},
        "spec": {"podSelector": {}, "egress": [{"to": [{"group": "nowhere"}]}]}
    }))
    .unwrap();
    let error = object.to_policy().unwrap_err().to_string();
    assert!(error.contains("nowhere"), "{error}");
}

#[test]
fn every_engine_field_is_in_the_schema() {
    // A policy with every optional field set, serialized by the engine's own types: each
    // key must be described by the schema (a new engine field without a CRD field fails).
    let engine = moat_policy::MoatPolicy::from_value(serde_json::json!({
        "apiVersion": "moat.io/v1alpha1", "kind": "MoatPolicy",
        "metadata": {"name": "all", "namespace": "a"},
        "spec": {
            "podSelector": {"matchLabels": {"a": "b"}, "matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}]},
            "mode": "audit", "defaultDeny": true,
            "externalGroups": [{"name": "g", "cidrs": ["192.0.2.0/24"]}],
            "ingress": [{"from": [{"group": "g"}], "ports": [{"protocol": "UDP", "port": 53, "endPort": 54}]}],
            "egress": [
                {"to": [{"group": "g"}], "ports": [{"port": "dns"}]},
                {"to": [{"fqdn": "*.example.com"}], "ports": [{"port": 443}]}
            ]
        }
    }))
    .unwrap();
    let value = serde_json::to_value(&engine).unwrap();
    assert_eq!(
        unknown_fields(&value, &moatpolicy_schema()),
        Vec::<String>::new()
    );
}

#[test]
fn checked_in_crd_is_generated_from_the_code() {
    let path = repo().join("manifests/crds/moatpolicies.moat.io.yaml");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        checked_in == crd_yaml().unwrap(),
        "{} is stale: run `cargo run -p moat-crds --bin moat-crdgen > manifests/crds/moatpolicies.moat.io.yaml && manifests/build.sh`",
        path.display()
    );
}

#[test]
fn bundle_is_current() {
    let out = std::process::Command::new("bash")
        .arg(repo().join("manifests/build.sh"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "manifests/moat.yaml is stale (run manifests/build.sh):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
