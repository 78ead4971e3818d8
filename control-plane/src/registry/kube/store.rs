//! One kind's objects, kept from watcher events in kube-runtime's reflector store.
//!
//! The reflector's [`Writer`] does the keeping, including what matters most here: a
//! (re-)list is buffered from `Init` to `InitDone` and swapped in whole, so a re-list
//! after `410 Gone` or an API-server restart never shows a half-listed kind. What this
//! wrapper adds, because the reflector does not offer it:
//!
//! - whether an event may have changed what is visible (the registry rebuilds a
//!   snapshot only then);
//! - whether a list has completed, synchronously (the reflector's readiness is a
//!   future), and marking an optional kind whose CRD is absent as listed and empty;
//! - iteration in namespace and name order, so snapshots do not depend on a hash
//!   map's order.

use std::hash::Hash;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{Lookup, ObjectRef, Store};
use kube::runtime::watcher::Event;

/// Namespace (empty for cluster-scoped kinds) and name.
pub type ObjectKey = (String, String);

/// A kind a [`KindStore`] holds, with the dynamic type its keys carry.
pub trait StoredKind: Lookup + Clone + 'static
where
    Self::DynamicType: Eq + Hash + Clone,
{
    fn store_type() -> Self::DynamicType;
}

macro_rules! typed_kinds {
    ($($kind:ty),*) => {$(
        impl StoredKind for $kind {
            fn store_type() -> Self::DynamicType {}
        }
    )*};
}
typed_kinds!(Service, EndpointSlice, Pod, Namespace, ServiceAccount);

impl StoredKind for DynamicObject {
    /// A store holds one kind, so its keys need not say which: one fixed type does.
    fn store_type() -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk("", "", ""))
    }
}

/// The objects of one kind, as of the last completed list plus the events since.
pub struct KindStore<K: StoredKind>
where
    K::DynamicType: Eq + Hash + Clone,
{
    writer: Writer<K>,
    reader: Store<K>,
    /// A list has completed at least once.
    listed: bool,
}

impl<K: StoredKind> std::fmt::Debug for KindStore<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KindStore")
            .field("objects", &self.reader.len())
            .field("listed", &self.listed)
            .finish()
    }
}

impl<K: StoredKind> Default for KindStore<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn default() -> Self {
        let writer = Writer::new(K::store_type());
        KindStore {
            reader: writer.as_reader(),
            writer,
            listed: false,
        }
    }
}

impl<K: StoredKind> KindStore<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    /// A store that has completed a list with exactly `objects` (tests, and kinds
    /// whose absence counts as empty).
    pub fn listed(objects: impl IntoIterator<Item = K>) -> Self {
        let mut store = Self::default();
        store.apply(Event::Init);
        for o in objects {
            store.apply(Event::InitApply(o));
        }
        store.apply(Event::InitDone);
        store
    }

    /// Applies one watcher event. Returns whether the visible contents may have
    /// changed (a completed list or a change after one).
    pub fn apply(&mut self, event: Event<K>) -> bool {
        let changed = match &event {
            Event::Init | Event::InitApply(_) => false,
            Event::InitDone => true,
            Event::Apply(_) => self.listed,
            Event::Delete(o) => {
                self.listed && self.reader.get(&o.to_object_ref(K::store_type())).is_some()
            }
        };
        if matches!(event, Event::InitDone) {
            self.listed = true;
        }
        self.writer.apply_watcher_event(&event);
        changed
    }

    /// A list has completed: the contents are a whole view of the kind.
    pub fn is_listed(&self) -> bool {
        self.listed
    }

    /// Marks the kind listed and empty (an optional kind that is not installed).
    pub fn set_absent(&mut self) -> bool {
        let changed = !self.listed || !self.reader.is_empty();
        self.writer.apply_watcher_event(&Event::Init);
        self.writer.apply_watcher_event(&Event::InitDone);
        self.listed = true;
        changed
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        let mut key = ObjectRef::<K>::new_with(name, K::store_type());
        if !namespace.is_empty() {
            key = key.within(namespace);
        }
        self.reader.get(&key)
    }

    /// The objects, by namespace and name.
    pub fn iter(&self) -> impl Iterator<Item = Arc<K>> + use<K> {
        let mut objects = self.reader.state();
        objects.sort_by_cached_key(|o| key(o.as_ref()));
        objects.into_iter()
    }

    pub fn len(&self) -> usize {
        self.reader.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reader.is_empty()
    }
}

fn key<K: Lookup>(o: &K) -> ObjectKey {
    (
        o.namespace().map(|n| n.into_owned()).unwrap_or_default(),
        o.name().map(|n| n.into_owned()).unwrap_or_default(),
    )
}
