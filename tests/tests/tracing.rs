//! Distributed tracing (issue 12, item 3) on loopback: a control plane, callers'
//! sidecars and callees' sidecars in one process, real hyper apps behind them, real
//! mTLS between the sidecars, and a real OTLP/gRPC collector (a tonic server
//! decoding `ExportTraceServiceRequest`) receiving what the sidecars export.
//!
//! Three pairs of sidecars carry requests to the same recording app:
//! - `echo`: both sidecars export to the collector (every new trace sampled);
//! - `quiet`: tracing off on both, so the app must see exactly the caller's headers;
//! - `lost`: both export to a collector that is not there, with a tiny queue, and
//!   requests must still all succeed.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tokio::net::TcpListener;
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::SpiffeId;
use trellis_proxy::trace::TraceConfig;
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};
use trellis_tests::loopback::{eventually, free_port, http_get};

type Body = BoxBody<Bytes, Infallible>;

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const ECHO: &str = "spiffe://cluster.local/ns/default/sa/echo";

// ---------------------------------------------------------------- the collector

/// A span as the collector received it, with its exporter's `service.name`.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap()
    }
    fn attr(&self, key: &str) -> Option<String> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            any_value::Value::IntValue(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        }
    }
    fn status_code(&self) -> StatusCode {
        self.span
            .status
            .as_ref()
            .map_or(StatusCode::Unset, |s| StatusCode::try_from(s.code).unwrap())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start() -> (Collector, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (collector, addr)
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id() == trace_id)
            .cloned()
            .collect()
    }

    /// Waits for the CLIENT and the SERVER span of `trace_id`.
    async fn hop(&self, trace_id: &str) -> (Received, Received) {
        eventually(
            &format!("a client and a server span of trace {trace_id}"),
            Duration::from_secs(15),
            || {
                let spans = self.of_trace(trace_id);
                async move { spans.len() >= 2 }
            },
        )
        .await;
        let spans = self.of_trace(trace_id);
        assert_eq!(spans.len(), 2, "one span per sidecar: {spans:#?}");
        let client = spans
            .iter()
            .find(|s| s.kind() == SpanKind::Client)
            .cloned()
            .expect("a CLIENT span");
        let server = spans
            .iter()
            .find(|s| s.kind() == SpanKind::Server)
            .cloned()
            .expect("a SERVER span");
        (client, server)
    }
}

// ---------------------------------------------------------------- the app

/// Every request's path and headers, as the app saw them.
type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

async fn recording_app() -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        record
                            .lock()
                            .unwrap()
                            .push((path.clone(), req.headers().clone()));
                        let status = if path == "/fail" { 500 } else { 200 };
                        let mut response =
                            Response::new(Full::new(Bytes::from_static(b"hello")).boxed());
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

fn seen_at(seen: &Seen, path: &str) -> HeaderMap {
    let seen = seen.lock().unwrap();
    let all: Vec<_> = seen.iter().filter(|(p, _)| p == path).collect();
    assert_eq!(all.len(), 1, "the app saw {path} once");
    all[0].1.clone()
}

// ---------------------------------------------------------------- the mesh

struct Mesh {
    collector: Collector,
    seen: Seen,
    echo_upstream: SocketAddr,
    quiet_upstream: SocketAddr,
    lost_upstream: SocketAddr,
    /// `echo`, its caller, `quiet`, its caller, `lost`, its caller.
    proxies: Vec<RunningProxy>,
    _control: RunningControlPlane,
    _dir: tempfile::TempDir,
}

fn token(sa: &str) -> String {
    format!("{sa}-token-0123456789")
}

fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: {{app: {name}}}\n  ports: [{{name: main, port: 80, targetPort: app, appProtocol: http}}]\n"
    )
}

fn workload(app: &str, app_port: u16, sidecar_port: u16) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\n\
         metadata: {{name: {app}-0, namespace: default, labels: {{app: {app}}}}}\n\
         spec: {{address: 127.0.0.1, serviceAccount: {app}, ports: {{app: {app_port}}}, sidecarPort: {sidecar_port}}}\n"
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

/// Tracing to `collector`, every new trace sampled, batches sent at once.
fn traced(collector: SocketAddr, max_queue: usize) -> Option<TraceConfig> {
    let mut trace = TraceConfig::new(format!("http://{collector}"));
    trace.sampling_ratio = 1.0;
    trace.max_queue = max_queue;
    trace.batch_delay = Duration::from_millis(100);
    Some(trace)
}

async fn mesh() -> Mesh {
    let (collector, collector_addr) = Collector::start().await;
    // Nothing listens here: the `lost` sidecars' collector is down.
    let nowhere: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (app, seen) = recording_app().await;
    let sidecar_ports = [
        ("echo", free_port()),
        ("quiet", free_port()),
        ("lost", free_port()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    std::fs::create_dir(&registry).unwrap();
    let mut docs = Vec::new();
    for (name, sidecar) in sidecar_ports {
        docs.push(service(name));
        docs.push(workload(name, app, sidecar));
    }
    for sa in [
        "client",
        "echo",
        "quiet",
        "lost",
        "quiet-client",
        "lost-client",
    ] {
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

    let trace_of = |name: &str| match name {
        "echo" => traced(collector_addr, 2048),
        "lost" => traced(nowhere, 4),
        _ => None,
    };
    let mut proxies = Vec::new();
    let mut upstreams = Vec::new();
    for (name, sidecar) in sidecar_ports {
        let mut config = proxy_config(&control, name);
        config.inbound_addr = SocketAddr::from(([127, 0, 0, 1], sidecar));
        config.app_port = Some(app);
        config.tracing = trace_of(name);
        proxies.push(trellis_proxy::start(config).await.unwrap());

        let caller = if name == "echo" {
            "client".to_owned()
        } else {
            format!("{name}-client")
        };
        let mut config = proxy_config(&control, &caller);
        config.tracing = trace_of(name);
        config.upstreams = vec![Upstream {
            service: format!("{name}.default"),
            port: 80,
            listen: "127.0.0.1:0".parse().unwrap(),
        }];
        let client = trellis_proxy::start(config).await.unwrap();
        upstreams.push(client.upstream_addrs[0]);
        proxies.push(client);
    }
    for proxy in &proxies {
        tokio::time::timeout(Duration::from_secs(10), proxy.ready())
            .await
            .expect("a proxy did not become ready within 10 s");
    }
    for (client, (name, _)) in proxies.iter().skip(1).step_by(2).zip(sidecar_ports) {
        let state = client.admin.state.clone();
        eventually(
            &format!("the {name} caller's sidecar knows its endpoint"),
            Duration::from_secs(10),
            || {
                let state = state.borrow().clone();
                async move {
                    state
                        .services
                        .get(&(format!("{name}.default"), 80))
                        .is_some_and(|s| s.endpoints.all().count() == 1)
                }
            },
        )
        .await;
    }
    Mesh {
        collector,
        seen,
        echo_upstream: upstreams[0],
        quiet_upstream: upstreams[1],
        lost_upstream: upstreams[2],
        proxies,
        _control: control,
        _dir: dir,
    }
}

async fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    let client: Client<HttpConnector, Body> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut request = Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new()).boxed()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("no response within 10 s")
        .expect("the request failed at the client");
    let status = response.status().as_u16();
    tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("no whole body within 10 s")
        .expect("the body failed");
    status
}

/// A counter's value on `proxy`'s admin `/metrics`.
async fn counter(proxy: &RunningProxy, name: &str) -> f64 {
    let (status, text) = http_get(proxy.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// `(trace id, parent id, flags)` of a `traceparent`.
fn traceparent(headers: &HeaderMap) -> (String, String, String) {
    let value = headers
        .get("traceparent")
        .expect("the app got a traceparent")
        .to_str()
        .unwrap();
    let fields: Vec<_> = value.split('-').collect();
    assert_eq!(fields.len(), 4, "{value}");
    assert_eq!(fields[0], "00", "{value}");
    (fields[1].into(), fields[2].into(), fields[3].into())
}

// ---------------------------------------------------------------- the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_propagation_through_two_sidecars() {
    let mesh = mesh().await;

    // W3C from the caller: both spans in its trace, the client's parent is the
    // caller's span, the server's is the client's, the app's is the server's.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let status = send(
        mesh.echo_upstream,
        "/w3c",
        &[
            ("traceparent", &format!("00-{trace}-{caller_span}-01")),
            ("tracestate", "vendor=opaque"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let (client, server) = mesh.collector.hop(trace).await;
    assert_eq!(client.parent_span_id(), caller_span);
    assert_eq!(server.parent_span_id(), client.span_id());
    assert_ne!(server.span_id(), client.span_id());
    let app = seen_at(&mesh.seen, "/w3c");
    assert_eq!(
        traceparent(&app),
        (trace.into(), server.span_id(), "01".into())
    );
    assert_eq!(app["tracestate"], "vendor=opaque");
    assert!(app.get("b3").is_none() && app.get("x-b3-traceid").is_none());

    // The standard attributes, as each side knows them.
    assert_eq!(client.service, "client.default");
    assert_eq!(server.service, "echo.default");
    for span in [&client, &server] {
        assert_eq!(span.attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(span.attr("url.path").as_deref(), Some("/w3c"));
        assert_eq!(
            span.attr("http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(
            span.attr("trellis.source.principal").as_deref(),
            Some(CLIENT)
        );
        assert_eq!(
            span.attr("trellis.destination.principal").as_deref(),
            Some(ECHO)
        );
        assert_eq!(
            span.attr("network.peer.address").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(span.status_code(), StatusCode::Unset);
        assert!(span.attr("server.address").is_some(), "{span:#?}");
    }
    assert_eq!(
        client.attr("trellis.destination.service").as_deref(),
        Some("echo.default")
    );

    // B3, multi headers: honoured, and rewritten for the app.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let status = send(
        mesh.echo_upstream,
        "/b3-multi",
        &[
            ("x-b3-traceid", trace),
            ("x-b3-spanid", caller_span),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let (client, server) = mesh.collector.hop(trace).await;
    assert_eq!(client.parent_span_id(), caller_span);
    assert_eq!(server.parent_span_id(), client.span_id());
    let app = seen_at(&mesh.seen, "/b3-multi");
    assert_eq!(app["x-b3-traceid"], trace);
    assert_eq!(app["x-b3-spanid"], server.span_id().as_str());
    assert_eq!(app["x-b3-parentspanid"], client.span_id().as_str());
    assert_eq!(app["x-b3-sampled"], "1");
    assert_eq!(
        traceparent(&app),
        (trace.into(), server.span_id(), "01".into())
    );

    // B3, one header.
    let trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let caller_span = "e457b5a2e4d86bd1";
    let b3 = format!("{trace}-{caller_span}-1");
    assert_eq!(
        send(mesh.echo_upstream, "/b3-single", &[("b3", &b3)]).await,
        200
    );
    let (client, server) = mesh.collector.hop(trace).await;
    assert_eq!(client.parent_span_id(), caller_span);
    assert_eq!(server.parent_span_id(), client.span_id());
    let app = seen_at(&mesh.seen, "/b3-single");
    assert_eq!(
        app["b3"],
        format!("{trace}-{}-1", server.span_id()).as_str()
    );

    // No context: the caller's sidecar starts a trace (sampled: ratio 1 here).
    assert_eq!(send(mesh.echo_upstream, "/fresh", &[]).await, 200);
    let (trace, parent, flags) = traceparent(&seen_at(&mesh.seen, "/fresh"));
    assert_eq!(flags, "01");
    let (client, server) = mesh.collector.hop(&trace).await;
    assert_eq!(
        client.parent_span_id(),
        "",
        "a new trace's first span is a root"
    );
    assert_eq!(server.parent_span_id(), client.span_id());
    assert_eq!(parent, server.span_id());

    // An app's 500: an error on both spans (both conventions say so for 5xx).
    let trace = "11111111111111111111111111111111";
    let status = send(
        mesh.echo_upstream,
        "/fail",
        &[("traceparent", &format!("00-{trace}-2222222222222222-01"))],
    )
    .await;
    assert_eq!(status, 500);
    let (client, server) = mesh.collector.hop(trace).await;
    for span in [&client, &server] {
        assert_eq!(span.status_code(), StatusCode::Error);
        assert_eq!(span.attr("error.type").as_deref(), Some("500"));
    }

    // The caller said "not sampled": propagated, nothing recorded. (Checked after
    // a sampled request sent later has been exported, so its spans had their chance.)
    let unsampled = "33333333333333333333333333333333";
    let status = send(
        mesh.echo_upstream,
        "/unsampled",
        &[(
            "traceparent",
            &format!("00-{unsampled}-4444444444444444-00"),
        )],
    )
    .await;
    assert_eq!(status, 200);
    let (trace, parent, flags) = traceparent(&seen_at(&mesh.seen, "/unsampled"));
    assert_eq!((trace.as_str(), flags.as_str()), (unsampled, "00"));
    assert_ne!(parent, "4444444444444444", "each hop is a span of its own");
    let later = "55555555555555555555555555555555";
    send(
        mesh.echo_upstream,
        "/later",
        &[("traceparent", &format!("00-{later}-6666666666666666-01"))],
    )
    .await;
    mesh.collector.hop(later).await;
    assert!(mesh.collector.of_trace(unsampled).is_empty());

    // Tracing off: the app sees exactly what the caller sent (less hop-by-hop
    // headers, plus the proxy's identity header), and nothing is exported.
    let quiet = "77777777777777777777777777777777";
    let sent = [
        ("traceparent", format!("00-{quiet}-8888888888888888-01")),
        ("tracestate", "vendor=opaque".to_owned()),
        ("b3", format!("{quiet}-8888888888888888-1")),
        ("x-b3-traceid", quiet.to_owned()),
        ("x-b3-spanid", "8888888888888888".to_owned()),
        ("x-b3-sampled", "1".to_owned()),
        ("x-caller", "kept".to_owned()),
    ];
    let pairs: Vec<(&str, &str)> = sent.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_eq!(send(mesh.quiet_upstream, "/quiet", &pairs).await, 200);
    let app = seen_at(&mesh.seen, "/quiet");
    let mut got: Vec<(String, String)> = app
        .iter()
        .filter(|(name, _)| !["host", "x-forwarded-client-cert"].contains(&name.as_str()))
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = sent
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.clone()))
        .collect();
    want.sort();
    assert_eq!(got, want);
    let later = "99999999999999999999999999999999";
    send(
        mesh.echo_upstream,
        "/later-still",
        &[("traceparent", &format!("00-{later}-6666666666666666-01"))],
    )
    .await;
    mesh.collector.hop(later).await;
    assert!(mesh.collector.of_trace(quiet).is_empty());
    let services: std::collections::BTreeSet<_> = mesh
        .collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.service.clone())
        .collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["client.default", "echo.default"],
        "only the traced pair exports"
    );

    // The collector is down and the queue holds four spans: every request is
    // answered all the same (bounded: 200 requests, each within the send timeout).
    for i in 0..200 {
        let status = send(mesh.lost_upstream, &format!("/lost/{i}"), &[]).await;
        assert_eq!(status, 200, "request {i} with the collector down");
    }
    let app = seen_at(&mesh.seen, "/lost/199");
    let (_, _, flags) = traceparent(&app);
    assert_eq!(
        flags, "01",
        "spans are still made (and dropped) when it is down"
    );
    let lost_caller = &mesh.proxies[5];
    eventually(
        "the lost caller's sidecar counts spans it could not export",
        Duration::from_secs(20),
        || async { counter(lost_caller, "trellis_span_export_failures_total").await > 0.0 },
    )
    .await;
    assert_eq!(
        counter(lost_caller, "trellis_spans_exported_total").await,
        0.0
    );

    // What the traced pair exported, counted; the quiet pair exported nothing.
    let caller = &mesh.proxies[1];
    eventually(
        "the caller's sidecar counts its 7 sampled spans as exported",
        Duration::from_secs(10),
        || async { counter(caller, "trellis_spans_exported_total").await == 7.0 },
    )
    .await;
    assert_eq!(
        counter(&mesh.proxies[1], "trellis_span_export_failures_total").await,
        0.0
    );
    for quiet in &mesh.proxies[2..4] {
        assert_eq!(counter(quiet, "trellis_spans_exported_total").await, 0.0);
    }
}
