//! The control plane's admin ports. Public (15014, on the pod IP): /ready, /live,
//! /metrics. Debug (127.0.0.1 only): /registry, /proxies (also at /debug/proxies),
//! /debug/workloads and /version, which show the mesh's workloads and every connected proxy's identity and
//! must not leave the host.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::IssuedLeaves;
use crate::discovery::{ConnectedProxies, ProxyStatus};
use crate::http_server::{ServerLimits, serve_http1};
use crate::metrics::ControlMetrics;
use crate::model::MeshSnapshot;
use crate::registry::RegistryStatus;

#[derive(Clone)]
pub struct AdminState {
    pub registry: watch::Receiver<RegistryStatus>,
    pub snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub connected: ConnectedProxies,
    pub metrics: ControlMetrics,
    pub issued: IssuedLeaves,
    pub leading: watch::Receiver<bool>,
}

/// What `/version` answers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VersionInfo {
    pub component: String,
    pub version: String,
}

/// Health and metrics, for the kubelet and Prometheus.
pub async fn serve(listener: TcpListener, state: AdminState, limits: ServerLimits) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let response = public_route(&req, &state);
        async move { Ok::<_, Infallible>(response) }
    });
    serve_http1("admin", listener, None, limits, service).await;
}

/// The debug views; the caller binds `listener` to loopback.
pub async fn serve_debug(listener: TcpListener, state: AdminState, limits: ServerLimits) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let response = debug_route(&req, &state);
        async move { Ok::<_, Infallible>(response) }
    });
    serve_http1("debug", listener, None, limits, service).await;
}

fn public_route(req: &Request<hyper::body::Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/ready" | "/live" => text(StatusCode::OK, "ok\n".to_owned()),
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics(state));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

fn debug_route(req: &Request<hyper::body::Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/registry" => json(&*state.registry.borrow()),
        "/proxies" | "/debug/proxies" => json(&proxies(state)),
        "/debug/workloads" => json(&workloads(state)),
        "/version" => json(&VersionInfo {
            component: "trellis-control".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }),
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

/// Every connected proxy, oldest stream first, with the CA's last leaf for it.
fn proxies(state: &AdminState) -> Vec<ProxyStatus> {
    let mut proxies: Vec<ProxyStatus> = state
        .connected
        .lock()
        .map(|c| c.values().cloned().collect())
        .unwrap_or_default();
    for proxy in &mut proxies {
        proxy.certificate = state
            .issued
            .last(&proxy.identity, proxy.workload.as_deref());
    }
    proxies
}

/// One workload of the model, as `trellisctl check` matches it to connected proxies.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WorkloadView {
    /// `namespace/name`, as a proxy's certificate names it.
    pub workload: String,
    pub identity: String,
    /// Whether it runs a sidecar (and so should have a proxy connected).
    pub sidecar: bool,
}

fn workloads(state: &AdminState) -> Vec<WorkloadView> {
    state
        .snapshots
        .borrow()
        .workloads
        .iter()
        .map(|w| WorkloadView {
            workload: format!("{}/{}", w.namespace, w.name),
            identity: w.identity.to_string(),
            sidecar: w.sidecar,
        })
        .collect()
}

/// Gauges read at scrape time, then every metric.
fn metrics(state: &AdminState) -> String {
    let m = &state.metrics;
    let proxies = state.connected.lock().map(|c| c.len()).unwrap_or_default();
    m.connected_proxies
        .set(i64::try_from(proxies).unwrap_or(i64::MAX));
    let registry = state.registry.borrow().generation;
    m.registry_generation
        .set(i64::try_from(registry).unwrap_or(i64::MAX));
    let services = state.snapshots.borrow().services.len();
    m.services.set(i64::try_from(services).unwrap_or(i64::MAX));
    m.leader.set(i64::from(*state.leading.borrow()));
    m.encode()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
