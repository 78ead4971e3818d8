//! Requests to endpoints without a sidecar (or whose PeerAuthentication is DISABLE):
//! sent straight to the app, in plaintext, in the protocol the caller spoke.
//!
//! The outbound side has already turned the request into its mesh form: HTTP/1.1 as
//! the caller sent it, or HTTP/2 with an absolute URI (and `trellis-orig-proto` for
//! HTTP/1.0 callers); this undoes the HTTP/2 form, as the peer sidecar would have.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Body, ORIG_PROTO};

/// Plaintext clients, pooled per endpoint address by hyper-util.
pub struct PlainClients {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
}

/// Why a plaintext request failed.
#[derive(Debug, thiserror::Error)]
pub enum PlainError {
    #[error("the request has no valid URI for {0}")]
    BadUri(SocketAddr),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: hyper_util::client::legacy::Error,
    },
    #[error("request to {addr}: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper_util::client::legacy::Error,
    },
}

impl PlainClients {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        PlainClients {
            http1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }

    /// Sends a request in mesh form to the app at `addr`.
    pub async fn send(
        &self,
        request: Request<Body>,
        addr: SocketAddr,
    ) -> Result<Response<Incoming>, PlainError> {
        let (mut parts, body) = request.into_parts();
        let http1 = parts.headers.remove(ORIG_PROTO);
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let dial = Authority::try_from(addr.to_string()).map_err(|_| PlainError::BadUri(addr))?;
        // The caller's authority for Host, not the pod address we dial.
        let host = parts
            .uri
            .authority()
            .cloned()
            .unwrap_or_else(|| dial.clone());
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(dial)
            .path_and_query(path)
            .build()
            .map_err(|_| PlainError::BadUri(addr))?;
        let client = match http1 {
            Some(proto) => {
                super::restore_http1(&mut parts, &proto, &host);
                &self.http1
            }
            // An HTTP/1.1 caller's request keeps its version and `Host` on the way out.
            None if parts.version < http::Version::HTTP_2 => &self.http1,
            None => &self.http2,
        };
        client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|source| {
                if source.is_connect() {
                    PlainError::Connect { addr, source }
                } else {
                    PlainError::Request { addr, source }
                }
            })
    }
}
