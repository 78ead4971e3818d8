//! The admission webhook over HTTPS (15017), with a serving certificate from the
//! Trellis CA, and the `caBundle` of the MutatingWebhookConfiguration kept equal to
//! that CA's root so the API server trusts it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::InjectorSettings;
use crate::registry::kube::NamespaceLabels;

/// AdmissionReviews of Pods are small; refuse anything absurd.
const MAX_BODY: usize = 8 << 20;
/// How often the caBundle is checked (and repaired after someone edits it).
pub const CA_BUNDLE_RESYNC: Duration = Duration::from_secs(300);
pub const WEBHOOK_CONFIGURATION: &str = "trellis-injector";
pub const PATH: &str = "/inject";

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook's certificate or key is unusable: {0}")]
    Pem(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("updating the caBundle of {name}: {source}")]
    CaBundle { name: String, source: kube::Error },
}

#[derive(Clone)]
pub struct WebhookState {
    pub settings: Arc<InjectorSettings>,
    /// Namespace labels from the kube registry.
    pub namespaces: watch::Receiver<Arc<NamespaceLabels>>,
    /// Where Pods refused are reported.
    pub events: crate::events::EventSink,
}

/// A rustls server config for the webhook from PEM (HTTP/1.1 only: the API server
/// speaks it to webhooks).
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, WebhookError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WebhookError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| WebhookError::Pem(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(trellis_identity::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `POST /inject` (and `GET /ready`) until the task is dropped, within
/// `limits` (handshake and header deadlines, connection caps).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    state: WebhookState,
    limits: crate::http_server::ServerLimits,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, &state).await) }
    });
    crate::http_server::serve_http1("webhook", listener, Some(acceptor), limits, service).await;
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: &WebhookState,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => respond(StatusCode::OK, Bytes::from_static(b"ok\n")),
        (&Method::POST, PATH) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return respond(StatusCode::BAD_REQUEST, Bytes::from(e.to_string())),
            };
            let review: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(review) => review,
                Err(e) => return respond(StatusCode::BAD_REQUEST, Bytes::from(e.to_string())),
            };
            let namespace = review
                .pointer("/request/namespace")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_owned();
            let labels: Option<BTreeMap<String, String>> =
                state.namespaces.borrow().get(&namespace).cloned();
            let (answer, event) =
                super::review_with_event(review, labels.as_ref(), &state.settings);
            if let Some(event) = event {
                state.events.record(event);
            }
            match serde_json::to_vec(&answer) {
                Ok(body) => {
                    let mut response = respond(StatusCode::OK, Bytes::from(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    response
                }
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Bytes::from(e.to_string()),
                ),
            }
        }
        _ => respond(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    }
}

fn respond(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}

/// Sets `clientConfig.caBundle` of every webhook in the configuration `name` to
/// `root_pem`, when it differs. Returns whether it changed anything.
pub async fn sync_ca_bundle(
    client: Client,
    name: &str,
    root_pem: &str,
) -> Result<bool, WebhookError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let err = |source| WebhookError::CaBundle {
        name: name.to_owned(),
        source,
    };
    let current = api.get(name).await.map_err(err)?;
    let want = base64::engine::general_purpose::STANDARD.encode(root_pem);
    let ops: Vec<serde_json::Value> = current
        .webhooks
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, w)| {
            let have = w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice());
            have != Some(root_pem.as_bytes())
        })
        .map(|(i, _)| {
            serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": want,
            })
        })
        .collect();
    if ops.is_empty() {
        return Ok(false);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| err(kube::Error::SerdeError(e)))?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(err)?;
    tracing::info!(configuration = name, "webhook caBundle updated");
    Ok(true)
}

/// Keeps the caBundle right while `leading` says this replica leads (one writer per
/// cluster): on becoming leader, then every [`CA_BUNDLE_RESYNC`]. A closed `leading`
/// channel keeps its last value.
pub async fn keep_ca_bundle(
    client: Client,
    name: String,
    root_pem: String,
    mut leading: watch::Receiver<bool>,
) {
    let mut leading_open = true;
    loop {
        if *leading.borrow_and_update()
            && let Err(e) = sync_ca_bundle(client.clone(), &name, &root_pem).await
        {
            tracing::warn!(error = %e, "webhook caBundle not updated; retrying later");
        }
        tokio::select! {
            changed = leading.changed(), if leading_open => if changed.is_err() {
                leading_open = false;
            },
            _ = tokio::time::sleep(CA_BUNDLE_RESYNC) => {}
        }
    }
}

#[cfg(test)]
mod tests;
