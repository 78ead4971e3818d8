//! The destination a connection had before iptables redirected it to us.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::listen::canonical;

/// `SO_ORIGINAL_DST` at `SOL_IP` (IPv4) or `IP6T_SO_ORIGINAL_DST` at `SOL_IPV6`
/// (IPv6), by the family of the connection. `None` when the connection was not
/// redirected (no conntrack entry): then it was meant for us. IPv4-mapped addresses
/// come back as IPv4 (see [`crate::listen::canonical`]).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = canonical(stream.local_addr().ok()?);
    // A dual-stack socket's IPv4 connection is IPv4 to conntrack: ask at SOL_IP.
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let addr = canonical(addr.ok()?.as_socket()?);
    (addr != local).then_some(addr)
}
