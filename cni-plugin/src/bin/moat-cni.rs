//! The moat-cni binary: the runtime executes it once per CNI command.
//!
//! VERSION (and every protocol-level check) is served by the protocol dispatcher already; the
//! commands that need the datapath answer a clear error until the lead wires them.

use moat_cni::protocol::{
    AttachmentRequest, CniError, NetworkRequest, Plugin, SuccessResult, run_as_process,
};

const ABOUT: &str = "moat-cni: eBPF-based CNI plugin for Kubernetes";

struct UnwiredPlugin;

fn not_built_yet() -> CniError {
    CniError::invalid_network_config("moat-cni: datapath wiring not built yet")
}

impl Plugin for UnwiredPlugin {
    fn add(&self, _: &AttachmentRequest) -> Result<SuccessResult, CniError> {
        Err(not_built_yet())
    }
    fn del(&self, _: &AttachmentRequest) -> Result<(), CniError> {
        Err(not_built_yet())
    }
    fn check(&self, _: &AttachmentRequest) -> Result<(), CniError> {
        Err(not_built_yet())
    }
    fn status(&self, _: &NetworkRequest) -> Result<(), CniError> {
        Err(not_built_yet())
    }
    fn gc(&self, _: &NetworkRequest) -> Result<(), CniError> {
        Err(not_built_yet())
    }
}

fn main() {
    std::process::exit(run_as_process(&UnwiredPlugin, ABOUT));
}
