//! The certificate authority. Its key is made or loaded here and goes out only to
//! where the root is kept (`--state-dir` in file mode, the Secret
//! [`ROOT_SECRET`] shared by the replicas in kube mode): only signed certificates
//! and the root certificate go to proxies, and the key is never logged.

mod csr_key;
mod issued;
pub mod plugged;
mod root_secret;
pub mod roots;
mod service;
mod token_review;

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;
use trellis_identity::{SpiffeId, WorkloadName};
use x509_parser::prelude::{FromDer, X509Certificate};

pub use issued::{IssuedLeaf, IssuedLeaves};
pub use root_secret::{ROOT_SECRET, entries_from_secret, load_or_create_in_secret, secret_data};
pub use roots::{RootSet, RotationError, RotationPhase};
pub use service::CaService;
pub use token_review::{
    KubeTokenReviewer, TOKEN_AUDIENCE, TokenReviewError, TokenReviewer, proven_by_review,
};

/// What a proof of identity established: always the identity, and the workload when
/// the proof is bound to one (a pod-bound projected token, a bootstrap token that
/// names its WorkloadEntry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    pub identity: SpiffeId,
    pub workload: Option<WorkloadName>,
}

/// Leaves are valid from a little before now, so peers with a clock slightly behind
/// accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading or writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the CA certificate or key is unusable: {0}")]
    BadRoot(rcgen::Error),
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("Secret {namespace}/{name}: {reason}")]
    RootSecret {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("reading or creating Secret {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("the CSR is malformed or its signature does not verify: {0}")]
    MalformedCsr(rcgen::Error),
    /// The proxy makes ECDSA P-256 keys; nothing else is signed (see `csr_key`).
    #[error("the CSR's key is {0}; only ECDSA P-256 keys are signed")]
    UnsupportedKey(String),
    #[error("the CSR asks for {requested:?}, but the proof of identity is for {granted}")]
    IdentityMismatch {
        granted: SpiffeId,
        requested: Vec<String>,
    },
    #[error("signing failed: {0}")]
    Signing(rcgen::Error),
    #[error("the root set is inconsistent: {0}")]
    RootSet(String),
    #[error(transparent)]
    Rotation(#[from] RotationError),
}

/// The mesh CA for one trust domain.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// Every root relying parties trust; the signing one first.
    bundle_pem: Vec<String>,
    /// The fingerprint of the root that signs (see [`roots::fingerprint`]).
    signing_root: String,
    /// Intermediates sent after every leaf (PEM, the signer first): empty when a
    /// root signs, the plug-in CA's chain otherwise (see [`plugged`]).
    chain_pem: Vec<String>,
    trust_domain: String,
    default_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the roots from `state_dir`, or makes one there on first start. While
    /// a rotation's old root is still trusted, its retirement is pushed to at least
    /// now plus `default_ttl`: this process may be the first to sign with the new
    /// root, and the one before it may have signed with the old one until now.
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: &str,
        default_ttl: Duration,
    ) -> Result<Self, CaError> {
        if plugged::is_plugged(state_dir) {
            let files = plugged::read_dir(state_dir)?;
            return Self::from_plugged(&files, trust_domain, default_ttl);
        }
        let roots = match RootSet::load_dir(state_dir)? {
            Some(mut roots) => {
                let until = roots::unix(SystemTime::now()).saturating_add(default_ttl.as_secs());
                if roots.keep_previous_until(until) {
                    roots.save_dir(state_dir)?;
                }
                roots
            }
            None => {
                let roots = RootSet::generate(trust_domain)?;
                roots.save_dir(state_dir)?;
                tracing::info!(path = %state_dir.display(), trust_domain, "created a new mesh root CA");
                roots
            }
        };
        tracing::info!(
            phase = %roots.phase(),
            signing = roots::fingerprint(&roots.active.cert_pem),
            bundle = ?roots.bundle_pem().iter().map(|r| roots::fingerprint(r)).collect::<Vec<_>>(),
            "mesh roots loaded"
        );
        Self::from_roots(&roots, trust_domain, default_ttl)
    }

    /// A CA that signs with the active root of `roots` and hands out all of them.
    pub fn from_roots(
        roots: &RootSet,
        trust_domain: &str,
        default_ttl: Duration,
    ) -> Result<Self, CaError> {
        let mut ca = Self::from_pem(
            &roots.active.cert_pem,
            &roots.active.key_pem,
            trust_domain,
            default_ttl,
        )?;
        ca.bundle_pem = roots.bundle_pem();
        Ok(ca)
    }

    /// A fresh self-signed root, in memory only.
    pub fn new_root(trust_domain: &str, default_ttl: Duration) -> Result<Self, CaError> {
        Self::from_roots(&RootSet::generate(trust_domain)?, trust_domain, default_ttl)
    }

    /// A CA from a given certificate and key (PEM), e.g. an operator's intermediate.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        default_ttl: Duration,
    ) -> Result<Self, CaError> {
        let key = check_key_matches(cert_pem, key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(CaError::BadRoot)?;
        Ok(CertificateAuthority {
            issuer,
            bundle_pem: vec![cert_pem.to_owned()],
            signing_root: roots::fingerprint(cert_pem),
            chain_pem: Vec::new(),
            trust_domain: trust_domain.to_owned(),
            default_ttl,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots relying parties should trust (one, or two during a rotation).
    pub fn trust_bundle_pem(&self) -> Vec<String> {
        self.bundle_pem.clone()
    }

    /// What a proxy is sent for `leaf`: the leaf, then the intermediates up to
    /// (not including) the root.
    pub fn leaf_chain(&self, leaf: String) -> Vec<String> {
        let mut chain = Vec::with_capacity(1 + self.chain_pem.len());
        chain.push(leaf);
        chain.extend(self.chain_pem.iter().cloned());
        chain
    }

    /// The fingerprint of the root new leaves chain to.
    pub fn signing_root(&self) -> &str {
        &self.signing_root
    }

    /// Signs a workload CSR for what its proof established: `granted.identity` as the
    /// one URI SAN and, when the proof names one, `granted.workload` as the Subject
    /// (`O=<namespace>, CN=<name>`, see [`WorkloadName`]). The CSR must ask for exactly
    /// that identity and nothing else; everything but its public key is ignored, so a
    /// CSR cannot smuggle in extensions or a Subject.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        granted: &Proven,
        ttl: Option<Duration>,
    ) -> Result<String, CaError> {
        let csr_der = pem::parse(csr_pem)
            .map_err(|e| CaError::MalformedCsr(rcgen::Error::PemError(e.to_string())))?;
        // Before rcgen reads it: rcgen names the key by the signature algorithm, which
        // says nothing of the key's curve.
        csr_key::check(csr_der.contents())?;
        let csr = CertificateSigningRequestParams::from_der(&csr_der.contents().to_vec().into())
            .map_err(CaError::MalformedCsr)?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::UnsupportedKey(
                "signed with another algorithm than ECDSA with SHA-256".to_owned(),
            ));
        }
        let granted_workload = granted.workload.as_ref();
        let granted = &granted.identity;
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if requested.len() != 1 || requested[0] != granted.to_string() {
            return Err(CaError::IdentityMismatch {
                granted: granted.clone(),
                requested,
            });
        }
        let ttl = ttl.unwrap_or(self.default_ttl).min(self.default_ttl);
        let mut params = leaf_params(vec![uri_san(granted)?], ttl)?;
        if let Some(workload) = granted_workload {
            params.distinguished_name = workload.distinguished_name();
        }
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::Signing)?;
        Ok(cert.pem())
    }

    /// A serving certificate for the control plane itself: its SPIFFE ID plus the DNS
    /// names and IPs proxies dial. Returns (certificate PEM followed by the
    /// intermediates, key PEM); the key stays in this process.
    pub fn issue_serving(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Signing)?;
        let mut sans = vec![uri_san(id)?];
        for name in dns_names {
            sans.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().map_err(CaError::Signing)?),
            });
        }
        let params = leaf_params(sans, ttl)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Signing)?;
        Ok((self.leaf_chain(cert.pem()).concat(), key.serialize_pem()))
    }
}

/// Parses `key_pem` and checks that it is the key of `cert_pem`: a key that does not
/// match would sign leaves nobody can verify.
fn check_key_matches(cert_pem: &str, key_pem: &str) -> Result<KeyPair, CaError> {
    let key = KeyPair::from_pem(key_pem).map_err(CaError::BadRoot)?;
    let der = pem::parse(cert_pem)
        .map_err(|e| CaError::BadRoot(rcgen::Error::PemError(e.to_string())))?;
    let (_, cert) = X509Certificate::from_der(der.contents())
        .map_err(|_| CaError::BadRoot(rcgen::Error::CouldNotParseCertificate))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::KeyMismatch);
    }
    Ok(key)
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CaError> {
    Ok(SanType::URI(
        id.to_string().try_into().map_err(CaError::Signing)?,
    ))
}

fn root_params(trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trellis");
    dn.push(
        DnType::CommonName,
        format!("Trellis root CA for {trust_domain}"),
    );
    params.distinguished_name = dn;
    // Path length 0: the root signs workload leaves directly.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ROOT_VALIDITY;
    params.serial_number = Some(random_serial());
    params
}

fn leaf_params(sans: Vec<SanType>, ttl: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ttl;
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero octet, as RFC 5280 wants.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn io_err(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests;
