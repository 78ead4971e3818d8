//! Trellis' Kubernetes API: the policy CRDs (group `trellis.io`, version
//! `v1alpha1`) and the subset of Gateway API `HTTPRoute`
//! (`gateway.networking.k8s.io/v1`) the mesh reads.
//!
//! Each Trellis kind is a `<Kind>Spec` (camelCase, unknown fields rejected) with
//! `#[derive(kube::CustomResource, JsonSchema)]`, which generates the object type
//! `<Kind> { metadata, spec, status }`, its `new(name, spec)` and its
//! CustomResourceDefinition. [`crds`] collects the definitions; `deploy/crds/` holds
//! them as YAML, generated (`trellis-control crds --out deploy/crds`) and checked
//! against these types by `control-plane/tests/deploy.rs`.
//!
//! Checking happens in three places. The schema rejects at admission what it can
//! express: enums, required fields, ranges, patterns (durations, names, paths) and
//! a few CEL rules between fields. Serde checks shapes (the file registry's
//! admission). Each object's `validate` checks every value, and `to_model` also
//! resolves references into the mesh model; both report [`FieldError`]s naming the
//! field (`spec.rules[0].matches[1].path.value`), so a registry can turn them into
//! file errors (file) or an `Accepted=False` status condition (kube).
//!
//! Durations are strings in Go / Gateway API style (`500ms`, `1m30s`): see
//! [`duration`].

pub mod authorization_policy;
mod crd;
pub mod duration;
pub mod http_route;
pub mod peer_authentication;
pub mod traffic_policy;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};

pub use authorization_policy::{AuthorizationPolicy, AuthorizationPolicySpec};
pub use crd::{CRD_FILE_HEADER, crd_files, crds};
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

/// `status` of the Trellis policy kinds, written by the control plane's leader.
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted`: True when the object is valid and its references resolve; False
    /// with a reason and message naming the invalid fields otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions were computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A Trellis object as a file declares it. The derived object types ignore
/// unknown top-level fields, as the API server prunes them before anyone reads the
/// object; a file has no server in front, so there a misspelt `spec` or `status`
/// is an error, and a missing `metadata` is one too (reported by `validate`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Declared<S> {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default)]
    pub status: Option<PolicyStatus>,
}

impl From<Declared<TrafficPolicySpec>> for TrafficPolicy {
    fn from(d: Declared<TrafficPolicySpec>) -> Self {
        TrafficPolicy {
            metadata: d.metadata,
            spec: d.spec,
            status: d.status,
        }
    }
}

impl From<Declared<AuthorizationPolicySpec>> for AuthorizationPolicy {
    fn from(d: Declared<AuthorizationPolicySpec>) -> Self {
        AuthorizationPolicy {
            metadata: d.metadata,
            spec: d.spec,
            status: d.status,
        }
    }
}

impl From<Declared<PeerAuthenticationSpec>> for PeerAuthentication {
    fn from(d: Declared<PeerAuthenticationSpec>) -> Self {
        PeerAuthentication {
            metadata: d.metadata,
            spec: d.spec,
            status: d.status,
        }
    }
}

/// Istio's workload selector: `matchLabels` only.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Selects workloads whose labels include all of these; empty selects all.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

// Integers carry their Rust type's upper bound (`range(max = u32::MAX)`): a value
// the API server admits but serde cannot read would stall the kube registry's
// watch of the whole kind, not just this object.

/// A Go-style duration (see [`duration`]) as a schema pattern: a sequence of
/// decimal numbers, each with an optional fraction and a unit, or `0`. Overflow is
/// the one thing [`duration::parse`] rejects that this does not.
pub const DURATION_PATTERN: &str = r"^(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)$";

/// A Kubernetes namespace or Service name (RFC 1123 label), as [`is_dns_label`]
/// checks it.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// An HTTP header name (RFC 9110 token), as [`is_header_name`] checks it.
pub const HEADER_NAME_PATTERN: &str = r"^[A-Za-z0-9!#$%&'*+.^_|~`-]+$";

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
