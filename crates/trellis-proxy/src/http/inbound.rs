//! Inbound HTTP: requests arriving over the mesh's HTTP/2 connection, from a peer
//! whose identity the handshake proved, handed to the app — as HTTP/1.1 when that is
//! what the caller spoke, else as HTTP/2 (gRPC).

use std::convert::Infallible;
use std::sync::Arc;

use http::header::HeaderValue;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_identity::SpiffeId;

pub use super::app::AppClients;
use super::app::AppPool;
use super::errors::{ProxyError, is_grpc};
use super::{Body, ORIG_PROTO, XFCC};
use crate::authz::{Decision, HttpInfo, RequestInfo};

/// HTTP/2 flow-control windows on the mesh hop.
pub const MESH_STREAM_WINDOW: u32 = 1024 * 1024;
pub const MESH_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// What the inbound side knows of one accepted mesh connection.
pub struct InboundConnection {
    /// The connections to the app port this mesh connection was redirected to.
    pub app: Arc<AppPool>,
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
        let uri = std::mem::take(&mut parts.uri).into_parts();
        let path = uri
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let body = body.map_err(Into::into).boxed();
        let sent = match http1 {
            Some(proto) => {
                // HTTP/1 to the app: origin-form target, and the caller's authority
                // (or else the app's address) as Host.
                let host = uri.authority.as_ref().unwrap_or(self.app.authority());
                super::restore_http1(&mut parts, &proto, host);
                parts.uri = Uri::from(path);
                self.app.send_http1(Request::from_parts(parts, body)).await
            }
            None => {
                let mut target = http::uri::Parts::default();
                target.scheme = Some(Scheme::HTTP);
                target.authority = Some(self.app.authority().clone());
                target.path_and_query = Some(path);
                let Ok(uri) = Uri::from_parts(target) else {
                    return ProxyError::BadRequest.response(grpc, None);
                };
                parts.uri = uri;
                parts.version = Version::HTTP_2;
                self.app.send_http2(Request::from_parts(parts, body)).await
            }
        };
        match sent {
            Ok(response) => response,
            Err(e) => {
                tracing::debug!(app = %self.app.addr(), error = %e, "app request failed");
                if e.is_unreachable() {
                    ProxyError::AppUnreachable.response(grpc, None)
                } else {
                    ProxyError::UpstreamReset.response(grpc, None)
                }
            }
        }
    }
}
