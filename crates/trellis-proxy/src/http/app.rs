//! Connections from the inbound side to the local app. The app's address is fixed per
//! port, so each port gets a plain pool: idle HTTP/1.1 keep-alive connections on a
//! stack and one multiplexed HTTP/2 connection, with no per-request key hashing.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{Body, BoxError};

/// Idle HTTP/1.1 connections kept per app port; more are closed when they finish.
const MAX_IDLE_HTTP1: usize = 64;
/// An idle connection unused this long is closed when the pool is next touched (the
/// 90 s hyper-util's client used).
const IDLE_HTTP1_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("connecting to the app at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP handshake with the app at {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to the app failed: {0}")]
    Request(hyper::Error),
}

impl AppError {
    /// Nothing reached the app: the port is closed or it does not speak HTTP.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AppError::Connect { .. } | AppError::Handshake { .. })
    }
}

/// The app pools of one proxy, one per app address.
pub struct AppClients {
    connect_timeout: Duration,
    /// A handful of ports at most: a scan beats hashing.
    pools: Mutex<Vec<Arc<AppPool>>>,
}

impl AppClients {
    pub fn new(connect_timeout: Duration) -> Self {
        AppClients {
            connect_timeout,
            pools: Mutex::new(Vec::new()),
        }
    }

    /// The pool for `addr`; looked up once per mesh connection, not per request.
    pub fn pool(&self, addr: SocketAddr) -> Arc<AppPool> {
        let mut pools = lock(&self.pools);
        if let Some(pool) = pools.iter().find(|p| p.addr == addr) {
            return pool.clone();
        }
        let pool = Arc::new(AppPool::new(addr, self.connect_timeout));
        pools.push(pool.clone());
        pool
    }
}

/// Connections to one app address.
pub struct AppPool {
    addr: SocketAddr,
    /// `addr` as a URI authority, made once.
    authority: Authority,
    connect_timeout: Duration,
    /// Oldest first: connections are taken from and returned to the end.
    idle_http1: Mutex<Vec<(http1::SendRequest<Body>, std::time::Instant)>>,
    idle_timeout: Duration,
    http2: Mutex<Option<http2::SendRequest<Body>>>,
}

impl AppPool {
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        // A socket address always renders as a valid authority.
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("localhost"));
        AppPool {
            addr,
            authority,
            connect_timeout,
            idle_http1: Mutex::new(Vec::new()),
            idle_timeout: IDLE_HTTP1_TIMEOUT,
            http2: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Sends an HTTP/1 request (origin-form URI, `Host` set) on an idle connection or
    /// a new one. The connection goes back to the pool when the response body ends.
    pub async fn send_http1(
        self: &Arc<Self>,
        request: Request<Body>,
    ) -> Result<Response<Body>, AppError> {
        let mut request = request;
        // An idle connection may turn out closed by the app; the request is then
        // handed back unsent and goes on a new connection.
        loop {
            let (mut sender, fresh) = match self.idle_http1() {
                Some(sender) => (sender, false),
                None => (self.connect_http1().await?, true),
            };
            if let Err(source) = sender.ready().await {
                if fresh {
                    return Err(AppError::Handshake {
                        addr: self.addr,
                        source,
                    });
                }
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = PooledBody {
                        inner: body,
                        ended: false,
                        lease: Some(Lease {
                            sender,
                            pool: self.clone(),
                        }),
                    };
                    return Ok(Response::from_parts(parts, Body::new(body)));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    _ => return Err(AppError::Request(e.into_error())),
                },
            }
        }
    }

    /// Sends an HTTP/2 request on the port's shared connection, made on first use and
    /// replaced when it closes.
    pub async fn send_http2(&self, request: Request<Body>) -> Result<Response<Body>, AppError> {
        let current = lock(&self.http2)
            .as_ref()
            .filter(|s| !s.is_closed())
            .cloned();
        let mut sender = match current {
            Some(sender) => sender,
            None => {
                let sender = self.connect_http2().await?;
                *lock(&self.http2) = Some(sender.clone());
                sender
            }
        };
        sender.ready().await.map_err(AppError::Request)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(AppError::Request)?;
        Ok(response.map(|b| Body::new(http_body_util::BodyExt::map_err(b, Into::into))))
    }

    /// Sends an HTTP/1 upgrade request (or CONNECT) on a connection of its own, never
    /// pooled: if the app agrees, that connection becomes the upgraded stream
    /// (`hyper::upgrade::on` on the response).
    pub async fn send_upgrade(
        &self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, AppError> {
        let addr = self.addr;
        let io = self.connect_tcp().await?;
        let (mut sender, connection) = http1::handshake(io)
            .await
            .map_err(|source| AppError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "app upgrade connection ended");
            }
        });
        sender
            .send_request(request)
            .await
            .map_err(AppError::Request)
    }

    /// An idle connection that can take a request now. One that is not ready (still
    /// sending an earlier request's body, or closing) is let go rather than waited
    /// for: a stalled upload must not hold up the next request.
    fn idle_http1(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = lock(&self.idle_http1);
        while let Some((sender, since)) = idle.pop() {
            // The newest is idle too long: so are all the others.
            if since.elapsed() > self.idle_timeout {
                idle.clear();
                return None;
            }
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn release_http1(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = std::time::Instant::now();
        let mut idle = lock(&self.idle_http1);
        // The oldest sit at the front: drop those unused too long (rarely any).
        let expired = idle
            .iter()
            .take_while(|(_, since)| now.duration_since(*since) > self.idle_timeout)
            .count();
        if expired > 0 {
            idle.drain(..expired);
        }
        if idle.len() < MAX_IDLE_HTTP1 {
            idle.push((sender, now));
        }
    }

    async fn connect_tcp(&self) -> Result<TokioIo<TcpStream>, AppError> {
        let addr = self.addr;
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| AppError::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| AppError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    async fn connect_http1(&self) -> Result<http1::SendRequest<Body>, AppError> {
        let addr = self.addr;
        let io = self.connect_tcp().await?;
        let (sender, connection) = http1::handshake(io)
            .await
            .map_err(|source| AppError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "app HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn connect_http2(&self) -> Result<http2::SendRequest<Body>, AppError> {
        let addr = self.addr;
        let io = self.connect_tcp().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|source| AppError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "app HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; a poisoned one is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An HTTP/1 connection lent to one response.
struct Lease {
    sender: http1::SendRequest<Body>,
    pool: Arc<AppPool>,
}

/// The app's response body; its connection is reused only if the body was read to the
/// end (a body dropped halfway leaves the connection unusable).
struct PooledBody {
    inner: Incoming,
    ended: bool,
    lease: Option<Lease>,
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
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

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take()
            && (self.ended || self.inner.is_end_stream())
        {
            lease.pool.release_http1(lease.sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::errors::full;

    /// An HTTP/1.1 app on loopback answering `size` bytes (`?close` asks it to close
    /// the connection after the response); counts the connections it accepted.
    async fn app(size: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let mut response = Response::new(full(Bytes::from(vec![b'x'; size])));
                    if req.uri().query() == Some("close") {
                        response.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    let host = req.headers().get(http::header::HOST).cloned();
                    if let Some(host) = host {
                        response.headers_mut().insert("seen-host", host);
                    }
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        (addr, accepted)
    }

    fn get(path: &str) -> Request<Body> {
        Request::builder()
            .uri(path)
            .header(http::header::HOST, "web.default")
            .body(full(Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (addr, accepted) = app(16).await;
        let mut pool = AppPool::new(addr, Duration::from_secs(1));
        pool.idle_timeout = Duration::from_millis(50);
        let pool = Arc::new(pool);
        let send = |pool: Arc<AppPool>| async move {
            let response = pool.send_http1(get("/")).await.unwrap();
            response.into_body().collect().await.unwrap();
        };
        // (Reuse while fresh is `http1_connections_are_reused_after_the_body_ends`.)
        send(pool.clone()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        send(pool.clone()).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "a new one after the timeout"
        );
        assert_eq!(lock(&pool.idle_http1).len(), 1);
    }

    #[tokio::test]
    async fn http1_connections_are_reused_after_the_body_ends() {
        let (addr, accepted) = app(1024).await;
        let pool = AppClients::new(Duration::from_secs(1)).pool(addr);
        for _ in 0..3 {
            let response = pool.send_http1(get("/")).await.unwrap();
            assert_eq!(response.headers()["seen-host"], "web.default");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 1024);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closes_is_replaced() {
        let (addr, accepted) = app(16).await;
        let pool = AppClients::new(Duration::from_secs(1)).pool(addr);
        for _ in 0..2 {
            let response = pool.send_http1(get("/?close")).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_halfway_does_not_return_its_connection() {
        let (addr, accepted) = app(1024 * 1024).await;
        let pool = AppClients::new(Duration::from_secs(1)).pool(addr);
        let mut body = pool.send_http1(get("/")).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        let response = pool.send_http1(get("/")).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1024 * 1024);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let pool = AppClients::new(Duration::from_secs(1)).pool(addr);
        let e = pool.send_http1(get("/")).await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        let e = pool.send_http2(get("/")).await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
    }
}
