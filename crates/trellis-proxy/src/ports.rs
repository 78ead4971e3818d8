//! The ports of DESIGN.md, in one place.

pub const ADMIN: u16 = 15000;
pub const OUTBOUND: u16 = 15001;
pub const INBOUND: u16 = 15006;
pub const TUNNEL: u16 = 15008;
pub const HEALTH: u16 = 15020;
pub const CONTROL_GRPC: u16 = 15010;
/// The proxy's own user; iptables leaves its traffic alone.
pub const PROXY_UID: u32 = 1337;
