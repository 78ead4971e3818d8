//! The Pod's traffic redirection rules, as the Trellis init container writes them
//! (`trellis-proxy init`), in the manner of Istio's `istio-iptables` and
//! linkerd2-proxy-init.
//!
//! All rules live in the `nat` table, in four chains Trellis owns:
//!
//! - `PREROUTING -p tcp -j TRELLIS_INBOUND`: inbound TCP connections, except those to
//!   the proxy's own ports and to excluded inbound ports, jump to `TRELLIS_IN_REDIRECT`,
//!   which redirects them to the proxy's inbound port (15006).
//! - `OUTPUT -p tcp -j TRELLIS_OUTPUT`: outgoing TCP connections, except those of the
//!   proxy's UID (1337) or GID, those over loopback or to 127.0.0.1, to excluded ports and
//!   to excluded CIDRs, jump to `TRELLIS_REDIRECT`, which redirects them to the proxy's
//!   outbound port (15001).
//!
//! [`plan`] gives the rules as data, [`dry_run_text`] as iptables-restore-like text,
//! [`apply`] writes them (idempotently) and [`cleanup`] removes them. The `_in` variants
//! run through a [`CommandRunner`], e.g. [`SystemRunner::in_netns`] for a named network
//! namespace.
//!
//! The same rules are written for IPv6 with the matching `ip6tables` (loopback `::1`
//! instead of 127.0.0.1). A Pod with a global or unique-local IPv6 address whose
//! ip6tables does not work is refused ([`InitError::NoIp6tables`]) rather than left with
//! IPv6 open.
//!
//! Trellis's chains are rewritten atomically (see [`apply_in`]). Gaps: UDP is never
//! redirected; the excluded CIDRs are IPv4 networks only.

mod apply;
mod args;
mod cidr;
mod error;
mod plan;
mod pod_ipv6;
mod runner;

pub use apply::{apply, apply_in, cleanup, cleanup_in, save_nat_in};
pub use args::InitArgs;
pub use cidr::{Ipv4Cidr, parse_cidrs, parse_port, parse_ports};
pub use error::InitError;
pub use plan::{
    CHAIN_IN_REDIRECT, CHAIN_INBOUND, CHAIN_OUTPUT, CHAIN_REDIRECT, IpFamily, NAT, OWN_CHAINS,
    Rule, RuleKind, dry_run_text, plan, plan_for,
};
pub use pod_ipv6::{IF_INET6, PodIpv6, routable_addresses};
pub use runner::{Backend, CommandRunner, Iptables, SystemRunner};

/// The proxy's UID: its own traffic is never redirected.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// The proxy's outbound port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The proxy's inbound port.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// The proxy's own listening ports, never redirected inbound: admin, outbound, inbound,
/// tunnel, health/metrics, and 15021 (readiness, as Istio uses it).
pub const DEFAULT_PROXY_PORTS: [u16; 6] = [15000, 15001, 15006, 15008, 15020, 15021];

/// What to redirect, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// The proxy's UID (1337); its connections are left alone.
    pub proxy_uid: u32,
    /// The proxy's GID, if its connections should also be recognised by group.
    pub proxy_gid: Option<u32>,
    /// Where outgoing connections are redirected (15001).
    pub outbound_port: u16,
    /// Where incoming connections are redirected (15006).
    pub inbound_port: u16,
    /// The proxy's own ports, never redirected inbound.
    pub proxy_ports: Vec<u16>,
    /// Destination ports whose outgoing connections go direct.
    pub exclude_outbound_ports: Vec<u16>,
    /// Local ports whose incoming connections go direct to the app.
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination networks whose outgoing connections go direct.
    pub exclude_outbound_cidrs: Vec<Ipv4Cidr>,
    /// Which iptables binaries to use.
    pub backend: Backend,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: None,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            proxy_ports: DEFAULT_PROXY_PORTS.to_vec(),
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            backend: Backend::Auto,
        }
    }
}

impl InitConfig {
    /// Checks what the types cannot: redirect ports and listed ports are not 0.
    pub fn validate(&self) -> Result<(), InitError> {
        if self.outbound_port == 0 || self.inbound_port == 0 {
            return Err(InitError::Config(format!(
                "redirect ports must not be 0 (outbound {}, inbound {})",
                self.outbound_port, self.inbound_port
            )));
        }
        let lists = [
            ("proxy_ports", &self.proxy_ports),
            ("exclude_outbound_ports", &self.exclude_outbound_ports),
            ("exclude_inbound_ports", &self.exclude_inbound_ports),
        ];
        for (name, list) in lists {
            if list.contains(&0) {
                return Err(InitError::BadPort {
                    text: "0".into(),
                    reason: format!("port 0 in {name}"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod fake;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
