//! The CNI 1.1 protocol as a pure library: environment, configuration, results, errors and the
//! command dispatcher, shared by moat-cni and moat-ipam.
//!
//! Nothing here touches netlink or the filesystem, so every rule of the spec that the protocol
//! alone decides is unit-tested without root. It is a crate of its own, not a module of
//! moat-cni, so that a plugin using it does not build moat-cni's datapath and eBPF programs.

pub mod args;
pub mod dispatch;
pub mod env;
pub mod error;
pub mod types;
pub mod version;

pub use args::CniArgs;
pub use dispatch::{
    AttachmentRequest, DispatchOutcome, NetworkRequest, Plugin, dispatch, run_as_process,
};
pub use env::{CniEnvironment, Command};
pub use error::{CniError, ErrorCode};
pub use types::{
    Attachment, Dns, Interface, IpConfig, IpamSection, NetworkConfig, Route, SuccessResult,
};
pub use version::{CniVersion, SUPPORTED_VERSIONS, VersionInfo};
