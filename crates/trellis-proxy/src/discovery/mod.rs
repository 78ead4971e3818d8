//! The discovery client: one delta stream to the control plane, ACK or NACK for every
//! response, reconnect with backoff, and the last good state kept throughout.

pub mod state;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use trellis_identity::{MeshTls, TrustBundle};
use trellis_proto::discovery::v1::{
    self as pb, DeltaDiscoveryRequest, aggregated_discovery_client::AggregatedDiscoveryClient,
    type_url,
};

use crate::config::ProxyConfig;
use crate::control;
use crate::metrics::{ConfigLabels, Metrics};
pub use state::MeshState;

/// The kinds this proxy subscribes to, in the order it needs them. It is ready once
/// each has been answered (an empty answer counts).
const TYPES: [&str; 7] = [
    type_url::TRUST_BUNDLE,
    type_url::SERVICE,
    type_url::ENDPOINTS,
    type_url::ROUTE_TABLE,
    type_url::TRAFFIC_POLICY,
    type_url::AUTHORIZATION_POLICY,
    type_url::PEER_AUTHENTICATION,
];

/// Runs forever: keeps `state` current from the control plane.
pub async fn run(
    config: Arc<ProxyConfig>,
    mut tls: watch::Receiver<Option<Arc<MeshTls>>>,
    state: watch::Sender<Arc<MeshState>>,
    bundles: watch::Sender<Option<TrustBundle>>,
    synced: watch::Sender<bool>,
    metrics: Metrics,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let current_tls = tls.borrow_and_update().clone();
        let Some(current_tls) = current_tls else {
            if tls.changed().await.is_err() {
                return;
            }
            continue;
        };
        let started = tokio::time::Instant::now();
        match stream_once(&config, &current_tls, &state, &bundles, &synced, &metrics).await {
            Ok(()) => tracing::info!("discovery stream closed by the control plane"),
            Err(e) => {
                tracing::warn!(error = %e, "discovery stream failed; keeping the last config")
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        let jitter = Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64 / 2));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("stream: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the request channel closed")]
    Closed,
}

async fn stream_once(
    config: &ProxyConfig,
    tls: &MeshTls,
    state: &watch::Sender<Arc<MeshState>>,
    bundles: &watch::Sender<Option<TrustBundle>>,
    synced: &watch::Sender<bool>,
    metrics: &Metrics,
) -> Result<(), StreamError> {
    let channel = control::channel(
        &config.control_addr,
        &config.control_server_name,
        &config.control_root_pem,
        Some(tls.certificate()),
    )?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    // Subscribe to every type, telling the server what we already hold so that a
    // reconnect resends only what changed.
    let held = state.borrow().resources.clone();
    for (i, type_url) in TYPES.iter().enumerate() {
        let initial_resource_versions = held
            .by_type
            .get(*type_url)
            .map(|r| {
                r.values()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let node = (i == 0).then(|| pb::Node {
            id: config.identity.to_string(),
            metadata: [("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())].into(),
        });
        tx.send(DeltaDiscoveryRequest {
            node,
            type_url: (*type_url).to_owned(),
            resource_names_subscribe: vec!["*".to_owned()],
            initial_resource_versions,
            ..Default::default()
        })
        .await
        .map_err(|_| StreamError::Closed)?;
    }
    let mut responses = AggregatedDiscoveryClient::new(channel)
        .delta_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(control = config.control_addr, "discovery stream open");
    let mut seen = std::collections::HashSet::new();
    while let Some(response) = responses.message().await? {
        let current = state.borrow().clone();
        let reply = match current.apply(&response) {
            Ok(next) => {
                tracing::debug!(
                    type_url = response.type_url,
                    changed = response.resources.len(),
                    removed = response.removed_resources.len(),
                    "config accepted"
                );
                if next.trust_bundle != current.trust_bundle {
                    bundles.send_replace(next.trust_bundle.clone());
                }
                state.send_replace(Arc::new(next));
                count(metrics, &response.type_url, "ack");
                None
            }
            Err(e) => {
                tracing::warn!(type_url = response.type_url, error = %e, "config rejected (NACK); keeping the last good one");
                count(metrics, &response.type_url, "nack");
                Some(pb::ErrorDetail {
                    code: tonic::Code::InvalidArgument as i32,
                    message: e.to_string(),
                })
            }
        };
        seen.insert(response.type_url.clone());
        if TYPES.iter().all(|t| seen.contains(*t)) {
            synced.send_replace(true);
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: response.type_url,
            response_nonce: response.nonce,
            error_detail: reply,
            ..Default::default()
        })
        .await
        .map_err(|_| StreamError::Closed)?;
    }
    Ok(())
}

fn count(metrics: &Metrics, type_url: &str, result: &str) {
    metrics
        .config_updates
        .get_or_create(&ConfigLabels {
            type_url: type_url.to_owned(),
            result: result.to_owned(),
        })
        .inc();
}
