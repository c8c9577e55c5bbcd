//! Who is on each side of a packet: the local endpoint behind this veth (MOAT_ENDPOINTS) and
//! the remote peer's identity by longest-prefix match on its address (MOAT_IPCACHE4/6).

use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use moat_common::{
    EndpointInfo, FAMILY_V4, IDENTITY_WORLD, IpcacheKeyV4, IpcacheKeyV6, IpcacheValue,
    MAX_ENDPOINT_V4, MAX_ENDPOINT_V6,
};

use crate::maps::{ENDPOINTS, HOSTS_V4, HOSTS_V6, IPCACHE_V4, IPCACHE_V6};

/// The endpoint entry in place: a copy costs stack the verifier does not have to give, and
/// time on every packet.
#[inline(always)]
pub fn endpoint_ref(ifindex: u32) -> Option<&'static EndpointInfo> {
    unsafe { ENDPOINTS.get(&ifindex) }
}

/// An address that matches nothing, not even a default route entry, is the world. A host
/// entry (the exact-match mirror) is tried first: see `HOSTS_V4`.
#[inline(always)]
pub fn remote(family: u8, addr: &[u32; 4]) -> IpcacheValue {
    let found = if family == FAMILY_V4 {
        let host = IpcacheKeyV4 {
            addr: addr[0].to_ne_bytes(),
        };
        match unsafe { HOSTS_V4.get(&host) } {
            Some(v) => Some(v),
            None => IPCACHE_V4.get(&LpmKey::new(32, host)),
        }
    } else {
        let host = IpcacheKeyV6 {
            addr: v6_bytes(addr),
        };
        match unsafe { HOSTS_V6.get(&host) } {
            Some(v) => Some(v),
            None => IPCACHE_V6.get(&LpmKey::new(128, host)),
        }
    };
    match found {
        Some(v) => *v,
        None => IpcacheValue {
            identity: IDENTITY_WORLD,
            ifindex: 0,
            flags: 0,
            tunnel_endpoint: 0,
        },
    }
}

/// Anti-spoofing: the source must be one of the endpoint's own addresses.
#[inline(always)]
pub fn owns_address(ep: &EndpointInfo, family: u8, addr: &[u32; 4]) -> bool {
    if family == FAMILY_V4 {
        let mut i = 0;
        while i < MAX_ENDPOINT_V4 {
            if i < ep.v4_count as usize && ep.v4[i] == addr[0] {
                return true;
            }
            i += 1;
        }
    } else {
        let mut i = 0;
        while i < MAX_ENDPOINT_V6 {
            if i < ep.v6_count as usize && ep.v6[i] == *addr {
                return true;
            }
            i += 1;
        }
    }
    false
}

/// The raw words of an IPv6 address back as its 16 network-order bytes.
#[inline(always)]
pub fn v6_bytes(addr: &[u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let word = addr[i].to_ne_bytes();
        bytes[i * 4] = word[0];
        bytes[i * 4 + 1] = word[1];
        bytes[i * 4 + 2] = word[2];
        bytes[i * 4 + 3] = word[3];
        i += 1;
    }
    bytes
}
