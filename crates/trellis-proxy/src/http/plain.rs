//! Requests to endpoints without a sidecar (or whose PeerAuthentication is DISABLE):
//! sent straight to the app, in plaintext, in the protocol the caller spoke.
//!
//! The outbound side has already turned the request into its mesh form: HTTP/1.1 as
//! the caller sent it, or HTTP/2 with an absolute URI (and `trellis-orig-proto` for
//! HTTP/1.0 callers); this undoes the HTTP/2 form, as the peer sidecar would have.
//!
//! Connections are pooled per endpoint address with the inbound side's app pools, so
//! the pool key is the address dialled and the request keeps the caller's authority
//! (`Host`, `:authority`): a client keyed by the URI would need the pod address there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::uri::{Parts as UriParts, PathAndQuery, Scheme};
use http::{Request, Response, Uri};

use super::app::{AppError, AppPool};
use super::{Body, ORIG_PROTO};

/// Address pools kept before unused ones are dropped: endpoints without a sidecar
/// come and go with the registry, and a pool nobody holds costs only its idle
/// connections.
const MAX_POOLS: usize = 1024;

/// Plaintext connection pools, one per endpoint address.
pub struct PlainClients {
    connect_timeout: Duration,
    pools: Mutex<HashMap<SocketAddr, Arc<AppPool>>>,
}

/// Why a plaintext request failed.
#[derive(Debug, thiserror::Error)]
pub enum PlainError {
    #[error("the request has no valid URI for {0}")]
    BadUri(SocketAddr),
    #[error(transparent)]
    App(#[from] AppError),
}

impl PlainError {
    /// Nothing reached the endpoint, so another one may take the request.
    pub fn is_connect_error(&self) -> bool {
        match self {
            PlainError::BadUri(_) => true,
            PlainError::App(e) => e.is_unreachable(),
        }
    }
}

impl PlainClients {
    pub fn new(connect_timeout: Duration) -> Self {
        PlainClients {
            connect_timeout,
            pools: Mutex::new(HashMap::new()),
        }
    }

    fn pool(&self, addr: SocketAddr) -> Arc<AppPool> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = pools.get(&addr) {
            return pool.clone();
        }
        if pools.len() >= MAX_POOLS {
            // Only pools no request holds right now; their idle connections close.
            pools.retain(|_, pool| Arc::strong_count(pool) > 1);
        }
        let pool = Arc::new(AppPool::new(addr, self.connect_timeout));
        pools.insert(addr, pool.clone());
        pool
    }

    /// Sends a request in mesh form to the app at `addr`.
    pub async fn send(
        &self,
        request: Request<Body>,
        addr: SocketAddr,
    ) -> Result<Response<Body>, PlainError> {
        let pool = self.pool(addr);
        let (mut parts, body) = request.into_parts();
        let orig_proto = parts.headers.remove(ORIG_PROTO);
        let uri = std::mem::take(&mut parts.uri).into_parts();
        let path = uri
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // The caller's authority, not the pod address we dial.
        let absolute_form = uri.authority.is_some();
        let authority = uri.authority.unwrap_or_else(|| pool.authority().clone());
        match orig_proto {
            Some(proto) => super::restore_http1(&mut parts, &proto, &authority),
            // An HTTP/1.1 caller's request keeps its version and `Host` on the way out
            // (an absolute-form target's authority overrides `Host`, RFC 9112 3.2.2).
            None if parts.version < http::Version::HTTP_2 => {
                if (absolute_form || !parts.headers.contains_key(http::header::HOST))
                    && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
                {
                    parts.headers.insert(http::header::HOST, host);
                }
            }
            None => {
                let mut target = UriParts::default();
                target.scheme = Some(Scheme::HTTP);
                target.authority = Some(authority);
                target.path_and_query = Some(path);
                parts.uri = Uri::from_parts(target).map_err(|_| PlainError::BadUri(addr))?;
                return Ok(pool.send_http2(Request::from_parts(parts, body)).await?);
            }
        }
        parts.uri = Uri::from(path);
        Ok(pool.send_http1(Request::from_parts(parts, body)).await?)
    }
}
