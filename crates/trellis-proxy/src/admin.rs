//! Admin on 127.0.0.1: /ready /live /metrics /config_dump /certs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_identity::MeshTls;
use trellis_proto::discovery::v1::resource::Kind;

use crate::config::ProxyConfig;
use crate::discovery::{MeshState, SyncStatus};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<ProxyConfig>,
    pub tls: watch::Receiver<Option<Arc<MeshTls>>>,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub synced: watch::Receiver<SyncStatus>,
    pub metrics: Metrics,
}

impl AdminState {
    /// Ready once it has a certificate and has accepted a first full config.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// `Err` says why the proxy is not ready.
    pub fn readiness(&self) -> Result<(), String> {
        if self.tls.borrow().is_none() {
            return Err("no workload certificate yet".to_owned());
        }
        let sync = self.synced.borrow();
        if !sync.synced {
            return Err(sync.reason());
        }
        Ok(())
    }

    /// The `/ready` answer: 200, or 503 with the reason.
    pub fn ready_response(&self) -> Response<Full<Bytes>> {
        match self.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        }
    }
}

pub async fn serve(listener: TcpListener, admin: AdminState) {
    let limits = admin.config.http_server_limits.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let response = route(req.uri().path(), &admin);
        async move { Ok::<_, Infallible>(response) }
    });
    crate::http_server::serve_http1("admin", listener, limits, service).await;
}

fn route(path: &str, admin: &AdminState) -> Response<Full<Bytes>> {
    match path {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => admin.ready_response(),
        "/metrics" => {
            let mut response = text(StatusCode::OK, admin.metrics.encode());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/config_dump" => json_response(&config_dump(admin)),
        "/certs" => json_response(&certs(admin)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn config_dump(admin: &AdminState) -> serde_json::Value {
    let state = admin.state.borrow().clone();
    let mut services = Vec::new();
    let mut endpoints = Vec::new();
    let mut routes = Vec::new();
    let mut policies = Vec::new();
    let mut versions = serde_json::Map::new();
    for (type_url, resources) in &state.resources.by_type {
        for resource in resources.values() {
            versions.insert(
                format!("{type_url}/{}", resource.name),
                json!(resource.version),
            );
            match &resource.kind {
                Some(Kind::Service(s)) => services.push(json!({
                    "name": resource.name,
                    "vips": s.vips,
                    "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol})).collect::<Vec<_>>(),
                    "hostnames": s.hostnames,
                })),
                Some(Kind::Endpoints(e)) => endpoints.push(json!({
                    "name": resource.name,
                    "endpoints": e.endpoints.iter().map(|ep| json!({
                        "address": format!("{}:{}", ep.address, ep.port),
                        "identity": ep.identity,
                        "ready": ep.ready,
                        "mesh_address": ep.mesh_address,
                    })).collect::<Vec<_>>(),
                })),
                Some(Kind::RouteTable(t)) => {
                    for route in &t.routes {
                        routes.push(describe_route(&resource.name, route));
                    }
                }
                Some(Kind::TrafficPolicy(t)) => policies.push(json!({
                    "kind": "TrafficPolicy",
                    "name": resource.name,
                    "service": format!("{}.{}", t.service, t.namespace),
                    "load_balancer": t.load_balancer.as_ref().map(|lb| lb.algorithm().as_str_name()),
                    "retry_attempts": t.retries.as_ref().map(|r| r.attempts),
                    "request_timeout_ms": t.timeouts.as_ref().map(|t| t.request_ms),
                })),
                Some(Kind::AuthorizationPolicy(a)) => policies.push(json!({
                    "kind": "AuthorizationPolicy",
                    "name": format!("{}/{}", a.namespace, a.name),
                    "action": a.action().as_str_name(),
                    "rules": a.rules.len(),
                })),
                Some(Kind::PeerAuthentication(p)) => policies.push(json!({
                    "kind": "PeerAuthentication",
                    "name": format!("{}/{}", p.namespace, p.name),
                    "mode": p.mode().as_str_name(),
                    "port_modes": p.port_modes.len(),
                })),
                _ => {}
            }
        }
    }
    json!({
        "identity": admin.config.identity.to_string(),
        "listeners": listeners(&admin.config),
        "routes": routes,
        "policies": policies,
        "ready": admin.is_ready(),
        "outbound_policy": admin.config.outbound_policy,
        "upstreams": admin.config.upstreams,
        "services": services,
        "endpoints": endpoints,
        "versions": versions,
        "inbound_policy": {
            // Until true, every inbound connection is refused.
            "accepted": state.inbound_policy.accepted,
            "authorization_policies_rejected": state.inbound_policy.authorizer.rejected(),
        },
        "last_rejected_config": admin.synced.borrow().last_rejected,
    })
}

/// The addresses this proxy listens on, and what each is for.
fn listeners(config: &ProxyConfig) -> Vec<serde_json::Value> {
    let mut out = vec![
        json!({"name": "inbound", "address": config.inbound_addr, "destination": "mTLS from peers"}),
        json!({"name": "admin", "address": config.admin_addr, "destination": "admin"}),
    ];
    if let Some(addr) = config.outbound_addr {
        out.push(json!({"name": "outbound", "address": addr, "destination": "transparent (original destination)"}));
    }
    if let Some(addr) = config.health_addr {
        out.push(json!({"name": "health", "address": addr, "destination": "health and metrics"}));
    }
    for u in &config.upstreams {
        out.push(json!({"name": "upstream", "address": u.listen, "destination": format!("{}:{}", u.service, u.port)}));
    }
    out
}

/// One HTTP route, flattened for tables.
fn describe_route(
    table: &str,
    route: &trellis_proto::discovery::v1::HttpRoute,
) -> serde_json::Value {
    let matches: Vec<String> = route
        .matches
        .iter()
        .map(|m| {
            let path = m.path.as_ref().map(|p| {
                let kind = match p.kind() {
                    trellis_proto::discovery::v1::path_match::Kind::Prefix => "prefix",
                    trellis_proto::discovery::v1::path_match::Kind::Exact => "exact",
                    trellis_proto::discovery::v1::path_match::Kind::Regex => "regex",
                };
                format!("{kind} {}", p.value)
            });
            let method = (!m.method.is_empty()).then(|| m.method.clone());
            [method, path]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let backends: Vec<String> = route
        .backends
        .iter()
        .map(|b| format!("{}.{}:{} w{}", b.service, b.namespace, b.port, b.weight))
        .collect();
    json!({
        "table": table,
        "name": route.name,
        "port": route.port,
        "matches": matches,
        "backends": backends,
        "request_timeout_ms": route.request_timeout_ms,
    })
}

fn certs(admin: &AdminState) -> serde_json::Value {
    let tls = admin.tls.borrow().clone();
    let Some(tls) = tls else {
        return json!({ "identity": admin.config.identity.to_string(), "certificate": null });
    };
    let cert = tls.certificate();
    let bundle = tls.trust_bundle();
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    };
    json!({
        "identity": cert.id.to_string(),
        "serial": cert.serial,
        "not_before_unix": unix(cert.not_before),
        "not_after_unix": unix(cert.not_after),
        "renew_at_unix": unix(cert.renew_at()),
        // Which root of the bundle the leaf chains to, and every root trusted: what
        // a root rotation changes.
        "signed_by": bundle.signer_of(&cert.chain).map(|r| trellis_identity::root_fingerprint(r)),
        "trust_bundle": bundle.fingerprints(),
        // Public material only: the private key never leaves the TLS configs.
        "chain_pem": cert.chain_pem(),
    })
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

fn json_response(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = text(StatusCode::OK, body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
