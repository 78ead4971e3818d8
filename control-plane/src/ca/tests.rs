use std::process::Command;
use std::time::Duration;

use trellis_identity::{SpiffeId, WorkloadKey, spiffe_id_of};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

/// A proof of `id` bound to no workload.
fn proven(id: &SpiffeId) -> Proven {
    Proven {
        identity: id.clone(),
        workload: None,
    }
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
        .sign_workload(&key.csr_pem(&echo).unwrap(), &proven(&echo), None)
        .unwrap();
    let cert = key.certify(&[leaf], &echo).unwrap();
    assert_eq!(cert.id, echo);
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(life, DAY + CLOCK_SKEW);

    let other = id("default", "client");
    let err = ca
        .sign_workload(&key.csr_pem(&other).unwrap(), &proven(&echo), None)
        .unwrap_err();
    assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");

    let err = ca
        .sign_workload("not a csr", &proven(&echo), None)
        .unwrap_err();
    assert!(matches!(err, CaError::MalformedCsr(_)), "{err}");
}

#[test]
fn leaf_is_a_correct_x509_svid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let key = WorkloadKey::generate().unwrap();
    let echo = id("default", "echo");
    let leaf_pem = ca
        .sign_workload(&key.csr_pem(&echo).unwrap(), &proven(&echo), None)
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
    let mode = std::fs::metadata(dir.path().join(roots::ACTIVE_KEY))
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
        .sign_workload(&key.csr_pem(&echo).unwrap(), &proven(&echo), None)
        .unwrap();
    let leaf_path = dir.path().join("leaf.pem");
    std::fs::write(&leaf_path, &leaf).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.path().join(roots::ACTIVE_CERT))
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

/// A CSR for `id` whose key is `key`, signed as rcgen signs with that key.
fn csr_with_key(key: &KeyPair, id: &SpiffeId) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri_san(id).unwrap()];
    params.serialize_request(key).unwrap().pem().unwrap()
}

#[test]
fn only_ecdsa_p256_keys_are_signed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let echo = id("default", "echo");
    let refused = |csr: &str| match ca.sign_workload(csr, &proven(&echo), None) {
        Err(CaError::UnsupportedKey(why)) => why,
        other => panic!("expected UnsupportedKey, got {other:?}"),
    };

    // The sneaky one (made with `openssl req -sha256` and a P-384 key): its signature
    // verifies, and it claims ECDSA with SHA-256, as a P-256 key's would.
    let sneaky = include_str!("testdata/p384-signed-with-sha256.csr.pem");
    let parsed = CertificateSigningRequestParams::from_pem(sneaky).unwrap();
    assert_eq!(parsed.public_key.algorithm(), &PKCS_ECDSA_P256_SHA256);
    assert_eq!(refused(sneaky), "ECDSA on curve 1.3.132.0.34");

    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    assert_eq!(
        refused(&csr_with_key(&p384, &echo)),
        "ECDSA on curve 1.3.132.0.34"
    );

    let rsa = KeyPair::from_pem(include_str!("testdata/rsa-2048.pem")).unwrap();
    assert_eq!(refused(&csr_with_key(&rsa, &echo)), "RSA (2048 bits)");

    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    assert!(refused(&csr_with_key(&ed25519, &echo)).starts_with("of algorithm 1.3.101.112"));

    // And the proxy's own key still works.
    let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    ca.sign_workload(&csr_with_key(&p256, &echo), &proven(&echo), None)
        .unwrap();
}

#[test]
fn the_proven_workload_is_the_subject_whatever_the_csr_asks() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let echo = id("shop", "shared");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri_san(&echo).unwrap()];
    // The CSR asks to be payments; the proof says web.
    params.distinguished_name = WorkloadName::new("shop", "payments-1").distinguished_name();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let read = |pem_text: &str| {
        let der = pem::parse(pem_text).unwrap();
        trellis_identity::workload_name_of(&der.contents().to_vec().into(), &echo).unwrap()
    };
    let web = Proven {
        identity: echo.clone(),
        workload: Some(WorkloadName::new("shop", "web-1")),
    };
    let leaf = ca.sign_workload(&csr, &web, None).unwrap();
    assert_eq!(read(&leaf), Some(WorkloadName::new("shop", "web-1")));
    // A proof bound to no workload gives an empty Subject, not the CSR's.
    let leaf = ca.sign_workload(&csr, &proven(&echo), None).unwrap();
    assert_eq!(read(&leaf), None);
}

/// An offline root and an intermediate it signed, as Istio's `cacerts` files.
fn plugged_files() -> (std::collections::BTreeMap<String, String>, String) {
    let ca_params = |cn: &str, is_ca: IsCa| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = is_ca;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("offline root", IsCa::Ca(BasicConstraints::Unconstrained));
    let root = root_params.self_signed(&root_key).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params("intermediate", IsCa::Ca(BasicConstraints::Constrained(0)))
        .signed_by(&ca_key, &Issuer::new(root_params, root_key))
        .unwrap();
    let files = [
        (plugged::CA_CERT, ca.pem()),
        (plugged::CA_KEY, ca_key.serialize_pem()),
        (plugged::ROOT_CERT, root.pem()),
        (plugged::CERT_CHAIN, format!("{}{}", ca.pem(), root.pem())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    (files, root.pem())
}

#[test]
fn a_plug_in_intermediate_signs_and_sends_its_chain_without_the_root() {
    let (files, root) = plugged_files();
    let ca = CertificateAuthority::from_plugged(&files, "cluster.local", DAY).unwrap();
    assert_eq!(ca.trust_bundle_pem(), std::slice::from_ref(&root));
    assert_eq!(ca.signing_root(), roots::fingerprint(&root));
    let key = WorkloadKey::generate().unwrap();
    let echo = id("default", "echo");
    let leaf = ca
        .sign_workload(&key.csr_pem(&echo).unwrap(), &proven(&echo), None)
        .unwrap();
    let chain = ca.leaf_chain(leaf);
    assert_eq!(chain.len(), 2, "leaf and intermediate, not the root");
    assert_eq!(chain[1], files[plugged::CA_CERT]);
    let cert = key.certify(&chain, &echo).unwrap();
    let bundle = trellis_identity::TrustBundle::from_pem("cluster.local", &[root]).unwrap();
    assert!(bundle.signer_of(&cert.chain).is_some());
    assert!(
        bundle.signer_of(&cert.chain[..1]).is_none(),
        "without the intermediate the leaf chains to nothing"
    );
    // The control plane's own serving certificate carries the chain too.
    let (serving, _key) = ca
        .issue_serving(&id("trellis-system", "trellis-control"), &[], DAY)
        .unwrap();
    assert_eq!(pem::parse_many(serving).unwrap().len(), 2);
}

#[test]
fn a_plug_in_ca_whose_chain_leads_to_no_given_root_is_refused() {
    let (mut files, _root) = plugged_files();
    let (_, other_root) = plugged_files();
    files.insert(plugged::ROOT_CERT.to_owned(), other_root.clone());
    files.insert(
        plugged::CERT_CHAIN.to_owned(),
        files[plugged::CA_CERT].clone(),
    );
    let err = CertificateAuthority::from_plugged(&files, "cluster.local", DAY).unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");
    let (mut files, _) = plugged_files();
    files.remove(plugged::CA_KEY);
    let err = CertificateAuthority::from_plugged(&files, "cluster.local", DAY).unwrap_err();
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
}

#[test]
fn a_state_dir_holding_a_plug_in_ca_is_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let (files, root) = plugged_files();
    for (name, text) in &files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let ca = ca(dir.path());
    assert_eq!(ca.trust_bundle_pem(), [root]);
    assert!(
        !dir.path().join(roots::ACTIVE_KEY).exists(),
        "nothing written"
    );
}
