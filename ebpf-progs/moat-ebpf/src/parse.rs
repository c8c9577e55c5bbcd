//! Packet parsing: Ethernet, IPv4, IPv6 (with extension headers), TCP, UDP, SCTP, ICMP and
//! ICMPv6, plus IP fragments. Reads come straight from the packet's linear area when the bytes
//! are there (no helper call); otherwise from `bpf_skb_load_bytes` (`ctx.load`), which fails
//! cleanly on a short packet, so a truncated header becomes `Parsed::Malformed` instead of an
//! out-of-bounds access.

use aya_ebpf::programs::{SkBuffContext, TcContext};
use moat_common::{
    FAMILY_V4, FAMILY_V6, FragKey, FragValue, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP,
};

use crate::maps::FRAGMENTS;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const MAX_IPV6_EXTENSION_HEADERS: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The 5-tuple and the facts about a packet that the verdict needs.
#[derive(Clone, Copy)]
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type, or 0xff for other protocols.
    pub icmp_type: u8,
    /// The packet is an ICMP error; `inner` holds the tuple of the packet it is about.
    pub icmp_error: bool,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Host byte order. For ICMP echo the identifier stands in for a port (see `icmp_ports`).
    pub sport: u16,
    pub dport: u16,
    pub len: u32,
    pub inner: InnerTuple,
}

/// The tuple quoted inside an ICMP error.
#[derive(Clone, Copy, Default)]
pub struct InnerTuple {
    pub proto: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

pub enum Parsed {
    Ip(Packet),
    /// ARP: passes, it carries no payload to police.
    Arp,
    /// An ethertype Moat does not forward for pods (VLAN tags, LLDP, ...).
    Unsupported,
    Malformed,
    /// A non-first fragment whose first fragment was never seen here.
    FragmentUnknown,
    /// A first fragment whose ports could not be remembered.
    FragmentStateFull,
}

/// Where a hook's packet bytes come from. A tc program's packet starts with the Ethernet
/// header; the socket filter that netfilter runs after DNAT (see `moat_after_dnat`) starts at
/// the IP header. One parser serves both, so the two hooks can never read a packet differently.
pub trait Bytes {
    /// Offset of the IP header.
    const L3: usize;
    fn read<T>(&self, offset: usize) -> Result<T, ()>;
    fn total_len(&self) -> u32;
}

impl Bytes for TcContext {
    const L3: usize = ETH_HLEN;

    /// Headers almost always sit in the linear area, where a bounds check against data_end is
    /// all a read costs; a helper call per header was most of the cost of parsing (measured: 3
    /// calls, ~75 ns of a conntrack hit). Bytes past the linear area (paged skbs) or past the
    /// end of the packet go through `bpf_skb_load_bytes`, which reads the former and refuses
    /// the latter, so the outcome is the same either way.
    #[inline(always)]
    fn read<T>(&self, offset: usize) -> Result<T, ()> {
        let start = self.data() + offset;
        if start + core::mem::size_of::<T>() <= self.data_end() {
            // SAFETY: the bytes lie between data and data_end (checked just above, and the
            // verifier checks it again); packet data has no alignment guarantee, hence the
            // unaligned read.
            return Ok(unsafe { core::ptr::read_unaligned(start as *const T) });
        }
        self.load::<T>(offset).map_err(|_| ())
    }

    #[inline(always)]
    fn total_len(&self) -> u32 {
        self.len()
    }
}

impl Bytes for SkBuffContext {
    const L3: usize = 0;

    /// Socket filters have no direct packet access: every read is `bpf_skb_load_bytes`, which
    /// refuses bytes past the end of the packet.
    #[inline(always)]
    fn read<T>(&self, offset: usize) -> Result<T, ()> {
        self.load::<T>(offset).map_err(|_| ())
    }

    #[inline(always)]
    fn total_len(&self) -> u32 {
        self.len()
    }
}

/// Reads a `T` at `offset`. Never a single byte: LLVM turns `start + 1 <= data_end` into
/// `data_end > start`, from which the verifier grants no range at all.
#[inline(always)]
fn load<T>(ctx: &impl Bytes, offset: usize) -> Result<T, ()> {
    const { assert!(core::mem::size_of::<T>() >= 2) };
    ctx.read::<T>(offset)
}

/// A tc hook's packet, from its Ethernet header.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let ethertype = match load::<u16>(ctx, 12) {
        Ok(v) => u16::from_be(v),
        Err(()) => return Parsed::Malformed,
    };
    let result = match ethertype {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        ETH_P_ARP => return Parsed::Arp,
        _ => return Parsed::Unsupported,
    };
    match result {
        Ok(parsed) => parsed,
        Err(()) => Parsed::Malformed,
    }
}

/// A packet that starts at its IP header (netfilter's view), IPv4 or IPv6 by its version.
#[inline(always)]
pub fn parse_ip(ctx: &impl Bytes) -> Parsed {
    let first: [u8; 2] = match load(ctx, 0) {
        Ok(v) => v,
        Err(()) => return Parsed::Malformed,
    };
    let result = match first[0] >> 4 {
        4 => parse_ipv4(ctx),
        6 => parse_ipv6(ctx),
        _ => return Parsed::Unsupported,
    };
    match result {
        Ok(parsed) => parsed,
        Err(()) => Parsed::Malformed,
    }
}

#[inline(always)]
fn empty_packet(ctx: &impl Bytes, family: u8) -> Packet {
    Packet {
        family,
        proto: 0,
        tcp_flags: 0,
        icmp_type: 0xff,
        icmp_error: false,
        saddr: [0; 4],
        daddr: [0; 4],
        sport: 0,
        dport: 0,
        len: ctx.total_len(),
        inner: InnerTuple::default(),
    }
}

#[inline(always)]
fn word(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn parse_ipv4<C: Bytes>(ctx: &C) -> Result<Parsed, ()> {
    // One read for the whole fixed header: a bounds check each, or a helper call each when the
    // header is not in the linear area.
    let h: [u8; 20] = load(ctx, C::L3)?;
    let version_ihl = h[0];
    if version_ihl >> 4 != 4 {
        return Err(());
    }
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Err(());
    }
    let mut pkt = empty_packet(ctx, FAMILY_V4);
    let id = be16(&h, 4) as u32;
    let frag = be16(&h, 6);
    pkt.proto = h[9];
    pkt.saddr[0] = word(&h, 12);
    pkt.daddr[0] = word(&h, 16);
    // The options end inside the packet, or the header is truncated.
    if (ctx.total_len() as usize) < C::L3 + header_len {
        return Err(());
    }
    let more_fragments = frag & 0x2000 != 0;
    let fragment_offset = frag & 0x1fff;
    finish_l4(
        ctx,
        pkt,
        C::L3 + header_len,
        id,
        more_fragments,
        fragment_offset != 0,
    )
}

#[inline(always)]
fn parse_ipv6<C: Bytes>(ctx: &C) -> Result<Parsed, ()> {
    let h: [u8; 40] = load(ctx, C::L3)?;
    if h[0] >> 4 != 6 {
        return Err(());
    }
    let mut pkt = empty_packet(ctx, FAMILY_V6);
    let mut next: u8 = h[6];
    pkt.saddr = [word(&h, 8), word(&h, 12), word(&h, 16), word(&h, 20)];
    pkt.daddr = [word(&h, 24), word(&h, 28), word(&h, 32), word(&h, 36)];

    let mut offset = C::L3 + 40;
    let mut frag_id: u32 = 0;
    let mut more_fragments = false;
    let mut later_fragment = false;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                next = hdr[0];
                offset += (hdr[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                next = hdr[0];
                offset += (hdr[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                let offset_flags = u16::from_be(load::<u16>(ctx, offset + 2)?);
                frag_id = u32::from_be(load::<u32>(ctx, offset + 4)?);
                next = hdr[0];
                more_fragments = offset_flags & 1 != 0;
                later_fragment = offset_flags >> 3 != 0;
                offset += 8;
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        // More extension headers than any sane packet carries: refuse rather than guess.
        return Err(());
    }
    // The extension headers end inside the packet, or the chain is truncated (as IPv4's
    // options are checked): only their first bytes were read, and a protocol whose header is
    // not read (not TCP/UDP/SCTP/ICMP) would otherwise pass as well-formed.
    if (ctx.total_len() as usize) < offset {
        return Err(());
    }
    pkt.proto = next;
    finish_l4(ctx, pkt, offset, frag_id, more_fragments, later_fragment)
}

/// Reads the L4 ports, or recalls them for a later fragment.
#[inline(always)]
fn finish_l4(
    ctx: &impl Bytes,
    mut pkt: Packet,
    l4_offset: usize,
    frag_id: u32,
    more_fragments: bool,
    later_fragment: bool,
) -> Result<Parsed, ()> {
    let frag_key = FragKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id: frag_id,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    if later_fragment {
        // Only the first fragment has the L4 header; its ports were recorded when it passed.
        return match unsafe { FRAGMENTS.get(&frag_key) } {
            Some(ports) => {
                pkt.sport = ports.sport;
                pkt.dport = ports.dport;
                Ok(Parsed::Ip(pkt))
            }
            None => Ok(Parsed::FragmentUnknown),
        };
    }
    parse_l4(ctx, &mut pkt, l4_offset)?;
    if more_fragments {
        let ports = FragValue {
            sport: pkt.sport,
            dport: pkt.dport,
        };
        if FRAGMENTS.insert(&frag_key, &ports, 0).is_err() {
            return Ok(Parsed::FragmentStateFull);
        }
    }
    Ok(Parsed::Ip(pkt))
}

#[inline(always)]
fn parse_l4(ctx: &impl Bytes, pkt: &mut Packet, offset: usize) -> Result<(), ()> {
    match pkt.proto {
        PROTO_TCP => {
            // The whole 20-byte header must be there.
            let h: [u8; 20] = load(ctx, offset)?;
            if (h[12] >> 4) < 5 {
                return Err(());
            }
            pkt.sport = be16(&h, 0);
            pkt.dport = be16(&h, 2);
            pkt.tcp_flags = h[13];
        }
        PROTO_UDP => {
            let h: [u8; 8] = load(ctx, offset)?;
            pkt.sport = be16(&h, 0);
            pkt.dport = be16(&h, 2);
        }
        PROTO_SCTP => {
            // Common header: ports, verification tag, checksum (12 bytes).
            let h: [u8; 12] = load(ctx, offset)?;
            pkt.sport = be16(&h, 0);
            pkt.dport = be16(&h, 2);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let type_code: [u8; 2] = load(ctx, offset)?;
            pkt.icmp_type = type_code[0];
            let v6 = pkt.proto == PROTO_ICMPV6;
            if is_icmp_echo(v6, pkt.icmp_type) {
                let ident = u16::from_be(load::<u16>(ctx, offset + 4)?);
                let (sport, dport) = icmp_ports(v6, pkt.icmp_type, ident);
                pkt.sport = sport;
                pkt.dport = dport;
            } else if is_icmp_error(v6, pkt.icmp_type) {
                pkt.icmp_error = true;
                // A quote too short to read is still a valid ICMP error; it just cannot be
                // related to a flow and is judged as a flow of its own.
                if parse_inner(ctx, pkt, offset + 8).is_err() {
                    pkt.icmp_error = false;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn parse_inner(ctx: &impl Bytes, pkt: &mut Packet, offset: usize) -> Result<(), ()> {
    // Only the fields that matter, in reads of at least two bytes (see `load`); together they
    // need the same bytes as the whole header, so the same quotes are refused.
    let l4_offset = if pkt.family == FAMILY_V4 {
        let version_tos: [u8; 2] = load(ctx, offset)?;
        let header_len = ((version_tos[0] & 0x0f) as usize) * 4;
        if version_tos[0] >> 4 != 4 || header_len < 20 {
            return Err(());
        }
        let ttl_proto: [u8; 2] = load(ctx, offset + 8)?;
        pkt.inner.proto = ttl_proto[1];
        pkt.inner.saddr = [load(ctx, offset + 12)?, 0, 0, 0];
        pkt.inner.daddr = [load(ctx, offset + 16)?, 0, 0, 0];
        offset + header_len
    } else {
        let next_hop: [u8; 2] = load(ctx, offset + 6)?;
        pkt.inner.proto = next_hop[0];
        pkt.inner.saddr = load(ctx, offset + 8)?;
        pkt.inner.daddr = load(ctx, offset + 24)?;
        offset + 40
    };
    match pkt.inner.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            let ports: [u16; 2] = load(ctx, l4_offset)?;
            pkt.inner.sport = u16::from_be(ports[0]);
            pkt.inner.dport = u16::from_be(ports[1]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // Type, code, checksum, identifier.
            let h: [u8; 6] = load(ctx, l4_offset)?;
            let (sport, dport) = icmp_ports(pkt.family == FAMILY_V6, h[0], be16(&h, 4));
            pkt.inner.sport = sport;
            pkt.inner.dport = dport;
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn is_icmp_echo(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        icmp_type == 128 || icmp_type == 129
    } else {
        icmp_type == 8 || icmp_type == 0
    }
}

#[inline(always)]
fn is_icmp_error(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        icmp_type >= 1 && icmp_type <= 4
    } else {
        icmp_type == 3 || icmp_type == 11 || icmp_type == 12
    }
}

/// An echo request carries its identifier as the source "port" and an echo reply as the
/// destination "port", so that the reply's tuple is exactly the request's reversed.
#[inline(always)]
fn icmp_ports(v6: bool, icmp_type: u8, ident: u16) -> (u16, u16) {
    let request = if v6 { icmp_type == 128 } else { icmp_type == 8 };
    if request { (ident, 0) } else { (0, ident) }
}

/// Link-scoped ICMPv6 control: multicast listener discovery (130-132, 143) and router and
/// neighbour discovery (133-137). IPv6 does not work without them, and they are sent from
/// link-local or unspecified sources, so they pass before anti-spoofing.
#[inline(always)]
pub fn is_neighbor_discovery(pkt: &Packet) -> bool {
    pkt.proto == PROTO_ICMPV6
        && ((pkt.icmp_type >= 130 && pkt.icmp_type <= 137) || pkt.icmp_type == 143)
}
