//! Whether a webhook's caBundle verifies the certificate its server presents: a TLS
//! handshake to the webhook Service, when this host can reach it (in the cluster, or
//! with cluster DNS); unreachable is not a failure.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// How long a connection to the webhook may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `None`: not reachable from here. `Some(Err)`: reached, and the handshake with
/// `bundle_pem` as the only root for `host` failed.
pub async fn verify(bundle_pem: &[u8], host: &str, port: u16) -> Option<Result<(), String>> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .ok()?
        .ok()?;
    Some(handshake(bundle_pem, host, stream).await)
}

async fn handshake(bundle_pem: &[u8], host: &str, stream: TcpStream) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem) {
        let cert = cert.map_err(|e| format!("caBundle: {e}"))?;
        roots.add(cert).map_err(|e| format!("caBundle: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the TLS handshake timed out".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;
    use trellis_control::ca::CertificateAuthority;
    use trellis_identity::SpiffeId;

    use super::*;

    fn ca() -> (CertificateAuthority, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(
            dir.path(),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap();
        (ca, dir)
    }

    /// A TLS server for `localhost` with a certificate from `ca`; serves one handshake.
    async fn server(ca: &CertificateAuthority) -> u16 {
        let id = SpiffeId::new("cluster.local", "trellis-system", "trellis-control").unwrap();
        let (cert, key) = ca
            .issue_serving(&id, &["localhost".to_owned()], Duration::from_secs(3600))
            .unwrap();
        let tls = trellis_control::injector::webhook::tls_config(&cert, &key).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((stream, _)) = listener.accept().await {
                let _ = TlsAcceptor::from(tls).accept(stream).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn the_right_root_verifies_and_another_does_not() {
        let ((ca, _a), (other, _b)) = (ca(), ca());
        let root = ca.trust_bundle_pem().concat();
        let port = server(&ca).await;
        assert_eq!(
            verify(root.as_bytes(), "localhost", port).await,
            Some(Ok(()))
        );
        let port = server(&ca).await;
        let wrong = other.trust_bundle_pem().concat();
        let refused = verify(wrong.as_bytes(), "localhost", port).await;
        assert!(
            matches!(&refused, Some(Err(e)) if e.contains("invalid peer certificate")),
            "{refused:?}"
        );
    }
}
