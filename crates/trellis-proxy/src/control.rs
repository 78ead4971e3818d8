//! Connections to trellis-control: TLS that checks the control plane's certificate
//! by name against the configured root and the trust bundle discovery last sent (so
//! a control plane restarted on a newly activated root is still trusted), with our
//! workload certificate once we have one.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};
use trellis_identity::{TrustBundle, WorkloadCertificate, crypto_provider};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control plane root is not valid PEM: {0}")]
    Root(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("control plane server name {0:?} is invalid")]
    ServerName(String),
    #[error("connecting to the control plane: {0}")]
    Connect(#[from] tonic::transport::Error),
}

fn tls_config(
    root_pem: &str,
    bundle: Option<&TrustBundle>,
    client_cert: Option<&WorkloadCertificate>,
) -> Result<ClientConfig, ControlError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        let cert = cert.map_err(|e| ControlError::Root(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| ControlError::Root(e.to_string()))?;
    }
    for cert in bundle.iter().flat_map(|b| b.roots.iter()) {
        roots
            .add(cert.clone())
            .map_err(|e| ControlError::Root(e.to_string()))?;
    }
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(cert) => builder.with_client_auth_cert(cert.chain.clone(), cert.private_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A gRPC channel to the control plane, trusting `root_pem` and the roots of
/// `bundle`. Connects lazily; each reconnect re-handshakes with the certificate
/// given here.
pub fn channel(
    addr: &str,
    server_name: &str,
    root_pem: &str,
    bundle: Option<&TrustBundle>,
    client_cert: Option<&WorkloadCertificate>,
) -> Result<Channel, ControlError> {
    let connector = TlsConnector::from(Arc::new(tls_config(root_pem, bundle, client_cert)?));
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| ControlError::ServerName(server_name.to_owned()))?;
    let addr = addr.to_owned();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let connector = connector.clone();
            let name = name.clone();
            let addr = addr.clone();
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        })),
    )
}
