//! Tests and benchmarks only: what moat's tests and `moat-bench` share, kept out of the crates
//! that ship (moat-cni, moat-ipam, moatd, moatctl depend on none of it).
//!
//! - with feature `datapath`: [`packet`] (crafted frames), [`testrun`] (BPF_PROG_TEST_RUN of
//!   the pinned programs) and [`lab`] (pods as network namespaces; it still lives in
//!   moat-datapath, see below);
//! - with feature `policy`: [`synthetic`], clusters for the policy engine's benchmarks (it
//!   still lives in moat-policy, see below);
//! - with feature `moatd`: [`churn`], a local-datastore cluster for moatd's churn benchmark.

#[cfg(feature = "moatd")]
pub mod churn;
#[cfg(feature = "datapath")]
pub mod packet;
#[cfg(feature = "datapath")]
pub mod testrun;

/// The namespace lab. Its code is still `moat_datapath::lab`: the conformance runner
/// (conformance/src/live.rs) imports it from there, so it moves here together with that import.
/// Tests and benchmarks name it through this path already.
#[cfg(feature = "datapath")]
pub use moat_datapath::lab;

/// Synthetic clusters for the policy engine. The code is still `moat_policy::bench`: moatd's
/// own unit tests (node-daemon/src/desired.rs) import it from there, so it moves here together
/// with that import.
#[cfg(feature = "policy")]
pub use moat_policy::bench as synthetic;
