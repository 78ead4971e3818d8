//! TrafficPolicy as the data path uses it: durations parsed, conditions as flags, the
//! retry budget (tower's `TpsBudget`: a ratio of live traffic plus a floor) shared by
//! every request to the service.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower::retry::budget::{Budget, TpsBudget};
use trellis_proto::discovery::v1 as pb;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LbAlgorithm {
    P2cEwma,
    RoundRobin,
    LeastRequest,
    ConsistentHash {
        header: Option<HeaderName>,
        cookie: Option<String>,
    },
}

#[derive(Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub status_codes: Vec<u16>,
    /// gRPC status codes (numbers) that may be retried.
    pub grpc_statuses: Vec<u32>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub retry_non_idempotent: bool,
    pub budget: Arc<TpsBudget>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Debug)]
pub struct TrafficPolicy {
    pub load_balancer: LbAlgorithm,
    pub retries: Option<RetryPolicy>,
    pub connect_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub outlier: Outlier,
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
}

/// What a service gets without a TrafficPolicy: P2C-EWMA, no retries except a
/// connect failure before anything was sent, default outlier detection.
impl Default for TrafficPolicy {
    fn default() -> Self {
        TrafficPolicy {
            load_balancer: LbAlgorithm::P2cEwma,
            retries: None,
            connect_timeout: None,
            request_timeout: None,
            idle_timeout: None,
            outlier: Outlier::default(),
            max_connections: None,
            max_pending_requests: None,
        }
    }
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("traffic policy for {service}: {reason}")]
pub struct PolicyError {
    pub service: String,
    pub reason: String,
}

fn ms(v: u64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v))
}

/// gRPC status names as in the spec.
fn grpc_code(name: &str) -> Option<u32> {
    const CODES: [&str; 17] = [
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
    CODES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
        .map(|i| i as u32)
}

impl TrafficPolicy {
    pub fn compile(p: &pb::TrafficPolicy) -> Result<Self, PolicyError> {
        let service = format!("{}.{}", p.service, p.namespace);
        let err = |reason: String| PolicyError {
            service: service.clone(),
            reason,
        };
        let load_balancer = match &p.load_balancer {
            None => LbAlgorithm::P2cEwma,
            Some(lb) => match pb::load_balancer::Algorithm::try_from(lb.algorithm) {
                Ok(pb::load_balancer::Algorithm::P2cEwma) => LbAlgorithm::P2cEwma,
                Ok(pb::load_balancer::Algorithm::RoundRobin) => LbAlgorithm::RoundRobin,
                Ok(pb::load_balancer::Algorithm::LeastRequest) => LbAlgorithm::LeastRequest,
                Ok(pb::load_balancer::Algorithm::ConsistentHash) => {
                    let header = if lb.hash_header.is_empty() {
                        None
                    } else {
                        Some(
                            HeaderName::from_bytes(lb.hash_header.as_bytes())
                                .map_err(|_| err(format!("hash header {:?}", lb.hash_header)))?,
                        )
                    };
                    let cookie = (!lb.hash_cookie.is_empty()).then(|| lb.hash_cookie.clone());
                    if header.is_none() && cookie.is_none() {
                        return Err(err("consistent hashing needs a header or a cookie".into()));
                    }
                    LbAlgorithm::ConsistentHash { header, cookie }
                }
                Err(_) => return Err(err(format!("unknown algorithm {}", lb.algorithm))),
            },
        };
        let retries = match &p.retries {
            Some(r) if r.attempts > 0 => {
                let mut policy = RetryPolicy {
                    attempts: r.attempts,
                    on_connect_failure: false,
                    on_reset: false,
                    on_5xx: false,
                    on_gateway_error: false,
                    status_codes: Vec::new(),
                    grpc_statuses: Vec::new(),
                    per_try_timeout: ms(r.per_try_timeout_ms),
                    backoff_base: ms(r.backoff_base_ms).unwrap_or(Duration::from_millis(25)),
                    backoff_max: ms(r.backoff_max_ms).unwrap_or(Duration::from_millis(250)),
                    retry_non_idempotent: r.retry_non_idempotent,
                    budget: Arc::new(budget(r.budget.as_ref()).map_err(err)?),
                };
                for condition in &r.retry_on {
                    match condition.as_str() {
                        "connect-failure" => policy.on_connect_failure = true,
                        "reset" => policy.on_reset = true,
                        "5xx" => policy.on_5xx = true,
                        "gateway-error" => policy.on_gateway_error = true,
                        "retriable-status-codes" => {}
                        other => return Err(err(format!("unknown retry condition {other:?}"))),
                    }
                }
                for code in &r.status_codes {
                    policy.status_codes.push(
                        u16::try_from(*code)
                            .ok()
                            .filter(|c| (100..600).contains(c))
                            .ok_or_else(|| err(format!("status code {code}")))?,
                    );
                }
                for name in &r.grpc_statuses {
                    policy
                        .grpc_statuses
                        .push(grpc_code(name).ok_or_else(|| err(format!("gRPC status {name:?}")))?);
                }
                Some(policy)
            }
            _ => None,
        };
        let timeouts = p.timeouts.unwrap_or_default();
        let outlier = match &p.outlier_detection {
            None => Outlier::default(),
            Some(o) => Outlier {
                consecutive_failures: if o.consecutive_failures == 0 {
                    5
                } else {
                    o.consecutive_failures
                },
                base_ejection: ms(o.base_ejection_ms).unwrap_or(Duration::from_secs(30)),
                max_ejection_percent: o.max_ejection_percent.min(100),
            },
        };
        let limits = p.limits.unwrap_or_default();
        let nonzero = |v: u32| (v > 0).then_some(v);
        Ok(TrafficPolicy {
            load_balancer,
            retries,
            connect_timeout: ms(timeouts.connect_ms),
            request_timeout: ms(timeouts.request_ms),
            idle_timeout: ms(timeouts.idle_ms),
            outlier,
            max_connections: nonzero(limits.max_connections),
            max_pending_requests: nonzero(limits.max_pending_requests),
        })
    }
}

fn budget(b: Option<&pb::RetryBudget>) -> Result<TpsBudget, String> {
    let (ratio, floor, ttl) = match b {
        None => (0.2, 10, Duration::from_secs(10)),
        Some(b) => (
            if b.ratio == 0.0 { 0.2 } else { b.ratio },
            b.min_retries_per_second,
            ms(b.ttl_ms).unwrap_or(Duration::from_secs(10)),
        ),
    };
    if !(0.0..=1000.0).contains(&ratio) || !ratio.is_finite() {
        return Err(format!("retry budget ratio {ratio} is out of range"));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
        return Err(format!("retry budget ttl {ttl:?} must be 1 s to 60 s"));
    }
    Ok(TpsBudget::new(ttl, floor, ratio as f32))
}

impl RetryPolicy {
    /// Counts a first attempt: it earns retries for later.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }

    pub fn retries_status(&self, status: http::StatusCode) -> bool {
        let code = status.as_u16();
        (self.on_5xx && status.is_server_error())
            || (self.on_gateway_error && matches!(code, 502..=504))
            || self.status_codes.contains(&code)
    }

    /// Exponential backoff with full jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << retry.min(16))
            .min(self.backoff_max);
        Duration::from_micros(rand::random_range(0..=exp.as_micros() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_retries_and_refuses_nonsense() {
        let p = pb::TrafficPolicy {
            service: "echo".into(),
            namespace: "default".into(),
            retries: Some(pb::RetryPolicy {
                attempts: 2,
                retry_on: vec!["gateway-error".into(), "retriable-status-codes".into()],
                status_codes: vec![409],
                grpc_statuses: vec!["UNAVAILABLE".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let compiled = TrafficPolicy::compile(&p).unwrap();
        let r = compiled.retries.unwrap();
        assert!(r.retries_status(http::StatusCode::BAD_GATEWAY));
        assert!(r.retries_status(http::StatusCode::CONFLICT));
        assert!(!r.retries_status(http::StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(r.grpc_statuses, vec![14]);

        let mut bad = p.clone();
        if let Some(r) = bad.retries.as_mut() {
            r.retry_on = vec!["sometimes".into()];
        }
        assert!(TrafficPolicy::compile(&bad).is_err());
    }

    #[test]
    fn the_budget_caps_retries_at_its_ratio() {
        let p = TrafficPolicy::compile(&pb::TrafficPolicy {
            service: "s".into(),
            namespace: "n".into(),
            retries: Some(pb::RetryPolicy {
                attempts: 3,
                retry_on: vec!["5xx".into()],
                budget: Some(pb::RetryBudget {
                    ratio: 0.2,
                    min_retries_per_second: 0,
                    ttl_ms: 10_000,
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        let r = p.retries.unwrap();
        let mut retries = 0;
        for _ in 0..1000 {
            r.deposit();
            while r.withdraw() {
                retries += 1;
            }
        }
        assert!(retries <= 200, "{retries}");
        assert!(retries >= 150, "{retries}");
    }
}
