//! Resizing pinned maps. A BPF map's size is fixed when it is created, so a new size means a
//! new map: before the object is loaded, the pinned map is moved aside (`<pin>_resizing`),
//! the loader creates and pins the new one at the configured size, every entry is copied
//! over, and the programs loaded next (and the endpoint links moved onto them) use it. Only
//! then is the old map's pin removed. Any failure before that puts the old map back where it
//! was, so a refused resize leaves the previous state enforcing.
//!
//! What the running programs write into the old map between the copy and the link update
//! (a few milliseconds: conntrack entries of flows opened in that window, learned FQDN
//! addresses) is not carried over. A flow whose entry is missing is judged again by policy
//! on its next packet.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::PathBuf,
};

use anyhow::Context;
use aya::maps::MapData;
use tracing::info;

use crate::{PinDir, Result, fill::bpf};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Appended to the pin name of a map moved aside while it is resized.
pub const ASIDE_SUFFIX: &str = "_resizing";

/// Maps moved aside for a resize, put back on drop unless `finish` ran.
pub struct Resizing {
    maps: Vec<Aside>,
    done: bool,
}

struct Aside {
    name: &'static str,
    pin: PathBuf,
    old: PathBuf,
    from: u32,
    to: u32,
}

impl Resizing {
    /// Moves every map in `resize` ((name, pinned size, configured size)) aside.
    pub fn set_aside(pins: &PinDir, resize: &[(&'static str, u32, u32)]) -> Result<Self> {
        let mut this = Self {
            maps: Vec::new(),
            done: false,
        };
        for &(name, from, to) in resize {
            let pin = pins.map(name);
            // bpffs refuses names with a dot.
            let old = pins.map(&format!("{name}{ASIDE_SUFFIX}"));
            fs::rename(&pin, &old)
                .with_context(|| format!("moving {} aside to resize it", pin.display()))?;
            this.maps.push(Aside {
                name,
                pin,
                old,
                from,
                to,
            });
        }
        Ok(this)
    }

    /// Copies every entry of each old map into the new map pinned in its place. Fails, naming
    /// the map, when the new map refuses an entry (it is smaller than what the old one holds).
    pub fn carry_over(&self) -> Result<()> {
        for aside in &self.maps {
            let old = MapData::from_pin(&aside.old)
                .with_context(|| format!("opening {}", aside.old.display()))?;
            let new = MapData::from_pin(&aside.pin)
                .with_context(|| format!("opening the resized {}", aside.pin.display()))?;
            let info = old.info().context("reading map info")?;
            let copied = copy_entries(
                old.fd().as_fd(),
                new.fd().as_fd(),
                info.key_size() as usize,
                info.value_size() as usize,
                aside.from as u64 * 2,
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "resizing {} from {} to {} entries: {e}; it keeps its size (raise the \
                     configured size, or let it drain first)",
                    aside.name,
                    aside.from,
                    aside.to
                )
            })?;
            info!(
                map = aside.name,
                from = aside.from,
                to = aside.to,
                copied,
                "map resized"
            );
        }
        Ok(())
    }

    /// The new maps are in use: the old ones' pins go (the kernel frees them with their last
    /// reference).
    pub fn finish(mut self) {
        for aside in &self.maps {
            let _ = fs::remove_file(&aside.old);
        }
        self.done = true;
    }
}

impl Drop for Resizing {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for aside in &self.maps {
            let _ = fs::remove_file(&aside.pin);
            let _ = fs::rename(&aside.old, &aside.pin);
        }
    }
}

/// Every entry of `from` into `to` (BPF_ANY), walking keys; at most `limit` steps, since the
/// running programs may be changing `from` under the walk.
fn copy_entries(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    limit: u64,
) -> std::io::Result<u64> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut first = true;
    let mut copied = 0u64;
    for _ in 0..limit {
        // struct { u32 map_fd; u64 key; u64 next_key; u64 flags; }
        let mut attr = [0u64; 4];
        attr[0] = from.as_raw_fd() as u32 as u64;
        attr[1] = if first { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr, 32) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(copied),
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut key, &mut next);
        first = false;
        // struct { u32 map_fd; u64 key; u64 value; u64 flags; }
        let mut lookup = [0u64; 4];
        lookup[0] = from.as_raw_fd() as u32 as u64;
        lookup[1] = key.as_ptr() as u64;
        lookup[2] = value.as_mut_ptr() as u64;
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut lookup, 32) {
            Ok(()) => {}
            // Deleted (or evicted) since the walk saw it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        }
        let mut update = [0u64; 4];
        update[0] = to.as_raw_fd() as u32 as u64;
        update[1] = key.as_ptr() as u64;
        update[2] = value.as_ptr() as u64;
        bpf(BPF_MAP_UPDATE_ELEM, &mut update, 32).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("the new map refused entry {} ({e})", copied + 1),
            )
        })?;
        copied += 1;
    }
    Ok(copied)
}
