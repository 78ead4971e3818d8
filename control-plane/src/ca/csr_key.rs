//! Which keys the CA signs: ECDSA P-256 only, the key the proxy makes.
//!
//! Decided by the CSR's SubjectPublicKeyInfo (key algorithm and curve), not by its
//! signature algorithm: `ecdsa-with-SHA256` is as valid with a P-384 key as with a
//! P-256 one, and a leaf must carry the key the CSR holds. RSA (of any size), other
//! curves and Ed25519 are refused: one key type keeps every peer's TLS the same and
//! leaves no weak choice to a workload.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::CaError;

/// An uncompressed P-256 point: 0x04, then X and Y of 32 bytes each.
const P256_POINT_LEN: usize = 65;

/// Refuses a CSR (DER) whose public key is not ECDSA P-256.
pub(super) fn check(csr_der: &[u8]) -> Result<(), CaError> {
    let (_, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|_| CaError::MalformedCsr(rcgen::Error::CouldNotParseCertificationRequest))?;
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => 0,
        };
        return Err(CaError::UnsupportedKey(format!("RSA ({bits} bits)")));
    }
    if *algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CaError::UnsupportedKey(format!("of algorithm {algorithm}")));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    match curve {
        Some(curve) if curve == OID_EC_P256 => {}
        Some(curve) => return Err(CaError::UnsupportedKey(format!("ECDSA on curve {curve}"))),
        None => {
            return Err(CaError::UnsupportedKey(
                "ECDSA without a named curve".to_owned(),
            ));
        }
    }
    if spki.subject_public_key.data.len() != P256_POINT_LEN {
        return Err(CaError::UnsupportedKey(
            "ECDSA P-256 with a malformed or compressed point".to_owned(),
        ));
    }
    Ok(())
}
