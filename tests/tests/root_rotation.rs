//! Trust-root rotation under load (issue 13, item 2), on loopback: a control plane,
//! an echo sidecar and a client sidecar, in one process, with 8-second leaves. HTTP
//! requests flow the whole time, 20 a second over the pooled L7 path and 20 a second
//! over an opaque port (a new mTLS handshake between the sidecars each), while the
//! root goes add -> activate -> (leaves renewed) -> retire with the real
//! `trellisctl root` and a control-plane restart after each step. Not one request
//! may fail; at the end both proxies hold leaves of the new root and trust only it.
//! At every phase a client leaf from an unknown root is refused by the echo sidecar,
//! and after retirement so is one from the old root.
//!
//! Needs `target/debug/trellisctl` (`cargo build -p trellisctl`).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_control::ca::roots::{self, fingerprint};
use trellis_control::ca::{CertificateAuthority, Proven};
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::{
    MeshTls, SpiffeId, TrustBundle, WorkloadCertificate, WorkloadKey, root_fingerprint,
};
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};
use trellis_tests::loopback::{eventually, free_port};

const TTL: Duration = Duration::from_secs(8);
const TD: &str = "cluster.local";
/// The request loop's bounds: one tick every 50 ms, at most this many ticks.
const TICK: Duration = Duration::from_millis(50);
const MAX_TICKS: usize = 4_000;

fn token(sa: &str) -> String {
    format!("{sa}-token-0123456789")
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", sa).unwrap()
}

fn registry_yaml(app_port: u16, echo_inbound: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 8080, targetPort: app, appProtocol: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-raw, namespace: default}}
spec:
  selector: {{app: echo}}
  ports: [{{name: raw, port: 7000, targetPort: app, appProtocol: tcp}}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: echo-1, namespace: default, labels: {{app: echo}}}}
spec: {{address: 127.0.0.1, serviceAccount: echo, ports: {{app: {app_port}}}, sidecarPort: {echo_inbound}}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: echo, namespace: default}}
spec: {{serviceAccount: echo, token: {echo}}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: client, namespace: default}}
spec: {{serviceAccount: client, token: {client}}}
"#,
        echo = token("echo"),
        client = token("client"),
    )
}

async fn start_control(registry: &Path, state: &Path, grpc_port: u16) -> RunningControlPlane {
    let config = || ControlConfig {
        registry_dir: registry.to_owned(),
        state_dir: state.to_owned(),
        trust_domain: TD.into(),
        grpc_addr: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        cert_ttl: TTL,
        server_names: vec!["trellis-control".into()],
    };
    // The previous instance's port may take a moment to be free again.
    for _ in 0..50 {
        match trellis_control::start(config()).await {
            Ok(control) => return control,
            Err(trellis_control::server::StartError::Bind { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("control plane: {e}"),
        }
    }
    panic!("the control plane's port {grpc_port} stayed busy");
}

/// An HTTP/1.1 app answering 200 "echo" to everything.
async fn http_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"echo")),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

struct Mesh {
    _dir: tempfile::TempDir,
    registry: PathBuf,
    state: PathBuf,
    grpc_port: u16,
    control: Option<RunningControlPlane>,
    echo: RunningProxy,
    client: RunningProxy,
    echo_inbound: SocketAddr,
}

impl Mesh {
    async fn start() -> Mesh {
        Self::start_with(|_| {}).await
    }

    /// Starts with `prepare` given the (new, empty) state dir first.
    async fn start_with(prepare: impl FnOnce(&Path)) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry");
        let state = dir.path().join("state");
        std::fs::create_dir(&registry).unwrap();
        std::fs::create_dir(&state).unwrap();
        prepare(&state);
        let app_port = http_app().await;
        let echo_inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        std::fs::write(
            registry.join("mesh.yaml"),
            registry_yaml(app_port, echo_inbound.port()),
        )
        .unwrap();
        let grpc_port = free_port();
        let control = start_control(&registry, &state, grpc_port).await;
        let config = |sa: &str| {
            let mut config = ProxyConfig::new(
                id(sa),
                control.grpc_addr.to_string(),
                control.root_pem.clone(),
            );
            config.bootstrap_token = Some(token(sa));
            config.inbound_addr = "127.0.0.1:0".parse().unwrap();
            config.admin_addr = "127.0.0.1:0".parse().unwrap();
            config
        };
        let mut echo = config("echo");
        echo.inbound_addr = echo_inbound;
        echo.app_port = Some(app_port);
        let echo = trellis_proxy::start(echo).await.unwrap();
        let mut client = config("client");
        client.upstreams = [("echo.default", 8080), ("echo-raw.default", 7000)]
            .into_iter()
            .map(|(service, port)| Upstream {
                service: service.into(),
                port,
                listen: "127.0.0.1:0".parse().unwrap(),
            })
            .collect();
        let client = trellis_proxy::start(client).await.unwrap();
        for proxy in [&echo, &client] {
            tokio::time::timeout(Duration::from_secs(10), proxy.ready())
                .await
                .unwrap();
        }
        let mesh = Mesh {
            _dir: dir,
            registry,
            state,
            grpc_port,
            control: Some(control),
            echo,
            client,
            echo_inbound,
        };
        // Both upstreams have their endpoint before the load starts.
        eventually(
            "the client has the echo endpoints",
            Duration::from_secs(10),
            || {
                let state = mesh.client.admin.state.borrow().clone();
                async move {
                    [("echo.default", 8080), ("echo-raw.default", 7000)]
                        .iter()
                        .all(|(s, p)| {
                            state
                                .services
                                .get(&((*s).to_owned(), *p))
                                .is_some_and(|sp| sp.endpoints.all().count() == 1)
                        })
                }
            },
        )
        .await;
        mesh
    }

    async fn restart_control(&mut self) {
        if let Some(control) = self.control.take() {
            control.stop().await;
        }
        self.control = Some(start_control(&self.registry, &self.state, self.grpc_port).await);
    }

    fn proxies(&self) -> [(&'static str, &RunningProxy); 2] {
        [("echo", &self.echo), ("client", &self.client)]
    }

    /// The proxy's current TLS: which of `known` signed its leaf, and its bundle.
    fn tls_of(proxy: &RunningProxy, known: &TrustBundle) -> (Option<String>, Vec<String>) {
        let tls = proxy.admin.tls.borrow().clone().unwrap();
        let signer = known
            .signer_of(&tls.certificate().chain)
            .map(|r| root_fingerprint(r));
        (signer, tls.trust_bundle().fingerprints())
    }

    /// Waits until every proxy's leaf is signed by `signer` and its bundle is
    /// exactly `bundle` (in any order).
    async fn wait_for(&self, what: &str, known: &TrustBundle, signer: &str, bundle: &[&str]) {
        let mut want: Vec<String> = bundle.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        for (name, proxy) in self.proxies() {
            eventually(
                &format!("{what}: the {name} proxy"),
                Duration::from_secs(30),
                || {
                    let (signed_by, mut has) = Self::tls_of(proxy, known);
                    has.sort();
                    let ok = signed_by.as_deref() == Some(signer) && has == want;
                    async move { ok }
                },
            )
            .await;
        }
    }

    fn state_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.state.join(name)).unwrap()
    }
}

/// Runs `trellisctl root <args> --state-dir <state>`: (success, stdout + stderr).
fn trellisctl_root(state: &Path, args: &[&str]) -> (bool, String) {
    let bin = trellis_tests::target_binary("trellisctl")
        .expect("build trellisctl first: cargo build -p trellisctl");
    let out = std::process::Command::new(bin)
        .arg("root")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Steady requests until `stop`: each tick one L7 request (pooled mesh connection)
/// and one request over the opaque port (a fresh handshake between the sidecars).
struct Load {
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(http: SocketAddr, raw: SocketAddr) -> Load {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ok2, failed2, errors2, stop2) =
            (ok.clone(), failed.clone(), errors.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let client: Client<HttpConnector, Empty<Bytes>> =
                Client::builder(TokioExecutor::new()).build(HttpConnector::new());
            let mut tick = tokio::time::interval(TICK);
            let mut inflight = tokio::task::JoinSet::new();
            for _ in 0..MAX_TICKS {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                tick.tick().await;
                let client = client.clone();
                let record = |ok: &AtomicUsize,
                              failed: &AtomicUsize,
                              errors: &std::sync::Mutex<Vec<String>>,
                              result: Result<(), String>| match result
                {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        errors.lock().unwrap().push(e);
                    }
                };
                let (ok, failed, errors) = (ok2.clone(), failed2.clone(), errors2.clone());
                inflight.spawn(async move {
                    let (pooled, fresh) = tokio::join!(l7_get(&client, http), raw_get(raw));
                    record(
                        &ok,
                        &failed,
                        &errors,
                        pooled.map_err(|e| format!("L7: {e}")),
                    );
                    record(
                        &ok,
                        &failed,
                        &errors,
                        fresh.map_err(|e| format!("opaque: {e}")),
                    );
                });
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        });
        Load {
            ok,
            failed,
            errors,
            stop,
            task,
        }
    }

    async fn finish(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            errors,
        )
    }
}

async fn l7_get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
) -> Result<(), String> {
    let request = hyper::Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status == 200 && body.as_ref() == b"echo" {
            Ok(())
        } else {
            Err(format!("{status} {body:?}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
}

async fn raw_get(addr: SocketAddr) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw);
        if text.starts_with("HTTP/1.1 200") && text.ends_with("echo") {
            Ok(())
        } else {
            Err(format!("answer {text:?}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
}

/// A leaf for the client's identity signed by `ca` (its key made here).
fn leaf_from(ca: &CertificateAuthority) -> WorkloadCertificate {
    let key = WorkloadKey::generate().unwrap();
    let client = id("client");
    let pem = ca
        .sign_workload(
            &key.csr_pem(&client).unwrap(),
            &Proven {
                identity: client.clone(),
                workload: None,
            },
            None,
        )
        .unwrap();
    key.certify(&[pem], &client).unwrap()
}

/// Whether the echo sidecar serves a client presenting `leaf` (which trusts the
/// mesh's current bundle for the server): an answer from the app, or a refusal.
async fn echo_accepts(mesh: &Mesh, leaf: WorkloadCertificate) -> bool {
    let control_bundle = mesh.control.as_ref().unwrap().root_pem.clone();
    let bundle = TrustBundle::from_pem(TD, &[control_bundle]).unwrap();
    let tls = MeshTls::new(leaf, &bundle).unwrap();
    let config = tls.client_config(&id("echo")).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(mesh.echo_inbound).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("echo.default").unwrap();
    let exchange = async {
        // TLS 1.3: the server judges the client's certificate after the client's
        // handshake is done, so a refusal shows on the first read.
        let mut stream = connector.connect(name, tcp).await.ok()?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        Some(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the echo sidecar neither answered nor refused within 10 s");
    raw.is_some_and(|raw| String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"))
}

/// At each phase: a leaf of a root nobody trusts is refused, and (the control) one
/// of the root that signs now is served.
async fn check_unknown_root_refused(mesh: &Mesh, rogue: &CertificateAuthority, phase: &str) {
    assert!(
        !echo_accepts(mesh, leaf_from(rogue)).await,
        "{phase}: a leaf of an unknown root was accepted"
    );
    let signing = CertificateAuthority::from_pem(
        &mesh.state_file(roots::ACTIVE_CERT),
        &mesh.state_file(roots::ACTIVE_KEY),
        TD,
        TTL,
    )
    .unwrap();
    assert!(
        echo_accepts(mesh, leaf_from(&signing)).await,
        "{phase}: a leaf of the signing root was refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_under_load_fails_no_request() {
    let mut mesh = Mesh::start().await;
    let rogue = CertificateAuthority::new_root(TD, TTL).unwrap();
    let old_pem = mesh.state_file(roots::ACTIVE_CERT);
    let old = fingerprint(&old_pem);
    let load = Load::start(mesh.client.upstream_addrs[0], mesh.client.upstream_addrs[1]);

    // Single root.
    let known = TrustBundle::from_pem(TD, std::slice::from_ref(&old_pem)).unwrap();
    mesh.wait_for("single", &known, &old, &[&old]).await;
    check_unknown_root_refused(&mesh, &rogue, "single").await;
    let (ok, text) = trellisctl_root(&mesh.state, &["retire"]);
    assert!(!ok && text.contains("no previous root to retire"), "{text}");

    // (a) Add: both roots trusted, the old one still signs.
    let (ok, text) = trellisctl_root(&mesh.state, &["add"]);
    assert!(ok && text.contains("phase     added"), "{text}");
    let new_pem = mesh.state_file(roots::NEXT_CERT);
    let new = fingerprint(&new_pem);
    let old_key = mesh.state_file(roots::ACTIVE_KEY);
    mesh.restart_control().await;
    let known = TrustBundle::from_pem(TD, &[old_pem.clone(), new_pem.clone()]).unwrap();
    mesh.wait_for("added", &known, &old, &[&old, &new]).await;
    check_unknown_root_refused(&mesh, &rogue, "added").await;

    // (b) Activate: the new root signs; proxies renew at half-life.
    let (ok, text) = trellisctl_root(&mesh.state, &["activate", "--max-leaf-ttl", "8s"]);
    assert!(ok && text.contains("phase     activated"), "{text}");
    mesh.restart_control().await;
    mesh.wait_for("activated, leaves renewed", &known, &new, &[&old, &new])
        .await;
    check_unknown_root_refused(&mesh, &rogue, "activated").await;

    // (c) Retire: refused while an old leaf may be valid, then done.
    let (ok, text) = trellisctl_root(&mesh.state, &["retire"]);
    assert!(
        !ok && text.contains("becomes safe at") && text.contains("--force"),
        "{text}"
    );
    let safe_at: u64 = mesh
        .state_file(roots::PREVIOUS_RETIRE_AFTER)
        .trim()
        .parse()
        .unwrap();
    let wait = (SystemTime::UNIX_EPOCH + Duration::from_secs(safe_at + 1))
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(wait <= TTL * 3, "retirement is {wait:?} away");
    tokio::time::sleep(wait).await;
    let (ok, text) = trellisctl_root(&mesh.state, &["retire"]);
    assert!(ok && text.contains("phase     single"), "{text}");
    mesh.restart_control().await;
    mesh.wait_for("retired", &known, &new, &[&new]).await;
    check_unknown_root_refused(&mesh, &rogue, "retired").await;
    let retired = CertificateAuthority::from_pem(&old_pem, &old_key, TD, TTL).unwrap();
    assert!(
        !echo_accepts(&mesh, leaf_from(&retired)).await,
        "a leaf of the retired root was accepted"
    );

    let (ok, failed, errors) = load.finish().await;
    eprintln!("root rotation under load: {ok} requests succeeded, {failed} failed");
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 200, "only {ok} requests ran");
}

/// An offline root (path length unconstrained) and an intermediate it signed, in
/// Istio's `cacerts` layout; returns the root's PEM.
fn write_plugged_ca(dir: &Path) -> String {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_params = |cn: &str, is_ca: IsCa| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = is_ca;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("offline root", IsCa::Ca(BasicConstraints::Unconstrained));
    let root = root_params.self_signed(&root_key).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params(
        "cluster intermediate",
        IsCa::Ca(BasicConstraints::Constrained(0)),
    )
    .signed_by(&ca_key, &Issuer::new(root_params, root_key))
    .unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), ca_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", ca.pem(), root.pem()),
    )
    .unwrap();
    root.pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_ca_signs_and_both_sidecars_verify_its_chains() {
    let mut root_pem = String::new();
    let mesh = Mesh::start_with(|state| root_pem = write_plugged_ca(state)).await;
    let root = fingerprint(&root_pem);
    assert_eq!(
        mesh.control.as_ref().unwrap().root_pem,
        root_pem,
        "proxies are given the offline root, not the intermediate"
    );
    let known = TrustBundle::from_pem(TD, std::slice::from_ref(&root_pem)).unwrap();
    mesh.wait_for("plug-in CA", &known, &root, &[&root]).await;
    for (name, proxy) in mesh.proxies() {
        let tls = proxy.admin.tls.borrow().clone().unwrap();
        assert_eq!(
            tls.certificate().chain.len(),
            2,
            "{name}: the leaf and the intermediate"
        );
    }
    // Requests through both paths: each side verified the other's chain.
    let load = Load::start(mesh.client.upstream_addrs[0], mesh.client.upstream_addrs[1]);
    eventually("40 requests", Duration::from_secs(30), || {
        let done = load.ok.load(Ordering::SeqCst) + load.failed.load(Ordering::SeqCst);
        async move { done >= 40 }
    })
    .await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "{errors:?}");
    assert!(ok >= 40);
    // A leaf of a stranger is still refused; one of the intermediate, sent with
    // its chain, is served.
    let rogue = CertificateAuthority::new_root(TD, TTL).unwrap();
    assert!(!echo_accepts(&mesh, leaf_from(&rogue)).await);
    let files = trellis_control::ca::plugged::read_dir(&mesh.state).unwrap();
    let ca = CertificateAuthority::from_plugged(&files, TD, TTL).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let client = id("client");
    let leaf = ca
        .sign_workload(
            &key.csr_pem(&client).unwrap(),
            &Proven {
                identity: client.clone(),
                workload: None,
            },
            None,
        )
        .unwrap();
    let bare = key.certify(std::slice::from_ref(&leaf), &client).unwrap();
    assert!(
        !echo_accepts(&mesh, bare).await,
        "a leaf without its intermediate does not chain to the root"
    );
    let chained = key.certify(&ca.leaf_chain(leaf), &client).unwrap();
    assert!(echo_accepts(&mesh, chained).await);
    assert!(
        !mesh.state.join("root-key.pem").exists(),
        "nothing of Trellis's own roots was made"
    );
}
