//! Reading verdict events from the ring buffer. One reader per process; the ring is shared
//! by all CPUs and endpoints, and the kernel side rate-limits what goes in.

use std::{
    os::fd::{AsFd, AsRawFd},
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::maps::{Map, MapData, RingBuf};
use moat_common::{FlowEvent, map_name};

use crate::{Error, PinDir, Result};

pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub fn open(pins: &PinDir) -> Result<Self> {
        let path = pins.map(map_name::EVENTS);
        let data = MapData::from_pin(&path).map_err(|source| Error::MissingMap {
            name: map_name::EVENTS,
            path: path.display().to_string(),
            source,
        })?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).context("events map type")?;
        Ok(Self { ring })
    }

    /// Everything available now, without waiting.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a FlowEvent (repr(C), plain integers) here; read
                // unaligned because the ring gives no alignment promise to userspace.
                let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) };
                out.push(event);
            }
        }
        out
    }

    /// Waits up to `timeout` for at least one event, then returns all that are there.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<FlowEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.drain();
            if !events.is_empty() {
                return Ok(events);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(events);
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

    /// Collects events until `timeout` has passed (for tests and `moatctl observe --since`).
    pub fn collect_for(&mut self, timeout: Duration) -> Result<Vec<FlowEvent>> {
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
