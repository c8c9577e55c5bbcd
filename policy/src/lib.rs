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
//! MoatPolicy's `spec.ingress` / `spec.egress` are not in the CRD schema of
//! manifests/crds/moatpolicies.moat.io.yaml yet (the API server would prune them); the
//! schema addition is, under `spec.properties`:
//!
//! ```yaml
//! ingress:
//!   type: array
//!   maxItems: 64
//!   items:
//!     type: object
//!     required: [from]
//!     properties:
//!       from:
//!         type: array
//!         minItems: 1
//!         maxItems: 64
//!         items:
//!           type: object
//!           required: [group]
//!           properties:
//!             group: {type: string, minLength: 1, maxLength: 63}
//!       ports:            # NetworkPolicyPort, as in networking.k8s.io/v1
//!         type: array
//!         items:
//!           type: object
//!           properties:
//!             protocol: {type: string, enum: [TCP, UDP, SCTP]}
//!             port: {x-kubernetes-int-or-string: true}
//!             endPort: {type: integer, minimum: 1, maximum: 65535}
//! egress:                 # the same, with `to` instead of `from`
//! ```
//!
//! plus a CEL rule on `spec` checking that every referenced group is defined:
//! `self.?ingress.orValue([]).all(r, r.from.all(p, self.?externalGroups.orValue([]).exists(g, g.name == p.group)))`
//! (and the same for egress).

pub mod bench;
pub mod cidr;
pub mod compile;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod identity;
pub mod labels;
pub mod moatpolicy;
pub mod netpol;
pub mod selector;

pub use compile::{
    Allocators, ClusterInputs, ContainerPort, DatapathState, Endpoint, Pod, PodRef, PolicyKind,
    RuleRef, compile, compile_with,
};
pub use engine::{Delta, Engine, MapDelta};
pub use error::Error;
pub use evaluate::{DirectionVerdict, FlowEnd, Verdict, evaluate};
pub use identity::{Identity, IdentityRegistry, SecurityLabels};
pub use labels::LabelSet;
pub use moatpolicy::{MoatPolicy, Mode, NormalizedMoatPolicy};
pub use netpol::{Direction, NetworkPolicy, NormalizedPolicy, Protocol};
pub use selector::{LabelSelector, LabelSelectorRequirement, Operator};
