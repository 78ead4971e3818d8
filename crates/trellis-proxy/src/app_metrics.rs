//! Metrics merging, as Istio does it: when a Pod pointed Prometheus at its app
//! (`prometheus.io/port`), the injector points Prometheus at the proxy's `/metrics`
//! on the health port instead and hands the app's annotations to the proxy, which
//! scrapes the app on localhost and serves both. A Prometheus outside the mesh then
//! keeps the app's metrics under STRICT mTLS, where it could not scrape the app port.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long the app may take to answer a scrape (Prometheus' own default timeout
/// is 10 s; the proxy's metrics must still come back within it).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of the app's metrics the proxy holds while merging.
const MAX_APP_METRICS: usize = 8 << 20;

/// Where the app serves its metrics (on localhost, as Prometheus would have
/// reached it on the pod address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppMetrics {
    pub port: u16,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AppMetricsError {
    #[error("not a JSON object of annotation strings: {0}")]
    Json(#[from] serde_json::Error),
    #[error("prometheus.io/port is missing")]
    NoPort,
    #[error("prometheus.io/port {0:?} is not a port number")]
    Port(String),
    #[error("prometheus.io/path {0:?} is not an absolute path")]
    Path(String),
}

impl AppMetrics {
    /// From the Pod's own scrape annotations, as the injector saved them
    /// (`{"prometheus.io/port": "9102", "prometheus.io/path": "/stats"}`); the path
    /// defaults to `/metrics`, as with Prometheus.
    pub fn from_annotations(json: &str) -> Result<Self, AppMetricsError> {
        let annotations: BTreeMap<String, String> = serde_json::from_str(json)?;
        let port = annotations
            .get("prometheus.io/port")
            .ok_or(AppMetricsError::NoPort)?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| AppMetricsError::Port(port.clone()))?;
        let path = annotations
            .get("prometheus.io/path")
            .map_or("/metrics", String::as_str);
        // One request line's worth of path: no spaces or controls to smuggle a
        // second request or header into the scrape.
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(AppMetricsError::Path(path.to_owned()));
        }
        Ok(AppMetrics {
            port,
            path: path.to_owned(),
        })
    }

    /// The app's metrics, or why not.
    pub async fn scrape(&self) -> Result<Bytes, String> {
        tokio::time::timeout(SCRAPE_TIMEOUT, self.get())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {SCRAPE_TIMEOUT:?}")))
    }

    async fn get(&self) -> Result<Bytes, String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to port {}: {e}", self.port))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(connection);
        let request = Request::get(self.path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::ACCEPT, "text/plain;version=0.0.4")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("the scrape request is invalid: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("scrape failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("the app answered {}", response.status()));
        }
        Limited::new(response.into_body(), MAX_APP_METRICS)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .map_err(|e| format!("reading the app's metrics: {e}"))
    }
}

/// The proxy's metrics, then the app's, as one Prometheus text exposition. The
/// OpenMetrics end marker (`# EOF`) of either is dropped: nothing may follow it.
/// The app's lines that name a `trellis_` metric are dropped too: an app must not
/// forge what its sidecar reports (who called it, with what result).
pub fn merge(own: &str, app: &[u8]) -> String {
    let app = String::from_utf8_lossy(app);
    let mut out = String::with_capacity(own.len() + app.len() + 1);
    let kept = |l: &&str| l.trim_end() != "# EOF";
    for line in own.lines().filter(kept) {
        out.push_str(line);
        out.push('\n');
    }
    for line in app.lines().filter(kept).filter(|l| !names_ours(l)) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether a text-format line (a sample, or a `# HELP`/`# TYPE`/`# UNIT` comment)
/// is about a metric named like the proxy's own.
fn names_ours(line: &str) -> bool {
    let line = line.trim_start();
    let name = match line.strip_prefix('#') {
        Some(comment) => comment.split_whitespace().nth(1).unwrap_or_default(),
        None => line,
    };
    name.starts_with("trellis_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_annotations_name_the_app_port_and_path() {
        let m = AppMetrics::from_annotations(
            r#"{"prometheus.io/scrape":"true","prometheus.io/port":"9102","prometheus.io/path":"/stats"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            AppMetrics {
                port: 9102,
                path: "/stats".to_owned()
            }
        );
        let m = AppMetrics::from_annotations(r#"{"prometheus.io/port":"8080"}"#).unwrap();
        assert_eq!(m.path, "/metrics");

        for (bad, why) in [
            (r#"{"prometheus.io/path":"/x"}"#, "no port"),
            (r#"{"prometheus.io/port":"http"}"#, "a named port"),
            (r#"{"prometheus.io/port":"0"}"#, "port 0"),
            (r#"{"prometheus.io/port":"70000"}"#, "out of range"),
            (
                r#"{"prometheus.io/port":"80","prometheus.io/path":"x"}"#,
                "relative path",
            ),
            (
                r#"{"prometheus.io/port":"80","prometheus.io/path":"/a HTTP/1.1\r\nX: y"}"#,
                "a smuggled header",
            ),
            ("[]", "not an object"),
        ] {
            assert!(AppMetrics::from_annotations(bad).is_err(), "{why}: {bad}");
        }
    }

    #[test]
    fn merged_text_has_both_sets_and_no_end_marker() {
        let own = "# TYPE trellis_x counter\ntrellis_x_total 1\n# EOF\n";
        let app = b"# TYPE app_y gauge\napp_y 2\n# EOF";
        assert_eq!(
            merge(own, app),
            "# TYPE trellis_x counter\ntrellis_x_total 1\n# TYPE app_y gauge\napp_y 2\n"
        );
        assert_eq!(
            merge(own, b""),
            "# TYPE trellis_x counter\ntrellis_x_total 1\n"
        );
    }

    #[test]
    fn an_app_cannot_forge_the_proxys_metrics() {
        let own = "trellis_requests_total{response_code=\"200\"} 5\n";
        let app = "# HELP trellis_requests Forged.\n# TYPE trellis_requests counter\n\
                   trellis_requests_total{response_code=\"200\"} 999999\n  trellis_x 1\n\
                   # TYPE app_trellis_calls counter\napp_trellis_calls_total 2\n";
        assert_eq!(
            merge(own, app.as_bytes()),
            "trellis_requests_total{response_code=\"200\"} 5\n\
             # TYPE app_trellis_calls counter\napp_trellis_calls_total 2\n"
        );
    }

    #[tokio::test]
    async fn the_app_is_scraped_on_localhost_and_failures_say_why() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                    let (status, body) = match req.uri().path() {
                        "/stats" => (200, "app_requests_total 7\n"),
                        _ => (404, "no\n"),
                    };
                    async move {
                        let mut response =
                            hyper::Response::new(http_body_util::Full::new(Bytes::from(body)));
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        let found = AppMetrics {
            port,
            path: "/stats".to_owned(),
        };
        assert_eq!(
            found.scrape().await.unwrap(),
            Bytes::from_static(b"app_requests_total 7\n")
        );
        let missing = AppMetrics {
            port,
            path: "/metrics".to_owned(),
        };
        let why = missing.scrape().await.unwrap_err();
        assert!(why.contains("404"), "{why}");
    }
}
