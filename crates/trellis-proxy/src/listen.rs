//! Binding the proxy's listeners in every address family.
//!
//! A wildcard address (`0.0.0.0` or `[::]`) means "every family": an IPv4 socket and an
//! IPv6 socket with `IPV6_V6ONLY` on, on the same port. Two sockets rather than one
//! dual-stack socket, so an accepted connection never carries an IPv4-mapped address
//! (`::ffff:a.b.c.d`) and the original-destination lookup matches its family. Where the
//! kernel has no IPv6 the IPv4 socket alone is bound (with a log line): nothing can
//! arrive over IPv6 there.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Pending connections per listener, as tokio's own `bind` uses.
const BACKLOG: i32 = 1024;

/// The listeners for `addr`: one for a specific address, one per family for a wildcard
/// (IPv4 first). An IPv6 socket that cannot be created because the kernel has no IPv6
/// is left out; any other failure is an error.
pub fn bind(addr: SocketAddr) -> io::Result<Vec<TcpListener>> {
    if !addr.ip().is_unspecified() {
        return Ok(vec![bind_one(addr)?]);
    }
    let v4 = bind_one(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))?;
    // Port 0 asks for any port: the IPv6 socket takes the one IPv4 got.
    let port = v4.local_addr()?.port();
    let v6_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match bind_one(v6_addr) {
        Ok(v6) => Ok(vec![v4, v6]),
        Err(e) if no_ipv6(&e) => {
            tracing::info!(addr = %v6_addr, error = %e, "no IPv6 in this kernel: IPv4 listener only");
            Ok(vec![v4])
        }
        Err(e) => Err(e),
    }
}

/// One non-blocking listening socket; an IPv6 one accepts IPv6 only.
fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // As tokio's bind: a restarted proxy rebinds while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The errors a kernel without IPv6 (`ipv6.disable=1`) gives for an IPv6 socket.
fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(errno::EAFNOSUPPORT | errno::EADDRNOTAVAIL)
    )
}

/// Linux errno values (from `asm-generic/errno.h`), to avoid a libc dependency here.
mod errno {
    pub const EAFNOSUPPORT: i32 = 97;
    pub const EADDRNOTAVAIL: i32 = 99;
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) turned into the IPv4 one,
/// so comparisons, policy and metrics see one form of each address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wildcard_binds_both_families_on_one_port() {
        let listeners = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert!(listeners[0].local_addr().unwrap().is_ipv4());
        if listeners.len() == 2 {
            assert!(listeners[1].local_addr().unwrap().is_ipv6());
            assert_eq!(ports[0], ports[1]);
            // Each family's socket takes its own family only: no mapped addresses.
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, ports[1]));
            let client = tokio::net::TcpStream::connect(v6).await.unwrap();
            let (_, peer) = listeners[1].accept().await.unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            assert!(peer.is_ipv6());
        }
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, ports[0]));
        let _client = tokio::net::TcpStream::connect(v4).await.unwrap();
        let (_, peer) = listeners[0].accept().await.unwrap();
        assert!(peer.is_ipv4());
    }

    #[test]
    fn a_specific_address_binds_one_socket() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let listeners = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(listeners.len(), 1);
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.244.0.3]:8080".parse().unwrap();
        assert_eq!(canonical(mapped), "10.244.0.3:8080".parse().unwrap());
        let v6: SocketAddr = "[fd00:10:244::3]:8080".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
