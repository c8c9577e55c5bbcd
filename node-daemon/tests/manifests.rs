//! Static checks of the install manifests (manifests/, examples/), since no API server runs
//! on the build machines: every document parses into its k8s-openapi type with nothing lost
//! (a misspelt field is dropped by the typed parse and reported), the DaemonSet has what
//! issue #7 lists, the ConfigMap, the DaemonSet's arguments and `moatd --help` agree, the
//! probes name real moatctl commands, and RBAC is read-only.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, Pod, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    moat_policy::yaml::documents(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Where `input` has something `output` lacks or holds differently (paths, `.`-separated).
/// Empty maps/lists and nulls in the input may be absent from the output (the types omit
/// them); numbers and their text compare equal (quantities, IntOrString).
fn lost(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => lost(v, w, &p, out),
                    None if v.is_null()
                        || v.as_object().is_some_and(|o| o.is_empty())
                        || v.as_array().is_some_and(|a| a.is_empty()) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (Value::Number(a), Value::String(b)) | (Value::String(b), Value::Number(a))
            if a.to_string() == *b => {}
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        _ => out.push(format!("{path} ({input} became {output})")),
    }
}

/// Parses into `T` and checks that nothing was dropped or changed on the way.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value, name: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{name}: not a valid {}: {e}", std::any::type_name::<T>()));
    let back = serde_json::to_value(&typed).unwrap();
    let mut out = Vec::new();
    lost(doc, &back, "", &mut out);
    assert!(
        out.is_empty(),
        "{name}: fields unknown to the type (typos?): {out:?}"
    );
    typed
}

/// Checks one document by its kind; returns the kind.
fn check_document(doc: &Value, name: &str) -> String {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    match kind.as_str() {
        "Namespace" => drop(strict::<Namespace>(doc, name)),
        "ServiceAccount" => drop(strict::<ServiceAccount>(doc, name)),
        "ClusterRole" => drop(strict::<ClusterRole>(doc, name)),
        "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(doc, name)),
        "Role" => drop(strict::<Role>(doc, name)),
        "RoleBinding" => drop(strict::<RoleBinding>(doc, name)),
        "ConfigMap" => drop(strict::<ConfigMap>(doc, name)),
        "DaemonSet" => drop(strict::<DaemonSet>(doc, name)),
        "CustomResourceDefinition" => drop(strict::<CustomResourceDefinition>(doc, name)),
        "Pod" => drop(strict::<Pod>(doc, name)),
        "NetworkPolicy" => drop(strict::<NetworkPolicy>(doc, name)),
        "MoatPolicy" => drop(strict::<moat_crds::MoatPolicy>(doc, name)),
        "ClusterNetworkPolicy" => {
            drop(strict::<moat_policy::ClusterNetworkPolicy>(doc, name));
            moat_policy::ClusterNetworkPolicy::from_value(doc.clone())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        other => panic!("{name}: no check for kind {other:?}"),
    }
    kind
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_manifest_and_example_parses_into_its_type_without_losing_fields() {
    let mut files = Vec::new();
    yaml_files(&repo().join("manifests"), &mut files);
    yaml_files(&repo().join("examples"), &mut files);
    files.sort();
    let mut kinds = BTreeSet::new();
    let mut count = 0;
    for file in &files {
        for (i, doc) in documents(file).iter().enumerate() {
            kinds.insert(check_document(doc, &format!("{} #{i}", file.display())));
            count += 1;
        }
    }
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
        "CustomResourceDefinition",
        "NetworkPolicy",
        "MoatPolicy",
    ] {
        assert!(kinds.contains(kind), "no {kind} among {count} documents");
    }
}

#[test]
fn a_misspelt_field_is_caught() {
    let doc: Value = moat_policy::yaml::documents(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      hostNetwrk: true\n      containers: [{name: c, image: i}]\n",
    )
    .unwrap()
    .remove(0);
    let result = std::panic::catch_unwind(|| strict::<DaemonSet>(&doc, "typo"));
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert!(
        message.contains(".spec.template.spec.hostNetwrk"),
        "{message}"
    );
}

fn bundle() -> Vec<Value> {
    documents(&repo().join("manifests/moat.yaml"))
}

fn one<T: DeserializeOwned>(docs: &[Value], kind: &str) -> T {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind} in manifests/moat.yaml");
    serde_json::from_value(found[0].clone()).unwrap()
}

#[test]
fn every_object_is_labelled_as_moat() {
    for doc in bundle() {
        let labels = &doc["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "moat", "{}", doc["kind"]);
        assert_eq!(
            labels["app.kubernetes.io/part-of"], "moat",
            "{}",
            doc["kind"]
        );
    }
}

#[test]
fn daemonset_has_what_the_install_needs() {
    let docs = bundle();
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let spec = ds.spec.unwrap();
    let strategy = spec.update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        serde_json::to_value(strategy.rolling_update.unwrap().max_unavailable).unwrap(),
        serde_json::json!(1)
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let sa: ServiceAccount = one(&docs, "ServiceAccount");
    assert_eq!(pod.service_account_name, sa.metadata.name);

    // Host paths.
    let volumes = pod.volumes.clone().unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
            .unwrap_or_else(|| panic!("no hostPath volume {name}"))
    };
    for (volume, path) in [
        ("bpffs", "/sys/fs/bpf"),
        ("cni-bin", "/opt/cni/bin"),
        ("cni-conf", "/etc/cni/net.d"),
        ("state", "/var/lib/moat"),
        ("run", "/run/moat"),
    ] {
        assert_eq!(host_path(volume), path);
    }

    // moatd: not privileged, the capabilities it needs, probes, requests.
    let moatd = pod.containers.iter().find(|c| c.name == "moatd").unwrap();
    let security = moatd.security_context.clone().unwrap();
    assert_eq!(security.privileged, Some(false));
    let caps = security.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    let added: BTreeSet<String> = caps.add.unwrap().into_iter().collect();
    for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN"] {
        assert!(added.contains(cap), "moatd lacks CAP_{cap}");
    }
    assert!(moatd.readiness_probe.is_some() && moatd.liveness_probe.is_some());
    let mounts = moatd.volume_mounts.clone().unwrap();
    for volume in ["bpffs", "state", "run", "cni-conf", "netns"] {
        assert!(
            mounts.iter().any(|m| m.name == volume),
            "moatd lacks {volume}"
        );
    }

    // bpffs mounted on the host with Bidirectional propagation (the one privileged step).
    let inits = pod.init_containers.clone().unwrap();
    let bidirectional: Vec<&str> = inits
        .iter()
        .filter(|c| {
            c.volume_mounts.iter().flatten().any(|m| {
                m.name == "bpffs" && m.mount_propagation.as_deref() == Some("Bidirectional")
            })
        })
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(bidirectional, vec!["mount-bpffs"]);
    // An init container installs the CNI binaries.
    let install = inits.iter().find(|c| c.name == "install-cni").unwrap();
    let script = install.command.clone().unwrap().join(" ");
    assert!(script.contains("moat-cni") && script.contains("/host/opt/cni/bin"));
    assert!(
        install
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "cni-bin")
    );
    assert_ne!(
        install.security_context.clone().unwrap().privileged,
        Some(true)
    );

    // Resource requests everywhere.
    for c in pod.containers.iter().chain(&inits) {
        let requests = c
            .resources
            .clone()
            .and_then(|r| r.requests)
            .unwrap_or_default();
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{} has no cpu/memory requests",
            c.name
        );
    }
}

fn help(binary: &str, args: &[&str]) -> String {
    let out = Command::new(binary).args(args).output().unwrap();
    assert!(out.status.success(), "{binary} {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn configmap_daemonset_arguments_and_moatd_flags_agree() {
    let docs = bundle();
    let cm: ConfigMap = one(&docs, "ConfigMap");
    let data = cm.data.unwrap();
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let moatd = pod.containers.iter().find(|c| c.name == "moatd").unwrap();

    // Every environment variable from the ConfigMap names an existing key, and every key is
    // used.
    let mut used = BTreeSet::new();
    let mut env_names = BTreeSet::new();
    for env in moatd.env.iter().flatten() {
        env_names.insert(env.name.clone());
        if let Some(r) = env
            .value_from
            .as_ref()
            .and_then(|v| v.config_map_key_ref.as_ref())
        {
            assert_eq!(r.name, cm.metadata.name.clone().unwrap());
            assert!(
                data.contains_key(&r.key),
                "env {} reads missing key {}",
                env.name,
                r.key
            );
            used.insert(r.key.clone());
        }
    }
    let keys: BTreeSet<String> = data.keys().cloned().collect();
    assert_eq!(used, keys, "ConfigMap keys the DaemonSet does not use");

    // Every flag exists in moatd, every $(VAR) is defined.
    let moatd_help = help(env!("CARGO_BIN_EXE_moatd"), &["--help"]);
    let args = moatd.args.clone().unwrap();
    assert_eq!(moatd.command.clone().unwrap(), vec!["/usr/local/bin/moatd"]);
    for arg in &args {
        let flag = arg.split('=').next().unwrap();
        assert!(flag.starts_with("--"), "argument {arg} is not --flag=value");
        assert!(
            moatd_help.contains(&format!("{flag} ")),
            "moatd has no {flag}"
        );
        if let Some(start) = arg.find("$(") {
            let var = &arg[start + 2..arg[start..].find(')').unwrap() + start];
            assert!(env_names.contains(var), "{arg}: {var} is not in the env");
        }
    }

    // The values parse as moatd parses them.
    assert!(["kubernetes", "local"].contains(&data["datastore"].as_str()));
    assert!(["standalone", "chained"].contains(&data["cni-mode"].as_str()));
    assert!(["auto", "true", "false"].contains(&data["masquerade"].as_str()));
    assert!(["direct", "host-stack"].contains(&data["local-delivery"].as_str()));
    for cidr in data["service-cidrs"].split(',') {
        cidr.parse::<ipnetwork::IpNetwork>().unwrap();
    }
    for key in [
        "cni-mtu",
        "journal-file-bytes",
        "journal-files",
        "journal-max-age-secs",
        "resync-secs",
    ] {
        data[key]
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    assert_eq!(data["metrics-addr"], moatd::metrics::DEFAULT_ADDR);

    // The probes run moatctl commands that exist.
    let moatctl_help = help(env!("CARGO_BIN_EXE_moatctl"), &["--help"]);
    for probe in [
        &moatd.readiness_probe,
        &moatd.liveness_probe,
        &moatd.startup_probe,
    ] {
        let command = probe
            .clone()
            .unwrap()
            .exec
            .unwrap()
            .command
            .unwrap()
            .join(" ");
        assert!(command.contains("/usr/local/bin/moatctl") && command.contains("status"));
        assert!(
            command.contains("--socket /run/moat/moatd.sock"),
            "{command}"
        );
    }
    assert!(moatctl_help.contains("status"));
    assert!(help(env!("CARGO_BIN_EXE_moatctl"), &["status", "--help"]).contains("Usage"));
}

#[test]
fn rbac_reads_what_moatd_watches_writes_only_statuses_and_creates_events() {
    let docs = bundle();
    let role: ClusterRole = one(&docs, "ClusterRole");
    let mut covered = BTreeSet::new();
    for rule in role.rules.unwrap() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        let resources = rule.resources.clone().unwrap_or_default();
        // The one write: clearing the Node's NetworkUnavailable condition (PATCH
        // nodes/<name>/status), in a rule of its own so it cannot widen to anything else.
        if resources == ["nodes/status"] {
            assert_eq!(verbs, BTreeSet::from(["patch"]));
        } else if resources == ["clusternetworkpolicies/status"] {
            // The Accepted condition on each ClusterNetworkPolicy (issue 17), its status only.
            assert_eq!(verbs, BTreeSet::from(["patch", "update"]));
        } else if resources == ["events"] {
            // Threat detections as Warning Events on the pod (issue 18): create only.
            assert_eq!(verbs, BTreeSet::from(["create"]));
        } else {
            assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]));
        }
        for group in rule.api_groups.iter().flatten() {
            for res in &resources {
                covered.insert(format!("{group}/{res}"));
            }
        }
    }
    let needed: BTreeSet<String> = [
        "/pods",
        "/namespaces",
        "/nodes",
        "/nodes/status",
        "/events",
        "networking.k8s.io/networkpolicies",
        "moat.io/moatpolicies",
        "policy.networking.k8s.io/clusternetworkpolicies",
        "policy.networking.k8s.io/clusternetworkpolicies/status",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(covered, needed);
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let sa: ServiceAccount = one(&docs, "ServiceAccount");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(Some(subject.name.clone()), sa.metadata.name);
    assert_eq!(subject.namespace, sa.metadata.namespace);
    // Beyond that, one object may be read: kindnet's DaemonSet (chained mode checks whether
    // kindnet enforces NetworkPolicy itself), by name, in its namespace, get only.
    let role: Role = one(&docs, "Role");
    let (kindnet_ns, kindnet_name) = moatd::install::KINDNET_DAEMONSET;
    assert_eq!(role.metadata.namespace.as_deref(), Some(kindnet_ns));
    let rules = role.rules.clone().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0].api_groups, Some(vec!["apps".to_string()]));
    assert_eq!(rules[0].resources, Some(vec!["daemonsets".to_string()]));
    assert_eq!(
        rules[0].resource_names,
        Some(vec![kindnet_name.to_string()])
    );
    assert_eq!(rules[0].verbs, vec!["get".to_string()]);
    let role_binding: RoleBinding = one(&docs, "RoleBinding");
    assert_eq!(role_binding.metadata.namespace, role.metadata.namespace);
    assert_eq!(role_binding.role_ref.kind, "Role");
    assert_eq!(Some(role_binding.role_ref.name.clone()), role.metadata.name);
    let subjects = role_binding.subjects.clone().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(subjects[0].name.clone()), sa.metadata.name);
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    // The MoatPolicy CRD in the bundle is the generated one.
    let crds: Vec<CustomResourceDefinition> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .collect();
    assert_eq!(crds.len(), 2, "MoatPolicy and ClusterNetworkPolicy");
    let moat = crds
        .iter()
        .find(|c| c.spec.group == "moat.io")
        .expect("MoatPolicy CRD");
    assert_eq!(moat, &moat_crds::moatpolicy_crd());
}

/// The ClusterNetworkPolicy CRD (upstream's, issue 17): cluster-scoped, both versions moatd
/// may watch served with a status subresource, v1beta1 stored, and the two versions' schemas
/// the same (moat_policy::cnp reads them alike, so no conversion is needed).
#[test]
fn cluster_network_policy_crd_serves_both_versions_with_status() {
    let crd: CustomResourceDefinition = serde_json::from_value(
        documents(
            &repo().join("manifests/crds/clusternetworkpolicies.policy.networking.k8s.io.yaml"),
        )
        .remove(0),
    )
    .unwrap();
    assert_eq!(crd.spec.group, moat_policy::cnp::API_GROUP);
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.plural, "clusternetworkpolicies");
    assert_eq!(crd.spec.names.kind, "ClusterNetworkPolicy");
    let versions: Vec<(&str, bool, bool)> = crd
        .spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.served, v.storage))
        .collect();
    assert_eq!(
        versions,
        vec![("v1beta1", true, true), ("v1alpha2", true, false)]
    );
    for v in &crd.spec.versions {
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{} has no status subresource",
            v.name
        );
        let full = |name: &str| format!("{}/{name}", moat_policy::cnp::API_GROUP);
        assert!(moat_policy::cnp::API_VERSIONS.contains(&full(&v.name).as_str()));
    }
    assert_eq!(crd.spec.versions[0].schema, crd.spec.versions[1].schema);
}

/// What each container may hold beyond "drop ALL" (issue 16 item 8). The reasons live in
/// manifests/daemonset.yaml as `# CAP_<NAME>: ...` comments right above each added
/// capability; this table fixes the set, so adding one means editing both.
const ADDED_CAPABILITIES: [(&str, &[&str]); 2] = [
    ("moatd", &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"]),
    // uid 0 owning /opt/cni/bin is enough to write, chmod and rename there.
    ("install-cni", &[]),
];
/// Containers that may be privileged (and so carry no capability list), and why.
const PRIVILEGED: [(&str, &str); 1] = [(
    "mount-bpffs",
    "mounts bpffs on the host: Bidirectional propagation is only allowed when privileged",
)];

#[test]
fn pod_security_drops_all_capabilities_and_says_why_each_added_one_is_held() {
    let docs = bundle();
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let containers: Vec<_> = pod
        .init_containers
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(pod.containers.clone())
        .collect();
    let source = std::fs::read_to_string(repo().join("manifests/daemonset.yaml")).unwrap();
    let lines: Vec<&str> = source.lines().collect();

    let mut seen = BTreeSet::new();
    for c in &containers {
        seen.insert(c.name.clone());
        let sc = c
            .security_context
            .clone()
            .unwrap_or_else(|| panic!("{}: no securityContext", c.name));
        // The SELinux type of privileged networking agents, on every container.
        assert_eq!(
            sc.se_linux_options.and_then(|o| o.type_).as_deref(),
            Some("spc_t"),
            "{}: seLinuxOptions.type",
            c.name
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{}: writable root filesystem",
            c.name
        );
        if sc.privileged == Some(true) {
            assert!(
                PRIVILEGED.iter().any(|(name, _)| *name == c.name),
                "{} is privileged but not in PRIVILEGED",
                c.name
            );
            assert!(
                sc.capabilities.is_none(),
                "{}: a capability list on a privileged container means nothing",
                c.name
            );
            continue;
        }
        let caps = sc
            .capabilities
            .unwrap_or_else(|| panic!("{}: no capabilities", c.name));
        assert_eq!(
            caps.drop,
            Some(vec!["ALL".to_string()]),
            "{}: must drop ALL",
            c.name
        );
        let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
        let allowed = ADDED_CAPABILITIES
            .iter()
            .find(|(name, _)| *name == c.name)
            .unwrap_or_else(|| panic!("{}: not in ADDED_CAPABILITIES", c.name))
            .1;
        let allowed: BTreeSet<String> = allowed.iter().map(|s| s.to_string()).collect();
        assert_eq!(added, allowed, "{}: added capabilities", c.name);
        // The API server refuses allowPrivilegeEscalation=false next to SYS_ADMIN; otherwise
        // it must be off.
        if !added.contains("SYS_ADMIN") {
            assert_eq!(
                sc.allow_privilege_escalation,
                Some(false),
                "{}: allowPrivilegeEscalation",
                c.name
            );
        }
        for cap in &added {
            // `- CAP` list items, each directly under a comment block naming CAP_<CAP>.
            let items: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.trim() == format!("- {cap}"))
                .map(|(i, _)| i)
                .collect();
            assert!(
                !items.is_empty(),
                "{}: {cap} is not a `- {cap}` list item in manifests/daemonset.yaml",
                c.name
            );
            for i in items {
                let comment: Vec<&str> = lines[..i]
                    .iter()
                    .rev()
                    .take_while(|l| l.trim_start().starts_with('#'))
                    .copied()
                    .collect();
                assert!(
                    comment
                        .iter()
                        .any(|l| l.contains(&format!("# CAP_{cap}: "))),
                    "manifests/daemonset.yaml:{}: {cap} has no `# CAP_{cap}: why` comment above it",
                    i + 1
                );
            }
        }
    }
    for name in ADDED_CAPABILITIES
        .iter()
        .map(|(n, _)| *n)
        .chain(PRIVILEGED.iter().map(|(n, _)| *n))
    {
        assert!(seen.contains(name), "no container {name}");
    }
}
