//! moatd, the node daemon: it loads and owns the datapath, keeps identity and policy entries
//! current as endpoints and policies change, and serves the local API that moat-cni and
//! moatctl use. The policy logic itself lives in the pure `moat-policy` crate.

pub mod after_dnat;
pub mod capacity;
pub mod daemon;
pub mod desired;
pub mod fill_watch;
pub mod flow_export;
pub mod flow_graph;
pub mod flows;
pub mod fqdn;
pub mod host_addresses;
pub mod install;
pub mod kube;
pub mod links;
pub mod local;
pub mod masquerade;
pub mod memory;
pub mod metrics;
pub mod policy_check;
pub mod promotion;
pub mod quarantine;
pub mod routes;
pub mod server;
pub mod service_nat;
pub mod status;
pub mod store;
pub mod suggest;
pub mod threats;
pub mod verify;
pub mod workload;

/// The local API lives in its own light crate (shared with moat-cni); `crate::api` keeps its
/// old path for moatd's modules and tools.
pub use moat_api as api;
