//! moat-ipam: host-local style address management for Moat.
//!
//! Addresses come from configured ranges (one range set per family), are recorded per
//! attachment `(container ID, ifname)` in a locked, crash-safe state file, and are released on
//! DEL or GC. Used as a library by moat-cni and as the standalone `moat-ipam` CNI binary.

pub mod config;
pub mod error;
pub mod plugin;
pub mod pool;
pub mod store;

use moat_cni_protocol::Attachment;

pub use config::{DEFAULT_DATA_DIR, Family, IpamConfig, RangeConfig};
pub use error::{IpamError, Result};
pub use plugin::IpamPlugin;
pub use pool::{Allocation, StoredAllocation};

use store::LockedPool;

/// Opens the network's state under its lock, after checking the config.
fn open_pool(
    network_name: &str,
    config: &IpamConfig,
) -> Result<(LockedPool, Vec<config::RangeSet>)> {
    let sets = config.range_sets()?;
    let pool = LockedPool::open(&config.network_dir(network_name)?)?;
    Ok((pool, sets))
}

/// Gives the attachment one address per configured family. Repeating it for the same
/// attachment returns the same addresses.
pub fn allocate(
    network_name: &str,
    container_id: &str,
    ifname: &str,
    config: &IpamConfig,
) -> Result<Vec<Allocation>> {
    let (mut pool, sets) = open_pool(network_name, config)?;
    let before = pool.state.clone();
    let allocations = pool
        .state
        .allocate(&sets, &config.reserved, container_id, ifname)?;
    if pool.state != before {
        pool.commit()?;
    }
    Ok(allocations)
}

/// Releases the attachment's addresses. Succeeds when it holds none (DEL is idempotent), and
/// does not create any state when the network has none yet.
pub fn release(
    network_name: &str,
    container_id: &str,
    ifname: &str,
    config: &IpamConfig,
) -> Result<()> {
    let dir = config.network_dir(network_name)?;
    if !dir.exists() {
        return Ok(());
    }
    let mut pool = LockedPool::open(&dir)?;
    if pool.state.release(container_id, ifname) > 0 {
        pool.commit_release()?;
    }
    Ok(())
}

/// The attachment's current addresses; an error if it holds none in the configured ranges.
pub fn check(
    network_name: &str,
    container_id: &str,
    ifname: &str,
    config: &IpamConfig,
) -> Result<Vec<Allocation>> {
    let (pool, sets) = open_pool(network_name, config)?;
    let held = pool.state.allocations_of(&sets, container_id, ifname);
    if held.len() < sets.len() {
        return Err(IpamError::AllocationMissing {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        });
    }
    Ok(held)
}

/// Releases every allocation whose attachment is not in `valid`, and returns what it released.
pub fn gc(
    network_name: &str,
    valid: &[Attachment],
    config: &IpamConfig,
) -> Result<Vec<StoredAllocation>> {
    let dir = config.network_dir(network_name)?;
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut pool = LockedPool::open(&dir)?;
    let released = pool.state.retain_only(valid);
    if !released.is_empty() {
        pool.commit()?;
    }
    Ok(released)
}

/// True when some family has no free address, so an ADD would fail (STATUS reports code 50).
pub fn is_exhausted(network_name: &str, config: &IpamConfig) -> Result<bool> {
    Ok(exhausted_family(network_name, config)?.is_some())
}

/// The family that has run out, if any.
pub fn exhausted_family(network_name: &str, config: &IpamConfig) -> Result<Option<Family>> {
    let (pool, sets) = open_pool(network_name, config)?;
    Ok(pool.state.exhausted_family(&sets, &config.reserved))
}
