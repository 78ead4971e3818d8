//! The discovery server: one delta stream per proxy, authenticated by its workload
//! certificate, with ACK/NACK bookkeeping.

mod resources;
mod status;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use trellis_identity::{SpiffeId, WorkloadName, spiffe_id_of, workload_name_of};
use trellis_proto::discovery::v1::{
    self as pb, DeltaDiscoveryRequest, DeltaDiscoveryResponse, aggregated_discovery_server,
};

use crate::metrics::{ControlMetrics, short_type};
use crate::model::{MeshSnapshot, PolicyScope};
pub use resources::{ProxyView, TYPE_URLS, view_for};
pub use status::{ProxyStatus, SyncState, TypeSync};

pub type ConnectedProxies = Arc<Mutex<BTreeMap<u64, ProxyStatus>>>;

#[derive(Clone)]
pub struct DiscoveryServer {
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    trust_domain: String,
    roots_pem: Vec<String>,
    connected: ConnectedProxies,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
    metrics: ControlMetrics,
}

impl DiscoveryServer {
    pub fn new(
        snapshots: watch::Receiver<Arc<MeshSnapshot>>,
        trust_domain: String,
        roots_pem: Vec<String>,
    ) -> Self {
        DiscoveryServer {
            snapshots,
            trust_domain,
            roots_pem,
            connected: Arc::default(),
            next_stream: Arc::default(),
            metrics: ControlMetrics::default(),
        }
    }

    /// Counts pushes, their latency and NACKs in `metrics`.
    pub fn with_metrics(mut self, metrics: ControlMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn connected(&self) -> ConnectedProxies {
        self.connected.clone()
    }

    pub fn into_server(self) -> aggregated_discovery_server::AggregatedDiscoveryServer<Self> {
        aggregated_discovery_server::AggregatedDiscoveryServer::new(self)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl aggregated_discovery_server::AggregatedDiscovery for DiscoveryServer {
    type DeltaResourcesStream = ResponseStream;

    async fn delta_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaResourcesStream>, Status> {
        let certs = request.peer_certs();
        let leaf = certs.as_deref().and_then(|c| c.first()).ok_or_else(|| {
            Status::unauthenticated("the discovery stream needs the proxy's workload certificate")
        })?;
        let identity = spiffe_id_of(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
        // The CA wrote the workload its proof was bound to; a Subject it did not write
        // (it cannot be, the chain was verified) leaves the workload unknown.
        let workload = workload_name_of(leaf, &identity).unwrap_or_else(|e| {
            tracing::warn!(%identity, error = %e, "the certificate's workload is unreadable");
            None
        });
        let stream_id = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        let session = ProxySession {
            id: stream_id,
            identity,
            workload,
            scope: String::new(),
            server: self.clone(),
            sent: BTreeMap::new(),
            pending: BTreeMap::new(),
            nonce: 0,
            tx,
        };
        let span = tracing::info_span!("proxy", identity = %session.identity, stream = stream_id);
        tokio::spawn(session.run(request.into_inner()).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct ProxySession {
    id: u64,
    identity: SpiffeId,
    /// From the certificate; its policies are those of this workload when the
    /// registry has it.
    workload: Option<WorkloadName>,
    /// The last [`PolicyScope::describe`], to log and show only changes.
    scope: String,
    server: DiscoveryServer,
    /// Per subscribed type: name -> version last sent.
    sent: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// Per type: the nonce of the last response and when it was sent, until answered.
    pending: BTreeMap<&'static str, (String, Instant)>,
    nonce: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl ProxySession {
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        tracing::info!("proxy connected");
        self.status(|_| {});
        let mut snapshots = self.server.snapshots.clone();
        loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    if self.push(&snapshot).await.is_err() {
                        break;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        let snapshot = snapshots.borrow_and_update().clone();
                        if self.on_request(request, &snapshot).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(error = %status, "stream error");
                        break;
                    }
                },
            }
        }
        tracing::info!("proxy disconnected");
        if let Ok(mut connected) = self.server.connected.lock() {
            connected.remove(&self.id);
        }
    }

    async fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        snapshot: &MeshSnapshot,
    ) -> Result<(), Closed> {
        let Some(type_url) = TYPE_URLS.iter().copied().find(|t| *t == request.type_url) else {
            // A newer proxy may ask for kinds this control plane does not serve: an
            // empty answer tells it there is nothing, instead of leaving it waiting.
            if request.response_nonce.is_empty() {
                tracing::info!(
                    type_url = request.type_url,
                    "unknown resource type; answering empty"
                );
                self.nonce += 1;
                let response = pb::DeltaDiscoveryResponse {
                    type_url: request.type_url,
                    nonce: self.nonce.to_string(),
                    ..Default::default()
                };
                self.tx.send(Ok(response)).await.map_err(|_| Closed)?;
            }
            return Ok(());
        };
        if let Some(node) = &request.node {
            // Outside input: kept short.
            let version = node.metadata.get("version").map(|v| truncate(v, 64));
            self.status(|s| s.proxy_version = version);
        }
        if !request.response_nonce.is_empty() {
            self.on_answer(type_url, &request);
            return Ok(());
        }
        // A subscription (first request for this type, or a reconnect): start from
        // what the proxy says it already holds.
        self.sent.insert(
            type_url,
            request.initial_resource_versions.into_iter().collect(),
        );
        self.push_type(type_url, snapshot, true).await
    }

    /// An ACK or NACK of the response `request.response_nonce` of `type_url`.
    fn on_answer(&mut self, type_url: &'static str, request: &DeltaDiscoveryRequest) {
        let nonce = request.response_nonce.as_str();
        let latest = match self.pending.get(type_url) {
            Some((sent, at)) if sent == nonce => {
                self.server.metrics.push_answered(type_url, at.elapsed());
                self.pending.remove(type_url);
                true
            }
            _ => false,
        };
        let now = unix_now();
        match &request.error_detail {
            Some(error) => {
                tracing::warn!(
                    identity = %self.identity,
                    type_url,
                    nonce,
                    reason = error.message,
                    "proxy rejected config (NACK)"
                );
                self.server.metrics.nack(type_url, error.code);
                let message = truncate(&error.message, 1024);
                self.status(|s| {
                    s.last_nack = Some(format!("{type_url}: {message}"));
                    s.last_nack_unix = Some(now);
                    if let Some(t) = s.types.get_mut(short_type(type_url)) {
                        t.last_nack = Some(message.clone());
                        if latest {
                            t.state = SyncState::Nacked;
                        }
                    }
                });
            }
            None => {
                let versions = self.sent.get(type_url).cloned().unwrap_or_default();
                self.status(|s| {
                    s.acked.retain(|k, _| !k.starts_with(type_url));
                    for (name, version) in versions {
                        s.acked.insert(format!("{type_url}/{name}"), version);
                    }
                    s.last_ack_unix = Some(now);
                    if let Some(t) = s.types.get_mut(short_type(type_url)) {
                        t.acked_nonce = Some(nonce.to_owned());
                        if latest {
                            t.state = SyncState::Synced;
                        }
                    }
                });
            }
        }
    }

    async fn push(&mut self, snapshot: &MeshSnapshot) -> Result<(), Closed> {
        let types: Vec<&'static str> = self.sent.keys().copied().collect();
        for type_url in types {
            self.push_type(type_url, snapshot, false).await?;
        }
        Ok(())
    }

    /// Sends what changed for one type. `always`: answer even when nothing changed, so
    /// a new subscriber learns that it is in sync.
    async fn push_type(
        &mut self,
        type_url: &'static str,
        snapshot: &MeshSnapshot,
        always: bool,
    ) -> Result<(), Closed> {
        let scope = snapshot.policy_scope(
            &self.identity,
            self.workload.as_ref().map(|w| w.name.as_str()),
        );
        let described = scope.describe();
        if described != self.scope {
            match &scope {
                PolicyScope::Workload(_) => tracing::info!(scope = described, "policy scope"),
                PolicyScope::Unknown { candidates, .. } => tracing::warn!(
                    identity = %self.identity,
                    workload = self.workload.as_ref().map(tracing::field::display),
                    candidates = candidates.len(),
                    scope = described,
                    "workload unknown: fail-closed policy view"
                ),
            }
            self.status(|s| s.policy_scope.clone_from(&described));
            self.scope = described;
        }
        let view = view_for(
            snapshot,
            &self.server.trust_domain,
            &self.server.roots_pem,
            &scope,
        );
        let empty = BTreeMap::new();
        let current = view.by_type.get(type_url).unwrap_or(&empty);
        let sent = self.sent.entry(type_url).or_default();
        let (resources, removed) = resources::delta(sent, current);
        if !always && resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        for name in &removed {
            sent.remove(name);
        }
        for r in &resources {
            sent.insert(r.name.clone(), r.version.clone());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = status::version_digest(sent);
        let count = sent.len();
        self.pending
            .insert(type_url, (nonce.clone(), Instant::now()));
        self.server.metrics.push_sent(type_url);
        self.status(|s| {
            let entry = s.types.entry(short_type(type_url)).or_insert(TypeSync {
                version: String::new(),
                resources: 0,
                sent_nonce: String::new(),
                acked_nonce: None,
                state: SyncState::Stale,
                last_nack: None,
            });
            entry.version = version;
            entry.resources = count;
            entry.sent_nonce.clone_from(&nonce);
            entry.state = SyncState::Stale;
        });
        tracing::debug!(
            type_url,
            changed = resources.len(),
            removed = removed.len(),
            "pushing"
        );
        let response = pb::DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            system_version_info: String::new(),
            resources,
            removed_resources: removed,
            nonce,
        };
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }

    fn status(&self, update: impl FnOnce(&mut ProxyStatus)) {
        if let Ok(mut connected) = self.server.connected.lock() {
            let entry = connected.entry(self.id).or_insert_with(|| {
                let mut status = ProxyStatus::new(
                    self.identity.to_string(),
                    self.workload.as_ref().map(ToString::to_string),
                    unix_now(),
                );
                status.policy_scope.clone_from(&self.scope);
                status
            });
            update(entry);
            entry.refresh();
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// At most `max` bytes of `text`, cut on a character boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The proxy's side of the stream went away.
struct Closed;
