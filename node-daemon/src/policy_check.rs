//! `moatctl policy check`: replays observed flows against a candidate policy set and reports
//! the flows whose verdict would change.
//!
//! The candidate set is the cluster directory (a local-datastore directory: Namespaces, Pods
//! and the policies in force now) with the candidate files' objects added or replacing the
//! objects of the same kind and name. The "before" verdict of a flow is the one its record
//! holds: what the datapath actually did. The "after" verdict is the pure engine's, for the
//! same direction at the same endpoint the record was taken at. Pure: objects and records
//! in, a report out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use moat_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, reason};
use moat_policy::{
    DirectionVerdict, Engine, FlowEnd, LabelSet, Pod, PodRef, evaluate, netpol::Direction as Dir,
};
use serde::Serialize;

use crate::api::{Direction, FlowRecord, Verdict};
use crate::local::{self, LocalObjects, is_object_file};
use crate::workload::flow_ends;

/// The candidate files' objects, or every reason they are invalid.
pub fn read_candidate(path: &Path) -> Result<local::ParsedText, Vec<String>> {
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| vec![format!("{}: {e}", path.display())])?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_object_file(p))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut merged = local::ParsedText::default();
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| vec![format!("{}: {e}", file.display())])?;
        let parsed = local::parse_text(&file.display().to_string(), &text);
        merged.rejected.extend(parsed.rejected);
        merged.objects.extend(parsed.objects);
    }
    if merged.rejected.is_empty() {
        Ok(merged)
    } else {
        Err(merged.rejected)
    }
}

/// The cluster directory's objects, or every reason it is invalid.
pub fn read_cluster(dir: &Path) -> Result<LocalObjects, Vec<String>> {
    if !dir.is_dir() {
        return Err(vec![format!("{}: not a directory", dir.display())]);
    }
    let objects = local::load(dir);
    if objects.rejected.is_empty() {
        Ok(objects)
    } else {
        Err(objects.rejected.clone())
    }
}

/// Reasons of records that are policy decisions on a new flow; the rest (replies,
/// quarantine, spoofing, malformed packets, ...) do not depend on policy and are not replayed.
fn is_policy_decision(reason_name: &str) -> bool {
    [
        reason::POLICY_ALLOW,
        reason::POLICY_DENY,
        reason::DEFAULT_DENY,
        reason::ADMIN_ACCEPT,
        reason::ADMIN_DENY,
        reason::BASELINE_ACCEPT,
        reason::BASELINE_DENY,
        reason::LEARN,
    ]
    .iter()
    .any(|r| reason::name(*r) == reason_name)
}

fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

fn pod_ref(name: &str) -> Option<PodRef> {
    let (ns, pod) = name.split_once('/')?;
    Some(PodRef::new(ns, pod))
}

/// Addresses the journal saw each named pod use: the cluster directory need not carry
/// `status.podIPs`.
fn observed_addresses(records: &[FlowRecord]) -> BTreeMap<PodRef, BTreeSet<IpAddr>> {
    let mut out: BTreeMap<PodRef, BTreeSet<IpAddr>> = BTreeMap::new();
    for r in records {
        let (local, remote) = match r.direction {
            Direction::Ingress => (&r.destination, &r.source),
            Direction::Egress => (&r.source, &r.destination),
        };
        for (name, addr) in [(&r.endpoint, local), (&r.peer, remote)] {
            if let (Some(p), Ok(ip)) = (name.as_deref().and_then(pod_ref), addr.parse()) {
                out.entry(p).or_default().insert(ip);
            }
        }
    }
    out
}

/// Compiles the objects. A pod without addresses takes those the journal saw it use; a
/// namespace that pods name but no object defines gets its `kubernetes.io/metadata.name`
/// label, as the API server would give it.
fn compile(objects: &LocalObjects, records: &[FlowRecord]) -> Result<Engine, Vec<String>> {
    let observed = observed_addresses(records);
    let mut engine = Engine::new();
    let mut errors = Vec::new();
    let mut note = |what: String, r: Result<moat_policy::Delta, moat_policy::Error>| {
        if let Err(e) = r {
            errors.push(format!("{what}: {e}"));
        }
    };
    let mut namespaces = objects.namespaces.clone();
    for (ns, _) in objects.pods.keys() {
        namespaces.entry(ns.clone()).or_insert_with(|| {
            let mut l = LabelSet::new();
            l.insert("kubernetes.io/metadata.name", ns);
            l
        });
    }
    for (name, labels) in &namespaces {
        note(
            format!("Namespace {name}"),
            engine.upsert_namespace(name, labels.clone()),
        );
    }
    for ((ns, name), meta) in &objects.pods {
        let mut ips = meta.ips.clone();
        if ips.is_empty() {
            ips.extend(observed.get(&PodRef::new(ns, name)).into_iter().flatten());
        }
        if ips.is_empty() {
            continue; // Never seen and no address: no flow of the journal can involve it.
        }
        let pod = Pod {
            namespace: ns.clone(),
            name: name.clone(),
            labels: meta.labels.clone(),
            ips,
            ports: meta.ports.clone(),
        };
        note(format!("Pod {ns}/{name}"), engine.upsert_pod(pod));
    }
    for ((ns, name), p) in &objects.policies {
        note(
            format!("NetworkPolicy {ns}/{name}"),
            engine.upsert_policy(p),
        );
    }
    for ((ns, name), p) in &objects.moat_policies {
        note(
            format!("MoatPolicy {ns}/{name}"),
            engine.upsert_moat_policy(p),
        );
    }
    for (name, p) in &objects.cluster_policies {
        note(
            format!("ClusterNetworkPolicy {name}"),
            engine.upsert_cluster_policy(p),
        );
    }
    if errors.is_empty() {
        Ok(engine)
    } else {
        Err(errors)
    }
}

/// Flows of one workload pair, port and direction whose verdict changes the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    /// Where the verdict is made: the endpoint's ingress or egress.
    pub direction: Direction,
    /// Journal records of these flows.
    pub flows: u64,
    /// The rule that decided, from the record.
    pub before: String,
    /// The candidate's deciding rule (engine's description), or the default it fell to.
    pub after: String,
}

/// A record that could not be judged, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub why: String,
    pub flows: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records replayed.
    pub replayed: u64,
    pub newly_denied: Vec<Change>,
    pub newly_allowed: Vec<Change>,
    pub not_replayed: Vec<Skipped>,
}

impl Report {
    /// The exit code `policy check` reports: 1 when an observed flow would be newly denied.
    pub fn exit_code(&self) -> i32 {
        if self.newly_denied.is_empty() { 0 } else { 1 }
    }
}

/// The candidate's NetworkPolicies isolating `pod` in a direction, named as moatd names
/// them in the journal, so that a default deny reads the same before and after.
fn selecting_policies(
    objects: &LocalObjects,
    engine: &Engine,
    pod: &PodRef,
    dir: Dir,
) -> Vec<String> {
    let Some(p) = engine.inputs().pods.get(pod) else {
        return Vec::new();
    };
    objects
        .policies
        .values()
        .filter(|np| np.namespace() == pod.namespace)
        .filter(|np| np.spec.pod_selector.matches(&p.labels))
        .filter(|np| {
            let (ingress, egress) = np.effective_policy_types();
            if dir == Dir::Ingress { ingress } else { egress }
        })
        .map(|np| np.object())
        .collect()
}

/// What the engine names a verdict: its rule, or the default it fell to.
fn rule_text(
    engine: &Engine,
    objects: &LocalObjects,
    pod: &PodRef,
    dir: Dir,
    v: &DirectionVerdict,
) -> String {
    if let Some(rule) = engine.describe_verdict(v) {
        return rule;
    }
    match (v.allowed, v.rule_id) {
        (true, moat_common::rule::NOT_ISOLATED) => "not isolated".into(),
        (false, moat_common::rule::NONE) if v.reason == reason::DEFAULT_DENY => {
            let selected = selecting_policies(objects, engine, pod, dir);
            if selected.is_empty() {
                "default deny".into()
            } else {
                format!("default deny (selected by: {})", selected.join(", "))
            }
        }
        _ => reason::name(v.reason).replace('-', " "),
    }
}

/// One record against the candidate: whether it is allowed and by which rule, or why it
/// cannot be judged.
fn judge(
    engine: &Engine,
    objects: &LocalObjects,
    r: &FlowRecord,
) -> Result<(bool, String), String> {
    if !is_policy_decision(&r.reason) {
        return Err(format!("not a policy decision ({})", r.reason));
    }
    let proto = protocol_number(&r.protocol)
        .ok_or_else(|| format!("protocol {} has no port rules", r.protocol))?;
    let state = engine.state();
    let endpoint = r
        .endpoint
        .as_deref()
        .and_then(pod_ref)
        .filter(|p| state.endpoints.contains_key(p))
        .ok_or("endpoint not a pod of --cluster")?;
    let remote_addr = match r.direction {
        Direction::Ingress => &r.source,
        Direction::Egress => &r.destination,
    };
    let remote = match r.peer.as_deref().and_then(pod_ref) {
        Some(p) if state.endpoints.contains_key(&p) => FlowEnd::Pod(p),
        Some(_) => return Err("peer pod not in --cluster".into()),
        None => FlowEnd::Address(
            remote_addr
                .parse()
                .map_err(|_| format!("peer address {remote_addr:?} unreadable"))?,
        ),
    };
    let local = FlowEnd::Pod(endpoint.clone());
    let (from, to, dir) = match r.direction {
        Direction::Ingress => (remote, local, Dir::Ingress),
        Direction::Egress => (local, remote, Dir::Egress),
    };
    let verdict = evaluate(state, &from, &to, r.destination_port, proto)
        .map_err(|e| format!("not evaluable: {e}"))?;
    let at = match dir {
        Dir::Ingress => verdict.ingress,
        Dir::Egress => verdict.egress,
    }
    .ok_or("endpoint has no verdict in that direction")?;
    Ok((at.allowed, rule_text(engine, objects, &endpoint, dir, &at)))
}

/// Whether policy allowed a recorded flow: an audit record is a flow policy would have
/// dropped, and so is a learn-mode record (the datapath lets it through as allowed, with
/// reason `learn`, instead of as audit).
fn policy_allowed(r: &FlowRecord) -> bool {
    r.verdict == Verdict::Allowed && r.reason != reason::name(reason::LEARN)
}

/// Replays `records` against `objects` (the candidate set). Err: the set does not compile.
pub fn check(objects: &LocalObjects, records: &[FlowRecord]) -> Result<Report, Vec<String>> {
    let engine = compile(objects, records)?;
    type Key = (bool, String, String, String, u16, Direction, String, String);
    let mut changes: BTreeMap<Key, u64> = BTreeMap::new();
    let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
    let mut report = Report::default();
    for r in records {
        let (allowed, after) = match judge(&engine, objects, r) {
            Ok(v) => v,
            Err(why) => {
                *skipped.entry(why).or_default() += 1;
                continue;
            }
        };
        report.replayed += 1;
        let was_allowed = policy_allowed(r);
        if allowed == was_allowed {
            continue;
        }
        let (from, to) = flow_ends(r);
        let key = (
            allowed,
            from,
            to,
            r.protocol.clone(),
            r.destination_port,
            r.direction,
            r.rule.clone(),
            after,
        );
        *changes.entry(key).or_default() += 1;
    }
    for ((allowed, from, to, protocol, port, direction, before, after), flows) in changes {
        let change = Change {
            from,
            to,
            protocol,
            port,
            direction,
            flows,
            before,
            after,
        };
        if allowed {
            report.newly_allowed.push(change);
        } else {
            report.newly_denied.push(change);
        }
    }
    report.not_replayed = skipped
        .into_iter()
        .map(|(why, flows)| Skipped { why, flows })
        .collect();
    Ok(report)
}

/// The candidate set: `cluster` with `candidate`'s objects added or replacing theirs.
pub fn candidate_set(mut cluster: LocalObjects, candidate: local::ParsedText) -> LocalObjects {
    for (key, object) in candidate.objects {
        cluster.set(&key, Some(object));
    }
    cluster
}

/// The report as text, changes grouped by workload pair.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for (title, changes) in [
        ("NEWLY DENIED", &report.newly_denied),
        ("NEWLY ALLOWED", &report.newly_allowed),
    ] {
        let flows: u64 = changes.iter().map(|c| c.flows).sum();
        out.push_str(&format!("{title}: {flows} flows\n"));
        let mut pair: Option<(&str, &str)> = None;
        for c in changes {
            if pair != Some((&c.from, &c.to)) {
                out.push_str(&format!("  {} -> {}\n", c.from, c.to));
                pair = Some((&c.from, &c.to));
            }
            out.push_str(&format!(
                "    {}/{} ({} of {}): {} flows\n      was: {}\n      now: {}\n",
                c.port,
                c.protocol,
                c.direction,
                if c.direction == Direction::Ingress {
                    &c.to
                } else {
                    &c.from
                },
                c.flows,
                if c.before.is_empty() { "-" } else { &c.before },
                c.after
            ));
        }
    }
    for s in &report.not_replayed {
        out.push_str(&format!("not replayed: {} flows: {}\n", s.flows, s.why));
    }
    out.push_str(&format!(
        "replayed {} flows: {} newly denied, {} newly allowed\n",
        report.replayed,
        report.newly_denied.iter().map(|c| c.flows).sum::<u64>(),
        report.newly_allowed.iter().map(|c| c.flows).sum::<u64>()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::EndpointMode;

    fn objects(yaml: &str) -> LocalObjects {
        let parsed = local::parse_text("test.yaml", yaml);
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        candidate_set(LocalObjects::default(), parsed)
    }

    const PODS: &str = "
kind: Pod
metadata: {name: web-x2k4q, namespace: shop, labels: {app: web}}
---
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
";

    fn ingress_to_db(verdict: Verdict, reason: &str, peer: &str) -> FlowRecord {
        FlowRecord {
            time_ms: 1,
            verdict,
            reason: reason.into(),
            direction: Direction::Ingress,
            mode: EndpointMode::Enforce,
            protocol: "TCP".into(),
            source: "10.1.0.1".into(),
            destination: "10.1.0.2".into(),
            source_port: 40000,
            destination_port: 5432,
            endpoint: Some("shop/db-0".into()),
            peer: Some(peer.into()),
            local_identity: 0,
            remote_identity: 0,
            rule_id: 0,
            rule: "not isolated".into(),
            bytes: 0,
        }
    }

    #[test]
    fn an_admin_deny_is_named_with_its_tier_policy_and_rule() {
        let yaml = format!(
            "{PODS}---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: guard}}
spec:
  tier: Admin
  priority: 5
  subject:
    namespaces: {{}}
  ingress:
  - name: no-db
    action: Deny
    from:
    - namespaces: {{}}
"
        );
        let objects = objects(&yaml);
        let record = ingress_to_db(Verdict::Allowed, "policy-allow", "shop/web-x2k4q");
        let report = check(&objects, &[record]).unwrap();
        assert_eq!(report.newly_denied.len(), 1, "{report:?}");
        let change = &report.newly_denied[0];
        assert_eq!(
            (change.from.as_str(), change.to.as_str()),
            ("shop/web", "shop/db")
        );
        assert!(
            change.after.contains("ClusterNetworkPolicy guard"),
            "{}",
            change.after
        );
        assert_eq!(report.exit_code(), 1);
    }

    #[test]
    fn what_cannot_be_judged_is_counted_not_guessed() {
        let objects = objects(PODS);
        let records = [
            // A reply is no policy decision.
            ingress_to_db(Verdict::Allowed, "reply", "shop/web-x2k4q"),
            // A peer pod the cluster directory does not know.
            ingress_to_db(Verdict::Allowed, "policy-allow", "other/ghost"),
            // Judged: no policy, still allowed.
            ingress_to_db(Verdict::Allowed, "policy-allow", "shop/web-x2k4q"),
        ];
        let report = check(&objects, &records).unwrap();
        assert_eq!(report.replayed, 1);
        assert!(report.newly_denied.is_empty() && report.newly_allowed.is_empty());
        let why: Vec<&str> = report.not_replayed.iter().map(|s| s.why.as_str()).collect();
        assert_eq!(
            why,
            ["not a policy decision (reply)", "peer pod not in --cluster"]
        );
        assert_eq!(report.exit_code(), 0);
    }

    #[test]
    fn a_dropped_flow_the_candidate_allows_is_newly_allowed_and_passes() {
        let objects = objects(PODS);
        let mut record = ingress_to_db(Verdict::Dropped, "default-deny", "shop/web-x2k4q");
        record.rule = "default deny (selected by: shop/old)".into();
        // Learn mode lets what policy would deny through as "allowed" with reason learn.
        let mut learned = ingress_to_db(Verdict::Allowed, "learn", "shop/web-x2k4q");
        learned.rule = record.rule.clone();
        let report = check(&objects, &[record, learned]).unwrap();
        assert_eq!(report.newly_allowed.len(), 1, "{report:?}");
        assert_eq!(report.newly_allowed[0].flows, 2);
        assert_eq!(
            report.newly_allowed[0].before,
            "default deny (selected by: shop/old)"
        );
        assert_eq!(report.newly_allowed[0].after, "not isolated");
        assert_eq!(report.exit_code(), 0);
    }
}
