//! The one error type of moat-ipam, and how each case maps onto a CNI error code.
//!
//! Exhaustion gets a plugin-defined code (100) rather than 11 "try again later": retrying soon
//! does not help until pods are deleted, and STATUS reports the same condition as code 50.

use std::path::PathBuf;

use moat_cni_protocol::{CniError, ErrorCode};

/// CNI code for "no free address left in a range set" (plugin-defined, >= 100).
pub const CODE_RANGE_EXHAUSTED: u32 = 100;
/// CNI code for CHECK finding no allocation for the attachment.
pub const CODE_ALLOCATION_MISSING: u32 = 101;
/// CNI code for a state file that cannot be decoded.
pub const CODE_CORRUPT_STATE: u32 = 102;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid IPAM configuration: {0}")]
    InvalidConfig(String),

    #[error("no free {family} address left in range set {ranges}")]
    RangeExhausted {
        family: &'static str,
        ranges: String,
    },

    #[error("no address is allocated to container {container_id} interface {ifname}")]
    AllocationMissing {
        container_id: String,
        ifname: String,
    },

    #[error(
        "IPAM state file {path} is unreadable ({detail}); it was not modified. Inspect or restore \
         it: deleting it forgets every allocation of this network and may hand out addresses \
         still in use"
    )]
    CorruptState { path: PathBuf, detail: String },

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl IpamError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> IpamError {
        IpamError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            IpamError::InvalidConfig(_) => ErrorCode::InvalidNetworkConfig,
            IpamError::RangeExhausted { .. } => ErrorCode::Plugin(CODE_RANGE_EXHAUSTED),
            IpamError::AllocationMissing { .. } => ErrorCode::Plugin(CODE_ALLOCATION_MISSING),
            IpamError::CorruptState { .. } => ErrorCode::Plugin(CODE_CORRUPT_STATE),
            IpamError::Io { .. } => ErrorCode::IoFailure,
        }
    }
}

impl From<IpamError> for CniError {
    fn from(error: IpamError) -> CniError {
        let msg = match &error {
            IpamError::InvalidConfig(_) => "invalid IPAM configuration",
            IpamError::RangeExhausted { .. } => "IP address range exhausted",
            IpamError::AllocationMissing { .. } => "no IP allocation for this attachment",
            IpamError::CorruptState { .. } => "IPAM state is corrupt",
            IpamError::Io { .. } => "IPAM state I/O failure",
        };
        CniError::new(error.code(), msg).with_details(error.to_string())
    }
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;
