//! Wiring: registry -> snapshots -> CA and discovery over TLS, plus the admin port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use trellis_identity::SpiffeId;

use crate::admin;
use crate::ca::{CaService, CertificateAuthority, IssuedLeaves, KubeTokenReviewer, TokenReviewer};
use crate::discovery::DiscoveryServer;
use crate::http_server::ServerLimits;
use crate::injector::{InjectorSettings, ca_root, webhook};
use crate::leader::{LeaderElection, LeaseLock, LeaseSettings};
use crate::limits::{GrpcLimits, LimitCounters, RateLimitedCa, StreamLimitedDiscovery};
use crate::metrics::ControlMetrics;
use crate::model::MeshSnapshot;
use crate::registry::{self, RegistryStatus};

/// How often the file registry looks at its folder.
pub const REGISTRY_POLL: Duration = Duration::from_millis(200);

/// Where the debug views (/registry, /proxies) listen when nothing else is said.
pub const DEFAULT_DEBUG_PORT: u16 = 15016;

/// How the control plane's listeners are bounded, and where its debug views are.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The debug views; must be a loopback address (port 0: any free port).
    pub debug_addr: SocketAddr,
    /// The admin, debug and webhook HTTP servers.
    pub http: ServerLimits,
    /// The gRPC port: handshake, keepalives, streams per workload, certificate rate.
    pub grpc: GrpcLimits,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            debug_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: ServerLimits::default(),
            grpc: GrpcLimits::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub registry_dir: PathBuf,
    pub state_dir: PathBuf,
    pub trust_domain: String,
    /// Discovery + CA, gRPC over TLS (15010).
    pub grpc_addr: SocketAddr,
    /// Health, metrics and status (15014).
    pub admin_addr: SocketAddr,
    pub cert_ttl: Duration,
    /// DNS names and IPs in the control plane's serving certificate.
    pub server_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the registry folder {dir} is not valid:\n{errors}")]
    Registry { dir: String, errors: String },
    #[error("the CA could not start: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] tonic::transport::Error),
    #[error("the control plane's own identity is invalid: {0}")]
    Identity(#[from] trellis_identity::SpiffeIdError),
    #[error("the Kubernetes registry stopped before its first snapshot")]
    KubeRegistryStopped,
    #[error("the injector webhook could not start: {0}")]
    Webhook(#[from] crate::injector::webhook::WebhookError),
    #[error("the debug address {0} is not loopback: /registry and /proxies stay on the host")]
    DebugNotLoopback(SocketAddr),
}

/// A control plane running in this process.
pub struct RunningControlPlane {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The debug views (/registry, /proxies), on loopback.
    pub debug_addr: SocketAddr,
    /// The injector webhook (kube mode with the injector on).
    pub webhook_addr: Option<SocketAddr>,
    /// The root certificate proxies trust for the control plane and each other.
    pub root_pem: String,
    /// Whether this replica is the one writer (kube mode: holds the Lease; a lone
    /// file-mode control plane always is).
    pub leading: watch::Receiver<bool>,
    leader: Option<LeaderElection>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningControlPlane {
    pub async fn stop(mut self) {
        // First, so the Lease is released while the API client still works.
        if let Some(leader) = self.leader.take() {
            leader.stop().await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for RunningControlPlane {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub async fn start(config: ControlConfig) -> Result<RunningControlPlane, StartError> {
    start_with(config, ServeOptions::default()).await
}

/// [`start`] with explicit listener options.
pub async fn start_with(
    config: ControlConfig,
    options: ServeOptions,
) -> Result<RunningControlPlane, StartError> {
    let snapshot =
        registry::load_dir(&config.registry_dir, &config.trust_domain).map_err(|errors| {
            StartError::Registry {
                dir: config.registry_dir.display().to_string(),
                errors: errors.iter().map(|e| format!("  {e}\n")).collect(),
            }
        })?;
    // Counts right from the start: the watcher publishes its first status only after
    // two polls.
    let status = RegistryStatus {
        services: snapshot.services.len(),
        workloads: snapshot.workloads.len(),
        ..RegistryStatus::default()
    };
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(snapshot));
    let (status_tx, status_rx) = watch::channel(status);
    let tasks = vec![tokio::spawn(registry::watch_dir(
        config.registry_dir.clone(),
        config.trust_domain.clone(),
        REGISTRY_POLL,
        snapshot_tx,
        status_tx,
    ))];
    let ca = Arc::new(CertificateAuthority::load_or_create(
        &config.state_dir,
        &config.trust_domain,
        config.cert_ttl,
    )?);
    let feed = RegistryFeed {
        snapshots: snapshot_rx,
        status: status_rx,
        // A lone file-mode control plane is the one writer.
        leading: watch::channel(true).1,
    };
    let (running, _ca) = serve(config, options, ca, feed, tasks, None).await?;
    Ok(running)
}

/// Serves discovery and the CA for a model the caller publishes on `snapshots`, with
/// no registry of its own (`config.registry_dir` and `config.state_dir` are not used):
/// the seam for simulated registries, as in the scale benchmark.
pub async fn start_with_model(
    config: ControlConfig,
    options: ServeOptions,
    ca: Arc<CertificateAuthority>,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
) -> Result<RunningControlPlane, StartError> {
    let (services, workloads) = {
        let snapshot = snapshots.borrow();
        (snapshot.services.len(), snapshot.workloads.len())
    };
    let status = RegistryStatus {
        services,
        workloads,
        ..RegistryStatus::default()
    };
    let feed = RegistryFeed {
        snapshots,
        // The caller's model does not report; the counts stay those at start.
        status: watch::channel(status).1,
        leading: watch::channel(true).1,
    };
    let (running, _ca) = serve(config, options, ca, feed, Vec::new(), None).await?;
    Ok(running)
}

/// The kube registry's extras: the API client, who this replica is, and the
/// injector when enabled.
pub struct KubeOptions {
    pub client: kube::Client,
    /// The control plane's namespace: the CA root Secret and the Lease live here.
    pub namespace: String,
    /// The mesh root namespace, where mesh-wide policies live; by default
    /// `namespace`.
    pub root_namespace: String,
    /// Discovery selectors: the namespaces whose Services, routes and policies are
    /// in the mesh (all by default).
    pub discovery_scope: crate::registry::kube::NamespaceScope,
    /// This replica's name among its peers (the Pod name): the Lease holder.
    pub identity: String,
    pub webhook: Option<WebhookOptions>,
}

/// The admission webhook (15017).
pub struct WebhookOptions {
    pub addr: SocketAddr,
    pub settings: InjectorSettings,
    /// Names in the webhook's serving certificate (the Service's DNS names).
    pub dns_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle the control plane keeps.
    pub configuration: Option<String>,
}

/// Starts with the `kube` registry (`config.registry_dir` is not used, nor
/// `config.state_dir` unless it holds a plug-in CA, see [`crate::ca::plugged`]). Serves discovery and the CA only once every watched kind has been
/// listed, so no proxy is ever sent a half-built view. The CA root comes from the
/// Secret [`crate::ca::ROOT_SECRET`] shared by all replicas; the replicas elect one
/// leader with a Lease.
pub async fn start_kube(
    config: ControlConfig,
    kube_options: KubeOptions,
) -> Result<RunningControlPlane, StartError> {
    start_kube_with(config, kube_options, ServeOptions::default()).await
}

/// [`start_kube`] with explicit listener options.
pub async fn start_kube_with(
    config: ControlConfig,
    kube_options: KubeOptions,
    options: ServeOptions,
) -> Result<RunningControlPlane, StartError> {
    let http_limits = options.http.clone();
    use crate::registry::kube as kube_registry;
    let (snapshot_tx, mut snapshot_rx) = watch::channel(Arc::new(MeshSnapshot::default()));
    let (status_tx, mut status_rx) = watch::channel(RegistryStatus::default());
    let (namespaces_tx, namespaces_rx) =
        watch::channel(Arc::new(kube_registry::NamespaceLabels::default()));
    let (statuses_tx, statuses_rx) =
        watch::channel(Arc::new(kube_registry::StatusReport::default()));
    let client = kube_options.client;
    // The single place leadership is handed out: single-writer work (policy
    // status, the webhook's caBundle) takes `leading` and acts only while true.
    let election = LeaderElection::spawn(LeaseLock::new(
        client.clone(),
        LeaseSettings::new(&kube_options.namespace, &kube_options.identity),
    ));
    let leading = election.subscribe();
    let (events, events_task) =
        crate::events::EventSink::spawn(client.clone(), kube_options.identity.clone());
    let mut tasks = vec![
        events_task,
        tokio::spawn(kube_registry::watch_cluster(
            client.clone(),
            kube_registry::MeshNames {
                trust_domain: config.trust_domain.clone(),
                root_namespace: kube_options.root_namespace.clone(),
                scope: kube_options.discovery_scope.clone(),
            },
            kube_registry::DEFAULT_DEBOUNCE,
            kube_registry::Outputs {
                snapshots: snapshot_tx,
                status: status_tx,
                namespaces: namespaces_tx,
                statuses: statuses_tx,
            },
        )),
        tokio::spawn(kube_registry::write_statuses(
            client.clone(),
            statuses_rx,
            leading.clone(),
            watch::channel(kube_registry::WriterProgress::default()).0,
            events.clone(),
        )),
    ];
    loop {
        let listed = status_rx.wait_for(|s| s.generation > 0);
        let waited = tokio::time::timeout(Duration::from_secs(10), listed)
            .await
            .map(|r| r.is_ok());
        match waited {
            Ok(true) => break,
            Ok(false) => return Err(StartError::KubeRegistryStopped),
            Err(_) => tracing::info!(
                errors = ?status_rx.borrow().last_error,
                "waiting for the first complete list of the cluster"
            ),
        }
    }
    snapshot_rx.mark_unchanged();

    let reviewer: Arc<dyn TokenReviewer> = Arc::new(KubeTokenReviewer::new(
        client.clone(),
        config.trust_domain.clone(),
    ));
    let webhook = kube_options.webhook;
    let trust_domain = config.trust_domain.clone();
    let started = async {
        // A plug-in CA (Istio's `cacerts` Secret mounted at --state-dir) replaces
        // the shared root Secret.
        let ca = if crate::ca::plugged::is_plugged(&config.state_dir) {
            CertificateAuthority::load_or_create(
                &config.state_dir,
                &config.trust_domain,
                config.cert_ttl,
            )?
        } else {
            crate::ca::load_or_create_in_secret(
                client.clone(),
                &kube_options.namespace,
                crate::ca::ROOT_SECRET,
                &config.trust_domain,
                config.cert_ttl,
            )
            .await?
        };
        let feed = RegistryFeed {
            snapshots: snapshot_rx,
            status: status_rx,
            leading: leading.clone(),
        };
        serve(
            config,
            options,
            Arc::new(ca),
            feed,
            Vec::new(),
            Some((reviewer, events.clone())),
        )
        .await
    }
    .await;
    let (mut running, ca) = match started {
        Ok(running) => running,
        Err(e) => {
            for task in &tasks {
                task.abort();
            }
            election.stop().await;
            return Err(e);
        }
    };
    running.tasks.append(&mut tasks);
    running.leading = leading.clone();
    running.leader = Some(election);
    // Injected proxies read the root from a ConfigMap in their namespace.
    running.tasks.push(tokio::spawn(ca_root::publish_ca_root(
        client.clone(),
        running.root_pem.clone(),
        kube_options.namespace.clone(),
        namespaces_rx.clone(),
        leading.clone(),
    )));

    if let Some(webhook) = webhook {
        let own_id = SpiffeId::new(&trust_domain, "trellis-system", "trellis-control")?;
        let (cert_pem, key_pem) = ca.issue_serving(
            &own_id,
            &webhook.dns_names,
            Duration::from_secs(365 * 24 * 3600),
        )?;
        let tls = webhook::tls_config(&cert_pem, &key_pem)?;
        let listener =
            TcpListener::bind(webhook.addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: webhook.addr,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: webhook.addr,
            source,
        })?;
        let state = webhook::WebhookState {
            settings: Arc::new(webhook.settings),
            namespaces: namespaces_rx.clone(),
            events,
        };
        running.tasks.push(tokio::spawn(webhook::serve(
            listener,
            tls,
            state,
            http_limits,
        )));
        if let Some(name) = webhook.configuration {
            let root = running.root_pem.clone();
            running.tasks.push(tokio::spawn(webhook::keep_ca_bundle(
                client, name, root, leading,
            )));
        }
        tracing::info!(%addr, "injector webhook started");
        running.webhook_addr = Some(addr);
    }
    Ok(running)
}

/// What any registry hands the serving half.
struct RegistryFeed {
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    status: watch::Receiver<RegistryStatus>,
    /// Whether this replica is the leader (for the metric).
    leading: watch::Receiver<bool>,
}

/// The CA, discovery and admin, fed by any registry.
async fn serve(
    config: ControlConfig,
    options: ServeOptions,
    ca: Arc<CertificateAuthority>,
    feed: RegistryFeed,
    mut tasks: Vec<tokio::task::JoinHandle<()>>,
    token_reviewer: Option<(Arc<dyn TokenReviewer>, crate::events::EventSink)>,
) -> Result<(RunningControlPlane, Arc<CertificateAuthority>), StartError> {
    let RegistryFeed {
        snapshots: snapshot_rx,
        status: status_rx,
        leading,
    } = feed;
    let metrics = ControlMetrics::new();
    let issued = IssuedLeaves::default();
    tasks.push(tokio::spawn(count_registry_events(
        snapshot_rx.clone(),
        status_rx.clone(),
        metrics.clone(),
    )));
    let root_pem = ca.trust_bundle_pem().concat();
    let own_id = SpiffeId::new(&config.trust_domain, "trellis-system", "trellis-control")?;
    let (cert_pem, key_pem) = ca.issue_serving(
        &own_id,
        &config.server_names,
        Duration::from_secs(365 * 24 * 3600),
    )?;

    let discovery = DiscoveryServer::new(
        snapshot_rx.clone(),
        config.trust_domain.clone(),
        ca.trust_bundle_pem(),
    )
    .with_metrics(metrics.clone());
    let connected = discovery.connected();

    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.grpc_addr,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.grpc_addr,
            source,
        })?;
    // Client certificates are optional here: a proxy asking for its first certificate
    // has none yet. The discovery service itself refuses streams without one.
    let grpc = &options.grpc;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(&root_pem))
        .client_auth_optional(true)
        .timeout(grpc.handshake_timeout);
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let mut ca_service = CaService::new(ca.clone(), snapshot_rx.clone())
        .with_observers(metrics.clone(), issued.clone());
    if let Some((reviewer, events)) = token_reviewer {
        ca_service = ca_service.with_token_reviewer(reviewer).with_events(events);
    }
    let counters = Arc::new(LimitCounters {
        certificate_requests_limited: metrics.certificate_requests_limited.clone(),
        discovery_streams_refused: metrics.discovery_streams_refused.clone(),
    });
    let router = Server::builder()
        .tls_config(tls)?
        // For unary calls (certificates): a stream's call returns at once.
        .timeout(grpc.request_timeout)
        .http2_keepalive_interval(Some(grpc.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(grpc.http2_keepalive_timeout))
        .max_concurrent_streams(Some(grpc.max_streams_per_connection))
        .add_service(RateLimitedCa::new(ca_service, grpc, counters.clone()).into_server())
        .add_service(
            StreamLimitedDiscovery::new(discovery, grpc.streams_per_workload, counters.clone())
                .into_server(),
        );
    // Set on the incoming stream: the builder's TCP options apply only to `serve`.
    let incoming = TcpIncoming::from(grpc_listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(grpc.tcp_keepalive));
    tasks.push(tokio::spawn(async move {
        let result = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    }));

    let admin_listener = TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin_addr,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin_addr,
            source,
        })?;
    if !options.debug_addr.ip().is_loopback() {
        return Err(StartError::DebugNotLoopback(options.debug_addr));
    }
    let debug_listener = TcpListener::bind(options.debug_addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: options.debug_addr,
            source,
        })?;
    let debug_addr = debug_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: options.debug_addr,
            source,
        })?;
    let state = admin::AdminState {
        registry: status_rx,
        snapshots: snapshot_rx,
        connected,
        metrics,
        issued,
        leading,
    };
    tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        state.clone(),
        options.http.clone(),
    )));
    tasks.push(tokio::spawn(admin::serve_debug(
        debug_listener,
        state,
        options.http.clone(),
    )));
    tracing::info!(%grpc_addr, %admin_addr, %debug_addr, trust_domain = config.trust_domain, "control plane started");
    let running = RunningControlPlane {
        grpc_addr,
        admin_addr,
        debug_addr,
        webhook_addr: None,
        root_pem,
        // Until an election says otherwise, a control plane is alone and leads.
        leading: watch::channel(true).1,
        leader: None,
        shutdown: Some(shutdown_tx),
        tasks,
    };
    Ok((running, ca))
}

/// Counts the registry's events: what changed in each new snapshot, by kind, and
/// each new rejection of the registry's content.
async fn count_registry_events(
    mut snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    mut status: watch::Receiver<RegistryStatus>,
    metrics: ControlMetrics,
) {
    // The first model counts as added, as a watch's initial list does.
    let mut last = snapshots.borrow_and_update().clone();
    metrics.model_changed(&MeshSnapshot::default(), &last);
    let mut last_error = status.borrow_and_update().last_error.clone();
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let next = snapshots.borrow_and_update().clone();
                metrics.model_changed(&last, &next);
                last = next;
            }
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                let errors = status.borrow_and_update().last_error.clone();
                if !errors.is_empty() && errors != last_error {
                    metrics.registry_rejections.inc();
                }
                last_error = errors;
            }
        }
    }
}
