//! HTTP/2 over mutual TLS between sidecars, for HTTP/2 and gRPC callers: multiplexed
//! connections per peer endpoint and the identity it must prove, made on first use and
//! replaced when they break. Never by address alone: two endpoints at one address with
//! different identities (an address reused by another workload) never share a
//! connection. A connection carries at most `MESH_MAX_STREAMS` streams (the limit the
//! peer's inbound advertises); at that limit another connection is opened rather than
//! queueing behind it. With an idle timeout, a connection no request has taken for that
//! long leaves the pool; hyper then closes it once its last stream ends.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_identity::{ALPN_H2, MeshTls, SpiffeId};

use super::inbound::{MESH_CONNECTION_WINDOW, MESH_MAX_STREAMS, MESH_STREAM_WINDOW};
use super::{Body, BoxError};

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
    #[error("HTTP/1.1 handshake with {addr}: {source}")]
    Http1 {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// What the pool and the requests on one connection share.
struct ConnState {
    /// Streams open on it (sent and not yet finished).
    streams: AtomicUsize,
    /// When a request last took it (µs since the pool's epoch); also tells its idle
    /// watcher which entry is this connection.
    last_used_us: AtomicU64,
}

struct Pooled {
    identity: SpiffeId,
    /// The TLS configuration it was made with: a rotated certificate makes new ones.
    tls: Arc<MeshTls>,
    sender: SendRequest<Body>,
    state: Arc<ConnState>,
}

/// Per dial address, the connections for each expected identity (almost always one
/// identity, and one connection below the stream limit): the request path looks up
/// by address and compares identities, without allocating.
type Conns = DashMap<SocketAddr, Vec<Pooled>>;
/// A connect in progress, and its outcome for those who waited on it.
type Connecting = tokio::sync::OnceCell<Result<NewConn, Arc<PoolError>>>;

/// A connection just made, before anyone took a stream on it.
#[derive(Clone)]
struct NewConn {
    sender: SendRequest<Body>,
    state: Arc<ConnState>,
}

/// How many connects one request may wait for: each gives it a stream unless the
/// requests that waited with it took them all.
const CONNECT_ROUNDS: usize = 4;

/// A request's hold on a pooled connection: one stream of it, counted against the
/// connection's limit until the response body ends or is dropped.
pub struct MeshSender {
    sender: SendRequest<Body>,
    state: Arc<ConnState>,
    /// Taken by `send_request`, which hands it to the response body.
    counted: bool,
}

impl MeshSender {
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends on the connection. The stream stays counted until the response body
    /// ends or is dropped.
    pub async fn send_request(
        &mut self,
        request: Request<Body>,
    ) -> Result<Response<Body>, hyper::Error> {
        let response = self.sender.send_request(request).await?;
        let slot = StreamSlot(self.counted.then(|| self.state.clone()));
        self.counted = false;
        let (parts, inner) = response.into_parts();
        let body = CountedBody { inner, _slot: slot };
        Ok(Response::from_parts(parts, Body::new(body)))
    }
}

impl ConnState {
    /// Takes one of the connection's streams if it has one left.
    fn take_stream(&self) -> bool {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MESH_MAX_STREAMS as usize).then_some(n + 1)
            })
            .is_ok()
    }
}

impl Drop for MeshSender {
    fn drop(&mut self) {
        if self.counted {
            self.state.streams.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Frees a counted stream when dropped.
struct StreamSlot(Option<Arc<ConnState>>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(state) = &self.0 {
            state.streams.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A response body that holds its stream's place on the connection.
struct CountedBody {
    inner: Incoming,
    _slot: StreamSlot,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

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

    /// A stream to `addr`, which must prove `identity`; `service` is for telemetry.
    /// A new connection leaves the pool after `idle` without a request.
    pub async fn sender(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        tls: &Arc<MeshTls>,
        connect_timeout: Duration,
        service: &str,
        idle: Option<Duration>,
    ) -> Result<MeshSender, Arc<PoolError>> {
        if let Some(sender) = self.pooled(addr, identity, tls) {
            return Ok(sender);
        }
        // Requests that find no connection with room wait for one connect to the
        // endpoint instead of each making their own, and share its outcome; those
        // that find its streams taken by the others wait for the next one.
        let key = (addr, identity.clone());
        for _ in 0..CONNECT_ROUNDS {
            let connecting = self.connecting.entry(key.clone()).or_default().clone();
            let result = connecting
                .get_or_init(|| {
                    self.connect_and_pool(addr, identity, tls, connect_timeout, service, idle)
                })
                .await
                .clone();
            self.connecting
                .remove_if(&key, |_, cell| Arc::ptr_eq(cell, &connecting));
            let conn = result?;
            if conn.state.take_stream() {
                return Ok(MeshSender {
                    sender: conn.sender,
                    state: conn.state,
                    counted: true,
                });
            }
            if let Some(sender) = self.pooled(addr, identity, tls) {
                return Ok(sender);
            }
        }
        // Hundreds of requests arrived at once: the last ones queue on the newest
        // connection (hyper holds them until a stream frees).
        let conn = self
            .connect_and_pool(addr, identity, tls, connect_timeout, service, idle)
            .await?;
        conn.state.streams.fetch_add(1, Ordering::AcqRel);
        Ok(MeshSender {
            sender: conn.sender,
            state: conn.state,
            counted: true,
        })
    }

    /// A stream on a pooled connection with room for one more.
    fn pooled(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        tls: &Arc<MeshTls>,
    ) -> Option<MeshSender> {
        let at_addr = self.conns.get(&addr)?;
        let pooled = at_addr.iter().find(|p| {
            &p.identity == identity
                && Arc::ptr_eq(&p.tls, tls)
                && p.sender.is_ready()
                && p.state.take_stream()
        })?;
        pooled
            .state
            .last_used_us
            .store(self.now_us(), Ordering::Relaxed);
        Some(MeshSender {
            sender: pooled.sender.clone(),
            state: pooled.state.clone(),
            counted: true,
        })
    }

    async fn connect_and_pool(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        tls: &Arc<MeshTls>,
        connect_timeout: Duration,
        service: &str,
        idle: Option<Duration>,
    ) -> Result<NewConn, Arc<PoolError>> {
        let sender = connect(addr, identity, tls, connect_timeout)
            .await
            .map_err(Arc::new)?;
        self.metrics
            .outbound_connections
            .get_or_create(&crate::metrics::ServiceLabels {
                service: service.to_owned(),
                peer_identity: identity.to_string(),
            })
            .inc();
        let state = Arc::new(ConnState {
            streams: AtomicUsize::new(0),
            last_used_us: AtomicU64::new(self.now_us()),
        });
        if let Some(idle) = idle {
            tokio::spawn(remove_when_idle(
                Arc::downgrade(&self.conns),
                addr,
                state.clone(),
                self.epoch,
                idle,
            ));
        }
        let pooled = Pooled {
            identity: identity.clone(),
            tls: tls.clone(),
            sender: sender.clone(),
            state: state.clone(),
        };
        let mut at_addr = self.conns.entry(addr).or_default();
        // This identity's closed connections, and those made with an older
        // certificate, make way (hyper closes those after their last stream).
        at_addr.retain(|p| {
            &p.identity != identity || (!p.sender.is_closed() && Arc::ptr_eq(&p.tls, tls))
        });
        at_addr.push(pooled);
        Ok(NewConn { sender, state })
    }

    /// Forgets the connection `failed` was on after a request on it failed, if that
    /// connection is closed, so the next request makes a new one. Other connections
    /// to the address (a fresh one made since, another identity's) stay.
    pub fn evict(&self, addr: SocketAddr, failed: &MeshSender) {
        if !failed.is_closed() {
            return;
        }
        if let Some(mut at_addr) = self.conns.get_mut(&addr) {
            at_addr.retain(|p| !Arc::ptr_eq(&p.state, &failed.state));
        }
        self.conns.remove_if(&addr, |_, at_addr| at_addr.is_empty());
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
    state: Arc<ConnState>,
    epoch: tokio::time::Instant,
    idle: Duration,
) {
    loop {
        let last = epoch + Duration::from_micros(state.last_used_us.load(Ordering::Relaxed));
        tokio::time::sleep_until(last + idle).await;
        let Some(conns) = conns.upgrade() else {
            return;
        };
        let last = epoch + Duration::from_micros(state.last_used_us.load(Ordering::Relaxed));
        if last + idle > tokio::time::Instant::now() {
            continue;
        }
        let mut removed = false;
        if let Some(mut at_addr) = conns.get_mut(&addr) {
            let before = at_addr.len();
            at_addr.retain(|pooled| !Arc::ptr_eq(&pooled.state, &state));
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
        .initial_stream_window_size(MESH_STREAM_WINDOW)
        .initial_connection_window_size(MESH_CONNECTION_WINDOW)
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
