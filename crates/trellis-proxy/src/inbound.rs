//! Inbound: terminate mTLS, learn who is calling, forward to the app.
//!
//! STRICT by default: a connection that does not complete a mutual TLS handshake with
//! a certificate from our trust bundle never reaches the app.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;
use trellis_identity::{MeshTls, spiffe_id_of};

use crate::config::ProxyConfig;
use crate::http::inbound::AppClients;
use crate::metrics::{Metrics, PeerLabels, ReasonLabels};
use crate::orig_dst::original_dst;

pub async fn serve(
    listener: TcpListener,
    config: Arc<ProxyConfig>,
    tls: watch::Receiver<Option<Arc<MeshTls>>>,
    metrics: Metrics,
) {
    let apps = Arc::new(AppClients::new());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let config = config.clone();
        let tls = tls.borrow().clone();
        let metrics = metrics.clone();
        let apps = apps.clone();
        let span = tracing::debug_span!("inbound", %peer);
        tokio::spawn(
            async move {
                let reason = match tls {
                    Some(tls) => match handle(stream, &config, &tls, &metrics, &apps).await {
                        Ok(()) => return,
                        Err(e) => e,
                    },
                    None => InboundError::NoCertificate,
                };
                tracing::debug!(error = %reason, "inbound connection refused");
                metrics
                    .inbound_refused
                    .get_or_create(&ReasonLabels {
                        reason: reason.label().to_owned(),
                    })
                    .inc();
            }
            .instrument(span),
        );
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
            InboundError::App { .. } => "app_unreachable",
        }
    }
}

async fn handle(
    stream: TcpStream,
    config: &ProxyConfig,
    tls: &MeshTls,
    metrics: &Metrics,
    apps: &Arc<AppClients>,
) -> Result<(), InboundError> {
    let _ = stream.set_nodelay(true);
    let port = match original_dst(&stream) {
        Some(dst) => dst.port(),
        None => config.app_port.ok_or(InboundError::NoAppPort)?,
    };
    let acceptor = TlsAcceptor::from(tls.server_config());
    let mut downstream = tokio::time::timeout(config.handshake_timeout, acceptor.accept(stream))
        .await
        .map_err(|_| InboundError::HandshakeTimeout)?
        .map_err(InboundError::Handshake)?;
    let peer_cert = downstream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(trellis_identity::PeerIdentityError::NoUriSan)?;
    let peer_identity = spiffe_id_of(peer_cert)?;
    let labels = PeerLabels {
        peer_identity: peer_identity.to_string(),
    };
    metrics.inbound_connections.get_or_create(&labels).inc();
    tracing::debug!(peer_identity = %peer_identity, port, "inbound mTLS accepted");

    let app = SocketAddr::new(config.app_host, port);
    if downstream.get_ref().1.alpn_protocol() == Some(trellis_identity::ALPN_H2) {
        metrics.active_connections.inc();
        crate::http::inbound::InboundConnection {
            apps: apps.clone(),
            app,
            own_identity: Arc::new(config.identity.clone()),
            peer: Arc::new(peer_identity),
        }
        .serve(downstream)
        .await;
        metrics.active_connections.dec();
        return Ok(());
    }
    let mut upstream =
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(app)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                let _ = downstream.shutdown().await;
                return Err(InboundError::App { addr: app, source });
            }
            Err(_) => {
                let _ = downstream.shutdown().await;
                return Err(InboundError::App {
                    addr: app,
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
        };
    let _ = upstream.set_nodelay(true);
    metrics.active_connections.inc();
    let copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
    metrics.active_connections.dec();
    if let Ok((up, down)) = copied {
        metrics
            .inbound_bytes
            .get_or_create(&labels)
            .inc_by(up + down);
    }
    Ok(())
}
