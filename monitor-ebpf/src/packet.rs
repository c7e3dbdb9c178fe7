//! Bounds-checked packet access and header parsing. Every read of packet memory in
//! the kernel programs goes through `Packet::read`, so the verifier sees one pattern.

use core::mem::size_of;

use monitor_common::{
    capture::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    datapath::{IpKey, ipv4_mapped},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// Why header parsing stopped early.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Truncated or inconsistent headers: the packet's fault.
    Malformed,
    /// Past what we inspect (`MAX_HEADER_OFFSET`): legal, just not looked at.
    TooDeep,
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// ICMP and ICMPv6 headers carry at least type, code, checksum and 4 more bytes.
const ICMP_HDR_LEN: usize = 8;
/// Offsets past this cannot be valid headers; keeps offsets bounded for the verifier.
const MAX_HEADER_OFFSET: usize = 512;

/// The packet as the program sees it: `[start, end)` of linear packet memory.
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    #[inline(always)]
    pub fn len(&self) -> u64 {
        (self.end - self.start) as u64
    }

    /// The single accessor for packet memory: a copy of the `T` at `offset`, or why not.
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, Stop> {
        if offset > MAX_HEADER_OFFSET {
            return Err(Stop::TooDeep);
        }
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return Err(Stop::Malformed);
        }
        // SAFETY: `[at, at + size_of::<T>())` lies inside the packet, checked above;
        // packet memory has no alignment guarantee, hence the unaligned read.
        Ok(unsafe { (at as *const T).read_unaligned() })
    }

    /// Checks that `len` bytes at `offset` are present (variable-length headers).
    #[inline(always)]
    fn require(&self, offset: usize, len: usize) -> Result<(), Stop> {
        if offset > MAX_HEADER_OFFSET || len > MAX_HEADER_OFFSET {
            return Err(Stop::TooDeep);
        }
        if self.start + offset + len > self.end {
            return Err(Stop::Malformed);
        }
        Ok(())
    }
}

/// Source address of an IP packet.
#[derive(Clone, Copy)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Source {
    /// An IPv4-mapped IPv6 source (`::ffff:a.b.c.d`) is judged and counted as the IPv4
    /// address it names, as the operator contract says; otherwise a spoofed mapped
    /// source would share the IPv4 address's statistics entry under other lists.
    #[inline(always)]
    fn from_ipv6(addr: [u8; 16]) -> Self {
        let mapped_prefix = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        if addr[..12] == mapped_prefix {
            Source::V4([addr[12], addr[13], addr[14], addr[15]])
        } else {
            Source::V6(addr)
        }
    }

    #[inline(always)]
    pub fn stats_key(&self) -> IpKey {
        match self {
            Source::V4(addr) => ipv4_mapped(*addr),
            Source::V6(addr) => *addr,
        }
    }
}

/// A TCP segment's header fields the capture needs (host order).
#[derive(Clone, Copy)]
pub struct Tcp {
    pub source_port: u16,
    pub dest_port: u16,
    pub seq: u32,
    /// `TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK` bits.
    pub flags: u8,
    /// Offset of the payload from the start of the frame.
    pub payload_offset: usize,
    /// Payload length according to the IP header.
    pub payload_len: usize,
}

/// What the datapath needs of a parsed frame.
pub enum Parsed {
    /// Not IP (ARP, LLDP, a third VLAN tag, ...): passed, not judged.
    NotIp,
    /// Broken before the source address could be trusted: counted and passed.
    Malformed,
    /// An IP packet, judged by its source whatever follows: a broken header after the
    /// source address must not be a way around the blocklist. `well_formed` is false
    /// when a later header is truncated or inconsistent.
    Ip {
        source: Source,
        /// Destination, IPv4-mapped for IPv4.
        destination: IpKey,
        well_formed: bool,
        /// The TCP header of a well-formed TCP packet that carries one.
        tcp: Option<Tcp>,
    },
}

impl Parsed {
    /// An IP packet whose later headers ended with `end`; its IP payload ends at `ip_end`.
    #[inline(always)]
    fn ip(
        source: Source,
        destination: IpKey,
        end: Result<Option<TcpHeader>, Stop>,
        ip_end: usize,
    ) -> Self {
        let tcp = match end {
            Ok(Some(header)) => Some(Tcp {
                source_port: header.source_port,
                dest_port: header.dest_port,
                seq: header.seq,
                flags: header.flags,
                payload_offset: header.payload_offset,
                payload_len: ip_end.saturating_sub(header.payload_offset),
            }),
            _ => None,
        };
        Parsed::Ip {
            source,
            destination,
            well_formed: !matches!(end, Err(Stop::Malformed)),
            tcp,
        }
    }
}

/// The TCP header fields, before the payload length is known.
#[derive(Clone, Copy)]
struct TcpHeader {
    source_port: u16,
    dest_port: u16,
    seq: u32,
    flags: u8,
    payload_offset: usize,
}

/// Parses Ethernet (up to two VLAN tags), IPv4 or IPv6 and the transport header.
#[inline(always)]
pub fn parse(pkt: &Packet) -> Parsed {
    let Ok(eth) = pkt.read::<EthHdr>(0) else {
        return Parsed::Malformed;
    };
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Ok(vlan) = pkt.read::<VlanHdr>(offset) else {
            return Parsed::Malformed;
        };
        ether_type = u16::from_be(vlan.ether_type);
        offset += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(pkt, offset),
        ETH_P_IPV6 => parse_ipv6(pkt, offset),
        // A third tag, or a tag we did not unwrap: not ours to judge.
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4(pkt: &Packet, offset: usize) -> Parsed {
    let Ok(ip) = pkt.read::<Ipv4Hdr>(offset) else {
        return Parsed::Malformed;
    };
    if ip.version() != 4 {
        return Parsed::Malformed;
    }
    let source = Source::V4(ip.src_addr);
    let destination = ipv4_mapped(ip.dst_addr);
    let header_len = usize::from(ip.ihl());
    let ip_end = offset + usize::from(ip.tot_len());
    if header_len < Ipv4Hdr::LEN || usize::from(ip.tot_len()) < header_len {
        return Parsed::ip(source, destination, Err(Stop::Malformed), ip_end);
    }
    let end = pkt.require(offset, header_len).and_then(|()| {
        // Only the first fragment carries the transport header.
        if ip.frag_offset() == 0 {
            transport(pkt, offset + header_len, ip.proto)
        } else {
            Ok(None)
        }
    });
    Parsed::ip(source, destination, end, ip_end)
}

#[inline(always)]
fn parse_ipv6(pkt: &Packet, offset: usize) -> Parsed {
    let Ok(ip) = pkt.read::<Ipv6Hdr>(offset) else {
        return Parsed::Malformed;
    };
    if ip.version() != 6 {
        return Parsed::Malformed;
    }
    let source = Source::from_ipv6(ip.src_addr);
    let destination = Source::from_ipv6(ip.dst_addr).stats_key();
    let ip_end = offset + Ipv6Hdr::LEN + usize::from(ip.payload_len());
    let end = walk_ipv6_headers(pkt, offset + Ipv6Hdr::LEN, ip.next_hdr);
    Parsed::ip(source, destination, end, ip_end)
}

/// Walks the extension headers to the transport header. Chains longer than we walk
/// are legal: the walk just stops there.
#[inline(always)]
fn walk_ipv6_headers(
    pkt: &Packet,
    mut offset: usize,
    mut next: u8,
) -> Result<Option<TcpHeader>, Stop> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        // Every extension header starts with next-header and a length byte.
        let ext_len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let hdr: [u8; 2] = pkt.read(offset)?;
                next = hdr[0];
                (usize::from(hdr[1]) + 1) * 8
            }
            IPPROTO_AH => {
                let hdr: [u8; 2] = pkt.read(offset)?;
                next = hdr[0];
                (usize::from(hdr[1]) + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                let hdr: [u8; 4] = pkt.read(offset)?;
                next = hdr[0];
                let fragment_offset = u16::from_be_bytes([hdr[2], hdr[3]]) >> 3;
                if fragment_offset != 0 {
                    return Ok(None);
                }
                8
            }
            proto => return transport(pkt, offset, proto),
        };
        pkt.require(offset, ext_len)?;
        offset += ext_len;
    }
    Ok(None)
}

/// Verifies that the transport header is complete (other protocols pass unchecked)
/// and returns TCP's fields.
#[inline(always)]
fn transport(pkt: &Packet, offset: usize, proto: u8) -> Result<Option<TcpHeader>, Stop> {
    match proto {
        IPPROTO_TCP => {
            let tcp: TcpHdr = pkt.read(offset)?;
            let header_len = usize::from(tcp.doff()) * 4;
            if header_len < TcpHdr::LEN {
                return Err(Stop::Malformed);
            }
            pkt.require(offset, header_len)?;
            let flags = (tcp.fin() as u8 * TCP_FIN)
                | (tcp.syn() as u8 * TCP_SYN)
                | (tcp.rst() as u8 * TCP_RST)
                | (tcp.ack() as u8 * TCP_ACK);
            Ok(Some(TcpHeader {
                source_port: u16::from_be_bytes(tcp.source),
                dest_port: u16::from_be_bytes(tcp.dest),
                seq: u32::from_be_bytes(tcp.seq),
                flags,
                payload_offset: offset + header_len,
            }))
        }
        IPPROTO_UDP => pkt.read::<UdpHdr>(offset).map(|_| None),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => pkt.require(offset, ICMP_HDR_LEN).map(|()| None),
        _ => Ok(None),
    }
}
