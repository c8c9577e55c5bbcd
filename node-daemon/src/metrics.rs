//! moatd's Prometheus metrics, served as text (format 0.0.4) on `GET /metrics` from a plain
//! std thread (`--metrics-addr`, 127.0.0.1:9962 by default).
//!
//! Two kinds of metric:
//! - read at scrape time (a [`Collector`]): the datapath's per-CPU verdict counters, event
//!   loss, map fill against capacity, endpoint/identity/policy counts;
//! - recorded as things happen (the process-wide [`global`] handles): the time from a
//!   datastore event or a registration to the maps being updated, and drops per rule as the
//!   flow journal explains events.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use anyhow::Context;
use moat_common::{
    DIRECTION_INGRESS, METRIC_EVENTS_RATE_LIMITED, METRIC_EVENTS_RING_FULL, METRIC_FQDN_CAPPED,
    METRIC_FQDN_LEARNED, METRIC_FQDN_MALFORMED, METRIC_FQDN_UNASKED, reason,
};
use moat_datapath::{Maps, PinDir};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tracing::{debug, info, warn};

use crate::{api::Verdict, daemon::Daemon, flows::FlowRecord};

pub const DEFAULT_ADDR: &str = "127.0.0.1:9962";

/// What kind of change an event-to-maps latency sample measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A datastore change (objects reloaded and the difference applied).
    Datastore,
    /// An endpoint registration from moat-cni.
    Register,
    /// An endpoint removal.
    Unregister,
}

impl EventKind {
    fn name(self) -> &'static str {
        match self {
            Self::Datastore => "datastore",
            Self::Register => "register",
            Self::Unregister => "unregister",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    verdict: &'static str,
    reason: String,
    direction: &'static str,
    rule: String,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Metrics recorded as things happen. Cheap to update from any thread.
#[derive(Debug)]
pub struct Recorder {
    event_to_maps: Family<EventLabels, Histogram, fn() -> Histogram>,
    drops: Family<DropLabels, Counter>,
    journaled: Counter,
    threats: Family<ThreatLabels, Counter>,
    map_drift: Family<DriftLabels, Gauge>,
    capacity_refusals: Family<DriftLabels, Counter>,
    fill_alarms: Family<DriftLabels, Gauge>,
}

/// One series per map moatd owns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DriftLabels {
    map: String,
}

/// No pod labels: one series per detector and response, however many pods misbehave.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ThreatLabels {
    kind: &'static str,
    response: &'static str,
}

impl Default for Recorder {
    fn default() -> Self {
        let recorder = Self {
            event_to_maps: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            drops: Family::default(),
            journaled: Counter::default(),
            threats: Family::default(),
            map_drift: Family::default(),
            capacity_refusals: Family::default(),
            fill_alarms: Family::default(),
        };
        // Every kind is exposed from the start (zero samples), so dashboards see the series.
        for kind in [
            EventKind::Datastore,
            EventKind::Register,
            EventKind::Unregister,
        ] {
            drop(recorder.event_to_maps.get_or_create(&EventLabels {
                event: kind.name().into(),
            }));
        }
        recorder
    }
}

impl Recorder {
    /// The time from an event to the maps holding its result.
    pub fn observe_event(&self, kind: EventKind, elapsed: Duration) {
        self.event_to_maps
            .get_or_create(&EventLabels {
                event: kind.name().into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one threat detection.
    pub fn threat(&self, kind: u8, response: crate::threats::Response) {
        self.threats
            .get_or_create(&ThreatLabels {
                kind: moat_common::threat::name(kind),
                response: response.name(),
            })
            .inc();
    }

    /// What the last map verification found (verify.rs): differing entries per map.
    pub fn map_drift(&self, report: &crate::api::VerifyReport) {
        for m in &report.maps {
            self.map_drift
                .get_or_create(&DriftLabels { map: m.map.clone() })
                .set(m.total() as i64);
        }
    }

    /// Counts one change refused because it would overflow `map` (capacity.rs).
    pub fn capacity_refusal(&self, map: &str) {
        self.capacity_refusals
            .get_or_create(&DriftLabels { map: map.into() })
            .inc();
    }

    /// Whether `map` is past its fill warning (fill_watch.rs).
    pub fn fill_alarm(&self, map: &str, on: bool) {
        self.fill_alarms
            .get_or_create(&DriftLabels { map: map.into() })
            .set(on as i64);
    }

    /// Counts journaled flow records; drops (and audit "would drop") per rule.
    pub fn journaled(&self, records: &[FlowRecord]) {
        self.journaled.inc_by(records.len() as u64);
        for r in records.iter().filter(|r| r.verdict != Verdict::Allowed) {
            self.drops
                .get_or_create(&DropLabels {
                    verdict: r.verdict.name(),
                    reason: r.reason.clone(),
                    direction: r.direction.name(),
                    rule: r.rule.clone(),
                })
                .inc();
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "moatd_event_to_maps_seconds",
            "Time from a datastore event (file change, API server update) or a CNI request to \
             the maps holding the result",
            self.event_to_maps.clone(),
        );
        registry.register(
            "moat_flow_drop_events",
            "Dropped (or, in audit mode, would-be dropped) flows per deciding rule, counted as \
             the flow journal explains datapath events (events are rate limited: a sample, see \
             moat_datapath_packets_total for exact packet counts)",
            self.drops.clone(),
        );
        registry.register(
            "moat_flow_events_journaled",
            "Datapath flow events written to the flow journal",
            self.journaled.clone(),
        );
        registry.register(
            "moat_map_drift_entries",
            "Entries of each map moatd owns that differed from the datastore's desired state \
             (missing, extra or different) at the last check (moatd --verify-interval), which \
             then repaired them",
            self.map_drift.clone(),
        );
        registry.register(
            "moat_map_full_refusals",
            "Changes moatd refused whole because writing them would overflow this map; the \
             maps kept enforcing the last state that fit (raise the map with --map-size)",
            self.capacity_refusals.clone(),
        );
        registry.register(
            "moat_map_fill_warning",
            "1 while this map is past its fill warning threshold (80% of its capacity, cleared \
             under 75%), else 0",
            self.fill_alarms.clone(),
        );
        registry.register(
            "moat_threats",
            "Threat detections reported by the datapath, per detector kind and the response \
             moatd applied (log, or quarantine of the source pod)",
            self.threats.clone(),
        );
    }
}

/// The process-wide recorder (server.rs's hooks write here).
pub fn global() -> &'static Recorder {
    static GLOBAL: OnceLock<Recorder> = OnceLock::new();
    GLOBAL.get_or_init(Recorder::default)
}

/// Datapath and daemon state, read on each scrape.
struct StateCollector {
    daemon: Arc<Mutex<Daemon>>,
    pins: PinDir,
    /// Our own handle on the pinned maps: reading counters needs no daemon lock.
    maps: Mutex<Option<Maps>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
    reason: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LossLabels {
    cause: &'static str,
}

fn verdict_name(v: u8) -> &'static str {
    Verdict::from_code(v).name()
}

/// Entries in each map with its capacity (see moat_datapath::fill for how it counts cheaply).
fn map_fill(pins: &PinDir) -> Vec<(&'static str, u64, u64)> {
    moat_datapath::fill::map_fill(pins)
        .into_iter()
        .map(|f| (f.name, f.entries, f.capacity))
        .collect()
}

struct Snapshot {
    counters: Vec<moat_datapath::maps::Counter>,
    rate_limited: u64,
    ring_full: u64,
    fill: Vec<(&'static str, u64, u64)>,
    /// (metric name, help, value) of the FQDN counters in MOAT_METRICS.
    fqdn: Vec<(&'static str, &'static str, u64)>,
}

/// The FQDN counters: the kernel counts answers; moatd counts what its sweeper capped in the
/// same map, so every one survives a moatd restart.
const FQDN_COUNTERS: [(&str, &str, u32); 4] = [
    (
        "moat_fqdn_learned",
        "Addresses the datapath learned from DNS answers for FQDN rules",
        METRIC_FQDN_LEARNED,
    ),
    (
        "moat_fqdn_unasked",
        "DNS answers the datapath refused to learn from: no matching query (id, ports, \
         resolver) or a question other than the one asked",
        METRIC_FQDN_UNASKED,
    ),
    (
        "moat_fqdn_malformed",
        "DNS answers the datapath could not parse within its bounds (nothing learned)",
        METRIC_FQDN_MALFORMED,
    ),
    (
        "moat_fqdn_capped",
        "Learned addresses moatd deleted to keep an identity under --fqdn-max-per-identity \
         (oldest first)",
        METRIC_FQDN_CAPPED,
    ),
];

impl StateCollector {
    fn datapath(&self) -> Option<Snapshot> {
        let mut guard = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            match Maps::open(&self.pins) {
                Ok(m) => *guard = Some(m),
                Err(e) => {
                    warn!(error = %e, "metrics: opening the maps");
                    return None;
                }
            }
        }
        let maps = guard.as_ref()?;
        let read = || -> moat_datapath::Result<Snapshot> {
            Ok(Snapshot {
                counters: maps.counters()?,
                rate_limited: maps.special_counter(METRIC_EVENTS_RATE_LIMITED)?,
                ring_full: maps.special_counter(METRIC_EVENTS_RING_FULL)?,
                fill: map_fill(&self.pins),
                fqdn: FQDN_COUNTERS
                    .iter()
                    .map(|&(name, help, slot)| Ok((name, help, maps.special_counter(slot)?)))
                    .collect::<moat_datapath::Result<_>>()?,
            })
        };
        match read() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "metrics: reading the maps");
                // Re-open next time (the datapath may have been replaced).
                *guard = None;
                None
            }
        }
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(metric)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.daemon.lock().map(|d| d.status()).ok();
        if let Some(s) = &status {
            gauge(
                &mut encoder,
                "moatd_endpoints",
                "Endpoints (pod interfaces) registered on this node",
                s.endpoints as i64,
            )?;
            gauge(
                &mut encoder,
                "moatd_identities",
                "Security identities known to the policy engine",
                s.identities as i64,
            )?;
            gauge(
                &mut encoder,
                "moatd_policies",
                "NetworkPolicies in force",
                s.policies as i64,
            )?;
            gauge(
                &mut encoder,
                "moatd_rejected_objects",
                "Datastore objects refused (the last good state stays in force)",
                s.rejected.len() as i64,
            )?;
            gauge(
                &mut encoder,
                "moatd_ready",
                "1 when the datastore has synced and registrations are served",
                s.ready as i64,
            )?;
            gauge(
                &mut encoder,
                "moatd_datastore_generation",
                "Datastore reloads that reached the maps",
                s.generation as i64,
            )?;
        }
        let Some(snap) = self.datapath() else {
            return Ok(());
        };
        type Count = fn(&moat_datapath::maps::Counter) -> u64;
        let verdict_counters: [(&str, &str, Count); 2] = [
            (
                "moat_datapath_packets",
                "Packets judged by the datapath, by verdict, reason and direction (per-CPU \
                 counters summed)",
                |c| c.packets,
            ),
            (
                "moat_datapath_bytes",
                "Bytes judged by the datapath, by verdict, reason and direction",
                |c| c.bytes,
            ),
        ];
        for (name, help, count) in verdict_counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for c in &snap.counters {
                let labels = VerdictLabels {
                    verdict: verdict_name(c.verdict),
                    reason: reason::name(c.reason),
                    direction: if c.direction == DIRECTION_INGRESS {
                        "ingress"
                    } else {
                        "egress"
                    },
                };
                ConstCounter::new(count(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut lost = encoder.encode_descriptor(
                "moat_flow_events_lost",
                "Flow events not delivered to moatd: rate_limited (per-CPU event budget spent) \
                 or ring_full (moatd fell behind)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (cause, value) in [
                ("rate_limited", snap.rate_limited),
                ("ring_full", snap.ring_full),
            ] {
                ConstCounter::new(value).encode(lost.encode_family(&LossLabels { cause })?)?;
            }
        }
        for (name, help, value) in &snap.fqdn {
            let metric = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            ConstCounter::new(*value).encode(metric)?;
        }
        {
            let mut entries = encoder.encode_descriptor(
                "moat_map_entries",
                "Entries in each datapath map",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, n, _) in &snap.fill {
                ConstGauge::new(*n as i64).encode(entries.encode_family(&MapLabels { map })?)?;
            }
        }
        {
            let mut capacity = encoder.encode_descriptor(
                "moat_map_capacity",
                "Maximum entries of each datapath map",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, _, cap) in &snap.fill {
                ConstGauge::new(*cap as i64).encode(capacity.encode_family(&MapLabels { map })?)?;
            }
        }
        {
            let mut ratio = encoder.encode_descriptor(
                "moat_map_fill_ratio",
                "Entries over capacity of each datapath map (0..1)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, n, cap) in &snap.fill {
                let value = if *cap == 0 {
                    0.0
                } else {
                    *n as f64 / *cap as f64
                };
                ConstGauge::new(value).encode(ratio.encode_family(&MapLabels { map })?)?;
            }
        }
        Ok(())
    }
}

/// The registry served on /metrics.
pub fn registry(daemon: Arc<Mutex<Daemon>>) -> Registry {
    let pins = daemon
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pins()
        .clone();
    let mut registry = Registry::default();
    global().register(&mut registry);
    registry.register_collector(Box::new(StateCollector {
        daemon,
        pins,
        maps: Mutex::new(None),
    }));
    registry
}

/// The exposition text of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        warn!(error = %e, "metrics: encoding");
    }
    out
}

/// Binds the metrics endpoint; `""` disables it (returns `None`).
pub fn bind(addr: &str) -> anyhow::Result<Option<TcpListener>> {
    if addr.trim().is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr).with_context(|| format!("binding metrics on {addr}"))?;
    Ok(Some(listener))
}

/// Serves `GET /metrics` on `listener`, one connection at a time, forever.
pub fn serve(listener: TcpListener, registry: Registry) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint listening");
    }
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(e) = serve_http(stream, &registry) {
                    debug!(error = %e, "metrics connection ended");
                }
            }
            Err(e) => warn!(error = %e, "metrics accept failed"),
        }
    }
}

/// Binds and serves on a thread of its own; the bound address, or `None` when disabled.
pub fn spawn(addr: &str, daemon: Arc<Mutex<Daemon>>) -> anyhow::Result<Option<SocketAddr>> {
    let Some(listener) = bind(addr)? else {
        return Ok(None);
    };
    let local = listener.local_addr()?;
    let registry = registry(daemon);
    std::thread::Builder::new()
        .name("moatd-metrics".into())
        .spawn(move || serve(listener, registry))?;
    Ok(Some(local))
}

/// A minimal HTTP/1.1 exchange: one request (the head only), one response, then close.
fn serve_http(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "");
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(registry);
            let body = if method == "HEAD" { "" } else { body.as_str() };
            respond(
                &mut stream,
                "200 OK",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body,
            )
        }
        ("GET" | "HEAD", _) => respond(
            &mut stream,
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n",
        ),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !content_type.is_empty() {
        out.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threats::Response;

    #[test]
    fn threats_are_counted_per_kind_and_response_without_pod_labels() {
        let recorder = Recorder::default();
        recorder.threat(moat_common::threat::PORT_SCAN, Response::Quarantine);
        recorder.threat(moat_common::threat::PORT_SCAN, Response::Quarantine);
        recorder.threat(moat_common::threat::SPOOFING, Response::Log);
        let mut registry = Registry::default();
        recorder.register(&mut registry);
        let text = render(&registry);
        assert!(text.contains("# TYPE moat_threats_total counter"), "{text}");
        assert!(
            text.contains("moat_threats_total{kind=\"port-scan\",response=\"quarantine\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("moat_threats_total{kind=\"spoofing\",response=\"log\"} 1"),
            "{text}"
        );
    }
}
