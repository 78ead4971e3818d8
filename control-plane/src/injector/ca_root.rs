//! The mesh root in every namespace, as Istio's `istio-ca-root-cert`: a ConfigMap
//! [`CA_ROOT_CONFIGMAP`] with the root PEM under [`CA_ROOT_FILE`], which injected
//! proxies mount as a configMap volume. The leader writes it (server-side apply,
//! field manager `trellis-control`) into every namespace but Kubernetes' own, so a
//! Pod injected offline by `trellisctl inject` finds it too, and a new root reaches
//! running Pods without re-creating them. Each is owned by the control plane's
//! Namespace, so uninstalling Trellis (which deletes that namespace) lets the garbage
//! collector remove them from every namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::watch;

use super::sidecar::CA_ROOT_FILE;
use crate::registry::kube::{FIELD_MANAGER, NamespaceLabels};

pub const CA_ROOT_CONFIGMAP: &str = "trellis-ca-root";
/// Kubernetes' own namespaces, where no injected Pod runs.
const SKIPPED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// How often every ConfigMap is written again (repairs edits and deletions).
pub const RESYNC: Duration = Duration::from_secs(300);
/// After a failed write, how long before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The ConfigMap as applied, owned by `owner` (the control plane's Namespace).
pub fn config_map(namespace: &str, root_pem: &str, owner: &OwnerReference) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CA_ROOT_CONFIGMAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            owner_references: Some(vec![owner.clone()]),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/part-of".to_owned(), "trellis".to_owned()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    FIELD_MANAGER.to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            CA_ROOT_FILE.to_owned(),
            root_pem.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

/// Writes the root into every namespace while `leading`; runs until `namespaces`
/// closes. A closed `leading` channel keeps its last value. `own_namespace` (the
/// control plane's) owns the ConfigMaps; none is written until it has been read.
pub async fn publish_ca_root(
    client: Client,
    root_pem: String,
    own_namespace: String,
    mut namespaces: watch::Receiver<Arc<NamespaceLabels>>,
    mut leading: watch::Receiver<bool>,
) {
    let mut owner: Option<OwnerReference> = None;
    // Namespaces written since the last resync (or since becoming leader).
    let mut written = BTreeSet::new();
    let mut leading_open = true;
    let resync = tokio::time::sleep(RESYNC);
    tokio::pin!(resync);
    loop {
        let leads = *leading.borrow_and_update();
        let current = namespaces.borrow_and_update().clone();
        let mut failed = 0;
        if leads && owner.is_none() {
            match namespace_owner(&client, &own_namespace).await {
                Ok(reference) => owner = Some(reference),
                Err(e) => {
                    failed += 1;
                    tracing::warn!(namespace = %own_namespace, error = %e, "reading the control plane's namespace failed; the mesh root ConfigMaps wait for it");
                }
            }
        }
        if leads && let Some(owner) = &owner {
            for namespace in current.keys() {
                if SKIPPED.contains(&namespace.as_str()) || written.contains(namespace) {
                    continue;
                }
                match apply(&client, namespace, &root_pem, owner).await {
                    Ok(()) => {
                        written.insert(namespace.clone());
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(namespace, error = %e, "writing the mesh root ConfigMap failed; will try again");
                    }
                }
            }
        } else {
            written.clear();
        }
        written.retain(|n| current.contains_key(n));
        tokio::select! {
            changed = namespaces.changed() => if changed.is_err() {
                return;
            },
            changed = leading.changed(), if leading_open => if changed.is_err() {
                leading_open = false;
            },
            _ = &mut resync => {
                written.clear();
                resync.as_mut().reset(tokio::time::Instant::now() + RESYNC);
            }
            _ = tokio::time::sleep(RETRY_AFTER), if failed > 0 => {}
        }
    }
}

/// A reference to Namespace `name` as an owner. Not blocking its deletion: the
/// garbage collector removes the ConfigMaps once the namespace is gone.
async fn namespace_owner(client: &Client, name: &str) -> Result<OwnerReference, kube::Error> {
    let namespace = Api::<Namespace>::all(client.clone()).get(name).await?;
    Ok(OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Namespace".to_owned(),
        name: name.to_owned(),
        uid: namespace.metadata.uid.unwrap_or_default(),
        ..OwnerReference::default()
    })
}

async fn apply(
    client: &Client,
    namespace: &str,
    root_pem: &str,
    owner: &OwnerReference,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let object = config_map(namespace, root_pem, owner);
    api.patch(CA_ROOT_CONFIGMAP, &params, &Patch::Apply(&object))
        .await?;
    tracing::debug!(namespace, "mesh root ConfigMap written");
    Ok(())
}

#[cfg(test)]
mod tests;
