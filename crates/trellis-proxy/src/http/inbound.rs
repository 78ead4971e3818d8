//! Inbound HTTP: requests for the app, handed to it as HTTP/1.1 when that is what the
//! caller spoke, else as HTTP/2 (gRPC). They arrive over the mesh's HTTP/2 connection
//! from a peer whose identity the handshake proved, or as HTTP/1 (with upgrades) or
//! HTTP/2 prior knowledge from a plaintext caller or over an mTLS stream.
//!
//! Every request takes the same steps before the app sees it: the caller's identity
//! headers are replaced by what the handshake proved, the path is normalized (or the
//! request refused with 400), and policy judges the normalized path, which is the
//! one forwarded.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use opentelemetry::KeyValue;
use trellis_identity::SpiffeId;

pub use super::app::AppClients;
use super::app::{AppError, AppPool};
use super::errors::ProxyError;
use super::normalize::PathNormalization;
use super::{Body, ORIG_PROTO, XFCC};
use crate::access_log::AccessRecord;
use crate::authz::{Decision, HttpInfo, RequestInfo};
use crate::request_metrics::{Exchange, LabelledPeers, measure_request, request_protocol};

/// Streams one mesh HTTP/2 connection carries at once; the client side opens another
/// connection at this limit rather than queueing behind it.
pub const MESH_MAX_STREAMS: u32 = 64;
/// HTTP/2 flow-control windows on the mesh hop. The connection's window covers every
/// stream's full window (and one more), so streams whose readers are slow can never
/// use up the connection's window and stall the others.
pub const MESH_STREAM_WINDOW: u32 = 512 * 1024;
pub const MESH_CONNECTION_WINDOW: u32 = (MESH_MAX_STREAMS + 1) * MESH_STREAM_WINDOW;

/// What the inbound side knows of one accepted connection.
pub struct InboundConnection {
    /// The connections to the app port this connection was redirected to.
    pub app: Arc<AppPool>,
    pub port: u16,
    pub own_identity: Arc<SpiffeId>,
    /// `None` for a plaintext caller (PERMISSIVE or DISABLE ports).
    pub peer: Option<Arc<SpiffeId>>,
    pub state: tokio::sync::watch::Receiver<Arc<crate::discovery::MeshState>>,
    pub metrics: crate::metrics::Metrics,
    /// The request metrics' labels for this connection (`reporter="destination"`).
    pub peers: Arc<LabelledPeers>,
    pub path_normalization: PathNormalization,
    /// On shutdown the connection is closed gracefully (HTTP/2 GOAWAY, HTTP/1 close
    /// after the request in flight), so callers move to other endpoints instead of
    /// sending into a connection cut at the end of the drain.
    pub drain: crate::drain::Drain,
    /// SERVER spans, when on.
    pub tracing: crate::trace::Tracing,
    /// The caller's address, as this connection came from it.
    pub source: std::net::SocketAddr,
}

/// How the request reached this proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Downstream {
    /// HTTP/2: from a peer sidecar (HTTP/1 callers marked with `trellis-orig-proto`)
    /// or a plaintext caller speaking HTTP/2 prior knowledge.
    Http2,
    /// HTTP/1 on the connection itself, upgrades included.
    Http1,
}

impl InboundConnection {
    /// Serves an HTTP/2 connection.
    pub async fn serve<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let drain = self.drain.clone();
        let this = Arc::new(Handler::new(self));
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req, Downstream::Http2).await) }
        });
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Fixed, generous windows: adaptive sizing pings for every BDP sample,
            // which showed in the profile.
            .initial_stream_window_size(MESH_STREAM_WINDOW)
            .initial_connection_window_size(MESH_CONNECTION_WINDOW)
            .max_concurrent_streams(MESH_MAX_STREAMS)
            .serve_connection(TokioIo::new(io), svc);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = drain.signaled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "inbound HTTP/2 connection ended");
        }
    }

    /// Serves an HTTP/1 connection; an upgrade the app accepts becomes a byte stream
    /// between caller and app, after the request was handled like any other.
    pub async fn serve_http1<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let drain = self.drain.clone();
        let handler = Arc::new(Handler::new(self));
        let this = handler.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req, Downstream::Http1).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = drain.signaled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "inbound HTTP/1 connection ended");
        }
        // The connection lives on as an upgraded stream: the caller's drain and
        // connection accounting cover it until it ends.
        let tunnel = handler
            .tunnel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(tunnel) = tunnel {
            let _ = tunnel.await;
        }
    }
}

struct Handler {
    conn: InboundConnection,
    /// The caller's identity for the app, built once per connection; `None` for a
    /// plaintext caller, whose requests reach the app without one.
    xfcc: Option<HeaderValue>,
    /// The byte stream an HTTP/1 connection became after an upgrade (one at most).
    tunnel: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Handler {
    fn new(conn: InboundConnection) -> Self {
        let xfcc = conn.peer.as_ref().and_then(|peer| {
            HeaderValue::from_str(&format!("By={};URI={peer}", conn.own_identity)).ok()
        });
        Handler {
            conn,
            xfcc,
            tunnel: std::sync::Mutex::new(None),
        }
    }

    /// Handles one request and records it (metrics, and the access log when on).
    async fn handle(&self, req: Request<Incoming>, downstream: Downstream) -> Response<Body> {
        let started = std::time::Instant::now();
        let protocol = request_protocol(&req);
        let peers = &self.conn.peers;
        let mut log = peers.access_log().is_on().then(|| {
            let mut record = AccessRecord::new(peers.peers_arc(), protocol.as_str());
            record.method = req.method().to_string();
            record.authority = authority_of(&req);
            record.upstream = Some(self.conn.app.addr());
            Box::new(record)
        });
        let (mut parts, body) = req.into_parts();
        let span = if self.conn.tracing.is_on() {
            self.server_span(&mut parts)
        } else {
            None
        };
        let (body, request_size) = measure_request(body);
        let response = self
            .forward(
                parts,
                body,
                downstream,
                protocol == crate::request_metrics::RequestProtocol::Grpc,
                &mut log,
            )
            .await;
        Exchange {
            peers: peers.clone(),
            protocol,
            started,
            request_size,
            log,
            span,
            in_flight: None,
        }
        .respond(response)
    }

    /// Starts the request's SERVER span and hands its context to the app.
    fn server_span(&self, parts: &mut http::request::Parts) -> Option<Box<crate::trace::HopSpan>> {
        let conn = &self.conn;
        let mut span = conn.tracing.start_span(
            opentelemetry::trace::SpanKind::Server,
            &parts.method,
            &mut parts.headers,
        )?;
        if !span.is_recording() {
            return Some(span);
        }
        let peers = conn.peers.peers();
        let path = conn.path_normalization.normalize(parts.uri.path());
        let path = path.map_or_else(|_| parts.uri.path().to_owned(), Cow::into_owned);
        let mut attributes = vec![
            KeyValue::new("http.request.method", parts.method.to_string()),
            KeyValue::new("url.path", path),
            KeyValue::new("trellis.source.principal", peers.source.principal.clone()),
            KeyValue::new(
                "trellis.destination.principal",
                peers.destination.principal.clone(),
            ),
            KeyValue::new(
                "trellis.destination.service",
                peers.destination_service.clone(),
            ),
        ];
        attributes.extend(crate::trace::peer_attributes(conn.source));
        let authority = match parts.uri.authority() {
            Some(authority) => Some(authority.as_str()),
            None => parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok()),
        };
        if let Some(authority) = authority {
            crate::trace::server_attributes(authority, &mut attributes);
        }
        span.set_all(attributes);
        Some(span)
    }

    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        downstream: Downstream,
        grpc: bool,
        log: &mut Option<Box<AccessRecord>>,
    ) -> Response<Body> {
        let conn = &self.conn;
        let upgrade = downstream == Downstream::Http1 && wants_upgrade(&parts);
        if downstream == Downstream::Http1 {
            // What a caller says about the protocol or the route is not ours to trust.
            parts.headers.remove(ORIG_PROTO);
            if upgrade {
                parts.headers.remove("keep-alive");
                parts.headers.remove("proxy-connection");
            } else {
                super::outbound::remove_hop_by_hop(&mut parts.headers);
            }
        }
        // Who called is the handshake's word alone: every copy the caller sent goes,
        // under any spelling of the name (header names are case-insensitive).
        match &self.xfcc {
            Some(value) => {
                parts.headers.insert(XFCC, value.clone());
            }
            None => {
                parts.headers.remove(XFCC);
            }
        }

        let normalized = match normalized_path(conn.path_normalization, &parts) {
            Ok(path) => path,
            Err(e) => {
                tracing::debug!(path = parts.uri.path(), error = %e, "refused a request path");
                conn.metrics
                    .http_proxy_errors
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: "invalid_path".to_owned(),
                    })
                    .inc();
                return ProxyError::BadRequest.response(grpc, Some(&e.to_string()));
            }
        };
        if let Some(log) = log {
            log.path = normalized.to_string();
        }
        // Policy is read per request, so a change applies to the next one.
        let authorizer = conn.state.borrow().inbound_policy.authorizer.clone();
        if !authorizer.is_empty() {
            let decision = authorizer.decide(&RequestInfo {
                peer: conn.peer.as_deref(),
                port: conn.port,
                http: Some(HttpInfo {
                    method: &parts.method,
                    path: &normalized,
                    headers: &parts.headers,
                }),
            });
            crate::inbound::record(&conn.metrics, &decision, conn.peer.as_deref(), conn.port);
            if let Decision::Deny { policy } = decision {
                return ProxyError::Forbidden.response(grpc, Some(&policy));
            }
        }
        // The app gets the path policy judged (the query as it came).
        if let Cow::Owned(path) = normalized {
            match with_path(std::mem::take(&mut parts.uri), &path) {
                Ok(uri) => parts.uri = uri,
                Err(_) => return ProxyError::BadRequest.response(grpc, None),
            }
        }

        let sent = match downstream {
            Downstream::Http1 => {
                let on_upgrade = parts.extensions.remove::<OnUpgrade>();
                to_origin_form(&mut parts, conn.app.authority());
                match (upgrade, on_upgrade) {
                    (true, Some(on_upgrade)) => {
                        return self
                            .upgrade(Request::from_parts(parts, body), on_upgrade, grpc)
                            .await;
                    }
                    _ => conn.app.send_http1(Request::from_parts(parts, body)).await,
                }
            }
            Downstream::Http2 => match parts.headers.remove(ORIG_PROTO) {
                Some(proto) => {
                    // HTTP/1 to the app: origin-form target, and the caller's authority
                    // (or else the app's address) as Host.
                    let uri = std::mem::take(&mut parts.uri).into_parts();
                    let host = uri.authority.as_ref().unwrap_or(conn.app.authority());
                    super::restore_http1(&mut parts, &proto, host);
                    parts.uri = Uri::from(
                        uri.path_and_query
                            .unwrap_or_else(|| PathAndQuery::from_static("/")),
                    );
                    conn.app.send_http1(Request::from_parts(parts, body)).await
                }
                None => {
                    // The connection is already the app's: the URI only makes the
                    // `:authority` the app sees, which stays the caller's (gRPC servers
                    // and virtual hosts route on it); the app's address when none.
                    let uri = std::mem::take(&mut parts.uri).into_parts();
                    let mut target = http::uri::Parts::default();
                    target.scheme = Some(Scheme::HTTP);
                    target.authority = Some(
                        uri.authority
                            .unwrap_or_else(|| conn.app.authority().clone()),
                    );
                    target.path_and_query = uri.path_and_query;
                    let Ok(uri) = Uri::from_parts(target) else {
                        return ProxyError::BadRequest.response(grpc, None);
                    };
                    parts.uri = uri;
                    parts.version = Version::HTTP_2;
                    conn.app.send_http2(Request::from_parts(parts, body)).await
                }
            },
        };
        match sent {
            Ok(mut response) => {
                // The app cannot speak for the proxy (a forged marker would make
                // clients send the request to another endpoint).
                response.headers_mut().remove(super::errors::TRELLIS_ERROR);
                response
            }
            Err(e) => self.app_failed(&e, grpc),
        }
    }

    /// An upgrade (WebSocket, h2c, a custom protocol) or CONNECT, already handled
    /// like any request: sent to the app on a connection of its own; if the app
    /// agrees, both sides' upgraded streams are joined.
    async fn upgrade(
        &self,
        request: Request<Body>,
        downstream: OnUpgrade,
        grpc: bool,
    ) -> Response<Body> {
        let connect = request.method() == Method::CONNECT;
        let mut response = match self.conn.app.send_upgrade(request).await {
            Ok(response) => response,
            Err(e) => return self.app_failed(&e, grpc),
        };
        let agreed = if connect {
            response.status().is_success()
        } else {
            response.status() == StatusCode::SWITCHING_PROTOCOLS
        };
        if agreed {
            let app = hyper::upgrade::on(&mut response);
            let addr = self.conn.app.addr();
            let tunnel = tokio::spawn(async move {
                match tokio::join!(downstream, app) {
                    (Ok(downstream), Ok(app)) => {
                        let copied = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(downstream),
                            &mut TokioIo::new(app),
                        )
                        .await;
                        tracing::debug!(app = %addr, ?copied, "upgraded stream ended");
                    }
                    (downstream, app) => tracing::debug!(
                        app = %addr,
                        downstream = ?downstream.err(),
                        upstream = ?app.err(),
                        "upgrade failed"
                    ),
                }
            });
            *self
                .tunnel
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tunnel);
        }
        response.map(|b| b.map_err(Into::into).boxed())
    }

    fn app_failed(&self, e: &AppError, grpc: bool) -> Response<Body> {
        tracing::debug!(app = %self.conn.app.addr(), error = %e, "app request failed");
        if e.is_unreachable() {
            ProxyError::AppUnreachable.response(grpc, None)
        } else {
            ProxyError::UpstreamReset.response(grpc, None)
        }
    }
}

/// The path policy judges and the app gets. HTTP/2's `:path` and HTTP/1's target
/// must be absolute (`/...`); `*` only for OPTIONS; CONNECT has none. An
/// absolute-form HTTP/1 target (`http://host/path`) is judged on its path.
fn normalized_path(
    level: PathNormalization,
    parts: &http::request::Parts,
) -> Result<Cow<'_, str>, super::normalize::PathError> {
    let path = parts.uri.path();
    if parts.method == Method::CONNECT && parts.uri.path_and_query().is_none() {
        return Ok(Cow::Borrowed(""));
    }
    if parts.method == Method::OPTIONS && path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    level.normalize(path)
}

/// `uri` with its path replaced and its query kept as it came.
fn with_path(uri: Uri, path: &str) -> Result<Uri, http::Error> {
    let mut parts = uri.into_parts();
    let query = parts.path_and_query.as_ref().and_then(PathAndQuery::query);
    let path_and_query = match query {
        Some(query) => PathAndQuery::try_from(format!("{path}?{query}"))?,
        None => PathAndQuery::try_from(path)?,
    };
    parts.path_and_query = Some(path_and_query);
    Ok(Uri::from_parts(parts)?)
}

/// The request's authority for the access log: the URI's, else `Host`.
pub(crate) fn authority_of<B>(req: &Request<B>) -> String {
    match req.uri().authority() {
        Some(authority) => authority.to_string(),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    }
}

/// An HTTP/1 request as the app gets it: origin-form target, and `Host` from an
/// absolute-form target (which overrides it) or else kept; the app's address when
/// there is none.
fn to_origin_form(parts: &mut http::request::Parts, app: &http::uri::Authority) {
    if parts.uri.authority().is_none() && parts.headers.contains_key(header::HOST) {
        return;
    }
    let uri = std::mem::take(&mut parts.uri).into_parts();
    let host = uri.authority.as_ref().unwrap_or(app);
    if let Ok(host) = HeaderValue::from_str(host.as_str()) {
        parts.headers.insert(header::HOST, host);
    }
    parts.uri = match (&parts.method, uri.path_and_query) {
        (&Method::CONNECT, _) => uri
            .authority
            .map(Uri::from)
            .unwrap_or_else(|| Uri::from_static("/")),
        (_, Some(path)) => Uri::from(path),
        (_, None) => Uri::from_static("/"),
    };
}

/// An HTTP/1 request asking to switch protocols: CONNECT, or `Upgrade` named in
/// `Connection`.
fn wants_upgrade(parts: &http::request::Parts) -> bool {
    if parts.method == Method::CONNECT {
        return true;
    }
    parts.headers.contains_key(header::UPGRADE)
        && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_query_survives_a_rewritten_path() {
        let uri: Uri = "http://web.default//admin/./x?a=%2F&b=/../c"
            .parse()
            .unwrap();
        let rewritten = with_path(uri, "/admin/x").unwrap();
        assert_eq!(rewritten, "http://web.default/admin/x?a=%2F&b=/../c");
        let rewritten = with_path(Uri::from_static("/a//b"), "/a/b").unwrap();
        assert_eq!(rewritten, "/a/b");
    }

    #[test]
    fn absolute_form_targets_are_judged_on_their_path_and_sent_in_origin_form() {
        let level = PathNormalization::MergeSlashes;
        let mut p = parts(
            Method::GET,
            "http://evil.example//admin/x?q=1",
            &[("host", "web")],
        );
        assert_eq!(normalized_path(level, &p).unwrap(), "/admin/x");
        to_origin_form(&mut p, &http::uri::Authority::from_static("127.0.0.1:8080"));
        assert_eq!(p.uri, "//admin/x?q=1");
        // The absolute form's authority overrides Host (RFC 9112, 3.2.2).
        assert_eq!(p.headers[header::HOST], "evil.example");

        let mut p = parts(Method::GET, "/x", &[]);
        to_origin_form(&mut p, &http::uri::Authority::from_static("127.0.0.1:8080"));
        assert_eq!(p.headers[header::HOST], "127.0.0.1:8080");
    }

    #[test]
    fn only_options_may_ask_for_star_and_paths_must_be_absolute() {
        let level = PathNormalization::MergeSlashes;
        assert_eq!(
            normalized_path(level, &parts(Method::OPTIONS, "*", &[])).unwrap(),
            "*"
        );
        assert!(normalized_path(level, &parts(Method::GET, "*", &[])).is_err());
        let connect = parts(Method::CONNECT, "web.default:443", &[]);
        assert_eq!(normalized_path(level, &connect).unwrap(), "");
        assert!(wants_upgrade(&connect));
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let both = parts(
            Method::GET,
            "/",
            &[
                ("upgrade", "websocket"),
                ("connection", "keep-alive, Upgrade"),
            ],
        );
        assert!(wants_upgrade(&both));
        let alone = parts(Method::GET, "/", &[("upgrade", "websocket")]);
        assert!(!wants_upgrade(&alone));
    }
}
