//! The discovery server: one delta stream per proxy, authenticated by its workload
//! certificate, with ACK/NACK bookkeeping.

mod resources;
mod shared;
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
use resources::ResourceSet;
pub use resources::{ProxyView, SHARED_TYPES, TYPE_URLS, view_for};
pub use shared::{DEBOUNCE_MAX, DEBOUNCE_QUIET, SharedResources, spawn_builder};
pub use status::{ProxyStatus, SentVersions, SyncState, TypeSync};

pub type ConnectedProxies = Arc<Mutex<BTreeMap<u64, ProxyStatus>>>;

#[derive(Clone)]
pub struct DiscoveryServer {
    /// The shared resources of the newest snapshot (see [`spawn_builder`]).
    shared: watch::Receiver<Arc<SharedResources>>,
    connected: ConnectedProxies,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
    /// Bounds the large responses (a new stream's whole view) in flight at once, so
    /// a thousand proxies connecting together do not each hold a copy of the mesh
    /// in memory before it is written.
    large_responses: Arc<tokio::sync::Semaphore>,
    metrics: ControlMetrics,
}

impl DiscoveryServer {
    /// Starts the task that builds each snapshot's shared resources, so it must be
    /// called within a Tokio runtime.
    pub fn new(
        snapshots: watch::Receiver<Arc<MeshSnapshot>>,
        trust_domain: String,
        roots_pem: Vec<String>,
    ) -> Self {
        DiscoveryServer {
            shared: spawn_builder(snapshots, trust_domain, roots_pem),
            connected: Arc::default(),
            next_stream: Arc::default(),
            large_responses: Arc::new(tokio::sync::Semaphore::new(LARGE_RESPONSES_IN_FLIGHT)),
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
        // One response queued at most: the session waits until the stream took the
        // last one, which is what bounds memory per stream (see `large_responses`).
        let (tx, rx) = mpsc::channel(1);
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
    /// Per subscribed type: what the proxy was last sent.
    sent: BTreeMap<&'static str, Held>,
    /// Per type: the nonce of the last response, when it was sent and the version it
    /// completed, until answered.
    pending: BTreeMap<&'static str, (String, Instant, String)>,
    nonce: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl ProxySession {
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        tracing::info!("proxy connected");
        self.status(|_| {});
        let mut shared = self.server.shared.clone();
        loop {
            tokio::select! {
                changed = shared.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = shared.borrow_and_update().clone();
                    if self.push(&current).await.is_err() {
                        break;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        let current = shared.borrow_and_update().clone();
                        if self.on_request(request, &current).await.is_err() {
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
        shared: &Arc<SharedResources>,
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
            Held::Versions(SentVersions::from_held(
                request.initial_resource_versions.into_iter().collect(),
            )),
        );
        self.push_type(type_url, shared, true).await
    }

    /// An ACK or NACK of the response `request.response_nonce` of `type_url`.
    fn on_answer(&mut self, type_url: &'static str, request: &DeltaDiscoveryRequest) {
        let nonce = request.response_nonce.as_str();
        let latest = match self.pending.get(type_url) {
            Some((sent, at, _)) if sent == nonce => {
                self.server.metrics.push_answered(type_url, at.elapsed());
                self.pending.remove(type_url)
            }
            _ => None,
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
                        if latest.is_some() {
                            t.state = SyncState::Nacked;
                        }
                    }
                });
            }
            None => {
                self.status(|s| {
                    s.last_ack_unix = Some(now);
                    if let Some(t) = s.types.get_mut(short_type(type_url)) {
                        t.acked_nonce = Some(nonce.to_owned());
                        if let Some((_, _, version)) = latest {
                            t.acked_version = Some(version);
                            t.state = SyncState::Synced;
                        }
                    }
                });
            }
        }
    }

    async fn push(&mut self, shared: &Arc<SharedResources>) -> Result<(), Closed> {
        let types: Vec<&'static str> = self.sent.keys().copied().collect();
        for type_url in types {
            self.push_type(type_url, shared, false).await?;
        }
        Ok(())
    }

    /// Sends what changed for one type. `always`: answer even when nothing changed, so
    /// a new subscriber learns that it is in sync.
    async fn push_type(
        &mut self,
        type_url: &'static str,
        shared: &Arc<SharedResources>,
        always: bool,
    ) -> Result<(), Closed> {
        let snapshot: &MeshSnapshot = &shared.snapshot;
        let scope = snapshot.policy_scope_in(
            &shared.workloads,
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
        let namespace = scope.identity().namespace();
        // A whole view (a new or reconnecting stream) waits for a permit before it is
        // built; a slow stream holds one only while its own large response waits to be
        // taken. Changes to a synced stream never wait.
        let whole_view = !matches!(self.sent.get(type_url), Some(Held::Shared(_)))
            && shared
                .typed_set(type_url, namespace)
                .is_some_and(|s| s.set.len() >= LARGE_RESPONSE);
        let permit = match whole_view {
            true => self
                .server
                .large_responses
                .clone()
                .acquire_owned()
                .await
                .ok(),
            false => None,
        };
        let sent = self
            .sent
            .entry(type_url)
            .or_insert_with(|| Held::Versions(SentVersions::default()));
        let (resources, removed, version, count) =
            match (shared.typed_set(type_url, namespace), &mut *sent) {
                // Alike for every proxy: what the stream holds is a generation's set.
                (Some(current), held) => {
                    let (resources, removed) = match held {
                        Held::Shared(previous) => {
                            shared_delta(previous, shared, type_url, namespace)
                        }
                        Held::Versions(versions) => {
                            resources::delta(versions.versions(), &current.set)
                        }
                    };
                    *held = Held::Shared(shared.clone());
                    (
                        resources,
                        removed,
                        current.digest.clone(),
                        current.set.len(),
                    )
                }
                (None, held) => {
                    if let Held::Shared(_) = held {
                        *held = Held::Versions(SentVersions::default());
                    }
                    let Held::Versions(versions) = held else {
                        return Ok(());
                    };
                    let (resources, removed) =
                        stream_delta(versions.versions(), shared, &scope, type_url, None);
                    for name in &removed {
                        versions.remove(name);
                    }
                    for r in &resources {
                        versions.insert(&r.name, &r.version);
                    }
                    (resources, removed, versions.digest(), versions.len())
                }
            };
        if !always && resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        self.pending
            .insert(type_url, (nonce.clone(), Instant::now(), version.clone()));
        self.server.metrics.push_sent(type_url);
        self.status(|s| {
            let entry = s.types.entry(short_type(type_url)).or_insert(TypeSync {
                version: String::new(),
                resources: 0,
                sent_nonce: String::new(),
                acked_nonce: None,
                acked_version: None,
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
        self.tx.send(Ok(response)).await.map_err(|_| Closed)?;
        if permit.is_some() {
            // Taken by the stream once a slot is free again.
            drop(self.tx.reserve().await.map_err(|_| Closed)?);
        }
        Ok(())
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

/// A response of this many resources or more is large (see `large_responses`).
const LARGE_RESPONSE: usize = 256;
/// Large responses being handed to their streams at once.
const LARGE_RESPONSES_IN_FLIGHT: usize = 16;

/// The proxy's side of the stream went away.
struct Closed;

/// What one stream was last sent of one type.
enum Held {
    /// Names and versions: what the proxy said it held when it subscribed, or the
    /// proxy's own security policy.
    Versions(SentVersions),
    /// Exactly the set every proxy (of its namespace) gets in this generation: the
    /// stream holds a reference, not a copy of thousands of names.
    Shared(Arc<SharedResources>),
}

/// From the set of `type_url` in `previous` to the one in `next`, for a proxy in
/// `namespace`: only the changed names when `next` directly follows `previous`.
fn shared_delta(
    previous: &SharedResources,
    next: &SharedResources,
    type_url: &str,
    namespace: &str,
) -> (Vec<pb::Resource>, Vec<String>) {
    if previous.generation == next.generation {
        return (Vec::new(), Vec::new());
    }
    let (Some(old), Some(new)) = (
        previous.typed_set(type_url, namespace),
        next.typed_set(type_url, namespace),
    ) else {
        return (Vec::new(), Vec::new());
    };
    let names = next.changed_since(Some(previous.generation), type_url);
    resources::delta_sets(&old.set, &new.set, names)
}

/// What a stream holding `sent` of `type_url` must be sent to be up to date with
/// `shared`, for the proxy of `scope`. `held`: the generation the stream was last
/// brought up to for this type; when it is the one before `shared`, only the names
/// that changed since are looked at, else everything is compared.
pub fn stream_delta(
    sent: &BTreeMap<String, String>,
    shared: &SharedResources,
    scope: &PolicyScope<'_>,
    type_url: &str,
    held: Option<u64>,
) -> (Vec<pb::Resource>, Vec<String>) {
    let own: ResourceSet;
    let routes: Arc<shared::TypedSet>;
    let empty = ResourceSet::new();
    let current: &ResourceSet = match type_url {
        trellis_proto::discovery::v1::type_url::AUTHORIZATION_POLICY => {
            own = resources::authorization_policies(&shared.snapshot, scope);
            &own
        }
        trellis_proto::discovery::v1::type_url::PEER_AUTHENTICATION => {
            own = resources::peer_authentication(&shared.snapshot, scope);
            &own
        }
        trellis_proto::discovery::v1::type_url::ROUTE_TABLE => {
            routes = shared.route_tables(scope.identity().namespace());
            &routes.set
        }
        other => shared.shared_set(other).unwrap_or(&empty),
    };
    match shared.changed_since(held, type_url) {
        Some(names) => resources::delta_of(sent, current, names),
        None => resources::delta(sent, current),
    }
}
