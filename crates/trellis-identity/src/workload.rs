//! The workload's own key and certificate.
//!
//! The key pair is made here and never serialized out of the process: only the CSR
//! (public key + requested identity) leaves it.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{PeerIdentityError, SpiffeId, spiffe_id_of};

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("key generation failed: {0}")]
    KeyGeneration(rcgen::Error),
    #[error("CSR could not be made: {0}")]
    Csr(rcgen::Error),
    #[error("the CA sent no certificate")]
    EmptyChain,
    #[error("the certificate chain is not valid PEM: {0}")]
    Pem(String),
    #[error("the issued certificate is unusable: {0}")]
    Identity(#[from] PeerIdentityError),
    #[error("the issued certificate is for {actual}, not {expected}")]
    WrongIdentity {
        expected: Box<SpiffeId>,
        actual: Box<SpiffeId>,
    },
    #[error("the issued certificate does not hold this workload's public key")]
    WrongKey,
}

/// A P-256 key pair that stays in this process.
pub struct WorkloadKey {
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadKey(P-256, private)")
    }
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, CertificateError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(CertificateError::KeyGeneration)?;
        Ok(WorkloadKey { key })
    }

    /// A PKCS#10 request for `id`, signed with this key.
    pub fn csr_pem(&self, id: &SpiffeId) -> Result<String, CertificateError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id.to_string().try_into().map_err(CertificateError::Csr)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(CertificateError::Csr)
    }

    /// Pairs this key with an issued chain after checking that the chain's leaf holds
    /// our public key and names `expected`.
    pub fn certify(
        &self,
        chain_pem: &[String],
        expected: &SpiffeId,
    ) -> Result<WorkloadCertificate, CertificateError> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(cert.map_err(|e| CertificateError::Pem(e.to_string()))?);
            }
        }
        let leaf = chain.first().ok_or(CertificateError::EmptyChain)?;
        let (_, parsed) = X509Certificate::from_der(leaf.as_ref())
            .map_err(|e| CertificateError::Pem(e.to_string()))?;
        if parsed.public_key().raw != self.key.subject_public_key_info().as_slice() {
            return Err(CertificateError::WrongKey);
        }
        let actual = spiffe_id_of(leaf)?;
        if &actual != expected {
            return Err(CertificateError::WrongIdentity {
                expected: Box::new(expected.clone()),
                actual: Box::new(actual),
            });
        }
        let not_before = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_before.timestamp().max(0) as u64);
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        let serial = parsed.raw_serial_as_string();
        drop(parsed);
        Ok(WorkloadCertificate {
            id: actual,
            chain,
            key: PrivatePkcs8KeyDer::from(self.key.serialize_der()),
            not_before,
            not_after,
            serial,
            received_at: SystemTime::now(),
        })
    }
}

/// An issued identity: chain plus the private key, ready for rustls.
pub struct WorkloadCertificate {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    received_at: SystemTime,
}

impl Clone for WorkloadCertificate {
    fn clone(&self) -> Self {
        WorkloadCertificate {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
            serial: self.serial.clone(),
            received_at: self.received_at,
        }
    }
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// When to renew: half the remaining lifetime at issue, as DESIGN says. Counted
    /// from when we received it, not from notBefore, which the CA backdates for skew.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.received_at)
            .unwrap_or_default();
        self.received_at + life / 2
    }

    /// PEM of the chain (public material only), for /certs and tests.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref())))
            .collect()
    }
}
