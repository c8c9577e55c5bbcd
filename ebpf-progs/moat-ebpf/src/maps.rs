//! Every map of the datapath, pinned by name so that a restarted loader re-adopts them and
//! enforcement never starts from empty state. Sizes and names come from moat-common.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use moat_common::{
    CidrKeyV4, CidrKeyV6, Config, CtKey, CtValue, DnsQuery, DnsQueryKey, EndpointInfo, FqdnAddr,
    FqdnAddrKeyV4, FqdnAddrKeyV6, FqdnConfig, FqdnName, FqdnPatternKey, FragKey, FragValue,
    IpcacheKeyV4, IpcacheKeyV6, IpcacheValue, METRIC_SLOTS, Meta, MetricValue, PolicyKey,
    PolicyValue, PortRangeKey, PortRuleSet, RateLimitState, ThreatConfig, ThreatSlot, map_size,
};

#[map(name = "MOAT_ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(map_size::ENDPOINTS, 0);

#[map(name = "MOAT_IPCACHE4")]
pub static IPCACHE_V4: LpmTrie<IpcacheKeyV4, IpcacheValue> = LpmTrie::pinned(map_size::IPCACHE, 0);

#[map(name = "MOAT_IPCACHE6")]
pub static IPCACHE_V6: LpmTrie<IpcacheKeyV6, IpcacheValue> = LpmTrie::pinned(map_size::IPCACHE, 0);

/// The ipcache's host entries again, keyed by the bare address: one hash lookup finds a pod's
/// identity where the trie walks one node per level (about 17 at 100,000 entries). A host
/// entry is the longest prefix of its address, so a hit here is what the trie would answer;
/// a miss falls back to the trie. Written by the same userspace calls as the trie.
#[map(name = "MOAT_HOSTS4")]
pub static HOSTS_V4: HashMap<IpcacheKeyV4, IpcacheValue> = HashMap::pinned(map_size::IPCACHE, 0);

#[map(name = "MOAT_HOSTS6")]
pub static HOSTS_V6: HashMap<IpcacheKeyV6, IpcacheValue> = HashMap::pinned(map_size::IPCACHE, 0);

#[map(name = "MOAT_POLICY")]
pub static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(map_size::POLICY, 0);

#[map(name = "MOAT_PORTRANGES")]
pub static PORT_RANGES: HashMap<PortRangeKey, PortRuleSet> =
    HashMap::pinned(map_size::PORT_RANGES, 0);

#[map(name = "MOAT_CIDR4")]
pub static CIDR_V4: LpmTrie<CidrKeyV4, PortRuleSet> = LpmTrie::pinned(map_size::CIDR, 0);

#[map(name = "MOAT_CIDR6")]
pub static CIDR_V6: LpmTrie<CidrKeyV6, PortRuleSet> = LpmTrie::pinned(map_size::CIDR, 0);

#[map(name = "MOAT_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(map_size::CONNTRACK, 0);

#[map(name = "MOAT_FRAGS")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(map_size::FRAGMENTS, 0);

#[map(name = "MOAT_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "MOAT_RATELIM")]
pub static RATE_LIMIT: PerCpuArray<RateLimitState> = PerCpuArray::pinned(1, 0);

#[map(name = "MOAT_METRICS")]
pub static METRICS: PerCpuArray<MetricValue> = PerCpuArray::pinned(METRIC_SLOTS, 0);

#[map(name = "MOAT_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(map_size::EVENTS_BYTES, 0);

#[map(name = "MOAT_META")]
pub static META: Array<Meta> = Array::pinned(1, 0);

#[map(name = "MOAT_THREATCFG")]
pub static THREAT_CONFIG: Array<ThreatConfig> = Array::pinned(1, 0);

#[map(name = "MOAT_THREATS")]
pub static THREATS: Array<ThreatSlot> = Array::pinned(map_size::THREATS, 0);

#[map(name = "MOAT_THREATEV")]
pub static THREAT_EVENTS: RingBuf = RingBuf::pinned(map_size::THREAT_EVENTS_BYTES, 0);

#[map(name = "MOAT_FQDNCFG")]
pub static FQDN_CONFIG: Array<FqdnConfig> = Array::pinned(1, 0);

#[map(name = "MOAT_FQDNPAT")]
pub static FQDN_PATTERNS: HashMap<FqdnPatternKey, u32> =
    HashMap::pinned(map_size::FQDN_PATTERNS, 0);

#[map(name = "MOAT_FQDN4")]
pub static FQDN_V4: LruHashMap<FqdnAddrKeyV4, FqdnAddr> =
    LruHashMap::pinned(map_size::FQDN_ADDRS, 0);

#[map(name = "MOAT_FQDN6")]
pub static FQDN_V6: LruHashMap<FqdnAddrKeyV6, FqdnAddr> =
    LruHashMap::pinned(map_size::FQDN_ADDRS, 0);

#[map(name = "MOAT_FQDNNAME")]
pub static FQDN_NAMES: LruHashMap<u64, FqdnName> = LruHashMap::pinned(map_size::FQDN_NAMES, 0);

#[map(name = "MOAT_DNSQ")]
pub static DNS_QUERIES: LruHashMap<DnsQueryKey, DnsQuery> =
    LruHashMap::pinned(map_size::DNS_QUERIES, 0);
