//! The health port (15020, on the pod IP): the kubelet's view of the proxy (`/ready`,
//! `/live`), Prometheus scraping (`/metrics`), and the app's own HTTP probes, which
//! the injector points here because the kubelet cannot speak mesh mTLS
//! (`/app-health/<container>/<readyz|livez|startupz>`, as Istio does).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use crate::admin::AdminState;

/// One app probe, as the injector passed it (`TRELLIS_APP_PROBES`, JSON: health path
/// → `{"httpGet": {"path", "port", "scheme"?, "httpHeaders"?}}`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AppProbe {
    #[serde(rename = "httpGet")]
    pub http_get: HttpGet,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct HttpGet {
    #[serde(default)]
    pub path: Option<String>,
    /// A number; named ports are resolved by the injector or not supported.
    pub port: serde_json::Value,
    #[serde(default, rename = "httpHeaders")]
    pub http_headers: Vec<Header>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// Parses `TRELLIS_APP_PROBES`; a bad value is an error at start, not a silent gap.
pub fn parse_app_probes(json: &str) -> Result<HashMap<String, AppProbe>, serde_json::Error> {
    serde_json::from_str(json)
}

pub async fn serve(
    listener: TcpListener,
    admin: AdminState,
    probes: Arc<HashMap<String, AppProbe>>,
) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let limits = admin.config.http_server_limits.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let admin = admin.clone();
        let probes = probes.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(route(req.uri().path(), &admin, &probes, &client).await) }
    });
    crate::http_server::serve_http1("health", listener, limits, service).await;
}

async fn route(
    path: &str,
    admin: &AdminState,
    probes: &HashMap<String, AppProbe>,
    client: &Client<HttpConnector, Empty<Bytes>>,
) -> Response<Full<Bytes>> {
    match path {
        "/live" | "/healthz" => text(StatusCode::OK, "live\n"),
        "/ready" => admin.ready_response(),
        "/metrics" => text(StatusCode::OK, admin.metrics.encode()),
        p if p.starts_with("/app-health/") => match probes.get(p) {
            Some(probe) => app_probe(probe, client).await,
            None => text(StatusCode::NOT_FOUND, "no such app probe\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Runs the app's probe over loopback, as the kubelet would have: 2xx and 3xx pass.
async fn app_probe(
    probe: &AppProbe,
    client: &Client<HttpConnector, Empty<Bytes>>,
) -> Response<Full<Bytes>> {
    let Some(port) = probe
        .http_get
        .port
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
    else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "probe port is not a number\n",
        );
    };
    let path = probe.http_get.path.as_deref().unwrap_or("/");
    let mut builder = Request::get(format!("http://127.0.0.1:{port}{path}"));
    for h in &probe.http_get.http_headers {
        builder = builder.header(h.name.as_str(), h.value.as_str());
    }
    let Ok(request) = builder.body(Empty::new()) else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "probe request is invalid\n",
        );
    };
    match tokio::time::timeout(Duration::from_secs(10), client.request(request)).await {
        Ok(Ok(response)) => {
            let status = response.status();
            let _ = response.into_body().collect().await;
            if status.is_success() || status.is_redirection() {
                text(StatusCode::OK, format!("app answered {status}\n"))
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app answered {status}\n"),
                )
            }
        }
        Ok(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app probe failed: {e}\n"),
        ),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "app probe timed out\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_injector_writes() {
        let probes = parse_app_probes(
            r#"{"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP", "httpHeaders": [{"name": "x", "value": "y"}]}}}"#,
        )
        .unwrap();
        let p = &probes["/app-health/web/readyz"];
        assert_eq!(p.http_get.port.as_u64(), Some(8080));
        assert_eq!(p.http_get.http_headers[0].name, "x");
        assert!(parse_app_probes("not json").is_err());
    }
}
