//! The `kube` registry: Kubernetes objects, watched with kube-rs, read into the same
//! [`MeshSnapshot`] the file registry makes. Nothing downstream knows which one fed it.
//!
//! One watcher per kind (Services, EndpointSlices, Pods, Namespaces,
//! ServiceAccounts, and, when their CRDs are installed, Gateway API `HTTPRoute` and
//! the Trellis `TrafficPolicy`, `AuthorizationPolicy` and `PeerAuthentication`),
//! merged into one task that owns a [`ClusterState`]. kube-runtime's watcher does the hard
//! parts: paged lists, bookmarks, resuming from the last resourceVersion, and a fresh
//! list after `410 Gone`. [`KindStore`] buffers each list, so a re-list is swapped in
//! whole. No snapshot is published until every kind has completed its first list, and
//! events arriving together are folded into one snapshot.
//!
//! Each snapshot also judges every route and policy object; the verdicts go out as a
//! [`StatusReport`], which [`write_statuses`] turns into `status.conditions` (an
//! HTTPRoute's `status.parents`) and Events when this replica leads.

mod route_status;
mod scope;
mod snapshot;
mod status;
mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;

pub use route_status::{JudgedParent, RESOLVED_REFS, next_parents};
pub use scope::{NamespaceScope, ScopeError};
pub use snapshot::{ClusterState, evaluate, evaluate_in, snapshot_from};
pub use status::{
    ACCEPTED, FIELD_MANAGER, JudgedCondition, L7_RULES_ON_OPAQUE_PORT, PolicyKind, StatusReport,
    StatusTarget, WriterProgress, events_for, next_conditions, write_statuses,
};
pub use store::{KindStore, ObjectKey};

use super::{RegistryErrorView, RegistryStatus};
use crate::model::MeshSnapshot;

/// Labels of every namespace, by name (the injector reads
/// `trellis.io/inject=enabled` here).
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// How long events are gathered into one snapshot after the first of a burst.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// The kinds watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    ServiceAccount,
    HttpRoute,
    TrafficPolicy,
    AuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices.discovery.k8s.io",
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::HttpRoute => "httproutes.gateway.networking.k8s.io",
            Kind::TrafficPolicy => "trafficpolicies.trellis.io",
            Kind::AuthorizationPolicy => "authorizationpolicies.trellis.io",
            Kind::PeerAuthentication => "peerauthentications.trellis.io",
        }
    }

    /// A kind whose CRD may be missing: then it counts as listed and empty.
    fn optional(self) -> bool {
        self.resource().is_some()
    }

    /// The API resource of a kind read untyped (a CRD).
    pub fn resource(self) -> Option<ApiResource> {
        match self {
            Kind::HttpRoute => Some(http_route_resource()),
            Kind::TrafficPolicy => Some(PolicyKind::TrafficPolicy.resource()),
            Kind::AuthorizationPolicy => Some(PolicyKind::AuthorizationPolicy.resource()),
            Kind::PeerAuthentication => Some(PolicyKind::PeerAuthentication.resource()),
            Kind::Service
            | Kind::EndpointSlice
            | Kind::Pod
            | Kind::Namespace
            | Kind::ServiceAccount => None,
        }
    }
}

/// One watcher's output, tagged with its kind (boxed: objects are large and
/// of very different sizes).
#[derive(Debug)]
pub enum Change {
    Service(Box<Event<Service>>),
    EndpointSlice(Box<Event<EndpointSlice>>),
    Pod(Box<Event<Pod>>),
    Namespace(Box<Event<Namespace>>),
    ServiceAccount(Box<Event<ServiceAccount>>),
    /// A kind read untyped: a CRD ([`Kind::resource`]).
    Custom(Kind, Box<Event<DynamicObject>>),
    Failed(Kind, watcher::Error),
}

/// Where the registry publishes.
pub struct Outputs {
    pub snapshots: watch::Sender<Arc<MeshSnapshot>>,
    pub status: watch::Sender<RegistryStatus>,
    pub namespaces: watch::Sender<Arc<NamespaceLabels>>,
    /// The statuses the route and policy objects should have.
    pub statuses: watch::Sender<Arc<StatusReport>>,
}

/// The Gateway API `HTTPRoute`, read untyped (its Rust type is Trellis' subset).
pub fn http_route_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
    ))
}

/// The merged watch streams of every kind, cluster-wide.
pub fn changes(client: Client) -> impl Stream<Item = Change> + Send + 'static {
    fn watch<K, F>(api: Api<K>, kind: Kind, tag: F) -> futures::stream::BoxStream<'static, Change>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(Box<Event<K>>) -> Change + Send + 'static,
    {
        watcher::watcher(api, watcher::Config::default())
            .modify(slim_metadata)
            .default_backoff()
            .map(move |r| match r {
                Ok(e) => tag(Box::new(e)),
                Err(e) => Change::Failed(kind, e),
            })
            .boxed()
    }
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .modify(slim_pod)
        .default_backoff()
        .map(|r| match r {
            Ok(e) => Change::Pod(Box::new(e)),
            Err(e) => Change::Failed(Kind::Pod, e),
        })
        .boxed();
    let custom = [
        Kind::HttpRoute,
        Kind::TrafficPolicy,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
    ]
    .into_iter()
    .filter_map(|kind| {
        let api = Api::<DynamicObject>::all_with(client.clone(), &kind.resource()?);
        Some(watch(api, kind, move |e| Change::Custom(kind, e)))
    });
    let builtin = [
        watch(Api::all(client.clone()), Kind::Service, Change::Service),
        watch(
            Api::all(client.clone()),
            Kind::EndpointSlice,
            Change::EndpointSlice,
        ),
        pods,
        watch(Api::all(client.clone()), Kind::Namespace, Change::Namespace),
        watch(
            Api::all(client.clone()),
            Kind::ServiceAccount,
            Change::ServiceAccount,
        ),
    ];
    futures::stream::select_all(builtin.into_iter().chain(custom))
}

/// The annotation `kubectl apply` keeps a whole copy of the object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops the metadata the registry never reads and that is often most of a small
/// object: server-side apply's managed fields and kubectl's last-applied copy.
fn slim_metadata<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED);
    }
}

/// Drops what the registry never reads from a Pod (it is most of the object).
fn slim_pod(pod: &mut Pod) {
    slim_metadata(pod);
    if let Some(status) = &mut pod.status {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}

/// Names the snapshots are built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshNames {
    pub trust_domain: String,
    /// Where mesh-wide policies live: the control plane's namespace.
    pub root_namespace: String,
    /// The namespaces whose Services, routes and policies are in the mesh.
    pub scope: NamespaceScope,
}

/// Watches the cluster and publishes snapshots until the task is dropped.
pub async fn watch_cluster(client: Client, names: MeshNames, debounce: Duration, out: Outputs) {
    run(changes(client), &names, debounce, &out).await;
}

/// The registry loop over any stream of changes (tests feed it directly).
pub async fn run(
    changes: impl Stream<Item = Change> + Send,
    names: &MeshNames,
    debounce: Duration,
    out: &Outputs,
) {
    let mut changes = std::pin::pin!(changes);
    let mut registry = Registry::default();
    while let Some(first) = changes.next().await {
        let mut dirty = registry.apply(first);
        // Fold what arrives within `debounce` into the same snapshot.
        let deadline = tokio::time::sleep(debounce);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                next = changes.next() => match next {
                    Some(change) => dirty |= registry.apply(change),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        registry.report_errors(&out.status);
        if dirty {
            registry.publish(names, out);
        }
    }
    tracing::warn!("the Kubernetes watch streams ended");
}

/// The state and the bookkeeping of the registry loop.
#[derive(Default)]
struct Registry {
    state: ClusterState,
    /// The latest failure of each kind, cleared by its next success.
    errors: BTreeMap<Kind, String>,
    errors_reported: bool,
    /// Optional kinds known to be absent (logged once).
    absent: BTreeMap<Kind, ()>,
}

impl Registry {
    /// Applies one change; returns whether a snapshot may need rebuilding.
    fn apply(&mut self, change: Change) -> bool {
        let (kind, changed) = match change {
            Change::Service(e) => (Kind::Service, self.state.services.apply(*e)),
            Change::EndpointSlice(e) => (Kind::EndpointSlice, self.state.endpoint_slices.apply(*e)),
            Change::Pod(e) => (Kind::Pod, self.state.pods.apply(*e)),
            Change::Namespace(e) => (Kind::Namespace, self.state.namespaces.apply(*e)),
            Change::ServiceAccount(e) => {
                (Kind::ServiceAccount, self.state.service_accounts.apply(*e))
            }
            Change::Custom(kind, e) => {
                // The watcher announces every relist with `Init`, also the ones that
                // then fail with 404: only a listed object or a finished list shows
                // the CRD is there.
                let listed = !matches!(*e, Event::Init);
                if listed && self.absent.remove(&kind).is_some() {
                    tracing::info!(kind = kind.name(), "optional CRD is now installed");
                }
                let Some(store) = self.state.custom_mut(kind) else {
                    return false;
                };
                (kind, store.apply(*e))
            }
            Change::Failed(kind, error) => return self.failed(kind, error),
        };
        if self.errors.remove(&kind).is_some() {
            tracing::info!(kind = kind.name(), "watch recovered");
            self.errors_reported = false;
        }
        changed
    }

    fn failed(&mut self, kind: Kind, error: watcher::Error) -> bool {
        if kind.optional() && is_not_found(&error) {
            if self.absent.insert(kind, ()).is_none() {
                tracing::info!(
                    kind = kind.name(),
                    "optional CRD is not installed; carrying on without it"
                );
            }
            return self
                .state
                .custom_mut(kind)
                .is_some_and(KindStore::set_absent);
        }
        if is_gone(&error) {
            tracing::info!(
                kind = kind.name(),
                "watch expired (410 Gone); listing again"
            );
            return false;
        }
        tracing::warn!(kind = kind.name(), error = %error, "watch failed; retrying with backoff");
        self.errors.insert(kind, error.to_string());
        self.errors_reported = false;
        false
    }

    fn report_errors(&mut self, status: &watch::Sender<RegistryStatus>) {
        if self.errors_reported {
            return;
        }
        self.errors_reported = true;
        let errors: Vec<RegistryErrorView> = self
            .errors
            .iter()
            .map(|(kind, reason)| RegistryErrorView {
                file: format!("kube:{}", kind.name()),
                line: None,
                reason: reason.clone(),
            })
            .collect();
        status.send_if_modified(|s| {
            let changed = s.last_error != errors;
            s.last_error = errors;
            changed
        });
    }

    fn publish(&self, names: &MeshNames, out: &Outputs) {
        if !self.state.is_complete() {
            return;
        }
        let labels = self.state.namespace_labels();
        out.namespaces.send_if_modified(|current| {
            let changed = **current != labels;
            if changed {
                *current = Arc::new(labels);
            }
            changed
        });
        let (snapshot, report) = evaluate_in(
            &self.state,
            &names.trust_domain,
            &names.root_namespace,
            &names.scope,
        );
        let warnings = report.warnings();
        out.statuses.send_if_modified(|current| {
            let changed = **current != report;
            if changed {
                *current = Arc::new(report);
            }
            changed
        });
        out.status.send_if_modified(|s| {
            let changed = s.warnings != warnings;
            s.warnings = warnings;
            changed
        });
        let (services, workloads) = (snapshot.services.len(), snapshot.workloads.len());
        let first = out.status.borrow().generation == 0;
        if !first && **out.snapshots.borrow() == snapshot {
            return;
        }
        let accepted = super::file::accepted_objects(&snapshot);
        out.snapshots.send_replace(Arc::new(snapshot));
        out.status.send_modify(|s| {
            s.generation += 1;
            s.services = services;
            s.workloads = workloads;
            s.accepted = accepted;
            tracing::info!(
                generation = s.generation,
                services,
                workloads,
                "registry snapshot updated"
            );
        });
    }
}

fn api_status(error: &watcher::Error) -> Option<&kube::core::Status> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s),
        watcher::Error::WatchError(s) => Some(s),
        _ => None,
    }
}

/// kube-core's `Status::is_not_found()` goes by the reason, and a missing CRD's 404
/// comes as a plain-text body, which kube turns into a Status with the code and the
/// reason "Failed to parse error data": the code counts too.
fn is_not_found(error: &watcher::Error) -> bool {
    api_status(error).is_some_and(|s| s.is_not_found() || s.code == 404)
}

/// kube-core has no helper for an expired watch (`410 Gone`, reason `Expired` or
/// `Gone`); the code says it.
fn is_gone(error: &watcher::Error) -> bool {
    api_status(error).is_some_and(|s| s.code == 410)
}

#[cfg(test)]
pub(crate) mod fake_api;
#[cfg(test)]
mod tests;
