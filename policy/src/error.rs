//! The crate's one error type. Every error about a policy names the object (namespace/name)
//! and the field path, so an operator can find the line to fix.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// The document is not a well-formed NetworkPolicy (syntax, unknown field, wrong type).
    #[error("{object}: {path}: {message}")]
    Parse {
        object: String,
        path: String,
        message: String,
    },
    /// Well-formed but rejected by the rules the API server applies.
    #[error("{object}: {path}: {message}")]
    Invalid {
        object: String,
        path: String,
        message: String,
    },
    /// One CIDR entry would need more port rules than a `PortRuleSet` holds, even merged.
    #[error(
        "policy_id {policy_id} {direction} {prefix}: needs {count} port rules after merging, the datapath holds at most {max}; split the ipBlock or simplify its ports"
    )]
    TooManyPortRules {
        policy_id: u32,
        direction: &'static str,
        prefix: String,
        count: usize,
        max: usize,
    },
    /// An identifier space is exhausted (never expected in practice: 2^24 or more ids).
    #[error("no free id left in {space}")]
    IdSpaceExhausted { space: &'static str },
    #[error("unknown pod {0}")]
    UnknownPod(String),
    #[error("pod {0} has no address of the family needed")]
    NoAddress(String),
}
