//! Request metrics, access logs and `trellisctl top` (issue 12) on loopback: a
//! control plane, a client sidecar and the callee's sidecar in one process, real
//! hyper apps behind them, real mTLS between the sidecars.
//!
//! Known traffic goes through both sidecars (successes, an app's 500, a gRPC error
//! in trailers, a proxy-made 503 to a dead endpoint, an opaque TCP exchange), and the
//! test checks exact counts, labels and histogram buckets as the caller's sidecar
//! (`reporter="source"`) and the callee's (`reporter="destination"`) report them,
//! then the access-log lines, then `trellisctl top --once` against the same mesh.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::SpiffeId;
use trellis_proxy::access_log::AccessLogTarget;
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};
use trellis_tests::loopback::{eventually, free_port, http_get};

type Body = BoxBody<Bytes, Infallible>;

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const ECHO: &str = "spiffe://cluster.local/ns/default/sa/echo";

fn token(sa: &str) -> String {
    format!("{sa}-token-0123456789")
}

struct Mesh {
    client: RunningProxy,
    echo: RunningProxy,
    tcp: RunningProxy,
    echo_upstream: SocketAddr,
    gone_upstream: SocketAddr,
    tcp_upstream: SocketAddr,
    access_log: std::path::PathBuf,
    _control: RunningControlPlane,
    _dir: tempfile::TempDir,
}

/// The mesh: `echo` (HTTP, behind a sidecar), `gone` (an endpoint with nothing
/// listening) and `tcpecho` (opaque TCP, behind a sidecar); the client's sidecar
/// writes an access log.
async fn mesh() -> Mesh {
    let echo_app = http_app().await;
    let tcp_app = tcp_echo_app().await;
    let (echo_sidecar, tcp_sidecar) = (free_port(), free_port());
    let (gone_app, gone_sidecar) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    std::fs::create_dir(&registry).unwrap();
    let mut docs = vec![
        service("echo", 80, "http"),
        service("gone", 80, "http"),
        service("tcpecho", 9000, "tcp"),
        workload("echo", "127.0.0.1", echo_app, echo_sidecar),
        workload("gone", "127.0.0.3", gone_app, gone_sidecar),
        workload("tcpecho", "127.0.0.1", tcp_app, tcp_sidecar),
        // `/fail` goes through a route rule (its name becomes `route_name`).
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: echo-routes, namespace: default}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n\
         \x20 rules:\n  - matches: [{path: {type: PathPrefix, value: /fail}}]\n"
            .to_owned(),
    ];
    for sa in ["client", "echo", "gone", "tcpecho"] {
        docs.push(format!(
            "apiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\n\
             metadata: {{name: {sa}, namespace: default}}\n\
             spec: {{serviceAccount: {sa}, token: {}}}\n",
            token(sa)
        ));
    }
    std::fs::write(registry.join("mesh.yaml"), docs.join("---\n")).unwrap();
    let control = trellis_control::start(ControlConfig {
        registry_dir: registry.clone(),
        state_dir: dir.path().join("state"),
        trust_domain: "cluster.local".into(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        cert_ttl: Duration::from_secs(24 * 3600),
        server_names: vec!["trellis-control".into()],
    })
    .await
    .unwrap();

    let sidecar = |sa: &str, inbound: u16, app: u16| {
        let mut config = proxy_config(&control, sa);
        config.inbound_addr = SocketAddr::from(([127, 0, 0, 1], inbound));
        config.app_port = Some(app);
        config
    };
    let echo = trellis_proxy::start(sidecar("echo", echo_sidecar, echo_app))
        .await
        .unwrap();
    let tcp = trellis_proxy::start(sidecar("tcpecho", tcp_sidecar, tcp_app))
        .await
        .unwrap();
    let access_log = dir.path().join("access.log");
    let mut config = proxy_config(&control, "client");
    config.access_log = Some(AccessLogTarget::File(access_log.clone()));
    // The scrape port (15020 in a pod) serves the same metrics as admin.
    config.health_addr = Some("127.0.0.1:0".parse().unwrap());
    config.upstreams = [("echo", 80), ("gone", 80), ("tcpecho", 9000)]
        .into_iter()
        .map(|(name, port)| Upstream {
            service: format!("{name}.default"),
            port,
            listen: "127.0.0.1:0".parse().unwrap(),
        })
        .collect();
    let client = trellis_proxy::start(config).await.unwrap();
    for proxy in [&client, &echo, &tcp] {
        tokio::time::timeout(Duration::from_secs(10), proxy.ready())
            .await
            .expect("a proxy did not become ready within 10 s");
    }
    let wanted = [("echo", 80), ("gone", 80), ("tcpecho", 9000)];
    eventually(
        "the client's sidecar knows every endpoint",
        Duration::from_secs(10),
        || {
            let state = client.admin.state.borrow().clone();
            async move {
                state.routes.contains_key("echo.default")
                    && wanted.iter().all(|(name, port)| {
                        state
                            .services
                            .get(&(format!("{name}.default"), *port))
                            .is_some_and(|s| s.endpoints.all().count() == 1)
                    })
            }
        },
    )
    .await;
    Mesh {
        echo_upstream: client.upstream_addrs[0],
        gone_upstream: client.upstream_addrs[1],
        tcp_upstream: client.upstream_addrs[2],
        client,
        echo,
        tcp,
        access_log,
        _control: control,
        _dir: dir,
    }
}

fn service(name: &str, port: u16, protocol: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: {{app: {name}}}\n  ports: [{{name: main, port: {port}, targetPort: app, appProtocol: {protocol}}}]\n"
    )
}

fn workload(app: &str, ip: &str, app_port: u16, sidecar_port: u16) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\n\
         metadata: {{name: {app}-0, namespace: default, labels: {{app: {app}}}}}\n\
         spec: {{address: {ip}, serviceAccount: {app}, ports: {{app: {app_port}}}, sidecarPort: {sidecar_port}}}\n"
    )
}

fn proxy_config(control: &RunningControlPlane, sa: &str) -> ProxyConfig {
    let id = SpiffeId::new("cluster.local", "default", sa).unwrap();
    let mut config = ProxyConfig::new(id, control.grpc_addr.to_string(), control.root_pem.clone());
    config.bootstrap_token = Some(token(sa));
    config.inbound_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config
}

/// `/ok`: 200 "hello"; `/fail`: 500 "boom"; a gRPC call: 200 with one message and
/// `grpc-status: 5` (NOT_FOUND) in the trailers.
async fn http_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let grpc = req
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    let path = req.uri().path().to_owned();
                    // The request body is read whole before answering.
                    let _ = req.into_body().collect().await;
                    let response = if grpc {
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", "5".parse().unwrap());
                        let frames = [
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let mut r =
                            Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
                        r.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        r
                    } else if path == "/fail" {
                        text(500, "boom")
                    } else {
                        text(200, "hello")
                    };
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

async fn tcp_echo_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

fn text(status: u16, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

/// Sends a request and reads the whole answer: status, grpc-status (trailers).
async fn send(client: &Client<HttpConnector, Body>, request: Request<Body>) -> (u16, Bytes) {
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("no response within 10 s")
        .expect("the request failed at the client");
    let status = response.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("no whole body within 10 s")
        .expect("the body failed")
        .to_bytes();
    (status, body)
}

fn get(addr: SocketAddr, path: &str) -> Request<Body> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

/// The known traffic, once.
async fn send_known_traffic(mesh: &Mesh) {
    let http1 = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    for _ in 0..3 {
        assert_eq!(send(&http1, get(mesh.echo_upstream, "/ok")).await.0, 200);
    }
    for _ in 0..2 {
        assert_eq!(send(&http1, get(mesh.echo_upstream, "/fail")).await.0, 500);
    }
    for _ in 0..2 {
        let (status, _) = send(&http1, get(mesh.gone_upstream, "/")).await;
        assert_eq!(status, 503, "a dead endpoint is the proxy's 503");
    }
    // A gRPC call over HTTP/2 prior knowledge; its 7-byte message is the request body.
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let call = Request::post(format!("http://{}/shop.Items/Get", mesh.echo_upstream))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02id")).boxed())
        .unwrap();
    let (status, body) = send(&h2, call).await;
    assert_eq!((status, body.len()), (200, 7));
    // Opaque TCP: five bytes each way.
    let mut tcp = TcpStream::connect(mesh.tcp_upstream).await.unwrap();
    tcp.write_all(b"ping!").await.unwrap();
    let mut echoed = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echoed))
        .await
        .expect("no echo within 10 s")
        .unwrap();
    assert_eq!(&echoed, b"ping!");
    drop(tcp);
}

/// The sum of `name`'s series that carry every label in `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics_of(proxy: &RunningProxy) -> String {
    let (status, text) = http_get(proxy.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    text
}

/// Waits until `proxy` reports `want` of `name` with `labels`, then returns its text.
async fn wait_for(proxy: &RunningProxy, name: &str, labels: &[(&str, &str)], want: f64) -> String {
    eventually(
        &format!("{name}{labels:?} reaches {want}"),
        Duration::from_secs(10),
        || async { metric(&metrics_of(proxy).await, name, labels) >= want },
    )
    .await;
    metrics_of(proxy).await
}

#[tokio::test]
async fn both_sidecars_report_known_traffic_exactly() {
    let mesh = mesh().await;
    send_known_traffic(&mesh).await;

    // The caller's sidecar.
    let source = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", CLIENT),
    ];
    let to_echo = [
        ("destination_workload", "echo"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", ECHO),
        ("destination_service", "echo.default"),
        ("destination_port", "80"),
    ];
    let client = wait_for(
        &mesh.client,
        "trellis_tcp_connections_closed_total",
        &[],
        1.0,
    )
    .await;
    let both = |side: &[(&'static str, &'static str)], rest: &[(&'static str, &'static str)]| {
        side.iter().chain(rest).copied().collect::<Vec<_>>()
    };
    let ok = [
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("grpc_response_status", ""),
    ];
    let check_echo = |text: &str, side: &[(&'static str, &'static str)]| {
        let labels = |rest: &[(&'static str, &'static str)]| {
            let mut all = both(side, &to_echo);
            all.extend_from_slice(rest);
            all
        };
        assert_eq!(
            metric(text, "trellis_requests_total", &labels(&ok)),
            3.0,
            "{text}"
        );
        assert_eq!(
            metric(
                text,
                "trellis_requests_total",
                &labels(&[("response_code", "500"), ("response_flags", "-")])
            ),
            2.0
        );
        assert_eq!(
            metric(
                text,
                "trellis_requests_total",
                &labels(&[
                    ("request_protocol", "grpc"),
                    ("response_code", "200"),
                    ("grpc_response_status", "5")
                ])
            ),
            1.0
        );
        // Three "hello"s: 5 bytes each, above the 1 bucket, within the 10 one.
        let mut bucket = labels(&ok);
        bucket.push(("le", "1.0"));
        assert_eq!(metric(text, "trellis_response_bytes_bucket", &bucket), 0.0);
        bucket.pop();
        bucket.push(("le", "10.0"));
        assert_eq!(metric(text, "trellis_response_bytes_bucket", &bucket), 3.0);
        assert_eq!(
            metric(text, "trellis_response_bytes_sum", &labels(&ok)),
            15.0
        );
        assert_eq!(metric(text, "trellis_request_bytes_sum", &labels(&ok)), 0.0);
        bucket.pop();
        bucket.push(("le", "+Inf"));
        assert_eq!(
            metric(
                text,
                "trellis_request_duration_milliseconds_bucket",
                &bucket
            ),
            3.0
        );
        assert_eq!(
            metric(
                text,
                "trellis_request_duration_milliseconds_count",
                &labels(&ok)
            ),
            3.0
        );
        // The gRPC call's 7-byte request and response.
        let grpc = labels(&[("request_protocol", "grpc")]);
        assert_eq!(metric(text, "trellis_request_bytes_sum", &grpc), 7.0);
        assert_eq!(metric(text, "trellis_response_bytes_sum", &grpc), 7.0);
    };
    check_echo(&client, &source);
    // The route rule `/fail` matched is named on the caller's side (the callee does
    // not know routes: `-`).
    let routed = client
        .lines()
        .find(|l| {
            l.starts_with("trellis_requests_total{")
                && l.contains("response_code=\"500\"")
                && l.contains("reporter=\"source\"")
        })
        .unwrap();
    assert!(
        routed.contains("route_name=\"default/echo-routes"),
        "{routed}"
    );
    assert_eq!(
        metric(
            &client,
            "trellis_requests_total",
            &[
                ("route_name", "-"),
                ("response_code", "200"),
                ("request_protocol", "http"),
                ("destination_service", "echo.default")
            ]
        ),
        3.0
    );
    // The proxy-made 503s, at the source only: the connection never got anywhere.
    assert_eq!(
        metric(
            &client,
            "trellis_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service", "gone.default"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/gone"
                ),
                ("response_code", "503"),
                ("response_flags", "connect_failed"),
            ]
        ),
        2.0,
        "{client}"
    );
    // TCP, from the caller's side.
    let tcp = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "tcpecho"),
        ("destination_service", "tcpecho.default"),
        ("request_protocol", "tcp"),
    ];
    assert_eq!(
        metric(&client, "trellis_tcp_connections_opened_total", &tcp),
        1.0
    );
    assert_eq!(
        metric(&client, "trellis_tcp_connections_closed_total", &tcp),
        1.0
    );
    assert_eq!(
        metric(&client, "trellis_tcp_received_bytes_total", &tcp),
        5.0
    );
    assert_eq!(metric(&client, "trellis_tcp_sent_bytes_total", &tcp), 5.0);
    assert_eq!(
        metric(
            &client,
            "trellis_tcp_connection_duration_milliseconds_count",
            &tcp
        ),
        1.0
    );
    // No pod addresses and no paths in any label.
    for line in client
        .lines()
        .filter(|l| l.starts_with("trellis_request") || l.starts_with("trellis_tcp"))
    {
        assert!(!line.contains("127.0.0") && !line.contains("/ok"), "{line}");
    }

    // The callee's sidecar: the same requests, reported by the destination; the
    // proxy-made 503s never reached it.
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", CLIENT),
    ];
    let echo = wait_for(
        &mesh.echo,
        "trellis_requests_total",
        &[("reporter", "destination")],
        6.0,
    )
    .await;
    check_echo(&echo, &destination);
    assert_eq!(metric(&echo, "trellis_requests_total", &[]), 6.0, "{echo}");
    let tcp_side = wait_for(&mesh.tcp, "trellis_tcp_connections_closed_total", &[], 1.0).await;
    let tcp = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("destination_workload", "tcpecho"),
        ("destination_service", "tcpecho.default"),
        ("destination_port", "9000"),
    ];
    assert_eq!(
        metric(&tcp_side, "trellis_tcp_connections_opened_total", &tcp),
        1.0,
        "{tcp_side}"
    );
    assert_eq!(
        metric(&tcp_side, "trellis_tcp_received_bytes_total", &tcp),
        5.0
    );
    assert_eq!(metric(&tcp_side, "trellis_tcp_sent_bytes_total", &tcp), 5.0);

    // The scrape port serves the same series.
    let (status, scraped) = http_get(mesh.client.health_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&scraped, "trellis_requests_total", &both(&source, &to_echo)),
        6.0,
        "{scraped}"
    );

    // The access log of the client's sidecar (on; the callee's is off by default).
    let lines = read_access_log(&mesh.access_log, 9).await;
    let ok_line = lines
        .iter()
        .find(|l| l["path"] == "/ok" && l["response_code"] == 200)
        .expect("a line for GET /ok");
    for field in [
        "start_time",
        "source_principal",
        "destination_principal",
        "method",
        "authority",
        "route_name",
        "upstream",
        "response_flags",
        "request_bytes",
        "response_bytes",
        "duration_ms",
    ] {
        assert!(ok_line.get(field).is_some(), "{field} missing in {ok_line}");
    }
    assert_eq!(ok_line["source_principal"], CLIENT);
    assert_eq!(ok_line["destination_principal"], ECHO);
    assert_eq!(ok_line["method"], "GET");
    assert_eq!(ok_line["response_bytes"], 5);
    assert_eq!(ok_line["reporter"], "source");
    let failed = lines
        .iter()
        .filter(|l| l["response_flags"] == "connect_failed" && l["response_code"] == 503)
        .count();
    assert_eq!(failed, 2);
    let grpc = lines
        .iter()
        .find(|l| l["protocol"] == "grpc")
        .expect("a line for the gRPC call");
    assert_eq!(grpc["grpc_status"], 5);
    assert_eq!(grpc["path"], "/shop.Items/Get");
    let tcp = lines
        .iter()
        .find(|l| l["protocol"] == "tcp")
        .expect("a line for the TCP connection");
    assert_eq!(
        (
            tcp["request_bytes"].as_u64(),
            tcp["response_bytes"].as_u64()
        ),
        (Some(5), Some(5))
    );
    assert_eq!(
        metric(&client, "trellis_access_log_dropped_total", &[]),
        0.0
    );
    assert!(
        ProxyConfig::new(
            SpiffeId::new("cluster.local", "default", "x").unwrap(),
            String::new(),
            String::new()
        )
        .access_log
        .is_none()
    );
}

/// Every JSON line of the access log once it has `at_least` lines.
async fn read_access_log(path: &Path, at_least: usize) -> Vec<serde_json::Value> {
    eventually(
        "the access log has every line",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(path)
                .map(|t| t.lines().count() >= at_least)
                .unwrap_or(false)
        },
    )
    .await;
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[tokio::test]
async fn trellisctl_top_once_shows_the_paths() {
    let trellisctl = match trellis_tests::target_binary("trellisctl") {
        Ok(path) => path,
        Err(e) => {
            eprintln!(
                "SKIPPED trellisctl_top_once_shows_the_paths: {e} (cargo build -p trellisctl)"
            );
            return;
        }
    };
    let mesh = mesh().await;
    send_known_traffic(&mesh).await;
    wait_for(
        &mesh.echo,
        "trellis_requests_total",
        &[("reporter", "destination")],
        6.0,
    )
    .await;
    // Successes while `top` watches: until it is done, at most 2000.
    let addr = mesh.echo_upstream;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let load = tokio::spawn(async move {
        let http1 = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        for _ in 0..2000 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            send(&http1, get(addr, "/ok")).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let output = tokio::process::Command::new(&trellisctl)
        .args([
            "top",
            "--once",
            "--interval",
            "500ms",
            "-o",
            "json",
            &mesh.client.admin_addr.to_string(),
            &mesh.echo.admin_addr.to_string(),
        ])
        .output()
        .await
        .unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let echo = rows
        .iter()
        .find(|r| r["destination"] == "echo.default")
        .unwrap_or_else(|| panic!("no echo row in {rows:?}"));
    assert_eq!(echo["source"], "client");
    // The caller's sidecar is counted, not both: totals are the source's.
    assert_eq!(echo["reporter"], "source");
    assert!(echo["total"].as_f64().unwrap() >= 6.0, "{echo}");
    assert!(echo["rps"].as_f64().unwrap() > 0.0, "{echo}");
    assert_eq!(echo["success_rate"], 1.0, "{echo}");
    assert!(echo["p99_ms"].as_f64().is_some(), "{echo}");
    let gone = rows
        .iter()
        .find(|r| r["destination"] == "gone.default")
        .unwrap_or_else(|| panic!("no gone row in {rows:?}"));
    assert_eq!(gone["total"], 2.0);
    assert_eq!(gone["rps"], 0.0);
    // `stat`: per service, as the service's own sidecar reports it.
    let stat = tokio::process::Command::new(&trellisctl)
        .args([
            "stat",
            "--once",
            "--interval",
            "100ms",
            "-o",
            "json",
            &mesh.client.admin_addr.to_string(),
            &mesh.echo.admin_addr.to_string(),
        ])
        .output()
        .await
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    let echo = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["destination"] == "echo.default")
        .unwrap_or_else(|| panic!("no echo row in {rows}"));
    assert_eq!(echo["reporter"], "destination");
    assert_eq!(echo["source"], "");
    // The callee's sidecar saw 6 known requests and the load; the dead endpoint's
    // service has no sidecar scraped, so its callers' count stands in.
    assert!(echo["total"].as_f64().unwrap() >= 6.0, "{echo}");
    let gone = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["destination"] == "gone.default")
        .unwrap_or_else(|| panic!("no gone row in {rows}"));
    assert_eq!(
        (gone["reporter"].as_str(), gone["total"].as_f64()),
        (Some("source"), Some(2.0))
    );
    // And the table form.
    let table = tokio::process::Command::new(&trellisctl)
        .args([
            "top",
            "--once",
            "--interval",
            "100ms",
            &mesh.client.admin_addr.to_string(),
        ])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("SOURCE"), "{table}");
    assert!(
        table.contains("client.default") && table.contains("echo.default"),
        "{table}"
    );
}
