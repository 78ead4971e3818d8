//! Inbound: terminate mTLS, learn who is calling, check policy, forward to the app.
//!
//! STRICT by default: a connection that does not complete a mutual TLS handshake with
//! a certificate from our trust bundle never reaches the app. PeerAuthentication may
//! relax a port to PERMISSIVE (TLS and plaintext told apart by the first byte) or
//! DISABLE (plaintext, nothing terminated).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;
use trellis_identity::{MeshTls, SpiffeId, spiffe_id_of};

use crate::authz::{Decision, MtlsMode, RequestInfo};
use crate::config::ProxyConfig;
use crate::detect::{DownstreamIo, PrefixedIo};
use crate::discovery::MeshState;
use crate::http::inbound::{AppClients, InboundConnection};
use crate::http::sniff::{Sniffed, sniff};
use crate::metrics::{Metrics, PeerLabels, PolicyLabels, ReasonLabels};
use crate::orig_dst::original_dst;
use crate::request_metrics::{self, LabelledPeers, Peers, Reporter, Workload};

/// Shared by every inbound connection.
#[derive(Clone)]
pub struct Inbound {
    pub config: Arc<ProxyConfig>,
    pub tls: watch::Receiver<Option<Arc<MeshTls>>>,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub metrics: Metrics,
    pub apps: Arc<AppClients>,
    pub drain: crate::drain::Drain,
    /// SERVER spans, when on.
    pub tracing: crate::trace::Tracing,
}

impl Inbound {
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = self.drain.signaled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            let guard = self.drain.track();
            let span = tracing::debug_span!("inbound", %peer);
            tokio::spawn(
                async move {
                    let _guard = guard;
                    if let Err(reason) = this.handle(stream, peer).await {
                        tracing::debug!(error = %reason, "inbound connection refused");
                        this.metrics
                            .inbound_refused
                            .get_or_create(&ReasonLabels {
                                reason: reason.label().to_owned(),
                            })
                            .inc();
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn handle(&self, mut stream: TcpStream, source: SocketAddr) -> Result<(), InboundError> {
        let _ = stream.set_nodelay(true);
        let original = original_dst(&stream);
        let app = self.app_address(original)?;
        let port = app.port();
        let (mode, declared_opaque) = {
            let state = self.state.borrow();
            // Fail closed: no policy accepted yet means nobody is allowed in.
            if !state.inbound_policy.accepted {
                tracing::info!(%source, port, "inbound connection refused: no policy accepted from the control plane yet");
                return Err(InboundError::NoPolicyYet);
            }
            // A port its Service declares tcp or opaque is carried as bytes without
            // waiting for protocol detection (client-first protocols whose first bytes
            // look like an unfinished request line would otherwise wait it out).
            let declared_opaque = original.is_some_and(|dst| state.opaque_endpoints.contains(&dst));
            (state.inbound_policy.peer_auth.mode(port), declared_opaque)
        };
        let prefix = match mode {
            MtlsMode::Strict => Bytes::new(),
            MtlsMode::Disable => {
                return self
                    .plaintext(stream, Bytes::new(), source, port, app, declared_opaque)
                    .await;
            }
            MtlsMode::Permissive => {
                // A TLS record starts with 0x16 (handshake); anything else is plaintext.
                let mut first = [0u8; 1];
                let n = tokio::time::timeout(self.config.detect_timeout, stream.read(&mut first))
                    .await
                    .unwrap_or(Ok(0))
                    .map_err(InboundError::Handshake)?;
                let prefix = Bytes::copy_from_slice(&first[..n]);
                if first[..n] != [0x16] {
                    return self
                        .plaintext(stream, prefix, source, port, app, declared_opaque)
                        .await;
                }
                prefix
            }
        };
        let tls = self
            .tls
            .borrow()
            .clone()
            .ok_or(InboundError::NoCertificate)?;
        let acceptor = TlsAcceptor::from(tls.server_config());
        let io = PrefixedIo::new(prefix, stream);
        let downstream = tokio::time::timeout(self.config.handshake_timeout, acceptor.accept(io))
            .await
            .map_err(|_| InboundError::HandshakeTimeout)?
            .map_err(InboundError::Handshake)?;
        let peer_cert = downstream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or(trellis_identity::PeerIdentityError::NoUriSan)?;
        let peer = spiffe_id_of(peer_cert)?;
        let labels = PeerLabels {
            peer_identity: peer.to_string(),
        };
        self.metrics
            .inbound_connections
            .get_or_create(&labels)
            .inc();
        tracing::debug!(peer_identity = %peer, port, "inbound mTLS accepted");

        // The mesh's own HTTP: HTTP/2, or HTTP/1.1 for HTTP/1.1 callers. Either goes
        // through the same identity, path and policy steps.
        let alpn = downstream.get_ref().1.alpn_protocol();
        let (h2, http1) = (
            alpn == Some(trellis_identity::ALPN_H2),
            alpn == Some(trellis_identity::ALPN_HTTP1),
        );
        let downstream = DownstreamIo::Tls(Box::new(downstream));
        if h2 {
            self.metrics.active_connections.inc();
            self.http(app, port, Some(peer), source)
                .serve(PrefixedIo::new(Bytes::new(), downstream))
                .await;
            self.metrics.active_connections.dec();
            return Ok(());
        }
        if http1 {
            self.metrics.active_connections.inc();
            self.http(app, port, Some(peer), source)
                .serve_http1(PrefixedIo::new(Bytes::new(), downstream))
                .await;
            self.metrics.active_connections.dec();
            return Ok(());
        }
        let bytes = self
            .stream(downstream, Some(peer), source, port, app, declared_opaque)
            .await?;
        self.metrics
            .inbound_bytes
            .get_or_create(&labels)
            .inc_by(bytes);
        Ok(())
    }

    fn http(
        &self,
        app: SocketAddr,
        port: u16,
        peer: Option<SpiffeId>,
        source: SocketAddr,
    ) -> InboundConnection {
        let peers = self.peers(app, port, peer.as_ref());
        InboundConnection {
            peers,
            app: self.apps.pool(app),
            port,
            own_identity: Arc::new(self.config.identity.clone()),
            peer: peer.map(Arc::new),
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            path_normalization: self.config.path_normalization,
            drain: self.drain.clone(),
            tracing: self.tracing.clone(),
            source,
        }
    }

    /// The request metrics' labels of a connection to `app` (`reporter="destination"`),
    /// resolved once for the connection: the caller by its certificate, this
    /// workload by its own, the service by the endpoint the caller dialed.
    fn peers(&self, app: SocketAddr, port: u16, peer: Option<&SpiffeId>) -> Arc<LabelledPeers> {
        let service = {
            let state = self.state.borrow();
            state
                .services
                .values()
                .find(|s| s.endpoints.all().any(|e| e.address == app))
                .map(|s| (s.service.clone(), s.port))
        };
        let (destination_service, destination_port) =
            service.unwrap_or_else(|| (request_metrics::UNKNOWN.to_owned(), port));
        LabelledPeers::new(
            self.metrics.requests.clone(),
            Peers {
                reporter: Reporter::Destination,
                source: Arc::new(peer.map_or_else(Workload::unknown, Workload::of)),
                destination: Arc::new(Workload::of(&self.config.identity)),
                destination_service,
                destination_port,
                route_name: request_metrics::NO_FLAGS.to_owned(),
            },
        )
    }

    /// A stream that is not the mesh's HTTP/2 (plaintext, or an mTLS upgrade or TCP
    /// stream): HTTP in it goes through the HTTP stack, so identity headers and path
    /// policy apply; only what cannot be HTTP is carried as bytes. Returns the bytes
    /// carried.
    async fn stream(
        &self,
        mut downstream: DownstreamIo,
        peer: Option<SpiffeId>,
        source: SocketAddr,
        port: u16,
        app: SocketAddr,
        declared_opaque: bool,
    ) -> Result<u64, InboundError> {
        let timeout = self.config.detect_timeout;
        let sniffed = if declared_opaque {
            Sniffed::Opaque {
                prefix: Bytes::new(),
                app: None,
            }
        } else {
            sniff(&mut downstream, app, self.config.connect_timeout, timeout)
                .await
                .map_err(InboundError::Handshake)?
        };
        let http2 = matches!(sniffed, Sniffed::Http2(_));
        let (prefix, upstream) = match sniffed {
            Sniffed::Opaque { prefix, app } => (prefix, app),
            Sniffed::Http1(prefix) | Sniffed::Http2(prefix) => {
                let io = PrefixedIo::new(prefix, downstream);
                let http = self.http(app, port, peer, source);
                self.metrics.active_connections.inc();
                if http2 {
                    http.serve(io).await;
                } else {
                    http.serve_http1(io).await;
                }
                self.metrics.active_connections.dec();
                return Ok(0);
            }
        };
        if let Err(e) = self.authorize_l4(peer.as_ref(), port) {
            let _ = downstream.shutdown().await;
            return Err(e);
        }
        let upstream = match upstream {
            Some(upstream) => upstream,
            None => match self.connect_app(app).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = downstream.shutdown().await;
                    return Err(e);
                }
            },
        };
        let io = PrefixedIo::new(prefix, downstream);
        let peers = self.peers(app, port, peer.as_ref());
        Ok(self.carry(io, upstream, peer.as_ref(), port, &peers).await)
    }

    /// Where the app is for a connection redirected to `original`: the pod address
    /// the caller dialed, so a port the app bound to localhost only stays out of the
    /// mesh's reach (the proxy's UID is exempt from redirection, so this does not
    /// loop). With `inbound_to_localhost`, or without redirection, the app host.
    fn app_address(&self, original: Option<SocketAddr>) -> Result<SocketAddr, InboundError> {
        match original {
            Some(dst) if self.config.inbound_to_localhost => Ok(SocketAddr::new(
                localhost_for(self.config.app_host, dst),
                dst.port(),
            )),
            Some(dst) => Ok(dst),
            None => {
                let port = self.config.app_port.ok_or(InboundError::NoAppPort)?;
                Ok(SocketAddr::new(self.config.app_host, port))
            }
        }
    }

    /// A plaintext caller on a PERMISSIVE or DISABLE port: no identity.
    async fn plaintext(
        &self,
        stream: TcpStream,
        prefix: Bytes,
        source: SocketAddr,
        port: u16,
        app: SocketAddr,
        declared_opaque: bool,
    ) -> Result<(), InboundError> {
        tracing::debug!(%source, port, "plaintext inbound connection");
        self.stream(
            DownstreamIo::Plain(PrefixedIo::new(prefix, stream)),
            None,
            source,
            port,
            app,
            declared_opaque,
        )
        .await
        .map(drop)
    }

    fn authorize_l4(&self, peer: Option<&SpiffeId>, port: u16) -> Result<(), InboundError> {
        let state = self.state.borrow().clone();
        let decision = state.inbound_policy.authorizer.decide(&RequestInfo {
            peer,
            port,
            http: None,
        });
        record(&self.metrics, &decision, peer, port);
        match decision {
            Decision::Allow => Ok(()),
            Decision::Deny { policy } => Err(InboundError::Denied(policy)),
        }
    }

    async fn connect_app(&self, app: SocketAddr) -> Result<TcpStream, InboundError> {
        let stream = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(app))
            .await
            .map_err(|_| InboundError::App {
                addr: app,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| InboundError::App { addr: app, source })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Copies both ways until either side closes, or until a policy change denies
    /// this caller: then the connection is closed.
    async fn carry<D>(
        &self,
        mut downstream: D,
        mut upstream: TcpStream,
        peer: Option<&SpiffeId>,
        port: u16,
        peers: &Arc<LabelledPeers>,
    ) -> u64
    where
        D: AsyncRead + AsyncWrite + Unpin,
    {
        self.metrics.active_connections.inc();
        let tally = peers.tcp_opened();
        let app = upstream.peer_addr().ok();
        let mut state = self.state.clone();
        state.mark_unchanged();
        let copy = tokio::io::copy_bidirectional(&mut downstream, &mut upstream);
        tokio::pin!(copy);
        let (received, sent) = loop {
            tokio::select! {
                copied = &mut copy => break copied.unwrap_or_default(),
                changed = state.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let current = state.borrow_and_update().clone();
                    let decision = current.inbound_policy.authorizer.decide(&RequestInfo { peer, port, http: None });
                    if let Decision::Deny { policy } = decision {
                        tracing::info!(peer_identity = ?peer.map(ToString::to_string), port, policy, "closing a connection that policy now denies");
                        record(&self.metrics, &Decision::Deny { policy }, peer, port);
                        break (0, 0);
                    }
                }
            }
        };
        self.metrics.active_connections.dec();
        // As in Istio: received is the caller's direction, sent the answer's.
        tally.closed(app, received, sent);
        received + sent
    }
}

/// The app host for `inbound_to_localhost`: loopback in the destination's family
/// when the configured host is loopback, else the configured host.
fn localhost_for(app_host: IpAddr, dst: SocketAddr) -> IpAddr {
    match (app_host.is_loopback(), dst) {
        (true, SocketAddr::V6(_)) => Ipv6Addr::LOCALHOST.into(),
        (true, SocketAddr::V4(_)) => Ipv4Addr::LOCALHOST.into(),
        (false, _) => app_host,
    }
}

/// Counts a decision; denials are logged with who, where and which policy.
pub fn record(metrics: &Metrics, decision: &Decision, peer: Option<&SpiffeId>, port: u16) {
    match decision {
        Decision::Allow => {
            metrics.authz_allowed.inc();
        }
        Decision::Deny { policy } => {
            let peer = peer
                .map(ToString::to_string)
                .unwrap_or_else(|| "plaintext".to_owned());
            tracing::info!(
                peer_identity = peer,
                port,
                policy,
                "denied by authorization policy"
            );
            metrics
                .authz_denied
                .get_or_create(&PolicyLabels {
                    policy: policy.clone(),
                    peer_identity: peer,
                })
                .inc();
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error("no workload certificate yet")]
    NoCertificate,
    #[error("mTLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("mTLS handshake timed out")]
    HandshakeTimeout,
    #[error("the peer's identity is unusable: {0}")]
    Identity(#[from] trellis_identity::PeerIdentityError),
    #[error("no app port: the connection was not redirected and no --app-port is set")]
    NoAppPort,
    #[error("no policy accepted from the control plane yet")]
    NoPolicyYet,
    #[error("denied by {0}")]
    Denied(String),
    #[error("connecting to the app at {addr}: {source}")]
    App {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl InboundError {
    fn label(&self) -> &'static str {
        match self {
            InboundError::NoCertificate => "no_certificate",
            InboundError::Handshake(_) | InboundError::HandshakeTimeout => "tls_handshake",
            InboundError::Identity(_) => "peer_identity",
            InboundError::NoAppPort => "no_app_port",
            InboundError::NoPolicyYet => "no_policy_yet",
            InboundError::Denied(_) => "denied",
            InboundError::App { .. } => "app_unreachable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_follows_the_destination_family() {
        let v4: SocketAddr = "10.244.0.5:8080".parse().unwrap();
        let v6: SocketAddr = "[fd00::5]:8080".parse().unwrap();
        let lo4: IpAddr = Ipv4Addr::LOCALHOST.into();
        assert_eq!(localhost_for(lo4, v4), lo4);
        assert_eq!(localhost_for(lo4, v6), IpAddr::from(Ipv6Addr::LOCALHOST));
        let custom: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(localhost_for(custom, v6), custom);
    }
}
