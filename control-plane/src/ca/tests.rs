use std::process::Command;
use std::time::Duration;

use trellis_identity::{SpiffeId, WorkloadKey, spiffe_id_of};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

fn ca(dir: &Path) -> CertificateAuthority {
    CertificateAuthority::load_or_create(dir, "cluster.local", DAY).unwrap()
}

#[test]
fn signs_a_csr_for_the_granted_identity_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let key = WorkloadKey::generate().unwrap();
    let echo = id("default", "echo");

    let leaf = ca
        .sign_workload(&key.csr_pem(&echo).unwrap(), &echo, None)
        .unwrap();
    let cert = key.certify(&[leaf], &echo).unwrap();
    assert_eq!(cert.id, echo);
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(life, DAY + CLOCK_SKEW);

    let other = id("default", "client");
    let err = ca
        .sign_workload(&key.csr_pem(&other).unwrap(), &echo, None)
        .unwrap_err();
    assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");

    let err = ca.sign_workload("not a csr", &echo, None).unwrap_err();
    assert!(matches!(err, CaError::MalformedCsr(_)), "{err}");
}

#[test]
fn leaf_is_a_correct_x509_svid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let key = WorkloadKey::generate().unwrap();
    let echo = id("default", "echo");
    let leaf_pem = ca
        .sign_workload(&key.csr_pem(&echo).unwrap(), &echo, None)
        .unwrap();
    let der = pem::parse(&leaf_pem).unwrap();
    let (_, x509) = X509Certificate::from_der(der.contents()).unwrap();

    let bc = x509.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = x509.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(spiffe_id_of(&der.contents().to_vec().into()).unwrap(), echo);

    let root_der = pem::parse(&ca.trust_bundle_pem()[0]).unwrap();
    let (_, root) = X509Certificate::from_der(root_der.contents()).unwrap();
    assert!(root.basic_constraints().unwrap().unwrap().value.ca);
    assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
}

#[test]
fn root_survives_a_restart_and_its_key_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let first = ca(dir.path()).trust_bundle_pem();
    let second = ca(dir.path()).trust_bundle_pem();
    assert_eq!(first, second);
    let mode = std::fs::metadata(dir.path().join(ROOT_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// An independent check of the chain, by OpenSSL rather than our own code.
#[test]
fn openssl_verifies_the_leaf_against_the_root() {
    if Command::new("openssl").arg("version").output().is_err() {
        println!("SKIPPED: openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let key = WorkloadKey::generate().unwrap();
    let echo = id("default", "echo");
    let leaf = ca
        .sign_workload(&key.csr_pem(&echo).unwrap(), &echo, None)
        .unwrap();
    let leaf_path = dir.path().join("leaf.pem");
    std::fs::write(&leaf_path, &leaf).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.path().join(ROOT_CERT_FILE))
        .arg(&leaf_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&leaf_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/echo"),
        "{text}"
    );
}
