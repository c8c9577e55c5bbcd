//! Reading the datapath's ring buffers: verdict events (MOAT_EVENTS) and threat detections
//! (MOAT_THREATEV). One reader per ring and process; each ring is shared by all CPUs and
//! endpoints, and the kernel side bounds what goes in (a rate limit for verdicts, one report
//! per subject and window for detections).

use std::{
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::maps::{Map, MapData, RingBuf};
use moat_common::{FlowEvent, ThreatEvent, map_name};

use crate::{Error, PinDir, Result};

/// Reads records of type `T` (a repr(C) struct of plain integers) from a pinned ring.
pub struct RingReader<T> {
    ring: RingBuf<MapData>,
    record: PhantomData<T>,
}

/// Verdict events.
pub type EventReader = RingReader<FlowEvent>;
/// Threat detections.
pub type ThreatEventReader = RingReader<ThreatEvent>;

impl RingReader<FlowEvent> {
    pub fn open(pins: &PinDir) -> Result<Self> {
        Self::open_named(pins, map_name::EVENTS)
    }
}

impl RingReader<ThreatEvent> {
    pub fn open(pins: &PinDir) -> Result<Self> {
        Self::open_named(pins, map_name::THREAT_EVENTS)
    }
}

impl<T: aya::Pod> RingReader<T> {
    fn open_named(pins: &PinDir, name: &'static str) -> Result<Self> {
        let path = pins.map(name);
        let data = MapData::from_pin(&path).map_err(|source| Error::MissingMap {
            name,
            path: path.display().to_string(),
            source,
        })?;
        let ring = RingBuf::try_from(Map::RingBuf(data))
            .with_context(|| format!("map {name} is not a ring buffer"))?;
        Ok(Self {
            ring,
            record: PhantomData,
        })
    }

    /// Everything available now, without waiting.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<T>() {
                // SAFETY: the kernel wrote a T (repr(C), plain integers: aya::Pod) here; read
                // unaligned because the ring gives no alignment promise to userspace.
                let record = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) };
                out.push(record);
            }
        }
        out
    }

    /// Waits up to `timeout` for at least one record, then returns all that are there.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<T>> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.drain();
            if !records.is_empty() {
                return Ok(records);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(records);
            }
            let mut pfd = libc::pollfd {
                fd: self.ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms.max(1)) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(anyhow::Error::from(err).context("polling events").into());
                }
            }
        }
    }

    /// Collects records until `timeout` has passed (for tests and `moatctl observe --since`).
    pub fn collect_for(&mut self, timeout: Duration) -> Result<Vec<T>> {
        let deadline = Instant::now() + timeout;
        let mut all = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                all.extend(self.drain());
                return Ok(all);
            }
            all.extend(self.wait(left)?);
        }
    }
}
