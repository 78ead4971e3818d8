//! The control plane's Prometheus metrics (`trellis_control_*` on 15014 `/metrics`).
//! Every label is bounded: resource types, reason classes and registry kinds come
//! from fixed lists, never from what a proxy or a request sent.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::MeshSnapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// The resource type's short name (`Service`, `Endpoints`, ...).
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NackLabels {
    pub r#type: &'static str,
    /// The gRPC code the proxy put in its error detail, snake case: a class, not
    /// the message (which is on `/debug/proxies`).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryEventLabels {
    /// What changed: `service`, `endpoints`, `workload`, `route`, ...
    pub kind: &'static str,
    /// `add`, `update` or `delete`.
    pub event: &'static str,
}

/// Why the CA refused a certificate (a fixed set, for the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    NoProof,
    UnknownBootstrapToken,
    TokenRefused,
    TokenReviewUnavailable,
    IdentityMismatch,
    MalformedCsr,
    UnsupportedKey,
    SigningFailed,
}

impl RefusalReason {
    pub fn as_label(self) -> &'static str {
        match self {
            RefusalReason::NoProof => "no_proof",
            RefusalReason::UnknownBootstrapToken => "unknown_bootstrap_token",
            RefusalReason::TokenRefused => "token_refused",
            RefusalReason::TokenReviewUnavailable => "token_review_unavailable",
            RefusalReason::IdentityMismatch => "identity_mismatch",
            RefusalReason::MalformedCsr => "malformed_csr",
            RefusalReason::UnsupportedKey => "unsupported_key",
            RefusalReason::SigningFailed => "signing_failed",
        }
    }
}

/// Handles to every control-plane metric; cheap to clone.
#[derive(Clone)]
pub struct ControlMetrics {
    pub connected_proxies: Gauge,
    pub pushes: Family<TypeLabels, Counter>,
    pub push_latency: Family<TypeLabels, Histogram>,
    pub nacks: Family<NackLabels, Counter>,
    pub certificates_issued: Counter,
    pub certificates_refused: Family<ReasonLabels, Counter>,
    pub certificate_requests_limited: Counter,
    pub discovery_streams_refused: Counter,
    pub registry_events: Family<RegistryEventLabels, Counter>,
    pub registry_rejections: Counter,
    pub registry_generation: Gauge,
    pub services: Gauge,
    pub leader: Gauge,
    registry: Arc<Registry>,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~16 s: an ACK on loopback takes a millisecond, one behind a stalled
    // proxy seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl ControlMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_control");
        let m = ControlMetrics {
            connected_proxies: Gauge::default(),
            pushes: Family::default(),
            push_latency: Family::new_with_constructor(latency_histogram),
            nacks: Family::default(),
            certificates_issued: Counter::default(),
            certificates_refused: Family::default(),
            certificate_requests_limited: Counter::default(),
            discovery_streams_refused: Counter::default(),
            registry_events: Family::default(),
            registry_rejections: Counter::default(),
            registry_generation: Gauge::default(),
            services: Gauge::default(),
            leader: Gauge::default(),
            registry: Arc::new(Registry::default()),
        };
        registry.register(
            "connected_proxies",
            "Proxies with an open discovery stream",
            m.connected_proxies.clone(),
        );
        registry.register(
            "pushes",
            "Discovery responses sent to proxies, by resource type",
            m.pushes.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "Time from sending a discovery response to the proxy's ACK or NACK of it, by resource type",
            m.push_latency.clone(),
        );
        registry.register(
            "nacks",
            "Discovery responses a proxy rejected, by resource type and the gRPC code it gave",
            m.nacks.clone(),
        );
        registry.register(
            "certificates_issued",
            "Workload certificates signed",
            m.certificates_issued.clone(),
        );
        registry.register(
            "certificates_refused",
            "Certificate requests refused after the rate limit, by reason",
            m.certificates_refused.clone(),
        );
        registry.register(
            "certificate_requests_limited",
            "Certificate requests refused by the per-source rate limit",
            m.certificate_requests_limited.clone(),
        );
        registry.register(
            "discovery_streams_refused",
            "Discovery streams refused by the per-workload cap",
            m.discovery_streams_refused.clone(),
        );
        registry.register(
            "registry_events",
            "Objects added, updated or deleted in the mesh model, by kind",
            m.registry_events.clone(),
        );
        registry.register(
            "registry_rejections",
            "Registry reads rejected as invalid (the last good model kept serving)",
            m.registry_rejections.clone(),
        );
        registry.register(
            "registry_generation",
            "Snapshots the registry has published",
            m.registry_generation.clone(),
        );
        registry.register(
            "services",
            "Services in the model being served",
            m.services.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease (a lone file-mode control plane always does)",
            m.leader.clone(),
        );
        ControlMetrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn push_sent(&self, type_url: &str) {
        self.pushes
            .get_or_create(&TypeLabels {
                r#type: short_type(type_url),
            })
            .inc();
    }

    pub fn push_answered(&self, type_url: &str, after: Duration) {
        self.push_latency
            .get_or_create(&TypeLabels {
                r#type: short_type(type_url),
            })
            .observe(after.as_secs_f64());
    }

    pub fn nack(&self, type_url: &str, grpc_code: i32) {
        self.nacks
            .get_or_create(&NackLabels {
                r#type: short_type(type_url),
                reason: code_class(grpc_code),
            })
            .inc();
    }

    pub fn certificate_refused(&self, reason: RefusalReason) {
        self.certificates_refused
            .get_or_create(&ReasonLabels {
                reason: reason.as_label(),
            })
            .inc();
    }

    /// Counts what changed between two snapshots, per kind.
    pub fn model_changed(&self, old: &MeshSnapshot, new: &MeshSnapshot) {
        for (kind, event, n) in crate::model::diff::changes(old, new) {
            self.registry_events
                .get_or_create(&RegistryEventLabels { kind, event })
                .inc_by(n);
        }
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `type.trellis.io/Service` -> `Service`; a type this control plane does not serve
/// is `other`, so a proxy cannot mint label values.
pub fn short_type(type_url: &str) -> &'static str {
    crate::discovery::TYPE_URLS
        .iter()
        .find(|t| **t == type_url)
        .and_then(|t| t.rsplit('/').next())
        .unwrap_or("other")
}

/// A gRPC code as a snake-case class; outside the known codes, `other`.
pub fn code_class(code: i32) -> &'static str {
    match code {
        0 => "ok",
        1 => "cancelled",
        2 => "unknown",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        6 => "already_exists",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        10 => "aborted",
        11 => "out_of_range",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        15 => "data_loss",
        16 => "unauthenticated",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(short_type("type.trellis.io/Service"), "Service");
        assert_eq!(short_type("type.evil.io/../../x"), "other");
        assert_eq!(code_class(3), "invalid_argument");
        assert_eq!(code_class(-7), "other");
        assert_eq!(code_class(1 << 20), "other");
    }

    #[test]
    fn counters_encode_with_their_labels() {
        let m = ControlMetrics::new();
        m.nack("type.trellis.io/Endpoints", 3);
        m.certificate_refused(RefusalReason::UnknownBootstrapToken);
        m.push_sent("type.trellis.io/Service");
        m.push_answered("type.trellis.io/Service", Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains(
                "trellis_control_nacks_total{type=\"Endpoints\",reason=\"invalid_argument\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "trellis_control_certificates_refused_total{reason=\"unknown_bootstrap_token\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "trellis_control_push_latency_seconds_bucket{le=\"0.004\",type=\"Service\"} 1"
            ),
            "{text}"
        );
    }
}
