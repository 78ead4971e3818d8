//! End to end on loopback: the bench servers in-process, ~1 s of load per mode, reports.
//! No timing assertions: the machine is shared and noisy.

use std::time::Duration;

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
        Scenario::new("tcp", tcp, Mode::Tcp).with_proxies([me]),
    ];
    let dir = out_dir("smoke");
    let settings = SuiteSettings {
        rate: 200.0,
        connections: 4,
        size: 1024,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
        max_requests: 1_000,
        baseline: Some("baseline".into()),
        out_dir: Some(dir.clone()),
        pause: Duration::from_millis(100),
        ..SuiteSettings::default()
    };
    let report = run_suite(&scenarios, &settings).await.unwrap();
    assert_eq!(report.scenarios.len(), 3);
    for s in &report.scenarios {
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
    assert_eq!(report.scenarios[1].proxies.len(), 1);
    assert_eq!(report.scenarios[1].proxies[0].pid, me);

    let json = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["scenarios"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["scenarios"][2]["result"]["mode"], "tcp");
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.contains("| scenario | p50 |"));
    for name in ["baseline", "http2", "tcp"] {
        assert!(md.contains(&format!("| {name} |")), "{md}");
    }
    let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
    assert!(svg.trim_start().starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 3);
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
async fn grpc_is_not_yet_supported() {
    let (http, _h) = spawn_http_server("127.0.0.1:0".parse().unwrap(), 16)
        .await
        .unwrap();
    let cfg = LoadConfig::new(http, Mode::Grpc);
    assert!(matches!(
        run_load(&cfg).await,
        Err(BenchError::Unsupported(_))
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
