//! What moatd learned from DNS answers for FQDN egress rules, per local identity, as the
//! local API carries it (`moatctl fqdn`).

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// One identity of this node with FQDN rules or learned addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnIdentity {
    pub identity: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// This node's pods (namespace/name) with the identity.
    #[serde(default)]
    pub pods: Vec<String>,
    /// The name patterns its egress rules allow (from MOAT_FQDNPAT).
    #[serde(default)]
    pub selectors: Vec<FqdnSelector>,
    /// Addresses the datapath learned for it from DNS answers, by name then address.
    #[serde(default)]
    pub learned: Vec<FqdnLearned>,
}

/// A pattern of an FQDN rule: its selector identity and its text (`api.example.com`,
/// `*.example.com`; empty when moatd no longer compiles it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnSelector {
    pub selector: u32,
    pub pattern: String,
}

/// One learned address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnLearned {
    /// The question it answered (empty when the datapath's name table evicted it).
    pub name: String,
    pub address: IpAddr,
    /// The record's TTL in seconds, before the floor and cap.
    pub ttl: u32,
    /// Seconds it still admits new connections (0: expired, awaiting the sweeper).
    pub expires_in_secs: u64,
    /// Seconds since it was (last) learned.
    pub age_secs: u64,
    /// The patterns (selector identities) it was learned for.
    #[serde(default)]
    pub selectors: Vec<u32>,
    /// Answers that taught it.
    #[serde(default)]
    pub count: u32,
}
