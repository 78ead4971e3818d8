//! HTTP/2 over mutual TLS between sidecars: one multiplexed connection per peer
//! endpoint and the identity it must prove, made on first use and replaced when it
//! breaks. Never by address alone: two endpoints at one address with different
//! identities (an address reused by another workload) never share a connection. With an idle timeout, a
//! connection no request has taken for that long leaves the pool; hyper then closes
//! it once its last stream ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_identity::{ALPN_H2, MeshTls, SpiffeId};

use super::Body;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] trellis_identity::TlsConfigError),
    #[error("HTTP/2 handshake with {addr}: {source}")]
    H2 {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

struct Pooled {
    identity: SpiffeId,
    /// The TLS configuration it was made with: a rotated certificate makes new ones.
    tls: Arc<MeshTls>,
    sender: SendRequest<Body>,
    /// When a request last took this connection (µs since the pool's epoch); also
    /// tells its idle watcher that the entry is still this connection.
    last_used_us: Arc<AtomicU64>,
}

/// Per dial address, one connection per expected identity (almost always one): the
/// request path looks up by address and compares identities, without allocating.
type Conns = DashMap<SocketAddr, Vec<Pooled>>;
/// A connect in progress, and its outcome for those who waited on it.
type Connecting = tokio::sync::OnceCell<Result<SendRequest<Body>, Arc<PoolError>>>;

/// Connections by dial address and expected identity. The map is sharded; lookups on
/// the request path take a shard read lock and clone a handle.
pub struct MeshPool {
    conns: Arc<Conns>,
    /// Keyed like the connections: a request never waits on, and takes, a connect
    /// made for another identity.
    connecting: DashMap<(SocketAddr, SpiffeId), Arc<Connecting>>,
    epoch: tokio::time::Instant,
    metrics: crate::metrics::Metrics,
}

impl MeshPool {
    pub fn new(metrics: crate::metrics::Metrics) -> Self {
        MeshPool {
            conns: Arc::new(DashMap::new()),
            connecting: DashMap::new(),
            epoch: tokio::time::Instant::now(),
            metrics,
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A sender to `addr`, which must prove `identity`; `service` is for telemetry.
    /// A new connection leaves the pool after `idle` without a request.
    pub async fn sender(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        tls: &Arc<MeshTls>,
        connect_timeout: Duration,
        service: &str,
        idle: Option<Duration>,
    ) -> Result<SendRequest<Body>, Arc<PoolError>> {
        if let Some(sender) = self.pooled(addr, identity, tls) {
            return Ok(sender);
        }
        // Requests that find no connection wait for one connect to the endpoint
        // instead of each making their own, and share its outcome.
        let key = (addr, identity.clone());
        let connecting = self.connecting.entry(key.clone()).or_default().clone();
        let result = connecting
            .get_or_init(|| async {
                // Another request may have pooled one since our lookup.
                if let Some(sender) = self.pooled(addr, identity, tls) {
                    return Ok(sender);
                }
                self.connect_and_pool(addr, identity, tls, connect_timeout, service, idle)
                    .await
                    .map_err(Arc::new)
            })
            .await
            .clone();
        self.connecting
            .remove_if(&key, |_, cell| Arc::ptr_eq(cell, &connecting));
        result
    }

    fn pooled(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        tls: &Arc<MeshTls>,
    ) -> Option<SendRequest<Body>> {
        let at_addr = self.conns.get(&addr)?;
        let pooled = at_addr.iter().find(|p| &p.identity == identity)?;
        if Arc::ptr_eq(&pooled.tls, tls) && pooled.sender.is_ready() {
            pooled.last_used_us.store(self.now_us(), Ordering::Relaxed);
            return Some(pooled.sender.clone());
        }
        None
    }

    async fn connect_and_pool(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        tls: &Arc<MeshTls>,
        connect_timeout: Duration,
        service: &str,
        idle: Option<Duration>,
    ) -> Result<SendRequest<Body>, PoolError> {
        let sender = connect(addr, identity, tls, connect_timeout).await?;
        self.metrics
            .outbound_connections
            .get_or_create(&crate::metrics::ServiceLabels {
                service: service.to_owned(),
                peer_identity: identity.to_string(),
            })
            .inc();
        let last_used_us = Arc::new(AtomicU64::new(self.now_us()));
        if let Some(idle) = idle {
            tokio::spawn(remove_when_idle(
                Arc::downgrade(&self.conns),
                addr,
                last_used_us.clone(),
                self.epoch,
                idle,
            ));
        }
        let pooled = Pooled {
            identity: identity.clone(),
            tls: tls.clone(),
            sender: sender.clone(),
            last_used_us,
        };
        let mut at_addr = self.conns.entry(addr).or_default();
        match at_addr.iter_mut().find(|p| &p.identity == identity) {
            Some(old) => *old = pooled,
            None => at_addr.push(pooled),
        }
        Ok(sender)
    }

    /// Forgets the connections to an address after one failed, so the next request
    /// makes a new one.
    pub fn evict(&self, addr: SocketAddr) {
        self.conns.remove(&addr);
    }

    /// How many connections are pooled (for tests and the admin page).
    pub fn len(&self) -> usize {
        self.conns.iter().map(|at_addr| at_addr.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the connection from the pool once no request has taken it for `idle`.
/// Dropping the pool's handle lets hyper close it after its last stream; in-flight
/// requests finish. Ends early when the entry was replaced or evicted.
async fn remove_when_idle(
    conns: Weak<Conns>,
    addr: SocketAddr,
    last_used_us: Arc<AtomicU64>,
    epoch: tokio::time::Instant,
    idle: Duration,
) {
    loop {
        let last = epoch + Duration::from_micros(last_used_us.load(Ordering::Relaxed));
        tokio::time::sleep_until(last + idle).await;
        let Some(conns) = conns.upgrade() else {
            return;
        };
        let last = epoch + Duration::from_micros(last_used_us.load(Ordering::Relaxed));
        if last + idle > tokio::time::Instant::now() {
            continue;
        }
        let mut removed = false;
        if let Some(mut at_addr) = conns.get_mut(&addr) {
            let before = at_addr.len();
            at_addr.retain(|pooled| !Arc::ptr_eq(&pooled.last_used_us, &last_used_us));
            removed = at_addr.len() < before;
        }
        conns.remove_if(&addr, |_, at_addr| at_addr.is_empty());
        if removed {
            tracing::debug!(%addr, ?idle, "closing an idle mesh connection");
        }
        return;
    }
}

async fn connect(
    addr: SocketAddr,
    identity: &SpiffeId,
    tls: &MeshTls,
    connect_timeout: Duration,
) -> Result<SendRequest<Body>, PoolError> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| PoolError::Connect {
            addr,
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| PoolError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let config = tls.client_config_with_alpn(identity, ALPN_H2)?;
    let stream = tokio::time::timeout(
        connect_timeout,
        TlsConnector::from(config).connect(ServerName::IpAddress(addr.ip().into()), tcp),
    )
    .await
    .map_err(|_| PoolError::Handshake {
        addr,
        source: std::io::ErrorKind::TimedOut.into(),
    })?
    .map_err(|source| PoolError::Handshake { addr, source })?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .initial_stream_window_size(super::inbound::MESH_STREAM_WINDOW)
        .initial_connection_window_size(super::inbound::MESH_CONNECTION_WINDOW)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| PoolError::H2 { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%addr, error = %e, "mesh connection closed");
        }
    });
    Ok(sender)
}
