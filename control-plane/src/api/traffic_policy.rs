//! `TrafficPolicy` (trellis.io/v1alpha1): how clients of one Service balance,
//! retry, time out, eject failing endpoints and limit connections.
//!
//! ```yaml
//! apiVersion: trellis.io/v1alpha1
//! kind: TrafficPolicy
//! metadata: {name: echo, namespace: demo}
//! spec:
//!   targetRef: {kind: Service, name: echo}
//!   loadBalancer: {algorithm: P2C_EWMA}
//!   retries:
//!     attempts: 2
//!     retryOn: [gateway-error]
//!     perTryTimeout: 500ms
//!     budget: {ratio: 0.2}
//!   timeouts: {connect: 1s, request: 10s}
//! ```

use std::time::Duration;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Errors, FieldError, PolicyStatus, Services, name_of, namespace_of};
use crate::model::{self, ServiceKey};

/// How clients of one Service balance, retry, time out, eject failing endpoints
/// and limit connections. (The derive makes the object type, [`TrafficPolicy`].)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, CustomResource, JsonSchema)]
// Each `printcolumn(...)` repeats `type_ = "string"`, which is no duplicate.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "trellis.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "tp",
    category = "trellis",
    doc = "Load balancing, retries, timeouts, outlier detection and connection limits for one Service.",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(
        name = "Algorithm",
        type_ = "string",
        json_path = ".spec.loadBalancer.algorithm"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Accepted")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// The Service (in the policy's namespace) whose clients follow this policy.
    pub target_ref: TargetRef,
    /// Default: `P2C_EWMA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Default: no retries, except a connect failure before anything was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,
    /// Default: 5 consecutive failures eject for 30s, at most 50% of endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimitsSpec>,
}

/// A Service in the policy's namespace: `group` `""` or `core`, `kind` `Service`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern("^(core)?$"))]
    pub group: Option<String>,
    #[schemars(extend("enum" = ["Service"]))]
    pub kind: String,
    #[schemars(length(min = 1, max = 63), pattern(super::DNS_LABEL_PATTERN))]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new(
    "has(self.consistentHash) == (has(self.algorithm) && self.algorithm == 'CONSISTENT_HASH')"
).message("consistentHash is required with algorithm CONSISTENT_HASH, and only then"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<LbAlgorithm>,
    /// Required with `CONSISTENT_HASH`, and only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHashSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbAlgorithm {
    /// Power of two choices over an EWMA of latency.
    P2cEwma,
    RoundRobin,
    LeastRequest,
    ConsistentHash,
}

/// The hash key: exactly one of a request header or a cookie.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.header) != has(self.cookie)")
    .message("set exactly one of header and cookie"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::HEADER_NAME_PATTERN))]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::HEADER_NAME_PATTERN))]
    pub cookie: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new(
    "(has(self.retryOn) && 'retriable-status-codes' in self.retryOn) == \
     (has(self.statusCodes) && size(self.statusCodes) > 0)"
).message("statusCodes is required with retryOn retriable-status-codes, and only then"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetriesSpec {
    /// Attempts after the first; 0 disables retries.
    #[schemars(range(max = u32::MAX))]
    pub attempts: u32,
    /// When to retry. Default: `connect-failure`, `reset`, `gateway-error`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub retry_on: Vec<RetryOn>,
    /// Statuses for `retriable-status-codes` (100-599); given together with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 100, max = 599)))]
    pub status_codes: Vec<u16>,
    /// gRPC status names to retry, upper case: `UNAVAILABLE`, `RESOURCE_EXHAUSTED`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "grpc_statuses_schema")]
    pub grpc_statuses: Vec<String>,
    /// A duration such as `500ms`; default: none (the request timeout holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetSpec>,
    /// Also retry POST, PATCH and other non-idempotent requests. Default: false.
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    /// The connection to the endpoint could not be made.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The connection was reset before any response.
    #[serde(rename = "reset")]
    Reset,
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 or 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// A status listed in `statusCodes`.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
}

/// Exponential backoff between attempts, with jitter. Defaults: 25ms and 250ms.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    validation = Rule::new("!has(self.baseInterval) || duration(self.baseInterval) > duration('0s')")
        .message("baseInterval must be more than 0"),
    validation = Rule::new(
        "duration(has(self.maxInterval) ? self.maxInterval : '250ms') >= \
         duration(has(self.baseInterval) ? self.baseInterval : '25ms')"
    ).message("maxInterval must not be less than baseInterval (defaults: 25ms and 250ms)")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    pub base_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    pub max_interval: Option<String>,
}

/// Retries may add at most `ratio` of the live request rate, plus
/// `minRetriesPerSecond`, counted over `ttl`. Defaults: 0.2, 10, 10s.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSpec {
    /// In (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1), extend("exclusiveMinimum" = true))]
    pub ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = u32::MAX))]
    pub min_retries_per_second: Option<u32>,
    /// 1s to 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('60s')")
        .message("must be 1s to 60s"))]
    pub ttl: Option<String>,
}

/// Durations; unset or `0s`: none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// Establishing a connection to an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    pub connect: Option<String>,
    /// A whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    pub request: Option<String>,
    /// An idle pooled connection is closed after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    pub idle: Option<String>,
}

/// Ejects an endpoint after consecutive failures, for `baseEjectionTime` times the
/// number of ejections so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub consecutive_failures: Option<u32>,
    /// Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::DURATION_PATTERN))]
    pub base_ejection_time: Option<String>,
    /// 0-100; default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// Per client proxy and Service; unset: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionLimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub max_pending_requests: Option<u32>,
}

/// gRPC status names (`google.rpc.Code`), as `grpcStatuses` takes them.
pub const GRPC_STATUSES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// `grpcStatuses`: a list of [`GRPC_STATUSES`].
fn grpc_statuses_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "string", "enum": GRPC_STATUSES},
    })
}

impl TrafficPolicy {
    /// The Service this policy is for (it need not exist).
    pub fn target(&self) -> ServiceKey {
        ServiceKey {
            namespace: namespace_of(&self.metadata).to_owned(),
            name: self.spec.target_ref.name.clone(),
        }
    }

    /// Checks values, not references.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        self.to_model(None).map(|_| ())
    }

    /// The policy for [`Self::target`], which must be one of `services` if given.
    pub fn to_model(
        &self,
        services: Services<'_>,
    ) -> Result<model::TrafficPolicy, Vec<FieldError>> {
        let mut errors = Errors::default();
        let name = name_of(&self.metadata, &mut errors);
        let spec = &self.spec;
        let target = &spec.target_ref;
        if !matches!(target.group.as_deref(), None | Some("" | "core")) {
            errors.push(
                "spec.targetRef.group",
                "must be \"\" or \"core\" (a Service)",
            );
        }
        if target.kind != "Service" {
            errors.push(
                "spec.targetRef.kind",
                format!("{:?} is not supported: only Service", target.kind),
            );
        }
        if !super::is_dns_label(&target.name) {
            errors.push(
                "spec.targetRef.name",
                format!("{:?} is not a Service name", target.name),
            );
        } else if let Some(services) = services
            && !services.contains_key(&self.target())
        {
            errors.push(
                "spec.targetRef",
                format!("Service {} does not exist", self.target()),
            );
        }
        let load_balancer = load_balancer(spec.load_balancer.as_ref(), &mut errors);
        let retries = spec.retries.as_ref().and_then(|r| retries(r, &mut errors));
        let t = spec.timeouts.clone().unwrap_or_default();
        let timeouts = model::Timeouts {
            connect: nonzero(errors.duration("spec.timeouts.connect", t.connect.as_deref())),
            request: nonzero(errors.duration("spec.timeouts.request", t.request.as_deref())),
            idle: nonzero(errors.duration("spec.timeouts.idle", t.idle.as_deref())),
        };
        let outlier_detection = spec
            .outlier_detection
            .as_ref()
            .map(|o| outlier_detection(o, &mut errors));
        let limits = spec.connection_limits.clone().unwrap_or_default();
        let mut limit = |field: &str, v: Option<u32>| {
            if v == Some(0) {
                errors.push(
                    format!("spec.connectionLimits.{field}"),
                    "must be at least 1",
                );
            }
            v
        };
        let connection_limits = model::ConnectionLimits {
            max_connections: limit("maxConnections", limits.max_connections),
            max_pending_requests: limit("maxPendingRequests", limits.max_pending_requests),
        };
        let namespace = namespace_of(&self.metadata);
        errors.into_result(model::TrafficPolicy {
            source: format!("{namespace}/{name}"),
            load_balancer,
            retries,
            timeouts,
            outlier_detection,
            connection_limits,
        })
    }
}

fn nonzero(d: Option<Duration>) -> Option<Duration> {
    d.filter(|d| !d.is_zero())
}

fn load_balancer(spec: Option<&LoadBalancerSpec>, errors: &mut Errors) -> model::LoadBalancer {
    let Some(spec) = spec else {
        return model::LoadBalancer::default();
    };
    let algorithm = spec.algorithm.unwrap_or(LbAlgorithm::P2cEwma);
    let field = "spec.loadBalancer.consistentHash";
    match (algorithm, &spec.consistent_hash) {
        (LbAlgorithm::ConsistentHash, None) => {
            errors.push(field, "is required with algorithm CONSISTENT_HASH");
            model::LoadBalancer::default()
        }
        (LbAlgorithm::ConsistentHash, Some(hash)) => {
            let key = match (&hash.header, &hash.cookie) {
                (Some(h), None) if super::is_header_name(h) => {
                    Some(model::HashKey::Header(h.to_ascii_lowercase()))
                }
                (Some(h), None) => {
                    errors.push(
                        format!("{field}.header"),
                        format!("{h:?} is not a header name"),
                    );
                    None
                }
                (None, Some(c)) if super::is_header_name(c) && !c.contains('=') => {
                    Some(model::HashKey::Cookie(c.clone()))
                }
                (None, Some(c)) => {
                    errors.push(
                        format!("{field}.cookie"),
                        format!("{c:?} is not a cookie name"),
                    );
                    None
                }
                _ => {
                    errors.push(field, "set exactly one of header and cookie");
                    None
                }
            };
            key.map_or_else(
                model::LoadBalancer::default,
                model::LoadBalancer::ConsistentHash,
            )
        }
        (_, Some(_)) => {
            errors.push(field, "is only for algorithm CONSISTENT_HASH");
            model::LoadBalancer::default()
        }
        (LbAlgorithm::P2cEwma, None) => model::LoadBalancer::P2cEwma,
        (LbAlgorithm::RoundRobin, None) => model::LoadBalancer::RoundRobin,
        (LbAlgorithm::LeastRequest, None) => model::LoadBalancer::LeastRequest,
    }
}

fn retries(spec: &RetriesSpec, errors: &mut Errors) -> Option<model::RetryPolicy> {
    let p = "spec.retries";
    let mut retry_on: Vec<model::RetryOn> = spec
        .retry_on
        .iter()
        .map(|r| match r {
            RetryOn::ConnectFailure => model::RetryOn::ConnectFailure,
            RetryOn::Reset => model::RetryOn::Reset,
            RetryOn::ServerError => model::RetryOn::ServerError,
            RetryOn::GatewayError => model::RetryOn::GatewayError,
            RetryOn::RetriableStatusCodes => model::RetryOn::RetriableStatusCodes,
        })
        .collect();
    if retry_on.is_empty() {
        retry_on = vec![
            model::RetryOn::ConnectFailure,
            model::RetryOn::Reset,
            model::RetryOn::GatewayError,
        ];
    }
    if spec.retry_on.len() > 5 {
        errors.push(format!("{p}.retryOn"), "at most 5 (each condition once)");
    }
    retry_on.sort();
    retry_on.dedup();
    let by_codes = retry_on.contains(&model::RetryOn::RetriableStatusCodes);
    match (by_codes, spec.status_codes.is_empty()) {
        (true, true) => errors.push(
            format!("{p}.statusCodes"),
            "is required with retryOn retriable-status-codes",
        ),
        (false, false) => errors.push(
            format!("{p}.statusCodes"),
            "needs retriable-status-codes in retryOn",
        ),
        _ => {}
    }
    for (i, code) in spec.status_codes.iter().enumerate() {
        if !(100..=599).contains(code) {
            errors.push(
                format!("{p}.statusCodes[{i}]"),
                format!("{code} is not an HTTP status (100-599)"),
            );
        }
    }
    for (i, status) in spec.grpc_statuses.iter().enumerate() {
        if !GRPC_STATUSES.contains(&status.as_str()) {
            errors.push(
                format!("{p}.grpcStatuses[{i}]"),
                format!("{status:?} is not a gRPC status name (such as UNAVAILABLE)"),
            );
        }
    }
    let per_try_timeout = nonzero(errors.duration(
        &format!("{p}.perTryTimeout"),
        spec.per_try_timeout.as_deref(),
    ));
    let backoff = spec.backoff.as_ref().map(|b| {
        let ms = Duration::from_millis;
        let base = errors.duration(
            &format!("{p}.backoff.baseInterval"),
            b.base_interval.as_deref(),
        );
        let max = errors.duration(
            &format!("{p}.backoff.maxInterval"),
            b.max_interval.as_deref(),
        );
        let (base, max) = (base.unwrap_or(ms(25)), max.unwrap_or(ms(250)));
        if base.is_zero() {
            errors.push(format!("{p}.backoff.baseInterval"), "must be more than 0");
        }
        if max < base {
            errors.push(
                format!("{p}.backoff.maxInterval"),
                "must not be less than baseInterval",
            );
        }
        model::Backoff {
            base_interval: base,
            max_interval: max,
        }
    });
    let budget = spec.budget.as_ref().and_then(|b| {
        let field = format!("{p}.budget.ratio");
        let ratio = b.ratio.unwrap_or(0.2);
        let ratio = model::Ratio::new(ratio).or_else(|| {
            errors.push(field, format!("{ratio} is not in (0, 1]"));
            None
        });
        let field = format!("{p}.budget.ttl");
        let ttl = errors
            .duration(&field, b.ttl.as_deref())
            .unwrap_or(Duration::from_secs(10));
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            errors.push(field, "must be 1s to 60s");
        }
        Some(model::RetryBudget {
            ratio: ratio?,
            min_retries_per_second: b.min_retries_per_second.unwrap_or(10),
            ttl,
        })
    });
    if spec.attempts == 0 {
        // Retries off: the rest was still checked.
        return None;
    }
    Some(model::RetryPolicy {
        attempts: spec.attempts,
        retry_on,
        status_codes: spec.status_codes.clone(),
        grpc_statuses: spec.grpc_statuses.clone(),
        per_try_timeout,
        backoff,
        budget,
        retry_non_idempotent: spec.retry_non_idempotent,
    })
}

fn outlier_detection(spec: &OutlierDetectionSpec, errors: &mut Errors) -> model::OutlierDetection {
    let p = "spec.outlierDetection";
    let consecutive_failures = spec.consecutive_failures.unwrap_or(5);
    if consecutive_failures == 0 {
        errors.push(format!("{p}.consecutiveFailures"), "must be at least 1");
    }
    let field = format!("{p}.baseEjectionTime");
    let base_ejection_time = errors
        .duration(&field, spec.base_ejection_time.as_deref())
        .unwrap_or(Duration::from_secs(30));
    if base_ejection_time.is_zero() {
        errors.push(field, "must be more than 0");
    }
    let max_ejection_percent = spec.max_ejection_percent.unwrap_or(50);
    if max_ejection_percent > 100 {
        errors.push(format!("{p}.maxEjectionPercent"), "must be 0 to 100");
    }
    model::OutlierDetection {
        consecutive_failures,
        base_ejection_time,
        max_ejection_percent,
    }
}
