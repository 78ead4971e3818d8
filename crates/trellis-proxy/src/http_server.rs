//! The proxy's own HTTP/1 servers (admin 15000, health 15020), bounded: a request's
//! headers must arrive within a deadline, and connections are capped in all and per
//! source address, so a slow or greedy client (slowloris from another pod) cannot
//! starve the kubelet's probes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of one HTTP server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time allowed for a request's headers, counted from when the server starts
    /// waiting for them (also between keep-alive requests).
    pub header_read_timeout: Duration,
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one source address: one greedy client cannot take them all.
    pub max_connections_per_source: usize,
    /// A connection is closed after this long, whatever it is doing.
    pub max_connection_age: Duration,
}

impl Default for ServerLimits {
    /// Generous for the kubelet and a Prometheus scraper, small for an attacker.
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 256,
            max_connections_per_source: 16,
            max_connection_age: Duration::from_secs(300),
        }
    }
}

/// Open connections per source address.
#[derive(Default)]
struct PerSource(Mutex<HashMap<IpAddr, usize>>);

/// Held by a connection; gives its per-source slot back when dropped.
struct SourceSlot {
    sources: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut open = self.0.lock().ok()?;
        let n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.sources.0.lock()
            && let Some(n) = open.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `service` on `listener` until the task is dropped. A connection over a
/// limit is closed at once (not left in the backlog, where it would delay others).
pub async fn serve_http1<S>(
    what: &'static str,
    listener: TcpListener,
    limits: ServerLimits,
    service: S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Full<Bytes>>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let sources = Arc::new(PerSource::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(server = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some((permit, slot)) = admit(&connections, &sources, peer, &limits) else {
            tracing::debug!(server = what, %peer, "connection over the limit; closed");
            continue;
        };
        let service = service.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.max_connection_age, connection).await {
                Ok(Err(e)) => tracing::debug!(server = what, %peer, error = %e, "connection ended"),
                Err(_) => tracing::debug!(server = what, %peer, "connection too old; closed"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn admit(
    connections: &Arc<Semaphore>,
    sources: &Arc<PerSource>,
    peer: SocketAddr,
    limits: &ServerLimits,
) -> Option<(tokio::sync::OwnedSemaphorePermit, SourceSlot)> {
    let slot = sources.take(peer.ip(), limits.max_connections_per_source)?;
    let permit = connections.clone().try_acquire_owned().ok()?;
    Some((permit, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_slots_are_capped_and_given_back() {
        let sources = Arc::new(PerSource::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = sources.take(a, 2).unwrap();
        let _second = sources.take(a, 2).unwrap();
        assert!(sources.take(a, 2).is_none(), "a third from one source");
        assert!(
            sources.take(b, 2).is_some(),
            "another source is not affected"
        );
        drop(first);
        assert!(sources.take(a, 2).is_some(), "a slot comes back when freed");
    }

    #[tokio::test]
    async fn a_slow_client_is_cut_off_and_others_are_served() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServerLimits {
            header_read_timeout: Duration::from_millis(200),
            max_connections: 8,
            max_connections_per_source: 2,
            max_connection_age: Duration::from_secs(30),
        };
        let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        let server = tokio::spawn(serve_http1("test", listener, limits, service));
        // Two slow clients take this source's slots; a third is closed at once.
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            slow.push(s);
        }
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "over the per-source cap: closed without an answer");
        // The header deadline frees the slots: the slow ones are closed.
        for mut s in slow {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap_or(0);
            let answer = String::from_utf8_lossy(&buf[..n]);
            assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
        }
        // The slots are given back just after the sockets close: try a few times.
        let mut answer = Vec::new();
        for _ in 0..100 {
            let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
            ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            answer.clear();
            let _ = tokio::time::timeout(Duration::from_secs(10), ok.read_to_end(&mut answer))
                .await
                .unwrap();
            if !answer.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        server.abort();
    }
}
