//! How full each map is, counted cheaply enough to answer a status request or a scrape.
//!
//! The kernel keeps no element count that userspace can read, so counting means walking the
//! map. Walking key by key (BPF_MAP_GET_NEXT_KEY) is one syscall per entry: about 0.1 s for a
//! full 262,144-entry conntrack table. Hash and LRU maps are therefore counted with
//! BPF_MAP_LOOKUP_BATCH, which copies up to `BATCH` entries per syscall (64 syscalls for the
//! full conntrack table, into one reused buffer). LPM tries have no batch operation; they are
//! walked key by key, and they hold only what moatd wrote (addresses and CIDRs).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::maps::{MapData, MapType};
use moat_common::{map_name, map_size};

use crate::PinDir;

/// Entries copied per batch syscall.
const BATCH: u32 = 4096;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// One map's fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// Short name used in status and metrics ("conntrack", "ipcache_v4", ...).
    pub name: &'static str,
    /// The pinned map's name (MOAT_CT, ...).
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// The maps whose fill is reported, in display order.
pub const FILL_MAPS: [(&str, &str, u32); 12] = [
    ("endpoints", map_name::ENDPOINTS, map_size::ENDPOINTS),
    ("ipcache_v4", map_name::IPCACHE_V4, map_size::IPCACHE),
    ("ipcache_v6", map_name::IPCACHE_V6, map_size::IPCACHE),
    ("policy", map_name::POLICY, map_size::POLICY),
    ("port_ranges", map_name::PORT_RANGES, map_size::PORT_RANGES),
    ("cidr_v4", map_name::CIDR_V4, map_size::CIDR),
    ("cidr_v6", map_name::CIDR_V6, map_size::CIDR),
    ("conntrack", map_name::CONNTRACK, map_size::CONNTRACK),
    (
        "fqdn_patterns",
        map_name::FQDN_PATTERNS,
        map_size::FQDN_PATTERNS,
    ),
    ("fqdn_v4", map_name::FQDN_V4, map_size::FQDN_ADDRS),
    ("fqdn_v6", map_name::FQDN_V6, map_size::FQDN_ADDRS),
    ("fqdn_names", map_name::FQDN_NAMES, map_size::FQDN_NAMES),
];

/// Fill of every map in `FILL_MAPS`; a map that cannot be opened or read is left out.
pub fn map_fill(pins: &PinDir) -> Vec<MapFill> {
    FILL_MAPS
        .iter()
        .filter_map(|&(name, map, default_capacity)| {
            let data = MapData::from_pin(pins.map(map)).ok()?;
            let info = data.info().ok()?;
            let capacity = match info.max_entries() {
                0 => default_capacity,
                n => n,
            } as u64;
            let fd = data.fd().as_fd();
            let entries = match info.map_type().ok()? {
                MapType::Hash | MapType::LruHash => {
                    count_batched(fd, info.key_size() as usize, info.value_size() as usize)
                        .or_else(|_| count_by_keys(fd, info.key_size() as usize))
                }
                _ => count_by_keys(fd, info.key_size() as usize),
            }
            .ok()?;
            Some(MapFill {
                name,
                map,
                entries,
                capacity,
            })
        })
        .collect()
}

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u64], size: usize) -> std::io::Result<()> {
    // SAFETY: `attr` is a zero-initialised bpf_attr of at least `size` bytes laid out as the
    // command expects; the pointers in it stay valid for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// BPF_MAP_LOOKUP_BATCH until ENOENT; the batch token of hash maps is a bucket index (u32).
fn count_batched(fd: BorrowedFd<'_>, key_size: usize, value_size: usize) -> std::io::Result<u64> {
    let mut keys = vec![0u8; key_size * BATCH as usize];
    let mut values = vec![0u8; value_size * BATCH as usize];
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    let mut total = 0u64;
    loop {
        // struct { u64 in_batch, out_batch, keys, values; u32 count, map_fd; u64 elem_flags,
        // flags; }
        let mut attr = [0u64; 6];
        attr[0] = if first {
            0
        } else {
            token_in.as_mut_ptr() as u64
        };
        attr[1] = token_out.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = BATCH as u64 | ((fd.as_raw_fd() as u32 as u64) << 32);
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr, 48);
        // The kernel writes back how many entries it copied, also with ENOENT (last batch).
        let copied = attr[4] & 0xffff_ffff;
        match result {
            Ok(()) => {
                total += copied;
                token_in = token_out;
                first = false;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total + copied),
            Err(e) => return Err(e),
        }
    }
}

/// BPF_MAP_GET_NEXT_KEY from no key until ENOENT.
fn count_by_keys(fd: BorrowedFd<'_>, key_size: usize) -> std::io::Result<u64> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    let mut total = 0u64;
    loop {
        // struct { u32 map_fd; u64 key; u64 next_key; u64 flags; }
        let mut attr = [0u64; 4];
        attr[0] = fd.as_raw_fd() as u32 as u64;
        attr[1] = if first { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr, 32) {
            Ok(()) => {
                total += 1;
                std::mem::swap(&mut key, &mut next);
                first = false;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}
