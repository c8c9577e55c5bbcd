//! moatd's side of FQDN egress rules (issue 19). The kernel learns addresses from DNS answers
//! on its own (see moat-common's "FQDN egress"); moatd writes the name patterns with the
//! other policy entries (desired.rs), the TTL settings at start, and prunes what the kernel
//! learned: expired addresses, identities over their cap, identities that are gone.
//!
//! - `settings`: the `--fqdn-*` flags and the MOAT_FQDNCFG value they make;
//! - `sweep`: which learned entries to delete, as a pure function of a snapshot;
//! - `sweeper`: the periodic task that reads the maps and deletes what `sweep` says;
//! - `listing`: what `moatctl fqdn` shows, from a snapshot.

pub mod listing;
pub mod settings;
pub mod sweep;
pub mod sweeper;

pub use settings::FqdnSettings;
