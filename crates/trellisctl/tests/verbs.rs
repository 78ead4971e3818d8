//! Each trellisctl verb, run as the real binary against a real control plane and
//! real sidecars on loopback, checking the lines it prints and its exit code.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_control::server::{ServeOptions, start_with};
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::SpiffeId;
use trellis_proto::discovery::v1::aggregated_discovery_client::AggregatedDiscoveryClient;
use trellis_proto::discovery::v1::{DeltaDiscoveryRequest, ErrorDetail};
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};
use trellis_tests::loopback::{eventually, free_port, http_get};

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(20);

struct Mesh {
    control: RunningControlPlane,
    echo: RunningProxy,
    client: RunningProxy,
    dir: tempfile::TempDir,
}

fn registry_yaml(echo_app: u16, echo_inbound: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: echo}}
  ports: [{{name: http, port: 8080, targetPort: http, appProtocol: http}}]
---
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: echo, namespace: demo}}
spec:
  targetRef: {{kind: Service, name: echo}}
  retries: {{attempts: 2, retryOn: [gateway-error]}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: echo-1, namespace: demo, labels: {{app: echo}}}}
spec: {{address: 127.0.0.1, serviceAccount: echo, ports: {{http: {echo_app}}}, sidecarPort: {echo_inbound}}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: client-1, namespace: demo, labels: {{app: client}}}}
spec: {{address: 127.0.0.1, serviceAccount: client}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: echo, namespace: demo}}
spec: {{serviceAccount: echo, workload: echo-1, token: echo-token}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: client, namespace: demo}}
spec: {{serviceAccount: client, workload: client-1, token: client-token}}
"#
    )
}

const GHOST: &str = "apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: ghost-1, namespace: demo, labels: {app: ghost}}
spec: {address: 127.0.0.1, serviceAccount: ghost}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {name: ghost, namespace: demo}
spec: {serviceAccount: ghost, workload: ghost-1, token: ghost-token}
";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "demo", sa).unwrap()
}

fn proxy_config(control: &RunningControlPlane, sa: &str) -> ProxyConfig {
    let mut config = ProxyConfig::new(
        id(sa),
        control.grpc_addr.to_string(),
        control.root_pem.clone(),
    );
    config.bootstrap_token = Some(format!("{sa}-token"));
    config.control_server_name = "trellis-control".into();
    config
}

async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    std::fs::create_dir_all(&registry).unwrap();
    let (echo_app, echo_inbound, upstream) = (free_port(), free_port(), free_port());
    std::fs::write(
        registry.join("mesh.yaml"),
        registry_yaml(echo_app, echo_inbound),
    )
    .unwrap();
    let control = start_with(
        ControlConfig {
            registry_dir: registry,
            state_dir: dir.path().join("state"),
            trust_domain: TD.into(),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            cert_ttl: Duration::from_secs(24 * 3600),
            server_names: vec!["trellis-control".into()],
        },
        ServeOptions::default(),
    )
    .await
    .unwrap();
    let mut echo = proxy_config(&control, "echo");
    echo.inbound_addr = SocketAddr::from(([127, 0, 0, 1], echo_inbound));
    echo.app_port = Some(echo_app);
    echo.admin_addr = "127.0.0.1:0".parse().unwrap();
    let echo = trellis_proxy::start(echo).await.unwrap();
    let mut client = proxy_config(&control, "client");
    client.inbound_addr = "127.0.0.1:0".parse().unwrap();
    client.admin_addr = "127.0.0.1:0".parse().unwrap();
    client.upstreams = vec![Upstream {
        service: "echo.demo".into(),
        port: 8080,
        listen: SocketAddr::from(([127, 0, 0, 1], upstream)),
    }];
    let client = trellis_proxy::start(client).await.unwrap();
    for proxy in [&echo, &client] {
        tokio::time::timeout(WAIT, proxy.ready()).await.unwrap();
    }
    let mesh = Mesh {
        control,
        echo,
        client,
        dir,
    };
    let debug = mesh.control.debug_addr;
    eventually("both proxies SYNCED", WAIT, || async move {
        let (_, body) = http_get(debug, "/debug/proxies").await;
        body.matches("\"sync\": \"SYNCED\"").count() == 2
    })
    .await;
    mesh
}

/// Runs trellisctl (no terminal: no colour).
async fn trellisctl(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .args(args)
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("trellisctl hung")
        .unwrap()
}

/// Stdout's lines with runs of spaces squeezed (column widths aside, exact).
fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn ok(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "trellisctl failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    lines(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_shows_client_and_control_plane() {
    let mesh = mesh().await;
    let debug = mesh.control.debug_addr.to_string();
    let out = ok(&trellisctl(&["version", "--control-addr", &debug]).await);
    assert_eq!(
        out,
        [
            "COMPONENT VERSION".to_owned(),
            "trellisctl 0.1.0".to_owned(),
            format!("trellis-control ({debug}) 0.1.0"),
        ]
    );
    let json = ok(&trellisctl(&["version", "--control-addr", &debug, "-o", "json"]).await);
    assert_eq!(
        json.join("\n"),
        "{\n\"client\": \"0.1.0\",\n\"control_plane\": \"0.1.0\"\n}"
    );
    // Nothing there: the client still answers, and says why the rest is missing.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = ok(&trellisctl(&["version", "--control-addr", &nowhere]).await);
    assert!(
        out[2].starts_with(&format!(
            "trellis-control ({nowhere}) unreachable (connecting to {nowhere}"
        )),
        "{out:?}"
    );
    drop(mesh.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_lists_every_proxy_in_sync() {
    let mesh = mesh().await;
    let debug = mesh.control.debug_addr.to_string();
    let json = trellisctl(&["proxy-status", "--control-addr", &debug, "-o", "json"]).await;
    let proxies: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let config = proxies[0]["config_version"].as_str().unwrap().to_owned();
    assert_eq!(
        proxies[1]["config_version"],
        config.as_str(),
        "both were sent the same config"
    );
    let out = ok(&trellisctl(&["proxy-status", "--control-addr", &debug]).await);
    let root = trellis_control::ca::roots::fingerprint(&mesh.control.root_pem);
    assert_eq!(
        out,
        [
            "IDENTITY WORKLOAD STATUS CONFIG TYPES VERSION LEAF ROOT LAST NACK".to_owned(),
            format!(
                "spiffe://cluster.local/ns/demo/sa/client demo/client-1 SYNCED {config} 7/7 0.1.0 {root} -"
            ),
            format!(
                "spiffe://cluster.local/ns/demo/sa/echo demo/echo-1 SYNCED {config} 7/7 0.1.0 {root} -"
            ),
        ]
    );
    let yaml = ok(&trellisctl(&["proxy-status", "--control-addr", &debug, "-o", "yaml"]).await);
    assert!(yaml.contains(&"sync: SYNCED".to_owned()), "{yaml:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_config_shows_each_section() {
    let mesh = mesh().await;
    let client = mesh.client.admin_addr.to_string();
    let echo_inbound = mesh.echo.admin.config.inbound_addr;
    let upstream = mesh.client.admin.config.upstreams[0].listen;
    let out = ok(&trellisctl(&["proxy-config", &client, "listeners"]).await);
    assert_eq!(
        out,
        [
            "NAME ADDRESS DESTINATION".to_owned(),
            "inbound 127.0.0.1:0 mTLS from peers".to_owned(),
            // The configured addresses (port 0: any free port).
            "admin 127.0.0.1:0 admin".to_owned(),
            format!("upstream {upstream} echo.demo:8080"),
        ]
    );
    let out = ok(&trellisctl(&["proxy-config", &client, "endpoints"]).await);
    let app = mesh.echo.admin.config.app_port.unwrap();
    assert_eq!(
        out,
        [
            "SERVICE ENDPOINT IDENTITY READY MESH ADDRESS".to_owned(),
            format!(
                "echo.demo:8080 127.0.0.1:{app} spiffe://cluster.local/ns/demo/sa/echo true {echo_inbound}"
            ),
        ]
    );
    let out = ok(&trellisctl(&["proxy-config", &client, "policies"]).await);
    assert_eq!(
        out,
        [
            "KIND NAME DETAIL",
            // The control plane resolves the workload's mode (no PeerAuthentication: STRICT).
            "PeerAuthentication demo/effective MODE_STRICT (0 port overrides)",
            "TrafficPolicy echo.demo service echo.demo lb ALGORITHM_P2C_EWMA retries 2 timeout -",
        ]
    );
    let out = ok(&trellisctl(&["proxy-config", &client, "routes"]).await);
    assert_eq!(out, ["SERVICE ROUTE PORT MATCH BACKENDS"]);
    let out = ok(&trellisctl(&["proxy-config", &client, "certs"]).await);
    let serial = mesh
        .client
        .admin
        .tls
        .borrow()
        .clone()
        .unwrap()
        .certificate()
        .serial
        .clone();
    assert_eq!(out[0], "IDENTITY SERIAL NOT AFTER EXPIRES IN RENEWS AT");
    assert!(
        out[1].starts_with(&format!(
            "spiffe://cluster.local/ns/demo/sa/client {serial} "
        )),
        "{out:?}"
    );
    let json = trellisctl(&["proxy-config", &client, "certs", "-o", "json"]).await;
    let certs: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(certs["serial"], serial.as_str());
    assert!(
        certs.get("chain_pem").is_none(),
        "the table view leaves the chain out"
    );
    drop(mesh.dir);
}

/// A discovery client for `ghost` that NACKs every Endpoints response.
async fn nacking_proxy(control: &RunningControlPlane) -> mpsc::Sender<DeltaDiscoveryRequest> {
    let config = proxy_config(control, "ghost");
    let issued = trellis_proxy::identity::fetch(&config, None).await.unwrap();
    let channel = trellis_proxy::control::channel(
        &config.control_addr,
        &config.control_server_name,
        &config.control_root_pem,
        None,
        Some(&issued.cert),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
    tx.send(DeltaDiscoveryRequest {
        type_url: "type.trellis.io/Endpoints".into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = AggregatedDiscoveryClient::new(channel)
        .delta_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: first.type_url,
        response_nonce: first.nonce,
        error_detail: Some(ErrorDetail {
            code: tonic::Code::InvalidArgument as i32,
            message: "endpoint echo.demo:8080: not usable".into(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = responses.message().await {} });
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_then_fails_for_a_missing_and_a_nacking_proxy() {
    let mesh = mesh().await;
    let debug = mesh.control.debug_addr.to_string();
    let args = ["check", "--control-addr", debug.as_str()];
    let out = ok(&trellisctl(&args).await);
    assert_eq!(out.len(), 7, "{out:?}");
    assert_eq!(
        out[0],
        format!("✔ control plane reachable at {debug} (trellis-control 0.1.0)")
    );
    assert_eq!(out[1], "✔ registry valid (1 services, 2 workloads)");
    assert_eq!(
        out[2],
        "✔ 2 proxies connected (2 of 2 workloads with a sidecar)"
    );
    assert_eq!(out[3], "✔ 2 proxies in sync");
    assert!(
        out[4].starts_with("✔ certificates valid for more than 2h (soonest expires in "),
        "{out:?}"
    );
    assert_eq!(out[6], "✔ all 5 checks passed");

    // A workload with a sidecar and no proxy.
    let registry = mesh.dir.path().join("registry");
    std::fs::write(registry.join("ghost.yaml"), GHOST).unwrap();
    let debug_addr = mesh.control.debug_addr;
    eventually("the registry has the ghost", WAIT, || async move {
        http_get(debug_addr, "/debug/workloads")
            .await
            .1
            .contains("demo/ghost-1")
    })
    .await;
    let failed = trellisctl(&args).await;
    assert_eq!(failed.status.code(), Some(1));
    let out = lines(&failed);
    assert_eq!(
        out[2..5],
        [
            "✖ workload demo/ghost-1 (spiffe://cluster.local/ns/demo/sa/ghost) has no proxy connected",
            "hint: start its sidecar; check its bootstrap token and that it reaches the control plane's discovery port (15010)",
            "✔ 2 proxies in sync",
        ]
    );
    assert_eq!(out.last().unwrap(), "✖ 1 of 5 checks failed");

    // It connects, and rejects what it is sent.
    let _ghost = nacking_proxy(&mesh.control).await;
    eventually("the ghost is NACKED", WAIT, || async move {
        http_get(debug_addr, "/debug/proxies")
            .await
            .1
            .contains("\"sync\": \"NACKED\"")
    })
    .await;
    let failed = trellisctl(&args).await;
    assert_eq!(failed.status.code(), Some(1));
    let out = lines(&failed);
    assert_eq!(
        out[2..5],
        [
            "✔ 3 proxies connected (3 of 3 workloads with a sidecar)",
            "✖ proxy spiffe://cluster.local/ns/demo/sa/ghost (demo/ghost-1) rejected its config: type.trellis.io/Endpoints: endpoint echo.demo:8080: not usable",
            "hint: fix the resource the message names; the proxy keeps serving its last good config",
        ]
    );
    let status = ok(&trellisctl(&["proxy-status", "--control-addr", &debug]).await);
    let root = trellis_control::ca::roots::fingerprint(&mesh.control.root_pem);
    assert!(
        status[3].starts_with("spiffe://cluster.local/ns/demo/sa/ghost demo/ghost-1 NACKED ")
            && status[3].ends_with(&format!(
                " 0/1 - {root} type.trellis.io/Endpoints: endpoint echo.demo:8080: not usable"
            )),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_the_control_plane_is_gone() {
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = trellisctl(&["check", "--control-addr", &nowhere]).await;
    assert_eq!(out.status.code(), Some(1));
    let out = lines(&out);
    assert!(
        out[0].starts_with(&format!("✖ control plane not reachable at {nowhere}: ")),
        "{out:?}"
    );
    assert_eq!(out.last().unwrap(), "✖ 1 of 1 checks failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_events() {
    let mesh = mesh().await;
    let admin = mesh.control.admin_addr;
    // One certificate request refused: a token the registry does not know.
    let mut stranger = proxy_config(&mesh.control, "client");
    stranger.bootstrap_token = Some("not-a-token".into());
    assert!(
        trellis_proxy::identity::fetch(&stranger, None)
            .await
            .is_err()
    );
    // One NACK.
    std::fs::write(mesh.dir.path().join("registry/ghost.yaml"), GHOST).unwrap();
    let debug = mesh.control.debug_addr;
    eventually("the registry has the ghost", WAIT, || async move {
        http_get(debug, "/debug/workloads")
            .await
            .1
            .contains("demo/ghost-1")
    })
    .await;
    let _ghost = nacking_proxy(&mesh.control).await;
    eventually("the NACK is counted", WAIT, || async move {
        http_get(admin, "/metrics")
            .await
            .1
            .contains("trellis_control_nacks_total")
    })
    .await;
    let (_, metrics) = http_get(admin, "/metrics").await;
    for line in [
        "trellis_control_connected_proxies 3",
        "trellis_control_nacks_total{type=\"Endpoints\",reason=\"invalid_argument\"} 1",
        "trellis_control_certificates_issued_total 3",
        "trellis_control_certificates_refused_total{reason=\"unknown_bootstrap_token\"} 1",
        "trellis_control_registry_events_total{kind=\"workload\",event=\"add\"} 3",
        "trellis_control_registry_events_total{kind=\"service\",event=\"add\"} 1",
        "trellis_control_leader 1",
        // Two proxies subscribed to seven types, the ghost to one.
        "trellis_control_pushes_total{type=\"Endpoints\"} 3",
        "trellis_control_push_latency_seconds_count{type=\"Endpoints\"} 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(
        !metrics.contains("trellis_control_nacks_total{type=\"Service\""),
        "{metrics}"
    );
}

/// The debug view carries what the CA issued: the proxy's own certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_proxies_shows_the_issued_certificate() {
    let mesh = mesh().await;
    let (_, body) = http_get(mesh.control.debug_addr, "/debug/proxies").await;
    let proxies: serde_json::Value = serde_json::from_str(&body).unwrap();
    let echo = proxies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["workload"] == "demo/echo-1")
        .unwrap();
    let cert = mesh
        .echo
        .admin
        .tls
        .borrow()
        .clone()
        .unwrap()
        .certificate()
        .clone();
    assert_eq!(echo["certificate"]["serial"], cert.serial.as_str());
    let not_after = cert
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(echo["certificate"]["not_after_unix"], not_after);
    assert_eq!(echo["types"]["Endpoints"]["state"], "SYNCED");
    assert_eq!(echo["last_nack"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_scripts_name_every_verb() {
    for shell in ["bash", "zsh", "fish"] {
        let out = trellisctl(&["completion", shell]).await;
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for verb in [
            "check",
            "proxy-status",
            "proxy-config",
            "uninject",
            "uninstall",
            "top",
            "root",
            "stat",
        ] {
            assert!(script.contains(verb), "{shell} completion lacks {verb}");
        }
    }
}
