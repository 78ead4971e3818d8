//! Istio's standard metrics under a `trellis_` prefix, with the same label meanings,
//! so dashboards port with a rename: requests, their duration and sizes, and TCP
//! connections, reported by both sides (`reporter="source"` on the caller's sidecar,
//! `"destination"` on the callee's).
//!
//! Cost on the data path: the labels that name who talks to whom ([`Peers`]) are
//! built once per connection (inbound) or per connection and route/backend/endpoint
//! (outbound, cached per connection) and shared as an `Arc`. A request adds a status
//! code, a gRPC status and a flag to them; the metric handles for each outcome are
//! fetched once per label set and kept (a success without even a hash), so a request
//! hashes no label strings and allocates nothing here but its response body's
//! wrapper (and a shared counter for a request body of unknown length).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use trellis_identity::SpiffeId;

use crate::access_log::{AccessLog, AccessRecord};
use crate::http::errors::TRELLIS_ERROR;
use crate::http::{Body, BoxError};

/// Istio's default bounds for `request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's bounds for request and response sizes: powers of ten, 1 B to 1 GB.
pub const SIZE_BUCKETS: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Which side of the call reports.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// A workload as the labels name it. Trellis knows workloads by identity: the
/// workload name is the service account's (what the SPIFFE ID carries on both sides,
/// so both reporters agree).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    /// The SPIFFE ID, or `unknown` (a plaintext caller, an endpoint without a sidecar).
    pub principal: String,
}

impl Workload {
    pub fn of(id: &SpiffeId) -> Self {
        Workload {
            name: id.service_account().to_owned(),
            namespace: id.namespace().to_owned(),
            principal: id.to_string(),
        }
    }

    pub fn unknown() -> Self {
        Workload {
            name: UNKNOWN.to_owned(),
            namespace: UNKNOWN.to_owned(),
            principal: UNKNOWN.to_owned(),
        }
    }
}

impl Default for Workload {
    fn default() -> Self {
        Workload::unknown()
    }
}

/// Istio's word for a label the reporter cannot know.
pub const UNKNOWN: &str = "unknown";

/// Who talks to whom: the labels fixed for a connection (and, outbound, a route and
/// endpoint).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Peers {
    pub reporter: Reporter,
    pub source: Arc<Workload>,
    pub destination: Arc<Workload>,
    /// `name.namespace` of the service, or `unknown`.
    pub destination_service: String,
    pub destination_port: u16,
    /// The HTTPRoute rule that matched, or `-` (none, or not known on this side).
    pub route_name: String,
}

impl EncodeLabelSet for Peers {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &self.source.name),
            ("source_workload_namespace", &self.source.namespace),
            ("source_principal", &self.source.principal),
            ("destination_workload", &self.destination.name),
            (
                "destination_workload_namespace",
                &self.destination.namespace,
            ),
            ("destination_principal", &self.destination.principal),
            ("destination_service", &self.destination_service),
            ("route_name", &self.route_name),
        ]
        .encode(encoder)?;
        [("destination_port", self.destination_port)].encode(encoder)
    }
}

/// `request_protocol`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RequestProtocol {
    Http,
    Grpc,
}

impl RequestProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }
}

/// The labels of one request's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub peers: Arc<Peers>,
    pub protocol: RequestProtocol,
    pub response_code: u16,
    /// `None` for HTTP (Istio leaves the label empty), and for a gRPC call that
    /// ended without a status.
    pub grpc_status: Option<u8>,
    /// The proxy's own reason when it answered instead of the app, else `-`.
    pub response_flags: &'static str,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.peers.encode(encoder)?;
        [
            ("request_protocol", self.protocol.as_str()),
            ("response_flags", self.response_flags),
        ]
        .encode(encoder)?;
        [("response_code", self.response_code)].encode(encoder)?;
        match self.grpc_status {
            Some(status) => [("grpc_response_status", status)].encode(encoder),
            None => [("grpc_response_status", "")].encode(encoder),
        }
    }
}

/// The labels of one TCP connection's series (`request_protocol="tcp"`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub peers: Arc<Peers>,
    pub response_flags: &'static str,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.peers.encode(encoder)?;
        [
            ("request_protocol", "tcp"),
            ("response_flags", self.response_flags),
        ]
        .encode(encoder)
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// Every request and TCP family; shared behind one `Arc`.
pub struct Families {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RequestLabels>,
    request_bytes: HistogramFamily<RequestLabels>,
    response_bytes: HistogramFamily<RequestLabels>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_duration: HistogramFamily<TcpLabels>,
    pub access_log: AccessLog,
}

impl Families {
    /// Registers the families in `registry` (prefixed `trellis`).
    pub fn register(registry: &mut Registry, access_log: AccessLog) -> Arc<Self> {
        let f = Families {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            tcp_duration: Family::new_with_constructor(duration_histogram),
            access_log,
        };
        // prometheus-client adds `_total` to counters.
        registry.register(
            "requests",
            "Requests, by reporter, peers, response code and flags (istio_requests_total)",
            f.requests.clone(),
        );
        registry.register(
            "request_duration_milliseconds",
            "Time from the request's arrival to the response's last byte",
            f.duration.clone(),
        );
        registry.register(
            "request_bytes",
            "Request body sizes",
            f.request_bytes.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body sizes",
            f.response_bytes.clone(),
        );
        registry.register(
            "tcp_connections_opened",
            "TCP (opaque) connections opened",
            f.tcp_opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP (opaque) connections closed",
            f.tcp_closed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent to the destination side on TCP connections",
            f.tcp_sent.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes received from the destination side on TCP connections",
            f.tcp_received.clone(),
        );
        registry.register(
            "tcp_connection_duration_milliseconds",
            "How long TCP connections stayed open",
            f.tcp_duration.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind",
            f.access_log.dropped().clone(),
        );
        Arc::new(f)
    }

    fn handles(&self, labels: &RequestLabels) -> Arc<RequestHandles> {
        Arc::new(RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        })
    }
}

/// One series' metrics, fetched once.
pub struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// A label set fixed for a connection (and route), with the success series' handles
/// kept once fetched.
pub struct LabelledPeers {
    families: Arc<Families>,
    peers: Arc<Peers>,
    ok_http: OnceLock<Arc<RequestHandles>>,
    ok_grpc: OnceLock<Arc<RequestHandles>>,
    /// Every other outcome seen on this label set, keyed without the strings, so a
    /// repeated 404 or 503 does not hash the peers' labels again.
    others: dashmap::DashMap<Outcome, Arc<RequestHandles>>,
}

/// What varies per request.
type Outcome = (RequestProtocol, u16, Option<u8>, &'static str);

impl LabelledPeers {
    pub fn new(families: Arc<Families>, peers: Peers) -> Arc<Self> {
        Arc::new(LabelledPeers {
            families,
            peers: Arc::new(peers),
            ok_http: OnceLock::new(),
            ok_grpc: OnceLock::new(),
            others: dashmap::DashMap::with_shard_amount(4),
        })
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    pub fn peers_arc(&self) -> Arc<Peers> {
        self.peers.clone()
    }

    pub fn access_log(&self) -> &AccessLog {
        &self.families.access_log
    }

    fn handles(
        &self,
        protocol: RequestProtocol,
        response_code: u16,
        grpc_status: Option<u8>,
        response_flags: &'static str,
    ) -> Arc<RequestHandles> {
        let labels = || RequestLabels {
            peers: self.peers.clone(),
            protocol,
            response_code,
            grpc_status,
            response_flags,
        };
        if response_code == 200 && response_flags == NO_FLAGS {
            match (protocol, grpc_status) {
                (RequestProtocol::Http, None) => {
                    return self
                        .ok_http
                        .get_or_init(|| self.families.handles(&labels()))
                        .clone();
                }
                (RequestProtocol::Grpc, Some(0)) => {
                    return self
                        .ok_grpc
                        .get_or_init(|| self.families.handles(&labels()))
                        .clone();
                }
                _ => {}
            }
        }
        let outcome = (protocol, response_code, grpc_status, response_flags);
        if let Some(handles) = self.others.get(&outcome) {
            return handles.clone();
        }
        self.others
            .entry(outcome)
            .or_insert_with(|| self.families.handles(&labels()))
            .clone()
    }

    /// Counts an opened TCP connection; the returned tally records its close.
    pub fn tcp_opened(self: &Arc<Self>) -> TcpTally {
        let labels = TcpLabels {
            peers: self.peers.clone(),
            response_flags: NO_FLAGS,
        };
        self.families.tcp_opened.get_or_create(&labels).inc();
        TcpTally {
            peers: self.clone(),
            labels,
            started: Instant::now(),
        }
    }
}

/// `response_flags` when the proxy added nothing.
pub const NO_FLAGS: &str = "-";

/// An open TCP connection's metrics.
pub struct TcpTally {
    peers: Arc<LabelledPeers>,
    labels: TcpLabels,
    started: Instant,
}

impl TcpTally {
    /// Records the close. As in Istio, `received` bytes went from the caller towards
    /// the destination and `sent` bytes came back; `upstream` is where they went.
    pub fn closed(self, upstream: Option<std::net::SocketAddr>, received: u64, sent: u64) {
        let f = &self.peers.families;
        let elapsed = self.started.elapsed();
        f.tcp_closed.get_or_create(&self.labels).inc();
        f.tcp_sent.get_or_create(&self.labels).inc_by(sent);
        f.tcp_received.get_or_create(&self.labels).inc_by(received);
        f.tcp_duration
            .get_or_create(&self.labels)
            .observe(millis(elapsed));
        if f.access_log.is_on() {
            let mut record = AccessRecord::new(self.labels.peers.clone(), "tcp");
            record.start_time = std::time::SystemTime::now()
                .checked_sub(elapsed)
                .unwrap_or(record.start_time);
            record.upstream = upstream;
            record.request_bytes = received;
            record.response_bytes = sent;
            record.duration_ms = millis(elapsed);
            f.access_log.send(&record);
        }
    }
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A request's size: known from its head (`Content-Length`, or no body), or counted
/// as its body streams.
#[derive(Clone)]
pub enum RequestSize {
    Known(u64),
    Counted(Arc<AtomicU64>),
}

impl RequestSize {
    fn bytes(&self) -> u64 {
        match self {
            RequestSize::Known(n) => *n,
            RequestSize::Counted(n) => n.load(Ordering::Relaxed),
        }
    }
}

/// Wraps a request body so its size is known when the response ends: bodies of known
/// length pass through untouched; others are counted as they stream.
pub fn measure_request<B>(body: B) -> (Body, RequestSize)
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if let Some(n) = body.size_hint().exact() {
        return (body.map_err(Into::into).boxed(), RequestSize::Known(n));
    }
    let counted = Arc::new(AtomicU64::new(0));
    let body = CountedRequest {
        inner: body,
        bytes: counted.clone(),
    };
    (
        body.map_err(Into::into).boxed(),
        RequestSize::Counted(counted),
    )
}

struct CountedRequest<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for CountedRequest<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What is known of a request when its response head is ready; recorded when the
/// response body ends (or is dropped: a caller that went away still counts).
pub struct Exchange {
    pub peers: Arc<LabelledPeers>,
    pub protocol: RequestProtocol,
    pub started: Instant,
    pub request_size: RequestSize,
    /// Filled only when the access log is on.
    pub log: Option<Box<AccessRecord>>,
    /// This hop's span, only when tracing is on; it ends with the response.
    pub span: Option<Box<crate::trace::HopSpan>>,
    /// The upstream endpoint's in-flight count (outbound): held to the end of the
    /// response body, so least-request and `maxPendingRequests` see streaming
    /// responses as the load they are.
    pub in_flight: Option<crate::balance::ActiveGuard>,
}

impl Exchange {
    /// Records the request once `response` has been sent: at once when it has no
    /// body, else when its body ends.
    pub fn respond(self, response: Response<Body>) -> Response<Body> {
        let code = response.status().as_u16();
        let flags = response_flags(response.headers());
        let grpc_status = match self.protocol {
            RequestProtocol::Grpc => grpc_status(response.headers()),
            RequestProtocol::Http => None,
        };
        let record = Record {
            exchange: self,
            code,
            grpc_status,
            flags,
            response_bytes: 0,
        };
        if response.body().is_end_stream() {
            record.finish();
            return response;
        }
        response.map(|inner| {
            RecordedResponse {
                inner,
                record: Some(record),
            }
            .boxed()
        })
    }
}

struct Record {
    exchange: Exchange,
    code: u16,
    grpc_status: Option<u8>,
    flags: &'static str,
    response_bytes: u64,
}

impl Record {
    fn finish(self) {
        let e = self.exchange;
        let elapsed = e.started.elapsed();
        let request_bytes = e.request_size.bytes();
        let handles = e
            .peers
            .handles(e.protocol, self.code, self.grpc_status, self.flags);
        handles.requests.inc();
        handles.duration.observe(millis(elapsed));
        handles.request_bytes.observe(request_bytes as f64);
        handles.response_bytes.observe(self.response_bytes as f64);
        if let Some(span) = e.span {
            span.finish(self.code, self.grpc_status, self.flags);
        }
        if let Some(mut log) = e.log {
            log.response_code = self.code;
            log.grpc_status = self.grpc_status;
            log.response_flags = self.flags;
            log.request_bytes = request_bytes;
            log.response_bytes = self.response_bytes;
            log.duration_ms = millis(elapsed);
            e.peers.access_log().send(&log);
        }
    }
}

/// A response body that counts its bytes and records the exchange at its end.
struct RecordedResponse {
    inner: Body,
    record: Option<Record>,
}

impl hyper::body::Body for RecordedResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(record) = self.record.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        record.response_bytes += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref()
                        && record.exchange.protocol == RequestProtocol::Grpc
                    {
                        record.grpc_status = grpc_status(trailers).or(record.grpc_status);
                    }
                }
                if self.inner.is_end_stream()
                    && let Some(record) = self.record.take()
                {
                    record.finish();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(record) = self.record.take() {
                    record.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordedResponse {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish();
        }
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    headers
        .get("grpc-status")
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.parse().ok())
}

/// The proxy-made reason behind a response (its `trellis-error` header, which only
/// proxies set), as a short label; `-` for an app's answer.
pub fn response_flags(headers: &HeaderMap) -> &'static str {
    match headers.get(TRELLIS_ERROR) {
        None => NO_FLAGS,
        Some(reason) => crate::http::errors::ProxyError::from_reason(reason.as_bytes())
            .map_or("proxy_error", crate::http::errors::ProxyError::flag),
    }
}

pub fn request_protocol<B>(req: &http::Request<B>) -> RequestProtocol {
    if crate::http::errors::is_grpc(req) {
        RequestProtocol::Grpc
    } else {
        RequestProtocol::Http
    }
}

#[cfg(test)]
mod tests;
