//! The moat-cni binary: the runtime executes it once per CNI command.
//!
//! The protocol dispatcher (`moat_cni_protocol`) validates the invocation; `plugin` wires
//! ADD/DEL/CHECK/STATUS/GC to moatd (registration), the datapath (TCX attach) and netlink.

#[path = "moat-cni/delegate.rs"]
mod delegate;
#[path = "moat-cni/netlink.rs"]
mod netlink;
#[path = "moat-cni/plugin.rs"]
mod plugin;
#[path = "moat-cni/test_hook.rs"]
mod test_hook;

use moat_cni_protocol::run_as_process;

const ABOUT: &str = "moat-cni: eBPF-based CNI plugin for Kubernetes";

fn main() {
    std::process::exit(run_as_process(&plugin::MoatPlugin, ABOUT));
}
