//! Prometheus metrics of the proxy. Label lookups happen once per connection, never
//! per byte or per request.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The caller's SPIFFE ID, from its certificate.
    pub peer_identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
    pub peer_identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
    pub peer_identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub type_url: String,
    pub result: String,
}

/// Handles to every metric; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub inbound_connections: Family<PeerLabels, Counter>,
    pub inbound_bytes: Family<PeerLabels, Counter>,
    pub inbound_refused: Family<ReasonLabels, Counter>,
    pub outbound_connections: Family<ServiceLabels, Counter>,
    pub outbound_bytes: Family<ServiceLabels, Counter>,
    pub outbound_failures: Family<ReasonLabels, Counter>,
    pub passthrough_connections: Counter,
    pub detect_head_too_long: Counter,
    pub app_metrics_failures: Counter,
    pub active_connections: Gauge,
    pub config_updates: Family<ConfigLabels, Counter>,
    pub cert_renewals: Counter,
    pub authz_allowed: Counter,
    pub authz_denied: Family<PolicyLabels, Counter>,
    pub http_retries: Counter,
    pub http_proxy_errors: Family<ReasonLabels, Counter>,
    pub cert_expiry_seconds: Gauge,
    /// Spans the collector took, and spans in batches it did not (tracing on only).
    pub spans_exported: Counter,
    pub span_export_failures: Counter,
    /// Istio's standard request and TCP metrics, and the access log.
    pub requests: Arc<crate::request_metrics::Families>,
    registry: Arc<Registry>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_access_log(crate::access_log::AccessLog::off())
    }

    pub fn with_access_log(access_log: crate::access_log::AccessLog) -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let requests = crate::request_metrics::Families::register(&mut registry, access_log);
        let m = Metrics {
            inbound_connections: Family::default(),
            inbound_bytes: Family::default(),
            inbound_refused: Family::default(),
            outbound_connections: Family::default(),
            outbound_bytes: Family::default(),
            outbound_failures: Family::default(),
            passthrough_connections: Counter::default(),
            detect_head_too_long: Counter::default(),
            app_metrics_failures: Counter::default(),
            active_connections: Gauge::default(),
            config_updates: Family::default(),
            cert_renewals: Counter::default(),
            authz_allowed: Counter::default(),
            authz_denied: Family::default(),
            http_retries: Counter::default(),
            http_proxy_errors: Family::default(),
            cert_expiry_seconds: Gauge::default(),
            spans_exported: Counter::default(),
            span_export_failures: Counter::default(),
            requests,
            registry: Arc::new(Registry::default()),
        };
        registry.register(
            "inbound_connections",
            "mTLS connections accepted, by caller identity",
            m.inbound_connections.clone(),
        );
        registry.register(
            "inbound_bytes",
            "Bytes carried on inbound connections (both directions)",
            m.inbound_bytes.clone(),
        );
        registry.register(
            "inbound_refused",
            "Inbound connections refused before reaching the app",
            m.inbound_refused.clone(),
        );
        registry.register(
            "outbound_connections",
            "mTLS connections opened to a service, by the peer's verified identity",
            m.outbound_connections.clone(),
        );
        registry.register(
            "outbound_bytes",
            "Bytes carried on outbound connections (both directions)",
            m.outbound_bytes.clone(),
        );
        registry.register(
            "outbound_failures",
            "Outbound connections that failed, by reason",
            m.outbound_failures.clone(),
        );
        registry.register(
            "passthrough_connections",
            "Outbound connections to destinations outside the mesh, passed through",
            m.passthrough_connections.clone(),
        );
        registry.register(
            "outbound_detect_head_too_long",
            "Outbound connections on undeclared ports whose HTTP/1 request head outran protocol detection (32 KiB): carried as TCP, without routes or retries",
            m.detect_head_too_long.clone(),
        );
        registry.register(
            "app_metrics_scrape_failures",
            "Scrapes of the app's own metrics (merged into the health port's /metrics) that failed; the proxy's metrics were served alone",
            m.app_metrics_failures.clone(),
        );
        registry.register(
            "active_connections",
            "Connections open now",
            m.active_connections.clone(),
        );
        registry.register(
            "config_updates",
            "Discovery responses, by type and ACK or NACK",
            m.config_updates.clone(),
        );
        registry.register(
            "cert_renewals",
            "Workload certificates renewed",
            m.cert_renewals.clone(),
        );
        registry.register(
            "authz_allowed",
            "Requests and connections allowed by authorization policy",
            m.authz_allowed.clone(),
        );
        registry.register(
            "authz_denied",
            "Requests and connections denied, by the policy that decided",
            m.authz_denied.clone(),
        );
        registry.register(
            "http_retries",
            "HTTP retries made (within the retry budget)",
            m.http_retries.clone(),
        );
        registry.register(
            "http_proxy_errors",
            "HTTP responses the proxy made itself, by reason",
            m.http_proxy_errors.clone(),
        );
        registry.register(
            "cert_expiry_timestamp_seconds",
            "When the current workload certificate expires",
            m.cert_expiry_seconds.clone(),
        );
        registry.register(
            "spans_exported",
            "Trace spans the OTLP collector accepted",
            m.spans_exported.clone(),
        );
        registry.register(
            "span_export_failures",
            "Trace spans lost because their batch could not be exported",
            m.span_export_failures.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
