//! Namespace-wide sidecar injection: a mutating admission webhook, and the same
//! mutation offline for manifests (`trellisctl inject`).
//!
//! Rules:
//! - Pods in a namespace labelled `trellis.io/inject=enabled` (or `true`) are injected; the
//!   webhook configuration selects those namespaces, and [`review`] checks the label
//!   again when it knows the namespace.
//! - A Pod annotated `trellis.io/inject: disabled` (or `"false"`) is left alone, and so is a
//!   host-network Pod (its iptables would be the node's).
//! - A Pod already injected (annotation `trellis.io/status`, or a `trellis-proxy`
//!   container) gets no patch: injection is idempotent.
//! - The patch adds the `trellis-init` init container (iptables, NET_ADMIN and NET_RAW
//!   only), the proxy as a native sidecar (`restartPolicy: Always`, UID 1337,
//!   read-only root, requests and limits, startup/readiness/liveness probes on 15020),
//!   the projected token volume (audience `trellis-ca`), the control plane's root
//!   (the ConfigMap `trellis-ca-root`, see [`ca_root`]), and rewrites the app's HTTP, TCP
//!   and gRPC probes to go through the proxy (see [`probes`]).
//! - Unless the Pod has its own `prometheus.io/*` annotations, it gets the three that
//!   point Prometheus at the proxy's `:15020/metrics`
//!   ([`annotations::PROMETHEUS_SCRAPE`]).

pub mod ca_root;
pub mod probes;
pub mod sidecar;
pub mod webhook;

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::{Value, json};

use crate::events::MeshEvent;

/// Annotations and labels the injector reads and writes.
pub mod annotations {
    /// Namespace label that enables injection: `enabled` or `true` (see
    /// [`super::injection_setting`]).
    pub const INJECT_LABEL: &str = "trellis.io/inject";
    /// Pod annotation; `disabled` or `"false"` opts the Pod out.
    pub const INJECT: &str = "trellis.io/inject";
    /// Set on injected Pods.
    pub const STATUS: &str = "trellis.io/status";
    pub const PROXY_CPU: &str = "trellis.io/proxy-cpu";
    pub const PROXY_MEMORY: &str = "trellis.io/proxy-memory";
    pub const PROXY_CPU_LIMIT: &str = "trellis.io/proxy-cpu-limit";
    pub const PROXY_MEMORY_LIMIT: &str = "trellis.io/proxy-memory-limit";
    pub const EXCLUDE_INBOUND_PORTS: &str = "trellis.io/exclude-inbound-ports";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "trellis.io/exclude-outbound-ports";
    /// `"false"` keeps a Pod's own Prometheus annotations as they are instead of
    /// merging its app's metrics behind the proxy's (see [`PROMETHEUS_SCRAPE`]).
    pub const MERGE_METRICS: &str = "trellis.io/merge-metrics";
    /// Prometheus' conventional scrape annotations, as the injector sets them: the
    /// proxy's `/metrics` on its health port (15020, outside the inbound redirect, so
    /// a Prometheus outside the mesh can scrape it under STRICT mTLS). A Pod that
    /// pointed Prometheus at its app (`prometheus.io/port`) gets them too, and the
    /// proxy serves the app's metrics with its own (its annotations are saved in
    /// the proxy's `TRELLIS_APP_METRICS`), as Istio merges metrics; unless it
    /// opts out ([`MERGE_METRICS`]), turned scraping off, or scrapes over https.
    pub const PROMETHEUS_SCRAPE: [(&str, &str); 3] = [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "15020"),
        ("prometheus.io/path", "/metrics"),
    ];
}

/// The proxy's default requests and limits (Kubernetes quantities).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
}

impl Default for ProxyResources {
    fn default() -> Self {
        ProxyResources {
            cpu_request: "50m".into(),
            memory_request: "64Mi".into(),
            cpu_limit: "1".into(),
            memory_limit: "256Mi".into(),
        }
    }
}

/// What the webhook does when it cannot decide (a request it cannot read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Admit the Pod uninjected (the MutatingWebhookConfiguration says `Ignore`).
    Ignore,
    /// Refuse the Pod (`Fail`): nothing runs outside the mesh by accident. The
    /// default, as a mesh that fails open hands out plaintext silently.
    #[default]
    Fail,
}

impl FailurePolicy {
    /// The `failurePolicy` value for the MutatingWebhookConfiguration.
    pub fn as_kubernetes(self) -> &'static str {
        match self {
            FailurePolicy::Ignore => "Ignore",
            FailurePolicy::Fail => "Fail",
        }
    }
}

/// The sidecar image (distroless: only the proxy).
pub const DEFAULT_PROXY_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-proxy:latest";
/// The iptables init container's image (`deploy/docker/Dockerfile.init`: the
/// proxy binary with iptables).
pub const DEFAULT_INIT_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-proxy-init:latest";

#[derive(Clone, Debug)]
pub struct InjectorSettings {
    /// The sidecar's image.
    pub proxy_image: String,
    /// The iptables init container's image; it must have iptables.
    pub init_image: String,
    pub trust_domain: String,
    /// The control plane's gRPC address as Pods dial it.
    pub control_addr: String,
    pub control_server_name: String,
    pub resources: ProxyResources,
    pub failure_policy: FailurePolicy,
    /// Mesh-wide tracing, passed to every injected proxy; off when `None`.
    pub tracing: Option<MeshTracing>,
}

/// Where every sidecar sends its spans, and how many new traces it keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshTracing {
    /// The collector's OTLP/gRPC endpoint, `http://host:4317`.
    pub otlp_endpoint: String,
    /// Percent of new traces recorded.
    pub sampling_percent: f64,
}

impl Default for InjectorSettings {
    fn default() -> Self {
        InjectorSettings {
            proxy_image: DEFAULT_PROXY_IMAGE.into(),
            init_image: DEFAULT_INIT_IMAGE.into(),
            trust_domain: trellis_identity::DEFAULT_TRUST_DOMAIN.into(),
            control_addr: "trellis-control.trellis-system.svc:15010".into(),
            control_server_name: "trellis-control.trellis-system.svc".into(),
            resources: ProxyResources::default(),
            failure_policy: FailurePolicy::default(),
            tracing: None,
        }
    }
}

/// Why a Pod was not injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    NamespaceNotEnabled,
    OptedOut,
    AlreadyInjected,
    HostNetwork,
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("the object is not a Pod: {0}")]
    NotAPod(serde_json::Error),
    #[error("building the patch: {0}")]
    Patch(serde_json::Error),
    /// iptables leaves UID 1337's traffic alone (it is the proxy's), so an app
    /// running as it would bypass the mesh: refused whatever the failure policy.
    #[error(
        "container {container:?} runs as UID {uid}, the mesh proxy's UID: its traffic would bypass the proxy; run it as another user (securityContext.runAsUser)",
        uid = sidecar::PROXY_UID
    )]
    ProxyUid { container: String },
}

/// A `trellis.io/inject` value, the same for the namespace label and the Pod
/// annotation (as Linkerd users expect): `enabled`/`true` is on, `disabled`/`false`
/// off, anything else says nothing.
pub fn injection_setting(value: &str) -> Option<bool> {
    match value {
        "enabled" | "true" => Some(true),
        "disabled" | "false" => Some(false),
        _ => None,
    }
}

/// The namespace label check: `trellis.io/inject=enabled` (or `true`).
pub fn namespace_enabled(labels: &BTreeMap<String, String>) -> bool {
    labels
        .get(annotations::INJECT_LABEL)
        .and_then(|v| injection_setting(v))
        == Some(true)
}

/// The JSON patch (relative to `prefix`, `""` for a Pod or `/spec/template` for a
/// workload's template) that injects `pod`, or why it is skipped.
pub fn pod_patch(
    pod: &Value,
    prefix: &str,
    settings: &InjectorSettings,
) -> Result<Result<json_patch::Patch, Skip>, InjectError> {
    let typed: Pod = serde_json::from_value(pod.clone()).map_err(InjectError::NotAPod)?;
    let pod_annotations = typed.metadata.annotations.clone().unwrap_or_default();
    let spec = typed.spec.clone().unwrap_or_default();
    let setting = pod_annotations.get(annotations::INJECT);
    if setting.and_then(|v| injection_setting(v)) == Some(false) {
        return Ok(Err(Skip::OptedOut));
    }
    if pod_annotations.contains_key(annotations::STATUS) || sidecar::has_proxy(&spec) {
        return Ok(Err(Skip::AlreadyInjected));
    }
    if spec.host_network == Some(true) {
        return Ok(Err(Skip::HostNetwork));
    }

    if let Some(container) = runs_as_proxy_uid(&spec) {
        return Err(InjectError::ProxyUid { container });
    }

    let tuning = sidecar::Tuning::new(settings, &pod_annotations);
    let (rewrites, originals) = probes::rewrites(&spec.containers);
    let app_probes = (!originals.is_empty())
        .then(|| serde_json::to_string(&originals))
        .transpose()
        .map_err(InjectError::Patch)?;
    let (scrape, app_metrics) = scrape_annotations(&pod_annotations)?;
    let proxy = to_json(&sidecar::proxy_container(
        settings,
        &tuning,
        app_probes,
        app_metrics,
    ))?;
    let init = to_json(&sidecar::init_container(settings, &tuning))?;
    let volumes = to_json(&sidecar::volumes())?;

    let mut ops = Vec::new();
    let add = |path: String, value: Value| json!({"op": "add", "path": path, "value": value});
    let mut new_annotations = vec![(annotations::STATUS, "injected")];
    if scrape {
        new_annotations.extend(annotations::PROMETHEUS_SCRAPE);
    }
    if pod.get("metadata").is_none() {
        let map: BTreeMap<_, _> = new_annotations.into_iter().collect();
        ops.push(add(
            format!("{prefix}/metadata"),
            json!({ "annotations": map }),
        ));
    } else if typed.metadata.annotations.is_none() {
        let map: BTreeMap<_, _> = new_annotations.into_iter().collect();
        ops.push(add(format!("{prefix}/metadata/annotations"), json!(map)));
    } else {
        for (k, v) in new_annotations {
            let path = format!("{prefix}/metadata/annotations/{}", escape(k));
            ops.push(add(path, json!(v)));
        }
    }
    // Init containers run in order: iptables first, then the proxy, then the app's.
    if spec.init_containers.is_none() {
        ops.push(add(
            format!("{prefix}/spec/initContainers"),
            json!([init, proxy]),
        ));
    } else {
        ops.push(add(format!("{prefix}/spec/initContainers/0"), proxy));
        ops.push(add(format!("{prefix}/spec/initContainers/0"), init));
    }
    if spec.volumes.is_none() {
        ops.push(add(format!("{prefix}/spec/volumes"), volumes));
    } else if let Value::Array(list) = volumes {
        for v in list {
            ops.push(add(format!("{prefix}/spec/volumes/-"), v));
        }
    }
    for r in rewrites {
        ops.push(json!({
            "op": "replace",
            "path": format!("{prefix}/spec/containers/{}/{}", r.container, r.field),
            "value": r.probe,
        }));
    }
    let patch = serde_json::from_value(Value::Array(ops)).map_err(InjectError::Patch)?;
    Ok(Ok(patch))
}

/// The proxy's env carrying the Pod's own scrape annotations (JSON), for merging.
pub const APP_METRICS_ENV: &str = "TRELLIS_APP_METRICS";

/// Whether to point Prometheus at the proxy, and the Pod's own scrape annotations
/// to hand the proxy when its app's metrics are to be merged.
fn scrape_annotations(
    pod: &BTreeMap<String, String>,
) -> Result<(bool, Option<String>), InjectError> {
    let own: BTreeMap<&str, &str> = annotations::PROMETHEUS_SCRAPE
        .iter()
        .chain(&[("prometheus.io/scheme", "")])
        .filter_map(|(key, _)| pod.get(*key).map(|v| (*key, v.as_str())))
        .collect();
    if own.is_empty() {
        return Ok((true, None));
    }
    let merge = pod.get(annotations::MERGE_METRICS).map(String::as_str) != Some("false")
        && own.get("prometheus.io/scrape") != Some(&"false")
        && own.contains_key("prometheus.io/port")
        && own
            .get("prometheus.io/scheme")
            .is_none_or(|s| s.eq_ignore_ascii_case("http"));
    if !merge {
        return Ok((false, None));
    }
    let saved = serde_json::to_string(&own).map_err(InjectError::Patch)?;
    Ok((true, Some(saved)))
}

/// The first app container (or init container) that would run as the proxy's UID,
/// by its own `runAsUser` or else the Pod's.
fn runs_as_proxy_uid(spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<String> {
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| {
            let uid = c.security_context.as_ref().and_then(|s| s.run_as_user);
            uid.or(pod_uid) == Some(sidecar::PROXY_UID)
        })
        .map(|c| c.name.clone())
}

/// JSON Pointer escaping of one path segment (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value, InjectError> {
    serde_json::to_value(value).map_err(InjectError::Patch)
}

/// The webhook's decision for one `AdmissionReview` (JSON in, JSON out).
///
/// `namespace_labels` are the labels of the Pod's namespace when the registry knows
/// it; `None` trusts the webhook's namespace selector (a namespace created a moment
/// ago may not have reached the registry yet).
pub fn review(
    review: Value,
    namespace_labels: Option<&BTreeMap<String, String>>,
    settings: &InjectorSettings,
) -> Value {
    review_with_event(review, namespace_labels, settings).0
}

/// [`review`], and the Event to record when a Pod is refused (on the Pod, or on its
/// controller while the Pod has no name yet).
pub fn review_with_event(
    review: Value,
    namespace_labels: Option<&BTreeMap<String, String>>,
    settings: &InjectorSettings,
) -> (Value, Option<MeshEvent>) {
    let (mut response, event) = match decide(review, namespace_labels, settings) {
        Ok(decided) => decided,
        Err(reason) => {
            tracing::warn!(%reason, "admission request not understood");
            let mut response = AdmissionResponse::invalid(&reason);
            // Ignore: admit uninjected (the request's uid is unknown here, so the
            // API server applies its own failurePolicy to the malformed answer).
            response.allowed = settings.failure_policy == FailurePolicy::Ignore;
            (response, None)
        }
    };
    // kube-core serializes the patch bytes as a JSON array of numbers; the API
    // documents a base64 string (Go's []byte), which is what we send.
    let patch = response.patch.take();
    let mut answer = serde_json::to_value(response.into_review()).unwrap_or_else(|e| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "response": {"uid": "", "allowed": false, "status": {"message": e.to_string()}}})
    });
    if let (Some(patch), Some(response)) = (patch, answer.get_mut("response")) {
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    (answer, event)
}

fn decide(
    review: Value,
    namespace_labels: Option<&BTreeMap<String, String>>,
    settings: &InjectorSettings,
) -> Result<(AdmissionResponse, Option<MeshEvent>), String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(review).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|e| format!("no request: {e}"))?;
    let response = AdmissionResponse::from(&request);
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    let (true, Operation::Create, Some(object)) = (is_pod, &request.operation, &request.object)
    else {
        return Ok((response, None));
    };
    let namespace = request.namespace.as_deref().unwrap_or_default();
    let pod_name = object
        .metadata
        .name
        .as_deref()
        .or(object.metadata.generate_name.as_deref())
        .unwrap_or_default();
    if namespace_labels.is_some_and(|l| !namespace_enabled(l)) {
        tracing::debug!(
            namespace,
            pod = pod_name,
            "not injected: namespace not enabled"
        );
        return Ok((response, None));
    }
    let pod = serde_json::to_value(object).map_err(|e| e.to_string())?;
    let refusal = |reason: &str, note: String| {
        let regarding = crate::events::admitted_pod_reference(namespace, &object.metadata)?;
        Some(MeshEvent {
            regarding,
            warning: true,
            reason: reason.to_owned(),
            action: "Inject",
            note,
        })
    };
    match pod_patch(&pod, "", settings) {
        Ok(Ok(patch)) => {
            tracing::info!(namespace, pod = pod_name, "injecting the proxy");
            let answer = response.clone().with_patch(patch);
            Ok(match answer {
                Ok(answer) => (answer, None),
                Err(e) => {
                    let event = refusal("InjectionFailed", e.to_string());
                    (failed(response, settings, e.to_string()), event)
                }
            })
        }
        Ok(Err(skip)) => {
            tracing::debug!(namespace, pod = pod_name, ?skip, "not injected");
            Ok((response, None))
        }
        Err(refused @ InjectError::ProxyUid { .. }) => {
            tracing::info!(namespace, pod = pod_name, reason = %refused, "pod refused");
            let message = format!("trellis: {refused}");
            let event = refusal("PodRefused", message.clone());
            Ok((response.deny(message), event))
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(namespace, pod = pod_name, %reason, "injection failed");
            let event = refusal("InjectionFailed", reason.clone());
            Ok((failed(response, settings, reason), event))
        }
    }
}

/// The answer when injection itself fails, by the failure policy.
fn failed(
    response: AdmissionResponse,
    settings: &InjectorSettings,
    reason: String,
) -> AdmissionResponse {
    match settings.failure_policy {
        FailurePolicy::Fail => response.deny(format!("trellis injection failed: {reason}")),
        FailurePolicy::Ignore => {
            let mut response = response;
            response.warnings = Some(vec![format!("not injected into the mesh: {reason}")]);
            response
        }
    }
}

#[cfg(test)]
mod tests;
