//! rustls configurations for mesh connections, built once per certificate or trust
//! bundle change and shared as `Arc`s: new connections take the newest, old ones keep
//! what they started with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

use crate::{SpiffeClientVerifier, SpiffeId, SpiffeServerVerifier, WorkloadCertificate};

/// ALPN for an opaque byte stream between sidecars.
pub const ALPN_TCP: &[u8] = b"trellis-tcp/1";
/// ALPN for HTTP/2 between sidecars.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 between sidecars (HTTP/1.1 callers' requests, kept as they came).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("the trust bundle is empty")]
    NoRoots,
    #[error("a trust bundle root is not a valid certificate: {0}")]
    BadRoot(String),
    #[error("rustls refused the configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the client verifier could not be built: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The roots a workload trusts for one trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: String,
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn from_pem(trust_domain: &str, pems: &[String]) -> Result<Self, TlsConfigError> {
        let mut roots = Vec::new();
        for pem in pems {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.push(cert.map_err(|e| TlsConfigError::BadRoot(e.to_string()))?);
            }
        }
        if roots.is_empty() {
            return Err(TlsConfigError::NoRoots);
        }
        Ok(TrustBundle {
            trust_domain: trust_domain.to_owned(),
            roots,
        })
    }

    /// Short names of the roots, in order (see [`root_fingerprint`]).
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| root_fingerprint(r)).collect()
    }

    /// The root of this bundle that `chain` (leaf first) verifies to now, if any.
    pub fn signer_of(&self, chain: &[CertificateDer<'_>]) -> Option<&CertificateDer<'static>> {
        let (leaf, intermediates) = chain.split_first()?;
        let parsed = rustls::server::ParsedCertificate::try_from(leaf).ok()?;
        let algorithms = crypto_provider().signature_verification_algorithms.all;
        let now = rustls_pki_types::UnixTime::now();
        self.roots.iter().find(|root| {
            let mut store = RootCertStore::empty();
            store.add((*root).clone()).is_ok()
                && rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &store,
                    intermediates,
                    now,
                    algorithms,
                )
                .is_ok()
        })
    }

    fn root_store(&self) -> Result<RootCertStore, TlsConfigError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| TlsConfigError::BadRoot(e.to_string()))?;
        }
        Ok(store)
    }
}

/// A short name for a root certificate: the first 8 bytes of the SHA-256 of its DER,
/// in hex. The control plane names roots the same way.
pub fn root_fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(der)[..8])
}

/// The provider every mesh connection uses: ring, TLS 1.3 only.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Expected server identity and the ALPN offered.
type ClientKey = (SpiffeId, &'static [u8]);

/// Everything a proxy needs to speak mTLS as its workload.
pub struct MeshTls {
    cert: WorkloadCertificate,
    bundle: TrustBundle,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
    /// Client configs per expected peer identity and ALPN. Built on first use; the
    /// map is touched once per new connection, never per request.
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl MeshTls {
    pub fn new(cert: WorkloadCertificate, bundle: &TrustBundle) -> Result<Self, TlsConfigError> {
        let provider = crypto_provider();
        let roots = Arc::new(bundle.root_store()?);
        let inner =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let verifier = Arc::new(SpiffeClientVerifier::new(
            inner,
            bundle.trust_domain.clone(),
        ));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(cert.chain.clone(), cert.private_key())?;
        server.alpn_protocols = vec![ALPN_TCP.to_vec(), ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(MeshTls {
            cert,
            bundle: bundle.clone(),
            provider,
            roots,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn certificate(&self) -> &WorkloadCertificate {
        &self.cert
    }

    /// The roots this config trusts, for peers as clients and as servers alike.
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A client config for an opaque byte stream that accepts only a server proving
    /// `expected`.
    pub fn client_config(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsConfigError> {
        self.client_config_with_alpn(expected, ALPN_TCP)
    }

    /// A client config offering `alpn` that accepts only a server proving `expected`.
    pub fn client_config_with_alpn(
        &self,
        expected: &SpiffeId,
        alpn: &'static [u8],
    ) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let key = (expected.clone(), alpn);
        if let Ok(clients) = self.clients.lock()
            && let Some(config) = clients.get(&key)
        {
            return Ok(config.clone());
        }
        let verifier = Arc::new(SpiffeServerVerifier::new(
            self.roots.clone(),
            expected.clone(),
            self.provider.signature_verification_algorithms,
        ));
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.cert.chain.clone(), self.cert.private_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        let config = Arc::new(config);
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(key, config.clone());
        }
        Ok(config)
    }
}
