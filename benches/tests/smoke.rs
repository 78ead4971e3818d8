//! End to end on loopback: the bench servers in-process, ~1 s of load per mode, reports.
//! No timing assertions: the machine is shared and noisy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use trellis_bench::loadgen::{LoadConfig, Mode, run_load};
use trellis_bench::server::{spawn_http_server, spawn_tcp_echo};
use trellis_bench::{BenchError, Scenario, SuiteSettings, run_suite};

fn out_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "trellis-bench-{tag}-{}-{nanos}",
        std::process::id()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_loopback_writes_reports() {
    let loopback = "127.0.0.1:0".parse().unwrap();
    let (http, _h) = spawn_http_server(loopback, 1024).await.unwrap();
    let (tcp, _t) = spawn_tcp_echo(loopback).await.unwrap();
    let me = std::process::id();
    let scenarios = vec![
        Scenario::new("baseline", http, Mode::Http1),
        // This process stands in for a proxy, to exercise the /proc sampling.
        Scenario::new("http2", http, Mode::Http2).with_proxies([me]),
        Scenario::new("grpc", http, Mode::Grpc),
        Scenario::new("tcp", tcp, Mode::Tcp).with_proxies([me]),
    ];
    let dir = out_dir("smoke");
    let settings = SuiteSettings {
        rate: 200.0,
        connections: 4,
        size: 1024,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
        max_requests: 1_000,
        rounds: 2,
        baseline: Some("baseline".into()),
        out_dir: Some(dir.clone()),
        pause: Duration::from_millis(100),
        ..SuiteSettings::default()
    };
    let report = run_suite(&scenarios, &settings).await.unwrap();
    assert_eq!(report.scenarios.len(), 4);
    assert_eq!(report.rounds, 2);
    for s in &report.scenarios {
        assert_eq!(s.rounds.len(), 2, "{}", s.result.scenario);
        assert!(
            s.failure.is_none(),
            "{}: {:?}",
            s.result.scenario,
            s.failure
        );
        assert!(s.result.requests > 0, "{}", s.result.scenario);
        assert_eq!(s.result.errors, 0, "{}", s.result.scenario);
        assert!(!s.curve.is_empty());
        assert!(s.result.p50_us <= s.result.p99_us && s.result.p99_us <= s.result.max_us);
    }
    assert_eq!(report.scenarios[0].result.mode, Mode::Http1);
    assert!(report.scenarios[0].added.is_none());
    assert!(report.scenarios[1].added.is_some());
    assert_eq!(report.scenarios[2].result.mode, Mode::Grpc);
    assert!(report.scenarios[2].ratio.is_some());
    assert_eq!(report.scenarios[1].proxies.len(), 1);
    assert_eq!(report.scenarios[1].proxies[0].pid, me);

    let json = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["scenarios"].as_array().map(Vec::len), Some(4));
    assert_eq!(v["scenarios"][2]["result"]["mode"], "grpc");
    assert_eq!(
        v["scenarios"][3]["rounds"].as_array().map(Vec::len),
        Some(2)
    );
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.contains("| scenario | p50 |"));
    assert!(md.contains("## Spread across rounds"), "{md}");
    for name in ["baseline", "http2", "grpc", "tcp"] {
        assert!(md.contains(&format!("| {name} |")), "{md}");
    }
    let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
    assert!(svg.trim_start().starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 4);
    assert_eq!(svg.matches('<').count(), svg.matches('>').count());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn max_requests_caps_the_run() {
    let (http, _h) = spawn_http_server("127.0.0.1:0".parse().unwrap(), 16)
        .await
        .unwrap();
    let cfg = LoadConfig {
        rate: 200.0,
        connections: 2,
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        max_requests: 20,
        ..LoadConfig::new(http, Mode::Http1)
    };
    let out = run_load(&cfg).await.unwrap();
    assert_eq!(out.sent_total, 20);
    assert_eq!(out.requests + out.errors, 20);
    assert_eq!(out.errors, 0);
}

#[tokio::test]
async fn grpc_echo_calls_succeed() {
    let (http, _h) = spawn_http_server("127.0.0.1:0".parse().unwrap(), 16)
        .await
        .unwrap();
    let cfg = LoadConfig {
        rate: 200.0,
        connections: 2,
        duration: Duration::from_millis(500),
        warmup: Duration::ZERO,
        max_requests: 100,
        ..LoadConfig::new(http, Mode::Grpc)
    };
    let out = run_load(&cfg).await.unwrap();
    assert_eq!(out.sent_total, 100);
    assert_eq!((out.requests, out.errors), (100, 0));
    trellis_bench::grpc::echo_once(http, "bench", 1024)
        .await
        .unwrap();
}

/// The bench server's answer to a gRPC call of `path` carrying `frame`.
async fn call_bench_server(
    addr: SocketAddr,
    path: &str,
    frame: Bytes,
) -> trellis_bench::Result<()> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let uri: http::Uri = format!("http://bench{path}")
        .parse()
        .map_err(|e| BenchError::Config(format!("{e}")))?;
    let resp = sender
        .send_request(trellis_bench::grpc::echo_request(&uri, frame)?)
        .await?;
    let result = trellis_bench::grpc::read_echo_response(resp, 0).await;
    driver.abort();
    result
}

#[tokio::test]
async fn bench_server_rejects_bad_grpc_calls() {
    let (http, _h) = spawn_http_server("127.0.0.1:0".parse().unwrap(), 16)
        .await
        .unwrap();
    let code = |r: trellis_bench::Result<()>| match r {
        Err(BenchError::GrpcStatus { code, .. }) => code,
        other => panic!("expected a gRPC status, got {other:?}"),
    };
    let good = trellis_bench::grpc::echo_frame(8).unwrap();
    // Unknown method: UNIMPLEMENTED.
    assert_eq!(code(call_bench_server(http, "/x.Y/Z", good).await), "12");
    // A frame whose prefix promises more than it carries: INVALID_ARGUMENT.
    let short = Bytes::from_static(&[0, 0, 0, 0, 9, 1, 2]);
    let echo = trellis_bench::grpc::ECHO_PATH;
    assert_eq!(code(call_bench_server(http, echo, short).await), "3");
    // Compressed: INVALID_ARGUMENT.
    let compressed = Bytes::from_static(&[1, 0, 0, 0, 1, 7]);
    assert_eq!(code(call_bench_server(http, echo, compressed).await), "3");
}

/// An HTTP/2 server that answers every request 200 with `headers` and a short body,
/// and never sends trailers.
#[allow(clippy::unwrap_used)]
async fn h2_server_without_trailers(
    headers: &'static [(&'static str, &'static str)],
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| async move {
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"12345")));
                    for (k, v) in headers {
                        resp.headers_mut().insert(*k, HeaderValue::from_static(v));
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn grpc_failures_count_as_errors() {
    let cfg = |addr| LoadConfig {
        rate: 200.0,
        connections: 1,
        duration: Duration::from_millis(200),
        warmup: Duration::ZERO,
        max_requests: 20,
        ..LoadConfig::new(addr, Mode::Grpc)
    };
    // A 200 with data but no grpc-status anywhere.
    let bare = h2_server_without_trailers(&[("content-type", "application/grpc")]).await;
    let out = run_load(&cfg(bare)).await.unwrap();
    assert_eq!((out.requests, out.errors), (0, 20));
    // A trailers-only error status.
    let failing =
        h2_server_without_trailers(&[("content-type", "application/grpc"), ("grpc-status", "14")])
            .await;
    let out = run_load(&cfg(failing)).await.unwrap();
    assert_eq!((out.requests, out.errors), (0, 20));
    assert!(matches!(
        trellis_bench::grpc::echo_once(failing, "bench", 8).await,
        Err(BenchError::GrpcStatus { .. })
    ));
}

#[tokio::test]
async fn refused_target_is_an_error_not_a_hang() {
    // Bind then drop to get a loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = LoadConfig {
        duration: Duration::from_millis(200),
        warmup: Duration::ZERO,
        ..LoadConfig::new(port, Mode::Tcp)
    };
    assert!(run_load(&cfg).await.is_err());
}
