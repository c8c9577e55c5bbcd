//! Threat detection settings: the defaults, the conversions between distinct counts and the
//! sketch bits the kernel compares (linear counting over `threat::SKETCH_BITS` bits), and the
//! writer of MOAT_THREATCFG. The pure part has no map access so moatd can validate and show
//! settings without a datapath.

use std::time::Duration;

use aya::maps::{Array, MapData};
use moat_common::{MAX_QUARANTINE_ALLOW, QuarantineAllow, ThreatConfig, map_name, threat};

use crate::{Error, PinDir, Result};

const M: f64 = threat::SKETCH_BITS as f64;

/// Sketch bits expected once `distinct` different values went in: m(1 - e^(-n/m)), floored,
/// at least 1 (a zero threshold would fire on nothing at all).
pub fn sketch_bits_for(distinct: u32) -> u32 {
    let bits = (M * (1.0 - (-(distinct as f64) / M).exp())).floor() as u32;
    bits.clamp(1, threat::SKETCH_BITS)
}

/// Distinct values estimated from the set bits: -m ln(1 - bits/m), rounded. A full sketch
/// says only "at least" as many as one bit short of full.
pub fn estimate_distinct(bits: u32) -> u32 {
    let bits = bits.min(threat::SKETCH_BITS - 1) as f64;
    (-M * (1.0 - bits / M).ln()).round() as u32
}

/// One detector's settings, in operator units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detector {
    pub enabled: bool,
    pub window: Duration,
    /// Distinct ports (port-scan), distinct addresses (host-sweep), half-open connections
    /// (syn-flood), drops (policy-probing), suspicious names (dns-tunnel), spoofed packets.
    pub threshold: u32,
}

/// The DNS tunnel detector's name tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// Unique names from one source in a window that fire the detector.
    pub unique_names: u32,
    pub long_label: u16,
    pub long_name: u16,
    pub entropy_chars: u16,
    pub entropy_min_len: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreatSettings {
    /// Indexed by kind (`threat::*`); index 0 unused.
    pub detectors: [Detector; threat::SLOTS],
    pub dns: DnsSettings,
    /// Egress new flows a quarantined endpoint may still open.
    pub quarantine_allow: Vec<QuarantineAllow>,
}

const OFF: Detector = Detector {
    enabled: false,
    window: Duration::ZERO,
    threshold: 0,
};

const fn on(window_secs: u64, threshold: u32) -> Detector {
    Detector {
        enabled: true,
        window: Duration::from_secs(window_secs),
        threshold,
    }
}

pub const DNS_PORT: u16 = 53;

impl Default for ThreatSettings {
    fn default() -> Self {
        let mut detectors = [OFF; threat::SLOTS];
        detectors[threat::PORT_SCAN as usize] = on(10, 24);
        detectors[threat::HOST_SWEEP as usize] = on(10, 24);
        detectors[threat::SYN_FLOOD as usize] = on(5, 512);
        detectors[threat::POLICY_PROBING as usize] = on(10, 64);
        detectors[threat::DNS_TUNNEL as usize] = on(10, 5);
        detectors[threat::SPOOFING as usize] = on(10, 1);
        Self {
            detectors,
            dns: DnsSettings {
                unique_names: 150,
                long_label: 40,
                long_name: 120,
                entropy_chars: 27,
                entropy_min_len: 48,
            },
            quarantine_allow: vec![
                allow(libc::IPPROTO_UDP as u8, DNS_PORT),
                allow(libc::IPPROTO_TCP as u8, DNS_PORT),
            ],
        }
    }
}

fn allow(proto: u8, port: u16) -> QuarantineAllow {
    QuarantineAllow {
        port,
        proto,
        _pad: 0,
    }
}

impl ThreatSettings {
    /// Every detector off: the datapath then does no detection work.
    pub fn off() -> Self {
        let mut s = Self::default();
        for d in &mut s.detectors {
            d.enabled = false;
        }
        s
    }

    pub fn detector(&self, kind: u8) -> &Detector {
        &self.detectors[kind as usize]
    }

    pub fn detector_mut(&mut self, kind: u8) -> &mut Detector {
        &mut self.detectors[kind as usize]
    }

    /// The map value. Scan thresholds become sketch bits; windows are clamped to u32 ms.
    pub fn to_config(&self) -> ThreatConfig {
        let mut config = ThreatConfig::default();
        for kind in threat::ALL {
            let d = self.detector(kind);
            let i = kind as usize;
            if d.enabled {
                config.enabled |= 1 << kind;
            }
            config.window_ms[i] = d.window.as_millis().min(u32::MAX as u128) as u32;
            config.threshold[i] = match kind {
                threat::PORT_SCAN | threat::HOST_SWEEP => sketch_bits_for(d.threshold),
                _ => d.threshold.max(1),
            };
        }
        config.dns_unique_bits = sketch_bits_for(self.dns.unique_names);
        config.dns_long_label = self.dns.long_label;
        config.dns_long_name = self.dns.long_name;
        config.dns_entropy_chars = self.dns.entropy_chars;
        config.dns_entropy_min_len = self.dns.entropy_min_len;
        for (slot, a) in config
            .quarantine_allow
            .iter_mut()
            .zip(&self.quarantine_allow)
        {
            *slot = *a;
        }
        if self.quarantine_allow.is_empty() {
            // An empty list must not read as "never written" (which the datapath takes for
            // its DNS-only default).
            config.quarantine_allow[0].proto = moat_common::QUARANTINE_ALLOW_NOTHING;
        }
        config
    }
}

/// Parses `udp/53,tcp/53` (an empty string allows nothing). At most `MAX_QUARANTINE_ALLOW`.
pub fn parse_quarantine_allow(text: &str) -> std::result::Result<Vec<QuarantineAllow>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (proto, port) = item
            .split_once('/')
            .ok_or_else(|| format!("{item:?}: expected <protocol>/<port>, e.g. udp/53"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => libc::IPPROTO_TCP as u8,
            "udp" => libc::IPPROTO_UDP as u8,
            "sctp" => libc::IPPROTO_SCTP as u8,
            other => {
                return Err(format!(
                    "{item:?}: unknown protocol {other:?} (tcp, udp, sctp)"
                ));
            }
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{item:?}: the port must be 1-65535"))?;
        out.push(allow(proto, port));
    }
    if out.len() > MAX_QUARANTINE_ALLOW {
        return Err(format!(
            "at most {MAX_QUARANTINE_ALLOW} quarantine allowances, got {}",
            out.len()
        ));
    }
    Ok(out)
}

/// `udp/53` for an allowance.
pub fn format_allow(a: &QuarantineAllow) -> String {
    let proto = match a.proto as i32 {
        libc::IPPROTO_TCP => "tcp",
        libc::IPPROTO_UDP => "udp",
        libc::IPPROTO_SCTP => "sctp",
        _ => "proto",
    };
    format!("{proto}/{}", a.port)
}

/// MOAT_THREATCFG, the one-entry settings map.
pub struct ThreatConfigMap {
    map: Array<MapData, ThreatConfig>,
}

impl ThreatConfigMap {
    pub fn open(pins: &PinDir) -> Result<Self> {
        let path = pins.map(map_name::THREAT_CONFIG);
        let data = MapData::from_pin(&path).map_err(|source| Error::MissingMap {
            name: map_name::THREAT_CONFIG,
            path: path.display().to_string(),
            source,
        })?;
        let map = Array::try_from(aya::maps::Map::Array(data)).map_err(|source| Error::Map {
            context: format!("map {} has an unexpected type", map_name::THREAT_CONFIG),
            source,
        })?;
        Ok(Self { map })
    }

    pub fn write(&mut self, config: &ThreatConfig) -> Result<()> {
        self.map.set(0, config, 0).map_err(|source| Error::Map {
            context: "writing the threat detection config".into(),
            source,
        })
    }

    pub fn read(&self) -> Result<ThreatConfig> {
        self.map.get(&0, 0).map_err(|source| Error::Map {
            context: "reading the threat detection config".into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_counts_and_sketch_bits_convert_both_ways() {
        assert_eq!(sketch_bits_for(0), 1);
        assert_eq!(sketch_bits_for(1), 1);
        // 256 (1 - e^(-24/256)) = 22.9...
        assert_eq!(sketch_bits_for(24), 22);
        // 256 (1 - e^(-150/256)) = 113.5...
        assert_eq!(sketch_bits_for(150), 113);
        assert_eq!(sketch_bits_for(100_000), 256);
        assert_eq!(estimate_distinct(0), 0);
        assert_eq!(estimate_distinct(22), 23);
        assert_eq!(estimate_distinct(113), 149);
        assert_eq!(estimate_distinct(256), estimate_distinct(255));
        for n in [5, 24, 64, 150, 300] {
            let back = estimate_distinct(sketch_bits_for(n));
            assert!(back <= n && n - back <= n / 10 + 2, "{n} -> {back}");
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = ThreatSettings::default().to_config();
        let all = threat::ALL.iter().fold(0, |m, k| m | 1 << k);
        assert_eq!(c.enabled, all);
        let (scan, sweep, syn, probe, dns, spoof) = (
            threat::PORT_SCAN as usize,
            threat::HOST_SWEEP as usize,
            threat::SYN_FLOOD as usize,
            threat::POLICY_PROBING as usize,
            threat::DNS_TUNNEL as usize,
            threat::SPOOFING as usize,
        );
        assert_eq!(c.window_ms[scan], 10_000);
        assert_eq!(c.threshold[scan], sketch_bits_for(24));
        assert_eq!(c.window_ms[sweep], 10_000);
        assert_eq!(c.threshold[sweep], sketch_bits_for(24));
        assert_eq!((c.window_ms[syn], c.threshold[syn]), (5_000, 512));
        assert_eq!((c.window_ms[probe], c.threshold[probe]), (10_000, 64));
        assert_eq!((c.window_ms[dns], c.threshold[dns]), (10_000, 5));
        assert_eq!((c.window_ms[spoof], c.threshold[spoof]), (10_000, 1));
        assert_eq!(c.dns_unique_bits, sketch_bits_for(150));
        assert_eq!(
            (
                c.dns_long_label,
                c.dns_long_name,
                c.dns_entropy_chars,
                c.dns_entropy_min_len
            ),
            (40, 120, 27, 48)
        );
        assert_eq!(c.quarantine_allow[0], allow(17, 53));
        assert_eq!(c.quarantine_allow[1], allow(6, 53));
        assert_eq!(c.quarantine_allow[2].proto, 0, "the list ends there");
        assert_eq!(ThreatSettings::off().to_config().enabled, 0);
    }

    #[test]
    fn quarantine_allowances_parse_and_refuse_what_the_map_cannot_hold() {
        let parsed = parse_quarantine_allow("udp/53, TCP/53").unwrap();
        assert_eq!(parsed, vec![allow(17, 53), allow(6, 53)]);
        assert_eq!(
            parsed.iter().map(format_allow).collect::<Vec<_>>(),
            ["udp/53", "tcp/53"]
        );
        assert!(parse_quarantine_allow("").unwrap().is_empty());
        assert!(parse_quarantine_allow("icmp/1").is_err());
        assert!(parse_quarantine_allow("udp/0").is_err());
        assert!(parse_quarantine_allow("udp").is_err());
        assert!(parse_quarantine_allow("udp/1,udp/2,udp/3,udp/4,udp/5").is_err());
    }
}
