//! The datapath half of `moatctl status`: program versions, map fill and event loss, read
//! from the kernel at request time.

use std::{sync::atomic::Ordering, time::UNIX_EPOCH};

use moat_common::{
    CONFIG_FLAG_LOCAL_VIA_HOST, Config, DEFAULT_EVENTS_BURST, DEFAULT_EVENTS_PER_SECOND,
    LAYOUT_VERSION, METRIC_EVENTS_RATE_LIMITED, METRIC_EVENTS_RING_FULL,
};
use moat_datapath::{Datapath, Maps, PinDir};

use crate::api::{DatapathStatus, EventLoss, MapFillStatus, ProgramStatus};

pub fn datapath_status(pins: &PinDir, maps: &Maps, datapath: &Datapath) -> DatapathStatus {
    let programs = moat_datapath::loader::pinned_programs(pins)
        .into_iter()
        .map(|p| ProgramStatus {
            name: p.name.to_string(),
            id: p.id,
            tag: format!("{:016x}", p.tag),
            loaded_ms: p
                .loaded_at
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        })
        .collect();
    let maps_fill = moat_datapath::fill::map_fill(pins)
        .into_iter()
        .map(|f| MapFillStatus {
            name: f.name.to_string(),
            entries: f.entries,
            capacity: f.capacity,
        })
        .collect();
    let config = maps.config.get(&0, 0).unwrap_or_default();
    DatapathStatus {
        layout_version: LAYOUT_VERSION,
        maps_adopted: datapath.adopted,
        links_updated: datapath.links_updated,
        local_delivery: local_delivery(&config).to_string(),
        programs,
        maps: maps_fill,
        events: event_loss(maps, &config),
    }
}

fn local_delivery(config: &Config) -> &'static str {
    if config.flags & CONFIG_FLAG_LOCAL_VIA_HOST != 0 {
        "host-stack"
    } else {
        "direct"
    }
}

fn event_loss(maps: &Maps, config: &Config) -> EventLoss {
    let or_default = |v: u32, d: u32| if v == 0 { d } else { v };
    let stats = &crate::flows::hub().stats;
    EventLoss {
        rate_per_cpu: or_default(config.events_per_second, DEFAULT_EVENTS_PER_SECOND),
        burst: or_default(config.events_burst, DEFAULT_EVENTS_BURST),
        rate_limited: maps
            .special_counter(METRIC_EVENTS_RATE_LIMITED)
            .unwrap_or(0),
        ring_full: maps.special_counter(METRIC_EVENTS_RING_FULL).unwrap_or(0),
        received: stats.received.load(Ordering::Relaxed),
        journal_write_failed: stats.journal_write_failed.load(Ordering::Relaxed),
        follower_dropped: stats.follower_dropped.load(Ordering::Relaxed),
    }
}
