//! Userspace side of Moat's datapath: loads the embedded eBPF object, pins its programs and
//! maps under a versioned bpffs directory, re-adopts that state after a restart without
//! flushing it, attaches pod veths by TCX with pinned links, and offers typed map access and
//! the event stream. `moatd`, `moat-cni` and `moatctl` all go through this crate.

pub mod attach;
pub mod events;
pub mod fill;
pub mod fqdn;
pub mod layout;
pub mod loader;
pub mod maps;
pub mod pins;
pub mod resize;
pub mod rtnl;
pub mod sizes;
pub mod tc;
pub mod threats;

pub use attach::{AttachMode, attach_endpoint, attach_endpoint_with, detach_endpoint, is_attached};
pub use events::{EventReader, ThreatEventReader};
pub use fqdn::FqdnMaps;
pub use loader::Datapath;
pub use maps::Maps;
pub use pins::PinDir;
pub use sizes::MapSizes;

/// The eBPF object built by build.rs from ebpf-progs/moat-ebpf.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "pinned map {path} has an incompatible layout ({detail}); it was made by another Moat \
         version. Remove it (or the whole pin directory) to start from empty state"
    )]
    IncompatibleLayout { path: String, detail: String },
    #[error("map {name} is not in the pinned state at {path}: {source}")]
    MissingMap {
        name: &'static str,
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    /// One of the programs moatd loads and pins cannot be opened: moatd is not running with
    /// this pin root, or has not loaded the programs yet. A variant of its own because callers
    /// act on it (moat-cni answers "try again later", not a plugin failure).
    #[error("opening pinned program {name}; is moatd running?: {source}")]
    ProgramNotPinned {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{context}: {source}")]
    Map {
        context: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
