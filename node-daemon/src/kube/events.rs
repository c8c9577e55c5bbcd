//! Threat detections as core/v1 Events: a Warning `ThreatDetected` on the pod a detector
//! blamed, so `kubectl describe pod` and `kubectl get events` show it. Rate-bounded: one per
//! pod and detector kind per [`PER_SUBJECT`], and at most [`BURST`] in any [`PERIOD`] in all,
//! so a storm of detections cannot become a storm of API writes.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};

use super::watch::Writer;
use crate::api::ThreatRecord;

pub const REASON: &str = "ThreatDetected";
pub const COMPONENT: &str = "moatd";
/// One Event per pod and kind in this time.
pub const PER_SUBJECT: Duration = Duration::from_secs(60);
/// At most this many Events in any `PERIOD`.
pub const BURST: usize = 20;
pub const PERIOD: Duration = Duration::from_secs(60);

/// The pod an Event is about: the detection's source pod, else the local endpoint that saw it.
pub fn subject(record: &ThreatRecord) -> Option<(String, String)> {
    let pod = record.source_pod.as_ref().or(record.endpoint.as_ref())?;
    let (ns, name) = pod.split_once('/')?;
    Some((ns.to_string(), name.to_string()))
}

/// The Event for a detection about `namespace/name` (with its uid when known: `kubectl
/// describe pod` matches Events by it).
pub fn threat_event(
    record: &ThreatRecord,
    (namespace, name): (&str, &str),
    uid: Option<&str>,
    node: &str,
    now: Timestamp,
) -> Event {
    let mut message = format!(
        "{} from {}: {}; response {}",
        record.kind,
        record.source_pod.as_deref().unwrap_or(&record.source),
        record.evidence(),
        record.response
    );
    if let Some(action) = &record.action {
        message.push_str(&format!(" ({action})"));
    }
    Event {
        metadata: ObjectMeta {
            // As kubectl's recorder names them: the object, then a unique suffix.
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(namespace.to_string()),
            name: Some(name.to_string()),
            uid: uid.map(str::to_string),
            ..Default::default()
        },
        reason: Some(REASON.into()),
        type_: Some("Warning".into()),
        message: Some(message),
        action: Some(record.kind.clone()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(node.to_string()),
        }),
        reporting_component: Some(format!("moat.io/{COMPONENT}")),
        reporting_instance: Some(node.to_string()),
        ..Default::default()
    }
}

/// The Events' rate bound (pure: the caller gives the time).
#[derive(Debug, Default)]
pub struct RateBound {
    last_per_subject: BTreeMap<(String, String), Instant>,
    recent: VecDeque<Instant>,
}

impl RateBound {
    /// Whether an Event about `subject` of `kind` may go out at `now` (and counts it if so).
    pub fn allow(&mut self, subject: &str, kind: &str, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= PERIOD)
        {
            self.recent.pop_front();
        }
        self.last_per_subject
            .retain(|_, t| now.duration_since(*t) < PER_SUBJECT);
        let key = (subject.to_string(), kind.to_string());
        if self.recent.len() >= BURST || self.last_per_subject.contains_key(&key) {
            return false;
        }
        self.recent.push_back(now);
        self.last_per_subject.insert(key, now);
        true
    }
}

/// Posts detection Events from any thread, on the datastore's runtime. Cheap to clone.
#[derive(Clone)]
pub struct EventPoster {
    pub(super) writer: Writer,
    pub(super) node: String,
    pub(super) bound: Arc<Mutex<RateBound>>,
}

impl EventPoster {
    /// Posts the Event for a detection unless the rate bound holds it back; returns at once.
    /// A failed post is logged, not retried (the detection is in moatd's journal anyway).
    pub fn post(&self, record: &ThreatRecord, uid: Option<&str>) {
        let Some((namespace, name)) = subject(record) else {
            return;
        };
        let allowed = self.bound.lock().unwrap_or_else(|e| e.into_inner()).allow(
            &format!("{namespace}/{name}"),
            &record.kind,
            Instant::now(),
        );
        if !allowed {
            return;
        }
        let event = threat_event(
            record,
            (&namespace, &name),
            uid,
            &self.node,
            Timestamp::now(),
        );
        let api: kube::Api<Event> = kube::Api::namespaced(self.writer.client.clone(), &namespace);
        self.writer.runtime.spawn(async move {
            if let Err(e) = api.create(&kube::api::PostParams::default(), &event).await {
                tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "posting a threat Event");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ThreatRecord {
        ThreatRecord {
            kind: "port-scan".into(),
            source: "10.0.0.5".into(),
            source_pod: Some("prod/scanner".into()),
            count: 40,
            distinct: Some(31),
            refused: Some(30),
            window_ms: 2_000,
            response: "quarantine".into(),
            action: Some("quarantined prod/scanner (2 connections cut)".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_event_is_a_warning_on_the_source_pod_with_the_evidence() {
        let now: Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        let r = record();
        let who = subject(&r).unwrap();
        assert_eq!(who, ("prod".to_string(), "scanner".to_string()));
        let e = threat_event(&r, (&who.0, &who.1), Some("u-1"), "node-a", now);
        assert_eq!(e.metadata.namespace.as_deref(), Some("prod"));
        assert!(e.metadata.name.unwrap().starts_with("scanner."));
        assert_eq!(e.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(e.involved_object.name.as_deref(), Some("scanner"));
        assert_eq!(e.involved_object.uid.as_deref(), Some("u-1"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some(REASON));
        assert_eq!(
            e.message.as_deref(),
            Some(
                "port-scan from prod/scanner: count 40, ~31 distinct, 30 refused, in 2.0s; \
                 response quarantine (quarantined prod/scanner (2 connections cut))"
            )
        );
        // Without a source pod, the endpoint that saw it; without either, no Event.
        let inbound = ThreatRecord {
            source_pod: None,
            endpoint: Some("prod/web".into()),
            ..record()
        };
        assert_eq!(subject(&inbound).unwrap().1, "web");
        let nobody = ThreatRecord {
            source_pod: None,
            ..Default::default()
        };
        assert_eq!(subject(&nobody), None);
    }

    #[test]
    fn one_event_per_pod_and_kind_per_minute_and_a_bounded_total() {
        let mut bound = RateBound::default();
        let t0 = Instant::now();
        assert!(bound.allow("prod/a", "port-scan", t0));
        assert!(!bound.allow("prod/a", "port-scan", t0 + Duration::from_secs(30)));
        assert!(bound.allow("prod/a", "syn-flood", t0 + Duration::from_secs(30)));
        assert!(bound.allow("prod/a", "port-scan", t0 + PER_SUBJECT));
        let t1 = t0 + Duration::from_secs(600);
        let allowed = (0..100)
            .filter(|i| bound.allow(&format!("prod/p{i}"), "spoofing", t1))
            .count();
        assert_eq!(allowed, BURST);
        assert!(bound.allow("prod/late", "spoofing", t1 + PERIOD));
    }
}
