//! CIDR parsing as operators type it: IPv4 or IPv6, with or without a prefix length
//! (a bare address is a host), IPv4-mapped IPv6 treated as IPv4, host bits cleared.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid CIDR {input:?}: expected an IPv4 or IPv6 address, optionally with /PREFIX")]
pub struct CidrError {
    pub input: String,
}

/// Parses and canonicalises one CIDR.
pub fn parse(input: &str) -> Result<IpNet, CidrError> {
    let trimmed = input.trim();
    let error = || CidrError {
        input: input.to_owned(),
    };
    let net = if trimmed.contains('/') {
        trimmed.parse::<IpNet>().map_err(|_| error())?
    } else {
        IpNet::from(trimmed.parse::<IpAddr>().map_err(|_| error())?)
    };
    Ok(canonical(net))
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d/n`, n >= 96) becomes IPv4; host bits are cleared.
pub fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => match Ipv4Net::new(v4, v6.prefix_len() - 96) {
                Ok(v4net) => IpNet::V4(v4net.trunc()),
                Err(_) => IpNet::V6(v6.trunc()),
            },
            None => IpNet::V6(v6.trunc()),
        },
        other => other.trunc(),
    }
}

/// An address as the datapath keys it: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical_addr(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// True for a single address (/32 or /128): these live in the exact-match host maps.
pub fn is_host(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// The supernet of `net` with `prefix_len` bits, for walking the covering prefixes.
pub fn supernet(net: &IpNet, prefix_len: u8) -> Option<IpNet> {
    match net {
        IpNet::V4(v4) => Ipv4Net::new(v4.network(), prefix_len)
            .ok()
            .map(|n| IpNet::V4(n.trunc())),
        IpNet::V6(v6) => Ipv6Net::new(v6.network(), prefix_len)
            .ok()
            .map(|n| IpNet::V6(n.trunc())),
    }
}

/// The largest address of the network, as a host net: the upper end of a BTreeMap range
/// holding every canonical net inside `net`.
pub fn last_host(net: &IpNet) -> IpNet {
    match net {
        IpNet::V4(v4) => IpNet::V4(Ipv4Net::from(v4.broadcast())),
        IpNet::V6(v6) => IpNet::V6(Ipv6Net::from(v6.broadcast())),
    }
}

/// The unspecified IPv4 host net, a harmless placeholder.
pub fn placeholder() -> IpNet {
    IpNet::V4(Ipv4Net::from(Ipv4Addr::UNSPECIFIED))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        parse(s)
            .map(|n| n.to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn bare_addresses_are_hosts() {
        assert_eq!(p("10.1.2.3"), "10.1.2.3/32");
        assert_eq!(p("2001:db8::1"), "2001:db8::1/128");
        assert!(is_host(&parse("10.1.2.3").unwrap()));
        assert!(!is_host(&parse("10.1.2.0/24").unwrap()));
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(p("10.1.2.3/8"), "10.0.0.0/8");
        assert_eq!(p("2001:db8::1/64"), "2001:db8::/64");
        assert_eq!(p(" 192.0.2.7/24 "), "192.0.2.0/24");
    }

    #[test]
    fn ipv4_mapped_is_ipv4() {
        assert_eq!(p("::ffff:192.0.2.1"), "192.0.2.1/32");
        assert_eq!(p("::ffff:192.0.2.0/120"), "192.0.2.0/24");
        assert_eq!(p("::ffff:0:0/96"), "0.0.0.0/0");
        // Shorter than /96 is not purely mapped: stays IPv6.
        assert_eq!(p("::ffff:0:0/80"), "::/80");
        assert_eq!(
            canonical_addr("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn garbage_is_rejected_with_the_input_named() {
        for bad in [
            "",
            "10.0.0",
            "10.0.0.1/33",
            "2001:db8::/129",
            "host",
            "1.2.3.4/",
            "/8",
            "1.2.3.4/-1",
        ] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.input, bad);
            assert!(err.to_string().contains("invalid CIDR"));
        }
    }

    #[test]
    fn range_helpers() {
        let net = parse("10.0.0.0/8").unwrap();
        assert_eq!(last_host(&net).to_string(), "10.255.255.255/32");
        assert_eq!(
            supernet(&parse("10.1.2.3").unwrap(), 16)
                .unwrap()
                .to_string(),
            "10.1.0.0/16"
        );
    }
}
