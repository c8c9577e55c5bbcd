//! moat-cni: the Moat CNI plugin.
//!
//! The CNI wire protocol (environment, config, results, errors, dispatch) is the
//! `moat-cni-protocol` crate, shared with moat-ipam; the binary wires it to the datapath.
//! `config` reads Moat's own keys of the network configuration (pure, so it is unit-tested and
//! fuzzed: fuzz/, targets `config` and `cni_args`).

pub mod config;
