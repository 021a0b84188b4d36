//! `trusted_proxies`: IP networks.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

/// An IP network for `trusted_proxies`: `10.0.0.0/8`, `::1/128` or a bare address (a
/// network of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr(IpNet);

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (s.as_str(), None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP or CIDR"))?;
        let host = IpNet::from(addr);
        let net = match bits {
            Some(b) => Some(b)
                .filter(|b| b.bytes().all(|d| d.is_ascii_digit()))
                .and_then(|b| b.parse::<u8>().ok())
                .and_then(|b| IpNet::new(addr, b).ok())
                .ok_or_else(|| {
                    let max = host.max_prefix_len();
                    format!("{s:?}: prefix length must be 0..={max}")
                })?,
            None => host,
        };
        // `127.0.0.5/8` trusts all of 127/8: written as one address with a length, it was
        // meant as one of the two. Say which network it is rather than guess.
        if net.addr() != net.network() {
            return Err(format!(
                "{s:?} has host bits set: write the network ({}/{}) or the address alone",
                net.network(),
                net.prefix_len()
            ));
        }
        Ok(Self(net))
    }
}

impl Cidr {
    /// An IPv4-mapped IPv6 peer (`::ffff:10.1.2.3`, from a dual-stack listener) is matched
    /// as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let net = Cidr::try_from("10.0.0.0/8".to_string()).unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one = Cidr::try_from("::1".to_string()).unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(Cidr::try_from("10.0.0.0/33".to_string()).is_err());
        let all = Cidr::try_from("0.0.0.0/0".to_string()).unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6 = Cidr::try_from("2001:db8::/32".to_string()).unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let host = Cidr::try_from("10.1.0.0/16".to_string()).unwrap();
        assert!(host.contains("10.1.255.255".parse().unwrap()));
        let e = Cidr::try_from("::1/129".to_string()).unwrap_err();
        assert_eq!(e, "\"::1/129\": prefix length must be 0..=128");
        let e = Cidr::try_from("10.0.0.0/x".to_string()).unwrap_err();
        assert_eq!(e, "\"10.0.0.0/x\": prefix length must be 0..=32");
        let e = Cidr::try_from("127.0.0.5/8".to_string()).unwrap_err();
        assert!(e.contains("127.0.0.0/8"), "{e}");
        let e = Cidr::try_from("example.com".to_string()).unwrap_err();
        assert_eq!(e, "\"example.com\" is not an IP or CIDR");
    }
}
