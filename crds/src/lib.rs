//! Moat's custom resources as Rust types, the single source of their CRD schema.
//!
//! [`MoatPolicy`] (moat.io/v1alpha1) derives kube's `CustomResource`: `moat-crdgen` prints its
//! CustomResourceDefinition (checked in as manifests/crds/moatpolicies.moat.io.yaml, with a
//! test that fails when that file is stale), moatd's kubernetes datastore watches it with this
//! type, and [`MoatPolicy::to_policy`] turns it into the policy engine's
//! [`moat_policy::MoatPolicy`]. Tests round-trip every example through both types, so the
//! schema the API server enforces and the object the engine compiles cannot drift apart.
//!
//! Field meanings are documented on the types (the doc comments become the schema's
//! descriptions that `kubectl explain moatpolicy.spec` shows).

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "moat.io";
pub const VERSION: &str = "v1alpha1";
pub const PLURAL: &str = "moatpolicies";
/// The CRD's object name (`<plural>.<group>`).
pub const CRD_NAME: &str = "moatpolicies.moat.io";

/// MoatPolicy sets Moat-specific behaviour for the pods of its namespace that `podSelector`
/// selects: their enforcement mode, a default-deny switch, named groups of external CIDRs, and
/// ingress/egress rules whose peers are those groups (and, for egress, DNS names).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "moat.io",
    version = "v1alpha1",
    kind = "MoatPolicy",
    plural = "moatpolicies",
    singular = "moatpolicy",
    shortname = "mpol",
    category = "moat",
    namespaced,
    derive = "PartialEq",
    doc = "MoatPolicy sets Moat-specific behaviour (enforcement mode, default deny, external CIDR groups and rules over them and over DNS names) for the pods of its namespace that its podSelector selects.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Default-Deny",
        type_ = "boolean",
        json_path = ".spec.defaultDeny"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("!has(self.ingress) || self.ingress.all(r, r.from.all(p, has(self.externalGroups) && self.externalGroups.exists(g, g.name == p.group)))").message("every ingress[].from[].group must name an entry of externalGroups"),
    validation = Rule::new("!has(self.egress) || self.egress.all(r, r.to.all(p, !has(p.group) || (has(self.externalGroups) && self.externalGroups.exists(g, g.name == p.group))))").message("every egress[].to[].group must name an entry of externalGroups"),
    validation = Rule::new("!has(self.promotion) || !has(self.mode)").message("leave mode out with promotion: the promotion's stage is the mode")
)]
#[serde(rename_all = "camelCase")]
pub struct MoatPolicySpec {
    /// Pods of this namespace the policy applies to (a standard label selector). An empty
    /// selector ({}) selects every pod of the namespace.
    pub pod_selector: LabelSelector,
    /// Enforcement mode of the selected pods: enforce (drop what policy does not allow),
    /// audit (allow, but report what enforce would drop), learn (allow and report every new
    /// flow). Same values as the moat.io/mode pod annotation; when several MoatPolicies select
    /// a pod, the strictest mode wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Isolate the selected pods (ingress and egress) even when no NetworkPolicy selects them.
    #[serde(default)]
    pub default_deny: bool,
    /// Named sets of addresses outside the cluster, so that flows and rules can refer to e.g.
    /// "payments-api" rather than raw CIDRs. Names are unique within the policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub external_groups: Vec<ExternalGroup>,
    /// Allowed incoming traffic from external groups. As in NetworkPolicy, a present list
    /// isolates ingress for the selected pods (an empty list allows nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub ingress: Option<Vec<IngressRule>>,
    /// Allowed outgoing traffic to external groups and DNS names. A present list isolates
    /// egress for the selected pods (an empty list allows nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub egress: Option<Vec<EgressRule>>,
    /// Walk the selected pods from learn to audit to enforce on their own: they start in
    /// learn; once no new peer has been seen for learnFor, moatd proposes a NetworkPolicy
    /// allowing exactly what was learned (`moatctl promotion show`) and moves them to audit;
    /// once no flow would have been denied for auditFor, to enforce. Every step is recorded
    /// and can be paused or reverted (`moatctl promotion`). Leave mode out: the stage is the
    /// mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
}

/// Automatic promotion windows.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    /// How long no new peer must be seen before the learned policy is proposed and the pods
    /// move to audit: a number and a unit (s, m, h, d), e.g. 24h.
    #[schemars(regex(pattern = r"^[0-9]{1,8}[smhd]$"))]
    pub learn_for: String,
    /// How long no flow may have been denied (in audit) before the pods move to enforce.
    #[schemars(regex(pattern = r"^[0-9]{1,8}[smhd]$"))]
    pub audit_for: String,
}

/// Enforcement mode.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
    Learn,
}

/// A label selector (metav1.LabelSelector): matchLabels AND matchExpressions.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Label key -> value; every pair must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map_schema")]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements; every one must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One selector requirement: `key` `operator` `values`.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)").message("values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist")
)]
pub struct LabelSelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    pub operator: Operator,
    /// Values for In and NotIn; empty for Exists and DoesNotExist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A named set of external CIDRs.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
pub struct ExternalGroup {
    /// A DNS-1123 label, unique within the policy.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// IPv4 or IPv6 prefixes, e.g. 203.0.113.0/24 or 2001:db8::/32.
    #[schemars(
        length(min = 1, max = 256),
        inner(
            length(max = 49),
            regex(
                pattern = r"^(((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/(3[0-2]|[12]?[0-9])|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))$"
            )
        )
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub cidrs: Vec<String>,
}

/// Incoming traffic allowed from the listed groups, on the listed ports.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
pub struct IngressRule {
    /// Ports and protocols (NetworkPolicyPort); absent or empty means every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub ports: Option<Vec<PolicyPort>>,
    /// Sources: external groups of this policy (at least one).
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub from: Vec<GroupPeer>,
}

/// Outgoing traffic allowed to the listed groups and DNS names, on the listed ports.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.to.filter(p, has(p.fqdn)).size() <= 25").message("at most 25 fqdn peers per rule"),
    validation = Rule::new("!(self.to.exists(p, has(p.fqdn)) && has(self.ports) && self.ports.exists(q, has(q.port) && type(q.port) == string))").message("a named port cannot be used with fqdn peers (DNS names have no container ports)")
)]
pub struct EgressRule {
    /// Ports and protocols (NetworkPolicyPort); absent or empty means every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub ports: Option<Vec<PolicyPort>>,
    /// Destinations: external groups of this policy and DNS names (at least one peer).
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub to: Vec<EgressPeer>,
}

/// An egress destination: exactly one of an external group of the same MoatPolicy (by name)
/// and a DNS name.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.group) != has(self.fqdn)").message("exactly one of group and fqdn must be set")
)]
pub struct EgressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub group: Option<String>,
    /// A DNS name (`api.example.com`) or a wildcard (`*.example.com`: one or more whole labels
    /// before example.com, not example.com itself), as ClusterNetworkPolicy's domainNames.
    /// Case-insensitive; a trailing dot is ignored. The addresses are learned from the DNS
    /// answers the selected pods receive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 254),
        regex(
            pattern = r"^(\*\.)?([a-zA-Z0-9_]([-a-zA-Z0-9_]*[a-zA-Z0-9_])?\.)+[a-zA-Z0-9_]([-a-zA-Z0-9_]*[a-zA-Z0-9_])?\.?$"
        )
    )]
    pub fqdn: Option<String>,
}

/// One external group of the same MoatPolicy, by name.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct GroupPeer {
    #[schemars(length(min = 1, max = 63))]
    pub group: String,
}

/// A port rule, with NetworkPolicyPort's syntax and meaning.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.endPort) || (has(self.port) && type(self.port) == int && self.endPort >= self.port)").message("endPort needs a numeric port and must not be below it")
)]
pub struct PolicyPort {
    /// TCP (the default), UDP or SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// A port number or a named container port; absent means every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// With a numeric `port`: the last port of the range port..endPort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

/// A port number or a port name (Kubernetes' IntOrString).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i32),
    String(String),
}

impl JsonSchema for IntOrString {
    fn schema_name() -> Cow<'static, str> {
        "IntOrString".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // The structural-schema form the API server understands for IntOrString.
        json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

fn label_map_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": 64,
        "additionalProperties": { "type": "string", "maxLength": 63 },
    })
}

/// The MoatPolicy CRD.
pub fn moatpolicy_crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(MoatPolicy::crd()).expect("a CRD serializes");
    drop_null_enum_values(&mut value);
    // Labelled like every Moat manifest. (Not with kube's `label(...)`: that also labels
    // every object `MoatPolicy::new` creates.)
    value["metadata"]["labels"] = serde_json::json!({
        "app.kubernetes.io/name": "moat",
        "app.kubernetes.io/part-of": "moat",
    });
    serde_json::from_value(value).expect("still a CRD")
}

/// The generator lists `null` among the values of an optional enum; the field is already
/// `nullable`, and the API server wants enum values of the declared type.
fn drop_null_enum_values(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(drop_null_enum_values);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_null_enum_values),
        _ => {}
    }
}

/// The openAPIV3Schema of the served version.
pub fn moatpolicy_schema() -> serde_json::Value {
    let crd = serde_json::to_value(moatpolicy_crd()).expect("a CRD serializes");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Paths of `object` the schema does not describe: what the API server would prune (drop
/// silently) from a stored object. Checks object keys against `properties` (or
/// `additionalProperties`), array items against `items`, and string values against `enum`.
pub fn unknown_fields(object: &serde_json::Value, schema: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_unknown(object, schema, "", &mut out);
    out
}

fn walk_unknown(
    value: &serde_json::Value,
    schema: &serde_json::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
    {
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !value.is_null()
        && !allowed.contains(value)
    {
        out.push(format!("{path} (value {value} not in enum)"));
    }
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                // The API server knows these for every object, without the CRD's schema.
                if path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&key.as_str()) {
                    continue;
                }
                match schema
                    .get("properties")
                    .and_then(|p| p.get(key))
                    .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
                {
                    Some(child_schema) => walk_unknown(child, child_schema, &child_path, out),
                    None => out.push(child_path),
                }
            }
        }
        Value::Array(items) => match schema.get("items") {
            Some(item_schema) => {
                for (i, item) in items.iter().enumerate() {
                    walk_unknown(item, item_schema, &format!("{path}[{i}]"), out);
                }
            }
            None => out.push(format!("{path} (array where the schema has none)")),
        },
        _ => {}
    }
}

/// The text of manifests/crds/moatpolicies.moat.io.yaml: a header comment and the CRD.
pub fn crd_yaml() -> anyhow::Result<String> {
    let body = moat_policy::yaml::to_string(&moatpolicy_crd());
    Ok(format!(
        "# MoatPolicy: Moat's own, namespaced policy object (group moat.io).\n\
         # GENERATED by `cargo run -p moat-crds --bin moat-crdgen` from crds/src/lib.rs; do not edit.\n\
         # The schema is structural (every field typed, unknown fields pruned) and validated by\n\
         # the API server, so a malformed object is rejected at `kubectl apply` time.\n\
         {body}"
    ))
}

/// Why a MoatPolicy object cannot become an engine policy.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("MoatPolicy without metadata.name")]
    NoName,
    #[error("{0}")]
    Policy(#[from] moat_policy::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

impl MoatPolicy {
    /// The engine's view of this object: the same spec, and the metadata the engine uses
    /// (name, namespace, labels, annotations). Validated as the engine validates every
    /// MoatPolicy, whatever its source.
    pub fn to_policy(&self) -> Result<moat_policy::MoatPolicy, ConvertError> {
        let meta = &self.metadata;
        let name = meta.name.clone().ok_or(ConvertError::NoName)?;
        let mut metadata = serde_json::json!({ "name": name });
        if let Some(ns) = &meta.namespace {
            metadata["namespace"] = ns.clone().into();
        }
        if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
            metadata["labels"] = serde_json::to_value(labels)?;
        }
        if let Some(annotations) = meta.annotations.as_ref().filter(|a| !a.is_empty()) {
            metadata["annotations"] = serde_json::to_value(annotations)?;
        }
        let value = serde_json::json!({
            "apiVersion": moat_policy::moatpolicy::API_VERSION,
            "kind": moat_policy::moatpolicy::KIND,
            "metadata": metadata,
            "spec": serde_json::to_value(&self.spec)?,
        });
        Ok(moat_policy::MoatPolicy::from_value(value)?)
    }

    /// The custom resource for an engine policy (for clients that create MoatPolicies).
    pub fn from_policy(policy: &moat_policy::MoatPolicy) -> Result<Self, ConvertError> {
        let spec: MoatPolicySpec = serde_json::from_value(serde_json::to_value(&policy.spec)?)?;
        let mut object = MoatPolicy::new(policy.name(), spec);
        object.metadata.namespace = policy.metadata.namespace.clone();
        if !policy.metadata.labels.is_empty() {
            object.metadata.labels = Some(policy.metadata.labels.clone());
        }
        if !policy.metadata.annotations.is_empty() {
            object.metadata.annotations = Some(policy.metadata.annotations.clone());
        }
        Ok(object)
    }
}
