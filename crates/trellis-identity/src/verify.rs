//! Who a peer is: chain to the trust bundle, then exactly one URI SAN that is a SPIFFE ID.
//!
//! rustls/webpki check chains and signatures but not URI SANs, so this module is the
//! one place that turns a presented certificate into a [`SpiffeId`].

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{SpiffeId, SpiffeIdError};

/// Why a presented certificate does not name an acceptable peer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PeerIdentityError {
    #[error("the certificate could not be parsed: {0}")]
    Malformed(String),
    #[error("the certificate has no URI SAN, so it names no SPIFFE identity")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; a workload certificate has exactly one")]
    SeveralUriSans(usize),
    #[error("the URI SAN is not a workload SPIFFE ID: {0}")]
    NotSpiffe(#[from] SpiffeIdError),
    #[error("the peer is {actual}, but discovery promised {expected}")]
    Mismatch {
        expected: Box<SpiffeId>,
        actual: Box<SpiffeId>,
    },
    #[error("the peer is in trust domain {actual:?}, which is not trusted here ({expected:?})")]
    ForeignTrustDomain { expected: String, actual: String },
}

impl From<PeerIdentityError> for rustls::Error {
    fn from(e: PeerIdentityError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// The SPIFFE ID a certificate carries in its one URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| PeerIdentityError::Malformed(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| PeerIdentityError::Malformed(e.to_string()))?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let first = uris.next().ok_or(PeerIdentityError::NoUriSan)?;
    let more = uris.count();
    if more > 0 {
        return Err(PeerIdentityError::SeveralUriSans(more + 1));
    }
    Ok(first.parse()?)
}

/// Client side: the server must chain to our roots and be exactly `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: SpiffeId,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Self {
        SpiffeServerVerifier {
            roots,
            expected,
            algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let actual = spiffe_id_of(end_entity)?;
        if actual != self.expected {
            return Err(PeerIdentityError::Mismatch {
                expected: Box::new(self.expected.clone()),
                actual: Box::new(actual),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The mesh speaks TLS 1.3 only; a 1.2 handshake never reaches here.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server side: a client certificate is required, must chain to our roots and name a
/// SPIFFE ID in our trust domain. Which IDs may call is policy, decided later.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, trust_domain: String) -> Self {
        SpiffeClientVerifier {
            inner,
            trust_domain,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the client has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity)?;
        if id.trust_domain() != self.trust_domain {
            return Err(PeerIdentityError::ForeignTrustDomain {
                expected: self.trust_domain.clone(),
                actual: id.trust_domain().to_owned(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
