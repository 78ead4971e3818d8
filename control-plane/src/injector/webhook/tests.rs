//! The webhook over real HTTPS with a certificate from the Trellis CA, and the
//! caBundle kept by the control plane (against a scripted API server).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_identity::SpiffeId;

use super::*;
use crate::ca::CertificateAuthority;
use crate::registry::kube::fake_api::FakeApi;

fn review_fixture() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/injector/review-deployment-pod.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn serves_reviews_over_tls_with_a_certificate_from_the_mesh_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(
        dir.path(),
        "cluster.local",
        Duration::from_secs(3600),
    )
    .unwrap();
    let id = SpiffeId::new("cluster.local", "trellis-system", "trellis-control").unwrap();
    let dns = "trellis-control.trellis-system.svc".to_owned();
    let (cert, key) = ca
        .issue_serving(&id, std::slice::from_ref(&dns), Duration::from_secs(3600))
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let labels = crate::registry::kube::NamespaceLabels::from([(
        "shop".to_owned(),
        [("trellis.io/inject".to_owned(), "enabled".to_owned())].into(),
    )]);
    let (_tx, namespaces) = watch::channel(Arc::new(labels));
    let state = WebhookState {
        settings: Arc::new(crate::injector::InjectorSettings::default()),
        namespaces,
        events: crate::events::EventSink::disabled(),
    };
    let server = tokio::spawn(serve(
        listener,
        tls_config(&cert, &key).unwrap(),
        state,
        Default::default(),
    ));

    // The API server's view: it trusts the caBundle, i.e. the mesh root.
    let mut roots = rustls::RootCertStore::empty();
    for der in
        rustls::pki_types::CertificateDer::pem_slice_iter(ca.trust_bundle_pem()[0].as_bytes())
    {
        roots.add(der.unwrap()).unwrap();
    }
    let client_config =
        rustls::ClientConfig::builder_with_provider(trellis_identity::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(dns.clone()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect(name, tcp)
        .await
        .expect("the webhook's certificate verifies against the mesh root for its DNS name");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::post(format!("https://{dns}:15017{PATH}?timeout=10s"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&review_fixture()).unwrap(),
        )))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(
        answer["response"]["uid"],
        review_fixture()["request"]["uid"]
    );
    assert!(answer["response"]["patch"].is_string());
    server.abort();
}

#[tokio::test]
async fn keeps_the_ca_bundle_of_the_webhook_configuration() {
    const PATH_MWC: &str =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-injector";
    let root = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let stale = base64::engine::general_purpose::STANDARD.encode("old root");
    let configuration = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "trellis-injector", "resourceVersion": "5120", "uid": "6e0f3c2b-1a2b-4c3d-8e4f-5a6b7c8d9e0f"},
        "webhooks": [{
            "name": "inject.trellis.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "clientConfig": {"service": {"name": "trellis-control", "namespace": "trellis-system", "path": "/inject", "port": 15017}, "caBundle": stale}
        }]
    });
    let mut api = FakeApi::new();
    api.reply(Method::GET, PATH_MWC, 200, configuration.clone());
    api.reply(Method::PATCH, PATH_MWC, 200, configuration);
    let (client, seen) = api.start();
    assert!(
        sync_ca_bundle(client, "trellis-injector", root)
            .await
            .unwrap()
    );
    assert_eq!(
        seen.requests(),
        [format!("GET {PATH_MWC}?"), format!("PATCH {PATH_MWC}?")]
    );
    let patch = &seen.bodies()[0];
    assert_eq!(
        patch,
        &json!([{
            "op": "add",
            "path": "/webhooks/0/clientConfig/caBundle",
            "value": base64::engine::general_purpose::STANDARD.encode(root),
        }])
    );
}
