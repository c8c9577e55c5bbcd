//! Tests and benchmarks only: what moat's tests and `moat-bench` share, kept out of the crates
//! that ship (moat-cni, moat-ipam, moatd, moatctl depend on none of it).
//!
//! - [`moatd`]: a private moatd for a test or a benchmark (flags through a builder, waits until
//!   it answers on its socket, killed on drop);
//! - [`dns`]: DNS queries and responses built and read by hand, for tests with real and
//!   forged resolvers;
//! - [`cni`]: one execution of a CNI plugin binary (the `CNI_*` environment, the config on
//!   stdin, its exit status and output);
//! - with feature `datapath`: [`packet`] (crafted frames), [`testrun`] (BPF_PROG_TEST_RUN of
//!   the pinned programs) and [`lab`] (pods as network namespaces);
//! - with feature `policy`: [`synthetic`], clusters for the policy engine's benchmarks;
//! - with feature `moatd`: [`churn`], a local-datastore cluster for moatd's churn benchmark.

pub mod cni;
/// DNS messages on the wire (queries, forged responses, answer reading).
pub mod dns;
pub mod moatd;

#[cfg(feature = "moatd")]
pub mod churn;
#[cfg(feature = "datapath")]
pub mod packet;
#[cfg(feature = "datapath")]
pub mod testrun;

/// The namespace lab: pods as network namespaces wired by veths.
#[cfg(feature = "datapath")]
pub mod lab;

/// Synthetic clusters for the policy engine's benchmarks and moatd's property tests.
#[cfg(feature = "policy")]
pub mod synthetic;

pub use moatd::{Moatd, MoatdBuilder};

/// A workspace binary (moatd, moat-cni, moat-ipam, ...) next to the running test or benchmark
/// executable: target/<profile>/ for target/<profile>/deps/<test>. `make test` builds them
/// first.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the current executable");
    let path = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps/<test>")
        .join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}
