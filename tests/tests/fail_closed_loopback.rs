//! Fail closed and bounded, on loopback: a proxy driven by a scripted control plane
//! (real TLS, real CA) refuses inbound connections until it has accepted its policy,
//! stays unready after a NACK, and turns an uncompilable policy into a denial; the
//! mesh pool never shares a connection across identities; the control plane keeps
//! its debug views on loopback and limits certificate requests and discovery streams.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use trellis_control::ca::{CertificateAuthority, Proven};
use trellis_control::server::ServeOptions;
use trellis_control::{ControlConfig, RunningControlPlane};
use trellis_identity::{MeshTls, SpiffeId, TrustBundle, WorkloadKey};
use trellis_proto::ca::v1::certificate_authority_server::{
    CertificateAuthority as CaApi, CertificateAuthorityServer,
};
use trellis_proto::ca::v1::{IssueCertificateRequest, IssueCertificateResponse};
use trellis_proto::discovery::v1::aggregated_discovery_server::{
    AggregatedDiscovery, AggregatedDiscoveryServer,
};
use trellis_proto::discovery::v1::{
    self as pb, DeltaDiscoveryRequest, DeltaDiscoveryResponse, resource::Kind, type_url,
};
use trellis_proxy::{ProxyConfig, RunningProxy};
use trellis_tests::loopback::{eventually, http_get};

const TD: &str = "cluster.local";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", sa).unwrap()
}

/// What a proof of `sa` establishes: the identity, bound to no workload.
fn proven(sa: &str) -> Proven {
    Proven {
        identity: id(sa),
        workload: None,
    }
}

/// A workload's TLS material, signed by `ca`.
fn workload(ca: &CertificateAuthority, sa: &str) -> Arc<MeshTls> {
    let key = WorkloadKey::generate().unwrap();
    let leaf = ca
        .sign_workload(&key.csr_pem(&id(sa)).unwrap(), &proven(sa), None)
        .unwrap();
    let cert = key.certify(&[leaf], &id(sa)).unwrap();
    let bundle = TrustBundle::from_pem(TD, &ca.trust_bundle_pem()).unwrap();
    Arc::new(MeshTls::new(cert, &bundle).unwrap())
}

/// A control plane that signs every CSR for `granted` and answers each discovery
/// subscription with a fixed list (or never, for kinds it has no answer for).
#[derive(Clone)]
struct ScriptedControl {
    ca: Arc<CertificateAuthority>,
    granted: SpiffeId,
    answers: Arc<BTreeMap<&'static str, Vec<pb::Resource>>>,
}

#[tonic::async_trait]
impl CaApi for ScriptedControl {
    async fn issue_certificate(
        &self,
        request: Request<IssueCertificateRequest>,
    ) -> Result<Response<IssueCertificateResponse>, Status> {
        let leaf = self
            .ca
            .sign_workload(
                &request.into_inner().csr_pem,
                &Proven {
                    identity: self.granted.clone(),
                    workload: None,
                },
                None,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(IssueCertificateResponse {
            cert_chain_pem: vec![leaf],
            trust_bundle_pem: self.ca.trust_bundle_pem(),
        }))
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscovery for ScriptedControl {
    type DeltaResourcesStream = Responses;

    async fn delta_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let answers = self.answers.clone();
        tokio::spawn(async move {
            let mut nonce = 0u64;
            while let Ok(Some(request)) = requests.message().await {
                if !request.response_nonce.is_empty() {
                    continue; // an ACK or NACK
                }
                let Some(resources) = answers.get(request.type_url.as_str()) else {
                    continue;
                };
                nonce += 1;
                let response = DeltaDiscoveryResponse {
                    type_url: request.type_url,
                    resources: resources.clone(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl ScriptedControl {
    /// Serves CA and discovery over TLS on a loopback port.
    async fn start(self) -> SocketAddr {
        let (cert, key) = self
            .ca
            .issue_serving(
                &id("trellis-control"),
                &["trellis-control".to_owned()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let root = self.ca.trust_bundle_pem().concat();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(root))
            .client_auth_optional(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(CertificateAuthorityServer::new(self.clone()))
            .add_service(AggregatedDiscoveryServer::new(self));
        tokio::spawn(
            router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }
}

fn resource(name: &str, kind: Kind) -> pb::Resource {
    pb::Resource {
        name: name.to_owned(),
        version: "1".to_owned(),
        kind: Some(kind),
    }
}

/// Answers for every kind: a trust bundle, no services, `authz` as the policies and
/// an empty PeerAuthentication answer (STRICT).
fn answers(
    ca: &CertificateAuthority,
    authz: Vec<pb::AuthorizationPolicy>,
) -> BTreeMap<&'static str, Vec<pb::Resource>> {
    let bundle = resource(
        "trust-bundle",
        Kind::TrustBundle(pb::TrustBundle {
            trust_domain: TD.to_owned(),
            roots_pem: ca.trust_bundle_pem(),
        }),
    );
    let authz = authz
        .into_iter()
        .map(|p| {
            resource(
                &format!("{}.{}", p.name, p.namespace),
                Kind::AuthorizationPolicy(p),
            )
        })
        .collect();
    BTreeMap::from([
        (type_url::TRUST_BUNDLE, vec![bundle]),
        (type_url::SERVICE, vec![]),
        (type_url::ENDPOINTS, vec![]),
        (type_url::ROUTE_TABLE, vec![]),
        (type_url::TRAFFIC_POLICY, vec![]),
        (type_url::AUTHORIZATION_POLICY, authz),
        (type_url::PEER_AUTHENTICATION, vec![]),
    ])
}

/// A TCP echo app that counts its connections.
async fn echo_app() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, count)
}

/// A proxy for `sa/echo` against the scripted control plane, delivering to `app_port`.
async fn proxy(
    ca: &Arc<CertificateAuthority>,
    answers: BTreeMap<&'static str, Vec<pb::Resource>>,
    app_port: u16,
) -> RunningProxy {
    let control = ScriptedControl {
        ca: ca.clone(),
        granted: id("echo"),
        answers: Arc::new(answers),
    }
    .start()
    .await;
    let mut config = ProxyConfig::new(
        id("echo"),
        control.to_string(),
        ca.trust_bundle_pem().concat(),
    );
    config.bootstrap_token = Some("scripted".to_owned());
    config.inbound_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.app_port = Some(app_port);
    trellis_proxy::start(config).await.unwrap()
}

/// Sends a line over mTLS as `sa/client` (L4) and returns what came back (nothing
/// when the connection is refused or closed).
async fn call_over_mtls(ca: &CertificateAuthority, inbound: SocketAddr) -> Vec<u8> {
    let client = workload(ca, "client");
    let connector = tokio_rustls::TlsConnector::from(client.client_config(&id("echo")).unwrap());
    let tcp = TcpStream::connect(inbound).await.unwrap();
    // A connection refused before the handshake gets nothing back at all.
    let Ok(mut tls) = connector
        .connect(ServerName::IpAddress(inbound.ip().into()), tcp)
        .await
    else {
        return Vec::new();
    };
    let _ = tls.write_all(b"hello\n").await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await;
    got
}

fn root_ca() -> Arc<CertificateAuthority> {
    Arc::new(CertificateAuthority::new_root(TD, Duration::from_secs(3600)).unwrap())
}

fn rule_with_principal(principal: &str, port: u16) -> pb::AuthorizationRule {
    pb::AuthorizationRule {
        principals: vec![principal.to_owned()],
        ports: vec![u32::from(port)],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_does_not_compile_denies_and_says_why() {
    let ca = root_ca();
    let (app_port, app_connections) = echo_app().await;
    let policies = vec![
        pb::AuthorizationPolicy {
            name: "allow-client".into(),
            namespace: "default".into(),
            action: pb::authorization_policy::Action::Allow as i32,
            rules: vec![rule_with_principal("*/sa/client", app_port)],
        },
        // Two wildcards: not a pattern this proxy can enforce.
        pb::AuthorizationPolicy {
            name: "broken".into(),
            namespace: "default".into(),
            action: pb::authorization_policy::Action::Deny as i32,
            rules: vec![rule_with_principal("spiffe://*/sa/*", app_port)],
        },
    ];
    let proxy = proxy(&ca, answers(&ca, policies), app_port).await;
    tokio::time::timeout(Duration::from_secs(10), proxy.ready())
        .await
        .expect("the set with a broken policy is accepted, so the proxy gets ready");

    let (_, dump) = http_get(proxy.admin_addr, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let rejected = &dump["inbound_policy"]["authorization_policies_rejected"][0];
    assert_eq!(rejected["name"], "default/broken", "{dump:#}");
    assert!(
        rejected["reason"].as_str().unwrap().contains("wildcard"),
        "{dump:#}"
    );
    assert_eq!(dump["inbound_policy"]["accepted"], true);

    // The ALLOW alone would let sa/client in; the broken DENY governs the port.
    let got = call_over_mtls(&ca, proxy.inbound_addr).await;
    assert!(got.is_empty(), "denied: nothing echoed, got {got:?}");
    assert_eq!(app_connections.load(Ordering::SeqCst), 0);
    let (_, metrics) = http_get(proxy.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"policy="default/broken (rejected: does not compile)""#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_policy_set_lets_the_caller_through() {
    // The control for the test above: the same call, without the broken policy.
    let ca = root_ca();
    let (app_port, app_connections) = echo_app().await;
    let policies = vec![pb::AuthorizationPolicy {
        name: "allow-client".into(),
        namespace: "default".into(),
        action: pb::authorization_policy::Action::Allow as i32,
        rules: vec![rule_with_principal("*/sa/client", app_port)],
    }];
    let proxy = proxy(&ca, answers(&ca, policies), app_port).await;
    tokio::time::timeout(Duration::from_secs(10), proxy.ready())
        .await
        .unwrap();
    assert_eq!(call_over_mtls(&ca, proxy.inbound_addr).await, b"hello\n");
    assert_eq!(app_connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_policy_is_accepted_every_inbound_connection_is_refused() {
    let ca = root_ca();
    let (app_port, app_connections) = echo_app().await;
    let mut script = answers(&ca, vec![]);
    // PeerAuthentication never comes: the proxy must not guess.
    script.remove(type_url::PEER_AUTHENTICATION);
    let proxy = proxy(&ca, script, app_port).await;
    let admin = proxy.admin_addr;
    eventually(
        "the proxy has its certificate and the other kinds",
        Duration::from_secs(10),
        || async move {
            let (_, body) = http_get(admin, "/ready").await;
            body.contains("waiting for type.trellis.io/PeerAuthentication")
                && !body.contains("Service")
        },
    )
    .await;
    let got = call_over_mtls(&ca, proxy.inbound_addr).await;
    assert!(got.is_empty(), "refused: nothing echoed, got {got:?}");
    assert_eq!(app_connections.load(Ordering::SeqCst), 0);
    eventually(
        "the refusal is counted with its reason",
        Duration::from_secs(5),
        || async move {
            let (_, metrics) = http_get(admin, "/metrics").await;
            metrics.contains(r#"trellis_inbound_refused_total{reason="no_policy_yet"} 1"#)
        },
    )
    .await;
    let (status, _) = http_get(admin, "/ready").await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_response_does_not_make_the_proxy_ready() {
    let ca = root_ca();
    let (app_port, _) = echo_app().await;
    let mut script = answers(&ca, vec![]);
    script.insert(
        type_url::ENDPOINTS,
        vec![resource(
            "web.default:80",
            Kind::Endpoints(pb::Endpoints {
                service: "web".into(),
                namespace: "default".into(),
                port: 80,
                endpoints: vec![pb::Endpoint {
                    address: "not-an-ip".into(),
                    port: 8080,
                    identity: id("web").to_string(),
                    ready: true,
                    ..Default::default()
                }],
            }),
        )],
    );
    let proxy = proxy(&ca, script, app_port).await;
    let admin = proxy.admin_addr;
    eventually(
        "the proxy has answered every kind",
        Duration::from_secs(10),
        || async move {
            let (_, body) = http_get(admin, "/ready").await;
            body.contains("last rejected") && !body.contains("PeerAuthentication")
        },
    )
    .await;
    let (status, body) = http_get(admin, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("waiting for type.trellis.io/Endpoints") && body.contains("not-an-ip"),
        "{body}"
    );
}

/// Mesh HTTP/2 server presenting `tls`'s identity; counts handshakes that completed.
async fn mesh_server(tls: Arc<MeshTls>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Empty::<bytes::Bytes>::new(),
                    ))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_pool_never_shares_a_connection_across_identities() {
    let ca = root_ca();
    let (addr, accepted) = mesh_server(workload(&ca, "a")).await;
    let client = workload(&ca, "client");
    let pool = trellis_proxy::http::pool::MeshPool::new(trellis_proxy::metrics::Metrics::new());
    let timeout = Duration::from_secs(5);
    // The same address, two expected identities, at the same time: the connect made
    // for `a` must not be handed to the request that expects `b`.
    let (a, b) = (id("a"), id("b"));
    let (for_a, for_b) = tokio::join!(
        pool.sender(addr, &a, &client, timeout, "svc", None),
        pool.sender(addr, &b, &client, timeout, "svc", None),
    );
    assert!(for_a.is_ok(), "the server is `a`: {:?}", for_a.err());
    let Err(err) = for_b else {
        panic!("the server is not `b`, yet a sender was handed out")
    };
    assert!(err.to_string().contains("mTLS handshake"), "{err}");
    // Pooled now: `a` reuses its connection, `b` still gets none of it.
    assert!(
        pool.sender(addr, &a, &client, timeout, "svc", None)
            .await
            .is_ok()
    );
    assert!(
        pool.sender(addr, &b, &client, timeout, "svc", None)
            .await
            .is_err()
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection, for `a`"
    );
    assert_eq!(pool.len(), 1);
}

/// A file-mode control plane with one bootstrap token, for `sa/web`.
async fn control_plane(options: ServeOptions) -> (RunningControlPlane, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    std::fs::create_dir_all(&registry).unwrap();
    std::fs::write(
        registry.join("mesh.yaml"),
        "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: default, labels: {app: web}}\nspec: {address: 127.0.0.1, serviceAccount: web}\n---\napiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\nmetadata: {name: web, namespace: default}\nspec: {serviceAccount: web, token: web-token}\n",
    )
    .unwrap();
    let config = ControlConfig {
        registry_dir: registry,
        state_dir: dir.path().join("state"),
        trust_domain: TD.into(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        cert_ttl: Duration::from_secs(3600),
        server_names: vec!["trellis-control".into()],
    };
    let control = trellis_control::server::start_with(config, options)
        .await
        .unwrap();
    (control, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_views_are_served_on_loopback_only() {
    let (control, _dir) = control_plane(ServeOptions::default()).await;
    assert!(control.debug_addr.ip().is_loopback());
    for path in ["/registry", "/proxies"] {
        assert_eq!(http_get(control.admin_addr, path).await.0, 404, "{path}");
        assert_eq!(http_get(control.debug_addr, path).await.0, 200, "{path}");
    }
    assert_eq!(http_get(control.admin_addr, "/ready").await.0, 200);
    assert_eq!(http_get(control.admin_addr, "/metrics").await.0, 200);
    // A debug address off loopback is refused at start.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("registry")).unwrap();
    let refused = trellis_control::server::start_with(
        ControlConfig {
            registry_dir: dir.path().join("registry"),
            state_dir: dir.path().join("state"),
            trust_domain: TD.into(),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            cert_ttl: Duration::from_secs(3600),
            server_names: vec!["trellis-control".into()],
        },
        ServeOptions {
            debug_addr: "0.0.0.0:0".parse().unwrap(),
            ..ServeOptions::default()
        },
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(trellis_control::server::StartError::DebugNotLoopback(_))
        ),
        "a public debug address must be refused"
    );
}

fn web_config(control: &RunningControlPlane) -> ProxyConfig {
    let mut config = ProxyConfig::new(
        id("web"),
        control.grpc_addr.to_string(),
        control.root_pem.clone(),
    );
    config.bootstrap_token = Some("web-token".to_owned());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_requests_are_rate_limited_per_source() {
    let mut options = ServeOptions::default();
    options.grpc.csr_burst = 3;
    options.grpc.csr_refill = Duration::from_secs(3600);
    let (control, _dir) = control_plane(options).await;
    let config = web_config(&control);
    for i in 0..3 {
        trellis_proxy::identity::fetch(&config, None)
            .await
            .unwrap_or_else(|e| panic!("request {i} is within the burst: {e}"));
    }
    let err = trellis_proxy::identity::fetch(&config, None)
        .await
        .err()
        .unwrap();
    let trellis_proxy::identity::IdentityError::Refused(status) = &err else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    let (_, metrics) = http_get(control.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("trellis_control_certificate_requests_limited_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_streams_per_workload_are_capped() {
    use trellis_proto::discovery::v1::aggregated_discovery_client::AggregatedDiscoveryClient;
    let mut options = ServeOptions::default();
    options.grpc.streams_per_workload = 2;
    let (control, _dir) = control_plane(options).await;
    let config = web_config(&control);
    let issued = trellis_proxy::identity::fetch(&config, None).await.unwrap();
    let open = || async {
        let channel = trellis_proxy::control::channel(
            &config.control_addr,
            &config.control_server_name,
            &config.control_root_pem,
            None,
            Some(&issued.cert),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
        let result = AggregatedDiscoveryClient::new(channel)
            .delta_resources(ReceiverStream::new(rx))
            .await;
        (tx, result)
    };
    let first = open().await;
    let second = open().await;
    assert!(first.1.is_ok() && second.1.is_ok());
    let (_tx, third) = open().await;
    let Err(status) = third else {
        panic!("a third stream is over the limit")
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    let (_, metrics) = http_get(control.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("trellis_control_discovery_streams_refused_total 1"),
        "{metrics}"
    );
    // A closed stream gives its slot back.
    drop(first);
    let slot_back = eventually(
        "a stream closes and frees its slot",
        Duration::from_secs(10),
        || async { open().await.1.is_ok() },
    );
    slot_back.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_cut_off_at_the_tls_handshake_deadline() {
    let mut options = ServeOptions::default();
    options.grpc.handshake_timeout = Duration::from_millis(300);
    let (control, _dir) = control_plane(options).await;
    // Connects and never says hello: the control plane must let go, not hold the
    // connection (and its slot) forever.
    let mut silent = TcpStream::connect(control.grpc_addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the silent connection is closed by the server: {closed:?}"
    );
}
