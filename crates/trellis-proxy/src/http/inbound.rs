//! Inbound HTTP: requests arriving over the mesh's HTTP/2 connection, from a peer
//! whose identity the handshake proved, handed to the app — as HTTP/1.1 when that is
//! what the caller spoke, else as HTTP/2 (gRPC).

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_identity::SpiffeId;

use super::errors::{ProxyError, is_grpc};
use super::{Body, ORIG_PROTO, XFCC};
use crate::authz::{Decision, HttpInfo, RequestInfo};

/// HTTP/2 flow-control windows on the mesh hop.
pub const MESH_STREAM_WINDOW: u32 = 1024 * 1024;
pub const MESH_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// Pooled connections to the local app, one client per protocol.
pub struct AppClients {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
}

impl AppClients {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        AppClients {
            http1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }
}

impl Default for AppClients {
    fn default() -> Self {
        Self::new()
    }
}

/// What the inbound side knows of one accepted mesh connection.
pub struct InboundConnection {
    pub apps: Arc<AppClients>,
    pub app: std::net::SocketAddr,
    pub port: u16,
    pub own_identity: Arc<SpiffeId>,
    pub peer: Arc<SpiffeId>,
    pub state: tokio::sync::watch::Receiver<Arc<crate::discovery::MeshState>>,
    pub metrics: crate::metrics::Metrics,
}

impl InboundConnection {
    pub async fn serve<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // The caller's identity for the app, built once per connection.
        let xfcc =
            HeaderValue::from_str(&format!("By={};URI={}", self.own_identity, self.peer)).ok();
        let this = Arc::new((self, xfcc));
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.0.handle(req, this.1.as_ref()).await) }
        });
        let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            // Fixed, generous windows: adaptive sizing pings for every BDP sample,
            // which showed in the profile.
            .initial_stream_window_size(MESH_STREAM_WINDOW)
            .initial_connection_window_size(MESH_CONNECTION_WINDOW)
            .serve_connection(TokioIo::new(io), svc)
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "mesh HTTP/2 connection ended");
        }
    }

    async fn handle(&self, req: Request<Incoming>, xfcc: Option<&HeaderValue>) -> Response<Body> {
        let grpc = is_grpc(&req);
        // Policy is read per request, so a change applies to the next one.
        let authorizer = self.state.borrow().inbound_policy.authorizer.clone();
        if !authorizer.is_empty() {
            let decision = authorizer.decide(&RequestInfo {
                peer: Some(&self.peer),
                port: self.port,
                http: Some(HttpInfo {
                    method: req.method(),
                    path: req.uri().path(),
                    headers: req.headers(),
                }),
            });
            crate::inbound::record(&self.metrics, &decision, Some(&self.peer), self.port);
            if let Decision::Deny { policy } = decision {
                return ProxyError::Forbidden.response(grpc, Some(&policy));
            }
        }
        let (mut parts, body) = req.into_parts();
        let http1 = parts.headers.remove(ORIG_PROTO);
        // Tell the app who called, as Istio does; the value comes from the handshake
        // and replaces anything the caller sent.
        match xfcc {
            Some(value) => {
                parts.headers.insert(XFCC, value.clone());
            }
            None => {
                parts.headers.remove(XFCC);
            }
        }
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let authority = parts.uri.authority().map(|a| a.to_string());
        let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(self.app.to_string().as_str())
            .path_and_query(path)
            .build()
        else {
            return ProxyError::BadRequest.response(grpc, None);
        };
        parts.uri = uri;
        let client = match http1 {
            Some(proto) => {
                parts.version = if proto.as_bytes() == b"HTTP/1.0" {
                    Version::HTTP_10
                } else {
                    Version::HTTP_11
                };
                if let Some(host) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                    parts.headers.insert(header::HOST, host);
                }
                &self.apps.http1
            }
            None => {
                parts.version = Version::HTTP_2;
                &self.apps.http2
            }
        };
        let request = Request::from_parts(parts, body.map_err(Into::into).boxed());
        match client.request(request).await {
            Ok(response) => response.map(|b| b.map_err(Into::into).boxed()),
            Err(e) => {
                tracing::debug!(app = %self.app, error = %e, "app request failed");
                if e.is_connect() {
                    ProxyError::AppUnreachable.response(grpc, None)
                } else {
                    ProxyError::UpstreamReset.response(grpc, None)
                }
            }
        }
    }
}
