//! Outbound HTTP: each request is routed, balanced, retried within budget and timed
//! out on its own, then carried over mTLS to the chosen endpoint's sidecar: an
//! HTTP/1.1 caller's request as HTTP/1.1 on a pooled kept-alive connection
//! (`mesh_h1`), anything else as HTTP/2 on the endpoint's multiplexed connection
//! (`pool`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use opentelemetry::KeyValue;
use tokio::sync::watch;
use trellis_identity::MeshTls;

use super::errors::{ProxyError, empty, full};
use super::idle::IdleTracker;
use super::mesh_h1::{MeshHttp1Error, MeshHttp1Pool};
use super::policy::{LbAlgorithm, RetryPolicy, TrafficPolicy};
use super::pool::{MeshPool, PoolError};
use super::{Body, ORIG_PROTO, XFCC};
use crate::access_log::AccessRecord;
use crate::detect::{DownstreamIo, PrefixedIo};
use crate::discovery::MeshState;
use crate::discovery::state::ServicePort;
use crate::request_metrics::{
    Exchange, LabelledPeers, Peers, Reporter, RequestSize, Workload, measure_request,
    request_protocol,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

/// Bodies up to this size are kept so that the request can be retried.
const REPLAY_LIMIT: u64 = 64 * 1024;
/// Attempts on connect failure when no retry policy says otherwise: nothing was sent.
const CONNECT_ATTEMPTS: u32 = 3;

/// Everything a request needs, shared by the connections of one proxy.
pub struct HttpOutbound {
    pub tls: watch::Receiver<Option<Arc<MeshTls>>>,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub pool: MeshPool,
    /// HTTP/1.1 callers' requests, kept HTTP/1.1 on the mesh hop.
    pub http1_pool: MeshHttp1Pool,
    /// For endpoints without a sidecar.
    pub plain: super::plain::PlainClients,
    pub connect_timeout: Duration,
    pub metrics: crate::metrics::Metrics,
    /// This proxy's workload, the source in request metrics.
    pub own_workload: Arc<Workload>,
    /// CLIENT spans, when on.
    pub tracing: crate::trace::Tracing,
}

impl HttpOutbound {
    /// Serves one downstream connection whose destination is `service`, in the
    /// protocol detection found (anything not HTTP/2 meets the HTTP/1 server, which
    /// answers garbage with 400).
    pub async fn serve(
        self: Arc<Self>,
        io: PrefixedIo<DownstreamIo>,
        service: Arc<ServicePort>,
        http2: bool,
    ) {
        let idle = self.state.borrow().policy(&service.service).idle_timeout;
        let tracker = idle.map(|_| IdleTracker::new());
        let requests = tracker.clone();
        let this = self.clone();
        let labels = Arc::new(PeersCache::default());
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let service = service.clone();
            let labels = labels.clone();
            let in_flight = requests.as_ref().map(|t| t.start());
            async move {
                let response = this.handle(req, &service, &labels).await;
                Ok::<_, Infallible>(match in_flight {
                    Some(in_flight) => in_flight.attach(response),
                    None => response,
                })
            }
        });
        let io = TokioIo::new(io);
        let ended = if http2 {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, svc);
            until_idle(conn, idle, tracker.as_deref(), |c| c.graceful_shutdown()).await
        } else {
            let mut builder = hyper::server::conn::http1::Builder::new();
            if let Some(idle) = idle {
                // hyper's header timer runs while an HTTP/1 connection waits for a
                // request head, which also bounds a head that stalls half-sent.
                builder.timer(TokioTimer::new()).header_read_timeout(idle);
            }
            let conn = builder.serve_connection(io, svc);
            until_idle(conn, idle, tracker.as_deref(), |c| c.graceful_shutdown()).await
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "downstream HTTP connection ended");
        }
    }

    /// Handles one request and records it (metrics, and the access log when on).
    async fn handle(
        &self,
        mut req: Request<Incoming>,
        service: &Arc<ServicePort>,
        labels: &PeersCache,
    ) -> Response<Body> {
        let started = Instant::now();
        let protocol = request_protocol(&req);
        let mut span = if self.tracing.is_on() {
            self.client_span(&mut req)
        } else {
            None
        };
        let head = self.metrics.requests.access_log.is_on().then(|| {
            let mut record = AccessRecord::new(Arc::new(placeholder_peers()), protocol.as_str());
            record.method = req.method().to_string();
            record.authority = super::inbound::authority_of(&req);
            record.path = req.uri().path().to_owned();
            Box::new(record)
        });
        let mut outcome = Outcome::default();
        let mut request_size = RequestSize::Known(0);
        let grpc = protocol == crate::request_metrics::RequestProtocol::Grpc;
        let response = self
            .route_and_send(req, service, grpc, &mut outcome, &mut request_size)
            .await;
        let peers = labels.get(self, service, &outcome);
        if let Some(span) = span.as_mut()
            && span.is_recording()
        {
            routed_attributes(span, peers.peers(), &outcome);
        }
        let log = head.map(|mut record| {
            record.peers = peers.peers_arc();
            record.upstream = outcome.endpoint.as_ref().map(|(dial, _)| *dial);
            record
        });
        Exchange {
            peers,
            protocol,
            started,
            request_size,
            log,
            span,
            in_flight: outcome.in_flight.take(),
        }
        .respond(response)
    }

    /// Starts the request's CLIENT span and hands its context on in the headers.
    fn client_span(&self, req: &mut Request<Incoming>) -> Option<Box<crate::trace::HopSpan>> {
        let method = req.method().clone();
        let mut span = self.tracing.start_span(
            opentelemetry::trace::SpanKind::Client,
            &method,
            req.headers_mut(),
        )?;
        if !span.is_recording() {
            return Some(span);
        }
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method().to_string()),
            KeyValue::new("url.path", normalized_path(req.uri().path())),
            KeyValue::new(
                "trellis.source.principal",
                self.own_workload.principal.clone(),
            ),
        ];
        crate::trace::server_attributes(&super::inbound::authority_of(req), &mut attributes);
        span.set_all(attributes);
        Some(span)
    }

    async fn route_and_send(
        &self,
        req: Request<Incoming>,
        service: &ServicePort,
        grpc: bool,
        outcome: &mut Outcome,
        request_size: &mut RequestSize,
    ) -> Response<Body> {
        let state = self.state.borrow().clone();
        let routes = state.routes.get(&service.service);
        let rule = routes.and_then(|t| t.find(service.port, &req));
        let backend = match rule.and_then(|r| r.pick_backend()) {
            Some(b) => match state.service(&b.service, b.port) {
                Some(s) => s.clone(),
                None => return ProxyError::NoBackend.response(grpc, Some(&b.service)),
            },
            None => match state.service(&service.service, service.port) {
                Some(s) => s.clone(),
                None => return ProxyError::NoBackend.response(grpc, None),
            },
        };
        outcome.backend = Some(backend.clone());
        outcome.route = rule.map(|r| r.name.clone());
        let policy = state.policy(&backend.service);
        let Some(tls) = self.tls.borrow().clone() else {
            return ProxyError::ConnectFailed.response(grpc, Some("no workload certificate"));
        };

        let (mut parts, body) = req.into_parts();
        if let Some(rule) = rule
            && !rule.request_headers.is_empty()
        {
            rule.request_headers.apply(&mut parts.headers);
        }
        let prepared = if parts.version == Version::HTTP_11 {
            prepare_http1(&mut parts, &backend.service)
        } else {
            prepare(&mut parts, &backend.service)
        };
        if let Err(e) = prepared {
            return e.response(grpc, None);
        }

        let deadline = request_deadline(&parts, rule.and_then(|r| r.request_timeout), &policy);
        let per_try = rule
            .and_then(|r| r.backend_request_timeout)
            .or_else(|| policy.retries.as_ref().and_then(|r| r.per_try_timeout));
        let retry = policy
            .retries
            .as_ref()
            .filter(|r| r.retry_non_idempotent || is_idempotent(&parts.method));
        let replay = if body.is_end_stream() {
            Replay::Buffered(Bytes::new())
        } else if retry.is_some() {
            buffer_if_small(body, request_size).await
        } else {
            stream(body, request_size)
        };
        if let Replay::Buffered(bytes) = &replay {
            *request_size = RequestSize::Known(bytes.len() as u64);
        }
        let hash = hash_key(&policy.load_balancer, &parts);
        let attempt = Attempt {
            outbound: self,
            tls: &tls,
            backend: &backend,
            policy: &policy,
            retry,
            per_try,
            hash,
        };
        let result = match deadline {
            Some(d) => match tokio::time::timeout(d, attempt.run(parts, replay, outcome)).await {
                Ok(r) => r,
                Err(_) => Err(ProxyError::Timeout),
            },
            None => attempt.run(parts, replay, outcome).await,
        };
        match result {
            Ok(mut response) => {
                if let Some(rule) = rule
                    && !rule.response_headers.is_empty()
                {
                    rule.response_headers.apply(response.headers_mut());
                }
                response
            }
            Err(e) => {
                self.metrics
                    .http_proxy_errors
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: e.reason().to_owned(),
                    })
                    .inc();
                e.response(grpc, None)
            }
        }
    }
}

/// What routing chose for a request, for its metrics' labels.
#[derive(Default)]
struct Outcome {
    backend: Option<Arc<ServicePort>>,
    route: Option<Arc<str>>,
    /// The last try's endpoint: where it dialed, and who it is.
    endpoint: Option<(std::net::SocketAddr, Arc<Workload>)>,
    /// The last try's count on its endpoint, until the response ends.
    in_flight: Option<crate::balance::ActiveGuard>,
}

/// A connection's last label set, kept while its backend, route and endpoint stay
/// the same (usually the whole connection): a request then builds no labels. The
/// lock is per connection, held for a few pointer compares.
#[derive(Default)]
pub struct PeersCache {
    last: std::sync::Mutex<Option<CachedPeers>>,
}

struct CachedPeers {
    backend: Arc<ServicePort>,
    route: Option<Arc<str>>,
    workload: Option<Arc<Workload>>,
    peers: Arc<LabelledPeers>,
}

impl PeersCache {
    fn get(
        &self,
        outbound: &HttpOutbound,
        parent: &Arc<ServicePort>,
        outcome: &Outcome,
    ) -> Arc<LabelledPeers> {
        let backend = outcome.backend.as_ref().unwrap_or(parent);
        let workload = outcome.endpoint.as_ref().map(|(_, w)| w);
        let same = |c: &CachedPeers| {
            Arc::ptr_eq(&c.backend, backend)
                && match (&c.route, &outcome.route) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
                && match (&c.workload, workload) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
        };
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cached) = last.as_ref()
            && same(cached)
        {
            return cached.peers.clone();
        }
        let peers = LabelledPeers::new(
            outbound.metrics.requests.clone(),
            Peers {
                reporter: Reporter::Source,
                source: outbound.own_workload.clone(),
                destination: workload.cloned().unwrap_or_default(),
                destination_service: backend.service.clone(),
                destination_port: backend.port,
                route_name: outcome
                    .route
                    .as_deref()
                    .unwrap_or(crate::request_metrics::NO_FLAGS)
                    .to_owned(),
            },
        );
        *last = Some(CachedPeers {
            backend: backend.clone(),
            route: outcome.route.clone(),
            workload: workload.cloned(),
            peers: peers.clone(),
        });
        peers
    }
}

/// What routing decided, on the CLIENT span.
fn routed_attributes(span: &mut crate::trace::HopSpan, peers: &Peers, outcome: &Outcome) {
    span.set(KeyValue::new(
        "trellis.destination.principal",
        peers.destination.principal.clone(),
    ));
    span.set(KeyValue::new(
        "trellis.destination.service",
        peers.destination_service.clone(),
    ));
    if let Some(route) = &outcome.route {
        span.set(KeyValue::new("trellis.route.name", route.to_string()));
    }
    if let Some((dial, _)) = &outcome.endpoint {
        for attribute in crate::trace::peer_attributes(*dial) {
            span.set(attribute);
        }
    }
}

/// The path as the peer's policy will judge it (the default normalization); the
/// path as sent when it would be refused.
fn normalized_path(path: &str) -> String {
    super::normalize::PathNormalization::default()
        .normalize(path)
        .map_or_else(|_| path.to_owned(), std::borrow::Cow::into_owned)
}

/// Peers for an access-log record whose labels are filled in once routing is done.
fn placeholder_peers() -> Peers {
    Peers {
        reporter: Reporter::Source,
        source: Arc::default(),
        destination: Arc::default(),
        destination_service: String::new(),
        destination_port: 0,
        route_name: String::new(),
    }
}

/// Hop-by-hop headers go; the URI becomes absolute for HTTP/2; an HTTP/1 request is
/// marked so that the peer sidecar hands it to the app as HTTP/1 again. Any
/// `x-forwarded-client-cert` goes too: the caller's identity is established by the
/// peer sidecar, never by the app.
fn prepare(parts: &mut http::request::Parts, service: &str) -> Result<(), ProxyError> {
    remove_hop_by_hop(&mut parts.headers);
    let version = parts.version;
    if version < Version::HTTP_2 {
        let proto = if version == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        let uri = std::mem::take(&mut parts.uri).into_parts();
        let authority = match parts.headers.remove(header::HOST) {
            Some(host) => {
                Authority::try_from(host.as_bytes()).map_err(|_| ProxyError::BadRequest)?
            }
            None => match uri.authority {
                Some(authority) => authority,
                None => Authority::try_from(service).map_err(|_| ProxyError::BadRequest)?,
            },
        };
        let mut target = http::uri::Parts::default();
        target.scheme = Some(Scheme::HTTP);
        target.authority = Some(authority);
        target.path_and_query = Some(
            uri.path_and_query
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        parts.uri = Uri::from_parts(target).map_err(|_| ProxyError::BadRequest)?;
        parts
            .headers
            .insert(ORIG_PROTO, HeaderValue::from_static(proto));
    }
    parts.version = Version::HTTP_2;
    Ok(())
}

/// An HTTP/1.1 request as it rides the mesh hop (and reaches the app): hop-by-hop
/// headers and any `x-forwarded-client-cert` go, the target is in origin form, and
/// `Host` is the caller's authority (an absolute-form target's overrides `Host`, as
/// RFC 9112 says; the service name when there is neither).
fn prepare_http1(parts: &mut http::request::Parts, service: &str) -> Result<(), ProxyError> {
    remove_hop_by_hop(&mut parts.headers);
    if parts.uri.authority().is_some() {
        let uri = std::mem::take(&mut parts.uri).into_parts();
        if let Some(authority) = &uri.authority {
            let host =
                HeaderValue::from_str(authority.as_str()).map_err(|_| ProxyError::BadRequest)?;
            parts.headers.insert(header::HOST, host);
        }
        parts.uri = Uri::from(
            uri.path_and_query
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
    } else if !parts.headers.contains_key(header::HOST) {
        let host = HeaderValue::from_str(service).map_err(|_| ProxyError::BadRequest)?;
        parts.headers.insert(header::HOST, host);
    }
    Ok(())
}

/// Removes the hop-by-hop headers (and `x-forwarded-client-cert`) in one pass over the
/// names: they are almost never there, and a `remove` per name hashes each one.
pub(super) fn remove_hop_by_hop(headers: &mut http::HeaderMap) {
    const CONNECTION: u8 = 1;
    const KEEP_ALIVE: u8 = 1 << 1;
    const PROXY_CONNECTION: u8 = 1 << 2;
    const TRANSFER_ENCODING: u8 = 1 << 3;
    const UPGRADE: u8 = 1 << 4;
    const TE: u8 = 1 << 5;
    const FORWARDED_CERT: u8 = 1 << 6;
    let mut found = 0u8;
    for name in headers.keys() {
        found |= if name == header::CONNECTION {
            CONNECTION
        } else if name == header::TRANSFER_ENCODING {
            TRANSFER_ENCODING
        } else if name == header::UPGRADE {
            UPGRADE
        } else if name == header::TE {
            TE
        } else {
            match name.as_str() {
                "keep-alive" => KEEP_ALIVE,
                "proxy-connection" => PROXY_CONNECTION,
                "x-forwarded-client-cert" => FORWARDED_CERT,
                _ => 0,
            }
        };
    }
    if found == 0 {
        return;
    }
    if found & CONNECTION != 0 {
        headers.remove(header::CONNECTION);
    }
    if found & KEEP_ALIVE != 0 {
        headers.remove("keep-alive");
    }
    if found & PROXY_CONNECTION != 0 {
        headers.remove("proxy-connection");
    }
    if found & TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if found & UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
    // HTTP/2 allows `te: trailers` and nothing else.
    if found & TE != 0
        && headers
            .get(header::TE)
            .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
    if found & FORWARDED_CERT != 0 {
        headers.remove(XFCC);
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The earliest of the route's, the policy's and the gRPC caller's deadlines.
fn request_deadline(
    parts: &http::request::Parts,
    route: Option<Duration>,
    policy: &TrafficPolicy,
) -> Option<Duration> {
    let grpc = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    [route.or(policy.request_timeout), grpc]
        .into_iter()
        .flatten()
        .min()
}

/// `grpc-timeout`: digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn hash_key(lb: &LbAlgorithm, parts: &http::request::Parts) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let LbAlgorithm::ConsistentHash { header, cookie } = lb else {
        return None;
    };
    let value: Option<&[u8]> = match (header, cookie) {
        (Some(h), _) => parts.headers.get(h).map(|v| v.as_bytes()),
        (None, Some(name)) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes()),
        (None, None) => None,
    };
    value.map(|v| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        v.hash(&mut h);
        h.finish()
    })
}

enum Replay {
    /// Kept whole: may be sent again.
    Buffered(Bytes),
    /// Streams once: no retry after it has been sent.
    Stream(Body),
}

/// Buffers a body that is known to be small (or empty); streams anything else.
async fn buffer_if_small(body: Incoming, request_size: &mut RequestSize) -> Replay {
    let small = body.is_end_stream()
        || body
            .size_hint()
            .upper()
            .is_some_and(|upper| upper <= REPLAY_LIMIT);
    if !small {
        return stream(body, request_size);
    }
    match body.collect().await {
        Ok(collected) => Replay::Buffered(collected.to_bytes()),
        // The client broke off; what we send now does not matter.
        Err(_) => Replay::Buffered(Bytes::new()),
    }
}

/// A body sent as it comes (once), its size measured on the way.
fn stream(body: Incoming, request_size: &mut RequestSize) -> Replay {
    let (body, size) = measure_request(body);
    *request_size = size;
    Replay::Stream(body)
}

struct Attempt<'a> {
    outbound: &'a HttpOutbound,
    tls: &'a Arc<MeshTls>,
    backend: &'a ServicePort,
    policy: &'a TrafficPolicy,
    retry: Option<&'a RetryPolicy>,
    per_try: Option<Duration>,
    hash: Option<u64>,
}

/// How one try ended, for the retry decision.
enum TryError {
    /// Nothing was sent: always safe to try elsewhere.
    Connect(ProxyError),
    /// An idempotent request got no answer at all (the peer's app broke off, or
    /// the peer closed the connection as its pod stopped): safe to send again
    /// (RFC 9110, 9.2.2), elsewhere.
    Unanswered,
    /// Sent, no response.
    Reset,
    Timeout,
}

impl Attempt<'_> {
    /// Tries until an answer or the end of retries; `chosen` ends up naming the
    /// endpoint of the last try (for request metrics) and holding its in-flight count.
    async fn run(
        &self,
        parts: http::request::Parts,
        body: Replay,
        chosen: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError> {
        let endpoints = &self.backend.endpoints;
        if endpoints.ready_count() == 0 {
            return Err(ProxyError::NoEndpoints);
        }
        if let Some(r) = self.retry {
            r.deposit();
        }
        let mut body = Some(body);
        let mut parts = Some(parts);
        // Filled only when a retry happens: the first try allocates nothing.
        let mut tried = Vec::new();
        let mut last_tried = None;
        let mut retries = 0u32;
        let mut connect_failures = 0u32;
        loop {
            if let Some(dial) = last_tried.take() {
                tried.push(dial);
            }
            let (send_body, replay) = match body.take() {
                Some(Replay::Buffered(bytes)) => {
                    let send = if bytes.is_empty() {
                        empty()
                    } else {
                        full(bytes.clone())
                    };
                    (send, Some(Replay::Buffered(bytes)))
                }
                Some(Replay::Stream(body)) => (body, None),
                None => return Err(ProxyError::UpstreamReset),
            };
            let replayable = replay.is_some();
            let outcome = self
                .try_once(
                    &mut parts,
                    send_body,
                    replayable,
                    &tried,
                    &mut last_tried,
                    chosen,
                )
                .await;
            if outcome.is_err() {
                // A failed try is no longer load on its endpoint (the next try may
                // wait out a backoff first).
                chosen.in_flight = None;
            }
            body = replay;
            let can_retry = body.is_some();
            match outcome {
                Ok(response) => {
                    let retryable = self.retry.is_some_and(|r| {
                        r.retries_status(response.status()) || retries_grpc(r, &response)
                    });
                    if retryable && can_retry && self.may_retry(&mut retries).await {
                        continue;
                    }
                    return Ok(response);
                }
                Err(failed @ (TryError::Connect(_) | TryError::Unanswered)) => {
                    let e = match failed {
                        TryError::Connect(e) => e,
                        _ => ProxyError::UpstreamReset,
                    };
                    connect_failures += 1;
                    // Nothing was sent (or reached an app, or an idempotent request got
                    // no answer): try another endpoint, within the budget when a policy
                    // asks for connect-failure retries.
                    let again = can_retry
                        && match self.retry {
                            Some(r) if r.on_connect_failure => self.may_retry(&mut retries).await,
                            _ => connect_failures < CONNECT_ATTEMPTS,
                        };
                    if again {
                        continue;
                    }
                    return Err(e);
                }
                Err(TryError::Reset) => {
                    if can_retry
                        && self.retry.is_some_and(|r| r.on_reset)
                        && self.may_retry(&mut retries).await
                    {
                        continue;
                    }
                    return Err(ProxyError::UpstreamReset);
                }
                Err(TryError::Timeout) => {
                    if can_retry && self.retry.is_some() && self.may_retry(&mut retries).await {
                        continue;
                    }
                    return Err(ProxyError::Timeout);
                }
            }
        }
    }

    /// A retry is allowed while attempts remain and the budget has room; waits the
    /// backoff before saying yes.
    async fn may_retry(&self, retries: &mut u32) -> bool {
        let Some(r) = self.retry else {
            return false;
        };
        if *retries >= r.attempts || !r.withdraw() {
            return false;
        }
        tokio::time::sleep(r.backoff(*retries)).await;
        *retries += 1;
        self.outbound.metrics.http_retries.inc();
        true
    }

    /// One try on one endpoint. `parts` are copied only when a retry policy may send
    /// them again; otherwise they are moved into the request: without a policy the
    /// only retries are after connect failures, before anything was sent.
    async fn try_once(
        &self,
        parts: &mut Option<http::request::Parts>,
        body: Body,
        replayable: bool,
        tried: &[std::net::SocketAddr],
        picked_dial: &mut Option<std::net::SocketAddr>,
        chosen: &mut Outcome,
    ) -> Result<Response<Body>, TryError> {
        // Prefer endpoints not tried yet; fall back to any once all have been.
        let picked = self
            .backend
            .endpoints
            .pick_with(
                &self.policy.load_balancer,
                self.hash,
                tried,
                &self.policy.outlier,
            )
            .or_else(|| {
                self.backend.endpoints.pick_with(
                    &self.policy.load_balancer,
                    self.hash,
                    &[],
                    &self.policy.outlier,
                )
            });
        let Some((endpoint, active)) = picked else {
            return Err(TryError::Connect(ProxyError::NoEndpoints));
        };
        if let Some(limit) = self.policy.max_pending_requests
            && active.stats().active() > limit as usize
        {
            return Err(TryError::Connect(ProxyError::Overflow));
        }
        *picked_dial = Some(endpoint.dial);
        chosen.endpoint = Some((endpoint.dial, endpoint.workload.clone()));
        // Counted on the endpoint until the response body ends, not only until its
        // head: a streaming response is load.
        let active = &*chosen.in_flight.insert(active);
        let started = Instant::now();
        let connect_timeout = self
            .policy
            .connect_timeout
            .unwrap_or(self.outbound.connect_timeout);
        let Some(identity) = &endpoint.identity else {
            // No sidecar there: straight to the app, in plaintext. The parts are
            // copied: the pool connects inside `send`, and a connect failure must
            // leave them for the next endpoint (a rare path; the mesh one moves them).
            let Some(parts) = parts.as_ref().map(clone_parts) else {
                return Err(TryError::Reset);
            };
            let request = Request::from_parts(parts, body);
            let send = self.outbound.plain.send(request, endpoint.dial);
            return self.finish(send, endpoint.dial, active, started).await;
        };
        if parts
            .as_ref()
            .is_some_and(|p| p.version == Version::HTTP_11)
        {
            let target = super::mesh_h1::Target {
                addr: endpoint.dial,
                identity,
                tls: self.tls,
                connect_timeout,
                max: self
                    .policy
                    .max_connections
                    .map_or(super::mesh_h1::DEFAULT_MAX_PER_ENDPOINT, |m| m as usize),
                idle: self.policy.idle_timeout,
                service: &self.backend.service,
            };
            let idempotent = parts.as_ref().is_some_and(|p| is_idempotent(&p.method));
            let response = self
                .try_http1(&target, parts, body, replayable, active, started)
                .await
                .map_err(|e| e.unless_idempotent(idempotent))?;
            return Self::peer_answered(endpoint.dial, idempotent, response);
        }
        let sender = self
            .outbound
            .pool
            .sender(
                endpoint.dial,
                identity,
                self.tls,
                connect_timeout,
                &self.backend.service,
                self.policy.idle_timeout,
            )
            .await;
        let mut sender = match sender {
            Ok(s) => s,
            Err(e) => return Err(self.connect_failed(endpoint.dial, &e, active, started)),
        };
        let Some(parts) = self.parts_for_try(parts, replayable) else {
            return Err(TryError::Reset);
        };
        let idempotent = is_idempotent(&parts.method);
        let result = {
            let send = sender.send_request(Request::from_parts(parts, body));
            self.finish(send, endpoint.dial, active, started).await
        };
        if result.is_err() {
            self.outbound.pool.evict(endpoint.dial, &sender);
        }
        let response = result.map_err(|e| e.unless_idempotent(idempotent))?;
        Self::peer_answered(endpoint.dial, idempotent, response)
    }

    /// A peer sidecar's own answer that nothing reached its app makes the try fail
    /// like a connect failure, so the request may go to another endpoint.
    fn peer_answered(
        dial: std::net::SocketAddr,
        idempotent: bool,
        response: Response<Body>,
    ) -> Result<Response<Body>, TryError> {
        // The peer's app was not there (it exits first when its pod stops, while
        // this proxy may still hold a connection to the pod's sidecar).
        if ProxyError::is_peer_app_unreachable(&response) {
            tracing::debug!(endpoint = %dial, "the peer's app is unreachable; trying another endpoint");
            return Err(TryError::Connect(ProxyError::AppUnreachable));
        }
        if idempotent && ProxyError::is_peer_app_reset(&response) {
            tracing::debug!(endpoint = %dial, "the peer's app reset an idempotent request; trying another endpoint");
            return Err(TryError::Unanswered);
        }
        Ok(response)
    }

    /// One try of an HTTP/1.1 caller's request, kept HTTP/1.1 on a pooled connection.
    async fn try_http1(
        &self,
        target: &super::mesh_h1::Target<'_>,
        parts: &mut Option<http::request::Parts>,
        body: Body,
        replayable: bool,
        active: &crate::balance::ActiveGuard,
        started: Instant,
    ) -> Result<Response<Body>, TryError> {
        let pool = &self.outbound.http1_pool;
        let checkout = match pool.checkout(target).await {
            Ok(checkout) => checkout,
            Err(MeshHttp1Error::Connect(e)) => {
                return Err(self.connect_failed(target.addr, &e, active, started));
            }
            Err(e) => {
                // Every connection busy for the whole wait: not the endpoint's fault.
                tracing::debug!(endpoint = %target.addr, error = %e, "no mesh connection free");
                return Err(TryError::Connect(ProxyError::Overflow));
            }
        };
        let Some(parts) = self.parts_for_try(parts, replayable) else {
            return Err(TryError::Reset);
        };
        let send = pool.send(checkout, target, Request::from_parts(parts, body));
        self.finish(send, target.addr, active, started).await
    }

    /// Counts a failed connect against the endpoint; says whether another may be tried.
    fn connect_failed(
        &self,
        dial: std::net::SocketAddr,
        e: &PoolError,
        active: &crate::balance::ActiveGuard,
        started: Instant,
    ) -> TryError {
        tracing::debug!(endpoint = %dial, error = %e, "connect failed");
        active
            .stats()
            .observe(started.elapsed(), false, &self.policy.outlier);
        TryError::Connect(match e {
            PoolError::Connect { .. } | PoolError::Handshake { .. } => ProxyError::ConnectFailed,
            _ => ProxyError::UpstreamReset,
        })
    }

    /// The parts for this try: copied when they may be sent again (a retry policy, or
    /// a replayable request a peer may answer with 'nothing reached the app'), else
    /// moved (then the only retries are after connect failures, before anything was
    /// sent).
    fn parts_for_try(
        &self,
        parts: &mut Option<http::request::Parts>,
        replayable: bool,
    ) -> Option<http::request::Parts> {
        if self.retry.is_some() || replayable {
            parts.as_ref().map(clone_parts)
        } else {
            parts.take().map(|mut p| {
                p.extensions.clear();
                p
            })
        }
    }

    /// Waits for the response within the per-try timeout and feeds the outcome to
    /// the endpoint's statistics.
    async fn finish<F, B, E>(
        &self,
        send: F,
        dial: std::net::SocketAddr,
        active: &crate::balance::ActiveGuard,
        started: Instant,
    ) -> Result<Response<Body>, TryError>
    where
        F: std::future::Future<Output = Result<Response<B>, E>>,
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<super::BoxError>,
        E: std::fmt::Display + IsConnectError,
    {
        let result = match self.per_try {
            Some(limit) => match tokio::time::timeout(limit, send).await {
                Ok(r) => r,
                Err(_) => {
                    active
                        .stats()
                        .observe(started.elapsed(), false, &self.policy.outlier);
                    return Err(TryError::Timeout);
                }
            },
            None => send.await,
        };
        match result {
            Ok(response) => {
                let ok = !response.status().is_server_error();
                active
                    .stats()
                    .observe(started.elapsed(), ok, &self.policy.outlier);
                Ok(response.map(into_body))
            }
            Err(e) => {
                tracing::debug!(endpoint = %dial, error = %e, "request failed");
                active
                    .stats()
                    .observe(started.elapsed(), false, &self.policy.outlier);
                if e.is_connect_error() {
                    Err(TryError::Connect(ProxyError::ConnectFailed))
                } else if e.is_unanswered() {
                    Err(TryError::Unanswered)
                } else {
                    Err(TryError::Reset)
                }
            }
        }
    }
}

impl TryError {
    /// A request that is not idempotent may have had effects even unanswered.
    fn unless_idempotent(self, idempotent: bool) -> TryError {
        match self {
            TryError::Unanswered if !idempotent => TryError::Reset,
            other => other,
        }
    }
}

/// Whether a send failed before anything was sent (safe to try elsewhere).
trait IsConnectError {
    fn is_connect_error(&self) -> bool;

    /// The connection closed with not one byte of a response: the peer may have shut
    /// it as the request went out (a pod stopping, or the keep-alive race).
    fn is_unanswered(&self) -> bool {
        false
    }
}

impl IsConnectError for hyper::Error {
    /// The mesh connection was already up: a failure now may have been sent, unless
    /// hyper never wrote the request (canceled: the connection closed first, e.g. on
    /// the peer's GOAWAY as its pod stops) or the peer refused the stream unprocessed
    /// (HTTP/2 REFUSED_STREAM, also what a GOAWAY's last stream id implies).
    fn is_connect_error(&self) -> bool {
        if self.is_canceled() {
            return true;
        }
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = e.source();
        }
        false
    }
}

impl IsConnectError for MeshHttp1Error {
    fn is_connect_error(&self) -> bool {
        match self {
            MeshHttp1Error::Request { source, .. } => source.is_connect_error(),
            other => other.is_connect_error(),
        }
    }

    fn is_unanswered(&self) -> bool {
        MeshHttp1Error::is_unanswered(self)
    }
}

/// A body as the proxy sends it; one that already is needs no second box.
fn into_body<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<super::BoxError>,
{
    let mut slot = Some(body);
    let boxed = (&mut slot as &mut dyn std::any::Any)
        .downcast_mut::<Option<Body>>()
        .and_then(Option::take);
    match (boxed, slot) {
        (Some(body), _) => body,
        (None, Some(body)) => body.map_err(Into::into).boxed(),
        (None, None) => super::errors::empty(),
    }
}

impl IsConnectError for super::plain::PlainError {
    fn is_connect_error(&self) -> bool {
        super::plain::PlainError::is_connect_error(self)
    }
}

/// Runs a downstream connection; with an idle timeout, one with nothing in flight for
/// that long is shut down gracefully (HTTP/2 gets GOAWAY, HTTP/1 a close).
async fn until_idle<C>(
    conn: C,
    idle: Option<Duration>,
    tracker: Option<&IdleTracker>,
    graceful_shutdown: fn(std::pin::Pin<&mut C>),
) -> hyper::Result<()>
where
    C: std::future::Future<Output = hyper::Result<()>>,
{
    let mut conn = std::pin::pin!(conn);
    let (Some(idle), Some(tracker)) = (idle, tracker) else {
        return conn.await;
    };
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = tracker.idle_for(idle) => {}
    }
    graceful_shutdown(conn.as_mut());
    conn.await
}

fn retries_grpc(r: &RetryPolicy, response: &Response<Body>) -> bool {
    !r.grpc_statuses.is_empty()
        && response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|code| r.grpc_statuses.contains(&code))
}

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers.clone();
    }
    let (mut new, ()) = match builder.body(()) {
        Ok(r) => r.into_parts(),
        Err(_) => Request::new(()).into_parts(),
    };
    new.extensions = http::Extensions::new();
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    #[test]
    fn hop_by_hop_headers_and_forwarded_certs_go() {
        let req = Request::builder()
            .uri("http://echo.default/")
            .version(Version::HTTP_2)
            .header("connection", "keep-alive")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("transfer-encoding", "chunked")
            .header("upgrade", "h2c")
            .header("te", "gzip")
            .header("x-forwarded-client-cert", "By=spiffe://forged")
            .header("x-kept", "1")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare(&mut parts, "echo.default").unwrap();
        let names: Vec<_> = parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        let mut headers = http::HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers[header::TE], "trailers");
    }

    #[test]
    fn a_malformed_host_is_a_bad_request() {
        let req = Request::builder()
            .uri("/")
            .header("host", "bad host")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        assert_eq!(
            prepare(&mut parts, "echo.default"),
            Err(ProxyError::BadRequest)
        );
    }

    #[test]
    fn http1_requests_become_absolute_and_marked() {
        let req = Request::builder()
            .uri("/a?b=1")
            .header("host", "echo.default:8080")
            .header("connection", "keep-alive")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare(&mut parts, "echo.default").unwrap();
        assert_eq!(parts.uri, "http://echo.default:8080/a?b=1");
        assert_eq!(parts.version, Version::HTTP_2);
        assert_eq!(parts.headers.get(ORIG_PROTO).unwrap(), "HTTP/1.1");
        assert!(parts.headers.get("connection").is_none());
        assert!(parts.headers.get("host").is_none());
    }
}
