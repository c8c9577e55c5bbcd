//! moat-policy: Moat's policy engine without I/O. Labels and selectors, NetworkPolicy parsing
//! and validation, identities derived from labels, compilation to the datapath's map entries
//! (from scratch or incrementally), and an evaluator that replays the datapath's lookups so
//! that `moatctl` and offline conformance tests can ask "would this flow pass?".

pub mod cidr;
pub mod compile;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod identity;
pub mod labels;
pub mod netpol;
pub mod selector;

pub use compile::{
    Allocators, ClusterInputs, ContainerPort, DatapathState, Endpoint, Pod, PodRef, RuleRef,
    compile, compile_with,
};
pub use engine::{Delta, Engine, MapDelta};
pub use error::Error;
pub use evaluate::{DirectionVerdict, FlowEnd, Verdict, evaluate};
pub use identity::{Identity, IdentityRegistry, SecurityLabels};
pub use labels::LabelSet;
pub use netpol::{Direction, NetworkPolicy, NormalizedPolicy, Protocol};
pub use selector::{LabelSelector, LabelSelectorRequirement, Operator};
