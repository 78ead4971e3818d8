//! The shared root against a scripted API server answering with recorded Secrets.

use base64::Engine as _;
use http::Method;
use serde_json::Value;
use trellis_identity::{SpiffeId, WorkloadKey};

use super::*;
use crate::registry::kube::fake_api::{FakeApi, fixture_json};

const SECRETS: &str = "/api/v1/namespaces/trellis-system/secrets";
const SECRET: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-ca-root";
const TTL: Duration = Duration::from_secs(3600);

async fn load(
    api: FakeApi,
) -> (
    Result<CertificateAuthority, CaError>,
    crate::registry::kube::fake_api::Seen,
) {
    let (client, seen) = api.start();
    let ca =
        load_or_create_in_secret(client, "trellis-system", ROOT_SECRET, "cluster.local", TTL).await;
    (ca, seen)
}

fn data(secret: &Value, key: &str) -> String {
    let b64 = secret["data"][key].as_str().unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// The CA really signs with the root it publishes: webpki accepts a leaf it
/// issues as a client certificate chaining to that root.
fn signs_under_its_root(ca: &CertificateAuthority) {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let id = SpiffeId::new("cluster.local", "default", "echo").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let leaf = ca
        .sign_workload(
            &key.csr_pem(&id).unwrap(),
            &crate::ca::Proven {
                identity: id.clone(),
                workload: None,
            },
            None,
        )
        .unwrap();
    assert_eq!(
        key.certify(std::slice::from_ref(&leaf), &id).unwrap().id,
        id
    );
    let der = |pem_text: &str| CertificateDer::from(pem::parse(pem_text).unwrap().into_contents());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&ca.trust_bundle_pem()[0])).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        trellis_identity::crypto_provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&der(&leaf), &[], UnixTime::now())
        .unwrap();
}

#[tokio::test]
async fn an_absent_secret_is_created_with_a_new_root() {
    let mut api = FakeApi::new();
    api.reply(
        Method::GET,
        SECRET,
        404,
        fixture_json("secret-not-found.json"),
    );
    // The API server answers a create with the object; only the status matters.
    api.reply(
        Method::POST,
        SECRETS,
        201,
        fixture_json("secret-ca-root.json"),
    );
    let (ca, seen) = load(api).await;
    let ca = ca.unwrap();

    assert_eq!(
        seen.requests(),
        [format!("GET {SECRET}?"), format!("POST {SECRETS}?")]
    );
    let created = &seen.bodies()[0];
    assert_eq!(created["metadata"]["name"], ROOT_SECRET);
    assert_eq!(created["type"], "kubernetes.io/tls");
    assert_eq!(data(created, "tls.crt"), ca.trust_bundle_pem()[0]);
    // What was stored is a usable CA with the same root: a restart (or the other
    // replica) reading it back signs under the same root.
    let again = CertificateAuthority::from_pem(
        &data(created, "tls.crt"),
        &data(created, "tls.key"),
        "cluster.local",
        TTL,
    )
    .unwrap();
    assert_eq!(again.trust_bundle_pem(), ca.trust_bundle_pem());
    signs_under_its_root(&ca);
}

#[tokio::test]
async fn a_present_secret_is_reused() {
    let recorded = fixture_json("secret-ca-root.json");
    let mut api = FakeApi::new();
    api.reply(Method::GET, SECRET, 200, recorded.clone());
    let (ca, seen) = load(api).await;
    let ca = ca.unwrap();

    assert_eq!(
        seen.requests(),
        [format!("GET {SECRET}?")],
        "nothing written"
    );
    assert_eq!(ca.trust_bundle_pem(), [data(&recorded, "tls.crt")]);
    signs_under_its_root(&ca);
}

#[tokio::test]
async fn losing_the_create_race_reads_the_winners_root() {
    let winner = fixture_json("secret-ca-root.json");
    let mut api = FakeApi::new();
    api.reply(
        Method::GET,
        SECRET,
        404,
        fixture_json("secret-not-found.json"),
    );
    api.reply(
        Method::POST,
        SECRETS,
        409,
        fixture_json("secret-already-exists.json"),
    );
    api.reply(Method::GET, SECRET, 200, winner.clone());
    let (ca, seen) = load(api).await;
    let ca = ca.unwrap();

    assert_eq!(
        seen.requests(),
        [
            format!("GET {SECRET}?"),
            format!("POST {SECRETS}?"),
            format!("GET {SECRET}?")
        ]
    );
    // Ours was thrown away: the mesh has one root, the winner's.
    assert_ne!(data(&seen.bodies()[0], "tls.crt"), data(&winner, "tls.crt"));
    assert_eq!(ca.trust_bundle_pem(), [data(&winner, "tls.crt")]);
    signs_under_its_root(&ca);
}

#[tokio::test]
async fn a_broken_secret_is_refused_with_its_reason_and_without_the_key() {
    let mut no_key = fixture_json("secret-ca-root.json");
    no_key["data"].as_object_mut().unwrap().remove("tls.key");
    let wrong_key = fixture_json("secret-ca-root-wrong-key.json");
    let key_text = data(&wrong_key, "tls.key");
    for (secret, reason) in [
        (no_key, "no tls.key"),
        (wrong_key, "does not belong to the CA certificate"),
    ] {
        let mut api = FakeApi::new();
        api.reply(Method::GET, SECRET, 200, secret);
        let (ca, seen) = load(api).await;
        let err = ca.unwrap_err().to_string();
        assert!(err.contains("trellis-system/trellis-ca-root"), "{err}");
        assert!(err.contains(reason), "{err}");
        assert!(!err.contains("PRIVATE KEY"), "{err}");
        let key_body: String = key_text.lines().nth(1).unwrap().to_owned();
        assert!(!err.contains(&key_body), "{err}");
        // A broken root is not silently replaced by a new one.
        assert_eq!(seen.count("POST"), 0);
    }
}

#[tokio::test]
async fn other_api_errors_name_the_secret() {
    let mut forbidden = fixture_json("secret-not-found.json");
    forbidden["reason"] = "Forbidden".into();
    forbidden["code"] = 403.into();
    let mut api = FakeApi::new();
    api.reply(Method::GET, SECRET, 403, forbidden);
    let (ca, _seen) = load(api).await;
    let err = ca.unwrap_err();
    assert!(matches!(err, CaError::Kube { .. }), "{err}");
    assert!(err.to_string().contains("trellis-system/trellis-ca-root"));
}

/// A Secret as `trellisctl root` leaves it mid-rotation.
fn secret_holding(roots: &RootSet) -> Value {
    let mut secret = fixture_json("secret-ca-root.json");
    let data: serde_json::Map<String, Value> = secret_data(roots)
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                base64::engine::general_purpose::STANDARD.encode(v.0).into(),
            )
        })
        .collect();
    secret["data"] = Value::Object(data);
    secret
}

#[tokio::test]
async fn an_added_root_is_trusted_but_does_not_sign_yet() {
    let mut roots = RootSet::generate("cluster.local").unwrap();
    roots.add("cluster.local").unwrap();
    let mut api = FakeApi::new();
    api.reply(Method::GET, SECRET, 200, secret_holding(&roots));
    let (ca, seen) = load(api).await;
    let ca = ca.unwrap();
    assert_eq!(ca.trust_bundle_pem(), roots.bundle_pem());
    assert_eq!(ca.trust_bundle_pem().len(), 2);
    assert_eq!(
        ca.signing_root(),
        crate::ca::roots::fingerprint(&roots.active.cert_pem)
    );
    assert_eq!(
        seen.requests(),
        [format!("GET {SECRET}?")],
        "nothing written"
    );
}

#[tokio::test]
async fn a_replica_starting_after_activation_keeps_the_old_root_one_ttl_longer() {
    let mut roots = RootSet::generate("cluster.local").unwrap();
    roots.add("cluster.local").unwrap();
    let old = roots.active.cert_pem.clone();
    roots
        .activate(std::time::SystemTime::UNIX_EPOCH, TTL)
        .unwrap();
    let mut api = FakeApi::new();
    api.reply(Method::GET, SECRET, 200, secret_holding(&roots));
    api.reply(Method::PUT, SECRET, 200, secret_holding(&roots));
    let (ca, seen) = load(api).await;
    let ca = ca.unwrap();
    assert_eq!(ca.trust_bundle_pem(), [roots.active.cert_pem.clone(), old]);
    signs_under_its_root(&ca);
    assert_eq!(
        seen.requests(),
        [format!("GET {SECRET}?"), format!("PUT {SECRET}?")]
    );
    let written = &seen.bodies()[0];
    let after: u64 = data(written, "previous-root-retire-after").parse().unwrap();
    let now = crate::ca::roots::unix(std::time::SystemTime::now());
    assert!(after >= now + TTL.as_secs() - 5, "{after} vs {now}");
    assert_eq!(
        data(written, "tls.crt"),
        roots.active.cert_pem,
        "same signing root"
    );
}
