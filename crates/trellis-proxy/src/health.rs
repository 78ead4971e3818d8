//! The health port (15020, on the pod IP): the kubelet's view of the proxy (`/ready`,
//! `/live`), Prometheus scraping (`/metrics`), and the app's own probes (HTTP, TCP,
//! gRPC; see [`crate::app_probe`]), which the injector points here because the kubelet cannot speak mesh mTLS
//! (`/app-health/<container>/<readyz|livez|startupz>`, as Istio does).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::admin::AdminState;

pub use crate::app_probe::{AppProbe, parse_app_probes};

pub async fn serve(
    listener: TcpListener,
    admin: AdminState,
    probes: Arc<HashMap<String, AppProbe>>,
) {
    let limits = admin.config.http_server_limits.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let admin = admin.clone();
        let probes = probes.clone();
        async move { Ok::<_, Infallible>(route(req.uri().path(), &admin, &probes).await) }
    });
    crate::http_server::serve_http1("health", listener, limits, service).await;
}

async fn route(
    path: &str,
    admin: &AdminState,
    probes: &HashMap<String, AppProbe>,
) -> Response<Full<Bytes>> {
    match path {
        "/live" | "/healthz" => text(StatusCode::OK, "live\n"),
        "/ready" => admin.ready_response(),
        "/metrics" => metrics(admin).await,
        p if p.starts_with("/app-health/") => match probes.get(p) {
            Some(probe) => match crate::app_probe::run(probe).await {
                Ok(answer) => text(StatusCode::OK, format!("{answer}\n")),
                Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
            },
            None => text(StatusCode::NOT_FOUND, "no such app probe\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The proxy's metrics, and the app's when the injector asked for them merged. An
/// app that does not answer costs it its own metrics, never the proxy's.
async fn metrics(admin: &AdminState) -> Response<Full<Bytes>> {
    let Some(app) = &admin.config.app_metrics else {
        return text(StatusCode::OK, admin.metrics.encode());
    };
    // The app first, so that a failure is counted in the same scrape.
    let app_text = match app.scrape().await {
        Ok(body) => body,
        Err(reason) => {
            admin.metrics.app_metrics_failures.inc();
            tracing::debug!(port = app.port, path = app.path, %reason, "scraping the app's metrics");
            Bytes::new()
        }
    };
    let merged = crate::app_metrics::merge(&admin.metrics.encode(), &app_text);
    let mut response = text(StatusCode::OK, merged);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}
