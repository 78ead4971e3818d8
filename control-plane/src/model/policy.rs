//! Traffic and security policy: TrafficPolicy per Service; AuthorizationPolicy and
//! PeerAuthentication per workload, chosen by namespace and labels.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{MeshSnapshot, ValueMatch};

mod selection;

pub use selection::{PolicyScope, UNKNOWN_WORKLOAD_POLICY, UnknownWorkload, WorkloadLookup};

/// How clients of one Service balance, retry and time out (CRD `TrafficPolicy`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TrafficPolicy {
    /// `<namespace>/<name>` of the object it came from, for messages.
    pub source: String,
    pub load_balancer: LoadBalancer,
    /// `None`: the proxy's default (no retries beyond a failed connect).
    pub retries: Option<RetryPolicy>,
    pub timeouts: Timeouts,
    /// `None`: the proxy's default.
    pub outlier_detection: Option<OutlierDetection>,
    pub connection_limits: ConnectionLimits,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum LoadBalancer {
    /// Power of two choices over an EWMA of latency.
    #[default]
    P2cEwma,
    RoundRobin,
    LeastRequest,
    ConsistentHash(HashKey),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum HashKey {
    /// A request header name, lower case.
    Header(String),
    Cookie(String),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub attempts: u32,
    pub retry_on: Vec<RetryOn>,
    /// With [`RetryOn::RetriableStatusCodes`].
    pub status_codes: Vec<u16>,
    /// gRPC status names, upper case (`UNAVAILABLE`).
    pub grpc_statuses: Vec<String>,
    pub per_try_timeout: Option<Duration>,
    pub backoff: Option<Backoff>,
    pub budget: Option<RetryBudget>,
    pub retry_non_idempotent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    /// Any 5xx response.
    ServerError,
    /// 502, 503, 504.
    GatewayError,
    RetriableStatusCodes,
}

impl RetryOn {
    /// The name in the CRD and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::ServerError => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::RetriableStatusCodes => "retriable-status-codes",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Backoff {
    pub base_interval: Duration,
    pub max_interval: Duration,
}

/// Retries may add at most `ratio` of live traffic, plus `min_retries_per_second`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetryBudget {
    pub ratio: Ratio,
    pub min_retries_per_second: u32,
    pub ttl: Duration,
}

/// A finite number in (0, 1]; never NaN, hence `Eq`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, serde::Serialize)]
pub struct Ratio(f64);

impl Eq for Ratio {}

impl Ratio {
    pub fn new(value: f64) -> Option<Ratio> {
        (value > 0.0 && value <= 1.0).then_some(Ratio(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    pub request: Option<Duration>,
    pub idle: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionLimits {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
}

/// Who may call the workloads a policy selects (CRD `AuthorizationPolicy`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    /// `matchLabels`. Empty: every workload of the namespace, or of the mesh when the
    /// namespace is the mesh's root namespace (where a selector also spans namespaces).
    pub selector: BTreeMap<String, String>,
    pub action: AuthorizationAction,
    /// A request matching any rule matches the policy; no rules match nothing.
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AuthorizationAction {
    Allow,
    Deny,
}

/// Every non-empty list must match (AND); within a list any value may (OR).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationRule {
    /// SPIFFE IDs, exact or with one leading or trailing `*`.
    pub principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub ports: Vec<u16>,
    /// Upper-case HTTP methods.
    pub methods: Vec<String>,
    /// Exact, or a prefix when ending with `*`.
    pub paths: Vec<String>,
    /// Header names in lower case.
    pub headers: Vec<ValueMatch>,
}

impl AuthorizationPolicy {
    /// Whether the policy applies to a workload in `namespace` with `labels`, in a
    /// mesh whose root namespace is `root_namespace`.
    pub fn selects(
        &self,
        root_namespace: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        (self.namespace == root_namespace || self.namespace == namespace)
            && selector_matches(&self.selector, labels)
    }
}

/// Which mTLS a workload's inbound side accepts (CRD `PeerAuthentication`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `matchLabels`. Empty: namespace-wide, or mesh-wide in the root namespace.
    pub selector: BTreeMap<String, String>,
    pub mode: MtlsMode,
    /// Per workload (target) port; only with a selector.
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum MtlsMode {
    /// Inherit from the less specific policy.
    #[default]
    Unset,
    Strict,
    Permissive,
    Disable,
}

impl MtlsMode {
    /// Higher is stricter.
    fn strictness(self) -> u8 {
        match self {
            MtlsMode::Strict | MtlsMode::Unset => 2,
            MtlsMode::Permissive => 1,
            MtlsMode::Disable => 0,
        }
    }

    fn or(self, fallback: MtlsMode) -> MtlsMode {
        if self == MtlsMode::Unset {
            fallback
        } else {
            self
        }
    }
}

/// The PeerAuthentication that holds for one workload, precedence resolved: never
/// [`MtlsMode::Unset`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EffectivePeerAuthentication {
    pub mode: MtlsMode,
    /// Ports whose mode differs from `mode`.
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

impl EffectivePeerAuthentication {
    /// The mode on one of the workload's ports.
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.port_modes.get(&port).copied().unwrap_or(self.mode)
    }

    /// Of two, per port the stricter: for a proxy that may be either workload.
    pub(super) fn strictest(
        self,
        other: EffectivePeerAuthentication,
    ) -> EffectivePeerAuthentication {
        let stricter = |a: MtlsMode, b: MtlsMode| {
            if a.strictness() >= b.strictness() {
                a
            } else {
                b
            }
        };
        let mode = stricter(self.mode, other.mode);
        let ports = self.port_modes.keys().chain(other.port_modes.keys());
        let port_modes = ports
            .map(|&port| {
                let a = self.port_modes.get(&port).copied().unwrap_or(self.mode);
                let b = other.port_modes.get(&port).copied().unwrap_or(other.mode);
                (port, stricter(a, b))
            })
            .filter(|(_, m)| *m != mode)
            .collect();
        EffectivePeerAuthentication { mode, port_modes }
    }
}

pub(super) fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl MeshSnapshot {
    /// Precedence, most specific first: a port of the selecting policy, the
    /// selecting policy, the namespace's policy, the mesh's; an unset mode inherits
    /// the next. Default STRICT. Of several policies at one level, the first by
    /// name wins.
    pub fn effective_peer_authentication(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> EffectivePeerAuthentication {
        let policies = &self.peer_authentications;
        let workload = policies.iter().find(|p| {
            p.namespace == namespace
                && !p.selector.is_empty()
                && selector_matches(&p.selector, labels)
        });
        let level = |ns: &str| {
            policies
                .iter()
                .find(|p| p.namespace == ns && p.selector.is_empty())
                .map_or(MtlsMode::Unset, |p| p.mode)
        };
        let root = self.root_namespace.as_str();
        let mesh = level(root).or(MtlsMode::Strict);
        let namespace_mode = if namespace == root {
            mesh
        } else {
            level(namespace).or(mesh)
        };
        let mode = workload
            .map_or(MtlsMode::Unset, |p| p.mode)
            .or(namespace_mode);
        let port_modes = workload
            .map(|p| {
                p.port_modes
                    .iter()
                    .map(|(&port, &m)| (port, m.or(mode)))
                    .filter(|(_, m)| *m != mode)
                    .collect()
            })
            .unwrap_or_default();
        EffectivePeerAuthentication { mode, port_modes }
    }
}
