//! The shared case file (`netpol-cases/v1`): the model (namespaces, pods, labels) and the
//! cases (served ports, label changes, policies, probes). Fields this runner does not need
//! (truth tables, sources, notes) are ignored, so any file of the format loads.

use std::{collections::BTreeMap, fmt, path::Path};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
pub struct CaseFile {
    pub model: Model,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Model {
    pub namespaces: BTreeMap<String, NamespaceModel>,
    pub pods: BTreeMap<String, PodModel>,
    #[serde(default)]
    pub pod_order: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct NamespaceModel {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodModel {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ip_placeholder: Option<String>,
    /// Container ports the case file names itself (e.g. upstream's `web` for 80/TCP), for
    /// named-port policies; empty means the runner's `serve-<port>-<proto>` names only.
    #[serde(default)]
    pub ports: Vec<NamedPort>,
}

/// One named container port of a model pod (`model.pods.*.ports[]`).
#[derive(Clone, Debug, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Proto,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Case {
    pub id: String,
    pub name: String,
    pub served_ports: ServedPorts,
    #[serde(default)]
    pub label_changes: LabelChanges,
    #[serde(default)]
    pub policies: Vec<Value>,
    pub probes: Vec<Probe>,
    /// Set when this runner cannot express the case (e.g. a probe to a node address): its
    /// probes are reported as skipped with this reason, never silently dropped.
    #[serde(default)]
    pub skip: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ServedPorts {
    pub ports: Vec<u16>,
    pub protocols: Vec<Proto>,
}

impl ServedPorts {
    pub fn pairs(&self) -> impl Iterator<Item = (u16, Proto)> + '_ {
        self.ports
            .iter()
            .flat_map(|p| self.protocols.iter().map(move |proto| (*p, *proto)))
    }
}

/// Label changes merged onto the model's labels; a null value removes the label.
#[derive(Debug, Default, Deserialize)]
pub struct LabelChanges {
    #[serde(default)]
    pub namespaces: BTreeMap<String, BTreeMap<String, Option<String>>>,
    #[serde(default)]
    pub pods: BTreeMap<String, BTreeMap<String, Option<String>>>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Proto,
    pub expect: bool,
    #[serde(default)]
    pub loopback: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
    pub fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
    pub fn policy(self) -> moat_policy::Protocol {
        match self {
            Proto::Tcp => moat_policy::Protocol::TCP,
            Proto::Udp => moat_policy::Protocol::UDP,
            Proto::Sctp => moat_policy::Protocol::SCTP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl CaseFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading cases file {}", path.display()))?;
        let mut file: CaseFile = serde_json::from_str(&text)
            .with_context(|| format!("parsing cases file {}", path.display()))?;
        if file.model.pod_order.is_empty() {
            file.model.pod_order = file.model.pods.keys().cloned().collect();
        }
        file.validate()?;
        Ok(file)
    }

    fn validate(&self) -> Result<()> {
        for key in &self.model.pod_order {
            let Some(pod) = self.model.pods.get(key) else {
                bail!("podOrder names {key}, which is not in model.pods");
            };
            if !self.model.namespaces.contains_key(&pod.namespace) {
                bail!(
                    "pod {key} is in namespace {}, which is not in model.namespaces",
                    pod.namespace
                );
            }
        }
        for (key, pod) in &self.model.pods {
            let mut seen = std::collections::BTreeSet::new();
            for p in &pod.ports {
                if p.name.is_empty() || p.name.len() > 15 || p.port == 0 {
                    bail!(
                        "pod {key}: bad named port {} ({}/{})",
                        p.name,
                        p.port,
                        p.protocol
                    );
                }
                if !seen.insert(p.name.as_str()) {
                    bail!("pod {key}: port name {} given twice", p.name);
                }
            }
        }
        for case in &self.cases {
            for probe in &case.probes {
                for end in [&probe.from, &probe.to] {
                    if !self.model.pods.contains_key(end) {
                        bail!("case {}: probe names unknown pod {end}", case.id);
                    }
                }
            }
            for pod in case.label_changes.pods.keys() {
                if !self.model.pods.contains_key(pod) {
                    bail!("case {}: labelChanges names unknown pod {pod}", case.id);
                }
            }
            for ns in case.label_changes.namespaces.keys() {
                if !self.model.namespaces.contains_key(ns) {
                    bail!(
                        "case {}: labelChanges names unknown namespace {ns}",
                        case.id
                    );
                }
            }
        }
        Ok(())
    }

    /// Every (port, protocol) any case serves, so that every pod offers the same named
    /// container ports in every case.
    pub fn served_union(&self) -> Vec<(u16, Proto)> {
        let mut all: Vec<(u16, Proto)> = self
            .cases
            .iter()
            .flat_map(|c| c.served_ports.pairs())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

fn merge(
    base: &BTreeMap<String, String>,
    changes: Option<&BTreeMap<String, Option<String>>>,
) -> BTreeMap<String, String> {
    let mut out = base.clone();
    if let Some(changes) = changes {
        for (k, v) in changes {
            match v {
                Some(v) => {
                    out.insert(k.clone(), v.clone());
                }
                None => {
                    out.remove(k);
                }
            }
        }
    }
    out
}

impl Case {
    pub fn namespace_labels(&self, model: &Model, ns: &str) -> BTreeMap<String, String> {
        merge(
            &model.namespaces[ns].labels,
            self.label_changes.namespaces.get(ns),
        )
    }

    pub fn pod_labels(&self, model: &Model, pod: &str) -> BTreeMap<String, String> {
        merge(&model.pods[pod].labels, self.label_changes.pods.get(pod))
    }

    /// The case's policies with every IP placeholder replaced by the pod's address, as text
    /// (so that `{{ip x/a}}/4` becomes `<addr>/4`, host bits set, exactly as upstream writes
    /// it). Any placeholder left over is an error.
    pub fn resolved_policies(
        &self,
        model: &Model,
        ip_of: &dyn Fn(&str) -> String,
    ) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for policy in &self.policies {
            let mut text = policy.to_string();
            for key in &model.pod_order {
                let placeholder = model.pods[key]
                    .ip_placeholder
                    .clone()
                    .unwrap_or_else(|| format!("{{{{ip {key}}}}}"));
                let ip = ip_of(key);
                // A /32 after an IPv4 placeholder is the host prefix: /128 for IPv6.
                if ip.contains(':') {
                    text = text.replace(&format!("{placeholder}/32"), &format!("{ip}/128"));
                }
                text = text.replace(&placeholder, &ip);
            }
            if let Some(at) = text.find("{{") {
                let near: String = text[at..].chars().take(40).collect();
                bail!("unresolved placeholder in policy: {near}");
            }
            out.push(serde_json::from_str(&text).context("policy after substitution")?);
        }
        Ok(out)
    }
}

pub fn select<'a>(cases: &'a [Case], filters: &[String]) -> Vec<&'a Case> {
    cases
        .iter()
        .filter(|c| {
            filters.is_empty()
                || filters
                    .iter()
                    .any(|f| c.id.contains(f.as_str()) || c.name.contains(f.as_str()))
        })
        .collect()
}
