//! Two workloads that share a service account keep their own AuthorizationPolicies,
//! end to end on loopback: web (app=web) and payments (app=payments) both run as
//! sa/shared; web ALLOWs sa/client, payments ALLOWs only sa/checkout. Each sidecar
//! proves its workload with a bootstrap token bound to its WorkloadEntry; the CA
//! writes that workload into its certificate, and discovery sends it that workload's
//! policies. A sidecar whose token names no workload gets the fail-closed view.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::SpiffeId;
use trellis_proto::discovery::v1::type_url;
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};
use trellis_tests::loopback::{eventually, free_port, http_get};

struct Ports {
    web_app: u16,
    web_inbound: u16,
    payments_app: u16,
    payments_inbound: u16,
}

fn registry(p: &Ports) -> String {
    let Ports {
        web_app,
        web_inbound,
        payments_app,
        payments_inbound,
    } = p;
    let mut yaml = String::new();
    for (app, port, inbound) in [
        ("web", web_app, web_inbound),
        ("payments", payments_app, payments_inbound),
    ] {
        yaml.push_str(&format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {app}, namespace: default}}
spec:
  selector: {{app: {app}}}
  ports: [{{name: http, port: 80, targetPort: {port}, appProtocol: http}}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: {app}-1, namespace: default, labels: {{app: {app}}}}}
spec: {{address: 127.0.0.1, serviceAccount: shared, sidecarPort: {inbound}}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: {app}-1, namespace: default}}
spec: {{serviceAccount: shared, token: token-{app}, workload: {app}-1}}
---
"#
        ));
    }
    yaml.push_str(
        r#"apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {name: shared-unbound, namespace: default}
spec: {serviceAccount: shared, token: token-unbound}
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/client"]}}]
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments-allow-checkout, namespace: default}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/checkout"]}}]
"#,
    );
    for sa in ["client", "checkout"] {
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

async fn start_proxy(
    control: &RunningControlPlane,
    sa: &str,
    token: &str,
    tune: impl FnOnce(&mut ProxyConfig),
) -> RunningProxy {
    let id = SpiffeId::new("cluster.local", "default", sa).unwrap();
    let mut config = ProxyConfig::new(id, control.grpc_addr.to_string(), control.root_pem.clone());
    config.bootstrap_token = Some(format!("token-{token}"));
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

/// The AuthorizationPolicies `proxy` holds, by name, sorted.
fn held(proxy: &RunningProxy) -> Vec<String> {
    let mut names: Vec<String> = proxy
        .admin
        .state
        .borrow()
        .resources
        .by_type
        .get(type_url::AUTHORIZATION_POLICY)
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// One HTTP/1.1 request on a fresh connection; the status, or 0 if none came.
async fn status(addr: SocketAddr, host: &str) -> u16 {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return 0;
    };
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_sharing_a_service_account_keep_their_own_policies() {
    let dir = tempfile::tempdir().unwrap();
    let registry_dir = dir.path().join("registry");
    std::fs::create_dir(&registry_dir).unwrap();
    let ports = Ports {
        web_app: free_port(),
        web_inbound: free_port(),
        payments_app: free_port(),
        payments_inbound: free_port(),
    };
    std::fs::write(registry_dir.join("mesh.yaml"), registry(&ports)).unwrap();
    let control = trellis_control::start(ControlConfig {
        registry_dir,
        state_dir: dir.path().join("state"),
        trust_domain: "cluster.local".into(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        cert_ttl: Duration::from_secs(3600),
        server_names: vec!["trellis-control".into()],
    })
    .await
    .unwrap();
    http_app(ports.web_app).await;
    http_app(ports.payments_app).await;
    let web = start_proxy(&control, "shared", "web", |c| {
        c.inbound_addr = SocketAddr::from(([127, 0, 0, 1], ports.web_inbound));
        c.app_port = Some(ports.web_app);
    })
    .await;
    let payments = start_proxy(&control, "shared", "payments", |c| {
        c.inbound_addr = SocketAddr::from(([127, 0, 0, 1], ports.payments_inbound));
        c.app_port = Some(ports.payments_app);
    })
    .await;
    // Same identity, no workload proven.
    let unbound = start_proxy(&control, "shared", "unbound", |_| {}).await;

    // Each holds its own workload's policy, and only that one.
    eventually(
        "each sidecar holds its own policy",
        Duration::from_secs(5),
        || async {
            held(&web) == ["default/web-allow-client"]
                && held(&payments) == ["default/payments-allow-checkout"]
        },
    )
    .await;
    // The unbound one: neither ALLOW (they differ), but allow-nothing.
    eventually(
        "the unbound sidecar is fail-closed",
        Duration::from_secs(5),
        || async { held(&unbound) == ["default/fail-closed:workload-unknown"] },
    )
    .await;
    let (_, proxies) = http_get(control.debug_addr, "/proxies").await;
    assert!(proxies.contains("workload default/web-1"), "{proxies}");
    assert!(proxies.contains("workload default/payments-1"), "{proxies}");
    assert!(
        proxies.contains("fail-closed (the certificate names no workload"),
        "{proxies}"
    );

    let upstreams = |c: &mut ProxyConfig| {
        c.upstreams = ["web.default", "payments.default"]
            .map(|service| Upstream {
                service: service.into(),
                port: 80,
                listen: "127.0.0.1:0".parse().unwrap(),
            })
            .to_vec();
    };
    let client = start_proxy(&control, "client", "client", upstreams).await;
    let checkout = start_proxy(&control, "checkout", "checkout", upstreams).await;
    let (client_web, client_payments) = (client.upstream_addrs[0], client.upstream_addrs[1]);
    let (checkout_web, checkout_payments) =
        (checkout.upstream_addrs[0], checkout.upstream_addrs[1]);

    assert_eq!(
        status(client_web, "web.default").await,
        200,
        "sa/client -> web"
    );
    assert_eq!(
        status(client_payments, "payments.default").await,
        403,
        "sa/client -> payments: web's ALLOW must not open payments"
    );
    assert_eq!(
        status(checkout_payments, "payments.default").await,
        200,
        "sa/checkout -> payments"
    );
    assert_eq!(
        status(checkout_web, "web.default").await,
        403,
        "sa/checkout -> web"
    );
}
