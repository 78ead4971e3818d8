//! The workload certificate: made here (key never leaves), fetched from the CA with a
//! proof of identity, renewed at half life. Published with the trust bundle as one
//! `Arc<MeshTls>`, rebuilt whenever either changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use trellis_identity::{MeshTls, TrustBundle, WorkloadCertificate, WorkloadKey};
use trellis_proto::ca::v1::{
    IssueCertificateRequest, certificate_authority_client::CertificateAuthorityClient,
    issue_certificate_request::Proof,
};

use crate::config::ProxyConfig;
use crate::control;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no proof of identity is configured (bootstrap token or service-account token)")]
    NoProof,
    #[error("reading the service-account token {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("the CA refused: {}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    #[error(transparent)]
    Certificate(#[from] trellis_identity::CertificateError),
    #[error(transparent)]
    Tls(#[from] trellis_identity::TlsConfigError),
}

/// A certificate with the bundle the CA sent along.
pub struct Issued {
    pub cert: WorkloadCertificate,
    pub bundle: TrustBundle,
}

/// Makes a fresh key and asks the CA to certify it; `bundle` is the trust bundle held
/// so far (none at first), trusted for the control plane besides `--ca-root`.
pub async fn fetch(
    config: &ProxyConfig,
    bundle: Option<&TrustBundle>,
) -> Result<Issued, IdentityError> {
    let proof = match (&config.bootstrap_token, &config.service_account_token_file) {
        (Some(token), _) => Proof::BootstrapToken(token.clone()),
        (None, Some(path)) => match tokio::fs::read_to_string(path).await {
            Ok(token) => Proof::ServiceAccountToken(token.trim().to_owned()),
            Err(source) => {
                let path = path.display().to_string();
                return Err(IdentityError::TokenFile { path, source });
            }
        },
        (None, None) => return Err(IdentityError::NoProof),
    };
    let key = WorkloadKey::generate()?;
    let csr_pem = key.csr_pem(&config.identity)?;
    let channel = control::channel(
        &config.control_addr,
        &config.control_server_name,
        &config.control_root_pem,
        bundle,
        None,
    )?;
    let response = CertificateAuthorityClient::new(channel)
        .issue_certificate(IssueCertificateRequest {
            csr_pem,
            proof: Some(proof),
            validity_seconds: config.cert_ttl.map(|d| d.as_secs()).unwrap_or_default(),
        })
        .await
        .map_err(IdentityError::Refused)?
        .into_inner();
    let cert = key.certify(&response.cert_chain_pem, &config.identity)?;
    let bundle = TrustBundle::from_pem(config.identity.trust_domain(), &response.trust_bundle_pem)?;
    Ok(Issued { cert, bundle })
}

/// Keeps the certificate fresh and `tls` current. `bundles` carries trust bundles
/// from discovery, which may add roots during a rotation.
pub async fn maintain(
    config: Arc<ProxyConfig>,
    first: Issued,
    tls: watch::Sender<Option<Arc<MeshTls>>>,
    mut bundles: watch::Receiver<Option<TrustBundle>>,
    metrics: crate::metrics::Metrics,
) {
    let mut cert = first.cert;
    let mut bundle = first.bundle;
    loop {
        let wait = cert
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                match renew(&config, &bundle).await {
                    Some(issued) => {
                        tracing::info!(identity = %issued.cert.id, serial = issued.cert.serial, "certificate renewed");
                        metrics.cert_renewals.inc();
                        cert = issued.cert;
                        // The CA's bundle is as new as discovery's, and the only one
                        // while discovery is away.
                        if issued.bundle != bundle {
                            tracing::info!(roots = issued.bundle.roots.len(), "trust bundle updated by the CA");
                            bundle = issued.bundle;
                        }
                    }
                    None => continue,
                }
            }
            changed = bundles.changed() => {
                if changed.is_err() {
                    return;
                }
                match bundles.borrow_and_update().clone() {
                    Some(new) if new != bundle => bundle = new,
                    _ => continue,
                }
                tracing::info!(roots = bundle.roots.len(), "trust bundle updated");
            }
        }
        publish(&cert, &bundle, &tls, &metrics);
    }
}

/// Renews with backoff until the old certificate is about to expire.
async fn renew(config: &ProxyConfig, bundle: &TrustBundle) -> Option<Issued> {
    let mut backoff = Duration::from_millis(200);
    for _ in 0..8 {
        match fetch(config, Some(bundle)).await {
            Ok(issued) => return Some(issued),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "certificate renewal failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    None
}

/// Builds the rustls configs once and publishes them. New connections use the new
/// ones; connections in flight keep theirs, so a rotation drops nothing.
pub fn publish(
    cert: &WorkloadCertificate,
    bundle: &TrustBundle,
    tls: &watch::Sender<Option<Arc<MeshTls>>>,
    metrics: &crate::metrics::Metrics,
) {
    match MeshTls::new(cert.clone(), bundle) {
        Ok(mesh) => {
            let expiry = cert
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default();
            metrics.cert_expiry_seconds.set(expiry);
            tls.send_replace(Some(Arc::new(mesh)));
        }
        Err(e) => {
            tracing::error!(error = %e, "TLS configuration rejected; keeping the previous one")
        }
    }
}
