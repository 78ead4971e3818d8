//! The control plane's HTTP/1 servers (admin 15014, debug, webhook 15017), bounded:
//! a TLS handshake and a request's headers must arrive within deadlines, and
//! connections are capped in all and per source address, so a slow or greedy client
//! cannot starve the kubelet's probes, Prometheus, or the API server's admission calls.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::limits::{ConcurrencyByKey, KeySlot};

/// Limits of one HTTP server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time allowed for the TLS handshake (TLS servers only).
    pub handshake_timeout: Duration,
    /// Time allowed for a request's headers, counted from when the server starts
    /// waiting for them (also between keep-alive requests).
    pub header_read_timeout: Duration,
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one source address.
    pub max_connections_per_source: usize,
    /// A connection is closed after this long, whatever it is doing.
    pub max_connection_age: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_connections_per_source: 64,
            max_connection_age: Duration::from_secs(600),
        }
    }
}

/// Serves `service` on `listener` (over TLS with `tls`) until the task is dropped. A
/// connection over a limit is closed at once rather than left in the backlog.
pub async fn serve_http1<S>(
    what: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
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
    let sources = ConcurrencyByKey::<IpAddr>::default();
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
        let Some(held) = admit(&connections, &sources, peer, &limits) else {
            tracing::debug!(server = what, %peer, "connection over the limit; closed");
            continue;
        };
        let (service, limits, tls) = (service.clone(), limits.clone(), tls.clone());
        tokio::spawn(async move {
            let _held = held;
            let Some(tls) = tls else {
                return serve_connection(what, peer, stream, &limits, service).await;
            };
            match tokio::time::timeout(limits.handshake_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(what, peer, stream, &limits, service).await,
                Ok(Err(e)) => {
                    tracing::debug!(server = what, %peer, error = %e, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(server = what, %peer, "TLS handshake timed out"),
            }
        });
    }
}

type Held = (tokio::sync::OwnedSemaphorePermit, KeySlot<IpAddr>);

fn admit(
    connections: &Arc<Semaphore>,
    sources: &ConcurrencyByKey<IpAddr>,
    peer: SocketAddr,
    limits: &ServerLimits,
) -> Option<Held> {
    let slot = sources.take(peer.ip(), limits.max_connections_per_source)?;
    let permit = connections.clone().try_acquire_owned().ok()?;
    Some((permit, slot))
}

async fn serve_connection<IO, S>(
    what: &'static str,
    peer: SocketAddr,
    io: IO,
    limits: &ServerLimits,
    service: S,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Full<Bytes>>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    match tokio::time::timeout(limits.max_connection_age, connection).await {
        Ok(Err(e)) => tracing::debug!(server = what, %peer, error = %e, "connection ended"),
        Err(_) => tracing::debug!(server = what, %peer, "connection too old; closed"),
        Ok(Ok(())) => {}
    }
}
