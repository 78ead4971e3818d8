//! Istio's plug-in CA: the operator's intermediate signs, its root stays offline. The
//! files keep Istio's names (its `cacerts` Secret, mounted as the state dir):
//! `ca-cert.pem` and `ca-key.pem` (the intermediate that signs), `root-cert.pem` (the
//! roots proxies trust) and `cert-chain.pem` (the intermediate up to the root, sent
//! after every leaf). Nothing is written there; rotating these roots is the
//! operator's (replace the files, restart).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use trellis_identity::{SpiffeId, TrustBundle};

use super::{CaError, CertificateAuthority, io_err, roots};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// Whether `dir` holds a plug-in CA (rather than Trellis's own roots).
pub fn is_plugged(dir: &Path) -> bool {
    dir.join(CA_CERT).exists()
}

/// Reads the plug-in CA's files from `dir`; `cert-chain.pem` may be absent.
pub fn read_dir(dir: &Path) -> Result<BTreeMap<String, String>, CaError> {
    let mut files = BTreeMap::new();
    for name in [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN] {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                files.insert(name.to_owned(), text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == CERT_CHAIN => {}
            Err(source) => return Err(io_err(&path, source)),
        }
    }
    Ok(files)
}

/// Each certificate of a PEM text, as its own PEM.
fn split(pem_text: &str, what: &str) -> Result<Vec<(Vec<u8>, String)>, CaError> {
    let blocks = pem::parse_many(pem_text)
        .map_err(|e| CaError::RootSet(format!("{what} is not PEM: {e}")))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| {
            let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
            (b.contents().to_vec(), pem::encode_config(&b, lf))
        })
        .collect())
}

impl CertificateAuthority {
    /// A CA signing with the plug-in intermediate in `files` (see the module).
    /// Checked before use: the key is the intermediate's, and a leaf it signs
    /// chains through `cert-chain.pem` to a root of `root-cert.pem`.
    pub fn from_plugged(
        files: &BTreeMap<String, String>,
        trust_domain: &str,
        default_ttl: Duration,
    ) -> Result<Self, CaError> {
        let get = |name: &str| {
            files
                .get(name)
                .ok_or_else(|| CaError::RootSet(format!("the plug-in CA has no {name}")))
        };
        let ca_cert = get(CA_CERT)?;
        let mut ca = Self::from_pem(ca_cert, get(CA_KEY)?, trust_domain, default_ttl)?;
        let roots = split(get(ROOT_CERT)?, ROOT_CERT)?;
        if roots.is_empty() {
            return Err(CaError::RootSet(format!(
                "{ROOT_CERT} holds no certificate"
            )));
        }
        let chain_text = files.get(CERT_CHAIN).unwrap_or(ca_cert);
        let mut chain: Vec<(Vec<u8>, String)> = split(chain_text, CERT_CHAIN)?
            .into_iter()
            // Peers hold the roots already.
            .filter(|(der, _)| !roots.iter().any(|(root, _)| root == der))
            .collect();
        let ca_der = split(ca_cert, CA_CERT)?;
        if chain.first().map(|(der, _)| der) != ca_der.first().map(|(der, _)| der) {
            chain.splice(0..0, ca_der);
        }
        ca.bundle_pem = roots.into_iter().map(|(_, pem)| pem).collect();
        ca.chain_pem = chain.into_iter().map(|(_, pem)| pem).collect();

        // A probe leaf must chain to a root: otherwise every proxy would refuse
        // every peer.
        let probe_id = SpiffeId::new(trust_domain, "trellis-system", "trellis-control")
            .map_err(|e| CaError::RootSet(e.to_string()))?;
        let (probe, _key) = ca.issue_serving(&probe_id, &[], Duration::from_secs(60))?;
        let bundle = TrustBundle::from_pem(trust_domain, &ca.bundle_pem)
            .map_err(|e| CaError::RootSet(e.to_string()))?;
        let probe_chain: Vec<_> = pem::parse_many(&probe)
            .map_err(|e| CaError::RootSet(e.to_string()))?
            .into_iter()
            .map(|b| b.into_contents().into())
            .collect();
        let root = bundle.signer_of(&probe_chain).ok_or_else(|| {
            CaError::RootSet(format!(
                "a leaf signed by {CA_CERT} does not chain through {CERT_CHAIN} to any root of {ROOT_CERT}"
            ))
        })?;
        ca.signing_root = trellis_identity::root_fingerprint(root);
        tracing::info!(
            signing_root = ca.signing_root,
            intermediate = roots::fingerprint(ca_cert),
            chain = ca.chain_pem.len(),
            "plug-in CA loaded: signing with the intermediate"
        );
        Ok(ca)
    }
}
