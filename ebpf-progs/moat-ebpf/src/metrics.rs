//! Per-CPU packet and byte counters by reason and direction: no atomics, no contention; the
//! daemon sums the CPUs when it reads them.

use moat_common::metric_index;

use crate::maps::METRICS;

#[inline(always)]
pub fn count(verdict: u8, reason: u8, direction: u8, bytes: u32) {
    bump(metric_index(verdict, reason, direction), bytes);
}

#[inline(always)]
pub fn bump(index: u32, bytes: u32) {
    if let Some(slot) = METRICS.get_ptr_mut(index) {
        let slot = unsafe { &mut *slot };
        slot.packets += 1;
        slot.bytes += bytes as u64;
    }
}
