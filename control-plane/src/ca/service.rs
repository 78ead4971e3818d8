//! The CA's gRPC face: check the proof, then sign for what it proves.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use trellis_proto::ca::v1::{
    IssueCertificateRequest, IssueCertificateResponse, certificate_authority_server,
    issue_certificate_request::Proof,
};

use super::{CaError, CertificateAuthority, IssuedLeaves, Proven, TokenReviewError, TokenReviewer};
use crate::events::{EventSink, MeshEvent, pod_reference};
use crate::metrics::{ControlMetrics, RefusalReason};
use crate::model::MeshSnapshot;

pub struct CaService {
    ca: Arc<CertificateAuthority>,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    /// Checks service-account tokens (kube registry); without it they are refused.
    token_reviewer: Option<Arc<dyn TokenReviewer>>,
    /// Where refusals to a known Pod are reported.
    events: EventSink,
    metrics: ControlMetrics,
    issued: IssuedLeaves,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    ) -> Self {
        CaService {
            ca,
            snapshots,
            token_reviewer: None,
            events: EventSink::disabled(),
            metrics: ControlMetrics::default(),
            issued: IssuedLeaves::default(),
        }
    }

    /// Counts issued and refused certificates in `metrics` and remembers each leaf
    /// in `issued`.
    pub fn with_observers(mut self, metrics: ControlMetrics, issued: IssuedLeaves) -> Self {
        self.metrics = metrics;
        self.issued = issued;
        self
    }

    /// Accepts projected service-account tokens, checked by `reviewer`.
    pub fn with_token_reviewer(mut self, reviewer: Arc<dyn TokenReviewer>) -> Self {
        self.token_reviewer = Some(reviewer);
        self
    }

    /// Records an Event on the Pod when a proof names one (a Pod-bound token) and
    /// its request is still refused. A request with no valid proof names nobody: a
    /// stranger must not be able to write Events on others' Pods.
    pub fn with_events(mut self, events: EventSink) -> Self {
        self.events = events;
        self
    }

    pub fn into_server(self) -> certificate_authority_server::CertificateAuthorityServer<Self> {
        certificate_authority_server::CertificateAuthorityServer::new(self)
    }
}

#[tonic::async_trait]
impl certificate_authority_server::CertificateAuthority for CaService {
    async fn issue_certificate(
        &self,
        request: Request<IssueCertificateRequest>,
    ) -> Result<Response<IssueCertificateResponse>, Status> {
        let remote = request.remote_addr();
        match self.issue(request.into_inner(), remote).await {
            Ok(response) => {
                self.metrics.certificates_issued.inc();
                Ok(Response::new(response))
            }
            Err((reason, status)) => {
                self.metrics.certificate_refused(reason);
                Err(status)
            }
        }
    }
}

type Refusal = (RefusalReason, Status);

impl CaService {
    async fn issue(
        &self,
        request: IssueCertificateRequest,
        remote: Option<std::net::SocketAddr>,
    ) -> Result<IssueCertificateResponse, Refusal> {
        let granted = match &request.proof {
            Some(Proof::BootstrapToken(token)) => self
                .snapshots
                .borrow()
                .bootstrap_token(token)
                .map(|t| Proven {
                    identity: t.identity.clone(),
                    workload: t.workload_name(),
                })
                .ok_or_else(|| {
                    tracing::warn!(?remote, "certificate refused: unknown bootstrap token");
                    (
                        RefusalReason::UnknownBootstrapToken,
                        Status::unauthenticated("the bootstrap token is not known to the registry"),
                    )
                })?,
            Some(Proof::ServiceAccountToken(token)) => {
                let Some(reviewer) = &self.token_reviewer else {
                    return Err((
                        RefusalReason::TokenRefused,
                        Status::unauthenticated(
                            "service-account tokens are checked only with the kube registry",
                        ),
                    ));
                };
                reviewer.review(token).await.map_err(|e| {
                    tracing::warn!(?remote, error = %e, "certificate refused");
                    match e {
                        TokenReviewError::Refused(_) => (
                            RefusalReason::TokenRefused,
                            Status::unauthenticated(e.to_string()),
                        ),
                        TokenReviewError::Unavailable(_) => (
                            RefusalReason::TokenReviewUnavailable,
                            Status::unavailable(e.to_string()),
                        ),
                    }
                })?
            }
            None => {
                return Err((
                    RefusalReason::NoProof,
                    Status::unauthenticated("no proof of identity was sent"),
                ));
            }
        };
        let ttl =
            (request.validity_seconds > 0).then(|| Duration::from_secs(request.validity_seconds));
        let leaf = self
            .ca
            .sign_workload(&request.csr_pem, &granted, ttl)
            .map_err(|e| {
                tracing::warn!(?remote, identity = %granted.identity, error = %e, "certificate refused");
                if let Some(pod) = &granted.workload {
                    self.events.record(MeshEvent {
                        regarding: pod_reference(&pod.namespace, &pod.name),
                        warning: true,
                        reason: "CertificateRefused".to_owned(),
                        action: "IssueCertificate",
                        note: format!("certificate for {} refused: {e}", granted.identity),
                    });
                }
                match e {
                    CaError::IdentityMismatch { .. } => (
                        RefusalReason::IdentityMismatch,
                        Status::permission_denied(e.to_string()),
                    ),
                    CaError::MalformedCsr(_) => (
                        RefusalReason::MalformedCsr,
                        Status::invalid_argument(e.to_string()),
                    ),
                    CaError::UnsupportedKey(_) => (
                        RefusalReason::UnsupportedKey,
                        Status::invalid_argument(e.to_string()),
                    ),
                    _ => (RefusalReason::SigningFailed, Status::internal(e.to_string())),
                }
            })?;
        let workload = granted.workload.as_ref().map(ToString::to_string);
        self.issued.record(
            &granted.identity.to_string(),
            workload.as_deref(),
            &leaf,
            self.ca.signing_root(),
        );
        tracing::info!(?remote, identity = %granted.identity, workload, signing_root = self.ca.signing_root(), "certificate issued");
        Ok(IssueCertificateResponse {
            cert_chain_pem: self.ca.leaf_chain(leaf),
            trust_bundle_pem: self.ca.trust_bundle_pem(),
        })
    }
}
