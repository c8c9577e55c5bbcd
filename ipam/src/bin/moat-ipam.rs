//! The moat-ipam CNI binary: usable as the `ipam` plugin of any conflist.

use moat_cni_protocol::run_as_process;
use moat_ipam::IpamPlugin;

const ABOUT: &str = "moat-ipam: host-local style IPAM for Moat";

fn main() {
    std::process::exit(run_as_process(&IpamPlugin, ABOUT));
}
