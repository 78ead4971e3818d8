//! Policy enforced in the data plane (AuthorizationPolicy, PeerAuthentication), end to
//! end on loopback: a real control plane reads the policies from its registry folder
//! and the echo sidecar enforces them on callers whose identities their certificates
//! prove.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::SpiffeId;
use trellis_proto::discovery::v1::type_url;
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};
use trellis_tests::loopback::{free_port, http_get};

const CALLERS: [&str; 3] = ["a", "b", "c"];

struct Mesh {
    _dir: tempfile::TempDir,
    registry: PathBuf,
    control: RunningControlPlane,
    echo: RunningProxy,
    lines: RunningProxy,
    /// Per caller: (HTTP upstream to echo, TCP upstream to lines).
    callers: Vec<(SpiffeId, SocketAddr, SocketAddr, RunningProxy)>,
    echo_inbound: SocketAddr,
}

fn base_registry(echo_app: u16, echo_inbound: u16, lines_app: u16, lines_inbound: u16) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: {echo_app}, appProtocol: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: lines, namespace: default}}
spec:
  selector: {{app: lines}}
  ports: [{{name: tcp, port: 9000, targetPort: {lines_app}, appProtocol: tcp}}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: echo-1, namespace: default, labels: {{app: echo}}}}
spec: {{address: 127.0.0.1, serviceAccount: echo, sidecarPort: {echo_inbound}}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: lines-1, namespace: default, labels: {{app: lines}}}}
spec: {{address: 127.0.0.1, serviceAccount: lines, sidecarPort: {lines_inbound}}}
"#
    );
    for sa in CALLERS.iter().chain(&["echo", "lines"]) {
        yaml.push_str(&format!(
            "---\napiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\nmetadata: {{name: {sa}, namespace: default}}\nspec: {{serviceAccount: {sa}, token: token-{sa}}}\n"
        ));
    }
    yaml
}

async fn http_app(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

async fn line_app(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

async fn start_proxy(
    control: &RunningControlPlane,
    sa: &str,
    tune: impl FnOnce(&mut ProxyConfig),
) -> RunningProxy {
    let id = SpiffeId::new("cluster.local", "default", sa).unwrap();
    let mut config = ProxyConfig::new(id, control.grpc_addr.to_string(), control.root_pem.clone());
    config.bootstrap_token = Some(format!("token-{sa}"));
    config.inbound_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.detect_timeout = Duration::from_millis(200);
    tune(&mut config);
    let proxy = trellis_proxy::start(config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy.ready())
        .await
        .unwrap();
    proxy
}

async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    std::fs::create_dir(&registry).unwrap();
    let (echo_app, echo_inbound, lines_app, lines_inbound) =
        (free_port(), free_port(), free_port(), free_port());
    std::fs::write(
        registry.join("mesh.yaml"),
        base_registry(echo_app, echo_inbound, lines_app, lines_inbound),
    )
    .unwrap();
    let control = trellis_control::start(ControlConfig {
        registry_dir: registry.clone(),
        state_dir: dir.path().join("state"),
        trust_domain: "cluster.local".into(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        cert_ttl: Duration::from_secs(3600),
        server_names: vec!["trellis-control".into()],
    })
    .await
    .unwrap();
    http_app(echo_app).await;
    line_app(lines_app).await;
    let echo = start_proxy(&control, "echo", |c| {
        c.inbound_addr = SocketAddr::from(([127, 0, 0, 1], echo_inbound));
        c.app_port = Some(echo_app);
    })
    .await;
    let lines = start_proxy(&control, "lines", |c| {
        c.inbound_addr = SocketAddr::from(([127, 0, 0, 1], lines_inbound));
        c.app_port = Some(lines_app);
    })
    .await;
    let mut callers = Vec::new();
    for sa in CALLERS {
        let proxy = start_proxy(&control, sa, |c| {
            c.upstreams = vec![
                Upstream {
                    service: "echo.default".into(),
                    port: 80,
                    listen: "127.0.0.1:0".parse().unwrap(),
                },
                Upstream {
                    service: "lines.default".into(),
                    port: 9000,
                    listen: "127.0.0.1:0".parse().unwrap(),
                },
            ];
        })
        .await;
        callers.push((
            SpiffeId::new("cluster.local", "default", sa).unwrap(),
            proxy.upstream_addrs[0],
            proxy.upstream_addrs[1],
            proxy,
        ));
    }
    Mesh {
        _dir: dir,
        registry,
        control,
        echo,
        lines,
        callers,
        echo_inbound: SocketAddr::from(([127, 0, 0, 1], echo_inbound)),
    }
}

/// One HTTP/1.1 request on a fresh connection; the status, or 0 if none came.
async fn status(addr: SocketAddr, method: &str, path: &str) -> u16 {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return 0;
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: echo.default\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    if stream.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Writes the policy file and waits until `proxy` holds exactly `names`.
async fn set_policies(mesh: &Mesh, proxy: &RunningProxy, yaml: &str, names: &[&str]) {
    std::fs::write(mesh.registry.join("policy.yaml"), yaml).unwrap();
    let start = Instant::now();
    loop {
        let held: Vec<String> = proxy
            .admin
            .state
            .borrow()
            .resources
            .by_type
            .get(type_url::AUTHORIZATION_POLICY)
            .map(|r| r.values().map(|p| p.name.clone()).collect())
            .unwrap_or_default();
        if held.len() == names.len() && names.iter().all(|n| held.iter().any(|h| h.ends_with(n))) {
            return;
        }
        if start.elapsed() > Duration::from_secs(5) {
            let (_, registry) = http_get(mesh.control.debug_addr, "/registry").await;
            let (_, dump) = http_get(proxy.admin_addr, "/metrics").await;
            panic!(
                "policies {names:?} not applied, holding {held:?}\nregistry: {registry}\nproxy: {dump}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ALLOW_A_B: &str = r#"apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-a-b, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/a", "*/sa/b"]}}]
    to: [{operation: {methods: [GET], paths: ["/public/*"]}}]
"#;

const DENY_C: &str = r#"apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-c, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/c"]}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_matrix_holds_end_to_end() {
    let mesh = mesh().await;
    let requests = [
        ("GET", "/public/x"),
        ("GET", "/private"),
        ("DELETE", "/public/x"),
    ];
    // (policy YAML, policy names, expected statuses per caller and request)
    type Case<'a> = (&'a str, &'a [&'a str], [[u16; 3]; 3]);
    let cases: [Case; 3] = [
        // caller a, b, c × allowed path, denied path, denied method
        (
            ALLOW_A_B,
            &["allow-a-b"],
            [[200, 403, 403], [200, 403, 403], [403, 403, 403]],
        ),
        (
            DENY_C,
            &["deny-c"],
            [[200, 200, 200], [200, 200, 200], [403, 403, 403]],
        ),
        ("", &[], [[200, 200, 200], [200, 200, 200], [200, 200, 200]]),
    ];
    for (yaml, names, expected) in cases {
        set_policies(&mesh, &mesh.echo, yaml, names).await;
        for ((id, http, _, _), want) in mesh.callers.iter().zip(expected) {
            for ((method, path), want) in requests.iter().zip(want) {
                assert_eq!(
                    status(*http, method, path).await,
                    want,
                    "{names:?}: {id} {method} {path}"
                );
            }
        }
    }
    let (_, metrics) = http_get(mesh.echo.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("trellis_authz_denied_total{policy=\"default/deny-c\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_deny_lets_the_next_request_through_and_an_added_one_closes_tcp() {
    let mesh = mesh().await;
    let (_, http_c, tcp_c, _) = &mesh.callers[2];
    set_policies(&mesh, &mesh.echo, DENY_C, &["deny-c"]).await;
    assert_eq!(status(*http_c, "GET", "/").await, 403);
    set_policies(&mesh, &mesh.echo, "", &[]).await;
    assert_eq!(status(*http_c, "GET", "/").await, 200);

    // A long-lived TCP connection from c to lines, then a DENY for c on lines.
    let mut open = TcpStream::connect(*tcp_c).await.unwrap();
    let mut buf = [0u8; 6];
    open.write_all(b"hello\n").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    let deny_lines = DENY_C
        .replace("name: deny-c", "name: deny-c-lines")
        .replace("app: echo", "app: lines");
    set_policies(&mesh, &mesh.lines, &deny_lines, &["deny-c-lines"]).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        let _ = open.write_all(b"again\n").await;
        open.read_to_end(&mut rest).await
    })
    .await;
    assert!(closed.is_ok(), "the denied connection stayed open");
    assert!(
        !rest.starts_with(b"again"),
        "data flowed after the deny: {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_permissive_and_disable() {
    let mesh = mesh().await;
    let (_, http_a, _, _) = &mesh.callers[0];
    // STRICT (the default): plaintext straight to the sidecar gets nothing.
    assert_eq!(status(mesh.echo_inbound, "GET", "/").await, 0);
    assert_eq!(status(*http_a, "GET", "/").await, 200);

    for (mode, plaintext, meshed) in [
        ("PERMISSIVE", 200, 200),
        ("DISABLE", 200, 200),
        ("STRICT", 0, 200),
    ] {
        let yaml = format!(
            "apiVersion: trellis.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: echo-mtls, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  mtls: {{mode: {mode}}}\n"
        );
        std::fs::write(mesh.registry.join("peer.yaml"), yaml).unwrap();
        let start = Instant::now();
        loop {
            let got = status(mesh.echo_inbound, "GET", "/").await;
            if got == plaintext {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{mode}: plaintext got {got}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Under DISABLE discovery tells the meshed caller to send plaintext (its
        // sidecar would take no mTLS); PERMISSIVE and STRICT take mTLS.
        let start = Instant::now();
        loop {
            let got = status(*http_a, "GET", "/").await;
            if got == meshed {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{mode}: meshed caller got {got}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_rejected_and_the_previous_stays() {
    let mesh = mesh().await;
    set_policies(&mesh, &mesh.echo, DENY_C, &["deny-c"]).await;
    let (_, http_c, _, _) = &mesh.callers[2];
    assert_eq!(status(*http_c, "GET", "/").await, 403);
    let bad = DENY_C.replace("spiffe://cluster.local/ns/default/sa/c", "spiffe://a*b");
    std::fs::write(mesh.registry.join("policy.yaml"), bad).unwrap();
    let admin = mesh.control.debug_addr;
    let start = Instant::now();
    loop {
        let (_, body) = http_get(admin, "/registry").await;
        if body.contains("spiffe://a*b") {
            assert!(body.contains("policy.yaml"), "{body}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "bad policy not reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status(*http_c, "GET", "/").await,
        403,
        "the previous policy must stay in force"
    );
}
