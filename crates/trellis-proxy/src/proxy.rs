//! Starting a proxy: certificate first, then discovery, then the listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::config::ProxyConfig;
use crate::discovery::{self, MeshState};
use crate::identity::{self, IdentityError};
use crate::inbound;
use crate::metrics::Metrics;
use crate::outbound::Outbound;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("getting a workload certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("starting the trace exporter: {0}")]
    Tracing(#[from] crate::trace::TraceError),
    #[error("opening the access log {target}: {source}")]
    AccessLog {
        target: String,
        source: std::io::Error,
    },
}

/// A proxy running in this process; its tasks stop when it is dropped.
pub struct RunningProxy {
    pub admin_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: Option<SocketAddr>,
    pub upstream_addrs: Vec<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub admin: AdminState,
    drain: crate::drain::DrainTrigger,
    tracing: crate::trace::Tracing,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RunningProxy {
    /// Stops accepting, gives open connections up to `grace` to finish, then stops.
    pub async fn shutdown(self, grace: std::time::Duration) {
        let left = self.drain.drain(grace).await;
        if left > 0 {
            tracing::info!(
                open = left,
                "drain period over; closing the remaining connections"
            );
        }
        self.tracing.flush(std::time::Duration::from_secs(2)).await;
    }

    /// Waits until the proxy has a certificate and a first config.
    pub async fn ready(&self) {
        let mut synced = self.admin.synced.clone();
        let _ = synced.wait_for(|s| s.synced).await;
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// The listeners for a pod-facing address: a wildcard binds IPv4 and IPv6 (see
/// [`crate::listen`]), so IPv6 traffic redirected by ip6tables finds the proxy.
fn bind_every_family(what: &'static str, addr: SocketAddr) -> Result<Vec<TcpListener>, StartError> {
    crate::listen::bind(addr).map_err(|source| StartError::Bind { what, addr, source })
}

fn local(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

/// The first (IPv4, for a wildcard) listener's address.
fn first_local(listeners: &[TcpListener], fallback: SocketAddr) -> SocketAddr {
    listeners.first().map_or(fallback, |l| local(l, fallback))
}

/// Binds every listener (so ports are known, and taken, at once), then fetches the
/// first certificate with retries while admin already answers /live.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    let config = Arc::new(config);
    let access_log = match &config.access_log {
        Some(target) => {
            crate::access_log::AccessLog::start(target).map_err(|source| StartError::AccessLog {
                target: format!("{target:?}"),
                source,
            })?
        }
        None => crate::access_log::AccessLog::off(),
    };
    let metrics = Metrics::with_access_log(access_log);
    let tracing = match &config.tracing {
        Some(trace) => crate::trace::Tracing::start(trace, &config.identity, &metrics)?,
        None => crate::trace::Tracing::off(),
    };
    let (tls_tx, tls_rx) = watch::channel(None);
    let (state_tx, state_rx) = watch::channel(Arc::new(MeshState::default()));
    let (bundle_tx, bundle_rx) = watch::channel(None);
    let (synced_tx, synced_rx) = watch::channel(discovery::SyncStatus::default());

    let (drain_trigger, drain) = crate::drain::channel();
    let admin_listener = bind("admin", config.admin_addr).await?;
    let inbound_listeners = bind_every_family("inbound", config.inbound_addr)?;
    let outbound_listeners = match config.outbound_addr {
        Some(addr) => bind_every_family("outbound", addr)?,
        None => Vec::new(),
    };
    let mut upstream_listeners = Vec::new();
    for upstream in &config.upstreams {
        upstream_listeners.push((bind("upstream", upstream.listen).await?, upstream.clone()));
    }

    let admin = AdminState {
        config: config.clone(),
        tls: tls_rx.clone(),
        state: state_rx.clone(),
        synced: synced_rx,
        metrics: metrics.clone(),
    };
    let mut running = RunningProxy {
        admin_addr: local(&admin_listener, config.admin_addr),
        inbound_addr: first_local(&inbound_listeners, config.inbound_addr),
        outbound_addr: config
            .outbound_addr
            .map(|addr| first_local(&outbound_listeners, addr)),
        upstream_addrs: upstream_listeners
            .iter()
            .map(|(l, u)| local(l, u.listen))
            .collect(),
        health_addr: None,
        admin: admin.clone(),
        drain: drain_trigger,
        tracing: tracing.clone(),
        tasks: Vec::new(),
    };
    if let Some(addr) = config.health_addr {
        let listeners = bind_every_family("health", addr)?;
        running.health_addr = Some(first_local(&listeners, addr));
        let probes = Arc::new(config.app_probes.clone());
        for listener in listeners {
            running.tasks.push(tokio::spawn(crate::health::serve(
                listener,
                admin.clone(),
                probes.clone(),
            )));
        }
    }
    running
        .tasks
        .push(tokio::spawn(admin::serve(admin_listener, admin)));

    let first = first_certificate(&config).await?;
    tracing::info!(identity = %first.cert.id, serial = first.cert.serial, "workload certificate issued");
    identity::publish(&first.cert, &first.bundle, &tls_tx, &metrics);
    running.tasks.push(tokio::spawn(identity::maintain(
        config.clone(),
        first,
        tls_tx,
        bundle_rx,
        metrics.clone(),
    )));
    running.tasks.push(tokio::spawn(discovery::run(
        config.clone(),
        tls_rx.clone(),
        state_tx,
        bundle_tx,
        synced_tx,
        metrics.clone(),
    )));
    let inbound = inbound::Inbound {
        config: config.clone(),
        tls: tls_rx.clone(),
        state: state_rx.clone(),
        metrics: metrics.clone(),
        apps: Arc::new(crate::http::inbound::AppClients::new(
            config.connect_timeout,
        )),
        drain: drain.clone(),
        tracing: tracing.clone(),
    };
    for listener in inbound_listeners {
        running
            .tasks
            .push(tokio::spawn(inbound.clone().serve(listener)));
    }
    let http = Arc::new(crate::http::outbound::HttpOutbound {
        tls: tls_rx.clone(),
        state: state_rx.clone(),
        pool: crate::http::pool::MeshPool::new(metrics.clone()),
        http1_pool: crate::http::mesh_h1::MeshHttp1Pool::new(metrics.clone()),
        plain: crate::http::plain::PlainClients::new(config.connect_timeout),
        connect_timeout: config.connect_timeout,
        own_workload: Arc::new(crate::request_metrics::Workload::of(&config.identity)),
        metrics: metrics.clone(),
        tracing,
    });
    let outbound = Outbound {
        config: config.clone(),
        tls: tls_rx,
        state: state_rx,
        metrics,
        http,
        drain,
    };
    for listener in outbound_listeners {
        running
            .tasks
            .push(tokio::spawn(outbound.clone().serve_transparent(listener)));
    }
    for (listener, upstream) in upstream_listeners {
        running.tasks.push(tokio::spawn(
            outbound.clone().serve_upstream(listener, upstream),
        ));
    }
    Ok(running)
}

/// The CA may not be up yet when the proxy starts; a refusal is final.
async fn first_certificate(config: &ProxyConfig) -> Result<identity::Issued, IdentityError> {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match identity::fetch(config, None).await {
            Ok(issued) => return Ok(issued),
            Err(IdentityError::Refused(status)) if status.code() != tonic::Code::Unavailable => {
                return Err(IdentityError::Refused(status));
            }
            Err(e @ (IdentityError::NoProof | IdentityError::Certificate(_))) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "control plane not reachable yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}
