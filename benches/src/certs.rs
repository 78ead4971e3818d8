//! Throwaway certificates for the peer (HAProxy) scenario, made at run time: a CA and
//! ECDSA P-256 leaves, written as PEM files in the layout HAProxy wants (certificate
//! chain and private key in one file).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::{BenchError, Result};

/// PEM files of one throwaway PKI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFiles {
    /// The CA certificate.
    pub root: PathBuf,
    /// Server leaf certificate followed by its private key.
    pub server: PathBuf,
    /// Client leaf certificate followed by its private key.
    pub client: PathBuf,
}

fn err(what: &str) -> impl Fn(rcgen::Error) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

fn leaf_params(
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    Ok(params)
}

/// Makes a CA and two leaves (`server_name` for TLS servers, `client_name` for TLS
/// clients) and writes `root.pem`, `server.pem` and `client.pem` into `dir`.
pub fn write_pki(dir: &Path, server_name: &str, client_name: &str) -> Result<PemFiles> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err("CA key"))?;
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Trellis benchmark throwaway CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err("CA"))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str, usage, file: &str| -> Result<PathBuf> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err("leaf key"))?;
        let cert = leaf_params(name, usage)
            .and_then(|p| p.signed_by(&key, &issuer))
            .map_err(err("leaf"))?;
        let path = dir.join(file);
        std::fs::write(&path, format!("{}{}", cert.pem(), key.serialize_pem()))?;
        Ok(path)
    };
    let server = leaf(
        server_name,
        ExtendedKeyUsagePurpose::ServerAuth,
        "server.pem",
    )?;
    let client = leaf(
        client_name,
        ExtendedKeyUsagePurpose::ClientAuth,
        "client.pem",
    )?;
    let root = dir.join("root.pem");
    std::fs::write(&root, ca_cert.pem())?;
    Ok(PemFiles {
        root,
        server,
        client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_cert_and_key_together() {
        let dir = std::env::temp_dir().join(format!("trellis-bench-pki-{}", std::process::id()));
        let files = write_pki(&dir, "server-hap", "client-hap").unwrap();
        let server = std::fs::read_to_string(&files.server).unwrap();
        assert!(server.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.contains("-----BEGIN PRIVATE KEY-----"));
        let root = std::fs::read_to_string(&files.root).unwrap();
        assert_eq!(root.matches("BEGIN CERTIFICATE").count(), 1);
        assert!(!root.contains("PRIVATE KEY"));
        // openssl, where present, agrees that the leaves chain to the root.
        if let Ok(out) = std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&files.root)
            .arg(&files.server)
            .arg(&files.client)
            .output()
        {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
