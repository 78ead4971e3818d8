//! Trellis' Kubernetes API: the policy CRDs (group `trellis.io`, version
//! `v1alpha1`) and the subset of Gateway API `HTTPRoute`
//! (`gateway.networking.k8s.io/v1`) the mesh reads.
//!
//! Each kind has a `<Kind>Spec` (camelCase, unknown fields rejected) and an object
//! type `<Kind> { metadata, spec, status }` shaped like the one
//! `#[derive(kube::CustomResource)]` on the spec would generate, with the same
//! `new(name, spec)`; the derive can replace the hand-written object type without
//! touching callers. Serde checks only shapes; each object's `validate` checks
//! values, and `to_model` also resolves references into the mesh model. Both report
//! [`FieldError`]s naming the field (`spec.rules[0].matches[1].path.value`), so a
//! registry can turn them into file errors (file) or status conditions (kube).
//!
//! Durations are strings in Go / Gateway API style (`500ms`, `1m30s`): see
//! [`duration`].

pub mod authorization_policy;
pub mod duration;
pub mod http_route;
pub mod peer_authentication;
pub mod traffic_policy;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};

pub use authorization_policy::{AuthorizationPolicy, AuthorizationPolicySpec};
pub use http_route::{HttpRoute, HttpRouteSpec};
pub use peer_authentication::{PeerAuthentication, PeerAuthenticationSpec};
pub use traffic_policy::{TrafficPolicy, TrafficPolicySpec};

use crate::model::{Service, ServiceKey};

/// `apiVersion` of the Trellis CRDs.
pub const TRELLIS_API_VERSION: &str = "trellis.io/v1alpha1";
/// `apiVersion` of Gateway API `HTTPRoute`.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// One invalid field of an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The path from the object's root, e.g. `spec.retries.perTryTimeout`.
    pub field: String,
    pub reason: String,
}

/// The services references are resolved against; `None` skips reference checks.
pub type Services<'a> = Option<&'a BTreeMap<ServiceKey, Service>>;

/// Collects [`FieldError`]s.
#[derive(Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.into(),
        });
    }

    /// `Ok(value)` when nothing was pushed.
    pub(crate) fn into_result<T>(self, value: T) -> Result<T, Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }

    /// Parses an optional duration, pushing the error if any. The wire carries
    /// milliseconds, so a duration is 0 or at least 1ms.
    pub(crate) fn duration(&mut self, field: &str, value: Option<&str>) -> Option<Duration> {
        let value = value?;
        match duration::parse(value) {
            Ok(d) if d.is_zero() || d >= Duration::from_millis(1) => Some(d),
            Ok(_) => {
                self.push(field, format!("{value:?} is under 1ms"));
                None
            }
            Err(e) => {
                self.push(field, e.to_string());
                None
            }
        }
    }
}

/// `status` of the Trellis policy kinds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted`: True when the object is valid and its references resolve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Istio's workload selector: `matchLabels` only.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Selects workloads whose labels include all of these; empty selects all.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// The `Accepted` condition for an object of `generation` that `result` judged.
pub fn accepted_condition<T>(
    generation: Option<i64>,
    result: &Result<T, Vec<FieldError>>,
) -> Condition {
    let (status, reason, message) = match result {
        Ok(_) => ("True", "Accepted", String::new()),
        Err(errors) => {
            let message = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            ("False", "Invalid", message)
        }
    };
    Condition {
        type_: "Accepted".to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// `metadata.namespace`, or `default`.
pub(crate) fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => "default",
    }
}

/// `metadata.name`, pushing an error when it is missing.
pub(crate) fn name_of<'a>(meta: &'a ObjectMeta, errors: &mut Errors) -> &'a str {
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => name,
        _ => {
            errors.push("metadata.name", "is required");
            ""
        }
    }
}

/// Checks label keys and values of a selector (Kubernetes syntax, loosely: no
/// empty keys, no whitespace).
pub(crate) fn check_selector(field: &str, selector: &WorkloadSelector, errors: &mut Errors) {
    for (k, v) in &selector.match_labels {
        let bad = |s: &str| s.chars().any(|c| c.is_whitespace() || c.is_control());
        if k.is_empty() || bad(k) || bad(v) {
            errors.push(
                format!("{field}.matchLabels"),
                format!("{k:?}: {v:?} is not a valid label"),
            );
        }
    }
}

/// A Kubernetes namespace or Service name (RFC 1123 label).
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// HTTP methods a rule may name.
pub(crate) const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// An HTTP header name (RFC 9110 token), as Gateway API validates it.
pub(crate) fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_|~`".contains(&b))
}

/// A header value the proxy can send: visible ASCII, spaces and tabs.
pub(crate) fn is_header_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// Compiles `pattern` as the proxy does (anchored), so a bad one fails here.
pub(crate) fn check_regex(pattern: &str) -> Result<(), String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map(|_| ())
        .map_err(|e| {
            let detail = e.to_string();
            let last = detail.lines().last().unwrap_or_default().trim().to_owned();
            format!("{pattern:?} is not a valid regular expression: {last}")
        })
}

#[cfg(test)]
mod tests;
