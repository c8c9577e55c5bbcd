//! Crafting packets for BPF_PROG_TEST_RUN: Ethernet + IPv4/IPv6 (with extension headers and
//! fragments) + TCP/UDP/SCTP/ICMP/ICMPv6, and deliberately broken variants. The programs do
//! not verify checksums, so none are computed.

use std::net::IpAddr;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// Echo request (`request`) or reply with an identifier.
    Echo {
        request: bool,
        ident: u16,
    },
    /// An ICMP error (destination unreachable / packet too big) quoting `quoted`, which must
    /// be a full IP packet as built by `Packet::ip_bytes`.
    IcmpError {
        quoted: Vec<u8>,
    },
    /// ICMPv6 neighbour discovery message of the given type (133..=137).
    NeighborDiscovery {
        icmp_type: u8,
    },
    /// Any other protocol with an opaque payload.
    Other {
        proto: u8,
        payload: Vec<u8>,
    },
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension header to insert before the L4 header.
#[derive(Clone, Debug)]
pub enum Ext {
    HopByHop,
    DestinationOptions,
    Routing,
    /// Fragment header: offset in 8-byte units, more-fragments flag, identification.
    Fragment {
        offset: u16,
        more: bool,
        id: u32,
    },
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// IPv4 fragmentation: (offset in 8-byte units, more fragments, id).
    pub v4_fragment: Option<(u16, bool, u16)>,
    pub v6_extensions: Vec<Ext>,
    /// For a later fragment: send only this raw payload instead of the L4 header.
    pub fragment_payload: Option<Vec<u8>>,
}

impl Packet {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            v4_fragment: None,
            v6_extensions: Vec::new(),
            fragment_payload: None,
        }
    }

    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    fn proto(&self) -> u8 {
        let v6 = self.src.is_ipv6();
        match &self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Echo { .. } | L4::IcmpError { .. } | L4::NeighborDiscovery { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            L4::Other { proto, .. } => *proto,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        if let Some(payload) = &self.fragment_payload {
            return payload.clone();
        }
        let v6 = self.src.is_ipv6();
        let mut b = Vec::new();
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&1u32.to_be_bytes()); // seq
                b.extend_from_slice(&0u32.to_be_bytes()); // ack
                b.push(5 << 4); // data offset
                b.push(*flags);
                b.extend_from_slice(&64240u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            }
            L4::Udp { sport, dport } | L4::Sctp { sport, dport } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                if matches!(self.l4, L4::Udp { .. }) {
                    b.extend_from_slice(&12u16.to_be_bytes());
                    b.extend_from_slice(&[0, 0]);
                } else {
                    b.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
                }
                b.extend_from_slice(b"ping");
            }
            L4::Echo { request, ident } => {
                let t = match (v6, request) {
                    (false, true) => 8,
                    (false, false) => 0,
                    (true, true) => 128,
                    (true, false) => 129,
                };
                b.extend_from_slice(&[t, 0, 0, 0]);
                b.extend_from_slice(&ident.to_be_bytes());
                b.extend_from_slice(&1u16.to_be_bytes());
                b.extend_from_slice(b"moatmoat");
            }
            L4::IcmpError { quoted } => {
                // v4: destination unreachable / port unreachable; v6: packet too big.
                let header: [u8; 8] = if v6 {
                    [2, 0, 0, 0, 0, 0, 0x05, 0x00]
                } else {
                    [3, 3, 0, 0, 0, 0, 0, 0]
                };
                b.extend_from_slice(&header);
                b.extend_from_slice(quoted);
            }
            L4::NeighborDiscovery { icmp_type } => {
                b.extend_from_slice(&[*icmp_type, 0, 0, 0, 0, 0, 0, 0]);
                b.extend_from_slice(&[0u8; 16]);
            }
            L4::Other { payload, .. } => b.extend_from_slice(payload),
        }
        b
    }

    /// The IP packet without the Ethernet header (what an ICMP error quotes).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut b = Vec::with_capacity(20 + l4.len());
                b.push(0x45);
                b.push(0);
                b.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                let (offset, more, id) = self.v4_fragment.unwrap_or((0, false, 0x1234));
                b.extend_from_slice(&id.to_be_bytes());
                let frag = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
                b.extend_from_slice(&frag.to_be_bytes());
                b.push(64);
                b.push(self.proto());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&s.octets());
                b.extend_from_slice(&d.octets());
                b.extend_from_slice(&l4);
                b
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = Vec::new();
                let header_codes: Vec<u8> = self
                    .v6_extensions
                    .iter()
                    .map(|e| match e {
                        Ext::HopByHop => 0,
                        Ext::Routing => 43,
                        Ext::Fragment { .. } => 44,
                        Ext::DestinationOptions => 60,
                    })
                    .collect();
                for (i, e) in self.v6_extensions.iter().enumerate() {
                    let next = header_codes.get(i + 1).copied().unwrap_or(self.proto());
                    match e {
                        Ext::HopByHop | Ext::DestinationOptions | Ext::Routing => {
                            // 8 bytes: next header, length 0, then padding (PadN).
                            ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                        }
                        Ext::Fragment { offset, more, id } => {
                            let field = (offset << 3) | u16::from(*more);
                            ext.push(next);
                            ext.push(0);
                            ext.extend_from_slice(&field.to_be_bytes());
                            ext.extend_from_slice(&id.to_be_bytes());
                        }
                    }
                }
                let first_next = header_codes.first().copied().unwrap_or(self.proto());
                let payload_len = (ext.len() + l4.len()) as u16;
                let mut b = Vec::with_capacity(40 + payload_len as usize);
                b.extend_from_slice(&[0x60, 0, 0, 0]);
                b.extend_from_slice(&payload_len.to_be_bytes());
                b.push(first_next);
                b.push(64);
                b.extend_from_slice(&s.octets());
                b.extend_from_slice(&d.octets());
                b.extend_from_slice(&ext);
                b.extend_from_slice(&l4);
                b
            }
            _ => panic!("source and destination must be the same family"),
        }
    }

    /// The full Ethernet frame.
    pub fn bytes(&self) -> Vec<u8> {
        let ethertype: u16 = if self.src.is_ipv6() { 0x86dd } else { 0x0800 };
        let mut b = ethernet_header(ethertype);
        b.extend_from_slice(&self.ip_bytes());
        b
    }
}

pub fn ethernet_header(ethertype: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source
    b.extend_from_slice(&ethertype.to_be_bytes());
    b
}

/// An ARP request frame (who-has).
pub fn arp_request() -> Vec<u8> {
    let mut b = ethernet_header(0x0806);
    b.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 10, 0, 0, 1]);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    b
}

/// A frame of some ethertype Moat does not carry (LLDP).
pub fn unsupported_frame() -> Vec<u8> {
    let mut b = ethernet_header(0x88cc);
    b.extend_from_slice(&[0u8; 46]);
    b
}
