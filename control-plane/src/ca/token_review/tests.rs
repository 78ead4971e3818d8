//! TokenReview-based certificates against a scripted API server.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tokio::sync::watch;
use tonic::{Code, Request};
use trellis_identity::{SpiffeId, WorkloadKey, WorkloadName};
use trellis_proto::ca::v1::certificate_authority_server::CertificateAuthority as _;
use trellis_proto::ca::v1::{IssueCertificateRequest, issue_certificate_request::Proof};

use super::*;
use crate::ca::{CaService, CertificateAuthority};
use crate::model::MeshSnapshot;
use crate::registry::kube::fake_api::{FakeApi, Seen};

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The API server's answer to a TokenReview, as recorded from a kind cluster.
fn reviewed(status: Value) -> Value {
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": "eyJhbGciOiJSUzI1NiIsImtpZCI6IkZha2UifQ.e30.c2ln", "audiences": ["trellis-ca"]},
        "status": status
    })
}

fn authenticated(ns: &str, sa: &str) -> Value {
    reviewed(json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": "4f1f2b9e-0c4a-4d43-9d1b-6a0f5c7e8d21",
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": ["x-7d9f8c6b5-q2w3e"],
                "authentication.kubernetes.io/pod-uid": ["0d6c2b7a-9f8e-4d3c-8b2a-1f0e9d8c7b6a"]
            }
        },
        "audiences": ["trellis-ca"]
    }))
}

fn ca_service(answer: Value) -> (CaService, Seen, tempfile::TempDir) {
    let mut api = FakeApi::new();
    api.reply(Method::POST, TOKEN_REVIEWS, 201, answer);
    let (client, seen) = api.start();
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(
        dir.path(),
        "cluster.local",
        Duration::from_secs(3600),
    )
    .unwrap();
    let (_tx, snapshots) = watch::channel(Arc::new(MeshSnapshot::default()));
    let reviewer = Arc::new(KubeTokenReviewer::new(client, "cluster.local"));
    let service = CaService::new(Arc::new(ca), snapshots).with_token_reviewer(reviewer);
    (service, seen, dir)
}

async fn issue(service: &CaService, csr_for: &SpiffeId) -> Result<SpiffeId, tonic::Status> {
    Ok(issue_cert(service, csr_for).await?.id)
}

async fn issue_cert(
    service: &CaService,
    csr_for: &SpiffeId,
) -> Result<trellis_identity::WorkloadCertificate, tonic::Status> {
    let key = WorkloadKey::generate().unwrap();
    let response = service
        .issue_certificate(Request::new(IssueCertificateRequest {
            csr_pem: key.csr_pem(csr_for).unwrap(),
            proof: Some(Proof::ServiceAccountToken("projected-token".into())),
            validity_seconds: 0,
        }))
        .await?
        .into_inner();
    Ok(key.certify(&response.cert_chain_pem, csr_for).unwrap())
}

/// The workload the leaf of `cert` names.
fn workload_in(cert: &trellis_identity::WorkloadCertificate) -> Option<WorkloadName> {
    let leaf = pem::parse(cert.chain_pem()).unwrap();
    trellis_identity::workload_name_of(&leaf.contents().to_vec().into(), &cert.id).unwrap()
}

#[tokio::test]
async fn a_pod_bound_token_names_its_pod_in_the_certificate() {
    let (service, _seen, _dir) = ca_service(authenticated("a", "x"));
    let cert = issue_cert(&service, &id("a", "x")).await.unwrap();
    assert_eq!(
        workload_in(&cert),
        Some(WorkloadName::new("a", "x-7d9f8c6b5-q2w3e"))
    );
}

#[tokio::test]
async fn a_token_bound_to_no_pod_names_no_workload() {
    let mut unbound = authenticated("a", "x");
    unbound["status"]["user"]["extra"] = json!({});
    let (service, _seen, _dir) = ca_service(unbound);
    let cert = issue_cert(&service, &id("a", "x")).await.unwrap();
    assert_eq!(cert.id, id("a", "x"));
    assert_eq!(workload_in(&cert), None);
    // A bound secret (not a pod) proves no workload either.
    let mut secret = authenticated("a", "x");
    secret["status"]["user"]["extra"] = json!({
        "authentication.kubernetes.io/credential-id": ["JTI=1"]
    });
    let (service, _seen, _dir) = ca_service(secret);
    let cert = issue_cert(&service, &id("a", "x")).await.unwrap();
    assert_eq!(workload_in(&cert), None);
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

#[tokio::test]
async fn a_token_for_a_x_gets_exactly_that_identity() {
    let (service, seen, _dir) = ca_service(authenticated("a", "x"));
    let got = issue(&service, &id("a", "x")).await.unwrap();
    assert_eq!(got.to_string(), "spiffe://cluster.local/ns/a/sa/x");

    assert_eq!(
        seen.requests(),
        [format!("POST {TOKEN_REVIEWS}?")],
        "one TokenReview, nothing else"
    );
    let sent = &seen.bodies()[0];
    assert_eq!(sent["kind"], "TokenReview");
    assert_eq!(sent["spec"]["token"], "projected-token");
    assert_eq!(sent["spec"]["audiences"], json!(["trellis-ca"]));
}

#[tokio::test]
async fn a_token_the_api_server_rejects_is_refused() {
    let (service, _seen, _dir) = ca_service(reviewed(json!({
        "authenticated": false,
        "error": "[invalid bearer token, service account token has expired]",
        "user": {}
    })));
    let err = issue(&service, &id("a", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());
}

#[tokio::test]
async fn a_csr_for_another_identity_is_refused() {
    let (service, _seen, _dir) = ca_service(authenticated("a", "x"));
    let err = issue(&service, &id("a", "y")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let (service, _seen, _dir) = ca_service(authenticated("a", "x"));
    let err = issue(&service, &id("b", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
}

/// A refusal to a proven Pod is an Event on that Pod; a token that proves nothing
/// names nobody, so a stranger cannot write Events on others' Pods.
#[tokio::test]
async fn a_refusal_to_a_proven_pod_is_an_event_on_it() {
    let (service, _seen, _dir) = ca_service(authenticated("a", "x"));
    let (events, mut recorded) = crate::events::EventSink::channel();
    let service = service.with_events(events.clone());
    issue(&service, &id("a", "y")).await.unwrap_err();
    let event = recorded.try_recv().expect("an Event");
    assert_eq!(
        (
            event.reason.as_str(),
            event.warning,
            event.regarding.kind.as_deref(),
            event.regarding.namespace.as_deref(),
            event.regarding.name.as_deref()
        ),
        (
            "CertificateRefused",
            true,
            Some("Pod"),
            Some("a"),
            Some("x-7d9f8c6b5-q2w3e")
        )
    );
    assert!(
        event.note.contains("spiffe://cluster.local/ns/a/sa/x"),
        "{}",
        event.note
    );

    assert!(recorded.try_recv().is_err(), "one Event");
    let (service, _seen, _dir) = ca_service(reviewed(json!({
        "authenticated": false,
        "error": "[invalid bearer token]",
        "user": {}
    })));
    let service = service.with_events(events);
    issue(&service, &id("a", "x")).await.unwrap_err();
    assert!(
        recorded.try_recv().is_err(),
        "no Event without a proven Pod"
    );
}

#[tokio::test]
async fn a_failed_token_review_is_unavailable_not_a_refusal() {
    let (service, _seen, _dir) = ca_service(json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "tokenreviews.authentication.k8s.io is forbidden", "reason": "Forbidden", "code": 403
    }));
    // Missing RBAC is the control plane's fault, not the token's: retry, do not refuse.
    let err = issue(&service, &id("a", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
}

#[test]
fn reviews_that_prove_no_service_account_are_refused() {
    let status = |v: Value| serde_json::from_value::<TokenReviewStatus>(v).unwrap();
    let ok = status(json!({"authenticated": true, "audiences": ["trellis-ca"],
        "user": {"username": "system:serviceaccount:shop:cart"}}));
    assert_eq!(
        proven_by_review(&ok, "trellis-ca", "example.org")
            .unwrap()
            .identity
            .to_string(),
        "spiffe://example.org/ns/shop/sa/cart"
    );
    for (case, v) in [
        (
            "a user",
            json!({"authenticated": true, "audiences": ["trellis-ca"], "user": {"username": "alice"}}),
        ),
        (
            "a node",
            json!({"authenticated": true, "audiences": ["trellis-ca"], "user": {"username": "system:node:kind-worker"}}),
        ),
        (
            "another audience",
            json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"], "user": {"username": "system:serviceaccount:shop:cart"}}),
        ),
        (
            "no audiences",
            json!({"authenticated": true, "user": {"username": "system:serviceaccount:shop:cart"}}),
        ),
        ("not authenticated", json!({"authenticated": false})),
    ] {
        let err = proven_by_review(&status(v), "trellis-ca", "cluster.local").unwrap_err();
        assert!(matches!(err, TokenReviewError::Refused(_)), "{case}: {err}");
    }
}
