//! Proof of identity on Kubernetes: the proxy's projected service-account token
//! (audience `trellis-ca`), checked with a TokenReview. The token proves exactly one
//! identity, `spiffe://<td>/ns/<namespace>/sa/<service-account>`, and the CA signs
//! nothing else for it. A token bound to a pod (every projected token the kubelet
//! mounts) also proves the workload: the pod the API server names in the review.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use trellis_identity::{SpiffeId, WorkloadName};

use super::Proven;

/// The audience the proxy's token must be minted for.
pub const TOKEN_AUDIENCE: &str = "trellis-ca";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
/// `status.user.extra` keys the API server sets for a token bound to a pod.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

#[derive(Debug, thiserror::Error)]
pub enum TokenReviewError {
    /// The token proves nothing we sign for.
    #[error("service-account token refused: {0}")]
    Refused(String),
    /// The review itself failed; the token may be fine.
    #[error("TokenReview failed: {0}")]
    Unavailable(String),
}

/// Checks a service-account token and says which identity (and pod) it proves.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    async fn review(&self, token: &str) -> Result<Proven, TokenReviewError>;
}

/// [`TokenReviewer`] by the Kubernetes API (`authentication.k8s.io/v1` TokenReview).
pub struct KubeTokenReviewer {
    api: Api<TokenReview>,
    trust_domain: String,
    audience: String,
}

impl KubeTokenReviewer {
    pub fn new(client: Client, trust_domain: impl Into<String>) -> Self {
        KubeTokenReviewer {
            api: Api::all(client),
            trust_domain: trust_domain.into(),
            audience: TOKEN_AUDIENCE.to_owned(),
        }
    }
}

#[tonic::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str) -> Result<Proven, TokenReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| TokenReviewError::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        proven_by_review(&status, &self.audience, &self.trust_domain)
    }
}

/// What a TokenReview's status proves: authenticated, for our audience, and a
/// service account's username give the identity; the pod the token is bound to, if
/// any, gives the workload (in the service account's namespace, where the API server
/// binds it). A token bound to no pod proves no workload.
pub fn proven_by_review(
    status: &TokenReviewStatus,
    audience: &str,
    trust_domain: &str,
) -> Result<Proven, TokenReviewError> {
    let refused = |reason: String| Err(TokenReviewError::Refused(reason));
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().filter(|e| !e.is_empty());
        return refused(why.unwrap_or("the token is not authenticated").to_owned());
    }
    // The API server returns the audiences the token is valid for among those asked;
    // an authenticator that ignores audiences returns none, and that is not enough.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return refused(format!("the token is not for audience {audience:?}"));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let Some((namespace, sa)) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
    else {
        return refused(format!("{username:?} is not a service account"));
    };
    let identity = SpiffeId::new(trust_domain, namespace, sa).map_err(|e| {
        TokenReviewError::Refused(format!("{username:?} gives no valid identity: {e}"))
    })?;
    let extra = |key: &str| {
        let values = status.user.as_ref()?.extra.as_ref()?.get(key)?;
        match values.as_slice() {
            [one] if !one.is_empty() => Some(one.as_str()),
            _ => None,
        }
    };
    let workload = extra(POD_NAME_EXTRA).map(|pod| WorkloadName::new(namespace, pod));
    if let Some(pod) = &workload {
        tracing::debug!(%identity, %pod, pod_uid = extra(POD_UID_EXTRA), "token bound to a pod");
    }
    Ok(Proven { identity, workload })
}

#[cfg(test)]
mod tests;
