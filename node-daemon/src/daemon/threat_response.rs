//! The daemon's side of threat detection: configuring the detectors, explaining and
//! recording detections, and quarantine (by request, annotation or detector), which sets the
//! endpoint flag through the ordinary reconcile and then cuts the endpoint's connections.

use std::net::IpAddr;

use moat_common::{ENDPOINT_FLAG_QUARANTINED, ThreatEvent};
use moat_datapath::threats::ThreatConfigMap;
use moat_policy::PodRef;
use tracing::{info, warn};

use super::Daemon;
use crate::{
    api::{QuarantineInfo, QuarantineResult, ThreatRecord, Trace, TracePath, TraceVerdict},
    quarantine::{self, check_pod_name},
    threats::{Response, ThreatPolicy, report},
};

impl report::Directory for Daemon {
    fn pod_of_address(&self, addr: IpAddr) -> Option<String> {
        self.pod_name_of_address(addr)
    }

    fn identity_of_address(&self, addr: IpAddr) -> u32 {
        self.maps.lookup_ipcache(addr).map_or(0, |v| v.identity)
    }

    fn pod_of_ifindex(&self, ifindex: u32) -> Option<String> {
        self.endpoints
            .values()
            .find(|r| r.spec.host_ifindex == ifindex)
            .map(|r| r.pod_ref().to_string())
    }

    fn identity_of_pod(&self, pod: &str) -> u32 {
        let Some((ns, name)) = pod.split_once('/') else {
            return 0;
        };
        self.engine
            .state()
            .endpoints
            .get(&PodRef::new(ns, name))
            .map_or(0, |c| c.identity.0)
    }
}

impl Daemon {
    /// Writes the detector settings into the datapath. A datapath without the threat maps
    /// (an eBPF object built before them) leaves detection unavailable, said in the status.
    pub fn configure_threats(&mut self, policy: ThreatPolicy) {
        let config = policy.datapath_config();
        self.threat_status =
            match ThreatConfigMap::open(&self.pins).and_then(|mut m| m.write(&config)) {
                Ok(()) if policy.enabled => "on".into(),
                Ok(()) => "off".into(),
                Err(e) => {
                    warn!(error = %e, "threat detection unavailable");
                    format!("unavailable: {e}")
                }
            };
        self.threat_policy = policy;
    }

    /// The Kubernetes datastore's poster of detection Events (none with the local datastore).
    pub fn threat_event_poster(&self) -> Option<crate::kube::events::EventPoster> {
        match &self.source {
            super::Source::Kubernetes(ds) => Some(ds.event_poster()),
            super::Source::Local(_) => None,
        }
    }

    /// The uid of a local pod, as its CNI ADD reported it.
    pub fn pod_uid(&self, pod: &str) -> Option<String> {
        self.endpoints
            .values()
            .find(|r| r.pod_ref().to_string() == pod)
            .and_then(|r| r.spec.pod_uid.clone())
    }

    /// Why the pod is quarantined, if it is: moatd's entry first, else its annotation.
    pub fn effective_quarantine(&self, pod: &str) -> Option<QuarantineInfo> {
        if let Some(info) = self.quarantine.get(pod) {
            return Some(info.clone());
        }
        let (ns, name) = pod.split_once('/')?;
        let annotated = self
            .objects
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .is_some_and(|m| m.quarantine);
        annotated.then(|| QuarantineInfo {
            reason: quarantine::BY_ANNOTATION.into(),
            since_ms: 0,
            detail: None,
        })
    }

    /// Every quarantined pod moatd knows of: its entries and the annotated local pods.
    pub fn quarantined_pods(&self) -> std::collections::BTreeMap<String, QuarantineInfo> {
        let mut out = self.quarantine.entries().clone();
        for record in self.endpoints.values() {
            let pod = record.pod_ref().to_string();
            if !out.contains_key(&pod)
                && let Some(info) = self.effective_quarantine(&pod)
            {
                out.insert(pod, info);
            }
        }
        out
    }

    /// Makes each endpoint record's quarantine flag say whether its pod is quarantined (the
    /// reconcile writes the records' flags with the entries); endpoints that just became
    /// quarantined are queued for their connections to be cut.
    pub(super) fn refresh_quarantine_flags(&mut self) {
        let wanted: Vec<(String, bool)> = self
            .endpoints
            .iter()
            .map(|(k, r)| {
                let pod = r.pod_ref().to_string();
                (k.clone(), self.effective_quarantine(&pod).is_some())
            })
            .collect();
        for (key, on) in wanted {
            let Some(record) = self.endpoints.get_mut(&key) else {
                continue;
            };
            let was = record.flags & ENDPOINT_FLAG_QUARANTINED != 0;
            if on && !was {
                record.flags |= ENDPOINT_FLAG_QUARANTINED;
                // Already in the kernel (a restarted moatd): its connections were cut then.
                let ifindex = record.spec.host_ifindex;
                let in_kernel = self
                    .applied
                    .maps
                    .endpoints
                    .get(&ifindex)
                    .is_some_and(|i| i.flags & ENDPOINT_FLAG_QUARANTINED != 0);
                if !in_kernel {
                    self.pending_cuts.insert(ifindex);
                }
            } else if !on && was {
                record.flags &= !ENDPOINT_FLAG_QUARANTINED;
                self.pending_cuts.remove(&record.spec.host_ifindex);
            }
        }
    }

    /// After the flag is in the maps: deletes the newly quarantined endpoints' connections,
    /// so their next packets are judged as new flows (under quarantine).
    pub(super) fn cut_quarantined_connections(&mut self) {
        self.last_cuts = 0;
        for ifindex in std::mem::take(&mut self.pending_cuts) {
            match self.maps.cut_conntrack(ifindex) {
                Ok(n) => self.last_cuts += n,
                Err(e) => {
                    warn!(ifindex, error = %e, "cutting a quarantined endpoint's connections")
                }
            }
        }
    }

    fn local_endpoints_of(&self, pod: &str) -> usize {
        self.endpoints
            .values()
            .filter(|r| r.pod_ref().to_string() == pod)
            .count()
    }

    /// Quarantines a pod of this node. Answered once the flag is in the maps and the pod's
    /// connections are cut.
    pub fn quarantine_pod(
        &mut self,
        pod: &str,
        info: QuarantineInfo,
    ) -> anyhow::Result<QuarantineResult> {
        check_pod_name(pod)?;
        let endpoints = self.local_endpoints_of(pod);
        anyhow::ensure!(endpoints > 0, "pod {pod} has no endpoint on this node");
        let reason = info.reason.clone();
        self.quarantine.insert(pod, info)?;
        self.reconcile()?;
        let cut = self.last_cuts;
        info!(pod, reason = %reason, connections_cut = cut, "pod quarantined");
        Ok(QuarantineResult {
            pod: pod.to_string(),
            quarantined: true,
            info: self.effective_quarantine(pod),
            endpoints,
            connections_cut: cut,
        })
    }

    /// Ends moatd's quarantine of a pod; an annotated pod stays quarantined.
    pub fn release_pod(&mut self, pod: &str) -> anyhow::Result<QuarantineResult> {
        check_pod_name(pod)?;
        let had = self.quarantine.remove(pod)?;
        self.reconcile()?;
        let still = self.effective_quarantine(pod);
        anyhow::ensure!(had || still.is_some(), "pod {pod} is not quarantined");
        info!(
            pod,
            still_annotated = still.is_some(),
            "pod released from quarantine"
        );
        Ok(QuarantineResult {
            pod: pod.to_string(),
            quarantined: still.is_some(),
            info: still,
            endpoints: self.local_endpoints_of(pod),
            connections_cut: 0,
        })
    }

    /// A trace between pods as the datapath judges it under quarantine, which comes before
    /// policy: a quarantined local source may open only the allowed protocol/ports (and
    /// policy still judges those: `quarantine-allowed`); a quarantined local destination
    /// admits nothing (`quarantined`).
    pub(super) fn quarantine_trace(
        &self,
        trace: &mut Trace,
        from: Option<&PodRef>,
        to: Option<&PodRef>,
        proto: u8,
    ) {
        let quarantined = |pod: Option<&PodRef>| {
            let pod = pod?.to_string();
            (self.local_endpoints_of(&pod) > 0)
                .then(|| self.effective_quarantine(&pod))
                .flatten()
        };
        let TracePath::Direct {
            egress, ingress, ..
        } = &mut trace.path
        else {
            return;
        };
        if let Some(q) = quarantined(from) {
            let allowed = self
                .threat_policy
                .settings
                .quarantine_allow
                .iter()
                .any(|a| a.proto == proto && a.port == trace.port);
            if allowed {
                let policy = egress.take().unwrap_or_default();
                *egress = Some(format!("quarantine-allowed ({}); then {policy}", q.reason));
            } else {
                *egress = Some(format!(
                    "quarantined ({}): this port is not allowed out",
                    q.reason
                ));
                trace.verdict = TraceVerdict::Denied;
            }
        }
        if let Some(q) = quarantined(to) {
            *ingress = Some(format!("quarantined ({}): nothing may enter", q.reason));
            trace.verdict = TraceVerdict::Denied;
        }
    }

    /// Explains a detection, applies the configured response, records and counts it.
    pub fn report_threat(
        &mut self,
        e: &ThreatEvent,
        mono_now_ns: u64,
        wall_now_ms: u64,
    ) -> ThreatRecord {
        let response = self.threat_policy.response(e.kind);
        let mut record = report::explain(e, self, mono_now_ns, wall_now_ms, response);
        if response == Response::Quarantine {
            record.action = Some(self.quarantine_source(&record));
        }
        warn!(
            kind = %record.kind,
            source = %record.source,
            source_pod = record.source_pod.as_deref().unwrap_or("-"),
            identity = record.source_identity,
            evidence = %record.evidence(),
            response = %record.response,
            action = record.action.as_deref().unwrap_or("-"),
            "threat detected"
        );
        crate::metrics::global().threat(e.kind, response);
        if let Err(e) = self.threats.record(record.clone()) {
            warn!(error = %e, "writing the threat journal");
        }
        record
    }

    /// The automatic response: quarantine the source if it is a pod of this node.
    fn quarantine_source(&mut self, record: &ThreatRecord) -> String {
        let Some(pod) = record.source_pod.clone() else {
            return "not quarantined: the source is not a pod".into();
        };
        if self.local_endpoints_of(&pod) == 0 {
            return format!("not quarantined: {pod} is not on this node");
        }
        if self.effective_quarantine(&pod).is_some() {
            return format!("{pod} already quarantined");
        }
        let info = QuarantineInfo {
            reason: record.kind.clone(),
            since_ms: record.time_ms,
            detail: Some(record.evidence()),
        };
        match self.quarantine_pod(&pod, info) {
            Ok(r) => format!("quarantined {pod} ({} connections cut)", r.connections_cut),
            Err(e) => format!("quarantine of {pod} failed: {e:#}"),
        }
    }
}
