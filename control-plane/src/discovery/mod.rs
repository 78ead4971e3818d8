//! The discovery server: one delta stream per proxy, authenticated by its workload
//! certificate, with ACK/NACK bookkeeping.

mod resources;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use trellis_identity::{SpiffeId, WorkloadName, spiffe_id_of, workload_name_of};
use trellis_proto::discovery::v1::{
    self as pb, DeltaDiscoveryRequest, DeltaDiscoveryResponse, aggregated_discovery_server,
};

use crate::model::{MeshSnapshot, PolicyScope};
pub use resources::{ProxyView, TYPE_URLS, view_for};

/// What the control plane knows of each connected proxy (for its admin endpoint).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProxyStatus {
    pub identity: String,
    /// The workload its certificate names, if any.
    pub workload: Option<String>,
    /// Whose security policy it gets: `workload <ns>/<name>`, or `fail-closed (…)`
    /// when its workload is unknown.
    pub policy_scope: String,
    pub connected_at_unix: u64,
    pub acked: BTreeMap<String, String>,
    pub last_nack: Option<String>,
}

pub type ConnectedProxies = Arc<Mutex<BTreeMap<u64, ProxyStatus>>>;

#[derive(Clone)]
pub struct DiscoveryServer {
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    trust_domain: String,
    roots_pem: Vec<String>,
    connected: ConnectedProxies,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
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
        }
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
        if !request.response_nonce.is_empty() {
            match &request.error_detail {
                Some(error) => {
                    tracing::warn!(
                        identity = %self.identity,
                        type_url,
                        nonce = request.response_nonce,
                        reason = error.message,
                        "proxy rejected config (NACK)"
                    );
                    let reason = format!("{type_url}: {}", error.message);
                    self.status(|s| s.last_nack = Some(reason));
                }
                None => {
                    let versions = self.sent.get(type_url).cloned().unwrap_or_default();
                    self.status(|s| {
                        s.acked.retain(|k, _| !k.starts_with(type_url));
                        for (name, version) in versions {
                            s.acked.insert(format!("{type_url}/{name}"), version);
                        }
                    });
                }
            }
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
            nonce: self.nonce.to_string(),
        };
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }

    fn status(&self, update: impl FnOnce(&mut ProxyStatus)) {
        if let Ok(mut connected) = self.server.connected.lock() {
            let entry = connected.entry(self.id).or_insert_with(|| ProxyStatus {
                identity: self.identity.to_string(),
                workload: self.workload.as_ref().map(ToString::to_string),
                policy_scope: self.scope.clone(),
                connected_at_unix: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default(),
                acked: BTreeMap::new(),
                last_nack: None,
            });
            update(entry);
        }
    }
}

/// The proxy's side of the stream went away.
struct Closed;
