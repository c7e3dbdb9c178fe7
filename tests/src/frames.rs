//! Crafted Ethernet frames for BPF_PROG_TEST_RUN. Checksums are left zero: the XDP
//! program does not verify them, and the kernel does not for test runs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// Transport layer of a crafted packet.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        dport: u16,
    },
    Udp {
        dport: u16,
    },
    Icmp,
    /// No transport header at all (e.g. a non-first fragment).
    None,
}

/// IPv6 extension header to insert before the transport header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    DestOpts,
    Routing,
    /// Fragment header with this fragment offset (in 8-byte units).
    Fragment {
        offset: u16,
    },
    /// Authentication header (its length counts 4-byte words, minus 2).
    Ah,
    /// Destination options padded to this many 8-byte units (1..=256).
    LongDestOpts {
        units: usize,
    },
}

impl Ext {
    fn len(&self) -> usize {
        match self {
            Ext::LongDestOpts { units } => units * 8,
            Ext::Ah => 16,
            _ => 8,
        }
    }
}

/// Frame description; `build` turns it into bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub vlans: Vec<(u16, u16)>,
    pub ipv4_options: usize,
    pub ipv4_fragment_offset: u16,
    pub ipv6_ext: Vec<Ext>,
    pub l4: L4,
    /// Source port of TCP and UDP.
    pub sport: u16,
    pub payload: usize,
    /// TCP flags byte (SYN unless set).
    pub tcp_flags: u8,
}

impl Frame {
    pub fn tcp(src: IpAddr, dst: IpAddr) -> Self {
        Self {
            src,
            dst,
            vlans: Vec::new(),
            ipv4_options: 0,
            ipv4_fragment_offset: 0,
            ipv6_ext: Vec::new(),
            l4: L4::Tcp { dport: 8080 },
            sport: 40000,
            payload: 0,
            tcp_flags: 0x02,
        }
    }

    pub fn v4(src: [u8; 4]) -> Self {
        Self::tcp(
            IpAddr::V4(Ipv4Addr::from(src)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        )
    }

    pub fn v6(src: &str) -> Self {
        let src: Ipv6Addr = src.parse().expect("ipv6 literal");
        Self::tcp(
            IpAddr::V6(src),
            IpAddr::V6("2001:db8::1".parse().expect("literal")),
        )
    }

    pub fn with_vlans(mut self, tags: &[(u16, u16)]) -> Self {
        self.vlans = tags.to_vec();
        self
    }

    pub fn with_l4(mut self, l4: L4) -> Self {
        self.l4 = l4;
        self
    }

    pub fn with_ipv4_options(mut self, bytes: usize) -> Self {
        assert!(
            bytes.is_multiple_of(4) && bytes <= 40,
            "IPv4 options come in words, up to 40 bytes"
        );
        self.ipv4_options = bytes;
        self
    }

    pub fn with_ipv4_fragment_offset(mut self, offset: u16) -> Self {
        self.ipv4_fragment_offset = offset;
        self
    }

    pub fn with_ext(mut self, ext: &[Ext]) -> Self {
        self.ipv6_ext = ext.to_vec();
        self
    }

    /// The same connection the other way (a TCP or UDP reply), without payload.
    pub fn reply(&self) -> Self {
        let (l4, sport) = match self.l4 {
            L4::Tcp { dport } => (L4::Tcp { dport: self.sport }, dport),
            L4::Udp { dport } => (L4::Udp { dport: self.sport }, dport),
            other => (other, self.sport),
        };
        Self {
            src: self.dst,
            dst: self.src,
            l4,
            sport,
            payload: 0,
            ..self.clone()
        }
    }

    /// An established connection's segment (ACK) instead of a SYN.
    pub fn established(mut self) -> Self {
        self.tcp_flags = 0x10;
        self
    }

    pub fn with_payload(mut self, bytes: usize) -> Self {
        self.payload = bytes;
        self
    }

    /// Offset where the last header (transport, or the last header present) ends;
    /// every cut below it truncates a header.
    pub fn headers_len(&self) -> usize {
        let bytes = self.build();
        bytes.len() - self.payload
    }

    /// The frame with `text` as its payload.
    pub fn build_with_payload(&self, text: &[u8]) -> Vec<u8> {
        let mut frame = self.clone().with_payload(text.len()).build();
        let start = frame.len() - text.len();
        frame[start..].copy_from_slice(text);
        frame
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.payload);
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst mac
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src mac
        let ether_type = match self.src {
            IpAddr::V4(_) => ETH_P_IP,
            IpAddr::V6(_) => ETH_P_IPV6,
        };
        // Each tag is [TPID][TCI], the inner EtherType follows the last one.
        for (tpid, vid) in &self.vlans {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&vid.to_be_bytes());
        }
        out.extend_from_slice(&ether_type.to_be_bytes());
        let l4 = self.transport();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let header_len = 20 + self.ipv4_options;
                let total = header_len + l4.len() + self.payload;
                out.push(0x40 | (header_len / 4) as u8);
                out.push(0);
                out.extend_from_slice(&(total as u16).to_be_bytes());
                out.extend_from_slice(&[0, 1]);
                out.extend_from_slice(&(self.ipv4_fragment_offset & 0x1fff).to_be_bytes());
                out.push(64);
                out.push(self.protocol());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                // NOP options.
                out.extend(std::iter::repeat_n(1u8, self.ipv4_options));
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ext_len: usize = self.ipv6_ext.iter().map(Ext::len).sum();
                let payload_len = ext_len + l4.len() + self.payload;
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&(payload_len as u16).to_be_bytes());
                out.push(self.ipv6_ext.first().map_or(self.protocol(), ext_number));
                out.push(64);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                for (index, ext) in self.ipv6_ext.iter().enumerate() {
                    let next = self
                        .ipv6_ext
                        .get(index + 1)
                        .map_or(self.protocol(), ext_number);
                    match ext {
                        Ext::Fragment { offset } => {
                            out.push(next);
                            out.push(0);
                            out.extend_from_slice(&(offset << 3).to_be_bytes());
                            out.extend_from_slice(&[0, 0, 0, 7]);
                        }
                        Ext::Ah => {
                            // 16 bytes: payload length (16 / 4) - 2 = 2, SPI, sequence.
                            out.push(next);
                            out.push(2);
                            out.extend_from_slice(&[0; 14]);
                        }
                        Ext::LongDestOpts { units } => {
                            out.push(next);
                            out.push(u8::try_from(units - 1).expect("at most 256 units"));
                            // A PadN option filling the rest (repeated while longer than 255).
                            let mut left = units * 8 - 2;
                            while left > 0 {
                                let chunk = left.min(257);
                                if chunk == 1 {
                                    out.push(0); // Pad1
                                } else {
                                    out.push(1);
                                    out.push(u8::try_from(chunk - 2).expect("PadN length"));
                                    out.extend(std::iter::repeat_n(0u8, chunk - 2));
                                }
                                left -= chunk;
                            }
                        }
                        _ => {
                            // 8 bytes: next header, length 0 (= 8 bytes), 6 bytes of padding.
                            out.push(next);
                            out.push(0);
                            out.extend_from_slice(&[1, 4, 0, 0, 0, 0]);
                        }
                    }
                }
            }
            _ => panic!("source and destination must be of one family"),
        }
        out.extend_from_slice(&l4);
        out.extend(std::iter::repeat_n(0xabu8, self.payload));
        out
    }

    fn protocol(&self) -> u8 {
        match (self.l4, self.src) {
            (L4::Tcp { .. }, _) => 6,
            (L4::Udp { .. }, _) => 17,
            (L4::Icmp, IpAddr::V4(_)) => 1,
            (L4::Icmp, IpAddr::V6(_)) => 58,
            (L4::None, _) => 59,
        }
    }

    fn transport(&self) -> Vec<u8> {
        match self.l4 {
            L4::Tcp { dport } => {
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&self.sport.to_be_bytes());
                tcp[2..4].copy_from_slice(&dport.to_be_bytes());
                tcp[12] = 5 << 4;
                tcp[13] = self.tcp_flags;
                tcp
            }
            L4::Udp { dport } => {
                let mut udp = vec![0u8; 8];
                udp[0..2].copy_from_slice(&self.sport.to_be_bytes());
                udp[2..4].copy_from_slice(&dport.to_be_bytes());
                udp[4..6].copy_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                udp
            }
            L4::Icmp => vec![8, 0, 0, 0, 0, 1, 0, 1],
            L4::None => Vec::new(),
        }
    }
}

fn ext_number(ext: &Ext) -> u8 {
    match ext {
        Ext::HopByHop => 0,
        Ext::Routing => 43,
        Ext::Fragment { .. } => 44,
        Ext::Ah => 51,
        Ext::DestOpts | Ext::LongDestOpts { .. } => 60,
    }
}

/// An ARP request: not IP, so neither counted per source nor judged.
pub fn arp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    out.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 10, 0, 0, 1]);
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_tags_sit_between_macs_and_ethertype() {
        let frame = Frame::v4([10, 0, 0, 1])
            .with_vlans(&[(ETH_P_8021AD, 100), (ETH_P_8021Q, 200)])
            .build();
        assert_eq!(&frame[12..14], &ETH_P_8021AD.to_be_bytes());
        assert_eq!(&frame[14..16], &100u16.to_be_bytes());
        assert_eq!(&frame[16..18], &ETH_P_8021Q.to_be_bytes());
        assert_eq!(&frame[18..20], &200u16.to_be_bytes());
        assert_eq!(&frame[20..22], &ETH_P_IP.to_be_bytes());
        assert_eq!(frame[22], 0x45);
    }

    #[test]
    fn lengths_add_up() {
        assert_eq!(Frame::v4([1, 2, 3, 4]).build().len(), 14 + 20 + 20);
        assert_eq!(
            Frame::v4([1, 2, 3, 4]).with_ipv4_options(8).build().len(),
            14 + 28 + 20
        );
        let v6 = Frame::v6("2001:db8::2").with_ext(&[Ext::HopByHop, Ext::Fragment { offset: 0 }]);
        assert_eq!(v6.build().len(), 14 + 40 + 16 + 20);
        assert_eq!(v6.clone().with_payload(10).headers_len(), v6.build().len());
        let long = Frame::v6("2001:db8::2").with_ext(&[Ext::Ah, Ext::LongDestOpts { units: 70 }]);
        assert_eq!(long.build().len(), 14 + 40 + 16 + 560 + 20);
    }
}
