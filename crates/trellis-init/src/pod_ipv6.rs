//! Whether the Pod can be reached over IPv6: decides if missing ip6tables is fatal.

use std::net::Ipv6Addr;

/// The kernel's list of IPv6 addresses in the current network namespace; absent when
/// the kernel has no IPv6.
pub const IF_INET6: &str = "/proc/net/if_inet6";

/// `scope` column of [`IF_INET6`] for global addresses (unique local `fd00::/8` too).
const SCOPE_GLOBAL: u8 = 0x00;

/// One IPv6 address other pods can route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIpv6 {
    /// The address.
    pub addr: Ipv6Addr,
    /// The interface holding it.
    pub interface: String,
}

impl std::fmt::Display for PodIpv6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}", self.addr, self.interface)
    }
}

/// The global and unique-local addresses on interfaces other than `lo`, from the text of
/// [`IF_INET6`] (`<32 hex digits> <ifindex> <prefixlen> <scope> <flags> <name>`).
/// Link-local and loopback addresses do not count; malformed lines are skipped.
pub fn routable_addresses(if_inet6: &str) -> Vec<PodIpv6> {
    if_inet6
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [hex, _index, _prefix, scope, _flags, interface] = fields.as_slice() else {
                return None;
            };
            if hex.len() != 32 {
                return None;
            }
            let addr = Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
            let scope = u8::from_str_radix(scope, 16).ok()?;
            let routable = scope == SCOPE_GLOBAL && *interface != "lo" && !addr.is_loopback();
            routable.then(|| PodIpv6 {
                addr,
                interface: (*interface).to_string(),
            })
        })
        .collect()
}
