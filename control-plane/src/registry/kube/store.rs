//! One kind's objects, kept from watcher events.
//!
//! A (re-)list is buffered: `Init` opens a buffer, `InitApply` fills it, `InitDone`
//! swaps it in whole. Until then the previous contents stay visible, so a re-list
//! after `410 Gone` or an API-server restart never shows a half-listed kind.

use std::collections::BTreeMap;

use kube::Resource;
use kube::runtime::watcher::Event;

/// Namespace (empty for cluster-scoped kinds) and name.
pub type ObjectKey = (String, String);

/// The objects of one kind, as of the last completed list plus the events since.
#[derive(Clone, Debug)]
pub struct KindStore<K> {
    objects: BTreeMap<ObjectKey, K>,
    /// The list in progress, if any.
    relist: Option<BTreeMap<ObjectKey, K>>,
    /// A list has completed at least once.
    listed: bool,
}

impl<K> Default for KindStore<K> {
    fn default() -> Self {
        KindStore {
            objects: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<K: Resource> KindStore<K> {
    /// A store that has completed a list with exactly `objects` (tests, and kinds
    /// whose absence counts as empty).
    pub fn listed(objects: impl IntoIterator<Item = K>) -> Self {
        KindStore {
            objects: objects.into_iter().map(|o| (key(&o), o)).collect(),
            relist: None,
            listed: true,
        }
    }

    /// Applies one watcher event. Returns whether the visible contents may have
    /// changed (a completed list or a change after one).
    pub fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                // An InitApply without Init cannot come from kube's watcher; start a
                // buffer anyway rather than mix it into the served contents.
                self.relist.get_or_insert_default().insert(key(&o), o);
                false
            }
            Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(o) => {
                self.objects.insert(key(&o), o);
                self.listed
            }
            Event::Delete(o) => {
                let removed = self.objects.remove(&key(&o)).is_some();
                removed && self.listed
            }
        }
    }

    /// A list has completed: the contents are a whole view of the kind.
    pub fn is_listed(&self) -> bool {
        self.listed
    }

    /// Marks the kind listed and empty (an optional kind that is not installed).
    pub fn set_absent(&mut self) -> bool {
        let changed = !self.listed || !self.objects.is_empty();
        self.objects.clear();
        self.relist = None;
        self.listed = true;
        changed
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&K> {
        self.objects.get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

fn key<K: Resource>(o: &K) -> ObjectKey {
    let meta = o.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}
