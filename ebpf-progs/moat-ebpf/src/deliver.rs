//! Direct delivery of a linked flow's packets into the receiving pod.
//!
//! A packet of a direct TCP connection between two pods of this node has been judged by both
//! perimeters once its flow is linked (see `conntrack`). Routing it through the host's stack
//! would only repeat what the first packet already established: the route to the receiver,
//! netfilter's conntrack, the neighbour, the receiver's hook. So the sender's hook asks the
//! FIB the host's own question (which device, which MACs, is the packet forwardable) and, when
//! the answer is the receiver's veth, does the forwarding itself: rewrite the MACs, decrement
//! the TTL, and redirect into the peer of that veth, the pod's own interface.
//!
//! What the host's stack no longer sees: netfilter FORWARD and POSTROUTING for these packets
//! (the flow's first packet still goes through them), and tcpdump on the receiver's host-side
//! veth. Operators who need every packet through the host stack set
//! `CONFIG_FLAG_LOCAL_VIA_HOST`.
//!
//! Once a flow is delivered this way, its later packets must not fall back to the host's
//! stack for want of a neighbour entry: netfilter's conntrack saw only the first packet, finds
//! a mid-stream packet INVALID, and kube-proxy's rule drops those (every retransmission
//! alike). So a missing neighbour is resolved by `bpf_redirect_neigh`, which also bypasses
//! netfilter, and the packet reaches the receiver through its veth and its hook.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use moat_common::{CONFIG_FLAG_LOCAL_VIA_HOST, Config, PROTO_TCP};

use crate::parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The IPv4 TTL and protocol bytes, read and checksummed as one 16-bit word.
const IPV4_TTL: usize = ETH_HLEN + 8;
const IPV4_CHECKSUM: usize = ETH_HLEN + 10;
const IPV6_HOP_LIMIT: usize = ETH_HLEN + 7;
const FIB_SUCCESS: i64 = 0;
/// BPF_FIB_LKUP_RET_NO_NEIGH: the route is known, its neighbour entry is not (yet).
const FIB_NO_NEIGH: i64 = 7;

#[inline(always)]
pub fn enabled(cfg: &Config) -> bool {
    cfg.flags & CONFIG_FLAG_LOCAL_VIA_HOST == 0
}

/// How `to_peer` sent the packet on.
pub enum Delivery {
    /// Into the receiving pod's interface: no other hook sees it.
    Direct(i32),
    /// Out of the receiver's host-side veth after neighbour resolution: the receiver's hook
    /// sees it (hand it over).
    ViaNeighbour(i32),
    /// Not at all: the host's answer differs (another device, too big, TTL expiring), and the
    /// packet takes the host's stack unchanged.
    NotDelivered,
}

/// Forwards the packet to `peer_ifindex`'s pod as the host would have, and returns how.
///
/// It reads the addresses again from the packet rather than taking the parsed `Packet`: it
/// runs after the first stage has returned, so that their stack frames do not add up.
#[inline(never)]
pub fn to_peer(ctx: &TcContext, peer_ifindex: u32) -> Delivery {
    forward(ctx, peer_ifindex).unwrap_or(Delivery::NotDelivered)
}

#[inline(always)]
fn forward(ctx: &TcContext, peer_ifindex: u32) -> Option<Delivery> {
    let skb = ctx.skb.skb;
    let (ifindex, ethertype) = unsafe { ((*skb).ifindex, u16::from_be((*skb).protocol as u16)) };
    let v4 = match ethertype {
        ETH_P_IP => true,
        ETH_P_IPV6 => false,
        _ => return None,
    };
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.ifindex = ifindex;
    fib.l4_protocol = PROTO_TCP;
    let (hop_offset, l4_offset) = if v4 {
        let h: [u32; 5] = ctx.load(ETH_HLEN).ok()?;
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = h[3];
        fib.__bindgen_anon_4.ipv4_dst = h[4];
        (IPV4_TTL, ETH_HLEN + ((h[0] & 0x0f) * 4) as usize)
    } else {
        let h: [u32; 10] = ctx.load(ETH_HLEN).ok()?;
        // Linked flows are TCP; with extension headers in between, leave it to the host.
        if (h[1] >> 16) as u8 != PROTO_TCP {
            return None;
        }
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = [h[2], h[3], h[4], h[5]];
        fib.__bindgen_anon_4.ipv6_dst = [h[6], h[7], h[8], h[9]];
        (IPV6_HOP_LIMIT, ETH_HLEN + 40)
    };
    // Ports too, as policy routing may match them: the host's own lookup would.
    let ports: [u16; 2] = ctx.load(l4_offset).ok()?;
    fib.sport = ports[0];
    fib.dport = ports[1];
    // The TTL or hop limit leads the 16-bit word in memory: on this little-endian target it
    // is the word's low byte. A packet that would expire here takes the host's stack, which
    // answers it with the ICMP error.
    let hop_word: u16 = ctx.load(hop_offset).ok()?;
    if hop_word & 0xff <= 1 {
        return None;
    }
    // tot_len 0: the kernel checks the skb itself against the egress device's MTU, which
    // also accepts GSO packets whose segments fit.
    let rc = unsafe {
        fib_lookup(
            skb as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if fib.ifindex != peer_ifindex || (rc != FIB_SUCCESS && rc != FIB_NO_NEIGH) {
        return None;
    }
    if rc == FIB_SUCCESS {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        ctx.store(0, &macs, 0).ok()?;
    }
    let decremented = hop_word - 1;
    ctx.store(hop_offset, &decremented, 0).ok()?;
    if v4 {
        ctx.l3_csum_replace(IPV4_CHECKSUM, hop_word as u64, decremented as u64, 2)
            .ok()?;
    }
    if rc == FIB_SUCCESS {
        let verdict = unsafe { bpf_redirect_peer(peer_ifindex, 0) };
        return Some(Delivery::Direct(verdict as i32));
    }
    // The kernel resolves the neighbour (queueing the packet meanwhile) and fills in the
    // MACs; the route it looks up must lead to the same veth, or it drops the packet.
    let verdict = unsafe { bpf_redirect_neigh(peer_ifindex, core::ptr::null_mut(), 0, 0) };
    Some(Delivery::ViaNeighbour(verdict as i32))
}
