//! HTTP/1.1 between sidecars, for HTTP/1.1 callers (HTTP/2 and gRPC callers share the
//! multiplexed connection in `pool`). Kept-alive mTLS connections per peer endpoint and
//! the identity it must prove, at most `max_per_endpoint` of them, with a wait queue
//! and a timeout when all are busy. A request borrows a connection and drives it from
//! its own task (the downstream connection's): no task spawn and no hand-off between
//! tasks per request. The connection goes back to the pool when the response body ends.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;
use trellis_identity::{ALPN_HTTP1, MeshTls, SpiffeId};

use super::pool::PoolError;
use super::{Body, BoxError};

/// Connections per endpoint (busy and idle) unless a traffic policy sets fewer.
pub const DEFAULT_MAX_PER_ENDPOINT: usize = 128;
/// An idle connection unused this long is closed when the pool is next touched. Below
/// the peer's 30 s wait for the next request head (hyper's header read timeout), so the
/// peer never closes a connection just as it is reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

type MeshIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum MeshHttp1Error {
    #[error(transparent)]
    Connect(#[from] PoolError),
    #[error("all {max} connections to {addr} stayed busy for {waited:?}")]
    Busy {
        addr: SocketAddr,
        max: usize,
        waited: Duration,
    },
    /// The request may have reached the peer.
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the connection to {addr} closed before the response")]
    Closed { addr: SocketAddr },
}

impl MeshHttp1Error {
    /// Nothing was sent: safe to try elsewhere.
    pub fn is_connect_error(&self) -> bool {
        matches!(
            self,
            MeshHttp1Error::Connect(_) | MeshHttp1Error::Busy { .. }
        )
    }

    /// The request went out (or may have) and the connection ended before a response
    /// head: the peer shut it as the request arrived (its pod stopping, or the
    /// keep-alive race), with or without TLS close_notify. An idempotent request may
    /// be sent again (RFC 9110 9.2.2).
    pub fn is_unanswered(&self) -> bool {
        match self {
            MeshHttp1Error::Request { source, .. } => {
                source.is_incomplete_message() || connection_broke(source)
            }
            MeshHttp1Error::Closed { .. } => true,
            _ => false,
        }
    }
}

/// An I/O error that means the peer went away: end of stream without close_notify,
/// a reset or a broken pipe.
fn connection_broke(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = e.source();
    }
    false
}

/// Where a request goes and what the peer must prove.
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub identity: &'a SpiffeId,
    pub tls: &'a Arc<MeshTls>,
    pub connect_timeout: Duration,
    /// At most this many connections to the endpoint.
    pub max: usize,
    /// The traffic policy's idle timeout: an idle connection is closed after it (or
    /// after `IDLE_TIMEOUT`, if sooner).
    pub idle: Option<Duration>,
    /// For telemetry.
    pub service: &'a str,
}

/// One kept-alive connection: the request side and the driver that moves its bytes.
struct Conn {
    sender: http1::SendRequest<Body>,
    driver: http1::Connection<MeshIo, Body>,
    /// The TLS configuration it was made with: a rotated certificate makes new ones.
    tls: Arc<MeshTls>,
    /// The driver finished: the connection is gone.
    closed: bool,
}

impl Conn {
    /// Lets the driver take in what arrived while nobody polled it (the peer closing,
    /// most likely) and says whether the connection can take a request now.
    fn usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closed && Pin::new(&mut self.driver).poll(cx).is_ready() {
            self.closed = true;
        }
        !self.closed && self.sender.is_ready()
    }
}

struct IdleConn {
    conn: Box<Conn>,
    since: Instant,
}

/// The connections to one endpoint that must prove one identity.
struct EndpointConns {
    identity: SpiffeId,
    /// One per connection in use; a connection is made only when none is idle, so at
    /// most `permits` connections exist. Waiters queue here in order.
    permits: Arc<Semaphore>,
    max: usize,
    /// Newest last (so oldest first): taken from and returned to the end.
    idle: Mutex<Vec<IdleConn>>,
    idle_timeout_ms: AtomicU64,
    /// An idle sweeper task is running for this endpoint.
    sweeping: AtomicBool,
}

impl EndpointConns {
    fn idle(&self) -> MutexGuard<'_, Vec<IdleConn>> {
        // Nothing panics while this lock is held; a poisoned one is still consistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }

    /// The newest idle connection that is usable with `tls`; stale ones are closed.
    fn take_idle(&self, cx: &mut Context<'_>, tls: &Arc<MeshTls>) -> Option<Box<Conn>> {
        let idle_timeout = self.idle_timeout();
        let mut idle = self.idle();
        while let Some(IdleConn { mut conn, since }) = idle.pop() {
            // The newest is idle too long: so are all the others.
            if since.elapsed() > idle_timeout {
                idle.clear();
                return None;
            }
            if Arc::ptr_eq(&conn.tls, tls) && conn.usable(cx) {
                return Some(conn);
            }
        }
        None
    }
}

/// Closes the endpoint's idle connections as they pass their idle timeout; ends when
/// none is left (the next one returned starts another).
async fn sweep_idle(home: Weak<EndpointConns>) {
    loop {
        let next = {
            let Some(home) = home.upgrade() else {
                return;
            };
            let mut idle = home.idle();
            let timeout = home.idle_timeout();
            let now = Instant::now();
            idle.retain(|conn| now.duration_since(conn.since) < timeout);
            match idle.first() {
                Some(oldest) => oldest.since + timeout,
                None => {
                    // Under the lock: a connection returned after this starts a sweeper.
                    home.sweeping.store(false, Ordering::Release);
                    return;
                }
            }
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
    }
}

pub struct MeshHttp1Pool {
    /// Per dial address, one entry per expected identity (almost always one): looked
    /// up by address, identities compared, nothing allocated.
    endpoints: DashMap<SocketAddr, Vec<Arc<EndpointConns>>>,
    metrics: crate::metrics::Metrics,
}

impl MeshHttp1Pool {
    pub fn new(metrics: crate::metrics::Metrics) -> Self {
        MeshHttp1Pool {
            endpoints: DashMap::new(),
            metrics,
        }
    }

    /// A connection to the target's sidecar for one request: an idle one or a new
    /// one, waiting up to the connect timeout when all the endpoint's connections are
    /// busy. Nothing is sent yet, so a failure here is safe to try elsewhere.
    pub async fn checkout(&self, target: &Target<'_>) -> Result<Checkout, MeshHttp1Error> {
        let home = self.endpoint(target);
        let permit = match home.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let waited = target.connect_timeout;
                match tokio::time::timeout(waited, home.permits.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed; a timeout is the only way here.
                    _ => {
                        return Err(MeshHttp1Error::Busy {
                            addr: target.addr,
                            max: home.max,
                            waited,
                        });
                    }
                }
            }
        };
        let idle = poll_fn(|cx| Poll::Ready(home.take_idle(cx, target.tls))).await;
        let (conn, reused) = match idle {
            Some(conn) => (conn, true),
            None => (self.connect(target).await?, false),
        };
        Ok(Checkout {
            lease: Lease { conn, permit, home },
            reused,
        })
    }

    /// Sends `request` (origin-form target, `Host` set) on the checked-out connection.
    /// The response body holds the connection until it ends.
    pub async fn send(
        &self,
        checkout: Checkout,
        target: &Target<'_>,
        request: Request<Body>,
    ) -> Result<Response<Body>, MeshHttp1Error> {
        let addr = target.addr;
        match checkout.lease.send(request, addr).await {
            Ok(response) => Ok(response),
            // The peer closed an idle connection just before: the request comes back
            // unsent and goes on a new connection.
            Err(Unsent::Returned(returned)) if checkout.reused => {
                let (request, Lease { permit, home, .. }) = *returned;
                let conn = self.connect(target).await?;
                let lease = Lease { conn, permit, home };
                match lease.send(request, addr).await {
                    Ok(response) => Ok(response),
                    Err(Unsent::Returned(..)) => Err(MeshHttp1Error::Closed { addr }),
                    Err(Unsent::Failed(e)) => Err(e),
                }
            }
            Err(Unsent::Returned(..)) => Err(MeshHttp1Error::Closed { addr }),
            Err(Unsent::Failed(e)) => Err(e),
        }
    }

    /// A new connection, counted for telemetry.
    async fn connect(&self, target: &Target<'_>) -> Result<Box<Conn>, MeshHttp1Error> {
        let conn = connect(target).await?;
        self.metrics
            .outbound_connections
            .get_or_create(&crate::metrics::ServiceLabels {
                service: target.service.to_owned(),
                peer_identity: target.identity.to_string(),
            })
            .inc();
        Ok(conn)
    }

    fn endpoint(&self, target: &Target<'_>) -> Arc<EndpointConns> {
        let idle_timeout_ms = target
            .idle
            .map_or(IDLE_TIMEOUT, |idle| idle.min(IDLE_TIMEOUT))
            .as_millis() as u64;
        if let Some(at_addr) = self.endpoints.get(&target.addr)
            && let Some(home) = at_addr.iter().find(|e| e.identity == *target.identity)
        {
            // The policy may have changed since.
            if home.idle_timeout_ms.load(Ordering::Relaxed) != idle_timeout_ms {
                home.idle_timeout_ms
                    .store(idle_timeout_ms, Ordering::Relaxed);
            }
            return home.clone();
        }
        let mut at_addr = self.endpoints.entry(target.addr).or_default();
        if let Some(home) = at_addr.iter().find(|e| e.identity == *target.identity) {
            return home.clone();
        }
        let max = target.max.max(1);
        let home = Arc::new(EndpointConns {
            identity: target.identity.clone(),
            permits: Arc::new(Semaphore::new(max)),
            max,
            idle: Mutex::new(Vec::new()),
            idle_timeout_ms: AtomicU64::new(idle_timeout_ms),
            sweeping: AtomicBool::new(false),
        });
        at_addr.push(home.clone());
        home
    }

    /// Idle connections held (for tests and the admin page).
    pub fn idle_count(&self) -> usize {
        self.endpoints
            .iter()
            .flat_map(|at_addr| at_addr.iter().map(|e| e.idle().len()).collect::<Vec<_>>())
            .sum()
    }
}

/// A connection held for one request (see `MeshHttp1Pool::checkout`).
pub struct Checkout {
    lease: Lease,
    /// It was idle in the pool, so the peer may have closed it meanwhile.
    reused: bool,
}

/// How a send on a borrowed connection ended without a response.
enum Unsent {
    /// The connection was closed before the request went out: here it is back
    /// (boxed: a rare path, and it keeps the common result small).
    Returned(Box<(Request<Body>, Lease)>),
    Failed(MeshHttp1Error),
}

/// A connection lent to one request and its response.
struct Lease {
    /// Boxed once per connection: a lease moves into the response body, and the
    /// connection (TLS state included) is about 2 KiB.
    conn: Box<Conn>,
    /// Dropped after the connection is back in the pool, so a waiter woken by it
    /// finds the connection idle.
    permit: OwnedSemaphorePermit,
    home: Arc<EndpointConns>,
}

impl Lease {
    /// Writes the request and drives the connection until the response head is in.
    async fn send(
        mut self,
        request: Request<Body>,
        addr: SocketAddr,
    ) -> Result<Response<Body>, Unsent> {
        let result = {
            let Conn {
                sender,
                driver,
                closed,
                ..
            } = &mut *self.conn;
            let mut send = pin!(sender.try_send_request(request));
            poll_fn(|cx| {
                if let Poll::Ready(result) = send.as_mut().poll(cx) {
                    return Poll::Ready(Some(result));
                }
                if !*closed && Pin::new(&mut *driver).poll(cx).is_ready() {
                    *closed = true;
                    // A failing driver hands its error to the request first.
                    return Poll::Ready(match send.as_mut().poll(cx) {
                        Poll::Ready(result) => Some(result),
                        Poll::Pending => None,
                    });
                }
                Poll::Pending
            })
            .await
        };
        match result {
            Some(Ok(response)) => {
                let (parts, inner) = response.into_parts();
                let body = LeasedBody {
                    inner,
                    ended: false,
                    lease: Some(self),
                };
                Ok(Response::from_parts(parts, Body::new(body)))
            }
            Some(Err(mut e)) => match e.take_message() {
                Some(unsent) => Err(Unsent::Returned(Box::new((unsent, self)))),
                None => Err(Unsent::Failed(MeshHttp1Error::Request {
                    addr,
                    source: e.into_error(),
                })),
            },
            None => Err(Unsent::Failed(MeshHttp1Error::Closed { addr })),
        }
    }

    /// Back to the pool if the connection can take another request; else closed.
    fn release(self) {
        let Lease {
            mut conn,
            permit,
            home,
        } = self;
        // Nobody waits on an idle connection: the next borrower polls it first.
        let mut cx = Context::from_waker(Waker::noop());
        if conn.usable(&mut cx) {
            home.idle().push(IdleConn {
                conn,
                since: Instant::now(),
            });
            if !home.sweeping.swap(true, Ordering::AcqRel)
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                runtime.spawn(sweep_idle(Arc::downgrade(&home)));
            }
        }
        drop(permit);
    }
}

/// The peer's response body; it drives the connection while it is read, and gives the
/// connection back when it ends (a body dropped halfway closes it).
struct LeasedBody {
    inner: Incoming,
    ended: bool,
    lease: Option<Lease>,
}

impl HttpBody for LeasedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(lease) = &mut this.lease
            && !lease.conn.closed
            && Pin::new(&mut lease.conn.driver).poll(cx).is_ready()
        {
            lease.conn.closed = true;
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                if let Some(lease) = this.lease.take() {
                    lease.release();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.lease = None;
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LeasedBody {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take()
            && (self.ended || self.inner.is_end_stream())
        {
            lease.release();
        }
    }
}

async fn connect(target: &Target<'_>) -> Result<Box<Conn>, PoolError> {
    let addr = target.addr;
    let tcp = tokio::time::timeout(target.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| PoolError::Connect {
            addr,
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| PoolError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let config = target
        .tls
        .client_config_with_alpn(target.identity, ALPN_HTTP1)?;
    let stream = tokio::time::timeout(
        target.connect_timeout,
        TlsConnector::from(config).connect(ServerName::IpAddress(addr.ip().into()), tcp),
    )
    .await
    .map_err(|_| PoolError::Handshake {
        addr,
        source: std::io::ErrorKind::TimedOut.into(),
    })?
    .map_err(|source| PoolError::Handshake { addr, source })?;
    if stream.get_ref().1.alpn_protocol() != Some(ALPN_HTTP1) {
        return Err(PoolError::Handshake {
            addr,
            source: std::io::Error::other("the peer did not agree to HTTP/1.1"),
        });
    }
    let (sender, driver) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| PoolError::Http1 { addr, source })?;
    Ok(Box::new(Conn {
        sender,
        driver,
        tls: target.tls.clone(),
        closed: false,
    }))
}
