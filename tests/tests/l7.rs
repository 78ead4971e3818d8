//! L7 traffic management on loopback (issue 5): a control plane, a client sidecar
//! and one sidecar per endpoint, in one process, in front of real hyper and tonic
//! apps. Routes and policies come from the file registry, as on Kubernetes.
//!
//! Every test builds its own mesh. Loops are bounded and every wait has a generous
//! timeout; the only timing assertions are upper bounds (and a lower bound where a
//! timer cannot fire early).
//!
//! Beyond the twelve cases of the brief: a late first request on a declared-http
//! port, the retry budget across config updates, and a WebSocket upgrade on a
//! declared-http port. Proxy memory under the 50 MB body cannot be isolated in one
//! process; the test prints the process's VmHWM (about +10 MiB when run alone).
//!
//! Then what TrafficPolicy enforces beyond routing: the opaque-ports list, idle
//! timeouts (TCP, the app's HTTP/1 and HTTP/2 connections, the pooled mesh
//! connection), maxConnections, one mesh connection per endpoint under concurrent
//! first use, and P2C against an endpoint that fails fast.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::SpiffeId;
use trellis_proxy::discovery::MeshState;
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};
use trellis_tests::loopback::{eventually, free_port, http_get};

type Body = BoxBody<Bytes, Infallible>;
type HttpClient = Client<HttpConnector, Body>;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
/// RFC 6455's sample handshake: this key and its accept value.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

// ---------------------------------------------------------------------------------
// The mesh
// ---------------------------------------------------------------------------------

fn token(service_account: &str) -> String {
    format!("{service_account}-token-0123456789")
}

fn spiffe(service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{service_account}")
}

struct Svc {
    name: String,
    selector: String,
    /// (port name, port, appProtocol)
    ports: Vec<(String, u16, Option<String>)>,
}

/// A WorkloadEntry: the endpoint `127.0.0.1:app_port`, whose sidecar listens on
/// `sidecar_port`; its service account is its `app` label.
struct Workload {
    name: String,
    app: String,
    app_port: u16,
    sidecar_port: u16,
    /// `false`: nothing is started on `sidecar_port` (a dead endpoint).
    sidecar: bool,
}

/// Where a dead endpoint lives: not 127.0.0.1, whose ephemeral ports the other tests'
/// connections use (one of them may take the dead port there, and a test that later
/// binds it gets EADDRINUSE).
const DEAD_IP: &str = "127.0.0.3";

impl Workload {
    fn ip(&self) -> &'static str {
        if self.sidecar { "127.0.0.1" } else { DEAD_IP }
    }
}

#[derive(Default)]
struct MeshBuilder {
    services: Vec<Svc>,
    workloads: Vec<Workload>,
    yaml: Vec<String>,
    upstreams: Vec<(String, u16)>,
    routes: Vec<String>,
    policies: Vec<String>,
    detect_timeout: Option<Duration>,
}

impl MeshBuilder {
    /// A Service `name` selecting `app: selector`; each port targets the
    /// workloads' `app` port.
    fn service(mut self, name: &str, selector: &str, ports: &[(&str, u16, Option<&str>)]) -> Self {
        self.services.push(Svc {
            name: name.to_owned(),
            selector: selector.to_owned(),
            ports: ports
                .iter()
                .map(|(n, p, proto)| ((*n).to_owned(), *p, proto.map(str::to_owned)))
                .collect(),
        });
        self
    }

    fn workload(mut self, name: &str, app: &str, app_port: u16) -> Self {
        self.workloads.push(Workload {
            name: name.to_owned(),
            app: app.to_owned(),
            app_port,
            sidecar_port: free_port(),
            sidecar: true,
        });
        self
    }

    /// An endpoint whose sidecar port has nothing listening.
    fn dead_workload(mut self, name: &str, app: &str) -> Self {
        self.workloads.push(Workload {
            name: name.to_owned(),
            app: app.to_owned(),
            app_port: free_port(),
            sidecar_port: free_port(),
            sidecar: false,
        });
        self
    }

    /// Raw registry documents (routes, policies).
    fn yaml(mut self, doc: &str) -> Self {
        self.yaml.push(doc.to_owned());
        self
    }

    /// Waits at start until the client proxy holds the route table of `service`.
    fn expect_route(mut self, service: &str) -> Self {
        self.routes.push(format!("{service}.default"));
        self
    }

    fn expect_policy(mut self, service: &str) -> Self {
        self.policies.push(format!("{service}.default"));
        self
    }

    /// A listener on the client proxy for `service:port`.
    fn upstream(mut self, service: &str, port: u16) -> Self {
        self.upstreams.push((format!("{service}.default"), port));
        self
    }

    fn detect_timeout(mut self, timeout: Duration) -> Self {
        self.detect_timeout = Some(timeout);
        self
    }

    fn registry_yaml(&self) -> String {
        let mut docs = Vec::new();
        for s in &self.services {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|(name, port, proto)| {
                    let proto = proto
                        .as_ref()
                        .map(|p| format!(", appProtocol: {p}"))
                        .unwrap_or_default();
                    format!("{{name: {name}, port: {port}, targetPort: app{proto}}}")
                })
                .collect();
            docs.push(format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: default}}\n\
                 spec:\n  selector: {{app: {}}}\n  ports: [{}]\n",
                s.name,
                s.selector,
                ports.join(", ")
            ));
        }
        let mut accounts: BTreeSet<String> = BTreeSet::from(["client".to_owned()]);
        for w in &self.workloads {
            accounts.insert(w.app.clone());
            docs.push(format!(
                "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\n\
                 metadata: {{name: {}, namespace: default, labels: {{app: {}}}}}\n\
                 spec: {{address: {}, serviceAccount: {}, ports: {{app: {}}}, sidecarPort: {}}}\n",
                w.name,
                w.app,
                w.ip(),
                w.app,
                w.app_port,
                w.sidecar_port
            ));
        }
        for sa in &accounts {
            docs.push(format!(
                "apiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\n\
                 metadata: {{name: {sa}, namespace: default}}\n\
                 spec: {{serviceAccount: {sa}, token: {}}}\n",
                token(sa)
            ));
        }
        docs.extend(self.yaml.iter().cloned());
        docs.join("---\n")
    }

    async fn start(self) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry");
        std::fs::create_dir(&registry).unwrap();
        std::fs::write(registry.join("mesh.yaml"), self.registry_yaml()).unwrap();
        let control = start_control(&registry, &dir.path().join("state")).await;

        let mut sidecars = Vec::new();
        for w in self.workloads.iter().filter(|w| w.sidecar) {
            let mut config = proxy_config(&control, &w.app);
            config.inbound_addr = SocketAddr::from(([127, 0, 0, 1], w.sidecar_port));
            config.app_port = Some(w.app_port);
            sidecars.push(trellis_proxy::start(config).await.unwrap());
        }
        let mut config = proxy_config(&control, "client");
        config.upstreams = self
            .upstreams
            .iter()
            .map(|(service, port)| Upstream {
                service: service.clone(),
                port: *port,
                listen: "127.0.0.1:0".parse().unwrap(),
            })
            .collect();
        if let Some(timeout) = self.detect_timeout {
            config.detect_timeout = timeout;
        }
        let client = trellis_proxy::start(config).await.unwrap();
        for proxy in sidecars.iter().chain([&client]) {
            tokio::time::timeout(Duration::from_secs(10), proxy.ready())
                .await
                .expect("a proxy did not become ready within 10 s");
        }

        // Everything the tests rely on has reached the client proxy.
        let mut expected_endpoints = Vec::new();
        for (service, port) in &self.upstreams {
            let name = service.trim_end_matches(".default");
            let selector = self
                .services
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.selector.clone())
                .unwrap_or_default();
            let count = self.workloads.iter().filter(|w| w.app == selector).count();
            expected_endpoints.push(((service.clone(), *port), count));
        }
        for s in &self.services {
            let count = self
                .workloads
                .iter()
                .filter(|w| w.app == s.selector)
                .count();
            for (_, port, _) in &s.ports {
                expected_endpoints.push(((format!("{}.default", s.name), *port), count));
            }
        }
        let complete = |s: &MeshState| {
            expected_endpoints.iter().all(|(key, count)| {
                s.services
                    .get(key)
                    .is_some_and(|sp| sp.endpoints.all().count() == *count)
            }) && self.routes.iter().all(|r| s.routes.contains_key(r))
                && self.policies.iter().all(|p| s.policies.contains_key(p))
        };
        let started = Instant::now();
        while !complete(&client.admin.state.borrow()) {
            if started.elapsed() > Duration::from_secs(10) {
                let s = client.admin.state.borrow().clone();
                let (_, registry) = http_get(control.debug_addr, "/registry").await;
                panic!(
                    "the client proxy lacks part of the mesh after 10 s: wanted endpoints \
                     {expected_endpoints:?}, routes {:?}, policies {:?}; has services {:?}, \
                     routes {:?}, policies {:?}; control plane /registry: {registry}",
                    self.routes,
                    self.policies,
                    s.services
                        .iter()
                        .map(|(k, v)| (k.clone(), v.endpoints.all().count()))
                        .collect::<Vec<_>>(),
                    s.routes.keys().collect::<Vec<_>>(),
                    s.policies.keys().collect::<Vec<_>>(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        Mesh {
            upstreams: self
                .upstreams
                .iter()
                .cloned()
                .zip(client.upstream_addrs.iter().copied())
                .collect(),
            workloads: self.workloads,
            client,
            _sidecars: sidecars,
            _control: control,
            registry,
            _dir: dir,
        }
    }
}

struct Mesh {
    upstreams: Vec<((String, u16), SocketAddr)>,
    workloads: Vec<Workload>,
    client: RunningProxy,
    _sidecars: Vec<RunningProxy>,
    _control: RunningControlPlane,
    registry: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// Where the client app connects for `service:port`.
    fn upstream(&self, service: &str, port: u16) -> SocketAddr {
        let key = (format!("{service}.default"), port);
        self.upstreams
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, a)| *a)
            .unwrap()
    }

    fn workload(&self, name: &str) -> &Workload {
        self.workloads.iter().find(|w| w.name == name).unwrap()
    }

    /// A counter from the client proxy's /metrics (0 when absent).
    async fn client_metric(&self, line_prefix: &str) -> f64 {
        let (_, metrics) = http_get(self.client.admin_addr, "/metrics").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// A metric from the sidecar of workload number `index` (0 when absent).
async fn sidecar_metric(mesh: &Mesh, index: usize, line_prefix: &str) -> f64 {
    let (_, metrics) = http_get(mesh._sidecars[index].admin_addr, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn start_control(registry: &Path, state: &Path) -> RunningControlPlane {
    trellis_control::start(ControlConfig {
        registry_dir: registry.to_owned(),
        state_dir: state.to_owned(),
        trust_domain: "cluster.local".into(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        cert_ttl: Duration::from_secs(24 * 3600),
        server_names: vec!["trellis-control".into()],
    })
    .await
    .unwrap()
}

fn proxy_config(control: &RunningControlPlane, sa: &str) -> ProxyConfig {
    let id = SpiffeId::new("cluster.local", "default", sa).unwrap();
    let mut config = ProxyConfig::new(id, control.grpc_addr.to_string(), control.root_pem.clone());
    config.bootstrap_token = Some(token(sa));
    config.inbound_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config
}

// ---------------------------------------------------------------------------------
// Apps
// ---------------------------------------------------------------------------------

/// A hyper 1 server (HTTP/1.1 with upgrades, and h2) on an ephemeral port.
struct App {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl App {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn http_app<F, Fut>(handler: F) -> App
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    App { port, hits }
}

/// Answers every request 200 with its name as the body.
async fn named_app(name: &'static str) -> App {
    http_app(move |_req| async move { text(200, name) }).await
}

fn text(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

/// A body of `chunks` chunks of `chunk` bytes, produced as it is sent (never whole
/// in memory), with no length known in advance.
fn streamed_body(chunks: usize, chunk: usize) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let data = Bytes::from(vec![b'x'; chunk]);
    tokio::spawn(async move {
        for _ in 0..chunks {
            if tx.send(Ok(Frame::data(data.clone()))).await.is_err() {
                return;
            }
        }
    });
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
}

async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            n += data.len() as u64;
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn get(addr: SocketAddr, path: &str) -> Request<Body> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

async fn send(client: &HttpClient, request: Request<Body>) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("no response within 10 s")
        .expect("the request failed at the client");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("no whole body within 10 s")
        .expect("the response body failed")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `total` requests from `concurrency` workers; replies in request order.
async fn run_requests<F>(total: usize, concurrency: usize, make: F) -> Vec<Reply>
where
    F: Fn(usize) -> Request<Body> + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let client = http_client();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (make, client) = (make.clone(), client.clone());
        workers.spawn(async move {
            let mut replies = Vec::new();
            for i in (worker..total).step_by(concurrency) {
                replies.push((i, send(&client, make(i)).await));
            }
            replies
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(replies) = workers.join_next().await {
        all.extend(replies.unwrap());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

/// Reads until `pattern` has been seen, the peer closes or `within` passes.
async fn read_until(stream: &mut TcpStream, pattern: &[u8], within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(pattern.len()).any(|w| w == pattern) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

fn vm_hwm_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------------------
// 1. HTTP/1.1 through two sidecars
// ---------------------------------------------------------------------------------

/// Reports what the app received, as JSON.
async fn inspect_app() -> App {
    http_app(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let header = |name: &str| {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or("<not text>").to_owned())
                .collect::<Vec<_>>()
        };
        let report = serde_json::json!({
            "version": format!("{:?}", parts.version),
            "method": parts.method.as_str(),
            "target": parts.uri.to_string(),
            "host": header("host"),
            "xfcc": header("x-forwarded-client-cert"),
            "transfer_encoding": header("transfer-encoding"),
            "custom": header("x-custom"),
            "body": String::from_utf8_lossy(&body),
        });
        let mut response = text(201, report.to_string());
        response
            .headers_mut()
            .insert("x-app", http::HeaderValue::from_static("inspect"));
        response
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_through_two_sidecars_keeps_semantics_and_sets_the_callers_identity() {
    let app = inspect_app().await;
    let mesh = MeshBuilder::default()
        .service(
            "web",
            "web",
            &[("http-web", 80, Some("http")), ("web", 8080, None)],
        )
        .workload("web-1", "web", app.port)
        .upstream("web", 80)
        .upstream("web", 8080)
        .start()
        .await;
    let client = http_client();
    let xfcc = format!("By={};URI={CLIENT_ID}", spiffe("web"));

    // The declared-http port and the undeclared (detected) one behave the same.
    for port in [80, 8080] {
        let addr = mesh.upstream("web", port);
        let request = Request::get(format!("http://{addr}/hello/world?x=1&y=2"))
            .header("host", "web.default.svc.cluster.local")
            .header("x-custom", "kept")
            // A client app cannot claim an identity: the sidecar replaces this.
            .header(
                "x-forwarded-client-cert",
                "By=spiffe://evil;URI=spiffe://cluster.local/ns/default/sa/admin",
            )
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
        let reply = send(&client, request).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "port {port}: {}",
            reply.text()
        );
        assert_eq!(reply.headers["x-app"], "inspect", "port {port}");
        let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(seen["version"], "HTTP/1.1", "port {port}: {seen}");
        assert_eq!(seen["method"], "GET", "port {port}: {seen}");
        assert_eq!(
            seen["target"], "/hello/world?x=1&y=2",
            "port {port}: {seen}"
        );
        assert_eq!(
            seen["host"],
            serde_json::json!(["web.default.svc.cluster.local"]),
            "port {port}: {seen}"
        );
        assert_eq!(seen["custom"], serde_json::json!(["kept"]), "port {port}");
        assert_eq!(
            seen["xfcc"],
            serde_json::json!([xfcc]),
            "port {port}: the app must see exactly the identity the handshake proved"
        );

        // A chunked request body (no length known up front) arrives whole.
        let chunks = ["alpha-", "beta-", "gamma"];
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let request = Request::post(format!("http://{addr}/upload"))
            .header("host", "web")
            .body(StreamBody::new(tokio_stream::iter(frames)).boxed())
            .unwrap();
        let reply = send(&client, request).await;
        assert_eq!(reply.status, StatusCode::CREATED, "port {port}");
        let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(seen["method"], "POST");
        assert_eq!(seen["version"], "HTTP/1.1");
        assert_eq!(seen["body"], "alpha-beta-gamma", "port {port}: {seen}");
        println!(
            "port {port}: chunked upload reached the app with transfer-encoding {}",
            seen["transfer_encoding"]
        );
    }
    assert_eq!(app.hits(), 4);
}

/// Beyond the brief: a port declared `http` is HTTP however long the client waits
/// before its first request (a pre-connected pool, a slow client). Only undeclared
/// ports fall back to opaque TCP after the detection timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_first_request_on_a_declared_http_port_still_gets_l7() {
    let app = inspect_app().await;
    let mesh = MeshBuilder::default()
        .service("web", "web", &[("http-web", 80, Some("http"))])
        .workload("web-1", "web", app.port)
        .upstream("web", 80)
        .detect_timeout(Duration::from_millis(200))
        .start()
        .await;
    let mut stream = TcpStream::connect(mesh.upstream("web", 80)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stream
        .write_all(b"GET /late HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\
              X-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://cluster.local/ns/default/sa/admin\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "no complete answer within 5 s");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    assert!(raw.starts_with("HTTP/1.1 201"), "{raw:?}");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        seen["xfcc"],
        serde_json::json!([format!("By={};URI={CLIENT_ID}", spiffe("web"))]),
        "the request skipped the HTTP path (carried as opaque TCP), and the client's \
         forged identity reached the app: {seen}"
    );
}

// ---------------------------------------------------------------------------------
// 2. Retries hide a flaky endpoint
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_an_endpoint_failing_half_its_requests() {
    let good = named_app("good").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let flaky = {
        let calls = calls.clone();
        http_app(move |_req| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n.is_multiple_of(2) {
                    text(503, "flaky says no")
                } else {
                    text(200, "flaky")
                }
            }
        })
        .await
    };
    // Two Services over the same two workloads; only `flaky` retries. Both balance
    // round robin, so the flaky endpoint gets its share whatever its latency (P2C
    // over EWMA may, by chance, starve it and hide the difference).
    let mesh = MeshBuilder::default()
        .service("flaky", "flaky", &[("http", 80, None)])
        .service("flaky-raw", "flaky", &[("http", 80, None)])
        .workload("flaky-good", "flaky", good.port)
        .workload("flaky-bad", "flaky", flaky.port)
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: flaky, namespace: default}
spec:
  targetRef: {kind: Service, name: flaky}
  loadBalancer: {algorithm: ROUND_ROBIN}
  retries:
    attempts: 2
    retryOn: [gateway-error]
    budget: {ratio: 0.5}
---
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: flaky-raw, namespace: default}
spec:
  targetRef: {kind: Service, name: flaky-raw}
  loadBalancer: {algorithm: ROUND_ROBIN}
"#,
        )
        .expect_policy("flaky")
        .expect_policy("flaky-raw")
        .upstream("flaky", 80)
        .upstream("flaky-raw", 80)
        .start()
        .await;

    // Sequential, so the flaky endpoint strictly alternates and never reaches the
    // five consecutive failures that would eject it.
    let with_policy = mesh.upstream("flaky", 80);
    let replies = run_requests(200, 1, move |_| get(with_policy, "/")).await;
    let failed = replies
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .count();
    let retries = mesh.client_metric("trellis_http_retries_total").await;
    println!(
        "with retries: {failed}/200 failed; good served {}, flaky {} ({} failed); {retries} retries",
        good.hits(),
        flaky.hits(),
        calls.load(Ordering::SeqCst).div_ceil(2)
    );
    assert_eq!(
        failed, 0,
        "every idempotent request must succeed with retries"
    );
    assert!(flaky.hits() > 0, "the flaky endpoint was never used");

    let without = mesh.upstream("flaky-raw", 80);
    let replies = run_requests(200, 1, move |_| get(without, "/")).await;
    let failed: Vec<_> = replies
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .collect();
    println!("without a policy: {}/200 failed", failed.len());
    assert!(
        !failed.is_empty(),
        "without retries the flaky endpoint's 503s must reach the client"
    );
    assert!(
        failed
            .iter()
            .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(failed.len() < 200);
}

// ---------------------------------------------------------------------------------
// 3. The retry budget caps attempts under a fully failing backend
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_attempts_against_a_failing_backend() {
    let down = http_app(|_req| async { text(503, "always down") }).await;
    let mesh = MeshBuilder::default()
        .service("down", "down", &[("http", 80, Some("http"))])
        .workload("down-1", "down", down.port)
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: down, namespace: default}
spec:
  targetRef: {kind: Service, name: down}
  retries:
    attempts: 3
    retryOn: [gateway-error]
    budget: {ratio: 0.2, minRetriesPerSecond: 0}
"#,
        )
        .expect_policy("down")
        .upstream("down", 80)
        .start()
        .await;

    const N: usize = 200;
    let addr = mesh.upstream("down", 80);
    let replies = run_requests(N, 4, move |_| get(addr, "/")).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE),
        "the backend's own 503 reaches the client once retries are spent"
    );
    let attempts = down.hits();
    let retries = mesh.client_metric("trellis_http_retries_total").await;
    let cap = N + N / 5 + 3;
    println!(
        "{N} requests, {attempts} upstream attempts ({:.1}% retries; cap {cap}); proxy counted {retries} retries",
        100.0 * (attempts - N) as f64 / N as f64
    );
    assert!(attempts > N, "no request was retried at all ({attempts})");
    assert!(
        attempts <= cap,
        "{attempts} attempts for {N} requests exceed the budget (ratio 0.2)"
    );
    assert_eq!(
        retries as usize,
        attempts - N,
        "retries counted by the proxy"
    );
}

/// Beyond the brief: the budget must hold across config updates too. Endpoints churn
/// most during an outage, which is exactly when retries must not multiply: a
/// discovery update must not hand out a fresh budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_is_not_refilled_by_config_updates() {
    let down = http_app(|_req| async { text(503, "always down") }).await;
    // The default floor: 10 retries a second over a 10 s window.
    let mesh = MeshBuilder::default()
        .service("down", "down", &[("http", 80, Some("http"))])
        .workload("down-1", "down", down.port)
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: down, namespace: default}
spec:
  targetRef: {kind: Service, name: down}
  retries:
    attempts: 3
    retryOn: [gateway-error]
    backoff: {baseInterval: 1ms, maxInterval: 2ms}
    budget: {ratio: 0.2}
"#,
        )
        .expect_policy("down")
        .upstream("down", 80)
        .start()
        .await;

    const N: usize = 200;
    const UPDATES: usize = 4;
    let addr = mesh.upstream("down", 80);
    let started = Instant::now();
    for round in 0..=UPDATES {
        let replies = run_requests(N / (UPDATES + 1), 2, move |_| get(addr, "/")).await;
        assert!(
            replies
                .iter()
                .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        );
        if round == UPDATES {
            break;
        }
        // An unrelated change: a new Service elsewhere in the mesh.
        let name = format!("churn-{round}");
        std::fs::write(
            mesh.registry.join(format!("{name}.yaml")),
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
                 spec:\n  ports: [{{name: http, port: 80}}]\n"
            ),
        )
        .unwrap();
        let key = (format!("{name}.default"), 80);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !mesh.client.admin.state.borrow().services.contains_key(&key) {
            assert!(Instant::now() < deadline, "{name} did not reach the proxy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let elapsed = started.elapsed().as_secs() as usize;
    let attempts = down.hits();
    // Ratio 0.2 of N, plus the floor of 10/s over the 10 s window (and every second
    // the run went beyond it), plus slack.
    let cap = N + N / 5 + 10 * (10 + elapsed) + 5;
    println!(
        "{N} requests across {UPDATES} config updates in {elapsed} s: {attempts} upstream attempts (cap {cap})"
    );
    assert!(
        attempts <= cap,
        "{attempts} attempts for {N} requests: each config update refilled the retry budget"
    );
}

// ---------------------------------------------------------------------------------
// 4. Traffic split and header match
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_and_a_header_match_route_between_versions() {
    let v1 = named_app("web-v1").await;
    let v2 = named_app("web-v2").await;
    let mesh = MeshBuilder::default()
        // The parent has no endpoints of its own: every request is routed.
        .service("web", "web", &[("http", 80, Some("http"))])
        .service("web-v1", "web-v1", &[("http", 80, Some("http"))])
        .service("web-v2", "web-v2", &[("http", 80, Some("http"))])
        .workload("web-v1-1", "web-v1", v1.port)
        .workload("web-v2-1", "web-v2", v2.port)
        .yaml(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - backendRefs:
    - {name: web-v1, port: 80, weight: 90}
    - {name: web-v2, port: 80, weight: 10}
"#,
        )
        .expect_route("web")
        .upstream("web", 80)
        .start()
        .await;

    const N: usize = 2000;
    let addr = mesh.upstream("web", 80);
    let replies = run_requests(N, 8, move |_| get(addr, "/")).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let to_v1 = replies.iter().filter(|r| r.body == "web-v1").count();
    let to_v2 = replies.iter().filter(|r| r.body == "web-v2").count();
    println!(
        "split: v1 {to_v1} ({:.1}%), v2 {to_v2}",
        100.0 * to_v1 as f64 / N as f64
    );
    assert_eq!(to_v1 + to_v2, N);
    assert_eq!((v1.hits(), v2.hits()), (to_v1, to_v2));
    assert!(
        (1700..=1900).contains(&to_v1),
        "v1 got {to_v1} of {N}, not 90% ± 5%"
    );

    let (v1_before, v2_before) = (v1.hits(), v2.hits());
    let replies = run_requests(100, 4, move |_| {
        Request::get(format!("http://{addr}/"))
            .header("x-canary", "yes")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap()
    })
    .await;
    assert!(replies.iter().all(|r| r.body == "web-v2"));
    assert_eq!(v1.hits(), v1_before, "a canary request reached v1");
    assert_eq!(v2.hits(), v2_before + 100);
}

// ---------------------------------------------------------------------------------
// 5. A hung backend is cut at the timeout
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_is_cut_at_the_timeout_with_504() {
    let hung = http_app(|_req| std::future::pending::<Response<Body>>()).await;
    let mesh = MeshBuilder::default()
        .service("hung", "hung", &[("http", 80, Some("http"))])
        .service("hung-policy", "hung", &[("http", 80, Some("http"))])
        .workload("hung-1", "hung", hung.port)
        .yaml(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hung, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: hung, port: 80}]
  rules:
  - timeouts: {request: 300ms}
"#,
        )
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: hung-policy, namespace: default}
spec:
  targetRef: {kind: Service, name: hung-policy}
  timeouts: {request: 300ms}
"#,
        )
        .expect_route("hung")
        .expect_policy("hung-policy")
        .upstream("hung", 80)
        .upstream("hung-policy", 80)
        .start()
        .await;
    let client = http_client();
    for (i, service) in ["hung", "hung-policy"].into_iter().enumerate() {
        let started = Instant::now();
        let reply = send(&client, get(mesh.upstream(service, 80), "/")).await;
        let took = started.elapsed();
        println!("{service}: {} after {took:?}", reply.status);
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{service}");
        assert!(
            reply.headers.contains_key("trellis-error"),
            "{service}: {:?}",
            reply.headers
        );
        assert!(took < Duration::from_secs(5), "{service}: {took:?}");
        assert!(took >= Duration::from_millis(300), "{service}: {took:?}");
        assert_eq!(hung.hits(), i + 1, "the request did reach the app");
    }
}

// ---------------------------------------------------------------------------------
// 6. A dead endpoint: connect failures retried elsewhere, then ejected
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_fails_fast_and_is_ejected() {
    let alive = named_app("alive").await;
    let mesh = MeshBuilder::default()
        .service("pair", "pair", &[("http", 80, Some("http"))])
        .workload("pair-alive", "pair", alive.port)
        .dead_workload("pair-dead", "pair")
        .upstream("pair", 80)
        .start()
        .await;
    let addr = mesh.upstream("pair", 80);

    // Nothing listens on the dead endpoint's sidecar port: every connect to it is
    // refused, and retried on the live endpoint without any policy.
    let started = Instant::now();
    let replies = run_requests(30, 1, move |_| get(addr, "/")).await;
    let took = started.elapsed();
    println!("30 requests with a dead endpoint took {took:?}");
    assert!(
        replies.iter().all(|r| r.status == StatusCode::OK),
        "statuses: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    // Now something accepts on the dead port (and hangs up). Had the endpoint not
    // been ejected, balancing would send it attempts that this listener counts.
    let dead = mesh.workload("pair-dead");
    let listener = TcpListener::bind((dead.ip(), dead.sidecar_port))
        .await
        .unwrap();
    let knocks = Arc::new(AtomicUsize::new(0));
    let counter = knocks.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let replies = run_requests(30, 1, move |_| get(addr, "/")).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        knocks.load(Ordering::SeqCst),
        0,
        "the dead endpoint still got attempts: it was not ejected"
    );
    assert_eq!(alive.hits(), 60);
}

// ---------------------------------------------------------------------------------
// 7. P2C over EWMA avoids a slow endpoint
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_less_traffic_to_a_slow_endpoint() {
    let fast = named_app("fast").await;
    // 50 ms: far above what scheduling noise on a loaded machine adds to the
    // fast endpoint, so the comparison holds there too.
    let slow = http_app(|_req| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text(200, "slow")
    })
    .await;
    let mesh = MeshBuilder::default()
        .service("lb", "lb", &[("http", 80, Some("http"))])
        .workload("lb-fast", "lb", fast.port)
        .workload("lb-slow", "lb", slow.port)
        .upstream("lb", 80)
        .start()
        .await;
    let addr = mesh.upstream("lb", 80);
    const N: usize = 300;
    let replies = run_requests(N, 4, move |_| get(addr, "/")).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let share = slow.hits() as f64 / N as f64;
    println!(
        "P2C: fast {}, slow {} ({:.1}%)",
        fast.hits(),
        slow.hits(),
        share * 100.0
    );
    assert_eq!(fast.hits() + slow.hits(), N);
    assert!(share < 0.35, "the slow endpoint got {:.1}%", share * 100.0);
}

// ---------------------------------------------------------------------------------
// 8. gRPC through two sidecars
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_streaming_and_status_codes_pass_through() {
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("trellis.Echo", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mesh = MeshBuilder::default()
        .service("grpc", "grpc", &[("rpc", 9000, Some("grpc"))])
        .service("grpc-empty", "nobody", &[("rpc", 9000, Some("grpc"))])
        .workload("grpc-1", "grpc", app_port)
        .upstream("grpc", 9000)
        .upstream("grpc-empty", 9000)
        .start()
        .await;

    let connect = |addr: SocketAddr| async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
    };
    let mut client = connect(mesh.upstream("grpc", 9000)).await;
    let check = |service: &str| {
        tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        })
    };

    // Unary.
    let reply = client.check(check("")).await.unwrap().into_inner();
    assert_eq!(reply.status, Status::Serving as i32);
    let reply = client
        .check(check("trellis.Echo"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status, Status::Serving as i32);

    // The app's error status comes back with its code and message (trailers).
    let err = client.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "service not registered");

    // Server streaming: the current status, then a change.
    let mut stream = client
        .watch(check("trellis.Echo"))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("no first message within 5 s")
        .unwrap()
        .expect("the stream ended");
    assert_eq!(first.status, Status::Serving as i32);
    reporter
        .set_service_status("trellis.Echo", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("no second message within 5 s")
        .unwrap()
        .expect("the stream ended");
    assert_eq!(second.status, Status::NotServing as i32);

    // An error the proxy makes itself is a gRPC status too.
    let mut empty = connect(mesh.upstream("grpc-empty", 9000)).await;
    let err = empty.check(check("")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // As HTTP 200 with grpc-status in the headers (trailers-only), not an HTTP 503
    // that tonic would map to UNAVAILABLE as well.
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let request = Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        mesh.upstream("grpc-empty", 9000)
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])).boxed())
    .unwrap();
    let reply = send(&h2, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        "application/grpc"
    );
    assert_eq!(reply.headers.get("grpc-status").unwrap(), "14");
    assert!(reply.headers.contains_key("trellis-error"));
}

// ---------------------------------------------------------------------------------
// 9. WebSocket upgrade
// ---------------------------------------------------------------------------------

/// Answers a WebSocket handshake (RFC 6455's sample key only) with 101, then echoes
/// the upgraded byte stream.
async fn websocket_app() -> App {
    http_app(|mut req: Request<Incoming>| async move {
        let upgrade = req
            .headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let key = req.headers().get("sec-websocket-key").cloned();
        if !upgrade || key.as_ref().map(|k| k.as_bytes()) != Some(WS_KEY.as_bytes()) {
            return text(400, "expected a websocket upgrade with the sample key");
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 4096];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", WS_ACCEPT)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap()
    })
    .await
}

/// A masked WebSocket text frame.
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Handshakes through `addr`, then checks two frames echo back.
async fn websocket_echo(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let handshake = format!(
        "GET /chat HTTP/1.1\r\nHost: ws.default\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(handshake.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let head = read_until(&mut stream, b"\r\n\r\n", Duration::from_secs(5)).await;
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no 101: {head:?}"));
    }
    if !head.to_ascii_lowercase().contains(&format!(
        "sec-websocket-accept: {}",
        WS_ACCEPT.to_ascii_lowercase()
    )) {
        return Err(format!("no accept header: {head:?}"));
    }
    // Anything after the head already read would be an echo of nothing: none expected.
    for message in [&b"hello through the mesh"[..], b"and again"] {
        let frame = ws_frame(message);
        stream.write_all(&frame).await.map_err(|e| e.to_string())?;
        let mut echoed = vec![0u8; frame.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .map_err(|_| "no echo within 5 s".to_owned())?
            .map_err(|e| format!("reading the echo: {e}"))?;
        if echoed != frame {
            return Err(format!("echo differs: {echoed:?}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_on_an_undeclared_port_is_carried_as_a_stream() {
    let app = websocket_app().await;
    let mesh = MeshBuilder::default()
        .service("ws", "ws", &[("ws", 80, None)])
        .workload("ws-1", "ws", app.port)
        .upstream("ws", 80)
        .start()
        .await;
    websocket_echo(mesh.upstream("ws", 80)).await.unwrap();
    assert_eq!(app.hits(), 1);
}

/// Beyond the brief: the issue says upgrades pass through, and an operator declares
/// a WebSocket service's port `http` as in Istio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_on_a_declared_http_port_passes_through() {
    let app = websocket_app().await;
    let mesh = MeshBuilder::default()
        .service("ws", "ws", &[("http", 80, Some("http"))])
        .workload("ws-1", "ws", app.port)
        .upstream("ws", 80)
        .start()
        .await;
    let result = tokio::time::timeout(
        Duration::from_secs(15),
        websocket_echo(mesh.upstream("ws", 80)),
    )
    .await
    .expect("the WebSocket exchange hung");
    assert_eq!(result, Ok(()));
}

// ---------------------------------------------------------------------------------
// 10. A 50 MB body streams through
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_body_streams_through_both_ways() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 800; // 50 MiB
    const TOTAL: u64 = (CHUNK * CHUNKS) as u64;
    let app = http_app(|req: Request<Incoming>| async move {
        if req.uri().path() == "/download" {
            return Response::new(streamed_body(CHUNKS, CHUNK));
        }
        match count_body(req.into_body()).await {
            Ok(n) => text(200, n.to_string()),
            Err(e) => text(500, e.to_string()),
        }
    })
    .await;
    let mesh = MeshBuilder::default()
        .service("bulk", "bulk", &[("http", 80, Some("http"))])
        .workload("bulk-1", "bulk", app.port)
        .upstream("bulk", 80)
        .start()
        .await;
    let addr = mesh.upstream("bulk", 80);
    let client = http_client();
    let hwm_before = vm_hwm_kib();

    let started = Instant::now();
    let request = Request::post(format!("http://{addr}/upload"))
        .body(streamed_body(CHUNKS, CHUNK))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(120), client.request(request))
        .await
        .expect("no answer to the 50 MB upload within 120 s")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), TOTAL.to_string());
    let upload = started.elapsed();

    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(get(addr, "/download")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let received = tokio::time::timeout(Duration::from_secs(120), count_body(response.into_body()))
        .await
        .expect("the 50 MB download did not finish within 120 s")
        .unwrap();
    assert_eq!(received, TOTAL);
    // Whole-process figures (other tests run in this process too): informational.
    println!(
        "50 MiB up in {upload:?}, down in {:?}; process VmHWM {hwm_before:?} -> {:?} KiB",
        started.elapsed(),
        vm_hwm_kib()
    );
}

// ---------------------------------------------------------------------------------
// 11. A server-first protocol
// ---------------------------------------------------------------------------------

/// Greets on accept, before reading (like SMTP), then answers each line.
async fn banner_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                if write
                    .write_all(b"220 trellis ESMTP ready\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("250 {line}\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_works_without_configuration() {
    let app_port = banner_app().await;
    let mesh = MeshBuilder::default()
        .service("mail", "mail", &[("smtp", 2525, None)])
        .workload("mail-1", "mail", app_port)
        .upstream("mail", 2525)
        .detect_timeout(Duration::from_millis(200))
        .start()
        .await;
    // 2525 is not on the opaque list: detection runs and gives up.
    let mut stream = TcpStream::connect(mesh.upstream("mail", 2525))
        .await
        .unwrap();
    let started = Instant::now();
    let banner = read_until(&mut stream, b"\r\n", Duration::from_secs(5)).await;
    println!("banner after {:?}", started.elapsed());
    assert_eq!(banner, b"220 trellis ESMTP ready\r\n");
    stream.write_all(b"HELO mesh\r\n").await.unwrap();
    let reply = read_until(&mut stream, b"\r\n", Duration::from_secs(5)).await;
    assert_eq!(reply, b"250 HELO mesh\r\n");
    stream.write_all(b"QUIT\r\n").await.unwrap();
    let reply = read_until(&mut stream, b"\r\n", Duration::from_secs(5)).await;
    assert_eq!(reply, b"250 QUIT\r\n");
}

/// On a port of the opaque list (3306, in the default) nothing waits for the client:
/// with a 60 s detection timeout the banner could only arrive within the 10 s bound
/// if detection was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_on_an_opaque_port_skips_detection() {
    let app_port = banner_app().await;
    let mesh = MeshBuilder::default()
        .service("db", "db", &[("mysql", 3306, None)])
        .workload("db-1", "db", app_port)
        .upstream("db", 3306)
        .detect_timeout(Duration::from_secs(60))
        .start()
        .await;
    let conversation = async {
        let mut stream = TcpStream::connect(mesh.upstream("db", 3306)).await.unwrap();
        let banner = read_until(&mut stream, b"\r\n", Duration::from_secs(10)).await;
        assert_eq!(banner, b"220 trellis ESMTP ready\r\n");
        stream.write_all(b"SELECT 1\r\n").await.unwrap();
        let reply = read_until(&mut stream, b"\r\n", Duration::from_secs(10)).await;
        assert_eq!(reply, b"250 SELECT 1\r\n");
    };
    tokio::time::timeout(Duration::from_secs(10), conversation)
        .await
        .expect("the banner waited for protocol detection");
}

// ---------------------------------------------------------------------------------
// 13. Idle timeouts and connection limits
// ---------------------------------------------------------------------------------

/// Echoes each line back; counts accepted connections and closes on EOF.
async fn echo_app() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    App {
        port,
        hits: accepted,
    }
}

/// Sends a line and reads its echo; `None` if the connection ended instead.
async fn echo_line(stream: &mut TcpStream, line: &str) -> Option<String> {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .await
        .ok()?;
    let got = read_until(stream, b"\n", Duration::from_secs(10)).await;
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).trim_end().to_owned())
}

/// True when the peer has closed: a read returns end of stream (or a reset) within
/// `within`. Data received before the end is an error.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!(
            "expected the end, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => false,
    }
}

/// A TrafficPolicy for `service` with `timeouts.idle: 300ms`.
fn idle_policy(service: &str) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1\nkind: TrafficPolicy\n\
         metadata: {{name: {service}, namespace: default}}\n\
         spec:\n  targetRef: {{kind: Service, name: {service}}}\n  timeouts: {{idle: 300ms}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_connection_is_closed_and_an_active_one_stays_open() {
    let app = echo_app().await;
    let mesh = MeshBuilder::default()
        .service("kv", "kv", &[("kv", 7000, Some("tcp"))])
        .workload("kv-1", "kv", app.port)
        .yaml(&idle_policy("kv"))
        .expect_policy("kv")
        .upstream("kv", 7000)
        .start()
        .await;
    let addr = mesh.upstream("kv", 7000);
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        echo_line(&mut silent, "hello").await.as_deref(),
        Some("hello")
    );
    let active = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // 1.5 s of traffic every 100 ms: five idle periods long.
        for i in 0..15 {
            let line = format!("ping {i}");
            assert_eq!(
                echo_line(&mut stream, &line).await.as_deref(),
                Some(line.as_str()),
                "the active connection was closed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "the idle connection was not closed within 10 s"
    );
    active.await.unwrap();
}

type H2Sender = hyper::client::conn::http2::SendRequest<Body>;

/// An HTTP/2 (prior knowledge) connection to `addr`; the task ends when it closes.
async fn h2_connect(
    addr: SocketAddr,
) -> (H2Sender, tokio::task::JoinHandle<Result<(), hyper::Error>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

/// A GET on `sender` that must answer 200 `web`.
async fn h2_get(mut sender: H2Sender) {
    let request = Request::get("http://idle-web.default/")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("no HTTP/2 response within 10 s")
        .expect("the HTTP/2 request failed");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"web");
}

/// An app cannot speak for the proxy: a `trellis-error: app_unreachable` it writes
/// itself is stripped by its sidecar, so the caller's sidecar neither sees a marker
/// nor sends a request (a POST, which did reach an app) to another endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_cannot_forge_the_proxys_error_marker_to_steer_retries() {
    let forger = http_app(|_req: Request<Incoming>| async move {
        let mut response = text(503, "forged");
        response.headers_mut().insert(
            "trellis-error",
            http::HeaderValue::from_static("app_unreachable"),
        );
        response
    })
    .await;
    let other = named_app("other").await;
    let mesh = MeshBuilder::default()
        .service("forge", "forge", &[("http", 80, Some("http"))])
        .workload("forge-1", "forge", forger.port)
        .workload("forge-2", "forge", other.port)
        .upstream("forge", 80)
        .start()
        .await;
    let addr = mesh.upstream("forge", 80);
    let client = http_client();
    // Round robin or P2C: within a few POSTs one lands on the forger.
    let mut sent = 0;
    for _ in 0..20 {
        sent += 1;
        let request = Request::post(format!("http://{addr}/order"))
            .body(Full::new(Bytes::from_static(b"{}")).boxed())
            .unwrap();
        let reply = send(&client, request).await;
        assert!(
            !reply.headers.contains_key("trellis-error"),
            "the app's forged marker reached the caller: {:?}",
            reply.headers
        );
        if forger.hits() > 0 {
            break;
        }
    }
    assert!(forger.hits() > 0, "no request reached the forging app");
    // Each POST reached exactly one app: none the forger answered went on to `other`.
    assert_eq!(forger.hits() + other.hits(), sent);
}

/// The authority an app routes on (virtual hosts, gRPC servers) is the caller's, end to
/// end: HTTP/2's `:authority` and HTTP/1.1's `Host`, never the pod's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_sees_the_callers_authority_over_http2_and_http1() {
    let app = http_app(|req: Request<Incoming>| async move {
        let seen = match req.version() {
            http::Version::HTTP_2 => req.uri().authority().map(|a| a.to_string()),
            _ => req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
        };
        text(200, seen.unwrap_or_else(|| "none".into()))
    })
    .await;
    let mesh = MeshBuilder::default()
        .service("vhost", "vhost", &[("http", 80, Some("http"))])
        .workload("vhost-1", "vhost", app.port)
        .upstream("vhost", 80)
        .start()
        .await;
    let addr = mesh.upstream("vhost", 80);
    const AUTHORITY: &str = "shop.example.test:8080";

    let (mut sender, _conn) = h2_connect(addr).await;
    let request = Request::get(format!("http://{AUTHORITY}/"))
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("no HTTP/2 response within 10 s")
        .expect("the HTTP/2 request failed");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        AUTHORITY.as_bytes(),
        "HTTP/2 :authority at the app"
    );

    let mut http1 = TcpStream::connect(addr).await.unwrap();
    http1
        .write_all(format!("GET / HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let reply = read_until(&mut http1, AUTHORITY.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 200") && reply.ends_with(AUTHORITY.as_bytes()),
        "HTTP/1.1 Host at the app: {:?}",
        String::from_utf8_lossy(&reply)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http_connection_and_its_pooled_mesh_connection_are_closed() {
    let app = named_app("web").await;
    let mesh = MeshBuilder::default()
        .service("idle-web", "idle-web", &[("http", 80, Some("http"))])
        .workload("idle-web-1", "idle-web", app.port)
        .yaml(&idle_policy("idle-web"))
        .expect_policy("idle-web")
        .upstream("idle-web", 80)
        .start()
        .await;
    let addr = mesh.upstream("idle-web", 80);
    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: idle-web\r\n\r\n";
    let mut silent = TcpStream::connect(addr).await.unwrap();
    silent.write_all(REQUEST).await.unwrap();
    let reply = read_until(&mut silent, b"\r\n\r\nweb", Duration::from_secs(10)).await;
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{reply:?}");
    let active = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for _ in 0..15 {
            stream.write_all(REQUEST).await.unwrap();
            let reply = read_until(&mut stream, b"\r\n\r\nweb", Duration::from_secs(10)).await;
            assert!(
                reply.starts_with(b"HTTP/1.1 200") && reply.ends_with(b"web"),
                "the active keep-alive connection broke: {reply:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "the idle keep-alive connection was not closed within 10 s"
    );
    active.await.unwrap();

    // The same for an app speaking HTTP/2: GOAWAY and close after the idle period,
    // while a connection with a request every 100 ms stays.
    let (silent, silent_conn) = h2_connect(addr).await;
    h2_get(silent.clone()).await;
    let active = tokio::spawn(async move {
        let (sender, conn) = h2_connect(addr).await;
        for _ in 0..15 {
            h2_get(sender.clone()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !conn.is_finished(),
            "the active HTTP/2 connection was closed"
        );
    });
    tokio::time::timeout(Duration::from_secs(10), silent_conn)
        .await
        .expect("the idle HTTP/2 connection was not closed within 10 s")
        .unwrap()
        .unwrap();
    assert!(silent.is_closed());
    active.await.unwrap();

    // The mesh connection that carried them closes too: the server sidecar sees it go.
    let opened = "trellis_outbound_connections_total{service=\"idle-web.default\",peer_identity=\"spiffe://cluster.local/ns/default/sa/idle-web\"}";
    // Traffic every 100 ms kept one connection in use (a stalled scheduler could
    // have let it idle out in between, hence at least one).
    let before = mesh.client_metric(opened).await;
    assert!(before >= 1.0, "{before}");
    eventually(
        "the idle mesh connection closed at the server sidecar",
        Duration::from_secs(10),
        || async { sidecar_metric(&mesh, 0, "trellis_active_connections ").await == 0.0 },
    )
    .await;
    // The next request opens a new one.
    let reply = send(&http_client(), get(addr, "/")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mesh.client_metric(opened).await, before + 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_connection_over_the_limit() {
    let app = echo_app().await;
    let mesh = MeshBuilder::default()
        .service("kv", "kv", &[("kv", 7000, Some("tcp"))])
        .workload("kv-1", "kv", app.port)
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: kv, namespace: default}
spec:
  targetRef: {kind: Service, name: kv}
  connectionLimits: {maxConnections: 1}
"#,
        )
        .expect_policy("kv")
        .upstream("kv", 7000)
        .start()
        .await;
    let addr = mesh.upstream("kv", 7000);
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert_eq!(echo_line(&mut first, "one").await.as_deref(), Some("one"));

    let mut second = TcpStream::connect(addr).await.unwrap();
    let _ = second.write_all(b"two\n").await;
    assert!(
        closed_within(&mut second, Duration::from_secs(10)).await,
        "the connection over the limit was not closed"
    );
    // Counted once the refusing task has finished.
    eventually(
        "the refusal is counted",
        Duration::from_secs(10),
        || async {
            mesh.client_metric("trellis_outbound_failures_total{reason=\"max_connections\"}")
                .await
                == 1.0
        },
    )
    .await;
    assert_eq!(
        echo_line(&mut first, "still").await.as_deref(),
        Some("still")
    );
    assert_eq!(app.hits(), 1, "the refused connection reached the app");

    // Once the first is gone, a new connection gets through.
    drop(first);
    eventually(
        "a connection after the first closed works",
        Duration::from_secs(10),
        || async {
            let Ok(mut third) = TcpStream::connect(addr).await else {
                return false;
            };
            echo_line(&mut third, "three").await.as_deref() == Some("three")
        },
    )
    .await;
}

/// A response whose body is still streaming counts against maxPendingRequests (and
/// least-request) until the body ends, not only until its head: while one such
/// response is open, a second request over the limit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_counts_as_pending_until_its_body_ends() {
    type Chunks = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
    let open: Arc<std::sync::Mutex<Option<Chunks>>> = Arc::default();
    let held = open.clone();
    let app = http_app(move |req| {
        let held = held.clone();
        async move {
            if req.uri().path() != "/stream" {
                return text(200, "quick");
            }
            // The head goes out at once; the body ends when the test drops `tx`.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
            *held.lock().unwrap() = Some(tx);
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            Response::new(body.boxed())
        }
    })
    .await;
    let mesh = MeshBuilder::default()
        .service("slowbody", "slowbody", &[("http", 80, Some("http"))])
        .workload("slowbody-1", "slowbody", app.port)
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: slowbody, namespace: default}
spec:
  targetRef: {kind: Service, name: slowbody}
  connectionLimits: {maxPendingRequests: 1}
"#,
        )
        .expect_policy("slowbody")
        .upstream("slowbody", 80)
        .start()
        .await;
    let addr = mesh.upstream("slowbody", 80);
    let client = http_client();

    let streaming = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(get(addr, "/stream")),
    )
    .await
    .expect("no response head within 10 s")
    .unwrap();
    assert_eq!(streaming.status(), StatusCode::OK);
    let mut streaming = streaming.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), streaming.frame())
        .await
        .expect("no first chunk within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"first"));

    // The first response's body is still open: the second request is over the limit.
    let refused = send(&client, get(addr, "/")).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a request beside an open streaming response: {}",
        refused.text()
    );
    assert!(refused.headers.contains_key("trellis-error"));
    assert_eq!(app.hits(), 1, "the refused request reached the app");

    // The body ends: the endpoint is free again.
    drop(open.lock().unwrap().take());
    let rest = tokio::time::timeout(Duration::from_secs(10), streaming.collect())
        .await
        .expect("the streaming body did not end within 10 s")
        .unwrap();
    assert!(rest.to_bytes().is_empty());
    eventually(
        "a request after the body ended gets through",
        Duration::from_secs(10),
        || async { send(&client, get(addr, "/")).await.status == StatusCode::OK },
    )
    .await;
}

/// With several endpoints, a full one is passed over for one under its limit; only
/// when all are full is a connection refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_fills_every_endpoint_before_refusing() {
    let apps = [echo_app().await, echo_app().await, echo_app().await];
    let mut builder = MeshBuilder::default().service("kv", "kv", &[("kv", 7000, Some("tcp"))]);
    for (i, app) in apps.iter().enumerate() {
        builder = builder.workload(&format!("kv-{i}"), "kv", app.port);
    }
    let mesh = builder
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: kv, namespace: default}
spec:
  targetRef: {kind: Service, name: kv}
  connectionLimits: {maxConnections: 1}
"#,
        )
        .expect_policy("kv")
        .upstream("kv", 7000)
        .start()
        .await;
    let addr = mesh.upstream("kv", 7000);
    let mut open = Vec::new();
    for i in 0..3 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let line = format!("conn {i}");
        assert_eq!(
            echo_line(&mut stream, &line).await.as_deref(),
            Some(line.as_str()),
            "connection {i} of 3 was refused while an endpoint had room"
        );
        open.push(stream);
    }
    let hits: Vec<usize> = apps.iter().map(App::hits).collect();
    assert_eq!(hits, [1, 1, 1], "one connection per endpoint");
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    let _ = fourth.write_all(b"four\n").await;
    assert!(
        closed_within(&mut fourth, Duration::from_secs(10)).await,
        "a fourth connection got through with every endpoint full"
    );
}

/// Many requests arriving before any mesh connection exists stay within the limits:
/// HTTP/1.1 callers' requests ride at most `maxConnections` kept-alive HTTP/1.1
/// connections (the others wait their turn), and HTTP/2 callers' streams share one
/// multiplexed connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_stay_within_the_mesh_connection_limits() {
    let app = http_app(|_req| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text(200, "web")
    })
    .await;
    let mesh = MeshBuilder::default()
        .service("idle-web", "idle-web", &[("http", 80, Some("http"))])
        .workload("idle-web-1", "idle-web", app.port)
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: idle-web, namespace: default}
spec:
  targetRef: {kind: Service, name: idle-web}
  connectionLimits: {maxConnections: 4}
"#,
        )
        .expect_policy("idle-web")
        .upstream("idle-web", 80)
        .start()
        .await;
    let addr = mesh.upstream("idle-web", 80);
    let opened = "trellis_outbound_connections_total{service=\"idle-web.default\",peer_identity=\"spiffe://cluster.local/ns/default/sa/idle-web\"}";
    let replies = run_requests(40, 40, move |_| get(addr, "/")).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let http1 = mesh.client_metric(opened).await;
    assert!(
        (1.0..=4.0).contains(&http1),
        "{http1} HTTP/1.1 mesh connections opened to the one endpoint, limit 4"
    );

    let (sender, _conn) = h2_connect(addr).await;
    let streams: Vec<_> = (0..40)
        .map(|_| tokio::spawn(h2_get(sender.clone())))
        .collect();
    for stream in streams {
        stream.await.unwrap();
    }
    assert_eq!(
        mesh.client_metric(opened).await,
        http1 + 1.0,
        "HTTP/2 streams share one mesh connection"
    );
}

// ---------------------------------------------------------------------------------
// 14. P2C and fast failures
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_less_traffic_to_an_endpoint_that_fails_fast() {
    let failing = http_app(|_req| async { text(500, "broken") }).await;
    let healthy = http_app(|_req| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        text(200, "ok")
    })
    .await;
    // Ejection off and no retries: only the balancer's cost keeps traffic away.
    let mesh = MeshBuilder::default()
        .service("p2c", "p2c", &[("http", 80, Some("http"))])
        .workload("p2c-failing", "p2c", failing.port)
        .workload("p2c-healthy", "p2c", healthy.port)
        .yaml(
            r#"apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: p2c, namespace: default}
spec:
  targetRef: {kind: Service, name: p2c}
  loadBalancer: {algorithm: P2C_EWMA}
  outlierDetection: {consecutiveFailures: 100000, maxEjectionPercent: 0}
"#,
        )
        .expect_policy("p2c")
        .upstream("p2c", 80)
        .start()
        .await;
    let addr = mesh.upstream("p2c", 80);
    const N: usize = 400;
    let replies = run_requests(N, 4, move |_| get(addr, "/")).await;
    let failed = replies
        .iter()
        .filter(|r| r.status == StatusCode::INTERNAL_SERVER_ERROR)
        .count();
    println!(
        "P2C with a fast-failing endpoint: failing {}, healthy {}",
        failing.hits(),
        healthy.hits()
    );
    assert_eq!(failing.hits() + healthy.hits(), N);
    assert_eq!(failed, failing.hits(), "every failure reached the caller");
    assert!(
        failing.hits() < N / 4,
        "the fast-failing endpoint got {} of {N}",
        failing.hits()
    );
}

// ---------------------------------------------------------------------------------
// 12. A malformed request
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_gets_400_or_a_close_never_a_hang() {
    let app = named_app("web").await;
    let mesh = MeshBuilder::default()
        .service(
            "web",
            "web",
            &[("http", 80, Some("http")), ("web", 8080, None)],
        )
        .workload("web-1", "web", app.port)
        .upstream("web", 80)
        .upstream("web", 8080)
        .start()
        .await;
    for port in [80, 8080] {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        ] {
            let mut stream = TcpStream::connect(mesh.upstream("web", port))
                .await
                .unwrap();
            stream.write_all(bad).await.unwrap();
            let mut got = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
            let got = String::from_utf8_lossy(&got).into_owned();
            let request = String::from_utf8_lossy(bad);
            assert!(
                read.is_ok(),
                "port {port}: {request:?} hung (got {got:?} so far)"
            );
            assert!(
                got.is_empty() || got.starts_with("HTTP/1.1 400"),
                "port {port}: {request:?} got {got:?}"
            );
            println!("port {port}: {request:?} -> {:?}", got.lines().next());
        }
    }
    assert_eq!(app.hits(), 0, "a malformed request reached the app");
    // The proxy is unharmed.
    let reply = send(&http_client(), get(mesh.upstream("web", 80), "/")).await;
    assert_eq!(reply.status, StatusCode::OK);
}
