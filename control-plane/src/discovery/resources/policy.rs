//! Routes and policies of the model as protobuf messages (`traffic.proto`).
//!
//! Durations travel as milliseconds, 0 meaning unset; the proxy applies its own
//! defaults to unset values, so the model's `None`s stay unset here.

use std::time::Duration;

use trellis_proto::discovery::v1 as pb;

use crate::model::{
    AuthorizationAction, AuthorizationPolicy, EffectivePeerAuthentication, HashKey, HeaderModifier,
    HttpRouteRule, LoadBalancer, MtlsMode, PathMatch, ServiceKey, StringMatch, TrafficPolicy,
    ValueMatch,
};

/// The routes of `service` for a proxy in `namespace`: the consumer routes of that
/// namespace if it has any for the service (GAMMA), else the producer routes (those
/// in the service's own namespace). `None`: no routes, the proxy's default applies.
pub(super) fn route_table(
    service: &ServiceKey,
    rules: &[HttpRouteRule],
    namespace: &str,
) -> Option<pb::RouteTable> {
    let from = |ns: &str| {
        rules
            .iter()
            .filter(|r| r.origin.namespace == ns)
            .map(http_route)
            .collect::<Vec<_>>()
    };
    let mut routes = if namespace == service.namespace {
        Vec::new()
    } else {
        from(namespace)
    };
    if routes.is_empty() {
        routes = from(&service.namespace);
    }
    (!routes.is_empty()).then(|| pb::RouteTable {
        service: service.name.clone(),
        namespace: service.namespace.clone(),
        routes,
    })
}

fn http_route(rule: &HttpRouteRule) -> pb::HttpRoute {
    let m = &rule.request_match;
    let (kind, value) = match &m.path {
        PathMatch::Exact(v) => (pb::path_match::Kind::Exact, v),
        PathMatch::Prefix(v) => (pb::path_match::Kind::Prefix, v),
        PathMatch::Regex(v) => (pb::path_match::Kind::Regex, v),
    };
    pb::HttpRoute {
        name: rule.name(),
        port: rule.port.map_or(0, u32::from),
        matches: vec![pb::HttpMatch {
            path: Some(pb::PathMatch {
                kind: kind as i32,
                value: value.clone(),
            }),
            headers: m.headers.iter().map(value_match).collect(),
            query_params: m.query_params.iter().map(value_match).collect(),
            method: m.method.clone().unwrap_or_default(),
        }],
        request_headers: header_modifier(&rule.request_headers),
        response_headers: header_modifier(&rule.response_headers),
        backends: rule
            .backends
            .iter()
            .map(|b| pb::WeightedBackend {
                service: b.service.name.clone(),
                namespace: b.service.namespace.clone(),
                port: u32::from(b.port),
                weight: b.weight,
            })
            .collect(),
        request_timeout_ms: ms(rule.request_timeout),
        backend_request_timeout_ms: ms(rule.backend_request_timeout),
    }
}

fn value_match(v: &ValueMatch) -> pb::ValueMatch {
    let (value, regex) = match &v.value {
        StringMatch::Exact(s) => (s.clone(), false),
        StringMatch::Regex(s) => (s.clone(), true),
    };
    pb::ValueMatch {
        name: v.name.clone(),
        value,
        regex,
    }
}

fn header_modifier(m: &HeaderModifier) -> Option<pb::HeaderModifier> {
    (!m.is_empty()).then(|| pb::HeaderModifier {
        set: m.set.clone().into_iter().collect(),
        add: m.add.clone().into_iter().collect(),
        remove: m.remove.clone(),
    })
}

pub(super) fn traffic_policy(service: &ServiceKey, p: &TrafficPolicy) -> pb::TrafficPolicy {
    use pb::load_balancer::Algorithm;
    let (algorithm, hash_header, hash_cookie) = match &p.load_balancer {
        LoadBalancer::P2cEwma => (Algorithm::P2cEwma, "", ""),
        LoadBalancer::RoundRobin => (Algorithm::RoundRobin, "", ""),
        LoadBalancer::LeastRequest => (Algorithm::LeastRequest, "", ""),
        LoadBalancer::ConsistentHash(HashKey::Header(h)) => (Algorithm::ConsistentHash, &**h, ""),
        LoadBalancer::ConsistentHash(HashKey::Cookie(c)) => (Algorithm::ConsistentHash, "", &**c),
    };
    let retries = p.retries.as_ref().map(|r| pb::RetryPolicy {
        attempts: r.attempts,
        retry_on: r.retry_on.iter().map(|c| c.as_str().to_owned()).collect(),
        status_codes: r.status_codes.iter().map(|&c| u32::from(c)).collect(),
        grpc_statuses: r.grpc_statuses.clone(),
        per_try_timeout_ms: ms(r.per_try_timeout),
        backoff_base_ms: ms(r.backoff.map(|b| b.base_interval)),
        backoff_max_ms: ms(r.backoff.map(|b| b.max_interval)),
        budget: r.budget.map(|b| pb::RetryBudget {
            ratio: b.ratio.get(),
            min_retries_per_second: b.min_retries_per_second,
            ttl_ms: ms(Some(b.ttl)),
        }),
        retry_non_idempotent: r.retry_non_idempotent,
    });
    let t = &p.timeouts;
    let limits = &p.connection_limits;
    pb::TrafficPolicy {
        service: service.name.clone(),
        namespace: service.namespace.clone(),
        load_balancer: Some(pb::LoadBalancer {
            algorithm: algorithm as i32,
            hash_header: hash_header.to_owned(),
            hash_cookie: hash_cookie.to_owned(),
        }),
        retries,
        timeouts: Some(pb::Timeouts {
            connect_ms: ms(t.connect),
            request_ms: ms(t.request),
            idle_ms: ms(t.idle),
        }),
        outlier_detection: p.outlier_detection.map(|o| pb::OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            base_ejection_ms: ms(Some(o.base_ejection_time)),
            max_ejection_percent: o.max_ejection_percent,
        }),
        limits: Some(pb::ConnectionLimits {
            max_connections: limits.max_connections.unwrap_or(0),
            max_pending_requests: limits.max_pending_requests.unwrap_or(0),
        }),
    }
}

pub(super) fn authorization_policy(p: &AuthorizationPolicy) -> pb::AuthorizationPolicy {
    use pb::authorization_policy::Action;
    pb::AuthorizationPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        action: match p.action {
            AuthorizationAction::Allow => Action::Allow,
            AuthorizationAction::Deny => Action::Deny,
        } as i32,
        rules: p
            .rules
            .iter()
            .map(|r| pb::AuthorizationRule {
                principals: r.principals.clone(),
                namespaces: r.namespaces.clone(),
                ports: r.ports.iter().map(|&p| u32::from(p)).collect(),
                methods: r.methods.clone(),
                paths: r.paths.clone(),
                headers: r.headers.iter().map(value_match).collect(),
            })
            .collect(),
    }
}

/// Named `effective` in the proxy's namespace: it is resolved from every policy that
/// applies, not one of them.
pub(super) fn peer_authentication(
    namespace: &str,
    p: &EffectivePeerAuthentication,
) -> pb::PeerAuthentication {
    pb::PeerAuthentication {
        name: "effective".to_owned(),
        namespace: namespace.to_owned(),
        mode: mtls_mode(p.mode) as i32,
        port_modes: p
            .port_modes
            .iter()
            .map(|(&port, &mode)| (u32::from(port), mtls_mode(mode) as i32))
            .collect(),
    }
}

fn mtls_mode(mode: MtlsMode) -> pb::peer_authentication::Mode {
    use pb::peer_authentication::Mode;
    match mode {
        MtlsMode::Unset => Mode::Unset,
        MtlsMode::Strict => Mode::Strict,
        MtlsMode::Permissive => Mode::Permissive,
        MtlsMode::Disable => Mode::Disable,
    }
}

/// Milliseconds, 0 for unset; saturating.
fn ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
