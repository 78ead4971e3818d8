//! Tiny parsers for the values the init container takes on its command line:
//! IPv4 CIDRs (`10.0.0.0/8`) and port lists (`15090,8080`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::InitError;

/// An IPv4 network, `addr/prefix`, always stored with the host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// Builds a network; host bits of `addr` are cleared. Fails if `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, InitError> {
        if prefix > 32 {
            return Err(InitError::BadCidr {
                text: format!("{addr}/{prefix}"),
                reason: format!("prefix length {prefix} is larger than 32"),
            });
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length, 0..=32.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        Self::new(ip, self.prefix).is_ok_and(|n| n.addr == self.addr)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = InitError;

    /// Parses `a.b.c.d/len`; a bare address means `/32`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| InitError::BadCidr {
            text: text.to_string(),
            reason,
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(bad("empty".into()));
        }
        let (addr_text, prefix_text) = match trimmed.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (trimmed, None),
        };
        let addr: Ipv4Addr = addr_text.parse().map_err(|_| {
            if addr_text.contains(':') {
                bad("IPv6 is not supported (IPv4 only)".into())
            } else {
                bad(format!("`{addr_text}` is not an IPv4 address"))
            }
        })?;
        let prefix = match prefix_text {
            None => 32,
            Some(p) => {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(format!("prefix length `{p}` is not a number")));
                }
                let n: u32 = p
                    .parse()
                    .map_err(|_| bad(format!("prefix length `{p}` is not a number")))?;
                u8::try_from(n)
                    .ok()
                    .filter(|n| *n <= 32)
                    .ok_or_else(|| bad(format!("prefix length {n} is larger than 32")))?
            }
        };
        Self::new(addr, prefix).map_err(|_| bad("prefix length is larger than 32".into()))
    }
}

/// Parses one TCP port, 1..=65535.
pub fn parse_port(text: &str) -> Result<u16, InitError> {
    let bad = |reason: &str| InitError::BadPort {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not a number"));
    }
    match t.parse::<u32>() {
        Ok(0) => Err(bad("port 0 is not allowed")),
        Ok(n) => u16::try_from(n).map_err(|_| bad("larger than 65535")),
        Err(_) => Err(bad("larger than 65535")),
    }
}

/// Parses a comma-separated port list such as `15090, 8080`; empty text gives no ports.
pub fn parse_ports(text: &str) -> Result<Vec<u16>, InitError> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_port)
        .collect()
}

/// Parses a comma-separated CIDR list such as `10.0.0.0/8,192.168.1.1`.
pub fn parse_cidrs(text: &str) -> Result<Vec<Ipv4Cidr>, InitError> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs() {
        let c: Ipv4Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(c.prefix(), 8);
        let host: Ipv4Cidr = "192.168.1.7".parse().unwrap();
        assert_eq!(host.to_string(), "192.168.1.7/32");
        let masked: Ipv4Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(masked.to_string(), "10.1.0.0/16");
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(c.contains(Ipv4Addr::new(10, 9, 9, 9)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 1)));
    }

    #[test]
    fn cidr_errors_name_the_text() {
        for (text, needle) in [
            ("10.0.0.0/33", "larger than 32"),
            ("10.0.0/8", "not an IPv4 address"),
            ("10.0.0.0/", "not a number"),
            ("10.0.0.0/x", "not a number"),
            ("10.0.0.0/-1", "not a number"),
            ("fd00::/8", "IPv6"),
            ("", "empty"),
        ] {
            let err = text.parse::<Ipv4Cidr>().unwrap_err().to_string();
            assert!(err.contains(&format!("`{text}`")), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn parses_ports() {
        assert_eq!(parse_ports("15090, 8080,").unwrap(), vec![15090, 8080]);
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
        for (text, needle) in [("0", "port 0"), ("65536", "65535"), ("80a", "number")] {
            let err = parse_ports(text).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{text}`")) && err.contains(needle),
                "{err}"
            );
        }
        assert_eq!(
            parse_cidrs("10.0.0.0/8, 1.2.3.4").unwrap().len(),
            2,
            "two cidrs"
        );
    }
}
