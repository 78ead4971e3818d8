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
use state::InvalidResource;
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

/// How far discovery has got, for `/ready`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncStatus {
    /// Every kind has been answered with a response the proxy accepted (ACKed) at
    /// least once. A rejected (NACKed) answer does not count.
    pub synced: bool,
    /// The kinds still waiting for an accepted answer.
    pub waiting_for: Vec<&'static str>,
    /// The last response the proxy rejected: `type: reason`.
    pub last_rejected: Option<String>,
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus {
            synced: false,
            waiting_for: TYPES.to_vec(),
            last_rejected: None,
        }
    }
}

impl SyncStatus {
    fn of(state: &MeshState, last_rejected: Option<String>) -> Self {
        let waiting_for: Vec<&'static str> = TYPES
            .iter()
            .copied()
            .filter(|t| !state.resources.by_type.contains_key(*t))
            .collect();
        SyncStatus {
            synced: waiting_for.is_empty(),
            waiting_for,
            last_rejected,
        }
    }

    /// Why the proxy is not ready yet, in a line.
    pub fn reason(&self) -> String {
        let mut reason = format!("waiting for {}", self.waiting_for.join(", "));
        if let Some(rejected) = &self.last_rejected {
            reason.push_str("; last rejected: ");
            reason.push_str(rejected);
        }
        reason
    }
}

/// Runs forever: keeps `state` current from the control plane.
pub async fn run(
    config: Arc<ProxyConfig>,
    mut tls: watch::Receiver<Option<Arc<MeshTls>>>,
    state: watch::Sender<Arc<MeshState>>,
    bundles: watch::Sender<Option<TrustBundle>>,
    synced: watch::Sender<SyncStatus>,
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

/// The largest discovery response taken. A first response carries a whole type
/// (every Service, every Endpoints): about 6 MB at 10,000 services, past gRPC's
/// 4 MiB default, which made a proxy in such a mesh reconnect forever
/// (`trellis-bench scale`). The control plane is authenticated; this only bounds a
/// runaway.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Up to this many resources (held and in the response), a response is applied on
/// the data-path thread, where a mesh that small rebuilds in 0.3 ms or less. A
/// larger one is rebuilt on a blocking thread so requests never wait behind it:
/// every change still rebuilds the whole state, 0.7 ms at 100 services and 10 ms
/// at 1,000 (`trellis-bench apply`).
const APPLY_INLINE_MAX: usize = 64;

/// `current` with `response` applied, built off the data-path thread when large.
async fn apply(
    current: Arc<MeshState>,
    response: pb::DeltaDiscoveryResponse,
) -> Result<
    (
        pb::DeltaDiscoveryResponse,
        Result<MeshState, InvalidResource>,
    ),
    StreamError,
> {
    let held: usize = current.resources.by_type.values().map(|r| r.len()).sum();
    let size = held + response.resources.len() + response.removed_resources.len();
    if size <= APPLY_INLINE_MAX {
        let applied = current.apply(&response);
        return Ok((response, applied));
    }
    tokio::task::spawn_blocking(move || {
        let applied = current.apply(&response);
        (response, applied)
    })
    .await
    .map_err(|e| StreamError::Apply(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("stream: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the request channel closed")]
    Closed,
    #[error("applying a response: {0}")]
    Apply(String),
}

async fn stream_once(
    config: &ProxyConfig,
    tls: &MeshTls,
    state: &watch::Sender<Arc<MeshState>>,
    bundles: &watch::Sender<Option<TrustBundle>>,
    synced: &watch::Sender<SyncStatus>,
    metrics: &Metrics,
) -> Result<(), StreamError> {
    let bundle = bundles.borrow().clone();
    let channel = control::channel(
        &config.control_addr,
        &config.control_server_name,
        &config.control_root_pem,
        bundle.as_ref(),
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
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .delta_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(control = config.control_addr, "discovery stream open");
    while let Some(response) = responses.message().await? {
        let current = state.borrow().clone();
        let mut last_rejected = synced.borrow().last_rejected.clone();
        let (response, applied) = apply(current.clone(), response).await?;
        let reply = match applied {
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
                last_rejected = Some(format!("{}: {e}", response.type_url));
                Some(pb::ErrorDetail {
                    code: tonic::Code::InvalidArgument as i32,
                    message: e.to_string(),
                })
            }
        };
        // Readiness follows what was accepted, so a NACK never makes the proxy ready.
        let status = SyncStatus::of(&state.borrow(), last_rejected);
        synced.send_if_modified(|old| {
            let changed = *old != status;
            *old = status;
            changed
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::state::tests::{response, service};

    fn services(n: usize) -> pb::DeltaDiscoveryResponse {
        let services = (0..n)
            .map(|i| {
                service(
                    &format!("s{i}"),
                    &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                )
            })
            .collect();
        response(services, vec![])
    }

    /// The proxy's own runtime is single-threaded: a large response is applied on a
    /// blocking thread and comes back whole; a small one inline; a bad one is refused
    /// either way.
    #[tokio::test(flavor = "current_thread")]
    async fn small_and_large_responses_are_applied_alike_on_a_single_thread_runtime() {
        for n in [3, APPLY_INLINE_MAX + 1] {
            let (response, applied) = apply(Arc::default(), services(n)).await.unwrap();
            assert_eq!(response.resources.len(), n, "the response is handed back");
            assert_eq!(applied.unwrap().services.len(), n);

            let mut bad = services(n);
            bad.resources[n - 1].kind = None;
            let (_, applied) = apply(Arc::default(), bad).await.unwrap();
            assert!(
                applied.is_err(),
                "{n}: a resource without a kind was accepted"
            );
        }
    }
}
