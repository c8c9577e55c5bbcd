//! What a flow record says happened, and which way: enums on the wire with the spellings the
//! journal, `moatctl -o json` and the metrics labels have always used.

use serde::{Deserialize, Serialize};

/// What the datapath did with a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// `allow` is accepted as a request's filter, as moatctl always has.
    #[serde(alias = "allow")]
    Allowed,
    #[serde(alias = "drop")]
    Dropped,
    /// Policy would have dropped it; audit or learn mode let it through.
    Audit,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Self::Allowed, Self::Dropped, Self::Audit];

    pub fn name(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Dropped => "dropped",
            Self::Audit => "audit",
        }
    }

    /// The verdict a datapath event carries (`moat_common::VERDICT_*`); a byte no program
    /// writes reads as allowed, as the programs treat it.
    pub fn from_code(code: u8) -> Self {
        match code {
            moat_common::VERDICT_DROP => Self::Dropped,
            moat_common::VERDICT_AUDIT => Self::Audit,
            _ => Self::Allowed,
        }
    }
}

/// Which side of a perimeter a flow crossed, seen from the endpoint that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Compares with a spelling, so that a check of a record reads as its JSON does.
impl PartialEq<&str> for Verdict {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

impl PartialEq<&str> for Direction {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// A verdict spelled some other way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown verdict {0:?}: must be dropped, allowed or audit")]
pub struct UnknownVerdict(pub String);

impl std::str::FromStr for Verdict {
    type Err = UnknownVerdict;

    /// The names, and `drop` and `allow` as moatctl's filter has always accepted them.
    fn from_str(s: &str) -> Result<Self, UnknownVerdict> {
        match s {
            "drop" => Ok(Self::Dropped),
            "allow" => Ok(Self::Allowed),
            _ => Self::ALL
                .into_iter()
                .find(|v| v.name() == s)
                .ok_or_else(|| UnknownVerdict(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_keep_their_wire_spelling_and_parse_their_aliases() {
        for v in Verdict::ALL {
            assert_eq!(
                serde_json::to_value(v).unwrap(),
                serde_json::json!(v.name())
            );
            assert_eq!(v.name().parse::<Verdict>(), Ok(v));
        }
        assert_eq!("drop".parse::<Verdict>(), Ok(Verdict::Dropped));
        assert_eq!(
            serde_json::from_value::<Verdict>(serde_json::json!("allow")).unwrap(),
            Verdict::Allowed
        );
        assert_eq!(
            Verdict::from_code(moat_common::VERDICT_AUDIT),
            Verdict::Audit
        );
        assert!("denied".parse::<Verdict>().is_err());
        assert_eq!(
            serde_json::to_value(Direction::Egress).unwrap(),
            serde_json::json!("egress")
        );
    }
}
