//! The `--fqdn-*` settings and the MOAT_FQDNCFG value they make.

use moat_common::FqdnConfig;

/// How long learned addresses admit new connections, and how many one identity keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FqdnSettings {
    /// A learned address admits new connections at least this long, whatever the record's
    /// TTL: resolvers hand out TTLs of 0 or 1, and a client connecting a moment after its
    /// lookup must not be refused.
    pub ttl_floor_s: u32,
    /// ...and at most this long, so that a huge TTL does not pin an address for days.
    pub ttl_cap_s: u32,
    /// Learned addresses one identity keeps; above it moatd deletes its oldest first.
    pub max_per_identity: usize,
}

pub const DEFAULT_TTL_FLOOR_S: u32 = 60;
pub const DEFAULT_TTL_CAP_S: u32 = 86_400;
pub const DEFAULT_MAX_PER_IDENTITY: usize = 1024;

impl Default for FqdnSettings {
    fn default() -> Self {
        Self {
            ttl_floor_s: DEFAULT_TTL_FLOOR_S,
            ttl_cap_s: DEFAULT_TTL_CAP_S,
            max_per_identity: DEFAULT_MAX_PER_IDENTITY,
        }
    }
}

impl FqdnSettings {
    /// Refuses settings the datapath could not honour as stated.
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl_floor_s > self.ttl_cap_s {
            return Err(format!(
                "--fqdn-ttl-floor ({}s) is above --fqdn-ttl-cap ({}s)",
                self.ttl_floor_s, self.ttl_cap_s
            ));
        }
        if self.max_per_identity == 0 {
            return Err("--fqdn-max-per-identity must be at least 1".into());
        }
        Ok(())
    }

    /// For `moatctl status`.
    pub fn describe(&self) -> String {
        format!(
            "learned addresses admit new connections {}-{}s (the record's TTL within); at most {} per identity",
            self.ttl_floor_s, self.ttl_cap_s, self.max_per_identity
        )
    }

    /// The MOAT_FQDNCFG value.
    pub fn to_config(&self) -> FqdnConfig {
        FqdnConfig {
            ttl_floor_s: self.ttl_floor_s,
            ttl_cap_s: self.ttl_cap_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones_and_make_the_map_value() {
        let s = FqdnSettings::default();
        assert_eq!(
            (s.ttl_floor_s, s.ttl_cap_s, s.max_per_identity),
            (60, 86_400, 1024)
        );
        assert_eq!(
            s.to_config(),
            FqdnConfig {
                ttl_floor_s: 60,
                ttl_cap_s: 86_400
            }
        );
        assert!(s.validate().is_ok());
    }

    #[test]
    fn a_floor_above_the_cap_or_a_zero_cap_per_identity_is_refused() {
        let floor_high = FqdnSettings {
            ttl_floor_s: 600,
            ttl_cap_s: 300,
            ..Default::default()
        };
        assert!(
            floor_high
                .validate()
                .unwrap_err()
                .contains("--fqdn-ttl-floor")
        );
        let no_room = FqdnSettings {
            max_per_identity: 0,
            ..Default::default()
        };
        assert!(no_room.validate().is_err());
    }
}
