//! The destination a connection had before iptables redirected it to us.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6). `None` when the
/// connection was not redirected (no conntrack entry): then it was meant for us.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let addr = addr.ok()?.as_socket()?;
    (addr != local).then_some(addr)
}
