//! The control plane's admin ports. Public (15014, on the pod IP): /ready, /live,
//! /metrics. Debug (127.0.0.1 only): /registry and /proxies, which show the mesh's
//! workloads and every connected proxy's identity and must not leave the host.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::discovery::ConnectedProxies;
use crate::http_server::{ServerLimits, serve_http1};
use crate::limits::LimitCounters;
use crate::model::MeshSnapshot;
use crate::registry::RegistryStatus;

#[derive(Clone)]
pub struct AdminState {
    pub registry: watch::Receiver<RegistryStatus>,
    pub snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub connected: ConnectedProxies,
    pub limits: Arc<LimitCounters>,
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
        "/metrics" => text(StatusCode::OK, metrics(state)),
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

fn debug_route(req: &Request<hyper::body::Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/registry" => json(&*state.registry.borrow()),
        "/proxies" => {
            let proxies: Vec<_> = state
                .connected
                .lock()
                .map(|c| c.values().cloned().collect())
                .unwrap_or_default();
            json(&proxies)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

fn metrics(state: &AdminState) -> String {
    let registry = state.registry.borrow();
    let snapshot = state.snapshots.borrow();
    let proxies = state.connected.lock().map(|c| c.len()).unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE trellis_control_connected_proxies gauge");
    let _ = writeln!(out, "trellis_control_connected_proxies {proxies}");
    let _ = writeln!(out, "# TYPE trellis_control_registry_generation counter");
    let _ = writeln!(
        out,
        "trellis_control_registry_generation {}",
        registry.generation
    );
    let _ = writeln!(out, "# TYPE trellis_control_registry_errors gauge");
    let _ = writeln!(
        out,
        "trellis_control_registry_errors {}",
        registry.last_error.len()
    );
    let _ = writeln!(out, "# TYPE trellis_control_services gauge");
    let _ = writeln!(out, "trellis_control_services {}", snapshot.services.len());
    let limited = state
        .limits
        .certificate_requests_limited
        .load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# TYPE trellis_control_certificate_requests_limited counter"
    );
    let _ = writeln!(
        out,
        "trellis_control_certificate_requests_limited_total {limited}"
    );
    let refused = state
        .limits
        .discovery_streams_refused
        .load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# TYPE trellis_control_discovery_streams_refused counter"
    );
    let _ = writeln!(
        out,
        "trellis_control_discovery_streams_refused_total {refused}"
    );
    out
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
