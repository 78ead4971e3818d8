//! Distributed tracing: a CLIENT span on the caller's sidecar and a SERVER span on
//! the callee's for every HTTP request, exported over OTLP/gRPC by OpenTelemetry's
//! SDK, with the trace context carried in the request's headers ([`propagation`]).
//!
//! Off unless an OTLP endpoint is configured: then nothing is created, nothing is
//! exported, and requests keep exactly the headers they came with; the data path
//! pays one branch. When on, a finished span goes into the batch processor's bounded
//! queue without waiting (dropped when it is full) and is exported from the
//! processor's own thread, so a slow or absent collector never holds a request.

pub mod propagation;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};
use trellis_identity::SpiffeId;

use propagation::{Incoming, Parent};

/// Where spans go and how many new traces are kept.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// The collector's OTLP/gRPC endpoint, `http://host:4317`.
    pub endpoint: String,
    /// The share of new traces (no sampling decision from the caller) that are
    /// recorded, 0.0 to 1.0; a caller's decision is always followed.
    pub sampling_ratio: f64,
    /// Finished spans waiting for export; more are dropped.
    pub max_queue: usize,
    /// How long finished spans wait to be exported in a batch.
    pub batch_delay: Duration,
}

impl TraceConfig {
    /// 1 % of new traces, Istio's default.
    pub const DEFAULT_SAMPLING_RATIO: f64 = 0.01;

    pub fn new(endpoint: impl Into<String>) -> Self {
        TraceConfig {
            endpoint: endpoint.into(),
            sampling_ratio: Self::DEFAULT_SAMPLING_RATIO,
            max_queue: 2048,
            batch_delay: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("the OTLP endpoint {0:?} is not an http:// URL (OTLP/gRPC, plaintext)")]
    Endpoint(String),
    #[error("the trace sampling ratio {0} is not between 0 and 1")]
    SamplingRatio(f64),
    #[error("building the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The proxy's tracer, or nothing when tracing is off. Cloned into every connection.
#[derive(Clone, Default)]
pub struct Tracing {
    inner: Option<Arc<Exporting>>,
}

struct Exporting {
    /// Both in an `Option` so that `Drop` can move them to a thread of their own.
    parts: Option<(SdkTracerProvider, SdkTracer)>,
}

impl Drop for Exporting {
    /// Shutting down flushes the queue and may wait on the collector: never on a
    /// runtime thread (the exporter's connection runs there).
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            let spawned = std::thread::Builder::new()
                .name("trace-shutdown".into())
                .spawn(move || {
                    let (provider, tracer) = parts;
                    drop(tracer);
                    if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                        tracing::debug!(error = %e, "trace exporter shutdown");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no thread to flush traces on; the last spans are lost");
            }
        }
    }
}

impl Tracing {
    pub fn off() -> Self {
        Tracing { inner: None }
    }

    /// Starts the exporter. Must run inside the proxy's Tokio runtime (the OTLP
    /// client's connection lives there); connects lazily, so a collector that is not
    /// up yet is no error.
    pub fn start(
        config: &TraceConfig,
        identity: &SpiffeId,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Self, TraceError> {
        if !config.endpoint.starts_with("http://") {
            return Err(TraceError::Endpoint(config.endpoint.clone()));
        }
        if !(0.0..=1.0).contains(&config.sampling_ratio) {
            return Err(TraceError::SamplingRatio(config.sampling_ratio));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()?;
        let exporter = CountedExporter {
            inner: exporter,
            exported: metrics.spans_exported.clone(),
            failed: metrics.span_export_failures.clone(),
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(config.max_queue.max(1))
                    .with_max_export_batch_size(config.max_queue.clamp(1, 512))
                    .with_scheduled_delay(config.batch_delay)
                    .build(),
            )
            .build();
        // The service is the workload as metrics name it (its service account).
        let resource = Resource::builder()
            .with_service_name(format!(
                "{}.{}",
                identity.service_account(),
                identity.namespace()
            ))
            .with_attribute(KeyValue::new(
                "service.namespace",
                identity.namespace().to_owned(),
            ))
            .with_attribute(KeyValue::new("trellis.identity", identity.to_string()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("trellis-proxy");
        tracing::info!(endpoint = %config.endpoint, sampling_ratio = config.sampling_ratio, "exporting traces");
        Ok(Tracing {
            inner: Some(Arc::new(Exporting {
                parts: Some((provider, tracer)),
            })),
        })
    }

    /// Exports the spans still queued, waiting at most `limit` (at shutdown, while
    /// the runtime the exporter's connection needs is still running).
    pub async fn flush(&self, limit: Duration) {
        let Some(provider) = self
            .inner
            .as_ref()
            .and_then(|inner| inner.parts.as_ref())
            .map(|(provider, _)| provider.clone())
        else {
            return;
        };
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush());
        match tokio::time::timeout(limit, flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "flushing spans"),
            Ok(Err(e)) => tracing::debug!(error = %e, "flushing spans"),
            Err(_) => tracing::debug!("flushing spans took too long; the rest are lost"),
        }
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts this hop's span as the child of the context in `headers`, and puts the
    /// span's own context there in its place. `None` when tracing is off. Attributes
    /// come after, and only for a span that is sampled ([`HopSpan::is_recording`]):
    /// most are not, and they then cost no allocation.
    pub fn start_span(
        &self,
        kind: SpanKind,
        method: &http::Method,
        headers: &mut HeaderMap,
    ) -> Option<Box<HopSpan>> {
        let (_, tracer) = self.inner.as_ref()?.parts.as_ref()?;
        let incoming = Incoming::read(headers);
        let parent = match &incoming.parent {
            Parent::Span { context, .. } => {
                Context::new().with_remote_span_context(context.clone())
            }
            // A caller's "do not sample" without ids: a parent nobody will see, so the
            // sampler follows the decision.
            Parent::Decision { sampled } => {
                let flags = if *sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                };
                Context::new().with_remote_span_context(SpanContext::new(
                    TraceId::from(rand::random::<u128>().max(1)),
                    SpanId::from(rand::random::<u64>().max(1)),
                    flags,
                    true,
                    TraceState::default(),
                ))
            }
            Parent::None => Context::new(),
        };
        let span = tracer
            .span_builder(span_name(method))
            .with_kind(kind.clone())
            .start_with_context(tracer, &parent);
        propagation::write(headers, &incoming, span.span_context());
        Some(Box::new(HopSpan {
            span,
            server: kind == SpanKind::Server,
        }))
    }
}

fn span_name(method: &http::Method) -> Cow<'static, str> {
    // Semantic conventions: `{method}` when there is no route template.
    match *method {
        http::Method::GET => Cow::Borrowed("GET"),
        http::Method::POST => Cow::Borrowed("POST"),
        http::Method::PUT => Cow::Borrowed("PUT"),
        http::Method::DELETE => Cow::Borrowed("DELETE"),
        http::Method::HEAD => Cow::Borrowed("HEAD"),
        http::Method::PATCH => Cow::Borrowed("PATCH"),
        http::Method::OPTIONS => Cow::Borrowed("OPTIONS"),
        http::Method::CONNECT => Cow::Borrowed("CONNECT"),
        // Not a standard method: the conventions' name for it.
        _ => Cow::Borrowed("HTTP"),
    }
}

/// Counts what the exporter delivered and what it lost, since the SDK logs neither
/// here (its internal logs are off).
#[derive(Debug)]
struct CountedExporter<E> {
    inner: E,
    exported: prometheus_client::metrics::counter::Counter,
    failed: prometheus_client::metrics::counter::Counter,
}

impl<E: SpanExporter> SpanExporter for CountedExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let spans = batch.len() as u64;
        let sent = self.inner.export(batch);
        async move {
            let result = sent.await;
            match &result {
                Ok(()) => {
                    self.exported.inc_by(spans);
                }
                Err(e) => {
                    self.failed.inc_by(spans);
                    tracing::debug!(error = %e, spans, "exporting spans failed");
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// One hop's span, open until the response ends.
pub struct HopSpan {
    span: opentelemetry_sdk::trace::Span,
    server: bool,
}

impl HopSpan {
    /// Whether the span is sampled: attributes on any other are thrown away.
    pub fn is_recording(&self) -> bool {
        self.span.is_recording()
    }

    pub fn set(&mut self, attribute: KeyValue) {
        self.span.set_attribute(attribute);
    }

    pub fn set_all(&mut self, attributes: Vec<KeyValue>) {
        self.span.set_attributes(attributes);
    }

    pub fn context(&self) -> &SpanContext {
        self.span.span_context()
    }

    /// Ends the span with the response's code and the proxy's reason, if it made
    /// the response (`response_flags` other than `-`).
    pub fn finish(mut self, code: u16, grpc_status: Option<u8>, response_flags: &'static str) {
        if !self.span.is_recording() {
            return;
        }
        self.span
            .set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
        if let Some(status) = grpc_status {
            self.span
                .set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(status)));
        }
        let proxy_made = response_flags != crate::request_metrics::NO_FLAGS;
        if proxy_made {
            self.span
                .set_attribute(KeyValue::new("trellis.response_flags", response_flags));
        }
        // Conventions: a client span fails on 4xx and 5xx, a server span on 5xx.
        let failed = if self.server {
            code >= 500
        } else {
            code >= 400
        };
        if failed || proxy_made {
            let error_type = if proxy_made {
                Cow::Borrowed(response_flags)
            } else {
                Cow::Owned(code.to_string())
            };
            self.span
                .set_attribute(KeyValue::new("error.type", error_type.clone()));
            self.span.set_status(Status::error(error_type));
        }
        self.span.end();
    }
}

/// `host` and `port` of an authority, for `server.address` and `server.port`.
pub fn server_attributes(authority: &str, attributes: &mut Vec<KeyValue>) {
    let Ok(authority) = authority.parse::<http::uri::Authority>() else {
        return;
    };
    attributes.push(KeyValue::new(
        "server.address",
        authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    ));
    if let Some(port) = authority.port_u16() {
        attributes.push(KeyValue::new("server.port", i64::from(port)));
    }
}

/// `network.peer.address` and `network.peer.port`.
pub fn peer_attributes(peer: std::net::SocketAddr) -> [KeyValue; 2] {
    [
        KeyValue::new("network.peer.address", peer.ip().to_string()),
        KeyValue::new("network.peer.port", i64::from(peer.port())),
    ]
}
