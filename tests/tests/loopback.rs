//! The walking skeleton on loopback: control plane, CA, discovery and two sidecars
//! carrying bytes over mutual TLS, all real, in one process.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::SpiffeId;
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};
use trellis_tests::loopback::{eventually, free_port, http_get};

const TOKEN_ECHO: &str = "echo-token-0123456789";
const TOKEN_CLIENT: &str = "client-token-0123456789";
const TOKEN_IMPOSTOR: &str = "impostor-token-0123456789";

struct Ports {
    echo_app: u16,
    echo_inbound: u16,
    impostor_inbound: u16,
}

fn registry_yaml(p: &Ports) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: echo}}
  ports: [{{name: tcp-echo, port: 7000, targetPort: echo}}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: echo-1, namespace: default, labels: {{app: echo}}}}
spec: {{address: 127.0.0.1, serviceAccount: echo, ports: {{echo: {echo_app}}}, sidecarPort: {echo_inbound}}}
---
# A service whose endpoint claims to be "echo" but whose sidecar holds another identity.
apiVersion: v1
kind: Service
metadata: {{name: spoofed, namespace: default}}
spec:
  selector: {{app: spoofed}}
  ports: [{{name: tcp-echo, port: 7000, targetPort: {echo_app}}}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: spoofed-1, namespace: default, labels: {{app: spoofed}}}}
spec: {{address: 127.0.0.1, serviceAccount: echo, sidecarPort: {impostor_inbound}}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: echo, namespace: default}}
spec: {{serviceAccount: echo, token: {TOKEN_ECHO}}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: client, namespace: default}}
spec: {{serviceAccount: client, token: {TOKEN_CLIENT}}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: impostor, namespace: default}}
spec: {{serviceAccount: impostor, token: {TOKEN_IMPOSTOR}}}
"#,
        echo_app = p.echo_app,
        echo_inbound = p.echo_inbound,
        impostor_inbound = p.impostor_inbound,
    )
}

async fn start_control(registry: &Path, state: &Path, cert_ttl: Duration) -> RunningControlPlane {
    trellis_control::start(ControlConfig {
        registry_dir: registry.to_owned(),
        state_dir: state.to_owned(),
        trust_domain: "cluster.local".into(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        cert_ttl,
        server_names: vec!["trellis-control".into()],
    })
    .await
    .unwrap()
}

fn proxy_config(control: &RunningControlPlane, sa: &str, token: &str) -> ProxyConfig {
    let id = SpiffeId::new("cluster.local", "default", sa).unwrap();
    let mut config = ProxyConfig::new(id, control.grpc_addr.to_string(), control.root_pem.clone());
    config.bootstrap_token = Some(token.to_owned());
    config.inbound_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config
}

/// A line-echo app that counts the connections it was given.
async fn echo_app(port: u16) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    accepted
}

/// Sends `msg` and returns what came back before the peer closed or 2 s passed.
async fn round_trip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return Vec::new();
    };
    if stream.write_all(msg).await.is_err() {
        return Vec::new();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    while got.len() < msg.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

struct Mesh {
    _dir: tempfile::TempDir,
    registry: std::path::PathBuf,
    control: RunningControlPlane,
    echo: RunningProxy,
    client: RunningProxy,
    echo_upstream: SocketAddr,
    spoofed_upstream: SocketAddr,
    ports: Ports,
    app_connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn mesh() -> Mesh {
    mesh_with_ttl(Duration::from_secs(24 * 3600)).await
}

async fn mesh_with_ttl(cert_ttl: Duration) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    std::fs::create_dir(&registry).unwrap();
    let ports = Ports {
        echo_app: free_port(),
        echo_inbound: free_port(),
        impostor_inbound: free_port(),
    };
    std::fs::write(registry.join("mesh.yaml"), registry_yaml(&ports)).unwrap();
    let control = start_control(&registry, &dir.path().join("state"), cert_ttl).await;
    let app_connections = echo_app(ports.echo_app).await;

    let mut echo = proxy_config(&control, "echo", TOKEN_ECHO);
    echo.inbound_addr = SocketAddr::from(([127, 0, 0, 1], ports.echo_inbound));
    echo.app_port = Some(ports.echo_app);
    let echo = trellis_proxy::start(echo).await.unwrap();

    let mut client = proxy_config(&control, "client", TOKEN_CLIENT);
    client.upstreams = vec![
        Upstream {
            service: "echo.default".into(),
            port: 7000,
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        Upstream {
            service: "spoofed.default".into(),
            port: 7000,
            listen: "127.0.0.1:0".parse().unwrap(),
        },
    ];
    let client = trellis_proxy::start(client).await.unwrap();
    for proxy in [&echo, &client] {
        tokio::time::timeout(Duration::from_secs(10), proxy.ready())
            .await
            .unwrap();
    }
    Mesh {
        echo_upstream: client.upstream_addrs[0],
        spoofed_upstream: client.upstream_addrs[1],
        _dir: dir,
        registry,
        control,
        echo,
        client,
        ports,
        app_connections,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_over_mtls_and_the_server_sees_the_client_identity() {
    let mesh = mesh().await;
    assert_eq!(http_get(mesh.client.admin_addr, "/ready").await.0, 200);

    let msg = b"hello through the mesh\n";
    assert_eq!(round_trip(mesh.echo_upstream, msg).await, msg);

    let (_, metrics) = http_get(mesh.echo.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"trellis_inbound_connections_total{peer_identity="spiffe://cluster.local/ns/default/sa/client"} 1"#),
        "{metrics}"
    );
    let (_, metrics) = http_get(mesh.client.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(
            r#"service="echo.default",peer_identity="spiffe://cluster.local/ns/default/sa/echo""#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_the_wrong_identity_is_refused_by_the_client() {
    let mesh = mesh().await;
    // The impostor has a valid mesh certificate, but for sa/impostor, not sa/echo.
    let mut impostor = proxy_config(&mesh.control, "impostor", TOKEN_IMPOSTOR);
    impostor.inbound_addr = SocketAddr::from(([127, 0, 0, 1], mesh.ports.impostor_inbound));
    impostor.app_port = Some(mesh.ports.echo_app);
    let impostor = trellis_proxy::start(impostor).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), impostor.ready())
        .await
        .unwrap();
    let before = mesh
        .app_connections
        .load(std::sync::atomic::Ordering::SeqCst);

    assert_eq!(round_trip(mesh.spoofed_upstream, b"secret\n").await, b"");

    assert_eq!(
        mesh.app_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    let admin = mesh.client.admin_addr;
    eventually(
        "the client counts the refused handshake",
        Duration::from_secs(3),
        || async move {
            let (_, metrics) = http_get(admin, "/metrics").await;
            metrics.contains(r#"trellis_outbound_failures_total{reason="tls_handshake"} 1"#)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_the_inbound_port_is_refused() {
    let mesh = mesh().await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], mesh.ports.echo_inbound));
    let got = round_trip(inbound, b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n").await;
    assert!(
        got.is_empty() || !got.starts_with(b"GET"),
        "plaintext reached the app: {got:?}"
    );
    assert_eq!(
        mesh.app_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let admin = mesh.echo.admin_addr;
    eventually(
        "the server counts the refused handshake",
        Duration::from_secs(3),
        || async move {
            let (_, metrics) = http_get(admin, "/metrics").await;
            metrics.contains(r#"trellis_inbound_refused_total{reason="tls_handshake"} 1"#)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_bootstrap_token_gets_no_certificate() {
    let mesh = mesh().await;
    let config = proxy_config(&mesh.control, "echo", "not-a-known-token");
    let err = match trellis_proxy::start(config).await {
        Ok(_) => panic!("a proxy with a bad token got a certificate"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("Unauthenticated")
            || err.contains("unauthenticated")
            || err.contains("not known"),
        "{err}"
    );

    // A known token cannot buy someone else's identity either.
    let config = proxy_config(&mesh.control, "echo", TOKEN_CLIENT);
    let err = match trellis_proxy::start(config).await {
        Ok(_) => panic!("a client token got the echo identity"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("proof of identity is for spiffe://cluster.local/ns/default/sa/client"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_changes_reach_the_proxy_and_bad_files_change_nothing() {
    let mesh = mesh().await;
    let added = r#"apiVersion: v1
kind: Service
metadata: {name: added, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80}]
"#;
    std::fs::write(mesh.registry.join("added.yaml"), added).unwrap();
    let state = mesh.client.admin.state.clone();
    let took = eventually(
        "the new service reaches the client proxy",
        Duration::from_secs(3),
        || {
            let has = state
                .borrow()
                .services
                .contains_key(&("added.default".to_owned(), 80));
            async move { has }
        },
    )
    .await;
    println!("registry change reached the proxy in {took:?}");

    std::fs::write(
        mesh.registry.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: x\n",
    )
    .unwrap();
    let admin = mesh.control.debug_addr;
    eventually(
        "the control plane reports the broken file",
        Duration::from_secs(3),
        || async move {
            let (_, body) = http_get(admin, "/registry").await;
            body.contains("broken.yaml")
        },
    )
    .await;
    let (_, body) = http_get(admin, "/registry").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let errors = status["last_error"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["line"].as_u64().is_some()),
        "{body}"
    );

    // The last good config stays in force, and traffic still flows.
    assert!(
        state
            .borrow()
            .services
            .contains_key(&("added.default".to_owned(), 80))
    );
    assert!(
        state
            .borrow()
            .services
            .contains_key(&("echo.default".to_owned(), 7000))
    );
    assert_eq!(
        round_trip(mesh.echo_upstream, b"still here\n").await,
        b"still here\n"
    );
}

/// OpenSSL, not our code, checks the certificate the CA issued over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issued_certificate_verifies_with_openssl() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        println!("SKIPPED: openssl is not installed");
        return;
    }
    let mesh = mesh().await;
    let (status, body) = http_get(mesh.echo.admin_addr, "/certs").await;
    assert_eq!(status, 200);
    let certs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(!body.contains("PRIVATE KEY"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("leaf.pem"),
        certs["chain_pem"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("root.pem"), &mesh.control.root_pem).unwrap();
    let verify = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args(["verify", "-CAfile", "root.pem", "leaf.pem"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let text = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            "leaf.pem",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/echo"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_at_half_life_without_dropping_connections() {
    let mesh = mesh_with_ttl(Duration::from_secs(4)).await;
    let serial = |p: &RunningProxy| {
        p.admin
            .tls
            .borrow()
            .as_ref()
            .map(|t| t.certificate().serial.clone())
    };
    let (echo_first, client_first) = (serial(&mesh.echo), serial(&mesh.client));

    let mut open = TcpStream::connect(mesh.echo_upstream).await.unwrap();
    let mut buf = [0u8; 4];
    open.write_all(b"one\n").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();

    let took = eventually("both certificates renew", Duration::from_secs(10), || {
        let renewed = serial(&mesh.echo) != echo_first && serial(&mesh.client) != client_first;
        async move { renewed }
    })
    .await;
    println!("renewed {took:?} into a 4 s lifetime");

    // The connection opened under the old certificates carries on...
    open.write_all(b"two\n").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two\n");
    // ...and new ones handshake with the new certificates.
    assert_eq!(round_trip(mesh.echo_upstream, b"three\n").await, b"three\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_connections_and_refuses_new_ones() {
    let mesh = mesh().await;
    let mut open = TcpStream::connect(mesh.echo_upstream).await.unwrap();
    open.write_all(b"before\n").await.unwrap();
    let mut buf = [0u8; 7];
    open.read_exact(&mut buf).await.unwrap();

    let upstream = mesh.echo_upstream;
    let draining = tokio::spawn(mesh.client.shutdown(Duration::from_secs(10)));
    eventually(
        "the listener closes",
        Duration::from_secs(3),
        || async move { TcpStream::connect(upstream).await.is_err() },
    )
    .await;
    // The connection opened before the drain still works...
    open.write_all(b"during\n").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during\n");
    assert!(
        !draining.is_finished(),
        "the drain must wait for the open connection"
    );
    // ...and closing it ends the drain well before its deadline.
    drop(open);
    tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .unwrap()
        .unwrap();
}

/// The kubelet's probes under STRICT mTLS: the health port answers for the proxy and
/// runs the app's own HTTP probes over loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_serves_proxy_and_app_probes() {
    let mesh = mesh().await;
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = app.accept().await {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
            let status = if ok {
                "200 OK"
            } else {
                "500 Internal Server Error"
            };
            let _ = stream
                .write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    let mut config = proxy_config(&mesh.control, "client", TOKEN_CLIENT);
    config.health_addr = Some("127.0.0.1:0".parse().unwrap());
    config.app_probes = trellis_proxy::health::parse_app_probes(&format!(
        r#"{{"/app-health/web/readyz": {{"httpGet": {{"path": "/ok", "port": {app_port}}}}},
            "/app-health/web/livez": {{"httpGet": {{"path": "/bad", "port": {app_port}}}}}}}"#
    ))
    .unwrap();
    let proxy = trellis_proxy::start(config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy.ready())
        .await
        .unwrap();
    let health = proxy.health_addr.unwrap();
    assert_eq!(http_get(health, "/ready").await.0, 200);
    assert_eq!(http_get(health, "/live").await.0, 200);
    assert_eq!(http_get(health, "/app-health/web/readyz").await.0, 200);
    assert_eq!(http_get(health, "/app-health/web/livez").await.0, 503);
    assert_eq!(http_get(health, "/app-health/other/readyz").await.0, 404);
    assert!(http_get(health, "/metrics").await.1.contains("trellis_"));
}

/// Metrics merging: the app's own metrics, scraped on localhost, come with the
/// proxy's from the health port; an app that stops answering costs only its own
/// lines (counted), never the proxy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_merges_the_apps_own_metrics() {
    let mesh = mesh().await;
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    let serving = tokio::spawn(async move {
        while let Ok((mut stream, _)) = app.accept().await {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let body = if String::from_utf8_lossy(&buf[..n]).starts_with("GET /stats ") {
                "# TYPE app_orders_total counter\napp_orders_total 3\n# EOF\n"
            } else {
                ""
            };
            let _ = stream
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    let mut config = proxy_config(&mesh.control, "client", TOKEN_CLIENT);
    config.health_addr = Some("127.0.0.1:0".parse().unwrap());
    config.app_metrics = Some(
        trellis_proxy::app_metrics::AppMetrics::from_annotations(&format!(
            r#"{{"prometheus.io/port": "{app_port}", "prometheus.io/path": "/stats"}}"#
        ))
        .unwrap(),
    );
    let proxy = trellis_proxy::start(config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy.ready())
        .await
        .unwrap();
    let health = proxy.health_addr.unwrap();

    let (status, merged) = http_get(health, "/metrics").await;
    assert_eq!(status, 200);
    assert!(merged.contains("trellis_active_connections"), "{merged}");
    assert!(merged.contains("\napp_orders_total 3\n"), "{merged}");
    assert!(
        !merged.contains("# EOF"),
        "an end marker before the end: {merged}"
    );
    assert!(merged.contains("trellis_app_metrics_scrape_failures_total 0"));

    // The app is gone: the proxy's metrics still come, and say so.
    serving.abort();
    let _ = serving.await;
    let (status, alone) = http_get(health, "/metrics").await;
    assert_eq!(status, 200);
    assert!(!alone.contains("app_orders_total"), "{alone}");
    assert!(
        alone.contains("trellis_app_metrics_scrape_failures_total 1"),
        "{alone}"
    );
}
