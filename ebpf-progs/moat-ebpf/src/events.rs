//! Verdict events into the ring buffer, behind a per-CPU token bucket so that a flood of
//! drops cannot fill the ring faster than the daemon drains it. What the limiter or a full
//! ring swallows is counted, so loss is visible in the metrics.

use moat_common::{
    Config, DEFAULT_EVENTS_BURST, DEFAULT_EVENTS_PER_SECOND, FlowEvent, METRIC_EVENTS_RATE_LIMITED,
    METRIC_EVENTS_RING_FULL,
};

use crate::{
    maps::{CONFIG, EVENTS, RATE_LIMIT},
    metrics,
    parse::Packet,
};

/// Tokens are kept in nanosecond-events so that refilling needs no division.
const TOKEN: u64 = 1_000_000_000;
/// Longest idle gap credited at once; keeps the refill product far from overflow.
const MAX_REFILL_NS: u64 = 10 * TOKEN;

#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

#[inline(always)]
fn take_token(cfg: &Config, now: u64) -> bool {
    let rate = if cfg.events_per_second == 0 {
        DEFAULT_EVENTS_PER_SECOND
    } else {
        cfg.events_per_second
    } as u64;
    let burst = if cfg.events_burst == 0 {
        DEFAULT_EVENTS_BURST
    } else {
        cfg.events_burst
    } as u64;
    let Some(state) = RATE_LIMIT.get_ptr_mut(0) else {
        return false;
    };
    let state = unsafe { &mut *state };
    let mut elapsed = now.saturating_sub(state.last_ns);
    if elapsed > MAX_REFILL_NS {
        elapsed = MAX_REFILL_NS;
    }
    let cap = burst * TOKEN;
    let mut tokens = state.tokens + elapsed * rate;
    if tokens > cap {
        tokens = cap;
    }
    state.last_ns = now;
    if tokens >= TOKEN {
        state.tokens = tokens - TOKEN;
        true
    } else {
        state.tokens = tokens;
        false
    }
}

pub struct EventFields {
    pub ifindex: u32,
    pub local_identity: u32,
    pub remote_identity: u32,
    pub rule_id: u32,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub mode: u8,
}

#[inline(always)]
pub fn emit(cfg: &Config, pkt: &Packet, f: &EventFields, now: u64) {
    if !take_token(cfg, now) {
        metrics::bump(METRIC_EVENTS_RATE_LIMITED, 0);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        metrics::bump(METRIC_EVENTS_RING_FULL, 0);
        return;
    };
    entry.write(FlowEvent {
        timestamp_ns: now,
        ifindex: f.ifindex,
        local_identity: f.local_identity,
        remote_identity: f.remote_identity,
        rule_id: f.rule_id,
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        direction: f.direction,
        verdict: f.verdict,
        reason: f.reason,
        mode: f.mode,
        tcp_flags: pkt.tcp_flags,
        _pad: 0,
        bytes: pkt.len,
    });
    entry.submit(0);
}
