//! An endpoint's enforcement mode: one type from where a mode is written (a pod's
//! annotation, a MoatPolicy, the CLI) to the byte the datapath reads, so that an unknown
//! spelling is refused where it enters instead of being taken for some other mode later.

use serde::{Deserialize, Serialize};

/// Enforcement mode of an endpoint. Serialized as `enforce`, `audit` or `learn` (the wire,
/// the endpoint registry on disk and the MoatPolicy field all use these spellings).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// Drop what policy does not allow. The default: an endpoint nothing says otherwise
    /// about is protected.
    #[default]
    Enforce,
    /// Let through what policy would drop, and report it.
    Audit,
    /// Let everything through and report it, to learn the flows policy should allow.
    Learn,
}

/// A mode spelled some other way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?}: must be enforce, audit or learn")]
pub struct UnknownMode(pub String);

impl EndpointMode {
    pub const ALL: [EndpointMode; 3] = [Self::Enforce, Self::Audit, Self::Learn];

    /// The MOAT_ENDPOINTS mode byte.
    pub fn code(self) -> u8 {
        match self {
            Self::Enforce => moat_common::MODE_ENFORCE,
            Self::Audit => moat_common::MODE_AUDIT,
            Self::Learn => moat_common::MODE_LEARN,
        }
    }

    /// The mode a datapath byte stands for; a byte no mode writes reads as enforce, which is
    /// what the eBPF programs do with it.
    pub fn from_code(code: u8) -> Self {
        match code {
            moat_common::MODE_AUDIT => Self::Audit,
            moat_common::MODE_LEARN => Self::Learn,
            _ => Self::Enforce,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Learn => "learn",
        }
    }

    /// Higher is stricter; the strictest mode of the policies selecting a pod wins.
    pub fn strictness(self) -> u8 {
        match self {
            Self::Learn => 0,
            Self::Audit => 1,
            Self::Enforce => 2,
        }
    }

    pub fn strictest(self, other: Self) -> Self {
        if other.strictness() > self.strictness() {
            other
        } else {
            self
        }
    }
}

impl std::fmt::Display for EndpointMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Compares with a spelling, so that a check of a record reads as its JSON does.
impl PartialEq<&str> for EndpointMode {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

impl std::str::FromStr for EndpointMode {
    type Err = UnknownMode;

    /// Exact spellings only: `Audit` or `audit ` is refused rather than guessed at.
    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMode(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_serialize_and_code_alike() {
        for mode in EndpointMode::ALL {
            assert_eq!(mode.name().parse::<EndpointMode>(), Ok(mode));
            assert_eq!(
                serde_json::to_value(mode).unwrap(),
                serde_json::json!(mode.name())
            );
            assert_eq!(EndpointMode::from_code(mode.code()), mode);
        }
        assert_eq!(EndpointMode::default(), EndpointMode::Enforce);
    }

    #[test]
    fn an_unknown_spelling_is_an_error_naming_it() {
        for bad in ["relaxed", "Audit", "", " enforce"] {
            let e = bad.parse::<EndpointMode>().unwrap_err();
            assert_eq!(e, UnknownMode(bad.to_string()));
            assert!(e.to_string().contains("enforce, audit or learn"), "{e}");
            assert!(serde_json::from_value::<EndpointMode>(serde_json::json!(bad)).is_err());
        }
    }

    #[test]
    fn the_strictest_mode_wins() {
        use EndpointMode::*;
        assert_eq!(Learn.strictest(Audit), Audit);
        assert_eq!(Enforce.strictest(Learn), Enforce);
        assert_eq!(Audit.code(), moat_common::MODE_AUDIT);
    }
}
