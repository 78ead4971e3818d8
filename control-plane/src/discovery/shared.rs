//! The resources of one snapshot that every proxy is sent alike, built once and
//! shared by every stream, with the names that changed since the snapshot before:
//! a change costs each stream a look at the changed names, not a rebuild of its view.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use trellis_proto::discovery::v1::type_url;

use super::resources::{self, ResourceSet, SHARED_TYPES};
use super::status::SentVersions;
use crate::model::{MeshSnapshot, WorkloadLookup};

/// A burst of snapshots (a rollout, a namespace applied at once) is built once: the
/// builder waits until the registry is quiet this long ...
pub const DEBOUNCE_QUIET: Duration = Duration::from_millis(10);
/// ... but never longer than this after the first change of the burst.
pub const DEBOUNCE_MAX: Duration = Duration::from_millis(100);

/// One snapshot's shared resources.
#[derive(Debug)]
pub struct SharedResources {
    /// Counts the builds, from 0.
    pub generation: u64,
    pub snapshot: Arc<MeshSnapshot>,
    /// The snapshot's workloads, indexed: a stream's policy scope is a lookup.
    pub workloads: WorkloadLookup,
    /// The resources of [`SHARED_TYPES`].
    sets: BTreeMap<&'static str, Arc<TypedSet>>,
    /// Route tables per proxy namespace, built on first use.
    route_tables: Mutex<HashMap<String, Arc<TypedSet>>>,
    /// Per type (the shared ones and route tables): the names added, changed or
    /// removed since generation `generation - 1`. `None` for the first build.
    changed: Option<BTreeMap<&'static str, BTreeSet<String>>>,
}

impl SharedResources {
    pub fn build(
        snapshot: Arc<MeshSnapshot>,
        trust_domain: &str,
        roots_pem: &[String],
        previous: Option<&SharedResources>,
    ) -> Self {
        let mut built = resources::shared_resources(&snapshot, trust_domain, roots_pem);
        let sets: BTreeMap<&'static str, Arc<TypedSet>> = SHARED_TYPES
            .iter()
            .map(|t| {
                (
                    *t,
                    Arc::new(TypedSet::new(built.remove(t).unwrap_or_default())),
                )
            })
            .collect();
        let changed = previous.map(|previous| {
            let mut changed: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
            let empty = ResourceSet::new();
            for type_url in SHARED_TYPES {
                let old = previous.sets.get(type_url).map_or(&empty, |s| &s.set);
                let new = sets.get(type_url).map_or(&empty, |s| &s.set);
                changed.insert(type_url, changed_names(old, new));
            }
            let old_routes = &previous.snapshot.routes;
            let new_routes = &snapshot.routes;
            let routes = old_routes
                .iter()
                .filter(|(key, rules)| new_routes.get(*key) != Some(*rules))
                .map(|(key, _)| key)
                .chain(
                    new_routes
                        .keys()
                        .filter(|key| !old_routes.contains_key(*key)),
                )
                .map(ToString::to_string)
                .collect();
            changed.insert(type_url::ROUTE_TABLE, routes);
            changed
        });
        SharedResources {
            generation: previous.map_or(0, |p| p.generation + 1),
            workloads: WorkloadLookup::new(&snapshot.workloads),
            snapshot,
            sets,
            route_tables: Mutex::default(),
            changed,
        }
    }

    /// The resources of one of [`SHARED_TYPES`].
    pub fn shared_set(&self, type_url: &str) -> Option<&ResourceSet> {
        self.sets.get(type_url).map(|s| &s.set)
    }

    /// What every proxy in `namespace` is sent of `type_url`: one of
    /// [`SHARED_TYPES`] or route tables; `None` for the per-proxy types.
    pub fn typed_set(&self, type_url: &str, namespace: &str) -> Option<Arc<TypedSet>> {
        if type_url == type_url::ROUTE_TABLE {
            return Some(self.route_table_set(namespace));
        }
        self.sets.get(type_url).cloned()
    }

    /// The route tables of a proxy in `namespace`, built once per namespace.
    pub fn route_tables(&self, namespace: &str) -> Arc<TypedSet> {
        self.route_table_set(namespace)
    }

    fn route_table_set(&self, namespace: &str) -> Arc<TypedSet> {
        let build = || {
            Arc::new(TypedSet::new(resources::route_tables(
                &self.snapshot,
                namespace,
            )))
        };
        let Ok(mut cache) = self.route_tables.lock() else {
            return build();
        };
        cache
            .entry(namespace.to_owned())
            .or_insert_with(build)
            .clone()
    }

    /// The names of `type_url` that may differ from what a stream holding
    /// generation `held` was sent; `None` when that is not known (the stream is
    /// further behind, or the type is per proxy): compare everything.
    pub fn changed_since(&self, held: Option<u64>, type_url: &str) -> Option<&BTreeSet<String>> {
        if held? + 1 != self.generation {
            return None;
        }
        self.changed.as_ref()?.get(type_url)
    }
}

/// One type's resources as every proxy (of a namespace) is sent them, with the
/// digest of their names and versions.
#[derive(Debug)]
pub struct TypedSet {
    pub set: ResourceSet,
    pub digest: String,
}

impl TypedSet {
    fn new(set: ResourceSet) -> Self {
        let digest = SentVersions::from_held(
            set.iter()
                .map(|(name, r)| (name.clone(), r.version.clone()))
                .collect(),
        )
        .digest();
        TypedSet { set, digest }
    }
}

fn changed_names(old: &ResourceSet, new: &ResourceSet) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = new
        .iter()
        .filter(|(name, r)| old.get(*name).map(|o| &o.version) != Some(&r.version))
        .map(|(name, _)| name.clone())
        .collect();
    names.extend(old.keys().filter(|name| !new.contains_key(*name)).cloned());
    names
}

/// Builds the shared resources of the first snapshot now and of every later one in
/// a task, debounced ([`DEBOUNCE_QUIET`], at most [`DEBOUNCE_MAX`]). Needs a Tokio
/// runtime.
pub fn spawn_builder(
    mut snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    trust_domain: String,
    roots_pem: Vec<String>,
) -> watch::Receiver<Arc<SharedResources>> {
    let first = snapshots.borrow_and_update().clone();
    let first = Arc::new(SharedResources::build(
        first,
        &trust_domain,
        &roots_pem,
        None,
    ));
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            if snapshots.changed().await.is_err() {
                return;
            }
            let burst = Instant::now();
            loop {
                let left = DEBOUNCE_MAX.saturating_sub(burst.elapsed());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(DEBOUNCE_QUIET.min(left), snapshots.changed()).await {
                    Ok(Ok(())) => continue,
                    // Closed: build what there is, then stop at the next turn.
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            let snapshot = snapshots.borrow_and_update().clone();
            let previous = tx.borrow().clone();
            let trust_domain = trust_domain.clone();
            let roots_pem = roots_pem.clone();
            let started = Instant::now();
            // CPU-bound and proportional to the mesh: off the async workers.
            let built = tokio::task::spawn_blocking(move || {
                SharedResources::build(snapshot, &trust_domain, &roots_pem, Some(&previous))
            })
            .await;
            let Ok(built) = built else {
                tracing::error!("building the shared discovery resources failed");
                continue;
            };
            tracing::debug!(
                generation = built.generation,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "shared discovery resources built"
            );
            if tx.send(Arc::new(built)).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests;
