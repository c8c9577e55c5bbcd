//! moat-cni: the Moat CNI plugin.
//!
//! The `protocol` module is the CNI 1.1 wire protocol (environment, config, results, errors,
//! dispatch) kept free of netlink so it can be unit-tested without root; the binary wires it to
//! the datapath. `config` reads Moat's own keys of the network configuration (pure, so it is
//! unit-tested and fuzzed: fuzz/, targets `config` and `cni_args`).

pub mod config;
pub mod protocol;
