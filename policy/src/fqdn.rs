//! DNS-name patterns for egress rules (MoatPolicy `fqdn` peers, ClusterNetworkPolicy
//! `domainNames` peers), with upstream ClusterNetworkPolicy's DomainName meaning:
//!
//! - `api.example.com` matches that name only;
//! - `*.example.com` matches names with one or more whole labels before `example.com`
//!   (`www.example.com`, `a.b.example.com`), never `example.com` itself;
//! - `*` is allowed only as the whole first label; names compare without case and a trailing
//!   dot is ignored, so patterns are kept in lower case without it.
//!
//! The datapath cannot match text: it looks up (identity, kind, hash of a name) in
//! MOAT_FQDNPAT, hashing the question and each of its proper suffixes with
//! `moat_common::fqdn_name_hash`. A pattern therefore compiles to its kind
//! (FQDN_MATCH_EXACT or FQDN_MATCH_SUBDOMAIN) and the hash of the name after `*.`.

use moat_common::{FQDN_MATCH_EXACT, FQDN_MATCH_SUBDOMAIN, FQDN_MAX_LABELS, fqdn_name_hash};

use crate::identity::CanonicalKey;

/// Longest name a pattern may have (RFC 1035's 253 characters of dotted text, `*.` included,
/// trailing dot excluded).
pub const MAX_NAME_LEN: usize = 253;
pub const MAX_LABEL_LEN: usize = 63;
/// Upstream's DomainName needs at least two labels after the optional `*.` (no `localhost`,
/// no `*.com`).
pub const MIN_LABELS: usize = 2;

/// A valid, normalized DNS-name pattern.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FqdnPattern {
    /// The name, or for a wildcard the part after `*.`: lower case, no trailing dot.
    pub name: String,
    /// `*.name`: matches proper subdomains of `name`.
    pub subdomains: bool,
}

impl FqdnPattern {
    /// Parses and normalizes a pattern as written in a policy; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.strip_suffix('.').unwrap_or(text);
        if trimmed.len() > MAX_NAME_LEN {
            return Err(format!(
                "{text:?} is {} characters long; at most {MAX_NAME_LEN} are allowed",
                trimmed.len()
            ));
        }
        let (subdomains, name) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() < MIN_LABELS {
            return Err(format!(
                "{text:?} needs at least {MIN_LABELS} labels after the optional \"*.\" (e.g. example.com)"
            ));
        }
        // The datapath hashes at most FQDN_MAX_LABELS labels of a question; a `*.` pattern
        // only matches names with one more label than its suffix.
        let total = labels.len() + usize::from(subdomains);
        if total > FQDN_MAX_LABELS {
            return Err(format!(
                "{text:?} has {total} labels; at most {FQDN_MAX_LABELS} are allowed"
            ));
        }
        for label in &labels {
            check_label(label).map_err(|why| format!("{text:?}: {why}"))?;
        }
        Ok(Self {
            name: name.to_ascii_lowercase(),
            subdomains,
        })
    }

    /// FQDN_MATCH_EXACT or FQDN_MATCH_SUBDOMAIN.
    pub fn kind(&self) -> u8 {
        if self.subdomains {
            FQDN_MATCH_SUBDOMAIN
        } else {
            FQDN_MATCH_EXACT
        }
    }

    /// The hash the datapath looks up: of the name, or for `*.` of the part after it.
    pub fn name_hash(&self) -> u64 {
        fqdn_name_hash(self.name.as_bytes())
            .expect("validated: labels within the datapath's bounds")
    }

    /// Whether a DNS name (any case, trailing dot allowed) matches, by the same rule the
    /// datapath applies with hashes: equal for exact patterns, a proper suffix at a label
    /// boundary for `*.` patterns.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if !self.subdomains {
            return name == self.name;
        }
        name.strip_suffix(&self.name)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|head| !head.is_empty())
    }
}

impl std::fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.subdomains {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// Selector identities are hashed from the pattern's text, so one pattern has one id on every
/// node and across restarts, whichever policies name it.
impl CanonicalKey for FqdnPattern {
    fn canonical_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

/// One label: 1-63 of [a-zA-Z0-9_-], not starting or ending with '-'.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label (two dots in a row, or a leading dot)".into());
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label {label:?} is {} characters long; at most {MAX_LABEL_LEN} are allowed",
            label.len()
        ));
    }
    if label == "*" {
        return Err("'*' is allowed only as the whole first label (\"*.example.com\")".into());
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "label {label:?} has {c:?}; labels are letters, digits, '-' and '_'"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> FqdnPattern {
        FqdnPattern::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn exact_and_wildcard_patterns_normalize() {
        assert_eq!(
            ok("API.Stripe.com."),
            FqdnPattern {
                name: "api.stripe.com".into(),
                subdomains: false
            }
        );
        let w = ok("*.S3.amazonaws.com");
        assert!(w.subdomains);
        assert_eq!(w.name, "s3.amazonaws.com");
        assert_eq!(w.to_string(), "*.s3.amazonaws.com");
        assert_eq!(w.kind(), FQDN_MATCH_SUBDOMAIN);
        assert_eq!(ok("_dmarc.example.com").kind(), FQDN_MATCH_EXACT);
    }

    #[test]
    fn wildcards_match_whole_labels_only_as_upstream_says() {
        let w = ok("*.kubernetes.io");
        for yes in [
            "www.kubernetes.io",
            "latest.blog.kubernetes.io",
            "WWW.Kubernetes.IO.",
        ] {
            assert!(w.matches(yes), "{yes}");
        }
        for no in [
            "kubernetes.io",
            "my-kubernetes.io",
            "wikipedia.org",
            ".kubernetes.io",
        ] {
            assert!(!w.matches(no), "{no}");
        }
        let e = ok("kubernetes.io");
        assert!(e.matches("Kubernetes.io."));
        assert!(!e.matches("www.kubernetes.io"));
    }

    #[test]
    fn hashes_are_the_datapaths() {
        let w = ok("*.Example.COM.");
        assert_eq!(w.name_hash(), fqdn_name_hash(b"example.com").unwrap());
        assert_eq!(
            ok("api.example.com").name_hash(),
            fqdn_name_hash(b"API.example.com.").unwrap()
        );
        assert_ne!(ok("example.com").name_hash(), ok("example.org").name_hash());
    }

    #[test]
    fn bad_patterns_say_why() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        let many_labels = format!("{}com", "a.".repeat(FQDN_MAX_LABELS));
        for (text, why) in [
            ("", "at least 2 labels"),
            ("localhost", "at least 2 labels"),
            ("*.com", "at least 2 labels"),
            ("*", "at least 2 labels"),
            ("a..com", "empty label"),
            (".example.com", "empty label"),
            ("www.*.example.com", "only as the whole first label"),
            ("*.*.example.com", "only as the whole first label"),
            ("w*.example.com", "has '*'"),
            ("-a.example.com", "starts or ends with '-'"),
            ("a-.example.com", "starts or ends with '-'"),
            ("exa mple.com", "has ' '"),
            ("example.com..", "empty label"),
            (long_label.as_str(), "at most 63"),
            (long_name.as_str(), "at most 253"),
            (many_labels.as_str(), "labels; at most 32"),
        ] {
            let e = FqdnPattern::parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let name = format!("{}.com", "a".repeat(63));
        ok(&name);
        let labels = format!("*.{}com", "a.".repeat(FQDN_MAX_LABELS - 2));
        ok(&labels);
        let long = format!(
            "{}.{}.{}.{}",
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
            "e".repeat(61)
        );
        assert_eq!(long.len(), MAX_NAME_LEN);
        ok(&long);
        ok(&format!("{long}."));
    }
}
