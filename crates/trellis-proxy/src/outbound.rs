//! Outbound: take the app's connection, find the service it meant, pick an endpoint,
//! and carry the bytes over mTLS to that endpoint's sidecar, which must prove the
//! identity discovery promised (or, for an endpoint without a sidecar, straight to
//! its app in plaintext).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tracing::Instrument;
use trellis_identity::{MeshTls, SpiffeId};

use crate::config::{OutboundPolicy, ProxyConfig, Upstream};
use crate::detect;
use crate::discovery::MeshState;
use crate::discovery::state::ServicePort;
use crate::http::outbound::HttpOutbound;
use crate::metrics::{Metrics, ReasonLabels, ServiceLabels};
use crate::orig_dst::original_dst;
use crate::request_metrics::{self, LabelledPeers, Peers, Reporter, Workload};
use crate::tcp;
use bytes::Bytes;
use trellis_proto::discovery::v1::Protocol;

/// The `peer_identity` label of connections to endpoints without a sidecar.
pub const PLAINTEXT_PEER: &str = "plaintext";

/// How many endpoints one connection tries before giving up.
const CONNECT_ATTEMPTS: usize = 3;

/// Shared by every outbound listener.
#[derive(Clone)]
pub struct Outbound {
    pub config: Arc<ProxyConfig>,
    pub tls: watch::Receiver<Option<Arc<MeshTls>>>,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub metrics: Metrics,
    pub http: Arc<HttpOutbound>,
    pub drain: crate::drain::Drain,
}

/// Where a connection is going.
enum Target {
    Service(Arc<ServicePort>),
    Passthrough(SocketAddr),
}

impl Outbound {
    /// An explicit listener for one upstream service (no iptables).
    pub async fn serve_upstream(self, listener: TcpListener, upstream: Upstream) {
        let upstream = Arc::new(upstream);
        self.accept_loop(listener, move |_, state| {
            match state.service(&upstream.service, upstream.port) {
                Some(service) => Ok(Target::Service(service.clone())),
                None => Err(OutboundError::UnknownService(format!(
                    "{}:{}",
                    upstream.service, upstream.port
                ))),
            }
        })
        .await
    }

    /// The transparent listener: iptables sends every outbound connection here.
    pub async fn serve_transparent(self, listener: TcpListener) {
        let policy = self.config.outbound_policy;
        self.accept_loop(listener, move |stream, state| {
            let dst = original_dst(stream).ok_or(OutboundError::NoOriginalDst)?;
            if let Some(service) = state.vips.get(&dst) {
                return Ok(Target::Service(service.clone()));
            }
            // A connection straight to a pod address: find its service port by the
            // endpoint it names (an index, not a scan), so the peer identity is
            // still checked.
            if let Some(service) = state.endpoint_services.get(&dst) {
                return Ok(Target::Service(Arc::new(ServicePort {
                    service: service.service.clone(),
                    port: service.port,
                    protocol: service.protocol,
                    endpoints: Arc::new(crate::balance::EndpointSet::new(
                        service
                            .endpoints
                            .all()
                            .filter(|e| e.address == dst)
                            .cloned()
                            .collect(),
                        Some(&service.endpoints),
                    )),
                })));
            }
            match policy {
                OutboundPolicy::AllowAny => Ok(Target::Passthrough(dst)),
                OutboundPolicy::RegistryOnly => Err(OutboundError::NotInRegistry(dst)),
            }
        })
        .await
    }

    async fn accept_loop<F>(self, listener: TcpListener, route: F)
    where
        F: Fn(&TcpStream, &MeshState) -> Result<Target, OutboundError> + Send + Sync + 'static,
    {
        let route = Arc::new(route);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = self.drain.signaled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            let route = route.clone();
            let guard = self.drain.track();
            let span = tracing::debug_span!("outbound", %peer);
            tokio::spawn(
                async move {
                    let _guard = guard;
                    let state = this.state.borrow().clone();
                    let result = match route(&stream, &state) {
                        Ok(target) => this.forward(stream, target).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "outbound connection failed");
                        this.metrics
                            .outbound_failures
                            .get_or_create(&ReasonLabels {
                                reason: e.label().to_owned(),
                            })
                            .inc();
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn forward(
        &self,
        mut downstream: TcpStream,
        target: Target,
    ) -> Result<(), OutboundError> {
        let _ = downstream.set_nodelay(true);
        let service = match target {
            Target::Service(service) => service,
            Target::Passthrough(dst) => {
                self.metrics.passthrough_connections.inc();
                let mut upstream = self.connect(dst).await?;
                let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                return Ok(());
            }
        };
        // HTTP is handled per request; anything else is carried as a byte stream. A
        // port declared tcp/opaque is never inspected. On a port declared HTTP only an
        // upgrade (WebSocket, CONNECT) becomes a stream: silence or garbage still meets
        // the HTTP server (which answers 400), so no caller can skip L7 handling (and
        // header sanitizing) by waiting. An undeclared port is detected.
        let declared_http = matches!(
            service.protocol,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc
        );
        // An undeclared port on the opaque list (server-first protocols) is not
        // inspected either: its client would wait out the detection timeout.
        let opaque = match service.protocol {
            Protocol::Tcp | Protocol::Opaque => true,
            Protocol::Unspecified => self.config.opaque_ports.contains(service.port),
            Protocol::Http | Protocol::Http2 | Protocol::Grpc => false,
        };
        let prefix = if opaque {
            Bytes::new()
        } else {
            let (detected, prefix) = detect::detect(&mut downstream, self.config.detect_timeout)
                .await
                .map_err(|source| OutboundError::Connect {
                    addr: downstream.local_addr().unwrap_or(([0, 0, 0, 0], 0).into()),
                    source,
                })?;
            let http = match detected {
                detect::Protocol::Http1 | detect::Protocol::Http2 => true,
                detect::Protocol::Upgrade => false,
                detect::Protocol::Opaque => declared_http,
                detect::Protocol::HeadTooLong => {
                    self.metrics.detect_head_too_long.inc();
                    declared_http
                }
            };
            if http {
                let io = detect::PrefixedIo::new(
                    Bytes::new(),
                    detect::DownstreamIo::Plain(detect::PrefixedIo::new(prefix, downstream)),
                );
                let http2 = detected == detect::Protocol::Http2;
                self.http.clone().serve(io, service, http2).await;
                return Ok(());
            }
            prefix
        };
        let mut downstream = detect::PrefixedIo::new(prefix, downstream);
        let tls = self.tls.borrow().clone();
        let policy = self.state.borrow().policy(&service.service);
        let mut failed = Vec::new();
        let mut last_error = OutboundError::NoEndpoints(service.service.clone());
        let mut attempts = 0;
        while attempts < CONNECT_ATTEMPTS {
            let Some((endpoint, active)) = service.endpoints.pick(&failed) else {
                break;
            };
            // maxConnections holds per endpoint (counted by this proxy, the picked
            // connection included): a full endpoint is passed over for one under its
            // limit; when every endpoint is full the connection is refused, as
            // Envoy's circuit breaker does.
            if let Some(limit) = policy.max_connections
                && active.stats().active() > limit as usize
            {
                failed.push(endpoint.dial);
                last_error = OutboundError::Overflow(service.service.clone());
                continue;
            }
            attempts += 1;
            let labels = || ServiceLabels {
                service: service.service.clone(),
                peer_identity: endpoint
                    .identity
                    .as_ref()
                    .map_or_else(|| PLAINTEXT_PEER.to_owned(), ToString::to_string),
            };
            let idle = policy.idle_timeout;
            let peers = LabelledPeers::new(
                self.metrics.requests.clone(),
                Peers {
                    reporter: Reporter::Source,
                    source: Arc::new(Workload::of(&self.config.identity)),
                    destination: endpoint.workload.clone(),
                    destination_service: service.service.clone(),
                    destination_port: service.port,
                    route_name: request_metrics::NO_FLAGS.to_owned(),
                },
            );
            let connected: Result<(), OutboundError> = match &endpoint.identity {
                Some(identity) => {
                    async {
                        let mut upstream = self
                            .connect_mtls(tls.as_deref(), identity, endpoint.dial)
                            .await?;
                        self.splice(
                            &mut downstream,
                            &mut upstream,
                            &labels(),
                            idle,
                            (&peers, endpoint.dial),
                        )
                        .await;
                        Ok(())
                    }
                    .await
                }
                // No sidecar there: the bytes go to the app as they are.
                None => {
                    async {
                        let mut upstream = self.connect(endpoint.dial).await?;
                        self.splice(
                            &mut downstream,
                            &mut upstream,
                            &labels(),
                            idle,
                            (&peers, endpoint.dial),
                        )
                        .await;
                        Ok(())
                    }
                    .await
                }
            };
            match connected {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(
                        endpoint = %endpoint.dial,
                        identity = endpoint.identity.as_ref().map(tracing::field::display),
                        error = %e,
                        "endpoint failed"
                    );
                    failed.push(endpoint.dial);
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    async fn connect_mtls(
        &self,
        tls: Option<&MeshTls>,
        identity: &SpiffeId,
        dial: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, OutboundError> {
        let tls = tls.ok_or(OutboundError::NoCertificate)?;
        let client = tls.client_config(identity).map_err(OutboundError::Tls)?;
        let tcp = self.connect(dial).await?;
        let name = ServerName::IpAddress(dial.ip().into());
        tokio::time::timeout(
            self.config.handshake_timeout,
            TlsConnector::from(client).connect(name, tcp),
        )
        .await
        .map_err(|_| OutboundError::HandshakeTimeout)?
        .map_err(OutboundError::Handshake)
    }

    /// Carries bytes both ways until either side closes or, with an idle timeout,
    /// both are silent that long; counts the connection.
    async fn splice<D, U>(
        &self,
        downstream: &mut D,
        upstream: &mut U,
        labels: &ServiceLabels,
        idle: Option<std::time::Duration>,
        (peers, upstream_addr): (&Arc<LabelledPeers>, SocketAddr),
    ) where
        D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        self.metrics
            .outbound_connections
            .get_or_create(labels)
            .inc();
        self.metrics.active_connections.inc();
        let tally = peers.tcp_opened();
        let carried = tcp::carry(downstream, upstream, idle).await;
        self.metrics.active_connections.dec();
        let (received, sent) = carried.as_ref().map_or((0, 0), |c| (c.a_to_b, c.b_to_a));
        tally.closed(Some(upstream_addr), received, sent);
        if let Ok(carried) = carried {
            if carried.idle_timeout {
                tracing::debug!(?idle, "closed an idle connection");
            }
            self.metrics
                .outbound_bytes
                .get_or_create(labels)
                .inc_by(carried.a_to_b + carried.b_to_a);
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, OutboundError> {
        let stream = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| OutboundError::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| OutboundError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

#[derive(Debug, thiserror::Error)]
enum OutboundError {
    #[error("no workload certificate yet")]
    NoCertificate,
    #[error("service {0} is not known to discovery")]
    UnknownService(String),
    #[error("the connection has no original destination")]
    NoOriginalDst,
    #[error("{0} is outside the mesh and the outbound policy is REGISTRY_ONLY")]
    NotInRegistry(SocketAddr),
    #[error("service {0} has no ready endpoint")]
    NoEndpoints(String),
    #[error("every endpoint of service {0} is at its maxConnections")]
    Overflow(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(trellis_identity::TlsConfigError),
    #[error("mTLS handshake timed out")]
    HandshakeTimeout,
    #[error("mTLS handshake failed: {0}")]
    Handshake(std::io::Error),
}

impl OutboundError {
    fn label(&self) -> &'static str {
        match self {
            OutboundError::NoCertificate => "no_certificate",
            OutboundError::UnknownService(_) => "unknown_service",
            OutboundError::NoOriginalDst => "no_original_dst",
            OutboundError::NotInRegistry(_) => "registry_only",
            OutboundError::NoEndpoints(_) => "no_endpoints",
            OutboundError::Overflow(_) => "max_connections",
            OutboundError::Connect { .. } => "connect",
            OutboundError::Tls(_) => "tls_config",
            OutboundError::HandshakeTimeout | OutboundError::Handshake(_) => "tls_handshake",
        }
    }
}
