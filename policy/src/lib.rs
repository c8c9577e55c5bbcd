//! moat-policy: Moat's policy engine without I/O. Labels and selectors, NetworkPolicy parsing
//! and validation, identities derived from labels, compilation to the datapath's map entries
//! (from scratch or incrementally), and an evaluator that replays the datapath's lookups so
//! that `moatctl` and offline conformance tests can ask "would this flow pass?".
//!
//! Policies come from NetworkPolicy (networking.k8s.io/v1) and from Moat's own MoatPolicy
//! (moat.io/v1alpha1, see [`moatpolicy`]): per-workload mode, namespace-wide default deny,
//! named external CIDR groups and rules that reference them. Both compile through the same
//! engine; `DatapathState::modes` carries the per-pod mode MoatPolicies set.
//!
//! Egress rules may name DNS names (MoatPolicy `fqdn`, ClusterNetworkPolicy `domainNames`;
//! see [`fqdn`]): each pattern compiles to a selector identity that is a remote identity like
//! any other, plus `DatapathState::fqdn_patterns` entries that tell the datapath which DNS
//! answers teach a pod's identity addresses for it. `evaluate_learned` judges a flow to such
//! an address.
//!
//! The MoatPolicy CRD (manifests/crds/moatpolicies.moat.io.yaml) is generated from the Rust
//! types of the `moat-crds` crate, whose tests round-trip every example through that type and
//! [`MoatPolicy`], so the schema the API server enforces and this engine's object agree.

pub mod cidr;
pub mod cnp;
pub mod compile;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod fqdn;
pub mod identity;
pub mod labels;
pub mod moatpolicy;
pub mod netpol;
pub mod selector;
pub mod yaml;

pub use cnp::{ClusterNetworkPolicy, NormalizedCnp, Tier};
pub use compile::{
    Allocators, ClusterInputs, ContainerPort, DatapathState, Endpoint, NodeInfo, Pod, PodRef,
    PolicyKind, RuleRef, cnp_rule_id, compile, compile_with,
};
pub use engine::{Delta, Engine, MapDelta};
pub use error::Error;
pub use evaluate::{DirectionVerdict, FlowEnd, Verdict, evaluate, evaluate_learned};
pub use fqdn::FqdnPattern;
pub use identity::{Identity, IdentityRegistry, SecurityLabels};
pub use labels::LabelSet;
pub use moatpolicy::{MoatPolicy, Mode, NormalizedMoatPolicy};
pub use netpol::{Direction, NetworkPolicy, NormalizedPolicy, Protocol};
pub use selector::{LabelSelector, LabelSelectorRequirement, Operator};
