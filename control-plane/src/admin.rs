//! The control plane's admin port: /ready, /live, /metrics, /registry, /proxies.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::discovery::ConnectedProxies;
use crate::model::MeshSnapshot;
use crate::registry::RegistryStatus;

#[derive(Clone)]
pub struct AdminState {
    pub registry: watch::Receiver<RegistryStatus>,
    pub snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub connected: ConnectedProxies,
}

pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: &Request<hyper::body::Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/ready" | "/live" => text(StatusCode::OK, "ok\n".to_owned()),
        "/registry" => json(&*state.registry.borrow()),
        "/proxies" => {
            let proxies: Vec<_> = state
                .connected
                .lock()
                .map(|c| c.values().cloned().collect())
                .unwrap_or_default();
            json(&proxies)
        }
        "/metrics" => text(StatusCode::OK, metrics(state)),
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
